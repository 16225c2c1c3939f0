"""The API's answers as typed, immutable values, parsed (and checked) once at the edge.

A buffer is the pool's own value, `pool.strategy.Buffer` (id, size, owner, purpose, the PFN
ranges in virtual order, `va`, and the derived `npages` and `gpadl_messages`): one
definition of a buffer whether it comes from an in-process strategy or over HTTP. The
others are the daemon's answers that have no pool counterpart.

`va` is a 64-bit kernel address, above 2**53 for every vmalloc address, so API v1.1 sends
it as a hex string ("0xffffc90001003000"); a v1.0 daemon's JSON integer is read too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

import attrs

from daemon.client.errors import BadResponse
from pool.strategy import Buffer, PfnRange, StrategyStats

__all__ = [
    "Buffer",
    "FreeResult",
    "PfnRange",
    "PoolStats",
    "Registration",
    "StrategyStats",
    "Unregistered",
    "parse_buffer",
    "parse_va",
]

T = TypeVar("T")


def parse_va(value: object) -> int:
    """`va` from the wire: "0x..." (v1.1) or a JSON integer (v1.0)."""
    if isinstance(value, str) and value[:2].lower() == "0x":
        return int(value, 16)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"va must be a 0x-prefixed hex string, got {value!r}")


def _int(data: Mapping[str, Any], key: str) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return value


def _parsed(what: str, data: object, build: Callable[[Mapping[str, Any]], T]) -> T:
    """`build(data)`, with any shape error raised as BadResponse naming `what`."""
    if not isinstance(data, Mapping):
        raise BadResponse(f"malformed {what} from the daemon: not an object: {data!r:.200}")
    try:
        return build(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise BadResponse(f"malformed {what} from the daemon: {exc!r}") from None


def _buffer(data: Mapping[str, Any]) -> Buffer:
    ranges = tuple(PfnRange(int(start), int(n)) for start, n in data["pfn_ranges"])
    return Buffer(
        id=_int(data, "id"),
        size=_int(data, "size"),
        owner=str(data["owner"]),
        purpose=str(data.get("purpose", "")),
        ranges=ranges,
        va=parse_va(data["va"]),
    )


def parse_buffer(data: object) -> Buffer:
    """A Buffer from the API's JSON (POST/GET /v1/buffers...)."""
    return _parsed("buffer", data, _buffer)


@attrs.frozen
class Registration:
    """POST /v1/clients: who we are at the daemon. The token is never shown in a repr."""

    client_id: str
    name: str
    lease_ttl_seconds: float
    token: str = attrs.field(repr=False)

    @classmethod
    def parse(cls, data: object) -> Registration:
        return _parsed(
            "registration",
            data,
            lambda d: cls(
                str(d["client_id"]), str(d["name"]), float(d["lease_ttl_seconds"]), str(d["token"])
            ),
        )


@attrs.frozen
class FreeResult:
    """DELETE /v1/buffers/{id}: the freed buffer, and whether its pages were leaked
    (re-encryption failed: the daemon keeps them out of use for ever)."""

    id: int
    leaked: bool
    buffer: Buffer | None = None

    @classmethod
    def parse(cls, data: object) -> FreeResult:
        def build(d: Mapping[str, Any]) -> FreeResult:
            leaked = d["leaked"]
            if not isinstance(leaked, bool):
                raise ValueError(f"leaked must be a boolean, got {leaked!r}")
            buffer = _buffer(d) if "pfn_ranges" in d else None
            return cls(_int(d, "id"), leaked, buffer)

        return _parsed("free result", data, build)


@attrs.frozen
class Unregistered:
    """DELETE /v1/clients/{id}: the buffers the daemon freed for us, and those it leaked."""

    client_id: str
    freed: tuple[int, ...]
    leaked: tuple[int, ...]

    @classmethod
    def parse(cls, data: object) -> Unregistered:
        return _parsed(
            "unregister result",
            data,
            lambda d: cls(
                str(d["client_id"]),
                tuple(int(i) for i in d["freed"]),
                tuple(int(i) for i in d["leaked"]),
            ),
        )


def _frozen_map(data: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(data))


_STRATEGY_FIELDS = frozenset(f.name for f in attrs.fields(StrategyStats))


def _strategy_stats(data: Mapping[str, Any]) -> StrategyStats:
    known = {k: v for k, v in data.items() if k in _STRATEGY_FIELDS}  # a newer daemon may add
    known["chunks"] = _frozen_map(known.get("chunks", {}))
    known["failure_reasons"] = _frozen_map(known.get("failure_reasons", {}))
    return StrategyStats(**known)


@attrs.frozen
class PoolStats:
    """GET /v1/pool. `strategy` is the pool's own reading (pool.strategy.StrategyStats: size,
    used, free, largest free piece, chunks by state, leaked bytes, grows and shrinks);
    the guest's direct map and hazard counts and the daemon's client and buffer counts sit
    beside it. `document` is the whole answer (conversion counts, per-zone buddy state)."""

    strategy: StrategyStats
    platform: str
    memory_bytes: int
    free_pages: int
    direct_map_bytes: Mapping[str, int]
    hazard_pages: Mapping[str, int]
    clients: int
    buffers: int
    reclaimed_buffers: int
    document: Mapping[str, Any] = attrs.field(repr=False, eq=False)

    @property
    def size_bytes(self) -> int:
        return self.strategy.size_bytes

    @property
    def used_bytes(self) -> int:
        return self.strategy.used_bytes

    @property
    def free_bytes(self) -> int:
        return self.strategy.free_bytes

    @property
    def largest_free_bytes(self) -> int:
        return self.strategy.largest_free_bytes

    @classmethod
    def parse(cls, data: object) -> PoolStats:
        def build(d: Mapping[str, Any]) -> PoolStats:
            guest, daemon = d["guest"], d["daemon"]
            return cls(
                strategy=_strategy_stats(d["strategy"]),
                platform=str(guest["platform"]),
                memory_bytes=_int(guest, "memory_bytes"),
                free_pages=_int(guest, "free_pages"),
                direct_map_bytes=_frozen_map(guest["direct_map_bytes"]),
                hazard_pages=_frozen_map(guest["hazard_pages"]),
                clients=_int(daemon, "clients"),
                buffers=_int(daemon, "buffers"),
                reclaimed_buffers=_int(daemon, "reclaimed_buffers"),
                document=_frozen_map(d),
            )

        return _parsed("pool stats", data, build)
