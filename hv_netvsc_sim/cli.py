"""hv-netvsc-sim: drive the simulated hv_netvsc driver (`run`) or compare strategies (`compare`).

  hv-netvsc-sim run [--strategy NAME] [--nics N] [--cycles M] [--seed S] [--json]
                    [--daemon URL] [--pace SECONDS] [guest and scenario options]
  hv-netvsc-sim compare [--guest-memory 16GiB] [--cycles N] [--seed S] [--age-steps N]
                        [--platform tdx|snp|hyperv-vtom|none] [--json] [--plot FILE.png]
                        [--map DIR]

Exit status: 0 on success, 1 when the run could not be done (the daemon unreachable),
2 on bad input (argparse's usage message, never a traceback), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from hv_netvsc_sim.argtypes import int_at_least
from hv_netvsc_sim.client import PoolError, RemoteClient
from hv_netvsc_sim.compare import (
    COMPARE_CYCLES,
    DEFAULT_AGE_STEPS,
    CompareConfig,
    default_jobs,
    run_compare,
)
from hv_netvsc_sim.host import HyperVHost
from hv_netvsc_sim.inprocess import run_in_process
from hv_netvsc_sim.maps import check_map_dir, write_maps
from hv_netvsc_sim.plot import check_plot_path, plot_compare
from hv_netvsc_sim.report import (
    ProgressReporter,
    compare_table,
    print_table,
    summary_table,
)
from hv_netvsc_sim.scenario import Scenario, ScenarioConfig
from hv_netvsc_sim.sweep import add_sweep_command
from hv_netvsc_sim.timeline import DEFAULT_SCENARIO, PRESETS
from hv_netvsc_sim.verdict import verdict_lines
from pool import __version__, userwarnings
from pool.closedpipe import quiet_on_closed_stdout
from pool.guest import GuestConfig
from pool.guest.options import add_guest_arguments, check_guest_args
from pool.provision import Guests
from pool.registry import DEFAULT_STRATEGY, STRATEGIES
from pool.strictargs import StrictParser

SCENARIO_DEFAULTS = ScenarioConfig()  # the scenario's defaults, written once (scenario.py)


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction within [0, 1]: {text!r}")
    return value


def _daemon_url(text: str) -> str:
    if text.startswith("unix:") and len(text) > 5:
        return text
    if text.startswith(("http://", "https://")) and len(text.split("://", 1)[1]) > 0:
        return text
    raise argparse.ArgumentTypeError(
        f"daemon URL must be unix:/path/to/socket or http://host:port: {text!r}"
    )


def _add_guest_options(p: argparse.ArgumentParser) -> None:
    add_guest_arguments(
        p,
        memory="16GiB",
        age_steps=DEFAULT_AGE_STEPS,
        seed_help="seed of the guest and the events (default 1)",
    )


def _add_scenario_options(p: argparse.ArgumentParser, cycles: int, cycles_min: int) -> None:
    p.add_argument(
        "--cycles",
        type=int_at_least(cycles_min, "--cycles"),
        default=cycles,
        metavar="N",
        help=f"cycles: a hot remove + add of one vNIC plus the mixed events (default {cycles}"
        + ("; 0 = until SIGTERM/SIGINT)" if cycles_min == 0 else ")"),
    )
    d = SCENARIO_DEFAULTS
    p.add_argument(
        "--nics",
        type=int_at_least(1, "--nics"),
        default=d.nics,
        metavar="N",
        help=f"vNICs (default {d.nics})",
    )
    p.add_argument(
        "--mixed-events",
        type=int_at_least(0, "--mixed-events"),
        default=d.mixed_events,
        metavar="N",
        help="ring resize / MTU / channel / VF failover / traffic events per cycle "
        f"(default {d.mixed_events})",
    )
    p.add_argument(
        "--churn-steps",
        type=int_at_least(0, "--churn-steps"),
        default=d.churn_steps,
        metavar="N",
        help=f"guest background churn steps before each event, in-process "
        f"(default {d.churn_steps})",
    )
    p.add_argument(
        "--traffic-packets",
        type=int_at_least(0, "--traffic-packets"),
        default=d.traffic_packets,
        metavar="N",
        help=f"packets each way per traffic event (default {d.traffic_packets})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = StrictParser(
        prog="hv-netvsc-sim",
        description="A simulated hv_netvsc driver and Hyper-V host exercising shared-buffer "
        "strategies on a simulated confidential guest.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="drive one strategy through hot add/remove cycles",
        description="Drive one strategy (in-process) or the daemon (--daemon URL) through "
        "seeded vNIC life cycles; a progress bar on a terminal, a summary at the end.",
    )
    run.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=DEFAULT_STRATEGY,
        help=f"strategy, in-process (default {DEFAULT_STRATEGY})",
    )
    _add_scenario_options(run, cycles=SCENARIO_DEFAULTS.cycles, cycles_min=0)
    _add_guest_options(run)
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.add_argument(
        "--daemon",
        type=_daemon_url,
        metavar="URL",
        help="drive sharedpoold at unix:/path/sock or http://host:port instead of an "
        "in-process strategy (the guest options then do not apply)",
    )
    run.add_argument("--name", default="hv-netvsc-sim", help="client name at the daemon")
    run.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when any probe or allocation failed (for CI: a run that refused "
        "buffers is not a pass)",
    )
    run.add_argument(
        "--retry-deadline",
        type=_nonneg_float,
        default=0.0,
        metavar="SECONDS",
        help="with --daemon: how long an allocation waits for a growing pool (the daemon's "
        "503 with Retry-After) before the driver sees a refusal (default 0: at once, as "
        "in-process)",
    )
    run.add_argument(
        "--pace",
        type=_nonneg_float,
        default=0.0,
        metavar="SECONDS",
        help="real seconds to sleep after each event (default 0: as fast as possible)",
    )
    run.set_defaults(func=_run, parser=run)

    cmp = sub.add_parser(
        "compare",
        help="every strategy on the same seeded workload",
        description="Run every strategy on the same seed, the same aged guest and the same "
        "event sequence; print a table, or the JSON of DESIGN.md section 4.",
    )
    _add_guest_options(cmp)
    _add_scenario_options(cmp, cycles=COMPARE_CYCLES, cycles_min=1)
    cmp.add_argument(
        "--strategies",
        type=lambda t: tuple(s for s in t.split(",") if s),
        default=STRATEGIES,
        metavar="A,B,...",
        help=f"strategies to run (default all: {','.join(STRATEGIES)})",
    )
    cmp.add_argument(
        "--scenario",
        default=DEFAULT_SCENARIO,
        metavar="NAME|FILE.toml",
        help=f"the time axis: a preset ({', '.join(PRESETS)}; default {DEFAULT_SCENARIO}: "
        "the cycles above) or a TOML file (docs/scenarios.md)",
    )
    cmp.add_argument(
        "--runtime-cost-4k",
        type=_fraction,
        default=None,
        metavar="FRACTION",
        help="print an estimate of the runtime cost of the direct-map damage: FRACTION is "
        "the throughput lost with the whole direct map in 4 KiB pages (e.g. 0.009, the top "
        "of Meta 2022's 0.5-0.9 %%; workload-dependent: see docs/scenarios.md)",
    )
    cmp.add_argument("--json", action="store_true", help="print the compare JSON on stdout")
    cmp.add_argument(
        "--plot", metavar="FILE.png", help="write the plot (matplotlib) to FILE (.png, .svg, .pdf)"
    )
    cmp.add_argument(
        "--map",
        metavar="DIR",
        help="write each strategy's memory map at the end of the run into DIR "
        "(map-<strategy>.png, and maps.png side by side; the daemon page's colours)",
    )
    cmp.add_argument("--quiet", action="store_true", help="no progress output")
    cmp.add_argument(
        "--jobs",
        type=int,
        default=0,
        metavar="N",
        help="strategies run in N worker processes (default 0: one per CPU); the output is "
        "the same for any N, wall-clock latencies aside",
    )
    cmp.set_defaults(func=_compare, parser=cmp)
    add_sweep_command(sub)  # `sweep` (issue 19): hv_netvsc_sim/sweep.py owns its options
    return parser


# ---- compare -----------------------------------------------------------------------------


def _compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown or not args.strategies:
        parser.error(
            f"--strategies: unknown {unknown or 'empty list'}; "
            f"expected some of {','.join(STRATEGIES)}"
        )
    check_guest_args(parser, args)
    try:
        config = CompareConfig(
            _guest_config(args),
            _scenario_config(args),
            args.age_steps,
            args.strategies,
            args.scenario,
            args.runtime_cost_4k,
        )
    except ValueError as exc:
        parser.error(str(exc))
    if config.timeline.scheduled:  # a schedule decides these: a given value would be ignored
        d = SCENARIO_DEFAULTS
        ignored = [
            flag
            for flag, value, default in (
                ("--cycles", args.cycles, COMPARE_CYCLES),
                ("--nics", args.nics, d.nics),
                ("--mixed-events", args.mixed_events, d.mixed_events),
                ("--churn-steps", args.churn_steps, d.churn_steps),
            )
            if value != default
        ]
        if ignored:
            parser.error(
                f"{', '.join(ignored)}: the stress scenario's options; --scenario "
                f"{config.timeline.name} has its own schedule (docs/scenarios.md)"
            )
    if args.plot is not None:
        try:
            check_plot_path(args.plot)  # before the run: a typo must not cost the run
        except ValueError as exc:
            parser.error(f"--plot: {exc}")
    if args.jobs < 0:
        parser.error("--jobs must be >= 0 (0: one per CPU)")
    if args.map is not None:
        try:
            check_map_dir(args.map)
        except ValueError as exc:
            parser.error(str(exc))
    jobs = args.jobs or default_jobs(len(config.strategies))
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    with ProgressReporter(enabled=not args.quiet) as progress:
        doc = run_compare(config, progress, timings, jobs=jobs)
    if args.json:
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
    else:
        print_table(compare_table(doc))
        print()
        print("\n".join(verdict_lines(doc)))
    if args.plot:
        plot_compare(doc, args.plot)
        if not args.quiet:
            print(f"plot written to {args.plot}", file=sys.stderr)
    if args.map:
        written = write_maps(doc, args.map)
        if not args.quiet:
            print(f"maps written to {', '.join(map(str, written))}", file=sys.stderr)
    if not args.quiet:
        each = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items() if "/" not in k)
        print(f"compare took {time.perf_counter() - t0:.1f} s ({each})", file=sys.stderr)
    return 0


# ---- run -----------------------------------------------------------------------------------


def _guest_config(args: argparse.Namespace) -> GuestConfig:
    return GuestConfig(memory_bytes=args.guest_memory, platform=args.platform, seed=args.seed)


def _scenario_config(args: argparse.Namespace) -> ScenarioConfig:
    return ScenarioConfig(
        nics=args.nics,
        cycles=args.cycles,
        seed=args.seed,
        mixed_events=args.mixed_events,
        churn_steps=args.churn_steps,
        traffic_packets=args.traffic_packets,
        pace=args.pace if "pace" in args else 0.0,
    )


def _install_stop(scenario: Scenario) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on this platform
            loop.add_signal_handler(sig, scenario.stop)


async def _run_in_process(args: argparse.Namespace, progress: ProgressReporter) -> dict[str, Any]:
    """The same in-process run as one strategy of compare (hv_netvsc_sim.inprocess)."""
    guests = Guests(_guest_config(args), args.age_steps, progress)
    total = args.cycles
    label = f"run {args.strategy}"
    run = await run_in_process(
        args.strategy,
        guests,
        _scenario_config(args),
        on_cycle=lambda c: progress(label, c, total),
        on_start=_install_stop,
    )
    wall = run.run_seconds
    return {
        "mode": "in-process",
        "strategy": args.strategy,
        "config": {
            "guest_memory_bytes": args.guest_memory,
            "platform": args.platform,
            "seed": args.seed,
            "age_steps": args.age_steps,
            "nics": args.nics,
            "cycles": args.cycles,
            "mixed_events": args.mixed_events,
            "churn_steps": args.churn_steps,
        },
        **run.summary,
        "wall_seconds": wall,
        "cycles_per_second": run.cycles_done / wall if wall > 0 else 0.0,
        **run.result,
        "strategy_stats": run.strategy_stats.as_json(),
    }


async def _run_daemon(args: argparse.Namespace, progress: ProgressReporter) -> dict[str, Any]:
    host = HyperVHost(None)  # no Guest: GPADL consistency checks only (see host.py)
    total = args.cycles
    async with RemoteClient(args.daemon, args.name, alloc_deadline=args.retry_deadline) as client:
        scenario = Scenario(
            _scenario_config(args),
            client,
            host,
            on_cycle=lambda c: progress("run (daemon)", c, total),
        )
        _install_stop(scenario)
        t0 = time.perf_counter()
        try:
            await scenario.start()
            await scenario.run()
        finally:
            await scenario.shutdown()  # free every buffer before unregistering
        wall = time.perf_counter() - t0
        try:
            daemon_stats: dict[str, Any] | None = await client.daemon_stats()
        except PoolError:
            daemon_stats = None
        return {
            "mode": "daemon",
            "daemon": args.daemon,
            "client_id": client.client_id,
            **scenario.summary(),
            "wall_seconds": wall,
            "cycles_per_second": scenario.cycles_done / wall if wall > 0 else 0.0,
            "allocations": client.stats.allocations,
            "failures": client.stats.failures,
            "failure_reasons": dict(sorted(client.stats.failure_reasons.items())),
            "alloc_latency_seconds": client.stats.latency_percentiles(),
            "daemon_stats": daemon_stats,
        }


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.daemon is None:
        if args.cycles == 0:
            parser.error("--cycles 0 (until stopped) needs --daemon")
        check_guest_args(parser, args)
    with ProgressReporter(enabled=not args.json or sys.stderr.isatty()) as progress:
        try:
            if args.daemon is None:
                out = asyncio.run(_run_in_process(args, progress))
            else:
                out = asyncio.run(_run_daemon(args, progress))
        except PoolError as exc:
            print(f"hv-netvsc-sim: {exc} ({exc.reason})", file=sys.stderr)
            return 1
    if args.json:
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        return _strict_status(args, out)
    rows: dict[str, Any] = {
        "mode": out["mode"] + (f" ({out['strategy']})" if "strategy" in out else ""),
        "cycles": out["cycles"],
        "cycles per second": out["cycles_per_second"],
        "events": out["events"],
        "allocations": out["allocations"],
        "failures": out["failures"],
        "failure reasons": out["failure_reasons"],
        "probe failures": out["driver"]["probe_failures"],
        "leaked buffers": out["driver"]["leaked_buffers"],
        "GPADLs established": out["host"]["gpadls_established"],
        "GPADL messages": out["host"]["gpadl_messages"],
        "GPADLs refused": out["host"]["gpadls_refused"],
        "use-after-free writes": out["host"]["use_after_free_writes"],
    }
    # in-process: the guest's modeled latency; through the daemon: the round trip's wall clock
    what = "modeled alloc" if out["mode"] == "in-process" else "alloc (wall, via daemon)"
    rows[f"{what} p50 (µs)"] = out["alloc_latency_seconds"]["p50"] * 1e6
    rows[f"{what} p99 (µs)"] = out["alloc_latency_seconds"]["p99"] * 1e6
    if "run" in out:
        rows["run hypercalls"] = out["run"]["hypercalls"]
        rows["run 2M splits"] = out["run"]["direct_map_splits"]["level2"]
        rows["fatal hazard pages"] = out["end_state"]["hazard_pages"]["private_alias_to_shared"]
    print_table(summary_table("hv-netvsc-sim run", rows))
    return _strict_status(args, out)


def _strict_status(args: argparse.Namespace, out: dict[str, Any]) -> int:
    """0, or 1 under --strict when a probe or an allocation failed."""
    failed = out["failures"] + out["driver"]["probe_failures"]
    if args.strict and failed:
        print(
            f"hv-netvsc-sim: --strict: {out['failures']} allocation(s) and "
            f"{out['driver']['probe_failures']} probe(s) failed",
            file=sys.stderr,
        )
        return 1
    return 0


@quiet_on_closed_stdout
def main(argv: Sequence[str] | None = None) -> int:
    userwarnings.install("hv-netvsc-sim")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args, args.parser))  # usage errors name the subcommand
    except KeyboardInterrupt:
        return 130
