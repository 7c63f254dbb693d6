"""Wall time, peak memory and per-stage share of a default ``iqt-pipe participant`` run
(run on demand, not a test):

    .venv/bin/python benchmarks/participant.py --model MODEL [--subject achieva01] [--bids DIR]

Defaults: ../shared/data/ds-realdwi, sub-achieva01, default options (the model's preprocessing,
8 MC samples with the 8 test-time mirrors, --precision auto), all CPU cores; e.g. ``-- --tractography
both``. Stage times come from Nipype's runtime records in the work folder; then the CPU time of
the run against the cores' wall time, where the wall time went outside the nodes (before the
first, waits between nodes with the longest listed, the report after the last) and the slowest
nodes with their start and end. Goals (issue [Speed], 2 cores): default run ≤ 90 s, ``--tractography both`` ≤ 240 s.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
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


def node_spans(work: Path) -> dict[str, tuple[float, float]]:
    """(start, end) in seconds since the epoch of every node that ran, by its path in the work
    folder (Nipype's runtime records: the interface's own run, not the worker's set-up)."""
    from nipype.utils.filemanip import loadpkl

    spans = {}
    for result in work.rglob("result_*.pklz"):
        runtime = getattr(loadpkl(result), "runtime", None)
        if getattr(runtime, "startTime", None) and getattr(runtime, "endTime", None):
            start, end = (
                datetime.fromisoformat(t).replace(tzinfo=UTC).timestamp() for t in (runtime.startTime, runtime.endTime)
            )
            spans[str(result.parent.relative_to(work))] = (start, end)
    return spans


def idle_gaps(spans: dict[str, tuple[float, float]]) -> list[tuple[float, float, str, str]]:
    """``(start, end, node before, node after)`` of every interval between the first node's start
    and the last node's end while no node was running (polling, workers starting, node set-up)."""
    gaps, cursor, last_node = [], None, ""
    for node, (start, end) in sorted(spans.items(), key=lambda kv: kv[1]):
        if cursor is not None and start > cursor:
            gaps.append((cursor, start, last_node, node))
        if cursor is None or end > cursor:
            cursor, last_node = end, node
    return gaps


def timeline(launch: float, spans: dict[str, tuple[float, float]], finish: float) -> dict[str, float]:
    """Where the wall time went outside the nodes: before the first node started (imports, the
    BIDS query, the checks, building the graph, Nipype's set-up), between nodes while none was
    running (:func:`idle_gaps`), and after the last node (the subject report, the closing checks)."""
    first, last = min(s for s, _ in spans.values()), max(e for _, e in spans.values())
    return {
        "before the first node": first - launch,
        "no node running (scheduling)": sum(end - start for start, end, _, _ in idle_gaps(spans)),
        "after the last node (report)": finish - last,
    }


def stage_of(node: str) -> str:
    name = Path(node).name
    return STAGES.get(name) or next((stage for prefix, stage in PREFIXES.items() if name.startswith(prefix)), "other")


def main():
    from iqt_pipe.cli.parser import default_nprocs

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
        launch = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        finish = time.time()
        wall = finish - launch
        if proc.returncode:
            sys.exit(f"iqt-pipe failed ({proc.returncode}): {proc.stderr[-2000:]}")
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak_mb, cpu = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
        spans = node_spans(tmp / "work")
    nodes = {node: end - start for node, (start, end) in spans.items()}
    stages: dict[str, float] = defaultdict(float)
    for node, seconds in nodes.items():
        stages[stage_of(node)] += seconds
    total = sum(stages.values())
    cores = default_nprocs()
    print(f"sub-{args.subject}: wall {wall:.1f} s, peak memory of the largest process {peak_mb:.0f} MB")
    print(f"CPU time {cpu:.1f} s: {cpu / (wall * cores):.0%} of the {cores} cores' wall time")
    for stage, seconds in sorted(stages.items(), key=lambda kv: -kv[1]):
        print(f"  {stage:<22} {seconds:7.1f} s  {seconds / total:6.1%} of node time")
    print("outside the nodes:")
    for part, seconds in timeline(launch, spans, finish).items():
        print(f"  {part:<30} {seconds:7.1f} s")
    print("longest waits with no node running (seconds from launch):")
    for start, end, before, after in sorted(idle_gaps(spans), key=lambda g: g[0] - g[1])[:5]:
        between = f"after {Path(before).name}, before {Path(after).name}"
        print(f"  {end - start:5.1f} s  {start - launch:6.1f} - {end - launch:6.1f}  {between}")
    print("slowest nodes (seconds from launch: start - end):")
    for node, seconds in sorted(nodes.items(), key=lambda kv: -kv[1])[:40]:
        start, end = (t - launch for t in spans[node])
        print(f"  {seconds:7.1f} s  {start:6.1f} - {end:6.1f}  {node}")


if __name__ == "__main__":
    main()
