"""The visual report of one participant, ``sub-<label>.html``, built from an existing iqt-pipe
output folder and assembled by nireports from ``iqt_pipe/data/reports-spec.yml``.

Everything is read back from the derivatives, sidecars, logs and the archived run
configuration, never from a workflow's memory, so ``--reports-only`` rebuilds exactly what a
run writes. A subject report has:

* Summary (``desc-about``): processing status of every run (raw runs without derivatives
  included), settings, the model card (checked against the sidecars' sha256), software.
* Per run: inputs and gradient scheme (``desc-summary``); QC numbers as in
  ``group_qc.tsv`` (``desc-qc``); native vs super-resolved colour FA at the same world
  positions (``desc-colourfa``); FA/MD means and sd (``desc-scalars``); intrinsic,
  parameter and total uncertainty on the SR FA (``desc-uncertainty``); the histogram of the
  total sd with the thresholds (``desc-histogram``); with tractography, its summary
  (``desc-tracts``) and one streamline figure per method (``desc-<track>``).
* Methods (``desc-methods``, from ``logs/CITATION.md`` + ``.bib``) and Errors
  (``desc-errors``: the crash files of the run's log folder).

Reportlets are written atomically into ``sub-<label>/figures/``; stale ones are removed. A
figure that cannot be drawn becomes an HTML reportlet saying why, in its place.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from iqt_pipe import __version__
from iqt_pipe.io import MISSING, InputError, atomic_path, format_number, read_tsv, save_text
from iqt_pipe.qc import (
    CORRELATED_NOISE,
    DEFAULT_SD_THRESHOLD,
    INTERPOLATED,
    METRIC_COLUMNS,
    RECALIBRATED,
    SELF_CALIBRATION_RANGE,
    metrics_from_files,
    model_domain_warning,
    noise_correlation,
    noise_correlation_warning,
    self_calibration_warning,
)
from iqt_pipe.reports import figures as F
from iqt_pipe.reports.citations import methods_html
from iqt_pipe.reports.discover import (
    CONFIG_NAME,
    RunOutputs,
    crash_files,
    figure_path,
    find_runs,
    log_dirs,
    run_label,
)
from iqt_pipe.reports.markup import (
    TEMPLATE_FILE,
    Raw,
    data_file,
    escape,
    link,
    relpath,
    table,
    to_float,
)

#: The nireports bootstrap file (it names the page template, :data:`~iqt_pipe.reports.markup.TEMPLATE_FILE`).
SPEC_FILE = "reports-spec.yml"
#: Tractography methods drawn, in report order (``track-`` labels), with their titles.
TRACKS = {
    "dipydet": "DIPY deterministic",
    "dipyprob": "DIPY probabilistic",
    "mrtrixdet": "MRtrix3 Tensor_Det",
    "mrtrixprob": "MRtrix3 Tensor_Prob",
}


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return (
        format_number(value, f".{digits}g") if value is None or isinstance(value, (float, np.floating)) else str(value)
    )


def _mm(value: Any) -> str:
    """A diffusivity in mm²/s, as ``1.23e-4 mm²/s``."""
    return MISSING if value is None or not math.isfinite(float(value)) else f"{F.sci(float(value))} mm²/s"


def _grid(img_path: Path) -> tuple[str, str]:
    import nibabel as nb

    img = nb.load(str(img_path))
    zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
    return (
        "×".join(str(s) for s in img.shape),
        "×".join(f"{z:.3g}" for z in zooms) + " mm, " + "".join(nb.aff2axcodes(img.affine)),
    )


# --------------------------------------------------------------------------- context


class SubjectContext:
    """What the report of one participant is built from."""

    def __init__(self, output_dir: Path, subject: str, run_uuid: str | None):
        from iqt_pipe.config import RunConfig

        self.output_dir = output_dir
        self.subject = subject
        logs = log_dirs(output_dir, subject)
        if run_uuid is not None:
            self.log_dir: Path | None = output_dir / f"sub-{subject}" / "log" / run_uuid
        else:
            with_config = [d for d in logs if (d / CONFIG_NAME).exists() or crash_files(d)]
            self.log_dir = with_config[-1] if with_config else None
        self.run_uuid = run_uuid or (self.log_dir.name if self.log_dir is not None else None)
        self.config = None
        self.config_error = None
        if self.log_dir is not None and (self.log_dir / CONFIG_NAME).exists():
            try:
                self.config = RunConfig.from_toml(self.log_dir / CONFIG_NAME)
            except InputError as exc:
                self.config_error = str(exc)
        self.runs = find_runs(output_dir, subject)
        self.raw_runs, self.raw_error = self._raw_runs()

    def _raw_runs(self):
        """The raw DWI runs this participant's run configuration selects (failed ones included)."""
        from iqt_pipe.bids import find_dwi_runs

        if self.config is None:
            return [], "no archived run configuration"
        if not self.config.bids_dir.is_dir():
            return [], f"the BIDS dataset {self.config.bids_dir} is not reachable from here"
        try:
            sessions = self.config.session_label
            filters = (self.config.bids_filters or {}).get("dwi")
            return find_dwi_runs(self.config.bids_dir, [self.subject], sessions, filters=filters), None
        except Exception as exc:  # noqa: BLE001 - the report says why instead of failing
            return [], f"{exc.__class__.__name__}: {exc}"

    def raw_for(self, run: RunOutputs):
        """The raw run a derivative run came from (its native tensor's ``Sources``), or None."""
        sources = [s.split(":", 2)[-1] for s in run.sidecar("tensor").get("Sources", []) if s.startswith("bids:raw:")]
        for raw in self.raw_runs:
            rel = relpath(raw.dwi, self.config.bids_dir) if self.config else None
            if rel in sources or run_label({**raw.entities}) == run.name:
                return raw
        return None

    def max_uncertainty(self, run: RunOutputs) -> tuple[float | None, str | None]:
        """The ``--max-uncertainty`` threshold and action used for the run's tractography."""
        for tract in run.tracts:
            try:
                limit = json.loads(tract.sidecar.read_text()).get("UncertaintyLimit")
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(limit, dict) and limit.get("Threshold") is not None:
                return float(limit["Threshold"]), limit.get("Action")
        if self.config is not None and self.config.max_uncertainty is not None and self.config.tractography != "none":
            return self.config.max_uncertainty, self.config.uncertainty_action
        return None, None


# --------------------------------------------------------------------------- reportlets


def _write_html(path: Path, body: str) -> Path:
    save_text(body.strip() + "\n", path)
    return path


def _error_html(what: str, error: str) -> str:
    return f'<p class="iqt-alert">Could not draw the {escape(what)}: <code>{escape(error)}</code></p>'


#: A figure queued by :meth:`_Writer.figure`: where it goes, its entities, desc and name, and ``make``.
_Figure = tuple[Path, dict, str, str, Callable[[], Any]]
#: The figures a forked pool draws (:func:`_draw_all`): inherited by the processes, not pickled.
_FORKED: list[_Figure] = []


def _draw(figure: _Figure) -> str | None:
    """Draw ``make() -> (fig, info)`` and save it; ``"Error: message"`` when that fails."""
    path, *_, make = figure
    try:
        F.save_figure(make()[0], path)
    except Exception as exc:  # noqa: BLE001 - the report shows the failure in the figure's place
        return f"{exc.__class__.__name__}: {exc}"
    return None


def _draw_forked(index: int) -> str | None:
    return _draw(_FORKED[index])


def _draw_all(figures: list[_Figure], processes: int) -> list[str | None]:
    """:func:`_draw` of every figure, in ``processes`` forked processes where there is more than
    one of each and the platform forks (Linux: the figures' closures and the volumes they load
    need no pickling; elsewhere, and with one process, here)."""
    global _FORKED
    processes = min(int(processes), len(figures))
    if processes <= 1 or sys.platform != "linux":
        return [_draw(figure) for figure in figures]
    import multiprocessing

    _FORKED = figures
    try:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            return pool.map(_draw_forked, range(len(figures)), chunksize=1)
    finally:
        _FORKED = []


class _Writer:
    """Writes one participant's reportlets and remembers them (stale ones are removed after).
    Figures are queued and drawn together by :meth:`draw`, in up to ``processes`` processes."""

    def __init__(self, ctx: SubjectContext, processes: int = 1):
        self.ctx = ctx
        self.processes = processes
        self.written: list[Path] = []
        self.problems: list[str] = []
        self.queued: list[_Figure] = []

    def html(self, entities: dict, desc: str, body: str) -> None:
        self.written.append(_write_html(figure_path(self.ctx.output_dir, entities, desc, ".html"), body))

    def figure(self, entities: dict, desc: str, ext: str, what: str, make: Callable[[], Any]) -> None:
        """Queue the figure ``make() -> (fig, info)`` for :meth:`draw`."""
        self.queued.append((figure_path(self.ctx.output_dir, entities, desc, ext), entities, desc, what, make))

    def draw(self) -> None:
        """Draw and save the queued figures; one that fails gets an HTML reportlet saying why."""
        figures, self.queued = self.queued, []
        for (path, entities, desc, what, _), error in zip(figures, _draw_all(figures, self.processes)):
            if error is None:
                self.written.append(path)
            else:
                self.problems.append(f"{run_label(entities)} {what}: {error}")
                self.html(entities, desc, _error_html(what, error))


def _about_html(ctx: SubjectContext) -> str:
    out = ctx.output_dir
    parts = []
    when = ""
    try:  # run ids start with the start time (iqt_pipe.config.new_run_uuid)
        when = f", started {_dt.datetime.strptime((ctx.run_uuid or '')[:15], '%Y%m%d-%H%M%S'):%Y-%m-%d %H:%M:%S}"
    except ValueError:
        pass
    parts.append(
        f"<p>Participant <strong>sub-{escape(ctx.subject)}</strong>; iqt-pipe run "
        f"<code>{escape(ctx.run_uuid or 'unknown')}</code>{escape(when)}; "
        f"report by iqt-pipe {escape(__version__)}.</p>"
    )
    # Processing status: derivative runs, and raw runs that have none.
    rows, seen = [], set()
    crashes = crash_files(ctx.log_dir)
    for run in ctx.runs:
        raw = ctx.raw_for(run)
        seen.add(raw.dwi if raw is not None else None)
        status = "super-resolved" if not run.missing else f"incomplete: missing {', '.join(run.missing)}"
        if run.tracts:
            status += f"; {len(run.tracts)} tractograms"
        rows.append((run.name, raw.dwi.name if raw is not None else MISSING, status))
    for raw in ctx.raw_runs:
        if raw.dwi not in seen:
            rows.append(
                (
                    raw.name,
                    raw.dwi.name,
                    Raw(
                        '<span class="iqt-bad">no derivatives: the run failed or was not processed (see Errors)</span>'
                    ),
                )
            )
    if rows:
        parts.append(table(rows, ("run", "raw DWI", "status")))
    else:
        parts.append('<p class="iqt-alert">No DWI run of this participant has derivatives.</p>')
    if ctx.raw_error:
        parts.append(f'<p class="iqt-note">Raw inputs not listed: {escape(ctx.raw_error)}.</p>')
    if crashes:
        parts.append(
            f'<p class="iqt-alert">{len(crashes)} step(s) failed in this run: see <a href="#errors">Errors</a>.</p>'
        )
    # Settings.
    cfg = ctx.config
    if cfg is not None:
        limit = (
            "none" if cfg.max_uncertainty is None else f"{F.sci(cfg.max_uncertainty)} mm²/s ({cfg.uncertainty_action})"
        )
        settings = [
            ("BIDS dataset", str(cfg.bids_dir)),
            ("model", str(cfg.model) if cfg.model else "none"),
            ("device", cfg.device),
            ("Monte-Carlo samples", cfg.mc_samples),
            ("seed", cfg.seed),
            ("denoising", cfg.denoise),
            ("Gibbs-ringing removal", "on" if cfg.degibbs else "off"),
            ("tractography", cfg.tractography),
        ]
        if cfg.tractography != "none":
            settings += [("seed density", f"{cfg.seed_density:g} seeds/mm³"), ("--max-uncertainty", limit)]
        settings += [
            ("risky-voxel threshold (QC)", f"{F.sci(DEFAULT_SD_THRESHOLD)} mm²/s"),
            ("execution", f"Nipype {cfg.plugin}, {cfg.nprocs} process(es), {cfg.omp_nthreads} thread(s)"),
            ("archived configuration", link(ctx.log_dir / CONFIG_NAME, out)),
        ]
        parts.append("<h4>Settings</h4>" + table(settings))
    else:
        why = ctx.config_error or f"no archived run configuration (sub-<label>/log/<run>/{CONFIG_NAME})"
        parts.append(f'<p class="iqt-note">Settings unknown: {escape(why)}.</p>')
    parts.append(_model_card_html(ctx))
    versions = next((r.sidecar("sr_tensor").get("SoftwareVersions") for r in ctx.runs if r.sidecar("sr_tensor")), None)
    if versions:
        parts.append("<h4>Software</h4>" + table(sorted(versions.items())))
    return "\n".join(parts)


def _training_data(training: dict) -> str:
    """Datasets, subjects, DWI runs (each cut at every alignment of the block grid when the
    card says so: ``training.runs`` then names the alignments; their volumes registered to
    each other when it says so) and patch pairs of a card."""
    runs = training.get("dwi_runs") or training.get("runs") or []
    patches = training.get("patches") or {}
    shifts = f" × {training.get('upsample', 2) ** 3} block-grid alignments" if patches.get("grid_shifts") else ""
    registered = " (volumes registered)" if patches.get("registered_volumes") else ""
    return (
        f"{', '.join(training.get('datasets', [])) or 'unknown'}: "
        f"{len(training.get('subjects', []))} subject(s), {len(runs)} run(s){shifts}{registered}, "
        f"{patches.get('total', MISSING)} patch pairs"
    )


def _augmentation(training: dict) -> str:
    if not training.get("augment"):
        return "off"
    return "mirrors + axis swaps" if training.get("axis_swap") else "mirrors"


def _network(card: dict) -> str:
    """Kernel sizes × hidden widths, e.g. 3-1-3 × 50-100 (the paper's: a card without them)."""
    if "kernels" in card and "widths" in card:  # the defaults' module imports PyTorch (~2 s)
        kernels, widths = card["kernels"], card["widths"]
    else:
        from iqt_pipe.models.espcn import KERNELS, WIDTHS

        kernels, widths = card.get("kernels", KERNELS), card.get("widths", WIDTHS)
    return f"{'-'.join(map(str, kernels))} × {'-'.join(map(str, widths))}"


def _model_card_html(ctx: SubjectContext) -> str:
    """The model as the sidecars record it, and its card (training, validation) when readable."""
    model = next((r.sidecar("sr_tensor").get("Model") for r in ctx.runs if r.sidecar("sr_tensor").get("Model")), {})
    card, where = None, None
    if ctx.config is not None and ctx.config.model is not None:
        path = Path(ctx.config.model)
        card_path = path / "model.json" if path.is_dir() else path.with_suffix(".json")
        try:
            card, where = json.loads(card_path.read_text()), card_path
        except (OSError, json.JSONDecodeError):
            card = None
    rows = []
    variant = model.get("Variant") or (card or {}).get("variant") or (ctx.config.model_variant if ctx.config else None)
    r = (
        model.get("UpsampleFactor")
        or (card or {}).get("upsample")
        or (ctx.config.model_upsample if ctx.config else None)
    )
    rows += [
        ("variant", variant or "unknown"),
        ("upsampling factor r", r or "unknown"),
        ("target", model.get("Target") or (card or {}).get("target", "unknown")),
    ]
    sha = model.get("WeightsSHA256") or (ctx.config.model_sha256 if ctx.config else None)
    recorded = "the outputs' sidecars" if model.get("WeightsSHA256") else "the run configuration"
    rows.append(("weights sha256", sha or "unknown"))
    if card is not None:
        card_sha = (card.get("weights") or {}).get("sha256")
        check = (
            f"matches {recorded}"
            if sha and card_sha == sha
            else Raw(
                f'<span class="iqt-bad">differs from {escape(recorded)}: the model file changed since the run</span>'
            )
            if sha
            else ""
        )
        rows.append(("model card", f"{where}" + (f" ({check})" if isinstance(check, str) and check else "")))
        if isinstance(check, Raw):
            rows.append(("card check", check))
        training = card.get("training") if isinstance(card.get("training"), dict) else {}
        if training:
            rows.append(("training data", _training_data(training)))
            rows.append(
                (
                    "training",
                    f"{training.get('epochs', MISSING)} epochs, {training.get('optimizer', '')} "
                    f"lr {training.get('learning_rate', MISSING)}, batch {training.get('batch_size', MISSING)}, "
                    f"augmentation {_augmentation(training)}; network {_network(card)}",
                )
            )
        val = card.get("validation") if isinstance(card.get("validation"), dict) else {}
        rmse = val.get("rmse") or {}
        if rmse:
            rows.append(
                ("validation RMSE", ", ".join(f"{k} {v / 1e-4:.2f}" for k, v in rmse.items()) + " (10⁻⁴ mm²/s)")
            )
        evaluation = card.get("evaluation") if isinstance(card.get("evaluation"), dict) else {}
        ratio = ((evaluation.get("summary") or {}).get("raw") or {}).get("tensor_rmse_ratio.interior") or {}
        if ratio:
            folds = evaluation.get("folds") or []
            where = f" of subjects held out in {len(folds)} folds" if len(folds) > 1 else ""
            rows.append(
                (
                    "held-out evaluation",
                    f"{len(evaluation.get('runs', []))} run(s){where}: interior tensor RMSE "
                    f"{ratio.get('mean', float('nan')):.2f} × cubic B-spline "
                    f"[{ratio.get('min', float('nan')):.2f}, {ratio.get('max', float('nan')):.2f}]",
                )
            )
        rows.append(("created", f"{card.get('created', 'unknown')} by iqt-pipe {card.get('iqt_pipe_version', '?')}"))
    elif ctx.config is not None and ctx.config.model is not None:
        rows.append(("model card", f"not readable at {ctx.config.model} (moved?)"))
    return "<h4>Model</h4>" + table(rows)


def _self_calibration_note(calibration: dict, warned: bool = False) -> str:
    """The report's line on the run's self-calibration (:mod:`iqt_pipe.sr.selfcal`): an alert
    when it was not measured, its ratio was clipped or the run is ``warned`` about
    (:func:`~iqt_pipe.qc.self_calibration_warning`; what that means follows)."""
    ratio, scale = calibration.get("ErrorSdRatio"), calibration.get("VarianceScale", 1.0)
    note = calibration.get("Note")
    text = "Self-calibration: "
    if ratio is None:
        text += f"{note or 'not measured'}; the model's own calibration is kept."
    else:
        text += (
            "super-resolving this series degraded once more, the model's RMS error was "
            f"{format_number(ratio, '.2f')}× its predicted sd ({calibration.get('Voxels')} brain voxels); "
            f"every predictive variance was scaled by {format_number(scale, '.2f')}" + (f" ({note})." if note else ".")
        )
    if warned:
        low, high = SELF_CALIBRATION_RANGE
        text += f" A ratio outside {low:g}–{high:g}: {RECALIBRATED}."
    return f'<p class="{"iqt-alert" if note or warned else "iqt-note"}">{escape(text)}</p>'


def _run_summary_html(ctx: SubjectContext, run: RunOutputs) -> str:
    from iqt_pipe.dmri.gradients import read_gradients, select_dti_volumes

    out = ctx.output_dir
    parts = []
    raw = ctx.raw_for(run)
    rows: list[tuple[Any, ...]] = []
    if raw is not None:
        dims, vox = _grid(raw.dwi)
        rows.append(("raw DWI", relpath(raw.dwi, ctx.config.bids_dir) if ctx.config else raw.dwi.name, dims, vox))
    else:
        sources = run.sidecar("tensor").get("Sources", [])
        rows.append(("raw DWI", ", ".join(sources) or "unknown", "not reachable", ""))
    for key, label in (("tensor", "native tensors"), ("sr_tensor", "super-resolved tensors")):
        if key in run.files:
            dims, vox = _grid(run.files[key])
            rows.append((label, link(run.files[key], out), dims, vox))
    parts.append(table(rows, ("input / grid", "file", "dimensions", "voxel size, orientation")))
    if raw is not None:
        try:
            gtab = read_gradients(raw.bval, raw.bvec)
            keep = select_dti_volumes(gtab, str(raw.bval))
            shells, index = gtab.shells(), gtab.shell_index()
            used = {int(i) for i in np.unique(index[keep]) if i >= 0}
            grows = [("b = 0", int(gtab.b0_mask.sum()), "yes")]
            for k, b in enumerate(shells):
                dirs = gtab.bvecs[index == k]
                unique = len({tuple(np.round(d * np.sign(d[np.argmax(np.abs(d))]), 3)) for d in dirs})
                grows.append(
                    (
                        f"b = {b:g} s/mm²",
                        f"{int((index == k).sum())} ({unique} distinct directions)",
                        "yes" if k in used else "no",
                    )
                )
            parts.append(
                "<h4>Gradient scheme</h4>"
                + table(grows, ("shell", "volumes", "used for the DTI fit"))
                + f'<p class="iqt-note">{len(gtab.bvals)} volumes; from {escape(raw.bval.name)} and '
                f"{escape(raw.bvec.name)}.</p>"
            )
        except Exception as exc:  # noqa: BLE001
            parts.append(f'<p class="iqt-alert">Gradient table not readable: {escape(exc)}</p>')
    else:
        why = ctx.raw_error or "no raw run matches"
        parts.append(f'<p class="iqt-note">Gradient scheme not shown: raw input not found ({escape(why)}).</p>')
    sr = run.sidecar("sr_tensor")
    if sr:
        parts.append(
            f'<p class="iqt-note">{escape(sr.get("Resolution", ""))} Predictive moments from '
            f"{escape(sr.get('MonteCarloSamples', '?'))} Monte-Carlo sample(s), seed {escape(sr.get('Seed', '?'))}, "
            f"device {escape(sr.get('Device', '?'))}, variance scale {escape(sr.get('VarianceScale', 1.0))}.</p>"
        )
    if sr.get("Preprocessing"):
        steps = sr["Preprocessing"]
        trained = steps.get("ModelTrainedWith", {})
        text = (
            f"Preprocessing of the native series: denoising {steps.get('Denoise')}, Gibbs-ringing removal "
            f"{'on' if steps.get('GibbsRemoval') else 'off'}; the model was trained on series with denoising "
            f"{trained.get('Denoise')}, Gibbs-ringing removal {'on' if trained.get('GibbsRemoval') else 'off'}"
        )
        matches = steps.get("MatchesModel", True)
        parts.append(
            f'<p class="{"iqt-note" if matches else "iqt-alert"}">{escape(text)}'
            + (".</p>" if matches else ": they differ, expect less accurate maps and uncertainty.</p>")
        )
    if sr.get("SelfCalibration"):
        warned = self_calibration_warning(sr, run.name) is not None
        parts.append(_self_calibration_note(sr["SelfCalibration"], warned))
    if domain_warning := model_domain_warning(sr, run.name):
        parts.append(f'<p class="iqt-alert">{escape(domain_warning)}.</p>')
    correlation = noise_correlation(run.sidecar("tensor"))
    if correlation is not None:
        warning = noise_correlation_warning(correlation, run.name)
        values = ", ".join(f"{axis} {_fmt(value, 2)}" for axis, value in zip("ijk", correlation))
        parts.append(
            f'<p class="{"iqt-alert" if warning else "iqt-note"}">Noise correlation between neighbouring '
            f"voxels (the noise MP-PCA removed, in the brain): {escape(values)}"
            + (
                f": above {CORRELATED_NOISE}, {escape(INTERPOLATED)}.</p>"
                if warning
                else f"; independent enough (≤ {CORRELATED_NOISE}), no sign of interpolation by the scanner.</p>"
            )
        )
    links = [link(path, out).text for key, path in sorted(run.files.items())]
    parts.append(
        f"<details><summary>Derivatives of this run ({len(links)} files)</summary><p>"
        + "<br>".join(links)
        + "</p></details>"
    )
    return "\n".join(parts)


#: QC rows shown up front: (metric, label, kind).
_QC_ROWS = (
    ("sdtot_wm_median", "total sd, median in white matter", "mm"),
    ("sdtot_wm_p95", "total sd, 95th percentile in white matter", "mm"),
    ("sdtot_frac_above", "fraction of brain voxels above the risky-voxel threshold", "pct"),
    ("fa_wm_median_native", "FA median in WM, native", "num"),
    ("fa_wm_median_sr", "FA median in WM, super-resolved", "num"),
    ("fa_wm_median_ratio", "FA median in WM, SR / native", "num"),
    ("md_wm_median_native", "MD median in WM, native", "mm"),
    ("md_wm_median_sr", "MD median in WM, super-resolved", "mm"),
    ("md_wm_median_ratio", "MD median in WM, SR / native", "num"),
    ("n_wm_native", "white-matter voxels (native / HR)", "wm"),
)


def run_metrics(run: RunOutputs) -> dict[str, Any]:
    """The run's QC metrics, as ``iqt-pipe group`` computes them (:func:`iqt_pipe.qc.metrics_from_files`)."""
    if "sr_sd_total" not in run.files:
        raise InputError("no total-uncertainty map (the model predicts no uncertainty)")
    r = int(run.sidecar("sr_tensor")["Model"]["UpsampleFactor"])
    f = run.files
    return metrics_from_files(
        f["fa"], f["md"], f["mask"], f["sr_fa"], f["sr_md"], f["sr_sd_total"], f["sr_mask"], r=r, name=run.name
    )


def _qc_html(metrics: dict[str, Any]) -> str:
    rows = []
    for key, label, kind in _QC_ROWS:
        value = metrics[key]
        text = (
            _mm(value)
            if kind == "mm"
            else f"{100 * value:.1f} %"
            if kind == "pct"
            else f"{metrics['n_wm_native']} / {metrics['n_wm_hr']}"
            if kind == "wm"
            else _fmt(value, 4)
        )
        rows.append((label, text, key))
    detail = table(
        [(k, _fmt(metrics[k], 5), METRIC_COLUMNS[k]) for k in METRIC_COLUMNS], ("metric", "value", "meaning")
    )
    return (
        f'<p class="iqt-note">The numbers of <code>group_qc.tsv</code> for this run; risky-voxel threshold '
        f"{F.sci(metrics['sd_threshold'])} mm²/s (Tanno et al.'s MD error for a risky voxel). Robust z-scores and "
        f"outlier flags need the group: see <code>group.html</code> once <code>iqt-pipe … group</code> has run.</p>"
        + table(rows, ("measure", "value", "column"))
        + f"<details><summary>All QC metrics</summary>{detail}</details>"
    )


def _tracts_html(run: RunOutputs, threshold: float | None, action: str | None) -> str:
    rows = read_tsv(run.files["tract_summary"]) if "tract_summary" in run.files else []
    cols = ("tractogram", "n_seeds", "n_streamlines", "mean_length_mm", "n_stopped", "n_dropped", "mean_uncertainty")

    def cell(row: dict, col: str) -> str:
        value = to_float(row.get(col))
        return (
            F.sci(value)
            if col == "mean_uncertainty" and value is not None
            else f"{value:.1f}"
            if col == "mean_length_mm" and value is not None
            else row.get(col, MISSING)
        )

    counts = (
        table(
            [tuple(cell(r, c) for c in cols) for r in rows],
            (
                "tractogram",
                "seeds",
                "streamlines",
                "mean length (mm)",
                "stopped",
                "dropped",
                "mean uncertainty (mm²/s)",
            ),
        )
        if rows
        else "<p>No tractography summary.</p>"
    )
    limit = (
        f"--max-uncertainty {F.sci(threshold)} mm²/s ({action}): super-resolved streamlines "
        f"{'end where they enter' if action == 'stop' else 'are removed when they enter'} a voxel above it."
        if threshold is not None
        else "No uncertainty limit was set."
    )
    return f'{counts}<p class="iqt-note">{escape(limit)}</p>'


def _errors_html(ctx: SubjectContext) -> str:
    crashes = crash_files(ctx.log_dir)
    where = (
        f"<code>{escape(relpath(ctx.log_dir, ctx.output_dir))}/</code>" if ctx.log_dir is not None else "no log folder"
    )
    if not crashes:
        return f'<p class="iqt-ok">No errors recorded ({where}).</p>'
    parts = [f'<p class="iqt-alert">{len(crashes)} processing step(s) failed; their crash files are in {where}.</p>']
    for crash in crashes:
        text = crash.read_text(errors="replace")
        node = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()[:3] if ln.startswith("Node:")), crash.name)
        last = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "")
        parts.append(
            f'<div class="iqt-crash"><p><strong>{escape(node)}</strong>: {link(crash, ctx.output_dir).text}</p>'
            f'<p class="iqt-bad"><code>{escape(last)}</code></p>'
            f"<details><summary>Full crash report</summary><pre>{escape(text)}</pre></details></div>"
        )
    return "\n".join(parts)


# --------------------------------------------------------------------------- figures of a run


def _write_run(writer: _Writer, run: RunOutputs) -> None:
    ctx, ent = writer.ctx, run.entities
    writer.html(ent, "summary", _run_summary_html(ctx, run))
    try:
        metrics = run_metrics(run)
        writer.html(ent, "qc", _qc_html(metrics))
    except Exception as exc:  # noqa: BLE001 - shown in the report (a model without uncertainty has no QC)
        writer.html(ent, "qc", f'<p class="iqt-alert">QC metrics not available: {escape(exc)}</p>')
    if run.missing:
        writer.html(
            ent,
            "colourfa",
            f'<p class="iqt-alert">Figures not drawn: missing derivatives '
            f"{escape(', '.join(run.missing))}; rerun the participant level.</p>",
        )
        return
    f = run.files
    vol: dict[str, F.Volume] = {}

    def v(key: str) -> F.Volume:
        if key not in vol:
            vol[key] = F.Volume.load(f[key])
        return vol[key]

    writer.figure(
        ent,
        "colourfa",
        ".svg",
        "colour-FA mosaic",
        lambda: F.colour_fa_mosaic(v("tensor"), v("sr_tensor"), v("mask"), v("sr_mask")),
    )
    writer.figure(
        ent,
        "scalars",
        ".svg",
        "FA/MD maps",
        lambda: F.scalar_maps_mosaic(
            v("fa"), v("md"), v("sr_fa"), v("sr_fa_sd"), v("sr_md"), v("sr_md_sd"), v("mask"), v("sr_mask")
        ),
    )
    maps = {
        name: key
        for name, key in (("intrinsic", "sr_sd_intrinsic"), ("parameter", "sr_sd_parameter"), ("total", "sr_sd_total"))
        if key in f
    }
    threshold, action = ctx.max_uncertainty(run)
    if maps:
        writer.figure(
            ent,
            "uncertainty",
            ".svg",
            "uncertainty maps",
            lambda: F.uncertainty_mosaic(v("sr_fa"), {n: v(k) for n, k in maps.items()}, v("mask"), v("sr_mask")),
        )
    if "sr_sd_total" in f:
        writer.figure(
            ent,
            "histogram",
            ".svg",
            "uncertainty histogram",
            lambda: F.uncertainty_histogram(
                v("sr_sd_total").data[v("sr_mask").data > 0], DEFAULT_SD_THRESHOLD, threshold
            ),
        )
    writer.figure(ent, "thumbnail", ".png", "thumbnail", lambda: F.thumbnail(v("sr_tensor"), v("mask")))
    if run.tracts:
        writer.html(ent, "tracts", _tracts_html(run, threshold, action))
    for track, title in TRACKS.items():
        native = next((t for t in run.tracts if t.track == track and t.space == "native"), None)
        sr = next((t for t in run.tracts if t.track == track and t.space == "sr"), None)
        if sr is None and native is None:
            continue

        def draw(native=native, sr=sr, title=title):
            if sr is None:
                raise InputError("the super-resolved tractogram is missing")
            return F.streamlines_figure(
                F.load_tractogram(native.path, "native") if native else None,
                F.load_tractogram(sr.path, "super-resolved"),
                title,
            )

        writer.figure(ent, track, ".png", f"{title} streamlines", draw)
    writer.draw()  # the run's figures, side by side (the volumes they share are loaded once per process)
    vol.clear()


# --------------------------------------------------------------------------- assembly


def build_subject_report(
    output_dir: str | os.PathLike, subject: str, run_uuid: str | None = None, processes: int = 1
) -> Path:
    """Write the reportlets of ``sub-<subject>`` and assemble ``output_dir/sub-<subject>.html``.

    ``run_uuid``: the run whose log folder (crash files, configuration) the report describes;
    default the latest one. ``processes``: the figures of a run are drawn by that many processes
    at most (forked, on Linux). Returns the report's path; figures that failed are shown as such
    in the report (see :func:`build_subject_report_with_problems` for the list).
    """
    return build_subject_report_with_problems(output_dir, subject, run_uuid, processes)[0]


def build_subject_report_with_problems(
    output_dir: str | os.PathLike, subject: str, run_uuid: str | None = None, processes: int = 1
) -> tuple[Path, list[str]]:
    """:func:`build_subject_report`, also returning the reportlets that could not be drawn."""
    from nireports.assembler.report import Report

    out = Path(output_dir).absolute()
    subject = subject.removeprefix("sub-")
    if not (out / f"sub-{subject}").is_dir():
        raise InputError(f"{out}: no outputs of sub-{subject}; run its participant level first")
    ctx = SubjectContext(out, subject, run_uuid)
    writer = _Writer(ctx, processes)
    subject_entities = {"subject": subject}
    writer.html(subject_entities, "about", _about_html(ctx))
    for run in ctx.runs:
        _write_run(writer, run)
    citation = out / "logs" / "CITATION.md"
    if citation.exists():
        bib = out / "logs" / "CITATION.bib"
        writer.html(
            subject_entities,
            "methods",
            methods_html(
                citation.read_text(),
                bib.read_text() if bib.exists() else "",
                [(f"logs/{p.name}", f"logs/{p.name}") for p in (citation, bib) if p.exists()],
            ),
        )
    else:
        writer.html(
            subject_entities, "methods", '<p class="iqt-note">No methods text (logs/CITATION.md) in this folder.</p>'
        )
    writer.html(subject_entities, "errors", _errors_html(ctx))
    figures_dir = out / f"sub-{subject}" / "figures"
    keep = set(writer.written)
    for stale in figures_dir.glob("*"):
        if stale.is_file() and stale not in keep:
            stale.unlink()
    final = out / f"sub-{subject}.html"
    with atomic_path(final) as tmp:
        report = Report(
            out,
            ctx.run_uuid or "unknown",
            bootstrap_file=data_file(SPEC_FILE),
            out_filename=tmp,
            reportlets_dir=out / f"sub-{subject}",
            metadata={"template_path": str(data_file(TEMPLATE_FILE))},
            subject=subject,
        )
        report.generate_report()
        text = tmp.read_text(encoding="utf-8")
    missing = [
        p
        for p in writer.written  # image reportlets the spec did not place (a naming bug)
        if p.suffix in (".svg", ".png") and "_desc-thumbnail_" not in p.name and relpath(p, out) not in text
    ]
    if missing:
        writer.problems.append("reportlets not placed in the report: " + ", ".join(p.name for p in missing))
    return final, writer.problems
