"""The guest options: one set of rules (pool.guest.machine, wrapped by pool.guest.options)
and the same one-line message from every command line, exit status 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pool.guest import Guest, GuestConfig
from pool.guest.machine import min_aged_memory
from pool.guest.options import check_aging, guest_memory, non_negative
from pool.guest.units import GiB, MiB

# Worked out by hand: the size rules, and the churn's need for RAM above the kernel image.
MESSAGES = {
    "999TiB": "999TiB is more than the largest guest, 1TiB",
    "32MiB": "32MiB is too small to age: at least 68MiB (the churn needs free memory above "
    "the reserved first 64MiB; --age-steps 0 for a pristine guest)",
    "abc": "not a size: 'abc' (examples: 4096, 64KiB, 16MiB, 16GiB)",
}


def test_rules() -> None:
    assert guest_memory("4GiB") == 4 * GiB
    assert guest_memory(68 * MiB) == 68 * MiB
    for text, message in (
        ("17MiB", "17MiB is not a multiple of 4MiB"),
        ("8MiB", "8MiB is less than the smallest guest, 16MiB"),
        ("2TiB", "2TiB is more than the largest guest, 1TiB"),
    ):
        with pytest.raises(ValueError) as err:
            guest_memory(text)
        assert str(err.value) == message
    assert min_aged_memory() == 68 * MiB
    check_aging(32 * MiB, 0)  # a pristine small guest is fine
    check_aging(68 * MiB, 1000)
    with pytest.raises(ValueError, match="too small to age"):
        check_aging(64 * MiB, 1)
    with pytest.raises(ValueError, match="must be at least 0"):
        non_negative("-1", "--seed")


def test_the_bound_is_the_model_s() -> None:
    """68 MiB ages; 64 MiB would have failed deep in the churn: now it is refused first."""
    Guest(GuestConfig(memory_bytes=68 * MiB)).age(2000)
    with pytest.raises(ValueError, match="too small to age"):
        Guest(GuestConfig(memory_bytes=64 * MiB)).age(2000)


COMMANDS = {
    "sharedpoold": [sys.executable, "-m", "daemon.cli", "--guest-memory"],
    "hv-netvsc-sim run": [sys.executable, "-m", "hv_netvsc_sim", "run", "--guest-memory"],
    "hv-netvsc-sim compare": [sys.executable, "-m", "hv_netvsc_sim", "compare", "--guest-memory"],
    "python -m pool.guest": [sys.executable, "-m", "pool.guest", "demo", "--guest-memory"],
}


@pytest.mark.parametrize("value", sorted(MESSAGES))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_same_one_line_error_from_every_command_line(
    tmp_path: Path, command: str, value: str
) -> None:
    argv = [*COMMANDS[command], value]
    if command == "sharedpoold":
        argv += ["--state-dir", str(tmp_path / "state")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.endswith(MESSAGES[value]), last
    assert not (tmp_path / "state").exists()  # refused before anything was made
