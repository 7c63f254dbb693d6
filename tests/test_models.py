"""3D-ESPCN variants, periodic shuffle, variational layers and model files."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from iqt_pipe.models import (
    VARIANTS,
    IQTNet,
    ModelFileError,
    gaussian_nll,
    load_model,
    periodic_shuffle,
    periodic_unshuffle,
    save_model,
)
from iqt_pipe.models.layers import KL_C1, KL_C2, KL_C3, VarConv3d, fused_conv_relu_applies, kl_log_uniform


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_convolution_and_relu_equal_the_two_steps(dtype):
    """CPU inference on a channels-last input runs each hidden layer as one oneDNN call (the
    ReLU as its post-op); with gradients on, the same network runs conv then ReLU."""
    torch.manual_seed(0)
    model = IQTNet("hetero-var2", 2).eval().to(dtype).to(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 6, 12, 12, 12).to(dtype).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        if not fused_conv_relu_applies(x):
            pytest.skip(f"no oneDNN convolution with a post-op in {dtype} in this PyTorch build on this CPU")
        fused = model(x, sample=False)
    assert not fused_conv_relu_applies(x)
    two_steps = model(x, sample=False)  # gradients on: no fusion
    for a, b in zip(fused, two_steps):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


def test_a_fused_operator_that_fails_its_check_is_not_used(monkeypatch):
    """oneDNN's fused convolution is a private operator: one whose signature or result differs
    fails the one-time check, and inference runs conv then ReLU."""
    from iqt_pipe.models import layers

    def changed(*args):
        raise TypeError("unexpected arguments")

    monkeypatch.setattr(layers, "_CONV_POINTWISE", changed)
    layers._conv_pointwise_works.cache_clear()
    try:
        torch.manual_seed(0)
        model = IQTNet("hetero", 2).eval().to(memory_format=torch.channels_last_3d)
        x = torch.randn(1, 6, 8, 8, 8).contiguous(memory_format=torch.channels_last_3d)
        with torch.no_grad():
            assert not fused_conv_relu_applies(x)
            mean, prec = model(x, sample=False)
        assert mean.shape == (1, 6, 8, 8, 8) and torch.all(prec > 0)
    finally:
        monkeypatch.undo()
        layers._conv_pointwise_works.cache_clear()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("r", [2, 3])
def test_shapes_of_every_variant(variant, r):
    torch.manual_seed(0)
    net = IQTNet(variant, r)
    mean, prec = net(torch.randn(2, 6, 11, 11, 11))
    assert mean.shape == (2, 6, 7 * r, 7 * r, 7 * r)
    hetero, var = VARIANTS[variant]
    assert (prec is not None) == hetero
    if hetero:
        assert prec.shape == mean.shape and torch.all(prec > 0)
    assert (net.kl().item() > 0) == (var is not None)
    # Non-cubic inputs work too (fully convolutional).
    assert net(torch.randn(1, 6, 9, 12, 10))[0].shape == (1, 6, 5 * r, 8 * r, 6 * r)


@pytest.mark.parametrize("r", [2, 3])
def test_unshuffle_shuffle_identity_and_channel_convention(r):
    x = torch.randn(2, 6 * r**3, 3, 4, 5)
    assert torch.equal(periodic_unshuffle(periodic_shuffle(x, r), r), x)
    y = torch.randn(2, 6, 3 * r, 4 * r, 5 * r)
    assert torch.equal(periodic_shuffle(periodic_unshuffle(y, r), r), y)
    # Channel c·r³ + i + r·j + r²·k of LR position (X, Y, Z) is HR voxel (rX+i, rY+j, rZ+k).
    hr = periodic_shuffle(x, r)
    for c, i, j, k, X, Y, Z in [(0, 1, 0, 0, 0, 0, 0), (5, 0, 1, r - 1, 2, 3, 4), (3, r - 1, r - 1, 0, 1, 2, 0)]:
        assert hr[1, c, r * X + i, r * Y + j, r * Z + k] == x[1, c * r**3 + i + r * j + r**2 * k, X, Y, Z]


def test_kl_approximation_equals_its_formula():
    alpha = torch.tensor([0.01, 0.11, 0.5, 0.9])
    expected = -(0.5 * torch.log(alpha) + 1.16145 * alpha - 1.50204 * alpha**2 + 0.58630 * alpha**3)
    assert (KL_C1, KL_C2, KL_C3) == (1.16145, -1.50204, 0.58630)
    torch.testing.assert_close(kl_log_uniform(alpha), expected)
    # Var.(I): one α per weight; Var.(II): one α per filter, counted for each of its weights.
    c1 = VarConv3d(4, 5, 3, per="weight")
    c2 = VarConv3d(4, 5, 3, per="filter")
    assert c1.rho.shape == c1.weight.shape and c2.rho.shape == (5, 1, 1, 1, 1)
    a0 = torch.sigmoid(torch.tensor(-2.079))
    assert a0.item() == pytest.approx(0.111, abs=1e-3)
    torch.testing.assert_close(c1.kl(), kl_log_uniform(a0) * c1.weight.numel())
    torch.testing.assert_close(c2.kl(), kl_log_uniform(a0) * c2.weight.numel())


def test_local_reparameterisation_moments():
    torch.manual_seed(1)
    conv = VarConv3d(3, 2, 3, per="weight")
    with torch.no_grad():
        conv.rho.uniform_(-3, 0)
    x = torch.randn(1, 3, 5, 5, 5)
    with torch.no_grad():
        samples = torch.stack([conv(x) for _ in range(4000)])
        mean = F.conv3d(x, conv.weight, conv.bias)
        var = F.conv3d(x**2, conv.alpha * conv.weight**2)
    torch.testing.assert_close(samples.mean(0), mean, atol=4 * var.sqrt().max().item() / 60, rtol=0)
    torch.testing.assert_close(samples.var(0), var, rtol=0.15, atol=1e-6)
    assert torch.equal(conv(x, sample=False), mean)


def test_gradients_reach_every_parameter():
    torch.manual_seed(2)
    net = IQTNet("hetero-var1", 2)
    x, y = torch.randn(2, 6, 11, 11, 11), torch.randn(2, 6, 14, 14, 14)
    mean, prec = net(x)
    (gaussian_nll(mean, prec, y) + 1e-6 * net.kl()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.any(p.grad != 0), name


def test_gaussian_nll_formula():
    mean, prec, y = torch.zeros(10), torch.full((10,), 4.0), torch.full((10,), 0.5)
    assert gaussian_nll(mean, prec, y).item() == pytest.approx(4 * 0.25 - np.log(4))


@pytest.mark.parametrize("variant,r,inputs", [("hetero-var2", 2, ["tensor"]), ("espcn", 3, ["tensor", "s0"])])
def test_model_file_round_trip(tmp_path, variant, r, inputs):
    torch.manual_seed(3)
    net = IQTNet(variant, r, inputs=inputs)
    save_model(net, tmp_path / "m" / "model.safetensors", {"target": "hr", "normalisation": {"method": "per-subject"}})
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    # Readable like any other output (safetensors alone would leave the weights 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert card["variant"] == variant and card["upsample"] == r and card["widths"] == [50, 100]
    assert card["inputs"] == inputs
    assert len(card["weights"]["sha256"]) == 64 and card["iqt_pipe_version"] and card["created"]
    loaded, card2 = load_model(tmp_path / "m")
    assert not loaded.training and card2 == card and loaded.inputs == tuple(inputs)
    x = torch.randn(1, 5 + len(inputs), 11, 11, 11)
    torch.testing.assert_close(loaded(x, sample=False)[0], net(x, sample=False)[0])


@pytest.fixture
def saved(tmp_path):
    save_model(IQTNet("hetero-var2", 2), tmp_path / "model.safetensors")
    return tmp_path


def _edit_card(folder, **changes):
    card = json.loads((folder / "model.json").read_text())
    card.update(changes)
    (folder / "model.json").write_text(json.dumps(card))


BAD_FILES = {
    "truncated weights": (
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
        "checksum differs",
    ),
    "corrupt byte": (
        lambda d: (d / "model.safetensors").write_bytes(b"\x00" + (d / "model.safetensors").read_bytes()[1:]),
        "checksum differs",
    ),
    "pickle": (lambda d: (d / "model.safetensors").write_bytes(pickle.dumps({"a": 1})), "pickle/torch.save file"),
    "torch.save zip": (lambda d: torch.save({"a": torch.zeros(2)}, d / "model.safetensors"), "pickle/torch.save file"),
    "unknown variant": (lambda d: _edit_card(d, variant="espcn-var9"), "unknown variant 'espcn-var9'"),
    "bad r": (lambda d: _edit_card(d, upsample=1), "upsampling factor 1 is not an integer ≥ 2"),
    "mismatched card": (lambda d: _edit_card(d, variant="espcn"), "tensors do not match a espcn r=2 network"),
    "card not json": (lambda d: (d / "model.json").write_text("{oops"), "not valid JSON"),
    "foreign json": (lambda d: (d / "model.json").write_text('{"format": "other"}'), "not an iqt-pipe model card"),
    "missing card": (lambda d: (d / "model.json").unlink(), "model card not found"),
    "missing weights": (lambda d: (d / "model.safetensors").unlink(), "weights file not found"),
    "future format": (lambda d: _edit_card(d, format_version=99), "format version 99 is not supported"),
    "unknown inputs": (lambda d: _edit_card(d, inputs=["tensor", "t1w"]), "unknown network inputs"),
    "inputs of another model": (lambda d: _edit_card(d, inputs=["tensor", "s0"]), "tensors do not match"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_model_files_are_refused_in_one_line(saved, case):
    damage, message = BAD_FILES[case]
    damage(saved)
    with pytest.raises(ModelFileError, match=message) as err:
        load_model(saved)
    assert "\n" not in str(err.value)


def test_wrong_r_is_refused(saved):
    with pytest.raises(ModelFileError, match="upsamples by 2, not 3"):
        load_model(saved / "model.json", expect_r=3)


def test_unknown_variant_and_bad_r_in_constructor():
    with pytest.raises(ValueError, match="unknown variant"):
        IQTNet("unet")
    with pytest.raises(ValueError, match="integer ≥ 2"):
        IQTNet("espcn", 1)
    with pytest.raises(ValueError, match="give tensor, or tensor s0"):
        IQTNet("espcn", 2, inputs=("s0", "tensor"))
