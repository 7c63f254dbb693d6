"""LR synthesis: exact block means and LR voxel centres at the centres of their HR blocks."""

import nibabel as nb
import numpy as np
import pytest

from iqt_pipe.dmri.degrade import (
    block_average,
    crop_to_multiple,
    degrade_dwi,
    downsample_affine,
    upsample_affine,
    voxel_centres,
)


@pytest.mark.parametrize("r", [2, 3])
def test_block_means_exact(r):
    hr = np.arange(7 * 8 * 9 * 2, dtype=np.float32).reshape(7, 8, 9, 2)
    lr = block_average(hr, r)
    nx, ny, nz = 7 // r, 8 // r, 9 // r
    assert lr.shape == (nx, ny, nz, 2)
    for i, j, k in np.ndindex(nx, ny, nz):
        block = hr[i * r : (i + 1) * r, j * r : (j + 1) * r, k * r : (k + 1) * r]
        np.testing.assert_array_equal(lr[i, j, k], block.reshape(-1, 2).mean(axis=0))


def test_block_mean_of_constant_and_linear_volume():
    hr = np.full((6, 6, 6), 3.5, dtype=np.float32)
    np.testing.assert_array_equal(block_average(hr, 2), 3.5)
    x = np.arange(6, dtype=np.float32)[:, None, None] * np.ones((6, 6, 6), np.float32)
    # Mean of x over block i is x at the block centre 2i + 0.5.
    np.testing.assert_array_equal(block_average(x, 2)[:, 0, 0], [0.5, 2.5, 4.5])


@pytest.mark.parametrize("r", [2, 3])
def test_lr_voxel_centres_are_hr_block_centres(r):
    from scipy.spatial.transform import Rotation

    hr_affine = np.eye(4)
    hr_affine[:3, :3] = Rotation.from_euler("zyx", [25, -10, 5], degrees=True).as_matrix() @ np.diag([1.25, 1.5, 2.0])
    hr_affine[:3, 3] = [-80, -100, -40]
    hr_shape = (3 * r + 1, 4 * r, 2 * r + 2)
    lr_affine = downsample_affine(hr_affine, r)
    hr_centres = voxel_centres(crop_to_multiple(np.zeros(hr_shape), r).shape, hr_affine)
    lr_from_blocks = block_average(hr_centres, r)  # mean of each block's centres, per coordinate
    lr_centres = voxel_centres(lr_from_blocks.shape[:3], lr_affine)
    np.testing.assert_allclose(lr_centres, lr_from_blocks, atol=1e-4)
    np.testing.assert_allclose(nb.affines.voxel_sizes(lr_affine), r * nb.affines.voxel_sizes(hr_affine))
    np.testing.assert_allclose(upsample_affine(lr_affine, r), hr_affine, atol=1e-12)


def test_degrade_dwi_keeps_volumes():
    dwi = np.random.default_rng(0).uniform(1, 2, size=(10, 10, 9, 5)).astype(np.float32)
    lr, aff = degrade_dwi(dwi, np.eye(4), 3)
    assert lr.shape == (3, 3, 3, 5) and lr.dtype == np.float32
    np.testing.assert_allclose(lr[0, 0, 0], dwi[:3, :3, :3].reshape(-1, 5).mean(0), rtol=1e-6)
    np.testing.assert_allclose(aff[:3, 3], [1, 1, 1])


@pytest.mark.parametrize("r", [0, 1.5, -2])
def test_bad_factor(r):
    with pytest.raises(ValueError, match="positive integer"):
        block_average(np.zeros((4, 4, 4)), r)


def test_too_small_volume():
    with pytest.raises(ValueError, match="smaller than one 3³ block"):
        block_average(np.zeros((2, 5, 5)), 3)


@pytest.mark.parametrize("method, order", [("trilinear", 1), ("cubic", 3)])
@pytest.mark.parametrize("shape, r", [((7, 9, 5, 6), 2), ((11, 6, 8, 2), 3), ((3, 4, 5), 2)])
def test_separable_interpolation_is_scipys_on_the_hr_grid(method, order, shape, r):
    """interpolate_tensors (one axis at a time) gives scipy's map_coordinates (mode nearest,
    prefiltered spline) at every HR voxel centre (h − (r − 1)/2)/r, edges included."""
    from scipy import ndimage

    from iqt_pipe.sr.baselines import interpolate_tensors

    lr = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    coords = np.meshgrid(*[(np.arange(s * r) - (r - 1) / 2) / r for s in shape[:3]], indexing="ij")
    fields = lr.reshape(shape[:3] + (-1,))
    want = np.stack(
        [
            ndimage.map_coordinates(
                fields[..., c].astype(np.float64), coords, order=order, mode="nearest", prefilter=order > 1
            )
            for c in range(fields.shape[-1])
        ],
        -1,
    )
    got = interpolate_tensors(lr, r, method)
    assert got.shape == tuple(s * r for s in shape[:3]) + shape[3:] and got.dtype == np.float32
    np.testing.assert_allclose(got.reshape(want.shape), want, atol=1e-6)
