"""The daemon's durable state: one SQLite database in the state directory.

Tables:
  meta(key, value)            the state config (the guest/pool/fault settings the journal
                              depends on), the schema version;
  journal(seq, op, args, result)
                              every state-changing call, in the order it was made, with its
                              arguments and its outcome (JSON);
  snapshot(id=1, seq, data)   a compressed pickle of the whole in-memory state (strategy,
                              guest, clients) as of journal record `seq`; written in the same
                              transaction that deletes the records it covers (compaction).

WAL mode. ``synchronous=FULL`` by default: a commit is fsynced before the daemon answers, so
an acknowledged request survives a power loss, not only a kill -9 (``NORMAL`` would be
enough for process crashes: in WAL mode it syncs only at checkpoints). Commits are grouped
(:class:`AsyncJournal`): concurrent requests share one fsync.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


class JournalError(RuntimeError):
    """The journal could not be written: the daemon can no longer acknowledge anything."""


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


class Journal:
    """Synchronous access to the database. All calls after `open` come from one thread at a
    time (AsyncJournal funnels them through a single-worker executor)."""

    def __init__(self, path: Path, synchronous: str = "full") -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
        self._db.execute("PRAGMA foreign_keys=OFF")
        with self._tx():
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS journal (seq INTEGER PRIMARY KEY, "
                "op TEXT NOT NULL, args TEXT NOT NULL, result TEXT NOT NULL)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS snapshot (id INTEGER PRIMARY KEY "
                "CHECK (id = 1), seq INTEGER NOT NULL, data BLOB NOT NULL)"
            )
            version = self.get_meta("schema_version")
            if version is None:
                self.set_meta("schema_version", SCHEMA_VERSION)
            elif version != SCHEMA_VERSION:
                raise JournalError(f"{path}: schema version {version}, expected {SCHEMA_VERSION}")

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)

    def close(self) -> None:
        self._db.close()

    # -- meta ------------------------------------------------------------------------------
    def get_meta(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put_meta(self, key: str, value: Any) -> None:
        """Store one meta value, committed at once."""
        with self._tx():
            self.set_meta(key, value)

    def set_meta(self, key: str, value: Any) -> None:
        """Store one meta value inside the caller's transaction (see put_meta)."""
        self._db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, _dumps(value))
        )

    # -- journal ---------------------------------------------------------------------------
    def last_seq(self) -> int:
        row = self._db.execute("SELECT MAX(seq) FROM journal").fetchone()
        snap = self._db.execute("SELECT seq FROM snapshot WHERE id = 1").fetchone()
        return max(row[0] or 0, snap[0] if snap else 0)

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM journal").fetchone()[0])

    def records(self, after: int = 0) -> Iterator[tuple[int, str, dict[str, Any], Any]]:
        cur = self._db.execute(
            "SELECT seq, op, args, result FROM journal WHERE seq > ? ORDER BY seq", (after,)
        )
        for seq, op, args, result in cur:
            yield seq, op, json.loads(args), json.loads(result)

    def write(self, records: list[tuple[int, str, dict[str, Any], Any]]) -> None:
        with self._tx():
            self._db.executemany(
                "INSERT INTO journal (seq, op, args, result) VALUES (?, ?, ?, ?)",
                [(s, op, _dumps(a), _dumps(r)) for s, op, a, r in records],
            )

    # -- snapshot --------------------------------------------------------------------------
    def read_snapshot(self) -> tuple[int, bytes] | None:
        row = self._db.execute("SELECT seq, data FROM snapshot WHERE id = 1").fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def write_snapshot(self, seq: int, data: bytes) -> None:
        """Store the state as of record `seq` and drop the records it covers, atomically."""
        with self._tx():
            self._db.execute(
                "INSERT OR REPLACE INTO snapshot (id, seq, data) VALUES (1, ?, ?)", (seq, data)
            )
            self._db.execute("DELETE FROM journal WHERE seq <= ?", (seq,))
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")


class AsyncJournal:
    """Group commit over a Journal: `append` (synchronous, in call order) assigns the next
    sequence number; `sync` returns once every record appended so far is durable. One
    writer thread; a write failure is permanent (`failed`)."""

    def __init__(self, journal: Journal, first_seq: int) -> None:
        self.journal = journal
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="journal")
        self._pending: list[tuple[int, str, dict[str, Any], Any]] = []
        self.last_seq = first_seq  # last appended
        self.committed = first_seq  # last durable
        self._flushing: asyncio.Future[None] | None = None
        self.failed: BaseException | None = None
        self.writes = 0  # transactions committed (for tests and the bench)

    def append(self, op: str, args: dict[str, Any], result: Any) -> int:
        if self.failed is not None:
            raise JournalError("the journal failed earlier") from self.failed
        self.last_seq += 1
        self._pending.append((self.last_seq, op, args, result))
        return self.last_seq

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def sync(self, seq: int | None = None) -> None:
        """Wait until record `seq` (default: every record appended so far) is durable."""
        target = self.last_seq if seq is None else seq
        while self.committed < target:
            if self.failed is not None:
                raise JournalError("the journal could not be written") from self.failed
            if self._flushing is None:
                self._flushing = asyncio.ensure_future(self._flush())
            await asyncio.shield(self._flushing)

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        try:
            if batch:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._executor, self.journal.write, batch)
                self.writes += 1
                self.committed = batch[-1][0]
        except BaseException as exc:
            self.failed = exc
            raise
        finally:
            self._flushing = None

    async def run(self, fn: Any, *args: Any) -> Any:
        """Run a Journal method on the writer thread (after whatever is queued there)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.journal.close()
