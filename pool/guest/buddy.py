"""The guest's page allocator: the zoned buddy allocator of mm/page_alloc.c (Linux 6.1).

What is modeled, and how faithfully:

- Orders 0..10 (``MAX_PAGE_ORDER``; 4 MiB blocks). The buddy of block ``pfn`` at order
  ``o`` is ``pfn ^ (1 << o)``; two free buddies of one order merge into ``pfn & ~(1 << o)``
  at order ``o + 1``, up to order 10, never across a zone boundary (the kernel's
  ``page_is_buddy()`` checks the zone) and never over a hole (hole pages are never free).
- Free lists per zone, per order and per migratetype (pool.guest.migratetype): unmovable,
  movable, reclaimable. Every pageblock (order 9) is MOVABLE at boot. ``nr_free`` (one
  /proc/buddyinfo row) counts the blocks of an order over all migratetypes.
- Boot (``memblock_free_all()``): every range of usable RAM, cut at zone boundaries, is
  freed as the largest naturally aligned blocks that fit (``__free_pages_memory()``),
  in ascending pfn order and to the *tail* of each free list (``FPI_TO_TAIL``, Linux
  >= 5.10), so right after boot the head of every list is its lowest block.
- Allocation: ``get_page_from_freelist()`` walks the zonelist, first with
  ``ALLOC_NOFRAGMENT`` when the preferred zone is Normal and DMA32 exists
  (``alloc_flags_nofragment()``: no stealing of less than a pageblock from another type),
  then without; ``rmqueue()`` takes orders 0..3 and 9 from the CPU's per-cpu lists
  (pool.guest.pcp, refilled by ``rmqueue_bulk()``), others from the buddy lists:
  ``__rmqueue()`` = ``__rmqueue_smallest()`` (the smallest order with a free block of the
  requested type, the block at the head of its list, split by ``expand()`` which puts the
  upper halves at the heads of the lower lists), else ``__rmqueue_fallback()``
  (:meth:`PageAllocator._rmqueue_fallback`: the largest block of a fallback type, with the
  pageblock stealing of ``steal_suitable_fallback()``), and retry. When every zone fails, the
  per-cpu lists of all CPUs are drained (``drain_all_pages()``, as the slow path does before
  giving up) and the walk is tried once more.
- Freeing: orders 0..3 and 9 go to the head of the CPU's pcp list of the pageblock's type
  (``free_unref_page_commit()``); at ``high`` ``free_pcppages_bulk()`` returns ``batch`` pages
  (more while the CPU keeps freeing) from the lists' tails to the buddy lists. Others go
  straight to ``__free_one_page()``: merge with free buddies as far as possible; the result
  goes to the *tail* of its list when the buddy of the next-higher order is free
  (``buddy_merge_likely()``), else to the head.
- The bulk allocator (``__alloc_pages_bulk()``, :meth:`PageAllocator.alloc_bulk`): order-0
  pages of one zone (the first that meets its low watermark plus the request) through that
  zone's pcp list, refilling it as often as needed; one single-page allocation when none.
- ``cpus=0`` builds an allocator without per-cpu lists: every allocation and free goes to the
  buddy lists directly (``pcp_allowed_order()`` false for all): the plain buddy allocator.
- Not modeled: watermarks on the single-page path, kswapd and reclaim, watermark boosting,
  compaction, highatomic reserves, CMA, memory hotplug and isolation, NUMA (one node),
  ``lowmem_reserve``, page shuffling (``shuffle_page_order`` is off by default).

Representation (a 64 GiB guest has 16.7 M pfns, so nothing is a Python object per page):

- ``_state``: one byte per pfn. 0 for a page that does not start a block (interior page
  or hole); ``_FREE + o`` for the first page of a free block of order ``o`` (on a buddy
  list); ``_PCP + o`` for the first page of a block of order ``o`` on a per-cpu list;
  ``_ALLOC + o`` for the first page of an allocated block of order ``o``.
- ``_mt``: one byte per pfn, the migratetype of the block starting there when it is on a
  per-cpu list (``get_pcppage_migratetype()``, ``page->index``) or allocated (what it was
  allocated as: movable blocks are what ``move_freepages()`` counts as ``PageLRU``).
- ``_pageblock_mt``: one byte per pageblock (``get_pfnblock_migratetype()``).
- Lists: kernel-style circular doubly linked lists threaded through two per-pfn ``array('i')``
  (``_next``, ``_prev``: ``page->lru``); list ``L``'s head node is the extra slot
  ``end_pfn + L``. Buddy list ``(zone, migratetype, order)`` and pcp list ``(zone, cpu,
  pindex)`` are numbered by :meth:`PageAllocator._buddy_list` and ``PerCpuPages.first_list``.
  Every list operation is O(1).

- Counters: ``_nr_free`` (``zone * 11 + order``), ``_free_pages`` (per zone), ``_counters``
  (``[0]``: allocated pages) and ``_pcp_data`` (the ``PerCpuPages`` records) are int64
  ``array('q')``, so that the compiled core below updates the same words.

Two backends, one state. The methods below are the reference implementation, in Python. The
compiled core (pool.guest._core, a C extension built by the package's build) translates the
hot paths line by line — ``alloc``, ``free``, ``free_bulk``, ``alloc_bulk``,
``drain_all_pages`` with everything under them (pcp lists, ``__rmqueue_fallback()`` and
pageblock stealing, ``__free_one_page()``) and the churn's step loop
(pool.guest.workload) — over the *same* arrays, through buffer views: queries,
``check_invariants``, ``claim_range`` and ``clone`` stay Python and see what the core wrote.
The backend is chosen in one place, :func:`compiled_core`/``_resolve_backend``: the core when
it is built, unless ``backend="python"`` or ``SHAREDPOOL_PURE_PYTHON=1``; a missing core is one
warning and the Python paths. tests/test_buddy_differential.py drives both backends with the
same random operation sequences and asserts identical lists, counters and per-pfn states.

``alloc`` and ``free`` are O(orders) plus the pcp batch they may move. ``claim_range`` is
O(blocks touched x orders).

Ranges claimed with :meth:`PageAllocator.claim_range` are recorded as allocated (unmovable)
blocks: the largest naturally aligned blocks (order <= 10, never crossing a zone boundary) that
tile the range, left to right; :meth:`PageAllocator.claimed_blocks` lists them and
:meth:`PageAllocator.free_range` gives the whole range back. Each of those blocks may also
be freed on its own with ``free(pfn, order)``.
"""

from __future__ import annotations

import bisect
import os
import warnings
import weakref
from array import array
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any, Literal

import attrs
import numpy as np
import numpy.typing as npt

from pool.guest.migratetype import (
    FALLBACKS,
    MIGRATE_MOVABLE,
    MIGRATE_PCPTYPES,
    MIGRATE_UNMOVABLE,
    PAGEBLOCK_NR_PAGES,
    PAGEBLOCK_ORDER,
    can_steal_fallback,
)
from pool.guest.pcp import (
    NR_LOWORDER_PCP_LISTS,
    NR_PCP_LISTS,
    PAGE_ALLOC_COSTLY_ORDER,
    PCP_FIELDS,
    PerCpuPages,
    nr_pcp_free,
    zone_batchsize,
    zone_highsize,
    zone_low_wmarks,
)
from pool.guest.units import MAX_PAGE_ORDER, NR_ORDERS, PAGE_SHIFT, GiB, MiB

__all__ = [
    "PURE_PYTHON_ENV",
    "ZONE_NAMES",
    "Backend",
    "PageAllocator",
    "Zone",
    "buddy_of",
    "compiled_core",
    "default_zones",
    "tile_range",
]

ZONE_NAMES = ("DMA", "DMA32", "Normal")
"""Zone names known to the model (x86-64, no HighMem, no Movable/Device zones)."""

_DMA_END_PFN = (16 * MiB) >> PAGE_SHIFT  # 4096
_DMA32_END_PFN = (4 * GiB) >> PAGE_SHIFT  # 1048576

_FREE = 1  # _state value of the head page of a free block of order o: _FREE + o (1..11)
_PCP = 16  # ... of a block of order o on a per-cpu list: _PCP + o (16..26)
_ALLOC = 32  # ... of an allocated block of order o: _ALLOC + o (32..42)
_FREE_LAST = _FREE + MAX_PAGE_ORDER
_PCP_LAST = _PCP + MAX_PAGE_ORDER
_ALLOC_LAST = _ALLOC + MAX_PAGE_ORDER
_MERGE_LIKELY_MAX = MAX_PAGE_ORDER - 1  # buddy_merge_likely(): false for order >= MAX_ORDER - 2

# ---------------------------------------------------------------------- the backend

Backend = Literal["auto", "c", "python"]
PURE_PYTHON_ENV = "SHAREDPOOL_PURE_PYTHON"
"""Set to 1 to run every allocator on the pure-Python reference paths."""

_core_module: ModuleType | None = None
_core_tried = False


def compiled_core() -> ModuleType | None:
    """The compiled core (pool.guest._core, built by the package's own build), or None when it
    is missing, with one warning the first time: the pure-Python paths are the reference and
    give the same results, only slower. The one place the backend is chosen."""
    global _core_module, _core_tried
    if not _core_tried:
        _core_tried = True
        try:
            from pool.guest import _core  # type: ignore[attr-defined]

            _core_module = _core
        except ImportError as exc:
            warnings.warn(
                f"pool.guest._core is not built ({exc}): the page allocator runs on its "
                "pure-Python reference paths (same results, slower)",
                RuntimeWarning,
                stacklevel=2,
            )
    return _core_module


def _resolve_backend(backend: Backend) -> Literal["c", "python"]:
    if backend == "python":
        return "python"
    if backend == "c":
        if compiled_core() is None:
            raise RuntimeError("backend 'c' asked for, but pool.guest._core is not built")
        return "c"
    if backend != "auto":
        raise ValueError(f"backend must be auto, c or python, not {backend!r}")
    if os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0"):
        return "python"
    return "c" if compiled_core() is not None else "python"


# The compiled core of each allocator, beside it rather than in it: an allocator's attributes
# stay plain data (arrays and numbers, which the daemon's snapshot format stores), and one
# decoded from a snapshot or cloned gets a core on first use.
_CORES: weakref.WeakKeyDictionary[PageAllocator, Any] = weakref.WeakKeyDictionary()


@attrs.frozen
class Zone:
    """A memory zone: the pfn range ``[start_pfn, end_pfn)`` it spans (holes included)."""

    name: str  # "DMA", "DMA32", "Normal"
    start_pfn: int
    end_pfn: int

    @property
    def spanned_pages(self) -> int:
        return self.end_pfn - self.start_pfn


def default_zones(end_pfn: int) -> tuple[Zone, ...]:
    """x86-64: DMA = [0, 16 MiB), DMA32 = [16 MiB, 4 GiB), Normal = [4 GiB, end).
    Zones with no pages omitted."""
    if end_pfn < 0:
        raise ValueError(f"end_pfn must not be negative: {end_pfn}")
    zones = []
    for name, start, end in (
        ("DMA", 0, _DMA_END_PFN),
        ("DMA32", _DMA_END_PFN, _DMA32_END_PFN),
        ("Normal", _DMA32_END_PFN, end_pfn),
    ):
        end = min(end, end_pfn)
        if end > start:
            zones.append(Zone(name, start, end))
    return tuple(zones)


def buddy_of(pfn: int, order: int) -> int:
    """The buddy of block ``pfn`` at ``order``: ``pfn ^ (1 << order)`` (``__find_buddy_pfn()``)."""
    return pfn ^ (1 << order)


def tile_range(start_pfn: int, end_pfn: int) -> Iterator[tuple[int, int]]:
    """Yield ``(pfn, order)``: the largest naturally aligned blocks (order <= 10) tiling
    ``[start_pfn, end_pfn)`` left to right, as the kernel's ``__free_pages_memory()`` does.

    No two consecutive blocks of such a tiling are buddies (they would have been one block).
    """
    pfn = start_pfn
    while pfn < end_pfn:
        order = MAX_PAGE_ORDER if pfn == 0 else min(MAX_PAGE_ORDER, (pfn & -pfn).bit_length() - 1)
        while pfn + (1 << order) > end_pfn:
            order -= 1
        yield pfn, order
        pfn += 1 << order


def _merge_ranges(ranges: Sequence[tuple[int, int]], end_pfn: int) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted((int(s), int(e)) for s, e in ranges):
        if start < 0 or end > end_pfn or start > end:
            raise ValueError(f"RAM range [{start}, {end}) is not inside [0, {end_pfn})")
        if start == end:
            continue
        if merged and start <= merged[-1][1]:
            if start < merged[-1][1]:
                raise ValueError(f"RAM range [{start}, {end}) overlaps {merged[-1]}")
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


class PageAllocator:
    """A buddy allocator over one node's RAM, zone by zone (see the module docstring)."""

    zones: tuple[Zone, ...]
    end_pfn: int
    cpus: int

    def __init__(
        self,
        end_pfn: int,
        ram: Sequence[tuple[int, int]],
        zones: Sequence[Zone] | None = None,
        cpus: int = 0,
        backend: Backend = "auto",
    ) -> None:
        """ram: [start, end) pfn ranges of usable RAM (holes are the gaps). All RAM starts free,
        put on the free lists as the kernel's memblock_free_all does (largest naturally aligned
        blocks, max order 10, never crossing a zone boundary or a hole), every pageblock
        MOVABLE. ``zones`` defaults to ``default_zones(end_pfn)``. ``cpus``: the number of CPUs
        with per-cpu lists (0: none, a plain buddy allocator). ``backend``: "c" runs the hot
        paths (alloc, free, the bulk allocator, pcp drains, the churn loop) in the compiled core
        (pool.guest._core), "python" on the reference paths below, "auto" (default) the core
        when it is built unless SHAREDPOOL_PURE_PYTHON=1. ValueError on overlapping RAM
        ranges, RAM outside zones or a negative CPU count."""
        if end_pfn < 1:
            raise ValueError(f"end_pfn must be positive: {end_pfn}")
        if cpus < 0:
            raise ValueError(f"cpus must be >= 0, not {cpus}")
        self.end_pfn = int(end_pfn)
        self.zones = tuple(default_zones(self.end_pfn) if zones is None else zones)
        if not self.zones:
            raise ValueError("no zones")
        previous_end = 0
        for zone in self.zones:
            if not previous_end <= zone.start_pfn < zone.end_pfn <= self.end_pfn:
                raise ValueError(
                    f"zone {zone.name} [{zone.start_pfn}, {zone.end_pfn}) must be non-empty, "
                    f"sorted, non-overlapping and inside [0, {self.end_pfn})"
                )
            previous_end = zone.end_pfn
        names = [zone.name for zone in self.zones]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate zone names: {names}")
        self._ram = _merge_ranges(ram, self.end_pfn)
        self._ram_starts = [start for start, _ in self._ram]
        self._zone_index = {zone.name: i for i, zone in enumerate(self.zones)}
        self._zone_starts = [zone.start_pfn for zone in self.zones]
        self._zone_bounds = [(zone.start_pfn, zone.end_pfn) for zone in self.zones]
        self._state = bytearray(self.end_pfn)
        self._mt = bytearray(self.end_pfn)
        self._pageblock_mt = bytearray([MIGRATE_MOVABLE]) * (
            (self.end_pfn + PAGEBLOCK_NR_PAGES - 1) >> PAGEBLOCK_ORDER
        )
        self.backend: Literal["c", "python"] = _resolve_backend(backend)
        # Counters in int64 arrays (shared with the compiled core): nr_free[zone * 11 + order],
        # free_pages[zone], counters[0] = allocated pages.
        self._nr_free = array("q", [0]) * (len(self.zones) * NR_ORDERS)
        self._free_pages = array("q", [0]) * len(self.zones)
        self._counters = array("q", [0])
        self._ram_pages = sum(end - start for start, end in self._ram)
        self._managed = [0] * len(self.zones)
        for start, end in self._ram:
            for zi, (zs, ze) in enumerate(self._zone_bounds):
                self._managed[zi] += max(0, min(end, ze) - max(start, zs))
        if sum(self._managed) != self._ram_pages:
            raise ValueError("some RAM lies outside every zone")
        self._nofragment = ("Normal" in self._zone_index) and ("DMA32" in self._zone_index)
        self._zonelists: dict[tuple[str, ...], tuple[list[int], bool]] = {}
        self._setup_lists(cpus)

        # memblock_free_all(): ascending pfn, FPI_TO_TAIL, all pageblocks MOVABLE.
        state = self._state
        for start, end in self._ram:
            for zi, (zs, ze) in enumerate(self._zone_bounds):
                lo, hi = max(start, zs), min(end, ze)
                if lo >= hi:
                    continue
                for pfn, order in tile_range(lo, hi):
                    self._list_add_tail(pfn, self._buddy_list(zi, MIGRATE_MOVABLE, order))
                    self._nr_free[zi * NR_ORDERS + order] += 1
                    state[pfn] = _FREE + order
                self._free_pages[zi] += hi - lo

    def _setup_lists(self, cpus: int) -> None:
        """The list heads: one per buddy list (zones x migratetypes x orders), then the pcp
        lists of ``cpus`` CPUs (:meth:`setup_pcp`)."""
        self._nr_buddy_lists = len(self.zones) * MIGRATE_PCPTYPES * NR_ORDERS
        size = self.end_pfn + self._nr_buddy_lists
        self._next = array("i", [0]) * self.end_pfn
        self._prev = array("i", [0]) * self.end_pfn
        self._next.extend(range(self.end_pfn, size))
        self._prev.extend(range(self.end_pfn, size))
        self._low_wmark = zone_low_wmarks(self._managed)
        self._pcp_data = array("q")
        self._pcp: list[list[PerCpuPages]] = [[] for _ in self.zones]
        self.cpus = 0
        self.setup_pcp(cpus)

    def setup_pcp(self, cpus: int) -> None:
        """Give every zone ``cpus`` per-cpu page sets (``setup_zone_pageset()``), 0 for none:
        ``batch = zone_batchsize()``, ``high = zone_highsize()`` from the zone's low watermark
        (``zone_pcp_update()``), 13 empty lists each. ValueError while pcp lists hold pages."""
        if cpus < 0:
            raise ValueError(f"cpus must be >= 0, not {cpus}")
        if self.pcp_pages():
            raise ValueError("the per-cpu lists hold pages: drain_all_pages() first")
        _CORES.pop(self, None)  # the core holds views of the arrays resized here
        base = self.end_pfn + self._nr_buddy_lists
        del self._next[base:]
        del self._prev[base:]
        size = base + len(self.zones) * cpus * NR_PCP_LISTS
        self._next.extend(range(base, size))
        self._prev.extend(range(base, size))
        first = base
        data = array("q")
        for zi in range(len(self.zones)):
            batch = max(1, zone_batchsize(self._managed[zi]))  # zone_set_pageset_high_and_batch()
            high = zone_highsize(self._low_wmark[zi], batch, cpus) if cpus else 0
            for _ in range(cpus):
                data.extend((first, high, batch, 0, 0))
                first += NR_PCP_LISTS
        self._pcp_data = data
        self._pcp_views()
        self.cpus = cpus

    def _pcp_views(self) -> None:
        """The ``PerCpuPages`` of every zone and CPU: views of their records in ``_pcp_data``."""
        cpus = len(self._pcp_data) // (PCP_FIELDS * len(self.zones))
        self._pcp = [
            [PerCpuPages(self._pcp_data, (zi * cpus + cpu) * PCP_FIELDS) for cpu in range(cpus)]
            for zi in range(len(self.zones))
        ]

    def _core(self) -> Any:
        """The compiled core over this allocator's arrays (None on the Python backend)."""
        if self.backend != "c":
            return None
        core = _CORES.get(self)
        if core is None:
            module = compiled_core()
            if module is None:  # restored (snapshot) where the core is not built
                self.backend = "python"
                return None
            core = module.Core(
                self._state,
                self._mt,
                self._pageblock_mt,
                self._next,
                self._prev,
                self._nr_free,
                self._free_pages,
                self._counters,
                self._pcp_data,
                self.end_pfn,
                [
                    (s, e, low)
                    for (s, e), low in zip(self._zone_bounds, self._low_wmark, strict=True)
                ],
                self.cpus if self._pcp_data else 0,
            )
            _CORES[self] = core
        return core

    # ------------------------------------------------------------------ list primitives

    def _buddy_list(self, zi: int, mt: int, order: int) -> int:
        """The head node of buddy list (zone, migratetype, order) (``free_area[order]
        .free_list[mt]``)."""
        return self.end_pfn + (zi * MIGRATE_PCPTYPES + mt) * NR_ORDERS + order

    def _list_add(self, pfn: int, head: int) -> None:
        """``list_add()``: insert ``pfn`` at the head."""
        nxt = self._next
        first = nxt[head]
        nxt[pfn] = first
        self._prev[pfn] = head
        self._prev[first] = pfn
        nxt[head] = pfn

    def _list_add_tail(self, pfn: int, head: int) -> None:
        """``list_add_tail()``: insert ``pfn`` at the tail."""
        prv = self._prev
        last = prv[head]
        self._next[pfn] = head
        prv[pfn] = last
        self._next[last] = pfn
        prv[head] = pfn

    def _list_del(self, pfn: int) -> None:
        """``list_del()``."""
        nxt, prv = self._next, self._prev
        n, p = nxt[pfn], prv[pfn]
        nxt[p] = n
        prv[n] = p

    def _list_pfns(self, head: int) -> list[int]:
        """The pfns on a list, head first."""
        out = []
        nxt = self._next
        node = nxt[head]
        while node != head:
            out.append(node)
            node = nxt[node]
        return out

    # ------------------------------------------------------------------ queries

    @property
    def ram(self) -> tuple[tuple[int, int], ...]:
        """The usable RAM ranges, merged and sorted."""
        return tuple(self._ram)

    @property
    def ram_pages(self) -> int:
        return self._ram_pages

    def managed_pages(self, zone: str) -> int:
        """``zone_managed_pages()``: the RAM pages the zone's allocator was given at boot."""
        return self._managed[self._zone_idx(zone)]

    def allocated_pages(self) -> int:
        """Pages in allocated blocks (including claimed ranges; not pages on per-cpu lists)."""
        return self._counters[0]

    def free_pages(self, zone: str | None = None) -> int:
        """Free pages on the buddy lists (``NR_FREE_PAGES``: not those on per-cpu lists), all
        zones (or one zone)."""
        if zone is None:
            return sum(self._free_pages)
        return self._free_pages[self._zone_idx(zone)]

    def pcp_pages(self, zone: str | None = None) -> int:
        """Pages on the per-cpu lists of every CPU, all zones (or one zone)."""
        data = self._pcp_data
        if zone is None:
            return sum(data[3::PCP_FIELDS])  # the count words
        return sum(pcp.count for pcp in self._pcp[self._zone_idx(zone)])

    def pcp(self, zone: str, cpu: int = 0) -> PerCpuPages:
        """The ``per_cpu_pages`` of ``cpu`` for ``zone`` (ValueError when there is none)."""
        zi = self._zone_idx(zone)
        if not 0 <= cpu < self.cpus:
            raise ValueError(f"no cpu {cpu}: this allocator has {self.cpus} with pcp lists")
        return self._pcp[zi][cpu]

    def pcp_list(self, zone: str, cpu: int, migratetype: int, order: int) -> list[int]:
        """pfns on one per-cpu list (``pcp->lists[order_to_pindex(mt, order)]``), head first."""
        pcp = self.pcp(zone, cpu)
        pindex = (
            NR_LOWORDER_PCP_LISTS
            if order > PAGE_ALLOC_COSTLY_ORDER
            else (MIGRATE_PCPTYPES * order + migratetype)
        )
        return self._list_pfns(pcp.first_list + pindex)

    def pcp_blocks(self) -> Iterator[tuple[int, int]]:
        """``(pfn, order)`` of every block on a per-cpu list, every zone and CPU."""
        for row in self._pcp:
            for pcp in row:
                for pindex in range(NR_PCP_LISTS):
                    order = PAGEBLOCK_ORDER if pindex == NR_LOWORDER_PCP_LISTS else pindex // 3
                    for pfn in self._list_pfns(pcp.first_list + pindex):
                        yield pfn, order

    def low_wmark(self, zone: str) -> int:
        """The zone's ``WMARK_LOW`` in pages (pool.guest.pcp.zone_low_wmarks)."""
        return self._low_wmark[self._zone_idx(zone)]

    def nr_free(self, zone: str) -> tuple[int, ...]:
        """Free blocks per order 0..10 in ``zone``, all migratetypes: one row of
        /proc/buddyinfo (pages on per-cpu lists are not free there)."""
        zi = self._zone_idx(zone)
        return tuple(self._nr_free[zi * NR_ORDERS : (zi + 1) * NR_ORDERS])

    def nr_free_by_type(self, zone: str, migratetype: int) -> tuple[int, ...]:
        """Free blocks per order of one migratetype: one row of /proc/pagetypeinfo."""
        zi = self._zone_idx(zone)
        return tuple(
            len(self._list_pfns(self._buddy_list(zi, migratetype, order)))
            for order in range(NR_ORDERS)
        )

    def buddyinfo(self) -> list[tuple[str, tuple[int, ...]]]:
        """``(zone name, nr_free row)`` for every zone, in zone order."""
        return [(zone.name, self.nr_free(zone.name)) for zone in self.zones]

    def free_blocks(self, zone: str, order: int, migratetype: int | None = None) -> list[int]:
        """pfns of the free blocks of ``order`` in ``zone``, head of the list first: of one
        migratetype, or of all (unmovable, movable, reclaimable lists one after the other)."""
        self._check_order(order)
        zi = self._zone_idx(zone)
        types = range(MIGRATE_PCPTYPES) if migratetype is None else (migratetype,)
        out: list[int] = []
        for mt in types:
            out.extend(self._list_pfns(self._buddy_list(zi, mt, order)))
        return out

    def pageblock_migratetype(self, pfn: int) -> int:
        """``get_pfnblock_migratetype()``: the migratetype of the pageblock holding ``pfn``."""
        return self._pageblock_mt[pfn >> PAGEBLOCK_ORDER]

    def pageblock_counts(self, zone: str) -> tuple[int, ...]:
        """Pageblocks of the zone per migratetype (unmovable, movable, reclaimable): the
        "Number of blocks type" table of /proc/pagetypeinfo (pageblocks whose first pfn lies
        in the zone)."""
        zone_obj = self.zones[self._zone_idx(zone)]
        first = -(-zone_obj.start_pfn // PAGEBLOCK_NR_PAGES)
        last = -(-zone_obj.end_pfn // PAGEBLOCK_NR_PAGES)
        block = np.frombuffer(self._pageblock_mt, dtype=np.uint8)[first:last]
        return tuple(int(n) for n in np.bincount(block, minlength=MIGRATE_PCPTYPES))

    def zone_of(self, pfn: int) -> Zone | None:
        """The zone spanning ``pfn``, or None."""
        zi = self._zone_of(pfn)
        return None if zi < 0 else self.zones[zi]

    def is_ram(self, pfn: int) -> bool:
        i = bisect.bisect_right(self._ram_starts, pfn) - 1
        return i >= 0 and pfn < self._ram[i][1]

    def allocated_order(self, pfn: int) -> int | None:
        """Order of the allocated block starting at ``pfn``, else None."""
        if not 0 <= pfn < self.end_pfn:
            return None
        value = self._state[pfn]
        return value - _ALLOC if _ALLOC <= value <= _ALLOC_LAST else None

    def allocated_migratetype(self, pfn: int) -> int | None:
        """The migratetype the block at ``pfn`` was allocated as, None if it is not allocated."""
        if self.allocated_order(pfn) is None:
            return None
        return self._mt[pfn]

    def is_free(self, pfn: int) -> bool:
        """Whether page ``pfn`` lies inside some free block on a buddy list."""
        block = self._block_containing(pfn)
        return block is not None and _FREE <= block[1] <= _FREE_LAST

    def on_pcp(self, pfn: int) -> bool:
        """Whether page ``pfn`` lies inside a block on a per-cpu list."""
        block = self._block_containing(pfn)
        return block is not None and _PCP <= block[1] <= _PCP_LAST

    def block_of(self, pfn: int) -> tuple[int, int, bool] | None:
        """``(head pfn, order, is_free)`` of the block containing ``pfn``; None for a hole. A
        block on a per-cpu list is not free (it is not on the buddy lists)."""
        block = self._block_containing(pfn)
        if block is None:
            return None
        head, value = block
        if value <= _FREE_LAST:
            return head, value - _FREE, True
        if value <= _PCP_LAST:
            return head, value - _PCP, False
        return head, value - _ALLOC, False

    # ------------------------------------------------------------------ alloc / free

    def alloc(
        self,
        order: int,
        zonelist: Sequence[str] = ("Normal", "DMA32"),
        migratetype: int = MIGRATE_MOVABLE,
        cpu: int = 0,
    ) -> int | None:
        """``get_page_from_freelist()`` over ``zonelist``, then the drain-and-retry of the slow
        path (module docstring): the first pfn of a block of ``order`` allocated as
        ``migratetype`` on ``cpu``, or None if no zone can serve. Raises ValueError for order
        outside 0..10, a bad CPU, or a zone name that is not a zone at all (a known zone this
        guest lacks, e.g. Normal below 4 GiB, is skipped)."""
        if not 0 <= order <= MAX_PAGE_ORDER:
            raise ValueError(f"order must be in 0..{MAX_PAGE_ORDER}, not {order}")
        if self.cpus and not 0 <= cpu < self.cpus:
            raise ValueError(f"no cpu {cpu}: this allocator has {self.cpus} with pcp lists")
        zis, nofragment = self._zonelist(zonelist)
        core = self._core()
        if core is not None:
            got = core.alloc(order, zis, nofragment, migratetype, cpu)
            return None if got < 0 else int(got)
        use_pcp = self.cpus > 0 and (order <= PAGE_ALLOC_COSTLY_ORDER or order == PAGEBLOCK_ORDER)
        drained = False
        while True:
            for zi in zis:
                pfn = -1
                if use_pcp:
                    pfn = self._rmqueue_pcplist(zi, order, migratetype, nofragment, cpu)
                if pfn < 0:
                    pfn = self._rmqueue(zi, order, migratetype, nofragment)  # rmqueue_buddy()
                    if pfn < 0:
                        continue
                    self._free_pages[zi] -= 1 << order
                self._state[pfn] = _ALLOC + order
                self._mt[pfn] = migratetype
                self._counters[0] += 1 << order
                return pfn
            if nofragment:
                nofragment = False  # get_page_from_freelist(): retry allowing fallbacks
            elif not drained and self.pcp_pages():
                self.drain_all_pages()  # __alloc_pages_direct_reclaim(): drain, retry once
                drained = True
            else:
                break
        return None

    def alloc_bulk(
        self,
        nr_pages: int,
        zonelist: Sequence[str] = ("Normal", "DMA32"),
        migratetype: int = MIGRATE_UNMOVABLE,
        cpu: int = 0,
    ) -> list[int]:
        """``__alloc_pages_bulk()``: up to ``nr_pages`` order-0 pages, in the order taken.

        The zone is the first of the zonelist whose free pages exceed its low watermark plus
        ``nr_pages`` (``zone_watermark_fast()``); the pages come from the head of that zone's pcp
        list for ``migratetype`` on ``cpu`` (``__rmqueue_pcplist()``, refilled with
        ``rmqueue_bulk()`` as often as it runs empty, without ``ALLOC_NOFRAGMENT``), until the
        request is met or the zone runs out. One page, no zone meeting its watermark, no
        per-cpu lists, or nothing from the pcp list: one single-page allocation instead
        (``goto failed``). May return fewer pages than asked, or none."""
        if nr_pages <= 0:
            return []
        zis, nofragment = self._zonelist(zonelist)
        core = self._core()
        if core is not None:
            if not 0 <= migratetype < MIGRATE_PCPTYPES:
                raise ValueError(f"no migratetype {migratetype}")
            return list(core.alloc_bulk(nr_pages, zis, nofragment, migratetype, cpu))
        chosen = -1
        if nr_pages > 1 and self.cpus:
            for zi in zis:
                if self._free_pages[zi] > self._low_wmark[zi] + nr_pages:
                    chosen = zi
                    break
        pages: list[int] = []
        if chosen >= 0:
            if not 0 <= cpu < self.cpus:
                raise ValueError(f"no cpu {cpu}: this allocator has {self.cpus} with pcp lists")
            pcp = self._pcp[chosen][cpu]
            state, mts = self._state, self._mt
            pindex = MIGRATE_PCPTYPES * 0 + migratetype
            while len(pages) < nr_pages:
                pfn = self._rmqueue_pcp_list(chosen, 0, migratetype, False, pcp, pindex)
                if pfn < 0:
                    break
                state[pfn] = _ALLOC
                mts[pfn] = migratetype
                pages.append(pfn)
            self._counters[0] += len(pages)
        if not pages:
            pfn1 = self.alloc(0, zonelist, migratetype, cpu)
            if pfn1 is not None:
                pages.append(pfn1)
        return pages

    def free(self, pfn: int, order: int, cpu: int = 0) -> None:
        """``__free_pages()``: orders 0..3 and 9 to the head of ``cpu``'s pcp list of the
        pageblock's migratetype (``free_unref_page()``, which may drain a batch back to the
        buddy lists), others straight to the buddy lists (``free_one_page()``: merge, head or
        tail placement). Raises ValueError (clear message) when pfn is not the start of a block
        allocated at exactly that order (double free, wrong order, never allocated): state
        unchanged."""
        if not 0 <= order <= MAX_PAGE_ORDER:
            raise ValueError(f"order must be in 0..{MAX_PAGE_ORDER}, not {order}")
        state = self._state
        if not 0 <= pfn < self.end_pfn or state[pfn] != _ALLOC + order:
            raise ValueError(self._explain_bad_free(pfn, order))
        use_pcp = self.cpus and (order <= PAGE_ALLOC_COSTLY_ORDER or order == PAGEBLOCK_ORDER)
        if use_pcp and not 0 <= cpu < self.cpus:
            raise ValueError(f"no cpu {cpu}: this allocator has {self.cpus} with pcp lists")
        core = self._core()
        if core is not None:
            core.free(pfn, order, cpu)
            return
        zi = self._zone_of(pfn)
        self._counters[0] -= 1 << order
        mt = self._pageblock_mt[pfn >> PAGEBLOCK_ORDER]
        if use_pcp:
            state[pfn] = _PCP + order
            self._mt[pfn] = mt  # free_unref_page_prepare(): set_pcppage_migratetype()
            self._free_unref_page_commit(zi, self._pcp[zi][cpu], pfn, mt, order)
            return
        state[pfn] = 0
        self._free_one_page(pfn, zi, order, mt)

    def free_bulk(self, pfns: npt.NDArray[np.int64] | Sequence[int], cpu: int = 0) -> None:
        """``free(pfn, 0, cpu)`` for every pfn in turn, in one call (``release_pages()`` /
        ``free_unref_page_list()``, as vfree gives a vmalloc area's pages back): the compiled
        core frees the whole list without returning to Python. Stops with ValueError at the
        first pfn that is not an allocated order-0 block (the pages before it are freed, as
        the loop would have)."""
        arr = np.ascontiguousarray(pfns, dtype=np.int64)
        core = self._core()
        if core is None:
            free = self.free
            for pfn in arr.tolist():
                free(pfn, 0, cpu)
            return
        if self.cpus and not 0 <= cpu < self.cpus:
            raise ValueError(f"no cpu {cpu}: this allocator has {self.cpus} with pcp lists")
        done = core.free_bulk(arr, cpu)
        if done < arr.size:
            raise ValueError(self._explain_bad_free(int(arr[done]), 0))

    def drain_all_pages(self) -> None:
        """``drain_all_pages(NULL)``: every CPU's pcp lists of every zone back to the buddy
        lists (``drain_pages_zone()`` = ``free_pcppages_bulk(zone, pcp->count, pcp, 0)``)."""
        core = self._core()
        if core is not None:
            core.drain_all_pages()
            return
        for zi, row in enumerate(self._pcp):
            for pcp in row:
                if pcp.count:
                    self._free_pcppages_bulk(zi, pcp.count, pcp, 0)

    # ------------------------------------------------------------------ the kernel's paths

    def _zonelist(self, zonelist: Sequence[str]) -> tuple[list[int], bool]:
        """The zone indexes of ``zonelist`` (zones this guest lacks skipped) and whether its
        allocations start with ``ALLOC_NOFRAGMENT`` (``alloc_flags_nofragment()``: the
        preferred zone is Normal and DMA32 exists). Cached per zonelist."""
        key = tuple(zonelist)
        cached = self._zonelists.get(key)
        if cached is not None:
            return cached
        zis = []
        for name in key:
            zi = self._zone_index.get(name)
            if zi is None:
                if name not in ZONE_NAMES:
                    raise ValueError(f"unknown zone {name!r} (zones: {list(self._zone_index)})")
                continue  # a zone this guest does not have (e.g. Normal below 4 GiB)
            zis.append(zi)
        nofragment = self._nofragment and bool(zis) and self.zones[zis[0]].name == "Normal"
        self._zonelists[key] = (zis, nofragment)
        return zis, nofragment

    def _rmqueue_smallest(self, zi: int, order: int, mt: int) -> int:
        """``__rmqueue_smallest()``: the head block of the smallest order >= ``order`` on the
        lists of ``mt``, split by ``expand()`` (upper halves to the heads of the lower lists of
        ``mt``). Returns its pfn (state byte cleared, ``_mt`` set to ``mt``: the caller marks
        it), or -1. The zone's free counter is the caller's to lower."""
        end = self.end_pfn
        base = end + (zi * MIGRATE_PCPTYPES + mt) * NR_ORDERS
        nxt, prv = self._next, self._prev
        nr_free = self._nr_free
        nf = zi * NR_ORDERS
        state = self._state
        for current in range(order, NR_ORDERS):
            head = base + current
            pfn = nxt[head]
            if pfn == head:
                continue
            n = nxt[pfn]  # del_page_from_free_list()
            nxt[head] = n
            prv[n] = head
            nr_free[nf + current] -= 1
            while current > order:  # expand()
                current -= 1
                upper = pfn + (1 << current)
                lhead = base + current
                first = nxt[lhead]
                nxt[upper] = first
                prv[upper] = lhead
                prv[first] = upper
                nxt[lhead] = upper
                nr_free[nf + current] += 1
                state[upper] = _FREE + current
            state[pfn] = 0
            self._mt[pfn] = mt  # set_pcppage_migratetype()
            return pfn
        return -1

    def _rmqueue(self, zi: int, order: int, mt: int, nofragment: bool) -> int:
        """``__rmqueue()``: ``__rmqueue_smallest()``; when that fails, ``__rmqueue_fallback()``
        and retry. The pfn (caller marks it; the zone's free counter is lowered by the caller),
        or -1."""
        while True:
            pfn = self._rmqueue_smallest(zi, order, mt)
            if pfn >= 0:
                return pfn
            if not self._rmqueue_fallback(zi, order, mt, nofragment):
                return -1

    def _find_suitable_fallback(self, zi: int, order: int, mt: int) -> tuple[int, bool]:
        """``find_suitable_fallback(area, order, mt, only_stealable=false)``: the first type of
        ``fallbacks[mt]`` with a free block of ``order``, and ``can_steal_fallback()``."""
        if not self._nr_free[zi * NR_ORDERS + order]:
            return -1, False
        nxt = self._next
        for fallback_mt in FALLBACKS[mt]:
            head = self._buddy_list(zi, fallback_mt, order)
            if nxt[head] != head:
                return fallback_mt, can_steal_fallback(order, mt)
        return -1, False

    def _rmqueue_fallback(self, zi: int, order: int, start_mt: int, nofragment: bool) -> bool:
        """``__rmqueue_fallback()``: find the largest free block of a fallback type (not below
        ``pageblock_order`` with ``ALLOC_NOFRAGMENT``); a movable request that may not steal
        the whole block takes the smallest suitable one instead; ``steal_suitable_fallback()``
        moves it (and maybe its pageblock) to ``start_mt``'s lists. False when there is none."""
        min_order = PAGEBLOCK_ORDER if nofragment else order
        for current in range(MAX_PAGE_ORDER, min_order - 1, -1):
            fallback_mt, can_steal = self._find_suitable_fallback(zi, current, start_mt)
            if fallback_mt < 0:
                continue
            if not can_steal and start_mt == MIGRATE_MOVABLE and current > order:
                for current in range(order, NR_ORDERS):  # find_smallest
                    fallback_mt, can_steal = self._find_suitable_fallback(zi, current, start_mt)
                    if fallback_mt >= 0:
                        break
            pfn = self._next[self._buddy_list(zi, fallback_mt, current)]
            self._steal_suitable_fallback(zi, pfn, current, start_mt, can_steal)
            return True
        return False

    def _steal_suitable_fallback(
        self, zi: int, pfn: int, current_order: int, start_type: int, whole_block: bool
    ) -> None:
        """``steal_suitable_fallback()``: a block of a whole pageblock or more changes its
        pageblocks' type (``change_pageblock_range()``) and moves to ``start_type``'s list;
        otherwise, when whole-block stealing is allowed, every free page of the pageblock moves
        to ``start_type`` (``move_freepages_block()``) and the pageblock itself changes type
        when at least half of it is free or of a compatible type (for an unmovable or
        reclaimable request from a movable block, every page that is not free and not movable
        counts as compatible). Otherwise only the block moves. (Watermark boosting is not
        modeled.)"""
        pbm = self._pageblock_mt
        old_block_type = pbm[pfn >> PAGEBLOCK_ORDER]
        if current_order >= PAGEBLOCK_ORDER:
            first = pfn >> PAGEBLOCK_ORDER
            for block in range(first, first + (1 << (current_order - PAGEBLOCK_ORDER))):
                pbm[block] = start_type
        elif whole_block:
            free_pages, movable_pages = self._move_freepages_block(zi, pfn, start_type)
            if start_type == MIGRATE_MOVABLE:
                alike_pages = movable_pages
            elif old_block_type == MIGRATE_MOVABLE:
                alike_pages = PAGEBLOCK_NR_PAGES - (free_pages + movable_pages)
            else:
                alike_pages = 0
            if free_pages:
                if free_pages + alike_pages >= PAGEBLOCK_NR_PAGES >> 1:
                    pbm[pfn >> PAGEBLOCK_ORDER] = start_type
                return
        # single_page: move_to_free_list() (list_move_tail)
        self._list_del(pfn)
        self._list_add_tail(pfn, self._buddy_list(zi, start_type, current_order))

    def _move_freepages_block(self, zi: int, pfn: int, mt: int) -> tuple[int, int]:
        """``move_freepages_block()``: move every free block of ``pfn``'s pageblock to the tail of
        ``mt``'s lists; returns (pages moved, pages allocated as movable in the block). A
        pageblock that starts before the zone starts at ``pfn``; one that ends after the zone
        moves nothing."""
        start = pfn & ~(PAGEBLOCK_NR_PAGES - 1)
        end = start + PAGEBLOCK_NR_PAGES - 1
        zone_start, zone_end = self._zone_bounds[zi]
        if start < zone_start:
            start = pfn
        if end >= zone_end:
            return 0, 0
        state, mts = self._state, self._mt
        moved = movable = 0
        p = start
        while p <= end:
            value = state[p]
            if _FREE <= value <= _FREE_LAST:
                order = value - _FREE
                self._list_del(p)
                self._list_add_tail(p, self._buddy_list(zi, mt, order))
                p += 1 << order
                moved += 1 << order
            elif value >= _ALLOC:
                size = 1 << (value - _ALLOC)
                if mts[p] == MIGRATE_MOVABLE:  # PageLRU(page) || __PageMovable(page)
                    movable += min(size, end + 1 - p)
                p += size
            elif value >= _PCP:
                p += 1 << (value - _PCP)
            else:  # a hole, or inside a block that starts before the pageblock
                block = self._block_containing(p)
                if block is None:
                    p += 1
                    continue
                head, value = block
                size = 1 << (value - (_ALLOC if value >= _ALLOC else _PCP))
                if value >= _ALLOC and mts[head] == MIGRATE_MOVABLE:
                    movable += min(head + size, end + 1) - p
                p = head + size
        return moved, movable

    def _free_one_page(self, pfn: int, zi: int, order: int, mt: int, to_tail: bool = False) -> None:
        """``__free_one_page()``: merge with free buddies up to order 10 (never across the zone),
        then add the block to the lists of ``mt``: at the tail with ``FPI_TO_TAIL`` or when
        ``buddy_merge_likely()`` (the buddy of the next-higher order is free, so the block will
        likely merge soon), else at the head. The zone's free counter rises by the block."""
        state = self._state
        zone_start, zone_end = self._zone_bounds[zi]
        nr_free = self._nr_free
        nf = zi * NR_ORDERS
        nxt, prv = self._next, self._prev
        self._free_pages[zi] += 1 << order
        while order < MAX_PAGE_ORDER:
            buddy = pfn ^ (1 << order)
            if buddy < zone_start or buddy >= zone_end or state[buddy] != _FREE + order:
                break
            n, p = nxt[buddy], prv[buddy]  # del_page_from_free_list(buddy)
            nxt[p] = n
            prv[n] = p
            nr_free[nf + order] -= 1
            state[buddy] = 0
            pfn &= ~(1 << order)
            order += 1
        state[pfn] = _FREE + order
        nr_free[nf + order] += 1
        head = self.end_pfn + (zi * MIGRATE_PCPTYPES + mt) * NR_ORDERS + order
        if not to_tail and order < _MERGE_LIKELY_MAX:  # buddy_merge_likely()
            higher_buddy = (pfn & ~(1 << order)) ^ (1 << (order + 1))
            to_tail = zone_start <= higher_buddy < zone_end and state[higher_buddy] == (
                _FREE + order + 1
            )
        if to_tail:
            last = prv[head]
            nxt[pfn] = head
            prv[pfn] = last
            nxt[last] = pfn
            prv[head] = pfn
        else:
            first = nxt[head]
            nxt[pfn] = first
            prv[pfn] = head
            prv[first] = pfn
            nxt[head] = pfn

    def _free_unref_page_commit(
        self, zi: int, pcp: PerCpuPages, pfn: int, mt: int, order: int
    ) -> None:
        """``free_unref_page_commit()``: the block (state already _PCP) goes to the head of its
        pcp list; when ``count`` reaches ``high`` (0 — drain everything — when freeing a block
        of order 1..3 while ``free_factor`` is up), ``free_pcppages_bulk()`` returns
        ``nr_pcp_free()`` pages."""
        pindex = (
            NR_LOWORDER_PCP_LISTS
            if order > PAGE_ALLOC_COSTLY_ORDER
            else (MIGRATE_PCPTYPES * order + mt)
        )
        head = pcp.first_list + pindex
        nxt = self._next
        first = nxt[head]
        nxt[pfn] = first
        self._prev[pfn] = head
        self._prev[first] = pfn
        nxt[head] = pfn
        pcp.count += 1 << order
        free_high = bool(pcp.free_factor) and 0 < order <= PAGE_ALLOC_COSTLY_ORDER
        high = 0 if free_high or not pcp.high else pcp.high  # nr_pcp_high()
        if pcp.count >= high:
            self._free_pcppages_bulk(zi, nr_pcp_free(pcp, high, pcp.batch, free_high), pcp, pindex)

    def _free_pcppages_bulk(self, zi: int, count: int, pcp: PerCpuPages, pindex: int) -> None:
        """``free_pcppages_bulk()``: ``count`` pages (at most ``pcp->count``) from the lists,
        round-robin from ``pindex`` on, each list's blocks taken from its *tail* until the list
        is empty or the count is met, each to ``__free_one_page()`` with its pcp migratetype."""
        count = min(pcp.count, count)
        min_pindex, max_pindex = 0, NR_PCP_LISTS - 1
        pindex -= 1
        nxt, prv = self._next, self._prev
        state, mts = self._state, self._mt
        first = pcp.first_list
        while count > 0:
            while True:  # remove pages from lists in a round-robin fashion
                pindex += 1
                if pindex > max_pindex:
                    pindex = min_pindex
                head = first + pindex
                if nxt[head] != head:
                    break
                if pindex == max_pindex:
                    max_pindex -= 1
                if pindex == min_pindex:
                    min_pindex += 1
            order = PAGEBLOCK_ORDER if pindex == NR_LOWORDER_PCP_LISTS else pindex // 3
            nr_pages = 1 << order
            while True:
                page = prv[head]  # list_last_entry()
                p = prv[page]
                nxt[p] = head
                prv[head] = p
                count -= nr_pages
                pcp.count -= nr_pages
                state[page] = 0
                self._free_one_page(page, zi, order, mts[page])
                if count <= 0 or nxt[head] == head:
                    break

    def _rmqueue_pcplist(self, zi: int, order: int, mt: int, nofragment: bool, cpu: int) -> int:
        """``rmqueue_pcplist()``: halve ``free_factor`` (an allocation ends a run of frees),
        then ``__rmqueue_pcplist()`` on the list for (``mt``, ``order``)."""
        pcp = self._pcp[zi][cpu]
        pcp.free_factor >>= 1
        pindex = (
            NR_LOWORDER_PCP_LISTS
            if order > PAGE_ALLOC_COSTLY_ORDER
            else (MIGRATE_PCPTYPES * order + mt)
        )
        return self._rmqueue_pcp_list(zi, order, mt, nofragment, pcp, pindex)

    def _rmqueue_pcp_list(
        self, zi: int, order: int, mt: int, nofragment: bool, pcp: PerCpuPages, pindex: int
    ) -> int:
        """``__rmqueue_pcplist()``: an empty list is refilled first with ``rmqueue_bulk()`` of
        ``max(batch >> order, 2)`` blocks (``batch`` itself when it is 1 or less); then the
        block at the list's head is taken. The pfn (state cleared), or -1."""
        head = pcp.first_list + pindex
        nxt = self._next
        if nxt[head] == head:
            batch = pcp.batch
            if batch > 1:
                batch = max(batch >> order, 2)
            pcp.count += self._rmqueue_bulk(zi, order, batch, head, mt, nofragment) << order
            if nxt[head] == head:
                return -1
        pfn = nxt[head]
        n = nxt[pfn]
        nxt[head] = n
        self._prev[n] = head
        pcp.count -= 1 << order
        self._state[pfn] = 0
        return pfn

    def _rmqueue_bulk(
        self, zi: int, order: int, count: int, head: int, mt: int, nofragment: bool
    ) -> int:
        """``rmqueue_bulk()``: up to ``count`` blocks from ``__rmqueue()``, each added to the
        *tail* of the pcp list (so a split block's pieces are handed out in physical order).
        Returns how many were added."""
        state = self._state
        prv, nxt = self._prev, self._next
        allocated = 0
        for _ in range(count):
            pfn = self._rmqueue(zi, order, mt, nofragment)
            if pfn < 0:
                break
            last = prv[head]
            nxt[pfn] = head
            prv[pfn] = last
            nxt[last] = pfn
            prv[head] = pfn
            state[pfn] = _PCP + order
            allocated += 1
        self._free_pages[zi] -= allocated << order
        return allocated

    # ------------------------------------------------------------------ claimed ranges

    def claim_range(self, start_pfn: int, npages: int) -> bool:
        """Take every page of [start, start+npages) off the free lists (splitting free blocks as
        needed, like alloc_contig_range at boot; per-cpu lists are drained first when they hold
        pages of the range, as alloc_contig_range does), recording it as allocated unmovable
        blocks: the largest naturally aligned blocks (order <= 10, never crossing a zone
        boundary) that tile the range left to right, as listed by ``claimed_blocks(start,
        npages)``. Give them back with ``free(pfn, order)`` block by block, or all at once with
        ``free_range(start, npages)``. The parts of split free blocks outside the range go back
        to the heads of the free lists of their pageblocks' types. Returns False and changes
        nothing (but a drain) if any page in the range is allocated or not RAM; ValueError if
        npages < 1."""
        if npages < 1:
            raise ValueError(f"npages must be positive, not {npages}")
        end_pfn = start_pfn + npages
        if start_pfn < 0 or end_pfn > self.end_pfn:
            return False
        blocks: list[tuple[int, int]] = []
        pfn = start_pfn
        drained = False
        while pfn < end_pfn:
            block = self._block_containing(pfn)
            if block is not None and _PCP <= block[1] <= _PCP_LAST and not drained:
                self.drain_all_pages()
                drained = True
                blocks, pfn = [], start_pfn
                continue
            if block is None or not _FREE <= block[1] <= _FREE_LAST:
                return False
            head, order = block[0], block[1] - _FREE
            blocks.append((head, order))
            pfn = head + (1 << order)
        state = self._state
        for head, order in blocks:
            zi = self._zone_of(head)
            self._list_del(head)
            self._nr_free[zi * NR_ORDERS + order] -= 1
            state[head] = 0
            self._free_pages[zi] -= 1 << order
            block_end = head + (1 << order)
            if head < start_pfn:
                self._add_free_range(zi, head, start_pfn)
            if block_end > end_pfn:
                self._add_free_range(zi, end_pfn, block_end)
        for pfn, order in self.claimed_blocks(start_pfn, npages):
            state[pfn] = _ALLOC + order
            self._mt[pfn] = MIGRATE_UNMOVABLE
            self._counters[0] += 1 << order
        return True

    def claimed_blocks(self, start_pfn: int, npages: int) -> list[tuple[int, int]]:
        """``(pfn, order)`` of the allocated blocks ``claim_range(start_pfn, npages)`` records: the
        largest naturally aligned blocks (order <= 10) tiling the range, cut at zone boundaries."""
        end_pfn = start_pfn + npages
        blocks: list[tuple[int, int]] = []
        for zone_start, zone_end in self._zone_bounds:
            lo, hi = max(start_pfn, zone_start), min(end_pfn, zone_end)
            if lo < hi:
                blocks.extend(tile_range(lo, hi))
        return blocks

    def free_range(self, start_pfn: int, npages: int) -> None:
        """Give back a range taken with ``claim_range``: ``free()`` every block of
        ``claimed_blocks()``. Raises ValueError, changing nothing, if any of those blocks is not
        allocated at that order."""
        blocks = self.claimed_blocks(start_pfn, npages)
        if npages < 1 or not blocks:
            raise ValueError(f"empty range: {start_pfn}+{npages}")
        for pfn, order in blocks:
            if self.allocated_order(pfn) != order:
                raise ValueError(
                    f"range {start_pfn}+{npages} was not claimed as one range: "
                    + self._explain_bad_free(pfn, order)
                )
        for pfn, order in blocks:
            self.free(pfn, order)

    # ------------------------------------------------------------------ checks, copies

    def check_invariants(self) -> None:
        """Raise AssertionError naming the first broken invariant: block heads aligned and inside
        one zone and one RAM range, no two blocks overlapping, every RAM page in exactly one block,
        every free head on exactly one buddy list of its zone and order and every pcp head on the
        pcp list of its order (no block on both), list links consistent, counters (free, pcp,
        allocated, nr_free, pcp counts) right, and no pair of free buddies left unmerged."""
        st = np.frombuffer(self._state, dtype=np.uint8)
        heads = np.flatnonzero(st).astype(np.int64)
        values = st[heads].astype(np.int64)
        free_mask = (values >= _FREE) & (values <= _FREE_LAST)
        pcp_mask = (values >= _PCP) & (values <= _PCP_LAST)
        alloc_mask = (values >= _ALLOC) & (values <= _ALLOC_LAST)
        bad = ~(free_mask | pcp_mask | alloc_mask)
        assert not bad.any(), f"bad state byte {values[bad][0]} at pfn {heads[bad][0]}"
        orders = np.where(
            free_mask, values - _FREE, np.where(pcp_mask, values - _PCP, values - _ALLOC)
        )
        sizes = np.left_shift(np.int64(1), orders)
        ends = heads + sizes
        misaligned = (heads & (sizes - 1)) != 0
        assert not misaligned.any(), (
            f"block at pfn {heads[misaligned][0]} not aligned to its order {orders[misaligned][0]}"
        )
        assert heads.size == 0 or ends[-1] <= self.end_pfn, "block runs past end_pfn"
        overlap = ends[:-1] > heads[1:]
        assert not overlap.any(), (
            f"block at pfn {heads[:-1][overlap][0]} overlaps the block at {heads[1:][overlap][0]}"
        )
        ram_starts = np.array([s for s, _ in self._ram] or [0], dtype=np.int64)
        ram_ends = np.array([e for _, e in self._ram] or [0], dtype=np.int64)
        ri = np.searchsorted(ram_starts, heads, side="right") - 1
        in_ram = (ri >= 0) & (ends <= ram_ends[np.maximum(ri, 0)])
        assert in_ram.all(), f"block at pfn {heads[~in_ram][0]} is not all RAM"
        zone_starts = np.array(self._zone_starts, dtype=np.int64)
        zone_ends = np.array([e for _, e in self._zone_bounds], dtype=np.int64)
        zi = np.searchsorted(zone_starts, heads, side="right") - 1
        in_zone = (zi >= 0) & (ends <= zone_ends[np.maximum(zi, 0)])
        assert in_zone.all(), f"block at pfn {heads[~in_zone][0]} crosses a zone boundary"
        covered = int(sizes.sum())
        assert covered == self._ram_pages, (
            f"blocks cover {covered} pages, RAM has {self._ram_pages}: pages lost or invented"
        )
        allocated = int(sizes[alloc_mask].sum())
        assert allocated == self._counters[0], (
            f"allocated counter {self._counters[0]} != {allocated} pages in allocated blocks"
        )
        # Buddy lists against the state array, and the links of every list.
        seen = np.zeros(self.end_pfn, dtype=np.bool_)
        nxt, prv = self._next, self._prev
        listed_free = 0
        for z, zone in enumerate(self.zones):
            zone_free = free_mask & (zi == z)
            counts = np.bincount(orders[zone_free], minlength=NR_ORDERS)
            pages = 0
            for order in range(NR_ORDERS):
                n = 0
                for mt in range(MIGRATE_PCPTYPES):
                    for pfn in self._walk(self._buddy_list(z, mt, order)):
                        assert zone.start_pfn <= pfn < zone.end_pfn and st[pfn] == _FREE + order, (
                            f"zone {zone.name} order {order}: pfn {pfn} on the free list of "
                            f"migratetype {mt} is not a free block of that order in that zone"
                        )
                        assert not seen[pfn], f"pfn {pfn} is on two lists"
                        seen[pfn] = True
                        n += 1
                assert n == counts[order] == self._nr_free[z * NR_ORDERS + order], (
                    f"zone {zone.name} order {order}: lists hold {n} blocks, nr_free says "
                    f"{self._nr_free[z * NR_ORDERS + order]}, state has {counts[order]} free heads"
                )
                pages += n << order
                listed_free += n
            assert pages == self._free_pages[z], (
                f"zone {zone.name}: free counter {self._free_pages[z]} != {pages} listed pages"
            )
        # Per-cpu lists.
        pcp_pages = 0
        pcp_heads = 0
        for z, row in enumerate(self._pcp):
            zone = self.zones[z]
            for cpu, pcp in enumerate(row):
                count = 0
                for pindex in range(NR_PCP_LISTS):
                    order = PAGEBLOCK_ORDER if pindex == NR_LOWORDER_PCP_LISTS else pindex // 3
                    for pfn in self._walk(pcp.first_list + pindex):
                        assert zone.start_pfn <= pfn < zone.end_pfn and st[pfn] == _PCP + order, (
                            f"zone {zone.name} cpu {cpu} pcp list {pindex}: pfn {pfn} is not a "
                            f"pcp block of order {order} in that zone"
                        )
                        assert not seen[pfn], f"pfn {pfn} is on two lists (buddy and pcp?)"
                        seen[pfn] = True
                        if pindex != NR_LOWORDER_PCP_LISTS:
                            assert self._mt[pfn] == pindex % 3, (
                                f"pcp block {pfn} has migratetype {self._mt[pfn]}, list {pindex}"
                            )
                        count += 1 << order
                        pcp_heads += 1
                assert count == pcp.count, (
                    f"zone {zone.name} cpu {cpu}: pcp count {pcp.count} != {count} listed pages"
                )
                pcp_pages += count
        assert pcp_heads == int(pcp_mask.sum()), "a pcp block is on no pcp list"
        assert pcp_pages == int(sizes[pcp_mask].sum())
        assert listed_free == int(free_mask.sum()), "a free block is on no buddy list"
        for node in range(self.end_pfn, len(nxt)):
            assert prv[nxt[node]] == node and nxt[prv[node]] == node, f"list {node} links broken"
        # No two free buddies of one order left unmerged.
        candidates = free_mask & (orders < MAX_PAGE_ORDER)
        fh, fo, fz = heads[candidates], orders[candidates], zi[candidates]
        buddies = fh ^ np.left_shift(np.int64(1), fo)
        same_zone = (buddies >= zone_starts[fz]) & (buddies < zone_ends[fz])
        buddy_free = np.zeros_like(same_zone)
        buddy_free[same_zone] = st[buddies[same_zone]] == _FREE + fo[same_zone]
        assert not buddy_free.any(), (
            f"free buddies pfn {fh[buddy_free][0]} and {buddies[buddy_free][0]} "
            f"at order {fo[buddy_free][0]} were not merged"
        )

    def _walk(self, head: int) -> Iterator[int]:
        """The nodes of one list, head first, checking each link both ways."""
        nxt, prv = self._next, self._prev
        node = nxt[head]
        previous = head
        while node != head:
            assert prv[node] == previous, f"list {head}: broken back link at pfn {node}"
            assert 0 <= node < self.end_pfn, f"list {head}: link to {node} outside the pfns"
            yield node
            previous = node
            node = nxt[node]
        assert prv[head] == previous, f"list {head}: tail link broken"

    def clone(self) -> PageAllocator:
        """A deep, independent copy."""
        other = PageAllocator.__new__(PageAllocator)
        other.end_pfn = self.end_pfn
        other.zones = self.zones
        other.cpus = self.cpus
        other.backend = self.backend
        other._ram = list(self._ram)
        other._ram_starts = list(self._ram_starts)
        other._zone_index = dict(self._zone_index)
        other._zone_starts = list(self._zone_starts)
        other._zone_bounds = list(self._zone_bounds)
        other._state = bytearray(self._state)
        other._mt = bytearray(self._mt)
        other._pageblock_mt = bytearray(self._pageblock_mt)
        other._nr_free = self._nr_free[:]
        other._free_pages = self._free_pages[:]
        other._counters = self._counters[:]
        other._ram_pages = self._ram_pages
        other._managed = list(self._managed)
        other._nofragment = self._nofragment
        other._zonelists = dict(self._zonelists)
        other._nr_buddy_lists = self._nr_buddy_lists
        other._next = self._next[:]
        other._prev = self._prev[:]
        other._low_wmark = list(self._low_wmark)
        other._pcp_data = self._pcp_data[:]
        other._pcp_views()
        return other

    # ------------------------------------------------------------------ internals

    def _zone_idx(self, zone: str) -> int:
        try:
            return self._zone_index[zone]
        except KeyError:
            raise ValueError(f"no zone {zone!r} (zones: {list(self._zone_index)})") from None

    def _zone_of(self, pfn: int) -> int:
        zi = bisect.bisect_right(self._zone_starts, pfn) - 1
        if zi >= 0 and pfn < self._zone_bounds[zi][1]:
            return zi
        return -1

    @staticmethod
    def _check_order(order: int) -> None:
        if not 0 <= order <= MAX_PAGE_ORDER:
            raise ValueError(f"order must be in 0..{MAX_PAGE_ORDER}, not {order}")

    def _block_containing(self, pfn: int) -> tuple[int, int] | None:
        """``(head, state byte)`` of the block containing ``pfn``, or None (hole, out of range).

        The first block head met walking the aligned candidates from order 0 up is the only one
        that can contain ``pfn``: any larger block around it would overlap it.
        """
        if not 0 <= pfn < self.end_pfn:
            return None
        state = self._state
        for order in range(NR_ORDERS):
            head = pfn & ~((1 << order) - 1)
            value = state[head]
            if value:
                base = _FREE if value <= _FREE_LAST else _PCP if value <= _PCP_LAST else _ALLOC
                size = 1 << (value - base)
                return (head, value) if pfn < head + size else None
        return None

    def _add_free_range(self, zi: int, start_pfn: int, end_pfn: int) -> None:
        """Put the free pages [start, end) (part of one former free block) back at list heads,
        each piece on the list of its pageblock's migratetype."""
        state = self._state
        pbm = self._pageblock_mt
        for pfn, order in tile_range(start_pfn, end_pfn):
            self._list_add(pfn, self._buddy_list(zi, pbm[pfn >> PAGEBLOCK_ORDER], order))
            self._nr_free[zi * NR_ORDERS + order] += 1
            state[pfn] = _FREE + order
        self._free_pages[zi] += end_pfn - start_pfn

    def _explain_bad_free(self, pfn: int, order: int) -> str:
        what = f"free(pfn={pfn}, order={order}): "
        if not 0 <= pfn < self.end_pfn:
            return what + f"pfn outside [0, {self.end_pfn})"
        value = self._state[pfn]
        if _ALLOC <= value <= _ALLOC_LAST:
            return what + f"the block at {pfn} was allocated at order {value - _ALLOC}, not {order}"
        if _FREE <= value <= _FREE_LAST:
            return what + f"double free: {pfn} starts a free block of order {value - _FREE}"
        if _PCP <= value <= _PCP_LAST:
            return what + f"double free: {pfn} is on a per-cpu list (order {value - _PCP})"
        block = self._block_containing(pfn)
        if block is None:
            return what + "not RAM (a hole)" if not self.is_ram(pfn) else what + "no block"
        head, value = block
        kind = "free" if value <= _FREE_LAST else "per-cpu" if value <= _PCP_LAST else "allocated"
        return what + f"not the start of an allocated block (inside the {kind} block at {head})"
