"""The fast query path: `POST /v2/query` answered before aiohttp's per-request machinery.

Most of a small query's cost over HTTP was aiohttp's per-request machinery, not the search: a task,
a Request and a Response object, the router, four middleware frames and the header multidicts
(perf/README.md, serving path). `HardenedRequestHandler` (server/protocol.py) therefore offers each
complete request that arrives on an idle TCP connection to this module before aiohttp sees it, in
two steps:

1. `answer_read`: the request straight from the connection's bytes, read in C
   (vibrato/_native/httpq.pyx): head, body and vector, without aiohttp's parser, orjson or the
   schema walk. It takes the plainest form only: exactly one request in the read, a JSON body
   whose fields are vector (numbers), k, ef, include_metadata, search_tier and filter (a filter
   object's few bytes are handed to orjson and the validator's own filter check).
2. `answer`: otherwise, the message aiohttp's parser made (the compact vector form, ...), parsed
   and validated as the regular route does.

Either serves the request only when it is the common, well-formed case and everything it needs is
at hand without waiting:

* `POST /v2/query`, HTTP/1.1 keep-alive, a complete `Content-Length` body of JSON no larger than
  the inline limits, no `Expect`, no compression, no transfer coding;
* one `Authorization` header whose key is in the key cache and allowed to query;
* a body that parses and validates, and a search small enough to run inline (`--inline-search`);
* the server not draining.

Otherwise it returns None without any side effect and the request takes the regular route, which
answers every error (401, 413, 422, 503, ...) exactly as before: the fast path never writes an error.
The answer is the same response, headers included, and the same bookkeeping (metrics, audit row,
access line: `middlewares.record_request`) as the regular route's. docs/SERVER.md, "Fast query path".
"""
import hmac
import time

import orjson
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE

from vibrato import apikeys
from vibrato._native.httpq import RequestReader, query_answer
from vibrato.engine.planner import shape_results
from vibrato.index import FiniteArray
from vibrato.server import handlers
from vibrato.server import state as K
from vibrato.server.logs import REQUEST_ID
from vibrato.server.middlewares import new_request_id, record_request, valid_request_id

PATH = "/v2/query"
FILTER_MEMO = 1024  # distinct filter objects remembered by their bytes (FastQuery._filter)
_REFUSED = object()

_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
_SERVER = f"\r\nServer: {SERVER_SOFTWARE}\r\nx-request-id: ".encode("ascii")


def _same(a: str, b: str) -> bool:
    """Constant-time equality of two header values (False for non-ASCII ones, which never verify)."""
    try:
        return hmac.compare_digest(a, b)
    except TypeError:
        return False


class FastQuery:
    """Answers the common `POST /v2/query` for one started app (see the module docstring)."""

    def __init__(self, app):
        config = app[K.CONFIG]
        self.app = app
        self.config = config
        self.engine = app[K.ENGINE]
        self.keystore = app[K.KEYSTORE]
        self.validate = app[K.VALIDATOR].query
        self.query_filter = app[K.VALIDATOR].query_filter
        self.metrics = app[K.METRICS]
        self.inflight = app[K.INFLIGHT]
        self.policy = app[K.POLICIES][PATH]
        self.max_body = min(config.limits.max_body_bytes, handlers.LARGE_BODY)
        self._filters = {}  # _filter's memo: filter JSON bytes -> QueryFilter or None
        # the connections' reads are framed and read by this one reader (one event loop thread)
        self.reader = RequestReader(config.dim, config.limits.max_k, config.limits.max_ef)

    @staticmethod
    def wants(message) -> bool:
        """Whether a parsed message is a candidate at all (cheap; checked before the body is read)."""
        return (message.path == PATH and message.method == "POST" and message.version == (1, 1)
                and not message.should_close and not message.chunked and message.compression is None
                and not message.upgrade)

    def _authorize(self, header: str, conn) -> str | None:
        """The key id of a valid Authorization header allowed to query, or None when its key is not
        cached (loading it reads the catalog: the regular route does that off the loop); raises
        AuthError otherwise. The secret's hash is checked once per connection and cached key record:
        `conn.auth_memo` keeps (header, key id, record) after a success, and the same header against
        the same record (the key cache replaces it on every reload, each KeyStore.ttl) skips the
        hash. Revocation and role are checked on every request."""
        store = self.keystore
        memo = conn.auth_memo
        if memo is not None and _same(memo[0], header):
            record = store.lookup(memo[1])
            if record is memo[2]:
                store.check_access(record, self.policy.role)
                return memo[1]
        key_id, secret = apikeys.parse_authorization(header)
        record = store.lookup(key_id)
        if record is store.MISS:
            return None
        store.check(record, secret, self.policy.role)
        conn.auth_memo = (header, key_id, record)
        return key_id

    def answer_read(self, reader, buf, client: str, conn) -> bytes | None:
        """The whole HTTP response for the request in buf whose head `reader` read last and found a
        candidate (buf holds exactly that request), or None: let the next step answer."""
        started = (time.time(), time.perf_counter())
        if self.inflight.draining or reader.body_length > self.max_body:
            return None
        try:
            key_id = self._authorize(reader.authorization, conn)
        except apikeys.AuthError:
            return None
        if key_id is None:
            return None
        vector = reader.query_vector(buf, FiniteArray)  # finite: the reader takes no other component
        if vector is None:
            return None
        k, ef = reader.k, reader.ef
        if not handlers.runs_inline(self.config, k, ef):
            return None
        flt = reader.filter_json
        if flt is not None:
            flt = self._filter(flt)
            if flt is _REFUSED:
                return None
        if k and not reader.include_metadata:
            return self._respond(self._search_top, (vector, k, ef, reader.search_tier, flt), k, ef, key_id,
                                 reader.request_id, client, started)
        req = {"vector": vector, "k": k, "ef": ef, "include_metadata": reader.include_metadata,
               "filter": flt, "search_tier": reader.search_tier}
        return self._respond(self._search, (req,), k, ef, key_id, reader.request_id, client, started)

    def answer(self, message, body: bytes, client: str, conn) -> bytes | None:
        """The whole HTTP response for a candidate message, or None: let the regular route answer.
        conn: the connection's protocol (server/protocol.py), which keeps `auth_memo` for _authorize."""
        started = (time.time(), time.perf_counter())
        headers = message.headers
        if self.inflight.draining or "Expect" in headers or len(body) > self.max_body:
            return None
        content_type = headers.get("Content-Type")
        if content_type is None or not handlers.is_json(content_type.partition(";")[0].strip().lower()):
            return None
        auth = headers.getall("Authorization", ())
        if len(auth) != 1:
            return None
        try:
            key_id = self._authorize(auth[0], conn)
        except apikeys.AuthError:
            return None
        if key_id is None:
            return None
        try:
            req = handlers.parse_and_validate(body, self.validate)
        except Exception:  # noqa: BLE001 - the regular route answers the error
            return None
        if not handlers.runs_inline(self.config, req["k"], req["ef"]):
            return None
        return self._respond(self._search, (req,), req["k"], req["ef"], key_id, headers.get("x-request-id"),
                             client, started)

    def _filter(self, raw: bytes):
        """The QueryFilter (or None) of a filter object's JSON bytes, as the validator makes it, or
        _REFUSED: the regular route answers the error. Clients repeat their filters, so the last
        FILTER_MEMO distinct ones are remembered by their bytes (a QueryFilter is immutable)."""
        memo = self._filters
        got = memo.get(raw, _REFUSED)
        if got is not _REFUSED:
            return got
        try:
            got = self.query_filter(raw)
        except Exception:  # noqa: BLE001 - the regular route answers the error
            return _REFUSED
        if len(memo) >= FILTER_MEMO:
            memo.clear()
        memo[raw] = got
        return got

    def _search(self, req) -> tuple[bytes, float]:
        """The regular route's search of a validated request: (JSON payload, engine seconds)."""
        results, secs = handlers.search(self.engine, req)
        return orjson.dumps(handlers.query_payload(results, secs)), secs

    def _search_top(self, vector, k: int, ef: int, search_tier: str, flt) -> tuple[bytes, float]:
        """_search of a query without metadata (the common one): the engine's unshaped top-k written
        as JSON in one native pass (httpq.query_answer), the same bytes."""
        t0 = time.perf_counter()
        ids, scores = self.engine.query_top(vector, k, ef, search_tier, flt)
        secs = time.perf_counter() - t0
        payload = query_answer(ids, orjson.dumps(scores, option=orjson.OPT_SERIALIZE_NUMPY),
                               orjson.dumps(secs * 1000.0))
        if payload is None:  # a score whose digits only the general shaping writes right
            payload = orjson.dumps(handlers.query_payload(shape_results(ids, scores), secs))
        return payload, secs

    def _respond(self, search, args, k: int, ef: int, key_id: str, rid: str | None, client: str,
                 started) -> bytes | None:
        """`search(*args)` (_search or _search_top) and its response, with the regular route's
        bookkeeping; None (nothing recorded) when the engine raises: the regular route answers (and
        logs) it."""
        if not valid_request_id(rid):
            rid = new_request_id()
        token = REQUEST_ID.set(rid)
        try:
            try:
                payload, secs = search(*args)
            except Exception:  # noqa: BLE001 - the regular route answers (and logs) it
                return None
            self.metrics.observe_search("query", secs)
            record_request(self.app, "POST", PATH, self.policy, 200, started, rid, key_id, client,
                           handlers.query_audit_details(k, ef))
        finally:
            REQUEST_ID.reset(token)
        return b"".join((_HEAD, str(len(payload)).encode("ascii"), b"\r\nDate: ",
                         rfc822_formatted_time().encode("ascii"), _SERVER, rid.encode("ascii"), b"\r\n\r\n",
                         payload))
