"""The whole state of a PageAllocator as comparable values: every per-pfn array, the free
counts and the per-cpu lists' records. Two allocators agree exactly when these are equal
(the compiled core against the reference; a guest loaded from the aged-guest cache against
the one aged)."""

from __future__ import annotations

from pool.guest.buddy import PageAllocator


def allocator_state(a: PageAllocator) -> tuple[object, ...]:
    return (
        bytes(a._state),
        bytes(a._mt),
        bytes(a._pageblock_mt),
        bytes(a._next),
        bytes(a._prev),
        a._nr_free.tolist(),
        a._free_pages.tolist(),
        a._counters.tolist(),
        a._pcp_data.tolist(),
    )
