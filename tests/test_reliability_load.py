"""Load: 64 concurrent clients, each with its own connection pool, over the daemon's Unix
socket, for a bounded number of requests each (hv_netvsc-like sizes, 4 KiB to 16 MiB, on a
pool capped at 64 MiB so that exhaustion happens). Correctness only, no timing assertion:
every answer is a success or a designed 503 (pool-exhausted with Retry-After), no request
is dropped, every client's view matches the daemon's, invariants hold; the percentiles are
printed (bench/load.py prints the same figures on a larger run)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from support.harness import (
    ADMIN_TOKEN,
    ClientState,
    LoadStats,
    client_worker,
    percentile,
    spawn,
    verify_restored,
)

from daemon.client import SharedPoolClient


async def test_64_concurrent_clients(tmp_path: Path) -> None:
    d = spawn(tmp_path, "--lease-ttl", "600", tcp=False)
    try:
        await d.wait_ready()
        states = [ClientState(f"load-{i}") for i in range(64)]
        per = [LoadStats() for _ in states]
        await asyncio.gather(
            *(
                client_worker(
                    d.unix_url, st, s, cycles=40, rng=random.Random(i), keep=3, extras=True
                )
                for i, (st, s) in enumerate(zip(states, per, strict=True))
            )
        )
        total = LoadStats()
        for s in per:
            total.merge(s)
        assert not total.errors, total.errors[:10]
        assert total.disconnects == 0
        assert set(total.designed_503) <= {"pool-exhausted"}
        assert total.allocations > 0 and total.frees > 0
        assert len(total.alloc_latency) + len(total.free_latency) == 64 * 40
        # the daemon's view equals the clients' (same check as after a crash, nothing in flight)
        totals = await verify_restored(d.unix_url, states)
        assert totals["applied_in_flight_allocs"] == totals["lost_in_flight_allocs"] == 0
        async with SharedPoolClient(d.unix_url, token=ADMIN_TOKEN) as admin:
            pool = await admin.stats()
        strat = pool.strategy
        assert strat.allocations == total.allocations
        assert strat.frees == total.frees
        assert strat.failures == sum(total.designed_503.values())
        print(
            f"load: 64 clients x 40 requests: {total.allocations} allocations, "
            f"{total.frees} frees, designed 503s {dict(total.designed_503)}; alloc p50 "
            f"{percentile(total.alloc_latency, 50) * 1e3:.2f} ms, p99 "
            f"{percentile(total.alloc_latency, 99) * 1e3:.2f} ms"
        )
    finally:
        d.stop()
