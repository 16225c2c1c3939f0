"""Command line for the guest model: `python -m pool.guest demo | replay | export`.

``replay`` and ``export`` (docs/real-guest.md) start the model from a real guest's page-table
dump and /proc/buddyinfo, replay planned attribute changes on it, and write the model's own
state back in those formats."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from pool import aged_cache, userwarnings
from pool.closedpipe import quiet_on_closed_stdout
from pool.guest.buddy import default_zones
from pool.guest.buddyimport import allocator_from_buddyinfo, buddyinfo_rows
from pool.guest.directmap import DirectMap
from pool.guest.fragmentation import format_buddyinfo
from pool.guest.machine import MAX_CPUS, Guest, GuestConfig
from pool.guest.modulechurn import REAL_LINUX_6_1
from pool.guest.modulechurn import run as run_module_churn
from pool.guest.options import (
    add_guest_arguments,
    check_guest_args,
    memory_arg,
    non_negative_arg,
)
from pool.guest.procfs import read_host, zoneinfo_layout
from pool.guest.ptdump import DEFAULT_PAGE_OFFSET, format_ptdump, parse_ptdump
from pool.guest.replay import parse_changes, render_replay, replay, replay_json
from pool.guest.report import render
from pool.guest.units import PAGE_SHIFT, GiB, format_size
from pool.strictargs import StrictParser


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
            f"pristine {format_size(args.guest_memory)} {args.platform} guest (seed {args.seed})",
        )
    )
    aged_cache.age(guest, args.age_steps, progress_printer("aging"), aged_cache.default_cache())
    print()
    print(render(guest.report(), f"after {args.age_steps:,} churn steps"))
    print(f"\n({time.perf_counter() - t0:.1f} s)")
    return 0


def _read(path: str, what: str) -> str:
    """A file's text, or ValueError (exit 2) saying which input could not be read."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _write(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
        return
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise ValueError(f"cannot write {path}: {exc.strerror or exc}") from None


def _replay_layout(args: argparse.Namespace, notes: list[str]) -> tuple[DirectMap, str | None]:
    """The direct map to replay on, and the buddyinfo text to start the free lists from."""
    buddyinfo = _read(args.buddyinfo, "buddyinfo") if args.buddyinfo else None
    if args.ptdump:
        dump = parse_ptdump(_read(args.ptdump, "page-table dump"))
        notes.append(f"direct map: {args.ptdump} (PAGE_OFFSET {dump.page_offset:#x})")
    if args.from_proc:
        host = read_host(read_ptdump=not args.ptdump)
        if buddyinfo is None:
            buddyinfo = host.buddyinfo
            notes.append("free lists: this machine's /proc/buddyinfo")
        if not args.ptdump:
            if host.ptdump is not None:
                dump = parse_ptdump(host.ptdump)
                notes.append(
                    "direct map: this machine's page-table dump "
                    f"(PAGE_OFFSET {dump.page_offset:#x})"
                )
            else:
                ram = zoneinfo_layout()
                notes.append(f"page-table dump NOT readable: {host.ptdump_problem}")
                notes.append(
                    "direct map used instead: RAM laid out from /proc/zoneinfo (present pages "
                    "per zone), mapped with the largest leaves that fit; boot-time splits "
                    "unknown, so real splits may be fewer than reported"
                )
                return DirectMap(ram[-1][1], ram), buddyinfo
    elif not args.ptdump:
        raise ValueError("replay needs --ptdump FILE (or --from-proc)")
    dropped = dump.flag_bytes()
    kept = ", ".join(
        f"{flag} {format_size(dropped[flag])}" for flag in ("ro", "x", "USR") if flag in dropped
    )
    notes.append(
        "flags dropped (the model keeps only the encryption bit, and the dump does not show "
        "it: every page starts private)" + (f"; {kept}" if kept else "")
    )
    breaks = dump.unprinted_breaks()
    if breaks:
        shown = ", ".join(str(n) for n in breaks[:10]) + (" ..." if len(breaks) > 10 else "")
        notes.append(
            f"{len(breaks)} line(s) of the dump repeat the previous line's level and printed "
            f"flags (lines {shown}): a bit the kernel does not print differs there, on a CoCo "
            "guest most likely the encryption bit; imported as private all the same"
        )
    return dump.direct_map(), buddyinfo


def _replay(args: argparse.Namespace) -> int:
    notes: list[str] = []
    direct_map, buddyinfo = _replay_layout(args, notes)
    changes = []
    if args.convert:
        changes = parse_changes(_read(args.convert, "RANGES.json"), args.convert)
    end = direct_map.end_pfn
    allocator = None
    if buddyinfo is not None:
        allocator = allocator_from_buddyinfo(
            end, direct_map.ram_ranges(), default_zones(end), buddyinfo_rows(buddyinfo), args.seed
        )
        notes.append(
            f"free lists: nr_free per zone and order imported exactly, blocks placed by seed "
            f"{args.seed} (positions are the model's, not the machine's)"
        )
    guest = Guest.from_layout(direct_map, GuestConfig(seed=args.seed), allocator=allocator)
    ram_pages = direct_map.ram_pages
    ram_bytes = ram_pages << PAGE_SHIFT
    layout = (
        f"RAM {ram_bytes >> 10} kB ({ram_bytes / GiB:.2f} GiB) in "
        f"{len(direct_map.ram_ranges())} range(s), end of RAM {end << PAGE_SHIFT:#x}"
    )
    zones = guest.allocator.buddyinfo() if allocator is not None else None
    report = replay(guest.direct_map, changes, args.convert or "RANGES.json")
    if args.json:
        document: dict[str, Any] = {
            "layout": {
                "ram_pages": ram_pages,
                "end_pfn": end,
                "ram_ranges": [list(r) for r in direct_map.ram_ranges()],
            }
        }
        if zones is not None:
            document["buddyinfo"] = {name: list(counts) for name, counts in zones}
        document.update(replay_json(report, args.max_leaves))
        document["notes"] = notes
        print(json.dumps(document, indent=2))
        return 0
    print(f"== replay: {layout}")
    for note in notes:
        print(f"note: {note}")
    if zones is not None:
        print("-- /proc/buddyinfo (imported)")
        print(format_buddyinfo(zones), end="")
    print(render_replay(report, args.max_leaves))
    return 0


def _export(args: argparse.Namespace) -> int:
    if not args.ptdump and not args.buddyinfo:
        raise ValueError("export needs --ptdump OUT and/or --buddyinfo OUT")
    config = GuestConfig(memory_bytes=args.guest_memory, platform=args.platform, seed=args.seed)
    guest = Guest(config)
    aged_cache.age(
        guest,
        args.age_steps,
        progress_printer("aging") if args.age_steps else None,
        aged_cache.default_cache(),
    )
    if args.ptdump:
        _write(args.ptdump, format_ptdump(guest.direct_map, args.page_offset))
    if args.buddyinfo:
        _write(args.buddyinfo, format_buddyinfo(guest.allocator.buddyinfo()))
    return 0


def _address_arg(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an address: {text!r}") from None


def _count_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a count >= 0: {text!r}")
    return value


def _add_replay(sub: Any) -> None:
    p = sub.add_parser(
        "replay",
        help="replay planned attribute changes on a real guest's direct map",
        description="Import a guest's direct map from its page-table dump (debugfs "
        "page_tables/kernel) and optionally its free lists from /proc/buddyinfo, apply the "
        "attribute changes of RANGES.json in order, and report the level-2 and level-3 "
        "splits, DirectMap4k/2M/1G before and after, and the leaves that changed "
        "(docs/real-guest.md).",
    )
    p.add_argument("--ptdump", metavar="FILE", help="page-table dump (Low Kernel Mapping)")
    p.add_argument("--convert", metavar="RANGES.json", help="attribute changes, in order")
    p.add_argument("--buddyinfo", metavar="FILE", help="/proc/buddyinfo to start the free lists")
    p.add_argument(
        "--from-proc",
        action="store_true",
        help="use this machine's /proc/buddyinfo and, if readable, its page-table dump "
        "(else a layout from /proc/zoneinfo); --ptdump and --buddyinfo take precedence",
    )
    p.add_argument(
        "--seed",
        type=non_negative_arg("--seed"),
        default=1,
        help="seed of the free-block placement",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument(
        "--max-leaves",
        type=_count_arg,
        default=20,
        metavar="N",
        help="list at most N changed stretches, and N runs per side of each (default 20)",
    )
    p.set_defaults(func=_replay)


def _add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write a default guest's direct map and free lists in the kernel's formats",
        description="Build a default guest, optionally age it, and write its direct map as "
        "a page-table dump (Low Kernel Mapping section) and its free lists as "
        "/proc/buddyinfo; both re-import unchanged with replay. '-' writes to stdout.",
    )
    p.add_argument("--ptdump", metavar="OUT", help="where to write the page-table dump")
    p.add_argument("--buddyinfo", metavar="OUT", help="where to write /proc/buddyinfo")
    add_guest_arguments(p, memory="4GiB", age_steps=0)
    p.add_argument(
        "--page-offset",
        type=_address_arg,
        default=DEFAULT_PAGE_OFFSET,
        help=f"virtual address of pfn 0 in the dump (default {DEFAULT_PAGE_OFFSET:#x})",
    )
    p.set_defaults(func=_export, parser=p)


def _version() -> str:
    from pool import __version__  # pool.guest knows nothing of pools: only the version

    return __version__


def _module_churn(args: argparse.Namespace) -> int:
    result = run_module_churn(args.guest_memory, args.churn, args.seed, args.cpus)
    real = (
        REAL_LINUX_6_1.get(args.churn) if args.guest_memory == 4 * GiB and args.cpus == 1 else None
    )
    if args.json:
        document = attrs.asdict(result)
        document["real_linux_6_1_regions_2m"] = list(real) if real else None
        print(json.dumps(document, indent=2))
        return 0
    print(
        f"== module churn: {format_size(args.guest_memory)} guest, {args.cpus} vCPU(s), "
        f"N={args.churn:,} blocks of order 0..3 (xorshift32 seed {args.seed}), "
        f"{result.kept_blocks:,} kept ({result.kept_pages:,} pages)"
    )
    print("-- /proc/buddyinfo before the vzalloc")
    print(result.buddyinfo_before, end="")
    print("-- /proc/buddyinfo after the vzalloc")
    print(result.buddyinfo_after, end="")
    print(
        f"-- vzalloc(16 MiB) through vmalloc-directmap: {result.regions_2m} distinct 2 MiB "
        f"regions; direct-map splits: level 2 {result.level2_splits}, level 3 "
        f"{result.level3_splits}"
    )
    if real:
        band = f"{real[0]}" if real[0] == real[1] else f"{real[0]}-{real[1]}"
        print(f"   real Linux 6.1 (4 GiB, 1 vCPU, DESIGN.md): {band} regions")
    print(
        f"   pages on per-cpu lists: {result.pcp_pages_before} before, "
        f"{result.pcp_pages_after} after (not in buddyinfo)"
    )
    return 0


def _cpus_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_CPUS:
        raise argparse.ArgumentTypeError(f"not a vCPU count in 1..{MAX_CPUS}: {text!r}")
    return value


def _seed_arg(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        value = 0
    if not 0 < value < 1 << 32:
        raise argparse.ArgumentTypeError(f"not a non-zero 32-bit xorshift seed: {text!r}")
    return value


def _add_experiment(sub: Any) -> None:
    p = sub.add_parser(
        "experiment",
        help="run a real-kernel test workload on the model",
        description="Workloads that real-kernel measurements were taken with, run on a fresh "
        "model guest so the figures can be set side by side.",
    )
    experiments = p.add_subparsers(dest="experiment", required=True)
    mc = experiments.add_parser(
        "module-churn",
        help="N random blocks of order 0..3, a random half freed, then vzalloc(16 MiB)",
        description="The test module's churn (pool/guest/modulechurn.py): N blocks "
        "alloc_pages(GFP_KERNEL, xrand() & 3) with xorshift32, each freed in allocation "
        "order if the next xrand() is odd, then one 16 MiB vzalloc through the "
        "vmalloc-directmap strategy. Prints the distinct 2 MiB regions of its pages, its "
        "level-2/3 direct-map splits and /proc/buddyinfo before and after.",
    )
    mc.add_argument(
        "--guest-memory",
        type=memory_arg,
        default=4 * GiB,
        metavar="SIZE",
        help="guest RAM (default 4GiB, as the real measurements; a 3-4 GiB PCI hole is modeled)",
    )
    mc.add_argument(
        "--churn", type=_count_arg, default=20_000, metavar="N", help="blocks (default 20000)"
    )
    mc.add_argument(
        "--seed", type=_seed_arg, default=1, help="xorshift32 seed, non-zero (default 1)"
    )
    mc.add_argument("--cpus", type=_cpus_arg, default=1, help="vCPUs (default 1)")
    mc.add_argument("--json", action="store_true", help="print one JSON document")
    mc.set_defaults(func=_module_churn, parser=mc)


def build_parser() -> argparse.ArgumentParser:
    parser = StrictParser(
        prog="python -m pool.guest",
        description="The simulated confidential guest: page allocator, direct map, conversions.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="report a default guest before and after aging",
        description="Build a guest, print buddyinfo, fragmentation indexes and "
        "the direct map; age it; print them again.",
    )
    add_guest_arguments(demo, memory="16GiB", age_steps=1_000_000)
    demo.set_defaults(func=_demo, parser=demo)
    _add_replay(sub)
    _add_export(sub)
    _add_experiment(sub)
    return parser


@quiet_on_closed_stdout
def main(argv: Sequence[str] | None = None) -> int:
    userwarnings.install("python -m pool.guest")
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "guest_memory"):
        check_guest_args(args.parser, args)  # usage errors name the subcommand
    try:
        return int(args.func(args))
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    except KeyboardInterrupt:
        return 130
