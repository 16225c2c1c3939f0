"""SharedPool (option 3): golden behaviour, growth and shrink, leaks, ownership, properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pool import AllocationError, DoubleFree, NotOwner, UnknownBuffer
from pool.extent_index import ScanIndex
from pool.guest import PAGE_UNKNOWN, FaultPlan, Guest, GuestConfig
from pool.guest.units import GiB, KiB, MiB
from pool.shared import SharedPool


def guest(**kw) -> Guest:
    kw.setdefault("memory_bytes", 2 * GiB)
    kw.setdefault("hole", None)
    return Guest(GuestConfig(**kw))


def pool(g: Guest | None = None, **kw) -> SharedPool:
    p = SharedPool(g or guest(), **kw)
    p.boot()
    p.setup()
    return p


def test_setup_takes_order10_chunks_and_converts_each_contiguous_run_once():
    g = guest()
    p = pool(g, initial_bytes=64 * MiB)
    s = p.stats()
    assert s.size_bytes == 64 * MiB and s.chunks["free"] == 16
    runs = 1 + sum(
        1 for a, b in zip(sorted(p.chunks), sorted(p.chunks)[1:], strict=False) if b != a + 1024
    )
    assert g.stats.hypercalls == g.stats.conversions_to_shared == runs
    assert g.stats.direct_map_level2_splits == 0  # whole 2 MiB leaves, never split
    p.check_invariants()
    g.check_invariants()


def test_hot_remove_add_cycle_costs_no_hypercall_and_no_split_once_warm():
    g = guest()
    g.age(20_000)
    p = pool(g)
    rx, tx = p.allocate(16 * MiB, "nic0", "recv"), p.allocate(1 * MiB, "nic0", "send")
    before = g.stats.snapshot()
    for _ in range(20):
        p.free(rx.id, "nic0")
        p.free(tx.id, "nic0")
        rx, tx = p.allocate(16 * MiB, "nic0", "recv"), p.allocate(1 * MiB, "nic0", "send")
    delta = g.stats.snapshot() - before
    assert delta.hypercalls == 0
    assert delta.direct_map_level2_splits == delta.direct_map_level3_splits == 0
    assert delta.pages_zeroed == 20 * (4096 + 256)
    assert rx.gpadl_messages == 147 and rx.npages == 4096
    p.check_invariants()


def test_large_buffer_is_whole_chunks_plus_a_tail_mapped_shared_and_contiguous():
    g = guest()
    p = pool(g)
    buf = p.allocate(16 * MiB + 5 * KiB, "a")
    assert buf.npages == 4096 + 2
    assert sum(r.npages for r in buf.ranges) == buf.npages
    area = next(a for a in g.vmalloc if a.va == buf.va)
    assert area.attr == 1 and np.array_equal(area.pfns, buf.pfns())
    p.check_invariants()


def test_buffers_up_to_64mib_and_clear_errors_beyond():
    p = pool(initial_bytes=16 * MiB, max_bytes=256 * MiB)
    big = p.allocate(64 * MiB, "a")
    assert big.npages == 16384
    with pytest.raises(AllocationError) as err:
        p.allocate(64 * MiB + 1, "a")
    assert err.value.reason == "too_large"
    for bad in (0, -1, 1.5, True, "4096"):
        with pytest.raises(AllocationError) as err:
            p.allocate(bad, "a")  # type: ignore[arg-type]
        assert err.value.reason == "invalid_size"


def test_small_buffers_prefer_the_fullest_chunk_so_free_chunks_stay_whole():
    p = pool(initial_bytes=16 * MiB)
    a = p.allocate(512 * KiB, "x")
    b = p.allocate(64 * KiB, "x")
    assert a.ranges[0].start // 1024 == b.ranges[0].start // 1024  # same chunk
    assert p.stats().chunks == {"free": 3, "partial": 1, "full": 0, "leaked": 0}
    p.free(a.id, "x")
    p.free(b.id, "x")
    assert p.stats().chunks["free"] == 4


def test_zeroed_on_allocation_no_old_contents_reach_a_new_owner():
    g = guest()
    p = pool(g, initial_bytes=4 * MiB)
    a = p.allocate(4 * MiB, "alice")
    g.write(a.pfns(), tag=1234)
    p.free(a.id, "alice")
    b = p.allocate(4 * MiB, "bob")
    assert set(b.pfns().tolist()) == set(a.pfns().tolist())
    assert (g.content[b.pfns()] == 0).all()


def test_free_errors_are_distinct_and_change_nothing():
    g = guest()
    p = pool(g)
    buf = p.allocate(1 * MiB, "alice")
    gone = p.allocate(1 * MiB, "alice")
    p.free(gone.id, "alice")
    before = (p.stats(), g.stats.snapshot(), g.allocator.buddyinfo())
    with pytest.raises(NotOwner):
        p.free(buf.id, "mallory")
    with pytest.raises(DoubleFree):
        p.free(gone.id, "alice")
    with pytest.raises(UnknownBuffer):
        p.free(999_999, "alice")
    assert (p.stats(), g.stats.snapshot(), g.allocator.buddyinfo()) == before
    p.free(buf.id, "alice")


def test_background_growth_between_watermarks_and_bounded_by_max():
    g = guest()
    p = pool(
        g,
        initial_bytes=32 * MiB,
        low_watermark_bytes=16 * MiB,
        high_watermark_bytes=64 * MiB,
        grow_step_bytes=32 * MiB,
        max_bytes=96 * MiB,
    )
    p.allocate(20 * MiB, "a")  # free drops to 12 MiB < low
    assert p.maintain(1.0) is True and p.stats().size_bytes == 64 * MiB
    assert p.maintain(2.0) is False  # free 44 MiB: between the watermarks
    p.allocate(40 * MiB, "a")
    p.maintain(3.0)
    assert p.stats().size_bytes == 96 * MiB  # capped
    with pytest.raises(AllocationError) as err:
        p.allocate(64 * MiB, "a")
    assert err.value.reason == "exhausted" and "maximum size" in str(err.value)
    p.check_invariants()


def test_synchronous_growth_serves_a_request_the_pool_cannot_hold_yet():
    p = pool(initial_bytes=4 * MiB, grow_step_bytes=8 * MiB, low_watermark_bytes=0)
    buf = p.allocate(16 * MiB, "a")
    assert buf.npages == 4096 and p.stats().size_bytes >= 16 * MiB


def test_shrink_waits_for_the_hysteresis_and_keeps_the_high_watermark():
    g = guest()
    p = pool(
        g,
        initial_bytes=16 * MiB,
        high_watermark_bytes=16 * MiB,
        low_watermark_bytes=0,
        shrink_hysteresis_seconds=10.0,
        shrink_window_seconds=20.0,
    )
    p.maintain(0.0)
    bufs = [p.allocate(4 * MiB, "a") for _ in range(12)]  # grows synchronously to 48+ MiB
    for b in bufs:
        p.free(b.id, "a")
    size = p.stats().size_bytes
    assert p.maintain(5.0) is False  # free above the high watermark from now on
    assert p.maintain(14.0) is False and p.stats().size_bytes == size  # not 10 s yet
    assert p.maintain(16.0) is False  # 11 s above, but the 48 MiB peak is within the window
    assert p.maintain(21.0) is True  # the window has passed: the peak no longer holds
    s = p.stats()
    assert s.free_bytes >= 16 * MiB and s.size_bytes < size and s.shrinks == 1
    assert g.stats.conversions_to_private > 0
    p.check_invariants()
    g.check_invariants()


def test_a_dip_below_the_high_watermark_restarts_the_hysteresis():
    p = pool(
        initial_bytes=16 * MiB,
        high_watermark_bytes=16 * MiB,
        low_watermark_bytes=0,
        shrink_hysteresis_seconds=10.0,
        shrink_window_seconds=0.0,
    )
    bufs = [p.allocate(4 * MiB, "a") for _ in range(8)]
    for b in bufs:
        p.free(b.id, "a")
    p.maintain(0.0)  # above since 0
    dip = [p.allocate(4 * MiB, "a") for _ in range(8)]  # free drops to the watermark
    p.maintain(9.0)
    for b in dip:
        p.free(b.id, "a")
    assert p.maintain(12.0) is False  # above again only since 12
    assert p.maintain(22.0) is True


def test_recurring_peaks_within_the_window_cost_no_conversion():
    g = guest()
    p = pool(
        g,
        initial_bytes=16 * MiB,
        high_watermark_bytes=8 * MiB,
        low_watermark_bytes=4 * MiB,
        shrink_hysteresis_seconds=5.0,
    )
    t = 0.0
    for _ in range(3):  # warm up to the peak working set
        bufs = [p.allocate(16 * MiB, "a") for _ in range(3)]
        for b in bufs:
            p.free(b.id, "a")
        for _ in range(20):
            t += 3.0
            p.maintain(t)
    before = g.stats.snapshot()
    for _ in range(10):  # the same peak every minute: kept, never shrunk and re-grown
        bufs = [p.allocate(16 * MiB, "a") for _ in range(3)]
        for b in bufs:
            p.free(b.id, "a")
        for _ in range(20):
            t += 3.0
            p.maintain(t)
    assert (g.stats.snapshot() - before).hypercalls == 0
    p.check_invariants()


def test_reencryption_failure_during_shrink_leaks_the_chunk():
    g = guest(faults=FaultPlan(direction="to_private", failure_rate=1.0))
    p = pool(
        g,
        initial_bytes=8 * MiB,
        high_watermark_bytes=0,
        low_watermark_bytes=0,
        shrink_hysteresis_seconds=0,
    )
    b = p.allocate(8 * MiB, "a")
    p.free(b.id, "a")
    p.shrink(force=True)  # nothing below initial size
    assert p.stats().leaked_bytes == 0
    p.initial_bytes = 0
    p.shrink(force=True)
    s = p.stats()
    assert s.leaked_bytes == 8 * MiB and s.chunks["leaked"] == 2 and s.size_bytes == 0
    leaked = [c.pfn for c in p.chunks.values() if c.leaked]
    assert all((g.platform.state[x : x + 1024] == PAGE_UNKNOWN).all() for x in leaked)
    assert all(not g.allocator.is_free(x) for x in leaked)
    g.check_invariants()
    p.check_invariants()


def test_conversion_failure_during_growth_leaks_and_the_pool_still_serves():
    g = guest(faults=FaultPlan(fail_calls=frozenset({1})))
    p = pool(g, initial_bytes=8 * MiB)
    s = p.stats()
    assert s.leaked_bytes > 0
    p.grow(8 * MiB)
    buf = p.allocate(4 * MiB, "a")
    assert (g.platform.state[buf.pfns()] == 1).all()
    p.check_invariants()
    g.check_invariants()


def test_boot_reservation_splits_nothing_at_all():
    g = guest(memory_bytes=4 * GiB, boot_splits=())
    p = SharedPool(g, name="pool-boot", boot_reserve_bytes=1 * GiB, initial_bytes=64 * MiB)
    p.boot()
    g.age(10_000)
    p.setup()
    for _ in range(5):
        b = p.allocate(16 * MiB, "a")
        p.free(b.id, "a")
    assert g.stats.hypercalls == 1
    assert g.stats.direct_map_level3_splits == g.stats.direct_map_level2_splits == 0
    assert g.direct_map.bytes_by_size()["1G"] == 4 * GiB
    p.check_invariants()


def test_falls_back_to_order9_never_smaller():
    g = guest(memory_bytes=64 * MiB, reserved=())
    taken = []
    while (pfn := g.alloc_pages(10)) is not None:
        taken.append(pfn)
    g.free_pages(taken.pop(), 10)
    half = g.alloc_pages(9)  # leaves one order-9 block free
    assert half is not None
    p = pool(g, initial_bytes=0)
    assert p.grow(8 * MiB) == 2 * MiB
    assert [c.order for c in p.chunks.values()] == [9]
    # nothing of order 9 or 10 is left where the pool allocates (DMA is never used), and
    # the pool did not fall back below order 9 though smaller free blocks would exist
    assert all(g.allocator.nr_free(z)[o] == 0 for z in ("DMA32",) for o in (9, 10))
    assert p.grow(4 * MiB) == 0


class PoolMachine(RuleBasedStateMachine):
    """Random alloc/free/grow/shrink/maintain with conversion failures injected."""

    def __init__(self) -> None:
        super().__init__()
        self.g = guest(
            memory_bytes=512 * MiB, reserved=(), faults=FaultPlan(failure_rate=0.15, seed=3)
        )
        self.p = pool(
            self.g,
            initial_bytes=16 * MiB,
            max_bytes=128 * MiB,
            low_watermark_bytes=8 * MiB,
            high_watermark_bytes=32 * MiB,
            grow_step_bytes=8 * MiB,
            shrink_hysteresis_seconds=2,
        )
        self.live: dict[int, str] = {}
        self.t = 0.0

    @rule(
        size=st.sampled_from([4 * KiB, 64 * KiB, 1 * MiB, 3 * MiB + 100, 16 * MiB]),
        owner=st.sampled_from(["a", "b"]),
    )
    def allocate(self, size, owner):
        try:
            buf = self.p.allocate(size, owner)
        except AllocationError as err:
            assert err.reason in ("exhausted", "no_memory")
            return
        self.live[buf.id] = owner

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        bid = data.draw(st.sampled_from(sorted(self.live)))
        self.p.free(bid, self.live.pop(bid))

    @rule(dt=st.floats(0.5, 5))
    def maintain(self, dt):
        self.t += dt
        self.p.maintain(self.t)

    @rule(force=st.booleans())
    def shrink(self, force):
        self.p.shrink(self.t, force=force)

    @rule(mib=st.integers(1, 16))
    def grow(self, mib):
        self.p.grow(mib * MiB)

    @invariant()
    def consistent(self):
        self.p.check_invariants()
        self.g.check_invariants()  # no page of unknown or shared state is free
        h = self.g.hazards()
        assert h.private_alias_to_shared == 0
        unknown = np.flatnonzero(self.g.platform.state == PAGE_UNKNOWN)
        leaked = {
            pfn
            for c in self.p.chunks.values()
            if c.leaked
            for pfn in range(c.pfn, c.pfn + c.npages)
        }
        assert set(unknown.tolist()) <= leaked


PoolMachine.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPoolMachine = PoolMachine.TestCase


class IndexDifferential(RuleBasedStateMachine):
    """The same calls on two pools over two copies of one guest, one with ExtentIndex and
    one with ScanIndex: every buffer (PFNs, va), refusal and stats() must be identical,
    and the index must equal a recomputation (ExtentIndex.check, in check_invariants)."""

    def __init__(self) -> None:
        super().__init__()
        g = guest(memory_bytes=512 * MiB, reserved=(), faults=FaultPlan(failure_rate=0.05, seed=4))
        kw = dict(
            initial_bytes=16 * MiB,
            max_bytes=96 * MiB,
            low_watermark_bytes=4 * MiB,
            high_watermark_bytes=24 * MiB,
            grow_step_bytes=8 * MiB,
            shrink_hysteresis_seconds=2,
        )
        g2 = g.clone()
        self.new = pool(g, **kw)
        self.ref = pool(g2, **kw)
        self.ref._partial = ScanIndex()
        self.live: dict[int, str] = {}
        self.t = 0.0

    def both(self, call):
        outcomes = []
        for p in (self.new, self.ref):
            try:
                outcomes.append(("ok", call(p)))
            except AllocationError as err:
                outcomes.append(("refused", err.reason, str(err)))
        assert outcomes[0] == outcomes[1], outcomes
        return outcomes[0]

    @rule(
        size=st.sampled_from([4 * KiB, 12 * KiB, 64 * KiB, 256 * KiB, 1032 * KiB, 3 * MiB + 100]),
        owner=st.sampled_from(["a", "b"]),
        n=st.integers(1, 6),
    )
    def allocate(self, size, owner, n):
        for _ in range(n):
            out = self.both(lambda p: p.allocate(size, owner))
            if out[0] == "ok":
                self.live[out[1].id] = owner

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        bid = data.draw(st.sampled_from(sorted(self.live)))
        owner = self.live.pop(bid)
        self.both(lambda p: p.free(bid, owner))

    @rule(dt=st.floats(0.5, 5))
    def maintain(self, dt):
        self.t += dt
        self.both(lambda p: p.maintain(self.t))

    @rule(force=st.booleans())
    def shrink(self, force):
        self.both(lambda p: p.shrink(self.t, force=force))

    @invariant()
    def same(self):
        assert self.new.stats() == self.ref.stats()
        self.new.check_invariants()


IndexDifferential.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestIndexDifferential = IndexDifferential.TestCase


def test_old_pickles_rebuild_the_partial_index_in_list_order():
    """A pool pickled before ExtentIndex (a list of partial chunks, chunks without a cached
    largest extent) loads with an index that makes the same choices."""
    import pickle

    p = pool(guest(memory_bytes=512 * MiB, reserved=()), initial_bytes=16 * MiB)
    bufs = [p.allocate(64 * KiB, "a") for _ in range(200)]
    for b in bufs[::3]:
        p.free(b.id, "a")
    state = dict(p.__dict__)
    state["_partial"] = list(p._partial)
    del state["_leaked_chunks"]
    old = SharedPool.__new__(SharedPool)
    old.__dict__.update(state)
    restored = pickle.loads(pickle.dumps(old))
    for c in restored.chunks.values():
        assert c.largest == c.largest_extent()
    restored.check_invariants()
    assert restored.stats() == p.stats()
    assert [restored.allocate(12 * KiB, "a").ranges for _ in range(20)] == [
        p.allocate(12 * KiB, "a").ranges for _ in range(20)
    ]


def test_a_pool_that_finds_no_chunk_reports_its_shortfall(caplog: pytest.LogCaptureFixture):
    """An aged small guest can have no free block of order 9 or more: the pool then stays
    below its initial size, says by how much, and the daemon warns at start."""
    import logging

    from daemon.engine import Service

    g = guest(memory_bytes=1 * GiB)
    while g.alloc_pages(9) is not None:  # take every 2 MiB-or-larger free block
        pass
    p = pool(g, initial_bytes=64 * MiB)
    p.setup()
    assert p.size_pages == 0 and p.shortfall_bytes == 64 * MiB
    with caplog.at_level(logging.WARNING, logger="sharedpoold"):
        Service._warn_shortfall(object.__new__(Service), p)
    assert "holds 0B of its initial 64MiB" in caplog.text and "pool-boot" in caplog.text
    full = pool(guest(memory_bytes=1 * GiB), initial_bytes=64 * MiB)
    full.setup()
    assert full.shortfall_bytes == 0
