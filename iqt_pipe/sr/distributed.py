"""Data-parallel training under ``torchrun``: this process's place in the run and the patch
library built once for all processes.

When ``WORLD_SIZE > 1`` (set by torchrun) every process joins a process group (gloo on CPU,
nccl on CUDA); rank 0 builds the patch cache while the others wait, then they read it. The
training loop that shares out the batches is in :mod:`iqt_pipe.sr.training`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from iqt_pipe.io import InputError
from iqt_pipe.sr.patches import PatchLibrary, build_library

log = logging.getLogger("iqt_pipe.sr.distributed")


@dataclass
class DistContext:
    """This process's place in a (possibly one-process) data-parallel run."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialised: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.initialised:
            torch.distributed.barrier()

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Sum a few numbers over the processes (float64)."""
        if not self.initialised:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def close(self) -> None:
        if self.initialised and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.initialised = False


def init_distributed(device: torch.device | str = "cpu") -> DistContext:
    """Join torchrun's process group when ``WORLD_SIZE > 1`` (env), else a one-process context.

    On CUDA each process takes ``cuda:LOCAL_RANK`` and the nccl backend; on CPU, gloo.
    """
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=device)
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, init_method="env://", world_size=world, rank=rank)
    return DistContext(world, rank, local, device, True)


def build_library_distributed(dist: DistContext, runs: Sequence, **kwargs) -> PatchLibrary:
    """:func:`~iqt_pipe.sr.patches.build_library` with rank 0 building the cache first.

    The other processes wait, then read rank 0's cache; a failure on rank 0 is raised on
    every rank (as a one-line error) instead of leaving them waiting.
    """
    if not dist.distributed:
        return build_library(runs, **kwargs)
    if kwargs.get("cache_dir") is None:
        raise InputError("data-parallel training needs a patch cache folder shared by all processes")
    failure = None
    if dist.is_main:
        try:
            lib = build_library(runs, **kwargs)
        except Exception as exc:  # reported to the other ranks below, then re-raised
            failure = exc
    (failed,) = dist.all_sum([1.0 if failure is not None else 0.0])
    if dist.is_main and failure is not None:
        raise failure
    if failed:
        raise InputError("rank 0 could not build the patch library (see its error)")
    if not dist.is_main:
        lib = build_library(runs, **{**kwargs, "quiet": True})
        if not lib.from_cache:
            log.warning("rank %d rebuilt the patch library instead of reading rank 0's cache", dist.rank)
    return lib
