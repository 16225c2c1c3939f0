"""Read views of the daemon's state: values taken in one go, for the API to serialise
(daemon.api builds the JSON) and for tools. Reading changes nothing."""

from __future__ import annotations

import attrs

from daemon.state import DaemonState
from pool.guest.machine import GuestReport
from pool.memmap import MemoryMap, memory_map
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


def memory_map_view(state: DaemonState) -> MemoryMap:
    """GET /v1/memory-map: the guest's 2 MiB regions with the strategy's chunks on them
    (pool.memmap). Aggregate only: no client, owner or buffer appears in it."""
    return memory_map(state.guest, state.strategy, state.strategy.name)


def memory_map_key(state: DaemonState, journal_seq: int) -> tuple[int, ...]:
    """What the map depends on, cheaply: every change to the state is a journal record; a
    refused allocation that grew the pool first changes the guest's counters."""
    guest = state.guest
    return (
        journal_seq,
        guest.stats.pages_converted,
        guest.stats.pages_zeroed,
        guest.allocator.free_pages(),
    )
