"""`compare`: the contract's JSON shape and the direction of each strategy's figures.

The default run uses a smaller machine where every property already shows (a 4 GiB guest,
100,000 aging steps, 30 cycles); the full `--cycles 200 --seed 1` case on the default
16 GiB guest aged 1,000,000 steps is marked slow.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from hv_netvsc_sim.compare import (
    CONTRACT_STRATEGIES,
    CompareConfig,
    run_compare,
    strip_wall,
)
from pool.guest.units import GiB

COUNTS_KEYS = {
    "hypercalls",
    "pages_converted",
    "pages_accepted",
    "tlb_flushes",
    "cache_flushed_pages",
    "direct_map_splits",
    "modeled_conversion_seconds",
}
STRATEGY_KEYS = {
    "allocations",
    "failures",
    "failure_reasons",
    "setup",
    "run",
    "end_state",
    "alloc_latency_seconds",
    "series",
}
SERIES_KEYS = {"cycle", "hypercalls", "direct_map_splits_level2", "direct_map_4k_bytes"}


@pytest.fixture(scope="module")
def small() -> dict[str, Any]:
    config = CompareConfig.of(guest_memory_bytes=4 * GiB, cycles=30, seed=1, age_steps=100_000)
    return run_compare(config)


def check_contract(doc: dict[str, Any], cycles: int) -> None:
    assert set(doc) >= {"config", "strategies"}
    assert set(doc["config"]) >= {"guest_memory_bytes", "cycles", "seed", "platform", "age_steps"}
    assert set(doc["strategies"]) >= {*CONTRACT_STRATEGIES, "pool-boot"}
    for name, r in doc["strategies"].items():
        assert set(r) >= STRATEGY_KEYS, name
        for phase in ("setup", "run"):
            assert set(r[phase]) >= COUNTS_KEYS, (name, phase)
            assert set(r[phase]["direct_map_splits"]) >= {"level2", "level3"}
        end = r["end_state"]
        assert set(end["direct_map_bytes"]) >= {"4k", "2M", "1G"}
        assert set(end["hazard_pages"]) >= {"private_alias_to_shared", "shared_alias_to_private"}
        assert {"shared_bytes", "leaked_bytes"} <= set(end)
        assert set(r["alloc_latency_seconds"]) >= {"p50", "p99"}
        assert isinstance(r["alloc_latency_seconds"]["p50"], float)
        assert set(r["series"]) >= SERIES_KEYS
        assert r["series"]["cycle"] == list(range(1, cycles + 1))
        assert all(len(v) == cycles for v in r["series"].values())
        assert r["failures"] == sum(r["failure_reasons"].values())
        assert r["host"]["use_after_free_writes"] == 0
    json.loads(json.dumps(doc))  # plain JSON types only


def check_pool_flat(doc: dict[str, Any]) -> None:
    """pool: once warmed up, nothing more: flat hypercalls in the second half."""
    pool = doc["strategies"]["pool"]["series"]
    half = len(pool["cycle"]) // 2
    assert pool["hypercalls"][-1] == pool["hypercalls"][half - 1]


def check_directions(doc: dict[str, Any]) -> None:
    s = doc["strategies"]
    # pool: never a level-2 split, never a failure
    pool = s["pool"]["series"]
    half = len(pool["cycle"]) // 2
    assert pool["direct_map_splits_level2"][-1] == pool["direct_map_splits_level2"][half - 1] == 0
    assert s["pool"]["run"]["direct_map_splits"]["level2"] == 0
    assert s["pool"]["failures"] == 0
    # pool-boot: decrypted at boot in one 1 GiB piece, nothing during the run
    assert s["pool-boot"]["run"]["hypercalls"] == 0
    assert s["pool-boot"]["setup"]["direct_map_splits"] == {"level2": 0, "level3": 0}
    # vmalloc-directmap: level-2 splits keep growing with the cycles
    # (The first cycle may add none: since the guest model has per-cpu lists, a buffer freed
    # and allocated again comes back from the same pages, already split at setup.)
    dm = s["vmalloc-directmap"]["series"]["direct_map_splits_level2"]
    assert 0 <= dm[0] < dm[half - 1] < dm[-1]
    assert (
        s["vmalloc-directmap"]["end_state"]["direct_map_bytes"]["4k"]
        > s["pool"]["end_state"]["direct_map_bytes"]["4k"]
    )
    assert s["vmalloc-directmap"]["end_state"]["hazard_pages"]["private_alias_to_shared"] == 0
    # vmalloc-alias: no splits, but private direct-map aliases to shared pages (fatal)
    assert s["vmalloc-alias"]["run"]["direct_map_splits"]["level2"] == 0
    assert s["vmalloc-alias"]["end_state"]["hazard_pages"]["private_alias_to_shared"] > 0
    # swiotlb: hv_netvsc's 16 MiB receive buffer cannot come from it
    sw = s["swiotlb"]
    assert sw["failure_reasons"].get("too_large", 0) > 0 and sw["allocations"] == 0
    assert sw["buffer_checks"]["recv_buf"] == {
        "bytes": 16 << 20,
        "ok": False,
        "reason": "too_large",
    }
    # the pool serves every size the driver asks for
    assert all(c["ok"] for c in s["pool"]["buffer_checks"].values())


def test_contract_keys(small):
    check_contract(small, 30)
    assert small["config"]["guest_memory_bytes"] == 4 * GiB


def test_directions_small(small):
    check_pool_flat(small)
    check_directions(small)


def test_same_seed_same_json_except_wall_clock():
    config = CompareConfig.of(
        guest_memory_bytes=2 * GiB,
        cycles=6,
        seed=4,
        age_steps=20_000,
        strategies=("pool", "vmalloc-directmap", "swiotlb"),
    )
    a, b = run_compare(config), run_compare(config, jobs=2)  # sequential vs forked workers
    assert strip_wall(a) == strip_wall(b)
    assert list(b["strategies"]) == list(config.strategies)
    # the modeled latency is part of the same-seed document; the wall clock is not
    assert strip_wall(a)["strategies"]["pool"]["alloc_latency_seconds"]["p99"] > 0
    assert "simulator_wall_seconds" not in strip_wall(a)["strategies"]["pool"]
    assert "simulator_wall_seconds" in a["strategies"]["pool"]
    other = run_compare(
        CompareConfig.of(
            guest_memory_bytes=2 * GiB,
            cycles=6,
            seed=5,
            age_steps=20_000,
            strategies=("vmalloc-directmap",),
        )
    )
    assert (
        strip_wall(other)["strategies"]["vmalloc-directmap"]
        != strip_wall(a)["strategies"]["vmalloc-directmap"]
    )


def test_pristine_guest_and_platform_none():
    doc = run_compare(
        CompareConfig.of(
            guest_memory_bytes=1 * GiB,
            cycles=3,
            age_steps=0,
            platform="none",
            strategies=("vmalloc-directmap", "pool"),
        )
    )
    for r in doc["strategies"].values():
        assert r["setup"]["hypercalls"] == r["run"]["hypercalls"] == 0
        assert r["run"]["direct_map_splits"] == {"level2": 0, "level3": 0}
        assert r["end_state"]["shared_bytes"] == 0


@pytest.fixture(scope="module")
def full() -> dict[str, Any]:
    """The issue's case: `compare --cycles 200 --seed 1` on the default 16 GiB aged guest."""
    return run_compare(CompareConfig.of(cycles=200, seed=1))


@pytest.mark.slow
def test_full_default_compare_200_cycles(full):
    check_contract(full, 200)
    assert full["config"]["guest_memory_bytes"] == 16 * GiB
    assert full["config"]["age_steps"] == 1_000_000
    check_directions(full)


@pytest.mark.slow
def test_full_default_compare_pool_flat(full):
    check_pool_flat(full)


# ---- scenarios, platforms and the command line ----------------------------------------------


def test_boot_only_on_hyperv_vtom_keeps_the_contract(tmp_path):
    """`compare --scenario boot-only --platform hyperv-vtom --json --plot`: the contract's
    keys under their names, the new ones beside them, series by virtual hour."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    plot = tmp_path / "c.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hv_netvsc_sim",
            "compare",
            "--scenario",
            "boot-only",
            "--platform",
            "hyperv-vtom",
            "--guest-memory",
            "2GiB",
            "--age-steps",
            "10000",
            "--strategies",
            "pool,vmalloc-alias",
            "--json",
            "--quiet",
            "--plot",
            str(plot),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["config"]["platform"] == "hyperv-vtom"
    assert doc["config"]["scenario"] == "boot-only" and doc["config"]["cycles"] == 24
    for name, r in doc["strategies"].items():
        assert set(r) >= STRATEGY_KEYS | {"simulator_wall_seconds", "fragmentation"}, name
        assert r["series"]["virtual_seconds"][-1] == 86_400
        assert set(r["alloc_latency_seconds"]) >= {"p50", "p99", "max"}
        assert "wall" not in json.dumps(r["alloc_latency_seconds"])
    assert (
        doc["strategies"]["vmalloc-alias"]["end_state"]["hazard_pages"]["private_alias_to_shared"]
        > 0
    )  # fatal on vTOM as well: the not-present window covers the transition only
    assert set(doc["verdict"]) == set(doc["strategies"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scenario", "azure-year"], "unknown scenario 'azure-year'"),
        (["--scenario", "{bad}"], "scenario file"),
        (["--plot", "out.jpgg"], "--plot: out.jpgg: unknown format 'jpgg'"),
        (["--plot", "/no/such/dir/c.png"], "no directory"),
        (["--runtime-cost-4k", "1.5"], "within [0, 1]"),
        (["--platform", "sev"], "invalid choice: 'sev'"),
        (["--scenario", "azure-month", "--cycles", "5"], "--cycles: the stress scenario's"),
    ],
)
def test_compare_bad_input_exits_2_in_one_line(args, message, tmp_path, capsys):
    """Refused before the run starts: one line (after argparse's usage), exit status 2."""
    from hv_netvsc_sim.cli import main

    if args[1] == "{bad}":
        bad = tmp_path / "bad.toml"
        bad.write_text('duration = "1d"\n[[events]]\nkind = "reboot"\n')
        args = [args[0], str(bad)]
    with pytest.raises(SystemExit) as exc:
        main(["compare", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
