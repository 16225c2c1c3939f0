"""The daemon's clients: who they are, the hash of their token, their lease.

What only the daemon knows, and the pool never sees: a client is a name, a token (stored
as its SHA-256, compared in constant time) and a lease renewed by every authenticated
request. The strategy knows clients only as the `owner` string of its buffers.

Registrations are journaled (daemon.state); leases are not: `last_seen` is
time.monotonic() of this process, and a restart renews every lease.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator, Mapping

import attrs


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@attrs.define
class Client:
    id: str
    name: str
    token_hash: str = attrs.field(repr=False)
    registered_at: float  # wall clock, informational
    last_seen: float = 0.0  # time.monotonic(); not persisted (a restart renews every lease)


class Clients(Mapping[str, Client]):
    """The registered clients by id, with the index by token hash that authentication uses."""

    def __init__(self) -> None:
        self._by_id: dict[str, Client] = {}
        self._by_token: dict[str, str] = {}

    def __getitem__(self, cid: str) -> Client:
        return self._by_id[cid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, client: Client) -> None:
        self._by_id[client.id] = client
        self._by_token[client.token_hash] = client.id

    def drop(self, cid: str) -> Client:
        client = self._by_id.pop(cid)
        self._by_token.pop(client.token_hash, None)
        return client

    def authenticate(self, token: str, now: float) -> Client | None:
        """The client holding `token`, its lease renewed at `now`; None if no live client
        holds it. The lookup is keyed by a hash of the token, and the final comparison is
        constant-time."""
        th = token_hash(token)
        cid = self._by_token.get(th)
        client = None if cid is None else self._by_id.get(cid)
        if client is None or not hmac.compare_digest(client.token_hash, th):
            return None
        client.last_seen = now
        return client

    def expired(self, ttl: float, now: float) -> list[Client]:
        """The clients silent for more than `ttl` seconds at `now`."""
        return [c for c in self._by_id.values() if now - c.last_seen > ttl]

    def renew_all(self, now: float) -> None:
        for client in self._by_id.values():
            client.last_seen = now

    def check(self) -> None:
        """The token index is exactly the clients' tokens (AssertionError otherwise)."""
        want = {c.token_hash: c.id for c in self._by_id.values()}
        assert self._by_token == want, "token index != registered clients"
        assert all(cid == c.id for cid, c in self._by_id.items()), "a client under a wrong id"


class AdminCredential:
    """The admin bearer token (daemon.admin_token; empty: no token is admin)."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def matches(self, token: str) -> bool:
        return bool(self._token) and hmac.compare_digest(
            token.encode("utf-8", "surrogatepass"), self._token
        )
