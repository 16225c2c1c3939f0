"""Direct-map split rule: golden cases worked out by hand, and a stateful property test."""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pool.guest.directmap import PRIVATE, SHARED, DirectMap
from pool.guest.units import PAGE_SIZE, PAGES_PER_1G, PAGES_PER_2M, GiB, MiB

G = PAGES_PER_1G


def _guest_map(gib: int = 4) -> DirectMap:
    return DirectMap(gib * G, [(0, gib * G)])


def test_boot_layout_uses_largest_leaves_around_a_hole():
    # RAM [0, 3 GiB - 128 KiB) and [4 GiB, 5 GiB): the GiB holding the hole's edge is
    # 2M-mapped, its last partial 2M region 4K-mapped (as the real ptdump shows).
    end = 5 * G
    dm = DirectMap(end, [(0, 3 * G - 32), (4 * G, 5 * G)])
    sizes = dm.bytes_by_size()
    assert sizes["1G"] == 3 * GiB  # [0,1G), [1G,2G), [4G,5G)
    assert sizes["4k"] == (PAGES_PER_2M - 32) * PAGE_SIZE  # 2 MiB - 128 KiB
    assert sizes["2M"] == 1 * GiB - 2 * MiB
    assert sum(sizes.values()) == (3 * G - 32 + G) * PAGE_SIZE
    dm.check_invariants()


def test_one_page_inside_a_1g_leaf_splits_once_at_each_level():
    dm = _guest_map()
    splits = dm.set_range(G + 12345, 1, SHARED)
    assert (splits.level3, splits.level2) == (1, 1)
    sizes = dm.bytes_by_size()
    assert sizes["4k"] == 2 * MiB
    assert sizes["2M"] == 1 * GiB - 2 * MiB
    assert sizes["1G"] == 3 * GiB
    assert dm.leaf_size_of(G + 12345) == "4k"
    assert dm.attr[G + 12345] == SHARED and dm.attr[G + 12344] == PRIVATE
    dm.check_invariants()


def test_aligned_2m_range_inside_1g_leaf_splits_only_the_1g():
    dm = _guest_map()
    splits = dm.set_range(2 * G + 7 * PAGES_PER_2M, PAGES_PER_2M, SHARED)
    assert (splits.level3, splits.level2) == (1, 0)
    assert dm.bytes_by_size()["4k"] == 0
    assert dm.leaf_size_of(2 * G + 7 * PAGES_PER_2M) == "2M"
    dm.check_invariants()


def test_whole_1g_range_keeps_the_leaf():
    dm = _guest_map()
    assert dm.set_range(G, G, SHARED).level3 == 0
    assert dm.bytes_by_size()["1G"] == 4 * GiB


def test_range_straddling_two_2m_leaves_splits_both():
    dm = _guest_map()
    dm.set_range(0, PAGES_PER_2M, PRIVATE)  # no change: same attribute, nothing splits
    assert dm.splits().level3 == 0
    start = G + PAGES_PER_2M - 10  # 10 pages in one 2M leaf, 10 in the next
    splits = dm.set_range(start, 20, SHARED)
    assert (splits.level3, splits.level2) == (1, 2)
    assert dm.bytes_by_size()["4k"] == 4 * MiB


def test_reencrypting_merges_nothing_back():
    dm = _guest_map()
    dm.set_range(G + 5, 1, SHARED)
    before = dm.bytes_by_size()
    splits = dm.set_range(G + 5, 1, PRIVATE)
    assert (splits.level3, splits.level2) == (0, 0)
    assert dm.bytes_by_size() == before
    assert dm.splits().level2 == 1 and dm.splits().level3 == 1


def test_leaf_already_carrying_the_attribute_is_kept():
    dm = _guest_map()
    dm.set_range(G, PAGES_PER_2M * 2, SHARED)  # two whole 2M leaves, shared
    splits = dm.set_range(G + 3, 5, SHARED)  # inside a leaf that is already shared
    assert (splits.level3, splits.level2) == (0, 0)


def test_scattered_pages_split_every_leaf_they_touch():
    dm = _guest_map()
    rng = np.random.default_rng(7)
    pfns = rng.choice(4 * G, size=4096, replace=False).astype(np.int64)
    splits = dm.set_pages(pfns, SHARED)
    assert splits.level3 == len(np.unique(pfns // G))
    assert splits.level2 == len(np.unique(pfns // PAGES_PER_2M))
    assert dm.bytes_by_size()["4k"] == splits.level2 * 2 * MiB
    dm.check_invariants()


def test_per_page_equals_one_page_at_a_time():
    a, b = _guest_map(), _guest_map()
    pfns = np.array([5, 6, G + 100, G + 100 + PAGES_PER_2M, 3 * G + 1], dtype=np.int64)
    total = a.set_pages(pfns, SHARED)
    l2 = l3 = 0
    for pfn in pfns.tolist():
        s = b.set_range(pfn, 1, SHARED)
        l2, l3 = l2 + s.level2, l3 + s.level3
    assert (total.level2, total.level3) == (l2, l3) == (4, 3)
    assert (a.attr == b.attr).all()


def test_leaves_export_reflects_splits():
    dm = _guest_map(2)
    dm.set_range(G + 1, 1, SHARED)
    leaves = list(dm.leaves())
    assert sum(leaf.npages for leaf in leaves) == 2 * G
    assert [(x.size, x.npages, x.attr) for x in leaves[:4]] == [
        ("1G", G, 0),
        ("4k", 1, 0),
        ("4k", 1, 1),
        ("4k", PAGES_PER_2M - 2, 0),
    ]


class DirectMapMachine(RuleBasedStateMachine):
    """Random attribute changes: leaf bytes always sum to RAM, counters match leaf counts."""

    def __init__(self) -> None:
        super().__init__()
        # 3 GiB of address space with a hole in the middle GiB
        self.dm = DirectMap(3 * G, [(0, G + 1000), (2 * G - 777, 3 * G)])
        self.ram = [(0, G + 1000), (2 * G - 777, 3 * G)]
        self.shadow = np.zeros(3 * G, dtype=np.uint8)

    @rule(
        region=st.integers(0, 1),
        offset=st.integers(0, 2**20),
        length=st.integers(1, 3 * 2**18),
        attr=st.sampled_from([PRIVATE, SHARED]),
    )
    def change_range(self, region, offset, length, attr):
        lo, hi = self.ram[region]
        start = lo + offset % (hi - lo)
        n = min(length, hi - start)
        before = self.dm.splits()
        self.dm.set_range(start, n, attr)
        self.shadow[start : start + n] = attr
        after = self.dm.splits()
        assert after.level2 >= before.level2 and after.level3 >= before.level3

    @rule(data=st.data(), attr=st.sampled_from([PRIVATE, SHARED]))
    def change_pages(self, data, attr):
        pages = data.draw(st.lists(st.integers(0, G + 999), min_size=1, max_size=64, unique=True))
        pfns = np.array(pages, dtype=np.int64)
        self.dm.set_pages(pfns, attr)
        self.shadow[pfns] = attr

    @invariant()
    def consistent(self):
        self.dm.check_invariants()
        ram = self.dm.ram[: 3 * G]
        assert (self.dm.attr[: 3 * G][ram] == self.shadow[ram]).all()


DirectMapMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=15, deadline=None
)
TestDirectMapMachine = DirectMapMachine.TestCase
