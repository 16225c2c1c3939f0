"""A fault-injecting HTTP proxy for the client-library tests (no tests here).

A real aiohttp server on its own Unix socket, in front of a real sharedpoold: it forwards
every request to the daemon's socket and its answer back, except that the requests a test
names are first answered with planned problem documents (a 503 with a Retry-After in
either form, say). So "the daemon answers 503 twice, then 201" is two planned answers and
then the real daemon's allocation, and the test can count what reached the daemon.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

import aiohttp
import attrs
from aiohttp import web

__all__ = ["FaultProxy", "Planned", "problem_503"]


@attrs.frozen
class Planned:
    """One planned answer: status, headers, JSON body."""

    status: int
    headers: dict[str, str]
    body: dict[str, Any]


def problem_503(retry_after: str | None, name: str = "pool-exhausted") -> Planned:
    """The 503 the daemon gives while its pool grows, with the Retry-After given."""
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    body = {
        "type": f"urn:sharedpool:problem:{name}",
        "title": "Pool exhausted",
        "status": 503,
        "detail": "planned by the test's fault proxy",
        "reason": "exhausted",
    }
    return Planned(503, headers, body)


@attrs.define
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    answered_by: str  # "proxy" or "daemon"


class FaultProxy:
    """`async with FaultProxy(daemon_socket, tmp / "proxy.sock") as proxy:`, then point the
    client at `proxy.url`. `plan(method, path, answers)` queues answers for that route;
    `always(method, path, answer)` answers it so for ever. `seen` lists every request."""

    def __init__(self, upstream: Path, socket: Path) -> None:
        self.upstream = upstream
        self.socket = socket
        self.seen: list[Seen] = []
        self._queued: dict[tuple[str, str], deque[Planned]] = {}
        self._always: dict[tuple[str, str], Planned] = {}
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"unix:{self.socket}"

    def plan(self, method: str, path: str, answers: list[Planned]) -> None:
        self._queued.setdefault((method, path), deque()).extend(answers)

    def always(self, method: str, path: str, answer: Planned) -> None:
        self._always[(method, path)] = answer

    def count(self, method: str, path: str, answered_by: str | None = None) -> int:
        return sum(
            1
            for s in self.seen
            if s.method == method
            and s.path == path
            and (answered_by is None or s.answered_by == answered_by)
        )

    async def __aenter__(self) -> FaultProxy:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.UnixSite(self._runner, str(self.socket)).start()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(self.upstream))
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        key = (request.method, request.path)
        queued = self._queued.get(key)
        planned = queued.popleft() if queued else self._always.get(key)
        headers = dict(request.headers)
        if planned is not None:
            self.seen.append(Seen(request.method, request.path, headers, "proxy"))
            await request.read()
            return web.Response(
                status=planned.status,
                headers=planned.headers,
                body=json.dumps(planned.body).encode(),
                content_type="application/problem+json",
            )
        self.seen.append(Seen(request.method, request.path, headers, "daemon"))
        assert self._session is not None
        forward = {k: v for k, v in headers.items() if k in ("Authorization", "Content-Type")}
        async with self._session.request(
            request.method,
            "http://sharedpoold" + request.path_qs,
            data=await request.read(),
            headers=forward,
        ) as upstream:
            body = await upstream.read()
            keep = {
                k: v for k, v in upstream.headers.items() if k in ("Retry-After", "Content-Type")
            }
            return web.Response(status=upstream.status, headers=keep, body=body)
