"""The aiohttp application: create_app(config), its middleware and background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources

from aiohttp import web

from daemon import keys, systemd
from daemon.api import healthz, memory_map, problem_for, readyz, routes
from daemon.config import Config
from daemon.connections import (
    METRICS_LIMIT,
    ConnectionGuard,
    GuardCollector,
    default_limit,
    raise_fd_limit,
)
from daemon.engine import OpenCancelled, RestoreError, Service, StateMismatch
from daemon.metrics import Metrics
from daemon.problems import Problem
from daemon.ui import UI_HISTORY, UiHistory, add_ui_routes, history_ctx
from pool import __version__

log = logging.getLogger("sharedpoold")

EXIT_FATAL = 1
EXIT_CONFIG = 2
EXIT_RESTORE = 3
EXIT_STORAGE = 4  # the state directory's storage failed (read-only, permissions, I/O)


def _problem_for_error(request: web.Request, exc: Exception) -> web.Response:
    """The application/problem+json answer to an error a handler raised."""
    problem = problem_for(exc)
    if problem is None:
        if isinstance(exc, web.HTTPException):
            if exc.status < 400:
                raise exc
            problem = (
                Problem("internal")
                if exc.status >= 500
                else Problem("not-found" if exc.status == 404 else "malformed-json")
            )
        else:
            log.exception("unhandled error", extra={"method": request.method, "path": request.path})
            problem = Problem("internal")
    return problem.response(request.path)


@web.middleware
async def request_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error answers as application/problem+json (no traceback reaches a client),
    inside the connection guard's count of requests in flight (daemon.connections). One
    middleware, not two: each adds frames to every request's call and to every resume of
    its handler after a journal wait."""
    guard = request.app[keys.CONNECTIONS]
    guard.request_started(request.protocol)
    try:
        return await handler(request)
    except Exception as exc:
        return _problem_for_error(request, exc)
    finally:
        guard.request_done(request.protocol)


def _openapi_bytes() -> bytes:
    return resources.files("daemon").joinpath("openapi.json").read_bytes()


async def _service_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the service in a worker thread (guest build and aging, or restore, take seconds)
    so that /healthz answers meanwhile; close it (journal flushed, snapshot) at exit. A stop
    during the opening cancels it between aging steps or journal records (within a second),
    and a service that finished opening after the stop began is never reported ready."""
    service = app[keys.SERVICE]
    notify = app[keys.NOTIFY]
    stopping = False
    last_logged = [time.monotonic()]

    def progress(what: str, done: int, total: int) -> None:
        # at most one line a second, none for a start shorter than a second
        now = time.monotonic()
        if now - last_logged[0] >= 1.0:
            last_logged[0] = now
            log.info(what, extra={"done": done, "total": total, "percent": done * 100 // total})

    service.progress_log = progress

    async def open_service() -> None:
        try:
            await asyncio.to_thread(service.open)
        except OpenCancelled as exc:
            service.state = "stopping"
            log.info("start-up cancelled: %s", exc)
        except StateMismatch as exc:
            service.state, service.error = "failed", str(exc)
            log.error("cannot start: %s", exc)
            app[keys.STOP](EXIT_CONFIG)
        except RestoreError as exc:  # a rollback, a record that replays otherwise, ...
            service.state, service.error = "failed", str(exc)
            log.error("cannot restore the state: %s", exc)
            app[keys.STOP](EXIT_RESTORE)
        except (sqlite3.Error, OSError) as exc:  # read-only, permissions, I/O: the storage
            service.state, service.error = "failed", str(exc)
            log.error(
                "storage error in %s: %s",
                service.config.state_dir,
                exc,
                extra={"error": type(exc).__name__},
            )
            app[keys.STOP](EXIT_STORAGE)
        except Exception as exc:
            service.state, service.error = "failed", repr(exc)
            log.error("cannot restore the state: %s", exc, exc_info=exc)
            app[keys.STOP](EXIT_RESTORE)
        else:
            if not stopping:
                log.info("ready", extra=service.restore_info)
                notify("READY=1\nSTATUS=pool ready")

    task = asyncio.create_task(open_service(), name="open")
    yield
    stopping = True
    service.cancel_open.set()
    with contextlib.suppress(BaseException):
        await asyncio.shield(task)  # the thread stops at its next cancellation point
    await service.close()


async def _sweeper_ctx(app: web.Application) -> AsyncIterator[None]:
    """Close this app's idle connections (see daemon.connections)."""
    task = asyncio.create_task(app[keys.CONNECTIONS].sweeper(), name="sweeper")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _loop(
    name: str, interval: Callable[[], float], body: Callable[[], Awaitable[object]]
) -> None:
    while True:
        await asyncio.sleep(interval())
        try:
            await body()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background task %s failed", name)


async def _background_ctx(app: web.Application) -> AsyncIterator[None]:
    """Pool maintenance (growth and shrink), lease expiry, periodic snapshots, watchdog."""
    service = app[keys.SERVICE]
    config = app[keys.CONFIG]

    async def maybe_snapshot() -> None:
        if (
            service.ready
            and service.records_since_snapshot >= config["daemon.snapshot_min_records"]
        ):
            seq = await service.snapshot()
            log.info("snapshot written", extra={"seq": seq})

    tasks = [
        asyncio.create_task(
            _loop("maintain", lambda: config["daemon.maintain_interval"], service.maintain),
            name="maintain",
        ),
        asyncio.create_task(
            _loop(
                "leases", lambda: min(config["daemon.lease_ttl"] / 4, 1.0), service.expire_leases
            ),
            name="leases",
        ),
        asyncio.create_task(
            _loop("snapshot", lambda: config["daemon.snapshot_interval"], maybe_snapshot),
            name="snapshot",
        ),
    ]
    watchdog = systemd.watchdog_seconds()
    if watchdog:
        notify = app[keys.NOTIFY]

        async def ping() -> None:
            if service.state != "failed":
                notify("WATCHDOG=1")

        tasks.append(
            asyncio.create_task(_loop("watchdog", lambda: watchdog / 2, ping), name="watchdog")
        )
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def create_app(
    config: Config,
    *,
    service: Service | None = None,
    reset_state: bool = False,
    accept_rollback: bool = False,
    stop: Callable[[int], None] | None = None,
    notify: Callable[[str], bool] | None = None,
) -> web.Application:
    """The daemon's application. `stop(status)` is called when the daemon must exit (a fatal
    error or a failed restore); `notify` sends sd_notify states."""
    app = web.Application(
        client_max_size=config["daemon.body_limit"],
        middlewares=[request_middleware],
    )
    service = service or Service(config, reset_state=reset_state, accept_rollback=accept_rollback)
    app[keys.CONFIG] = config
    app[keys.SERVICE] = service
    app[keys.METRICS] = Metrics(service, __version__)
    limit = config["daemon.max_connections"] or default_limit(raise_fd_limit())
    app[keys.CONNECTIONS] = ConnectionGuard("api", limit, config["daemon.idle_timeout"])
    app[keys.GUARDS] = [app[keys.CONNECTIONS]]
    app[keys.METRICS].registry.register(GuardCollector(app[keys.GUARDS]))
    app[keys.OPENAPI] = _openapi_bytes()
    app[keys.STOP] = stop or (lambda status: None)
    app[keys.NOTIFY] = notify or (lambda state: False)
    service.on_fatal = lambda exc: app[keys.STOP](EXIT_FATAL)
    app.cleanup_ctx.append(_service_ctx)
    app.cleanup_ctx.append(_background_ctx)
    app.cleanup_ctx.append(_sweeper_ctx)
    app[UI_HISTORY] = UiHistory(service)
    app.cleanup_ctx.append(history_ctx)
    app.add_routes(routes)
    app.router.add_get("/metrics", app[keys.METRICS].exposition.handler)
    add_ui_routes(app)
    return app


def create_metrics_app(main: web.Application) -> web.Application:
    """The metrics-only listener's application: GET /metrics, /healthz and /readyz of the
    daemon `main` (same service, same registry), and the read-only page (daemon.ui: `/`,
    `/ui`, its files, /v1/ui/summary, /v1/memory-map, none naming a client), and nothing
    else — every other path is a 404 problem. This is what the shipped units and manifests
    expose over TCP; the API stays on the Unix socket. It owns no background task: `main` does."""
    app = web.Application(client_max_size=1024, middlewares=[request_middleware])
    app[keys.CONFIG] = main[keys.CONFIG]
    app[keys.SERVICE] = main[keys.SERVICE]
    app[keys.METRICS] = main[keys.METRICS]
    app[keys.CONNECTIONS] = ConnectionGuard(
        "metrics", METRICS_LIMIT, main[keys.CONFIG]["daemon.idle_timeout"]
    )
    main[keys.GUARDS].append(app[keys.CONNECTIONS])
    app.cleanup_ctx.append(_sweeper_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", main[keys.METRICS].exposition.handler)
    app[UI_HISTORY] = main[UI_HISTORY]
    app.router.add_get("/v1/memory-map", memory_map)
    add_ui_routes(app)
    return app
