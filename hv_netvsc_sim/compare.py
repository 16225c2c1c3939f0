"""`compare`: every strategy on the same seed, the same aged guest, the same event sequence.

Per strategy (DESIGN.md section 4, `compare --json`):

1. The guest. Every strategy starts from a copy of one guest built from the same
   GuestConfig (memory, platform, seed). A strategy whose boot() reserves memory
   (swiotlb's bounce buffer, pool-boot's 1 GiB region: detected by running boot() on a
   pristine copy and seeing the page allocator or the counters change) boots on the
   pristine guest, which is then aged with `age_steps` churn steps: its own boot
   profile, aged once. All the others share one aged guest: it is aged once and each
   gets a clone. Aging converts nothing, so no conversion counts come from it.
2. `setup` = the guest's COUNTS before the first cycle: boot + setup() + the initial
   probe of every vNIC (everything that happens before cycle 1), as Counts
   differences from the pristine (or freshly cloned aged) guest.
3. `run` = the COUNTS of the cycles (hv_netvsc_sim.scenario documents one cycle);
   `series` holds cumulative run values after each cycle (plus the direct-map bytes by
   leaf size and the allocation latency of that cycle).
4. `end_state` after the last cycle, vNICs still up: direct-map bytes by leaf size,
   hazard pages (pool.guest.hazards), shared_bytes (pages in the shared state x 4096),
   leaked_bytes (the strategy's), plus unknown_state_bytes (pages whose conversion
   failed).
5. `allocations`, `failures`, `failure_reasons`: every allocate call the driver made
   (setup and run), counted on the driver's side of the client seam;
   `alloc_latency_seconds`: p50 / p99 wall clock of the successful allocate calls.

Extra keys (the contract allows them): `series` also has level-3 splits, DirectMap2M/1G
bytes, pages converted, modeled seconds, cumulative failures and the mean allocate latency
of each cycle; `driver` (DriverStats: probes, failures by reason and by buffer, leaks,
packets), `host` (HostStats: GPADLs and their messages, refusals, use-after-free writes),
`events` (counts by kind) and `buffer_checks` (can the strategy serve a default ring, the
default and the largest send and receive buffers at all; tried once after the run, because
a strategy that refuses the ring - swiotlb, 256 KiB at most - never gets as far as the
receive buffer in the scenario).

Everything except the latency figures is a pure function of the configuration: the same
seed gives the same JSON.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

import attrs

from hv_netvsc_sim.client import InProcessClient
from hv_netvsc_sim.device import NETVSC_MAX_RX_SECTIONS, NETVSC_MAX_TX_SECTIONS, DeviceSettings
from hv_netvsc_sim.host import HyperVHost
from hv_netvsc_sim.scenario import Scenario, ScenarioConfig
from pool.guest import PAGE_SHARED, Counts, Guest, GuestConfig
from pool.guest.units import PAGE_SIZE, PAGES_PER_1G, PAGES_PER_2M, GiB
from pool.registry import STRATEGIES, make_strategy
from pool.strategy import Strategy, StrategyError

CONTRACT_STRATEGIES = ("pool", "vmalloc-alias", "vmalloc-directmap", "swiotlb", "atomic-pool")
DEFAULT_AGE_STEPS = 1_000_000

Progress = Callable[[str, int, int], None]  # (what, done, total)


@attrs.frozen
class CompareConfig:
    guest_memory_bytes: int = 16 * GiB
    cycles: int = 200
    seed: int = 1
    platform: str = "tdx"
    age_steps: int = DEFAULT_AGE_STEPS
    strategies: tuple[str, ...] = STRATEGIES
    nics: int = 2
    mixed_events: int = 3
    churn_steps: int = 250
    traffic_packets: int = 64

    def __attrs_post_init__(self) -> None:
        if self.cycles < 1:
            raise ValueError(f"cycles must be at least 1: {self.cycles}")
        if self.age_steps < 0:
            raise ValueError(f"age steps must not be negative: {self.age_steps}")
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise ValueError(
                f"unknown strategies {unknown}: expected some of {', '.join(STRATEGIES)}"
            )

    def guest_config(self) -> GuestConfig:
        return GuestConfig(
            memory_bytes=self.guest_memory_bytes, platform=self.platform, seed=self.seed
        )

    def scenario_config(self) -> ScenarioConfig:
        return ScenarioConfig(
            nics=self.nics,
            cycles=self.cycles,
            seed=self.seed,
            mixed_events=self.mixed_events,
            churn_steps=self.churn_steps,
            traffic_packets=self.traffic_packets,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "guest_memory_bytes": self.guest_memory_bytes,
            "cycles": self.cycles,
            "seed": self.seed,
            "platform": self.platform,
            "age_steps": self.age_steps,
            "nics": self.nics,
            "mixed_events": self.mixed_events,
            "churn_steps": self.churn_steps,
            "traffic_packets": self.traffic_packets,
            "strategies": list(self.strategies),
        }


def _copy(guest: Guest) -> Guest:
    return guest.clone()


class GuestFactory:
    """Pristine and aged guests for one configuration; aging happens once per boot profile."""

    def __init__(
        self, config: GuestConfig, age_steps: int, progress: Progress | None = None
    ) -> None:
        self.config = config
        self.age_steps = age_steps
        self.progress = progress
        self._pristine: Guest | None = None
        self._aged: Guest | None = None
        self.aging_seconds = 0.0

    def pristine(self) -> Guest:
        if self._pristine is None:
            self._pristine = Guest(self.config)
        return _copy(self._pristine)

    def age(self, guest: Guest, label: str) -> None:
        t0 = time.perf_counter()
        report = None
        if self.progress is not None:
            progress = self.progress

            def report_fn(done: int, total: int) -> None:
                progress(f"aging ({label})", done, total)

            report = report_fn
        guest.age(self.age_steps, report)
        self.aging_seconds += time.perf_counter() - t0

    def aged(self) -> Guest:
        if self._aged is None:
            guest = self.pristine()
            self.age(guest, "shared")
            self._aged = guest
        return _copy(self._aged)


def boot_on(factory: GuestFactory, name: str) -> tuple[Guest, Strategy, Counts]:
    """A booted strategy on its guest (aged, after boot if boot reserves memory) and the
    counts baseline its `setup` figures are measured from."""
    guest = factory.pristine()
    free_before = guest.allocator.free_pages()
    baseline = guest.stats.snapshot()
    strategy = make_strategy(name, guest)
    strategy.boot()
    if guest.allocator.free_pages() != free_before or guest.stats.snapshot() != baseline:
        factory.age(guest, name)  # its own boot profile: booted pristine, then aged
        return guest, strategy, baseline
    guest = factory.aged()
    baseline = guest.stats.snapshot()
    strategy = make_strategy(name, guest)
    strategy.boot()
    return guest, strategy, baseline


SERIES_KEYS = (
    "cycle",
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
)


class SeriesRecorder:
    """Samples the run after each cycle: cumulative counts since the run started, the
    direct map's bytes by leaf size, cumulative allocation failures, and the mean latency of
    the allocate calls made during that cycle."""

    def __init__(
        self,
        guest: Guest,
        client: InProcessClient,
        start: Counts,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.guest = guest
        self.client = client
        self.start = start
        self.progress = progress
        self.series: dict[str, list[Any]] = {k: [] for k in SERIES_KEYS}
        self._lat_mark = 0

    def begin(self) -> Counts:
        self.start = self.guest.stats.snapshot()
        self._lat_mark = len(self.client.stats.latencies)
        return self.start

    def __call__(self, cycle: int) -> None:
        d = self.guest.stats.snapshot() - self.start
        dm = self.guest.direct_map
        s = self.series
        s["cycle"].append(cycle)
        s["hypercalls"].append(d.hypercalls)
        s["direct_map_splits_level2"].append(d.direct_map_level2_splits)
        s["direct_map_splits_level3"].append(d.direct_map_level3_splits)
        s["direct_map_4k_bytes"].append(dm.n4k * PAGE_SIZE)
        s["direct_map_2M_bytes"].append(dm.n2m * PAGES_PER_2M * PAGE_SIZE)
        s["direct_map_1G_bytes"].append(dm.n1g * PAGES_PER_1G * PAGE_SIZE)
        s["pages_converted"].append(d.pages_converted)
        s["modeled_conversion_seconds"].append(round(d.modeled_conversion_seconds, 9))
        s["failures"].append(self.client.stats.failures)
        lat = self.client.stats.latencies
        window = lat[self._lat_mark :]
        s["alloc_latency_mean_seconds"].append(sum(window) / len(window) if window else 0.0)
        self._lat_mark = len(lat)
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


async def _run_one(
    name: str, config: CompareConfig, factory: GuestFactory, progress: Progress | None
) -> tuple[dict[str, Any], float]:
    """One strategy's result, and the wall-clock seconds spent inside the guest model and the
    strategy (setup, allocate, free, maintain, churn): the part of the run that is not the
    simulator's own overhead."""
    guest, strategy, baseline = boot_on(factory, name)
    t0 = time.perf_counter()
    strategy.setup()
    setup_seconds = time.perf_counter() - t0
    client = InProcessClient(strategy, owner="hv_netvsc")
    host = HyperVHost(guest, owns=client.owns)
    recorder = SeriesRecorder(
        guest,
        client,
        baseline,
        None if progress is None else (lambda c: progress(name, c, config.cycles)),
    )
    scenario = Scenario(
        config.scenario_config(),
        client,
        host,
        guest=guest,
        maintain=client.maintain,
        on_cycle=recorder,
    )
    await scenario.start()
    run_start = recorder.begin()
    setup = run_start - baseline
    await scenario.run()
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
        "alloc_latency_seconds": {**cs.latency_percentiles(), "samples": len(cs.latencies)},
        "series": recorder.series,
        "driver": scenario.stats.as_json(),
        "host": host.stats.as_json(),
        "events": dict(sorted(scenario.events.items())),
    }
    result["buffer_checks"] = buffer_checks(strategy)  # after every figure above is taken
    model = setup_seconds + sum(cs.latencies) + cs.free_seconds + scenario.model_seconds
    return result, model


def _run_one_sync(
    name: str, config: CompareConfig, factory: GuestFactory, progress: Progress | None
) -> tuple[dict[str, Any], float, float, float]:
    t0 = time.perf_counter()
    aging0 = factory.aging_seconds
    result, model = asyncio.run(_run_one(name, config, factory, progress))
    aging = factory.aging_seconds - aging0
    return result, model, time.perf_counter() - t0 - aging, aging


_FORKED: tuple[CompareConfig, GuestFactory] | None = None  # inherited by forked workers


def _worker(name: str) -> tuple[dict[str, Any], float, float, float]:
    assert _FORKED is not None
    config, factory = _FORKED
    return _run_one_sync(name, config, factory, None)


def default_jobs(nstrategies: int) -> int:
    return max(1, min(nstrategies, os.cpu_count() or 1))


def run_compare(
    config: CompareConfig,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Run every configured strategy; the result is the `compare --json` document.

    jobs > 1 runs strategies in forked worker processes (each strategy on its own copy of
    the guest, so the document is the same; only wall-clock latencies differ). The shared
    aged guest is aged once in this process before forking, and the workers inherit it.

    `timings`, when given, receives wall-clock seconds (never part of the document): per
    strategy its total (aging excluded), `<name>/model` the part spent inside the guest model
    and the strategy, and `aging` the total spent aging guests."""
    global _FORKED
    factory = GuestFactory(config.guest_config(), config.age_steps, progress)
    out: dict[str, Any] = {"config": config.as_json(), "strategies": {}}
    results: dict[str, tuple[dict[str, Any], float, float, float]] = {}
    jobs = min(jobs, len(config.strategies))
    if jobs <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for name in config.strategies:
            results[name] = _run_one_sync(name, config, factory, progress)
    else:
        factory.aged()  # age the shared guest here, once; forked workers inherit it
        shared_aging = factory.aging_seconds
        _FORKED = (config, factory)
        # the costliest first (page-by-page strategies), so two workers stay balanced
        order = sorted(config.strategies, key=lambda n: not n.startswith("vmalloc"))
        # multiprocessing's Pool rather than ProcessPoolExecutor: on Ctrl-C (or any error)
        # terminate() stops the workers at once, where the executor's shutdown waits for
        # the strategies in flight to finish (~20 s on the default guest)
        pool = multiprocessing.get_context("fork").Pool(jobs)
        try:
            pending = {name: pool.apply_async(_worker, (name,)) for name in order}
            for name in order:
                results[name] = pending[name].get()
                if progress is not None:
                    progress(name, config.cycles, config.cycles)
        except BaseException:
            pool.terminate()
            raise
        else:
            pool.close()
        finally:
            pool.join()
            _FORKED = None
        first = next(iter(results))
        results[first] = (*results[first][:3], results[first][3] + shared_aging)
    for name in config.strategies:
        result, model, seconds, _ = results[name]
        out["strategies"][name] = result
        if timings is not None:
            timings[name] = seconds
            timings[f"{name}/model"] = model
    if timings is not None:
        timings["aging"] = sum(r[3] for r in results.values())
    return out


def strip_latency(doc: Any) -> Any:
    """The document without wall-clock figures (keys containing 'latency'): what must be
    identical for the same seed."""
    if isinstance(doc, dict):
        return {k: strip_latency(v) for k, v in doc.items() if "latency" not in k}
    if isinstance(doc, list):
        return [strip_latency(v) for v in doc]
    return doc
