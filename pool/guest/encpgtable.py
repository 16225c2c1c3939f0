"""The conversion sequence: __set_memory_enc_pgtable() in arch/x86/mm/pat/set_memory.c.

set_memory.c keeps it beside the rule that decides which direct-map leaves split
(pool.guest.directmap); so does the model. For one range, or one vmalloc area's pages:

  1. flush TLB, and caches for every page where the platform requires it;
  2. shared -> private only: MapGPA and accept (x86_platform.guest.enc_status_change_prepare);
  3. change the page tables (`change_tables`: direct-map leaves keep or split; vmalloc PTEs,
     and with alias processing the pages' direct-map aliases one by one);
  4. flush TLB again;
  5. private -> shared only: MapGPA (x86_platform.guest.enc_status_change_finish).

This order guarantees that no private mapping ever points at a shared page. If the
hypercalls of step 2 fail (vmm_fail), the page tables are left untouched and the pages'
state is unknown: the caller must leak them.

Every step is counted in the guest's stats and costed from its cost profile; the result
carries the hypercalls and the modeled seconds of this one conversion. Pure functions of
the guest's parts (stats, costs, platform), so that the Guest object (and every daemon
snapshot pickled from it) keeps exactly its attributes.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

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
    before = stats.modeled_conversion_seconds
    calls_before = stats.hypercalls
    if to_shared:
        stats.conversions_to_shared += 1
    else:
        stats.conversions_to_private += 1
    flush(stats, costs, platform, npages, caches=True)
    result = None
    if not to_shared:
        result = hypercalls(False)
        if not result.ok:  # vmm_fail: page tables untouched, pages unknown
            return _result(stats, result, before, calls_before)
    charge_splits(stats, costs, change_tables())
    flush(stats, costs, platform, npages, caches=False)
    if to_shared:
        result = hypercalls(True)
    assert result is not None
    return _result(stats, result, before, calls_before)


def _result(
    stats: GuestStats, result: ConversionResult, seconds_before: float, calls_before: int
) -> ConversionResult:
    return attrs.evolve(
        result,
        hypercalls=stats.hypercalls - calls_before,
        modeled_seconds=stats.modeled_conversion_seconds - seconds_before,
    )
