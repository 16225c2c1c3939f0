"""Bookkeeping every strategy shares: live buffers by id, ownership, the three free errors,
the monotonic buffer-id counter, and the allocation / failure / free counters.

A strategy owns one `Ledger`. The allocation path is::

    size = ledger.checked_size(size)    # invalid_size / too_large, counted and raised
    ...take memory...                   # on refusal: raise ledger.fail("exhausted", "...")
    buf = Buffer(id=ledger.next_id(), ...)
    ledger.add(buf)                     # counts the allocation

and the free path::

    buf = ledger.lookup_for_free(buffer_id, owner)   # UnknownBuffer / NotOwner / DoubleFree;
                                                     # raises before any state changes
    ...give the memory back (or leak it)...
    ledger.remove(buffer_id)                          # counts the free, remembers the id

`lookup_for_free` never changes state, so a refused free leaves the strategy and the guest
exactly as they were. Ids are never reused, so "freed before" (DoubleFree) is told apart from
"never existed" (UnknownBuffer) for the life of the ledger.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from pool.guest import PAGE_SHARED, SHARED, Guest
from pool.guest.units import PAGE_SHIFT
from pool.strategy import (
    MAX_SIZE,
    AllocationError,
    Buffer,
    DoubleFree,
    NotOwner,
    UnknownBuffer,
    check_size,
)

PAGE_OFFSET = 0xFFFF888000000000  # x86-64 direct map base (4-level paging, no KASLR)


def direct_map_va(pfn: int, offset: int = 0) -> int:
    """The direct-map (linear map) address of page `pfn` plus `offset` bytes: page_to_virt()."""
    return PAGE_OFFSET + (pfn << PAGE_SHIFT) + offset


class Ledger:
    """Live buffers of one strategy, keyed by id, with ownership checks and counters."""

    __slots__ = (
        "_added",
        "_by_id",
        "_by_owner",
        "_failure_reasons",
        "_in_id_order",
        "_next",
        "_owner_bytes",
        "allocations",
        "failures",
        "frees",
        "requested_bytes",
        "used_pages",
    )

    def __init__(self, first_id: int = 1) -> None:
        self._by_id: dict[int, Buffer] = {}
        # the same buffers by owner, so that one owner's listing, count and bytes, and
        # dropping an owner, cost that owner's buffers, not everyone's (262,144 buffers of
        # one client made another's listing scan them all)
        self._by_owner: dict[str, dict[int, Buffer]] = {}
        self._owner_bytes: dict[str, int] = {}
        # True while _by_id's insertion order is id order (ids from next_id() only grow), so
        # buffers() need not sort: sorting 100k live buffers per call took 8.5 ms.
        self._in_id_order = True
        # Every id ever added, as sorted disjoint [start, end) runs: "freed" is "added and not
        # live". Ids come from a counter, so this stays a handful of runs however many buffers
        # come and go (a set of freed ids grew by ~70 bytes per free, for the ledger's life,
        # and into every daemon snapshot).
        self._added: list[list[int]] = []
        self._next = first_id
        self._failure_reasons: dict[str, int] = {}
        self.allocations = 0  # successful allocations (calls to add)
        self.failures = 0  # refused allocations (calls to record_failure / fail)
        self.frees = 0  # completed frees (calls to remove), leaked or not
        self.used_pages = 0  # Σ buffer.npages over live buffers
        self.requested_bytes = 0  # Σ buffer.size over live buffers

    # -- ids -------------------------------------------------------------------------------
    def next_id(self) -> int:
        """A fresh buffer id, never handed out before by this ledger. Consumed even if the
        caller then fails to allocate (ids stay unique; gaps are harmless)."""
        bid = self._next
        self._next += 1
        return bid

    @property
    def peek_next_id(self) -> int:
        return self._next

    # -- live buffers ----------------------------------------------------------------------
    def add(self, buffer: Buffer) -> None:
        """Register a freshly allocated buffer and count the allocation."""
        bid = buffer.id
        if bid in self._by_id or self._was_added(bid):
            raise ValueError(f"buffer id {bid} was already used")
        self._mark_added(bid)
        if bid >= self._next:  # an id not from next_id(): keep the counter ahead of it
            self._next = bid + 1
        if self._by_id and bid < next(reversed(self._by_id)):
            self._in_id_order = False
        self._by_id[bid] = buffer
        self._by_owner.setdefault(buffer.owner, {})[bid] = buffer
        self._owner_bytes[buffer.owner] = self._owner_bytes.get(buffer.owner, 0) + buffer.size
        self.allocations += 1
        self.used_pages += buffer.npages
        self.requested_bytes += buffer.size

    def lookup_for_free(self, buffer_id: int, owner: str) -> Buffer:
        """The live buffer `buffer_id` if `owner` may free it. Raises, without changing any
        state: DoubleFree (freed before), UnknownBuffer (never allocated here), NotOwner."""
        buf = self._by_id.get(buffer_id)
        if buf is None:
            if self._was_added(buffer_id):
                raise DoubleFree(f"buffer {buffer_id} was already freed")
            raise UnknownBuffer(f"no buffer with id {buffer_id!r}")
        if buf.owner != owner:
            raise NotOwner(f"buffer {buffer_id} belongs to {buf.owner!r}, not {owner!r}")
        return buf

    def remove(self, buffer_id: int) -> Buffer:
        """Forget a live buffer (after lookup_for_free), count the free (its id stays known as
        added, hence freed)."""
        buf = self._by_id.pop(buffer_id)
        mine = self._by_owner[buf.owner]
        del mine[buffer_id]
        self._owner_bytes[buf.owner] -= buf.size
        if not mine:
            del self._by_owner[buf.owner]
            del self._owner_bytes[buf.owner]
        self.frees += 1
        self.used_pages -= buf.npages
        self.requested_bytes -= buf.size
        return buf

    def get(self, buffer_id: int) -> Buffer:
        """The live buffer `buffer_id`; UnknownBuffer if it is not live (freed or never)."""
        buf = self._by_id.get(buffer_id)
        if buf is None:
            state = "was freed" if self._was_added(buffer_id) else "does not exist"
            raise UnknownBuffer(f"buffer {buffer_id!r} {state}")
        return buf

    def was_freed(self, buffer_id: int) -> bool:
        return buffer_id not in self._by_id and self._was_added(buffer_id)

    def _was_added(self, bid: object) -> bool:
        if not isinstance(bid, int):
            return False
        runs = self._added
        if not runs or bid >= runs[-1][1]:
            return False  # beyond every id given so far: the usual case of add()
        i = bisect.bisect_right(runs, bid, key=lambda r: r[0]) - 1
        return i >= 0 and runs[i][0] <= bid < runs[i][1]

    def _mark_added(self, bid: int) -> None:
        runs = self._added
        if runs and runs[-1][1] == bid:  # the usual case: the next id of the counter
            runs[-1][1] += 1
            return
        i = bisect.bisect_right(runs, bid, key=lambda r: r[0])
        runs.insert(i, [bid, bid + 1])
        if i + 1 < len(runs) and runs[i + 1][0] == bid + 1:  # merge with the next run
            runs[i][1] = runs.pop(i + 1)[1]
        if i > 0 and runs[i - 1][1] == bid:  # merge with the previous run
            runs[i - 1][1] = runs.pop(i)[1]

    def __setstate__(self, state: Any) -> None:
        """Unpickle, also a ledger pickled (in a daemon snapshot) with a set of freed ids."""
        dict_state, slots = state if isinstance(state, tuple) else (state, None)
        values = {**(dict_state or {}), **(slots or {})}
        freed = values.pop("_freed", None)
        for key, value in values.items():
            setattr(self, key, value)
        ids = list(self._by_id)
        self._in_id_order = ids == sorted(ids)
        self._by_owner, self._owner_bytes = {}, {}
        for buf in self._by_id.values():
            self._by_owner.setdefault(buf.owner, {})[buf.id] = buf
            self._owner_bytes[buf.owner] = self._owner_bytes.get(buf.owner, 0) + buf.size
        if freed is not None:
            self._added = []
            for bid in sorted(set(freed) | set(self._by_id)):
                self._mark_added(bid)

    def buffers(self, owner: str | None = None) -> list[Buffer]:
        """Live buffers (of `owner`, or all), in id order; O(that owner's buffers)."""
        source = self._by_id if owner is None else self._by_owner.get(owner, {})
        if self._in_id_order:
            return list(source.values())
        return sorted(source.values(), key=lambda b: b.id)

    def count(self, owner: str | None = None) -> int:
        """How many live buffers (of `owner`, or all): O(1)."""
        if owner is None:
            return len(self._by_id)
        return len(self._by_owner.get(owner, ()))

    def owner_bytes(self, owner: str) -> int:
        """Σ size of `owner`'s live buffers (its quota use): O(1)."""
        return self._owner_bytes.get(owner, 0)

    def owners(self) -> set[str]:
        return set(self._by_owner)

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, buffer_id: object) -> bool:
        return buffer_id in self._by_id

    def __iter__(self) -> Iterator[Buffer]:
        return iter(self.buffers())

    # -- failures --------------------------------------------------------------------------
    def record_failure(self, reason: str) -> None:
        self.failures += 1
        self._failure_reasons[reason] = self._failure_reasons.get(reason, 0) + 1

    def checked_size(self, size: object, limit: int = MAX_SIZE, why: str = "") -> int:
        """`size` validated by pool.strategy.check_size against `limit` (the most the strategy
        can ever serve in one piece; `why` explains it in the too_large message); a refusal is
        counted, then raised."""
        try:
            return check_size(size, limit)
        except AllocationError as err:
            if why and err.reason == "too_large":
                err = AllocationError("too_large", f"{size} bytes exceed {why}")
            raise self.fail(err) from None

    def fail(self, reason: str | AllocationError, message: str = "") -> AllocationError:
        """Count a refused allocation and return the error to raise: ``raise ledger.fail(...)``.
        Pass either (reason, message) or an AllocationError already built (e.g. check_size's)."""
        err = reason if isinstance(reason, AllocationError) else AllocationError(reason, message)
        self.record_failure(err.reason)
        return err

    @property
    def failure_reasons(self) -> Mapping[str, int]:
        """A copy of the failure counts by reason."""
        return dict(self._failure_reasons)

    # -- checks ----------------------------------------------------------------------------
    def all_pfns(self) -> npt.NDArray[np.int64]:
        """Every PFN of every live buffer (with repetitions if buffers overlap)."""
        if not self._by_id:
            return np.empty(0, dtype=np.int64)
        return np.concatenate([b.pfns() for b in self._by_id.values()])

    def check(self, *, disjoint: bool = True) -> None:
        """Assert the ledger's own consistency: the running totals equal the sums over live
        buffers, ids below the counter, freed and live ids disjoint; and, if `disjoint`, that no
        PFN belongs to two live buffers (strategies serving sub-page buffers pass False)."""
        bufs = list(self._by_id.values())
        assert self.used_pages == sum(b.npages for b in bufs), "used_pages drifted"
        assert self.requested_bytes == sum(b.size for b in bufs), "requested_bytes drifted"
        assert all(b.id < self._next for b in bufs), "a live id is not below the id counter"
        assert all(self._was_added(bid) for bid in self._by_id), "a live id was never added"
        runs = self._added
        assert all(a[1] < b[0] for a, b in itertools.pairwise(runs)), "id runs overlap"
        assert all(bid == b.id for bid, b in self._by_id.items()), "a buffer under a wrong id"
        ids = list(self._by_id)
        assert not self._in_id_order or ids == sorted(ids), "ledger claims id order wrongly"
        by_owner: dict[str, dict[int, Buffer]] = {}
        for b in bufs:
            by_owner.setdefault(b.owner, {})[b.id] = b
        assert self._by_owner == by_owner, "the owner index != the live buffers"
        assert self._owner_bytes == {
            o: sum(b.size for b in mine.values()) for o, mine in by_owner.items()
        }, "bytes per owner drifted"
        assert self.allocations - self.frees == len(bufs), "allocations - frees != live buffers"
        assert self.failures == sum(self._failure_reasons.values()), "failure counts drifted"
        if disjoint and bufs:
            pfns = self.all_pfns()
            uniq, counts = np.unique(pfns, return_counts=True)
            dup = uniq[counts > 1]
            assert dup.size == 0, f"PFNs in two live buffers: {dup[:8].tolist()}"


# -- checks every strategy's check_invariants() shares ----------------------------------------
def assert_pages_shared(
    guest: Guest, pfns: npt.NDArray[np.int64], what: str, direct_map: bool = True
) -> None:
    """On an encrypting platform: every page of `pfns` is shared, and (if `direct_map`) its
    direct-map alias is mapped shared. Nothing to check on platform "none"."""
    if not guest.platform.encrypts or len(pfns) == 0:
        return
    state = guest.platform.state[pfns]
    bad = pfns[state != PAGE_SHARED]
    assert bad.size == 0, f"{what}: pages not shared: {bad[:8].tolist()}"
    if direct_map:
        attr = guest.direct_map.attr[pfns]
        bad = pfns[attr != SHARED]
        assert bad.size == 0, f"{what}: direct-map aliases not shared: {bad[:8].tolist()}"


def assert_never_returned(guest: Guest, blocks: list[tuple[int, int]], what: str) -> None:
    """Leaked blocks (pfn, order) are still allocated in the page allocator: a page of unknown
    state never went back to the free lists (CVE-2024-36911)."""
    alloc = guest.allocator
    for pfn, order in blocks:
        assert alloc.allocated_order(pfn) == order, (
            f"{what}: leaked block {pfn:#x} order {order} is no longer allocated"
        )
