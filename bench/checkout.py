"""--compare-baseline / --daemon-tree: a checkout of earlier code to run beside this one.

The machine's speed drifts 2-3x through the day, so an A/B of a change runs the earlier
code (a `git worktree add DIR COMMIT`) in alternation with this checkout, in the same
session; its packages come first on the child's PYTHONPATH.
"""

from __future__ import annotations

import argparse
from pathlib import Path

_MARKERS = ("pool/__init__.py", "daemon/cli.py", "hv_netvsc_sim/compare.py")


def earlier_checkout(arg: str) -> Path:
    """An argparse type: `arg` resolved, or a one-line usage error naming what is missing."""
    tree = Path(arg).resolve()
    missing = [m for m in _MARKERS if not (tree / m).is_file()]
    if missing:
        raise argparse.ArgumentTypeError(
            f"{arg}: not a sharedpool checkout (no {missing[0]}); make one with "
            "git worktree add DIR COMMIT"
        )
    return tree
