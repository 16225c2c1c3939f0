"""The simulated confidential guest: one object that owns the machine's state.

`Guest` ties together the page allocator, the background workload, the direct
map, the vmalloc space, the CoCo platform and the counters. Its conversions
(set_memory_decrypted / set_memory_encrypted, on direct-map ranges and on vmalloc
areas) run the kernel's conversion sequence, __set_memory_enc_pgtable in
arch/x86/mm/pat/set_memory.c, which pool.guest.encpgtable models beside the split
rule of pool.guest.directmap; that order guarantees that no private mapping ever
points at a shared page. A conversion that fails leaves its pages UNKNOWN and the
caller must leak them: `free_pages` refuses any page that is not private and
privately mapped.

The guest knows nothing of pools: strategies in `pool` call it, never the reverse.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence

import attrs
import numpy as np
import numpy.typing as npt

from pool.guest import hazards
from pool.guest.buddy import PageAllocator, Zone, default_zones
from pool.guest.costs import CostProfile
from pool.guest.directmap import PRIVATE, SHARED, DirectMap, SplitCounts
from pool.guest.encpgtable import set_memory_enc_pgtable
from pool.guest.fragmentation import fragmentation_index, unusable_free_index
from pool.guest.migratetype import MIGRATE_UNMOVABLE
from pool.guest.platform import (
    PAGE_PRIVATE,
    ConversionResult,
    FaultPlan,
    Host,
    Platform,
    SimulatedHost,
    platform_spec,
)
from pool.guest.stats import Counts, GuestStats
from pool.guest.uniq import distinct_pages
from pool.guest.units import NR_ORDERS, PAGE_SHIFT, PAGE_SIZE, PAGES_PER_2M, GiB, MiB, format_size
from pool.guest.vmalloc import VmallocSpace, VmArea, vm_area_alloc_pages
from pool.guest.workload import Churn, ChurnConfig

Runs = Sequence[tuple[int, int]]
MAX_CPUS = 256


MEMORY_STEP = 4 * MiB
MIN_MEMORY = 16 * MiB
MAX_MEMORY = 1 << 40  # the model keeps a few bytes per page in arrays: 1 TiB is ~2 GiB of them
DEFAULT_RESERVED = ((0, 1 * MiB), (16 * MiB, 64 * MiB))  # the first MiB, the kernel image


def check_memory(nbytes: int) -> int:
    """The machine sizes the model builds: a multiple of 4 MiB, 16 MiB to 1 TiB (ValueError,
    one line, naming the size)."""
    size = format_size(nbytes)
    if nbytes % MEMORY_STEP:
        raise ValueError(f"{size} is not a multiple of {format_size(MEMORY_STEP)}")
    if nbytes < MIN_MEMORY:
        raise ValueError(f"{size} is less than the smallest guest, {format_size(MIN_MEMORY)}")
    if nbytes > MAX_MEMORY:
        raise ValueError(f"{size} is more than the largest guest, {format_size(MAX_MEMORY)}")
    return nbytes


def min_aged_memory(reserved: Sequence[tuple[int, int]] = DEFAULT_RESERVED) -> int:
    """The smallest guest that can be aged: the churn allocates from DMA32 and Normal only
    (pool.guest.workload), so it needs RAM above the reserved ranges (the kernel image ends
    at 64 MiB): one 4 MiB step past their end."""
    return max(end for _, end in reserved) + MEMORY_STEP


def check_aging(
    memory_bytes: int, age_steps: int, reserved: Sequence[tuple[int, int]] = DEFAULT_RESERVED
) -> None:
    """ValueError if a guest of `memory_bytes` cannot be aged by `age_steps` steps."""
    least = min_aged_memory(reserved)
    if age_steps > 0 and memory_bytes < least:
        raise ValueError(
            f"{format_size(memory_bytes)} is too small to age: at least {format_size(least)} "
            "(the churn needs free memory above the reserved first 64MiB; --age-steps 0 for "
            "a pristine guest)"
        )


@attrs.frozen
class GuestConfig:
    """What machine to build. Defaults: a 16 GiB TDX guest with the 3-4 GiB PCI hole.

    reserved: byte ranges of RAM kept out of the page allocator (memblock reservations:
      the first MiB, the kernel image); they stay mapped in the direct map.
    boot_splits: pfns whose direct-map leaves boot-time attribute changes split to 4 KiB
      (None: the first 2 MiB, as every x86 guest's ptdump shows, the end of the kernel
      image, and `boot_scatter_splits` seeded random places); uncounted, as in /proc/vmstat.
    cpus: the guest's vCPUs, each with its own per-cpu page lists (pool.guest.pcp). Default 1,
      the configuration of the real Linux 6.1 guest the model was checked against (DESIGN.md:
      4 GiB, 1 vCPU). Everything the model does runs on vCPU 0 except the background churn,
      which takes the vCPUs in turn, one step each. Pages on any vCPU's lists count as
      allocated in buddyinfo, as in the kernel.
    """

    memory_bytes: int = 16 * GiB
    hole: tuple[int, int] | None = (3 * GiB, 4 * GiB)
    platform: str = "tdx"
    seed: int = 1
    cost_profile: str | None = None
    faults: FaultPlan = attrs.Factory(FaultPlan)
    churn: ChurnConfig = attrs.Factory(ChurnConfig)
    reserved: tuple[tuple[int, int], ...] = DEFAULT_RESERVED
    boot_splits: tuple[int, ...] | None = None
    boot_scatter_splits: int = 4
    cpus: int = 1

    def __attrs_post_init__(self) -> None:
        check_memory(self.memory_bytes)
        if not 1 <= self.cpus <= MAX_CPUS:
            raise ValueError(f"cpus must be in 1..{MAX_CPUS}, not {self.cpus}")
        if self.hole is not None:
            lo, hi = self.hole
            if not (0 < lo < hi and lo % (2 * MiB) == 0 and hi % (2 * MiB) == 0):
                raise ValueError(f"hole must be 2 MiB-aligned and lo < hi: {self.hole}")
        platform_spec(self.platform)  # the registry's one message for an unknown platform

    def ram_ranges(self) -> list[tuple[int, int]]:
        """RAM as pfn ranges: memory below the hole, the rest above it."""
        size = self.memory_bytes >> PAGE_SHIFT
        if self.hole is None or self.memory_bytes <= self.hole[0]:
            return [(0, size)]
        lo, hi = self.hole[0] >> PAGE_SHIFT, self.hole[1] >> PAGE_SHIFT
        return [(0, lo), (hi, hi + size - lo)]


@attrs.frozen
class ZoneReport:
    name: str
    nr_free: tuple[int, ...]
    fragmentation_index: tuple[int, ...]  # thousandths, per order
    unusable_free_index: tuple[int, ...]  # thousandths, per order


@attrs.frozen
class GuestReport:
    """A reading of the machine for reports, metrics and compare."""

    zones: tuple[ZoneReport, ...]
    free_pages: int
    direct_map_bytes: dict[str, int]
    counts: Counts
    hazards: hazards.HazardReport


@functools.lru_cache(maxsize=512)
def _zone_report(name: str, nr: tuple[int, ...]) -> ZoneReport:
    """A zone's report is a pure function of its free-block counts: cached, so a scrape of
    an unchanged zone does not recompute its 22 indexes (/metrics reads them every time)."""
    return ZoneReport(
        name,
        nr,
        tuple(fragmentation_index(nr, k) for k in range(NR_ORDERS)),
        tuple(unusable_free_index(nr, k) for k in range(NR_ORDERS)),
    )


def _subtract(
    ram: list[tuple[int, int]], holes: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    out = list(ram)
    for hs, he in holes:
        nxt = []
        for s, e in out:
            if he <= s or hs >= e:
                nxt.append((s, e))
                continue
            if s < hs:
                nxt.append((s, hs))
            if he < e:
                nxt.append((he, e))
        out = nxt
    return out


def _reserved_pfns(config: GuestConfig) -> list[tuple[int, int]]:
    return [(s >> PAGE_SHIFT, -(-e // PAGE_SIZE)) for s, e in config.reserved]


class Guest:
    def __init__(self, config: GuestConfig | None = None, host: Host | None = None) -> None:
        config = config or GuestConfig()
        ram = config.ram_ranges()
        reserved = _reserved_pfns(config)
        self._build(config, host, DirectMap(ram[-1][1], ram), None)
        for pfn in self._boot_split_pfns(ram, reserved):
            self.direct_map.boot_split(pfn)

    @classmethod
    def from_layout(
        cls,
        direct_map: DirectMap,
        config: GuestConfig | None = None,
        host: Host | None = None,
        allocator: PageAllocator | None = None,
    ) -> Guest:
        """A guest whose RAM and direct map are exactly `direct_map` (for instance one
        imported from a real guest's page-table dump, pool.guest.ptdump), not the regular
        layout GuestConfig describes. The guest takes `direct_map` as it is (not copied; no
        boot splits are added) and sizes everything to `direct_map.end_pfn`, zones included
        (default_zones).

        From `config` it uses platform, seed, cost_profile, faults, churn and cpus; it ignores
        memory_bytes, hole, boot_splits and boot_scatter_splits (the layout replaces them).
        The page allocator is `allocator` when given (for instance one whose free lists were
        imported from /proc/buddyinfo, pool.guest.buddyimport): it must span the same pfns,
        with the default zones, and manage only RAM pages of `direct_map`; it is given
        `config.cpus` per-cpu lists if it has none. Otherwise it is a
        fresh allocator over the RAM minus `config.reserved`, all free, as after boot."""
        config = config or GuestConfig()
        if allocator is not None:
            if allocator.end_pfn != direct_map.end_pfn:
                raise ValueError(
                    f"allocator spans {allocator.end_pfn:#x} pfns, the direct map "
                    f"{direct_map.end_pfn:#x}"
                )
            if allocator.zones != default_zones(direct_map.end_pfn):
                raise ValueError("allocator zones are not the default zones of this layout")
            for start, end in allocator.ram:
                if not direct_map.ram[start:end].all():
                    raise ValueError(
                        f"allocator RAM [{start:#x}, {end:#x}) is not all mapped in the direct map"
                    )
        guest = cls.__new__(cls)
        guest._build(config, host, direct_map, allocator)
        return guest

    def _build(
        self,
        config: GuestConfig,
        host: Host | None,
        direct_map: DirectMap,
        allocator: PageAllocator | None,
    ) -> None:
        self.config = config
        self.end_pfn = direct_map.end_pfn
        self.stats = GuestStats()
        self.costs = CostProfile.load(config.platform, config.cost_profile)
        self.host: Host = host or SimulatedHost(config.faults)
        self.platform = Platform(config.platform, self.end_pfn, self.stats, self.costs, self.host)
        self.direct_map = direct_map
        self.vmalloc = VmallocSpace()
        self.content = np.zeros(self.end_pfn, dtype=np.uint32)
        self.zones: tuple[Zone, ...] = default_zones(self.end_pfn)
        if allocator is None:
            ram = direct_map.ram_ranges()
            allocator = PageAllocator(
                self.end_pfn, _subtract(ram, _reserved_pfns(config)), self.zones, config.cpus
            )
        elif allocator.cpus == 0:
            allocator.setup_pcp(config.cpus)
        self.allocator = allocator
        self.churn = Churn(self.allocator, config.seed, config.churn)
        self.hazard_counts = hazards.HazardCounts.recount(self)

    def __getstate__(self) -> dict[str, object]:
        """Pickle with the noted vmalloc mappings applied to the hazard counts."""
        counts = self.__dict__.get("hazard_counts")
        if counts is not None:
            counts.flush(self)
        return self.__dict__

    def __setstate__(self, state: dict[str, object]) -> None:
        """Unpickle, also a guest pickled (in a daemon snapshot) before it kept hazard counts."""
        self.__dict__.update(state)
        if "hazard_counts" not in state:
            self.hazard_counts = hazards.HazardCounts.recount(self)

    def _boot_split_pfns(
        self, ram: list[tuple[int, int]], reserved: list[tuple[int, int]]
    ) -> list[int]:
        if self.config.boot_splits is not None:
            return list(self.config.boot_splits)
        pfns = [0]  # the first 2 MiB: real-mode trampoline, BIOS areas
        pfns += [e for _, e in reserved if e % PAGES_PER_2M and e < self.end_pfn]  # image ends
        rng = np.random.default_rng(self.config.seed ^ 0xB007)
        total = sum(e - s for s, e in ram)
        for x in rng.integers(0, total, self.config.boot_scatter_splits).tolist():
            for s, e in ram:
                if x < e - s:
                    pfns.append(s + x)
                    break
                x -= e - s
        return pfns

    # ---- aging -----------------------------------------------------------------

    def age(self, steps: int, progress: Callable[[int, int], None] | None = None) -> None:
        """Run the background workload for `steps` steps (page-cache and slab churn, with its
        memory-pressure episodes: pool.guest.workload). ValueError first if this guest is too
        small to be aged (check_aging)."""
        check_aging(self.config.memory_bytes, steps, self.config.reserved)
        self.churn.run(steps, progress)

    def background(self, steps: int) -> None:
        """Churn between events: the rest of the guest keeps allocating and freeing, steadily.
        No memory-pressure episode starts here (they belong to aging): a pristine guest stays
        pristine under light load."""
        if steps > 0:
            self.churn.step(steps, pressure=False)

    # ---- page allocator ----------------------------------------------------------

    def alloc_pages(self, order: int, migratetype: int = MIGRATE_UNMOVABLE) -> int | None:
        """__get_free_pages(GFP_KERNEL, order) on vCPU 0: an order-`order` block's first pfn,
        or None when memory is short. GFP_KERNEL is unmovable (driver buffers, pools)."""
        return self.allocator.alloc(order, migratetype=migratetype)

    def vmalloc_pages(self, npages: int) -> npt.NDArray[np.int64]:
        """vmalloc's page allocation (vm_area_alloc_pages(): the bulk allocator in requests of
        at most 100 pages, then single pages), unmovable, on vCPU 0. May return fewer than
        `npages` pages when memory is short; the caller gives them back."""
        return vm_area_alloc_pages(self.allocator, npages)

    def claim_range(self, start_pfn: int, npages: int) -> bool:
        return self.allocator.claim_range(start_pfn, npages)

    def free_pages(self, pfn: int, order: int) -> None:
        """Give pages back. Refuses pages that are not private and privately mapped: a page of
        unknown state must be leaked, never returned (CVE-2024-36911)."""
        n = 1 << order
        if self.platform.encrypts:
            state = self.platform.state
            attr = self.direct_map.attr
            if (
                (state[pfn] != PAGE_PRIVATE or attr[pfn] != PRIVATE)
                if n == 1
                else (
                    (state[pfn : pfn + n] != PAGE_PRIVATE).any()
                    or (attr[pfn : pfn + n] != PRIVATE).any()
                )
            ):
                raise ValueError(
                    f"refusing to free pfn {pfn:#x} order {order}: pages not private "
                    "(shared or of unknown state must be re-encrypted or leaked)"
                )
        self.allocator.free(pfn, order)

    def free_page_list(self, pfns: npt.NDArray[np.int64]) -> None:
        """vfree's page loop: every page checked first (all or nothing), then freed."""
        if self.platform.encrypts and (
            (self.platform.state[pfns] != PAGE_PRIVATE).any()
            or (self.direct_map.attr[pfns] != PRIVATE).any()
        ):
            raise ValueError("refusing to free a page list holding pages that are not private")
        self.allocator.free_bulk(pfns)  # free(pfn, 0) for each, in one call

    # ---- contents (zeroing and writes) --------------------------------------------

    def zero(self, runs: npt.NDArray[np.int64] | Runs) -> None:
        """Clear pages (vzalloc / __GFP_ZERO): nobody sees a previous owner's data. A page
        list clears in one indexed store (an aged guest's vmalloc buffer has hundreds of
        runs: a slice store per run was 5 % of a vmalloc strategy's run)."""
        self.write(runs, 0)  # tag 0: no one's data
        n = len(runs) if isinstance(runs, np.ndarray) else sum(k for _, k in runs)
        self.stats.pages_zeroed += n
        self.stats.modeled_zeroing_seconds += n * self.costs.zero_page_seconds

    def write(self, pfns: npt.NDArray[np.int64] | Runs, tag: int) -> None:
        """Mark pages as written by `tag` (a buffer id, the host): the model of contents."""
        if isinstance(pfns, np.ndarray):
            self.content[pfns] = tag
        else:
            for start, npages in pfns:
                self.content[start : start + npages] = tag

    # ---- conversions ------------------------------------------------------------

    def _convert(
        self,
        npages: int,
        to_shared: bool,
        hypercalls: Callable[[bool], ConversionResult],
        change_tables: Callable[[], SplitCounts],
    ) -> ConversionResult:
        """__set_memory_enc_pgtable (pool.guest.encpgtable) on this guest's parts."""
        return set_memory_enc_pgtable(
            self.stats, self.costs, self.platform, npages, to_shared, hypercalls, change_tables
        )

    def _convert_range(self, pfn: int, npages: int, attr: int) -> ConversionResult:
        """set_memory_{de,en}crypted() on a direct-map range: one MapGPA for the range; the
        hazard counts follow the range's pages."""
        sel = slice(pfn, pfn + npages)
        before = self.hazard_counts.before(self, sel)
        try:
            return self._convert(
                npages,
                attr == SHARED,
                lambda ts: self.platform.convert([(pfn, npages)], ts),
                lambda: self.direct_map.set_range(pfn, npages, attr),
            )
        finally:
            self.hazard_counts.after(self, sel, before)

    def set_memory_decrypted(self, pfn: int, npages: int) -> ConversionResult:
        """set_memory_decrypted() on a direct-map range: one MapGPA for the contiguous range."""
        return self._convert_range(pfn, npages, SHARED)

    def set_memory_encrypted(self, pfn: int, npages: int) -> ConversionResult:
        return self._convert_range(pfn, npages, PRIVATE)

    def vmap(self, pfns: npt.NDArray[np.int64], shared: bool) -> VmArea:
        """Map pages into the vmalloc space (vmap with pgprot_decrypted when shared)."""
        area = self.vmalloc.map(pfns, SHARED if shared else PRIVATE)
        self.hazard_counts.note_map(area.id, area.pfns, area.attr)
        return area

    def vunmap(self, area: VmArea) -> None:
        current = self.vmalloc.areas.get(area.id, area)  # `area` may predate an attr change
        self.vmalloc.unmap(area)
        self.hazard_counts.note_unmap(area.id, current.pfns, current.attr)

    def _set_vmalloc(self, area: VmArea, attr: int, alias: bool) -> tuple[VmArea, ConversionResult]:
        holder: list[VmArea] = []

        def tables() -> SplitCounts:
            holder.append(self.vmalloc.set_attr(area, attr))
            return self.direct_map.set_pages(area.pfns, attr, pages) if alias else SplitCounts()

        # vmalloc addresses are converted page by page (tdx_enc_status_changed);
        # SNP batches them into page-state-change requests anyway
        pages = distinct_pages(area.pfns)
        old_attr = self.vmalloc.areas[area.id].attr if area.id in self.vmalloc.areas else area.attr
        before = self.hazard_counts.before(self, pages)
        try:
            result = self._convert(
                area.npages,
                attr == SHARED,
                lambda ts: self.platform.convert_pages(area.pfns, ts),
                tables,
            )
        finally:
            if holder:
                self.hazard_counts.remap(area.pfns, old_attr, attr)
            self.hazard_counts.after(self, pages, before)
        return (holder[0] if holder else self.vmalloc.areas.get(area.id, area)), result

    def set_vmalloc_decrypted(
        self, area: VmArea, alias: bool = True
    ) -> tuple[VmArea, ConversionResult]:
        """set_memory_decrypted() on a vmalloc address. alias=True also converts each page's
        direct-map alias (the kernel's default); alias=False leaves them private (the
        original 2022 patch: the private aliases then point at shared pages)."""
        return self._set_vmalloc(area, SHARED, alias)

    def set_vmalloc_encrypted(
        self, area: VmArea, alias: bool = True
    ) -> tuple[VmArea, ConversionResult]:
        return self._set_vmalloc(area, PRIVATE, alias)

    # ---- reading ----------------------------------------------------------------

    def hazards(self) -> hazards.HazardReport:
        """The hazard counts, kept as pages change (hazards.HazardCounts): no scan."""
        return self.hazard_counts.report(self)

    def zone_reports(self) -> tuple[ZoneReport, ...]:
        return tuple(
            _zone_report(zone.name, self.allocator.nr_free(zone.name)) for zone in self.zones
        )

    def report(self, with_hazards: bool = True) -> GuestReport:
        return GuestReport(
            self.zone_reports(),
            self.allocator.free_pages(),
            self.direct_map.bytes_by_size(),
            self.stats.snapshot(),
            self.hazards() if with_hazards else hazards.HazardReport(),
        )

    def check_invariants(self) -> None:
        """Raise AssertionError if the machine is inconsistent: the allocator's and the direct
        map's own invariants; every free page private, privately mapped, unmapped from the
        vmalloc space and of known state; counters agree with the structures."""
        self.allocator.check_invariants()
        self.direct_map.check_invariants()
        free = np.zeros(self.end_pfn, dtype=np.bool_)  # free or on a per-cpu list
        for zone in self.zones:
            for order in range(NR_ORDERS):
                for pfn in self.allocator.free_blocks(zone.name, order):
                    free[pfn : pfn + (1 << order)] = True
        assert int(free.sum()) == self.allocator.free_pages(), "free-list count != free pages"
        for pfn, order in self.allocator.pcp_blocks():
            free[pfn : pfn + (1 << order)] = True
        assert int(free.sum()) == self.allocator.free_pages() + self.allocator.pcp_pages()
        assert not (free & ~self.direct_map.ram[: self.end_pfn]).any(), "free page outside RAM"
        if self.platform.encrypts:
            assert (self.platform.state[free] == PAGE_PRIVATE).all(), "a free page is not private"
            assert (self.direct_map.attr[: self.end_pfn][free] == PRIVATE).all(), (
                "a free page is mapped shared in the direct map"
            )
        for area in self.vmalloc:
            assert not free[area.pfns].any(), f"vmalloc area {area.id} maps a free page"
        assert self.hazards() == hazards.check(self), (
            f"hazard counts drifted: kept {self.hazards()}, scan {hazards.check(self)}"
        )
        s = self.stats
        assert s.direct_map_level2_splits == self.direct_map.level2_splits
        assert s.direct_map_level3_splits == self.direct_map.level3_splits
        assert s.page_table_pages == s.direct_map_level2_splits + s.direct_map_level3_splits

    def clone(self) -> Guest:
        """An independent copy (compare runs every strategy on copies of one aged guest)."""
        other = object.__new__(Guest)
        other.config = self.config
        other.end_pfn = self.end_pfn
        other.stats = attrs.evolve(self.stats)
        other.costs = self.costs
        other.host = copy.deepcopy(self.host)
        other.platform = self.platform.clone(other.stats, other.host)
        other.direct_map = self.direct_map.clone()
        other.vmalloc = self.vmalloc.clone()
        other.content = self.content.copy()
        other.zones = self.zones
        other.allocator = self.allocator.clone()
        other.churn = self.churn.clone(other.allocator)
        other.hazard_counts = self.hazard_counts.clone(self)
        return other
