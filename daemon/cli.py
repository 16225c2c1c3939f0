"""sharedpoold: the command line and the server's life cycle.

Start: validate the configuration (exit 2 naming the bad key), check that the state
directory was made with the same guest/pool settings (exit 2 otherwise), bind the
listeners (systemd's, else --listen, else the default Unix socket), serve /healthz at once
and the API once the pool is built or restored (READY=1 then).
Stop (SIGTERM, SIGINT): STOPPING=1, stop accepting, let requests in flight finish (up to
daemon.shutdown_timeout), flush the journal, write a snapshot, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sqlite3
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from daemon import keys, logs, systemd
from daemon.app import EXIT_CONFIG, EXIT_STORAGE, create_app, create_metrics_app
from daemon.config import (
    FIELDS,
    Config,
    ConfigError,
    default_unix_socket,
    example_toml,
    load_config,
    parse_listen,
    resolved_toml,
    show_value,
)
from daemon.connections import GuardedSite, rate_limited_exception_handler
from daemon.engine import StateMismatch
from daemon.journal import Journal
from daemon.state import check_state_config
from daemon.statedir import StateDirError, lock_state_dir
from pool import __version__, userwarnings
from pool.closedpipe import quiet_on_closed_stdout
from pool.strictargs import StrictParser

log = logging.getLogger("sharedpoold")

EPILOG = """\
configuration: embedded defaults, then --config FILE (TOML with [guest], [pool], [faults]
and [daemon] tables; see --print-default-config), then flags. The admin token may also
come from $SHAREDPOOLD_ADMIN_TOKEN or daemon.admin_token_file.

The guest/pool/fault settings are stored in the state directory: starting on existing
state with other ones is refused unless --reset-state discards that state.

Exposure: the API (register, allocate, free) belongs on the Unix socket; expose TCP with
--metrics-listen (GET /metrics, /healthz, /readyz and nothing else). A TCP API listener
needs a registration secret (daemon.registration_secret_file) or an explicit
--allow-anonymous-register. With systemd socket activation, sockets named "metrics"
(FileDescriptorName=metrics) are metrics-only.

The state directory must be owned by the daemon's uid and not writable by group or
others; one daemon per state directory (a lock held for the daemon's life).

signals: SIGTERM and SIGINT stop after a drain; SIGHUP re-reads the configuration and
applies the log level and the quotas (other changes are logged as needing a restart); SIGUSR1 and
SIGUSR2 are ignored (logged).

exit status: 0 after a clean stop (SIGTERM/SIGINT), 1 on a fatal error, 2 on a
configuration error (or a state directory in use or not safe), 3 when the state cannot
be restored (a journal behind what was acknowledged included: see --accept-rollback), 4 on
a storage error (read-only, permissions, I/O). A full disk is not an exit: the daemon
serves reads, refuses changes (503 storage-full) and resumes when space returns.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = StrictParser(
        prog="sharedpoold",
        description="The sharedpool daemon: one pre-decrypted shared-buffer pool over a "
        "simulated confidential guest, served over a Unix socket (and optionally "
        "TCP) as a JSON API with Prometheus metrics.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sharedpoold {__version__}")
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument(
        "--reset-state",
        action="store_true",
        help="discard the state directory's journal and snapshot first",
    )
    parser.add_argument(
        "--accept-rollback",
        action="store_true",
        help="start even when the journal is behind or other than what was acknowledged "
        "(a lost or damaged WAL): the loss is logged, and accepted",
    )
    parser.add_argument(
        "--print-default-config",
        action="store_true",
        help="print the embedded defaults as TOML and exit",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, print it as it will run (TOML that parses back: "
        "resolved listeners and absolute paths; secrets never printed) and exit",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in FIELDS:
        if f.flag is None:
            continue
        group = groups.setdefault(f.section, parser.add_argument_group(f"[{f.section}]"))
        dest = f.key.replace(".", "__")
        default_text = "" if f.secret else f" (default: {show_value(f, f.default)})"
        if f.metavar is None:  # a boolean switch
            group.add_argument(
                f"--{f.flag}",
                dest=dest,
                action="store_const",
                const=True,
                default=None,
                help=f"{f.help} [{f.key}]",
            )
        elif f.key in ("daemon.listen", "daemon.metrics_listen"):
            group.add_argument(
                f"--{f.flag}",
                dest=dest,
                action="append",
                metavar=f.metavar,
                default=None,
                help=f"{f.help} [{f.key}]",
            )
        else:
            group.add_argument(
                f"--{f.flag}",
                dest=dest,
                metavar=f.metavar,
                default=None,
                help=f"{f.help}{default_text} [{f.key}]",
            )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {
        f.key: getattr(args, f.key.replace(".", "__"))
        for f in FIELDS
        if f.flag is not None and getattr(args, f.key.replace(".", "__")) is not None
    }
    return load_config(args.config, overrides)


def check_state(config: Config) -> None:
    """Refuse other guest/pool settings on existing state, before binding anything."""
    db = config.state_dir / "sharedpoold.db"
    if not db.exists():
        return
    journal = Journal(db, config["daemon.synchronous"])
    try:
        stored = journal.get_meta("state_config")
    finally:
        journal.close()
    check_state_config(config.state_dir, stored, config)


def _unix_listener(path: str, mode: int) -> socket.socket:
    """Bind a Unix socket at `path` with `mode`, replacing a stale socket file (one nobody
    listens on) but never a live one or another kind of file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    if p.exists() or p.is_symlink():
        if not stat.S_ISSOCK(p.lstat().st_mode):
            raise OSError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            p.unlink()  # stale
        else:
            raise OSError(f"{path}: another daemon is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)  # no window with looser permissions
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, mode)
    return sock


def _bind(addr: str, mode: int, created: list[str]) -> socket.socket:
    kind, host, port = parse_listen(addr)
    if kind == "unix":
        sock = _unix_listener(host, mode)
        created.append(host)
        return sock
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=256)


def _describe(sockname: Any) -> str:
    if isinstance(sockname, tuple):
        host = sockname[0]
        return f"tcp:{'[' + host + ']' if ':' in host else host}:{sockname[1]}"
    return f"unix:{sockname.decode() if isinstance(sockname, bytes) else sockname}"


def api_listeners(config: Config) -> tuple[str, ...]:
    """The API listeners the daemon binds when systemd passes none."""
    return config.listen or (f"unix:{default_unix_socket()}",)


def _is_tcp(sock: socket.socket) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6)


RELOADABLE = (
    "daemon.log_level",
    "daemon.max_clients",
    "daemon.client_max_buffers",
    "daemon.client_max_bytes",
)


def reload_config(
    current: Config, reread: Callable[[], Config], apply: Callable[[Config], None]
) -> Config:
    """SIGHUP: read the configuration again and apply what can change while running (the
    log level, the quotas: `apply`); every other difference is logged as needing a
    restart. A bad file is logged and changes nothing."""
    try:
        new = reread()
    except ConfigError as exc:
        log.warning("SIGHUP: configuration not reloaded: %s", exc)
        return current
    applied: list[str] = []
    pending: list[str] = []
    for key in sorted(new.values):
        if new[key] != current[key]:
            (applied if key in RELOADABLE else pending).append(key)
    # said before the level changes, so that it is logged at the old level too
    log.info("SIGHUP: configuration reloaded", extra={"applied": applied, "needs_restart": pending})
    if "daemon.log_level" in applied:
        logging.getLogger().setLevel(new["daemon.log_level"].upper())
    updated = current.with_values(**{k.replace(".", "__"): new[k] for k in applied})
    apply(updated)
    return updated


async def serve(
    config: Config,
    *,
    reset_state: bool = False,
    accept_rollback: bool = False,
    reread: Callable[[], Config] | None = None,
) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    status = {"code": 0}

    def stop(code: int) -> None:
        if not stopping.is_set():
            status["code"] = code
            stopping.set()

    app = create_app(
        config,
        reset_state=reset_state,
        accept_rollback=accept_rollback,
        stop=stop,
        notify=systemd.notify,
    )
    access_log = logging.getLogger("aiohttp.access") if config["daemon.access_log"] else None
    # idle keep-alive connections close with the idle/header timeout (aiohttp: 1 hour)
    idle = config["daemon.idle_timeout"]
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=access_log,
        shutdown_timeout=config["daemon.shutdown_timeout"],
        keepalive_timeout=idle,
    )
    metrics_app = create_metrics_app(app)
    metrics_runner = web.AppRunner(
        metrics_app,
        handle_signals=False,
        access_log=access_log,
        shutdown_timeout=1,
        keepalive_timeout=idle,
    )
    loop.set_exception_handler(rate_limited_exception_handler())
    passed = systemd.listen_fds_with_names()
    api_socks = [sock for name, sock in passed if name != "metrics"]
    metrics_socks = [sock for name, sock in passed if name == "metrics"]
    created: list[str] = []
    try:
        if not passed:
            mode = config["daemon.socket_mode"]
            api_socks = [_bind(a, mode, created) for a in api_listeners(config)]
            metrics_socks = [_bind(a, mode, created) for a in config.metrics_listen]
        if (
            any(_is_tcp(s) for s in api_socks)
            and not config.registration_secret
            and not config["daemon.allow_anonymous_register"]
        ):
            raise OSError(
                "systemd passed a TCP socket for the API, which needs "
                "daemon.registration_secret or daemon.allow_anonymous_register (name it "
                "FileDescriptorName=metrics to make it metrics-only)"
            )
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        for sock in api_socks + metrics_socks:
            sock.close()
        for path in created:
            with contextlib.suppress(OSError):
                os.unlink(path)
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, 0)
    live = [config]

    def hup() -> None:
        live[0] = reload_config(
            live[0], reread or (lambda: live[0]), app[keys.SERVICE].apply_limits
        )

    loop.add_signal_handler(signal.SIGHUP, hup)

    # SIGUSR1/SIGUSR2 would kill the process without a drain: ignored, and said so
    def ignored(sig: signal.Signals) -> None:
        log.info("%s ignored", sig.name)

    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        loop.add_signal_handler(sig, ignored, sig)
    await runner.setup()
    await metrics_runner.setup()
    for sock in api_socks:
        await GuardedSite(runner, sock, app[keys.CONNECTIONS]).start()
    for sock in metrics_socks:
        await GuardedSite(metrics_runner, sock, metrics_app[keys.CONNECTIONS]).start()
    bound = [_describe(s) for s in runner.addresses]
    metrics_bound = [_describe(s) for s in metrics_runner.addresses]
    log.info(
        "listening",
        extra={
            "listeners": bound,
            "metrics_listeners": metrics_bound,
            "state_dir": str(config.state_dir),
            "pid": os.getpid(),
        },
    )
    if not config["daemon.json_logs"]:
        # a line for scripts and tests that asked for port 0 (in JSON mode: the record above)
        shown = " ".join(bound + [f"metrics={m}" for m in metrics_bound])
        print(f"sharedpoold listening on {shown}", file=sys.stderr, flush=True)
    await stopping.wait()
    systemd.notify("STOPPING=1")
    log.info("stopping", extra={"status": status["code"]})
    try:
        await metrics_runner.cleanup()
        await runner.cleanup()
    except Exception:
        log.exception("error while stopping")
        status["code"] = status["code"] or 1
    for path in created:
        with contextlib.suppress(OSError):
            os.unlink(path)
    log.info("stopped", extra={"status": status["code"]})
    return status["code"]


@quiet_on_closed_stdout
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.print_default_config:
        print(example_toml(), end="")
        return 0
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"sharedpoold: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print(resolved_toml(config, api_listeners(config)), end="")
        return 0
    logs.setup(config["daemon.json_logs"], config["daemon.log_level"], config["daemon.access_log"])
    userwarnings.install("sharedpoold", logging.getLogger("sharedpoold"))
    try:
        lock = lock_state_dir(config.state_dir)  # held until the process exits
    except StateDirError as exc:
        print(f"sharedpoold: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if not args.reset_state:
            try:
                check_state(config)
            except StateMismatch as exc:
                print(f"sharedpoold: {exc}", file=sys.stderr)
                return EXIT_CONFIG
            except (sqlite3.Error, OSError) as exc:
                print(f"sharedpoold: storage error in {config.state_dir}: {exc}", file=sys.stderr)
                return EXIT_STORAGE
            except Exception as exc:
                print(
                    f"sharedpoold: cannot read the state in {config.state_dir}: {exc}",
                    file=sys.stderr,
                )
                return 3
        try:
            return asyncio.run(
                serve(
                    config,
                    reset_state=args.reset_state,
                    accept_rollback=args.accept_rollback,
                    reread=lambda: config_from_args(args),
                )
            )
        except KeyboardInterrupt:
            return 130
    finally:
        lock.release()


if __name__ == "__main__":
    sys.exit(main())
