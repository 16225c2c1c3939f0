"""Scale benchmark of the guest's page allocator and its background churn.

Builds a 64 GiB guest's PageAllocator (RAM [0, 3 GiB) and [4 GiB, 65 GiB): the PCI hole; one
vCPU's per-cpu lists, as the default guest) and
ages it with the default churn for 1,000,000 steps, then does the same at 16 GiB (the
calibration guest of pool/guest/workload.py). Each size runs in a child process so that its
peak RSS is its own. Prints build and aging times, peak RSS, the Normal zone's unusable free
index at order 9, the 2 MiB regions a 16 MiB vmalloc buffer (4096 order-0 pages) lands in, and
a baseline measured in the same run: a bare loop making as many random.Random draws and dict
pushes/pops as the aging made allocator calls, with the ratio of the two.

Targets: 64 GiB + 1 M steps within 60 s, peak RSS below 512 MiB. Exits 1 if one is missed.

    python bench/bench_guest_scale.py [--steps N] [--seed S] [--gib G ...]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pool.guest.buddy import PageAllocator
from pool.guest.fragmentation import format_buddyinfo, unusable_free_index
from pool.guest.units import PAGE_SHIFT, PAGES_PER_2M, GiB
from pool.guest.vmalloc import vm_area_alloc_pages
from pool.guest.workload import Churn

G = GiB >> PAGE_SHIFT
TIME_LIMIT_S = 60.0
RSS_LIMIT_MIB = 512.0


def build(gib: int, cpus: int = 1) -> PageAllocator:
    """The allocator of a guest of ``gib`` GiB with ``cpus`` vCPUs (GuestConfig's default: 1)."""
    if gib <= 3:
        return PageAllocator(gib * G, [(0, gib * G)], cpus=cpus)
    return PageAllocator((gib + 1) * G, [(0, 3 * G), (4 * G, (gib + 1) * G)], cpus=cpus)


def vmalloc_regions(a: PageAllocator, pages: int = 4096) -> int:
    """Distinct 2 MiB regions of a 16 MiB vmalloc buffer's pages (vm_area_alloc_pages)."""
    b = a.clone()
    return len({pfn // PAGES_PER_2M for pfn in vm_area_alloc_pages(b, pages)})


def baseline(allocs: int, frees: int, seed: int) -> float:
    """A bare loop with the aging's RNG draws and free-list traffic but no allocator logic: two
    draws, one pop and one push per allocation; one draw, one push and one pop per free."""
    rng = random.Random(seed)
    rand = rng.random
    d: dict[int, None] = dict.fromkeys(range(4096))
    key = 1 << 20
    start = time.perf_counter()
    for _ in range(allocs):
        rand()
        rand()
        d.popitem()
        d[key] = None
        key += 1
    for _ in range(frees):
        rand()
        d[key] = None
        key += 1
        d.popitem()
    return time.perf_counter() - start


@attrs.frozen
class Result:
    gib: int
    steps: int
    seed: int
    build_s: float
    age_s: float
    allocations: int
    frees: int
    baseline_s: float
    peak_rss_mib: float
    zone: str
    unusable9: int
    regions: int
    pristine_regions: int
    free_fraction: float
    big_block_mib: int
    buddyinfo: str


def measure(gib: int, steps: int, seed: int) -> Result:
    start = time.perf_counter()
    a = build(gib)
    build_s = time.perf_counter() - start
    pristine_regions = vmalloc_regions(a)
    churn = Churn(a, seed)
    start = time.perf_counter()
    churn.run(steps)
    age_s = time.perf_counter() - start
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    zone = "Normal" if any(z.name == "Normal" for z in a.zones) else "DMA32"
    big = sum(n << o for z in a.zones for o, n in enumerate(a.nr_free(z.name)) if o >= 9)
    return Result(
        gib=gib,
        steps=steps,
        seed=seed,
        build_s=build_s,
        age_s=age_s,
        allocations=churn.allocations_made,
        frees=churn.frees_made,
        baseline_s=baseline(churn.allocations_made, churn.frees_made, seed),
        peak_rss_mib=peak_rss_mib,
        zone=zone,
        unusable9=unusable_free_index(a.nr_free(zone), 9),
        regions=vmalloc_regions(a),
        pristine_regions=pristine_regions,
        free_fraction=a.free_pages() / a.ram_pages,
        big_block_mib=big * 4 // 1024,
        buddyinfo=format_buddyinfo(a.buddyinfo()),
    )


def report(r: Result) -> str:
    return "\n".join(
        [
            f"== {r.gib} GiB guest (PCI hole at 3-4 GiB), {r.steps:,} steps, seed {r.seed}",
            f"build                      {r.build_s:.3f} s",
            f"age                        {r.age_s:.2f} s "
            f"({r.allocations:,} allocations, {r.frees:,} frees)",
            f"baseline (bare loop)       {r.baseline_s:.2f} s"
            f"  -> aging/baseline = {r.age_s / r.baseline_s:.1f}x",
            f"peak RSS                   {r.peak_rss_mib:.0f} MiB",
            f"free                       {r.free_fraction:.1%} of RAM, "
            f"{r.big_block_mib} MiB in order-9/10 blocks",
            f"unusable index, order 9    {r.zone}: {r.unusable9 / 1000:.3f}",
            f"16 MiB vmalloc buffer      {r.regions} distinct 2 MiB regions "
            f"(pristine guest: {r.pristine_regions})",
            r.buddyinfo.rstrip("\n"),
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--gib", type=int, action="append", help="guest size(s); default 64 and 16")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = args.gib or [64, 16]
    if args.child:
        print(json.dumps(attrs.asdict(measure(sizes[0], args.steps, args.seed))))
        return 0
    failed = False
    for gib in sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--gib", str(gib), "--steps", str(args.steps),
             "--seed", str(args.seed)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        result = Result(**json.loads(out.stdout))
        print(report(result), flush=True)
        if gib == 64 and args.steps >= 1_000_000:
            ok_time = result.build_s + result.age_s <= TIME_LIMIT_S
            ok_rss = result.peak_rss_mib < RSS_LIMIT_MIB
            print(
                f"targets: build+age <= {TIME_LIMIT_S:.0f} s: {'ok' if ok_time else 'MISSED'}; "
                f"peak RSS < {RSS_LIMIT_MIB:.0f} MiB: {'ok' if ok_rss else 'MISSED'}"
            )
            failed |= not (ok_time and ok_rss)
        print()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
