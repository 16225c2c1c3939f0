"""The compiled core against the pure-Python reference: same operations, same everything.

pool.guest._core translates the hot paths of PageAllocator (and Churn.step) line by line; the
Python methods stay the reference. Each example builds two allocators over one small machine
(three zones named as the kernel's, so the zonelists, ALLOC_NOFRAGMENT and the DMA32
fallback all occur; holes; pcp batch and high drawn small so that refills and drains happen
all the time), runs one random sequence of operations on both — alloc of orders 0..10 with
every migratetype and zonelist on every CPU, free (to the pcp lists of any CPU), bulk
alloc and free, drain_all_pages, claim_range/free_range, bad frees, churn steps with and
without pressure episodes — and after every operation asserts identical results and
identical state: every per-pfn byte (block state, migratetype, pageblock type), every list
link (so every free list and pcp list in order), every counter and pcp record, the churn's
live allocations and RNG.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.allocator_state import allocator_state

from pool.guest.buddy import PageAllocator, Zone, compiled_core
from pool.guest.migratetype import MIGRATE_PCPTYPES
from pool.guest.units import MAX_PAGE_ORDER
from pool.guest.vmalloc import vm_area_alloc_pages
from pool.guest.workload import Churn, ChurnConfig

ROOT = Path(__file__).resolve().parents[1]

# 24 MiB of pfns: DMA [0, 1024), DMA32 [1024, 3072), Normal [3072, 6144); page 0 reserved,
# a hole inside DMA32, the end of Normal not aligned to an order-10 block.
END = 6144
ZONES = [Zone("DMA", 0, 1024), Zone("DMA32", 1024, 3072), Zone("Normal", 3072, END)]
RAM = [(1, 1500), (1600, END - 5)]
ZONELISTS = [("Normal", "DMA32"), ("Normal",), ("DMA32",), ("DMA32", "DMA"), ("DMA",)]
CPUS = 2


def test_the_core_is_built() -> None:
    """The package's build compiles pool.guest._core; without it the differential is void."""
    assert compiled_core() is not None, "pool.guest._core is not built (pip install -e .)"


def make(backend: str, batch: int, high: int) -> PageAllocator:
    a = PageAllocator(END, RAM, ZONES, cpus=CPUS, backend=backend)  # type: ignore[arg-type]
    for row in a._pcp:
        for pcp in row:
            pcp.batch, pcp.high = batch, high
    return a


def churn_state(c: Churn) -> tuple[object, ...]:
    return (
        bytes(c._short),
        bytes(c._long),
        c._short_pages,
        c._long_pages,
        c.steps_done,
        c.allocations_made,
        c.frees_made,
        c._cpu,
        c._rng.getstate(),
    )


def outcome(fn: object, *args: object) -> tuple[str, object]:
    try:
        return "ok", fn(*args)  # type: ignore[operator]
    except (ValueError, RuntimeError) as exc:
        return type(exc).__name__, str(exc)


def vmalloc_list(a: PageAllocator, n: int, cpu: int) -> list[int]:
    return list(vm_area_alloc_pages(a, n, cpu).tolist())


mts = st.integers(0, MIGRATE_PCPTYPES - 1)
cpus = st.integers(0, CPUS - 1)
op = st.one_of(
    st.tuples(
        st.just("alloc"),
        st.integers(0, MAX_PAGE_ORDER),
        st.sampled_from(ZONELISTS),
        mts,
        cpus,
    ),
    st.tuples(st.just("alloc_small"), st.integers(0, 3), st.sampled_from(ZONELISTS), mts, cpus),
    st.tuples(st.just("free"), st.integers(0, 10**6), cpus),
    st.tuples(st.just("alloc_bulk"), st.integers(0, 300), st.sampled_from(ZONELISTS), mts, cpus),
    st.tuples(st.just("free_bulk"), st.integers(1, 400), cpus),
    st.tuples(st.just("vmalloc"), st.integers(0, 700), cpus),
    st.tuples(
        st.just("drain"),
    ),
    st.tuples(st.just("claim"), st.integers(0, END - 1), st.integers(1, 700)),
    st.tuples(st.just("bad_free"), st.integers(0, END + 10), st.integers(0, MAX_PAGE_ORDER)),
    st.tuples(st.just("churn"), st.integers(1, 400), st.booleans()),
)


@settings(
    max_examples=int(os.environ.get("SHAREDPOOL_DIFF_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    ops=st.lists(op, min_size=1, max_size=60),
    batch=st.integers(1, 16),
    high_factor=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_compiled_core_matches_the_reference(
    ops: list[tuple[object, ...]], batch: int, high_factor: int, seed: int
) -> None:
    assert compiled_core() is not None
    high = batch * high_factor
    py, c = make("python", batch, high), make("c", batch, high)
    assert py.backend == "python" and c.backend == "c"
    config = ChurnConfig(occupancy=0.5, pressure_occupancy=0.7, pressure_interval=150)
    churn_py, churn_c = Churn(py, seed, config), Churn(c, seed, config)
    live: list[tuple[int, int]] = []  # (pfn, order) allocated by the ops below
    claims: list[tuple[int, int]] = []
    for step in ops:
        kind = step[0]
        if kind in ("alloc", "alloc_small"):
            _, order, zonelist, mt, cpu = step
            got = [outcome(a.alloc, order, zonelist, mt, cpu) for a in (py, c)]
            assert got[0] == got[1], step
            if got[0][0] == "ok" and got[0][1] is not None:
                live.append((got[0][1], order))  # type: ignore[arg-type]
        elif kind == "free" and live:
            _, index, cpu = step
            pfn, order = live.pop(index % len(live))  # type: ignore[operator]
            got = [outcome(a.free, pfn, order, cpu) for a in (py, c)]
            assert got[0] == got[1] == ("ok", None), step
        elif kind == "alloc_bulk":
            _, n, zonelist, mt, cpu = step
            got = [outcome(a.alloc_bulk, n, zonelist, mt, cpu) for a in (py, c)]
            assert got[0] == got[1], step
            if got[0][0] == "ok":
                live.extend((pfn, 0) for pfn in got[0][1])  # type: ignore[union-attr]
        elif kind == "vmalloc":
            _, n, cpu = step
            got = [outcome(vmalloc_list, a, n, cpu) for a in (py, c)]
            assert got[0] == got[1], step
            if got[0][0] == "ok":
                live.extend((pfn, 0) for pfn in got[0][1])  # type: ignore[union-attr]
        elif kind == "free_bulk":
            _, n, cpu = step
            singles = [p for p, o in live if o == 0][: int(n)]  # type: ignore[call-overload]
            pfns = np.array(singles, dtype=np.int64)
            for a in (py, c):
                a.free_bulk(pfns, int(cpu))  # type: ignore[call-overload]
            chosen = set(singles)
            live = [(p, o) for p, o in live if not (o == 0 and p in chosen)]
        elif kind == "drain":
            py.drain_all_pages()
            c.drain_all_pages()
        elif kind == "claim":
            _, start, npages = step
            npages = min(int(npages), END - int(start))  # type: ignore[call-overload]
            got = [outcome(a.claim_range, start, npages) for a in (py, c)]
            assert got[0] == got[1], step
            if got[0] == ("ok", True):
                claims.append((int(start), npages))  # type: ignore[call-overload]
        elif kind == "bad_free":
            _, pfn, order = step
            if py.allocated_order(pfn) == order:  # type: ignore[arg-type]
                continue  # allocated at that order (by the ops, a claim or the churn): valid
            got = [outcome(a.free, pfn, order, 0) for a in (py, c)]
            assert got[0] == got[1] and got[0][0] == "ValueError", step
        elif kind == "churn":
            _, n, pressure = step
            got = [outcome(ch.step, n, pressure) for ch in (churn_py, churn_c)]
            assert got[0] == got[1], step
            assert churn_state(churn_py) == churn_state(churn_c), step
        assert allocator_state(py) == allocator_state(c), step
    for start, npages in claims:
        py.free_range(start, npages)
        c.free_range(start, npages)
    assert allocator_state(py) == allocator_state(c)
    c.check_invariants()


def test_churn_aging_matches_the_reference() -> None:
    """A longer aging run with the default churn (pressure episodes every 2,000 steps) on a
    two-CPU 1 GiB-plus machine: the compiled loop ends in the same state as the Python one."""
    end = (1 << 18) + 4096
    ram = [(1, 1 << 18), ((1 << 18) + 16, end)]
    zones = [Zone("DMA", 0, 4096), Zone("DMA32", 4096, 1 << 18), Zone("Normal", 1 << 18, end)]
    config = ChurnConfig(pressure_interval=2_000)
    states = []
    for backend in ("python", "c"):
        a = PageAllocator(end, ram, zones, cpus=2, backend=backend)  # type: ignore[arg-type]
        churn = Churn(a, 11, config)
        churn.run(6_000, lambda done, total: None)
        churn.step(500, pressure=False)
        states.append((allocator_state(a), churn_state(churn)))
    assert states[0] == states[1]


@pytest.mark.slow
def test_allocator_tests_pass_on_the_pure_python_backend() -> None:
    """The allocator's own tests (goldens, 6.1 buddyinfo rows) on the reference paths."""
    files = ["tests/test_buddy.py", "tests/test_pcp.py", "tests/test_modulechurn.py"]
    env = {"SHAREDPOOL_PURE_PYTHON": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:]


def test_a_missing_core_is_one_warning_and_the_python_paths(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pool.guest
    from pool.guest import buddy

    monkeypatch.setitem(sys.modules, "pool.guest._core", None)  # import fails
    monkeypatch.delattr(pool.guest, "_core", raising=False)  # the package's attribute too
    monkeypatch.setattr(buddy, "_core_tried", False)
    monkeypatch.setattr(buddy, "_core_module", None)
    with pytest.warns(RuntimeWarning, match="pure-Python reference") as record:
        a = PageAllocator(END, RAM, ZONES, cpus=1)
        b = PageAllocator(END, RAM, ZONES, cpus=1)
    assert len(record) == 1 and a.backend == b.backend == "python"
    with pytest.raises(RuntimeError, match="not built"):
        PageAllocator(END, RAM, ZONES, backend="c")


def test_the_environment_and_the_parameter_force_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHAREDPOOL_PURE_PYTHON", "1")
    assert PageAllocator(END, RAM, ZONES).backend == "python"
    assert PageAllocator(END, RAM, ZONES, backend="c").backend == "c"  # explicit wins
    monkeypatch.delenv("SHAREDPOOL_PURE_PYTHON")
    assert PageAllocator(END, RAM, ZONES).backend == "c"
    assert PageAllocator(END, RAM, ZONES, backend="python").backend == "python"
    a = PageAllocator(END, RAM, ZONES, cpus=1)
    assert a.clone().backend == "c" and a._core() is not a.clone()._core()
    with pytest.raises(ValueError, match="backend must be"):
        PageAllocator(END, RAM, ZONES, backend="fortran")  # type: ignore[arg-type]
