"""Command lines and Nipype interfaces of the foundation: iqt-pipe, iqt-degrade, FitDTI,
DegradeDWI; the README's Quick start is what CI runs."""

import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from helpers import REPO, venv_tool

from iqt_pipe import __version__
from iqt_pipe.cli import degrade as degrade_cli
from iqt_pipe.cli import run as run_cli
from iqt_pipe.dmri import dti
from iqt_pipe.io import load_nifti
from iqt_pipe.sims.dataset import write_bids_dataset


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    root = write_bids_dataset(tmp_path_factory.mktemp("ph") / "ds", preset="tiny", seed=2, snr=None)
    return root / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"


def test_iqt_pipe_version_and_help():
    exe = venv_tool("iqt-pipe")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"iqt-pipe {__version__}"
    helptext = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "bids_dir" in helptext and "participant" in helptext
    assert run_cli._build_parser().parse_args(["a", "b", "group"]).analysis_level == "group"


def test_iqt_degrade_writes_world_frame_pair(phantom_run, tmp_path, capsys):
    assert degrade_cli.main([str(phantom_run), "-o", str(tmp_path), "-r", "2"]) == 0
    stem = tmp_path / "sub-01"
    lr, lr_aff, _ = load_nifti(f"{stem}_res-lo_dwi.nii.gz")
    hr_t, hr_aff, _ = load_nifti(f"{stem}_res-hi_model-tensor_param-tensor_dwimap.nii.gz")
    src = nb.load(phantom_run)
    assert lr.shape[:3] == tuple(s // 2 for s in src.shape[:3]) and lr.shape[3] == src.shape[3]
    np.testing.assert_allclose(nb.affines.voxel_sizes(lr_aff), 2 * nb.affines.voxel_sizes(src.affine))
    sidecar = json.loads(Path(f"{stem}_res-hi_model-tensor_param-tensor_dwimap.json").read_text())
    assert sidecar["OrientationEncoding"]["Reference"] == "xyz" and sidecar["Units"] == "mm^2/s"
    # Noise-free phantom: the HR fit equals the world-frame ground truth.
    truth, _, _ = load_nifti(
        phantom_run.parents[2] / "derivatives/phantom-truth/sub-01/dwi/sub-01_model-tensor_param-tensor_dwimap.nii.gz"
    )
    mask = load_nifti(f"{stem}_res-hi_desc-brain_mask.nii.gz")[0] > 0
    crop = truth[: hr_t.shape[0], : hr_t.shape[1], : hr_t.shape[2]]
    np.testing.assert_allclose(hr_t[mask], crop[mask], atol=2e-6)
    assert "res-lo" in capsys.readouterr().out


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "in_dwi.bvec").unlink(), r"in_dwi.bvec: bvec file not found"),
        (lambda d: (d / "in_dwi.bval").write_text("0 1000"), r"2 b-values but in_dwi.bvec has"),
        (lambda d: (d / "in_dwi.nii.gz").write_bytes(b"not an image"), r"in_dwi.nii.gz: cannot read as NIfTI"),
    ],
    ids=["missing bvec", "bval count", "corrupt nifti"],
)
def test_iqt_degrade_bad_input_one_line_exit_2_nothing_written(phantom_run, tmp_path, damage, message):
    src = tmp_path / "src"
    src.mkdir()
    for ext in (".nii.gz", ".bval", ".bvec"):
        (src / f"in_dwi{ext}").write_bytes(phantom_run.with_name("sub-01_dwi" + ext).read_bytes())
    damage(src)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "iqt_pipe.cli.degrade", str(src / "in_dwi.nii.gz"), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]) and "Traceback" not in proc.stderr
    assert not out.exists()


def test_fitdti_and_degrade_interfaces(phantom_run, tmp_path):
    from iqt_pipe.interfaces import DegradeDWI, FitDTI

    bval, bvec = phantom_run.with_suffix("").with_suffix(".bval"), phantom_run.with_suffix("").with_suffix(".bvec")
    for sub in ("fit", "deg"):
        (tmp_path / sub).mkdir()
    fit = FitDTI(dwi_file=str(phantom_run), bval_file=str(bval), bvec_file=str(bvec))
    fit_res = fit.run(cwd=str(tmp_path / "fit"))
    out = fit_res.outputs
    tensors, affine, _ = load_nifti(out.tensor_file)
    fa = load_nifti(out.fa_file)[0]
    mask = load_nifti(out.mask_file)[0] > 0
    np.testing.assert_allclose(fa[mask], dti.scalar_maps(tensors[mask])["fa"], atol=1e-5)
    deg = DegradeDWI(dwi_file=str(phantom_run), bval_file=str(bval), bvec_file=str(bvec), upsample=3).run(
        cwd=str(tmp_path / "deg")
    )
    lr = nb.load(deg.outputs.dwi_file)
    assert lr.shape[:3] == tuple(s // 3 for s in nb.load(phantom_run).shape[:3])
    assert Path(deg.outputs.bval_file).read_text() == bval.read_text()


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert len(commands) == 2, "the Quick start has exactly two commands"
    ci = (REPO / ".ci/run").read_text()
    assert commands[1] in ci
    for cmd in commands:
        assert (REPO / cmd.split()[-1]).exists()
