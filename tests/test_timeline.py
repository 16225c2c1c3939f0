"""Scenarios with a time axis (hv_netvsc_sim.timeline): the presets' schedules, a custom
TOML file, and a real run of `azure-month` whose series cover 30 days and whose events
happen when the schedule says."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hv_netvsc_sim.compare import CompareConfig
from hv_netvsc_sim.device import NETVSC_MAX_RX_SECTIONS, NETVSC_MAX_TX_SECTIONS, DeviceSettings
from hv_netvsc_sim.inprocess import run_in_process
from hv_netvsc_sim.scenario import ScenarioConfig
from hv_netvsc_sim.timeline import (
    AZURE_MONTH,
    BOOT_ONLY,
    DAY,
    HOUR,
    PRESETS,
    REPLUG_GAP_SECONDS,
    STRESS,
    Recurring,
    Timeline,
    load_timeline,
    parse_duration,
    resolve,
)
from pool.guest import GuestConfig
from pool.guest.units import GiB
from pool.provision import Guests


def test_azure_month_schedule_by_hand() -> None:
    """30 hot remove + add (03:00 every day), 4 ring resizes (days 6.5, 13.5, 20.5, 27.5,
    to the largest buffers and back in turn), one MTU change (day 15.5); 120 samples of 6 h."""
    ev = AZURE_MONTH.events_at()
    replugs = [t for t, k, _ in ev if k == "hot_replug"]
    assert replugs == [3 * HOUR + d * DAY for d in range(30)]
    rings = [(t, a) for t, k, a in ev if k == "ring_resize"]
    assert [t / DAY for t, _ in rings] == [6.5, 13.5, 20.5, 27.5]
    biggest = (NETVSC_MAX_RX_SECTIONS, NETVSC_MAX_TX_SECTIONS)
    default = (DeviceSettings().recv_sections, DeviceSettings().send_sections)
    assert [a for _, a in rings] == [biggest, default, biggest, default]
    assert [(t / DAY, a) for t, k, a in ev if k == "mtu_change"] == [(15.5, (9000,))]
    assert AZURE_MONTH.samples == 120
    assert AZURE_MONTH.sample_times()[-1] == 30 * DAY
    assert AZURE_MONTH.churn_steps_by(30 * DAY) == 30 * 24 * 250


def test_presets_and_stress_default() -> None:
    assert set(PRESETS) == {"stress", "azure-month", "boot-only"}
    assert not STRESS.scheduled
    config = CompareConfig.of()
    assert config.timeline == STRESS and config.as_json()["scenario"] == "stress"
    assert config.cycles == 200 and config.run_scenario is config.scenario
    month = CompareConfig.of(timeline="azure-month")
    assert month.cycles == 120 and month.as_json()["timeline"]["duration_seconds"] == 30 * DAY
    assert {k for _, k, _ in BOOT_ONLY.events_at()} == {"traffic"}


@given(st.floats(0, 1e7, allow_nan=False), st.sampled_from(["d", "h", "m", "s"]))
@settings(max_examples=50, deadline=None)
def test_parse_duration_units(n: float, unit: str) -> None:
    text = f"{n:.3f}{unit}"
    scale = {"d": DAY, "h": HOUR, "m": 60.0, "s": 1.0}[unit]
    assert parse_duration(text, "x") == pytest.approx(float(f"{n:.3f}") * scale)


@given(
    st.floats(0, 40 * DAY),
    st.floats(0, 5 * DAY),
    st.floats(HOUR, 40 * DAY),
)
@settings(max_examples=60, deadline=None)
def test_schedule_events_inside_the_duration_in_order(at: float, every: float, dur: float) -> None:
    """Every occurrence lies in [0, duration), in time order, `every` apart."""
    if every and (dur - at) / every > 5000:
        return
    t = Timeline("x", dur, dur / 10, 0.0, 1, (Recurring("hot_replug", at, every),))
    times = [x for x, _, _ in t.events_at()]
    assert times == sorted(times)
    assert all(0 <= x < dur for x in times)
    if every and len(times) > 1:
        assert all(b - a == pytest.approx(every) for a, b in itertools.pairwise(times))
    if at < dur:
        assert times and times[0] == at


def test_custom_toml(tmp_path: Path) -> None:
    f = tmp_path / "week.toml"
    f.write_text(
        'name = "week"\nduration = "7d"\nsample_every = "12h"\nchurn_steps_per_hour = 10\n'
        '[[events]]\nkind = "hot_replug"\nat = "1h"\nevery = "2d"\n'
        '[[events]]\nkind = "mtu_change"\nat = "3d12h"\nsettings = [[4000]]\n'
    )
    t = resolve(str(f))
    assert (t.name, t.duration_seconds, t.samples) == ("week", 7 * DAY, 14)
    assert [x / HOUR for x, k, _ in t.events_at() if k == "hot_replug"] == [1, 49, 97, 145]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("duration = ", "not TOML"),
        ('duration = "30x"', "not a time"),
        ('duration = "1d"\nbogus = 1', "unknown key(s) bogus"),
        ('duration = "1d"\n[[events]]\nkind = "reboot"', "unknown event kind 'reboot'"),
        ('duration = "1d"\n[[events]]\nkind = "ring_resize"', "needs settings"),
        ('duration = "1d"\nsample_every = "0.5s"', "sample_every is too short"),
        ('duration = "30d"\n[[events]]\nkind = "traffic"\nevery = "1s"', "more than"),
        ("name = 'x'", "needs 'duration'"),
    ],
)
def test_bad_toml_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ValueError, match="scenario file") as exc:
        load_timeline(f)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_unknown_scenario_name() -> None:
    with pytest.raises(ValueError, match="unknown scenario 'azure-year'"):
        resolve("azure-year")
    with pytest.raises(ValueError, match="No such file"):
        resolve("missing.toml")


def _month_run(strategy: str, timeline: Timeline = AZURE_MONTH):  # type: ignore[no-untyped-def]
    guests = Guests(GuestConfig(memory_bytes=1 * GiB, seed=2), 0, None)
    config = ScenarioConfig(seed=2, timeline=timeline)
    return asyncio.run(run_in_process(strategy, guests, config))


def test_azure_month_runs_30_days_on_schedule() -> None:
    """A real run (1 GiB pristine guest, the pool): 120 samples over 30 days, every event at
    its scheduled virtual time, the churn at the preset's rate."""
    light = attrs.evolve(AZURE_MONTH, churn_steps_per_hour=5.0)  # the schedule, less churn
    run = _month_run("pool", light)
    series = run.result["series"]
    assert series["cycle"] == list(range(1, 121))
    assert series["virtual_seconds"] == [6 * HOUR * k for k in range(1, 121)]
    assert series["virtual_seconds"][-1] / DAY == 30
    ev = run.result["events"]
    assert (ev["hot_remove"], ev["hot_add"], ev["ring_resize"], ev["mtu_change"]) == (30, 30, 4, 1)
    assert run.summary["virtual_seconds"] == 30 * DAY
    assert run.result["failures"] == 0 and run.result["end_state"]["devices_up"] == 1


def test_event_log_matches_the_schedule() -> None:
    from hv_netvsc_sim.client import InProcessClient
    from hv_netvsc_sim.host import HyperVHost
    from hv_netvsc_sim.scenario import Scenario
    from pool.provision import provision

    light = attrs.evolve(AZURE_MONTH, churn_steps_per_hour=0.0)
    made = provision("pool", Guests(GuestConfig(memory_bytes=1 * GiB, seed=2), 0, None))
    client = InProcessClient(made.strategy)
    sc = Scenario(ScenarioConfig(seed=2, timeline=light), client, HyperVHost(made.guest))
    asyncio.run(sc.run())
    removes = [t for t, k, _ in sc.event_log if k == "hot_remove"]
    adds = [t for t, k, _ in sc.event_log if k == "hot_add"]
    assert removes == [3 * HOUR + d * DAY for d in range(30)]
    assert adds == [t + REPLUG_GAP_SECONDS for t in removes]
    mtu = [t for t, k, _ in sc.event_log if k == "mtu_change"]
    assert mtu == [15.5 * DAY]


def test_boot_only_reconfigures_nothing() -> None:
    run = _month_run("vmalloc-directmap", attrs.evolve(BOOT_ONLY, churn_steps_per_hour=20.0))
    assert set(run.result["events"]) == {"traffic"}
    assert run.result["run"]["hypercalls"] == 0  # probed at boot, nothing converted after
    assert len(run.result["series"]["cycle"]) == 24
