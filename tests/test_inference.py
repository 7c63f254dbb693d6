"""Whole-volume Monte-Carlo prediction: equal to the patch-by-patch reference, correct
variance bookkeeping, deterministic, every in-mask HR voxel predicted."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from iqt_pipe.dmri import dti
from iqt_pipe.io import InputError
from iqt_pipe.models import IQTNet
from iqt_pipe.sr import inference
from iqt_pipe.sr.inference import (
    Prediction,
    _antithetic_fa,
    _fa_md,
    combine_ensemble,
    expand_mask,
    predict_brain,
    predict_patchwise,
    predict_volume,
    resolve_device,
    symmetric_network,
)
from iqt_pipe.sr.normalise import channel_stats
from iqt_pipe.sr.options import SYMMETRIES
from iqt_pipe.sr.patches import transform_field, transform_volume

SHAPE = (19, 17, 13)


@pytest.fixture(scope="module")
def field():
    """A smooth LR tensor field with a brain-like mask not touching every tile."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=SHAPE + (3, 3)))
    evals = np.stack([np.full(SHAPE, 1.5e-3), np.full(SHAPE, 0.5e-3), np.full(SHAPE, 0.4e-3)], -1)
    lr = dti.tensors_from_eig(evals, q).astype(np.float32)
    mask = np.zeros(SHAPE, bool)
    mask[2:12, 3:15, 2:11] = True
    return lr, mask


def net(variant, r=2, seed=0):
    torch.manual_seed(seed)
    return IQTNet(variant, r)


@pytest.mark.parametrize("r", [2, 3])
@pytest.mark.parametrize("tile, target", [(8, "hr"), (12, "hr"), (8, "residual-cubic")])
def test_tiled_prediction_equals_patch_by_patch(field, r, tile, target):
    lr, mask = field
    model = net("hetero", r)
    tiled = predict_volume(model, lr, mask, np.eye(4), tile=tile, target=target)
    reference = predict_patchwise(model, lr, mask, target=target)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(tiled.mean, reference, atol=1e-5 * scale, rtol=0)
    # And a single call on the whole padded volume, no tiling at all.
    stats = channel_stats(lr, mask)
    z = np.zeros((SHAPE[0] + 4, SHAPE[1] + 4, SHAPE[2] + 4, 6), np.float32) + stats.standardise(np.zeros(6))
    z[2:-2, 2:-2, 2:-2] = stats.standardise(lr)
    with torch.no_grad():
        whole = model(torch.from_numpy(z).permute(3, 0, 1, 2)[None], sample=False)[0][0].permute(1, 2, 3, 0).numpy()
    if target == "hr":
        whole = stats.destandardise(whole)
    else:
        from iqt_pipe.sr.baselines import interpolate_tensors

        whole = whole * stats.sd + interpolate_tensors(lr, r, "cubic")
    hr_mask = expand_mask(mask, r)
    np.testing.assert_allclose(tiled.mean[hr_mask], whole[hr_mask], atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("channels_last", [True, False])
def test_layer_by_layer_slabs_and_tiles_give_the_same_prediction(field, channels_last, monkeypatch):
    """The hidden layers' blocks, the tiles and the slabs are bookkeeping: the bundled model's
    7³ receptive field over one slab of 6³ tiles, over thin slabs of 4³ tiles (a memory
    budget of 1 MB) and patch by patch predict the same tensors, and Monte-Carlo statistics;
    also in the default layout that GPUs use (checked here on the CPU)."""
    lr, mask = field
    torch.manual_seed(0)
    model = IQTNet("hetero-var2", 2, kernels=(3, 3, 3))
    one = predict_volume(model, lr, mask, np.eye(4), mc_samples=3, seed=2, tile=6)
    monkeypatch.setattr(inference._Passes, "channels_last", property(lambda self: channels_last))
    thin = predict_volume(model, lr, mask, np.eye(4), mc_samples=3, seed=2, tile=4, mem_mb=1)
    assert one.info["slabs"] == 1 and thin.info["slabs"] >= 3
    assert thin.info["hidden_blocks"][0] >= thin.info["hidden_blocks"][1] > 0  # each where the next needs it
    scale = np.abs(one.mean).max()
    for key in ("mean", "var_intrinsic", "var_parameter"):
        np.testing.assert_allclose(getattr(thin, key), getattr(one, key), atol=1e-5 * np.abs(getattr(one, key)).max())
    deterministic = predict_volume(model, lr, mask, np.eye(4), mc_samples=1, tile=4, mem_mb=1)
    reference = predict_patchwise(model, lr, mask, patch=13)
    np.testing.assert_allclose(deterministic.mean, reference, atol=1e-5 * scale, rtol=0)


def test_every_in_mask_voxel_predicted_and_only_touching_tiles_run(field):
    lr, mask = field
    p = predict_volume(net("espcn"), lr, mask, np.diag([2.0, 2, 2, 1]), tile=8)
    assert p.mask.shape == tuple(2 * s for s in SHAPE) and p.mask.sum() == 8 * mask.sum()
    assert np.all(np.any(p.mean[p.mask] != 0, axis=-1))
    assert np.all(p.mean[~p.mask] == 0)
    assert p.info["tiles"] < p.info["tiles_total"]
    np.testing.assert_allclose(p.affine[:3, :3], np.eye(3))  # 2 mm LR → 1 mm HR
    np.testing.assert_allclose(p.affine[:3, 3], [-0.5, -0.5, -0.5])


def test_variance_decomposition_and_determinism(field):
    lr, mask = field
    model = net("hetero-var2")
    a = predict_volume(model, lr, mask, np.eye(4), mc_samples=6, seed=5, tile=8)
    b = predict_volume(model, lr, mask, np.eye(4), mc_samples=6, seed=5, tile=8)
    c = predict_volume(model, lr, mask, np.eye(4), mc_samples=6, seed=6, tile=8)
    for key in ("mean", "var_intrinsic", "var_parameter", "fa_mean", "fa_sd", "md_sd"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert not np.array_equal(a.mean, c.mean)
    m = a.mask
    assert np.all(a.var_intrinsic[m] > 0) and np.all(a.var_parameter[m] > 0)
    np.testing.assert_allclose(a.var_total, a.var_intrinsic + a.var_parameter, rtol=1e-6)
    assert np.all(a.fa_sd[m] > 0) and np.all(a.md_sd[m] > 0)
    assert a.info["mc_samples"] == 6 and a.info["scalar_samples"] >= 32


def test_parameter_variance_vanishes_as_alpha_goes_to_zero(field):
    lr, mask = field
    model = net("espcn-var1")
    means = []
    for rho in (-2.0, -8.0, -40.0):  # α = sigmoid(ρ): 0.12, 3e-4, 4e-18
        with torch.no_grad():
            for mod in model.modules():
                if hasattr(mod, "rho"):
                    mod.rho.fill_(rho)
        p = predict_volume(model, lr, mask, np.eye(4), mc_samples=8, tile=8)
        means.append(p.var_parameter[p.mask].mean())
        assert p.var_intrinsic is None
    assert means[0] > 100 * means[1] > 0
    assert means[2] < 1e-9 * means[0]
    deterministic = predict_volume(model, lr, mask, np.eye(4), mc_samples=1, tile=8)
    np.testing.assert_allclose(p.mean, deterministic.mean, atol=1e-9)


def test_scalar_samples_match_dti_functions():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(500, 3, 3)))
    d = dti.tensors_from_eig(rng.uniform(0.1e-3, 2e-3, (500, 3)), q)
    fa, md = _fa_md(torch.from_numpy(d))
    w, _ = dti.eig(d)
    np.testing.assert_allclose(fa.numpy(), dti.fractional_anisotropy(w), atol=1e-6)
    np.testing.assert_allclose(md.numpy(), dti.mean_diffusivity(w), atol=1e-12)
    # The antithetic samples' FA, without forming the samples: that of μ + ε, then of μ − ε.
    eps = torch.from_numpy(rng.normal(scale=2e-4, size=(3, 500, 6)))
    mu = torch.from_numpy(d)
    expected = torch.cat([_fa_md(mu + eps)[0], _fa_md(mu - eps)[0]])
    np.testing.assert_allclose(_antithetic_fa(mu, eps).numpy(), expected.numpy(), atol=1e-9)


def test_fa_of_a_negligible_tensor_is_zero(field):
    """FA is 0 for a tensor of no size, as DIPY's of a zero tensor: in the background of a
    super-resolved FA map it is 0, not the FA of the cubic upsampling's rounding noise."""
    d = torch.zeros(3, 6, dtype=torch.float64)
    d[1] = 1e-7 * torch.tensor([2.0, 1.0, -0.1, 0.5, -0.3, 3.5])
    d[2] = torch.tensor([1.5e-3, 0, 0, 0.4e-3, 0, 0.4e-3])
    fa, _ = _fa_md(d)
    assert fa[0] == 0 and fa[1] == 0 and 0.6 < fa[2] < 0.7
    assert torch.all(_antithetic_fa(d[:2], torch.full((4, 2, 6), 1e-8, dtype=torch.float64)) == 0)
    lr, mask = field
    p = predict_brain(net("hetero"), lr * mask[..., None], mask, np.eye(4))
    background = ~p.region & (np.abs(p.mean).max(-1) < 1e-7)
    assert background.sum() > 100 and np.abs(p.mean[background]).max() > 0  # rounding noise, not zeros
    assert np.all(p.fa_mean[background] == 0)


def _pred(mean, var, mask):
    z = np.zeros(mask.shape, np.float32)
    return Prediction(
        mean=mean,
        var_intrinsic=var,
        var_parameter=None,
        fa_mean=z,
        fa_sd=z,
        md_mean=z,
        md_sd=z,
        mask=mask,
        affine=np.eye(4),
    )


def test_ensemble_weights_by_inverse_variance():
    mask = np.ones((2, 2, 2), bool)
    m1 = np.full((2, 2, 2, 6), 1e-3, np.float32)
    m2 = np.full((2, 2, 2, 6), 2e-3, np.float32)
    v1 = np.full((2, 2, 2, 6), 1e-8, np.float32)
    v2 = np.full((2, 2, 2, 6), 3e-8, np.float32)
    e = combine_ensemble([_pred(m1, v1, mask), _pred(m2, v2, mask)], scalar_samples=4000)
    # Weights 3:1 → mean 1.25e-3; intrinsic (3·1 + 1·3)/4 e-8; disagreement (3·0.25² + 0.75²)/4 e-6.
    np.testing.assert_allclose(e.mean, 1.25e-3, rtol=1e-6)
    np.testing.assert_allclose(e.var_intrinsic, 1.5e-8, rtol=1e-5)
    np.testing.assert_allclose(e.var_parameter, 18.75e-8, rtol=1e-5)
    # MD of the mixture: 3/4 at 1e-3, 1/4 at 2e-3 → mean 1.25e-3, sd ≈ 0.433e-3.
    np.testing.assert_allclose(e.md_mean, 1.25e-3, rtol=1e-6)  # of the mean tensor, as FA
    np.testing.assert_allclose(e.fa_mean, _fa_md(torch.from_numpy(e.mean))[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(e.md_sd, 0.433e-3, rtol=0.06)
    same = combine_ensemble([_pred(m1, v1, mask), _pred(m1, v1, mask)])
    np.testing.assert_allclose(same.mean, m1)
    np.testing.assert_allclose(same.var_parameter, 0, atol=1e-20)
    # Members whose diagonal components correlate by 0.5: MD var (3v + 2·0.5·3v)/9 = 2v/3.
    corr = [_pred(m1, v1, mask), _pred(m1, v1, mask)]
    for p in corr:
        p.info["diagonal_correlation"] = 0.5
    np.testing.assert_allclose(combine_ensemble(corr, scalar_samples=4000).md_sd, np.sqrt(2e-8 / 3), rtol=0.06)
    # Weights are per voxel: a member that is sure at one voxel dominates there only.
    v3 = v2.copy()
    v3[0, 0, 0] = 1e-12
    mixed = combine_ensemble([_pred(m1, v1, mask), _pred(m2, v3, mask)])
    assert mixed.mean[0, 0, 0, 0] == pytest.approx(2e-3, rel=1e-3)
    assert mixed.mean[1, 1, 1, 0] == pytest.approx(1.25e-3, rel=1e-6)


def test_cuda_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(InputError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_mc_statistics_equal_explicit_weight_samples_and_ignore_tiling(field):
    """Every MC sample is one posterior weight draw run over the whole volume: the tiled
    statistics equal T explicit whole-volume passes, and do not depend on the tile size."""
    lr, mask = field
    model = net("hetero-var2", seed=7)
    T, seed = 5, 3
    tiled = predict_volume(model, lr, mask, np.eye(4), mc_samples=T, seed=seed, tile=8)
    other = predict_volume(model, lr, mask, np.eye(4), mc_samples=T, seed=seed, tile=12)
    stats = channel_stats(lr, mask)
    z = np.zeros((SHAPE[0] + 4, SHAPE[1] + 4, SHAPE[2] + 4, 6), np.float32) + stats.standardise(np.zeros(6))
    z[2:-2, 2:-2, 2:-2] = stats.standardise(lr)
    x = torch.from_numpy(z).permute(3, 0, 1, 2)[None]
    means, variances = [], []
    for ss in np.random.SeedSequence(seed).spawn(T + 1)[:T]:
        draw = model.sample_weights(torch.Generator().manual_seed(int(ss.generate_state(1)[0])))
        with torch.no_grad():
            mu, prec = draw(x, sample=False)
        means.append(mu[0].permute(1, 2, 3, 0).numpy() * stats.sd + stats.mean)
        variances.append(stats.sd**2 / prec[0].permute(1, 2, 3, 0).numpy())
    means, variances = np.array(means), np.array(variances)
    m = tiled.mask
    scale = np.abs(means).max()
    np.testing.assert_allclose(tiled.mean[m], means.mean(0)[m], atol=1e-5 * scale, rtol=0)
    np.testing.assert_allclose(tiled.var_parameter[m], means.var(0)[m], rtol=2e-3, atol=1e-6 * scale**2)
    np.testing.assert_allclose(tiled.var_intrinsic[m], variances.mean(0)[m], rtol=1e-4)
    for key in ("mean", "var_parameter", "var_intrinsic"):
        np.testing.assert_allclose(getattr(other, key)[m], getattr(tiled, key)[m], rtol=2e-3, atol=1e-6 * scale**2)
    # MD is linear: the mean MD of the predictive samples is the MD of the predictive mean,
    # up to the sampling error md_sd / sqrt(n).
    n = tiled.info["scalar_samples"]
    md_of_mean = dti.scalar_maps(tiled.mean[m])["md"]
    err = np.abs(tiled.md_mean[m] - md_of_mean)
    assert np.median(err) < 1.5 * np.median(tiled.md_sd[m]) / np.sqrt(n)
    assert np.all(tiled.fa_sd[m] > 0)


def test_model_target_comes_from_the_card(field, tmp_path):
    from iqt_pipe.models import load_model, save_model

    lr, mask = field
    model = net("espcn")
    save_model(model, tmp_path / "model.safetensors", {"target": "residual-cubic"})
    loaded, _ = load_model(tmp_path)
    assert loaded.target == "residual-cubic"
    a = predict_volume(loaded, lr, mask, np.eye(4), tile=8)
    b = predict_volume(model, lr, mask, np.eye(4), tile=8, target="residual-cubic")
    np.testing.assert_array_equal(a.mean, b.mean)
    assert a.info["target"] == "residual-cubic"
    with pytest.raises(ValueError, match="disagrees"):
        predict_volume(loaded, lr, mask, np.eye(4), target="hr")


def _with_calibration(field, tmp_path, calibration: dict):
    """A hetero-var2 network, the same saved with ``calibration`` in its card and loaded, and
    both one's and the other's prediction of ``field`` (3 MC samples, seed 1)."""
    from iqt_pipe.models import load_model, save_model

    lr, mask = field
    model = net("hetero-var2")
    save_model(model, tmp_path / "a" / "model.safetensors", {"calibration": calibration})
    loaded, _ = load_model(tmp_path / "a")
    a, b = (predict_volume(m, lr, mask, np.eye(4), mc_samples=3, seed=1, tile=8) for m in (model, loaded))
    return model, loaded, a, b


def test_card_calibration_scales_every_predictive_variance(field, tmp_path):
    from iqt_pipe.models import ModelFileError, load_model, save_model

    model, loaded, a, b = _with_calibration(field, tmp_path, {"variance_scale": 4.0})
    assert loaded.variance_scale == 4.0
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_allclose(b.var_intrinsic, 4 * a.var_intrinsic, rtol=1e-6)
    np.testing.assert_allclose(b.var_parameter, 4 * a.var_parameter, rtol=1e-6)
    np.testing.assert_allclose(b.md_sd, 2 * a.md_sd, rtol=1e-6)
    assert b.info["variance_scale"] == 4.0
    save_model(model, tmp_path / "b" / "model.safetensors", {"calibration": {"variance_scale": -1}})
    with pytest.raises(ModelFileError, match="variance_scale must be a positive number"):
        load_model(tmp_path / "b")


def test_card_diagonal_correlation_widens_only_the_md_interval(field, tmp_path):
    from iqt_pipe.models import ModelFileError, load_model, save_model

    model, loaded, a, b = _with_calibration(field, tmp_path, {"diagonal_correlation": 0.5})
    assert loaded.diagonal_correlation == 0.5
    for key in ("mean", "var_intrinsic", "var_parameter", "md_mean"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    m = a.mask
    assert np.all(b.md_sd[m] > a.md_sd[m])
    assert b.info["diagonal_correlation"] == 0.5 and a.info["diagonal_correlation"] == 0.0
    for bad in (1.0, -0.1, "0.5", float("nan")):
        save_model(model, tmp_path / "b" / "model.safetensors", {"calibration": {"diagonal_correlation": bad}})
        with pytest.raises(ModelFileError, match="diagonal_correlation must be a number in"):
            load_model(tmp_path / "b")


def _inverse_code(code):
    x = np.random.default_rng(1).standard_normal((5, 5, 5, 6))
    return next(d for d in range(48) if np.allclose(transform_field(transform_field(x, code), d), x))


@pytest.mark.parametrize(
    "variant, kernels, r, inputs",
    [
        ("hetero-var2", (3, 1, 3), 2, ("tensor",)),
        ("hetero-var1", (3, 3, 3), 3, ("tensor",)),
        ("espcn", (3, 1, 3), 2, ("tensor",)),
        ("hetero-var2", (3, 1, 3), 2, ("tensor", "s0")),
    ],
)
def test_symmetric_network_is_the_network_on_the_transformed_field(variant, kernels, r, inputs):
    """For each of the 48 cube symmetries g, the folded copy computes g⁻¹(f(g z)) exactly: voxels
    moved back, tensor components permuted and signed (the mean), permuted (the precision); an
    S0 input channel is only moved."""
    torch.manual_seed(0)
    model = IQTNet(variant, r, kernels=kernels, inputs=inputs).eval()
    for conv in model.modules():
        if isinstance(conv, torch.nn.Conv3d):
            torch.nn.init.normal_(conv.bias)  # non-zero biases: the output channel order shows
    z = np.random.default_rng(0).standard_normal((9, 10, 11, 6)).astype(np.float32)
    s0 = np.random.default_rng(1).standard_normal((9, 10, 11, 1)).astype(np.float32)

    def transform_input(field, code):
        moved = transform_field(field[..., :6], code)
        if field.shape[-1] == 6:
            return moved
        return np.concatenate([moved, transform_volume(field[..., 6:], code)], axis=-1)

    if "s0" in inputs:
        z = np.concatenate([z, s0], axis=-1)

    def run(net, field):
        with torch.no_grad():
            mean, prec = net(torch.from_numpy(np.ascontiguousarray(field)).permute(3, 0, 1, 2)[None], sample=False)
        return mean[0].permute(1, 2, 3, 0).numpy(), None if prec is None else prec[0].permute(1, 2, 3, 0).numpy()

    for code in range(48):
        back = _inverse_code(code)
        mean, prec = run(model, transform_input(z, code))
        got_mean, got_prec = run(symmetric_network(model, code), z)
        np.testing.assert_allclose(got_mean, transform_field(mean, back), atol=1e-5)
        if prec is not None:  # precisions: the same move without the mirror's signs
            np.testing.assert_allclose(got_prec, np.abs(transform_field(prec, back)), rtol=1e-5)
    # Code 0 is the identity: an exact copy, dropout rates included.
    same = symmetric_network(model, 0)
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), model.state_dict().values()))


def test_a_model_with_the_s0_input_sees_it(field):
    """A network with the S0 channel: the tiled prediction equals the patch loop and one call on
    the whole padded volume (S0 / brain median − 1, background −1 beyond the volume); the S0
    changes the prediction; without it the prediction is refused in one line."""
    lr, mask = field
    torch.manual_seed(0)
    model = IQTNet("hetero", 2, inputs=("tensor", "s0")).eval()
    s0 = (1000 + 200 * np.random.default_rng(3).standard_normal(SHAPE)).astype(np.float32)
    s0[0] = 0  # background: no signal
    tiled = predict_volume(model, lr, mask, np.eye(4), tile=8, s0=s0)
    reference = predict_patchwise(model, lr, mask, s0=s0)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(tiled.mean, reference, atol=1e-5 * scale, rtol=0)
    stats = channel_stats(lr, mask)
    z = np.zeros((SHAPE[0] + 4, SHAPE[1] + 4, SHAPE[2] + 4, 7), np.float32)
    z[..., :6], z[..., 6] = stats.standardise(np.zeros(6)), -1
    z[2:-2, 2:-2, 2:-2, :6] = stats.standardise(lr)
    z[2:-2, 2:-2, 2:-2, 6] = np.clip(s0 / np.median(s0[mask]) - 1, -1, 5)
    with torch.no_grad():
        whole = model(torch.from_numpy(z).permute(3, 0, 1, 2)[None], sample=False)[0][0].permute(1, 2, 3, 0).numpy()
    hr_mask = expand_mask(mask, 2)
    np.testing.assert_allclose(tiled.mean[hr_mask], stats.destandardise(whole)[hr_mask], atol=1e-5 * scale, rtol=0)
    flat = predict_volume(model, lr, mask, np.eye(4), tile=8, s0=np.full(SHAPE, 1000, np.float32))
    assert np.abs(flat.mean - tiled.mean)[hr_mask].max() > 1e-3 * scale
    with pytest.raises(InputError, match="S0"):
        predict_volume(model, lr, mask, np.eye(4), tile=8)
    with pytest.raises(InputError, match="not on the same grid"):
        predict_volume(model, lr, mask, np.eye(4), tile=8, s0=s0[1:])


def test_the_s0_channel():
    """S0 over its median in the brain, minus 1: 0 at the median, −1 without signal (zero, NaN,
    negative), at most 5 (S0 six times the median: a bad fit, not tissue)."""
    from iqt_pipe.sr.normalise import network_input, s0_channel

    s0 = np.array([[[100.0, 200.0, 300.0, 0.0, np.nan, -5.0, 1e6]]])
    brain = np.array([[[True, True, True, True, True, False, False]]])
    np.testing.assert_allclose(s0_channel(s0, brain)[0, 0], [-0.5, 0, 0.5, -1, -1, -1, 5])
    with pytest.raises(InputError, match="S0"):
        s0_channel(np.zeros((2, 2, 2)), np.ones((2, 2, 2), bool))
    lr = np.ones((1, 1, 7, 6)) * 1e-3
    stats = channel_stats(np.random.default_rng(0).normal(size=(1, 1, 7, 6)), np.ones((1, 1, 7), bool))
    z, background = network_input(lr, stats, s0, brain)
    assert z.shape == (1, 1, 7, 7) and background.shape == (7,) and background[6] == -1
    np.testing.assert_allclose(z[..., :6], stats.standardise(lr))
    z6, background6 = network_input(lr, stats)
    assert z6.shape == (1, 1, 7, 6) and background6.shape == (6,)


def test_mirror_ensemble_is_the_mean_of_the_mirrored_scans_predictions(field):
    """``symmetries=mirrors`` on a deterministic model: the mean of the 8 predictions for the
    mirrored LR fields (each standardised by its own statistics, predicted, mirrored back); their
    spread is the parameter variance, and the intrinsic variance is their mean."""
    lr, mask = field
    model = net("hetero")
    got = predict_volume(model, lr, mask, np.eye(4), target="hr", symmetries=SYMMETRIES["mirrors"], scalar_samples=0)
    assert got.info["passes"] == 8 and got.info["symmetries"] == 8 and got.info["mc_samples"] == 1
    means, variances = [], []
    for code in SYMMETRIES["mirrors"]:
        p = predict_volume(
            model,
            transform_field(lr, code).copy(),
            transform_volume(mask, code).copy(),
            np.eye(4),
            target="hr",
            scalar_samples=0,
        )
        means.append(transform_field(p.mean, code))  # mirrors are their own inverses
        variances.append(np.abs(transform_field(p.var_intrinsic, code)))
    scale = np.abs(got.mean).max()
    np.testing.assert_allclose(got.mean, np.mean(means, 0), atol=1e-5 * scale)
    np.testing.assert_allclose(got.var_parameter, np.var(means, 0), atol=1e-5 * scale**2)
    np.testing.assert_allclose(got.var_intrinsic, np.mean(variances, 0), rtol=1e-4)
    assert got.var_parameter[got.mask].mean() > 0
    # A variational model pairs its T weight draws with the symmetries: no more passes than T.
    var = predict_volume(net("hetero-var2"), lr, mask, np.eye(4), mc_samples=8, symmetries=SYMMETRIES["mirrors"])
    assert var.info["passes"] == 8 and var.info["mc_samples"] == 8


def test_fa_samples_do_not_depend_on_the_thread_count(field, monkeypatch):
    """The FA samples' chunks (here 16 voxels each) draw from their own streams: one thread or
    two give the same FA and FA sd, and another seed other ones."""
    monkeypatch.setattr(inference, "_FA_CHUNK", 2**8)
    lr, mask = field
    model = net("hetero-var2", seed=4)
    one, two, other = (
        predict_volume(model, lr, mask, np.eye(4), mc_samples=2, threads=n, seed=seed)
        for n, seed in ((1, 3), (2, 3), (2, 4))
    )
    for key in ("fa_mean", "fa_sd", "md_sd"):
        np.testing.assert_array_equal(getattr(one, key), getattr(two, key))
    assert not np.array_equal(one.fa_sd, other.fa_sd)


@pytest.mark.parametrize("rho, chunk", [(0.0, None), (0.6, None), (0.6, 2**8)])
def test_fa_and_md_moments_of_the_predictive_distribution(field, rho, chunk, monkeypatch):
    """A deterministic hetero pass: MD mean and sd are exact (MD is linear: MD of the mean, and
    the sd of (D11 + D22 + D33)/3 under the predicted variances, the diagonal components
    correlated by the model's ``diagonal_correlation``); the FA map is FA of the mean tensor,
    below the mean of the samples' FA (noise raises FA); FA's sd from the 32 antithetic
    samples per voxel agrees with 4000 independent draws of that Gaussian, also when the
    samples come in many chunks (16 voxels each), each from its own stream."""
    if chunk:
        monkeypatch.setattr(inference, "_FA_CHUNK", chunk)
    lr, mask = field
    model = net("hetero", seed=4)
    model.diagonal_correlation = rho
    p = predict_volume(model, lr, mask, np.eye(4), target="hr", scalar_samples=32)
    assert p.info["diagonal_correlation"] == rho
    m = p.mask
    mean, var = p.mean[m].astype(np.float64), p.var_intrinsic[m].astype(np.float64)
    np.testing.assert_allclose(p.md_mean[m], mean[:, [0, 3, 5]].sum(1) / 3, rtol=1e-5, atol=1e-12)
    sd = np.sqrt(var[:, [0, 3, 5]])
    cross = sd[:, 0] * sd[:, 1] + sd[:, 0] * sd[:, 2] + sd[:, 1] * sd[:, 2]
    np.testing.assert_allclose(p.md_sd[m], np.sqrt(var[:, [0, 3, 5]].sum(1) + 2 * rho * cross) / 3, rtol=1e-4)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(mean), 300, replace=False)
    corr = np.eye(6)  # the reference Gaussian, built from its correlation matrix
    corr[np.ix_([0, 3, 5], [0, 3, 5])] = rho + (1 - rho) * np.eye(3)
    noise = rng.standard_normal((4000, 300, 6)) @ np.linalg.cholesky(corr).T
    draws = mean[pick] + noise * np.sqrt(var[pick])
    fa, _ = _fa_md(torch.from_numpy(draws))
    fa_mean, fa_sd = fa.numpy().mean(0), fa.numpy().std(0)
    # float32 sums, FA² = 3/2 − (tr D)²/(2‖D‖²): ~1e-5 of cancellation where FA is small
    np.testing.assert_allclose(p.fa_mean[m], _fa_md(torch.from_numpy(mean))[0].numpy(), rtol=1e-4, atol=2e-5)
    assert np.median(fa_mean - p.fa_mean[m][pick]) > 0.5 * np.median(fa_sd) / np.sqrt(32)  # the noise's bias
    # Within the sampling error of 32 samples: ~1/√64 relative for the sd.
    assert np.median(np.abs(p.fa_sd[m][pick] / fa_sd - 1)) < 1.2 / np.sqrt(64)
    assert abs(np.median(p.fa_sd[m][pick] / fa_sd) - 1) < 0.05  # and no bias


def test_precision_auto_follows_the_hardware(monkeypatch):
    import iqt_pipe.sr.inference as inf

    monkeypatch.setattr(inf, "bfloat16_is_native", lambda: True)
    assert inf.resolve_precision("auto", torch.device("cpu")) == "bfloat16"
    assert inf.resolve_precision("auto", torch.device("cuda")) == "float32"
    monkeypatch.setattr(inf, "bfloat16_is_native", lambda: False)
    assert inf.resolve_precision("auto", torch.device("cpu")) == "float32"
    assert inf.resolve_precision("bfloat16", torch.device("cpu")) == "bfloat16"
    with pytest.raises(InputError, match="--precision half: choose auto, float32, bfloat16"):
        inf.resolve_precision("half", torch.device("cpu"))


def test_bfloat16_convolutions_change_little(field):
    """bfloat16 convolutions, float32 everything after: the mean within ~1 % of the residual the
    network adds to the cubic B-spline, the variances within ~1 %."""
    lr, mask = field
    model = net("hetero-var2", seed=5)
    kwargs = dict(target="residual-cubic", mc_samples=2, scalar_samples=0)
    f32 = predict_volume(model, lr, mask, np.eye(4), precision="float32", **kwargs)
    b16 = predict_volume(model, lr, mask, np.eye(4), precision="bfloat16", **kwargs)
    assert (f32.info["precision"], b16.info["precision"]) == ("float32", "bfloat16")
    from iqt_pipe.sr.baselines import interpolate_tensors

    m = f32.mask
    residual = f32.mean[m] - interpolate_tensors(lr, 2, "cubic")[m]
    diff = b16.mean[m] - f32.mean[m]
    assert np.sqrt((diff**2).mean()) < 0.02 * np.sqrt((residual**2).mean())
    assert np.median(np.abs(b16.var_intrinsic[m] / f32.var_intrinsic[m] - 1)) < 0.02


def test_the_app_settings_need_no_torch():
    """config.py takes the prediction choices from iqt_pipe.sr.options, as the library does, so
    that parsing a command line needs no torch: importing it must not import torch."""
    code = "import iqt_pipe.config, sys; assert 'torch' not in sys.modules, 'iqt_pipe.config imports torch'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
