"""buddyinfo and the extfrag indexes, byte for byte against real Linux 6.1 output."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pool.guest.buddy import PageAllocator
from pool.guest.fragmentation import (
    c_div,
    c_mod,
    format_buddyinfo,
    format_extfrag,
    format_fragmentation,
    format_unusable,
    format_unusable_index,
    fragmentation_index,
    parse_buddyinfo,
    unusable_free_index,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "examples" / "buddyinfo"
if not EXAMPLES.is_dir():  # a checkout elsewhere: fall back to the shared tree's usual place
    EXAMPLES = Path("/work/shared/examples/buddyinfo")
SETS = ["linux-6.1-4GiB-after-boot", "linux-6.1-4GiB-after-churn", "linux-6.1-4GiB-drained"]


def rows_of(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(zone, counts) for _node, zone, counts in parse_buddyinfo(text)]


@pytest.mark.parametrize("name", SETS)
def test_indexes_reproduce_the_kernels_files_byte_for_byte(name: str) -> None:
    if not EXAMPLES.is_dir():
        pytest.skip(f"examples not found at {EXAMPLES}")
    buddyinfo = (EXAMPLES / f"{name}.buddyinfo").read_text()
    rows = rows_of(buddyinfo)
    assert [zone for zone, _ in rows] == ["DMA", "DMA32", "Normal"]
    assert format_buddyinfo(rows) == buddyinfo
    assert format_extfrag(rows) == (EXAMPLES / f"{name}.extfrag_index").read_text()
    assert format_unusable_index(rows) == (EXAMPLES / f"{name}.unusable_index").read_text()


def test_hand_worked_fragmentation_index() -> None:
    # The drained DMA32 row, order 9 (2 MiB):
    #   free_pages  = 3 + 2*2 + 3*4 + 19653*8 + 3768*16 + 164*32 + 4*64 + 4*128 + 5*256
    #               = 3 + 4 + 12 + 157224 + 60288 + 5248 + 256 + 512 + 1280 = 224827
    #   free_blocks_total = 3 + 2 + 3 + 19653 + 3768 + 164 + 4 + 4 + 5 = 23606
    #   no block of order >= 9: not -1000
    #   224827 * 1000 / 512 = 439115 (truncated); (1000 + 439115) / 23606 = 18 (truncated)
    #   index = 1000 - 18 = 982, printed " 0.982" (the kernel's file says so too)
    row = (3, 2, 3, 19653, 3768, 164, 4, 4, 5, 0, 0)
    assert fragmentation_index(row, 9) == 982
    assert format_fragmentation(982) == " 0.982"
    # Order 8: a 256-page block is free (5 of them): -1000, printed "-1.000".
    assert fragmentation_index(row, 8) == -1000
    assert format_fragmentation(-1000) == "-1.000"


def test_hand_worked_unusable_index() -> None:
    # Same row, order 4 (64 KiB): suitable blocks, counted in order-4 units:
    #   3768 + 164*2 + 4*4 + 4*8 + 5*16 = 3768 + 328 + 16 + 32 + 80 = 4224 blocks
    #   -> 4224 << 4 = 67584 pages in suitable blocks
    #   (224827 - 67584) * 1000 / 224827 = 157243000 / 224827 = 699 (truncated) -> "0.699"
    row = (3, 2, 3, 19653, 3768, 164, 4, 4, 5, 0, 0)
    assert unusable_free_index(row, 4) == 699
    assert format_unusable(699) == "0.699"
    assert unusable_free_index(row, 0) == 0
    assert unusable_free_index((0,) * 11, 3) == 1000  # nothing free: all of it unusable
    assert format_unusable(1000) == "1.000"


def test_edge_cases_of_the_fragmentation_index() -> None:
    assert fragmentation_index((0,) * 11, 5) == 0  # no free blocks at all
    # One free order-0 page, request order 1: 1000 - (1000 + 1*1000/2) / 1 = -500. The kernel
    # computes this in unsigned 64-bit arithmetic and returns it as an int: -500 as well, and
    # prints it with "%2d.%03d" of (-500 / 1000, -500 % 1000) = (0, -500): " 0.-500".
    one_page = (1,) + (0,) * 10
    assert fragmentation_index(one_page, 1) == -500
    assert format_fragmentation(-500) == " 0.-500"
    # 1024 order-0 pages, order-10 request: 1000 - (1000 + 1024000/1024)/1024 = 1000 - 1 = 999.
    assert fragmentation_index((1024,) + (0,) * 10, 10) == 999
    with pytest.raises(ValueError):
        fragmentation_index((0,) * 10, 0)
    with pytest.raises(ValueError):
        unusable_free_index((0,) * 11, 11)


def test_c_division_truncates_toward_zero() -> None:
    assert (c_div(-1000, 1000), c_mod(-1000, 1000)) == (-1, 0)
    assert (c_div(-1500, 1000), c_mod(-1500, 1000)) == (-1, -500)
    assert (c_div(-7, 2), c_mod(-7, 2)) == (-3, -1)  # Python's // would give -4 and 1
    assert (c_div(7, -2), c_mod(7, -2)) == (-3, 1)
    assert format_fragmentation(-1500) == "-1.-500"
    assert format_fragmentation(0) == " 0.000"
    assert format_fragmentation(1000) == " 1.000"


@given(st.lists(st.integers(0, 10**6), min_size=11, max_size=11), st.integers(0, 10))
def test_indexes_stay_in_range(counts: list[int], order: int) -> None:
    unusable = unusable_free_index(counts, order)
    assert 0 <= unusable <= 1000
    frag = fragmentation_index(counts, order)
    assert frag == -1000 or -1000 < frag <= 1000
    if any(counts[order:]):
        assert frag == -1000 and (order > 0 or unusable == 0)


def test_buddyinfo_layout_and_round_trip() -> None:
    a = PageAllocator(2 * 4096, [(0, 2 * 4096)])
    a.alloc(0)
    text = format_buddyinfo(a.buddyinfo())
    assert text == (
        "Node 0, zone      DMA      0      0      0      0      0      0      0      0      0"
        "      0      4 \n"
        "Node 0, zone    DMA32      1      1      1      1      1      1      1      1      1"
        "      1      3 \n"
    )
    assert parse_buddyinfo(text) == [
        (0, "DMA", (0,) * 10 + (4,)),
        (0, "DMA32", (1,) * 10 + (3,)),
    ]
    assert format_buddyinfo([("Normal", (1234567,) + (0,) * 10)], node=1).startswith(
        "Node 1, zone   Normal 1234567      0 "
    )


def test_parse_buddyinfo_names_the_bad_line() -> None:
    good = format_buddyinfo([("DMA", (0,) * 10 + (3,))])
    with pytest.raises(ValueError, match="line 2"):
        parse_buddyinfo(good + "Node 0, zone DMA32 1 2 3\n")
    with pytest.raises(ValueError, match="line 3"):
        parse_buddyinfo(good + "\n" + "garbage\n")
    with pytest.raises(ValueError, match="line 1"):
        parse_buddyinfo("Node x, zone DMA 0 0 0 0 0 0 0 0 0 0 0\n")
    assert parse_buddyinfo("") == []
