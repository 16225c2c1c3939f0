"""Errors as RFC 9457 problem details (application/problem+json), with stable `type`s.

Types are URNs, ``urn:sharedpool:problem:<name>``: stable identifiers that need no web
server behind them. Clients switch on `type` (or on `status`), never on `title` or
`detail`. The list (also in the OpenAPI document, components/schemas/Problem):

=====================  ======  =============================================================
name                   status  meaning
=====================  ======  =============================================================
malformed-json         400     the body is not a JSON object (syntax, depth, duplicates, NaN)
invalid-field          400     a field is missing, unknown, of the wrong type or out of range
                               (the `field` member names it)
buffer-too-large       400     the strategy can never serve this size in one buffer
unauthorized           401     no bearer token, or not a live client's token
forbidden              403     another client's buffer or client id; admin only
not-found              404     no such buffer, client or route
method-not-allowed     405     the route exists with other methods
double-free            409     the buffer was freed already
unsupported            409     the configured strategy has no such operation
body-too-large         413     the request body exceeds daemon.body_limit
unsupported-media-type 415     a body that is not application/json
not-ready              503     the pool is being built or restored, or the daemon stops
pool-exhausted         503     no shared memory for this request now (Retry-After)
conversion-failed      503     the conversion failed; its pages were leaked (Retry-After)
internal               500     a bug: logged server-side, no details given
=====================  ======  =============================================================
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

PREFIX = "urn:sharedpool:problem:"

PROBLEMS: dict[str, tuple[int, str]] = {
    "malformed-json": (400, "Malformed JSON body"),
    "invalid-field": (400, "Invalid field"),
    "buffer-too-large": (400, "Buffer too large"),
    "unauthorized": (401, "Unauthorized"),
    "forbidden": (403, "Forbidden"),
    "not-found": (404, "Not found"),
    "method-not-allowed": (405, "Method not allowed"),
    "double-free": (409, "Buffer already freed"),
    "unsupported": (409, "Operation not supported by this strategy"),
    "request-timeout": (408, "Request body not received in time"),
    "body-too-large": (413, "Request body too large"),
    "quota-exceeded": (429, "Quota exceeded"),
    "unsupported-media-type": (415, "Unsupported media type"),
    "internal": (500, "Internal error"),
    "not-ready": (503, "Not ready"),
    "pool-exhausted": (503, "Pool exhausted"),
    "conversion-failed": (503, "Conversion failed"),
    "too-many-connections": (503, "Too many connections"),
    "too-many-clients": (503, "Too many clients"),
    "storage-full": (503, "Storage full"),
}

RETRY_AFTER_SECONDS = 1


class Problem(Exception):
    """Raise from a handler to answer with a problem document."""

    def __init__(
        self, name: str, detail: str = "", *, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        if name not in PROBLEMS:
            raise ValueError(f"unknown problem {name!r}")
        super().__init__(detail or name)
        self.name = name
        self.status, self.title = PROBLEMS[name]
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = extra
        if self.status == 503:
            self.headers.setdefault("Retry-After", str(RETRY_AFTER_SECONDS))
        if self.status == 401:
            self.headers.setdefault("WWW-Authenticate", 'Bearer realm="sharedpoold"')

    def response(self, instance: str = "") -> web.Response:
        body: dict[str, Any] = {
            "type": PREFIX + self.name,
            "title": self.title,
            "status": self.status,
        }
        if self.detail:
            body["detail"] = self.detail
        if instance:
            body["instance"] = instance
        body.update(self.extra)
        return web.Response(
            status=self.status,
            headers=self.headers,
            body=json.dumps(body).encode(),
            content_type="application/problem+json",
        )
