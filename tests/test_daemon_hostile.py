"""sharedpoold under hostile and unlucky conditions (issue 13), each against a real daemon
process over its Unix socket: the orphan-buffer race with a split request, quotas, a
journal rolled back behind what was acknowledged, and a full disk."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.daemons import Daemon, journal_writer, process_gone


def _session(d: Daemon) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(d.sock)))


async def _register(http: aiohttp.ClientSession, name: str = "c") -> tuple[str, str]:
    async with http.post("http://d/v1/clients", json={"name": name}) as resp:
        assert resp.status == 201, await resp.text()
        body = await resp.json()
        return body["client_id"], body["token"]


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _alloc(http: aiohttp.ClientSession, token: str, size: int) -> tuple[int, dict[str, Any]]:
    async with http.post("http://d/v1/buffers", json={"size": size}, headers=_auth(token)) as r:
        return r.status, await r.json(content_type=None)


async def _invariants(d: Daemon) -> dict[str, Any]:
    async with _session(d) as http, http.get("http://d/v1/debug/invariants") as resp:
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())


# ---- 1. the orphan buffer --------------------------------------------------------------------


async def test_allocation_whose_client_left_while_its_body_arrived_is_refused(
    tmp_path: Path,
) -> None:
    d = Daemon(tmp_path, tcp=False)
    try:
        await d.wait_ready()
        async with _session(d) as http:
            cid, token = await _register(http)
            body = json.dumps({"size": 65536}).encode()
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.connect(str(d.sock))
            raw.settimeout(10)
            # the headers (authenticated now) ...
            raw.sendall(
                b"POST /v1/buffers HTTP/1.1\r\nHost: d\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            )
            await asyncio.sleep(0.3)
            # ... the client unregisters meanwhile ...
            async with http.delete(f"http://d/v1/clients/{cid}", headers=_auth(token)) as r:
                assert r.status == 200
            # ... then the body arrives
            raw.sendall(body)
            answer = raw.recv(65536).decode()
            raw.close()
        assert answer.startswith("HTTP/1.1 401"), answer
        assert "unauthorized" in answer and "no longer registered" in answer
        assert (await _invariants(d))["buffers"] == 0
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
    finally:
        d.stop()
    d2 = Daemon(tmp_path, tcp=False)  # restarts (it used to exit 3 at every start)
    try:
        await d2.wait_ready()
        assert (await _invariants(d2))["ok"]
    finally:
        d2.stop()


# ---- 4. quotas -------------------------------------------------------------------------------


async def test_quotas_refuse_with_a_reason_and_change_nothing(tmp_path: Path) -> None:
    d = Daemon(
        tmp_path,
        "--max-clients",
        "3",
        "--client-max-buffers",
        "4",
        "--client-max-bytes",
        "1MiB",
        tcp=False,
    )
    try:
        await d.wait_ready()
        async with _session(d) as http:
            tokens = [(await _register(http, f"c{i}"))[1] for i in range(3)]
            async with http.post("http://d/v1/clients", json={}) as resp:
                assert resp.status == 503
                problem = await resp.json(content_type=None)
                assert problem["type"].endswith("too-many-clients")
                assert problem["reason"] == "max_clients"
            for _ in range(4):
                assert (await _alloc(http, tokens[0], 4096))[0] == 201
            status, problem = await _alloc(http, tokens[0], 4096)
            assert status == 429 and problem["reason"] == "client_buffers"
            status, problem = await _alloc(http, tokens[1], 2 << 20)
            assert status == 429 and problem["reason"] == "client_bytes"
            assert (await _alloc(http, tokens[1], 1 << 20))[0] == 201  # exactly the quota
            async with http.get("http://d/v1/buffers", headers=_auth(tokens[0])) as resp:
                assert len(await resp.json()) == 4
            async with http.get("http://d/metrics") as resp:
                text = await resp.text()
            for reason, n in (("max_clients", 1), ("client_buffers", 1), ("client_bytes", 1)):
                assert f'sharedpool_quota_refusals_total{{reason="{reason}"}} {n}.0' in text
        inv = await _invariants(d)
        assert inv["buffers"] == 5 and inv["clients"] == 3
    finally:
        d.stop()


# ---- 6. silent rollback ----------------------------------------------------------------------


async def _acknowledged(tmp_path: Path, n: int) -> Daemon:
    """A daemon that acknowledged `n` allocations, then was killed with its journal writer
    (WAL not checkpointed: a writer that outlives the daemon closes the database cleanly)."""
    d = Daemon(tmp_path, tcp=False)
    await d.wait_ready()
    async with _session(d) as http:
        _, token = await _register(http)
        for _ in range(n):
            assert (await _alloc(http, token, 4096))[0] == 201
    d.kill_all()
    d.wait()
    d.stop()
    return d


def _start(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    d = Daemon(tmp_path, *extra, tcp=False)
    try:
        code = d.wait(timeout=60)
    except subprocess.TimeoutExpired:
        code = None
    out = d.output()
    d.stop()
    return subprocess.CompletedProcess([], -1 if code is None else code, out, "")


def _damage_wal(state: Path, how: str) -> None:
    db, wal = state / "sharedpoold.db", state / "sharedpoold.db-wal"
    assert wal.exists() and wal.stat().st_size > 4096, "the records are in the WAL"
    if how == "deleted wal":
        wal.unlink()
    elif how == "truncated wal":
        with open(wal, "r+b") as f:
            f.truncate(wal.stat().st_size // 2)
    elif how == "bit-flipped wal":
        data = bytearray(wal.read_bytes())
        data[len(data) // 2] ^= 0x40  # a frame in the middle: SQLite stops before it
        wal.write_bytes(bytes(data))
    elif how == "zeroed database":
        wal.unlink()
        (state / "sharedpoold.db-shm").unlink(missing_ok=True)
        db.write_bytes(b"")
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["deleted wal", "truncated wal", "bit-flipped wal", "zeroed database"]
)
async def test_a_journal_behind_what_was_acknowledged_is_refused(tmp_path: Path, how: str) -> None:
    d = await _acknowledged(tmp_path, 40)
    _damage_wal(d.state, how)
    # a daemon that runs to ready would be a failure: it must exit by itself
    probe = Daemon(tmp_path, tcp=False)
    try:
        code = probe.wait(timeout=60)
    finally:
        out = probe.output()
        probe.stop()
    assert code == 3, out
    assert "acknowledged" in out and "--accept-rollback" in out, out
    assert "ready" not in out.split("cannot restore")[0].split("listening")[-1]
    assert "Traceback" not in out


async def test_accept_rollback_starts_and_says_what_was_lost(tmp_path: Path) -> None:
    d = await _acknowledged(tmp_path, 20)
    _damage_wal(d.state, "deleted wal")
    again = Daemon(tmp_path, "--accept-rollback", tcp=False)
    try:
        await again.wait_ready()
        assert "rollback accepted" in again.output()
        again.signal(signal.SIGTERM)
        assert again.wait() == 0
    finally:
        again.stop()
    normal = Daemon(tmp_path, tcp=False)  # the accepted state is the new reference
    try:
        await normal.wait_ready()
    finally:
        normal.stop()


async def test_a_clean_restart_and_a_torn_unacknowledged_tail_are_not_rollbacks(
    tmp_path: Path,
) -> None:
    await _acknowledged(tmp_path, 10)
    d = Daemon(tmp_path, tcp=False)  # the journal reaches the position: starts
    try:
        await d.wait_ready()
        assert (await _invariants(d))["buffers"] == 10
    finally:
        d.stop()


# ---- 7. a full disk --------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path) -> Path:
    filler = mnt / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0" * 512)
                f.flush()
        except OSError:
            pass
    return filler


async def _until_storage_full(http: aiohttp.ClientSession) -> None:
    """Wait (at most ~5 s) for the daemon's metrics to report the disk full."""
    for _ in range(100):
        async with http.get("http://d/metrics") as resp:
            if "sharedpool_storage_full 1.0" in await resp.text():
                return
        await asyncio.sleep(0.05)
    raise AssertionError("storage_full never reported")


async def test_full_disk_serves_reads_refuses_changes_and_resumes(
    tmp_path: Path, small_disk: Path
) -> None:
    work = small_disk / "d"
    work.mkdir(mode=0o700)
    d = Daemon(work, "--synchronous", "full", tcp=False)
    try:
        await d.wait_ready()
        async with _session(d) as http:
            _, token = await _register(http)
            assert (await _alloc(http, token, 4096))[0] == 201
            filler = _fill(small_disk)
            # the first change finds the disk full: it waits for space (not acknowledged)
            waiting = asyncio.ensure_future(_alloc(http, token, 8192))
            await _until_storage_full(http)
            assert not waiting.done()
            # reads are served; other changes are refused at once
            async with http.get("http://d/v1/pool") as resp:
                assert resp.status == 200
            async with http.get("http://d/v1/buffers", headers=_auth(token)) as resp:
                # the waiting allocation is applied in memory; its answer waits for the disk
                assert resp.status == 200 and len(await resp.json()) == 2
            status, problem = await _alloc(http, token, 4096)
            assert status == 503 and problem["type"].endswith("storage-full")
            # space returns: the waiting allocation completes by itself
            filler.unlink()
            status, buf = await asyncio.wait_for(waiting, 15)
            assert status == 201, buf
            assert (await _alloc(http, token, 4096))[0] == 201
            async with http.get("http://d/metrics") as resp:
                text = await resp.text()
            assert "sharedpool_storage_full 0.0" in text
            assert "sharedpool_storage_full_events_total 1.0" in text
        d.signal(signal.SIGTERM)
        assert d.wait() == 0, d.output()
        assert "Traceback" not in d.output()
    except BaseException:
        print(d.output())  # the log lives on the tmpfs, unmounted after the test
        raise
    finally:
        d.stop()
    again = Daemon(work, tcp=False)
    try:
        await again.wait_ready()
        assert (await _invariants(again))["buffers"] == 3
    finally:
        again.stop()


async def test_a_stop_while_the_disk_is_full_does_not_wait_for_the_writer_and_says_what_is_lost(
    tmp_path: Path, small_disk: Path
) -> None:
    work = small_disk / "d"
    work.mkdir(mode=0o700)
    d = Daemon(work, "--synchronous", "full", tcp=False)
    try:
        await d.wait_ready()
        async with _session(d) as http:
            _, token = await _register(http)
            assert (await _alloc(http, token, 4096))[0] == 201
            writer = journal_writer(d.proc.pid)
            filler = _fill(small_disk)
            waiting = asyncio.ensure_future(_alloc(http, token, 8192))
            await _until_storage_full(http)
            d.signal(signal.SIGTERM)  # the writer is retrying: the stop must not wait for it
            # (the request in flight is drained for daemon.shutdown_timeout, 10 s, as any)
            assert d.wait(timeout=30) == 0, d.output()
            waiting.cancel()
        out = d.output()
        assert "stopping with a full disk: 1 records never acknowledged are not saved" in out
        assert "Traceback" not in out, out
        assert process_gone(writer)
        filler.unlink()
    except BaseException:
        print(d.output())
        raise
    finally:
        d.stop()
    again = Daemon(work, tcp=False)  # space is back: the acknowledged buffer, not the other
    try:
        await again.wait_ready()
        assert (await _invariants(again))["buffers"] == 1
    finally:
        again.stop()


def test_storage_errors_exit_4_not_3(tmp_path: Path) -> None:
    """A database that cannot be opened for writing is a storage error, not a failed
    restore: a different exit status and message."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    db = state / "sharedpoold.db"
    db.mkdir()  # not a file: sqlite cannot open it
    done = _start(tmp_path)
    assert done.returncode == 4, done.stdout
    assert "storage error in" in done.stdout and "Traceback" not in done.stdout
    shutil.rmtree(db)
    os.sync()
    assert sqlite3.sqlite_version


# ---- 8. the journal writer dies --------------------------------------------------------------


async def test_a_killed_journal_writer_stops_the_daemon_in_one_line_and_loses_nothing(
    tmp_path: Path,
) -> None:
    d = Daemon(tmp_path, tcp=False)
    try:
        await d.wait_ready()
        async with _session(d) as http:
            _, token = await _register(http)
            for _ in range(5):
                assert (await _alloc(http, token, 4096))[0] == 201
            os.kill(journal_writer(d.proc.pid), signal.SIGKILL)  # the OOM killer, say
            status, problem = await _alloc(http, token, 4096)
            assert status == 503 and problem["type"].endswith("not-ready"), problem
        assert d.wait(timeout=30) == 1
        out = d.output()
        assert (
            "fatal error, the daemon stops: the journal could not be written: the journal "
            "writer exited (signal 9)"
        ) in out, out
        assert "Traceback" not in out, out
    finally:
        d.stop()
    again = Daemon(tmp_path, tcp=False)  # the five acknowledged buffers are there
    try:
        await again.wait_ready()
        assert (await _invariants(again))["buffers"] == 5
    finally:
        again.stop()
