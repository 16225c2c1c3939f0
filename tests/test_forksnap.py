"""Snapshots encoded in a forked child (daemon.forksnap): the child sees the state as of the
fork even while the parent keeps changing it, the event loop keeps running while the child
works, a failing child is reported (never half a snapshot), and a daemon whose fork is
refused still writes a snapshot that restores the same state, in-process."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path

import pytest
from support.daemons import small_config

from daemon import forksnap
from daemon.engine import Service


async def test_child_encodes_the_state_as_of_the_fork() -> None:
    state = {"n": 1}
    task = asyncio.create_task(
        forksnap.encode_forked(lambda: (time.sleep(0.2), b"%d" % state["n"])[1])
    )
    await asyncio.sleep(0)  # the fork has happened once the task ran to its first await
    state["n"] = 2  # the parent changes its state while the child encodes
    assert await task == b"1"


async def test_event_loop_runs_while_the_child_works() -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    before = ticks
    data = await forksnap.encode_forked(lambda: (time.sleep(0.5), b"x" * (3 << 20))[1])
    ticker.cancel()
    assert data == b"x" * (3 << 20)  # larger than a pipe buffer: read while written
    assert ticks - before >= 5  # the loop served while the child slept and wrote


async def test_failing_child_is_reported_not_half_written() -> None:
    def boom() -> bytes:
        raise ValueError("walk failed")

    with pytest.raises(forksnap.ForkFailed, match="status 1"):
        await forksnap.encode_forked(boom)


async def test_refused_fork_falls_back_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = small_config(tmp_path / "state")
    service = Service(config)
    await asyncio.to_thread(service.open)
    a = await service.register("a")
    ca = service.clients[a.client_id]
    buf = await service.allocate(ca, 1 << 20, "x")

    def no_fork() -> int:
        raise OSError(11, os.strerror(11))

    monkeypatch.setattr(forksnap.os, "fork", no_fork)
    seq = await service.snapshot()
    assert "snapshot encoded in-process" in caplog.text
    monkeypatch.undo()
    await service.close(snapshot=False)
    with sqlite3.connect(config.state_dir / "sharedpoold.db") as db:
        assert db.execute("SELECT seq FROM snapshot").fetchone() == (seq,)
    again = Service(config)
    await asyncio.to_thread(again.open)
    assert again.restore_info["source"] == f"snapshot at record {seq}"
    assert again.strategy is not None and again.strategy.get(buf.id) == buf
    await again.close()
