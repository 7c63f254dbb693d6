"""Test-time adaptation (:mod:`iqt_pipe.sr.adapt`): the model fine-tuned on the run's own
coarser pair, on half of the grid, the self-calibration measured on the other half; the same
in the app's node and in ``iqt-eval``."""

import numpy as np
import pytest
import torch
from helpers import tiny_dataset_and_model

from iqt_pipe.dmri.degrade import crop_to_multiple, degrade_dwi, shift_grid
from iqt_pipe.dmri.dwi import load_dwi
from iqt_pipe.dmri.prepare import fit_series
from iqt_pipe.models import load_model
from iqt_pipe.sr import adapt, selfcal
from iqt_pipe.sr.options import DEFAULT_PRECISION, DEFAULT_SYMMETRIES, SYMMETRIES

SETTINGS = dict(mc_samples=2, scalar_samples=4, seed=1)
STEPS = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The tiny phantom's series, its fit and brain mask, and an untrained model's folder."""
    tmp = tmp_path_factory.mktemp("adapt")
    root, model_dir = tiny_dataset_and_model(tmp, seed=4, snr=30)
    stem = root / "sub-01" / "dwi" / "sub-01_dwi"
    series = load_dwi(f"{stem}.nii.gz", f"{stem}.bval", f"{stem}.bvec")
    fit, brain = fit_series(series.data, series.affine, series.gtab)
    return series, fit, brain, model_dir, stem


@pytest.fixture(scope="module")
def pairs(run):
    series, fit, brain, model_dir, _ = run
    model, _ = load_model(model_dir)
    return adapt.coarse_pairs(series.data, series.gtab, series.affine, fit.tensors, brain, model)


def test_the_held_out_half_is_a_checkerboard_of_cubes():
    held = adapt.held_out((2 * adapt.CUBE + 3, adapt.CUBE + 1, 5))
    c = adapt.CUBE
    assert not held[0, 0, 0] and not held[c - 1, c - 1, 4]
    assert held[c, 0, 0] and held[0, c, 0] and not held[c, c, 0] and not held[2 * c, 0, 0]
    assert held.mean() == pytest.approx(0.5, abs=0.15)


def test_the_pairs_are_the_coarser_series_at_every_grid_offset_and_never_train_on_the_held_out_half(run, pairs):
    """One pair per block-grid alignment; its input is the fit of the series block-averaged
    from that offset (standardised as the network sees it); the loss's voxels (the patches'
    brain) are the run's brain outside the held-out half, nowhere inside it."""
    series, fit, brain, _, _ = run
    assert [p.name for p in pairs] == [f"grid-{i}{j}{k}" for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    held = adapt.held_out(brain.shape)
    for p in pairs:
        offset = np.array([int(c) for c in p.name.removeprefix("grid-")])
        start = offset + 2 * p.origin
        box = tuple(slice(a, a + n) for a, n in zip(start, p.hr_mask.shape))
        assert not (p.hr_mask & held[box]).any()
        np.testing.assert_array_equal(p.hr_mask, (brain & ~held)[box])
    first = pairs[0]
    coarse, coarse_affine = degrade_dwi(crop_to_multiple(series.data, 2), series.affine, 2)
    coarse_fit, coarse_brain = fit_series(coarse, coarse_affine, series.gtab)
    assert coarse_brain[tuple((first.centres + first.origin).T)].all()
    np.testing.assert_allclose(first.mean, np.mean(coarse_fit.tensors[coarse_brain], axis=0), rtol=1e-3)
    last = pairs[-1]
    part, part_affine = shift_grid(series.data, series.affine, (1, 1, 1))
    shifted, shifted_brain = fit_series(*degrade_dwi(crop_to_multiple(part, 2), part_affine, 2), series.gtab)
    np.testing.assert_allclose(last.mean, np.mean(shifted.tensors[shifted_brain], axis=0), rtol=1e-3)


def test_adaptation_lowers_the_loss_keeps_the_dropout_rates_and_leaves_the_model_alone(run, pairs):
    _, _, _, model_dir, _ = run
    model, _ = load_model(model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned, record = adapt.adapt(model, pairs, STEPS, seed=3)
    again, _ = adapt.adapt(model, pairs, STEPS, seed=3)
    assert record.steps == STEPS and record.patches == sum(len(p) for p in pairs)
    assert record.loss[1] < record.loss[0]
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name  # the model itself is untouched
        tuned_value = tuned.state_dict()[name]
        if name.endswith("rho"):
            assert torch.equal(tuned_value, value), name
        assert torch.equal(tuned_value, again.state_dict()[name]), name  # a seed gives one result
    assert any(not torch.equal(tuned.state_dict()[n], v) for n, v in before.items() if n.endswith("weight"))
    meta = record.metadata()
    assert meta["Steps"] == STEPS and meta["LearningRate"] == adapt.LEARNING_RATE and len(meta["LossFirstLast"]) == 2

    unchanged, nothing = adapt.adapt(model, pairs, 0)
    assert unchanged is model and nothing.steps == 0


def test_predict_adapts_then_self_calibrates_on_the_held_out_half(run, pairs):
    """``predict_self_calibrated`` with ``adapt_steps`` predicts with the adapted model (the
    same as adapting by hand) and measures the self-calibration on the held-out half only."""
    series, fit, brain, model_dir, _ = run
    model, _ = load_model(model_dir)
    inputs = (fit.tensors, brain, fit.s0)
    got = selfcal.predict_self_calibrated(
        [model], inputs, series.affine, (series.data, series.gtab), adapt_steps=STEPS, **SETTINGS
    )
    tuned, record = adapt.adapt(model, pairs, STEPS, seed=SETTINGS["seed"])
    want = selfcal.predict_self_calibrated([tuned], inputs, series.affine, **SETTINGS)
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-5, atol=1e-12)
    assert got.info["adaptation"] == record.metadata()
    held = crop_to_multiple(brain & adapt.held_out(brain.shape), 2)
    assert got.info["self_calibration"]["Voxels"] == held.sum()
    plain = selfcal.predict_self_calibrated([model], inputs, series.affine, **SETTINGS)
    assert np.abs(got.mean - plain.mean).max() > 0
    off = selfcal.predict_self_calibrated(
        [model], inputs, series.affine, (series.data, series.gtab), self_calibrate=False, adapt_steps=STEPS, **SETTINGS
    )
    assert "self_calibration" not in off.info and off.info["adaptation"]["Steps"] == STEPS
    with pytest.raises(ValueError, match="adaptation needs the series"):
        selfcal.predict_self_calibrated([model], inputs, series.affine, adapt_steps=STEPS, **SETTINGS)


def test_the_node_adapts_as_the_core_function_and_needs_the_series(run, tmp_path):
    from iqt_pipe.interfaces import FitDTI, SuperResolve
    from iqt_pipe.io import InputError, load_nifti
    from iqt_pipe.sr.superres import load_tensor_image, super_resolve_tensors

    series, _, _, model_dir, stem = run
    files = dict(dwi_file=f"{stem}.nii.gz", bval_file=f"{stem}.bval", bvec_file=f"{stem}.bvec")
    (tmp_path / "fit").mkdir()
    fit = FitDTI(**files).run(cwd=str(tmp_path / "fit")).outputs
    node = SuperResolve(
        model=str(model_dir), tensor_file=fit.tensor_file, mask_file=fit.mask_file, adapt_steps=STEPS, **files
    )
    node.inputs.mc_samples, node.inputs.scalar_samples, node.inputs.seed = 2, 4, 1
    (tmp_path / "sr").mkdir()
    out = node.run(cwd=str(tmp_path / "sr")).outputs
    world, mask, affine = load_tensor_image(fit.tensor_file, fit.mask_file)
    model, _ = load_model(model_dir)
    want = super_resolve_tensors(
        world,
        mask,
        affine,
        model,
        series=(series.data, series.gtab),
        adapt_steps=STEPS,
        precision=DEFAULT_PRECISION,
        symmetries=SYMMETRIES[DEFAULT_SYMMETRIES],
        **SETTINGS,
    )
    assert out.metadata["Adaptation"] == want.info["adaptation"]
    assert out.metadata["SelfCalibration"] == pytest.approx(want.info["self_calibration"])
    np.testing.assert_allclose(load_nifti(out.md_file)[0], want.md_mean, rtol=1e-4, atol=1e-12)

    alone = SuperResolve(model=str(model_dir), tensor_file=fit.tensor_file, mask_file=fit.mask_file, adapt_steps=2)
    with pytest.raises(InputError, match="adaptation needs dwi_file"):
        alone.run(cwd=str(tmp_path))


def test_the_report_says_what_the_adaptation_did():
    from iqt_pipe.reports.build import _adaptation_note

    done = _adaptation_note({"Steps": 150, "Patches": 9000, "LossFirstLast": [0.1234, -0.05]})
    assert 'class="iqt-note"' in done and "fine-tuned for 150 steps" in done and "0.123 → -0.050" in done
    left = _adaptation_note({"Models": [{"Steps": 0, "Patches": 0, "Note": "nothing to learn from"}]})
    assert 'class="iqt-alert"' in left and "nothing to learn from." in left
