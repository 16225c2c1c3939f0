"""The seam between the simulated driver and the pool: one small async client interface.

The driver (hv_netvsc_sim.device) sees only `PoolClient`: allocate a shared buffer,
free it (learning whether it was leaked), close. Two implementations:

- `InProcessClient` calls a strategy object directly (pool.make_strategy); its
  coroutines never suspend, so a whole scenario runs in one event-loop task at the
  cost of a function call per request.
- `RemoteClient` drives the daemon (`sharedpoold`) through its client library,
  daemon.client.SharedPoolClient, imported lazily so the simulator works without the
  daemon installed. The library registers, keeps the lease alive, retries 503s and
  unregisters on close; it returns the same immutable pool.Buffer the in-process path
  returns, so the driver and the host see the same values either way.

Every refusal, whichever path it comes from, is raised as the one exception the
driver handles: `PoolError`, with a stable machine-readable `reason` (the strategy's
AllocationError reason - invalid_size, too_large, exhausted, no_memory,
conversion_failed - or, remotely, the daemon's problem type; `unavailable` when the
daemon cannot be reached, `lease_lost` when it expired our registration).

Both clients keep the same request counters (`ClientStats`): allocations, failures
by reason, frees, leaked buffers and bytes, and the wall-clock latency of every
successful allocate call (failed calls are counted, not timed: a refusal that costs
nothing would drag the percentiles down).
"""

from __future__ import annotations

import time
from array import array
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from pool.strategy import Buffer, Strategy, StrategyError

if TYPE_CHECKING:  # pragma: no cover
    from daemon.client import SharedPoolClient, SharedPoolError


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


def _reason_of(exc: SharedPoolError) -> tuple[str, int | None]:
    """A stable reason word for a daemon.client error: the strategy's own reason when the
    problem document carries one (allocation refusals do), else the problem type's short name
    ('urn:sharedpool:problem:pool-exhausted' -> 'pool_exhausted'); 'lease_lost',
    'unavailable' (no answer) and 'bad_response' for the library's other errors."""
    from daemon.client import ApiError, DaemonUnavailable, LeaseLost

    if isinstance(exc, LeaseLost):
        return "lease_lost", exc.status
    if isinstance(exc, ApiError):
        word = exc.reason or exc.name or exc.title.lower().replace(" ", "_") or "error"
        return word.replace("-", "_"), exc.status
    if isinstance(exc, DaemonUnavailable):
        return "unavailable", None
    return "bad_response", None


class RemoteClient:
    """The daemon behind the client interface.

    `url` is "unix:/path/to/socket" or "http://host:port". Use as `async with
    RemoteClient(url, name) as client:` or call `open()` / `close()`. The library
    (daemon.client.SharedPoolClient) registers (the client id becomes the owner of our
    buffers), keeps the lease alive in the background, retries the daemon's 503s and
    unregisters on close.

    `alloc_deadline`: seconds an allocation may wait for a growing pool (503 with
    Retry-After) before it is a refusal the driver sees. The default 0 gives the driver the
    in-process client's view (a refusal is immediate), so the lab counts the same refusals
    either way; registration and the other calls retry under the library's policy (a daemon
    still building its pool answers 503 not-ready).
    """

    def __init__(
        self,
        url: str,
        name: str = "hv-netvsc-sim",
        *,
        registration_secret: str | None = None,
        alloc_deadline: float = 0.0,
    ) -> None:
        self.url = url
        self.name = name
        self.owner = name
        self.client_id: str | None = None
        self.stats = ClientStats()
        self._secret = registration_secret
        self._alloc_deadline = alloc_deadline
        self._api: SharedPoolClient | None = None
        self._sizes: dict[int, int] = {}

    async def __aenter__(self) -> RemoteClient:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> RemoteClient:
        """Connect and register as `name` (the library starts the keep-alive)."""
        from daemon.client import SharedPoolClient, SharedPoolError

        api = SharedPoolClient(self.url, self.name, registration_secret=self._secret)
        try:
            await api.open()
        except SharedPoolError as exc:
            reason, status = _reason_of(exc)
            raise PoolError(
                reason, f"cannot register with the daemon at {self.url}: {exc}", status=status
            ) from None
        self._api = api
        self.client_id = api.client_id
        self.owner = api.client_id or self.name
        return self

    def _require(self) -> SharedPoolClient:
        if self._api is None:
            raise PoolError("not_connected", "RemoteClient is not open (use `async with`)")
        return self._api

    async def allocate(self, size: int, purpose: str) -> Buffer:
        from daemon.client import SharedPoolError

        api = self._require()
        t0 = time.perf_counter()
        try:
            buf = await api.allocate(size, purpose=purpose, deadline=self._alloc_deadline)
        except SharedPoolError as exc:
            reason, status = _reason_of(exc)
            self.stats.failed(reason)
            raise PoolError(reason, str(exc), status=status) from None
        self.stats.latencies.append(time.perf_counter() - t0)
        self.stats.allocations += 1
        self.stats.allocated_bytes += size
        self._sizes[buf.id] = buf.npages << 12
        return buf

    async def free(self, buffer_id: int) -> bool:
        from daemon.client import SharedPoolError

        api = self._require()
        try:
            result = await api.free(buffer_id)
        except SharedPoolError as exc:
            reason, status = _reason_of(exc)
            raise PoolError(reason, str(exc), status=status) from None
        self.stats.frees += 1
        held = self._sizes.pop(buffer_id, 0)
        if result.leaked:
            self.stats.leaked_buffers += 1
            self.stats.leaked_bytes += held
        return result.leaked

    async def daemon_stats(self) -> dict[str, Any]:
        """The daemon's GET /v1/pool document."""
        from daemon.client import SharedPoolError

        api = self._require()
        try:
            return dict((await api.stats()).document)
        except SharedPoolError as exc:
            reason, status = _reason_of(exc)
            raise PoolError(reason, str(exc), status=status) from None

    async def close(self) -> None:
        """Unregister (the daemon reclaims anything left) and disconnect (the library stops
        the keep-alive first)."""
        api, self._api = self._api, None
        if api is not None:
            await api.close()
        self.client_id = None
