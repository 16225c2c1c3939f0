"""The guest's page allocator: a binary buddy allocator after mm/page_alloc.c.

What is modeled, and how faithfully:

- Orders 0..10 (``MAX_PAGE_ORDER``; 4 MiB blocks). The buddy of block ``pfn`` at order
  ``o`` is ``pfn ^ (1 << o)``; two free buddies of one order merge into ``pfn & ~(1 << o)``
  at order ``o + 1``, up to order 10, never across a zone boundary (the kernel's
  ``page_is_buddy()`` checks the zone) and never over a hole (hole pages are never free).
- Boot (``memblock_free_all()``): every range of usable RAM, cut at zone boundaries, is
  freed as the largest naturally aligned blocks that fit (``__free_pages_memory()``),
  in ascending pfn order and to the *tail* of each free list (``FPI_TO_TAIL``, Linux
  >= 5.10), so right after boot the head of every list is its lowest block.
- Allocation (``__rmqueue_smallest()``): the first zone of the zonelist holding a free
  block of order >= the request; the smallest such order; the block at the head of its
  list; split by ``expand()``, which puts the upper halves at the head of the lower lists.
- Freeing (``__free_one_page()``): merge with free buddies as far as possible; the result
  goes to the *head* of its list. The kernel's ``buddy_merge_likely()`` heuristic (tail
  placement when the next-higher buddy is free) is deliberately not modeled: the lists
  are LIFO after boot, which is what makes a freshly freed page the next one handed out.
- Not modeled: per-cpu page lists (pcp), migratetypes and pageblocks, watermarks and
  reserves, compaction, CMA, memory hotplug, NUMA (one node).

Representation (a 64 GiB guest has 16.7 M pfns, so nothing is a Python object per page):

- ``_state``: one byte per pfn. 0 for a page that does not start a block (interior page
  or hole); ``_FREE + o`` for the first page of a free block of order ``o``; ``_ALLOC + o``
  for the first page of an allocated block of order ``o``.
- Free lists: per zone, per order, an insertion-ordered ``dict`` used as a stack: the
  most recently inserted key is the list *head* (``popitem()`` takes it; ``del`` removes a
  given buddy in O(1)).

``alloc`` and ``free`` are O(orders). ``claim_range`` is O(blocks touched x orders).

Ranges claimed with :meth:`PageAllocator.claim_range` are recorded as allocated blocks:
the largest naturally aligned blocks (order <= 10, never crossing a zone boundary) that
tile the range, left to right; :meth:`PageAllocator.claimed_blocks` lists them and
:meth:`PageAllocator.free_range` gives the whole range back. Each of those blocks may also
be freed on its own with ``free(pfn, order)``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

import attrs
import numpy as np

from pool.guest.units import MAX_PAGE_ORDER, NR_ORDERS, PAGE_SHIFT, GiB, MiB

__all__ = [
    "ZONE_NAMES",
    "PageAllocator",
    "Zone",
    "buddy_of",
    "default_zones",
    "tile_range",
]

ZONE_NAMES = ("DMA", "DMA32", "Normal")
"""Zone names known to the model (x86-64, no HighMem, no Movable/Device zones)."""

_DMA_END_PFN = (16 * MiB) >> PAGE_SHIFT  # 4096
_DMA32_END_PFN = (4 * GiB) >> PAGE_SHIFT  # 1048576

_FREE = 1  # _state value of the head page of a free block of order o: _FREE + o (1..11)
_ALLOC = 32  # ... of an allocated block of order o: _ALLOC + o (32..42)
_FREE_LAST = _FREE + MAX_PAGE_ORDER
_ALLOC_LAST = _ALLOC + MAX_PAGE_ORDER


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

    def __init__(
        self,
        end_pfn: int,
        ram: Sequence[tuple[int, int]],
        zones: Sequence[Zone] | None = None,
    ) -> None:
        """ram: [start, end) pfn ranges of usable RAM (holes are the gaps). All RAM starts free,
        put on the free lists as the kernel's memblock_free_all does (largest naturally aligned
        blocks, max order 10, never crossing a zone boundary or a hole). ``zones`` defaults to
        ``default_zones(end_pfn)``. ValueError on overlapping RAM ranges or RAM outside zones."""
        if end_pfn < 1:
            raise ValueError(f"end_pfn must be positive: {end_pfn}")
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
        self._lists: list[list[dict[int, None]]] = [
            [{} for _ in range(NR_ORDERS)] for _ in self.zones
        ]
        self._free_pages = [0] * len(self.zones)
        self._allocated_pages = 0
        self._ram_pages = sum(end - start for start, end in self._ram)

        # memblock_free_all(): ascending pfn, FPI_TO_TAIL. A dict's head is its last key, so
        # collect the blocks per list and insert them in descending pfn order.
        per_list: list[list[list[int]]] = [[[] for _ in range(NR_ORDERS)] for _ in self.zones]
        state = self._state
        for start, end in self._ram:
            for zi, (zs, ze) in enumerate(self._zone_bounds):
                lo, hi = max(start, zs), min(end, ze)
                if lo >= hi:
                    continue
                for pfn, order in tile_range(lo, hi):
                    per_list[zi][order].append(pfn)
                    state[pfn] = _FREE + order
                self._free_pages[zi] += hi - lo
        if sum(self._free_pages) != self._ram_pages:
            raise ValueError("some RAM lies outside every zone")
        for zi, lists in enumerate(per_list):
            for order, pfns in enumerate(lists):
                self._lists[zi][order] = dict.fromkeys(reversed(pfns))

    # ------------------------------------------------------------------ queries

    @property
    def ram(self) -> tuple[tuple[int, int], ...]:
        """The usable RAM ranges, merged and sorted."""
        return tuple(self._ram)

    @property
    def ram_pages(self) -> int:
        return self._ram_pages

    def allocated_pages(self) -> int:
        """Pages in allocated blocks (including claimed ranges)."""
        return self._allocated_pages

    def free_pages(self, zone: str | None = None) -> int:
        """Total free pages, all zones (or one zone)."""
        if zone is None:
            return sum(self._free_pages)
        return self._free_pages[self._zone_idx(zone)]

    def nr_free(self, zone: str) -> tuple[int, ...]:
        """Free blocks per order 0..10 in ``zone``: one row of /proc/buddyinfo."""
        return tuple(len(d) for d in self._lists[self._zone_idx(zone)])

    def buddyinfo(self) -> list[tuple[str, tuple[int, ...]]]:
        """``(zone name, nr_free row)`` for every zone, in zone order."""
        return [(zone.name, self.nr_free(zone.name)) for zone in self.zones]

    def free_blocks(self, zone: str, order: int) -> list[int]:
        """pfns of the free blocks of ``order`` in ``zone``, head of the list first."""
        self._check_order(order)
        return list(reversed(self._lists[self._zone_idx(zone)][order]))

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

    def is_free(self, pfn: int) -> bool:
        """Whether page ``pfn`` lies inside some free block."""
        block = self._block_containing(pfn)
        return block is not None and _FREE <= block[1] <= _FREE_LAST

    def block_of(self, pfn: int) -> tuple[int, int, bool] | None:
        """``(head pfn, order, is_free)`` of the block containing ``pfn``; None for a hole."""
        block = self._block_containing(pfn)
        if block is None:
            return None
        head, value = block
        if value <= _FREE_LAST:
            return head, value - _FREE, True
        return head, value - _ALLOC, False

    # ------------------------------------------------------------------ alloc / free

    def alloc(self, order: int, zonelist: Sequence[str] = ("Normal", "DMA32")) -> int | None:
        """__rmqueue_smallest: first zone in the zonelist with a free block of order >= `order`;
        take the smallest such order, the block at the HEAD of its free list; split, returning
        upper halves to lower free lists (kernel's expand()). None if no zone can serve. Raises
        ValueError for order outside 0..10 or a zone name that is not a zone at all (a known
        zone this guest lacks, e.g. Normal below 4 GiB, is skipped)."""
        if not 0 <= order <= MAX_PAGE_ORDER:
            raise ValueError(f"order must be in 0..{MAX_PAGE_ORDER}, not {order}")
        for name in zonelist:
            zi = self._zone_index.get(name)
            if zi is None:
                if name not in ZONE_NAMES:
                    raise ValueError(f"unknown zone {name!r} (zones: {list(self._zone_index)})")
                continue  # a zone this guest does not have (e.g. Normal below 4 GiB)
            lists = self._lists[zi]
            for current in range(order, NR_ORDERS):
                free_list = lists[current]
                if free_list:
                    pfn = free_list.popitem()[0]
                    state = self._state
                    while current > order:  # expand()
                        current -= 1
                        upper = pfn + (1 << current)
                        lists[current][upper] = None
                        state[upper] = _FREE + current
                    state[pfn] = _ALLOC + order
                    self._free_pages[zi] -= 1 << order
                    self._allocated_pages += 1 << order
                    return pfn
        return None

    def free(self, pfn: int, order: int) -> None:
        """__free_pages: merge with free buddies (buddy = pfn ^ (1 << o); merged block at
        pfn & ~(1 << o)) up to order 10, never across zones; the merged block goes to the head of
        its list (buddy_merge_likely's tail placement is not modeled). Raises ValueError (clear
        message) when pfn is not the start of a block allocated at exactly that order (double
        free, wrong order, never allocated): state unchanged."""
        if not 0 <= order <= MAX_PAGE_ORDER:
            raise ValueError(f"order must be in 0..{MAX_PAGE_ORDER}, not {order}")
        state = self._state
        if not 0 <= pfn < self.end_pfn or state[pfn] != _ALLOC + order:
            raise ValueError(self._explain_bad_free(pfn, order))
        zi = self._zone_of(pfn)
        zone_start, zone_end = self._zone_bounds[zi]
        lists = self._lists[zi]
        state[pfn] = 0
        size = 1 << order
        self._allocated_pages -= size
        self._free_pages[zi] += size
        while order < MAX_PAGE_ORDER:
            buddy = pfn ^ (1 << order)
            if buddy < zone_start or buddy >= zone_end or state[buddy] != _FREE + order:
                break
            del lists[order][buddy]
            state[buddy] = 0
            pfn &= ~(1 << order)
            order += 1
        lists[order][pfn] = None
        state[pfn] = _FREE + order

    def claim_range(self, start_pfn: int, npages: int) -> bool:
        """Take every page of [start, start+npages) off the free lists (splitting free blocks as
        needed, like alloc_contig_range at boot), recording it as allocated blocks: the largest
        naturally aligned blocks (order <= 10, never crossing a zone boundary) that tile the range
        left to right, as listed by ``claimed_blocks(start, npages)``. Give them back with
        ``free(pfn, order)`` block by block, or all at once with ``free_range(start, npages)``.
        The parts of split free blocks outside the range go back to the heads of the free lists.
        Returns False and changes nothing if any page in the range is allocated or not RAM;
        ValueError if npages < 1."""
        if npages < 1:
            raise ValueError(f"npages must be positive, not {npages}")
        end_pfn = start_pfn + npages
        if start_pfn < 0 or end_pfn > self.end_pfn:
            return False
        blocks: list[tuple[int, int]] = []
        pfn = start_pfn
        while pfn < end_pfn:
            block = self._block_containing(pfn)
            if block is None or not _FREE <= block[1] <= _FREE_LAST:
                return False
            head, order = block[0], block[1] - _FREE
            blocks.append((head, order))
            pfn = head + (1 << order)
        state = self._state
        for head, order in blocks:
            zi = self._zone_of(head)
            del self._lists[zi][order][head]
            state[head] = 0
            self._free_pages[zi] -= 1 << order
            block_end = head + (1 << order)
            if head < start_pfn:
                self._add_free_range(zi, head, start_pfn)
            if block_end > end_pfn:
                self._add_free_range(zi, end_pfn, block_end)
        for pfn, order in self.claimed_blocks(start_pfn, npages):
            state[pfn] = _ALLOC + order
            self._allocated_pages += 1 << order
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
        free lists equal to the free heads of the state array, page counters right, and no pair of
        free buddies left unmerged. Vectorized (numpy): ~0.1 s per 16 GiB."""
        st = np.frombuffer(self._state, dtype=np.uint8)
        heads = np.flatnonzero(st).astype(np.int64)
        values = st[heads].astype(np.int64)
        free_mask = (values >= _FREE) & (values <= _FREE_LAST)
        alloc_mask = (values >= _ALLOC) & (values <= _ALLOC_LAST)
        bad = ~(free_mask | alloc_mask)
        assert not bad.any(), f"bad state byte {values[bad][0]} at pfn {heads[bad][0]}"
        orders = np.where(free_mask, values - _FREE, values - _ALLOC)
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
        # Each block inside one RAM range and one zone.
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
        assert allocated == self._allocated_pages, (
            f"allocated counter {self._allocated_pages} != {allocated} pages in allocated blocks"
        )
        # Free lists against the state array.
        for z, (zone, lists) in enumerate(zip(self.zones, self._lists, strict=True)):
            zone_free = free_mask & (zi == z)
            counts = np.bincount(orders[zone_free], minlength=NR_ORDERS)
            pages = 0
            for order, free_list in enumerate(lists):
                assert len(free_list) == counts[order], (
                    f"zone {zone.name} order {order}: list holds {len(free_list)} blocks, "
                    f"state has {counts[order]} free heads"
                )
                if free_list:
                    keys = np.fromiter(free_list, dtype=np.int64, count=len(free_list))
                    wrong = (
                        (keys < zone.start_pfn)
                        | (keys >= zone.end_pfn)
                        | (st[np.clip(keys, 0, self.end_pfn - 1)] != _FREE + order)
                    )
                    assert not wrong.any(), (
                        f"zone {zone.name} order {order}: pfn {keys[wrong][0]} on the free list "
                        "is not a free block of that order in that zone"
                    )
                pages += len(free_list) << order
            assert pages == self._free_pages[z], (
                f"zone {zone.name}: free counter {self._free_pages[z]} != {pages} listed pages"
            )
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

    def clone(self) -> PageAllocator:
        """A deep, independent copy."""
        other = PageAllocator.__new__(PageAllocator)
        other.end_pfn = self.end_pfn
        other.zones = self.zones
        other._ram = list(self._ram)
        other._ram_starts = list(self._ram_starts)
        other._zone_index = dict(self._zone_index)
        other._zone_starts = list(self._zone_starts)
        other._zone_bounds = list(self._zone_bounds)
        other._state = bytearray(self._state)
        other._lists = [[d.copy() for d in lists] for lists in self._lists]
        other._free_pages = list(self._free_pages)
        other._allocated_pages = self._allocated_pages
        other._ram_pages = self._ram_pages
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
                size = 1 << (value - (_FREE if value <= _FREE_LAST else _ALLOC))
                return (head, value) if pfn < head + size else None
        return None

    def _add_free_range(self, zi: int, start_pfn: int, end_pfn: int) -> None:
        """Put the free pages [start, end) (part of one former free block) back at list heads."""
        lists = self._lists[zi]
        state = self._state
        for pfn, order in tile_range(start_pfn, end_pfn):
            lists[order][pfn] = None
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
        block = self._block_containing(pfn)
        if block is None:
            return what + "not RAM (a hole)" if not self.is_ram(pfn) else what + "no block"
        head, value = block
        kind = "free" if value <= _FREE_LAST else "allocated"
        return what + f"not the start of an allocated block (inside the {kind} block at {head})"
