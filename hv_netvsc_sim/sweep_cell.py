"""One cell of a sweep, run where the engine puts it: one strategy of a `compare` run.

A cell is exactly what compare does for one of its strategies (hv_netvsc_sim.compare's
per-strategy step): the strategy provisioned on a copy of the guest (pool.provision through
hv_netvsc_sim.inprocess.run_in_process), the scenario's cycles, the per-strategy compare
document. The guests of one guest key (the GuestConfig and the aging) are one
pool.provision.Guests, built and aged once (`prepare_guests`, an engine task of its own)
and shared by every cell with that key, as compare shares one aged guest between its
strategies: each cell runs on a clone, so its document does not depend on which worker ran
it or what ran there before. The engine runs a key's cells where its guests are, or moves
the guests (a pickled Guests: 42 MiB and ~1.4 s for an aged 4 GiB guest, where aging it
200,000 steps takes ~20 s).

Everything that can go wrong inside a cell (a configuration its own classes refuse, an
exception in the model) is caught here and returned as the cell's error: the engine sees
a finished task, so a bad cell neither stops the sweep nor is retried. A worker that dies
mid-cell is the engine's business (hv_netvsc_sim.sweep: retried once).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections.abc import Iterable
from typing import Any

import attrs

from hv_netvsc_sim.compare import CompareConfig
from hv_netvsc_sim.inprocess import run_in_process
from hv_netvsc_sim.sweep_grid import POOL_SECTION, Cell
from pool.guest import GuestConfig
from pool.provision import Guests
from pool.registry import PoolSettings, spec_for

__all__ = ["CellRecord", "GuestGroup", "build_config", "group_cells", "prepare_guests", "run_cell"]
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


@attrs.frozen
class GuestGroup:
    """The cells that start from one guest: its key (the GuestConfig and the aging, as
    compare's one pool.provision.Guests), whether any of them boots on the aged guest
    (the others reserve memory at boot and age their own pristine copy), and the cells."""

    guest: GuestConfig
    age_steps: int
    aged: bool
    cells: tuple[Cell, ...]

    @property
    def id(self) -> str:
        text = repr((self.guest, self.age_steps))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def group_cells(cells: Iterable[Cell]) -> tuple[list[GuestGroup], list[CellRecord]]:
    """The cells by guest key, in order of first appearance, and a failed record for each
    cell whose configuration its classes refuse (it never runs)."""
    groups: dict[str, tuple[GuestConfig, int, list[bool], list[Cell]]] = {}
    refused = []
    for cell in cells:
        try:
            config, settings = build_config(cell)
            boots_aged = not spec_for(cell.strategy).reserves_at_boot(settings)
        except Exception as exc:
            refused.append(CellRecord.failed(cell, f"{type(exc).__name__}: {exc}"))
            continue
        key = repr((config.guest, config.age_steps))
        entry = groups.setdefault(key, (config.guest, config.age_steps, [], []))
        entry[2].append(boots_aged)
        entry[3].append(cell)
    out = [GuestGroup(g, a, any(flags), tuple(cs)) for g, a, flags, cs in groups.values()]
    return out, refused


def prepare_guests(guest: GuestConfig, age_steps: int, aged: bool) -> Guests | str:
    """The guests of one key, as compare's: the pristine guest built, and aged once when
    a cell boots on the aged guest. Its cells (tasks that depend on this one) run on
    clones of it wherever the engine puts them. An error is returned as its one-line
    text (each of the key's cells then records it), never raised."""
    try:
        guests = Guests(guest, age_steps)
        guests.aged() if aged else guests.pristine()
    except Exception as exc:
        return _one_line(f"{type(exc).__name__}: {exc}")
    return guests


def _engine_scenario(config: CompareConfig) -> Any:
    """The scenario compare runs its strategies on: `run_scenario` where CompareConfig
    combines its scenario with a time axis, else its `scenario`."""
    return getattr(config, "run_scenario", config.scenario)


def run_cell(cell: Cell, guests: Guests | str) -> CellRecord:
    """Run one cell on clones of `guests` (prepare_guests' result for the cell's key);
    never raises for what the cell itself does (see the module)."""
    t0 = time.perf_counter()
    where = f"{socket.gethostname()}:{os.getpid()}"
    aging = 0.0
    if isinstance(guests, str):  # its guest could not be built
        return attrs.evolve(CellRecord.failed(cell, guests), where=where)
    try:
        config, settings = build_config(cell)
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
