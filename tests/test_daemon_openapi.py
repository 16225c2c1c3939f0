"""The shipped OpenAPI document and the router agree: every route documented and every
documented operation routed; the document is well formed (3.1, resolvable $refs, problem
responses for errors)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from support.daemons import load_openapi, small_config

from daemon.app import create_app
from daemon.problems import PREFIX, PROBLEMS


def _routes() -> set[tuple[str, str]]:
    app = create_app(small_config(Path("/nonexistent")))
    out = set()
    for route in app.router.routes():
        if route.method in ("HEAD", "*"):
            continue
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        assert path, info
        # aiohttp's formatter drops the regex part: {id:[0-9]+} -> {id}
        out.add((route.method.lower(), re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", path)))
    return out


def test_every_route_documented_and_every_operation_routed() -> None:
    doc = load_openapi()
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert _routes() == documented


def test_document_is_well_formed() -> None:
    doc = load_openapi()
    assert doc["openapi"] == "3.1.0"
    text = json.dumps(doc)
    for ref in re.findall(r'"\$ref": "#/components/schemas/(\w+)"', text):
        assert ref in doc["components"]["schemas"], ref
    op_ids = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            op_ids.append(op["operationId"])
            params = set(re.findall(r"\{(\w+)\}", path))
            in_path = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert params == in_path, (method, path)
            for status, resp in op["responses"].items():
                if int(status) >= 400:
                    (media,) = resp["content"]
                    assert media == "application/problem+json", (path, status)
                if status == "503":
                    assert "Retry-After" in resp["headers"]
    assert len(op_ids) == len(set(op_ids))
    pattern = doc["components"]["schemas"]["Problem"]["properties"]["type"]["pattern"]
    for name in PROBLEMS:
        assert re.match(pattern, PREFIX + name)


def test_served_document_is_the_shipped_file(tmp_path: Path) -> None:
    from importlib import resources

    shipped: Any = json.loads(resources.files("daemon").joinpath("openapi.json").read_text())
    assert shipped == load_openapi()
