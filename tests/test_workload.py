"""The background churn: determinism, cloning, and the calibration targets on small guests.

The full calibration (16 GiB, 1,000,000 steps; 64 GiB for scale) is bench/bench_guest_scale.py.
"""

from __future__ import annotations

import itertools

import pytest

from pool.guest.buddy import PageAllocator
from pool.guest.fragmentation import unusable_free_index
from pool.guest.migratetype import MIGRATE_UNMOVABLE
from pool.guest.units import PAGE_SHIFT, PAGES_PER_2M, GiB
from pool.guest.vmalloc import vm_area_alloc_pages
from pool.guest.workload import Churn, ChurnConfig

G = GiB >> PAGE_SHIFT


def guest(gib: int) -> PageAllocator:
    """A guest of `gib` GiB of RAM, with the 3-4 GiB PCI hole when it reaches past 3 GiB."""
    if gib <= 3:
        return PageAllocator(gib * G, [(0, gib * G)])
    return PageAllocator((gib + 1) * G, [(0, 3 * G), (4 * G, (gib + 1) * G)])


def state(a: PageAllocator, churn: Churn | None = None) -> object:
    lists = [(z.name, [a.free_blocks(z.name, o) for o in range(11)]) for z in a.zones]
    return lists, a.allocated_pages(), None if churn is None else sorted(churn.allocations())


def vmalloc_regions(a: PageAllocator, pages: int = 4096) -> int:
    """Distinct 2 MiB regions holding `pages` consecutive order-0 allocations (a 16 MiB
    vmalloc buffer), measured on a copy."""
    b = a.clone()
    pfns = [b.alloc(0) for _ in range(pages)]
    assert None not in pfns
    return len({pfn // PAGES_PER_2M for pfn in pfns if pfn is not None})


def big_block_pages(a: PageAllocator) -> int:
    return sum(n << o for z in a.zones for o, n in enumerate(a.nr_free(z.name)) if o >= 9)


# ---------------------------------------------------------------- determinism, cloning


def test_same_seed_same_state_and_different_seeds_differ() -> None:
    runs = []
    for seed in (7, 7, 8):
        a = PageAllocator(G // 2, [(1, G // 2)])  # 512 MiB, DMA and DMA32
        churn = Churn(a, seed)
        churn.run(20_000)
        runs.append((a.nr_free("DMA32"), state(a, churn)))
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[2][0]  # nr_free rows differ
    assert runs[0][1] != runs[2][1]


def test_run_with_progress_equals_plain_steps() -> None:
    a, b = guest(1), guest(1)
    calls: list[tuple[int, int]] = []
    Churn(a, 3).run(10_000, progress=lambda done, total: calls.append((done, total)))
    churn_b = Churn(b, 3)
    churn_b.step(4_000)
    churn_b.step(6_000)
    assert state(a) == state(b)
    assert calls[-1] == (10_000, 10_000)
    assert 95 <= len(calls) <= 101
    assert all(x[0] < y[0] for x, y in itertools.pairwise(calls))


def test_clone_continues_identically_and_independently() -> None:
    a = guest(1)
    churn = Churn(a, 11)
    churn.run(5_000)
    before = state(a, churn)
    b = a.clone()
    twin = churn.clone(b)
    assert state(b, twin) == before
    twin.step(3_000)
    assert state(a, churn) == before  # the original did not move
    churn.step(3_000)
    assert state(a, churn) == state(b, twin)
    assert churn.steps_done == twin.steps_done == 8_000


def test_live_pages_track_the_target_and_the_allocator() -> None:
    a = guest(1)
    churn = Churn(a, 5)
    churn.run(15_000)
    target = int(0.75 * a.ram_pages)
    assert target - 64 <= churn.live_pages <= target
    assert a.allocated_pages() == churn.live_pages
    assert sum(1 << o for _, o in churn.allocations()) == churn.live_pages
    assert churn.live_allocations == len(list(churn.allocations()))
    assert all(a.allocated_order(pfn) == order for pfn, order in churn.allocations())
    a.check_invariants()


# ---------------------------------------------------------------- calibration (small guests)


def test_pristine_guest_puts_a_16mib_buffer_in_at_most_9_regions() -> None:
    assert vmalloc_regions(guest(16)) <= 9
    assert vmalloc_regions(guest(2)) <= 9


def test_aged_2gib_guest_meets_the_targets() -> None:
    # 2 GiB: DMA32 is the churned zone (there is no Normal zone below 4 GiB).
    a = guest(2)
    Churn(a, 1).run(30_000)
    a.check_invariants()
    assert unusable_free_index(a.nr_free("DMA32"), 9) >= 500  # target 1
    assert vmalloc_regions(a) >= 130  # target 2 (pristine: <= 9, above)
    assert a.free_pages() >= 0.15 * a.ram_pages  # target 3
    assert big_block_pages(a) >= 32 * PAGES_PER_2M  # at least 64 MiB in order-9/10 blocks


def test_aged_16gib_guest_meets_the_targets_early() -> None:
    # The first pressure episode already ages the whole guest; the bench runs the full 1 M steps.
    a = guest(16)
    Churn(a, 2).run(20_000)
    assert unusable_free_index(a.nr_free("Normal"), 9) >= 500  # target 1
    assert vmalloc_regions(a) >= 130  # target 2
    assert a.free_pages() >= 0.15 * a.ram_pages  # target 3
    assert big_block_pages(a) >= 512 * PAGES_PER_2M  # a pool of 1 GiB in 2 MiB blocks fits


# ---------------------------------------------------------------- sharing memory, errors


def test_churn_shares_memory_with_other_users() -> None:
    a = PageAllocator(G // 4, [(0, G // 4)])  # 256 MiB: DMA 16 MiB, DMA32 240 MiB
    assert a.claim_range(8192, 40_000)  # someone holds 60 % of DMA32
    churn = Churn(a, 1)
    churn.run(5_000)  # the pressure episode stops where memory runs out; steps reclaim
    assert churn.live_pages <= int(0.75 * a.ram_pages)
    assert a.allocated_pages() == churn.live_pages + 40_000
    a.check_invariants()


def test_churn_with_no_memory_at_all_raises() -> None:
    a = PageAllocator(8192, [(0, 8192)])
    assert a.claim_range(4096, 4096)  # all of DMA32 taken; DMA is not in the churn's zonelist
    churn = Churn(a, 1)
    with pytest.raises(RuntimeError, match="no free page"):
        churn.step(1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"occupancy": 1.5},
        {"occupancy": 0.0},
        {"long_fraction": -0.1},
        {"short_orders": (0, 0)},
        {"short_orders": (1,) * 12},
        {"long_orders": (1, -1)},
        {"pressure_interval": -1},
        {"free_batch": 0},
        {"zonelist": ()},
    ],
)
def test_bad_configs(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ChurnConfig(**kwargs)  # type: ignore[arg-type]


def test_config_pads_order_weights() -> None:
    config = ChurnConfig(long_orders=(1,))
    assert config.long_orders == (1.0,) + (0.0,) * 10
    assert len(ChurnConfig().short_orders) == 11


def test_free_batch_frees_runs_of_entries() -> None:
    a = guest(1)
    churn = Churn(a, 4, ChurnConfig(free_batch=8))
    churn.run(5_000)
    assert a.allocated_pages() == churn.live_pages
    a.check_invariants()


# ---------------------------------------------------------------- kernel-memory bursts


def test_kernel_burst_keeps_about_half_as_long_lived_unmovable_blocks() -> None:
    # 1 GiB, 1,000 burst blocks, no page cache at all: step 0's episode is the burst alone
    # (pressure_occupancy 0: the page cache does not grow; occupancy is far above what the
    # burst keeps, so reclaim frees nothing).
    a = guest(1)
    config = ChurnConfig(
        kernel_burst_blocks_per_gib=1000, pressure_occupancy=0.0, long_fraction=0.0
    )
    churn = Churn(a, 7, config)
    churn._pressure_episode()
    kept = list(churn.allocations())
    assert 400 <= len(kept) <= 600  # each block kept on a coin flip
    assert churn.allocations_made == 1000 and churn.frees_made == 1000 - len(kept)
    assert churn.long_lived_pages == churn.live_pages == sum(1 << o for _, o in kept)
    for pfn, order in kept:
        assert order <= 3
        assert a.allocated_order(pfn) == order
        assert a.allocated_migratetype(pfn) == MIGRATE_UNMOVABLE
    a.check_invariants()
    assert a.allocated_pages() - a.pcp_pages() == churn.live_pages


def test_no_bursts_is_the_page_cache_aging_alone() -> None:
    a, b = guest(2), guest(2)
    Churn(a, 3, ChurnConfig(kernel_burst_blocks_per_gib=0)).run(5_000)
    with_bursts = Churn(b, 3)
    with_bursts.run(5_000)
    assert state(a) != state(b)  # the burst changed the layout
    assert with_bursts.long_lived_pages > 0


@pytest.mark.slow
def test_default_aged_16gib_guest_puts_a_vmalloc_buffer_in_the_heavy_churn_band() -> None:
    # DESIGN.md: 300-380 distinct 2 MiB regions after heavy churn on real Linux 6.1.
    a = guest(16)
    Churn(a, 1).run(1_000_000)
    b = a.clone()
    regions = {pfn // PAGES_PER_2M for pfn in vm_area_alloc_pages(b, 4096)}
    assert 300 <= len(regions) <= 380, len(regions)
