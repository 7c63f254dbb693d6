"""Self-calibration: the predictive variance scaled to what the model's errors are on the run itself.

A model's uncertainty is calibrated on its training scans; a run whose noise or texture differs
(another vendor's reconstruction filter, another coil) gets intervals that are too wide or too
narrow, by a factor that is roughly the same over the whole run. The run holds the means to
measure that factor: degraded once more by the IQT protocol (its series block-averaged over r³
voxels and fitted again), it is a pair of the kind the model was trained on, one scale coarser,
whose HR side is the run's own fit. The model super-resolves the coarser series with the same
settings, and the RMS of its Frobenius error over the RMS of its predicted Frobenius sd in the
brain (1 when calibrated) is measured; the run's predictive variances are multiplied by its square.

On the 13 held-out runs of the developers' two folds, that ratio one scale coarser followed the
ratio at the run's own scale with correlation 0.88 (README, "Self-calibration").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from iqt_pipe.dmri.degrade import crop_to_multiple, degrade_dwi
from iqt_pipe.dmri.gradients import GradientTable
from iqt_pipe.sr.inference import Prediction, frobenius_sd, predict_ensemble, scale_variances

#: Fewest brain voxels of the run (the coarser pair's HR side) the ratio is measured on; below
#: that (a tiny or cropped field of view) the model's card calibration is kept alone.
MIN_VOXELS = 500
#: The error / sd ratio is clipped to this range before it scales the variances: a ratio
#: outside says the run is not what the model knows (the warning says so), not a scale to trust.
RATIO_LIMITS = (0.5, 2.0)


@dataclass
class SelfCalibration:
    """What the run's own coarser pair said: the RMS error / sd ratio there (``None`` when not
    measured), the variance scale applied (1 when none), the brain voxels scored and, when the
    ratio was not used or was clipped, why."""

    ratio: float | None
    variance_scale: float
    voxels: int
    note: str | None = None

    def metadata(self) -> dict[str, Any]:
        """The sidecars' ``SelfCalibration`` field."""
        return {
            "ErrorSdRatio": self.ratio,
            "VarianceScale": self.variance_scale,
            "Voxels": self.voxels,
            **({"Note": self.note} if self.note else {}),
        }


def measure(
    models,
    dwi: np.ndarray,
    gtab: GradientTable,
    affine: np.ndarray,
    tensors: np.ndarray,
    brain: np.ndarray,
    **predict_kwargs,
) -> SelfCalibration:
    """The run's :class:`SelfCalibration`: ``dwi`` (the series the network's input was fitted
    on, voxel frame ``tensors`` that fit, ``brain`` its mask) block-averaged over r³ voxels
    and fitted as in training (:func:`~iqt_pipe.dmri.prepare.fit_series`), super-resolved by
    :func:`~iqt_pipe.sr.inference.predict_ensemble` with ``predict_kwargs`` (the run's own
    settings; its ``threads`` fit too), and scored against ``tensors`` in ``brain``."""
    from iqt_pipe.dmri.prepare import fit_series

    r = models[0].r
    brain = crop_to_multiple(np.asarray(brain, dtype=bool), r)
    voxels = int(brain.sum())
    if min(brain.shape) < 2 * r or voxels < MIN_VOXELS:
        return SelfCalibration(None, 1.0, voxels, f"fewer than {MIN_VOXELS} brain voxels: not measured")
    coarse_dwi, coarse_affine = degrade_dwi(crop_to_multiple(dwi, r), affine, r)
    threads = predict_kwargs.get("threads") or 1
    fit, coarse_brain = fit_series(
        coarse_dwi, coarse_affine, gtab, source="the run's series, block-averaged", threads=threads
    )
    if not coarse_brain.any():
        return SelfCalibration(None, 1.0, voxels, "no brain left in the block-averaged series: not measured")
    # Only the tensor variances count: one model skips the FA/MD samples (an ensemble's
    # mixture needs them), which leave the variances as they are.
    kwargs = {**predict_kwargs, "scalar_samples": 0} if len(models) == 1 else predict_kwargs
    pred = predict_ensemble(models, (fit.tensors, coarse_brain, fit.s0), coarse_affine, **kwargs)
    err = pred.mean[brain].astype(np.float64) - crop_to_multiple(tensors, r)[brain]
    mean_var = float(np.mean(frobenius_sd(pred.var_total[brain].astype(np.float64)) ** 2))
    if not mean_var > 0:
        return SelfCalibration(None, 1.0, voxels, "the model predicts no variance: not measured")
    ratio = float(np.sqrt(np.mean(frobenius_sd(err**2) ** 2) / mean_var))
    used = float(np.clip(ratio, *RATIO_LIMITS))
    note = None
    if used != ratio:
        note = f"error / sd ratio {ratio:.2f} outside {RATIO_LIMITS[0]:g}-{RATIO_LIMITS[1]:g}: clipped"
    return SelfCalibration(ratio, used**2, voxels, note)


def apply(pred: Prediction, calibration: SelfCalibration) -> Prediction:
    """``pred`` with every predictive variance times the calibration's scale and the FA/MD sd
    times its square root (to first order, as the card's calibration), in place; the
    calibration goes to ``pred.info["self_calibration"]``."""
    parts = {"var_int": pred.var_intrinsic, "m2": pred.var_parameter, "fa_sd": pred.fa_sd, "md_sd": pred.md_sd}
    scale_variances({k: v for k, v in parts.items() if v is not None}, calibration.variance_scale)
    pred.info["self_calibration"] = calibration.metadata()
    return pred


def predict_self_calibrated(
    models,
    inputs,
    lr_affine: np.ndarray,
    series: tuple[np.ndarray, GradientTable] | None = None,
    **predict_kwargs,
) -> Prediction:
    """:func:`~iqt_pipe.sr.inference.predict_ensemble` of ``inputs``, then, with ``series``
    (the DWI series and gradients the first input was fitted from), its variances
    self-calibrated (:func:`measure`, :func:`apply`). What the app writes and ``iqt-eval``
    scores."""
    pred = predict_ensemble(models, inputs, lr_affine, **predict_kwargs)
    if series is None:
        return pred
    first = inputs[0] if isinstance(inputs, list) else inputs
    calibration = measure(models, *series, lr_affine, first[0], first[1], **predict_kwargs)
    return apply(pred, calibration)
