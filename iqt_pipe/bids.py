"""Finding DWI runs in BIDS datasets (pybids), shared by ``iqt-train`` and the BIDS App.

:func:`find_dwi_runs` returns one :class:`DWIRun` per ``*_dwi.nii[.gz]`` with its gradient
files (resolved by BIDS inheritance, so a dataset-level ``dwi.bval`` works) and its BIDS
entities. Labels are accepted with or without the ``sub-``/``ses-`` prefix. Every failure
is an :class:`~iqt_pipe.io.InputError` whose message is one line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from iqt_pipe.io import InputError

DWI_EXTENSIONS = (".nii.gz", ".nii")
#: Entities that name a run in messages and output file names, in BIDS order.
NAME_ENTITIES = ("subject", "session", "acquisition", "direction", "run")
_PREFIX = {"subject": "sub", "session": "ses", "acquisition": "acq", "direction": "dir", "run": "run"}


@dataclass(frozen=True)
class DWIRun:
    """One DWI series of a BIDS dataset."""

    dwi: Path
    bval: Path
    bvec: Path
    entities: dict = field(default_factory=dict, compare=False, hash=False)
    dataset: Path | None = None

    @property
    def subject(self) -> str:
        return self.entities["subject"]

    @property
    def session(self) -> str | None:
        return self.entities.get("session")

    @property
    def name(self) -> str:
        """``sub-01_ses-1_acq-x_run-1``: the BIDS entities that identify the run."""
        parts = []
        for key in NAME_ENTITIES:
            value = self.entities.get(key)
            if value is not None and value != "":
                parts.append(f"{_PREFIX[key]}-{value}")
        return "_".join(parts)

    def as_dict(self) -> dict:
        return {
            "dwi": str(self.dwi), "bval": str(self.bval), "bvec": str(self.bvec),
            "dataset": str(self.dataset) if self.dataset else None,
            "entities": {k: v for k, v in self.entities.items() if k not in ("suffix", "extension")},
        }


#: A BIDS label: ASCII letters and digits only (no path tricks such as ``..`` or ``/``).
LABEL = re.compile(r"[A-Za-z0-9]+")


def strip_label(label: str, prefix: str) -> str:
    """``sub-01`` → ``01`` (and ``01`` → ``01``); ``prefix`` is ``sub`` or ``ses``."""
    label = str(label).strip()
    return label[len(prefix) + 1:] if label.startswith(f"{prefix}-") else label


def _labels(values: Iterable[str] | str | None, prefix: str) -> list[str] | None:
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    out = [strip_label(v, prefix) for v in values]
    bad = [v for v in out if not LABEL.fullmatch(v)]
    if bad:
        raise InputError(
            f"{prefix}- label {bad[0]!r} is not a BIDS label (letters and digits only, e.g. 01 or {prefix}-01)"
        )
    return list(dict.fromkeys(out))


def _layout(bids_dir: Path):
    from bids import BIDSLayout

    if not bids_dir.is_dir():
        raise InputError(f"{bids_dir}: BIDS folder not found")
    if not (bids_dir / "dataset_description.json").is_file():
        raise InputError(
            f"{bids_dir}: not a BIDS dataset (no dataset_description.json); point to the dataset's root folder"
        )
    try:
        return BIDSLayout(str(bids_dir), validate=False, derivatives=False)
    except Exception as exc:  # pybids raises several types for unreadable datasets
        raise InputError(f"{bids_dir}: cannot index as BIDS ({exc.__class__.__name__}: {exc})") from None


def _check_known(labels: list[str] | None, known: list[set], what: str, prefix: str, where) -> None:
    """Refuse the first label found in none of the datasets, listing the available ones."""
    if labels is None:
        return
    everywhere = set().union(*known)
    unknown = [label for label in labels if label not in everywhere]
    if unknown:
        raise InputError(
            f"{where}: {what} label {prefix}-{unknown[0]} not found; available: {_available(everywhere, prefix)}"
        )


def _available(values: Iterable[str], prefix: str) -> str:
    return ", ".join(f"{prefix}-{v}" for v in sorted(values)) or "none"


def find_dwi_runs(
    bids_dir: str | os.PathLike,
    participant_labels: Iterable[str] | str | None = None,
    session_labels: Iterable[str] | str | None = None,
    filters: dict | None = None,
) -> list[DWIRun]:
    """Every DWI run of a BIDS dataset, optionally restricted to some participants/sessions.

    ``filters`` adds pybids query entities (e.g. ``{"acquisition": "hr"}``; a BIDS filter
    file's ``dwi`` entry). Runs are sorted by path. Raises :class:`InputError` for a folder
    that is not BIDS, an unknown participant or session label (the message lists the
    available ones), a run without gradient files, and a selection with no DWI at all.
    """
    return find_dwi_runs_multi([bids_dir], participant_labels, session_labels, filters)


def find_dwi_runs_multi(
    bids_dirs: Sequence[str | os.PathLike],
    participant_labels: Iterable[str] | str | None = None,
    session_labels: Iterable[str] | str | None = None,
    filters: dict | None = None,
) -> list[DWIRun]:
    """:func:`find_dwi_runs` over several datasets: each label must exist in at least one of
    them, and each dataset is queried for the labels it has (datasets with none are skipped)."""
    roots = [Path(d).expanduser().absolute() for d in bids_dirs]
    if not roots:
        raise InputError("no BIDS dataset given")
    layouts = [_layout(root) for root in roots]
    subjects = _labels(participant_labels, "sub")
    sessions = _labels(session_labels, "ses")
    where = roots[0] if len(roots) == 1 else "the datasets"
    known_subjects = [set(layout.get_subjects()) for layout in layouts]
    _check_known(subjects, known_subjects, "participant", "sub", where)
    known_sessions = []
    for layout, ksub in zip(layouts, known_subjects):
        mine = [s for s in subjects if s in ksub] if subjects is not None else None
        known_sessions.append(set(layout.get_sessions(subject=mine) if mine else layout.get_sessions()))
    _check_known(sessions, known_sessions, "session", "ses", where)
    runs: list[DWIRun] = []
    for root, layout, ksub, kses in zip(roots, layouts, known_subjects, known_sessions):
        query = {"suffix": "dwi", "datatype": "dwi", "extension": list(DWI_EXTENSIONS), **(filters or {})}
        if subjects is not None:
            query["subject"] = [s for s in subjects if s in ksub]
            if not query["subject"]:
                continue
        if sessions is not None:
            query["session"] = [s for s in sessions if s in kses]
            if not query["session"]:
                continue
        try:
            files = layout.get(return_type="object", **query)
        except Exception as exc:  # e.g. an unknown entity in filters
            raise InputError(f"{root}: bad DWI query {query} ({exc})") from None
        for f in sorted(files, key=lambda f: f.path):
            bval, bvec = _gradient_files(layout, Path(f.path))
            runs.append(DWIRun(Path(f.path), bval, bvec, dict(f.get_entities()), root))
    if not runs:
        which = ""
        if subjects is not None:
            which += " for " + ", ".join(f"sub-{s}" for s in subjects)
        if sessions is not None:
            which += (" and " if which else " for ") + ", ".join(f"ses-{s}" for s in sessions)
        raise InputError(f"{where}: no DWI series (sub-*/[ses-*/]dwi/*_dwi.nii[.gz]) found{which}")
    return runs


def _gradient_files(layout, dwi: Path) -> tuple[Path, Path]:
    out = []
    for kind, getter in (("bval", layout.get_bval), ("bvec", layout.get_bvec)):
        try:
            path = getter(str(dwi))
        except Exception:  # pybids raises when nothing matches
            path = None
        if not path:
            raise InputError(f"{dwi}: no .{kind} file found for this DWI series; add {dwi.name.split('.')[0]}.{kind}")
        out.append(Path(path))
    return out[0], out[1]
