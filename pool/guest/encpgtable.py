"""The conversion sequence: __set_memory_enc_pgtable() in arch/x86/mm/pat/set_memory.c.

set_memory.c keeps it beside the rule that decides which direct-map leaves split
(pool.guest.directmap); so does the model. For one range, or one vmalloc area's pages, the
steps follow the platform's x86_platform.guest callbacks (pool.guest.platform.PlatformSpec):

  1. if enc_tlb_flush_required(): flush TLB, and caches for every page where
     enc_cache_flush_required();
  2. enc_status_change_prepare(): the hypercalls of the directions the platform converts
     first (TDX: shared -> private, MapGPA and accept; SNP: private -> shared, the
     page-state change and PVALIDATE rescind); on vTOM, set_memory_np() of the range
     (hv_vtom_clear_present(), Linux 6.9: one more TLB flush);
  3. change the page tables (`change_tables`: direct-map leaves keep or split; vmalloc PTEs,
     and with alias processing the pages' direct-map aliases one by one);
  4. flush TLB again (cpa_flush, always);
  5. enc_status_change_finish(): the other direction's hypercalls (TDX: private -> shared;
     SNP: shared -> private and PVALIDATE; vTOM: both directions, the visibility
     hypercalls, then set_memory_p(): one more TLB flush).

If the hypercalls of step 2 fail (vmm_fail), the page tables are left untouched and the
pages' state is unknown: the caller must leak them. On vTOM set_memory_np() splits the same
leaves the attribute change would, so the splits are counted once, at step 3.

Every step is counted in the guest's stats and costed from its cost profile; the result
carries the hypercalls and the modeled seconds of this one conversion. Pure functions of
the guest's parts (stats, costs, platform), so that the Guest object (and every daemon
snapshot pickled from it) keeps exactly its attributes.
"""

from __future__ import annotations

from collections.abc import Callable

from pool.guest.costs import CostProfile
from pool.guest.directmap import SplitCounts
from pool.guest.platform import ConversionResult, Platform
from pool.guest.stats import GuestStats


def flush(
    stats: GuestStats, costs: CostProfile, platform: Platform, npages: int, caches: bool
) -> None:
    """One global TLB flush; with `caches`, a cache flush of every page if the platform
    requires it (enc_cache_flush_required(): TDX)."""
    stats.tlb_flushes += 1
    stats.modeled_conversion_seconds += costs.tlb_flush_seconds
    if caches and platform.cache_flush_required:
        stats.cache_flushed_pages += npages
        stats.modeled_conversion_seconds += npages * costs.cache_flush_page_seconds


def charge_splits(stats: GuestStats, costs: CostProfile, splits: SplitCounts) -> None:
    """Each split costs a page-table page and a TLB flush (set_memory.c: split_large_page)."""
    n = splits.level2 + splits.level3
    stats.direct_map_level2_splits += splits.level2
    stats.direct_map_level3_splits += splits.level3
    stats.page_table_pages += n
    stats.tlb_flushes += n
    stats.modeled_conversion_seconds += n * (costs.split_seconds + costs.tlb_flush_seconds)


def set_memory_enc_pgtable(
    stats: GuestStats,
    costs: CostProfile,
    platform: Platform,
    npages: int,
    to_shared: bool,
    hypercalls: Callable[[bool], ConversionResult],
    change_tables: Callable[[], SplitCounts],
) -> ConversionResult:
    """Convert `npages` pages (steps 1-5 of the module doc). `hypercalls(to_shared)` makes
    the platform's calls (MapGPA / page-state changes, accept); `change_tables()` changes
    the mappings and returns the splits it made. Nothing happens on a platform that does
    not encrypt."""
    if not platform.encrypts:
        return ConversionResult(True, npages, 0, 0.0)
    spec = platform.spec
    before = stats.modeled_conversion_seconds
    calls_before = stats.hypercalls
    if to_shared:
        stats.conversions_to_shared += 1
    else:
        stats.conversions_to_private += 1
    if spec.tlb_flush_before:
        flush(stats, costs, platform, npages, caches=True)
    result = None
    if spec.clears_present:  # set_memory_np(): its own cpa_flush
        flush(stats, costs, platform, npages, caches=False)
    if to_shared in spec.prepare_directions:
        result = hypercalls(to_shared)
        if not result.ok:  # vmm_fail: page tables untouched, pages unknown
            return _result(stats, result, before, calls_before)
    charge_splits(stats, costs, change_tables())
    flush(stats, costs, platform, npages, caches=False)
    if result is None:
        result = hypercalls(to_shared)
    if spec.clears_present:  # set_memory_p(), even after a failed call (err_set_memory_p)
        flush(stats, costs, platform, npages, caches=False)
    return _result(stats, result, before, calls_before)


def _result(
    stats: GuestStats, result: ConversionResult, seconds_before: float, calls_before: int
) -> ConversionResult:
    return ConversionResult(  # not attrs.evolve: this runs twice per vmalloc buffer
        result.ok,
        result.pages,
        stats.hypercalls - calls_before,
        stats.modeled_conversion_seconds - seconds_before,
        result.unknown_pages,
    )
