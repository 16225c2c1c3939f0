"""The sorted distinct values of a page list (or of its 2 MiB / 1 GiB region numbers).

numpy.unique is what this computes, but numpy 2.x answers integer arrays through a hash
table and then sorts the result: on a 4096-page vmalloc list that is ~260 µs, against
~20 µs for a sort and a comparison with the neighbour. The conversions of every vmalloc
buffer ask for it several times (the direct-map leaves to split, the hazard counts before
and after), so `compare` spent a fifth of its vmalloc runs here.
"""

from __future__ import annotations

from collections import OrderedDict

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
_distinct: OrderedDict[int, tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]] = OrderedDict()


def distinct_pages(pfns: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """unique(pfns) of a page array that is never written after it is made (a vmalloc area's
    pages), remembered for the last few arrays: an area's pages are sorted once, not again
    by each conversion (decrypt, encrypt) and by each direct-map alias change. The array is
    the key (by identity, held alive by the entry, so no other array takes its id while it
    is cached); a stale entry cannot arise because the arrays given here are not mutated."""
    key = id(pfns)
    hit = _distinct.get(key)
    if hit is not None and hit[0] is pfns:
        _distinct.move_to_end(key)
        return hit[1]
    pages = unique(pfns)
    pages.flags.writeable = False
    _distinct[key] = (pfns, pages)
    if len(_distinct) > _DISTINCT_CACHED:
        _distinct.popitem(last=False)
    return pages


_regions: OrderedDict[tuple[int, int], tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]] = (
    OrderedDict()
)


def distinct_regions(pages: npt.NDArray[np.int64], shift: int) -> npt.NDArray[np.int64]:
    """unique_sorted(pages >> shift): the 2 MiB or 1 GiB regions of sorted distinct pages.
    Remembered, as distinct_pages is, for the arrays distinct_pages returns (read-only and
    owning their data: never written), so that an area's regions are computed once, not
    at each direct-map alias change; any other array is computed afresh."""
    if pages.flags.writeable or pages.base is not None:
        return unique_sorted(pages >> shift)
    key = (id(pages), shift)
    hit = _regions.get(key)
    if hit is not None and hit[0] is pages:
        _regions.move_to_end(key)
        return hit[1]
    regions = unique_sorted(pages >> shift)
    regions.flags.writeable = False
    _regions[key] = (pages, regions)
    if len(_regions) > 2 * _DISTINCT_CACHED:
        _regions.popitem(last=False)
    return regions
