"""Evaluation metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from iqt_pipe.evaluation import metrics


def test_region_masks_interior_definition():
    # LR mask: a 7³ cube in a 9³ volume; with a 5³ neighbourhood only its centre 3³ is interior.
    lr = np.zeros((9, 9, 9), bool)
    lr[1:8, 1:8, 1:8] = True
    hr = np.ones((18, 18, 18), bool)
    interior, exterior = metrics.region_masks(lr, hr, 2)
    expected_lr = np.zeros_like(lr)
    expected_lr[3:6, 3:6, 3:6] = True
    assert interior.sum() == 27 * 8
    assert np.array_equal(interior[::2, ::2, ::2], expected_lr)
    assert np.array_equal(interior[1::2, 1::2, 1::2], expected_lr)
    assert not np.any(interior & exterior) and np.array_equal(interior | exterior, hr)
    # The volume's edge counts as outside: a full LR mask's border voxels are not interior.
    interior_full, _ = metrics.region_masks(np.ones((9, 9, 9), bool), hr, 2)
    assert interior_full[::2, ::2, ::2].sum() == 5**3
    # Interior is limited to the HR mask.
    hr_half = hr.copy()
    hr_half[:9] = False
    interior_half, exterior_half = metrics.region_masks(lr, hr_half, 2)
    assert not interior_half[:9].any() and not exterior_half[:9].any()
    with pytest.raises(ValueError, match="not 2×"):
        metrics.region_masks(lr, hr[:-1], 2)


def test_rmse_split_and_noise_correction():
    ref = np.zeros((2, 2, 1, 6))
    pred = ref.copy()
    pred[0, 0, 0] = 1.0  # error 1 in all 6 components of one voxel
    pred[1, 1, 0, 0] = 2.0  # error 2 in one component of another
    mask_a = np.zeros((2, 2, 1), bool)
    mask_a[0, 0] = True
    mask_b = np.zeros((2, 2, 1), bool)
    mask_b[1, 1] = True
    assert metrics.rmse(pred, ref, mask_a) == pytest.approx(1.0)
    assert metrics.rmse(pred, ref, mask_b) == pytest.approx(math.sqrt(4 / 6))
    assert metrics.rmse(pred, ref, mask_a | mask_b) == pytest.approx(math.sqrt((6 + 4) / 12))
    assert math.isnan(metrics.rmse(pred, ref, np.zeros((2, 2, 1), bool)))
    assert metrics.noise_corrected_rmse(5.0, 3.0) == pytest.approx(4.0)
    assert metrics.noise_corrected_rmse(2.0, 3.0) == 0.0


def test_neighbour_correlation_of_independent_and_interpolated_noise():
    # Hand case: along x the pairs are (1, 2) and (3, 4) → perfectly correlated; along y the
    # pairs are (1, 3) and (2, 4) → also 1; a masked-out voxel removes its pairs.
    field = np.array([[[1.0], [3.0]], [[2.0], [4.0]]])  # (2, 2, 1)
    full = np.ones((2, 2, 1), bool)
    cx, cy, cz = metrics.neighbour_correlation(field, full)
    assert cx == pytest.approx(1.0) and cy == pytest.approx(1.0) and math.isnan(cz)
    rng = np.random.default_rng(0)
    white = rng.standard_normal((40, 40, 40, 4))
    mask = np.ones((40, 40, 40), bool)
    assert np.allclose(metrics.neighbour_correlation(white, mask), 0, atol=0.01)
    # A two-tap moving average along x (what 2× zero-filled interpolation approximates):
    # neighbours share one of two independent terms → correlation 1/2 along x only.
    smooth = (white[1:] + white[:-1]) / 2
    cx, cy, cz = metrics.neighbour_correlation(smooth, mask[1:])
    assert cx == pytest.approx(0.5, abs=0.02) and abs(cy) < 0.02 and abs(cz) < 0.02
    # Only pairs inside the mask count: correlated noise outside the mask is ignored.
    mixed = white.copy()
    mixed[20:] = smooth[19:]
    inside = np.zeros_like(mask)
    inside[:20] = True
    assert abs(metrics.neighbour_correlation(mixed, inside)[0]) < 0.02


def test_frobenius_counts_off_diagonals_twice():
    d = np.array([1.0, 1.0, 0, 0, 0, 0])  # D11 = 1, D12 = D21 = 1
    assert metrics.frobenius(d) == pytest.approx(math.sqrt(3))


def test_spearman_and_auc():
    x = np.array([1, 2, 3, 4, 5.0])
    assert metrics.spearman(x, x**3) == pytest.approx(1.0)
    assert metrics.spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(metrics.spearman(x, np.ones(5)))
    # AUC: 3 positives, 2 negatives; pairs (p > n): 0.9>0.1,0.9>0.5,0.4>0.1,0.5 ties 0.5 → 0.5
    scores = np.array([0.9, 0.4, 0.5, 0.1, 0.5])
    labels = np.array([1, 1, 1, 0, 0], bool)
    # pairs: (0.9,0.1)=1 (0.9,0.5)=1 (0.4,0.1)=1 (0.4,0.5)=0 (0.5,0.1)=1 (0.5,0.5)=0.5 → 4.5/6
    assert metrics.roc_auc(scores, labels) == pytest.approx(4.5 / 6)
    assert metrics.roc_auc(scores, ~labels) == pytest.approx(1.5 / 6)
    assert math.isnan(metrics.roc_auc(scores, np.ones(5, bool)))


def test_coverage_and_variance_scale():
    rng = np.random.default_rng(0)
    sd = rng.uniform(0.5, 2.0, 200_000)
    err = rng.standard_normal(sd.size) * sd
    cov = metrics.interval_coverage(err, sd)
    for p, c in cov.items():
        assert c == pytest.approx(p, abs=0.005)
    # Errors twice as large as predicted: the 95 % interval covers P(|Z| < 0.98) ≈ 0.673
    cov2 = metrics.interval_coverage(2 * err, sd, [0.95])
    assert cov2[0.95] == pytest.approx(stats.norm.cdf(1.96 / 2) * 2 - 1, abs=0.005)
    assert metrics.variance_scale(2 * err, sd) == pytest.approx(4.0, rel=0.03)
    levels, emp = metrics.calibration_curve(err, sd)
    assert levels[0] == pytest.approx(0.05) and levels[-1] == pytest.approx(0.95)
    assert np.allclose(emp, levels, atol=0.01)
    # Hand case: |err|/sd = 0.5, 1, 3 → within z(0.5)=0.674: 1 of 3; z(0.95)=1.96: 2 of 3
    hand = metrics.interval_coverage(np.array([0.5, -1.0, 3.0]), np.ones(3), [0.5, 0.95])
    assert hand == {0.5: pytest.approx(1 / 3), 0.95: pytest.approx(2 / 3)}


def test_coverage_at_another_variance_scale_from_stored_quantiles():
    rng = np.random.default_rng(1)
    sd = rng.uniform(0.5, 2.0, 100_000)
    err = 2 * rng.standard_normal(sd.size) * sd  # errors twice the predicted sd
    q = metrics.sd_ratio_quantiles(err, sd)
    assert q.shape == (401,) and np.all(np.diff(q) >= 0)
    assert metrics.coverage_at_scale(q, 1.0) == pytest.approx(
        metrics.interval_coverage(err, sd, [0.95])[0.95], abs=0.003
    )
    s = metrics.variance_scale(err, sd)  # ≈ 4: the scale that calibrates exactly
    assert metrics.coverage_at_scale(q, s) == pytest.approx(0.95, abs=0.003)
    assert metrics.coverage_at_scale(q, 1e6) == 1.0 and metrics.coverage_at_scale(q, 1e-12) == pytest.approx(
        0, abs=0.003
    )
    # Hand case: ratios 0, 1, 2 → quantiles 0 … 2; half-width 1.96·√s = 1 ⇒ s = (1/1.96)², coverage 1/2
    hand = metrics.sd_ratio_quantiles(np.array([0.0, 1.0, -2.0]), np.ones(3), n=3)
    assert hand.tolist() == [0.0, 1.0, 2.0]
    assert metrics.coverage_at_scale(hand, (1 / stats.norm.ppf(0.975)) ** 2) == pytest.approx(0.5)


def test_leave_one_group_out():
    values = [1.0, 3.0, 10.0, 20.0]
    assert metrics.leave_one_group_out(values, ["a", "a", "b", "c"]) == [15.0, 15.0, 3.0, 3.0]  # medians of others
    assert math.isnan(metrics.leave_one_group_out([1.0, 2.0], ["a", "a"])[0])


def test_detection_and_threshold():
    flagged = np.array([1, 1, 0, 0, 1], bool)
    truth = np.array([1, 0, 1, 0, 1], bool)
    d = metrics.detection(flagged, truth)
    assert (d["precision"], d["recall"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert d["f1"] == pytest.approx(2 / 3)
    scores = np.array([0.1, 0.2, 0.8, 0.9, 0.3])
    truth = np.array([0, 0, 1, 1, 0], bool)
    t = metrics.best_f1_threshold(scores, truth)
    assert 0.3 < t < 0.8
    assert metrics.detection(scores > t, truth)["f1"] == 1.0
    assert math.isnan(metrics.best_f1_threshold(scores, np.zeros(5, bool)))
    # Flagging everything is best: the threshold sits just below the lowest score.
    everything = metrics.best_f1_threshold(scores, np.ones(5, bool))
    assert everything < 0.1 and np.all(scores > everything)


def test_wls_variance_matches_monte_carlo():
    """The delta-method covariance of the WLS fit equals the spread of WLS fits of noisy
    signals (high SNR, where the delta method holds)."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    from iqt_pipe.dmri.dti import from_dipy_order
    from iqt_pipe.dmri.signal import dti_design

    rng = np.random.default_rng(1)
    dirs = rng.standard_normal((30, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    bvals = np.r_[np.zeros(3), np.full(30, 1000.0)]
    bvecs = np.r_[np.zeros((3, 3)), dirs]
    d6 = np.array([1.7e-3, 0.1e-3, 0.0, 0.4e-3, 0.05e-3, 0.35e-3])
    design = dti_design(bvals, bvecs)
    s0, sigma = 1000.0, 20.0
    clean = s0 * np.exp(design[:, :6] @ d6)
    noisy = clean + rng.standard_normal((4000, bvals.size)) * sigma
    fit = TensorModel(gradient_table(bvals, bvecs=bvecs), fit_method="WLS").fit(noisy)
    fitted = from_dipy_order(fit.lower_triangular())
    predicted = metrics.wls_tensor_variance(d6[None], np.array([s0]), np.array([sigma]), design)[0]
    assert np.allclose(predicted, fitted.var(axis=0), rtol=0.12)
    # Pure noise caps var(log S): a zero-signal voxel stays finite.
    capped = metrics.wls_tensor_variance(d6[None], np.array([1e-6]), np.array([sigma]), design)[0]
    assert np.all(np.isfinite(capped))
    assert np.all(np.isnan(metrics.wls_tensor_variance(d6[None], np.array([0.0]), np.array([sigma]), design)))
