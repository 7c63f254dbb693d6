"""The DTI forward model and Rician noise, written once for every synthetic series: the phantom
(:mod:`iqt_pipe.sims.phantom`), the known-truth and lesion cases of the evaluation
(:mod:`iqt_pipe.evaluation.protocol`) and the DWI series MRtrix3 tracks on
(:mod:`iqt_pipe.tracking.mrtrix`); the design matrix serves the reference's noise floor
(:func:`iqt_pipe.evaluation.metrics.wls_tensor_variance`).

Conventions. Tensors are ``(..., 6)`` in BEP016 order (D11 D12 D13 D22 D23 D33, mm²/s) in the
frame of the unit gradient directions ``(N, 3)``; b-values in s/mm². One Gaussian compartment
per voxel: ``S = S0·exp(−b gᵀDg)``, so ``log S = log S0 − b gᵀDg`` is linear in the six tensor
components and log S0 (:func:`dti_design`). Magnitude images carry Rician noise: the modulus of
the signal plus complex Gaussian noise of sd σ in each channel (:func:`add_rician_noise`).

numpy only (no torch, no DIPY), so any module may import it.
"""

from __future__ import annotations

import numpy as np


def quadratic_form(directions: np.ndarray) -> np.ndarray:
    """Rows ``(N, 6)`` with ``rows @ d6 = gᵀDg`` for each direction ``g`` and BEP016-ordered
    ``d6`` (the off-diagonal components count twice)."""
    g = np.asarray(directions, dtype=np.float64)
    return np.stack(
        [g[:, 0] ** 2, 2 * g[:, 0] * g[:, 1], 2 * g[:, 0] * g[:, 2], g[:, 1] ** 2, 2 * g[:, 1] * g[:, 2], g[:, 2] ** 2],
        axis=1,
    )


def dti_design(bvals: np.ndarray, bvecs: np.ndarray) -> np.ndarray:
    """Design matrix ``(N, 7)`` of the log-linear DTI model in BEP016 order plus log S0:
    ``log S = log S0 − b gᵀDg``; ``bvecs`` in the frame the tensors are wanted in."""
    b = np.asarray(bvals, dtype=np.float64)[:, None]
    return np.concatenate([-b * quadratic_form(bvecs), np.ones_like(b)], axis=1)


def synthesize_signal(s0, tensors, bvals, directions, clip: float | None = None) -> np.ndarray:
    """Noise-free ``S0·exp(−b gᵀDg)`` (float64) for ``(P,)`` S0 and ``(P, 6)`` tensors in the
    frame of the ``(N, 3)`` directions; returns ``(P, N)``.

    ``clip`` bounds the exponent to ``±clip``: tensors fitted to real data may have negative
    eigenvalues, whose signal would otherwise overflow."""
    tensors = np.asarray(tensors, dtype=np.float64)
    exponent = -(tensors @ quadratic_form(directions).T) * np.asarray(bvals, dtype=np.float64)
    if clip is not None:
        exponent = np.clip(exponent, -clip, clip)
    return np.asarray(s0, dtype=np.float64)[..., None] * np.exp(exponent)


def add_rician_noise(signal: np.ndarray, sigma: float | np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise of sd ``sigma`` (zero signal →
    Rayleigh floor). The real channel's draws come first, then the imaginary one's; they are
    float32 for a float32 signal (half the memory and time for a whole series) and float64
    otherwise, so the same generator state gives the same noise for the same dtype."""
    signal = np.asarray(signal)
    dtype = np.float32 if signal.dtype == np.float32 else np.float64
    scale = np.asarray(sigma, dtype=dtype)
    real = signal + rng.standard_normal(signal.shape, dtype=dtype) * scale
    imag = rng.standard_normal(signal.shape, dtype=dtype) * scale
    return np.sqrt(real**2 + imag**2)
