"""Conversion hypercalls: the MapGPA retry protocol, accept pieces, fault injection."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pool.guest.costs import CostProfile
from pool.guest.platform import (
    ERROR,
    PAGE_PRIVATE,
    PAGE_SHARED,
    PAGE_UNKNOWN,
    FaultPlan,
    HostAnswer,
    Platform,
    ScriptedHost,
    SimulatedHost,
    accept_pieces,
)
from pool.guest.stats import GuestStats
from pool.guest.units import PAGES_PER_1G, PAGES_PER_2M


def _tdx(answers=()):
    host = ScriptedHost(deque(answers))
    stats = GuestStats()
    return Platform("tdx", 4 * PAGES_PER_1G, stats, CostProfile.load("tdx"), host), host, stats


def test_mapgpa_ok_first_time_is_one_hypercall():
    p, host, stats = _tdx()
    r = p.convert([(1000, 16)], to_shared=True)
    assert r.ok and r.hypercalls == 1 and stats.hypercalls == 1
    assert host.calls == [(1000, 16, True)]
    assert (p.state[1000:1016] == PAGE_SHARED).all()


def test_mapgpa_retry_with_progress_resets_the_count():
    # Four retries, each with progress: never three without progress, so it succeeds.
    answers = [
        HostAnswer("retry", 1001),
        HostAnswer("retry", 1002),
        HostAnswer("retry", 1003),
        HostAnswer("retry", 1004),
    ]
    p, host, _ = _tdx(answers)
    r = p.convert([(1000, 16)], to_shared=True)
    assert r.ok and r.hypercalls == 5
    assert [c[0] for c in host.calls] == [1000, 1001, 1002, 1003, 1004]
    assert [c[1] for c in host.calls] == [16, 15, 14, 13, 12]


def test_mapgpa_three_retries_without_progress_fail():
    stall = HostAnswer("retry", 1000)
    p, _host, stats = _tdx([stall, stall, stall])
    r = p.convert([(1000, 16)], to_shared=True)
    assert not r.ok and r.hypercalls == 3 and stats.conversion_failures == 1
    assert (p.state[1000:1016] == PAGE_UNKNOWN).all()


def test_mapgpa_progress_resets_then_three_stalls_fail():
    stall = HostAnswer("retry", 1000)
    at = HostAnswer("retry", 1008)
    p, _, _ = _tdx([stall, stall, at, at, at, at])
    # two stalls; progress to 1008 at the third answer resets the count; three stalls fail
    r = p.convert([(1000, 16)], to_shared=True)
    assert not r.ok and r.hypercalls == 6


def test_mapgpa_retry_outside_the_range_fails_at_once():
    p, _, _ = _tdx([HostAnswer("retry", 5000)])
    r = p.convert([(1000, 16)], to_shared=True)
    assert not r.ok and r.hypercalls == 1


def test_failure_leaves_earlier_runs_converted_and_later_runs_untouched():
    p, _, _ = _tdx([HostAnswer("ok"), ERROR])
    r = p.convert([(0, 4), (100, 4), (200, 4)], to_shared=True)
    assert not r.ok and r.unknown_pages == 4
    assert (p.state[0:4] == PAGE_SHARED).all()
    assert (p.state[100:104] == PAGE_UNKNOWN).all()
    assert (p.state[200:204] == PAGE_PRIVATE).all()


def test_accept_pieces_are_greedy_by_alignment_and_length():
    G, M = PAGES_PER_1G, PAGES_PER_2M
    assert accept_pieces(0, G) == (1, 0, 0)
    assert accept_pieces(0, G + M + 3) == (1, 1, 3)
    assert accept_pieces(M - 2, M + 4) == (0, 1, 4)  # 2 pages, one 2M piece, 2 pages
    assert accept_pieces(5, 3) == (0, 0, 3)
    assert accept_pieces(M, 2 * M - 1) == (0, 1, M - 1)


def test_shared_to_private_accepts_every_page():
    p, _, stats = _tdx()
    p.convert([(0, 2 * PAGES_PER_2M + 1)], to_shared=True)
    p.convert([(0, 2 * PAGES_PER_2M + 1)], to_shared=False)
    assert stats.pages_accepted == 2 * PAGES_PER_2M + 1
    assert (stats.accept_calls_2m, stats.accept_calls_4k) == (2, 1)


def test_snp_batches_64_entries_per_vmgexit():
    """VMGEXIT_PSC_MAX_ENTRY = 64: 4096 scattered pages are 4096 entries, 64 VMGEXITs (not
    the protocol's 253, which would be 17)."""
    stats = GuestStats()
    p = Platform("snp", PAGES_PER_1G, stats, CostProfile.load("snp"), SimulatedHost())
    runs = [(i * 2, 1) for i in range(4096)]  # scattered pages: 4096 entries
    r = p.convert(runs, to_shared=True)
    assert r.ok and r.hypercalls == 4096 // 64 == 64
    # a 2 MiB-aligned whole 2 MiB is one entry: 65 such pieces are 2 VMGEXITs
    r = p.convert([(PAGES_PER_2M * 2, 65 * PAGES_PER_2M)], to_shared=True)
    assert r.hypercalls == 2


def test_vtom_batches_510_pfns_per_hypercall():
    """HV_MAX_MODIFY_GPA_REP_COUNT = 510: 4096 scattered pages -> ceil(4096 / 510) = 9
    calls (8 full of 510, one of 16); a contiguous range is a PFN per page as well."""
    stats = GuestStats()
    host = ScriptedHost(deque())
    p = Platform("hyperv-vtom", PAGES_PER_1G, stats, CostProfile.load("hyperv-vtom"), host)
    runs = [(i * 2, 1) for i in range(4096)]
    r = p.convert(runs, to_shared=True)
    assert r.ok and r.hypercalls == 9
    assert [n for _, n, _ in host.calls] == [510] * 8 + [16]
    assert (p.state[0:8192:2] == PAGE_SHARED).all()
    r = p.convert([(PAGES_PER_2M * 4, 1020)], to_shared=False)  # 1020 contiguous: 2 calls
    assert r.hypercalls == 2 and stats.pages_accepted == 1020
    # hand-worked cost: 2 calls x 12 us + 1020 pages validated by the paravisor x 1 us
    assert abs(r.modeled_seconds - (2 * 12e-6 + 1020 * 1e-6)) < 1e-12


def test_vtom_failure_leaves_the_failing_call_unknown():
    host = ScriptedHost(deque([HostAnswer("ok"), ERROR]))
    stats = GuestStats()
    p = Platform("hyperv-vtom", PAGES_PER_1G, stats, CostProfile.load("hyperv-vtom"), host)
    r = p.convert([(0, 1500)], to_shared=True)
    assert not r.ok and r.unknown_pages == 510
    assert (p.state[:510] == PAGE_SHARED).all()
    assert (p.state[510:1020] == PAGE_UNKNOWN).all()
    assert (p.state[1020:1500] == PAGE_PRIVATE).all()


def test_registry_is_the_one_list():
    """Every registered platform has a cost section and vice versa; the command lines'
    choices are the registry's."""
    from pool.guest.costs import profile_platforms
    from pool.guest.options import PLATFORMS as OPTION_PLATFORMS
    from pool.guest.platform import PLATFORM_SPECS, PLATFORMS

    assert set(profile_platforms()) == set(PLATFORM_SPECS)
    assert OPTION_PLATFORMS == PLATFORMS
    assert "hyperv-vtom" in PLATFORMS


def test_fault_plan_fail_call_k_and_rate_are_reproducible():
    host = SimulatedHost(FaultPlan(fail_calls=frozenset({3})))
    answers = [host.map_gpa(0, 1, True).status for _ in range(4)]
    assert answers == ["ok", "ok", "error", "ok"]
    a = SimulatedHost(FaultPlan(failure_rate=0.3, seed=9))
    b = SimulatedHost(FaultPlan(failure_rate=0.3, seed=9))
    sa = [a.map_gpa(0, 8, True).status for _ in range(200)]
    assert sa == [b.map_gpa(0, 8, True).status for _ in range(200)]
    assert 30 < sa.count("error") < 90


def test_fault_direction_limits_failures_to_reencryption():
    host = SimulatedHost(FaultPlan(failure_rate=1.0, direction="to_private"))
    assert host.map_gpa(0, 1, True).status == "ok"
    assert host.map_gpa(0, 1, False).status == "error"


def test_none_platform_makes_no_calls():
    stats = GuestStats()
    p = Platform("none", 1024, stats, CostProfile.load("none"), SimulatedHost())
    r = p.convert([(0, 16)], to_shared=True)
    assert r.ok and stats.hypercalls == 0 and not p.encrypts


def test_vtom_vector_path_counts_what_the_call_by_call_path_counts():
    """convert_pages' one-step path (a quiet SimulatedHost) and the call-by-call path (a
    ScriptedHost) give the same counts, seconds and page states for scattered pages."""
    import numpy as np

    pfns = np.array([i * 3 for i in range(1500)] + list(range(9000, 9700)), dtype=np.int64)
    out = []
    for host in (SimulatedHost(), ScriptedHost(deque())):
        stats = GuestStats()
        p = Platform("hyperv-vtom", PAGES_PER_1G, stats, CostProfile.load("hyperv-vtom"), host)
        a = p.convert_pages(pfns, to_shared=True)
        b = p.convert_pages(pfns, to_shared=False)
        out.append((a, b, stats.snapshot(), p.state[:10000].tobytes()))
    (a1, b1, s1, st1), (a2, b2, s2, st2) = out
    assert (a1.hypercalls, b1.hypercalls) == (a2.hypercalls, b2.hypercalls) == (5, 5)
    assert a1.modeled_seconds == pytest.approx(a2.modeled_seconds)
    assert s1.hypercalls == s2.hypercalls and s1.accept_calls_4k == s2.accept_calls_4k
    assert s1.pages_accepted == s2.pages_accepted == 2200
    assert s1.modeled_conversion_seconds == pytest.approx(s2.modeled_conversion_seconds)
    assert st1 == st2


@given(
    st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 700)), min_size=1, max_size=12),
    st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_batching_calls_for_any_runs(gaps_and_lengths, to_shared):
    """Any set of disjoint runs: vTOM makes ceil(pages / 510) calls (a PFN per page), SNP
    ceil(entries / 64) (a 2 MiB entry only where aligned and whole), and every page ends in
    the requested state on both."""
    runs, p = [], 0
    for gap, n in gaps_and_lengths:
        p += gap
        runs.append((p, n))
        p += n
    pages = sum(n for _, n in runs)
    entries = 0
    for start, n in runs:
        q, end = start, start + n
        while q < end:
            q += PAGES_PER_2M if q % PAGES_PER_2M == 0 and end - q >= PAGES_PER_2M else 1
            entries += 1
    want = PAGE_SHARED if to_shared else PAGE_PRIVATE
    for name, calls in (("hyperv-vtom", -(-pages // 510)), ("snp", -(-entries // 64))):
        stats = GuestStats()
        plat = Platform(name, PAGES_PER_1G, stats, CostProfile.load(name), SimulatedHost())
        if not to_shared:
            plat.state[:] = PAGE_SHARED
        r = plat.convert(runs, to_shared)
        assert r.ok and r.hypercalls == calls, name
        for start, n in runs:
            assert (plat.state[start : start + n] == want).all()
