"""Benchmark: alloc+free round trips per second through sharedpoold, over the Unix socket
and over TCP, with 32 concurrent connections, beside a trivial aiohttp JSON handler
measured in the same run with the same load generator.

    .venv/bin/python bench/bench_daemon.py [--seconds 5] [--concurrency 32] [--size 65536]

Three processes: the daemon (its default 16 GiB guest and pool, a temporary state
directory, journal with synchronous=FULL unless --synchronous normal), the trivial server
(the same routes answering a canned JSON body), and this one, the load generator (aiohttp
client tasks, one connection each). A round trip is POST /v1/buffers then DELETE
/v1/buffers/{id}; the trivial server answers the same two requests. The target is a daemon
rate of at least half the trivial handler's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent

TRIVIAL = r"""
import json, sys
from aiohttp import web
BODY = {"id": 1, "size": 65536, "owner": "c-0123456789abcdef", "purpose": "bench",
        "npages": 16, "va": 18446683600570023936, "gpadl_messages": 1,
        "pfn_ranges": [[88064, 16]]}
n = [0]
async def alloc(request):
    await request.json()
    n[0] += 1
    return web.json_response({**BODY, "id": n[0]}, status=201)
async def free(request):
    return web.json_response({**BODY, "id": int(request.match_info["id"]), "leaked": False})
async def ready(request):
    return web.json_response({"status": "ready"})
app = web.Application()
app.router.add_post("/v1/buffers", alloc)
app.router.add_delete("/v1/buffers/{id}", free)
app.router.add_get("/readyz", ready)
async def main():
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, sys.argv[1]).start()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[-1][1]
    print(f"trivial listening on tcp:127.0.0.1:{port}", flush=True)
    import asyncio
    await asyncio.Event().wait()
import asyncio
asyncio.run(main())
"""


def _wait_line(proc: subprocess.Popen[bytes], log: Path, pattern: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        m = rx.search(text)
        if m:
            return m.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{text}")
        time.sleep(0.05)
    raise TimeoutError(pattern)


async def _wait_ready(session: aiohttp.ClientSession, base: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with session.get(base + "/readyz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError("not ready")


async def load(
    url: str, *, seconds: float, concurrency: int, size: int, token: str | None
) -> dict[str, Any]:
    """`concurrency` tasks, one connection each, doing alloc+free round trips."""
    if url.startswith("unix:"):
        connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=url[5:], limit=concurrency)
        base = "http://bench"
    else:
        connector = aiohttp.TCPConnector(limit=concurrency)
        base = url
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = json.dumps({"size": size, "purpose": "bench"}).encode()
    post_headers = {**headers, "Content-Type": "application/json"}
    latencies: list[float] = []
    errors = 0
    rounds = 0
    async with aiohttp.ClientSession(connector=connector) as session:
        await _wait_ready(session, base)
        stop_at = time.perf_counter() + seconds + 0.5  # 0.5 s warm-up, not counted
        count_from = time.perf_counter() + 0.5

        async def worker() -> None:
            nonlocal errors, rounds
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                async with session.post(
                    base + "/v1/buffers", data=body, headers=post_headers
                ) as resp:
                    data = await resp.read()
                    ok = resp.status == 201
                t1 = time.perf_counter()
                if not ok:
                    errors += 1
                    continue
                bid = json.loads(data)["id"]
                async with session.delete(f"{base}/v1/buffers/{bid}", headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                if t0 >= count_from:
                    rounds += 1
                    latencies.append(t1 - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else 0.0

    return {
        "round_trips_per_second": rounds / seconds,
        "round_trips": rounds,
        "errors": errors,
        "alloc_p50_ms": pct(0.50) * 1e3,
        "alloc_p99_ms": pct(0.99) * 1e3,
    }


async def register(url: str) -> str:
    from daemon.client import SharedPoolClient, register_client

    async with SharedPoolClient(url, register=False) as c:
        for _ in range(600):
            if await c.ready():
                break
            await asyncio.sleep(0.1)
    return (await register_client(url, "bench")).token


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--size", type=int, default=64 << 10, help="bytes per allocation")
    parser.add_argument("--synchronous", choices=("full", "normal"), default="full")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sharedpool-bench-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    dlog, tlog = tmp / "daemon.log", tmp / "trivial.log"
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            "--state-dir",
            str(tmp / "state"),
            "--listen",
            f"unix:{tmp / 'd.sock'}",
            "--listen",
            "tcp:127.0.0.1:0",
            "--synchronous",
            args.synchronous,
            "--lease-ttl",
            "600",
        ],
        cwd=tmp,
        env=env,
        stdout=dlog.open("wb"),
        stderr=subprocess.STDOUT,
    )
    trivial = subprocess.Popen(
        [sys.executable, "-c", TRIVIAL, str(tmp / "t.sock")],
        cwd=tmp,
        env=env,
        stdout=tlog.open("wb"),
        stderr=subprocess.STDOUT,
    )
    results: dict[str, dict[str, Any]] = {}
    try:
        d_tcp = "http://" + _wait_line(daemon, dlog, r"listening on .*tcp:(\S+)")
        t_tcp = "http://" + _wait_line(trivial, tlog, r"listening on tcp:(\S+)")
        d_unix, t_unix = f"unix:{tmp / 'd.sock'}", f"unix:{tmp / 't.sock'}"
        token = asyncio.run(register(d_unix))
        for transport, d_url, t_url in (("unix", d_unix, t_unix), ("tcp", d_tcp, t_tcp)):
            for name, url, tok in (("trivial", t_url, None), ("sharedpoold", d_url, token)):
                results[f"{name}/{transport}"] = asyncio.run(
                    load(
                        url,
                        seconds=args.seconds,
                        concurrency=args.concurrency,
                        size=args.size,
                        token=tok,
                    )
                )
    finally:
        for proc in (daemon, trivial):
            proc.send_signal(signal.SIGTERM)
        for proc in (daemon, trivial):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(
        f"alloc+free round trips, {args.concurrency} connections, {args.size} B buffers, "
        f"{args.seconds:g} s per run, journal synchronous={args.synchronous}"
    )
    print(
        f"{'server/transport':<22}{'round trips/s':>14}{'alloc p50 ms':>14}"
        f"{'alloc p99 ms':>14}{'errors':>8}"
    )
    for key, r in results.items():
        print(
            f"{key:<22}{r['round_trips_per_second']:>14.0f}{r['alloc_p50_ms']:>14.2f}"
            f"{r['alloc_p99_ms']:>14.2f}{r['errors']:>8}"
        )
    for transport in ("unix", "tcp"):
        ratio = results[f"sharedpoold/{transport}"]["round_trips_per_second"] / max(
            results[f"trivial/{transport}"]["round_trips_per_second"], 1e-9
        )
        verdict = "meets" if ratio >= 0.5 else "BELOW"
        print(f"{transport}: sharedpoold / trivial = {ratio:.2f} ({verdict} the 0.5 target)")
    print(f"daemon exit status: {daemon.returncode}")
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
