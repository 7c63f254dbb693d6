"""iqt-pipe on a real SLURM cluster: the shipped job-array script (``sbatch --array``, one
participant per task, one shared output folder), the shipped Nipype plugin file through
``--use-plugin`` (every node a SLURM job), failures reported as failures, and the torchrun
training script under ``srun``.

The cluster is Debian's munge + slurmctld + slurmd on this machine, started for this module
and stopped afterwards by :mod:`slurm_cluster` (root only; otherwise the tests that need it
skip with the reason). Jobs run the venv's ``iqt-pipe`` on two tiny synthetic subjects and an
untrained model, as in test_bids_app.py. The last tests check the job-array script's command
line and refusals without a cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, tiny_dataset_and_model, venv_tool
from slurm_cluster import ClusterUnavailable, start_cluster

ARRAY_SCRIPT = REPO / "containers" / "slurm" / "iqt-pipe-array.sbatch"
TRAIN_SCRIPT = REPO / "containers" / "slurm" / "iqt-train-ddp.sbatch"
SLURM_PLUGIN = REPO / "containers" / "slurm" / "slurm.yml"
EXPECTED = json.loads((REPO / "tests/data/expected_participant_outputs.json").read_text())
FAST = ["--skip-bids-validation", "--denoise", "dipy", "--no-degibbs", "--mc-samples", "2", "--omp-nthreads", "1"]
#: What one array task asks SLURM for (the script's defaults, 8 CPUs and 16 GB, suit real data).
TASK = ["--cpus-per-task=1", "--mem=1G"]


def iqt_pipe_exe() -> str:
    exe = venv_tool("iqt-pipe")
    if exe is None:
        pytest.skip("the iqt-pipe console script is not installed (bash scripts/setup.sh)")
    return exe


@pytest.fixture(scope="module")
def cluster():
    try:
        running = start_cluster()
    except ClusterUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm-data")
    root, _ = tiny_dataset_and_model(tmp, n_subjects=2, seed=1)
    return root, tmp / "model"


def submit_array(cluster, tmp: Path, bids: Path, model: Path, participants: str, array: str) -> str:
    listing = tmp / "participants.txt"
    listing.write_text(participants)
    return cluster.sbatch(
        f"--array={array}",
        *TASK,
        f"--output={tmp}/slurm-%A_%a.out",
        ARRAY_SCRIPT,
        bids,
        tmp / "out",
        listing,
        "--model",
        model,
        *FAST,
        env={"IQT_PIPE": iqt_pipe_exe(), "IQT_WORK_ROOT": str(tmp / "work")},
    )


def tasks(cluster, job_id: str) -> dict[str, dict]:
    """The array's tasks by task id, from ``scontrol show job``."""
    return {r["ArrayTaskId"]: r for r in cluster.jobs(job_id)}


def digests(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("sub-*/dwi/*"))
    }


def outputs(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def array_run(cluster, data, tmp_path_factory):
    """Two participants as a two-task job array (labels with and without ``sub-``)."""
    bids, model = data
    tmp = tmp_path_factory.mktemp("array")
    job = submit_array(cluster, tmp, bids, model, "# participants\nsub-01\n\n02\n", "1-2")
    cluster.wait(timeout=600)
    return tmp, job


@pytest.mark.slurm
@pytest.mark.slow
def test_job_array_runs_one_participant_per_task_into_one_output_folder(cluster, array_run):
    tmp, job = array_run
    found = tasks(cluster, job)
    assert sorted(found) == ["1", "2"]
    for task, label in (("1", "01"), ("2", "02")):
        record = found[task]
        log = Path(record["StdOut"]).read_text()
        assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log[-3000:]
        assert record["NumCPUs"] == "1" and record["ArrayJobId"] == job
        assert f"task {task} (job {job})" in log and f"sub-{label}, work folder {tmp / 'work' / f'sub-{label}'}" in log
        assert "finished; derivatives in" in log
        assert (tmp / "work" / f"sub-{label}" / "iqt_wf").is_dir()  # its own work folder
    files = outputs(tmp / "out")
    for sub in ("sub-01", "sub-02"):
        assert {f.replace("sub-01", sub) for f in EXPECTED["files"]} <= files
    description = json.loads((tmp / "out" / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert (tmp / "out" / ".bidsignore").read_text().count("*_dwimap.*") == 1


@pytest.mark.slurm
@pytest.mark.slow
def test_nipype_slurm_plugin_gives_the_array_outputs(cluster, data, array_run, tmp_path):
    """The shipped plugin file, unchanged: every node a SLURM job, same bytes as the array."""
    bids, model = data
    proc = subprocess.run(
        [
            iqt_pipe_exe(),
            bids,
            tmp_path / "out",
            "participant",
            "--model",
            model,
            "-w",
            tmp_path / "work",
            "--nprocs",
            "1",
            *FAST,
            "--use-plugin",
            SLURM_PLUGIN,
        ],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nipype SLURM (from" in proc.stdout
    # The nodes that did the work went through sbatch: their job logs and SLURM's records.
    batch = tmp_path / "work" / "iqt_wf" / "batch"
    job_logs = sorted(batch.glob("slurm-*.out"))
    ids = [p.stem.split("-")[1] for p in job_logs]
    names = {r["JobName"] for i in ids for r in cluster.jobs(i)}
    for node in ("denoise_mppca", "fit_dti", "super_resolve"):
        for sub in ("sub_01", "sub_02"):
            assert any(n.startswith(f"{node}.") and f".{sub}_wf." in n for n in names), (node, sub, names)
    assert all(r["JobState"] == "COMPLETED" for i in ids for r in cluster.jobs(i))
    array_out = array_run[0] / "out"
    assert digests(tmp_path / "out") == digests(array_out) and len(digests(array_out)) > 0


@pytest.mark.slurm
def test_a_failing_array_task_is_reported_failed_with_its_message(cluster, data, tmp_path):
    bids, model = data
    broken = tmp_path / "ds"
    shutil.copytree(bids, broken)
    (broken / "sub-02/dwi/sub-02_dwi.bvec").write_text("0 1 0\n0 0 1\n")
    job = submit_array(cluster, tmp_path, broken, model, "01\n02\n", "2")
    cluster.wait(timeout=600)
    (record,) = tasks(cluster, job).values()
    assert record["JobState"] == "FAILED" and record["ExitCode"] != "0:0"
    # The message: on the task's stderr (bad input, exit 2) or in a crash file it points to (exit 1).
    text = Path(record["StdOut"]).read_text()
    text += "".join(p.read_text() for p in (tmp_path / "out").glob("sub-02/log/*/crash-*.txt"))
    assert "sub-02_dwi.bvec" in text, text[-3000:]
    assert not list((tmp_path / "out").glob("sub-02/dwi/*"))


def _run_until_first_job(cluster, cmd: list, then) -> subprocess.CompletedProcess:
    """Start ``cmd`` (iqt-pipe with the SLURM plugin), call ``then(job_id)`` as soon as its
    first node is in the queue, and wait for it to end."""
    proc = subprocess.Popen(
        [str(c) for c in cmd], env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        end = time.monotonic() + 120
        while not (queued := cluster.queued()):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < end, "no job was submitted"
            time.sleep(0.05)
        then(queued[0])
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.slurm
def test_a_failing_node_job_is_reported_by_the_plugin(cluster, data, tmp_path):
    """A node that raises inside its SLURM job (here the super-resolution: the model file
    vanished after the run started, as on a purged scratch folder) fails the run with exit
    code 1 and a crash file naming the cause; the nodes before it ran as jobs."""
    bids, model = data
    mine = tmp_path / "model"
    shutil.copytree(model, mine)
    cmd = [
        iqt_pipe_exe(),
        bids,
        tmp_path / "out",
        "participant",
        "--participant-label",
        "01",
        "--model",
        mine,
        "-w",
        tmp_path / "work",
        "--nprocs",
        "1",
        *FAST,
        "--use-plugin",
        SLURM_PLUGIN,
    ]
    proc = _run_until_first_job(cluster, cmd, lambda job: shutil.rmtree(mine))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "crash report" in proc.stderr
    (crash,) = (tmp_path / "out").glob("sub-01/log/*/crash-*super_resolve*.txt")
    text = crash.read_text()
    assert str(mine) in text and "not found" in text
    assert not list((tmp_path / "out").glob("sub-01/dwi/*res-hi*"))
    assert (tmp_path / "work/iqt_wf/sub_01_wf/dwi_wf/dti_wf/fit_dti").is_dir()


@pytest.mark.slurm
def test_a_node_job_that_dies_fails_the_run(cluster, data, tmp_path):
    """A job killed by SLURM (cancelled here; a time or memory limit, preemption or a node
    failure alike) leaves no result file: the run must end with a failure and a crash report
    (iqt-pipe works around nipy/nipype#3372, where writing that report fails), not wait forever."""
    bids, model = data
    cancelled = []

    def cancel(job: str) -> None:
        cluster.run("scancel", job)
        cancelled.append(job)

    cmd = [
        iqt_pipe_exe(),
        bids,
        tmp_path / "out",
        "participant",
        "--participant-label",
        "01",
        "--model",
        model,
        "-w",
        tmp_path / "work",
        "--nprocs",
        "1",
        *FAST,
        "--use-plugin",
        SLURM_PLUGIN,
    ]
    proc = _run_until_first_job(cluster, cmd, cancel)
    assert proc.returncode == 1, proc.stderr[-3000:]
    (record,) = cluster.jobs(cancelled[0])
    assert record["JobState"] == "CANCELLED"
    assert not list((tmp_path / "out").glob("sub-01/dwi/*res-hi*"))
    assert "1 crash report(s)" in proc.stderr and "TypeError" not in proc.stderr, proc.stderr[-3000:]
    (crash,) = (tmp_path / "out").glob("sub-01/log/*/crash-*.txt")
    assert "could not be found" in crash.read_text()


@pytest.mark.slurm
def test_training_script_runs_torchrun_under_srun(cluster, data, tmp_path):
    """The shipped training script: srun starts torchrun, torchrun two CPU processes that meet
    through the c10d rendezvous on the job's node; one model is written, by rank 0."""
    import socket

    bids, _ = data
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "model"
    env = {
        "IQT_NPROC_PER_NODE": "2",
        "IQT_RDZV_PORT": str(port),
        "IQT_TORCHRUN": f"{sys.executable} -m torch.distributed.run",
        "OMP_NUM_THREADS": "1",
    }
    job = cluster.sbatch(
        "--cpus-per-task=2",
        f"--output={tmp_path}/train-%j.out",
        TRAIN_SCRIPT,
        bids,
        "-o",
        out,
        "--patches-per-subject",
        "12",
        "--epochs",
        "1",
        "--variant",
        "espcn",
        "--device",
        "cpu",
        "-q",
        env=env,
    )
    cluster.wait(timeout=600)
    (record,) = cluster.jobs(job)
    log = Path(record["StdOut"]).read_text()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log[-3000:]
    assert f"1 node(s) × 2 process(es), rendezvous localhost:{port}" in log
    assert "× 2 process(es)" in log and log.count("best epoch") == 1
    card = json.loads((out / "model.json").read_text())
    assert card["training"]["world_size"] == 2


# -- without a cluster ---------------------------------------------------------------------


def test_the_cluster_says_why_it_cannot_start(monkeypatch):
    import slurm_cluster

    monkeypatch.setattr(slurm_cluster.os, "geteuid", lambda: 1000)
    with pytest.raises(ClusterUnavailable, match="needs root"):
        start_cluster()
    monkeypatch.setattr(slurm_cluster.os, "geteuid", lambda: 0)
    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda name, path=None: None)
    with pytest.raises(ClusterUnavailable, match=r"not installed \(munged, slurmctld, slurmd, sbatch"):
        start_cluster()


def _script(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(
        ["bash", ARRAY_SCRIPT, *map(str, args)],
        env={**clean, "IQT_PIPE": "echo", **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_array_script_builds_the_iqt_pipe_command(tmp_path):
    listing = tmp_path / "participants.tsv"
    listing.write_text("participant_id\tage\nsub-01\t30\n# excluded\n\nsub-07\t41\n")
    proc = _script(
        "/data/bids",
        "/data/out",
        listing,
        "--device",
        "cuda",
        env={"SLURM_ARRAY_TASK_ID": "2", "SLURM_CPUS_PER_TASK": "6", "IQT_WORK_ROOT": "/scratch/w"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "/data/bids",
        "/data/out",
        "participant",
        "--participant-label",
        "07",
        "-w",
        "/scratch/w/sub-07",
        "--nprocs",
        "6",
        "--device",
        "cuda",
    ]
    # an explicit --nprocs or a plugin file wins over the allocation
    proc = _script("/b", "/o", listing, "--use-plugin", "slurm.yml", env={"IQT_TASK_ID": "1"})
    assert "--nprocs" not in proc.stdout.split() and "--participant-label 01" in proc.stdout
    assert "-w " + str(Path.cwd() / "iqt-work" / "sub-01") in proc.stdout


@pytest.mark.parametrize(
    "args, env, message",
    [
        ([], {}, "usage: sbatch --array=1-N"),
        (["b", "o", "LIST"], {}, "no array task id"),
        (["b", "o", "missing.txt"], {"IQT_TASK_ID": "1"}, "participants file missing.txt not found"),
        (
            ["b", "o", "LIST"],
            {"IQT_TASK_ID": "3"},
            "array task 3: LIST lists fewer participants; submit with --array=1-2",
        ),
    ],
)
def test_array_script_refuses_with_one_line(tmp_path, args, env, message):
    listing = tmp_path / "p.txt"
    listing.write_text("01\n02\n")
    args = [str(listing) if a == "LIST" else a for a in args]
    proc = _script(*args, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert message.replace("LIST", str(listing)) in proc.stderr and proc.stderr.count("\n") == 1
