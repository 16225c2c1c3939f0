"""The daemon's page: the memory map and a few small charts, at `/` and `/ui`.

Why it is here: Grafana has no Debian package and the machines this runs on are offline, so
the daemon itself shows what the pool does to the guest's memory. Everything the page
shows comes from read-only JSON that names no client: GET /v1/memory-map (the map) and
GET /v1/ui/summary (pool size/used/free and its recent history with growth events, the
fragmentation and unusable free indexes by order and zone, the direct map by leaf size,
hazard and leak counts, allocation latency measured and modeled). Both, and the page's
static files (daemon/static/, shipped in the package; dependency-free JavaScript), are
served on the Unix API listener and on the metrics-only listener.

The history is sampled by a background task of the main app (UiHistory) every
`SAMPLE_SECONDS` for the last `HISTORY_SECONDS`: the page may open long after a growth.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import attrs
from aiohttp import web

from daemon import keys
from daemon.engine import NotReady, Service
from daemon.metrics import Metrics
from pool.memmap import palette

SAMPLE_SECONDS = 2.0
HISTORY_SECONDS = 600.0
REFRESH_SECONDS = 3.0  # the page's refresh interval (data-refresh-ms on its body)

# path -> (file in daemon/static, content type)
ASSETS = {
    "/ui/ui.js": ("ui.js", "text/javascript"),
    "/ui/ui.css": ("ui.css", "text/css"),
}


@attrs.frozen
class Sample:
    t: float  # wall-clock seconds (the page's time axis)
    size_bytes: int
    used_bytes: int
    free_bytes: int
    leaked_bytes: int
    grows: int
    shrinks: int


class UiHistory:
    """The pool's recent samples, newest last (at most HISTORY_SECONDS / SAMPLE_SECONDS)."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.samples: deque[Sample] = deque(maxlen=int(HISTORY_SECONDS / SAMPLE_SECONDS) + 1)

    def sample(self) -> None:
        strategy = self.service.strategy
        if not self.service.ready or strategy is None:
            return
        st = strategy.stats()
        self.samples.append(
            Sample(
                time.time(),
                st.size_bytes,
                st.used_bytes,
                st.free_bytes,
                st.leaked_bytes,
                st.grows,
                st.shrinks,
            )
        )

    def as_json(self) -> dict[str, Any]:
        """Columns (t, size_bytes, ...), and growth/shrink events: the sample times at which
        the counter had moved since the previous sample, with by how much."""
        cols: dict[str, list[Any]] = {f.name: [] for f in attrs.fields(Sample)}
        for s in self.samples:
            for name, value in attrs.asdict(s).items():
                cols[name].append(value)
        events = []
        for a, b in zip(list(self.samples), list(self.samples)[1:], strict=False):
            for kind, n in (("grow", b.grows - a.grows), ("shrink", b.shrinks - a.shrinks)):
                if n > 0:
                    events.append({"t": b.t, "kind": kind, "count": n})
        return {"interval_seconds": SAMPLE_SECONDS, **cols, "events": events}


# the main app's history; the metrics-only app holds the same object
UI_HISTORY = web.AppKey("ui_history", UiHistory)


async def history_ctx(app: web.Application) -> AsyncIterator[None]:
    """The main app's sampler task (the metrics app reads the same history)."""
    history = app[UI_HISTORY]

    async def run() -> None:
        while True:
            history.sample()
            await asyncio.sleep(SAMPLE_SECONDS)

    task = asyncio.create_task(run(), name="ui-history")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def summary_json(service: Service, metrics: Metrics, history: UiHistory) -> dict[str, Any]:
    """GET /v1/ui/summary: aggregates only (no client, owner or buffer)."""
    strategy, guest = service.strategy, service.guest
    if not service.ready or strategy is None or guest is None:
        raise NotReady(service.state)
    if not history.samples:
        history.sample()
    st = strategy.stats()
    report = guest.report()
    return {
        "time": time.time(),
        "refresh_seconds": REFRESH_SECONDS,
        "strategy": st.name,
        "platform": guest.config.platform,
        "memory_bytes": guest.config.memory_bytes,
        "pool": {
            "size_bytes": st.size_bytes,
            "used_bytes": st.used_bytes,
            "free_bytes": st.free_bytes,
            "largest_free_bytes": st.largest_free_bytes,
            "leaked_bytes": st.leaked_bytes,
            "chunks": dict(st.chunks),
            "grows": st.grows,
            "shrinks": st.shrinks,
        },
        "history": history.as_json(),
        "direct_map_bytes": dict(report.direct_map_bytes),
        "direct_map_splits": {
            "level2": report.counts.direct_map_level2_splits,
            "level3": report.counts.direct_map_level3_splits,
        },
        "hazard_pages": report.hazards.as_json(),
        "zones": [
            {
                "name": z.name,
                "fragmentation_index": list(z.fragmentation_index),
                "unusable_free_index": list(z.unusable_free_index),
            }
            for z in report.zones
        ],
        "latency": {
            "measured": {
                "bounds": metrics.alloc_duration.bounds[:-1],
                "by_size_class": metrics.alloc_duration.buckets(),
            },
            "modeled": {
                "bounds": metrics.modeled_conversion.bounds[:-1],
                "counts": metrics.modeled_conversion.buckets().get("", []),
            },
        },
    }


def _static(name: str) -> bytes:
    return resources.files("daemon").joinpath("static", name).read_bytes()


async def page(request: web.Request) -> web.Response:
    return web.Response(body=_static("index.html"), content_type="text/html", charset="utf-8")


async def asset(request: web.Request) -> web.Response:
    name, content_type = ASSETS[request.path]
    return web.Response(body=_static(name), content_type=content_type, charset="utf-8")


async def palette_json(request: web.Request) -> web.Response:
    return web.Response(body=json.dumps(palette()).encode(), content_type="application/json")


async def summary(request: web.Request) -> web.Response:
    app = request.app
    body = summary_json(app[keys.SERVICE], app[keys.METRICS], app[UI_HISTORY])
    return web.Response(body=json.dumps(body).encode(), content_type="application/json")


def add_ui_routes(app: web.Application) -> None:
    """The page, its files, the palette and the summary, on `app` (either listener)."""
    app.router.add_get("/", page)
    app.router.add_get("/ui", page)
    for path in ASSETS:
        app.router.add_get(path, asset)
    app.router.add_get("/ui/palette.json", palette_json)
    app.router.add_get("/v1/ui/summary", summary)
