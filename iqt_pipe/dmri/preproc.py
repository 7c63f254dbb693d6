"""DWI preprocessing before the DTI fit: MP-PCA denoising and Gibbs-ringing removal (DIPY),
and the registration of a raw series' volumes to each other.

The first two are the DIPY fallbacks of MRtrix3's ``dwidenoise`` and ``mrdegibbs``. Both must
see the series as reconstructed by the scanner (no interpolation before them), denoising first.
:func:`align_volumes` stands in for the motion and eddy-current correction of an upstream
pipeline (QSIPrep) where the training and evaluation series are raw scans.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

from iqt_pipe.io import atomic_path


def _check_series(dwi: np.ndarray) -> np.ndarray:
    dwi = np.asarray(dwi, dtype=np.float32)
    if dwi.ndim != 4:
        raise ValueError(f"expected a 4-D DWI series (x, y, z, volumes), got shape {dwi.shape}")
    # One NaN would spread through every patch (or line) that holds it: zero it instead,
    # which the DTI fit's valid-signal mask then leaves out.
    return np.where(np.isfinite(dwi), dwi, np.float32(0))


def denoise_mppca(
    dwi: np.ndarray, mask: np.ndarray | None = None, patch_radius: int = 2, processes: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Marchenko–Pastur PCA denoising (Veraart et al. 2016) of a 4-D series.

    Returns the denoised series (float32, non-negative; zero outside ``mask`` when given)
    and the 3-D map of the estimated noise standard deviation (float32). ``processes`` > 1
    splits the grid along its first axis into overlapping parts denoised side by side in forked
    processes, on Linux (elsewhere one process; :func:`_mppca_parts`): the result is identical to
    one process's. The method is DIPY's ``mppca``, computed as :func:`_mppca` says.
    """
    data = _check_series(dwi)
    mask = np.ones(data.shape[:3], bool) if mask is None else np.asarray(mask, dtype=bool)
    parts = _mppca_parts(mask, patch_radius, processes if sys.platform == "linux" else 1)
    if len(parts) == 1:
        denoised, sigma = _mppca(data, mask, patch_radius)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        denoised, sigma = np.empty(data.shape, np.float32), np.empty(data.shape[:3], np.float32)
        # fork (as DIPY's own Gibbs removal does): spawn would run the caller's main script again
        with ProcessPoolExecutor(len(parts), mp_context=multiprocessing.get_context("fork")) as pool:
            jobs = [
                pool.submit(
                    _mppca, data[lo - pad_lo : hi + pad_hi], mask[lo - pad_lo : hi + pad_hi], patch_radius, lo - pad_lo
                )
                for lo, hi, pad_lo, pad_hi in parts
            ]
            for (lo, hi, pad_lo, _), job in zip(parts, jobs):
                part, part_sigma = job.result()
                denoised[lo:hi], sigma[lo:hi] = part[pad_lo : pad_lo + hi - lo], part_sigma[pad_lo : pad_lo + hi - lo]
    return denoised, sigma


#: Patches whose PCA is computed together by :func:`_mppca`: those centred on one plane of the
#: first axis, in groups along the second axis of about this many.
_MPPCA_BATCH = 1024


def _mppca(data: np.ndarray, mask: np.ndarray, patch_radius: int, origin: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """DIPY's ``mppca`` (``dipy.denoise.localpca``, with its defaults: PCA of each patch by
    eigendecomposition, components below ``(1 + √(volumes / patch voxels))²`` × the
    Marchenko–Pastur noise variance dropped, the overcomplete average weighted by
    ``1 / (1 + kept components)``), in float32 as DIPY computes float32 data, for many patches at
    once where DIPY loops over voxels in Python. On sub-achieva01's noise-correlation slab (8
    slices, 33 volumes, one core) 15.4 → 4.2 s, most of the rest LAPACK's eigendecompositions;
    0.07 % of the values differ from DIPY's by more than 1e-4 of them, none by 1e-2 (float32
    rounding; ``test_mppca_agrees_with_dipy``).

    Every voxel's sums take the patches in an order fixed by the grid alone (groups of centres
    keyed by their plane ``origin + i`` and their block of the second axis, offsets in turn within
    a group), so that a slab of the grid starting at plane ``origin`` gives its voxels the bits the
    whole grid gives them (:func:`denoise_mppca`'s processes)."""
    from numpy.lib.stride_tricks import sliding_window_view
    from threadpoolctl import threadpool_limits

    # DIPY's patch: 2r + 1 voxels along each axis, one along an axis of one voxel
    radii = [0 if n_axis == 1 else patch_radius for n_axis in data.shape[:3]]
    sizes = tuple(2 * r + 1 for r in radii)
    if any(n_axis < size for n_axis, size in zip(data.shape[:3], sizes)):
        raise ValueError(f"a grid of {data.shape[:3]} voxels is smaller than MP-PCA's {sizes} patch")
    n, dim = int(np.prod(sizes)), data.shape[-1]
    tau2 = np.float32((1 + np.sqrt(dim / n)) ** 2)
    inner = np.zeros(mask.shape, bool)
    inner[tuple(slice(r, n_axis - r) for r, n_axis in zip(radii, mask.shape))] = True
    corners = np.argwhere(mask & inner) - radii  # the corners of the patches of every centre in the mask
    # (..., patch voxels along i, j, k, volumes): a patch gathered as DIPY's (voxels, volumes) matrix
    windows = np.moveaxis(sliding_window_view(data, sizes, axis=(0, 1, 2)), 3, -1)
    weight = np.zeros(data.shape[:3], np.float32)  # Σ θ (DIPY's theta and thetavar)
    weighted = np.zeros(data.shape, np.float32)  # Σ θ x̂
    weighted_var = np.zeros(data.shape[:3], np.float32)  # Σ θ σ²
    offsets = np.argwhere(np.ones(sizes, bool))
    block = max(1, _MPPCA_BATCH // max(1, data.shape[2]))
    keys = (corners[:, 0] + origin) * (data.shape[1] // block + 1) + corners[:, 1] // block
    bounds = [0, *(np.flatnonzero(np.diff(keys)) + 1).tolist(), len(corners)]
    # One BLAS thread: the matrices are too small to share, and processes share the cores
    with threadpool_limits(1):
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            i, j, k = corners[lo:hi].T
            patches = windows[i, j, k].reshape(hi - lo, n, dim)
            # Over the voxels, one at a time as DIPY's mean over them: the same bits in any process (numpy's
            # pairwise sums along a contiguous axis depend on where the buffer lies)
            mean = patches.mean(axis=1, keepdims=True)
            centred = patches - mean
            eigenvalues, vectors = np.linalg.eigh(centred.transpose(0, 2, 1) @ centred / np.float32(n))
            var = _mp_noise_variance(eigenvalues, n)
            with np.errstate(invalid="ignore"):  # a NaN variance (see below) drops no component, as in DIPY
                dropped = (eigenvalues < tau2 * var[:, None]).sum(axis=1)
            vectors *= (np.arange(dim) >= dropped[:, None])[:, None, :]
            theta = (1 / (1 + dim - dropped)).astype(np.float32)
            estimate = (centred @ vectors @ vectors.transpose(0, 2, 1) + mean) * theta[:, None, None]
            estimate = estimate.reshape(hi - lo, *sizes, dim)
            theta_var = theta * var
            for a, b, c in offsets:
                at = (i + a, j + b, k + c)
                weight[at] += theta
                weighted_var[at] += theta_var
                weighted[at] += estimate[:, a, b, c]
    denoised = weighted / weight[..., None]  # 0/0 where no patch reaches a mask voxel, as in DIPY
    denoised.clip(min=0, out=denoised)
    denoised[~mask] = 0
    var = weighted_var / weight
    var[~mask] = 0
    return denoised, np.sqrt(var)


def _mp_noise_variance(eigenvalues: np.ndarray, n: int) -> np.ndarray:
    """The Marchenko–Pastur noise variance of each row of ascending PCA eigenvalues of patches of
    ``n`` voxels (DIPY's ``_pca_classifier``, Veraart et al. 2016): the mean of the smallest
    ``c + 1``, for the largest ``c`` with ``λ_c − λ_0 ≤ 4 √((c + 1) / n)`` × that mean. NaN where
    no ``c`` qualifies (a negative smallest eigenvalue of a rank-deficient patch), as DIPY's loop
    returns it then."""
    if eigenvalues.shape[1] > n - 1:  # the zero eigenvalues of fewer samples than volumes
        eigenvalues = eigenvalues[:, -(n - 1) :]
    c = np.arange(eigenvalues.shape[1])
    means = np.cumsum(eigenvalues, axis=1, dtype=eigenvalues.dtype) / (c + 1)
    within = eigenvalues - eigenvalues[:, :1] - 4 * np.sqrt((c + 1.0) / n).astype(eigenvalues.dtype) * means <= 0
    last = eigenvalues.shape[1] - 1 - np.argmax(within[:, ::-1], axis=1)
    return np.where(within.any(axis=1), np.take_along_axis(means, last[:, None], axis=1)[:, 0], np.nan)


def _mppca_parts(mask: np.ndarray, patch_radius: int, processes: int) -> list[tuple[int, int, int, int]]:
    """``(lo, hi, pad_lo, pad_hi)``: slabs ``[lo, hi)`` of the first axis that together cover it,
    each with an equal share of the mask's voxels, and the margins around each that :func:`_mppca` must
    see. A voxel's estimate is the weighted mean over the patches that hold it, whose centres lie
    within ``patch_radius`` of it; a slab widened by ``2 × patch_radius`` on each side holds
    every such centre with its whole patch, and :func:`_mppca` adds them in the same order, so every
    voxel of ``[lo, hi)`` gets the same sums as in the whole grid."""
    n = mask.shape[0]
    per_slice = np.cumsum(mask.sum(axis=(1, 2)))
    if processes <= 1 or per_slice[-1] == 0 or n < 4 * patch_radius * processes:
        return [(0, n, 0, 0)]
    cuts = np.searchsorted(per_slice, per_slice[-1] * np.arange(1, processes) / processes)
    bounds = [0, *sorted(set(int(c) + 1 for c in cuts if 0 < int(c) + 1 < n)), n]
    margin = 2 * patch_radius
    return [(lo, hi, min(margin, lo), min(margin, n - hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def denoise_mppca_brain(
    dwi: np.ndarray, mask: np.ndarray, margin: int = 2, processes: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`denoise_mppca` over the brain ``mask`` dilated by ``margin`` voxels, so that the
    brain's edge voxels are denoised from whole patches; empty patches' 0/0 stay silent."""
    from scipy import ndimage

    region = ndimage.binary_dilation(np.asarray(mask, dtype=bool), iterations=margin)
    with np.errstate(invalid="ignore", divide="ignore"):
        return denoise_mppca(dwi, mask=region, processes=processes)


def remove_gibbs(dwi: np.ndarray, slice_axis: int = 2, processes: int = 1) -> np.ndarray:
    """Gibbs-ringing removal by local sub-voxel shifts (Kellner et al. 2016), in the
    plane orthogonal to ``slice_axis``, slice by slice on ``processes`` processes (DIPY's);
    returns a float32 copy."""
    from dipy.denoise.gibbs import gibbs_removal

    data = _check_series(dwi)
    out = gibbs_removal(data, slice_axis=slice_axis, inplace=False, num_processes=processes)
    return np.asarray(out, dtype=np.float32)


#: :func:`align_volumes`: the transforms DIPY fits in turn between volumes of one contrast
#: (affine: motion and the linear part of eddy-current distortion), and between the mean
#: diffusion-weighted volume and the mean b = 0 (rigid: an affine map across the two contrasts,
#: as DIPY's ``motion_correction`` fits, shrank a still phantom's volumes by up to 1.6 %; within
#: one contrast by 0.1–0.7 %). The rigid step is needed: straight from the translation, the
#: affine step found a 6° turn of a test volume only in part.
AFFINE_PIPELINE = ("center_of_mass", "translation", "rigid", "affine")
RIGID_PIPELINE = ("center_of_mass", "translation", "rigid")
#: The optimiser's iterations at each level of the Gaussian pyramid, coarse to fine (DIPY's
#: default, 1000, 500, 100, is slower for the same maps on ds-realdwi).
REGISTRATION_LEVEL_ITERS = (100, 50, 10)
#: L-BFGS-B's tolerances: DIPY's earlier default. Its present one (ftol 1e-3) stops after a
#: fraction of such a turn (0.5° of 6°) and shifts 0.4–0.8 mm short on real volumes.
REGISTRATION_OPTIMIZER = {"gtol": 1e-4, "ftol": 2.220446049250313e-09}


def _registration_map(moving: np.ndarray, static: np.ndarray, affine: np.ndarray, pipeline: tuple) -> np.ndarray:
    """DIPY's mutual-information registration of ``moving`` to ``static`` (one grid, ``affine``):
    the map (4, 4) from static to moving world points."""
    import logging

    from dipy.align import affine_registration

    log = logging.getLogger("dipy")
    level = log.level
    log.setLevel(logging.ERROR)  # (a line per transform)
    try:
        return affine_registration(
            moving,
            static,
            moving_affine=affine,
            static_affine=affine,
            pipeline=list(pipeline),
            level_iters=list(REGISTRATION_LEVEL_ITERS),
            optimizer_options=dict(REGISTRATION_OPTIMIZER),
        )[1]
    finally:
        log.setLevel(level)


def _maps_to_first(volumes: np.ndarray, affine: np.ndarray, processes: int) -> np.ndarray:
    """The affine :func:`_registration_map` of each volume of ``volumes`` (x, y, z, n) to the
    first (the identity for it): (n, 4, 4)."""
    jobs = [(volumes[..., k], volumes[..., 0], affine, AFFINE_PIPELINE) for k in range(1, volumes.shape[-1])]
    if processes <= 1 or len(jobs) <= 1 or sys.platform != "linux":
        maps = [_registration_map(*job) for job in jobs]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # fork, as for MP-PCA: spawn would run the caller's main script again
        with ProcessPoolExecutor(min(processes, len(jobs)), mp_context=multiprocessing.get_context("fork")) as pool:
            maps = list(pool.map(_registration_map, *zip(*jobs)))
    return np.array([np.eye(4), *maps])


def _resample(volume: np.ndarray, transform: np.ndarray, affine: np.ndarray) -> np.ndarray:
    from dipy.align.imaffine import AffineMap

    grid = {"domain_grid_shape": volume.shape, "domain_grid2world": affine}
    grid |= {"codomain_grid_shape": volume.shape, "codomain_grid2world": affine}
    moved = AffineMap(transform, **grid).transform(volume)  # trilinear
    return np.clip(np.asarray(moved, dtype=np.float32), 0, None)


#: Changes when :func:`align_volumes` would give another result, so that the series cached
#: by an earlier version are registered again.
ALIGNMENT_VERSION = 1


def _alignment_key(data: np.ndarray, gtab, affine: np.ndarray) -> str:
    digest = hashlib.sha256(f"align_volumes {ALIGNMENT_VERSION} {data.shape} {gtab.b0_threshold}".encode())
    digest.update(np.ascontiguousarray(data, dtype=np.float32).tobytes())
    for table in (gtab.bvals, gtab.bvecs, affine):
        digest.update(np.ascontiguousarray(table, dtype=np.float64).tobytes())
    return digest.hexdigest()


def align_volumes(dwi: np.ndarray, gtab, affine: np.ndarray, processes: int = 1, cache_dir=None):
    """A raw series with its volumes aligned, and its gradient table turned to match.

    Volume by volume (on ``processes`` processes), by DIPY's mutual-information registration:
    the b = 0 volumes to the first, the diffusion-weighted ones to the first of them, each by
    an affine map (head motion, and the linear part of eddy-current distortion); then the mean
    of the aligned diffusion-weighted volumes to the mean b = 0 by a rigid one (across
    contrasts). (Against the mean of the unaligned volumes, a test series with two of four
    volumes moved had its maps found only in part.) Each volume is resampled once (trilinear)
    on the series' grid, and its direction turned by the inverse of its rotation (DIPY's
    ``reorient_bvecs``, in world coordinates). Voxels some volume's map takes off the grid
    are zero in every volume.

    Misaligned volumes leave a bright rim of FA along the brain's edge and a DTI misfit above
    the noise: training targets and evaluation references of raw scans need this, as the
    series an upstream pipeline (QSIPrep) delivers have it. Returns the float32 series and
    the new :class:`~iqt_pipe.dmri.gradients.GradientTable`.

    With ``cache_dir``, the result is kept there as ``aligned-<key>.npz`` (the key hashes the
    series, its gradient table and affine) and read back the next time the same series is
    registered: ``iqt-train`` and ``iqt-eval`` pointed at one folder register each run once.
    """
    from iqt_pipe.dmri.gradients import GradientTable

    data = _check_series(dwi)
    if cache_dir is not None:
        cached = Path(cache_dir) / f"aligned-{_alignment_key(data, gtab, affine)[:24]}.npz"
        if cached.exists():
            with np.load(cached) as saved:
                return saved["dwi"], GradientTable(gtab.bvals, saved["bvecs"], gtab.b0_threshold)
    out, bvecs = _align(data, gtab, affine, processes)
    if cache_dir is not None:
        with atomic_path(cached) as tmp:
            np.savez(tmp, dwi=out, bvecs=bvecs)
    return out, GradientTable(gtab.bvals, bvecs, gtab.b0_threshold)


def _align(data: np.ndarray, gtab, affine: np.ndarray, processes: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`align_volumes`' work: the aligned series and its turned bvecs (FSL frame)."""
    from dipy.core.gradients import gradient_table, reorient_bvecs

    from iqt_pipe.dmri.dti import fsl_flip, voxel_to_world_rotation

    if data.shape[-1] != gtab.bvals.size:
        raise ValueError(f"{data.shape[-1]} volumes but {gtab.bvals.size} gradient table rows")
    b0 = gtab.b0_mask
    if not b0.any() or b0.all():
        raise ValueError("registering a series' volumes needs b = 0 and diffusion-weighted volumes")
    transforms = np.empty((data.shape[-1], 4, 4))
    out = np.empty_like(data)
    for group in (b0, ~b0):
        transforms[group] = _maps_to_first(data[..., group], affine, processes)
        for k in np.flatnonzero(group):
            out[..., k] = _resample(data[..., k], transforms[k], affine)
    across = _registration_map(out[..., ~b0].mean(axis=-1), out[..., b0].mean(axis=-1), affine, RIGID_PIPELINE)
    transforms[~b0] = transforms[~b0] @ across  # b = 0 world → first DW volume's world → the volume's
    for k in np.flatnonzero(~b0):  # (the b = 0 volumes stay as their group's maps put them)
        out[..., k] = _resample(data[..., k], transforms[k], affine)
    # A voxel that some volume's map takes outside the grid has lost that reading: it is left
    # out (zero, as the fit's valid-signal mask drops it) rather than fitted without it (a b = 0
    # lost leaves the fit of one shell singular).
    ones = np.ones(data.shape[:3], np.float32)
    covered = np.all([_resample(ones, transforms[k], affine) > 1 - 1e-4 for k in range(data.shape[-1])], axis=0)
    out[~covered] = 0
    world = gtab.bvecs_world(affine)
    world[~b0] /= np.linalg.norm(world[~b0], axis=1, keepdims=True)
    dipy_gtab = gradient_table(gtab.bvals, bvecs=np.where(b0[:, None], 0.0, world), b0_threshold=gtab.b0_threshold)
    turned = reorient_bvecs(dipy_gtab, np.moveaxis(transforms[~b0], 0, -1)).bvecs
    # World → the FSL frame of the bvec files (bvecs_world's steps taken back).
    return out, np.where(b0[:, None], gtab.bvecs, turned @ voxel_to_world_rotation(affine) @ fsl_flip(affine))


#: Central slices of the brain the noise-correlation check looks at (MP-PCA denoises the middle
#: ``NOISE_SLICES − 4`` of them from whole 5³ patches).
NOISE_SLICES = 8


def noise_neighbour_correlation(
    dwi: np.ndarray, mask: np.ndarray, slices: int | None = NOISE_SLICES, processes: int = 1
) -> list[float]:
    """Correlation of a series' noise between face neighbours along voxel axes i, j, k.

    The noise is the residual of MP-PCA (:func:`denoise_mppca_brain`, as ``iqt-eval`` measures
    it); :func:`iqt_pipe.evaluation.metrics.neighbour_correlation` pools its volumes inside ``mask``.
    ``slices``: only the central slices of the brain along the last axis (None: all). On
    ds-realdwi 12 slices changed the values by < 0.01 from all of them, for a fifth of the time,
    and 8 by ≤ 0.013 from 12 (galan01, prisma01 run 1), for half the time again. ≈ 0 for a scan
    reconstructed without interpolation; 0.5–0.7 along an axis the scanner interpolated (see
    :data:`iqt_pipe.qc.CORRELATED_NOISE`). ``processes``: MP-PCA's (:func:`denoise_mppca`)."""
    from iqt_pipe.evaluation.metrics import neighbour_correlation

    dwi = _check_series(dwi)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != dwi.shape[:3]:
        raise ValueError(f"mask grid {mask.shape} differs from the series grid {dwi.shape[:3]}")
    if not mask.any():
        raise ValueError("the brain mask is empty")
    if slices is not None:
        z = np.flatnonzero(mask.any(axis=(0, 1)))
        start = max((z[0] + z[-1]) // 2 - slices // 2, 0)
        dwi, mask = dwi[:, :, start : start + slices], mask[:, :, start : start + slices]
    denoised, _ = denoise_mppca_brain(dwi, mask, processes=processes)
    return neighbour_correlation(dwi - denoised, mask)
