"""`make run`'s second half (scripts/run_demo.py): the daemon on embedded defaults, a simulated
hv_netvsc driver against its Unix socket, then the pool read back from the API and the
metrics from the metrics-only listener. It once read GET /v1/pool from the TCP listener,
which serves metrics and the page only, and ended in a traceback after a good run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_daemon_half_runs_clean() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "run_demo.py"),
            "--skip-compare",
            "--daemon-cycles",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    assert "-- pool: " in out and "0 failures" in out
    assert "sharedpool_pool_size_bytes" in out
