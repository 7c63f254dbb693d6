"""Whole-volume Monte-Carlo prediction: equal to the patch-by-patch reference, correct
variance bookkeeping, deterministic, every in-mask HR voxel predicted."""

import numpy as np
import pytest
import torch

from iqt_pipe import dti
from iqt_pipe.inference import (
    Prediction,
    _fa_md,
    combine_ensemble,
    expand_mask,
    predict_patchwise,
    predict_volume,
    resolve_device,
)
from iqt_pipe.io import InputError
from iqt_pipe.models import IQTNet
from iqt_pipe.normalise import channel_stats

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
@pytest.mark.parametrize("tile", [8, 12])
def test_tiled_prediction_equals_patch_by_patch(field, r, tile):
    lr, mask = field
    model = net("hetero", r)
    tiled = predict_volume(model, lr, mask, np.eye(4), tile=tile)
    reference = predict_patchwise(model, lr, mask)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(tiled.mean, reference, atol=1e-5 * scale, rtol=0)
    # And a single call on the whole padded volume, no tiling at all.
    stats = channel_stats(lr, mask)
    z = np.zeros((SHAPE[0] + 4, SHAPE[1] + 4, SHAPE[2] + 4, 6), np.float32) + stats.standardise(np.zeros(6))
    z[2:-2, 2:-2, 2:-2] = stats.standardise(lr)
    with torch.no_grad():
        whole = model(torch.from_numpy(z).permute(3, 0, 1, 2)[None], sample=False)[0][0].permute(1, 2, 3, 0).numpy()
    whole = stats.destandardise(whole)
    hr_mask = expand_mask(mask, r)
    np.testing.assert_allclose(tiled.mean[hr_mask], whole[hr_mask], atol=1e-5 * scale, rtol=0)


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


def _pred(mean, var, mask):
    z = np.zeros(mask.shape, np.float32)
    return Prediction(mean=mean, var_intrinsic=var, var_parameter=None, fa_mean=z, fa_sd=z, md_mean=z, md_sd=z, mask=mask, affine=np.eye(4))


def test_ensemble_weights_by_inverse_variance():
    mask = np.ones((2, 2, 2), bool)
    m1 = np.full((2, 2, 2, 6), 1e-3, np.float32)
    m2 = np.full((2, 2, 2, 6), 2e-3, np.float32)
    v1 = np.full((2, 2, 2, 6), 1e-8, np.float32)
    v2 = np.full((2, 2, 2, 6), 3e-8, np.float32)
    e = combine_ensemble([_pred(m1, v1, mask), _pred(m2, v2, mask)])
    # weights 3:1 → 1.25e-3; combined variance 1 / (1/v1 + 1/v2) = 0.75e-8
    np.testing.assert_allclose(e.mean, 1.25e-3, rtol=1e-6)
    np.testing.assert_allclose(e.var_total, 0.75e-8, rtol=1e-5)
    assert np.all(e.md_sd > 0)
    same = combine_ensemble([_pred(m1, v1, mask), _pred(m1, v1, mask)])
    np.testing.assert_allclose(same.mean, m1)


def test_cuda_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(InputError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
