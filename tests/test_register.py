"""Registration of a raw series' volumes (:func:`iqt_pipe.dmri.preproc.align_volumes`)."""

import numpy as np
import pytest
from scipy import ndimage

from iqt_pipe.dmri.gradients import GradientTable
from iqt_pipe.dmri.preproc import align_volumes


def _head(shape=(40, 40, 32), seed=0):
    """A skull-less 'head': blurred noise inside an egg-shaped ellipsoid, zero outside, with
    a dark off-centre 'ventricle' (no symmetry a turn could hide in)."""
    rng = np.random.default_rng(seed)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    rel = [(g - c) / s for g, c, s in zip(grid, centre, shape)]
    r2 = (rel[0] / 0.42) ** 2 * (1 + 0.4 * rel[1]) + (rel[1] / 0.3) ** 2 + (rel[2] / 0.38) ** 2
    ventricle = ((rel[0] - 0.1) / 0.12) ** 2 + ((rel[1] + 0.05) / 0.06) ** 2 + (rel[2] / 0.15) ** 2 < 1
    head = np.where(r2 < 1, 200 + 300 * (texture - texture.min()) / np.ptp(texture), 0.0)
    return np.where(ventricle, 60.0, head)


def _rotation_z(degrees):
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def _moved(volume, rotation, shift):
    """``volume``'s content turned by ``rotation`` about the grid centre, then shifted (voxels)."""
    centre = (np.array(volume.shape) - 1) / 2
    inverse = rotation.T
    offset = centre - inverse @ (centre + np.asarray(shift, float))
    return ndimage.affine_transform(volume, inverse, offset=offset, order=3)


#: Each moved volume's motion: a shift (voxels), and a 6° turn about the grid's z axis.
MOTIONS = {2: (np.eye(3), (2.0, -1.5, 1.0)), 4: (_rotation_z(6.0), (0.0, 0.0, 0.0))}


@pytest.fixture(scope="module")
def series():
    head = _head()
    bvals = np.array([0, 1000, 1000, 1000, 1000])
    bvecs = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0]], float)
    gains = np.array([1.0, 0.5, 0.45, 0.55, 0.5])
    vols = [g * head for g in gains]
    for k, (rotation, shift) in MOTIONS.items():
        vols[k] = _moved(vols[k], rotation, shift)
    dwi = np.clip(np.stack(vols, -1), 0, None).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    return dwi, GradientTable(bvals, bvecs), affine, gains, head


def test_moved_volumes_are_brought_back(series):
    dwi, gtab, affine, gains, head = series
    out, _ = align_volumes(dwi, gtab, affine)
    assert out.shape == dwi.shape and out.dtype == np.float32 and (out >= 0).all()
    inside = ndimage.binary_erosion(head > 0, iterations=4)
    centre = (np.array(head.shape) - 1) / 2
    for k, (rotation, shift) in MOTIONS.items():
        truth = gains[k] * head
        before = np.abs(dwi[..., k] - truth)[inside].mean()
        # The best a registration can do: the true motion undone, with linear interpolation.
        undone = ndimage.affine_transform(dwi[..., k], rotation, offset=centre + shift - rotation @ centre, order=1)
        best = np.abs(undone - truth)[inside].mean()
        after = np.abs(out[..., k] - truth)[inside].mean()
        assert best < 0.5 * before and after < best + 0.2 * (before - best), (k, before, best, after)
    # A volume that did not move stays where it was.
    steady = np.abs(out[..., 1] - dwi[..., 1])[inside].mean() / (gains[1] * head[inside].mean())
    assert steady < 0.02


def test_directions_turn_with_their_volumes(series):
    dwi, gtab, affine, *_ = series
    q = MOTIONS[4][0]
    _, turned = align_volumes(dwi, gtab, affine)
    np.testing.assert_array_equal(turned.bvals, gtab.bvals)
    assert np.allclose(turned.bvecs[0], 0)
    # Unturned volumes (a shift is not a turn) keep their directions...
    for k in (1, 2, 3):
        assert np.degrees(np.arccos(min(1.0, abs(turned.bvecs[k] @ gtab.bvecs[k])))) < 1.0
    # ... the turned one's direction turns back by its volume's rotation, in the world frame.
    world = gtab.bvecs_world(affine)[4]
    expected = q.T @ world
    got = turned.bvecs_world(affine)[4]
    assert np.degrees(np.arccos(min(1.0, got @ expected))) < 1.5
    assert np.degrees(np.arccos(min(1.0, got @ world))) > 4.0


def test_series_and_table_must_match(series):
    dwi, gtab, affine, *_ = series
    with pytest.raises(ValueError, match="gradient table rows"):
        align_volumes(dwi[..., :4], gtab, affine)
