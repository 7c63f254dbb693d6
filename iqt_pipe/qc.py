"""Quality control of super-resolved runs: per-run metrics and a robust group table.

Per run (:func:`run_qc_metrics`) the predicted uncertainty and the SR maps are summarised in
white matter and in the brain; across runs (:func:`group_table`) each key metric gets a
robust z-score and runs far from the group are flagged. All values are plain numbers.

White matter. Native-resolution voxels with FA > 0.3 (:data:`WM_FA_THRESHOLD`) inside the
brain mask eroded once by the 6-connected (face-neighbour) element, the volume border
counting as outside. Erosion drops the outer layer where partial volume with CSF and mask
errors inflate FA. The HR white matter is the native one expanded by blocks — native voxel
p covers HR voxels r·p … r·p + r − 1 on each axis, as the SR grid is built
(:func:`iqt_pipe.dmri.degrade.upsample_affine`) — and kept inside the HR brain mask.

Uncertainty threshold. ``sd_total`` is the Frobenius sd of the predicted tensor,
sqrt(E‖D − D̂‖²_F) in mm²/s. The default threshold, :data:`DEFAULT_SD_THRESHOLD` = 1.5e-4 mm²/s,
is the MD error above which Tanno et al. call a voxel "risky" (DESIGN §1). It fits this
map because an MD error is a projection of the tensor error: |ΔMD| = |tr ΔD|/3 ≤ ‖ΔD‖_F/√3.
A voxel whose Frobenius sd stays under 1.5e-4 therefore has an MD sd under 0.87e-4, so a
risky MD error would be a > 1.7σ event there. Voxels above the threshold are the ones where
such an error becomes plausible. In tissue units, 1.5e-4 mm²/s is ~20 % of brain MD (0.7e-3) and
~9 % of the Frobenius norm of a WM tensor (~1.7e-3). The threshold only means something in
mm²/s: a run whose native brain median MD lies outside :data:`MD_PLAUSIBLE` (m²/s or µm²/ms
maps, say) is refused instead of giving a meaningless fraction.

Outliers. For each metric in :data:`OUTLIER_METRICS` the robust z-score is
z = (x − median)/(1.4826·MAD) across runs; a run is an outlier when any |z| > 3.5
(Iglewicz & Hoaglin 1993). When MAD = 0 (more than half the runs share one value) the scale
falls back to 1.2533·mean|x − median|, the mean-absolute-deviation form of the same score.
The scale is floored at 1e-6·|median|, so differences at floating-point level never count.
With fewer than 3 runs a median is no reference: z-scores are left empty (None, ``n/a`` in
the TSV) and no run is flagged.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from iqt_pipe.io import InputError, format_number, load_nifti, save_json, save_text, write_tsv

#: FA above which a native voxel inside the eroded brain mask counts as white matter.
WM_FA_THRESHOLD = 0.3
#: Default sd_total threshold (mm²/s): the paper's "risky voxel" MD error (see the module docstring).
DEFAULT_SD_THRESHOLD = 1.5e-4
#: Range (mm²/s) the native brain median MD must lie in for the maps to be in mm²/s.
MD_PLAUSIBLE = (1e-5, 1e-2)
#: Iglewicz–Hoaglin cut-off for |robust z|.
OUTLIER_Z = 3.5
MAD_TO_SD = 1.4826
MEANAD_TO_SD = 1.2533
#: Metrics that get a robust z-score (column ``<metric>_z``) and can flag a run.
OUTLIER_METRICS = ("sdtot_wm_median", "sdtot_frac_above", "fa_wm_median_ratio", "md_wm_median_ratio")
#: Neighbour correlation of a run's noise above which it counts as correlated: the scanner
#: interpolated the images (zero-filled k-space, a smoothing filter), so its grid holds less detail
#: than its voxel size suggests. Measured on ds-realdwi (residual of DIPY's MP-PCA, brain): the
#: Canon/Toshiba runs 0.5-0.65 along x, where the bundled model ties with cubic spline; the other
#: five vendors 0.08-0.25 on every axis (:func:`iqt_pipe.dmri.preproc.noise_neighbour_correlation`).
CORRELATED_NOISE = 0.4
#: What correlated noise means for super-resolution.
INTERPOLATED = (
    "the scanner interpolated this series, so its grid holds less detail than its voxel size "
    "suggests and super-resolution gains little over cubic-spline interpolation"
)
#: Native tensor sidecar field with that correlation (written by the participant level).
NOISE_CORRELATION_FIELD = "NoiseNeighbourCorrelation"
#: BIDS entities (pybids names, labels without prefix) in column order; short keys for run names.
#: ``space`` comes from a preprocessed input (e.g. QSIPrep's ``space-ACPC``) and names its runs too.
ENTITIES = {
    "subject": "sub",
    "session": "ses",
    "acquisition": "acq",
    "reconstruction": "rec",
    "direction": "dir",
    "run": "run",
    "part": "part",
    "space": "space",
}


def _metric_columns() -> dict[str, str]:
    cols = {
        "upsample": "upsampling factor r (HR voxel = native voxel / r per axis)",
        "sd_threshold": "sd_total threshold behind sdtot_frac_above (mm^2/s)",
        "n_brain_native": "native brain-mask voxels",
        "n_brain_hr": "HR brain-mask voxels",
        "n_wm_native": f"native WM voxels (FA > {WM_FA_THRESHOLD} in the eroded brain mask)",
        "n_wm_hr": "HR WM voxels (native WM expanded to r^3 blocks, inside the HR brain mask)",
        "sdtot_wm_mean": "mean of sd_total (Frobenius sd of the predicted tensor) in HR WM (mm^2/s)",
        "sdtot_wm_median": "median of sd_total in HR WM (mm^2/s)",
        "sdtot_wm_p95": "95th percentile of sd_total in HR WM (mm^2/s)",
        "sdtot_frac_above": "fraction of HR brain voxels with sd_total > sd_threshold",
    }
    for m, unit in (("fa", ""), ("md", " (mm^2/s)")):
        for region, where in (("wm", "WM"), ("brain", "the brain mask")):
            for stat in ("mean", "median"):
                cols[f"{m}_{region}_{stat}_native"] = f"native {m.upper()} {stat} in {where}{unit}"
                cols[f"{m}_{region}_{stat}_sr"] = f"SR {m.upper()} {stat} in {where} (HR grid){unit}"
                cols[f"{m}_{region}_{stat}_ratio"] = f"SR / native {m.upper()} {stat} in {where}"
    return cols


#: Per-run metric columns, in TSV order, with their meaning.
METRIC_COLUMNS: dict[str, str] = _metric_columns()
#: Columns :func:`group_table` adds, with their meaning.
GROUP_COLUMNS: dict[str, str] = {
    **{
        f"{m}_z": f"robust z of {m}: (x - median) / (1.4826 MAD) across runs; n/a with < 3 runs"
        for m in OUTLIER_METRICS
    },
    "outlier": f"true when any |z| > {OUTLIER_Z} (Iglewicz-Hoaglin)",
    "outlier_metrics": "the metrics with |z| > 3.5, comma-separated",
}
#: Columns from the participant level's sidecars (n/a for outputs of versions without them).
NOISE_COLUMNS: dict[str, str] = {
    "noise_corr_max": "largest neighbour correlation of the noise over the voxel axes (MP-PCA residual in the "
    f"brain); above {CORRELATED_NOISE} the scanner interpolated: little for super-resolution to recover",
}
#: Every known column after the BIDS entities, in TSV order, with its meaning.
COLUMN_MEANINGS: dict[str, str] = {**METRIC_COLUMNS, **GROUP_COLUMNS, **NOISE_COLUMNS}


def noise_correlation(sidecar: dict[str, Any]) -> list[float] | None:
    """The noise's neighbour correlation along voxel axes i, j, k recorded in a native tensor
    sidecar (:data:`NOISE_CORRELATION_FIELD`), or None (outputs of an older version)."""
    values = (sidecar.get(NOISE_CORRELATION_FIELD) or {}).get("Values")
    return [float("nan") if v is None else float(v) for v in values] if values else None


def noise_correlation_warning(correlation: Sequence[float] | None, name: str) -> str | None:
    """One line when the noise correlates between neighbours along any axis above
    :data:`CORRELATED_NOISE`, else None."""
    high = [
        f"{axis} {value:.2f}"
        for axis, value in zip("ijk", correlation or ())
        if math.isfinite(value) and value > CORRELATED_NOISE
    ]
    if not high:
        return None
    return (
        f"{name}: noise correlated between neighbouring voxels ({', '.join(high)} > {CORRELATED_NOISE}): {INTERPOLATED}"
    )


def model_domain_warning(sr_sidecar: dict[str, Any], name: str) -> str | None:
    """One line when a super-resolved run's sidecar says it lies outside the model's training
    domain (``ModelDomain``, :func:`iqt_pipe.dmri.prepare.domain_problems`), else None."""
    problems = (sr_sidecar.get("ModelDomain") or {}).get("Problems")
    if not problems:
        return None
    return (
        f"{name}: outside the model's training domain ({'; '.join(problems)}): the super-resolved maps "
        "and their uncertainty are extrapolated; check them against the native ones, or train a model on "
        "such scans (iqt-train)"
    )


#: The self-calibration's RMS error / sd ratio (:mod:`iqt_pipe.sr.selfcal`) outside which a run
#: is warned about: the bundled recipe's fold models gave 0.84–1.23 on their 13 held-out runs.
SELF_CALIBRATION_RANGE = (0.67, 1.5)
#: What a ratio outside that range means.
RECALIBRATED = (
    "the scan differs from the training scans in noise or texture; the uncertainty maps are rescaled, "
    "but check the super-resolved maps against the native ones"
)


def self_calibration_warning(sr_sidecar: dict[str, Any], name: str) -> str | None:
    """One line when a super-resolved run's self-calibration (``SelfCalibration``) found the
    model's errors far from its predicted sd (outside :data:`SELF_CALIBRATION_RANGE`), else None."""
    ratio = (sr_sidecar.get("SelfCalibration") or {}).get("ErrorSdRatio")
    low, high = SELF_CALIBRATION_RANGE
    if ratio is None or low <= ratio <= high:
        return None
    return (
        f"{name}: on this scan degraded once more the model's RMS error was {ratio:.2f}× its predicted sd "
        f"(outside {low:g}–{high:g}): {RECALIBRATED}"
    )


def expand_blocks(native: np.ndarray, r: int) -> np.ndarray:
    """Native voxel p → HR voxels r·p … r·p + r − 1 on each axis."""
    return np.asarray(native).repeat(r, 0).repeat(r, 1).repeat(r, 2)


def white_matter_mask(native_fa: np.ndarray, native_mask: np.ndarray) -> np.ndarray:
    """FA > 0.3 inside the brain mask eroded once (6-connected, border outside)."""
    from scipy import ndimage

    brain = np.asarray(native_mask) > 0
    eroded = ndimage.binary_erosion(brain, ndimage.generate_binary_structure(3, 1), border_value=0)
    return eroded & (np.asarray(native_fa) > WM_FA_THRESHOLD)


def _summary(name: str, values: np.ndarray, label: str) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        bad = int(np.sum(~np.isfinite(values)))
        raise InputError(f"{name}: {label} has {bad} non-finite voxels; check the map that produced it")
    return float(values.mean()), float(np.median(values))


def _ratio(name: str, sr: float, native: float, label: str) -> float:
    if native == 0:
        raise InputError(f"{name}: native {label} is 0, so SR/native is undefined; check the native maps")
    return float(sr / native)


def run_qc_metrics(
    native_fa: np.ndarray,
    native_md: np.ndarray,
    native_mask: np.ndarray,
    sr_fa: np.ndarray,
    sr_md: np.ndarray,
    sr_sd_total: np.ndarray,
    sr_mask: np.ndarray,
    r: int,
    threshold: float | None = None,
    *,
    name: str = "run",
) -> dict[str, Any]:
    """QC metrics of one super-resolved DWI run (columns: :data:`METRIC_COLUMNS`).

    Native maps share one grid; SR maps share the HR grid, r times finer on each axis.
    ``threshold`` defaults to :data:`DEFAULT_SD_THRESHOLD` (mm²/s); ``name`` labels errors.
    Raises :class:`~iqt_pipe.io.InputError` (a ValueError) for an empty WM or brain, non-finite
    values inside the masks, or maps not in mm²/s.
    """
    r = int(r)
    if r < 1:
        raise ValueError(f"{name}: upsampling factor must be a positive integer, got {r}")
    threshold = DEFAULT_SD_THRESHOLD if threshold is None else float(threshold)
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"{name}: sd threshold must be a positive number in mm^2/s, got {threshold}")
    shape = np.shape(native_mask)
    for label, arr in (("native FA", native_fa), ("native MD", native_md)):
        if np.shape(arr) != shape or len(shape) != 3:
            raise ValueError(f"{name}: {label} shape {np.shape(arr)} differs from the native mask's {shape}")
    hr_shape = tuple(s * r for s in shape)
    for label, arr in (("SR FA", sr_fa), ("SR MD", sr_md), ("SR sd_total", sr_sd_total), ("SR mask", sr_mask)):
        if np.shape(arr) != hr_shape:
            raise ValueError(f"{name}: {label} shape {np.shape(arr)} is not r={r} × the native {shape}")

    brain = np.asarray(native_mask) > 0
    hr_brain = np.asarray(sr_mask) > 0
    if not brain.any() or not hr_brain.any():
        which = "native" if not brain.any() else "HR"
        raise InputError(f"{name}: the {which} brain mask is empty; check the masking step")
    wm = white_matter_mask(native_fa, brain)
    if not wm.any():
        raise InputError(
            f"{name}: no white-matter voxels (FA > {WM_FA_THRESHOLD} inside the eroded brain mask); "
            "check the brain mask and the FA map"
        )
    hr_wm = expand_blocks(wm, r) & hr_brain
    if not hr_wm.any():
        raise InputError(
            f"{name}: the native white matter falls outside the HR brain mask; use the masks of the same run"
        )

    sd_wm = np.asarray(sr_sd_total, dtype=np.float64)[hr_wm]
    sd_brain = np.asarray(sr_sd_total, dtype=np.float64)[hr_brain]
    sd_mean, sd_median = _summary(name, sd_wm, "sd_total in WM")
    _summary(name, sd_brain, "sd_total in the brain")
    out: dict[str, Any] = {
        "upsample": r,
        "sd_threshold": threshold,
        "n_brain_native": int(brain.sum()),
        "n_brain_hr": int(hr_brain.sum()),
        "n_wm_native": int(wm.sum()),
        "n_wm_hr": int(hr_wm.sum()),
        "sdtot_wm_mean": sd_mean,
        "sdtot_wm_median": sd_median,
        "sdtot_wm_p95": float(np.percentile(sd_wm, 95)),
        "sdtot_frac_above": float(np.count_nonzero(sd_brain > threshold) / sd_brain.size),
    }
    maps = {"fa": (native_fa, sr_fa), "md": (native_md, sr_md)}
    for m, (nat, sr) in maps.items():
        for region, (nmask, hmask) in (("wm", (wm, hr_wm)), ("brain", (brain, hr_brain))):
            label = f"{m.upper()} in {'WM' if region == 'wm' else 'the brain'}"
            n_stats = _summary(name, np.asarray(nat)[nmask], f"native {label}")
            s_stats = _summary(name, np.asarray(sr)[hmask], f"SR {label}")
            for stat, nv, sv in zip(("mean", "median"), n_stats, s_stats):
                out[f"{m}_{region}_{stat}_native"] = nv
                out[f"{m}_{region}_{stat}_sr"] = sv
                out[f"{m}_{region}_{stat}_ratio"] = _ratio(name, sv, nv, f"{label} {stat}")
    md_median = out["md_brain_median_native"]
    lo, hi = MD_PLAUSIBLE
    if not lo <= md_median <= hi:
        raise InputError(
            f"{name}: native brain median MD is {md_median:.3g}, not in mm^2/s (expected {lo:g}..{hi:g}); "
            "convert the maps to mm^2/s"
        )
    return {k: out[k] for k in METRIC_COLUMNS}


def _image(path: str | os.PathLike, label: str) -> tuple[np.ndarray, np.ndarray]:
    data, affine, _ = load_nifti(path)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: the {label} must be a 3-D image, got shape {data.shape}")
    return data, affine


def metrics_from_files(
    native_fa: str | os.PathLike,
    native_md: str | os.PathLike,
    native_mask: str | os.PathLike,
    sr_fa: str | os.PathLike,
    sr_md: str | os.PathLike,
    sr_sd_total: str | os.PathLike,
    sr_mask: str | os.PathLike,
    r: int,
    threshold: float | None = None,
    *,
    name: str | None = None,
) -> dict[str, Any]:
    """:func:`run_qc_metrics` on NIfTI files; grids are checked (native maps on one grid, SR maps
    on its r-fold block upsampling, affines included). ``name`` defaults to the SR FA file's name."""
    from iqt_pipe.dmri.degrade import upsample_affine

    native = {"native FA": native_fa, "native MD": native_md, "native mask": native_mask}
    sr = {"SR FA": sr_fa, "SR MD": sr_md, "SR sd_total": sr_sd_total, "SR mask": sr_mask}
    for label, path in {**native, **sr}.items():
        if not Path(path).exists():
            raise InputError(f"{path}: {label} file not found; run the super-resolution step first")
    arrays = {label: _image(path, label) for label, path in {**native, **sr}.items()}

    def check(group: dict, shape: tuple, affine: np.ndarray, ref: str) -> None:
        for label, path in group.items():
            data, aff = arrays[label]
            if data.shape != shape or not np.allclose(aff, affine, atol=1e-3):
                raise InputError(
                    f"{path}: the {label} grid {data.shape} differs from the {ref}; use maps of the same run"
                )

    mask_shape = arrays["native mask"][0].shape
    mask_affine = arrays["native mask"][1]
    check(native, mask_shape, mask_affine, f"native mask's {mask_shape}")
    hr_shape = tuple(s * int(r) for s in mask_shape)
    check(sr, hr_shape, upsample_affine(mask_affine, int(r)), f"r={r} block upsampling of the native grid {hr_shape}")
    return run_qc_metrics(
        *(arrays[label][0] for label in native),
        *(arrays[label][0] for label in sr),
        r,
        threshold,
        name=name or Path(sr_fa).name,
    )


def run_label(row: dict[str, Any]) -> str:
    """``sub-01_ses-a_run-1`` from a row's BIDS entities (``?`` when it has none)."""
    parts = [f"{short}-{row[key]}" for key, short in ENTITIES.items() if row.get(key) not in (None, "")]
    return "_".join(parts) or "?"


def _robust_z(values: np.ndarray) -> np.ndarray:
    median = np.median(values)
    dev = values - median
    scale = MAD_TO_SD * np.median(np.abs(dev))
    if scale == 0:
        scale = MEANAD_TO_SD * np.mean(np.abs(dev))
    scale = max(scale, 1e-6 * abs(median))
    if scale == 0:  # every value equal to a median of 0
        return np.zeros_like(values)
    return dev / scale


def group_table(rows: list[dict[str, Any]], metrics: Sequence[str] = OUTLIER_METRICS) -> list[dict[str, Any]]:
    """Copies of ``rows`` with ``<metric>_z`` for each of ``metrics``, ``outlier`` and
    ``outlier_metrics`` (see the module docstring for the rule, MAD = 0 and n < 3)."""
    out = [dict(row) for row in rows]
    for metric in metrics:
        for row in out:
            value = row.get(metric)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{run_label(row)}: metric {metric} is missing or not a finite number ({value!r})")
    flagged: list[list[str]] = [[] for _ in out]
    for metric in metrics:
        if len(out) < 3:
            for row in out:
                row[f"{metric}_z"] = None
            continue
        z = _robust_z(np.array([row[metric] for row in out], dtype=np.float64))
        for i, row in enumerate(out):
            row[f"{metric}_z"] = float(z[i])
            if abs(z[i]) > OUTLIER_Z:
                flagged[i].append(metric)
    for row, names in zip(out, flagged):
        row["outlier"] = bool(names)
        row["outlier_metrics"] = ",".join(names)
    return out


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    present = {k for row in rows for k in row}
    known = [*ENTITIES, *COLUMN_MEANINGS]
    extra = [k for row in rows for k in row if k not in known]
    return [k for k in known if k in present] + list(dict.fromkeys(extra))


def _sort_key(row: dict[str, Any]) -> tuple:
    return tuple(str(row.get(key, "")) for key in ENTITIES)


def _in_mm2s(column: str) -> bool:
    if column == "sd_threshold":
        return True
    return column.startswith(("sdtot_wm_", "md_")) and not column.endswith(("_ratio", "_z"))


def summary_text(rows: list[dict[str, Any]], metrics: Iterable[str] = OUTLIER_METRICS) -> str:
    """Plain-text summary of a :func:`group_table`: runs, outliers and why, group medians."""
    metrics = list(metrics)
    lines = [f"iqt-pipe group QC: {len(rows)} run{'s' if len(rows) != 1 else ''}"]
    if len(rows) < 3:
        lines.append("Outliers: not assessed (robust z-scores need at least 3 runs)")
    else:
        outliers = [row for row in rows if row.get("outlier")]
        lines.append(f"Outliers (robust |z| > {OUTLIER_Z}): {len(outliers)}")
        for row in outliers:
            why = ", ".join(f"{m} z={row[f'{m}_z']:+.1f}" for m in row["outlier_metrics"].split(",") if m)
            lines.append(f"  {run_label(row)}: {why}")
    correlated = [
        row
        for row in rows
        if isinstance(row.get("noise_corr_max"), (int, float)) and row["noise_corr_max"] > CORRELATED_NOISE
    ]
    if correlated:
        lines.append(
            f"Correlated noise (neighbour correlation > {CORRELATED_NOISE}; interpolated by the scanner, "
            f"little for super-resolution to recover): {len(correlated)}"
        )
        lines += [f"  {run_label(row)}: {row['noise_corr_max']:.2f}" for row in correlated]
    if rows:
        lines.append("Medians across runs:")
        for metric in dict.fromkeys([*metrics, "sdtot_wm_p95", "n_wm_native"]):
            values = [row[metric] for row in rows if isinstance(row.get(metric), (int, float))]
            if values:
                unit = " mm^2/s" if _in_mm2s(metric) else ""
                lines.append(f"  {metric}: {format_number(float(np.median(values)), '.4g')}{unit}")
    return "\n".join(lines) + "\n"


def write_group_qc(
    rows: list[dict[str, Any]],
    tsv_path: str | os.PathLike,
    summary_path: str | os.PathLike,
    sidecar: bool = True,
) -> tuple[Path, Path]:
    """Write ``group_qc.tsv`` (one row per run, sorted by entities; columns: the BIDS entities
    present, then :data:`METRIC_COLUMNS`, then :data:`GROUP_COLUMNS` when the rows come from
    :func:`group_table`, then any other keys; missing values ``n/a``), its JSON sidecar describing
    the columns (unless ``sidecar=False``) and a plain-text summary, each atomically."""
    rows = sorted(rows, key=_sort_key)
    columns = _columns(rows)
    write_tsv(rows, columns, tsv_path)  # shortest float repr: values round-trip exactly
    if sidecar:
        from iqt_pipe.io import sidecar_path

        described = {**{k: f"BIDS entity {k} (label)" for k in ENTITIES}, **COLUMN_MEANINGS}
        fields = {}
        for col in (c for c in columns if c in described):
            fields[col] = {"Description": described[col]}
            if _in_mm2s(col):
                fields[col]["Units"] = "mm^2/s"
        save_json(fields, sidecar_path(tsv_path))
    save_text(summary_text(rows), summary_path)
    return Path(tsv_path), Path(summary_path)
