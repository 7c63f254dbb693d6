"""Finding DWI runs in BIDS datasets (pybids), shared by ``iqt-train``, ``iqt-eval`` and the BIDS App.

:func:`find_dwi_runs` returns one :class:`DWIRun` per DWI series with its gradient files
(resolved by BIDS inheritance, so a dataset-level ``dwi.bval`` works) and its BIDS entities.
Labels are accepted with or without the ``sub-``/``ses-`` prefix. Every failure is an
:class:`~iqt_pipe.io.InputError` whose message is one line.

- **Entities come from the path below the dataset root**, never from the folders above it:
  pybids 0.22 matches its entity patterns against absolute paths, so a dataset copied to
  ``/scratch/sub-07_work/run-3/bids`` would give every file ``sub-07`` and ``run-3``
  (bids-standard/pybids#595, #1270; fixed in #1273, not released). :func:`index_layout` indexes
  with an indexer that matches the root-relative path instead, and gradient files are found
  from the indexed entities, not by pybids' ``get_nearest`` (which parses the absolute path).
- **Only the selected participants are indexed** (as fMRIPrep does): a job-array task on a
  dataset of thousands of subjects lists the ``sub-*`` folders and indexes its own, so it
  starts in well under a second and never reads another subject's (possibly broken) files.
- **Preprocessed input**: a BIDS-derivatives dataset (``DatasetType: derivative``, e.g.
  QSIPrep's output) gives its ``*_desc-preproc_dwi.nii[.gz]`` series, each with the
  ``*_desc-brain_mask.nii[.gz]`` of the same entities when there is one, and what its
  pipeline did to the series (:func:`upstream_steps`).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from iqt_pipe.io import InputError

if TYPE_CHECKING:
    from iqt_pipe.dmri.prepare import Preprocessing

DWI_EXTENSIONS = (".nii.gz", ".nii")
#: Entities that name a run in messages and output file names, in BIDS order.
NAME_ENTITIES = ("subject", "session", "acquisition", "reconstruction", "direction", "run", "space")
_PREFIX = {
    "subject": "sub",
    "session": "ses",
    "acquisition": "acq",
    "reconstruction": "rec",
    "direction": "dir",
    "run": "run",
    "space": "space",
}
#: ``desc-`` label of the preprocessed series in a derivatives dataset (QSIPrep, fMRIPrep's convention).
PREPROC_DESC = "preproc"
#: Folders of a dataset that never hold DWI runs (pybids' default ignore list, plus derivatives).
_NOT_INDEXED = ("code", "stimuli", "sourcedata", "models", "derivatives", re.compile(r"^/\."))
#: Entities a gradient file or mask shares with its series (the rest say what the file is).
_FILE_KIND = ("suffix", "extension", "desc")


@dataclass(frozen=True)
class UpstreamSteps:
    """What the pipeline that wrote a derivatives dataset did to its DWI series before
    iqt-pipe sees them, in iqt-pipe's terms, and the file that says so."""

    preprocessing: Preprocessing
    pipeline: str
    evidence: str

    def describe(self) -> str:
        return f"{self.pipeline}: {self.evidence}"


@dataclass(frozen=True)
class DWIRun:
    """One DWI series of a BIDS dataset (raw, or preprocessed in a derivatives dataset)."""

    dwi: Path
    bval: Path
    bvec: Path
    entities: dict = field(default_factory=dict, compare=False, hash=False)
    dataset: Path | None = None
    #: Brain mask given with a preprocessed series (same grid), else None.
    mask: Path | None = None
    #: The series comes from a BIDS-derivatives dataset (already preprocessed).
    derivative: bool = False
    #: What that dataset's pipeline did to it, where the dataset records it (else None).
    upstream: UpstreamSteps | None = field(default=None, compare=False, hash=False)

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
            "dwi": str(self.dwi),
            "bval": str(self.bval),
            "bvec": str(self.bvec),
            "dataset": str(self.dataset) if self.dataset else None,
            **({"mask": str(self.mask)} if self.mask else {}),
            "entities": {k: v for k, v in self.entities.items() if k not in ("suffix", "extension")},
        }


#: A BIDS label: ASCII letters and digits only (no path tricks such as ``..`` or ``/``).
LABEL = re.compile(r"[A-Za-z0-9]+")


def strip_label(label: str, prefix: str) -> str:
    """``sub-01`` → ``01`` (and ``01`` → ``01``); ``prefix`` is ``sub`` or ``ses``."""
    label = str(label).strip()
    return label[len(prefix) + 1 :] if label.startswith(f"{prefix}-") else label


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


def dataset_description(root: Path) -> dict:
    """``dataset_description.json`` of a dataset root; a missing or unreadable one is an
    :class:`InputError` naming the fix."""
    if not root.is_dir():
        raise InputError(f"{root}: folder not found; give the root folder of a BIDS dataset")
    path = root / "dataset_description.json"
    if not path.is_file():
        inner = sorted(p.parent for p in root.glob("*/dataset_description.json") if p.parent.name != "derivatives")
        hint = f" (did you mean {inner[0]}?)" if len(inner) == 1 else ""
        raise InputError(
            f"{root}: not a BIDS dataset (no dataset_description.json); point to the dataset's root "
            f"folder, which holds dataset_description.json and sub-*/{hint}"
        )
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); fix the file (the BIDS validator shows how)") from None
    if not isinstance(description, dict):
        raise InputError(f"{path}: must hold a JSON object with at least Name and BIDSVersion")
    return description


def is_derivative(root: str | os.PathLike) -> bool:
    """Whether the dataset at ``root`` declares ``"DatasetType": "derivative"``."""
    return dataset_description(Path(root)).get("DatasetType") == "derivative"


def pipeline_name(root: str | os.PathLike) -> str:
    """The first ``GeneratedBy`` name of a derivatives dataset (``"a pipeline"`` without one)."""
    generated = dataset_description(Path(root)).get("GeneratedBy") or [{}]
    name = generated[0].get("Name") if isinstance(generated, list) and isinstance(generated[0], dict) else None
    return str(name) if name else "a pipeline"


def subject_folders(root: Path) -> set[str]:
    """Labels of the ``sub-<label>`` folders at a dataset root (one directory listing)."""
    try:
        entries = list(os.scandir(root))
    except OSError as exc:
        raise InputError(f"{root}: cannot list the dataset folder ({exc.strerror or exc})") from None
    return {e.name[4:] for e in entries if e.name.startswith("sub-") and LABEL.fullmatch(e.name[4:]) and e.is_dir()}


def index_layout(
    root: str | os.PathLike, *, config=("bids",), subjects: Iterable[str] | None = None, index_metadata: bool = True
):
    """A pybids ``BIDSLayout`` of ``root`` whose entities come from each file's path below
    ``root`` only; with ``subjects``, only those ``sub-<label>`` folders are indexed (the
    dataset's top-level files always are)."""
    from bids import BIDSLayout

    root = Path(root)
    ignore = list(_NOT_INDEXED)
    if subjects is not None:
        keep = "|".join(re.escape(s) for s in subjects) or "(?!)"
        ignore.append(re.compile(rf"^/sub-(?!(?:{keep})(?:/|$))"))
    indexer = _root_relative_indexer()(validate=False, ignore=ignore, index_metadata=index_metadata)
    try:
        return BIDSLayout(str(root), validate=False, derivatives=False, config=list(config), indexer=indexer)
    except Exception as exc:  # pybids raises several types for unreadable datasets
        raise InputError(f"{root}: cannot index as BIDS ({exc.__class__.__name__}: {exc})") from None


@lru_cache(maxsize=1)
def _root_relative_indexer():
    """pybids' indexer, matching entity patterns against ``/<path below the root>`` (the fix
    of bids-standard/pybids#1273) instead of the absolute path."""
    from bids import BIDSLayoutIndexer
    from bids.layout.models import _create_tag_dict
    from bids.layout.utils import make_bidsfile

    class RootRelativeIndexer(BIDSLayoutIndexer):
        def _index_file(self, abs_fn, entities):
            bf = make_bidsfile(abs_fn)
            below = "/" + Path(str(abs_fn)).relative_to(Path(self._layout._root.path)).as_posix()
            tags = []
            for entity in entities.values():
                match = entity.regex.search(below) if entity.regex is not None else None
                value = entity._astype(match.group(1)) if match is not None else None
                if value is None:
                    if entity.mandatory:
                        break
                    continue
                tags.append(_create_tag_dict(bf, entity, value, entity._dtype))
            return bf, tags

    return RootRelativeIndexer


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
    values = sorted(values)
    more = f" and {len(values) - 20} more" if len(values) > 20 else ""
    return (", ".join(f"{prefix}-{v}" for v in values[:20]) + more) or "none"


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
    derivative = [is_derivative(root) for root in roots]
    subjects = _labels(participant_labels, "sub")
    sessions = _labels(session_labels, "ses")
    where = roots[0] if len(roots) == 1 else "the datasets"
    folders = [subject_folders(root) for root in roots]
    _check_known(subjects, folders, "participant", "sub", where)
    mine = [sorted(s for s in subjects if s in have) if subjects is not None else None for have in folders]
    layouts = [
        index_layout(root, config=("bids", "derivatives") if deriv else ("bids",), subjects=sel)
        if sel is None or sel
        else None
        for root, deriv, sel in zip(roots, derivative, mine)
    ]
    known_sessions = [set(layout.get_sessions()) if layout is not None else set() for layout in layouts]
    _check_known(sessions, known_sessions, "session", "ses", where)
    runs: list[DWIRun] = []
    for root, layout, deriv, kses in zip(roots, layouts, derivative, known_sessions):
        if layout is None:
            continue
        query = {
            "suffix": "dwi",
            "datatype": "dwi",
            "extension": list(DWI_EXTENSIONS),
            **({"desc": PREPROC_DESC} if deriv else {}),
            **(filters or {}),
        }
        if sessions is not None:
            query["session"] = [s for s in sessions if s in kses]
            if not query["session"]:
                continue
        try:
            files = layout.get(return_type="object", **query)
        except Exception as exc:  # e.g. an unknown entity in filters
            raise InputError(f"{root}: bad DWI query {query} ({exc})") from None
        siblings = _files_by_folder(layout, deriv)
        upstream: dict[str, UpstreamSteps | None] = {}
        for f in sorted(files, key=lambda f: f.path):
            entities = dict(f.get_entities(metadata=False))
            bval, bvec = (_gradient_file(siblings, f, entities, root, kind) for kind in ("bval", "bvec"))
            mask = _mask_file(siblings, f, entities) if deriv else None
            entities = dict(f.get_entities())  # with the sidecar's metadata, as pybids gives them
            subject = entities["subject"]
            if deriv and subject not in upstream:
                upstream[subject] = upstream_steps(root, subject)
            runs.append(
                DWIRun(
                    Path(f.path),
                    bval,
                    bvec,
                    entities,
                    root,
                    mask=mask,
                    derivative=deriv,
                    upstream=upstream.get(subject),
                )
            )
    if not runs:
        which = ""
        if subjects is not None:
            which += " for " + ", ".join(f"sub-{s}" for s in subjects)
        if sessions is not None:
            which += (" and " if which else " for ") + ", ".join(f"ses-{s}" for s in sessions)
        pattern = (
            f"sub-*/[ses-*/]dwi/*_desc-{PREPROC_DESC}_dwi.nii[.gz], a derivatives dataset"
            if all(derivative)
            else "sub-*/[ses-*/]dwi/*_dwi.nii[.gz]"
        )
        raise InputError(f"{where}: no DWI series ({pattern}) found{which}")
    return runs


def _files_by_folder(layout, derivative: bool) -> dict[str, list]:
    """Gradient files (and, in a derivatives dataset, brain masks) by folder."""
    found = layout.get(return_type="object", suffix="dwi", extension=[".bval", ".bvec"])
    if derivative:
        found += layout.get(return_type="object", suffix="mask", desc="brain", extension=list(DWI_EXTENSIONS))
    folders: dict[str, list] = {}
    for f in found:
        folders.setdefault(str(Path(f.path).parent), []).append(f)
    return folders


def _shared(entities: dict) -> dict:
    return {k: v for k, v in entities.items() if k not in _FILE_KIND}


def _gradient_file(siblings: dict, dwi, entities: dict, root: Path, kind: str) -> Path:
    """The nearest ``.bval``/``.bvec`` by BIDS inheritance: in the series' folder or a folder
    above it (up to the root), every entity of its name shared by the series, the most
    specific first."""
    mine = _shared(entities)
    folder = Path(dwi.path).parent
    while True:
        matches = []
        for f in siblings.get(str(folder), []):
            theirs = f.get_entities(metadata=False)
            if theirs.get("extension") != f".{kind}" or theirs.get("desc") != entities.get("desc"):
                continue
            theirs = _shared(theirs)
            if all(mine.get(k) == v for k, v in theirs.items()):
                matches.append((len(theirs), f.path))
        if matches:
            return Path(max(matches)[1])
        if folder == root or folder == folder.parent:
            break
        folder = folder.parent
    dwi_path = Path(dwi.path)
    raise InputError(f"{dwi_path}: no .{kind} file found for this DWI series; add {dwi_path.name.split('.')[0]}.{kind}")


def _mask_file(siblings: dict, dwi, entities: dict) -> Path | None:
    """The ``desc-brain`` mask beside a preprocessed series with exactly its other entities."""
    mine = _shared(entities)
    for f in siblings.get(str(Path(dwi.path).parent), []):
        theirs = f.get_entities(metadata=False)
        if theirs.get("suffix") == "mask" and _shared(theirs) == mine:
            return Path(f.path)
    return None


#: QSIPrep's ``--denoise-method`` values in iqt-pipe's terms (``Preprocessing.denoise``).
_QSIPREP_DENOISE = {"none": "none", "dwidenoise": "mrtrix", "dwidenoise2": "mrtrix", "patch2self": "dipy"}


def upstream_steps(root: str | os.PathLike, subject: str) -> UpstreamSteps | None:
    """Denoising and Gibbs-ringing removal that a derivatives dataset's pipeline applied to
    one subject's series, where the dataset records them: QSIPrep archives its run
    configuration as ``sub-<label>/log/<run>/qsiprep.toml`` (``[workflow] denoise_method``,
    ``unringing_method``; the latest run counts). None where nothing says so."""
    from iqt_pipe.dmri.prepare import Preprocessing

    root = Path(root)
    logs = sorted((root / f"sub-{subject}" / "log").glob("*/qsiprep.toml"))
    if not logs:
        return None
    try:
        workflow = tomllib.loads(logs[-1].read_text(encoding="utf-8")).get("workflow", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    method = str(workflow.get("denoise_method") or "").split(";")[0]
    if method not in _QSIPREP_DENOISE:
        return None
    unringing = str(workflow.get("unringing_method") or "none")  # QSIPrep leaves it out when unset
    return UpstreamSteps(
        Preprocessing(_QSIPREP_DENOISE[method], unringing != "none"),
        "QSIPrep",
        f"{logs[-1].relative_to(root)}: denoise_method {method}, unringing_method {unringing}",
    )
