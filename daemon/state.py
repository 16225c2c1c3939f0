"""The daemon's state and the commands that change it; building it, and restoring it from
the journal.

State: one strategy over one guest (pool.provision), the registered clients
(daemon.clients), the count of buffers reclaimed from expired leases, and the pool clock.

Commands: every state change is one small typed command (`Allocate`, `Free`, `Register`,
...), dispatched by its journal name from `COMMANDS`. A command knows its journal form
(`op`, `args()`; `from_args` is the constructor) and how to write its outcome as the
journal's `result` (`result(outcome)`); `DaemonState.execute` runs it. The service
(daemon.engine) journals what it executed; `replay` executes every journaled command
again and checks that each gives the result it gave the first time (same buffer id,
owner, size, PFNs, va; same refusal; same bytes grown). The guest model is deterministic
given its config and the exact sequence of strategy calls, so the journal *is* the state.

A command that raises a StrategyError or Unsupported refused before changing anything (the
strategy's contract: pool.strategy); anything else it raises leaves the state unknown.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import attrs

from daemon import snapshot
from daemon.clients import Client, Clients
from daemon.config import Config
from daemon.journal import Journal
from pool.guest import FaultPlan, Guest, GuestConfig
from pool.provision import Guests, Progress, provision
from pool.registry import PoolSettings
from pool.strategy import AllocationError, Buffer, FreeResult, Resizable, Strategy

R = TypeVar("R")


class Unsupported(Exception):
    """The configured strategy has no such operation (grow/shrink on a vmalloc strategy)."""


class RestoreError(RuntimeError):
    """The state directory cannot be restored faithfully."""


class StateMismatch(RestoreError):
    """The state directory was written with other guest/pool/fault settings."""


class ClientGone(Exception):
    """The command names a client that is not registered (any more): refused before any
    change. An allocation whose client was unregistered, or expired, while its request
    body was still arriving would otherwise get a buffer nobody owns, which nothing can
    free and which fails the invariants at every restart."""


class OpenCancelled(Exception):
    """The build or restore was asked to stop (SIGTERM while building, aging or replaying)."""


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


@attrs.frozen
class Dropped:
    """A client's buffers freed when it unregistered or its lease expired (ids, in order),
    and those among them whose pages were leaked (re-encryption failed)."""

    freed: tuple[int, ...]
    leaked: tuple[int, ...]


@attrs.frozen
class InvariantReport:
    buffers: int
    clients: int
    pages: int  # pages held by live buffers (a page two sub-page buffers share counts twice)


class DaemonState:
    """One strategy (with its guest), the clients, the reclaimed count, the pool clock."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.clients = Clients()
        self.reclaimed_buffers = 0
        self.clock = PoolClock()

    @property
    def guest(self) -> Guest:
        return self.strategy.guest

    def execute(self, command: Command[R]) -> R:
        return command.apply(self)

    def drop_client(self, cid: str, reclaim: bool) -> Dropped:
        client = self.clients.drop(cid)
        freed, leaked = [], []
        for buf in self.strategy.buffers(client.id):
            result = self.strategy.free(buf.id, client.id)
            freed.append(buf.id)
            if result.leaked:
                leaked.append(buf.id)
        if reclaim:
            self.reclaimed_buffers += len(freed)
        return Dropped(tuple(freed), tuple(leaked))

    def resizable(self, what: str) -> Resizable:
        """The strategy as a Resizable one; Unsupported (nothing changed) if it is not."""
        if not isinstance(self.strategy, Resizable):
            raise Unsupported(f"strategy {self.strategy.name} cannot {what}")
        return self.strategy

    def check_invariants(self) -> InvariantReport:
        """Raise AssertionError unless the state is consistent: the strategy's own rules
        (strategy.check_invariants: which pages buffers may share, its sizes, its memory),
        the guest's, and what only the daemon knows - every buffer's owner is a registered
        client, and the clients' token index matches them."""
        self.strategy.check_invariants()
        self.guest.check_invariants()
        self.clients.check()
        buffers = self.strategy.buffers()
        unknown = {b.owner for b in buffers} - self.clients.keys()
        assert not unknown, f"buffers of unknown clients: {sorted(unknown)}"
        return InvariantReport(len(buffers), len(self.clients), sum(b.npages for b in buffers))

    # -- snapshots ----------------------------------------------------------------------
    def snapshot(self, seq: int) -> snapshot.Prepared:
        """The state as of record `seq`, walked into plain data (pack it to get the bytes)."""
        rows = tuple((c.id, c.name, c.token_hash, c.registered_at) for c in self.clients.values())
        return snapshot.prepare(
            snapshot.SnapshotContents(
                seq, self.strategy, rows, self.reclaimed_buffers, self.clock.now()
            )
        )

    @classmethod
    def from_snapshot(cls, seq: int, data: bytes) -> DaemonState:
        try:
            contents = snapshot.decode(seq, data)
        except snapshot.SnapshotError as exc:
            raise RestoreError(str(exc)) from None
        state = cls(contents.strategy)
        for cid, name, th, at in contents.clients:
            state.clients.add(Client(cid, name, th, at))
        state.reclaimed_buffers = contents.reclaimed
        state.clock.observe(contents.clock)
        return state


# ---- commands ------------------------------------------------------------------------------


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(a.name for a in attrs.fields(cls))
    return names


class Command(Generic[R]):
    """One journaled state change. Subclasses are frozen attrs classes whose fields are the
    journal's `args` (so ``cls(**args)`` rebuilds one)."""

    op: ClassVar[str]

    def args(self) -> dict[str, Any]:
        """The fields by name (what attrs.asdict gives for these flat classes, in a tenth of
        its time: every request builds one)."""
        return {name: getattr(self, name) for name in _field_names(type(self))}

    def apply(self, state: DaemonState) -> R:
        raise NotImplementedError

    def result(self, outcome: R) -> Any:
        """The outcome as the journal stores it (JSON), compared on replay."""
        raise NotImplementedError


@attrs.frozen
class Allocate(Command[Buffer | AllocationError]):
    """A refusal is an outcome too (journaled): it counts in the strategy's statistics."""

    op: ClassVar[str] = "allocate"
    owner: str
    size: int
    purpose: str

    def apply(self, state: DaemonState) -> Buffer | AllocationError:
        if self.owner not in state.clients:
            raise ClientGone(f"client {self.owner} is not registered")
        try:
            return state.strategy.allocate(self.size, self.owner, self.purpose)
        except AllocationError as err:
            return err

    def result(self, outcome: Buffer | AllocationError) -> Any:
        if isinstance(outcome, AllocationError):
            return {"error": outcome.reason, "message": str(outcome)}
        return outcome.as_json()


@attrs.frozen
class Free(Command[FreeResult]):
    op: ClassVar[str] = "free"
    owner: str
    id: int

    def apply(self, state: DaemonState) -> FreeResult:
        return state.strategy.free(self.id, self.owner)

    def result(self, outcome: FreeResult) -> Any:
        return {"leaked": outcome.leaked}


@attrs.frozen
class Register(Command[Client]):
    op: ClassVar[str] = "register"
    id: str
    name: str
    token_sha256: str
    at: float

    def apply(self, state: DaemonState) -> Client:
        client = Client(self.id, self.name, self.token_sha256, self.at)
        state.clients.add(client)
        return client

    def result(self, outcome: Client) -> Any:
        return {}


@attrs.frozen
class Unregister(Command[Dropped]):
    op: ClassVar[str] = "unregister"
    id: str

    def apply(self, state: DaemonState) -> Dropped:
        return state.drop_client(self.id, reclaim=False)

    def result(self, outcome: Dropped) -> Any:
        return {"freed": list(outcome.freed), "leaked": list(outcome.leaked)}


@attrs.frozen
class Expire(Unregister):
    """A lease ran out: like Unregister, and the freed buffers count as reclaimed."""

    op: ClassVar[str] = "expire"

    def apply(self, state: DaemonState) -> Dropped:
        return state.drop_client(self.id, reclaim=True)


@attrs.frozen
class Grow(Command[int]):
    op: ClassVar[str] = "grow"
    bytes: int

    def apply(self, state: DaemonState) -> int:
        return state.resizable("grow").grow(self.bytes)

    def result(self, outcome: int) -> Any:
        return {"bytes": outcome}


@attrs.frozen
class Shrink(Command[int]):
    op: ClassVar[str] = "shrink"
    now: float
    force: bool

    def apply(self, state: DaemonState) -> int:
        pool = state.resizable("shrink")
        state.clock.observe(self.now)
        return pool.shrink(self.now, self.force)

    def result(self, outcome: int) -> Any:
        return {"bytes": outcome}


@attrs.frozen
class Maintain(Command[bool]):
    """One background pass. Only passes that changed something get a record of their own:
    the others are batched into `Idle` records."""

    op: ClassVar[str] = "maintain"
    now: float

    def apply(self, state: DaemonState) -> bool:
        changed = state.strategy.maintain(self.now)
        state.clock.observe(self.now)
        return changed

    def result(self, outcome: bool) -> Any:
        return {"changed": outcome}


def _floats(values: Iterable[float]) -> tuple[float, ...]:
    return tuple(values)


@attrs.frozen
class Idle(Command[bool]):
    """Background passes that changed nothing, batched. They are journaled all the same:
    ``SharedPool.maintain(now)`` records `now` as the pool clock, which stamps later frees
    and so decides later shrinks; replaying only the passes that changed something would
    not reproduce that."""

    op: ClassVar[str] = "idle"
    nows: tuple[float, ...] = attrs.field(converter=_floats)

    def apply(self, state: DaemonState) -> bool:
        changed = False
        for now in self.nows:
            changed |= state.strategy.maintain(now)
        state.clock.observe(self.nows[-1])
        return changed

    def result(self, outcome: bool) -> Any:
        return {"changed": outcome}


COMMANDS: dict[str, type[Command[Any]]] = {
    c.op: c for c in (Allocate, Free, Register, Unregister, Expire, Grow, Shrink, Maintain, Idle)
}


def command_from_journal(op: str, args: Mapping[str, Any]) -> Command[Any]:
    cls = COMMANDS.get(op)
    if cls is None:
        raise RestoreError(f"unknown journal operation {op!r}")
    try:
        return cls(**args)
    except TypeError as exc:
        raise RestoreError(f"journal operation {op!r} with arguments {dict(args)}: {exc}") from None


# ---- building and restoring ------------------------------------------------------------------


def guest_config(config: Config) -> GuestConfig:
    c = config
    return GuestConfig(
        memory_bytes=c["guest.memory"],
        platform=c["guest.platform"],
        seed=c["guest.seed"],
        cost_profile=c["guest.cost_profile"] or None,
        faults=FaultPlan(
            failure_rate=c["faults.failure_rate"],
            fail_calls=frozenset(c["faults.fail_calls"]),
            retry_rate=c["faults.retry_rate"],
            direction=c["faults.direction"],
            seed=c["faults.seed"],
        ),
    )


def pool_settings(config: Config) -> PoolSettings:
    c = config
    return PoolSettings(
        initial_bytes=c["pool.initial"],
        max_bytes=c["pool.max"],
        low_watermark_bytes=c["pool.low_watermark"],
        high_watermark_bytes=c["pool.high_watermark"],
        grow_step_bytes=c["pool.grow_step"],
        shrink_hysteresis_seconds=c["pool.shrink_hysteresis"],
        boot_reserve_bytes=c["pool.boot_reserve"] or None,  # 0: the strategy's default
        max_buffer_bytes=c["pool.max_buffer"],
    )


def build(config: Config, progress: Progress | None = None) -> DaemonState:
    """A fresh state: the strategy provisioned on a new guest (pool.provision). `progress`
    sees the aging (and may raise OpenCancelled to stop it)."""
    guests = Guests(
        guest_config(config),
        config["guest.age_steps"],
        progress,
        keep=False,
        cache=not config["daemon.no_cache"],
    )
    made = provision(config["pool.strategy"], guests, pool_settings(config))
    return DaemonState(made.strategy)


def differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    out = []
    for k in sorted(set(stored) | set(wanted)):
        a, b = stored.get(k), wanted.get(k)
        if a != b:
            if k == "guest.cost_profile":
                out.append(f"{k} (file content differs)")
            else:
                out.append(f"{k}: state has {a!r}, config has {b!r}")
    return out


def check_state_config(state_dir: Path, stored: Mapping[str, Any] | None, config: Config) -> None:
    """StateMismatch, naming the differing keys, unless `stored` (the state config found in
    `state_dir`, None if there is none yet) is the config's."""
    if stored is None:
        return
    wanted = config.state_config()
    if stored != wanted:
        diffs = "; ".join(differences(stored, wanted))
        raise StateMismatch(
            f"the state in {state_dir} was made with other guest/pool/fault settings "
            f"({diffs}); use the same settings, another --state-dir, or --reset-state "
            "to discard it"
        )


@attrs.frozen
class Restored:
    state: DaemonState
    snapshot_seq: int  # the record the snapshot covered (0: built fresh)
    source: str
    replayed: int


def replay(
    state: DaemonState,
    records: Iterable[tuple[int, str, dict[str, Any], Any]],
    cancelled: Callable[[], bool] = lambda: False,
) -> int:
    """Execute every record again; RestoreError at the first that gives another result,
    OpenCancelled as soon as `cancelled()` says so (checked before each record)."""
    n = 0
    for seq, op, args, expected in records:
        if cancelled():
            raise OpenCancelled("stopped while replaying the journal")
        command = command_from_journal(op, args)
        try:
            got = command.result(state.execute(command))
        except ClientGone as exc:
            raise RestoreError(
                f"journal record {seq} ({op} for {args.get('owner')}) names a client that is "
                f"not registered at that point ({exc}): the state cannot be rebuilt"
            ) from None
        if got != expected:
            raise RestoreError(
                f"journal record {seq} ({op} {args}) replays as {got}, "
                f"but was {expected}: the state cannot be rebuilt"
            )
        n += 1
    return n


def restore(
    config: Config,
    journal: Journal,
    *,
    progress: Progress | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> Restored:
    """The state the journal (and its snapshot) hold, invariants checked; a new journal
    gets the config's state config. Blocking (seconds): `progress` sees the aging of a
    fresh guest, `cancelled()` is asked between journal records (OpenCancelled)."""
    stored = journal.get_meta("state_config")
    if stored is None:
        if journal.last_seq():
            raise RestoreError(f"{journal.path}: journal without a stored config")
        journal.put_meta("state_config", config.state_config())
    check_state_config(config.state_dir, stored, config)
    snap = journal.read_snapshot()
    if snap is not None:
        seq, source = snap[0], f"snapshot at record {snap[0]}"
        state = DaemonState.from_snapshot(*snap)
    else:
        seq, source = 0, "a fresh guest"
        state = build(config, progress)
    replayed = replay(state, journal.records(seq), cancelled)
    state.check_invariants()
    return Restored(state, seq, source, replayed)
