"""A sweep's result directory: every finished cell, kept as it finishes; the tidy table.

- `cells.jsonl`: one JSON line per finished cell (hv_netvsc_sim.sweep_cell.CellRecord: its
  id, keys, status, error, the strategy's compare document without its series, wall-clock
  seconds), appended and fsync'd by the client as each cell comes back. This is what makes
  a sweep resumable: a sweep killed at any moment loses at most the cells in flight, and
  a line cut short by the kill is ignored on reading. The latest line of an id wins.
- `results.parquet` and `results.csv`: the table of the grid's cells, one row per cell:
  the cell id, the grid's keys, `status` and `error`, the grid's metrics, and the
  wall-clock columns `wall_seconds` and `aging_seconds` (the only columns that differ
  between two runs of the same grid). Rewritten (atomically) whenever the sweep stops.

Metrics are dotted keys into the stored document (`run.direct_map_splits.level2`), read
when the table is written, so a metric added to the grid later needs no cell to run again.
A key of a table of counts that a cell's document lacks (a failure reason that never
happened) is 0; a metric of a failed cell is null.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from hv_netvsc_sim.sweep_cell import CellRecord
from hv_netvsc_sim.sweep_grid import Cell, Grid

__all__ = [
    "CELLS_FILE",
    "CSV_FILE",
    "PARQUET_FILE",
    "WALL_COLUMNS",
    "ResultStore",
    "metric_value",
    "rows_for",
]

CELLS_FILE = "cells.jsonl"
PARQUET_FILE = "results.parquet"
CSV_FILE = "results.csv"
WALL_COLUMNS = ("wall_seconds", "aging_seconds")
ID_COLUMN = "cell_id"
STATUS_COLUMNS = ("status", "error")


def metric_value(doc: Mapping[str, Any] | None, metric: str) -> int | float | None:
    """The number at dotted key `metric` of a cell's document; None if absent (or the cell
    has no document); 0 for a key missing from a table of counts. Booleans count as 0/1.
    ValueError if the key holds a table or a list."""
    node: Any = doc
    parts = metric.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, Mapping):
            return None
        if part not in node:
            # a key of a table of counts (failure_reasons, events) that did not occur: 0
            last = i == len(parts) - 1
            return 0 if last and all(isinstance(v, int) for v in node.values()) else None
        node = node[part]
    if isinstance(node, bool):
        return int(node)
    if isinstance(node, int | float) or node is None:
        return node
    kind = "table" if isinstance(node, Mapping) else type(node).__name__
    keys = f": pick one of {', '.join(sorted(node))}" if isinstance(node, Mapping) else ""
    raise ValueError(f"metric {metric!r} is a {kind}, not a number{keys}")


class ResultStore:
    """The result directory of one sweep (created on first write)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.cells_path = self.dir / CELLS_FILE

    def load(self) -> dict[str, CellRecord]:
        """Every stored cell by id (the latest line of an id wins; a truncated or unreadable
        line, what a kill mid-write leaves, is skipped)."""
        out: dict[str, CellRecord] = {}
        try:
            lines = self.cells_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return out
        for line in lines:
            try:
                record = CellRecord.from_json(json.loads(line))
            except (ValueError, TypeError, KeyError):
                continue
            out[record.id] = record
        return out

    def open(self) -> None:
        """Create the directory; ValueError (one line) if it cannot be."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with self.cells_path.open("ab"):
                pass
        except OSError as exc:
            raise ValueError(f"{self.dir}: cannot write results: {exc.strerror or exc}") from None

    def append(self, record: CellRecord) -> None:
        """Keep one finished cell, durably (the line is on disk when this returns)."""
        line = json.dumps(record.as_json(), separators=(",", ":")) + "\n"
        with self.cells_path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def write_tables(self, grid: Grid, records: Mapping[str, CellRecord]) -> list[dict[str, Any]]:
        """Write results.parquet and results.csv for the grid's cells that have a record;
        returns the rows."""
        import pyarrow as pa
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        rows = rows_for(grid, grid.cells(), records)
        columns = table_columns(grid)
        arrays = {name: _array(pa, [r[name] for r in rows]) for name in columns}
        table = pa.table(arrays)
        self.dir.mkdir(parents=True, exist_ok=True)
        writers: tuple[tuple[str, Callable[[str], None]], ...] = (
            (PARQUET_FILE, lambda p: pq.write_table(table, p)),
            (CSV_FILE, lambda p: pacsv.write_csv(table, p)),
        )
        for name, write in writers:
            tmp = self.dir / f".{name}.tmp"
            write(str(tmp))
            os.replace(tmp, self.dir / name)
        return rows


def table_columns(grid: Grid) -> tuple[str, ...]:
    return (ID_COLUMN, *grid.key_names, *STATUS_COLUMNS, *grid.metrics, *WALL_COLUMNS)


def rows_for(
    grid: Grid, cells: Iterable[Cell], records: Mapping[str, CellRecord]
) -> list[dict[str, Any]]:
    """One row per cell that has a record, in the grid's order."""
    rows = []
    for cell in cells:
        record = records.get(cell.id)
        if record is None:
            continue
        row: dict[str, Any] = {ID_COLUMN: cell.id, **cell.key_json()}
        row["status"] = record.status
        row["error"] = record.error
        for metric in grid.metrics:
            try:
                row[metric] = metric_value(record.doc, metric)
            except ValueError:
                row[metric] = None
        row["wall_seconds"] = record.wall_seconds
        row["aging_seconds"] = record.aging_seconds
        rows.append(row)
    return rows


def _array(pa: Any, values: list[Any]) -> Any:
    """A column: int64 when every value is an integer (or null), float64 when numbers, a
    string otherwise (lists and tables as JSON text)."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.array(values, pa.bool_())
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.array(values, pa.int64())
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return pa.array([None if v is None else float(v) for v in values], pa.float64())
    return pa.array(
        [None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values],
        pa.string(),
    )


def read_table(directory: str | Path) -> list[dict[str, Any]]:
    """The stored results.parquet as rows (tests, and anyone without pandas)."""
    import pyarrow.parquet as pq

    return list(pq.read_table(str(Path(directory) / PARQUET_FILE)).to_pylist())


def check_metric(doc: Mapping[str, Any], metric: str) -> None:
    """ValueError (one line) unless `metric` names a number in a cell's document, or a key
    of one of its tables of counts (failure_reasons, events: keys appear when they occur)."""
    node: Any = doc
    parts = metric.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, Mapping):
            raise ValueError(f"metric {metric!r}: {'.'.join(parts[:i])} is not a table")
        if part not in node:
            counts = all(isinstance(v, int | float) for v in node.values())
            if i == len(parts) - 1 and counts:
                return  # a count that did not occur in this cell
            where = ".".join(parts[:i]) or "the document"
            raise ValueError(
                f"metric {metric!r}: no {part!r} in {where} (its keys: {', '.join(sorted(node))})"
            )
        node = node[part]
    metric_value(doc, metric)
