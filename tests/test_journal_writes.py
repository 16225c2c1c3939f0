"""The journal's write path: a batch's atomicity and chain, the frames AsyncJournal sends
its writer process, and the group commit (the writer commits whatever has arrived, each
waiter is woken at its own commit; a failed write or a dead writer fails every waiter)."""

from __future__ import annotations

import asyncio
import enum
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from daemon.journal import (
    GENESIS,
    AsyncJournal,
    Journal,
    JournalError,
    _dumps,
    chain_next,
    decode_frames,
    encode_frame,
)

BIG = 2500

Record = tuple[int, str, dict[str, Any], Any]


def records(first: int, n: int) -> list[Record]:
    return [
        (s, "free", {"owner": "c-1", "id": s}, {"leaked": False}) for s in range(first, first + n)
    ]


def expected_chain(recs: list[Record], prev: str = GENESIS) -> str:
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


async def test_a_failed_write_fails_every_waiter_and_later_appends(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    aj = AsyncJournal(j, 0)
    # another connection takes record 1 first: the writer's INSERT fails (not a full disk)
    other = sqlite3.connect(tmp_path / "j.db")
    other.execute("INSERT INTO journal VALUES (1, 'free', '{}', '{}', ?)", (GENESIS,))
    other.commit()
    other.close()
    try:
        seqs = [aj.append("free", {"id": i}, {}) for i in range(5)]
        results = await asyncio.wait_for(
            asyncio.gather(*(aj.sync(s) for s in seqs), return_exceptions=True), 30
        )
        assert all(isinstance(r, JournalError) for r in results), results
        assert aj.failed is not None and aj.committed == 0
        assert "UNIQUE constraint failed" in str(aj.failed)
        with pytest.raises(JournalError):
            aj.append("free", {"id": 9}, {})
    finally:
        aj.close()


async def test_a_dead_writer_fails_every_waiter_at_once(tmp_path: Path) -> None:
    aj = AsyncJournal(Journal(tmp_path / "j.db"), 0)
    try:
        await asyncio.wait_for(aj.sync(aj.append("free", {"id": 1}, {})), 30)
        os.kill(aj._proc.pid, signal.SIGKILL)
        seq = aj.append("free", {"id": 2}, {})
        with pytest.raises(JournalError) as err:
            await asyncio.wait_for(aj.sync(seq), 30)
        assert "the journal writer exited (signal 9)" in str(err.value)
        assert aj.committed == 1
    finally:
        aj.close()
    assert [r[0] for r in Journal(tmp_path / "j.db").records()] == [1]


async def test_the_writer_ignores_ctrl_c_and_commits_what_it_was_sent_at_close(
    tmp_path: Path,
) -> None:
    aj = AsyncJournal(Journal(tmp_path / "j.db"), 0)
    await asyncio.wait_for(aj.sync(aj.append("free", {"id": 1}, {})), 30)
    os.kill(aj._proc.pid, signal.SIGINT)  # a Ctrl-C reaches the whole process group
    os.kill(aj._proc.pid, signal.SIGTERM)  # so does a systemd stop
    for i in range(2, 6):
        aj.append("free", {"id": i}, {})
    await asyncio.sleep(0)  # the frames go out at the end of the loop turn
    aj.close()  # not synced: the writer commits them at the end of its input
    assert aj._proc.returncode == 0
    assert [r[0] for r in Journal(tmp_path / "j.db").records()] == [1, 2, 3, 4, 5]


class Colour(enum.StrEnum):
    RED = "red"


def test_a_frame_round_trips_and_an_enum_journals_as_its_value() -> None:
    rec = (7, "allocate", {"size": 4096, "purpose": Colour.RED}, {"ranges": [[1, 2]]})
    buf = bytearray(encode_frame(rec) + encode_frame((8, "free", {}, None)))
    torn = encode_frame((9, "free", {}, None))
    buf += torn[:-1]  # the daemon died in the middle of a frame
    out = decode_frames(buf)
    assert [r[0] for r in out] == [7, 8] and bytes(buf) == torn[:-1]
    _, _, args, result = out[0]
    assert (_dumps(args), _dumps(result)) == (_dumps(rec[2]), _dumps(rec[3]))
    assert args["purpose"] == "red" and type(args["purpose"]) is str


def test_a_frame_is_taken_when_appended_not_when_sent() -> None:
    args: dict[str, Any] = {"id": 1}
    frame = encode_frame((1, "free", args, {}))
    args["id"] = 2  # the caller reuses its dict
    assert decode_frames(bytearray(frame))[0][2] == {"id": 1}


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
