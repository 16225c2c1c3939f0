"""pool.guest.uniq.unique is numpy.unique by another route: the two must agree."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pool.guest.uniq import unique


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
