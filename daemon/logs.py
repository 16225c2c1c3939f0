"""Logging: plain text or JSON lines. Tokens are never passed to a logger (the daemon logs
client ids, never credentials); as a second line of defence, a filter masks anything that
looks like a bearer token."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")


def redact(text: str) -> str:
    """Mask bearer tokens in a formatted log line, traceback included: aiohttp's parser errors
    quote the offending header line (an over-long Authorization header put a live token in
    the log through the traceback, past the message-only filter)."""
    return _BEARER.sub(r"\1<redacted>", text) if "earer" in text else text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(out, default=str))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = {k: v for k, v in vars(record).items() if k not in _STD and not k.startswith("_")}
        if extra:
            text += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return redact(text)


class RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "earer" in msg:
            record.msg = _BEARER.sub(r"\1<redacted>", msg)
            record.args = ()
        return True


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (bad request line, bad header) as an ERROR
    with a ~700-byte traceback, once per request: a client's garbage, not a daemon error.
    It becomes one WARNING line without a traceback, at most one a second, carrying how
    many such requests it stands for (the client gets its 400 either way)."""

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__()
        self.interval = interval
        self._last = -float("inf")
        self._count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        self._count += 1
        now = time.monotonic()
        if now - self._last < self.interval:
            return False
        self._last = now
        first = str(exc.message).strip().splitlines()[0] if exc.message else type(exc).__name__
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = "malformed HTTP request refused: %s", (first[:120],)
        record.exc_info, record.exc_text = None, None
        record.__dict__["count"] = self._count
        self._count = 0
        return True


def setup(json_lines: bool, level: str, access_log: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    handler.addFilter(RedactFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.INFO if access_log else logging.WARNING)
    server_log = logging.getLogger("aiohttp.server")
    server_log.filters[:] = [MalformedRequestFilter()]
