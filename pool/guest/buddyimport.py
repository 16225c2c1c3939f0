"""Start a page allocator's free lists at the fragmentation a real guest's /proc/buddyinfo shows.

buddyinfo gives, per zone, how many free blocks of each order there are (``nr_free``), not
where they are. :func:`allocator_from_buddyinfo` places them by a fixed, seeded rule:

1. Every RAM page of a zone starts allocated (owner unknown: memblock reservations, slab,
   page cache, user memory are all alike here).
2. Orders are placed largest first, 10 down to 0. For order ``o``, the candidates are the
   naturally aligned blocks of ``2^o`` pages lying wholly in the zone's RAM and not already
   taken by a larger free block.

   - Order 10 (MAX_PAGE_ORDER): blocks never merge, so ``nr_free[10]`` of the candidates are
     chosen uniformly at random.
   - Orders below 10: two free buddies of one order would merge (``__free_one_page()``), so at
     most one block of each buddy pair may be free. ``nr_free[o]`` buddy pairs are chosen
     uniformly at random among the pairs with at least one candidate; in each, the candidate
     block (a random one when both halves are candidates) is taken.

   A block whose buddy pair is half outside the zone or half a hole still counts (buddies
   never merge across a zone boundary, and hole pages are never free).
3. The chosen blocks are freed in a seeded random order (so the head of each free list is a
   random one of its blocks). No two chosen blocks of one order are buddies, so nothing
   merges and every zone ends with exactly the imported ``nr_free``.

Preserved exactly: ``nr_free`` per zone per order, hence the free page counts, buddyinfo
itself, and both fragmentation indexes (extfrag_index and unusable_index are functions of
``nr_free`` alone: pool.guest.fragmentation). Not preserved: where the free blocks are (so
which 2 MiB and 1 GiB regions a later allocation lands in is the model's guess), the order
of the free lists, and who owns the allocated pages (they are allocated blocks nobody frees;
``Churn`` started on this allocator only ever frees its own allocations). Per-cpu lists,
migratetypes and other NUMA nodes are not imported (buddyinfo does not show them): the
imported allocator has no per-cpu lists (a guest built on it adds empty ones), every pageblock
is movable and every free block is on the movable lists.

Raises ValueError when the blocks cannot be placed that way: a zone of buddyinfo the layout
lacks (or the reverse), or more blocks of an order than the zone's RAM has room for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pool.guest.buddy import PageAllocator, Zone
from pool.guest.fragmentation import parse_buddyinfo
from pool.guest.units import MAX_PAGE_ORDER, NR_ORDERS

__all__ = ["allocator_from_buddyinfo", "buddyinfo_rows"]

BuddyRows = Sequence[tuple[str, Sequence[int]]]


def buddyinfo_rows(text: str, node: int = 0) -> list[tuple[str, tuple[int, ...]]]:
    """``(zone, nr_free)`` rows of ``node`` from /proc/buddyinfo text (the model has one node;
    rows of other nodes are left out). ValueError names the line of a malformed row, a zone
    listed twice, or a node absent from the text."""
    rows: list[tuple[str, tuple[int, ...]]] = []
    nodes = set()
    for n, zone, counts in parse_buddyinfo(text):
        nodes.add(n)
        if n != node:
            continue
        if any(zone == z for z, _ in rows):
            raise ValueError(f"buddyinfo: zone {zone} of node {node} listed twice")
        rows.append((zone, counts))
    if not rows:
        found = ", ".join(str(n) for n in sorted(nodes)) or "none"
        raise ValueError(f"buddyinfo: no rows for node {node} (nodes found: {found})")
    return rows


def allocator_from_buddyinfo(
    end_pfn: int,
    ram: Sequence[tuple[int, int]],
    zones: Sequence[Zone],
    rows: BuddyRows,
    seed: int,
) -> PageAllocator:
    """A PageAllocator over ``ram`` ([start, end) pfn ranges) and ``zones`` whose free lists hold
    exactly the ``nr_free`` of ``rows`` (``(zone name, 11 counts)``), placed by the seeded rule
    of the module docstring. Every zone of the layout needs a row and every row a zone; rows of
    zones with no RAM must be all zeros."""
    allocator = PageAllocator(end_pfn, ram, zones)
    wanted = {name: tuple(int(c) for c in counts) for name, counts in rows}
    names = [zone.name for zone in allocator.zones]
    for name, counts in wanted.items():
        if len(counts) != NR_ORDERS or min(counts) < 0:
            raise ValueError(f"buddyinfo zone {name}: need {NR_ORDERS} counts >= 0, got {counts}")
        if name not in names and any(counts):
            raise ValueError(
                f"buddyinfo zone {name} has free blocks but the layout has no such zone "
                f"(zones: {', '.join(names)})"
            )
    for name in names:
        if name not in wanted:
            raise ValueError(
                f"buddyinfo lists no zone {name}, which the layout has "
                f"(buddyinfo zones: {', '.join(wanted)})"
            )
    rng = np.random.default_rng(seed)
    chosen: list[tuple[int, int]] = []
    for zone in allocator.zones:
        zone_blocks = _place_zone(allocator, zone, wanted[zone.name], rng)
        for pfn, order in zone_blocks:
            if not allocator.claim_range(pfn, 1 << order):  # one allocated block of `order`
                raise AssertionError(f"placement bug: block {pfn:#x} order {order} not free")
        chosen.extend(zone_blocks)
    # Everything else is allocated: claim what is still free, block by block.
    for zone in allocator.zones:
        for order in range(NR_ORDERS):
            for pfn in allocator.free_blocks(zone.name, order):
                allocator.claim_range(pfn, 1 << order)
    for i in rng.permutation(len(chosen)).tolist():
        allocator.free(*chosen[i])
    for zone in allocator.zones:
        got = allocator.nr_free(zone.name)
        if got != wanted[zone.name]:
            raise AssertionError(f"placement bug: zone {zone.name} nr_free {got}")
    return allocator


def _place_zone(
    allocator: PageAllocator, zone: Zone, counts: Sequence[int], rng: np.random.Generator
) -> list[tuple[int, int]]:
    """(pfn, order) of the zone's free blocks, chosen largest order first (module docstring)."""
    top = 1 << MAX_PAGE_ORDER
    lo = zone.start_pfn & ~(top - 1)
    hi = -(-zone.end_pfn // top) * top
    avail = np.zeros(hi - lo, dtype=np.bool_)
    for start, end in allocator.ram:
        s, e = max(start, zone.start_pfn), min(end, zone.end_pfn)
        if s < e:
            avail[s - lo : e - lo] = True
    total = int(avail.sum())
    need = sum(n << o for o, n in enumerate(counts))
    if need > total:
        raise ValueError(
            f"buddyinfo zone {zone.name}: {need} free pages listed, but the zone has only "
            f"{total} pages of RAM in this layout"
        )
    out: list[tuple[int, int]] = []
    for order in range(MAX_PAGE_ORDER, -1, -1):
        n = counts[order]
        if not n:
            continue
        size = 1 << order
        blocks = avail.reshape(-1, size).all(axis=1)
        if order == MAX_PAGE_ORDER:
            candidates = np.flatnonzero(blocks)
            if len(candidates) < n:
                raise _no_room(zone, order, n, len(candidates), "free aligned blocks")
            pick = rng.choice(candidates, n, replace=False)
        else:
            pairs = blocks.reshape(-1, 2)
            candidates = np.flatnonzero(pairs.any(axis=1))
            if len(candidates) < n:
                raise _no_room(zone, order, n, len(candidates), "buddy pairs with room")
            chosen = rng.choice(candidates, n, replace=False)
            halves = pairs[chosen]
            coin = rng.integers(0, 2, n)
            pick = chosen * 2 + np.where(halves.all(axis=1), coin, np.where(halves[:, 0], 0, 1))
        taken = (pick[:, None] * size + np.arange(size)).ravel()
        avail[taken] = False
        out.extend((lo + int(p) * size, order) for p in pick.tolist())
    return out


def _no_room(zone: Zone, order: int, n: int, room: int, what: str) -> ValueError:
    return ValueError(
        f"buddyinfo zone {zone.name}: cannot place {n} free blocks of order {order} without "
        f"merging: only {room} {what} left in the zone's RAM after the larger orders"
    )
