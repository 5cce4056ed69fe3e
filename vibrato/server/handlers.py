"""The v2 route handlers: parse -> validate -> one engine call (on the executor) -> `{"data": ...}`.

Results are serialized as the engine shaped them (engine/planner.py); nothing is reformatted here.

No SQL and no vector math here. Bodies larger than `LARGE_BODY` are decoded and validated on the
executor too, so a 10,000-vector batch does not stall the event loop.
"""
import asyncio
import contextvars
import functools
import logging
import time

import orjson
from aiohttp import web

from vibrato.engine.validation import U64_MAX
from vibrato.errors import BadRequestError, NotReadyError, VibratoError
from vibrato.server import state as K
from vibrato.server.errors import InvalidJsonError, PayloadTooLargeError, UnsupportedMediaTypeError
from vibrato.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from vibrato.server.middlewares import json_response

LARGE_BODY = 64 * 1024

log = logging.getLogger("vibrato.server")


async def _blocking(request: web.Request, fn, *args, **kwargs):
    """Run a blocking call on the app's executor (never on the event loop), in a copy of the
    request's context so log lines written on the worker thread carry the request id."""
    loop = asyncio.get_running_loop()
    call = functools.partial(fn, *args, **kwargs) if kwargs else functools.partial(fn, *args)
    return await loop.run_in_executor(request.app[K.EXECUTOR], contextvars.copy_context().run, call)


async def _workers_applied(request: web.Request):
    """With query workers, a write is answered once they have applied it (server/workers.py), so the
    queries that follow it on a worker find nothing to catch up; then `visible` is published, which
    those queries check (engine/shared_state.py)."""
    pool = request.app[K.WORKERS]
    if pool is not None:
        shared = request.app[K.ENGINE].shared_state
        lsn = shared.lsn  # at least this write's
        await pool.caught_up(lsn)
        shared.publish_visible(lsn)  # before the answer: a worker's next query must see it (D5)


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0


# ---------------------------------------------------------------------------- body handling
def is_json(content_type: str) -> bool:
    if content_type == "application/json":
        return True
    major, _, minor = content_type.partition("/")
    return major == "application" and minor.endswith("+json")


async def read_body(request: web.Request) -> bytes:
    """The raw body after the content-type (415) and size (413) checks; reads at most limit + 1 bytes."""
    if "Content-Type" not in request.headers or not is_json(request.content_type):
        got = request.headers.get("Content-Type", "none")
        raise UnsupportedMediaTypeError(f"expected Content-Type: application/json, got {got}")
    limit = request.app[K.CONFIG].limits.max_body_bytes
    too_large = PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes (--max-body-bytes)")
    declared = request.content_length
    if declared is not None and declared > limit:
        raise too_large
    chunks, size = [], 0
    while size <= limit:
        chunk = await request.content.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise too_large
    return b"".join(chunks)


def parse_and_validate(body: bytes, validate, read=None):
    """The validated request of a JSON body. read: the Validator's `<method>_bytes` where it has one,
    which reads the body's plainest form in C (None: not that form, parse it)."""
    if read is not None:
        req = read(body)
        if req is not None:
            return req
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJsonError(f"request body is not valid JSON: {exc}") from None
    return validate(doc, _MaybeBools(body))


class _MaybeBools:
    """Whether a body may hold a JSON boolean, found out only if a validator asks (schemas.decode_vectors'
    general path): booleans can only come from `true`/`false` literals, and without them numpy's
    bool upcast cannot hide one among vector components. Scanning a 1.4 MB batch body takes ~2 ms."""

    __slots__ = ("body",)

    def __init__(self, body: bytes):
        self.body = body

    def __bool__(self) -> bool:
        return b"true" in self.body or b"false" in self.body


async def parse(request: web.Request, method_name: str):
    body = await read_body(request)
    validator = request.app[K.VALIDATOR]
    validate, read = getattr(validator, method_name), getattr(validator, f"{method_name}_bytes", None)
    if len(body) > LARGE_BODY:
        return await _blocking(request, parse_and_validate, body, validate, read)
    return parse_and_validate(body, validate, read)


# ---------------------------------------------------------------------------- data routes
async def ingest(request: web.Request) -> web.Response:
    prep = await parse(request, "ingest")  # one checked row: the engine takes it as it is
    (vid, created), = await _blocking(request, request.app[K.ENGINE].ingest_batch, prep)
    await _workers_applied(request)
    if created:
        request.app[K.METRICS].ingest_vectors += 1
    request[K.AUDIT_DETAILS] = {"id": int(vid), "created": bool(created)}
    return json_response({"data": {"id": int(vid), "created": bool(created)}}, 201)


async def ingest_batch(request: web.Request) -> web.Response:
    prep = await parse(request, "ingest_batch")
    engine = request.app[K.ENGINE]
    # An empty batch still answers 503 not_ready during recovery like the rest.
    results = await _blocking(request, engine.ingest_batch, prep) if prep.rows else _require_ready(engine)
    await _workers_applied(request)
    out = [{"id": int(vid), "created": bool(created)} for vid, created in results]
    request.app[K.METRICS].ingest_vectors += sum(1 for r in out if r["created"])
    request[K.AUDIT_DETAILS] = {"count": len(prep.rows)}
    return json_response({"data": {"results": out}}, 201)


def _require_ready(engine) -> list:
    """Cheap, non-blocking readiness check for a request that needs no engine work (an empty batch)."""
    ready, report = engine.readiness()
    if report == "recovering":
        raise NotReadyError("engine is recovering; retry when /v2/health/ready is 200")
    return []


# A query this small runs on the event loop itself: its search (tens to a few hundred microseconds,
# native code with the GIL released) costs less than handing it to a worker thread and waking the loop
# again. Larger ones (and every call that can wait on the catalog) go to the executor.
INLINE_MAX_K = 100
INLINE_MAX_EF = 256


# An identify (milliseconds: 16 searches and the window scores) runs on the loop only when it is the
# one request in flight, so it delays nobody; it then skips a hand-off that cost ~0.6 ms of its ~2.5
# (perf/bench_identify_http.py). With others in flight it goes to the executor.
INLINE_MAX_FRAMES = 256


def runs_inline(config, k: int, ef: int) -> bool:
    return config.inline_search and k <= INLINE_MAX_K and ef <= INLINE_MAX_EF


def runs_identify_inline(request: web.Request, req) -> bool:
    return (runs_inline(request.app[K.CONFIG], req["k"], req["ef"]) and len(req["vectors"]) <= INLINE_MAX_FRAMES
            and request.app[K.INFLIGHT].count == 1)


def search(engine, req):
    """A validated query's engine call, timed: (results, seconds)."""
    return _timed(engine.query, req["vector"], k=req["k"], ef=req["ef"], filter=req["filter"],
                  search_tier=req["search_tier"], include_metadata=req["include_metadata"])


def query_payload(results, secs: float) -> dict:
    return {"data": {"results": results, "query_time_ms": secs * 1000.0}}


def query_audit_details(k: int, ef: int) -> dict:
    return {"k": k, "ef": ef}


async def query(request: web.Request) -> web.Response:
    """POST /v2/query. The common case (small, well-formed, authorized) is answered before it gets
    here, by server/fastpath.py, with the same functions."""
    req = await parse(request, "query")
    engine = request.app[K.ENGINE]
    if runs_inline(request.app[K.CONFIG], req["k"], req["ef"]):
        results, secs = search(engine, req)
    else:
        results, secs = await _blocking(request, search, engine, req)
    request.app[K.METRICS].observe_search("query", secs)
    request[K.AUDIT_DETAILS] = query_audit_details(req["k"], req["ef"])
    return json_response(query_payload(results, secs))


async def identify(request: web.Request) -> web.Response:
    req = await parse(request, "identify")
    request[K.AUDIT_DETAILS] = {"k": req["k"], "ef": req["ef"], "len": len(req["vectors"])}
    engine = request.app[K.ENGINE]
    call = functools.partial(engine.identify, req["vectors"], k=req["k"], ef=req["ef"],
                             search_tier=req["search_tier"], include_metadata=req["include_metadata"])
    if runs_identify_inline(request, req):
        results, secs = _timed(call)
    else:
        results, secs = await _blocking(request, _timed, call)
    if req["k"]:  # the identify series count searches, k > 0 (CONTRACT.md §1.6)
        request.app[K.METRICS].observe_search("identify", secs)
    return json_response({"data": {"results": results, "query_time_ms": secs * 1000.0}})


# ---------------------------------------------------------------------------- deletes
async def delete(request: web.Request) -> web.Response:
    """POST /v2/vectors/delete: exactly one of {"ids": [...]} or {"filter": {...}} (CONTRACT.md D40)."""
    req = await parse(request, "delete")
    return await _delete(request, req["ids"], req["filter"])


async def delete_one(request: web.Request) -> web.Response:
    """DELETE /v2/vectors/{id}: one id; a path segment that is not a u64 is 400 (never echoed: the
    access log and audit row must not carry what a client may have put there by mistake)."""
    raw = request.match_info["id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 20 or int(raw) > U64_MAX:
        raise BadRequestError(f"the vector id in the path must be an integer between 0 and {U64_MAX}")
    return await _delete(request, [int(raw)], None)


async def _delete(request: web.Request, ids, flt) -> web.Response:
    # A catalog write (one transaction, fsynced): on the executor, like ingest.
    out = await _blocking(request, request.app[K.ENGINE].delete, ids, filter=flt)
    deleted, lsn = int(out["deleted"]), out["lsn"]
    await _workers_applied(request)
    lsn = None if lsn is None else int(lsn)
    # Counts only: never the filter (its source_file names are what a takedown must erase).
    request[K.AUDIT_DETAILS] = {"deleted": deleted, "lsn": lsn, "by": "ids" if ids is not None else "filter"}
    return json_response({"data": {"deleted": deleted, "lsn": lsn}})


# ---------------------------------------------------------------------------- health
async def health_live(request: web.Request) -> web.Response:
    return json_response({"data": {"status": "ok", "ready": True, "report": "live"}})


async def health_ready(request: web.Request) -> web.Response:
    engine = request.app[K.ENGINE]
    ready, report = await _blocking(request, engine.readiness)
    if ready:
        return json_response({"data": {"status": "ok", "ready": True, "report": report}})
    return json_response({"data": {"status": "degraded", "ready": False, "report": report}}, 503)


# ---------------------------------------------------------------------------- admin
async def _run_admin(request: web.Request, kind: str, call, *args):
    """call(app, *args) on the executor. Admin failures answer 500 `<kind>_failed` with the engine's
    message (503 while recovering)."""
    try:
        return await _blocking(request, call, request.app, *args)
    except NotReadyError:
        raise
    except VibratoError as exc:
        raise VibratoError(exc.message, code=f"{kind}_failed", status=500) from exc
    except Exception as exc:  # noqa: BLE001
        log.exception("%s failed", kind)
        raise VibratoError(f"{kind} failed: {exc}", code=f"{kind}_failed", status=500) from exc


def _admin(kind: str, call):
    """An admin route whose body is never read."""
    async def handler(request: web.Request) -> web.Response:
        result = await _run_admin(request, kind, call)
        if kind != "stats":
            request[K.AUDIT_DETAILS] = {}
        return json_response({"data": result})
    handler.__name__ = f"admin_{kind}"
    return handler


async def admin_compact(request: web.Request) -> web.Response:
    """POST /v2/admin/compact: no body (or an empty one) is one compaction step, as in v2.1; a JSON body
    `{"purge": true}` erases the payloads of every deleted row instead (seconds to minutes, on the
    executor; CONTRACT.md D40). A body that is there is checked like any other (415, 413, 400, 422)."""
    purge = False
    if request.body_exists:
        body = await read_body(request)
        if body.strip():
            purge = parse_and_validate(body, request.app[K.VALIDATOR].compact)["purge"]
    result = await _run_admin(request, "compact", lambda app: app[K.ENGINE].compact(purge=purge))
    details = {}
    if purge:
        details = {"purge": True, "purged_ids": int(result.get("details", {}).get("purged_ids", 0))}
    request[K.AUDIT_DETAILS] = details
    return json_response({"data": result})


admin_checkpoint = _admin("checkpoint", lambda app: app[K.ENGINE].checkpoint())
admin_snapshot = _admin("snapshot", lambda app: app[K.ENGINE].snapshot())
admin_stats = _admin("stats", lambda app: app[K.METRICS].stats())  # every process's counters


async def metrics(request: web.Request) -> web.Response:
    try:
        body = await _blocking(request, _render_metrics, request.app)
    except NotReadyError:
        raise
    except Exception as exc:  # noqa: BLE001
        message = exc.message if isinstance(exc, VibratoError) else str(exc)
        raise VibratoError(message, code="metrics_failed", status=500) from exc
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


def _render_metrics(app) -> bytes:
    pool = app.get(K.WORKERS)
    peers = [s["metrics"] for s in pool.states()] if pool is not None else ()
    return app[K.METRICS].render(peers)


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[K.OPENAPI], content_type="application/json")
