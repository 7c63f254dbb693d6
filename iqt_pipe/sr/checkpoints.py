"""Training checkpoints and the metrics log, what ``--resume`` continues from.

A checkpoint is written after every epoch to ``OUT_DIR/checkpoint/``: ``epoch-NNNN.safetensors``
(model, Adam state, best weights, the torch RNG state as uint8) and ``checkpoint.json`` (epoch,
best validation, the run's settings, the weights' checksum) — nothing pickled. A resumed run
must ask for the settings its checkpoint was trained with (:func:`check_resumable`).
``OUT_DIR/metrics.jsonl`` holds one JSON line per epoch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from iqt_pipe import __version__
from iqt_pipe.io import InputError, atomic_open, atomic_path, save_json
from iqt_pipe.models import IQTNet
from iqt_pipe.models.espcn import KERNELS, WIDTHS
from iqt_pipe.models.files import sha256

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_JSON = "checkpoint.json"
METRICS = "metrics.jsonl"
#: Settings a resumed run must share with its checkpoint.
_RESUME_KEYS = (
    "variant",
    "r",
    "target",
    "seed",
    "batch_size",
    "lr",
    "val_fraction",
    "schedule",
    "lr_decay",
    "lr_decay_epochs",
    "anneal_start",
    "anneal_epochs",
    "augment",
    "axis_swap",
    "loss_mask",
    "widths",
    "kernels",
    "inputs",
    "library_key",
    "patches",
    "init",
)
#: What checkpoints written before a setting existed were trained with.
_RESUME_DEFAULTS = {
    "lr_decay": "none",
    "lr_decay_epochs": None,
    "axis_swap": False,
    "loss_mask": "none",
    "widths": list(WIDTHS),
    "kernels": list(KERNELS),
    "inputs": ["tensor"],
    "init": None,
}


def _tensor_dict(
    model: IQTNet, optimizer: torch.optim.Optimizer, best_state: dict[str, torch.Tensor]
) -> tuple[dict, dict]:
    """The tensors of a checkpoint (model, best weights, Adam state, RNG states) and the Adam
    parameter groups, JSON-ready."""
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
    save_json(
        {**state, **extra, "weights": name, "sha256": digest, "iqt_pipe_version": __version__}, folder / CHECKPOINT_JSON
    )
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


def check_resumable(out_dir: Path, saved: dict, settings: dict) -> None:
    """One-line error when ``settings`` (this run's) differ from the ``saved`` settings of the
    checkpoint in ``out_dir`` in a key a resumed run must keep; checkpoints written before a
    setting existed count as trained with its old behaviour."""
    diff = [k for k in _RESUME_KEYS if saved.get(k, _RESUME_DEFAULTS.get(k)) != settings[k]]
    if diff:
        k = diff[0]
        raise InputError(
            f"{out_dir}: the checkpoint was trained with {k} = {saved.get(k, _RESUME_DEFAULTS.get(k))!r}, "
            f"this run asks for {settings[k]!r}; resume with the same settings or choose a new output folder"
        )


def restore_checkpoint(
    model: IQTNet, optimizer, state: dict, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Load a checkpoint's model and Adam state and the torch RNG state; return its best weights."""
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


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics log (none when it does not exist); unreadable lines are skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def trim_metrics(path: Path, keep_epochs: int) -> None:
    """Keep the metrics of the epochs a checkpoint covers (a crash may have logged one more)."""
    rows = [r for r in read_metrics(path) if r.get("epoch", 0) <= keep_epochs]
    if not path.exists() and not rows:
        return
    with atomic_open(path) as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
