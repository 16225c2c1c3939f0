"""One in-process run: a strategy provisioned on its guest (pool.provision), the simulated
driver and host on top, the scenario's cycles, and the figures `compare` reports.

`hv-netvsc-sim run` (one strategy) and `compare` (every strategy, on copies of one aged
guest) both run exactly this; they differ only in what they print around it.

The result (`InProcessRun.result`, DESIGN.md section 4, one strategy of `compare --json`):

- `setup` = the guest's COUNTS before the first cycle: boot + setup() + the initial
  probe of every vNIC (everything that happens before cycle 1), as Counts differences
  from the pristine (or freshly cloned aged) guest;
- `run` = the COUNTS of the cycles (hv_netvsc_sim.scenario documents one cycle);
  `series` holds cumulative run values after each cycle (plus the direct-map bytes by
  leaf size and the allocation latency of that cycle);
- `end_state` after the last cycle, vNICs still up: direct-map bytes by leaf size,
  hazard pages (pool.guest.hazards), shared_bytes (pages in the shared state x 4096),
  leaked_bytes (the strategy's), plus unknown_state_bytes (pages whose conversion
  failed);
- `allocations`, `failures`, `failure_reasons`: every allocate call the driver made
  (setup and run), counted on the driver's side of the client seam;
- `alloc_latency_seconds`: p50 / p99 / max (and mean, samples) of the guest's *modeled*
  allocation latency: for each successful allocate call, the modeled seconds the guest's
  counters gained during that call (conversion hypercalls, accepts, TLB and cache flushes,
  splits, zeroing: `modeled_conversion_seconds + modeled_zeroing_seconds`, which the model
  charges from the cost profile where it counts; synchronous pool growth inside the call
  included). Nothing is costed here: the cost rules stay where the counts are made
  (pool.guest.encpgtable, pool.guest.platform, Guest.zero); this only takes differences.
  `modeled_seconds` splits the run's modeled time by who caused it: `alloc` (the sum of the
  above), `free` (re-encryption on free), `background` (the strategy's maintain(): a pool
  growing ahead of demand, reported apart because no allocation waits for it);
- `simulator_wall_seconds`: the simulator's own wall clock: p50 / p99 / max of each
  successful allocate call (`alloc`), the cycles (`run`), and the part spent inside the
  guest model and the strategy (`model`); never part of the same-seed comparison;
- `driver`, `host`, `events`, and `buffer_checks` (can the strategy serve a default
  ring, the default and the largest send and receive buffers at all; tried once after
  the run, because a strategy that refuses the ring - swiotlb, 256 KiB at most - never
  gets as far as the receive buffer in the scenario).
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from hv_netvsc_sim.client import ClientStats, InProcessClient
from hv_netvsc_sim.device import NETVSC_MAX_RX_SECTIONS, NETVSC_MAX_TX_SECTIONS, DeviceSettings
from hv_netvsc_sim.host import HyperVHost
from hv_netvsc_sim.scenario import Scenario, ScenarioConfig
from pool.guest import PAGE_SHARED, Counts, Guest
from pool.guest.units import PAGE_SIZE, PAGES_PER_1G, PAGES_PER_2M
from pool.memmap import memory_map
from pool.provision import Guests, provision
from pool.registry import PoolSettings
from pool.strategy import Buffer, Strategy, StrategyError, StrategyStats

SERIES_KEYS = (
    "cycle",
    "virtual_seconds",
    "hypercalls",
    "direct_map_splits_level2",
    "direct_map_splits_level3",
    "direct_map_4k_bytes",
    "direct_map_2M_bytes",
    "direct_map_1G_bytes",
    "pages_converted",
    "modeled_conversion_seconds",
    "failures",
    "alloc_latency_mean_seconds",
    "alloc_latency_max_seconds",
    "simulator_wall_alloc_mean_seconds",
    "conversions",
    "tlb_flushes",
    "page_table_pages",
    "direct_map_4k_share",
    "fatal_hazard_pages",
)


def direct_map_4k_share(guest: Guest) -> float:
    """The share of the direct map's RAM mapped with 4 KiB leaves (DirectMap4k over the
    sum of /proc/meminfo's DirectMap lines)."""
    dm = guest.direct_map
    total = dm.n4k + dm.n2m * PAGES_PER_2M + dm.n1g * PAGES_PER_1G
    return dm.n4k / total if total else 0.0


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50 / p99 (ClientStats' nearest rank: one rule for every percentile compare prints),
    max and mean of `values` (zeros when empty)."""
    out = ClientStats(latencies=array("d", values)).latency_percentiles()
    out["max"] = max(values, default=0.0)
    out["mean"] = sum(values) / len(values) if values else 0.0
    return out


def modeled_seconds(counts: Counts) -> float:
    """The modeled seconds a phase's counts carry (what the model charged while counting)."""
    return counts.modeled_conversion_seconds + counts.modeled_zeroing_seconds


class ModeledClient(InProcessClient):
    """The in-process client that also records, for every successful allocate call, the
    guest work it caused (`alloc_counts`, a Counts difference) and its modeled seconds
    (`modeled`); and the modeled seconds of free calls (`free_modeled`)."""

    def __init__(self, strategy: Strategy, guest: Guest, owner: str = "hv_netvsc") -> None:
        super().__init__(strategy, owner)
        self.guest = guest
        self.modeled: array[float] = array("d")
        self.alloc_counts: list[Counts] = []
        self.free_modeled = 0.0

    async def allocate(self, size: int, purpose: str) -> Buffer:
        before = self.guest.stats.snapshot()
        buf = await super().allocate(size, purpose)
        d = self.guest.stats.snapshot() - before
        self.alloc_counts.append(d)
        self.modeled.append(modeled_seconds(d))
        return buf

    async def free(self, buffer_id: int) -> bool:
        stats = self.guest.stats
        before = stats.modeled_conversion_seconds + stats.modeled_zeroing_seconds
        try:
            return await super().free(buffer_id)
        finally:
            self.free_modeled += (
                stats.modeled_conversion_seconds + stats.modeled_zeroing_seconds - before
            )


class SeriesRecorder:
    """Samples the run after each cycle: cumulative counts since the run started, the
    direct map's bytes by leaf size, cumulative allocation failures, and the mean and max
    modeled latency (and the mean simulator wall clock) of the allocate calls made during
    that cycle."""

    def __init__(
        self,
        guest: Guest,
        client: ModeledClient,
        start: Counts,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.guest = guest
        self.client = client
        self.start = start
        self.progress = progress
        self.series: dict[str, list[Any]] = {k: [] for k in SERIES_KEYS}
        self._lat_mark = 0
        self.clock: Callable[[], float] = lambda: 0.0  # the scenario's virtual time

    def begin(self) -> Counts:
        self.start = self.guest.stats.snapshot()
        self._lat_mark = len(self.client.modeled)
        return self.start

    def __call__(self, cycle: int) -> None:
        d = self.guest.stats.snapshot() - self.start
        dm = self.guest.direct_map
        s = self.series
        s["cycle"].append(cycle)
        s["virtual_seconds"].append(self.clock())
        s["hypercalls"].append(d.hypercalls)
        s["direct_map_splits_level2"].append(d.direct_map_level2_splits)
        s["direct_map_splits_level3"].append(d.direct_map_level3_splits)
        s["direct_map_4k_bytes"].append(dm.n4k * PAGE_SIZE)
        s["direct_map_2M_bytes"].append(dm.n2m * PAGES_PER_2M * PAGE_SIZE)
        s["direct_map_1G_bytes"].append(dm.n1g * PAGES_PER_1G * PAGE_SIZE)
        s["pages_converted"].append(d.pages_converted)
        s["modeled_conversion_seconds"].append(round(d.modeled_conversion_seconds, 9))
        s["failures"].append(self.client.stats.failures)
        mark = self._lat_mark
        window = self.client.modeled[mark:]
        wall = self.client.stats.latencies[mark:]
        s["alloc_latency_mean_seconds"].append(
            round(sum(window) / len(window), 12) if window else 0.0
        )
        s["alloc_latency_max_seconds"].append(round(max(window), 12) if window else 0.0)
        s["simulator_wall_alloc_mean_seconds"].append(sum(wall) / len(wall) if wall else 0.0)
        self._lat_mark = len(self.client.modeled)
        s["conversions"].append(d.conversions_to_shared + d.conversions_to_private)
        s["tlb_flushes"].append(d.tlb_flushes)
        s["page_table_pages"].append(d.page_table_pages)
        s["direct_map_4k_share"].append(round(direct_map_4k_share(self.guest), 9))
        s["fatal_hazard_pages"].append(self.guest.hazards().private_alias_to_shared)
        if self.progress is not None:
            self.progress(cycle)


def buffer_checks(strategy: Strategy) -> dict[str, dict[str, Any]]:
    """Can the strategy serve hv_netvsc's buffers at all? One allocate + free per size, on
    an otherwise finished run: the default VMBus ring (the driver asks for it first, so a
    strategy that refuses it never reaches the receive buffer in the scenario), the default
    and the largest send and receive buffers."""
    d = DeviceSettings()
    sizes = {
        "ring": d.ring_bytes,
        "send_buf": d.send_buf_bytes,
        "recv_buf": d.recv_buf_bytes,
        "send_buf_max": DeviceSettings(send_sections=NETVSC_MAX_TX_SECTIONS).send_buf_bytes,
        "recv_buf_max": DeviceSettings(recv_sections=NETVSC_MAX_RX_SECTIONS).recv_buf_bytes,
    }
    out: dict[str, dict[str, Any]] = {}
    for purpose, size in sizes.items():
        try:
            buf = strategy.allocate(size, "compare-check", purpose)
        except StrategyError as exc:
            out[purpose] = {"bytes": size, "ok": False, "reason": exc.reason}
            continue
        try:
            strategy.free(buf.id, "compare-check")
        except StrategyError as exc:  # pragma: no cover - a strategy bug, reported
            out[purpose] = {"bytes": size, "ok": True, "free_error": exc.reason}
            continue
        out[purpose] = {"bytes": size, "ok": True, "reason": None}
    return out


def _rounded(d: dict[str, float]) -> dict[str, float]:
    """Modeled figures to 1e-12 s: sums of floats in a different order must not differ."""
    return {k: round(v, 12) for k, v in d.items()}


@attrs.frozen
class InProcessRun:
    """What one in-process run gives: `result` (the strategy's compare document),
    `summary` (Scenario.summary()), the strategy's final stats (before the buffer checks),
    and wall-clock seconds: `run_seconds` of the cycles, `model_seconds` spent inside the
    guest model and the strategy (setup, allocate, free, maintain, churn: the part that is
    not the simulator's own overhead)."""

    result: dict[str, Any]
    summary: dict[str, Any]
    strategy_stats: StrategyStats
    cycles_done: int
    run_seconds: float
    model_seconds: float
    # per successful allocate call, in order (not in the repr: thousands of Counts, and on
    # Python 3.11 asyncio.run's exit formats its task, result included, ~15 ms a run)
    allocation_counts: tuple[Counts, ...] = attrs.field(default=(), repr=False)
    allocation_modeled_seconds: tuple[float, ...] = attrs.field(default=(), repr=False)


async def run_in_process(
    name: str,
    guests: Guests,
    scenario_config: ScenarioConfig,
    *,
    settings: PoolSettings | None = None,
    on_cycle: Callable[[int], None] | None = None,
    on_start: Callable[[Scenario], None] | None = None,
) -> InProcessRun:
    """Provision `name` (pool.provision), run the scenario on it, take the figures.
    `on_cycle(c)` after each cycle (progress); `on_start(scenario)` once it exists (to
    install signal handlers that stop it)."""
    made = provision(name, guests, settings)
    guest, strategy = made.guest, made.strategy
    client = ModeledClient(strategy, guest, owner="hv_netvsc")
    host = HyperVHost(guest, owns=client.owns)
    recorder = SeriesRecorder(guest, client, made.baseline, on_cycle)
    background = [0.0]

    def maintain(now: float) -> bool:
        """The strategy's background work; its modeled seconds counted apart."""
        st = guest.stats
        before = st.modeled_conversion_seconds + st.modeled_zeroing_seconds
        try:
            return client.maintain(now)
        finally:
            background[0] += st.modeled_conversion_seconds + st.modeled_zeroing_seconds - before

    scenario = Scenario(
        scenario_config,
        client,
        host,
        guest=guest,
        maintain=maintain,
        on_cycle=recorder,
    )
    recorder.clock = lambda: scenario.queue.now
    if on_start is not None:
        on_start(scenario)
    start_share = direct_map_4k_share(guest)
    await scenario.start()
    run_start = recorder.begin()
    setup = run_start - made.baseline
    t0 = time.perf_counter()
    await scenario.run()
    run_seconds = time.perf_counter() - t0
    run = guest.stats.snapshot() - run_start
    hz = guest.hazards()
    sst = strategy.stats()
    shared_pages = (
        int((guest.platform.state == PAGE_SHARED).sum()) if guest.platform.encrypts else 0
    )
    cs = client.stats
    result = {
        "allocations": cs.allocations,
        "failures": cs.failures,
        "failure_reasons": dict(sorted(cs.failure_reasons.items())),
        "setup": setup.as_compare_json(),
        "run": run.as_compare_json(),
        "end_state": {
            "direct_map_bytes": guest.direct_map.bytes_by_size(),
            "hazard_pages": hz.as_json(),
            "shared_bytes": shared_pages * PAGE_SIZE,
            "leaked_bytes": sst.leaked_bytes,
            "unknown_state_bytes": hz.unknown_state_pages * PAGE_SIZE,
            "strategy_size_bytes": sst.size_bytes,
            "devices_up": sum(1 for d in scenario.devices if d is not None and d.state == "up"),
        },
        "fragmentation": {
            # the cost of the direct-map damage in its own units (setup and run together):
            # page-table pages the splits allocated, global TLB flushes, the 4 KiB share
            "page_table_pages": setup.page_table_pages + run.page_table_pages,
            "page_table_bytes": (setup.page_table_pages + run.page_table_pages) * PAGE_SIZE,
            "run_page_table_pages": run.page_table_pages,
            "tlb_flushes": setup.tlb_flushes + run.tlb_flushes,
            "run_tlb_flushes": run.tlb_flushes,
            "direct_map_4k_share": round(direct_map_4k_share(guest), 9),
            "direct_map_4k_share_at_start": round(start_share, 9),
        },
        "alloc_latency_seconds": {
            **_rounded(percentiles(client.modeled)),
            "samples": len(client.modeled),
        },
        "modeled_seconds": {
            "alloc": round(sum(client.modeled), 9),
            "free": round(client.free_modeled, 9),
            "background": round(background[0], 9),
            "total_setup_and_run": round(modeled_seconds(setup + run), 9),
        },
        "series": recorder.series,
        "driver": scenario.stats.as_json(),
        "host": host.stats.as_json(),
        "events": dict(sorted(scenario.events.items())),
    }
    summary = scenario.summary()
    result["buffer_checks"] = buffer_checks(strategy)  # after every figure above is taken
    result["memory_map"] = memory_map(guest, strategy, name).encode()  # compare --map
    model = made.setup_seconds + sum(cs.latencies) + cs.free_seconds + scenario.model_seconds
    result["simulator_wall_seconds"] = {
        "alloc": percentiles(cs.latencies),
        "run": run_seconds,
        "model": model,
    }
    return InProcessRun(
        result,
        summary,
        sst,
        scenario.cycles_done,
        run_seconds,
        model,
        tuple(client.alloc_counts),
        tuple(client.modeled),
    )
