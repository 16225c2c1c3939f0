"""Every PromQL expression in the dashboard and the rules names only exported metrics.

Expressions are parsed with promql-parser (a real PromQL parser), so a syntax
error fails here too. What "exported" means comes from a live scrape of the
real daemon (conftest.py's `live_scrape`): a metric name is allowed when a
series of that name is on the daemon's /metrics page (histograms as
_bucket/_sum/_count, counters with their _total), when a recording rule of
deploy/prometheus/rules defines it, or when Prometheus makes it itself (up).
Label matchers on exported series must use labels the series carries, and
values the daemon really exports: `=` and `!=` one of them, `=~` and `!~` a
regular expression matching at least one of them (every alternative of a plain
`a|b|c`). Otherwise a panel stays empty or an alert can never fire.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import promql_parser
import pytest
import yaml
from support.deploy_paths import DASHBOARD_JSON, PROMETHEUS_DIR

RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))

# Grafana's built-in interval variables stand for durations; any other
# variable ($instance, ${instance}) only ever appears inside regex label
# values, where it becomes ".*" (the "All" value of every variable here).
_GRAFANA_INTERVAL = re.compile(r"\$(__\w+)|\$\{(__\w+)(:\w+)?\}")
_GRAFANA_VARIABLE = re.compile(r"\$\{\w+(:\w+)?\}|\$\w+|\[\[\w+\]\]")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<selector>.+),\s*)?(?P<label>\w+)\s*\)\s*$")


@dataclass(frozen=True)
class Expr:
    where: str
    promql: str


@dataclass(frozen=True)
class Selector:
    name: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value)


def grafana_to_promql(text: str) -> str:
    text = _GRAFANA_INTERVAL.sub("5m", text)
    return _GRAFANA_VARIABLE.sub(".*", text)


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels inside collapsed rows


def dashboard_exprs() -> list[Expr]:
    dashboard = json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))
    out: list[Expr] = []
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            where = f"panel {panel['id']} {panel['title']!r} {target.get('refId', '')}"
            out.append(Expr(where, grafana_to_promql(target["expr"])))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var.get("query")
        q = q.get("query", "") if isinstance(q, dict) else q
        match = _LABEL_VALUES.match(q or "")
        assert match, f"variable {var['name']}: unsupported query {q!r}"
        if match["selector"]:
            out.append(Expr(f"variable {var['name']}", grafana_to_promql(match["selector"])))
    return out


def dashboard_variables() -> list[tuple[str, str, str]]:
    """(name, selector, label) of each label_values() query variable."""
    dashboard = json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var.get("query")
        q = q.get("query", "") if isinstance(q, dict) else q
        match = _LABEL_VALUES.match(q or "")
        assert match and match["selector"], f"variable {var['name']}: unsupported query {q!r}"
        out.append((var["name"], grafana_to_promql(match["selector"]), match["label"]))
    return out


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    for path in RULE_FILES:
        groups.extend(yaml.safe_load(path.read_text(encoding="utf-8"))["groups"])
    return groups


def rule_exprs() -> list[Expr]:
    out = []
    for group in rule_groups():
        for rule in group["rules"]:
            name = rule.get("record") or rule.get("alert")
            out.append(Expr(f"rule {group['name']}/{name}", str(rule["expr"])))
    return out


def recorded_names() -> set[str]:
    return {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}


def selectors(promql: str) -> list[Selector]:
    found: list[Selector] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = tuple(
                (m.name, str(m.op).rsplit(".", 1)[-1], m.value) for m in node.matchers.matchers
            )
            name = node.name or next(
                (v for label, op, v in matchers if label == "__name__" and op == "Equal"), ""
            )
            found.append(Selector(name, matchers))

    promql_parser.walk(promql_parser.parse(promql), visit)
    return found


ALL_EXPRS = dashboard_exprs() + rule_exprs()


def test_there_is_something_to_check() -> None:
    assert len(dashboard_exprs()) >= 20
    assert len(rule_exprs()) >= 10
    assert RULE_FILES


def _literal_alternatives(regex: str) -> list[str] | None:
    """["a", "b"] for the regex "a|b" made of plain words; None for any other regex."""
    parts = regex.split("|")
    if all(part and re.escape(part) == part for part in parts):
        return parts
    return None


def matcher_problem(
    series: str, label: str, op: str, value: str, known: frozenset[str]
) -> str | None:
    """Why `series{label <op> value}` cannot select what it means, given the label's values."""
    shown = f"{series}{{{label}{_OPS.get(op, op)}{value!r}}}"
    if op in ("Equal", "NotEqual"):
        if value not in known:
            return f"{shown}: {value!r} is not one of {sorted(known)}"
        return None
    try:
        pattern = re.compile(value)
    except re.error as exc:
        return f"{shown}: bad regex: {exc}"
    words = _literal_alternatives(value)
    if words is not None:
        missing = [w for w in words if w not in known]
        if missing:
            return f"{shown}: {missing} not among {sorted(known)}"
    elif not any(pattern.fullmatch(v) for v in known):
        return f"{shown}: matches none of {sorted(known)}"
    return None


_OPS = {"Equal": "=", "NotEqual": "!=", "Re": "=~", "NotRe": "!~"}


def expression_problems(
    expr: Expr,
    exported_labels: dict[str, frozenset[str]],
    label_values: dict[str, dict[str, frozenset[str]]],
    allowed: set[str],
    target_labels: frozenset[str],
) -> list[str]:
    problems = []
    found = selectors(expr.promql)
    if not found:
        problems.append(f"{expr.where}: no metric in {expr.promql!r}")
    for sel in found:
        if not sel.name:
            problems.append(f"{expr.where}: selector without a metric name in {expr.promql!r}")
            continue
        if sel.name not in allowed:
            problems.append(
                f"{expr.where}: {sel.name!r} is neither exported by the daemon nor "
                f"recorded by a rule: {expr.promql!r}"
            )
            continue
        labels = exported_labels.get(sel.name)
        if labels is None:
            continue
        for label, op, value in sel.matchers:
            if label == "__name__":
                continue
            if label not in labels:
                problems.append(
                    f"{expr.where}: {sel.name} has no label {label!r} (has {sorted(labels)})"
                )
                continue
            if label in target_labels:  # set by the scrape config, not by the daemon
                continue
            known = label_values.get(sel.name, {}).get(label, frozenset())
            problem = matcher_problem(sel.name, label, op, value, known)
            if problem:
                problems.append(f"{expr.where}: {problem}")
    return problems


@pytest.mark.parametrize("expr", ALL_EXPRS, ids=lambda e: e.where)
def test_expression_uses_only_exported_metrics(
    expr: Expr,
    exported_labels: dict[str, frozenset[str]],
    exported_label_values: dict[str, dict[str, frozenset[str]]],
    prometheus_synthetic_series: frozenset[str],
    target_labels: frozenset[str],
) -> None:
    allowed = set(exported_labels) | recorded_names() | prometheus_synthetic_series
    problems = expression_problems(
        expr, exported_labels, exported_label_values, allowed, target_labels
    )
    assert not problems, "\n".join(problems)


def test_dashboard_variables_list_exported_labels(
    exported_labels: dict[str, frozenset[str]],
) -> None:
    """label_values(selector, label): the label exists on the selector's series."""
    variables = dashboard_variables()
    assert variables
    for name, selector, label in variables:
        for sel in selectors(selector):
            assert label in exported_labels.get(sel.name, frozenset()), (name, sel.name, label)


def test_recording_rules_use_the_level_metric_operations_convention() -> None:
    for name in recorded_names():
        assert re.fullmatch(r"sharedpool:[a-z0-9_]+:[a-z0-9_]+", name), name


def test_dashboard_shows_every_exported_family(
    exported_families: dict[str, frozenset[str]],
) -> None:
    """No metric the daemon exports is exported for nobody to see."""
    used = {sel.name for e in dashboard_exprs() for sel in selectors(e.promql)}
    missing = sorted(name for name, series in exported_families.items() if not series & used)
    assert not missing, f"not on the dashboard: {missing}"


def test_every_alert_reads_exported_metrics_through_its_recording_rules(
    exported_series: frozenset[str], prometheus_synthetic_series: frozenset[str]
) -> None:
    """An alert on a recording rule depends on what that rule reads: follow it down."""
    recorded = {
        r["record"]: str(r["expr"]) for g in rule_groups() for r in g["rules"] if "record" in r
    }

    def leaves(promql: str, seen: frozenset[str] = frozenset()) -> set[str]:
        out: set[str] = set()
        for sel in selectors(promql):
            if sel.name in recorded:
                assert sel.name not in seen, f"recording rules loop through {sel.name}"
                out |= leaves(recorded[sel.name], seen | {sel.name})
            else:
                out.add(sel.name)
        return out

    for expr in rule_exprs():
        names = leaves(expr.promql)
        assert names <= exported_series | prometheus_synthetic_series, (expr.where, names)


def test_selectors_checker_catches_a_wrong_name_and_label() -> None:
    """The checker itself: a typo in a name, a label or a label value is caught."""
    sels = selectors(
        'rate(sharedpool_hypercall_total[5m]) + sharedpool_direct_map_bytes{page_size="4K"}'
    )
    assert [s.name for s in sels] == ["sharedpool_hypercall_total", "sharedpool_direct_map_bytes"]
    assert ("page_size", "Equal", "4K") in sels[1].matchers
    assert grafana_to_promql('rate(x{i=~"$instance"}[$__rate_interval])') == (
        'rate(x{i=~".*"}[5m])'
    )
    labels = {
        "sharedpool_direct_map_bytes": frozenset({"page_size", "job", "instance"}),
        "sharedpool_allocations_total": frozenset({"result", "job", "instance"}),
    }
    values = {
        "sharedpool_direct_map_bytes": {"page_size": frozenset({"4k", "2M", "1G"})},
        "sharedpool_allocations_total": {"result": frozenset({"ok", "exhausted", "no_memory"})},
    }

    def problems(promql: str) -> list[str]:
        return expression_problems(
            Expr("t", promql), labels, values, set(labels), frozenset({"job", "instance"})
        )

    assert problems('sharedpool_direct_map_bytes{page_size="4k", instance=~"x"}') == []
    assert problems('sharedpool_allocations_total{result=~"exhausted|no_memory"}') == []
    assert problems('sharedpool_allocations_total{result!~"ok|exh.*"}') == []
    assert problems('sharedpool_allocations_total{result!="ok"}') == []
    for bad in (
        "sharedpool_hypercall_total",  # name
        'sharedpool_direct_map_bytes{pagesize="4k"}',  # label
        'sharedpool_direct_map_bytes{page_size="4K"}',  # value
        'sharedpool_allocations_total{result!="failed"}',  # excludes nothing
        'sharedpool_allocations_total{result=~"exhausted|nomemory"}',  # one alternative
        'sharedpool_allocations_total{result=~"fail.*"}',  # matches nothing
    ):
        assert problems(bad), bad
