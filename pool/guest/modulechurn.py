"""The real-kernel test module's workload, run on the model: churn, then one 16 MiB vzalloc.

DESIGN.md's real figures (Linux 6.1, 4 GiB, 1 vCPU) come from a test module that does, in the
kernel:

1. ``N`` blocks, each ``alloc_pages(GFP_KERNEL, order)`` with ``order = xrand() & 3``, where
   ``xrand()`` is xorshift32 (``x ^= x << 13; x ^= x >> 17; x ^= x << 5`` on a 32-bit ``x``,
   seeded with the module's seed);
2. in allocation order, each block is freed if the next ``xrand()`` is odd and kept otherwise;
3. ``vzalloc(16 MiB)``, whose 4096 pages it maps to 2 MiB regions (and, converted with
   ``set_memory_decrypted()``, to direct-map splits).

:func:`run` does the same on a fresh guest (``Guest.alloc_pages`` / ``Guest.free_pages``, then
one allocation through the ``vmalloc-directmap`` strategy, which decrypts the buffer and its
direct-map aliases) and reports the distinct 2 MiB regions of the buffer, the level-2 and
level-3 splits its conversion made, and /proc/buddyinfo before and after the vzalloc, so a user
can set the model beside measurements of their own kernel
(``python -m pool.guest experiment module-churn``).
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs

from pool.guest.fragmentation import format_buddyinfo
from pool.guest.machine import Guest, GuestConfig
from pool.guest.units import PAGES_PER_2M, GiB, MiB

__all__ = ["REAL_LINUX_6_1", "ModuleChurnResult", "run", "xorshift32"]

REAL_LINUX_6_1: dict[int, tuple[int, int]] = {0: (8, 9), 20_000: (132, 146), 100_000: (303, 303)}
"""DESIGN.md: distinct 2 MiB regions of the 16 MiB vzalloc on real Linux 6.1 (4 GiB guest,
1 vCPU) after the module's churn of N blocks: N -> (lowest, highest) measured."""

BUFFER_BYTES = 16 * MiB


def xorshift32(seed: int) -> Iterator[int]:
    """The module's ``xrand()``: xorshift32 from ``seed`` (a 32-bit value; 0 would stay 0 for
    ever, so 0 is refused), yielding each new state."""
    x = seed & 0xFFFFFFFF
    if x == 0:
        raise ValueError("xorshift32 needs a non-zero 32-bit seed")
    while True:
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        yield x


@attrs.frozen
class ModuleChurnResult:
    """What the experiment reports (JSON keys are the field names)."""

    guest_memory: int
    cpus: int
    churn: int
    seed: int
    kept_blocks: int
    kept_pages: int
    regions_2m: int
    level2_splits: int
    level3_splits: int
    buddyinfo_before: str
    buddyinfo_after: str
    pcp_pages_before: int
    pcp_pages_after: int


def run(
    guest_memory: int = 4 * GiB, churn: int = 20_000, seed: int = 1, cpus: int = 1
) -> ModuleChurnResult:
    """The module's workload on a fresh, unaged guest of ``guest_memory`` with ``cpus`` vCPUs
    (module docstring). ValueError for a negative churn, a zero seed, or memory too short."""
    # A local import: pool.vmalloc_strategy imports pool.guest; this module is pool.guest's.
    from pool.vmalloc_strategy import VmallocStrategy

    if churn < 0:
        raise ValueError(f"churn must be >= 0, not {churn}")
    guest = Guest(GuestConfig(memory_bytes=guest_memory, cpus=cpus, seed=seed))
    xrand = xorshift32(seed)
    blocks: list[tuple[int, int]] = []
    for _ in range(churn):
        order = next(xrand) & 3
        pfn = guest.alloc_pages(order)
        if pfn is None:
            raise ValueError(f"the guest ran out of memory after {len(blocks)} of {churn} blocks")
        blocks.append((pfn, order))
    kept = []
    for pfn, order in blocks:
        if next(xrand) & 1:
            guest.free_pages(pfn, order)
        else:
            kept.append((pfn, order))
    before = format_buddyinfo(guest.allocator.buddyinfo())
    pcp_before = guest.allocator.pcp_pages()
    stats = guest.stats.snapshot()
    strategy = VmallocStrategy(guest, alias=True)
    buf = strategy.allocate(BUFFER_BYTES, "module-churn")
    regions = {pfn // PAGES_PER_2M for pfn in buf.pfns().tolist()}
    after_stats = guest.stats.snapshot()
    return ModuleChurnResult(
        guest_memory=guest_memory,
        cpus=cpus,
        churn=churn,
        seed=seed,
        kept_blocks=len(kept),
        kept_pages=sum(1 << o for _, o in kept),
        regions_2m=len(regions),
        level2_splits=after_stats.direct_map_level2_splits - stats.direct_map_level2_splits,
        level3_splits=after_stats.direct_map_level3_splits - stats.direct_map_level3_splits,
        buddyinfo_before=before,
        buddyinfo_after=format_buddyinfo(guest.allocator.buddyinfo()),
        pcp_pages_before=pcp_before,
        pcp_pages_after=guest.allocator.pcp_pages(),
    )
