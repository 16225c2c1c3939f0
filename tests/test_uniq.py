"""pool.guest.uniq.unique is numpy.unique by another route: the two must agree."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pool.guest.uniq import distinct_pages, distinct_regions, unique


@given(st.lists(st.integers(min_value=-(1 << 40), max_value=1 << 40), max_size=300))
def test_unique_is_numpy_unique(values: list[int]) -> None:
    a = np.array(values, dtype=np.int64)
    got = unique(a)
    assert got.dtype == np.int64
    assert np.array_equal(got, np.unique(a))


def test_unique_leaves_its_input_alone() -> None:
    a = np.array([5, 3, 5, 1], dtype=np.int64)
    assert unique(a).tolist() == [1, 3, 5]
    assert a.tolist() == [5, 3, 5, 1]


@given(
    st.lists(st.integers(min_value=0, max_value=1 << 30), max_size=300),
    st.sampled_from([9, 18]),
)
def test_distinct_regions_are_numpy_unique_of_the_shifted_pages(
    values: list[int], shift: int
) -> None:
    pfns = np.array(values, dtype=np.int64)
    pages = distinct_pages(pfns)  # read-only and remembered: so are its regions
    expected = np.unique(np.unique(pfns) >> shift)
    first, again = distinct_regions(pages, shift), distinct_regions(pages, shift)
    assert np.array_equal(first, expected) and again is first
    writable = np.unique(pfns)  # an array that may change is computed afresh each time
    assert np.array_equal(distinct_regions(writable, shift), expected)
    assert distinct_regions(writable, shift) is not distinct_regions(writable, shift)


def test_distinct_pages_remembers_an_area_until_it_is_64_areas_old() -> None:
    areas = [np.arange(i * 10, i * 10 + 5, dtype=np.int64)[::-1].copy() for i in range(65)]
    first = [distinct_pages(a) for a in areas]
    assert distinct_pages(areas[-1]) is first[-1]  # still remembered
    assert distinct_pages(areas[1]) is first[1]  # 63 areas later: still there
    assert distinct_pages(areas[0]) is not first[0]  # 64 later: gone, sorted again
    assert np.array_equal(distinct_pages(areas[0]), first[0])
