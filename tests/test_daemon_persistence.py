"""The journal and the snapshot, in process: replay rebuilds the very same state (stats,
counters, buffers, PFNs), a snapshot plus the journal's tail does too, a journal that does
not replay is refused loudly, and fault injection replays deterministically."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import attrs
import pytest
from support.daemons import small_config

from daemon.config import Config
from daemon.engine import RestoreError, Service
from pool.strategy import AllocationError


async def _open(config: Config) -> Service:
    service = Service(config)
    await asyncio.to_thread(service.open)
    return service


def _fingerprint(service: Service) -> dict[str, Any]:
    assert service.strategy is not None and service.guest is not None
    return {
        "buffers": [b.as_json() for b in service.strategy.buffers()],
        "stats": service.strategy.stats().as_json(),
        "guest": attrs.asdict(service.guest.stats.snapshot()),
        "free_pages": service.guest.allocator.free_pages(),
        "direct_map": service.guest.direct_map.bytes_by_size(),
        "clients": sorted((c.id, c.name, c.token_hash) for c in service.clients.values()),
        "reclaimed": service.reclaimed_buffers,
        "now": getattr(service.strategy, "now", None),
    }


async def _workload(service: Service) -> None:
    """Allocations, frees, growth, maintenance at chosen times (hysteresis), expiry."""
    a = await service.register("a")
    b = await service.register("b")
    ca, cb = service.clients[a.client_id], service.clients[b.client_id]
    bufs = [await service.allocate(ca, size, "x") for size in (4096, 4 << 20, 6144, 2 << 20)]
    bufs += [await service.allocate(cb, size, "y") for size in (1 << 20, 3 << 20, 8192)]
    await service.free(ca, bufs[1].id)
    service.clock.observe(100.0)  # time passes: background passes at chosen instants
    for _ in range(5):
        await service.maintain()
    await service.free(cb, bufs[5].id)
    service.clock.observe(200.0)
    await service.maintain()
    await service.grow(8 << 20)
    service.clock.observe(400.0)
    for _ in range(3):
        await service.maintain()
    await service.shrink(force=False)
    await service.allocate(ca, 32 << 20, "big")
    with pytest.raises(AllocationError):
        await service.allocate(ca, 32 << 20, "too much")  # 503 exhausted: journaled too
    cb.last_seen -= 10_000
    assert await service.expire_leases() == [cb.id]
    await service.allocate(ca, 64 << 10, "after")


async def test_replay_rebuilds_identical_state(tmp_path: Path) -> None:
    config = small_config(tmp_path / "state")
    service = await _open(config)
    await _workload(service)
    want = _fingerprint(service)
    assert want["reclaimed"] == 2 and want["stats"]["failures"] == 1
    await service.close(snapshot=False)  # as after a kill -9: the journal only

    again = await _open(config)
    assert again.restore_info["source"] == "a fresh guest"
    assert again.restore_info["replayed_records"] > 10
    assert _fingerprint(again) == want
    again.check_invariants()
    await again.close()  # writes a snapshot

    third = await _open(config)
    assert third.restore_info["source"].startswith("snapshot at record")
    assert third.restore_info["replayed_records"] == 0
    assert _fingerprint(third) == want
    await third.close()


async def test_snapshot_plus_journal_tail(tmp_path: Path) -> None:
    config = small_config(tmp_path / "state")
    service = await _open(config)
    a = await service.register("a")
    ca = service.clients[a.client_id]
    for size in (4096, 1 << 20):
        await service.allocate(ca, size, "")
    seq = await service.snapshot()
    db = sqlite3.connect(config.state_dir / "sharedpoold.db")
    assert db.execute("SELECT COUNT(*) FROM journal").fetchone()[0] == 0  # compacted
    buf = await service.allocate(ca, 3 << 20, "tail")
    await service.free(ca, 1)
    want = _fingerprint(service)
    # no close: a crash right here
    again = await _open(config)
    assert again.restore_info["source"] == f"snapshot at record {seq}"
    assert again.restore_info["replayed_records"] == 2
    assert _fingerprint(again) == want
    assert again.strategy is not None and again.strategy.get(buf.id) == buf
    db.close()
    await again.close()
    service.journal = None  # (the crashed instance's connection is abandoned)


async def test_journal_that_does_not_replay_is_refused(tmp_path: Path) -> None:
    config = small_config(tmp_path / "state")
    service = await _open(config)
    a = await service.register("a")
    await service.allocate(service.clients[a.client_id], 1 << 20, "")
    await service.close(snapshot=False)
    db = sqlite3.connect(config.state_dir / "sharedpoold.db")
    seq, result = db.execute("SELECT seq, result FROM journal WHERE op = 'allocate'").fetchone()
    doc = json.loads(result)
    doc["pfn_ranges"][0][0] += 1
    db.execute("UPDATE journal SET result = ? WHERE seq = ?", (json.dumps(doc), seq))
    db.commit()
    db.close()
    with pytest.raises(RestoreError, match=f"journal record {seq}"):
        await _open(config)


async def test_fault_injection_replays_and_leaks(tmp_path: Path) -> None:
    # Re-encryption always fails: a forced shrink leaks its chunks, never frees them.
    config = small_config(
        tmp_path / "state", faults__failure_rate=1.0, faults__direction="to_private"
    )
    service = await _open(config)
    a = await service.register("a")
    ca = service.clients[a.client_id]
    await service.allocate(ca, 1 << 20, "")
    await service.grow(8 << 20)
    assert await service.shrink(force=True) == 0
    stats = service.strategy.stats() if service.strategy else None
    assert stats is not None and stats.leaked_bytes > 0 and stats.chunks["leaked"] > 0
    service.check_invariants()
    want = _fingerprint(service)
    await service.close(snapshot=False)
    again = await _open(config)
    assert _fingerprint(again) == want
    await again.close()

    # Every decryption fails (vmalloc): the allocation is refused, pages leaked, state sane.
    config = small_config(
        tmp_path / "state2",
        faults__failure_rate=1.0,
        faults__direction="to_shared",
        pool__strategy="vmalloc-directmap",
    )
    service = await _open(config)
    a = await service.register("a")
    with pytest.raises(AllocationError) as err:
        await service.allocate(service.clients[a.client_id], 64 << 10, "")
    assert err.value.reason == "conversion_failed"
    assert service.strategy is not None and service.strategy.stats().leaked_bytes == 64 << 10
    service.check_invariants()
    await service.close()


async def test_replay_on_an_aged_guest(tmp_path: Path) -> None:
    """Whatever the aged page allocator grants or refuses, replay reproduces it."""
    config = small_config(tmp_path / "state", guest__age_steps=20_000)
    service = await _open(config)
    a = await service.register("a")
    ca = service.clients[a.client_id]
    outcomes = []
    for i, size in enumerate((4096, 1 << 20, 5 << 20, 6144, 9 << 20, 2 << 20, 12 << 20)):
        try:
            buf = await service.allocate(ca, size, f"b{i}")
            outcomes.append(buf.id)
        except AllocationError as err:
            outcomes.append(err.reason)
        if i % 3 == 2 and isinstance(outcomes[0], int):
            await service.free(ca, outcomes[0])
            outcomes[0] = "freed"
        service.clock.observe(50.0 * (i + 1))
        await service.maintain()
    want = _fingerprint(service)
    await service.close(snapshot=False)
    again = await _open(config)
    assert _fingerprint(again) == want
    again.check_invariants()
    await again.close()
