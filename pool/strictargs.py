"""The argument parser every console script uses: no abbreviated options.

argparse accepts any unambiguous prefix of a long option by default, so a typo that happens
to be a prefix runs as something the operator did not type (`sharedpoold --no-cach` ran as
--no-cache) and an option added later can silently change what an old abbreviation means.
Subcommands made with add_subparsers() get this class too (argparse builds them with the
parser's own type), so one base class covers every level.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["StrictParser"]


class StrictParser(argparse.ArgumentParser):
    """argparse.ArgumentParser with allow_abbrev=False unless asked otherwise."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
