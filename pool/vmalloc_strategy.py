"""vzalloc + set_memory_decrypted: what hv_netvsc does today, in its two flavours.

`vmalloc-directmap` (alias=True) is the kernel's default: set_memory_decrypted() on a
vmalloc address also changes every page's direct-map alias (cpa alias processing), so each
large direct-map leaf that holds one of the scattered pages splits, permanently.

`vmalloc-alias` (alias=False) converts the vmalloc mapping only (the original 2022 patch):
no split, but every page keeps a *private* direct-map alias to a *shared* page, which a
stray access (load_unaligned_zeropad() reading past the end of the previous page) turns
into a fatal fault. Option 1 of the design (stop using load_unaligned_zeropad in CoCo
guests) is this allocator with that hazard class accepted: `accepted_hazards` says so for
reports; it is not a separate allocator.

Allocation (vzalloc): order-0 pages from the page allocator as vm_area_alloc_pages() takes
them (the bulk allocator, 100 pages a request, through the per-cpu lists), zeroed, mapped
private in the vmalloc space, then one set_memory_decrypted() on the vmalloc address. On a
conversion failure the pages' state is unknown: they are leaked (never freed; vfree is not
called), and the request fails with reason "conversion_failed". Free: set_memory_encrypted()
then vfree(); if re-encryption fails the pages are leaked (FreeResult.leaked), as hv's
channel.c does since CVE-2024-36911. No background behaviour.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import numpy.typing as npt

from pool.guest import PRIVATE, SHARED, Guest, VmArea
from pool.guest.units import PAGE_SIZE
from pool.ownership import Ledger, assert_never_returned, assert_pages_shared
from pool.strategy import (
    MAX_SIZE,
    Buffer,
    FreeResult,
    PageRuns,
    StrategyStats,
    round_pages,
    size_limit,
)


class VmallocStrategy:
    """One vzalloc'd, decrypted buffer per request; nothing kept between requests."""

    # Documentation for reports: the hazard class option 1 accepts (see the module doc).
    OPTION1_ACCEPTED_HAZARDS: ClassVar[tuple[str, ...]] = ("private_alias_to_shared",)
    OPTION1_NOTE: ClassVar[str] = (
        "option 1 (no load_unaligned_zeropad in CoCo guests) is vmalloc-alias with its "
        "private_alias_to_shared pages accepted as harmless; they stay fatal for any other "
        "stray access through the direct map"
    )

    # (a class default too: strategies pickled in daemon snapshots before the option existed)
    max_buffer_bytes: int | None = None

    def __init__(
        self,
        guest: Guest,
        alias: bool,
        name: str | None = None,
        max_buffer_bytes: int | None = None,
    ) -> None:
        """`max_buffer_bytes`: the largest buffer served (None: vmalloc's own limit, which is
        only the memory there is; pool.strategy.MAX_SIZE)."""
        self.guest = guest
        self.alias = alias
        self.max_buffer_bytes = max_buffer_bytes
        self.name = name or ("vmalloc-directmap" if alias else "vmalloc-alias")
        self.accepted_hazards: tuple[str, ...] = () if alias else self.OPTION1_ACCEPTED_HAZARDS
        self.ledger = Ledger()
        self._areas: dict[int, VmArea] = {}  # buffer id -> its (decrypted) vmalloc area
        self.leaked: list[npt.NDArray[np.int64]] = []  # page lists never given back
        self.leaked_pages = 0

    # -- life cycle -------------------------------------------------------------------------
    def boot(self) -> None:
        """Nothing reserved at boot."""

    def setup(self) -> None:
        """Nothing to fill: every request goes to the page allocator."""

    def maintain(self, now: float) -> bool:
        """No background work."""
        return False

    # -- requests ---------------------------------------------------------------------------
    def allocate(self, size: int, owner: str, purpose: str = "") -> Buffer:
        led = self.ledger
        size = led.checked_size(size, *size_limit(MAX_SIZE, "", self.max_buffer_bytes))
        npages = round_pages(size)
        g = self.guest
        pfns = g.vmalloc_pages(npages)
        if len(pfns) < npages:
            g.free_page_list(pfns)  # still private and privately mapped: safe to give back
            raise led.fail(
                "no_memory",
                f"vzalloc({size}): the page allocator ran out after {len(pfns)} of {npages} pages",
            )
        g.zero(pfns)
        area = g.vmap(pfns, shared=False)
        area, result = g.set_vmalloc_decrypted(area, alias=self.alias)
        if not result.ok:
            self._leak(pfns)
            raise led.fail(
                "conversion_failed",
                f"set_memory_decrypted failed on a {npages}-page vmalloc buffer: its pages "
                "are in an unknown state and were leaked",
            )
        buf = Buffer(
            id=led.next_id(),
            size=size,
            owner=owner,
            purpose=purpose,
            ranges=PageRuns(pfns),
            va=area.va,
        )
        led.add(buf)
        self._areas[buf.id] = area
        return buf

    def free(self, buffer_id: int, owner: str) -> FreeResult:
        buf = self.ledger.lookup_for_free(buffer_id, owner)
        g = self.guest
        area = self._areas.pop(buffer_id)
        _, result = g.set_vmalloc_encrypted(area, alias=self.alias)
        self.ledger.remove(buffer_id)
        if not result.ok:
            self._leak(area.pfns)
            return FreeResult(buf, leaked=True)
        g.vunmap(area)
        g.free_page_list(area.pfns)
        return FreeResult(buf)

    def _leak(self, pfns: npt.NDArray[np.int64]) -> None:
        """Pages of unknown state: keep them allocated (and their vmalloc area mapped) forever."""
        self.leaked.append(pfns)
        self.leaked_pages += len(pfns)

    def get(self, buffer_id: int) -> Buffer:
        return self.ledger.get(buffer_id)

    def buffers(self, owner: str | None = None) -> list[Buffer]:
        return self.ledger.buffers(owner)

    # -- reading ----------------------------------------------------------------------------
    def stats(self) -> StrategyStats:
        led = self.ledger
        used = led.used_pages * PAGE_SIZE
        return StrategyStats(
            name=self.name,
            size_bytes=used,
            used_bytes=used,
            free_bytes=0,
            largest_free_bytes=0,
            buffers=len(led),
            chunks={},
            leaked_bytes=self.leaked_pages * PAGE_SIZE,
            internal_fragmentation_bytes=used - led.requested_bytes,
            allocations=led.allocations,
            failures=led.failures,
            failure_reasons=led.failure_reasons,
            frees=led.frees,
        )

    def check_invariants(self) -> None:
        """No PFN in two live buffers; each live buffer's vmalloc area mapped, over exactly its
        pages, with a shared attribute; its pages shared; their direct-map aliases shared
        (vmalloc-directmap) or private (vmalloc-alias: the hazard, by design); leaked pages
        never back in the page allocator."""
        g = self.guest
        self.ledger.check(disjoint=True)
        assert set(self._areas) == {b.id for b in self.ledger.buffers()}, "areas != buffers"
        encrypts = g.platform.encrypts
        for buf in self.ledger.buffers():
            area = g.vmalloc.areas.get(self._areas[buf.id].id)
            assert area is not None, f"buffer {buf.id}: vmalloc area unmapped"
            pfns = buf.pfns()
            assert np.array_equal(area.pfns, pfns), f"buffer {buf.id}: area pages differ"
            assert area.va == buf.va, f"buffer {buf.id}: va differs from its area"
            if not encrypts:
                continue
            assert area.attr == SHARED, f"buffer {buf.id}: vmalloc mapping not shared"
            assert_pages_shared(g, pfns, f"buffer {buf.id}", direct_map=self.alias)
            if not self.alias:
                assert (g.direct_map.attr[pfns] == PRIVATE).all(), (
                    f"buffer {buf.id}: vmalloc-alias converted a direct-map alias"
                )
        assert self.leaked_pages == sum(len(p) for p in self.leaked), "leaked count drifted"
        for pfns in self.leaked:
            assert_never_returned(g, [(p, 0) for p in pfns.tolist()], self.name)
