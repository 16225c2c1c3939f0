"""Typed keys of the application's state (aiohttp web.AppKey)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from daemon.config import Config
from daemon.connections import ConnectionGuard
from daemon.engine import Service
from daemon.metrics import Metrics

CONFIG = web.AppKey("config", Config)
SERVICE = web.AppKey("service", Service)
METRICS = web.AppKey("metrics", Metrics)
OPENAPI = web.AppKey("openapi", bytes)
# Called with an exit status when the daemon must stop (a fatal error, a failed restore).
STOP: web.AppKey[Callable[[int], None]] = web.AppKey("stop")
# sd_notify(state) or a no-op.
NOTIFY: web.AppKey[Callable[[str], bool]] = web.AppKey("notify")
# The connection guard of this app's listeners, and every guard of the daemon (the main
# app's list; the metrics app adds its own) for the metrics.
CONNECTIONS = web.AppKey("connections", ConnectionGuard)
GUARDS: web.AppKey[list[ConnectionGuard]] = web.AppKey("guards")
