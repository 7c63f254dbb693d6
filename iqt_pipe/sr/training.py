"""Training the Bayesian 3D-ESPCN on a patch library (Tanno et al. 2017, 2021).

Protocol (DESIGN §1): Adam, learning rate 1e-3, batches of 12 patch pairs, a random half of
the pairs held out for validation, the checkpoint with the best validation loss kept.
``lr_decay="cosine"`` (beyond the paper) lowers the learning rate step by step from ``lr`` to 0
over the run's epochs (:func:`decayed_lr`).

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
RNG state as uint8; JSON: epoch, best validation, settings — nothing pickled; see
:mod:`iqt_pipe.sr.checkpoints`), so ``resume=True`` reaches exactly the weights of an
uninterrupted run. The recipe is a :class:`TrainSettings`; :func:`train` also takes its fields
as keywords.

Data-parallel training: run under ``torchrun``; when ``WORLD_SIZE > 1`` every process joins a
process group (gloo on CPU, nccl on CUDA), the model is wrapped in DistributedDataParallel,
the training set is sharded by ``DistributedSampler`` (each process takes
ceil(batch_size / world_size) pairs per step), rank 0 builds the patch cache while the others
wait (:mod:`iqt_pipe.sr.distributed`), validation sums are all-reduced, and only rank 0
writes files, logs or progress bars. Every rank draws the same seeded permutation of an epoch
and takes every world_size-th pair, so step k's pairs over all ranks are the single-process
batch k, mirrored the same way (the codes are looked up by pair); with ``batch_size``
divisible by the world size and no padding by the sampler, W processes follow a one-process
run to floating-point rounding. Variational weight noise is drawn per process (``seed,
epoch, rank``): equal in distribution only (tests/test_ddp.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from iqt_pipe.dmri.dti import DIAGONAL
from iqt_pipe.dmri.prepare import NONE, Preprocessing
from iqt_pipe.io import InputError
from iqt_pipe.models import VARIANTS, IQTNet, gaussian_nll, save_model
from iqt_pipe.models.espcn import KERNELS, WIDTHS, architecture_problem, inputs_problem, margin, masked_mean
from iqt_pipe.models.files import check_model_file, model_paths
from iqt_pipe.sr.checkpoints import (
    CHECKPOINT_DIR,
    CHECKPOINT_JSON,
    METRICS,
    check_resumable,
    load_checkpoint,
    read_metrics,
    restore_checkpoint,
    save_checkpoint,
    trim_metrics,
)
from iqt_pipe.sr.distributed import DistContext
from iqt_pipe.sr.normalise import TARGETS
from iqt_pipe.sr.patches import DEFAULT_PATCHES_PER_SUBJECT, N_MIRRORS, N_SYMMETRIES, PatchLibrary, patch_geometry

log = logging.getLogger("iqt_pipe.sr.training")

SCHEDULES = ("fixed", "anneal")
#: The learning rate over the run: constant, or cosine decay from ``lr`` to 0 step by step.
LR_DECAYS = ("none", "cosine")
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


# --------------------------------------------------------------------------- the recipe


@dataclass
class TrainSettings:
    """The training recipe (see the module docstring): network, loss, optimiser, augmentation
    and seed; the defaults are ``iqt-train``'s. :meth:`check` raises one-line errors for settings
    that cannot work, naming the setting and its command-line option: :func:`train` runs it, and
    ``iqt-train`` and ``iqt-eval --cross-validate`` before any data is read."""

    variant: str = DEFAULT_VARIANT
    epochs: int = DEFAULT_EPOCHS
    #: Patch pairs per optimiser step, over all processes.
    batch_size: int = DEFAULT_BATCH
    lr: float = DEFAULT_LR
    val_fraction: float = DEFAULT_VAL_FRACTION
    schedule: str = "fixed"
    #: ``"cosine"``: the learning rate falls from ``lr`` to 0 over the ``epochs`` (half a cosine).
    lr_decay: str = "none"
    #: Mirror augmentation; ``axis_swap`` adds the axis permutations to it.
    augment: bool = DEFAULT_AUGMENT
    axis_swap: bool = False
    #: The architecture (the paper's 50, 100 and 3-1-3 by default), whose margin must be the library's.
    widths: Sequence[int] = WIDTHS
    kernels: Sequence[int] = KERNELS
    #: The network's input channels: the tensor components, and optionally the LR fit's S0.
    inputs: Sequence[str] = ("tensor",)
    #: ``"brain"``: the data term averages (and the KL term is scaled) over the HR brain voxels only.
    loss_mask: str = DEFAULT_LOSS_MASK
    #: Initialisation, split, shuffles, mirror codes and weight noise.
    seed: int = 0
    #: The anneal schedule's MSE epochs and switch epochs (default: a quarter of ``epochs`` each, at least 1).
    anneal_start: int | None = None
    anneal_epochs: int | None = None

    def check(self) -> None:
        """One-line errors (:class:`~iqt_pipe.io.InputError`) for unknown or contradicting settings.
        The validation fraction is checked when the pairs are split (:func:`split_indices`)."""
        if self.variant not in VARIANTS:
            raise InputError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"unknown schedule {self.schedule!r}; choose fixed or anneal")
        if self.schedule == "anneal" and not VARIANTS[self.variant][0]:
            raise InputError(
                f"the anneal schedule (--schedule anneal) switches MSE to the heteroscedastic NLL; variant "
                f"{self.variant} has no precision network (use a hetero variant or --schedule fixed)"
            )
        if self.lr_decay not in LR_DECAYS:
            raise InputError(f"unknown learning-rate decay {self.lr_decay!r}; choose {' or '.join(LR_DECAYS)}")
        if self.loss_mask not in LOSS_MASKS:
            raise InputError(f"unknown loss mask {self.loss_mask!r}; choose {' or '.join(LOSS_MASKS)}")
        if self.axis_swap and not self.augment:
            raise InputError("--axis-swap extends the augmentation; drop --no-augment (axis swaps need augment on)")
        if problem := architecture_problem(self.widths, self.kernels):
            raise InputError(problem)
        if problem := inputs_problem(self.inputs):
            raise InputError(problem.replace("inputs ", "--inputs ", 1))
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise InputError(
                f"epochs ({self.epochs}) and batch size ({self.batch_size}) must be ≥ 1 and the "
                f"learning rate ({self.lr}) > 0"
            )

    def resolved(self) -> TrainSettings:
        """These settings with the anneal schedule's epochs filled in."""
        default = max(1, self.epochs // 4)
        return replace(
            self,
            anneal_start=default if self.anneal_start is None else int(self.anneal_start),
            anneal_epochs=default if self.anneal_epochs is None else int(self.anneal_epochs),
        )

    def recipe(self) -> dict:
        """The recipe as ``iqt-eval --cross-validate`` records it: every setting but the seed
        (recorded on its own) and the anneal schedule's epochs (no command-line option)."""
        return {k: v for k, v in asdict(self).items() if k not in ("seed", "anneal_start", "anneal_epochs")}

    def library_options(
        self,
        *,
        r: int = 2,
        patches_per_subject: int = DEFAULT_PATCHES_PER_SUBJECT,
        target: str = DEFAULT_TARGET,
        preprocessing: Preprocessing = NONE,
        grid_shifts: bool = False,
        register_volumes: bool = False,
    ) -> dict:
        """:func:`~iqt_pipe.sr.patches.build_library`'s keywords for a patch library these settings
        can train on: patches cut for the margin of :attr:`kernels`, sampled with :attr:`seed`."""
        return {
            "r": r,
            "patches_per_subject": patches_per_subject,
            "seed": self.seed,
            "target": target,
            "preprocessing": preprocessing,
            "grid_shifts": grid_shifts,
            "register_volumes": register_volumes,
            **patch_geometry(margin(self.kernels)),
        }


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

    def __init__(
        self,
        library: PatchLibrary,
        indices: np.ndarray,
        augment: bool = False,
        seed: int = 0,
        axis_swap: bool = False,
        with_brain: bool = False,
        s0: bool = False,
    ):
        self.library, self.indices, self.augment, self.seed = library, np.asarray(indices), augment, int(seed)
        self.with_brain, self.s0 = with_brain, s0
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
        x, y = self.library.pair(i, code, self.s0)
        item = (torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)))
        if self.with_brain:
            item += (torch.from_numpy(self.library.brain_patch(i, code)[None].astype(np.float32)),)
        return item


# --------------------------------------------------------------------------- losses


def decayed_lr(lr: float, decay: str, epoch_position: float, epochs: int) -> float:
    """The learning rate at a (fractional) epoch position: ``lr``, or with ``decay="cosine"``
    lr·(1 + cos(π·position/epochs))/2, which reaches 0 at the last step."""
    if decay == "none":
        return lr
    return 0.5 * lr * (1 + math.cos(math.pi * min(1.0, epoch_position / epochs)))


def anneal_weight(epoch_position: float, start: int, length: int) -> float:
    """Weight of the NLL in the anneal schedule at a (fractional) epoch position."""
    return float(min(1.0, max(0.0, (epoch_position - start) / max(1, length))))


def data_loss(
    mean: torch.Tensor,
    precision: torch.Tensor | None,
    target: torch.Tensor,
    nll_weight: float,
    brain: torch.Tensor | None = None,
) -> torch.Tensor:
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
    return 6 * sum(int(library.brain(indices[s : s + step]).sum()) for s in range(0, len(indices), step))


def loss_description(variant: str, schedule: str, loss_mask: str = "none") -> str:
    hetero, var = VARIANTS[variant]
    data = "Gaussian NLL mean(prec·(y−μ)²) − mean(log prec)" if hetero else "MSE"
    if schedule == "anneal":
        data = "MSE, then a linear switch to " + data
    if var:
        data += " + 2·KL/N (N = training target elements; Kingma 2015 log-uniform approximation)"
    where = " over the HR brain-mask voxels" if loss_mask == "brain" else ""
    return data + f" on standardised targets{where}"


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
        return (
            f"the model's validation RMSE is {ratio:.3f} × cubic B-spline's: it has learnt (almost) nothing over "
            f"interpolation; train longer, or with a lower --lr (e.g. {lr / 3:.2g}) or another --seed"
        )
    return None


def fine_tuning_warning(card: dict) -> str | None:
    """A one-line warning when a fine-tuned model (``--init``) scores no better on its
    validation patches than the weights it started from, else None."""
    start = card["training"].get("initialised_from", {}).get("validation")
    best = card["validation"]["loss"]
    if start is None or best < start["loss"]:
        return None
    return (
        f"no epoch beat the starting model on the validation patches (loss {start['loss']:.4g}, best epoch "
        f"{best:.4g}): the fine-tuned model is no better than the one it started from; keep that one, or train "
        "with a lower --lr"
    )


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


@dataclass
class _Run:
    """What the epochs of one training share: the settings (anneal epochs resolved), the data
    and its split, the model (``net``: wrapped for data-parallel training) and the optimiser."""

    settings: TrainSettings
    library: PatchLibrary
    out: Path
    dist: DistContext
    device: torch.device
    quiet: bool
    data_summary: dict | None
    model: IQTNet
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    dataset: PatchDataset
    sampler: torch.utils.data.DistributedSampler
    loader: torch.utils.data.DataLoader
    train_idx: np.ndarray
    val_idx: np.ndarray
    #: N of the 2·KL/N term.
    n_elements: int
    #: Validation RMSE of the interpolations (mm²/s).
    baselines: dict
    #: The model file the weights started from (:func:`_initialise`), or None: from the seed.
    init: dict | None = None


@dataclass
class _Progress:
    """How far a training has come: the epochs done and the best validation so far."""

    epoch: int = 0
    best_val: float = math.inf
    best_epoch: int = 0
    best_rmse: float = math.nan
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    #: The best weights' :func:`diagonal_correlation` (hetero variants; None until known).
    best_correlation: float | None = None


def _epoch_progress(quiet: bool, dist: DistContext):
    """tqdm's ``disable``: True when quiet or not rank 0; None (auto: off when not a TTY)."""
    return True if (quiet or not dist.is_main) else None


@torch.no_grad()
def validate(
    model: IQTNet,
    library: PatchLibrary,
    indices: np.ndarray,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dist: DistContext | None = None,
    quiet: bool = True,
    loss_mask: str = "none",
) -> dict[str, float]:
    """Validation loss (final objective's data term) and RMSE (mm²/s, brain voxels), mean weights.

    With a distributed context, each process scores ``indices[rank::world]`` and the sums are
    all-reduced.
    """
    from tqdm.auto import tqdm

    dist = dist or DistContext(device=torch.device(device))
    device = torch.device(device)
    mine = np.asarray(indices)[dist.rank :: dist.world_size]
    model.eval()
    loss_sum = n_el = sse = n_brain = 0.0
    z_sums = np.zeros(len(_PAIRS))  # Σ z_a z_b over brain voxels, hetero variants
    starts = range(0, len(mine), batch_size)
    for s in tqdm(starts, desc="validation", leave=False, unit="batch", disable=_epoch_progress(quiet, dist)):
        idx = mine[s : s + batch_size]
        x, y = library.get(idx, s0="s0" in model.inputs)
        xt = torch.from_numpy(x).to(device, memory_format=memory_format(device))
        yt = torch.from_numpy(y).to(device)
        mean, prec = model(xt, sample=False)
        brain = library.brain(idx)[:, None]
        weights = torch.from_numpy(brain.astype(np.float32)).to(device) if loss_mask == "brain" else None
        loss = data_loss(mean, prec, yt, 1.0, weights)
        elements = yt.numel() if weights is None else float(brain.sum()) * yt.shape[1]
        loss_sum += float(loss) * elements
        n_el += elements
        diff = mean - yt
        err = diff.double().cpu().numpy() * library.sd(idx)[:, :, None, None, None]
        sse += float(np.sum(err**2 * brain))
        n_brain += float(brain.sum())
        if prec is not None:
            # Standardised errors of the diagonal components: (mean − y)·√precision.
            diag = list(DIAGONAL)
            z = (diff[:, diag] * prec[:, diag].sqrt()).double().cpu().numpy() * brain
            z_sums += [float(np.sum(z[:, a] * z[:, b])) for a, b in _PAIRS]
    loss_sum, n_el, sse, n_brain, *z_sums = dist.all_sum([loss_sum, n_el, sse, n_brain, *z_sums])
    out = {"loss": loss_sum / max(1.0, n_el), "rmse": math.sqrt(sse / max(1.0, 6 * n_brain))}
    if model.hetero:
        out["diagonal_correlation"] = diagonal_correlation(z_sums)
    return out


#: Pairs of the three diagonal components (positions in DIAGONAL): the squares, then the products.
_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


def diagonal_correlation(z_sums: Sequence[float]) -> float:
    """The correlation of the intrinsic errors of the diagonal components, from the sums over
    voxels of the standardised errors' squares and products (in the order of ``_PAIRS``): the
    mean of the three pairs' correlations, clipped to [0, 0.99].

    The heteroscedastic model gives each component its own variance, as if the errors were
    independent; on real data the diagonal ones are not (an error in the b = 0 signal or a
    partial volume moves all three together), so the variance of MD, a sum of them, would be
    underestimated. Inference adds this correlation back (:func:`~iqt_pipe.sr.inference.predict_volume`).
    """
    sq, cross = np.asarray(z_sums[:3], float), np.asarray(z_sums[3:], float)
    norms = np.sqrt([sq[a] * sq[b] for (a, b) in _PAIRS[3:]])
    if not np.all(norms > 0):
        return 0.0
    return float(np.clip(np.mean(cross / norms), 0.0, 0.99))


def train(
    library: PatchLibrary,
    out_dir: str | os.PathLike,
    settings: TrainSettings | None = None,
    *,
    device: torch.device | str = "cpu",
    resume: bool = False,
    init: str | os.PathLike | None = None,
    quiet: bool = False,
    dist: DistContext | None = None,
    data_summary: dict | None = None,
    **recipe,
) -> TrainResult:
    """Train on ``library`` into ``out_dir`` with ``settings`` (see the module docstring).

    ``recipe``: any :class:`TrainSettings` field as a keyword (``variant=``, ``epochs=``,
    ``seed=``, ``loss_mask=``, …), in place of ``settings`` or overriding its value.
    Writes ``OUT_DIR/model.safetensors`` + ``model.json`` (best validation loss),
    ``OUT_DIR/metrics.jsonl`` and ``OUT_DIR/checkpoint/``; ``resume`` continues from the
    checkpoint. ``init`` starts from the weights of that model file instead of the seed's
    (fine-tuning: its network must be the one ``settings`` describe, for the library's r and
    target; a resumed run must repeat it). The architecture's margin must be the library's.
    ``data_summary`` (datasets, subjects, …) is merged into the card's ``training`` entry.
    Returns a :class:`TrainResult` (on every rank; only rank 0 writes).
    """
    from tqdm.auto import tqdm

    settings = replace(settings or TrainSettings(), **recipe)
    dist = dist or DistContext(device=torch.device(device))
    device = dist.device if dist.distributed else torch.device(device)
    settings.check()
    _check_library(library, settings)
    out = Path(out_dir).expanduser().absolute()
    if dist.is_main:
        check_training_dir(out, resume)
    run = _start(library, out, settings.resolved(), dist, device, quiet, data_summary)
    if init is not None:
        run.init = _initialise(run, init)
    progress = _resume(run, resume)
    if run.init is not None and progress.epoch == 0:
        # The starting weights on the validation patches: the score fine-tuning has to beat.
        run.init["validation"] = _validate(run, run.model)
    start, epochs = progress.epoch, run.settings.epochs
    metrics = read_metrics(out / METRICS) if dist.is_main else []
    with _deterministic(device):
        epoch_bar = tqdm(
            range(start, epochs),
            desc="epochs",
            unit="epoch",
            initial=start,
            total=epochs,
            disable=_epoch_progress(quiet, dist),
            dynamic_ncols=True,
        )
        for epoch in epoch_bar:
            row = _epoch(run, progress, epoch)
            metrics.append(row)
            epoch_bar.set_postfix(val_loss=f"{row['val_loss']:.4g}", rmse=f"{row['val_rmse']:.3e}")
        epoch_bar.close()
    if run.model.hetero and progress.best_correlation is None:  # a checkpoint from before it was kept
        progress.best_correlation = _best_correlation(run, progress)

    card = _card(run, progress)
    weights = model_paths(out)[0]
    if dist.is_main:
        weights = _save_best(progress.best_state, run.model, out, card)
    dist.barrier()
    return TrainResult(weights, card, metrics, progress.best_epoch, progress.epoch)


def _check_library(library: PatchLibrary, settings: TrainSettings) -> None:
    """One-line errors when ``library`` cannot train ``settings``' network."""
    if library.target not in TARGETS:
        raise InputError(f"unknown target {library.target!r}")
    if library.margin != margin(settings.kernels):
        raise InputError(
            f"kernels {list(settings.kernels)} lose {margin(settings.kernels)} LR voxels per side but "
            f"the patch library was cut for {library.margin}; build it with margin "
            f"{margin(settings.kernels)}"
        )


def _start(
    library: PatchLibrary,
    out: Path,
    settings: TrainSettings,
    dist: DistContext,
    device: torch.device,
    quiet: bool,
    data_summary: dict | None,
) -> _Run:
    """Split the pairs, initialise the model from the seed, and set up the optimiser and the
    training batches: shuffled by a seeded ``DistributedSampler``, each process taking
    ceil(batch_size / world_size) pairs per step."""
    train_idx, val_idx = split_indices(len(library), settings.val_fraction, settings.seed)
    torch.manual_seed(settings.seed)
    model = IQTNet(settings.variant, library.r, settings.widths, settings.kernels, tuple(settings.inputs))
    model = model.to(device, memory_format=memory_format(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    dataset = PatchDataset(
        library,
        train_idx,
        settings.augment,
        settings.seed,
        settings.axis_swap,
        with_brain=settings.loss_mask == "brain",
        s0="s0" in settings.inputs,
    )
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=int(settings.seed), drop_last=False
    )
    per_rank = math.ceil(settings.batch_size / dist.world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=0)
    net = model
    if dist.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return _Run(
        settings,
        library,
        out,
        dist,
        device,
        quiet,
        data_summary,
        model,
        net,
        optimizer,
        dataset,
        sampler,
        loader,
        train_idx,
        val_idx,
        target_elements(library, train_idx, settings.loss_mask),
        library.baseline_rmse(val_idx),
    )


def _record(run: _Run) -> dict:
    """The settings as checkpoints record them and a resumed run must repeat them."""
    settings, library = run.settings, run.library
    anneal = settings.schedule == "anneal"
    return {
        "variant": settings.variant,
        "r": library.r,
        "target": library.target,
        "seed": int(settings.seed),
        "batch_size": int(settings.batch_size),
        "lr": float(settings.lr),
        "val_fraction": float(settings.val_fraction),
        "schedule": settings.schedule,
        "lr_decay": settings.lr_decay,
        # A cosine decay spans the run's epochs: a resumed run must keep them.
        "lr_decay_epochs": int(settings.epochs) if settings.lr_decay != "none" else None,
        "anneal_start": settings.anneal_start if anneal else None,
        "anneal_epochs": settings.anneal_epochs if anneal else None,
        "augment": bool(settings.augment),
        "axis_swap": bool(settings.axis_swap),
        "loss_mask": settings.loss_mask,
        "widths": [int(w) for w in settings.widths],
        "kernels": [int(k) for k in settings.kernels],
        "inputs": list(settings.inputs),
        "library_key": library.meta.get("key"),
        "patches": len(library),
        "init": run.init["sha256"] if run.init else None,
    }


def check_init(path: str | os.PathLike, settings: TrainSettings, r: int, target: str) -> tuple[dict, dict]:
    """Every check of a model file to fine-tune (``--init``) — the file itself
    (:func:`~iqt_pipe.models.files.check_model_file`) and one-line errors when its network is
    not the one ``settings`` train for ``r`` and ``target``. Returns ``(card, state)``."""
    card, state = check_model_file(path, expect_r=r)
    wanted = {
        "variant": (settings.variant, card["variant"]),
        "widths": (list(settings.widths), card.get("widths", list(WIDTHS))),
        "kernels": (list(settings.kernels), card.get("kernels", list(KERNELS))),
        "inputs": (list(settings.inputs), card.get("inputs", ["tensor"])),
        "target": (target, card.get("target", "hr")),
    }
    for key, (ours, theirs) in wanted.items():
        if ours != theirs:
            raise InputError(
                f"{path}: the --init model has {key} {theirs!r}, this training {ours!r}; "
                f"train with --{key} as in its model.json, or without --init"
            )
    return card, state


def _initialise(run: _Run, path: str | os.PathLike) -> dict:
    """Load the weights of the model file at ``path`` into ``run.model`` (:func:`check_init`
    first). Returns what the card records of it: its training, and where that one started
    from in turn, so a model fine-tuned twice keeps its whole history (:func:`train` adds its
    score on this training's validation patches)."""
    card, state = check_init(path, run.settings, run.library.r, run.library.target)
    run.model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    before = card.get("training", {})
    record = {
        "model": model_paths(path)[0].name,
        "sha256": card["weights"]["sha256"],
        "epochs": before.get("epochs"),
        "runs": before.get("runs"),
        "preprocessing": before.get("preprocessing"),
        "grid_shifts": bool(before.get("patches", {}).get("grid_shifts", False)),
    }
    if before.get("initialised_from"):
        record["initialised_from"] = before["initialised_from"]
    return record


def _state(model: IQTNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _resume(run: _Run, resume: bool) -> _Progress:
    """Where the training starts: at the beginning, or with ``resume`` after the checkpoint in
    the output folder (model, Adam state, best weights restored), whose settings this run must
    repeat; an anneal schedule takes the checkpoint's epochs. Rank 0 trims the metrics log to
    the epochs the checkpoint covers."""
    progress = _Progress(best_state=_state(run.model))
    ckpt = load_checkpoint(run.out) if resume else None
    if resume and ckpt is None and run.dist.is_main:
        log.warning("%s: no checkpoint to resume from; training from the start", run.out)
    if ckpt is not None:
        state, tensors = ckpt
        saved = state.get("settings", {})
        s = run.settings
        if s.schedule == "anneal":  # the checkpoint's resolved schedule wins
            run.settings = replace(
                s,
                anneal_start=saved.get("anneal_start", s.anneal_start),
                anneal_epochs=saved.get("anneal_epochs", s.anneal_epochs),
            )
        check_resumable(run.out, saved, _record(run))
        best_state = restore_checkpoint(run.model, run.optimizer, state, tensors)
        if run.init is not None and state.get("init_validation") is not None:
            run.init["validation"] = state["init_validation"]
        progress = _Progress(
            state["epoch"],
            state["best_val_loss"],
            state["best_epoch"],
            state.get("best_val_rmse", math.nan),
            best_state,
            state.get("best_diagonal_correlation"),
        )
        if run.dist.is_main:
            log.info(
                "resuming %s after epoch %d (best validation loss %.4g at epoch %d)",
                run.out,
                progress.epoch,
                progress.best_val,
                progress.best_epoch,
            )
    if run.dist.is_main:
        trim_metrics(run.out / METRICS, progress.epoch)
    return progress


def _epoch(run: _Run, progress: _Progress, epoch: int) -> dict:
    """Train epoch ``epoch`` (from 0) and validate it; rank 0 then logs its metrics row, saves
    the model when it is the best so far, and writes the checkpoint. Returns the row."""
    s = run.settings
    t0 = time.perf_counter()
    train_loss = _train_steps(run, epoch)
    val = _validate(run, run.model)
    seconds = time.perf_counter() - t0
    improved = val["loss"] < progress.best_val
    if improved:
        progress.best_val, progress.best_epoch, progress.best_rmse = val["loss"], epoch + 1, val["rmse"]
        progress.best_state = _state(run.model)
        progress.best_correlation = val.get("diagonal_correlation")
    progress.epoch = epoch + 1
    row = {
        "epoch": epoch + 1,
        "train_loss": train_loss,
        "val_loss": val["loss"],
        "val_rmse": val["rmse"],
        **({"val_diagonal_correlation": val["diagonal_correlation"]} if "diagonal_correlation" in val else {}),
        "seconds": round(seconds, 3),
        "best": improved,
    }
    if s.schedule == "anneal":
        row["nll_weight"] = anneal_weight(epoch + 1, s.anneal_start, s.anneal_epochs)
    if run.dist.is_main:
        with open(run.out / METRICS, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if improved:
            _save_best(progress.best_state, run.model, run.out, _card(run, progress))
        save_checkpoint(
            run.out,
            run.model,
            run.optimizer,
            progress.best_state,
            {
                "epoch": epoch + 1,
                "best_val_loss": progress.best_val,
                "best_epoch": progress.best_epoch,
                "best_val_rmse": progress.best_rmse,
                "best_diagonal_correlation": progress.best_correlation,
                "init_validation": run.init.get("validation") if run.init else None,
                "settings": _record(run),
            },
        )
    log.debug("epoch %d: %s", epoch + 1, row)
    return row


def _train_steps(run: _Run, epoch: int) -> float:
    """One pass of this process over its share of the training pairs, shuffle, mirror codes and
    weight noise drawn for ``(seed, epoch[, rank])``; the mean step loss over all processes."""
    from tqdm.auto import tqdm

    s, dist, device, model = run.settings, run.dist, run.device, run.model
    hetero, var = VARIANTS[s.variant]
    run.sampler.set_epoch(epoch)
    run.dataset.set_epoch(epoch)
    torch.manual_seed(_epoch_seed(s.seed, epoch, dist.rank))
    model.train()
    n_steps = len(run.loader)
    running = 0.0
    batch_bar = tqdm(
        run.loader,
        desc=f"epoch {epoch + 1}",
        leave=False,
        unit="batch",
        disable=_epoch_progress(run.quiet, dist),
        dynamic_ncols=True,
    )
    for step, (x, y, *brain) in enumerate(batch_bar):
        x = x.to(device, non_blocking=True, memory_format=memory_format(device))
        y = y.to(device, non_blocking=True)
        brain = brain[0].to(device, non_blocking=True) if brain else None
        w = 1.0 if hetero else 0.0
        if s.schedule == "anneal":
            w = anneal_weight(epoch + (step + 1) / n_steps, s.anneal_start, s.anneal_epochs)
        lr = decayed_lr(s.lr, s.lr_decay, epoch + step / n_steps, s.epochs)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        mean, prec = run.net(x, sample=model.stochastic)
        loss = data_loss(mean, prec, y, w, brain)
        if brain is not None and dist.distributed:
            # DDP averages the processes' gradients: weight each process's masked mean by its
            # share of the batch's brain voxels, so a step follows the whole batch's masked
            # mean exactly as on one process.
            local = float(brain.sum())
            (total,) = dist.all_sum([local])
            loss = loss * (local * dist.world_size / max(total, 1.0))
        if var:
            loss = loss + 2 * model.kl() / run.n_elements
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        running += float(loss.detach())
        batch_bar.set_postfix(loss=f"{running / (step + 1):.4g}")
    (train_sum, train_n) = dist.all_sum([running, n_steps])
    if not math.isfinite(train_sum):
        raise RuntimeError(f"training diverged (non-finite loss) in epoch {epoch + 1}; lower the learning rate")
    return train_sum / max(1, train_n)


def _validate(run: _Run, model: IQTNet) -> dict[str, float]:
    """:func:`validate` of ``model`` on the run's validation patches."""
    return validate(
        model,
        run.library,
        run.val_idx,
        batch_size=max(run.settings.batch_size, 32),
        device=run.device,
        dist=run.dist,
        quiet=run.quiet,
        loss_mask=run.settings.loss_mask,
    )


def _same_network(model: IQTNet) -> IQTNet:
    """A fresh network of ``model``'s architecture and inputs."""
    return IQTNet(model.variant, model.r, model.widths, model.kernels, model.inputs)


def _best_correlation(run: _Run, progress: _Progress) -> float:
    """:func:`diagonal_correlation` of the best weights on the validation patches."""
    best = _same_network(run.model).to(run.device)
    best.load_state_dict(progress.best_state)
    return _validate(run, best)["diagonal_correlation"]


def _save_best(best_state: dict, model: IQTNet, out: Path, card: dict) -> Path:
    best = _same_network(model)
    best.load_state_dict(best_state)
    return save_model(best, out, card)


def _card(run: _Run, progress: _Progress) -> dict:
    """The model card after ``progress.epoch`` epochs (:func:`~iqt_pipe.models.save_model` adds
    the architecture)."""
    library, settings = run.library, _record(run)
    training = {
        **(run.data_summary or {}),
        "runs": [rp.name for rp in library.runs],
        "patches": {
            "total": len(library),
            "train": len(run.train_idx),
            "validation": len(run.val_idx),
            "per_subject": library.meta.get("patches_per_subject"),
            "grid_shifts": bool(library.meta.get("grid_shifts", False)),
            "registered_volumes": bool(library.meta.get("register_volumes", False)),
            "input_size": library.input_size,
            "target_size": library.r * library.core,
        },
        "upsample": library.r,
        "epochs": int(progress.epoch),
        "seed": settings["seed"],
        "variant": settings["variant"],
        "schedule": settings["schedule"],
        "augment": settings["augment"],
        "axis_swap": settings["axis_swap"],
        "optimizer": "Adam",
        "learning_rate": settings["lr"],
        "lr_decay": settings["lr_decay"],
        "batch_size": settings["batch_size"],
        "val_fraction": settings["val_fraction"],
        "loss": loss_description(settings["variant"], settings["schedule"], settings["loss_mask"]),
        "loss_mask": settings["loss_mask"],
        "world_size": run.dist.world_size,
        "device": run.device.type,
        "patch_library": settings["library_key"],
        # The series the patches came from: what the app must do to a native series.
        "preprocessing": library.meta.get("preprocessing", NONE.to_card()),
    }
    if library.meta.get("domain"):
        training["domain"] = library.meta["domain"]
    if run.init:
        training["initialised_from"] = run.init
    if settings["schedule"] == "anneal":
        training["anneal"] = {"mse_epochs": settings["anneal_start"], "switch_epochs": settings["anneal_epochs"]}
    calibration = {}
    if progress.best_correlation is not None:
        calibration["diagonal_correlation"] = progress.best_correlation
        calibration["estimated_on"] = "validation patches, HR brain voxels, best epoch's mean weights"
    return {
        "target": settings["target"],
        "normalisation": dict(NORMALISATION),
        "training": training,
        **({"calibration": calibration} if calibration else {}),
        "validation": {
            "best_epoch": int(progress.best_epoch),
            "loss": float(progress.best_val),
            "rmse": {"model": float(progress.best_rmse), **{k: float(v) for k, v in run.baselines.items()}},
            "units": "mm^2/s",
            "voxels": "HR brain-mask voxels of the validation patches' targets, 6 components",
            "weights": "mean (no Monte-Carlo sampling)",
        },
    }
