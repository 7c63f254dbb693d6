"""iqt-eval: the evaluation protocol on phantoms with known truth, and the command end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from iqt_pipe.bids import find_dwi_runs
from iqt_pipe.cli import eval as eval_cli
from iqt_pipe.dmri.dti import tensors_world_to_voxel
from iqt_pipe.evaluation import crossval, metrics
from iqt_pipe.evaluation import protocol as ev
from iqt_pipe.io import load_nifti
from iqt_pipe.sims.dataset import TRUTH_DIR, write_bids_dataset


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_bids_dataset(tmp_path_factory.mktemp("eval") / "ds", n_subjects=2, preset="tiny", seed=11, snr=25)


@pytest.fixture(scope="module")
def runs(phantom):
    return find_dwi_runs(phantom)


def _truth_voxel(phantom, run, r=2):
    """The phantom's true tensors in the voxel frame, cropped like the HR reference."""
    d, affine, _ = load_nifti(
        phantom
        / TRUTH_DIR
        / f"sub-{run.subject}"
        / "dwi"
        / f"sub-{run.subject}_model-tensor_param-tensor_dwimap.nii.gz"
    )
    d = tensors_world_to_voxel(d, affine)
    return d[tuple(slice(0, s - s % r) for s in d.shape[:3])]


def test_raw_case_noise_floor_predicts_the_reference_error(phantom, runs):
    """The floor (WLS delta method with an MP-PCA σ) is the RMS error of the HR reference
    against the phantom's truth."""
    case = ev.prepare_case(runs[0], mode="raw")
    truth = _truth_voxel(phantom, runs[0])
    assert case.reference.shape == truth.shape
    floor = ev.reference_scores(case)["noise_floor"]
    for region in ("interior", "brain"):
        m = getattr(case, region) if region != "brain" else case.hr_mask
        actual = metrics.rmse(case.reference, truth, m) / ev.UNIT
        assert floor[region] == pytest.approx(actual, rel=0.3), region
    two = ev.prepare_case(runs[0], mode="raw", processes=2)  # MP-PCA on two processes: the same floor
    assert two.info == case.info and np.array_equal(two.floor_var, case.floor_var)
    # Interior and exterior partition the HR mask; the LR grid is half the HR one.
    assert np.array_equal(case.interior | case.exterior, case.hr_mask)
    assert case.lr_tensors.shape[:3] == tuple(s // 2 for s in case.reference.shape[:3])
    # The app's prediction region (the LR brain dilated by the receptive field) holds the whole
    # HR scan's brain mask, rim included; the LR mask's blocks alone do not.
    from iqt_pipe.sr.inference import expand_mask, prediction_region

    assert expand_mask(prediction_region(case.lr_mask, 2), 2)[case.hr_mask].all()
    assert not expand_mask(case.lr_mask, 2)[case.hr_mask].all()


def test_known_truth_mode_scores_against_the_clean_field(runs):
    case = ev.prepare_case(runs[0], mode="known-truth", snr=25)
    assert case.noisy_reference is not None and case.floor_var is None
    # The noisy reference is off the truth by about its estimated floor.
    m = case.hr_mask
    noisy_err = metrics.rmse(case.noisy_reference, case.reference, m)
    floor = float(np.sqrt(np.mean(case.noisy_floor_var[m])))
    assert floor == pytest.approx(noisy_err, rel=0.3)
    cubic = ev.score(case, ev.predict(ev.interpolation_methods(["cubic"])[0], case))
    true, raw = cubic["tensor_rmse"]["interior"], cubic["tensor_rmse_vs_noisy_reference"]["interior"]
    corrected = cubic["tensor_rmse_vs_noisy_reference_corrected"]["interior"]
    assert corrected < raw
    assert abs(corrected - true) < abs(raw - true) or abs(corrected - true) < 0.15 * true


def test_lesion_is_written_where_its_weight_says(runs):
    raw = ev.prepare_case(runs[0], mode="raw", noise_floor=False)
    les = ev.prepare_case(runs[0], mode="lesion")
    core = les.lesion >= 0.999
    assert core.sum() >= 5  # 6.5 mm voxels: a 7 mm core
    outside = les.hr_mask & (les.lesion == 0)
    # Outside the lesion the reference is the same fit; inside, MD is the lesion's.
    assert np.allclose(les.reference[outside], raw.reference[outside])
    md = les.reference[core][:, [0, 3, 5]].mean(axis=1)
    assert np.median(md) == pytest.approx(np.mean(ev.LESION_EVALS), rel=0.15)
    # The lesion AUC of each uncertainty map: here only the parameter sd rises in the lesion
    # (AUC 1), the intrinsic sd is noise (AUC ≈ 0.5); the total follows the larger part.
    from iqt_pipe.sr.inference import Prediction

    rng = np.random.default_rng(0)
    shape, zeros = les.reference.shape, np.zeros(les.hr_mask.shape)
    intrinsic = np.full(shape, 1e-9) * rng.uniform(1, 2, shape[:3])[..., None]
    parameter = np.full(shape, 1e-10) + 1e-8 * (les.lesion >= 0.5)[..., None]
    pred = Prediction(
        mean=les.reference,
        var_intrinsic=intrinsic,
        var_parameter=parameter,
        fa_mean=zeros,
        fa_sd=zeros,
        md_mean=zeros,
        md_sd=zeros,
        mask=les.hr_mask,
        affine=np.eye(4),
    )
    lesion = ev.uncertainty_scores(les, pred, zeros, zeros, None)["lesion"]
    assert lesion["auc_parameter"] == 1.0 and lesion["auc"] == 1.0
    assert lesion["auc_intrinsic"] == pytest.approx(0.5, abs=0.1)


def test_baselines_order_and_ratios(runs):
    case = ev.prepare_case(runs[1], mode="raw")
    scores = {
        m.name: ev.score(case, ev.predict(m, case)) for m in ev.interpolation_methods(["nearest", "trilinear", "cubic"])
    }
    ev.add_ratios(scores)
    assert scores["cubic"]["tensor_rmse_ratio"]["interior"] == pytest.approx(1.0)
    assert scores["cubic"]["tensor_rmse"]["interior"] < scores["nearest"]["tensor_rmse"]["interior"]
    assert scores["cubic"]["tensor_rmse"]["interior"] < scores["trilinear"]["tensor_rmse"]["interior"]
    assert scores["trilinear"]["tensor_rmse_ratio"]["interior"] == pytest.approx(
        scores["trilinear"]["tensor_rmse"]["interior"] / scores["cubic"]["tensor_rmse"]["interior"]
    )


def test_cli_cross_validation_end_to_end(phantom, tmp_path, capsys):
    out = tmp_path / "eval"
    code = eval_cli.main(
        [
            str(phantom),
            "-o",
            str(out),
            "--cross-validate",
            "2",
            "--epochs",
            "1",
            "--patches-per-subject",
            "24",
            "--mode",
            "raw",
            "known-truth",
            "lesion",
            "--mc-samples",
            "2",
            "--loss-mask",
            "brain",
            "-q",
        ]
    )
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert [f["test"] for f in res["folds"]] == [["01"], ["02"]]
    assert len(res["records"]) == 2 * 3
    for rec in res["records"]:
        methods = rec["methods"]
        assert set(methods) == {"nearest", "trilinear", "cubic", "hetero-var2"}
        assert methods["cubic"]["tensor_rmse_ratio"]["interior"] == pytest.approx(1.0)
        u = methods["hetero-var2"]["uncertainty"]
        assert set(u["coverage"]["brain"]) == {"0.5", "0.8", "0.95"}
        assert 0 <= u["coverage"]["brain"]["0.95"] <= 1
        assert np.isfinite(u["risky"]["threshold"])  # chosen on the other fold's subject
        assert 0 <= u["risky"]["recall"] <= 1
        assert ("lesion" in u) == (rec["mode"] == "lesion")
        sd = u["sd_rms"]  # per part, over the brain
        assert (
            set(sd) == {"intrinsic", "parameter", "total"} and sd["total"] >= max(sd["intrinsic"], sd["parameter"]) > 0
        )
        assert methods["hetero-var2"]["domain"]["inside"] and "domain" not in methods["cubic"]
    summary = res["summary"]["raw"]["hetero-var2"]
    assert summary["domain"]["runs_outside"] == 0 and summary["domain"]["parameter_sd_outside"] is None
    assert summary["runs"] == 2 and summary["goals"]["[SR path] interior tensor RMSE ≤ 0.87 × cubic"]["runs"] == 2
    # Cross-calibration: each subject gets the other subject's variance scale.
    raw = {rec["run"]: rec["methods"]["hetero-var2"]["uncertainty"] for rec in res["records"] if rec["mode"] == "raw"}
    loso = {row["run"]: row for row in summary["calibration_loso"]}
    assert loso["sub-01"]["scale"] == pytest.approx(raw["sub-02"]["variance_scale_95"])
    assert loso["sub-02"]["scale"] == pytest.approx(raw["sub-01"]["variance_scale_95"])
    own = metrics.coverage_at_scale(raw["sub-01"]["sd_ratio_quantiles"], raw["sub-01"]["variance_scale_95"])
    assert own == pytest.approx(0.95, abs=0.01)  # its own scale would calibrate it exactly
    assert summary["values"]["coverage0.95_loso.brain"]["min"] == pytest.approx(
        min(r["coverage0.95"] for r in loso.values())
    )
    text = (out / "results.md").read_text()
    assert "## Mode: known-truth" in text and "Noise correction against known truth" in text
    # The phantom's noise is independent between voxels (≈ 0; the denoised signal itself
    # would correlate near 1), and each scan is described once.
    for rec in res["records"]:
        assert np.all(np.abs(rec["info"]["noise_neighbour_correlation"]) < 0.1), rec["info"]
    assert "## The scans" in text and text.count("| sub-01 | 6.50 × 6.50 × 6.50 |") == 1
    assert "cov. 95 %, scale from other subjects" in text
    assert "- hetero-var2:\n  - [SR path] interior tensor RMSE ≤ 0.87 × cubic: " in text
    assert "## Uncertainty and the training domain" in text
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert "calibration.png" in figures
    assert "sub-01_mode-lesion_maps.png" in figures and "sub-02_mode-raw_hetero-var2_error-vs-sd.png" in figures
    # iqt-train's recipe options reach every fold's training, and the results record them.
    card = json.loads((out / "cv" / "fold-1" / "model.json").read_text())
    assert card["training"]["loss_mask"] == "brain" and card["training"]["patches"]["per_subject"] == 24
    assert res["settings"]["recipe"]["loss_mask"] == "brain" and res["settings"]["recipe"]["epochs"] == 1
    assert res["settings"]["recipe"]["grid_shifts"] is False and res["settings"]["recipe"]["register_volumes"] is False
    assert res["settings"]["register_volumes"] is False
    # scripts/bundle_model.py pools one results.json per fold (as a maintainer runs them) into
    # the summary that one cross-validated run gives.
    folds = []
    for k in (1, 2):
        part = {"records": [], "thresholds": {f"fold{k}": res["thresholds"][f"fold-{k}"]["hetero-var2"]}}
        for rec in res["records"]:
            if rec["fold"] == k:
                rec = {**rec, "methods": {f"fold{k}": rec["methods"]["hetero-var2"], "cubic": rec["methods"]["cubic"]}}
                part["records"].append(rec)
        (tmp_path / f"fold{k}.json").write_text(json.dumps(part))
        folds.append((tmp_path / f"fold{k}.json", f"fold{k}"))
    spec = importlib.util.spec_from_file_location(
        "bundle_model", Path(__file__).parents[1] / "scripts" / "bundle_model.py"
    )
    bundle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bundle)
    # … and writes the training data relative to each dataset, with the dataset's name.
    dwi = str(phantom / "sub-01" / "dwi" / "sub-01_dwi.nii.gz")
    trained = {
        "training": {
            "datasets": [str(phantom)],
            "dwi_runs": [
                {
                    "dwi": dwi,
                    "bval": dwi.replace(".nii.gz", ".bval"),
                    "bvec": dwi.replace(".nii.gz", ".bvec"),
                    "dataset": str(phantom),
                }
            ],
        }
    }
    relative = bundle._relative(trained)["training"]
    assert relative["datasets"] == ["ds"] and relative["dwi_runs"][0]["dwi"] == "ds/sub-01/dwi/sub-01_dwi.nii.gz"
    assert relative["dwi_runs"][0]["dataset"] == "ds" and relative["dwi_runs"][0]["bvec"].startswith("ds/sub-01/")
    name = json.loads((phantom / "dataset_description.json").read_text())["Name"]
    assert relative["dataset_names"] == {"ds": name} and name.startswith("iqt-phantom synthetic DWI (preset tiny")
    pooled = bundle._evaluation(folds, "iqt-eval …")
    assert pooled["protocol"] == bundle.PROTOCOL
    assert bundle._evaluation(folds, None, "fold models: …")["protocol"] == "fold models: …"
    assert pooled["runs"] == ["sub-01", "sub-02"] and [f["runs"] for f in pooled["folds"]] == [["sub-01"], ["sub-02"]]
    assert pooled["folds"][1]["risky_threshold_md_sd"] == res["thresholds"]["fold-2"]["hetero-var2"]
    for mode in ("raw", "known-truth", "lesion"):
        want = res["summary"][mode]["hetero-var2"]["values"]
        got = pooled["summary"][mode]
        assert "tensor_rmse_ratio.interior" in got and ("lesion.auc" in got) == (mode == "lesion")
        assert {"coverage0.95.brain", "md_coverage0.95.brain", "error_sd_ratio.brain"} <= set(got)  # not dropped
        assert ("lesion.auc_parameter" in got) == ("lesion.auc_intrinsic" in got) == (mode == "lesion")
        for key, stat in got.items():
            assert stat == pytest.approx(want[key]), (mode, key)


def _fold_epochs(out):
    return [
        [json.loads(line)["epoch"] for line in (out / "cv" / f"fold-{k}" / "metrics.jsonl").read_text().splitlines()]
        for k in (1, 2)
    ]


@pytest.mark.slow
def test_cli_cross_validation_resumes_after_a_stop(phantom, tmp_path, capsys):
    out = tmp_path / "eval"
    args = [
        str(phantom),
        "-o",
        str(out),
        "--cross-validate",
        "2",
        "--patches-per-subject",
        "24",
        "--mode",
        "raw",
        "--mc-samples",
        "2",
        "--no-figures",
        "-q",
    ]
    assert eval_cli.main([*args, "--epochs", "1"]) == 0
    first = (out / "results.json").read_text()
    capsys.readouterr()
    # Run again without --resume: refused before any data is read, nothing rewritten.
    assert eval_cli.main([*args, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"{out / 'cv' / 'fold-1'}: holds a trained model of an earlier cross-validation; add --resume" in err
    assert (out / "results.json").read_text() == first
    # Same recipe: every fold's model is reused (no epoch trained again), same scores.
    assert eval_cli.main([*args, "--epochs", "1", "--resume"]) == 0
    assert capsys.readouterr().out.count("(resuming from a trained model)") == 2
    assert _fold_epochs(out) == [[1], [1]]

    def scores(text):
        return [rec["methods"]["hetero-var2"]["tensor_rmse"] for rec in json.loads(text)["records"]]

    assert scores((out / "results.json").read_text()) == scores(first)
    # More epochs, as after a stop in the middle of a longer run: each fold trains on from epoch 1.
    assert eval_cli.main([*args, "--epochs", "2", "--resume"]) == 0
    assert _fold_epochs(out) == [[1, 2], [1, 2]]
    card = json.loads((out / "cv" / "fold-2" / "model.json").read_text())
    assert card["training"]["epochs"] == 2
    assert json.loads((out / "results.json").read_text())["settings"]["recipe"]["epochs"] == 2
    # A different recipe cannot continue these folds.
    assert eval_cli.main([*args, "--epochs", "2", "--resume", "--lr", "0.01"]) == 2
    assert "trained with lr = 0.001, this run asks for 0.01" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "missing.safetensors"], "missing.safetensors: model file not found"),
        (["--cross-validate", "1"], "--cross-validate takes 'loso' or a number of folds ≥ 2"),
        (["--cross-validate", "5"], "--cross-validate 5: only 2 subject(s)"),
        (["--cross-validate", "2", "--axis-swap", "--no-augment"], "--axis-swap extends the augmentation"),
        (["--cross-validate", "2", "--kernels", "3", "3"], "one width fewer than kernels"),
        (["--participant-label", "99"], "99"),
        (["--resume"], "--resume continues a --cross-validate run"),
    ],
)
def test_cli_errors_are_one_line(phantom, tmp_path, capsys, extra, message):
    try:
        code = eval_cli.main([str(phantom), "-o", str(tmp_path / "o"), "-q", *extra])
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "results.json").exists()


@pytest.mark.realdata
def test_bundled_model_beats_cubic_on_a_real_run(realdwi):
    """The default model loads and, on a real scan (UIH, 3.5×3.5×4.2 mm: the coarsest, so the
    quickest), is closer to the HR reference than cubic B-spline interpolation of the same LR
    tensors inside the brain, at its edge and in FA. Measured with the 7³ model trained for 10
    epochs, fine-tuned 2 on the corrected fit and 2 more with every block-grid alignment: 0.61 /
    0.84 / 0.70 (before the grid shifts: 0.60 / 0.84 / 0.71; before the corrected fit: 0.62 /
    0.86 / 0.71; the 3-1-3 model before it: 0.78 / 0.90 / 0.75). Held out, the Canon and
    Toshiba runs seemed to tie with cubic spline while the reference had holes in the CSF;
    scored on the corrected fit they are at
    0.85–0.89 (see README, "Evaluation and the bundled model"). The UIH scan has no holes."""
    from iqt_pipe.models import load_model
    from iqt_pipe.models.files import bundled_model

    model, card = load_model(bundled_model(2))
    assert card["variant"] == "hetero-var2" and card["upsample"] == 2
    run = find_dwi_runs(realdwi, ["umr01"])[0]
    case = ev.prepare_case(run, mode="raw", noise_floor=False)
    methods = ev.interpolation_methods(["cubic"]) + [ev.Method("bundled", models=[(model, card, None)])]
    scores = {m.name: ev.score(case, ev.predict(m, case, mc_samples=2)) for m in methods}
    ev.add_ratios(scores)
    ratios = scores["bundled"]["tensor_rmse_ratio"]
    assert ratios["interior"] < 0.85 and ratios["exterior"] < 0.95, ratios
    assert scores["bundled"]["fa_rmse_ratio"]["brain"] < 0.8, scores["bundled"]["fa_rmse_ratio"]
    # Its MD intervals, with the card's diagonal error correlation: 0.940 of the MD errors in
    # the 95 % interval (0.945 before the grid shifts; 0.852 with the correlation left out, then).
    assert 0 < model.diagonal_correlation < 1
    md_coverage = scores["bundled"]["uncertainty"]["md_coverage"]["brain"]["0.95"]
    assert 0.90 <= md_coverage <= 0.98, md_coverage


@pytest.mark.slow
@pytest.mark.realdata
def test_noise_correlation_finds_the_interpolated_scan(realdwi):
    """The Toshiba scan, on which no model beats cubic spline, was interpolated along x by the
    scanner: its noise correlates between x neighbours (measured 0.65); the Prisma scan of
    the same 3 mm grid has nearly independent noise (0.09 / 0.11 / −0.03)."""
    corr = {}
    for label, name in (("galan02", "sub-galan02_run-1"), ("prisma01", "sub-prisma01_run-1")):
        run = next(r for r in find_dwi_runs(realdwi, [label]) if r.name == name)
        corr[label] = ev.prepare_case(run, mode="raw").info["noise_neighbour_correlation"]
    assert corr["galan02"][0] > 0.5 and abs(corr["galan02"][2]) < 0.1, corr
    assert max(abs(c) for c in corr["prisma01"]) < 0.2, corr


def test_goals_count_the_runs_that_meet_them():
    values = {
        "tensor_rmse_ratio.interior": [0.82, 0.86, 0.96],
        "coverage0.95.brain": [0.89, 0.95, float("nan")],  # a run without a value does not meet it
        "lesion.auc": [float("nan")] * 3,  # not scored in this mode: no goal
    }
    g = ev.goals(values)
    assert g["[SR path] interior tensor RMSE ≤ 0.87 × cubic"] == {"runs_met": 2, "runs": 3}
    assert g["[SR model] interior tensor RMSE ≤ 0.83 × cubic"] == {"runs_met": 1, "runs": 3}
    assert g["[SR model] interior tensor RMSE ≤ 0.95 × cubic"] == {"runs_met": 2, "runs": 3}
    assert g["[SR model] interior tensor RMSE ≤ 0.85 × cubic, mean over runs"] == {"met": False}  # mean 0.88
    assert g["[SR path] 95 % coverage in [0.88, 0.98]"] == {"runs_met": 2, "runs": 3}
    assert g["[SR model] 95 % coverage in [0.90, 0.98]"] == {"runs_met": 1, "runs": 3}
    assert not any("lesion" in k or "FA" in k for k in g)


def test_out_of_domain_summary():
    """Over runs: Spearman of the parameter (total) sd RMS against the error, and the means
    inside and outside the training domain."""

    def rec(run, inside, error, par):
        return {
            "run": run,
            "mode": "raw",
            "methods": {
                "m": {
                    "tensor_rmse": {"brain": error},
                    "tensor_rmse_ratio": {"brain": error / 2},
                    "uncertainty": {"sd_rms": {"parameter": par, "total": 2 * par}},
                    "domain": {"inside": inside, "problems": [] if inside else ["scanner vendor X …"]},
                }
            },
        }

    records = [rec("a", True, 1.0, 0.1), rec("b", True, 2.0, 0.2), rec("c", False, 3.0, 0.4), rec("d", False, 4.0, 0.3)]
    found = ev.out_of_domain(records)[("raw", "m")]
    assert found["runs_outside"] == 2 and found["spearman_parameter_sd_error"] == pytest.approx(0.8)
    assert found["parameter_sd_inside"] == pytest.approx(0.15) and found["parameter_sd_outside"] == pytest.approx(0.35)
    assert found["error_ratio_inside"] == pytest.approx(0.75) and found["error_ratio_outside"] == pytest.approx(1.75)
    assert found["total_sd_outside"] == pytest.approx(0.7)


def test_runs_per_subject_keeps_the_first_runs_of_each_subject():
    from types import SimpleNamespace

    runs = [
        SimpleNamespace(subject=s, name=n) for s, n in [("a", "a1"), ("b", "b1"), ("a", "a2"), ("a", "a3"), ("b", "b2")]
    ]
    assert [r.name for r in crossval.first_runs(runs, 2)] == ["a1", "b1", "a2", "b2"]
    assert [r.name for r in crossval.first_runs(runs, 1)] == ["a1", "b1"]
    assert crossval.first_runs(runs, None) == runs
    assert crossval.fold_subjects(["a", "b", "c"], "loso") == [["a"], ["b"], ["c"]]
    assert crossval.fold_subjects(["a", "b", "c", "d", "e"], 2) == [["a", "c", "e"], ["b", "d"]]
