"""``iqt-phantom``: write a synthetic brain DWI dataset (BIDS) with its ground truth.

Example::

    iqt-phantom /tmp/phantom --preset small --subjects 3 --seed 7 --snr 25 --lesion

Exit codes: 0 success, 2 bad command line or unusable output folder (one line on stderr).
"""

from __future__ import annotations

import argparse
import math
import sys

from iqt_pipe import __version__
from iqt_pipe.cli._common import Parser, int_at_least, run_guarded

PROG = "iqt-phantom"


def _snr(text: str) -> float | None:
    """A positive number; ``inf`` or ``none`` for noise-free data."""
    if text.strip().lower() in {"none", "inf", "infinity"}:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, or inf for noise-free data, got {text!r}")
    return None if math.isinf(value) else value


def _build_parser() -> argparse.ArgumentParser:
    from iqt_pipe.sims.phantom import PRESETS

    presets = ", ".join(f"{p.name} ({p.voxel_size:g} mm)" for p in PRESETS.values())
    parser = Parser(
        prog=PROG,
        description=(
            "Write a synthetic brain diffusion MRI dataset in BIDS, deterministic from a seed, "
            "with exact ground-truth tensors, FA, MD, tissue labels and masks in "
            "derivatives/phantom-truth."
        ),
    )
    parser.add_argument("out_dir", help="new or empty folder (or an earlier phantom to replace)")
    parser.add_argument(
        "--preset", choices=list(PRESETS), default="tiny", help=f"size of the phantom: {presets} (default: tiny)"
    )
    parser.add_argument(
        "--subjects",
        type=int_at_least(1, "the number of subjects"),
        default=1,
        metavar="N",
        help="number of subjects; they differ by head pose and noise (default: 1)",
    )
    parser.add_argument(
        "--seed",
        type=int_at_least(0, "the seed"),
        default=0,
        metavar="N",
        help="random seed; the same seed writes the same data (default: 0)",
    )
    parser.add_argument(
        "--snr",
        type=_snr,
        default=30.0,
        metavar="X",
        help="mean white-matter b=0 signal over the Rician noise level; 'inf' for noise-free data (default: 30)",
    )
    parser.add_argument(
        "--lesion", action="store_true", help="add a tumour-like lesion (high MD, low FA) in the right white matter"
    )
    parser.add_argument(
        "--orientation", default="RAS", metavar="CODES", help="voxel axis directions, e.g. RAS (default), LAS, LPS"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show the traceback of an error")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    from iqt_pipe.sims.dataset import write_bids_dataset
    from iqt_pipe.sims.phantom import get_preset

    def work() -> int:
        out = write_bids_dataset(
            args.out_dir,
            n_subjects=args.subjects,
            preset=args.preset,
            seed=args.seed,
            snr=args.snr,
            lesion=args.lesion,
            orientation=args.orientation,
        )
        spec = get_preset(args.preset)
        noise = "noise-free" if args.snr is None else f"SNR {args.snr:g}"
        grid = "x".join(str(n) for n in spec.shape)
        print(
            f"{PROG}: wrote {args.subjects} subject(s) to {out} (preset {spec.name}: {grid} voxels "
            f"of {spec.voxel_size:g} mm, {spec.n_b0 + spec.n_directions} volumes, {noise}"
            f"{', lesion' if args.lesion else ''}; truth in derivatives/phantom-truth)"
        )
        return 0

    return run_guarded(PROG, work, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
