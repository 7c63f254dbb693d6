"""Test-time adaptation: the network fine-tuned on the run's own coarser pair before it predicts.

The self-calibration's pair (:mod:`iqt_pipe.sr.selfcal`: the run's series block-averaged once
more over r³ voxels and fitted again, the run's own fit as its HR side) is a training pair from
the very scanner, coil, reconstruction and voxel shape of the run. A few hundred steps of the
training loss on its patches (the r³ block-grid alignments, mirrored as in training) adapt the
weight means to them; the variational dropout rates stay as trained (so does the KL term).
Half of the run's grid, alternate cubes of a fine checkerboard (:func:`held_out`), is kept out
of the loss, and the self-calibration is measured there: out of sample.

Measured on held-out runs of the developers' folds (README, "Test-time adaptation"): the gain
comes from the run itself. Tuned on another subject's coarser pair instead, the same model got
worse on the run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from iqt_pipe.dmri.degrade import crop_to_multiple, degrade_dwi, grid_offsets, shift_grid
from iqt_pipe.dmri.gradients import GradientTable
from iqt_pipe.models.espcn import IQTNet
from iqt_pipe.sr.patches import (
    CORE,
    N_MIRRORS,
    RunPatches,
    candidate_centres,
    patch_geometry,
    transform_patch,
    transform_volume,
)

#: Adam's learning rate and the batch size of the adaptation's steps (training's batch).
LEARNING_RATE = 1e-4
BATCH = 12
#: Side (voxels of the run's grid) of the checkerboard's cubes: several voxels, so that the
#: noise of a held-out voxel, correlated with its neighbours' at most over a voxel or two
#: (README, *The scans*), is not learnt through them.
CUBE = 8


@dataclass
class Adaptation:
    """What the adaptation did: steps, patches drawn from, the mean loss of its first and last
    tenth of steps (the training loss; lower is better), and why it did nothing if it did not."""

    steps: int
    patches: int
    loss: tuple[float, float] | None = None
    note: str | None = None

    def metadata(self) -> dict[str, Any]:
        """The sidecars' ``Adaptation`` field."""
        out = {"Steps": self.steps, "Patches": self.patches, "LearningRate": LEARNING_RATE, "BatchSize": BATCH}
        if self.loss is not None:
            out["LossFirstLast"] = list(self.loss)
        return out | ({"Note": self.note} if self.note else {})


def held_out(shape) -> np.ndarray:
    """Bool on the run's grid: the half of it the adaptation's loss leaves out and the
    self-calibration is measured on, alternate cubes of :data:`CUBE` voxels."""
    index = np.indices(tuple(shape)[:3], sparse=True)
    return ((index[0] // CUBE + index[1] // CUBE + index[2] // CUBE) % 2).astype(bool)


def coarse_pairs(
    dwi: np.ndarray,
    gtab: GradientTable,
    affine: np.ndarray,
    tensors: np.ndarray,
    brain: np.ndarray,
    model: IQTNet,
    threads: int | None = None,
) -> list[RunPatches]:
    """The patches of the run's coarser pair at each block-grid alignment
    (:func:`~iqt_pipe.dmri.degrade.grid_offsets`): input the series block-averaged from that
    offset and fitted (:func:`~iqt_pipe.dmri.prepare.fit_series`, as in training), target
    ``tensors`` (the run's fit, voxel frame), encoded for ``model``; the targets' brain (the
    loss's voxels) is ``brain`` outside :func:`held_out`."""
    from iqt_pipe.dmri.prepare import fit_series

    r = model.r
    tuning = np.asarray(brain, dtype=bool) & ~held_out(brain.shape)
    out = []
    for offset in grid_offsets(r):
        part, part_affine = shift_grid(dwi, affine, offset)
        part = crop_to_multiple(part, r)
        cut = tuple(slice(o, o + n) for o, n in zip(offset, part.shape[:3]))
        coarse, coarse_affine = degrade_dwi(part, part_affine, r)
        source = f"the run's series, block-averaged from grid offset {tuple(offset)}"
        fit, coarse_brain = fit_series(coarse, coarse_affine, gtab, source=source, threads=threads or 1)
        centres = candidate_centres(coarse_brain, CORE)
        if len(centres) == 0:
            continue
        out.append(
            RunPatches.from_arrays(
                fit.tensors,
                tensors[cut],
                coarse_brain,
                tuning[cut],
                r,
                centres=centres,
                target=model.target or "hr",
                lr_s0=fit.s0 if "s0" in model.inputs else None,
                name=f"grid-{''.join(map(str, offset))}",
                **patch_geometry(model.margin),
            )
        )
    return out


def adapt(model: IQTNet, patches: list[RunPatches], steps: int, seed: int = 0) -> tuple[IQTNet, Adaptation]:
    """A copy of ``model`` after ``steps`` Adam steps of its training loss (the Gaussian NLL of
    hetero variants, else the MSE, over the targets' brain voxels) on batches of ``patches``
    drawn with their mirror codes from ``seed``; the dropout rates (``rho``) fixed. ``model``
    itself is left as it was."""
    n = sum(len(p) for p in patches)
    if steps <= 0 or n == 0:
        note = None if steps <= 0 else "no patch fits the block-averaged series' brain: not adapted"
        return model, Adaptation(0, n, note=note)
    from iqt_pipe.sr.training import data_loss, memory_format

    index = np.array([(k, j) for k, p in enumerate(patches) for j in range(len(p))])
    device = next(model.parameters()).device
    tuned = copy.deepcopy(model).float().to(memory_format=memory_format(device))
    weights = [p for name, p in tuned.named_parameters() if not name.endswith("rho")]
    for name, p in tuned.named_parameters():
        p.requires_grad_(not name.endswith("rho"))
    optimiser = torch.optim.Adam(weights, lr=LEARNING_RATE)
    rng = np.random.default_rng([int(seed), 0xADA])
    losses = []
    tuned.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(seed))
        for _ in range(int(steps)):
            x, y, brain = _batch(patches, index[rng.integers(len(index), size=BATCH)], rng, "s0" in model.inputs)
            x = x.to(device, memory_format=memory_format(device))
            mean, precision = tuned(x, sample=tuned.stochastic)
            loss = data_loss(mean, precision, y.to(device), 1.0 if tuned.hetero else 0.0, brain.to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
    if not np.all(np.isfinite(losses)):
        return model, Adaptation(0, n, note="the adaptation diverged (non-finite loss): not adapted")
    tuned.eval()
    for p in tuned.parameters():
        p.requires_grad_(False)
    tenth = max(1, len(losses) // 10)
    return tuned, Adaptation(len(losses), n, (float(np.mean(losses[:tenth])), float(np.mean(losses[-tenth:]))))


def _batch(patches: list[RunPatches], picks: np.ndarray, rng: np.random.Generator, s0: bool):
    """Inputs, targets and target brain masks (B, 1, …) of the picked (run, patch) pairs, each
    moved by a random mirror code."""
    xs, ys, masks = [], [], []
    for k, j in picks:
        p, code = patches[k], int(rng.integers(N_MIRRORS))
        x = transform_patch(p.input(j), code)
        if s0:
            x = np.concatenate([x, transform_volume(p.s0_input(j), code)[None]])
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(transform_patch(p.target(j), code)))
        masks.append(transform_volume(p.brain(j), code)[None].astype(np.float32))
    return tuple(torch.from_numpy(np.stack(a)) for a in (xs, ys, masks))
