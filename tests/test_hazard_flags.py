"""The compiled hazard count of a page array (pool.guest._core.hazard_flags) against its
reference, pool.guest.hazards.flags_of: the same arrays, the same pages, the same counts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pool.guest.buddy import compiled_core
from pool.guest.hazards import flags_of

N = 64


@st.composite
def pages(draw: st.DrawFn) -> tuple[np.ndarray, ...]:
    def arr(lo: int, hi: int, dtype: type) -> np.ndarray:
        return np.array(draw(st.lists(st.integers(lo, hi), min_size=N, max_size=N)), dtype=dtype)

    sel = np.array(sorted(draw(st.sets(st.integers(0, N - 1)))), dtype=np.int64)
    return (
        arr(0, 2, np.uint8),  # private, shared, unknown
        arr(0, 1, np.bool_),  # RAM or a hole
        arr(0, 1, np.uint8),  # direct-map alias private or shared
        arr(0, 2, np.uint16),  # private vmalloc mappings
        arr(0, 2, np.uint16),  # shared vmalloc mappings
        sel,
    )


@settings(max_examples=300, deadline=None)
@given(case=pages())
def test_the_compiled_count_is_the_reference(case: tuple[np.ndarray, ...]) -> None:
    core = compiled_core()
    assert core is not None, "pool.guest._core is not built (pip install -e .)"
    assert core.hazard_flags(*case) == flags_of(*case)


def test_a_page_outside_the_arrays_is_an_index_error() -> None:
    core = compiled_core()
    assert core is not None
    arrays = (
        np.zeros(8, np.uint8),
        np.ones(8, np.bool_),
        np.zeros(8, np.uint8),
        np.zeros(8, np.uint16),
        np.zeros(8, np.uint16),
    )
    with pytest.raises(IndexError):
        core.hazard_flags(*arrays, np.array([3, 8], dtype=np.int64))
    with pytest.raises(IndexError):
        flags_of(*arrays, np.array([3, 8], dtype=np.int64))
