"""Fault injection end to end with the simulator: `hv-netvsc-sim run --daemon unix:...`
(hot add/remove cycles of vNICs, ring resizes, MTU and channel changes, VF failover,
traffic; every buffer handed to the simulated Hyper-V host through a GPADL and torn down
again) against a spawned sharedpoold whose simulated host fails conversions, by rate and at
fixed call positions, in growth, shrink and (vmalloc-directmap) the re-encryption of a
buffer freed at GPADL teardown.

What it proves: the simulator finishes (exit 0) with only designed refusals (the daemon's
503s: exhausted, no_memory, conversion_failed), the host never receives a private page,
reads nothing stale and sees no use after free; the daemon is still serving, counts the
leak (leaked_bytes, unknown-state pages, never more unknown pages than leaked ones) and its
invariants hold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.harness import ADMIN_TOKEN, ROOT, spawn

from daemon.client import SharedPoolClient

DESIGNED = {"exhausted", "no_memory", "conversion_failed"}


def _simulate(url: str, *, cycles: int, seed: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "hv_netvsc_sim",
            "run",
            "--daemon",
            url,
            "--cycles",
            str(cycles),
            "--nics",
            "3",
            "--seed",
            str(seed),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.mark.parametrize(
    ("label", "flags", "leaks_on_free"),
    [
        (
            "pool, 30 % of conversions fail",
            ["--fail-rate", "0.3", "--fault-seed", "4"],
            False,
        ),
        (
            "pool, half of the re-encryptions (shrink) fail",
            ["--fail-direction", "to_private", "--fail-rate", "0.5", "--fault-seed", "2"],
            False,
        ),
        (
            "vmalloc-directmap, fixed calls in decryption and teardown",
            [
                "--strategy",
                "vmalloc-directmap",
                "--fail-calls",
                "3000,9000,20000,30001,45000,60000,90000,120000",
            ],
            True,
        ),
    ],
)
async def test_simulator_against_a_failing_host(
    tmp_path: Path, label: str, flags: list[str], leaks_on_free: bool
) -> None:
    d = spawn(
        tmp_path,
        "--guest-memory",
        "1GiB",
        "--pool-max",
        "256MiB",
        "--shrink-hysteresis",
        "0",
        "--maintain-interval",
        "0.005",  # background growth and shrink between the simulator's requests
        "--lease-ttl",
        "600",
        *flags,
        tcp=False,
    )
    try:
        await d.wait_ready()
        r = _simulate(d.unix_url, cycles=30, seed=3)
        drv, host = r["driver"], r["host"]
        assert set(r["failure_reasons"]) <= DESIGNED, r["failure_reasons"]
        assert drv["free_errors"] == 0 and drv["corrupt_reads"] == 0
        assert host["refused_private_pages"] == 0 and host["refused_overlapping_pages"] == 0
        assert host["use_after_free_writes"] == 0 and host["writes_refused"] == 0
        assert host["gpadls_established"] == host["gpadls_torn_down"] > 0
        async with SharedPoolClient(d.unix_url, token=ADMIN_TOKEN) as admin:
            if not leaks_on_free:
                await admin.shrink(force=True)  # give everything back: re-encryptions
            inv = await admin.invariants()
            pool = (await admin.stats()).document
            assert await admin.ready()
        assert inv["ok"] and inv["buffers"] == 0, inv
        strat, guest = pool["strategy"], pool["guest"]
        unknown = guest["hazard_pages"]["unknown_state"]
        assert guest["counts"]["conversion_failures"] > 0, label
        assert strat["leaked_bytes"] > 0 and 0 < unknown <= strat["leaked_bytes"] // 4096
        if leaks_on_free:
            assert drv["leaked_buffers"] > 0 and drv["leaked_bytes"] <= strat["leaked_bytes"]
            assert r["failure_reasons"].get("conversion_failed", 0) > 0
        print(
            f"{label}: {r['allocations']} allocations, refusals {r['failure_reasons']}, "
            f"{guest['counts']['conversion_failures']} failed conversions, leaked "
            f"{strat['leaked_bytes']} bytes ({unknown} unknown pages), driver saw "
            f"{drv['leaked_buffers']} leaked frees"
        )
    finally:
        d.stop()
