"""A sweep's grid: the axes (every combination is one cell), the fixed settings, the metrics.

One cell is one `compare` run of one strategy. What a cell can vary is read from the
configuration classes themselves, never listed here, so a field added to any of them is an
axis without a change to this module:

- `strategy`: the cell's strategy (a name of pool.registry's table);
- every field of hv_netvsc_sim.compare.CompareConfig that is not a nested configuration
  (`age_steps`, ...; `strategies` is `strategy`'s business);
- every field of its nested configurations: `guest` (pool.guest.GuestConfig: memory_bytes,
  platform, seed, cpus, ...), `scenario` (hv_netvsc_sim.scenario.ScenarioConfig: cycles,
  nics, churn_steps, ...), and of theirs (`guest.churn.*`, `scenario.settings.*`, ...);
- every field of `pool` (pool.registry.PoolSettings: initial_bytes, grow_step_bytes, ...),
  the settings the strategy is built with.

A name is a field's own (`cycles`) or its dotted path (`scenario.cycles`, or its tail:
`churn.occupancy`). A plain name means CompareConfig's own field if it has one; else, found
in several top-level sections, it sets it in each of them: `seed` is the guest's and the
scenario's seed, which compare requires to be one (CompareConfig). A nested configuration
with a converter (a preset name it resolves) is one field, not a section. Values are checked
against the field's annotation (ints, floats, strings, booleans, arrays for tuples and
sets, `*_bytes` fields also as sizes: "4GiB"); a field with a converter takes what its
converter takes. Whether a value is *accepted* (a guest of 3 MiB, an unknown platform) is
the configuration's own rule, applied when the cell runs: such a cell fails, is recorded
with its error, and the others run.

The grid file (TOML; docs/sweep/ has examples)::

    metrics = ["run.direct_map_splits.level2", "end_state.hazard_pages.private_alias_to_shared"]

    [axes]                # the cartesian product of these is the set of cells
    strategy = ["pool", "vmalloc-directmap"]
    memory_bytes = ["1GiB", "4GiB"]
    seed = { from = 1, to = 10 }   # an inclusive integer range

    [fixed]               # the same in every cell, and part of each cell's identity
    age_steps = 20000
    cycles = 10

A cell's identity is a hash of its keys (every axis and fixed value, canonical names and
values), so a result directory can be resumed, and a changed fixed value makes new cells.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from hv_netvsc_sim.compare import CompareConfig
from pool.guest.units import parse_size
from pool.registry import STRATEGIES, PoolSettings

__all__ = [
    "DEFAULT_METRICS",
    "STRATEGY_AXIS",
    "Cell",
    "Grid",
    "GridError",
    "load_grid",
    "parse_grid",
]

STRATEGY_AXIS = "strategy"
POOL_SECTION = "pool"  # the PoolSettings section (a named constant: the rules lint)
ALIASES = {"guest_memory": "memory_bytes", "guest_memory_bytes": "memory_bytes"}

# What a grid keeps when it names no metrics: the figures of the README's comparison.
DEFAULT_METRICS = (
    "allocations",
    "failures",
    "setup.hypercalls",
    "run.hypercalls",
    "run.pages_converted",
    "run.direct_map_splits.level2",
    "run.direct_map_splits.level3",
    "end_state.direct_map_bytes.4k",
    "end_state.hazard_pages.private_alias_to_shared",
)


class GridError(ValueError):
    """A grid file that cannot be used: one line, naming the file and the key."""


# ---- the fields a cell can set -------------------------------------------------------------


@attrs.frozen
class Field:
    """One settable leaf: its path from the cell's root (("guest", "memory_bytes"),
    ("age_steps",), ("pool", "initial_bytes")), the owning class, the resolved annotation,
    and whether a converter decides what it takes."""

    path: tuple[str, ...]
    owner: type
    annotation: Any
    converts: bool

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def what(self) -> str:
        return f"{self.owner.__name__}.{self.path[-1]}"


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: take anything, the class decides
        return {}


def _walk(cls: type, prefix: tuple[str, ...], skip: frozenset[str]) -> Iterator[Field]:
    hints = _hints(cls)
    for f in attrs.fields(cls):
        if not f.init or f.name in skip:
            continue
        ann = hints.get(f.name, Any)
        # a nested configuration is a section, unless a converter takes other values for
        # it (a preset name): then it is one field, whatever its converter accepts
        if isinstance(ann, type) and attrs.has(ann) and f.converter is None:
            yield from _walk(ann, (*prefix, f.name), frozenset())
        else:
            yield Field((*prefix, f.name), cls, ann, f.converter is not None)


def config_fields() -> tuple[Field, ...]:
    """Every leaf a cell can set, read from the configuration classes (see the module)."""
    return (
        *_walk(CompareConfig, (), frozenset({"strategies"})),
        *_walk(PoolSettings, (POOL_SECTION,), frozenset()),
    )


@attrs.frozen
class Namespace:
    """Name resolution over config_fields(): plain names and dotted paths."""

    fields: tuple[Field, ...]

    def resolve(self, name: str) -> tuple[str, tuple[Field, ...]]:
        """(canonical name, the fields it sets); GridError naming close matches if unknown
        or ambiguous."""
        name = ALIASES.get(name, name)
        parts = tuple(name.split("."))
        if len(parts) > 1:  # a dotted path, or its tail: "scenario.cycles", "churn.occupancy"
            hits = tuple(f for f in self.fields if f.path[-len(parts) :] == parts)
            if len(hits) > 1:
                raise GridError(f"{name!r} is ambiguous: say {' or '.join(f.dotted for f in hits)}")
            if not hits:
                raise GridError(f"unknown field {name!r}{self._suggest(name)}")
            f = hits[0]
            # the plain name is the canonical one when it means exactly this field
            plain = self._plain(f.path[-1]) == (f,)
            return (f.path[-1] if plain else f.dotted), (f,)
        deep = self._deep(name)
        if len(deep) > 1 and not self._shallow(name):
            raise GridError(f"{name!r} is ambiguous: say {' or '.join(f.dotted for f in deep)}")
        fields = self._plain(name)
        if not fields:
            raise GridError(f"unknown field {name!r}{self._suggest(name)}")
        return name, fields

    def _plain(self, leaf: str) -> tuple[Field, ...]:
        """What the plain name `leaf` sets: CompareConfig's own field, else the top-level
        sections' fields of that name, else the one nested field of that name."""
        shallow = self._shallow(leaf)
        root = tuple(f for f in shallow if len(f.path) == 1)
        return root or shallow or self._deep(leaf)

    def _shallow(self, leaf: str) -> tuple[Field, ...]:
        # a field of CompareConfig itself, or of one of the top-level sections
        return tuple(f for f in self.fields if len(f.path) <= 2 and f.path[-1] == leaf)

    def _deep(self, leaf: str) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if f.path[-1] == leaf)

    def _suggest(self, name: str) -> str:
        import difflib

        names = sorted({STRATEGY_AXIS, *(f.path[-1] for f in self.fields)})
        close = difflib.get_close_matches(name.split(".")[-1], names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return f" (a field of CompareConfig, GuestConfig, ScenarioConfig or PoolSettings{hint})"


# ---- values --------------------------------------------------------------------------------


def _coerce(value: Any, ann: Any, field: Field) -> Any:
    """`value` (from TOML) as the annotation's type; GridError if it cannot be."""
    if field.converts or ann is Any:
        return _frozen(value)
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for alt in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, alt, field)
            except GridError as exc:
                errors.append(str(exc))
        raise GridError(errors[0] if errors else f"{field.what} takes no value")
    if ann is bool:
        if isinstance(value, bool):
            return value
        raise GridError(f"{value!r} is not a boolean ({field.what})")
    if ann is int:
        if field.path[-1].endswith("_bytes") and isinstance(value, str):
            try:
                return parse_size(value)
            except ValueError as exc:
                raise GridError(f"{exc} ({field.what})") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise GridError(f"{value!r} is not an integer ({field.what})")
    if ann is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise GridError(f"{value!r} is not a number ({field.what})")
    if ann is str:
        if isinstance(value, str):
            return value
        raise GridError(f"{value!r} is not a string ({field.what})")
    if origin in (tuple, frozenset, set, list):
        if not isinstance(value, list):
            raise GridError(f"{value!r} is not an array ({field.what})")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise GridError(f"{value!r} needs {len(args)} items ({field.what})")
            items = tuple(_coerce(v, a, field) for v, a in zip(value, args, strict=True))
        else:
            item = args[0] if args else Any
            items = tuple(_coerce(v, item, field) for v in value)
        return frozenset(items) if origin in (frozenset, set) else items
    return _frozen(value)  # another type: the class's own __init__ decides


def _frozen(value: Any) -> Any:
    """TOML arrays as tuples and tables as sorted item tuples: hashable, picklable keys."""
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    return value


def _plain(value: Any) -> Any:
    """A key value as JSON: tuples and sets as lists (sets sorted)."""
    if isinstance(value, frozenset):
        return sorted(_plain(v) for v in value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


# ---- the grid ------------------------------------------------------------------------------


@attrs.frozen
class Cell:
    """One cell: `keys` (canonical name, value) in the table's column order, and
    `assignments` (field path, value): what the worker sets in the configuration."""

    keys: tuple[tuple[str, Any], ...]
    assignments: tuple[tuple[tuple[str, ...], Any], ...]

    @property
    def id(self) -> str:
        """The cell's identity: a hash of its keys (names and values, order aside)."""
        doc = json.dumps(
            {k: _plain(v) for k, v in self.keys}, sort_keys=True, separators=(",", ":")
        )
        return hashlib.sha256(doc.encode()).hexdigest()[:16]

    @property
    def strategy(self) -> str:
        return str(dict(self.keys)[STRATEGY_AXIS])

    def key_json(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in self.keys}


@attrs.frozen
class Grid:
    """A parsed grid: axes (name -> values), fixed (name -> value), the metrics to keep,
    and where each canonical name goes in the configuration."""

    source: str
    axes: tuple[tuple[str, tuple[Any, ...]], ...]
    fixed: tuple[tuple[str, Any], ...]
    metrics: tuple[str, ...]
    paths: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...]

    @property
    def key_names(self) -> tuple[str, ...]:
        return (*(n for n, _ in self.axes), *(n for n, _ in self.fixed))

    def __len__(self) -> int:
        n = 1
        for _, values in self.axes:
            n *= len(values)
        return n

    def cells(self) -> list[Cell]:
        """Every combination of the axes (the first axis outermost), with the fixed keys."""
        paths = dict(self.paths)
        names = [n for n, _ in self.axes]
        out = []
        for combo in itertools.product(*(values for _, values in self.axes)):
            keys = (*zip(names, combo, strict=True), *self.fixed)
            assignments = tuple(
                (path, value) for name, value in keys for path in paths.get(name, ())
            )
            out.append(Cell(keys, assignments))
        return out


def _axis_values(name: str, raw: Any) -> list[Any]:
    if isinstance(raw, dict):
        if set(raw) != {"from", "to"} or not all(
            isinstance(raw[k], int) and not isinstance(raw[k], bool) for k in raw
        ):
            raise GridError(f"axes.{name}: a range is {{ from = INT, to = INT }}, not {raw!r}")
        if raw["to"] < raw["from"]:
            raise GridError(f"axes.{name}: empty range {raw['from']}..{raw['to']}")
        return list(range(raw["from"], raw["to"] + 1))
    if not isinstance(raw, list) or not raw:
        raise GridError(f"axes.{name}: expected a non-empty array or {{ from, to }}")
    return raw


def _flatten(table: Mapping[str, Any], ns: Namespace) -> dict[str, Any]:
    """TOML's dotted keys (`guest.seed = 2`) and sub-tables (`[fixed.pool]`) as dotted names:
    a table under a section's name (guest, scenario, pool, churn, ...) holds its fields."""
    sections = {
        ".".join(f.path[i:j])
        for f in ns.fields
        for i in range(len(f.path))
        for j in range(i + 1, len(f.path))
    }
    out: dict[str, Any] = {}
    for name, raw in table.items():
        if isinstance(raw, dict) and name in sections:
            for sub, value in _flatten(raw, ns).items():
                out[f"{name}.{sub}"] = value
        else:
            out[name] = raw
    return out


def parse_grid(doc: Mapping[str, Any], source: str = "<grid>") -> Grid:
    """A Grid from a parsed TOML document; GridError (one line, prefixed by `source`)."""
    try:
        return _parse(doc, source)
    except GridError as exc:
        raise GridError(f"{source}: {exc}") from None


def _parse(doc: Mapping[str, Any], source: str) -> Grid:
    unknown = sorted(set(doc) - {"axes", "fixed", "metrics"})
    if unknown:
        raise GridError(f"unknown top-level key(s) {unknown}: expected axes, fixed, metrics")
    axes_raw = doc.get("axes", {})
    fixed_raw = doc.get("fixed", {})
    if not isinstance(axes_raw, dict) or not isinstance(fixed_raw, dict):
        raise GridError("[axes] and [fixed] must be tables")
    metrics = doc.get("metrics", list(DEFAULT_METRICS))
    if (
        not isinstance(metrics, list)
        or not metrics
        or not all(isinstance(m, str) and m and "" not in m.split(".") for m in metrics)
    ):
        raise GridError('metrics: a non-empty array of dotted keys, e.g. ["run.hypercalls"]')
    if len(set(metrics)) != len(metrics):
        raise GridError("metrics: a metric is named twice")
    ns = Namespace(config_fields())
    axes_raw = _flatten(axes_raw, ns)
    fixed_raw = _flatten(fixed_raw, ns)
    seen: dict[str, str] = {}
    seen_paths: dict[tuple[str, ...], str] = {}
    paths: dict[str, tuple[tuple[str, ...], ...]] = {}
    axes: list[tuple[str, tuple[Any, ...]]] = []
    fixed: list[tuple[str, Any]] = []
    for section, table in (("axes", axes_raw), ("fixed", fixed_raw)):
        for name, raw in table.items():
            where = f"{section}.{name}"
            values = _axis_values(name, raw) if section == "axes" else [raw]
            fields: tuple[Field, ...] = ()
            if name == STRATEGY_AXIS:
                canon = STRATEGY_AXIS
                bad = [v for v in values if not isinstance(v, str) or v not in STRATEGIES]
                if bad:
                    raise GridError(
                        f"{where}: unknown strategies {bad}: expected some of "
                        f"{', '.join(STRATEGIES)}"
                    )
                coerced = list(values)
            else:
                try:
                    canon, fields = ns.resolve(name)
                    coerced = [_coerce(v, fields[0].annotation, fields[0]) for v in values]
                except GridError as exc:
                    raise GridError(f"{where}: {exc}") from None
            if canon in seen:
                raise GridError(f"{where}: the same field as {seen[canon]}")
            for f in fields:
                if f.path in seen_paths:
                    raise GridError(f"{where}: sets {f.dotted}, as {seen_paths[f.path]} does")
                seen_paths[f.path] = where
            if len(set(map(repr, coerced))) != len(coerced):
                raise GridError(f"{where}: a value is given twice")
            seen[canon] = where
            paths[canon] = tuple(f.path for f in fields)
            if section == "axes":
                axes.append((canon, tuple(coerced)))
            else:
                fixed.append((canon, coerced[0]))
    if STRATEGY_AXIS not in seen:
        axes.insert(0, (STRATEGY_AXIS, STRATEGIES))  # every strategy, as compare runs them
    return Grid(source, tuple(axes), tuple(fixed), tuple(metrics), tuple(paths.items()))


def load_grid(path: str | Path) -> Grid:
    """Read and parse a grid file; GridError (one line) when it cannot be used."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise GridError(f"{p}: cannot read the grid: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise GridError(f"{p}: not a UTF-8 text file") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise GridError(f"{p}: not valid TOML: {exc}") from None
    return parse_grid(doc, str(p))
