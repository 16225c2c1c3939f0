"""Option 2: let drivers allocate from swiotlb, the bounce pool decrypted at boot.

Modeled on kernel/dma/swiotlb.c (one default pool, one area):

- Size: in a CoCo guest, mem_encrypt_setup_arch() / tdx_early_init() call
  swiotlb_adjust_size(clamp(6% of RAM, 64 MiB, 1 GiB)); swiotlb_adjust_size() rounds to
  whole segments (ALIGN(size >> IO_TLB_SHIFT, IO_TLB_SEGSIZE) slots). Without memory
  encryption (platform "none") the default IO_TLB_DEFAULT_SIZE, 64 MiB, stays. `size_bytes`
  overrides both (rounded the same way).
- Placement: swiotlb_memblock_alloc() -> memblock_alloc_low(bytes, PAGE_SIZE): page aligned,
  below 4 GiB, and memblock allocates top-down on x86, so the model takes the highest-addressed
  free range below 4 GiB of the (pristine) guest that fits, and ends the buffer at the top of
  it. If nothing fits, swiotlb_init_remap() retries with half the slots (kept a multiple of
  IO_TLB_SEGSIZE) down to IO_TLB_MIN_SLABS (1 MiB); below that there is no swiotlb.
- Decrypted once (swiotlb_update_mem_attributes(): one set_memory_decrypted on the whole
  buffer), counted in boot/setup; never re-encrypted, never shrunk, never grown. If that one
  conversion fails, its pages are of unknown state: the whole buffer is leaked and every
  request fails with reason "conversion_failed" (the kernel ignores the error; the model
  refuses to serve memory of unknown state).
- Slots of IO_TLB_SIZE = 2 KiB, segments of IO_TLB_SEGSIZE = 128 slots: no allocation larger
  than swiotlb_max_mapping_size() = 256 KiB, none crossing a segment boundary (the slots'
  `list` counts stop at segment ends). Allocations of PAGE_SIZE or more are page aligned
  (swiotlb_search_pool_area: "For allocations of PAGE_SIZE or larger only look for page
  aligned allocations"); smaller ones take any slot, so two buffers below 4 KiB may share a
  page (never a slot). The search is next-fit from the area's index, wrapping, as the
  kernel's is; the index moves past each allocation.

A 16 MiB request (hv_netvsc's receive buffer) fails with reason "too_large": that is the
kernel's behaviour and the model reports it, with no workaround.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from pool.guest import Guest
from pool.guest.units import PAGE_SHIFT, PAGE_SIZE, GiB, MiB
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
    runs_of_flags,
    size_limit,
)

IO_TLB_SHIFT = 11
IO_TLB_SIZE = 1 << IO_TLB_SHIFT  # 2 KiB slots
IO_TLB_SEGSIZE = 128  # slots per segment
IO_TLB_DEFAULT_SIZE = 64 * MiB
IO_TLB_MIN_SLABS = (1 * MiB) >> IO_TLB_SHIFT
MAX_MAPPING_SIZE = IO_TLB_SIZE * IO_TLB_SEGSIZE  # swiotlb_max_mapping_size(): 256 KiB
SLOTS_PER_PAGE = PAGE_SIZE // IO_TLB_SIZE
LOW_LIMIT_PFN = (4 * GiB) >> PAGE_SHIFT  # memblock_alloc_low: below 4 GiB
_ZEROS = bytes(IO_TLB_SEGSIZE)


def default_size(ram_bytes: int, encrypted: bool) -> int:
    """Bytes of the default bounce buffer: 6% of RAM clamped to [64 MiB, 1 GiB] in a CoCo
    guest, else 64 MiB; rounded up to whole 256 KiB segments."""
    size = IO_TLB_DEFAULT_SIZE
    if encrypted:
        size = min(max(ram_bytes * 6 // 100, IO_TLB_DEFAULT_SIZE), GiB)
    return _round_slots(size) * IO_TLB_SIZE


def _round_slots(size: int) -> int:
    slots = -(-size // IO_TLB_SIZE)
    return -(-slots // IO_TLB_SEGSIZE) * IO_TLB_SEGSIZE


class Swiotlb:
    """Buffers carved from swiotlb's boot-time bounce pool."""

    name = "swiotlb"

    # (a class default too: strategies pickled in daemon snapshots before the option existed)
    max_buffer_bytes: int | None = None

    def __init__(
        self, guest: Guest, size_bytes: int | None = None, max_buffer_bytes: int | None = None
    ) -> None:
        """`size_bytes`: the bounce buffer (None: the kernel's default for this guest);
        `max_buffer_bytes`: a configured largest buffer, if below the 256 KiB maximum mapping
        size."""
        self.guest = guest
        self.max_buffer_bytes = max_buffer_bytes
        if size_bytes is not None and (isinstance(size_bytes, bool) or size_bytes <= 0):
            raise ValueError(f"swiotlb size must be a positive number of bytes: {size_bytes!r}")
        self.requested_size = size_bytes
        self.ledger = Ledger()
        self.booted = False
        self.start_pfn = 0  # first page of the bounce buffer
        self.nslabs = 0  # slots in it (a multiple of IO_TLB_SEGSIZE); 0: no swiotlb
        self.usable = False  # False when boot found no memory or its conversion failed
        self.leaked_pages = 0
        self._used = bytearray()  # one byte per slot: 1 used
        self._used_slots = 0
        self._index = 0  # next-fit search start (area->index)
        self._slots: dict[int, tuple[int, int]] = {}  # buffer id -> (first slot, nslots)

    # -- life cycle -------------------------------------------------------------------------
    def boot(self) -> None:
        """Reserve and decrypt the bounce buffer (call on the pristine guest, before aging)."""
        if self.booted:
            return
        self.booted = True
        g = self.guest
        size = (
            _round_slots(self.requested_size) * IO_TLB_SIZE
            if self.requested_size is not None
            else default_size(g.config.memory_bytes, g.platform.encrypts)
        )
        nslabs = size // IO_TLB_SIZE
        placed = self._place(nslabs)
        if placed is None:
            return  # no swiotlb at all: every request fails with no_memory
        start, nslabs = placed
        npages = nslabs // SLOTS_PER_PAGE
        self.start_pfn, self.nslabs = start, nslabs
        self._used = bytearray(nslabs)
        result = g.set_memory_decrypted(start, npages)
        if not result.ok:
            self.leaked_pages = npages
            return
        self.usable = True

    def _place(self, nslabs: int) -> tuple[int, int] | None:
        """swiotlb_init_remap: claim `nslabs` slots below 4 GiB, halving on failure."""
        while nslabs >= IO_TLB_MIN_SLABS:
            npages = nslabs // SLOTS_PER_PAGE
            start = self._find_low_range(npages)
            if start is not None and self.guest.claim_range(start, npages):
                return start, nslabs
            nslabs = -(-(nslabs >> 1) // IO_TLB_SEGSIZE) * IO_TLB_SEGSIZE
        return None

    def _find_low_range(self, npages: int) -> int | None:
        """memblock top-down: the start of the highest `npages` free pages below 4 GiB."""
        alloc = self.guest.allocator
        blocks: list[tuple[int, int]] = []
        for zone in alloc.zones:
            if zone.start_pfn >= LOW_LIMIT_PFN:
                continue
            for order in range(len(alloc.nr_free(zone.name))):
                blocks.extend(
                    (pfn, pfn + (1 << order)) for pfn in alloc.free_blocks(zone.name, order)
                )
        blocks.sort()
        merged: list[list[int]] = []
        for s, e in blocks:
            if merged and merged[-1][1] == s:
                merged[-1][1] = e
            else:
                merged.append([s, e])
        for s, e in reversed(merged):
            e = min(e, LOW_LIMIT_PFN)
            if e - s >= npages:
                return e - npages
        return None

    def setup(self) -> None:
        """Nothing: swiotlb is sized and decrypted at boot. (If boot() was never called, it
        runs now, on whatever guest this is, as a late swiotlb init would.)"""
        if not self.booted:
            self.boot()

    def maintain(self, now: float) -> bool:
        """swiotlb has no background work (the model's pool is not dynamic)."""
        return False

    # -- requests ---------------------------------------------------------------------------
    def allocate(self, size: int, owner: str, purpose: str = "") -> Buffer:
        led = self.ledger
        size = led.checked_size(
            size,
            *size_limit(
                MAX_MAPPING_SIZE,
                f"swiotlb's maximum mapping size of {MAX_MAPPING_SIZE} bytes (256 KiB: "
                f"{IO_TLB_SEGSIZE} slots of {IO_TLB_SIZE} bytes, one segment); swiotlb cannot "
                "serve this buffer in one piece",
                self.max_buffer_bytes,
            ),
        )
        if not self.booted:
            self.boot()
        if not self.usable:
            if self.nslabs and self.leaked_pages:
                raise led.fail(
                    "conversion_failed",
                    "swiotlb's boot-time decryption failed: the bounce buffer is of unknown "
                    "state and was leaked",
                )
            raise led.fail("no_memory", "no swiotlb bounce buffer: nothing fit below 4 GiB at boot")
        nslots = -(-size // IO_TLB_SIZE)
        slot = self._find_slots(nslots, page_aligned=size >= PAGE_SIZE)
        if slot is None:
            raise led.fail(
                "exhausted",
                f"swiotlb buffer is full (sz: {size} bytes), total {self.nslabs} (slots), "
                f"used {self._used_slots} (slots)",
            )
        self._used[slot : slot + nslots] = b"\x01" * nslots
        self._used_slots += nslots
        self._index = (slot + nslots) % self.nslabs
        first = self.start_pfn + slot // SLOTS_PER_PAGE
        last = self.start_pfn + (slot + nslots - 1) // SLOTS_PER_PAGE
        npages = last - first + 1
        self._zero(slot, nslots, first, last)
        buf = Buffer(
            id=led.next_id(),
            size=size,
            owner=owner,
            purpose=purpose,
            ranges=(PfnRange(first, npages),),
            va=direct_map_va(self.start_pfn, slot * IO_TLB_SIZE),
        )
        led.add(buf)
        self._slots[buf.id] = (slot, nslots)
        return buf

    def _zero(self, slot: int, nslots: int, first: int, last: int) -> None:
        """Zero the buffer's pages. The model's contents are per page, so a page that another
        live buffer also occupies (two sub-page buffers side by side) is left alone: zeroing it
        would clobber the neighbour, where the kernel memsets only the new slots."""
        used = self._used
        lo, hi = first, last + 1
        head = (first - self.start_pfn) * SLOTS_PER_PAGE
        if used.find(b"\x01", head, slot) >= 0:
            lo += 1
        tail = (last - self.start_pfn + 1) * SLOTS_PER_PAGE
        if used.find(b"\x01", slot + nslots, tail) >= 0 and hi - 1 >= lo:
            hi -= 1
        if hi > lo:
            self.guest.zero([(lo, hi - lo)])

    def _find_slots(self, nslots: int, page_aligned: bool) -> int | None:
        """swiotlb_search_pool_area: next-fit from the index, wrapping; a run of free slots
        inside one segment; page-aligned start for page-sized and larger requests."""
        if nslots > self.nslabs - self._used_slots:
            return None
        align = SLOTS_PER_PAGE if page_aligned else 1
        start = -(-self._index // align) * align
        for lo, hi in ((start, self.nslabs), (0, start)):
            found = self._search(lo, hi, nslots, align)
            if found is not None:
                return found
        return None

    def _search(self, lo: int, hi: int, nslots: int, align: int) -> int | None:
        """First aligned slot in [lo, hi) starting `nslots` free slots in its segment."""
        used = self._used
        zeros = _ZEROS[:nslots]
        pos = lo
        while pos < hi:
            seg_end = (pos // IO_TLB_SEGSIZE + 1) * IO_TLB_SEGSIZE
            p = used.find(zeros, pos, seg_end)
            if p < 0 or p >= hi:
                pos = seg_end
                continue
            q = -(-p // align) * align
            if q >= hi:
                return None
            if q + nslots <= seg_end and used.find(b"\x01", q, q + nslots) < 0:
                return q
            pos = q if q > p else p + 1
        return None

    def free(self, buffer_id: int, owner: str) -> FreeResult:
        buf = self.ledger.lookup_for_free(buffer_id, owner)
        slot, nslots = self._slots.pop(buffer_id)
        self._used[slot : slot + nslots] = bytes(nslots)
        self._used_slots -= nslots
        self.ledger.remove(buffer_id)
        return FreeResult(buf)  # the slots stay decrypted: nothing converts after boot

    def get(self, buffer_id: int) -> Buffer:
        return self.ledger.get(buffer_id)

    def buffers(self, owner: str | None = None) -> list[Buffer]:
        return self.ledger.buffers(owner)

    # -- reading ----------------------------------------------------------------------------
    def _bitmap(self) -> npt.NDArray[np.uint8]:
        return np.frombuffer(bytes(self._used), dtype=np.uint8)

    def largest_free_bytes(self) -> int:
        """The largest run of free slots inside one segment, in bytes (vectorized: each
        segment gets a used sentinel, zero runs are the gaps between used slots)."""
        if not self.usable or self.nslabs == 0:
            return 0
        segs = self._bitmap().reshape(-1, IO_TLB_SEGSIZE)
        padded = np.concatenate((np.ones((len(segs), 1), np.uint8), segs), axis=1).ravel()
        ones = np.flatnonzero(np.append(padded, 1))
        return int((np.diff(ones) - 1).max(initial=0)) * IO_TLB_SIZE

    def stats(self) -> StrategyStats:
        led = self.ledger
        size = self.nslabs * IO_TLB_SIZE if self.usable else 0
        used = self._used_slots * IO_TLB_SIZE
        chunks: dict[str, int] = {"free": 0, "partial": 0, "full": 0, "leaked": 0}
        if self.usable:
            per_seg = self._bitmap().reshape(-1, IO_TLB_SEGSIZE).sum(axis=1, dtype=np.int64)
            chunks["free"] = int(np.count_nonzero(per_seg == 0))
            chunks["full"] = int(np.count_nonzero(per_seg == IO_TLB_SEGSIZE))
            chunks["partial"] = len(per_seg) - chunks["free"] - chunks["full"]
        elif self.leaked_pages:
            chunks["leaked"] = self.nslabs // IO_TLB_SEGSIZE
        return StrategyStats(
            name=self.name,
            size_bytes=size,
            used_bytes=used,
            free_bytes=size - used,
            largest_free_bytes=self.largest_free_bytes(),
            buffers=len(led),
            chunks=chunks,
            leaked_bytes=self.leaked_pages * PAGE_SIZE,
            internal_fragmentation_bytes=used - led.requested_bytes,
            allocations=led.allocations,
            failures=led.failures,
            failure_reasons=led.failure_reasons,
            frees=led.frees,
        )

    def chunk_pages(self) -> list[ChunkPages]:
        """The bounce buffer, a boot reservation, as one chunk (ChunkHolder): a page is used
        when any of its 2 KiB slots is; all leaked if its decryption failed at boot."""
        npages = self.nslabs // SLOTS_PER_PAGE
        if not npages:
            return []
        if not self.usable:
            return (
                [ChunkPages(self.start_pfn, npages, "leaked", boot=True)]
                if self.leaked_pages
                else []
            )
        per_page = self._bitmap().reshape(npages, SLOTS_PER_PAGE)
        used: npt.NDArray[np.bool_] = np.asarray(per_page.max(axis=1) > 0, dtype=np.bool_)
        return runs_of_flags(self.start_pfn, used, boot=True)

    def check_invariants(self) -> None:
        """Slots: no slot in two live buffers, the bitmap is exactly the union of the live
        buffers' slots, no buffer crosses a segment or exceeds 256 KiB, page-sized ones are
        page aligned; each buffer's pages are the pages of its slots, inside the bounce
        buffer, shared with shared direct-map aliases; the bounce buffer is held by the page
        allocator (never given back)."""
        g = self.guest
        led = self.ledger
        led.check(disjoint=False)  # sub-page buffers may share a page, never a slot
        assert set(self._slots) == {b.id for b in led.buffers()}, "slot map != buffers"
        count = np.zeros(self.nslabs, dtype=np.int64)
        for buf in led.buffers():
            slot, nslots = self._slots[buf.id]
            assert nslots == -(-buf.size // IO_TLB_SIZE), f"buffer {buf.id}: wrong slot count"
            assert nslots <= IO_TLB_SEGSIZE, f"buffer {buf.id}: above the max mapping size"
            assert slot // IO_TLB_SEGSIZE == (slot + nslots - 1) // IO_TLB_SEGSIZE, (
                f"buffer {buf.id} crosses a segment boundary"
            )
            if buf.size >= PAGE_SIZE:
                assert slot % SLOTS_PER_PAGE == 0, f"buffer {buf.id} not page aligned"
            count[slot : slot + nslots] += 1
            first = self.start_pfn + slot // SLOTS_PER_PAGE
            last = self.start_pfn + (slot + nslots - 1) // SLOTS_PER_PAGE
            assert buf.ranges == (PfnRange(first, last - first + 1),), f"buffer {buf.id} pages"
            assert buf.va == direct_map_va(self.start_pfn, slot * IO_TLB_SIZE)
            assert_pages_shared(g, buf.pfns(), f"buffer {buf.id}")
        assert (count <= 1).all(), "a slot in two live buffers"
        bitmap = self._bitmap()
        assert np.array_equal(bitmap, count.astype(np.uint8)), "slot bitmap != live buffers"
        assert self._used_slots == int(count.sum()), "used slot count drifted"
        if self.nslabs:
            npages = self.nslabs // SLOTS_PER_PAGE
            assert self.start_pfn + npages <= LOW_LIMIT_PFN, "bounce buffer above 4 GiB"
            blocks = g.allocator.claimed_blocks(self.start_pfn, npages)
            assert_never_returned(g, blocks, "swiotlb bounce buffer")
            if self.usable:
                pfns = np.arange(self.start_pfn, self.start_pfn + npages, dtype=np.int64)
                assert_pages_shared(g, pfns, "swiotlb bounce buffer")
