"""Structured logging: one JSON object per line on stderr, with the current request id (CONTRACT.md D26).

Secrets never reach the log: the server itself never logs a header value, and as a second line of
defence the formatter redacts anything that looks like a credential (`Bearer <x>`, the secret half
of a `vbk_` token, the value after `Authorization:`) in messages and tracebacks.
`RateLimitedLog` keeps floods (accept errors at the fd limit, malformed requests) to one line per
interval with a count of what it suppressed.

Records are formatted and written by one writer thread (`configure`): the thread that logs (the
event loop, for the access log) only appends the record, with its request id, to a buffer the writer
drains every 20 ms (no lock or wake-up per record). The buffer is bounded; when the writer cannot
keep up, records are dropped and counted, and the next write says how many (`log_records_dropped`).
The buffer is drained at exit.
"""
import atexit
import collections
import contextvars
import logging
import re
import sys
import threading
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
        rid = record.__dict__.get("request_id", _UNSET)
        if rid is _UNSET:  # formatted where it was logged
            rid = REQUEST_ID.get()
        exc = redact(self.formatException(record.exc_info)) if record.exc_info else None
        return json_line(record.created, record.levelname.lower(), record.name, redact(record.getMessage()), rid,
                         getattr(record, "fields", None), exc)


_second = (None, "")  # (whole second, its "%Y-%m-%dT%H:%M:%S"): most lines fall in the last line's second


def json_line(created: float, level: str, logger: str, msg: str, request_id, fields, exc=None) -> str:
    """One log line: ts, time, level, logger, msg, request_id (when there is one), the fields, exc."""
    global _second
    sec, stamp = _second
    if sec != int(created):
        sec = int(created)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _second = (sec, stamp)  # one tuple, swapped whole: safe for any thread
    out = {"ts": round(created, 3), "time": f"{stamp}.{int(created * 1000) % 1000:03d}Z",
           "level": level, "logger": logger, "msg": msg}
    if request_id is not None:
        out["request_id"] = request_id
    if fields:
        out.update(fields)
    if exc is not None:
        out["exc"] = exc
    return orjson.dumps(out, default=str).decode()


def access_line(fields: dict) -> None:
    """The access log line of the current request (logger vibrato.access, level info, msg "request"),
    handed to the writer thread without building a LogRecord (the loop writes one per request). The
    caller checks that vibrato.access logs at info."""
    writer = _writer
    if writer is None:
        logging.getLogger("vibrato.access").info("request", extra={"fields": fields})
        return
    front = writer.front
    if len(front.buffer) >= QUEUE_MAX_RECORDS:
        front.dropped += 1
        return
    front.buffer.append((time.time(), REQUEST_ID.get(), fields))


_UNSET = object()
QUEUE_MAX_RECORDS = 65536
WRITE_EVERY_SECS = 0.02


class _DeferredHandler(logging.Handler):
    """Appends the record, unformatted and with the logging thread's request id, to a buffer that
    the writer thread drains every WRITE_EVERY_SECS: no lock and no thread wake-up per record."""

    def __init__(self):
        super().__init__()
        self.buffer = collections.deque()
        self.dropped = 0  # only the writer thread resets it (a lost increment costs one count)

    def handle(self, record):  # no per-handler lock: deque.append is atomic
        if len(self.buffer) >= QUEUE_MAX_RECORDS:
            self.dropped += 1
            return True
        record.request_id = REQUEST_ID.get()
        self.buffer.append(record)
        return True

    def emit(self, record):
        self.handle(record)


class _Writer:
    """The thread that formats and writes every record, in the order they were logged."""

    def __init__(self, stream, front: _DeferredHandler):
        self.stream = stream
        self.front = front
        self.formatter = JsonFormatter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vibrato-log-writer", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(WRITE_EVERY_SECS):
            self.drain()
        self.drain()

    def drain(self):
        buf, lines = self.front.buffer, []
        if self.front.dropped:
            n, self.front.dropped = self.front.dropped, 0
            note = logging.LogRecord("vibrato.logs", logging.WARNING, __file__, 0,
                                     "log records dropped: the log writer fell behind", None, None)
            note.fields = {"log_records_dropped": n}
            note.request_id = None
            lines.append(self.formatter.format(note))
        while buf:
            record = buf.popleft()
            try:
                if type(record) is tuple:  # access_line
                    created, rid, fields = record
                    lines.append(json_line(created, "info", "vibrato.access", "request", rid, fields))
                    continue
                lines.append(self.formatter.format(record))
            except Exception:  # noqa: BLE001 - a record that cannot be formatted is reported, not fatal
                logging.Handler.handleError(self.front, record)
        if lines:
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr closed or gone: nothing left to tell

    def stop(self):
        self._stop.set()
        self._thread.join()


_writer = None


def configure(level: str = "info", stream=None) -> None:
    """Send every logger's records to `stream` (stderr) as JSON lines, through the writer thread
    (idempotent: a second call replaces the first's writer)."""
    global _writer
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_vibrato", False):
            root.removeHandler(h)
    if _writer is not None:
        _writer.stop()
    logging._srcfile = None  # no caller lookup per record: the JSON lines carry no file/line
    front = _DeferredHandler()
    front._vibrato = True
    _writer = _Writer(sys.stderr if stream is None else stream, front)
    root.addHandler(front)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def flush() -> None:
    """Write every buffered record now and stop the writer thread (at exit; configure starts it again)."""
    global _writer
    if _writer is not None:
        stream = _writer.stream
        _writer.stop()
        _writer = None
        root = logging.getLogger()
        for h in list(root.handlers):
            if getattr(h, "_vibrato", False):
                root.removeHandler(h)
                fallback = logging.StreamHandler(stream)  # late records (after flush) still get out
                fallback.setFormatter(JsonFormatter())
                fallback._vibrato = True
                root.addHandler(fallback)


atexit.register(flush)
