"""The SharedPool's partial chunks, indexed by their largest free extent.

Why: a small buffer goes to the fullest partial chunk that can hold it (so that free chunks
stay whole and can be returned), and the pool used to find it by scanning every partial
chunk and recomputing each one's largest extent: on a fragmented 16 GiB pool that was 22x
(64 KiB) to 237x (1032 KiB) slower than on a 64 MiB one. Here each partial chunk sits in
the bucket of its largest free extent (1 .. 1024 pages: a chunk is at most order 10), each
bucket sorted by (free pages, entry number) with the minimum at the end (where the chunk
just chosen goes back: an append, not a shift of the whole list), and the buckets' minima
are kept in 32 groups of 32 with each group's minimum: "the smallest key among chunks
whose largest extent is >= n" is two C-level min() calls over at most 32 values (the
rest of n's group, the groups after it), and an update is a bisect in one bucket plus one
group's min(). Costs stay flat in the pool's size. (A binary segment tree does the same in
O(log 1024) steps, but ten steps of Python cost more than two min() calls.)

The choice is exactly the one the scan made (the determinism the daemon's journal replay
relies on): the fewest free pages first, ties to the chunk that became partial earliest
(the scan's list order). `check` compares the index with a recomputation from the chunks.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any, Protocol

from pool.guest.units import MAX_PAGE_ORDER

SLOTS = 1 << MAX_PAGE_ORDER  # largest extents 1 .. 1024 pages -> buckets 0 .. 1023
_GROUP_BITS = 5  # 32 groups of 32 buckets
_SEQ_BITS = 40
_SEQ_MASK = (1 << _SEQ_BITS) - 1
_NONE = 1 << 62  # the key of an empty bucket; a key is free_pages << 40 | entry number


class Indexed(Protocol):
    """What the index needs of a chunk (pool.shared.Chunk)."""

    pfn: int
    free_pages: int
    largest: int  # the chunk's largest free extent, in pages, kept by the chunk


class ExtentIndex:
    """Partial chunks by largest free extent; see the module docstring."""

    __slots__ = ("_buckets", "_by_seq", "_entry", "_groups", "_leaves", "_next_seq")

    def __init__(self) -> None:
        self._buckets: list[list[int]] = [[] for _ in range(SLOTS)]
        self._leaves: list[int] = [_NONE] * SLOTS  # each bucket's minimum key
        self._groups: list[int] = [_NONE] * (SLOTS >> _GROUP_BITS)  # each group's minimum
        self._by_seq: dict[int, Indexed] = {}  # entry number -> chunk, in entry order
        self._entry: dict[int, tuple[int, int, int]] = {}  # pfn -> (seq, largest, free)
        self._next_seq = 0

    def __len__(self) -> int:
        return len(self._by_seq)

    def __contains__(self, chunk: Indexed) -> bool:
        return chunk.pfn in self._entry

    def __iter__(self) -> Iterator[Indexed]:
        """The chunks in the order they became partial."""
        return iter(list(self._by_seq.values()))

    # ---- the two-level minimum ---------------------------------------------------------------

    def _set_leaf(self, slot: int) -> None:
        """Refresh a bucket's minimum, and its group's."""
        bucket = self._buckets[slot]
        value = -bucket[-1] if bucket else _NONE
        leaves = self._leaves
        if leaves[slot] == value:
            return
        leaves[slot] = value
        g = slot >> _GROUP_BITS
        self._groups[g] = min(leaves[g << _GROUP_BITS : (g + 1) << _GROUP_BITS])

    def _min_from(self, slot: int) -> int:
        """The smallest key over buckets [slot, SLOTS): the rest of slot's group, then the
        groups after it (two C-level min() calls over at most 32 values each)."""
        g = slot >> _GROUP_BITS
        here = min(self._leaves[slot : (g + 1) << _GROUP_BITS])
        after = min(self._groups[g + 1 :], default=_NONE)
        return here if here < after else after

    # ---- membership ---------------------------------------------------------------------------

    def add(self, chunk: Indexed) -> None:
        """`chunk` became partial: it goes after every chunk already in."""
        if chunk.pfn in self._entry:
            raise ValueError(f"chunk {chunk.pfn:#x} is already indexed")
        seq = self._next_seq
        self._next_seq += 1
        self._by_seq[seq] = chunk
        if self._insert(chunk, seq):
            self._set_leaf(chunk.largest - 1)

    def _insert(self, chunk: Indexed, seq: int) -> bool:
        """File `chunk` under its key; True if its bucket's minimum changed (the caller then
        refreshes that bucket's minimum)."""
        largest, free = chunk.largest, chunk.free_pages
        if not 0 < largest <= SLOTS:
            raise ValueError(f"chunk {chunk.pfn:#x}: largest extent {largest} out of range")
        self._entry[chunk.pfn] = (seq, largest, free)
        neg = -(free << _SEQ_BITS | seq)  # buckets hold negated keys, ascending: min at the end
        bucket = self._buckets[largest - 1]
        if not bucket or neg > bucket[-1]:
            bucket.append(neg)  # a new minimum (the usual case: the chunk just chosen)
            return True
        bisect.insort(bucket, neg)
        return False

    def _delete(self, pfn: int) -> tuple[int, bool]:
        """Unfile the chunk at `pfn`: (its entry number, whether its bucket's minimum
        changed)."""
        seq, largest, free = self._entry.pop(pfn)
        bucket = self._buckets[largest - 1]
        i = bisect.bisect_left(bucket, -(free << _SEQ_BITS | seq))
        del bucket[i]
        return seq, i == len(bucket)

    def remove(self, chunk: Indexed) -> None:
        """`chunk` is no longer partial (full, or whole free again)."""
        slot = self._entry[chunk.pfn][1] - 1
        seq, changed = self._delete(chunk.pfn)
        del self._by_seq[seq]
        if changed:
            self._set_leaf(slot)

    def update(self, chunk: Indexed) -> None:
        """`chunk` changed (pages taken or given back) and stays partial: same place in the
        entry order, new key; one refresh per bucket whose minimum changed."""
        seq, largest, free = self._entry[chunk.pfn]
        if (largest, free) == (chunk.largest, chunk.free_pages):
            return
        _, old_changed = self._delete(chunk.pfn)
        new_changed = self._insert(chunk, seq)
        if largest == chunk.largest:
            if old_changed or new_changed:
                self._set_leaf(largest - 1)
            return
        if old_changed:
            self._set_leaf(largest - 1)
        if new_changed:
            self._set_leaf(chunk.largest - 1)

    # ---- queries ----------------------------------------------------------------------------

    def best_fit(self, npages: int) -> Indexed | None:
        """The fullest partial chunk with a free extent of at least `npages` pages (ties: the
        one that became partial first), or None."""
        if not self._by_seq or not 0 < npages <= SLOTS:
            return None
        key = self._min_from(npages - 1)
        return None if key == _NONE else self._by_seq[key & _SEQ_MASK]

    def largest(self) -> int:
        """The largest free extent of any partial chunk (0: none): the highest non-empty
        bucket, found from the last non-empty group."""
        groups, leaves = self._groups, self._leaves
        for g in range(len(groups) - 1, -1, -1):
            if groups[g] != _NONE:
                for slot in range(((g + 1) << _GROUP_BITS) - 1, (g << _GROUP_BITS) - 1, -1):
                    if leaves[slot] != _NONE:
                        return slot + 1
        return 0

    def check(self, partial: list[Indexed]) -> None:
        """Assert the index equals one rebuilt from `partial` (the chunks that are partial, in
        the order they became so), and that every query answers what a scan would."""
        assert list(self._by_seq.values()) == partial, "partial set or its order differs"
        for chunk in partial:
            _, largest, free = self._entry[chunk.pfn]
            assert (largest, free) == (chunk.largest, chunk.free_pages), (
                f"chunk {chunk.pfn:#x} indexed under a stale key"
            )
        assert len(self._entry) == len(partial), "index holds chunks that are not partial"
        for slot, bucket in enumerate(self._buckets):
            assert bucket == sorted(bucket), f"bucket {slot + 1} unsorted"
            assert self._leaves[slot] == (-bucket[-1] if bucket else _NONE)
        for g, value in enumerate(self._groups):
            assert value == min(self._leaves[g << _GROUP_BITS : (g + 1) << _GROUP_BITS])
        assert self.largest() == max((c.largest for c in partial), default=0)
        for n in sorted(
            {1, SLOTS} | {c.largest for c in partial} | {c.largest + 1 for c in partial}
        ):
            fits = [c for c in partial if c.largest >= n]
            want = min(fits, key=lambda c: c.free_pages) if fits else None  # first minimum
            assert self.best_fit(n) is want, f"best fit for {n} pages differs from a scan"


class ScanIndex:
    """The bookkeeping ExtentIndex replaced, kept as its reference: a list in the order
    chunks became partial, scanned on every query with each chunk's largest extent
    recomputed from its extents (O(partial chunks x extents)). The differential test in
    tests/test_shared_pool.py and bench/bench_pool.py's "before" figures plug it into a
    SharedPool in place of the index."""

    def __init__(self) -> None:
        self.chunks: list[Any] = []

    def add(self, chunk: Any) -> None:
        self.chunks.append(chunk)

    def remove(self, chunk: Any) -> None:
        self.chunks.remove(chunk)

    def update(self, chunk: Any) -> None:
        """Nothing to do: the scan reads the chunks as they are."""

    def best_fit(self, npages: int) -> Any:
        best = None
        for c in self.chunks:  # fullest partial chunk that fits, the first of equals
            if (
                c.free_pages >= npages
                and (best is None or c.free_pages < best.free_pages)
                and c.largest_extent() >= npages
            ):
                best = c
        return best

    def largest(self) -> int:
        return max((int(c.largest_extent()) for c in self.chunks), default=0)

    def __len__(self) -> int:
        return len(self.chunks)

    def __contains__(self, chunk: Any) -> bool:
        return chunk in self.chunks

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self.chunks))

    def check(self, partial: list[Any]) -> None:
        assert partial == self.chunks
