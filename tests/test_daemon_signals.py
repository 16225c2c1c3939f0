"""Signals and garbage against a real sharedpoold process (issue 13, item 7): SIGUSR1 and
SIGUSR2 are ignored (never a silent kill), SIGHUP re-reads the configuration and applies
the log level, and malformed HTTP requests log one WARNING line without a traceback."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

from support.daemons import Daemon


def _wait_for(d: Daemon, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in d.output():
        assert time.monotonic() < deadline, d.output()
        assert d.proc.poll() is None, d.output()
        time.sleep(0.05)


async def test_sigusr_ignored_and_sighup_reloads_the_log_level(tmp_path: Path) -> None:
    cfg = tmp_path / "sharedpoold.toml"
    cfg.write_text('[daemon]\nlog_level = "info"\nsnapshot_interval = 300.0\n')
    d = Daemon(tmp_path, "--config", str(cfg), tcp=False)
    try:
        await d.wait_ready()
        d.signal(signal.SIGUSR1)
        d.signal(signal.SIGUSR2)
        _wait_for(d, "SIGUSR2 ignored")
        assert "SIGUSR1 ignored" in d.output() and d.proc.poll() is None
        cfg.write_text('[daemon]\nlog_level = "warning"\nsnapshot_interval = 60.0\n')
        d.signal(signal.SIGHUP)
        _wait_for(d, "configuration reloaded")
        line = next(x for x in d.output().splitlines() if "configuration reloaded" in x)
        assert "applied=['daemon.log_level']" in line
        assert "needs_restart=['daemon.snapshot_interval']" in line
        # now at warning: the next SIGUSR1's info line is not logged
        d.signal(signal.SIGUSR1)
        time.sleep(0.5)
        assert d.output().count("SIGUSR1 ignored") == 1
        cfg.write_text("[daemon\n")
        d.signal(signal.SIGHUP)
        _wait_for(d, "configuration not reloaded")
        assert d.proc.poll() is None
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
        assert "Traceback" not in d.output()
    finally:
        d.stop()


async def test_malformed_requests_log_one_warning_without_traceback(tmp_path: Path) -> None:
    d = Daemon(tmp_path, tcp=False)
    try:
        await d.wait_ready()
        for i in range(50):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(d.sock))
            s.sendall(b"GARBAGE\r\n\r\n" if i % 2 else b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.0 400")
            s.close()
        _wait_for(d, "malformed HTTP request refused")
        out = d.output()
        assert "Traceback" not in out and "ERROR" not in out
        assert 1 <= out.count("malformed HTTP request refused") <= 3
    finally:
        d.stop()
