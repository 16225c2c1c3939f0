"""A sweep's statistics: per group of cells that differ only by seed, each metric's mean,
median and 95 % confidence interval over the seeds; as a table, JSON, and a plot.

The interval is Student's t interval for the mean, mean ± t(0.975, n−1) · s / √n, with s
the sample standard deviation (n−1 in the denominator) and t from scipy.stats.t: the seeds
are independent replicates of one configuration, and the t interval is exact for normal
figures and a good approximation for the sums of many small events these counts are. With
one seed there is no interval (null); when every seed gives the same figure, the interval
is that figure. Only cells that finished (status ok) are counted; a group reports how many
of its cells failed beside its statistics.

A group is the set of cells with the same keys except `seed`: with the strategy the only
other axis, one group per strategy; with a guest-size axis too, one per strategy and size.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from hv_netvsc_sim.sweep_grid import STRATEGY_AXIS, Grid
from pool.guest.units import format_size

__all__ = ["CONFIDENCE", "REPLICATE_AXIS", "plot_summary", "summarize", "summary_table"]

CONFIDENCE = 0.95
REPLICATE_AXIS = "seed"
METHOD = "Student t interval for the mean over seeds: mean ± t(0.975, n-1)·s/√n"


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The two-sided t interval for the mean of `values` (at least two)."""
    from scipy import stats

    n = len(values)
    mean = statistics.fmean(values)
    s = statistics.stdev(values)
    if s == 0:
        return mean, mean
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * s / math.sqrt(n)
    return mean - half, mean + half


def _stats(values: Sequence[float]) -> dict[str, Any]:
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "median": None, "std": None, "ci_low": None, "ci_high": None}
    lo, hi = t_interval(values) if n >= 2 else (None, None)
    return {
        "n": n,
        "mean": statistics.fmean(values),
        "median": float(statistics.median(values)),
        "std": statistics.stdev(values) if n >= 2 else None,
        "ci_low": lo,
        "ci_high": hi,
    }


def group_names(grid: Grid) -> tuple[str, ...]:
    """The keys a group is named by: the axes other than the seed (the fixed keys are the
    same for every group)."""
    return tuple(n for n, _ in grid.axes if n != REPLICATE_AXIS)


def summarize(grid: Grid, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The summary document (`sweep --json`): groups in the grid's order, each with its
    keys, cell counts and per-metric statistics."""
    names = group_names(grid)
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        gkey = tuple(repr(row[n]) for n in names)
        g = groups.setdefault(
            gkey,
            {"keys": {n: row[n] for n in names}, "cells": 0, "failed": 0, "values": {}},
        )
        g["cells"] += 1
        if row["status"] != "ok":
            g["failed"] += 1
            continue
        for m in grid.metrics:
            if row[m] is not None:
                g["values"].setdefault(m, []).append(float(row[m]))
    out = []
    for g in groups.values():
        values = g.pop("values")
        g["metrics"] = {m: _stats(values.get(m, [])) for m in grid.metrics}
        out.append(g)
    return {
        "grid": grid.source,
        "confidence": CONFIDENCE,
        "interval": METHOD,
        "over": REPLICATE_AXIS,
        "fixed": {n: v for n, v in grid.fixed},
        "cells": len(rows),
        "failed": sum(1 for r in rows if r["status"] != "ok"),
        "groups": out,
    }


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100 or x == int(x):
        return f"{x:,.0f}" if abs(x - round(x)) < 0.05 or abs(x) >= 100 else f"{x:,.1f}"
    return f"{x:,.3g}"


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / (1 << 20):,.1f} MiB"


def _key_text(name: str, value: Any) -> str:
    if name.endswith("_bytes") and isinstance(value, int):
        return format_size(value)
    return str(value)


def summary_table(summary: Mapping[str, Any]) -> Any:
    """A rich Table: one row per group and metric."""
    from rich.table import Table

    groups = summary["groups"]
    names = list(groups[0]["keys"]) if groups else []
    fixed = ", ".join(f"{n} {_key_text(n, v)}" for n, v in summary["fixed"].items())
    table = Table(
        title=f"sweep {Path(summary['grid']).name}: {summary['cells']} cells"
        + (f", {summary['failed']} failed" if summary["failed"] else "")
        + (f"; {fixed}" if fixed else "")
        + f"\n{int(summary['confidence'] * 100)} % CI: t interval over seeds",
        title_justify="left",
    )
    for n in names:
        table.add_column(n, no_wrap=True)
    table.add_column("metric", no_wrap=True)
    for col in ("n", "mean", "median", "95 % CI"):
        table.add_column(col, justify="right", no_wrap=True)
    for g in groups:
        first = True
        for metric, s in g["metrics"].items():
            keys = [_key_text(n, g["keys"][n]) if first else "" for n in names]
            num = _mib if "bytes" in metric else _num
            ci = "-" if s["ci_low"] is None else f"{num(s['ci_low'])} – {num(s['ci_high'])}"
            n_text = f"{s['n']}" + (f" ({g['failed']} failed)" if first and g["failed"] else "")
            table.add_row(*keys, metric, n_text, num(s["mean"]), num(s["median"]), ci)
            first = False
        table.add_section()
    return table


def print_summary(summary: Mapping[str, Any], stream: TextIO | None = None) -> None:
    from hv_netvsc_sim.report import print_table  # rich and matplotlib only when printing

    print_table(summary_table(summary), stream)


def plot_summary(summary: Mapping[str, Any], path: str) -> None:
    """Small multiples: one panel per metric; in each, the groups along x (by their keys
    other than the strategy) and one marker per strategy, offset so that none hides
    another, with its 95 % interval as an error bar; a cross where a group has no interval
    (one seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = summary["groups"]
    metrics = list(groups[0]["metrics"]) if groups else []
    if not metrics:
        raise ValueError("nothing to plot: no cell finished")
    strategies = list(dict.fromkeys(str(g["keys"].get(STRATEGY_AXIS, "")) for g in groups))
    others = [n for n in groups[0]["keys"] if n != STRATEGY_AXIS]

    def label(g: Mapping[str, Any]) -> str:
        if not others:  # the strategy is the only axis: one x position each
            return str(g["keys"].get(STRATEGY_AXIS, ""))
        return "\n".join(_key_text(n, g["keys"][n]) for n in others)

    xlabels = list(dict.fromkeys(label(g) for g in groups))
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), squeeze=False, constrained_layout=True
    )
    width = 0.7
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for i, strategy in enumerate(strategies):
            spread = len(strategies) if others else 1
            offset = (i - (spread - 1) / 2) * width / spread if others else 0.0
            xs, ys, lo, hi, bare_x, bare_y = [], [], [], [], [], []
            for g in groups:
                if str(g["keys"].get(STRATEGY_AXIS, "")) != strategy:
                    continue
                s = g["metrics"][metric]
                if s["mean"] is None:
                    continue
                x = xlabels.index(label(g)) + offset
                if s["ci_low"] is None:
                    bare_x.append(x)
                    bare_y.append(s["mean"])
                    continue
                xs.append(x)
                ys.append(s["mean"])
                lo.append(s["mean"] - s["ci_low"])
                hi.append(s["ci_high"] - s["mean"])
            color = f"C{i % 10}"
            ax.errorbar(
                xs, ys, yerr=[lo, hi], fmt="o", capsize=3, color=color, label=strategy or None
            )
            ax.plot(bare_x, bare_y, "x", color=color)
        ax.set_title(metric, fontsize=9)
        ax.set_xticks(range(len(xlabels)), xlabels, fontsize=8)
        ax.set_xlim(-0.6, len(xlabels) - 0.4)
        ax.grid(True, axis="y", alpha=0.3)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 5))
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if any(labels):
        fig.legend(handles, labels, loc="outside lower center", ncols=min(6, len(labels)))
    fixed = ", ".join(f"{n} {_key_text(n, v)}" for n, v in summary["fixed"].items())
    fig.suptitle(
        f"sweep {Path(summary['grid']).name}: mean and {int(summary['confidence'] * 100)} % "
        "t interval over seeds" + (f"\n{fixed}" if fixed else ""),
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
