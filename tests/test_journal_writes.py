"""The journal's write path: a batch's atomicity and chain, and the group commit of
AsyncJournal (the writer thread runs transactions back to back and wakes each waiter at
its own commit)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from daemon.journal import GENESIS, AsyncJournal, Journal, JournalError, chain_next

BIG = 2500

Record = tuple[int, str, dict[str, Any], Any]


def records(first: int, n: int) -> list[Record]:
    return [
        (s, "free", {"owner": "c-1", "id": s}, {"leaked": False}) for s in range(first, first + n)
    ]


def expected_chain(recs: list[Record], prev: str = GENESIS) -> str:
    from daemon.journal import _dumps

    for seq, op, a, r in recs:
        prev = chain_next(prev, seq, op, _dumps(a), _dumps(r))
    return prev


def test_a_large_batch_is_written_whole_and_chained(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    recs = records(1, BIG)
    pos = j.write(recs)
    assert pos.seq == len(recs) and j.last_seq() == len(recs)
    assert pos.chain == j.last_chain == expected_chain(recs) == j.chain_at(len(recs))
    assert [r[0] for r in j.records()] == list(range(1, len(recs) + 1))
    assert next(iter(j.records(len(recs) - 1)))[2] == {"owner": "c-1", "id": len(recs)}


def test_a_batch_failing_part_way_leaves_nothing(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    j.write(records(1, 3))
    chain = j.last_chain
    bad = records(4, BIG)
    bad[BIG - 5] = (2, "free", {}, {})  # seq 2 exists: the INSERT fails near the end
    with pytest.raises(sqlite3.IntegrityError):
        j.write(bad)
    assert j.last_seq() == 3 and j.count() == 3 and j.last_chain == chain
    assert j.write(records(4, 2)).seq == 5  # and the journal goes on from there


def test_an_empty_batch_writes_nothing(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    assert j.write([]).seq == 0 and j.count() == 0
    assert j.write(records(1, 5)).seq == 5
    assert j.chain_at(5) == expected_chain(records(1, 5))


async def test_group_commit_wakes_every_waiter_with_its_record_durable(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    aj = AsyncJournal(j, 0)
    durable_at_wake: list[bool] = []

    async def client(k: int) -> None:
        for _ in range(20):
            seq = aj.append("free", {"owner": f"c-{k}", "id": aj.last_seq + 1}, {"leaked": False})
            await aj.sync(seq)
            durable_at_wake.append(aj.committed >= seq)
            await asyncio.sleep(0)

    try:
        await asyncio.wait_for(asyncio.gather(*(client(k) for k in range(16))), 60)
        assert all(durable_at_wake) and len(durable_at_wake) == 320
        assert aj.committed == aj.last_seq == 320 and aj.pending == 0
        assert 1 <= aj.writes < 320  # grouped: fewer transactions than records
        assert [r[0] for r in j.records()] == list(range(1, 321))  # in append order
    finally:
        aj.close()


class _Broken(Journal):
    def write(self, records: list[Record]) -> Any:
        raise sqlite3.DatabaseError("disk I/O error")


async def test_a_failed_write_fails_every_waiter_and_later_appends(tmp_path: Path) -> None:
    aj = AsyncJournal(_Broken(tmp_path / "j.db"), 0)
    try:
        seqs = [aj.append("free", {"id": i}, {}) for i in range(5)]
        results = await asyncio.wait_for(
            asyncio.gather(*(aj.sync(s) for s in seqs), return_exceptions=True), 30
        )
        assert all(isinstance(r, JournalError) for r in results), results
        assert aj.failed is not None and aj.committed == 0
        with pytest.raises(JournalError):
            aj.append("free", {"id": 9}, {})
    finally:
        aj.close()


async def test_a_cancelled_waiter_does_not_disturb_the_others(tmp_path: Path) -> None:
    aj = AsyncJournal(Journal(tmp_path / "j.db"), 0)
    try:
        first = aj.append("free", {"id": 1}, {})
        gone = asyncio.ensure_future(aj.sync(first))
        await asyncio.sleep(0)
        gone.cancel()
        second = aj.append("free", {"id": 2}, {})
        await asyncio.wait_for(aj.sync(second), 30)
        assert aj.committed == 2
    finally:
        aj.close()
