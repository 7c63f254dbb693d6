"""Property-based tests (hypothesis) of the core functions over random gradient tables,
grids and volumes: gradient files round-trip, a noise-free DTI series is fitted exactly in
world coordinates whatever the grid's orientation, tensor algebra keeps its invariants,
LR synthesis conserves signal, and the numerical guards leave no NaN behind."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.spatial.transform import Rotation

from iqt_pipe.dmri.degrade import block_average, crop_to_multiple
from iqt_pipe.dmri.dti import (
    eig,
    fractional_anisotropy,
    mean_diffusivity,
    not_positive_definite,
    project_psd,
    tensors_from_eig,
    tensors_voxel_to_world,
    tensors_world_to_voxel,
    to_matrix,
)
from iqt_pipe.dmri.fit import fit_dti
from iqt_pipe.dmri.gradients import GradientTable, read_gradients, select_dti_volumes, write_gradients
from iqt_pipe.sr.inference import VAR_CAP, VAR_FLOOR, guard_outputs

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

seeds = st.integers(0, 2**32 - 1)


def _directions(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@st.composite
def gradient_tables(draw):
    """b=0 volumes plus one to three shells of random directions, shuffled."""
    rng = np.random.default_rng(draw(seeds))
    n_b0 = draw(st.integers(1, 4))
    shells = draw(
        st.lists(st.sampled_from([700.0, 1000.0, 1300.0, 2000.0, 3000.0]), min_size=1, max_size=3, unique=True)
    )
    counts = [draw(st.integers(7, 20)) for _ in shells]
    bvals = np.concatenate([np.zeros(n_b0), *[np.full(c, b) + rng.uniform(-20, 20, c) for b, c in zip(shells, counts)]])
    bvecs = np.concatenate([np.zeros((n_b0, 3)), _directions(rng, sum(counts))])
    order = rng.permutation(len(bvals))
    return GradientTable(np.round(bvals[order]), bvecs[order])


@st.composite
def affines(draw):
    """Any rotation (reflections too), voxel sizes 1–3 mm with ratio ≤ 2, any origin."""
    rng = np.random.default_rng(draw(seeds))
    rotation = Rotation.random(random_state=rng).as_matrix()
    if draw(st.booleans()):
        rotation[:, 0] *= -1  # a negative-determinant (radiological) grid
    zooms = rng.uniform(1.0, 2.0, 3) * np.array([1.0, 1.0, draw(st.floats(1.0, 1.5))])
    affine = np.eye(4)
    affine[:3, :3] = rotation * zooms
    affine[:3, 3] = rng.uniform(-100, 100, 3)
    return affine


@st.composite
def pd_tensors(draw, n: int = 27):
    """Positive-definite tensors with brain-like eigenvalues (0.1–3e-3 mm²/s)."""
    rng = np.random.default_rng(draw(seeds))
    evals = rng.uniform(0.1e-3, 3e-3, (n, 3))
    evecs = Rotation.random(n, random_state=rng).as_matrix()
    return tensors_from_eig(evals, evecs)


@SETTINGS
@given(gtab=gradient_tables())
def test_gradient_files_round_trip(gtab, tmp_path_factory):
    folder = tmp_path_factory.mktemp("grad")
    write_gradients(gtab, folder / "x.bval", folder / "x.bvec")
    back = read_gradients(folder / "x.bval", folder / "x.bvec", n_volumes=len(gtab.bvals))
    np.testing.assert_allclose(back.bvals, gtab.bvals)
    np.testing.assert_allclose(back.bvecs, gtab.bvecs, atol=2e-6)
    keep = select_dti_volumes(back)
    chosen = back.bvals[keep & ~back.b0_mask]
    below = [b for b in gtab.shells() if b < 1500]
    assert abs(np.median(chosen) - (max(below) if below else min(gtab.shells()))) < 100
    assert np.all(keep[back.b0_mask])


@SETTINGS
@given(gtab=gradient_tables(), affine=affines(), world=pd_tensors(), s0=st.floats(100, 5000))
def test_noise_free_series_is_fitted_exactly_in_world_coordinates(gtab, affine, world, s0):
    """S = S0 exp(−b gᵀ D g) with world-frame directions (what the scanner applied) and a
    world-frame tensor: the fit, expressed in world coordinates, gives D back on any grid."""
    g_world = gtab.bvecs_world(affine)
    keep = select_dti_volumes(gtab)
    signal = s0 * np.exp(-gtab.bvals[None] * np.einsum("vi,kij,vj->kv", g_world, to_matrix(world), g_world))
    dwi = signal.reshape(3, 3, 3, -1).astype(np.float64)
    fit = fit_dti(dwi, affine, gtab)
    assert fit.mask.all() and np.array_equal(fit.volumes, keep)
    got = tensors_voxel_to_world(fit.tensors.reshape(-1, 6).astype(np.float64), affine)
    np.testing.assert_allclose(got, world, atol=2e-6)
    assert fit.guards == {"NonFiniteTensors": 0, "NonPositiveDefinite": 0}


@SETTINGS
@given(gtab=gradient_tables(), s0=st.floats(100, 5000), seed=seeds)
def test_fluid_whose_signal_is_lost_in_some_volumes_is_fitted(gtab, s0, seed):
    """Cerebrospinal fluid keeps a few % of its b = 0 signal at b = 1000, which a scanner may
    store as 0 in some volumes: such a voxel is fitted, each lost value taken as the voxel's
    smallest positive one. Isotropic diffusion reads the same in every direction of a shell
    (one b-value here), so the fit is exact. A voxel positive in half of its volumes or fewer
    (background) is not fitted."""
    rng = np.random.default_rng(seed)
    keep = select_dti_volumes(gtab)
    shell = keep & ~gtab.b0_mask
    gtab = GradientTable(np.where(shell, np.median(gtab.bvals[shell]), gtab.bvals), gtab.bvecs)
    n = int(keep.sum())
    fluid = s0 * np.exp(-gtab.bvals * 3e-3)
    fluid[rng.choice(np.flatnonzero(shell), size=int(rng.integers(1, min(n - 7, (n - 1) // 2) + 1)), replace=False)] = 0
    background = np.zeros_like(fluid)
    background[np.flatnonzero(keep)[: n // 2]] = 1.0
    fit = fit_dti(np.stack([fluid, background]).reshape(2, 1, 1, -1), np.eye(4), gtab)
    assert fit.mask.reshape(-1).tolist() == [True, False]
    np.testing.assert_allclose(fit.tensors[0, 0, 0], [3e-3, 0, 0, 3e-3, 0, 3e-3], atol=1e-8)
    assert np.all(fit.tensors[1] == 0)


@SETTINGS
@given(world=pd_tensors(), affine=affines())
def test_frames_round_trip_and_invariants(world, affine):
    voxel = tensors_world_to_voxel(world, affine)
    np.testing.assert_allclose(tensors_voxel_to_world(voxel, affine), world, atol=1e-12)
    for d in (world, voxel):  # rotation keeps eigenvalues, so FA and MD
        evals, evecs = eig(d)
        np.testing.assert_allclose(mean_diffusivity(evals), (d[:, 0] + d[:, 3] + d[:, 5]) / 3, rtol=1e-9)
        np.testing.assert_allclose(tensors_from_eig(evals, evecs), d, atol=1e-12)
    fa_w, fa_v = (fractional_anisotropy(eig(d)[0]) for d in (world, voxel))
    np.testing.assert_allclose(fa_w, fa_v, atol=1e-9)
    assert np.all((fa_w >= 0) & (fa_w <= 1))


@SETTINGS
@given(d=arrays(np.float64, (20, 6), elements=st.floats(-3e-3, 3e-3)), floor=st.floats(0, 1e-4))
def test_psd_projection(d, floor):
    evals = np.linalg.eigvalsh(to_matrix(d))
    clear = np.abs(evals[:, 0]) > 1e-9  # Sylvester's test agrees with the eigenvalues away from 0
    np.testing.assert_array_equal(not_positive_definite(d)[clear], (evals[:, 0] <= 0)[clear])
    out, changed = project_psd(d, floor)
    evals = np.linalg.eigvalsh(to_matrix(out))
    assert np.all(evals >= floor - 1e-12)
    np.testing.assert_array_equal(out[~changed], d[~changed])
    again, changed_again = project_psd(out, floor)  # idempotent
    np.testing.assert_allclose(again, out, atol=1e-12)
    fa = fractional_anisotropy(eig(d)[0])
    assert np.all(np.isfinite(fa) & (fa >= 0) & (fa <= 1))


@SETTINGS
@given(shape=st.tuples(*[st.integers(2, 9)] * 3), r=st.integers(2, 3), seed=seeds)
def test_block_average_conserves_the_mean_signal(shape, r, seed):
    assume(all(s >= r for s in shape))
    data = np.random.default_rng(seed).uniform(0, 1000, shape + (4,))
    cropped = crop_to_multiple(data, r)
    lr = block_average(data, r)
    assert lr.shape[:3] == tuple(s // r for s in shape)
    np.testing.assert_allclose(lr.mean(axis=(0, 1, 2)), cropped.mean(axis=(0, 1, 2)), rtol=1e-6)  # float32 out
    const = np.full(shape + (2,), 7.0)
    np.testing.assert_allclose(block_average(const, r), 7.0)


@SETTINGS
@given(seed=seeds, n_nan=st.integers(0, 10), n_inf=st.integers(0, 10), n_zero=st.integers(0, 10))
def test_numerical_guards_leave_only_finite_values_and_count_them(seed, n_nan, n_inf, n_zero):
    rng = np.random.default_rng(seed)
    shape = (6, 6, 6)
    arrays_ = {
        "mean": rng.uniform(0.2e-3, 1e-3, shape + (6,)).astype(np.float32),
        "var_int": rng.uniform(1e-9, 1e-8, shape + (6,)).astype(np.float32),
        "m2": rng.uniform(0, 1e-9, shape + (6,)).astype(np.float32),
        "fa": rng.uniform(0, 1, shape),
        "md": rng.uniform(0, 1e-3, shape),
    }
    flat = rng.permutation(np.prod(shape))
    nan_at, inf_at, zero_at = np.split(flat[: n_nan + n_inf + n_zero], [n_nan, n_nan + n_inf])
    arrays_["mean"].reshape(-1, 6)[nan_at, 0] = np.nan
    arrays_["var_int"].reshape(-1, 6)[inf_at, 2] = np.inf
    arrays_["var_int"].reshape(-1, 6)[zero_at, 4] = 0
    fa_sd, md_sd = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    fa_sd.reshape(-1)[inf_at] = np.nan  # a non-finite sd where the tensor itself is fine
    arrays_ |= {"fa_sd": fa_sd, "md_sd": md_sd}
    counts = guard_outputs(arrays_)
    for a in (*arrays_.values(), fa_sd, md_sd):
        assert np.all(np.isfinite(a))
    assert counts["NonFiniteTensors"] == n_nan
    assert counts["ZeroPrecision"] == n_inf  # the three sets of voxels are disjoint
    assert counts["InfinitePrecision"] == n_zero
    var = arrays_["var_int"].reshape(-1, 6)
    assert np.all(var[zero_at, 4] == np.float32(VAR_FLOOR)) and np.all(var[inf_at, 2] == np.float32(VAR_CAP))
    assert np.all(arrays_["mean"].reshape(-1, 6)[nan_at] == 0)
    # Failed voxels read as "nothing is known", never as certain; counts are per voxel.
    assert np.all(fa_sd.reshape(-1)[nan_at] == 0.5) and np.all(md_sd.reshape(-1)[nan_at] == np.float32(VAR_CAP**0.5))
    assert np.all(fa_sd.reshape(-1)[inf_at] == 0.5)
    assert counts["NonFiniteScalars"] == n_inf
