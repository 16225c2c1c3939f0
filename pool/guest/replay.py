"""Replay planned attribute changes on a direct map and report what they split.

The changes come from a RANGES.json file (docs/real-guest.md): a JSON array, applied in order,
each entry either

- a direct-map range, one contiguous ``set_memory_decrypted/encrypted`` call
  (DirectMap.set_range): ``{"pfn": N | "phys": "0x...", "npages": N | "bytes": N,
  "attr": "shared" | "private"}``, or
- a vmalloc buffer, given as its pages, whose direct-map aliases the kernel changes one page
  at a time (DirectMap.set_pages): ``{"pages": [pfn, ...], "attr": ...}``;

with an optional ``"label"``. Errors name the entry by its index in the array (``entry [2]``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from pool.guest.directmap import PRIVATE, SHARED, DirectMap, Leaf, SplitCounts
from pool.guest.units import PAGE_SHIFT, PAGE_SIZE, parse_size

__all__ = [
    "Change",
    "ChangeResult",
    "LeafChange",
    "ReplayReport",
    "changed_leaves",
    "parse_changes",
    "render_replay",
    "replay",
    "replay_json",
]

_ATTRS = {"shared": SHARED, "private": PRIVATE}
_ATTR_NAMES = {SHARED: "shared", PRIVATE: "private"}
_KEYS = frozenset(("pfn", "phys", "npages", "bytes", "pages", "attr", "label"))


@attrs.frozen(eq=False)
class Change:
    """One planned attribute change: a contiguous range (pages is None) or a page list."""

    index: int  # position in the RANGES.json array (0-based)
    attr: int
    start_pfn: int = 0
    npages: int = 0
    pages: npt.NDArray[np.int64] | None = None
    label: str | None = None

    @property
    def kind(self) -> str:
        return "range" if self.pages is None else "pages"

    @property
    def page_count(self) -> int:
        return self.npages if self.pages is None else len(self.pages)

    def describe(self) -> str:
        name = f"{self.label}: " if self.label else ""
        if self.pages is None:
            phys = self.start_pfn << PAGE_SHIFT
            return f"{name}range pfn {self.start_pfn:#x}+{self.npages} (phys {phys:#x})"
        return f"{name}page list, one page at a time"


@attrs.frozen
class ChangeResult:
    change: Change
    splits: SplitCounts


@attrs.frozen
class LeafChange:
    """A stretch of physical memory whose leaf runs changed: the runs before and after."""

    start_pfn: int
    end_pfn: int
    before: tuple[Leaf, ...]
    after: tuple[Leaf, ...]


@attrs.frozen
class ReplayReport:
    before: dict[str, int]  # DirectMap bytes by leaf size
    after: dict[str, int]
    results: tuple[ChangeResult, ...]
    changed: tuple[LeafChange, ...]

    @property
    def total(self) -> SplitCounts:
        return SplitCounts(
            sum(r.splits.level2 for r in self.results),
            sum(r.splits.level3 for r in self.results),
        )


# ---- parsing --------------------------------------------------------------------------


def _int(entry: dict[str, Any], key: str, where: str, minimum: int) -> int:
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _address(entry: dict[str, Any], where: str) -> int:
    value = entry["phys"]
    if isinstance(value, str):
        try:
            address = int(value, 0)
        except ValueError:
            raise ValueError(
                f"{where}: 'phys' must be an address like \"0x40000000\", got {value!r}"
            ) from None
    elif isinstance(value, int) and not isinstance(value, bool):
        address = value
    else:
        raise ValueError(f"{where}: 'phys' must be a string like \"0x40000000\", got {value!r}")
    if address < 0 or address % PAGE_SIZE:
        raise ValueError(f"{where}: 'phys' {address:#x} is not a page-aligned address")
    return address >> PAGE_SHIFT


def _bytes(entry: dict[str, Any], where: str) -> int:
    value = entry["bytes"]
    if isinstance(value, str):
        nbytes = parse_size(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        nbytes = value
    else:
        raise ValueError(f"{where}: 'bytes' must be an integer or a size like \"2MiB\"")
    if nbytes <= 0 or nbytes % PAGE_SIZE:
        raise ValueError(f"{where}: 'bytes' must be a positive multiple of 4096, got {nbytes}")
    return nbytes >> PAGE_SHIFT


def _one_of(entry: dict[str, Any], keys: tuple[str, str], where: str) -> str:
    present = [k for k in keys if k in entry]
    if len(present) != 1:
        raise ValueError(f"{where}: give exactly one of {keys[0]!r} and {keys[1]!r}")
    return present[0]


def _parse_entry(index: int, entry: object, source: str) -> Change:
    where = f"{source} entry [{index}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise ValueError(
            f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(sorted(_KEYS))})"
        )
    label = entry.get("label")
    if label is not None and not isinstance(label, str):
        raise ValueError(f"{where}: 'label' must be a string")
    if label:
        where += f" ({label})"
    attr_name = entry.get("attr")
    if attr_name not in _ATTRS:
        raise ValueError(f'{where}: \'attr\' must be "shared" or "private", got {attr_name!r}')
    attr = _ATTRS[attr_name]
    if "pages" in entry:
        extra = sorted({"pfn", "phys", "npages", "bytes"} & set(entry))
        if extra:
            raise ValueError(f"{where}: 'pages' lists the pages: {extra[0]!r} is not allowed too")
        pages = entry["pages"]
        if not isinstance(pages, list) or not pages:
            raise ValueError(f"{where}: 'pages' must be a non-empty list of pfns")
        for k, pfn in enumerate(pages):
            if isinstance(pfn, bool) or not isinstance(pfn, int) or pfn < 0:
                raise ValueError(f"{where}: 'pages'[{k}] must be a pfn (integer >= 0), got {pfn!r}")
        return Change(index, attr, pages=np.array(pages, dtype=np.int64), label=label)
    key = _one_of(entry, ("pfn", "phys"), where)
    start = _int(entry, "pfn", where, 0) if key == "pfn" else _address(entry, where)
    key = _one_of(entry, ("npages", "bytes"), where)
    npages = _int(entry, "npages", where, 1) if key == "npages" else _bytes(entry, where)
    return Change(index, attr, start, npages, label=label)


def parse_changes(text: str, source: str = "RANGES.json") -> list[Change]:
    """Parse a RANGES.json document. ValueError names the entry and the problem."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{source}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
        ) from None
    if not isinstance(document, list):
        raise ValueError(f"{source}: expected a JSON array of changes")
    return [_parse_entry(i, entry, source) for i, entry in enumerate(document)]


# ---- replaying ------------------------------------------------------------------------


def _check(direct_map: DirectMap, change: Change, source: str) -> None:
    where = f"{source} entry [{change.index}]" + (f" ({change.label})" if change.label else "")
    end = direct_map.end_pfn
    if change.pages is None:
        lo, hi = change.start_pfn, change.start_pfn + change.npages
        if hi > end:
            raise ValueError(
                f"{where}: pfns [{lo:#x}, {hi:#x}) run past the end of RAM (pfn {end:#x})"
            )
        holes = np.flatnonzero(~direct_map.ram[lo:hi])
        if len(holes):
            raise ValueError(
                f"{where}: pfn {lo + int(holes[0]):#x} of the range is in a hole (not RAM)"
            )
        return
    pages = change.pages
    beyond = pages[pages >= end]
    if len(beyond):
        raise ValueError(f"{where}: page {int(beyond[0]):#x} is past the end of RAM ({end:#x})")
    holes = pages[~direct_map.ram[pages]]
    if len(holes):
        raise ValueError(f"{where}: page {int(holes[0]):#x} is in a hole (not RAM)")


def replay(
    direct_map: DirectMap, changes: Sequence[Change], source: str = "RANGES.json"
) -> ReplayReport:
    """Apply `changes` in order to `direct_map` (modified in place). Every change is checked
    against the map first (pages must be RAM), so a bad entry changes nothing."""
    for change in changes:
        _check(direct_map, change, source)
    before_leaves = list(direct_map.leaves())
    before = direct_map.bytes_by_size()
    results = []
    for change in changes:
        if change.pages is None:
            splits = direct_map.set_range(change.start_pfn, change.npages, change.attr)
        else:
            splits = direct_map.set_pages(change.pages, change.attr)
        results.append(ChangeResult(change, splits))
    return ReplayReport(
        before,
        direct_map.bytes_by_size(),
        tuple(results),
        tuple(changed_leaves(before_leaves, list(direct_map.leaves()))),
    )


def changed_leaves(before: Sequence[Leaf], after: Sequence[Leaf]) -> list[LeafChange]:
    """The stretches where two leaf listings differ: runs only in `before` and runs only in
    `after`, grouped into maximal overlapping stretches, ascending."""
    kept = set(before) & set(after)
    items = [(leaf, 0) for leaf in before if leaf not in kept]
    items += [(leaf, 1) for leaf in after if leaf not in kept]
    items.sort(key=lambda item: (item[0].start_pfn, item[1]))
    out: list[LeafChange] = []
    group: list[list[Leaf]] = [[], []]
    lo = hi = -1
    for leaf, side in items:
        end = leaf.start_pfn + leaf.npages
        if leaf.start_pfn >= hi and (group[0] or group[1]):
            out.append(LeafChange(lo, hi, tuple(group[0]), tuple(group[1])))
            group = [[], []]
        if not (group[0] or group[1]):
            lo, hi = leaf.start_pfn, end
        hi = max(hi, end)
        group[side].append(leaf)
    if group[0] or group[1]:
        out.append(LeafChange(lo, hi, tuple(group[0]), tuple(group[1])))
    return out


# ---- reporting ------------------------------------------------------------------------


def _leaf_json(leaf: Leaf) -> dict[str, Any]:
    start, end = leaf.start_pfn << PAGE_SHIFT, (leaf.start_pfn + leaf.npages) << PAGE_SHIFT
    return {
        "phys_start": f"{start:#x}",
        "phys_end": f"{end:#x}",
        "start_pfn": leaf.start_pfn,
        "npages": leaf.npages,
        "size": leaf.size,
        "attr": _ATTR_NAMES[leaf.attr],
    }


def _kib(sizes: dict[str, int]) -> dict[str, int]:
    return {f"DirectMap{size}": sizes[size] // 1024 for size in ("4k", "2M", "1G")}


def replay_json(report: ReplayReport, max_leaves: int = 20) -> dict[str, Any]:
    """A JSON-ready dict: DirectMap kB before/after, splits per change and total, and the
    changed stretches (at most `max_leaves` runs listed per side of each stretch, at most
    `max_leaves` stretches; the counts of those left out are given)."""
    changes = []
    for r in report.results:
        c = r.change
        item: dict[str, Any] = {
            "index": c.index,
            "label": c.label,
            "kind": c.kind,
            "attr": _ATTR_NAMES[c.attr],
            "npages": c.page_count,
            "level2_splits": r.splits.level2,
            "level3_splits": r.splits.level3,
        }
        if c.pages is None:
            item["start_pfn"] = c.start_pfn
            item["phys"] = f"{c.start_pfn << PAGE_SHIFT:#x}"
        changes.append(item)
    stretches = []
    for lc in report.changed[:max_leaves]:
        stretches.append(
            {
                "phys_start": f"{lc.start_pfn << PAGE_SHIFT:#x}",
                "phys_end": f"{lc.end_pfn << PAGE_SHIFT:#x}",
                "before_runs": len(lc.before),
                "after_runs": len(lc.after),
                "before": [_leaf_json(leaf) for leaf in lc.before[:max_leaves]],
                "after": [_leaf_json(leaf) for leaf in lc.after[:max_leaves]],
            }
        )
    total = report.total
    return {
        "direct_map_kb_before": _kib(report.before),
        "direct_map_kb_after": _kib(report.after),
        "changes": changes,
        "splits": {"level2": total.level2, "level3": total.level3},
        "changed_leaves": stretches,
        "changed_leaves_total": len(report.changed),
        "changed_leaves_omitted": max(0, len(report.changed) - max_leaves),
    }


def _leaf_text(leaf: Leaf) -> str:
    start, end = leaf.start_pfn << PAGE_SHIFT, (leaf.start_pfn + leaf.npages) << PAGE_SHIFT
    per = {"4k": 1, "2M": 512, "1G": 512 * 512}[leaf.size]
    count = leaf.npages // per
    return f"{start:#014x}-{end:#014x} {leaf.size:>2} x{count:<6} {_ATTR_NAMES[leaf.attr]}"


def render_replay(report: ReplayReport, max_leaves: int = 20) -> str:
    """The report as text (the same bounds as replay_json)."""
    lines = ["-- changes (level-2: 2M -> 4k splits, level-3: 1G -> 2M splits)"]
    lines.append(f"{'entry':>7}  {'pages':>8}  {'attr':<7}  {'level-2':>7}  {'level-3':>7}  what")
    for r in report.results:
        c = r.change
        lines.append(
            f"{f'[{c.index}]':>7}  {c.page_count:>8}  {_ATTR_NAMES[c.attr]:<7}  "
            f"{r.splits.level2:>7}  {r.splits.level3:>7}  {c.describe()}"
        )
    total = report.total
    lines.append(f"{'total':>7}  {'':>8}  {'':<7}  {total.level2:>7}  {total.level3:>7}")
    lines.append("-- direct map (/proc/meminfo), before -> after")
    for size in ("4k", "2M", "1G"):
        b, a = report.before[size] // 1024, report.after[size] // 1024
        lines.append(f"DirectMap{size}: {b:>12} kB -> {a:>12} kB  ({a - b:+d} kB)")
    n = len(report.changed)
    lines.append(f"-- leaves that changed: {n} stretch{'es' if n != 1 else ''}")
    for lc in report.changed[:max_leaves]:
        lines.append(
            f"[{lc.start_pfn << PAGE_SHIFT:#x}, {lc.end_pfn << PAGE_SHIFT:#x}): "
            f"{len(lc.before)} run(s) -> {len(lc.after)} run(s)"
        )
        for side, runs in (("before", lc.before), ("after ", lc.after)):
            for k, leaf in enumerate(runs[:max_leaves]):
                lines.append(f"  {side if k == 0 else '':<6}  {_leaf_text(leaf)}")
            if len(runs) > max_leaves:
                lines.append(f"  {'':<6}  ... {len(runs) - max_leaves} more runs")
    if n > max_leaves:
        lines.append(f"... {n - max_leaves} more stretches (--max-leaves)")
    return "\n".join(lines)
