"""DTI fitting (dipy weighted least squares) and brain masking, in iqt-pipe's conventions."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from iqt_pipe.dmri.dti import from_dipy_order, not_positive_definite
from iqt_pipe.dmri.gradients import GradientTable, select_dti_volumes
from iqt_pipe.io import InputError


@dataclass
class DTIFit:
    """A fitted tensor field: BEP016 components in the *voxel* frame of its grid."""

    tensors: np.ndarray  # (X, Y, Z, 6) float32, mm²/s, voxel frame, zero outside the mask
    s0: np.ndarray  # (X, Y, Z) float32, fitted non-diffusion-weighted signal
    mask: np.ndarray  # (X, Y, Z) bool, voxels that were fitted
    volumes: np.ndarray  # (N,) bool, the DWI volumes the fit used
    #: Fitted voxels whose tensor came out non-finite (written as zero) or with an eigenvalue
    #: ≤ 0 (written as fitted: DIPY and MRtrix3 do the same); for the sidecars.
    guards: dict = field(default_factory=dict)


def valid_signal_mask(dwi: np.ndarray) -> np.ndarray:
    """Voxels that can be fitted: a finite signal in every volume, positive in more than
    half of them and in at least 7 (the tensor and S0).

    Zero-filled background stays out, as it would give absurd tensors that interpolation
    carries far into the brain. A brain voxel whose signal reached zero in a few
    diffusion-weighted volumes stays in: that is cerebrospinal fluid (free water at b = 1000
    s/mm² keeps ~5 % of its b = 0 signal, which the scanner can store as 0), and
    :func:`positive_signal` gives its zeros a floor.
    """
    count = (dwi > 0).sum(-1)
    enough = (count >= 7) & (2 * count > dwi.shape[-1])
    return np.all(np.isfinite(dwi), axis=-1) & enough


def positive_signal(data: np.ndarray) -> np.ndarray:
    """``data`` (voxels × volumes) with each non-positive value raised to the smallest
    positive value of its voxel: a measurement lost below the scanner's floor is taken to be
    no larger than the voxel's weakest one seen, rather than DIPY's 1e-4, whose logarithm
    would make that direction's diffusivity tens of times that of free water."""
    low = data <= 0
    if not low.any():
        return data
    floor = np.where(low, np.inf, data).min(-1, keepdims=True)
    return np.where(low, floor, data)


def brain_mask(dwi: np.ndarray, gtab: GradientTable, voxel_size=None) -> np.ndarray:
    """Brain mask by dipy's ``median_otsu`` on the mean b = 0 image.

    The median filter radius is ~4 mm (at least 1 voxel) so the result does not depend on
    the resolution more than necessary.
    """
    from dipy.segment.mask import median_otsu

    b0 = dwi[..., gtab.b0_mask].mean(axis=-1)
    b0 = np.where(np.isfinite(b0), b0, 0)
    radius = 2
    if voxel_size is not None:
        radius = int(max(1, round(4.0 / float(np.mean(voxel_size)))))
    _, mask = median_otsu(b0, median_radius=radius, numpass=2)
    return mask.astype(bool)


#: Voxels per solve of :func:`wls_tensors` (bounds its memory: ~1 kB a voxel).
WLS_CHUNK = 2**16


def wls_tensors(design: np.ndarray, signal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DIPY's WLS tensor fit of ``(P, G)`` signals, as ``TensorModel(gtab, fit_method="WLS")``
    returns it: the log signal fitted by least squares weighted by the signal its OLS fit
    predicts, the tensors rebuilt from their eigendecomposition with eigenvalues raised to
    DIPY's minimum diffusivity. Returns DIPY-ordered lower-triangular tensors ``(P, 6)`` and S0.

    DIPY solves each voxel by a pseudo-inverse of its weighted design matrix; here all the
    voxels' normal equations (columns scaled to unit norm, for their conditioning) are formed
    by one matrix product and solved together: the same estimates, within ~1e-10 relative
    on real scans, three times faster. ``design`` must have full column rank (as
    :func:`~iqt_pipe.dmri.gradients.select_dti_volumes` checks); the weights are positive, so
    every system is then positive definite — unless a voxel's wild OLS fit leaves fewer than
    seven of them above underflow (seen at the edge of registered series), which a chunk then
    solves, as DIPY does, by pseudo-inverse."""
    import dipy.reconst.dti as dipy_dti

    signal = np.maximum(signal, dipy_dti.MIN_POSITIVE_SIGNAL)  # as TensorModel.fit
    scale = 1.0 / np.linalg.norm(design, axis=0)
    x = design * scale
    k = x.shape[1]
    outer = (x[:, :, None] * x[:, None, :]).reshape(len(x), k * k)  # one row per direction: x_i x_j
    params = np.empty((len(signal), k))
    for start in range(0, len(signal), WLS_CHUNK):
        s = signal[start : start + WLS_CHUNK]
        ols, _ = dipy_dti.ols_fit_tensor(design, s, return_lower_triangular=True)
        # Squared weights, DIPY's w = predicted signal, over each voxel's largest (the estimate
        # does not depend on their scale; unscaled, a wild OLS fit overflows or underflows).
        log_w2 = 2.0 * (ols @ design.T)
        w2 = np.exp(log_w2 - log_w2.max(axis=1, keepdims=True))
        normal = (w2 @ outer).reshape(-1, k, k)
        rhs = ((w2 * np.log(s)) @ x)[..., None]
        try:
            solved = np.linalg.solve(normal, rhs)
        except np.linalg.LinAlgError:  # weights underflowed to fewer than k volumes: DIPY's pinv
            solved = np.linalg.pinv(normal) @ rhs
        params[start : start + len(s)] = solved[..., 0] * scale
    tensors = dipy_dti.eig_from_lo_tri(params, min_diffusivity=1e-6 / -design.min())  # DIPY's tol
    return dipy_dti.TensorFit(None, tensors).lower_triangular(), np.exp(-params[:, -1])


def fit_dti(
    dwi: np.ndarray,
    affine: np.ndarray,
    gtab: GradientTable,
    mask: np.ndarray | None = None,
    source: str = "DWI series",
    threads: int = 1,
) -> DTIFit:
    """Fit DTI by WLS on b = 0 plus one shell (IQT protocol, see
    :func:`iqt_pipe.dmri.gradients.select_dti_volumes`), returning voxel-frame tensors.

    ``mask`` limits the fit (all voxels when None); voxels without enough positive signal
    (:func:`valid_signal_mask`) are never fitted and stay zero, and a fitted voxel's
    non-positive values are raised to its smallest positive one (:func:`positive_signal`).
    ``threads`` fit as many equal parts of the voxels side by side (NumPy's linear algebra
    releases the interpreter; the result is the same to the bit).
    """
    from concurrent.futures import ThreadPoolExecutor

    import dipy.reconst.dti as dipy_dti
    from dipy.core.gradients import gradient_table

    if dwi.ndim != 4 or dwi.shape[-1] != len(gtab.bvals):
        raise InputError(f"{source}: expected a 4-D series with {len(gtab.bvals)} volumes, got shape {dwi.shape}")
    keep = select_dti_volumes(gtab, source)
    sub = gtab.subset(keep)
    data = dwi[..., keep]
    fit_mask = valid_signal_mask(data)
    if mask is not None:
        fit_mask &= np.asarray(mask, dtype=bool)
    # Fitting with voxel-frame directions gives voxel-frame tensors directly.
    dipy_gtab = gradient_table(sub.bvals, bvecs=sub.bvecs_voxel(affine), b0_threshold=sub.b0_threshold)
    model = dipy_dti.TensorModel(dipy_gtab, fit_method="WLS")
    tensors = np.zeros(dwi.shape[:3] + (6,), dtype=np.float32)
    s0 = np.zeros(dwi.shape[:3], dtype=np.float32)
    if np.any(fit_mask):

        def fit(voxels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return wls_tensors(model.design_matrix, positive_signal(voxels.astype(np.float64)))

        parts = np.array_split(data[fit_mask], max(1, min(int(threads), int(fit_mask.sum()))))
        with ThreadPoolExecutor(max_workers=len(parts)) as pool:
            fitted = list(pool.map(fit, parts))
        tensors[fit_mask] = from_dipy_order(np.concatenate([t for t, _ in fitted]))
        s0[fit_mask] = np.concatenate([s for _, s in fitted])
    bad = ~np.all(np.isfinite(tensors), axis=-1)
    tensors[bad] = 0
    s0[~np.isfinite(s0)] = 0
    guards = {
        "NonFiniteTensors": int(bad.sum()),
        "NonPositiveDefinite": int(not_positive_definite(tensors[fit_mask & ~bad]).sum()),
    }
    return DTIFit(tensors=tensors, s0=s0, mask=fit_mask, volumes=keep, guards=guards)
