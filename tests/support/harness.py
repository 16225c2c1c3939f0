"""Shared helpers for the reliability tests (tests/test_reliability_*.py) and the load and
soak benchmarks (bench/load.py, bench/soak.py): a spawned daemon with extra settings, a
client worker that keeps an exact record of what the daemon acknowledged, the check that a
restarted daemon still holds every acknowledged buffer, and /proc sampling.

No tests here. The spawned daemon itself is tests/support/daemons.Daemon (the small
pristine guest of SMALL, a temporary Unix socket and 127.0.0.1:0); this module only adds
a TOML file for the settings that have no flag.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from daemon.client import (
    NO_RETRY,
    ApiError,
    Buffer,
    DaemonUnavailable,
    SharedPoolClient,
    register_client,
)
from support.daemons import ADMIN_TOKEN, ROOT, SMALL, Daemon

__all__ = [
    "ADMIN_TOKEN",
    "CONNECTION_ERRORS",
    "DESIGNED_503",
    "ROOT",
    "SIZES",
    "SMALL",
    "ClientState",
    "Daemon",
    "LoadStats",
    "client_worker",
    "percentile",
    "proc_fds",
    "proc_rss_kb",
    "spawn",
    "verify_restored",
    "write_toml",
]

# The 503s the API is designed to give under load: no memory for this request now, or
# the conversion failed and its pages were leaked. Anything else is an error.
DESIGNED_503 = frozenset({"pool-exhausted", "conversion-failed"})

# hv_netvsc-like request sizes and weights: VMBus rings, the send buffer, receive buffers.
SIZES: tuple[tuple[int, int], ...] = (
    (64 << 10, 4),
    (256 << 10, 3),
    (6144, 2),
    (1 << 20, 2),
    (4 << 20, 1),
    (16 << 20, 1),
)

# Errors that mean the daemon went away (killed) while a request was in flight: the client
# library raises DaemonUnavailable (a ConnectionError) for all of them.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (DaemonUnavailable,)


def write_toml(path: Path, daemon: Mapping[str, Any]) -> Path:
    """A config file with a [daemon] table (settings without a flag: snapshot_min_records,
    admin_unix_peer, ...)."""
    lines = ["[daemon]"]
    for key, value in daemon.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = f'"{value}"'
        else:
            text = repr(value)
        lines.append(f"{key} = {text}")
    path.write_text("\n".join(lines) + "\n")
    return path


def spawn(tmp: Path, *args: str, daemon_toml: Mapping[str, Any] | None = None, **kw: Any) -> Daemon:
    """support.daemons.Daemon, with an optional [daemon] TOML file. Flags given in `args`
    override SMALL's (argparse keeps the last)."""
    tmp.mkdir(parents=True, exist_ok=True)
    extra: list[str] = []
    if daemon_toml:
        cfg = write_toml(tmp / f"daemon-{time.monotonic_ns()}.toml", daemon_toml)
        extra = ["--config", str(cfg)]
    return Daemon(tmp, *extra, *args, **kw)


# ---- the client side of a load run ---------------------------------------------------------


@attrs.define
class ClientState:
    """What one client knows the daemon acknowledged. `live`: buffers whose allocation was
    answered 201 and whose free was not answered; `pending_alloc`: allocations sent and never
    answered (the daemon died); `pending_free`: frees sent and never answered; `freed`: ids
    whose free was answered."""

    name: str
    client_id: str = ""
    token: str = ""
    live: dict[int, Buffer] = attrs.Factory(dict)
    pending_alloc: int = 0
    pending_free: set[int] = attrs.Factory(set)
    freed: set[int] = attrs.Factory(set)
    ever: set[int] = attrs.Factory(set)  # every id this client was ever given


@attrs.define
class LoadStats:
    """Counters and latencies of a load run, summed over its clients."""

    allocations: int = 0
    frees: int = 0
    leaked_frees: int = 0
    designed_503: Counter[str] = attrs.Factory(Counter)
    errors: list[str] = attrs.Factory(list)  # anything that is not a designed answer
    disconnects: int = 0
    alloc_latency: list[float] = attrs.Factory(list)  # seconds, answered allocations (any status)
    free_latency: list[float] = attrs.Factory(list)
    other_requests: int = 0

    def merge(self, other: LoadStats) -> None:
        self.allocations += other.allocations
        self.frees += other.frees
        self.leaked_frees += other.leaked_frees
        self.designed_503.update(other.designed_503)
        self.errors += other.errors
        self.disconnects += other.disconnects
        self.alloc_latency += other.alloc_latency
        self.free_latency += other.free_latency
        self.other_requests += other.other_requests


def percentile(values: Iterable[float], p: float) -> float:
    """Nearest-rank percentile (p in [0, 100]); 0.0 for no values."""
    xs = sorted(values)
    if not xs:
        return 0.0
    k = max(0, min(len(xs) - 1, int(-(-p * len(xs) // 100)) - 1))
    return xs[k]


def _designed(exc: ApiError, stats: LoadStats, what: str) -> None:
    """Count a designed 503 (pool-exhausted, conversion-failed, with Retry-After and a problem
    body), record anything else as an error."""
    if exc.status == 503 and exc.name in DESIGNED_503:
        if exc.retry_after is None or exc.body.get("status") != 503:
            stats.errors.append(f"{what}: 503 without Retry-After or problem body: {exc.body}")
        stats.designed_503[exc.name] += 1
    else:
        stats.errors.append(f"{what}: {exc.status} {exc.name}: {exc.detail}")


async def client_worker(
    url: str,
    state: ClientState,
    stats: LoadStats,
    *,
    cycles: int,
    rng: random.Random,
    keep: int = 3,
    sizes: tuple[tuple[int, int], ...] = SIZES,
    extras: bool = False,
    stop: asyncio.Event | None = None,
    timeout: float = 30.0,
) -> None:
    """Up to `cycles` requests of one client: allocate while it holds fewer than `keep`
    buffers (60 % of the time), else free one of its buffers. Registers first unless
    `state.token` is set (a client carrying on after a restart). `extras`: also list, get,
    heartbeat and read the pool stats now and then. Stops early when `stop` is set or the
    daemon goes away (the request in flight is then left pending in `state`)."""
    weights = [w for _, w in sizes]
    values = [s for s, _ in sizes]
    try:
        if not state.token:
            # registered by hand, not by the client's context: the registration must outlive
            # this worker (a crash test's next life carries on with the token)
            reg = await register_client(url, state.name, timeout=timeout, retry=NO_RETRY)
            state.client_id, state.token = reg.client_id, reg.token
        # no retry: every request is one acknowledged answer (or one in flight) in the record
        async with SharedPoolClient(
            url, token=state.token, client_id=state.client_id, timeout=timeout, retry=NO_RETRY
        ) as c:
            for _ in range(cycles):
                if stop is not None and stop.is_set():
                    return
                if state.live and (len(state.live) >= keep or rng.random() < 0.4):
                    bid = rng.choice(sorted(state.live))
                    state.pending_free.add(bid)
                    t0 = time.perf_counter()
                    try:
                        res = await c.free(bid)
                    except ApiError as exc:
                        state.pending_free.discard(bid)
                        stats.errors.append(f"free {bid}: {exc.status} {exc.name}")
                        continue
                    stats.free_latency.append(time.perf_counter() - t0)
                    state.pending_free.discard(bid)
                    del state.live[bid]
                    state.freed.add(bid)
                    stats.frees += 1
                    stats.leaked_frees += res.leaked
                else:
                    size = rng.choices(values, weights)[0]
                    state.pending_alloc += 1
                    t0 = time.perf_counter()
                    try:
                        buf = await c.allocate(size, purpose=state.name)
                    except ApiError as exc:
                        state.pending_alloc -= 1
                        stats.alloc_latency.append(time.perf_counter() - t0)
                        _designed(exc, stats, f"allocate {size}")
                        continue
                    stats.alloc_latency.append(time.perf_counter() - t0)
                    state.pending_alloc -= 1
                    if buf.id in state.ever:
                        stats.errors.append(f"buffer id {buf.id} given twice")
                    state.ever.add(buf.id)
                    state.live[buf.id] = buf
                    stats.allocations += 1
                if extras and rng.random() < 0.1:
                    await _extra(c, state, stats, rng)
    except CONNECTION_ERRORS:
        stats.disconnects += 1


async def _extra(
    c: SharedPoolClient, state: ClientState, stats: LoadStats, rng: random.Random
) -> None:
    pick = rng.randrange(4)
    stats.other_requests += 1
    if pick == 0:
        await c.heartbeat()
    elif pick == 1:
        listed = {b.id for b in await c.buffers()}
        if not set(state.live) <= listed:
            stats.errors.append(f"list misses acknowledged buffers {set(state.live) - listed}")
    elif pick == 2 and state.live:
        bid = rng.choice(sorted(state.live))
        if await c.get(bid) != state.live[bid]:
            stats.errors.append(f"get {bid} differs from its allocation")
    else:
        await c.stats()


# ---- after a crash -------------------------------------------------------------------------


def _pfns(buf: Buffer) -> set[int]:
    return {p for r in buf.ranges for p in range(r.start, r.start + r.npages)}


async def verify_restored(url: str, states: list[ClientState]) -> dict[str, int]:
    """Check a restarted daemon against what its clients were told before it died, then
    adopt its view (the answers lost in the crash) so that the clients can carry on.

    - every acknowledged, not acknowledged-freed buffer is listed and read back with the same
      id, owner, size, purpose, PFN ranges and va (a free in flight may have happened);
    - no acknowledged free is undone; an extra buffer is only possible for an allocation
      in flight, at most one per such request;
    - no id is listed twice and no PFN is in two buffers, across all clients;
    - the daemon's own invariants hold, and it holds exactly the buffers listed.
    """
    seen_pfns: set[int] = set()
    seen_ids: set[int] = set()
    totals = {"buffers": 0, "lost_in_flight_allocs": 0, "applied_in_flight_allocs": 0}
    for st in states:
        if not st.token:
            continue  # its registration was never answered
        async with SharedPoolClient(url, token=st.token, client_id=st.client_id) as c:
            listed = await c.buffers()
            ids = [b.id for b in listed]
            assert len(ids) == len(set(ids)), f"{st.name}: an id listed twice: {ids}"
            by_id = {b.id: b for b in listed}
            for bid, buf in st.live.items():
                if bid in st.pending_free and bid not in by_id:
                    continue  # the free in flight was applied before the crash
                assert bid in by_id, f"{st.name}: acknowledged buffer {bid} lost"
                assert by_id[bid] == buf, f"{st.name}: buffer {bid} changed: {by_id[bid]} != {buf}"
                assert await c.get(bid) == buf
            undone = st.freed & set(by_id)
            assert not undone, f"{st.name}: acknowledged frees undone: {undone}"
            extra = set(by_id) - set(st.live)
            assert len(extra) <= st.pending_alloc, (
                f"{st.name}: unexplained buffers {extra} (allocations in flight: "
                f"{st.pending_alloc})"
            )
            for bid in extra:
                assert bid not in st.ever, f"{st.name}: id {bid} reused"
                assert by_id[bid].owner == st.client_id
            assert not seen_ids & set(ids), (
                f"{st.name}: ids of another client: {seen_ids & set(ids)}"
            )
            seen_ids |= set(ids)
            for buf in listed:
                pfns = _pfns(buf)
                assert not pfns & seen_pfns, f"{st.name}: buffer {buf.id} shares PFNs"
                seen_pfns |= pfns
            totals["buffers"] += len(listed)
            totals["applied_in_flight_allocs"] += len(extra)
            totals["lost_in_flight_allocs"] += st.pending_alloc - len(extra)
            # adopt the daemon's view
            st.live = by_id
            st.ever |= set(by_id)
            st.freed |= st.pending_free - set(by_id)
            st.pending_free.clear()
            st.pending_alloc = 0
    async with SharedPoolClient(url, token=ADMIN_TOKEN) as admin:
        inv = await admin.invariants()
        assert inv["ok"], inv
        assert inv["buffers"] == totals["buffers"], (inv, totals)
        assert inv["pages"] == len(seen_pfns)
    return totals


# ---- /proc -----------------------------------------------------------------------------------


def proc_rss_kb(pid: int) -> int:
    """VmRSS of a process, in kB (from /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def proc_fds(pid: int) -> int:
    """Open file descriptors of a process (entries of /proc/PID/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))
