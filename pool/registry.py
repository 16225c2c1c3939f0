"""Strategy names (DESIGN.md section 4) to constructors."""

from __future__ import annotations

from typing import Any

from pool.guest import Guest
from pool.strategy import Strategy

STRATEGIES = ("pool", "pool-boot", "vmalloc-alias", "vmalloc-directmap", "swiotlb", "atomic-pool")
DESCRIPTIONS = {
    "pool": "option 3: chunks of order 10/9 decrypted once, buffers served from them",
    "pool-boot": "option 3 with a 1 GiB-aligned region reserved and decrypted at boot (no split)",
    "vmalloc-alias": "vzalloc + decrypt the vmalloc mapping only (direct-map aliases stay private; "
    "option 1 accepts that fatal hazard by not using load_unaligned_zeropad)",
    "vmalloc-directmap": "vzalloc + decrypt with the direct-map aliases (the kernel's default)",
    "swiotlb": "option 2: allocate from the bounce pool decrypted at boot (max 256 KiB a piece)",
    "atomic-pool": "kernel/dma/pool.c: genalloc over <= 4 MiB chunks, doubling, never shrinks",
}


def make_strategy(name: str, guest: Guest, **options: Any) -> Strategy:
    """Build a strategy by name; options go to its constructor."""
    if name in ("pool", "pool-boot"):
        from pool.shared import SharedPool

        if name == "pool-boot":
            options.setdefault("boot_reserve_bytes", 1 << 30)
        return SharedPool(guest, name=name, **options)
    if name in ("vmalloc-alias", "vmalloc-directmap"):
        from pool.vmalloc_strategy import VmallocStrategy

        return VmallocStrategy(guest, alias=name == "vmalloc-directmap", **options)
    if name == "swiotlb":
        from pool.swiotlb import Swiotlb

        return Swiotlb(guest, **options)
    if name == "atomic-pool":
        from pool.atomic_pool import AtomicPool

        return AtomicPool(guest, **options)
    raise ValueError(f"unknown strategy {name!r}: expected one of {', '.join(STRATEGIES)}")
