"""The page allocator: hand-worked buddy cases, error handling, and a stateful property test."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from pool.guest.buddy import PageAllocator, Zone, buddy_of, default_zones, tile_range
from pool.guest.migratetype import MIGRATE_MOVABLE
from pool.guest.units import PAGE_SHIFT, GiB, MiB

G = GiB >> PAGE_SHIFT  # pfns per GiB


def one_block_guest() -> PageAllocator:
    """RAM is exactly one order-10 block, at pfn 1024."""
    return PageAllocator(2048, [(1024, 2048)], [Zone("Normal", 0, 2048)])


def snapshot(a: PageAllocator) -> tuple[object, ...]:
    return (
        tuple((z.name, tuple(tuple(a.free_blocks(z.name, o)) for o in range(11))) for z in a.zones),
        a.allocated_pages(),
        a.free_pages(),
    )


# ---------------------------------------------------------------- zones and boot


def test_default_zones_x86_64() -> None:
    assert default_zones(17 * G) == (
        Zone("DMA", 0, 4096),
        Zone("DMA32", 4096, 4 * G),
        Zone("Normal", 4 * G, 17 * G),
    )
    assert [z.name for z in default_zones(2 * G)] == ["DMA", "DMA32"]
    assert default_zones(1000) == (Zone("DMA", 0, 1000),)
    assert default_zones(0) == ()


def test_boot_puts_ram_in_maximal_aligned_blocks_lowest_at_head() -> None:
    # 16 GiB guest: RAM [0, 3 GiB) and [4 GiB, 17 GiB), the PCI hole in between.
    a = PageAllocator(17 * G, [(0, 3 * G), (4 * G, 17 * G)])
    assert a.nr_free("DMA") == (0,) * 10 + (4,)
    assert a.nr_free("DMA32") == (0,) * 10 + ((3 * G - 4096) // 1024,)
    assert a.nr_free("Normal") == (0,) * 10 + (13 * G // 1024,)
    assert a.free_pages() == a.ram_pages == 16 * G
    # memblock_free_all frees in ascending order to the tail: the list head is the lowest block.
    assert a.free_blocks("Normal", 10)[:3] == [4 * G, 4 * G + 1024, 4 * G + 2048]
    a.check_invariants()


def test_boot_with_unaligned_ram_uses_the_largest_aligned_blocks() -> None:
    a = PageAllocator(4096, [(1, 1030)], [Zone("DMA", 0, 4096)])
    # [1, 1030): 1 (o0), 2 (o1), 4 (o2), 8 (o3), ..., 512 (o9), 1024 (o2), 1028 (o1)
    assert list(tile_range(1, 1030)) == [
        (1, 0), (2, 1), (4, 2), (8, 3), (16, 4), (32, 5), (64, 6), (128, 7), (256, 8), (512, 9),
        (1024, 2), (1028, 1),
    ]  # fmt: skip
    assert a.nr_free("DMA") == (1, 2, 2, 1, 1, 1, 1, 1, 1, 1, 0)
    a.check_invariants()


def test_64gib_guest_builds_fast() -> None:
    start = time.perf_counter()
    a = PageAllocator(65 * G, [(0, 3 * G), (4 * G, 65 * G)])
    elapsed = time.perf_counter() - start
    assert a.free_pages() == 64 * G
    assert elapsed < 2.0, f"building a 64 GiB allocator took {elapsed:.2f} s"
    start = time.perf_counter()
    b = a.clone()
    # The clone copies two per-pfn list-link arrays besides the state bytes: 200 MB at 64 GiB.
    assert time.perf_counter() - start < 3.0
    assert b.nr_free("Normal") == a.nr_free("Normal")


def test_bad_construction() -> None:
    with pytest.raises(ValueError, match="overlaps"):
        PageAllocator(4096, [(0, 100), (50, 200)])
    with pytest.raises(ValueError, match="not inside"):
        PageAllocator(4096, [(0, 5000)])
    with pytest.raises(ValueError, match="outside every zone"):
        PageAllocator(4096, [(0, 4096)], [Zone("DMA", 0, 2048)])
    with pytest.raises(ValueError, match="sorted"):
        PageAllocator(4096, [(0, 4096)], [Zone("DMA32", 2048, 4096), Zone("DMA", 0, 2048)])


# ---------------------------------------------------------------- golden buddy cases


def test_split_order10_for_order0_leaves_one_block_per_lower_order() -> None:
    a = one_block_guest()
    assert a.alloc(0) == 1024
    # expand(): the upper halves 1024+512 (o9), 1024+256 (o8), ..., 1024+1 (o0) go on the lists.
    assert a.nr_free("Normal") == (1,) * 10 + (0,)
    for order in range(10):
        assert a.free_blocks("Normal", order) == [1024 + (1 << order)]
    assert a.allocated_order(1024) == 0
    assert not a.is_free(1024) and a.is_free(1025) and a.is_free(2047)
    a.check_invariants()
    # Freeing it merges all the way back: 1024^1 = 1025 (o0), then 1026 (o1), 1028 (o2), ...
    a.free(1024, 0)
    assert a.nr_free("Normal") == (0,) * 10 + (1,)
    assert a.free_blocks("Normal", 10) == [1024]
    a.check_invariants()


def test_next_order0_allocation_takes_the_split_remainder() -> None:
    a = one_block_guest()
    # After the first split the order-0 list holds 1025: the next order-0 request takes it, the
    # third splits the order-1 block 1026 (keeping 1026, freeing its upper half 1027).
    assert [a.alloc(0) for _ in range(3)] == [1024, 1025, 1026]
    assert a.free_blocks("Normal", 0) == [1027]
    assert a.free_blocks("Normal", 1) == []


def test_buddy_arithmetic() -> None:
    assert buddy_of(8, 3) == 0
    assert buddy_of(0, 3) == 8
    assert buddy_of(1024 + 512, 9) == 1024
    assert buddy_of(12, 2) == 8


def test_buddies_merge_into_the_lower_address() -> None:
    a = PageAllocator(16, [(0, 16)], [Zone("DMA", 0, 16)])
    assert a.nr_free("DMA") == (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0)
    assert a.alloc(3, ("DMA",)) == 0  # splits the order-4 block: 8 goes on the order-3 list
    assert a.alloc(3, ("DMA",)) == 8
    a.free(8, 3)
    assert a.free_blocks("DMA", 3) == [8]
    a.free(0, 3)  # the buddy of 0 at order 3 is 8, free: merge into order 4 at 0
    assert a.nr_free("DMA") == (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0)
    assert a.free_blocks("DMA", 4) == [0]


def test_no_merge_across_a_hole() -> None:
    # RAM [0, 4) and [6, 16): pages 4 and 5 are a hole.
    a = PageAllocator(16, [(0, 4), (6, 16)], [Zone("DMA", 0, 16)])
    assert a.nr_free("DMA") == (0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0)  # [0,4) o2, [6,8) o1, [8,16) o3
    assert a.alloc(3, ("DMA",)) == 8
    a.free(8, 3)  # its buddy 0 is only an order-2 block: no merge
    assert a.nr_free("DMA") == (0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0)
    assert a.alloc(1, ("DMA",)) == 6
    a.free(6, 1)  # buddy 4 is a hole
    assert a.nr_free("DMA") == (0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0)
    assert not a.is_free(4) and a.block_of(5) is None and not a.is_ram(5)
    a.check_invariants()


def test_no_merge_across_a_zone_boundary() -> None:
    a = PageAllocator(16, [(0, 16)], [Zone("DMA", 0, 8), Zone("DMA32", 8, 16)])
    assert a.nr_free("DMA") == (0, 0, 0, 1) + (0,) * 7
    assert a.nr_free("DMA32") == (0, 0, 0, 1) + (0,) * 7
    a.check_invariants()  # 0 and 8 are buddies at order 3, but in different zones
    assert a.alloc(3, ("DMA32",)) == 8
    a.free(8, 3)
    assert a.nr_free("DMA32") == (0, 0, 0, 1) + (0,) * 7
    assert a.nr_free("DMA") == (0, 0, 0, 1) + (0,) * 7


def test_zonelist_fallback_and_exhaustion() -> None:
    a = PageAllocator(2 * 4096, [(0, 2 * 4096)])  # DMA [0, 4096), DMA32 [4096, 8192)
    got = [a.alloc(10) for _ in range(4)]
    assert got == [4096, 5120, 6144, 7168]  # Normal is absent: skipped; DMA32 serves
    assert a.alloc(10) is None  # DMA is not in the default zonelist
    assert a.alloc(10, ("Normal", "DMA32", "DMA")) == 0
    with pytest.raises(ValueError, match="unknown zone"):
        a.alloc(0, ("HighMem",))


def test_lifo_reuse() -> None:
    a = one_block_guest()
    pfns = [a.alloc(0) for _ in range(8)]
    assert pfns == list(range(1024, 1032))
    a.free(1027, 0)
    assert a.alloc(0) == 1027


def test_bad_orders() -> None:
    a = one_block_guest()
    for order in (-1, 11):
        with pytest.raises(ValueError, match=r"0\.\.10"):
            a.alloc(order)
        with pytest.raises(ValueError, match=r"0\.\.10"):
            a.free(1024, order)


def test_bad_frees_raise_and_change_nothing() -> None:
    a = one_block_guest()
    p, q = a.alloc(2), a.alloc(0)
    assert p == 1024 and q == 1028
    before = snapshot(a)
    cases = [
        (p, 1, "allocated at order 2, not 1"),
        (p, 3, "allocated at order 2, not 3"),
        (p + 1, 0, "not the start"),
        (1030, 0, "double free"),  # 1030 is a free order-1 block
        (1031, 0, "not the start"),  # inside the free block 1030
        (5, 0, "hole"),
        (4096, 0, "outside"),
        (-1, 0, "outside"),
    ]
    for pfn, order, message in cases:
        with pytest.raises(ValueError, match=message):
            a.free(pfn, order)
        assert snapshot(a) == before
    a.free(q, 0)
    with pytest.raises(ValueError, match="double free"):
        a.free(q, 0)
    a.free(p, 2)
    assert a.nr_free("Normal") == (0,) * 10 + (1,)


# ---------------------------------------------------------------- claim_range


def test_claim_range_splits_and_records_aligned_blocks() -> None:
    a = one_block_guest()
    assert a.claim_range(1024 + 5, 100)  # [1029, 1129)
    blocks = a.claimed_blocks(1029, 100)
    assert blocks == [(1029, 0), (1030, 1), (1032, 3), (1040, 4), (1056, 5), (1088, 5), (1120, 3),
                      (1128, 0)]  # fmt: skip
    assert sum(1 << o for _, o in blocks) == 100
    assert all(a.allocated_order(p) == o for p, o in blocks)
    assert a.allocated_pages() == 100
    assert a.free_pages() == 1024 - 100
    assert not a.is_free(1029) and not a.is_free(1128) and a.is_free(1028) and a.is_free(1129)
    a.check_invariants()
    a.free_range(1029, 100)
    assert a.nr_free("Normal") == (0,) * 10 + (1,)
    a.check_invariants()


def test_claim_range_returns_the_outside_pieces_even_a_single_page() -> None:
    a = one_block_guest()
    assert a.claim_range(1025, 1022)  # leaves 1024 and 2047 free, one page each
    assert a.nr_free("Normal") == (2,) + (0,) * 10
    assert sorted(a.free_blocks("Normal", 0)) == [1024, 2047]
    a.check_invariants()


def test_claimed_blocks_can_be_freed_one_by_one() -> None:
    a = one_block_guest()
    assert a.claim_range(1024, 1024)
    assert a.claimed_blocks(1024, 1024) == [(1024, 10)]
    assert a.free_pages() == 0
    a.free(1024, 10)
    assert a.claim_range(1536, 300)
    for pfn, order in reversed(a.claimed_blocks(1536, 300)):
        a.free(pfn, order)
        a.check_invariants()
    assert a.nr_free("Normal") == (0,) * 10 + (1,)


def test_claim_range_refuses_allocated_or_hole_pages_and_changes_nothing() -> None:
    a = PageAllocator(4096, [(0, 1000), (1100, 4096)], [Zone("DMA", 0, 4096)])
    p = a.alloc(0, ("DMA",))
    assert p is not None
    before = snapshot(a)
    assert not a.claim_range(p, 1)  # allocated
    assert not a.claim_range(900, 150)  # runs into the hole [1000, 1100)
    assert not a.claim_range(4000, 200)  # past end_pfn
    assert not a.claim_range(-1, 2)
    assert snapshot(a) == before
    with pytest.raises(ValueError):
        a.claim_range(10, 0)
    assert p == 1100  # the smallest boot block, [1100, 1104) of order 2
    assert a.claim_range(1200, 100)
    with pytest.raises(ValueError, match="not claimed"):
        a.free_range(1200, 101)
    a.free_range(1200, 100)
    a.check_invariants()


def test_claim_range_across_a_zone_boundary_is_cut_there() -> None:
    a = PageAllocator(8192, [(0, 8192)])
    assert a.claim_range(4000, 200)
    assert a.claimed_blocks(4000, 200) == [(4000, 5), (4032, 6), (4096, 6), (4160, 5), (4192, 3)]
    assert a.zone_of(4000) == Zone("DMA", 0, 4096)
    a.check_invariants()
    a.free_range(4000, 200)
    assert a.nr_free("DMA") == (0,) * 10 + (4,)
    assert a.nr_free("DMA32") == (0,) * 10 + (4,)


def test_clone_is_independent() -> None:
    a = one_block_guest()
    a.alloc(3)
    b = a.clone()
    b.alloc(5)
    assert a.allocated_pages() == 8 and b.allocated_pages() == 40
    assert a.nr_free("Normal") != b.nr_free("Normal")
    a.check_invariants()
    b.check_invariants()


def test_check_invariants_catches_corruption() -> None:
    a = one_block_guest()
    a.alloc(0)
    a._state[1025] = 0  # the free order-0 block 1025 vanishes from the state array
    with pytest.raises(AssertionError, match="cover 1023 pages"):
        a.check_invariants()
    b = one_block_guest()
    b.alloc(0)
    b._free_pages[0] += 1
    with pytest.raises(AssertionError, match="free counter"):
        b.check_invariants()
    c = PageAllocator(16, [(0, 16)], [Zone("DMA", 0, 16)])
    c.alloc(3, ("DMA",))
    # Pretend 0 was freed without merging: two free order-3 buddies side by side.
    c._state[0] = 1 + 3
    c._list_add(0, c._buddy_list(0, MIGRATE_MOVABLE, 3))
    c._nr_free[0 * 11 + 3] += 1  # zone 0, order 3
    c._free_pages[0] += 8
    c._counters[0] -= 8  # allocated pages
    with pytest.raises(AssertionError, match="not merged"):
        c.check_invariants()


# ---------------------------------------------------------------- stateful property test

# A 70 MiB guest: DMA [0, 16 MiB) and DMA32 [16 MiB, 70 MiB), page 0 reserved, a hole at
# [6000, 6100) and an unaligned end.
END = 70 * MiB >> PAGE_SHIFT
RAM = [(1, 6000), (6100, END - 3)]
ZONELISTS = [("DMA32",), ("DMA32", "DMA"), ("DMA",)]


class AllocatorMachine(RuleBasedStateMachine):
    blocks = Bundle("blocks")

    @initialize()
    def setup(self) -> None:
        self.a = PageAllocator(END, RAM)
        self.pristine = {
            z.name: [sorted(self.a.free_blocks(z.name, o)) for o in range(11)] for z in self.a.zones
        }
        self.live: dict[int, int] = {}  # pfn -> order
        self.used = bytearray(END)  # the model: 1 for every allocated page

    def _take(self, pfn: int, order: int) -> None:
        assert pfn % (1 << order) == 0, f"block {pfn} not aligned to order {order}"
        assert self.a.is_ram(pfn) and self.a.is_ram(pfn + (1 << order) - 1)
        assert not any(self.used[pfn : pfn + (1 << order)]), f"block {pfn} overlaps a live block"
        self.used[pfn : pfn + (1 << order)] = b"\x01" * (1 << order)
        self.live[pfn] = order

    @rule(target=blocks, order=st.integers(0, 10), zonelist=st.sampled_from(ZONELISTS))
    def alloc(self, order: int, zonelist: tuple[str, ...]) -> object:
        pfn = self.a.alloc(order, zonelist)
        if pfn is None:
            # Nothing of that order free in those zones.
            for name in zonelist:
                assert all(n == 0 for n in self.a.nr_free(name)[order:])
            return multiple()
        self._take(pfn, order)
        return pfn

    @rule(pfn=consumes(blocks))
    def free(self, pfn: object) -> None:
        if not isinstance(pfn, int) or pfn not in self.live:
            return
        order = self.live.pop(pfn)
        self.a.free(pfn, order)
        self.used[pfn : pfn + (1 << order)] = bytes(1 << order)

    @precondition(lambda self: len(self.live) > 0)
    @rule(index=st.integers(0, 1 << 20))
    def free_any(self, index: int) -> None:
        pfn = sorted(self.live)[index % len(self.live)]
        order = self.live.pop(pfn)
        self.a.free(pfn, order)
        self.used[pfn : pfn + (1 << order)] = bytes(1 << order)

    @rule(
        start=st.integers(0, END - 1),
        npages=st.one_of(st.integers(1, 3000), st.sampled_from([1, 511, 512, 1023, 1024])),
    )
    def claim(self, start: int, npages: int) -> None:
        end = min(start + npages, END)
        expect = end == start + npages and all(
            self.a.is_ram(p) and not self.used[p] for p in range(start, end)
        )
        assert self.a.claim_range(start, npages) == expect
        if expect:
            for pfn, order in self.a.claimed_blocks(start, npages):
                self._take(pfn, order)

    @rule(pfn=st.integers(0, END - 1), order=st.integers(0, 10))
    def bad_free(self, pfn: int, order: int) -> None:
        if self.live.get(pfn) == order:
            return
        before = snapshot(self.a)
        with pytest.raises(ValueError):
            self.a.free(pfn, order)
        assert snapshot(self.a) == before

    @precondition(lambda self: len(self.live) > 0)
    @rule()
    def free_everything(self) -> None:
        for pfn, order in list(self.live.items()):
            self.a.free(pfn, order)
        self.live.clear()
        self.used = bytearray(END)
        # Merging complete: exactly the boot-time maximal blocks again.
        for zone in self.a.zones:
            got = [sorted(self.a.free_blocks(zone.name, o)) for o in range(11)]
            assert got == self.pristine[zone.name]

    @invariant()
    def consistent(self) -> None:
        self.a.check_invariants()
        allocated = sum(1 << o for o in self.live.values())
        assert self.a.allocated_pages() == allocated
        assert self.a.free_pages() + allocated == self.a.ram_pages
        for pfn, order in self.live.items():
            assert self.a.allocated_order(pfn) == order


AllocatorMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestAllocatorMachine = AllocatorMachine.TestCase
