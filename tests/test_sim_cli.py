"""hv-netvsc-sim on the command line, and `run --daemon` against a real sharedpoold."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hv_netvsc_sim.cli import main

ROOT = Path(__file__).resolve().parent.parent
SMALL_GUEST = ["--guest-memory", "2GiB", "--age-steps", "10000"]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hv_netvsc_sim", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_help(capsys):
    for argv in (["--help"], ["run", "--help"], ["compare", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--strategy",
        "--nics",
        "--cycles",
        "--seed",
        "--json",
        "--daemon",
        "--pace",
        "--guest-memory",
        "--age-steps",
        "--platform",
        "--plot",
    ):
        assert flag in out


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--cycles", "-1"],
        ["run", "--cycles", "many"],
        ["run", "--nics", "0"],
        ["run", "--strategy", "magic"],
        ["run", "--pace", "-1"],
        ["run", "--pace", "nan"],
        ["run", "--daemon", "ftp://host"],
        ["run", "--cycles", "0"],  # until stopped: only with --daemon
        ["run", "--guest-memory", "3x"],
        ["run", "--guest-memory", "5MiB"],  # not a valid guest
        ["compare", "--cycles", "0"],
        ["compare", "--seed", "-1"],
        ["compare", "--platform", "sev"],
        ["compare", "--age-steps", "-5"],
        ["compare", "--strategies", "pool,nope"],
        ["compare", "--guest-memory", "17MiB"],
        [],
        ["fly"],
    ],
)
def test_bad_input_exits_2_without_traceback(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err


def test_bad_input_subprocess():
    proc = _cli("run", "--cycles", "-3")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "--cycles must be at least 0" in proc.stderr


def test_run_json_in_process(capsys):
    assert main(["run", "--cycles", "20", "--nics", "2", "--json", *SMALL_GUEST]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "in-process" and out["strategy"] == "pool"
    assert out["cycles"] == 20 and out["events"]["hot_remove"] == 20
    assert out["host"]["use_after_free_writes"] == 0 and out["failures"] == 0
    assert out["run"]["direct_map_splits"]["level2"] == 0


def test_run_table_in_process(capsys):
    assert main(["run", "--cycles", "5", "--strategy", "vmalloc-directmap", *SMALL_GUEST]) == 0
    out = capsys.readouterr().out
    assert "hv-netvsc-sim run" in out and "use-after-free writes" in out


def test_compare_json_and_plot(tmp_path):
    plot = tmp_path / "compare.png"
    proc = _cli(
        "compare",
        "--cycles",
        "3",
        "--strategies",
        "pool,swiotlb",
        "--json",
        "--plot",
        str(plot),
        *SMALL_GUEST,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc["strategies"]) == {"pool", "swiotlb"}
    assert doc["config"]["cycles"] == 3
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_table(capsys):
    assert (
        main(
            [
                "compare",
                "--cycles",
                "2",
                "--strategies",
                "pool,vmalloc-alias",
                "--quiet",
                *SMALL_GUEST,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "vmalloc-alias" in out and "hypercalls" in out


# ---- against the daemon ---------------------------------------------------------------------


@pytest.fixture
def daemon(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from support.daemons import Daemon

    d = Daemon(tmp_path, "--pool-max", "512MiB", "--max-buffer", "32MiB", tcp=False)
    try:
        d.wait_listening()
        yield d
    finally:
        d.stop()


def _daemon_buffers(d) -> int:
    import asyncio

    from support.daemons import ADMIN_TOKEN

    from daemon.client import SharedPoolClient

    async def count() -> int:
        async with SharedPoolClient(d.unix_url, token=ADMIN_TOKEN) as c:
            stats = await c.stats()
            return stats.buffers

    return asyncio.run(count())


def test_run_against_the_daemon(daemon):
    proc = _cli("run", "--daemon", daemon.unix_url, "--cycles", "6", "--nics", "2", "--json")
    assert proc.returncode == 0, proc.stderr + daemon.output()
    out = json.loads(proc.stdout)
    assert out["mode"] == "daemon" and out["cycles"] == 6 and out["client_id"]
    assert out["allocations"] > 0 and out["host"]["gpadls_established"] > 0
    assert out["host"]["use_after_free_writes"] == 0
    assert out["host"]["gpadls_torn_down"] == out["host"]["gpadls_established"]
    assert out["daemon_stats"]["daemon"]["buffers"] == 0  # as we left it
    assert _daemon_buffers(daemon) == 0  # everything freed before unregistering


def test_run_until_sigterm_against_the_daemon(daemon):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hv_netvsc_sim",
            "run",
            "--daemon",
            daemon.unix_url,
            "--cycles",
            "0",
            "--pace",
            "0.002",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    time.sleep(3.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    doc = json.loads(out)
    assert doc["cycles"] >= 1 and doc["host"]["use_after_free_writes"] == 0
    assert _daemon_buffers(daemon) == 0


def test_unreachable_daemon_exits_1(tmp_path):
    proc = _cli("run", "--daemon", f"unix:{tmp_path / 'nobody.sock'}", "--cycles", "1")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "cannot register" in proc.stderr
