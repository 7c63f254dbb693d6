"""Streamline tractography on tensor images, uncertainty along every streamline, and the
comparison of tractograms (HR reference vs native vs super-resolved).

Plain functions, no Nipype (the interfaces in :mod:`iqt_pipe.interfaces.tractography` call them).

Frames and coordinates. Tensor files are in world (scanner RAS) coordinates (DESIGN §3).
DIPY tracks in voxel-index space: :func:`track_tensors` rotates the tensors into the
orthonormal frame of the voxel axes (:func:`iqt_pipe.dmri.dti.tensors_world_to_voxel`), where
DIPY's trackers expect directions (a step moves ``direction / voxel_size · step`` voxels), and
maps the points back through the image's affine: every streamline this module returns or
writes is in world millimetres (RAS+), the space of ``.tck`` files and of nibabel's
``RASMM``. MRtrix3 reads gradient directions in world coordinates too (:func:`write_mrtrix_grad`).

Tracking (DIPY's ``generate_tractogram``: compiled, without the Python interpreter in the
loop, seeds spread over ``nthreads`` threads). One eigendecomposition of the brain's tensors
gives FA, the principal eigenvectors and the ODF. Deterministic ("det"): EuDX's propagator on
the principal eigenvectors themselves (each voxel its own exact direction, not a sphere's
vertex): each step follows the trilinearly weighted mean of the neighbouring voxels'
eigenvectors that lie within the angle limit of the previous step, and stops where those hold
less than :data:`DET_MIN_WEIGHT` (a third) of the weight — a turn sharper than the limit, as
MRtrix3's ``Tensor_Det`` stops. (Tracking previously stepped along the closest peak of the
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
quadratic form ``uᵀD⁻¹u`` in closed form (:func:`tensor_odf_sh`). Tracking stops where FA
falls below ``fa_threshold`` or the brain mask ends; seeds are drawn uniformly at random in
white matter (:func:`seed_mask`: FA of the positive-semidefinite-projected tensors ≥
``seed_fa`` in the mask, the same for DIPY and MRtrix3) at ``seed_density`` seeds per mm³,
so native and super-resolved runs get the same density whatever their voxel size; a seed
starts along the principal eigenvector of the tensor interpolated there. Step size (mm) and
angle limit (degrees per step) default to values scaled to the voxel size: half a voxel, and
``60° × step / voxel`` (30° at the default step, a smallest radius of curvature of about one
voxel). Each streamline's random generator is seeded from its seed point, so the
tractograms do not depend on the number of threads.

MRtrix3 (:func:`prepare_mrtrix_inputs`). ``tckgen``'s ``Tensor_Det``/``Tensor_Prob`` fit
tensors to a DWI series themselves, so one is synthesised from the tensors and the fitted S0
(trilinearly resampled to the tensor grid, so it stays positive) with the subject's gradient
table. ``Tensor_Prob`` draws its directions by a wild bootstrap of the fit's residuals, which a
noise-free series does not have: for it Rician noise is added (fixed seed) at the run's noise
level, σ measured from the repeated b=0 volumes of the native DWI (:func:`b0_noise_sigma`), or,
without repeats, σ = median S0 / :data:`DEFAULT_SYNTH_SNR` (30). The sidecars record σ and
where it came from.

Uncertainty. Each streamline gets its length (mm) and the mean and maximum of an
uncertainty map (the super-resolution's total Frobenius sd, mm²/s) over the voxels its
points lie in. With a threshold, action ``"stop"`` ends the streamline where it first enters
a voxel above it (on each side of its seed, as if tracking had stopped there; the segments
between points are checked every quarter voxel, so a step cannot jump a voxel) and ``"drop"``
discards every streamline that enters one; both report how many streamlines they touched.

Comparison of tractograms (an HR reference against native-LR and super-resolved ones) lives
in :mod:`iqt_pipe.tracking.compare`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import nibabel as nb
import numpy as np

from iqt_pipe.io import InputError, atomic_open, atomic_path, load_nifti, load_tensor_image, save_nifti, write_tsv

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
#: DIPY sphere on which directions are chosen.
SPHERE = "repulsion724"
#: SNR of the synthesised b=0 that sets the noise added for ``Tensor_Prob`` when the run's own
#: noise level cannot be measured (fewer than two b=0 volumes).
DEFAULT_SYNTH_SNR = 30.0
#: Smallest eigenvalue of a tensor's ODF, relative to its largest (keeps flat tensors finite).
MIN_EIGENVALUE_RATIO = 0.01
#: Probabilistic tracking draws from the ODF values at least this fraction of the largest.
PMF_THRESHOLD = 0.1
#: Deterministic tracking stops where the neighbouring voxels whose principal eigenvector lies
#: within the angle limit hold less than this share of the trilinear weight (see the module
#: docstring).
DET_MIN_WEIGHT = 1 / 3
#: Float format of the tractography TSVs.
TSV_FLOAT = ".6g"

#: Columns of the per-streamline TSV written beside every ``.tck``.
STREAMLINE_COLUMNS = {
    "streamline": "index of the streamline in the tractogram (0-based)",
    "length_mm": "length along the streamline (mm)",
    "n_points": "number of points",
    "mean_uncertainty": "mean over the streamline's points of the total Frobenius sd of the super-resolved "
                        "tensor in the voxel holding the point (mm^2/s); n/a without an uncertainty map",
    "max_uncertainty": "maximum of the same (mm^2/s); n/a without an uncertainty map",
}
#: Columns of the per-run summary TSV (one row per tractogram).
SUMMARY_COLUMNS = {
    "tractogram": "space, software and algorithm, e.g. sr_dipydet (sr: super-resolved tensors; "
                  "native: the native-resolution fit)",
    "space": "native or sr",
    "software": "dipy or mrtrix",
    "algorithm": "det (deterministic, principal direction) or prob (probabilistic)",
    "voxel_size_mm": "voxel size of the tracked tensor image (mm)",
    "step_mm": "step size (mm)",
    "max_angle_deg": "largest angle between successive steps (degrees)",
    "n_seeds": "seeds tracked",
    "n_tracked": "streamlines within the length limits before the uncertainty limit",
    "uncertainty_threshold": "the --max-uncertainty threshold (mm^2/s); n/a when none was set",
    "uncertainty_action": "stop or drop; n/a when no threshold was set",
    "n_stopped": "streamlines cut where they entered a voxel above the uncertainty threshold",
    "n_dropped": "streamlines removed by the uncertainty limit (action drop, or too short once cut)",
    "n_streamlines": "streamlines in the tractogram",
    "mean_length_mm": "mean streamline length (mm)",
    "median_length_mm": "median streamline length (mm)",
    "mean_uncertainty": "mean over streamlines of their mean uncertainty (mm^2/s)",
    "max_uncertainty_seen": "largest uncertainty any kept streamline passes through (mm^2/s)",
}


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

    def check(self) -> "TrackingParams":
        """Raise :class:`InputError` (one line) for an unusable setting; returns self."""
        if self.algorithm not in ALGORITHMS:
            raise InputError(f"tracking algorithm {self.algorithm!r} unknown; choose one of {', '.join(ALGORITHMS)}")
        positive = {"seed density": self.seed_density, "minimum length": self.min_length,
                    "maximum length": self.max_length}
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
            raise InputError(f"the minimum streamline length ({self.min_length:g} mm) must be below the "
                             f"maximum ({self.max_length:g} mm)")
        return self

    def resolved(self, voxel_size: float) -> "TrackingParams":
        """The settings with step and angle filled in for this voxel size (mm)."""
        self.check()
        step = self.step_mm if self.step_mm is not None else 0.5 * float(voxel_size)
        angle = self.max_angle if self.max_angle is not None else min(90.0, ANGLE_PER_VOXEL * step / float(voxel_size))
        return replace(self, step_mm=float(step), max_angle=float(angle))


def check_uncertainty_limit(max_uncertainty: float | None, action: str) -> None:
    if action not in UNCERTAINTY_ACTIONS:
        raise InputError(f"uncertainty action {action!r} unknown; choose stop or drop")
    if max_uncertainty is not None and not (math.isfinite(max_uncertainty) and max_uncertainty > 0):
        raise InputError(f"--max-uncertainty must be a positive number in mm^2/s (e.g. 1.5e-4), "
                         f"got {max_uncertainty!r}")


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


def streamline_lengths(streamlines: Sequence[np.ndarray]) -> np.ndarray:
    """Length (mm) of each streamline."""
    return np.array([float(np.sum(np.linalg.norm(np.diff(s, axis=0), axis=1))) if len(s) > 1 else 0.0
                     for s in streamlines])


def voxel_size(affine: np.ndarray) -> float:
    """The smallest voxel size (mm) of an image with this affine."""
    return float(np.min(nb.affines.voxel_sizes(affine)))


def voxel_indices(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Nearest voxel index of world points ``(N, 3)``."""
    return np.rint(nb.affines.apply_affine(np.linalg.inv(affine), np.asarray(points, dtype=float))).astype(int)


def sample_nearest(volume: np.ndarray, affine: np.ndarray, points: np.ndarray, outside: float = np.nan) -> np.ndarray:
    """Value of the voxel holding each world point (``outside`` beyond the grid)."""
    ijk = voxel_indices(points, affine)
    inside = np.all((ijk >= 0) & (ijk < np.array(volume.shape[:3])), axis=1)
    out = np.full(len(ijk), outside, dtype=np.float64)
    out[inside] = volume[tuple(ijk[inside].T)]
    return out


def densify(streamline: np.ndarray, max_step: float, return_index: bool = False):
    """Points along the polyline no further than ``max_step`` mm apart (the original ones kept).

    With ``return_index``, also the index of each original point in the result (segment ``i``
    is ``out[index[i]:index[i + 1] + 1]``)."""
    s = np.asarray(streamline, dtype=np.float64)
    if len(s) < 2:
        return (s, np.arange(len(s))) if return_index else s
    d = np.diff(s, axis=0)
    n = np.maximum(1, np.ceil(np.linalg.norm(d, axis=1) / max_step).astype(int))
    seg = np.repeat(np.arange(len(d)), n)
    t = (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)) / np.repeat(n, n)
    out = np.vstack([s[seg] + d[seg] * t[:, None], s[-1:]])
    return (out, np.r_[0, np.cumsum(n)]) if return_index else out


def densify_many(streamlines: Sequence[np.ndarray], max_step: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`densify` of every streamline at once: the points ``(N, 3)`` and the index of the
    streamline each belongs to (no Python loop over streamlines)."""
    lengths = np.array([len(s) for s in streamlines], dtype=np.int64)
    if not lengths.sum():
        return np.zeros((0, 3)), np.zeros(0, dtype=np.int64)
    pts = np.concatenate([np.asarray(s, dtype=np.float64).reshape(-1, 3) for s in streamlines])
    owner = np.repeat(np.arange(len(lengths)), lengths)
    d = np.diff(pts, axis=0)
    within = owner[1:] == owner[:-1]  # segments inside one streamline
    n = np.where(within, np.maximum(1, np.ceil(np.linalg.norm(d, axis=1) / max_step)), 0).astype(np.int64)
    seg = np.repeat(np.arange(len(d)), n)
    t = (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)) / np.repeat(n, n)
    last = np.cumsum(lengths)[lengths > 0] - 1  # each streamline's last point closes it
    return (np.vstack([pts[seg] + d[seg] * t[:, None], pts[last]]),
            np.concatenate([owner[seg], owner[last]]))


def track_density(streamlines: Sequence[np.ndarray], affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Track-density image: how many streamlines pass through each voxel of the grid
    (each streamline counts once per voxel; the polylines are densified to a quarter voxel)."""
    shape = tuple(int(s) for s in shape[:3])
    n_voxels = int(np.prod(shape))
    counts = np.zeros(n_voxels, dtype=np.int64)
    step = 0.25 * voxel_size(affine)
    for start in range(0, len(streamlines), 5000):  # bounded memory on whole-brain tractograms
        pts, sid = densify_many(streamlines[start:start + 5000], step)
        ijk = voxel_indices(pts, affine)
        inside = np.all((ijk >= 0) & (ijk < np.array(shape)), axis=1)
        flat = np.ravel_multi_index(tuple(ijk[inside].T), shape)
        pairs = np.unique(sid[inside] * n_voxels + flat)  # one count per streamline and voxel
        counts += np.bincount(pairs % n_voxels, minlength=n_voxels)
    return counts.reshape(shape).astype(np.int32)


# --------------------------------------------------------------------------- seeds and tracking


def fa_map(tensors: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """FA (float64) of the positive-semidefinite projection of ``(..., 6)`` tensors (any frame),
    zero outside ``mask``: the map tracking stops on and seeds are drawn from."""
    mask = np.asarray(mask, bool)
    out = np.zeros(mask.shape, dtype=np.float64)
    w, _ = _eigh(np.asarray(tensors)[mask])
    out[mask] = _psd_fa(w)
    return out


def _eigh(tensors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvector columns of ``(P, 6)`` tensors (NaN read as 0), float64."""
    from iqt_pipe.dmri.dti import to_matrix

    return np.linalg.eigh(to_matrix(np.nan_to_num(np.asarray(tensors, dtype=np.float64))))


def _psd_fa(eigenvalues: np.ndarray) -> np.ndarray:
    """FA of the positive-semidefinite projection (negative eigenvalues raised to 0)."""
    from iqt_pipe.dmri.dti import fractional_anisotropy

    return fractional_anisotropy(np.maximum(eigenvalues, 0.0))


def seed_mask(
    tensors: np.ndarray, mask: np.ndarray, seed_fa: float = DEFAULT_SEED_FA, source: str = "the tensor image",
    fa: np.ndarray | None = None,
) -> np.ndarray:
    """Where seeds go, for DIPY and MRtrix3 alike: brain-mask voxels whose FA (:func:`fa_map`;
    pass ``fa`` when it is already computed) is at least ``seed_fa``. Raises :class:`InputError`
    (naming ``source``) when there is none."""
    mask = np.asarray(mask, bool)
    fa = fa_map(tensors, mask) if fa is None else np.nan_to_num(fa)
    seeds = mask & (fa >= seed_fa)
    if not seeds.any():
        raise InputError(f"{source}: no voxel with FA ≥ {seed_fa:g} in the brain mask to seed from; "
                         "check the tensors and the mask")
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
    """``(6, V)``: ``d6 @ basis`` is ``uᵀDu`` at each unit vertex ``u`` for BEP016-ordered ``d6``."""
    x, y, z = np.asarray(vertices, dtype=np.float64).T
    return np.stack([x * x, 2 * x * y, 2 * x * z, y * y, 2 * y * z, z * z])


def _odf_from_eig(eigenvalues: np.ndarray, eigenvectors: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Unnormalised tensor ODF ``(uᵀD⁻¹u)^(-3/2)`` on the vertices of a :func:`_quadratic_form_basis`,
    from ``eigh``'s output; eigenvalues clamped as :func:`tensor_odf` says."""
    from iqt_pipe.dmri.dti import from_matrix

    largest = eigenvalues[..., -1:]
    w = np.where(largest > 0, np.maximum(eigenvalues, MIN_EIGENVALUE_RATIO * largest), 1.0)
    inverse = from_matrix(np.einsum("pij,pj,pkj->pik", eigenvectors, 1.0 / w, eigenvectors))
    return (inverse @ basis) ** -1.5


def tensor_odf(tensors: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Diffusion ODF ``(uᵀD⁻¹u)^(-3/2) / (4π sqrt(det D))`` of ``(P, 6)`` tensors on unit
    ``vertices`` (same frame), normalised to sum to one per tensor; ``(P, V)``. Eigenvalues
    below :data:`MIN_EIGENVALUE_RATIO` × the largest are raised to it; a tensor without a
    positive eigenvalue gets the uniform ODF."""
    w, v = _eigh(tensors)
    # Eigenvalues at least MIN_EIGENVALUE_RATIO × the largest (ascending order: the last), so a flat or
    # non-positive one gives a broad but finite ODF whatever the units; no positive one: isotropic.
    odf = _odf_from_eig(w, v, _quadratic_form_basis(vertices))
    return odf / odf.sum(axis=-1, keepdims=True)


def tensor_odf_sh(eigenvalues: np.ndarray, eigenvectors: np.ndarray, chunk: int = 20000) -> np.ndarray:
    """Real SH coefficients (order :data:`SH_ORDER`, basis :data:`SH_BASIS`) of the tensors'
    normalised ODF on :data:`SPHERE` (:func:`tensor_odf` projected by least squares), from
    ``eigh``'s output for ``(P,)`` tensors; ``(P, n_coefficients)``.

    The ODF and the even-order harmonics are antipodally symmetric, so the fit runs on one
    vertex of each antipodal pair (the :func:`tracking_hemisphere`): the same coefficients as
    on the whole sphere at half the cost. Chunks of ``chunk`` tensors bound the memory."""
    from dipy.reconst.shm import sh_to_sf_matrix

    hemisphere = tracking_hemisphere()
    _, inverse = sh_to_sf_matrix(hemisphere, sh_order_max=SH_ORDER, basis_type=SH_BASIS, return_inv=True,
                                 legacy=False)
    basis = _quadratic_form_basis(hemisphere.vertices)
    out = np.empty((len(eigenvalues), inverse.shape[1]), dtype=np.float64)
    for start in range(0, len(eigenvalues), chunk):
        odf = _odf_from_eig(eigenvalues[start:start + chunk], eigenvectors[start:start + chunk], basis)
        # normalised over the whole sphere: each hemisphere value stands for two vertices
        out[start:start + chunk] = (odf / (2 * odf.sum(axis=-1, keepdims=True))) @ inverse
    return out


def tracking_hemisphere():
    """One vertex of each antipodal pair of :data:`SPHERE`: DIPY's direction getters treat ``u``
    and ``−u`` alike (a step follows the previous direction's sign), so drawing from an
    antipodally symmetric ODF on it is drawing from the whole sphere."""
    from dipy.core.sphere import HemiSphere
    from dipy.data import get_sphere

    return HemiSphere.from_sphere(get_sphere(name=SPHERE))


def _bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


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
    return SimpleNamespace(peak_indices=indices, peak_values=np.ones(indices.shape, dtype=np.float64),
                           odf_vertices=np.ascontiguousarray(eigenvectors[valid, :, -1]))


def _seed_directions(voxel_tensors: np.ndarray, seeds_voxel: np.ndarray) -> np.ndarray:
    """Principal eigenvector of the trilinearly interpolated tensor at each seed (voxel
    coordinates), zero where it has no positive eigenvalue (DIPY then skips the seed)."""
    from scipy import ndimage

    coords = np.asarray(seeds_voxel, dtype=np.float64).T
    interpolated = np.stack([ndimage.map_coordinates(voxel_tensors[..., c], coords, order=1, mode="nearest")
                             for c in range(6)], axis=-1)
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
    box = _bounding_box(mask)
    offset = np.eye(4)
    offset[:3, 3] = [s.start for s in box]
    affine_box = np.asarray(affine, dtype=np.float64) @ offset
    mask = mask[box]
    # One eigendecomposition of the brain's voxel-frame tensors serves FA, directions and ODF.
    voxel_tensors = np.zeros(mask.shape + (6,), dtype=np.float64)
    voxel_tensors[mask] = tensors_world_to_voxel(np.nan_to_num(np.asarray(tensors_world)[box][mask]), affine)
    eigenvalues, eigenvectors = _eigh(voxel_tensors[mask])
    fa = np.zeros(mask.shape, dtype=np.float64)
    fa[mask] = _psd_fa(eigenvalues)  # = fa_map: FA is the same in any frame

    if seeds is None:
        seeding = seed_mask(voxel_tensors, mask, params.seed_fa, source, fa=fa)
        seeds = random_seeds(seeding, affine_box, seed_count(seeding, affine_box, params.seed_density),
                             params.random_seed)
    seeds = np.ascontiguousarray(np.asarray(seeds, dtype=np.float64).reshape(-1, 3))
    info = {"step_mm": params.step_mm, "max_angle_deg": params.max_angle, "voxel_size_mm": voxel_size(affine)}
    if not len(seeds):
        return Tracks([], np.zeros(0, dtype=int), 0, info)
    seeds_voxel = nb.affines.apply_affine(np.linalg.inv(affine_box), seeds)
    directions = _seed_directions(voxel_tensors, seeds_voxel)
    del voxel_tensors

    stopping = ThresholdStoppingCriterion(fa, params.fa_threshold)
    # DIPY keeps streamlines of at most int(max_len / step) points: room for max_length and more,
    # so the length limits below decide, as before.
    max_points = math.ceil(params.max_length / params.step_mm) + 3
    limits = dict(min_len=0, max_len=int(math.ceil(max_points * params.step_mm)),
                  step_size=params.step_mm, voxel_size=nb.affines.voxel_sizes(affine_box).astype(np.float64),
                  max_angle=params.max_angle, return_all=True,
                  # DIPY seeds each streamline's generator from its seed point times this (> 0:
                  # reproducible whatever the threads; 0 would mean the clock)
                  random_seed=params.random_seed + 1)
    if params.algorithm == "det":
        peaks = _principal_peaks(eigenvalues, eigenvectors, mask)
        if peaks is None:
            return Tracks([], np.zeros(0, dtype=int), len(seeds), info)
        # EuDX's propagator on them: the principal eigenvectors of the 8 voxels around the point
        # that lie within the angle limit of the previous step, signed along it and averaged with
        # their trilinear weights; it stops where they hold less than DET_MIN_WEIGHT of the weight.
        settings = generate_tracking_parameters("eudx", angle_threshold=params.max_angle, peak_values_threshold=0.0,
                                                min_total_weight=DET_MIN_WEIGHT, **limits)
        field_kw = {"pam": peaks}
    else:
        sh = np.zeros(mask.shape + ((SH_ORDER + 1) * (SH_ORDER + 2) // 2,), dtype=np.float64)
        sh[mask] = tensor_odf_sh(eigenvalues, eigenvectors)
        settings = generate_tracking_parameters("prob", pmf_threshold=PMF_THRESHOLD, **limits)
        field_kw = {"sh": sh, "sphere": tracking_hemisphere(), "basis_type": SH_BASIS, "legacy": False}
    tracker = generic_tracking(seeds, directions, stopping, settings, affine=affine_box, nbr_threads=int(nthreads),
                               save_seeds=True, **field_kw)
    del eigenvalues, eigenvectors
    streamlines, seed_index = [], []
    for line, seed in tracker:
        line = np.asarray(line, dtype=np.float32)
        if len(line) < 2:
            continue
        length = float(np.sum(np.linalg.norm(np.diff(line, axis=0), axis=1)))
        if params.min_length <= length <= params.max_length:
            streamlines.append(line)
            seed_index.append(int(np.argmin(np.linalg.norm(line - seed, axis=1))))
    return Tracks(streamlines, np.asarray(seed_index, dtype=int), len(seeds), info)


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
        piece = line[run[0]:run[1]] if run is not None else line[:0]
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
    table = {
        "streamline": np.arange(n),
        "length_mm": streamline_lengths(streamlines),
        "n_points": np.array([len(s) for s in streamlines], dtype=int),
        "mean_uncertainty": np.full(n, np.nan),
        "max_uncertainty": np.full(n, np.nan),
    }
    points = table["n_points"]
    if uncertainty is not None and points.sum():
        # All points sampled at once, then reduced per streamline (NaN: outside the map).
        values = sample_nearest(uncertainty, affine, np.concatenate([np.asarray(s).reshape(-1, 3) for s in streamlines]))
        has = points > 0
        starts = (np.cumsum(points) - points)[has]
        finite = np.isfinite(values)
        count = np.add.reduceat(finite.astype(np.int64), starts)
        total = np.add.reduceat(np.where(finite, values, 0.0), starts)
        peak = np.fmax.reduceat(values, starts)
        seen = count > 0
        table["mean_uncertainty"][np.flatnonzero(has)[seen]] = total[seen] / count[seen]
        table["max_uncertainty"][np.flatnonzero(has)[seen]] = peak[seen]
    return table


# --------------------------------------------------------------------------- files


def reference_grid(path: str | os.PathLike) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine and 3-D shape of an image's grid, from its header only (the data are not read)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        img = nb.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds for a bad file
        raise InputError(f"{path}: cannot read as NIfTI ({exc.__class__.__name__}: {exc})") from exc
    if img.affine is None or not np.all(np.isfinite(img.affine)) or len(img.shape) < 3:
        raise InputError(f"{path}: not a 3-D image with a valid affine; pass the tracked tensor image or its mask")
    return np.asarray(img.affine, dtype=np.float64), tuple(int(n) for n in img.shape[:3])


def load_on_grid(path: str | os.PathLike, affine: np.ndarray, shape: Sequence[int], what: str) -> np.ndarray:
    """A 3-D map that must lie on a given grid (one-line :class:`InputError` otherwise)."""
    data, data_affine, _ = load_nifti(path)
    if data.shape[:3] != tuple(shape[:3]) or not np.allclose(data_affine, affine, atol=1e-3):
        raise InputError(f"{path}: the {what}'s grid differs from the tracked image's; use the {what} of the "
                         "same run and resolution")
    return data


def save_tck(streamlines: Sequence[np.ndarray], path: str | os.PathLike) -> Path:
    """World-mm streamlines as an MRtrix3 ``.tck`` file, atomically."""
    from nibabel.streamlines import TckFile, Tractogram

    tractogram = Tractogram([np.asarray(s, np.float32) for s in streamlines], affine_to_rasmm=np.eye(4))
    with atomic_path(path) as tmp:
        TckFile(tractogram).save(str(tmp))
    return Path(path)


def save_trk(
    streamlines: Sequence[np.ndarray],
    path: str | os.PathLike,
    affine: np.ndarray,
    shape: Sequence[int],
    data_per_streamline: dict[str, np.ndarray] | None = None,
) -> Path:
    """World-mm streamlines as a TrackVis ``.trk`` file whose header describes the reference
    grid (``affine``, ``shape``), with per-streamline values, atomically."""
    from nibabel.streamlines import Field, Tractogram, TrkFile

    data = {k: np.asarray(v, np.float32).reshape(-1, 1) for k, v in (data_per_streamline or {}).items()}
    tractogram = Tractogram([np.asarray(s, np.float32) for s in streamlines], data_per_streamline=data,
                            affine_to_rasmm=np.eye(4))
    header = {
        Field.VOXEL_TO_RASMM: np.asarray(affine, np.float32),
        Field.VOXEL_SIZES: nb.affines.voxel_sizes(affine).astype(np.float32),
        Field.DIMENSIONS: np.asarray(shape[:3], np.int16),
        Field.VOXEL_ORDER: "".join(nb.aff2axcodes(affine)),
    }
    with atomic_path(path) as tmp:
        TrkFile(tractogram, header=header).save(str(tmp))
    return Path(path)


def load_streamlines(path: str | os.PathLike) -> list[np.ndarray]:
    """Streamlines of a ``.tck`` or ``.trk`` file in world mm (RAS+)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: tractogram not found")
    try:
        tractogram = nb.streamlines.load(str(path)).tractogram
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds for a bad file
        raise InputError(f"{path}: cannot read as a .tck/.trk tractogram ({exc.__class__.__name__}: {exc})") from exc
    return [np.asarray(s, np.float32) for s in tractogram.streamlines]


def write_seed_file(path: str | os.PathLike, tracks: Tracks) -> Path:
    """Seeds in MRtrix3's ``-output_seeds`` format (streamline index, index of the seed
    point in it, seed position in world mm)."""
    lines = ["#Track_index,Seed_index,Pos_x,Pos_y,Pos_z,"]
    for k, (line, i) in enumerate(zip(tracks.streamlines, tracks.seed_index)):
        x, y, z = line[i] if 0 <= i < len(line) else (np.nan, np.nan, np.nan)
        lines.append(f"{k},{i},{x:.7g},{y:.7g},{z:.7g},")
    with atomic_open(path) as fh:
        fh.write("\n".join(lines) + "\n")
    return Path(path)


def read_seed_file(path: str | os.PathLike, n_streamlines: int) -> np.ndarray:
    """Seed point index of each streamline from an ``-output_seeds`` file (-1 where absent)."""
    index = np.full(n_streamlines, -1, dtype=int)
    with open(path) as fh:
        for line in fh:
            if line.startswith("#") or not line.strip():
                continue
            fields = line.strip().rstrip(",").split(",")
            k, i = int(fields[0]), int(fields[1])
            if 0 <= k < n_streamlines:
                index[k] = i
    return index


def write_tractogram(
    tracks: Tracks,
    prefix: str | os.PathLike,
    reference_affine: np.ndarray,
    reference_shape: Sequence[int],
    uncertainty: np.ndarray | None = None,
) -> tuple[dict[str, Path], dict[str, np.ndarray]]:
    """``<prefix>.tck``, ``<prefix>.trk`` (length and uncertainty per streamline as
    ``data_per_streamline``) and ``<prefix>.tsv`` (the same values) for tracks on a reference grid."""
    table = streamline_table(tracks.streamlines, uncertainty, reference_affine)
    prefix = str(prefix)
    dps = {"length_mm": table["length_mm"]}
    if uncertainty is not None:
        dps.update(mean_uncertainty=table["mean_uncertainty"], max_uncertainty=table["max_uncertainty"])
    rows = [{c: table[c][k] for c in STREAMLINE_COLUMNS} for k in range(len(tracks))]
    paths = {
        "tck": save_tck(tracks.streamlines, prefix + ".tck"),
        "trk": save_trk(tracks.streamlines, prefix + ".trk", reference_affine, reference_shape, dps),
        "tsv": write_tsv(rows, list(STREAMLINE_COLUMNS), prefix + ".tsv", TSV_FLOAT),
    }
    return paths, table


def summarise_tractogram(
    tracks: Tracks, table: dict[str, np.ndarray], counts: dict[str, int] | None = None, **extra: Any
) -> dict[str, Any]:
    """One row of the per-run summary (see :data:`SUMMARY_COLUMNS`)."""
    lengths, mean_unc, max_unc = table["length_mm"], table["mean_uncertainty"], table["max_uncertainty"]
    counts = counts or {}
    n_tracked = len(tracks) + counts.get("n_dropped", 0)
    return {
        **{k: tracks.info.get(k) for k in ("voxel_size_mm", "step_mm", "max_angle_deg")},
        "n_seeds": tracks.n_seeds,
        "n_tracked": n_tracked,
        "n_stopped": counts.get("n_stopped", 0),
        "n_dropped": counts.get("n_dropped", 0),
        "n_streamlines": len(tracks),
        "mean_length_mm": float(lengths.mean()) if len(lengths) else None,
        "median_length_mm": float(np.median(lengths)) if len(lengths) else None,
        "mean_uncertainty": float(np.nanmean(mean_unc)) if np.isfinite(mean_unc).any() else None,
        "max_uncertainty_seen": float(np.nanmax(max_unc)) if np.isfinite(max_unc).any() else None,
        **extra,
    }


def finish_tractogram(
    tracks: Tracks,
    prefix: str | os.PathLike,
    reference_affine: np.ndarray,
    reference_shape: Sequence[int],
    uncertainty: np.ndarray | None = None,
    max_uncertainty: float | None = None,
    action: str = "stop",
    min_length: float = 0.0,
) -> tuple[dict[str, Path], dict[str, Any]]:
    """The uncertainty limit (when a threshold is given and a map exists), then the
    tractogram files; returns their paths and the summary row."""
    counts = {"n_stopped": 0, "n_dropped": 0}
    if max_uncertainty is not None:
        if uncertainty is None:
            raise InputError("--max-uncertainty needs an uncertainty map; the model predicts none (use a hetero "
                             "variant, or a variational one with --mc-samples above 1)")
        tracks, counts = limit_uncertainty(tracks, uncertainty, reference_affine, max_uncertainty, action, min_length)
    paths, table = write_tractogram(tracks, prefix, reference_affine, reference_shape, uncertainty)
    row = summarise_tractogram(tracks, table, counts, uncertainty_threshold=max_uncertainty,
                    uncertainty_action=action if max_uncertainty is not None else None)
    return paths, row


def write_summary(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """The per-run summary TSV (:data:`SUMMARY_COLUMNS`, one row per tractogram)."""
    return write_tsv(rows, list(SUMMARY_COLUMNS), path, TSV_FLOAT)


# --------------------------------------------------------------------------- MRtrix3 input


def resample_to_grid(
    volume: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: Sequence[int], order: int = 1
) -> np.ndarray:
    """Interpolate a 3-D volume at the voxel centres of another grid (world coordinates;
    trilinear by default, which keeps a positive image positive; edges extended with the
    nearest value)."""
    from scipy import ndimage

    from iqt_pipe.dmri.degrade import voxel_centres

    points = voxel_centres(tuple(dst_shape[:3]), dst_affine)
    ijk = nb.affines.apply_affine(np.linalg.inv(src_affine), points)
    out = ndimage.map_coordinates(np.asarray(volume, np.float64), np.moveaxis(ijk, -1, 0), order=order,
                                  mode="nearest", prefilter=order > 1)
    return out.astype(np.float32)


def synthesis_scheme(bvals: np.ndarray, bvecs_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The volumes a synthesised series needs: one b = 0 and the DTI shell of the subject's
    table (IQT protocol, :func:`iqt_pipe.dmri.gradients.select_dti_volumes`); world directions."""
    from iqt_pipe.dmri.gradients import GradientTable, select_dti_volumes

    gtab = GradientTable(np.asarray(bvals, float), np.asarray(bvecs_world, float))
    keep = select_dti_volumes(gtab) & ~gtab.b0_mask
    b = np.r_[0.0, gtab.bvals[keep]]
    g = np.vstack([np.zeros((1, 3)), gtab.bvecs[keep]])
    return b, g


def synthesize_dwi(tensors_world: np.ndarray, s0: np.ndarray, bvals: np.ndarray, bvecs_world: np.ndarray) -> np.ndarray:
    """Noise-free ``S0·exp(−b gᵀDg)`` for world-frame tensors and world directions, float32."""
    from iqt_pipe.dmri.dti import project_psd
    from iqt_pipe.sims.phantom import synthesize_signal

    tensors, _ = project_psd(np.nan_to_num(tensors_world), 0.0)
    s0 = np.clip(np.nan_to_num(s0), 0, None)
    out = np.zeros(s0.shape + (len(bvals),), dtype=np.float32)
    inside = s0 > 0
    for start in range(0, int(inside.sum()), 200000):  # bounded memory on large grids
        idx = tuple(a[start:start + 200000] for a in np.nonzero(inside))
        out[idx] = synthesize_signal(s0[idx].astype(float), tensors[idx].astype(float), bvals, bvecs_world)
    return out


def write_mrtrix_grad(bvals: np.ndarray, bvecs_world: np.ndarray, path: str | os.PathLike) -> Path:
    """An MRtrix3 ``-grad`` file: one row ``x y z b`` per volume, directions in world coordinates."""
    rows = [f"{x:.8f} {y:.8f} {z:.8f} {b:g}" for (x, y, z), b in zip(bvecs_world, bvals)]
    with atomic_open(path) as fh:
        fh.write("\n".join(rows) + "\n")
    return Path(path)


def b0_noise_sigma(b0: np.ndarray, mask: np.ndarray) -> float | None:
    """The noise σ of a DWI run from its repeated b=0 volumes ``(X, Y, Z, n)`` inside ``mask``:
    the robust sd (1.4826 × median absolute deviation) of each voxel's deviations from its
    mean b=0, times ``sqrt(n / (n − 1))`` for the mean's share; Gaussian (high-SNR Rician)
    noise. None with fewer than two b=0 volumes or an empty mask."""
    b0 = np.asarray(b0, dtype=np.float64)
    mask = np.asarray(mask, bool)
    n = b0.shape[-1] if b0.ndim == 4 else 1
    if n < 2 or not mask.any():
        return None
    values = b0[mask]
    deviations = values - values.mean(axis=1, keepdims=True)
    sigma = 1.4826 * float(np.median(np.abs(deviations))) * math.sqrt(n / (n - 1))
    return sigma if math.isfinite(sigma) and sigma > 0 else None


def run_noise_sigma(
    dwi_file: str | os.PathLike, bvals: np.ndarray, mask_file: str | os.PathLike | None = None
) -> float | None:
    """:func:`b0_noise_sigma` of a DWI series file (only its b=0 volumes are read) inside a
    brain mask on its grid; None when the series has fewer than two b=0 volumes or the mask's
    grid differs."""
    from iqt_pipe.dmri.gradients import B0_THRESHOLD

    b0_index = np.flatnonzero(np.asarray(bvals, float) <= B0_THRESHOLD)
    if len(b0_index) < 2:
        return None
    img = nb.load(str(dwi_file))
    if len(img.shape) != 4 or img.shape[3] != len(bvals):
        raise InputError(f"{dwi_file}: expected a 4-D series of {len(bvals)} volumes (one per b-value), "
                         f"got shape {img.shape}")
    b0 = np.stack([np.asarray(img.dataobj[..., int(i)], dtype=np.float32) for i in b0_index], axis=-1)
    if mask_file is not None:
        mask, mask_affine, _ = load_nifti(mask_file)
        if mask.shape != b0.shape[:3] or not np.allclose(mask_affine, img.affine, atol=1e-3):
            return None
        mask = mask > 0
    else:  # no mask: the voxels brighter than half the 98th percentile of the mean b=0
        mean = b0.mean(axis=-1)
        mask = mean > 0.5 * np.percentile(mean, 98)
    return b0_noise_sigma(b0, mask)


def prepare_mrtrix_inputs(
    tensor_file: str | os.PathLike,
    mask_file: str | os.PathLike,
    s0_file: str | os.PathLike,
    bval_file: str | os.PathLike,
    bvec_file: str | os.PathLike,
    prefix: str | os.PathLike,
    params: TrackingParams | None = None,
    noisy: bool = False,
    noise_dwi_file: str | os.PathLike | None = None,
    noise_mask_file: str | os.PathLike | None = None,
    snr: float = DEFAULT_SYNTH_SNR,
) -> dict[str, Any]:
    """Everything ``tckgen -algorithm Tensor_Det/Tensor_Prob`` needs for a tensor image:
    a DWI series synthesised from the tensors and S0 (trilinearly resampled to the tensor grid
    when the grids differ) with the subject's gradient table in world coordinates, the brain
    mask, the white-matter seed mask (:func:`seed_mask`), and the seed count and step/angle for
    this voxel size.

    With ``noisy`` (for ``Tensor_Prob``, whose wild bootstrap needs residuals) also
    ``noisy_dwi_file``: the same series with Rician noise (seeded by ``params.random_seed``)
    inside the mask, σ from the repeated b=0 volumes of ``noise_dwi_file`` (the run's native
    DWI, same gradient table; ``noise_mask_file`` its brain mask) or, failing that, median S0
    in the mask / ``snr``; ``noise`` describes it for the sidecar.
    """
    from iqt_pipe.dmri.gradients import read_gradients
    from iqt_pipe.sims.phantom import add_rician_noise

    tensors, mask, affine = load_tensor_image(tensor_file, mask_file)
    s0, s0_affine, _ = load_nifti(s0_file)
    if s0.ndim != 3:
        raise InputError(f"{s0_file}: expected a 3-D S0 image, got shape {s0.shape}")
    gtab = read_gradients(bval_file, bvec_file)
    if s0.shape != mask.shape or not np.allclose(s0_affine, affine, atol=1e-3):
        s0 = resample_to_grid(s0, s0_affine, affine, mask.shape)
    bvals, bvecs = synthesis_scheme(gtab.bvals, gtab.bvecs_world(s0_affine))
    params = (params or TrackingParams()).resolved(voxel_size(affine))
    seeds = seed_mask(tensors, mask, params.seed_fa, str(tensor_file))
    prefix = str(prefix)
    s0 = np.where(mask, s0, 0)
    dwi = synthesize_dwi(np.where(mask[..., None], tensors, 0), s0, bvals, bvecs)
    out = {
        "dwi_file": save_nifti(dwi, affine, prefix + "_dwi.nii.gz"),
        "grad_file": write_mrtrix_grad(bvals, bvecs, prefix + "_grad.b"),
        "mask_file": save_nifti(mask.astype(np.uint8), affine, prefix + "_mask.nii.gz", dtype=np.uint8),
        "seed_mask_file": save_nifti(seeds.astype(np.uint8), affine, prefix + "_seeds.nii.gz", dtype=np.uint8),
        "n_seeds": seed_count(seeds, affine, params.seed_density),
        "step_mm": params.step_mm,
        "max_angle": params.max_angle,
        "voxel_size_mm": voxel_size(affine),
    }
    if noisy:
        if not (math.isfinite(snr) and snr > 0):
            raise InputError(f"the SNR of the synthesised b=0 must be a positive number, got {snr!r}")
        sigma = run_noise_sigma(noise_dwi_file, gtab.bvals, noise_mask_file) if noise_dwi_file else None
        if sigma is not None:
            how = f"robust sd of the repeated b=0 volumes of {Path(noise_dwi_file).name}"
        else:
            sigma = float(np.median(s0[mask & (s0 > 0)])) / snr if (mask & (s0 > 0)).any() else 0.0
            how = f"median b=0 of the synthesised series / {snr:g} (SNR {snr:g}; the run's noise was not measurable)"
        rng = np.random.default_rng(params.random_seed)
        noisy_dwi = dwi  # the noise-free series is written; add the noise in place, in bounded chunks
        where = np.nonzero(mask & (s0 > 0))
        for start in range(0, len(where[0]), 200000):
            idx = tuple(a[start:start + 200000] for a in where)
            noisy_dwi[idx] = add_rician_noise(dwi[idx].astype(np.float64), sigma, rng).astype(np.float32)
        out["noisy_dwi_file"] = save_nifti(noisy_dwi, affine, prefix + "_noisy_dwi.nii.gz")
        out["noise"] = {"Type": "Rician", "Sigma": sigma, "Estimate": how, "RandomSeed": params.random_seed}
    return out
