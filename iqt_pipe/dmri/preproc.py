"""DWI preprocessing before the DTI fit: MP-PCA denoising and Gibbs-ringing removal (DIPY).

These are the DIPY fallbacks of MRtrix3's ``dwidenoise`` and ``mrdegibbs``. Both must see
the series as reconstructed by the scanner (no interpolation before them), denoising first.
"""

from __future__ import annotations

import sys

import numpy as np


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
    splits the grid along its first axis into overlapping parts that DIPY denoises side by side
    in forked processes, on Linux (elsewhere one process; :func:`_mppca_parts`): the result is
    identical to one process's.
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
                pool.submit(_mppca, data[lo - pad_lo : hi + pad_hi], mask[lo - pad_lo : hi + pad_hi], patch_radius)
                for lo, hi, pad_lo, pad_hi in parts
            ]
            for (lo, hi, pad_lo, _), job in zip(parts, jobs):
                part, part_sigma = job.result()
                denoised[lo:hi], sigma[lo:hi] = part[pad_lo : pad_lo + hi - lo], part_sigma[pad_lo : pad_lo + hi - lo]
    return denoised, sigma


def _mppca(data: np.ndarray, mask: np.ndarray, patch_radius: int) -> tuple[np.ndarray, np.ndarray]:
    from dipy.denoise.localpca import mppca

    denoised, sigma = mppca(data, mask=mask, patch_radius=patch_radius, return_sigma=True, suppress_warning=True)
    return denoised.astype(np.float32, copy=False), sigma.astype(np.float32, copy=False)


def _mppca_parts(mask: np.ndarray, patch_radius: int, processes: int) -> list[tuple[int, int, int, int]]:
    """``(lo, hi, pad_lo, pad_hi)``: slabs ``[lo, hi)`` of the first axis that together cover it,
    each with an equal share of the mask's voxels, and the margins around each that DIPY must
    see. A voxel's estimate is the weighted mean over the patches that hold it, whose centres lie
    within ``patch_radius`` of it; a slab widened by ``2 × patch_radius`` on each side holds
    every such centre with its whole patch, and DIPY visits them in the same order, so every
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
