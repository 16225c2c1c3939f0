"""Terminal output: a progress reporter, the compare table, the run summary, the plot."""

from __future__ import annotations

import errno
import io
import shutil
import sys
import types
from collections.abc import Mapping
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from hv_netvsc_sim.plot import plot_compare
from pool.guest.units import format_size

__all__ = ["ProgressReporter", "compare_table", "plot_compare", "print_table", "summary_table"]


class ProgressReporter:
    """`reporter(what, done, total)`: a rich progress bar per `what` on a terminal; plain
    lines every 10 % otherwise (total 0: unbounded, a line every 100). Use as a context
    manager."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._last: dict[str, int] = {}

    def __enter__(self) -> ProgressReporter:
        if self.enabled and self.tty:
            self._progress = Progress(
                TextColumn("{task.description:<22}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.__exit__(exc_type, exc, tb)
            self._progress = None

    def __call__(self, what: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            task = self._tasks.get(what)
            if task is None:
                task = self._progress.add_task(what, total=total or None)
                self._tasks[what] = task
            self._progress.update(task, completed=done)
            return
        if total:
            step = max(1, total // 10)
            mark = done // step
            if done != total and mark == self._last.get(what, -1):
                return
            if done == total and self._last.get(what) == -2:
                return
            self._last[what] = -2 if done == total else mark
            print(f"{what}: {done}/{total}", file=self.stream, flush=True)
        elif done % 100 == 0:
            print(f"{what}: {done}", file=self.stream, flush=True)


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):,.1f}"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f}"


def scenario_label(cfg: Mapping[str, Any]) -> str:
    """`stress, 200 cycles` or `azure-month, 30 days`: the run's length in its own units."""
    timeline = cfg.get("timeline")
    name = cfg.get("scenario", "stress")
    if not timeline:
        return f"{name}, {cfg['cycles']} cycles"
    d = float(timeline["duration_seconds"])
    length = f"{d / 86400:g} days" if d >= 2 * 86400 else f"{d / 3600:g} hours"
    return f"{name}, {length}"


def compare_title(cfg: Mapping[str, Any]) -> str:
    return (
        f"hv_netvsc_sim compare: {format_size(cfg['guest_memory_bytes'])} {cfg['platform']} "
        f"guest, {cfg['age_steps']:,} aging steps, {scenario_label(cfg)}, seed {cfg['seed']}"
    )


COMPARE_COLUMNS = (
    ("strategy", "left"),
    ("allocs", "right"),
    ("refused", "right"),
    ("setup\nhypercalls", "right"),
    ("run\nhypercalls", "right"),
    ("run splits\n2M / 1G", "right"),
    ("page-table\nKiB", "right"),
    ("TLB\nflushes", "right"),
    ("4 KiB share\nend %", "right"),
    ("fatal\nhazard pages", "right"),
    ("shared\nMiB", "right"),
    ("leaked\nMiB", "right"),
    ("modeled alloc\np50 µs", "right"),
    ("modeled alloc\np99 µs", "right"),
    ("modeled alloc\nmax µs", "right"),
)


def compare_table(doc: Mapping[str, Any]) -> Table:
    """The headline table: counts, the fragmentation's own units, hazards, and the guest's
    modeled allocation latency (never the simulator's wall clock). Strategy names never
    wrap or truncate; the other headers wrap when the terminal is narrow."""
    table = Table(title=compare_title(doc["config"]), title_justify="left")
    names = list(doc["strategies"])
    for col, justify in COMPARE_COLUMNS:
        if col == "strategy":
            table.add_column(col, no_wrap=True, min_width=max(map(len, names), default=8))
        else:
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for name, r in doc["strategies"].items():
        splits = r["run"]["direct_map_splits"]
        end = r["end_state"]
        lat = r["alloc_latency_seconds"]
        frag = r.get("fragmentation", {})
        share = frag.get("direct_map_4k_share", 0.0)
        table.add_row(
            name,
            f"{r['allocations']:,}",
            f"{r['failures']:,}",
            f"{r['setup']['hypercalls']:,}",
            f"{r['run']['hypercalls']:,}",
            f"{splits['level2']:,} / {splits['level3']:,}",
            f"{frag.get('page_table_bytes', 0) / 1024:,.0f}",
            f"{frag.get('tlb_flushes', 0):,}",
            f"{share * 100:,.2f}",
            f"{end['hazard_pages']['private_alias_to_shared']:,}",
            _mib(end["shared_bytes"]),
            _mib(end["leaked_bytes"]),
            _us(lat["p50"]),
            _us(lat["p99"]),
            _us(lat.get("max", 0.0)),
        )
    return table


def summary_table(title: str, rows: Mapping[str, Any]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right", max_width=72)
    for key, value in rows.items():
        if isinstance(value, float):
            text = f"{value:,.6g}"
        elif isinstance(value, int):
            text = f"{value:,}"
        elif isinstance(value, Mapping):
            text = (
                ", ".join(
                    f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in value.items()
                )
                or "-"
            )
        else:
            text = str(value)
        table.add_row(key, text)
    return table


def table_width(table: Table, stream: TextIO) -> int:
    """The terminal's width on a terminal (shutil.get_terminal_size, which honours
    $COLUMNS); redirected, the table's natural width, so that nothing wraps or truncates."""
    if stream.isatty():
        return shutil.get_terminal_size().columns
    probe = Console(file=io.StringIO(), width=100_000)
    return max(40, probe.measure(table).maximum)


class _TableConsole(Console):
    """rich's Console, leaving a closed pipe to the command (pool.closedpipe): rich's own
    handler exits with status 1, the commands with 141 as for any other write."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError(errno.EPIPE, "the reader of the output has closed")


def print_table(table: Table, stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    _TableConsole(file=out, width=table_width(table, out)).print(table)
