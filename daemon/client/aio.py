"""SharedPoolClient: the async client, with the parts every caller would otherwise get wrong.

- Registration is the context: `async with SharedPoolClient(url, "nic0") as c:` registers on
  entry and unregisters on exit (the daemon then frees whatever the client still holds).
- The lease is kept alive in the background at a fraction (1/3) of `lease_ttl_seconds`, so a
  client that is quiet for longer than the lease keeps its buffers. When the daemon says the
  lease is gone (401 for our own token), the next call raises LeaseLost instead of each later
  call failing in its own way.
- `async with c.buffer(size, purpose=...) as buf:` frees the buffer when the block ends, also
  on an exception and on cancellation (the free is shielded; the client's exit waits for it).
- A 503 (pool growing, conversion failed, daemon starting) is retried after the daemon's
  Retry-After, within a deadline (daemon.client.retry); nothing else is retried.
- Every failure is a daemon.client.errors.SharedPoolError: ApiError for an error answer,
  DaemonUnavailable when there is no answer. aiohttp's exceptions never escape.

Bring-your-own identity: with `token=` (and `client_id=` to act as that client, e.g. after a
restart of this program) the client does not register and does not unregister; with
`register=False` and no token it is anonymous (readiness, pool stats, metrics).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import aiohttp
import attrs

from daemon.client.errors import (
    ApiError,
    BadResponse,
    DaemonUnavailable,
    LeaseLost,
    SharedPoolError,
)
from daemon.client.retry import NO_RETRY, RetryPolicy, parse_retry_after
from daemon.client.values import (
    Buffer,
    FreeResult,
    PoolStats,
    Registration,
    Unregistered,
    parse_buffer,
)

__all__ = ["BufferScope", "SharedPoolClient", "default_url", "register_client"]

log = logging.getLogger("daemon.client")

KEEPALIVE_FRACTION = 1 / 3
"""Heartbeat period as a fraction of the lease: two beats may be lost before it runs out."""

IDLE_CONNECTION_SECONDS = 2.0
"""How long the client keeps an idle connection open for reuse (aiohttp's default is 15 s,
past sharedpoold's 10 s idle timeout)."""


class SharedPoolClient:
    """An async client of sharedpoold.

    `url`: "unix:/path/to/sharedpoold.sock" or "http://host:port"; by default the daemon's
    own default socket (default_url()). `name`: the client's name
    at the daemon (shown in its logs). `registration_secret`: sent as `Authorization: Bearer`
    when registering, for daemons whose TCP listeners require one. `timeout`: seconds per
    request. `retry`: the 503 retry policy (`deadline` per call can be overridden on
    allocate). `keepalive`: heartbeat in the background (on by default).
    """

    def __init__(
        self,
        url: str | None = None,
        name: str = "",
        *,
        register: bool = True,
        token: str | None = None,
        client_id: str | None = None,
        registration_secret: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen, shared safely
        keepalive: bool = True,
    ) -> None:
        url = url or default_url()
        if url.startswith("unix:"):
            self._socket: str | None = url[len("unix:") :]
            self._base = "http://sharedpoold"
        elif url.startswith(("http://", "https://")):
            self._socket = None
            self._base = url.rstrip("/")
        else:
            raise ValueError(f"expected unix:PATH or http://HOST:PORT, got {url!r}")
        if client_id is not None and token is None:
            raise ValueError("client_id= needs the client's token=")
        self.url = url
        self.name = name
        self._register = register and token is None
        self._token = token
        self._client_id = client_id
        self._secret = registration_secret
        self._timeout = timeout
        self._retry = retry
        self._keepalive = keepalive
        self._registration: Registration | None = None
        self._lease_ttl: float | None = None
        self._lost: ApiError | None = None
        self._session: aiohttp.ClientSession | None = None
        self._beat: asyncio.Task[None] | None = None
        self._pending_frees: set[asyncio.Task[FreeResult]] = set()

    # ---- identity ------------------------------------------------------------------------

    @property
    def client_id(self) -> str | None:
        """Our client id at the daemon (the `owner` of our buffers); None if anonymous."""
        return self._client_id

    @property
    def token(self) -> str | None:
        """The bearer token we act with (keep it secret; pass it as token= to resume)."""
        return self._token

    @property
    def registration(self) -> Registration | None:
        """The daemon's answer to our registration (None when we did not register)."""
        return self._registration

    @property
    def lease_ttl(self) -> float | None:
        """Seconds of silence after which the daemon reclaims our buffers (None: unknown)."""
        return self._lease_ttl

    # ---- life cycle ----------------------------------------------------------------------

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

    async def open(self) -> SharedPoolClient:
        """Connect; register (or check the given client's token); start the keep-alive."""
        if self._session is not None:
            raise RuntimeError("this SharedPoolClient is open already")
        # idle connections are closed well before the daemon's idle timeout (10 s by
        # default) would close them: a request sent on a connection the daemon is closing
        # at that moment would fail for nothing
        connector: aiohttp.BaseConnector
        if self._socket is not None:
            connector = aiohttp.UnixConnector(
                path=self._socket, keepalive_timeout=IDLE_CONNECTION_SECONDS
            )
        else:
            connector = aiohttp.TCPConnector(keepalive_timeout=IDLE_CONNECTION_SECONDS)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self._timeout)
        )
        try:
            if self._register:
                headers = {"Authorization": f"Bearer {self._secret}"} if self._secret else {}
                reg = Registration.parse(
                    await self._call(
                        "POST", "/v1/clients", {"name": self.name}, headers=headers, auth=False
                    )
                )
                self._registration = reg
                self._token, self._client_id = reg.token, reg.client_id
                self._lease_ttl = reg.lease_ttl_seconds
            elif self._client_id is not None:
                await self.heartbeat()
            if self._keepalive and self._client_id is not None and self._lease_ttl:
                self._beat = asyncio.create_task(
                    self._keep_alive(self._client_id, self._lease_ttl),
                    name=f"sharedpool keep-alive {self._client_id}",
                )
        except BaseException:
            await self._close_session()
            raise
        return self

    async def close(self) -> None:
        """Stop the keep-alive, wait for frees in flight, unregister if we registered (the
        daemon frees what we still hold), disconnect. Never raises for the daemon's sake:
        if it cannot be reached, our lease expires and it reclaims the buffers then."""
        if self._session is None:
            return
        try:
            await self._stop_keepalive()
            if self._pending_frees:
                await asyncio.gather(*self._pending_frees, return_exceptions=True)
            if self._registration is not None and self._lost is None:
                try:
                    await self.unregister()
                except SharedPoolError as exc:
                    log.warning(
                        "could not unregister %s (%s); the daemon reclaims its buffers when "
                        "the lease expires",
                        self._client_id,
                        exc,
                    )
        finally:
            await self._close_session()

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _stop_keepalive(self) -> None:
        beat, self._beat = self._beat, None
        if beat is not None:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)

    async def _keep_alive(self, client_id: str, lease: float) -> None:
        """Heartbeat every `lease * KEEPALIVE_FRACTION` seconds; after a failed beat try
        again sooner (a quarter period) while the lease lasts; stop when the daemon says the
        lease is gone (the next call then raises LeaseLost)."""
        period = lease * KEEPALIVE_FRACTION
        delay = period
        while True:
            await asyncio.sleep(delay)
            try:
                await self._once("POST", f"/v1/clients/{client_id}/heartbeat", None, self._auth())
            except ApiError as exc:
                if exc.status == 401:
                    self._lost = exc
                    log.warning("lease of client %s lost: %s", client_id, exc)
                    return
                delay = period / 4
            except SharedPoolError:
                delay = period / 4
            else:
                delay = period

    # ---- requests -------------------------------------------------------------------------

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def _check_lease(self) -> None:
        if self._lost is not None and self._client_id is not None:
            raise LeaseLost.from_error(self._lost, self._client_id)

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        auth: bool = True,
        retry: RetryPolicy | None = None,
    ) -> Any:
        """Any API call: the decoded JSON answer (text for non-JSON answers). The escape hatch
        for what has no typed method; the same errors, retry and lease rules apply."""
        return await self._call(method, path, body, auth=auth, retry=retry)

    async def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        auth: bool = True,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """One call: retried on 503 under the policy; 401 for our own token is LeaseLost."""
        self._check_lease()
        policy = retry or self._retry
        loop = asyncio.get_running_loop()
        deadline = loop.time() + policy.deadline
        hdrs = {**(self._auth() if auth else {}), **(headers or {})}
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._once(method, path, body, hdrs)
            except ApiError as exc:
                exc.attempts = attempt
                if exc.status == 401 and auth and self._client_id is not None:
                    self._lost = exc
                    raise LeaseLost.from_error(exc, self._client_id) from None
                if exc.status != 503 or attempt >= policy.attempts:
                    raise
                wait = policy.wait(attempt, exc.retry_after)
                if loop.time() + wait > deadline:
                    raise
            await asyncio.sleep(wait)

    async def _once(self, method: str, path: str, body: Any, headers: Mapping[str, str]) -> Any:
        session = self._session
        if session is None:
            raise RuntimeError("SharedPoolClient is not open: use `async with SharedPoolClient()`")
        data = None
        hdrs = dict(headers)
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        try:
            async with session.request(method, self._base + path, data=data, headers=hdrs) as resp:
                raw = await resp.read()
                status, rheaders = resp.status, resp.headers
        except TimeoutError as exc:
            raise DaemonUnavailable(
                f"{method} {path}: no answer from sharedpoold at {self.url} within "
                f"{self._timeout:g} s"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise DaemonUnavailable(
                f"{method} {path}: cannot reach sharedpoold at {self.url}: {_why(exc)}"
            ) from exc
        if status >= 400:
            raise _error(status, rheaders, raw)
        if "json" in rheaders.get("Content-Type", ""):
            try:
                return json.loads(raw)
            except ValueError as exc:
                raise BadResponse(f"{method} {path}: invalid JSON from the daemon: {exc}") from None
        return raw.decode(errors="replace")

    def _cid(self) -> str:
        self._check_lease()
        if self._client_id is None:
            raise RuntimeError(
                "this SharedPoolClient has no client identity (it was opened with "
                "register=False, or with a token but no client_id)"
            )
        return self._client_id

    # ---- clients ---------------------------------------------------------------------------

    async def heartbeat(self) -> float:
        """Renew the lease now; the lease in seconds. (The keep-alive does this for you.)"""
        data = await self._call("POST", f"/v1/clients/{self._cid()}/heartbeat")
        try:
            self._lease_ttl = float(data["lease_ttl_seconds"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BadResponse(f"malformed heartbeat answer: {exc!r}") from None
        return self._lease_ttl

    async def unregister(self) -> Unregistered:
        """End our registration now: the daemon frees every buffer we hold. The client keeps
        its connection (anonymous calls still work). `close()` does this when we registered."""
        cid = self._cid()
        await self._stop_keepalive()
        result = Unregistered.parse(await self._call("DELETE", f"/v1/clients/{cid}"))
        self._client_id = None
        self._registration = None
        self._token = None
        return result

    # ---- buffers -------------------------------------------------------------------------------

    async def allocate(
        self, size: int, *, purpose: str = "", deadline: float | None = None
    ) -> Buffer:
        """A shared buffer of `size` bytes. A 503 (the pool is growing) is retried until
        `deadline` seconds (default: the retry policy's). Free it with `free()`, or use
        `buffer()` to scope it to a block."""
        body: dict[str, Any] = {"size": size}
        if purpose:
            body["purpose"] = purpose
        policy = self._retry if deadline is None else attrs.evolve(self._retry, deadline=deadline)
        return parse_buffer(await self._call("POST", "/v1/buffers", body, retry=policy))

    def buffer(self, size: int, *, purpose: str = "", deadline: float | None = None) -> BufferScope:
        """`async with client.buffer(size, purpose=...) as buf:` - allocated on entry, freed
        on exit, also when the block raises or is cancelled."""
        return BufferScope(self, size, purpose, deadline)

    async def get(self, buffer_id: int) -> Buffer:
        return parse_buffer(await self._call("GET", f"/v1/buffers/{int(buffer_id)}"))

    async def buffers(self) -> list[Buffer]:
        """Every buffer we hold, in id order."""
        data = await self._call("GET", "/v1/buffers")
        if not isinstance(data, list):
            raise BadResponse(f"GET /v1/buffers: expected a list, got {data!r:.200}")
        return [parse_buffer(item) for item in data]

    async def free(self, buffer: Buffer | int) -> FreeResult:
        """Free a buffer (or a buffer id). A second free raises ApiError `double-free`."""
        buffer_id = buffer.id if isinstance(buffer, Buffer) else int(buffer)
        return FreeResult.parse(await self._call("DELETE", f"/v1/buffers/{buffer_id}"))

    def _free_shielded(self, buffer_id: int) -> asyncio.Task[FreeResult]:
        """The free as a task of its own (cancelling the caller does not cancel it); close()
        waits for it before unregistering."""
        task = asyncio.ensure_future(self.free(buffer_id))
        self._pending_frees.add(task)
        task.add_done_callback(self._pending_frees.discard)
        return task

    # ---- the pool (no identity needed) --------------------------------------------------------

    async def stats(self) -> PoolStats:
        return PoolStats.parse(await self._call("GET", "/v1/pool"))

    async def metrics(self) -> str:
        """The Prometheus exposition text of /metrics."""
        return str(await self._call("GET", "/metrics", auth=False))

    async def ready(self) -> bool:
        """Whether the daemon serves requests now (False while it builds or restores the pool,
        and when it cannot be reached)."""
        try:
            await self._call("GET", "/readyz", auth=False, retry=NO_RETRY)
        except (ApiError, DaemonUnavailable):
            return False
        return True

    # ---- admin (the admin token, or the daemon's own uid on its Unix socket) ------------------

    async def grow(self, nbytes: int) -> int:
        """Grow the pool by `nbytes`; the bytes actually added."""
        data = await self._call("POST", "/v1/pool/grow", {"bytes": nbytes})
        return int(data["grown_bytes"])

    async def shrink(self, force: bool = False) -> int:
        """Release free chunks now (`force`: below the watermarks too); the bytes released."""
        data = await self._call("POST", "/v1/pool/shrink", {"force": True} if force else None)
        return int(data["released_bytes"])

    async def invariants(self) -> dict[str, Any]:
        """The daemon's self-check: {ok, buffers, clients, pages} or {ok: false, error}."""
        return dict(await self._call("GET", "/v1/debug/invariants"))


def default_url() -> str:
    """The Unix socket sharedpoold listens on when given no listener (the one rule, in
    daemon.config): systemd's $RUNTIME_DIRECTORY, /run/sharedpoold for root, else
    $XDG_RUNTIME_DIR/sharedpool."""
    from daemon.config import default_unix_socket

    return "unix:" + default_unix_socket()


async def register_client(
    url: str | None = None,
    name: str = "",
    *,
    registration_secret: str | None = None,
    timeout: float = 30.0,
    retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen, shared safely
) -> Registration:
    """Register a client whose life is not one `async with` block: it ends with an explicit
    unregister() or when its lease expires. Act as it (from this process or a later one)
    with `SharedPoolClient(url, token=reg.token, client_id=reg.client_id)`, which keeps
    the lease alive while open and leaves the registration in place on exit."""
    headers = {"Authorization": f"Bearer {registration_secret}"} if registration_secret else {}
    async with SharedPoolClient(url, register=False, timeout=timeout, retry=retry) as anon:
        data = await anon._call("POST", "/v1/clients", {"name": name}, headers=headers, auth=False)
    return Registration.parse(data)


class BufferScope:
    """An allocation bound to an `async with` block (see SharedPoolClient.buffer). After the
    block, `result` holds the FreeResult (None if the free could not be done)."""

    def __init__(self, client: SharedPoolClient, size: int, purpose: str, deadline: float | None):
        self._client = client
        self._size = size
        self._purpose = purpose
        self._deadline = deadline
        self.buffer: Buffer | None = None
        self.result: FreeResult | None = None

    async def __aenter__(self) -> Buffer:
        if self.buffer is not None:
            raise RuntimeError("a BufferScope is entered once")
        self.buffer = await self._client.allocate(
            self._size, purpose=self._purpose, deadline=self._deadline
        )
        return self.buffer

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Free the buffer. If the block raised, a failed free is logged and the block's
        exception goes on; otherwise the free's error is raised. A buffer the block freed
        itself (double-free) is fine."""
        buf = self.buffer
        if buf is None:
            return
        # shielded: a second cancellation while freeing leaves the free running in its own
        # task (CancelledError goes on to the caller; the client's close() waits for it)
        task = self._client._free_shielded(buf.id)
        try:
            self.result = await asyncio.shield(task)
        except ApiError as err:
            if err.name == "double-free":
                return
            if exc is None:
                raise
            log.warning("could not free buffer %d after %r: %s", buf.id, exc, err)
        except SharedPoolError as err:
            if exc is None:
                raise
            log.warning("could not free buffer %d after %r: %s", buf.id, exc, err)


def _why(exc: BaseException) -> str:
    """A connection failure in a few words, without aiohttp's internals ("ssl:default")."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return exc.os_error.strerror or str(exc.os_error) or "connection refused"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the daemon closed the connection without answering"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _error(status: int, headers: Mapping[str, str], raw: bytes) -> ApiError:
    retry_after = parse_retry_after(headers.get("Retry-After"))
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return ApiError(
            status, "about:blank", raw.decode(errors="replace")[:200] or "error", "", retry_after
        )
    return ApiError(
        status,
        str(body.get("type", "about:blank")),
        str(body.get("title", "")),
        str(body.get("detail", "")),
        retry_after,
        body,
    )
