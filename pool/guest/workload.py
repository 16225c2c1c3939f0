"""Background churn: the seeded page-cache and slab traffic that ages a guest's page allocator.

A pristine allocator hands out memory from a few huge free blocks, so a 16 MiB vmalloc
buffer's 4096 pages come from 8 or 9 aligned 2 MiB regions. A guest that has run for a
while has had its memory filled by page cache, reclaimed, refilled, with slab and anonymous
pages of long-running processes left scattered in between: its free memory is in small
blocks all over RAM, and the same buffer lands in hundreds of 2 MiB regions. :class:`Churn`
reproduces that state, deterministically from a seed.

The model (each knob is a field of :class:`ChurnConfig`):

- **Steps.** One step is one allocation (an order drawn from the configured mix), followed by
  reclaim: random live allocations are freed until the churn's live pages are back at the
  occupancy target. Allocations go through :meth:`PageAllocator.alloc` with the churn's
  zonelist (Normal first, DMA32 as fallback); when no block of the drawn order is left, the
  request falls back to the next lower order, as page-cache folio allocation does; when not
  even an order-0 page is left, the churn reclaims one of its own allocations and retries.
- **Short- and long-lived allocations.** A fraction of allocations is long-lived (slab pages,
  page tables, anonymous memory of long-running processes: orders 0 and 1); the rest is
  short-lived (page-cache folios of orders 2-6, transient order-0/1 kernel and anonymous
  pages). Reclaim takes victims among the short-lived allocations, uniformly at random
  (reclaim order is only loosely related to physical placement), except when the long-lived
  ones exceed their share of the target, then it takes a long-lived victim.
- **Memory-pressure episodes.** At step 0 and then every ``pressure_interval`` steps, kernel
  memory grows first (a burst of the real-kernel test module's pattern: unmovable blocks of
  orders 0-3, half freed at once, the other half kept as long-lived memory), then the page
  cache grows (a big file read: folios of the page-cache mix, no frees) until live memory
  reaches ``pressure_occupancy`` of RAM, and reclaim then evicts random short-lived
  allocations down to the occupancy target again. The first episode touches most of RAM in
  a few hundred thousand allocations (the guest's memory has all been used once), later
  ones mix the layout again.

What "aged" means: with the defaults, 1,000,000 steps on a 16 GiB guest (RAM = [0, 3 GiB) and
[4 GiB, 17 GiB)), one vCPU, seeds 1-5 (``bench/bench_guest_scale.py`` for seed 1):

- A 16 MiB vmalloc buffer (``vm_area_alloc_pages``, unmovable) lands in 343 / 363 / 389
  (min / median / max) distinct 2 MiB regions, against 8 on the pristine guest: DESIGN.md's
  band after heavy churn on a real Linux 6.1 guest is 300-380 (8-9 after boot, 130-150 after
  moderate churn). The kernel bursts are what puts it there: their kept halves, retired at
  random among the long-lived allocations, leave free pages scattered through unmovable
  pageblocks all over Normal, and the bulk allocator takes those before it steals anything.
  Without the bursts (``kernel_burst_blocks_per_gib = 0``) page-cache aging alone leaves
  Normal no unmovable free pages, so the buffer steals whole pageblocks and lands in 15
  regions. The figure builds up over the first episodes (seed 1: 50 regions after 500,000
  steps, 328 after 750,000) and swings with the point in the episode cycle (a reading 25,000
  steps after an episode: ~440), which is why calibration reads it at the default 1 M steps.
- 24.6 % of RAM is free (occupancy 0.75). The Normal zone's free memory is all in blocks below
  order 9: unusable free index at order 9 = 1.000 (the real 4 GiB guest after churn, in
  ``examples/buddyinfo/linux-6.1-4GiB-after-churn.unusable_index``: 0.974).
- About 800 MiB (778-820) stay in order-9/10 blocks, in DMA32: the tenth of RAM that pressure
  episodes never reach (Normal is filled first), less the pageblocks the unmovable and
  reclaimable allocations claimed there (``ALLOC_NOFRAGMENT`` sends them to DMA32's whole free
  pageblocks once Normal has none). After 200,000 steps (the daemon's default aging) 528 MiB.

4 GiB, same 1 M steps: 278 regions. Aging takes ~2.5x the time it took before the per-cpu
lists; peak RSS 356 MiB at 64 GiB (the per-pfn list links) and 116 MiB at 16 GiB.

Migratetypes: page cache (pressure episodes, short-lived orders 2+) and anonymous memory are
movable; short-lived order-0/1 kernel pages (``short_unmovable``) and slab and page tables
(``long_unmovable``) unmovable; dentry and inode slabs (``long_reclaimable``) reclaimable. The
allocator groups them by pageblock (pool.guest.migratetype) and every allocation and free of
an allocator with per-cpu lists goes through them, the churn taking the vCPUs in turn, one
step each. Steady steps (``step(pressure=False)``, what ``Guest.background`` runs between
simulator events) never start a pressure episode: only aging does.

Not modeled: watermarks, kswapd and direct compaction, NUMA, memory cgroups; page-cache LRU
order (victims are random).

Live allocations are kept in two ``array('q')`` (short- and long-lived), each entry
``pfn << 4 | order``; freeing a victim swaps the last entry into its slot.
"""

from __future__ import annotations

import bisect
import random
from array import array
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate
from typing import Any

import attrs

from pool.guest.buddy import PageAllocator
from pool.guest.migratetype import MIGRATE_MOVABLE, MIGRATE_RECLAIMABLE, MIGRATE_UNMOVABLE
from pool.guest.units import NR_ORDERS, PAGE_SHIFT, GiB

__all__ = ["Churn", "ChurnConfig"]

_SHIFT = 4  # entry = pfn << 4 | order
_MASK = (1 << _SHIFT) - 1


def _order_weights(value: Sequence[float]) -> tuple[float, ...]:
    weights = tuple(float(v) for v in value)
    if len(weights) > NR_ORDERS:
        raise ValueError(
            f"order weights: at most {NR_ORDERS} values (orders 0..10), got {len(weights)}"
        )
    return weights + (0.0,) * (NR_ORDERS - len(weights))


def _check_weights(
    _instance: Any, attribute: attrs.Attribute[Any], value: tuple[float, ...]
) -> None:
    if any(w < 0 for w in value) or sum(value) <= 0:
        raise ValueError(f"{attribute.name}: weights must be >= 0 with a positive sum: {value}")


def _check_fraction(_instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1], not {value}")


@attrs.frozen
class ChurnConfig:
    """The knobs of the background churn. The defaults age a 16 GiB guest in 1,000,000 steps to
    DESIGN.md's "heavy churn" state (the module docstring says what they give).

    Order weights are relative weights for orders 0, 1, 2, ... (missing orders weigh 0).

    - ``occupancy`` (0.75): live churn pages / RAM pages after every step. What remains free
      (25 %) is what later experiments allocate from; below 0.85 so that at least 15 % of RAM
      stays free, not lower than real guests whose caches fill most of memory.
    - ``pressure_occupancy`` (0.90): the peak of a memory-pressure episode, in RAM fraction.
      Below 1 so that the last tenth of RAM is never touched: the order-9/10 blocks aged real
      guests keep (the top of DMA32 on a 16 GiB guest, since Normal is filled first; all of
      DMA32 and the top of Normal on a 64 GiB guest).
    - ``pressure_interval`` (50,000): steps between pressure episodes; the first is at step 0.
      0 disables episodes (the churn then only ever reuses the memory it has touched). 50,000
      keeps the layout in a steady state: between episodes, steady churn slowly consumes the
      smallest holes; with longer intervals the 16 MiB-buffer figure swings between ~250 and
      ~490 regions depending on where the run ends in the cycle.
    - ``pagecache_orders`` (orders 2-6: 0.1, 0.3, 0.3, 0.2, 0.1): folio orders of the page cache
      read in an episode — 16 KiB to 256 KiB readahead folios. Larger folios (orders 7-9) are
      left out on purpose: each would take and give back whole 2 MiB regions, and together they
      would consume the untouched order-9/10 blocks.
    - ``short_orders`` (0.2, 0.05, 0.1, 0.2, 0.2, 0.15, 0.1): steady short-lived allocations:
      transient order-0/1 pages (skbs, kmalloc buffers, short-lived anonymous memory) and
      page-cache folios of orders 2-6.
    - ``long_fraction`` (0.5): probability that a steady allocation is long-lived. With the
      long-lived mix below, 55 % of all steady allocations are order 0, 7.5 % order 1, 15 %
      orders 2-3 and 22.5 % orders 4-6 ("mostly 0, some 1-3, a few higher").
    - ``long_orders`` (0.9, 0.1): long-lived allocations — slab pages (mostly order 0, some
      order-1 slabs), page tables, anonymous memory of long-running processes. They are what
      keeps freed neighbours from merging back into large blocks.
    - ``long_share`` (0.25): the long-lived pages' cap, as a share of the occupancy target (slab
      plus long-lived anonymous memory around a quarter of used memory). Once reached, each new
      long-lived allocation retires a random old one. Long-lived memory grows by ~0.55 page
      per step, so a 16 GiB guest reaches the cap after ~1.4 M steps, a 4 GiB one after 0.36 M.
    - ``free_batch`` (1): how many consecutively allocated live entries (of the short- or the
      long-lived set) one reclaim frees together (1 = independent random victims). Larger
      values model reclaim of whole files and make free memory coalesce into larger blocks
      (fewer, larger holes).
    - ``zonelist`` (("Normal", "DMA32")): the zones the churn allocates from, in order; the DMA
      zone is left alone as the kernel leaves it to GFP_DMA users.
    - ``short_unmovable`` (0.5): the share of short-lived order-0/1 allocations that are kernel
      memory (skbs, kmalloc buffers: unmovable); the rest is short-lived anonymous memory
      (movable). Short-lived orders 2+ are page-cache folios and pressure episodes read page
      cache: movable.
    - ``long_unmovable`` (0.5), ``long_reclaimable`` (0.2): the shares of long-lived allocations
      that are unmovable (slab, page tables) and reclaimable (dentry and inode slabs); the rest
      is anonymous memory of long-running processes (movable).
    - ``kernel_burst_blocks_per_gib`` (1,750) and ``kernel_burst_max_blocks`` (28,000): the
      blocks of each episode's kernel-memory burst: 1,750 per GiB of RAM up to 28,000 (16 GiB,
      about 105 MiB allocated, half of it kept; the real module's heavy churn was 100,000
      blocks on a 4 GiB guest, once). A fit, at both ends: a fixed 28,000 on a 2-4 GiB guest
      claims nearly every free pageblock (4 GiB, 1 M steps: 22 MiB left in order-9/10 blocks,
      no room for a pool), and 1,750 per GiB without the cap does the same at 64 GiB (2,542
      regions, 16 MiB of order-9/10 blocks); with it, 64 GiB keeps 938 MiB of them and the
      buffer lands in 13 regions — the same workload fragments a larger guest less.
      Calibrated so that a 16 MiB vmalloc buffer on the default aged 16 GiB guest lands in
      DESIGN.md's heavy-churn band; at 1 M steps, seed 1: 25,000 blocks gave 14-367 across
      readings (the bursts then fit in DMA32's free pageblocks most of the time), 28,000
      gives 359 (seeds 1-5: 343-389), 30,000 gave 467, 35,000 gave 571, 100,000 about 1,400.
      0 turns the bursts off.
    """

    occupancy: float = attrs.field(default=0.75, validator=_check_fraction)
    pressure_occupancy: float = attrs.field(default=0.90, validator=_check_fraction)
    pressure_interval: int = 50_000
    pagecache_orders: tuple[float, ...] = attrs.field(
        default=(0, 0, 0.1, 0.3, 0.3, 0.2, 0.1), converter=_order_weights, validator=_check_weights
    )
    short_orders: tuple[float, ...] = attrs.field(
        default=(0.2, 0.05, 0.1, 0.2, 0.2, 0.15, 0.1),
        converter=_order_weights,
        validator=_check_weights,
    )
    long_fraction: float = attrs.field(default=0.5, validator=_check_fraction)
    long_orders: tuple[float, ...] = attrs.field(
        default=(0.9, 0.1), converter=_order_weights, validator=_check_weights
    )
    long_share: float = attrs.field(default=0.25, validator=_check_fraction)
    free_batch: int = 1
    zonelist: tuple[str, ...] = ("Normal", "DMA32")
    short_unmovable: float = attrs.field(default=0.5, validator=_check_fraction)
    long_unmovable: float = attrs.field(default=0.5, validator=_check_fraction)
    long_reclaimable: float = attrs.field(default=0.2, validator=_check_fraction)
    kernel_burst_blocks_per_gib: int = 1_750
    kernel_burst_max_blocks: int = 28_000

    def __attrs_post_init__(self) -> None:
        if self.long_unmovable + self.long_reclaimable > 1.0:
            raise ValueError(
                "long_unmovable + long_reclaimable must not exceed 1: "
                f"{self.long_unmovable} + {self.long_reclaimable}"
            )
        if self.pressure_interval < 0:
            raise ValueError(f"pressure_interval must be >= 0, not {self.pressure_interval}")
        if self.kernel_burst_blocks_per_gib < 0 or self.kernel_burst_max_blocks < 0:
            raise ValueError(
                "kernel_burst_blocks_per_gib and kernel_burst_max_blocks must be >= 0, not "
                f"{self.kernel_burst_blocks_per_gib} and {self.kernel_burst_max_blocks}"
            )
        if self.free_batch < 1:
            raise ValueError(f"free_batch must be >= 1, not {self.free_batch}")
        if self.occupancy <= 0:
            raise ValueError("occupancy must be positive")
        if not self.zonelist:
            raise ValueError("zonelist must name at least one zone")


class Churn:
    """Seeded background churn against one :class:`PageAllocator` (see the module docstring)."""

    def __init__(
        self, allocator: PageAllocator, seed: int, config: ChurnConfig = ChurnConfig()
    ) -> None:
        self.allocator = allocator
        self.seed = seed
        self.config = config
        self.steps_done = 0
        self.allocations_made = 0  # successful allocator.alloc calls
        self.frees_made = 0  # allocator.free calls
        self._rng = random.Random(seed)
        self._short = array("q")
        self._long = array("q")
        self._short_pages = 0
        self._long_pages = 0
        ram = allocator.ram_pages
        self._target = int(config.occupancy * ram)
        self._peak = int(config.pressure_occupancy * ram)
        self._long_cap = int(config.long_share * self._target)
        self._short_cum = list(accumulate(config.short_orders))
        self._long_cum = list(accumulate(config.long_orders))
        self._pagecache_cum = list(accumulate(config.pagecache_orders))
        self._kernel_blocks = min(
            config.kernel_burst_blocks_per_gib * ram // (GiB >> PAGE_SHIFT),
            config.kernel_burst_max_blocks,
        )
        self._cpu = 0  # the vCPU of the current step (round robin over the allocator's CPUs)

    # ------------------------------------------------------------------ public

    @property
    def live_pages(self) -> int:
        """Pages the churn currently holds (short- and long-lived)."""
        return self._short_pages + self._long_pages

    @property
    def long_lived_pages(self) -> int:
        return self._long_pages

    @property
    def live_allocations(self) -> int:
        return len(self._short) + len(self._long)

    def allocations(self) -> Iterator[tuple[int, int]]:
        """``(pfn, order)`` of every live churn allocation."""
        for entries in (self._short, self._long):
            for entry in entries:
                yield entry >> _SHIFT, entry & _MASK

    def run(self, steps: int, progress: Callable[[int, int], None] | None = None) -> None:
        """Run ``steps`` steps, calling ``progress(done, steps)`` about every 1 % (at least
        every 20,000 steps, a fraction of a second, so that a caller can stop a long aging
        promptly by raising from it) and at the end. Chunking changes nothing: ``step(a)``
        then ``step(b)`` is ``step(a + b)``."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, not {steps}")
        if progress is None:
            self.step(steps)
            return
        chunk = max(1, min(steps // 100, 20_000))
        done = 0
        while done < steps:
            n = min(chunk, steps - done)
            self.step(n)
            done += n
            progress(done, steps)

    def step(self, n: int = 1, pressure: bool = True) -> None:
        """``n`` more steps. ``pressure``: run the memory-pressure episodes that fall due (step 0,
        then every ``pressure_interval`` steps), as aging does; False for the steady churn
        between simulator events ("background churn"), which never starts one."""
        if n < 0:
            raise ValueError(f"n must be >= 0, not {n}")
        interval = self.config.pressure_interval if pressure else 0
        core = self.allocator._core()
        if core is not None:
            self._step_compiled(core, n, interval)
            return
        long_fraction = self.config.long_fraction
        short_cum = self._short_cum
        target = self._target
        free_one = self._free_one
        allocate = self._allocate
        cpus = max(1, self.allocator.cpus)
        for _ in range(n):
            self._cpu = self.steps_done % cpus
            if interval and self.steps_done % interval == 0:
                self._pressure_episode()
            allocate(short_cum, long_fraction, True)
            while self._short_pages + self._long_pages > target:
                free_one(False)
            self.steps_done += 1

    def _step_compiled(self, core: Any, n: int, interval: int) -> None:
        """:meth:`step` in the allocator's compiled core (pool.guest._core ``churn_step``): the
        same loop, the same Mersenne Twister stream (the RNG's state goes in and comes back
        through ``getstate``/``setstate``), the same live-allocation arrays; tested against
        the Python loop by tests/test_buddy_differential.py."""
        if n == 0:
            return
        config = self.config
        version, words, gauss = self._rng.getstate()
        zis, nofragment = self.allocator._zonelist(config.zonelist)
        state, error = core.churn_step(
            n,
            self.steps_done,
            interval,
            words,
            self._short,
            self._long,
            self._short_pages,
            self._long_pages,
            self._target,
            self._peak,
            self._long_cap,
            config.free_batch,
            self._short_cum,
            self._long_cum,
            self._pagecache_cum,
            config.long_fraction,
            config.long_unmovable,
            config.long_reclaimable,
            config.short_unmovable,
            zis,
            nofragment,
            self._kernel_blocks,
        )
        words, self._short, self._long, self.steps_done = state[:4]
        self._short_pages, self._long_pages = state[4], state[5]
        self.allocations_made += state[6]
        self.frees_made += state[7]
        self._cpu = state[8]
        self._rng.setstate((version, words, gauss))
        if error is not None:
            raise error  # the loop's RuntimeError (or a MemoryError), state stored above

    def clone(self, allocator: PageAllocator) -> Churn:
        """The same churn (live allocations, RNG state, step count) bound to ``allocator``, which
        must be a clone of this churn's allocator taken at the same moment."""
        other = Churn.__new__(Churn)
        other.allocator = allocator
        other.seed = self.seed
        other.config = self.config
        other.steps_done = self.steps_done
        other.allocations_made = self.allocations_made
        other.frees_made = self.frees_made
        other._rng = random.Random()
        other._rng.setstate(self._rng.getstate())
        other._short = array("q", self._short)
        other._long = array("q", self._long)
        other._short_pages = self._short_pages
        other._long_pages = self._long_pages
        other._target = self._target
        other._peak = self._peak
        other._long_cap = self._long_cap
        other._short_cum = self._short_cum
        other._long_cum = self._long_cum
        other._pagecache_cum = self._pagecache_cum
        other._kernel_blocks = self._kernel_blocks
        other._cpu = self._cpu
        return other

    # ------------------------------------------------------------------ internals

    def _pressure_episode(self) -> None:
        """A kernel-memory burst (:meth:`_kernel_burst`), then page cache grows to the pressure
        peak (stopping early if memory runs out), then reclaim evicts random short-lived
        allocations down to the occupancy target."""
        self._kernel_burst()
        peak = self._peak
        while self._short_pages + self._long_pages < peak:
            if not self._allocate(self._pagecache_cum, 0.0, False):
                break
        while self._short_pages + self._long_pages > self._target:
            if not self._free_one(True):
                break

    def _kernel_burst(self) -> None:
        """The real-kernel test module's pattern (pool.guest.modulechurn), as kernel memory grows
        when a workload starts (slab, driver and network buffers): ``kernel_burst_blocks`` blocks
        of ``alloc_pages(GFP_KERNEL, order)``, order uniform in 0..3, unmovable; then, in
        allocation order, each is freed on a coin flip and kept otherwise. The kept half joins
        the long-lived allocations (retired at random once they exceed ``long_share``). Stops
        early, keeping what it has, when no block of the drawn order is left."""
        count = self._kernel_blocks
        if not count:
            return
        bits = self._rng.getrandbits
        alloc = self.allocator.alloc
        free = self.allocator.free
        zonelist = self.config.zonelist
        cpu = self._cpu
        blocks: list[tuple[int, int]] = []
        for _ in range(count):
            order = bits(2)
            pfn = alloc(order, zonelist, MIGRATE_UNMOVABLE, cpu)
            if pfn is None:
                break
            blocks.append((pfn, order))
        self.allocations_made += len(blocks)
        for pfn, order in blocks:
            if bits(1):
                free(pfn, order, cpu)
                self.frees_made += 1
            else:
                self._long.append(pfn << _SHIFT | order)
                self._long_pages += 1 << order

    def _allocate(self, short_cum: list[float], long_fraction: float, reclaim: bool) -> bool:
        """One allocation: long-lived with probability ``long_fraction``, order from the matching
        mix, falling back to lower orders; at order 0 with nothing free, reclaim one victim and
        retry (``reclaim``) or give up and return False."""
        rand = self._rng.random
        config = self.config
        if long_fraction and rand() < long_fraction:
            is_long = True
            cum = self._long_cum
            r = rand()
            if r < config.long_unmovable:
                mt = MIGRATE_UNMOVABLE
            elif r < config.long_unmovable + config.long_reclaimable:
                mt = MIGRATE_RECLAIMABLE
            else:
                mt = MIGRATE_MOVABLE
        else:
            is_long = False
            cum = short_cum
            mt = MIGRATE_MOVABLE
        order = bisect.bisect_right(cum, rand() * cum[-1])
        if order >= NR_ORDERS:  # rounding at the very top of the last weight
            order = NR_ORDERS - 1
        if not is_long and order < 2 and reclaim and rand() < config.short_unmovable:
            mt = MIGRATE_UNMOVABLE
        alloc = self.allocator.alloc
        zonelist = config.zonelist
        cpu = self._cpu
        pfn = alloc(order, zonelist, mt, cpu)
        while pfn is None:
            if order:
                order -= 1
            elif not reclaim or not self._free_one(False):
                if reclaim:
                    raise RuntimeError(
                        "churn: no free page in its zonelist and no allocation of its own to free"
                    )
                return False
            pfn = alloc(order, zonelist, mt, cpu)
        self.allocations_made += 1
        if is_long:
            self._long.append(pfn << _SHIFT | order)
            self._long_pages += 1 << order
        else:
            self._short.append(pfn << _SHIFT | order)
            self._short_pages += 1 << order
        return True

    def _free_one(self, short_only: bool) -> bool:
        """Free one victim (``free_batch`` consecutive entries from a random index); False if the
        churn holds nothing it may free."""
        if not short_only and self._long and (self._long_pages > self._long_cap or not self._short):
            entries = self._long
            is_long = True
        elif self._short:
            entries = self._short
            is_long = False
        else:
            return False
        n = len(entries)
        batch = self.config.free_batch
        if batch == 1:
            i = int(self._rng.random() * n)
            entry = entries[i]
            last = entries.pop()
            if i < n - 1:
                entries[i] = last
            order = entry & _MASK
            self.allocator.free(entry >> _SHIFT, order, self._cpu)
            self.frees_made += 1
            pages = 1 << order
        else:
            i = int(self._rng.random() * n)
            end = min(i + batch, n)
            width = end - i
            free = self.allocator.free
            pages = 0
            cpu = self._cpu
            for entry in entries[i:end]:
                order = entry & _MASK
                free(entry >> _SHIFT, order, cpu)
                pages += 1 << order
            moved = entries[max(end, n - width) : n]
            entries[i : i + len(moved)] = moved
            del entries[n - width :]
            self.frees_made += width
        if is_long:
            self._long_pages -= pages
        else:
            self._short_pages -= pages
        return True
