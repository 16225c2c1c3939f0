"""Command line for the guest model: `python -m pool.guest demo`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

from pool.guest.machine import Guest, GuestConfig
from pool.guest.report import render
from pool.guest.units import parse_size


def size_arg(text: str) -> int:
    """argparse type for sizes: the parse error becomes the usage message, not a traceback."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def progress_printer(label: str) -> Callable[[int, int], None]:
    """A one-line progress indication on stderr (only on a terminal, or every 10% otherwise)."""
    tty = sys.stderr.isatty()
    last = [-1]

    def show(done: int, total: int) -> None:
        pct = 100 * done // max(total, 1)
        if pct == last[0] or (not tty and pct % 10 and done != total):
            return
        last[0] = pct
        end = "\r" if tty and done < total else "\n"
        print(f"{label}: {pct:3d}% ({done:,}/{total:,})", end=end, file=sys.stderr, flush=True)

    return show


def _demo(args: argparse.Namespace) -> int:
    config = GuestConfig(memory_bytes=args.guest_memory, platform=args.platform, seed=args.seed)
    t0 = time.perf_counter()
    guest = Guest(config)
    print(
        render(
            guest.report(),
            f"pristine {args.guest_memory >> 30} GiB {args.platform} guest (seed {args.seed})",
        )
    )
    guest.age(args.age_steps, progress_printer("aging"))
    print()
    print(render(guest.report(), f"after {args.age_steps:,} churn steps"))
    print(f"\n({time.perf_counter() - t0:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pool.guest",
        description="The simulated confidential guest: page allocator, direct map, conversions.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="report a default guest before and after aging",
        description="Build a guest, print buddyinfo, fragmentation indexes and "
        "the direct map; age it; print them again.",
    )
    demo.add_argument(
        "--guest-memory",
        type=size_arg,
        default=parse_size("16GiB"),
        help="guest RAM (default 16GiB; a 3-4 GiB PCI hole is modeled)",
    )
    demo.add_argument("--platform", choices=("tdx", "snp", "none"), default="tdx")
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument(
        "--age-steps",
        type=int,
        default=1_000_000,
        help="background churn steps (default 1,000,000; 0 = pristine)",
    )
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    except KeyboardInterrupt:
        return 130
