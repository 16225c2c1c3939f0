"""The sorted distinct values of a page list (or of its 2 MiB / 1 GiB region numbers).

numpy.unique is what this computes, but numpy 2.x answers integer arrays through a hash
table and then sorts the result: on a 4096-page vmalloc list that is ~260 µs, against
~20 µs for a sort and a comparison with the neighbour. The conversions of every vmalloc
buffer ask for it several times (the direct-map leaves to split, the hazard counts before
and after), so `compare` spent a fifth of its vmalloc runs here.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["unique", "unique_sorted"]


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
