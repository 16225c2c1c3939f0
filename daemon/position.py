"""The last acknowledged journal position, kept outside the database.

SQLite ends a WAL at its first bad frame by design, and a deleted WAL or a database
restored from an old copy opens without complaint: the daemon would come up ready with an
older state — acknowledged buffers gone, freed ones back, tokens unknown — and the next
snapshot would make the loss permanent. So, as etcd does with its WAL and snapshot
indexes, the daemon remembers how far it acknowledged, somewhere a lost WAL cannot take
with it: this small file beside the database, written after every durable commit and
before the answers go out (fsynced when the journal is: ``synchronous=full``).

At start the journal must reach at least this position, and the record there must carry
the same chain hash (daemon.journal: every record's hash covers the previous one, so one
hash stands for the whole history up to it). A journal that is longer is fine: those
records were committed but never acknowledged (a crash between the two writes).

Layout: two 64-byte slots, written alternately, each ``magic | generation | seq | chain |
crc32``; a torn write damages one slot, and the other still holds the previous position
(which the journal also reaches). The valid slot of the highest generation wins (not the
highest seq: a rollback the operator accepted writes a lower one).
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import attrs

__all__ = ["POSITION_NAME", "Position", "PositionFile"]

POSITION_NAME = "sharedpoold.position"
_MAGIC = b"SPP1"
_SLOT = struct.Struct("<4sQQ32s")  # magic, generation, seq, chain (32 bytes of sha256)
_SLOT_SIZE = 64


@attrs.frozen
class Position:
    """Journal record `seq` (0: nothing yet) with the chain hash `chain` (hex)."""

    seq: int
    chain: str


class PositionFile:
    """Read and write the position; one writer (the journal's thread)."""

    def __init__(self, path: Path, sync: bool = True) -> None:
        self.path = path
        self.sync = sync
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        slots = self._slots()
        newest = max(slots, key=lambda s: s[1]) if slots else None
        self._generation = newest[1] if newest else 0
        self._next_slot = 1 - newest[0] if newest else 0

    def _slots(self) -> list[tuple[int, int, Position]]:
        """(slot, generation, position) of each valid slot."""
        data = os.pread(self._fd, 2 * _SLOT_SIZE, 0)
        out = []
        for i in range(2):
            raw = data[i * _SLOT_SIZE : (i + 1) * _SLOT_SIZE]
            if len(raw) < _SLOT.size + 4:
                continue
            body, crc = raw[: _SLOT.size], struct.unpack("<I", raw[_SLOT.size : _SLOT.size + 4])[0]
            magic, generation, seq, chain = _SLOT.unpack(body)
            if magic == _MAGIC and zlib.crc32(body) == crc:
                out.append((i, generation, Position(seq, chain.hex())))
        return out

    def read(self) -> Position | None:
        """The newest valid position, or None when none was ever written."""
        slots = self._slots()
        return max(slots, key=lambda s: s[1])[2] if slots else None

    def write(self, pos: Position) -> None:
        self._generation += 1
        body = _SLOT.pack(_MAGIC, self._generation, pos.seq, bytes.fromhex(pos.chain))
        raw = body + struct.pack("<I", zlib.crc32(body))
        os.pwrite(self._fd, raw.ljust(_SLOT_SIZE, b"\0"), self._next_slot * _SLOT_SIZE)
        if self.sync:
            os.fdatasync(self._fd)
        self._next_slot = 1 - self._next_slot

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
