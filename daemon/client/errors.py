"""The client library's errors: one hierarchy, so that a caller never sees aiohttp's.

    SharedPoolError
    ├── ApiError            the daemon answered with an error (a problem+json document)
    │   └── LeaseLost       ... 401 for our own registration: the daemon expired or forgot it
    ├── DaemonUnavailable   no answer: socket or TCP failure, timeout (also a ConnectionError)
    └── BadResponse         an answer that is not what the API documents

Callers switch on `ApiError.name` (the problem type's short name, stable) or `status`, never
on `title` or `detail` (daemon/problems.py lists the names).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PROBLEM_PREFIX = "urn:sharedpool:problem:"

__all__ = [
    "PROBLEM_PREFIX",
    "ApiError",
    "BadResponse",
    "DaemonUnavailable",
    "LeaseLost",
    "SharedPoolError",
]


class SharedPoolError(Exception):
    """Base of every error the client raises."""


class ApiError(SharedPoolError):
    """The daemon refused the request: `status`, and the problem document's `type`, `title`,
    `detail` and — for allocation refusals — `reason` (the strategy's word: exhausted,
    no_memory, too_large, conversion_failed, invalid_size). `retry_after`: seconds the daemon
    asked us to wait (503), from either form of the Retry-After header. `attempts`: requests
    sent for this call (more than 1 when 503s were retried)."""

    def __init__(
        self,
        status: int,
        type: str,
        title: str,
        detail: str = "",
        retry_after: float | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}" if detail else f"{status} {title}")
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.retry_after = retry_after
        self.body: dict[str, Any] = dict(body or {})
        self.attempts = 1

    @property
    def name(self) -> str:
        """'pool-exhausted' for urn:sharedpool:problem:pool-exhausted ('' for about:blank)."""
        if self.type.startswith(PROBLEM_PREFIX):
            return self.type[len(PROBLEM_PREFIX) :]
        return ""

    @property
    def reason(self) -> str:
        """The strategy's refusal reason when the daemon gave one, else ''."""
        value = self.body.get("reason")
        return value if isinstance(value, str) else ""


class LeaseLost(ApiError):
    """Our registration is gone: the daemon expired the lease (the client was silent for
    longer than `lease_ttl_seconds`, or the keep-alive could not reach it in time) and
    reclaimed every buffer the client held. Raised by the first call after the loss is
    known, and by every call after it: register again with a new client."""

    @classmethod
    def from_error(cls, err: ApiError, client_id: str) -> LeaseLost:
        lost = cls(err.status, err.type, err.title, err.detail, err.retry_after, err.body)
        lost.args = (
            f"the lease of client {client_id} was lost (the daemon reclaimed its buffers): {err}",
        )
        lost.client_id = client_id
        return lost

    client_id: str = ""


class DaemonUnavailable(SharedPoolError, ConnectionError):
    """The daemon could not be reached or did not answer: nothing listens on the socket,
    the connection broke mid-request, or the request timed out. Whether a request in flight
    was applied is unknown (list the buffers to find out)."""


class BadResponse(SharedPoolError):
    """The daemon answered with something the API does not document (a bug or a proxy)."""
