"""This machine's own memory state, for ``replay --from-proc``.

- ``/proc/buddyinfo``: the free lists to start from (pool.guest.buddyimport).
- ``/sys/kernel/debug/page_tables/kernel`` (CONFIG_PTDUMP_DEBUGFS, debugfs mounted, usually
  root only): the direct map, when readable (pool.guest.ptdump).
- ``/proc/zoneinfo``, used only when the dump is not readable: each zone's ``start_pfn``,
  ``spanned`` and ``present`` pages give a stand-in RAM layout (:func:`layout_from_zoneinfo`):
  ``present`` pages per zone, laid out as on a typical x86 machine: DMA's RAM at the top of
  its span (its holes are the BIOS areas below 1 MiB), DMA32's and Normal's from the bottom of
  theirs (the PCI hole is at the top of DMA32). The direct map over it then has the largest
  leaves that fit, without the boot-time splits a real dump would show.
"""

from __future__ import annotations

import re
from pathlib import Path

import attrs

from pool.guest.buddy import default_zones

__all__ = [
    "PROC_BUDDYINFO",
    "PROC_ZONEINFO",
    "PTDUMP_PATH",
    "HostMemory",
    "layout_from_zoneinfo",
    "parse_zoneinfo",
    "read_host",
    "zoneinfo_layout",
]

PROC_BUDDYINFO = Path("/proc/buddyinfo")
PROC_ZONEINFO = Path("/proc/zoneinfo")
PTDUMP_PATH = Path("/sys/kernel/debug/page_tables/kernel")


@attrs.frozen
class HostMemory:
    buddyinfo: str
    ptdump: str | None  # None: not readable, see ptdump_problem
    ptdump_problem: str | None


def read_host(read_ptdump: bool = True) -> HostMemory:
    """Read /proc/buddyinfo (ValueError if unreadable) and, if asked and readable, the
    page-table dump (else the reason it is not). The paths are this module's PROC_BUDDYINFO
    and PTDUMP_PATH, read at call time."""
    try:
        info = PROC_BUDDYINFO.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {PROC_BUDDYINFO}: {exc.strerror or exc}") from None
    if not read_ptdump:
        return HostMemory(info, None, None)
    try:
        return HostMemory(info, PTDUMP_PATH.read_text(), None)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        hint = (
            " (needs CONFIG_PTDUMP_DEBUGFS, debugfs mounted on /sys/kernel/debug, and root)"
            if isinstance(exc, FileNotFoundError | PermissionError)
            else ""
        )
        return HostMemory(info, None, f"{PTDUMP_PATH}: {reason}{hint}")


def zoneinfo_layout() -> list[tuple[int, int]]:
    """The stand-in RAM layout from this machine's /proc/zoneinfo (PROC_ZONEINFO, read at call
    time): :func:`layout_from_zoneinfo` of node 0."""
    try:
        text = PROC_ZONEINFO.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {PROC_ZONEINFO}: {exc.strerror or exc}") from None
    return layout_from_zoneinfo(parse_zoneinfo(text))


_ZONE = re.compile(r"^Node\s+(\d+),\s+zone\s+(\S+)\s*$")
_FIELD = re.compile(r"^\s+(spanned|present|start_pfn:?)\s+(\d+)\s*$")


def parse_zoneinfo(text: str, node: int = 0) -> list[tuple[str, int, int, int]]:
    """``(zone, start_pfn, spanned, present)`` of `node`'s zones with pages, from
    /proc/zoneinfo. ValueError when a zone lacks one of the three fields."""
    zones: list[dict[str, int | str]] = []
    current: dict[str, int | str] | None = None
    for line in text.splitlines():
        m = _ZONE.match(line)
        if m:
            current = {"zone": m.group(2)} if int(m.group(1)) == node else None
            if current is not None:
                zones.append(current)
            continue
        f = _FIELD.match(line)
        if f and current is not None:
            current.setdefault(f.group(1).rstrip(":"), int(f.group(2)))
    out = []
    for z in zones:
        if not z.get("present"):
            continue
        missing = [k for k in ("start_pfn", "spanned", "present") if k not in z]
        if missing:
            raise ValueError(f"zoneinfo: zone {z['zone']} has no {missing[0]}")
        out.append((str(z["zone"]), int(z["start_pfn"]), int(z["spanned"]), int(z["present"])))
    if not out:
        raise ValueError(f"zoneinfo: no zones with pages on node {node}")
    return out


def layout_from_zoneinfo(zones: list[tuple[str, int, int, int]]) -> list[tuple[int, int]]:
    """RAM pfn ranges standing in for the real layout (module docstring). ValueError for a
    zone the model lacks (only DMA, DMA32, Normal) or one outside the model's zone bounds."""
    end = max(start + spanned for _, start, spanned, _ in zones)
    bounds = {z.name: (z.start_pfn, z.end_pfn) for z in default_zones(max(end, 1 << 21))}
    ram = []
    for name, start, spanned, present in zones:
        if name not in bounds:
            raise ValueError(
                f"zoneinfo: zone {name} has pages; the model has only DMA, DMA32 and Normal"
            )
        top = start + spanned
        lo, hi = (top - present, top) if name == "DMA" else (start, start + present)
        zlo, zhi = bounds[name]
        if present > spanned or lo < zlo or (name != "Normal" and hi > zhi):
            raise ValueError(
                f"zoneinfo: zone {name} [{start:#x}, {top:#x}) with {present} present pages "
                f"does not fit the model's {name} zone [{zlo:#x}, {zhi:#x})"
            )
        ram.append((lo, hi))
    return sorted(ram)
