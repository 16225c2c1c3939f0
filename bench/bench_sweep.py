"""hv-netvsc-sim sweep: a 48-cell grid on the local Dask cluster vs the same cells in order.

The grid (docs/sweep/bench48.toml): 4 strategies x 2 guest sizes (256 and 512 MiB, aged
20,000 steps) x 6 seeds, 10 cycles each. Timed, per run, into a fresh result directory:

- `sweep`: run_sweep's default, a dask.distributed LocalCluster of one worker process per
  CPU on loopback; the wall time includes starting and stopping the cluster (what a user
  waits for);
- baseline, measured in the same run: run_sequential, the same cells one after another in
  this process with the same cell function and the same per-process guest reuse, no Dask.

The tables of the two must be the same (wall-clock columns aside): checked each run.
Printed: wall seconds of each, min/median/max over the runs, and the ratio sequential /
sweep (above 1: the cluster is faster), and the machine's load average around each run:
on a 2-CPU machine the ceiling is 2, and a machine already busy with other work leaves
the second worker little to run on (see the README's Sweeps section for measured figures).

Run: .venv/bin/python bench/bench_sweep.py [--runs 3] [--grid docs/sweep/bench48.toml]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from hv_netvsc_sim.sweep import default_workers, run_sequential, run_sweep
from hv_netvsc_sim.sweep_grid import load_grid
from hv_netvsc_sim.sweep_store import WALL_COLUMNS, read_table

ROOT = Path(__file__).resolve().parent.parent


def _table(directory: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in WALL_COLUMNS} for r in read_table(directory)]


def _fmt(xs: list[float]) -> str:
    return f"min {min(xs):.2f}  median {statistics.median(xs):.2f}  max {max(xs):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--grid", default=str(ROOT / "docs" / "sweep" / "bench48.toml"))
    args = ap.parse_args()
    grid = load_grid(args.grid)
    print(f"grid {args.grid}: {len(grid)} cells; local cluster of {default_workers()} workers")
    sweep_s: list[float] = []
    seq_s: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            a, b = Path(tmp) / f"sweep-{i}", Path(tmp) / f"seq-{i}"
            load0 = os.getloadavg()[0]
            # alternate which goes first, so a drift of the machine's load favours neither
            for first in (i % 2 == 0, i % 2 != 0):
                if first:
                    t0 = time.perf_counter()
                    outcome = run_sweep(grid, a)
                    sweep_s.append(time.perf_counter() - t0)
                else:
                    t0 = time.perf_counter()
                    base = run_sequential(grid, b)
                    seq_s.append(time.perf_counter() - t0)
            assert outcome.ran == base.ran == len(grid), (outcome, base)
            assert _table(a) == _table(b), "the sweep and the sequential run differ"
            print(
                f"run {i + 1}: sweep {sweep_s[-1]:.2f} s, sequential {seq_s[-1]:.2f} s, "
                f"ratio {seq_s[-1] / sweep_s[-1]:.2f} (1-minute load average "
                f"{load0:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
            )
    ratios = [s / w for s, w in zip(seq_s, sweep_s, strict=True)]
    print(f"sweep (local cluster)  s: {_fmt(sweep_s)}")
    print(f"sequential (baseline)  s: {_fmt(seq_s)}")
    print(f"ratio sequential/sweep  : {_fmt(ratios)}")


if __name__ == "__main__":  # the cluster's worker processes import this module afresh
    main()
