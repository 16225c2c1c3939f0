"""The compare figure: small multiples that show every strategy, failures included.

Why it is drawn this way (each point is a way the first figure misled its readers):

- A strategy that refuses hv_netvsc's buffers (swiotlb: 256 KiB at most; atomic-pool: 4 MiB
  chunks) changes nothing in the guest, so on every cost panel it looks perfect. The
  "refused allocations" panel draws its refusals.
- A strategy that leaves private direct-map aliases of shared pages (vmalloc-alias) splits
  nothing, so on the direct-map panels it looks as good as the pool. The "fatal hazard
  pages" panel draws those pages.
- Several strategies lie on exactly the same line (no conversion at all, or the same one):
  each strategy has its own colour, line style and marker, and a panel names the strategies
  whose series are identical, so that a line hidden under another is still read.
- One legend for the whole figure, below the panels.
- Latency is the guest's modeled allocation latency (hv_netvsc_sim.inprocess), never the
  simulator's wall clock; the time axis is the scenario's virtual time (seconds for the
  stress cycles, hours or days for a schedule).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pool.guest.units import format_size

FORMATS = ("png", "svg", "pdf")  # what Agg/SVG/PDF write without extra packages
_STYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 2)))
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def check_plot_path(path: str) -> None:
    """ValueError (one line) unless `path` names a writable file of a known format: called
    before the run, so a typo costs nothing."""
    if not path:
        raise ValueError("needs a file name")
    p = Path(path)
    suffix = p.suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise ValueError(f"{path}: unknown format {suffix!r}: expected .{', .'.join(FORMATS)}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{path}: no directory {parent}")
    if p.is_dir():
        raise ValueError(f"{path}: is a directory")
    import os

    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"{path}: not writable")


def time_axis(doc: Mapping[str, Any]) -> tuple[float, str]:
    """(divisor, label) for the series' virtual seconds: days for a schedule of two days or
    more, hours for one of two hours or more, else seconds."""
    timeline = doc["config"].get("timeline")
    if not timeline:
        return 1.0, "virtual seconds (stress: 1 cycle = 1 s)"
    duration = float(timeline["duration_seconds"])
    if duration >= 2 * 86400:
        return 86400.0, "virtual days"
    if duration >= 2 * 3600:
        return 3600.0, "virtual hours"
    return 1.0, "virtual seconds"


def title(doc: Mapping[str, Any]) -> str:
    cfg = doc["config"]
    timeline = cfg.get("timeline")
    if timeline:
        d = float(timeline["duration_seconds"])
        length = f"{d / 86400:g} days" if d >= 2 * 86400 else f"{d / 3600:g} hours"
    else:
        length = f"{cfg['cycles']} cycles"
    return (
        f"hv_netvsc_sim compare, scenario {cfg.get('scenario', 'stress')} ({length}): "
        f"{format_size(cfg['guest_memory_bytes'])} {cfg['platform']} guest, "
        f"{cfg['age_steps']:,} aging steps, seed {cfg['seed']}"
    )


# (series key, panel title, scale, y axis)
PANELS: tuple[tuple[str, str, float, str], ...] = (
    ("direct_map_4k_share", "direct map in 4 KiB pages (%)", 0.01, "linear"),
    ("direct_map_splits_level2", "2 MiB leaf splits (cumulative)", 1, "symlog"),
    ("page_table_pages", "page-table pages from splits (cumulative)", 1, "symlog"),
    ("tlb_flushes", "global TLB flushes (cumulative)", 1, "symlog"),
    ("hypercalls", "conversion hypercalls (cumulative)", 1, "symlog"),
    ("alloc_latency_max_seconds", "modeled alloc latency, max per sample (ms)", 1e-3, "points"),
    ("failures", "refused allocations (cumulative)", 1, "symlog"),
    ("fatal_hazard_pages", "fatal hazard pages (private alias of a shared page)", 1, "symlog"),
)


def _identical_groups(names: Sequence[str], series: Sequence[list[float]]) -> list[list[str]]:
    groups: dict[tuple[float, ...], list[str]] = {}
    for name, ys in zip(names, series, strict=True):
        groups.setdefault(tuple(ys), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def plot_compare(doc: Mapping[str, Any], path: str) -> None:
    """Write the figure: the eight series panels and a bar panel of modeled p50/p99."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(doc["strategies"].items())
    names = [n for n, _ in strategies]
    divisor, xlabel = time_axis(doc)
    fig, axes = plt.subplots(3, 3, figsize=(17, 12), constrained_layout=True)
    fig.suptitle(title(doc), fontsize=13)
    colors = [plt.get_cmap("tab10")(i) for i in range(10)]
    handles: list[Any] = []
    for ax, (key, label, scale, yscale) in zip(axes.flat, PANELS, strict=False):
        values = []
        for i, (name, r) in enumerate(strategies):
            s = r["series"]
            xs = [t / divisor for t in s.get("virtual_seconds", s["cycle"])]
            ys = [v / scale for v in s.get(key, [0] * len(xs))]
            values.append(ys)
            if yscale == "points":  # samples without an allocation have no latency: no point
                pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y > 0]
                ax.plot(
                    [x for x, _ in pts],
                    [y for _, y in pts],
                    linestyle="none",
                    color=colors[i % len(colors)],
                    marker=_MARKERS[i % len(_MARKERS)],
                    markersize=9 - 5 * i / max(1, len(strategies) - 1),
                    alpha=0.8,
                )
                continue
            (line,) = ax.plot(
                xs,
                ys,
                label=name,
                color=colors[i % len(colors)],
                linestyle=_STYLES[i % len(_STYLES)],
                marker=_MARKERS[i % len(_MARKERS)],
                markevery=max(1, len(xs) // 8) if len(xs) > 1 else 1,
                # later strategies thinner, so an identical line underneath still shows
                linewidth=3.2 - 2.2 * i / max(1, len(strategies) - 1),
                markersize=6,
                alpha=0.9,
            )
            if len(handles) < len(strategies):
                handles.append(line)
        same = _identical_groups(names, values)
        if same:
            note = "\n".join("identical: " + ", ".join(g) for g in same)
            ax.text(
                0.02,
                0.97,
                note,
                transform=ax.transAxes,
                va="top",
                fontsize=7.5,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.7"},
            )
        ax.set_title(label, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        if yscale == "symlog":
            ax.set_yscale("symlog", linthresh=1)
        elif yscale == "points":
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    _latency_bars(axes.flat[-1], strategies, colors)
    fig.legend(
        handles=handles,
        labels=names,
        loc="outside lower center",
        ncol=min(len(names), 7),
        fontsize=10,
        frameon=False,
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _latency_bars(ax: Any, strategies: Sequence[tuple[str, Any]], colors: Sequence[Any]) -> None:
    """Modeled p50 and p99 allocation latency per strategy; refusing strategies marked."""
    x = list(range(len(strategies)))
    p50 = [r["alloc_latency_seconds"]["p50"] * 1e3 for _, r in strategies]
    p99 = [r["alloc_latency_seconds"]["p99"] * 1e3 for _, r in strategies]
    tint = [colors[i % len(colors)] for i in x]
    ax.bar([i - 0.2 for i in x], p50, 0.4, color=tint, alpha=0.55)
    ax.bar([i + 0.2 for i in x], p99, 0.4, color=tint, hatch="//")
    for i, (_, r) in enumerate(strategies):
        if r["alloc_latency_seconds"].get("samples", 1) == 0:
            ax.text(i, 0.02, "all refused", rotation=90, ha="center", va="bottom", fontsize=8)
        elif r["failures"]:  # its latency is that of what it could serve: say what it refused
            top = max(p99[i], p50[i], 0.01) * 1.3
            ax.text(
                i,
                top,
                f"{r['failures']:,}\nrefused",
                ha="center",
                va="bottom",
                fontsize=7.5,
                color="firebrick",
            )
    ax.set_xticks(x, [n for n, _ in strategies], rotation=30, ha="right", fontsize=8)
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_ylim(0, max([*p99, *p50, 0.01]) * 3)
    ax.set_title("modeled alloc latency (ms): p50 plain, p99 hatched", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
