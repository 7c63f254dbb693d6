"""The run configuration of ``iqt-pipe``: one :class:`RunConfig`, built from the parsed command
line, saved as TOML with each subject's logs and read back exactly.

There is no global configuration: the runner builds one :class:`RunConfig` and hands it to the
top-level workflow factory, which passes explicit arguments to the science factories. The TOML
file is flat (strings, integers, floats, booleans, lists of strings; unset values are left out);
the two nested settings, the BIDS filters and the Nipype plugin arguments, are stored as JSON text.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import tomllib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iqt_pipe import __version__
from iqt_pipe.dmri.prepare import DENOISE
from iqt_pipe.io import InputError, save_text
from iqt_pipe.sr.options import DEFAULT_MC_SAMPLES, DEFAULT_PRECISION, DEFAULT_SYMMETRIES, PRECISIONS, SYMMETRIES
from iqt_pipe.tracking.track import DEFAULT_SEED_DENSITY, UNCERTAINTY_ACTIONS

if TYPE_CHECKING:
    from iqt_pipe.dmri.prepare import Preprocessing

DEVICES = ("auto", "cpu", "cuda")
TRACTOGRAPHY = ("none", "dipy", "mrtrix", "both")
DEFAULT_SEED = 0
#: File name of the configuration archived in ``sub-<label>/log/<run_uuid>/``.
CONFIG_NAME = "iqt-pipe.toml"


def new_run_uuid() -> str:
    """``20240131-154500_<uuid4>``: names one run's log folders, sortable by start time."""
    return f"{_dt.datetime.now():%Y%m%d-%H%M%S}_{uuid.uuid4()}"


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``iqt-pipe`` run needs to know; paths are absolute, labels unprefixed."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    work_dir: Path
    participant_label: tuple[str, ...] | None = None
    session_label: tuple[str, ...] | None = None
    bids_filter_file: Path | None = None
    bids_filters: dict | None = None
    skip_bids_validation: bool = False
    #: bids_dir is a BIDS-derivatives dataset of preprocessed series (e.g. QSIPrep's output).
    input_derivatives: bool = False
    model: Path | None = None
    model_variant: str | None = None
    model_upsample: int | None = None
    model_sha256: str | None = None
    #: Further models, averaged with ``model`` as an inverse-variance ensemble.
    ensemble_models: tuple[Path, ...] = ()
    device: str = "auto"
    mc_samples: int = DEFAULT_MC_SAMPLES
    symmetries: str = DEFAULT_SYMMETRIES
    precision: str = DEFAULT_PRECISION
    #: Variances scaled to the model's errors on each run's series degraded once more.
    self_calibration: bool = True
    seed: int = DEFAULT_SEED
    denoise: str = "none"
    degibbs: bool = False
    #: What the model's training series had (its card's ``training.preprocessing``).
    model_denoise: str | None = None
    model_degibbs: bool | None = None
    tractography: str = "none"
    seed_density: float = DEFAULT_SEED_DENSITY
    max_uncertainty: float | None = None
    uncertainty_action: str = "stop"
    nprocs: int = 1
    omp_nthreads: int = 1
    mem_mb: int | None = None
    use_plugin: Path | None = None
    plugin: str = "MultiProc"
    plugin_args: dict = field(default_factory=dict)
    stop_on_first_crash: bool = False
    write_graph: bool = False
    boilerplate_only: bool = False
    reports_only: bool = False
    verbose: int = 0
    version: str = __version__
    run_uuid: str = field(default_factory=new_run_uuid)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunConfig:
        """From :func:`iqt_pipe.cli.parser.parse_args`'s namespace (already validated)."""
        card = getattr(args, "model_card", None) or {}
        trained = getattr(args, "model_preprocessing", None) if card else None
        labels = {
            name: tuple(getattr(args, name)) if getattr(args, name) is not None else None
            for name in ("participant_label", "session_label")
        }
        return cls(
            bids_dir=args.bids_dir,
            output_dir=args.output_dir,
            analysis_level=args.analysis_level,
            work_dir=args.work_dir,
            **labels,
            bids_filter_file=args.bids_filter_file,
            bids_filters=args.bids_filters,
            skip_bids_validation=args.skip_bids_validation,
            input_derivatives=bool(getattr(args, "input_derivatives", False)),
            model=args.model,
            model_variant=card.get("variant"),
            model_upsample=card.get("upsample"),
            model_sha256=(card.get("weights") or {}).get("sha256"),
            ensemble_models=tuple(getattr(args, "ensemble_models", ())),
            device=args.device,
            mc_samples=args.mc_samples,
            symmetries=args.symmetries,
            precision=args.precision,
            self_calibration=not args.no_self_calibration,
            seed=args.seed,
            denoise=args.denoise,
            degibbs=args.degibbs,
            model_denoise=trained.denoise if trained else None,
            model_degibbs=trained.degibbs if trained else None,
            tractography=args.tractography,
            seed_density=args.seed_density,
            max_uncertainty=args.max_uncertainty,
            uncertainty_action=args.max_uncertainty_action,
            nprocs=args.nprocs,
            omp_nthreads=args.omp_nthreads,
            mem_mb=args.mem_mb,
            use_plugin=args.use_plugin,
            plugin=args.plugin,
            plugin_args=dict(args.plugin_args),
            stop_on_first_crash=args.stop_on_first_crash,
            write_graph=args.write_graph,
            boilerplate_only=args.boilerplate_only,
            reports_only=args.reports_only,
            verbose=args.verbose,
        )

    def preprocessing_warning(self) -> str | None:
        """One line when ``--denoise``/``--degibbs`` differ from the model's training
        preprocessing (the network then sees series unlike those it learnt from), else None.
        Preprocessed (derivatives) input: see :meth:`upstream_warnings`."""
        from iqt_pipe.dmri.prepare import Preprocessing

        if self.model_denoise is None or self.input_derivatives:
            return None
        used = Preprocessing(self.denoise, self.degibbs)
        trained = Preprocessing(self.model_denoise, bool(self.model_degibbs))
        if used.same_steps(trained):
            return None
        return (
            f"the native series get {used.describe()}, but the model was trained on series with "
            f"{trained.describe()}: expect less accurate super-resolution and uncertainty; leave out "
            "--denoise and --degibbs to follow the model (recorded as Preprocessing in the sidecars)"
        )

    def series_preprocessing(self, run) -> Preprocessing | None:
        """What a run's series has had when it is fitted: iqt-pipe's own steps, after (for a
        preprocessed run) those its pipeline recorded; None where that pipeline recorded
        nothing (then nothing is claimed in the sidecars)."""
        from iqt_pipe.dmri.prepare import Preprocessing

        ours = Preprocessing(self.denoise, self.degibbs)
        if not getattr(run, "derivative", False):
            return ours
        if run.upstream is None:
            return None
        theirs = run.upstream.preprocessing
        return Preprocessing(ours.denoise if ours.denoises else theirs.denoise, ours.degibbs or theirs.degibbs)

    def upstream_warnings(self, runs: Sequence) -> list[str]:
        """For preprocessed (derivatives) runs, one line per distinct situation where the
        series the network sees — the pipeline's steps plus iqt-pipe's — differ from the
        model's training, repeat a step, or are unknown (the pipeline recorded nothing)."""
        from iqt_pipe.dmri.prepare import Preprocessing

        if self.model_denoise is None:
            return []
        trained = Preprocessing(self.model_denoise, bool(self.model_degibbs))
        ours = Preprocessing(self.denoise, self.degibbs)
        lines: dict[str, list[str]] = {}
        for run in runs:
            if not getattr(run, "derivative", False):
                continue
            if run.upstream is None:
                key = (
                    f"the preprocessed series do not record whether they were denoised or Gibbs-corrected "
                    f"(no sub-<label>/log/*/qsiprep.toml); iqt-pipe applies {ours.describe()} and the model "
                    f"was trained on series with {trained.describe()}: check that the pipeline did the same "
                    "(add --denoise/--degibbs for a step it left out)"
                )
                lines.setdefault(key, []).append(run.name)
                continue
            theirs, seen = run.upstream.preprocessing, self.series_preprocessing(run)
            again = [
                step
                for step, twice in (
                    ("denoising", theirs.denoises and ours.denoises),
                    ("Gibbs-ringing removal", theirs.degibbs and ours.degibbs),
                )
                if twice
            ]
            if again:
                key = (
                    f"{' and '.join(again)} again on series that had it ({run.upstream.describe()}); "
                    "leave out --denoise/--degibbs: a preprocessed series is not denoised or corrected twice"
                )
            elif not seen.same_steps(trained):
                lacking = [
                    flag
                    for flag, lacks in (
                        (f"--denoise {trained.denoise}", trained.denoises and not seen.denoises),
                        ("--degibbs", trained.degibbs and not seen.degibbs),
                    )
                    if lacks
                ]
                extra = (seen.denoises and not trained.denoises) or (seen.degibbs and not trained.degibbs)
                fix = (
                    "a model trained on series preprocessed like these (iqt-train on them) fits them better"
                    if extra or not lacking
                    else f"add {' and '.join(lacking)}"
                )
                added = "" if not (ours.denoises or ours.degibbs) else f", then iqt-pipe's {ours.describe()}"
                key = (
                    f"the network sees {seen.describe()} ({run.upstream.describe()}{added}), but the model was "
                    f"trained on series with {trained.describe()}: expect less accurate super-resolution and "
                    f"uncertainty; {fix}"
                )
            else:
                continue
            lines.setdefault(key, []).append(run.name)
        return [
            f"{names[0]}{f' and {len(names) - 1} more run(s)' if len(names) > 1 else ''}: {text}"
            for text, names in lines.items()
        ]

    # -- TOML ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The flat, TOML-ready form: paths as text, nested settings as JSON text, None left out."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            kind = _KINDS[f.name]
            if kind in ("path", "path?"):
                value = str(value)
            elif kind == "labels?":
                value = list(value)
            elif kind == "paths":
                value = [str(v) for v in value]
            elif kind in ("json", "json?"):
                value = json.dumps(value, sort_keys=True, allow_nan=False)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "run configuration") -> RunConfig:
        """Inverse of :meth:`to_dict`; a wrong key or type is an :class:`InputError` (one line)."""
        unknown = sorted(set(data) - set(_KINDS))
        if unknown:
            raise InputError(f"{source}: unknown setting {unknown[0]!r}; written by a newer iqt-pipe?")
        values: dict[str, Any] = {}
        for name, kind in _KINDS.items():
            if name not in data:
                if name not in _DEFAULTED:
                    raise InputError(f"{source}: the setting {name!r} is missing")
                continue
            values[name] = _decode(name, kind, data[name], source)
        return cls(**values)

    def to_toml(self, path: str | os.PathLike) -> Path:
        """Write the configuration as TOML, atomically; returns the path."""
        lines = [
            f"# iqt-pipe {self.version} run configuration; read it back with iqt_pipe.config.RunConfig.from_toml()"
        ]
        lines += [f"{key} = {_toml_value(value)}" for key, value in self.to_dict().items()]
        return save_text("\n".join(lines) + "\n", path)

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> RunConfig:
        path = Path(path)
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise InputError(f"{path}: run configuration not found") from None
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not a readable TOML run configuration ({exc})") from None
        return cls.from_dict(data, source=str(path))

    def log_dir(self, subject: str) -> Path:
        """``output_dir/sub-<label>/log/<run_uuid>``: where this run's logs of one subject go."""
        return self.output_dir / f"sub-{subject}" / "log" / self.run_uuid

    def archive(self, subject: str) -> Path:
        """Save a copy of the configuration with the subject's logs; returns its path."""
        return self.to_toml(self.log_dir(subject) / CONFIG_NAME)

    # -- what the runner hands to Nipype and prints -------------------------------------------

    def plugin_settings(self) -> dict[str, Any]:
        """``{"plugin": ..., "plugin_args": {...}}`` for ``workflow.run(**settings)``: the plugin
        file's arguments, completed with --nprocs and --mem-mb for the multiprocess plugins."""
        args = dict(self.plugin_args)
        if self.plugin in ("MultiProc", "LegacyMultiProc"):
            args.setdefault("n_procs", self.nprocs)
            if self.mem_mb is not None:
                args.setdefault("memory_gb", self.mem_mb / 1024)
            args.setdefault("raise_insufficient", False)
        return {"plugin": self.plugin, "plugin_args": args}

    def summary(self, runs: Sequence | None = None, device: str | None = None) -> str:
        """What will run, in a few readable lines (the runner prints it first).

        ``runs``: the DWI runs found (:class:`iqt_pipe.bids.DWIRun`), to count them;
        ``device``: the device ``auto`` resolved to, when known.
        """

        def labels(values, prefix, every):
            return ", ".join(f"{prefix}-{v}" for v in values) if values else every

        if self.input_derivatives:
            note = " (derivatives: preprocessed series; the BIDS validator checks raw datasets, not run)"
        else:
            note = " (BIDS validation skipped)" if self.skip_bids_validation else ""
        rows = [("BIDS dataset", f"{self.bids_dir}{note}")]
        if self.bids_filters:
            source = f" (from {self.bids_filter_file})" if self.bids_filter_file else ""
            rows.append(("BIDS filters", json.dumps(self.bids_filters, sort_keys=True) + source))
        rows.append(("participants", labels(self.participant_label, "sub", "all")))
        rows.append(("sessions", labels(self.session_label, "ses", "all")))
        if runs is not None:
            subjects = sorted({r.subject for r in runs})
            rows.append(
                (
                    "DWI runs",
                    f"{len(runs)} in {len(subjects)} participant(s): " + ", ".join(f"sub-{s}" for s in subjects),
                )
            )
        rows.append(("output", str(self.output_dir)))
        if self.model is not None:
            sha = f", sha256 {self.model_sha256[:12]}…" if self.model_sha256 else ""
            rows.append(("model", f"{self.model} (variant {self.model_variant}, r = {self.model_upsample}{sha})"))
            if self.ensemble_models:
                rows.append(
                    (
                        "ensemble",
                        f"averaged with {', '.join(map(str, self.ensemble_models))} (inverse-variance weights)",
                    )
                )
        else:
            rows.append(("model", "none"))
        if device is not None and device != self.device:
            dev = f"{device} ({self.device})"
        elif self.device == "auto":
            dev = "auto (CUDA when visible, else CPU)"
        else:
            dev = self.device
        symmetric = {"none": "", "mirrors": ", test-time mirrors (8)", "cube": ", test-time cube symmetries (48)"}
        rows.append(
            (
                "inference",
                f"device {dev}, {self.precision} precision, {self.mc_samples} MC sample(s)"
                f"{symmetric[self.symmetries]}, seed {self.seed}"
                f"{', self-calibrated' if self.self_calibration else ''}",
            )
        )
        steps = f"denoise {self.denoise}, Gibbs removal {'on' if self.degibbs else 'off'}"
        if self.input_derivatives:
            steps += " by iqt-pipe, after the preprocessing pipeline's own steps (never repeated by default)"
        elif self.model_denoise is not None:
            steps += (
                " (as the model was trained)" if not self.preprocessing_warning() else " (NOT as the model was trained)"
            )
        rows.append(("preprocessing", steps))
        rows.append(("tractography", self.tractography))
        if self.tractography != "none":
            limit = (
                f"{self.uncertainty_action} where the uncertainty exceeds {self.max_uncertainty:g} mm²/s"
                if self.max_uncertainty is not None
                else "no uncertainty limit"
            )
            rows.append(("streamlines", f"{self.seed_density:g} seeds/mm³ of white matter, {limit}"))
        memory = f"{self.mem_mb} MB" if self.mem_mb is not None else "no limit"
        source = f" (from {self.use_plugin})" if self.use_plugin else ""
        rows.append(
            (
                "execution",
                f"Nipype {self.plugin}{source}: {self.nprocs} process(es), "
                f"{self.omp_nthreads} thread(s) each, memory {memory}",
            )
        )
        resumes = "exists: finished steps are reused" if self.work_dir.is_dir() else "new"
        rows.append(("work dir", f"{self.work_dir} ({resumes})"))
        flags = [
            text
            for on, text in (
                (self.stop_on_first_crash, "stop on first crash"),
                (self.write_graph, "write workflow graphs"),
                (self.boilerplate_only, "boilerplate only: methods text, then stop"),
                (self.reports_only, "reports only: rebuild the visual reports from the outputs"),
            )
            if on
        ]
        if flags:
            rows.append(("options", ", ".join(flags)))
        width = max(len(name) for name, _ in rows)
        head = f"iqt-pipe {self.version}, {self.analysis_level} level, run {self.run_uuid}"
        return "\n".join([head] + [f"  {name:<{width}}  {text}" for name, text in rows])


# -- the flat TOML form ---------------------------------------------------------------------

#: How each field is stored: "path", "labels", "json", "str", "int", "float", "bool"; "?" = may be unset.
_KINDS = {
    "bids_dir": "path",
    "output_dir": "path",
    "analysis_level": "str",
    "work_dir": "path",
    "participant_label": "labels?",
    "session_label": "labels?",
    "bids_filter_file": "path?",
    "bids_filters": "json?",
    "skip_bids_validation": "bool",
    "input_derivatives": "bool",
    "model": "path?",
    "model_variant": "str?",
    "model_upsample": "int?",
    "model_sha256": "str?",
    "ensemble_models": "paths",
    "device": "str",
    "mc_samples": "int",
    "symmetries": "str",
    "precision": "str",
    "self_calibration": "bool",
    "seed": "int",
    "denoise": "str",
    "degibbs": "bool",
    "model_denoise": "str?",
    "model_degibbs": "bool?",
    "tractography": "str",
    "seed_density": "float",
    "max_uncertainty": "float?",
    "uncertainty_action": "str",
    "nprocs": "int",
    "omp_nthreads": "int",
    "mem_mb": "int?",
    "use_plugin": "path?",
    "plugin": "str",
    "plugin_args": "json",
    "stop_on_first_crash": "bool",
    "write_graph": "bool",
    "boilerplate_only": "bool",
    "reports_only": "bool",
    "verbose": "int",
    "version": "str",
    "run_uuid": "str",
}
assert set(_KINDS) == {f.name for f in dataclasses.fields(RunConfig)}
#: Settings a file may leave out: their defaults apply (None for the unset ones).
_DEFAULTED = {
    f.name
    for f in dataclasses.fields(RunConfig)
    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
}
_CHOICES = {
    "analysis_level": ("participant", "group"),
    "device": DEVICES,
    "symmetries": SYMMETRIES,
    "precision": PRECISIONS,
    "denoise": DENOISE,
    "model_denoise": DENOISE,
    "tractography": TRACTOGRAPHY,
    "uncertainty_action": UNCERTAINTY_ACTIONS,
}


def _decode(name: str, kind: str, value: Any, source: str) -> Any:
    base = kind.rstrip("?")

    def bad(expected: str):
        return InputError(f"{source}: {name} must be {expected}, got {value!r}")

    if base == "path":
        if not isinstance(value, str) or not value:
            raise bad("a path")
        return Path(value)
    if base == "paths":
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise bad("a list of paths")
        return tuple(Path(v) for v in value)
    if base == "labels":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of labels")
        return tuple(value)
    if base == "json":
        try:
            decoded = json.loads(value) if isinstance(value, str) else None
        except json.JSONDecodeError:
            decoded = None
        if not isinstance(decoded, dict):
            raise bad("a JSON object")
        return decoded
    if base == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("a number")
        return float(value)
    if not isinstance(value, str):
        raise bad("text")
    if name in _CHOICES and value not in _CHOICES[name]:
        raise bad("one of " + ", ".join(_CHOICES[name]))
    return value


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    """One TOML value: a string, integer, float, boolean or list of strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return "[" + ", ".join(_toml_string(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to the flat TOML configuration")
