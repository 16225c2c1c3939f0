"""Bounded memory: what the soak found. The ledger used to remember every freed buffer id
in a set (to answer a double free 409 rather than 404), so the daemon's memory, and each
snapshot it pickles, grew by ~70-80 bytes per free for its whole life (the 10-minute soak:
RSS 73 MB -> 137 MB, +86 %, at ~1,500 frees/s). It now keeps the ids ever added as a few runs
of consecutive ids: these tests pin that the bookkeeping stays constant-size, that the
three free errors are still told apart exactly, and that a snapshot pickled with the old
set still loads."""

from __future__ import annotations

import pickle
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pool.ownership import Ledger
from pool.strategy import Buffer, DoubleFree, NotOwner, PfnRange, UnknownBuffer


def _buf(bid: int, owner: str = "a") -> Buffer:
    return Buffer(id=bid, size=4096, owner=owner, purpose="", ranges=(PfnRange(bid, 1),), va=0)


def test_freed_ids_cost_no_memory() -> None:
    led = Ledger()
    rng = random.Random(1)
    live: list[int] = []
    for _ in range(50_000):
        if live and (len(live) > 20 or rng.random() < 0.5):
            bid = live.pop(rng.randrange(len(live)))
            led.lookup_for_free(bid, "a")
            led.remove(bid)
        else:
            b = _buf(led.next_id())
            led.add(b)
            live.append(b.id)
    assert len(led._added) == 1  # one run of consecutive ids, whatever the churn
    assert len(pickle.dumps(led)) < 4096
    led.check()
    with pytest.raises(DoubleFree):
        led.lookup_for_free(1, "a")
    with pytest.raises(UnknownBuffer):
        led.lookup_for_free(led.peek_next_id, "a")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["next", "gap", "free", "explicit"]), st.integers(1, 60)),
        max_size=80,
    )
)
def test_free_errors_match_a_reference_set(ops: list[tuple[str, int]]) -> None:
    """Against the old semantics (a set of freed ids): DoubleFree for a freed id, UnknownBuffer
    for an id never added (gaps of ids consumed by failed allocations, ids past the counter),
    NotOwner for another client's live buffer."""
    led = Ledger()
    live: dict[int, str] = {}
    freed: set[int] = set()
    for kind, n in ops:
        if kind == "next":
            b = _buf(led.next_id(), owner="a" if n % 2 else "b")
            led.add(b)
            live[b.id] = b.owner
        elif kind == "gap":
            led.next_id()  # consumed, never added
        elif kind == "explicit" and n not in live and n not in freed:
            led.add(_buf(n))  # an id not from the counter, in any order
            live[n] = "a"
        elif kind == "free" and live:
            bid = sorted(live)[n % len(live)]
            led.lookup_for_free(bid, live.pop(bid))
            led.remove(bid)
            freed.add(bid)
    led.check()
    for bid in range(0, led.peek_next_id + 3):
        assert led.was_freed(bid) == (bid in freed)
        if bid in live:
            other = "b" if live[bid] == "a" else "a"
            with pytest.raises(NotOwner):
                led.lookup_for_free(bid, other)
        elif bid in freed:
            with pytest.raises(DoubleFree):
                led.lookup_for_free(bid, "a")
        else:
            with pytest.raises(UnknownBuffer):
                led.lookup_for_free(bid, "a")
    for bid in list(freed)[:3] + list(live)[:3]:
        with pytest.raises(ValueError):  # an id is never handed out twice
            led.add(_buf(bid))


def test_a_snapshot_with_the_old_freed_set_still_loads() -> None:
    led = Ledger()
    for _ in range(5):
        led.add(_buf(led.next_id()))
    for bid in (1, 2, 4):
        led.remove(bid)
    # the state an older daemon pickled: the same slots, with _freed instead of _added
    slots = {k: getattr(led, k) for k in Ledger.__slots__ if k != "_added"}
    slots["_freed"] = {1, 2, 4}
    old = Ledger.__new__(Ledger)
    old.__setstate__((None, slots))
    assert old._added == [[1, 6]]
    assert old.was_freed(2) and not old.was_freed(3) and not old.was_freed(6)
    old.check()
    again = pickle.loads(pickle.dumps(old))
    assert again._added == old._added and again.buffers() == old.buffers()
