"""``iqt-train`` with a record of the training pairs each process draws (tests/test_ddp.py).

Run it like ``python -m iqt_pipe.cli.train`` (alone, or under ``torch.distributed.run``): it
wraps :class:`iqt_pipe.sr.training.PatchDataset` so that every item fetched is noted with its
epoch, runs the real command-line entry point, then writes ``OUT_DIR/seen-rank<RANK>.json``:
``{"rank", "world_size", "epochs": {epoch: [pair index, ...] in the order drawn}}``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from iqt_pipe.cli import train as cli
from iqt_pipe.sr import training

_seen: dict[int, list[int]] = {}
_epoch = {"now": -1}
_set_epoch = training.PatchDataset.set_epoch
_getitem = training.PatchDataset.__getitem__


def set_epoch(self, epoch: int) -> None:
    _epoch["now"] = int(epoch)
    _set_epoch(self, epoch)


def getitem(self, k: int):
    _seen.setdefault(_epoch["now"], []).append(int(self.indices[k]))
    return _getitem(self, k)


def main(argv: list[str]) -> int:
    training.PatchDataset.set_epoch = set_epoch
    training.PatchDataset.__getitem__ = getitem
    code = cli.main(argv)
    out = Path(argv[argv.index("-o") + 1])
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    (out / f"seen-rank{rank}.json").write_text(json.dumps({"rank": rank, "world_size": world, "epochs": _seen}))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
