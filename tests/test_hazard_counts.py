"""The kept hazard counts (pool.guest.hazards.HazardCounts) against the full scan.

A stateful hypothesis test drives a small guest through every operation that changes page
states, direct-map attributes or vmalloc mappings, with conversion failures injected, and
after each step compares Guest.hazards() (kept incrementally) with hazards.check() (a scan of
every page and area). Golden cases pin the counts the kernel scenarios produce.
"""

from __future__ import annotations

import pickle

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from pool.guest import PAGE_SHARED, FaultPlan, Guest, GuestConfig, HazardReport, VmArea
from pool.guest import hazards as hz
from pool.guest.units import MiB


def _guest(rate: float = 0.0, platform: str = "tdx") -> Guest:
    return Guest(
        GuestConfig(
            memory_bytes=256 * MiB,
            hole=None,
            platform=platform,
            faults=FaultPlan(failure_rate=rate, seed=3),
        )
    )


def test_alias_left_private_counts_every_page_fatal_until_reencrypted():
    g = _guest()
    pfns = np.array([g.alloc_pages(0) for _ in range(8)], dtype=np.int64)
    area = g.vmap(pfns, shared=False)
    area, result = g.set_vmalloc_decrypted(area, alias=False)
    assert result.ok
    # 8 private direct-map aliases to shared pages; the vmalloc mapping itself is shared
    assert g.hazards() == HazardReport(8, 0, 0) == hz.check(g)
    second = g.vmap(pfns[:3], shared=False)  # a second private alias of 3 of them: no new page
    assert g.hazards() == HazardReport(8, 0, 0) == hz.check(g)
    g.vunmap(second)
    g.set_vmalloc_encrypted(area, alias=False)
    assert g.hazards() == HazardReport(0, 0, 0) == hz.check(g)
    g.vunmap(area)  # the area object predates the attribute change: still counted right
    assert g.hazards() == HazardReport(0, 0, 0) == hz.check(g)
    assert not g.hazard_counts.vm_private.any() and not g.hazard_counts.vm_shared.any()


def test_shared_vmap_of_private_pages_is_benign_and_failure_is_unknown():
    g = _guest()
    pfn = g.alloc_pages(2)
    assert pfn is not None
    area = g.vmap(np.arange(pfn, pfn + 4, dtype=np.int64), shared=True)
    assert g.hazards() == HazardReport(0, 4, 0) == hz.check(g)
    g.vunmap(area)
    assert g.hazards() == HazardReport(0, 0, 0)
    failing = _guest(rate=1.0)
    pfn = failing.alloc_pages(4)
    assert pfn is not None
    assert not failing.set_memory_decrypted(pfn, 16).ok
    assert failing.hazards() == HazardReport(0, 0, 16) == hz.check(failing)


def test_counts_survive_clone_and_pickle():
    g = _guest()
    pfns = np.array([g.alloc_pages(0) for _ in range(5)], dtype=np.int64)
    area = g.vmap(pfns, shared=False)
    g.set_vmalloc_decrypted(area, alias=False)
    for other in (g.clone(), pickle.loads(pickle.dumps(g))):
        assert other.hazards() == HazardReport(5, 0, 0) == hz.check(other)
        assert np.array_equal(other.hazard_counts.vm_shared, g.hazard_counts.vm_shared)
    old = pickle.loads(pickle.dumps(g))
    del old.__dict__["hazard_counts"]  # a guest pickled before the counts existed
    restored = pickle.loads(pickle.dumps(old))
    assert restored.hazards() == HazardReport(5, 0, 0)


class HazardCountMachine(RuleBasedStateMachine):
    """Random conversions, mappings and failures; kept counts == scan after every step."""

    areas = Bundle("areas")

    def __init__(self) -> None:
        super().__init__()
        self.g = _guest(rate=0.15)
        self.live: set[int] = set()

    @rule(target=areas, n=st.integers(1, 6), shared=st.booleans(), dup=st.booleans())
    def vmap(self, n: int, shared: bool, dup: bool) -> VmArea:
        got = [self.g.alloc_pages(0) for _ in range(n)]
        pfns = np.array([p for p in got if p is not None], dtype=np.int64)
        if dup:  # an area that lists a page twice, or re-maps pages of the direct map
            pfns = np.concatenate([pfns, pfns[:1], np.array([300, 301], dtype=np.int64)])
        area = self.g.vmap(pfns, shared=shared)
        self.live.add(area.id)
        return area

    @rule(area=areas, decrypt=st.booleans(), alias=st.booleans())
    def convert_area(self, area: VmArea, decrypt: bool, alias: bool) -> None:
        if area.id not in self.live:
            return
        if decrypt:
            self.g.set_vmalloc_decrypted(area, alias=alias)
        else:
            self.g.set_vmalloc_encrypted(area, alias=alias)

    @rule(area=areas)
    def vunmap(self, area: VmArea) -> None:
        if area.id in self.live:
            self.live.discard(area.id)
            self.g.vunmap(area)

    @rule(start=st.integers(256, 16000), n=st.integers(1, 600), decrypt=st.booleans())
    def convert_range(self, start: int, n: int, decrypt: bool) -> None:
        if decrypt:
            self.g.set_memory_decrypted(start, n)
        else:
            self.g.set_memory_encrypted(start, n)

    @rule(n=st.integers(1, 5), keep=st.integers(0, 5), shared=st.booleans(), data=st.data())
    def burst(self, n: int, keep: int, shared: bool, data: st.DataObject) -> None:
        """Several mappings between two readings (the counts apply them lazily): some cancel
        out before anything reads them, some areas mapped earlier go too."""
        made = [self.vmap(2, shared, dup=False) for _ in range(n)]
        for area in made[keep:]:
            self.vunmap(area)
        for area in made[:keep]:
            if data.draw(st.booleans()):
                self.convert_area(area, data.draw(st.booleans()), data.draw(st.booleans()))

    @rule()
    def clone(self) -> None:
        self.g = self.g.clone()

    @invariant()
    def counts_equal_scan(self) -> None:
        assert self.g.hazards() == hz.check(self.g)
        shared = self.g.platform.state == PAGE_SHARED
        assert self.g.hazards().private_alias_to_shared <= int(shared.sum())


TestHazardCountMachine = HazardCountMachine.TestCase
TestHazardCountMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
