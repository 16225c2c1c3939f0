"""sharedpoold configuration: embedded defaults, a TOML file, then command-line flags.

Every setting has one dotted key (``pool.max``), one place in the TOML file (``[pool]``,
``max = "1GiB"``) and, for most, one flag (``--pool-max``). Values are validated once,
at start, and a bad one is reported by its key: ``config error: pool.max: ...``.

Settings in the ``guest``, ``pool`` and ``faults`` sections decide the simulated machine
and the pool: the daemon stores them in its state directory and refuses to start on
that state with different ones (the journal could not be replayed on another machine),
unless ``--reset-state`` is given.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from pool.guest import options as guest_options
from pool.guest.units import MiB, format_size, parse_size
from pool.registry import DEFAULT_STRATEGY, STRATEGIES

__all__ = [
    "FIELDS",
    "Config",
    "ConfigError",
    "Field",
    "default_state_dir",
    "default_unix_socket",
    "load_config",
    "resolved_toml",
]


class ConfigError(ValueError):
    """A bad setting, named by its dotted key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


# ---- value parsers: (key, raw) -> value, raising ConfigError naming the key -----------------


def _size(key: str, raw: object) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise ConfigError(key, f"expected a size such as 64MiB or a number of bytes, got {raw!r}")
    try:
        return parse_size(raw)
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None


def _int(key: str, raw: object) -> int:
    if isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ConfigError(key, f"expected an integer, got {raw!r}")
    return raw


def _float(key: str, raw: object) -> float:
    if isinstance(raw, str):
        try:
            raw = float(raw)
        except ValueError:
            raise ConfigError(key, f"expected a number, got {raw!r}") from None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise ConfigError(key, f"expected a finite number, got {raw!r}")
    return float(raw)


def _bool(key: str, raw: object) -> bool:
    if isinstance(raw, str) and raw.lower() in (
        "1",
        "true",
        "yes",
        "on",
        "0",
        "false",
        "no",
        "off",
    ):
        return raw.lower() in ("1", "true", "yes", "on")
    if not isinstance(raw, bool):
        raise ConfigError(key, f"expected true or false, got {raw!r}")
    return raw


def _str(key: str, raw: object) -> str:
    if not isinstance(raw, str):
        raise ConfigError(key, f"expected a string, got {raw!r}")
    return raw


def _str_list(key: str, raw: object) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list | tuple) or not all(isinstance(x, str) for x in raw):
        raise ConfigError(key, f"expected a list of strings, got {raw!r}")
    return tuple(raw)


def _int_list(key: str, raw: object) -> tuple[int, ...]:
    if isinstance(raw, str):
        raw = [x for x in raw.replace(",", " ").split() if x]
    if not isinstance(raw, list | tuple):
        raise ConfigError(key, f"expected a list of integers, got {raw!r}")
    out = tuple(_int(key, x) for x in raw)
    if any(x <= 0 for x in out):
        raise ConfigError(key, "call indexes are 1-based: every entry must be >= 1")
    return out


def _choice(*choices: str) -> Callable[[str, object], str]:
    def parse(key: str, raw: object) -> str:
        if raw not in choices:
            raise ConfigError(key, f"expected one of {', '.join(choices)}, got {raw!r}")
        return str(raw)

    return parse


def _mode(key: str, raw: object) -> int:
    if isinstance(raw, str):
        try:
            raw = int(raw, 8)
        except ValueError:
            raise ConfigError(key, f"expected an octal mode such as 0660, got {raw!r}") from None
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= 0o777:
        raise ConfigError(key, f"expected an octal mode such as 0660, got {raw!r}")
    return raw


@attrs.frozen
class Field:
    """One setting: section.name, parser, default, its flag and help."""

    section: str
    name: str
    parse: Callable[[str, object], Any]
    default: Any
    help: str
    flag: str | None = None  # without the leading "--"; None: TOML only
    metavar: str | None = None
    secret: bool = False  # never printed

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"


FIELDS: tuple[Field, ...] = (
    # guest: the simulated machine (stored in the state directory)
    Field(
        "guest",
        "memory",
        _size,
        16 << 30,
        "guest RAM (a 3-4 GiB PCI hole is modeled)",
        "guest-memory",
        "SIZE",
    ),
    Field(
        "guest",
        "platform",
        _choice(*guest_options.PLATFORMS),
        "tdx",
        "CoCo platform",
        "platform",
        "{" + ",".join(guest_options.PLATFORMS) + "}",  # the one list of platforms
    ),
    Field("guest", "seed", _int, 1, "seed of the guest model (aging, boot splits)", "seed", "N"),
    Field(
        "guest",
        "age_steps",
        _int,
        200_000,
        "background churn steps before the pool is set up (default 200,000: about half a "
        "second on a 16 GiB guest, a moderately aged page allocator; compare uses 1,000,000)",
        "age-steps",
        "N",
    ),
    Field(
        "guest",
        "cost_profile",
        _str,
        "",
        "cost profile TOML (empty: the shipped defaults)",
        "cost-profile",
        "FILE",
    ),
    # pool: the strategy and its sizes (stored in the state directory)
    Field(
        "pool",
        "strategy",
        _choice(*STRATEGIES),
        DEFAULT_STRATEGY,
        "strategy served (pool = option 3, the SharedPool)",
        "strategy",
        "NAME",
    ),
    Field(
        "pool",
        "initial",
        _size,
        64 * MiB,
        "shared memory decrypted at start",
        "pool-initial",
        "SIZE",
    ),
    Field("pool", "max", _size, 1 << 30, "upper bound of the pool", "pool-max", "SIZE"),
    Field(
        "pool",
        "max_buffer",
        _size,
        64 * MiB,
        "largest buffer a client may request",
        "max-buffer",
        "SIZE",
    ),
    Field(
        "pool",
        "low_watermark",
        _size,
        24 * MiB,
        "grow in the background when free bytes fall below this",
        "low-watermark",
        "SIZE",
    ),
    Field(
        "pool",
        "high_watermark",
        _size,
        96 * MiB,
        "shrink (after the hysteresis) when free bytes stay above this",
        "high-watermark",
        "SIZE",
    ),
    Field("pool", "grow_step", _size, 32 * MiB, "bytes added by one growth", "grow-step", "SIZE"),
    Field(
        "pool",
        "shrink_hysteresis",
        _float,
        30.0,
        "seconds free bytes must stay above the high watermark before a shrink",
        "shrink-hysteresis",
        "SECONDS",
    ),
    Field(
        "pool",
        "boot_reserve",
        _size,
        0,
        "bytes reserved and decrypted at boot (pool-boot)",
        "boot-reserve",
        "SIZE",
    ),
    # faults: conversion failures injected into the simulated host (tests, issue 7)
    Field(
        "faults",
        "failure_rate",
        _float,
        0.0,
        "probability that a conversion call fails",
        "fail-rate",
        "P",
    ),
    Field(
        "faults",
        "fail_calls",
        _int_list,
        (),
        "1-based conversion calls that fail",
        "fail-calls",
        "N,N,...",
    ),
    Field(
        "faults",
        "direction",
        _choice("any", "to_shared", "to_private"),
        "any",
        "which conversions may fail",
        "fail-direction",
        "{any,to_shared,to_private}",
    ),
    Field(
        "faults",
        "retry_rate",
        _float,
        0.0,
        "probability that the host answers 'retry from X'",
        "retry-rate",
        "P",
    ),
    Field("faults", "seed", _int, 0, "seed of the fault injector", "fault-seed", "N"),
    # daemon: the service (may change between runs)
    Field(
        "daemon",
        "listen",
        _str_list,
        (),
        "API listeners: unix:PATH or tcp:HOST:PORT, repeatable (default: the Unix socket "
        "sharedpoold.sock in /run/sharedpoold for root, else in $XDG_RUNTIME_DIR/sharedpool, "
        "else in ~/.local/state/sharedpool; none when systemd passes sockets). A TCP API "
        "listener needs daemon.registration_secret or daemon.allow_anonymous_register",
        "listen",
        "ADDR",
    ),
    Field(
        "daemon",
        "metrics_listen",
        _str_list,
        (),
        "metrics-only listeners (GET /metrics, /healthz, /readyz and nothing else): "
        "unix:PATH or tcp:HOST:PORT, repeatable; the one to expose over TCP",
        "metrics-listen",
        "ADDR",
    ),
    Field(
        "daemon",
        "registration_secret",
        _str,
        "",
        "secret a client must present (Authorization: Bearer) to register over a TCP API "
        "listener (prefer registration_secret_file or $SHAREDPOOLD_REGISTRATION_SECRET)",
        None,
        secret=True,
    ),
    Field(
        "daemon",
        "registration_secret_file",
        _str,
        "",
        "file holding the registration secret",
        "registration-secret-file",
        "FILE",
    ),
    Field(
        "daemon",
        "allow_anonymous_register",
        _bool,
        False,
        "let anyone who reaches a TCP API listener register without the secret",
        "allow-anonymous-register",
        None,
    ),
    Field(
        "daemon",
        "socket_mode",
        _mode,
        0o660,
        "permissions of Unix sockets created",
        "socket-mode",
        "OCTAL",
    ),
    Field(
        "daemon",
        "state_dir",
        _str,
        "",
        "state directory (default $STATE_DIRECTORY, else /var/lib/sharedpoold for root, "
        "else $XDG_STATE_HOME/sharedpool, else ~/.local/state/sharedpool); owned by the "
        "daemon's uid and not writable by group or others",
        "state-dir",
        "DIR",
    ),
    Field(
        "daemon",
        "synchronous",
        _choice("full", "normal"),
        "full",
        "SQLite synchronous mode: full survives power loss, normal only process crashes",
        "synchronous",
        "{full,normal}",
    ),
    Field(
        "daemon",
        "snapshot_interval",
        _float,
        300.0,
        "seconds between snapshot checks (a snapshot compacts the journal)",
        "snapshot-interval",
        "SECONDS",
    ),
    Field(
        "daemon",
        "snapshot_min_records",
        _int,
        10_000,
        "journal records that make a periodic snapshot worth writing",
        None,
    ),
    Field(
        "daemon",
        "lease_ttl",
        _float,
        30.0,
        "seconds without a heartbeat after which a client expires and its buffers are reclaimed",
        "lease-ttl",
        "SECONDS",
    ),
    Field(
        "daemon",
        "maintain_interval",
        _float,
        0.5,
        "seconds between pool maintenance passes (background growth and shrink)",
        "maintain-interval",
        "SECONDS",
    ),
    Field(
        "daemon",
        "admin_token",
        _str,
        "",
        "admin bearer token (prefer admin_token_file or $SHAREDPOOLD_ADMIN_TOKEN: flags "
        "are visible in ps)",
        "admin-token",
        "TOKEN",
        secret=True,
    ),
    Field(
        "daemon",
        "admin_token_file",
        _str,
        "",
        "file holding the admin token",
        "admin-token-file",
        "FILE",
    ),
    Field(
        "daemon",
        "admin_unix_peer",
        _bool,
        True,
        "a Unix-socket peer with the daemon's own uid is admin",
        None,
    ),
    Field(
        "daemon",
        "body_limit",
        _int,
        64 * 1024,
        "largest request body in bytes",
        "body-limit",
        "BYTES",
    ),
    Field(
        "daemon",
        "max_clients",
        _int,
        1024,
        "registered clients at most (503 max_clients beyond)",
        "max-clients",
        "N",
    ),
    Field(
        "daemon",
        "client_max_buffers",
        _int,
        4096,
        "live buffers one client may hold (429 client_buffers beyond; a vNIC holds ~70)",
        "client-max-buffers",
        "N",
    ),
    Field(
        "daemon",
        "client_max_bytes",
        _size,
        0,
        "bytes of live buffers one client may hold (429 client_bytes beyond; 0: half of "
        "pool.max, so that no client can take the whole pool)",
        "client-max-bytes",
        "SIZE",
    ),
    Field(
        "daemon",
        "max_connections",
        _int,
        0,
        "API connections admitted at once (0: sized to the descriptor limit, which is raised "
        "from soft to hard at start); one more is answered 503 and closed at once",
        "max-connections",
        "N",
    ),
    Field(
        "daemon",
        "idle_timeout",
        _float,
        10.0,
        "seconds a connection may stay without a request in flight (after connecting or "
        "after its last answer) before it is closed: keep-alive idle and header timeout",
        "idle-timeout",
        "SECONDS",
    ),
    Field(
        "daemon",
        "body_timeout",
        _float,
        10.0,
        "seconds to receive a request body once its headers arrived (408 after)",
        "body-timeout",
        "SECONDS",
    ),
    Field(
        "daemon",
        "shutdown_timeout",
        _float,
        10.0,
        "seconds to let requests in flight finish on SIGTERM",
        None,
    ),
    Field("daemon", "json_logs", _bool, False, "log JSON lines", "json-logs", None),
    Field(
        "daemon",
        "log_level",
        _choice("debug", "info", "warning", "error"),
        "info",
        "log level",
        "log-level",
        "LEVEL",
    ),
    Field("daemon", "access_log", _bool, False, "log every request", "access-log", None),
    Field(
        "daemon",
        "no_cache",
        _bool,
        False,
        "age the guest at start-up even when the aged-guest cache "
        "($XDG_CACHE_HOME/sharedpool/aged, pool.aged_cache) holds it",
        "no-cache",
        None,
    ),
)

_BY_KEY = {f.key: f for f in FIELDS}
SECTIONS = ("guest", "pool", "faults", "daemon")
STATE_SECTIONS = ("guest", "pool", "faults")  # what the journal depends on


def _user_state_home(env: Mapping[str, str]) -> Path:
    if env.get("XDG_STATE_HOME"):
        return Path(env["XDG_STATE_HOME"]) / "sharedpool"
    return Path.home() / ".local" / "state" / "sharedpool"


def default_state_dir(env: Mapping[str, str] | None = None, uid: int | None = None) -> Path:
    """Where the state lives when daemon.state_dir is empty: systemd's $STATE_DIRECTORY,
    /var/lib/sharedpoold for root, else the XDG state home. Never the working directory
    (a daemon started elsewhere would silently begin with an empty state)."""
    env = os.environ if env is None else env
    uid = os.getuid() if uid is None else uid
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0]).absolute()
    if uid == 0:
        return Path("/var/lib/sharedpoold")
    return _user_state_home(env).absolute()


def default_unix_socket(env: Mapping[str, str] | None = None, uid: int | None = None) -> str:
    """The API socket when no listener is configured, and the clients' default:
    systemd's $RUNTIME_DIRECTORY, /run/sharedpoold for root, $XDG_RUNTIME_DIR/sharedpool,
    else the XDG state home (a runtime directory is not always there: su, containers)."""
    env = os.environ if env is None else env
    uid = os.getuid() if uid is None else uid
    if env.get("RUNTIME_DIRECTORY"):
        base = Path(env["RUNTIME_DIRECTORY"].split(":")[0])
    elif uid == 0:
        base = Path("/run/sharedpoold")
    elif env.get("XDG_RUNTIME_DIR"):
        base = Path(env["XDG_RUNTIME_DIR"]) / "sharedpool"
    else:
        base = _user_state_home(env)
    return str((base / "sharedpoold.sock").absolute())


def _absolute_listen(addr: str) -> str:
    kind, rest = addr.split(":", 1)
    return f"unix:{Path(rest).absolute()}" if kind == "unix" else addr


@attrs.frozen
class Config:
    """Validated settings, by dotted key. Read them with ``config["pool.max"]`` or the
    properties below."""

    values: Mapping[str, Any]
    source: str = "<defaults>"

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def section(self, name: str) -> dict[str, Any]:
        return {f.name: self.values[f.key] for f in FIELDS if f.section == name}

    def state_config(self) -> dict[str, Any]:
        """The settings the persisted state depends on, JSON-ready (sorted keys)."""
        out: dict[str, Any] = {}
        for f in FIELDS:
            if f.section in STATE_SECTIONS:
                v = self.values[f.key]
                out[f.key] = list(v) if isinstance(v, tuple) else v
        if out["guest.cost_profile"]:
            # the profile's content, not its path, decides the modeled times
            try:
                out["guest.cost_profile"] = Path(out["guest.cost_profile"]).read_text()
            except OSError as exc:
                raise ConfigError("guest.cost_profile", str(exc)) from None
        return dict(sorted(out.items()))

    @property
    def state_dir(self) -> Path:
        """Always absolute: a relative --state-dir is resolved once, against the directory
        the daemon was started from, so logs and --check-config name the real place."""
        configured = self.values["daemon.state_dir"]
        return Path(configured).absolute() if configured else default_state_dir()

    @property
    def listen(self) -> tuple[str, ...]:
        """API listeners, Unix paths made absolute."""
        return tuple(_absolute_listen(a) for a in self.values["daemon.listen"])

    @property
    def metrics_listen(self) -> tuple[str, ...]:
        """Metrics-only listeners, Unix paths made absolute."""
        return tuple(_absolute_listen(a) for a in self.values["daemon.metrics_listen"])

    @property
    def client_max_bytes(self) -> int:
        """daemon.client_max_bytes, 0 resolved to half of pool.max."""
        return int(self.values["daemon.client_max_bytes"] or self.values["pool.max"] // 2)

    @property
    def registration_secret(self) -> str:
        return str(self.values["daemon.registration_secret"])

    @property
    def admin_token(self) -> str:
        return str(self.values["daemon.admin_token"])

    def redacted(self) -> dict[str, Any]:
        """For logs and --print-config: secrets replaced."""
        out: dict[str, Any] = {}
        for f in FIELDS:
            v = self.values[f.key]
            out[f.key] = ("<set>" if v else "") if f.secret else v
        return out

    def with_values(self, **changes: Any) -> Config:
        """A copy with some keys changed (keys with '__' for '.': pool__max=...)."""
        values = dict(self.values)
        raw = {k.replace("__", "."): v for k, v in changes.items()}
        for key, value in raw.items():
            if key not in _BY_KEY:
                raise ConfigError(key, "unknown setting")
            values[key] = _BY_KEY[key].parse(key, value)
        return _validate(Config(values, self.source))


def _validate(config: Config) -> Config:
    v = config.values
    for key in ("guest.seed", "guest.age_steps", "faults.seed", "daemon.snapshot_min_records"):
        if v[key] < 0:
            raise ConfigError(key, "must be >= 0")
    mem = v["guest.memory"]
    try:  # the same rules and messages as every command line's --guest-memory
        guest_options.guest_memory(mem)
        guest_options.check_aging(mem, v["guest.age_steps"])
    except ValueError as exc:
        raise ConfigError("guest.memory", str(exc)) from None
    if v["guest.cost_profile"] and not Path(v["guest.cost_profile"]).is_file():
        raise ConfigError("guest.cost_profile", f"no such file: {v['guest.cost_profile']}")
    if v["pool.max"] > mem:
        raise ConfigError("pool.max", "larger than guest.memory")
    if v["pool.initial"] > v["pool.max"]:
        raise ConfigError("pool.initial", "larger than pool.max")
    if v["pool.low_watermark"] > v["pool.high_watermark"]:
        raise ConfigError("pool.low_watermark", "larger than pool.high_watermark")
    if v["pool.grow_step"] <= 0:
        raise ConfigError("pool.grow_step", "must be > 0")
    if v["pool.shrink_hysteresis"] < 0:
        raise ConfigError("pool.shrink_hysteresis", "must be >= 0")
    for key in ("faults.failure_rate", "faults.retry_rate"):
        if not 0.0 <= v[key] <= 1.0:
            raise ConfigError(key, "must be within [0, 1]")
    for key in ("daemon.max_clients", "daemon.client_max_buffers"):
        if v[key] < 1:
            raise ConfigError(key, "must be >= 1")
    if v["daemon.max_connections"] < 0:
        raise ConfigError("daemon.max_connections", "must be >= 0 (0: sized to the fd limit)")
    for key in (
        "daemon.lease_ttl",
        "daemon.maintain_interval",
        "daemon.snapshot_interval",
        "daemon.idle_timeout",
        "daemon.body_timeout",
    ):
        if v[key] <= 0:
            raise ConfigError(key, "must be > 0")
    if v["daemon.shutdown_timeout"] < 0:
        raise ConfigError("daemon.shutdown_timeout", "must be >= 0")
    if not 256 <= v["daemon.body_limit"] <= 16 * MiB:
        raise ConfigError("daemon.body_limit", "must be within [256, 16777216] bytes")
    if not 0 < v["pool.max_buffer"] <= v["pool.max"]:
        raise ConfigError("pool.max_buffer", "must be > 0 and at most pool.max")
    for key in ("daemon.listen", "daemon.metrics_listen"):
        for addr in v[key]:
            try:
                parse_listen(addr)
            except ValueError as exc:
                raise ConfigError(key, str(exc)) from None
    secret = v["daemon.registration_secret"]
    if secret and len(secret) < 16:
        raise ConfigError("daemon.registration_secret", "must be at least 16 characters")
    tcp_api = [a for a in v["daemon.listen"] if a.startswith("tcp:")]
    if tcp_api and not secret and not v["daemon.allow_anonymous_register"]:
        raise ConfigError(
            "daemon.listen",
            f"{tcp_api[0]} is a TCP API listener: anyone who reaches it could register and "
            "allocate; set daemon.registration_secret (or registration_secret_file), set "
            "daemon.allow_anonymous_register = true, or expose TCP with --metrics-listen only",
        )
    token = v["daemon.admin_token"]
    if token and len(token) < 16:
        raise ConfigError("daemon.admin_token", "must be at least 16 characters")
    return config


def parse_listen(addr: str) -> tuple[str, str, int]:
    """'unix:/path' -> ('unix', '/path', 0); 'tcp:HOST:PORT' -> ('tcp', HOST, PORT)."""
    kind, _, rest = addr.partition(":")
    if kind == "unix" and rest:
        return "unix", rest, 0
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and 0 <= int(port) <= 65535:
            return "tcp", host, int(port)
    raise ValueError(f"not a listener address: {addr!r} (expected unix:PATH or tcp:HOST:PORT)")


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Defaults, then the TOML file at `path`, then `overrides` (dotted keys, e.g. from flags),
    then the admin token from the environment or a file. Raises ConfigError."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {f.key: f.default for f in FIELDS}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError("--config", f"{path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{path}: not valid TOML: {exc}") from None
        for section, table in data.items():
            if section not in SECTIONS:
                raise ConfigError(section, f"unknown section (expected {', '.join(SECTIONS)})")
            if not isinstance(table, dict):
                raise ConfigError(section, "must be a table")
            for name, raw in table.items():
                key = f"{section}.{name}"
                if key not in _BY_KEY:
                    raise ConfigError(key, "unknown setting")
                values[key] = _BY_KEY[key].parse(key, raw)
    for key, raw in (overrides or {}).items():
        if key not in _BY_KEY:
            raise ConfigError(key, "unknown setting")
        values[key] = _BY_KEY[key].parse(key, raw)
    if not values["daemon.registration_secret"] and env.get("SHAREDPOOLD_REGISTRATION_SECRET"):
        values["daemon.registration_secret"] = env["SHAREDPOOLD_REGISTRATION_SECRET"]
    if not values["daemon.registration_secret"] and values["daemon.registration_secret_file"]:
        try:
            values["daemon.registration_secret"] = (
                Path(values["daemon.registration_secret_file"]).read_text().strip()
            )
        except OSError as exc:
            raise ConfigError("daemon.registration_secret_file", str(exc.strerror or exc)) from None
    if not values["daemon.admin_token"] and env.get("SHAREDPOOLD_ADMIN_TOKEN"):
        values["daemon.admin_token"] = env["SHAREDPOOLD_ADMIN_TOKEN"]
    if not values["daemon.admin_token"] and values["daemon.admin_token_file"]:
        try:
            values["daemon.admin_token"] = (
                Path(values["daemon.admin_token_file"]).read_text().strip()
            )
        except OSError as exc:
            raise ConfigError("daemon.admin_token_file", str(exc.strerror or exc)) from None
    return _validate(Config(values, source))


def example_toml() -> str:
    """The embedded defaults as a commented TOML file (sharedpoold --print-default-config)."""
    lines = ["# sharedpoold configuration (the embedded defaults)"]
    for section in SECTIONS:
        lines.append(f"\n[{section}]")
        for f in FIELDS:
            if f.section != section:
                continue
            lines.append(f"# {f.help}")
            lines.append(f"{f.name} = {toml_value(f, f.default)}")
    return "\n".join(lines) + "\n"


def resolved_toml(config: Config, listen: Sequence[str] = ()) -> str:
    """The configuration as it will run, as TOML that parses back (and can be used as
    --config): every setting, paths absolute, the listeners the daemon will bind
    (`listen`: the resolved API listeners, e.g. the default socket), sizes as 16GiB,
    modes as 0660. Secrets are never printed: only a comment saying whether one is set."""
    values = dict(config.values)
    values["daemon.state_dir"] = str(config.state_dir)
    values["daemon.listen"] = tuple(listen) if listen else config.listen
    values["daemon.metrics_listen"] = config.metrics_listen
    lines = [f"# sharedpoold configuration as resolved (source: {config.source})"]
    for section in SECTIONS:
        lines.append(f"\n[{section}]")
        for f in FIELDS:
            if f.section != section:
                continue
            if f.secret:
                lines.append(f"# {f.name}: {'set' if values[f.key] else 'not set'} (never printed)")
                continue
            lines.append(f"{f.name} = {toml_value(f, values[f.key])}")
    return "\n".join(lines) + "\n"


def show_value(f: Field, value: Any) -> str:
    """A value as an operator reads it: sizes as 16GiB, modes as 0660, lists comma-joined."""
    if f.parse is _size:
        return format_size(value) if value else "0"
    if f.parse is _mode:
        return f"{value:04o}"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if value != "" else "none"


def toml_value(f: Field, v: Any) -> str:
    """One value in TOML syntax (strings JSON-quoted: TOML basic strings share its escapes)."""
    if f.parse is _size:
        return f'"{format_size(v)}"' if v else "0"
    if f.parse is _mode:
        return f'"{v:04o}"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, Sequence):
        return "[" + ", ".join(json.dumps(x) for x in v) + "]"
    return repr(v)
