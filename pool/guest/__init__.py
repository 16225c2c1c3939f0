"""pool.guest: a faithful, deterministic model of a confidential guest's memory.

The page allocator (buddy, zones, fragmentation indexes), a background workload
that ages it, the direct map with the kernel's split rule, the vmalloc space, the
CoCo platform's conversion hypercalls with a cost profile and fault injection,
and a hazard checker. It knows nothing of pools.
"""

from pool.guest.costs import CostProfile
from pool.guest.directmap import PRIVATE, SHARED, DirectMap, Leaf, SplitCounts
from pool.guest.hazards import HazardReport
from pool.guest.machine import Guest, GuestConfig, GuestReport, ZoneReport
from pool.guest.platform import (
    PAGE_PRIVATE,
    PAGE_SHARED,
    PAGE_UNKNOWN,
    ConversionResult,
    FaultPlan,
    HostAnswer,
    ScriptedHost,
    SimulatedHost,
)
from pool.guest.stats import Counts, GuestStats
from pool.guest.vmalloc import VmArea, runs_of

__all__ = [
    "PAGE_PRIVATE",
    "PAGE_SHARED",
    "PAGE_UNKNOWN",
    "PRIVATE",
    "SHARED",
    "ConversionResult",
    "CostProfile",
    "Counts",
    "DirectMap",
    "FaultPlan",
    "Guest",
    "GuestConfig",
    "GuestReport",
    "GuestStats",
    "HazardReport",
    "HostAnswer",
    "Leaf",
    "ScriptedHost",
    "SimulatedHost",
    "SplitCounts",
    "VmArea",
    "ZoneReport",
    "runs_of",
]
