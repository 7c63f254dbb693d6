"""Super-resolution of a fitted tensor image: world-frame tensors in, world-frame maps out.

Tensor files are in world coordinates (DESIGN §3); the network works in the voxel frame of
its input grid, so tensors are rotated in, predicted, and the mean tensor rotated back out.
Per-component variances depend on the frame, so the uncertainty written to files is the
rotation-invariant Frobenius sd ``sqrt(E‖D − D̂‖²_F)`` (mm²/s) of each part: intrinsic,
parameter and total — the last is the scalar map fit for thresholding.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from iqt_pipe import __version__
from iqt_pipe.dmri.dti import tensors_world_to_voxel
from iqt_pipe.dmri.gradients import GradientTable
from iqt_pipe.dmri.prepare import Preprocessing, card_domain, domain_problems
from iqt_pipe.io import (
    load_tensor_image,  # noqa: F401 - re-exported; it lives in io so tractography needs no torch
    save_json,
    save_nifti,
    save_tensors,
    sidecar_path,
)
from iqt_pipe.models.espcn import IQTNet
from iqt_pipe.sr.inference import Prediction, frobenius_sd
from iqt_pipe.sr.selfcal import predict_self_calibrated

_DIFFUSIVITY = "mm^2/s"
#: Sidecar fields of each map :func:`write_prediction` writes (the BIDS outputs reuse them).
MAP_SIDECARS: dict[str, dict[str, str]] = {
    "fa": {"Description": "FA: mean over samples of the predictive distribution", "Units": "arbitrary"},
    "fasd": {"Description": "FA: sd over samples of the predictive distribution", "Units": "arbitrary"},
    "md": {"Description": "MD: mean over samples of the predictive distribution", "Units": _DIFFUSIVITY},
    "mdsd": {"Description": "MD: sd over samples of the predictive distribution", "Units": _DIFFUSIVITY},
    "sdint": {
        "Description": "Frobenius sd of the intrinsic (heteroscedastic noise model) uncertainty of the tensor",
        "Units": _DIFFUSIVITY,
    },
    "sdpar": {
        "Description": "Frobenius sd of the parameter uncertainty of the tensor: the spread of the "
        "Monte-Carlo passes (variational-dropout weight draws, test-time symmetries) "
        "and of an ensemble's models",
        "Units": _DIFFUSIVITY,
    },
    "sdtot": {
        "Description": "Frobenius sd of the total predictive uncertainty of the tensor (intrinsic "
        "and parameter parts together)",
        "Units": _DIFFUSIVITY,
    },
    "mask": {
        "Description": "Super-resolved brain mask: each native mask voxel's r×r×r block (the network "
        "predicts beyond it, over the mask dilated by its receptive field; farther out the tensor "
        "is the cubic B-spline upsampling of the native one)",
        "Type": "Brain",
    },
}


def super_resolve_tensors(
    world_tensors: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    model: IQTNet | Sequence[IQTNet],
    s0: np.ndarray | None = None,
    series: tuple[np.ndarray, GradientTable] | None = None,
    **predict_kwargs,
) -> Prediction:
    """:func:`~iqt_pipe.sr.selfcal.predict_self_calibrated` (one model or several) on world-frame
    tensors (and the fit's ``s0``, for models with the S0 input): the whole brain ``mask`` and
    its rim (result in the voxel frame of the HR grid, as ``predict_volume`` returns it); with
    ``series``, the DWI series and gradients the tensors were fitted from, self-calibrated."""
    models = [model] if isinstance(model, IQTNet) else list(model)
    inputs = (tensors_world_to_voxel(world_tensors, affine), mask, s0)
    return predict_self_calibrated(models, inputs, affine, series, **predict_kwargs)


def _model_fields(card: dict[str, Any]) -> dict[str, Any]:
    return {
        "Variant": card["variant"],
        "UpsampleFactor": card["upsample"],
        "Target": card.get("target", "hr"),
        "WeightsSHA256": card["weights"]["sha256"],
        "Version": card.get("iqt_pipe_version"),
    }


def write_prediction(
    pred: Prediction,
    prefix: str | os.PathLike,
    metadata: dict[str, Any] | None = None,
    sidecars: bool = True,
    threads: int = 1,
) -> dict[str, Path]:
    """Write a prediction as ``<prefix>_<name>.nii.gz`` files, with JSON sidecars unless
    ``sidecars=False`` (a Nipype data sink writes them from the interface's metadata).

    Names: ``tensor`` (world frame, BEP016), ``fa``, ``fasd``, ``md``, ``mdsd``, ``sdint``,
    ``sdpar``, ``sdtot`` (Frobenius sd, mm²/s; the parts the model predicts) and ``mask``.
    ``threads`` compress each file (:func:`~iqt_pipe.io.write_gzip`). Returns the paths by name.
    """
    meta = {"Software": f"iqt-pipe {__version__}", **(metadata or {})}
    prefix = str(prefix)
    paths = {
        "tensor": save_tensors(
            pred.mean, pred.affine, f"{prefix}_tensor.nii.gz", meta, sidecar=sidecars, threads=threads
        )
    }
    maps = {"fa": pred.fa_mean, "fasd": pred.fa_sd, "md": pred.md_mean, "mdsd": pred.md_sd}
    parts = {"sdint": pred.var_intrinsic, "sdpar": pred.var_parameter}
    maps |= {name: frobenius_sd(var) for name, var in parts.items() if var is not None}
    if maps.keys() & parts.keys():  # E‖D − D̂‖²_F of the total is the sum of the parts'
        maps["sdtot"] = np.sqrt(sum(maps[name] ** 2 for name in parts if name in maps))
    maps["mask"] = pred.mask.astype(np.uint8)
    for name, data in maps.items():
        dtype = np.uint8 if name == "mask" else np.float32
        paths[name] = save_nifti(data, pred.affine, f"{prefix}_{name}.nii.gz", dtype=dtype, threads=threads)
        if sidecars:
            save_json({**MAP_SIDECARS[name], **meta}, sidecar_path(paths[name]))
    return paths


def prediction_metadata(
    card: dict[str, Any] | Sequence[dict[str, Any]],
    pred: Prediction,
    preprocessing: Preprocessing | None = None,
    domain: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Provenance for every output sidecar: the model file (the first of an ensemble's cards,
    every member under ``Ensemble``) and the sampling settings; with
    ``preprocessing`` (what the native series had) whether it matches the model's training
    (``Preprocessing``), with ``domain`` (:func:`iqt_pipe.dmri.prepare.series_domain` of the
    native series) whether the run lies in the model's training domain (``ModelDomain``)."""
    cards = [card] if isinstance(card, dict) else list(card)
    card = cards[0]
    extra: dict[str, Any] = {}
    if len(cards) > 1:
        extra["Ensemble"] = [_model_fields(c) for c in cards]
    if preprocessing is not None:
        trained = Preprocessing.of_model(card)
        extra["Preprocessing"] = {
            "Denoise": preprocessing.denoise,
            "GibbsRemoval": preprocessing.degibbs,
            "ModelTrainedWith": {"Denoise": trained.denoise, "GibbsRemoval": trained.degibbs},
            "MatchesModel": preprocessing.same_steps(trained),
        }
    if domain is not None:
        trained_domain = card_domain(card)
        problems = domain_problems(trained_domain, domain)
        extra["ModelDomain"] = {
            "Inside": None if not trained_domain else not problems,
            "Problems": problems,
            "Run": domain,
            "Training": trained_domain,
        }
    return {
        "Model": _model_fields(card),
        "VarianceScale": pred.info.get("variance_scale", 1.0),
        **({"SelfCalibration": pred.info["self_calibration"]} if "self_calibration" in pred.info else {}),
        "DiagonalCorrelation": pred.info.get("diagonal_correlation", 0.0),
        "MonteCarloSamples": pred.info["mc_samples"],
        "TestTimeSymmetries": pred.info.get("symmetries", 1),
        "ScalarSamples": pred.info["scalar_samples"],
        "Seed": pred.info["seed"],
        "Device": pred.info["device"],
        "Precision": pred.info.get("precision", "float32"),
        "NumericalGuards": pred.info.get("guards", {}),
        **extra,
    }
