"""Interrupted runs: ``iqt-pipe participant`` killed with SIGKILL (no chance to clean up) at
several points, then rerun with the same work folder, completes, reuses the work finished
before the kill, never leaves a partial file in the output folder, and writes outputs equal,
byte for byte, to those of an uninterrupted run (same inputs, seed and device: determinism).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nb
import pytest
from helpers import tiny_dataset_and_model

FAST = [
    "--denoise",
    "dipy",
    "--no-degibbs",
    "--mc-samples",
    "2",
    "--nprocs",
    "2",
    "--omp-nthreads",
    "1",
    "--skip-bids-validation",
    "--seed",
    "7",
]
SUB = "iqt_wf/sub_01_wf"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    root, _ = tiny_dataset_and_model(tmp, n_subjects=1, seed=5)
    return root, tmp / "model"


def _command(data, out: Path, work: Path) -> list[str]:
    root, model = data
    return [
        sys.executable,
        "-m",
        "iqt_pipe.cli.run",
        str(root),
        str(out),
        "participant",
        "--model",
        str(model),
        "-w",
        str(work),
        *FAST,
    ]


def _digests(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("sub-*/dwi/*"))
    }


def _run_until(cmd: list[str], ready, timeout: float = 600) -> bool:
    """Start ``cmd`` in its own process group; SIGKILL the whole group (MultiProc workers
    included) as soon as ``ready()`` holds. Returns whether it was killed before finishing."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return False


def _assert_no_partial_files(out: Path) -> None:
    """Every file in the output folder is whole: NIfTI decompress to the end, JSON parses,
    and no temporary file is left beside them."""
    for path in out.rglob("*"):
        if not path.is_file():
            continue
        assert ".tmp" not in path.name, f"temporary file left behind: {path}"
        if path.name.endswith(".nii.gz"):
            nb.load(path).get_fdata()
        elif path.suffix == ".json":
            json.loads(path.read_text())


def _result(work: Path, node: str) -> Path:
    return next((work / SUB).glob(f"**/{node}/result_{node}.pklz"))


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume(data, tmp_path):
    reference = tmp_path / "ref"
    subprocess.run(_command(data, reference / "out", reference / "work"), check=True, capture_output=True, timeout=600)
    expected = _digests(reference / "out")
    assert len(expected) >= 20

    out, work = tmp_path / "out", tmp_path / "work"
    cmd = _command(data, out, work)
    nodes = work / SUB
    points = {
        # while the denoising node runs (nothing finished downstream)
        "preprocessing": lambda: any(nodes.glob("**/denoise_mppca/_report")),
        # the DTI fit finished, the super-resolution node started
        "super-resolution": lambda: any(nodes.glob("**/super_resolve/_report")),
        # some derivatives written, others not yet
        "writing outputs": lambda: (out / "sub-01" / "dwi").is_dir() and any((out / "sub-01" / "dwi").iterdir()),
    }
    killed_at = []
    for name, ready in points.items():
        if _run_until(cmd, ready):
            killed_at.append(name)
        _assert_no_partial_files(out)
    assert {"preprocessing", "super-resolution"} <= set(killed_at), killed_at
    fit = _result(work, "fit_dti")
    stamp = fit.stat().st_mtime_ns

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert fit.stat().st_mtime_ns == stamp, "the DTI fit finished before the kill ran again"
    _assert_no_partial_files(out)
    assert _digests(out) == expected


def test_a_data_sink_that_fails_half_way_leaves_the_output_folder_untouched(tmp_path, monkeypatch):
    """The sink writes in its own folder first: a copy that dies half-way (as under SIGKILL)
    leaves the previous output as it was and no partial or temporary file beside it."""
    import numpy as np

    import iqt_pipe.interfaces.bids as iqt_bids
    from iqt_pipe.interfaces.bids import DerivativesDataSink

    source = tmp_path / "ds" / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"
    source.parent.mkdir(parents=True)
    nb.save(nb.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), source)

    def sink(value: float):
        image = tmp_path / f"fa{int(value)}.nii.gz"
        nb.save(nb.Nifti1Image(np.full((4, 4, 4), value, np.float32), np.eye(4)), image)
        node = DerivativesDataSink(
            base_directory=str(tmp_path / "out"),
            source_file=str(source),
            in_file=str(image),
            model="tensor",
            param="fa",
            suffix="dwimap",
            check_hdr=False,
            meta_dict={"Description": f"value {value}"},
        )
        cwd = tmp_path / f"node{int(value)}"
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        return node.run()

    result = sink(1.0)
    dest = Path(result.outputs.out_file)
    assert dest.parent == tmp_path / "out" / "sub-01" / "dwi" and nb.load(dest).get_fdata().max() == 1.0
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}

    def dies_half_way(src, dst, *args, **kwargs):
        Path(dst).write_bytes(Path(src).read_bytes()[:40])
        raise OSError("killed while copying")

    monkeypatch.setattr(iqt_bids, "_copy_reproducible_gzip", dies_half_way)  # the sink's copy
    with pytest.raises(OSError, match="killed while copying"):
        sink(2.0)
    after = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert after == before  # same files, same bytes: nothing partial, nothing temporary
