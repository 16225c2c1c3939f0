"""One cell of a sweep, run where the engine puts it: one strategy of a `compare` run.

A cell is exactly what compare does for one of its strategies (hv_netvsc_sim.compare's
per-strategy step): the strategy provisioned on a copy of the guest (pool.provision through
hv_netvsc_sim.inprocess.run_in_process), the scenario's cycles, the per-strategy compare
document. The guests come from one pool.provision.Guests per guest key (the GuestConfig
and the aging) held by the worker process and reused by every later cell with that key, as
compare shares one aged guest between its strategies: the aged guest is built once per
guest key per worker, and each cell gets a clone, so a cell's document does not depend on
which worker ran it or what ran there before.

Everything that can go wrong inside a cell (a configuration its own classes refuse, an
exception in the model) is caught here and returned as the cell's error: the engine sees
a finished task, so a bad cell neither stops the sweep nor is retried. A worker that dies
mid-cell is the engine's business (hv_netvsc_sim.sweep: retried once).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import attrs

from hv_netvsc_sim.compare import CompareConfig
from hv_netvsc_sim.inprocess import run_in_process
from hv_netvsc_sim.sweep_grid import POOL_SECTION, Cell
from pool.provision import Guests
from pool.registry import PoolSettings

__all__ = ["KEEP_GUESTS", "CellRecord", "build_config", "run_cell"]

KEEP_GUESTS = 2  # guest keys a worker holds (a 16 GiB guest and its aged copy: ~0.2 GiB)
OK = "ok"
ERROR = "error"


@attrs.frozen
class CellRecord:
    """What a cell gives: its id and keys, `status` ok or error (with `error`, one line),
    `doc` (the strategy's compare document without its per-cycle `series`), and wall-clock
    seconds: the cell's total and the part spent aging its guest (zero when the worker had
    the aged guest already). `where` is host:pid of the worker (diagnostics only)."""

    id: str
    keys: dict[str, Any]
    status: str
    error: str | None
    doc: dict[str, Any] | None
    wall_seconds: float
    aging_seconds: float
    where: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK

    def as_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> CellRecord:
        return cls(**{f.name: doc[f.name] for f in attrs.fields(cls) if f.name in doc})

    @classmethod
    def failed(cls, cell: Cell, error: str, wall: float = 0.0) -> CellRecord:
        return cls(cell.id, cell.key_json(), ERROR, _one_line(error), None, wall, 0.0)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _tree(assignments: Iterable[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path, value in assignments:
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return root


def _evolve(obj: Any, tree: dict[str, Any]) -> Any:
    """`obj` with the tree's values set, nested attrs values evolved in turn (each class
    runs its own converters and checks)."""
    changes = {
        name: _evolve(getattr(obj, name), sub) if isinstance(sub, dict) else sub
        for name, sub in tree.items()
    }
    return attrs.evolve(obj, **changes)


def build_config(cell: Cell) -> tuple[CompareConfig, PoolSettings]:
    """The cell's compare configuration (its one strategy) and pool settings: compare's
    defaults with the cell's values set. ValueError / TypeError from the classes' own
    checks when they refuse a value."""
    tree = _tree(cell.assignments)
    pool_tree = tree.pop(POOL_SECTION, {})
    config = _evolve(CompareConfig(strategies=(cell.strategy,)), tree)
    return config, _evolve(PoolSettings(), pool_tree)


_GUESTS: OrderedDict[Any, Guests] = OrderedDict()  # this worker's guests, by guest key


def _guests_for(config: CompareConfig) -> Guests:
    key: Any = (config.guest, config.age_steps)
    try:
        hash(key)
    except TypeError:  # an unhashable field value: its repr is as good a key
        key = repr(key)
    guests = _GUESTS.pop(key, None)
    if guests is None:
        guests = Guests(config.guest, config.age_steps)
        while len(_GUESTS) >= KEEP_GUESTS:
            _GUESTS.popitem(last=False)
    _GUESTS[key] = guests  # most recently used last
    return guests


def _engine_scenario(config: CompareConfig) -> Any:
    """The scenario compare runs its strategies on: `run_scenario` where CompareConfig
    combines its scenario with a time axis, else its `scenario`."""
    return getattr(config, "run_scenario", config.scenario)


def run_cell(cell: Cell) -> CellRecord:
    """Run one cell; never raises for what the cell itself does (see the module)."""
    t0 = time.perf_counter()
    where = f"{socket.gethostname()}:{os.getpid()}"
    aging = 0.0
    try:
        config, settings = build_config(cell)
        guests = _guests_for(config)
        aging0 = guests.aging_seconds
        scenario = _engine_scenario(config)
        run = asyncio.run(run_in_process(cell.strategy, guests, scenario, settings=settings))
        aging = guests.aging_seconds - aging0
    except Exception as exc:
        wall = time.perf_counter() - t0
        record = CellRecord.failed(cell, f"{type(exc).__name__}: {exc}", wall)
        return attrs.evolve(record, where=where)
    doc = {k: v for k, v in run.result.items() if k != "series"}
    wall = time.perf_counter() - t0
    return CellRecord(cell.id, cell.key_json(), OK, None, doc, wall, aging, where)
