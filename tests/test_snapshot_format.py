"""The plain-data snapshot (daemon.plaindata, daemon.snapshot): for every strategy a state
restored from its snapshot behaves exactly as the original under the same further calls;
nothing but plain data is read (a pickle, an unknown format, a changed class, an unknown
tag or a class outside the project are refused with one line); the codec round-trips
random nested values."""

from __future__ import annotations

import array
import math
import pickle
import random
import re
import zlib
from collections import deque
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import plaindata, snapshot
from pool.guest import FaultPlan, GuestConfig
from pool.guest.units import MiB
from pool.provision import Guests, provision
from pool.registry import STRATEGIES, PoolSettings
from pool.strategy import AllocationError, Resizable, Strategy, StrategyError

SETTINGS = PoolSettings(
    initial_bytes=8 * MiB,
    max_bytes=96 * MiB,
    low_watermark_bytes=2 * MiB,
    high_watermark_bytes=16 * MiB,
    grow_step_bytes=4 * MiB,
    shrink_hysteresis_seconds=5.0,
)


_FAULTS = FaultPlan(failure_rate=0.1, seed=7)


def _strategy(name: str, faults: FaultPlan = _FAULTS) -> Strategy:
    # fault injection: some conversions fail, leaving leaked / unknown-state pages
    cfg = GuestConfig(memory_bytes=2048 * MiB, faults=faults)
    return provision(name, Guests(cfg, 300, keep=False), SETTINGS).strategy


def _run(s: Strategy, seed: int, n: int) -> list[Any]:
    """`n` seeded calls (allocate, free, maintain, grow, shrink); their outcomes."""
    rng = random.Random(seed)
    out: list[Any] = []
    now = float(seed)
    for _ in range(n):
        r = rng.random()
        live = s.buffers()
        if live and r < 0.35:
            b = live[rng.randrange(len(live))]
            res = s.free(b.id, b.owner)
            out.append(("free", b.id, res.leaked))
        elif r < 0.9:
            size = rng.choice([100, 4096, 9000, 65536, 300_000, 3 * MiB])
            try:
                out.append(("alloc", s.allocate(size, f"c{rng.randrange(4)}", "p").as_json()))
            except AllocationError as err:
                out.append(("refused", err.reason))
        elif r < 0.95 or not isinstance(s, Resizable):
            now += 3.0
            out.append(("maintain", s.maintain(now)))
        elif r < 0.975:
            out.append(("grow", s.grow(4 * MiB)))
        else:
            out.append(("shrink", s.shrink(now + 100.0, True)))
    return out


def _observe(s: Strategy) -> dict[str, Any]:
    g = s.guest
    return {
        "stats": s.stats().as_json(),
        "buffers": [b.as_json() for b in s.buffers()],
        "guest": g.stats.snapshot(),
        "content": g.content.tobytes(),
        "page_state": g.platform.state.tobytes(),
        "attr": g.direct_map.attr.tobytes(),
        "level": g.direct_map.level.tobytes(),
        "allocator": bytes(g.allocator._state),
        "free_lists": [[g.allocator.free_blocks(z.name, o) for o in range(11)] for z in g.zones],
        "vmalloc": sorted((a.id, a.va, a.pfns.tobytes()) for a in g.vmalloc),
        "host_calls": g.platform.host.calls,  # type: ignore[attr-defined]
    }


def _roundtrip(s: Strategy) -> Strategy:
    data = snapshot.encode(snapshot.SnapshotContents(5, s, (("c0", "n", "h" * 64, 1.5),), 2, 9.0))
    back = snapshot.decode(5, data)
    assert back.clients == (("c0", "n", "h" * 64, 1.5),) and back.reclaimed == 2
    assert back.clock == 9.0
    return back.strategy


@pytest.mark.parametrize("name", STRATEGIES)
def test_restored_state_behaves_identically(name: str) -> None:
    a = _strategy(name)
    _run(a, 1, 250)
    b = _roundtrip(a)
    assert type(b) is type(a) and b is not a and b.guest is not a.guest
    assert _observe(a) == _observe(b)
    b.check_invariants()
    b.guest.check_invariants()
    ra, rb = _run(a, 2, 250), _run(b, 2, 250)
    assert ra == rb
    assert any(x[0] == "alloc" for x in ra) and any(x[0] == "free" for x in ra)
    assert _observe(a) == _observe(b)
    a.guest.background(50)  # the churn's random state was carried too
    b.guest.background(50)
    assert _observe(a) == _observe(b)
    b.check_invariants()


def test_leaked_pages_survive_the_snapshot() -> None:
    s = _strategy("pool", FaultPlan(failure_rate=0.5, direction="to_private", seed=2))
    _run(s, 3, 400)
    assert isinstance(s, Resizable)
    s.shrink(1e6, True)
    leaked = s.stats().leaked_bytes
    assert leaked > 0  # fault injection left pages of unknown state
    assert _roundtrip(s).stats().leaked_bytes == leaked


def test_pickle_snapshot_is_refused_without_unpickling(tmp_path: Any) -> None:
    marker = tmp_path / "pwned"

    class Plant:
        def __reduce__(self) -> Any:
            return (open, (str(marker), "w"))

    data = zlib.compress(pickle.dumps({"format": 1, "seq": 3, "strategy": Plant()}))
    with pytest.raises(snapshot.SnapshotError) as err:
        snapshot.decode(3, data)
    assert "snapshot format 1 (a pickle) not understood" in str(err.value)
    assert "--reset-state" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (plaindata.pack({"format": 3, "seq": 1}, b""), "snapshot format 3 not understood"),
        (plaindata.pack({"seq": 1}, b""), "snapshot format None not understood"),
        (zlib.compress(b"garbage"), re.escape("format unknown (zlib, but not JSON)")),
        (b"not zlib", "not a zlib stream"),
    ],
)
def test_unknown_formats_are_refused(data: bytes, words: str) -> None:
    with pytest.raises(snapshot.SnapshotError, match=words):
        snapshot.decode(1, data)


def _doc(s: Strategy) -> tuple[dict[str, Any], memoryview]:
    data = snapshot.encode(snapshot.SnapshotContents(1, s, (), 0, 0.0))
    return plaindata.unpack(data)


def test_changed_class_is_refused_naming_it() -> None:
    doc, binary = _doc(_strategy("swiotlb"))
    for entry in doc["model"]:
        if entry[0] == "pool.guest.platform:SimulatedHost":
            entry[2] = "0" * 16  # as written by code in which the class had other fields
    with pytest.raises(snapshot.SnapshotError) as err:
        snapshot.decode(1, plaindata.pack(doc, binary))
    msg = str(err.value)
    assert "pool.guest.platform:SimulatedHost has other fields" in msg and "--reset-state" in msg


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("os:system", "outside the pool and daemon packages"),
        ("builtins:eval", "outside the pool and daemon packages"),
        ("pool.guest.__main__:main", "outside the pool and daemon packages"),
        ("pool.shared:np", "not a class defined in pool.shared"),  # numpy, imported there
        ("pool.shared:Nope", "does not exist in this version"),
        ("pool.shared:itertools", "not a class defined"),
    ],
)
def test_classes_outside_the_allowlist_are_refused(name: str, words: str) -> None:
    doc, binary = _doc(_strategy("swiotlb"))
    doc["model"][0][0] = name
    with pytest.raises(snapshot.SnapshotError, match=words):
        snapshot.decode(1, plaindata.pack(doc, binary))


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({"$": "pickle", "data": "x"}, "unknown tag 'pickle'"),
        ({"$": "ref", "i": 99}, "reference 99 to nothing built"),
        ({"$": "nd", "dt": "|O8", "sh": [1], "at": 0, "n": 8, "ro": False}, "not allowed"),
        ({"$": "nd", "dt": "<u4", "sh": [2], "at": 2, "n": 8, "ro": False}, "out of range"),
        ({"$": "nd", "dt": "<u4", "sh": [9], "at": 0, "n": 4, "ro": False}, "4 bytes"),
        ({"$": "obj", "c": 7, "f": {}}, "class index 7"),
        ({"$": "npgen", "bg": "os.system", "state": {}}, "not allowed"),
        ({"$": "dict", "k": [1, 2], "v": [1]}, "more keys than values"),
        ({"$": "tuple"}, "malformed data: KeyError"),
    ],
)
def test_malformed_values_are_refused(value: Any, words: str) -> None:
    data = plaindata.pack({"classes": [], "value": [1, value]}, b"1234")
    with pytest.raises(plaindata.PlainDataError, match=words):
        plaindata.loads(data)


def test_what_is_not_data_is_refused_at_encoding() -> None:
    import threading

    for bad, words in (
        (lambda: 1, "builtins.function: not data"),
        (threading.Lock(), "_thread.lock: not data"),
        (print, "builtin_function_or_method: not data"),
        (np.array([object()]), "dtype object"),
        (random, "module: not data"),
        (int, "builtins.type: not data"),
    ):
        with pytest.raises(plaindata.PlainDataError, match=words):
            plaindata.dumps({"x": [bad]})


def test_shared_references_cycles_and_special_values() -> None:
    shared = [1, 2]
    cyc: list[Any] = []
    cyc.append(cyc)
    arr = np.arange(10, dtype=np.int64)
    ro = np.ones((2, 3), dtype=np.float32)
    ro.flags.writeable = False
    value = {
        "a": shared,
        "b": shared,
        "cyc": cyc,
        "t": (shared, 1.5, math.inf, -math.inf),
        "nan": math.nan,
        3: frozenset({1, 2}),
        (1, 2): {4, 5},
        "dq": deque([1, 2], maxlen=5),
        "arr": arr,
        "arr2": arr,
        "ro": ro,
        "fortran": np.asfortranarray(np.arange(6).reshape(2, 3)),
        "np": np.float32(2.5),
        "rng": random.Random(4),
        "gen": np.random.default_rng(5),
        "bytes": b"\x00\x01",
        "ba": bytearray(b"xyz"),
        "q": array.array("q", [1, -2, 3]),
        "$": "dollar",
    }
    back = plaindata.loads(plaindata.dumps(value))
    assert back["a"] is back["b"] is back["t"][0] and back["a"] == [1, 2]
    assert back["cyc"][0] is back["cyc"]
    assert back["t"][1:] == (1.5, math.inf, -math.inf) and math.isnan(back["nan"])
    assert back[3] == frozenset({1, 2}) and back[(1, 2)] == {4, 5}
    assert back["dq"] == deque([1, 2]) and back["dq"].maxlen == 5
    assert (
        back["arr"] is back["arr2"] and (back["arr"] == arr).all() and back["arr"].flags.writeable
    )
    assert not back["ro"].flags.writeable and (back["ro"] == ro).all()
    assert (back["fortran"] == value["fortran"]).all()
    assert type(back["np"]) is np.float32 and back["np"] == 2.5
    assert back["rng"].random() == random.Random(4).random()
    assert back["gen"].integers(1 << 60) == np.random.default_rng(5).integers(1 << 60)
    assert back["bytes"] == b"\x00\x01" and back["ba"] == bytearray(b"xyz")
    assert back["q"] == array.array("q", [1, -2, 3]) and back["$"] == "dollar"


def test_cycle_through_a_tuple_is_refused() -> None:
    box: list[Any] = []
    t = (box,)
    box.append(t)
    with pytest.raises(plaindata.PlainDataError, match="cycle runs through a tuple"):
        plaindata.dumps(t)


_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
_hashables = st.recursive(
    _scalars, lambda c: st.tuples(c, c) | st.frozensets(c, max_size=3), max_leaves=6
)
_values = st.recursive(
    _scalars,
    lambda c: (
        st.lists(c, max_size=4)
        | st.tuples(c, c)
        | st.dictionaries(st.text(max_size=4), c, max_size=4)
        | st.dictionaries(_hashables, c, max_size=4)
        | st.sets(_hashables, max_size=4)
        | st.builds(deque, st.lists(c, max_size=3))
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(_values)
def test_codec_roundtrips_nested_plain_values(value: Any) -> None:
    back = plaindata.loads(plaindata.dumps(value))
    assert back == value
    _same_types(back, value)


def _same_types(a: Any, b: Any) -> None:
    """Same types all the way down (1 vs 1.0 vs True), dict order kept."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, list | tuple | deque):
        for x, y in zip(a, b, strict=True):
            _same_types(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same_types(a[k], b[k])
    elif isinstance(a, set | frozenset):
        for x in a:
            (y,) = [y for y in b if y == x]
            _same_types(x, y)


def test_strategy_error_types_are_not_in_a_state() -> None:
    assert issubclass(AllocationError, StrategyError)  # exceptions are refused as data
    with pytest.raises(plaindata.PlainDataError, match=r"derives from builtins\.Exception"):
        plaindata.dumps(AllocationError("exhausted", "x"))
