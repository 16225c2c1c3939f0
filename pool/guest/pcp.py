"""Per-cpu page lists: their shape, their sizes and their drain rules (mm/page_alloc.c, 6.1).

Each CPU has, per zone, a ``struct per_cpu_pages``: one list per migratetype (unmovable,
movable, reclaimable) for each order 0..3 (``PAGE_ALLOC_COSTLY_ORDER``), plus one list for
``pageblock_order`` (THP; ``CONFIG_TRANSPARENT_HUGEPAGE``) shared by all types:
``NR_PCP_LISTS`` = 3 x 4 + 1 = 13 lists, indexed by :func:`order_to_pindex`. ``count`` is the
pages on all of them, ``batch`` and ``high`` come from the zone's size and watermarks
(:func:`zone_batchsize`, :func:`zone_highsize`), and ``free_factor`` grows while a CPU frees
without allocating (:func:`nr_pcp_free`).

Pages on a pcp list are free to their CPU but allocated to the buddy allocator: they are not
in the zone's free lists, not in /proc/buddyinfo's ``nr_free`` and not in ``NR_FREE_PAGES``.

This module holds the rules; the lists themselves share the page allocator's per-pfn list
links (a page is on a buddy list or on a pcp list, never both, as ``page->buddy_list`` and
``page->pcp_list`` share one ``list_head``), so the list operations (``rmqueue_bulk()``,
``free_pcppages_bulk()``, ``__rmqueue_pcplist()``, ``free_unref_page_commit()``,
``__alloc_pages_bulk()``) are methods of :class:`pool.guest.buddy.PageAllocator`.

The watermarks that ``high`` derives from follow ``__setup_per_zone_wmarks()`` with
``min_free_kbytes`` from ``calculate_min_free_kbytes()`` raised, as khugepaged does when THP
is enabled (``set_recommended_min_free_kbytes()``), to 2 + 3 x 3 pageblocks per populated zone
(at most 5 % of low memory). The model uses the watermarks for nothing else (no reclaim, no
watermark checks on the single-page path; the bulk allocator's zone choice does check the low
watermark, as ``__alloc_pages_bulk()`` does).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence

import attrs

from pool.guest.migratetype import MIGRATE_PCPTYPES, PAGEBLOCK_NR_PAGES, PAGEBLOCK_ORDER
from pool.guest.units import PAGE_SIZE

__all__ = [
    "NR_LOWORDER_PCP_LISTS",
    "NR_PCP_LISTS",
    "PAGE_ALLOC_COSTLY_ORDER",
    "PCP_FIELDS",
    "PerCpuPages",
    "min_free_kbytes",
    "nr_pcp_free",
    "nr_pcp_high",
    "order_to_pindex",
    "pcp_allowed_order",
    "pindex_to_order",
    "zone_batchsize",
    "zone_highsize",
    "zone_low_wmarks",
]

PAGE_ALLOC_COSTLY_ORDER = 3
NR_LOWORDER_PCP_LISTS = MIGRATE_PCPTYPES * (PAGE_ALLOC_COSTLY_ORDER + 1)  # 12
NR_PCP_LISTS = NR_LOWORDER_PCP_LISTS + 1  # + the THP list
WATERMARK_SCALE_FACTOR = 10  # sysctl vm.watermark_scale_factor default: 0.1 % of the zone


def pcp_allowed_order(order: int) -> bool:
    """``pcp_allowed_order()``: orders 0..3 and the pageblock order go through the pcp lists."""
    return order <= PAGE_ALLOC_COSTLY_ORDER or order == PAGEBLOCK_ORDER


def order_to_pindex(migratetype: int, order: int) -> int:
    """``order_to_pindex()``: ``3 * order + migratetype`` for orders 0..3; the THP list (12) for
    the pageblock order, whatever the migratetype."""
    if order > PAGE_ALLOC_COSTLY_ORDER:
        return NR_LOWORDER_PCP_LISTS
    return MIGRATE_PCPTYPES * order + migratetype


def pindex_to_order(pindex: int) -> int:
    """``pindex_to_order()``: the inverse of :func:`order_to_pindex` for the order."""
    if pindex == NR_LOWORDER_PCP_LISTS:
        return PAGEBLOCK_ORDER
    return pindex // MIGRATE_PCPTYPES


def zone_batchsize(managed_pages: int) -> int:
    """``zone_batchsize()``: ~0.1 % of the zone or 1 MiB, whichever is smaller, divided by 4,
    then clamped to ``2^n - 1`` (``rounddown_pow_of_two(batch + batch / 2) - 1``). 63 for every
    zone of 1 GiB or more; 0 pages managed gives 0 (an empty zone has no pcp batching)."""
    batch = min(managed_pages >> 10, (1 << 20) // PAGE_SIZE)
    batch //= 4
    if batch < 1:
        batch = 1
    n = batch + batch // 2
    return (1 << (n.bit_length() - 1)) - 1


def zone_highsize(low_wmark: int, batch: int, nr_cpus: int) -> int:
    """``zone_highsize()`` with ``percpu_pagelist_high_fraction`` unset: the zone's low
    watermark split across the node's CPUs (``cpu_online`` is 0 once all CPUs are up and
    ``setup_per_zone_wmarks()`` re-runs ``zone_pcp_update()``), at least ``4 * batch``."""
    if nr_cpus < 1:
        raise ValueError(f"nr_cpus must be >= 1, not {nr_cpus}")
    return max(low_wmark // nr_cpus, batch << 2)


def min_free_kbytes(lowmem_pages: int, populated_zones: int, thp: bool = True) -> int:
    """``calculate_min_free_kbytes()``: ``int_sqrt(lowmem_kbytes * 16)`` clamped to
    [128, 262144]; with ``thp``, raised by khugepaged's ``set_recommended_min_free_kbytes()``
    to ``pageblock_nr_pages * zones * (2 + MIGRATE_PCPTYPES^2)`` pages, at most 5 % of
    ``lowmem_pages``."""
    lowmem_kbytes = lowmem_pages * (PAGE_SIZE >> 10)
    value = min(max(math.isqrt(lowmem_kbytes * 16), 128), 262144)
    if thp:
        recommended = PAGEBLOCK_NR_PAGES * populated_zones * 2
        recommended += PAGEBLOCK_NR_PAGES * populated_zones * MIGRATE_PCPTYPES * MIGRATE_PCPTYPES
        recommended = min(recommended, lowmem_pages // 20)
        value = max(value, recommended * (PAGE_SIZE >> 10))
    return value


def zone_low_wmarks(managed: Sequence[int], thp: bool = True) -> list[int]:
    """``__setup_per_zone_wmarks()``: each zone's ``WMARK_LOW`` in pages. ``min`` is the zone's
    share of ``min_free_kbytes`` by managed pages; ``low = min + max(min / 4, managed *
    watermark_scale_factor / 10000)``. Every zone here is low memory (no HighMem, no Movable)."""
    lowmem = sum(managed)
    if lowmem == 0:
        return [0] * len(managed)
    populated = sum(1 for m in managed if m)
    pages_min = min_free_kbytes(lowmem, populated, thp) >> 2  # kB -> pages (PAGE_SHIFT - 10)
    out = []
    for pages in managed:
        zone_min = pages_min * pages // lowmem
        out.append(zone_min + max(zone_min >> 2, pages * WATERMARK_SCALE_FACTOR // 10000))
    return out


PCP_FIELDS = 5
"""int64 words per ``PerCpuPages`` record: first_list, high, batch, count, free_factor."""


@attrs.define(eq=False)
class PerCpuPages:
    """``struct per_cpu_pages`` of one CPU for one zone: the counters (the 13 lists themselves
    are list heads in the page allocator's link arrays, numbered from ``first_list``).

    The counters live in one ``array('q')`` record of ``PCP_FIELDS`` words shared with the
    page allocator (every zone's and CPU's records in one array, so that the compiled core,
    pool.guest._core, reads and writes the same words as this class): ``data[index:index+5]``.
    :meth:`new` makes a record of its own."""

    data: array[int] = attrs.field(repr=False)
    index: int = 0

    @classmethod
    def new(
        cls, first_list: int, high: int, batch: int, count: int = 0, free_factor: int = 0
    ) -> PerCpuPages:
        return cls(array("q", [first_list, high, batch, count, free_factor]), 0)

    @property
    def first_list(self) -> int:  # list id of pindex 0; pindex i is first_list + i
        return self.data[self.index]

    @property
    def high(self) -> int:
        return self.data[self.index + 1]

    @high.setter
    def high(self, value: int) -> None:
        self.data[self.index + 1] = value

    @property
    def batch(self) -> int:
        return self.data[self.index + 2]

    @batch.setter
    def batch(self, value: int) -> None:
        self.data[self.index + 2] = value

    @property
    def count(self) -> int:
        return self.data[self.index + 3]

    @count.setter
    def count(self, value: int) -> None:
        self.data[self.index + 3] = value

    @property
    def free_factor(self) -> int:
        return self.data[self.index + 4]

    @free_factor.setter
    def free_factor(self, value: int) -> None:
        self.data[self.index + 4] = value

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        """(first_list, high, batch, count, free_factor)."""
        i = self.index
        d = self.data
        return d[i], d[i + 1], d[i + 2], d[i + 3], d[i + 4]


def nr_pcp_free(pcp: PerCpuPages, high: int, batch: int, free_high: bool) -> int:
    """``nr_pcp_free()``: how many pages ``free_pcppages_bulk()`` returns. Everything when
    batch-freeing high-order pages (``free_high``); otherwise ``batch << free_factor`` clamped
    to ``[batch, high - batch]``, and ``free_factor`` grows while that is below the maximum
    (each further free without an allocation in between drains twice as much)."""
    if free_high:
        return pcp.count
    if high < batch:
        return 1
    min_nr_free = batch
    max_nr_free = high - batch
    batch <<= pcp.free_factor
    if batch < max_nr_free:
        pcp.free_factor += 1
    return max(min_nr_free, min(batch, max_nr_free))


def nr_pcp_high(pcp: PerCpuPages, free_high: bool) -> int:
    """``nr_pcp_high()``: the count at which a free drains the lists; 0 when batch-freeing
    high-order pages. (``ZONE_RECLAIM_ACTIVE`` is never set: the model has no kswapd.)"""
    if not pcp.high or free_high:
        return 0
    return pcp.high
