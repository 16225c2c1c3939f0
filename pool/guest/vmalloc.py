"""The vmalloc space: virtually contiguous areas over scattered pages, 4 KiB PTEs each.

An area carries its own encryption attribute (its PTEs), separate from the pages'
direct-map aliases: that separation is the whole problem this project is about.
Virtual addresses are handed out bump-pointer from VMALLOC_START with one guard
page after each area, as vmalloc does; addresses are not reused (the 32 TiB
vmalloc space does not run out in any experiment here).
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs
import numpy as np
import numpy.typing as npt

from pool.guest.buddy import PageAllocator
from pool.guest.migratetype import MIGRATE_UNMOVABLE
from pool.guest.units import PAGE_SIZE

VMALLOC_START = 0xFFFFC90000000000  # x86-64, 4-level paging
BULK_REQUEST_MAX = 100
"""vm_area_alloc_pages(): "A maximum allowed request is hard-coded and is 100 pages per call"."""
VMALLOC_ZONELIST = ("Normal", "DMA32")  # GFP_KERNEL on x86-64: Normal, then DMA32


def vm_area_alloc_pages(
    allocator: PageAllocator, nr_pages: int, cpu: int = 0
) -> npt.NDArray[np.int64]:
    """``vm_area_alloc_pages()`` for order 0 (mm/vmalloc.c, 6.1): the pages of a vmalloc area,
    GFP_KERNEL (unmovable), in the order they will be mapped.

    The bulk allocator (``alloc_pages_bulk_array_node()``) in requests of at most 100 pages;
    when a request comes back short (or empty), single-page allocations
    (``alloc_pages_node()``) for the rest, stopping at the first failure. Returns the pages
    obtained: fewer than ``nr_pages`` means vmalloc fails and the caller frees them.

    On the compiled allocator the same loop runs in one call (``Core.vm_area_alloc_pages``;
    41 calls of 100 pages and their Python lists were a quarter of a 16 MiB vzalloc); this
    loop is its reference (tests/test_buddy_differential.py drives both)."""
    core = allocator._core()
    if core is not None:
        zis, nofragment = allocator._zonelist(VMALLOC_ZONELIST)
        got = core.vm_area_alloc_pages(
            nr_pages, BULK_REQUEST_MAX, zis, nofragment, MIGRATE_UNMOVABLE, cpu
        )
        return np.frombuffer(got, dtype=np.int64)
    pages: list[int] = []
    while len(pages) < nr_pages:
        request = min(BULK_REQUEST_MAX, nr_pages - len(pages))
        got = allocator.alloc_bulk(request, VMALLOC_ZONELIST, MIGRATE_UNMOVABLE, cpu)
        pages.extend(got)
        if len(got) != request:
            break
    while len(pages) < nr_pages:
        pfn = allocator.alloc(0, VMALLOC_ZONELIST, MIGRATE_UNMOVABLE, cpu)
        if pfn is None:
            break
        pages.append(pfn)
    return np.array(pages, dtype=np.int64)


def run_arrays(
    pfns: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The physically contiguous runs of a page list, in list order, as two arrays: their
    first pfns and their lengths (vector operations: an aged guest's 16 MiB buffer has
    hundreds of runs)."""
    if len(pfns) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    breaks = np.flatnonzero(np.diff(pfns) != 1) + 1
    firsts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pfns)]))
    return pfns[firsts], ends - firsts


def runs_of(pfns: npt.NDArray[np.int64]) -> tuple[tuple[int, int], ...]:
    """Coalesce a page list into physically contiguous (start, npages) runs, in list order."""
    starts, lens = run_arrays(pfns)
    return tuple(zip(starts.tolist(), lens.tolist(), strict=True))


@attrs.frozen(eq=False)
class VmArea:
    """One vmalloc/vmap area: its address, the pages behind it (in virtual order), its attribute."""

    id: int
    va: int
    pfns: npt.NDArray[np.int64]
    attr: int  # 0 private, 1 shared

    @property
    def npages(self) -> int:
        return len(self.pfns)

    @property
    def size(self) -> int:
        return self.npages * PAGE_SIZE


class VmallocSpace:
    def __init__(self) -> None:
        self.areas: dict[int, VmArea] = {}
        self._next_va = VMALLOC_START
        self._next_id = 1

    def map(self, pfns: npt.NDArray[np.int64], attr: int) -> VmArea:
        if len(pfns) == 0:
            raise ValueError("cannot map an empty page list")
        pages = pfns.astype(np.int64, copy=False).view()
        pages.flags.writeable = False  # an area's page list never changes (uniq.distinct_pages)
        area = VmArea(self._next_id, self._next_va, pages, attr)
        self._next_id += 1
        self._next_va += (len(pfns) + 1) * PAGE_SIZE  # guard page
        self.areas[area.id] = area
        return area

    def set_attr(self, area: VmArea, attr: int) -> VmArea:
        if area.id not in self.areas:
            raise KeyError(f"vmalloc area {area.id} is not mapped")
        new = VmArea(area.id, area.va, area.pfns, attr)
        self.areas[area.id] = new
        return new

    def unmap(self, area: VmArea) -> None:
        if self.areas.pop(area.id, None) is None:
            raise KeyError(f"vmalloc area {area.id} is not mapped")

    def __iter__(self) -> Iterator[VmArea]:
        return iter(self.areas.values())

    def __len__(self) -> int:
        return len(self.areas)

    def clone(self) -> VmallocSpace:
        other = VmallocSpace()
        other.areas = dict(self.areas)
        other._next_va = self._next_va
        other._next_id = self._next_id
        return other
