"""How long a job-array task of ``iqt-pipe … participant`` takes before its workflow starts,
on a dataset of thousands of subjects (run on demand, not a test):

    .venv/bin/python benchmarks/bids_index.py [--subjects 2000] [--participant 0001] [--keep DIR]

It writes a BIDS dataset of N subjects with tiny images (8×8×8 voxels, b = 0 + 6 directions,
JSON sidecars; ~7 KB a subject) in which one other subject's files are broken (a truncated
image, a sidecar that is not JSON), then runs the participant level for one subject, with BIDS
validation, in this process up to the moment the Nipype workflow would start, and prints the
time of each step. Goal (issue 21): ≤ 5 s in all on 2 cores, and the broken subject does not
stop the run. The dataset-dependent steps are the validation and the index; the rest (imports,
the model's checksum, the workflow's construction) costs the same for a dataset of one.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402 - the clock starts before any import
import gzip  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

BVALS = [0, 1000, 1000, 1000, 1000, 1000, 1000]
BVECS = np.array(
    [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.7071, 0.7071, 0], [0.7071, 0, 0.7071], [0, 0.7071, 0.7071]]
).T
SIDECAR = {"RepetitionTime": 5.0, "EchoTime": 0.08, "PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.05}


def write_stub_dataset(root: Path, n_subjects: int, broken: str | None = None) -> list[str]:
    """N subjects ``sub-0001`` … of one tiny DWI series each (the same bytes, so writing 2000
    takes a second); ``broken``: the label whose image is truncated and whose sidecar is not
    JSON. Returns the labels."""
    import nibabel as nb

    rng = np.random.default_rng(0)
    data = (1000 * np.exp(-np.array(BVALS) * 1e-3) * (1 + 0.05 * rng.standard_normal((8, 8, 8, 7)))).astype(np.int16)
    img = nb.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header.set_xyzt_units("mm", "sec")
    image = gzip.compress(img.to_bytes(), mtime=0)
    labels = [f"{i:04d}" for i in range(1, n_subjects + 1)]
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "stub dataset", "BIDSVersion": "1.9.0", "DatasetType": "raw", "Authors": ["iqt-pipe"]})
    )
    (root / "README").write_text("Tiny DWI series for benchmarks/bids_index.py: every subject's files are the same.\n")
    (root / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{label}\n" for label in labels))
    bval = " ".join(map(str, BVALS)) + "\n"
    bvec = "\n".join(" ".join(f"{x:g}" for x in row) for row in BVECS) + "\n"
    for label in labels:
        folder = root / f"sub-{label}" / "dwi"
        folder.mkdir(parents=True)
        stem = folder / f"sub-{label}_dwi"
        bad = label == broken
        Path(f"{stem}.nii.gz").write_bytes(image[: len(image) // 2] if bad else image)
        Path(f"{stem}.bval").write_text(bval)
        Path(f"{stem}.bvec").write_text(bvec)
        Path(f"{stem}.json").write_text("{ not json" if bad else json.dumps(SIDECAR))
    return labels


def time_participant_start(bids_dir: Path, label: str, tmp: Path) -> dict[str, float]:
    """Run ``iqt-pipe BIDS_DIR OUT participant --participant-label LABEL`` in this process and
    stop it where the workflow would start; returns the seconds of each step."""
    timings: dict[str, float] = {}

    def timed(module, name: str, key: str):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0

        setattr(module, name, wrapper)

    class WorkflowStarts(BaseException):
        """Raised where ``workflow.run`` would be called (not an Exception: nothing catches it)."""

    t_import = time.perf_counter()
    import iqt_pipe.bids as bids
    import iqt_pipe.cli.run as run
    import iqt_pipe.workflows as workflows

    timings["imports (iqt_pipe.cli)"] = time.perf_counter() - t_import
    timed(run, "parse_args", "command line and model checks")
    timed(run, "validate_bids", "BIDS validation (selected participant)")
    timed(bids, "find_dwi_runs", "BIDS index and query")
    timed(run, "preflight", "preflight checks of the run")
    timed(workflows, "init_iqt_wf", "building the workflow (imports Nipype, niworkflows)")

    def stop(*args, **kwargs):
        raise WorkflowStarts

    run.plugin_instance = stop
    argv = [
        str(bids_dir),
        str(tmp / "out"),
        "participant",
        "--participant-label",
        label,
        "-w",
        str(tmp / "work"),
        "--denoise",
        "none",
        "--no-degibbs",
        "--nprocs",
        "1",
    ]
    t0 = time.perf_counter()
    try:
        rc = run.main(argv)
    except WorkflowStarts:
        rc = None
    timings["main() up to the workflow's start"] = time.perf_counter() - t0
    if rc is not None:
        sys.exit(f"the participant level ended (exit code {rc}) before its workflow started; see the messages above")
    return timings


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, default=2000)
    p.add_argument("--participant", default="0001", help="the participant the task runs (default: 0001)")
    p.add_argument("--broken", default="0002", help="the participant whose files are broken (default: 0002)")
    p.add_argument("--keep", type=Path, help="write the dataset here and keep it (default: a temporary folder)")
    args = p.parse_args()
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    with tempfile.TemporaryDirectory(prefix="iqt-bids-index.") as tmp:
        tmp = Path(tmp)
        root = args.keep or tmp / "ds"
        t0 = time.perf_counter()
        write_stub_dataset(root, args.subjects, broken=args.broken)
        written = time.perf_counter() - t0
        before = time.perf_counter() - START - written
        timings = time_participant_start(root, args.participant, tmp)
    total = before + timings["imports (iqt_pipe.cli)"] + timings["main() up to the workflow's start"]
    print(
        f"\n{args.subjects} subjects (sub-{args.broken} broken) written in {written:.1f} s; "
        f"participant sub-{args.participant}, {os.cpu_count()} CPU(s):"
    )
    for key, seconds in timings.items():
        print(f"  {key:<42} {seconds:6.2f} s")
    print(f"  {'total before the workflow starts':<42} {total:6.2f} s   (goal: ≤ 5 s)")


if __name__ == "__main__":
    main()
