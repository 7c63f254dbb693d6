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


def remove_gibbs(dwi: np.ndarray, slice_axis: int = 2) -> np.ndarray:
    """Gibbs-ringing removal by local sub-voxel shifts (Kellner et al. 2016), in the
    plane orthogonal to ``slice_axis``; returns a float32 copy."""
    from dipy.denoise.gibbs import gibbs_removal

    data = _check_series(dwi)
    out = gibbs_removal(data, slice_axis=slice_axis, inplace=False, num_processes=1)
    return np.asarray(out, dtype=np.float32)
