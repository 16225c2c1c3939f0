"""The daemon's durable state: one SQLite database in the state directory.

Tables:
  meta(key, value)            the state config (the guest/pool/fault settings the journal
                              depends on), the schema version;
  journal(seq, op, args, result, chain)
                              every state-changing call, in the order it was made, with its
                              arguments and its outcome (JSON), and a hash chained over every
                              record before it (chain_n = sha256(chain_n-1 | record n)), so
                              that one hash stands for the whole history up to a record;
  snapshot(id=1, seq, data, chain)
                              the whole in-memory state as of journal record `seq` (and that
                              record's chain hash); written in the same transaction that
                              deletes the records it covers (compaction), after which the
                              file is vacuumed so that it shrinks back.

WAL mode. ``synchronous=FULL`` by default: a commit is fsynced before the daemon answers, so
an acknowledged request survives a power loss, not only a kill -9 (``NORMAL`` would be
enough for process crashes: in WAL mode it syncs only at checkpoints). Commits are grouped
(:class:`AsyncJournal`): concurrent requests share one fsync. The records are written by a
child process (daemon.journal_writer), the snapshot by the daemon's own connection.

Beside the database, the last acknowledged position (seq, chain) is kept in its own file
(daemon.position), which a lost or damaged WAL cannot take back with it: the daemon checks
at start that the journal still reaches it.

A full disk (SQLITE_FULL, ENOSPC, EDQUOT) is not fatal: the records stay queued, the
journal reports `full`, retries once a second and resumes by itself when space returns;
meanwhile the daemon serves reads and refuses changes (storage-full). Every other write
error is permanent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import hashlib
import json
import logging
import marshal
import os
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from daemon.position import Position, PositionFile

log = logging.getLogger("sharedpoold")

SCHEMA_VERSION = 2  # 2: the chain column (a version-1 database is migrated at open)
GENESIS = "0" * 64  # the chain "before" record 1
FULL_RETRY_SECONDS = 1.0
BUSY_SECONDS = 60.0  # how long a write waits for the other connection's lock
WRITER_EXIT_SECONDS = 30.0  # how long close() waits for the writer to commit and exit


class JournalError(RuntimeError):
    """The journal could not be written: the daemon can no longer acknowledge anything."""


def is_storage_full(exc: BaseException) -> bool:
    """SQLite's SQLITE_FULL ("database or disk is full") or the OS's ENOSPC/EDQUOT."""
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        return code == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def chain_next(prev: str, seq: int, op: str, args: str, result: str) -> str:
    """The hash of record `seq` chained to the one before it (hex sha256)."""
    h = hashlib.sha256(bytes.fromhex(prev))
    h.update(f"{seq}\x00{op}\x00{args}\x00{result}".encode())
    return h.hexdigest()


_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


def _dumps(obj: Any) -> str:
    """Compact, keys sorted (json.dumps with these options builds an encoder per call)."""
    return _ENCODER.encode(obj)


# ---- the frames AsyncJournal sends its writer process (daemon.journal_writer) ----------

Record = tuple[int, str, dict[str, Any], Any]
FRAME = struct.Struct("<I")


def encode_frame(record: Record) -> bytes:
    """One record as a frame. The record is encoded when appended, so that a caller
    changing its dicts afterwards does not change what is journaled. marshal takes only the
    exact built-in types; anything else json accepts (a str or int subclass, an enum
    member) is first reduced to them by a JSON round trip, which journals the same text
    (for the str-keyed dicts this daemon appends)."""
    try:
        body = marshal.dumps(record)
    except ValueError:
        body = marshal.dumps(tuple(json.loads(_dumps(list(record)))))
    return FRAME.pack(len(body)) + body


def decode_frames(buf: bytearray) -> list[Record]:
    """The whole frames at the head of `buf`, removed from it (a partial one stays)."""
    out: list[Record] = []
    at = 0
    while len(buf) - at >= FRAME.size:
        (n,) = FRAME.unpack_from(buf, at)
        if len(buf) - at - FRAME.size < n:
            break
        seq, op, args, result = marshal.loads(bytes(buf[at + FRAME.size : at + FRAME.size + n]))
        out.append((seq, op, args, result))
        at += FRAME.size + n
    del buf[:at]
    return out


class Journal:
    """Synchronous access to the database. All calls after `open` come from one thread at a
    time (AsyncJournal funnels them through a single-worker executor)."""

    def __init__(self, path: Path, synchronous: str = "full") -> None:
        self.path = path
        self.synchronous = synchronous
        # Two connections write: the writer process's (records) and the daemon's (the
        # snapshot); each waits for the other's lock rather than fail at once.
        self._db = sqlite3.connect(
            path, check_same_thread=False, isolation_level=None, timeout=BUSY_SECONDS
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
        self._db.execute("PRAGMA foreign_keys=OFF")
        with self._tx():
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS journal (seq INTEGER PRIMARY KEY, "
                "op TEXT NOT NULL, args TEXT NOT NULL, result TEXT NOT NULL, chain TEXT)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS snapshot (id INTEGER PRIMARY KEY "
                "CHECK (id = 1), seq INTEGER NOT NULL, data BLOB NOT NULL, chain TEXT)"
            )
            version = self.get_meta("schema_version")
            if version is None:
                self.set_meta("schema_version", SCHEMA_VERSION)
            elif version == 1:
                self._migrate_from_1()
            elif version != SCHEMA_VERSION:
                raise JournalError(f"{path}: schema version {version}, expected {SCHEMA_VERSION}")
        self.last_chain = self.chain_at(self.last_seq()) or GENESIS

    def _migrate_from_1(self) -> None:
        """Add the chain columns and chain the records already there (in a transaction)."""
        for table in ("journal", "snapshot"):
            cols = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if "chain" not in cols:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN chain TEXT")
        snap = self._db.execute("SELECT seq FROM snapshot WHERE id = 1").fetchone()
        chain = GENESIS
        if snap is not None:
            self._db.execute("UPDATE snapshot SET chain = ? WHERE id = 1", (GENESIS,))
        rows = self._db.execute("SELECT seq, op, args, result FROM journal ORDER BY seq").fetchall()
        for seq, op, args, result in rows:
            chain = chain_next(chain, seq, op, args, result)
            self._db.execute("UPDATE journal SET chain = ? WHERE seq = ?", (chain, seq))
        self.set_meta("schema_version", SCHEMA_VERSION)

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

    def chain_at(self, seq: int) -> str | None:
        """The chain hash of record `seq` (the snapshot's when it covers `seq`; GENESIS for
        0), or None when the journal does not reach it."""
        if seq == 0:
            return GENESIS
        row = self._db.execute("SELECT chain FROM journal WHERE seq = ?", (seq,)).fetchone()
        if row is not None:
            return str(row[0])
        snap = self._db.execute("SELECT seq, chain FROM snapshot WHERE id = 1").fetchone()
        if snap is not None and int(snap[0]) == seq:
            return str(snap[1])
        return None

    def rollback_from(self, acknowledged: Position | None) -> str | None:
        """Why this journal is not the history acknowledged up to `acknowledged`, or None
        when it reaches that record with the same chain hash. A journal that goes further
        is fine: those records were committed, never acknowledged."""
        if acknowledged is None or acknowledged.seq == 0:
            return None
        last = self.last_seq()
        if last < acknowledged.seq:
            first = last + 1
            missing = (
                f"record {first}"
                if first == acknowledged.seq
                else f"records {first}..{acknowledged.seq}"
            )
            return (
                f"the journal ends at record {last}, but record {acknowledged.seq} was "
                f"acknowledged: {missing} missing (a lost or damaged WAL, or an older copy of "
                "the database)"
            )
        chain = self.chain_at(acknowledged.seq)
        snap = self._db.execute("SELECT seq FROM snapshot WHERE id = 1").fetchone()
        if chain is None and snap is not None and int(snap[0]) > acknowledged.seq:
            return None  # compacted into a later snapshot, which the daemon wrote after it
        if chain is None:
            return f"the journal no longer holds record {acknowledged.seq}, which was acknowledged"
        if chain != acknowledged.chain:
            return (
                f"record {acknowledged.seq} differs from the one acknowledged (its chain hash "
                "does not match): this journal is not the history the daemon acknowledged"
            )
        return None

    def write(self, records: list[tuple[int, str, dict[str, Any], Any]]) -> Position:
        """Append `records` in one transaction; the position of the last one."""
        rows = []
        chain = self.last_chain
        for seq, op, a, r in records:
            args, result = _dumps(a), _dumps(r)
            chain = chain_next(chain, seq, op, args, result)
            rows.append((seq, op, args, result, chain))
        with self._tx():
            self._db.executemany(
                "INSERT INTO journal (seq, op, args, result, chain) VALUES (?, ?, ?, ?, ?)", rows
            )
        self.last_chain = chain
        return Position(records[-1][0] if records else self.last_seq(), chain)

    # -- snapshot --------------------------------------------------------------------------
    def read_snapshot(self) -> tuple[int, bytes] | None:
        row = self._db.execute("SELECT seq, data FROM snapshot WHERE id = 1").fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def write_snapshot(self, seq: int, data: bytes) -> None:
        """Store the state as of record `seq` and drop the records it covers, atomically;
        then give the freed pages back to the file system (VACUUM: the database once kept
        7.4 MB for a 40 KB snapshot)."""
        chain = self.chain_at(seq)
        if chain is None:
            raise JournalError(f"snapshot at record {seq}: the journal does not reach it")
        with self._tx():
            self._db.execute(
                "INSERT OR REPLACE INTO snapshot (id, seq, data, chain) VALUES (1, ?, ?, ?)",
                (seq, data, chain),
            )
            self._db.execute("DELETE FROM journal WHERE seq <= ?", (seq,))
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        free, total = (
            self._db.execute("PRAGMA freelist_count").fetchone()[0],
            self._db.execute("PRAGMA page_count").fetchone()[0],
        )
        if free and free * 4 >= total:  # a quarter of the file is free: worth a rewrite
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def size_bytes(self) -> int:
        """The database file's size (the WAL aside)."""
        return self.path.stat().st_size


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")


class AsyncJournal:
    """Group commit over a Journal: `append` (synchronous, in call order) assigns the next
    sequence number and hands the record to the writer process (daemon.journal_writer);
    `sync` returns once every record appended so far is durable and its position recorded
    (`position`, when given). The writer commits whatever has arrived each time it is free,
    so concurrent requests share one fsync, and it does so on the other core, outside the
    event loop's GIL (why a process: daemon.journal_writer). A full disk keeps the records
    queued there and retries (`full`); any other write failure, or the writer's death, is
    permanent (`failed`).

    The records reach the writer at the end of the loop turn that appended them (one write
    to its pipe for all of them); its acknowledgements come back as lines on the other
    pipe, read by the loop, which wakes each waiter whose record they cover. Reads and the
    snapshot (`run`) use this process's own connection to the database, on a worker thread.
    """

    def __init__(
        self,
        journal: Journal,
        first_seq: int,
        position: PositionFile | None = None,
        *,
        lock_fd: int | None = None,
    ) -> None:
        """`lock_fd`: the state directory's lock (daemon.statedir), which the writer inherits
        so that it is held until the writer too has finished."""
        self.journal = journal
        self.position = position
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="journal")
        self.last_seq = first_seq  # last appended
        self.committed = first_seq  # last durable
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.failed: BaseException | None = None
        self.full = False  # the writer found the disk full; it retries
        self.full_events = 0  # times the disk was found full
        self.writes = 0  # transactions committed (sharedpool_journal_commits_total)
        self.records = 0  # records they made durable (sharedpool_journal_records_total)
        self._out = bytearray()  # frames not yet written to the pipe
        self._loop: asyncio.AbstractEventLoop | None = None
        self._push_soon = False
        self._acks = bytearray()
        self._closing = False
        self._proc = _start_writer(journal, position, lock_fd)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._to_writer = self._proc.stdin.fileno()
        self._from_writer = self._proc.stdout.fileno()
        os.set_blocking(self._to_writer, False)
        os.set_blocking(self._from_writer, False)

    def append(self, op: str, args: dict[str, Any], result: Any) -> int:
        if self.failed is not None:
            raise JournalError("the journal failed earlier") from self.failed
        self._out += encode_frame((self.last_seq + 1, op, args, result))
        self.last_seq += 1
        if not self._push_soon:
            self._attached().call_soon(self._push)
            self._push_soon = True
        return self.last_seq

    @property
    def pending(self) -> int:
        """Records appended and not (yet) durable."""
        return self.last_seq - self.committed

    async def sync(self, seq: int | None = None) -> None:
        """Wait until record `seq` (default: every record appended so far) is durable. While
        the disk is full this waits (the writer retries by itself) rather than fails."""
        target = self.last_seq if seq is None else seq
        while self.committed < target:
            if self.failed is not None:
                raise JournalError(f"the journal could not be written: {self.failed}") from None
            waiter = self._attached().create_future()
            self._waiters.append((target, waiter))
            await waiter  # woken at its commit, or at a failure (then re-check)

    def _attached(self) -> asyncio.AbstractEventLoop:
        """The running loop, reading the writer's acknowledgements from the first use on."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._from_writer, self._on_acks)
        return self._loop

    def _push(self) -> None:
        """Write what is queued to the writer's pipe; the rest when the pipe has room."""
        self._push_soon = False
        assert self._loop is not None
        try:
            while self._out:
                del self._out[: os.write(self._to_writer, self._out)]
        except BlockingIOError:
            self._loop.add_writer(self._to_writer, self._push)
            self._push_soon = True  # appends add to _out; the writer callback takes them
            return
        except OSError:  # the writer's end is closed: it exited, or is exiting
            self._out.clear()
            self._fail(JournalError(f"the journal writer exited ({self._exit_status()})"))
        self._loop.remove_writer(self._to_writer)

    def _on_acks(self) -> None:
        """On the loop: the writer's lines (daemon.journal_writer)."""
        try:
            data = os.read(self._from_writer, 65536)
        except BlockingIOError:
            return
        if not data:
            assert self._loop is not None
            self._loop.remove_reader(self._from_writer)
            if not self._closing and self.failed is None:
                self._fail(JournalError(f"the journal writer exited ({self._exit_status()})"))
            return
        self._acks += data
        *lines, rest = self._acks.split(b"\n")
        self._acks = bytearray(rest)
        upto = None
        for line in lines:
            kind, _, text = line.decode(errors="replace").partition(" ")
            if kind == "C":
                upto = int(text)
                self.writes += 1
                self.full = False
            elif kind == "F":
                if not self.full:
                    self.full_events += 1
                self.full = True
                log.warning("the journal cannot be written, the disk is full: %s", text)
            else:
                self._fail(JournalError(f"the writer reports {text}"))
        if upto is not None and upto > self.committed:
            self.records += upto - self.committed
            self.committed = upto
            self._wake(upto)

    def _fail(self, exc: JournalError) -> None:
        if self.failed is None:
            self.failed = exc
        self._wake(None)

    def _exit_status(self) -> str:
        try:
            code = self._proc.wait(5)
        except subprocess.TimeoutExpired:
            return "closed its pipe"
        return f"signal {-code}" if code < 0 else f"status {code}"

    def _wake(self, upto: int | None) -> None:
        """Wake the waiters whose record is durable (`upto`), or every waiter (None)."""
        keep = []
        for target, waiter in self._waiters:
            if upto is None or target <= upto:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                keep.append((target, waiter))
        self._waiters = keep

    async def run(self, fn: Any, *args: Any) -> Any:
        """Run a blocking call (a Journal method: the snapshot) on this process's worker
        thread, with its own connection to the database."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        """Stop the writer: it commits what it has and exits at the end of its input. A
        writer still waiting for disk space is not waited for (the daemon logs the records
        it drops); neither is one that does not exit within WRITER_EXIT_SECONDS."""
        self._closing = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._from_writer)
            self._loop.remove_writer(self._to_writer)
        if self._out and not self.full and self.failed is None:
            os.set_blocking(self._to_writer, True)
            with contextlib.suppress(OSError):  # a dead writer: its records were never acked
                os.write(self._to_writer, self._out)
        self._out.clear()
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.close()
        try:
            self._proc.wait(0.5 if self.full else WRITER_EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()
        self._executor.shutdown(wait=True)
        self.journal.close()
        if self.position is not None:
            self.position.close()


def _start_writer(
    journal: Journal, position: PositionFile | None, lock_fd: int | None
) -> subprocess.Popen[bytes]:
    """The writer process, importing this very package (the directory that holds it, not
    whatever `daemon` the working directory or the search path would offer: -P keeps the
    working directory off sys.path)."""
    root = str(Path(__file__).resolve().parent.parent)
    code = (
        f"import sys; sys.path.insert(0, {root!r}); "
        "from daemon.journal_writer import main; sys.exit(main())"
    )
    pos = "-" if position is None else str(position.path)
    return subprocess.Popen(
        [sys.executable, "-P", "-c", code, str(journal.path), journal.synchronous, pos],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        close_fds=True,
        pass_fds=() if lock_fd is None else (lock_fd,),
    )
