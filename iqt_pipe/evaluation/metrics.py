"""Evaluation metrics: accuracy split by brain region, the reference's noise floor, and
whether predicted uncertainty means something (rank correlation, interval coverage,
detection of risky voxels and lesions).

Conventions. Tensor arrays are ``(..., 6)`` in BEP016 order and one frame (the voxel frame of
the HR grid in :mod:`iqt_pipe.evaluation.protocol`); a tensor RMSE is over voxels *and* the 6 unique
components, as in Tanno et al. Per-voxel error and uncertainty *magnitudes* are Frobenius
norms (off-diagonals counted twice), which do not depend on the frame.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage, stats

#: Nominal levels of the central predictive intervals reported by default.
COVERAGE_LEVELS = (0.5, 0.8, 0.95)
#: The paper's "risky voxel": MD error above this (mm²/s).
RISKY_MD_ERROR = 1.5e-4
#: Largest variance of log S: that of log |pure complex Gaussian noise| (Rayleigh), π²/24.
MAX_LOG_SIGNAL_VAR = math.pi**2 / 24
#: Frobenius weights of the BEP016 components.
_FROBENIUS = np.array([1, 2, 2, 1, 2, 1], dtype=np.float64)


def region_masks(lr_mask: np.ndarray, hr_mask: np.ndarray, r: int, radius: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Interior and exterior HR voxels (Tanno et al.): an HR voxel of ``hr_mask`` is *interior*
    when the ``(2·radius + 1)³`` LR neighbourhood of its parent LR voxel (the network's
    receptive field for radius 2) lies inside ``lr_mask`` (outside the volume counts as
    outside); every other ``hr_mask`` voxel is *exterior*."""
    lr_mask = np.asarray(lr_mask, dtype=bool)
    hr_mask = np.asarray(hr_mask, dtype=bool)
    if hr_mask.shape != tuple(s * r for s in lr_mask.shape):
        raise ValueError(f"HR mask {hr_mask.shape} is not {r}× the LR mask {lr_mask.shape}")
    core = ndimage.binary_erosion(lr_mask, np.ones((2 * radius + 1,) * 3, bool), border_value=0)
    interior = hr_mask & np.repeat(np.repeat(np.repeat(core, r, 0), r, 1), r, 2)
    return interior, hr_mask & ~interior


def rmse(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """Root mean square of ``pred − ref`` over the voxels of ``mask`` and all trailing
    components; NaN for an empty mask."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return math.nan
    d = pred[mask].astype(np.float64) - ref[mask].astype(np.float64)
    return float(np.sqrt(np.mean(d**2)))


def noise_corrected_rmse(raw: float, floor: float) -> float:
    """``sqrt(max(raw² − floor², 0))``: the RMSE against the noise-free truth if the
    reference's own error (RMS ``floor``) is independent of the prediction's."""
    return float(math.sqrt(max(raw**2 - floor**2, 0.0)))


def neighbour_correlation(noise: np.ndarray, mask: np.ndarray) -> list[float]:
    """Pearson correlation of ``noise (X, Y, Z[, N])`` between face neighbours along each
    voxel axis, over the pairs with both voxels in ``mask`` (all volumes pooled).

    Independent noise gives ≈ 0. A scan reconstructed with interpolation along an axis
    (zero-filled k-space, a resampling or smoothing filter) gives up to 0.5–0.7 there: its
    grid is finer than the detail it holds, so super-resolving it from a block-averaged copy
    has less to recover than its voxel size suggests. NaN for an axis without pairs."""
    noise = np.asarray(noise)
    if noise.ndim == 3:
        noise = noise[..., None]
    mask = np.asarray(mask, dtype=bool)
    out = []
    for axis in range(3):
        head = [slice(None)] * 3
        tail = [slice(None)] * 3
        head[axis], tail[axis] = slice(0, -1), slice(1, None)
        both = mask[tuple(head)] & mask[tuple(tail)]
        if both.sum() < 2:
            out.append(math.nan)
            continue
        a = noise[tuple(head)][both].ravel().astype(np.float64)
        b = noise[tuple(tail)][both].ravel().astype(np.float64)
        a, b = a - a.mean(), b - b.mean()
        denom = math.sqrt(float(a @ a) * float(b @ b))
        out.append(float(a @ b) / denom if denom > 0 else math.nan)
    return out


def frobenius(d6: np.ndarray) -> np.ndarray:
    """Frobenius norm of each tensor ``(..., 6)``."""
    return np.sqrt(np.sum(np.asarray(d6, dtype=np.float64) ** 2 * _FROBENIUS, axis=-1))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (ties get mean ranks); NaN when either is constant."""
    x, y = np.ravel(x), np.ravel(y)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def _sd_ratio(err: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """|err| / sd elementwise, in float64 (a zero sd, e.g. a voxel without a prediction, gives
    a huge ratio instead of a float32 division by zero)."""
    return np.abs(np.ravel(err).astype(np.float64)) / np.maximum(np.ravel(sd).astype(np.float64), 1e-300)


def interval_coverage(err: np.ndarray, sd: np.ndarray, levels: Iterable[float] = COVERAGE_LEVELS) -> dict[float, float]:
    """Empirical coverage of the central Gaussian predictive intervals: for each nominal
    level p, the fraction of errors with ``|err| ≤ z_{(1+p)/2}·sd`` (elementwise)."""
    ratio = _sd_ratio(err, sd)
    return {float(p): float(np.mean(ratio <= stats.norm.ppf(0.5 + p / 2))) for p in levels}


def calibration_curve(err: np.ndarray, sd: np.ndarray, n: int = 19) -> tuple[np.ndarray, np.ndarray]:
    """Nominal levels 0.05 … 0.95 (``n`` of them) and the empirical coverage at each."""
    levels = np.linspace(0.05, 0.95, n)
    cov = interval_coverage(err, sd, levels)
    return levels, np.array([cov[float(p)] for p in levels])


def variance_scale(err: np.ndarray, sd: np.ndarray, level: float = 0.95) -> float:
    """The factor ``s`` on variances that makes the ``level`` interval's empirical coverage
    exactly ``level``: ``s = (quantile_level(|err|/sd) / z)²``."""
    ratio = _sd_ratio(err, sd)
    if ratio.size == 0:
        raise ValueError("no errors to calibrate on")
    return float((np.quantile(ratio, level) / stats.norm.ppf(0.5 + level / 2)) ** 2)


def sd_ratio_quantiles(err: np.ndarray, sd: np.ndarray, n: int = 401) -> np.ndarray:
    """Quantiles (probabilities 0, 1/(n−1), …, 1) of |err|/sd: enough to tell the coverage of
    any interval ±z·√s·sd afterwards (:func:`coverage_at_scale`) without keeping the voxels."""
    ratio = _sd_ratio(err, sd)
    return np.quantile(ratio, np.linspace(0, 1, n))


def coverage_at_scale(quantiles: np.ndarray, scale: float, level: float = 0.95) -> float:
    """Empirical coverage of the ``level`` interval once the variances are multiplied by
    ``scale``, from :func:`sd_ratio_quantiles` (linear between the stored quantiles)."""
    q = np.asarray(quantiles, dtype=np.float64)
    half_width = stats.norm.ppf(0.5 + level / 2) * math.sqrt(scale)
    return float(np.interp(half_width, q, np.linspace(0, 1, q.size), left=0.0, right=1.0))


def leave_one_group_out(values: Sequence[float], groups: Sequence[str]) -> list[float]:
    """For each item, the median of the values of the other groups (NaN without one): e.g.
    the variance scale a subject would get from calibration on the other subjects."""
    values, groups = np.asarray(values, dtype=np.float64), np.asarray(groups)
    return [float(np.median(values[groups != g])) if np.any(groups != g) else float("nan") for g in groups]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for boolean ``labels`` (the probability that a
    positive outscores a negative, ties counting half); NaN without both classes."""
    scores = np.ravel(scores).astype(np.float64)
    labels = np.ravel(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = stats.rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def detection(flagged: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 of boolean ``flagged`` against boolean ``truth``
    (NaN where undefined)."""
    flagged = np.ravel(flagged).astype(bool)
    truth = np.ravel(truth).astype(bool)
    tp = int(np.sum(flagged & truth))
    precision = tp / flagged.sum() if flagged.any() else math.nan
    recall = tp / truth.sum() if truth.any() else math.nan
    f1 = (
        2 * precision * recall / (precision + recall)
        if precision == precision and recall == recall and precision + recall > 0
        else math.nan
    )
    return {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "flagged": int(flagged.sum()),
        "positives": int(truth.sum()),
        "n": int(truth.size),
    }


def best_f1_threshold(scores: np.ndarray, truth: np.ndarray) -> float:
    """The threshold t maximising the F1 of ``scores > t`` against boolean ``truth``
    (the midpoint between the two scores it separates, or just below the lowest score
    when flagging everything is best); NaN without positives."""
    scores = np.ravel(scores).astype(np.float64)
    truth = np.ravel(truth).astype(bool)
    if not truth.any():
        return math.nan
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], truth[order]
    tp = np.cumsum(t)
    k = np.arange(1, s.size + 1)
    # Only cut between distinct scores: flag the first k (highest) voxels.
    valid = np.r_[s[1:] < s[:-1], True]
    f1 = np.where(valid, 2 * tp / (k + truth.sum()), -1.0)
    best = int(np.argmax(f1))
    return float((s[best] + s[best + 1]) / 2 if best + 1 < s.size else np.nextafter(s[best], -np.inf))


def wls_tensor_variance(
    tensors: np.ndarray, s0: np.ndarray, sigma: np.ndarray, design: np.ndarray, chunk: int = 65536
) -> np.ndarray:
    """Per-voxel variance of the 6 WLS tensor estimates (BEP016 order, (mm²/s)²) by the
    delta method: the fit is weighted least squares of log S with weights S², and
    var(log S_i) ≈ σ²/S_i², capped at :data:`MAX_LOG_SIGNAL_VAR` (pure noise) so a few
    near-zero-signal measurements do not dominate. Covariance =
    A⁻¹ Xᵀ W V W X A⁻¹ with A = Xᵀ W X, W = diag(S²), V = diag(var log S).

    ``tensors`` ``(K, 6)``, ``s0`` ``(K,)`` and ``sigma`` ``(K,)`` are the fit and the noise
    sd of the voxels to evaluate; ``design`` comes from :func:`iqt_pipe.dmri.signal.dti_design`.
    S_i is the fitted signal. Voxels without a usable fit (s0 ≤ 0) get NaN.
    """
    tensors = np.asarray(tensors, dtype=np.float64).reshape(-1, 6)
    s0 = np.asarray(s0, dtype=np.float64).ravel()
    sigma = np.asarray(sigma, dtype=np.float64).ravel()
    out = np.full((tensors.shape[0], 6), np.nan)
    for start in range(0, tensors.shape[0], chunk):
        sl = slice(start, start + chunk)
        ok = s0[sl] > 0
        if not ok.any():
            continue
        params = np.concatenate([tensors[sl][ok], np.log(s0[sl][ok])[:, None]], axis=1)  # (k, 7)
        log_s = np.clip(params @ design.T, -700, 700)  # (k, N)
        w = np.exp(2 * log_s)
        w = w / w.max(axis=1, keepdims=True)  # the estimator is invariant to a weight scale
        v = np.minimum((sigma[sl][ok, None] ** 2) * np.exp(-2 * log_s), MAX_LOG_SIGNAL_VAR)
        a = np.einsum("kn,ni,nj->kij", w, design, design)
        b = np.einsum("kn,ni,nj->kij", w * w * v, design, design)
        a_inv = np.linalg.pinv(a)
        cov = a_inv @ b @ a_inv
        block = out[sl]
        block[ok] = np.diagonal(cov, axis1=1, axis2=2)[:, :6]
        out[sl] = block
    return out
