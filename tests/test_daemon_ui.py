"""GET /v1/memory-map, GET /v1/ui/summary and the page's files, on the daemon app over a
real loopback socket (aiohttp TestServer). Every answer is checked against the OpenAPI
document (Checked). The map is compared with the pool's own chunks; the page in a real
browser is tests/test_ui_browser.py."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.daemons import Checked, register, running_app, small_config

from daemon.engine import Service
from pool.guest.memmap import POOL
from pool.shared import SharedPool


@pytest.fixture
async def api(tmp_path: Path) -> Any:
    async with running_app(small_config(tmp_path / "state")) as client:
        yield Checked(client)


def _service(api: Checked) -> Service:
    from daemon import keys

    return api.client.server.app[keys.SERVICE]


async def test_memory_map_shows_the_pools_chunks_and_names_no_client(api: Checked) -> None:
    _, token = await register(api.client, "netvsc-secret-name")
    status, buf, _ = await api("POST", "/v1/buffers", token=token, json={"size": 1 << 20})
    assert status == 201
    status, doc, _ = await api("GET", "/v1/memory-map")
    assert status == 200
    assert doc["regions"] == 256 and doc["region_bytes"] == 2 << 20  # 512 MiB
    text = json.dumps(doc)
    assert "netvsc-secret-name" not in text and buf["owner"] not in text
    codes = np.frombuffer(base64.b64decode(doc["codes"]), np.uint8)
    pool = _service(api).strategy
    assert isinstance(pool, SharedPool)
    states = POOL.of(codes)
    want = {}
    for run in pool.chunk_pages():
        for region in range(run.start // 512, (run.start + run.npages - 1) // 512 + 1):
            want.setdefault(region, set()).add(run.state)
    for region, held in want.items():
        expect = "free" if held == {"free"} else "full" if held == {"used"} else "partial"
        assert POOL.values[states[region]] == expect, region
    assert {int(i) for i in np.flatnonzero(states)} == set(want)
    (start, _n) = buf["pfn_ranges"][0]
    assert POOL.values[states[start // 512]] in ("partial", "full")
    assert doc["totals"]["pool"]["none"] == 256 - len(want)

    status, runs, _ = await api("GET", "/v1/memory-map?encoding=runs")
    assert status == 200 and sum(n for _, n in runs["codes"]) == 256
    status, problem, _ = await api("GET", "/v1/memory-map?encoding=hex")
    assert status == 400 and problem["field"] == "encoding"
    assert "encoding must be one of base64, runs" in problem["detail"]


async def test_memory_map_is_cached_until_the_state_changes(api: Checked) -> None:
    _, token = await register(api.client)
    first = await (await api.client.get("/v1/memory-map")).read()
    again = await (await api.client.get("/v1/memory-map")).read()
    assert first == again
    await api("POST", "/v1/buffers", token=token, json={"size": 4 << 20})
    after = await (await api.client.get("/v1/memory-map")).read()
    assert after != first


async def test_summary_and_page_files(api: Checked) -> None:
    _, token = await register(api.client)
    await api("POST", "/v1/buffers", token=token, json={"size": 64 << 10})
    status, s, _ = await api("GET", "/v1/ui/summary")
    assert status == 200 and s["strategy"] == "pool"
    assert s["pool"]["used_bytes"] == 64 << 10
    assert [z["name"] for z in s["zones"]] == ["DMA", "DMA32"]
    assert len(s["history"]["t"]) >= 1
    measured = s["latency"]["measured"]["by_size_class"]
    assert sum(map(sum, measured.values())) == 1
    assert len(measured["le_64KiB"]) == len(s["latency"]["measured"]["bounds"]) + 1
    for path in ("/", "/ui"):
        status, html, _ = await api("GET", path)
        assert status == 200 and '<div id="map"' in html and "/ui/ui.js" in html
    status, js, _ = await api("GET", "/ui/ui.js")
    assert status == 200 and "/v1/memory-map" in js
    # offline machines: nothing is fetched from elsewhere (the SVG namespace is a name)
    assert re.findall(r"https?://[^\s\"'`]+", js + html) == ["http://www.w3.org/2000/svg"]
    status, css, _ = await api("GET", "/ui/ui.css")
    assert status == 200 and "#map" in css
    status, pal, _ = await api("GET", "/ui/palette.json")
    assert status == 200 and pal["colours"]["pool"]["leaked"].startswith("#")
