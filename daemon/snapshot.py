"""The snapshot format: the whole in-memory state as of one journal record, as bytes.

A zlib-compressed pickle of a dict (format 1): ``format``, ``seq`` (the journal record it
covers), ``strategy`` (the strategy object, with its guest), ``clients`` (rows of id, name,
token hash, registration time), ``reclaimed`` (buffers reclaimed from expired leases) and
``clock`` (the pool clock). Leases are not in it: a restart renews them all.

The pickle is written by this daemon into its own 0700 state directory and read only from
there (daemon.journal stores it; daemon.state decides when to read it).
"""

from __future__ import annotations

import pickle
import zlib
from typing import Any

import attrs

from pool.strategy import Strategy

SNAPSHOT_FORMAT = 1


class SnapshotError(RuntimeError):
    """A snapshot this daemon cannot read."""


@attrs.frozen
class SnapshotContents:
    seq: int
    strategy: Strategy
    clients: tuple[tuple[str, str, str, float], ...]  # id, name, token hash, registered at
    reclaimed: int
    clock: float


def encode(contents: SnapshotContents) -> bytes:
    state: dict[str, Any] = {
        "format": SNAPSHOT_FORMAT,
        "seq": contents.seq,
        "strategy": contents.strategy,
        "clients": list(contents.clients),
        "reclaimed": contents.reclaimed,
        "clock": contents.clock,
    }
    return zlib.compress(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL), 1)


def decode(seq: int, data: bytes) -> SnapshotContents:
    """The snapshot stored for record `seq`; SnapshotError if its format or seq differ."""
    state = pickle.loads(zlib.decompress(data))
    if state.get("format") != SNAPSHOT_FORMAT or state.get("seq") != seq:
        raise SnapshotError(
            f"snapshot format {state.get('format')} / seq {state.get('seq')} "
            f"not understood (expected format {SNAPSHOT_FORMAT}, seq {seq})"
        )
    return SnapshotContents(
        seq,
        state["strategy"],
        tuple(tuple(row) for row in state["clients"]),
        state["reclaimed"],
        state["clock"],
    )
