"""FSL/BIDS gradient tables: read, check, find shells, pick the volumes a DTI fit uses."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iqt_pipe.dmri.dti import fsl_flip, voxel_to_world_rotation
from iqt_pipe.io import InputError, save_text

#: b-values at or below this (s/mm²) count as b = 0.
B0_THRESHOLD = 50.0
#: Largest deviation of a b > 0 gradient vector's norm from 1.
UNIT_TOLERANCE = 0.05
#: b-values closer than this (s/mm²) to their neighbour belong to one shell.
SHELL_TOLERANCE = 100.0
#: DTI prefers a shell below this b-value when several exist (IQT protocol).
DTI_MAX_B = 1500.0


class GradientError(InputError):
    """A gradient table that cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class GradientTable:
    """b-values (s/mm²) and unit gradient directions in the FSL (bvec-file) frame."""

    bvals: np.ndarray  # (N,)
    bvecs: np.ndarray  # (N, 3)
    b0_threshold: float = B0_THRESHOLD

    @property
    def b0_mask(self) -> np.ndarray:
        return self.bvals <= self.b0_threshold

    def shells(self, tolerance: float = SHELL_TOLERANCE) -> list[float]:
        """b-values of the b > 0 shells, ascending (see :func:`find_shells`)."""
        return find_shells(self.bvals, self.b0_threshold, tolerance)[0]

    def shell_index(self, tolerance: float = SHELL_TOLERANCE) -> np.ndarray:
        """Per volume: -1 for b = 0, else the index of its shell in :meth:`shells`."""
        return find_shells(self.bvals, self.b0_threshold, tolerance)[1]

    def subset(self, keep: np.ndarray) -> GradientTable:
        return GradientTable(self.bvals[keep], self.bvecs[keep], self.b0_threshold)

    def bvecs_voxel(self, affine: np.ndarray) -> np.ndarray:
        """Directions in the voxel frame of an image with this affine."""
        return self.bvecs @ fsl_flip(affine)

    def bvecs_world(self, affine: np.ndarray) -> np.ndarray:
        """Directions in world (scanner RAS) coordinates, as MRtrix3 uses them."""
        return self.bvecs_voxel(affine) @ voxel_to_world_rotation(affine).T


def _read_matrix(path: Path, what: str) -> np.ndarray:
    if not path.exists():
        raise GradientError(f"{path}: {what} file not found; every DWI run needs .bval and .bvec")
    text = path.read_text(errors="replace").strip()
    if not text:
        raise GradientError(f"{path}: {what} file is empty; re-export it with dcm2niix")
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.replace(",", " ").split()
        if not fields:
            continue
        try:
            rows.append([float(f) for f in fields])
        except ValueError:
            bad = next(f for f in fields if not _is_float(f))
            raise GradientError(
                f"{path}: line {lineno} has a non-numeric value {bad!r}; "
                f"a {what} file holds only numbers separated by spaces"
            ) from None
    if len({len(r) for r in rows}) != 1:
        raise GradientError(
            f"{path}: rows of different lengths ({', '.join(str(len(r)) for r in rows)} values); "
            "every row needs one value per volume"
        )
    return np.array(rows, dtype=np.float64)


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def read_gradients(
    bval: str | os.PathLike,
    bvec: str | os.PathLike,
    n_volumes: int | None = None,
    b0_threshold: float = B0_THRESHOLD,
    unit_tolerance: float = UNIT_TOLERANCE,
) -> GradientTable:
    """Read and check an FSL ``.bval``/``.bvec`` pair.

    ``n_volumes`` is the length of the DWI series' 4th dimension when known. Raises
    :class:`GradientError` with a one-line message naming the file and the fix.
    """
    bval, bvec = Path(bval), Path(bvec)
    bvals = _read_matrix(bval, "bval")
    if bvals.shape[0] != 1:
        if bvals.shape[1] == 1:
            bvals = bvals.T
        else:
            raise GradientError(
                f"{bval}: expected one row of b-values, found {bvals.shape[0]} rows of {bvals.shape[1]}"
            )
    bvals = bvals[0]
    vecs = _read_matrix(bvec, "bvec")
    if vecs.shape[0] != 3:
        if vecs.shape[1] == 3:
            raise GradientError(
                f"{bvec}: found {vecs.shape[0]} rows of 3 values: the table is transposed; "
                "FSL/BIDS bvec files have 3 rows (x, y, z) with one column per volume"
            )
        raise GradientError(f"{bvec}: expected 3 rows (x, y, z), found {vecs.shape[0]} rows of {vecs.shape[1]}")
    bvecs = vecs.T
    if len(bvals) != len(bvecs):
        raise GradientError(
            f"{bval}: {len(bvals)} b-values but {bvec.name} has {len(bvecs)} directions; "
            "both must list one entry per volume"
        )
    if n_volumes is not None and len(bvals) != n_volumes:
        raise GradientError(
            f"{bval}: {len(bvals)} entries but the DWI series has {n_volumes} volumes; "
            "use the gradient files written together with this image"
        )
    if not np.all(np.isfinite(bvals)) or np.any(bvals < 0):
        raise GradientError(f"{bval}: b-values must be finite and non-negative")
    if not np.all(np.isfinite(bvecs)):
        raise GradientError(f"{bvec}: gradient directions contain NaN or Inf")

    norms = np.linalg.norm(bvecs, axis=1)
    weighted = bvals > b0_threshold
    zero_dir = weighted & (norms < 1e-6)
    if np.any(zero_dir):
        vol = int(np.flatnonzero(zero_dir)[0])
        raise GradientError(
            f"{bvec}: volume {vol} has b={bvals[vol]:g} but a zero gradient direction; "
            "each b > 0 volume needs a unit vector"
        )
    not_unit = weighted & (np.abs(norms - 1.0) > unit_tolerance)
    if np.any(not_unit):
        vol = int(np.flatnonzero(not_unit)[0])
        raise GradientError(
            f"{bvec}: volume {vol} has a gradient direction of length {norms[vol]:.3f}, "
            f"not 1 ± {unit_tolerance}; normalise the vectors (and scale b by the squared "
            "norm if the scanner encoded b in the length)"
        )
    b0_bad = ~weighted & (norms > 1e-6) & (np.abs(norms - 1.0) > unit_tolerance)
    if np.any(b0_bad):
        vol = int(np.flatnonzero(b0_bad)[0])
        raise GradientError(
            f"{bvec}: b=0 volume {vol} has a direction of length {norms[vol]:.3f}; "
            "b=0 directions must be zero or unit vectors"
        )
    unit = np.where(norms[:, None] > 1e-6, bvecs / np.maximum(norms, 1e-12)[:, None], 0.0)
    return GradientTable(bvals, unit, b0_threshold)


def find_shells(
    bvals: np.ndarray, b0_threshold: float = B0_THRESHOLD, tolerance: float = SHELL_TOLERANCE
) -> tuple[list[float], np.ndarray]:
    """Cluster the b > 0 values: a sorted value more than ``tolerance`` above its
    predecessor starts a new shell. Returns the shells' median b-values (ascending) and,
    per volume, its shell index (-1 for b = 0)."""
    bvals = np.asarray(bvals, dtype=float)
    index = np.full(bvals.shape, -1, dtype=int)
    weighted = np.flatnonzero(bvals > b0_threshold)
    if weighted.size == 0:
        return [], index
    order = weighted[np.argsort(bvals[weighted], kind="stable")]
    labels = np.concatenate([[0], np.cumsum(np.diff(bvals[order]) > tolerance)])
    index[order] = labels
    shells = [float(np.median(bvals[order][labels == k])) for k in range(labels[-1] + 1)]
    return shells, index


def select_dti_volumes(gtab: GradientTable, source: str = "gradient table") -> np.ndarray:
    """Volumes for the DTI fit of the IQT protocol: every b = 0 plus one shell.

    The shell is the highest one below 1500 s/mm² when there is one, else the lowest.
    Raises :class:`GradientError` when no fit is possible.
    """
    if not np.any(gtab.b0_mask):
        raise GradientError(f"{source}: no b=0 volume (b ≤ {gtab.b0_threshold:g}); a DTI fit needs at least one")
    shells = gtab.shells()
    if not shells:
        raise GradientError(f"{source}: only b=0 volumes; a DTI fit needs a diffusion-weighted shell")
    below = [k for k, b in enumerate(shells) if b < DTI_MAX_B]
    chosen = below[-1] if below else 0
    keep = gtab.b0_mask | (gtab.shell_index() == chosen)
    dirs = gtab.bvecs[keep & ~gtab.b0_mask]
    # The six quadratic terms g gᵀ must span the tensor space.
    design = np.stack(
        [
            dirs[:, 0] ** 2,
            dirs[:, 0] * dirs[:, 1],
            dirs[:, 0] * dirs[:, 2],
            dirs[:, 1] ** 2,
            dirs[:, 1] * dirs[:, 2],
            dirs[:, 2] ** 2,
        ],
        axis=1,
    )
    if np.linalg.matrix_rank(design, tol=1e-6) < 6:
        raise GradientError(
            f"{source}: the b={shells[chosen]:g} shell has fewer than 6 non-collinear directions "
            f"({len(dirs)} volumes); a tensor cannot be fitted"
        )
    return keep


def write_gradients(gtab: GradientTable, bval: str | os.PathLike, bvec: str | os.PathLike) -> None:
    """Write an FSL ``.bval``/``.bvec`` pair atomically (bvecs in the FSL frame)."""
    save_text(" ".join(f"{b:g}" for b in gtab.bvals) + "\n", bval)
    save_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in gtab.bvecs.T) + "\n", bvec)
