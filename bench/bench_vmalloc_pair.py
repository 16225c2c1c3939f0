"""Benchmark: one 16 MiB vmalloc buffer allocated and freed by the vmalloc strategies.

    .venv/bin/python bench/bench_vmalloc_pair.py [--pairs 100] [--repeats 5] [--gib 16]

On the aged default guest (1,000,000 churn steps, seed 1; from the aged-guest cache when it
holds it): VmallocStrategy.allocate + free of 16 MiB, i.e. vzalloc's 4096 pages from the page
allocator, zeroing, vmap, set_memory_decrypted on the vmalloc address (every page's
conversion, with the direct-map alias for vmalloc-directmap), the hazard counts kept, then
set_memory_encrypted and vfree. This is the per-buffer work `compare` does thousands of
times. Baseline, same run: the page allocator's part alone (vm_area_alloc_pages + free_bulk
of the same 4096 pages), the floor the strategy's conversions and bookkeeping add to.
Figures: ms per pair, min/median/max over the repeats (each the mean of --pairs pairs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pool.guest import GuestConfig
from pool.guest.units import GiB, MiB
from pool.guest.vmalloc import vm_area_alloc_pages
from pool.provision import Guests
from pool.vmalloc_strategy import VmallocStrategy


def spread(values: list[float]) -> str:
    return "/".join(f"{v * 1e3:.3f}" for v in (min(values), statistics.median(values), max(values)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=100, help="pairs per repeat (default 100)")
    ap.add_argument("--repeats", type=int, default=5, help="repeats (default 5)")
    ap.add_argument("--gib", type=int, default=16, help="guest RAM in GiB (default 16)")
    args = ap.parse_args()
    if args.pairs < 1 or args.repeats < 1 or args.gib < 1:
        ap.error("--pairs, --repeats and --gib must be at least 1")
    t0 = time.perf_counter()
    guests = Guests(GuestConfig(seed=1, memory_bytes=args.gib * GiB), 1_000_000)
    guests.aged()
    print(f"aged {args.gib} GiB guest ready in {time.perf_counter() - t0:.1f} s", flush=True)

    def measure(pair: object) -> list[float]:
        out = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for _ in range(args.pairs):
                pair()  # type: ignore[operator]
            out.append((time.perf_counter() - start) / args.pairs)
        return out

    print(f"16 MiB allocate + free, ms per pair (min/median/max of {args.repeats} x {args.pairs})")
    g = guests.aged()
    allocator = g.allocator

    def floor() -> None:
        allocator.free_bulk(vm_area_alloc_pages(allocator, 4096))

    base = measure(floor)
    print(f"  {'baseline: page allocator only':<34} {spread(base)}")
    for alias in (True, False):
        s = VmallocStrategy(guests.aged(), alias=alias)

        def pair(s: VmallocStrategy = s) -> None:
            buf = s.allocate(16 * MiB, "bench")
            s.free(buf.id, "bench")

        got = measure(pair)
        ratio = statistics.median(got) / statistics.median(base)
        print(f"  {s.name:<34} {spread(got)}  ({ratio:.1f}x the baseline)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
