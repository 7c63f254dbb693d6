"""Training the Bayesian 3D-ESPCN on a patch library (Tanno et al. 2017, 2021).

Protocol (DESIGN §1): Adam, learning rate 1e-3, batches of 12 patch pairs, a random half of
the pairs held out for validation, the checkpoint with the best validation loss kept.

Losses, per variant. The data term is a mean over target elements (patches × 6 components ×
HR voxels):

* ``espcn``, ``espcn-var*``: mean squared error of the standardised target;
* ``hetero``, ``hetero-var*``: heteroscedastic Gaussian NLL,
  mean(prec·(y − μ)²) − mean(log prec) (:func:`iqt_pipe.models.gaussian_nll`);
* variational variants (``*-var1``, ``*-var2``) add **2·KL / N**, where N is the number of
  training target elements (training patches × 6 × (r·7)³). Both data terms are twice a
  per-element Gaussian negative log-likelihood (the MSE with unit variance; the NLL without
  its ½), so 2·KL/N makes the loss 2/N times the negative ELBO (Kingma et al. 2015).
  Training draws one weight sample per element (local reparameterisation, ``sample=True``).

``loss_mask="brain"`` (the default, beyond the paper; ``"none"`` is the paper's): both data
terms average over the elements of the target's HR brain-mask voxels only, and N counts those.
Outside the brain the residual target is mostly the reference's noise (measured on ds-realdwi:
a quarter of the target voxels carry half of the target's squared norm), which the network
cannot predict and which iqt-eval never scores; on held-out subjects the mask lowered the
tensor RMSE inside the brain and at its edge for both variants tried (README, Evaluation).

``schedule="anneal"`` (hetero variants only; the authors' schedule): MSE (+ 2·KL/N) for
``anneal_start`` epochs, then the loss moves linearly, step by step, over ``anneal_epochs``
epochs from MSE to the NLL: ``(1 − w)·MSE + w·NLL`` with w going 0 → 1; NLL afterwards.

Validation uses the mean weights (``sample=False``); the validation loss is always the *final*
objective's data term (MSE, or NLL for hetero variants), so epochs stay comparable under the
anneal schedule; the KL term is left out (it does not depend on the data). The validation RMSE
is in mm²/s over the HR brain-mask voxels of the validation targets (6 components, equal
weight), next to trilinear and cubic B-spline interpolation of the whole LR volume on exactly
those voxels.

Determinism and resuming. The model is initialised from ``seed``; the split of patches from
``seed``; every epoch's shuffle (a seeded ``DistributedSampler`` with ``set_epoch``), mirror
codes and weight noise from ``(seed, epoch[, rank])`` only. A checkpoint is written after
every epoch to ``OUT_DIR/checkpoint/`` (safetensors: model, Adam state, best weights, the torch
RNG state as uint8; JSON: epoch, best validation, settings — nothing pickled), so
``resume=True`` reaches exactly the weights of an uninterrupted run.

Data-parallel training: run under ``torchrun``; when ``WORLD_SIZE > 1`` every process joins a
process group (gloo on CPU, nccl on CUDA), the model is wrapped in DistributedDataParallel,
the training set is sharded by ``DistributedSampler`` (each process takes
ceil(batch_size / world_size) pairs per step), rank 0 builds the patch cache while the others
wait, validation sums are all-reduced, and only rank 0 writes files, logs or progress bars.
Every rank draws the same seeded permutation of an epoch and takes every world_size-th pair,
so step k's pairs over all ranks are the single-process batch k, mirrored the same way (the
codes are looked up by pair); with ``batch_size`` divisible by the world size and no padding
by the sampler, W processes follow a one-process run to floating-point rounding. Variational
weight noise is drawn per process (``seed, epoch, rank``): equal in distribution only
(tests/test_ddp.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from iqt_pipe import __version__
from iqt_pipe.io import InputError, atomic_open, atomic_path, save_json
from iqt_pipe.models import VARIANTS, IQTNet, gaussian_nll, save_model
from iqt_pipe.models.espcn import KERNELS, WIDTHS, architecture_problem, margin, masked_mean
from iqt_pipe.models.files import model_paths, sha256
from iqt_pipe.sr.normalise import TARGETS
from iqt_pipe.sr.patches import N_MIRRORS, N_SYMMETRIES, PatchLibrary, build_library
from iqt_pipe.dmri.prepare import NONE

log = logging.getLogger("iqt_pipe.sr.training")

SCHEDULES = ("fixed", "anneal")
#: Which target voxels the data term averages over: every one (the paper) or the HR brain mask.
LOSS_MASKS = ("none", "brain")
#: Paper: Adam, lr 1e-3, batch 12, 50 % validation.
DEFAULT_LR = 1e-3
DEFAULT_BATCH = 12
DEFAULT_VAL_FRACTION = 0.5
#: The paper trained 200 epochs on a GPU; a CPU default must be smaller (see the CLI).
DEFAULT_EPOCHS = 20
DEFAULT_VARIANT = "hetero-var2"
DEFAULT_TARGET = "residual-cubic"
DEFAULT_AUGMENT = True
DEFAULT_LOSS_MASK = "brain"

NORMALISATION = {
    "method": "per-subject",
    "statistics": "in-mask mean and sd of the LR tensor components",
    "mask": "median_otsu on the LR mean b=0",
}
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_JSON = "checkpoint.json"
METRICS = "metrics.jsonl"
#: Settings a resumed run must share with its checkpoint.
_RESUME_KEYS = ("variant", "r", "target", "seed", "batch_size", "lr", "val_fraction", "schedule",
                "anneal_start", "anneal_epochs", "augment", "axis_swap", "loss_mask", "widths", "kernels", "library_key",
                "patches")
#: What checkpoints written before a setting existed were trained with.
_RESUME_DEFAULTS = {"axis_swap": False, "loss_mask": "none", "widths": list(WIDTHS), "kernels": list(KERNELS)}


# --------------------------------------------------------------------------- distributed


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


# --------------------------------------------------------------------------- data


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (train, validation) split of ``n`` patch pairs, each sorted; both non-empty."""
    if not 0 < val_fraction < 1:
        raise InputError(f"the validation fraction must lie strictly between 0 and 1, got {val_fraction}")
    if n < 2:
        raise InputError(f"{n} patch pair(s) cannot be split into training and validation; sample more patches")
    perm = np.random.default_rng([int(seed), 0x5EED]).permutation(n)
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class PatchDataset(torch.utils.data.Dataset):
    """Training pairs of a library; with ``augment``, each item is mirrored (and, with
    ``axis_swap``, its axes permuted) by a symmetry code drawn from ``(seed, epoch)`` (see
    :mod:`iqt_pipe.sr.patches`)."""

    def __init__(self, library: PatchLibrary, indices: np.ndarray, augment: bool = False, seed: int = 0,
                 axis_swap: bool = False, with_brain: bool = False):
        self.library, self.indices, self.augment, self.seed = library, np.asarray(indices), augment, int(seed)
        self.with_brain = with_brain
        self.n_codes = N_SYMMETRIES if axis_swap else N_MIRRORS
        self.symmetries = np.zeros(len(self.indices), np.int64)

    def set_epoch(self, epoch: int) -> None:
        if self.augment:
            rng = np.random.default_rng([self.seed, int(epoch), 0xF11B])
            self.symmetries = rng.integers(0, self.n_codes, len(self.indices))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        """``(input, target)``, and with ``with_brain`` the target's HR brain mask (1, m, m, m) as floats."""
        i, code = int(self.indices[k]), int(self.symmetries[k])
        x, y = self.library.pair(i, code)
        item = (torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)))
        if self.with_brain:
            item += (torch.from_numpy(self.library.brain_patch(i, code)[None].astype(np.float32)),)
        return item


# --------------------------------------------------------------------------- losses


def anneal_weight(epoch_position: float, start: int, length: int) -> float:
    """Weight of the NLL in the anneal schedule at a (fractional) epoch position."""
    return float(min(1.0, max(0.0, (epoch_position - start) / max(1, length))))


def data_loss(mean: torch.Tensor, precision: torch.Tensor | None, target: torch.Tensor, nll_weight: float,
              brain: torch.Tensor | None = None) -> torch.Tensor:
    """MSE, NLL, or their mix ``(1 − w)·MSE + w·NLL`` (w = ``nll_weight``), averaged over every
    target element or, with ``brain`` ((B, 1, X, Y, Z), 1 in the HR brain mask), over the
    brain voxels' elements only."""
    if precision is None:
        return masked_mean((target - mean) ** 2, brain)
    nll = gaussian_nll(mean, precision, target, brain)
    if nll_weight >= 1.0:
        return nll
    # Both terms stay in the graph (w = 0 included) so DDP sees every parameter used.
    return (1.0 - nll_weight) * masked_mean((target - mean) ** 2, brain) + nll_weight * nll


def target_elements(library: PatchLibrary, indices: np.ndarray, loss_mask: str = "none") -> int:
    """N of the 2·KL/N term: the target elements of ``indices`` the data term averages over."""
    if loss_mask != "brain":
        return len(indices) * int(np.prod(library.target_shape))
    step = 4096
    return 6 * sum(int(library.brain(indices[s:s + step]).sum()) for s in range(0, len(indices), step))


def loss_description(variant: str, schedule: str, loss_mask: str = "none") -> str:
    hetero, var = VARIANTS[variant]
    data = "Gaussian NLL mean(prec·(y−μ)²) − mean(log prec)" if hetero else "MSE"
    if schedule == "anneal":
        data = "MSE, then a linear switch to " + data
    if var:
        data += " + 2·KL/N (N = training target elements; Kingma 2015 log-uniform approximation)"
    where = " over the HR brain-mask voxels" if loss_mask == "brain" else ""
    return data + f" on standardised targets{where}"


# --------------------------------------------------------------------------- checkpoints


def _tensor_dict(model: IQTNet, optimizer: torch.optim.Optimizer, best_state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in best_state.items()})
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if not torch.is_tensor(v):
                v = torch.tensor(v)
            tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda{i}"] = s
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
    return tensors, {"param_groups": groups}


def save_checkpoint(out_dir: Path, model: IQTNet, optimizer, best_state, state: dict) -> Path:
    """Write ``checkpoint/epoch-NNNN.safetensors`` then ``checkpoint.json`` pointing at it
    (atomically, so a crash leaves the previous checkpoint intact); remove older weights."""
    from safetensors.torch import save_file

    folder = out_dir / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tensors, extra = _tensor_dict(model, optimizer, best_state)
    name = f"epoch-{state['epoch']:04d}.safetensors"
    with atomic_path(folder / name) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "iqt-pipe-checkpoint"})
        digest = sha256(tmp)
    save_json({**state, **extra, "weights": name, "sha256": digest, "iqt_pipe_version": __version__},
              folder / CHECKPOINT_JSON)
    for old in folder.glob("epoch-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return folder / CHECKPOINT_JSON


def load_checkpoint(out_dir: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """``(state, tensors)`` of ``OUT_DIR/checkpoint``, or None when there is none."""
    from safetensors.torch import load_file

    js = out_dir / CHECKPOINT_DIR / CHECKPOINT_JSON
    if not js.exists():
        return None
    try:
        state = json.loads(js.read_text())
        weights = js.parent / state["weights"]
        if sha256(weights) != state["sha256"]:
            raise ValueError("checksum mismatch")
        tensors = load_file(str(weights))
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(
            f"{js}: unusable checkpoint ({exc.__class__.__name__}: {exc}); delete {js.parent} to start afresh"
        ) from None
    return state, tensors


def _restore(model: IQTNet, optimizer, state: dict, tensors: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = v
    groups = []
    for g in state["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.cpu"])
    return {k[5:]: v.clone() for k, v in tensors.items() if k.startswith("best.")}


# --------------------------------------------------------------------------- output folder


#: A best model whose validation RMSE is above this fraction of cubic B-spline's has learnt
#: (almost) nothing over interpolation; every healthy model measured here is at 0.88–0.96.
LEARNT_NOTHING = 0.99


def learnt_nothing_warning(card: dict) -> str | None:
    """A one-line warning when a trained model's card shows it barely beats (or loses to) the
    cubic B-spline baseline on its validation patches, else None. A collapsed training (every
    ReLU dead, the residual network outputting zeros) reads 1.000 ×; seen with the 3-3-3
    kernels at the default learning rate."""
    rmse = card["validation"]["rmse"]
    ratio = rmse["model"] / rmse["cubic"] if rmse.get("cubic") else math.nan
    if not ratio <= LEARNT_NOTHING:
        lr = card["training"]["learning_rate"]
        return (f"the model's validation RMSE is {ratio:.3f} × cubic B-spline's: it has learnt (almost) nothing over "
                f"interpolation; train longer, or with a lower --lr (e.g. {lr / 3:.2g}) or another --seed")
    return None


def check_training_dir(out_dir: str | os.PathLike, resume: bool = False) -> Path:
    """Create and test ``out_dir``; refuse to overwrite a trained model unless resuming."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; choose another output folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise InputError(f"{out}: output folder is not writable ({exc.strerror or exc}); choose another one") from None
    if not resume and (what := holds_training(out)):
        raise InputError(
            f"{out}: already holds {what}; add --resume to continue that training, or choose a new output folder"
        )
    return out


def holds_training(out_dir: str | os.PathLike) -> str | None:
    """What an earlier training left in ``out_dir`` ("a trained model", "a training
    checkpoint"), or None."""
    out = Path(out_dir)
    if model_paths(out)[0].exists():
        return "a trained model"
    if (out / CHECKPOINT_DIR / CHECKPOINT_JSON).exists():
        return "a training checkpoint"
    return None


@contextmanager
def _deterministic(device: torch.device):
    """``torch.use_deterministic_algorithms`` (warn-only where an op has no deterministic
    kernel) for the duration of training; the previous setting is restored afterwards."""
    was = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def memory_format(device: torch.device | str) -> torch.memory_format:
    """channels_last_3d on CPU, where oneDNN's 3-D convolutions run 1.2–1.9× faster in it
    (training steps, benchmarks/training.py); the default layout elsewhere."""
    return torch.channels_last_3d if torch.device(device).type == "cpu" else torch.contiguous_format


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank), 0xE90C]).generate_state(1)[0])


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    model_path: Path
    card: dict
    metrics: list[dict]
    best_epoch: int
    epochs: int


def _epoch_progress(quiet: bool, dist: DistContext):
    """tqdm's ``disable``: True when quiet or not rank 0; None (auto: off when not a TTY)."""
    return True if (quiet or not dist.is_main) else None


@torch.no_grad()
def validate(
    model: IQTNet, library: PatchLibrary, indices: np.ndarray, *, batch_size: int = 64,
    device: torch.device | str = "cpu", dist: DistContext | None = None, quiet: bool = True,
    loss_mask: str = "none",
) -> dict[str, float]:
    """Validation loss (final objective's data term) and RMSE (mm²/s, brain voxels), mean weights.

    With a distributed context, each process scores ``indices[rank::world]`` and the sums are
    all-reduced.
    """
    from tqdm.auto import tqdm

    dist = dist or DistContext(device=torch.device(device))
    device = torch.device(device)
    mine = np.asarray(indices)[dist.rank::dist.world_size]
    model.eval()
    loss_sum = n_el = sse = n_brain = 0.0
    starts = range(0, len(mine), batch_size)
    for s in tqdm(starts, desc="validation", leave=False, unit="batch", disable=_epoch_progress(quiet, dist)):
        idx = mine[s:s + batch_size]
        x, y = library.get(idx)
        xt = torch.from_numpy(x).to(device, memory_format=memory_format(device))
        yt = torch.from_numpy(y).to(device)
        mean, prec = model(xt, sample=False)
        brain = library.brain(idx)[:, None]
        weights = torch.from_numpy(brain.astype(np.float32)).to(device) if loss_mask == "brain" else None
        loss = data_loss(mean, prec, yt, 1.0, weights)
        elements = yt.numel() if weights is None else float(brain.sum()) * yt.shape[1]
        loss_sum += float(loss) * elements
        n_el += elements
        err = (mean - yt).double().cpu().numpy() * library.sd(idx)[:, :, None, None, None]
        sse += float(np.sum(err**2 * brain))
        n_brain += float(brain.sum())
    loss_sum, n_el, sse, n_brain = dist.all_sum([loss_sum, n_el, sse, n_brain])
    return {"loss": loss_sum / max(1.0, n_el), "rmse": math.sqrt(sse / max(1.0, 6 * n_brain))}


def train(
    library: PatchLibrary,
    out_dir: str | os.PathLike,
    *,
    variant: str = DEFAULT_VARIANT,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH,
    lr: float = DEFAULT_LR,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    device: torch.device | str = "cpu",
    resume: bool = False,
    schedule: str = "fixed",
    anneal_start: int | None = None,
    anneal_epochs: int | None = None,
    augment: bool = DEFAULT_AUGMENT,
    axis_swap: bool = False,
    widths: Sequence[int] = WIDTHS,
    kernels: Sequence[int] = KERNELS,
    loss_mask: str = DEFAULT_LOSS_MASK,
    quiet: bool = False,
    dist: DistContext | None = None,
    data_summary: dict | None = None,
) -> TrainResult:
    """Train ``variant`` on ``library`` into ``out_dir`` (see the module docstring).

    Writes ``OUT_DIR/model.safetensors`` + ``model.json`` (best validation loss),
    ``OUT_DIR/metrics.jsonl`` and ``OUT_DIR/checkpoint/``. ``axis_swap`` adds axis permutations
    to the mirror augmentation; ``loss_mask="brain"`` averages the data term (and scales the KL
    term) over the HR brain voxels only; ``widths``/``kernels`` set the architecture (the paper's 50, 100
    and 3-1-3 by default), whose margin must be the library's. ``data_summary`` (datasets,
    subjects, …) is merged into the card's ``training`` entry. Returns a :class:`TrainResult`
    (on every rank; only rank 0 writes).
    """
    from tqdm.auto import tqdm

    dist = dist or DistContext(device=torch.device(device))
    device = dist.device if dist.distributed else torch.device(device)
    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if schedule not in SCHEDULES:
        raise InputError(f"unknown schedule {schedule!r}; choose fixed or anneal")
    hetero, var = VARIANTS[variant]
    if schedule == "anneal" and not hetero:
        raise InputError(f"the anneal schedule switches MSE to the heteroscedastic NLL; variant {variant} has no precision network (use a hetero variant or --schedule fixed)")
    if library.target not in TARGETS:
        raise InputError(f"unknown target {library.target!r}")
    if loss_mask not in LOSS_MASKS:
        raise InputError(f"unknown loss mask {loss_mask!r}; choose {' or '.join(LOSS_MASKS)}")
    if axis_swap and not augment:
        raise InputError("axis swaps are part of the augmentation; turn augmentation on to use them")
    if problem := architecture_problem(widths, kernels):
        raise InputError(problem)
    if library.margin != margin(kernels):
        raise InputError(f"kernels {list(kernels)} lose {margin(kernels)} LR voxels per side but the patch library was cut for {library.margin}; build it with margin {margin(kernels)}")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise InputError(f"epochs ({epochs}) and batch size ({batch_size}) must be ≥ 1 and the learning rate ({lr}) > 0")
    out = Path(out_dir).expanduser().absolute()
    if dist.is_main:
        check_training_dir(out, resume)
    anneal_start = max(1, epochs // 4) if anneal_start is None else int(anneal_start)
    anneal_epochs = max(1, epochs // 4) if anneal_epochs is None else int(anneal_epochs)

    train_idx, val_idx = split_indices(len(library), val_fraction, seed)
    settings = {
        "variant": variant, "r": library.r, "target": library.target, "seed": int(seed),
        "batch_size": int(batch_size), "lr": float(lr), "val_fraction": float(val_fraction),
        "schedule": schedule, "anneal_start": anneal_start if schedule == "anneal" else None,
        "anneal_epochs": anneal_epochs if schedule == "anneal" else None, "augment": bool(augment),
        "axis_swap": bool(axis_swap), "loss_mask": loss_mask, "widths": [int(w) for w in widths], "kernels": [int(k) for k in kernels],
        "library_key": library.meta.get("key"), "patches": len(library),
    }

    torch.manual_seed(seed)
    model = IQTNet(variant, library.r, widths, kernels).to(device, memory_format=memory_format(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    start_epoch, best_val, best_epoch, best_rmse = 0, math.inf, 0, math.nan
    ckpt = load_checkpoint(out) if resume else None
    if resume and ckpt is None and dist.is_main:
        log.warning("%s: no checkpoint to resume from; training from the start", out)
    if ckpt is not None:
        state, tensors = ckpt
        saved = state.get("settings", {})
        if schedule == "anneal":  # the checkpoint's resolved schedule wins when not given
            settings["anneal_start"] = saved.get("anneal_start", anneal_start)
            settings["anneal_epochs"] = saved.get("anneal_epochs", anneal_epochs)
            anneal_start, anneal_epochs = settings["anneal_start"], settings["anneal_epochs"]
        diff = [k for k in _RESUME_KEYS if saved.get(k, _RESUME_DEFAULTS.get(k)) != settings[k]]
        if diff:
            k = diff[0]
            raise InputError(
                f"{out}: the checkpoint was trained with {k} = {saved.get(k, _RESUME_DEFAULTS.get(k))!r}, this run asks for "
                f"{settings[k]!r}; resume with the same settings or choose a new output folder"
            )
        best_state = _restore(model, optimizer, state, tensors, device)
        start_epoch, best_val, best_epoch = state["epoch"], state["best_val_loss"], state["best_epoch"]
        best_rmse = state.get("best_val_rmse", math.nan)
        if dist.is_main:
            log.info("resuming %s after epoch %d (best validation loss %.4g at epoch %d)", out, start_epoch, best_val, best_epoch)
    if dist.is_main:
        _trim_metrics(out / METRICS, start_epoch)

    dataset = PatchDataset(library, train_idx, augment, seed, axis_swap, with_brain=loss_mask == "brain")
    per_rank = math.ceil(batch_size / dist.world_size)
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=int(seed), drop_last=False
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=0)
    n_elements = target_elements(library, train_idx, loss_mask)
    net = model
    if dist.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    baselines = library.baseline_rmse(val_idx)
    metrics = _read_metrics(out / METRICS) if dist.is_main else []

    disable = _epoch_progress(quiet, dist)
    with _deterministic(device):
        epoch_bar = tqdm(range(start_epoch, epochs), desc="epochs", unit="epoch", initial=start_epoch,
                         total=epochs, disable=disable, dynamic_ncols=True)
        for epoch in epoch_bar:
            t0 = time.perf_counter()
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            torch.manual_seed(_epoch_seed(seed, epoch, dist.rank))
            model.train()
            n_steps = len(loader)
            running = 0.0
            batch_bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, unit="batch", disable=disable, dynamic_ncols=True)
            for step, (x, y, *brain) in enumerate(batch_bar):
                x = x.to(device, non_blocking=True, memory_format=memory_format(device))
                y = y.to(device, non_blocking=True)
                brain = brain[0].to(device, non_blocking=True) if brain else None
                w = 1.0 if hetero else 0.0
                if schedule == "anneal":
                    w = anneal_weight(epoch + (step + 1) / n_steps, anneal_start, anneal_epochs)
                mean, prec = net(x, sample=model.stochastic)
                loss = data_loss(mean, prec, y, w, brain)
                if brain is not None and dist.distributed:
                    # DDP averages the processes' gradients: weight each process's masked mean by its
                    # share of the batch's brain voxels, so a step follows the whole batch's masked
                    # mean exactly as on one process.
                    local = float(brain.sum())
                    (total,) = dist.all_sum([local])
                    loss = loss * (local * dist.world_size / max(total, 1.0))
                if var:
                    loss = loss + 2 * model.kl() / n_elements
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                running += float(loss.detach())
                batch_bar.set_postfix(loss=f"{running / (step + 1):.4g}")
            (train_sum, train_n) = dist.all_sum([running, n_steps])
            if not math.isfinite(train_sum):
                raise RuntimeError(f"training diverged (non-finite loss) in epoch {epoch + 1}; lower the learning rate")
            val = validate(model, library, val_idx, batch_size=max(batch_size, 32), device=device, dist=dist,
                           quiet=quiet, loss_mask=loss_mask)
            seconds = time.perf_counter() - t0
            improved = val["loss"] < best_val
            if improved:
                best_val, best_epoch, best_rmse = val["loss"], epoch + 1, val["rmse"]
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            row = {
                "epoch": epoch + 1, "train_loss": train_sum / max(1, train_n), "val_loss": val["loss"],
                "val_rmse": val["rmse"], "seconds": round(seconds, 3), "best": improved,
            }
            if schedule == "anneal":
                row["nll_weight"] = anneal_weight(epoch + 1, anneal_start, anneal_epochs)
            metrics.append(row)
            epoch_bar.set_postfix(val_loss=f"{val['loss']:.4g}", rmse=f"{val['rmse']:.3e}")
            if dist.is_main:
                with open(out / METRICS, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                card = _card(library, settings, data_summary, dist, device, epoch + 1, best_epoch,
                             best_val, best_rmse, baselines, len(train_idx), len(val_idx))
                if improved:
                    _save_best(best_state, model, out, card)
                save_checkpoint(out, model, optimizer, best_state, {
                    "epoch": epoch + 1, "best_val_loss": best_val, "best_epoch": best_epoch,
                    "best_val_rmse": best_rmse, "settings": settings,
                })
            log.debug("epoch %d: %s", epoch + 1, row)
        epoch_bar.close()

    card = _card(library, settings, data_summary, dist, device, max(epochs, start_epoch), best_epoch,
                 best_val, best_rmse, baselines, len(train_idx), len(val_idx))
    weights = model_paths(out)[0]
    if dist.is_main:
        weights = _save_best(best_state, model, out, card)
    dist.barrier()
    return TrainResult(weights, card, metrics, best_epoch, max(epochs, start_epoch))


def _save_best(best_state: dict, model: IQTNet, out: Path, card: dict) -> Path:
    best = IQTNet(model.variant, model.r, model.widths, model.kernels)
    best.load_state_dict(best_state)
    return save_model(best, out, card)


def _card(library, settings, data_summary, dist, device, epochs_done, best_epoch, best_val, best_rmse,
          baselines, n_train, n_val) -> dict:
    training = {
        **(data_summary or {}),
        "runs": [rp.name for rp in library.runs],
        "patches": {"total": len(library), "train": int(n_train), "validation": int(n_val),
                    "per_subject": library.meta.get("patches_per_subject"),
                    "input_size": library.input_size, "target_size": library.r * library.core},
        "upsample": library.r,
        "epochs": int(epochs_done),
        "seed": settings["seed"],
        "variant": settings["variant"],
        "schedule": settings["schedule"],
        "augment": settings["augment"],
        "axis_swap": settings["axis_swap"],
        "optimizer": "Adam",
        "learning_rate": settings["lr"],
        "batch_size": settings["batch_size"],
        "val_fraction": settings["val_fraction"],
        "loss": loss_description(settings["variant"], settings["schedule"], settings["loss_mask"]),
        "loss_mask": settings["loss_mask"],
        "world_size": dist.world_size,
        "device": device.type,
        "patch_library": settings["library_key"],
        # The series the patches came from: what the app must do to a native series.
        "preprocessing": library.meta.get("preprocessing", NONE.to_card()),
    }
    if library.meta.get("domain"):
        training["domain"] = library.meta["domain"]
    if settings["schedule"] == "anneal":
        training["anneal"] = {"mse_epochs": settings["anneal_start"], "switch_epochs": settings["anneal_epochs"]}
    return {
        "target": settings["target"],
        "normalisation": dict(NORMALISATION),
        "training": training,
        "validation": {
            "best_epoch": int(best_epoch),
            "loss": float(best_val),
            "rmse": {"model": float(best_rmse), **{k: float(v) for k, v in baselines.items()}},
            "units": "mm^2/s",
            "voxels": "HR brain-mask voxels of the validation patches' targets, 6 components",
            "weights": "mean (no Monte-Carlo sampling)",
        },
    }


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _trim_metrics(path: Path, keep_epochs: int) -> None:
    """Keep the metrics of the epochs a checkpoint covers (a crash may have logged one more)."""
    rows = [r for r in _read_metrics(path) if r.get("epoch", 0) <= keep_epochs]
    if not path.exists() and not rows:
        return
    with atomic_open(path) as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
