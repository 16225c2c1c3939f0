"""Each rule of the pool lives in the pool: a lint over daemon/ and hv_netvsc_sim/.

- No strategy name is compared (==, !=, in, match/case, startswith/endswith on a prefix
  of one) outside pool/registry.py's spec table: what differs between strategies is asked
  of the table (pool.registry.SPECS) or of the strategy (pool.strategy.Resizable).
- No tuple, list or set literal spells out strategy names (a copy of the table's list).
- No `type: ignore` in daemon/engine.py.

The lint reads the syntax tree, so a strategy name in a docstring, a help text or a
default value passes. A comparison with "pool" is flagged even where it would mean the
config section ``[pool]``: compare sections through a named constant.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pool.registry import STRATEGIES

ROOT = Path(__file__).resolve().parent.parent
CHECKED = sorted([*ROOT.glob("daemon/*.py"), *ROOT.glob("hv_netvsc_sim/*.py")])
NAMES = frozenset(STRATEGIES)
PREFIXES = frozenset(n[:i] for n in STRATEGIES for i in range(3, len(n) + 1))


def _names_in(node: ast.AST) -> list[str]:
    """Strategy names spelled as string constants in `node` (itself or a literal of them)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in NAMES:
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [n for elt in node.elts for n in _names_in(elt)]
    return []


def violations(source: str, filename: str) -> list[str]:
    out = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                for name in _names_in(operand):
                    out.append(f"{where}: compares with strategy name {name!r}")
        elif isinstance(node, ast.match_case):
            for sub in ast.walk(node.pattern):
                if isinstance(sub, ast.MatchValue):
                    for name in _names_in(sub.value):
                        out.append(f"{where}: matches strategy name {name!r}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("startswith", "endswith")
        ):
            for arg in node.args:
                if (
                    isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str)
                    and arg.value in PREFIXES
                ):
                    out.append(f"{where}: {node.func.attr}({arg.value!r}) on a strategy name")
        elif isinstance(node, ast.Tuple | ast.List | ast.Set):
            names = _names_in(node)
            if len(names) >= 2:
                out.append(f"{where}: a literal list of strategy names {names}")
    return out


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_strategy_name_compared_above_the_pool(path: Path) -> None:
    assert violations(path.read_text(), str(path.relative_to(ROOT))) == []


def test_the_lint_catches_what_it_is_for() -> None:
    """Golden cases: each form the lint exists for is caught, the harmless ones pass."""
    bad = {
        'if name == "swiotlb": pass': 1,
        'if c["pool.strategy"] in ("pool", "pool-boot"): pass': 3,  # 2 names, 1 literal list
        'ok = name != "atomic-pool"': 1,
        'order = sorted(xs, key=lambda n: not n.startswith("vmalloc"))': 1,
        'S = ("pool", "vmalloc-alias", "swiotlb")': 1,
        'match name:\n    case "vmalloc-directmap":\n        pass': 1,
    }
    for source, count in bad.items():
        assert len(violations(source, "<case>")) == count, source
    good = (
        'SECTIONS = ("guest", "pool", "faults", "daemon")',
        'p.add_argument("--strategy", default=DEFAULT_STRATEGY, help="default pool")',
        "x = SPECS[name].costly",
        '"""The pool strategy (swiotlb, atomic-pool) docs."""',
    )
    for source in good:
        assert violations(source, "<case>") == [], source


def test_no_type_ignore_in_the_engine() -> None:
    assert "type: ignore" not in (ROOT / "daemon" / "engine.py").read_text()
