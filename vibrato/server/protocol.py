"""The connection layer under the app: timeouts, a connection cap and safe protocol errors.

aiohttp's `RequestHandler` (one per TCP connection) is extended here; `HardenedAppRunner` is the
`web.AppRunner` that serve-v2 uses, so every connection gets:

* keep-alive idle timeout — aiohttp's own timer (`keepalive_timeout`, `--keepalive-timeout-secs`):
  a connection with no request in progress is closed after it, also before its first request.
* header timeout (`--header-timeout-secs`) — from the first byte of a request head until the head
  is complete; a slow head (slowloris) is answered 408 and the connection closed.
* body timeout (`--body-timeout-secs`, default scaled to `--max-body-bytes`) — from the end of the
  head until the body is complete; the handler's read fails with 408 `request_timeout` and the
  connection is closed after the response.
* connection cap (`--max-connections`) — a connection beyond it is answered 503 `overloaded` at
  once and closed, so the number of open file descriptors stays bounded.
* malformed requests (bad header bytes, obsolete line folding, ...) are answered with a JSON 400
  `bad_request` that never echoes the request, and logged without the request's bytes (a
  malformed header may carry a bearer secret), at most once per 10 s.

Every response written here carries an `x-request-id` like the app's.
"""
import asyncio
import logging
import selectors
import time

import orjson
from aiohttp import http_exceptions, web
from aiohttp.http_parser import RawRequestMessage
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from vibrato.server.errors import RequestTimeoutError, error_body
from vibrato.server.fastpath import FastQuery
from vibrato.server.logs import RateLimitedLog
from vibrato.server.middlewares import new_request_id

log = logging.getLogger("vibrato.server")

_bad_request_log = RateLimitedLog(log, logging.WARNING, 10.0)

RECV_BUFFER_BYTES = 256 * 1024

_REASONS = {400: "Bad Request", 408: "Request Timeout", 500: "Internal Server Error", 503: "Service Unavailable",
            504: "Gateway Timeout"}


def raw_response(status: int, code: str, message: str, extra_headers: str = "") -> bytes:
    """A complete `Connection: close` HTTP/1.1 response with a JSON error body."""
    body = orjson.dumps(error_body(code, message))
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
            f"x-request-id: {new_request_id()}\r\n{extra_headers}\r\n")
    return head.encode("ascii") + body


def _describe(exc: BaseException | None) -> str:
    """A short, value-free description of a parse error (its message may contain header bytes)."""
    if isinstance(exc, http_exceptions.LineTooLong):
        return "a request line or header field is too long"
    if isinstance(exc, http_exceptions.BadHttpMethod):
        return "malformed request method"
    if isinstance(exc, http_exceptions.BadStatusLine):
        return "malformed request line"
    if isinstance(exc, http_exceptions.InvalidHeader):
        return "malformed header"
    if isinstance(exc, http_exceptions.InvalidURLError):
        return "malformed request target"
    if isinstance(exc, http_exceptions.PayloadEncodingError):
        return "malformed body framing"
    return "malformed HTTP request"


class HardenedRequestHandler(RequestHandler, asyncio.BufferedProtocol):
    """aiohttp's per-connection protocol with header/body timeouts and value-free error answers.

    It receives through `get_buffer`/`buffer_updated` (a BufferedProtocol): the event loop's plain
    `recv(256 KiB)` allocates a fresh 256 KiB bytes object per read, which glibc serves with mmap
    (the server fixes its mmap threshold at 256 KiB, engine/memory.py), shrinks with mremap and
    frees with munmap: three syscalls and a zeroed page per request (strace under wrk). The
    server's one receive buffer is reused instead; each read is copied out at its own size.
    """

    __slots__ = ("_header_timeout", "_body_timeout", "_head_timer", "_body_timer", "_body_payload", "_fast",
                 "auth_memo", "_peer", "_raw_pending")

    def __init__(self, manager, *, header_timeout: float, body_timeout: float, fast=None, **kwargs):
        super().__init__(manager, **kwargs)
        self._fast = fast  # a FastQuery (server/fastpath.py), or None
        self.auth_memo = None  # FastQuery._authorize's (header, key id, record) for this connection
        self._header_timeout = header_timeout
        self._body_timeout = body_timeout
        self._head_timer = None
        self._body_timer = None
        self._body_payload = None
        self._peer = None  # the client's address (TCP only: the internal unix socket carries forwarded requests)
        # Where the next read starts, by the requests' own framing (_answer_read): 0 at a request's
        # start, > 0 that many body bytes of a request aiohttp reads still to come, -1 unknown.
        self._raw_pending = 0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, tuple) else None

    # ------------------------------------------------------------------ receiving
    def get_buffer(self, sizehint: int) -> memoryview:
        return self._manager.recv_buffer

    def buffer_updated(self, nbytes: int) -> None:
        # The loop calls get_buffer, recv_into and this back to back on its one thread, so the
        # shared buffer holds exactly this connection's bytes here.
        buf = self._manager.recv_buffer
        if self._fast is not None and self._raw_pending >= 0 and self._answer_read(buf, nbytes):
            return
        self.data_received(buf[:nbytes].tobytes())

    def _answer_read(self, buf, nbytes: int) -> bool:
        """Answer this read from its bytes when it is exactly one common query on an idle connection
        (FastQuery.answer_read); True if answered. Otherwise keep track of where the requests aiohttp
        is given end: only a read that starts a request is offered, and once the framing is unknown
        (a partial head, pipelining, a transfer coding, ...) no read of the connection is."""
        pending = self._raw_pending
        if pending > 0:  # the rest of a body aiohttp is reading
            self._raw_pending = pending - nbytes if nbytes <= pending else -1
            return False
        reader = self._fast.reader
        total = reader.head(buf, nbytes)
        if total == nbytes and reader.candidate and self._idle() and self._peer is not None:
            response = self._fast.answer_read(reader, buf, self._peer, self)
            if response is not None:
                self._write_fast(response)
                return True
        self._raw_pending = -1 if total < nbytes else total - nbytes
        return False

    def _idle(self) -> bool:
        """aiohttp's side waits for a new request: no request in progress, none queued."""
        waiter = self._waiter
        return not (self._force_close or self._close or self._payload_parser is not None or self._upgraded
                    or waiter is None or waiter.done() or self._messages)

    # ------------------------------------------------------------------ timers
    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close or self._payload_parser is not None or self._upgraded:
            super().data_received(data)
            return
        body = self._body_payload
        in_body = body is not None and not body.is_eof()
        before = self._request_count
        waiter = self._waiter
        if self._fast is None or waiter is None or waiter.done() or self._messages:
            super().data_received(data)
        else:
            # Idle connection (start() waits for a request): parse without waking start(), so a
            # request the fast path answers never reaches aiohttp's per-request machinery.
            self._waiter = None
            try:
                super().data_received(data)
            finally:
                self._waiter = waiter
            if len(self._messages) == 1:
                self._answer_fast()
            if self._messages and not waiter.done():
                waiter.set_result(None)
        if self._request_count != before:  # one or more heads completed (or a parse error was queued)
            self._cancel_head_timer()
            self._cancel_body_timer()
            payload = self._messages[-1][1] if self._messages else None
            if payload is not None and not payload.is_eof():
                self._body_payload = payload
                self._body_timer = self._loop.call_later(self._body_timeout, self._on_body_timeout, payload)
            else:
                self._body_payload = None
        elif in_body:
            if body.is_eof():
                self._cancel_body_timer()
                self._body_payload = None
        elif data and self._head_timer is None and not self._force_close:
            self._head_timer = self._loop.call_later(self._header_timeout, self._on_head_timeout,
                                                     self._request_count)

    def _answer_fast(self) -> None:
        """Answer the one queued request on the fast query path if it takes it (server/fastpath.py)."""
        message, payload = self._messages[0]
        fast = self._fast
        if not isinstance(message, RawRequestMessage) or not fast.wants(message) or not payload.is_eof():
            return
        if self._peer is None or self.transport is None:
            return
        # The body is complete and not read by anyone yet: peek at it, so a request the fast path
        # declines reaches the regular route intact.
        response = fast.answer(message, b"".join(getattr(payload, "_buffer", ())), self._peer, self)
        if response is None:
            return
        self._messages.popleft()
        self._parser.message_consumed()
        self._write_fast(response)

    def _write_fast(self, response: bytes) -> None:
        self._manager.requests_count += 1
        self.transport.write(response)
        if self._keepalive_timeout > 0:  # the idle timer restarts, as after aiohttp's own responses
            close_time = self._loop.time() + self._keepalive_timeout
            self._next_keepalive_close_time = close_time
            if self._keepalive_handle is None:
                self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)

    def _cancel_head_timer(self):
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_body_timer(self):
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _on_head_timeout(self, count_at_start: int) -> None:
        self._head_timer = None
        if self._force_close or self.transport is None or self._request_count != count_at_start:
            return
        if self._request_in_progress or self._messages:
            self.close()  # a pipelined head is stalled behind a request: close after that response
            return
        self.transport.write(raw_response(408, "request_timeout", f"the request head was not received within "
                                                                  f"{self._header_timeout:g} s (--header-timeout-secs)"))
        self.force_close()

    def _on_body_timeout(self, payload) -> None:
        self._body_timer = None
        if payload.is_eof() or self.transport is None:
            return
        # No lingering read of the rest of the body: the connection closes after the response.
        self._lingering_time = 0.0
        self._body_payload = None
        payload.set_exception(RequestTimeoutError(
            f"the request body was not received within {self._body_timeout:g} s (--body-timeout-secs)"))

    async def _handle_request(self, request, start_time, request_handler):
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            if self._body_payload is request.content:
                # Answered before the body arrived (e.g. 401): aiohttp's bounded lingering read
                # of the rest (then close) takes over.
                self._cancel_body_timer()
                self._body_payload = None

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        self._body_payload = None
        super().connection_lost(exc)

    # ------------------------------------------------------------------ errors
    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's error answer without echoing the request: JSON `{"code","message"}`, logged without
        the exception's text (for parse errors it quotes the offending bytes, secrets included)."""
        if status >= 500:
            # Our middlewares answer every handler error themselves; this is aiohttp-level.
            log.error("error handling a request from %s: %s", request.remote, type(exc).__name__ if exc else status)
            code, text = ("internal_error", "internal server error") if status == 500 else (
                "gateway_timeout", "the request handler timed out")
        else:
            text = _describe(exc)
            code = "bad_request"
            _bad_request_log("malformed HTTP request from %s: %s", request.remote, text,
                             fields={"error_type": type(exc).__name__ if exc else None})
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error response")
        resp = web.Response(body=orjson.dumps(error_body(code, text)), status=status, content_type="application/json")
        resp.headers["x-request-id"] = new_request_id()
        resp.force_close()
        return resp


class _Refused(asyncio.Protocol):
    """A connection over the cap: answered 503 at once, closed after the first read or 0.5 s."""

    def __init__(self, loop):
        self._loop = loop
        self._transport = None
        self._timer = None

    def connection_made(self, transport):
        self._transport = transport
        transport.write(raw_response(503, "overloaded", "too many open connections (--max-connections); retry",
                                     "Retry-After: 1\r\n"))
        # Closing with unread request bytes would reset the connection and could lose the 503:
        # wait briefly for the request (read and dropped) before closing.
        self._timer = self._loop.call_later(0.5, transport.abort)

    def data_received(self, data):
        self._transport.close()

    def eof_received(self):
        self._transport.close()
        return False

    def connection_lost(self, exc):
        if self._timer is not None:
            self._timer.cancel()


class HardenedServer(Server):
    """aiohttp's low-level server creating `HardenedRequestHandler`s, at most `max_connections` at once."""

    def __init__(self, handler, *, max_connections: int, header_timeout: float, body_timeout: float, fast=None,
                 **kwargs):
        super().__init__(handler, **kwargs)
        self.fast = fast
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.refused_total = 0
        self._pending = 0  # protocols created whose connection_made has not run yet
        # Every connection's reads land here first (HardenedRequestHandler.get_buffer); one loop
        # thread serves them all. asyncio's own read size.
        self.recv_buffer = memoryview(bytearray(RECV_BUFFER_BYTES))

    def _reset_pending(self):
        self._pending = 0

    def __call__(self):
        # Accepted sockets get their protocol in one loop iteration and connection_made in the
        # next, so the ones created in this iteration are counted until then.
        if len(self._connections) + self._pending >= self.max_connections:
            self.refused_total += 1
            _overload_log("connection refused: %d connections open (--max-connections %d)",
                          len(self._connections), self.max_connections, fields={"refused_total": self.refused_total})
            return _Refused(self._loop)
        if self._pending == 0:
            self._loop.call_soon(self._reset_pending)
        self._pending += 1
        return HardenedRequestHandler(self, loop=self._loop, header_timeout=self.header_timeout,
                                      body_timeout=self.body_timeout, fast=self.fast, **self._kwargs)


_overload_log = RateLimitedLog(log, logging.WARNING, 10.0)


class HardenedAppRunner(web.AppRunner):
    """`web.AppRunner` whose server is a `HardenedServer` configured from the app's Config."""

    def __init__(self, app: web.Application, *, max_connections: int, header_timeout: float, body_timeout: float,
                 fast_query_path: bool = False, **kwargs):
        super().__init__(app, **kwargs)
        self._limits = {"max_connections": max_connections, "header_timeout": header_timeout,
                        "body_timeout": body_timeout}
        self._fast_query_path = fast_query_path

    async def _make_server(self) -> Server:
        base = await super()._make_server()  # runs the app's startup and builds aiohttp's server
        fast = FastQuery(self.app) if self._fast_query_path else None
        return HardenedServer(base.request_handler, request_factory=base.request_factory,
                              handler_cancellation=base.handler_cancellation, loop=base._loop, fast=fast,
                              **self._limits, **base._kwargs)


def make_runner(app: web.Application, config) -> HardenedAppRunner:
    """The runner serve-v2 uses (and tests that need the connection layer)."""
    return HardenedAppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=config.shutdown_timeout_secs,
                             keepalive_timeout=config.keepalive_timeout_secs,
                             max_connections=config.max_connections, header_timeout=config.header_timeout_secs,
                             body_timeout=config.effective_body_timeout_secs, fast_query_path=config.fast_query_path)


# ---------------------------------------------------------------------------- event-loop errors
_accept_log = RateLimitedLog(logging.getLogger("vibrato.server"), logging.ERROR, 10.0)


def loop_exception_handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """Rate-limit asyncio's accept-failure reports (at the fd limit it logs one per accept attempt,
    thousands a second); everything else goes to the default handler."""
    message = context.get("message", "")
    if message.startswith("socket.accept() out of system resource"):
        exc = context.get("exception")
        _accept_log("cannot accept connections: %s (out of file descriptors? see --max-connections, ulimit -n)",
                    exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
        return
    exc = context.get("exception")
    if isinstance(exc, ValueError) and "_start_serving" in repr(context.get("handle")):
        return  # a delayed accept retry that ran after its listener closed (shutdown during an fd shortage)
    loop.default_exception_handler(context)


# ---------------------------------------------------------------------------- the event loop
class SpinningSelector(selectors.EpollSelector):
    """epoll that polls, for up to `spin_secs`, before it sleeps after a wait that found events.

    On a virtual machine an idle vCPU halts, and waking it for the next request's packet costs tens
    of microseconds (an inter-processor interrupt through the host). A client that sends its next
    request right after the answer (one connection, or a few) finds the loop still polling instead.
    A wait that times out with nothing (the loop's timers) ends the polling until events come again,
    so an idle server does not spin; a busy one rarely waits at all. `--idle-spin-us` (docs/SERVER.md;
    0 turns it off): single-connection p50 0.308 -> 0.259 ms here, for 2% more CPU per request at that
    rate and none under `wrk -c16` (perf/README.md)."""

    def __init__(self, spin_secs: float):
        super().__init__()
        self._spin = float(spin_secs)
        self._busy = False

    def select(self, timeout=None):
        if self._busy and self._spin > 0 and (timeout is None or timeout > 0):
            end = time.perf_counter() + (self._spin if timeout is None else min(self._spin, timeout))
            while True:
                ready = super().select(0)
                if ready:
                    return ready
                if time.perf_counter() >= end:
                    break
        ready = super().select(timeout)
        if ready:
            self._busy = True
        elif timeout is None or timeout > 0:  # a blocking wait found nothing: idle
            self._busy = False
        return ready


def run(main, idle_spin_us: int):
    """asyncio.run(main) on a loop whose selector polls `idle_spin_us` before it sleeps (SpinningSelector)."""
    if idle_spin_us <= 0:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(SpinningSelector(idle_spin_us * 1e-6))) as r:
        return r.run(main)
