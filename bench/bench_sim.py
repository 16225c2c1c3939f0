"""hv_netvsc_sim benchmarks: `run` with the pool in-process, and `compare` on 16 GiB.

1. run: hot add/remove cycles per second of the simulated driver against the pool,
   in-process, on a 16 GiB guest (aged 200,000 steps, not timed). One cycle = hot remove
   + hot add of one vNIC (4 channels: 4 ring buffers, the 16 MiB receive and the 1 MiB send
   buffer, 6 GPADLs, NVSP, revoke, close, teardown) + a traffic burst. Baseline, measured in
   the same run: a bare loop of the same number of strategy.allocate/free pairs with the
   same sizes (6 frees + 6 allocations per cycle), no driver, no host. Target (issue 4):
   >= 2,000 cycles/s. Also shown, for information: the default event mix (3 mixed events
   per cycle: ring resize, MTU, channels, VF failover, traffic) without and with the
   guest's background churn.
2. compare: every strategy on a 16 GiB guest aged 1,000,000 steps, 1000 cycles. Baseline,
   measured in the same run: the wall clock spent inside the guest model and the
   strategies (aging, setup, allocate, free, maintain, background churn); the ratio
   total / model is the simulator's own overhead factor. Target (issue 4): <= 120 s.

Run: .venv/bin/python bench/bench_sim.py [--run-cycles N] [--compare-cycles N] [--skip-compare]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from hv_netvsc_sim.client import InProcessClient
from hv_netvsc_sim.compare import CompareConfig, default_jobs, run_compare
from hv_netvsc_sim.device import DeviceSettings
from hv_netvsc_sim.host import HyperVHost
from hv_netvsc_sim.scenario import Scenario, ScenarioConfig
from pool import make_strategy
from pool.guest import Guest, GuestConfig

RUN_TARGET = 2_000  # cycles per second
COMPARE_TARGET = 120.0  # seconds


def _pool_world(age_steps: int):
    guest = Guest(GuestConfig())
    guest.age(age_steps)
    strategy = make_strategy("pool", guest)
    strategy.boot()
    strategy.setup()
    return guest, strategy


def bench_run(cycles: int, mixed: int, churn: int, age_steps: int) -> float:
    guest, strategy = _pool_world(age_steps)
    client = InProcessClient(strategy)
    host = HyperVHost(guest, owns=client.owns)
    cfg = ScenarioConfig(nics=2, cycles=cycles, seed=1, mixed_events=mixed, churn_steps=churn)
    sc = Scenario(cfg, client, host, guest=guest, maintain=client.maintain)

    async def go() -> float:
        await sc.start()
        t0 = time.perf_counter()
        await sc.run()
        return time.perf_counter() - t0

    elapsed = asyncio.run(go())
    assert sc.cycles_done == cycles
    s = sc.summary()
    assert s["host"]["use_after_free_writes"] == 0 and s["driver"]["probe_failures"] == 0
    strategy.check_invariants()
    return cycles / elapsed


def bench_baseline(cycles: int, age_steps: int) -> float:
    """The same allocate/free pairs as the run's hot remove + add, straight on the strategy."""
    _, strategy = _pool_world(age_steps)
    d = DeviceSettings()
    sizes = [d.ring_bytes] + [d.recv_buf_bytes, d.send_buf_bytes] + [d.ring_bytes] * 3
    nics = [[strategy.allocate(s, "bench").id for s in sizes] for _ in range(2)]
    t0 = time.perf_counter()
    for c in range(cycles):
        held = nics[c % 2]
        for bid in held:
            strategy.free(bid, "bench")
        held[:] = [strategy.allocate(s, "bench").id for s in sizes]
    elapsed = time.perf_counter() - t0
    strategy.check_invariants()
    return cycles / elapsed


def bench_compare(cycles: int, jobs: int) -> None:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    doc = run_compare(CompareConfig.of(cycles=cycles), timings=timings, jobs=jobs)
    total = time.perf_counter() - t0
    names = list(doc["strategies"])
    model = timings["aging"] + sum(timings[f"{n}/model"] for n in names)
    print(
        f"compare, 16 GiB guest aged 1,000,000 steps, {cycles} cycles, {len(names)} strategies, "
        f"{jobs} worker process(es)"
    )
    print(f"  {'part':<20} {'seconds':>9} {'in model':>9} {'overhead':>9}")
    print(f"  {'aging (per profile)':<20} {timings['aging']:9.1f} {timings['aging']:9.1f}")
    for n in names:
        t, m = timings[n], timings[f"{n}/model"]
        print(f"  {n:<20} {t:9.1f} {m:9.1f} {t / m if m else float('nan'):8.2f}x")
    verdict = "ok" if total <= COMPARE_TARGET * cycles / 1000 else "MISSED"
    print(
        f"  {'total':<20} {total:9.1f} {model:9.1f} {total / model:8.2f}x   "
        f"target <= {COMPARE_TARGET * cycles / 1000:.0f} s: {verdict}"
    )
    print(
        "  (in model = wall clock inside the guest model and the strategies, summed over "
        "workers; overhead = total / in model: the simulator's own share, below 1 when "
        "workers run in parallel)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-cycles", type=int, default=10_000)
    parser.add_argument("--compare-cycles", type=int, default=1000)
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--skip-run", action="store_true")
    parser.add_argument("--jobs", type=int, default=0, help="compare workers (0: one per CPU)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs")
    args = parser.parse_args()
    n, age = args.run_cycles, 200_000
    if not args.skip_run:
        bench_run_all(n, age, args.repeat)
    if not args.skip_compare:
        bench_compare(args.compare_cycles, args.jobs or default_jobs(6))
    return 0


def bench_run_all(n: int, age: int, repeat: int) -> None:
    rate = max(bench_run(n, 0, 0, age) for _ in range(repeat))
    base = max(bench_baseline(n, age) for _ in range(repeat))
    verdict = "ok" if rate >= RUN_TARGET else "MISSED"
    print(f"run, pool in-process, 16 GiB guest, 2 vNICs x 4 channels, {n:,} cycles")
    print(
        f"  hot add/remove cycles/s       {rate:10,.0f}   baseline (bare allocate/free pairs) "
        f"{base:10,.0f}/s   ratio {rate / base:.2f}   target >= {RUN_TARGET:,}: {verdict}"
    )
    mix = bench_run(n // 5, 3, 0, age)
    print(
        f"  with the default event mix    {mix:10,.0f}   (3 mixed events per cycle: each "
        "reconfiguration is a detach + attach)"
    )
    churn = bench_run(max(n // 50, 10), 3, 250, age)
    print(
        f"  ... and the guest's churn     {churn:10,.0f}   (250 background churn steps before "
        "each event: the `run` default)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
