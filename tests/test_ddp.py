"""Data-parallel training (``torchrun``, DistributedDataParallel) is the single-process
optimisation shared out: two CPU processes see different training pairs, and together reach
the weights of one process with the same global batch.

Why the two runs can agree, and how their random numbers are kept equal:

* **Sharding.** Every rank builds the same seeded ``DistributedSampler`` permutation for an
  epoch and takes every second pair of it; each step a rank takes the next
  ceil(batch / world) pairs of its share. So the union over ranks of step k is exactly the
  single-process batch k (batch divisible by the world size, and an even number of training
  pairs, so the sampler pads nothing). ``--batch-size`` is the global batch: both runs get 8.
* **Gradients.** DDP averages the ranks' gradients; each rank's loss is a mean over the same
  number of pairs, so the average is the gradient of the mean over the global batch.
* **Mirror augmentation** stays on: the mirror codes of an epoch are drawn from
  (seed, epoch) for every training pair and looked up by the pair, so a pair is mirrored the
  same way whichever rank draws it (a function of the global sample index).
* **Variational weight noise** is drawn per process, from (seed, epoch, rank): the variational
  variants are equivalent in distribution, not draw for draw. Making the noise a function of
  the global sample index would need a generator per pair inside every convolution; instead
  this test trains ``hetero``, both networks and the heteroscedastic likelihood but no weight
  noise, so the two runs differ by floating-point rounding only.
* **Tolerance.** Adam divides each step by the running RMS of its gradient, so where a
  gradient element is nearly zero, rounding can turn its step around. Per weight tensor the
  difference must stay below 1 % of how far training moved the weights (measured: at most
  0.08 %); the validation losses must agree to 1e-5. A run with half the batch, which is what
  one rank would do on its own, lands about 44 % away: the check can tell.

Each run goes through the real ``iqt-train`` entry point via ``tests/ddp_worker.py``, which
records the pairs each process fetched.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from iqt_pipe.sr.training import split_indices

WORKER = Path(__file__).with_name("ddp_worker.py")
PATCHES, BATCH, EPOCHS = 40, 8, 2  # 2 subjects × 40 pairs, half for training: 40 pairs, 5 steps per epoch
ARGS = [
    "--patches-per-subject",
    str(PATCHES),
    "--epochs",
    str(EPOCHS),
    "--variant",
    "hetero",
    "--device",
    "cpu",
    "--nthreads",
    "1",
    "--seed",
    "0",
    "-q",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from iqt_pipe.sims.dataset import write_bids_dataset

    tmp = tmp_path_factory.mktemp("ddp")
    bids = write_bids_dataset(tmp / "ds", n_subjects=2, preset="tiny", seed=11)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cache = ["--cache-dir", str(tmp / "cache")]

    def train(name: str, batch: int, processes: int = 1) -> Path:
        launcher = [sys.executable]
        if processes > 1:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            launcher += [
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(processes),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
            ]
        proc = subprocess.run(
            [*launcher, str(WORKER), str(bids), "-o", str(tmp / name), *ARGS, *cache, "--batch-size", str(batch)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return tmp / name

    single = train("single", BATCH)  # builds the patch cache the others read
    return {"single": single, "ddp": train("ddp", BATCH, processes=2), "half": train("half", BATCH // 2)}


def _seen(out: Path, rank: int = 0) -> dict[int, list[int]]:
    record = json.loads((out / f"seen-rank{rank}.json").read_text())
    return {int(epoch): pairs for epoch, pairs in record["epochs"].items()}


def _last_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(out / "checkpoint" / f"epoch-{EPOCHS:04d}.safetensors"))
    return {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}


def _distance(a: dict, b: dict, start: dict) -> dict[str, float]:
    """Per tensor: |a − b| relative to how far training moved a from its start."""
    return {k: float((a[k] - b[k]).norm() / (a[k] - start[k]).norm()) for k in a}


def test_the_ranks_share_out_each_single_process_batch(runs):
    train_idx, _ = split_indices(2 * PATCHES, 0.5, 0)
    single = _seen(runs["single"])
    ranks = [_seen(runs["ddp"], r) for r in (0, 1)]
    assert [json.loads((runs["ddp"] / f"seen-rank{r}.json").read_text())["world_size"] for r in (0, 1)] == [2, 2]
    per_rank = BATCH // 2
    for epoch in range(EPOCHS):
        a, b = ranks[0][epoch], ranks[1][epoch]
        assert len(a) == len(b) == len(train_idx) // 2
        assert not set(a) & set(b), "both ranks trained on the same pairs"
        assert sorted(a + b) == sorted(single[epoch]) == sorted(train_idx.tolist())
        for step in range(len(single[epoch]) // BATCH):
            together = a[step * per_rank : (step + 1) * per_rank] + b[step * per_rank : (step + 1) * per_rank]
            assert sorted(together) == sorted(single[epoch][step * BATCH : (step + 1) * BATCH]), (epoch, step)
    assert single[0] != single[1]  # reshuffled every epoch


def test_two_processes_reach_the_single_process_weights(runs):
    from iqt_pipe.models import IQTNet

    torch.manual_seed(0)
    start = IQTNet("hetero", 2).state_dict()  # training's initialisation (seed 0)
    single, ddp, half = (_last_weights(runs[k]) for k in ("single", "ddp", "half"))
    assert single.keys() == ddp.keys() == start.keys()
    same = _distance(single, ddp, start)
    assert max(same.values()) < 1e-2, same
    other = _distance(single, half, start)
    assert min(other.values()) > 0.1, other  # the tolerance separates a different optimisation
    rows = {
        k: [json.loads(line) for line in (runs[k] / "metrics.jsonl").read_text().splitlines()]
        for k in ("single", "ddp")
    }
    np.testing.assert_allclose([r["val_loss"] for r in rows["ddp"]], [r["val_loss"] for r in rows["single"]], rtol=1e-5)
    np.testing.assert_allclose(
        [r["train_loss"] for r in rows["ddp"]], [r["train_loss"] for r in rows["single"]], rtol=1e-5
    )
    cards = {k: json.loads((runs[k] / "model.json").read_text()) for k in ("single", "ddp")}
    assert cards["single"]["training"]["world_size"] == 1 and cards["ddp"]["training"]["world_size"] == 2
    assert cards["ddp"]["training"]["batch_size"] == cards["single"]["training"]["batch_size"] == BATCH
