"""DWI preprocessing (MP-PCA denoising, Gibbs-ringing removal) and the native DTI fit as
Nipype workflows: graphs for every option, and runs on a noisy phantom against its
noise-free twin (same preset and seed)."""

import json

import nibabel as nb
import numpy as np
import pytest
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from scipy import ndimage

from iqt_pipe.dmri.dti import scalar_maps
from iqt_pipe.dmri.fit import fit_dti
from iqt_pipe.io import load_nifti, save_nifti
from iqt_pipe.sims.dataset import TRUTH_DIR, write_bids_dataset
from iqt_pipe.sims.phantom import make_phantom
from iqt_pipe.workflows import dwi as dwi_workflows
from iqt_pipe.workflows import init_dti_wf, init_dwi_preproc_wf

SEED, SNR = 3, 15


def _nodes(workflow) -> set[str]:
    return {name.split(".")[-1] for name in workflow.list_node_names()}


def _run(workflow, base_dir, **inputs) -> dict:
    """Run a workflow serially; the executed nodes by name."""
    wf = pe.Workflow(name=f"run_{workflow.name}", base_dir=str(base_dir))
    wf.add_nodes([workflow])
    for field, value in inputs.items():
        setattr(workflow.inputs.inputnode, field, value)
    return {node.name: node for node in wf.run(plugin="Linear").nodes()}


@pytest.mark.parametrize("mrtrix_on_path", [True, False], ids=["mrtrix-on-path", "no-mrtrix"])
@pytest.mark.parametrize("degibbs", [True, False], ids=["degibbs", "no-degibbs"])
@pytest.mark.parametrize("denoise", ["none", "mrtrix", "dipy", "auto"])
def test_preproc_graph_for_every_option(monkeypatch, denoise, degibbs, mrtrix_on_path):
    monkeypatch.setattr(dwi_workflows, "mrtrix_available", lambda: mrtrix_on_path)
    wf = init_dwi_preproc_wf(denoise=denoise, degibbs=degibbs)
    mrtrix = denoise == "mrtrix" or (denoise != "dipy" and mrtrix_on_path)
    steps = []
    if denoise != "none":
        steps.append("dwidenoise" if mrtrix else "denoise_mppca")
    if degibbs:
        steps.append("mrdegibbs" if mrtrix else "remove_gibbs")
    assert _nodes(wf) == {"inputnode", "outputnode", *steps}

    # A chain: inputnode → denoise → Gibbs → outputnode, the noise map from the denoiser.
    chain = ["inputnode", *steps, "outputnode"]
    edges = {(u.name, v.name): d["connect"] for u, v, d in wf._graph.edges(data=True)}
    for up, down in zip(chain, chain[1:]):
        assert any(dst in ("in_file", "dwi_file") for _, dst in edges[(up, down)]), (up, down)
    noise_src = [u for (u, v), conns in edges.items() if v == "outputnode" and any(d == "noise_file" for _, d in conns)]
    assert noise_src == (steps[:1] if denoise != "none" else [])

    desc = wf.__desc__ or ""
    assert ("@mppca" in desc) == (denoise != "none")
    assert ("@kellner2016" in desc) == degibbs
    assert ("MRtrix3" in desc) == (mrtrix and bool(steps))
    assert ("DIPY" in desc) == (not mrtrix and bool(steps))
    if not steps:
        assert wf.__desc__ is None


def test_factories_refuse_unknown_options_and_build_dti_graph():
    with pytest.raises(ValueError, match="denoise must be one of"):
        init_dwi_preproc_wf(denoise="fsl")
    with pytest.raises(ValueError, match="slice_axis"):
        init_dwi_preproc_wf(slice_axis=3)
    wf = init_dti_wf()
    assert _nodes(wf) == {"inputnode", "outputnode", "fit_dti"}
    assert "weighted linear least squares" in wf.__desc__ and "median_otsu" in wf.__desc__


@pytest.mark.parametrize("tractography", [(), ("dipy", "mrtrix")], ids=["no-tracking", "tracking"])
def test_run_wf_embeds_alone_in_another_pipeline(tractography, tmp_path):
    """``init_dwi_run_wf``: one run's whole chain behind one inputnode and one outputnode, as a
    user embeds it (graph only: the BIDS App's runs check what it computes)."""
    from iqt_pipe.workflows import init_dwi_run_wf
    from iqt_pipe.workflows.outputs import NATIVE_DERIVATIVES, SR_DERIVATIVES
    from iqt_pipe.workflows.tractography import tractogram_keys

    run_wf = init_dwi_run_wf(
        model=str(tmp_path / "model"),
        output_dir=str(tmp_path / "out"),
        denoise="dipy",
        degibbs=True,
        tractography=tractography,
        name="my_run_wf",
    )
    steps = {"dwi_preproc_wf", "dti_wf", "sr_wf", "outputs_wf"}
    if tractography:
        steps |= {"tractography_wf", "tractography_outputs_wf"}
    assert {n.name for n in run_wf._graph.nodes()} == {"inputnode", "outputnode", "noise_corr", *steps}
    inputs = run_wf.get_node("inputnode").inputs.copyable_trait_names()
    assert set(inputs) == {"dwi_file", "bval_file", "bvec_file", "mask_file", "source_file"}
    written = [f"{k}_{f}" for k in tractogram_keys(tractography) for f in ("tck", "tdi")] if tractography else []
    outputs = set(run_wf.get_node("outputnode").inputs.copyable_trait_names())
    assert outputs == {*NATIVE_DERIVATIVES, *SR_DERIVATIVES, *written, *(["summary_file"] if written else [])}
    # Embedded: its outputs feed a node of the user's pipeline; the graph flattens.
    user = pe.Workflow(name="user_pipeline", base_dir=str(tmp_path / "work"))
    sink = pe.Node(niu.IdentityInterface(fields=["fa"]), name="my_sink")
    user.connect([(run_wf, sink, [("outputnode.sr_fa_file", "fa")])])
    names = {node.fullname for node in user._create_flat_graph().nodes()}
    inside = ("dti_wf.fit_dti", "sr_wf.super_resolve", "noise_corr")
    assert {f"user_pipeline.my_run_wf.{name}" for name in inside} <= names
    desc = run_wf.visit_desc()
    assert "DIPY's `mppca`" in desc and "@tanno2017" in desc and ("tractography" in desc) == bool(tractography)


@pytest.mark.parametrize("trained", [{"denoise": "dipy", "degibbs": True}, None], ids=["dipy-degibbs", "old-card"])
def test_run_wf_preprocesses_as_the_model_was_trained(trained, tmp_path):
    """Left out, denoise/degibbs follow the (first) model's card, as the app's defaults do; a card
    without training.preprocessing is a model trained on series as acquired."""
    from iqt_pipe.models import IQTNet, save_model
    from iqt_pipe.workflows import init_dwi_run_wf

    card = {"training": {"preprocessing": trained}} if trained else {}
    save_model(IQTNet("espcn", 2), tmp_path / "m" / "model.safetensors", card)
    run_wf = init_dwi_run_wf(model=[str(tmp_path / "m")], output_dir=str(tmp_path / "out"))
    preproc = {n.name for n in run_wf.get_node("dwi_preproc_wf")._graph.nodes()}
    steps = ("denoise_mppca" in preproc, "remove_gibbs" in preproc)
    assert steps == ((True, True) if trained else (False, False)), preproc


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dwi_wf")
    root = write_bids_dataset(tmp / "ds", preset="tiny", seed=SEED, snr=SNR)
    run = root / "sub-01" / "dwi" / "sub-01_dwi"
    truth = root / TRUTH_DIR / "sub-01" / "dwi" / "sub-01"
    sigma = json.loads(truth.with_name("sub-01_desc-brain_mask.json").read_text())["PhantomParameters"]["NoiseSigma"]
    clean = make_phantom("tiny", seed=SEED, snr=None)  # the same head without noise
    inputs = dict(dwi_file=f"{run}.nii.gz", bval_file=f"{run}.bval", bvec_file=f"{run}.bvec")
    return dict(tmp=tmp, inputs=inputs, clean=clean, sigma=sigma, truth_mask=f"{truth}_desc-brain_mask.nii.gz")


def _rmse(a, b, mask):
    return float(np.sqrt(np.mean((a[mask] - b[mask]) ** 2)))


@pytest.fixture(scope="module")
def dipy_run(phantom):
    """DIPY denoising (no Gibbs step: the phantom has no ringing) then the DTI fit."""
    outer = pe.Workflow(name="dipy_chain", base_dir=str(phantom["tmp"] / "work"))
    preproc, dti = init_dwi_preproc_wf(denoise="dipy", degibbs=False), init_dti_wf()
    outer.connect(
        [(preproc, dti, [(f"outputnode.{f}", f"inputnode.{f}") for f in ("dwi_file", "bval_file", "bvec_file")])]
    )
    for field, value in phantom["inputs"].items():
        setattr(preproc.inputs.inputnode, field, value)
    nodes = {node.name: node for node in outer.run(plugin="Linear").nodes()}
    return nodes["denoise_mppca"].result.outputs, nodes["fit_dti"].result.outputs, outer


def test_dipy_denoising_and_dti_on_noisy_phantom(phantom, dipy_run):
    denoised, dti, outer = dipy_run
    clean, brain = phantom["clean"], phantom["clean"].mask
    noisy, affine, _ = load_nifti(phantom["inputs"]["dwi_file"])

    # Same grid and affine as the input, for every output.
    out, out_affine, _ = load_nifti(denoised.out_file)
    assert out.shape == noisy.shape
    for path in (denoised.out_file, denoised.noise_file, dti.tensor_file, dti.fa_file, dti.mask_file):
        img = nb.load(path)
        assert img.shape[:3] == noisy.shape[:3], path
        np.testing.assert_allclose(img.affine, affine, atol=1e-6)

    # MP-PCA removes most of the noise: measured RMSE 72.4 → 23.1 in the brain (ratio 0.32).
    before, after = _rmse(noisy, clean.dwi, brain), _rmse(out, clean.dwi, brain)
    assert after < 0.45 * before, (before, after)
    # Its sigma map matches the phantom's Gaussian sigma (measured median 68.5 vs 72.5: −6 %).
    sigma_map = load_nifti(denoised.noise_file)[0]
    assert abs(np.median(sigma_map[brain]) / phantom["sigma"] - 1) < 0.3

    # The DTI workflow's FA is the FA of its tensor file; denoising halves the FA error
    # against the truth (measured 0.077 → 0.039 in the brain).
    tensors = load_nifti(dti.tensor_file)[0]
    fa = load_nifti(dti.fa_file)[0]
    np.testing.assert_allclose(fa, scalar_maps(tensors)["fa"], atol=1e-5)
    fa_noisy = scalar_maps(fit_dti(noisy, affine, clean.gtab).tensors)["fa"]
    assert _rmse(fa, clean.fa, brain) < 0.7 * _rmse(fa_noisy, clean.fa, brain)
    # median_otsu's mask covers the phantom's brain.
    mask = load_nifti(dti.mask_file)[0] > 0
    assert 2 * np.sum(mask & brain) / (mask.sum() + brain.sum()) > 0.8
    desc = outer.get_node("dwi_preproc_wf").__desc__ + outer.get_node("dti_wf").__desc__
    assert "DIPY's `mppca`" in desc and "Gibbs" not in desc and "@tanno2017" in desc


def test_dti_wf_keeps_a_given_mask(phantom, dipy_run, tmp_path):
    nodes = _run(init_dti_wf(), tmp_path, mask_file=phantom["truth_mask"], **phantom["inputs"])
    mask = load_nifti(nodes["fit_dti"].result.outputs.mask_file)[0] > 0
    np.testing.assert_array_equal(mask, phantom["clean"].mask)
    assert not np.array_equal(load_nifti(dipy_run[1].mask_file)[0] > 0, mask)  # median_otsu's differs


@pytest.mark.mrtrix
def test_mrtrix_denoising_agrees_with_dipy(mrtrix, phantom, dipy_run, tmp_path):
    # The whole MRtrix3 chain runs (dwidenoise → mrdegibbs); the denoiser's output is compared.
    nodes = _run(init_dwi_preproc_wf(denoise="mrtrix", degibbs=True), tmp_path, **phantom["inputs"])
    out = nodes["dwidenoise"].result.outputs
    brain, clean = phantom["clean"].mask, phantom["clean"].dwi
    mr, mr_affine, _ = load_nifti(out.out_file)
    dipy_out = load_nifti(dipy_run[0].out_file)[0]
    affine = load_nifti(phantom["inputs"]["dwi_file"])[1]
    for path in (out.out_file, out.noise, nodes["mrdegibbs"].result.outputs.out_file):
        assert nb.load(path).shape[:3] == mr.shape[:3], path
        np.testing.assert_allclose(nb.load(path).affine, affine, atol=1e-4)
    # Measured: RMSE against the clean signal 28.1 (DIPY 23.1, noisy 72.4); the two differ
    # by 2.6 % of the signal's RMS; sigma medians 70.0 and 68.5.
    assert _rmse(mr, clean, brain) < 0.5 * _rmse(load_nifti(phantom["inputs"]["dwi_file"])[0], clean, brain)
    assert _rmse(mr, dipy_out, brain) < 0.05 * np.sqrt(np.mean(clean[brain] ** 2))
    sigma_mr, sigma_dipy = load_nifti(out.noise)[0], load_nifti(dipy_run[0].noise_file)[0]
    assert abs(np.median(sigma_mr[brain]) / np.median(sigma_dipy[brain]) - 1) < 0.15


def _ringing_series(n=32, nz=3, n_vol=3, up=4):
    """Disks whose in-plane k-space was truncated (Gibbs ringing), and their ringing-free
    box averages; ``flat`` marks voxels ≥ 3 voxels from an edge."""
    fine = (np.arange(n * up) + 0.5) / up - n / 2
    x, y = np.meshgrid(fine, fine, indexing="ij")
    c = n * up // 2
    ringing, reference, flat = [], [], []
    for v in range(n_vol):
        disk = np.where(x**2 + y**2 < (7 + 2.3 * v) ** 2, 1000.0, 100.0)
        k = np.fft.fftshift(np.fft.fft2(disk))[c - n // 2 : c + n // 2, c - n // 2 : c + n // 2]
        ringing.append(np.fft.ifft2(np.fft.ifftshift(k)).real / up**2)
        reference.append(disk.reshape(n, up, n, up).mean(axis=(1, 3)))
        edge = (reference[-1] > 100.0) & (reference[-1] < 1000.0)
        flat.append(~ndimage.binary_dilation(edge, iterations=2))

    def stack(a):
        return np.repeat(np.stack(a, axis=-1)[:, :, None, :], nz, axis=2)

    return stack(ringing).astype(np.float32), stack(reference), stack(flat)


@pytest.mark.parametrize("tool", ["dipy", pytest.param("mrtrix", marks=pytest.mark.mrtrix)])
def test_gibbs_removal_reduces_ringing(monkeypatch, request, tmp_path, tool):
    if tool == "mrtrix":
        request.getfixturevalue("mrtrix")
    monkeypatch.setattr(dwi_workflows, "mrtrix_available", lambda: tool == "mrtrix")
    ringing, reference, flat = _ringing_series()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-30.0, -20.0, 10.0]
    dwi = save_nifti(ringing, affine, tmp_path / "ring_dwi.nii.gz")
    (tmp_path / "ring_dwi.bval").write_text("0 1000 1000\n")
    (tmp_path / "ring_dwi.bvec").write_text("0 1 0\n0 0 1\n0 0 0\n")
    nodes = _run(init_dwi_preproc_wf(denoise="none", degibbs=True), tmp_path / "work",
                 dwi_file=str(dwi), bval_file=str(tmp_path / "ring_dwi.bval"),
                 bvec_file=str(tmp_path / "ring_dwi.bvec"))  # fmt:skip
    node = nodes["mrdegibbs" if tool == "mrtrix" else "remove_gibbs"]
    unringed, out_affine, _ = load_nifti(node.result.outputs.out_file)
    np.testing.assert_allclose(out_affine, affine, atol=1e-5)
    # Measured ringing away from the edges: 15.7 → 2.4 (DIPY), 3.2 (MRtrix3).
    before, after = _rmse(ringing, reference, flat), _rmse(unringed, reference, flat)
    assert after < 0.33 * before, (before, after)


def test_dipy_steps_on_several_processes_are_identical(phantom):
    """MP-PCA split into overlapping slabs (one per process, each with an equal share of the
    mask) and Gibbs removal slice by slice on two processes give the one-process result exactly."""
    from iqt_pipe.dmri.preproc import _mppca_parts, denoise_mppca, remove_gibbs

    dwi, _, _ = load_nifti(phantom["inputs"]["dwi_file"])
    mask = load_nifti(phantom["truth_mask"])[0] > 0
    parts = _mppca_parts(mask, 2, 2)
    assert len(parts) == 2 and parts[0][0] == 0 and parts[0][1] == parts[1][0] and parts[1][1] == dwi.shape[0]
    assert parts[0][2:] == (0, 4) and parts[1][2:] == (4, 0)
    with np.errstate(invalid="ignore"):  # DIPY's 0/0 in mask voxels no patch centre reaches
        one, sigma_one = denoise_mppca(dwi, mask)
        two, sigma_two = denoise_mppca(dwi, mask, processes=2)
    np.testing.assert_array_equal(two, one)
    np.testing.assert_array_equal(sigma_two, sigma_one)
    assert _mppca_parts(mask, 2, 20) == [(0, dwi.shape[0], 0, 0)]  # slabs too thin: one process
    np.testing.assert_array_equal(remove_gibbs(dwi[..., :3], processes=2), remove_gibbs(dwi[..., :3]))


def test_mppca_agrees_with_dipy(phantom):
    """Our batched MP-PCA is DIPY's ``mppca``, to float32 rounding: on the noisy phantom in its
    brain mask dilated by 2 voxels (as the noise-correlation check denoises), the same voxels
    left 0/0 and the same values, denoised series and noise map. Measured: none of the values
    differ by more than 1e-4 of DIPY's; a threshold on the eigenvalues without its square, or
    the noise variance of one component fewer, moves 40–50 % of them by more."""
    from dipy.denoise.localpca import mppca

    from iqt_pipe.dmri.preproc import denoise_mppca

    dwi, _, _ = load_nifti(phantom["inputs"]["dwi_file"])
    region = ndimage.binary_dilation(load_nifti(phantom["truth_mask"])[0] > 0, iterations=2)
    middle = dwi.shape[2] // 2  # and one slice: DIPY's patches are then flat (5 × 5 × 1)
    for series, where in ((dwi, region), (dwi[:, :, middle : middle + 1], region[:, :, middle : middle + 1])):
        with np.errstate(invalid="ignore", divide="ignore"):
            ours = denoise_mppca(series, where)
            dipys = mppca(series.astype(np.float32), mask=where, return_sigma=True, suppress_warning=True)
        for mine, theirs in zip(ours, dipys):
            assert mine.dtype == np.float32 and mine.shape == theirs.shape
            np.testing.assert_array_equal(np.isnan(mine), np.isnan(theirs))
            assert np.isnan(mine).sum() < 0.02 * mine.size  # mask voxels no patch centre reaches
            np.testing.assert_allclose(
                np.nan_to_num(mine), np.nan_to_num(theirs), rtol=1e-4, atol=1e-4 * np.nanmax(theirs)
            )
    with pytest.raises(ValueError, match="smaller than MP-PCA's"):  # as DIPY refuses it
        denoise_mppca(dwi[:, :, :3], region[:, :, :3])


def test_noise_correlation_tells_interpolated_noise_from_white(phantom, tmp_path):
    """The node behind the participant level's correlated-noise warning, on the noisy phantom
    (white noise: ≈ 0 on every axis) and on its twin whose noise is filtered along i by
    [1/2, 1, 1/2], as a scanner's interpolation does (neighbour correlation 2/3 there, as
    ds-realdwi's Canon scans; 0 elsewhere). The MP-PCA residual, a part of the noise,
    reads it lower (measured 0.51), but above the warning's 0.4."""
    from iqt_pipe.interfaces.preproc import NoiseCorrelation
    from iqt_pipe.io import InputError

    noisy, affine, _ = load_nifti(phantom["inputs"]["dwi_file"])
    noise = noisy - phantom["clean"].dwi
    smoothed = phantom["clean"].dwi + (noise + (np.roll(noise, 1, axis=0) + np.roll(noise, -1, axis=0)) / 2) / 1.5**0.5
    interpolated = dict(phantom["inputs"], dwi_file=str(save_nifti(smoothed, affine, tmp_path / "interp.nii.gz")))
    guards = {"NumericalGuards": {"NonFinite": 0}}
    for inputs, low, high in ((phantom["inputs"], -0.05, 0.05), (interpolated, 0.45, 2 / 3)):
        node = NoiseCorrelation(**inputs, mask_file=phantom["truth_mask"], metadata=guards)
        out = node.run(cwd=str(tmp_path)).outputs
        i, j, k = out.correlation  # measured: white −0.02, −0.02, −0.02; interpolated 0.51, −0.04, −0.04
        assert low < i < high and max(abs(j), abs(k)) < 0.06, out.correlation
        two = NoiseCorrelation(**inputs, mask_file=phantom["truth_mask"], nprocs=2).run(cwd=str(tmp_path))
        assert two.outputs.correlation == out.correlation  # MP-PCA on two processes: identical
        field = out.metadata["NoiseNeighbourCorrelation"]
        assert out.metadata["NumericalGuards"] == guards["NumericalGuards"]  # extended, not replaced
        np.testing.assert_allclose(field["Values"], out.correlation, atol=1e-4)
        assert "voxel axes i, j, k" in field["Description"]
    small = str(save_nifti(np.ones(noisy.shape[:2] + (3,), np.uint8), affine, tmp_path / "small.nii.gz"))
    with pytest.raises(InputError, match="small.nii.gz: mask grid .* differs from the DWI grid"):
        NoiseCorrelation(**phantom["inputs"], mask_file=small).run(cwd=str(tmp_path))
