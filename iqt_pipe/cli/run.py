"""``iqt-pipe``: the BIDS App entry point.

``participant``: dependency check, BIDS validation, pybids query, a summary of what will run,
then the Nipype graph of :func:`iqt_pipe.workflows.init_iqt_wf`. The dataset-level files
(``dataset_description.json``, ``.bidsignore``, ``logs/CITATION.*``) are written under a
lock and only when absent or different, so job-array tasks sharing an output folder never
clobber each other; each subject's log folder gets the run configuration and text crash files.
Each processed subject then gets its visual report ``sub-<label>.html`` (also after a failed
run), and ``group`` writes ``group.html``; ``--reports-only`` rebuilds them from existing outputs
(:mod:`iqt_pipe.reports`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from iqt_pipe import __version__
from iqt_pipe.cli._common import EXIT_FAILED, EXIT_MISSING_EXECUTABLE, EXIT_OK, EXIT_USAGE, run_guarded
from iqt_pipe.cli.parser import PROG, _build_parser, parse_args  # noqa: F401 - _build_parser for docs/tests
from iqt_pipe.config import RunConfig
from iqt_pipe.io import InputError, save_text

#: Seconds Nipype's scheduler sleeps between looks at finished nodes.
POLL_SLEEP_S = 0.1


class MissingExecutable(InputError):
    """A tool the requested options need is not installed (exit code 127)."""


def check_dependencies(config: RunConfig) -> None:
    if config.denoise == "mrtrix" and not (shutil.which("dwidenoise") and shutil.which("mrdegibbs")):
        raise MissingExecutable(
            "--denoise mrtrix needs MRtrix3's dwidenoise and mrdegibbs on PATH; install MRtrix3 "
            "(conda install -c mrtrix3 mrtrix3) or use --denoise dipy"
        )
    if config.tractography in ("mrtrix", "both"):
        missing = [tool for tool in ("tckgen", "tckmap") if shutil.which(tool) is None]
        if missing:
            raise MissingExecutable(
                f"--tractography {config.tractography} needs MRtrix3's {' and '.join(missing)} on PATH; install "
                "MRtrix3 (conda install -c mrtrix3 mrtrix3) or use --tractography dipy"
            )


def validate_bids(bids_dir: Path, participant_labels=None) -> None:
    """Run ``bids-validator-deno``; any error (not warning) is a one-line refusal.

    With ``participant_labels`` only those participants are validated, as fMRIPrep does: the
    validator reads a temporary folder of links to the dataset's top-level files and the
    selected ``sub-<label>`` folders, so a job-array task neither waits for thousands of other
    subjects nor stops at one of their broken files. Every TSV row is read (``--max-rows -1``):
    by default the validator reads 1000 rows and then misses the later participants of
    ``participants.tsv``.
    """
    import tempfile

    exe = Path(sys.executable).parent / "bids-validator-deno"
    exe = str(exe) if exe.exists() else shutil.which("bids-validator-deno")
    if exe is None:
        raise MissingExecutable(
            "bids-validator-deno not found; install it (pip install bids-validator-deno) or pass --skip-bids-validation"
        )
    with tempfile.TemporaryDirectory(prefix="iqt-pipe-validate.") as tmp:
        target = bids_dir if participant_labels is None else _selected_view(bids_dir, participant_labels, Path(tmp))
        proc = subprocess.run(
            [exe, str(target), "--format", "json", "--max-rows", "-1"], capture_output=True, text=True
        )
    try:
        issues = json.loads(proc.stdout)["issues"]["issues"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InputError(
            f"{bids_dir}: the BIDS validator failed ({(proc.stderr or proc.stdout).strip()[:200]}); "
            "pass --skip-bids-validation to go on without it"
        ) from None
    errors = [i for i in issues if i.get("severity") == "error"]
    if errors:
        first = errors[0]
        where = first.get("location", "")
        scope = (
            ""
            if participant_labels is None
            else " (in " + ", ".join(f"sub-{s}" for s in participant_labels) + " and the dataset's top-level files)"
        )
        raise InputError(
            f"{bids_dir}: the BIDS validator found {len(errors)} error(s){scope}, first {first.get('code')} "
            f"{where}; fix them or pass --skip-bids-validation"
        )


def _selected_view(bids_dir: Path, participant_labels, folder: Path) -> Path:
    """``folder/<dataset name>``: links to ``bids_dir``'s entries except the ``sub-*``
    folders of other participants and ``derivatives/`` (which the validator skips anyway)."""
    keep = {f"sub-{label}" for label in participant_labels}
    view = folder / bids_dir.name
    view.mkdir()
    for entry in bids_dir.iterdir():
        if entry.name == "derivatives" or (entry.name.startswith("sub-") and entry.name not in keep):
            continue
        (view / entry.name).symlink_to(entry.absolute())
    return view


@contextlib.contextmanager
def output_lock(output_dir: Path):
    """An exclusive lock on the output folder's dataset-level files (job-array tasks)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / ".iqt-pipe.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        save_text(text, path)


def write_dataset_files(config: RunConfig, methods: str) -> None:
    """``dataset_description.json``, ``.bidsignore`` and ``logs/CITATION.{md,bib}``, idempotent."""
    from importlib.resources import files

    description = {
        "Name": "iqt-pipe derivatives: super-resolved diffusion tensors with uncertainty",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [
            {"Name": "iqt-pipe", "Version": __version__, "CodeURL": "https://github.com/iqt-pipe/iqt-pipe"}
        ],
        "DatasetLinks": {"raw": str(config.bids_dir)},
    }
    out = config.output_dir
    with output_lock(out):
        _write_if_changed(out / "dataset_description.json", json.dumps(description, indent=2) + "\n")
        _write_if_changed(
            out / ".bidsignore", "*_dwimap.*\n*_tractogram.*\n*_tdi.*\n*.lock\nlogs/\nfigures/\n*.html\n"
        )  # reports
        bib = files("iqt_pipe.data").joinpath("boilerplate.bib").read_text()
        _write_if_changed(out / "logs" / "CITATION.bib", bib)
        _write_if_changed(
            out / "logs" / "CITATION.md",
            "# Methods\n\n" + methods.strip() + "\n\n"
            "Citation keys (`@key`) refer to `CITATION.bib` beside this file.\n",
        )


def participant(config: RunConfig) -> int:
    from iqt_pipe.bids import find_dwi_runs
    from iqt_pipe.sr.inference import resolve_device
    from iqt_pipe.workflows import init_iqt_wf

    check_dependencies(config)
    if not config.skip_bids_validation and not config.input_derivatives:
        validate_bids(config.bids_dir, config.participant_label)
    filters = (config.bids_filters or {}).get("dwi")
    runs = find_dwi_runs(config.bids_dir, config.participant_label, config.session_label, filters=filters)
    refused = []
    if not config.boilerplate_only:  # the methods text needs no data
        runs, refused = preflight(config, runs)
    print(config.summary(runs=runs, device=str(resolve_device(config.device))), flush=True)
    for warning in [config.preprocessing_warning(), *config.upstream_warnings(runs)]:
        if warning:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
    workflow = init_iqt_wf(config=config, runs=runs)
    write_dataset_files(config, workflow.visit_desc())
    if config.write_graph:
        try:
            workflow.write_graph(graph2use="colored", format="svg", simple_form=True)
        except Exception as exc:  # noqa: BLE001 - graphviz may be absent; the run goes on
            print(f"{PROG}: warning: could not draw the workflow graph ({exc})", file=sys.stderr)
    if config.boilerplate_only:
        print(f"{PROG}: methods text written to {config.output_dir / 'logs' / 'CITATION.md'}")
        return EXIT_OK
    for subject in sorted({r.subject for r in runs}):
        config.archive(subject)
    workflow.config["execution"].update(
        {
            "crashfile_format": "txt",
            "stop_on_first_crash": config.stop_on_first_crash,
            # How long Nipype's scheduler sleeps between looks at finished nodes (its default, 2 s,
            # is waited after nearly every node of a run's chain; plugin_args cannot set it).
            "poll_sleep_duration": POLL_SLEEP_S,
        }
    )
    if not config.verbose:
        logging.getLogger("nipype.workflow").setLevel(logging.WARNING)
    settings = config.plugin_settings()
    try:
        workflow.run(plugin=plugin_instance(settings["plugin"], settings["plugin_args"]))
    except RuntimeError as exc:
        crashes = sorted(config.output_dir.glob(f"sub-*/log/{config.run_uuid}/crash-*.txt"))
        print(
            f"{PROG}: some steps failed ({exc.__class__.__name__}); "
            f"{len(crashes)} crash report(s) under {config.output_dir}/sub-*/log/{config.run_uuid}/",
            file=sys.stderr,
        )
        write_reports(config, sorted({r.subject for r in runs}), run_uuid=config.run_uuid)
        return EXIT_FAILED
    write_reports(config, sorted({r.subject for r in runs}), run_uuid=config.run_uuid)  # problems: warnings
    warn_about_runs(config, sorted({r.subject for r in runs}))
    if refused:
        print(
            f"{PROG}: {len(refused)} run(s) refused (see the errors above); the other {len(runs)} finished, "
            f"derivatives in {config.output_dir}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    print(f"{PROG}: finished; derivatives in {config.output_dir}")
    return EXIT_OK


def plugin_instance(name: str, plugin_args: dict):
    """The Nipype plugin ``name``, with crash reports that survive a lost job.

    When a cluster job ends without a result file (cancelled, over its time or memory
    limit, its node lost), Nipype's batch plugins hand ``report_crash`` the traceback as
    one string, which it then extends with a list: the crash report itself fails with a
    TypeError (nipy/nipype#3372). Here the traceback is split into lines first.
    """
    from nipype.pipeline import plugins

    base = getattr(plugins, f"{name}Plugin")

    class Plugin(base):
        def _report_crash(self, node, result=None):
            if result is not None and isinstance(result.get("traceback"), str):
                result = {**result, "traceback": result["traceback"].splitlines(keepends=True)}
            return super()._report_crash(node, result=result)

    Plugin.__name__ = base.__name__
    return Plugin(plugin_args=plugin_args)


def preflight(config: RunConfig, runs: list) -> tuple[list, list]:
    """:func:`iqt_pipe.dmri.preflight.check_run` on every run before any work: each unusable run
    is named on one line and left out; none usable (or --stop-on-first-crash) is an error."""
    from iqt_pipe.dmri.preflight import check_run

    usable, refused = [], []
    for run in runs:
        try:
            warnings = check_run(run, upsample=config.model_upsample or 2, mem_mb=config.mem_mb)
        except InputError as exc:
            refused.append(run)
            if len(runs) == 1 or config.stop_on_first_crash:
                raise
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            continue
        for warning in warnings:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        usable.append(run)
    if not usable:
        raise InputError(
            f"none of the {len(runs)} selected DWI runs is usable (see the errors above); fix them and rerun"
        )
    return usable, refused


def write_reports(config: RunConfig, subjects: list[str], run_uuid: str | None = None) -> bool:
    """``sub-<label>.html`` of each subject, built from its outputs (:mod:`iqt_pipe.reports`);
    ``run_uuid``: the run whose logs they describe (default: each subject's latest). A report
    that cannot be built, or a figure that cannot be drawn (the report shows why), is a warning
    on stderr; returns whether all went well."""
    from iqt_pipe.reports import build_subject_report_with_problems

    ok = True
    for subject in subjects:
        try:
            path, problems = build_subject_report_with_problems(
                config.output_dir, subject, run_uuid, processes=config.nprocs
            )
        except Exception as exc:  # noqa: BLE001 - one subject's report must not hide the others'
            print(f"{PROG}: warning: no report for sub-{subject}: {exc.__class__.__name__}: {exc}", file=sys.stderr)
            ok = False
            continue
        for problem in problems:
            print(f"{PROG}: warning: sub-{subject} report: {problem}", file=sys.stderr)
        ok = ok and not problems
        print(f"{PROG}: visual report {path}")
    return ok


def warn_about_runs(config: RunConfig, subjects: list[str]) -> None:
    """A warning for each run whose noise correlates between neighbouring voxels (recorded in
    its native tensor sidecar: the scanner interpolated it, super-resolution gains little) and
    for each run outside the model's training domain or far from its calibration (its
    super-resolved tensor sidecar)."""
    from iqt_pipe.qc import (
        model_domain_warning,
        noise_correlation,
        noise_correlation_warning,
        self_calibration_warning,
    )
    from iqt_pipe.reports.discover import find_runs

    for subject in subjects:
        for run in find_runs(config.output_dir, subject):
            for warning in (
                noise_correlation_warning(noise_correlation(run.sidecar("tensor")), run.name),
                model_domain_warning(run.sidecar("sr_tensor"), run.name),
                self_calibration_warning(run.sidecar("sr_tensor"), run.name),
            ):
                if warning:
                    print(f"{PROG}: warning: {warning}", file=sys.stderr)


def reports_only(config: RunConfig) -> int:
    """``--reports-only``: rebuild the reports from the outputs already in the output folder
    (subject reports at the participant level, ``group.html`` at the group level)."""
    from iqt_pipe.reports import build_group_report, subjects_with_outputs

    if config.analysis_level == "group":
        print(f"{PROG}: group report {build_group_report(config.output_dir)}")
        return EXIT_OK
    subjects = subjects_with_outputs(config.output_dir, config.participant_label)
    return EXIT_OK if write_reports(config, subjects) else EXIT_FAILED


def derivatives_layout(output_dir: Path, subjects=None):
    """pybids' view of an iqt-pipe output folder (only ``subjects``' folders when given), with
    the entities of ``io_spec.json`` read below the folder (:func:`iqt_pipe.bids.index_layout`)."""
    from importlib.resources import files

    from iqt_pipe.bids import index_layout

    spec = json.loads(files("iqt_pipe.data").joinpath("io_spec.json").read_text())
    config = {key: spec[key] for key in ("name", "entities", "default_path_patterns") if key in spec}
    return index_layout(output_dir, config=[config], subjects=subjects, index_metadata=False)


def group(config: RunConfig) -> int:
    """``group_qc.tsv`` (one row per DWI run: uncertainty in white matter, the fraction of
    voxels above the threshold, native vs super-resolved FA/MD) with robust outliers flagged,
    and ``group_qc.txt``, a short summary."""
    from bids.layout import Query

    from iqt_pipe.io import sidecar_path
    from iqt_pipe.qc import ENTITIES, group_table, metrics_from_files, noise_correlation, run_label, write_group_qc

    out = config.output_dir
    if not (out / "dataset_description.json").exists():
        raise InputError(f"{out}: no iqt-pipe derivatives here; run the participant level into it first")
    layout = derivatives_layout(out, config.participant_label)
    common = {"suffix": "dwimap", "extension": ".nii.gz", "model": "tensor"}
    if config.participant_label:
        common["subject"] = list(config.participant_label)
    if config.session_label:
        common["session"] = list(config.session_label)
    natives = layout.get(param="fa", res=Query.NONE, desc=Query.NONE, **common)
    if not natives:
        raise InputError(
            f"{out}: no participant outputs found (no *_model-tensor_param-fa_dwimap.nii.gz); "
            "run the participant level first"
        )
    rows = []
    for native in natives:
        entities = {k: v for k, v in native.get_entities().items() if k in ENTITIES}

        def one(entities=entities, **query) -> str:
            found = layout.get(return_type="file", **{**entities, **query})
            if len(found) != 1:
                raise InputError(
                    f"{run_label(entities)}: expected one {query} output in {out}, found {len(found)}; "
                    "rerun its participant level"
                )
            return found[0]

        base = {"extension": ".nii.gz"}
        sr_tensor = one(suffix="dwimap", model="tensor", param="tensor", res="hi", desc=Query.NONE, **base)
        r = json.loads(Path(sr_tensor.replace(".nii.gz", ".json")).read_text())["Model"]["UpsampleFactor"]
        metrics = metrics_from_files(
            native.path,
            one(suffix="dwimap", model="tensor", param="md", res=Query.NONE, desc=Query.NONE, **base),
            one(suffix="mask", desc="brain", res=Query.NONE, **base),
            one(suffix="dwimap", model="tensor", param="fa", res="hi", desc=Query.NONE, **base),
            one(suffix="dwimap", model="tensor", param="md", res="hi", desc=Query.NONE, **base),
            one(suffix="dwimap", model="tensor", param="tensor", res="hi", desc="totalsd", **base),
            one(suffix="mask", desc="brain", res="hi", **base),
            r=int(r),
            name=run_label(entities),
        )
        native_tensor = one(suffix="dwimap", model="tensor", param="tensor", res=Query.NONE, desc=Query.NONE, **base)
        correlation = noise_correlation(json.loads(sidecar_path(native_tensor).read_text()))
        finite = [c for c in correlation or () if c == c]
        rows.append({**entities, **metrics, **({"noise_corr_max": max(finite)} if finite else {})})
    tsv, summary = write_group_qc(group_table(rows), out / "group_qc.tsv", out / "group_qc.txt")
    print(summary.read_text(), end="")
    print(f"{PROG}: group QC of {len(rows)} run(s) written to {tsv}")
    from iqt_pipe.reports import build_group_report

    try:
        print(f"{PROG}: group report {build_group_report(out)}")
    except Exception as exc:  # noqa: BLE001 - the QC table is written; say what is missing
        print(f"{PROG}: warning: no group report: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def templateflow_without_templates(environ=os.environ) -> None:
    """iqt-pipe writes nothing in a template space, yet importing niworkflows'
    ``DerivativesDataSink`` indexes every TemplateFlow template (measured 12 s of a 15 s import
    on 2 busy cores, in the main process and again in each worker process that runs a data
    sink). Unless the user chose a TemplateFlow home, point it at the empty one shipped with
    iqt-pipe (no update: nothing to download); the import then takes ~2 s."""
    if "TEMPLATEFLOW_HOME" not in environ:
        environ["TEMPLATEFLOW_HOME"] = str(Path(__file__).resolve().parent.parent / "data" / "templateflow")
        environ.setdefault("TEMPLATEFLOW_AUTOUPDATE", "0")


def main(argv: list[str] | None = None) -> int:
    templateflow_without_templates()
    args = parse_args(argv)
    config = RunConfig.from_args(args)

    def work() -> int:
        try:
            if config.reports_only:
                return reports_only(config)
            return participant(config) if config.analysis_level == "participant" else group(config)
        except MissingExecutable as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return EXIT_MISSING_EXECUTABLE

    return run_guarded(PROG, work, bool(config.verbose))


if __name__ == "__main__":
    sys.exit(main())
