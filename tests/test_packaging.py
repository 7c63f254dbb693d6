"""The design card's layout installs as one package: ``interfaces/`` and ``workflows/``
import as ``iqt_pipe.interfaces`` and ``iqt_pipe.workflows`` from an editable install and
from a wheel in a fresh virtual environment, used outside the repository."""

import configparser
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from helpers import REPO

PROBE = (
    "import iqt_pipe, iqt_pipe.interfaces, iqt_pipe.workflows, iqt_pipe.data;"
    "print(iqt_pipe.__file__); print(iqt_pipe.interfaces.__file__); print(iqt_pipe.workflows.__file__)"
)


def run(cmd, cwd):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, check=True, capture_output=True, text=True).stdout


def test_every_package_directory_is_listed_in_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    mapping = dict(line.split(" = ") for line in cfg["options"]["package_dir"].strip().splitlines())
    found = set()
    for pkg, folder in mapping.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((pkg,) + rel))
    assert found == listed


def test_editable_install_imports_from_outside_the_repo(tmp_path):
    files = run([sys.executable, "-c", PROBE], cwd=tmp_path).split()
    assert Path(files[0]).parent == REPO / "iqt_pipe"
    assert Path(files[1]).parent == REPO / "interfaces"
    assert Path(files[2]).parent == REPO / "workflows"
    exe = Path(sys.executable).parent / "iqt-pipe"
    assert run([exe, "--version"], cwd=tmp_path).startswith("iqt-pipe ")


def test_wheel_installs_into_a_fresh_venv(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("iqt_pipe", "interfaces", "workflows"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src],
        cwd=tmp_path,
    )
    wheel = next((tmp_path / "dist").glob("iqt_pipe-*.whl"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    py = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", wheel], cwd=tmp_path)
    # Dependencies come from the test environment's site-packages (added after the fresh
    # venv's own, and without running its .pth files, so the editable install stays out).
    site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    files = run([py, "-c", PROBE], cwd=tmp_path).split()
    for f in files:
        assert Path(f).is_relative_to(site), f"{f} does not come from the wheel"
    assert (Path(files[0]).parent / "data").is_dir()
    assert run([venv / "bin" / "iqt-pipe", "--version"], cwd=tmp_path).startswith("iqt-pipe ")
