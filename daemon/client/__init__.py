"""The Python client of sharedpoold, async and synchronous.

    from daemon.client import SyncSharedPoolClient

    with SyncSharedPoolClient(name="nic0") as pool:  # the daemon's default socket
        with pool.buffer(16 << 20, purpose="recv") as buf:
            print(buf.id, hex(buf.va), buf.ranges)

    from daemon.client import SharedPoolClient

    async with SharedPoolClient("unix:/run/sharedpoold/sharedpoold.sock", "nic0") as pool:
        async with pool.buffer(16 << 20, purpose="recv") as buf:
            ...

Modules: `aio` (SharedPoolClient: registration, keep-alive, retry, buffer scopes), `sync`
(SyncSharedPoolClient: the same over a private event-loop thread), `values` (typed answers),
`retry` (which answers are retried and when), `errors` (the one error hierarchy).
"""

from daemon.client.aio import BufferScope, SharedPoolClient, default_url, register_client
from daemon.client.errors import (
    ApiError,
    BadResponse,
    DaemonUnavailable,
    LeaseLost,
    SharedPoolError,
)
from daemon.client.retry import NO_RETRY, RetryPolicy, parse_retry_after
from daemon.client.sync import SyncBufferScope, SyncSharedPoolClient
from daemon.client.values import (
    Buffer,
    FreeResult,
    PfnRange,
    PoolStats,
    Registration,
    StrategyStats,
    Unregistered,
)

__all__ = [
    "NO_RETRY",
    "ApiError",
    "BadResponse",
    "Buffer",
    "BufferScope",
    "DaemonUnavailable",
    "FreeResult",
    "LeaseLost",
    "PfnRange",
    "PoolStats",
    "Registration",
    "RetryPolicy",
    "SharedPoolClient",
    "SharedPoolError",
    "StrategyStats",
    "SyncBufferScope",
    "SyncSharedPoolClient",
    "Unregistered",
    "default_url",
    "parse_retry_after",
    "register_client",
]
