"""The guest options every command line takes, checked by the model's own rules, with one
set of bounds and one message each.

`sharedpoold` (daemon.config), `hv-netvsc-sim` and `python -m pool.guest` all describe the
simulated machine with the same options: guest memory, platform, seed, aging steps. The
rules are the model's (pool.guest.machine: check_memory, check_aging; the platforms of
pool.guest.platform's registry); this module parses the text and wraps them for argparse.
Every refusal is a one-line ValueError message, which each command line prints after its own prefix,
exit status 2.

The bounds: memory a size (``16GiB``, ``4096``...), a multiple of 4 MiB, 16 MiB to 1 TiB;
a guest that is aged (age steps > 0) at least 68 MiB (RAM above the reserved ranges for
the churn to allocate from); seed and age steps integers >= 0; platform one of PLATFORMS.
"""

from __future__ import annotations

import argparse
from typing import Any

from pool.guest.machine import check_aging, check_memory
from pool.guest.platform import PLATFORMS
from pool.guest.units import parse_size

__all__ = [
    "PLATFORMS",
    "add_guest_arguments",
    "check_aging",
    "check_guest_args",
    "guest_memory",
    "memory_arg",
    "non_negative",
    "non_negative_arg",
]


def guest_memory(value: object) -> int:
    """Guest memory in bytes from a size (text or integer); ValueError if out of bounds."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"not a size: {value!r} (examples: 4096, 64KiB, 16MiB, 16GiB)")
    return check_memory(parse_size(value))


def non_negative(value: object, what: str) -> int:
    """An integer >= 0 (text with '_' separators accepted); ValueError naming `what`."""
    if isinstance(value, str):
        try:
            value = int(value.replace("_", ""))
        except ValueError:
            raise ValueError(f"{what} must be an integer: {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer: {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be at least 0: {value}")
    return value


# ---- argparse ----------------------------------------------------------------------------


def memory_arg(text: str) -> int:
    """argparse type for --guest-memory: the rule's message is the usage error."""
    try:
        return guest_memory(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def non_negative_arg(what: str) -> Any:
    def parse(text: str) -> int:
        try:
            return non_negative(text, what)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def add_guest_arguments(
    parser: argparse.ArgumentParser,
    *,
    memory: str,
    age_steps: int,
    seed_help: str = "seed of the guest model (default 1)",
) -> None:
    """--guest-memory, --platform, --seed and --age-steps, with these bounds. Call
    check_guest_args after parsing for the rule between them."""
    parser.add_argument(
        "--guest-memory",
        type=memory_arg,
        default=parse_size(memory),
        metavar="SIZE",
        help=f"guest RAM (default {memory}; a 3-4 GiB PCI hole is modeled)",
    )
    parser.add_argument(
        "--platform",
        choices=PLATFORMS,
        default="tdx",
        help=f"confidential-computing platform (default tdx; one of {', '.join(PLATFORMS)})",
    )
    parser.add_argument(
        "--seed", type=non_negative_arg("--seed"), default=1, metavar="S", help=seed_help
    )
    parser.add_argument(
        "--age-steps",
        type=non_negative_arg("--age-steps"),
        default=age_steps,
        metavar="N",
        help=f"background churn steps aging the guest (default {age_steps:,}; 0 = pristine)",
    )
    parser.add_argument(
        "--no-cache",
        action=_NoCacheAction,
        help="age every guest, not reusing aged guests cached in "
        "$XDG_CACHE_HOME/sharedpool/aged (pool.aged_cache)",
    )


class _NoCacheAction(argparse.Action):
    """--no-cache: sets ``no_cache`` and turns the aged-guest cache off for the process
    (pool.aged_cache.disable), so that every place that ages, however deep, sees it."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("default", False)
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        from pool import aged_cache

        aged_cache.disable()
        setattr(namespace, self.dest, True)


def check_guest_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The rule between the options (check_aging), as a usage error of --guest-memory."""
    try:
        check_aging(args.guest_memory, getattr(args, "age_steps", 0))
    except ValueError as exc:
        parser.error(f"argument --guest-memory: {exc}")
