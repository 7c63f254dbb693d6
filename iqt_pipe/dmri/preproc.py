"""DWI preprocessing before the DTI fit: MP-PCA denoising and Gibbs-ringing removal (DIPY).

These are the DIPY fallbacks of MRtrix3's ``dwidenoise`` and ``mrdegibbs``. Both must see
the series as reconstructed by the scanner (no interpolation before them), denoising first.
"""

from __future__ import annotations

import numpy as np


def _check_series(dwi: np.ndarray) -> np.ndarray:
    dwi = np.asarray(dwi, dtype=np.float32)
    if dwi.ndim != 4:
        raise ValueError(f"expected a 4-D DWI series (x, y, z, volumes), got shape {dwi.shape}")
    # One NaN would spread through every patch (or line) that holds it: zero it instead,
    # which the DTI fit's valid-signal mask then leaves out.
    return np.where(np.isfinite(dwi), dwi, np.float32(0))


def denoise_mppca(
    dwi: np.ndarray, mask: np.ndarray | None = None, patch_radius: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Marchenko–Pastur PCA denoising (Veraart et al. 2016) of a 4-D series.

    Returns the denoised series (float32, non-negative; zero outside ``mask`` when given)
    and the 3-D map of the estimated noise standard deviation (float32).
    """
    from dipy.denoise.localpca import mppca

    data = _check_series(dwi)
    denoised, sigma = mppca(
        data,
        mask=None if mask is None else np.asarray(mask, dtype=bool),
        patch_radius=patch_radius,
        return_sigma=True,
        suppress_warning=True,
    )
    return denoised.astype(np.float32, copy=False), sigma.astype(np.float32, copy=False)


def denoise_mppca_brain(dwi: np.ndarray, mask: np.ndarray, margin: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """:func:`denoise_mppca` over the brain ``mask`` dilated by ``margin`` voxels, so that the
    brain's edge voxels are denoised from whole patches; empty patches' 0/0 stay silent."""
    from scipy import ndimage

    region = ndimage.binary_dilation(np.asarray(mask, dtype=bool), iterations=margin)
    with np.errstate(invalid="ignore", divide="ignore"):
        return denoise_mppca(dwi, mask=region)


def remove_gibbs(dwi: np.ndarray, slice_axis: int = 2) -> np.ndarray:
    """Gibbs-ringing removal by local sub-voxel shifts (Kellner et al. 2016), in the
    plane orthogonal to ``slice_axis``; returns a float32 copy."""
    from dipy.denoise.gibbs import gibbs_removal

    data = _check_series(dwi)
    out = gibbs_removal(data, slice_axis=slice_axis, inplace=False, num_processes=1)
    return np.asarray(out, dtype=np.float32)


#: Central slices of the brain the noise-correlation check looks at (MP-PCA denoises the middle
#: ``NOISE_SLICES − 4`` of them from whole 5³ patches).
NOISE_SLICES = 8


def noise_neighbour_correlation(dwi: np.ndarray, mask: np.ndarray, slices: int | None = NOISE_SLICES) -> list[float]:
    """Correlation of a series' noise between face neighbours along voxel axes i, j, k.

    The noise is the residual of MP-PCA (:func:`denoise_mppca_brain`, as ``iqt-eval`` measures
    it); :func:`iqt_pipe.evaluation.metrics.neighbour_correlation` pools its volumes inside ``mask``.
    ``slices``: only the central slices of the brain along the last axis (None: all). On
    ds-realdwi 12 slices changed the values by < 0.01 from all of them, for a fifth of the time,
    and 8 by ≤ 0.013 from 12 (galan01, prisma01 run 1), for half the time again. ≈ 0 for a scan
    reconstructed without interpolation; 0.5–0.7 along an axis the scanner interpolated (see
    :data:`iqt_pipe.qc.CORRELATED_NOISE`)."""
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
    denoised, _ = denoise_mppca_brain(dwi, mask)
    return neighbour_correlation(dwi - denoised, mask)
