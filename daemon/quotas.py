"""Quotas: what one client, and all clients together, may hold.

Registration was free and unlimited (20,000 clients in 7 s), one client could take the
whole pool, and one client holding 262,144 one-byte buffers made listings crawl. These are
the daemon's rules, not the pool's (the pool knows owners only as strings): a maximum
number of registered clients, and per client a maximum of live buffers and of bytes.

A refusal changes nothing and is not journaled (it is not an outcome of the strategy); it
answers 429 (a client's own quota) or 503 (the daemon's client table is full) with a
problem document whose `reason` names the limit, and is counted in
`sharedpool_quota_refusals_total{reason}`.
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["REASONS", "QuotaExceeded", "Quotas"]

REASONS = ("max_clients", "client_buffers", "client_bytes")


class QuotaExceeded(Exception):
    """A quota refused the request (nothing changed). `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@attrs.define
class Quotas(Collector):
    """The limits (from daemon.max_clients, client_max_buffers, client_max_bytes) and how
    often each refused."""

    max_clients: int
    client_max_buffers: int
    client_max_bytes: int
    refusals: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(REASONS, 0))

    def _refuse(self, reason: str, message: str) -> QuotaExceeded:
        self.refusals[reason] += 1
        return QuotaExceeded(reason, message)

    def check_register(self, registered: int) -> None:
        if registered >= self.max_clients:
            raise self._refuse(
                "max_clients", f"{registered} clients are registered, the most this daemon takes"
            )

    def check_allocate(self, buffers: int, held_bytes: int, size: int) -> None:
        """`buffers` and `held_bytes`: what the client holds now; `size`: what it asks for."""
        if buffers >= self.client_max_buffers:
            raise self._refuse(
                "client_buffers",
                f"the client holds {buffers} buffers, its quota (daemon.client_max_buffers)",
            )
        if held_bytes + size > self.client_max_bytes:
            raise self._refuse(
                "client_bytes",
                f"{held_bytes} bytes held + {size} asked exceed the client's quota of "
                f"{self.client_max_bytes} bytes (daemon.client_max_bytes)",
            )

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "sharedpool_quota_refusals",
            "Requests refused by a quota (no state changed), by the limit that refused",
            labels=["reason"],
        )
        for reason in REASONS:
            family.add_metric([reason], self.refusals[reason])
        yield family
