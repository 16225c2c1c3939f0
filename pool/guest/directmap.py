"""The kernel's direct map: every RAM page mapped once, with the largest leaves that fit.

Attribute changes follow arch/x86/mm/pat/set_memory.c (__change_page_attr,
__should_split_large_page): a large leaf is kept when the change covers the whole
aligned leaf, or when the leaf already carries the new attribute; otherwise it is
split, 1 GiB -> 512 x 2 MiB (a level-3 split) or 2 MiB -> 512 x 4 KiB (a level-2
split). Each split allocates one page-table page and does a global TLB flush, and
none is ever undone on this path.

The only attribute modeled is the encryption bit (0 private, 1 shared). Per-page
state is one byte per page in numpy arrays; leaf structure is one byte per 2 MiB
and per 1 GiB region. A leaf's pages always carry the same attribute, so a leaf's
attribute is the attribute of its first page.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence

import attrs
import numpy as np
import numpy.typing as npt

from pool.guest.uniq import distinct_regions, unique
from pool.guest.units import PAGE_SIZE, PAGES_PER_1G, PAGES_PER_2M

PRIVATE = 0
SHARED = 1

# Per-2MiB-region mapping level.
IN_1G = 0  # covered by a 1 GiB leaf
LEAF_2M = 1  # a 2 MiB leaf
LEAF_4K = 2  # 4 KiB leaves (only the RAM pages of the region are mapped)
NO_RAM = 3  # nothing mapped

_SHIFT_2M = 9
_SHIFT_1G = 18


@attrs.frozen
class Leaf:
    """A run of identical direct-map leaves: start pfn, pages, leaf size name, attribute."""

    start_pfn: int
    npages: int
    size: str  # "4k", "2M" or "1G"
    attr: int


@attrs.frozen
class SplitCounts:
    level2: int = 0
    level3: int = 0


class DirectMap:
    """The direct map of a guest with RAM in `ram` pfn ranges (holes unmapped)."""

    def __init__(self, end_pfn: int, ram: Sequence[tuple[int, int]]) -> None:
        self.end_pfn = end_pfn
        n2m = -(-end_pfn // PAGES_PER_2M)
        n1g = -(-end_pfn // PAGES_PER_1G)
        self.ram = np.zeros(n2m * PAGES_PER_2M, dtype=np.bool_)
        for start, end in ram:
            if not 0 <= start <= end <= end_pfn:
                raise ValueError(f"RAM range [{start:#x}, {end:#x}) outside [0, {end_pfn:#x})")
            self.ram[start:end] = True
        self.attr = np.zeros(n2m * PAGES_PER_2M, dtype=np.uint8)
        ram_per_2m = self.ram.reshape(n2m, PAGES_PER_2M).sum(axis=1)
        self._ram_per_2m = ram_per_2m
        self.level = np.where(
            ram_per_2m == PAGES_PER_2M, LEAF_2M, np.where(ram_per_2m == 0, NO_RAM, LEAF_4K)
        ).astype(np.uint8)
        padded = np.full(n1g * 512, NO_RAM, dtype=np.uint8)
        padded[:n2m] = self.level
        self.is_1g = (padded.reshape(n1g, 512) == LEAF_2M).all(axis=1).astype(np.uint8)
        for g in np.flatnonzero(self.is_1g):
            self.level[g * 512 : (g + 1) * 512] = IN_1G
        self.ram_pages = int(self.ram.sum())
        self.level2_splits = 0
        self.level3_splits = 0
        self._count_leaves()
        self._boot_1g = self.n1g
        self._boot_4k_regions = int(np.count_nonzero(self.level == LEAF_4K))

    @classmethod
    def from_leaves(cls, end_pfn: int, leaves: Iterable[Leaf]) -> DirectMap:
        """A direct map laid out exactly as `leaves` (e.g. imported from a kernel page-table
        dump) instead of with the largest leaves that fit. RAM is the union of the leaves;
        pfns no leaf covers are holes. The layout counts as the boot state: its 4 KiB regions
        and its 2 MiB leaves inside fully-RAM GiBs are not splits (the split counters start
        at 0, like /proc/vmstat after boot).

        Each leaf run must be aligned to its size ("1G": 1 GiB-aligned start and length,
        "2M": 2 MiB, "4k": any pages), runs must not overlap, and attr must be PRIVATE or
        SHARED. ValueError names the offending run."""
        runs = sorted(leaves, key=lambda leaf: leaf.start_pfn)
        granule = {"4k": 1, "2M": PAGES_PER_2M, "1G": PAGES_PER_1G}
        ram: list[tuple[int, int]] = []
        previous_end = 0
        for leaf in runs:
            step = granule.get(leaf.size)
            end = leaf.start_pfn + leaf.npages
            what = f"leaf run [{leaf.start_pfn:#x}, {end:#x}) {leaf.size}"
            if step is None:
                raise ValueError(f"{what}: size must be 4k, 2M or 1G")
            if leaf.npages <= 0 or leaf.start_pfn < 0 or end > end_pfn:
                raise ValueError(f"{what}: empty or outside [0, {end_pfn:#x})")
            if leaf.start_pfn % step or leaf.npages % step:
                raise ValueError(f"{what}: not aligned to its leaf size")
            if leaf.attr not in (PRIVATE, SHARED):
                raise ValueError(f"{what}: attribute {leaf.attr} is neither private nor shared")
            if leaf.start_pfn < previous_end:
                raise ValueError(f"{what}: overlaps the previous run (ends at {previous_end:#x})")
            previous_end = end
            if ram and ram[-1][1] == leaf.start_pfn:
                ram[-1] = (ram[-1][0], end)
            else:
                ram.append((leaf.start_pfn, end))
        dm = cls(end_pfn, ram)
        level = np.full_like(dm.level, NO_RAM)
        is_1g = np.zeros_like(dm.is_1g)
        for leaf in runs:
            start, end = leaf.start_pfn, leaf.start_pfn + leaf.npages
            dm.attr[start:end] = leaf.attr
            lo, hi = start >> _SHIFT_2M, -(-end // PAGES_PER_2M)
            if leaf.size == "1G":
                is_1g[start >> _SHIFT_1G : end >> _SHIFT_1G] = 1
                level[lo:hi] = IN_1G
            else:
                level[lo:hi] = LEAF_2M if leaf.size == "2M" else LEAF_4K
        dm.level, dm.is_1g = level, is_1g
        dm._count_leaves()
        dm._boot_1g = dm.n1g
        dm._boot_4k_regions = int(np.count_nonzero(level == LEAF_4K))
        return dm

    def _count_leaves(self) -> None:
        self.n1g = int(self.is_1g.sum())
        self.n2m = int(np.count_nonzero(self.level == LEAF_2M))
        self.n4k = int(self._ram_per_2m[self.level == LEAF_4K].sum())

    # ---- reading ---------------------------------------------------------------

    def bytes_by_size(self) -> dict[str, int]:
        """DirectMap4k / DirectMap2M / DirectMap1G of /proc/meminfo, in bytes."""
        return {
            "4k": self.n4k * PAGE_SIZE,
            "2M": self.n2m * PAGES_PER_2M * PAGE_SIZE,
            "1G": self.n1g * PAGES_PER_1G * PAGE_SIZE,
        }

    @property
    def ram_pages_per_2m(self) -> npt.NDArray[np.int64]:
        """RAM pages in each 2 MiB region (512 where the region is all RAM, 0 in a hole);
        read-only: the layout never changes after boot."""
        view: npt.NDArray[np.int64] = self._ram_per_2m.view()
        view.flags.writeable = False
        return view

    def ram_ranges(self) -> list[tuple[int, int]]:
        """RAM (every mapped page) as sorted, merged [start, end) pfn ranges."""
        ram = np.concatenate(([False], self.ram[: self.end_pfn], [False]))
        edges = np.flatnonzero(np.diff(ram.astype(np.int8)))
        return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]

    def leaf_size_of(self, pfn: int) -> str:
        if not self.ram[pfn]:
            raise ValueError(f"pfn {pfn:#x} is not RAM: it has no direct-map mapping")
        if self.is_1g[pfn >> _SHIFT_1G]:
            return "1G"
        return "2M" if self.level[pfn >> _SHIFT_2M] == LEAF_2M else "4k"

    def leaves(self) -> Iterator[Leaf]:
        """The mapping as runs of identical leaves (same size, attribute, contiguous), ascending."""
        run: list[int] | None = None  # [start, npages, size_index, attr]
        sizes = ("4k", "2M", "1G")
        for start, npages, size, attr in self._raw_leaves():
            if run and run[0] + run[1] == start and run[2] == size and run[3] == attr:
                run[1] += npages
                continue
            if run:
                yield Leaf(run[0], run[1], sizes[run[2]], run[3])
            run = [start, npages, size, attr]
        if run:
            yield Leaf(run[0], run[1], sizes[run[2]], run[3])

    def _raw_leaves(self) -> Iterator[tuple[int, int, int, int]]:
        n2m = len(self.level)
        m = 0
        while m < n2m:
            g = m >> (_SHIFT_1G - _SHIFT_2M)
            if self.is_1g[g]:
                start = g << _SHIFT_1G
                yield start, PAGES_PER_1G, 2, int(self.attr[start])
                m = (g + 1) * 512
                continue
            level = self.level[m]
            start = m << _SHIFT_2M
            if level == LEAF_2M:
                yield start, PAGES_PER_2M, 1, int(self.attr[start])
            elif level == LEAF_4K:
                ram = self.ram[start : start + PAGES_PER_2M]
                attr = self.attr[start : start + PAGES_PER_2M]
                # runs of RAM pages with the same attribute
                key = np.where(ram, attr.astype(np.int16), -1)
                edges = np.flatnonzero(np.diff(key)) + 1
                bounds = [0, *edges.tolist(), PAGES_PER_2M]
                for a, b in itertools.pairwise(bounds):
                    if key[a] >= 0:
                        yield start + a, b - a, 0, int(key[a])
            m += 1

    def splits(self) -> SplitCounts:
        return SplitCounts(self.level2_splits, self.level3_splits)

    # ---- changing --------------------------------------------------------------

    def _split_1g(self, g: int) -> None:
        self.is_1g[g] = 0
        self.level[g * 512 : (g + 1) * 512] = LEAF_2M
        self.n1g -= 1
        self.n2m += 512
        self.level3_splits += 1

    def _split_2m(self, m: int) -> None:
        self.level[m] = LEAF_4K
        self.n2m -= 1
        self.n4k += PAGES_PER_2M
        self.level2_splits += 1

    def _check_ram(self, start: int, npages: int) -> None:
        if npages <= 0 or start < 0 or start + npages > self.end_pfn:
            raise ValueError(f"range [{start:#x}, +{npages}) outside the guest's memory")
        if not self.ram[start : start + npages].all():
            raise ValueError(f"range [{start:#x}, +{npages}) includes pages that are not RAM")

    def _large_leaf(
        self, p: int, end: int, index: int, shift: int, attr: int, split: Callable[[int], None]
    ) -> int:
        """__should_split_large_page for the large leaf `index` (of 2^shift pages) at pfn p:
        change it whole if [p, end) covers it, keep it if it already has `attr`, else split it.
        Returns where the walk goes on (p itself after a split: the smaller leaves are next)."""
        lo, hi = index << shift, (index + 1) << shift
        if p == lo and end >= hi:
            self.attr[lo:hi] = attr
            return hi
        if self.attr[lo] == attr:
            return min(hi, end)
        split(index)
        return p

    def set_range(self, start: int, npages: int, attr: int) -> SplitCounts:
        """Change the attribute of a physically contiguous range, as one cpa call does."""
        self._check_ram(start, npages)
        before = self.splits()
        p, end = start, start + npages
        while p < end:
            g = p >> _SHIFT_1G
            if self.is_1g[g]:
                p = self._large_leaf(p, end, g, _SHIFT_1G, attr, self._split_1g)
                continue
            m = p >> _SHIFT_2M
            if self.level[m] == LEAF_2M:
                p = self._large_leaf(p, end, m, _SHIFT_2M, attr, self._split_2m)
                continue
            hi = (m + 1) << _SHIFT_2M
            q = min(hi, end)
            self.attr[p:q] = attr
            p = q
        after = self.splits()
        return SplitCounts(after.level2 - before.level2, after.level3 - before.level3)

    def set_pages(
        self,
        pfns: npt.NDArray[np.int64],
        attr: int,
        distinct: npt.NDArray[np.int64] | None = None,
    ) -> SplitCounts:
        """Change the attribute of scattered pages one at a time (cpa alias processing of a
        vmalloc range): a page never covers a whole large leaf, so every large leaf holding
        one of the pages splits unless it already carries `attr`. Vectorized; the result is
        the same as the kernel's page-by-page loop, whose splits do not depend on order.
        `distinct`: unique(pfns) when the caller has it (a vmalloc area's, pool.guest.uniq.
        distinct_pages), saving a sort."""
        if len(pfns) == 0:
            return SplitCounts()
        # sorted once (the region numbers of sorted pages are sorted), or as the caller has them
        pages = unique(pfns) if distinct is None else distinct
        if pages[0] < 0 or pages[-1] >= self.end_pfn or not self.ram[pages].all():
            raise ValueError("page list includes pages that are not RAM")
        before = self.splits()
        gs = distinct_regions(pages, _SHIFT_1G)
        gs = gs[(self.is_1g[gs] != 0) & (self.attr[gs << _SHIFT_1G] != attr)]
        for g in gs.tolist():
            self._split_1g(g)  # its 2 MiB leaves keep the 1 GiB leaf's attribute
        ms = distinct_regions(pages, _SHIFT_2M)
        ms = ms[(self.level[ms] == LEAF_2M) & (self.attr[ms << _SHIFT_2M] != attr)]
        for m in ms.tolist():
            self._split_2m(m)
        self.attr[pages] = attr
        after = self.splits()
        return SplitCounts(after.level2 - before.level2, after.level3 - before.level3)

    def boot_split(self, pfn: int) -> None:
        """Split the leaves around `pfn` down to 4 KiB as boot-time attribute changes do
        (kernel text, rodata, early allocations). Not counted: /proc/vmstat does not count
        splits made during boot (DESIGN.md section 2)."""
        g, m = pfn >> _SHIFT_1G, pfn >> _SHIFT_2M
        if not self.ram[pfn]:
            return
        if self.is_1g[g]:
            self._split_1g(g)
            self.level3_splits -= 1
            self._boot_1g -= 1
        if self.level[m] == LEAF_2M:
            self._split_2m(m)
            self.level2_splits -= 1
            self._boot_4k_regions += 1

    # ---- checking --------------------------------------------------------------

    def check_invariants(self) -> None:
        """Leaf bytes sum to RAM; counters agree with the structures; leaves are uniform."""
        sizes = self.bytes_by_size()
        assert sum(sizes.values()) == self.ram_pages * PAGE_SIZE, f"leaf bytes {sizes} != RAM"
        n1g = int(self.is_1g.sum())
        n2m = int(np.count_nonzero(self.level == LEAF_2M))
        n4k = int(self._ram_per_2m[self.level == LEAF_4K].sum())
        assert (n1g, n2m, n4k) == (self.n1g, self.n2m, self.n4k), "leaf counters drifted"
        assert self._boot_1g - n1g == self.level3_splits, "level-3 counter != 1G leaves lost"
        regions_4k = int(np.count_nonzero(self.level == LEAF_4K))
        assert regions_4k - self._boot_4k_regions == self.level2_splits, "level-2 counter drifted"
        for g in np.flatnonzero(self.is_1g).tolist():
            block = self.attr[g << _SHIFT_1G : (g + 1) << _SHIFT_1G]
            assert (block == block[0]).all(), f"1G leaf {g} not uniform"
            assert (self.level[g * 512 : (g + 1) * 512] == IN_1G).all()
        leaves_2m = np.flatnonzero(self.level == LEAF_2M)
        if len(leaves_2m):
            blocks = self.attr.reshape(-1, PAGES_PER_2M)[leaves_2m]
            assert (blocks == blocks[:, :1]).all(), "a 2M leaf is not uniform"

    def clone(self) -> DirectMap:
        other = object.__new__(DirectMap)
        other.__dict__.update(self.__dict__)
        for name in ("ram", "attr", "level", "is_1g"):
            setattr(other, name, getattr(self, name).copy())
        return other
