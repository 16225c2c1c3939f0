"""The sorted distinct values of a page list (or of its 2 MiB / 1 GiB region numbers).

numpy.unique is what this computes, but numpy 2.x answers integer arrays through a hash
table and then sorts the result: on a 4096-page vmalloc list that is ~260 µs, against
~20 µs for a sort and a comparison with the neighbour. The conversions of every vmalloc
buffer ask for it several times (the direct-map leaves to split, the hazard counts before
and after), so `compare` spent a fifth of its vmalloc runs here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["distinct_pages", "distinct_regions", "unique", "unique_sorted"]


def unique(values: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """np.unique(values) for a 1-D integer array: sorted, each value once."""
    return unique_sorted(np.sort(values))


def unique_sorted(s: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """unique() of an array already sorted ascending (no second sort: the region numbers of
    sorted pages, `pages >> 9`, are sorted too)."""
    if len(s) < 2:
        return s
    keep = np.empty(len(s), dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


# Enough for a free to find its allocation's entry: with 8, three frees in ten missed in
# compare's vmalloc runs (the vNIC's buffers outlive the next eight allocations) and sorted
# the pages again; with 64 every free hits (6,086 lookups, 3,050 sorts: one per area). At
# most 64 x 2 arrays of a 16 MiB area's 4096 pages: 4 MiB.
_DISTINCT_CACHED = 64

Array = npt.NDArray[np.int64]
_distinct: OrderedDict[int, tuple[Array, Array]] = OrderedDict()
_regions: OrderedDict[tuple[int, int], tuple[Array, Array]] = OrderedDict()


def _remembered(
    cache: OrderedDict[Any, tuple[Array, Array]],
    key: Any,
    source: Array,
    compute: Callable[[], Array],
    bound: int,
) -> Array:
    """What `compute` makes of `source`, kept (read-only) in `cache` for the last `bound`
    keys, least recently used out first. The entry holds `source` alive and is a hit only
    for that very array, so no other array that takes its id reads it."""
    hit = cache.get(key)
    if hit is not None and hit[0] is source:
        cache.move_to_end(key)
        return hit[1]
    value = compute()
    value.flags.writeable = False
    cache[key] = (source, value)
    if len(cache) > bound:
        cache.popitem(last=False)
    return value


def distinct_pages(pfns: Array) -> Array:
    """unique(pfns) of a page array that is never written after it is made (a vmalloc area's
    pages), remembered for the last few arrays: an area's pages are sorted once, not again
    by each conversion (decrypt, encrypt) and by each direct-map alias change. The array is
    the key (by identity, held alive by the entry, so no other array takes its id while it
    is cached); a stale entry cannot arise because the arrays given here are not mutated."""
    return _remembered(_distinct, id(pfns), pfns, lambda: unique(pfns), _DISTINCT_CACHED)


def distinct_regions(pages: Array, shift: int) -> Array:
    """unique_sorted(pages >> shift): the 2 MiB or 1 GiB regions of sorted distinct pages.
    Remembered, as distinct_pages is, for the arrays distinct_pages returns (read-only and
    owning their data: never written), so that an area's regions are computed once, not
    at each direct-map alias change; any other array is computed afresh."""
    if pages.flags.writeable or pages.base is not None:
        return unique_sorted(pages >> shift)
    return _remembered(
        _regions,
        (id(pages), shift),
        pages,
        lambda: unique_sorted(pages >> shift),
        2 * _DISTINCT_CACHED,
    )
