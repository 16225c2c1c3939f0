"""The memory map with the pool on it: the guest's 2 MiB regions (pool.guest.memmap) plus
what a strategy's pre-decrypted chunks hold in each, and the map's compact JSON form.

A region's pool state, from the strategy's chunk pages (ChunkHolder.chunk_pages) in it:
leaked if any of its pages is leaked (unknown state: never reused, the one state an
operator must act on); otherwise free (no page in a buffer), full (no free page) or
partial; a region with pages of a boot reservation shows the boot_* variant of the same,
because memory taken before the guest aged is the physical limit of option 3 and is
worth telling apart from growth. A strategy without chunks (the vmalloc strategies) leaves
every region "none".

The JSON form (GET /v1/memory-map, compare --map) carries one byte per region, base64
(or a run-length list: [[code, count], ...]), the field layout that decodes it, totals by
field value, the regions of each hazard kind, and the guest's hazard page counts. Nothing
in it names a client or a buffer.
"""

from __future__ import annotations

import base64
import json
from functools import cache
from importlib import resources
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from pool.guest.machine import Guest
from pool.guest.memmap import FIELDS, POOL, REGION_BYTES, REGION_PAGES, GuestMap, guest_map
from pool.strategy import CHUNK_PAGE_STATES, ChunkHolder, ChunkPages

ENCODINGS = ("base64", "runs")

_NONE, _FREE, _PARTIAL, _FULL, _LEAKED = range(5)
_BOOT_OFFSET = 4  # free -> boot_free, partial -> boot_partial, full -> boot_full


def chunk_pages_of(strategy: object) -> list[ChunkPages]:
    """The strategy's chunk pages; none for a strategy that keeps no chunks."""
    return strategy.chunk_pages() if isinstance(strategy, ChunkHolder) else []


def _pages_per_region(
    runs: list[ChunkPages], nregions: int, keep: set[str], boot_only: bool = False
) -> npt.NDArray[np.int64]:
    """Pages of the runs in `keep` states in each region. Vectorized: the count below each
    region boundary x is the sum of min(len, x - start) over the runs starting below x,
    which for sorted disjoint runs is a prefix sum minus the overhang of the last one."""
    sel = [r for r in runs if r.state in keep and (r.boot or not boot_only)]
    if not sel:
        return np.zeros(nregions, dtype=np.int64)
    starts = np.fromiter((r.start for r in sel), dtype=np.int64, count=len(sel))
    lengths = np.fromiter((r.npages for r in sel), dtype=np.int64, count=len(sel))
    order = np.argsort(starts, kind="stable")
    starts, lengths = starts[order], lengths[order]
    ends = starts + lengths
    cum = np.cumsum(lengths)
    bounds = np.arange(nregions + 1, dtype=np.int64) * REGION_PAGES
    i = np.searchsorted(starts, bounds, side="left")
    last = np.maximum(i - 1, 0)
    below = np.where(i > 0, cum[last] - np.maximum(ends[last] - bounds, 0), 0)
    return np.diff(below)


def pool_states(runs: list[ChunkPages], nregions: int) -> npt.NDArray[np.uint8]:
    """Each region's POOL value index (see the module docstring for the rule)."""
    for r in runs:
        if r.state not in CHUNK_PAGE_STATES:
            raise ValueError(f"chunk run at {r.start:#x}: unknown state {r.state!r}")
    free = _pages_per_region(runs, nregions, {"free"})
    used = _pages_per_region(runs, nregions, {"used"})
    leaked = _pages_per_region(runs, nregions, {"leaked"})
    boot = _pages_per_region(runs, nregions, {"free", "used"}, boot_only=True)
    held = free + used
    base = np.where(used == 0, _FREE, np.where(free == 0, _FULL, _PARTIAL))
    base = np.where(boot > 0, base + _BOOT_OFFSET, base)
    out = np.where(held > 0, base, _NONE)
    return np.where(leaked > 0, _LEAKED, out).astype(np.uint8)


@attrs.frozen(eq=False)
class MemoryMap:
    """The map of one guest under one strategy, at one moment."""

    strategy: str
    platform: str
    memory_bytes: int
    map: GuestMap
    hazard_pages: dict[str, int]

    def encode(self, encoding: str = "base64") -> dict[str, Any]:
        """The JSON form (module docstring). ValueError names an unknown encoding."""
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}: expected one of {ENCODINGS}")
        codes = self.map.codes
        out: dict[str, Any] = {
            "strategy": self.strategy,
            "platform": self.platform,
            "memory_bytes": self.memory_bytes,
            "region_bytes": REGION_BYTES,
            "regions": len(codes),
            "fields": {f.name: f.as_json() for f in FIELDS},
            "encoding": encoding,
        }
        if encoding == "base64":
            out["codes"] = base64.b64encode(codes.tobytes()).decode("ascii")
        else:
            out["codes"] = run_lengths(codes)
        out["totals"] = self.map.counts()
        out["hazard_regions"] = {k: v.tolist() for k, v in self.map.hazard_regions.items()}
        out["hazard_pages"] = dict(self.hazard_pages)
        return out


def run_lengths(codes: npt.NDArray[np.uint8]) -> list[list[int]]:
    """[[code, count], ...]: consecutive regions of one code as one pair."""
    if not len(codes):
        return []
    edges = np.flatnonzero(np.diff(codes)) + 1
    starts = np.concatenate(([0], edges))
    counts = np.diff(np.concatenate((starts, [len(codes)])))
    return [[int(c), int(n)] for c, n in zip(codes[starts], counts, strict=True)]


def decode(doc: dict[str, Any]) -> npt.NDArray[np.uint8]:
    """The region codes of a JSON form (either encoding): what a reader of the API does."""
    if doc["encoding"] == "base64":
        return np.frombuffer(base64.b64decode(doc["codes"]), dtype=np.uint8).copy()
    return np.repeat(
        np.array([c for c, _ in doc["codes"]], dtype=np.uint8),
        [n for _, n in doc["codes"]],
    )


def memory_map(guest: Guest, strategy: object, name: str) -> MemoryMap:
    """The guest's map with `strategy`'s chunks on it (`name`: the strategy's name)."""
    gm = guest_map(guest)
    gm = gm.with_pool(pool_states(chunk_pages_of(strategy), gm.regions))
    return MemoryMap(
        strategy=name,
        platform=guest.config.platform,
        memory_bytes=guest.config.memory_bytes,
        map=gm,
        hazard_pages=guest.hazards().as_json(),
    )


@cache
def palette() -> dict[str, Any]:
    """The colours of every field value (pool/memmap_palette.json): the one place the page
    (daemon/static) and compare --map's PNGs (hv_netvsc_sim.maps) take them from."""
    text = resources.files("pool").joinpath("memmap_palette.json").read_text()
    data: dict[str, Any] = json.loads(text)
    for f in FIELDS:
        missing = set(f.values) - set(data["colours"][f.name])
        if missing:
            raise ValueError(f"memmap_palette.json: no colour for {f.name} {sorted(missing)}")
    return data


__all__ = [
    "ENCODINGS",
    "POOL",
    "MemoryMap",
    "chunk_pages_of",
    "decode",
    "memory_map",
    "palette",
    "pool_states",
    "run_lengths",
]
