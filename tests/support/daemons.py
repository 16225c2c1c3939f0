"""Helpers for the daemon tests (no tests here): small configurations, an in-process app
on a real loopback socket, a spawned sharedpoold, and a small JSON-schema checker for the
OpenAPI document's schemas."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from daemon.app import create_app
from daemon.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "admin-token-0123456789abcdef"

# A small, quick guest: builds in ~0.1 s.
SMALL: dict[str, Any] = {
    "guest.memory": "512MiB",
    "guest.age_steps": 0,  # pristine: the tests need the pool to grow predictably
    "pool.initial": "8MiB",
    "pool.max": "64MiB",
    "pool.max_buffer": "32MiB",
    "pool.low_watermark": "2MiB",
    "pool.high_watermark": "16MiB",
    "pool.grow_step": "4MiB",
    "daemon.synchronous": "normal",
    "daemon.admin_token": ADMIN_TOKEN,
    # one client may use the whole small pool (the pool-exhaustion tests); quotas are
    # tested on their own
    "daemon.client_max_bytes": "1GiB",
}


def small_config(state_dir: Path, **overrides: Any) -> Config:
    values = dict(SMALL)
    values["daemon.state_dir"] = str(state_dir)
    # the in-process app is served on a loopback TCP socket (TestServer)
    values["daemon.allow_anonymous_register"] = True
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(None, values, env={})


async def wait_ready(client: TestClient, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = await client.get("/readyz")
        if resp.status == 200:
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("daemon not ready")


@asynccontextmanager
async def running_app(config: Config, ready: bool = True, **kwargs: Any) -> Any:
    """The daemon app served by aiohttp's TestServer on 127.0.0.1 (a real TCP socket)."""
    app = create_app(config, **kwargs)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        if ready:
            await wait_ready(client)
        yield client
    finally:
        await client.close()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def register(client: TestClient, name: str = "c") -> tuple[str, str]:
    resp = await client.post("/v1/clients", json={"name": name})
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    return body["client_id"], body["token"]


DAEMON_CLI = [sys.executable, "-m", "daemon.cli"]


def run_cli(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`sharedpoold ARGS` to completion (the checkout's code), its output captured."""
    return subprocess.run(
        [*DAEMON_CLI, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


# ---- a spawned daemon --------------------------------------------------------------------

# the text line, or (--json-logs) the "listening" record's listeners
_LISTEN_LINE = re.compile(
    r'sharedpoold listening on (.*)|"msg": "listening", "listeners": (\[[^\]]*\])'
)


class Daemon:
    """sharedpoold as a subprocess on a temporary Unix socket and 127.0.0.1:0."""

    def __init__(
        self, tmp: Path, *args: str, env: dict[str, str] | None = None, tcp: bool = True
    ) -> None:
        self.tmp = tmp
        self.sock = tmp / "run" / "sharedpoold.sock"
        self.state = tmp / "state"
        self.log = tmp / f"daemon-{time.monotonic_ns()}.log"
        cmd = [
            sys.executable,
            "-m",
            "daemon.cli",
            "--state-dir",
            str(self.state),
            "--listen",
            f"unix:{self.sock}",
        ]
        if tcp:
            cmd += ["--listen", "tcp:127.0.0.1:0", "--allow-anonymous-register"]
        for key, value in SMALL.items():
            if key == "daemon.admin_token":
                continue
            cmd += [f"--{_flag(key)}", str(value)]
        cmd += list(args)
        full_env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "SHAREDPOOLD_ADMIN_TOKEN": ADMIN_TOKEN,
            **(env or {}),
        }
        self._logf = open(self.log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            cwd=tmp,
            env=full_env,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.tcp_url: str | None = None

    @property
    def unix_url(self) -> str:
        return f"unix:{self.sock}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics_url(self) -> str:
        """The metrics-only listener's URL, from the text listening line."""
        m = re.search(r"metrics=tcp:(127\.0\.0\.1:\d+)", self.output())
        assert m, self.output()
        return f"http://{m.group(1)}"

    def wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = _LISTEN_LINE.search(self.output())
            if m:
                addrs = m.group(1).split() if m.group(1) else json.loads(m.group(2))
                for addr in addrs:
                    if addr.startswith("tcp:"):
                        self.tcp_url = "http://" + addr[4:]
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.02)
        raise TimeoutError(f"daemon did not listen:\n{self.output()}")

    async def wait_ready(self, timeout: float = 20.0) -> None:
        from daemon.client import SharedPoolClient

        self.wait_listening(timeout)
        deadline = time.monotonic() + timeout
        async with SharedPoolClient(self.unix_url, register=False) as c:
            while time.monotonic() < deadline:
                if await c.ready():
                    return
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.output()}")
                await asyncio.sleep(0.02)
        raise TimeoutError("daemon not ready")

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def kill_all(self) -> None:
        """SIGKILL the daemon and its journal writer at once, as systemd's
        KillMode=control-group or a power loss would (the WAL is left as it was)."""
        os.killpg(self.proc.pid, signal.SIGKILL)

    def wait(self, timeout: float = 20.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._logf.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait(10)
        self._logf.close()


def process_gone(pid: int) -> bool:
    """Whether process `pid` has exited (gone, or a zombie its parent has not reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """process_gone(pid) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not process_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def journal_writer(pid: int) -> int:
    """The daemon's journal writer process (a child of one of its threads)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"journal_writer" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    raise AssertionError("no journal writer")


def _flag(key: str) -> str:
    from daemon.config import FIELDS

    for f in FIELDS:
        if f.key == key and f.flag:
            return f.flag
    raise KeyError(key)


# ---- a small JSON Schema (2020-12 subset) checker for the OpenAPI document ---------------


def load_openapi() -> dict[str, Any]:
    return json.loads((ROOT / "daemon" / "openapi.json").read_text())


def validate(instance: Any, schema: dict[str, Any], doc: dict[str, Any], path: str = "$") -> None:
    """Raise AssertionError where `instance` does not conform. Supports the keywords the
    document uses: $ref, type, properties, required, additionalProperties, items, enum,
    minimum, maximum, minItems, maxItems, maxLength, pattern."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        validate(instance, doc["components"]["schemas"][name], doc, path)
        return
    t = schema.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        ok = any(_is_type(instance, x) for x in types)
        assert ok, f"{path}: {instance!r:.80} is not {t}"
    if "enum" in schema:
        assert instance in schema["enum"], f"{path}: {instance!r} not in {schema['enum']}"
    if isinstance(instance, int | float) and not isinstance(instance, bool):
        if "minimum" in schema:
            assert instance >= schema["minimum"], f"{path}: {instance} < {schema['minimum']}"
        if "maximum" in schema:
            assert instance <= schema["maximum"], f"{path}: {instance} > {schema['maximum']}"
    if isinstance(instance, str):
        if "maxLength" in schema:
            assert len(instance) <= schema["maxLength"], f"{path}: too long"
        if "pattern" in schema:
            assert re.search(schema["pattern"], instance), f"{path}: {instance!r} !~ pattern"
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            assert name in instance, f"{path}: missing {name!r}"
        extra = schema.get("additionalProperties", True)
        for key, value in instance.items():
            if key in props:
                validate(value, props[key], doc, f"{path}.{key}")
            elif extra is False:
                raise AssertionError(f"{path}: unexpected member {key!r}")
            elif isinstance(extra, dict):
                validate(value, extra, doc, f"{path}.{key}")
    if isinstance(instance, list):
        if "minItems" in schema:
            assert len(instance) >= schema["minItems"], f"{path}: too few items"
        if "maxItems" in schema:
            assert len(instance) <= schema["maxItems"], f"{path}: too many items"
        if "items" in schema:
            for i, item in enumerate(instance):
                validate(item, schema["items"], doc, f"{path}[{i}]")


def _is_type(value: Any, t: str) -> bool:
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return {"string": str, "boolean": bool, "object": dict, "array": list, "null": type(None)}[
        t
    ] is type(value) or (t == "object" and isinstance(value, dict))


def response_schema(doc: dict[str, Any], path: str, method: str, status: int) -> tuple[str, Any]:
    """(media type, schema) documented for one response."""
    op = doc["paths"][path][method.lower()]
    resp = op["responses"].get(str(status))
    assert resp is not None, f"{method} {path}: status {status} is not documented"
    ((media, content),) = resp["content"].items()
    return media, content["schema"]


def match_template(doc: dict[str, Any], path: str) -> str | None:
    for template in doc["paths"]:
        rx = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(rx, path):
            return template
    return None


class Checked:
    """Wraps a TestClient: every answer is checked against the OpenAPI document (documented
    status, media type and schema; problem+json for errors) and returned as (status, body)."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.doc = load_openapi()
        self.seen: set[tuple[str, str, int]] = set()

    async def __call__(
        self, method: str, path: str, *, token: str | None = None, **kwargs: Any
    ) -> tuple[int, Any, Any]:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        resp = await self.client.request(method, path, headers=headers, **kwargs)
        raw = await resp.read()
        ctype = resp.headers.get("Content-Type", "").split(";")[0]
        template = match_template(self.doc, path.split("?")[0])
        if resp.status == 405 or resp.status >= 500 or template is None:
            assert ctype == "application/problem+json", (resp.status, ctype, raw[:200])
            body = json.loads(raw)
            validate(body, {"$ref": "#/components/schemas/Problem"}, self.doc)
            assert resp.status != 500, body
            return resp.status, body, resp.headers
        media, schema = response_schema(self.doc, template, method, resp.status)
        assert ctype == media, (method, path, resp.status, ctype, media)
        body = json.loads(raw) if "json" in media else raw.decode()
        validate(body, schema, self.doc)
        self.seen.add((method.lower(), template, resp.status))
        return resp.status, body, resp.headers
