"""Read views of the daemon's state: values taken in one go, for the API to serialise
(daemon.api builds the JSON) and for tools. Reading changes nothing."""

from __future__ import annotations

import attrs

from daemon.state import DaemonState
from pool.guest.machine import GuestReport
from pool.strategy import StrategyStats


@attrs.frozen
class DaemonCounters:
    clients: int
    buffers: int
    reclaimed_buffers: int
    journal_seq: int
    snapshot_seq: int


@attrs.frozen
class PoolView:
    """GET /v1/pool: the strategy's statistics, the guest's report, the daemon's counters."""

    strategy: StrategyStats
    platform: str
    memory_bytes: int
    guest: GuestReport
    daemon: DaemonCounters


def pool_view(state: DaemonState, journal_seq: int, snapshot_seq: int) -> PoolView:
    guest = state.guest
    stats = state.strategy.stats()
    return PoolView(
        strategy=stats,
        platform=guest.config.platform,
        memory_bytes=guest.config.memory_bytes,
        guest=guest.report(),
        daemon=DaemonCounters(
            clients=len(state.clients),
            buffers=stats.buffers,  # a count: buffers() would list (and sort) every one
            reclaimed_buffers=state.reclaimed_buffers,
            journal_seq=journal_seq,
            snapshot_seq=snapshot_seq,
        ),
    )
