"""Held, idle and slow connections against a real sharedpoold process (issue 13, item 3):
2,000 held connections leave /healthz answering and the log short; connections beyond
the limit are refused at once with a 503 problem and counted; idle, slow-header and
slow-body connections are closed by their timeouts."""

from __future__ import annotations

import re
import socket
import time
import urllib.request
from pathlib import Path

from support.daemons import Daemon

from daemon.connections import ConnectionGuard, RateLimitedLog


def _unix(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))  # blocking: waits while the daemon's backlog is full
    s.settimeout(5)
    return s


def _metric(url: str, name: str, listener: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as answer:
        text = answer.read().decode()
    m = re.search(rf'^{name}{{listener="{listener}"}} (\S+)$', text, re.MULTILINE)
    assert m, name
    return float(m.group(1))


async def test_2000_held_connections_leave_healthz_answering_and_the_log_short(
    tmp_path: Path,
) -> None:
    d = Daemon(
        tmp_path,
        "--metrics-listen",
        "tcp:127.0.0.1:0",
        "--max-connections",
        "500",
        "--idle-timeout",
        "30",
        tcp=False,
    )
    held: list[socket.socket] = []
    try:
        await d.wait_ready()
        url = d.metrics_url()
        for _ in range(2000):
            held.append(_unix(d.sock))
        # past the limit, a connection is answered 503 at once and closed
        extra = _unix(d.sock)
        data = extra.recv(4096)
        assert data.startswith(b"HTTP/1.1 503"), data
        assert b"too-many-connections" in data
        assert extra.recv(4096) == b""  # closed by the daemon
        extra.close()
        t0 = time.monotonic()
        with urllib.request.urlopen(url + "/healthz", timeout=5) as answer:
            assert answer.status == 200
        assert time.monotonic() - t0 < 1.0
        assert _metric(url, "sharedpool_connections", "api") == 500
        assert _metric(url, "sharedpool_connections_refused_total", "api") >= 1501
        # the first 500 are served normally
        s = held[0]
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: d\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        lines = d.output().splitlines()
        assert len(lines) < 100, lines[-20:]
        assert sum("connection limit reached" in x for x in lines) <= 2
        assert "Traceback" not in d.output()
    finally:
        for s in held:
            s.close()
        d.stop()


async def test_idle_slow_header_and_slow_body_connections_are_closed(tmp_path: Path) -> None:
    d = Daemon(tmp_path, "--idle-timeout", "0.6", "--body-timeout", "0.6", tcp=False)
    try:
        await d.wait_ready()
        idle = _unix(d.sock)
        slow_header = _unix(d.sock)
        slow_header.sendall(b"GET /healthz HTTP/1.1\r\nHost: d\r\n")  # never ends
        slow_body = _unix(d.sock)
        slow_body.sendall(
            b"POST /v1/clients HTTP/1.1\r\nHost: d\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        t0 = time.monotonic()
        assert idle.recv(4096) == b""  # closed, no answer
        assert slow_header.recv(4096) == b""
        answer = slow_body.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"request-timeout" in answer
        assert time.monotonic() - t0 < 5
        for s in (idle, slow_header, slow_body):
            s.close()
        # a live client meanwhile is served
        live = _unix(d.sock)
        live.sendall(b"GET /readyz HTTP/1.1\r\nHost: d\r\n\r\n")
        assert live.recv(4096).startswith(b"HTTP/1.1 200")
        live.close()
    finally:
        d.stop()


def test_rate_limited_log_counts_what_it_suppressed(caplog: object) -> None:
    import logging

    records: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("sharedpoold")
    handler = Catch()
    logger.addHandler(handler)
    try:
        limited = RateLimitedLog("refused", interval=3600)
        for _ in range(1000):
            limited.event()
        assert len(records) == 1 and records[0].__dict__["count"] == 1
        limited._last = -float("inf")  # the next interval
        limited.event()
        assert len(records) == 2 and records[1].__dict__["count"] == 1000
    finally:
        logger.removeHandler(handler)


def test_sweep_closes_only_connections_with_no_request_in_flight() -> None:
    class Transport:
        closed = False

        def close(self) -> None:
            self.closed = True

    class Handler:
        def __init__(self) -> None:
            self.transport = Transport()

    guard = ConnectionGuard("api", 10, idle_timeout=5)
    busy, idle = Handler(), Handler()
    guard._opened(busy)
    guard._opened(idle)
    guard.request_started(busy)
    now = time.monotonic() + 6
    assert guard.sweep(now) == 1
    assert idle.transport.closed and not busy.transport.closed
    guard.request_done(busy)
    assert guard.sweep(time.monotonic() + 1) == 0  # its last answer was just now
    assert guard.sweep(time.monotonic() + 6) == 1 and guard.open == 0
