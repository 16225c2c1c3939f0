"""The guest's physical memory at 2 MiB granularity: one small code per region.

Why 2 MiB: it is the direct map's large-leaf size, so a region is exactly the unit a split
shatters (arch/x86/mm/pat/set_memory.c, __should_split_large_page) and the unit a pool chunk
of order 9 fills. A 16 GiB guest is 8,704 regions (8,192 of RAM plus the 3-4 GiB PCI hole),
a 64 GiB guest 33,280: one byte each is small enough to send every few seconds.

A region's byte holds four fields (FIELDS, low bits first):
- leaf (2 bits): how the direct map maps the region now: none (no RAM), 4k (split into
  4 KiB leaves), 2M (one 2 MiB leaf), 1G (inside a 1 GiB leaf);
- encryption (2 bits): the page states of its RAM pages (pool.guest.platform):
  private (all), shared (all), mixed, unknown (at least one page of unknown state: a failed
  conversion whose pages must be leaked, CVE-2024-36911);
- pool (3 bits): what a strategy's pre-decrypted chunks hold there; the guest knows nothing
  of pools, so this layer leaves it 0 ("none") and pool.memmap fills it in;
- hazard (1 bit): at least one page of the region has a hazardous mapping, by the rule of
  pool.guest.hazards (a private mapping of a shared page, or a shared mapping of a private
  page, through the direct map or a vmalloc area). The regions of each kind are listed
  apart (GuestMap.hazard_regions): the fatal kind is what an operator must see first.

Cost: computed from the model's arrays with vector operations, never per page in Python.
The only full pass is one OR-reduction over the page-state array (16 MiB at 64 GiB); the
direct-map attribute is read per page only inside 4 KiB-split regions (a 2M or 1G leaf has
one attribute, that of its first page) and the vmalloc mapping counters only inside
regions that can hold a hazard. bench/bench_memmap.py measures it.
"""

from __future__ import annotations

from typing import TypeVar

import attrs
import numpy as np
import numpy.typing as npt

from pool.guest.directmap import IN_1G, LEAF_2M, LEAF_4K, NO_RAM, PRIVATE, SHARED
from pool.guest.hazards import KINDS
from pool.guest.machine import Guest
from pool.guest.platform import PAGE_PRIVATE, PAGE_SHARED, PAGE_UNKNOWN
from pool.guest.uniq import unique
from pool.guest.units import PAGE_SIZE, PAGES_PER_2M

_T = TypeVar("_T", bound=np.generic)

REGION_PAGES = PAGES_PER_2M
REGION_BYTES = REGION_PAGES * PAGE_SIZE


@attrs.frozen
class Field:
    """One field of a region's code: `bits` wide at `shift`, value i means values[i]."""

    name: str
    shift: int
    bits: int
    values: tuple[str, ...]

    @property
    def mask(self) -> int:
        return ((1 << self.bits) - 1) << self.shift

    def of(self, codes: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """This field's value in every code."""
        return ((codes >> self.shift) & ((1 << self.bits) - 1)).astype(np.uint8)

    def as_json(self) -> dict[str, object]:
        return {"shift": self.shift, "bits": self.bits, "values": list(self.values)}


LEAF = Field("leaf", 0, 2, ("none", "4k", "2M", "1G"))
ENCRYPTION = Field("encryption", 2, 2, ("private", "shared", "mixed", "unknown"))
# pool.memmap fills this field: pool chunk state, boot-reservation chunks apart
POOL = Field(
    "pool",
    4,
    3,
    ("none", "free", "partial", "full", "leaked", "boot_free", "boot_partial", "boot_full"),
)
HAZARD = Field("hazard", 7, 1, ("none", "present"))
FIELDS = (LEAF, ENCRYPTION, POOL, HAZARD)

# DirectMap.level (IN_1G, LEAF_2M, LEAF_4K, NO_RAM) -> LEAF's value index
_LEAF_OF_LEVEL = np.zeros(4, dtype=np.uint8)
_LEAF_OF_LEVEL[[IN_1G, LEAF_2M, LEAF_4K, NO_RAM]] = [3, 2, 1, 0]
_ENC_PRIVATE, _ENC_SHARED, _ENC_MIXED, _ENC_UNKNOWN = range(4)


@attrs.frozen(eq=False)
class GuestMap:
    """The guest's memory map: `codes[i]` describes pfns [i * 512, (i + 1) * 512).

    hazard_regions: for each hazard kind (pool.guest.hazards.KINDS), the sorted indexes of
    the regions holding at least one page of that kind."""

    codes: npt.NDArray[np.uint8]
    hazard_regions: dict[str, npt.NDArray[np.int64]]

    @property
    def regions(self) -> int:
        return len(self.codes)

    def field(self, name: str) -> npt.NDArray[np.uint8]:
        for f in FIELDS:
            if f.name == name:
                return f.of(self.codes)
        raise ValueError(f"unknown field {name!r}: expected one of {[f.name for f in FIELDS]}")

    def counts(self) -> dict[str, dict[str, int]]:
        """Regions by value, for every field (every value present, zeros included)."""
        out: dict[str, dict[str, int]] = {}
        for f in FIELDS:
            n = np.bincount(f.of(self.codes), minlength=len(f.values))
            out[f.name] = {v: int(c) for v, c in zip(f.values, n, strict=True)}
        return out

    def with_pool(self, pool_values: npt.NDArray[np.uint8]) -> GuestMap:
        """The same map with POOL set from `pool_values` (one value index per region)."""
        if pool_values.shape != self.codes.shape:
            raise ValueError(f"pool values for {pool_values.shape} regions, map has {self.regions}")
        codes = (self.codes & ~np.uint8(POOL.mask)) | (pool_values.astype(np.uint8) << POOL.shift)
        return GuestMap(codes.astype(np.uint8), self.hazard_regions)


def _rows(arr: npt.NDArray[_T], nregions: int) -> npt.NDArray[_T]:
    """`arr` (one value per pfn) as nregions x 512, zero-padded when it is shorter (a layout
    whose end is not 2 MiB aligned)."""
    need = nregions * REGION_PAGES
    if len(arr) < need:
        arr = np.concatenate((arr, np.zeros(need - len(arr), dtype=arr.dtype)))
    return arr[:need].reshape(nregions, REGION_PAGES)


def _any_nonzero(arr: npt.NDArray[np.uint8], nregions: int) -> npt.NDArray[np.bool_]:
    """Per region: is any byte of `arr` nonzero. One OR-reduction over 64-bit words (8 pages
    a word), the cheapest full pass numpy offers."""
    rows = _rows(arr, nregions)
    if rows.flags.c_contiguous and rows.dtype.itemsize == 1:
        words = rows.view(np.uint64)
        return np.asarray(np.bitwise_or.reduce(words, axis=1) != 0, dtype=np.bool_)
    return np.asarray(rows.any(axis=1), dtype=np.bool_)


def guest_map(guest: Guest) -> GuestMap:
    """The map of `guest` now (pool field 0). Reads the guest only; the hazard counts'
    noted vmalloc mappings are applied first (HazardCounts.flush: what every reader does)."""
    dm = guest.direct_map
    level = dm.level
    nregions = len(level)
    codes = _LEAF_OF_LEVEL[level].astype(np.uint8)
    ram = dm.ram_pages_per_2m
    state = guest.platform.state

    # encryption: only regions with a non-private page need a closer look
    odd = np.flatnonzero(_any_nonzero(state, nregions))
    enc = np.zeros(nregions, dtype=np.uint8)
    if len(odd):
        st = _rows(state, nregions)[odd]
        shared = np.count_nonzero(st == PAGE_SHARED, axis=1)
        unknown = (st == PAGE_UNKNOWN).any(axis=1)
        e = np.where(shared == ram[odd], _ENC_SHARED, _ENC_MIXED)
        enc[odd] = np.where(unknown, _ENC_UNKNOWN, e)
    codes |= enc << ENCRYPTION.shift

    hazard_regions = {kind: np.zeros(0, dtype=np.int64) for kind in KINDS}
    if guest.platform.encrypts:
        hazard_regions = _hazard_regions(guest, nregions, odd)
        for rows in hazard_regions.values():
            codes[rows] |= np.uint8(1 << HAZARD.shift)
    return GuestMap(codes, hazard_regions)


def _hazard_regions(
    guest: Guest, nregions: int, odd: npt.NDArray[np.int64]
) -> dict[str, npt.NDArray[np.int64]]:
    """The regions holding a page of each hazard kind, by the rule of hazards._masks:
    fatal = shared page & (private direct-map alias | a private vmalloc mapping);
    benign = private page & (shared direct-map alias | a shared vmalloc mapping).
    A fatal page is not private, so it lies in `odd`; a benign page has a shared alias
    (only a 4k-split region holds one unless its whole leaf is shared) or a shared vmalloc
    mapping (shared vmalloc areas are listed, their pages few)."""
    dm = guest.direct_map
    counts = guest.hazard_counts
    counts.flush(guest)
    attr_rows = _rows(dm.attr, nregions)
    split = np.flatnonzero(dm.level == LEAF_4K)
    large = np.flatnonzero((dm.level == LEAF_2M) | (dm.level == IN_1G))
    shared_leaf = large[attr_rows[large, 0] == SHARED]
    shared_alias = (
        split[_any_nonzero(attr_rows[split].ravel(), len(split))] if len(split) else split
    )
    vm_shared = [a.pfns >> 9 for a in guest.vmalloc if a.attr == SHARED]
    candidates = unique(
        np.concatenate((odd, shared_leaf, shared_alias, *vm_shared)).astype(np.int64)
    )
    if not len(candidates):
        return {kind: np.zeros(0, dtype=np.int64) for kind in KINDS}
    st = _rows(guest.platform.state, nregions)[candidates]
    attr = attr_rows[candidates]
    ram = _rows(dm.ram, nregions)[candidates]
    vm_private = _rows(counts.vm_private, nregions)[candidates]
    vm_sh = _rows(counts.vm_shared, nregions)[candidates]
    fatal = (st == PAGE_SHARED) & ((ram & (attr == PRIVATE)) | (vm_private > 0))
    benign = (st == PAGE_PRIVATE) & ((ram & (attr == SHARED)) | (vm_sh > 0))
    return {
        KINDS[0]: candidates[fatal.any(axis=1)],
        KINDS[1]: candidates[benign.any(axis=1)],
    }
