"""``iqt-pipe participant`` end to end: the derivatives tree and sidecars against the
checked-in list, cache reuse with identical outputs, two job-array tasks writing one output
folder, a failing run that does not stop the others, the methods boilerplate, real data."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from helpers import REPO, tiny_dataset_and_model

EXPECTED = json.loads((REPO / "tests/data/expected_participant_outputs.json").read_text())
FAST = ["--denoise", "dipy", "--no-degibbs", "--mc-samples", "2", "--nprocs", "2", "--omp-nthreads", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app")
    root, _ = tiny_dataset_and_model(tmp, n_subjects=2, seed=1)
    return root, tmp / "model"


def iqt_pipe(*args, check_rc=0):
    proc = subprocess.run([sys.executable, "-m", "iqt_pipe.cli.run", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == check_rc, proc.stderr[-3000:]
    return proc


def tree(out: Path) -> list[str]:
    return sorted(
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file() and "/log/" not in str(p) and not p.name.startswith(".iqt-pipe")
    )


def image_digests(out: Path) -> dict[str, str]:
    """sha256 of every output file's bytes (the sink writes gzip with a zero time stamp)."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("sub-*/dwi/*"))
    }


@pytest.fixture(scope="module")
def first_run(data, tmp_path_factory):
    root, model = data
    tmp = tmp_path_factory.mktemp("run")
    proc = iqt_pipe(
        root, tmp / "out", "participant", "--participant-label", "sub-01", "--model", model, "-w", tmp / "work", *FAST
    )
    return tmp, proc


def test_outputs_and_sidecars_match_the_checked_in_list(first_run, data):
    tmp, proc = first_run
    out = tmp / "out"
    assert "participant level" in proc.stdout and "DWI runs       1" in proc.stdout
    assert tree(out) == EXPECTED["files"]
    for rel, keys in EXPECTED["sidecar_keys"].items():
        assert sorted(json.loads((out / rel).read_text())) == keys, rel
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "iqt-pipe"
    tensor = json.loads((out / "sub-01/dwi/sub-01_res-hi_model-tensor_param-tensor_dwimap.json").read_text())
    card = json.loads((data[1] / "model.json").read_text())
    assert tensor["OrientationEncoding"]["Reference"] == "xyz"
    # 2 weight samples asked, 8 mirrors by default: 8 passes, each its own weight sample.
    assert tensor["Model"]["WeightsSHA256"] == card["weights"]["sha256"] and tensor["MonteCarloSamples"] == 8
    # The phantom's noise is white: no neighbour correlation, no warning.
    native_meta = json.loads((out / "sub-01/dwi/sub-01_model-tensor_param-tensor_dwimap.json").read_text())
    assert np.all(np.abs(native_meta["NoiseNeighbourCorrelation"]["Values"]) < 0.1), native_meta
    assert "noise correlated" not in proc.stderr
    native = nb.load(out / "sub-01/dwi/sub-01_model-tensor_param-tensor_dwimap.nii.gz")
    sr = nb.load(out / "sub-01/dwi/sub-01_res-hi_model-tensor_param-tensor_dwimap.nii.gz")
    assert sr.shape == tuple(2 * s for s in native.shape[:3]) + (6,)
    np.testing.assert_allclose(nb.affines.voxel_sizes(sr.affine) * 2, nb.affines.voxel_sizes(native.affine))
    sd = nb.load(out / "sub-01/dwi/sub-01_res-hi_model-tensor_param-tensor_desc-totalsd_dwimap.nii.gz").get_fdata()
    mask = nb.load(out / "sub-01/dwi/sub-01_res-hi_desc-brain_mask.nii.gz").get_fdata() > 0
    assert np.all(sd[mask] > 0) and np.all(np.isfinite(sd))
    logs = list((out / "sub-01" / "log").glob("*/iqt-pipe.toml"))
    assert len(logs) == 1 and "hetero-var2" in logs[0].read_text()
    assert "Bayesian Image Quality Transfer" in (out / "logs/CITATION.md").read_text()
    assert "@article{tanno2021" in (out / "logs/CITATION.bib").read_text()


def test_rerun_with_the_same_work_dir_reuses_it_and_gives_identical_outputs(first_run, data):
    tmp, _ = first_run
    root, model = data
    sr_result = next((tmp / "work").rglob("super_resolve/result_super_resolve.pklz"))
    before, stamp = image_digests(tmp / "out"), sr_result.stat().st_mtime_ns
    plugin = tmp / "linear.yml"
    plugin.write_text("plugin: Linear\nplugin_args: {}\n")
    iqt_pipe(
        root,
        tmp / "out",
        "participant",
        "--participant-label",
        "01",
        "--model",
        model,
        "-w",
        tmp / "work",
        *FAST,
        "--use-plugin",
        plugin,
    )
    assert sr_result.stat().st_mtime_ns == stamp, "the super-resolution node ran again"
    assert image_digests(tmp / "out") == before


def test_runs_with_correlated_noise_are_flagged(first_run, data, tmp_path, capsys):
    """A run whose native sidecar records correlated noise (as ds-realdwi's Canon/Toshiba scans
    do): one warning line at the end of the participant level, an alert in its report, a line in
    the group summary and its value in group_qc.tsv."""
    from types import SimpleNamespace

    from iqt_pipe.cli.run import warn_about_runs

    root, _ = data
    out = tmp_path / "out"
    shutil.copytree(first_run[0] / "out", out)
    sidecar = out / "sub-01/dwi/sub-01_model-tensor_param-tensor_dwimap.json"
    meta = json.loads(sidecar.read_text())
    meta["NoiseNeighbourCorrelation"]["Values"] = [0.62, 0.08, 0.05]
    sidecar.write_text(json.dumps(meta))
    warn_about_runs(SimpleNamespace(output_dir=out), ["01"])
    # One line for the noise (the untrained model may add one for its self-calibration).
    noise = [line for line in capsys.readouterr().err.splitlines() if "noise correlated" in line]
    assert len(noise) == 1 and noise[0].startswith(
        "iqt-pipe: warning: sub-01: noise correlated between neighbouring "
        "voxels (i 0.62 > 0.4): the scanner interpolated this series"
    )
    iqt_pipe(root, out, "participant", "--reports-only", "--skip-bids-validation")
    assert (
        "Noise correlation between neighbouring voxels (the noise MP-PCA removed, in the brain): i 0.62, j 0.08, "
        "k 0.05: above 0.4, the scanner interpolated" in (out / "sub-01.html").read_text()
    )
    proc = iqt_pipe(root, out, "group", "--skip-bids-validation")
    assert "Correlated noise (neighbour correlation > 0.4" in proc.stdout and "  sub-01: 0.62" in proc.stdout
    header, row = ((out / "group_qc.tsv").read_text().splitlines()[i].split("\t") for i in (0, 1))
    assert dict(zip(header, row))["noise_corr_max"] == "0.62"
    assert '<td class="iqt-flag" title="noise_corr_max">0.620</td>' in (out / "group.html").read_text()


def test_two_job_array_tasks_share_one_output_folder(data, tmp_path):
    root, model = data
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "iqt_pipe.cli.run",
                str(root),
                str(tmp_path / "out"),
                "participant",
                "--participant-label",
                label,
                "--model",
                str(model),
                "-w",
                str(tmp_path / f"work{label}"),
                "--skip-bids-validation",
                *FAST,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for label in ("01", "02")
    ]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]
    files = tree(tmp_path / "out")
    for sub in ("sub-01", "sub-02"):
        expected = [f.replace("sub-01", sub) for f in EXPECTED["files"]]
        assert set(expected) <= set(files)
    json.loads((tmp_path / "out" / "dataset_description.json").read_text())
    assert (tmp_path / "out" / ".bidsignore").read_text().count("*_dwimap.*") == 1
    # The group level on the shared folder: one QC row per run, and its summary.
    proc = iqt_pipe(root, tmp_path / "out", "group", "--skip-bids-validation")
    rows = (tmp_path / "out" / "group_qc.tsv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("subject\t") and rows[1].startswith("01\t")
    assert "group QC of 2 run(s)" in proc.stdout and (tmp_path / "out" / "group_qc.txt").exists()


def test_group_without_participant_outputs_is_refused(data, tmp_path):
    root, _ = data
    proc = iqt_pipe(root, tmp_path / "out", "group", "--skip-bids-validation", check_rc=2)
    assert "run the participant level" in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_a_failing_run_does_not_stop_the_others(data, tmp_path):
    """A step that fails at run time (inputs pass the checks: here MRtrix3's dwidenoise
    crashes on sub-02) gives a crash report; the other run still finishes; exit code 1."""
    from helpers import mrtrix_failing_on

    root, model = data
    env = mrtrix_failing_on(tmp_path, "sub-02")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "iqt_pipe.cli.run",
            str(root),
            str(tmp_path / "out"),
            "participant",
            "--model",
            str(model),
            "-w",
            str(tmp_path / "work"),
            "--skip-bids-validation",
            *[a if a != "dipy" else "mrtrix" for a in FAST],
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "crash report" in proc.stderr
    assert (tmp_path / "out/sub-01/dwi/sub-01_res-hi_model-tensor_param-tensor_dwimap.nii.gz").exists()
    assert not list((tmp_path / "out").glob("sub-02/dwi/*"))
    crashes = list((tmp_path / "out/sub-02/log").glob("*/crash-*.txt"))
    assert crashes and "simulated scanner-file failure" in crashes[0].read_text()


def test_boilerplate_only_and_graph(data, tmp_path):
    root, model = data
    iqt_pipe(
        root,
        tmp_path / "out",
        "participant",
        "--model",
        model,
        "-w",
        tmp_path / "work",
        "--boilerplate-only",
        "--write-graph",
        "--skip-bids-validation",
    )
    text = (tmp_path / "out/logs/CITATION.md").read_text()
    assert "weighted linear least squares" in text and "@tanno2017" in text
    assert not list((tmp_path / "out").glob("sub-*/dwi"))
    assert (tmp_path / "work/iqt_wf/graph.dot").exists()
    if shutil.which("dot"):
        assert (tmp_path / "work/iqt_wf/graph.svg").stat().st_size > 0


def test_missing_executable_exits_127(data, tmp_path, monkeypatch):
    root, model = data
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    proc = iqt_pipe(
        root,
        tmp_path / "out",
        "participant",
        "--model",
        model,
        "-w",
        tmp_path / "work",
        "--denoise",
        "mrtrix",
        "--skip-bids-validation",
        check_rc=127,
    )
    assert proc.stderr.strip().count("\n") == 0 and "dwidenoise" in proc.stderr


@pytest.mark.realdata
def test_real_subject_end_to_end(realdwi, data, tmp_path):
    _, model = data
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"dwi": {"run": 1}}))
    proc = iqt_pipe(
        realdwi,
        tmp_path / "out",
        "participant",
        "--participant-label",
        "galan02",
        "--model",
        model,
        "-w",
        tmp_path / "work",
        "--bids-filter-file",
        filters,
        "--skip-bids-validation",
        "--mc-samples",
        "2",
        "--nprocs",
        "2",
        "--omp-nthreads",
        "1",
    )
    files = tree(tmp_path / "out")
    stem = "sub-galan02/dwi/sub-galan02_run-1_"
    assert f"{stem}res-hi_model-tensor_param-tensor_desc-totalsd_dwimap.nii.gz" in files
    native = nb.load(tmp_path / "out" / f"{stem}model-tensor_param-md_dwimap.nii.gz").get_fdata()
    mask = nb.load(tmp_path / "out" / f"{stem}desc-brain_mask.nii.gz").get_fdata() > 0
    assert 0.5e-3 < np.median(native[mask]) < 1.2e-3
    # The Canon scanner interpolated this run along x (iqt-eval measures 0.52 there): warned about.
    corr = json.loads((tmp_path / "out" / f"{stem}model-tensor_param-tensor_dwimap.json").read_text())
    i, j, k = corr["NoiseNeighbourCorrelation"]["Values"]
    assert i > 0.4 and max(j, k) < 0.3, (i, j, k)
    assert f"warning: sub-galan02_run-1: noise correlated between neighbouring voxels (i {i:.2f} > 0.4)" in proc.stderr
