"""What real labs give iqt-pipe (issue 21): datasets below folders with entity-like names (a
job array's scratch copy), datasets of thousands of subjects with a broken file somewhere,
sessions, acq-/dir-/run- entities and uncompressed .nii inputs, and QSIPrep's preprocessed
derivatives with their brain masks — each through the app, down to the group level."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from helpers import REPO, tiny_dataset_and_model

EXPECTED = json.loads((REPO / "tests/data/expected_participant_outputs.json").read_text())
FAST = ["--mc-samples", "2", "--nprocs", "2", "--omp-nthreads", "1"]
RAW_FAST = ["--denoise", "none", "--no-degibbs", *FAST]


def iqt_pipe(*args, check_rc=0):
    proc = subprocess.run([sys.executable, "-m", "iqt_pipe.cli.run", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == check_rc, proc.stderr[-3000:]
    return proc


def expected_dwi_outputs(stem: str) -> list[str]:
    """The derivatives of one run (the checked-in list for sub-01) renamed for another run."""
    return sorted(f.replace("sub-01/dwi/sub-01_", f"{stem}_") for f in EXPECTED["files"] if f.startswith("sub-01/dwi/"))


def dwi_outputs(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.glob("sub-*/**/dwi/*") if p.is_file())


def stub_subject(root: Path, label: str, broken: bool = False) -> None:
    """A subject of one tiny DWI series (8³ voxels, b=0 + 6 directions); ``broken``: its image
    truncated and its sidecar not JSON."""
    folder = root / f"sub-{label}" / "dwi"
    folder.mkdir(parents=True)
    img = nb.Nifti1Image(np.full((8, 8, 8, 7), 100, np.int16), np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header.set_xyzt_units("mm", "sec")
    data = gzip.compress(img.to_bytes(), mtime=0)
    (folder / f"sub-{label}_dwi.nii.gz").write_bytes(data[: len(data) // 2] if broken else data)
    (folder / f"sub-{label}_dwi.bval").write_text("0 1000 1000 1000 1000 1000 1000\n")
    (folder / f"sub-{label}_dwi.bvec").write_text(
        "0 1 0 0 0.7071 0.7071 0\n0 0 1 0 0.7071 0 0.7071\n0 0 0 1 0 0.7071 0.7071\n"
    )
    (folder / f"sub-{label}_dwi.json").write_text("{ not json" if broken else '{"RepetitionTime": 5.0}')


def stub_dataset(root: Path, labels: list[str], broken: tuple[str, ...] = ()) -> Path:
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "stubs", "BIDSVersion": "1.9.0", "DatasetType": "raw", "Authors": ["iqt-pipe"]})
    )
    (root / "README").write_text("Tiny DWI series for iqt-pipe's tests of BIDS indexing.\n")
    (root / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{label}\n" for label in labels))
    for label in labels:
        stub_subject(root, label, broken=label in broken)
    return root


# -- entities from the path below the dataset root (pybids#595/#1270), without the app -------


@pytest.mark.parametrize("above", ["sub-07_scratch/run-3", "ses-x"])
def test_entities_come_from_below_the_dataset_root(tmp_path, above):
    """Before: pybids matched entities against the absolute path, so every file of a dataset
    under sub-07_scratch/run-3/ was sub-07's run 3 ('participant label sub-eval not found;
    available: sub-07'), and under ses-x/ every file had session x."""
    from iqt_pipe.bids import find_dwi_runs
    from iqt_pipe.cli.run import derivatives_layout
    from iqt_pipe.io import InputError

    root = stub_dataset(tmp_path / above / "bids", ["eval", "02"])
    runs = find_dwi_runs(root, ["sub-eval"])
    assert [r.name for r in runs] == ["sub-eval"]
    assert runs[0].entities.get("run") is None and runs[0].entities.get("session") is None
    assert runs[0].bval == root / "sub-eval/dwi/sub-eval_dwi.bval"
    assert [r.name for r in find_dwi_runs(root)] == ["sub-02", "sub-eval"]
    with pytest.raises(InputError, match="session label ses-x not found"):
        find_dwi_runs(root, session_labels=["x"])
    assert sorted(derivatives_layout(root).get_subjects()) == ["02", "eval"]  # the group level's index


def test_gradient_files_by_inheritance_and_only_the_selected_participants_indexed(tmp_path):
    """A dataset-level dwi.bval/.bvec serves every run; another subject's broken sidecar is
    never read (before: pybids indexed and parsed every subject's JSON)."""
    from iqt_pipe.bids import find_dwi_runs
    from iqt_pipe.io import InputError

    root = stub_dataset(tmp_path / "ds", ["01", "02", "03"], broken=("02",))
    for kind in ("bval", "bvec"):
        shutil.move(root / f"sub-01/dwi/sub-01_dwi.{kind}", root / f"dwi.{kind}")
    runs = find_dwi_runs(root, ["01"])
    assert runs[0].bval == root / "dwi.bval" and runs[0].bvec == root / "dwi.bvec"
    assert find_dwi_runs(root, ["03"])[0].bval.name == "sub-03_dwi.bval"  # the subject's own file is nearer
    with pytest.raises(InputError, match="sub-02_dwi.json"):  # its own broken file does stop sub-02
        find_dwi_runs(root, ["02"])


def test_validation_covers_only_the_selected_participants(tmp_path):
    """Before: the validator checked the whole dataset, so a job-array task stopped at another
    subject's broken file. Now the selected participants (and the top-level files) only."""
    from iqt_pipe.cli.run import validate_bids
    from iqt_pipe.io import InputError

    root = stub_dataset(tmp_path / "sub-07_scratch" / "bids", ["01", "02"], broken=("02",))
    validate_bids(root, ["01"])
    with pytest.raises(InputError, match=r"error\(s\) \(in sub-02 and the dataset's top-level files\)"):
        validate_bids(root, ["02"])
    with pytest.raises(InputError, match="the BIDS validator found"):
        validate_bids(root)


# -- sessions, acq-, dir-, run-, .nii: one app run on a dataset below entity-like folders ---


@pytest.fixture(scope="module")
def entity_run(tmp_path_factory):
    """sub-eval with two runs — ses-pre acq-hr dir-AP run-1 (.nii.gz) and ses-post run-2
    (uncompressed .nii) — and a broken sub-07, in a dataset below sub-07_scratch/run-3/,
    processed for sub-eval with BIDS validation, then the group level."""
    tmp = tmp_path_factory.mktemp("entities")
    phantom, model = tiny_dataset_and_model(tmp, n_subjects=1, seed=1)
    base = tmp / "sub-07_scratch" / "run-3"
    root = base / "bids"
    stub_dataset(root, ["07"], broken=("07",))
    (root / "participants.tsv").write_text("participant_id\nsub-07\nsub-eval\n")
    source = phantom / "sub-01/dwi/sub-01_dwi"
    for stem, ext in (
        ("ses-pre/dwi/sub-eval_ses-pre_acq-hr_dir-AP_run-1_dwi", ".nii.gz"),
        ("ses-post/dwi/sub-eval_ses-post_run-2_dwi", ".nii"),
    ):
        target = root / "sub-eval" / stem
        target.parent.mkdir(parents=True, exist_ok=True)
        nb.save(nb.load(f"{source}.nii.gz"), f"{target}{ext}")
        for kind in ("bval", "bvec", "json"):
            shutil.copy(f"{source}.{kind}", f"{target}.{kind}")
    out = base / "out"
    proc = iqt_pipe(
        root, out, "participant", "--participant-label", "eval", "--model", model, "-w", tmp / "work", *RAW_FAST
    )
    group = iqt_pipe(root, out, "group")
    return root, out, proc, group


@pytest.mark.slow  # shares one app run (participant + group, ~40-55 s on 2 cores)
def test_a_dataset_below_entity_like_folders_is_read_by_its_own_entities(entity_run):
    root, out, proc, _ = entity_run
    assert "DWI runs       2 in 1 participant(s): sub-eval" in proc.stdout
    assert sorted(p.name for p in out.glob("sub-*") if p.is_dir()) == ["sub-eval"]  # no sub-07
    assert not any("run-3" in name for name in dwi_outputs(out))


@pytest.mark.slow  # shares one app run (participant + group, ~40-55 s on 2 cores)
def test_a_broken_file_in_another_subject_does_not_stop_a_participant_run(entity_run):
    _, out, proc, _ = entity_run
    assert "BIDS validation skipped" not in proc.stdout and "finished" in proc.stdout
    assert (out / "sub-eval.html").exists()


@pytest.mark.slow  # shares one app run (participant + group, ~40-55 s on 2 cores)
def test_sessions_acq_dir_and_run_entities_name_the_outputs(entity_run):
    _, out, _, _ = entity_run
    expected = expected_dwi_outputs("sub-eval/ses-pre/dwi/sub-eval_ses-pre_acq-hr_dir-AP_run-1") + expected_dwi_outputs(
        "sub-eval/ses-post/dwi/sub-eval_ses-post_run-2"
    )
    assert dwi_outputs(out) == sorted(expected)
    figures = sorted(p.name for p in (out / "sub-eval/figures").glob("*colourfa*"))
    assert figures == [
        "sub-eval_ses-post_run-2_desc-colourfa_dwi.svg",
        "sub-eval_ses-pre_acq-hr_dir-AP_run-1_desc-colourfa_dwi.svg",
    ]


@pytest.mark.slow  # shares one app run (participant + group, ~40-55 s on 2 cores)
def test_an_uncompressed_nii_input_gives_compressed_outputs_sourced_from_it(entity_run):
    _, out, _, _ = entity_run
    stem = out / "sub-eval/ses-post/dwi/sub-eval_ses-post_run-2_"
    meta = json.loads(Path(f"{stem}model-tensor_param-tensor_dwimap.json").read_text())
    assert meta["Sources"] == ["bids:raw:sub-eval/ses-post/dwi/sub-eval_ses-post_run-2_dwi.nii"]
    assert nb.load(f"{stem}res-hi_model-tensor_param-fa_dwimap.nii.gz").shape == (50, 62, 54)


@pytest.mark.slow  # shares one app run (participant + group, ~40-55 s on 2 cores)
def test_the_group_level_finds_every_run(entity_run):
    _, out, _, group = entity_run
    assert "group QC of 2 run(s)" in group.stdout
    header, *rows = [line.split("\t") for line in (out / "group_qc.tsv").read_text().splitlines()]
    table = [dict(zip(header, row)) for row in rows]
    keys = [(r["subject"], r["session"], r["acquisition"], r["direction"], r["run"]) for r in table]
    assert sorted(keys) == [("eval", "post", "n/a", "n/a", "2"), ("eval", "pre", "hr", "AP", "1")]
    assert "sub-eval_ses-pre_acq-hr_dir-AP_run-1" in (out / "group.html").read_text()


# -- preprocessed input: a QSIPrep-style derivatives dataset ---------------------------------


def qsiprep_like(
    phantom: Path, root: Path, *, denoise_method: str | None = "dwidenoise", mask: np.ndarray | None = None
) -> Path:
    """QSIPrep's output layout for the phantom's sub-01 (as run-1, space-ACPC): the
    preprocessed series with its gradient files and sidecar, a brain mask on its grid, the
    files iqt-pipe must leave alone (dwiref, confounds, .b, an anatomical mask on another grid)
    and, with ``denoise_method``, the archived run configuration that records it."""
    dwi = root / "sub-01" / "dwi"
    dwi.mkdir(parents=True)
    (root / "sub-01" / "anat").mkdir()
    source = phantom / "sub-01/dwi/sub-01_dwi"
    stem = dwi / "sub-01_run-1_space-ACPC_desc-preproc_dwi"
    for ext in (".nii.gz", ".bval", ".bvec", ".json"):
        shutil.copy(f"{source}{ext}", f"{stem}{ext}")
    img = nb.load(f"{source}.nii.gz")
    if mask is not None:
        nb.save(
            nb.Nifti1Image(mask.astype(np.uint8), img.affine), dwi / "sub-01_run-1_space-ACPC_desc-brain_mask.nii.gz"
        )
    nb.save(nb.Nifti1Image(np.asarray(img.dataobj)[..., 0], img.affine), dwi / "sub-01_run-1_space-ACPC_dwiref.nii.gz")
    (dwi / "sub-01_run-1_desc-confounds_timeseries.tsv").write_text("framewise_displacement\nn/a\n")
    Path(f"{stem}.b").write_text("0 0 0 0\n")
    nb.save(
        nb.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)),
        root / "sub-01/anat/sub-01_space-ACPC_desc-brain_mask.nii.gz",
    )
    (root / "dataset_description.json").write_text(
        json.dumps(
            {
                "Name": "QSIPrep output",
                "BIDSVersion": "1.9.0",
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "qsiprep", "Version": "1.0.0"}],
            }
        )
    )
    if denoise_method is not None:
        log = root / "sub-01/log/20250101-120000_0a1b2c3d"
        log.mkdir(parents=True)
        (log / "qsiprep.toml").write_text(f'[workflow]\ndenoise_method = "{denoise_method}"\n')
    return root


@pytest.fixture(scope="module")
def qsiprep_run(tmp_path_factory):
    """The participant and group levels on a QSIPrep-style dataset whose brain mask differs
    from the one iqt-pipe would estimate (the phantom's mask without its top 4 slices), with
    the flags' defaults, so that nothing is denoised or corrected again."""
    tmp = tmp_path_factory.mktemp("qsiprep")
    phantom, model = tiny_dataset_and_model(tmp, n_subjects=1, seed=1)
    truth = nb.load(phantom / "derivatives/phantom-truth/sub-01/dwi/sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
    truth[..., -4:] = False
    root = qsiprep_like(phantom, tmp / "qsiprep", mask=truth)
    proc = iqt_pipe(root, tmp / "out", "participant", "--model", model, "-w", tmp / "work", *FAST)
    group = iqt_pipe(root, tmp / "out", "group")
    return tmp, truth, proc, group


@pytest.mark.slow  # shares one app run (participant + group, ~40-55 s on 2 cores)
def test_qsiprep_outputs_keep_the_inputs_entities_and_use_its_mask(qsiprep_run):
    tmp, given, proc, _ = qsiprep_run
    out = tmp / "out"
    assert dwi_outputs(out) == expected_dwi_outputs("sub-01/dwi/sub-01_run-1_space-ACPC")
    mask = nb.load(out / "sub-01/dwi/sub-01_run-1_space-ACPC_desc-brain_mask.nii.gz").get_fdata() > 0
    np.testing.assert_array_equal(mask, given)
    meta = json.loads((out / "sub-01/dwi/sub-01_run-1_space-ACPC_model-tensor_param-tensor_dwimap.json").read_text())
    assert meta["Sources"] == ["bids:raw:sub-01/dwi/sub-01_run-1_space-ACPC_desc-preproc_dwi.nii.gz"]
    assert "preprocessed beforehand by qsiprep" in (out / "logs/CITATION.md").read_text()
    assert "derivatives: preprocessed series" in proc.stdout


@pytest.mark.slow  # shares one app run (participant + group, ~40-55 s on 2 cores)
def test_qsiprep_series_are_not_denoised_again_and_the_difference_is_warned_once(qsiprep_run):
    """QSIPrep denoised (dwidenoise, its qsiprep.toml says); the tiny model was trained on
    series as acquired: nothing runs again, one warning line says so, the sidecars record
    what the series had."""
    tmp, _, proc, _ = qsiprep_run
    assert "denoise none, Gibbs removal off by iqt-pipe" in proc.stdout
    assert not [
        p
        for p in (tmp / "work").rglob("*")
        if p.is_dir() and p.name in ("denoise_mppca", "dwidenoise", "remove_gibbs", "mrdegibbs")
    ]
    warnings = [line for line in proc.stderr.splitlines() if "warning:" in line and "qsiprep.toml" in line]
    assert (
        len(warnings) == 1
        and "denoise_method dwidenoise" in warnings[0]
        and "trained on series with no denoising" in warnings[0]
    ), proc.stderr
    sr = json.loads(
        (tmp / "out/sub-01/dwi/sub-01_run-1_space-ACPC_res-hi_model-tensor_param-tensor_dwimap.json").read_text()
    )
    assert sr["Preprocessing"]["Denoise"] == "mrtrix" and sr["Preprocessing"]["MatchesModel"] is False


@pytest.mark.slow  # shares one app run (participant + group, ~40-55 s on 2 cores)
def test_the_group_level_finds_qsiprep_runs(qsiprep_run):
    tmp, _, _, group = qsiprep_run
    assert "group QC of 1 run(s)" in group.stdout
    header, row = ((tmp / "out/group_qc.tsv").read_text().splitlines()[i].split("\t") for i in (0, 1))
    assert dict(zip(header, row))["space"] == "ACPC" and dict(zip(header, row))["run"] == "1"


def test_a_mask_on_another_grid_is_refused_in_one_line(tmp_path):
    from iqt_pipe.bids import find_dwi_runs
    from iqt_pipe.dmri.preflight import check_run
    from iqt_pipe.io import InputError

    phantom = tiny_dataset_and_model(tmp_path, n_subjects=1, seed=1)[0]
    root = qsiprep_like(phantom, tmp_path / "qsiprep", mask=np.ones((5, 5, 5), bool))
    run = find_dwi_runs(root)[0]
    assert run.mask.name == "sub-01_run-1_space-ACPC_desc-brain_mask.nii.gz" and run.derivative
    with pytest.raises(InputError, match=r"is not on the grid of its DWI series .*or remove it") as exc:
        check_run(run, upsample=2)
    assert "\n" not in str(exc.value)


def test_what_qsiprep_recorded_decides_the_warnings(tmp_path):
    """Unknown (no qsiprep.toml): one line asking to check; recorded and matching the model:
    none; a step asked for again: one line; defaults follow the model for raw input only."""
    from iqt_pipe.bids import find_dwi_runs, upstream_steps
    from iqt_pipe.cli.parser import _settle_preprocessing
    from iqt_pipe.config import RunConfig

    phantom = tiny_dataset_and_model(tmp_path, n_subjects=1, seed=1)[0]
    unknown = find_dwi_runs(qsiprep_like(phantom, tmp_path / "a", denoise_method=None))
    known = find_dwi_runs(qsiprep_like(phantom, tmp_path / "b", denoise_method="patch2self"))
    assert unknown[0].upstream is None and upstream_steps(tmp_path / "b", "01").preprocessing.denoise == "dipy"

    def config(**kw):
        return RunConfig(
            bids_dir=tmp_path,
            output_dir=tmp_path / "o",
            analysis_level="participant",
            work_dir=tmp_path / "w",
            input_derivatives=True,
            model_denoise="dipy",
            model_degibbs=False,
            **kw,
        )

    assert len(lines := config().upstream_warnings(unknown)) == 1 and "do not record" in lines[0]
    assert config().upstream_warnings(known) == [] and config().preprocessing_warning() is None
    again = config(denoise="dipy").upstream_warnings(known)
    assert len(again) == 1 and "denoising again" in again[0]
    card = {"training": {"preprocessing": {"denoise": "dipy", "degibbs": True}}}
    for derivative, settled in ((True, ("none", False)), (False, ("dipy", True))):
        args = Namespace(model_card=card, denoise=None, degibbs=None, input_derivatives=derivative)
        _settle_preprocessing(args)
        assert (args.denoise, args.degibbs) == settled
