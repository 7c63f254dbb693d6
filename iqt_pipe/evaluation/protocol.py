"""Evaluation of super-resolution against an HR reference: the protocol behind ``iqt-eval``.

A *case* is one DWI run made ready for scoring (:func:`prepare_case`):

* ``raw``: the run's own DWI is the HR series. LR synthesis and both fits follow the IQT
  protocol (:func:`iqt_pipe.dmri.degrade.make_pair`): fits cover every voxel with enough positive signal,
  masks only decide what is scored. The reference (the HR fit) is itself noisy; its noise
  floor is the per-voxel WLS covariance (:func:`iqt_pipe.evaluation.metrics.wls_tensor_variance`) from an
  MP-PCA noise map (dipy), reported beside the raw RMSE with the noise-corrected RMSE.
* ``known-truth``: the truth is the tensor field fitted to the MP-PCA-denoised DWI; a
  noise-free HR series is synthesised from it (and its S0) with the run's own gradient table,
  Rician noise at ``snr`` (mean brain b = 0 over σ) is added, and the protocol runs on that
  series while scoring against the noise-free truth. The noisy series' own HR fit and its
  floor are scored too, which validates the noise correction of ``raw`` mode.
* ``lesion``: ``raw`` with a tumour-like lesion (raised isotropic diffusivity and T2 signal,
  smooth edge) written into the HR DWI before degradation; the lesion test asks whether the
  predicted uncertainty separates lesion voxels from normal tissue (ROC AUC).

Every method (interpolation of the LR tensors, a model, an ensemble) predicts the whole HR
grid; :func:`score` compares it with the reference on the interior and exterior of the brain
(:func:`iqt_pipe.evaluation.metrics.region_masks`; both on the HR scan's own brain mask) and, for models,
scores the uncertainty. A model sees the LR series exactly as ``iqt-pipe … participant`` would
see it as its native series (:mod:`iqt_pipe.dmri.prepare`: the preprocessing of the model's card,
the fit, the brain mask, :func:`~iqt_pipe.sr.selfcal.predict_self_calibrated`), so what is scored here is
what the app writes for that series.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from scipy import ndimage

from iqt_pipe.dmri.degrade import crop_to_multiple, make_pair
from iqt_pipe.dmri.dti import scalar_maps
from iqt_pipe.dmri.dwi import load_dwi
from iqt_pipe.dmri.fit import brain_mask, fit_dti
from iqt_pipe.dmri.gradients import GradientTable, select_dti_volumes
from iqt_pipe.dmri.prepare import (
    NONE,
    Preprocessing,
    card_domain,
    domain_problems,
    fit_series,
    preprocess_series,
    series_domain,
    series_manufacturer,
)
from iqt_pipe.dmri.preproc import align_volumes, denoise_mppca_brain
from iqt_pipe.dmri.signal import add_rician_noise, dti_design, synthesize_signal
from iqt_pipe.evaluation import metrics
from iqt_pipe.sr.baselines import ORDERS, interpolate_tensors
from iqt_pipe.sr.inference import Prediction, frobenius_sd
from iqt_pipe.sr.options import DEFAULT_MC_SAMPLES, DEFAULT_PRECISION, DEFAULT_SYMMETRIES, SYMMETRIES
from iqt_pipe.sr.selfcal import predict_self_calibrated

MODES = ("raw", "known-truth", "lesion")
#: Lesion: radius (mm), diffusivities (mm²/s, principal first) and b = 0 signal gain.
LESION_RADIUS_MM = 12.0
LESION_EVALS = (1.9e-3, 1.6e-3, 1.6e-3)
LESION_S0_GAIN = 1.6
#: Tensor errors and RMSEs are reported in this unit (the paper's), MD errors too.
UNIT = 1e-4


@dataclass
class Case:
    """One DWI run ready for scoring; arrays on the (cropped) HR grid, voxel frame."""

    name: str
    subject: str
    mode: str
    r: int
    lr_tensors: np.ndarray  # (x, y, z, 6) LR fit of the whole LR volume (series as acquired)
    lr_mask: np.ndarray  # LR brain mask (normalisation statistics, interior definition)
    lr_s0: np.ndarray  # (x, y, z) the LR fit's S0
    lr_affine: np.ndarray
    lr_dwi: np.ndarray  # (x, y, z, N) the LR series: b = 0 and the DTI shell
    gtab: GradientTable  # its gradient table
    reference: np.ndarray  # (X, Y, Z, 6) what predictions are scored against
    hr_mask: np.ndarray
    interior: np.ndarray
    exterior: np.ndarray
    floor_var: np.ndarray | None = None  # (X, Y, Z, 6) the reference's noise variance (raw, lesion)
    noisy_reference: np.ndarray | None = None  # known-truth: the noisy series' own HR fit
    noisy_floor_var: np.ndarray | None = None
    lesion: np.ndarray | None = None  # (X, Y, Z) lesion weight in [0, 1]
    info: dict = field(default_factory=dict)
    _inputs: dict = field(default_factory=dict, repr=False)

    @cached_property
    def reference_scalars(self) -> tuple[np.ndarray, np.ndarray]:
        """FA and MD of the reference in the HR mask (computed once, shared by every method)."""
        return _scalars(self.reference, self.hr_mask)

    @cached_property
    def domain(self) -> dict[str, Any]:
        """:func:`~iqt_pipe.dmri.prepare.series_domain` of the LR series (the network's input),
        with the scanner vendor of the run's sidecar."""
        return series_domain(self.lr_affine, self.gtab, self.name, series_manufacturer(self.info.get("dwi", "")))

    def network_series(self, preprocessing: Preprocessing = NONE) -> np.ndarray:
        """The LR series as the app's network input is fitted from it for a model trained with
        ``preprocessing`` (:mod:`iqt_pipe.dmri.prepare`); computed once each."""
        key = ("series", preprocessing.denoises, preprocessing.degibbs)
        if key not in self._inputs:
            same = preprocessing.same_steps(NONE)
            self._inputs[key] = self.lr_dwi if same else preprocess_series(self.lr_dwi, preprocessing)
        return self._inputs[key]

    def network_input(self, preprocessing: Preprocessing = NONE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """LR tensors (voxel frame), brain mask and fitted S0 as the app makes them from
        :meth:`network_series`; computed once each."""
        key = (preprocessing.denoises, preprocessing.degibbs)
        if key not in self._inputs:
            if preprocessing.same_steps(NONE):
                self._inputs[key] = (self.lr_tensors, self.lr_mask, self.lr_s0)
            else:
                fit, brain = fit_series(
                    self.network_series(preprocessing),
                    self.lr_affine,
                    self.gtab,
                    source=f"{self.name} (LR, preprocessed)",
                )
                self._inputs[key] = (fit.tensors, brain, fit.s0)
        return self._inputs[key]


def _signal(tensors: np.ndarray, s0: np.ndarray, gtab: GradientTable, affine: np.ndarray) -> np.ndarray:
    """Noise-free float32 DTI signal ``(K, N)`` of ``(K, 6)`` voxel-frame tensors with the run's
    gradients; the exponent is bounded, as fits of real data may have negative eigenvalues."""
    return synthesize_signal(s0, tensors, gtab.bvals, gtab.bvecs_voxel(affine), clip=50.0).astype(np.float32)


def _floor_variance(fit, gtab: GradientTable, affine: np.ndarray, sigma: np.ndarray, mask: np.ndarray) -> np.ndarray:
    design = dti_design(gtab.bvals, gtab.bvecs_voxel(affine))
    out = np.zeros(fit.tensors.shape, np.float32)
    sel = mask & fit.mask
    out[sel] = metrics.wls_tensor_variance(fit.tensors[sel], fit.s0[sel], sigma[sel], design)
    out[~np.isfinite(out)] = 0
    return out


def insert_lesion(
    dwi: np.ndarray,
    gtab: GradientTable,
    affine: np.ndarray,
    fit,
    mask: np.ndarray,
    sigma: float,
    rng: np.random.Generator,
    radius_mm: float = LESION_RADIUS_MM,
) -> tuple[np.ndarray, np.ndarray]:
    """Write a tumour-like lesion into an HR series: a ball of ``radius_mm`` centred in white
    matter (FA > 0.3) at least its radius plus 4 mm inside ``mask``, where the signal blends
    (cosine edge over the outer 40 % of the radius) into that of a nearly isotropic tensor
    with raised diffusivity and b = 0 signal (oedema), with Rician noise of ``sigma``.
    Returns the new series and the lesion weight map (1 in the core)."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    depth = ndimage.distance_transform_edt(mask, sampling=zooms)
    fa = scalar_maps(fit.tensors)["fa"]
    candidates = np.argwhere((depth > radius_mm + 4) & (fa > 0.3) & fit.mask)
    if len(candidates) == 0:
        candidates = np.argwhere(depth >= depth.max() - 1e-6)
    centre = candidates[rng.integers(len(candidates))]
    grid = np.stack(np.meshgrid(*(np.arange(s) for s in mask.shape), indexing="ij"), axis=-1)
    dist = np.sqrt((((grid - centre) * zooms) ** 2).sum(-1))
    edge = 0.6 * radius_mm
    weight = np.clip((radius_mm - dist) / (radius_mm - edge), 0, 1)
    weight = np.where(dist <= edge, 1.0, 0.5 - 0.5 * np.cos(np.pi * weight)).astype(np.float32)
    sel = weight > 0
    # A random orientation for the slight anisotropy.
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    lesion_d = q @ np.diag(LESION_EVALS) @ q.T
    d6 = np.array([lesion_d[0, 0], lesion_d[0, 1], lesion_d[0, 2], lesion_d[1, 1], lesion_d[1, 2], lesion_d[2, 2]])
    s0 = np.median(fit.s0[mask & fit.mask]) * LESION_S0_GAIN
    clean = _signal(np.broadcast_to(d6, (int(sel.sum()), 6)), np.full(int(sel.sum()), s0), gtab, affine)
    out = dwi.copy()
    w = weight[sel][:, None]
    out[sel] = (1 - w) * dwi[sel] + w * add_rician_noise(clean, sigma, rng)
    return out, weight


def prepare_case(
    run,
    r: int = 2,
    mode: str = "raw",
    snr: float | None = None,
    seed: int = 0,
    noise_floor: bool = True,
    processes: int = 1,
    register_volumes: bool = False,
    cache_dir=None,
) -> Case:
    """Load a DWI run (:class:`~iqt_pipe.bids.DWIRun`) and make its :class:`Case`.

    ``register_volumes``: the run's DTI volumes registered to each other first
    (:func:`~iqt_pipe.dmri.preproc.align_volumes`), so that the reference and the LR series
    are those of a motion- and eddy-corrected scan, as an upstream pipeline delivers it (the
    registered series kept in ``cache_dir`` when given, and read back from there).

    ``snr`` (known-truth mode): mean brain b = 0 signal over the added noise's σ; default
    the run's own (its MP-PCA σ), so the synthetic series is as noisy as the scan.
    ``processes``: MP-PCA's (:func:`~iqt_pipe.dmri.preproc.denoise_mppca`; the same result).
    """
    if mode not in MODES:
        raise ValueError(f"unknown evaluation mode {mode!r}; choose from {', '.join(MODES)}")
    series = load_dwi(run.dwi, run.bval, run.bvec)
    keep = select_dti_volumes(series.gtab, str(series.path))
    gtab = series.gtab.subset(keep)
    hr_dwi = series.data[..., keep]
    affine = series.affine
    if register_volumes:  # (the whole series, as iqt-train registers it: one cached result for both)
        hr_dwi, gtab = align_volumes(hr_dwi, gtab, affine, processes=processes, cache_dir=cache_dir)
    hr_dwi = crop_to_multiple(hr_dwi, r)
    zooms = series.zooms
    rng = np.random.default_rng([seed, 7])
    mask = brain_mask(hr_dwi, gtab, zooms)
    info: dict[str, Any] = {
        "dwi": str(series.path),
        "volumes": int(keep.sum()),
        "bvals": sorted({int(round(b)) for b in gtab.bvals}),
        "voxel_size_mm": [float(z) for z in zooms],
        "registered_volumes": bool(register_volumes),
    }
    sigma_map = None
    noise = mode != "raw" or noise_floor
    if noise:
        denoised, sigma_map = denoise_mppca_brain(hr_dwi, mask, processes=processes)
        info["noise_sigma"] = float(np.median(sigma_map[mask]))
        # The scan's own noise (before any synthetic change): correlated between neighbours
        # where the scanner interpolated, which leaves super-resolution less to recover.
        info["noise_neighbour_correlation"] = metrics.neighbour_correlation(hr_dwi - denoised, mask)
    lesion = None
    truth = None
    if mode == "known-truth":
        truth_fit = fit_dti(denoised, affine, gtab, source=f"{series.path} (denoised)")
        clean = np.zeros(hr_dwi.shape, np.float32)
        clean[truth_fit.mask] = _signal(truth_fit.tensors[truth_fit.mask], truth_fit.s0[truth_fit.mask], gtab, affine)
        s0_mean = float(np.mean(truth_fit.s0[mask & truth_fit.mask]))
        snr = float(snr) if snr else s0_mean / info["noise_sigma"]
        sigma = s0_mean / snr
        hr_dwi = add_rician_noise(clean, sigma, rng)
        truth = truth_fit.tensors
        info |= {"snr": float(snr), "synthetic_sigma": sigma}
    elif mode == "lesion":
        fit0 = fit_dti(hr_dwi, affine, gtab, source=str(series.path))
        hr_dwi, lesion = insert_lesion(hr_dwi, gtab, affine, fit0, mask, info["noise_sigma"], rng)
        info["lesion_voxels"] = int((lesion >= 0.5).sum())
    pair = make_pair(hr_dwi, affine, gtab, r=r, source=str(series.path))
    interior, exterior = metrics.region_masks(pair.lr_mask, mask, r)
    case = Case(
        name=run.name,
        subject=run.subject,
        mode=mode,
        r=r,
        lr_tensors=pair.lr.tensors,
        lr_mask=pair.lr_mask,
        lr_s0=pair.lr.s0,
        lr_affine=pair.lr_affine,
        lr_dwi=pair.lr_dwi,
        gtab=gtab,
        reference=pair.hr.tensors if truth is None else truth,
        hr_mask=mask,
        interior=interior,
        exterior=exterior,
        lesion=lesion,
        info=info,
    )
    if mode == "known-truth":
        case.noisy_reference = pair.hr.tensors
        # The floor of the noisy reference, as raw mode would estimate it (MP-PCA on that series).
        _, sigma_noisy = denoise_mppca_brain(hr_dwi, mask, processes=processes)
        case.noisy_floor_var = _floor_variance(pair.hr, gtab, affine, sigma_noisy, mask)
    elif noise_floor:
        case.floor_var = _floor_variance(pair.hr, gtab, affine, sigma_map, mask)
    return case


# --------------------------------------------------------------------------------------- methods


@dataclass
class Method:
    """Something that predicts HR tensors from a case: an interpolation, a model or an ensemble."""

    name: str
    interpolation: str | None = None
    models: list = field(default_factory=list)  # [(IQTNet, card, path)]
    #: Test-time symmetry ensemble of each model (a key of :data:`~iqt_pipe.sr.inference.SYMMETRIES`).
    symmetries: str = DEFAULT_SYMMETRIES
    #: The network's arithmetic (a key of :data:`~iqt_pipe.sr.inference.PRECISIONS`).
    precision: str = DEFAULT_PRECISION
    #: Variances scaled to the errors on the run's series degraded once more (:mod:`iqt_pipe.sr.selfcal`).
    self_calibration: bool = True

    @property
    def is_model(self) -> bool:
        return bool(self.models)


def interpolation_methods(names: Sequence[str]) -> list[Method]:
    unknown = [n for n in names if n not in ORDERS]
    if unknown:
        raise ValueError(f"unknown interpolation {unknown[0]!r}; choose from {', '.join(ORDERS)}")
    return [Method(name=n, interpolation=n) for n in names]


def predict(
    method: Method,
    case: Case,
    *,
    mc_samples: int = DEFAULT_MC_SAMPLES,
    seed: int = 0,
    device="cpu",
    mem_mb: float = 1024,
) -> Prediction | np.ndarray:
    """HR tensors (interpolation of the LR fit) or a :class:`Prediction` (model, ensemble) for
    ``case``: the whole brain predicted from the LR series as the app does
    (:meth:`Case.network_input` with the preprocessing of each model's card, then
    :func:`~iqt_pipe.sr.selfcal.predict_self_calibrated` with the method's test-time symmetries
    and self-calibration; the series of the first model's preprocessing is the one degraded once more)."""
    if method.interpolation:
        return interpolate_tensors(case.lr_tensors, case.r, method.interpolation)
    for model, _, _ in method.models:
        if model.r != case.r:
            raise ValueError(f"{method.name}: the model upsamples by {model.r}, the evaluation by {case.r}")
    preprocessing = [Preprocessing.of_model(card) for _, card, _ in method.models]
    series = (case.network_series(preprocessing[0]), case.gtab) if method.self_calibration else None
    return predict_self_calibrated(
        [model for model, _, _ in method.models],
        [case.network_input(p) for p in preprocessing],
        case.lr_affine,
        series,
        mc_samples=mc_samples,
        seed=seed,
        device=device,
        mem_mb=mem_mb,
        symmetries=SYMMETRIES[method.symmetries],
        precision=method.precision,
    )


# --------------------------------------------------------------------------------------- scoring


def _regions(case: Case) -> dict[str, np.ndarray]:
    return {"interior": case.interior, "exterior": case.exterior, "brain": case.hr_mask}


def _scalars(d6: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fa = np.zeros(mask.shape, np.float32)
    md = np.zeros(mask.shape, np.float32)
    maps = scalar_maps(d6[mask])
    fa[mask], md[mask] = maps["fa"], maps["md"]
    return fa, md


def _written_scalars(result: Prediction | np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FA and MD as a method writes them: a model's FA and MD maps (those the app writes as
    ``param-fa`` and ``param-md``), or those of an interpolation's tensors."""
    if isinstance(result, Prediction):
        return result.fa_mean, result.md_mean
    return _scalars(result, mask)


def reference_scores(case: Case) -> dict[str, Any]:
    """The reference's noise floor per region (×1e-4 mm²/s) and voxel counts."""
    out: dict[str, Any] = {"voxels": {k: int(v.sum()) for k, v in _regions(case).items()}}
    floor = case.floor_var if case.floor_var is not None else case.noisy_floor_var
    if floor is not None:
        out["noise_floor"] = {
            k: float(np.sqrt(np.mean(floor[v].astype(np.float64)))) / UNIT for k, v in _regions(case).items() if v.any()
        }
    return out


def score(case: Case, result: Prediction | np.ndarray, md_threshold: float | None = None) -> dict[str, Any]:
    """Accuracy (and uncertainty, for a :class:`Prediction`) of one method on one case.

    RMSEs are in units of 1e-4 mm²/s (tensor, MD) or plain (FA). ``md_threshold`` is the
    MD-sd threshold (mm²/s) that flags risky voxels, chosen elsewhere (on training subjects).
    """
    pred = result.mean if isinstance(result, Prediction) else result
    regions = _regions(case)
    fa_ref, md_ref = case.reference_scalars
    fa, md = _written_scalars(result, case.hr_mask)
    out: dict[str, Any] = {"tensor_rmse": {}, "md_rmse": {}, "fa_rmse": {}}
    floor = case.floor_var
    if floor is not None:
        out["tensor_rmse_corrected"] = {}
    for key, m in regions.items():
        if not m.any():
            continue
        t = metrics.rmse(pred, case.reference, m) / UNIT
        out["tensor_rmse"][key] = t
        out["md_rmse"][key] = metrics.rmse(md, md_ref, m) / UNIT
        out["fa_rmse"][key] = metrics.rmse(fa, fa_ref, m)
        if floor is not None:
            out["tensor_rmse_corrected"][key] = metrics.noise_corrected_rmse(
                t, math.sqrt(np.mean(floor[m].astype(np.float64))) / UNIT
            )
    if case.noisy_reference is not None:
        # Known truth: the same method scored against the noisy reference, raw and corrected.
        out["tensor_rmse_vs_noisy_reference"] = {}
        out["tensor_rmse_vs_noisy_reference_corrected"] = {}
        for key, m in regions.items():
            if m.any():
                t = metrics.rmse(pred, case.noisy_reference, m) / UNIT
                f = math.sqrt(np.mean(case.noisy_floor_var[m].astype(np.float64))) / UNIT
                out["tensor_rmse_vs_noisy_reference"][key] = t
                out["tensor_rmse_vs_noisy_reference_corrected"][key] = metrics.noise_corrected_rmse(t, f)
    if isinstance(result, Prediction):  # the share of the scored brain that the model predicted
        out["predicted_fraction"] = float(result.predicted[case.hr_mask].mean()) if case.hr_mask.any() else math.nan
    if isinstance(result, Prediction) and (result.var_intrinsic is not None or result.var_parameter is not None):
        out["uncertainty"] = uncertainty_scores(case, result, md, md_ref, md_threshold)
    return out


def model_domain(method: Method, case: Case) -> dict[str, Any]:
    """Whether the case lies in the training domain of the method's models (every member's
    problems, :func:`~iqt_pipe.dmri.prepare.domain_problems`), and its scanner vendor."""
    problems = [p for _, card, _ in method.models for p in domain_problems(card_domain(card), case.domain)]
    return {
        "problems": list(dict.fromkeys(problems)),
        "inside": not problems,
        "manufacturer": case.domain.get("manufacturer"),
    }


def uncertainty_scores(
    case: Case, pred: Prediction, md: np.ndarray, md_ref: np.ndarray, md_threshold: float | None
) -> dict[str, Any]:
    """Spearman(sd, |error|), interval coverage, the risky-voxel test and, with a lesion, its AUC."""
    var = pred.var_total
    err = pred.mean.astype(np.float64) - case.reference
    sd = frobenius_sd(var)
    abs_err = metrics.frobenius(err)
    out: dict[str, Any] = {"spearman": {}, "coverage": {}, "md_coverage": {}, "error_sd_ratio": {}}
    for key, m in _regions(case).items():
        if m.any():
            out["spearman"][key] = metrics.spearman(sd[m], abs_err[m])
            out["coverage"][key] = {f"{p:g}": c for p, c in metrics.interval_coverage(err[m], np.sqrt(var[m])).items()}
            out["md_coverage"][key] = {
                f"{p:g}": c for p, c in metrics.interval_coverage(md[m] - md_ref[m], pred.md_sd[m]).items()
            }
            # RMS of the Frobenius error over RMS of the predicted Frobenius sd: 1 when calibrated.
            mean_var = max(float(np.mean(sd[m].astype(np.float64) ** 2)), 1e-300)
            out["error_sd_ratio"][key] = float(np.sqrt(np.mean(abs_err[m] ** 2) / mean_var))
    # RMS over the brain of each part's Frobenius sd (1e-4 mm²/s): does the parameter part rise
    # where the model is out of its domain?
    m = case.hr_mask
    out["sd_rms"] = {
        name: float(np.sqrt(np.mean(frobenius_sd(part)[m].astype(np.float64) ** 2))) / UNIT
        for name, part in (("intrinsic", pred.var_intrinsic), ("parameter", pred.var_parameter), ("total", var))
        if part is not None and m.any()
    }
    levels, cov = metrics.calibration_curve(err[case.hr_mask], np.sqrt(var[case.hr_mask]))
    out["calibration_curve"] = {"nominal": levels.tolist(), "empirical": cov.tolist()}
    out["variance_scale_95"] = metrics.variance_scale(err[case.hr_mask], np.sqrt(var[case.hr_mask]))
    out["sd_ratio_quantiles"] = metrics.sd_ratio_quantiles(err[case.hr_mask], np.sqrt(var[case.hr_mask])).tolist()
    if "self_calibration" in pred.info:
        out["self_calibration"] = pred.info["self_calibration"]
    risky = np.abs(md - md_ref) > metrics.RISKY_MD_ERROR
    m = case.hr_mask
    out["risky"] = {"fraction": float(risky[m].mean()), "auc": metrics.roc_auc(pred.md_sd[m], risky[m])}
    if md_threshold is not None:
        out["risky"] |= {"threshold": md_threshold, **metrics.detection(pred.md_sd[m] > md_threshold, risky[m])}
    if case.lesion is not None:
        lesion = case.lesion >= 0.5
        normal = m & (case.lesion == 0)
        sel = (lesion & m) | normal
        out["lesion"] = {
            "auc": metrics.roc_auc(sd[sel], lesion[sel]),
            "voxels": int((lesion & m).sum()),
            "rmse": metrics.rmse(pred.mean, case.reference, lesion & m) / UNIT,
        }
        if pred.var_intrinsic is not None and pred.var_parameter is not None:  # which map flags it
            for part, var_part in (("intrinsic", pred.var_intrinsic), ("parameter", pred.var_parameter)):
                out["lesion"][f"auc_{part}"] = metrics.roc_auc(frobenius_sd(var_part)[sel], lesion[sel])
    return out


def risky_voxels(case: Case, pred: Prediction) -> tuple[np.ndarray, np.ndarray]:
    """Over the HR mask: the predicted MD sd and whether the voxel is risky (MD error
    > 1.5e-4 mm²/s); :func:`metrics.best_f1_threshold` of several cases' pooled values is
    the risky-voxel threshold."""
    _, md_ref = case.reference_scalars
    return pred.md_sd[case.hr_mask], np.abs(pred.md_mean - md_ref)[case.hr_mask] > metrics.RISKY_MD_ERROR


def add_ratios(method_scores: dict[str, dict], reference_method: str = "cubic") -> None:
    """Add ``<metric>_ratio`` (to ``reference_method``) beside each RMSE, in place."""
    ref = method_scores.get(reference_method)
    if ref is None:
        return
    for s in method_scores.values():
        for metric in ("tensor_rmse", "tensor_rmse_corrected", "md_rmse", "fa_rmse"):
            if metric in s and metric in ref:
                s[f"{metric}_ratio"] = {
                    k: v / ref[metric][k] if ref[metric].get(k) else math.nan for k, v in s[metric].items()
                }


# --------------------------------------------------------------------------------------- driver


def _case_progress(items, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="run", disable=True if quiet else None, leave=False)


@dataclass
class Figures:
    """What the plots need (kept out of the JSON): per (run, mode, method)."""

    scatter: dict = field(default_factory=dict)  # (sd, |error|) samples, mm²/s
    calibration: dict = field(default_factory=dict)  # (nominal, empirical)
    slices: dict = field(default_factory=dict)  # name → 2-D arrays: reference MD, errors, sd


def _mid_slice(case: Case) -> tuple[int, int]:
    """Axis and index of the HR slice with the most brain voxels, or through the lesion."""
    axis = int(np.argmin(case.hr_mask.shape))
    region = case.hr_mask if case.lesion is None else case.lesion
    counts = region.sum(axis=tuple(a for a in range(3) if a != axis))
    return axis, int(np.argmax(counts))


def _take(a: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(a, index, axis=axis)


def evaluate(
    test_runs: Sequence,
    methods: Sequence[Method],
    *,
    r: int = 2,
    modes: Sequence[str] = ("raw",),
    snr: float | None = None,
    seed: int = 0,
    mc_samples: int = DEFAULT_MC_SAMPLES,
    device="cpu",
    mem_mb: float = 1024,
    calibration_runs: Sequence = (),
    quiet: bool = False,
    figures: Figures | None = None,
    scatter_points: int = 20000,
    processes: int = 1,
    register_volumes: bool = False,
    cache_dir=None,
) -> dict[str, Any]:
    """Score ``methods`` on ``test_runs`` in each of ``modes``; see the module docstring.

    For every model method, the risky-voxel threshold is chosen on ``calibration_runs``
    (training subjects; raw mode) when given. Returns JSON-ready results: one record per
    (run, mode) with the reference's floor and each method's scores, ratios to cubic spline.
    ``processes``: MP-PCA's, for the noise floor, and the registration's; ``register_volumes``
    and ``cache_dir``: see :func:`prepare_case`.
    """
    registration = {"register_volumes": register_volumes, "cache_dir": cache_dir}
    thresholds: dict[str, float] = {}
    model_methods = [m for m in methods if m.is_model]
    if calibration_runs and model_methods:
        collected: dict[str, list] = {m.name: [] for m in model_methods}
        for run in _case_progress(calibration_runs, "thresholds (training runs)", quiet):
            case = prepare_case(run, r=r, mode="raw", seed=seed, noise_floor=False, processes=processes, **registration)
            for m in model_methods:
                pred = predict(m, case, mc_samples=mc_samples, seed=seed, device=device, mem_mb=mem_mb)
                collected[m.name].append(risky_voxels(case, pred))
        thresholds = {
            name: metrics.best_f1_threshold(
                np.concatenate([s for s, _ in pairs]), np.concatenate([t for _, t in pairs])
            )
            for name, pairs in collected.items()
        }
    records = []
    jobs = [(run, mode) for run in test_runs for mode in modes]
    for run, mode in _case_progress(jobs, "evaluation", quiet):
        case = prepare_case(run, r=r, mode=mode, snr=snr, seed=seed, processes=processes, **registration)
        rec: dict[str, Any] = {
            "run": case.name,
            "subject": case.subject,
            "mode": mode,
            "info": case.info,
            **reference_scores(case),
            "methods": {},
        }
        axis, index = _mid_slice(case)
        key = (case.name, mode)
        if figures is not None:
            _, md_ref = case.reference_scalars
            figures.slices[key] = {
                "axis": axis,
                "reference MD": _take(md_ref, axis, index),
                "mask": _take(case.hr_mask, axis, index),
            }
        for m in methods:
            result = predict(m, case, mc_samples=mc_samples, seed=seed, device=device, mem_mb=mem_mb)
            rec["methods"][m.name] = score(case, result, thresholds.get(m.name))
            if m.is_model:
                rec["methods"][m.name]["domain"] = model_domain(m, case)
            if figures is not None:
                mean = result.mean if isinstance(result, Prediction) else result
                err = metrics.frobenius(mean.astype(np.float64) - case.reference)
                figures.slices[key][f"{m.name} |error|"] = _take(np.where(case.hr_mask, err, 0), axis, index)
                if isinstance(result, Prediction) and "uncertainty" in rec["methods"][m.name]:
                    sd = result.sd_frobenius
                    figures.slices[key][f"{m.name} sd"] = _take(np.where(case.hr_mask, sd, 0), axis, index)
                    sel = np.flatnonzero(case.hr_mask)
                    rng = np.random.default_rng(seed)
                    sel = rng.choice(sel, min(scatter_points, sel.size), replace=False)
                    figures.scatter[key + (m.name,)] = (sd.reshape(-1)[sel], err.reshape(-1)[sel])
                    curve = rec["methods"][m.name]["uncertainty"]["calibration_curve"]
                    figures.calibration[key + (m.name,)] = (curve["nominal"], curve["empirical"])
        add_ratios(rec["methods"])
        records.append(rec)
    return {"records": records, "thresholds": thresholds}


def _cross_calibrate(records: Sequence[dict], out: dict[str, Any]) -> None:
    """What storing a variance scale would do, without circularity: each run gets the median
    95 % scale of the *other* subjects' runs (same mode and method) and its coverage at that
    scale (``coverage0.95_loso.brain``); the scales go to the slot's ``calibration_loso``."""
    groups: dict[tuple[str, str], list[tuple[dict, dict]]] = {}
    for rec in records:
        for name, s in rec["methods"].items():
            if s.get("uncertainty", {}).get("sd_ratio_quantiles") is not None:
                groups.setdefault((rec["mode"], name), []).append((rec, s["uncertainty"]))
    for (mode, name), items in groups.items():
        scales = metrics.leave_one_group_out(
            [u["variance_scale_95"] for _, u in items], [rec["subject"] for rec, _ in items]
        )
        slot = out[mode][name]
        slot["calibration_loso"] = []
        for (rec, u), scale in zip(items, scales):
            if not math.isfinite(scale):
                continue
            coverage = metrics.coverage_at_scale(u["sd_ratio_quantiles"], scale)
            slot["values"].setdefault("coverage0.95_loso.brain", []).append(coverage)
            slot["calibration_loso"].append({"run": rec["run"], "scale": scale, "coverage0.95": coverage})


#: The project's goals for a model on held-out runs (issues [SR path] and [SR model]), each
#: counted over runs: (issue, goal, metric key, low, high); a run meets it when low ≤ value ≤ high.
GOALS = (
    ("SR path", "interior tensor RMSE ≤ 0.87 × cubic", "tensor_rmse_ratio.interior", -math.inf, 0.87),
    ("SR path", "exterior tensor RMSE ≤ 0.97 × cubic", "tensor_rmse_ratio.exterior", -math.inf, 0.97),
    ("SR path", "FA RMSE ≤ 0.82 × cubic", "fa_rmse_ratio.brain", -math.inf, 0.82),
    ("SR path", "95 % coverage in [0.88, 0.98]", "coverage0.95.brain", 0.88, 0.98),
    ("SR path", "MD 95 % coverage in [0.88, 0.98]", "md_coverage0.95.brain", 0.88, 0.98),
    ("SR path", "RMS error / sd in [0.8, 1.25]", "error_sd_ratio.brain", 0.8, 1.25),
    ("SR model", "interior tensor RMSE ≤ 0.83 × cubic", "tensor_rmse_ratio.interior", -math.inf, 0.83),
    ("SR model", "interior tensor RMSE ≤ 0.95 × cubic", "tensor_rmse_ratio.interior", -math.inf, 0.95),
    ("SR model", "exterior tensor RMSE ≤ 0.95 × cubic", "tensor_rmse_ratio.exterior", -math.inf, 0.95),
    ("SR model", "FA RMSE ≤ 0.80 × cubic", "fa_rmse_ratio.brain", -math.inf, 0.80),
    ("SR model", "95 % coverage in [0.90, 0.98]", "coverage0.95.brain", 0.90, 0.98),
    ("SR model", "MD 95 % coverage in [0.90, 0.98]", "md_coverage0.95.brain", 0.90, 0.98),
    ("SR model", "Spearman(sd, |error|) ≥ 0.5", "spearman.brain", 0.5, math.inf),
    ("SR model", "risky-voxel AUC ≥ 0.90", "risky.auc", 0.90, math.inf),
    ("SR model", "lesion AUC ≥ 0.90", "lesion.auc", 0.90, math.inf),
)
#: Goals on the mean over runs: (issue, goal, metric key, high).
POOLED_GOALS = (
    ("SR model", "interior tensor RMSE ≤ 0.85 × cubic, mean over runs", "tensor_rmse_ratio.interior", 0.85),
)


def goals(values: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """Each goal of :data:`GOALS` and :data:`POOLED_GOALS` whose metric ``values`` (per run)
    hold: ``{"runs_met", "runs"}`` (a run without a value does not meet it), or ``{"met"}``
    for a pooled goal; keyed ``"[issue] goal"``."""
    out: dict[str, dict[str, Any]] = {}
    for issue, goal, key, low, high in GOALS:
        v = np.asarray(values.get(key, []), float)
        if np.isfinite(v).any():
            out[f"[{issue}] {goal}"] = {"runs_met": int(np.sum((v >= low) & (v <= high))), "runs": int(v.size)}
    for issue, goal, key, high in POOLED_GOALS:
        v = np.asarray(values.get(key, []), float)
        if np.isfinite(v).any():
            out[f"[{issue}] {goal}"] = {"met": bool(np.nanmean(v) <= high)}
    return out


def summarise(records: Sequence[dict]) -> dict[str, Any]:
    """Per (mode, method): mean and range over runs of every RMSE, ratio and uncertainty
    score, and on how many runs each goal holds (:func:`goals`)."""
    out: dict[str, Any] = {}
    for rec in records:
        for name, s in rec["methods"].items():
            slot = out.setdefault(rec["mode"], {}).setdefault(name, {"runs": 0, "values": {}})
            slot["runs"] += 1
            for metric, by_region in s.items():
                if metric == "predicted_fraction":
                    slot["values"].setdefault("predicted_fraction.brain", []).append(by_region)
                elif isinstance(by_region, dict) and metric not in ("uncertainty", "domain"):
                    for region, v in by_region.items():
                        slot["values"].setdefault(f"{metric}.{region}", []).append(v)
            u = s.get("uncertainty")
            if u:
                flat = {f"spearman.{k}": v for k, v in u["spearman"].items()}
                flat |= {f"coverage{p}.{k}": c for k, cov in u["coverage"].items() for p, c in cov.items()}
                flat |= {
                    f"md_coverage{p}.{k}": c for k, cov in u.get("md_coverage", {}).items() for p, c in cov.items()
                }
                flat |= {f"error_sd_ratio.{k}": v for k, v in u.get("error_sd_ratio", {}).items()}
                flat |= {f"sd_rms.{k}": v for k, v in u.get("sd_rms", {}).items()}
                flat |= {f"risky.{k}": v for k, v in u["risky"].items() if isinstance(v, float)}
                if "lesion" in u:
                    flat |= {f"lesion.{k}": v for k, v in u["lesion"].items() if k.startswith("auc")}
                for k, v in flat.items():
                    slot["values"].setdefault(k, []).append(v)
    _cross_calibrate(records, out)
    for mode in out.values():
        for slot in mode.values():
            slot["goals"] = goals(slot["values"])
            slot["values"] = {
                k: {"mean": float(np.nanmean(v)), "min": float(np.nanmin(v)), "max": float(np.nanmax(v))}
                for k, v in slot["values"].items()
                if np.isfinite(v).any()
            }
    for (mode, name), found in out_of_domain(records).items():
        out[mode][name]["domain"] = found
    return out


def out_of_domain(records: Sequence[dict]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (mode, model method): does the uncertainty rise with the error from run to run, and
    on runs outside the model's training domain (another vendor, voxel size, b-value)?
    Spearman over runs of the RMS parameter (and total) sd against the tensor RMSE over the
    brain, and the mean of each inside and outside the domain."""
    rows: dict[tuple[str, str], list] = {}
    for rec in records:
        for name, s in rec["methods"].items():
            sd, dom = s.get("uncertainty", {}).get("sd_rms"), s.get("domain")
            if sd and dom and "brain" in s.get("tensor_rmse", {}):
                rows.setdefault((rec["mode"], name), []).append(
                    (
                        dom["inside"],
                        s["tensor_rmse"]["brain"],
                        s.get("tensor_rmse_ratio", {}).get("brain", math.nan),
                        sd.get("parameter", math.nan),
                        sd.get("total", math.nan),
                    )
                )
    out = {}
    for key, runs in rows.items():
        inside, error, ratio, par, tot = (np.array(col, dtype=float) for col in zip(*runs))
        inside = inside.astype(bool)

        def mean(values, where):
            return float(np.nanmean(values[where])) if where.any() else None

        out[key] = {
            "runs_outside": int((~inside).sum()),
            "spearman_parameter_sd_error": metrics.spearman(par, error) if len(runs) > 2 else None,
            "spearman_total_sd_error": metrics.spearman(tot, error) if len(runs) > 2 else None,
            **{
                f"{name}_{side}": mean(values, where)
                for name, values in (("error_ratio", ratio), ("parameter_sd", par), ("total_sd", tot))
                for side, where in (("inside", inside), ("outside", ~inside))
            },
        }
    return out
