"""A real sharedpoold whose snapshot row another writer replaced: a pickle that would
create a file when unpickled is refused at the restart (exit 3, one clear line) and never
executed; a snapshot of an unknown format version likewise."""

from __future__ import annotations

import pickle
import signal
import sqlite3
import zlib
from pathlib import Path
from typing import Any

from support.daemons import Daemon

from daemon import plaindata
from daemon.client import SharedPoolClient


class _Plant:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (str(self.path), "w"))


async def _daemon_with_snapshot(tmp: Path) -> Path:
    d = Daemon(tmp)
    try:
        await d.wait_ready()
        async with SharedPoolClient(d.unix_url, name="a") as c:  # registers on enter
            await c.allocate(65536, purpose="x")
        d.signal(signal.SIGTERM)
        assert d.wait() == 0, d.output()
        assert "Traceback" not in d.output()
    finally:
        d.stop()
    return d.state / "sharedpoold.db"


def _replace_snapshot(db: Path, data: bytes) -> None:
    with sqlite3.connect(db) as conn:  # as another writer would
        (n,) = conn.execute("SELECT count(*) FROM snapshot").fetchone()
        assert n == 1
        conn.execute("UPDATE snapshot SET data = ? WHERE id = 1", (data,))


def _restart(tmp: Path) -> str:
    d = Daemon(tmp)
    try:
        assert d.wait(30) == 3, d.output()
        return d.output()
    finally:
        d.stop()


async def test_planted_pickle_is_refused_and_never_run(tmp_path: Path) -> None:
    db = await _daemon_with_snapshot(tmp_path)
    marker = tmp_path / "planted-pickle-ran"
    plant = {"format": 1, "seq": 1, "strategy": _Plant(marker)}
    _replace_snapshot(db, zlib.compress(pickle.dumps(plant)))
    out = _restart(tmp_path)
    assert "snapshot format 1 (a pickle) not understood" in out
    assert "--reset-state" in out and "Traceback" not in out
    assert not marker.exists()


async def test_unknown_snapshot_version_is_refused(tmp_path: Path) -> None:
    db = await _daemon_with_snapshot(tmp_path)
    with sqlite3.connect(db) as conn:
        (data,) = conn.execute("SELECT data FROM snapshot WHERE id = 1").fetchone()
    doc, binary = plaindata.unpack(data)
    assert doc["format"] == 2
    doc["format"] = 7
    _replace_snapshot(db, plaindata.pack(doc, binary))
    out = _restart(tmp_path)
    assert "snapshot format 7 not understood" in out and "Traceback" not in out
