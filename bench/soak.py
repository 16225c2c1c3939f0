"""Soak: mixed load against a spawned sharedpoold for a while (default 10 minutes), sampling
the daemon's resident memory (/proc/PID/status VmRSS) and open file descriptors
(/proc/PID/fd). After the warm-up, neither may grow by 5 % or more.

    .venv/bin/python bench/soak.py [--duration 600] [--warmup 60] [--clients 16]
                                   [--interval 5] [--synchronous normal|full] [--json]

The mix, per client life (each life a new client and a new connection pool):
register; up to --cycles allocate/free requests with hv_netvsc-like sizes, now and then a
list, get, heartbeat or pool read; a few designed errors (unknown id 404, double free
409, bad token 401, malformed JSON 400, over-limit body 413); then unregister, or (one
life in five) vanish without a word, leaving its buffers to the lease expiry (lease TTL
2 s). Beside the clients: a /metrics scrape every second and an admin grow or shrink every
5 s. The pool grows and shrinks on its own too (low 2 MiB, high 16 MiB, hysteresis 2 s),
and the journal is compacted into a snapshot every 30 s.

Growth = (mean of the samples in the last minute) / (mean of the samples in the first
minute after the warm-up) - 1. Every loop is bounded by --duration; the daemon listens on
a temporary Unix socket only. Exit status 1 if growth reaches 5 % or a request fails in a
way the API does not design.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.harness import (  # noqa: E402
    ADMIN_TOKEN,
    CONNECTION_ERRORS,
    ClientState,
    LoadStats,
    client_worker,
    percentile,
    proc_fds,
    proc_rss_kb,
    spawn,
)

from daemon.client import ApiError, SharedPoolClient  # noqa: E402

# designed errors a client provokes now and then: (method, path template, body, headers,
# expected status)
BAD_BODY = b'{"size": ' * 3


async def _designed_errors(
    url: str, state: ClientState, stats: LoadStats, rng: random.Random
) -> None:
    sock = url[len("unix:") :]
    auth = {"Authorization": f"Bearer {state.token}"}
    checks: list[tuple[str, str, bytes | None, dict[str, str], int]] = [
        ("GET", "/v1/buffers/999999999999", None, auth, 404),
        ("GET", "/v1/buffers", None, {"Authorization": "Bearer not-a-token"}, 401),
        ("POST", "/v1/buffers", BAD_BODY, {**auth, "Content-Type": "application/json"}, 400),
        (
            "POST",
            "/v1/buffers",
            b'{"size": 1, "purpose": "' + b"x" * (70 << 10) + b'"}',
            {**auth, "Content-Type": "application/json"},
            413,
        ),
    ]
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as s:
        for method, path, body, headers, want in rng.sample(checks, 2):
            async with s.request(method, "http://soak" + path, data=body, headers=headers) as r:
                await r.read()
                stats.other_requests += 1
                if r.status != want:
                    stats.errors.append(f"{method} {path}: {r.status}, expected {want}")
        if state.freed:
            bid = max(state.freed)
            async with s.delete(f"http://soak/v1/buffers/{bid}", headers=auth) as r:
                await r.read()
                stats.other_requests += 1
                if r.status != 409:
                    stats.errors.append(f"double free {bid}: {r.status}, expected 409")


async def _client_lives(
    url: str, idx: int, stats: LoadStats, rng: random.Random, deadline: float, cycles: int
) -> int:
    lives = 0
    while time.monotonic() < deadline:
        lives += 1
        state = ClientState(f"soak-{idx}-{lives}")
        await client_worker(url, state, stats, cycles=cycles, rng=rng, keep=3, extras=True)
        if not state.token:
            stats.errors.append(f"{state.name}: could not register")
            await asyncio.sleep(0.5)
            continue
        await _designed_errors(url, state, stats, rng)
        if rng.random() < 0.8:
            async with SharedPoolClient(url, token=state.token, client_id=state.client_id) as c:
                await c.unregister()
        # else: vanish; the lease expiry reclaims its buffers
    return lives


async def _admin(url: str, stats: LoadStats, deadline: float) -> None:
    n = 0
    async with SharedPoolClient(url, token=ADMIN_TOKEN) as admin:
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            try:
                await admin.metrics()
                n += 1
                if n % 5 == 0:
                    if n % 10:
                        await admin.grow(8 << 20)
                    else:
                        await admin.shrink(force=True)
            except ApiError as exc:
                stats.errors.append(f"admin: {exc}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="sharedpool-soak-"))
    d = spawn(
        tmp,
        "--guest-memory",
        "1GiB",
        "--pool-max",
        "256MiB",
        "--shrink-hysteresis",
        "2",
        "--lease-ttl",
        "2",
        "--synchronous",
        args.synchronous,
        "--snapshot-interval",
        "30",
        daemon_toml={"snapshot_min_records": 1000},
        tcp=False,
    )
    samples: list[tuple[float, int, int]] = []
    stats = LoadStats()
    try:
        await d.wait_ready(60)
        pid = d.proc.pid
        t0 = time.monotonic()
        deadline = t0 + args.duration

        async def sampler() -> None:
            while time.monotonic() < deadline:
                samples.append((time.monotonic() - t0, proc_rss_kb(pid), proc_fds(pid)))
                await asyncio.sleep(args.interval)
            samples.append((time.monotonic() - t0, proc_rss_kb(pid), proc_fds(pid)))

        per = [LoadStats() for _ in range(args.clients)]
        results = await asyncio.gather(
            sampler(),
            _admin(d.unix_url, stats, deadline),
            *(
                _client_lives(
                    d.unix_url,
                    i,
                    per[i],
                    random.Random(args.seed * 1000 + i),
                    deadline,
                    args.cycles,
                )
                for i in range(args.clients)
            ),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                stats.errors.append(f"task failed: {r!r}")
        lives = sum(r for r in results[2:] if isinstance(r, int))
        for s in per:
            stats.merge(s)
        async with SharedPoolClient(d.unix_url, token=ADMIN_TOKEN) as admin:
            inv = await admin.invariants()
            pool = dict((await admin.stats()).document)
        if d.proc.poll() is not None:
            stats.errors.append(f"daemon exited {d.proc.returncode}")
    except CONNECTION_ERRORS as exc:
        stats.errors.append(f"daemon unreachable: {exc!r}")
        inv, pool, lives = {"ok": False}, {}, 0
    finally:
        d.stop()

    warm = [s for s in samples if s[0] >= args.warmup]
    window = max(args.interval, min(60.0, (args.duration - args.warmup) / 4))
    first = [s for s in warm if s[0] < args.warmup + window] or warm[:1]
    last = [s for s in warm if s[0] >= samples[-1][0] - window] or warm[-1:]

    def growth(i: int) -> float:
        a = statistics.mean(s[i] for s in first)
        b = statistics.mean(s[i] for s in last)
        return (b - a) / a if a else 0.0

    requests = len(stats.alloc_latency) + len(stats.free_latency) + stats.other_requests
    return {
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "clients": args.clients,
        "client_lives": lives,
        "requests": requests,
        "requests_per_second": round(requests / max(args.duration, 1e-9), 1),
        "allocations": stats.allocations,
        "frees": stats.frees,
        "designed_503": dict(stats.designed_503),
        "error_count": len(stats.errors),
        "errors": stats.errors[:20],
        "alloc_ms": {
            "p50": round(percentile(stats.alloc_latency, 50) * 1e3, 3),
            "p99": round(percentile(stats.alloc_latency, 99) * 1e3, 3),
        },
        "rss_kb": {
            "start": samples[0][1] if samples else 0,
            "after_warmup": round(statistics.mean(s[1] for s in first)) if first else 0,
            "end": round(statistics.mean(s[1] for s in last)) if last else 0,
            "max": max((s[1] for s in samples), default=0),
            "growth_pct": round(growth(1) * 100, 2) if first else 0.0,
        },
        "fds": {
            "start": samples[0][2] if samples else 0,
            "after_warmup": round(statistics.mean(s[2] for s in first), 1) if first else 0,
            "end": round(statistics.mean(s[2] for s in last), 1) if last else 0,
            "max": max((s[2] for s in samples), default=0),
            "growth_pct": round(growth(2) * 100, 2) if first else 0.0,
        },
        "invariants": inv,
        "pool": {
            "leaked_bytes": pool.get("strategy", {}).get("leaked_bytes"),
            "grows": pool.get("strategy", {}).get("grows"),
            "shrinks": pool.get("strategy", {}).get("shrinks"),
            "reclaimed_buffers": pool.get("daemon", {}).get("reclaimed_buffers"),
            "snapshot_seq": pool.get("daemon", {}).get("snapshot_seq"),
            "journal_seq": pool.get("daemon", {}).get("journal_seq"),
        },
        "samples": [[round(t, 1), rss, fds] for t, rss, fds in samples],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--warmup", type=float, default=None, help="default min(60, duration/5)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--cycles", type=int, default=200, help="requests per client life")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--synchronous", choices=("full", "normal"), default="normal")
    parser.add_argument("--max-growth", type=float, default=5.0, help="percent")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = min(60.0, args.duration / 5)
    r = asyncio.run(run(args))
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(
            f"soak: {r['duration_s']:.0f} s, {r['clients']} concurrent clients "
            f"({r['client_lives']} client lives), warm-up {r['warmup_s']:.0f} s"
        )
        print(
            f"  {r['requests']} requests ({r['requests_per_second']}/s): {r['allocations']} "
            f"allocations, {r['frees']} frees, designed 503s {r['designed_503']}, "
            f"errors {r['error_count']}"
        )
        print(f"  allocate p50 {r['alloc_ms']['p50']} ms, p99 {r['alloc_ms']['p99']} ms")
        for key, unit in (("rss_kb", "kB"), ("fds", "")):
            v = r[key]
            print(
                f"  {key}: start {v['start']}{unit}, after warm-up {v['after_warmup']}{unit}, "
                f"end {v['end']}{unit}, max {v['max']}{unit}, growth {v['growth_pct']} %"
            )
        print(f"  pool: {r['pool']}")
        print(f"  invariants: {r['invariants']}")
        for e in r["errors"]:
            print("  error:", e)
        step = max(1, len(r["samples"]) // 20)
        print("  samples (t s, RSS kB, fds):", r["samples"][::step] + r["samples"][-1:])
    bad = (
        r["error_count"]
        or not r["invariants"].get("ok")
        or r["rss_kb"]["growth_pct"] >= args.max_growth
        or r["fds"]["growth_pct"] >= args.max_growth
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
