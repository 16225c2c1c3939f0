"""A seeded scenario engine with a virtual clock (SimPy-style).

Events sit in a heap of (time, seq, event): the earliest time first, and among events at
the same time the one scheduled first (seq), so the order is a pure function of the
configuration and the seed - never of the strategy's answers, nor of wall time. The
engine runs as fast as it can; `pace` > 0 sleeps that many real seconds after each event
(demos against the daemon).

What one run does (virtual time in units of T = `cycle_seconds`):

- start (t = 0, the setup phase): every vNIC 0..N-1 is probed with the default settings.
- cycle c = 0, 1, ... (M cycles, or until stopped when M = 0) occupies [c·T, (c+1)·T):
  * c·T          hot_remove of vNIC c mod N (a round robin: every vNIC in turn);
  * c·T + 0.25T  hot_add of that vNIC: a new device with the default settings, probed;
  * c·T + 0.30T  traffic on it (`traffic_packets` packets each way);
  * `mixed_events` events at seeded uniform times in [c·T + 0.35T, (c+1)·T), each on a
    seeded vNIC, of a seeded kind (weights in `mix`):
      ring_resize      ethtool -G with seeded rx/tx section counts (some out of range, to
                       exercise the clamp to [10, max]);
      mtu_change       a seeded MTU from MTU_CHOICES;
      channel_change   a seeded channel count from CHANNEL_CHOICES;
      vf_failover      data path to the VF; a vf_return event is scheduled at a seeded
                       time up to T later (possibly in the next cycle);
      traffic          `traffic_packets` packets each way;
  * (c+1)·T      cycle_end: the cycle is complete (series are sampled here), scheduled
                 before the next cycle's first event, so events that spill over (a late
                 vf_return) count in the next cycle.
- Before every event (the cycle bookkeeping events excluded): the guest's background
  churn runs `churn_steps` steps (in-process only: the engine has the Guest) and then
  the strategy's maintain(now) runs at the event's virtual time (in-process only; the
  daemon runs its own maintenance).

A scheduled scenario (`timeline`, hv_netvsc_sim.timeline: every preset but `stress`)
replaces the cycles with its schedule, planned whole at the start: the samples first (so a
sample at time t reads the state before an event at t), then each device event at its
virtual time (a hot_replug is a hot_remove and, REPLUG_GAP_SECONDS later, a hot_add of the
same vNIC, the vNICs in turn). Sample k (1-based) is reported as cycle k. Background churn
follows the virtual clock: before every event and every sample the guest runs the steps due
by then at the scenario's rate per virtual hour (Timeline.churn_steps_by), and the
strategy's maintain(now) runs at that time too.

An event on a vNIC that is not up (removed, or its attach failed) does what the driver
would: reconfigurations update the settings for the next attach, traffic and VF switches
do nothing. Failures are counted (DriverStats), never raised out of the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
from collections import Counter
from collections.abc import Callable
from time import perf_counter
from typing import Any

import attrs

from hv_netvsc_sim.client import PoolClient
from hv_netvsc_sim.device import (
    NETVSC_MAX_RX_SECTIONS,
    NETVSC_MAX_TX_SECTIONS,
    DeviceError,
    DeviceSettings,
    DriverStats,
    NetvscDevice,
)
from hv_netvsc_sim.host import RECV_SECTION_SIZE, SEND_SECTION_SIZE, HyperVHost
from hv_netvsc_sim.timeline import REPLUG_GAP_SECONDS, Timeline
from pool.guest import Guest
from pool.guest.units import MiB

MIXED_KINDS = ("ring_resize", "mtu_change", "channel_change", "vf_failover", "traffic")
EVENT_KINDS = ("hot_remove", "hot_add", *MIXED_KINDS, "vf_return")

# ethtool -G requests: receive buffers of 1, 4, 16 (the default) and 31 MiB (the maximum)
# and two out-of-range requests (5 -> clamped up to 10, 100000 -> clamped to the maximum);
# send buffers of 1 (the default), 4 and 15 MiB (the maximum), and 0 -> clamped to 10.
RX_CHOICES = (
    1 * MiB // RECV_SECTION_SIZE,
    4 * MiB // RECV_SECTION_SIZE,
    16 * MiB // RECV_SECTION_SIZE,
    16 * MiB // RECV_SECTION_SIZE,
    NETVSC_MAX_RX_SECTIONS,
    5,
    100_000,
)
TX_CHOICES = (
    1 * MiB // SEND_SECTION_SIZE,
    1 * MiB // SEND_SECTION_SIZE,
    4 * MiB // SEND_SECTION_SIZE,
    NETVSC_MAX_TX_SECTIONS,
    0,
)
MTU_CHOICES = (1500, 4000, 9000)
CHANNEL_CHOICES = (1, 2, 4, 8)
DEFAULT_MIX = (
    ("ring_resize", 3.0),
    ("mtu_change", 2.0),
    ("channel_change", 2.0),
    ("vf_failover", 2.0),
    ("traffic", 3.0),
)


def _mix(value: Any) -> tuple[tuple[str, float], ...]:
    items = tuple(
        (str(k), float(w)) for k, w in (value.items() if isinstance(value, dict) else value)
    )
    for kind, weight in items:
        if kind not in MIXED_KINDS:
            raise ValueError(f"unknown event kind {kind!r} in mix: expected {MIXED_KINDS}")
        if weight < 0:
            raise ValueError(f"negative weight for {kind!r}")
    if not items or sum(w for _, w in items) <= 0:
        raise ValueError("the event mix needs a positive total weight")
    return items


@attrs.frozen
class ScenarioConfig:
    nics: int = 2
    cycles: int = 100  # 0: run until stopped
    seed: int = 1
    mixed_events: int = 3  # per cycle, besides the hot remove / add and its traffic
    churn_steps: int = 250  # guest background churn steps before each event (in-process)
    traffic_packets: int = 64
    cycle_seconds: float = 1.0  # virtual seconds
    pace: float = 0.0  # real seconds slept after each event (0: as fast as possible)
    mix: tuple[tuple[str, float], ...] = attrs.field(default=DEFAULT_MIX, converter=_mix)
    settings: DeviceSettings = attrs.field(factory=DeviceSettings)  # a new vNIC's settings
    timeline: Timeline | None = None  # a schedule (None or `stress`: the cycles above)

    @property
    def scheduled(self) -> bool:
        return self.timeline is not None and self.timeline.scheduled

    @property
    def total_cycles(self) -> int:
        """Series points: the cycles, or a schedule's samples."""
        t = self.timeline
        return t.samples if t is not None and t.scheduled else self.cycles

    @property
    def device_count(self) -> int:
        t = self.timeline
        return t.nics if t is not None and t.scheduled else self.nics

    def __attrs_post_init__(self) -> None:
        if self.nics < 1:
            raise ValueError(f"nics must be at least 1: {self.nics}")
        if self.cycles < 0:
            raise ValueError(f"cycles must not be negative: {self.cycles}")
        if self.mixed_events < 0 or self.churn_steps < 0 or self.traffic_packets < 0:
            raise ValueError("mixed_events, churn_steps and traffic_packets must not be negative")
        if self.cycle_seconds <= 0:
            raise ValueError(f"cycle_seconds must be positive: {self.cycle_seconds}")
        if self.pace < 0:
            raise ValueError(f"pace must not be negative: {self.pace}")


@attrs.frozen
class Event:
    kind: str  # one of EVENT_KINDS, or the bookkeeping kinds cycle_start / cycle_end
    cycle: int
    nic: int = -1
    args: tuple[int, ...] = ()


class EventQueue:
    """The virtual clock: a heap of (time, seq, event); `now` is the last popped time."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Event]] = []
        self._seq = 0
        self.now = 0.0

    def schedule(self, at: float, event: Event) -> None:
        if at < self.now:
            raise ValueError(f"cannot schedule in the past: {at} < {self.now}")
        heapq.heappush(self._heap, (at, self._seq, event))
        self._seq += 1

    def pop(self) -> Event:
        at, _, event = heapq.heappop(self._heap)
        self.now = at
        return event

    def __len__(self) -> int:
        return len(self._heap)


class Scenario:
    """N vNICs on one driver instance, driven through M cycles of seeded events.

    guest: the Guest when in-process (background churn between events), else None.
    maintain: the strategy's maintain(now) when in-process, else None.
    on_cycle(cycle): called after each completed cycle (1-based).
    """

    def __init__(
        self,
        config: ScenarioConfig,
        client: PoolClient,
        host: HyperVHost,
        *,
        guest: Guest | None = None,
        maintain: Callable[[float], object] | None = None,
        on_cycle: Callable[[int], None] | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.host = host
        self.guest = guest
        self.maintain = maintain
        self.on_cycle = on_cycle
        self.stats = DriverStats()
        self.devices: list[NetvscDevice | None] = [None] * config.device_count
        self.queue = EventQueue()
        self.events: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.cycles_done = 0
        self.model_seconds = 0.0  # wall clock in the guest's churn and the strategy's maintain
        self._rng = random.Random(config.seed)
        kinds, weights = zip(*config.mix, strict=True)
        self._kinds: tuple[str, ...] = kinds
        self._cum = list(_accumulate(weights))
        self._stopping = False
        self._started = False
        self._churned = 0  # a schedule's churn steps done so far
        # (virtual time, kind, vNIC) of every dispatched event: the schedule as it happened
        self.event_log: list[tuple[float, str, int]] = []

    # ---- plan ----------------------------------------------------------------------------

    def _plan_cycle(self, c: int) -> None:
        cfg, q, rng = self.config, self.queue, self._rng
        t0 = c * cfg.cycle_seconds
        t = cfg.cycle_seconds
        nic = c % cfg.nics
        q.schedule(t0, Event("hot_remove", c, nic))
        q.schedule(t0 + 0.25 * t, Event("hot_add", c, nic))
        q.schedule(t0 + 0.30 * t, Event("traffic", c, nic, (cfg.traffic_packets,)))
        for _ in range(cfg.mixed_events):
            at = t0 + (0.35 + 0.65 * rng.random()) * t
            target = rng.randrange(cfg.nics)
            kind = self._kinds[_pick(self._cum, rng.random() * self._cum[-1])]
            args: tuple[int, ...] = ()
            if kind == "ring_resize":
                args = (rng.choice(RX_CHOICES), rng.choice(TX_CHOICES))
            elif kind == "mtu_change":
                args = (rng.choice(MTU_CHOICES),)
            elif kind == "channel_change":
                args = (rng.choice(CHANNEL_CHOICES),)
            elif kind == "traffic":
                args = (cfg.traffic_packets,)
            elif kind == "vf_failover":
                q.schedule(at + rng.random() * t, Event("vf_return", c, target))
            q.schedule(at, Event(kind, c, target, args))
        q.schedule(t0 + t, Event("cycle_end", c))
        if not cfg.cycles or c + 1 < cfg.cycles:
            q.schedule(t0 + t, Event("cycle_start", c + 1))

    def _plan_schedule(self, timeline: Timeline) -> None:
        """The whole schedule at once: samples first, then the device events."""
        q = self.queue
        for k, at in enumerate(timeline.sample_times()):
            q.schedule(at, Event("cycle_end", k))
        nics = timeline.nics
        period = timeline.sample_seconds
        turn: Counter[str] = Counter()
        for at, kind, args in timeline.events_at():
            nic = turn[kind] % nics
            turn[kind] += 1
            c = int(at // period)
            if kind == "hot_replug":
                q.schedule(at, Event("hot_remove", c, nic))
                q.schedule(at + REPLUG_GAP_SECONDS, Event("hot_add", c, nic))
            else:
                q.schedule(at, Event(kind, c, nic, args))

    def _churn_until(self, now: float) -> None:
        """A schedule's background churn: the steps due by virtual time `now`."""
        assert self.config.timeline is not None
        due = self.config.timeline.churn_steps_by(now) - self._churned
        if due > 0 and self.guest is not None:
            self.guest.background(due)
        self._churned += max(0, due)

    # ---- run -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Probe every vNIC with the default settings (the setup phase, at t = 0)."""
        if self._started:
            return
        self._started = True
        for nic in range(self.config.device_count):
            await self._hot_add(nic)
        if self.config.scheduled:
            assert self.config.timeline is not None
            self._plan_schedule(self.config.timeline)
        else:
            self.queue.schedule(0.0, Event("cycle_start", 0))

    def stop(self) -> None:
        """Ask the engine to stop after the current event (SIGTERM / SIGINT)."""
        self._stopping = True

    async def run(self) -> int:
        """Run the cycles (start() first if not done). Returns the cycles completed."""
        await self.start()
        cfg = self.config
        q = self.queue
        guest, maintain = self.guest, self.maintain
        churn = cfg.churn_steps
        scheduled = cfg.scheduled
        total = cfg.total_cycles
        while q and not self._stopping:
            ev = q.pop()
            kind = ev.kind
            if kind == "cycle_start":
                self._plan_cycle(ev.cycle)
                continue
            if kind == "cycle_end":
                if scheduled:  # the state at this time: churn and maintenance due by now
                    t0 = perf_counter()
                    self._churn_until(q.now)
                    if maintain is not None:
                        maintain(q.now)
                    self.model_seconds += perf_counter() - t0
                self.cycles_done = ev.cycle + 1
                if self.on_cycle is not None:
                    self.on_cycle(self.cycles_done)
                if total and self.cycles_done >= total:
                    break
                continue
            t0 = perf_counter()
            if scheduled:
                self._churn_until(q.now)
            elif guest is not None and churn:
                guest.background(churn)
            if maintain is not None:
                maintain(q.now)
            self.model_seconds += perf_counter() - t0
            await self._dispatch(ev)
            if cfg.pace:
                await asyncio.sleep(cfg.pace)
        return self.cycles_done

    async def shutdown(self) -> None:
        """Hot remove every vNIC still present (buffers go back through the client)."""
        for nic, dev in enumerate(self.devices):
            if dev is not None:
                await dev.remove()
                self.devices[nic] = None

    async def _hot_add(self, nic: int) -> None:
        dev = NetvscDevice(f"eth{nic}", self.client, self.host, self.config.settings, self.stats)
        self.devices[nic] = dev
        # a failure is counted in DriverStats; the vNIC stays, down, until it is removed
        with contextlib.suppress(DeviceError):
            await dev.probe()

    async def _dispatch(self, ev: Event) -> None:
        kind = ev.kind
        self.events[kind] += 1
        self.event_log.append((self.queue.now, kind, ev.nic))
        if kind == "hot_add":
            await self._hot_add(ev.nic)
            return
        dev = self.devices[ev.nic]
        if dev is None:
            self.skipped[kind] += 1
            return
        if kind == "hot_remove":
            await dev.remove()
            self.devices[ev.nic] = None
            return
        try:
            if kind == "traffic":
                dev.traffic(ev.args[0])
            elif kind == "ring_resize":
                await dev.set_ringparam(ev.args[0], ev.args[1])
            elif kind == "mtu_change":
                await dev.change_mtu(ev.args[0])
            elif kind == "channel_change":
                await dev.set_channels(ev.args[0])
            elif kind == "vf_failover":
                dev.switch_datapath(True)
            elif kind == "vf_return":
                dev.switch_datapath(False)
            else:  # pragma: no cover - the planner only makes the kinds above
                raise ValueError(f"unknown event kind {kind!r}")
        except DeviceError:
            pass  # the attach failed: counted in DriverStats, the device is down

    def summary(self) -> dict[str, Any]:
        return {
            "cycles": self.cycles_done,
            "virtual_seconds": self.queue.now,
            "events": dict(sorted(self.events.items())),
            "skipped_events": dict(sorted(self.skipped.items())),
            "devices_up": sum(1 for d in self.devices if d is not None and d.state == "up"),
            "driver": self.stats.as_json(),
            "host": self.host.stats.as_json(),
        }


def _accumulate(weights: tuple[float, ...]) -> list[float]:
    out, total = [], 0.0
    for w in weights:
        total += w
        out.append(total)
    return out


def _pick(cum: list[float], x: float) -> int:
    for i, c in enumerate(cum):
        if x < c:
            return i
    return len(cum) - 1
