"""Shared fixtures: the real-data folder and MRtrix3 availability (helpers are in helpers.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import REALDWI

os.environ.setdefault("NIPYPE_NO_ET", "1")


@pytest.fixture(scope="session")
def realdwi() -> Path:
    if not (REALDWI / "dataset_description.json").exists():
        pytest.skip(f"real-data tests need ../shared/data/ds-realdwi (not found at {REALDWI})")
    return REALDWI


@pytest.fixture(scope="session")
def mrtrix():
    if shutil.which("dwi2tensor") is None:
        pytest.skip("MRtrix3 not installed (scripts/setup.sh installs it as root; or conda install -c mrtrix3 mrtrix3)")
    return True
