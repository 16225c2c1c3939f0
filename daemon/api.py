"""API v1: request parsing and validation, authentication, the handlers.

Validation is strict and happens before any state is touched: a rejected request changes
nothing. Bodies are JSON objects (bounded in size by the app's client_max_size, in nesting
depth here), with no unknown members, no duplicate keys, no NaN/Infinity; integers are
JSON integers (``true`` is not 1, ``1.0`` is not 1) within documented bounds.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import socket
import struct
import unicodedata
from collections.abc import Callable
from typing import Any

import attrs
from aiohttp import web

from daemon import keys
from daemon.engine import (
    Client,
    ClientGone,
    NotReady,
    QuotaExceeded,
    Service,
    StorageFull,
    Unsupported,
)
from daemon.problems import Problem
from daemon.views import PoolView
from pool.memmap import ENCODINGS
from pool.strategy import AllocationError, DoubleFree, NotOwner, StrategyError, UnknownBuffer

routes = web.RouteTableDef()

MAX_DEPTH = 8
MAX_TOKEN = 256
MAX_NAME = 64
MAX_PURPOSE = 128
MAX_SIZE_FIELD = (1 << 63) - 1  # a size the journal and clients can hold as a 64-bit integer
_BUFFER_ID = r"{id:[0-9]{1,18}}"
_CLIENT_ID = r"{client_id:[A-Za-z0-9_-]{1,64}}"


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(data).encode(), content_type="application/json"
    )


def buffer_json(buffer: dict[str, Any]) -> dict[str, Any]:
    """A buffer's JSON as served: `va` as a 0x-prefixed, 16-digit hex string (API v1.1; an
    integer in v1.0). A vmalloc address is above 2**53, and a JSON number that large loses
    its low bits in jq and in every JavaScript client."""
    va = buffer.get("va")
    if isinstance(va, int):
        return {**buffer, "va": f"0x{va:016x}"}
    return buffer


# ---- bodies ----------------------------------------------------------------------------


def _no_dup_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# one decoder (json.loads with hooks builds a JSONDecoder per call)
_DECODER = json.JSONDecoder(object_pairs_hook=_no_dup_object, parse_constant=_reject_constant)


def _depth(obj: Any) -> int:
    depth, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        depth = max(depth, d)
        if d > MAX_DEPTH:
            return d
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return depth


async def read_body(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    """The request's JSON object. `optional`: an empty body reads as {}."""
    ctype = request.headers.get("Content-Type", "")
    limit = request.app[keys.CONFIG]["daemon.body_limit"]
    if request.content_length is not None and request.content_length > limit:
        # answer at once: read() would wait for a declared body that may never come
        raise Problem("body-too-large", f"the body exceeds {limit} bytes")
    if request.content.is_eof():
        # The whole body came with the headers (the usual small request): read() cannot
        # wait, so no timer is armed (a timer per request was ~1 % of the loop's time).
        raw = await request.read()
    else:
        try:
            async with asyncio.timeout(request.app[keys.CONFIG]["daemon.body_timeout"]):
                raw = await request.read()  # raises 413 past client_max_size
        except TimeoutError:
            raise Problem("request-timeout", "the request body did not arrive in time") from None
    if not raw.strip():
        if optional:
            return {}
        raise Problem("malformed-json", "a JSON object body is required")
    mime = ctype.split(";")[0].strip().lower()
    if mime and mime != "application/json" and not mime.endswith("+json"):
        raise Problem("unsupported-media-type", "send application/json")
    if raw.lstrip()[:1] not in (b"{",):
        raise Problem("malformed-json", "the body must be a JSON object")
    # A cheap upper bound on nesting before parsing: json recursion is never deep.
    brackets = raw.count(b"[") + raw.count(b"{")
    if brackets > MAX_DEPTH * 4 and _nesting(raw) > MAX_DEPTH:
        raise Problem("malformed-json", f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        data = _DECODER.decode(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Problem("malformed-json", _short(str(exc))) from None
    if not isinstance(data, dict):
        raise Problem("malformed-json", "the body must be a JSON object")
    # Fewer brackets than levels allowed cannot nest deeper (brackets in strings only
    # overcount): the walk is skipped for the usual flat body.
    if brackets > MAX_DEPTH and _depth(data) > MAX_DEPTH:
        raise Problem("malformed-json", f"JSON nested deeper than {MAX_DEPTH} levels")
    return data


def _nesting(raw: bytes) -> int:
    """Maximum bracket depth outside strings (a scan, no recursion)."""
    depth = best = 0
    in_str = esc = False
    for b in raw:
        if in_str:
            if esc:
                esc = False
            elif b == 0x5C:
                esc = True
            elif b == 0x22:
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b in (0x5B, 0x7B):
            depth += 1
            best = max(best, depth)
        elif b in (0x5D, 0x7D):
            depth -= 1
    return best


def _short(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _fields(body: dict[str, Any], allowed: set[str], required: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise Problem(
            "invalid-field",
            f"unknown member {_short(unknown[0], 64)!r}",
            field=_short(unknown[0], 64),
        )
    for name in sorted(required - set(body)):
        raise Problem("invalid-field", f"{name} is required", field=name)


def int_field(body: dict[str, Any], name: str, lo: int, hi: int) -> int:
    v = body[name]
    if isinstance(v, bool) or not isinstance(v, int):
        raise Problem("invalid-field", f"{name} must be an integer", field=name)
    if not lo <= v <= hi:
        raise Problem("invalid-field", f"{name} must be within [{lo}, {hi}]", field=name)
    return v


def text_field(body: dict[str, Any], name: str, max_len: int, *, min_len: int = 0) -> str:
    v = body[name]
    if not isinstance(v, str):
        raise Problem("invalid-field", f"{name} must be a string", field=name)
    if not min_len <= len(v) <= max_len:
        raise Problem(
            "invalid-field", f"{name} must have {min_len} to {max_len} characters", field=name
        )
    if any(unicodedata.category(ch) in ("Cc", "Cs", "Cn", "Co") for ch in v):
        raise Problem(
            "invalid-field",
            f"{name} must not contain control, surrogate or unassigned characters",
            field=name,
        )
    return v


# ---- authentication ----------------------------------------------------------------------


def service_of(request: web.Request) -> Service:
    return request.app[keys.SERVICE]


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN:
        raise Problem("unauthorized", "use Authorization: Bearer <token>")
    return token


def require_client(request: web.Request) -> Client:
    token = bearer(request)
    if token is None:
        raise Problem("unauthorized", "a bearer token is required")
    service = service_of(request)
    if not service.ready:
        raise NotReady(service.state)
    client = service.authenticate(token)
    if client is None:
        raise Problem("unauthorized", "unknown or expired token")
    return client


def peer_uid(request: web.Request) -> int | None:
    """The uid of a Unix-socket peer (SO_PEERCRED), or None."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or getattr(sock, "family", None) != socket.AF_UNIX:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def require_admin(request: web.Request) -> None:
    service = service_of(request)
    token = bearer(request)
    if token is not None and service.is_admin_token(token):
        return
    if request.app[keys.CONFIG]["daemon.admin_unix_peer"] and peer_uid(request) == os.getuid():
        return
    if token is None:
        raise Problem("unauthorized", "admin credentials required")
    raise Problem("forbidden", "admin only")


# ---- handlers ------------------------------------------------------------------------------


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    service = service_of(request)
    if service.state == "failed":
        raise Problem("not-ready", "the daemon failed and is stopping")
    return _json({"status": "ok", "state": service.state})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    service = service_of(request)
    if service.ready:
        return _json({"status": "ready", "restore": service.restore_info})
    raise Problem("not-ready", f"state: {service.state}")


@routes.get("/v1/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[keys.OPENAPI], content_type="application/json")


def _over_tcp(request: web.Request) -> bool:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6)


def require_registration(request: web.Request) -> None:
    """Registration over TCP needs the registration secret (Authorization: Bearer), unless
    the operator set daemon.allow_anonymous_register: whoever reaches a TCP port could
    otherwise register and allocate up to pool.max. A Unix socket's mode (0660) and owner
    are its boundary."""
    if not _over_tcp(request):
        return
    config = request.app[keys.CONFIG]
    secret = config.registration_secret
    if not secret:
        if config["daemon.allow_anonymous_register"]:
            return
        raise Problem(
            "forbidden", "registration over TCP is disabled (no daemon.registration_secret)"
        )
    token = bearer(request)
    if token is None:
        raise Problem("unauthorized", "registration over TCP needs the registration secret")
    if not hmac.compare_digest(token.encode(), secret.encode()):
        raise Problem("forbidden", "wrong registration secret")


@routes.post("/v1/clients")
async def register(request: web.Request) -> web.Response:
    require_registration(request)
    body = await read_body(request, optional=True)
    _fields(body, {"name"}, set())
    name = text_field(body, "name", MAX_NAME) if "name" in body else ""
    reg = await service_of(request).register(name)
    return _json(
        {
            "client_id": reg.client_id,
            "token": reg.token,
            "name": reg.name,
            "lease_ttl_seconds": reg.lease_ttl_seconds,
        },
        201,
    )


def _own_client(request: web.Request) -> Client:
    client = require_client(request)
    if request.match_info["client_id"] != client.id:
        raise Problem("forbidden", "a token acts for its own client only")
    return client


@routes.post(f"/v1/clients/{_CLIENT_ID}/heartbeat")
async def heartbeat(request: web.Request) -> web.Response:
    client = _own_client(request)
    ttl = service_of(request).heartbeat(client)
    return _json({"client_id": client.id, "lease_ttl_seconds": ttl})


@routes.delete(f"/v1/clients/{_CLIENT_ID}")
async def unregister(request: web.Request) -> web.Response:
    client = _own_client(request)
    dropped = await service_of(request).unregister(client)
    return _json(
        {"client_id": client.id, "freed": list(dropped.freed), "leaked": list(dropped.leaked)}
    )


@routes.post("/v1/buffers")
async def allocate(request: web.Request) -> web.Response:
    client = require_client(request)
    body = await read_body(request)
    _fields(body, {"size", "purpose"}, {"size"})
    # Only the shape is checked here: how large a buffer may be is the strategy's rule, and
    # its refusal (reason too_large) is the answer, the same as in process.
    size = int_field(body, "size", 1, MAX_SIZE_FIELD)
    purpose = text_field(body, "purpose", MAX_PURPOSE) if "purpose" in body else ""
    buf = await service_of(request).allocate(client, size, purpose)
    return _json(buffer_json(buf.as_json()), 201)


@routes.get("/v1/buffers")
async def list_buffers(request: web.Request) -> web.Response:
    client = require_client(request)
    return _json([buffer_json(b.as_json()) for b in service_of(request).buffers(client)])


def _buffer_id(request: web.Request) -> int:
    return int(request.match_info["id"])


@routes.get(f"/v1/buffers/{_BUFFER_ID}")
async def get_buffer(request: web.Request) -> web.Response:
    client = require_client(request)
    return _json(buffer_json(service_of(request).get(client, _buffer_id(request)).as_json()))


@routes.delete(f"/v1/buffers/{_BUFFER_ID}")
async def free_buffer(request: web.Request) -> web.Response:
    client = require_client(request)
    result = await service_of(request).free(client, _buffer_id(request))
    return _json(buffer_json({**result.buffer.as_json(), "leaked": result.leaked}))


@routes.get("/v1/pool")
async def pool_stats(request: web.Request) -> web.Response:
    return _json(pool_json(service_of(request).pool_view()))


def pool_json(view: PoolView) -> dict[str, Any]:
    report = view.guest
    return {
        "strategy": view.strategy.as_json(),
        "guest": {
            "platform": view.platform,
            "memory_bytes": view.memory_bytes,
            "free_pages": report.free_pages,
            "direct_map_bytes": dict(report.direct_map_bytes),
            "hazard_pages": report.hazards.as_json(),
            "counts": attrs.asdict(report.counts),
            "zones": [
                {
                    "name": z.name,
                    "nr_free": list(z.nr_free),
                    "fragmentation_index": list(z.fragmentation_index),
                    "unusable_free_index": list(z.unusable_free_index),
                }
                for z in report.zones
            ],
        },
        "daemon": attrs.asdict(view.daemon),
    }


@routes.get("/v1/memory-map")
async def memory_map(request: web.Request) -> web.Response:
    """The guest's memory map (read-only; also on the metrics-only listener)."""
    encoding = request.query.get("encoding", "base64")
    if encoding not in ENCODINGS:
        raise Problem(
            "invalid-field",
            f"encoding must be one of {', '.join(ENCODINGS)}: {_short(encoding, 40)!r}",
            field="encoding",
        )
    body = service_of(request).memory_map_json(encoding)
    return web.Response(body=body, content_type="application/json")


@routes.post("/v1/pool/grow")
async def pool_grow(request: web.Request) -> web.Response:
    require_admin(request)
    body = await read_body(request)
    _fields(body, {"bytes"}, {"bytes"})
    nbytes = int_field(body, "bytes", 1, request.app[keys.CONFIG]["pool.max"])
    return _json({"grown_bytes": await service_of(request).grow(nbytes)})


@routes.post("/v1/pool/shrink")
async def pool_shrink(request: web.Request) -> web.Response:
    require_admin(request)
    body = await read_body(request, optional=True)
    _fields(body, {"force"}, set())
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise Problem("invalid-field", "force must be true or false", field="force")
    return _json({"released_bytes": await service_of(request).shrink(force)})


@routes.get("/v1/debug/invariants")
async def invariants(request: web.Request) -> web.Response:
    require_admin(request)
    service = service_of(request)
    if not service.ready:
        raise NotReady(service.state)
    try:
        report = service.check_invariants()
        return _json({"ok": True, **attrs.asdict(report)})
    except AssertionError as exc:
        return _json({"ok": False, "error": str(exc)})


# ---- errors --------------------------------------------------------------------------------

_HTTP_PROBLEMS = {
    404: "not-found",
    405: "method-not-allowed",
    413: "body-too-large",
    400: "malformed-json",
    401: "unauthorized",
    403: "forbidden",
    415: "unsupported-media-type",
}

_ALLOC_PROBLEMS = {
    "exhausted": "pool-exhausted",
    "no_memory": "pool-exhausted",
    "conversion_failed": "conversion-failed",
    "too_large": "buffer-too-large",
    "invalid_size": "invalid-field",
}


def problem_for(exc: BaseException) -> Problem | None:
    """The problem answering a known exception; None for bugs."""
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, NotReady):
        return Problem("not-ready", f"the daemon is {exc.args[0] if exc.args else 'not ready'}")
    if isinstance(exc, AllocationError):
        name = _ALLOC_PROBLEMS.get(exc.reason, "pool-exhausted")
        extra: dict[str, Any] = {"reason": exc.reason}
        if name == "invalid-field":
            extra["field"] = "size"
        return Problem(name, str(exc), **extra)
    if isinstance(exc, DoubleFree):
        return Problem("double-free", str(exc))
    if isinstance(exc, UnknownBuffer):
        return Problem("not-found", "no such buffer")
    if isinstance(exc, NotOwner):
        return Problem("forbidden", "the buffer belongs to another client")
    if isinstance(exc, StrategyError):
        return Problem("invalid-field", str(exc))
    if isinstance(exc, Unsupported):
        return Problem("unsupported", str(exc))
    if isinstance(exc, ClientGone):
        # unregistered or expired while its request was arriving: its token is gone too
        return Problem("unauthorized", "the client is no longer registered")
    if isinstance(exc, QuotaExceeded):
        name = "too-many-clients" if exc.reason == "max_clients" else "quota-exceeded"
        return Problem(name, str(exc), reason=exc.reason)
    if isinstance(exc, StorageFull):
        return Problem("storage-full", str(exc), reason="storage_full")
    if isinstance(exc, web.HTTPException) and exc.status in _HTTP_PROBLEMS:
        headers = {}
        if exc.status == 405 and "Allow" in exc.headers:
            headers["Allow"] = exc.headers["Allow"]
        return Problem(_HTTP_PROBLEMS[exc.status], exc.reason, headers=headers)
    return None


Handler = Callable[[web.Request], Any]
