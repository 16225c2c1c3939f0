"""A command whose reader went away stops quietly, as `head` and `grep -q` expect.

`hv-netvsc-sim compare | head` closes the pipe after ten lines; the next `print` raises
BrokenPipeError (Python ignores SIGPIPE, so the write fails instead of killing the process)
and, unhandled, prints a traceback for something that is not an error. The recipe of the
Python documentation (signal, "Note on SIGPIPE"): catch it at the top, point stdout at
/dev/null so the interpreter's last flush at exit cannot raise again, and exit. The status
is 141, what a shell reports for a C tool killed by SIGPIPE, so `set -o pipefail` scripts see
the same as they would for `cat`.

Only a broken *stdout* is swallowed: a BrokenPipeError from anything else (a socket to the
daemon) is a real failure and propagates. `poll()` tells them apart: a pipe whose reader
has closed reports POLLERR on its write end.
"""

from __future__ import annotations

import functools
import os
import select
import signal
import sys
from collections.abc import Callable
from typing import ParamSpec

__all__ = ["EXIT_CLOSED_PIPE", "quiet_on_closed_stdout"]

EXIT_CLOSED_PIPE = 128 + signal.SIGPIPE

P = ParamSpec("P")


def _stdout_closed() -> bool:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))


def quiet_on_closed_stdout(main: Callable[P, int]) -> Callable[P, int]:
    """`main`, returning EXIT_CLOSED_PIPE instead of raising when stdout's reader closed."""

    @functools.wraps(main)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            try:
                code = main(*args, **kwargs)
            except SystemExit:  # --help, --version, usage errors: printed, then exit
                sys.stdout.flush()
                raise
            sys.stdout.flush()  # the last buffered lines fail here, not in the exit's flush
            return code
        except BrokenPipeError:
            if not _stdout_closed():
                raise
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return EXIT_CLOSED_PIPE

    return wrapper
