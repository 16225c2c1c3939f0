"""The Guest facade: the kernel's conversion sequence, hazards, leaks, determinism."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pool.guest import (
    PAGE_PRIVATE,
    PAGE_SHARED,
    PAGE_UNKNOWN,
    CostProfile,
    FaultPlan,
    Guest,
    GuestConfig,
)
from pool.guest.units import PAGES_PER_2M, GiB, MiB


def small(**kw) -> Guest:
    kw.setdefault("memory_bytes", 2 * GiB)
    kw.setdefault("hole", None)
    return Guest(GuestConfig(**kw))


def test_default_guest_layout():
    g = Guest()
    ram = g.config.ram_ranges()
    assert ram == [(0, 3 * GiB >> 12), (4 * GiB >> 12, 17 * GiB >> 12)]
    sizes = g.direct_map.bytes_by_size()
    assert sum(sizes.values()) == 16 * GiB
    # boot splits: the first 2 MiB at least, and every split GiB is visible
    assert sizes["4k"] >= 2 * MiB and sizes["1G"] <= 15 * GiB
    assert g.stats.direct_map_level2_splits == 0  # boot splits are not counted
    g.check_invariants()


def test_decrypting_an_order10_block_converts_once_and_splits_only_its_1g_leaf():
    g = small(boot_splits=())
    pfn = g.alloc_pages(10)
    assert pfn is not None
    r = g.set_memory_decrypted(pfn, 1024)
    assert r.ok and r.hypercalls == 1
    s = g.stats
    assert (s.direct_map_level3_splits, s.direct_map_level2_splits) == (1, 0)
    assert s.cache_flushed_pages == 1024 and s.tlb_flushes == 2 + 1  # before, after, split
    assert (g.platform.state[pfn : pfn + 1024] == PAGE_SHARED).all()
    assert g.hazards().private_alias_to_shared == 0
    r = g.set_memory_encrypted(pfn, 1024)
    assert r.ok and s.pages_accepted == 1024 and s.accept_calls_2m == 2
    g.free_pages(pfn, 10)
    g.check_invariants()


def _vmalloc(g: Guest, n: int = 512) -> np.ndarray:
    pfns = [g.alloc_pages(0) for _ in range(n)]
    assert None not in pfns
    return np.array(pfns, dtype=np.int64)


def test_vmalloc_without_alias_processing_leaves_fatal_hazards():
    g = small()
    area = g.vmap(_vmalloc(g), shared=False)
    area, r = g.set_vmalloc_decrypted(area, alias=False)
    assert r.ok and r.hypercalls == 512  # one MapGPA per page for vmalloc addresses
    h = g.hazards()
    assert h.private_alias_to_shared == 512 and h.shared_alias_to_private == 0
    assert g.stats.direct_map_level2_splits == 0
    area, r = g.set_vmalloc_encrypted(area, alias=False)
    assert g.hazards().private_alias_to_shared == 0


def test_vmalloc_with_alias_processing_splits_each_2m_leaf_it_touches():
    g = small(boot_splits=())
    pfns = _vmalloc(g)
    area = g.vmap(pfns, shared=False)
    area, r = g.set_vmalloc_decrypted(area, alias=True)
    assert r.ok and g.hazards().private_alias_to_shared == 0
    regions = len(np.unique(pfns // PAGES_PER_2M))
    assert g.stats.direct_map_level2_splits == regions
    area, _ = g.set_vmalloc_encrypted(area, alias=True)
    assert g.stats.direct_map_level2_splits == regions  # nothing merges back
    g.vunmap(area)
    g.free_page_list(pfns)
    g.check_invariants()


def test_free_refuses_shared_and_unknown_pages():
    g = small(faults=FaultPlan(fail_calls=frozenset({2})))
    a = g.alloc_pages(4)
    b = g.alloc_pages(4)
    assert g.set_memory_decrypted(a, 16).ok
    with pytest.raises(ValueError, match="not private"):
        g.free_pages(a, 4)
    r = g.set_memory_decrypted(b, 16)  # the 2nd MapGPA fails
    assert not r.ok and r.unknown_pages == 16
    assert (g.platform.state[b : b + 16] == PAGE_UNKNOWN).all()
    with pytest.raises(ValueError, match="not private"):
        g.free_pages(b, 4)
    assert g.hazards().unknown_state_pages == 16
    g.check_invariants()


def test_failed_reencryption_keeps_the_shared_mapping_and_unknown_pages():
    g = small(faults=FaultPlan(fail_calls=frozenset({2})))
    a = g.alloc_pages(2)
    g.set_memory_decrypted(a, 4)
    r = g.set_memory_encrypted(a, 4)
    assert not r.ok
    assert (g.direct_map.attr[a : a + 4] == 1).all()  # vmm_fail: page tables untouched
    assert (g.platform.state[a : a + 4] == PAGE_UNKNOWN).all()
    assert g.hazards().private_alias_to_shared == 0  # never a private mapping to a shared page


def test_zeroing_and_writes_model_contents():
    g = small()
    a = g.alloc_pages(0)
    g.write([(a, 1)], tag=42)
    assert g.content[a] == 42
    g.zero([(a, 1)])
    assert g.content[a] == 0 and g.stats.pages_zeroed == 1


def test_none_platform_converts_nothing():
    g = small(platform="none")
    a = g.alloc_pages(0)
    r = g.set_memory_decrypted(a, 1)
    assert r.ok and g.stats.hypercalls == 0 and g.stats.direct_map_level2_splits == 0


def test_clone_is_independent_and_deterministic():
    g = small()
    g.age(5_000)
    c = g.clone()
    a = g.alloc_pages(0)
    b = c.alloc_pages(0)
    assert a == b
    g.set_memory_decrypted(a, 1)
    assert c.platform.state[b] == PAGE_PRIVATE and c.stats.hypercalls == 0
    g2 = small()
    g2.age(5_000)
    assert [z.nr_free for z in g2.zone_reports()] == [
        z.nr_free for z in small_aged().zone_reports()
    ]


def small_aged() -> Guest:
    g = small()
    g.age(5_000)
    return g


def test_cost_profile_override_and_errors(tmp_path: Path):
    f = tmp_path / "costs.toml"
    f.write_text("[tdx]\nhypercall_seconds = 1.0\n")
    assert CostProfile.load("tdx", f).hypercall_seconds == 1.0
    f.write_text("[tdx]\nhypercal_seconds = 1.0\n")
    with pytest.raises(ValueError, match=r"unknown key tdx\.hypercal_seconds"):
        CostProfile.load("tdx", f)
    f.write_text("[tdx]\nhypercall_seconds = -1\n")
    with pytest.raises(ValueError, match=">= 0"):
        CostProfile.load("tdx", f)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"memory_bytes": 1000}, "multiple of 4MiB"),
        ({"platform": "sev"}, "unknown platform"),
        ({"hole": (5, 3)}, "hole"),
    ],
)
def test_config_errors_are_clear(kw, match):
    with pytest.raises(ValueError, match=match):
        GuestConfig(**kw)


def test_demo_command_prints_the_report():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pool.guest",
            "demo",
            "--guest-memory",
            "1GiB",
            "--age-steps",
            "2000",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Node 0, zone   Normal" in out.stdout or "Node 0, zone    DMA32" in out.stdout
    assert "DirectMap4k:" in out.stdout and "after 2,000 churn steps" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "pool.guest", "demo", "--guest-memory", "lots"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "not a size" in bad.stderr and "Traceback" not in bad.stderr


def test_hazard_report_serialises_every_kind():
    """as_json names every kind a report counts (the metric's `kind` labels), unknown_state
    included: no caller adds one back by hand."""
    from pool.guest.hazards import REPORT_KINDS, HazardReport

    report = HazardReport(
        private_alias_to_shared=1, shared_alias_to_private=2, unknown_state_pages=3
    )
    assert report.as_json() == {
        "private_alias_to_shared": 1,
        "shared_alias_to_private": 2,
        "unknown_state": 3,
    }
    assert tuple(report.as_json()) == REPORT_KINDS


def test_background_churn_on_a_pristine_guest_starts_no_pressure_episode() -> None:
    """The first background() call used to run a full memory-pressure episode (page cache up
    to 90 % of RAM, then reclaim); pressure belongs to aging. 1,000 steady steps allocate about
    1,000 blocks and free none (the churn is far below its occupancy target)."""
    g = Guest(GuestConfig(memory_bytes=1 * GiB, hole=None))
    g.background(1_000)
    assert g.churn.steps_done == 1_000
    assert g.churn.live_pages < 0.05 * g.allocator.ram_pages
    assert g.churn.frees_made == 0
    aged = Guest(GuestConfig(memory_bytes=1 * GiB, hole=None))
    aged.age(1_000)  # aging starts with the episode
    assert aged.churn.live_pages >= 0.7 * aged.allocator.ram_pages
    g.check_invariants()


def test_guest_vcpus_setting() -> None:
    g = Guest(GuestConfig(memory_bytes=1 * GiB, hole=None, cpus=2))
    assert g.allocator.cpus == 2
    g.age(2_000)  # the churn takes the vCPUs in turn
    assert g.allocator.pcp("DMA32", 0).count + g.allocator.pcp("DMA32", 1).count == (
        g.allocator.pcp_pages("DMA32")
    )
    g.check_invariants()
    with pytest.raises(ValueError, match="cpus must be in"):
        GuestConfig(cpus=0)
