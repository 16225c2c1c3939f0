"""The one way to bring a strategy up on a guest: make, boot reservation, age, setup.

The order is the kernel's: boot-time reservations (swiotlb's bounce buffer, pool-boot's
1 GiB region: memblock allocations) are made on the pristine machine, then the guest runs
for a while (aging: page-cache and slab churn fragment the page allocator), then the
strategy is set up (initcalls, the pool's first fill) on the aged guest.

A strategy whose boot() reserves nothing (its spec says so: pool.registry) gives the same
state whether it boots before or after aging, so it may start from a copy of a guest aged
once and shared (`Guests`, used by compare to age once for five strategies). One whose
boot() reserves memory gets its own pristine guest, boots, and is aged there.

Used by the daemon (one strategy, one guest, nothing kept) and by the simulator's
in-process runs and compare (many strategies, copies of one aged guest).

Aging goes through the aged-guest cache (pool.aged_cache: on disk, keyed by the guest's
state before aging, the steps and the model's version), so a configuration is aged once per
machine, not once per run or start; ``--no-cache`` turns it off.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import attrs

from pool import aged_cache
from pool.guest import Counts, Guest, GuestConfig
from pool.registry import PoolSettings, spec_for
from pool.strategy import Strategy

Progress = Callable[[str, int, int], None]  # (what, done, total)


class Guests:
    """Pristine and aged guests of one configuration. With `keep` (compare), the pristine
    and the aged guest are built once and every caller gets a copy (Guest.clone); without it
    (the daemon), each call builds a fresh guest and no copy is held. `cache`: the aged-guest
    cache to age through (True: pool.aged_cache.default_cache(), which is None under
    --no-cache; False or None: always age)."""

    def __init__(
        self,
        config: GuestConfig,
        age_steps: int,
        progress: Progress | None = None,
        *,
        keep: bool = True,
        cache: aged_cache.AgedCache | bool | None = True,
    ) -> None:
        if age_steps < 0:
            raise ValueError(f"age steps must not be negative: {age_steps}")
        self.config = config
        self.age_steps = age_steps
        self.progress = progress
        self.keep = keep
        self._pristine: Guest | None = None
        self._aged: Guest | None = None
        self.aging_seconds = 0.0  # wall clock spent aging (timings, never a result)
        self.cache: aged_cache.AgedCache | None = (
            aged_cache.default_cache() if cache is True else cache or None
        )

    def pristine(self) -> Guest:
        if not self.keep:
            return Guest(self.config)
        return self.pristine_kept().clone()

    def pristine_kept(self) -> Guest:
        """The kept pristine guest, built on first use; not a copy (pristine() copies it)."""
        if self._pristine is None:
            self._pristine = Guest(self.config)
        return self._pristine

    def age(self, guest: Guest, label: str) -> None:
        """Age `guest` by `age_steps` churn steps (progress labelled `aging (label)`)."""
        t0 = time.perf_counter()
        report = None
        if self.progress is not None:
            progress = self.progress

            def report_fn(done: int, total: int) -> None:
                progress(f"aging ({label})", done, total)

            report = report_fn
        aged_cache.age(guest, self.age_steps, report, self.cache)
        self.aging_seconds += time.perf_counter() - t0

    def aged(self) -> Guest:
        if not self.keep:
            guest = self.pristine()
            self.age(guest, "shared")
            return guest
        return self.prepare().clone()

    def prepare(self, *, take_pristine: bool = False) -> Guest:
        """The kept aged guest, aged (or loaded from the cache) on first use; not a copy
        (aged() copies it): compare ages it before forking its workers. `take_pristine`:
        age the kept pristine guest itself rather than a copy of it, for a caller that
        needs no pristine guest any more (compare, once the workers that boot on one are
        forked; a copy of the 16 GiB default is ~0.07 s on its critical path). A later
        pristine() then builds a new one, the same."""
        if self._aged is None:
            if take_pristine and self.keep and self._pristine is not None:
                guest, self._pristine = self._pristine, None
            else:
                guest = self.pristine()
            self.age(guest, "shared")
            self._aged = guest
        return self._aged


@attrs.frozen
class Provisioned:
    """A strategy set up on its guest. `baseline`: the guest's counts before boot, which
    the `setup` figures (boot + setup + anything before the first request) are measured
    from; `setup_seconds`: wall clock of setup() (timings only)."""

    guest: Guest
    strategy: Strategy
    baseline: Counts
    setup_seconds: float = 0.0


def provision(
    name: str, guests: Guests, settings: PoolSettings | None = None, *, setup: bool = True
) -> Provisioned:
    """Make strategy `name`, make its boot reservation on a pristine guest (then age that
    guest) or boot it on an aged one, then set it up (unless `setup` is False)."""
    settings = settings or PoolSettings()
    spec = spec_for(name)
    if spec.reserves_at_boot(settings):
        guest = guests.pristine()
        baseline = guest.stats.snapshot()
        strategy = spec.build(name, guest, settings, {})
        strategy.boot()
        guests.age(guest, name)  # its own boot profile: booted pristine, then aged
    else:
        guest = guests.aged()
        baseline = guest.stats.snapshot()
        strategy = spec.build(name, guest, settings, {})
        strategy.boot()
    t0 = time.perf_counter()
    if setup:
        strategy.setup()
    return Provisioned(guest, strategy, baseline, time.perf_counter() - t0)
