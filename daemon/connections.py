"""Bounded connections: a maximum per listener group, an idle/header timeout, refusals
that cost nothing and log one line per interval.

aiohttp keeps an idle keep-alive connection for an hour by default and has no timeout for
a client that sends its request headers slowly (or never): about 1,000 held connections
used up the daemon's descriptors, after which every client was refused, `/healthz`
failed, and the accept loop logged a traceback per retry (~112,000 in 18 s). Here:

- each listener group (the API, the metrics-only listener) admits at most `limit`
  connections; one more is answered at once with a 503 problem and closed (no request is
  parsed, no handler runs), counted, and logged at most once per `LOG_INTERVAL` with the
  number refused since the last line;
- a connection with no request in flight for `idle_timeout` seconds — after it connected,
  or after its last answer — is closed. This is both the keep-alive idle timeout and the
  header timeout: a request whose headers have not all arrived by then is not in flight
  (the middleware marks a request in flight once aiohttp has parsed its headers);
- the body has its own bound (`daemon.body_timeout`, in daemon.api.read_body);
- the process's descriptor limit is raised from soft to hard at start, and the default
  limit is sized to it, so accept() does not run out of descriptors; if it does anyway,
  asyncio's "out of system resource" report is rate-limited like the refusals.

A proxy protocol sits between the transport and aiohttp's RequestHandler: it counts the
connection in and out exactly once, whatever aiohttp does with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("sharedpoold")

LOG_INTERVAL = 10.0  # seconds between two "refused" lines
METRICS_LIMIT = 64  # connections the metrics-only listener admits (Prometheus needs 1-2)
RESERVED_FDS = 256  # descriptors kept for the database, logs, the metrics listener, ...

_REFUSAL_BODY = (
    b'{"type":"urn:sharedpool:problem:too-many-connections","title":"Too many connections",'
    b'"status":503,"detail":"the daemon is at its connection limit; retry later"}'
)
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
    + str(len(_REFUSAL_BODY)).encode()
    + b"\r\n\r\n"
    + _REFUSAL_BODY
)


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one; the resulting soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


def default_limit(fd_limit: int) -> int:
    """API connections admitted when daemon.max_connections is 0: the descriptors left once
    the metrics listener's and the daemon's own are set aside."""
    return max(16, fd_limit - RESERVED_FDS - METRICS_LIMIT)


class RateLimitedLog:
    """At most one WARNING per interval, carrying how many events it stands for."""

    def __init__(self, message: str, interval: float = LOG_INTERVAL) -> None:
        self.message = message
        self.interval = interval
        self._last = -float("inf")
        self._suppressed = 0

    def event(self, **extra: Any) -> None:
        now = time.monotonic()
        self._suppressed += 1
        if now - self._last >= self.interval:
            log.warning(self.message, extra={"count": self._suppressed, **extra})
            self._last = now
            self._suppressed = 0


class _Conn:
    __slots__ = ("handler", "idle_since", "in_flight")

    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.in_flight = 0
        self.idle_since = time.monotonic()


class _Proxy(asyncio.Protocol):
    """Forwards every protocol call to aiohttp's handler; counts the connection."""

    def __init__(self, guard: ConnectionGuard, handler: Any) -> None:
        self._guard = guard
        self._handler = handler

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._guard._opened(self._handler)
        self._handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received()  # type: ignore[no-any-return]

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard._closed(self._handler)
        self._handler.connection_lost(exc)


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_REFUSAL)
        transport.close()


class ConnectionGuard:
    """The connections of one listener group (one AppRunner)."""

    def __init__(self, name: str, limit: int, idle_timeout: float) -> None:
        self.name = name
        self.limit = limit
        self.idle_timeout = idle_timeout
        self._conns: dict[Any, _Conn] = {}
        self.refused = 0
        self.closed_idle = 0
        self._refusal_log = RateLimitedLog(
            f"connection limit reached on the {name} listener: new connections refused"
        )

    @property
    def open(self) -> int:
        return len(self._conns)

    def factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        def make() -> asyncio.Protocol:
            if len(self._conns) >= self.limit:
                self.refused += 1
                self._refusal_log.event(limit=self.limit, listener=self.name)
                return _Refuse()
            handler = server()
            # counted here, not in connection_made: asyncio accepts a whole backlog's worth
            # of connections, calling this factory for each, before any connection_made
            self._opened(handler)
            return _Proxy(self, handler)

        return make

    def _opened(self, handler: Any) -> None:
        if handler not in self._conns:
            self._conns[handler] = _Conn(handler)

    def _closed(self, handler: Any) -> None:
        self._conns.pop(handler, None)

    # -- request bracket, from the middleware ------------------------------------------
    def request_started(self, handler: Any) -> None:
        conn = self._conns.get(handler)
        if conn is not None:
            conn.in_flight += 1

    def request_done(self, handler: Any) -> None:
        conn = self._conns.get(handler)
        if conn is not None:
            conn.in_flight -= 1
            conn.idle_since = time.monotonic()

    def sweep(self, now: float | None = None) -> int:
        """Close connections idle (no request in flight) for idle_timeout; how many. One
        whose transport never came (accept failed after the factory ran) is dropped."""
        now = time.monotonic() if now is None else now
        closed = 0
        for conn in list(self._conns.values()):
            if conn.in_flight == 0 and now - conn.idle_since >= self.idle_timeout:
                transport = conn.handler.transport
                if transport is not None:
                    transport.close()
                self._conns.pop(conn.handler, None)
                closed += 1
        self.closed_idle += closed
        return closed

    async def sweeper(self) -> None:
        """Sweep about four times per idle_timeout, until cancelled."""
        while True:
            await asyncio.sleep(max(self.idle_timeout / 4, 0.05))
            self.sweep()

    def collect(self) -> Iterator[Any]:
        gauge = GaugeMetricFamily(
            "sharedpool_connections", "Open client connections", labels=["listener"]
        )
        gauge.add_metric([self.name], self.open)
        yield gauge
        limit = GaugeMetricFamily(
            "sharedpool_connections_limit", "Connections admitted at most", labels=["listener"]
        )
        limit.add_metric([self.name], self.limit)
        yield limit
        refused = CounterMetricFamily(
            "sharedpool_connections_refused",
            "Connections refused at the limit",
            labels=["listener"],
        )
        refused.add_metric([self.name], self.refused)
        yield refused
        idle = CounterMetricFamily(
            "sharedpool_connections_closed_idle",
            "Connections closed with no request for the idle/header timeout",
            labels=["listener"],
        )
        idle.add_metric([self.name], self.closed_idle)
        yield idle


class GuardCollector(Collector):
    """The guards of every listener group as one set of metric families."""

    def __init__(self, guards: list[ConnectionGuard]) -> None:
        self.guards = guards

    def collect(self) -> Iterator[Any]:
        families: dict[str, Any] = {}
        for guard in self.guards:
            for family in guard.collect():
                if family.name in families:
                    families[family.name].samples.extend(family.samples)
                else:
                    families[family.name] = family
        yield from families.values()


class GuardedSite(web.SockSite):
    """A SockSite whose connections pass through a ConnectionGuard."""

    def __init__(self, runner: web.BaseRunner, sock: Any, guard: ConnectionGuard) -> None:
        super().__init__(runner, sock, backlog=256)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._guard.factory(server), sock=self._sock, backlog=self._backlog
        )


def rate_limited_exception_handler() -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """asyncio's exception handler, except that accept() running out of descriptors is
    logged at most once per interval (it retries every 0.1-1 s: a log storm otherwise)."""
    out_of_fds = RateLimitedLog("accept() is out of file descriptors: connections wait")

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if "out of system resource" in str(context.get("message", "")):
            out_of_fds.event()
            return
        loop.default_exception_handler(context)

    return handler
