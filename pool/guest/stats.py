"""One counter object for everything the guest does that costs something.

Every later part (pools, simulator, daemon, compare) reports these counters, so
they live in one place: a mutable `GuestStats` the model increments, and a
frozen `Counts` snapshot that can be subtracted to get the cost of one phase.
Both take their fields from `_Counters`, so the list is written once.
"""

from __future__ import annotations

import operator
from typing import Any

import attrs


@attrs.define
class _Counters:
    """The counters. Field meanings:

    hypercalls: MapGPA calls on TDX, page-state-change VMGEXITs on SNP (retries included).
    pages_converted: 4 KiB pages whose private/shared state changed (either direction).
    pages_accepted: 4 KiB pages accepted (TDX) or validated (SNP) after shared -> private;
      accept_calls_* count the accept operations by piece size (1G, 2M, 4K greedily).
    tlb_flushes: global TLB flushes (before and after each conversion, one per split).
    cache_flushed_pages: pages written back with clflush around a conversion (TDX, both
      directions as __set_memory_enc_pgtable does; SNP guests are SME_COHERENT: none).
    direct_map_level{2,3}_splits: 2 MiB -> 4 KiB and 1 GiB -> 2 MiB splits after boot
      (as /proc/vmstat's direct_map_level*_splits: boot-time splits are not counted).
    page_table_pages: page-table pages allocated for splits (one per split).
    conversion_failures: conversion calls that failed (pages left in an unknown state).
    pages_zeroed: pages cleared on allocation (vzalloc / __GFP_ZERO semantics).
    modeled_*_seconds: counts times the cost profile.
    """

    hypercalls: int = 0
    pages_converted: int = 0
    pages_accepted: int = 0
    accept_calls_1g: int = 0
    accept_calls_2m: int = 0
    accept_calls_4k: int = 0
    tlb_flushes: int = 0
    cache_flushed_pages: int = 0
    direct_map_level2_splits: int = 0
    direct_map_level3_splits: int = 0
    page_table_pages: int = 0
    conversions_to_shared: int = 0
    conversions_to_private: int = 0
    pages_to_shared: int = 0
    pages_to_private: int = 0
    conversion_failures: int = 0
    pages_zeroed: int = 0
    modeled_conversion_seconds: float = 0.0
    modeled_zeroing_seconds: float = 0.0


_NAMES = tuple(f.name for f in attrs.fields(_Counters))
# every counter in field order, in one C call: a snapshot and a difference are taken around
# every allocation the simulator makes (a dict comprehension of getattr was 8 us a reading)
_VALUES = operator.attrgetter(*_NAMES)


@attrs.frozen
class Counts(_Counters):
    """An immutable reading of the guest's counters (see _Counters for meanings)."""

    def __sub__(self, other: Counts) -> Counts:
        return Counts(*map(operator.sub, _VALUES(self), _VALUES(other)))

    def __add__(self, other: Counts) -> Counts:
        return Counts(*map(operator.add, _VALUES(self), _VALUES(other)))

    def as_compare_json(self) -> dict[str, Any]:
        """The COUNTS object of DESIGN.md section 4 (`compare --json`), plus extra keys."""
        return {
            "hypercalls": self.hypercalls,
            "pages_converted": self.pages_converted,
            "pages_accepted": self.pages_accepted,
            "tlb_flushes": self.tlb_flushes,
            "cache_flushed_pages": self.cache_flushed_pages,
            "direct_map_splits": {
                "level2": self.direct_map_level2_splits,
                "level3": self.direct_map_level3_splits,
            },
            "modeled_conversion_seconds": round(self.modeled_conversion_seconds, 9),
            "page_table_pages": self.page_table_pages,
            "conversion_failures": self.conversion_failures,
            "pages_zeroed": self.pages_zeroed,
        }


@attrs.define
class GuestStats(_Counters):
    """The live counters the model increments (see _Counters for meanings)."""

    def snapshot(self) -> Counts:
        return Counts(*_VALUES(self))

    def reset(self) -> None:
        for field in attrs.fields(_Counters):
            setattr(self, field.name, field.default)
