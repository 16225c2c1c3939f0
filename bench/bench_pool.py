"""In-process SharedPool alloc+free pairs per second, beside a bare free-list baseline.

For each size, the baseline does a bare pop/push of the same number of chunk objects
a pair touches (16 MiB = 4 order-10 chunks; smaller sizes = 1 chunk) on a Python list:
the floor of any pool written in Python. Targets (issue 3): >= 50,000 pairs/s for
16 MiB and >= 100,000 pairs/s for 64 KiB on this machine.

Run: .venv/bin/python bench/bench_pool.py [--pairs N]
"""

from __future__ import annotations

import argparse
import time

from pool.guest import Guest, GuestConfig
from pool.guest.units import GiB, KiB, MiB
from pool.shared import Chunk, SharedPool

SIZES = [("4KiB", 4 * KiB, 1), ("64KiB", 64 * KiB, 1), ("1MiB", 1 * MiB, 1), ("16MiB", 16 * MiB, 4)]
TARGETS = {"16MiB": 50_000, "64KiB": 100_000}


def baseline(pairs: int, nchunks: int) -> float:
    free = [Chunk(i * 1024, 10, [[0, 1024]], 1024) for i in range(64)]
    t0 = time.perf_counter()
    for _ in range(pairs):
        taken = [free.pop() for _ in range(nchunks)]
        for c in taken:
            free.append(c)
    return pairs / (time.perf_counter() - t0)


def measure(pairs: int, size: int) -> float:
    guest = Guest(GuestConfig(memory_bytes=4 * GiB))
    pool = SharedPool(guest, initial_bytes=128 * MiB)
    pool.setup()
    for _ in range(100):  # warm up
        pool.free(pool.allocate(size, "bench").id, "bench")
    t0 = time.perf_counter()
    for _ in range(pairs):
        pool.free(pool.allocate(size, "bench").id, "bench")
    rate = pairs / (time.perf_counter() - t0)
    pool.check_invariants()
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs")
    args = parser.parse_args()
    print(f"{'size':>6} {'pairs/s':>10} {'baseline/s':>11} {'ratio':>7}  target")
    ok = True
    for name, size, nchunks in SIZES:
        rate = max(measure(args.pairs, size) for _ in range(args.repeat))
        base = max(baseline(args.pairs, nchunks) for _ in range(args.repeat))
        target = TARGETS.get(name)
        verdict = (
            "" if target is None else (f">= {target:,}: " + ("ok" if rate >= target else "MISSED"))
        )
        ok &= target is None or rate >= target
        print(f"{name:>6} {rate:>10,.0f} {base:>11,.0f} {rate / base:>7.3f}  {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
