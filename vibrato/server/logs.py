"""Structured logging: one JSON object per line on stderr, with the current request id (CONTRACT.md D26).

Secrets never reach the log: the server itself never logs a header value, and as a second line of
defence the formatter redacts anything that looks like a credential (`Bearer <x>`, the secret half
of a `vbk_` token, the value after `Authorization:`) in messages and tracebacks.
`RateLimitedLog` keeps floods (accept errors at the fd limit, malformed requests) to one line per
interval with a count of what it suppressed.
"""
import contextvars
import logging
import re
import sys
import time

import orjson

REQUEST_ID: contextvars.ContextVar = contextvars.ContextVar("vibrato_request_id", default=None)

_SECRET_PATTERNS = (
    # the value of an Authorization header as it appears in a raw or repr'd header line
    re.compile(r"(?i)(authorization['\"]?\s*[:=,]\s*['\"]?)[^'\"\r\n]+"),
    re.compile(r"(?i)(\bbearer(?:\s|\\[trn]|\\x[0-9a-f]{2})+)[^\s'\",;]+"),
    re.compile(r"(\bvbk_[0-9a-z]+\.)[0-9A-Za-z]+"),
)
_SECRET_HINTS = ("uthorization", "UTHORIZATION", "earer", "EARER", "vbk_")


def redact(text: str) -> str:
    """`text` with credential-looking substrings replaced by `[redacted]`."""
    if not any(h in text for h in _SECRET_HINTS):
        return text
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(r"\1[redacted]", text)
    return text


class RateLimitedLog:
    """At most one record per `interval` seconds; the next one reports how many were suppressed."""

    def __init__(self, logger: logging.Logger, level: int, interval: float = 10.0, clock=time.monotonic):
        self.logger = logger
        self.level = level
        self.interval = interval
        self.clock = clock
        self.suppressed = 0
        self._next = 0.0

    def __call__(self, msg: str, *args, fields: dict | None = None) -> bool:
        """Log (returns True) or count (returns False)."""
        now = self.clock()
        if now < self._next:
            self.suppressed += 1
            return False
        self._next = now + self.interval
        out = dict(fields or {})
        if self.suppressed:
            out["suppressed_since_last"] = self.suppressed
            self.suppressed = 0
        self.logger.log(self.level, msg, *args, extra={"fields": out})
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        rid = REQUEST_ID.get()
        if rid is not None:
            out["request_id"] = rid
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(out, default=str).decode()


def configure(level: str = "info") -> None:
    """Send every logger's records to stderr as JSON lines (idempotent)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_vibrato", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._vibrato = True
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
