"""Self-calibration (:mod:`iqt_pipe.sr.selfcal`): the run's series degraded once more, the
model's RMS error / sd there, and the variances scaled by it, the same in the app's node and
in ``iqt-eval``."""

import numpy as np
import pytest
from helpers import tiny_dataset_and_model

from iqt_pipe.dmri.degrade import crop_to_multiple, degrade_dwi
from iqt_pipe.dmri.dwi import load_dwi
from iqt_pipe.dmri.prepare import fit_series
from iqt_pipe.evaluation import metrics
from iqt_pipe.models import load_model
from iqt_pipe.sr import selfcal
from iqt_pipe.sr.inference import frobenius_sd, predict_ensemble
from iqt_pipe.sr.options import DEFAULT_PRECISION, DEFAULT_SYMMETRIES, SYMMETRIES

SETTINGS = dict(mc_samples=2, scalar_samples=4, seed=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The tiny phantom's series, its fit and brain mask (on the series' grid) and an untrained model."""
    tmp = tmp_path_factory.mktemp("selfcal")
    root, model_dir = tiny_dataset_and_model(tmp, seed=4, snr=30)
    stem = root / "sub-01" / "dwi" / "sub-01_dwi"
    series = load_dwi(f"{stem}.nii.gz", f"{stem}.bval", f"{stem}.bvec")
    fit, brain = fit_series(series.data, series.affine, series.gtab)
    return series, fit, brain, model_dir, stem


def _model(model_dir, variance_scale=1.0):
    model, _ = load_model(model_dir)
    model.variance_scale = variance_scale
    return model


def test_the_ratio_is_the_error_over_the_sd_one_scale_coarser(run):
    """The ratio is RMS Frobenius error / RMS predicted Frobenius sd of the coarser series'
    prediction against the run's own fit, in its brain: computed again here from the parts."""
    series, fit, brain, model_dir, _ = run
    model = _model(model_dir)
    got = selfcal.measure([model], series.data, series.gtab, series.affine, fit.tensors, brain, **SETTINGS)

    coarse, coarse_affine = degrade_dwi(crop_to_multiple(series.data, 2), series.affine, 2)
    coarse_fit, coarse_brain = fit_series(coarse, coarse_affine, series.gtab)
    pred = predict_ensemble([model], (coarse_fit.tensors, coarse_brain, coarse_fit.s0), coarse_affine, **SETTINGS)
    m = crop_to_multiple(brain, 2)
    err = metrics.frobenius(pred.mean[m] - crop_to_multiple(fit.tensors, 2)[m])
    want = np.sqrt(np.mean(err**2) / np.mean(frobenius_sd(pred.var_total[m].astype(np.float64)) ** 2))
    assert got.ratio == pytest.approx(want, rel=1e-6)
    assert got.voxels == m.sum() > selfcal.MIN_VOXELS


def test_the_result_does_not_depend_on_the_cards_calibration(run):
    """A model whose card scales its variances by 4 (sd doubled) measures half the ratio, and the
    self-calibrated variances, FA and MD sd are those of the unscaled model: the run, not the
    card, decides."""
    series, fit, brain, model_dir, _ = run
    inputs = (fit.tensors, brain, fit.s0)
    raw = selfcal.measure([_model(model_dir)], series.data, series.gtab, series.affine, *inputs[:2], **SETTINGS)
    # Two card scales whose ratios stay inside the clipping range: 1 and 1.5 after the card's scale.
    preds = []
    for target in (1.0, 1.5):
        model = _model(model_dir, (raw.ratio / target) ** 2)
        c = selfcal.measure([model], series.data, series.gtab, series.affine, *inputs[:2], **SETTINGS)
        assert c.ratio == pytest.approx(target, rel=1e-4) and c.variance_scale == pytest.approx(target**2, rel=2e-4)
        assert c.note is None
        preds.append(
            selfcal.predict_self_calibrated([model], inputs, series.affine, (series.data, series.gtab), **SETTINGS)
        )
    a, b = preds
    np.testing.assert_allclose(a.var_intrinsic, b.var_intrinsic, rtol=1e-3, atol=1e-14)
    np.testing.assert_allclose(a.var_parameter, b.var_parameter, rtol=1e-3, atol=1e-14)
    np.testing.assert_allclose(a.md_sd, b.md_sd, rtol=1e-3, atol=1e-10)
    np.testing.assert_allclose(a.mean, b.mean)
    assert a.info["self_calibration"]["VarianceScale"] == pytest.approx(1.0, rel=2e-4)
    assert b.info["self_calibration"]["ErrorSdRatio"] == pytest.approx(1.5, rel=1e-4)


def test_apply_scales_variances_and_sd(run):
    series, fit, brain, model_dir, _ = run
    pred = predict_ensemble([_model(model_dir)], (fit.tensors, brain, fit.s0), series.affine, **SETTINGS)
    before = {k: getattr(pred, k).copy() for k in ("var_intrinsic", "var_parameter", "fa_sd", "md_sd", "mean")}
    selfcal.apply(pred, selfcal.SelfCalibration(1.5, 2.25, 1000))
    for key in ("var_intrinsic", "var_parameter"):
        np.testing.assert_allclose(getattr(pred, key), 2.25 * before[key], rtol=1e-6)
    for key in ("fa_sd", "md_sd"):
        np.testing.assert_allclose(getattr(pred, key), 1.5 * before[key], rtol=1e-6)
    np.testing.assert_array_equal(pred.mean, before["mean"])
    assert pred.info["self_calibration"] == {"ErrorSdRatio": 1.5, "VarianceScale": 2.25, "Voxels": 1000}


def test_a_ratio_out_of_range_is_clipped_and_said(run):
    series, fit, brain, model_dir, _ = run
    raw = selfcal.measure([_model(model_dir)], series.data, series.gtab, series.affine, fit.tensors, brain, **SETTINGS)
    model = _model(model_dir, (raw.ratio / 5) ** 2)  # sd a fifth of the errors
    c = selfcal.measure([model], series.data, series.gtab, series.affine, fit.tensors, brain, **SETTINGS)
    assert c.ratio == pytest.approx(5, rel=1e-4) and c.variance_scale == pytest.approx(4.0)
    assert "error / sd ratio 5.00 outside 0.5-2: clipped" == c.note


def test_too_small_a_brain_is_not_measured(run):
    series, fit, brain, model_dir, _ = run
    small = np.zeros_like(brain)
    small[10:14, 10:14, 10:14] = True
    c = selfcal.measure([_model(model_dir)], series.data, series.gtab, series.affine, fit.tensors, small)
    assert c.ratio is None and c.variance_scale == 1.0 and c.voxels == 64
    assert c.note == f"fewer than {selfcal.MIN_VOXELS} brain voxels: not measured"
    pred = predict_ensemble([_model(model_dir)], (fit.tensors, small, fit.s0), series.affine, **SETTINGS)
    var = pred.var_intrinsic.copy()
    selfcal.apply(pred, c)
    np.testing.assert_array_equal(pred.var_intrinsic, var)
    assert pred.info["self_calibration"]["ErrorSdRatio"] is None


def test_the_node_self_calibrates_with_the_series_and_refuses_another_grid(run, tmp_path):
    """``SuperResolve`` with the series the tensors were fitted from writes the self-calibrated
    sd of the core function, records it in its metadata, and names the file of a series on
    another grid."""
    from iqt_pipe.interfaces import FitDTI, SuperResolve
    from iqt_pipe.io import InputError, load_nifti, save_nifti
    from iqt_pipe.sr.superres import load_tensor_image, super_resolve_tensors

    series, _, _, model_dir, stem = run
    files = dict(dwi_file=f"{stem}.nii.gz", bval_file=f"{stem}.bval", bvec_file=f"{stem}.bvec")
    (tmp_path / "fit").mkdir()
    fit = FitDTI(**files).run(cwd=str(tmp_path / "fit")).outputs
    node = SuperResolve(model=str(model_dir), tensor_file=fit.tensor_file, mask_file=fit.mask_file, **files)
    node.inputs.mc_samples, node.inputs.scalar_samples, node.inputs.seed = 2, 4, 1
    (tmp_path / "sr").mkdir()
    out = node.run(cwd=str(tmp_path / "sr")).outputs
    world, mask, affine = load_tensor_image(fit.tensor_file, fit.mask_file)
    want = super_resolve_tensors(
        world,
        mask,
        affine,
        _model(model_dir),
        series=(series.data, series.gtab),
        precision=DEFAULT_PRECISION,
        symmetries=SYMMETRIES[DEFAULT_SYMMETRIES],
        **SETTINGS,
    )
    assert out.metadata["SelfCalibration"] == pytest.approx(want.info["self_calibration"])
    assert out.metadata["SelfCalibration"]["ErrorSdRatio"] > 0
    np.testing.assert_allclose(load_nifti(out.sd_total_file)[0], want.sd_frobenius, rtol=1e-4, atol=1e-12)

    node.inputs.self_calibration = False
    (tmp_path / "off").mkdir()
    assert "SelfCalibration" not in node.run(cwd=str(tmp_path / "off")).outputs.metadata

    other = save_nifti(series.data[:-2], series.affine, tmp_path / "other_dwi.nii.gz")
    node.inputs.self_calibration, node.inputs.dwi_file = True, str(other)
    with pytest.raises(InputError, match="other_dwi.nii.gz: grid .* differs from the tensors'"):
        node.run(cwd=str(tmp_path))


def test_the_report_says_what_the_self_calibration_did():
    from iqt_pipe.reports.build import _self_calibration_note

    done = _self_calibration_note({"ErrorSdRatio": 0.8, "VarianceScale": 0.64, "Voxels": 5000})
    assert 'class="iqt-note"' in done and "0.80× its predicted sd (5000 brain voxels)" in done
    assert "scaled by 0.64." in done
    clipped = _self_calibration_note(
        {
            "ErrorSdRatio": 3.0,
            "VarianceScale": 4.0,
            "Voxels": 5000,
            "Note": "error / sd ratio 3.00 outside 0.5-2: clipped",
        }
    )
    assert 'class="iqt-alert"' in clipped and "(error / sd ratio 3.00 outside 0.5-2: clipped)" in clipped
    skipped = _self_calibration_note({"ErrorSdRatio": None, "VarianceScale": 1.0, "Voxels": 10, "Note": "too small"})
    assert 'class="iqt-alert"' in skipped and "too small; the model's own calibration is kept" in skipped.replace(
        "&#x27;", "'"
    )


def test_a_run_far_from_its_calibration_is_warned_about():
    from iqt_pipe.qc import SELF_CALIBRATION_RANGE, self_calibration_warning
    from iqt_pipe.reports.build import _self_calibration_note

    low, high = SELF_CALIBRATION_RANGE
    for ratio in (low, 1.0, high, None):
        assert self_calibration_warning({"SelfCalibration": {"ErrorSdRatio": ratio}}, "sub-01_dwi") is None
    assert self_calibration_warning({}, "sub-01_dwi") is None  # run with --no-self-calibration
    line = self_calibration_warning({"SelfCalibration": {"ErrorSdRatio": 1.8}}, "sub-01_dwi")
    assert line.startswith("sub-01_dwi: on this scan degraded once more the model's RMS error was 1.80× its")
    assert "(outside 0.67–1.5): the scan differs from the training scans" in line and "\n" not in line
    note = _self_calibration_note({"ErrorSdRatio": 1.8, "VarianceScale": 3.24, "Voxels": 5000}, warned=True)
    assert 'class="iqt-alert"' in note and "A ratio outside 0.67–1.5: the scan differs" in note
