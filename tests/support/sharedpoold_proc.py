"""Start a real sharedpoold for a test, on 127.0.0.1 only.

    with running_sharedpoold(tmp_path) as daemon:
        daemon.target            # "127.0.0.1:<port>", for a Prometheus scrape config
        daemon.get_json("/v1/pool")
        daemon.get_text("/metrics")

The daemon runs as a subprocess: the `sharedpoold` console script of the
interpreter running the tests (pyproject.toml's [project.scripts]) when it is
installed, else `python -m daemon.cli`. It listens on tcp:127.0.0.1:0 (the
kernel picks the port; the daemon prints it on stderr), keeps its state in a
directory of the test, and reads a TOML configuration: a pristine guest
(age_steps 0), so start-up takes a fraction of a second. Every wait is bounded;
the process is stopped with SIGTERM (then SIGKILL) on exit and its log is shown
in any error.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]

# A quick guest with all three zones (DMA, DMA32, Normal), default pool sizes.
SCRAPE_CONFIG = """\
[guest]
memory = "8GiB"
age_steps = 0

[daemon]
synchronous = "normal"
"""

# A small guest whose pool reaches its maximum after a few 16 MiB buffers, and
# never shrinks or expires clients on its own while a test watches it.
SMALL_CONFIG = """\
[guest]
memory = "512MiB"
age_steps = 0

[pool]
initial = "8MiB"
max = "64MiB"
max_buffer = "32MiB"
low_watermark = "2MiB"
high_watermark = "16MiB"
grow_step = "4MiB"
shrink_hysteresis = 3600.0

[daemon]
synchronous = "normal"
lease_ttl = 600.0
"""

_LISTENING = re.compile(r"sharedpoold listening on .*?tcp:(127\.0\.0\.1:\d+)")


class DaemonError(RuntimeError):
    pass


def sharedpoold_command() -> list[str]:
    """The console script beside this interpreter, else the module."""
    script = Path(sys.executable).parent / "sharedpoold"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "daemon.cli"]


class Sharedpoold:
    def __init__(self, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.target = ""  # host:port once listening

    @property
    def url(self) -> str:
        return f"http://{self.target}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def get(self, path: str, timeout: float = 5) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def get_json(self, path: str) -> Any:
        status, body = self.get(path)
        if status != 200:
            raise DaemonError(f"GET {path}: HTTP {status}: {body[:500]!r}")
        return json.loads(body)

    def get_text(self, path: str) -> str:
        status, body = self.get(path)
        if status != 200:
            raise DaemonError(f"GET {path}: HTTP {status}: {body[:500]!r}")
        return body.decode("utf-8")

    def _wait_listening(self, deadline: float) -> None:
        while True:
            match = _LISTENING.search(self.log_tail(200))
            if match:
                self.target = match.group(1)
                return
            self._check_alive()
            if time.monotonic() >= deadline:
                raise DaemonError(f"sharedpoold did not listen in time\n{self.log_tail()}")
            time.sleep(0.02)

    def _wait_ready(self, deadline: float) -> None:
        while True:
            self._check_alive()
            with contextlib.suppress(OSError):
                if self.get("/readyz", timeout=2)[0] == 200:
                    return
            if time.monotonic() >= deadline:
                raise DaemonError(f"sharedpoold not ready in time\n{self.log_tail()}")
            time.sleep(0.05)

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise DaemonError(
                f"sharedpoold exited with {self.process.returncode}\n{self.log_tail()}"
            )


@contextlib.contextmanager
def running_sharedpoold(
    workdir: Path, config: str = SMALL_CONFIG, *, ready_timeout: float = 30
) -> Iterator[Sharedpoold]:
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "sharedpoold.toml"
    config_file.write_text(config, encoding="utf-8")
    log_path = workdir / "sharedpoold.log"
    command = [
        *sharedpoold_command(),
        "--config",
        str(config_file),
        "--state-dir",
        str(workdir / "state"),
        "--listen",
        "tcp:127.0.0.1:0",
        "--allow-anonymous-register",  # the tests register over this loopback listener
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("NOTIFY_SOCKET", None)
    env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_PID", None)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
            start_new_session=True,
        )
    daemon = Sharedpoold(process, log_path)
    try:
        deadline = time.monotonic() + ready_timeout
        daemon._wait_listening(deadline)
        daemon._wait_ready(deadline)
        yield daemon
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
