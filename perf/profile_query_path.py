"""Where a small query's CPU goes in process, step by step (report, don't assert).

    .venv/bin/python perf/profile_query_path.py [--n 50000] [--reps 2000]

Builds an engine in a temp dir (tests/server_util.embedded_engine: real catalog and segment files),
ingests --n rows of perf/bench_http.py's set, checkpoints and compacts them into one raw segment, then
times one warm query (the same request repeated --reps times, median of 5 passes) through each layer:
the native graph walk alone, `Engine.query`, every step of `FastQuery.answer` (server/fastpath.py)
on a message parsed by aiohttp's own parser, inside a started app, and `FastQuery.answer_read` on the
request's bytes (the native reader, vibrato/_native/httpq.pyx). What the steps cost beyond the
native call is the Python layer's share of a query (perf/README.md, "where a query's CPU goes"); under
wrk every figure is larger (cold caches), but the split is the same.
"""
import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import bench_http as H  # noqa: E402
from server_util import embedded_engine  # noqa: E402


class _Protocol:  # what aiohttp's parser calls back on
    _reading_paused = False

    def pause_reading(self, **_):
        pass

    def resume_reading(self, **_):
        pass


class _Conn:  # the connection's per-key auth memo (server/protocol.py)
    auth_memo = None


def timed(fn, reps: int) -> float:
    """Median µs per call over 5 passes of `reps` calls."""
    out = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(out)


async def steps(config, engine, token, q, reps):
    from aiohttp.helpers import rfc822_formatted_time
    from aiohttp.http_parser import HttpRequestParser
    from aiohttp.test_utils import TestClient, TestServer

    from vibrato.engine import planner
    from vibrato.engine.validation import check_vector
    from vibrato.server import create_app, fastpath, handlers
    from vibrato.server.logs import REQUEST_ID
    from vibrato.server.middlewares import new_request_id, record_request

    app = create_app(config, engine=engine)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        body = orjson.dumps({"vector": q, "k": 10, "ef": 64, "include_metadata": False, "search_tier": "all"},
                            option=orjson.OPT_SERIALIZE_NUMPY)
        head = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        async with client.post("/v2/query", data=body, headers=head) as r:  # loads the key into the cache
            assert r.status == 200, await r.text()
        raw = (b"POST /v2/query HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json"
               b"\r\nContent-Length: %d\r\n\r\n" % (token.encode(), len(body))) + body
        parser = HttpRequestParser(_Protocol(), asyncio.get_running_loop(), 2 ** 16, max_line_size=8190,
                                   max_field_size=8190)
        message = parser.feed_data(raw)[0][0][0]
        fq, conn = fastpath.FastQuery(app), _Conn()
        assert fq.answer(message, body, "127.0.0.1", conn) is not None, "the fast path declined the request"
        rawbuf, scratch = bytearray(raw), np.empty(q.shape[0], np.float32)
        assert fq.reader.head(rawbuf, len(rawbuf)) == len(rawbuf) and fq.reader.candidate
        assert fq.answer_read(fq.reader, rawbuf, "127.0.0.1", conn) is not None, "the bytes reader declined it"
        req = handlers.parse_and_validate(body, fq.validate)
        results, secs = handlers.search(engine, req)
        payload = orjson.dumps(handlers.query_payload(results, secs))
        started = (time.time(), time.perf_counter())
        view = engine.view()
        seg = view.segments[0]
        vec = check_vector(q, q.shape[0])
        Q1 = np.ascontiguousarray(q.reshape(1, -1))
        rows = {
            "native walk (Graph.search)": lambda: seg.index._g.search(Q1, 10, 64, None, 0, 0, 1, seg.id_start,
                                                                      None, None, 0),
            "HnswIndex.search": lambda: seg.index.search(vec, 10, 64),
            "native walk, one query (Graph.search_one)": lambda: seg.index._g.search_one(vec, 10, 64, seg.id_start),
            "HnswIndex.search_one": lambda: seg.index.search_one(vec, 10, 64),
            "engine.view()": engine.view,
            "planner.search (the walk alone)": lambda: planner.search(view, vec, 10, 64, None, "all"),
            "Engine.query": lambda: engine.query(vec, k=10, ef=64, filter=None, search_tier="all",
                                                 include_metadata=False),
            "aiohttp: parse the head": lambda: parser.feed_data(raw),
            "fast path: headers and wants()": lambda: (fq.wants(message), message.headers.get("Content-Type"),
                                                       message.headers.getall("Authorization", ())),
            "fast path: auth (memo)": lambda: fq._authorize(message.headers["Authorization"], conn),
            "fast path: parse + validate the body": lambda: handlers.parse_and_validate(body, fq.validate),
            "fast path: request id": lambda: REQUEST_ID.reset(REQUEST_ID.set(new_request_id())),
            "fast path: engine call (handlers.search)": lambda: handlers.search(engine, req),
            "fast path: response JSON": lambda: orjson.dumps(handlers.query_payload(results, secs)),
            "fast path: engine call, plain (Engine.query_top)": lambda: engine.query_top(vec, 10, 64, "all"),
            "fast path: response JSON, plain (httpq.query_answer)": lambda: fq._search_top(vec, 10, 64, "all", None),
            "fast path: metrics + access line + audit row": lambda: (
                fq.metrics.observe_search("query", secs),
                record_request(app, "POST", fastpath.PATH, fq.policy, 200, started, "req_1", "k", "127.0.0.1",
                               handlers.query_audit_details(10, 64))),
            "fast path: response bytes": lambda: b"".join(
                (fastpath._HEAD, str(len(payload)).encode(), b"\r\nDate: ", rfc822_formatted_time().encode(),
                 fastpath._SERVER, b"req_1\r\n\r\n", payload)),
            "FastQuery.answer, whole": lambda: fq.answer(message, body, "127.0.0.1", conn),
            "native reader: frame the head": lambda: fq.reader.head(rawbuf, len(rawbuf)),
            "native reader: frame, read the body": lambda: (fq.reader.head(rawbuf, len(rawbuf)),
                                                            fq.reader.query_body(rawbuf, scratch)),
            "FastQuery.answer_read, whole (framed first)": lambda: (
                fq.reader.head(rawbuf, len(rawbuf)), fq.answer_read(fq.reader, rawbuf, "127.0.0.1", conn)),
        }
        for name, fn in rows.items():
            print(f"| {name} | {timed(fn, reps):.2f} µs |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--reps", type=int, default=2000)
    args = ap.parse_args()
    x, queries = H.load_vectors(args.n)
    x = np.ascontiguousarray(x, dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="profile_query_") as tmp:
        # a key cache entry lives 1 s by default, and only the regular route reloads it: keep it here
        with embedded_engine(Path(tmp) / "d", x.shape[1], (("admin", "admin"),), key_cache_ttl_secs=3600.0) as (
                config, engine, tokens):
            for lo in range(0, args.n, 5000):
                engine.ingest_batch([{"vector": v} for v in x[lo:lo + 5000]])
            engine.checkpoint()
            while engine.compact()["state"] != "idle":
                pass
            print(f"one warm query, {args.n} rows in one raw segment, k=10, ef=64 (median of 5 x {args.reps})\n")
            print("| step | µs |\n|---|---:|")
            asyncio.run(steps(config, engine, tokens["admin"], np.ascontiguousarray(queries[0], dtype=np.float32),
                              args.reps))


if __name__ == "__main__":
    main()
