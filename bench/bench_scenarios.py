"""Benchmark: wall-clock time of `compare` per scenario, beside `stress` (today's cycles, the
same-run baseline) on the same guest, the same platform and the same strategies.

    .venv/bin/python bench/bench_scenarios.py [--platform tdx] [--repeat 1] [--jobs 0]
        [--scenarios stress,azure-month,boot-only] [--guest-memory 16GiB] [--out DIR]

Each scenario runs `--repeat` times, through hv_netvsc_sim.compare.run_compare with the
command's defaults (16 GiB guest aged 1,000,000 steps, every strategy, seed 1, `--jobs`
worker processes, 0 = one per CPU); the figure is the whole compare (aging included),
min / median / max. With --out DIR each scenario's last document is written as
DIR/<platform>-<scenario>.json (the README's tables are printed from these). Target
(issue 16): azure-month under 120 s on the default guest on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hv_netvsc_sim.compare import CompareConfig, default_jobs, run_compare
from hv_netvsc_sim.timeline import PRESETS
from pool.guest.units import parse_size


def _fmt(ts: list[float]) -> str:
    return f"min {min(ts):.1f} / median {statistics.median(ts):.1f} / max {max(ts):.1f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--platform", default="tdx")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=0)
    ap.add_argument("--scenarios", default="stress,azure-month,boot-only")
    ap.add_argument("--guest-memory", default="16GiB")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    names = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in names if s not in PRESETS]
    if unknown or args.repeat < 1:
        ap.error(f"scenarios must be some of {', '.join(PRESETS)} and --repeat >= 1")
    if "stress" in names:  # the baseline first
        names.remove("stress")
    names.insert(0, "stress")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    memory = parse_size(args.guest_memory)
    results: dict[str, list[float]] = {}
    for name in names:
        config = CompareConfig.of(guest_memory_bytes=memory, platform=args.platform, timeline=name)
        jobs = args.jobs or default_jobs(len(config.strategies))
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            doc = run_compare(config, jobs=jobs)
            times.append(time.perf_counter() - t0)
        results[name] = times
        length = (
            f"{config.cycles} samples" if config.timeline.scheduled else f"{config.cycles} cycles"
        )
        print(f"{args.platform} {name:<12} ({length}): {_fmt(times)}", flush=True)
        if args.out is not None:
            (args.out / f"{args.platform}-{name}.json").write_text(json.dumps(doc))
    base = statistics.median(results["stress"])
    print(
        f"\nbaseline stress ({args.platform}, 200 cycles), median {base:.1f} s; ratio of medians:"
    )
    for name, times in results.items():
        print(f"  {name:<12} {statistics.median(times) / base:.2f}x")


if __name__ == "__main__":
    main()
