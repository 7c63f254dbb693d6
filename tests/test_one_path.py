"""What users run is what is measured: ``iqt-pipe … participant`` on a degraded series writes
the super-resolved tensors that ``iqt-eval`` scores for the same series (one path through
:mod:`iqt_pipe.dmri.prepare`), over the whole brain with its rim; the model card's preprocessing and
training domain reach the app's defaults, sidecars and warnings."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
import torch

from iqt_pipe.bids import find_dwi_runs
from iqt_pipe.dmri import dti
from iqt_pipe.dmri.gradients import write_gradients
from iqt_pipe.dmri.prepare import (
    NONE,
    Preprocessing,
    domain_problems,
    fit_series,
    preprocess_series,
    series_domain,
    training_domain,
)
from iqt_pipe.evaluation import metrics
from iqt_pipe.evaluation import protocol as ev
from iqt_pipe.io import save_nifti
from iqt_pipe.models import IQTNet, load_model, save_model
from iqt_pipe.qc import SELF_CALIBRATION_RANGE


def write_lr_dataset(case: ev.Case, root: Path) -> Path:
    """The LR series of an evaluation case as a one-run BIDS dataset: what a user with a scan of
    that resolution would give the app."""
    (root / "sub-lr" / "dwi").mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "LR", "BIDSVersion": "1.9.0"}))
    stem = root / "sub-lr" / "dwi" / "sub-lr_dwi"
    save_nifti(case.lr_dwi, case.lr_affine, f"{stem}.nii.gz")
    write_gradients(case.gtab, f"{stem}.bval", f"{stem}.bvec")
    return root


def run_app(bids: Path, out: Path, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "iqt_pipe.cli.run",
            str(bids),
            str(out),
            "participant",
            "-w",
            str(out.parent / "work"),
            "--skip-bids-validation",
            "--nprocs",
            "2",
            "--omp-nthreads",
            "2",
            *map(str, args),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def app_tensors(out: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """The app's super-resolved mean tensor in the voxel frame of its grid, its brain mask and sidecar."""
    stem = out / "sub-lr" / "dwi" / "sub-lr_res-hi_"
    img = nb.load(f"{stem}model-tensor_param-tensor_dwimap.nii.gz")
    world = np.asarray(img.dataobj, dtype=np.float32)
    mask = np.asarray(nb.load(f"{stem}desc-brain_mask.nii.gz").dataobj) > 0
    sidecar = json.loads(Path(f"{stem}model-tensor_param-tensor_dwimap.json").read_text())
    return dti.tensors_world_to_voxel(world, img.affine), mask, sidecar


def app_map(out: Path, param: str, desc: str = "") -> np.ndarray:
    """One of the app's super-resolved scalar maps (``param-fa``, ``param-md``, ``desc-sd``, …)."""
    (path,) = (out / "sub-lr" / "dwi").glob(f"*_res-hi_*param-{param}_{desc}dwimap.nii.gz")
    return np.asarray(nb.load(path).dataobj)


def assert_same_prediction(app: np.ndarray, library: np.ndarray) -> None:
    """Equal up to float rounding; bfloat16 convolutions (``--precision auto`` on CPUs with AMX)
    round differently with the thread count, so single voxels may differ by ~1e-3 of the
    largest component, while a difference of path (a step, a mask, statistics) moves ~1e-2."""
    scale = np.abs(library).max()
    np.testing.assert_allclose(app, library, atol=2e-3 * scale)
    assert np.sqrt(np.mean((app - library) ** 2)) < 2e-5 * scale


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from iqt_pipe.sims.dataset import write_bids_dataset

    tmp = tmp_path_factory.mktemp("onepath")
    root = write_bids_dataset(tmp / "ds", n_subjects=1, preset="tiny", seed=3)
    torch.manual_seed(0)
    # Trained (as far as its card says) on finer scans than the tiny phantom's 13 mm LR input.
    domain = {"lr_voxel_size_mm": [3.5, 8.4], "bvalue": [928, 2000], "directions": [12, 40]}
    save_model(
        IQTNet("hetero-var2", 2),
        tmp / "model" / "model.safetensors",
        {"target": "residual-cubic", "training": {"domain": domain}, "calibration": {"diagonal_correlation": 0.4}},
    )
    return tmp, find_dwi_runs(root)[0]


@pytest.mark.slow
def test_the_app_writes_what_iqt_eval_scores(phantom):
    """The same LR series through ``iqt-pipe … participant`` (defaults: the card's preprocessing,
    8 MC samples, seed 0) and through ``iqt-eval``'s prediction give the same super-resolved
    tensors, brain mask, MD sd (the card's diagonal correlation and the run's self-calibration
    applied by both) and scores;
    both cover the HR scan's whole brain mask, rim included."""
    tmp, run = phantom
    case = ev.prepare_case(run, mode="raw", noise_floor=False)
    proc = run_app(write_lr_dataset(case, tmp / "lr"), tmp / "out", "--model", tmp / "model")
    assert "denoise none, Gibbs removal off (as the model was trained)" in proc.stdout
    assert "NOT as the model" not in proc.stdout and "Preprocessing" not in proc.stderr
    tensors, mask, sidecar = app_tensors(tmp / "out")

    model, card = load_model(tmp / "model")
    pred = ev.predict(ev.Method("model", models=[(model, card, None)]), case, mc_samples=8, seed=0)
    assert_same_prediction(tensors, pred.mean)
    np.testing.assert_array_equal(mask, pred.mask)
    # The FA and MD maps the app writes (of the mean tensor) are those iqt-eval scores.
    for param, desc, expected in (("fa", "", pred.fa_mean), ("md", "", pred.md_mean), ("md", "desc-sd_", pred.md_sd)):
        assert_same_prediction(app_map(tmp / "out", param, desc), expected)
    assert sidecar["DiagonalCorrelation"] == pred.info["diagonal_correlation"] == 0.4
    # Both self-calibrated on the series degraded once more, by the same scale.
    assert sidecar["SelfCalibration"] == pytest.approx(pred.info["self_calibration"], rel=1e-4)
    ratio = sidecar["SelfCalibration"]["ErrorSdRatio"]
    assert ratio > 0
    # The untrained model is far from calibrated: the end of the run says so, when it is.
    warned = "warning: sub-lr: on this scan degraded once more the model's RMS error was" in proc.stderr
    assert warned == (not SELF_CALIBRATION_RANGE[0] <= ratio <= SELF_CALIBRATION_RANGE[1]), (ratio, proc.stderr)
    assert pred.predicted[case.hr_mask].all()  # the rim of the HR scan's own mask too
    ours, theirs = ev.score(case, tensors), ev.score(case, pred)
    for region in ("interior", "exterior", "brain"):
        assert ours["tensor_rmse"][region] == pytest.approx(theirs["tensor_rmse"][region], rel=1e-3)
    fa_ref, md_ref = case.reference_scalars
    for param, ref in (("fa", fa_ref), ("md", md_ref)):
        written = metrics.rmse(app_map(tmp / "out", param), ref, case.hr_mask)
        assert theirs[f"{param}_rmse"]["brain"] * (ev.UNIT if param == "md" else 1) == pytest.approx(written, rel=1e-3)
    assert theirs["predicted_fraction"] == 1.0
    assert sidecar["Preprocessing"] == {
        "Denoise": "none",
        "GibbsRemoval": False,
        "MatchesModel": True,
        "ModelTrainedWith": {"Denoise": "none", "GibbsRemoval": False},
    }
    # Outside the card's domain: the sidecar field, one warning line, an alert in the report.
    assert sidecar["ModelDomain"]["Inside"] is False and sidecar["ModelDomain"]["Run"]["directions"] == 30
    problem = sidecar["ModelDomain"]["Problems"][0]
    assert problem.startswith("voxel size 13×13×13 mm outside the training inputs' 3.5–8.4 mm")
    assert f"warning: sub-lr: outside the model's training domain ({problem}" in proc.stderr
    assert "outside the model&#x27;s training domain" in (tmp / "out" / "sub-lr.html").read_text()


def test_iqt_eval_prepares_the_lr_series_as_the_card_says(phantom):
    """A model trained on Gibbs-corrected series sees the LR series Gibbs-corrected, fitted and
    masked as the app would make it; a model of series as acquired sees the LR fit itself."""
    _, run = phantom
    case = ev.prepare_case(run, mode="raw", noise_floor=False)
    tensors, brain, _ = case.network_input(NONE)
    assert tensors is case.lr_tensors and brain is case.lr_mask
    degibbs = Preprocessing("none", True)
    fit, mask = fit_series(preprocess_series(case.lr_dwi, degibbs), case.lr_affine, case.gtab)
    tensors, brain, _ = case.network_input(degibbs)
    np.testing.assert_array_equal(tensors, fit.tensors)
    np.testing.assert_array_equal(brain, mask)
    assert not np.array_equal(tensors, case.lr_tensors)
    assert case.network_input(Preprocessing("dipy", True)) is not case.network_input(degibbs)


def test_preprocessing_of_a_card():
    assert Preprocessing.of_model({}) == NONE  # cards from before the field: series as acquired
    card = {"training": {"preprocessing": {"denoise": "dipy", "degibbs": True}}}
    assert Preprocessing.of_model(card) == Preprocessing("dipy", True)
    assert Preprocessing("mrtrix", True).same_steps(Preprocessing("dipy", True))
    assert not Preprocessing("none", True).same_steps(NONE)
    with pytest.raises(ValueError, match="denoise must be one of"):
        Preprocessing("fsl")


def test_domain_of_validity():
    """The card's domain spans the training runs' LR inputs; a run outside it (beyond 10 % in
    voxel size, 20 % in b-value, or another number of directions) is named, one fact each."""
    runs = [
        {"voxel_size_mm": [1.75, 1.75, 2.5], "bvalue": 1000.0, "directions": 32},
        {"voxel_size_mm": [3.5, 3.5, 4.2], "bvalue": 929.75, "directions": 16},
    ]
    domain = training_domain(runs, 2)
    assert domain == {"lr_voxel_size_mm": [3.5, 8.4], "bvalue": [930, 1000], "directions": [16, 32]}
    inside = {"voxel_size_mm": [4.0, 4.0, 4.0], "bvalue": 1000.0, "directions": 20}
    assert domain_problems(domain, inside) == [] and domain_problems(None, inside) == []
    assert domain_problems(domain, {**inside, "voxel_size_mm": [3.3, 3.3, 3.3]}) == []  # within 10 %
    hcp = {"voxel_size_mm": [1.25] * 3, "bvalue": 3000.0, "directions": 90}
    problems = domain_problems(domain, hcp)
    assert len(problems) == 3 and "1.25×1.25×1.25 mm outside the training inputs' 3.5–8.4 mm" in problems[0]
    assert "b = 3000" in problems[1] and "90 directions outside the training runs' 16–32" in problems[2]
    gtab = ev.GradientTable(
        np.array([0, 1000, 1000, 1000, 1000, 1000, 1000, 2000.0]),
        np.vstack([[0, 0, 0], np.eye(3), np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1]]) / 2**0.5, [[1, 0, 0]]]),
    )
    run = series_domain(np.diag([2.0, 2, 2, 1]), gtab)
    assert run == {"voxel_size_mm": [2.0, 2.0, 2.0], "bvalue": 1000.0, "directions": 6}  # the DTI shell


def test_scanner_vendor_in_the_domain(tmp_path):
    """The vendor comes from the run's sidecar (named by any of its files); the card lists the
    training runs' vendors, and a run from another vendor is outside the domain; an older card
    gets them from its training runs' sidecars where those are at hand."""
    from iqt_pipe.dmri.prepare import card_domain, series_manufacturer

    (tmp_path / "sub-01_dwi.json").write_text(json.dumps({"Manufacturer": " Siemens "}))
    (tmp_path / "sub-02_dwi.json").write_text("{not json")
    assert series_manufacturer(tmp_path / "sub-01_dwi.nii.gz") == "Siemens"
    assert series_manufacturer(tmp_path / "sub-01_dwi.bval") == "Siemens"
    assert series_manufacturer(tmp_path / "sub-02_dwi.nii.gz") is None
    assert series_manufacturer(tmp_path / "sub-03_dwi.nii.gz") is None
    runs = [
        {"voxel_size_mm": [2.0] * 3, "bvalue": 1000.0, "directions": 30, "manufacturer": m}
        for m in ("Siemens", "Philips", "Siemens")
    ]
    domain = training_domain(runs + [{"voxel_size_mm": [2.0] * 3, "bvalue": 1000.0, "directions": 30}], 2)
    assert domain["manufacturers"] == ["Philips", "Siemens"]
    run = {"voxel_size_mm": [4.0] * 3, "bvalue": 1000.0, "directions": 30}
    assert domain_problems(domain, {**run, "manufacturer": "SIEMENS"}) == []
    assert domain_problems(domain, run) == []  # vendor unknown: not held against the run
    assert domain_problems(domain, {**run, "manufacturer": "GE"}) == [
        "scanner vendor GE not among the training runs' (Philips, Siemens)"
    ]
    old = {
        "training": {
            "domain": {k: v for k, v in domain.items() if k != "manufacturers"},
            "dwi_runs": [{"dwi": str(tmp_path / "sub-01_dwi.nii.gz")}, {"dwi": "elsewhere/sub-09_dwi.nii.gz"}],
        }
    }
    assert card_domain(old)["manufacturers"] == ["Siemens"]
    assert card_domain({"training": {"domain": domain}}) == domain and card_domain({}) is None
    # A card from before training.domain: the domain of its training runs, read from disk.
    gtab = ev.GradientTable(
        np.array([0.0] + [1000.0] * 6),
        np.vstack([[0, 0, 0], np.eye(3), np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1]]) / 2**0.5]),
    )
    stem = tmp_path / "sub-01_dwi"
    save_nifti(np.ones((4, 4, 4, 7), np.float32), np.diag([2.0, 2.0, 2.5, 1.0]), f"{stem}.nii.gz")
    write_gradients(gtab, f"{stem}.bval", f"{stem}.bvec")
    runs = [{"dwi": f"{stem}.nii.gz", "bval": f"{stem}.bval", "bvec": f"{stem}.bvec"}]
    assert card_domain({"upsample": 2, "training": {"dwi_runs": runs}}) == {
        "lr_voxel_size_mm": [4.0, 5.0],
        "bvalue": [1000, 1000],
        "directions": [6, 6],
        "manufacturers": ["Siemens"],
    }
    gone = [{**runs[0], "dwi": str(tmp_path / "moved.nii.gz")}]
    assert card_domain({"upsample": 2, "training": {"dwi_runs": gone}}) is None


@pytest.mark.slow
def test_training_records_preprocessing_and_domain(tmp_path):
    """``iqt-train --degibbs`` removes the ringing of each HR series before its LR series is
    made: another patch library, recorded in the card with the training runs' domain; the app
    then removes Gibbs ringing by default and says so."""
    from iqt_pipe.cli import train as train_cli
    from iqt_pipe.sims.dataset import write_bids_dataset

    root = write_bids_dataset(tmp_path / "ds", n_subjects=1, preset="tiny", seed=5)
    base = [
        str(root),
        "--patches-per-subject",
        "12",
        "--variant",
        "espcn",
        "--epochs",
        "1",
        "--nthreads",
        "1",
        "-q",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    try:
        assert train_cli.main([*base, "-o", str(tmp_path / "plain")]) == 0
        assert train_cli.main([*base, "-o", str(tmp_path / "degibbs"), "--degibbs"]) == 0
    finally:
        torch.set_num_threads(1)
    plain, degibbs = (load_model(tmp_path / name)[1]["training"] for name in ("plain", "degibbs"))
    assert plain["preprocessing"] == NONE.to_card() and degibbs["preprocessing"] == {"denoise": "none", "degibbs": True}
    assert plain["patch_library"] != degibbs["patch_library"]
    assert len(list((tmp_path / "cache").glob("patches-*.npz"))) == 2
    run = find_dwi_runs(root)[0]
    zooms = nb.affines.voxel_sizes(nb.load(run.dwi).affine)
    assert degibbs["domain"]["lr_voxel_size_mm"] == [round(2 * zooms.min(), 3), round(2 * zooms.max(), 3)]
    from iqt_pipe.cli.parser import parse_args
    from iqt_pipe.config import RunConfig

    args = parse_args([str(root), str(tmp_path / "out"), "participant", "--model", str(tmp_path / "degibbs")])
    assert (args.denoise, args.degibbs) == ("none", True) and RunConfig.from_args(args).preprocessing_warning() is None


@pytest.mark.slow
@pytest.mark.realdata
def test_the_app_beats_cubic_spline_on_a_degraded_real_run(realdwi, tmp_path):
    """A real scan (UIH, 3.5×3.5×4.2 mm, the quickest) degraded 2× by block means, through
    ``iqt-pipe … participant`` with every default (the bundled model, its preprocessing):
    closer to the scan's own HR fit than cubic B-spline inside the brain, at its rim (the HR
    scan's mask, all of it predicted) and in FA. Measured: 0.61 / 0.84 / 0.70 (library path, 2
    Monte-Carlo samples, the bundled 7³ model: 10 epochs, 2 on the corrected fit, 2 with every
    block-grid alignment); a regression of the app's path above 0.95 × cubic fails here."""
    run = find_dwi_runs(realdwi, ["umr01"])[0]
    case = ev.prepare_case(run, mode="raw", noise_floor=False)
    run_app(write_lr_dataset(case, tmp_path / "lr"), tmp_path / "out")
    tensors, _, sidecar = app_tensors(tmp_path / "out")
    scores = {"app": ev.score(case, tensors), "cubic": ev.score(case, ev.predict(ev.Method("cubic", "cubic"), case))}
    ev.add_ratios(scores)
    ratios = scores["app"]["tensor_rmse_ratio"]
    assert ratios["interior"] < 0.95 and ratios["exterior"] < 0.97, ratios
    fa = metrics.rmse(app_map(tmp_path / "out", "fa"), case.reference_scalars[0], case.hr_mask)  # the FA map written
    assert fa < 0.85 * scores["cubic"]["fa_rmse"]["brain"], fa / scores["cubic"]["fa_rmse"]["brain"]
    assert np.all(np.any(tensors[case.hr_mask] != 0, axis=-1))  # the whole brain, rim included
    assert sidecar["ModelDomain"]["Inside"] is True and sidecar["Preprocessing"]["MatchesModel"]


@pytest.mark.realdata
def test_gibbs_removal_blurs_a_series_without_ringing(realdwi):
    """Why the bundled model's card (and so the app's default) has no Gibbs-ringing removal: a
    block-mean LR series has no ringing to remove, and DIPY's correction then only blurs it.
    Cubic B-spline of the corrected series' tensors is farther from the HR fit than that of the
    series as it is (measured 1.09 × inside the brain on this UIH run; 1.09–1.19 on the Trio,
    Prisma and Achieva runs, a tie on the Toshiba one)."""
    from iqt_pipe.sr.baselines import interpolate_tensors

    run = find_dwi_runs(realdwi, ["umr01"])[0]
    case = ev.prepare_case(run, mode="raw", noise_floor=False)
    rmse = {}
    for name, steps in (("raw", NONE), ("degibbs", Preprocessing("none", True))):
        tensors, _, _ = case.network_input(steps)
        rmse[name] = ev.score(case, interpolate_tensors(tensors, 2, "cubic"))["tensor_rmse"]["interior"]
    assert rmse["degibbs"] > 1.05 * rmse["raw"], rmse


@pytest.mark.slow
def test_the_apps_ensemble_with_mirrors_is_what_iqt_eval_scores(phantom):
    """``--model A B --symmetries mirrors``: the inverse-variance ensemble of two models, each
    run over the 8 mirrors, is what ``iqt-eval`` predicts for the same series and settings. The
    second takes the fit's S0 as an input too: the app feeds it the native fit's, as ``iqt-eval``
    the LR series' fit's."""
    tmp, run = phantom
    torch.manual_seed(1)
    save_model(
        IQTNet("hetero-var2", 2, inputs=("tensor", "s0")),
        tmp / "model2" / "model.safetensors",
        {"target": "residual-cubic"},
    )
    case = ev.prepare_case(run, mode="raw", noise_floor=False)
    out = tmp / "out-ensemble"
    proc = run_app(
        write_lr_dataset(case, tmp / "lr-ensemble"),
        out,
        "--model",
        tmp / "model",
        tmp / "model2",
        "--symmetries",
        "mirrors",
    )
    assert "test-time mirrors (8)" in proc.stdout and "averaged with" in proc.stdout
    tensors, mask, sidecar = app_tensors(out)

    members = [(*load_model(tmp / name), None) for name in ("model", "model2")]
    pred = ev.predict(ev.Method("ensemble", models=members, symmetries="mirrors"), case, mc_samples=8, seed=0)
    assert_same_prediction(tensors, pred.mean)
    np.testing.assert_array_equal(mask, pred.mask)
    assert sidecar["TestTimeSymmetries"] == 8 and len(sidecar["Ensemble"]) == 2
    assert sidecar["Ensemble"][1]["WeightsSHA256"] == members[1][1]["weights"]["sha256"]
    # The parameter sd holds the members' and the mirrors' disagreement: as the library's.
    stem = out / "sub-lr" / "dwi" / "sub-lr_res-hi_"
    sd_par = np.asarray(nb.load(f"{stem}model-tensor_param-tensor_desc-parametersd_dwimap.nii.gz").dataobj)
    want = ev.frobenius_sd(pred.var_parameter)
    assert (sd_par[mask] > 0).all()
    np.testing.assert_allclose(sd_par[mask], want[mask], rtol=1e-3, atol=1e-3 * want[mask].max())
