"""The ``iqt-pipe`` command line: :func:`_build_parser` and :func:`parse_args`.

:func:`_build_parser` only declares the flags (tests and docs call it directly).
:func:`parse_args` parses, then runs the validators below, each a small function that ends
the program through ``parser.error`` with one line (exit code 2) naming what is wrong and
what to do. It returns the namespace with normalised values: absolute paths, labels without
their ``sub-``/``ses-`` prefix, the parsed BIDS filters and plugin settings, the model card,
and ``nprocs``/``omp_nthreads`` filled in. Nothing is written and no workflow is built here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from iqt_pipe import __version__
from iqt_pipe.bids import LABEL, dataset_description
from iqt_pipe.cli._common import Parser, int_at_least, positive_float
from iqt_pipe.config import (
    DEFAULT_MC_SAMPLES,
    DEFAULT_PRECISION,
    DEFAULT_SEED,
    DEFAULT_SYMMETRIES,
    DENOISE,
    DEVICES,
    PRECISIONS,
    SYMMETRIES,
    TRACTOGRAPHY,
)
from iqt_pipe.io import InputError
from iqt_pipe.tracking.track import DEFAULT_SEED_DENSITY, UNCERTAINTY_ACTIONS

PROG = "iqt-pipe"
MAX_DEFAULT_OMP = 8
#: Queries a BIDS filter file may refine, and the entities it may not override.
FILTER_QUERIES = ("dwi",)
_FIXED_ENTITIES = ("suffix", "datatype")

EPILOG = (
    "Exit codes: 0 success, 1 some subject failed, 2 bad command line or input, "
    "127 a required executable is missing. Reusing a work directory resumes an interrupted run."
)


def default_nprocs() -> int:
    """CPUs this process may use (its affinity mask where the OS has one, else os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _label_type(prefix: str, what: str):
    """An argparse ``type``: ``sub-01``/``01`` → ``01``; anything but ASCII letters and digits
    (``..``, ``/``, spaces, ``_``, ``-``) is refused."""

    def parse(text: str) -> str:
        label = text[len(prefix) + 1 :] if text.startswith(f"{prefix}-") else text
        if not LABEL.fullmatch(label):
            raise argparse.ArgumentTypeError(
                f"{what} label {text!r} is not a BIDS label: letters and digits only, "
                f"with or without '{prefix}-' (e.g. 01 or {prefix}-01)"
            )
        return label

    return parse


def _build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description=(
            "Bayesian Image Quality Transfer for diffusion MRI: super-resolved diffusion "
            "tensors with per-voxel uncertainty, from a BIDS dataset."
        ),
        epilog=EPILOG,
    )
    p.add_argument(
        "bids_dir",
        type=Path,
        help="root folder of a BIDS dataset with DWI runs, raw or preprocessed (a BIDS-derivatives "
        "dataset such as QSIPrep's output: its *_desc-preproc_dwi series and brain masks are used)",
    )
    p.add_argument(
        "output_dir",
        type=Path,
        help="folder for the BIDS derivatives (outside bids_dir, or under bids_dir/derivatives/)",
    )
    p.add_argument(
        "analysis_level",
        choices=["participant", "group"],
        help="participant: process each subject; group: summarise the processed subjects",
    )
    _add_selecting_data_arguments(p)
    _add_processing_arguments(p)
    _add_execution_arguments(p)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more messages; tracebacks on errors")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


def _add_selecting_data_arguments(p: argparse.ArgumentParser) -> None:
    """The "selecting data" group: which participants, sessions and DWI runs are processed."""
    g = p.add_argument_group("selecting data")
    g.add_argument(
        "--participant-label",
        nargs="+",
        type=_label_type("sub", "participant"),
        metavar="LABEL",
        help="participants to process, with or without 'sub-' (default: all)",
    )
    g.add_argument(
        "--session-label",
        nargs="+",
        type=_label_type("ses", "session"),
        metavar="LABEL",
        help="sessions to process, with or without 'ses-' (default: all)",
    )
    g.add_argument(
        "--bids-filter-file",
        type=Path,
        metavar="FILE",
        help='JSON file of pybids entities refining the DWI query, e.g. {"dwi": {"acquisition": "hr"}}',
    )
    g.add_argument("--skip-bids-validation", action="store_true", help="do not run the BIDS validator on bids_dir")


def _add_processing_arguments(p: argparse.ArgumentParser) -> None:
    """The "processing" group: the network, the native series' preprocessing, the tractography."""
    g = p.add_argument_group("processing")
    _add_network_arguments(g)
    _add_preprocessing_arguments(g)
    _add_tractography_arguments(g)


def _add_network_arguments(g) -> None:
    """Processing: the model(s), device, Monte-Carlo sampling, precision and symmetry ensemble."""
    g.add_argument(
        "--model",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="model file (model.safetensors beside its model.json, or their folder), as written "
        "by iqt-train (default: the bundled r = 2 model, trained on real multi-vendor DWI; "
        "see README); several: their inverse-variance ensemble (same r and preprocessing)",
    )
    g.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="compute device for the network (default: auto = CUDA when visible, else CPU)",
    )
    g.add_argument(
        "--mc-samples",
        type=int_at_least(1, "the number of MC samples"),
        default=DEFAULT_MC_SAMPLES,
        metavar="N",
        help="Monte Carlo samples of the Bayesian network per voxel; with --symmetries, at least "
        f"one per symmetry (default: {DEFAULT_MC_SAMPLES})",
    )
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=DEFAULT_PRECISION,
        help="the network's arithmetic: bfloat16 convolutions are ~5× faster on CPUs with AMX and "
        "move the super-resolved tensors by ~0.15 %% of the model's own error; auto = bfloat16 on "
        f"such CPUs, float32 elsewhere and on GPUs (default: {DEFAULT_PRECISION})",
    )
    g.add_argument(
        "--symmetries",
        choices=SYMMETRIES,
        default=DEFAULT_SYMMETRIES,
        help="test-time symmetry ensemble: each Monte-Carlo pass runs the network on the scan mirrored "
        "(8 mirrors) or mirrored and transposed (48 cube symmetries), the tensors transformed "
        "alike, and moves its prediction back; costs nothing while --mc-samples is at least the "
        f"number of symmetries (default: {DEFAULT_SYMMETRIES})",
    )
    g.add_argument(
        "--no-self-calibration",
        action="store_true",
        help="keep the model's own variance calibration: by default every predictive variance of a run "
        "is scaled so that the model's RMS error / sd is 1 when it super-resolves the run's series "
        "block-averaged once more (its own fit as the reference)",
    )
    g.add_argument(
        "--seed",
        type=int_at_least(0, "the seed"),
        default=DEFAULT_SEED,
        metavar="N",
        help=f"random seed of the MC sampling (default: {DEFAULT_SEED})",
    )


def _add_preprocessing_arguments(g) -> None:
    """Processing: denoising and Gibbs-ringing removal of the native series."""
    g.add_argument(
        "--denoise",
        choices=DENOISE,
        help="MP-PCA denoising of the native series: mrtrix (dwidenoise), dipy (mppca), auto (MRtrix3 "
        "when on PATH, else DIPY) or none (default: what the model was trained with, its card's "
        "training.preprocessing; the bundled model: none; none for a derivatives dataset, whose series were "
        "preprocessed already)",
    )
    g.add_argument(
        "--degibbs",
        action=argparse.BooleanOptionalAction,
        help="Gibbs-ringing removal from the native series (default: what the model was trained "
        "with; the bundled model: off; off for a derivatives dataset). A setting that differs from the model's "
        "training is warned about and recorded in the sidecars",
    )


def _add_tractography_arguments(g) -> None:
    """Processing: tractography on the native and super-resolved tensors."""
    g.add_argument(
        "--tractography",
        choices=TRACTOGRAPHY,
        default="none",
        help="deterministic and probabilistic tractography on the native and the super-resolved "
        "tensors with DIPY, MRtrix3 (tckgen, tckmap) or both (default: none)",
    )
    g.add_argument(
        "--seed-density",
        type=positive_float("the seed density"),
        default=DEFAULT_SEED_DENSITY,
        metavar="N",
        help=f"tractography seeds per mm³ of white matter, whatever the voxel size (default: {DEFAULT_SEED_DENSITY})",
    )
    g.add_argument(
        "--max-uncertainty",
        type=positive_float("--max-uncertainty"),
        metavar="SD",
        help="stop super-resolved streamlines where they enter a voxel whose total uncertainty "
        "(Frobenius sd, mm²/s) exceeds SD, e.g. 1.5e-4 (default: no limit)",
    )
    g.add_argument(
        "--max-uncertainty-action",
        choices=UNCERTAINTY_ACTIONS,
        default="stop",
        help="what --max-uncertainty does: stop a streamline there, or drop it (default: stop)",
    )


def _add_execution_arguments(p: argparse.ArgumentParser) -> None:
    """The "execution" group: work folder, parallelism, memory, Nipype plugin, what to run."""
    g = p.add_argument_group("execution")
    g.add_argument(
        "-w",
        "--work-dir",
        type=Path,
        metavar="DIR",
        help="folder for intermediate results; reusing it resumes a run (default: ./work)",
    )
    g.add_argument(
        "--nprocs",
        type=int_at_least(1, "the number of processes"),
        metavar="N",
        help="processes run in parallel (default: the CPUs available)",
    )
    g.add_argument(
        "--omp-nthreads",
        type=int_at_least(1, "the number of threads"),
        metavar="N",
        help=f"threads per process, at most --nprocs (default: --nprocs, at most {MAX_DEFAULT_OMP})",
    )
    g.add_argument(
        "--mem-mb",
        type=int_at_least(1, "the memory in MB"),
        metavar="MB",
        help="memory the run may use, in MB (default: no limit)",
    )
    g.add_argument(
        "--use-plugin",
        type=Path,
        metavar="FILE",
        help="YAML file with Nipype execution settings: 'plugin: MultiProc' and optional 'plugin_args: {...}'",
    )
    g.add_argument(
        "--stop-on-first-crash",
        action="store_true",
        help="stop everything at the first failing step (default: finish the other subjects)",
    )
    g.add_argument("--write-graph", action="store_true", help="write the workflow graphs into the work folder")
    g.add_argument("--boilerplate-only", action="store_true", help="write the methods text (logs/CITATION.md) and stop")
    g.add_argument(
        "--reports-only",
        action="store_true",
        help="only rebuild the visual reports (sub-<label>.html; group.html at the group level) "
        "from the outputs already in output_dir, without processing",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line; a refusal exits with code 2 and one line on stderr."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    args.ensemble_models = [_absolute(m) for m in args.model[1:]] if args.model else []
    args.model = args.model[0] if args.model else None
    for name in ("bids_dir", "output_dir", "work_dir", "bids_filter_file", "use_plugin", "model"):
        value = getattr(args, name)
        if value is not None:
            setattr(args, name, _absolute(value))
    if args.work_dir is None:
        args.work_dir = Path.cwd() / "work"
    for name in ("participant_label", "session_label"):
        if getattr(args, name) is not None:
            setattr(args, name, list(dict.fromkeys(getattr(args, name))))

    args.input_derivatives = _check_bids_dir(parser, args.bids_dir)
    _check_app_output_dir(parser, args.output_dir, args.bids_dir)
    _check_work_dir(parser, args.work_dir, args.bids_dir, args.output_dir)
    args.bids_filters = _read_bids_filters(parser, args.bids_filter_file) if args.bids_filter_file else None
    args.plugin, args.plugin_args = _read_plugin(parser, args.use_plugin) if args.use_plugin else ("MultiProc", {})
    _settle_resources(parser, args)
    _check_reports_only(parser, args)
    if args.model is None and args.analysis_level == "participant" and not args.reports_only:
        from iqt_pipe.models import ModelFileError
        from iqt_pipe.models.files import bundled_model

        try:
            args.model = bundled_model(2)
        except ModelFileError as exc:
            _fail(parser, str(exc))
    args.model_card = _check_model(parser, args.model)
    _check_ensemble(parser, args)
    _settle_preprocessing(args)
    if args.model is not None:
        from iqt_pipe.models.files import model_paths

        # The weights files, whichever of each pair was named.
        args.model = model_paths(args.model)[0]
        args.ensemble_models = [model_paths(m)[0] for m in args.ensemble_models]
    _check_device(parser, args.device)
    _check_tractography(parser, args)
    return args


# -- validators: each ends the program through parser.error with one line ------------------


def _fail(parser: argparse.ArgumentParser, message: str):
    parser.error(re.sub(r"\s*[\r\n]+\s*", " ", str(message)))  # one line, whatever the message carried


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path.expanduser()))


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (symbolic links resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _check_bids_dir(parser, bids_dir: Path) -> bool:
    """A readable BIDS dataset root; returns whether it is a derivatives dataset
    (``DatasetType: derivative``, e.g. QSIPrep's output of preprocessed series)."""
    try:
        content = dataset_description(bids_dir)
    except InputError as exc:
        _fail(parser, f"bids_dir {exc}")
    return content.get("DatasetType") == "derivative"


def _check_app_output_dir(parser, output_dir: Path, bids_dir: Path) -> None:
    suggestion = bids_dir / "derivatives" / "iqt-pipe"
    if output_dir.resolve() == bids_dir.resolve():
        _fail(
            parser,
            f"output_dir is the BIDS folder itself ({bids_dir}); "
            f"write the derivatives elsewhere (suggestion: {suggestion})",
        )
    if _inside(output_dir, bids_dir):
        parts = output_dir.resolve().relative_to(bids_dir.resolve()).parts
        if parts == ("derivatives",):
            _fail(
                parser,
                f"output_dir {output_dir} is the BIDS folder's derivatives/ itself; "
                f"use a folder below it (suggestion: {suggestion})",
            )
        if parts[0] != "derivatives":
            _fail(
                parser,
                f"output_dir {output_dir} lies inside the BIDS folder; use a folder outside it "
                f"or below its derivatives/ (suggestion: {suggestion})",
            )
    if output_dir.exists() and not output_dir.is_dir():
        _fail(parser, f"output_dir {output_dir} exists and is not a folder; choose another output folder")
    _check_writable(parser, output_dir, "output_dir")


def _check_writable(parser, folder: Path, what: str) -> None:
    """Create (and remove) a folder in ``folder`` or its nearest existing parent: permission
    bits say too little (root ignores them; read-only mounts and quotas do not)."""
    import tempfile

    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".iqt-pipe-probe.", dir=probe))
    except OSError as exc:
        _fail(parser, f"{what} {folder}: cannot write there ({exc.strerror or exc}); choose a folder you can write to")


def _check_work_dir(parser, work_dir: Path, bids_dir: Path, output_dir: Path) -> None:
    suggestion = Path.cwd() / "work"
    if _inside(suggestion, bids_dir) or suggestion.resolve() == output_dir.resolve():
        suggestion = bids_dir.resolve().parent / "iqt-pipe-work"
    if _inside(work_dir, bids_dir):
        _fail(
            parser,
            f"the work folder {work_dir} lies inside the BIDS folder {bids_dir}; "
            f"choose one outside it (suggestion: -w {suggestion})",
        )
    if work_dir.resolve() == output_dir.resolve():
        _fail(
            parser,
            f"the work folder is the output folder ({output_dir}); intermediate files would mix with "
            f"the derivatives (suggestion: -w {suggestion})",
        )
    if work_dir.exists() and not work_dir.is_dir():
        _fail(parser, f"the work folder {work_dir} exists and is not a folder; choose another with -w")
    _check_writable(parser, work_dir, "the work folder")


def _read_file(parser, path: Path, flag: str) -> str:
    if not path.is_file():
        _fail(parser, f"{flag} {path}: file not found")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(parser, f"{flag} {path}: cannot read ({exc.__class__.__name__}: {exc})")


def _read_bids_filters(parser, path: Path) -> dict:
    """``{"dwi": {entity: value, ...}}``: values are strings, numbers, booleans, null or lists."""
    text = _read_file(parser, path, "--bids-filter-file")
    try:
        filters = json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(parser, f"--bids-filter-file {path}: not valid JSON ({exc})")
    example = 'e.g. {"dwi": {"acquisition": "hr"}}'
    if not isinstance(filters, dict):
        _fail(parser, f"--bids-filter-file {path}: must hold a JSON object of queries, {example}")
    for query, entities in filters.items():
        if query not in FILTER_QUERIES:
            _fail(
                parser,
                f"--bids-filter-file {path}: unknown query {query!r}; known: {', '.join(FILTER_QUERIES)} ({example})",
            )
        if not isinstance(entities, dict):
            _fail(
                parser, f"--bids-filter-file {path}: the {query!r} query must be an object of BIDS entities, {example}"
            )
        for entity, value in entities.items():
            if entity in _FIXED_ENTITIES:
                _fail(
                    parser,
                    f"--bids-filter-file {path}: {query}.{entity} cannot be changed (iqt-pipe reads DWI series only)",
                )
            values = value if isinstance(value, list) else [value]
            if not all(v is None or isinstance(v, (str, int, float, bool)) for v in values):
                _fail(
                    parser,
                    f"--bids-filter-file {path}: {query}.{entity} must be a string, number, "
                    f"boolean, null or a list of them, got {json.dumps(value)}",
                )
    return filters


def _read_plugin(parser, path: Path) -> tuple[str, dict]:
    """``plugin: <Nipype plugin>`` and optional ``plugin_args: {...}`` from a YAML file."""
    import yaml  # a dependency of niworkflows and nireports

    text = _read_file(parser, path, "--use-plugin")
    try:
        settings = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        _fail(parser, f"--use-plugin {path}: not valid YAML ({getattr(exc, 'problem', None) or exc}{where})")
    example = "e.g. 'plugin: MultiProc' and 'plugin_args: {n_procs: 4}'"
    if not isinstance(settings, dict) or not isinstance(settings.get("plugin"), str):
        _fail(parser, f"--use-plugin {path}: needs a 'plugin' name, {example}")
    unknown = sorted(set(map(str, settings)) - {"plugin", "plugin_args"})
    if unknown:
        _fail(parser, f"--use-plugin {path}: unknown key {unknown[0]!r}; only 'plugin' and 'plugin_args' are read")
    plugin, plugin_args = settings["plugin"], settings.get("plugin_args") or {}
    if not isinstance(plugin_args, dict) or not all(isinstance(k, str) for k in plugin_args):
        _fail(parser, f"--use-plugin {path}: 'plugin_args' must be a mapping of names to values, {example}")
    try:
        json.dumps(plugin_args, allow_nan=False)
    except (TypeError, ValueError):
        _fail(
            parser, f"--use-plugin {path}: 'plugin_args' may hold only strings, numbers, booleans, lists and mappings"
        )
    from nipype.pipeline import plugins

    if not hasattr(plugins, f"{plugin}Plugin"):
        known = sorted(n[: -len("Plugin")] for n in dir(plugins) if n.endswith("Plugin") and n != "Plugin")
        _fail(parser, f"--use-plugin {path}: unknown Nipype plugin {plugin!r}; known: {', '.join(known)}")
    n_procs, memory_gb = plugin_args.get("n_procs"), plugin_args.get("memory_gb")
    if n_procs is not None and (isinstance(n_procs, bool) or not isinstance(n_procs, int) or n_procs < 1):
        _fail(parser, f"--use-plugin {path}: plugin_args.n_procs must be an integer ≥ 1, got {n_procs!r}")
    if memory_gb is not None and (
        isinstance(memory_gb, bool) or not isinstance(memory_gb, (int, float)) or not memory_gb > 0
    ):
        _fail(parser, f"--use-plugin {path}: plugin_args.memory_gb must be a positive number, got {memory_gb!r}")
    return plugin, plugin_args


def _settle_resources(parser, args: argparse.Namespace) -> None:
    """Fill ``nprocs``/``omp_nthreads``/``mem_mb`` from the flags, the plugin file, the machine."""
    file_procs = args.plugin_args.get("n_procs")
    if file_procs is not None:
        if args.nprocs is not None and args.nprocs != file_procs:
            _fail(
                parser,
                f"--nprocs {args.nprocs} disagrees with n_procs: {file_procs} in {args.use_plugin}; keep one of them",
            )
        args.nprocs = file_procs
    file_gb = args.plugin_args.get("memory_gb")
    if file_gb is not None:
        file_mb = max(1, int(round(file_gb * 1024)))
        if args.mem_mb is not None and args.mem_mb != file_mb:
            _fail(
                parser,
                f"--mem-mb {args.mem_mb} disagrees with memory_gb: {file_gb} in {args.use_plugin}; keep one of them",
            )
        args.mem_mb = file_mb
    explicit = args.nprocs is not None
    if not explicit:
        args.nprocs = default_nprocs()
    if args.omp_nthreads is None:
        args.omp_nthreads = min(args.nprocs, MAX_DEFAULT_OMP)
    elif args.omp_nthreads > args.nprocs:
        source = f"--nprocs {args.nprocs}" if explicit else f"the {args.nprocs} CPUs available (--nprocs)"
        _fail(parser, f"--omp-nthreads {args.omp_nthreads} exceeds {source}; lower --omp-nthreads or raise --nprocs")


def _check_model(parser, model: Path | None) -> dict | None:
    """The model card (checked by :func:`iqt_pipe.models.read_card`); None without a model
    (the group level)."""
    if model is None:
        return None
    if not model.exists():
        _fail(parser, f"--model {model}: no such file or folder")
    from iqt_pipe.models import ModelFileError, read_card
    from iqt_pipe.models.files import check_model_file, model_paths

    try:
        card = read_card(model)
    except ModelFileError as exc:
        _fail(parser, f"--model: {exc}")
    weights = model_paths(model)[0]
    if not weights.is_file():
        _fail(parser, f"--model: {weights}: weights file not found beside its card {model_paths(model)[1].name}")
    try:  # the weights too (checksum, safetensors, shapes, finite), before any work starts
        check_model_file(model)
    except ModelFileError as exc:
        _fail(parser, f"--model: {exc}")
    return card


def _check_ensemble(parser, args: argparse.Namespace) -> None:
    """Further ``--model`` files: each a valid model with the first one's upsampling factor and
    training preprocessing (one native series and one grid for all), none named twice."""
    if not args.ensemble_models:
        return
    from iqt_pipe.dmri.prepare import Preprocessing
    from iqt_pipe.models.files import model_paths

    first = Preprocessing.of_model(args.model_card)
    seen = {model_paths(args.model)[0].resolve()}
    for path in args.ensemble_models:
        card = _check_model(parser, path)
        if model_paths(path)[0].resolve() in seen:
            _fail(parser, f"--model {path}: named twice; give each ensemble member once")
        seen.add(model_paths(path)[0].resolve())
        if card["upsample"] != args.model_card["upsample"]:
            _fail(
                parser,
                f"--model {path}: upsamples by {card['upsample']}, {args.model} by "
                f"{args.model_card['upsample']}; an ensemble's models must share r",
            )
        if not Preprocessing.of_model(card).same_steps(first):
            _fail(
                parser,
                f"--model {path}: trained on series with {Preprocessing.of_model(card).describe()}, "
                f"{args.model} with {first.describe()}; an ensemble's models must share their preprocessing",
            )


def _settle_preprocessing(args: argparse.Namespace) -> None:
    """``--denoise`` and ``--degibbs`` left out: the model's training preprocessing
    (:meth:`iqt_pipe.dmri.prepare.Preprocessing.of_model`), so the native series is prepared as the
    model's training series were. A derivatives dataset's series were preprocessed already:
    left out, neither step runs again (the participant level warns where what the series had
    differs from the model's training)."""
    from iqt_pipe.dmri.prepare import NONE, Preprocessing

    trained = Preprocessing.of_model(args.model_card) if args.model_card else NONE
    args.model_preprocessing = trained
    if args.denoise is None:
        args.denoise = "none" if args.input_derivatives else trained.denoise
    if args.degibbs is None:
        args.degibbs = False if args.input_derivatives else trained.degibbs


def _check_tractography(parser, args: argparse.Namespace) -> None:
    """``--max-uncertainty`` needs tractography and a model that predicts uncertainty."""
    if args.max_uncertainty is None:
        return
    if args.tractography == "none":
        _fail(parser, "--max-uncertainty limits tractography; add --tractography dipy, mrtrix or both")
    from iqt_pipe.models import VARIANTS

    variant = (args.model_card or {}).get("variant")
    if variant not in VARIANTS:
        return  # no model card (checked elsewhere)
    hetero, variational = VARIANTS[variant]
    if not hetero and (not variational or args.mc_samples == 1):
        why = (
            f"(variant {variant}) predicts no uncertainty"
            if not variational
            else f"(variant {variant}) predicts uncertainty only with --mc-samples above 1"
        )
        _fail(
            parser,
            f"--max-uncertainty: the model {args.model} {why}; use a hetero model, raise "
            "--mc-samples for a variational one, or drop --max-uncertainty",
        )


def _check_reports_only(parser, args: argparse.Namespace) -> None:
    """``--reports-only`` processes nothing, so it cannot go with ``--boilerplate-only``."""
    if args.reports_only and args.boilerplate_only:
        _fail(
            parser,
            "--reports-only and --boilerplate-only exclude each other: one rebuilds the reports of "
            "existing outputs, the other writes the methods text before processing; keep one",
        )


def _check_device(parser, device: str) -> None:
    if device != "cuda":
        return  # auto and cpu always resolve
    from iqt_pipe.sr.inference import resolve_device

    try:
        resolve_device(device)
    except InputError as exc:
        _fail(parser, str(exc))
