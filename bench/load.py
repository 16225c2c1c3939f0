"""Load: N concurrent clients (default 64), each doing a bounded number of allocate/free
requests with hv_netvsc-like sizes, against a spawned sharedpoold over its Unix socket.
Prints throughput, alloc and free latency percentiles (p50, p99) and the answers by kind.

    .venv/bin/python bench/load.py [--clients 64] [--cycles 200] [--seed 1]
                                   [--synchronous normal|full] [--guest-memory 1GiB]
                                   [--pool-max 256MiB] [--json]

The daemon runs the small pristine guest of the tests (tests/support/daemons.SMALL)
with the flags given here on top; a 503 pool-exhausted (or conversion-failed) is a designed
answer and counted apart; any other error makes the exit status 1. Everything binds to a
temporary Unix socket; the loop is bounded by --cycles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.harness import (  # noqa: E402
    ClientState,
    LoadStats,
    client_worker,
    percentile,
    proc_fds,
    proc_rss_kb,
    spawn,
)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="sharedpool-load-"))
    d = spawn(
        tmp,
        "--synchronous",
        args.synchronous,
        "--guest-memory",
        args.guest_memory,
        "--pool-max",
        args.pool_max,
        "--lease-ttl",
        "600",
        tcp=False,
    )
    try:
        await d.wait_ready(60)
        rss0, fds0 = proc_rss_kb(d.proc.pid), proc_fds(d.proc.pid)
        stats = LoadStats()
        states = [ClientState(f"load-{i}") for i in range(args.clients)]
        per = [LoadStats() for _ in states]
        t0 = time.perf_counter()
        await asyncio.gather(
            *(
                client_worker(
                    d.unix_url,
                    st,
                    s,
                    cycles=args.cycles,
                    rng=random.Random(args.seed * 1000 + i),
                    keep=args.keep,
                )
                for i, (st, s) in enumerate(zip(states, per, strict=True))
            )
        )
        elapsed = time.perf_counter() - t0
        for s in per:
            stats.merge(s)
        rss1, fds1 = proc_rss_kb(d.proc.pid), proc_fds(d.proc.pid)
        requests = len(stats.alloc_latency) + len(stats.free_latency)
        return {
            "clients": args.clients,
            "cycles_per_client": args.cycles,
            "seconds": round(elapsed, 3),
            "requests": requests,
            "requests_per_second": round(requests / elapsed, 1),
            "allocations": stats.allocations,
            "frees": stats.frees,
            "designed_503": dict(stats.designed_503),
            "errors": stats.errors[:20],
            "error_count": len(stats.errors),
            "disconnects": stats.disconnects,
            "alloc_ms": {
                "p50": round(percentile(stats.alloc_latency, 50) * 1e3, 3),
                "p99": round(percentile(stats.alloc_latency, 99) * 1e3, 3),
                "max": round(max(stats.alloc_latency, default=0) * 1e3, 3),
            },
            "free_ms": {
                "p50": round(percentile(stats.free_latency, 50) * 1e3, 3),
                "p99": round(percentile(stats.free_latency, 99) * 1e3, 3),
                "max": round(max(stats.free_latency, default=0) * 1e3, 3),
            },
            "daemon_rss_kb": [rss0, rss1],
            "daemon_fds": [fds0, fds1],
        }
    finally:
        d.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--cycles", type=int, default=200, help="requests per client")
    parser.add_argument("--keep", type=int, default=3, help="buffers a client holds at most")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--synchronous", choices=("full", "normal"), default="normal")
    parser.add_argument("--guest-memory", default="1GiB")
    parser.add_argument("--pool-max", default="256MiB")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"load: {result['clients']} clients x {result['cycles_per_client']} requests over "
            f"the Unix socket (synchronous={args.synchronous})"
        )
        print(
            f"  {result['requests']} requests in {result['seconds']} s: "
            f"{result['requests_per_second']} requests/s"
        )
        a, f = result["alloc_ms"], result["free_ms"]
        print(f"  allocate: p50 {a['p50']} ms  p99 {a['p99']} ms  max {a['max']} ms")
        print(f"  free:     p50 {f['p50']} ms  p99 {f['p99']} ms  max {f['max']} ms")
        print(
            f"  allocations {result['allocations']}, frees {result['frees']}, designed 503s "
            f"{result['designed_503']}, errors {result['error_count']}"
        )
        print(f"  daemon RSS kB {result['daemon_rss_kb']}, fds {result['daemon_fds']}")
        for e in result["errors"]:
            print("  error:", e)
    return 1 if result["error_count"] or result["disconnects"] else 0


if __name__ == "__main__":
    sys.exit(main())
