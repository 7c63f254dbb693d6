"""Training speed: patch pairs per second of one real `iqt-train` epoch (run on demand, not a test).

    .venv/bin/python benchmarks/training.py [--variants V …] [--patches N] [--threads N]
                                            [--bids-dir DIR --participant-label L …]

Builds a patch library (a synthetic phantom dataset by default, or the given BIDS runs), then
runs :func:`iqt_pipe.sr.training.train` for one epoch per variant twice: with the tensors in
PyTorch's default NCDHW layout and in channels_last_3d (what training uses on CPU). Prints
training pairs/s (validation included, as in an epoch of `iqt-train`), the time of the epoch
and the speed-up of channels_last_3d.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

LAYOUTS = {"ncdhw": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}


def library_for(args, work: Path):
    from iqt_pipe.bids import find_dwi_runs_multi
    from iqt_pipe.sr.patches import build_library

    if args.bids_dir:
        root = args.bids_dir
    else:
        from iqt_pipe.sims.dataset import write_bids_dataset

        root = write_bids_dataset(work / "ds", n_subjects=1, preset="tiny", seed=1, snr=30)
    runs = find_dwi_runs_multi([root], args.participant_label, None)
    return build_library(
        runs,
        r=2,
        patches_per_subject=args.patches,
        seed=0,
        target="residual-cubic",
        cache_dir=work / "cache",
        quiet=True,
    )


def epoch_seconds(library, variant: str, layout, work: Path) -> float:
    from iqt_pipe.sr import training

    original = training.memory_format
    training.memory_format = lambda device: layout
    try:
        t0 = time.perf_counter()
        training.train(library, work / f"{variant}-{layout}", variant=variant, epochs=1, quiet=True)
        return time.perf_counter() - t0
    finally:
        training.memory_format = original


def main() -> None:
    from iqt_pipe.models import VARIANTS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["espcn", "hetero", "hetero-var2"])
    p.add_argument("--patches", type=int, default=1200, help="patch pairs per subject (default: 1200)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--bids-dir", type=Path, help="a BIDS dataset instead of the synthetic phantom")
    p.add_argument("--participant-label", nargs="+")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        library = library_for(args, work)
        n_train = len(library) - round(len(library) * 0.5)
        print(
            f"{len(library)} patch pairs ({n_train} trained per epoch, the rest validated), "
            f"{torch.get_num_threads()} thread(s)"
        )
        print(f"{'variant':<12} {'layout':<17} {'epoch s':>8} {'pairs/s':>8} {'speed-up':>9}")
        for variant in args.variants:
            base = None
            for name, layout in LAYOUTS.items():
                s = epoch_seconds(library, variant, layout, work)
                base = base or s
                print(f"{variant:<12} {name:<17} {s:8.1f} {n_train / s:8.1f} {base / s:8.2f}×", flush=True)


if __name__ == "__main__":
    main()
