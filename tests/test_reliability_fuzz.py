"""API fuzzing with schemathesis against the shipped OpenAPI document (daemon/openapi.json),
on a spawned sharedpoold listening on 127.0.0.1 (and a temporary Unix socket).

One test per operation (schemathesis' pytest integration), each with up to
$SHAREDPOOL_FUZZ_EXAMPLES examples (default 25; `make fuzz` runs many more) in positive and
negative generation modes, and a time budget for the whole module
($SHAREDPOOL_FUZZ_SECONDS, default 60): past it the remaining examples are not sent.

Every answer goes through schemathesis' checks: no 5xx, a documented status code, the
documented content type and headers (Retry-After on 503), a body conforming to the
document's schema, schema-invalid requests refused with 4xx, auth enforced. One check is
left out: `positive_data_acceptance` (a schema-valid request must not get a 4xx), because
the daemon is deliberately stricter than JSON Schema can say (sizes at most pool.max_buffer,
a configuration value; no control, surrogate or unassigned characters in names): those 4xx
still have to be documented problem answers, which the other checks verify.

Auth: a registered client's bearer token for client routes, the admin token for admin
routes. To reach past 403/404, generated path parameters are replaced half of the time by
the fuzzing client's own id and by ids of its live buffers; an unregistered fuzzing client
is registered again. After the run, the daemon's invariants hold.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from support.harness import ADMIN_TOKEN, Daemon, spawn

from daemon.client import SharedPoolClient, register_client

ROOT = Path(__file__).resolve().parent.parent
DOC: dict[str, Any] = json.loads((ROOT / "daemon" / "openapi.json").read_text())
EXAMPLES = int(os.environ.get("SHAREDPOOL_FUZZ_EXAMPLES", "25"))
BUDGET = float(os.environ.get("SHAREDPOOL_FUZZ_SECONDS", "60"))

schema = schemathesis.openapi.from_dict(DOC)


class Fuzzer:
    """The spawned daemon and the fuzzing client's state, shared by every operation's test."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        assert daemon.tcp_url is not None
        self.url: str = daemon.tcp_url
        self.token = ""
        self.client_id = ""
        self.buffers: list[int] = []
        self.deadline = time.monotonic() + BUDGET
        self.sent = 0
        self.statuses: Counter[int] = Counter()
        self.modes: Counter[str] = Counter()

    def register(self) -> None:
        reg = asyncio.run(register_client(self.url, "fuzz"))
        self.token, self.client_id, self.buffers = reg.token, reg.client_id, []


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzer]:
    d = spawn(tmp_path_factory.mktemp("fuzz"), "--lease-ttl", "3600")
    try:
        asyncio.run(d.wait_ready())
        f = Fuzzer(d)
        f.register()
        yield f

        async def end() -> dict[str, Any]:
            async with SharedPoolClient(d.unix_url, token=ADMIN_TOKEN) as admin:
                return await admin.invariants()

        inv = asyncio.run(end())
        assert inv["ok"], inv
        assert d.proc.poll() is None, "the daemon died"
        assert "Traceback" not in d.output() and "unhandled error" not in d.output()
        print(
            f"\nfuzz: {f.sent} requests, statuses {dict(sorted(f.statuses.items()))}, "
            f"modes {dict(f.modes)}"
        )
    finally:
        d.stop()


def _pick(case: Any, salt: str) -> int:
    """A stable per-case choice (0..99): reproducible when hypothesis replays a failure."""
    text = f"{case.method} {case.path_parameters} {case.body!r} {salt}"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[0] % 100


def _auth(case: Any, f: Fuzzer) -> dict[str, str]:
    security = case.operation.definition.raw.get("security", DOC.get("security", []))
    names = {name for alternative in security for name in alternative}
    if "adminToken" in names:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    if "bearer" in names:
        return {"Authorization": f"Bearer {f.token}"}
    return {}


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    # the default run is reproducible; `make fuzz` (SHAREDPOOL_FUZZ_RANDOM=1) explores anew
    derandomize=os.environ.get("SHAREDPOOL_FUZZ_RANDOM") != "1",
    database=None,
)
def test_api_conforms_to_its_document(case: Any, fuzzer: Fuzzer) -> None:
    f = fuzzer
    if time.monotonic() > f.deadline:
        return  # past the module's time budget
    mode = str(case.meta.generation.mode) if case.meta else "?"
    # only a schema-valid case may get real ids: a negative case must stay invalid
    params = (case.path_parameters or {}) if mode == "positive" else {}
    if "client_id" in params and _pick(case, "cid") < 50:
        params["client_id"] = f.client_id
    if "id" in params and f.buffers and _pick(case, "id") < 50:
        params["id"] = f.buffers[_pick(case, "which") % len(f.buffers)]
    response = case.call_and_validate(
        base_url=f.url,
        headers=_auth(case, f),
        excluded_checks=[positive_data_acceptance],
        timeout=10,
    )
    f.sent += 1
    f.statuses[response.status_code] += 1
    f.modes[mode] += 1
    op = (case.method.upper(), case.operation.path)
    if op == ("POST", "/v1/buffers") and response.status_code == 201:
        f.buffers.append(response.json()["id"])
    elif op == ("DELETE", "/v1/buffers/{id}") and response.status_code == 200:
        f.buffers = [b for b in f.buffers if b != response.json()["id"]]
    elif op == ("DELETE", "/v1/clients/{client_id}") and response.status_code == 200:
        f.register()  # the token died with the client: carry on with a new one
    if len(f.buffers) > 32:  # keep the pool from filling up with the fuzzer's buffers
        f.buffers = f.buffers[-32:]
