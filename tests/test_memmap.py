"""The memory map (pool.guest.memmap, pool.memmap) and its JSON encoding, on a guest built by
hand: known direct-map leaves, one pool chunk with a buffer in it, one leaked chunk (its
decryption failed), one hazard page (a vmalloc page decrypted without its direct-map alias).
Each region's code is checked against what the kernel's rules say it must be, and against a
naive per-region recomputation from the page arrays; a property test checks the pool-state
rule against a page-by-page count."""

from __future__ import annotations

import base64
import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pool.guest.directmap import PRIVATE, DirectMap, Leaf
from pool.guest.hazards import hazard_pfns
from pool.guest.machine import Guest, GuestConfig
from pool.guest.memmap import ENCRYPTION, FIELDS, HAZARD, LEAF, POOL, guest_map
from pool.guest.platform import PAGE_SHARED, PAGE_UNKNOWN, FaultPlan
from pool.guest.units import PAGES_PER_1G, PAGES_PER_2M, MiB
from pool.memmap import chunk_pages_of, decode, memory_map, palette, pool_states, run_lengths
from pool.registry import make_strategy
from pool.shared import SharedPool
from pool.strategy import ChunkPages

G = PAGES_PER_1G
R = PAGES_PER_2M


def _hand_built() -> tuple[Guest, SharedPool, np.ndarray]:
    """2 GiB: region 0 in 4 KiB leaves, [2 MiB, 1 GiB) in 2 MiB leaves, [1 GiB, 2 GiB) one
    1 GiB leaf. The pool's first growth (MapGPA call 1) succeeds, its second (call 2) fails:
    that chunk is leaked. Then a vmalloc page is decrypted without its alias (call 3...)."""
    leaves = [
        Leaf(0, R, "4k", PRIVATE),
        Leaf(R, G - R, "2M", PRIVATE),
        Leaf(G, G, "1G", PRIVATE),
    ]
    dm = DirectMap.from_leaves(2 * G, leaves)
    config = GuestConfig(faults=FaultPlan(fail_calls=frozenset({2}), direction="to_shared"))
    guest = Guest.from_layout(dm, config)
    pool = SharedPool(guest, initial_bytes=0, low_watermark_bytes=0, high_watermark_bytes=0)
    assert pool.grow(4 * MiB) == 4 * MiB
    assert pool.grow(4 * MiB) == 0  # decryption failed: leaked
    pool.allocate(1 * MiB, owner="secret-owner-name", purpose="rx")
    page = guest.vmalloc_pages(1)
    area = guest.vmap(page, shared=False)
    guest.set_vmalloc_decrypted(area, alias=False)
    return guest, pool, page


def _field(codes: np.ndarray, f) -> list[str]:
    return [f.values[v] for v in f.of(codes).tolist()]


def test_hand_built_guest_regions_have_the_codes_the_rules_give() -> None:
    guest, pool, page = _hand_built()
    mm = memory_map(guest, pool, "pool")
    codes = mm.map.codes
    assert len(codes) == 1024
    (good,) = [c for c in pool.chunks.values() if not c.leaked]
    (bad,) = [c for c in pool.chunks.values() if c.leaked]
    assert good.order == bad.order == 10  # 4 MiB: two regions each
    g0, b0 = good.pfn // R, bad.pfn // R
    hz = int(page[0]) // R

    leaf = _field(codes, LEAF)
    assert leaf[0] == "4k"
    # a 2 MiB-aligned chunk never splits a 2 MiB leaf; decrypting one inside the 1 GiB leaf
    # splits that leaf into 2 MiB leaves (__should_split_large_page), once
    chunk_in_upper_gib = any(c.pfn >= G for c in pool.chunks.values())
    assert set(leaf[1:512]) == {"2M"}
    assert set(leaf[512:]) == ({"2M"} if chunk_in_upper_gib else {"1G"})

    pool_v = _field(codes, POOL)
    # the buffer (256 pages) took the start of the chunk: its first region partly used
    assert pool_v[g0] == "partial" and pool_v[g0 + 1] == "free"
    assert pool_v[b0] == pool_v[b0 + 1] == "leaked"
    others = set(range(1024)) - {g0, g0 + 1, b0, b0 + 1}
    assert {pool_v[i] for i in others} == {"none"}

    enc = _field(codes, ENCRYPTION)
    assert enc[g0] == enc[g0 + 1] == "shared"
    assert enc[b0] == enc[b0 + 1] == "unknown"  # the failed call's pages: state unknown
    assert enc[hz] == "mixed"  # one shared page among private ones
    assert {enc[i] for i in others - {hz}} == {"private"}

    haz = _field(codes, HAZARD)
    assert [i for i, v in enumerate(haz) if v == "present"] == [hz]
    assert mm.map.hazard_regions["private_alias_to_shared"].tolist() == [hz]
    assert mm.map.hazard_regions["shared_alias_to_private"].tolist() == []
    assert mm.hazard_pages == {
        "private_alias_to_shared": 1,
        "shared_alias_to_private": 0,
        "unknown_state": 1024,
    }


def test_json_encoding_round_trips_and_names_no_client() -> None:
    guest, pool, _ = _hand_built()
    mm = memory_map(guest, pool, "pool")
    doc = mm.encode()
    text = json.dumps(doc)
    assert "secret-owner-name" not in text and "owner" not in text and '"id"' not in text
    assert doc["encoding"] == "base64" and doc["regions"] == 1024
    assert doc["region_bytes"] == 2 * MiB
    raw = base64.b64decode(doc["codes"])
    assert len(raw) == 1024
    assert np.array_equal(np.frombuffer(raw, np.uint8), mm.map.codes)
    assert np.array_equal(decode(doc), mm.map.codes)
    # the field layout in the document decodes a code the way pool.guest.memmap does
    for f in FIELDS:
        spec = doc["fields"][f.name]
        assert (spec["shift"], spec["bits"], tuple(spec["values"])) == (f.shift, f.bits, f.values)
    for name, counts in doc["totals"].items():
        assert sum(counts.values()) == 1024, name
    assert doc["totals"]["pool"]["leaked"] == 2 and doc["totals"]["hazard"]["present"] == 1

    runs = mm.encode("runs")
    assert sum(n for _, n in runs["codes"]) == 1024
    assert all(a[0] != b[0] for a, b in zip(runs["codes"], runs["codes"][1:], strict=False))
    assert np.array_equal(decode(runs), mm.map.codes)
    with pytest.raises(ValueError, match="unknown encoding 'hex'"):
        mm.encode("hex")


def _naive_codes(guest: Guest, strategy: object) -> np.ndarray:
    """Per region, straight from the page arrays and hazard_pfns: the slow definition."""
    dm, state = guest.direct_map, guest.platform.state
    n = len(dm.level)
    fatal = set((hazard_pfns(guest, "private_alias_to_shared") // R).tolist())
    benign = set((hazard_pfns(guest, "shared_alias_to_private") // R).tolist())
    pages = np.zeros(n * R, dtype=np.int8)  # 0 none, 1 free, 2 used, 3 leaked
    boot = np.zeros(n * R, dtype=bool)
    for r in chunk_pages_of(strategy):
        pages[r.start : r.start + r.npages] = {"free": 1, "used": 2, "leaked": 3}[r.state]
        boot[r.start : r.start + r.npages] = r.boot
    out = np.zeros(n, dtype=np.uint8)
    for i in range(n):
        lo, hi = i * R, (i + 1) * R
        ram = dm.ram[lo:hi]
        if not ram.any():
            leaf = 0
        else:
            leaf = {"4k": 1, "2M": 2, "1G": 3}[dm.leaf_size_of(lo + int(np.argmax(ram)))]
        s = state[lo:hi][ram[: len(state[lo:hi])]]
        if (s == PAGE_UNKNOWN).any():
            enc = 3
        elif (s == PAGE_SHARED).all() and len(s):
            enc = 1
        elif (s == PAGE_SHARED).any():
            enc = 2
        else:
            enc = 0
        p = pages[lo:hi]
        if (p == 3).any():
            pv = 4
        elif not (p > 0).any():
            pv = 0
        else:
            pv = 1 if not (p == 2).any() else (3 if not (p == 1).any() else 2)
            if boot[lo:hi][p > 0].any():
                pv += 4
        hz = int(i in fatal or i in benign)
        out[i] = leaf | enc << 2 | pv << 4 | hz << 7
    return out


@pytest.mark.parametrize("name", ["pool", "pool-boot", "vmalloc-alias", "swiotlb", "atomic-pool"])
def test_vectorized_map_equals_the_naive_definition(name: str) -> None:
    guest = Guest(GuestConfig(memory_bytes=2048 * MiB, hole=None, seed=3))
    strategy = make_strategy(name, guest)
    strategy.boot()
    guest.age(3000)
    strategy.setup()
    size = 128 * 1024 if name == "swiotlb" else 32 * 1024 if name == "atomic-pool" else MiB
    live = [strategy.allocate(size, "o") for _ in range(6)]
    if name == "atomic-pool":
        strategy.maintain(1.0)  # expand (a second chunk) below the pool's size available
    strategy.free(live[2].id, "o")
    mm = memory_map(guest, strategy, name)
    assert np.array_equal(mm.map.codes, _naive_codes(guest, strategy))
    kept = guest_map(guest)  # the guest's layer alone: pool field 0
    assert np.array_equal(kept.codes & ~np.uint8(POOL.mask), mm.map.codes & ~np.uint8(POOL.mask))


@st.composite
def _runs(draw: st.DrawFn) -> tuple[int, list[ChunkPages]]:
    nregions = draw(st.integers(1, 6))
    total = nregions * R
    cuts = sorted(set(draw(st.lists(st.integers(0, total), max_size=12))))
    bounds = [0, *cuts, total]
    runs = []
    for a, b in itertools.pairwise(bounds):
        if b > a and draw(st.booleans()):
            state = draw(st.sampled_from(["free", "used", "leaked"]))
            runs.append(ChunkPages(a, b - a, state, draw(st.booleans())))
    return nregions, draw(st.permutations(runs))


@settings(max_examples=200, deadline=None)
@given(_runs())
def test_pool_state_rule_matches_a_page_by_page_count(case: tuple[int, list[ChunkPages]]) -> None:
    nregions, runs = case
    got = pool_states(list(runs), nregions)
    for i in range(nregions):
        lo, hi = i * R, (i + 1) * R
        n = {"free": 0, "used": 0, "leaked": 0}
        boot = 0
        for r in runs:
            overlap = max(0, min(hi, r.start + r.npages) - max(lo, r.start))
            n[r.state] += overlap
            boot += overlap if r.boot and r.state != "leaked" else 0
        if n["leaked"]:
            want = "leaked"
        elif not n["free"] + n["used"]:
            want = "none"
        else:
            want = "free" if not n["used"] else "full" if not n["free"] else "partial"
            want = "boot_" + want if boot else want
        assert POOL.values[got[i]] == want, (i, n, boot)


def test_run_lengths_and_palette_cover_every_value() -> None:
    assert run_lengths(np.array([3, 3, 1, 1, 1, 3], np.uint8)) == [[3, 2], [1, 3], [3, 1]]
    assert run_lengths(np.array([], np.uint8)) == []
    colours = palette()["colours"]
    for f in FIELDS:
        assert set(colours[f.name]) == set(f.values)
        assert all(c.startswith("#") and len(c) == 7 for c in colours[f.name].values())


def test_a_strategy_without_chunks_has_no_pool_regions() -> None:
    guest = Guest(GuestConfig(memory_bytes=256 * MiB, hole=None))
    s = make_strategy("vmalloc-directmap", guest)
    s.setup()
    s.allocate(1 * MiB, "o")
    assert chunk_pages_of(s) == []
    counts = memory_map(guest, s, "vmalloc-directmap").map.counts()
    assert counts["pool"]["none"] == 128  # 256 MiB: every region outside any chunk
    assert counts["encryption"]["mixed"] >= 1  # but its buffer's pages are shared
