"""Strategy names (DESIGN.md section 4) and the one table that knows them.

Everything that differs between strategies at the seam - how to build one from the pool
settings, whether its boot() reserves memory on the pristine guest (which decides the
order make -> boot -> age in pool.provision), how to describe it - is a row of `SPECS`.
Nothing above the pool (daemon/, hv_netvsc_sim/) compares a strategy name: it asks this
table, or the strategy itself (pool.strategy.Resizable), instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from pool.guest import Guest
from pool.guest.units import GiB, MiB
from pool.strategy import Strategy


@attrs.frozen
class PoolSettings:
    """The sizes a strategy may be built with (the daemon's ``[pool]`` section). Each
    strategy takes the ones it has a use for (its spec's `build`); the defaults are
    SharedPool's own. `boot_reserve_bytes` None: the strategy's default (0 for pool, 1 GiB
    for pool-boot); `max_buffer_bytes` None: the strategy's own limit alone."""

    initial_bytes: int = 64 * MiB
    max_bytes: int = 1024 * MiB
    low_watermark_bytes: int = 24 * MiB
    high_watermark_bytes: int = 96 * MiB
    grow_step_bytes: int = 32 * MiB
    shrink_hysteresis_seconds: float = 30.0
    boot_reserve_bytes: int | None = None
    max_buffer_bytes: int | None = None


Build = Callable[[str, Guest, PoolSettings, dict[str, Any]], Strategy]


def _shared_pool(default_boot_reserve: int) -> Build:
    def build(name: str, guest: Guest, s: PoolSettings, options: dict[str, Any]) -> Strategy:
        from pool.shared import SharedPool

        kwargs: dict[str, Any] = {
            "initial_bytes": s.initial_bytes,
            "max_bytes": s.max_bytes,
            "low_watermark_bytes": s.low_watermark_bytes,
            "high_watermark_bytes": s.high_watermark_bytes,
            "grow_step_bytes": s.grow_step_bytes,
            "shrink_hysteresis_seconds": s.shrink_hysteresis_seconds,
            "boot_reserve_bytes": (
                default_boot_reserve if s.boot_reserve_bytes is None else s.boot_reserve_bytes
            ),
        }
        if s.max_buffer_bytes is not None:
            kwargs["max_buffer_bytes"] = s.max_buffer_bytes
        return SharedPool(guest, name=name, **{**kwargs, **options})

    return build


def _vmalloc(alias: bool) -> Build:
    def build(name: str, guest: Guest, s: PoolSettings, options: dict[str, Any]) -> Strategy:
        from pool.vmalloc_strategy import VmallocStrategy

        return VmallocStrategy(
            guest, alias=alias, **{"max_buffer_bytes": s.max_buffer_bytes, **options}
        )

    return build


def _swiotlb(name: str, guest: Guest, s: PoolSettings, options: dict[str, Any]) -> Strategy:
    from pool.swiotlb import Swiotlb

    return Swiotlb(guest, **{"max_buffer_bytes": s.max_buffer_bytes, **options})


def _atomic_pool(name: str, guest: Guest, s: PoolSettings, options: dict[str, Any]) -> Strategy:
    from pool.atomic_pool import AtomicPool

    return AtomicPool(guest, **{"max_buffer_bytes": s.max_buffer_bytes, **options})


@attrs.frozen
class StrategySpec:
    """One row of the table. `reserves_at_boot(settings)`: whether its boot() takes memory
    from the pristine guest (swiotlb's bounce buffer, pool-boot's 1 GiB region; False:
    boot() takes nothing, so booting before or after aging is the same);
    `build(name, guest, settings, options)` makes it, `options` overriding its
    constructor's keyword arguments; `contract`: one of the five names compare's JSON
    promises (DESIGN.md section 4); `costly`: it converts page by page, the slowest to
    simulate (compare schedules it first when strategies run in parallel)."""

    name: str
    description: str
    build: Build
    reserves_at_boot: Callable[[PoolSettings], bool]
    contract: bool = True
    costly: bool = False


SPECS: dict[str, StrategySpec] = {
    spec.name: spec
    for spec in (
        StrategySpec(
            "pool",
            "option 3: chunks of order 10/9 decrypted once, buffers served from them",
            _shared_pool(0),
            lambda s: bool(s.boot_reserve_bytes),
        ),
        StrategySpec(
            "pool-boot",
            "option 3 with a 1 GiB-aligned region reserved and decrypted at boot (no split)",
            _shared_pool(1 * GiB),
            lambda s: s.boot_reserve_bytes != 0,
            contract=False,
        ),
        StrategySpec(
            "vmalloc-alias",
            "vzalloc + decrypt the vmalloc mapping only (direct-map aliases stay private; "
            "option 1 accepts that fatal hazard by not using load_unaligned_zeropad)",
            _vmalloc(alias=False),
            lambda s: False,
            costly=True,
        ),
        StrategySpec(
            "vmalloc-directmap",
            "vzalloc + decrypt with the direct-map aliases (the kernel's default)",
            _vmalloc(alias=True),
            lambda s: False,
            costly=True,
        ),
        StrategySpec(
            "swiotlb",
            "option 2: allocate from the bounce pool decrypted at boot (max 256 KiB a piece)",
            _swiotlb,
            lambda s: True,
        ),
        StrategySpec(
            "atomic-pool",
            "kernel/dma/pool.c: genalloc over <= 4 MiB chunks, doubling, never shrinks",
            _atomic_pool,
            lambda s: False,
        ),
    )
}
STRATEGIES = tuple(SPECS)
CONTRACT_STRATEGIES = tuple(name for name, spec in SPECS.items() if spec.contract)
DEFAULT_STRATEGY = "pool"  # option 3, the SharedPool: what the daemon and `run` serve
DESCRIPTIONS = {name: spec.description for name, spec in SPECS.items()}


def spec_for(name: str) -> StrategySpec:
    """The table's row for `name`; ValueError naming the known strategies otherwise."""
    try:
        return SPECS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown strategy {name!r}: expected one of {', '.join(STRATEGIES)}"
        ) from None


def make_strategy(
    name: str, guest: Guest, settings: PoolSettings | None = None, **options: Any
) -> Strategy:
    """Build a strategy by name from `settings` (default PoolSettings()); `options` override
    keyword arguments of its constructor (tests and benchmarks: initial_bytes=...,
    size_bytes=... for swiotlb)."""
    return spec_for(name).build(name, guest, settings or PoolSettings(), options)
