"""The service: the daemon's state (daemon.state) behind its journal, one call at a time.

Nothing here knows HTTP, and nothing here builds JSON: every method returns pool or daemon
values (a Buffer, a FreeResult, a Registration, bytes grown, a PoolView ...), which
daemon.api serialises. Every state-changing call is one typed command (daemon.state)
going through :meth:`Service._record`: execute it on the in-memory state, append
``(op, args, result)`` to the journal (in call order: the event loop runs one call at a
time and there is no ``await`` in between), and the caller then awaits durability before
answering (group commit: see daemon.journal).

Module map: `clients` (tokens and leases), `state` (the state, its commands, build and
restore), `snapshot` (the snapshot format), `views` (read views), `engine` (this: the
journal's ordering and durability, readiness, the fatal path).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs

from daemon.clients import AdminCredential, Client, Clients, token_hash
from daemon.config import Config
from daemon.forksnap import ForkFailed, encode_forked
from daemon.journal import AsyncJournal, Journal, JournalError, is_storage_full
from daemon.position import POSITION_NAME, Position, PositionFile
from daemon.quotas import QuotaExceeded, Quotas
from daemon.snapshot import Prepared
from daemon.state import (
    Allocate,
    ClientGone,
    Command,
    DaemonState,
    Dropped,
    Expire,
    Free,
    Grow,
    Idle,
    InvariantReport,
    Maintain,
    OpenCancelled,
    PoolClock,
    Register,
    RestoreError,
    Shrink,
    StateMismatch,
    Unregister,
    Unsupported,
    differences,
    restore,
)
from daemon.statedir import held_lock_fd
from daemon.views import PoolView, memory_map_key, memory_map_view, pool_view
from pool.guest import Guest
from pool.guest.units import PAGE_SIZE, format_size
from pool.shared import SharedPool
from pool.strategy import AllocationError, Buffer, FreeResult, NotOwner, Strategy, StrategyError

__all__ = [
    "IDLE_BATCH",
    "Client",
    "ClientGone",
    "NotReady",
    "OpenCancelled",
    "QuotaExceeded",
    "Registration",
    "RestoreError",
    "Rollback",
    "Service",
    "StateMismatch",
    "StorageFull",
    "Unsupported",
    "differences",
    "remove_state",
]

log = logging.getLogger("sharedpoold")

IDLE_BATCH = 1000  # no-op maintenance passes per idle record
R = TypeVar("R")


class NotReady(Exception):
    """The pool is still being built or restored (or the service has stopped)."""


class StorageFull(Exception):
    """The journal cannot be written (the disk is full): changes are refused until space
    returns; reads are served."""


class Rollback(RestoreError):
    """The journal is behind, or other than, what the daemon acknowledged."""


EXPIRY_BATCH_BUFFERS = 2048  # buffers reclaimed between two yields to the event loop


@attrs.frozen
class Registration:
    """A new client: its id, its token (shown once, stored only as a hash), its lease."""

    client_id: str
    token: str = attrs.field(repr=False)
    name: str
    lease_ttl_seconds: float


class Service:
    """The state of one daemon behind its journal."""

    def __init__(
        self, config: Config, *, reset_state: bool = False, accept_rollback: bool = False
    ) -> None:
        self.config = config
        self.reset_state = reset_state
        self.accept_rollback = accept_rollback
        self.quotas = Quotas(
            config["daemon.max_clients"],
            config["daemon.client_max_buffers"],
            config.client_max_bytes,
        )
        self.state = "starting"  # starting -> ready -> stopping | failed | stopped
        self.error: str | None = None
        self._ds: DaemonState | None = None
        self.journal: AsyncJournal | None = None
        self.snapshot_seq = 0
        self._idle: list[float] = []
        self.restore_info: dict[str, Any] = {}
        self.on_fatal: Callable[[BaseException], None] | None = None
        # observer of live allocations: (size, ok, wall seconds, modeled conversion seconds)
        self.alloc_observer: Callable[[int, bool, float, float], None] | None = None
        self._admin = AdminCredential(config.admin_token)
        # set from the event loop (SIGTERM during start-up); open() checks it between
        # aging steps and journal records and stops with OpenCancelled
        self.cancel_open = threading.Event()
        self.progress_log: Callable[[str, int, int], None] | None = None
        # GET /v1/memory-map's last answer per encoding, valid while its key holds
        self._map_cache: tuple[tuple[int, ...], dict[str, bytes]] = ((), {})

    # ---- the state, for readers (metrics, tests) ------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def strategy(self) -> Strategy | None:
        return None if self._ds is None else self._ds.strategy

    @property
    def guest(self) -> Guest | None:
        return None if self._ds is None else self._ds.guest

    @property
    def clients(self) -> Clients:
        return Clients() if self._ds is None else self._ds.clients

    @property
    def reclaimed_buffers(self) -> int:
        return 0 if self._ds is None else self._ds.reclaimed_buffers

    @property
    def clock(self) -> PoolClock:
        return self._live().clock

    def _live(self) -> DaemonState:
        if self._ds is None:
            raise NotReady(self.state)
        return self._ds

    # ---- opening: build or restore (blocking; run in a thread) -------------------------

    def open(self) -> None:
        """Create or restore the state. Blocking (seconds): call it from a worker thread."""
        t0 = time.perf_counter()
        state_dir = self.config.state_dir
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        db_path = state_dir / "sharedpoold.db"
        if self.reset_state:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db_path}{suffix}").unlink(missing_ok=True)
            (state_dir / POSITION_NAME).unlink(missing_ok=True)
        journal = Journal(db_path, self.config["daemon.synchronous"])
        position = None
        try:
            position = PositionFile(
                state_dir / POSITION_NAME, sync=self.config["daemon.synchronous"] == "full"
            )
            self._check_rollback(journal, position)
            restored = restore(
                self.config,
                journal,
                progress=self._aging_progress,
                cancelled=self.cancel_open.is_set,
            )
            here = Position(journal.last_seq(), journal.last_chain)
            if position.read() != here:
                position.write(here)  # first start, or a rollback the operator accepted
            self.journal = AsyncJournal(
                journal, journal.last_seq(), position, lock_fd=held_lock_fd(state_dir)
            )
        except BaseException:
            journal.close()
            if position is not None:
                position.close()
            raise
        state = restored.state
        state.clients.renew_all(time.monotonic())  # every lease starts afresh after a restart
        self._ds = state
        self.snapshot_seq = restored.snapshot_seq
        self.restore_info = {
            "source": restored.source,
            "replayed_records": restored.replayed,
            "seconds": round(time.perf_counter() - t0, 3),
            "buffers": len(state.strategy.buffers()),
            "clients": len(state.clients),
        }
        self._warn_shortfall(state.strategy)
        self.state = "ready"

    def _warn_shortfall(self, strategy: Strategy) -> None:
        """Say at start when the pool could not be filled: the daemon is ready, but every
        allocation it cannot serve from what it holds fails with no_memory."""
        if isinstance(strategy, SharedPool) and strategy.shortfall_bytes:
            log.warning(
                "the pool holds %s of its initial %s: the guest's page allocator has no free "
                "block of a chunk's order (2 MiB or more) left, so allocations beyond what it "
                "holds fail with no_memory; pool-boot takes its memory at boot instead",
                format_size(strategy.size_pages * PAGE_SIZE),
                format_size(strategy.initial_bytes),
                extra={"shortfall_bytes": strategy.shortfall_bytes},
            )

    def _check_rollback(self, journal: Journal, position: PositionFile) -> None:
        """Refuse a journal shorter than, or different from, what was acknowledged (a lost,
        truncated or damaged WAL; an old copy of the database) unless --accept-rollback."""
        problem = journal.rollback_from(position.read())
        if problem is None:
            return
        if not self.accept_rollback:
            raise Rollback(
                f"{journal.path}: {problem}; refusing to start with a state older than the "
                "one acknowledged to clients (restore the database and its -wal file, or "
                "start with --accept-rollback to accept the loss)"
            )
        log.warning("rollback accepted (--accept-rollback): %s", problem)
        self.restore_info["rollback_accepted"] = problem

    def _aging_progress(self, what: str, done: int, total: int) -> None:
        """Called about every 1 % of the start-up aging: stop promptly on SIGTERM, and let
        the operator see that a long start is making progress."""
        if self.cancel_open.is_set():
            raise OpenCancelled("stopped while aging the guest")
        if self.progress_log is not None:
            self.progress_log("aging the guest", done, total)

    # ---- the one path for state changes ------------------------------------------------

    def _require_ready(self) -> tuple[DaemonState, AsyncJournal]:
        if self.state != "ready" or self.journal is None or self._ds is None:
            raise NotReady(self.state)
        return self._ds, self.journal

    @property
    def storage_full(self) -> bool:
        return self.journal is not None and self.journal.full

    def _record(self, command: Command[R]) -> R:
        state, journal = self._require_ready()
        if journal.full:
            raise StorageFull("the disk is full: changes are refused until space returns")
        if self._idle:
            self._flush_idle()
        try:
            outcome = state.execute(command)
        except (StrategyError, Unsupported, ClientGone):
            raise  # refused before any change (UnknownBuffer, NotOwner, DoubleFree, ...)
        except Exception as exc:
            self._fatal(exc)
            raise
        journal.append(command.op, command.args(), command.result(outcome))
        return outcome

    def _flush_idle(self) -> None:
        assert self.journal is not None
        idle = Idle(self._idle)
        self._idle = []
        self.journal.append(idle.op, idle.args(), idle.result(False))

    def _fatal(self, exc: BaseException) -> None:
        """The in-memory state may now differ from the journal: stop serving. A journal
        that cannot be written is the machine's failure, not the daemon's: one line, no
        traceback; anything else is a bug, logged with its traceback."""
        if isinstance(exc, JournalError):
            log.critical("fatal error, the daemon stops: %s", exc)
        else:
            log.critical("fatal error, the daemon stops: %r", exc, exc_info=exc)
        self.state = "failed"
        self.error = repr(exc)
        if self.on_fatal is not None:
            self.on_fatal(exc)

    async def _durable(self) -> None:
        assert self.journal is not None
        try:
            await self.journal.sync()
        except Exception as exc:
            if self.state != "failed":
                self._fatal(exc)
            raise NotReady("failed") from exc

    # ---- clients ---------------------------------------------------------------------

    def apply_limits(self, config: Config) -> None:
        """SIGHUP: the quotas of a re-read configuration, from now on."""
        self.quotas.max_clients = config["daemon.max_clients"]
        self.quotas.client_max_buffers = config["daemon.client_max_buffers"]
        self.quotas.client_max_bytes = config.client_max_bytes

    async def register(self, name: str) -> Registration:
        self.quotas.check_register(len(self.clients))
        token = secrets.token_urlsafe(32)
        client = self._record(
            Register(
                id="c-" + secrets.token_hex(8),
                name=name,
                token_sha256=token_hash(token),
                at=round(time.time(), 3),
            )
        )
        client.last_seen = time.monotonic()
        await self._durable()
        return Registration(client.id, token, name, self.config["daemon.lease_ttl"])

    def authenticate(self, token: str) -> Client | None:
        """The client holding `token`, its lease renewed; None if no live client holds it."""
        return self.clients.authenticate(token, time.monotonic())

    def is_admin_token(self, token: str) -> bool:
        return self._admin.matches(token)

    def heartbeat(self, client: Client) -> float:
        """Renew the client's lease; returns the lease's length in seconds."""
        client.last_seen = time.monotonic()
        return float(self.config["daemon.lease_ttl"])

    async def unregister(self, client: Client) -> Dropped:
        dropped = self._record(Unregister(client.id))
        await self._durable()
        return dropped

    async def expire_leases(self) -> list[str]:
        """Expire the clients whose lease ran out; their buffers are reclaimed, in batches
        of about EXPIRY_BATCH_BUFFERS buffers between which the event loop runs (400
        clients of 650 buffers expiring together once froze it for 22 s). Nothing expires
        while the disk is full: the clients could not have been told."""
        if not self.ready or self.storage_full:
            return []
        expired = self.clients.expired(self.config["daemon.lease_ttl"], time.monotonic())
        done: list[str] = []
        batch = 0
        for client in expired:
            if client.id not in self.clients or not self.ready or self.storage_full:
                continue  # unregistered meanwhile, or stopping
            dropped = self._record(Expire(client.id))
            done.append(client.id)
            batch += len(dropped.freed) + 1
            log.warning(
                "lease expired",
                extra={"client_id": client.id, "reclaimed_buffers": len(dropped.freed)},
            )
            if batch >= EXPIRY_BATCH_BUFFERS:
                batch = 0
                await self._durable()  # yields to the loop while the batch is written
        if batch:
            await self._durable()
        return done

    # ---- buffers ---------------------------------------------------------------------

    async def allocate(self, client: Client, size: int, purpose: str) -> Buffer:
        """A buffer, or the strategy's AllocationError (its reason and message) once the
        refusal is durable: a refusal is journaled, as it counts in the strategy's stats."""
        state, _ = self._require_ready()
        if client.id not in state.clients:
            raise ClientGone(f"client {client.id} is not registered")
        ledger = state.strategy.ledger
        self.quotas.check_allocate(ledger.count(client.id), ledger.owner_bytes(client.id), size)
        guest = state.guest
        t0 = time.perf_counter()
        m0 = guest.stats.modeled_conversion_seconds
        outcome = self._record(Allocate(owner=client.id, size=size, purpose=purpose))
        if self.alloc_observer is not None:
            self.alloc_observer(
                size,
                isinstance(outcome, Buffer),
                time.perf_counter() - t0,
                guest.stats.modeled_conversion_seconds - m0,
            )
        await self._durable()
        if isinstance(outcome, AllocationError):
            raise outcome
        return outcome

    async def free(self, client: Client, buffer_id: int) -> FreeResult:
        result = self._record(Free(owner=client.id, id=buffer_id))
        await self._durable()
        return result

    def get(self, client: Client, buffer_id: int) -> Buffer:
        state, _ = self._require_ready()
        buf = state.strategy.get(buffer_id)
        if buf.owner != client.id:
            raise NotOwner(f"buffer {buffer_id} belongs to another client")
        return buf

    def buffers(self, client: Client) -> list[Buffer]:
        state, _ = self._require_ready()
        return state.strategy.buffers(client.id)

    # ---- pool --------------------------------------------------------------------------

    async def grow(self, nbytes: int) -> int:
        """Bytes added; Unsupported if the strategy is not Resizable."""
        grown = self._record(Grow(nbytes))
        await self._durable()
        return grown

    async def shrink(self, force: bool) -> int:
        """Bytes given back; Unsupported if the strategy is not Resizable."""
        state, _ = self._require_ready()
        released = self._record(Shrink(now=state.clock.now(), force=force))
        await self._durable()
        return released

    async def maintain(self) -> bool:
        """One background pass (growth below the low watermark, shrink above the high one).
        Passes that change nothing are batched into one `idle` record. None while the disk
        is full."""
        if not self.ready or self.storage_full:
            return False
        state, journal = self._require_ready()
        command = Maintain(state.clock.now())
        try:
            changed = state.execute(command)
        except Exception as exc:
            self._fatal(exc)
            raise
        if changed:
            if self._idle:
                self._flush_idle()
            journal.append(command.op, command.args(), command.result(changed))
            await self._durable()
        else:
            self._idle.append(command.now)
            if len(self._idle) >= IDLE_BATCH:
                self._flush_idle()
        return changed

    # ---- snapshots and shutdown ------------------------------------------------------

    @property
    def records_since_snapshot(self) -> int:
        return 0 if self.journal is None else self.journal.last_seq - self.snapshot_seq

    async def snapshot(self) -> int:
        """Write the whole state as of the last journal record, and drop the records it covers.
        Returns the record number it covers."""
        state, journal = self._require_ready()
        if journal.full:
            return self.snapshot_seq  # nothing can be written; the next interval retries
        if self._idle:
            self._flush_idle()
        while journal.committed != journal.last_seq:
            await self._durable()
        # No await from here to the fork (or the in-process walk): the state is exactly that
        # of record `seq`. A forked child walks its copy-on-write image (daemon.forksnap);
        # where it cannot, the walk runs here and the packing on the journal's worker thread.
        seq = journal.last_seq
        try:
            blob = await encode_forked(lambda: state.snapshot(seq).pack())
        except ForkFailed as exc:
            log.warning("snapshot encoded in-process (the event loop waits): %s", exc)
            prepared = state.snapshot(seq)
            blob = await journal.run(Prepared.pack, prepared)
        try:
            await journal.run(journal.journal.write_snapshot, seq, blob)
        except Exception as exc:
            if not is_storage_full(exc):
                raise
            log.warning("snapshot not written, the disk is full: %s", exc)
            return self.snapshot_seq
        self.snapshot_seq = seq
        return seq

    async def close(self, snapshot: bool = True) -> None:
        """Persist (flush the journal, snapshot if anything changed) and close."""
        journal = self.journal
        if journal is None:
            self.state = "stopped"
            return
        if self.state == "ready" and journal.full:
            log.error(
                "stopping with a full disk: %d records never acknowledged are not saved",
                journal.pending,
                extra={"state_dir": str(self.config.state_dir)},
            )
        elif self.state == "ready":
            if self._idle:
                self._flush_idle()
            await self._durable()
            if snapshot and self.records_since_snapshot:
                await self.snapshot()
        self.state = "stopped"
        journal.close()
        self.journal = None

    # ---- reading ---------------------------------------------------------------------

    def check_invariants(self) -> InvariantReport:
        """AssertionError unless the strategy, the guest and the daemon's own records agree
        (daemon.state.DaemonState.check_invariants)."""
        return self._live().check_invariants()

    def pool_view(self) -> PoolView:
        state, journal = self._require_ready()
        return pool_view(state, journal.last_seq, self.snapshot_seq)

    def memory_map_json(self, encoding: str) -> bytes:
        """GET /v1/memory-map's body (pool.memmap's JSON form). Computed on the event loop
        (a few ms at 64 GiB: bench/bench_memmap.py) and kept until the state changes, so
        a page refreshing every few seconds costs one computation per change, not per
        request."""
        state, journal = self._require_ready()
        key = memory_map_key(state, journal.last_seq)
        if self._map_cache[0] != key:
            self._map_cache = (key, {})
        cached = self._map_cache[1]
        if encoding not in cached:
            cached[encoding] = json.dumps(memory_map_view(state).encode(encoding)).encode()
        return cached[encoding]


def remove_state(state_dir: Path) -> None:
    """Delete the daemon's files in `state_dir` (for --reset-state in tools and tests)."""
    for name in os.listdir(state_dir) if state_dir.exists() else []:
        if name.startswith("sharedpoold.db"):
            p = state_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
