"""A small client for the v2 HTTP API: `Client` (blocking, standard library) and `AsyncClient` (aiohttp).

Both wrap every route, accept numpy arrays (or sequences) for vectors, return the `data` payload of
the response, and raise `VibratoHTTPError(status, code, message, request_id)` for error responses.
numpy vectors are sent in the compact form (base64 of little-endian float32, `pack_f32`): a 75-frame
identify body is ~53 KB instead of ~100 KB of JSON floats, and cheaper for the server to decode.

    with Client("http://127.0.0.1:8080", token) as c:
        vid, created = c.ingest(np.ones(128, np.float32), metadata={"tags": ["rock"]})
        hits = c.query(q, k=10)["results"]

`Client` keeps one keep-alive connection per thread (thread-safe); `AsyncClient` one aiohttp session.
A 429 (ingest backpressure: nothing was written) is retried after its `Retry-After` for up to
`backpressure_retry_secs` (120 s) before it is raised (CONTRACT.md D41).
"""
import asyncio
import base64
import http.client
import threading
import time
import urllib.parse

import numpy as np
import orjson

_DUMPS_OPTS = orjson.OPT_SERIALIZE_NUMPY


def _outgoing(token, body, raw: bytes | None, headers) -> tuple[bytes | None, dict]:
    """(payload, headers) of a request: `body` as JSON when given (else the `raw` bytes), a bearer
    token when given, then the caller's extra headers."""
    hdrs = {}
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    payload = raw
    if body is not None:
        payload = orjson.dumps(body, option=_DUMPS_OPTS)
        hdrs["Content-Type"] = "application/json"
    if headers:
        hdrs.update(headers)
    return payload, hdrs


class VibratoHTTPError(Exception):
    """An error response: HTTP status, the body's code and message, and the x-request-id."""

    def __init__(self, status: int, code: str, message: str, request_id: str | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id


def _vec(v):
    """numpy input travels in the compact form (docs/SERVER.md); sequences as JSON arrays."""
    return pack_f32(v) if isinstance(v, np.ndarray) else v


def pack_f32(a) -> str:
    """The compact vector encoding: standard base64 of the little-endian float32 components (rows
    one after another for identify's frames)."""
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def _ingest_item(vector, metadata=None, idempotency_key=None) -> dict:
    item = {"vector": _vec(vector)}
    if metadata is not None:
        item["metadata"] = metadata
    if idempotency_key is not None:
        item["idempotency_key"] = idempotency_key
    return item


def _batch_body(vectors, metadatas=None, idempotency_keys=None) -> dict:
    """vectors: (n, d) array or a list of vectors / of item dicts."""
    items = []
    for i, v in enumerate(vectors):
        if isinstance(v, dict):
            items.append({**v, "vector": _vec(v["vector"])})
        else:
            items.append(_ingest_item(v, None if metadatas is None else metadatas[i],
                                      None if idempotency_keys is None else idempotency_keys[i]))
    return {"vectors": items}


def _query_body(vector, k, ef, filter, search_tier, include_metadata) -> dict:
    body = {"vector": _vec(vector), "k": k, "ef": ef, "include_metadata": include_metadata}
    if filter is not None:
        body["filter"] = filter
    if search_tier is not None:
        body["search_tier"] = search_tier
    return body


def _identify_body(vectors, k, ef, search_tier, include_metadata) -> dict:
    body = {"vectors": _vec(vectors), "k": k, "ef": ef, "include_metadata": include_metadata}
    if search_tier is not None:
        body["search_tier"] = search_tier
    return body


def _delete_body(ids, filter) -> dict:
    """Exactly one of ids / filter is sent as given (the server answers 400 for both or neither)."""
    body = {}
    if ids is not None:
        body["ids"] = ids if isinstance(ids, np.ndarray) else list(ids)  # numpy: orjson writes its integers
    if filter is not None:
        body["filter"] = filter
    return body


def _delete_path(id) -> str:
    return f"/v2/vectors/{urllib.parse.quote(str(id), safe='')}"


def _compact_body(purge: bool):
    return {"purge": True} if purge else None


BACKPRESSURE_RETRY_SECS = 120.0  # how long a client keeps retrying ingests answered 429 (Retry-After)


def _retry_after(status: int, headers: dict) -> float | None:
    """Seconds to wait before retrying a 429 (ingest backpressure, CONTRACT.md D41), else None."""
    if status != 429:
        return None
    try:
        return min(60.0, max(0.0, float(headers.get("retry-after", "1"))))
    except ValueError:
        return 1.0


def _decode(status: int, body: bytes, request_id, allow=()):
    if status in allow or 200 <= status < 300:
        return orjson.loads(body)["data"]
    try:
        err = orjson.loads(body)
        code, message = err["code"], err["message"]
    except Exception:  # noqa: BLE001 - not our JSON error body
        code, message = f"http_{status}", body[:500].decode(errors="replace")
    raise VibratoHTTPError(status, code, message, request_id)


class Client:
    """Blocking client over http.client (one keep-alive connection per thread)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8080", token: str | None = None, timeout: float = 60.0,
                 backpressure_retry_secs: float = BACKPRESSURE_RETRY_SECS):
        u = urllib.parse.urlsplit(base_url)
        if u.scheme != "http":
            raise ValueError(f"only http:// URLs are supported, got {base_url!r}")
        self.host = u.hostname
        self.port = u.port or 80
        self.token = token
        self.timeout = timeout
        self.backpressure_retry_secs = backpressure_retry_secs
        self._local = threading.local()

    # ------------------------------------------------------------------ transport
    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return conn

    def request(self, method: str, path: str, body=None, *, headers=None, raw: bytes | None = None,
                auth: bool = True) -> tuple[int, dict, bytes]:
        """One HTTP exchange; returns (status, lower-cased headers, body). Retries once on a stale connection."""
        payload, hdrs = _outgoing(self.token if auth else None, body, raw, headers)
        for attempt in (0, 1):
            conn = self._conn()
            try:
                conn.request(method, path, body=payload, headers=hdrs)
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
            except BaseException:
                # e.g. a refused connect or a timeout: the connection is mid-request, so a later call
                # on it would fail with CannotSendRequest; the next call opens a new one
                conn.close()
                self._local.conn = None
                raise
        raise AssertionError("unreachable")

    def _call(self, method, path, body=None, allow=()):
        """One call; a 429 (nothing was written) is retried after its Retry-After, for up to
        backpressure_retry_secs."""
        deadline = time.monotonic() + self.backpressure_retry_secs
        while True:
            status, headers, data = self.request(method, path, body)
            wait = _retry_after(status, headers)
            if wait is None or time.monotonic() + wait > deadline:
                return _decode(status, data, headers.get("x-request-id"), allow)
            time.sleep(wait)

    def close(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ routes
    def ingest(self, vector, metadata=None, idempotency_key=None) -> tuple[int, bool]:
        d = self._call("POST", "/v2/vectors", _ingest_item(vector, metadata, idempotency_key))
        return d["id"], d["created"]

    def ingest_batch(self, vectors, metadatas=None, idempotency_keys=None) -> list[tuple[int, bool]]:
        d = self._call("POST", "/v2/vectors/batch", _batch_body(vectors, metadatas, idempotency_keys))
        return [(r["id"], r["created"]) for r in d["results"]]

    def query(self, vector, k=10, ef=50, filter=None, search_tier=None, include_metadata=True) -> dict:
        return self._call("POST", "/v2/query", _query_body(vector, k, ef, filter, search_tier, include_metadata))

    def identify(self, vectors, k=5, ef=100, search_tier=None, include_metadata=True) -> dict:
        return self._call("POST", "/v2/identify", _identify_body(vectors, k, ef, search_tier, include_metadata))

    def health_live(self) -> dict:
        return self._call("GET", "/v2/health/live")

    def health_ready(self) -> dict:
        """The readiness payload; a 503 (not ready) is returned, not raised."""
        return self._call("GET", "/v2/health/ready", allow=(503,))

    def delete(self, ids=None, *, filter=None) -> dict:
        """Delete by ids, or by filter (tags_any, tags_all, bpm_gte, bpm_lte, source_file: a name or a
        list); exactly one. Returns {"deleted": n, "lsn": lsn or None}."""
        return self._call("POST", "/v2/vectors/delete", _delete_body(ids, filter))

    def delete_one(self, id) -> dict:
        """DELETE /v2/vectors/{id}: {"deleted": 0 or 1, "lsn": ...}."""
        return self._call("DELETE", _delete_path(id))

    def checkpoint(self) -> dict:
        return self._call("POST", "/v2/admin/checkpoint")

    def compact(self, purge: bool = False) -> dict:
        """One compaction step; with purge=True erase every deleted row's payload now (can take minutes:
        give the client a timeout to match)."""
        return self._call("POST", "/v2/admin/compact", _compact_body(purge))

    def snapshot(self) -> dict:
        return self._call("POST", "/v2/admin/snapshot")

    def stats(self) -> dict:
        return self._call("GET", "/v2/admin/stats")

    def metrics(self) -> str:
        status, headers, data = self.request("GET", "/v2/metrics")
        if status != 200:
            _decode(status, data, headers.get("x-request-id"))
        return data.decode()

    def openapi(self) -> dict:
        status, headers, data = self.request("GET", "/v2/openapi.json")
        if status != 200:
            _decode(status, data, headers.get("x-request-id"))
        return orjson.loads(data)


class AsyncClient:
    """asyncio client over one aiohttp.ClientSession (create it inside a running loop)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8080", token: str | None = None, timeout: float = 60.0,
                 connections: int = 100, backpressure_retry_secs: float = BACKPRESSURE_RETRY_SECS):
        import aiohttp
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.backpressure_retry_secs = backpressure_retry_secs
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout),
            connector=aiohttp.TCPConnector(limit=connections))

    async def request(self, method: str, path: str, body=None, *, headers=None, raw: bytes | None = None,
                      auth: bool = True) -> tuple[int, dict, bytes]:
        payload, hdrs = _outgoing(self.token if auth else None, body, raw, headers)
        async with self._session.request(method, self.base_url + path, data=payload, headers=hdrs) as resp:
            data = await resp.read()
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, data

    async def _call(self, method, path, body=None, allow=()):
        """As Client._call: a 429 is retried after its Retry-After, for up to backpressure_retry_secs."""
        deadline = time.monotonic() + self.backpressure_retry_secs
        while True:
            status, headers, data = await self.request(method, path, body)
            wait = _retry_after(status, headers)
            if wait is None or time.monotonic() + wait > deadline:
                return _decode(status, data, headers.get("x-request-id"), allow)
            await asyncio.sleep(wait)

    async def close(self):
        await self._session.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def ingest(self, vector, metadata=None, idempotency_key=None) -> tuple[int, bool]:
        d = await self._call("POST", "/v2/vectors", _ingest_item(vector, metadata, idempotency_key))
        return d["id"], d["created"]

    async def ingest_batch(self, vectors, metadatas=None, idempotency_keys=None) -> list[tuple[int, bool]]:
        d = await self._call("POST", "/v2/vectors/batch", _batch_body(vectors, metadatas, idempotency_keys))
        return [(r["id"], r["created"]) for r in d["results"]]

    async def query(self, vector, k=10, ef=50, filter=None, search_tier=None, include_metadata=True) -> dict:
        return await self._call("POST", "/v2/query", _query_body(vector, k, ef, filter, search_tier,
                                                                 include_metadata))

    async def identify(self, vectors, k=5, ef=100, search_tier=None, include_metadata=True) -> dict:
        return await self._call("POST", "/v2/identify", _identify_body(vectors, k, ef, search_tier,
                                                                       include_metadata))

    async def health_live(self) -> dict:
        return await self._call("GET", "/v2/health/live")

    async def health_ready(self) -> dict:
        return await self._call("GET", "/v2/health/ready", allow=(503,))

    async def delete(self, ids=None, *, filter=None) -> dict:
        return await self._call("POST", "/v2/vectors/delete", _delete_body(ids, filter))

    async def delete_one(self, id) -> dict:
        return await self._call("DELETE", _delete_path(id))

    async def checkpoint(self) -> dict:
        return await self._call("POST", "/v2/admin/checkpoint")

    async def compact(self, purge: bool = False) -> dict:
        return await self._call("POST", "/v2/admin/compact", _compact_body(purge))

    async def snapshot(self) -> dict:
        return await self._call("POST", "/v2/admin/snapshot")

    async def stats(self) -> dict:
        return await self._call("GET", "/v2/admin/stats")

    async def metrics(self) -> str:
        status, headers, data = await self.request("GET", "/v2/metrics")
        if status != 200:
            _decode(status, data, headers.get("x-request-id"))
        return data.decode()

    async def openapi(self) -> dict:
        status, headers, data = await self.request("GET", "/v2/openapi.json")
        if status != 200:
            _decode(status, data, headers.get("x-request-id"))
        return orjson.loads(data)
