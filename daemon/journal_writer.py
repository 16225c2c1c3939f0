"""The journal's writer: a child process that commits what the daemon appends.

Why a process and not a thread: a writer thread shares the event loop's GIL. Every
``sqlite3_step`` and every fsync releases it and must take it back from a loop that is busy
serving requests, and the thread's own Python work (encoding the records, chaining their
hashes, binding the rows: ~24 us a record) is taken from the loop's core. Under load the
two fell into lockstep: the loop served every connection, then idled through the commit
(sharedpoold under wrk at 32 connections: the loop thread busy 68 %, the writer 42 us of
CPU per request on the same core). As a process, the writer runs on the other core and
commits whatever has arrived while the loop goes on serving.

The protocol, over the child's stdin and stdout (both private pipes):

  daemon -> writer   frames: a 4-byte little-endian length, then ``marshal`` of
                     (seq, op, args, result); in order, seq consecutive
  writer -> daemon   lines:  ``C <seq>``  every record up to seq is durable and its
                                          position written (daemon.position)
                             ``F <text>`` the disk is full: the records are kept, the
                                          write retried every FULL_RETRY_SECONDS
                             ``E <text>`` the journal cannot be written: the writer exits

The writer ignores SIGINT and SIGTERM (a Ctrl-C or a systemd stop reaches the whole
process group): it stops at the end of its input, once the daemon has closed the pipe or
died, after committing every whole frame it received. Records the daemon never saw
acknowledged may so reach the journal; the daemon accepts a journal longer than its
position (daemon.position).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
from pathlib import Path

from daemon.journal import (
    FULL_RETRY_SECONDS,
    Journal,
    Record,
    decode_frames,
    is_storage_full,
)
from daemon.position import PositionFile

__all__ = ["main"]

_READ = 1 << 20


def _say(line: str) -> None:
    """One line to the daemon (a dead daemon: BrokenPipeError, and the writer stops; what
    it committed stays, acknowledged or not)."""
    data = (line.replace("\n", " ") + "\n").encode()
    while data:
        data = data[os.write(1, data) :]


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _Writer:
    """The loop: read what has arrived, commit it as one transaction, say so, repeat."""

    def __init__(self, journal: Journal, position: PositionFile | None, retry: float) -> None:
        self.journal = journal
        self.position = position
        self.retry = retry
        self.buf = bytearray()
        self.eof = False

    def read(self, timeout: float | None) -> None:
        """Read what stdin has (waiting at most `timeout`; None: until something comes)."""
        if timeout is not None and not select.select([0], [], [], timeout)[0]:
            return
        chunk = os.read(0, _READ)
        if chunk:
            self.buf += chunk
        else:
            self.eof = True

    def commit(self, batch: list[Record]) -> bool:
        """Write `batch` durably, retrying while the disk is full. False: stop (the daemon
        closed the pipe while the disk was full; those records were never acknowledged)."""
        reported_full = False
        while True:
            try:
                pos = self.journal.write(batch)
                if self.position is not None:
                    self.position.write(pos)
                break
            except Exception as exc:
                if not is_storage_full(exc):
                    raise
                if not reported_full:
                    _say(f"F {_one_line(exc)}")
                    reported_full = True
                if self.eof:
                    return False
                self.read(self.retry)  # the retry's pause, which also notices a close
                batch = batch + decode_frames(self.buf)
        _say(f"C {batch[-1][0]}")
        return True

    def run(self) -> int:
        while True:
            if not self.eof:
                self.read(None)
            batch = decode_frames(self.buf)  # every whole frame; a torn last one stays
            if batch and not self.commit(batch):
                return 0
            if self.eof:
                return 0


def main(argv: list[str] | None = None) -> int:
    """sharedpoold's journal writer (started by daemon.journal.AsyncJournal):
    DB SYNCHRONOUS POSITION|-."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    args = sys.argv[1:] if argv is None else argv
    try:
        db, synchronous, position_path = args
        journal = Journal(Path(db), synchronous)
        position = (
            None
            if position_path == "-"
            else PositionFile(Path(position_path), sync=synchronous == "full")
        )
        return _Writer(journal, position, FULL_RETRY_SECONDS).run()
    except BaseException as exc:  # reported to the daemon, which logs it on one line
        with contextlib.suppress(OSError):  # the daemon is gone: nobody to tell
            _say(f"E {_one_line(exc)}")
        return 1
