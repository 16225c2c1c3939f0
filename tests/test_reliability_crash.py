"""Crash recovery: sharedpoold is killed with SIGKILL at seeded random points of a load run
(and, in some trials, while it starts and restores, or while it writes snapshots), then
started again on the same state directory. After every restart, `verify_restored` checks
what the clients were told before the crash:

- every acknowledged allocation is there with the same id, owner, size, purpose, PFN ranges
  and va; no acknowledged free is undone; an unacknowledged buffer exists only for a request
  that was in flight, never twice;
- no id is listed twice or by two clients, no PFN is in two buffers, the daemon holds
  exactly the buffers its clients list, and its own invariants hold;
- the clients carry on with their old tokens: list, get, free and allocate (ids handed out
  after a restart are never ones handed out before).

The default run is 20 trials on the tests' small pristine guest with short loads, with
conversion failures injected (the first two growths, then 5 % of calls) and background
growth and shrink racing the clients, so that leaks must replay too; the slow variant runs
60 trials with fsync'ed commits on an aged guest, with failures too.
"""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path
from typing import Any

import pytest
from support.harness import (
    ADMIN_TOKEN,
    ClientState,
    Daemon,
    LoadStats,
    client_worker,
    spawn,
    verify_restored,
)

from daemon.client import SharedPoolClient


def _daemon(tmp: Path, rng: random.Random, extra: list[str]) -> tuple[Daemon, bool]:
    """A daemon on the shared state directory; half the time with snapshots every 50 ms (a
    kill may then land in a snapshot write and its compaction)."""
    snapshots = rng.random() < 0.5
    args = ["--lease-ttl", "600", *extra]
    if snapshots:
        args += ["--snapshot-interval", "0.05"]
    toml = {"snapshot_min_records": 20} if snapshots else None
    return spawn(tmp, *args, daemon_toml=toml, tcp=False), snapshots


async def _trials(
    tmp: Path,
    *,
    trials: int,
    seed: int,
    clients: int,
    max_delay: float,
    extra: list[str] | None = None,
) -> dict[str, Any]:
    rng = random.Random(seed)
    states = [ClientState(f"c{i}") for i in range(clients)]
    report: dict[str, Any] = {
        "kills_under_load": 0,
        "kills_while_starting": 0,
        "with_snapshots": 0,
        "restarts_verified": 0,
        "applied_in_flight_allocs": 0,
        "lost_in_flight_allocs": 0,
        "allocations": 0,
        "frees": 0,
        "designed_503": 0,
    }
    for trial in range(trials):
        d, snapshots = _daemon(tmp, rng, extra or [])
        report["with_snapshots"] += snapshots
        try:
            if trial and rng.random() < 0.15:
                # killed during start-up: interpreter start, journal open, replay
                await asyncio.sleep(rng.uniform(0.0, 0.5))
                d.signal(signal.SIGKILL)
                d.wait()
                report["kills_while_starting"] += 1
                continue
            await d.wait_ready()
            if trial:
                totals = await verify_restored(d.unix_url, states)
                report["restarts_verified"] += 1
                report["applied_in_flight_allocs"] += totals["applied_in_flight_allocs"]
                report["lost_in_flight_allocs"] += totals["lost_in_flight_allocs"]
            states.append(ClientState(f"c{len(states)}"))  # one newcomer per trial
            stats = [LoadStats() for _ in states]
            tasks = [
                asyncio.create_task(
                    client_worker(
                        d.unix_url,
                        st,
                        s,
                        cycles=400,  # bounded: the kill normally comes first
                        rng=random.Random(seed * 10_000 + trial * 100 + i),
                        keep=4,
                        timeout=10,
                    )
                )
                for i, (st, s) in enumerate(zip(states, stats, strict=True))
            ]
            await asyncio.sleep(rng.uniform(0.02, max_delay))
            d.signal(signal.SIGKILL)
            assert d.wait() == -signal.SIGKILL
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
            report["kills_under_load"] += 1
            for s in stats:
                assert not s.errors, s.errors
                report["allocations"] += s.allocations
                report["frees"] += s.frees
                report["designed_503"] += sum(s.designed_503.values())
        finally:
            d.stop()
    # the last restart: verify, then every client carries on and cleans up
    d, _ = _daemon(tmp, rng, extra or [])
    try:
        await d.wait_ready()
        await verify_restored(d.unix_url, states)
        report["restarts_verified"] += 1
        for st in states:
            if not st.token:
                continue
            async with SharedPoolClient(d.unix_url, token=st.token, client_id=st.client_id) as c:
                await c.heartbeat()
                new = await c.allocate(8192, purpose="after")
                assert new.id not in st.ever
                for bid in [*st.live, new.id]:
                    await c.free(bid)
                assert await c.buffers() == []
                await c.unregister()
        async with SharedPoolClient(d.unix_url, token=ADMIN_TOKEN) as admin:
            inv = await admin.invariants()
            assert inv["ok"] and inv["buffers"] == 0, inv
            pool = await admin.stats()
        report["leaked_bytes"] = pool.strategy.leaked_bytes
        report["unknown_pages"] = pool.hazard_pages["unknown_state"]
        d.signal(signal.SIGTERM)
        assert d.wait() == 0, d.output()
    finally:
        d.stop()
    assert "Traceback" not in d.output()
    return report


async def test_kill9_at_random_points(tmp_path: Path) -> None:
    # with conversion failures and "retry from X" answers injected: the replay must reproduce
    # every leak (a leaked chunk stays leaked across restarts, never back in the allocator)
    faults = ["--fail-rate", "0.05", "--retry-rate", "0.1", "--fault-seed", "3"]
    faults += ["--fail-calls", "2,3"]  # the first two growths fail for sure
    faults += ["--shrink-hysteresis", "0", "--maintain-interval", "0.01"]
    report = await _trials(tmp_path, trials=20, seed=7, clients=6, max_delay=0.35, extra=faults)
    print("crash recovery:", report)
    assert report["kills_under_load"] + report["kills_while_starting"] == 20
    assert report["leaked_bytes"] > 0 and 0 < report["unknown_pages"] <= report["leaked_bytes"]
    assert report["kills_under_load"] >= 12 and report["allocations"] > 0
    # every start after a kill under load was verified (the first start has nothing to verify)
    assert report["restarts_verified"] == report["kills_under_load"]


@pytest.mark.slow
async def test_kill9_at_random_points_aged_fsync(tmp_path: Path) -> None:
    report = await _trials(
        tmp_path,
        trials=60,
        seed=11,
        clients=12,
        max_delay=1.5,
        extra=[
            *("--age-steps", "20000", "--synchronous", "full", "--guest-memory", "1GiB"),
            *("--fail-rate", "0.02", "--fail-calls", "2", "--fault-seed", "5"),
        ],
    )
    print("crash recovery (aged, fsync):", report)
    assert report["kills_under_load"] + report["kills_while_starting"] == 60
    assert report["leaked_bytes"] > 0
