"""The daemon as users start it (issue 11): one daemon per state directory, a state
directory nobody else can write, the API never anonymous on TCP, a metrics-only listener
that serves nothing else, default paths that never depend on the working directory, and
operator output (--version, --check-config as TOML, JSON logs, one access-log line per
request). Every test runs a real sharedpoold process over real sockets."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.daemons import DAEMON_CLI, ROOT, Daemon, load_openapi, process_gone, wait_gone
from support.daemons import run_cli as _run

from daemon.config import default_state_dir, default_unix_socket

SECRET = "registration-secret-0123456789"


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# ---- one daemon per state directory; a directory nobody else can write -------------------


async def test_second_daemon_on_the_same_state_dir_is_refused_with_the_holders_pid(
    tmp_path: Path,
) -> None:
    d = Daemon(tmp_path, tcp=False)
    try:
        await d.wait_ready()
        out = _run(
            "--state-dir", str(d.state), "--listen", f"unix:{tmp_path / 'b.sock'}", cwd=tmp_path
        )
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip() == (
            f"sharedpoold: state directory {d.state} is in use by pid {d.proc.pid}"
        )
        assert not (tmp_path / "b.sock").exists()
        # the first daemon is untouched and still serves
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(d.sock))) as http,
            http.get("http://d/readyz") as resp,
        ):
            assert resp.status == 200
    finally:
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
        d.stop()
    # the lock went with the process: a new daemon starts on the same directory
    d2 = Daemon(tmp_path, tcp=False)
    try:
        await d2.wait_ready()
    finally:
        d2.stop()


_HOLDER = """
import os, subprocess, sys
from pathlib import Path
from daemon.statedir import lock_state_dir
lock = lock_state_dir(Path(sys.argv[1]))
writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"],
                          pass_fds=(lock.fd,), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)  # not our pipe: run() returns at once
print(writer.pid, flush=True)
os._exit(0)  # killed: the lock stays with the 'writer'
"""


def _die_holding_the_lock(state: Path) -> int:
    """A process takes the state directory's lock, hands it to a child (its 'writer', which
    lives 1.5 s) and exits; the child's pid."""
    out = subprocess.run(
        [sys.executable, "-c", _HOLDER, str(state)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return int(out.stdout.strip())


def test_a_dead_daemons_writer_keeps_the_lock_and_the_next_daemon_waits_for_it(
    tmp_path: Path,
) -> None:
    from daemon.statedir import lock_state_dir

    state = tmp_path / "state"
    writer = _die_holding_the_lock(state)
    assert not process_gone(writer)  # still running when the next daemon starts
    lock = lock_state_dir(state)  # the holder's pid is gone: waits for its writer
    try:
        assert process_gone(writer)  # taken only once the writer had exited
    finally:
        lock.release()


def test_a_writer_that_does_not_finish_is_named_not_its_dead_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from daemon import statedir

    monkeypatch.setattr(statedir, "LOCK_WAIT_SECONDS", 0.2)
    state = tmp_path / "state"
    writer = _die_holding_the_lock(state)
    with pytest.raises(statedir.StateDirError) as err:
        statedir.lock_state_dir(state)
    assert "still locked 0.2 s after its daemon" in str(err.value)
    assert "journal writer has not finished" in str(err.value)
    assert wait_gone(writer)
    statedir.lock_state_dir(state).release()  # and once it has, the lock is free


async def test_a_daemon_killed_alone_leaves_its_writer_to_finish_and_restarts_at_once(
    tmp_path: Path,
) -> None:
    d = Daemon(tmp_path, tcp=False)
    try:
        await d.wait_ready()
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(d.sock))) as h:
            async with h.post("http://d/v1/clients", json={"name": "t"}) as resp:
                token = (await resp.json())["token"]
            auth = {"Authorization": f"Bearer {token}"}
            for _ in range(20):
                async with h.post("http://d/v1/buffers", json={"size": 4096}, headers=auth) as r:
                    assert r.status == 201
        d.signal(signal.SIGKILL)  # the daemon only: its writer sees the end of its input
        d.wait()
    finally:
        d.stop()
    again = Daemon(tmp_path, tcp=False)  # started at once: waits for the writer's lock
    try:
        await again.wait_ready()
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(again.sock))) as h,
            h.get("http://d/v1/debug/invariants") as resp,
        ):
            assert (await resp.json())["buffers"] == 20
    finally:
        again.stop()


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another uid needs root")
def test_state_dir_owned_by_another_uid_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 12345, 12345)
    out = _run("--state-dir", str(state), "--listen", f"unix:{tmp_path / 's'}", cwd=tmp_path)
    assert out.returncode == 2
    assert f"state directory {state} is owned by uid 12345" in out.stderr
    assert "Traceback" not in out.stderr
    assert os.listdir(state) == []  # nothing read, nothing written


def test_state_dir_writable_by_others_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o777)
    out = _run("--state-dir", str(state), "--listen", f"unix:{tmp_path / 's'}", cwd=tmp_path)
    assert out.returncode == 2
    assert f"state directory {state} has mode 0777" in out.stderr
    assert os.listdir(state) == []


# ---- the API never anonymous on TCP ------------------------------------------------------


def test_tcp_api_listener_without_a_secret_is_a_config_error(tmp_path: Path) -> None:
    out = _run("--state-dir", str(tmp_path / "st"), "--listen", "tcp:127.0.0.1:0", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith("sharedpoold: config error: daemon.listen: tcp:127.0.0.1:0")
    assert "registration_secret" in out.stderr and len(out.stderr.splitlines()) == 1
    assert not (tmp_path / "st").exists()


async def test_registration_over_tcp_needs_the_secret_unix_does_not(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    d = Daemon(
        tmp_path,
        "--listen",
        "tcp:127.0.0.1:0",
        "--registration-secret-file",
        str(secret_file),
        tcp=False,
    )
    try:
        await d.wait_ready()
        assert d.tcp_url is not None
        async with aiohttp.ClientSession() as http:
            async with http.post(d.tcp_url + "/v1/clients", json={"name": "x"}) as resp:
                assert resp.status == 401
                assert resp.content_type == "application/problem+json"
            bad = {"Authorization": "Bearer " + "w" * 30}
            async with http.post(d.tcp_url + "/v1/clients", json={}, headers=bad) as resp:
                assert resp.status == 403
            good = {"Authorization": f"Bearer {SECRET}"}
            async with http.post(d.tcp_url + "/v1/clients", json={}, headers=good) as resp:
                assert resp.status == 201
                token = (await resp.json())["token"]
            # the client's own token then works over TCP as usual
            auth = {"Authorization": f"Bearer {token}"}
            async with http.post(
                d.tcp_url + "/v1/buffers", json={"size": 4096}, headers=auth
            ) as resp:
                assert resp.status == 201
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(d.sock))) as http,
            http.post("http://d/v1/clients", json={"name": "local"}) as resp,
        ):
            assert resp.status == 201  # the socket's mode is the boundary there
        assert SECRET not in d.output()
    finally:
        d.stop()


async def test_anonymous_tcp_registration_only_when_explicitly_allowed(tmp_path: Path) -> None:
    d = Daemon(tmp_path)  # --listen tcp:127.0.0.1:0 --allow-anonymous-register
    try:
        await d.wait_ready()
        assert d.tcp_url is not None
        async with (
            aiohttp.ClientSession() as http,
            http.post(d.tcp_url + "/v1/clients", json={}) as resp,
        ):
            assert resp.status == 201
    finally:
        d.stop()


# ---- the metrics-only listener -----------------------------------------------------------


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


# What the metrics-only listener serves: the metrics and probes, and the read-only page
# (daemon.ui) with the two JSON documents it draws, which name no client.
SERVED_ON_METRICS = {
    "/metrics",
    "/healthz",
    "/readyz",
    "/",
    "/ui",
    "/ui/ui.js",
    "/ui/ui.css",
    "/ui/palette.json",
    "/v1/memory-map",
    "/v1/ui/summary",
}


async def test_metrics_only_listener_serves_nothing_else(tmp_path: Path) -> None:
    d = Daemon(tmp_path, "--metrics-listen", "tcp:127.0.0.1:0", tcp=False)
    try:
        await d.wait_ready()
        url = d.metrics_url()
        status, body = _get(url + "/metrics")
        assert status == 200 and b"sharedpool_pool_size_bytes" in body
        # the standard process collectors are in the daemon's own registry
        for family in (b"process_resident_memory_bytes", b"process_open_fds", b"python_info"):
            assert family in body
        assert _get(url + "/healthz")[0] == 200
        assert _get(url + "/readyz")[0] == 200
        for path in SERVED_ON_METRICS:
            status, body = _get(url + path)
            assert status == 200 and body, path
        status, body = _get(url + "/v1/memory-map")
        memory_map = json.loads(body)
        assert memory_map["regions"] == 256 and memory_map["strategy"] == "pool"  # 512 MiB
        doc = load_openapi()
        seen = 0
        async with aiohttp.ClientSession() as http:
            for path, ops in doc["paths"].items():
                if path in SERVED_ON_METRICS:
                    continue
                for method in ops:
                    if method not in ("get", "post", "delete", "put", "patch"):
                        continue
                    async with http.request(method, url + _concrete(path), json={}) as resp:
                        assert resp.status == 404, (method, path, resp.status)
                        assert resp.content_type == "application/problem+json"
                        seen += 1
            async with http.post(url + "/v1/clients", json={}) as resp:
                assert resp.status == 404
        assert seen >= 10
        # the Unix API listener still serves the API
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(d.sock))) as http,
            http.post("http://d/v1/clients", json={}) as resp,
        ):
            assert resp.status == 201
    finally:
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
        d.stop()


# ---- operator output ---------------------------------------------------------------------


def test_check_config_is_toml_with_resolved_paths_and_round_trips(tmp_path: Path) -> None:
    out = _run(
        "--check-config", "--state-dir", "rel/state", "--listen", "unix:rel.sock", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    doc = tomllib.loads(out.stdout)
    assert doc["daemon"]["state_dir"] == str(tmp_path / "rel" / "state")
    assert doc["daemon"]["listen"] == [f"unix:{tmp_path / 'rel.sock'}"]
    assert doc["guest"]["memory"] == "16GiB" and doc["daemon"]["socket_mode"] == "0660"
    cfg = tmp_path / "resolved.toml"
    cfg.write_text(out.stdout)
    again = _run("--config", str(cfg), "--check-config", cwd=tmp_path / "..")
    assert again.returncode == 0, again.stderr
    assert tomllib.loads(again.stdout) == doc  # same settings from anywhere
    # defaults: never the working directory
    plain = tomllib.loads(_run("--check-config", cwd=tmp_path).stdout)
    assert Path(plain["daemon"]["state_dir"]).is_absolute()
    assert not plain["daemon"]["state_dir"].startswith(str(tmp_path))
    (listen,) = plain["daemon"]["listen"]
    assert listen.startswith("unix:/") and not listen.startswith(f"unix:{tmp_path}")


def test_help_shows_sizes_and_modes_as_operators_write_them(tmp_path: Path) -> None:
    out = _run("--help", cwd=tmp_path)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "(default: 16GiB)" in text and "(default: 0660)" in text
    assert "(default: 64MiB)" in text
    assert "--metrics-listen" in text and "--version" in text
    for cmd in (
        DAEMON_CLI,
        [sys.executable, "-m", "hv_netvsc_sim"],
        [sys.executable, "-m", "pool.guest"],
    ):
        version = subprocess.run(
            [*cmd, "--version"], capture_output=True, text=True, timeout=30, cwd=ROOT
        )
        assert version.returncode == 0 and re.search(r" \d+\.\d+\.\d+$", version.stdout.strip())


@pytest.mark.parametrize(
    ("env", "uid", "state", "sock"),
    [
        ({}, 0, "/var/lib/sharedpoold", "/run/sharedpoold/sharedpoold.sock"),
        (
            {"XDG_RUNTIME_DIR": "/run/user/1000"},
            1000,
            "/home/u/.local/state/sharedpool",
            "/run/user/1000/sharedpool/sharedpoold.sock",
        ),
        (
            {},
            1000,
            "/home/u/.local/state/sharedpool",
            "/home/u/.local/state/sharedpool/sharedpoold.sock",
        ),
        (
            {"XDG_STATE_HOME": "/xdg/state"},
            1000,
            "/xdg/state/sharedpool",
            "/xdg/state/sharedpool/sharedpoold.sock",
        ),
        (
            {"STATE_DIRECTORY": "/var/lib/x", "RUNTIME_DIRECTORY": "/run/x"},
            0,
            "/var/lib/x",
            "/run/x/sharedpoold.sock",
        ),
    ],
)
def test_default_paths(
    env: dict[str, str], uid: int, state: str, sock: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", "/home/u")
    assert default_state_dir(env, uid) == Path(state)
    assert default_unix_socket(env, uid) == sock


async def test_json_logs_are_only_json_lines_with_one_access_line_per_request(
    tmp_path: Path,
) -> None:
    d = Daemon(tmp_path, "--json-logs", "--access-log", tcp=False)
    try:
        await d.wait_ready()
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(d.sock))) as http:
            for _ in range(5):
                async with http.get("http://d/healthz") as resp:
                    assert resp.status == 200
            async with http.post(
                "http://d/v1/clients",
                data=b"{not json",
                headers={"Content-Type": "application/json"},
            ) as resp:
                assert resp.status == 400
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
        records = [json.loads(line) for line in d.output().splitlines()]  # every line
        access = [r for r in records if r["logger"] == "aiohttp.access"]
        healthz = [r for r in access if "GET /healthz" in r["msg"]]
        # wait_ready's own /readyz polls are access lines too: count only ours
        assert len(healthz) == 5
        assert sum("POST /v1/clients" in r["msg"] for r in access) == 1
        listening = next(r for r in records if r["msg"] == "listening")
        assert listening["state_dir"] == str(d.state)
    finally:
        d.stop()


def test_sigterm_while_aging_stops_promptly_and_never_reports_ready(tmp_path: Path) -> None:
    """A start-up that ages a large guest for many seconds is cancelled at the next
    aging step: the daemon stops cleanly and never logs `ready` after `stopping`."""
    log = tmp_path / "log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [
                *DAEMON_CLI,
                "--state-dir",
                str(tmp_path / "state"),
                "--listen",
                f"unix:{tmp_path / 's.sock'}",
                "--age-steps",
                "50000000",
            ],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while "aging the guest" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        text = log.read_text()
        assert "aging the guest" in text, text  # progress of a long start-up is logged
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        text = log.read_text()
        assert "start-up cancelled" in text and " ready" not in text, text
        assert "Traceback" not in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _sim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hv_netvsc_sim", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_run_strict_fails_when_allocations_fail() -> None:
    small = ["--guest-memory", "1GiB", "--age-steps", "0", "--cycles", "1"]
    # swiotlb cannot serve the 16 MiB receive buffer: allocations fail by design
    loose = _sim("run", "--strategy", "swiotlb", *small, "--json")
    assert loose.returncode == 0, loose.stderr
    summary: dict[str, Any] = json.loads(loose.stdout)
    assert summary["failures"] > 0
    strict = _sim("run", "--strategy", "swiotlb", *small, "--json", "--strict")
    assert strict.returncode == 1
    assert "--strict" in strict.stderr and "Traceback" not in strict.stderr
    ok = _sim("run", "--strategy", "pool", *small, "--strict")
    assert ok.returncode == 0, ok.stdout + ok.stderr
