"""The one small protocol every shared-buffer strategy implements, and its values.

A driver (the simulator, or a daemon client) asks a strategy for a shared buffer;
the strategy takes pages from the guest and converts them. A `Buffer` is an
immutable value: id, size, owner, the PFN ranges behind it, its virtual mapping.

Life cycle of a strategy object, as `compare` drives it:
  boot()   on the pristine guest, before aging: boot-time reservations (swiotlb's
           bounce buffer, the pool's optional 1 GiB boot region);
  setup()  on the aged guest, before the first cycle: initial pool fill;
  allocate()/free() during the run; maintain(now) between events for background
           growth and shrink (what a work item or an asyncio task would do); it returns
           True when it changed state. Everything is deterministic given the guest's
           seed and the sequence of calls (with their `now`), so a journal of calls
           replayed on a fresh guest rebuilds identical state, PFN for PFN.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, overload, runtime_checkable

import attrs
import numpy as np
import numpy.typing as npt

from pool.guest import Guest
from pool.guest.units import PAGE_SIZE
from pool.guest.vmalloc import run_arrays

GPADL_FIRST_PFNS = 26  # PFNs in the first GPADL message (drivers/hv/channel.c)
GPADL_MORE_PFNS = 28  # PFNs in each following message


def gpadl_messages(npages: int) -> int:
    """Messages to hand `npages` PFNs to the host: 1 + ceil((n - 26) / 28); 16 MiB takes 147."""
    if npages <= GPADL_FIRST_PFNS:
        return 1
    return 1 + -(-(npages - GPADL_FIRST_PFNS) // GPADL_MORE_PFNS)


@attrs.frozen
class PfnRange:
    start: int
    npages: int


_START, _NPAGES = operator.attrgetter("start"), operator.attrgetter("npages")


class PageRuns:
    """The ranges of a buffer built from a page list (vmalloc's ~500 scattered runs per
    16 MiB): an immutable sequence of PfnRange over the read-only page array, computing its
    runs when first asked and a PfnRange only for the element read. Building ~500 PfnRange
    objects per allocation was a third of `compare`'s vmalloc runs; most readers (the
    host's GPADL, the invariants) want the page array, which this keeps. Equal to any
    sequence of the same ranges (a tuple of PfnRange included), and hashes as that tuple.
    A plain slotted class (no collections.abc base): daemon snapshots hold only the
    project's own plain classes (daemon.plaindata)."""

    __slots__ = ("_lens", "_pfns", "_starts")

    def __init__(self, pfns: npt.NDArray[np.int64]) -> None:
        view = np.asarray(pfns, dtype=np.int64).view()
        view.flags.writeable = False
        self._pfns = view
        self._starts: npt.NDArray[np.int64] | None = None
        self._lens: npt.NDArray[np.int64] | None = None

    def _runs(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        if self._starts is None or self._lens is None:
            self._starts, self._lens = run_arrays(self._pfns)
        return self._starts, self._lens

    @property
    def npages(self) -> int:
        return len(self._pfns)

    def pfns(self) -> npt.NDArray[np.int64]:
        """The page array, in virtual order (read-only)."""
        return self._pfns

    def pairs(self) -> list[list[int]]:
        """[[start, npages], ...]: the JSON form, in two array conversions."""
        starts, lens = self._runs()
        return [list(p) for p in zip(starts.tolist(), lens.tolist(), strict=True)]

    def __len__(self) -> int:
        return len(self._runs()[0])

    @overload
    def __getitem__(self, index: int) -> PfnRange: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[PfnRange, ...]: ...

    def __getitem__(self, index: int | slice) -> PfnRange | tuple[PfnRange, ...]:
        starts, lens = self._runs()
        if isinstance(index, slice):
            return tuple(map(PfnRange, starts[index].tolist(), lens[index].tolist()))
        return PfnRange(int(starts[index]), int(lens[index]))

    def __iter__(self) -> Iterator[PfnRange]:
        starts, lens = self._runs()
        return map(PfnRange, starts.tolist(), lens.tolist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PageRuns):
            return np.array_equal(self._pfns, other._pfns)
        if isinstance(other, tuple | list):  # the ranges of a Buffer built from PfnRange
            return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"PageRuns({len(self)} ranges, {self.npages} pages)"

    def __reduce__(self) -> tuple[type[PageRuns], tuple[npt.NDArray[np.int64]]]:
        return PageRuns, (np.array(self._pfns),)


Ranges = tuple[PfnRange, ...] | PageRuns
"""A buffer's PFN ranges in virtual order: PfnRange values, or the PageRuns of a page list."""


def pfns_of(ranges: Ranges) -> npt.NDArray[np.int64]:
    """The PFNs of `ranges` in virtual order, built in vector operations (a vmalloc buffer
    has hundreds of scattered ranges; concatenating one arange per range was slow)."""
    if isinstance(ranges, PageRuns):
        return ranges.pfns()
    if len(ranges) == 1:
        r = ranges[0]
        return np.arange(r.start, r.start + r.npages, dtype=np.int64)
    starts = np.fromiter(map(_START, ranges), dtype=np.int64, count=len(ranges))
    lens = np.fromiter(map(_NPAGES, ranges), dtype=np.int64, count=len(ranges))
    if (lens == 1).all():
        return starts
    offsets = np.cumsum(lens) - lens
    total = int(lens.sum())
    return np.repeat(starts - offsets, lens) + np.arange(total, dtype=np.int64)


@attrs.frozen
class Buffer:
    """A shared buffer handed to a driver. `ranges` are in virtual order (a tuple of
    PfnRange, or the PageRuns of a page list); `va` is the start of its contiguous mapping
    in the vmalloc space; `size` is the requested size in bytes."""

    id: int
    size: int
    owner: str
    purpose: str
    ranges: Ranges
    va: int

    @property
    def npages(self) -> int:
        # a property, not functools.cached_property: on a slotted attrs class the cached
        # one goes through a generated __getattr__ that cost more than this (daemon per
        # request: ~2 us)
        ranges = self.ranges
        if isinstance(ranges, PageRuns):
            return ranges.npages
        if len(ranges) == 1:
            return ranges[0].npages
        return sum(r.npages for r in ranges)

    @property
    def gpadl_messages(self) -> int:
        return gpadl_messages(self.npages)

    def pfns(self) -> npt.NDArray[np.int64]:
        return pfns_of(self.ranges)

    def runs(self) -> list[tuple[int, int]]:
        return [(r.start, r.npages) for r in self.ranges]

    def as_json(self) -> dict[str, Any]:
        ranges = self.ranges
        return {
            "id": self.id,
            "size": self.size,
            "owner": self.owner,
            "purpose": self.purpose,
            "npages": self.npages,
            "va": self.va,
            "gpadl_messages": self.gpadl_messages,
            "pfn_ranges": (
                ranges.pairs()
                if isinstance(ranges, PageRuns)
                else [[r.start, r.npages] for r in ranges]
            ),
        }


if TYPE_CHECKING:
    from pool.ownership import Ledger


class StrategyError(Exception):
    """Base of the errors a strategy raises on a request it refuses; state is unchanged."""

    reason: ClassVar[str] = "error"


class AllocationError(StrategyError):
    """A request that cannot be served. `reason` is a stable, machine-readable word:
    invalid_size, too_large (beyond what the strategy can ever serve in one piece),
    exhausted (pool at its maximum size), no_memory (the page allocator is out),
    conversion_failed (the pages were leaked)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # type: ignore[misc]


class UnknownBuffer(StrategyError):
    reason = "unknown_buffer"


class NotOwner(StrategyError):
    reason = "not_owner"


class DoubleFree(StrategyError):
    reason = "double_free"


@attrs.frozen
class FreeResult:
    buffer: Buffer
    leaked: bool = False  # re-encryption failed: the pages were leaked, never reused


@attrs.frozen
class StrategyStats:
    """A reading of a strategy. Bytes are shared (decrypted) memory the strategy holds.

    size_bytes: shared memory held (used + free + leaked is not included: see leaked_bytes).
    chunks: count by state: free, partial, full, leaked (strategies without chunks: {}).
    internal_fragmentation_bytes: bytes held by live buffers beyond what was requested.
    """

    name: str
    size_bytes: int = 0
    used_bytes: int = 0
    free_bytes: int = 0
    largest_free_bytes: int = 0
    buffers: int = 0
    chunks: Mapping[str, int] = attrs.field(factory=dict)
    leaked_bytes: int = 0
    internal_fragmentation_bytes: int = 0
    grows: int = 0
    shrinks: int = 0
    allocations: int = 0
    failures: int = 0
    failure_reasons: Mapping[str, int] = attrs.field(factory=dict)
    frees: int = 0

    def as_json(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        out["chunks"] = dict(self.chunks)
        out["failure_reasons"] = dict(self.failure_reasons)
        return out


class Strategy(Protocol):
    """What every strategy offers. Errors: AllocationError from allocate; UnknownBuffer,
    NotOwner and DoubleFree from free (three distinct errors, none changes any state)."""

    name: str
    guest: Guest
    # the bookkeeping of live buffers by id and by owner (pool.ownership): counts and bytes
    # per owner are the daemon's quotas' inputs
    ledger: Ledger

    def boot(self) -> None: ...

    def setup(self) -> None: ...

    def allocate(self, size: int, owner: str, purpose: str = "") -> Buffer: ...

    def free(self, buffer_id: int, owner: str) -> FreeResult: ...

    def get(self, buffer_id: int) -> Buffer: ...

    def buffers(self, owner: str | None = None) -> list[Buffer]: ...

    def maintain(self, now: float) -> bool: ...

    def stats(self) -> StrategyStats: ...

    def check_invariants(self) -> None:
        """Raise AssertionError unless the strategy is consistent with itself and with its
        guest. This is where a strategy's own rules are checked (whether two buffers may share
        a page, its size limits, ...): callers above the pool (the daemon) add only what they
        alone know (owners, leases), never a second copy of these rules."""
        ...


CHUNK_PAGE_STATES = ("free", "used", "leaked")


@attrs.frozen
class ChunkPages:
    """A run of a strategy's pre-decrypted pages, by what they hold now: free (decrypted,
    ready to hand out), used (in a live buffer) or leaked (their state is unknown after a
    failed re-encryption; never reused). `boot`: taken by a boot-time reservation (the
    pool's 1 GiB boot region, swiotlb's bounce buffer) rather than by growth. The memory map
    (pool.memmap) is drawn from these runs."""

    start: int
    npages: int
    state: str
    boot: bool = False


@runtime_checkable
class ChunkHolder(Protocol):
    """A strategy whose shared memory lives in chunks it keeps (the pool, the atomic pool,
    swiotlb). A strategy that is not one (the vmalloc strategies: every buffer comes from the
    page allocator and goes back to it) has no chunk pages: pool.memmap.chunk_pages_of."""

    def chunk_pages(self) -> list[ChunkPages]:
        """Its chunks' pages as runs, ascending and disjoint."""
        ...


def runs_of_flags(start: int, used: npt.NDArray[np.bool_], boot: bool = False) -> list[ChunkPages]:
    """ChunkPages runs of a block of pages from a per-page used flag (free where False)."""
    if not len(used):
        return []
    edges = np.flatnonzero(np.diff(used.astype(np.int8))) + 1
    bounds = [0, *edges.tolist(), len(used)]
    return [
        ChunkPages(start + a, b - a, "used" if used[a] else "free", boot)
        for a, b in itertools.pairwise(bounds)
    ]


@runtime_checkable
class Resizable(Protocol):
    """A strategy whose shared memory an operator may grow and shrink on demand (the
    SharedPool). `grow` returns the bytes added (0 if none could be taken), `shrink` the
    bytes given back to the page allocator; `now` is the strategy's clock (None: its last
    one), `force` ignores watermarks and hysteresis. Both are deterministic given the
    guest's state, as every strategy call is."""

    def grow(self, nbytes: int) -> int: ...

    def shrink(self, now: float | None = None, force: bool = False) -> int: ...


MAX_SIZE = 1 << 40  # no strategy serves more than 1 TiB in one buffer


def size_limit(own: int, why: str, configured: int | None) -> tuple[int, str]:
    """The limit a strategy enforces, and the reason its too_large message gives: its own
    (`own`, explained by `why`), or the configured largest buffer if that is lower."""
    if configured is not None and configured < own:
        return configured, f"the configured largest buffer of {configured} bytes"
    return own, why


def check_size(size: object, limit: int = MAX_SIZE) -> int:
    """Validate a requested size: a positive integer (bool refused), at most `limit`."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise AllocationError("invalid_size", f"size must be a positive integer of bytes: {size!r}")
    if size > limit:
        raise AllocationError("too_large", f"size {size} exceeds the limit of {limit} bytes")
    return size


def round_pages(size: int) -> int:
    return -(-size // PAGE_SIZE)
