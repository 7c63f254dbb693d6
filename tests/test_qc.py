"""QC metrics on synthetic maps with known answers, robust group outliers, the TSV, RunQC."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from iqt_pipe import qc
from iqt_pipe.dmri.degrade import upsample_affine
from iqt_pipe.io import InputError, save_nifti

SHAPE = (8, 8, 8)
MD_BRAIN = 0.8e-3


def native_maps(shape=SHAPE):
    """Brain = the inner 6³ box; WM = native voxels (3..4)³ with FA 0.6, elsewhere FA 0.1."""
    mask = np.zeros(shape, bool)
    mask[1:-1, 1:-1, 1:-1] = True
    fa = np.where(mask, 0.1, 0.0).astype(np.float32)
    fa[3:5, 3:5, 3:5] = 0.6
    md = np.where(mask, MD_BRAIN, 0.0).astype(np.float32)
    md[3:5, 3:5, 3:5] = 0.7e-3
    return fa, md, mask


def sr_of(fa, md, mask, r, sd=1e-4):
    """SR maps identical to the block-expanded native ones, constant sd_total in the brain."""
    hr_mask = qc.expand_blocks(mask, r)
    return (qc.expand_blocks(fa, r), qc.expand_blocks(md, r), np.where(hr_mask, sd, 0.0).astype(np.float32), hr_mask)


def metrics(r=2, sd=1e-4, threshold=None, **kw):
    fa, md, mask = native_maps()
    return qc.run_qc_metrics(fa, md, mask, *sr_of(fa, md, mask, r, sd), r, threshold, **kw)


def test_constant_sd_gives_exact_summaries():
    m = metrics(sd=1e-4, threshold=5e-5)
    assert m["sdtot_wm_mean"] == pytest.approx(1e-4, rel=1e-6)
    assert m["sdtot_wm_median"] == pytest.approx(1e-4, rel=1e-6)
    assert m["sdtot_wm_p95"] == pytest.approx(1e-4, rel=1e-6)
    assert m["sdtot_frac_above"] == 1.0
    assert metrics(sd=1e-4)["sdtot_frac_above"] == 0.0  # default threshold 1.5e-4
    assert metrics(sd=1e-4)["sd_threshold"] == qc.DEFAULT_SD_THRESHOLD == 1.5e-4
    assert list(m) == list(qc.METRIC_COLUMNS)
    for key, value in m.items():
        assert type(value) in (int, float), key
        assert math.isfinite(value), key


def test_fraction_above_threshold_counts_hr_brain_voxels():
    fa, md, mask = native_maps()
    sr_fa, sr_md, sd, hr_mask = sr_of(fa, md, mask, 2, sd=1e-4)
    sd[:8] = np.where(hr_mask[:8], 3e-4, 0)  # the HR slabs x < 8 = native x < 4
    m = qc.run_qc_metrics(fa, md, mask, sr_fa, sr_md, sd, hr_mask, 2)
    expected = hr_mask[:8].sum() / hr_mask.sum()
    assert m["sdtot_frac_above"] == pytest.approx(expected)
    assert expected == pytest.approx(3 / 6)  # brain x = 1..6, native x 1..3 → HR 2..7


@pytest.mark.parametrize("r", [2, 3])
def test_white_matter_block_geometry(r):
    fa, md, mask = native_maps()
    fa[1, 3, 3] = 0.9  # on the brain's edge: eroded away, never WM
    wm = qc.white_matter_mask(fa, mask)
    expected = np.zeros(SHAPE, bool)
    expected[3:5, 3:5, 3:5] = True
    np.testing.assert_array_equal(wm, expected)
    hr = qc.expand_blocks(wm, r)
    assert hr.shape == tuple(s * r for s in SHAPE)
    hr_expected = np.zeros(hr.shape, bool)
    hr_expected[3 * r : 5 * r, 3 * r : 5 * r, 3 * r : 5 * r] = True  # native p → r·p … r·p + r − 1
    np.testing.assert_array_equal(hr, hr_expected)
    m = qc.run_qc_metrics(fa, md, mask, *sr_of(fa, md, mask, r), r)
    assert (m["n_wm_native"], m["n_wm_hr"]) == (8, 8 * r**3)
    assert (m["n_brain_native"], m["n_brain_hr"]) == (216, 216 * r**3)
    assert m["upsample"] == r


def test_sd_is_read_in_the_wm_blocks_only():
    r = 3
    fa, md, mask = native_maps()
    sr_fa, sr_md, sd, hr_mask = sr_of(fa, md, mask, r, sd=1e-4)
    sd[9:15, 9:15, 9:15] = 2e-4  # exactly the HR WM blocks
    m = qc.run_qc_metrics(fa, md, mask, sr_fa, sr_md, sd, hr_mask, r)
    assert m["sdtot_wm_mean"] == m["sdtot_wm_median"] == pytest.approx(2e-4, rel=1e-6)
    assert m["sdtot_frac_above"] == pytest.approx(8 / 216)


@pytest.mark.parametrize("r", [2, 3])
def test_identical_sr_gives_ratios_of_one(r):
    m = metrics(r=r)
    ratios = {k: v for k, v in m.items() if k.endswith("_ratio")}
    assert len(ratios) == 8
    assert all(v == 1.0 for v in ratios.values()), ratios
    assert m["fa_wm_mean_native"] == pytest.approx(0.6)
    assert m["md_brain_median_native"] == pytest.approx(MD_BRAIN)


def test_sr_bias_shows_in_ratios():
    fa, md, mask = native_maps()
    sr_fa, sr_md, sd, hr_mask = sr_of(fa, md, mask, 2)
    m = qc.run_qc_metrics(fa, md, mask, sr_fa * 0.5, sr_md * 1.1, sd, hr_mask, 2)
    assert m["fa_wm_median_ratio"] == pytest.approx(0.5)
    assert m["md_brain_mean_ratio"] == pytest.approx(1.1)


def test_empty_white_matter_names_the_run():
    fa, md, mask = native_maps()
    fa[:] = 0.1
    with pytest.raises(ValueError, match=r"sub-07_run-2: no white-matter voxels"):
        qc.run_qc_metrics(fa, md, mask, *sr_of(fa, md, mask, 2), 2, name="sub-07_run-2")


def test_wrong_units_and_non_finite_are_refused():
    fa, md, mask = native_maps()
    with pytest.raises(InputError, match="not in mm\\^2/s"):
        qc.run_qc_metrics(fa, md * 1e-6, mask, *sr_of(fa, md * 1e-6, mask, 2), 2, name="x")
    sr = list(sr_of(fa, md, mask, 2))
    sr[2][6, 6, 6] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        qc.run_qc_metrics(fa, md, mask, *sr, 2, name="x")
    with pytest.raises(ValueError, match="not r=3"):
        qc.run_qc_metrics(fa, md, mask, *sr_of(fa, md, mask, 2), 3, name="x")


def _rows(values: dict[str, list[float]], n: int) -> list[dict]:
    base = metrics()
    rows = []
    for i in range(n):
        row = {"subject": f"{i + 1:02d}", "run": "1", **base}
        for key, vals in values.items():
            row[key] = vals[i]
        rows.append(row)
    return rows


HOMOGENEOUS = {
    "sdtot_wm_median": [1.00e-4, 1.05e-4, 0.97e-4, 1.02e-4, 0.99e-4, 1.04e-4, 0.98e-4, 1.01e-4],
    "sdtot_frac_above": [0.010, 0.012, 0.011, 0.009, 0.013, 0.010, 0.011, 0.012],
    "fa_wm_median_ratio": [0.95, 0.96, 0.94, 0.97, 0.95, 0.96, 0.95, 0.94],
    "md_wm_median_ratio": [1.00, 1.01, 0.99, 1.00, 1.02, 0.99, 1.00, 1.01],
}


def test_homogeneous_group_has_no_outliers():
    table = qc.group_table(_rows(HOMOGENEOUS, 8))
    assert not any(row["outlier"] for row in table)
    for row in table:
        for metric in qc.OUTLIER_METRICS:
            assert abs(row[f"{metric}_z"]) <= qc.OUTLIER_Z


def test_planted_outlier_is_flagged():
    values = {k: list(v) for k, v in HOMOGENEOUS.items()}
    values["sdtot_wm_median"][5] = 4e-4
    table = qc.group_table(_rows(values, 8))
    assert [row["outlier"] for row in table] == [False] * 5 + [True] + [False] * 2
    assert table[5]["outlier_metrics"] == "sdtot_wm_median"
    # median 1.005e-4, MAD 0.02e-4 → z = (4 − 1.005)/(1.4826·0.02) ≈ 101
    assert table[5]["sdtot_wm_median_z"] == pytest.approx((4e-4 - 1.005e-4) / (1.4826 * 0.02e-4))


def test_mad_zero_falls_back_to_mean_absolute_deviation():
    same = {k: [v[0]] * 8 for k, v in HOMOGENEOUS.items()}
    table = qc.group_table(_rows(same, 8))
    assert all(row["sdtot_wm_median_z"] == 0.0 and not row["outlier"] for row in table)
    same["fa_wm_median_ratio"][2] = 0.80  # MAD = 0, one value off
    table = qc.group_table(_rows(same, 8))
    # mean |x − median| = 0.15/8 → z = −0.15 / (1.2533·0.15/8) ≈ −6.38
    assert table[2]["fa_wm_median_ratio_z"] == pytest.approx(-8 / 1.2533)
    assert [row["outlier"] for row in table] == [False, False, True] + [False] * 5
    assert all(math.isfinite(row[f"{m}_z"]) for row in table for m in qc.OUTLIER_METRICS)


def test_fewer_than_three_runs_get_no_flags():
    values = {k: [v[0], v[0] * 10] for k, v in HOMOGENEOUS.items()}
    table = qc.group_table(_rows(values, 2))
    assert all(row["outlier"] is False and row["sdtot_wm_median_z"] is None for row in table)
    assert qc.group_table([]) == []


def test_group_qc_tsv_round_trips(tmp_path):
    values = {k: list(v) for k, v in HOMOGENEOUS.items()}
    values["md_wm_median_ratio"][0] = 1.5
    rows = _rows(values, 8)
    rows[3]["session"] = "b"
    table = qc.group_table(rows[::-1])
    tsv, summary = qc.write_group_qc(table, tmp_path / "group_qc.tsv", tmp_path / "group_qc.txt")
    with open(tsv, newline="") as fh:
        read = list(csv.DictReader(fh, delimiter="\t"))
    header = ["subject", "session", "run", *qc.METRIC_COLUMNS, *qc.GROUP_COLUMNS]
    assert list(read[0]) == header
    assert [row["subject"] for row in read] == [f"{i:02d}" for i in range(1, 9)]  # sorted
    assert read[3]["session"] == "b" and read[0]["session"] == "n/a"
    for got, want in zip(read, sorted(table, key=lambda row: row["subject"])):
        assert float(got["sdtot_wm_median"]) == want["sdtot_wm_median"]  # exact
        assert int(got["n_wm_hr"]) == want["n_wm_hr"]
        assert float(got["md_wm_median_ratio_z"]) == want["md_wm_median_ratio_z"]
        assert got["outlier"] == ("true" if want["outlier"] else "false")
    assert read[0]["outlier"] == "true" and read[0]["outlier_metrics"] == "md_wm_median_ratio"
    sidecar = json.loads((tmp_path / "group_qc.json").read_text())
    assert list(sidecar) == header
    text = summary.read_text()
    assert "8 runs" in text and "Outliers (robust |z| > 3.5): 1" in text
    assert "sub-01_run-1: md_wm_median_ratio" in text
    assert "sdtot_wm_median: 0.0001005 mm^2/s" in text
    assert sidecar["sdtot_wm_p95"]["Units"] == "mm^2/s" and "Units" not in sidecar["md_wm_median_ratio"]
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_summary_with_two_runs(tmp_path):
    table = qc.group_table(_rows(HOMOGENEOUS, 2))
    qc.write_group_qc(table, tmp_path / "g.tsv", tmp_path / "g.txt", sidecar=False)
    assert "not assessed" in (tmp_path / "g.txt").read_text()
    assert not (tmp_path / "g.json").exists()
    with open(tmp_path / "g.tsv", newline="") as fh:
        assert {row["sdtot_wm_median_z"] for row in csv.DictReader(fh, delimiter="\t")} == {"n/a"}


def write_run(tmp_path, r=2, sd=1e-4, hr_affine=None):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (-8, -10, -6)
    fa, md, mask = native_maps()
    sr_fa, sr_md, sr_sd, hr_mask = sr_of(fa, md, mask, r, sd)
    hr_affine = upsample_affine(affine, r) if hr_affine is None else hr_affine
    paths = {}
    for key, data, aff in (
        ("native_fa", fa, affine),
        ("native_md", md, affine),
        ("native_mask", mask, affine),
        ("sr_fa", sr_fa, hr_affine),
        ("sr_md", sr_md, hr_affine),
        ("sr_sd_total", sr_sd, hr_affine),
        ("sr_mask", hr_mask, hr_affine),
    ):
        paths[key] = str(save_nifti(data.astype(np.float32), aff, tmp_path / f"{key}.nii.gz"))
    return paths


def test_metrics_from_files_matches_arrays(tmp_path):
    paths = write_run(tmp_path, r=3)
    assert qc.metrics_from_files(*paths.values(), 3) == metrics(r=3)


def test_metrics_from_files_one_line_errors(tmp_path):
    paths = write_run(tmp_path, r=2, hr_affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(InputError, match=r"sr_fa\.nii\.gz: the SR FA grid .* differs") as err:
        qc.metrics_from_files(*paths.values(), 2)
    assert "\n" not in str(err.value)
    paths = write_run(tmp_path, r=2)
    with pytest.raises(InputError, match="grid"):  # r=3 expects a 24³ HR grid
        qc.metrics_from_files(*paths.values(), 3)
    paths["sr_sd_total"] = str(tmp_path / "missing_sdtot.nii.gz")
    with pytest.raises(InputError, match="missing_sdtot.nii.gz: SR sd_total file not found"):
        qc.metrics_from_files(*paths.values(), 2)


def test_runqc_interface(tmp_path, monkeypatch):
    from iqt_pipe.interfaces import RunQC

    paths = write_run(tmp_path, r=2, sd=2e-4)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    node = RunQC(
        native_fa_file=paths["native_fa"],
        native_md_file=paths["native_md"],
        native_mask_file=paths["native_mask"],
        sr_fa_file=paths["sr_fa"],
        sr_md_file=paths["sr_md"],
        sr_sd_total_file=paths["sr_sd_total"],
        sr_mask_file=paths["sr_mask"],
        upsample=2,
        entities={"subject": "01", "session": "a"},
    )
    res = node.run(cwd=str(work))
    out = res.outputs
    assert out.out_json == str(work / "sub-01_ses-a_qc.json")
    saved = json.loads((work / "sub-01_ses-a_qc.json").read_text())
    assert saved == out.metrics
    assert list(saved)[:2] == ["subject", "session"]
    assert saved["sdtot_frac_above"] == 1.0 and saved["sd_threshold"] == 1.5e-4
    assert saved["fa_wm_mean_ratio"] == 1.0
    res = RunQC(**{**node.inputs.get_traitsfree(), "threshold": 3e-4}).run(cwd=str(work))
    assert res.outputs.metrics["sdtot_frac_above"] == 0.0


def test_correlated_noise_warning_threshold():
    assert qc.noise_correlation_warning(None, "sub-01") is None
    assert qc.noise_correlation_warning([0.25, 0.4, math.nan], "sub-01") is None  # 0.4 is not above
    warning = qc.noise_correlation_warning([0.52, 0.1, 0.65], "sub-galan02_run-1")
    assert warning.startswith("sub-galan02_run-1: noise correlated between neighbouring voxels (i 0.52, k 0.65 > 0.4)")
    assert "\n" not in warning and "super-resolution gains little" in warning
    sidecar = {qc.NOISE_CORRELATION_FIELD: {"Values": [0.5, None, 0.1], "Description": "…"}}
    assert qc.noise_correlation(sidecar)[0] == 0.5 and math.isnan(qc.noise_correlation(sidecar)[1])
    assert qc.noise_correlation({"NumericalGuards": {}}) is None


def test_group_summary_lists_correlated_noise(tmp_path):
    rows = _rows(HOMOGENEOUS, 4)
    rows[1]["noise_corr_max"], rows[2]["noise_corr_max"] = 0.61, 0.12  # the others: no denoising
    tsv, summary = qc.write_group_qc(qc.group_table(rows), tmp_path / "g.tsv", tmp_path / "g.txt")
    with open(tsv, newline="") as fh:
        read = list(csv.DictReader(fh, delimiter="\t"))
    assert list(read[0])[-1] == "noise_corr_max"
    assert [row["noise_corr_max"] for row in read] == ["n/a", "0.61", "0.12", "n/a"]
    assert "above 0.4" in json.loads((tmp_path / "g.json").read_text())["noise_corr_max"]["Description"]
    text = summary.read_text()
    assert "Correlated noise (neighbour correlation > 0.4" in text and "  sub-02_run-1: 0.61\n" in text
    assert "sub-03_run-1: 0.12" not in text
