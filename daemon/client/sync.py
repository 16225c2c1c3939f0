"""SyncSharedPoolClient: the async client for scripts and tests that do not run an event loop.

It is not a re-implementation: each call runs SharedPoolClient's coroutine on a private
event loop in a daemon thread, so the rules (registration as the context, retry, errors,
buffer scopes) are the async client's. The thread is also what keeps the lease alive: the
keep-alive task goes on beating while the calling thread sleeps or computes, which a loop
run only during calls (asyncio.run per call) could not do.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

from daemon.client.aio import BufferScope, SharedPoolClient
from daemon.client.retry import RetryPolicy
from daemon.client.values import Buffer, FreeResult, PoolStats, Registration, Unregistered

__all__ = ["SyncBufferScope", "SyncSharedPoolClient"]

T = TypeVar("T")


class SyncSharedPoolClient:
    """`with SyncSharedPoolClient(url, "name") as pool:` - the arguments and methods of
    SharedPoolClient, blocking."""

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
        self._client = SharedPoolClient(
            url,
            name,
            register=register,
            token=token,
            client_id=client_id,
            registration_secret=registration_secret,
            timeout=timeout,
            retry=retry,
            keepalive=keepalive,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        loop = self._loop
        if loop is None:
            coro.close()
            raise RuntimeError("SyncSharedPoolClient is not open: use it in a `with` block")
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # KeyboardInterrupt in the caller: stop the call in the loop too
            raise

    # ---- life cycle ----------------------------------------------------------------------

    def __enter__(self) -> SyncSharedPoolClient:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> SyncSharedPoolClient:
        if self._loop is not None:
            raise RuntimeError("this SyncSharedPoolClient is open already")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="sharedpool-client", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self._run(self._client.open())
        except BaseException:
            self._stop_loop()
            raise
        return self

    def close(self) -> None:
        if self._loop is None:
            return
        try:
            self._run(self._client.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    # ---- identity --------------------------------------------------------------------------

    @property
    def client_id(self) -> str | None:
        return self._client.client_id

    @property
    def token(self) -> str | None:
        return self._client.token

    @property
    def registration(self) -> Registration | None:
        return self._client.registration

    @property
    def lease_ttl(self) -> float | None:
        return self._client.lease_ttl

    # ---- calls (see SharedPoolClient) ---------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *, auth: bool = True) -> Any:
        return self._run(self._client.request(method, path, body, auth=auth))

    def heartbeat(self) -> float:
        return self._run(self._client.heartbeat())

    def unregister(self) -> Unregistered:
        return self._run(self._client.unregister())

    def allocate(self, size: int, *, purpose: str = "", deadline: float | None = None) -> Buffer:
        return self._run(self._client.allocate(size, purpose=purpose, deadline=deadline))

    def buffer(
        self, size: int, *, purpose: str = "", deadline: float | None = None
    ) -> SyncBufferScope:
        """`with pool.buffer(size, purpose=...) as buf:` - freed when the block ends, also
        when it raises."""
        return SyncBufferScope(self, self._client.buffer(size, purpose=purpose, deadline=deadline))

    def get(self, buffer_id: int) -> Buffer:
        return self._run(self._client.get(buffer_id))

    def buffers(self) -> list[Buffer]:
        return self._run(self._client.buffers())

    def free(self, buffer: Buffer | int) -> FreeResult:
        return self._run(self._client.free(buffer))

    def stats(self) -> PoolStats:
        return self._run(self._client.stats())

    def metrics(self) -> str:
        return self._run(self._client.metrics())

    def ready(self) -> bool:
        return self._run(self._client.ready())

    def grow(self, nbytes: int) -> int:
        return self._run(self._client.grow(nbytes))

    def shrink(self, force: bool = False) -> int:
        return self._run(self._client.shrink(force))

    def invariants(self) -> dict[str, Any]:
        return self._run(self._client.invariants())


class SyncBufferScope:
    """The async BufferScope, entered and left on the client's loop."""

    def __init__(self, client: SyncSharedPoolClient, scope: BufferScope) -> None:
        self._client = client
        self._scope = scope

    @property
    def result(self) -> FreeResult | None:
        return self._scope.result

    def __enter__(self) -> Buffer:
        return self._client._run(self._scope.__aenter__())

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._client._run(self._scope.__aexit__(exc_type, exc, tb))
