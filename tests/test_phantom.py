"""Synthetic brain phantom (iqt_pipe.sims.phantom and .dataset, iqt-phantom): determinism, BIDS validity,
exact ground truth in the right frame, anatomy (tissues, bundles, crossings, lesion), CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nb
import numpy as np
import pytest
from helpers import venv_tool

from iqt_pipe.cli import phantom as cli
from iqt_pipe.dmri.dti import eig, scalar_maps, tensors_voxel_to_world
from iqt_pipe.dmri.fit import fit_dti
from iqt_pipe.dmri.gradients import read_gradients
from iqt_pipe.io import InputError, load_nifti
from iqt_pipe.sims import dataset as ds
from iqt_pipe.sims import phantom as ph


@pytest.fixture(scope="module")
def clean():
    """Noise-free tiny phantom with a lesion."""
    return ph.make_phantom("tiny", seed=1, snr=None, lesion=True)


@pytest.fixture(scope="module")
def small_clean():
    """Noise-free small (4 mm) phantom: thin bundles span several voxels."""
    return ph.make_phantom("small", seed=1, snr=None)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return ds.write_bids_dataset(
        tmp_path_factory.mktemp("bids") / "ds", n_subjects=2, preset="tiny", seed=5, lesion=True
    )


def _arrays(p: ph.Phantom) -> dict:
    return {
        "dwi": p.dwi,
        "affine": p.affine,
        "bvals": p.gtab.bvals,
        "bvecs": p.gtab.bvecs,
        "tensors": p.tensors_world,
        "s0": p.s0,
        "tissue": p.tissue,
        "bundles": p.bundles,
    }


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_arrays_different_seed_different():
    a = _arrays(ph.make_phantom("tiny", seed=3, snr=30))
    b = _arrays(ph.make_phantom("tiny", seed=3, snr=30))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    c = ph.make_phantom("tiny", seed=4, snr=30)
    d = ph.make_phantom("tiny", seed=3, snr=30, subject=2)
    for other in (c, d):
        assert not np.array_equal(a["dwi"], other.dwi)
        assert not np.array_equal(a["tensors"], other.tensors_world)  # head pose differs
        np.testing.assert_array_equal(a["bvecs"], other.gtab.bvecs)  # same protocol


def test_presets_and_gradient_scheme(clean):
    assert clean.dwi.shape[:3] == ph.PRESETS["tiny"].shape
    np.testing.assert_allclose(clean.voxel_size, 6.5)
    assert ph.PRESETS["demo"].voxel_size == 2.5
    assert ph.PRESETS["tiny"].voxel_size > ph.PRESETS["small"].voxel_size > 2.5
    g = clean.gtab
    b0 = np.flatnonzero(g.b0_mask)
    assert len(b0) >= 3 and b0[-1] > len(g.bvals) // 2  # interleaved, not all up front
    dw = ~g.b0_mask
    assert dw.sum() >= 30 and np.allclose(g.bvals[dw], 1000)
    np.testing.assert_allclose(np.linalg.norm(g.bvecs[dw], axis=1), 1, atol=1e-9)
    # Well spread: no two directions (or their antipodes) closer than 15 degrees.
    cos = np.abs(g.bvecs[dw] @ g.bvecs[dw].T)
    np.fill_diagonal(cos, 0)
    assert np.degrees(np.arccos(cos.max())) > 15
    # The .bvec (FSL) frame converts back to the scheme's world-frame directions.
    np.testing.assert_allclose(g.bvecs_world(clean.affine)[dw], ph.world_directions(int(dw.sum())), atol=1e-12)
    assert np.linalg.det(clean.affine[:3, :3]) > 0  # RAS+: FSL's x flip is exercised


def test_bad_arguments_raise_input_error(tmp_path):
    for kwargs in ({"preset": "huge"}, {"snr": 0}, {"snr": -1}, {"seed": -1}, {"orientation": "RAR"}):
        with pytest.raises(InputError):
            ph.make_phantom(**kwargs)
    with pytest.raises(InputError):
        ds.write_bids_dataset(tmp_path / "x", n_subjects=0)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- ground truth


@pytest.mark.parametrize("orientation", ["RAS", "LAS", "PIR"])
def test_noise_free_fit_recovers_world_truth(orientation):
    """Noise-free signal is exactly S0·exp(−b gᵀDg): a WLS fit gives the truth back up to
    float32 rounding, in every voxel orientation, once converted voxel → world."""
    p = ph.make_phantom("tiny", seed=2, snr=None, lesion=True, orientation=orientation)
    fit = fit_dti(p.dwi, p.affine, p.gtab, mask=p.mask)
    assert fit.mask.sum() == p.mask.sum()
    m = p.mask
    world = tensors_voxel_to_world(fit.tensors, p.affine)
    scale = np.abs(p.tensors_world[m]).max()
    np.testing.assert_allclose(world[m], p.tensors_world[m], rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(p.tensors_voxel[m], fit.tensors[m], rtol=0, atol=1e-4 * scale)
    maps = scalar_maps(fit.tensors)
    np.testing.assert_allclose(maps["fa"][m], p.fa[m], rtol=0, atol=1e-4)
    np.testing.assert_allclose(maps["md"][m], p.md[m], rtol=1e-4)


def test_threaded_fit_is_the_same_to_the_bit():
    p = ph.make_phantom("tiny", seed=3, snr=20)
    one, three = fit_dti(p.dwi, p.affine, p.gtab), fit_dti(p.dwi, p.affine, p.gtab, threads=3)
    np.testing.assert_array_equal(one.tensors, three.tensors)
    np.testing.assert_array_equal(one.s0, three.s0)
    assert one.guards == three.guards


def test_wls_equals_dipys_tensor_model():
    """fit_dti's WLS solve (normal equations of all voxels at once) against DIPY's
    TensorModel(fit_method="WLS") on the same noisy signals: tensors and S0 within 1e-9
    relative, negative eigenvalues raised alike (low SNR gives some)."""
    import dipy.reconst.dti as dipy_dti
    from dipy.core.gradients import gradient_table

    from iqt_pipe.dmri.fit import positive_signal, wls_tensors

    p = ph.make_phantom("tiny", seed=4, snr=4)  # 193 of 6825 voxels get a negative eigenvalue
    g = p.gtab
    model = dipy_dti.TensorModel(gradient_table(g.bvals, bvecs=g.bvecs), fit_method="WLS", return_S0_hat=True)
    signal = positive_signal(p.dwi[p.mask].astype(np.float64))
    theirs = model.fit(signal)
    tensors, s0 = wls_tensors(model.design_matrix, signal)
    assert (theirs.evals[:, -1] <= 1.1e-9).sum() > 100  # raised to DIPY's floor
    expected = theirs.lower_triangular()
    np.testing.assert_allclose(tensors, expected, rtol=0, atol=1e-9 * np.abs(expected).max())
    np.testing.assert_allclose(s0, theirs.S0_hat, rtol=1e-9)


def test_wls_survives_a_voxel_whose_weights_underflow():
    """A voxel whose OLS fit is wild (a b = 0 reading of 1e300 beside floor-level diffusion
    weighting) keeps only one weight above underflow: its normal equations are singular. The
    chunk is then solved by pseudo-inverse, as DIPY solves every voxel, instead of failing;
    the other voxels' estimates do not change."""
    import dipy.reconst.dti as dipy_dti
    from dipy.core.gradients import gradient_table

    from iqt_pipe.dmri.fit import positive_signal, wls_tensors

    p = ph.make_phantom("tiny", seed=4, snr=20)
    g = p.gtab
    design = dipy_dti.TensorModel(gradient_table(g.bvals, bvecs=g.bvecs), fit_method="WLS").design_matrix
    signal = positive_signal(p.dwi[p.mask].astype(np.float64))[:500]
    wild = np.where(g.b0_mask, 1e300, 1e-4)
    tensors, s0 = wls_tensors(design, np.vstack([signal, wild]))
    alone, alone_s0 = wls_tensors(design, signal)
    np.testing.assert_allclose(tensors[:-1], alone, rtol=0, atol=1e-9 * np.abs(alone).max())
    np.testing.assert_allclose(s0[:-1], alone_s0, rtol=1e-9)
    assert np.isfinite(tensors[-1]).all()


def test_world_truth_does_not_depend_on_voxel_orientation():
    ras = ph.make_phantom("tiny", seed=2, snr=None)
    for codes in ("LAS", "PIR"):
        other = ph.make_phantom("tiny", seed=2, snr=None, orientation=codes)
        to_ras = nb.orientations.ornt_transform(
            nb.orientations.io_orientation(other.affine), nb.orientations.axcodes2ornt("RAS")
        )
        back = nb.orientations.apply_orientation(other.tensors_world, to_ras)
        np.testing.assert_allclose(back, ras.tensors_world, rtol=0, atol=1e-9)
        # FSL's convention makes .bvec files blind to an x flip of the voxel grid, but not
        # to a permutation of its axes.
        same_bvecs = np.allclose(other.gtab.bvecs, ras.gtab.bvecs, atol=1e-12)
        assert same_bvecs == (codes == "LAS")


def test_snr200_fit_is_close_to_truth():
    """SNR 200 (σ = 5 for a WM b=0 of ~1000): the b=1000 WM signal (~500) has SNR ~100,
    so with 30 directions the FA standard error is ~0.005 (median |error| ~0.003) and the
    Rician bias (σ²/2S ≈ 0.025) is negligible. 0.01 leaves a 3× margin."""
    p = ph.make_phantom("tiny", seed=0, snr=200)
    fit = fit_dti(p.dwi, p.affine, p.gtab, mask=p.mask)
    maps = scalar_maps(fit.tensors)
    wm = p.tissue == 3
    assert np.median(np.abs(maps["fa"][wm] - p.fa[wm])) < 0.01
    assert np.median(np.abs(maps["md"][wm] - p.md[wm]) / p.md[wm]) < 0.01


# --------------------------------------------------------------------------- anatomy


def test_tissues_have_typical_signal_and_diffusivity(small_clean):
    clean = small_clean  # 4 mm voxels: nearly pure CSF exists (ventricles)
    labels = clean.tissue
    s0 = {t: clean.s0[labels == t].mean() for t in (1, 2, 3)}
    assert s0[1] > s0[2] > s0[3] > 0  # CSF brightest at b = 0
    pure = clean.fractions[..., :3].max(axis=-1) > 0.9
    csf, gm, wm = ((labels == t) & pure for t in (1, 2, 3))
    assert csf.any() and gm.any() and wm.any()
    # Medians of nearly pure voxels (≤ 10 % partial volume).
    assert 2.5e-3 < np.median(clean.md[csf]) <= 3e-3 and np.median(clean.fa[csf]) < 0.05
    assert 0.7e-3 < np.median(clean.md[gm]) < 1.0e-3 and np.median(clean.fa[gm]) < 0.2
    assert 0.6e-3 < np.median(clean.md[wm]) < 0.8e-3
    core = (clean.bundles.max(axis=-1) > 0.99) & (clean.fractions[..., 2] > 0.95)
    core &= (clean.bundles > 0.01).sum(axis=-1) == 1
    assert 0.6 < np.median(clean.fa[core]) < 0.8
    # Background: no signal, zero tensors; the brain mask is a compact blob.
    assert np.all(clean.s0[~clean.mask & (clean.fractions.sum(-1) == 0)] == 0)
    assert 0.2 < clean.mask.mean() < 0.6


def test_background_is_rayleigh_noise():
    p = ph.make_phantom("tiny", seed=0, snr=20)
    outside = p.fractions.sum(axis=-1) == 0
    assert outside.sum() > 1000
    mean = p.dwi[outside].mean()
    np.testing.assert_allclose(mean, p.sigma * np.sqrt(np.pi / 2), rtol=0.05)
    assert mean < 0.1 * p.s0[p.tissue == 3].mean()


def test_lesion_has_high_md_and_low_fa(clean):
    lesion = clean.lesion
    assert lesion is not None and lesion.sum() >= 5 and not np.any(lesion & ~clean.mask)
    from scipy.ndimage import binary_dilation

    ring = binary_dilation(lesion, iterations=2) & ~lesion & (clean.tissue == 3)
    ring &= clean.fractions[..., 3] < 0.05
    assert ring.sum() >= 5
    assert np.median(clean.md[lesion]) > max(1.5e-3, 2 * np.median(clean.md[ring]))
    assert np.median(clean.fa[lesion]) < 0.15 < np.median(clean.fa[ring])
    assert ph.make_phantom("tiny", seed=1, snr=None).lesion is None


def _core(p: ph.Phantom, k: int) -> np.ndarray:
    """Voxels of bundle k alone, nearly pure white matter."""
    others = np.delete(p.bundles, k, axis=-1).max(axis=-1)
    return (p.bundles[..., k] >= 0.99) & (others < 0.01) & (p.fractions[..., 2] >= 0.9)


def _neighbour_coherence(e1: np.ndarray, core: np.ndarray) -> np.ndarray:
    """|cos| between the principal eigenvectors of face-neighbouring core voxels."""
    cos = []
    for axis in range(3):
        a = np.take(core, range(core.shape[axis] - 1), axis=axis)
        b = np.take(core, range(1, core.shape[axis]), axis=axis)
        ea = np.take(e1, range(core.shape[axis] - 1), axis=axis)[a & b]
        eb = np.take(e1, range(1, core.shape[axis]), axis=axis)[a & b]
        cos.append(np.abs(np.sum(ea * eb, axis=-1)))
    return np.concatenate(cos)


#: Dominant world axis of each bundle's fibres (0 = left–right, 1 = A–P, 2 = S–I).
MAIN_AXIS = {"cc": 0, "cst_l": 2, "cst_r": 2, "slf_l": 1, "slf_r": 1, "cing_l": 1, "cing_r": 1}


def test_bundles_are_coherent_and_follow_their_course(small_clean):
    """Ground-truth principal directions vary smoothly inside every bundle and point along
    its anatomical course in the world frame (after the subject's few-degree head turn)."""
    _, evecs = eig(small_clean.tensors_world)
    e1 = evecs[..., :, 0]
    for k, name in enumerate(small_clean.bundle_names):
        core = _core(small_clean, k)
        assert core.sum() >= 5, name
        cos = _neighbour_coherence(e1, core)
        assert len(cos) >= 2 and cos.mean() > 0.9, name
        # World frame: the callosum runs left–right, the CST superior–inferior, ...
        mean_abs = np.abs(e1[core]).mean(axis=0)
        assert mean_abs.argmax() == MAIN_AXIS[name] and mean_abs.max() > 0.8, name


def test_noisy_fit_sees_the_bundles():
    """At SNR 30 the fitted principal directions in bundle cores (FA ~0.75) stay close to
    the truth: the median angle is ~1.5° over seeds 0-4; 5° leaves a 3× margin."""
    p = ph.make_phantom("tiny", seed=0, snr=30)
    fit = fit_dti(p.dwi, p.affine, p.gtab, mask=p.mask)
    _, fit_vecs = eig(tensors_voxel_to_world(fit.tensors, p.affine))
    _, true_vecs = eig(p.tensors_world)
    core = np.any([_core(p, k) for k in range(len(p.bundle_names))], axis=0)
    cos = np.abs(np.sum(fit_vecs[core][:, :, 0] * true_vecs[core][:, :, 0], axis=-1))
    assert np.degrees(np.arccos(np.median(cos))) < 5


@pytest.mark.parametrize("name", ["clean", "small_clean"])
def test_crossings_are_planar(name, request):
    clean = request.getfixturevalue(name)
    evals, _ = eig(clean.tensors_world)
    l1, l2, l3 = np.moveaxis(np.maximum(evals, 1e-12), -1, 0)
    linear, planar = (l1 - l2) / l1, (l2 - l3) / l1
    crossing = ((clean.bundles >= 0.9).sum(axis=-1) >= 2) & (clean.fractions[..., 2] >= 0.9)
    assert crossing.sum() >= 3
    assert np.sum(crossing & (planar > 0.4) & (planar > linear)) >= 1


# --------------------------------------------------------------------------- BIDS


def test_dataset_layout_and_truth_files(dataset):
    desc = json.loads((dataset / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "raw" and desc["BIDSVersion"] == "1.9.0"
    assert desc["GeneratedBy"][0]["Name"] == "iqt-phantom"
    rows = (dataset / "participants.tsv").read_text().splitlines()
    assert rows[0].startswith("participant_id") and [r.split("\t")[0] for r in rows[1:]] == ["sub-01", "sub-02"]
    assert (dataset / "README").read_text().strip()

    expected = ph.make_phantom("tiny", seed=5, snr=30, lesion=True, subject=1)
    stem = dataset / "sub-01" / "dwi" / "sub-01_dwi"
    dwi, affine, hdr = load_nifti(f"{stem}.nii.gz")
    np.testing.assert_array_equal(dwi, expected.dwi)
    np.testing.assert_allclose(affine, expected.affine)
    assert hdr.get_zooms()[3] == json.loads(stem.with_suffix(".json").read_text())["RepetitionTime"]
    gtab = read_gradients(f"{stem}.bval", f"{stem}.bvec", n_volumes=dwi.shape[-1])
    np.testing.assert_allclose(gtab.bvecs, expected.gtab.bvecs, atol=1e-6)

    truth = dataset / "derivatives" / "phantom-truth"
    truth_desc = json.loads((truth / "dataset_description.json").read_text())
    assert truth_desc["DatasetType"] == "derivative"
    base = truth / "sub-01" / "dwi" / "sub-01"
    tensors, _, _ = load_nifti(f"{base}_model-tensor_param-tensor_dwimap.nii.gz")
    np.testing.assert_array_equal(tensors, expected.tensors_world)
    meta = json.loads(open(f"{base}_model-tensor_param-tensor_dwimap.json").read())
    assert meta["OrientationEncoding"]["Reference"] == "xyz"
    assert meta["TensorComponents"] == ["D11", "D12", "D13", "D22", "D23", "D33"]
    for name, array in (("fa", expected.fa), ("md", expected.md)):
        got, _, _ = load_nifti(f"{base}_model-tensor_param-{name}_dwimap.nii.gz")
        np.testing.assert_array_equal(got, array)
    for suffix, array in (
        ("desc-brain_mask", expected.mask),
        ("desc-tissue_dseg", expected.tissue),
        ("desc-lesion_mask", expected.lesion),
    ):
        got, _, _ = load_nifti(f"{base}_{suffix}.nii.gz")
        np.testing.assert_array_equal(got, array.astype(np.float32))
    # Subjects differ.
    other, _, _ = load_nifti(dataset / "sub-02" / "dwi" / "sub-02_dwi.nii.gz")
    assert not np.array_equal(other, dwi)


def _validate(path) -> list[dict]:
    exe = venv_tool("bids-validator-deno")
    if exe is None:
        pytest.skip("bids-validator-deno not installed (pip install bids-validator-deno)")
    proc = subprocess.run([exe, str(path), "--format", "json"], capture_output=True, text=True, timeout=300)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"validator gave no JSON (rc {proc.returncode}): {proc.stderr[-2000:]}")
    issues = report["issues"]["issues"]
    assert proc.returncode == 0 or any(i["severity"] == "error" for i in issues), proc.stderr
    return [i for i in issues if i["severity"] == "error"]


def test_bids_validator_accepts_dataset(dataset):
    assert _validate(dataset) == []


def test_bids_validator_accepts_truth_derivative(dataset):
    # Validated as a dataset of its own: bids-validator-deno's --recursive mode ignores
    # the derivative's .bidsignore (fixed upstream in bids-validator PR #331).
    assert _validate(dataset / "derivatives" / "phantom-truth") == []


def test_output_folder_rules(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty") as info:
        ds.write_bids_dataset(foreign)
    assert "\n" not in str(info.value)
    assert [f.name for f in foreign.iterdir()] == ["notes.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    ds.write_bids_dataset(empty, n_subjects=2, snr=None)
    assert (empty / "sub-02").is_dir()
    ds.write_bids_dataset(empty, n_subjects=1, snr=None)  # an earlier phantom is replaced
    assert (empty / "sub-01").is_dir() and not (empty / "sub-02").exists()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["empty", "foreign"]  # no leftovers


# --------------------------------------------------------------------------- CLI


def test_cli_writes_dataset(tmp_path, capsys):
    out = tmp_path / "ds"
    assert cli.main([str(out), "--subjects", "1", "--seed", "9", "--snr", "inf", "--lesion"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "wrote 1 subject" in printed[0] and "noise-free" in printed[0]
    assert (out / "sub-01" / "dwi" / "sub-01_dwi.nii.gz").exists()
    assert (out / "derivatives" / "phantom-truth" / "sub-01" / "dwi" / "sub-01_desc-lesion_mask.nii.gz").exists()


def test_cli_refuses_foreign_folder(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.csv").write_text("1,2\n")
    assert cli.main([str(foreign)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iqt-phantom: error:") and "foreign" in err[0]
    # As a console program: exit status 2, one line, no traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "iqt_pipe.cli.phantom", str(foreign)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert [f.name for f in foreign.iterdir()] == ["data.csv"]


def test_cli_bad_values_exit_2(tmp_path, capsys):
    for argv in (["--snr", "0"], ["--subjects", "0"], ["--preset", "huge"], ["--seed", "x"]):
        with pytest.raises(SystemExit) as info:
            cli.main([str(tmp_path / "x"), *argv])
        assert info.value.code == 2
    assert cli.main([str(tmp_path / "x"), "--orientation", "XYZ"]) == 2
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and "iqt-phantom" in capsys.readouterr().out


def test_demo_preset_noise_free_fit():
    """The whole-brain preset (~4 s: 64x79x68 voxels, 54 volumes) is exact too."""
    p = ph.make_phantom("demo", seed=0, snr=None, lesion=True)
    np.testing.assert_allclose(p.voxel_size, 2.5)
    fit = fit_dti(p.dwi, p.affine, p.gtab, mask=p.mask)
    m = p.mask
    world = tensors_voxel_to_world(fit.tensors, p.affine)
    np.testing.assert_allclose(world[m], p.tensors_world[m], rtol=0, atol=1e-4 * np.abs(p.tensors_world[m]).max())
