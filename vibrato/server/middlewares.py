"""Middlewares, outermost first:

1. `request_id_middleware` — take a valid `x-request-id` or make `req_<secs>_<16hex>`, put it in a
   contextvar for the logs, set it on every response (errors, 404/405, metrics included; CONTRACT.md D12).
2. `access_middleware` — per-route request counters and latency histograms, the audit event and
   one structured access-log line; it sees the final response because everything inside it
   returns one.
3. `error_middleware` — every exception becomes a JSON `{"code","message"}` response; unexpected
   ones are logged with their traceback and answered 500.
4. `auth_middleware` — checks the API key before the body is read (CONTRACT.md D15). A cached key costs
   no I/O; a cache miss does one catalog read on the executor. More than one `Authorization`
   header is a 400. `Expect: 100-continue` is answered only after authorization (the routes'
   `expect_handler` defers it here), so an unauthenticated client never gets to send its body.
"""
import asyncio
import logging
import math
import random
import secrets
import time

import orjson
from aiohttp import http_exceptions, web
from aiohttp.http import HttpVersion11
from aiohttp.web_protocol import RequestPayloadError

from vibrato import apikeys
from vibrato.errors import VibratoError
from vibrato.server import state as K
from vibrato.server.errors import (ExpectationFailedError, MethodNotAllowedError, NotFoundRouteError,
                                   error_body)
from vibrato.server.logs import REQUEST_ID, access_line
from vibrato.server.workers import LOCAL_ROUTES, client_address, forward

log = logging.getLogger("vibrato.server")
access_log = logging.getLogger("vibrato.access")

EXPECT_REFUSED = web.RequestKey("expect_refused", bool)  # a final answer to an unanswered Expect


def json_response(payload, status: int = 200, headers=None) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json",
                        headers=headers)


_rid_random = random.Random(secrets.randbits(128))


def new_request_id() -> str:
    """`req_<secs>_<16 hex>`. Request ids are correlation ids, not secrets: a seeded PRNG is enough
    and avoids an os.urandom syscall per request."""
    return f"req_{int(time.time())}_{_rid_random.getrandbits(64):016x}"


def valid_request_id(value: str | None) -> bool:
    return (bool(value) and len(value) <= 200 and value.isascii() and value.isprintable()
            and value.strip() != "")


@web.middleware
async def request_id_middleware(request: web.Request, handler):
    rid = request.headers.get("x-request-id")
    if not valid_request_id(rid):
        rid = new_request_id()
    request[K.REQUEST_ID] = rid
    request[K.STARTED] = (time.time(), time.perf_counter())
    inflight = request.app[K.INFLIGHT]
    inflight.enter()
    token = REQUEST_ID.set(rid)
    try:
        response = await handler(request)
        response.headers["x-request-id"] = rid
        if inflight.draining or request.get(EXPECT_REFUSED, False):
            # Shutting down, or the client still holds a body it was told not to send (or was
            # cut off mid-body): no further requests on this connection.
            response.force_close()
        return response
    finally:
        REQUEST_ID.reset(token)
        inflight.leave()


def route_policy(request: web.Request):
    """The Policy of the matched route, or None for 404/405."""
    route = request.match_info.route
    resource = route.resource
    if resource is None or request.match_info.http_exception is not None:
        return None
    return request.app[K.POLICIES].get(resource.canonical)


@web.middleware
async def access_middleware(request: web.Request, handler):
    response = await handler(request)
    if request.get(K.UNCOUNTED, False):
        return response  # another process counts, logs and audits it (server/workers.py)
    status = response.status
    details = (request.get(K.AUDIT_DETAILS, {}) if status < 400
               else {"error": request.get(K.ERROR_MESSAGE, "")})
    record_request(request.app, request.method, request.path, route_policy(request), status, request[K.STARTED],
                   request[K.REQUEST_ID], request.get(K.KEY_ID), client_address(request), details,
                   request.get(K.AUTH_FAILED, False))
    return response


def record_request(app, method: str, path: str, policy, status: int, started: tuple, request_id: str, key_id,
                   client, details: dict, auth_failed: bool = False) -> None:
    """Count, audit and access-log one answered request: the one home of that bookkeeping, for the
    middleware chain and for the fast query path (server/fastpath.py). Call it with the request id
    in REQUEST_ID (the access line takes it from there)."""
    ts, t0 = started
    elapsed = time.perf_counter() - t0
    route = policy.path if policy is not None else "unmatched"
    app[K.METRICS].observe_request(method, route, status, elapsed)
    if policy is not None and (policy.audited or auth_failed):
        app[K.AUDIT].record(ts=ts, request_id=request_id, api_key_id=key_id, endpoint=policy.path,
                            action=policy.action, status=status, latency_ms=elapsed * 1000.0, client_ip=client,
                            details=details, auth_failure=auth_failed)
    if access_log.isEnabledFor(logging.INFO):
        access_line({"method": method, "path": path, "status": status, "latency_ms": round(elapsed * 1000.0, 3),
                     "client": client, "key_id": key_id})


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except VibratoError as exc:
        request[K.ERROR_MESSAGE] = exc.message
        if exc.status >= 500 and not isinstance(exc, apikeys.AuthError):
            log.error("%s: %s", exc.code, exc.message)
        if exc.status == 408:
            request[EXPECT_REFUSED] = True  # the rest of the body is not read: close the connection
        retry = getattr(exc, "retry_after", None)  # 429 backpressure (CONTRACT.md D41)
        headers = {"Retry-After": str(max(1, math.ceil(retry)))} if retry is not None else None
        return json_response(error_body(exc.code, exc.message), exc.status, headers=headers)
    except (RequestPayloadError, http_exceptions.HttpProcessingError) as exc:
        # Broken body framing (chunked encoding, content length, compression). The exception text
        # quotes request bytes, so neither it nor a traceback is logged or echoed.
        request[K.ERROR_MESSAGE] = "malformed request body"
        request[EXPECT_REFUSED] = True
        log.info("malformed request body: %s", type(exc).__name__)
        return json_response(error_body("bad_request", "malformed request body"), 400)
    except web.HTTPException as exc:
        headers = {}
        if exc.status == 405:
            err = MethodNotAllowedError(f"method {request.method} is not allowed on {request.path}")
            headers["Allow"] = exc.headers.get("Allow", "")
        elif exc.status == 404:
            err = NotFoundRouteError(f"no route for {request.method} {request.path}")
        else:
            err = VibratoError(exc.reason or exc.text or "http error", code=_http_code(exc.status), status=exc.status)
        request[K.ERROR_MESSAGE] = err.message
        return json_response(error_body(err.code, err.message), err.status, headers=headers)
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - the catch-all that keeps every error JSON
        log.exception("unhandled error in %s %s", request.method, request.path)
        request[K.ERROR_MESSAGE] = "internal server error"
        return json_response(error_body("internal_error", f"internal server error (request id "
                                                          f"{request.get(K.REQUEST_ID)})"), 500)


def _http_code(status: int) -> str:
    return {400: "bad_request", 401: "unauthorized", 403: "forbidden", 408: "request_timeout",
            413: "payload_too_large", 415: "unsupported_media_type"}.get(status, f"http_{status}")


@web.middleware
async def forward_middleware(request: web.Request, handler):
    """A query worker's innermost middleware (server/workers.py): a route it does not serve itself goes
    to the writer, once auth_middleware has passed it; the writer counts, logs and audits it."""
    if request.path in LOCAL_ROUTES or request.path.startswith("/internal/"):
        return await handler(request)
    request[K.UNCOUNTED] = True
    return await forward(request, request.app[K.FORWARDER], request[K.REQUEST_ID])


async def deferred_expect_handler(request: web.Request) -> None:
    """The routes' `expect_handler`: aiohttp's default would send `100 Continue` before any
    middleware runs; `auth_middleware` sends it once the request is authorized."""
    return None


async def _continue(request: web.Request) -> None:
    """Answer an `Expect` header (HTTP/1.1 only, like aiohttp's default handler)."""
    expect = request.headers.get("Expect")
    if expect is None or request.version != HttpVersion11:
        return
    if expect.strip().lower() != "100-continue":
        request[EXPECT_REFUSED] = True
        raise ExpectationFailedError("unsupported Expect header; only 100-continue is supported")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the interim response is not the response


@web.middleware
async def auth_middleware(request: web.Request, handler):
    policy = route_policy(request)
    if policy is None:
        return await handler(request)
    role = policy.role
    if policy.public_when_flag and request.app[K.CONFIG].public_health_metrics:
        role = None
    if role is None:
        if "Expect" in request.headers:
            await _continue(request)
        return await handler(request)
    store = request.app[K.KEYSTORE]
    try:
        key_id, secret = apikeys.parse_authorization(apikeys.single_authorization(
            request.headers.getall("Authorization", ())))
        record = store.lookup(key_id)
        if record is store.MISS:
            loop = asyncio.get_running_loop()
            record = await loop.run_in_executor(request.app[K.EXECUTOR], store.load, key_id)
        store.check(record, secret, role)
    except apikeys.AuthError as exc:
        request[K.AUTH_FAILED] = True
        request.app[K.METRICS].auth_failures += 1
        if isinstance(exc, apikeys.AuthBackendError):
            log.error("auth backend failure: %s", exc.__cause__)
        if "Expect" in request.headers:
            request[EXPECT_REFUSED] = True
        raise
    request[K.KEY_ID] = key_id
    if "Expect" in request.headers:
        await _continue(request)
    return await handler(request)
