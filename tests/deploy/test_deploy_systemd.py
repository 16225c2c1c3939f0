"""The systemd units: required directives, and `systemd-analyze verify` on them.

verify refuses a unit whose ExecStart binary does not exist, so it runs on a
copy whose ExecStart path is rewritten to an existing executable: the venv's
sharedpoold (required when the tests run in a venv), else sharedpoold on PATH,
else /bin/true; every other line is as committed.
deploy/ci-checks.sh does the same and is where systemd-analyze is mandatory.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.deploy_paths import SYSTEMD_DIR

SERVICE = SYSTEMD_DIR / "sharedpoold.service"
SOCKET = SYSTEMD_DIR / "sharedpoold.socket"
METRICS_SOCKET = SYSTEMD_DIR / "sharedpoold-metrics.socket"
COMMITTED_EXEC = "/usr/local/bin/sharedpoold"


def directives(path: Path) -> dict[str, list[str]]:
    """Key -> values over all sections (units repeat keys, e.g. ListenStream)."""
    out: dict[str, list[str]] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_service_is_notify_with_watchdog_and_hardened() -> None:
    d = directives(SERVICE)
    expected = {
        "Type": "notify",
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "MemoryDenyWriteExecute": "yes",
        "LockPersonality": "yes",
        "RestrictRealtime": "yes",
        "RestrictNamespaces": "yes",
        "StateDirectory": "sharedpoold",
        "RuntimeDirectory": "sharedpoold",
    }
    for key, value in expected.items():
        assert d.get(key) == [value], f"{key}: {d.get(key)}"
    assert "@system-service" in d["SystemCallFilter"]
    assert d["WatchdogSec"], "WatchdogSec must be set"
    assert "ProcSubset" not in d, "ProcSubset=pid hides /proc files the daemon may read"
    (exec_start,) = d["ExecStart"]
    assert exec_start.split()[0] == COMMITTED_EXEC
    assert "sharedpoold.socket" in d["Requires"][0]


def test_api_socket_is_unix_only_and_tcp_is_metrics_only() -> None:
    """The API (register, allocate) never on TCP: the only TCP socket is the one named
    "metrics", which the daemon serves as its metrics-only listener."""
    api = directives(SOCKET)
    listens = api["ListenStream"]
    assert listens and all(v.startswith("/run/") for v in listens), listens
    assert api["SocketMode"] == ["0660"]
    assert api["FileDescriptorName"] == ["api"]
    # The service's RuntimeDirectory is removed when it stops: the socket lives elsewhere.
    runtime_dir = "/run/" + directives(SERVICE)["RuntimeDirectory"][0] + "/"
    assert not any(v.startswith(runtime_dir) for v in listens)
    metrics = directives(METRICS_SOCKET)
    assert metrics["FileDescriptorName"] == ["metrics"]
    assert all(v.rsplit(":", 1)[-1].isdigit() for v in metrics["ListenStream"])
    service = directives(SERVICE)
    assert service["Sockets"] == [f"{SOCKET.name} {METRICS_SOCKET.name}"]
    for sock in (SOCKET, METRICS_SOCKET):
        assert sock.name in service["Requires"][0]


def _sharedpoold_binary() -> str:
    """The real sharedpoold: the console script of the venv running the tests.

    In a venv (make's .venv, CI) it must exist: `pip install -e .` creates it from
    pyproject.toml's [project.scripts]. Outside one, sharedpoold on PATH, else
    /bin/true (only the path of ExecStart changes)."""
    venv_exe = Path(sys.prefix) / "bin" / "sharedpoold"
    if sys.prefix != sys.base_prefix:
        assert venv_exe.is_file(), (
            f"{venv_exe} missing: install the project into the venv (make, or "
            "pip install -e .) so the units are verified against the real binary"
        )
        return str(venv_exe)
    return shutil.which("sharedpoold") or "/bin/true"


def test_verified_binary_is_the_real_daemon() -> None:
    exe = _sharedpoold_binary()
    if exe == "/bin/true":
        pytest.skip("not in a venv and no sharedpoold on PATH: verified with /bin/true")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--state-dir" in out.stdout, out.stdout + out.stderr


def _verifiable_copy(tmp_path: Path) -> Path:
    exe = _sharedpoold_binary()
    text = SERVICE.read_text(encoding="utf-8")
    assert f"ExecStart={COMMITTED_EXEC} " in text
    (tmp_path / SERVICE.name).write_text(
        text.replace(f"ExecStart={COMMITTED_EXEC} ", f"ExecStart={exe} "), encoding="utf-8"
    )
    shutil.copy(SOCKET, tmp_path / SOCKET.name)
    shutil.copy(METRICS_SOCKET, tmp_path / METRICS_SOCKET.name)
    return tmp_path


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip(
            "systemd-analyze not installed (Debian package 'systemd'); "
            "deploy/ci-checks.sh installs it and verifies the units unconditionally"
        )
    return path


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    units = _verifiable_copy(tmp_path)
    result = subprocess.run(
        [
            *(tool, "verify", "--man=no", str(units / SOCKET.name)),
            *(str(units / METRICS_SOCKET.name), str(units / SERVICE.name)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # verify only warns (exit 0) on unknown keys and the like: none for our units.
    assert "sharedpoold" not in output, output


def test_systemd_analyze_security_exposure(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    units = _verifiable_copy(tmp_path)
    result = subprocess.run(
        [tool, "security", "--offline=true", "--threshold=20", str(units / SERVICE.name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
