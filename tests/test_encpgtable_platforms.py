"""set_memory_enc_pgtable's order per platform, with hand-worked counts and costs.

Each case converts one 2 MiB-aligned 2 MiB range of a pristine guest. Whether a 1 GiB leaf
around it splits is the direct map's rule (tested on its own), so the figures below take the
split count the model reports and check every other count and second by hand against the
kernel's sequence and costs.toml.
"""

from __future__ import annotations

import pytest

from pool.guest import Guest, GuestConfig
from pool.guest.costs import CostProfile
from pool.guest.hazards import check, transition_hazard
from pool.guest.platform import PLATFORM_SPECS, PLATFORMS
from pool.guest.units import PAGES_PER_2M, MiB


def _guest(platform: str) -> Guest:
    return Guest(GuestConfig(memory_bytes=256 * MiB, hole=None, platform=platform))


def _expected(platform: str, npages: int, splits: int, to_shared: bool) -> tuple[int, int, float]:
    """(hypercalls, tlb flushes, modeled seconds) of one conversion of a contiguous range, by
    hand from the kernel's sequence and costs.toml."""
    c = CostProfile.load(platform)
    if platform == "tdx":
        # flush TLB + clflush every page, splits (each a PT page and a flush), flush, one
        # MapGPA; shared -> private accepts: the range is 2 MiB aligned, one 2 MiB piece
        calls, flushes = 1, 2 + splits
        secs = 2 * c.tlb_flush_seconds + npages * c.cache_flush_page_seconds
        secs += c.hypercall_seconds + (0 if to_shared else c.accept_2m_seconds)
    elif platform == "snp":
        # flush (no clflush: SME_COHERENT), one PSC VMGEXIT with one 2 MiB entry, PVALIDATE
        # of that entry in either direction, flush
        calls, flushes = 1, 2 + splits
        secs = 2 * c.tlb_flush_seconds + c.hypercall_seconds + c.accept_2m_seconds
    elif platform == "hyperv-vtom":
        # no flush before (hv_vtom_tlb_flush_required() false); set_memory_np (flush),
        # tables, flush, ceil(512 / 510) = 2 visibility calls, a validation per page,
        # set_memory_p (flush)
        calls, flushes = 2, 3 + splits
        secs = 3 * c.tlb_flush_seconds + 2 * c.hypercall_seconds + npages * c.accept_4k_seconds
    else:
        return 0, 0, 0.0
    secs += splits * (c.split_seconds + c.tlb_flush_seconds)
    return calls, flushes, secs


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("to_shared", [True, False])
def test_one_range_conversion_by_hand(platform: str, to_shared: bool) -> None:
    g = _guest(platform)
    pfn, n = 32 * PAGES_PER_2M, PAGES_PER_2M
    if not to_shared:
        g.set_memory_decrypted(pfn, n)
    before = g.stats.snapshot()
    r = (g.set_memory_decrypted if to_shared else g.set_memory_encrypted)(pfn, n)
    d = g.stats.snapshot() - before
    splits = d.direct_map_level2_splits + d.direct_map_level3_splits
    calls, flushes, secs = _expected(platform, n, splits, to_shared)
    assert r.ok
    assert (d.hypercalls, d.tlb_flushes) == (calls, flushes)
    assert d.modeled_conversion_seconds == pytest.approx(secs, rel=1e-12, abs=1e-15)
    assert r.modeled_seconds == pytest.approx(secs, rel=1e-12, abs=1e-15)


def test_snp_converts_to_shared_before_the_tables_tdx_after() -> None:
    """amd_enc_status_change_prepare() makes the page-state change before the PTEs change
    (private -> shared); TDX's MapGPA for that direction comes after (finish)."""
    assert PLATFORM_SPECS["snp"].prepare_directions == frozenset({True})
    assert PLATFORM_SPECS["tdx"].prepare_directions == frozenset({False})
    assert PLATFORM_SPECS["hyperv-vtom"].prepare_directions == frozenset()


def test_vtom_transition_not_present_but_a_permanent_alias_stays_fatal() -> None:
    """The 6.9 not-present window removes the transition hazard, not the permanent one: a
    vmalloc buffer decrypted without its direct-map aliases leaves private aliases of
    shared pages, fatal on vTOM as on TDX."""
    assert transition_hazard(PLATFORM_SPECS["hyperv-vtom"]) == "not present"
    assert transition_hazard(PLATFORM_SPECS["tdx"]) == "recoverable"
    assert transition_hazard(PLATFORM_SPECS["none"]) == "none"
    g = _guest("hyperv-vtom")
    pfns = g.vmalloc_pages(64)
    area = g.vmap(pfns, shared=False)
    area, r = g.set_vmalloc_decrypted(area, alias=False)
    assert r.ok
    assert check(g).private_alias_to_shared == 64
    assert g.hazards().private_alias_to_shared == 64
