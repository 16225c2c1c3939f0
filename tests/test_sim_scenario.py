"""The scenario engine: virtual clock, deterministic event order, correctness over many cycles."""

from __future__ import annotations

import pytest

from hv_netvsc_sim.client import InProcessClient
from hv_netvsc_sim.host import HyperVHost
from hv_netvsc_sim.scenario import (
    EVENT_KINDS,
    Event,
    EventQueue,
    Scenario,
    ScenarioConfig,
)
from pool import make_strategy
from pool.guest import Guest, GuestConfig
from pool.guest.units import MiB


def test_event_queue_orders_by_time_then_schedule_order():
    q = EventQueue()
    q.schedule(2.0, Event("b", 0))
    q.schedule(1.0, Event("a", 0))
    q.schedule(2.0, Event("c", 0))
    assert [q.pop().kind for _ in range(3)] == ["a", "b", "c"]
    assert q.now == 2.0
    with pytest.raises(ValueError):
        q.schedule(1.5, Event("late", 0))


def test_config_validation():
    with pytest.raises(ValueError):
        ScenarioConfig(nics=0)
    with pytest.raises(ValueError):
        ScenarioConfig(cycles=-1)
    with pytest.raises(ValueError):
        ScenarioConfig(mix=(("teleport", 1.0),))
    with pytest.raises(ValueError):
        ScenarioConfig(pace=-1)


def _world(seed: int = 7, name: str = "pool"):
    # 2 GiB: on 1 GiB the aging's kernel-memory bursts leave the pool's 2-4 MiB chunks short
    # within 60 cycles (a probe refused for memory is not what these tests are about).
    guest = Guest(GuestConfig(memory_bytes=2048 * MiB, seed=seed))
    guest.age(20_000)
    strategy = make_strategy(name, guest)
    strategy.boot()
    strategy.setup()
    client = InProcessClient(strategy)
    host = HyperVHost(guest, owns=client.owns)
    return guest, strategy, client, host


class _Recorder:
    """Records the events the engine dispatches (kind, nic, args, virtual time)."""

    def __init__(self, scenario: Scenario) -> None:
        self.seen: list[tuple[str, int, tuple[int, ...], float]] = []
        original = scenario._dispatch

        async def dispatch(ev: Event) -> None:
            self.seen.append((ev.kind, ev.nic, ev.args, scenario.queue.now))
            await original(ev)

        scenario._dispatch = dispatch  # type: ignore[method-assign]


async def _run(cfg: ScenarioConfig, seed: int = 7):
    guest, strategy, client, host = _world(seed)
    cycles: list[int] = []
    sc = Scenario(cfg, client, host, guest=guest, maintain=client.maintain, on_cycle=cycles.append)
    rec = _Recorder(sc)
    done = await sc.run()
    return sc, rec.seen, cycles, done, (guest, strategy, host)


async def test_same_seed_same_events_and_cycle_shape():
    cfg = ScenarioConfig(nics=3, cycles=12, seed=11, churn_steps=50)
    _sc, seen, cycles, done, _ = await _run(cfg)
    _, seen2, _, _, _ = await _run(cfg)
    assert seen == seen2
    assert done == 12 and cycles == list(range(1, 13))
    times = [t for *_, t in seen]
    assert times == sorted(times)
    # every cycle: hot remove then hot add of vNIC c mod N, then its traffic
    removes = [(nic, t) for kind, nic, _, t in seen if kind == "hot_remove"]
    assert removes == [(c % 3, float(c)) for c in range(12)]
    adds = [(nic, t) for kind, nic, _, t in seen if kind == "hot_add"]
    assert adds == [(c % 3, c + 0.25) for c in range(12)]
    assert {k for k, *_ in seen} <= set(EVENT_KINDS)
    other = ScenarioConfig(nics=3, cycles=12, seed=12, churn_steps=50)
    _, seen3, _, _, _ = await _run(other)
    assert seen3 != seen


async def test_many_cycles_stay_correct():
    cfg = ScenarioConfig(nics=2, cycles=60, seed=3, mixed_events=4, churn_steps=100)
    sc, seen, _, _, (guest, strategy, host) = await _run(cfg)
    s = sc.summary()
    kinds = {k for k, *_ in seen}
    assert kinds == set(EVENT_KINDS)  # every event kind happened
    # Probes may fail for lack of memory only: on this 2 GiB guest (DMA32 alone, so no
    # ALLOC_NOFRAGMENT) the background churn's unmovable allocations steal the largest free
    # blocks (__rmqueue_fallback), so the pool's 2-4 MiB chunks can run out; before the model
    # had migratetypes this asserted no probe failure at all.
    assert set(s["driver"]["failure_reasons"]) <= {"no_memory"}
    assert s["driver"]["corrupt_reads"] == 0
    assert s["host"]["use_after_free_writes"] == 0 and s["host"]["gpadls_refused"] == 0
    assert s["devices_up"] == 2
    live = {b.id for d in sc.devices if d is not None for b in d.buffers()}
    assert live == {b.id for b in strategy.buffers()}  # nothing leaked, nothing lost
    assert set(host.gpadls) == {
        a.handle for d in sc.devices if d is not None for a in (*d.rings, d.recv, d.send)
    }
    strategy.check_invariants()
    guest.check_invariants()
    await sc.shutdown()
    assert strategy.buffers() == [] and not host.gpadls and not host.channels


async def test_stop_ends_an_unbounded_run():
    _guest, strategy, client, host = _world()
    sc = Scenario(ScenarioConfig(cycles=0, churn_steps=0), client, host)

    def on_cycle(c: int) -> None:
        if c == 5:
            sc.stop()

    sc.on_cycle = on_cycle
    assert await sc.run() == 5
    await sc.shutdown()
    assert strategy.buffers() == []
