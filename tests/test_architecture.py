"""The package's shape stays as the README's Layout section draws it: lint and format clean, the data
path in sub-packages, short functions, science code that never imports the test-data generator, and
Nipype only in interfaces/ and workflows/."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CODE = ("iqt_pipe", "interfaces", "workflows")
#: The most modules directly under iqt_pipe/ (the rest live in sub-packages named after the data path).
MAX_TOP_MODULES = 8
MAX_FUNCTION_LINES = 100


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.exists():
        return [str(exe)]
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")


def _modules(*folders: str):
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_is_clean(command):
    done = subprocess.run(_ruff() + command + ["."], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, f"ruff {' '.join(command)}:\n{done.stdout[-4000:]}{done.stderr[-2000:]}"


def test_few_modules_at_the_top_of_the_package():
    top = sorted(p.name for p in (REPO / "iqt_pipe").glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top


def test_no_long_functions():
    long = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, tree in _modules(*CODE)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long


def _imports(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_science_never_imports_the_phantom():
    """The forward model and noise live in iqt_pipe.dmri.signal; iqt_pipe.sims is test and demo data."""
    offenders = [
        str(path.relative_to(REPO))
        for path, tree in _modules(*CODE)
        if "sims" not in path.parts
        and path.name != "phantom.py"
        and any(name.startswith("iqt_pipe.sims") for name in _imports(tree))
    ]
    assert not offenders, offenders


def test_nipype_only_in_interfaces_and_workflows():
    """Science is plain functions and torch modules; the command line (iqt_pipe/cli) runs the workflows."""
    offenders = [
        str(path.relative_to(REPO))
        for path, tree in _modules("iqt_pipe")
        if "cli" not in path.parts and any(name == "nipype" or name.startswith("nipype.") for name in _imports(tree))
    ]
    assert not offenders, offenders
