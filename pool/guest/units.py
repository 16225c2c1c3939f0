"""Sizes and page arithmetic shared by every part of the guest model (x86-64, 4 KiB pages)."""

from __future__ import annotations

import re

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
MAX_PAGE_ORDER = 10  # include/linux/mmzone.h: 4 MiB blocks
NR_ORDERS = MAX_PAGE_ORDER + 1
PAGES_PER_2M = 512
PAGES_PER_1G = 512 * 512
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

_UNITS = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kib": KiB,
    "kb": KiB,
    "m": MiB,
    "mib": MiB,
    "mb": MiB,
    "g": GiB,
    "gib": GiB,
    "gb": GiB,
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse '16GiB', '4M', '4096' into bytes (binary units, as the kernel's K, M, G)."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    match = _SIZE.match(text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 64KiB, 16MiB, 16GiB)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def format_size(nbytes: int) -> str:
    """Shortest exact binary-unit spelling: 2097152 -> '2MiB', 6144 -> '6KiB', 1000 -> '1000B'."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes and nbytes % factor == 0:
            return f"{nbytes // factor}{unit}"
    return f"{nbytes}B"


def pages_for(nbytes: int) -> int:
    """Pages needed to hold nbytes (rounded up, as vmalloc does)."""
    return (nbytes + PAGE_SIZE - 1) >> PAGE_SHIFT
