"""Migratetypes and pageblocks: the kernel's grouping of pages by mobility (mm/page_alloc.c, 6.1).

Every pageblock (``pageblock_order`` = 9: 2 MiB on x86-64) carries a migratetype; the free
lists of a zone are kept per order *and* per migratetype, and an allocation asks for one
migratetype (from its GFP flags, ``gfp_migratetype()``):

- ``MIGRATE_UNMOVABLE``: ``GFP_KERNEL`` without ``__GFP_MOVABLE`` — slab (non-reclaimable),
  page tables, vmalloc, driver buffers, ``alloc_pages(GFP_KERNEL, order)``.
- ``MIGRATE_MOVABLE``: page cache and anonymous memory (``GFP_HIGHUSER_MOVABLE``).
- ``MIGRATE_RECLAIMABLE``: ``__GFP_RECLAIMABLE`` slab caches — dentries, inodes.

All pageblocks are MOVABLE at boot (``memmap_init_range()`` marks each pageblock
``MIGRATE_MOVABLE``). When the lists of the requested type are empty, ``__rmqueue_fallback()``
steals from the other types in the order of ``fallbacks[]`` below; :func:`can_steal_fallback`
decides whether the stealer may also claim the rest of the pageblock's free pages (the whole
block rule of ``steal_suitable_fallback()`` lives in pool.guest.buddy, which owns the lists).

Not modeled: ``MIGRATE_HIGHATOMIC``, ``MIGRATE_CMA``, ``MIGRATE_ISOLATE`` (no high-order atomic
reserves, no CMA areas, no memory offlining), ``page_group_by_mobility_disabled`` (only set on
machines too small to group; never for the guests here).
"""

from __future__ import annotations

__all__ = [
    "FALLBACKS",
    "MIGRATETYPE_NAMES",
    "MIGRATE_MOVABLE",
    "MIGRATE_PCPTYPES",
    "MIGRATE_RECLAIMABLE",
    "MIGRATE_UNMOVABLE",
    "PAGEBLOCK_NR_PAGES",
    "PAGEBLOCK_ORDER",
    "can_steal_fallback",
    "migratetype_of",
]

MIGRATE_UNMOVABLE = 0
MIGRATE_MOVABLE = 1
MIGRATE_RECLAIMABLE = 2
MIGRATE_PCPTYPES = 3
"""The types with per-cpu lists (and the only ones the model has): include/linux/mmzone.h."""

MIGRATETYPE_NAMES = ("Unmovable", "Movable", "Reclaimable")
"""``migratetype_names[]``, as /proc/pagetypeinfo prints them."""

PAGEBLOCK_ORDER = 9  # HUGETLB_PAGE_ORDER on x86-64
PAGEBLOCK_NR_PAGES = 1 << PAGEBLOCK_ORDER

FALLBACKS: tuple[tuple[int, ...], ...] = (
    (MIGRATE_RECLAIMABLE, MIGRATE_MOVABLE),  # UNMOVABLE
    (MIGRATE_RECLAIMABLE, MIGRATE_UNMOVABLE),  # MOVABLE
    (MIGRATE_UNMOVABLE, MIGRATE_MOVABLE),  # RECLAIMABLE
)
"""``fallbacks[MIGRATE_TYPES][3]``: the types an allocation of each type falls back to, in order."""

_BY_NAME = {
    "unmovable": MIGRATE_UNMOVABLE,
    "movable": MIGRATE_MOVABLE,
    "reclaimable": MIGRATE_RECLAIMABLE,
}


def migratetype_of(name: str | int) -> int:
    """A migratetype from its name ("unmovable", "movable", "reclaimable") or number;
    ValueError for anything else."""
    if isinstance(name, int) and not isinstance(name, bool) and 0 <= name < MIGRATE_PCPTYPES:
        return name
    if isinstance(name, str) and name.lower() in _BY_NAME:
        return _BY_NAME[name.lower()]
    raise ValueError(f"unknown migratetype {name!r}: expected unmovable, movable or reclaimable")


def can_steal_fallback(order: int, start_mt: int) -> bool:
    """``can_steal_fallback()``: may an allocation of ``start_mt`` that falls back to a free
    block of ``order`` of another type also take the rest of that pageblock's free pages?

    Always for a block of a whole pageblock or more; for a block of order
    ``pageblock_order / 2`` (4) or more; and for unmovable and reclaimable requests whatever the
    size, "as fragmentation caused by those allocations polluting movable pageblocks is worse
    than movable allocations stealing from unmovable and reclaimable pageblocks"."""
    if order >= PAGEBLOCK_ORDER:
        return True
    return order >= PAGEBLOCK_ORDER // 2 or start_mt in (MIGRATE_RECLAIMABLE, MIGRATE_UNMOVABLE)
