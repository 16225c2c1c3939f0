"""The lease-expiry wave: 400 clients x 650 buffers expiring at once, and the event loop's
longest stall meanwhile (issue 13: it once froze the loop for 22.6 s, past systemd's
WatchdogSec=30s at ~550 clients).

The same wave runs twice in one process, on the same guest and pool: with the daemon's
batching (daemon.engine.EXPIRY_BATCH_BUFFERS buffers between two yields) and, as the
baseline, in one go (the batch set beyond the wave: the old behaviour). A ticker task
sleeping 5 ms measures the loop lag: the longest gap between two ticks beyond 5 ms.

    .venv/bin/python bench/bench_expiry.py [--clients 400] [--buffers 650] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon import engine  # noqa: E402
from daemon.config import load_config  # noqa: E402
from daemon.engine import Service  # noqa: E402


async def _wave(state_dir: Path, clients: int, buffers: int, batch: int) -> tuple[float, float]:
    """(longest loop stall, seconds the expiry took) for one wave."""
    config = load_config(
        None,
        {
            "guest.memory": "4GiB",
            "guest.age_steps": 0,
            "pool.initial": "1200MiB",
            "pool.max": "2GiB",
            "pool.max_buffer": "1MiB",
            "pool.low_watermark": "0",
            "pool.high_watermark": "2GiB",
            "daemon.synchronous": "normal",
            "daemon.lease_ttl": 3600.0,
            "daemon.state_dir": str(state_dir),
            "daemon.max_clients": clients + 1,
        },
        env={},
    )
    service = Service(config, reset_state=True)
    await asyncio.to_thread(service.open)
    regs = [await service.register(f"c{i}") for i in range(clients)]
    for reg in regs:
        client = service.clients[reg.client_id]
        await asyncio.gather(*(service.allocate(client, 4096, "") for _ in range(buffers)))
    for client in service.clients.values():
        client.last_seen -= 7200  # every lease ran out at once
    engine.EXPIRY_BATCH_BUFFERS = batch
    worst = 0.0
    running = True

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            worst = max(worst, now - last - 0.005)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    expired = await service.expire_leases()
    took = time.perf_counter() - t0
    running = False
    await tick
    assert len(expired) == clients and len(service.clients) == 0
    await service.close(snapshot=False)
    return worst, took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=400)
    parser.add_argument("--buffers", type=int, default=650)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("sharedpoold").setLevel(logging.ERROR)  # one 'lease expired' per client
    batched = engine.EXPIRY_BATCH_BUFFERS
    out: dict[str, list[tuple[float, float]]] = {"batched": [], "one go (baseline)": []}
    with tempfile.TemporaryDirectory(prefix="bench-expiry-") as tmp:
        for run in range(args.runs):
            for name, batch in (("batched", batched), ("one go (baseline)", 1 << 40)):
                res = asyncio.run(
                    _wave(Path(tmp) / f"{name[:3]}{run}", args.clients, args.buffers, batch)
                )
                out[name].append(res)
                print(f"run {run + 1} {name}: stall {res[0] * 1e3:.1f} ms, expiry {res[1]:.2f} s")
    n = args.clients * args.buffers
    print(f"\n{args.clients} clients x {args.buffers} buffers ({n:,}) expiring at once")
    for name, rows in out.items():
        stalls = sorted(r[0] * 1e3 for r in rows)
        took = sorted(r[1] for r in rows)
        print(
            f"{name:>18}: longest loop stall min/median/max "
            f"{stalls[0]:.1f}/{statistics.median(stalls):.1f}/{stalls[-1]:.1f} ms; "
            f"expiry {took[0]:.2f}/{statistics.median(took):.2f}/{took[-1]:.2f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
