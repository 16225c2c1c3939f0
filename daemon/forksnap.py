"""Snapshot encoding in a forked child: the event loop stalls for a fork, not for the walk.

A snapshot must see the state exactly as of one journal record, so encoding it in a thread
while the loop keeps serving would race the handlers. Walking it on the loop was the stall
(about a second for 10,000 live buffers: the plain-data walk is pure Python). The technique
Redis uses for ``BGSAVE``: ``fork()`` gives the child a copy-on-write image of the whole
process at that instant; the child walks and packs that frozen state and writes the bytes to
a pipe, the parent keeps serving and reads them from the pipe on a thread, then stores them
(on the journal's worker thread, as before).

The child runs nothing but the walk, zlib and ``os.write``: no logging, no SQLite, no event
loop (those may hold locks that another thread of the parent held at the fork), and leaves
with ``os._exit`` so no parent clean-up (atexit handlers, buffered files) runs twice. Its
signal handlers are reset first: the parent's would write to the event loop's wakeup socket,
which the child shares. Where fork fails (memory, process limits), :func:`encode_forked`
raises :class:`ForkFailed` and the caller encodes in-process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import warnings
from collections.abc import Callable
from typing import NoReturn

__all__ = ["ForkFailed", "encode_forked"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class ForkFailed(RuntimeError):
    """The snapshot could not be produced by a child (fork refused, or the child failed)."""


def _child(w: int, encode: Callable[[], bytes]) -> NoReturn:
    status = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        view = memoryview(encode())
        while view:
            view = view[os.write(w, view) :]
        status = 0
    finally:
        os._exit(status)


def _read_all(r: int) -> bytes:
    parts = []
    with os.fdopen(r, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            parts.append(chunk)
    return b"".join(parts)


async def encode_forked(encode: Callable[[], bytes]) -> bytes:
    """``encode()`` run in a forked child on the state as of now; its bytes. ForkFailed if no
    child could be started or it did not finish cleanly (nothing is changed either way)."""
    loop = asyncio.get_running_loop()
    r, w = os.pipe()
    try:
        with warnings.catch_warnings():
            # Python 3.12+ warns on fork() in a threaded process; the child above touches
            # nothing another thread could hold (module docstring).
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
    except OSError as exc:
        os.close(r)
        os.close(w)
        raise ForkFailed(f"fork: {exc.strerror}") from None
    if pid == 0:  # pragma: no cover - the child leaves through os._exit
        os.close(r)
        _child(w, encode)
    os.close(w)
    try:
        data = await loop.run_in_executor(None, _read_all, r)
    finally:
        _, status = await loop.run_in_executor(None, os.waitpid, pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise ForkFailed(f"the snapshot child ended with status {code}")
    return data
