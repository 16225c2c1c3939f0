"""When to send a refused request again: only a 503, within a deadline, after the wait the
daemon asked for.

A 503 from sharedpoold means "not now, nothing was changed": the pool is growing
(`pool-exhausted`), a conversion failed and its pages were leaked (`conversion-failed`), or
the daemon is starting or restoring its state (`not-ready`). Every 503 carries Retry-After.
Any other error status is final: a 4xx will not get better by asking again, and a 500 is a
bug. A connection failure is not retried either: the request may have been applied.
"""

from __future__ import annotations

import email.utils
import re
from datetime import UTC, datetime

import attrs

__all__ = ["NO_RETRY", "RetryPolicy", "parse_retry_after"]

_DELAY_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (RFC 9110 section 10.2.3): either
    delay-seconds ("120") or an HTTP-date ("Wed, 21 Oct 2015 07:28:00 GMT", also the obsolete
    RFC 850 and asctime forms, which email.utils parses too). A date in the past is 0 s.
    None when the header is absent or unreadable. `now` (aware) is for tests."""
    if value is None:
        return None
    text = value.strip()
    if _DELAY_SECONDS.fullmatch(text):
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, by RFC 5322's convention
        when = when.replace(tzinfo=UTC)
    delta = (when - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, delta)


@attrs.frozen
class RetryPolicy:
    """How a call retries a 503: at most `attempts` requests in all, never past `deadline`
    seconds from the first one. The wait is the daemon's Retry-After, capped at `max_wait`;
    without one, `backoff` doubled each time. A wait that would end past the deadline is
    not started: the 503 is raised at once (as ApiError, `attempts` set)."""

    attempts: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    deadline: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    max_wait: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    backoff: float = attrs.field(default=0.1, validator=attrs.validators.ge(0))

    def wait(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after the `attempt`-th (1-based) 503."""
        if retry_after is not None:
            return min(retry_after, self.max_wait)
        return min(self.backoff * 2.0 ** (attempt - 1), self.max_wait)


NO_RETRY = RetryPolicy(attempts=1, deadline=0.0)
