"""The state directory: one daemon per directory, and only a directory nobody else can write.

Two daemons on one state directory would both replay the same journal, both answer
clients and both write snapshots into the same database until one of them dies on a
duplicate journal sequence number. And the daemon loads its journal and snapshots from
this directory at start: a directory that another user can write is a place another user
can plant state in. So before anything in it is read:

- the directory is created 0700 when missing;
- it must be owned by the daemon's uid and not be writable by group or others;
- an exclusive ``flock(2)`` on ``sharedpoold.lock`` inside it is taken and held for the
  daemon's life (the kernel drops it when the process dies, even on kill -9, so there is
  no stale lock to clean up); the holder's pid is written into the file so that a second
  daemon can say who holds it. The journal's writer process (daemon.journal_writer)
  inherits the lock: a daemon killed with kill -9 leaves its writer committing what it
  was sent, and the next daemon must not read the journal before that is done. So when
  the pid in the file is gone, a new daemon waits (LOCK_WAIT_SECONDS) for the lock
  instead of refusing at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
from pathlib import Path

import attrs

__all__ = ["LOCK_NAME", "StateDirError", "StateDirLock", "held_lock_fd", "lock_state_dir"]

LOCK_NAME = "sharedpoold.lock"
LOCK_WAIT_SECONDS = 10.0  # for a dead daemon's journal writer to finish
_HELD: dict[Path, int] = {}  # the locks this process holds, by directory


class StateDirError(Exception):
    """The state directory cannot be used: owned by another uid, writable by others, or in
    use by another daemon. The message is one line for the operator (exit 2)."""


@attrs.define
class StateDirLock:
    """The held lock; `release()` (or process exit) drops it."""

    path: Path
    fd: int

    def release(self) -> None:
        _HELD.pop(self.path, None)
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def check_state_dir(path: Path, uid: int | None = None) -> None:
    """Refuse a directory that is not ours alone (raises StateDirError)."""
    uid = os.getuid() if uid is None else uid
    try:
        st = path.stat()
    except OSError as exc:
        raise StateDirError(f"state directory {path}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"state directory {path} is not a directory")
    if st.st_uid != uid:
        raise StateDirError(
            f"state directory {path} is owned by uid {st.st_uid}, not by the daemon's uid "
            f"{uid}: refusing to load state another user controls"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateDirError(
            f"state directory {path} has mode {stat.S_IMODE(st.st_mode):04o}, writable by "
            f"group or others: refusing to load state from it (chmod go-w {path})"
        )


def lock_state_dir(path: Path) -> StateDirLock:
    """Create (0700) and check `path`, then take its exclusive lock for this process.

    Raises StateDirError naming the holder's pid when another daemon has it."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StateDirError(f"state directory {path}: {exc.strerror or exc}") from None
    check_state_dir(path)
    lock_path = path / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise StateDirError(f"state directory {path}: {lock_path}: {exc.strerror}") from None
    try:
        _flock(fd, path)
    except StateDirError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[path] = fd
    return StateDirLock(path, fd)


def held_lock_fd(path: Path) -> int | None:
    """The descriptor of the lock this process holds on `path` (for the journal writer to
    inherit), or None."""
    return _HELD.get(path)


def _flock(fd: int, path: Path) -> None:
    """Take the lock; while its holder's pid is gone (its journal writer still finishing),
    wait for it up to LOCK_WAIT_SECONDS."""
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            if _alive(holder):
                raise StateDirError(f"state directory {path} is in use by pid {holder}") from None
            if time.monotonic() > deadline:
                raise StateDirError(
                    f"state directory {path} is still locked {LOCK_WAIT_SECONDS:g} s after its "
                    f"daemon (pid {holder}) exited: its journal writer has not finished "
                    "(look for a sharedpoold journal_writer process)"
                ) from None
            time.sleep(0.02)
        except OSError as exc:
            raise StateDirError(f"state directory {path}: cannot lock: {exc.strerror}") from None


def _alive(pid: str) -> bool:
    """Whether process `pid` runs (a zombie does not; an unreadable pid counts as alive:
    refuse)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, OSError):
        return True
    try:
        state = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"
