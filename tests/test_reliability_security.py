"""Security: isolation between clients, admin-only routes, the Unix socket's and the state
directory's permissions, tokens kept out of logs and off disk, and bounded request parsing.

What each test proves:
- test_a_client_cannot_see_free_or_learn_another_clients_buffers: another client's buffer
  answers 403/404 to GET and DELETE with a bare problem document (no PFN, va or size), the
  DELETE changes nothing, lists show only one's own buffers, a client id in a path must be
  one's own, the unauthenticated /v1/pool and /metrics carry no PFN list, id or token, and a
  token dies with its client.
- test_admin_routes_and_socket_permissions: over TCP, admin routes refuse no token (401), a
  client token and near misses of the admin token (403); over the Unix socket a same-uid
  peer is admin by default and is not once `admin_unix_peer = false`; the socket is created
  0660 (and --socket-mode 0600 is honoured), its directory is not world-writable, the state
  directory is 0700 and the journal holds token hashes only.
- test_tokens_never_logged: with debug logging and the access log on, after registrations,
  authenticated and refused requests, an over-long Authorization header (aiohttp's parser
  error quotes it), the admin token and a lease expiry, no token is in the daemon's output.
- test_request_parsing_is_bounded: huge, negative, non-integer, non-finite and 5000-digit
  sizes, unicode (valid, surrogates, controls, format characters), deep nesting, duplicate
  keys, wrong content types, bodies over the limit (declared, chunked or undeclared),
  over-long and too many headers, bad Content-Length, smuggling-shaped framing, odd paths and
  methods: every answer is 4xx (never 5xx), problem+json from the application, and nothing
  that was refused changed the pool, the guest or the journal.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import stat
from pathlib import Path
from typing import Any

from support.daemons import Checked, register, running_app, small_config
from support.harness import ADMIN_TOKEN, spawn

from daemon.client import ApiError, SharedPoolClient, register_client

P = "urn:sharedpool:problem:"
PROBLEM_KEYS = {"type", "title", "status", "detail", "instance", "field", "reason"}


def _walk_keys(obj: Any) -> set[str]:
    keys: set[str] = set()
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            keys |= set(o)
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    return keys


async def test_a_client_cannot_see_free_or_learn_another_clients_buffers(tmp_path: Path) -> None:
    async with running_app(small_config(tmp_path / "state")) as client:
        api = Checked(client)
        a_id, a = await register(client, "a")
        b_id, b = await register(client, "b")
        a_bufs = []
        for size in (4096, 1 << 20, 3 << 20):
            status, buf, _ = await api("POST", "/v1/buffers", token=a, json={"size": size})
            assert status == 201
            a_bufs.append(buf)
        _, b_buf, _ = await api("POST", "/v1/buffers", token=b, json={"size": 8192})
        secrets_of_a = {str(s) for x in a_bufs for s, _ in x["pfn_ranges"]}
        secrets_of_a |= {str(x["va"]) for x in a_bufs}
        for buf in a_bufs:
            for method in ("GET", "DELETE"):
                status, body, _ = await api(method, f"/v1/buffers/{buf['id']}", token=b)
                assert status in (403, 404), (method, status, body)
                assert set(body) <= PROBLEM_KEYS, body
                text = json.dumps(body)
                assert not any(s in text for s in secrets_of_a), body
                assert a_id not in text
            status, again, _ = await api("GET", f"/v1/buffers/{buf['id']}", token=a)
            assert status == 200 and again == buf  # B's DELETE changed nothing
        # enumerating ids finds nothing but one's own
        for bid in range(1, b_buf["id"] + 5):
            status, body, _ = await api("GET", f"/v1/buffers/{bid}", token=b)
            assert (status == 200) == (bid == b_buf["id"]), (bid, status)
        _, listed, _ = await api("GET", "/v1/buffers", token=b)
        assert listed == [b_buf]
        # a client id in a path must be the caller's own
        for method, path in (
            ("POST", f"/v1/clients/{a_id}/heartbeat"),
            ("DELETE", f"/v1/clients/{a_id}"),
        ):
            status, body, _ = await api(method, path, token=b)
            assert status == 403 and body["type"] == P + "forbidden"
        # the unauthenticated reads carry no buffer's PFNs, no client id, no token
        _, pool, _ = await api("GET", "/v1/pool")
        assert not {k for k in _walk_keys(pool) if "pfn" in k or k in ("va", "owner")}
        _, metrics, _ = await api("GET", "/metrics")
        for text in (json.dumps(pool), metrics):
            assert a_id not in text and b_id not in text and a not in text and b not in text
        # a token dies with its client; its buffers are gone for everyone
        status, bye, _ = await api("DELETE", f"/v1/clients/{a_id}", token=a)
        assert status == 200 and sorted(bye["freed"]) == sorted(x["id"] for x in a_bufs)
        assert (await api("GET", "/v1/buffers", token=a))[0] == 401
        for buf in a_bufs:
            assert (await api("GET", f"/v1/buffers/{buf['id']}", token=b))[0] == 404


async def _status(url: str, token: str | None, method: str, path: str, body: Any = None) -> int:
    async with SharedPoolClient(url, token=token, register=False) as c:
        try:
            await c.request(method, path, body, auth=token is not None)
        except ApiError as exc:
            return exc.status
        return 200


ADMIN_ROUTES: tuple[tuple[str, str, Any], ...] = (
    ("POST", "/v1/pool/grow", {"bytes": 4096}),
    ("POST", "/v1/pool/shrink", {}),
    ("GET", "/v1/debug/invariants", None),
)


async def test_admin_routes_and_socket_permissions(tmp_path: Path) -> None:
    d = spawn(tmp_path / "one", tcp=True)
    try:
        await d.wait_ready()
        assert d.tcp_url is not None
        token = (await register_client(d.unix_url, "someone")).token
        near_misses = [
            ADMIN_TOKEN[:-1],
            ADMIN_TOKEN + "x",
            ADMIN_TOKEN.upper(),
            ADMIN_TOKEN[1:],
            "x" * len(ADMIN_TOKEN),
            token,
        ]
        for method, path, body in ADMIN_ROUTES:
            assert await _status(d.tcp_url, None, method, path, body) == 401
            for wrong in near_misses:
                assert await _status(d.tcp_url, wrong, method, path, body) == 403, wrong
            assert await _status(d.tcp_url, ADMIN_TOKEN, method, path, body) == 200
            # the Unix socket: a peer with the daemon's uid is admin (the documented default)
            assert await _status(d.unix_url, None, method, path, body) == 200
        mode = stat.S_IMODE(os.stat(d.sock).st_mode)
        assert mode == 0o660, oct(mode)
        assert stat.S_ISSOCK(os.stat(d.sock).st_mode)
        parent = stat.S_IMODE(os.stat(d.sock.parent).st_mode)
        assert not parent & 0o002, oct(parent)
        assert stat.S_IMODE(os.stat(d.state).st_mode) == 0o700
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
        # tokens are stored as hashes: neither a client's nor the admin's is on disk
        for f in d.state.iterdir():
            data = f.read_bytes()
            assert token.encode() not in data and ADMIN_TOKEN.encode() not in data, f
        with sqlite3.connect(d.state / "sharedpoold.db") as db:
            rows = db.execute("SELECT args FROM journal WHERE op = 'register'").fetchall()
        assert all("token_sha256" in r[0] and token not in r[0] for r in rows)
    finally:
        d.stop()

    d = spawn(
        tmp_path / "two",
        "--socket-mode",
        "0600",
        daemon_toml={"admin_unix_peer": False},
        tcp=False,
    )
    try:
        await d.wait_ready()
        assert stat.S_IMODE(os.stat(d.sock).st_mode) == 0o600
        token = (await register_client(d.unix_url, "someone")).token
        for method, path, body in ADMIN_ROUTES:
            assert await _status(d.unix_url, None, method, path, body) == 401
            assert await _status(d.unix_url, token, method, path, body) == 403
            assert await _status(d.unix_url, ADMIN_TOKEN, method, path, body) == 200
    finally:
        d.stop()


async def _raw_unix(path: str, data: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(data)
    await writer.drain()
    out = b""
    try:
        while b"\r\n\r\n" not in out:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            if not chunk:
                break
            out += chunk
    finally:
        writer.close()
    return out


async def test_tokens_never_logged(tmp_path: Path) -> None:
    d = spawn(
        tmp_path,
        "--log-level",
        "debug",
        "--access-log",
        "--json-logs",
        "--lease-ttl",
        "1",
        tcp=True,
    )
    tokens = [ADMIN_TOKEN]
    try:
        await d.wait_ready()
        assert d.tcp_url is not None
        clients = []
        for i in range(3):
            url = d.unix_url if i % 2 else d.tcp_url
            reg = await register_client(url, f"c{i}")  # outlives the client: left to expire
            c = SharedPoolClient(url, token=reg.token, client_id=reg.client_id)
            await c.open()
            tokens.append(reg.token)
            clients.append(c)
        a = clients[0]
        buf = await a.allocate(4096)
        await a.get(buf.id)
        await a.free(buf)
        for bad in ("Bearer " + tokens[1] + "x", "bearer " + tokens[1][:-1]):
            async with SharedPoolClient(d.tcp_url, token=bad.split(" ", 1)[1]) as c:
                try:
                    await c.buffers()
                except ApiError as exc:
                    assert exc.status == 401
            tokens.append(bad.split(" ", 1)[1])
        async with SharedPoolClient(d.tcp_url, token=ADMIN_TOKEN) as admin:
            await admin.grow(4 << 20)
            await admin.invariants()
        # aiohttp's parser refuses these before the app and logs the offending line
        out = await _raw_unix(
            str(d.sock),
            b"GET /v1/buffers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + tokens[2].encode()
            + b"A" * 9000
            + b"\r\n\r\n",
        )
        assert out.startswith(b"HTTP/1.0 400"), out[:80]
        out = await _raw_unix(
            str(d.sock),
            b"GET /v1/buffers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + tokens[3].encode()
            + b"\r\n"
            + b"".join(b"X-%d: 1\r\n" % i for i in range(500))
            + b"\r\n",
        )
        assert out.startswith(b"HTTP/1.0 400"), out[:80]
        # one client goes silent: its lease expires (logged, with its id)
        for c in clients:
            await c.close()
        for _ in range(60):
            if "lease expired" in d.output():
                break
            await asyncio.sleep(0.1)
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
    finally:
        d.stop()
    log = d.output()
    for tok in tokens:
        assert tok not in log, "a token was logged"
        assert tok[:16] not in log, "a token prefix was logged"
    # the paths that could have logged one were taken (aiohttp's parser errors are one
    # WARNING line without the traceback that once quoted the header line)
    assert "lease expired" in log and "malformed HTTP request refused" in log
    assert "Traceback" not in log
    for line in log.splitlines():
        if not line.startswith("sharedpoold listening"):
            json.loads(line)  # every line is one JSON object, redaction included


# ---- bounded parsing ---------------------------------------------------------------------------


def _req(
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    *,
    token: str | None = None,
    ctype: str | None = "application/json",
    length: bool = True,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: sharedpoold", "Connection: close"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if body is not None and ctype:
        lines.append(f"Content-Type: {ctype}")
    if body is not None and length:
        lines.append(f"Content-Length: {len(body)}")
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + (body or b"")


async def _raw_tcp(port: int, data: bytes) -> tuple[int, str, bytes]:
    """Send raw bytes, return (status, content type, body) of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
        n = int(hdrs.get("content-length", "0"))
        body = await asyncio.wait_for(reader.readexactly(n), 10) if n else b""
        return status, hdrs.get("content-type", ""), body
    finally:
        writer.close()


def _cases(tok: str) -> list[tuple[str, bytes, set[int]]]:
    alloc = "/v1/buffers"

    def body(size: str, extra: str = "") -> bytes:
        return ('{"size": ' + size + extra + "}").encode()

    nested = b'{"size": 4096, "purpose": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    cases: list[tuple[str, bytes, set[int]]] = [
        # numbers
        *(
            (f"size {s}", _req("POST", alloc, body(s), token=tok), {400})
            for s in (
                "18446744073709551616",
                "1" + "0" * 300,
                "1" * 5000,  # past Python's int-string limit: a parse error, not a 500
                "-1",
                "-0",
                "0",
                "1.0",
                "1e3",
                "1e400",
                "-1e400",
                "4096.5",
                '"4096"',
                "true",
                "null",
                "[]",
                "{}",
                "NaN",
                "Infinity",
                "0x1000",
                "01",
                "+1",
            )
        ),
        # unicode
        (
            "surrogate purpose",
            _req("POST", alloc, body("4096", ', "purpose": "\\ud800"'), token=tok),
            {400},
        ),
        (
            "NUL purpose",
            _req("POST", alloc, body("4096", ', "purpose": "a\\u0000b"'), token=tok),
            {400},
        ),
        (
            "newline purpose",
            _req("POST", alloc, body("4096", ', "purpose": "a\\nfake log line"'), token=tok),
            {400},
        ),
        (
            "unassigned purpose",
            _req("POST", alloc, body("4096", ', "purpose": "\\u0378"'), token=tok),
            {400},
        ),
        (
            "private-use purpose",
            _req("POST", alloc, body("4096", ', "purpose": "\\ue000"'), token=tok),
            {400},
        ),
        (
            "invalid UTF-8",
            _req("POST", alloc, b'{"size": 4096, "purpose": "\xc3\x28"}', token=tok),
            {400},
        ),
        ("UTF-16 body", _req("POST", alloc, '{"size": 4096}'.encode("utf-16"), token=tok), {400}),
        ("BOM", _req("POST", alloc, b"\xef\xbb\xbf" + body("4096"), token=tok), {400}),
        (
            "long purpose",
            _req("POST", alloc, body("4096", ', "purpose": "' + "é" * 129 + '"'), token=tok),
            {400},
        ),
        ("unicode key", _req("POST", alloc, body("4096", ', "sïze": 1'), token=tok), {400}),
        (
            "long key",
            _req("POST", alloc, body("4096", ', "' + "k" * 10_000 + '": 1'), token=tok),
            {400},
        ),
        # structure
        ("nested 100000", _req("POST", alloc, nested, token=tok), {400, 413}),
        (
            "nested 9 objects",
            _req(
                "POST",
                alloc,
                b'{"size": 4096, "purpose": ' + b'{"a":' * 8 + b"1" + b"}" * 8 + b"}",
                token=tok,
            ),
            {400},
        ),
        ("duplicate keys", _req("POST", alloc, b'{"size": 4096, "size": 8192}', token=tok), {400}),
        ("array body", _req("POST", alloc, b"[4096]", token=tok), {400}),
        ("string body", _req("POST", alloc, b'"size"', token=tok), {400}),
        ("truncated", _req("POST", alloc, b'{"size": 40', token=tok), {400}),
        ("trailing garbage", _req("POST", alloc, b'{"size": 4096} x', token=tok), {400}),
        (
            "many members",
            _req(
                "POST",
                alloc,
                b"{" + b",".join(b'"k%d": 1' % i for i in range(5000)) + b"}",
                token=tok,
            ),
            {400},
        ),
        ("empty body", _req("POST", alloc, b"", token=tok), {400}),
        ("grow huge", _req("POST", "/v1/pool/grow", b'{"bytes": 1e30}', token=ADMIN_TOKEN), {400}),
        (
            "grow negative",
            _req("POST", "/v1/pool/grow", b'{"bytes": -4096}', token=ADMIN_TOKEN),
            {400},
        ),
        (
            "shrink string",
            _req("POST", "/v1/pool/shrink", b'{"force": "yes"}', token=ADMIN_TOKEN),
            {400},
        ),
        (
            "register long name",
            _req("POST", "/v1/clients", b'{"name": "' + b"n" * 65 + b'"}'),
            {400},
        ),
        ("register control", _req("POST", "/v1/clients", b'{"name": "\\u001b[31m"}'), {400}),
        ("register extra", _req("POST", "/v1/clients", b'{"name": "x", "token": "mine"}'), {400}),
        # content types
        *(
            (f"ctype {ct}", _req("POST", alloc, body("4096"), token=tok, ctype=ct), {415})
            for ct in (
                "text/plain",
                "application/xml",
                "multipart/form-data; boundary=x",
                "application/x-www-form-urlencoded",
                "application/octet-stream",
            )
        ),
        # sizes of bodies
        (
            "over limit",
            _req("POST", alloc, body("4096", ', "purpose": "' + "x" * (64 << 10) + '"'), token=tok),
            {413},
        ),
        (
            "declared over limit",
            _req("POST", alloc, b"{}", {"Content-Length": str(10**12)}, token=tok, length=False),
            {413},
        ),
        (
            "chunked over limit",
            _req(
                "POST",
                alloc,
                (b"8000\r\n" + b" " * 0x8000 + b"\r\n") * 3 + b"0\r\n\r\n",
                {"Transfer-Encoding": "chunked"},
                token=tok,
                length=False,
            ),
            {413},
        ),
        # framing and headers (answered by aiohttp's parser: 400, plain text)
        (
            "negative length",
            _req("POST", alloc, b"{}", {"Content-Length": "-5"}, token=tok, length=False),
            {400},
        ),
        (
            "two lengths",
            _req(
                "POST",
                alloc,
                b"{}",
                {"Content-Length": "2", "content-length": "7"},
                token=tok,
                length=False,
            ),
            {400},
        ),
        (
            "length and chunked",
            _req(
                "POST",
                alloc,
                b"0\r\n\r\n",
                {"Content-Length": "5", "Transfer-Encoding": "chunked"},
                token=tok,
                length=False,
            ),
            {400},
        ),
        (
            "bad chunk size",
            _req(
                "POST",
                alloc,
                b"zz\r\n{}\r\n0\r\n\r\n",
                {"Transfer-Encoding": "chunked"},
                token=tok,
                length=False,
            ),
            {400},
        ),
        (
            "header too long",
            _req("GET", alloc, headers={"X-Long": "a" * 9000}, token=tok),
            {400, 431},
        ),
        ("token too long", _req("GET", alloc, token="t" * 300), {401}),
        ("token non-ASCII", _req("GET", alloc, token="tök€n"), {401}),
        ("token bytes", _req("GET", alloc, token="\udcff\udcfe"), {400, 401}),
        ("basic auth", _req("GET", alloc, headers={"Authorization": "Basic YTpi"}), {401}),
        (
            "too many headers",
            _req("GET", alloc, headers={f"X-{i}": "1" for i in range(300)}, token=tok),
            {400, 431},
        ),
        # paths and methods
        ("id 19 digits", _req("GET", "/v1/buffers/1234567890123456789", token=tok), {404}),
        ("id negative", _req("GET", "/v1/buffers/-1", token=tok), {404}),
        ("id NUL", _req("GET", "/v1/buffers/%00", token=tok), {404}),
        ("id unicode", _req("GET", "/v1/buffers/%D9%A3", token=tok), {404}),
        ("dot segments", _req("GET", "/v1/buffers/../debug/invariants", token=tok), {403, 404}),
        (
            "client id long",
            _req("POST", "/v1/clients/" + "c" * 100 + "/heartbeat", token=tok),
            {404},
        ),
        ("TRACE", _req("TRACE", alloc, token=tok), {405}),
        ("OPTIONS", _req("OPTIONS", "/v1/pool"), {405}),
        ("PATCH", _req("PATCH", "/v1/buffers/1", body("1"), token=tok), {405}),
        ("bad method", b"GARBAGE / HTTP/1.1\r\nHost: x\r\n\r\n", {400}),
        ("bad version", b"GET /v1/pool HTTP/7.1\r\nHost: x\r\n\r\n", {400, 505}),
    ]
    return cases


async def _pool_state(api: Checked) -> Any:
    _, pool, _ = await api("GET", "/v1/pool")
    return pool


async def test_request_parsing_is_bounded(tmp_path: Path) -> None:
    async with running_app(small_config(tmp_path / "state")) as client:
        api = Checked(client)
        _, tok = await register(client, "fuzzed")
        before = await _pool_state(api)
        port = client.port
        assert port is not None
        seen: dict[str, int] = {}
        for name, raw, expected in _cases(tok):
            status, ctype, body = await _raw_tcp(port, raw)
            seen[name] = status
            assert 400 <= status < 500, (name, status, body[:200])
            assert status in expected, (name, status, body[:200])
            if ctype.startswith("application/problem+json"):
                problem = json.loads(body)
                assert problem["status"] == status and problem["type"].startswith(P)
            else:  # refused by aiohttp's HTTP parser, before the application
                assert status in (400, 505) and "Traceback" not in body.decode(errors="replace")
        after = await _pool_state(api)
        assert after == before, "a refused request changed the state"
        # valid unicode is accepted, and the daemon carries on
        for purpose in ("ñ 中文 🚀", "\u202eRTL", "é" * 128):
            status, buf, _ = await api(
                "POST", "/v1/buffers", token=tok, json={"size": 4096, "purpose": purpose}
            )
            assert status == 201 and buf["purpose"] == purpose
            assert (await api("DELETE", f"/v1/buffers/{buf['id']}", token=tok))[0] == 200
        _, inv, _ = await api("GET", "/v1/debug/invariants", token=ADMIN_TOKEN)
        assert inv["ok"]
        print(f"{len(seen)} hostile requests, statuses: {sorted(set(seen.values()))}")
