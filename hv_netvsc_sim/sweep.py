"""`hv-netvsc-sim sweep`: a grid of compare runs on a Dask cluster, resumable, with 95 % CIs.

    hv-netvsc-sim sweep --grid GRID.toml [--out DIR] [--scheduler tcp://HOST:8786]
                        [--workers N] [--json] [--plot FILE.png] [--retry-failed] [--quiet]

The grid (hv_netvsc_sim.sweep_grid) names the axes, the fixed settings and the metrics;
every cell is one compare run of one strategy (hv_netvsc_sim.sweep_cell). The engine is
dask.distributed, unchanged between one machine and many: by default a LocalCluster of
worker processes on 127.0.0.1, one per CPU, one thread each (the model is pure Python and
holds the GIL); `--scheduler ADDRESS` submits the same tasks to an existing cluster (its
workers must have this package installed). Nothing here schedules, queues or talks to
workers: each guest key is one `Client.submit` task (its aged guest, built once), each cell
a task that depends on its key's, and the results are collected with `as_completed`. The
dependency is what lets the scheduler run a key's cells where its aged guest already is
(dask's data locality) instead of aging it again on every worker: a first version that
cached guests per worker aged each key once per worker and ran a 48-cell grid at 0.58x the
speed of the same cells in one process on 2 CPUs.

Failures: a cell that fails inside (its configuration refused, an exception in the model)
comes back as a finished task carrying its error, is recorded, and the sweep goes on. A
worker that dies mid-cell (killed, out of memory) is the engine's: the scheduler moves the
cell to another worker once (`distributed.scheduler.allowed-failures` = 1 on the local
cluster: an existing cluster keeps its own setting), and a cell lost twice is recorded with
dask's KilledWorker error. Tasks are submitted with `retries=1`, dask's retry of a task that
raised (the cell itself never raises; what can is the engine's own hand-over).

Results (hv_netvsc_sim.sweep_store) go to DIR (default `sweep-<grid name>`): each cell is
kept as it finishes, so a sweep killed at any point resumes where it stopped: cells already
in DIR (by the hash of their keys) are not run again (failed ones neither, unless
`--retry-failed`). The summary (hv_netvsc_sim.sweep_summary) is printed as a table, or as
JSON with `--json`, and plotted with `--plot`.

Exit status: 0 when every cell finished, 1 when some failed (all recorded) or the scheduler
cannot be reached, 2 on a grid that cannot be used (one line, no traceback), 130 when
interrupted (what finished is kept).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import attrs

from hv_netvsc_sim.argtypes import int_at_least
from hv_netvsc_sim.sweep_cell import (
    CellRecord,
    GuestGroup,
    group_cells,
    prepare_guests,
    run_cell,
)
from hv_netvsc_sim.sweep_grid import Cell, Grid, GridError, load_grid
from hv_netvsc_sim.sweep_store import ResultStore, check_metric
from hv_netvsc_sim.sweep_summary import plot_summary, print_summary, summarize
from pool.closedpipe import quiet_on_closed_stdout
from pool.strictargs import StrictParser

__all__ = [
    "SweepOutcome",
    "add_sweep_command",
    "default_workers",
    "run_sequential",
    "run_sweep",
]

Report = Callable[[CellRecord], None]


def default_workers() -> int:
    """Worker processes of the local cluster: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@attrs.frozen
class SweepOutcome:
    """What a sweep did: the grid's cells, how many ran now, how many came from DIR, how
    many of all failed, the table's rows and the wall-clock seconds."""

    cells: int
    ran: int
    reused: int
    failed: int
    rows: list[dict[str, Any]]
    seconds: float


class _Progress:
    """Cells done out of the grid's: a rich bar on a terminal, else a line every tenth."""

    def __init__(self, total: int, done: int, stream: TextIO, enabled: bool) -> None:
        self.total, self.done, self.failed = total, done, 0
        self.stream = stream
        self.enabled = enabled
        self.step = max(1, total // 10)
        self._bar: Any = None
        self._task: Any = None
        if enabled and total > done:
            print(
                f"sweep: {total} cells, {done} already done: running {total - done}",
                file=stream,
                flush=True,
            )

    def __enter__(self) -> _Progress:
        if self.enabled and self.stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("sweep cells"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[failed]} failed"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(
                "cells", total=self.total, completed=self.done, failed=0
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)

    def __call__(self, record: CellRecord) -> None:
        self.done += 1
        self.failed += 0 if record.ok else 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, failed=self.failed)
        elif self.done % self.step == 0 or self.done == self.total:
            failed = f" ({self.failed} failed)" if self.failed else ""
            print(f"sweep: {self.done}/{self.total} cells{failed}", file=self.stream, flush=True)


def _check_metrics(grid: Grid, record: CellRecord) -> None:
    assert record.doc is not None
    for metric in grid.metrics:
        try:
            check_metric(record.doc, metric)
        except ValueError as exc:
            raise GridError(f"{grid.source}: {exc}") from None


def _plan(
    grid: Grid, store: ResultStore, retry_failed: bool
) -> tuple[list[Cell], dict[str, CellRecord], bool]:
    """The cells still to run, the stored records, and whether the metrics are checked (an
    ok record of this grid was already stored)."""
    records = store.load()
    checked = False
    pending = []
    for cell in grid.cells():
        record = records.get(cell.id)
        if record is not None and record.ok and not checked:
            _check_metrics(grid, record)
            checked = True
        if record is None or (retry_failed and not record.ok):
            pending.append(cell)
    return pending, records, checked


@contextmanager
def _client(scheduler: str | None, workers: int) -> Iterator[Any]:
    """A dask.distributed Client: on a local cluster of `workers` processes on loopback, or
    connected to the scheduler at `scheduler`."""
    import dask
    import distributed

    engine: Any = distributed  # its Client and LocalCluster are not annotated
    Client, LocalCluster = engine.Client, engine.LocalCluster

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(
                f"cannot reach the Dask scheduler at {scheduler}: {exc}"
            ) from None
        try:
            yield client
        finally:
            client.close()
        return
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",  # a free port: never clash with another cluster
            silence_logs=logging.ERROR,
        )
    try:
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()


def _lost(cell: Cell, exc: BaseException) -> CellRecord:
    return CellRecord.failed(cell, f"{type(exc).__name__}: {exc}")


def _collect(
    grid: Grid,
    store: ResultStore,
    records: dict[str, CellRecord],
    results: Iterator[CellRecord],
    checked: bool,
    report: Report | None,
) -> int:
    """Keep each finished cell as it comes; check the metrics on the first ok one."""
    ran = 0
    for record in results:
        store.append(record)
        records[record.id] = record
        ran += 1
        if report is not None:
            report(record)
        if record.ok and not checked:
            _check_metrics(grid, record)
            checked = True
    return ran


def _outcome(
    grid: Grid, store: ResultStore, records: dict[str, CellRecord], ran: int, t0: float
) -> SweepOutcome:
    rows = store.write_tables(grid, records)
    failed = sum(1 for r in rows if r["status"] != "ok")
    return SweepOutcome(len(grid), ran, len(rows) - ran, failed, rows, time.perf_counter() - t0)


def _submit(client: Any, groups: Sequence[GuestGroup]) -> dict[str, tuple[Cell, Any]]:
    """One task per guest key (its Guests, built and aged once) and one per cell, which
    depends on its key's: the scheduler runs a key's cells where its guests are, or moves
    them. Keys are unique to this run (a killed client's tasks may linger on a shared
    scheduler until it notices)."""
    token = uuid.uuid4().hex[:8]
    by_key: dict[str, tuple[Cell, Any]] = {}
    for group in groups:
        guests = client.submit(
            prepare_guests,
            group.guest,
            group.age_steps,
            group.aged,
            key=f"sweep-guests-{group.id}-{token}",
            pure=False,
            retries=1,
        )
        for cell in group.cells:
            future = client.submit(
                run_cell, cell, guests, key=f"sweep-cell-{cell.id}-{token}", pure=False, retries=1
            )
            by_key[future.key] = (cell, future)
        del guests  # only the cells hold it now: released when the last one is done
    return by_key


def _finished(by_key: dict[str, tuple[Cell, Any]]) -> Iterator[CellRecord]:
    import distributed

    as_completed: Any = distributed.as_completed  # not annotated
    for future in as_completed([f for _, f in by_key.values()]):
        cell = by_key[future.key][0]
        try:
            yield future.result()
        except Exception as exc:  # the engine gave up on it: KilledWorker, ...
            yield _lost(cell, exc)
        future.release()


def run_sweep(
    grid: Grid,
    out: str | Path,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    retry_failed: bool = False,
    progress: Callable[[int, int], Any] | None = None,
) -> SweepOutcome:
    """Run the grid's missing cells on Dask (a local cluster unless `scheduler`), keeping
    each in `out`; write the table. `progress(total, done)` makes a per-cell reporter (a
    context manager called with each record)."""
    t0 = time.perf_counter()
    store = ResultStore(out)
    store.open()
    pending, records, checked = _plan(grid, store, retry_failed)
    groups, refused = group_cells(pending)
    reporter = progress(len(grid), len(grid) - len(pending)) if progress else None
    ran = 0
    try:
        with reporter if reporter is not None else contextlib.nullcontext():
            ran += _collect(grid, store, records, iter(refused), checked, reporter)
            if groups:
                with _client(scheduler, workers or default_workers()) as client:
                    by_key = _submit(client, groups)
                    try:
                        ran += _collect(grid, store, records, _finished(by_key), checked, reporter)
                    except BaseException:
                        client.cancel([f for _, f in by_key.values()])
                        raise
    finally:
        outcome = _outcome(grid, store, records, ran, t0)
    return outcome


def run_sequential(grid: Grid, out: str | Path) -> SweepOutcome:
    """The same cells one after another in this process, without Dask (the benchmark's
    baseline): each guest key's Guests built and aged once, as on the cluster, so a cell's
    document is the same either way."""
    t0 = time.perf_counter()
    store = ResultStore(out)
    store.open()
    pending, records, checked = _plan(grid, store, False)
    groups, refused = group_cells(pending)

    def results() -> Iterator[CellRecord]:
        yield from refused
        for group in groups:
            guests = prepare_guests(group.guest, group.age_steps, group.aged)
            for cell in group.cells:
                yield run_cell(cell, guests)

    ran = _collect(grid, store, records, results(), checked, None)
    return _outcome(grid, store, records, ran, t0)


# ---- the command line ----------------------------------------------------------------------


def _scheduler_address(text: str) -> str:
    scheme, sep, rest = text.partition("://")
    if not sep or not scheme or not rest:
        raise argparse.ArgumentTypeError(
            f"scheduler address must be like tcp://HOST:8786: {text!r}"
        )
    return text


def add_sweep_command(sub: Any) -> None:
    """Register `sweep` on the hv-netvsc-sim subparsers."""
    p = sub.add_parser(
        "sweep",
        help="a grid of compare runs (strategies x guests x seeds ...) on Dask, with 95%% CIs",
        description="Run every cell of a grid (one compare run of one strategy per cell) on "
        "a Dask cluster, keep each result in DIR as it finishes (a killed sweep resumes), "
        "and summarize each metric per strategy: mean, median and a 95% t interval over "
        "seeds. Example grids: docs/sweep/.",
    )
    p.add_argument("--grid", required=True, metavar="GRID.toml", help="the grid file (TOML)")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="result directory (default sweep-<grid name>): cells.jsonl, results.parquet, "
        "results.csv; cells already there are not run again",
    )
    p.add_argument(
        "--scheduler",
        type=_scheduler_address,
        metavar="ADDRESS",
        help="an existing Dask scheduler (tcp://host:8786) instead of a local cluster",
    )
    p.add_argument(
        "--workers",
        type=int_at_least(1, "--workers"),
        metavar="N",
        help=f"worker processes of the local cluster (default: one per CPU, {default_workers()})",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--plot", metavar="FILE.png", help="write the summary plot to FILE")
    p.add_argument("--retry-failed", action="store_true", help="run cells stored as failed again")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_sweep, parser=p)


def _check_plot(parser: argparse.ArgumentParser, path: str | None) -> None:
    """Before any cell runs: a plot file matplotlib can write, in a directory that exists."""
    if path is None:
        return
    if not path:
        parser.error("--plot needs a file name")
    from matplotlib.figure import Figure

    suffix = Path(path).suffix.lstrip(".").lower()
    formats = Figure().canvas.get_supported_filetypes()
    if suffix not in formats:
        parser.error(
            f"--plot {path}: unknown format {suffix!r}: expected one of {', '.join(formats)}"
        )
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        parser.error(f"--plot {path}: no directory {parent}")


def _sweep(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        grid = load_grid(args.grid)
    except GridError as exc:
        parser.error(str(exc))
    _check_plot(parser, args.plot)
    if args.scheduler and args.workers:
        parser.error("--workers sizes the local cluster; an existing one (--scheduler) has its own")
    out = Path(args.out or f"sweep-{Path(args.grid).stem}")
    quiet = args.quiet

    def progress(total: int, done: int) -> Any:
        return _Progress(total, done, sys.stderr, not quiet)

    try:
        outcome = run_sweep(
            grid,
            out,
            scheduler=args.scheduler,
            workers=args.workers,
            retry_failed=args.retry_failed,
            progress=progress,
        )
    except GridError as exc:  # a metric the documents do not have: what ran is kept
        parser.error(f"{exc} (the cells that ran are kept in {out})")
    except ValueError as exc:  # the result directory cannot be written
        parser.error(str(exc))
    except ConnectionError as exc:
        print(f"hv-netvsc-sim sweep: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        kept = len(ResultStore(out).load())
        print(f"sweep: interrupted; {kept} finished cells kept in {out}", file=sys.stderr)
        return 130
    summary = summarize(grid, outcome.rows)
    if args.json:
        json.dump(summary, sys.stdout)
        sys.stdout.write("\n")
    else:
        print_summary(summary)
    if args.plot:
        plot_summary(summary, args.plot)
    if not quiet:
        print(
            f"sweep: {outcome.cells} cells: {outcome.ran} run now, {outcome.reused} from {out}, "
            f"{outcome.failed} failed; {outcome.seconds:.1f} s; table in {out}/results.parquet"
            + (f", plot in {args.plot}" if args.plot else ""),
            file=sys.stderr,
        )
        for row in outcome.rows:
            if row["status"] != "ok":
                print(f"  failed cell {row['cell_id']}: {row['error']}", file=sys.stderr)
    return 1 if outcome.failed else 0


@quiet_on_closed_stdout
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m hv_netvsc_sim.sweep ...` (the same as `hv-netvsc-sim sweep ...`)."""
    parser = StrictParser(prog="hv-netvsc-sim")
    add_sweep_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sweep", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args, args.parser))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
