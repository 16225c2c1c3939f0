"""The daemon's page in a real browser: a spawned sharedpoold, buffers allocated through the
client library, the page opened in headless Chromium (Debian's chromium and chromium-driver,
through selenium) on the metrics-only TCP listener. Checked on the rendered page: every map
cell's data attributes equal the region codes GET /v1/memory-map answers (the cells of the
pool's chunks included), the cells are painted in the palette's colours, and a buffer
allocated afterwards shows on the map by the first refresh that starts after it.

Skipped only when Chromium or its driver is missing and CI is not set: under CI=true (.ci/run
installs both) a missing browser is a failure.

SHAREDPOOL_UI_SCREENSHOT=PATH saves a screenshot of the rendered page there."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.chromium import CHROMIUM_FLAGS as BROWSER_FLAGS
from support.daemons import Daemon

from daemon.client import SyncSharedPoolClient
from pool.guest.memmap import FIELDS
from pool.memmap import palette

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

if not (CHROMIUM and DRIVER) and os.environ.get("CI") != "true":
    pytest.skip(
        "Chromium or chromedriver not installed (apt-get install chromium chromium-driver; "
        ".ci/run installs them, and under CI=true this test must run)",
        allow_module_level=True,
    )

CHROMIUM_FLAGS = (*BROWSER_FLAGS, "--window-size=1500,1150")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    assert CHROMIUM and DRIVER, "CI=true: chromium and chromium-driver must be installed"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(options=options, service=DriverService(executable_path=DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, "--metrics-listen", "tcp:127.0.0.1:0", tcp=False)
    try:
        asyncio.run(d.wait_ready())
        yield d
    finally:
        d.signal(signal.SIGTERM)
        d.wait()
        d.stop()


def _map(url: str) -> tuple[dict[str, Any], bytes]:
    with urllib.request.urlopen(url + "/v1/memory-map", timeout=5) as answer:
        doc = json.loads(answer.read())
    return doc, base64.b64decode(doc["codes"])


def _wait(what: str, cond: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


_CELLS_JS = """return Array.from(document.querySelectorAll('#map .c'), c => [
  Number(c.dataset.r), Number(c.dataset.code), c.dataset.leaf, c.dataset.encryption,
  c.dataset.pool, c.dataset.hazard]);"""


def _cells(driver: Any) -> list[list[Any]]:
    rows: list[list[Any]] = driver.execute_script(_CELLS_JS)
    return rows


def _refreshes(driver: Any) -> int:
    return int(driver.execute_script("return Number(document.body.dataset.refreshes)"))


def _rgb(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


def _value(doc: dict[str, Any], code: int, field: str) -> str:
    """A field's value in a region code, by the layout the document carries."""
    spec = doc["fields"][field]
    value: str = spec["values"][(code >> spec["shift"]) & ((1 << spec["bits"]) - 1)]
    return value


def _regions_of(buffer: Any) -> set[int]:
    return {
        region
        for r in buffer.ranges
        for region in range(r.start // 512, (r.start + r.npages - 1) // 512 + 1)
    }


def test_page_shows_the_map_the_json_gives_and_follows_a_new_buffer(
    daemon: Daemon, browser: Any
) -> None:
    url = daemon.metrics_url()
    with SyncSharedPoolClient(daemon.unix_url, "browser-test") as client:
        first = client.allocate(1 << 20, purpose="rx")
        browser.get(url + "/?refresh=1000")
        _wait("the first refresh", lambda: _refreshes(browser) >= 1, 20)
        refresh_ms = int(browser.execute_script("return Number(document.body.dataset.refreshMs)"))
        doc, codes = _map(url)
        cells = _cells(browser)
        assert len(cells) == doc["regions"] == 256  # 512 MiB
        assert [c[0] for c in cells] == list(range(256))
        assert [c[1] for c in cells] == list(codes)
        for _, code, *values in cells:  # every field decoded as the document's layout says
            assert values == [_value(doc, code, f.name) for f in FIELDS]
        # the regions of the first buffer's chunk show the state the JSON gives, not "none"
        mine = _regions_of(first)
        for r in mine:
            assert cells[r][4] == _value(doc, codes[r], "pool") != "none"
        # painted in the palette's colours (overview: pool state over direct-map leaf)
        colours = palette()["colours"]
        for r in mine:
            background = browser.execute_script(
                "const c = document.querySelector(`#map .c[data-r='${arguments[0]}']`);"
                "return getComputedStyle(c).backgroundColor;",
                r,
            )
            assert background == _rgb(colours["pool"][cells[r][4]])
        legend = browser.find_element("id", "legend").text
        assert "chunk: partly used" in legend and "2 MiB leaf" in legend

        # a new 4 MiB buffer takes the pool's whole free chunk: its regions turn "full"
        before = {c[0]: c[4] for c in cells}
        second = client.allocate(4 << 20, purpose="rx2")
        n = _refreshes(browser)
        # the refresh in flight may have read the map before the allocation: the next one
        # started after it
        _wait(
            "a refresh after the allocation",
            lambda: _refreshes(browser) >= n + 2,
            2 * refresh_ms / 1000 + 10,
        )
        _, codes2 = _map(url)
        cells2 = _cells(browser)
        assert [c[1] for c in cells2] == list(codes2)
        theirs = _regions_of(second)
        assert theirs and all(cells2[r][4] == "full" for r in theirs)
        assert any(before[r] != "full" for r in theirs)
        assert browser.find_element("id", "s-used").text.startswith("5 MiB")
        shot = os.environ.get("SHAREDPOOL_UI_SCREENSHOT")
        if shot:
            browser.save_screenshot(shot)
