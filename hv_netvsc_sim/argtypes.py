"""Argument types shared by the hv-netvsc-sim subcommands (compare, run, sweep): one parser
per kind of value, so a bad value reads the same everywhere (argparse turns the
ArgumentTypeError into one usage line, exit 2)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["int_at_least"]


def int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """A parser of integers (``_`` separators allowed) no smaller than ``minimum``; errors
    name the option ``what``."""

    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{what} must be at least {minimum}: {value}")
        return value

    return parse
