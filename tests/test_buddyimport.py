"""/proc/buddyinfo import: nr_free exactly preserved (so both indexes, byte for byte against the
kernel's own files), placement seeded and merge-free, clear errors, round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pool.guest import Guest, GuestConfig
from pool.guest.buddy import default_zones
from pool.guest.buddyimport import allocator_from_buddyinfo, buddyinfo_rows
from pool.guest.directmap import DirectMap
from pool.guest.fragmentation import format_buddyinfo, format_extfrag, format_unusable_index
from pool.guest.ptdump import format_ptdump, parse_ptdump
from pool.guest.units import NR_ORDERS, PAGES_PER_1G, GiB

DATA = Path(__file__).parent / "data"
SHARED_EXAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "examples"
G = PAGES_PER_1G
STATES = ("after-boot", "after-churn", "drained")


def examples(sub: str) -> Path:
    path = SHARED_EXAMPLES / sub
    if not path.is_dir():
        pytest.skip(f"{path} absent: the shared examples are expected beside the repo (../shared)")
    return path


def layout_4gib() -> DirectMap:
    """The real 4 GiB guest's direct map when the shared examples are there, else the same
    RAM layout ([0, 3 GiB - 128 KiB) and [4 GiB, 5 GiB)) with the largest leaves."""
    path = SHARED_EXAMPLES / "ptdump" / "linux-6.1-4GiB-after-churn.txt"
    if path.is_file():
        return parse_ptdump(path.read_text()).direct_map()
    return DirectMap(5 * G, [(0, 3 * G - 32), (4 * G, 5 * G)])


def import_rows(dm: DirectMap, rows, seed: int = 1):
    end = dm.end_pfn
    return allocator_from_buddyinfo(end, dm.ram_ranges(), default_zones(end), rows, seed)


@pytest.mark.parametrize("state", STATES)
def test_real_buddyinfo_imports_exactly_and_indexes_match_the_kernel(state):
    base = examples("buddyinfo") / f"linux-6.1-4GiB-{state}"

    def read(suffix: str) -> str:
        return Path(f"{base}.{suffix}").read_text()

    text = read("buddyinfo")
    rows = buddyinfo_rows(text)
    allocator = import_rows(layout_4gib(), rows)
    assert allocator.buddyinfo() == rows  # nr_free per zone per order, exactly
    assert format_buddyinfo(allocator.buddyinfo()) == text
    assert format_extfrag(allocator.buddyinfo()) == read("extfrag_index")
    assert format_unusable_index(allocator.buddyinfo()) == read("unusable_index")
    allocator.check_invariants()  # includes: no two free buddies of one order left unmerged
    free = sum(c << o for _, counts in rows for o, c in enumerate(counts))
    assert allocator.free_pages() == free
    assert allocator.allocated_pages() == allocator.ram_pages - free


def test_placement_is_seeded():
    rows = [
        ("DMA", (0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 3)),
        ("DMA32", (50, 40, 30, 20, 10, 5, 4, 3, 2, 1, 100)),
        ("Normal", (500, 400, 300, 200, 100, 50, 20, 10, 5, 2, 10)),
    ]
    dm = layout_4gib()

    def positions(seed: int) -> list[list[int]]:
        a = import_rows(dm, rows, seed)
        return [a.free_blocks(z, o) for z, _ in rows for o in range(NR_ORDERS)]

    assert positions(4) == positions(4)
    assert positions(4) != positions(5)
    assert import_rows(dm, rows, 5).buddyinfo() == rows


def test_guest_starts_from_imported_free_lists_and_keeps_running():
    rows = [("DMA", (0,) * 10 + (3,)), ("DMA32", (4,) * 10 + (600,)), ("Normal", (9,) * 11)]
    dm = layout_4gib()
    allocator = import_rows(dm, rows)
    g = Guest.from_layout(dm, GuestConfig(seed=2), allocator=allocator)
    assert g.allocator is allocator
    g.check_invariants()
    g.age(2000)  # the churn allocates and frees its own blocks around the imported ones
    g.check_invariants()


def test_import_errors_are_clear():
    dm = layout_4gib()
    zeros = (0,) * NR_ORDERS
    ok = [("DMA", zeros), ("DMA32", zeros), ("Normal", zeros)]
    with pytest.raises(ValueError, match="lists no zone Normal"):
        import_rows(dm, ok[:2])
    with pytest.raises(ValueError, match="zone Movable has free blocks"):
        import_rows(dm, [*ok, ("Movable", (1, *zeros[1:]))])
    # the DMA zone has 4096 pages: five order-10 blocks do not fit
    with pytest.raises(ValueError, match=r"zone DMA: 5120 free pages listed.* only 4096"):
        import_rows(dm, [("DMA", (*zeros[:10], 5)), *ok[1:]])
    # 3000 order-0 pages fit in 4096, but at most one per buddy pair: 2048 pairs
    with pytest.raises(ValueError, match="zone DMA: cannot place 3000 free blocks of order 0"):
        import_rows(dm, [("DMA", (3000, *zeros[1:])), *ok[1:]])
    with pytest.raises(ValueError, match=r"line 2: .*expected 11"):
        buddyinfo_rows("Node 0, zone DMA 0 0 0 0 0 0 0 0 0 0 0\nNode 0, zone DMA32 1 2\n")
    with pytest.raises(ValueError, match="no rows for node 0 \\(nodes found: 1\\)"):
        buddyinfo_rows("Node 1, zone DMA 0 0 0 0 0 0 0 0 0 0 0\n")
    with pytest.raises(ValueError, match="zone DMA of node 0 listed twice"):
        buddyinfo_rows("Node 0, zone DMA" + " 0" * 11 + "\n" + "Node 0, zone DMA" + " 0" * 11)


def test_other_nodes_are_left_out():
    text = "Node 0, zone DMA" + " 1" * 11 + "\nNode 1, zone Normal" + " 2" * 11 + "\n"
    assert buddyinfo_rows(text) == [("DMA", (1,) * 11)]
    assert buddyinfo_rows(text, node=1) == [("Normal", (2,) * 11)]


@pytest.mark.parametrize("age_steps", [0, 30_000])
def test_default_guest_exports_and_reimports_unchanged(age_steps):
    """Export a default guest's direct map and free lists, import both: same leaves, same
    nr_free (pristine, and aged so that its free memory is in small blocks all over)."""
    g = Guest(GuestConfig(memory_bytes=2 * GiB, seed=4))
    g.age(age_steps)
    small_blocks = sum(sum(counts[:9]) for _, counts in g.allocator.buddyinfo())
    assert small_blocks > 1000 if age_steps else small_blocks < 10  # aged: blocks below 2 MiB
    dump_text = format_ptdump(g.direct_map)
    info_text = format_buddyinfo(g.allocator.buddyinfo())
    dm = parse_ptdump(dump_text).direct_map()
    assert list(dm.leaves()) == list(g.direct_map.leaves())
    allocator = import_rows(dm, buddyinfo_rows(info_text), seed=9)
    assert allocator.buddyinfo() == g.allocator.buddyinfo()
    again = Guest.from_layout(dm, allocator=allocator)
    assert format_buddyinfo(again.allocator.buddyinfo()) == info_text
    assert format_ptdump(again.direct_map) == dump_text
    again.check_invariants()


def test_reimport_after_conversions_that_split_leaves():
    g = Guest(GuestConfig(memory_bytes=2 * GiB, seed=6))
    g.age(5_000)
    pfns = [g.alloc_pages(0) for _ in range(64)]
    block = g.alloc_pages(9)
    assert block is not None and None not in pfns
    g.set_memory_decrypted(block, 512)
    area = g.vmap(np.array(pfns, dtype=np.int64), shared=False)
    g.set_vmalloc_decrypted(area)
    assert g.stats.direct_map_level2_splits > 0
    dm = parse_ptdump(format_ptdump(g.direct_map)).direct_map()
    assert list(dm.leaves()) == list(g.direct_map.leaves())
    allocator = import_rows(dm, buddyinfo_rows(format_buddyinfo(g.allocator.buddyinfo())))
    assert allocator.buddyinfo() == g.allocator.buddyinfo()
