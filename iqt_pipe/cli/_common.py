"""What every iqt-pipe command shares: one-line errors and exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from iqt_pipe.io import InputError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_MISSING_EXECUTABLE = 0, 1, 2, 127


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: … (see prog --help)``), exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(minimum: int, what: str):
    """An argparse ``type`` accepting integers ≥ ``minimum``, with a one-line message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{what} must be an integer ≥ {minimum}, got {text!r}")
        return value

    return parse


def positive_float(what: str):
    """An argparse ``type`` accepting finite numbers > 0, with a one-line message."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (value > 0 and value != float("inf")):
            raise argparse.ArgumentTypeError(f"{what} must be a positive number, got {text!r}")
        return value

    return parse


def run_guarded(prog: str, work: Callable[[], int | None], verbose: bool = False) -> int:
    """Run ``work``; turn a bad input into ``prog: error: <one line>`` and exit code 2,
    an unexpected failure into one line (the traceback only with ``-v``) and exit code 1."""
    try:
        return work() or EXIT_OK
    except InputError as exc:
        if verbose:
            logging.exception("bad input")
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the top level reports, never hides
        if verbose:
            logging.exception("unexpected failure")
        print(f"{prog}: failed: {exc.__class__.__name__}: {exc} (rerun with -v for details)", file=sys.stderr)
        return EXIT_FAILED
