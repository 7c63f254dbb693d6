"""Streamline tractography with DIPY on tensor images, and the uncertainty along every
streamline: the tracking settings, white-matter seeds, the tensor ODF, the tracking itself, the
uncertainty limit, and the streamline geometry (lengths, sampling a map at the points, track
density) the other tracking modules share.

Plain functions, no Nipype (the interfaces in :mod:`iqt_pipe.interfaces.tractography` call them).
Tractogram files are :mod:`iqt_pipe.tracking.files`, MRtrix3's inputs
:mod:`iqt_pipe.tracking.mrtrix`, and the comparison of tractograms (an HR reference against
native-LR and super-resolved ones) :mod:`iqt_pipe.tracking.compare`.

Frames and coordinates. Tensor files are in world (scanner RAS) coordinates (DESIGN §3).
DIPY tracks in voxel-index space: :func:`track_tensors` rotates the tensors into the
orthonormal frame of the voxel axes (:func:`iqt_pipe.dmri.dti.tensors_world_to_voxel`), where
DIPY's trackers expect directions (a step moves ``direction / voxel_size · step`` voxels), and
maps the points back through the image's affine: every streamline the tracking modules return
or write is in world millimetres (RAS+), the space of ``.tck`` files and of nibabel's
``RASMM``.

Tracking (DIPY's ``generate_tractogram``: compiled, without the Python interpreter in the
loop, seeds spread over ``nthreads`` threads). FA and the ODF come from the tensors'
components (eigenvalues only where a tensor is not positive definite or too flat), the
principal eigenvectors from one eigendecomposition of the brain's tensors. Deterministic
("det"): EuDX's propagator on the principal eigenvectors themselves (each voxel its own exact
direction, not a sphere's vertex): each step follows the trilinearly weighted mean of the
neighbouring voxels' eigenvectors that lie within the angle limit of the previous step, and
stops where those hold less than :data:`DET_MIN_WEIGHT` (a third) of the weight — a turn
sharper than the limit, as MRtrix3's ``Tensor_Det`` stops. (Tracking previously stepped along the closest peak of the
interpolated ODF, which keeps a peak until it falls below half the largest, roughly a third
of the weight; a half stopped streamlines sooner than that did, ~20 % shorter on the phantom,
and then too short for a tensor field in the wrong frame to leave the bundles.
Taking the largest ODF value inside the angle cone instead never stops on the angle, a
tensor's ODF being broad: on real scans such streamlines ran ~1.7× longer than
``Tensor_Det``'s.) Probabilistic ("prob"): each step's direction is drawn, within the angle
limit, from the tensors' diffusion ODF, ``ODF(u) ∝ (uᵀD⁻¹u)^(-3/2)`` (as
``dipy.reconst.dti.TensorFit.odf``), normalised to sum to one per voxel and represented by
real spherical harmonics of order :data:`SH_ORDER` (trilinearly interpolated between voxels),
values below :data:`PMF_THRESHOLD` of the largest left out; it is evaluated on one vertex of
each antipodal pair of :data:`SPHERE` (:func:`tracking_hemisphere`), which draws the same
directions as the whole sphere at half the cost, and its coefficients come from the
quadratic form ``uᵀD⁻¹u`` in closed form, ``D⁻¹`` by the adjugate (:func:`tensor_odf_sh`).
(DIPY evaluates the harmonics at every step, 61 % of the probabilistic tracker's time; the ODF precomputed on the
hemisphere, DIPY's ``sf=``, tracked 1.7× faster on sub-achieva01's native tensors, but DIPY
holds it as float64 for every vertex and voxel: 1.4 GB there, 11 GB on the super-resolved
grid.) Tracking stops where FA falls below ``fa_threshold`` or the brain mask ends; seeds
are drawn uniformly at random in white matter (:func:`seed_mask`: FA of the
positive-semidefinite-projected tensors ≥ ``seed_fa`` in the mask, the same for DIPY and
MRtrix3) at ``seed_density`` seeds per mm³,
so native and super-resolved runs get the same density whatever their voxel size; a seed
starts along the principal eigenvector of the tensor interpolated there. Step size (mm) and
angle limit (degrees per step) default to values scaled to the voxel size: half a voxel, and
``60° × step / voxel`` (30° at the default step, a smallest radius of curvature of about one
voxel). Each streamline's random generator is seeded from its seed point, so the
tractograms do not depend on the number of threads.

Uncertainty. Each streamline gets its length (mm) and the mean and maximum of an
uncertainty map (the super-resolution's total Frobenius sd, mm²/s) over the voxels its
points lie in. With a threshold, action ``"stop"`` ends the streamline where it first enters
a voxel above it (on each side of its seed, as if tracking had stopped there; the segments
between points are checked every quarter voxel, so a step cannot jump a voxel) and ``"drop"``
discards every streamline that enters one; both report how many streamlines they touched.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import nibabel as nb
import numpy as np

from iqt_pipe.dmri.signal import quadratic_form
from iqt_pipe.io import InputError

ALGORITHMS = ("det", "prob")
#: What ``--max-uncertainty`` does to a streamline entering a voxel above the threshold.
UNCERTAINTY_ACTIONS = ("stop", "drop")
#: Seeds per mm³ of white matter.
DEFAULT_SEED_DENSITY = 0.1
DEFAULT_FA_THRESHOLD = 0.15
DEFAULT_SEED_FA = 0.3
DEFAULT_MIN_LENGTH = 10.0
DEFAULT_MAX_LENGTH = 250.0
#: Default angle limit per step: ``ANGLE_PER_VOXEL × step / voxel size`` degrees (30° at half a voxel).
ANGLE_PER_VOXEL = 60.0
#: Order of the real spherical harmonics representing the tensor ODF.
SH_ORDER = 6
SH_BASIS = "descoteaux07"
#: DIPY sphere on which directions are chosen: 181 directions per hemisphere, 10.7° apart (the
#: step's 30° cone holds ~24 of them). DIPY evaluates the ODF at every vertex at every step;
#: repulsion724 (362, 7.8° apart) took 1.7–1.8× as long and changed the track density of
#: sub-achieva01 no more than another random seed does (r 0.926 against 0.922 native, 0.801
#: against 0.794 super-resolved; the same agreement with MRtrix3's ``Tensor_Prob``).
SPHERE = "symmetric362"
#: Smallest eigenvalue of a tensor's ODF, relative to its largest (keeps flat tensors finite).
MIN_EIGENVALUE_RATIO = 0.01
#: Probabilistic tracking draws from the ODF values at least this fraction of the largest.
PMF_THRESHOLD = 0.1
#: Deterministic tracking stops where the neighbouring voxels whose principal eigenvector lies
#: within the angle limit hold less than this share of the trilinear weight (see the module
#: docstring).
DET_MIN_WEIGHT = 1 / 3


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class TrackingParams:
    """Settings of one tracking run. ``step_mm`` and ``max_angle`` left as None are scaled to
    the voxel size by :meth:`resolved`."""

    algorithm: str = "det"
    seed_density: float = DEFAULT_SEED_DENSITY
    step_mm: float | None = None
    max_angle: float | None = None
    fa_threshold: float = DEFAULT_FA_THRESHOLD
    seed_fa: float = DEFAULT_SEED_FA
    min_length: float = DEFAULT_MIN_LENGTH
    max_length: float = DEFAULT_MAX_LENGTH
    random_seed: int = 0

    def check(self) -> TrackingParams:
        """Raise :class:`InputError` (one line) for an unusable setting; returns self."""
        if self.algorithm not in ALGORITHMS:
            raise InputError(f"tracking algorithm {self.algorithm!r} unknown; choose one of {', '.join(ALGORITHMS)}")
        positive = {
            "seed density": self.seed_density,
            "minimum length": self.min_length,
            "maximum length": self.max_length,
        }
        if self.step_mm is not None:
            positive["step size"] = self.step_mm
        for what, value in positive.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InputError(f"the tracking {what} must be a positive number, got {value!r}")
        if self.max_angle is not None and not 0 < self.max_angle <= 90:
            raise InputError(f"the tracking angle limit must lie in (0, 90] degrees, got {self.max_angle!r}")
        for what, value in (("FA threshold", self.fa_threshold), ("seed FA", self.seed_fa)):
            if not 0 <= value < 1:
                raise InputError(f"the {what} must lie in [0, 1), got {value!r}")
        if self.min_length >= self.max_length:
            raise InputError(
                f"the minimum streamline length ({self.min_length:g} mm) must be below the "
                f"maximum ({self.max_length:g} mm)"
            )
        return self

    def resolved(self, voxel_size: float) -> TrackingParams:
        """The settings with step and angle filled in for this voxel size (mm)."""
        self.check()
        step = self.step_mm if self.step_mm is not None else 0.5 * float(voxel_size)
        angle = self.max_angle if self.max_angle is not None else min(90.0, ANGLE_PER_VOXEL * step / float(voxel_size))
        return replace(self, step_mm=float(step), max_angle=float(angle))


def check_uncertainty_limit(max_uncertainty: float | None, action: str) -> None:
    if action not in UNCERTAINTY_ACTIONS:
        raise InputError(f"uncertainty action {action!r} unknown; choose stop or drop")
    if max_uncertainty is not None and not (math.isfinite(max_uncertainty) and max_uncertainty > 0):
        raise InputError(
            f"--max-uncertainty must be a positive number in mm^2/s (e.g. 1.5e-4), got {max_uncertainty!r}"
        )


# --------------------------------------------------------------------------- streamlines


@dataclass
class Tracks:
    """Streamlines in world millimetres (RAS+), with the index of each one's seed point
    (-1 when unknown) and the number of seeds tracked."""

    streamlines: list[np.ndarray]
    seed_index: np.ndarray
    n_seeds: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.streamlines)


def streamline_lengths(streamlines: Sequence[np.ndarray], points: np.ndarray | None = None) -> np.ndarray:
    """Length (mm) of each streamline: the steps of all of them at once (in the points' own
    precision), summed per streamline as differences of one float64 running sum. ``points``:
    the streamlines' points already concatenated, ``(N, 3)``, when the caller has them."""
    counts = np.fromiter((len(s) for s in streamlines), np.int64, len(streamlines))
    if counts.sum() < 2:
        return np.zeros(len(counts))
    if points is None:
        points = np.concatenate([np.reshape(s, (-1, 3)) for s in streamlines])
    d = np.diff(points, axis=0)
    steps = np.sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2])  # np.linalg.norm's sum, 5× faster
    total = np.r_[0.0, np.cumsum(steps, dtype=np.float64)]  # total[k]: the first k steps
    ends = np.cumsum(counts)
    return np.where(counts > 1, total[np.maximum(ends - 1, 0)] - total[np.maximum(ends - counts, 0)], 0.0)


def voxel_size(affine: np.ndarray) -> float:
    """The smallest voxel size (mm) of an image with this affine."""
    return float(np.min(nb.affines.voxel_sizes(affine)))


def voxel_indices(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Nearest voxel index of world points ``(N, 3)`` (computed in the points' precision, at
    least float32; 32-bit integers, 64-bit ones beyond their range; −1 for a non-finite point)."""
    points = np.asarray(points)
    points = points.astype(np.result_type(points, np.float32), copy=False).reshape(-1, 3)
    to_voxel = np.linalg.inv(np.asarray(affine, dtype=np.float64)).astype(points.dtype)
    ijk = np.rint(points @ to_voxel[:3, :3].T + to_voxel[:3, 3])
    if not np.isfinite(ijk).all():  # a non-finite point lies on no grid
        ijk = np.nan_to_num(ijk, nan=-1, posinf=-1, neginf=-1)
    fits = ijk.size == 0 or (np.abs(ijk).max() < 2**31)
    return ijk.astype(np.int32 if fits else np.int64)


def sample_nearest(volume: np.ndarray, affine: np.ndarray, points: np.ndarray, outside: float = np.nan) -> np.ndarray:
    """Value of the voxel holding each world point (``outside`` beyond the grid) of a 3-D
    ``volume``: one flat gather (indexing with three index arrays is several times slower), in
    32-bit integers where the grid allows (the 10 M points of a super-resolved tractogram:
    1.0–1.9 → 0.4–0.6 s)."""
    shape = volume.shape[:3]
    index_type = np.int32 if np.prod(shape, dtype=np.int64) < 2**31 else np.int64
    flat, inside = _flat_voxel_index(voxel_indices(points, affine), shape, index_type)
    out = np.take(np.asarray(volume).reshape(-1), flat).astype(np.float64)
    out[~inside] = outside
    return out


def _flat_voxel_index(ijk: np.ndarray, shape: Sequence[int], dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Row-major flat index of voxel indices ``(N, 3)`` (integers, or rounded floats) on a grid of
    ``shape``, and whether each lies on the grid (0 where it does not). Column by column: 4× sooner
    than by rows."""
    inside = np.ones(len(ijk), dtype=bool)
    flat = np.zeros(len(ijk), dtype=dtype)
    for axis, size in enumerate(shape[:3]):
        column = ijk[:, axis]
        inside &= (column >= 0) & (column < size)
        flat *= size
        flat += column.astype(dtype, copy=False)
    flat[~inside] = 0
    return flat, inside


def segment_steps(n: np.ndarray, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """For segments cut into ``n[i]`` equal steps: the segment each step starts on and how far
    along it, ``k / n[i]`` for k = 0 … n[i] − 1 (all segments at once, in ``dtype``)."""
    n = np.asarray(n, dtype=np.int64)
    seg = np.repeat(np.arange(len(n)), n)
    t = np.arange(n.sum(), dtype=dtype)
    t -= np.repeat((np.cumsum(n) - n).astype(dtype), n)
    t /= np.repeat(n.astype(dtype), n)
    return seg, t


def densify(streamline: np.ndarray, max_step: float, return_index: bool = False):
    """Points along the polyline no further than ``max_step`` mm apart (the original ones kept).

    With ``return_index``, also the index of each original point in the result (segment ``i``
    is ``out[index[i]:index[i + 1] + 1]``)."""
    s = np.asarray(streamline, dtype=np.float64)
    if len(s) < 2:
        return (s, np.arange(len(s))) if return_index else s
    d = np.diff(s, axis=0)
    n = np.maximum(1, np.ceil(np.linalg.norm(d, axis=1) / max_step).astype(int))
    seg, t = segment_steps(n)
    out = np.vstack([s[seg] + d[seg] * t[:, None], s[-1:]])
    return (out, np.r_[0, np.cumsum(n)]) if return_index else out


def track_density(streamlines: Sequence[np.ndarray], affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Track-density image: how many streamlines pass through each voxel of the grid
    (each streamline counts once per voxel: :func:`densify` in voxel coordinates, a quarter
    voxel, then the nearest voxel of every point; all streamlines at once, float32)."""
    shape = tuple(int(s) for s in shape[:3])
    n_voxels = int(np.prod(shape))
    visits = [np.zeros(0, dtype=np.int64)]  # per chunk, the voxel of each (streamline, voxel) pair
    to_voxel = np.linalg.inv(np.asarray(affine, dtype=np.float64)).astype(np.float32)
    for start in range(0, len(streamlines), 5000):  # bounded memory on whole-brain tractograms
        chunk = [np.asarray(s, np.float32).reshape(-1, 3) for s in streamlines[start : start + 5000]]
        lengths = np.array([len(s) for s in chunk], dtype=np.int64)
        if not lengths.sum():
            continue
        pts = np.concatenate(chunk) @ to_voxel[:3, :3].T + to_voxel[:3, 3]
        owner = np.repeat(np.arange(len(lengths)), lengths)
        d = np.diff(pts, axis=0)
        within = owner[1:] == owner[:-1]  # segments inside one streamline
        n = np.where(within, np.maximum(1, np.ceil(np.sqrt(np.einsum("ij,ij->i", d, d)) / 0.25)), 0).astype(np.int64)
        seg, t = segment_steps(n, np.float32)
        last = np.cumsum(lengths)[lengths > 0] - 1  # each streamline's last point closes it
        samples = pts[seg]
        samples += d[seg] * t[:, None]
        flat, inside = _flat_voxel_index(np.rint(np.concatenate([samples, pts[last]])), shape)
        pairs = (np.concatenate([owner[seg], owner[last]]) * n_voxels + flat)[inside]
        # One count per streamline and voxel: consecutive repeats first (most of them), then
        # the voxels a streamline comes back to.
        visits.append(_runs_collapsed(np.sort(_runs_collapsed(pairs))) % n_voxels)
    return np.bincount(np.concatenate(visits), minlength=n_voxels).reshape(shape).astype(np.int32)


def _runs_collapsed(a: np.ndarray) -> np.ndarray:
    """A 1-D array with each run of equal neighbours kept once: of a sorted array, its distinct
    values (as ``np.unique``, whose hash-based path in NumPy 2.4 took 4.0 s against a sort's
    0.08 s for 4 M int64 keys)."""
    return a[np.r_[True, a[1:] != a[:-1]]] if a.size else a


# --------------------------------------------------------------------------- seeds and tracking


def fa_map(tensors: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """FA (float64) of the positive-semidefinite projection of ``(..., 6)`` tensors (any frame),
    zero outside ``mask``: the map tracking stops on and seeds are drawn from."""
    mask = np.asarray(mask, bool)
    out = np.zeros(mask.shape, dtype=np.float64)
    out[mask] = _psd_fa_of(np.nan_to_num(np.asarray(tensors)[mask].astype(np.float64)))
    return out


def _psd_fa_of(d: np.ndarray) -> np.ndarray:
    """FA of the positive-semidefinite projection of ``(P, 6)`` float64 tensors: from the
    components where the tensor is positive definite (the Frobenius norms of the tensor and of
    its deviatoric part are those of its eigenvalues), from the eigenvalues, raised to 0, of
    the few others (:func:`~iqt_pipe.dmri.dti.not_positive_definite`): 8× sooner than
    decomposing them all."""
    from iqt_pipe.dmri.dti import not_positive_definite, to_matrix

    md = (d[:, 0] + d[:, 3] + d[:, 5]) / 3
    off = d[:, 1] ** 2 + d[:, 2] ** 2 + d[:, 4] ** 2
    deviatoric = (d[:, 0] - md) ** 2 + (d[:, 3] - md) ** 2 + (d[:, 5] - md) ** 2 + 2 * off
    norm = d[:, 0] ** 2 + d[:, 3] ** 2 + d[:, 5] ** 2 + 2 * off
    fa = np.sqrt(1.5 * deviatoric / np.where(norm > 0, norm, 1.0)).clip(0.0, 1.0)
    other = not_positive_definite(d)
    fa[other] = _psd_fa(np.linalg.eigvalsh(to_matrix(d[other])))
    return fa


def _eigh(tensors: np.ndarray, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvector columns of ``(P, 6)`` tensors (NaN read as 0),
    float64; on ``threads`` threads, in equal parts (NumPy's ``eigh`` releases the interpreter;
    each tensor's result does not depend on the parts)."""
    from concurrent.futures import ThreadPoolExecutor

    from iqt_pipe.dmri.dti import to_matrix

    matrices = to_matrix(np.nan_to_num(np.asarray(tensors, dtype=np.float64)))
    parts = np.array_split(matrices, max(1, min(int(threads), len(matrices))))
    if len(parts) == 1:
        return np.linalg.eigh(matrices)
    with ThreadPoolExecutor(len(parts)) as pool:
        done = list(pool.map(np.linalg.eigh, parts))
    return np.concatenate([w for w, _ in done]), np.concatenate([v for _, v in done])


def _psd_fa(eigenvalues: np.ndarray) -> np.ndarray:
    """FA of the positive-semidefinite projection (negative eigenvalues raised to 0)."""
    from iqt_pipe.dmri.dti import fractional_anisotropy

    return fractional_anisotropy(np.maximum(eigenvalues, 0.0))


def seed_mask(
    tensors: np.ndarray,
    mask: np.ndarray,
    seed_fa: float = DEFAULT_SEED_FA,
    source: str = "the tensor image",
    fa: np.ndarray | None = None,
) -> np.ndarray:
    """Where seeds go, for DIPY and MRtrix3 alike: brain-mask voxels whose FA (:func:`fa_map`;
    pass ``fa`` when it is already computed) is at least ``seed_fa``. Raises :class:`InputError`
    (naming ``source``) when there is none."""
    mask = np.asarray(mask, bool)
    fa = fa_map(tensors, mask) if fa is None else np.nan_to_num(fa)
    seeds = mask & (fa >= seed_fa)
    if not seeds.any():
        raise InputError(
            f"{source}: no voxel with FA ≥ {seed_fa:g} in the brain mask to seed from; check the tensors and the mask"
        )
    return seeds


def seed_count(seed_mask: np.ndarray, affine: np.ndarray, density: float) -> int:
    """Seeds for ``density`` per mm³ over the mask's volume (at least one when it is not empty)."""
    volume = float(np.count_nonzero(seed_mask)) * abs(float(np.linalg.det(np.asarray(affine)[:3, :3])))
    return 0 if volume == 0 else max(1, int(round(density * volume)))


def random_seeds(seed_mask: np.ndarray, affine: np.ndarray, count: int, random_seed: int = 0) -> np.ndarray:
    """``count`` world points drawn uniformly in the mask's voxels (deterministic for a seed)."""
    rng = np.random.default_rng(random_seed)
    vox = np.argwhere(seed_mask)
    if count == 0 or len(vox) == 0:
        return np.zeros((0, 3))
    ijk = vox[rng.integers(0, len(vox), size=count)] + rng.uniform(-0.5, 0.5, size=(count, 3))
    return nb.affines.apply_affine(affine, ijk)


def _quadratic_form_basis(vertices: np.ndarray) -> np.ndarray:
    """``(6, V)``: ``d6 @ basis`` is ``uᵀDu`` at each unit vertex ``u`` for BEP016-ordered ``d6``
    (the rows of :func:`iqt_pipe.dmri.signal.quadratic_form` as columns, contiguous)."""
    return np.ascontiguousarray(quadratic_form(vertices).T)


def _clamped_inverse(d: np.ndarray) -> np.ndarray:
    """``D⁻¹`` (BEP016 components) of ``(P, 6)`` float64 tensors whose eigenvalues are raised to
    at least :data:`MIN_EIGENVALUE_RATIO` × the largest (the identity where none is positive), as
    :func:`tensor_odf` says. By the adjugate where no eigenvalue needs raising, which holds when
    ``D − ratio · trace(D) · I`` is positive definite (checked without decomposing); by the
    eigendecomposition of the few others."""
    from iqt_pipe.dmri.dti import IDENTITY6, from_matrix, not_positive_definite, to_matrix

    d11, d12, d13, d22, d23, d33 = (d[:, k] for k in range(6))
    adjugate = np.stack(
        [d22 * d33 - d23**2, d13 * d23 - d12 * d33, d12 * d23 - d13 * d22, d11 * d33 - d13**2, d12 * d13 - d11 * d23]
        + [d11 * d22 - d12**2],
        axis=-1,
    )
    determinant = d11 * adjugate[:, 0] + d12 * adjugate[:, 1] + d13 * adjugate[:, 2]
    trace = d11 + d22 + d33
    other = not_positive_definite(d - MIN_EIGENVALUE_RATIO * trace[:, None] * IDENTITY6)
    inverse = adjugate / np.where(other, 1.0, determinant)[:, None]
    if other.any():
        w, v = np.linalg.eigh(to_matrix(d[other]))
        largest = w[:, -1:]
        w = np.where(largest > 0, np.maximum(w, MIN_EIGENVALUE_RATIO * largest), 1.0)
        inverse[other] = from_matrix(np.einsum("pij,pj,pkj->pik", v, 1.0 / w, v))
    return inverse


def _odf_from_inverse(inverse: np.ndarray, basis: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Unnormalised tensor ODF ``(uᵀD⁻¹u)^(-3/2)`` on the vertices of a :func:`_quadratic_form_basis`,
    from :func:`_clamped_inverse`'s ``D⁻¹``; in ``dtype``."""
    odf = inverse.astype(dtype) @ basis.astype(dtype)
    odf *= np.sqrt(odf)
    return np.reciprocal(odf, out=odf)  # q^(-3/2), several times faster than the power


def tensor_odf(tensors: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Diffusion ODF ``(uᵀD⁻¹u)^(-3/2) / (4π sqrt(det D))`` of ``(P, 6)`` tensors on unit
    ``vertices`` (same frame), normalised to sum to one per tensor; ``(P, V)``. Eigenvalues
    below :data:`MIN_EIGENVALUE_RATIO` × the largest are raised to it; a tensor without a
    positive eigenvalue gets the uniform ODF."""
    # Eigenvalues at least MIN_EIGENVALUE_RATIO × the largest, so a flat or non-positive one gives
    # a broad but finite ODF whatever the units; no positive one: isotropic.
    inverse = _clamped_inverse(np.nan_to_num(np.asarray(tensors, dtype=np.float64)))
    odf = _odf_from_inverse(inverse, _quadratic_form_basis(vertices))
    return odf / odf.sum(axis=-1, keepdims=True)


def tensor_odf_sh(tensors: np.ndarray, chunk: int = 20000) -> np.ndarray:
    """Real SH coefficients (order :data:`SH_ORDER`, basis :data:`SH_BASIS`) of the normalised
    ODF of ``(P, 6)`` float64 tensors on :data:`SPHERE` (:func:`tensor_odf` projected by least
    squares); ``(P, n_coefficients)``.

    The ODF and the even-order harmonics are antipodally symmetric, so the fit runs on one
    vertex of each antipodal pair (the :func:`tracking_hemisphere`): the same coefficients as
    on the whole sphere at half the cost. The ODF is evaluated and projected in float32 (twice
    as fast; coefficients within a few 1e-6 of float64's, relative to the largest), in chunks of
    ``chunk`` tensors that bound the memory."""
    from dipy.reconst.shm import sh_to_sf_matrix

    hemisphere = tracking_hemisphere()
    _, inverse = sh_to_sf_matrix(hemisphere, sh_order_max=SH_ORDER, basis_type=SH_BASIS, return_inv=True, legacy=False)
    basis = _quadratic_form_basis(hemisphere.vertices)
    inverse = inverse.astype(np.float32)
    out = np.empty((len(tensors), inverse.shape[1]), dtype=np.float64)
    for start in range(0, len(tensors), chunk):
        odf = _odf_from_inverse(_clamped_inverse(tensors[start : start + chunk]), basis, np.float32)
        # normalised over the whole sphere: each hemisphere value stands for two vertices
        odf /= 2 * odf.sum(axis=-1, keepdims=True)
        out[start : start + chunk] = odf @ inverse
    return out


def tracking_hemisphere():
    """One vertex of each antipodal pair of :data:`SPHERE`: DIPY's direction getters treat ``u``
    and ``−u`` alike (a step follows the previous direction's sign), so drawing from an
    antipodally symmetric ODF on it is drawing from the whole sphere."""
    from dipy.core.sphere import HemiSphere
    from dipy.data import get_sphere

    return HemiSphere.from_sphere(get_sphere(name=SPHERE))


def bounding_box(mask: np.ndarray, affine: np.ndarray, margin: int = 1) -> tuple[tuple[slice, ...], np.ndarray]:
    """The slices of the smallest box holding ``mask`` (with ``margin`` voxels around it, within
    the grid) and the affine of that box: tracking, seeds and files on it are those of the whole
    grid, in less memory."""
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, mask.shape)
    offset = np.eye(4)
    offset[:3, 3] = lo
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)), np.asarray(affine, dtype=np.float64) @ offset


def _check_no_shear(affine: np.ndarray, source: str) -> None:
    """DIPY tracks on a regular grid: the voxel axes must be orthogonal (LocalTracking's check)."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    if not np.allclose(np.triu(linear.T @ linear, 1), 0.0, atol=1e-5):
        raise InputError(f"{source}: the affine has shear; resample to an orthogonal grid")


def _principal_peaks(eigenvalues: np.ndarray, eigenvectors: np.ndarray, mask: np.ndarray):
    """The principal eigenvectors as DIPY peaks: each voxel of ``mask`` with a positive largest
    eigenvalue is its own vertex (``odf_vertices``, exact directions, not a sphere's), and every
    other voxel of the grid points at its nearest such voxel's, so interpolation near the mask's
    edge uses the directions inside it (the edge itself stops tracking through FA, as before).
    Returns a ``PeaksAndMetrics``-like namespace, or None when no voxel has a direction."""
    from types import SimpleNamespace

    from scipy import ndimage

    valid = eigenvalues[:, -1] > 0
    if not valid.any():
        return None
    row = np.full(mask.shape, -1, dtype=np.int64)
    row[tuple(axis[valid] for axis in np.nonzero(mask))] = np.arange(int(valid.sum()))
    nearest = ndimage.distance_transform_edt(row < 0, return_distances=False, return_indices=True)
    indices = row[tuple(nearest)].astype(np.int32)[..., None]
    return SimpleNamespace(
        peak_indices=indices,
        peak_values=np.ones(indices.shape, dtype=np.float64),
        odf_vertices=np.ascontiguousarray(eigenvectors[valid, :, -1]),
    )


def _seed_directions(voxel_tensors: np.ndarray, seeds_voxel: np.ndarray) -> np.ndarray:
    """Principal eigenvector of the trilinearly interpolated tensor at each seed (voxel
    coordinates), zero where it has no positive eigenvalue (DIPY then skips the seed)."""
    from scipy import ndimage

    coords = np.asarray(seeds_voxel, dtype=np.float64).T
    interpolated = np.stack(
        [ndimage.map_coordinates(voxel_tensors[..., c], coords, order=1, mode="nearest") for c in range(6)], axis=-1
    )
    w, v = _eigh(interpolated)
    return np.ascontiguousarray(np.where(w[:, -1:] > 0, v[:, :, -1], 0.0))


def track_tensors(
    tensors_world: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    params: TrackingParams | None = None,
    seeds: np.ndarray | None = None,
    source: str = "the tensor image",
    nthreads: int = 1,
) -> Tracks:
    """DIPY tracking on a world-frame tensor image (see the module docstring): deterministic
    along the principal eigenvector, probabilistic from the tensor ODF's SH coefficients,
    both through DIPY's multi-threaded ``generate_tractogram`` on ``nthreads`` threads (0: all
    cores; the streamlines do not depend on it).

    ``seeds`` (world mm, ``(N, 3)``) replaces the random white-matter seeds; ``source`` names
    the image in error messages (one line, :class:`InputError`). Returns
    streamlines in world mm within the length limits, with their seed indices. The
    volume is cropped to the mask's bounding box first (the ODF's spherical harmonics are the
    large array); this changes nothing but the memory used.
    """
    from dipy.tracking.stopping_criterion import ThresholdStoppingCriterion
    from dipy.tracking.tracker import generic_tracking
    from dipy.tracking.tracker_parameters import generate_tracking_parameters

    from iqt_pipe.dmri.dti import tensors_world_to_voxel

    mask = np.asarray(mask, bool)
    params = (params or TrackingParams()).resolved(voxel_size(affine))
    if not mask.any():
        raise InputError(f"{source}: the brain mask is empty; nothing to track")
    _check_no_shear(affine, source)
    box, affine_box = bounding_box(mask, affine)
    mask = mask[box]
    voxel_tensors = np.zeros(mask.shape + (6,), dtype=np.float64)
    voxel_tensors[mask] = tensors_world_to_voxel(np.nan_to_num(np.asarray(tensors_world)[box][mask]), affine)
    fa = np.zeros(mask.shape, dtype=np.float64)
    fa[mask] = _psd_fa_of(voxel_tensors[mask])  # = fa_map: FA is the same in any frame

    if seeds is None:
        seeding = seed_mask(voxel_tensors, mask, params.seed_fa, source, fa=fa)
        seeds = random_seeds(
            seeding, affine_box, seed_count(seeding, affine_box, params.seed_density), params.random_seed
        )
    seeds = np.ascontiguousarray(np.asarray(seeds, dtype=np.float64).reshape(-1, 3))
    info = {"step_mm": params.step_mm, "max_angle_deg": params.max_angle, "voxel_size_mm": voxel_size(affine)}
    if not len(seeds):
        return Tracks([], np.zeros(0, dtype=int), 0, info)
    seeds_voxel = nb.affines.apply_affine(np.linalg.inv(affine_box), seeds)
    directions = _seed_directions(voxel_tensors, seeds_voxel)

    stopping = ThresholdStoppingCriterion(fa, params.fa_threshold)
    # DIPY keeps streamlines of at most int(max_len / step) points: room for max_length and more,
    # so the length limits below decide, as before.
    max_points = math.ceil(params.max_length / params.step_mm) + 3
    limits = dict(
        min_len=0,
        max_len=int(math.ceil(max_points * params.step_mm)),
        step_size=params.step_mm,
        voxel_size=nb.affines.voxel_sizes(affine_box).astype(np.float64),
        max_angle=params.max_angle,
        return_all=True,
        # DIPY seeds each streamline's generator from its seed point times this (> 0:
        # reproducible whatever the threads; 0 would mean the clock)
        random_seed=params.random_seed + 1,
    )
    field = _direction_field(params, voxel_tensors[mask], mask, int(nthreads) or os.cpu_count() or 1)
    del voxel_tensors
    if field is None:
        return Tracks([], np.zeros(0, dtype=int), len(seeds), info)
    kind, settings_kw, field_kw = field
    settings = generate_tracking_parameters(kind, **limits, **settings_kw)
    tracker = generic_tracking(
        seeds, directions, stopping, settings, affine=affine_box, nbr_threads=int(nthreads), save_seeds=True, **field_kw
    )
    streamlines, seed_index = _within_length_limits(tracker, params)
    return Tracks(streamlines, seed_index, len(seeds), info)


def _direction_field(
    params: TrackingParams, tensors: np.ndarray, mask: np.ndarray, threads: int = 1
) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """DIPY's propagator, its settings beside the step and length limits, and what it tracks on,
    from the voxel-frame tensors of ``mask``: the principal eigenvectors as peaks ("det"; None
    where no voxel has one; the eigendecomposition on ``threads`` threads) or the tensor ODF's
    SH coefficients ("prob")."""
    if params.algorithm == "det":
        peaks = _principal_peaks(*_eigh(tensors, threads), mask)
        if peaks is None:
            return None
        # EuDX's propagator on them: the principal eigenvectors of the 8 voxels around the point
        # that lie within the angle limit of the previous step, signed along it and averaged with
        # their trilinear weights; it stops where they hold less than DET_MIN_WEIGHT of the weight.
        settings = {
            "angle_threshold": params.max_angle,
            "peak_values_threshold": 0.0,
            "min_total_weight": DET_MIN_WEIGHT,
        }
        return "eudx", settings, {"pam": peaks}
    sh = np.zeros(mask.shape + ((SH_ORDER + 1) * (SH_ORDER + 2) // 2,), dtype=np.float64)
    sh.reshape(-1, sh.shape[-1])[np.flatnonzero(mask)] = tensor_odf_sh(tensors)  # 20× sooner than sh[mask] = …
    field = {"sh": sh, "sphere": tracking_hemisphere(), "basis_type": SH_BASIS, "legacy": False}
    return "prob", {"pmf_threshold": PMF_THRESHOLD}, field


def _within_length_limits(tracker, params: TrackingParams) -> tuple[list[np.ndarray], np.ndarray]:
    """The streamlines within the length limits, with the index of the point nearest their seed
    (lengths and distances of all streamlines at once: :func:`streamline_lengths`, then one pass
    over all points; a loop over the streamlines took 3–4 s of a 16 s tracking run)."""
    lines, seeds = [], []
    for line, seed in tracker:
        lines.append(np.asarray(line, dtype=np.float32))
        seeds.append(seed)
    points = np.fromiter((len(line) for line in lines), np.int64, len(lines))
    lengths = streamline_lengths(lines)
    keep = np.flatnonzero((points >= 2) & (params.min_length <= lengths) & (lengths <= params.max_length))
    if not len(keep):
        return [], np.zeros(0, dtype=int)
    lines, points = [lines[i] for i in keep], points[keep]
    starts = np.cumsum(points) - points
    owner = np.repeat(np.arange(len(keep)), points)
    offset = np.concatenate(lines).astype(np.float64) - np.asarray(seeds, dtype=np.float64)[keep][owner]
    distance = np.einsum("ij,ij->i", offset, offset)
    # first point at each streamline's smallest distance (as argmin)
    nearest = np.flatnonzero(distance == np.minimum.reduceat(distance, starts)[owner])
    first = nearest[np.r_[True, owner[nearest][1:] != owner[nearest][:-1]]]
    return lines, first - starts


# --------------------------------------------------------------------------- uncertainty


def limit_uncertainty(
    tracks: Tracks,
    uncertainty: np.ndarray,
    affine: np.ndarray,
    max_uncertainty: float,
    action: str = "stop",
    min_length: float = 0.0,
) -> tuple[Tracks, dict[str, int]]:
    """Apply an uncertainty threshold (see the module docstring).

    A point is above the threshold when its voxel is (NaN counts as above); a segment between
    two points when any voxel it crosses is, checked every quarter voxel of the map's grid.
    ``"stop"`` keeps, of each streamline, the run of points below the threshold, joined by
    segments below it, that holds its seed (the whole streamline is dropped when the seed's
    voxel is above it, or when the piece left is shorter than ``min_length``); without a known
    seed the longest such run is kept. ``"drop"`` removes every streamline that enters a voxel
    above the threshold. Returns the tracks left and ``{"n_stopped": …, "n_dropped": …}``.
    """
    check_uncertainty_limit(max_uncertainty, action)
    step = 0.25 * voxel_size(affine)
    kept, seeds, n_stopped, n_dropped = [], [], 0, 0
    for line, seed in zip(tracks.streamlines, tracks.seed_index):
        dense, index = densify(line, step, return_index=True)
        high_dense = ~(sample_nearest(uncertainty, affine, dense, outside=0.0) <= max_uncertainty)
        if not high_dense.any():
            kept.append(line)
            seeds.append(seed)
            continue
        if action == "drop":
            n_dropped += 1
            continue
        high = high_dense[index]  # at the points
        # a segment is high when a sample inside it or its end point is (reduceat: any over [index[i], index[i+1]))
        high_segment = np.maximum.reduceat(high_dense, index[:-1]) | high[1:] if len(line) > 1 else np.zeros(0, bool)
        # Runs of consecutive low points joined by low segments: [start, stop) of each.
        ok = ~high
        link = ok[:-1] & ok[1:] & ~high_segment
        starts = np.flatnonzero(ok & ~np.r_[False, link])
        stops = np.flatnonzero(ok & ~np.r_[link, False]) + 1
        runs = list(zip(starts, stops))
        if 0 <= seed < len(line):
            run = next(((a, b) for a, b in runs if a <= seed < b), None)
        else:
            run = max(runs, key=lambda ab: ab[1] - ab[0], default=None)
        piece = line[run[0] : run[1]] if run is not None else line[:0]
        if len(piece) < 2 or streamline_lengths([piece])[0] < min_length:
            n_dropped += 1
            continue
        n_stopped += 1
        kept.append(piece)
        seeds.append(seed - run[0] if 0 <= seed < len(line) else -1)
    out = Tracks(kept, np.asarray(seeds, dtype=int), tracks.n_seeds, dict(tracks.info))
    return out, {"n_stopped": n_stopped, "n_dropped": n_dropped}


def streamline_table(
    streamlines: Sequence[np.ndarray], uncertainty: np.ndarray | None = None, affine: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Per streamline: length (mm), number of points, and the mean and maximum uncertainty
    over the voxels of its points (NaN without an uncertainty map)."""
    n = len(streamlines)
    counts = np.array([len(s) for s in streamlines], dtype=int)
    # Every point at once (lengths, then the uncertainty sampled and reduced per streamline)
    points_all = np.concatenate([np.asarray(s).reshape(-1, 3) for s in streamlines]) if counts.sum() else None
    table = {
        "streamline": np.arange(n),
        "length_mm": streamline_lengths(streamlines, points_all),
        "n_points": counts,
        "mean_uncertainty": np.full(n, np.nan),
        "max_uncertainty": np.full(n, np.nan),
    }
    if uncertainty is not None and counts.sum():
        values = sample_nearest(uncertainty, affine, points_all)  # NaN: outside the map
        has = counts > 0
        starts = (np.cumsum(counts) - counts)[has]
        finite = np.isfinite(values)
        count = np.add.reduceat(finite.astype(np.int64), starts)
        total = np.add.reduceat(np.where(finite, values, 0.0), starts)
        peak = np.fmax.reduceat(values, starts)
        seen = count > 0
        table["mean_uncertainty"][np.flatnonzero(has)[seen]] = total[seen] / count[seen]
        table["max_uncertainty"][np.flatnonzero(has)[seen]] = peak[seen]
    return table
