"""What the client library costs per request: allocate + free round trips through
daemon.client (async SharedPoolClient, and SyncSharedPoolClient with its loop thread),
beside the baseline of the same two requests sent with a bare aiohttp session and
json.loads, in the same run against the same spawned sharedpoold over its Unix socket.

    .venv/bin/python bench/bench_client.py [--cycles 400] [--size 65536] [--json]

Prints min / median / max microseconds per allocate+free pair for each way. The daemon
runs a small pristine guest (512 MiB, synchronous=normal) on a temporary socket; one
client at a time, so the figures are latencies, not throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.client import (  # noqa: E402
    NO_RETRY,
    SharedPoolClient,
    SyncSharedPoolClient,
    register_client,
)

FLAGS = [
    "--guest-memory", "512MiB", "--age-steps", "0", "--pool-initial", "8MiB",
    "--pool-max", "64MiB", "--synchronous", "normal", "--lease-ttl", "600",
]  # fmt: skip


def spawn(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    sock = tmp / "sharedpoold.sock"
    cmd = [sys.executable, "-m", "daemon.cli", "--state-dir", str(tmp / "state")]
    cmd += ["--listen", f"unix:{sock}", *FLAGS]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"unix:{sock}"


async def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    async with SharedPoolClient(url, register=False) as c:
        for _ in range(600):
            if await c.ready():
                return
            if proc.poll() is not None:
                raise SystemExit(f"sharedpoold exited {proc.returncode}")
            await asyncio.sleep(0.05)
    raise SystemExit("sharedpoold not ready after 30 s")


async def bare(url: str, cycles: int, size: int) -> list[float]:
    reg = await register_client(url, "bench-bare")
    auth = {"Authorization": f"Bearer {reg.token}"}
    out = []
    conn = aiohttp.UnixConnector(path=url[len("unix:") :])
    async with aiohttp.ClientSession(connector=conn) as s:
        for _ in range(cycles):
            t0 = time.perf_counter()
            body = json.dumps({"size": size}).encode()
            hdrs = {**auth, "Content-Type": "application/json"}
            async with s.post("http://d/v1/buffers", data=body, headers=hdrs) as r:
                buf = json.loads(await r.read())
                assert r.status == 201, buf
            async with s.delete(f"http://d/v1/buffers/{buf['id']}", headers=auth) as r:
                assert r.status == 200 and not json.loads(await r.read())["leaked"]
            out.append(time.perf_counter() - t0)
        async with s.delete(f"http://d/v1/clients/{reg.client_id}", headers=auth) as r:
            await r.read()
    return out


async def library(url: str, cycles: int, size: int) -> list[float]:
    out = []
    async with SharedPoolClient(url, "bench-async", retry=NO_RETRY) as c:
        for _ in range(cycles):
            t0 = time.perf_counter()
            buf = await c.allocate(size)
            assert not (await c.free(buf)).leaked
            out.append(time.perf_counter() - t0)
    return out


def library_sync(url: str, cycles: int, size: int) -> list[float]:
    out = []
    with SyncSharedPoolClient(url, "bench-sync", retry=NO_RETRY) as c:
        for _ in range(cycles):
            t0 = time.perf_counter()
            buf = c.allocate(size)
            assert not c.free(buf).leaked
            out.append(time.perf_counter() - t0)
    return out


def summary(xs: list[float]) -> dict[str, float]:
    us = [x * 1e6 for x in xs]
    return {"min_us": min(us), "median_us": statistics.median(us), "max_us": max(us)}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cycles", type=int, default=400, help="allocate+free pairs per way")
    parser.add_argument("--size", type=int, default=64 << 10, help="bytes per allocation")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args()
    if args.cycles < 1 or args.size < 1:
        parser.error("--cycles and --size must be positive")
    with tempfile.TemporaryDirectory(prefix="sharedpool-bench-client-") as tmp:
        proc, url = spawn(Path(tmp))
        try:
            asyncio.run(wait_ready(url, proc))
            warm = max(10, args.cycles // 10)
            asyncio.run(bare(url, warm, args.size))  # warm-up: imports, the pool's first chunk
            results: dict[str, Any] = {
                "bare aiohttp (baseline)": summary(asyncio.run(bare(url, args.cycles, args.size))),
                "SharedPoolClient": summary(asyncio.run(library(url, args.cycles, args.size))),
                "SyncSharedPoolClient": summary(library_sync(url, args.cycles, args.size)),
            }
        finally:
            proc.terminate()
            proc.wait(20)
    print(f"allocate + free of {args.size} bytes, {args.cycles} pairs each, over a Unix socket:")
    for name, r in results.items():
        print(
            f"  {name:24} min {r['min_us']:7.0f} us  median {r['median_us']:7.0f} us  "
            f"max {r['max_us']:8.0f} us"
        )
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
