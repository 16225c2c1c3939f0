"""`make run`: the main job on embedded defaults.

1. `hv-netvsc-sim compare` on the default 16 GiB aged TDX guest: the table, and the
   plot written to compare.png;
2. `sharedpoold` on embedded defaults (plus a loopback metrics-only TCP listener),
   `hv-netvsc-sim run --daemon` against it for a bounded number of cycles, a few of
   the daemon's metrics, then a graceful stop (SIGTERM).

Every wait is bounded; the daemon is stopped whatever happens.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from daemon.client import SyncSharedPoolClient

BIN = Path(sys.executable).parent


def free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"sharedpoold exited early with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"sharedpoold not ready after {timeout:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200, help="compare cycles (default 200)")
    parser.add_argument("--daemon-cycles", type=int, default=50)
    parser.add_argument("--plot", default="compare.png")
    parser.add_argument("--skip-compare", action="store_true")
    args = parser.parse_args()

    if not args.skip_compare:
        print("== 1. hv-netvsc-sim compare (every strategy, same seed, same aged guest)")
        subprocess.run(
            [
                str(BIN / "hv-netvsc-sim"),
                "compare",
                "--cycles",
                str(args.cycles),
                "--plot",
                args.plot,
            ],
            check=True,
        )
        print(f"plot written to {args.plot}\n")

    print("== 2. sharedpoold on embedded defaults, driven by hv-netvsc-sim run --daemon")
    port = free_port(9464)
    with tempfile.TemporaryDirectory(prefix="sharedpool-demo-") as tmp:
        sock = os.path.join(tmp, "sharedpoold.sock")
        cmd = [
            str(BIN / "sharedpoold"),
            "--listen",
            f"unix:{sock}",
            "--metrics-listen",
            f"tcp:127.0.0.1:{port}",
            "--state-dir",
            os.path.join(tmp, "state"),
        ]
        daemon = subprocess.Popen(cmd)
        http = f"http://127.0.0.1:{port}"
        try:
            wait_ready(http, daemon)
            print(f"sharedpoold ready: API on unix:{sock}, metrics at {http}/metrics")
            subprocess.run(
                [
                    str(BIN / "hv-netvsc-sim"),
                    "run",
                    "--daemon",
                    f"unix:{sock}",
                    "--cycles",
                    str(args.daemon_cycles),
                    "--name",
                    "demo-netvsc",
                ],
                check=True,
                timeout=600,
            )
            # The API (GET /v1/pool) is on the Unix socket; TCP serves metrics and the page only.
            with SyncSharedPoolClient(f"unix:{sock}", register=False) as api:
                stats = api.request("GET", "/v1/pool", auth=False)
            with urllib.request.urlopen(http + "/metrics", timeout=10) as answer:
                metrics = answer.read().decode()
            wanted = (
                "sharedpool_pool_size_bytes",
                "sharedpool_pool_used_bytes",
                "sharedpool_hypercalls_total",
                "sharedpool_direct_map_splits_total",
                "sharedpool_allocations_total",
                "sharedpool_direct_map_bytes",
            )
            print(f"\n-- {http}/metrics (excerpt)")
            for line in metrics.splitlines():
                if line.startswith(wanted):
                    print(line)
            s = stats["strategy"]
            print(
                f"\n-- pool: {s['size_bytes'] >> 20} MiB, {s['buffers']} live buffers, "
                f"{s['allocations']} allocations, {s['failures']} failures, "
                f"{s['leaked_bytes']} bytes leaked"
            )
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                code = daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                code = daemon.wait()
            print(f"sharedpoold stopped (exit {code})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
