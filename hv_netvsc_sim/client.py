"""The seam between the simulated driver and the pool: one small async client interface.

The driver (hv_netvsc_sim.device) sees only `PoolClient`: allocate a shared buffer,
free it (learning whether it was leaked), close. Two implementations:

- `InProcessClient` calls a strategy object directly (pool.make_strategy); its
  coroutines never suspend, so a whole scenario runs in one event-loop task at the
  cost of a function call per request.
- `RemoteClient` drives the daemon (`sharedpoold`) through its async HTTP client,
  daemon.client.SharedPoolClient, imported lazily so the simulator works without the
  daemon installed. It registers as a client, heartbeats in the background and
  unregisters on close. The daemon's JSON buffer becomes the same immutable
  pool.Buffer the in-process path returns, so the driver and the host see the same
  values either way.

Every refusal, whichever path it comes from, is raised as the one exception the
driver handles: `PoolError`, with a stable machine-readable `reason` (the strategy's
AllocationError reason - invalid_size, too_large, exhausted, no_memory,
conversion_failed - or, remotely, the daemon's problem type; `unavailable` when the
daemon cannot be reached).

Both clients keep the same request counters (`ClientStats`): allocations, failures
by reason, frees, leaked buffers and bytes, and the wall-clock latency of every
successful allocate call (failed calls are counted, not timed: a refusal that costs
nothing would drag the percentiles down).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from array import array
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from pool.strategy import Buffer, PfnRange, Strategy, StrategyError

if TYPE_CHECKING:  # pragma: no cover
    from daemon.client import SharedPoolClient


class PoolError(Exception):
    """The pool refused or failed a request. `reason` is a stable word; `status` is the
    daemon's HTTP status when the request went through the daemon."""

    def __init__(self, reason: str, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


class PoolClient(Protocol):
    """What the driver needs from the pool."""

    owner: str
    stats: ClientStats

    async def allocate(self, size: int, purpose: str) -> Buffer: ...

    async def free(self, buffer_id: int) -> bool:
        """Free a buffer; True when its pages were leaked (re-encryption failed)."""
        ...

    async def close(self) -> None: ...


@attrs.define
class ClientStats:
    """Request counters kept on the driver's side of the seam."""

    allocations: int = 0
    allocated_bytes: int = 0
    failures: int = 0
    failure_reasons: dict[str, int] = attrs.Factory(dict)
    frees: int = 0
    leaked_buffers: int = 0
    leaked_bytes: int = 0
    latencies: array[float] = attrs.Factory(lambda: array("d"))
    free_seconds: float = 0.0  # wall clock spent in free calls (the allocate side: latencies)

    def failed(self, reason: str) -> None:
        self.failures += 1
        self.failure_reasons[reason] = self.failure_reasons.get(reason, 0) + 1

    def latency_percentiles(self, start: int = 0) -> dict[str, float]:
        """p50 / p99 (nearest rank) of the allocate latencies recorded from index `start`."""
        values = sorted(self.latencies[start:])
        if not values:
            return {"p50": 0.0, "p99": 0.0}
        n = len(values)
        return {
            "p50": values[max(0, -(-50 * n // 100) - 1)],
            "p99": values[max(0, -(-99 * n // 100) - 1)],
        }


class InProcessClient:
    """A strategy object behind the client interface (direct calls, no copies)."""

    def __init__(self, strategy: Strategy, owner: str = "hv_netvsc") -> None:
        self.strategy = strategy
        self.owner = owner
        self.stats = ClientStats()
        self._sizes: dict[int, int] = {}

    async def allocate(self, size: int, purpose: str) -> Buffer:
        stats = self.stats
        t0 = time.perf_counter()
        try:
            buf = self.strategy.allocate(size, self.owner, purpose)
        except StrategyError as exc:
            stats.failed(exc.reason)
            raise PoolError(exc.reason, str(exc)) from None
        stats.latencies.append(time.perf_counter() - t0)
        stats.allocations += 1
        stats.allocated_bytes += size
        self._sizes[buf.id] = buf.npages << 12
        return buf

    async def free(self, buffer_id: int) -> bool:
        t0 = time.perf_counter()
        try:
            result = self.strategy.free(buffer_id, self.owner)
        except StrategyError as exc:
            raise PoolError(exc.reason, str(exc)) from None
        finally:
            self.stats.free_seconds += time.perf_counter() - t0
        self.stats.frees += 1
        held = self._sizes.pop(buffer_id, 0)
        if result.leaked:
            self.stats.leaked_buffers += 1
            self.stats.leaked_bytes += held
        return result.leaked

    async def close(self) -> None:
        """Nothing to release: the strategy belongs to the caller."""

    # -- in-process extras (the scenario engine and the host use them when present) ----------
    def maintain(self, now: float) -> bool:
        """The strategy's background work at virtual time `now` (grow / shrink)."""
        return self.strategy.maintain(now)

    def owns(self, buffer: Buffer) -> bool:
        """Whether the guest still owns `buffer` as handed out: live in the strategy, ours,
        with the same pages. The host asks before every write (use-after-free detector)."""
        try:
            live = self.strategy.get(buffer.id)
        except StrategyError:
            return False
        return live.owner == buffer.owner and live.ranges == buffer.ranges


def buffer_from_json(data: Mapping[str, Any]) -> Buffer:
    """The daemon's JSON buffer (pool.Buffer.as_json) back into a pool.Buffer."""
    try:
        ranges = tuple(PfnRange(int(s), int(n)) for s, n in data["pfn_ranges"])
        return Buffer(
            id=int(data["id"]),
            size=int(data["size"]),
            owner=str(data["owner"]),
            purpose=str(data.get("purpose", "")),
            ranges=ranges,
            va=int(data["va"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PoolError("bad_response", f"malformed buffer from the daemon: {exc!r}") from None


def _reason_of(exc: BaseException) -> tuple[str, int | None]:
    """A stable reason word from a daemon.client.ApiError: the strategy's own reason when the
    problem document carries one (allocation refusals do), else the problem type's short name
    ('urn:sharedpool:problem:pool-exhausted' -> 'pool_exhausted'); 'unavailable' for
    connection errors."""
    status = getattr(exc, "status", None)
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("reason"), str) and body["reason"]:
        return str(body["reason"]), status
    kind = getattr(exc, "type", None)
    if isinstance(kind, str) and kind and kind != "about:blank":
        short = kind.rstrip("/:").replace("/", ":").rsplit(":", 1)[-1]
        return short.replace("-", "_"), status
    title = getattr(exc, "title", None)
    if isinstance(title, str) and title:
        return title.lower().replace(" ", "_"), status
    return "unavailable", status


class RemoteClient:
    """The daemon behind the client interface.

    `url` is "unix:/path/to/socket" or "http://host:port". Use as `async with
    RemoteClient(url, name) as client:` or call `open()` / `close()`. Registration
    gives a client id (the owner of our buffers) and a token for later calls; a
    background task heartbeats every `heartbeat_seconds` so the daemon does not
    reclaim our buffers while we are alive.
    """

    def __init__(
        self,
        url: str,
        name: str = "hv-netvsc-sim",
        *,
        token: str | None = None,
        heartbeat_seconds: float = 5.0,
    ) -> None:
        self.url = url
        self.name = name
        self.owner = name
        self.client_id: str | None = None
        self.stats = ClientStats()
        self._token = token
        self._heartbeat_seconds = heartbeat_seconds
        self._api: SharedPoolClient | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._sizes: dict[int, int] = {}

    async def __aenter__(self) -> RemoteClient:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _errors(self) -> tuple[type[BaseException], ...]:
        import aiohttp

        from daemon.client import ApiError

        return (ApiError, aiohttp.ClientError, OSError, asyncio.TimeoutError)

    async def open(self) -> RemoteClient:
        """Connect, register as `name`, start heartbeating."""
        from daemon.client import SharedPoolClient

        api = SharedPoolClient(self.url, token=self._token)
        await api.__aenter__()
        self._api = api
        try:
            reg = await api.register(self.name)
        except self._errors() as exc:
            await self._drop_api()
            reason, status = _reason_of(exc)
            raise PoolError(
                reason, f"cannot register with the daemon at {self.url}: {exc}", status=status
            ) from None
        self.client_id = str(reg.get("client_id", self.name))
        self.owner = self.client_id
        # register() keeps the token for the later calls (daemon.client.SharedPoolClient)
        self._heartbeat = asyncio.create_task(self._beat(), name="hv-netvsc-sim heartbeat")
        return self

    async def _beat(self) -> None:
        assert self._api is not None
        while True:
            await asyncio.sleep(self._heartbeat_seconds)
            with contextlib.suppress(Exception):  # a missed beat is retried next period
                await self._api.heartbeat()

    def _require(self) -> SharedPoolClient:
        if self._api is None:
            raise PoolError("not_connected", "RemoteClient is not open (use `async with`)")
        return self._api

    async def allocate(self, size: int, purpose: str) -> Buffer:
        api = self._require()
        t0 = time.perf_counter()
        try:
            data = await api.allocate(size, purpose=purpose)
        except self._errors() as exc:
            reason, status = _reason_of(exc)
            self.stats.failed(reason)
            raise PoolError(reason, str(exc), status=status) from None
        buf = buffer_from_json(data)
        self.stats.latencies.append(time.perf_counter() - t0)
        self.stats.allocations += 1
        self.stats.allocated_bytes += size
        self._sizes[buf.id] = buf.npages << 12
        return buf

    async def free(self, buffer_id: int) -> bool:
        api = self._require()
        try:
            data = await api.free(buffer_id)
        except self._errors() as exc:
            reason, status = _reason_of(exc)
            raise PoolError(reason, str(exc), status=status) from None
        leaked = bool(data.get("leaked", False))
        self.stats.frees += 1
        held = self._sizes.pop(buffer_id, 0)
        if leaked:
            self.stats.leaked_buffers += 1
            self.stats.leaked_bytes += held
        return leaked

    async def daemon_stats(self) -> dict[str, Any]:
        api = self._require()
        try:
            return dict(await api.stats())
        except self._errors() as exc:
            reason, status = _reason_of(exc)
            raise PoolError(reason, str(exc), status=status) from None

    async def _drop_api(self) -> None:
        api, self._api = self._api, None
        if api is not None:
            with contextlib.suppress(Exception):
                await api.__aexit__(None, None, None)

    async def close(self) -> None:
        """Stop heartbeating, unregister (the daemon reclaims anything left), disconnect."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        if self._api is not None and self.client_id is not None:
            with contextlib.suppress(Exception):
                await self._api.unregister()
            self.client_id = None
        await self._drop_api()
