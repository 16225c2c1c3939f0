"""`compare`: every strategy on the same seed, the same aged guest, the same event sequence.

Per strategy (DESIGN.md section 4, `compare --json`): one in-process run
(hv_netvsc_sim.inprocess, which documents each figure) on its guest. The guests come from
one pool.provision.Guests: every strategy starts from a copy of one guest built from the
same GuestConfig (memory, platform, seed); a strategy whose boot() reserves memory
(swiotlb's bounce buffer, pool-boot's 1 GiB region: the registry's spec says so) boots on
the pristine guest, which is then aged with `age_steps` churn steps (its own boot profile,
aged once); all the others share one aged guest, aged once, each getting a clone. Aging
converts nothing, so no conversion counts come from it.

Extra keys (the contract allows them): `series` also has level-3 splits, DirectMap2M/1G
bytes, pages converted, modeled seconds, cumulative failures, the mean and max modeled
allocate latency of each cycle and the mean simulator wall clock per allocate call;
`driver` (DriverStats: probes, failures by reason and by buffer, leaks,
packets), `host` (HostStats: GPADLs and their messages, refusals, use-after-free writes),
`events` (counts by kind) and `buffer_checks`.

Everything except the simulator's wall-clock figures (`simulator_wall_seconds`, the series'
`simulator_wall_*`) is a pure function of the configuration: the same seed gives the same
JSON, modeled latencies included.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from typing import Any

import attrs

from hv_netvsc_sim.inprocess import SERIES_KEYS, SeriesRecorder, buffer_checks, run_in_process
from hv_netvsc_sim.scenario import ScenarioConfig
from hv_netvsc_sim.timeline import STRESS, Timeline, resolve
from hv_netvsc_sim.verdict import verdicts
from pool.guest import GuestConfig
from pool.provision import Guests, Progress
from pool.registry import CONTRACT_STRATEGIES, SPECS, STRATEGIES, PoolSettings

__all__ = [
    "COMPARE_CYCLES",
    "CONTRACT_STRATEGIES",
    "DEFAULT_AGE_STEPS",
    "SERIES_KEYS",
    "CompareConfig",
    "SeriesRecorder",
    "buffer_checks",
    "default_jobs",
    "run_compare",
    "strip_latency",
    "strip_wall",
]

DEFAULT_AGE_STEPS = 1_000_000  # compare's aging (DESIGN.md section 4)
COMPARE_CYCLES = 200  # compare's cycles (DESIGN.md section 4); `run` keeps ScenarioConfig's


def _strategies(value: Any) -> tuple[str, ...]:
    return tuple(value)


def _timeline(value: Timeline | str) -> Timeline:
    """A Timeline as given, or a preset name / TOML path (hv_netvsc_sim.timeline.resolve)."""
    return value if isinstance(value, Timeline) else resolve(value)


def _runtime_cost(value: float | None) -> float | None:
    if value is None:
        return None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"runtime cost of the 4 KiB direct map must be within [0, 1]: {value}")
    return float(value)


@attrs.frozen
class CompareConfig:
    """The guest every strategy starts from, the scenario they all run, the aging, and the
    strategies. One seed: the guest's and the scenario's must be the same (`of` builds
    both from one).

    timeline: the scenario's time axis (hv_netvsc_sim.timeline): `stress` (the default) runs
      `scenario`'s cycles; a schedule (`azure-month`, `boot-only`, a TOML file's) replaces
      them, `scenario` then giving only the seed, the traffic size and the vNIC settings. A
      plain frozen value: a preset name or a path is accepted and resolved.
    runtime_cost_4k: the optional runtime estimate's parameter (hv_netvsc_sim.verdict): the
      throughput fraction lost when the whole direct map is in 4 KiB pages; None (default):
      no estimate is printed or put in the document.
    """

    guest: GuestConfig = attrs.field(factory=GuestConfig)
    scenario: ScenarioConfig = attrs.field(factory=lambda: ScenarioConfig(cycles=COMPARE_CYCLES))
    age_steps: int = DEFAULT_AGE_STEPS
    strategies: tuple[str, ...] = attrs.field(default=STRATEGIES, converter=_strategies)
    timeline: Timeline = attrs.field(default=STRESS, converter=_timeline)
    runtime_cost_4k: float | None = attrs.field(default=None, converter=_runtime_cost)

    def __attrs_post_init__(self) -> None:
        if self.scenario.cycles < 1:
            raise ValueError(f"cycles must be at least 1: {self.scenario.cycles}")
        if self.age_steps < 0:
            raise ValueError(f"age steps must not be negative: {self.age_steps}")
        if self.guest.seed != self.scenario.seed:
            raise ValueError(
                f"one seed for the guest and the scenario: {self.guest.seed} != "
                f"{self.scenario.seed}"
            )
        unknown = [s for s in self.strategies if s not in SPECS]
        if unknown or not self.strategies:
            raise ValueError(
                f"unknown strategies {unknown}: expected some of {', '.join(STRATEGIES)}"
            )

    @classmethod
    def of(
        cls,
        *,
        seed: int = 1,
        guest_memory_bytes: int | None = None,
        platform: str | None = None,
        age_steps: int = DEFAULT_AGE_STEPS,
        strategies: tuple[str, ...] = STRATEGIES,
        timeline: Timeline | str = STRESS,
        runtime_cost_4k: float | None = None,
        **scenario: Any,
    ) -> CompareConfig:
        """A config from one seed: the guest's fields (the GuestConfig defaults unless
        given), the scenario's (ScenarioConfig's, with compare's 200 cycles) and its
        timeline (a preset name, a TOML path or a Timeline)."""
        guest: dict[str, Any] = {"seed": seed}
        if guest_memory_bytes is not None:
            guest["memory_bytes"] = guest_memory_bytes
        if platform is not None:
            guest["platform"] = platform
        return cls(
            GuestConfig(**guest),
            ScenarioConfig(**{"cycles": COMPARE_CYCLES, **scenario, "seed": seed}),
            age_steps,
            strategies,
            _timeline(timeline),
            runtime_cost_4k,
        )

    @property
    def seed(self) -> int:
        return self.guest.seed

    @property
    def run_scenario(self) -> ScenarioConfig:
        """The engine's configuration: the scenario with the timeline when it schedules."""
        if not self.timeline.scheduled:
            return self.scenario
        return attrs.evolve(self.scenario, timeline=self.timeline)

    @property
    def cycles(self) -> int:
        """Series points: the stress cycles, or the schedule's samples."""
        return self.run_scenario.total_cycles

    def as_json(self) -> dict[str, Any]:
        return {
            "guest_memory_bytes": self.guest.memory_bytes,
            "cycles": self.cycles,
            "scenario": self.timeline.name,
            "timeline": self.timeline.as_json() if self.timeline.scheduled else None,
            "runtime_cost_4k": self.runtime_cost_4k,
            "seed": self.guest.seed,
            "platform": self.guest.platform,
            "age_steps": self.age_steps,
            "nics": self.scenario.nics,
            "mixed_events": self.scenario.mixed_events,
            "churn_steps": self.scenario.churn_steps,
            "traffic_packets": self.scenario.traffic_packets,
            "strategies": list(self.strategies),
        }


def _run_one_sync(
    name: str, config: CompareConfig, guests: Guests, progress: Progress | None
) -> tuple[dict[str, Any], float, float, float]:
    """One strategy's result, the seconds inside the model, the total (aging excluded) and
    the aging seconds."""
    t0 = time.perf_counter()
    aging0 = guests.aging_seconds
    on_cycle = None if progress is None else (lambda c: progress(name, c, config.cycles))
    run = asyncio.run(run_in_process(name, guests, config.run_scenario, on_cycle=on_cycle))
    aging = guests.aging_seconds - aging0
    return run.result, run.model_seconds, time.perf_counter() - t0 - aging, aging


_FORKED: tuple[CompareConfig, Guests] | None = None  # inherited by forked workers


def _worker(name: str) -> tuple[dict[str, Any], float, float, float]:
    assert _FORKED is not None
    config, guests = _FORKED
    return _run_one_sync(name, config, guests, None)


def _run_forked(
    config: CompareConfig, factory: Guests, jobs: int, progress: Progress | None
) -> dict[str, tuple[dict[str, Any], float, float, float]]:
    """The strategies in forked workers. The ones that boot on a pristine guest (their own
    boot profile, aged after boot: pool-boot, swiotlb) start first, in a worker forked before
    the shared guest exists, while this process ages (or loads) the shared guest: the second
    core no longer idles through that. The others run in `jobs` workers forked after it, which
    inherit the aged guest. Each strategy runs on its own copy, so the document is the same
    as in process; the costliest go first, so the workers stay balanced."""
    global _FORKED
    settings = PoolSettings()
    early = [n for n in config.strategies if SPECS[n].reserves_at_boot(settings)]
    late = sorted(
        (n for n in config.strategies if n not in early), key=lambda n: not SPECS[n].costly
    )
    factory.pristine_kept()  # built once here; every worker inherits it
    _FORKED = (config, factory)
    ctx = multiprocessing.get_context("fork")
    # multiprocessing's Pool rather than ProcessPoolExecutor: on Ctrl-C (or any error)
    # terminate() stops the workers at once, where the executor's shutdown waits for the
    # strategies in flight to finish (~20 s on the default guest)
    pools = []
    pending = {}
    try:
        if early:
            pools.append(ctx.Pool(min(len(early), max(1, jobs - 1))))
            pending.update({n: pools[-1].apply_async(_worker, (n,)) for n in early})
        if late:
            # the shared guest, aged once, from the kept pristine one (the early workers
            # have their copy); the late workers inherit it
            factory.prepare(take_pristine=True)
            pools.append(ctx.Pool(min(jobs, len(late))))
            pending.update({n: pools[-1].apply_async(_worker, (n,)) for n in late})
        results = {}
        for name in [*late, *early]:
            results[name] = pending[name].get()
            if progress is not None:
                progress(name, config.cycles, config.cycles)
    except BaseException:
        for pool in pools:
            pool.terminate()
        raise
    else:
        for pool in pools:
            pool.close()
    finally:
        for pool in pools:
            pool.join()
        _FORKED = None
    if late:
        first = late[0]  # the shared aging, counted once, with the first strategy using it
        results[first] = (*results[first][:3], results[first][3] + factory.aging_seconds)
    return results


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
    the guest, so the document is the same; only wall-clock latencies differ): the shared
    aged guest is aged once in this process, and the workers inherit it (_run_forked).

    `timings`, when given, receives wall-clock seconds (never part of the document): per
    strategy its total (aging excluded), `<name>/model` the part spent inside the guest model
    and the strategy, and `aging` the total spent aging guests."""
    factory = Guests(config.guest, config.age_steps, progress)
    out: dict[str, Any] = {"config": config.as_json(), "strategies": {}}
    results: dict[str, tuple[dict[str, Any], float, float, float]] = {}
    jobs = min(jobs, len(config.strategies))
    if jobs <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for name in config.strategies:
            results[name] = _run_one_sync(name, config, factory, progress)
    else:
        results = _run_forked(config, factory, jobs, progress)
    for name in config.strategies:
        result, model, seconds, _ = results[name]
        out["strategies"][name] = result
        if timings is not None:
            timings[name] = seconds
            timings[f"{name}/model"] = model
    if timings is not None:
        timings["aging"] = sum(r[3] for r in results.values())
    out["verdict"] = {name: v.as_json() for name, v in verdicts(out).items()}
    return out


def strip_wall(doc: Any) -> Any:
    """The document without the simulator's wall-clock figures (keys containing 'wall'):
    what must be identical for the same seed. The modeled latencies (`alloc_latency_*`)
    are counts times the cost profile, so they stay."""
    if isinstance(doc, dict):
        return {k: strip_wall(v) for k, v in doc.items() if "wall" not in k}
    if isinstance(doc, list):
        return [strip_wall(v) for v in doc]
    return doc


strip_latency = strip_wall  # the name callers used while latency meant wall clock
