"""Model files: safetensors weights + a JSON model card. Nothing is ever unpickled.

A model is the pair ``model.safetensors`` / ``model.json``. Loading checks the card
(format, variant, r, layer sizes), the weights' sha256 recorded in the card, and every tensor
name and shape against the network the card describes; anything else is refused with one line.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from iqt_pipe import __version__
from iqt_pipe.io import InputError, atomic_path, save_json
from iqt_pipe.models.espcn import KERNELS, VARIANTS, WIDTHS, IQTNet, inputs_problem
from iqt_pipe.sr.normalise import TARGETS

FORMAT = "iqt-pipe-model"
FORMAT_VERSION = 1
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol ≥ 2, zip (torch.save)


class ModelFileError(InputError):
    """A model file that cannot be used safely; one line naming the file and the fix."""


#: The bundled default models (weights + card in ``iqt_pipe/data/models/``), by upsampling factor.
BUNDLED = {2: "iqt-hetero-var2-r2"}


def bundled_dir() -> Path:
    """``iqt_pipe/data/models``: where the bundled models live."""
    return Path(__file__).resolve().parent.parent / "data" / "models"


def bundled_model(r: int = 2) -> Path:
    """The weights file of the default model for upsampling factor ``r``."""
    if r not in BUNDLED:
        raise ModelFileError(
            f"no model is bundled for r = {r} (only r = {', '.join(map(str, BUNDLED))}); "
            f"train one with iqt-train -r {r} and pass --model"
        )
    path = bundled_dir() / f"{BUNDLED[r]}.safetensors"
    if not path.exists():
        raise ModelFileError(
            f"{path}: the bundled model is missing from this installation; reinstall iqt-pipe or pass --model"
        )
    return path


def model_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(weights, card)`` for a model folder, ``.safetensors`` or ``.json`` path."""
    path = Path(path)
    if path.is_dir():
        return path / "model.safetensors", path / "model.json"
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_model(model: IQTNet, path: str | os.PathLike, card: dict[str, Any] | None = None) -> Path:
    """Write weights and card atomically; ``card`` adds training/validation/normalisation facts.

    Returns the weights path.
    """
    from safetensors.torch import save_file

    weights, card_path = model_paths(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "variant": model.variant, "upsample": str(model.r)})
        digest = sha256(tmp)
    full = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "variant": model.variant,
        "upsample": model.r,
        "channels": 6,
        "inputs": list(model.inputs),
        "widths": list(model.widths),
        "kernels": list(model.kernels),
        **(card or {}),
        "iqt_pipe_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "weights": {
            "file": weights.name,
            "sha256": digest,
            "tensors": {k: list(v.shape) for k, v in state.items()},
        },
    }
    save_json(full, card_path)
    return weights


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a model card (not the weights)."""
    _, card_path = model_paths(path)
    if not card_path.exists():
        raise ModelFileError(f"{card_path}: model card not found; a model is model.safetensors plus model.json")
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{card_path}: the model card is not valid JSON ({exc}); re-download the model") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise ModelFileError(f"{card_path}: not an iqt-pipe model card (format is not {FORMAT!r})")
    if card.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{card_path}: model format version {card.get('format_version')!r} is not supported "
            f"(this iqt-pipe reads version {FORMAT_VERSION}); upgrade iqt-pipe"
        )
    if card.get("variant") not in VARIANTS:
        raise ModelFileError(f"{card_path}: unknown variant {card.get('variant')!r}; known: {', '.join(VARIANTS)}")
    r = card.get("upsample")
    if not isinstance(r, int) or r < 2:
        raise ModelFileError(f"{card_path}: upsampling factor {r!r} is not an integer ≥ 2")
    if card.get("target", "hr") not in TARGETS:
        raise ModelFileError(f"{card_path}: unknown target {card.get('target')!r}; known: {', '.join(TARGETS)}")
    for key in ("widths", "kernels"):
        value = card.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, int) and v > 0 for v in value)):
            raise ModelFileError(f"{card_path}: {key} must be a list of positive integers, got {value!r}")
    inputs = card.get("inputs", ["tensor"])
    if not isinstance(inputs, list) or inputs_problem(inputs):
        raise ModelFileError(f'{card_path}: unknown network inputs {inputs!r}; known: ["tensor"] and ["tensor", "s0"]')
    if not isinstance(card.get("weights"), dict) or "sha256" not in card["weights"]:
        raise ModelFileError(f"{card_path}: the card records no weights checksum; re-export the model")
    return card


def check_model_file(path: str | os.PathLike, expect_r: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every check of a model file without running the network: the card, the weights'
    sha256, safetensors (never a pickle), each tensor's name and shape, finite values and the
    calibration. Returns ``(card, state)`` with the tensors as NumPy arrays.

    No PyTorch computation happens here (the network is built on the ``meta`` device), so a
    parent process may call it before forking workers: PyTorch's thread pool does not survive
    a fork.
    """
    import numpy as np
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    weights, card_path = model_paths(path)
    card = read_card(path)
    if expect_r is not None and card["upsample"] != expect_r:
        raise ModelFileError(
            f"{card_path}: the model upsamples by {card['upsample']}, not {expect_r}; choose a model for r = {expect_r}"
        )
    if not weights.exists():
        raise ModelFileError(f"{weights}: weights file not found beside its card")
    with open(weights, "rb") as fh:
        head = fh.read(4)
    if head.startswith(_PICKLE_MAGIC):
        raise ModelFileError(
            f"{weights}: this is a pickle/torch.save file; iqt-pipe only loads safetensors (pickles can run code)"
        )
    if sha256(weights) != card["weights"]["sha256"]:
        raise ModelFileError(
            f"{weights}: checksum differs from the card's (corrupt, truncated or mismatched file); "
            "re-download the model"
        )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{weights}: not a readable safetensors file ({exc})") from None
    with torch.device("meta"):
        shapes = network_of_card(card)
    expected = {k: tuple(v.shape) for k, v in shapes.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))[:3]
        raise ModelFileError(
            f"{weights}: tensors do not match a {card['variant']} r={card['upsample']} network (e.g. {diff}); "
            "the card and weights belong to different models"
        )
    broken = next((k for k, v in state.items() if not np.all(np.isfinite(v))), None)
    if broken is not None:
        raise ModelFileError(
            f"{weights}: the weights hold NaN or Inf (tensor {broken}); the training diverged, use another model"
        )
    scale = card.get("calibration", {}).get("variance_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise ModelFileError(f"{card_path}: calibration.variance_scale must be a positive number; fix or remove it")
    rho = card.get("calibration", {}).get("diagonal_correlation", 0.0)
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 <= rho < 1:
        raise ModelFileError(
            f"{card_path}: calibration.diagonal_correlation must be a number in [0, 1); fix or remove it"
        )
    return card, state


def network_of_card(card: dict[str, Any]) -> IQTNet:
    """The (untrained) network a checked model card describes; cards from before ``inputs``
    (or ``widths``/``kernels``) describe the paper's: the tensor components, 50-100, 3-1-3."""
    return IQTNet(
        card["variant"],
        card["upsample"],
        card.get("widths", WIDTHS),
        card.get("kernels", KERNELS),
        inputs=card.get("inputs", ["tensor"]),
    )


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", expect_r: int | None = None
) -> tuple[IQTNet, dict[str, Any]]:
    """Load a model for inference (``eval()`` mode) after :func:`check_model_file`."""
    card, state = check_model_file(path, expect_r)
    model = network_of_card(card)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    model.target = card.get("target", "hr")
    model.variance_scale = float(card.get("calibration", {}).get("variance_scale", 1.0))
    model.diagonal_correlation = float(card.get("calibration", {}).get("diagonal_correlation", 0.0))
    return model.to(device).eval(), card
