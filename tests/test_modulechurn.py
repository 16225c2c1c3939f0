"""The real-kernel module's workload on the model, against the real Linux 6.1 figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pool.guest.cli import main
from pool.guest.modulechurn import REAL_LINUX_6_1, run, xorshift32
from pool.guest.units import GiB


def test_xorshift32_is_the_modules_generator() -> None:
    gen = xorshift32(1)
    # x = 1: x ^= x << 13 -> 8193; x ^= x >> 17 -> 8193; x ^= x << 5 -> 8193 ^ 262176 = 270369
    assert next(gen) == 270369
    assert next(gen) == 67634689  # the next step of the same recurrence, 32-bit
    assert all(0 < next(gen) < 1 << 32 for _ in range(1000))
    with pytest.raises(ValueError, match="non-zero"):
        next(xorshift32(1 << 32))


@pytest.mark.parametrize("churn", sorted(REAL_LINUX_6_1))
def test_4gib_rows_within_20_percent_of_real_linux(churn: int) -> None:
    """DESIGN.md's table (4 GiB, 1 vCPU): 8-9 regions after boot, 132-146 after N = 20,000,
    303 after N = 100,000. The model, seeded, within 20 % of the measured band in each row."""
    low, high = REAL_LINUX_6_1[churn]
    result = run(4 * GiB, churn, seed=1, cpus=1)
    assert 0.8 * low <= result.regions_2m <= 1.2 * high, result.regions_2m
    # Every region the buffer touches is split once, plus the 1 GiB leaf around them.
    assert result.level2_splits == result.regions_2m
    assert result.level3_splits <= 2
    assert result.kept_blocks <= churn


def test_experiment_cli_text_json_and_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment", "module-churn", "--churn", "2000", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    assert "distinct 2 MiB regions" in out and "real Linux 6.1" not in out  # no real row for 2000
    assert out.count("Node 0, zone   Normal") == 2  # buddyinfo before and after
    assert main(["experiment", "module-churn", "--churn", "0", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["regions_2m"] <= 9 and doc["real_linux_6_1_regions_2m"] == [8, 9]
    assert set(doc) >= {"level2_splits", "level3_splits", "buddyinfo_before", "buddyinfo_after"}
    for bad in (["--seed", "0"], ["--churn", "-3"], ["--cpus", "0"], ["--guest-memory", "4XB"]):
        proc = subprocess.run(
            [sys.executable, "-m", "pool.guest", "experiment", "module-churn", *bad],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "error:" in proc.stderr
