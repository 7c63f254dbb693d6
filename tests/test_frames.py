"""Tensor frames: reoriented copies of a series give identical world-frame tensors, and
iqt-pipe's world-frame tensors equal MRtrix3 ``dwi2tensor``'s."""

import subprocess

import nibabel as nb
import numpy as np
import pytest

from iqt_pipe.dmri import dti
from iqt_pipe.dmri.dwi import DWISeries, load_dwi
from iqt_pipe.dmri.fit import brain_mask, fit_dti
from iqt_pipe.dmri.gradients import GradientTable, write_gradients
from iqt_pipe.io import save_nifti

AXIAL = "sub-achieva01/dwi/sub-achieva01_dwi.nii.gz"
SAGITTAL = "sub-prismasag01/dwi/sub-prismasag01_run-1_dwi.nii.gz"


def reorient(series: DWISeries, perm=(0, 2, 1), flips=(True, False, False)) -> DWISeries:
    """The same acquisition stored with permuted and flipped voxel axes, affine and bvecs
    changed consistently (as a converter writing another slice order would)."""
    data = np.transpose(series.data, tuple(perm) + (3,))
    for axis, flip in enumerate(flips):
        if flip:
            data = np.flip(data, axis=axis)
    # old index = L @ new index + t
    lin, t = np.zeros((3, 3)), np.zeros(3)
    for a, (p, flip) in enumerate(zip(perm, flips)):
        lin[p, a] = -1.0 if flip else 1.0
        t[p] = series.data.shape[p] - 1 if flip else 0.0
    new_to_old = np.eye(4)
    new_to_old[:3, :3], new_to_old[:3, 3] = lin, t
    affine = series.affine @ new_to_old
    # FSL → old voxel frame → new voxel frame (Lᵀ) → FSL frame of the new affine.
    bvecs = series.gtab.bvecs @ dti.fsl_flip(series.affine) @ lin @ dti.fsl_flip(affine)
    gtab = GradientTable(series.gtab.bvals, bvecs, series.gtab.b0_threshold)
    return DWISeries(np.ascontiguousarray(data), affine, gtab, series.path)


def reorient_map(arr, perm=(0, 2, 1), flips=(True, False, False)):
    out = np.transpose(arr, tuple(perm) + tuple(range(3, arr.ndim)))
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis=axis)
    return out


def world_tensors(series: DWISeries) -> np.ndarray:
    return dti.tensors_voxel_to_world(fit_dti(series.data, series.affine, series.gtab).tensors, series.affine)


def synthetic_series(shape=(6, 7, 5), det_sign=1) -> DWISeries:
    """Noise-free DWI of random world-frame tensors on an oblique grid."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(4)
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", [20, -15, 40], degrees=True).as_matrix() @ np.diag(
        [2, 2, 2.5 * det_sign]
    )
    dirs = rng.normal(size=(30, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    bvals = np.r_[0, 0, np.full(30, 1000.0)]
    fsl = np.r_[np.zeros((2, 3)), dirs]
    gtab = GradientTable(bvals, fsl)
    q, _ = np.linalg.qr(rng.normal(size=shape + (3, 3)))
    world = dti.tensors_from_eig(rng.uniform(0.2e-3, 2e-3, shape + (3,)), q)
    g_world = gtab.bvecs_world(affine)
    adc = np.einsum("ni,...ij,nj->...n", g_world, dti.to_matrix(world), g_world)
    data = (1000 * np.exp(-bvals * adc)).astype(np.float32)
    return DWISeries(data, affine, gtab, None), world


@pytest.mark.parametrize("det_sign", [1, -1])
def test_fit_recovers_world_tensors_on_oblique_grid(det_sign):
    series, truth = synthetic_series(det_sign=det_sign)
    np.testing.assert_allclose(world_tensors(series), truth, atol=2e-8)


@pytest.mark.parametrize(
    "perm, flips, det_changes",
    [
        ((0, 2, 1), (True, False, False), False),
        ((0, 2, 1), (False, False, False), True),
        ((2, 0, 1), (False, True, False), True),
    ],
)
def test_reoriented_synthetic_copy_gives_same_world_tensors(perm, flips, det_changes):
    series, truth = synthetic_series()
    copy = reorient(series, perm, flips)
    # Both directions of FSL's determinant-dependent x flip are exercised.
    assert (np.linalg.det(copy.affine) * np.linalg.det(series.affine) < 0) == det_changes
    np.testing.assert_allclose(world_tensors(copy), reorient_map(truth, perm, flips), atol=2e-8)


@pytest.mark.realdata
@pytest.mark.parametrize("run", [AXIAL, SAGITTAL], ids=["axial", "sagittal"])
def test_real_flipped_permuted_copy_gives_identical_world_tensors(realdwi, run):
    series = load_dwi(realdwi / run)
    copy = reorient(series)
    a = reorient_map(world_tensors(series))
    b = world_tensors(copy)
    scale = np.abs(a).max()
    np.testing.assert_allclose(b, a, atol=1e-5 * scale)


@pytest.mark.realdata
@pytest.mark.parametrize("run", [AXIAL, SAGITTAL], ids=["axial", "sagittal"])
def test_world_tensors_equal_mrtrix_dwi2tensor(realdwi, mrtrix, run, tmp_path):
    series = load_dwi(realdwi / run)
    fit = fit_dti(series.data, series.affine, series.gtab)
    # MRtrix3 gets exactly the volumes iqt-pipe fits (b=0 + the chosen shell).
    sub = series.gtab.subset(fit.volumes)
    save_nifti(series.data[..., fit.volumes], series.affine, tmp_path / "dwi.nii.gz")
    write_gradients(sub, tmp_path / "dwi.bval", tmp_path / "dwi.bvec")
    subprocess.run(
        [
            "dwi2tensor",
            "-quiet",
            "-fslgrad",
            tmp_path / "dwi.bvec",
            tmp_path / "dwi.bval",
            tmp_path / "dwi.nii.gz",
            tmp_path / "dt.nii.gz",
        ],
        check=True,
    )
    img = nb.load(tmp_path / "dt.nii.gz")
    np.testing.assert_allclose(img.affine, series.affine, atol=1e-3)
    theirs = dti.from_mrtrix_order(img.get_fdata(dtype=np.float32))
    ours = dti.tensors_voxel_to_world(fit.tensors, series.affine)
    # Where a volume's signal is 0 (cerebrospinal fluid at the scanner's floor) each program
    # floors it its own way; the frames are compared where every reading is positive.
    positive = np.all(series.data[..., fit.volumes] > 0, axis=-1)
    mask = brain_mask(series.data, series.gtab, series.zooms) & fit.mask & positive
    a, b = ours[mask], theirs[mask]
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
    # dipy's WLS and MRtrix3's IWLS differ slightly in their weights (measured: median 0.2 %);
    # a wrong order, sign or frame gives > 10 %.
    assert np.median(rel) < 0.01
    assert np.percentile(rel, 90) < 0.05
    for c in range(6):
        assert np.corrcoef(a[:, c], b[:, c])[0, 1] > 0.97, dti.COMPONENTS[c]
    fa_ours = dti.scalar_maps(a)["fa"]
    fa_theirs = dti.scalar_maps(b)["fa"]
    assert np.median(np.abs(fa_ours - fa_theirs)) < 0.01


@pytest.mark.mrtrix
@pytest.mark.parametrize("orientation", ["RAS", "LPI", "PIR"])
def test_phantom_world_tensors_equal_mrtrix_and_truth(mrtrix, tmp_path, orientation):
    """Needs no real data: MRtrix3 reads the phantom's image and bvecs through its own FSL
    import, so a wrong flip or axis order on our side (or in the phantom) would show."""
    from iqt_pipe.sims.dataset import write_bids_dataset

    root = write_bids_dataset(tmp_path / "ds", preset="tiny", seed=4, snr=None, orientation=orientation)
    run = root / "sub-01/dwi/sub-01_dwi"
    subprocess.run(
        ["dwi2tensor", "-quiet", "-fslgrad", f"{run}.bvec", f"{run}.bval", f"{run}.nii.gz", tmp_path / "dt.nii.gz"],
        check=True,
    )
    theirs = dti.from_mrtrix_order(nb.load(tmp_path / "dt.nii.gz").get_fdata(dtype=np.float32))
    series = load_dwi(f"{run}.nii.gz")
    ours = world_tensors(series)
    truth = nb.load(
        root / "derivatives/phantom-truth/sub-01/dwi/sub-01_model-tensor_param-tensor_dwimap.nii.gz"
    ).get_fdata()
    brain = nb.load(root / "derivatives/phantom-truth/sub-01/dwi/sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
    scale = np.abs(truth[brain]).max()
    np.testing.assert_allclose(theirs[brain], truth[brain], atol=1e-4 * scale)
    np.testing.assert_allclose(ours[brain], truth[brain], atol=1e-4 * scale)
