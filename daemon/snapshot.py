"""The snapshot format: the whole in-memory state as of one journal record, as plain data.

Format 2 (daemon.plaindata: zlib of one JSON line plus a binary section; nothing in it can
run code): ``format`` (2), ``seq`` (the journal record it covers), ``model`` (the class
table: for each class in the graph its name and a hash of its sorted field names),
``strategy`` (the strategy object with its guest, as an object graph), ``clients`` (rows
of id, name, token hash, registration time), ``reclaimed`` (buffers reclaimed from expired
leases) and ``clock`` (the pool clock). Leases are not in it: a restart renews them all.

Decoding refuses, before building anything, a snapshot of another format (format 1 was a
pickle: recognised without unpickling, as a zlib stream whose content is not JSON) and one
whose model differs from this code's (a code upgrade changed a class), naming the class.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from daemon import plaindata
from pool.strategy import Strategy

SNAPSHOT_FORMAT = 2
_ADVICE = "start with --reset-state or restore from the journal of a daemon of that version"


class SnapshotError(RuntimeError):
    """A snapshot this daemon cannot read (or a state it cannot write as one)."""


@attrs.frozen
class SnapshotContents:
    seq: int
    strategy: Strategy
    clients: tuple[tuple[str, str, str, float], ...]  # id, name, token hash, registered at
    reclaimed: int
    clock: float


@attrs.frozen
class Prepared:
    """A snapshot walked but not yet packed: the JSON document and the binary section, both
    fresh objects that share nothing with the live state. The walk must see one consistent
    state, so it runs on the event loop; :meth:`pack` (JSON encoding and zlib, most of the
    time) touches only these copies, so the daemon runs it on its journal's worker thread."""

    document: dict[str, Any]
    binary: bytearray

    def pack(self) -> bytes:
        return plaindata.pack(self.document, self.binary)


def encode(contents: SnapshotContents) -> bytes:
    return prepare(contents).pack()


def prepare(contents: SnapshotContents) -> Prepared:
    """Walk the state into plain data (the part of :func:`encode` that reads the state)."""
    enc = plaindata.Encoder()
    try:
        strategy = enc.encode(contents.strategy)
    except plaindata.PlainDataError as exc:
        raise SnapshotError(f"the state cannot be written as a snapshot: {exc}") from None
    document: dict[str, Any] = {
        "format": SNAPSHOT_FORMAT,
        "seq": contents.seq,
        "model": enc.class_table(),
        "strategy": strategy,
        "clients": [list(row) for row in contents.clients],
        "reclaimed": contents.reclaimed,
        "clock": contents.clock,
    }
    return Prepared(document, enc.binary)


def _format_of(data: bytes) -> tuple[Any, Any]:
    try:
        return plaindata.unpack(data)
    except plaindata.NotJson as exc:
        what = "1 (a pickle)" if exc.pickle else "unknown (zlib, but not JSON)"
        raise SnapshotError(f"snapshot format {what} not understood: {_ADVICE}") from None
    except plaindata.PlainDataError as exc:
        raise SnapshotError(f"snapshot format unknown ({exc}) not understood: {_ADVICE}") from None


def _client(row: Any) -> tuple[str, str, str, float]:
    if not (
        type(row) is list
        and len(row) == 4
        and all(type(v) is str for v in row[:3])
        and type(row[3]) in (int, float)
        and math.isfinite(row[3])
    ):
        raise SnapshotError(f"snapshot client row {row!r:.80} malformed")
    return row[0], row[1], row[2], float(row[3])


def decode(seq: int, data: bytes) -> SnapshotContents:
    """The snapshot stored for record `seq`; SnapshotError (one line) if its format, seq or
    model differ from this daemon's, or if anything in it is malformed."""
    document, binary = _format_of(data)
    fmt = document.get("format")
    if fmt != SNAPSHOT_FORMAT:
        raise SnapshotError(f"snapshot format {fmt!r:.20} not understood: {_ADVICE}")
    if document.get("seq") != seq:
        raise SnapshotError(
            f"snapshot seq {document.get('seq')!r:.20} does not match its row's ({seq})"
        )
    try:
        decoder = plaindata.Decoder(document["model"], binary)
    except plaindata.PlainDataError as exc:
        raise SnapshotError(f"snapshot model: {exc}: {_ADVICE}") from None
    except KeyError:
        raise SnapshotError("snapshot without a model") from None
    try:
        strategy = decoder.decode(document["strategy"])
        clients, reclaimed, clock = document["clients"], document["reclaimed"], document["clock"]
    except plaindata.PlainDataError as exc:
        raise SnapshotError(f"snapshot at record {seq}: {exc}") from None
    except KeyError as exc:
        raise SnapshotError(f"snapshot at record {seq}: no {exc}") from None
    if type(clients) is not list or type(reclaimed) is not int or type(clock) not in (int, float):
        raise SnapshotError(f"snapshot at record {seq}: clients, reclaimed or clock malformed")
    if not all(callable(getattr(strategy, m, None)) for m in ("allocate", "free", "stats")):
        raise SnapshotError(f"snapshot at record {seq}: its strategy is not a strategy")
    return SnapshotContents(
        seq, strategy, tuple(_client(row) for row in clients), reclaimed, float(clock)
    )
