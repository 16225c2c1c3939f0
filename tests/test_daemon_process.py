"""sharedpoold as a process: graceful shutdown, restart after kill -9, configuration errors,
systemd notification and socket activation, the Unix socket's permissions and peer
credentials."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from support.daemons import ADMIN_TOKEN, ROOT, Daemon, run_cli

from daemon.client import ApiError, Buffer, SharedPoolClient, register_client

_run = functools.partial(run_cli, timeout=20)


def test_help_and_config_errors(tmp_path: Path) -> None:
    out = _run("--help", cwd=tmp_path)
    assert out.returncode == 0 and "--guest-memory" in out.stdout and "--listen" in out.stdout
    # every platform the model has is offered (the choices once said {tdx,snp,none})
    assert "{none,tdx,snp,hyperv-vtom}" in out.stdout
    out = _run("--pool-max", "lots", cwd=tmp_path)
    assert out.returncode == 2 and "pool.max" in out.stderr and "Traceback" not in out.stderr
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[pool]\nmax = "1GiB"\nwatermark = 3\n')
    out = _run("--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 2 and "pool.watermark: unknown setting" in out.stderr
    cfg.write_text("[daemon]\nlease_ttl = -1\n")
    out = _run("--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 2 and "daemon.lease_ttl" in out.stderr
    cfg.write_text("[guest\n")
    out = _run("--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 2 and "not valid TOML" in out.stderr
    out = _run("--print-default-config", cwd=tmp_path)
    assert out.returncode == 0
    cfg.write_text(out.stdout)
    out = _run("--config", str(cfg), "--check-config", "--admin-token", "s" * 20, cwd=tmp_path)
    assert out.returncode == 0 and 'memory = "16GiB"' in out.stdout
    assert "s" * 20 not in out.stdout
    assert tomllib.loads(out.stdout)["guest"]["memory"] == "16GiB"


async def _alloc_some(
    url: str, name: str, sizes: list[int]
) -> tuple[SharedPoolClient, list[Buffer]]:
    """A client registered outside any block (its buffers outlive close()), and its buffers."""
    reg = await register_client(url, name)
    c = SharedPoolClient(url, token=reg.token, client_id=reg.client_id)
    await c.open()
    bufs = [await c.allocate(size, purpose=f"{name}-{i}") for i, size in enumerate(sizes)]
    return c, bufs


async def test_graceful_shutdown_persists(tmp_path: Path) -> None:
    d = Daemon(tmp_path, "--json-logs")
    try:
        await d.wait_ready()
        mode = stat.S_IMODE(os.stat(d.sock).st_mode)
        assert mode == 0o660
        c, bufs = await _alloc_some(d.unix_url, "a", [4096, 1 << 20, 3 << 20])
        await c.free(bufs[0])
        await c.close()
        d.signal(signal.SIGTERM)
        assert d.wait() == 0, d.output()
        assert not d.sock.exists()
        assert "stopped" in d.output() and "Traceback" not in d.output()
        assert c.token and c.token not in d.output() and ADMIN_TOKEN not in d.output()
        lines = [x for x in d.output().splitlines() if not x.startswith("sharedpoold listening")]
        assert [json.loads(x)["msg"] for x in lines] == [
            "listening",
            "ready",
            "stopping",
            "stopped",
        ]  # no access log
    finally:
        d.stop()
    d2 = Daemon(tmp_path)
    try:
        await d2.wait_ready()
        async with SharedPoolClient(d2.unix_url, token=c.token, client_id=c.client_id) as c2:
            assert await c2.buffers() == bufs[1:]
            assert (await c2.invariants())["ok"]  # admin: same-uid Unix peer
            await c2.heartbeat()
        assert "snapshot at record" in d2.output()
    finally:
        d2.signal(signal.SIGTERM)
        assert d2.wait() == 0
        d2.stop()


async def test_restart_after_kill9_keeps_every_acknowledged_buffer(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    try:
        await d.wait_ready()
        a, a_bufs = await _alloc_some(d.unix_url, "a", [4096, 16 << 20, 1 << 20, 8192])
        assert d.tcp_url is not None
        b, b_bufs = await _alloc_some(d.tcp_url, "b", [1 << 20, 6144, 15 << 20])
        await a.free(a_bufs[2])
        del a_bufs[2]
        await b.free(b_bufs[1])
        del b_bufs[1]
        a_bufs.append(await a.allocate(100 << 10, purpose="late"))
        # growth under load: the pool had to grow past its 8 MiB initial size
        async with SharedPoolClient(d.tcp_url, token=ADMIN_TOKEN) as admin:
            await admin.grow(4 << 20)
        await a.close()
        await b.close()
        d.signal(signal.SIGKILL)
        assert d.wait() == -signal.SIGKILL
    finally:
        d.stop()
    d2 = Daemon(tmp_path)
    try:
        await d2.wait_ready()
        assert "a fresh guest" in d2.output()  # no snapshot: rebuilt from the journal
        for client, bufs in ((a, a_bufs), (b, b_bufs)):
            async with SharedPoolClient(
                d2.unix_url, token=client.token, client_id=client.client_id
            ) as c:
                assert await c.buffers() == sorted(bufs, key=lambda x: x.id)
                for buf in bufs:
                    assert await c.get(buf.id) == buf
                inv = await c.invariants()
                assert inv["ok"] and inv["buffers"] == len(a_bufs) + len(b_bufs)
                assert inv["clients"] == 2
                # the clients carry on
                new = await c.allocate(4096)
                await c.free(new)
                with pytest.raises(ApiError) as err:
                    await c.free(new)
                assert err.value.status == 409
    finally:
        d2.signal(signal.SIGTERM)
        assert d2.wait() == 0
        d2.stop()


async def test_other_guest_config_on_existing_state_is_refused(tmp_path: Path) -> None:
    d = Daemon(tmp_path, tcp=False)
    try:
        await d.wait_ready()
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
    finally:
        d.stop()
    d2 = Daemon(tmp_path, "--seed", "7", tcp=False)
    assert d2.wait() == 2
    assert "guest.seed: state has 1, config has 7" in d2.output()
    assert "--reset-state" in d2.output() and "Traceback" not in d2.output()
    d3 = Daemon(tmp_path, "--seed", "7", "--reset-state", tcp=False)
    try:
        await d3.wait_ready()
    finally:
        d3.signal(signal.SIGTERM)
        assert d3.wait() == 0
        d3.stop()


def _notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"@sharedpool-test-{os.getpid()}-{time.monotonic_ns()}"
    sock.bind("\0" + name[1:])
    sock.settimeout(15)
    return sock, name


async def test_systemd_notify_and_socket_activation(tmp_path: Path) -> None:
    notify, name = _notify_socket(tmp_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = tmp_path / "activated.sock"
    listener.bind(str(path))
    listener.listen(16)
    state = tmp_path / "state"
    from support.daemons import SMALL, _flag

    flags = [
        a for k, v in SMALL.items() if k != "daemon.admin_token" for a in (f"--{_flag(k)}", str(v))
    ]
    # exec through a tiny launcher that puts the socket at fd 3 and sets LISTEN_PID, as
    # systemd does
    launcher = (
        "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
    )
    cmd = [
        sys.executable,
        "-c",
        launcher,
        str(listener.fileno()),
        "-m",
        "daemon.cli",
        "--state-dir",
        str(state),
        *flags,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NOTIFY_SOCKET": name, "WATCHDOG_USEC": "200000"}
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=env,
        pass_fds=(listener.fileno(),),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        msgs: list[str] = []
        while not any("READY=1" in m for m in msgs):
            msgs.append(notify.recv(4096).decode())
        async with SharedPoolClient(f"unix:{path}", register=False) as c:
            assert await c.ready()
        async with SharedPoolClient(f"unix:{path}", "activated") as c:
            assert c.client_id
        while not any(m == "WATCHDOG=1" for m in msgs):
            msgs.append(notify.recv(4096).decode())
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in msgs:
            msgs.append(notify.recv(4096).decode())
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        listener.close()
