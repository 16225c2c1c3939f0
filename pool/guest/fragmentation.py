"""/proc/buddyinfo and the debugfs ``extfrag/`` indexes, computed and printed as mm/vmstat.c does.

Inputs are buddyinfo rows: ``nr_free[o]``, the number of free blocks of order ``o`` in a zone,
for o = 0..10. For a requested order ``k`` (``fill_contig_page_info()``)::

    free_pages           = sum(nr_free[o] << o)
    free_blocks_total    = sum(nr_free[o])
    free_blocks_suitable = sum(nr_free[o] << (o - k) for o >= k)

``__fragmentation_index()`` (thousandths; 0 = a failure would be for lack of memory,
1000 = for fragmentation)::

    0                                                           if free_blocks_total == 0
    -1000                                                       if free_blocks_suitable > 0
    1000 - (1000 + free_pages * 1000 / 2**k) / free_blocks_total  otherwise

``unusable_free_index()`` (thousandths of the free memory that cannot serve order ``k``)::

    1000                                                         if free_pages == 0
    (free_pages - (free_blocks_suitable << k)) * 1000 / free_pages otherwise

The kernel divides unsigned 64-bit values with ``div_u64`` and returns the fragmentation index
as an ``int``: ``1000 - x`` with ``x > 1000`` wraps and reads back as a negative int (e.g. one
free order-0 page and a request of order 1 gives ``1000 - 1500 = -500``). The divisions here are
therefore on non-negative integers (where C's truncation and Python's ``//`` agree) and the
subtraction is done last, in Python's unbounded ints, which reproduces the kernel's int result.
Printing (``"%2d.%03d"`` / ``"%d.%03d"`` of ``index / 1000, index % 1000``) uses C's division,
which truncates toward zero, and C's remainder, which takes the dividend's sign: -1000 prints
``-1.000`` and -500 prints `` 0.-500``, exactly as the kernel does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pool.guest.units import NR_ORDERS

__all__ = [
    "c_div",
    "c_mod",
    "format_buddyinfo",
    "format_extfrag",
    "format_fragmentation",
    "format_unusable",
    "format_unusable_index",
    "fragmentation_index",
    "parse_buddyinfo",
    "unusable_free_index",
]


def c_div(a: int, b: int) -> int:
    """C integer division: the quotient truncated toward zero (exact for any int size)."""
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q


def c_mod(a: int, b: int) -> int:
    """C remainder: ``a - b * c_div(a, b)``, with the sign of the dividend."""
    return a - b * c_div(a, b)


def _contig_page_info(nr_free: Sequence[int], order: int) -> tuple[int, int, int]:
    """``fill_contig_page_info()``: (free_pages, free_blocks_total, free_blocks_suitable)."""
    if not 0 <= order < NR_ORDERS:
        raise ValueError(f"order must be in 0..{NR_ORDERS - 1}, not {order}")
    if len(nr_free) != NR_ORDERS:
        raise ValueError(
            f"nr_free needs {NR_ORDERS} counts (orders 0..{NR_ORDERS - 1}), got {len(nr_free)}"
        )
    free_pages = free_blocks_total = free_blocks_suitable = 0
    for o, blocks in enumerate(nr_free):
        if blocks < 0:
            raise ValueError(f"nr_free[{o}] is negative: {blocks}")
        free_blocks_total += blocks
        free_pages += blocks << o
        if o >= order:
            free_blocks_suitable += blocks << (o - order)
    return free_pages, free_blocks_total, free_blocks_suitable


def fragmentation_index(nr_free: Sequence[int], order: int) -> int:
    """``__fragmentation_index()`` in thousandths: 0 with no free blocks, -1000 when a block of
    ``order`` or larger is free, else
    ``1000 - (1000 + free_pages * 1000 / 2^order) / free_blocks_total``
    (may be negative when few small blocks are free; the kernel returns the same int)."""
    free_pages, free_blocks_total, free_blocks_suitable = _contig_page_info(nr_free, order)
    if free_blocks_total == 0:
        return 0
    if free_blocks_suitable:
        return -1000
    requested = 1 << order
    return 1000 - (1000 + (free_pages * 1000) // requested) // free_blocks_total


def unusable_free_index(nr_free: Sequence[int], order: int) -> int:
    """``unusable_free_index()`` in thousandths: the share of free pages in blocks smaller than
    ``order`` (1000 when nothing is free)."""
    free_pages, _, free_blocks_suitable = _contig_page_info(nr_free, order)
    if free_pages == 0:
        return 1000
    return ((free_pages - (free_blocks_suitable << order)) * 1000) // free_pages


def format_fragmentation(value: int) -> str:
    """The kernel's ``"%2d.%03d"`` of ``value / 1000, value % 1000`` (C division):
    -1000 -> "-1.000", 982 -> " 0.982", -500 -> " 0.-500"."""
    return f"{c_div(value, 1000):2d}.{c_mod(value, 1000):03d}"


def format_unusable(value: int) -> str:
    """The kernel's ``"%d.%03d"`` of ``value / 1000, value % 1000`` (C division): 974 -> "0.974"."""
    return f"{c_div(value, 1000):d}.{c_mod(value, 1000):03d}"


def _zone_prefix(node: int, zone: str) -> str:
    return f"Node {node:d}, zone {zone:>8} "


def format_buddyinfo(rows: Sequence[tuple[str, Sequence[int]]], node: int = 0) -> str:
    """/proc/buddyinfo (``frag_show_print()``): ``Node %d, zone %8s ``, then ``%6lu `` per
    order, then a newline."""
    return "".join(
        _zone_prefix(node, zone) + "".join(f"{count:6d} " for count in counts) + "\n"
        for zone, counts in rows
    )


def format_extfrag(rows: Sequence[tuple[str, Sequence[int]]], node: int = 0) -> str:
    """debugfs ``extfrag/extfrag_index`` (``extfrag_show_print()``) from buddyinfo rows."""
    return "".join(
        _zone_prefix(node, zone)
        + "".join(
            format_fragmentation(fragmentation_index(counts, o)) + " " for o in range(NR_ORDERS)
        )
        + "\n"
        for zone, counts in rows
    )


def format_unusable_index(rows: Sequence[tuple[str, Sequence[int]]], node: int = 0) -> str:
    """debugfs ``extfrag/unusable_index`` (``unusable_show_print()``) from buddyinfo rows."""
    return "".join(
        _zone_prefix(node, zone)
        + "".join(format_unusable(unusable_free_index(counts, o)) + " " for o in range(NR_ORDERS))
        + "\n"
        for zone, counts in rows
    )


_BUDDYINFO_LINE = re.compile(r"^Node\s+(\d+),\s+zone\s+(\S+)((?:\s+\d+)+)\s*$")


def parse_buddyinfo(text: str) -> list[tuple[int, str, tuple[int, ...]]]:
    """Parse /proc/buddyinfo into ``(node, zone, counts)``; blank lines are skipped. Raises
    ValueError naming the line number on a malformed line or a count row not of 11 orders."""
    rows: list[tuple[int, str, tuple[int, ...]]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = _BUDDYINFO_LINE.match(line)
        if not match:
            raise ValueError(
                f"buddyinfo line {number}: not 'Node N, zone NAME counts...': {line!r}"
            )
        counts = tuple(int(field) for field in match.group(3).split())
        if len(counts) != NR_ORDERS:
            raise ValueError(
                f"buddyinfo line {number}: {len(counts)} counts, expected 11 (orders 0..10)"
            )
        rows.append((int(match.group(1)), match.group(2), counts))
    return rows
