"""The committed Grafana dashboard is exactly what deploy/grafana/dashboard.py generates."""

from __future__ import annotations

import difflib
import importlib.util
import json
import sys
from types import ModuleType
from typing import Any

import pytest
import yaml
from support.deploy_paths import DASHBOARD_JSON, DASHBOARD_SCRIPT, GRAFANA_DIR

REGENERATE = ".venv/bin/python deploy/grafana/dashboard.py"


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sharedpool_dashboard_gen", DASHBOARD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))


def test_committed_json_matches_the_generator(generator: ModuleType) -> None:
    committed = DASHBOARD_JSON.read_text(encoding="utf-8")
    generated = generator.render()
    if generated != committed:
        diff = "".join(
            difflib.unified_diff(
                committed.splitlines(keepends=True),
                generated.splitlines(keepends=True),
                "committed",
                "generated",
                n=2,
            )
        )
        pytest.fail(f"{DASHBOARD_JSON.name} is stale: run `{REGENERATE}`\n{diff[:4000]}")


def test_generator_is_deterministic(generator: ModuleType) -> None:
    assert generator.render() == generator.render()


def test_generator_writes_the_file(generator: ModuleType, tmp_path: Any) -> None:
    out = tmp_path / "d.json"
    assert generator.main(["--output", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == generator.render()


def test_required_panels(dashboard: dict[str, Any]) -> None:
    by_type: dict[str, list[str]] = {}
    for panel in dashboard["panels"]:
        by_type.setdefault(panel["type"], []).append(panel["title"])
    titles = " | ".join(t for ts in by_type.values() for t in ts).lower()
    for needle in [
        "pool usage",
        "p50 / p99",
        "heatmap",
        "conversions and hypercalls",
        "direct map by leaf size",
        "fragmentation index by order",
        "unusable free index by order",
        "buddy free blocks by order",
        "hazard",
        "leaked bytes",
        "clients and reclaimed buffers",
    ]:
        assert needle in titles, f"no panel titled like {needle!r}"
    assert by_type.get("heatmap"), "the latency heatmap must be a heatmap panel"
    heatmap = next(p for p in dashboard["panels"] if p["type"] == "heatmap")
    assert heatmap["targets"][0]["format"] == "heatmap"
    assert "_bucket" in heatmap["targets"][0]["expr"]


def test_panel_ids_unique_and_grid_within_24_columns(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))


def test_every_query_uses_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    provisioning = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (datasource,) = provisioning["datasources"]
    assert datasource["type"] == "prometheus"
    uid = datasource["uid"]
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]
    for var in dashboard["templating"]["list"]:
        assert var["datasource"]["uid"] == uid


def test_dashboard_provider_points_at_the_mounted_folder() -> None:
    provider = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "dashboards" / "sharedpool.yml").read_text()
    )["providers"][0]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/sharedpool"


def test_json_round_trips_through_the_sdk_models() -> None:
    """The committed JSON decodes into the SDK's Grafana 11.6 models and back unchanged."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()
    raw = DASHBOARD_JSON.read_text(encoding="utf-8")
    decoded = Dashboard.from_json(json.loads(raw))
    assert JSONEncoder(sort_keys=True, indent=2).encode(decoded) + "\n" == raw


def test_safety_row_comes_first(dashboard: dict[str, Any]) -> None:
    """An operator sees what must be 0 before anything about capacity: the first row is
    Safety, its panels the fatal hazard pages, the recoverable ones, the pages of unknown
    state and the leaked bytes, each with a red or orange threshold at 1."""
    panels = dashboard["panels"]
    assert panels[0]["type"] == "row" and panels[0]["title"] == "Safety"
    safety = []
    for p in panels[1:]:
        if p["type"] == "row":
            break
        safety.append(p)
    assert [p["title"] for p in safety] == [
        "Fatal hazard pages",
        "Recoverable hazard pages",
        "Pages of unknown state",
        "Leaked bytes",
    ]
    assert 'kind="private_alias_to_shared"' in safety[0]["targets"][0]["expr"]
    assert 'kind="unknown_state"' in safety[2]["targets"][0]["expr"]
    assert "sharedpool_leaked_bytes" in safety[3]["targets"][0]["expr"]
    for p in safety:
        steps = p["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert [s["value"] for s in steps] == [None, 1], p["title"]
        assert steps[1]["color"] in ("red", "orange")
        assert p["gridPos"]["y"] == safety[0]["gridPos"]["y"]  # one row, on top
    assert safety[0]["fieldConfig"]["defaults"]["thresholds"]["steps"][1]["color"] == "red"


def test_fragmentation_by_order_is_one_panel_per_zone(dashboard: dict[str, Any]) -> None:
    """Split per zone (Grafana repeats the panel for each value of $zone) instead of
    3 zones x 11 orders = 33 series on one graph: each copy selects one zone and draws one
    series per order."""
    for title in ("Fragmentation index by order", "Unusable free index by order"):
        (panel,) = [p for p in dashboard["panels"] if p["title"].startswith(title)]
        assert panel["repeat"] == "zone" and panel["repeatDirection"] == "h"
        assert "$zone" in panel["title"]
        (target,) = panel["targets"]
        assert 'zone=~"$zone"' in target["expr"] and "max by (order)" in target["expr"]
        assert target["legendFormat"] == "order {{order}}"
    zone = next(v for v in dashboard["templating"]["list"] if v["name"] == "zone")
    assert zone["multi"] and zone["includeAll"]
