"""Plain-text rendering of a guest reading, in the kernel's own formats where one exists."""

from __future__ import annotations

from pool.guest.fragmentation import format_buddyinfo, format_fragmentation, format_unusable
from pool.guest.machine import GuestReport
from pool.guest.units import format_size


def render(report: GuestReport, title: str) -> str:
    lines = [f"== {title}", "-- /proc/buddyinfo"]
    lines.append(format_buddyinfo([(z.name, z.nr_free) for z in report.zones]).rstrip("\n"))
    lines.append("-- fragmentation index by order (extfrag_index) / unusable free index")
    for z in report.zones:
        frag = " ".join(format_fragmentation(v) for v in z.fragmentation_index)
        unus = " ".join(format_unusable(v) for v in z.unusable_free_index)
        lines.append(f"{z.name:>7} frag {frag}")
        lines.append(f"{z.name:>7} unus {unus}")
    dm = report.direct_map_bytes
    lines.append("-- direct map (/proc/meminfo)")
    for size in ("4k", "2M", "1G"):
        lines.append(f"DirectMap{size}: {dm[size] // 1024:>12} kB  ({format_size(dm[size])})")
    c = report.counts
    lines.append(
        f"-- free: {format_size(report.free_pages * 4096)}; "
        f"splits level2={c.direct_map_level2_splits} level3={c.direct_map_level3_splits}; "
        f"hypercalls={c.hypercalls}; hazards: "
        f"private_alias_to_shared={report.hazards.private_alias_to_shared} "
        f"shared_alias_to_private={report.hazards.shared_alias_to_private}"
    )
    return "\n".join(lines)
