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


@pytest.fixture(scope="module")
def aligned(series):
    dwi, gtab, affine, *_ = series
    return align_volumes(dwi, gtab, affine)


def test_moved_volumes_are_brought_back(series, aligned):
    dwi, gtab, affine, gains, head = series
    out, _ = aligned
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
    # Volumes registered side by side in two processes: the same result.
    np.testing.assert_array_equal(align_volumes(dwi, gtab, affine, processes=2)[0], out)
    # A volume that did not move stays where it was.
    steady = np.abs(out[..., 1] - dwi[..., 1])[inside].mean() / (gains[1] * head[inside].mean())
    assert steady < 0.02


def test_directions_turn_with_their_volumes(series, aligned):
    dwi, gtab, affine, *_ = series
    q = MOTIONS[4][0]
    _, turned = aligned
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


def test_iqt_eval_registers_a_moving_scan_before_its_reference(tmp_path, monkeypatch):
    """A phantom scan whose diffusion-weighted volumes moved (head motion by 1-2 mm): its HR
    reference is far from the truth as acquired, and near the still scan's once both are
    registered (registration resamples, which costs both some detail). The patch library
    reads the registered series iqt-eval kept, not registering it again."""
    import shutil

    import nibabel as nb

    from iqt_pipe.bids import find_dwi_runs
    from iqt_pipe.dmri.dti import tensors_world_to_voxel
    from iqt_pipe.evaluation import metrics
    from iqt_pipe.evaluation import protocol as ev
    from iqt_pipe.io import load_nifti
    from iqt_pipe.sims.dataset import TRUTH_DIR, write_bids_dataset

    still = write_bids_dataset(tmp_path / "still", preset="small", seed=3, snr=40)
    shutil.copytree(still, tmp_path / "moving")
    (run,) = find_dwi_runs(tmp_path / "moving")
    img = nb.load(run.dwi)
    data = np.asarray(img.dataobj, dtype=np.float32)
    for k in np.flatnonzero(np.loadtxt(run.bval) > 50)[::2]:  # every other one
        data[..., k] = ndimage.shift(data[..., k], (0.4, -0.3, 0.25), order=3)
    nb.save(nb.Nifti1Image(data, img.affine, img.header), run.dwi)

    truth, affine, _ = load_nifti(
        still / TRUTH_DIR / f"sub-{run.subject}" / "dwi" / f"sub-{run.subject}_model-tensor_param-tensor_dwimap.nii.gz"
    )
    truth = tensors_world_to_voxel(truth, affine)
    (still_run,) = find_dwi_runs(still)
    errors = {}
    cache = tmp_path / "cache"
    for name, r, register in (("still", still_run, True), ("moving", run, False), ("registered", run, True)):
        case = ev.prepare_case(r, mode="raw", noise_floor=False, register_volumes=register, cache_dir=cache)
        assert case.info["registered_volumes"] is register
        crop = truth[tuple(slice(0, s) for s in case.reference.shape[:3])]
        errors[name] = metrics.rmse(case.reference, crop, case.hr_mask)
    # Measured: 4.8, 7.5 and 5.75 × 1e-5 mm²/s (as acquired, the still scan's is 3.4).
    assert errors["moving"] > 1.4 * errors["still"], errors
    assert errors["registered"] < errors["still"] + 0.5 * (errors["moving"] - errors["still"]), errors

    from iqt_pipe.dmri import preproc
    from iqt_pipe.sr.patches import build_library

    assert len(list(cache.glob("aligned-*.npz"))) == 2
    monkeypatch.setattr(preproc, "_align", lambda *args: pytest.fail("registered again"))
    lib = build_library([run], patches_per_subject=20, cache_dir=cache, register_volumes=True, quiet=True)
    assert lib.meta["register_volumes"] and len(list(cache.glob("aligned-*.npz"))) == 2


def test_voxels_a_volume_lost_at_the_grid_edge_are_left_out(series):
    """A volume moved back by registration has no readings for a slab at the grid's faces:
    those voxels are zero in every volume (the fit leaves them out) instead of fitted without
    it; every other voxel keeps all its readings."""
    dwi, gtab, affine, *_ = series
    out, _ = align_volumes(dwi + 20, gtab, affine)  # a background signal everywhere
    empty = ~np.any(out > 0, axis=-1)
    # Volume 2 was shifted by 2, -1.5, 1 voxels: one face in i, j and k each lost a slab.
    assert any(empty[face].all() for face in (np.s_[:1], np.s_[-1:]))
    assert any(empty[:, face].all() for face in (np.s_[:1], np.s_[-1:]))
    assert (out[~empty] > 0).all() and empty.mean() < 0.3  # (measured: 0.22, corners of the turn too)


def test_a_registered_series_is_kept_and_read_back(series, aligned, tmp_path, monkeypatch):
    """With ``cache_dir`` the result is written once and read back for the same series (as
    iqt-train and iqt-eval share it); another series is registered, not taken from there."""
    from iqt_pipe.dmri import preproc

    dwi, gtab, affine, *_ = series
    out, turned = align_volumes(dwi, gtab, affine, cache_dir=tmp_path)
    np.testing.assert_array_equal(out, aligned[0])
    np.testing.assert_array_equal(turned.bvecs, aligned[1].bvecs)
    (kept,) = tmp_path.glob("aligned-*.npz")

    def refuse(*args):
        raise AssertionError("registered again")

    monkeypatch.setattr(preproc, "_align", refuse)
    again, turned_again = align_volumes(dwi.astype(np.float64), gtab, affine, cache_dir=tmp_path)
    np.testing.assert_array_equal(again, aligned[0])
    np.testing.assert_array_equal(turned_again.bvecs, aligned[1].bvecs)
    assert list(tmp_path.glob("aligned-*.npz")) == [kept]
    for other in (dwi * 1.01, dwi[..., :4]):
        with pytest.raises(AssertionError, match="registered again"):
            align_volumes(other, gtab.subset(np.arange(other.shape[-1])), affine, cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="registered again"):
        align_volumes(dwi, gtab, affine @ np.diag([1.0, 1.0, 1.1, 1.0]), cache_dir=tmp_path)
