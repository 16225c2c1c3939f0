"""The verdict block and the table's width, on a real (small) compare document."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from rich.table import Table

from hv_netvsc_sim.compare import CompareConfig, run_compare
from hv_netvsc_sim.report import compare_table, print_table
from hv_netvsc_sim.verdict import SOURCES, verdict_lines, verdicts
from pool.guest.units import GiB


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    config = CompareConfig.of(
        guest_memory_bytes=2 * GiB,
        cycles=6,
        seed=4,
        age_steps=20_000,
        strategies=("pool", "vmalloc-alias", "vmalloc-directmap", "swiotlb"),
        runtime_cost_4k=0.009,
    )
    return run_compare(config, jobs=2)


def test_verdict_answers(doc: dict[str, Any]) -> None:
    v = verdicts(doc)
    assert v["pool"].serves and v["pool"].fatal_hazard_pages == 0
    assert v["pool"].splits_per_hot_add == 0
    assert not v["swiotlb"].serves and v["swiotlb"].refused > 0
    assert "recv_buf" in v["swiotlb"].unservable
    assert v["vmalloc-alias"].fatal_hazard_pages > 0
    dm = v["vmalloc-directmap"]
    hot_adds = doc["strategies"]["vmalloc-directmap"]["events"]["hot_add"]
    splits = doc["strategies"]["vmalloc-directmap"]["run"]["direct_map_splits"]
    assert dm.splits_per_hot_add == pytest.approx((splits["level2"] + splits["level3"]) / hot_adds)
    assert dm.page_table_bytes_per_hot_add == pytest.approx(dm.splits_per_hot_add * 4096)
    # the estimate is the 4 KiB share times the given fraction, nothing more
    assert dm.runtime_estimate == pytest.approx(dm.direct_map_4k_share * 0.009)
    assert doc["verdict"]["pool"]["serves_vnic"] is True  # in the JSON as well


def test_verdict_block_one_line_each(doc: dict[str, Any]) -> None:
    lines = verdict_lines(doc)
    assert lines[0].startswith("Verdict")
    body = lines[1 : 1 + len(doc["strategies"])]
    assert [line.split()[0] for line in body] == list(doc["strategies"])
    assert "CANNOT serve" in body[3] and "FATAL" in body[1]
    assert all("per hot add" in line for line in body)
    assert "modeled p99" in body[0] and "no allocation served" in body[3]
    assert SOURCES in lines[-1] and "assumption" in lines[-1]


def _render(table: Table, width: int | None) -> str:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return width is not None

    out = Tty()
    if width is not None:
        import os

        os.environ["COLUMNS"] = str(width)
    try:
        print_table(table, out)
    finally:
        if width is not None:
            del os.environ["COLUMNS"]
    return re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue())  # a "terminal" gets colours


def test_table_fits_a_100_column_terminal(doc: dict[str, Any]) -> None:
    text = _render(compare_table(doc), 100)
    assert max(len(line) for line in text.splitlines()) <= 100
    for name in doc["strategies"]:
        assert name in text  # whole, never truncated


def test_redirected_table_is_not_truncated(doc: dict[str, Any]) -> None:
    text = _render(compare_table(doc), None)
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert len(rows) == len(doc["strategies"])  # one line per strategy: nothing wrapped
    for name, row in zip(doc["strategies"], rows, strict=True):
        assert row.split("│")[1].strip() == name
    assert "…" not in text
