"""The Ledger every strategy shares: ids, ownership, the three free errors, counters."""

from __future__ import annotations

import pytest

from pool.ownership import Ledger
from pool.strategy import (
    AllocationError,
    Buffer,
    DoubleFree,
    NotOwner,
    PfnRange,
    UnknownBuffer,
    check_size,
)


def buf(
    ledger: Ledger, owner: str = "a", start: int = 0, npages: int = 1, size: int = 4096
) -> Buffer:
    return Buffer(
        id=ledger.next_id(),
        size=size,
        owner=owner,
        purpose="t",
        ranges=(PfnRange(start, npages),),
        va=0,
    )


def snapshot(ledger: Ledger) -> tuple[object, ...]:
    return (
        ledger.buffers(),
        ledger.allocations,
        ledger.failures,
        ledger.frees,
        dict(ledger.failure_reasons),
        ledger.used_pages,
        ledger.requested_bytes,
        ledger.peek_next_id,
    )


def test_ids_are_unique_and_monotonic() -> None:
    led = Ledger()
    ids = [led.next_id() for _ in range(100)]
    assert ids == sorted(set(ids))
    assert ids[0] == 1


def test_add_get_buffers_and_counters() -> None:
    led = Ledger()
    a = buf(led, "a", 0, 2, 5000)
    b = buf(led, "b", 10, 1, 100)
    led.add(a)
    led.add(b)
    assert led.get(a.id) is a
    assert led.buffers() == [a, b]
    assert led.buffers("b") == [b]
    assert led.buffers("nobody") == []
    assert len(led) == 2 and a.id in led
    assert led.used_pages == 3 and led.requested_bytes == 5100
    assert led.allocations == 2
    assert led.owners() == {"a", "b"}
    led.check()


def test_three_free_errors_are_distinct_and_change_nothing() -> None:
    led = Ledger()
    a = buf(led, "a")
    led.add(a)
    before = snapshot(led)
    with pytest.raises(NotOwner):
        led.lookup_for_free(a.id, "b")
    with pytest.raises(UnknownBuffer):
        led.lookup_for_free(999, "a")
    assert snapshot(led) == before
    assert led.lookup_for_free(a.id, "a") is a
    assert snapshot(led) == before
    led.remove(a.id)
    assert led.frees == 1 and led.used_pages == 0
    after = snapshot(led)
    with pytest.raises(DoubleFree):
        led.lookup_for_free(a.id, "a")
    with pytest.raises(DoubleFree):  # even by another owner: it is gone, not someone else's
        led.lookup_for_free(a.id, "b")
    assert snapshot(led) == after
    with pytest.raises(UnknownBuffer, match="was freed"):
        led.get(a.id)
    assert led.was_freed(a.id)
    # The three are distinct classes and reasons.
    reasons = {UnknownBuffer.reason, NotOwner.reason, DoubleFree.reason}
    assert len(reasons) == 3
    assert not issubclass(DoubleFree, UnknownBuffer) and not issubclass(NotOwner, UnknownBuffer)


def test_ids_never_reused_and_add_refuses_duplicates() -> None:
    led = Ledger()
    a = buf(led)
    led.add(a)
    led.remove(a.id)
    with pytest.raises(ValueError):
        led.add(a)
    assert led.next_id() > a.id


def test_failures_by_reason() -> None:
    led = Ledger()
    err = led.fail("too_large", "no")
    assert isinstance(err, AllocationError) and err.reason == "too_large"
    try:
        check_size(0)
    except AllocationError as e:
        assert led.fail(e) is e
    led.record_failure("too_large")
    assert led.failures == 3
    assert led.failure_reasons == {"too_large": 2, "invalid_size": 1}
    # a copy: mutating it does not touch the ledger
    reasons = led.failure_reasons
    assert isinstance(reasons, dict)
    reasons["x"] = 1  # type: ignore[index]
    assert "x" not in led.failure_reasons


def test_check_finds_overlapping_pfns() -> None:
    led = Ledger()
    led.add(buf(led, start=0, npages=4))
    led.add(buf(led, start=3, npages=2))
    with pytest.raises(AssertionError, match="two live buffers"):
        led.check()
    led.check(disjoint=False)
