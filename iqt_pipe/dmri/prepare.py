"""What the network sees of a DWI series: one path for training, evaluation and the app.

``iqt-train``'s patch library, ``iqt-eval`` and ``iqt-pipe … participant`` turn a series into
the network's input in the same steps, so that what is measured is what users get:

1. :func:`preprocess_series`, as the model card's :class:`Preprocessing` says: MP-PCA
   denoising, then Gibbs-ringing removal, of the series as reconstructed by the scanner
   (DIPY here; the app's workflow runs the same steps as Nipype nodes). Training applies
   them to the HR series *before* its LR series is made, the app to the native series (the
   network's input grid), ``iqt-eval`` to its LR series — the series the app would be given.
2. :func:`fit_series`: DTI by weighted least squares on every voxel with enough positive
   signal (:func:`iqt_pipe.dmri.fit.valid_signal_mask`), and the brain mask (``median_otsu``) of the series.
3. :func:`iqt_pipe.sr.inference.predict_brain`: channel statistics from the brain mask, and the
   prediction of the brain dilated by the receptive field.

A model card records the preprocessing of its training series (``training.preprocessing``;
cards without it were trained on series as acquired) and the range of its training inputs
(``training.domain``: LR voxel size, DTI shell, directions), which :func:`domain_problems`
compares with a run's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nb
import numpy as np

from iqt_pipe.dmri.fit import DTIFit, brain_mask, fit_dti
from iqt_pipe.dmri.gradients import GradientTable, select_dti_volumes

#: ``--denoise`` values: no denoising, or MP-PCA with DIPY or MRtrix3 (``auto``: MRtrix3 when on PATH).
#: MP-PCA denoising: ``auto`` (MRtrix3 when on PATH, else DIPY), a tool, or ``none`` (the one list of
#: ``iqt-pipe --denoise``, ``iqt-train --denoise``, model cards and the preprocessing workflow).
DENOISE = ("auto", "mrtrix", "dipy", "none")


@dataclass(frozen=True)
class Preprocessing:
    """The steps before the DTI fit: MP-PCA denoising (``denoise``: the tool, or ``"none"``)
    and Gibbs-ringing removal."""

    denoise: str = "none"
    degibbs: bool = False

    def __post_init__(self):
        if self.denoise not in DENOISE:
            raise ValueError(f"denoise must be one of {', '.join(DENOISE)}, got {self.denoise!r}")

    @property
    def denoises(self) -> bool:
        return self.denoise != "none"

    def to_card(self) -> dict[str, Any]:
        return {"denoise": self.denoise, "degibbs": bool(self.degibbs)}

    @classmethod
    def of_model(cls, card: dict[str, Any]) -> Preprocessing:
        """What a model was trained with (its card's ``training.preprocessing``; none for
        cards written before it was recorded: those models saw series as acquired)."""
        given = (card.get("training") or {}).get("preprocessing") or {}
        return cls(denoise=given.get("denoise", "none"), degibbs=bool(given.get("degibbs", False)))

    def same_steps(self, other: Preprocessing) -> bool:
        """Whether both run the same steps (MP-PCA by any tool counts as the same step)."""
        return (self.denoises, self.degibbs) == (other.denoises, other.degibbs)

    def describe(self) -> str:
        steps = ([f"denoising ({self.denoise})"] if self.denoises else []) + (
            ["Gibbs-ringing removal"] if self.degibbs else []
        )
        return " then ".join(steps) if steps else "no denoising, no Gibbs-ringing removal"


#: The series as acquired: what models trained before preprocessing was recorded saw.
NONE = Preprocessing()


def preprocess_series(dwi: np.ndarray, preprocessing: Preprocessing, slice_axis: int = 2) -> np.ndarray:
    """``dwi`` after the steps of ``preprocessing`` (DIPY's MP-PCA over the whole volume,
    then Gibbs removal across ``slice_axis``), as the app's DIPY nodes run them."""
    from iqt_pipe.dmri.preproc import denoise_mppca, remove_gibbs

    if preprocessing.denoises:
        dwi = denoise_mppca(dwi)[0]
    if preprocessing.degibbs:
        dwi = remove_gibbs(dwi, slice_axis=slice_axis)
    return dwi


def fit_series(
    dwi: np.ndarray,
    affine: np.ndarray,
    gtab: GradientTable,
    mask: np.ndarray | None = None,
    source: str = "DWI series",
    threads: int = 1,
) -> tuple[DTIFit, np.ndarray]:
    """The DTI fit of every voxel with enough positive signal (voxel frame; on ``threads`` threads)
    and the brain mask: ``mask`` when given, else ``median_otsu``'s on the mean b = 0 (see
    :mod:`iqt_pipe.dmri.fit`)."""
    if mask is None:
        mask = brain_mask(dwi, gtab, nb.affines.voxel_sizes(affine))
    return fit_dti(dwi, affine, gtab, source=source, threads=threads), np.asarray(mask, dtype=bool)


# ------------------------------------------------------------------------ domain of validity


def series_domain(
    affine: np.ndarray, gtab: GradientTable, source: str = "DWI series", manufacturer: str | None = None
) -> dict[str, Any]:
    """The facts of a network input that a model's training covered or not: voxel size (mm,
    per axis), the DTI shell's b-value and its number of directions, and the scanner's
    manufacturer when known (:func:`series_manufacturer`)."""
    keep = select_dti_volumes(gtab, source)
    shell = keep & ~gtab.b0_mask
    domain = {
        "voxel_size_mm": [float(z) for z in nb.affines.voxel_sizes(affine)],
        "bvalue": float(np.median(gtab.bvals[shell])),
        "directions": int(shell.sum()),
    }
    return domain | ({"manufacturer": manufacturer} if manufacturer else {})


def series_manufacturer(path: str | os.PathLike) -> str | None:
    """``Manufacturer`` from the JSON sidecar of a DWI run (named by any of its files: the
    image, .bval or .bvec); None without a readable sidecar or field."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".bval", ".bvec"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    try:
        value = json.loads((Path(path).parent / f"{name}.json").read_text()).get("Manufacturer")
    except (OSError, ValueError, AttributeError):
        return None
    return value.strip() if isinstance(value, str) and value.strip() else None


def training_domain(domains: Iterable[dict[str, Any]], r: int) -> dict[str, Any]:
    """``training.domain`` of a model card from its training runs' :func:`series_domain`
    (HR series): the range of the LR voxel sizes (the network's input, r × the HR size),
    of the b-values and of the numbers of directions."""
    domains = list(domains)
    sizes = [z * r for d in domains for z in d["voxel_size_mm"]]
    b = [d["bvalue"] for d in domains]
    n = [d["directions"] for d in domains]
    vendors = sorted({d["manufacturer"] for d in domains if d.get("manufacturer")})
    return {
        "lr_voxel_size_mm": [round(min(sizes), 3), round(max(sizes), 3)],
        "bvalue": [round(min(b)), round(max(b))],
        "directions": [min(n), max(n)],
    } | ({"manufacturers": vendors} if vendors else {})


def card_domain(card: dict[str, Any]) -> dict[str, Any] | None:
    """A model card's ``training.domain``. A card from before the field (or before its
    ``manufacturers``) gets it from its training runs where their files are at hand."""
    training = card.get("training") or {}
    domain = training.get("domain")
    if domain and "manufacturers" in domain:
        return domain
    files = tuple(
        (run.get("dwi", ""), run.get("bval", ""), run.get("bvec", "")) for run in training.get("dwi_runs", [])
    )
    if domain:
        vendors = sorted({v for dwi, _, _ in files if (v := series_manufacturer(dwi))})
        return domain | ({"manufacturers": vendors} if vendors else {})
    return _domain_of_runs(files, int(card.get("upsample", 2)))


@lru_cache(maxsize=16)
def _domain_of_runs(files: tuple[tuple[str, str, str], ...], r: int) -> dict[str, Any] | None:
    """:func:`training_domain` of DWI runs (image, bval, bvec) read from disk; None when any is
    missing or unreadable."""
    from iqt_pipe.dmri.gradients import read_gradients

    domains = []
    for dwi, bval, bvec in files:
        try:
            gtab = read_gradients(bval, bvec)
            domains.append(series_domain(nb.load(dwi).affine, gtab, dwi, series_manufacturer(dwi)))
        except Exception:  # noqa: BLE001 - moved, unreadable or refused: no domain rather than a wrong one
            return None
    return training_domain(domains, r) if domains else None


#: How far outside the training range a voxel size (10 %) or b-value (20 %) may lie before
#: a run counts as outside the model's domain; directions count from the training range.
VOXEL_SIZE_TOLERANCE, BVALUE_TOLERANCE = 0.10, 0.20


def domain_problems(domain: dict[str, Any] | None, run: dict[str, Any]) -> list[str]:
    """How a network input (:func:`series_domain` of the native series) lies outside a
    model's ``training.domain``; empty inside it or when the card records no domain."""
    if not domain:
        return []
    problems = []
    lo, hi = domain["lr_voxel_size_mm"]
    sizes = run["voxel_size_mm"]
    if min(sizes) < lo / (1 + VOXEL_SIZE_TOLERANCE) or max(sizes) > hi * (1 + VOXEL_SIZE_TOLERANCE):
        problems.append(
            f"voxel size {'×'.join(f'{z:.3g}' for z in sizes)} mm outside the training inputs' {lo:.3g}–{hi:.3g} mm"
        )
    lo, hi = domain["bvalue"]
    if not lo / (1 + BVALUE_TOLERANCE) <= run["bvalue"] <= hi * (1 + BVALUE_TOLERANCE):
        problems.append(f"b = {run['bvalue']:.0f} s/mm² outside the training shells' {lo}–{hi}")
    lo, hi = domain["directions"]
    if not lo <= run["directions"] <= hi:
        problems.append(f"{run['directions']} directions outside the training runs' {lo}–{hi}")
    vendors = domain.get("manufacturers")
    if vendors and run.get("manufacturer") and run["manufacturer"].casefold() not in {v.casefold() for v in vendors}:
        problems.append(f"scanner vendor {run['manufacturer']} not among the training runs' ({', '.join(vendors)})")
    return problems
