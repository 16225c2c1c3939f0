"""A real Prometheus scrapes a real sharedpoold and agrees with its GET /v1/pool.

1. sharedpoold starts on 127.0.0.1 (sharedpoold_proc.py: small pristine guest,
   a pool of at most 64 MiB).
2. Prometheus starts from deploy/prometheus/prometheus.yml with the target
   rewritten to the daemon and the repository's rules loaded (prom_server.py);
   the test waits for its first scrape, so counters are seen at 0.
3. The simulator runs against the daemon (`hv-netvsc-sim run --daemon URL
   --nics 2 --cycles 4 --pace 0.05 --json`: hot add / remove, ring resize, MTU
   change, VF failover, traffic), then a client load through daemon.client
   adds what the simulator does not leave behind: two NICs that stay up with
   their buffers (every size class used), a short-lived client that allocates
   and unregisters, and 16 MiB buffers requested until the pool, at its
   maximum, refuses one (result "exhausted").
4. Once GET /v1/pool stops changing, the test waits for a scrape taken after
   that moment and for a rule evaluation after that scrape, then compares what
   PromQL answers with the quiescent /v1/pool answer: gauges, counters by label,
   per-zone page-allocator gauges, histogram counts, rate/increase of
   allocations, recording rules, and the alerts that fire (exactly the one the
   refused allocation must raise).

Skips only when /usr/bin/prometheus is absent (deploy/ci-checks.sh installs
Debian's prometheus package in CI). Bounded: every wait takes its time from one
55-second budget.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from support.metrics_contract import CONTRACT_METRICS, contract_series_names, parse_exposition
from support.prom_server import PrometheusServer, find_binary, prometheus_server
from support.sharedpoold_proc import REPO_ROOT, SMALL_CONFIG, Sharedpoold, running_sharedpoold

from daemon.client import NO_RETRY, ApiError, Buffer, SharedPoolClient, register_client

PAGE = 4096
KiB, MiB = 1 << 10, 1 << 20
# The daemon's size classes (daemon/metrics.py, documented in daemon/README.md).
SIZE_CLASSES = (
    ("le_64KiB", 64 * KiB),
    ("le_1MiB", MiB),
    ("le_16MiB", 16 * MiB),
    ("gt_16MiB", None),
)

pytestmark = pytest.mark.skipif(
    find_binary() is None,
    reason="/usr/bin/prometheus not installed (Debian package 'prometheus'); "
    "deploy/ci-checks.sh installs it in CI",
)


def size_class(size: int) -> str:
    for name, limit in SIZE_CLASSES:
        if limit is None or size <= limit:
            return name
    raise AssertionError(size)


class Budget:
    """One deadline for the whole test: each wait gets at most what is left."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def __call__(self, cap: float) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("the test ran out of its time budget")
        return min(cap, left)


def simulator_command() -> list[str]:
    script = Path(sys.executable).parent / "hv-netvsc-sim"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "hv_netvsc_sim"]


def run_simulator(url: str, timeout: float) -> dict[str, Any]:
    """hv-netvsc-sim against the daemon: seeded, bounded, paced so that Prometheus
    scrapes while it runs. Its JSON summary."""
    result = subprocess.run(
        [
            *simulator_command(),
            "run",
            "--daemon",
            url,
            "--name",
            "hv-netvsc-sim",
            "--nics",
            "2",
            "--cycles",
            "4",
            "--seed",
            "1",
            "--pace",
            "0.05",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


class Load:
    """What the client load did, counted on the client side."""

    def __init__(self) -> None:
        self.attempts: Counter[str] = Counter()  # size class -> allocation requests
        self.ok = 0
        self.refused: Counter[str] = Counter()  # problem name -> count
        self.freed = 0

    async def allocate(self, client: SharedPoolClient, size: int, purpose: str) -> Buffer | None:
        self.attempts[size_class(size)] += 1
        try:
            buf = await client.allocate(size, purpose=purpose)
        except ApiError as exc:
            self.refused[exc.name] += 1
            return None
        self.ok += 1
        return buf

    async def free(self, client: SharedPoolClient, buf: Buffer | None) -> None:
        assert buf is not None
        await client.free(buf)
        self.freed += 1


async def hv_netvsc_like_load(url: str, *, cycles: int = 2, pace: float = 0.3) -> Load:
    load = Load()
    # registered outside the clients' blocks: the NICs stay up (and their buffers held) after
    # the load; no retry, so that every refusal is counted as the metrics count it
    regs = [await register_client(url, f"eth{i}") for i in range(2)]
    nics = [
        SharedPoolClient(url, token=r.token, client_id=r.client_id, retry=NO_RETRY) for r in regs
    ]
    try:
        for nic in nics:
            await nic.open()
        for cycle in range(cycles):
            for i, nic in enumerate(nics):
                # probe: VMBus in/out rings, send buffer, receive buffer (GPADLs)
                bufs = [
                    await load.allocate(nic, size, f"eth{i}-{what}-{cycle}")
                    for what, size in (
                        ("ring-in", 64 * KiB),
                        ("ring-out", 64 * KiB),
                        ("send", MiB),
                        ("recv", 16 * MiB),
                    )
                ]
                assert all(bufs), load.refused
                if cycle < cycles - 1:  # hot remove (the last cycle keeps the NIC up)
                    for buf in bufs:
                        await load.free(nic, buf)
            await asyncio.sleep(pace)  # let Prometheus scrape in between
        # ring resize on eth0: a 20 MiB receive buffer beside the 16 MiB one
        assert await load.allocate(nics[0], 20 * MiB, "eth0-recv-jumbo")
        # a NIC probed and removed at once: unregistering frees its buffers
        async with SharedPoolClient(url, "eth9", retry=NO_RETRY) as short:
            for size in (64 * KiB, 6144):
                assert await load.allocate(short, size, "eth9")
        # (leaving the block unregistered it)
        await asyncio.sleep(pace)
        # more 16 MiB receive buffers than a 64 MiB pool holds: one is refused
        for n in range(4):
            if await load.allocate(nics[1], 16 * MiB, f"eth1-recv-extra-{n}") is None:
                break
        assert load.refused == {"pool-exhausted": 1}, load.refused
    finally:
        for nic in nics:
            await nic.close()  # the HTTP session only: the NICs stay registered
    return load


def comparable(pool: dict[str, Any]) -> dict[str, Any]:
    """The parts of GET /v1/pool that the metrics report (no journal positions)."""
    daemon = pool["daemon"]
    return {
        "strategy": pool["strategy"],
        "guest": pool["guest"],
        "daemon": {k: daemon[k] for k in ("clients", "buffers", "reclaimed_buffers")},
    }


def quiescent_pool(daemon: Sharedpoold, timeout: float, settle: float = 0.6) -> dict:
    """GET /v1/pool until two answers `settle` seconds apart agree (background
    maintenance may still grow the pool right after the load)."""
    deadline = time.monotonic() + timeout
    last = comparable(daemon.get_json("/v1/pool"))
    while True:
        time.sleep(settle)
        current = comparable(daemon.get_json("/v1/pool"))
        if current == last:
            return current
        if time.monotonic() >= deadline:
            raise AssertionError(f"/v1/pool still changing after {timeout}s")
        last = current


def one(prom: PrometheusServer, expr: str) -> float:
    result = prom.query(expr)
    assert len(result) == 1, (expr, result)
    return float(result[0]["value"][1])


def by(prom: PrometheusServer, expr: str, *labels: str) -> dict[Any, float]:
    out: dict[Any, float] = {}
    for sample in prom.query(expr):
        key = tuple(sample["metric"].get(label, "") for label in labels)
        out[key[0] if len(labels) == 1 else key] = float(sample["value"][1])
    return out


def test_prometheus_scrapes_the_daemon_and_agrees_with_its_stats(tmp_path: Path) -> None:
    budget = Budget(55)
    with (
        running_sharedpoold(
            tmp_path / "sharedpoold", SMALL_CONFIG, ready_timeout=budget(10)
        ) as daemon,
        prometheus_server([daemon.target], ready_timeout=budget(10)) as prom,
    ):
        prom.wait_for_target_up(timeout=budget(15))
        # Prometheus has the counters at their start, before any allocation.
        assert one(prom, 'sharedpool_allocations_total{result="ok"}') == 0

        sim = run_simulator(daemon.url, timeout=budget(20))
        # (allocations and failures: the keys DESIGN.md section 4 fixes for a run)
        assert sim["allocations"] > 0 and sim["failures"] == 0, sim
        load = asyncio.run(hv_netvsc_like_load(daemon.url))
        pool = quiescent_pool(daemon, timeout=budget(6))
        quiet_at = time.time()

        # A scrape taken after the quiescent moment, and a rule evaluation after it.
        (scraped,) = prom.wait_for(
            f"timestamp(sharedpool_pool_size_bytes) > {quiet_at}", timeout=budget(4)
        )
        scraped_at = float(scraped["value"][1])
        prom.wait_for(f"timestamp(sharedpool:pool_usage:ratio) > {scraped_at}", timeout=budget(4))
        assert comparable(daemon.get_json("/v1/pool")) == pool, "the daemon moved meanwhile"
        metrics_text = daemon.get_text("/metrics")

        st, guest, dm = pool["strategy"], pool["guest"], pool["daemon"]
        counts = guest["counts"]

        # --- gauges -----------------------------------------------------------------
        assert one(prom, "sharedpool_pool_size_bytes") == st["size_bytes"] == 64 * MiB
        assert one(prom, "sharedpool_pool_used_bytes") == st["used_bytes"]
        assert one(prom, "sharedpool_pool_free_bytes") == st["free_bytes"]
        assert one(prom, "sharedpool_pool_largest_free_bytes") == st["largest_free_bytes"]
        assert by(prom, "sharedpool_pool_chunks", "state") == st["chunks"]
        assert one(prom, "sharedpool_buffers") == st["buffers"] == dm["buffers"]
        assert one(prom, "sharedpool_clients") == dm["clients"] == 2
        assert one(prom, "sharedpool_leaked_bytes") == st["leaked_bytes"] == 0
        assert by(prom, "sharedpool_direct_map_bytes", "page_size") == guest["direct_map_bytes"]
        assert (
            one(prom, 'sum by (job, instance) (sharedpool_direct_map_bytes{page_size=~".*"})')
            == guest["memory_bytes"]
        )
        assert by(prom, "sharedpool_hazard_pages", "kind") == guest["hazard_pages"]
        assert one(prom, "sharedpool_ready") == 1
        version = importlib.metadata.version("sharedpool")
        assert one(prom, f'sharedpool_build_info{{version="{version}"}}') == 1

        # the page allocator, per zone and order (indexes are the kernel's / 1000)
        blocks = by(prom, "sharedpool_buddy_free_blocks", "zone", "order")
        frag = by(prom, "sharedpool_fragmentation_index", "zone", "order")
        unusable = by(prom, "sharedpool_unusable_free_index", "zone", "order")
        assert {z for z, _ in blocks} == {z["name"] for z in guest["zones"]}
        for zone in guest["zones"]:
            for order in range(11):
                key = (zone["name"], str(order))
                assert blocks[key] == zone["nr_free"][order], key
                assert frag[key] == zone["fragmentation_index"][order] / 1000, key
                assert unusable[key] == zone["unusable_free_index"][order] / 1000, key
        free_pages = sum(int(n) << int(o) for (_, o), n in blocks.items())
        assert free_pages == guest["free_pages"]

        # --- counters ---------------------------------------------------------------
        allocations = by(prom, "sharedpool_allocations_total", "result")
        assert allocations["ok"] == st["allocations"] == sim["allocations"] + load.ok
        assert allocations["exhausted"] == st["failure_reasons"]["exhausted"] == 1
        assert sum(allocations.values()) == st["allocations"] + st["failures"]
        for result, n in allocations.items():
            if result != "ok":
                assert n == st["failure_reasons"].get(result, 0), result
        assert one(prom, "sharedpool_frees_total") == st["frees"] >= load.freed + sim["allocations"]
        assert by(prom, "sharedpool_conversions_total", "direction") == {
            "to_shared": counts["conversions_to_shared"],
            "to_private": counts["conversions_to_private"],
        }
        assert by(prom, "sharedpool_converted_bytes_total", "direction") == {
            "to_shared": counts["pages_to_shared"] * PAGE,
            "to_private": counts["pages_to_private"] * PAGE,
        }
        assert one(prom, "sharedpool_hypercalls_total") == counts["hypercalls"] > 0
        assert by(prom, "sharedpool_direct_map_splits_total", "level") == {
            "2": counts["direct_map_level2_splits"],
            "3": counts["direct_map_level3_splits"],
        }
        assert one(prom, "sharedpool_pool_grows_total") == st["grows"] > 1
        assert one(prom, "sharedpool_pool_shrinks_total") == st["shrinks"]
        assert one(prom, "sharedpool_reclaimed_buffers_total") == dm["reclaimed_buffers"]

        # --- histograms: one observation per allocation request, by size class -----
        attempts = sim["allocations"] + sum(load.attempts.values())
        per_class = by(prom, "sharedpool_alloc_duration_seconds_count", "size_class")
        exposed = parse_exposition(metrics_text).values
        for name, _ in SIZE_CLASSES:
            key = ("sharedpool_alloc_duration_seconds_count", frozenset({("size_class", name)}))
            assert per_class[name] == exposed[key] >= load.attempts[name] > 0, name
        assert sum(per_class.values()) == attempts
        assert one(prom, "sharedpool_modeled_conversion_seconds_count") == attempts
        assert one(prom, "sharedpool_modeled_conversion_seconds_sum") > 0
        assert by(prom, 'sharedpool_alloc_duration_seconds_bucket{le="+Inf"}', "size_class") == by(
            prom, "sharedpool_alloc_duration_seconds_count", "size_class"
        )

        # --- rate / increase: Prometheus saw every allocation happen ----------------
        ok = 'sharedpool_allocations_total{result="ok"}'
        assert one(prom, f"max_over_time({ok}[2m]) - min_over_time({ok}[2m])") == st["allocations"]
        assert one(prom, f"resets({ok}[2m])") == 0
        increase = one(prom, f"increase({ok}[2m])")  # extrapolated: a little more
        assert st["allocations"] <= increase <= 1.5 * st["allocations"], increase
        assert one(prom, f"rate({ok}[2m])") > 0

        # --- recording rules ---------------------------------------------------------
        assert math.isclose(
            one(prom, "sharedpool:pool_usage:ratio"),
            st["used_bytes"] / st["size_bytes"],
            rel_tol=1e-12,
        )
        assert one(prom, "sharedpool:hazard_pages:sum") == 0
        assert one(prom, 'sharedpool:allocations:rate5m{result="ok"}') > 0
        assert one(prom, 'sharedpool:allocations:rate5m{result="exhausted"}') > 0
        assert one(prom, 'sharedpool:allocations:rate5m{result="too_large"}') == 0
        assert one(prom, 'sharedpool:conversions:rate5m{direction="to_shared"}') > 0
        assert one(prom, "sharedpool:hypercalls:rate5m") > 0
        p99 = by(prom, "sharedpool:alloc_duration_seconds:p99_5m", "size_class")
        p50 = by(prom, "sharedpool:alloc_duration_seconds:p50_5m", "size_class")
        for name, _ in SIZE_CLASSES:  # every class saw allocations: a number, not NaN
            assert 0 < p50[name] <= p99[name] <= 0.1, (name, p50, p99)

        # --- alerts: the refused allocation fires, nothing else does -----------------
        (alert,) = prom.wait_for(
            'ALERTS{alertname="SharedpoolAllocationsFailing", alertstate="firing"}',
            timeout=budget(4),
        )
        assert alert["metric"]["result"] == "exhausted"
        assert alert["metric"]["severity"] == "warning"
        firing = {s["metric"]["alertname"] for s in prom.query('ALERTS{alertstate="firing"}')}
        assert firing == {"SharedpoolAllocationsFailing"}, firing

        # --- the names Prometheus stored are the daemon's ----------------------------
        stored = {n for n in prom.api("label/__name__/values") if n.startswith("sharedpool_")}
        live = parse_exposition(metrics_text).series
        contract = {s for m in CONTRACT_METRICS for s in contract_series_names(m)}
        assert contract <= stored, sorted(contract - stored)
        assert stored <= set(live), sorted(stored - set(live))
