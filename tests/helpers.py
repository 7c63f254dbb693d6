"""What several test modules share: the repository and real-data paths, the venv's tools, a
tiny dataset and model for end-to-end runs, and an MRtrix3 that fails on purpose. Import it as
``from helpers import …`` (pytest puts tests/ on the path); the fixtures are in conftest.py."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REALDWI = Path(os.environ.get("IQT_REALDWI", REPO.parent / "shared" / "data" / "ds-realdwi"))


def venv_tool(name: str) -> str | None:
    """A console script installed beside the running interpreter, else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def real_runs(root: Path = REALDWI) -> list[Path]:
    """Every DWI NIfTI of the real dataset (empty when it is absent)."""
    return sorted(root.glob("sub-*/dwi/*_dwi.nii.gz")) if root.exists() else []


def mrtrix_failing_on(tmp_path: Path, pattern: str) -> dict[str, str]:
    """An environment whose MRtrix3 ``dwidenoise``/``mrdegibbs`` fail (exit 1, an MRtrix-style
    error line) when an argument contains ``pattern`` and run the real tool otherwise: a
    step that fails at run time on inputs that pass every check. Skips without MRtrix3."""
    if shutil.which("dwidenoise") is None or shutil.which("mrdegibbs") is None:
        pytest.skip("MRtrix3 not installed (scripts/setup.sh installs it as root)")
    bin_dir = tmp_path / "failing-mrtrix"
    bin_dir.mkdir()
    for tool in ("dwidenoise", "mrdegibbs"):
        script = bin_dir / tool
        script.write_text(f"""#!/bin/sh
case "$*" in *{pattern}*) echo "{tool}: [ERROR] simulated scanner-file failure" >&2; exit 1;; esac
exec {shutil.which(tool)} "$@"
""")
        script.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def tiny_dataset_and_model(tmp: Path, n_subjects: int = 1, seed: int = 1, snr: float = 30) -> tuple[Path, Path]:
    """A tiny synthetic BIDS dataset (``tmp/ds``) and an untrained hetero-var2 r = 2 model
    (``tmp/model``, weights from seed 0): the inputs of the end-to-end tests, which check the
    plumbing, not the accuracy."""
    import torch

    from iqt_pipe.models import IQTNet, save_model
    from iqt_pipe.sims.dataset import write_bids_dataset

    root = write_bids_dataset(tmp / "ds", n_subjects=n_subjects, preset="tiny", seed=seed, snr=snr)
    torch.manual_seed(0)
    save_model(IQTNet("hetero-var2", 2), tmp / "model" / "model.safetensors", {"target": "residual-cubic"})
    return root, tmp / "model"
