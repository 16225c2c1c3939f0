"""The SharedPool's partial chunks, indexed by their largest free extent.

Why: a small buffer goes to the fullest partial chunk that can hold it (so that free chunks
stay whole and can be returned), and the pool used to find it by scanning every partial
chunk and recomputing each one's largest extent: on a fragmented 16 GiB pool that was 22x
(64 KiB) to 237x (1032 KiB) slower than on a 64 MiB one. Here each partial chunk sits in
the bucket of its largest free extent (1 .. 1024 pages: a chunk is at most order 10), each
bucket sorted by (free pages, entry number) with the minimum at the end (where the chunk
just chosen goes back: an append, not a shift of the whole list), and a min segment tree
over the buckets answers "the smallest key among chunks whose largest extent is >= n" in
O(log 1024); an update is a bisect in one bucket plus a tree path. Costs stay flat in the
pool's size.

The choice is exactly the one the scan made (the determinism the daemon's journal replay
relies on): the fewest free pages first, ties to the chunk that became partial earliest
(the scan's list order). `check` compares the index with a recomputation from the chunks.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any, Protocol

from pool.guest.units import MAX_PAGE_ORDER

SLOTS = 1 << MAX_PAGE_ORDER  # largest extents 1 .. 1024 pages -> leaves 0 .. 1023
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

    __slots__ = ("_buckets", "_by_seq", "_entry", "_next_seq", "_tree")

    def __init__(self) -> None:
        self._buckets: list[list[int]] = [[] for _ in range(SLOTS)]
        self._tree: list[int] = [_NONE] * (2 * SLOTS)
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

    # ---- the tree ---------------------------------------------------------------------------

    def _set_leaf(self, slot: int) -> None:
        bucket = self._buckets[slot]
        tree = self._tree
        i = slot + SLOTS
        tree[i] = -bucket[-1] if bucket else _NONE
        i >>= 1
        while i:
            a, b = tree[2 * i], tree[2 * i + 1]
            m = a if a <= b else b
            if tree[i] == m:
                break  # nothing above changes either
            tree[i] = m
            i >>= 1

    def _min_from(self, slot: int) -> int:
        """The smallest key over leaves [slot, SLOTS)."""
        tree = self._tree
        best = _NONE
        lo, hi = slot + SLOTS, 2 * SLOTS
        while lo < hi:
            if lo & 1:
                if tree[lo] < best:
                    best = tree[lo]
                lo += 1
            if hi & 1:
                hi -= 1
                if tree[hi] < best:
                    best = tree[hi]
            lo >>= 1
            hi >>= 1
        return best

    # ---- membership ---------------------------------------------------------------------------

    def add(self, chunk: Indexed) -> None:
        """`chunk` became partial: it goes after every chunk already in."""
        if chunk.pfn in self._entry:
            raise ValueError(f"chunk {chunk.pfn:#x} is already indexed")
        seq = self._next_seq
        self._next_seq += 1
        self._by_seq[seq] = chunk
        self._insert(chunk, seq)

    def _insert(self, chunk: Indexed, seq: int) -> None:
        largest, free = chunk.largest, chunk.free_pages
        if not 0 < largest <= SLOTS:
            raise ValueError(f"chunk {chunk.pfn:#x}: largest extent {largest} out of range")
        self._entry[chunk.pfn] = (seq, largest, free)
        neg = -(free << _SEQ_BITS | seq)  # buckets hold negated keys, ascending: min at the end
        bucket = self._buckets[largest - 1]
        if not bucket or neg > bucket[-1]:
            bucket.append(neg)  # a new minimum (the usual case: the chunk just chosen)
            self._set_leaf(largest - 1)
        else:
            bisect.insort(bucket, neg)

    def _delete(self, pfn: int) -> int:
        seq, largest, free = self._entry.pop(pfn)
        bucket = self._buckets[largest - 1]
        i = bisect.bisect_left(bucket, -(free << _SEQ_BITS | seq))
        del bucket[i]
        if i == len(bucket):  # it was the minimum
            self._set_leaf(largest - 1)
        return seq

    def remove(self, chunk: Indexed) -> None:
        """`chunk` is no longer partial (full, or whole free again)."""
        del self._by_seq[self._delete(chunk.pfn)]

    def update(self, chunk: Indexed) -> None:
        """`chunk` changed (pages taken or given back) and stays partial: same place in the
        entry order, new key."""
        seq, largest, free = self._entry[chunk.pfn]
        if (largest, free) != (chunk.largest, chunk.free_pages):
            self._delete(chunk.pfn)
            self._insert(chunk, seq)

    # ---- queries ----------------------------------------------------------------------------

    def best_fit(self, npages: int) -> Indexed | None:
        """The fullest partial chunk with a free extent of at least `npages` pages (ties: the
        one that became partial first), or None."""
        if not 0 < npages <= SLOTS:
            return None
        key = self._min_from(npages - 1)
        return None if key == _NONE else self._by_seq[key & _SEQ_MASK]

    def largest(self) -> int:
        """The largest free extent of any partial chunk (0: none): the highest non-empty
        bucket, found by walking down the tree."""
        tree = self._tree
        if tree[1] == _NONE:
            return 0
        i = 1
        while i < SLOTS:
            i = 2 * i + 1 if tree[2 * i + 1] != _NONE else 2 * i
        return i - SLOTS + 1

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
            assert self._tree[slot + SLOTS] == (-bucket[-1] if bucket else _NONE)
        for i in range(SLOTS - 1, 0, -1):
            assert self._tree[i] == min(self._tree[2 * i], self._tree[2 * i + 1])
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
