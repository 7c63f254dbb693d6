"""Tensor order, frames, eigen-analysis and scalar maps, checked against dipy."""

import numpy as np
import pytest
from dipy.reconst import dti as dipy_dti

from iqt_pipe.dmri import dti


def random_tensors(n, seed=0, psd=True):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    evals = rng.uniform(0.1e-3, 3e-3, size=(n, 3))
    if not psd:
        evals[::3, 2] = -rng.uniform(0.01e-3, 0.5e-3, size=evals[::3].shape[0])
    return dti.tensors_from_eig(evals, q), evals, q


def test_order_converters_against_matrix_layout():
    d = np.array([11.0, 12, 13, 22, 23, 33])
    m = dti.to_matrix(d)
    assert m.tolist() == [[11, 12, 13], [12, 22, 23], [13, 23, 33]]
    np.testing.assert_array_equal(dti.from_matrix(m), d)
    # dipy: lower triangle row by row; MRtrix: diagonal then xy, xz, yz.
    assert dti.to_dipy_order(d).tolist() == [11, 12, 22, 13, 23, 33]
    assert dti.to_mrtrix_order(d).tolist() == [11, 22, 33, 12, 13, 23]
    np.testing.assert_array_equal(dti.from_dipy_order(dti.to_dipy_order(d)), d)
    np.testing.assert_array_equal(dti.from_mrtrix_order(dti.to_mrtrix_order(d)), d)
    # dipy's own converter agrees with ours.
    np.testing.assert_array_equal(dipy_dti.from_lower_triangular(dti.to_dipy_order(d)), m)


def test_wrong_component_count_is_refused():
    with pytest.raises(ValueError, match="6 tensor components"):
        dti.to_matrix(np.zeros((4, 5)))


def test_eig_descending_and_reconstructs():
    d, evals, _ = random_tensors(500)
    w, v = dti.eig(d)
    assert np.all(np.diff(w, axis=-1) <= 0)
    np.testing.assert_allclose(w, np.sort(evals, axis=-1)[:, ::-1], rtol=1e-10)
    np.testing.assert_allclose(dti.tensors_from_eig(w, v), d, atol=1e-15)


def test_scalars_match_dipy():
    d, _, _ = random_tensors(2000, seed=1)
    w, v = dti.eig(d)
    dw, dv = dipy_dti.decompose_tensor(dti.to_matrix(d))
    np.testing.assert_allclose(dti.fractional_anisotropy(w), dipy_dti.fractional_anisotropy(dw), atol=1e-5)
    np.testing.assert_allclose(dti.mean_diffusivity(w), dipy_dti.mean_diffusivity(dw), atol=1e-9)
    np.testing.assert_allclose(dti.axial_diffusivity(w), dipy_dti.axial_diffusivity(dw), atol=1e-9)
    np.testing.assert_allclose(dti.radial_diffusivity(w), dipy_dti.radial_diffusivity(dw), atol=1e-9)
    np.testing.assert_allclose(
        dti.colour_fa(w, v), dipy_dti.color_fa(dipy_dti.fractional_anisotropy(dw), dv), atol=1e-5
    )
    maps = dti.scalar_maps(d.astype(np.float32))
    np.testing.assert_allclose(maps["fa"], dipy_dti.fractional_anisotropy(dw), atol=1e-5)
    np.testing.assert_allclose(maps["md"], dipy_dti.mean_diffusivity(dw), atol=1e-9)


def test_known_scalars():
    # Prolate tensor: λ = (1.7, 0.3, 0.3)e-3 → MD 0.7667e-3, FA = sqrt(1.5·1.3067)/sqrt(3.07) = 0.79902.
    evals = np.array([1.7e-3, 0.3e-3, 0.3e-3])
    assert dti.mean_diffusivity(evals) == pytest.approx(0.76667e-3, rel=1e-4)
    assert dti.fractional_anisotropy(evals) == pytest.approx(0.79902, abs=1e-5)
    assert dti.fractional_anisotropy(np.zeros(3)) == 0
    assert dti.fractional_anisotropy(np.full(3, 1e-3)) == pytest.approx(0)


def test_project_psd():
    d, _, _ = random_tensors(300, seed=2, psd=False)
    p, changed = dti.project_psd(d)
    w, _ = dti.eig(p)
    assert np.all(w >= -1e-18)
    assert changed.sum() == 100
    np.testing.assert_array_equal(p[~changed], d[~changed])
    # Nearest in Frobenius norm: clamping the negative eigenvalue of a diagonal tensor.
    p1, _ = dti.project_psd(np.array([1e-3, 0, 0, -2e-4, 0, 5e-4]))
    np.testing.assert_allclose(p1, [1e-3, 0, 0, 0, 0, 5e-4], atol=1e-18)
    p2, c2 = dti.project_psd(np.array([1e-3, 0, 0, 1e-4, 0, 5e-4]), min_eigenvalue=2e-4)
    assert c2 and dti.eig(p2)[0].min() == pytest.approx(2e-4)


def oblique_affine(det_sign=1):
    from scipy.spatial.transform import Rotation

    rot = Rotation.from_euler("xyz", [12, -20, 33], degrees=True).as_matrix()
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag([2.0, 2.5, 3.0 * det_sign])
    a[:3, 3] = [-90, -110, -60]
    return a


@pytest.mark.parametrize("det_sign", [1, -1])
def test_frame_round_trip_and_invariants(det_sign):
    affine = oblique_affine(det_sign)
    r = dti.voxel_to_world_rotation(affine)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.sign(np.linalg.det(r)) == det_sign
    d, evals, _ = random_tensors(100, seed=3)
    world = dti.tensors_voxel_to_world(d, affine)
    np.testing.assert_allclose(dti.tensors_world_to_voxel(world, affine), d, atol=1e-15)
    np.testing.assert_allclose(dti.eig(world)[0], dti.eig(d)[0], rtol=1e-10)
    # A voxel-axis-aligned fibre points along the affine's first column in world space.
    fibre = dti.tensors_from_eig(np.array([1.7e-3, 0.2e-3, 0.2e-3]), np.eye(3))
    e1 = dti.eig(dti.tensors_voxel_to_world(fibre, affine))[1][:, 0]
    col = affine[:3, 0] / np.linalg.norm(affine[:3, 0])
    assert abs(e1 @ col) == pytest.approx(1, abs=1e-12)


def test_fsl_flip_follows_determinant():
    assert dti.fsl_flip(np.diag([2, 2, 2, 1]))[0, 0] == -1  # RAS+: FSL negates x
    np.testing.assert_array_equal(dti.fsl_flip(np.diag([-2, 2, 2, 1])), np.eye(3))
