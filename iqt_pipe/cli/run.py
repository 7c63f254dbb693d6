"""``iqt-pipe``: the BIDS App entry point.

The parser is built by :func:`_build_parser` so tests and docs can call it directly.
"""

from __future__ import annotations

import argparse
import sys

from iqt_pipe import __version__
from iqt_pipe.cli._common import Parser


def _build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="iqt-pipe",
        description=(
            "Bayesian Image Quality Transfer for diffusion MRI: super-resolved diffusion "
            "tensors with per-voxel uncertainty, from a BIDS dataset."
        ),
    )
    parser.add_argument("bids_dir", help="root folder of a BIDS dataset with DWI runs")
    parser.add_argument("output_dir", help="folder for the BIDS derivatives")
    parser.add_argument(
        "analysis_level", choices=["participant", "group"], help="processing stage to run"
    )
    parser.add_argument("--version", action="version", version=f"iqt-pipe {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    parser.parse_args(argv)
    print(
        f"iqt-pipe {__version__}: the participant and group levels are not part of this "
        "release yet; use iqt-phantom and iqt-degrade.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
