"""Batch ingest over HTTP, and query latency under a concurrent ingest load (issue 13).

    .venv/bin/python perf/bench_ingest_load.py [--n 100000] [--ingest 100000] [--runs 3] [--duration 8]

Per run, on a fresh data dir (serve-v2 with its defaults: one query worker per core; extra flags from
VIBRATO_BENCH_SERVER_ARGS, e.g. "--query-workers 1" for one process):
load --n vectors and compact them (as perf/bench_wrk.py does), then
  * batch ingest: 4 connections posting batches of 1,000 vectors (JSON float arrays, or with
    --compact base64 float32 vectors as vibrato.client sends them; metadata with a tag) until --ingest vectors are acknowledged (durable: fsynced before the answer) -> vectors/s;
  * queries alone: those rows checkpointed and compacted too, then `wrk -t1 -c4` for --duration s
    (k=10, ef=64) -> p50 / p99;
  * queries under ingest: the same wrk run while 2 connections keep posting 1,000-vector batches
    -> p50 / p99, and the ingest rate meanwhile.
Medians over --runs. A benchmark: it asserts nothing. Results: printed, perf/results/bench_ingest_load.json.
"""
import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_http as H  # noqa: E402
import bench_wrk as W  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


async def post_batches(url, headers, bodies, conns, stop=None):
    """Post bodies over `conns` connections (until all are sent, or `stop` is set): (vectors, secs)."""
    import aiohttp
    done, lock = [0], asyncio.Lock()
    it = iter(bodies)

    async def worker(session):
        while stop is None or not stop.is_set():
            async with lock:
                body = next(it, None)
            if body is None:
                return
            async with session.post(url + "/v2/vectors/batch", data=body[1], headers=headers) as r:
                assert r.status == 201, await r.text()
                await r.read()
            done[0] += body[0]
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(worker(session) for _ in range(conns)))
    return done[0], time.perf_counter() - t0


def batch_bodies(server, x, start_id, count, compact=False):
    """(rows, body) per 1,000-vector batch: JSON float arrays, or compact (base64 float32) vectors."""
    import orjson
    from vibrato.client import pack_f32
    out = []
    for i in range(0, count, 1000):
        rows = x[(start_id + i) % len(x):][:1000]
        if rows.shape[0] < 1000:
            rows = x[:1000]
        if compact:
            body = orjson.dumps({"vectors": [{"vector": pack_f32(v), "metadata": {"tags": ["p10"] if j % 10 == 0 else []}}
                                             for j, v in enumerate(rows)]})
        else:
            body = server.batch_request(rows, range(start_id + i, start_id + i + rows.shape[0]))[2]
        out.append((rows.shape[0], body))
    return out


def one_run(x, queries, truth, args, wrk):
    with tempfile.TemporaryDirectory(prefix="bench_ingest_load_") as tmp:
        tmp = Path(tmp)
        server = W.Vibrato(tmp)
        server.start()
        try:
            class A:
                batch = 1000
            asyncio.run(W.load(server, x, queries, truth, A))
            res = {}
            n, secs = asyncio.run(post_batches(server.url, server.headers,
                                               batch_bodies(server, x, len(x), args.ingest, args.compact), 4))
            res["ingest_vectors_per_s"] = n / secs

            async def settle():  # the unloaded baseline: those rows checkpointed and compacted too
                import aiohttp
                async with aiohttp.ClientSession() as session:
                    await server.after_ingest(session, 0)
            asyncio.run(settle())
            hdrs = dict(server.headers)
            script = W.lua_script(server.query_path, hdrs, [server.query_body(q) for q in queries])
            alone = W.run_wrk(wrk, server.url, script, 1, 4, args.duration, server.proc.pid, tmp)
            res["alone_p50_ms"], res["alone_p99_ms"] = alone["p50_ms"], alone["p99_ms"]
            stop = threading.Event()
            bodies = batch_bodies(server, x, 2 * len(x), 200_000, args.compact)  # more than --duration needs
            counted = {}

            def ingest():
                counted["n"], counted["secs"] = asyncio.run(post_batches(server.url, server.headers, bodies, 2, stop))
            t = threading.Thread(target=ingest)
            t.start()
            time.sleep(1.0)
            loaded = W.run_wrk(wrk, server.url, script, 1, 4, args.duration, server.proc.pid, tmp)
            stop.set()
            t.join()
            res["loaded_p50_ms"], res["loaded_p99_ms"] = loaded["p50_ms"], loaded["p99_ms"]
            res["loaded_ingest_vectors_per_s"] = counted["n"] / counted["secs"]
            res["p99_ratio"] = res["loaded_p99_ms"] / res["alone_p99_ms"]
            return res
        finally:
            server.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--ingest", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--compact", action="store_true", help="ingest bodies with compact (base64 float32) vectors")
    args = p.parse_args()
    wrk = W.ensure_wrk()
    x, queries = H.load_vectors(args.n)
    queries = queries[:200]
    truth = H.exact_top10(x, queries)
    runs = []
    for i in range(args.runs):
        r = one_run(x, queries, truth, args, wrk)
        runs.append(r)
        print(f"run {i + 1} " + " ".join(f"{k}={v:.3f}" for k, v in r.items()), flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print("\nmedians: " + json.dumps(med, indent=1))
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_ingest_load.json").write_text(json.dumps({"args": vars(args), "runs": runs, "medians": med},
                                                           indent=2))


if __name__ == "__main__":
    main()
