"""Wall time, peak memory and per-stage share of a default ``iqt-pipe participant`` run
(run on demand, not a test):

    .venv/bin/python benchmarks/participant.py --model MODEL [--subject achieva01] [--bids DIR]

Defaults: ../shared/data/ds-realdwi, sub-achieva01, default options (the model's preprocessing,
8 MC samples with the 8 test-time mirrors, --precision auto), all CPU cores; e.g. ``-- --tractography
both``. Stage times come from Nipype's runtime records in the work folder; the slowest nodes are
listed too. Goals (issue [Speed], 2 cores): default run ≤ 90 s, ``--tractography both`` ≤ 240 s.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = {
    "dwidenoise": "denoise",
    "denoise_mppca": "denoise",
    "mrdegibbs": "Gibbs removal",
    "remove_gibbs": "Gibbs removal",
    "fit_dti": "DTI fit",
    "super_resolve": "super-resolution",
}
#: Node-name prefixes of the other stages.
PREFIXES = {
    "ds_": "outputs and sidecars",
    "meta_": "outputs and sidecars",
    "track_": "DIPY tracking",
    "tckgen_": "MRtrix3 tckgen",
    "mrtrix_inputs_": "MRtrix3 input synthesis",
    "tdi_": "track density",
    "tckmap_": "track density",
    "finish_": "tractogram checks and limits",
}


def node_times(work: Path) -> dict[str, float]:
    """Seconds of every node that ran, by its path in the work folder."""
    from nipype.utils.filemanip import loadpkl

    times = {}
    for result in work.rglob("result_*.pklz"):
        runtime = getattr(loadpkl(result), "runtime", None)
        duration = getattr(runtime, "duration", None) if runtime is not None else None
        if duration is not None:
            times[str(result.parent.relative_to(work))] = float(duration)
    return times


def stage_of(node: str) -> str:
    name = Path(node).name
    return STAGES.get(name) or next((stage for prefix, stage in PREFIXES.items() if name.startswith(prefix)), "other")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--bids", type=Path, default=REPO.parent / "shared/data/ds-realdwi")
    p.add_argument("--subject", default="achieva01")
    p.add_argument("extra", nargs="*", help="more iqt-pipe options, after --")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cmd = [
            sys.executable,
            "-m",
            "iqt_pipe.cli.run",
            str(args.bids),
            str(tmp / "out"),
            "participant",
            "--participant-label",
            args.subject,
            "--model",
            str(args.model),
            "-w",
            str(tmp / "work"),
            "--skip-bids-validation",
            *args.extra,
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"iqt-pipe failed ({proc.returncode}): {proc.stderr[-2000:]}")
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        nodes = node_times(tmp / "work")
    stages: dict[str, float] = defaultdict(float)
    for node, seconds in nodes.items():
        stages[stage_of(node)] += seconds
    total = sum(stages.values())
    print(f"sub-{args.subject}: wall {wall:.1f} s, peak memory of the largest process {peak_mb:.0f} MB")
    for stage, seconds in sorted(stages.items(), key=lambda kv: -kv[1]):
        print(f"  {stage:<22} {seconds:7.1f} s  {seconds / total:6.1%} of node time")
    print(f"  {'(start-up, scheduling)':<22} {wall - total:7.1f} s (negative: nodes ran side by side)")
    print("slowest nodes:")
    for node, seconds in sorted(nodes.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {seconds:7.1f} s  {node}")


if __name__ == "__main__":
    main()
