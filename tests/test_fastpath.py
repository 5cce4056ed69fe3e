"""The fast query path (server/fastpath.py): a common `POST /v2/query` answered from the connection.

A real engine behind serve-v2's runner on 127.0.0.1, raw HTTP/1.1 over asyncio streams (an HTTP
client would normalise what is tested here). What must hold:
* it answers the common case, and the answer is the regular route's: same status line, header
  names, body and `x-request-id` handling;
* the same bookkeeping: request and search counters, one audit row, one access line per query;
* everything else takes the regular route with its exact answer: auth failures, uncached keys,
  bad bodies, large k, `Connection: close`, `Expect`, chunked bodies, wrong media types, pipelined
  and split requests, a draining server;
* keep-alive idle timeout, revocation and read-your-writes on one connection still hold.
"""
import asyncio
import io
import logging
import time

import numpy as np
import orjson
import pytest
from aiohttp import web

from server_util import embedded_engine
from vibrato import apikeys
from vibrato.catalog import audit as audit_sql
from vibrato.server import create_app
from vibrato.server import fastpath
from vibrato.server import state as K
from vibrato.server.protocol import make_runner

DIM = 8


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    keys = [("admin", "admin"), ("query", "query"), ("ingest", "ingest")]
    with embedded_engine(tmp_path_factory.mktemp("fastpath"), DIM, keys, keepalive_timeout_secs=1.0) as (
            config, engine, tokens):
        yield {"config": config, "engine": engine, "tokens": tokens}


@pytest.fixture
def answered(monkeypatch):
    """Counts the requests the fast path answered (not just looked at): "n" in all, "read" from the
    connection's bytes (FastQuery.answer_read), "parsed" from aiohttp's message (FastQuery.answer)."""
    count = {"n": 0, "read": 0, "parsed": 0}

    def spy(name, front):
        original = getattr(fastpath.FastQuery, name)

        def wrapper(self, *args):
            out = original(self, *args)
            count["n"] += out is not None
            count[front] += out is not None
            return out
        monkeypatch.setattr(fastpath.FastQuery, name, wrapper)
    spy("answer_read", "read")
    spy("answer", "parsed")
    return count


def serve(env, body, **config_changes):
    """Run `await body(port, app)` against create_app behind serve-v2's runner, then shut it down."""
    config = env["config"].replace(**config_changes) if config_changes else env["config"]

    async def main():
        app = create_app(config, engine=env["engine"])
        runner = make_runner(app, config)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            await body(site._server.sockets[0].getsockname()[1], app)
        finally:
            await runner.cleanup()
    asyncio.run(main())


def request(path="/v2/query", body=b"", token=None, method="POST", extra=(), content_type="application/json"):
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if token is not None:
        head.append(f"Authorization: Bearer {token}")
    if content_type is not None:
        head.append(f"Content-Type: {content_type}")
    if not any(h.lower().startswith("transfer-encoding") for h in extra):
        head.append(f"Content-Length: {len(body)}")
    head.extend(extra)
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def read_response(reader) -> tuple[int, dict, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", 0))) if status >= 200 else b""
    return status, headers, body, lines


def query_body(seed=0, **extra) -> bytes:
    v = np.random.default_rng(seed).standard_normal(DIM)
    return orjson.dumps({"vector": (v / np.linalg.norm(v)).tolist(), "k": 3, **extra})


async def queries_ok(reader, writer, token, times, body=None):
    """Send `times` queries on the connection, each answered 200 (on a fresh app the first loads the
    key on the regular route; later ones are fast)."""
    for _ in range(times):
        writer.write(request(body=query_body() if body is None else body, token=token))
        assert (await read_response(reader))[0] == 200


async def ingest_one(reader, writer, token, bpm):
    v = [0.0] * DIM
    v[bpm % DIM] = 1.0
    writer.write(request("/v2/vectors", orjson.dumps({"vector": v, "metadata": {"bpm": float(bpm)}}), token))
    status, _, body, _ = await read_response(reader)
    assert status == 201, body
    return orjson.loads(body)["data"]["id"]


def _without_time(body: bytes) -> dict:
    doc = orjson.loads(body)
    doc["data"].pop("query_time_ms", None)
    return doc


def test_answers_the_common_query_like_the_regular_route(env, answered):
    token = env["tokens"]["query"]
    seen = {}

    async def body(port, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if app[K.CONFIG].fast_query_path:  # the first run only: both see the same rows
            await ingest_one(reader, writer, env["tokens"]["ingest"], 5)
        await queries_ok(reader, writer, token, 1, query_body(1))  # loads the key: the regular route
        out = []
        for rid in ("given-id-1", None):
            writer.write(request(body=query_body(1), token=token,
                                 extra=[f"x-request-id: {rid}"] if rid else []))
            out.append(await read_response(reader))
        writer.close()
        seen[app[K.CONFIG].fast_query_path] = out

    serve(env, body, fast_query_path=True)
    assert answered["n"] == answered["read"] == 2  # the warm-up loaded the key on the regular route
    serve(env, body, fast_query_path=False)
    assert answered["n"] == 2  # off: never consulted
    for (fs, fh, fb, fl), (rs, rh, rb, rl) in zip(seen[True], seen[False]):
        assert fs == rs == 200 and fl[0] == rl[0] == "HTTP/1.1 200 OK"
        assert set(fh) == set(rh) == {"content-type", "content-length", "date", "server", "x-request-id"}
        assert {k: v for k, v in fh.items() if k not in ("date", "x-request-id", "content-length")} == \
               {k: v for k, v in rh.items() if k not in ("date", "x-request-id", "content-length")}
        assert _without_time(fb) == _without_time(rb)
        assert isinstance(orjson.loads(fb)["data"]["query_time_ms"], float)
    assert seen[True][0][1]["x-request-id"] == "given-id-1"
    assert seen[True][1][1]["x-request-id"].startswith("req_")


def test_counts_and_audits_each_fast_query(env, answered):
    token = env["tokens"]["query"]
    key_id = token.split(".")[0]
    marker = f"fast-audit-{time.time_ns()}"

    async def body(port, app):
        metrics = app[K.METRICS]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await queries_ok(reader, writer, token, 1)  # loads the key: the regular route
        before = (metrics.http_requests.get(("POST", "/v2/query", "200"), 0), metrics.query_requests)
        for i in range(5):
            writer.write(request(body=query_body(i), token=token, extra=[f"x-request-id: {marker}-{i}"]))
            status, _, _, _ = await read_response(reader)
            assert status == 200
        writer.close()
        assert metrics.http_requests[("POST", "/v2/query", "200")] - before[0] == 5
        assert metrics.query_requests - before[1] == 5

    serve(env, body)  # cleanup flushes the audit writer
    assert answered["n"] == 5
    rows = [r for r in env["engine"].catalog.read(audit_sql.recent, 200) if r["request_id"].startswith(marker)]
    assert sorted(r["request_id"] for r in rows) == [f"{marker}-{i}" for i in range(5)]
    for r in rows:
        assert (r["action"], r["endpoint"], r["status_code"], r["api_key_id"], r["client_ip"]) == \
               ("query", "/v2/query", 200, key_id, "127.0.0.1")
        assert orjson.loads(r["details_json"]) == {"k": 3, "ef": 50}


def test_access_lines_carry_the_request_id(env, answered):
    """The access line goes through the log writer like the regular route's, with its request id."""
    from vibrato.server import logs
    token = env["tokens"]["query"]
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    logs.configure("info", stream=stream)
    try:
        async def body(port, app):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for rid in ("regular-line-1", "fast-line-1"):  # the first loads the key: the regular route
                writer.write(request(body=query_body(3), token=token, extra=[f"x-request-id: {rid}"]))
                assert (await read_response(reader))[0] == 200
            writer.close()
        serve(env, body)
    finally:
        logs.flush()
        for h in list(root.handlers):
            if getattr(h, "_vibrato", False):
                root.removeHandler(h)
        root.setLevel(level)
    lines = {}
    for x in stream.getvalue().splitlines():
        doc = orjson.loads(x)
        if doc["logger"] == "vibrato.access":
            lines[doc["request_id"]] = doc
    assert answered["n"] == 1, stream.getvalue()
    fast, regular = lines["fast-line-1"], lines["regular-line-1"]
    assert set(fast) == set(regular)
    for doc in (fast, regular):
        assert (doc["method"], doc["path"], doc["status"], doc["client"]) == ("POST", "/v2/query", 200, "127.0.0.1")


DECLINED = [
    # (name, raw request builder, expected status) — each takes the regular route and gets its answer
    ("no auth", lambda t: request(body=query_body()), 401),
    ("bad secret", lambda t: request(body=query_body(), token=t[:-4] + "aaaa"), 401),
    ("ingest-only key", lambda t: request(body=query_body(), token="INGEST"), 403),
    ("two auth headers", lambda t: request(body=query_body(), token=t, extra=[f"Authorization: Bearer {t}"]), 400),
    ("not json", lambda t: request(body=b"{nope", token=t), 400),
    ("wrong dim", lambda t: request(body=b'{"vector":[1.0,0.0],"k":3}', token=t), 400),
    ("k not an integer", lambda t: request(body=query_body(k="3"), token=t), 422),
    ("text/plain", lambda t: request(body=query_body(), token=t, content_type="text/plain"), 415),
    ("no content type", lambda t: request(body=query_body(), token=t, content_type=None), 415),
    ("k past the inline limit", lambda t: request(body=query_body(k=101), token=t), 200),
    ("ef past the inline limit", lambda t: request(body=query_body(ef=300), token=t), 200),
    ("chunked", lambda t: request(body=b"", token=t, extra=["Transfer-Encoding: chunked"])
     + b"%x\r\n" % len(query_body()) + query_body() + b"\r\n0\r\n\r\n", 200),
    ("expect 100-continue", lambda t: request(body=query_body(), token=t, extra=["Expect: 100-continue"]), 200),
]


@pytest.mark.parametrize("name,build,status", DECLINED, ids=[d[0] for d in DECLINED])
def test_declined_requests_get_the_regular_answer(env, answered, name, build, status):
    token = env["tokens"]["query"]

    async def body(port, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # warm the key cache (the first loads it, the second is fast), so a decline is the request's doing
        await queries_ok(reader, writer, token, 2)
        raw = build(token).replace(b"Bearer INGEST", f"Bearer {env['tokens']['ingest']}".encode())
        writer.write(raw)
        got, headers, text, _ = await read_response(reader)
        while got == 100:
            got, headers, text, _ = await read_response(reader)
        assert got == status, text
        assert headers["x-request-id"]
        if status >= 400:
            assert set(orjson.loads(text)) == {"code", "message"}
        writer.close()
    serve(env, body)
    assert answered["n"] == 1  # the second warm-up only


def test_uncached_key_goes_regular_then_fast(env, answered):
    async def body(port, app):
        app[K.KEYSTORE].invalidate()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for expected in (0, 1):
            writer.write(request(body=query_body(), token=env["tokens"]["query"]))
            assert (await read_response(reader))[0] == 200
            assert answered["n"] == expected
        writer.close()
    serve(env, body)


def test_connection_close_is_answered_and_closed(env, answered):
    async def body(port, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request(body=query_body(), token=env["tokens"]["query"], extra=["Connection: close"]))
        status, headers, _, _ = await read_response(reader)
        assert status == 200 and headers.get("connection", "").lower() == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""
    serve(env, body)
    assert answered["n"] == 0


def test_pipelined_and_split_requests_keep_their_order(env, answered):
    token = env["tokens"]["query"]

    async def body(port, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # two requests in one write: both answered, in order (the regular route takes them)
        writer.write(request(body=query_body(1), token=token, extra=["x-request-id: pipe-1"])
                     + request(body=query_body(2), token=token, extra=["x-request-id: pipe-2"]))
        for rid in ("pipe-1", "pipe-2"):
            status, headers, _, _ = await read_response(reader)
            assert status == 200 and headers["x-request-id"] == rid
        # head and body in separate writes
        raw = request(body=query_body(3), token=token, extra=["x-request-id: split-1"])
        cut = raw.index(b"\r\n\r\n") + 4
        writer.write(raw[:cut])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(raw[cut:])
        status, headers, _, _ = await read_response(reader)
        assert status == 200 and headers["x-request-id"] == "split-1"
        # and the connection is still good for a fast one
        writer.write(request(body=query_body(4), token=token, extra=["x-request-id: after-1"]))
        status, headers, _, _ = await read_response(reader)
        assert status == 200 and headers["x-request-id"] == "after-1"
        writer.close()
    serve(env, body)
    assert answered["n"] == 1


def test_filtered_and_compact_queries_are_answered_like_the_regular_route(env, answered):
    """A filtered query is read from its bytes too (its filter object checked by the validator); the
    compact vector form is answered by the second step, from aiohttp's parsed message. Both give the
    regular route's result."""
    token = env["tokens"]["query"]
    seen = {}

    async def body(port, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await queries_ok(reader, writer, token, 1)  # loads the key: the regular route
        v = np.random.default_rng(5).standard_normal(DIM).astype(np.float32)
        out = []
        for doc in ({"vector": v.tolist(), "k": 4, "filter": {"bpm_gte": 0.0}},
                    {"vector": fastpath_pack(v), "k": 4}, {"vector": v.tolist(), "k": 4}):
            writer.write(request(body=orjson.dumps(doc), token=token))
            status, _, text, _ = await read_response(reader)
            assert status == 200, text
            out.append(_without_time(text))
        writer.close()
        seen[app[K.CONFIG].fast_query_path] = out

    serve(env, body, fast_query_path=True)
    assert (answered["parsed"], answered["read"]) == (1, 2)
    serve(env, body, fast_query_path=False)
    assert seen[True] == seen[False]


def fastpath_pack(v) -> str:
    """The compact vector form: base64 of little-endian float32 (CONTRACT.md)."""
    import base64
    return base64.b64encode(np.asarray(v, "<f4").tobytes()).decode()


def test_a_read_that_continues_a_partial_head_is_not_taken_for_a_new_request(env, answered):
    """Once a read ends inside a request head, later reads of the connection go to aiohttp's parser:
    a complete query arriving after a partial head is the rest of that head, not a request of its own
    (here: one request whose first x-request-id is "outer")."""
    token = env["tokens"]["query"]

    async def body(port, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await queries_ok(reader, writer, token, 2)  # the key cached; the second is read from the bytes
        writer.write(b"POST /v2/query HTTP/1.1\r\nx-request-id: outer\r\nX-Junk: ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(request(body=query_body(), token=token, extra=["x-request-id: inner"]))
        status, headers, text, _ = await read_response(reader)
        assert status == 200 and headers["x-request-id"] == "outer", text
        writer.close()
    serve(env, body)
    assert answered["read"] == 1


def test_read_your_writes_on_one_connection(env, answered):
    """An ingest (regular route) then a query (fast path) on the same connection sees the row."""
    async def body(port, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in range(20):
            bpm = 1000 + i
            vid = await ingest_one(reader, writer, env["tokens"]["admin"], bpm)
            writer.write(request(body=query_body(i, filter={"bpm_gte": bpm, "bpm_lte": bpm}),
                                 token=env["tokens"]["query"]))
            status, _, text, _ = await read_response(reader)
            assert status == 200 and [r["id"] for r in orjson.loads(text)["data"]["results"]] == [vid]
        writer.close()
    serve(env, body)
    assert answered["n"] == 19  # the first query loads the key on the regular route


def test_idle_connection_still_times_out_after_fast_queries(env, answered):
    async def body(port, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await queries_ok(reader, writer, env["tokens"]["query"], 3)  # the first loads the key: regular route
        t0 = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
        assert time.monotonic() - t0 < 5  # keepalive 1 s (aiohttp's timer is coarse)
    serve(env, body)
    assert answered["n"] == 2


async def new_query_key(env, name):
    """(key id, token) of a fresh query key in the engine's catalog."""
    return await asyncio.to_thread(apikeys.create_key, env["engine"].catalog,
                                   apikeys.load_pepper(env["config"].data_dir), name, "query")


def test_a_revoked_key_is_refused_within_the_cache_ttl(env, answered):
    async def body(port, app):
        key_id, token = await new_query_key(env, "short")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await queries_ok(reader, writer, token, 2)
        await asyncio.to_thread(apikeys.revoke_key, env["engine"].catalog, key_id)
        await asyncio.sleep(env["config"].key_cache_ttl_secs + 0.1)
        writer.close()  # (idle past the keep-alive timeout)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request(body=query_body(), token=token))
        assert (await read_response(reader))[0] == 403
        writer.close()
    serve(env, body)
    assert answered["n"] == 1  # the first loads the key on the regular route


def test_a_connection_that_proved_its_key_is_refused_after_revocation(env, answered):
    """The fast path checks a connection's secret once per cached key record (FastQuery._authorize);
    revocation still reaches that connection within the key cache's TTL."""
    async def body(port, app):
        key_id, token = await new_query_key(env, "kept")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await queries_ok(reader, writer, token, 3)
        await asyncio.to_thread(apikeys.revoke_key, env["engine"].catalog, key_id)
        revoked_at, statuses = time.monotonic(), []
        while time.monotonic() - revoked_at < env["config"].key_cache_ttl_secs + 0.6:
            writer.write(request(body=query_body(), token=token))  # the same connection, kept busy
            statuses.append((await read_response(reader))[0])
            await asyncio.sleep(0.05)
        assert statuses[-1] == 403, statuses
        first = statuses.index(403)
        assert set(statuses[:first]) <= {200} and set(statuses[first:]) == {403}, statuses
        writer.close()
    serve(env, body)
    assert answered["n"] >= 2  # the memo was in use before the revocation


def test_draining_server_declines(env, answered):
    async def body(port, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await queries_ok(reader, writer, env["tokens"]["query"], 2)  # the first loads the key: regular route
        app[K.INFLIGHT].draining = True
        writer.write(request(body=query_body(), token=env["tokens"]["query"]))
        status, headers, _, _ = await read_response(reader)
        assert status == 200 and headers.get("connection", "").lower() == "close"
    serve(env, body)
    assert answered["n"] == 1


def _script(seed: int, token: str) -> tuple[list[bytes], list[bytes], str, list[str]]:
    """A random mix of requests for one connection (with their x-request-ids, so answers can be matched
    in order) and the cut points of the byte stream into writes: queries plain, filtered, compact and
    malformed, health checks, an ingest-only key's refusal, and requests cut anywhere, several per
    write, or one per write."""
    rng = np.random.default_rng(seed)
    reqs, kinds = [], []
    for i in range(int(rng.integers(8, 20))):
        kind = rng.choice(["plain", "filter", "compact", "bad", "health", "nokey", "plain", "plain"])
        kinds.append(str(kind))
        rid = [f"x-request-id: s{seed}-{i}"]
        if kind == "plain":
            reqs.append(request(body=query_body(i, ef=int(rng.integers(1, 80))), token=token, extra=rid))
        elif kind == "filter":
            reqs.append(request(body=query_body(i, filter={"bpm_gte": float(rng.integers(0, 9))}), token=token, extra=rid))
        elif kind == "compact":
            v = np.random.default_rng(i).standard_normal(DIM).astype(np.float32)
            reqs.append(request(body=orjson.dumps({"vector": fastpath_pack(v), "k": 2}), token=token, extra=rid))
        elif kind == "bad":
            reqs.append(request(body=b'{"vector": [1, 2], "k": 3}', token=token, extra=rid))
        elif kind == "health":
            reqs.append(request("/v2/health/live", method="GET", content_type=None, extra=rid).replace(
                b"Content-Length: 0\r\n", b""))
        else:
            reqs.append(request(body=query_body(i), extra=rid))
    stream = b"".join(reqs)
    mode = rng.choice(["whole", "random", "bytes"])
    if mode == "whole":  # one request per write
        return reqs, reqs, mode, kinds
    cuts = sorted(set(rng.integers(1, len(stream), int(rng.integers(1, 12))).tolist()))
    if mode == "bytes":  # a few single bytes at a head's start, then the rest
        cuts = sorted(set(cuts + [1, 2, 3]))
    return reqs, [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])], mode, kinds


@pytest.mark.parametrize("seed", range(12))
def test_any_mix_and_split_of_requests_gets_the_regular_routes_answers_in_order(env, answered, seed):
    """The same bytes, written in the same pieces on one connection, get the same answers in the same
    order with the fast path on as with it off (statuses, request ids, bodies apart from timing)."""
    token = env["tokens"]["query"]
    seen = {}
    modes = []

    async def body(port, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await queries_ok(reader, writer, token, 1)  # the key cached: later queries may be fast
        reqs, writes, mode, kinds = _script(seed, token)
        modes.append((mode, kinds))
        for piece in writes:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.002)
        out = []
        for _ in reqs:
            status, headers, text, _ = await read_response(reader)
            doc = orjson.loads(text) if text else None
            if isinstance(doc, dict) and "data" in doc and isinstance(doc["data"], dict):
                doc["data"].pop("query_time_ms", None)
            out.append((status, headers.get("x-request-id"), doc))
        writer.close()
        seen[app[K.CONFIG].fast_query_path] = out

    serve(env, body, fast_query_path=True)
    fast = dict(answered)
    serve(env, body, fast_query_path=False)
    assert seen[True] == seen[False]
    mode, kinds = modes[0]
    if mode == "whole":  # one request per write: its plain and filtered queries were read from the bytes
        assert fast["read"] == sum(1 for kind, (s, _, _) in zip(kinds, seen[True]) if kind in ("plain", "filter")
                                   and s == 200) > 0
