"""SharedPool: option 3 — memory taken in large aligned chunks, decrypted once, shared out.

Why it is built this way:
- Chunks are order-10 blocks (4 MiB, falling back to order 9, never smaller): a
  2 MiB-aligned chunk covers whole 2 MiB direct-map leaves, so decrypting it never
  splits a 2 MiB leaf (at most the 1 GiB leaf around it, once). Physically adjacent
  chunks taken together are decrypted in one conversion (one MapGPA).
- A buffer larger than a chunk is a scatter list of whole chunks plus a page-granular
  tail: the host takes a PFN list, so physical contiguity is not needed. Its virtual
  mapping is one contiguous vmap area created already shared (pgprot_decrypted),
  so serving it converts nothing.
- Small buffers (VMBus rings) are sub-allocated page-granular inside chunks, preferring
  the fullest chunk that fits, so that free chunks stay whole and can be returned.
- Pages are zeroed when handed out (vzalloc semantics): a freed page's old contents
  never reach the next owner.
- Growth happens in the background (maintain(), from a work item or an asyncio task)
  between the low and high watermarks, and synchronously inside allocate() when the
  request cannot be served from what is free; bounded by max_bytes, it never blocks.
- Shrink returns whole free chunks once free memory has stayed above the high watermark
  for the whole hysteresis period, re-encrypting them first, and never below the peak
  use seen within the last `shrink_window_seconds` plus the high watermark: memory a
  recurring peak (a vNIC detached and re-attached with bigger rings) needs again is
  kept, or every peak would cost a shrink and a growth, the conversions the pool exists
  to avoid. A chunk whose re-encryption fails is
  leaked (its pages' state is unknown: CVE-2024-36911), never returned.
- Optional boot reservation: a 1 GiB-aligned region claimed before the guest ages and
  decrypted whole, so not even a 1 GiB leaf splits: the physical limit of option 3.

Time: the pool's clock is the `now` passed to maintain(); frees are stamped with the
last one seen. Given the guest's seed and the same sequence of calls, everything is
deterministic, which the daemon relies on to rebuild state from its journal.
"""

from __future__ import annotations

import bisect
import itertools

import attrs
import numpy as np

from pool.extent_index import ExtentIndex
from pool.guest import PAGE_SHARED, SHARED, Guest
from pool.guest.units import MAX_PAGE_ORDER, PAGE_SIZE, PAGES_PER_1G, MiB
from pool.ownership import Ledger
from pool.strategy import (
    Buffer,
    ChunkPages,
    FreeResult,
    PfnRange,
    StrategyStats,
    round_pages,
)

CHUNK_ORDERS = (MAX_PAGE_ORDER, MAX_PAGE_ORDER - 1)


@attrs.define(eq=False, slots=True)
class Chunk:
    """One decrypted block. `extents` are its free page runs as sorted [offset, length];
    `largest` is the longest of them, kept as pages are taken and given back (the pool's
    ExtentIndex files partial chunks under it)."""

    pfn: int
    order: int
    extents: list[list[int]]
    free_pages: int
    leaked: bool = False
    boot: bool = False
    free_since: float = 0.0
    largest: int = -1  # -1: compute from extents

    def __attrs_post_init__(self) -> None:
        if self.largest < 0:
            self.largest = self.largest_extent()

    @property
    def npages(self) -> int:
        return 1 << self.order

    @property
    def state(self) -> str:
        if self.leaked:
            return "leaked"
        if self.free_pages == self.npages:
            return "free"
        return "full" if self.free_pages == 0 else "partial"

    def largest_extent(self) -> int:
        return max((e[1] for e in self.extents), default=0)

    def take(self, npages: int) -> int | None:
        """First fit: the pfn of `npages` contiguous free pages, or None."""
        for i, ext in enumerate(self.extents):
            length = ext[1]
            if length >= npages:
                start = ext[0]
                if length == npages:
                    del self.extents[i]
                else:
                    ext[0] += npages
                    ext[1] -= npages
                self.free_pages -= npages
                if length == self.largest:
                    self.largest = self.largest_extent()
                return self.pfn + start
        return None

    def empty(self) -> None:
        """Every page taken at once (a whole chunk in a scatter list, or leaked)."""
        self.extents = []
        self.free_pages = 0
        self.largest = 0

    def give_back(self, pfn: int, npages: int) -> None:
        """Return pages and merge with neighbouring free extents."""
        off = pfn - self.pfn
        exts = self.extents
        i = bisect.bisect_left(exts, [off, 0])
        if i < len(exts) and exts[i][0] == off + npages:  # merge with the next
            exts[i][0] = off
            exts[i][1] += npages
        else:
            exts.insert(i, [off, npages])
        if i > 0 and exts[i - 1][0] + exts[i - 1][1] == off:  # merge with the previous
            exts[i - 1][1] += exts[i][1]
            del exts[i]
            i -= 1
        if exts[i][1] > self.largest:
            self.largest = exts[i][1]
        self.free_pages += npages


@attrs.define(eq=False, slots=True)
class _Held:
    """What the pool remembers per live buffer: its pieces and its vmalloc area."""

    pieces: list[tuple[Chunk, int, int]]  # (chunk, pfn, npages)
    area_id: int


class SharedPool:
    """The pre-decrypted shared-buffer pool. Sizes in bytes."""

    def __init__(
        self,
        guest: Guest,
        name: str = "pool",
        *,
        initial_bytes: int = 64 * MiB,
        max_bytes: int = 1024 * MiB,
        low_watermark_bytes: int = 24 * MiB,
        high_watermark_bytes: int = 96 * MiB,
        grow_step_bytes: int = 32 * MiB,
        shrink_hysteresis_seconds: float = 30.0,
        shrink_window_seconds: float = 600.0,
        boot_reserve_bytes: int = 0,
        max_buffer_bytes: int = 64 * MiB,
    ) -> None:
        if not 0 <= low_watermark_bytes <= high_watermark_bytes:
            raise ValueError("watermarks must satisfy 0 <= low <= high")
        if not 0 <= initial_bytes <= max_bytes:
            raise ValueError("initial_bytes must be within [0, max_bytes]")
        if grow_step_bytes <= 0 or shrink_hysteresis_seconds < 0 or boot_reserve_bytes < 0:
            raise ValueError("grow_step_bytes must be > 0; hysteresis and boot reserve >= 0")
        if boot_reserve_bytes % (PAGE_SIZE * PAGES_PER_1G):
            raise ValueError("boot_reserve_bytes must be a multiple of 1 GiB")
        self.name = name
        self.guest = guest
        self.initial_bytes = initial_bytes
        self.max_bytes = max_bytes
        self.low_watermark_bytes = low_watermark_bytes
        self.high_watermark_bytes = high_watermark_bytes
        self.grow_step_bytes = grow_step_bytes
        self.shrink_hysteresis_seconds = shrink_hysteresis_seconds
        self.shrink_window_seconds = shrink_window_seconds
        self.boot_reserve_bytes = boot_reserve_bytes
        self.max_buffer_bytes = max_buffer_bytes
        self.ledger = Ledger()
        self.chunks: dict[int, Chunk] = {}  # by pfn, every chunk ever held (leaked too)
        self._free: dict[int, list[Chunk]] = {o: [] for o in CHUNK_ORDERS}  # whole free, LIFO
        self._partial = ExtentIndex()  # partial chunks by largest free extent
        self._leaked_chunks = 0
        self._held: dict[int, _Held] = {}
        self.size_pages = 0  # pages of non-leaked chunks
        self.free_pages = 0
        self.leaked_pages = 0
        self.grows = 0
        self.shrinks = 0
        self.now = 0.0
        self._above_high_since: float | None = None  # free > high watermark since then
        self._peak_used_pages = 0  # the most pages used within the current window
        self._peak_since = 0.0

    # ---- life cycle -----------------------------------------------------------------

    def boot(self) -> None:
        """Reserve and decrypt the boot region (if configured) on the pristine guest."""
        if not self.boot_reserve_bytes:
            return
        npages = self.boot_reserve_bytes // PAGE_SIZE
        for start in range(0, self.guest.end_pfn - npages + 1, PAGES_PER_1G):
            if self.guest.claim_range(start, npages):
                break
        else:
            raise RuntimeError(f"no free 1 GiB-aligned region of {self.boot_reserve_bytes} bytes")
        result = self.guest.set_memory_decrypted(start, npages)
        step = 1 << MAX_PAGE_ORDER
        for pfn in range(start, start + npages, step):
            self._add_chunk(pfn, MAX_PAGE_ORDER, leaked=not result.ok, boot=True)
        self.grows += 1

    def setup(self) -> None:
        """Fill the pool to its initial size (one batch of conversions)."""
        missing = self.initial_bytes - self.size_pages * PAGE_SIZE
        if missing > 0:
            self.grow(missing)

    @property
    def shortfall_bytes(self) -> int:
        """How far the pool is below its initial size: what setup() could not take because
        the page allocator had no free block of a chunk's order (an aged small guest can
        have none at all: its free memory is in blocks below order 9)."""
        return max(0, self.initial_bytes - self.size_pages * PAGE_SIZE)

    # ---- growth and shrink ---------------------------------------------------------

    def _add_chunk(self, pfn: int, order: int, leaked: bool, boot: bool = False) -> None:
        n = 1 << order
        chunk = Chunk(
            pfn,
            order,
            [] if leaked else [[0, n]],
            0 if leaked else n,
            leaked=leaked,
            boot=boot,
            free_since=self.now,
        )
        self.chunks[pfn] = chunk
        if leaked:
            self.leaked_pages += n
            self._leaked_chunks += 1
            return
        self.size_pages += n
        self.free_pages += n
        self._free[order].append(chunk)

    def grow(self, nbytes: int) -> int:
        """Take chunks for at least `nbytes` (bounded by max_bytes), decrypt them, one conversion
        per physically contiguous run. Returns the bytes added (0 if none could be taken)."""
        room = self.max_bytes - self.size_pages * PAGE_SIZE
        want = min(nbytes, room) // PAGE_SIZE
        blocks: list[tuple[int, int]] = []
        got = 0
        order_ok = list(CHUNK_ORDERS)
        while got < want and order_ok:
            order = order_ok[0]
            if got + (1 << order) > room // PAGE_SIZE:
                order_ok.pop(0)
                continue
            pfn = self.guest.alloc_pages(order)
            if pfn is None:
                order_ok.pop(0)  # fall back to order 9, never smaller
                continue
            blocks.append((pfn, order))
            got += 1 << order
        if not blocks:
            return 0
        blocks.sort()
        added = 0
        i = 0
        while i < len(blocks):  # coalesce physically adjacent blocks into one conversion
            j = i + 1
            end = blocks[i][0] + (1 << blocks[i][1])
            while j < len(blocks) and blocks[j][0] == end:
                end += 1 << blocks[j][1]
                j += 1
            result = self.guest.set_memory_decrypted(blocks[i][0], end - blocks[i][0])
            for pfn, order in blocks[i:j]:
                self._add_chunk(pfn, order, leaked=not result.ok)
                added += 0 if not result.ok else (1 << order) * PAGE_SIZE
            i = j
        self.grows += 1
        return added

    def _release(self, chunk: Chunk) -> bool:
        """Re-encrypt a whole free chunk and give it back; leak it if re-encryption fails."""
        self._free[chunk.order].remove(chunk)
        self.size_pages -= chunk.npages
        self.free_pages -= chunk.npages
        result = self.guest.set_memory_encrypted(chunk.pfn, chunk.npages)
        if not result.ok:
            chunk.leaked = True
            chunk.empty()
            self.leaked_pages += chunk.npages
            self._leaked_chunks += 1
            return False
        del self.chunks[chunk.pfn]
        self.guest.free_pages(chunk.pfn, chunk.order)
        return True

    def shrink(self, now: float | None = None, force: bool = False) -> int:
        """Return whole free chunks idle for the hysteresis while free memory stays at or above
        the high watermark and the pool at or above the window's peak use plus the high
        watermark (force: down to the initial size, ignoring watermarks, peak and hysteresis).
        Boot-region chunks stay. Returns the bytes given back to the page allocator."""
        now = self.now if now is None else now
        high = self.high_watermark_bytes // PAGE_SIZE
        floor = 0 if force else high
        min_pages = self.initial_bytes // PAGE_SIZE
        if not force:
            min_pages = max(min_pages, self._peak_used_pages + high)
        candidates = sorted(
            (c for o in CHUNK_ORDERS for c in self._free[o] if not c.boot),
            key=lambda c: (c.free_since, c.pfn),
        )
        released = 0
        did = False
        for chunk in candidates:
            if self.free_pages - chunk.npages < floor or self.size_pages - chunk.npages < min_pages:
                continue
            if not force and now - chunk.free_since < self.shrink_hysteresis_seconds:
                continue
            did = True
            if self._release(chunk):
                released += chunk.npages * PAGE_SIZE
        if did:
            self.shrinks += 1
        return released

    def maintain(self, now: float) -> bool:
        """One background step: grow below the low watermark; shrink once free memory has
        stayed above the high watermark for the hysteresis period."""
        self.now = now
        used = self.size_pages - self.free_pages
        if used >= self._peak_used_pages or now - self._peak_since > self.shrink_window_seconds:
            self._peak_used_pages = used
            self._peak_since = now
        free = self.free_pages * PAGE_SIZE
        if free < self.low_watermark_bytes and self.size_pages * PAGE_SIZE < self.max_bytes:
            self._above_high_since = None
            return self.grow(self.grow_step_bytes) > 0
        if free <= self.high_watermark_bytes:
            self._above_high_since = None
            return False
        if self._above_high_since is None:
            self._above_high_since = now
        if now - self._above_high_since < self.shrink_hysteresis_seconds:
            return False
        before = self.shrinks
        self.shrink(now)
        return self.shrinks != before

    # ---- allocation -------------------------------------------------------------------

    def _take_small(self, npages: int) -> tuple[Chunk, int] | None:
        """The fullest partial chunk that fits (ExtentIndex.best_fit), else a whole free
        chunk, the smallest order first."""
        best = self._partial.best_fit(npages)
        if best is not None:
            assert isinstance(best, Chunk)
            pfn = best.take(npages)
            assert pfn is not None
            if best.free_pages == 0:
                self._partial.remove(best)
            else:
                self._partial.update(best)
            return best, pfn
        for order in reversed(CHUNK_ORDERS):
            if npages <= (1 << order) and self._free[order]:
                chunk = self._free[order].pop()
                pfn = chunk.take(npages)
                assert pfn is not None
                if chunk.free_pages:
                    self._partial.add(chunk)
                return chunk, pfn
        return None

    def _plan_fits(self, npages: int) -> bool:
        whole = sum(len(self._free[o]) << o for o in CHUNK_ORDERS)
        if npages <= whole:
            return True
        tail_room = self._partial.largest()
        smallest = min(((1 << o) for o in CHUNK_ORDERS if self._free[o]), default=0)
        rest = npages - (whole - smallest if smallest else whole)
        return rest <= tail_room or (npages - whole) <= tail_room

    def _take(self, npages: int) -> list[tuple[Chunk, int, int]] | None:
        """Whole free chunks (largest first) then a page-granular tail; None if it cannot fit
        (and then nothing was taken)."""
        if npages > self.free_pages:
            return None
        if npages < (1 << CHUNK_ORDERS[-1]):  # small: never takes a whole chunk as such
            got = self._take_small(npages)
            return None if got is None else [(got[0], got[1], npages)]
        if not self._plan_fits(npages):
            return None
        pieces: list[tuple[Chunk, int, int]] = []
        left = npages
        for order in CHUNK_ORDERS:
            stack = self._free[order]
            while left >= (1 << order) and stack:
                chunk = stack.pop()
                chunk.empty()
                pieces.append((chunk, chunk.pfn, 1 << order))
                left -= 1 << order
        if left:
            got = self._take_small(left)
            if got is None:  # undo: give the whole chunks back
                for chunk, pfn, n in pieces:
                    chunk.give_back(pfn, n)
                    self._free[chunk.order].append(chunk)
                return None
            pieces.append((got[0], got[1], left))
        return pieces

    def allocate(self, size: int, owner: str, purpose: str = "") -> Buffer:
        """A zeroed shared buffer of `size` bytes; grows synchronously if it must."""
        size = self.ledger.checked_size(size, self.max_buffer_bytes)
        npages = round_pages(size)
        pieces = self._take(npages)
        if pieces is None:
            deficit = npages * PAGE_SIZE + self.low_watermark_bytes
            step = self.grow_step_bytes
            self.grow(-(-deficit // step) * step)
            pieces = self._take(npages)
            if pieces is None:
                if self.size_pages * PAGE_SIZE + npages * PAGE_SIZE > self.max_bytes:
                    raise self.ledger.fail(
                        "exhausted",
                        f"pool at its maximum size "
                        f"({self.max_bytes} bytes) cannot serve {size} bytes",
                    )
                raise self.ledger.fail(
                    "no_memory", f"the page allocator cannot supply chunks for {size} bytes"
                )
        self.free_pages -= npages
        used = self.size_pages - self.free_pages
        if used >= self._peak_used_pages:  # reaching the peak again renews it
            self._peak_used_pages = used
            self._peak_since = self.now
        runs: list[tuple[int, int]] = []
        for _, pfn, n in pieces:  # coalesce adjacent pieces into ranges
            if runs and runs[-1][0] + runs[-1][1] == pfn:
                runs[-1] = (runs[-1][0], runs[-1][1] + n)
            else:
                runs.append((pfn, n))
        self.guest.zero(runs)
        if len(runs) == 1:
            pfns = np.arange(runs[0][0], runs[0][0] + runs[0][1], dtype=np.int64)
        else:
            pfns = np.concatenate([np.arange(p, p + n, dtype=np.int64) for p, n in runs])
        area = self.guest.vmap(pfns, shared=True)
        buf = Buffer(
            self.ledger.next_id(),
            size,
            owner,
            purpose,
            (PfnRange(*runs[0]),) if len(runs) == 1 else tuple(itertools.starmap(PfnRange, runs)),
            area.va,
        )
        self.ledger.add(buf)
        self._held[buf.id] = _Held(pieces, area.id)
        return buf

    def free(self, buffer_id: int, owner: str) -> FreeResult:
        """Give a buffer's pages back to their chunks: no conversion, no hypercall."""
        buf = self.ledger.lookup_for_free(buffer_id, owner)
        held = self._held.pop(buffer_id)
        self.guest.vunmap(self.guest.vmalloc.areas[held.area_id])
        for chunk, pfn, n in held.pieces:
            was_full = chunk.free_pages == 0
            chunk.give_back(pfn, n)
            if chunk.free_pages == chunk.npages:
                if not was_full:
                    self._partial.remove(chunk)
                chunk.free_since = self.now
                self._free[chunk.order].append(chunk)
            elif was_full:
                self._partial.add(chunk)
            else:
                self._partial.update(chunk)
        self.free_pages += buf.npages
        self.ledger.remove(buffer_id)
        return FreeResult(buf)

    def get(self, buffer_id: int) -> Buffer:
        return self.ledger.get(buffer_id)

    def __setstate__(self, state: dict[str, object]) -> None:
        """Unpickle, also a pool pickled (in a daemon snapshot) before chunks kept their
        largest extent and partial chunks were indexed: rebuild both, in the old list's
        order (the order the allocation choice depends on)."""
        self.__dict__.update(state)
        old = state.get("_partial")
        if isinstance(old, list):
            for c in self.chunks.values():
                if getattr(c, "largest", None) is None:
                    c.largest = c.largest_extent()
            self._partial = ExtentIndex()
            for c in old:
                self._partial.add(c)
        if "_leaked_chunks" not in state:
            self._leaked_chunks = sum(c.leaked for c in self.chunks.values())

    def buffers(self, owner: str | None = None) -> list[Buffer]:
        return self.ledger.buffers(owner)

    # ---- reading ----------------------------------------------------------------------

    def stats(self) -> StrategyStats:
        """largest_free_bytes is the largest physically contiguous free run inside a chunk.
        Everything is read from counters and the index: no walk over the chunks."""
        free = sum(len(self._free[o]) for o in CHUNK_ORDERS)
        partial = len(self._partial)
        leaked = self._leaked_chunks
        chunks = {
            "free": free,
            "partial": partial,
            "full": len(self.chunks) - free - partial - leaked,
            "leaked": leaked,
        }
        whole = max((1 << o for o in CHUNK_ORDERS if self._free[o]), default=0)
        largest = max(whole, self._partial.largest())
        led = self.ledger
        return StrategyStats(
            name=self.name,
            size_bytes=self.size_pages * PAGE_SIZE,
            used_bytes=led.used_pages * PAGE_SIZE,
            free_bytes=self.free_pages * PAGE_SIZE,
            largest_free_bytes=largest * PAGE_SIZE,
            buffers=len(led),
            chunks=chunks,
            leaked_bytes=self.leaked_pages * PAGE_SIZE,
            internal_fragmentation_bytes=led.used_pages * PAGE_SIZE - led.requested_bytes,
            grows=self.grows,
            shrinks=self.shrinks,
            allocations=led.allocations,
            failures=led.failures,
            failure_reasons=led.failure_reasons,
            frees=led.frees,
        )

    def chunk_pages(self) -> list[ChunkPages]:
        """Every chunk's pages as free / used / leaked runs (ChunkHolder): a chunk's free
        extents are free, the gaps between them are in live buffers."""
        out: list[ChunkPages] = []
        for pfn in sorted(self.chunks):
            c = self.chunks[pfn]
            if c.leaked:
                out.append(ChunkPages(pfn, c.npages, "leaked", c.boot))
                continue
            at = 0
            for off, n in c.extents:
                if off > at:
                    out.append(ChunkPages(pfn + at, off - at, "used", c.boot))
                out.append(ChunkPages(pfn + off, n, "free", c.boot))
                at = off + n
            if at < c.npages:
                out.append(ChunkPages(pfn + at, c.npages - at, "used", c.boot))
        return out

    def check_invariants(self) -> None:
        """No PFN in two live buffers; every live buffer's pages shared and mapped shared by its
        own area; accounting equals the sum of buffers and chunks; chunks never overlap."""
        self.ledger.check(disjoint=True)
        g = self.guest
        live = [c for c in self.chunks.values() if not c.leaked]
        assert self.size_pages == sum(c.npages for c in live), "pool size drifted"
        assert self.free_pages == sum(c.free_pages for c in live), "free pages drifted"
        assert self.leaked_pages == sum(c.npages for c in self.chunks.values() if c.leaked)
        assert self.size_pages - self.free_pages == self.ledger.used_pages, (
            "used pages != sum of live buffers"
        )
        spans = sorted((c.pfn, c.pfn + c.npages) for c in self.chunks.values())
        for (_, e1), (s2, _) in itertools.pairwise(spans):
            assert e1 <= s2, "two chunks overlap"
        assert self._leaked_chunks == sum(c.leaked for c in self.chunks.values())
        partial = [c for c in self._partial]
        assert {c.pfn for c in partial} == {c.pfn for c in live if c.state == "partial"}
        self._partial.check(partial)
        for c in live:
            assert sum(e[1] for e in c.extents) == c.free_pages, f"chunk {c.pfn:#x} extents"
            assert c.largest == c.largest_extent(), f"chunk {c.pfn:#x} largest extent"
            if g.platform.encrypts:
                assert (g.platform.state[c.pfn : c.pfn + c.npages] == PAGE_SHARED).all(), (
                    f"chunk {c.pfn:#x} has pages that are not shared"
                )
            in_free = c in self._free[c.order]
            assert in_free == (c.state == "free"), f"chunk {c.pfn:#x} free-list membership"
        for buf in self.ledger.buffers():
            area = g.vmalloc.areas[self._held[buf.id].area_id]
            assert area.attr == SHARED, f"buffer {buf.id} mapped private"
            assert np.array_equal(area.pfns, buf.pfns()), f"buffer {buf.id} mapping mismatch"
            if g.platform.encrypts:
                assert (g.platform.state[area.pfns] == PAGE_SHARED).all(), (
                    f"buffer {buf.id} has pages that are not shared"
                )
