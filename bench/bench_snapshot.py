"""Benchmark: snapshot encode and decode time and size (format 2, daemon.plaindata) beside
a zlib-compressed pickle of the same state (format 1) measured in the same run.

    .venv/bin/python bench/bench_snapshot.py [--buffers 10000] [--repeat 5]

The state: the daemon's default configuration (16 GiB TDX guest aged 200,000 steps, the
`pool` strategy) with `--buffers` live buffers of mixed sizes from 50 clients (a few more
allocated, then some freed). Target: format 2 within 3x of pickle's time. It also prints what the
daemon's event loop would wait for if it walked in-process (``snapshot.prepare``), and what it
waits for with the forked child the daemon uses (daemon.forksnap): the longest gap of a 1 ms
ticker on the loop while the child encodes.
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import random
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon import forksnap, snapshot
from daemon.config import load_config
from daemon.state import build


def _times(fn: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    out, value = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = fn()
        out.append(time.perf_counter() - t0)
    return out, value


def _fmt(ts: list[float]) -> str:
    return f"min {min(ts):.3f} / median {statistics.median(ts):.3f} / max {max(ts):.3f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--buffers", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, {"daemon.state_dir": tmp, "daemon.admin_token": "x" * 20}, {})
        state = build(config)
    rng = random.Random(1)
    extra = args.buffers // 5
    live = [
        state.strategy.allocate(rng.choice([1500, 4096, 9000, 65536, 100_000]), f"c{i % 50}", "p")
        for i in range(args.buffers + extra)
    ]
    for b in rng.sample(live, extra):
        state.strategy.free(b.id, b.owner)
    contents = snapshot.SnapshotContents(1, state.strategy, (), 0, 0.0)
    print(f"state: {len(state.strategy.buffers())} live buffers, 16 GiB guest, pool strategy")

    def pickle_dump() -> bytes:
        return zlib.compress(pickle.dumps(contents, protocol=pickle.HIGHEST_PROTOCOL), 1)

    enc2, blob2 = _times(lambda: snapshot.encode(contents), args.repeat)
    dec2, _ = _times(lambda: snapshot.decode(1, blob2), args.repeat)
    enc1, blob1 = _times(pickle_dump, args.repeat)
    dec1, _ = _times(lambda: pickle.loads(zlib.decompress(blob1)), args.repeat)
    print(f"format 2 encode: {_fmt(enc2)}   decode: {_fmt(dec2)}   size {len(blob2) / 1e6:.2f} MB")
    print(f"pickle   encode: {_fmt(enc1)}   decode: {_fmt(dec1)}   size {len(blob1) / 1e6:.2f} MB")
    e, d = (
        statistics.median(enc2) / statistics.median(enc1),
        statistics.median(dec2) / statistics.median(dec1),
    )
    print(f"ratio (median): encode {e:.2f}x, decode {d:.2f}x pickle's (target <= 3x)")
    # What the daemon's event loop waits for: the walk only (packing runs on the journal's
    # worker thread).
    walk, prepared = _times(lambda: snapshot.prepare(contents), args.repeat)
    pack, _ = _times(prepared.pack, args.repeat)
    print(f"on the event loop (walk): {_fmt(walk)}   off it (pack): {_fmt(pack)}")
    stalls = [asyncio.run(_forked_stall(contents)) for _ in range(args.repeat)]
    print(
        f"forked snapshot (daemon.forksnap): longest event-loop stall {_fmt(stalls)}; "
        f"in-process walk {statistics.median(walk) / statistics.median(stalls):.0f}x that (median)"
    )


async def _forked_stall(contents: snapshot.SnapshotContents) -> float:
    """The longest gap between ticks of a 1 ms ticker while a forked child encodes."""
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    done = False

    async def ticker() -> None:
        last = loop.time()
        while not done:
            await asyncio.sleep(0.001)
            now = loop.time()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    await forksnap.encode_forked(lambda: snapshot.encode(contents))
    done = True
    await task
    return max(gaps)


if __name__ == "__main__":
    main()
