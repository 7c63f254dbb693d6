"""What an iqt-pipe output folder holds for one participant: its DWI runs' derivatives, its
log folders (archived run configuration, crash files) and the raw inputs they came from.

Derivative names come from the path patterns of ``iqt_pipe/data/io_spec.json`` (the same ones
the data sinks use), figure names from :data:`FIGURE_PATTERN`; none is assembled by hand.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from iqt_pipe.io import InputError, sidecar_path
from iqt_pipe.qc import ENTITIES

#: Where reportlets go: ``sub-<label>/figures/`` (nireports' layout), named after the run.
FIGURE_PATTERN = (
    "sub-{subject}/figures/sub-{subject}[_ses-{session}][_acq-{acquisition}][_rec-{reconstruction}]"
    "[_dir-{direction}][_run-{run}][_part-{part}][_space-{space}]_desc-{desc}_{suffix<dwi>|dwi}{extension<.svg|.png|.html>|.svg}"
)
#: Name of the run configuration archived in each log folder (as :data:`iqt_pipe.config.CONFIG_NAME`).
CONFIG_NAME = "iqt-pipe.toml"

_TENSOR = {"model": "tensor", "suffix": "dwimap", "extension": ".nii.gz"}
_MASK = {"desc": "brain", "suffix": "mask", "extension": ".nii.gz"}
#: Derivatives of one run: key → entities beyond the run's own (see workflows/outputs.py).
DERIVATIVES: dict[str, dict[str, str]] = {
    "tensor": {**_TENSOR, "param": "tensor"},
    "fa": {**_TENSOR, "param": "fa"},
    "md": {**_TENSOR, "param": "md"},
    "mask": dict(_MASK),
    "sr_tensor": {**_TENSOR, "res": "hi", "param": "tensor"},
    "sr_fa": {**_TENSOR, "res": "hi", "param": "fa"},
    "sr_fa_sd": {**_TENSOR, "res": "hi", "param": "fa", "desc": "sd"},
    "sr_md": {**_TENSOR, "res": "hi", "param": "md"},
    "sr_md_sd": {**_TENSOR, "res": "hi", "param": "md", "desc": "sd"},
    "sr_sd_intrinsic": {**_TENSOR, "res": "hi", "param": "tensor", "desc": "intrinsicsd"},
    "sr_sd_parameter": {**_TENSOR, "res": "hi", "param": "tensor", "desc": "parametersd"},
    "sr_sd_total": {**_TENSOR, "res": "hi", "param": "tensor", "desc": "totalsd"},
    "sr_mask": {**_MASK, "res": "hi"},
    "tract_summary": {"model": "tensor", "desc": "summary", "suffix": "tractogram", "extension": ".tsv"},
}
#: Derivatives every processed run has (the uncertainty maps depend on the model).
REQUIRED = ("tensor", "fa", "md", "mask", "sr_tensor", "sr_fa", "sr_fa_sd", "sr_md", "sr_md_sd", "sr_mask")


@lru_cache(maxsize=1)
def _io_spec() -> tuple[Any, list[str]]:
    from importlib.resources import files

    from bids.layout.models import Config

    spec = json.loads(files("iqt_pipe.data").joinpath("io_spec.json").read_text())
    config = Config.load({key: spec[key] for key in ("name", "entities", "default_path_patterns")})
    return config, list(spec["default_path_patterns"])


def parse_entities(path: str | os.PathLike) -> dict[str, Any]:
    """BIDS entities of a derivative's file name (``io_spec.json``'s entities), read from the
    name alone: the folders above the output folder may have entity-like names."""
    from bids.layout import parse_file_entities

    return parse_file_entities("/" + Path(path).name, config=[_io_spec()[0]])


def derivative_path(output_dir: str | os.PathLike, entities: dict[str, Any]) -> Path:
    """Where the derivative with these entities lives (``io_spec.json``'s path patterns)."""
    from bids.layout.writing import build_path

    rel = build_path(entities, _io_spec()[1])
    if rel is None:
        raise ValueError(f"no io_spec.json path pattern for {entities}")
    return Path(output_dir) / rel


def figure_path(output_dir: str | os.PathLike, entities: dict[str, Any], desc: str, extension: str) -> Path:
    """``sub-<label>/figures/<run entities>_desc-<desc>_dwi<extension>``."""
    from bids.layout.writing import build_path

    source = {k: v for k, v in entities.items() if k in ENTITIES and v not in (None, "")}
    return Path(output_dir) / build_path(
        {**source, "desc": desc, "suffix": "dwi", "extension": extension}, [FIGURE_PATTERN]
    )


def run_label(entities: dict[str, Any]) -> str:
    """``sub-01_ses-1_run-1``: the run's source entities."""
    return "_".join(
        f"{short}-{entities[key]}" for key, short in ENTITIES.items() if entities.get(key) not in (None, "")
    )


@dataclass
class Tract:
    """One tractogram of a run: ``native`` or ``sr`` tensors, its ``track`` label (e.g. ``dipydet``)."""

    space: str
    track: str
    path: Path

    @property
    def sidecar(self) -> Path:
        return self.path.with_suffix(".json")


@dataclass
class RunOutputs:
    """The derivatives of one DWI run found in an output folder."""

    entities: dict[str, Any]
    files: dict[str, Path]
    tracts: list[Tract] = field(default_factory=list)

    @property
    def name(self) -> str:
        return run_label(self.entities)

    @property
    def missing(self) -> list[str]:
        return [key for key in REQUIRED if key not in self.files]

    def sidecar(self, key: str) -> dict[str, Any]:
        """The JSON sidecar of a derivative (empty when absent or unreadable)."""
        path = self.files.get(key)
        if path is None:
            return {}
        try:
            return json.loads(sidecar_path(path).read_text())
        except (OSError, json.JSONDecodeError):
            return {}


def find_runs(output_dir: str | os.PathLike, subject: str) -> list[RunOutputs]:
    """Every run of ``sub-<subject>`` with a native FA map, and the derivatives present for it
    (tractograms: ``.tck`` files, with their ``.tsv`` of per-streamline uncertainty, or ``.trk``
    where there is no ``.tck``: nibabel reads a ``.tck`` several times faster)."""
    out = Path(output_dir)
    root = out / f"sub-{subject}"
    runs = []
    natives = sorted(root.glob("dwi/*_model-tensor_param-fa_dwimap.nii.gz")) + sorted(
        root.glob("ses-*/dwi/*_model-tensor_param-fa_dwimap.nii.gz")
    )
    for path in natives:
        entities = parse_entities(path)
        if entities.get("res") or entities.get("desc"):
            continue
        source = {k: v for k, v in entities.items() if k in ENTITIES}
        files = {}
        for key, query in DERIVATIVES.items():
            candidate = derivative_path(out, {**source, **query})
            if candidate.exists():
                files[key] = candidate
        tracts = []
        for tract in sorted(path.parent.glob("*_tractogram.tck")) + sorted(path.parent.glob("*_tractogram.trk")):
            ent = parse_entities(tract)
            if {k: v for k, v in ent.items() if k in ENTITIES} != source or not ent.get("track") or ent.get("desc"):
                continue
            space = "sr" if ent.get("res") else "native"
            if any(t.space == space and t.track == ent["track"] for t in tracts):
                continue  # the .tck is listed first
            tracts.append(Tract(space, ent["track"], tract))
        runs.append(RunOutputs(source, files, tracts))
    return runs


def log_dirs(output_dir: str | os.PathLike, subject: str) -> list[Path]:
    """``sub-<label>/log/<run_uuid>`` folders, oldest first (run ids start with the start time)."""
    root = Path(output_dir) / f"sub-{subject}" / "log"
    return sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []


def crash_files(log_dir: Path | None) -> list[Path]:
    return sorted(log_dir.glob("crash-*.txt")) if log_dir is not None and log_dir.is_dir() else []


def subjects_with_outputs(
    output_dir: str | os.PathLike, labels: list[str] | tuple[str, ...] | None = None
) -> list[str]:
    """Participants of an output folder that a report can be built for (derivatives or logs);
    ``labels`` restricts them and must all be there. Raises :class:`InputError` (one line)
    when there is nothing to build from."""
    out = Path(output_dir)
    hint = "run the participant level into it first"
    if not out.is_dir():
        raise InputError(f"{out}: output folder not found; {hint}")

    def has_outputs(label: str) -> bool:
        return bool(find_runs(out, label)) or bool(log_dirs(out, label))

    if labels:
        missing = [label for label in labels if not has_outputs(label)]
        if missing:
            names = ", ".join(f"sub-{m}" for m in missing)
            raise InputError(
                f"{out}: no iqt-pipe outputs of {names} to build reports from; run its participant level first"
            )
        return list(labels)
    found = sorted(p.name[4:] for p in out.glob("sub-*") if p.is_dir() and has_outputs(p.name[4:]))
    if not found:
        raise InputError(f"{out}: no iqt-pipe participant outputs to build reports from; {hint}")
    return found
