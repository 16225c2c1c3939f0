"""kernel/dma/pool.c: the atomic DMA pool, a gen_pool of pre-decrypted chunks.

Modeled (the GFP_KERNEL pool, atomic_pool_kernel; the DMA and DMA32 pools behave alike):

- atomic_pool_size, fixed at init: 128 KiB per GiB of RAM (totalram_pages), capped at
  MAX_ORDER_NR_PAGES (4 MiB), at least 128 KiB. setup() runs atomic_pool_expand(pool,
  atomic_pool_size) on the aged guest (dma_atomic_pool_init is a postcore initcall).
- atomic_pool_expand(pool_size): ONE block of order min(get_order(pool_size), 10), falling
  back to lower orders while the page allocator refuses (``do { page = alloc_pages(order) }
  while (!page && order-- > 0)``), decrypted with one set_memory_decrypted, added to the
  gen_pool as a chunk: a chunk is at most 4 MiB. If the decryption fails, the block's pages
  are of unknown state and the model leaks the block (counted in leaked_bytes); the kernel's
  error path would free it, which is exactly what CVE-2024-36911's fixes forbid.
- Growth: atomic_pool_resize(): when gen_pool_avail() < atomic_pool_size, expand by
  gen_pool_size() (the pool doubles, one block of at most order 10 at a time). The kernel
  runs it from a work item scheduled by a successful allocation that leaves the pool short;
  the model runs it at the end of such an allocate() and from maintain(now). A request that
  does not fit fails at once with reason "exhausted" (dma_alloc_from_pool never waits).
- genalloc: one bit per page (min_alloc_order = PAGE_SHIFT), chunks searched newest first
  (gen_pool_add puts a chunk at the head of the list), gen_pool_first_fit_order_align: an
  allocation of n pages starts at a multiple of roundup_pow_of_two(n) inside its chunk, and
  never spans chunks: anything above 4 MiB fails with reason "too_large".
- Never shrinks: a freed buffer goes back to the gen_pool, never to the page allocator, and
  nothing is re-encrypted. Buffers are zeroed (dma_alloc_from_pool memsets them).
- Buffer.va is the direct-map address of the first page (x86 has no DMA_DIRECT_REMAP).
"""

from __future__ import annotations

import attrs
import numpy as np

from pool.guest import Guest
from pool.guest.units import MAX_PAGE_ORDER, PAGE_SIZE, GiB, KiB
from pool.ownership import (
    Ledger,
    assert_never_returned,
    assert_pages_shared,
    direct_map_va,
)
from pool.strategy import (
    Buffer,
    ChunkPages,
    FreeResult,
    PfnRange,
    StrategyStats,
    round_pages,
    runs_of_flags,
    size_limit,
)

MAX_CHUNK_PAGES = 1 << MAX_PAGE_ORDER  # 1024 pages: 4 MiB
MAX_CHUNK_BYTES = MAX_CHUNK_PAGES * PAGE_SIZE


def get_order(nbytes: int) -> int:
    """The kernel's get_order(): the smallest order whose block holds `nbytes` (>= 1)."""
    npages = max(1, -(-nbytes // PAGE_SIZE))
    return (npages - 1).bit_length()


def atomic_pool_size_for(ram_pages: int) -> int:
    """dma_atomic_pool_init(): 128 KiB per GiB, capped at 4 MiB, at least 128 KiB."""
    pages = min(ram_pages // (GiB // (128 * KiB)), MAX_CHUNK_PAGES)
    return max(pages * PAGE_SIZE, 128 * KiB)


@attrs.define
class _Chunk:
    """One gen_pool chunk: a decrypted block of 2^order pages and its page bitmap."""

    start_pfn: int
    order: int
    bits: bytearray  # one byte per page: 1 allocated
    used: int = 0

    @property
    def npages(self) -> int:
        return 1 << self.order

    def find(self, npages: int) -> int | None:
        """gen_pool_first_fit_order_align: first free run of `npages` at a multiple of
        roundup_pow_of_two(npages), as a page offset in the chunk."""
        size = self.npages
        if npages > size - self.used:
            return None
        align = 1 << (npages - 1).bit_length()
        bits = self.bits
        zeros = bytes(npages)
        pos = 0
        while pos + npages <= size:
            p = bits.find(zeros, pos)  # the first free run at or after pos
            if p < 0:
                return None
            q = -(-p // align) * align
            if q == p or (q + npages <= size and bits.find(zeros, q, q + npages) == q):
                return q if q + npages <= size else None
            pos = q
        return None

    def largest_free_run(self) -> int:
        if self.used == 0:
            return self.npages
        arr = np.frombuffer(bytes(self.bits), dtype=np.uint8)
        ones = np.flatnonzero(np.concatenate(([1], arr, [1])))
        return int((np.diff(ones) - 1).max(initial=0))


class AtomicPool:
    """Buffers from a never-shrinking gen_pool of <= 4 MiB decrypted chunks."""

    name = "atomic-pool"

    # (a class default too: strategies pickled in daemon snapshots before the option existed)
    max_buffer_bytes: int | None = None

    def __init__(self, guest: Guest, max_buffer_bytes: int | None = None) -> None:
        """`max_buffer_bytes`: a configured largest buffer, if below the 4 MiB chunk limit."""
        self.guest = guest
        self.max_buffer_bytes = max_buffer_bytes
        self.ledger = Ledger()
        self.atomic_pool_size = atomic_pool_size_for(guest.allocator.ram_pages)
        self.chunks: list[_Chunk] = []  # in the order added; searched newest first
        self.leaked_blocks: list[tuple[int, int]] = []  # (pfn, order) of failed decryptions
        self.grows = 0  # successful expansions (setup's included)
        self.expand_failures = 0  # expansions the page allocator could not serve at all
        self.pool_bytes = 0  # gen_pool_size()
        self.used_pages = 0
        self.initialized = False
        self._where: dict[int, tuple[_Chunk, int, int]] = {}  # id -> (chunk, offset, npages)

    # -- life cycle -------------------------------------------------------------------------
    def boot(self) -> None:
        """Nothing at boot: the pool is created by an initcall (setup)."""

    def setup(self) -> None:
        """dma_atomic_pool_init(): the first expansion, by atomic_pool_size."""
        if self.initialized:
            return
        self.initialized = True
        self._expand(self.atomic_pool_size)

    def avail_bytes(self) -> int:
        """gen_pool_avail()."""
        return self.pool_bytes - self.used_pages * PAGE_SIZE

    def maintain(self, now: float) -> bool:
        """atomic_pool_work_fn -> atomic_pool_resize(): expand by the pool's size when the
        available memory is below atomic_pool_size. True if state changed."""
        if not self.initialized:
            return False
        if self.avail_bytes() >= self.atomic_pool_size:
            return False
        # gen_pool_size() is 0 only if every expansion so far failed: start over at the
        # initial size rather than get_order(0).
        return self._expand(self.pool_bytes or self.atomic_pool_size)

    def _expand(self, pool_size: int) -> bool:
        """atomic_pool_expand(): one block, order min(get_order(pool_size), 10) falling back to
        lower orders; decrypted; added as a chunk. True if it took memory (kept or leaked)."""
        g = self.guest
        order = min(get_order(pool_size), MAX_PAGE_ORDER)
        pfn = g.alloc_pages(order)
        while pfn is None and order > 0:
            order -= 1
            pfn = g.alloc_pages(order)
        if pfn is None:
            self.expand_failures += 1
            return False
        result = g.set_memory_decrypted(pfn, 1 << order)
        if not result.ok:
            self.leaked_blocks.append((pfn, order))
            return True
        self.chunks.append(_Chunk(pfn, order, bytearray(1 << order)))
        self.pool_bytes += (1 << order) * PAGE_SIZE
        self.grows += 1
        return True

    # -- requests ---------------------------------------------------------------------------
    def allocate(self, size: int, owner: str, purpose: str = "") -> Buffer:
        led = self.ledger
        size = led.checked_size(
            size,
            *size_limit(
                MAX_CHUNK_BYTES,
                f"the atomic pool's largest possible chunk of {MAX_CHUNK_BYTES} bytes (4 MiB, "
                f"one order-{MAX_PAGE_ORDER} block): a gen_pool allocation never spans chunks",
                self.max_buffer_bytes,
            ),
        )
        if not self.initialized:
            self.setup()
        npages = round_pages(size)
        placed = self._place(npages)
        if placed is None:
            raise led.fail(
                "exhausted",
                f"atomic pool cannot serve {size} bytes: {self.avail_bytes()} of "
                f"{self.pool_bytes} bytes available, no aligned free run of {npages} pages in "
                "one chunk (dma_alloc_from_pool does not wait for the pool to grow)",
            )
        chunk, offset = placed
        chunk.bits[offset : offset + npages] = b"\x01" * npages
        chunk.used += npages
        self.used_pages += npages
        pfn = chunk.start_pfn + offset
        self.guest.zero([(pfn, npages)])
        buf = Buffer(
            id=led.next_id(),
            size=size,
            owner=owner,
            purpose=purpose,
            ranges=(PfnRange(pfn, npages),),
            va=direct_map_va(pfn),
        )
        led.add(buf)
        self._where[buf.id] = (chunk, offset, npages)
        if self.avail_bytes() < self.atomic_pool_size:
            self.maintain(0.0)  # the work item the kernel schedules here
        return buf

    def _place(self, npages: int) -> tuple[_Chunk, int] | None:
        for chunk in reversed(self.chunks):  # gen_pool_add puts new chunks at the head
            offset = chunk.find(npages)
            if offset is not None:
                return chunk, offset
        return None

    def free(self, buffer_id: int, owner: str) -> FreeResult:
        buf = self.ledger.lookup_for_free(buffer_id, owner)
        chunk, offset, npages = self._where.pop(buffer_id)
        chunk.bits[offset : offset + npages] = bytes(npages)
        chunk.used -= npages
        self.used_pages -= npages
        self.ledger.remove(buffer_id)
        return FreeResult(buf)  # back to the gen_pool only: the pool never shrinks

    def get(self, buffer_id: int) -> Buffer:
        return self.ledger.get(buffer_id)

    def buffers(self, owner: str | None = None) -> list[Buffer]:
        return self.ledger.buffers(owner)

    # -- reading ----------------------------------------------------------------------------
    def stats(self) -> StrategyStats:
        led = self.ledger
        used = self.used_pages * PAGE_SIZE
        chunks = {"free": 0, "partial": 0, "full": 0, "leaked": len(self.leaked_blocks)}
        for c in self.chunks:
            state = "free" if c.used == 0 else "full" if c.used == c.npages else "partial"
            chunks[state] += 1
        largest = max((c.largest_free_run() for c in self.chunks), default=0)
        return StrategyStats(
            name=self.name,
            size_bytes=self.pool_bytes,
            used_bytes=used,
            free_bytes=self.pool_bytes - used,
            largest_free_bytes=largest * PAGE_SIZE,
            buffers=len(led),
            chunks=chunks,
            leaked_bytes=sum(1 << o for _, o in self.leaked_blocks) * PAGE_SIZE,
            internal_fragmentation_bytes=used - led.requested_bytes,
            grows=self.grows,
            shrinks=0,
            allocations=led.allocations,
            failures=led.failures,
            failure_reasons=led.failure_reasons,
            frees=led.frees,
        )

    def chunk_pages(self) -> list[ChunkPages]:
        """The gen_pool chunks' pages by their bitmaps, and the blocks whose decryption
        failed as leaked (ChunkHolder)."""
        out = [ChunkPages(pfn, 1 << order, "leaked") for pfn, order in self.leaked_blocks]
        for c in self.chunks:
            out += runs_of_flags(c.start_pfn, np.frombuffer(bytes(c.bits), np.uint8) != 0)
        return sorted(out, key=lambda r: r.start)

    def check_invariants(self) -> None:
        """No PFN in two live buffers; every buffer inside one chunk, order aligned in it,
        exactly its bits set; chunk bitmaps are the union of the buffers; chunks are whole
        allocated blocks of order <= 10, decrypted (pages and direct map shared); leaked blocks
        never back in the page allocator; accounting equals the sum of the buffers."""
        g = self.guest
        led = self.ledger
        led.check(disjoint=True)
        assert set(self._where) == {b.id for b in led.buffers()}, "placements != buffers"
        expected = {id(c): bytearray(c.npages) for c in self.chunks}
        for buf in led.buffers():
            chunk, offset, npages = self._where[buf.id]
            assert id(chunk) in expected, f"buffer {buf.id}: chunk not in the pool"
            assert npages == round_pages(buf.size) <= chunk.npages
            assert offset % (1 << (npages - 1).bit_length()) == 0, f"buffer {buf.id} unaligned"
            assert offset + npages <= chunk.npages, f"buffer {buf.id} spans chunks"
            assert buf.ranges == (PfnRange(chunk.start_pfn + offset, npages),)
            assert buf.va == direct_map_va(chunk.start_pfn + offset)
            expected[id(chunk)][offset : offset + npages] = b"\x01" * npages
            assert_pages_shared(g, buf.pfns(), f"buffer {buf.id}")
        for c in self.chunks:
            assert c.order <= MAX_PAGE_ORDER and c.start_pfn % c.npages == 0
            assert c.bits == expected[id(c)], f"chunk {c.start_pfn:#x}: bitmap != buffers"
            assert c.used == sum(c.bits), f"chunk {c.start_pfn:#x}: used count drifted"
            pfns = np.arange(c.start_pfn, c.start_pfn + c.npages, dtype=np.int64)
            assert_pages_shared(g, pfns, f"chunk {c.start_pfn:#x}")
        assert_never_returned(g, [(c.start_pfn, c.order) for c in self.chunks], "atomic pool")
        assert_never_returned(g, self.leaked_blocks, "atomic pool leaked block")
        assert self.used_pages == sum(c.used for c in self.chunks) == led.used_pages
        assert self.pool_bytes == sum(c.npages for c in self.chunks) * PAGE_SIZE
