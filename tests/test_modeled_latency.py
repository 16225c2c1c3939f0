"""Modeled allocation latency: each allocate call carries the cost profile applied to the
guest work that call caused (hv_netvsc_sim.inprocess.ModeledClient).

The check per platform is twofold: every allocation's modeled seconds equal its own counts
times the profile (the counts are the model's primary output; the seconds must be nothing
but them, costed), and a hand-worked figure for one 16 MiB receive buffer.
"""

from __future__ import annotations

import asyncio

import pytest

from hv_netvsc_sim.inprocess import InProcessRun, run_in_process
from hv_netvsc_sim.scenario import ScenarioConfig
from pool.guest import GuestConfig
from pool.guest.costs import CostProfile
from pool.guest.platform import PLATFORMS
from pool.guest.stats import Counts
from pool.guest.units import GiB
from pool.provision import Guests

RECV_PAGES = 4096  # hv_netvsc's default 16 MiB receive buffer


def _run(strategy: str, platform: str, cycles: int = 3) -> InProcessRun:
    guests = Guests(GuestConfig(memory_bytes=1 * GiB, platform=platform, seed=3), 0, None)
    config = ScenarioConfig(cycles=cycles, seed=3, churn_steps=20, mixed_events=2)
    return asyncio.run(run_in_process(strategy, guests, config))


def _costed(c: Counts, p: CostProfile) -> float:
    """The profile applied to one allocation's counts, term by term."""
    return (
        c.hypercalls * p.hypercall_seconds
        + c.accept_calls_4k * p.accept_4k_seconds
        + c.accept_calls_2m * p.accept_2m_seconds
        + c.accept_calls_1g * p.accept_1g_seconds
        + c.cache_flushed_pages * p.cache_flush_page_seconds
        + c.tlb_flushes * p.tlb_flush_seconds
        + c.page_table_pages * p.split_seconds
        + c.pages_zeroed * p.zero_page_seconds
    )


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("strategy", ["vmalloc-alias", "pool"])
def test_each_allocation_is_its_counts_costed(strategy: str, platform: str) -> None:
    run = _run(strategy, platform)
    profile = CostProfile.load(platform)
    assert len(run.allocation_counts) == run.result["allocations"] > 0
    for counts, seconds in zip(run.allocation_counts, run.allocation_modeled_seconds, strict=True):
        assert seconds == pytest.approx(_costed(counts, profile), rel=1e-9, abs=1e-15)
    lat = run.result["alloc_latency_seconds"]
    assert lat["max"] == pytest.approx(max(run.allocation_modeled_seconds))
    assert lat["p50"] <= lat["p99"] <= lat["max"]


def test_hand_worked_tdx_vmalloc_receive_buffer() -> None:
    """vmalloc-alias on TDX, one 16 MiB receive buffer: 4096 MapGPAs page by page (8 us),
    a TLB flush before and after (5 us), clflush of every page (0.6 us), zeroing (0.4 us),
    no split (the direct-map aliases are left alone): 36.874 ms."""
    run = _run("vmalloc-alias", "tdx")
    recv = [
        s
        for c, s in zip(run.allocation_counts, run.allocation_modeled_seconds, strict=True)
        if c.pages_zeroed == RECV_PAGES
    ]
    expected = 4096 * 8e-6 + 2 * 5e-6 + 4096 * 0.6e-6 + 4096 * 0.4e-6
    assert recv and all(s == pytest.approx(expected) for s in recv)
    assert expected == pytest.approx(36.874e-3)


def test_hand_worked_vtom_vmalloc_receive_buffer() -> None:
    """vmalloc-alias on vTOM, one 16 MiB receive buffer: ceil(4096 / 510) = 9 visibility
    hypercalls (12 us), 4096 pages validated by the paravisor (1 us), set_memory_np, the
    flush after the change and set_memory_p (3 x 5 us), zeroing (0.4 us): 5.8574 ms."""
    run = _run("vmalloc-alias", "hyperv-vtom")
    recv = [
        (c, s)
        for c, s in zip(run.allocation_counts, run.allocation_modeled_seconds, strict=True)
        if c.pages_zeroed == RECV_PAGES
    ]
    expected = 9 * 12e-6 + 4096 * 1e-6 + 3 * 5e-6 + 4096 * 0.4e-6
    assert recv
    for counts, seconds in recv:
        assert counts.hypercalls == 9
        assert seconds == pytest.approx(expected)
    assert expected == pytest.approx(5.8574e-3)


@pytest.mark.parametrize("platform", ["tdx", "hyperv-vtom"])
def test_pool_after_warm_up_is_zeroing_only(platform: str) -> None:
    """Once the pool holds enough, an allocation converts nothing: its modeled latency is
    the zeroing of its pages (0.4 us a page), so the p99 of a 16 MiB buffer is 1.6384 ms."""
    run = _run("pool", platform, cycles=4)
    warm = run.allocation_counts[len(run.allocation_counts) // 2 :]
    secs = run.allocation_modeled_seconds[len(run.allocation_counts) // 2 :]
    for counts, seconds in zip(warm, secs, strict=True):
        assert counts.hypercalls == counts.tlb_flushes == counts.pages_converted == 0
        assert seconds == pytest.approx(counts.pages_zeroed * 0.4e-6)
    assert max(secs) == pytest.approx(RECV_PAGES * 0.4e-6)
