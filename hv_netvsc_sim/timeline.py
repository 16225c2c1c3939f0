"""Scenarios with a time axis: what a guest goes through, in virtual seconds, hours and days.

`stress` is the engine's original cycle scenario (hv_netvsc_sim.scenario: a hot remove + add
of one vNIC plus three seeded reconfigurations every virtual second, background churn before
every event): the lab's worst case, the default, and what the existing tests pin. Every other
scenario is a *schedule*: device events at given virtual times, background churn as a rate
per virtual hour, and series sampled at a fixed virtual interval, so that a figure reads
"after 30 days", not "after 200 cycles".

Presets (docs/scenarios.md gives each number and where it comes from):

- `stress`: the cycle scenario, one cycle = 1 virtual second (ScenarioConfig).
- `azure-month`: 30 virtual days on one vNIC; a hot remove + add once a day (at 03:00), a
  ring resize once a week (ethtool -G to the largest buffers, then back, alternately), one
  MTU change (day 15, to 9000), background churn at 250 steps per virtual hour, a sample
  every 6 virtual hours.
- `boot-only`: the vNIC probed at boot and one virtual day of traffic and churn, no
  reconfiguration, a sample every virtual hour: what a guest pays if nothing ever changes.

A custom scenario is a TOML file (`--scenario FILE.toml`), parsed by `load_timeline`:

    name = "my-month"
    duration = "30d"            # virtual time: a number of seconds, or 30d / 12h / 90m / 45s
    sample_every = "6h"
    churn_steps_per_hour = 250
    nics = 1
    [[events]]
    kind = "hot_replug"         # hot_replug, ring_resize, mtu_change, channel_change, traffic
    at = "3h"                   # first time (default 0)
    every = "1d"                # period (default: once)
    [[events]]
    kind = "ring_resize"
    at = "6d12h"
    every = "7d"
    settings = [[18396, 2560], [9709, 170]]   # (rx, tx) sections, taken in turn

A Timeline is a frozen value of plain fields (a sweep varies it as it varies any other
field of the compare configuration); `events_at` lists its schedule, a pure function of it.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any

import attrs

from hv_netvsc_sim.device import NETVSC_MAX_RX_SECTIONS, NETVSC_MAX_TX_SECTIONS, DeviceSettings

HOUR = 3600.0
DAY = 24 * HOUR

# what a schedule may hold: hot_replug is a hot remove then, REPLUG_GAP_SECONDS later, a hot
# add of the same vNIC (the engine's own events); the others are the cycle scenario's kinds
SCHEDULE_KINDS = ("hot_replug", "ring_resize", "mtu_change", "channel_change", "traffic")
REPLUG_GAP_SECONDS = 60.0  # a remove and the add that follows: a minute of virtual time
MAX_EVENTS = 100_000  # a schedule longer than this is a typo (e.g. every = "1s" for a month)
_DEFAULT = DeviceSettings()


@attrs.frozen
class Recurring:
    """One kind of event at `at_seconds`, then every `every_seconds` (0: once), up to the
    scenario's end. `settings` are the event's arguments, taken in turn one occurrence after
    another: (rx, tx) sections for ring_resize, (mtu,) for mtu_change, (channels,) for
    channel_change, (packets,) for traffic; none for hot_replug."""

    kind: str
    at_seconds: float = 0.0
    every_seconds: float = 0.0
    settings: tuple[tuple[int, ...], ...] = ()

    def __attrs_post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(
                f"unknown event kind {self.kind!r}: expected one of {', '.join(SCHEDULE_KINDS)}"
            )
        if self.at_seconds < 0 or self.every_seconds < 0:
            raise ValueError(f"{self.kind}: 'at' and 'every' must not be negative")
        need = {"ring_resize": 2, "mtu_change": 1, "channel_change": 1}.get(self.kind)
        if need is not None and not self.settings:
            raise ValueError(f"{self.kind}: needs settings (a list of {need}-number lists)")
        for s in self.settings:
            if need is not None and len(s) != need:
                raise ValueError(f"{self.kind}: each setting is {need} number(s), not {list(s)}")
            if any(v < 0 for v in s):
                raise ValueError(f"{self.kind}: settings must not be negative: {list(s)}")


@attrs.frozen
class Timeline:
    """A scenario. `duration_seconds` 0 is the cycle scenario (`stress`): the engine's
    ScenarioConfig decides everything and the other fields are unused."""

    name: str
    duration_seconds: float = 0.0
    sample_seconds: float = 0.0
    churn_steps_per_hour: float = 0.0
    nics: int = 1
    events: tuple[Recurring, ...] = ()

    def __attrs_post_init__(self) -> None:
        if not self.name:
            raise ValueError("a scenario needs a name")
        if self.duration_seconds < 0 or not math.isfinite(self.duration_seconds):
            raise ValueError(f"duration must be a finite time >= 0: {self.duration_seconds}")
        if self.scheduled:
            if self.sample_seconds <= 0:
                raise ValueError("sample_every must be a positive time")
            if self.samples > MAX_EVENTS:
                raise ValueError(
                    f"{self.samples:,} samples: sample_every is too short for the duration"
                )
            if self.churn_steps_per_hour < 0:
                raise ValueError("churn_steps_per_hour must not be negative")
            if self.nics < 1:
                raise ValueError(f"nics must be at least 1: {self.nics}")
            if sum(_occurrences(e, self.duration_seconds) for e in self.events) > MAX_EVENTS:
                raise ValueError(f"more than {MAX_EVENTS:,} events: check 'every'")

    @property
    def scheduled(self) -> bool:
        """True for a schedule, False for the cycle scenario."""
        return self.duration_seconds > 0

    @property
    def samples(self) -> int:
        """Series points of a schedule: one per `sample_seconds`, the last at the end."""
        return math.ceil(self.duration_seconds / self.sample_seconds) if self.scheduled else 0

    def sample_times(self) -> list[float]:
        n = self.samples
        return [min(self.duration_seconds, (i + 1) * self.sample_seconds) for i in range(n)]

    def churn_steps_by(self, t: float) -> int:
        """Background churn steps due from the start up to virtual time `t` (a rate, so the
        same at any sampling)."""
        return int(self.churn_steps_per_hour * t / HOUR)

    def events_at(self) -> list[tuple[float, str, tuple[int, ...]]]:
        """(time, kind, settings) of every scheduled event in time order (ties: the order of
        `events`), within [0, duration)."""
        out: list[tuple[float, int, str, tuple[int, ...]]] = []
        for order, e in enumerate(self.events):
            for i in range(_occurrences(e, self.duration_seconds)):
                args = e.settings[i % len(e.settings)] if e.settings else ()
                out.append((e.at_seconds + i * e.every_seconds, order, e.kind, args))
        out.sort()
        return [(t, kind, args) for t, _, kind, args in out]

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "duration_seconds": self.duration_seconds,
            "sample_seconds": self.sample_seconds,
            "churn_steps_per_hour": self.churn_steps_per_hour,
            "nics": self.nics,
            "events": [
                {
                    "kind": e.kind,
                    "at_seconds": e.at_seconds,
                    "every_seconds": e.every_seconds,
                    "settings": [list(s) for s in e.settings],
                }
                for e in self.events
            ],
        }


def _occurrences(e: Recurring, duration: float) -> int:
    if e.at_seconds >= duration:
        return 0
    if e.every_seconds == 0:
        return 1
    return math.ceil((duration - e.at_seconds) / e.every_seconds)


STRESS = Timeline("stress")
AZURE_MONTH = Timeline(
    "azure-month",
    duration_seconds=30 * DAY,
    sample_seconds=6 * HOUR,
    churn_steps_per_hour=250.0,
    nics=1,
    events=(
        Recurring("hot_replug", at_seconds=3 * HOUR, every_seconds=DAY),
        Recurring(
            "ring_resize",
            at_seconds=6 * DAY + 12 * HOUR,
            every_seconds=7 * DAY,
            settings=(
                (NETVSC_MAX_RX_SECTIONS, NETVSC_MAX_TX_SECTIONS),
                (_DEFAULT.recv_sections, _DEFAULT.send_sections),
            ),
        ),
        Recurring("mtu_change", at_seconds=15 * DAY + 12 * HOUR, settings=((9000,),)),
    ),
)
BOOT_ONLY = Timeline(
    "boot-only",
    duration_seconds=DAY,
    sample_seconds=HOUR,
    churn_steps_per_hour=250.0,
    nics=1,
    events=(Recurring("traffic", at_seconds=0.5 * HOUR, every_seconds=HOUR, settings=((64,),)),),
)
PRESETS: dict[str, Timeline] = {t.name: t for t in (STRESS, AZURE_MONTH, BOOT_ONLY)}
DEFAULT_SCENARIO = STRESS.name


_UNIT = {"d": DAY, "h": HOUR, "m": 60.0, "s": 1.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([dhms])")


def parse_duration(value: object, what: str) -> float:
    """Virtual seconds from a number (seconds) or text like 30d, 12h, 6d12h, 90m, 45s."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: not a time: {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{what}: must be a finite time >= 0: {value!r}")
        return float(value)
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        parts = _DURATION.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return sum(float(n) * _UNIT[u] for n, u in parts)
    raise ValueError(f"{what}: not a time: {value!r} (examples: 3600, 30d, 12h, 6d12h, 90m)")


def _settings(value: object, where: str) -> tuple[tuple[int, ...], ...]:
    if not isinstance(value, list) or not all(
        isinstance(s, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in s)
        for s in value
    ):
        raise ValueError(f"{where}: settings must be a list of lists of integers")
    return tuple(tuple(s) for s in value)


_TOP_KEYS = {"name", "duration", "sample_every", "churn_steps_per_hour", "nics", "events"}
_EVENT_KEYS = {"kind", "at", "every", "settings"}


def load_timeline(path: str | Path) -> Timeline:
    """A Timeline from a TOML file (the format of the module doc); ValueError with one line
    naming the file and the problem."""
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text())
    except OSError as exc:
        raise ValueError(f"scenario file {p}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"scenario file {p}: not TOML: {exc}") from None
    try:
        unknown = set(doc) - _TOP_KEYS
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}")
        if "duration" not in doc:
            raise ValueError("needs 'duration' (e.g. duration = \"30d\")")
        events = doc.get("events", [])
        if not isinstance(events, list):
            raise ValueError("'events' must be an array of tables ([[events]])")
        parsed = []
        for i, e in enumerate(events, 1):
            where = f"events #{i}"
            if not isinstance(e, dict):
                raise ValueError(f"{where}: must be a table")
            bad = set(e) - _EVENT_KEYS
            if bad:
                raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(bad))}")
            if "kind" not in e:
                raise ValueError(f"{where}: needs 'kind'")
            parsed.append(
                Recurring(
                    str(e["kind"]),
                    parse_duration(e.get("at", 0), f"{where} at"),
                    parse_duration(e.get("every", 0), f"{where} every"),
                    _settings(e.get("settings", []), where),
                )
            )
        nics = doc.get("nics", 1)
        rate = doc.get("churn_steps_per_hour", 0)
        if isinstance(nics, bool) or not isinstance(nics, int):
            raise ValueError(f"nics must be an integer: {nics!r}")
        if isinstance(rate, bool) or not isinstance(rate, int | float):
            raise ValueError(f"churn_steps_per_hour must be a number: {rate!r}")
        duration = parse_duration(doc["duration"], "duration")
        if duration <= 0:
            raise ValueError("duration must be positive")
        return Timeline(
            str(doc.get("name", p.stem)),
            duration,
            parse_duration(doc.get("sample_every", duration / 30), "sample_every"),
            float(rate),
            nics,
            tuple(parsed),
        )
    except ValueError as exc:
        raise ValueError(f"scenario file {p}: {exc}") from None


def resolve(name_or_path: str) -> Timeline:
    """A preset by name, else a TOML file; one-line ValueError otherwise."""
    preset = PRESETS.get(name_or_path)
    if preset is not None:
        return preset
    if name_or_path.endswith(".toml") or Path(name_or_path).exists():
        return load_timeline(name_or_path)
    raise ValueError(
        f"unknown scenario {name_or_path!r}: expected one of {', '.join(PRESETS)} or a FILE.toml"
    )
