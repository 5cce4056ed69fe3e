"""Stress benchmark (CONTRACT.md §6, Stress; v2.1's is R7): mixed operations from concurrent
clients against the real `vibrato serve-v2`; reports ops/s and latencies, and checks the invariants at the end.
A benchmark, not a timed test: it fails only on wrong results (or on VIBRATO_STRESS_MAX_ELAPSED_SECS
when that is set). Run: `bash scripts/perf/run_stress.sh` (smoke) or
`VIBRATO_STRESS_TOTAL_OPS=1000000 bash scripts/perf/run_stress.sh` (the million).

Workload: 128 warm-up single ingests seed a query bank (<= 4096 vectors, random replacement). Then
VIBRATO_STRESS_CONCURRENCY (16) asyncio clients split VIBRATO_STRESS_TOTAL_OPS (20,000 by default; v2.1's
1,000,000 for the long form, CONTRACT.md R7) evenly; each op rolls 0..99 from the seed: < 60 query (bank
vector, k 10, ef 40, no metadata; any non-200 fails the run), otherwise buffer a write (unique key
`stress-{seed}-{worker}-{idx}`); 100 buffered writes are flushed as one POST /v2/vectors/batch (at most
VIBRATO_STRESS_WRITE_FLUSH_PARALLELISM (4) flushes at once, up to VIBRATO_STRESS_WRITE_FLUSH_RETRIES (4)
retries on 408/429/5xx/timeouts with 125 ms x attempt backoff; 201 with one result per row required).
VIBRATO_STRESS_ENABLE_ADMIN_CHAOS=1 turns 1% of the write slots into a compaction (90%) or checkpoint.

End checks: ready is 200; total_vectors == 128 + acknowledged writes; ids are dense (the ids seen are
exactly 0..total-1); 200 sampled written vectors are each found by a self-query (k 20, ef 256).
Results: printed and saved to perf/results/stress_million_ops.json.
"""
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "gates"))
from gatelib import GateServer, create_key, env_int, percentile  # noqa: E402

from vibrato.client import AsyncClient, VibratoHTTPError  # noqa: E402

DIM = 16
TOTAL_OPS = env_int("VIBRATO_STRESS_TOTAL_OPS", 20_000)
CONCURRENCY = env_int("VIBRATO_STRESS_CONCURRENCY", 16)
SEED = env_int("VIBRATO_STRESS_SEED", 42)
HTTP_TIMEOUT = env_int("VIBRATO_STRESS_HTTP_TIMEOUT_SECS", 30)
BATCH_TIMEOUT = env_int("VIBRATO_STRESS_BATCH_TIMEOUT_SECS", 90)
FLUSH_PARALLELISM = env_int("VIBRATO_STRESS_WRITE_FLUSH_PARALLELISM", 4)
FLUSH_RETRIES = env_int("VIBRATO_STRESS_WRITE_FLUSH_RETRIES", 4)
CHAOS = os.environ.get("VIBRATO_STRESS_ENABLE_ADMIN_CHAOS", "0") == "1"
MAX_ELAPSED = env_int("VIBRATO_STRESS_MAX_ELAPSED_SECS", 0)
STARTUP_RETRIES = env_int("VIBRATO_STRESS_STARTUP_RETRIES", 4)
BATCH = 100
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def vec(rng) -> list:
    v = rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


class Stress:
    def __init__(self, url, token):
        self.url, self.token = url, token
        self.bank = []
        self.written = {}        # key -> (id, vector)
        self.ids = set()
        self.query_lat, self.flush_lat = [], []
        self.counts = {"query": 0, "write": 0, "flush": 0, "flush_retry": 0, "admin_ok": 0, "admin_timeout": 0}
        self.flush_sem = None
        self.admin_busy = False

    async def flush(self, client, items, wid):
        body = {"vectors": [{"vector": v, "metadata": {"tags": ["stress", f"worker-{wid}"]}, "idempotency_key": k}
                            for k, v in items]}
        async with self.flush_sem:
            for attempt in range(FLUSH_RETRIES + 1):
                t = time.perf_counter()
                try:
                    status, _, raw = await asyncio.wait_for(client.request("POST", "/v2/vectors/batch", body),
                                                            BATCH_TIMEOUT)
                except (asyncio.TimeoutError, OSError) as exc:
                    status, raw = None, repr(exc).encode()
                if status == 201:
                    self.flush_lat.append(time.perf_counter() - t)
                    break
                if (status is None or status in RETRY_STATUS) and attempt < FLUSH_RETRIES:
                    self.counts["flush_retry"] += 1
                    await asyncio.sleep(0.125 * (attempt + 1))
                    continue
                raise AssertionError(f"batch flush failed with {status}: {raw[:300]!r}")
        results = json.loads(raw)["data"]["results"]
        assert len(results) == len(items), f"batch of {len(items)} answered {len(results)} results"
        for (k, v), r in zip(items, results):
            assert r["created"], f"fresh key {k} answered created=false"
            self.written[k] = (r["id"], v)
            self.ids.add(r["id"])
            if len(self.bank) < 4096:
                self.bank.append(v)
            else:
                self.bank[random.randrange(4096)] = v
        self.counts["flush"] += 1

    async def admin(self, client, rnd):
        if self.admin_busy:
            return
        self.admin_busy = True
        path = "/v2/admin/compact" if rnd.random() < 0.9 else "/v2/admin/checkpoint"
        try:
            status, _, raw = await asyncio.wait_for(client.request("POST", path), max(HTTP_TIMEOUT, 20))
            assert status == 200, f"{path} answered {status}: {raw[:200]!r}"
            self.counts["admin_ok"] += 1
        except asyncio.TimeoutError:
            self.counts["admin_timeout"] += 1
        finally:
            self.admin_busy = False

    async def worker(self, wid, n_ops, start_evt):
        rnd = random.Random(SEED * 1000 + wid)
        rng = np.random.default_rng([SEED, wid])
        pending = []
        async with AsyncClient(self.url, self.token, timeout=HTTP_TIMEOUT, connections=8) as client:
            await start_evt.wait()
            for idx in range(n_ops):
                roll = rnd.randrange(100)
                if roll < 60:
                    q = self.bank[rnd.randrange(len(self.bank))]
                    t = time.perf_counter()
                    status, _, raw = await client.request(
                        "POST", "/v2/query", {"vector": q, "k": 10, "ef": 40, "include_metadata": False})
                    self.query_lat.append(time.perf_counter() - t)
                    assert status == 200, f"query answered {status}: {raw[:200]!r}"
                    self.counts["query"] += 1
                elif CHAOS and roll == 99:
                    if pending:
                        await self.flush(client, pending, wid)
                        pending = []
                    await self.admin(client, rnd)
                else:
                    pending.append((f"stress-{SEED}-{wid}-{idx}", vec(rng)))
                    self.counts["write"] += 1
                    if len(pending) >= BATCH:
                        await self.flush(client, pending, wid)
                        pending = []
            if pending:
                await self.flush(client, pending, wid)

    async def run(self):
        self.flush_sem = asyncio.Semaphore(FLUSH_PARALLELISM)
        async with AsyncClient(self.url, self.token, timeout=HTTP_TIMEOUT) as c:
            rng = np.random.default_rng([SEED, 999])
            for i in range(128):
                v = vec(rng)
                vid, created = await c.ingest(v, {"tags": ["stress", "warmup"]}, f"stress-{SEED}-warmup-{i}")
                assert created
                self.written[f"stress-{SEED}-warmup-{i}"] = (vid, v)
                self.ids.add(vid)
                self.bank.append(v)
        start = asyncio.Event()
        per = [TOTAL_OPS // CONCURRENCY + (1 if w < TOTAL_OPS % CONCURRENCY else 0) for w in range(CONCURRENCY)]
        tasks = [asyncio.create_task(self.worker(w, per[w], start)) for w in range(CONCURRENCY)]
        await asyncio.sleep(0.2)
        t0 = time.perf_counter()
        start.set()
        await asyncio.gather(*tasks)
        return time.perf_counter() - t0

    async def verify(self):
        async with AsyncClient(self.url, self.token, timeout=120) as c:
            ready = await c.health_ready()
            assert ready.get("ready", ready.get("status") == "ok"), f"not ready at the end: {ready}"
            for _ in range(10):
                try:
                    st = await c.stats()
                    break
                except (VibratoHTTPError, OSError):
                    await asyncio.sleep(0.5)
            total = st["total_vectors"]
            assert total == len(self.written), f"total_vectors {total} != 128 + acked writes = {len(self.written)}"
            assert max(self.ids) + 1 == total and self.ids == set(range(total)), "ids are not dense 0..total-1"
            tier = "all" if CHAOS else "active"
            keys = random.Random(SEED).sample(sorted(self.written), min(200, len(self.written)))
            for k in keys:
                vid, v = self.written[k]
                res = await c.query(v, k=20, ef=256, search_tier=tier, include_metadata=False)
                assert vid in [r["id"] for r in res["results"]], f"written {k} (id {vid}) not found by self-query"
            return total


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="vibrato-stress-"))
    data = work / "data"
    token = create_key(data, "stress")
    srv = None
    for attempt in range(STARTUP_RETRIES):
        srv = GateServer(data, dim=DIM, log_dir=work, log_level="error")
        try:
            srv.wait_ready(timeout=90)
            break
        except (RuntimeError, TimeoutError) as exc:
            print(f"[stress] start attempt {attempt + 1} failed: {exc}")
            srv.stop()
            srv = None
    if srv is None:
        print("[stress] FAILED: the server did not start")
        return 1
    stress = Stress(srv.url, token)
    print(f"[stress] {TOTAL_OPS} ops, {CONCURRENCY} clients, seed {SEED}, chaos={CHAOS}, server pid {srv.pid}",
          flush=True)
    ok = False
    try:
        elapsed = asyncio.run(stress.run())
        total = asyncio.run(stress.verify())
        ops = stress.counts["query"] + stress.counts["write"]
        summary = {
            "total_ops": TOTAL_OPS, "concurrency": CONCURRENCY, "seed": SEED, "chaos": CHAOS,
            "elapsed_s": round(elapsed, 2), "ops_per_s": round(ops / elapsed, 1),
            "queries": stress.counts["query"], "writes": stress.counts["write"],
            "queries_per_s": round(stress.counts["query"] / elapsed, 1),
            "writes_per_s": round(stress.counts["write"] / elapsed, 1),
            "query_p50_ms": round(percentile(stress.query_lat, 0.5) * 1000, 3),
            "query_p99_ms": round(percentile(stress.query_lat, 0.99) * 1000, 3),
            "batch_p50_ms": round(percentile(stress.flush_lat, 0.5) * 1000, 3),
            "batch_p99_ms": round(percentile(stress.flush_lat, 0.99) * 1000, 3),
            "flushes": stress.counts["flush"], "flush_retries": stress.counts["flush_retry"],
            "admin_ok": stress.counts["admin_ok"], "admin_timeouts": stress.counts["admin_timeout"],
            "total_vectors": total,
        }
        if CHAOS:
            assert stress.counts["admin_ok"] + stress.counts["admin_timeout"] > 0, "chaos on but no admin call ran"
        out = REPO / "perf" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "stress_million_ops.json").write_text(json.dumps(summary, indent=2))
        print("[stress] " + " ".join(f"{k}={v}" for k, v in summary.items()))
        if MAX_ELAPSED and elapsed > MAX_ELAPSED:
            print(f"[stress] FAILED: {elapsed:.1f}s > VIBRATO_STRESS_MAX_ELAPSED_SECS={MAX_ELAPSED}")
            return 1
        assert srv.terminate(timeout=120) == 0, "graceful shutdown failed"
        ok = True
        print("[stress] passed")
        return 0
    except AssertionError as exc:
        print(f"[stress] FAILED: {exc}\n[stress] data kept in {work}\n{srv.tail(20)}")
        return 1
    finally:
        srv.stop()
        if ok and os.environ.get("VIBRATO_GATE_KEEP") != "1":
            import shutil
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
