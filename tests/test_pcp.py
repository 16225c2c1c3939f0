"""Per-cpu lists, migratetypes and the bulk allocator: golden cases worked out by hand from
the Linux 6.1 rules (mm/page_alloc.c), and the sizing formulas."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pool.guest.buddy import PageAllocator, Zone
from pool.guest.migratetype import (
    MIGRATE_MOVABLE,
    MIGRATE_RECLAIMABLE,
    MIGRATE_UNMOVABLE,
    can_steal_fallback,
    migratetype_of,
)
from pool.guest.pcp import (
    min_free_kbytes,
    order_to_pindex,
    pcp_allowed_order,
    pindex_to_order,
    zone_batchsize,
    zone_highsize,
    zone_low_wmarks,
)
from pool.guest.units import PAGE_SHIFT, GiB

G = GiB >> PAGE_SHIFT


def one_zone(pages: int = 1024, cpus: int = 1) -> PageAllocator:
    """RAM [0, pages), one Normal zone (no DMA32: no ALLOC_NOFRAGMENT)."""
    return PageAllocator(pages, [(0, pages)], [Zone("Normal", 0, pages)], cpus)


# ---------------------------------------------------------------- sizing


def test_zone_batchsize_follows_the_kernel() -> None:
    # min(managed >> 10, 256) / 4, then rounddown_pow_of_two(b + b/2) - 1
    assert zone_batchsize(G) == 63  # 256 / 4 = 64; 96 -> 64 - 1
    assert zone_batchsize(16 * G) == 63  # capped at 1 MiB
    assert zone_batchsize(65536) == 15  # 64 / 4 = 16; 24 -> 16 - 1
    assert zone_batchsize(16384) == 3  # 16 / 4 = 4; 6 -> 4 - 1
    assert zone_batchsize(3977) == 0  # the DMA zone: 3 / 4 = 0 -> 1; 1 -> 1 - 1


def test_watermarks_and_high() -> None:
    # 4 GiB guest, THP: int_sqrt(4 GiB in kB * 16) = 8192 kB, khugepaged raises it to
    # 512 * 3 zones * 11 = 16896 pages = 67584 kB.
    assert min_free_kbytes(4 * G, 3) == 67584
    assert min_free_kbytes(4 * G, 3, thp=False) == 8192
    assert min_free_kbytes(G, 3) == 52428  # at most 5 % of low memory: 13107 pages
    assert min_free_kbytes(1000, 1, thp=False) == 252  # int_sqrt(4000 * 16)
    assert min_free_kbytes(10, 1, thp=False) == 128  # clamped
    # Two zones of 3 and 1 GiB: min_free_kbytes 512 * 2 zones * 11 pages = 11264 pages, shared
    # 3:1 as min 8448 and 2816; low = min + max(min / 4, managed / 1000).
    assert zone_low_wmarks([3 * 262144, 262144]) == [8448 + 2112, 2816 + 704]
    assert zone_highsize(5280, 63, 1) == 5280
    assert zone_highsize(5280, 63, 2) == 2640
    assert zone_highsize(100, 63, 1) == 252  # at least batch * 4
    with pytest.raises(ValueError):
        zone_highsize(100, 63, 0)


def test_pcp_list_indexes() -> None:
    assert [order_to_pindex(mt, 0) for mt in range(3)] == [0, 1, 2]
    assert order_to_pindex(MIGRATE_RECLAIMABLE, 3) == 11
    assert order_to_pindex(MIGRATE_UNMOVABLE, 9) == order_to_pindex(MIGRATE_MOVABLE, 9) == 12
    assert [pindex_to_order(i) for i in (0, 2, 3, 11, 12)] == [0, 0, 1, 3, 9]
    assert [o for o in range(11) if pcp_allowed_order(o)] == [0, 1, 2, 3, 9]


def test_can_steal_fallback_and_names() -> None:
    assert can_steal_fallback(9, MIGRATE_MOVABLE)
    assert can_steal_fallback(4, MIGRATE_MOVABLE) and not can_steal_fallback(3, MIGRATE_MOVABLE)
    assert can_steal_fallback(0, MIGRATE_UNMOVABLE) and can_steal_fallback(0, MIGRATE_RECLAIMABLE)
    assert migratetype_of("Movable") == MIGRATE_MOVABLE and migratetype_of(2) == 2
    with pytest.raises(ValueError, match="unknown migratetype"):
        migratetype_of("cma")


def test_guest_sized_pcp_sets() -> None:
    a = PageAllocator(5 * G, [(0, 3 * G), (4 * G, 5 * G)], cpus=2)  # a 4 GiB guest, 2 vCPUs
    normal = a.pcp("Normal", 1)
    assert normal.batch == 63
    assert normal.high == a.low_wmark("Normal") // 2
    assert a.pcp("DMA", 0).batch == 1  # zone_batchsize() 0, at least 1
    with pytest.raises(ValueError, match="no cpu 2"):
        a.pcp("Normal", 2)


# ---------------------------------------------------------------- golden: pcp drain at high


def test_pcp_drains_batch_from_the_tail_at_high() -> None:
    """high 8, batch 3, movable order-0 pages of one order-10 block [0, 1024).

    Refills (rmqueue_bulk, max(3 >> 0, 2) = 3 blocks each, added to the tail in the order
    __rmqueue_smallest hands them out): [0, 1, 2], [3, 4, 5], [6, 7, 8]. Eight allocations take
    0..7 from the head; 8 stays on the list. Freeing 0..6 puts each at the head: the list is
    [6, 5, 4, 3, 2, 1, 0, 8] when the eighth page (6) brings count to high, and
    free_pcppages_bulk(nr_pcp_free() = clamp(3 << 0, 3, 8 - 3) = 3) returns the three at the
    tail: 8, 0, 1. 8 merges with the free 9 (o0), 10 (o1) and 12 (o2) into an order-3 block at 8,
    whose next-higher buddy 16 (o4) is free: tail placement. 0 and 1 merge into an order-1
    block at 0 (its buddy 2 is still on the pcp list). free_factor is now 1."""
    a = one_zone()
    pcp = a.pcp("Normal", 0)
    pcp.high, pcp.batch = 8, 3
    got = [a.alloc(0, ("Normal",), MIGRATE_MOVABLE) for _ in range(8)]
    assert got == list(range(8))
    assert a.pcp_list("Normal", 0, MIGRATE_MOVABLE, 0) == [8]
    for pfn in range(6):
        a.free(pfn, 0)
    assert pcp.count == 7 and pcp.free_factor == 0
    assert a.pcp_list("Normal", 0, MIGRATE_MOVABLE, 0) == [5, 4, 3, 2, 1, 0, 8]
    a.free(6, 0)  # count 8 >= high: drain 3 from the tail
    assert a.pcp_list("Normal", 0, MIGRATE_MOVABLE, 0) == [6, 5, 4, 3, 2]
    assert pcp.count == 5 and pcp.free_factor == 1
    assert a.block_of(8) == (8, 3, True) and a.block_of(0) == (0, 1, True)
    assert a.free_blocks("Normal", 3) == [8]
    assert a.nr_free("Normal")[:5] == (0, 1, 0, 1, 1)
    a.check_invariants()
    # The order-3 block went to the tail of its list: behind any other order-3 block.
    a.free(7, 0)  # count 6 < 8: stays on the pcp list
    assert pcp.count == 6
    # An order-1 allocation halves free_factor (1 -> 0) and refills the empty order-1 movable
    # list with max(3 >> 1, 2) = 2 blocks: count 6 + 4 - 2 = 8. An order-2 one refills
    # max(3 >> 2, 2) = 2 blocks of 4: count 8 + 8 - 4 = 12 (refills do not check high).
    b = a.alloc(1, ("Normal",), MIGRATE_MOVABLE)
    assert b is not None and pcp.free_factor == 0 and pcp.count == 8
    c = a.alloc(2, ("Normal",), MIGRATE_MOVABLE)
    assert c is not None and pcp.count == 12
    # Freeing b: count 14 >= 8 with free_factor 0, so nr_pcp_free() = 3 and free_factor 1; the
    # drain starts at b's own list (pindex 4) and takes tail blocks of 2 until 3 are gone: 4.
    a.free(b, 1)
    assert pcp.free_factor == 1 and pcp.count == 10
    # Freeing c (order 2) with free_factor up and no allocation since: free_high, high is 0
    # and nr_pcp_free() is the whole count: every list goes back to the buddy.
    a.free(c, 2)
    assert pcp.count == 0 and a.pcp_pages() == 0
    a.check_invariants()


# ---------------------------------------------------------------- golden: bulk of 100


def test_bulk_request_of_100_refills_from_the_buddy() -> None:
    """An unmovable bulk request of 100 pages on a pristine zone of one order-10 block at 1024.

    The unmovable pcp list is empty: rmqueue_bulk(63) runs __rmqueue(UNMOVABLE), which finds no
    unmovable block and falls back (__rmqueue_fallback): the largest movable block, order 10,
    is stolen whole (change_pageblock_range: both pageblocks become unmovable) and split; the
    63 pages 1024..1086 go to the list in physical order. The bulk takes all 63, the list runs
    empty, a second refill brings 1087..1149 and the bulk takes 37 more: 1024..1123 in order,
    26 pages (1124..1149) left on the pcp list, the rest of the block free in the buddy."""
    a = PageAllocator(2048, [(1024, 2048)], [Zone("Normal", 0, 2048)], cpus=1)
    pcp = a.pcp("Normal", 0)
    assert pcp.batch == 1  # a 4 MiB zone: zone_batchsize() 0, at least 1
    pcp.batch, pcp.high = 63, 252  # as zone_pcp_update() sets them for a zone of 1 GiB and more
    pages = a.alloc_bulk(100, ("Normal",), MIGRATE_UNMOVABLE)
    assert pages == list(range(1024, 1124))
    assert pcp.count == 26
    assert a.pcp_list("Normal", 0, MIGRATE_UNMOVABLE, 0) == list(range(1124, 1150))
    assert a.pageblock_migratetype(1024) == a.pageblock_migratetype(1536) == MIGRATE_UNMOVABLE
    # 1150..2047 free (898 pages): 1150 (o1), 1152 (o7), 1280 (o8), 1536 (o9), all unmovable.
    assert a.nr_free("Normal") == (0, 1, 0, 0, 0, 0, 0, 1, 1, 1, 0)
    assert a.nr_free_by_type("Normal", MIGRATE_UNMOVABLE) == a.nr_free("Normal")
    assert a.free_pages() == 1024 - 126 and a.allocated_pages() == 100
    assert all(a.allocated_migratetype(p) == MIGRATE_UNMOVABLE for p in pages)
    a.check_invariants()
    # Freed again, and the lists drained, the block merges back whole.
    for pfn in pages:
        a.free(pfn, 0)
    a.drain_all_pages()
    assert a.nr_free("Normal") == (0,) * 10 + (1,)
    a.check_invariants()


def test_bulk_falls_back_to_one_page_without_pcp_lists_or_for_one_page() -> None:
    a = one_zone(cpus=0)
    assert a.alloc_bulk(5) == [0]  # no per-cpu lists: goto failed, one single-page allocation
    b = one_zone(cpus=1)
    assert b.alloc_bulk(1) == [0]  # one page: the single-page allocator
    assert b.alloc_bulk(0) == []


# ---------------------------------------------------------------- golden: stealing


def test_unmovable_request_steals_a_whole_movable_pageblock() -> None:
    """No per-cpu lists (the buddy paths alone), one order-10 block [0, 1024): pageblocks 0 and 1.

    A movable order-9 allocation takes pageblock 0 (0..511); a movable order-8 one takes
    512..767, leaving 768 (o8) free: pageblock 1 is half free, half movable. An unmovable
    order-0 request finds no unmovable block: __rmqueue_fallback takes the largest fallback
    block, 768 (o8, movable); can_steal_fallback(8, UNMOVABLE) holds, so
    steal_suitable_fallback moves the pageblock's free pages to the unmovable list
    (move_freepages_block: 256 free, 256 movable) and, 256 free + 0 alike >= 256, claims the
    pageblock: it becomes unmovable. The request then takes 768 (split by expand)."""
    a = one_zone(cpus=0)
    assert a.alloc(9, ("Normal",), MIGRATE_MOVABLE) == 0
    assert a.alloc(8, ("Normal",), MIGRATE_MOVABLE) == 512
    assert a.pageblock_migratetype(768) == MIGRATE_MOVABLE
    assert a.alloc(0, ("Normal",), MIGRATE_UNMOVABLE) == 768
    assert a.pageblock_migratetype(768) == MIGRATE_UNMOVABLE
    assert a.pageblock_migratetype(0) == MIGRATE_MOVABLE
    assert a.nr_free_by_type("Normal", MIGRATE_UNMOVABLE) == (1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0)
    a.check_invariants()
    # Pageblock 1 is unmovable now: a freed movable block there goes to the unmovable lists.
    a.free(512, 8)
    assert a.free_blocks("Normal", 8, MIGRATE_UNMOVABLE) == [512]


def test_steal_of_less_than_half_a_pageblock_keeps_its_type() -> None:
    """As above, but 512..767 (o8) and 768..895 (o7) movable: only 896 (o7, 128 pages) is free.
    128 free + 0 alike < 256: the pageblock stays movable, its free pages move to the unmovable
    list all the same and the request takes 896."""
    a = one_zone(cpus=0)
    assert a.alloc(9, ("Normal",), MIGRATE_MOVABLE) == 0
    assert a.alloc(8, ("Normal",), MIGRATE_MOVABLE) == 512
    assert a.alloc(7, ("Normal",), MIGRATE_MOVABLE) == 768
    assert a.alloc(0, ("Normal",), MIGRATE_UNMOVABLE) == 896
    assert a.pageblock_migratetype(896) == MIGRATE_MOVABLE
    a.free(896, 0)  # back to the pageblock's type: merges with its pieces into 896 (o7)
    assert a.free_blocks("Normal", 7, MIGRATE_MOVABLE) == [896]
    a.check_invariants()


def test_a_pristine_unmovable_request_claims_the_whole_order10_block() -> None:
    a = one_zone(cpus=0)
    assert a.alloc(0, ("Normal",), MIGRATE_UNMOVABLE) == 0
    assert a.pageblock_counts("Normal") == (2, 0, 0)
    assert a.alloc(0, ("Normal",), MIGRATE_MOVABLE) is None or True  # movable falls back too
    a.check_invariants()


def test_nofragment_prefers_a_whole_pageblock_in_the_next_zone() -> None:
    """Preferred zone Normal with DMA32 present: ALLOC_NOFRAGMENT. Normal has only an order-8
    movable block, DMA32 an order-10 block: the unmovable request takes DMA32's block (a whole
    pageblock steal) rather than pollute Normal; without DMA32 in the zonelist it steals in
    Normal on the retry without ALLOC_NOFRAGMENT."""
    zones = [Zone("DMA32", 0, 1024), Zone("Normal", 1024, 1280)]
    a = PageAllocator(1280, [(0, 1280)], zones)
    assert a.alloc(0, ("Normal", "DMA32"), MIGRATE_UNMOVABLE) == 0
    assert a.pageblock_counts("DMA32") == (2, 0, 0)
    assert a.alloc(0, ("Normal",), MIGRATE_UNMOVABLE) == 1024
    a.check_invariants()


def test_drain_all_pages_returns_everything() -> None:
    a = PageAllocator(5 * G // 4, [(0, 5 * G // 4)], cpus=2)  # 1.25 GiB: DMA, DMA32
    for cpu in (0, 1):
        for _ in range(10):
            pfn = a.alloc(0, ("DMA32",), MIGRATE_UNMOVABLE, cpu)
            assert pfn is not None
            a.free(pfn, 0, cpu)
    assert a.pcp_pages() > 0
    a.drain_all_pages()
    assert a.pcp_pages() == 0
    assert a.free_pages() == a.ram_pages
    a.check_invariants()


def test_bad_cpu_and_double_free_on_a_pcp_list() -> None:
    a = one_zone(cpus=1)
    with pytest.raises(ValueError, match="no cpu 1"):
        a.alloc(0, ("Normal",), MIGRATE_MOVABLE, 1)
    pfn = a.alloc(0, ("Normal",), MIGRATE_MOVABLE)
    assert pfn is not None
    a.free(pfn, 0)
    with pytest.raises(ValueError, match="per-cpu list"):
        a.free(pfn, 0)
    with pytest.raises(ValueError, match="cpus must be"):
        PageAllocator(16, [(0, 16)], cpus=-1)


# ---------------------------------------------------------------- stateful property test

# DMA32 [0, 8 MiB) and Normal [8 MiB, 24 MiB), page 0 reserved, a hole at [3000, 3100) and an
# unaligned end: Normal first with DMA32 behind it, so ALLOC_NOFRAGMENT is in play.
END = 6144
RAM = [(1, 3000), (3100, END - 5)]
ZONES = [Zone("DMA32", 0, 2048), Zone("Normal", 2048, END)]
ZONELISTS = [("Normal", "DMA32"), ("DMA32",), ("Normal",)]
ORDERS = st.sampled_from([0, 0, 0, 1, 2, 3, 4, 9, 10])
TYPES = st.sampled_from([MIGRATE_UNMOVABLE, MIGRATE_MOVABLE, MIGRATE_RECLAIMABLE])


class PcpMachine(RuleBasedStateMachine):
    """Two CPUs with small pcp sets (high 12, batch 3) so that refills and drains happen often."""

    @initialize()
    def setup(self) -> None:
        self.a = PageAllocator(END, RAM, ZONES, cpus=2)
        for zone in ZONES:
            for cpu in (0, 1):
                pcp = self.a.pcp(zone.name, cpu)
                pcp.high, pcp.batch = 12, 3
        self.pristine = {z.name: [sorted(self.a.free_blocks(z.name, o)) for o in range(11)]
                         for z in ZONES}  # fmt: skip
        self.live: dict[int, tuple[int, int]] = {}  # pfn -> (order, migratetype)

    def _take(self, pfn: int, order: int, mt: int) -> None:
        assert pfn % (1 << order) == 0
        for other, (o, _) in self.live.items():
            assert pfn + (1 << order) <= other or other + (1 << o) <= pfn, "overlap"
        self.live[pfn] = (order, mt)

    @rule(order=ORDERS, mt=TYPES, cpu=st.integers(0, 1), zonelist=st.sampled_from(ZONELISTS))
    def alloc(self, order: int, mt: int, cpu: int, zonelist: tuple[str, ...]) -> None:
        pfn = self.a.alloc(order, zonelist, mt, cpu)
        if pfn is None:
            # Nothing of that order anywhere in those zones, even after the drain.
            assert self.a.pcp_pages() == 0 or order not in (0, 1, 2, 3, 9)
            for name in zonelist:
                assert all(n == 0 for n in self.a.nr_free(name)[order:])
            return
        self._take(pfn, order, mt)
        assert self.a.allocated_migratetype(pfn) == mt

    @rule(n=st.integers(1, 120), mt=TYPES, cpu=st.integers(0, 1))
    def bulk(self, n: int, mt: int, cpu: int) -> None:
        pages = self.a.alloc_bulk(n, ("Normal", "DMA32"), mt, cpu)
        assert len(pages) <= n and len(set(pages)) == len(pages)
        for pfn in pages:
            self._take(pfn, 0, mt)

    @precondition(lambda self: len(self.live) > 0)
    @rule(index=st.integers(0, 1 << 20), cpu=st.integers(0, 1))
    def free(self, index: int, cpu: int) -> None:
        pfn = sorted(self.live)[index % len(self.live)]
        order, _ = self.live.pop(pfn)
        self.a.free(pfn, order, cpu)

    @rule()
    def drain(self) -> None:
        free_before = self.a.free_pages() + self.a.pcp_pages()
        self.a.drain_all_pages()
        assert self.a.pcp_pages() == 0
        assert self.a.free_pages() == free_before  # nothing lost

    @precondition(lambda self: len(self.live) > 0)
    @rule()
    def free_everything(self) -> None:
        for pfn, (order, _) in list(self.live.items()):
            self.a.free(pfn, order, pfn & 1)
        self.live.clear()
        self.a.drain_all_pages()
        for zone in ZONES:  # merging complete: exactly the boot-time maximal blocks again
            assert [sorted(self.a.free_blocks(zone.name, o)) for o in range(11)] == (
                self.pristine[zone.name]
            )

    @invariant()
    def consistent(self) -> None:
        self.a.check_invariants()  # no page on two lists, per-type lists == nr_free, counters
        allocated = sum(1 << o for o, _ in self.live.values())
        assert self.a.allocated_pages() == allocated
        assert self.a.free_pages() + self.a.pcp_pages() + allocated == self.a.ram_pages
        for zone in ZONES:
            by_type = [self.a.nr_free_by_type(zone.name, mt) for mt in range(3)]
            assert tuple(map(sum, zip(*by_type, strict=True))) == self.a.nr_free(zone.name)
        for pfn, (order, mt) in self.live.items():
            assert self.a.allocated_order(pfn) == order
            assert self.a.allocated_migratetype(pfn) == mt


PcpMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPcpMachine = PcpMachine.TestCase
