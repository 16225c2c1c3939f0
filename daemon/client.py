"""An async client for the whole sharedpoold API.

    async with SharedPoolClient("unix:/run/user/1000/sharedpool/sharedpoold.sock") as c:
        await c.register("hv_netvsc0")
        buf = await c.allocate(16 << 20, purpose="recv")
        ...
        await c.free(buf["id"])

Errors raise :class:`ApiError` carrying the problem document's status, type, title and
detail (and `retry_after` in seconds for 503).
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any

import aiohttp

__all__ = ["ApiError", "SharedPoolClient"]


class ApiError(Exception):
    """A problem+json answer (or a non-JSON error answer)."""

    def __init__(
        self,
        status: int,
        type: str,
        title: str,
        detail: str = "",
        retry_after: float | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}" if detail else f"{status} {title}")
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.retry_after = retry_after
        self.body = body or {}

    @property
    def name(self) -> str:
        """The problem's short name: 'pool-exhausted' for urn:sharedpool:problem:pool-exhausted."""
        return self.type.rsplit(":", 1)[-1]


class SharedPoolClient:
    """`url`: "unix:/path/to/sock" or "http://host:port". `token`: a client's (or the admin)
    bearer token; register() stores the new client's token."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 30.0) -> None:
        self.url = url
        self.token = token
        self.client_id: str | None = None
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        if url.startswith("unix:"):
            self._socket: str | None = url[len("unix:") :]
            self._base = "http://sharedpoold"
        elif url.startswith(("http://", "https://")):
            self._socket = None
            self._base = url.rstrip("/")
        else:
            raise ValueError(f"expected unix:PATH or http://HOST:PORT, got {url!r}")
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> SharedPoolClient:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        if self._session is None:
            connector: aiohttp.BaseConnector
            if self._socket is not None:
                connector = aiohttp.UnixConnector(path=self._socket)
            else:
                connector = aiohttp.TCPConnector()
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, body: Any = None, *, auth: bool = True) -> Any:
        if self._session is None:
            await self.open()
        assert self._session is not None
        headers = {}
        if auth and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        async with self._session.request(
            method, self._base + path, data=data, headers=headers
        ) as resp:
            raw = await resp.read()
            if resp.status >= 400:
                raise _error(resp.status, resp.headers, raw)
            ctype = resp.headers.get("Content-Type", "")
            if "json" in ctype:
                return json.loads(raw)
            return raw.decode()

    # ---- clients ---------------------------------------------------------------------

    async def register(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "POST", "/v1/clients", {"name": name}, auth=False
        )
        self.token = result["token"]
        self.client_id = result["client_id"]
        return result

    def _cid(self) -> str:
        if self.client_id is None:
            raise RuntimeError("not registered: call register() first")
        return self.client_id

    async def heartbeat(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("POST", f"/v1/clients/{self._cid()}/heartbeat")
        return result

    async def unregister(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("DELETE", f"/v1/clients/{self._cid()}")
        self.client_id = None
        return result

    # ---- buffers ---------------------------------------------------------------------

    async def allocate(self, size: int, purpose: str = "") -> dict[str, Any]:
        body: dict[str, Any] = {"size": size}
        if purpose:
            body["purpose"] = purpose
        result: dict[str, Any] = await self.request("POST", "/v1/buffers", body)
        return result

    async def get(self, id: int) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", f"/v1/buffers/{int(id)}")
        return result

    async def list(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.request("GET", "/v1/buffers")
        return result

    async def free(self, id: int) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("DELETE", f"/v1/buffers/{int(id)}")
        return result

    # ---- pool ----------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", "/v1/pool")
        return result

    async def grow(self, nbytes: int) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("POST", "/v1/pool/grow", {"bytes": nbytes})
        return result

    async def shrink(self, force: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "POST", "/v1/pool/shrink", {"force": True} if force else None
        )
        return result

    async def invariants(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", "/v1/debug/invariants")
        return result

    async def ready(self) -> bool:
        try:
            await self.request("GET", "/readyz", auth=False)
        except ApiError:
            return False
        return True

    async def metrics(self) -> str:
        result: str = await self.request("GET", "/metrics", auth=False)
        return result


def _error(status: int, headers: Any, raw: bytes) -> ApiError:
    retry = headers.get("Retry-After")
    retry_after = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return ApiError(
            status,
            "about:blank",
            raw.decode(errors="replace")[:200] or "error",
            retry_after=retry_after,
        )
    return ApiError(
        status,
        str(body.get("type", "about:blank")),
        str(body.get("title", "")),
        str(body.get("detail", "")),
        retry_after,
        body,
    )
