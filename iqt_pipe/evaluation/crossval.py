"""Which runs ``iqt-eval`` scores, trains and calibrates on, and its cross-validation.

Cross-validation (``iqt-eval --cross-validate``): the scored subjects are split into folds
(:func:`fold_subjects`); for each fold a model is trained with one recipe
(:class:`~iqt_pipe.sr.training.TrainSettings`) on every run of the other folds' subjects, in
``OUT_DIR/cv/fold-K/``, and scored on the held-out runs beside the other methods, its
risky-voxel threshold chosen on its training runs (:func:`cross_validate`). A fold folder that
holds a model or checkpoint is reused only when resuming (:func:`refuse_earlier_folds`).

Given models are calibrated instead on the subjects their cards name as training subjects,
when those are in the datasets and not scored (:func:`calibration_runs`).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from iqt_pipe.bids import find_dwi_runs_multi
from iqt_pipe.evaluation.protocol import Figures, Method, evaluate
from iqt_pipe.io import InputError
from iqt_pipe.models import ModelFileError, load_model
from iqt_pipe.sr.options import DEFAULT_MC_SAMPLES, DEFAULT_PRECISION, DEFAULT_SYMMETRIES
from iqt_pipe.sr.patches import build_library
from iqt_pipe.sr.training import TrainSettings, holds_training, learnt_nothing_warning, train

#: The folder of the folds' models under the output folder.
CV_DIR = "cv"


def first_runs(runs: Sequence, n: int | None) -> list:
    """The first ``n`` runs of each subject (all when ``n`` is None), order kept."""
    if n is None:
        return list(runs)
    seen: dict[str, int] = {}
    kept = []
    for run in runs:
        seen[run.subject] = seen.get(run.subject, 0) + 1
        if seen[run.subject] <= n:
            kept.append(run)
    return kept


def fold_subjects(subjects: list[str], folds: int | str) -> list[list[str]]:
    """``subjects`` dealt into ``folds`` folds in turn (``"loso"``: one fold per subject)."""
    k = len(subjects) if folds == "loso" else int(folds)
    if k > len(subjects):
        raise InputError(f"--cross-validate {folds}: only {len(subjects)} subject(s); use at most that many folds")
    return [subjects[i::k] for i in range(k)]


def fold_dir(output_dir: Path, k: int) -> Path:
    """Fold ``k``'s training folder (1-based) under ``output_dir``."""
    return Path(output_dir) / CV_DIR / f"fold-{k}"


def refuse_earlier_folds(output_dir: Path) -> None:
    """One-line error, before any data is read, when ``output_dir`` holds an earlier
    cross-validation's folds."""
    for folder in sorted((Path(output_dir) / CV_DIR).glob("fold-*")):
        if what := holds_training(folder):
            raise InputError(
                f"{folder}: holds {what} of an earlier cross-validation; add --resume to reuse "
                "and continue its folds, or choose a new --output-dir"
            )


def load_scored_model(path: Path, device, r: int | None) -> tuple:
    """``(model, card, path)``, a :class:`~iqt_pipe.evaluation.protocol.Method`'s model entry;
    an unusable model file is a one-line :class:`~iqt_pipe.io.InputError`."""
    try:
        model, card = load_model(path, device=device, expect_r=r)
    except ModelFileError as exc:
        raise InputError(str(exc)) from None
    return model, card, path


def prediction_settings(
    methods: Sequence[Method],
    symmetries: Sequence[str] = (DEFAULT_SYMMETRIES,),
    precisions: Sequence[str] = (DEFAULT_PRECISION,),
    self_calibration: bool = True,
) -> list[Method]:
    """Each model method once per test-time ``symmetries`` and ``precisions`` setting, named
    ``NAME+SETTING`` for each of the two given several settings, self-calibrated or not;
    interpolations once."""
    out = []
    for m in methods:
        if not m.is_model:
            out.append(m)
            continue
        for symmetry, precision in itertools.product(symmetries, precisions):
            name = m.name + "".join(
                f"+{s}" for s, options in ((symmetry, symmetries), (precision, precisions)) if len(options) > 1
            )
            out.append(
                replace(m, name=name, symmetries=symmetry, precision=precision, self_calibration=self_calibration)
            )
    return out


def calibration_runs(
    bids_dirs: Sequence[Path],
    methods: Sequence[Method],
    scored_subjects,
    *,
    labels: Sequence[str] | None = None,
    sessions: Sequence[str] | None = None,
    runs_per_subject: int | None = None,
) -> list:
    """The runs on which the models' risky-voxel thresholds are chosen: those of ``labels``, by
    default of the subjects the model cards were trained on that are in ``bids_dirs`` and not
    among ``scored_subjects``; the first ``runs_per_subject`` of each."""
    if labels is None:
        labels = sorted(
            {
                s.removeprefix("sub-")
                for m in methods
                for _, card, _ in m.models
                for s in card.get("training", {}).get("subjects", [])
            }
        )
        available = set()
        for d in bids_dirs:
            available |= {p.name.removeprefix("sub-") for p in Path(d).glob("sub-*") if p.is_dir()}
        labels = [s for s in labels if s in available and s not in scored_subjects]
    if not labels:
        return []
    return first_runs(find_dwi_runs_multi(bids_dirs, labels, sessions), runs_per_subject)


def recipe_record(settings: TrainSettings, library_options: dict) -> dict:
    """The folds' recipe as the results record it: the settings' options, the target, the
    patch pairs per subject and whether they came from every alignment of the block grid."""
    return {
        **settings.recipe(),
        "target": library_options["target"],
        "patches_per_subject": library_options["patches_per_subject"],
        "grid_shifts": bool(library_options.get("grid_shifts", False)),
        "register_volumes": bool(library_options.get("register_volumes", False)),
    }


def cross_validate(
    runs: Sequence,
    folds: Sequence[Sequence[str]],
    methods: Sequence[Method],
    settings: TrainSettings,
    output_dir: Path,
    *,
    library_options: dict | None = None,
    r: int = 2,
    modes: Sequence[str] = ("raw",),
    snr: float | None = None,
    mc_samples: int = DEFAULT_MC_SAMPLES,
    device="cpu",
    mem_mb: float = 1024,
    symmetries: Sequence[str] = (DEFAULT_SYMMETRIES,),
    precisions: Sequence[str] = (DEFAULT_PRECISION,),
    self_calibration: bool = True,
    runs_per_subject: int | None = None,
    resume: bool = False,
    figures: bool = True,
    quiet: bool = False,
    prog: str = "iqt-eval",
    cache_dir: Path | None = None,
) -> tuple[dict, Figures | None]:
    """Train one model per fold of subjects (``folds``) on every run of the other folds'
    subjects and score the held-out runs with ``methods`` and that model (named after the
    variant, once per ``symmetries`` × ``precisions`` setting, self-calibrated unless
    ``self_calibration`` is false), as
    :func:`~iqt_pipe.evaluation.protocol.evaluate` does with ``r``, ``modes``, ``snr``,
    ``mc_samples``, ``device`` and ``mem_mb``, seeded by ``settings.seed``.

    ``runs``: every run found; the first ``runs_per_subject`` of each subject are scored (and
    calibrated on). ``library_options``: :func:`~iqt_pipe.sr.patches.build_library`'s keywords
    (default: ``settings.library_options(r=r)``). ``resume`` reuses the folds' models and
    continues their unfinished trainings. ``cache_dir``: the folder for every fold's patch
    library and registered series (default: each fold's ``cache/``). Prints a line per fold
    and a warning for a model that learnt nothing, prefixed by ``prog``. Returns the results
    (records with their fold, thresholds per fold, folds) and the figures' data (None without
    ``figures``).
    """
    options = library_options if library_options is not None else settings.library_options(r=r)
    records, thresholds, fold_info = [], {}, []
    collected = Figures() if figures else None
    for k, held_out in enumerate(folds, 1):
        train_runs = [x for x in runs if x.subject not in held_out]  # every run of the others
        test_runs = first_runs([x for x in runs if x.subject in held_out], runs_per_subject)
        folder = fold_dir(output_dir, k)
        earlier = resume and holds_training(folder)
        print(
            f"{prog}: fold {k}: train on {', '.join(sorted({x.subject for x in train_runs}))}; "
            f"score {', '.join(held_out)}" + (f" (resuming from {earlier})" if earlier else ""),
            flush=True,
        )
        cache = cache_dir or folder / "cache"
        library = build_library(train_runs, cache_dir=cache, quiet=quiet, **options)
        result = train(
            library,
            folder,
            settings,
            device=device,
            quiet=quiet,
            resume=resume,
            data_summary={"subjects": sorted({f"sub-{x.subject}" for x in train_runs})},
        )
        if warning := learnt_nothing_warning(result.card):
            print(f"{prog}: warning: fold {k}: {warning}", file=sys.stderr)
        model = load_scored_model(result.model_path, device, r)
        fold_methods = list(methods) + prediction_settings(
            [Method(name=settings.variant, models=[model])], symmetries, precisions, self_calibration
        )
        res = evaluate(
            test_runs,
            fold_methods,
            r=r,
            modes=modes,
            snr=snr,
            seed=settings.seed,
            mc_samples=mc_samples,
            device=device,
            mem_mb=mem_mb,
            calibration_runs=first_runs(train_runs, runs_per_subject),
            quiet=quiet,
            figures=collected,
            register_volumes=bool(options.get("register_volumes", False)),
            cache_dir=cache,
        )
        for rec in res["records"]:
            rec["fold"] = k
        records += res["records"]
        thresholds[f"fold-{k}"] = res["thresholds"]
        fold_info.append(
            {
                "fold": k,
                "train": sorted({x.subject for x in train_runs}),
                "test": held_out,
                "model": str(result.model_path),
            }
        )
    return {"records": records, "thresholds": thresholds, "folds": fold_info}, collected
