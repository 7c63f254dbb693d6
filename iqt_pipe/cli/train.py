"""``iqt-train``: train a Bayesian 3D-ESPCN on the DWI runs of one or more BIDS datasets.

Example::

    iqt-train /data/hcp -o models/hetero-var2 --participant-label 01 02 --epochs 20
    # fine-tune the bundled model on a lab's own scans (same architecture and target)
    iqt-train /data/lab -o models/lab --init bundled --kernels 3 3 3 --lr 3e-4 --epochs 2
    torchrun --nproc_per_node 4 -m iqt_pipe.cli.train /data/hcp -o models/x   # data-parallel
    # several nodes: the same command on each, meeting at node01 (OUT_DIR on a shared disk)
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-id x --rdzv-backend c10d \
        --rdzv-endpoint node01:29500 -m iqt_pipe.cli.train /data/hcp -o /shared/models/x --device cuda

Each run is degraded by the IQT protocol (block averaging by r, DTI fitted at both
resolutions), a patch library is sampled (cached in OUT_DIR/cache, or --cache-dir), and the
network is trained with Adam; the best validation checkpoint becomes OUT_DIR/model.safetensors
plus its card OUT_DIR/model.json. OUT_DIR/metrics.jsonl logs every epoch; --resume continues
from OUT_DIR/checkpoint/ to exactly the weights of an uninterrupted run. --init MODEL starts
from a model's weights instead of random ones; the card records which (training.initialised_from).

Exit codes: 0 success, 1 unexpected failure, 2 bad command line or input (one line on stderr).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from iqt_pipe import __version__
from iqt_pipe.cli._common import Parser, int_at_least, positive_float, run_guarded

if TYPE_CHECKING:
    from iqt_pipe.sr.training import TrainSettings

PROG = "iqt-train"
EPILOG = (
    "Defaults follow the paper (Tanno et al. 2017/2021) except where noted: variant "
    "hetero-var2 (the Bayesian model with both intrinsic and parameter uncertainty), 8000 patch "
    "pairs per subject, Adam lr 1e-3, batch 12, half of the pairs for validation; 20 epochs "
    "(the paper trained 200 on a GPU); target residual-cubic and mirror augmentation on "
    "(both measured to beat cubic spline sooner, see DESIGN §1) and the loss over the brain "
    "mask (measured better on held-out subjects, see the README); --target hr --no-augment "
    "--loss-mask none is the paper's setting."
)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"the validation fraction must lie strictly between 0 and 1, got {text!r}")
    return value


def add_recipe_arguments(p) -> None:
    """The training recipe's options (network, data, loss, optimiser), shared by ``iqt-train``
    and ``iqt-eval --cross-validate``; :func:`train_settings` turns them into a
    :class:`~iqt_pipe.sr.training.TrainSettings` and :func:`library_options` into
    :func:`~iqt_pipe.sr.patches.build_library`'s keywords."""
    _add_optimiser_arguments(p)
    _add_loss_arguments(p)
    _add_architecture_arguments(p)
    _add_preprocessing_arguments(p)


def _add_optimiser_arguments(p) -> None:
    """Recipe: the variant, the patch pairs, the epochs, the batch, the learning rate and the validation split."""
    from iqt_pipe.models import VARIANTS
    from iqt_pipe.sr.patches import DEFAULT_PATCHES_PER_SUBJECT
    from iqt_pipe.sr.training import (
        DEFAULT_BATCH,
        DEFAULT_EPOCHS,
        DEFAULT_LR,
        DEFAULT_VAL_FRACTION,
        DEFAULT_VARIANT,
        LR_DECAYS,
    )

    p.add_argument(
        "--variant",
        choices=list(VARIANTS),
        default=DEFAULT_VARIANT,
        help=f"network variant (default: {DEFAULT_VARIANT})",
    )
    p.add_argument(
        "--patches-per-subject",
        type=int_at_least(2, "patches per subject"),
        default=DEFAULT_PATCHES_PER_SUBJECT,
        metavar="N",
        help=f"patch pairs sampled per subject (default: {DEFAULT_PATCHES_PER_SUBJECT}, the paper's)",
    )
    p.add_argument(
        "--grid-shifts",
        action="store_true",
        help="make each run's LR series at every alignment of the r×r×r block grid (r³ of them), "
        "sharing its patches among them: the same anatomy in r³ samplings (default: off, the "
        "IQT protocol's one grid)",
    )
    p.add_argument(
        "--epochs",
        type=int_at_least(1, "epochs"),
        default=DEFAULT_EPOCHS,
        metavar="N",
        help=f"training epochs (default: {DEFAULT_EPOCHS}; the paper used 200 on a GPU)",
    )
    p.add_argument(
        "--batch-size",
        type=int_at_least(1, "the batch size"),
        default=DEFAULT_BATCH,
        metavar="N",
        help=f"patch pairs per optimiser step, over all processes (default: {DEFAULT_BATCH})",
    )
    p.add_argument(
        "--lr",
        type=positive_float("the learning rate"),
        default=DEFAULT_LR,
        metavar="X",
        help=f"Adam learning rate (default: {DEFAULT_LR:g})",
    )
    p.add_argument(
        "--lr-decay",
        choices=list(LR_DECAYS),
        default="none",
        help="none: the learning rate throughout; cosine: from --lr down to 0 over the --epochs, "
        "step by step (a resumed run must keep --epochs; default: none)",
    )
    p.add_argument(
        "--val-fraction",
        type=_fraction,
        default=DEFAULT_VAL_FRACTION,
        metavar="X",
        help=f"fraction of patch pairs held out for validation (default: {DEFAULT_VAL_FRACTION:g})",
    )


def _add_loss_arguments(p) -> None:
    """Recipe: the loss schedule, what the network predicts, the augmentation, the voxels the loss averages over."""
    from iqt_pipe.sr.normalise import TARGETS
    from iqt_pipe.sr.training import DEFAULT_LOSS_MASK, DEFAULT_TARGET, LOSS_MASKS, SCHEDULES

    p.add_argument(
        "--schedule",
        choices=list(SCHEDULES),
        default="fixed",
        help="fixed: the variant's loss throughout; anneal: MSE first, then a linear switch "
        "to the heteroscedastic NLL (hetero variants; default: fixed)",
    )
    p.add_argument(
        "--target",
        choices=list(TARGETS),
        default=DEFAULT_TARGET,
        help=f"what the network predicts: hr (the paper) or residual-cubic, the HR tensors "
        f"minus the cubic B-spline upsampling (default: {DEFAULT_TARGET})",
    )
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="tensor-consistent mirror augmentation of the training patches (default: on)",
    )
    p.add_argument(
        "--axis-swap",
        action="store_true",
        help="with --augment, also permute the spatial axes (all 48 symmetries of the cube, "
        "tensors transformed alike) instead of the 8 mirrors (default: off)",
    )
    p.add_argument(
        "--loss-mask",
        choices=list(LOSS_MASKS),
        default=DEFAULT_LOSS_MASK,
        help="voxels the loss averages over: none = every target voxel (the paper), brain = the "
        f"HR brain mask only (default: {DEFAULT_LOSS_MASK})",
    )


def _add_architecture_arguments(p) -> None:
    """Recipe: the network's kernel sizes and hidden-layer widths."""
    from iqt_pipe.models.espcn import KERNELS, WIDTHS

    p.add_argument(
        "--kernels",
        type=int_at_least(1, "a kernel size"),
        nargs="+",
        default=list(KERNELS),
        metavar="K",
        help="odd kernel size of each convolution (default: 3 1 3, the paper's: a 5³ LR receptive "
        "field; 3 3 3 widens it to 7³ and the input patches to 13³: train it with --lr 3e-4, "
        "at 1e-3 it can collapse to the cubic spline)",
    )
    p.add_argument(
        "--widths",
        type=int_at_least(1, "a width"),
        nargs="+",
        default=list(WIDTHS),
        metavar="W",
        help="channels of each hidden layer, one fewer than --kernels (default: 50 100)",
    )
    p.add_argument(
        "--inputs",
        nargs="+",
        choices=["tensor", "s0"],
        default=["tensor"],
        metavar="INPUT",
        help="the network's input channels: tensor (the six components, the paper's), or tensor s0 "
        "(also the LR fit's S0: T2-weighted structure at a higher SNR; recorded in the card, and "
        "iqt-pipe then feeds the native fit's S0). Default: tensor",
    )


def _add_preprocessing_arguments(p) -> None:
    """Recipe: denoising and Gibbs-ringing removal of each HR series, recorded in the model card."""
    p.add_argument(
        "--denoise",
        choices=["none", "dipy"],
        default="none",
        help="MP-PCA denoising (DIPY) of each HR series before its LR series is made; recorded in "
        "the card, and iqt-pipe then denoises native series likewise (default: none)",
    )
    p.add_argument(
        "--degibbs",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Gibbs-ringing removal (DIPY) of each HR series before its LR series is made; recorded "
        "in the card, and iqt-pipe then removes it from native series likewise (default: off, "
        "measured on held-out subjects: see the README)",
    )


def train_settings(args: argparse.Namespace) -> TrainSettings:
    """The :class:`~iqt_pipe.sr.training.TrainSettings` of the recipe options and ``--seed``."""
    from iqt_pipe.sr.training import TrainSettings

    return TrainSettings(
        variant=args.variant,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_decay=args.lr_decay,
        val_fraction=args.val_fraction,
        schedule=args.schedule,
        augment=args.augment,
        axis_swap=args.axis_swap,
        widths=args.widths,
        kernels=args.kernels,
        inputs=tuple(args.inputs),
        loss_mask=args.loss_mask,
        seed=args.seed,
    )


def library_options(args: argparse.Namespace) -> dict:
    """:func:`~iqt_pipe.sr.patches.build_library`'s keywords from the recipe options and ``--upsample``."""
    from iqt_pipe.dmri.prepare import Preprocessing

    return train_settings(args).library_options(
        r=args.upsample,
        patches_per_subject=args.patches_per_subject,
        target=args.target,
        preprocessing=Preprocessing(args.denoise, args.degibbs),
        grid_shifts=args.grid_shifts,
        register_volumes=args.register_volumes,
    )


def _build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Train a Bayesian 3D-ESPCN (Image Quality Transfer) on the DWI runs of BIDS datasets.",
        epilog=EPILOG,
    )
    p.add_argument("bids_dirs", nargs="+", type=Path, metavar="BIDS_DIR", help="BIDS dataset root(s)")
    p.add_argument(
        "-o",
        "--output-dir",
        type=Path,
        required=True,
        metavar="OUT_DIR",
        help="folder for model.safetensors/model.json, metrics.jsonl, checkpoint/ and cache/",
    )
    p.add_argument(
        "--participant-label",
        nargs="+",
        metavar="L",
        help="participants to train on, with or without 'sub-' (default: all)",
    )
    p.add_argument(
        "--session-label", nargs="+", metavar="S", help="sessions to train on, with or without 'ses-' (default: all)"
    )
    p.add_argument(
        "-r",
        "--upsample",
        type=int_at_least(2, "the upsampling factor"),
        default=2,
        metavar="R",
        help="upsampling factor r, an integer ≥ 2 (default: 2)",
    )
    p.add_argument(
        "--register-volumes",
        action="store_true",
        help="register the DTI volumes of each raw HR series to each other (DIPY, affine: head "
        "motion and eddy currents) before its LR series is made, as QSIPrep's series are; "
        "recorded in the card (default: off, the series as acquired)",
    )
    add_recipe_arguments(p)
    p.add_argument(
        "--seed",
        type=int_at_least(0, "the seed"),
        default=0,
        metavar="N",
        help="random seed: patches, split, initialisation, shuffles (default: 0)",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="compute device (default: auto = CUDA when visible)",
    )
    p.add_argument(
        "--nthreads",
        type=int_at_least(1, "the number of threads"),
        metavar="N",
        help="CPU threads per process (default: PyTorch's; torchrun sets 1)",
    )
    p.add_argument(
        "--init",
        metavar="MODEL",
        help="start from this model file's weights instead of random ones, or 'bundled' for the bundled "
        "model of -r (fine-tuning, e.g. on a lab's own scans): the same variant, --kernels, --widths, "
        "--inputs, --target and r; the card records the model (default: random initialisation from --seed)",
    )
    p.add_argument("--resume", action="store_true", help="continue the training in OUT_DIR from its last checkpoint")
    p.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="folder for the patch library cache and the series --register-volumes registered (default: OUT_DIR/cache)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="more messages; tracebacks on errors")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


def _fmt_rmse(v: float) -> str:
    return f"{v * 1e4:.3f}"


def _report(result) -> None:
    """The final line (best epoch, validation loss and RMSE beside the starting model's and the
    interpolations') and the warnings about what the training learnt."""
    from iqt_pipe.sr.training import fine_tuning_warning, learnt_nothing_warning

    v = result.card["validation"]
    rm = v["rmse"]
    rho = result.card.get("calibration", {}).get("diagonal_correlation")
    start = result.card["training"].get("initialised_from", {}).get("validation")
    was = (
        ("", "")
        if start is None
        else (f" (starting model {start['loss']:.4g})", f" (starting model {_fmt_rmse(start['rmse'])})")
    )
    print(
        f"{PROG}: best epoch {v['best_epoch']}/{result.epochs}: validation loss {v['loss']:.4g}{was[0]}; "
        f"RMSE ×1e-4 mm²/s: model {_fmt_rmse(rm['model'])}{was[1]}, trilinear {_fmt_rmse(rm['trilinear'])}, "
        f"cubic {_fmt_rmse(rm['cubic'])}"
        + ("" if rho is None else f"; diagonal error correlation {rho:.2f}")
        + f" → {result.model_path}"
    )
    for warning in (learnt_nothing_warning(result.card), fine_tuning_warning(result.card)):
        if warning:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    import torch

    from iqt_pipe.bids import find_dwi_runs_multi
    from iqt_pipe.models.files import bundled_model
    from iqt_pipe.sr.checkpoints import CHECKPOINT_DIR, CHECKPOINT_JSON
    from iqt_pipe.sr.distributed import build_library_distributed, init_distributed
    from iqt_pipe.sr.inference import resolve_device
    from iqt_pipe.sr.training import check_init, check_training_dir, split_indices, train

    settings = train_settings(args)
    settings.check()  # before the patch library is built
    if args.init == "bundled":
        args.init = bundled_model(args.upsample)
    if args.init is not None:
        check_init(args.init, settings, args.upsample, args.target)
    device = resolve_device(args.device)
    if args.nthreads:
        torch.set_num_threads(args.nthreads)
    out = check_training_dir(args.output_dir, args.resume)
    runs = find_dwi_runs_multi(args.bids_dirs, args.participant_label, args.session_label)
    dist = init_distributed(device)
    try:
        quiet = args.quiet or not dist.is_main
        options = library_options(args)
        library = build_library_distributed(
            dist, runs, cache_dir=args.cache_dir or out / "cache", quiet=quiet, **options
        )
        subjects = sorted({f"sub-{r.subject}" for r in runs})
        n_val = len(split_indices(len(library), args.val_fraction, args.seed)[1])
        if dist.is_main:
            datasets = ", ".join(str(d) for d in args.bids_dirs)
            cached = "reused cache" if library.from_cache else "new cache"
            print(
                f"{PROG}: {len(args.bids_dirs)} dataset(s) ({datasets}): {len(subjects)} subject(s), "
                f"{len(runs)} DWI run(s) → {len(library)} patch pairs "
                f"({library.input_size}³ → {library.target_shape[1]}³, r = {args.upsample}"
                f"{f', {args.upsample**3} block-grid alignments' if args.grid_shifts else ''}"
                f"{', volumes registered' if args.register_volumes else ''}; "
                f"{len(library) - n_val} train / {n_val} validation; {cached})"
            )
            threads = torch.get_num_threads()
            augment = ("mirrors + axis swaps" if args.axis_swap else "mirrors") if args.augment else "off"
            resuming = "" if args.init is None else f"; starting from {args.init}"
            if args.resume and (out / CHECKPOINT_DIR / CHECKPOINT_JSON).exists():
                resuming = "; resuming from OUT_DIR/checkpoint"  # the checkpoint's weights win
            print(
                f"{PROG}: variant {args.variant}, target {args.target}, schedule {args.schedule}, "
                f"augment {augment}, kernels {'-'.join(map(str, args.kernels))} × widths "
                f"{'-'.join(map(str, args.widths))}, loss mask {args.loss_mask}, "
                f"preprocessing: {options['preprocessing'].describe()}, {args.epochs} epochs, "
                f"batch {args.batch_size}, lr {args.lr:g}{' (cosine decay to 0)' * (args.lr_decay == 'cosine')}, "
                f"seed {args.seed}; "
                f"device {dist.device if dist.distributed else device}"
                f" × {dist.world_size} process(es), {threads} thread(s) each{resuming}",
                flush=True,
            )
        result = train(
            library,
            out,
            settings,
            device=device,
            resume=args.resume,
            init=args.init,
            quiet=quiet,
            dist=dist,
            data_summary={
                "datasets": [str(Path(d).absolute()) for d in args.bids_dirs],
                "subjects": subjects,
                "dwi_runs": [r.as_dict() for r in runs],
            },
        )
        if dist.is_main:
            _report(result)
    finally:
        dist.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format=f"{PROG}: %(message)s")
    return run_guarded(PROG, lambda: run(args), args.verbose)


if __name__ == "__main__":
    sys.exit(main())
