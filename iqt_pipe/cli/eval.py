"""``iqt-eval``: score super-resolution methods against HR references made from BIDS DWI.

Examples::

    iqt-eval /data/ds-realdwi -o eval/ --participant-label prisma01      # the bundled model
    iqt-eval /data/ds-realdwi -o eval/ --model model.safetensors --participant-label prisma01
    iqt-eval /data/ds-realdwi -o eval/ --model a.safetensors --ensemble a.safetensors b.safetensors \\
        --mode raw known-truth lesion --calibration-label trio01
    iqt-eval /data/ds-realdwi -o eval-cv/ --cross-validate 2 --epochs 8     # train per fold, score held-out
    iqt-eval /data/ds-realdwi -o eval-cv/ --cross-validate loso --variant espcn --loss-mask brain
    iqt-eval /data/ds-realdwi -o eval-cv/ --cross-validate loso --variant espcn --loss-mask brain --resume  # if stopped

Each run's DWI is the HR reference; the LR input is made by the IQT degradation. Nearest,
trilinear and cubic B-spline interpolation of the LR tensors are scored beside every
``--model`` (one method each) and ``--ensemble`` (one method per list). Outputs in OUT_DIR:
``results.json`` (every number), ``results.md`` (tables), ``figures/`` (calibration curve,
error vs uncertainty, slice maps). See :mod:`iqt_pipe.evaluation.protocol` for the protocol
and :mod:`iqt_pipe.evaluation.crossval` for the cross-validation.

Exit codes: 0 success, 1 unexpected failure, 2 bad command line or input (one line on stderr).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from iqt_pipe import __version__
from iqt_pipe.cli._common import Parser, int_at_least, positive_float, run_guarded
from iqt_pipe.cli.parser import default_nprocs

PROG = "iqt-eval"
BASELINES = ("nearest", "trilinear", "cubic")


def _folds(text: str) -> int | str:
    if text == "loso":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 2:
        raise argparse.ArgumentTypeError(f"--cross-validate takes 'loso' or a number of folds ≥ 2, got {text!r}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Score super-resolution (interpolation, models, ensembles) against HR "
        "references made from BIDS DWI runs: accuracy and calibrated uncertainty.",
    )
    _add_data_arguments(p)
    _add_method_arguments(p)
    _add_mode_arguments(p)
    _add_prediction_arguments(p)
    _add_cross_validation_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The datasets, the output folder and the participants and sessions scored."""
    p.add_argument("bids_dirs", nargs="+", type=Path, metavar="BIDS_DIR", help="BIDS dataset root(s)")
    p.add_argument(
        "-o",
        "--output-dir",
        type=Path,
        required=True,
        metavar="OUT_DIR",
        help="folder for results.json, results.md and figures/",
    )
    p.add_argument("--participant-label", nargs="+", metavar="L", help="participants to score (default: all)")
    p.add_argument("--session-label", nargs="+", metavar="S", help="sessions to score (default: all)")
    p.add_argument(
        "--register-volumes",
        action="store_true",
        help="register the DTI volumes of each raw series to each other (DIPY, affine: head motion "
        "and eddy currents) before the reference and the LR series are made, as QSIPrep's series "
        "are (with --cross-validate, the training series too; default: off, the series as acquired)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="folder where registered series are kept and reused (iqt-train's --cache-dir shares them; "
        "with --cross-validate, the patch libraries too; default: none, or each fold's cache/)",
    )


def _add_method_arguments(p: argparse.ArgumentParser) -> None:
    """The methods scored: models, ensembles and interpolation baselines."""
    p.add_argument(
        "--model",
        nargs="+",
        type=Path,
        default=[],
        metavar="PATH",
        help="model file(s) to score, each as its own method (default, without --ensemble or "
        "--cross-validate: the bundled model)",
    )
    p.add_argument(
        "--ensemble",
        nargs="+",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="model files scored together as one inverse-variance-weighted ensemble (repeatable)",
    )
    p.add_argument(
        "--baselines",
        nargs="*",
        choices=BASELINES,
        default=list(BASELINES),
        help="interpolation baselines (default: all three; cubic is the reference of the ratios)",
    )


def _add_mode_arguments(p: argparse.ArgumentParser) -> None:
    """The evaluation modes, their noise level and the calibration participants."""
    from iqt_pipe.evaluation.protocol import MODES

    p.add_argument(
        "--mode",
        nargs="+",
        choices=MODES,
        default=["raw"],
        help="raw: the scan is the reference; known-truth: synthetic noisy HR series from the "
        "denoised scan's tensors, scored against the noise-free truth; lesion: a tumour-like "
        "lesion inserted before degradation (uncertainty AUC) (default: raw)",
    )
    p.add_argument(
        "--snr",
        type=positive_float("the SNR"),
        metavar="X",
        help="known-truth mode: b=0 SNR of the added Rician noise (default: each run's own, from MP-PCA)",
    )
    p.add_argument(
        "--calibration-label",
        nargs="+",
        metavar="L",
        help="participants (not scored) on which the risky-voxel threshold is chosen; default: the "
        "model cards' training subjects found in BIDS_DIR and not scored",
    )


def _add_prediction_arguments(p: argparse.ArgumentParser) -> None:
    """How the models predict (r, sampling, symmetries, precision, device, memory) and what is written."""
    from iqt_pipe.sr.options import DEFAULT_MC_SAMPLES, DEFAULT_PRECISION, DEFAULT_SYMMETRIES, PRECISIONS, SYMMETRIES

    p.add_argument(
        "-r",
        "--upsample",
        type=int_at_least(2, "the upsampling factor"),
        metavar="R",
        help="upsampling factor (default: the models', else 2)",
    )
    p.add_argument(
        "--mc-samples",
        type=int_at_least(1, "the number of Monte-Carlo samples"),
        default=DEFAULT_MC_SAMPLES,
        metavar="T",
        help=f"Monte-Carlo weight samples per model (default: {DEFAULT_MC_SAMPLES})",
    )
    p.add_argument(
        "--symmetries",
        nargs="+",
        choices=list(SYMMETRIES),
        default=[DEFAULT_SYMMETRIES],
        help="test-time symmetry ensemble of every model, as iqt-pipe's --symmetries; several: each "
        f"model is scored once per setting, named MODEL+SETTING (default: {DEFAULT_SYMMETRIES})",
    )
    p.add_argument(
        "--precision",
        nargs="+",
        choices=PRECISIONS,
        default=[DEFAULT_PRECISION],
        help="the network's arithmetic, as iqt-pipe's --precision; several: each model is scored once "
        f"per setting, as --symmetries (default: {DEFAULT_PRECISION})",
    )
    p.add_argument(
        "--no-self-calibration",
        action="store_true",
        help="as iqt-pipe's: keep the models' own variance calibration, not scaled to their errors on "
        "each run's series degraded once more",
    )
    p.add_argument("--seed", type=int_at_least(0, "the seed"), default=0, metavar="N", help="random seed (default: 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="compute device (default: auto)")
    p.add_argument(
        "--mem-mb",
        type=int_at_least(256, "--mem-mb"),
        default=2048,
        metavar="MB",
        help="memory budget for prediction tiles (default: 2048)",
    )
    p.add_argument(
        "--nprocs",
        type=int_at_least(1, "--nprocs"),
        default=default_nprocs(),
        metavar="N",
        help="processes for MP-PCA of the reference scans (the noise floor; identical result with any "
        "number) and for --register-volumes (default: this machine's cores)",
    )
    p.add_argument(
        "--runs-per-subject",
        type=int_at_least(1, "--runs-per-subject"),
        metavar="N",
        help="score (and calibrate on) only the first N DWI runs of each subject (default: all)",
    )
    p.add_argument("--no-figures", action="store_true", help="write the tables only")


def _add_cross_validation_arguments(p: argparse.ArgumentParser) -> None:
    """The "cross-validation" group: folds, resuming, and iqt-train's recipe options."""
    from iqt_pipe.cli.train import add_recipe_arguments

    cv = p.add_argument_group("cross-validation (one model per fold, trained with iqt-train's recipe options)")
    cv.add_argument(
        "--cross-validate",
        type=_folds,
        metavar="{loso,K}",
        help="split the subjects into K folds (loso: one per subject), train on the others, score "
        "the held-out fold; the training subjects choose the risky-voxel threshold",
    )
    cv.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted --cross-validate in OUT_DIR (same folds and recipe): finished "
        "folds' models are reused, an unfinished fold resumes from its last epoch",
    )
    add_recipe_arguments(cv)


def _methods(args, device):
    from iqt_pipe.evaluation.crossval import load_scored_model, prediction_settings
    from iqt_pipe.evaluation.protocol import Method, interpolation_methods
    from iqt_pipe.io import InputError

    methods = interpolation_methods(args.baselines)
    loaded = {}
    r = args.upsample
    for path in args.model + [p for group in args.ensemble for p in group]:
        if path not in loaded:
            if not path.exists():
                raise InputError(f"{path}: model file not found; pass a model.safetensors written by iqt-train")
            loaded[path] = load_scored_model(path, device, r)
            r = r or loaded[path][1]["upsample"]
    names = set()
    for path in args.model:
        name = path.parent.name if path.name.startswith("model.") else path.name.split(".")[0]
        while name in names or name in args.baselines:
            name += "'"
        names.add(name)
        methods.append(Method(name=name, models=[loaded[path]]))
    for i, group in enumerate(args.ensemble, 1):
        methods.append(Method(name=f"ensemble{i}", models=[loaded[p] for p in group]))
    return prediction_settings(methods, args.symmetries, args.precision, not args.no_self_calibration), r or 2


def _finite(obj):
    """JSON-ready copy: numpy scalars as Python numbers, NaN/inf as null (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "item"):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def run(args: argparse.Namespace) -> int:
    from iqt_pipe.bids import find_dwi_runs_multi
    from iqt_pipe.cli.train import library_options, train_settings
    from iqt_pipe.evaluation import crossval
    from iqt_pipe.evaluation.protocol import summarise
    from iqt_pipe.io import InputError
    from iqt_pipe.sr.inference import resolve_device

    settings = train_settings(args) if args.cross_validate else None
    if args.cross_validate:
        settings.check()
    elif args.resume:
        raise InputError("--resume continues a --cross-validate run; give --cross-validate as before")
    device = resolve_device(args.device)
    if not args.model and not args.ensemble and not args.cross_validate:
        from iqt_pipe.models.files import bundled_model

        args.model = [bundled_model(args.upsample or 2)]
    if "cubic" not in args.baselines:
        logging.getLogger(PROG).warning("without the cubic baseline no ratios are reported")
    out = args.output_dir
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; choose another --output-dir")
    if args.cross_validate and not args.resume:
        crossval.refuse_earlier_folds(out)
    methods, r = _methods(args, device)
    args.upsample = r
    all_runs = find_dwi_runs_multi(args.bids_dirs, args.participant_label, args.session_label)
    runs = crossval.first_runs(all_runs, args.runs_per_subject)
    scored = {x.subject for x in runs}
    folds = crossval.fold_subjects(sorted(scored), args.cross_validate) if args.cross_validate else None
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"{PROG}: {len(runs)} DWI run(s) of {len(scored)} subject(s); methods: "
        f"{', '.join(m.name for m in methods) + (' + one model per fold' if args.cross_validate else '')}; "
        f"modes: {', '.join(args.mode)}; r = {r}",
        flush=True,
    )
    if args.cross_validate:
        options = library_options(args)
        results, figures = crossval.cross_validate(
            all_runs,
            folds,
            methods,
            settings,
            out,
            library_options=options,
            r=r,
            modes=args.mode,
            snr=args.snr,
            mc_samples=args.mc_samples,
            device=device,
            mem_mb=args.mem_mb,
            symmetries=args.symmetries,
            precisions=args.precision,
            self_calibration=not args.no_self_calibration,
            runs_per_subject=args.runs_per_subject,
            resume=args.resume,
            cache_dir=args.cache_dir,
            figures=not args.no_figures,
            quiet=args.quiet,
            prog=PROG,
        )
    else:
        results, figures = _score(args, device, runs, methods, scored)
    results["summary"] = summarise(results["records"])
    results["settings"] = {
        "r": r,
        "modes": args.mode,
        "mc_samples": args.mc_samples,
        "symmetries": args.symmetries,
        "precision": args.precision,
        "self_calibration": not args.no_self_calibration,
        "seed": args.seed,
        "snr": args.snr or "own",
        "register_volumes": args.register_volumes,
        "device": str(device),
        "iqt_pipe_version": __version__,
        "models": [str(p) for p in args.model],
        "ensembles": [[str(p) for p in g] for g in args.ensemble],
        "cross_validate": args.cross_validate,
    }
    if args.cross_validate:
        results["settings"]["recipe"] = crossval.recipe_record(settings, options)
    _write(results, figures, out)
    return 0


def _score(args, device, runs, methods, scored):
    """Results and figures' data of ``methods`` on ``runs``, the models calibrated on the
    subjects :func:`~iqt_pipe.evaluation.crossval.calibration_runs` finds."""
    from iqt_pipe.evaluation.crossval import calibration_runs
    from iqt_pipe.evaluation.protocol import Figures, evaluate

    calibration = calibration_runs(
        args.bids_dirs,
        methods,
        scored,
        labels=args.calibration_label,
        sessions=args.session_label,
        runs_per_subject=args.runs_per_subject,
    )
    if any(m.is_model for m in methods):
        print(
            f"{PROG}: risky-voxel threshold chosen on "
            f"{', '.join(sorted({c.subject for c in calibration})) or 'no subjects (precision/recall not reported)'}",
            flush=True,
        )
    figures = None if args.no_figures else Figures()
    results = evaluate(
        runs,
        methods,
        r=args.upsample,
        modes=args.mode,
        snr=args.snr,
        seed=args.seed,
        mc_samples=args.mc_samples,
        device=device,
        mem_mb=args.mem_mb,
        calibration_runs=calibration,
        quiet=args.quiet,
        figures=figures,
        processes=args.nprocs,
        register_volumes=args.register_volumes,
        cache_dir=args.cache_dir,
    )
    return results, figures


def _write(results: dict, figures, out: Path) -> None:
    """``results.json``, ``results.md`` and ``figures/`` in ``out``; the summary tables on stdout."""
    from iqt_pipe.evaluation.report import markdown, plot_all
    from iqt_pipe.io import save_json, save_text

    if figures is not None:
        plot_all(figures, out / "figures")
    save_json(_finite(results), out / "results.json")
    text = markdown(results)
    save_text(text, out / "results.md")
    print(text.split("## Every run")[0].rstrip())
    print(
        f"{PROG}: wrote {out / 'results.md'}, {out / 'results.json'}"
        + ("" if figures is None else f", {out / 'figures'}/")
    )


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format=f"{PROG}: %(message)s")
    return run_guarded(PROG, lambda: run(args), args.verbose)


if __name__ == "__main__":
    sys.exit(main())
