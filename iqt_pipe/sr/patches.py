"""The patch library: LR/HR training patch pairs by the IQT protocol, cached on disk.

For every DWI run: :func:`~iqt_pipe.dmri.degrade.make_pair` gives voxel-frame LR and HR tensors
and brain masks; the run's :class:`~iqt_pipe.sr.normalise.ChannelStats` are the in-mask mean and
sd of its LR tensors. A patch pair is

* input: an ``input_size``³ (default 11³) block of standardised LR tensors, and
* target: the HR voxels of its central ``core``³ LR positions (``core = input_size − 2·margin``,
  7³ with the model's margin 2): ``r·core`` per axis (14³ for r = 2, 21³ for r = 3), encoded
  with :func:`~iqt_pipe.sr.normalise.encode_target` (the HR block of LR position p is
  ``r·p … r·p + r − 1``).

Centres are drawn without replacement (deterministically from ``(seed, run index)``) among the
LR brain-mask voxels whose whole ``core``³ block lies inside the volume; the input's margin may
reach past the volume, where it is padded with zero tensors as in whole-volume prediction
(:func:`iqt_pipe.sr.inference.predict_volume`).

Storage. A library keeps, per run, the standardised LR volume and the encoded HR volume
cropped to the patches' bounding box, plus the centres; patches are sliced on demand
(:meth:`PatchLibrary.get`). That is a few MB per subject instead of ~0.5 GB for 8000
materialised pairs. For validation it also keeps the HR brain mask and, per patch, the
squared errors of trilinear and cubic B-spline interpolation of the whole LR volume over the
target block's brain voxels, so baselines are scored on exactly the validation voxels. Errors
in mm²/s need only the run's sd: ``prediction − truth = (z_pred − z_target)·sd`` for both
targets.

Augmentation. Mirroring spatial axis a maps a tensor field D(x) to F D(Fx) F with
F = diag(±1): the off-diagonal components D_ab, b ≠ a, change sign. Because the per-run
statistics of a mirrored volume are those of the original with the off-diagonal means negated,
mirroring a *standardised* patch (input and target alike, either target) is exactly the
spatial flip plus negating those channels — the patch the pipeline would make from the
mirrored scan. Swapping axes is the same argument with a permutation matrix P:
D'(x) = P D(Pᵀx) Pᵀ, i.e. new axis a is old axis π(a) and D'_ab = D_π(a)π(b); the per-run
statistics are permuted alike and the cubic B-spline commutes with axis permutations, so the
transposed patch with its channels gathered is again exactly the pipeline's patch. Together
they are the 48 symmetries of the cube, numbered by a *symmetry code* ``8·p + m``: first the
axes are permuted by ``AXIS_PERMUTATIONS[p]``, then mirrored by the 3-bit mask ``m`` (bit a =
mirror axis a). Codes 0–7 are the mirrors alone.

Cache. :func:`build_library` writes ``patches-<key>.npz`` (atomic; read back with
``allow_pickle=False``) where the key hashes the runs' file names and contents, r, the patch
counts, the seed, the target, the geometry, the preprocessing and the grid shifts; a later
call with the same key loads it instead of refitting.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iqt_pipe.dmri.degrade import grid_offsets, make_pair, make_pairs
from iqt_pipe.dmri.dwi import load_dwi
from iqt_pipe.dmri.gradients import select_dti_volumes
from iqt_pipe.dmri.prepare import (
    NONE,
    Preprocessing,
    preprocess_series,
    series_domain,
    series_manufacturer,
    training_domain,
)
from iqt_pipe.dmri.preproc import align_volumes
from iqt_pipe.io import InputError, atomic_path
from iqt_pipe.sr.baselines import interpolate_tensors
from iqt_pipe.sr.normalise import TARGETS, ChannelStats, channel_stats, encode_target, network_input

LIBRARY_FORMAT = "iqt-pipe-patches"
#: Part of the cache key: bumped when the patches of the same files change. 2: the DTI fit
#: floors lost readings (version 1's targets had zero tensors in CSF voxels with a reading of 0).
LIBRARY_VERSION = 2
INPUT_SIZE = 11
MARGIN = 2
#: LR positions per axis whose HR blocks a patch's target holds (7 → 14³ HR voxels at r = 2).
CORE = INPUT_SIZE - 2 * MARGIN
#: Paper: 8000 patch pairs per subject.
DEFAULT_PATCHES_PER_SUBJECT = 8000

#: Channels (BEP016 order D11, D12, D13, D22, D23, D33) negated by mirroring each axis.
MIRROR_SIGNS = np.array(
    [
        [1, -1, -1, 1, 1, 1],  # axis 0: D12, D13
        [1, -1, 1, 1, -1, 1],  # axis 1: D12, D23
        [1, 1, -1, 1, -1, 1],  # axis 2: D13, D23
    ],
    dtype=np.float32,
)


def mirror_signs(code: int) -> np.ndarray:
    """Per-channel signs (6,) of the mirror with 3-bit ``code`` (bit a: mirror axis a)."""
    signs = np.ones(6, np.float32)
    for a in range(3):
        if code >> a & 1:
            signs = signs * MIRROR_SIGNS[a]
    return signs


#: Axis permutations of the symmetry codes (identity first): new axis a is old axis perm[a].
AXIS_PERMUTATIONS = tuple(itertools.permutations(range(3)))
#: Number of symmetry codes: mirrors alone, and mirrors with axis swaps.
N_MIRRORS, N_SYMMETRIES = 8, 8 * len(AXIS_PERMUTATIONS)
_COMPONENTS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))  # BEP016 order


def permutation_channels(perm: Sequence[int]) -> list[int]:
    """Source channel of each BEP016 component after permuting the axes by ``perm``."""
    return [_COMPONENTS.index(tuple(sorted((perm[a], perm[b])))) for a, b in _COMPONENTS]


def transform_patch(patch: np.ndarray, code: int) -> np.ndarray:
    """Apply symmetry ``code`` to a channels-first ``(6, X, Y, Z)`` standardised tensor patch
    (see the module doc)."""
    return np.moveaxis(transform_field(np.moveaxis(patch, 0, -1), code), -1, 0)


def transform_field(field: np.ndarray, code: int) -> np.ndarray:
    """Apply symmetry ``code`` to a channels-last ``(X, Y, Z, 6)`` tensor field (physical units
    or standardised)."""
    moved = transform_volume(field, code)
    if not code:
        return moved
    perm, mirror = AXIS_PERMUTATIONS[code // N_MIRRORS], code % N_MIRRORS
    return moved[..., permutation_channels(perm)] * mirror_signs(mirror)


def transform_volume(volume: np.ndarray, code: int) -> np.ndarray:
    """The voxel move of symmetry ``code`` alone, on the first three axes of ``volume`` (masks;
    the tensor components are left as they are)."""
    if not 0 <= code < N_SYMMETRIES:
        raise ValueError(f"symmetry codes run from 0 to {N_SYMMETRIES - 1}, got {code}")
    if not code:
        return volume
    perm, mirror = AXIS_PERMUTATIONS[code // N_MIRRORS], code % N_MIRRORS
    volume = np.transpose(volume, (*perm, *range(3, volume.ndim)))
    return np.flip(volume, axis=tuple(a for a in range(3) if mirror >> a & 1))


# --------------------------------------------------------------------------- one run


def candidate_centres(lr_mask: np.ndarray, core: int) -> np.ndarray:
    """LR brain voxels whose ``core``³ block lies inside the volume, ``(n, 3)`` int."""
    h = core // 2
    ok = np.zeros(lr_mask.shape, bool)
    inner = tuple(slice(h, s - h) for s in lr_mask.shape)
    ok[inner] = np.asarray(lr_mask, bool)[inner]
    return np.argwhere(ok)


@dataclass
class RunPatches:
    """The patches of one run (arrays cropped to the patches' bounding box)."""

    name: str
    r: int
    inputs: np.ndarray  # (Xi, Yi, Zi, 6) float32, standardised LR, padded by the margin
    targets: np.ndarray  # (r·Xc, r·Yc, r·Zc, 6) float32, encoded HR
    hr_mask: np.ndarray  # (r·Xc, r·Yc, r·Zc) bool
    centres: np.ndarray  # (n, 3) int, LR position of each patch centre in the cropped frame
    origin: np.ndarray  # (3,) int, LR index of the cropped frame's origin in the full volume
    mean: np.ndarray  # (6,) float64, the run's ChannelStats
    sd: np.ndarray  # (6,)
    sse_trilinear: np.ndarray  # (n,) float64, Σ over brain voxels and components, (mm²/s)²
    sse_cubic: np.ndarray  # (n,)
    n_brain: np.ndarray  # (n,) int, brain voxels in each target block
    #: (Xi, Yi, Zi) float32, the LR S0 input channel cropped and padded as ``inputs`` (None:
    #: built without the S0, which a model with the S0 input cannot train on).
    s0: np.ndarray | None = None
    input_size: int = INPUT_SIZE
    margin: int = MARGIN

    @property
    def core(self) -> int:
        return self.input_size - 2 * self.margin

    @property
    def stats(self) -> ChannelStats:
        return ChannelStats(self.mean, self.sd)

    def __len__(self) -> int:
        return len(self.centres)

    def _corner(self, j: int) -> np.ndarray:
        return self.centres[j] - self.core // 2

    def input(self, j: int) -> np.ndarray:
        """Channels-first ``(6, n, n, n)`` input of patch ``j``."""
        a = self._corner(j)
        n = self.input_size
        return self.inputs[a[0] : a[0] + n, a[1] : a[1] + n, a[2] : a[2] + n].transpose(3, 0, 1, 2)

    def s0_input(self, j: int) -> np.ndarray:
        """``(n, n, n)`` S0 input channel of patch ``j``."""
        if self.s0 is None:
            raise InputError(f"{self.name}: this patch library holds no S0 input; rebuild it (delete the cache)")
        a = self._corner(j)
        n = self.input_size
        return self.s0[a[0] : a[0] + n, a[1] : a[1] + n, a[2] : a[2] + n]

    def _hr_slices(self, j: int):
        a = self._corner(j) * self.r
        n = self.core * self.r
        return tuple(slice(v, v + n) for v in a)

    def target(self, j: int) -> np.ndarray:
        """Channels-first ``(6, r·core, r·core, r·core)`` target of patch ``j``."""
        return self.targets[self._hr_slices(j)].transpose(3, 0, 1, 2)

    def brain(self, j: int) -> np.ndarray:
        """``(r·core,)*3`` bool: HR brain voxels of patch ``j``'s target."""
        return self.hr_mask[self._hr_slices(j)]

    @classmethod
    def from_arrays(
        cls,
        lr_tensors: np.ndarray,
        hr_tensors: np.ndarray,
        lr_mask: np.ndarray,
        hr_mask: np.ndarray,
        r: int,
        *,
        n_patches: int | None = None,
        centres: np.ndarray | None = None,
        seed: int | Sequence[int] = 0,
        target: str = "hr",
        stats: ChannelStats | None = None,
        input_size: int = INPUT_SIZE,
        margin: int = MARGIN,
        name: str = "run",
        lr_s0: np.ndarray | None = None,
    ) -> RunPatches:
        """Patches from voxel-frame LR ``(X, Y, Z, 6)`` and HR ``(rX, rY, rZ, 6)`` tensors, and
        with ``lr_s0`` (the LR fit's S0) the S0 input channel.

        ``centres`` (full-volume LR indices) fixes the patches; otherwise ``n_patches``
        (all candidates when None) are drawn with ``numpy.random.default_rng(seed)``.
        """
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
        lr_tensors = np.asarray(lr_tensors, np.float32)
        hr_tensors = np.asarray(hr_tensors, np.float32)
        lr_mask = np.asarray(lr_mask, bool)
        if hr_tensors.shape[:3] != tuple(s * r for s in lr_tensors.shape[:3]):
            raise ValueError(f"HR shape {hr_tensors.shape[:3]} is not {r}× the LR shape {lr_tensors.shape[:3]}")
        core = input_size - 2 * margin
        if core < 1 or core % 2 == 0:
            raise ValueError(f"input size {input_size} with margin {margin} leaves an even or empty core")
        h = core // 2
        if centres is None:
            cand = candidate_centres(lr_mask, core)
            if len(cand) == 0:
                raise InputError(
                    f"{name}: no LR brain voxel has a {core}³ neighbourhood inside the volume "
                    f"(LR matrix {lr_tensors.shape[:3]}); the scan is too small for training at r = {r}"
                )
            rng = np.random.default_rng(seed)
            n = len(cand) if n_patches is None else min(int(n_patches), len(cand))
            centres = cand[np.sort(rng.choice(len(cand), size=n, replace=False))]
        centres = np.asarray(centres, dtype=np.int64).reshape(-1, 3)
        shape = np.array(lr_tensors.shape[:3])
        if np.any(centres < h) or np.any(centres > shape - 1 - h):
            raise ValueError(f"patch centres must keep their {core}³ block inside the volume")
        stats = stats or channel_stats(lr_tensors, lr_mask)
        lo, hi = centres.min(0) - h, centres.max(0) + h + 1  # LR crop [lo, hi)
        # The network's input, padded by the margin with background (as in prediction), cropped.
        z, background = network_input(lr_tensors, stats, lr_s0, lr_mask)
        padded = np.empty(tuple(shape + 2 * margin) + z.shape[3:], np.float32)
        padded[...] = background
        padded[margin : margin + shape[0], margin : margin + shape[1], margin : margin + shape[2]] = z
        inputs = padded[lo[0] : hi[0] + 2 * margin, lo[1] : hi[1] + 2 * margin, lo[2] : hi[2] + 2 * margin]
        hr_crop = tuple(slice(a * r, b * r) for a, b in zip(lo, hi))
        cubic = interpolate_tensors(lr_tensors, r, "cubic")
        trilinear = interpolate_tensors(lr_tensors, r, "trilinear")
        baseline = cubic if target == "residual-cubic" else None
        targets = encode_target(hr_tensors, stats, baseline)[hr_crop]
        hr_mask_c = np.asarray(hr_mask, bool)[hr_crop]
        run = cls(
            name=name,
            r=int(r),
            inputs=np.ascontiguousarray(inputs[..., :6]),
            s0=None if lr_s0 is None else np.ascontiguousarray(inputs[..., 6]),
            targets=np.ascontiguousarray(targets),
            hr_mask=np.ascontiguousarray(hr_mask_c),
            centres=centres - lo,
            origin=lo.astype(np.int64),
            mean=np.asarray(stats.mean, np.float64),
            sd=np.asarray(stats.sd, np.float64),
            sse_trilinear=np.zeros(len(centres)),
            sse_cubic=np.zeros(len(centres)),
            n_brain=np.zeros(len(centres), np.int64),
            input_size=input_size,
            margin=margin,
        )
        hr_c, tri_c, cub_c = hr_tensors[hr_crop], trilinear[hr_crop], cubic[hr_crop]
        for j in range(len(run)):
            sl, brain = run._hr_slices(j), run.brain(j)
            truth = hr_c[sl][brain].astype(np.float64)
            run.sse_trilinear[j] = np.sum((tri_c[sl][brain] - truth) ** 2)
            run.sse_cubic[j] = np.sum((cub_c[sl][brain] - truth) ** 2)
            run.n_brain[j] = int(brain.sum())
        return run

    # -- (de)serialisation
    _ARRAYS = (
        "inputs",
        "targets",
        "hr_mask",
        "centres",
        "origin",
        "mean",
        "sd",
        "sse_trilinear",
        "sse_cubic",
        "n_brain",
    )

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        arrays = {f"{prefix}{k}": getattr(self, k) for k in self._ARRAYS}
        return arrays if self.s0 is None else arrays | {f"{prefix}s0": self.s0}

    @classmethod
    def from_npz(cls, data, prefix: str, name: str, r: int, input_size: int, margin: int) -> RunPatches:
        arrays = {k: data[f"{prefix}{k}"] for k in cls._ARRAYS}
        arrays["hr_mask"] = arrays["hr_mask"].astype(bool)
        arrays["s0"] = data[f"{prefix}s0"] if f"{prefix}s0" in data else None
        return cls(name=name, r=r, input_size=input_size, margin=margin, **arrays)


# --------------------------------------------------------------------------- the library


class PatchLibrary:
    """Patch pairs of several runs, addressed by one global index."""

    def __init__(self, runs: list[RunPatches], target: str, meta: dict | None = None):
        if not runs:
            raise ValueError("a patch library needs at least one run")
        first = runs[0]
        for run in runs:
            if (run.r, run.input_size, run.margin) != (first.r, first.input_size, first.margin):
                raise ValueError("all runs of a library must share r, input size and margin")
        self.runs, self.target, self.meta = runs, target, dict(meta or {})
        self.r, self.input_size, self.margin = first.r, first.input_size, first.margin
        self.index = np.concatenate(
            [np.stack([np.full(len(run), i), np.arange(len(run))], 1) for i, run in enumerate(runs)]
        ).astype(np.int64)
        self.path: Path | None = None
        self.from_cache = False

    def __len__(self) -> int:
        return len(self.index)

    @property
    def core(self) -> int:
        return self.input_size - 2 * self.margin

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """The tensor components' input shape (one channel more with the S0)."""
        return (6,) + (self.input_size,) * 3

    @property
    def target_shape(self) -> tuple[int, int, int, int]:
        return (6,) + (self.r * self.core,) * 3

    def pair(self, i: int, symmetry: int = 0, s0: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Channels-first float32 ``(input, target)`` of patch ``i``, optionally transformed by
        a symmetry code (mirrors, axis swaps; see the module doc); with ``s0`` the input's last
        channel is the S0 (moved like the voxels: a scalar has no components to sign)."""
        run, j = self.index[i]
        rp = self.runs[run]
        x = transform_patch(rp.input(j), symmetry)
        if s0:
            x = np.concatenate([x, transform_volume(rp.s0_input(j), symmetry)[None]])
        return x, transform_patch(rp.target(j), symmetry)

    def get(
        self, indices: Iterable[int], symmetries: Iterable[int] | None = None, s0: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Stacked ``(B, 6, n, n, n)`` inputs (7 channels with ``s0``) and ``(B, 6, m, m, m)`` targets."""
        indices = list(indices)
        symmetries = [0] * len(indices) if symmetries is None else list(symmetries)
        pairs = [self.pair(i, f, s0) for i, f in zip(indices, symmetries)]
        return (
            np.stack([p[0] for p in pairs]).astype(np.float32, copy=False),
            np.stack([p[1] for p in pairs]).astype(np.float32, copy=False),
        )

    def sd(self, indices: Iterable[int]) -> np.ndarray:
        """``(B, 6)`` per-patch channel sd (mm²/s): standardised error × sd = error in mm²/s."""
        return np.stack([self.runs[self.index[i][0]].sd for i in indices])

    def brain_patch(self, i: int, symmetry: int = 0) -> np.ndarray:
        """``(m, m, m)`` bool HR brain mask of patch ``i``'s target, moved like :meth:`pair`."""
        run, j = self.index[i]
        return transform_volume(self.runs[run].brain(j), symmetry)

    def brain(self, indices: Iterable[int]) -> np.ndarray:
        """``(B, m, m, m)`` bool HR brain masks of the targets."""
        return np.stack([self.runs[self.index[i][0]].brain(self.index[i][1]) for i in indices])

    def baseline_rmse(self, indices: Iterable[int]) -> dict[str, float]:
        """RMSE (mm²/s) of trilinear and cubic interpolation over the patches' brain voxels."""
        sse = {"trilinear": 0.0, "cubic": 0.0}
        count = 0
        for i in indices:
            run, j = self.index[i]
            rp = self.runs[run]
            sse["trilinear"] += rp.sse_trilinear[j]
            sse["cubic"] += rp.sse_cubic[j]
            count += rp.n_brain[j]
        return {k: float(np.sqrt(v / max(1, 6 * count))) for k, v in sse.items()}

    def summary(self) -> dict:
        return {
            "runs": len(self.runs),
            "patches": len(self),
            "patches_per_run": {rp.name: len(rp) for rp in self.runs},
            "r": self.r,
            "target": self.target,
            "input_size": self.input_size,
            "target_size": self.r * self.core,
            **{k: v for k, v in self.meta.items() if k in ("key", "seed", "patches_per_subject")},
        }

    # -- files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the library as one uncompressed ``.npz`` (atomically)."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {}
        for i, rp in enumerate(self.runs):
            arrays.update(rp.to_arrays(f"run{i}_"))
        header = {
            "format": LIBRARY_FORMAT,
            "version": LIBRARY_VERSION,
            "target": self.target,
            "r": self.r,
            "input_size": self.input_size,
            "margin": self.margin,
            "runs": [rp.name for rp in self.runs],
            "meta": self.meta,
        }
        arrays["header"] = np.array(json.dumps(header))
        with atomic_path(path) as tmp:
            np.savez(tmp, **arrays)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> PatchLibrary:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                if header.get("format") != LIBRARY_FORMAT or header.get("version") != LIBRARY_VERSION:
                    raise InputError(f"{path}: not an iqt-pipe patch library of version {LIBRARY_VERSION}; delete it")
                runs = [
                    RunPatches.from_npz(data, f"run{i}_", name, header["r"], header["input_size"], header["margin"])
                    for i, name in enumerate(header["runs"])
                ]
        except (OSError, KeyError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"{path}: unreadable patch library ({exc.__class__.__name__}: {exc}); delete it") from None
        lib = cls(runs, header["target"], header.get("meta"))
        lib.path = path
        return lib


# --------------------------------------------------------------------------- from BIDS runs


def _run_files(run) -> tuple[Path, Path, Path]:
    """``(dwi, bval, bvec)`` of a :class:`~iqt_pipe.bids.DWIRun` or a tuple of paths."""
    if hasattr(run, "dwi"):
        return Path(run.dwi), Path(run.bval), Path(run.bvec)
    dwi, bval, bvec = run
    return Path(dwi), Path(bval), Path(bvec)


def _run_id(run) -> str:
    return getattr(run, "name", None) or _run_files(run)[0].name.split(".")[0]


def _run_subject(run) -> str:
    entities = getattr(run, "entities", None) or {}
    return str(entities.get("subject", _run_id(run)))


#: Files up to this size are hashed whole; larger ones by their size, head and tail.
_DIGEST_WHOLE = 8 << 20


def content_digest(path: Path) -> str:
    """sha256 of a file's content: whole up to 8 MiB, else of its size and first and last
    4 MiB, which read in milliseconds on a large dataset. For a ``.nii.gz`` the tail holds the
    gzip trailer, the CRC-32 and length of the whole uncompressed image."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        if size <= _DIGEST_WHOLE:
            digest.update(fh.read())
        else:
            digest.update(fh.read(_DIGEST_WHOLE // 2))
            fh.seek(-_DIGEST_WHOLE // 2, os.SEEK_END)
            digest.update(fh.read())
    return digest.hexdigest()


def library_key(
    runs: Sequence,
    r: int,
    patches_per_subject: int,
    seed: int,
    target: str,
    input_size: int = INPUT_SIZE,
    margin: int = MARGIN,
    preprocessing: Preprocessing = NONE,
    grid_shifts: bool = False,
    register_volumes: bool = False,
) -> str:
    """sha256 over the runs' files (name and :func:`content_digest`) and every sampling setting:
    a copy of the data elsewhere, with new time stamps (a cluster job's scratch folder), has the
    same key, so its cached library and a checkpoint trained on it stay valid there."""
    files = []
    for run in runs:
        for p in _run_files(run):
            try:
                files.append([p.name, content_digest(p)])
            except OSError:
                raise InputError(f"{p}: file not found or not readable") from None
    spec = {
        "format": LIBRARY_FORMAT,
        "version": LIBRARY_VERSION,
        "files": files,
        "r": int(r),
        "patches_per_subject": int(patches_per_subject),
        "seed": int(seed),
        "target": target,
        "input_size": int(input_size),
        "margin": int(margin),
    }
    if preprocessing != NONE:  # (libraries of series as acquired keep their earlier keys)
        spec["preprocessing"] = preprocessing.to_card()
    if grid_shifts:  # (libraries of the one grid keep theirs too)
        spec["grid_shifts"] = True
    if register_volumes:  # (and those of series as acquired)
        spec["register_volumes"] = True
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def patch_geometry(margin: int) -> dict[str, int]:
    """``input_size`` and ``margin`` of the patches for a network losing ``margin`` LR voxels
    per side: the target keeps its ``CORE``³ LR positions, the input grows with the margin."""
    return {"input_size": CORE + 2 * int(margin), "margin": int(margin)}


def patches_per_run(runs: Sequence, patches_per_subject: int) -> list[int]:
    """A subject's ``patches_per_subject`` split evenly over its runs (ceil)."""
    counts: dict[str, int] = {}
    for run in runs:
        counts[_run_subject(run)] = counts.get(_run_subject(run), 0) + 1
    return [-(-int(patches_per_subject) // counts[_run_subject(run)]) for run in runs]


def _training_pairs(
    series,
    name: str,
    index: int,
    r: int,
    seed: int,
    preprocessing: Preprocessing,
    grid_shifts: bool,
    register_volumes: bool,
    cache_dir,
) -> list[tuple]:
    """Run ``index``'s training pairs for :func:`build_library`, each with its name and seed:
    its HR series preprocessed (then its DTI volumes registered, the result kept in
    ``cache_dir``), degraded on the one block grid or at all r³ alignments of it."""
    hr_dwi, gtab, source = preprocess_series(series.data, preprocessing), series.gtab, str(series.path)
    if register_volumes:
        keep = select_dti_volumes(gtab, source)
        hr_dwi, gtab = align_volumes(hr_dwi[..., keep], gtab.subset(keep), series.affine, cache_dir=cache_dir)
    if not grid_shifts:
        return [(make_pair(hr_dwi, series.affine, gtab, r, source), name, [int(seed), index])]
    offsets = grid_offsets(r)
    pairs = make_pairs(hr_dwi, series.affine, gtab, r, offsets, source)
    return [
        (p, f"{name}_grid-{''.join(map(str, o))}", [int(seed), index, k])
        for k, (p, o) in enumerate(zip(pairs, offsets))
    ]


def build_library(
    runs: Sequence,
    r: int = 2,
    patches_per_subject: int = DEFAULT_PATCHES_PER_SUBJECT,
    seed: int = 0,
    target: str = "hr",
    cache_dir: str | os.PathLike | None = None,
    *,
    input_size: int = INPUT_SIZE,
    margin: int = MARGIN,
    preprocessing: Preprocessing = NONE,
    grid_shifts: bool = False,
    register_volumes: bool = False,
    quiet: bool = False,
) -> PatchLibrary:
    """The patch library of DWI ``runs`` (:class:`~iqt_pipe.bids.DWIRun` or ``(dwi, bval, bvec)``).

    Each HR series is preprocessed (:func:`iqt_pipe.dmri.prepare.preprocess_series`) before its LR
    series is made, as the app preprocesses a native series; the library's ``meta`` records
    the preprocessing and the runs' domain (:func:`iqt_pipe.dmri.prepare.training_domain`) for the
    model card.

    With ``grid_shifts``, each run gives one LR series per alignment of the block grid
    (:func:`iqt_pipe.dmri.degrade.grid_offsets`, r³ of them, named ``<run>_grid-<ijk>``), its
    patches shared among them: the same anatomy, and as many patches, in r³ samplings.

    ``register_volumes``: each HR series' DTI volumes registered to each other after its
    preprocessing (:func:`iqt_pipe.dmri.preproc.align_volumes`, as QSIPrep does after denoising).

    With ``cache_dir``, reuse ``cache_dir/patches-<key>.npz`` when it exists (see :func:`library_key`),
    else build and write it; registered series are kept there too. Each run's centres are drawn
    from ``default_rng([seed, run index])`` (``[seed, run index, alignment]`` with ``grid_shifts``).
    """
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    if int(r) != r or r < 2:
        raise InputError(f"the upsampling factor must be an integer ≥ 2, got {r!r}")
    if patches_per_subject < 1:
        raise InputError(f"patches per subject must be ≥ 1, got {patches_per_subject}")
    runs = list(runs)
    if not runs:
        raise InputError("no DWI runs to train on")
    key = library_key(
        runs, r, patches_per_subject, seed, target, input_size, margin, preprocessing, grid_shifts, register_volumes
    )
    cache = Path(cache_dir) / f"patches-{key[:20]}.npz" if cache_dir is not None else None
    if cache is not None and cache.exists():
        lib = PatchLibrary.load(cache)
        # (A library cached before the S0 input was kept is built again, under the same key.)
        if lib.meta.get("key") == key and all(rp.s0 is not None for rp in lib.runs):
            lib.from_cache = True
            return lib
    from tqdm.auto import tqdm

    counts = patches_per_run(runs, patches_per_subject)
    built, domains = [], []
    bar = tqdm(list(zip(runs, counts)), desc="patch library", unit="run", disable=True if quiet else None)
    for i, (run, n) in enumerate(bar):
        dwi, bval, bvec = _run_files(run)
        name = _run_id(run)
        bar.set_postfix_str(name)
        series = load_dwi(dwi, bval, bvec)
        if min(series.data.shape[:3]) < r * (input_size - 2 * margin):
            raise InputError(
                f"{dwi}: matrix {series.data.shape[:3]} is too small for {input_size}³ LR patches at r = {r}"
            )
        domains.append(series_domain(series.affine, series.gtab, str(dwi), series_manufacturer(dwi)))
        pairs = _training_pairs(series, name, i, r, seed, preprocessing, grid_shifts, register_volumes, cache_dir)
        n = -(-n // len(pairs))  # (the run's patches shared among its alignments)
        for pair, pair_name, pair_seed in pairs:
            built.append(
                RunPatches.from_arrays(
                    pair.lr.tensors,
                    pair.hr.tensors,
                    pair.lr_mask,
                    pair.hr_mask,
                    r,
                    n_patches=n,
                    seed=pair_seed,
                    target=target,
                    input_size=input_size,
                    margin=margin,
                    name=pair_name,
                    lr_s0=pair.lr.s0,
                )
            )
    meta = {
        "key": key,
        "seed": int(seed),
        "patches_per_subject": int(patches_per_subject),
        "runs": [{"name": _run_id(run), "subject": _run_subject(run), "dwi": str(_run_files(run)[0])} for run in runs],
        "preprocessing": preprocessing.to_card(),
        "grid_shifts": bool(grid_shifts),
        "register_volumes": bool(register_volumes),
        "domain": training_domain(domains, r),
    }
    lib = PatchLibrary(built, target, meta)
    if cache is not None:
        lib.save(cache)
    return lib
