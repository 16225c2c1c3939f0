"""Page-table dump import and export: hand-written excerpts with splits worked out by hand,
the real Linux 6.1 dumps in ../shared/examples/ptdump, malformed input, round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pool.guest import PRIVATE, SHARED, DirectMap, Guest, GuestConfig, Leaf
from pool.guest.ptdump import (
    DEFAULT_PAGE_OFFSET,
    format_ptdump,
    format_size_field,
    parse_ptdump,
)
from pool.guest.units import PAGE_SIZE, PAGES_PER_1G, PAGES_PER_2M, GiB, KiB, MiB

DATA = Path(__file__).parent / "data"
SHARED_EXAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "examples"
G = PAGES_PER_1G  # pages per GiB: 262144
M2 = PAGES_PER_2M  # pages per 2 MiB: 512


def load(name: str) -> DirectMap:
    return parse_ptdump((DATA / name).read_text()).direct_map()


def kb(dm: DirectMap) -> dict[str, int]:
    return {size: n // KiB for size, n in dm.bytes_by_size().items()}


def examples(sub: str) -> Path:
    path = SHARED_EXAMPLES / sub
    if not path.is_dir():
        pytest.skip(f"{path} absent: the shared examples are expected beside the repo (../shared)")
    return path


# ---- the hand-written 5 GiB excerpt ---------------------------------------------------
# tests/data/ptdump-5GiB.txt, PAGE_OFFSET 0xffff888000000000 (no KASLR), physically:
#   [0, 2M)              4K region (608K RW, 4K ro, 1436K RW pte lines)
#   [2M, 1G)             511 x 2M leaves (one "1022M pmd" line)
#   [1G, 2G)             one 1G leaf (pud)
#   [2G, 3G - 2M)        511 x 2M leaves
#   [3G - 2M, 3G - 128K) 4K region, 480 pages (1920K pte)
#   [3G - 128K, 4G)      hole: one non-present line of 1048704K = 1 GiB + 128 KiB
#   [4G, 5G)             one 1G leaf (pud)


def test_hand_written_excerpt_imports_exactly():
    dump = parse_ptdump((DATA / "ptdump-5GiB.txt").read_text())
    assert dump.page_offset == DEFAULT_PAGE_OFFSET
    assert dump.end_pfn == 5 * G
    assert dump.holes() == [(3 * G - 32, 4 * G)]  # 128 KiB = 32 pages below 3 GiB
    assert dump.flag_bytes()["ro"] == 4 * KiB
    dm = dump.direct_map()
    # 4k: 2048K + 1920K = 3968 kB; 2M: 2 x 1022M = 2044 MiB = 2093056 kB; 1G: 2 GiB
    assert kb(dm) == {"4k": 3968, "2M": 2093056, "1G": 2097152}
    assert dm.ram_pages == 4 * G - 32  # 5 GiB - (1 GiB + 128 KiB)
    assert dm.ram_ranges() == [(0, 3 * G - 32), (4 * G, 5 * G)]
    assert [dm.leaf_size_of(p) for p in (0, M2, G, 2 * G, 3 * G - 40, 4 * G)] == [
        "4k",
        "2M",
        "1G",
        "2M",
        "4k",
        "1G",
    ]
    assert list(dm.leaves()) == [
        Leaf(0, M2, "4k", PRIVATE),
        Leaf(M2, G - M2, "2M", PRIVATE),
        Leaf(G, G, "1G", PRIVATE),
        Leaf(2 * G, G - M2, "2M", PRIVATE),
        Leaf(3 * G - M2, M2 - 32, "4k", PRIVATE),
        Leaf(4 * G, G, "1G", PRIVATE),
    ]
    # the dump is the boot state: nothing counted as split
    assert (dm.splits().level2, dm.splits().level3) == (0, 0)
    dm.check_invariants()


def test_kaslr_excerpt_with_a_2g_pud_run_and_trailing_holes():
    dump = parse_ptdump((DATA / "ptdump-kaslr-2G-run.txt").read_text())
    assert dump.page_offset == 0xFF30C23180000000
    # the "2G pud" line is two 1G leaves; the pud-level holes after 5 GiB are dropped
    assert dump.end_pfn == 5 * G
    dm = dump.direct_map()
    assert kb(dm) == {"4k": 2048, "2M": 1022 * 1024, "1G": 3 * 1024 * 1024}
    assert dm.ram_ranges() == [(0, 3 * G), (4 * G, 5 * G)]
    assert dm.n1g == 3 and dm.is_1g.tolist() == [0, 1, 1, 0, 1]
    dm.check_invariants()


# ---- splits worked out by hand ----------------------------------------------------------


def test_single_page_inside_the_1g_leaf_splits_once_at_each_level():
    dm = load("ptdump-5GiB.txt")
    s = dm.set_range(G + 12345, 1, SHARED)
    # the 1G leaf [1G, 2G) -> 512 x 2M (1 level-3), then the 2M leaf holding the page -> 4K
    assert (s.level2, s.level3) == (1, 1)
    assert kb(dm) == {"4k": 3968 + 2048, "2M": 2093056 + 1024 * 1024 - 2048, "1G": 1048576}
    dm.check_invariants()


def test_aligned_2m_range_splits_only_a_1g_leaf_around_it():
    dm = load("ptdump-5GiB.txt")
    # inside the 1G leaf at 4 GiB: the 1G leaf splits (level 3), the 2M range is one whole
    # 2M leaf of the result, so no level-2 split
    s = dm.set_range(4 * G + 7 * M2, M2, SHARED)
    assert (s.level2, s.level3) == (0, 1)
    # inside the run of 2M leaves at 2 GiB: covers one whole 2M leaf, nothing splits
    s = dm.set_range(2 * G + 10 * M2, M2, SHARED)
    assert (s.level2, s.level3) == (0, 0)
    assert dm.leaf_size_of(2 * G + 10 * M2) == "2M"
    dm.check_invariants()


def test_range_straddling_two_2m_leaves_splits_both():
    dm = load("ptdump-5GiB.txt")
    # 10 pages at the end of the 2M leaf [2G, 2G+2M), 10 at the start of the next: neither
    # leaf is covered whole, both split; no 1G leaf around them
    s = dm.set_range(2 * G + M2 - 10, 20, SHARED)
    assert (s.level2, s.level3) == (2, 0)
    assert kb(dm)["4k"] == 3968 + 2 * 2048
    dm.check_invariants()


def test_a_page_of_a_4k_region_splits_nothing():
    dm = load("ptdump-5GiB.txt")
    s = dm.set_range(3 * G - 100, 1, SHARED)
    assert (s.level2, s.level3) == (0, 0)


def scattered_4096() -> np.ndarray:
    """4096 pages: 1200 in 300 2M leaves of the run at 2 GiB (4 pages each), 400 in the 4K
    region below the hole, 2496 in 100 2M regions of the 1G leaf at 1 GiB (~25 each)."""
    a = [2 * G + (i % 300) * M2 + (i // 300) * 5 for i in range(1200)]
    b = [3 * G - M2 + j for j in range(400)]
    c = [G + (k % 100) * M2 + k // 100 for k in range(2496)]
    pages = np.array(a + b + c, dtype=np.int64)
    assert len(pages) == 4096 and len(np.unique(pages)) == 4096
    return np.random.default_rng(7).permutation(pages)


def test_scattered_4096_pages_split_each_2m_leaf_and_1g_leaf_they_touch():
    dm = load("ptdump-5GiB.txt")
    s = dm.set_pages(scattered_4096(), SHARED)
    # level 3: one distinct 1G leaf touched ([1G, 2G)).
    # level 2: distinct 2M leaves touched that were 2M: 300 in the run at 2 GiB, plus 100
    # inside the 1G leaf once it is split to 2M; the 4K region's pages split nothing.
    assert (s.level2, s.level3) == (300 + 100, 1)
    # 4k grows by 400 regions x 2048 kB; 2M: +512 x 2 MiB from the 1G leaf, -400 leaves
    assert kb(dm) == {
        "4k": 3968 + 400 * 2048,
        "2M": 2093056 + (512 - 400) * 2048,
        "1G": 1048576,
    }
    # page by page (what set_pages stands for): the same splits in any order
    one_by_one = load("ptdump-5GiB.txt")
    total = [0, 0]
    for pfn in scattered_4096()[::-1].tolist():
        r = one_by_one.set_range(pfn, 1, SHARED)
        total[0] += r.level2
        total[1] += r.level3
    assert total == [400, 1]
    assert list(one_by_one.leaves()) == list(dm.leaves())
    dm.check_invariants()


# ---- the real Linux 6.1 dumps -----------------------------------------------------------


def test_real_6gib_after_boot_dump():
    dump = parse_ptdump((examples("ptdump") / "linux-6.1-6GiB-after-boot.txt").read_text())
    assert dump.page_offset == 0xFF30C23180000000
    dm = dump.direct_map()
    # pte lines: 7 whole 2M regions (608+4+8+1428, 8+2040, 940+1108, 1100+4+944, 1M+1M,
    # 1856+4+8+8+48+4+120, 428+20+96+1004+500: each 2048K) + 1920K below the hole
    # = 7 x 2048 + 1920 = 16256 kB
    # pmd lines: 408+14+8+8+578+1022+2+26+992+922+100 = 4080 MiB = 4177920 kB
    # pud lines: two 1G leaves, at 0xff30c231c0000000 and 0xff30c232c0000000, i.e. phys
    #            1 GiB and 5 GiB (PAGE_OFFSET 0xff30c23180000000) = 2097152 kB
    assert kb(dm) == {"4k": 16256, "2M": 4177920, "1G": 2097152}
    assert dump.bytes_by_size() == dm.bytes_by_size()
    # 6 GiB of RAM less the 128 KiB below the hole: 16256 + 4177920 + 2097152 = 6291328 kB
    assert dm.ram_pages * PAGE_SIZE == 6 * GiB - 128 * KiB
    assert dump.holes() == [(3 * G - 32, 4 * G)]  # the "1048704K pte" line
    assert dump.end_pfn == 7 * G
    assert np.flatnonzero(dm.is_1g).tolist() == [1, 5]  # phys 1 GiB and 5 GiB
    dm.check_invariants()


def test_real_4gib_after_churn_dump():
    dump = parse_ptdump((examples("ptdump") / "linux-6.1-4GiB-after-churn.txt").read_text())
    dm = dump.direct_map()
    # pte: 7 x 2048K regions (608+4+8+1428, 8+2040, 940+1108, 1100+4+944, 1000+8+16+1024,
    # 1136+4+8+8+48+4+840, 272+16+64+1000+696) + 1920K = 16256 kB
    # pmd: 1652+14+8+8+1380+2+22+926+68 = 4080 MiB = 4177920 kB; no pud line: no 1G leaf
    assert kb(dm) == {"4k": 16256, "2M": 4177920, "1G": 0}
    assert dm.ram_pages * PAGE_SIZE == 4 * GiB - 128 * KiB
    assert dump.end_pfn == 5 * G
    dm.check_invariants()


# ---- malformed input -----------------------------------------------------------------

GOOD = (DATA / "ptdump-5GiB.txt").read_text().splitlines()


def with_line(lineno: int, text: str) -> str:
    lines = list(GOOD)
    lines[lineno - 1] = text
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("lineno", "text", "problem"),
    [
        (4, "0xffff888000000000-0xffff888000098000  608K RW GLB NX", "unknown level"),
        (4, "0xffff888000000000-0xffff888000098000         600K     RW   GLB NX pte", "size"),
        (4, "garbage", "not a page-table dump line"),
        (5, "0xffff888000099000-0xffff88800009a000  4K  ro GLB NX pte", "not contiguous"),
        (5, "0xffff888000098000-0xffff888000099000  4K  ro GLB NX FOO pte", "unknown flag 'FOO'"),
        (5, "0xffff888000098000-0xffff888000099000  4K  GLB NX pte", "one of RW and ro"),
        (5, "0xffff888000098000-0xffff888000099000  4K  ro RW GLB NX pte", "one of RW and ro"),
        (5, "0xffff888000098000-0xffff888000099000  4K  ro GLB pte", "one of NX and x"),
        (5, "0xffff888000098000-0xffff888000099000  4K  ro PSE GLB NX pte", "never show PSE"),
        (7, "0xffff888000200000-0xffff888040000000  1022M  RW GLB NX pmd", "must show PSE"),
        (7, "0xffff888000200000-0xffff888040000000  1022M  RW PSE GLB NX pud", "1 GiB boundary"),
        (5, "0xffff888000098000-0xffff888000099000  4K  ro PSE GLB NX pmd", "2 MiB boundary"),
        (8, "0xffff888040000000-0xffff888080000000  1G  RW PSE GLB NX p4d", "no leaves at p4d"),
    ],
)
def test_malformed_lines_are_named(lineno, text, problem):
    with pytest.raises(ValueError, match=f"ptdump line {lineno}: .*{problem}"):
        parse_ptdump(with_line(lineno, text))


def test_other_malformed_dumps():
    with pytest.raises(ValueError, match="no '---\\[ Low Kernel Mapping \\]---' section"):
        parse_ptdump("---[ User Space ]---\n0x0-0x1000  4K  pte\n")
    with pytest.raises(ValueError, match="has no entries"):
        parse_ptdump("---[ Low Kernel Mapping ]---\n---[ vmalloc() Area ]---\n")
    with pytest.raises(ValueError, match="maps no memory"):
        parse_ptdump("0xffff888000000000-0xffff888000200000  2M  pte\n")
    with pytest.raises(ValueError, match=r"line 1: .*1 GiB aligned"):
        parse_ptdump("0xffff888000200000-0xffff888000400000  2M  RW PSE GLB NX pmd\n")


def test_size_field_is_printed_as_the_kernel_does():
    # "%9lu%c": the largest unit of B K M G T P E that divides the size exactly
    assert format_size_field(608 * KiB) == "      608K"
    assert format_size_field(GiB + 128 * KiB) == "  1048704K"
    assert format_size_field(2 * MiB) == "        2M"
    assert format_size_field(2 * GiB) == "        2G"
    assert format_size_field(1 << 56) == "       64P"
    assert format_size_field(100) == "      100B"


# ---- export and round trips -------------------------------------------------------------


def roundtrip(dm: DirectMap, page_offset: int = DEFAULT_PAGE_OFFSET) -> DirectMap:
    text = format_ptdump(dm, page_offset)
    again = parse_ptdump(text)
    assert again.page_offset == page_offset
    back = again.direct_map()
    assert format_ptdump(back, page_offset) == text  # a fixed point, byte for byte
    return back


def test_export_reimports_the_same_leaves():
    for name in ("ptdump-5GiB.txt", "ptdump-kaslr-2G-run.txt"):
        dm = load(name)
        assert list(roundtrip(dm).leaves()) == list(dm.leaves())
    text = format_ptdump(load("ptdump-5GiB.txt"))
    hole = "0xffff8880bffe0000-0xffff888100000000     1048704K" + " " * 31 + "pte"
    assert hole in text.splitlines()  # as the kernel prints it


def test_real_dumps_reexport_to_the_same_leaves():
    for path in sorted(examples("ptdump").glob("*.txt")):
        dump = parse_ptdump(path.read_text())
        dm = dump.direct_map()
        back = roundtrip(dm, dump.page_offset)
        assert list(back.leaves()) == list(dm.leaves()), path.name


def test_export_after_conversions_that_split_leaves():
    # 1G leaves at 0, 1, 2, 4, 5 and 6 GiB (no boot splits)
    g = Guest(GuestConfig(memory_bytes=6 * GiB, seed=3, boot_splits=()))
    dm = g.direct_map
    dm.set_range(G + 5, 3, SHARED)  # the 1G leaf at 1 GiB and its first 2M leaf: (1, 1)
    # GiB 4 (2M regions 0 and 17) and GiB 5 (region 0): level 2 +3, level 3 +2
    dm.set_pages(np.array([4 * G + 7, 4 * G + 9000, 5 * G + 3]), SHARED)
    dm.set_range(G + 6, 1, PRIVATE)  # back to private: nothing merges
    assert (dm.splits().level2, dm.splits().level3) == (4, 3)
    back = roundtrip(dm)
    assert list(back.leaves()) == list(dm.leaves())  # sizes and attributes
    assert (back.splits().level2, back.splits().level3) == (0, 0)  # now the boot state
    # Linux's own text cannot show the shared bit: without the SHARED token the leaves come
    # back with the same sizes, all private
    plain_dump = parse_ptdump(format_ptdump(dm, mark_shared=False))
    plain = plain_dump.direct_map()
    assert plain.bytes_by_size() == dm.bytes_by_size()
    assert not plain.attr.any()
    assert "SHARED" not in format_ptdump(dm, mark_shared=False)
    # ...but, as on a CoCo guest, the kernel starts a new line where the unprinted encryption
    # bit changes: each shared run and the private run after it repeat the printed flags.
    # Shared runs: pfn G+5 and G+7 (G+6 is private again), 4G+7, 4G+9000, 5G+3: 5 runs, each
    # followed by a private run of the same 4K region -> 10 repeated lines.
    assert len(plain_dump.unprinted_breaks()) == 10
    assert parse_ptdump(format_ptdump(dm)).unprinted_breaks() == []


def test_from_leaves_rejects_bad_runs():
    with pytest.raises(ValueError, match="not aligned"):
        DirectMap.from_leaves(2 * G, [Leaf(M2 + 1, M2, "2M", PRIVATE)])
    with pytest.raises(ValueError, match="overlaps"):
        DirectMap.from_leaves(2 * G, [Leaf(0, G, "1G", PRIVATE), Leaf(100, 5, "4k", PRIVATE)])
    with pytest.raises(ValueError, match="outside"):
        DirectMap.from_leaves(G, [Leaf(G, G, "1G", PRIVATE)])


def test_guest_from_a_dump_layout():
    dm = load("ptdump-5GiB.txt")
    leaves = list(dm.leaves())
    g = Guest.from_layout(dm, GuestConfig(seed=5))
    assert g.direct_map is dm and list(g.direct_map.leaves()) == leaves  # no boot splits added
    assert g.end_pfn == 5 * G
    assert [z.name for z in g.zones] == ["DMA", "DMA32", "Normal"]
    # the allocator covers the dump's RAM less the default reservations (first MiB, 16-64 MiB)
    assert g.allocator.ram == ((256, 4096), (16384, 3 * G - 32), (4 * G, 5 * G))
    g.check_invariants()
    pfn = g.alloc_pages(0)
    assert pfn is not None and pfn >= 4 * G  # Normal first: the 1G leaf at 4 GiB
    r = g.set_memory_decrypted(pfn, 1)
    assert r.ok and (g.stats.direct_map_level2_splits, g.stats.direct_map_level3_splits) == (1, 1)
    g.set_memory_encrypted(pfn, 1)
    g.free_pages(pfn, 0)
    g.check_invariants()


@settings(max_examples=25, deadline=None)
@given(
    holes=st.lists(st.tuples(st.integers(0, 3 * G - 1), st.integers(1, G)), max_size=3),
    changes=st.lists(
        st.tuples(st.integers(0, 3 * G - 1), st.integers(1, 3 * M2), st.booleans()), max_size=6
    ),
    page_offset=st.sampled_from([DEFAULT_PAGE_OFFSET, 0xFF11000000000000, 0xFF30C23180000000]),
)
def test_any_layout_and_conversions_round_trip(holes, changes, page_offset):
    """Random RAM layouts (holes anywhere, any size) with random conversions: the export
    re-imports to the same leaves, sizes and attributes, and re-exports to the same text."""
    ram = np.ones(3 * G, dtype=bool)
    for start, length in holes:
        ram[start : start + length] = False
    ram[0] = True  # pfn 0 mapped, as on x86-64 (the first line starts at PAGE_OFFSET)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], ram.astype(np.int8), [0]))))
    ranges = list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))
    dm = DirectMap(ranges[-1][1], ranges)
    for start, length, shared in changes:
        end = min(start + length, dm.end_pfn)
        if start < end and dm.ram[start:end].all():
            dm.set_range(start, end - start, SHARED if shared else PRIVATE)
    back = roundtrip(dm, page_offset)
    assert list(back.leaves()) == list(dm.leaves())
    assert back.bytes_by_size() == dm.bytes_by_size()
    back.check_invariants()
