"""The model's warnings, as a command's user reads them: one line, naming the command.

The package warns through `warnings.warn` (an unusable aged-guest cache file, a bad cache
bound, the compiled core missing): a library's caller may filter or escalate them. Printed
by Python's default hook they take two lines, the package's file path and the source line
that raised them, which tell an operator nothing. The console scripts install this hook
instead: ``hv-netvsc-sim: warning: <message>`` on stderr, or, in the daemon, one record of
its own log (structured with the rest). That covers the warnings raised in the project's
files and every RuntimeWarning (the class the package warns with: its stacklevel can
name a caller's file); the rest keep the default format.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Any, TextIO

_OWN = ("pool", "daemon", "hv_netvsc_sim")


def _ours(filename: str) -> bool:
    parts = filename.replace("\\", "/").split("/")
    return any(p in _OWN for p in parts[:-1])


def install(prog: str, log: logging.Logger | None = None) -> None:
    """Print (or log, with `log`) the project's warnings as one line naming `prog`."""
    default = warnings.showwarning

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if not _ours(filename) and not issubclass(category, RuntimeWarning):
            default(message, category, filename, lineno, file, line)
            return
        if log is not None:
            log.warning("%s", message)
            return
        stream: Any = file if file is not None else sys.stderr
        with contextlib.suppress(OSError):  # stderr gone: a warning is not worth failing for
            stream.write(f"{prog}: warning: {message}\n")

    warnings.showwarning = show
