"""The daemon's state: one strategy over one guest, the clients, and the journal that makes
both survive a restart.

Nothing here knows HTTP. Every state-changing call goes through :meth:`Service._record`:
apply it to the in-memory state, append ``(op, args, result)`` to the journal (in call
order: the event loop runs one call at a time and there is no ``await`` in between), and
the caller then awaits durability before answering (group commit: see daemon.journal).

Restore: the guest model is deterministic given its config and the exact sequence of
strategy calls, so the journal *is* the state: rebuild the guest from the stored config
(or load the last snapshot), replay every record after it, and check that each call gives
the result it gave the first time (same buffer id, owner, size, PFNs, va; same error;
same bytes grown). Any difference stops the daemon with an error: the state directory
then belongs to another model version, or was tampered with.

Maintenance passes that change nothing are journaled too, batched (``idle`` records):
``SharedPool.maintain(now)`` records `now` as the pool clock, which stamps later frees and
so decides later shrinks; replaying only the passes that changed something would not
reproduce that.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import pickle
import secrets
import shutil
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from daemon.config import Config
from daemon.journal import AsyncJournal, Journal
from pool.guest import FaultPlan, Guest, GuestConfig
from pool.registry import make_strategy
from pool.strategy import AllocationError, Buffer, NotOwner, Strategy, StrategyError, UnknownBuffer

log = logging.getLogger("sharedpoold")

SNAPSHOT_FORMAT = 1
IDLE_BATCH = 1000  # no-op maintenance passes per idle record


class NotReady(Exception):
    """The pool is still being built or restored (or the service has stopped)."""


class Unsupported(Exception):
    """The configured strategy has no such operation (grow/shrink on a vmalloc strategy)."""


class RestoreError(RuntimeError):
    """The state directory cannot be restored faithfully."""


class StateMismatch(RestoreError):
    """The state directory was written with other guest/pool/fault settings."""


@attrs.define
class Client:
    id: str
    name: str
    token_hash: str = attrs.field(repr=False)
    registered_at: float  # wall clock, informational
    last_seen: float = 0.0  # time.monotonic(); not persisted (a restart renews every lease)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class PoolClock:
    """The `now` given to the strategy: seconds, monotonic across restarts (it resumes from
    the last value the journal or snapshot holds)."""

    def __init__(self) -> None:
        self.base = 0.0
        self._t0 = time.monotonic()

    def observe(self, now: float) -> None:
        if now > self.base:
            self.base = now
            self._t0 = time.monotonic()

    def now(self) -> float:
        return self.base + (time.monotonic() - self._t0)


def _differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    keys = sorted(set(stored) | set(wanted))
    out = []
    for k in keys:
        a, b = stored.get(k), wanted.get(k)
        if a != b:
            if k == "guest.cost_profile":
                out.append(f"{k} (file content differs)")
            else:
                out.append(f"{k}: state has {a!r}, config has {b!r}")
    return out


class OpenCancelled(Exception):
    """open() was asked to stop (SIGTERM while building, aging or replaying)."""


class Service:
    """The strategy, its guest, the clients and the journal of one daemon."""

    def __init__(self, config: Config, *, reset_state: bool = False) -> None:
        self.config = config
        self.reset_state = reset_state
        self.state = "starting"  # starting -> ready -> stopping | failed
        self.error: str | None = None
        self.strategy: Strategy | None = None
        self.guest: Guest | None = None
        self.clients: dict[str, Client] = {}
        self._by_token: dict[str, str] = {}
        self.reclaimed_buffers = 0
        self.clock = PoolClock()
        self.journal: AsyncJournal | None = None
        self.snapshot_seq = 0
        self._idle: list[float] = []
        self.restore_info: dict[str, Any] = {}
        self.on_fatal: Callable[[BaseException], None] | None = None
        # observer of live allocations: (size, ok, wall seconds, modeled conversion seconds)
        self.alloc_observer: Callable[[int, bool, float, float], None] | None = None
        self._admin_token = config.admin_token.encode()
        # set from the event loop (SIGTERM during start-up); open() checks it between
        # aging steps and journal records and stops with OpenCancelled
        self.cancel_open = threading.Event()
        self.progress_log: Callable[[str, int, int], None] | None = None

    # ---- opening: build or restore (blocking; run in a thread) -------------------------

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def open(self) -> None:
        """Create or restore the state. Blocking (seconds): call it from a worker thread."""
        t0 = time.perf_counter()
        state_dir = self.config.state_dir
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        db_path = state_dir / "sharedpoold.db"
        if self.reset_state:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db_path}{suffix}").unlink(missing_ok=True)
        journal = Journal(db_path, self.config["daemon.synchronous"])
        try:
            wanted = self.config.state_config()
            stored = journal.get_meta("state_config")
            if stored is None:
                if journal.last_seq():
                    raise RestoreError(f"{db_path}: journal without a stored config")
                with journal._tx():
                    journal.set_meta("state_config", wanted)
            elif stored != wanted:
                diffs = "; ".join(_differences(stored, wanted))
                raise StateMismatch(
                    f"the state in {state_dir} was made with other guest/pool/fault settings "
                    f"({diffs}); use the same settings, another --state-dir, or --reset-state "
                    "to discard it"
                )
            snap = journal.read_snapshot()
            if snap is not None:
                self._load_snapshot(*snap)
                source = f"snapshot at record {snap[0]}"
            else:
                self._build()
                source = "a fresh guest"
            replayed = 0
            for seq, op, args, expected in journal.records(self.snapshot_seq):
                if self.cancel_open.is_set():
                    raise OpenCancelled("stopped while replaying the journal")
                got = self._apply(op, args)
                if got != expected:
                    raise RestoreError(
                        f"journal record {seq} ({op} {args}) replays as {got}, "
                        f"but was {expected}: the state cannot be rebuilt"
                    )
                replayed += 1
            self.check_invariants()
            self.journal = AsyncJournal(journal, journal.last_seq())
        except BaseException:
            journal.close()
            raise
        now = time.monotonic()
        for client in self.clients.values():
            client.last_seen = now  # every lease starts afresh after a restart
        self.restore_info = {
            "source": source,
            "replayed_records": replayed,
            "seconds": round(time.perf_counter() - t0, 3),
            "buffers": len(self.strategy.buffers()) if self.strategy else 0,
            "clients": len(self.clients),
        }
        self.state = "ready"

    def _build(self) -> None:
        c = self.config
        faults = FaultPlan(
            failure_rate=c["faults.failure_rate"],
            fail_calls=frozenset(c["faults.fail_calls"]),
            retry_rate=c["faults.retry_rate"],
            direction=c["faults.direction"],
            seed=c["faults.seed"],
        )
        guest = Guest(
            GuestConfig(
                memory_bytes=c["guest.memory"],
                platform=c["guest.platform"],
                seed=c["guest.seed"],
                cost_profile=c["guest.cost_profile"] or None,
                faults=faults,
            )
        )
        options: dict[str, Any] = {}
        if c["pool.strategy"] in ("pool", "pool-boot"):
            options = dict(
                initial_bytes=c["pool.initial"],
                max_bytes=c["pool.max"],
                low_watermark_bytes=c["pool.low_watermark"],
                high_watermark_bytes=c["pool.high_watermark"],
                grow_step_bytes=c["pool.grow_step"],
                shrink_hysteresis_seconds=c["pool.shrink_hysteresis"],
                max_buffer_bytes=c["pool.max_buffer"],
            )
            if c["pool.boot_reserve"] or c["pool.strategy"] == "pool":
                options["boot_reserve_bytes"] = c["pool.boot_reserve"]
        strategy = make_strategy(c["pool.strategy"], guest, **options)
        strategy.boot()
        guest.age(c["guest.age_steps"], self._aging_progress)
        strategy.setup()
        self.strategy, self.guest = strategy, guest

    def _aging_progress(self, done: int, total: int) -> None:
        """Called about every 1 % of the start-up aging: stop promptly on SIGTERM, and let
        the operator see that a long start is making progress."""
        if self.cancel_open.is_set():
            raise OpenCancelled("stopped while aging the guest")
        if self.progress_log is not None:
            self.progress_log("aging the guest", done, total)

    def _load_snapshot(self, seq: int, data: bytes) -> None:
        # The snapshot is written by this daemon into its own 0700 state directory.
        state = pickle.loads(zlib.decompress(data))
        if state.get("format") != SNAPSHOT_FORMAT or state.get("seq") != seq:
            raise RestoreError(
                f"snapshot format {state.get('format')} / seq {state.get('seq')} "
                f"not understood (expected format {SNAPSHOT_FORMAT}, seq {seq})"
            )
        self.strategy = state["strategy"]
        self.guest = self.strategy.guest if self.strategy is not None else None
        for cid, name, th, at in state["clients"]:
            self._add_client(Client(cid, name, th, at))
        self.reclaimed_buffers = state["reclaimed"]
        self.clock.observe(state["clock"])
        self.snapshot_seq = seq

    # ---- the one path for state changes ------------------------------------------------

    def _add_client(self, client: Client) -> None:
        self.clients[client.id] = client
        self._by_token[client.token_hash] = client.id

    def _drop_client(self, cid: str, reclaim: bool) -> dict[str, Any]:
        assert self.strategy is not None
        client = self.clients.pop(cid)
        self._by_token.pop(client.token_hash, None)
        freed, leaked = [], []
        for buf in self.strategy.buffers(cid):
            result = self.strategy.free(buf.id, cid)
            freed.append(buf.id)
            if result.leaked:
                leaked.append(buf.id)
        if reclaim:
            self.reclaimed_buffers += len(freed)
        return {"freed": freed, "leaked": leaked}

    def _apply(self, op: str, a: dict[str, Any]) -> Any:
        """Apply one journaled operation; the result is what the journal stores."""
        s = self.strategy
        assert s is not None
        if op == "allocate":
            try:
                return s.allocate(a["size"], a["owner"], a["purpose"]).as_json()
            except AllocationError as err:
                return {"error": err.reason, "message": str(err)}
        if op == "free":
            return {"leaked": s.free(a["id"], a["owner"]).leaked}
        if op == "register":
            self._add_client(Client(a["id"], a["name"], a["token_sha256"], a["at"]))
            return {}
        if op in ("unregister", "expire"):
            return self._drop_client(a["id"], reclaim=op == "expire")
        if op == "grow":
            return {"bytes": s.grow(a["bytes"])}  # type: ignore[attr-defined]
        if op == "shrink":
            self.clock.observe(a["now"])
            return {"bytes": s.shrink(a["now"], a["force"])}  # type: ignore[attr-defined]
        if op == "maintain":
            self.clock.observe(a["now"])
            return {"changed": s.maintain(a["now"])}
        if op == "idle":
            changed = False
            for now in a["nows"]:
                changed |= s.maintain(now)
            self.clock.observe(a["nows"][-1])
            return {"changed": changed}
        raise RestoreError(f"unknown journal operation {op!r}")

    def _require_ready(self) -> AsyncJournal:
        if self.state != "ready" or self.journal is None:
            raise NotReady(self.state)
        return self.journal

    def _record(self, op: str, args: dict[str, Any]) -> Any:
        journal = self._require_ready()
        if self._idle:
            self._flush_idle()
        try:
            result = self._apply(op, args)
        except Exception as exc:
            if op == "free" and isinstance(exc, StrategyError):
                raise  # UnknownBuffer, NotOwner, DoubleFree: refused before any change
            self._fatal(exc)
            raise
        journal.append(op, args, result)
        return result

    def _flush_idle(self) -> None:
        assert self.journal is not None
        nows, self._idle = self._idle, []
        self.journal.append("idle", {"nows": nows}, {"changed": False})

    def _fatal(self, exc: BaseException) -> None:
        """The in-memory state may now differ from the journal: stop serving."""
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

    async def register(self, name: str) -> dict[str, Any]:
        cid = "c-" + secrets.token_hex(8)
        token = secrets.token_urlsafe(32)
        self._record(
            "register",
            {
                "id": cid,
                "name": name,
                "token_sha256": token_hash(token),
                "at": round(time.time(), 3),
            },
        )
        self.clients[cid].last_seen = time.monotonic()
        await self._durable()
        return {
            "client_id": cid,
            "token": token,
            "name": name,
            "lease_ttl_seconds": self.config["daemon.lease_ttl"],
        }

    def authenticate(self, token: str) -> Client | None:
        """The client holding `token`, its lease renewed; None if no live client holds it.
        The lookup is keyed by a hash of the token, and the final comparison is constant-time."""
        th = token_hash(token)
        cid = self._by_token.get(th)
        if cid is None:
            return None
        client = self.clients.get(cid)
        if client is None or not hmac.compare_digest(client.token_hash, th):
            return None
        client.last_seen = time.monotonic()
        return client

    def is_admin_token(self, token: str) -> bool:
        return bool(self._admin_token) and hmac.compare_digest(
            token.encode("utf-8", "surrogatepass"), self._admin_token
        )

    def heartbeat(self, client: Client) -> dict[str, Any]:
        client.last_seen = time.monotonic()
        return {"client_id": client.id, "lease_ttl_seconds": self.config["daemon.lease_ttl"]}

    async def unregister(self, client: Client) -> dict[str, Any]:
        result = self._record("unregister", {"id": client.id})
        await self._durable()
        return {"client_id": client.id, **result}

    async def expire_leases(self) -> list[str]:
        """Expire the clients whose lease ran out; their buffers are reclaimed."""
        if not self.ready:
            return []
        ttl = self.config["daemon.lease_ttl"]
        now = time.monotonic()
        expired = [c for c in self.clients.values() if now - c.last_seen > ttl]
        for client in expired:
            result = self._record("expire", {"id": client.id})
            log.warning(
                "lease expired",
                extra={"client_id": client.id, "reclaimed_buffers": len(result["freed"])},
            )
        if expired:
            await self._durable()
        return [c.id for c in expired]

    # ---- buffers ---------------------------------------------------------------------

    async def allocate(self, client: Client, size: int, purpose: str) -> dict[str, Any]:
        guest = self.guest
        assert guest is not None
        t0 = time.perf_counter()
        m0 = guest.stats.modeled_conversion_seconds
        result = self._record("allocate", {"owner": client.id, "size": size, "purpose": purpose})
        if self.alloc_observer is not None:
            self.alloc_observer(
                size,
                "error" not in result,
                time.perf_counter() - t0,
                guest.stats.modeled_conversion_seconds - m0,
            )
        await self._durable()
        if "error" in result:
            raise AllocationError(result["error"], result["message"])
        return dict(result)

    async def free(self, client: Client, buffer_id: int) -> dict[str, Any]:
        self._require_ready()
        assert self.strategy is not None
        try:
            buf: Buffer | None = self.strategy.get(buffer_id)
        except UnknownBuffer:
            buf = None
        result = self._record("free", {"owner": client.id, "id": buffer_id})
        await self._durable()
        out = buf.as_json() if buf is not None else {"id": buffer_id}
        return {**out, "leaked": result["leaked"]}

    def get(self, client: Client, buffer_id: int) -> Buffer:
        self._require_ready()
        assert self.strategy is not None
        buf = self.strategy.get(buffer_id)
        if buf.owner != client.id:
            raise NotOwner(f"buffer {buffer_id} belongs to another client")
        return buf

    def buffers(self, client: Client) -> list[Buffer]:
        self._require_ready()
        assert self.strategy is not None
        return self.strategy.buffers(client.id)

    # ---- pool --------------------------------------------------------------------------

    def _has(self, name: str) -> bool:
        return callable(getattr(self.strategy, name, None))

    async def grow(self, nbytes: int) -> dict[str, Any]:
        self._require_ready()
        if not self._has("grow"):
            raise Unsupported(f"strategy {self.config['pool.strategy']} cannot grow")
        result = self._record("grow", {"bytes": nbytes})
        await self._durable()
        return {"grown_bytes": result["bytes"]}

    async def shrink(self, force: bool) -> dict[str, Any]:
        self._require_ready()
        if not self._has("shrink"):
            raise Unsupported(f"strategy {self.config['pool.strategy']} cannot shrink")
        result = self._record("shrink", {"now": self.clock.now(), "force": force})
        await self._durable()
        return {"released_bytes": result["bytes"]}

    async def maintain(self) -> bool:
        """One background pass (growth below the low watermark, shrink above the high one)."""
        if not self.ready:
            return False
        assert self.strategy is not None
        now = self.clock.now()
        try:
            changed = self.strategy.maintain(now)
        except Exception as exc:
            self._fatal(exc)
            raise
        self.clock.observe(now)
        if changed:
            if self._idle:
                self._flush_idle()
            assert self.journal is not None
            self.journal.append("maintain", {"now": now}, {"changed": True})
            await self._durable()
        else:
            self._idle.append(now)
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
        journal = self._require_ready()
        if self._idle:
            self._flush_idle()
        while journal.committed != journal.last_seq:
            await self._durable()
        # No await from here to the pickle: the state is exactly that of record `seq`.
        seq = journal.last_seq
        state = {
            "format": SNAPSHOT_FORMAT,
            "seq": seq,
            "strategy": self.strategy,
            "clients": [
                (c.id, c.name, c.token_hash, c.registered_at) for c in self.clients.values()
            ],
            "reclaimed": self.reclaimed_buffers,
            "clock": self.clock.now(),
        }
        blob = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)

        def write() -> None:
            journal.journal.write_snapshot(seq, zlib.compress(blob, 1))

        await journal.run(write)
        self.snapshot_seq = seq
        return seq

    async def close(self, snapshot: bool = True) -> None:
        """Persist (flush the journal, snapshot if anything changed) and close."""
        journal = self.journal
        if journal is None:
            self.state = "stopped"
            return
        if self.state == "ready":
            if self._idle:
                self._flush_idle()
            await self._durable()
            if snapshot and self.records_since_snapshot:
                await self.snapshot()
        self.state = "stopped"
        journal.close()
        self.journal = None

    # ---- reading ---------------------------------------------------------------------

    def check_invariants(self) -> dict[str, Any]:
        """Raise AssertionError unless the strategy, the guest and the daemon's own records
        agree: every buffer belongs to a registered client, no PFN is in two buffers."""
        assert self.strategy is not None and self.guest is not None
        self.strategy.check_invariants()
        self.guest.check_invariants()
        buffers = self.strategy.buffers()
        owners = {b.owner for b in buffers}
        unknown = owners - self.clients.keys()
        assert not unknown, f"buffers of unknown clients: {sorted(unknown)}"
        pfns: set[int] = set()
        total = 0
        for b in buffers:
            for start, n in b.runs():
                pfns.update(range(start, start + n))
                total += n
        assert len(pfns) == total, "a PFN is in two buffers"
        return {"ok": True, "buffers": len(buffers), "clients": len(self.clients), "pages": total}

    def pool_json(self) -> dict[str, Any]:
        self._require_ready()
        assert self.strategy is not None and self.guest is not None
        report = self.guest.report()
        counts = attrs.asdict(report.counts)
        return {
            "strategy": self.strategy.stats().as_json(),
            "guest": {
                "platform": self.guest.config.platform,
                "memory_bytes": self.guest.config.memory_bytes,
                "free_pages": report.free_pages,
                "direct_map_bytes": dict(report.direct_map_bytes),
                "hazard_pages": {
                    **report.hazards.as_json(),
                    "unknown_state": report.hazards.unknown_state_pages,
                },
                "counts": counts,
                "zones": [
                    {
                        "name": z.name,
                        "nr_free": list(z.nr_free),
                        "fragmentation_index": list(z.fragmentation_index),
                        "unusable_free_index": list(z.unusable_free_index),
                    }
                    for z in report.zones
                ],
            },
            "daemon": {
                "clients": len(self.clients),
                "buffers": len(self.strategy.buffers()),
                "reclaimed_buffers": self.reclaimed_buffers,
                "journal_seq": self.journal.last_seq if self.journal else 0,
                "snapshot_seq": self.snapshot_seq,
            },
        }


def remove_state(state_dir: Path) -> None:
    """Delete the daemon's files in `state_dir` (for --reset-state in tools and tests)."""
    for name in os.listdir(state_dir) if state_dir.exists() else []:
        if name.startswith("sharedpoold.db"):
            p = state_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
