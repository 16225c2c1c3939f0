"""daemon.client as a client developer uses it, against a real sharedpoold process.

- the lease: a client quiet for longer than the lease keeps its buffers (the keep-alive);
  one without keep-alive loses them and is told so (LeaseLost), once and for every call;
- retry: 503 twice then 201 is one allocation, after waiting what each Retry-After said
  (seconds, then an HTTP-date); a daemon that keeps answering 503 is given up on at the
  deadline; a 4xx is never retried (a real fault proxy in front of the real daemon);
- errors: a stopped daemon is DaemonUnavailable (a ConnectionError), never aiohttp's;
- buffer scopes free on exit, on an exception in the block and on cancellation;
- `va` is a JSON string on the wire (jq-safe), the client's Buffer.va the exact integer;
- Retry-After parsing in both forms, by hand-worked cases;
- the simulator's RemoteClient gets its keep-alive and retry from the library.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from fault_proxy import FaultProxy, problem_503
from support.daemons import Daemon

from daemon.client import (
    NO_RETRY,
    ApiError,
    Buffer,
    DaemonUnavailable,
    FreeResult,
    LeaseLost,
    PoolStats,
    RetryPolicy,
    SharedPoolClient,
    SharedPoolError,
    SyncSharedPoolClient,
    parse_retry_after,
)
from daemon.client.values import parse_va

LEASE = 2.0  # seconds: short, so that "quiet for longer than the lease" is a short test


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    # an idle timeout shorter than the heartbeat period: the daemon closes the client's
    # connection between beats, every time (the client must reconnect, never fail)
    d = Daemon(
        tmp_path_factory.mktemp("client"),
        *("--lease-ttl", str(LEASE), "--idle-timeout", "0.5"),
        tcp=False,
    )
    try:
        asyncio.run(d.wait_ready())
        yield d
    finally:
        d.stop()


@pytest_asyncio.fixture
async def proxy(daemon: Daemon, tmp_path: Path) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(daemon.sock, tmp_path / "proxy.sock") as p:
        yield p


# ---- Retry-After, by hand ----------------------------------------------------------------------

NOW = datetime(2026, 12, 2, 7, 30, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("1", 1.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("2.5", 2.5),
        ("Wed, 02 Dec 2026 07:30:05 GMT", 5.0),  # IMF-fixdate, 5 s after NOW
        ("Wed, 02 Dec 2026 07:31:00 GMT", 60.0),
        ("Wednesday, 02-Dec-26 07:30:10 GMT", 10.0),  # obsolete RFC 850 form
        ("Wed Dec  2 07:30:03 2026", 3.0),  # asctime form (no zone: UTC)
        ("Wed, 02 Dec 2026 07:29:00 GMT", 0.0),  # in the past: at once
        ("-1", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_both_forms(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, NOW) == seconds


def test_retry_policy_waits() -> None:
    p = RetryPolicy(attempts=4, deadline=10, max_wait=3, backoff=0.25)
    assert [p.wait(n, None) for n in (1, 2, 3, 4)] == [0.25, 0.5, 1.0, 2.0]
    assert p.wait(1, 7.0) == 3.0  # the daemon's wait, capped
    assert p.wait(3, 0.0) == 0.0
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_va_parsing() -> None:
    assert parse_va("0xffffc90000000000") == 18446683600570023936  # VMALLOC_START, 4-level
    assert parse_va("0xffffc90001003000") == 18446683600586813440
    assert parse_va(18446683600570023936) == 18446683600570023936  # a v1.0 daemon
    for bad in ("18446683600570023936", True, 1.5, None):
        with pytest.raises(ValueError):
            parse_va(bad)


# ---- the lease -------------------------------------------------------------------------------


async def test_a_quiet_client_keeps_its_buffers(daemon: Daemon) -> None:
    async with (
        SharedPoolClient(daemon.unix_url, "quiet") as quiet,
        SharedPoolClient(daemon.unix_url, "no-keepalive", keepalive=False) as bare,
    ):
        assert quiet.lease_ttl == LEASE
        kept = await quiet.allocate(64 << 10, purpose="kept")
        lost = await bare.allocate(4096, purpose="lost")
        await asyncio.sleep(LEASE * 2.5)  # silent, both
        assert await quiet.buffers() == [kept]
        assert await quiet.get(kept.id) == kept
        with pytest.raises(LeaseLost) as err:
            await bare.get(lost.id)
        assert err.value.status == 401 and "reclaimed" in str(err.value)
        with pytest.raises(LeaseLost):  # every later call too, before any request is sent
            await bare.allocate(4096)
        # the daemon reclaimed the silent client's buffer, not the quiet one's
        assert (await quiet.stats()).buffers == 1
    # leaving both blocks raised nothing (the lost lease has nothing to unregister)


def test_a_quiet_sync_client_keeps_its_buffer(daemon: Daemon) -> None:
    with SyncSharedPoolClient(daemon.unix_url, "sync-quiet") as pool:
        buf = pool.allocate(8192, purpose="sleeping")
        time.sleep(LEASE * 2.5)  # the calling thread blocks; the client's thread beats
        assert pool.buffers() == [buf]
        assert pool.free(buf) == FreeResult(buf.id, False, buf)


# ---- retry -----------------------------------------------------------------------------------


async def test_503_twice_then_201_is_one_allocation(proxy: FaultProxy) -> None:
    soon = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=1), usegmt=True)
    proxy.plan("POST", "/v1/buffers", [problem_503("1"), problem_503(soon)])
    async with SharedPoolClient(proxy.url, "retried") as c:
        before = (await c.stats()).strategy.allocations
        t0 = time.monotonic()
        buf = await c.allocate(1 << 20, purpose="after two 503s")
        waited = time.monotonic() - t0
        assert isinstance(buf, Buffer) and buf.size == 1 << 20 and buf.npages == 256
        assert await c.buffers() == [buf]
        assert (await c.stats()).strategy.allocations == before + 1  # the daemon saw one
    assert proxy.count("POST", "/v1/buffers", "proxy") == 2
    assert proxy.count("POST", "/v1/buffers", "daemon") == 1
    assert waited >= 1.0  # the first Retry-After (1 s) was honoured; the date's up to 1 s


async def test_the_deadline_is_honoured_when_503_goes_on(proxy: FaultProxy) -> None:
    proxy.always("POST", "/v1/buffers", problem_503("1"))
    async with SharedPoolClient(proxy.url, "patient") as c:
        t0 = time.monotonic()
        with pytest.raises(ApiError) as err:
            await c.allocate(4096, deadline=2.5)
        elapsed = time.monotonic() - t0
        assert err.value.status == 503 and err.value.name == "pool-exhausted"
        assert err.value.reason == "exhausted" and err.value.retry_after == 1.0
        assert err.value.attempts == 3  # at 0, 1 and 2 s; a wait to 3 s would pass 2.5 s
        assert 2.0 <= elapsed < 2.5
        # a deadline shorter than the wait asked for: no wait at all
        t0 = time.monotonic()
        with pytest.raises(ApiError) as err:
            await c.allocate(4096, deadline=0.5)
        assert err.value.attempts == 1 and time.monotonic() - t0 < 0.5
        # the policy's attempts bound it as well
        few = SharedPoolClient(proxy.url, "few", retry=RetryPolicy(attempts=2, max_wait=0.05))
        async with few:
            with pytest.raises(ApiError) as err:
                await few.allocate(4096)
            assert err.value.attempts == 2
    assert proxy.count("POST", "/v1/buffers", "daemon") == 0


async def test_no_retry_on_4xx(proxy: FaultProxy) -> None:
    async with SharedPoolClient(proxy.url, "final") as c:
        buf = await c.allocate(4096)
        await c.free(buf)
        with pytest.raises(ApiError) as err:
            await c.free(buf)
        assert (err.value.status, err.value.name, err.value.attempts) == (409, "double-free", 1)
        with pytest.raises(ApiError) as err:
            await c.allocate(1 << 30)  # beyond what one buffer may be: 400, final
        assert err.value.status == 400 and err.value.attempts == 1
    assert proxy.count("DELETE", f"/v1/buffers/{buf.id}") == 2
    assert proxy.count("POST", "/v1/buffers") == 2


async def test_registration_secret_is_sent_as_bearer(proxy: FaultProxy) -> None:
    async with SharedPoolClient(proxy.url, "secret", registration_secret="s3cret") as c:
        assert c.client_id and c.registration is not None
        assert "s3cret" not in repr(c.registration) and c.token not in repr(c.registration)
    (reg,) = [s for s in proxy.seen if s.path == "/v1/clients"]
    assert reg.headers["Authorization"] == "Bearer s3cret"


async def test_not_ready_at_registration_is_waited_for(proxy: FaultProxy) -> None:
    proxy.plan("POST", "/v1/clients", [problem_503("0", "not-ready")])
    async with SharedPoolClient(proxy.url, "early") as c:
        assert c.client_id is not None
    assert proxy.count("POST", "/v1/clients") == 2


# ---- errors ----------------------------------------------------------------------------------


async def test_a_stopped_daemon_is_daemon_unavailable(tmp_path: Path) -> None:
    d = Daemon(tmp_path, tcp=False)
    try:
        await d.wait_ready()
        async with SharedPoolClient(d.unix_url, "orphan") as c:
            buf = await c.allocate(4096)
            d.signal(signal.SIGTERM)
            assert d.wait() == 0
            with pytest.raises(DaemonUnavailable) as err:
                await c.get(buf.id)
            assert isinstance(err.value, ConnectionError)
            assert isinstance(err.value, SharedPoolError)
            assert not isinstance(err.value, aiohttp.ClientError)
            assert str(d.sock) in str(err.value)
            with pytest.raises(DaemonUnavailable):
                await c.allocate(4096)
        # leaving the block did not raise: the unregister that failed is only logged
        with pytest.raises(DaemonUnavailable):
            async with SharedPoolClient(d.unix_url, "late"):
                pass
        with pytest.raises(DaemonUnavailable):
            SyncSharedPoolClient(d.unix_url, "late").open()
    finally:
        d.stop()


def test_bad_use_is_told_at_once() -> None:
    with pytest.raises(ValueError, match="unix:PATH or http://HOST:PORT"):
        SharedPoolClient("/run/sharedpool.sock")
    with pytest.raises(ValueError, match="token"):
        SharedPoolClient("unix:/x", client_id="c-1")
    with pytest.raises(RuntimeError, match="not open"):
        SyncSharedPoolClient("unix:/x").allocate(4096)


# ---- buffer scopes ---------------------------------------------------------------------------


async def test_buffer_scope_frees_on_exit_exception_and_cancellation(daemon: Daemon) -> None:
    async with SharedPoolClient(daemon.unix_url, "scoped") as c:
        scope = c.buffer(16 << 20, purpose="recv")
        async with scope as buf:
            assert await c.buffers() == [buf] and buf.purpose == "recv"
        assert scope.result == FreeResult(buf.id, False, buf)
        assert await c.buffers() == []

        with pytest.raises(ZeroDivisionError):
            async with c.buffer(1 << 20, purpose="raises") as buf:
                _ = 1 / 0
        assert await c.buffers() == []
        with pytest.raises(ApiError) as err:
            await c.get(buf.id)
        assert err.value.status == 404

        inside = asyncio.Event()

        async def holder() -> None:
            async with c.buffer(4096, purpose="cancelled"):
                inside.set()
                await asyncio.sleep(60)

        task = asyncio.create_task(holder())
        await inside.wait()
        assert len(await c.buffers()) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await c.buffers() == []

        async with c.buffer(4096) as buf:  # freed by hand inside: fine
            await c.free(buf)


def test_sync_buffer_scope_frees_on_exception(daemon: Daemon) -> None:
    with SyncSharedPoolClient(daemon.unix_url, "sync-scoped") as pool:
        with pytest.raises(KeyError), pool.buffer(1 << 20, purpose="raises") as buf:
            assert pool.buffers() == [buf]
            raise KeyError("in the block")
        assert pool.buffers() == []
        stats = pool.stats()
        assert isinstance(stats, PoolStats) and stats.size_bytes >= stats.free_bytes > 0


# ---- va on the wire --------------------------------------------------------------------------


async def test_va_is_a_json_string(daemon: Daemon) -> None:
    async with SharedPoolClient(daemon.unix_url, "jq") as c:
        buf = await c.allocate(4096)
        raw = await c.request("GET", f"/v1/buffers/{buf.id}")
        assert isinstance(raw["va"], str) and raw["va"] == f"0x{buf.va:016x}"
        assert buf.va > 2**53  # a vmalloc address: a JSON number would lose its low bits
        listed = await c.request("GET", "/v1/buffers")
        freed = await c.request("DELETE", f"/v1/buffers/{buf.id}")
        assert listed[0]["va"] == freed["va"] == raw["va"]
        if shutil.which("jq"):
            out = subprocess.run(
                ["jq", "-r", ".va"], input=json.dumps(raw), capture_output=True, text=True
            )
            assert out.stdout.strip() == raw["va"]
            assert int(out.stdout, 16) == buf.va
        # retry=NO_RETRY is the protocol-level escape hatch: one request, its answer
        assert (await c.request("GET", "/v1/pool", retry=NO_RETRY))["daemon"]["clients"] >= 1


# ---- the simulator's RemoteClient stands on the library ------------------------------------


async def test_remote_client_uses_the_library_keepalive_and_retry(proxy: FaultProxy) -> None:
    from hv_netvsc_sim.client import PoolError, RemoteClient

    async with RemoteClient(proxy.url, "sim-nic", alloc_deadline=0.0) as now:
        proxy.plan("POST", "/v1/buffers", [problem_503("0")])
        with pytest.raises(PoolError) as err:  # deadline 0: the driver sees the refusal
            await now.allocate(4096, "recv")
        assert (err.value.reason, err.value.status) == ("exhausted", 503)
        assert now.stats.failure_reasons == {"exhausted": 1}
    async with RemoteClient(proxy.url, "sim-nic", alloc_deadline=5.0) as patient:
        proxy.plan("POST", "/v1/buffers", [problem_503("0"), problem_503("0")])
        buf = await patient.allocate(4096, "recv")  # waited through both
        assert patient.stats.failures == 0 and buf.owner == patient.client_id
        await asyncio.sleep(LEASE * 2.5)  # quiet: the library's keep-alive holds the lease
        assert await patient.free(buf.id) is False


async def test_remote_client_unreachable_daemon_is_a_pool_error() -> None:
    from hv_netvsc_sim.client import PoolError, RemoteClient

    with pytest.raises(PoolError) as err:
        async with RemoteClient("unix:/nonexistent/sharedpoold.sock"):
            pass
    assert err.value.reason == "unavailable" and "No such file" in str(err.value)
