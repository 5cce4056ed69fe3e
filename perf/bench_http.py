"""HTTP benchmark: Vibrato `serve-v2` vs the Chroma server, same machine, same vectors, same client.

    .venv/bin/python perf/bench_http.py [--n 100000] [--runs 3] [--concurrency 8] [--chroma /path/to/chroma]

What it measures (per system, per run, on a fresh data dir):
  * batch ingest: N vectors (128-d, unit length) in batches of --batch over --ingest-concurrency
    connections, timed until every batch is acknowledged (durable) -> ingest_vectors_per_s; plus
    `settle_secs` until everything is indexed (Vibrato: checkpoints until idle, which builds the
    segment HNSW graphs; Chroma indexes inside `add`) -> indexed_vectors_per_s = N / (ingest + settle);
  * query: --queries k=10 queries (ef=100 on both; Chroma's ef_search is set to 100) over
    --concurrency connections after a warm-up -> queries/s and latency p50/p95/p99; recall@10 of the
    returned ids against exact inner-product top-10 on a sample.
Before the query phase Vibrato's WAL tail is checkpointed into segments (POST /v2/admin/checkpoint,
timed and reported separately) and Chroma is waited on until `count` reports N.

Data: /work/shared/data/text/base_128.npy (20k unit vectors) tiled to N with a small Gaussian
perturbation and renormalised; queries from queries_128.npy. Both servers get identical bytes.
Both servers run with their default persistence; Vibrato runs with --log-level warning (no access
log line per request) and --audio-colocated false (no background I/O throttle).

Isolation: when run as root with `unshare` available the script re-executes itself in a private
network namespace that only has loopback, so neither server can reach any other address.

Reported figures are medians over --runs; ratios are Vibrato / Chroma (higher is better for
throughput, lower for latency). This is a benchmark, not a test: it asserts nothing about speed.
"""
import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("VIBRATO_SHARED_DATA", REPO.parent / "shared" / "data")) / "text"
CHROMA_API = "/api/v2/tenants/default_tenant/databases/default_database"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_vectors(n: int, seed: int = 0):
    base = np.load(DATA / "base_128.npy").astype(np.float32)
    queries = np.load(DATA / "queries_128.npy").astype(np.float32)
    rng = np.random.default_rng(seed)
    reps = -(-n // len(base))
    x = np.concatenate([base + (0 if r == 0 else rng.normal(0, 0.02, base.shape).astype(np.float32))
                        for r in range(reps)])[:n]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32), queries


def exact_top10(x, q):
    scores = q @ x.T
    return np.argsort(-scores, axis=1)[:, :10]


def percentiles(lat):
    a = np.asarray(lat) * 1000.0
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99))}


# ---------------------------------------------------------------------------- servers
class Server:
    name = "?"

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Vibrato(Server):
    name = "vibrato"

    def start(self):
        cmd = [sys.executable, "-m", "vibrato.cli", "serve-v2", "--data-dir", str(self.workdir / "vibrato"),
               "--dim", "128", "--host", "127.0.0.1", "--port", str(self.port), "--bootstrap-admin-key", "true",
               "--checkpoint-interval-secs", "3600", "--compaction-interval-secs", "3600",
               "--audio-colocated", "false", "--log-level", "warning", "--max-body-bytes", str(64 << 20),
               *os.environ.get("VIBRATO_BENCH_SERVER_ARGS", "").split()]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("BOOTSTRAP_ADMIN_KEY="), line
        self.headers = {"Authorization": f"Bearer {line.strip().split('=', 1)[1]}",
                        "Content-Type": "application/json"}

    async def wait_ready(self, session):
        await _wait(session, self.url + "/v2/health/ready")

    def batch_request(self, x, ids):
        return ("POST", "/v2/vectors/batch", orjson.dumps({"vectors": [{"vector": v} for v in x]},
                                                          option=orjson.OPT_SERIALIZE_NUMPY))

    def query_request(self, q):
        return ("POST", "/v2/query", orjson.dumps({"vector": q, "k": 10, "ef": 100, "include_metadata": False},
                                                  option=orjson.OPT_SERIALIZE_NUMPY))

    @staticmethod
    def result_ids(body):
        return [r["id"] for r in orjson.loads(body)["data"]["results"]]

    @staticmethod
    def row_map(acks, n, batch):
        """Vibrato assigns ids in commit order; concurrent batches commit in any order."""
        rows = {}
        for b, body in enumerate(acks):
            for j, r in enumerate(orjson.loads(body)["data"]["results"]):
                rows[r["id"]] = b * batch + j
        return rows.__getitem__

    async def after_ingest(self, session, n):
        t0 = time.perf_counter()
        while True:
            async with session.post(self.url + "/v2/admin/checkpoint", headers=self.headers) as r:
                job = (await r.json())["data"]
            if job["state"] == "idle":
                break
        return time.perf_counter() - t0


class Chroma(Server):
    name = "chroma"

    def __init__(self, workdir, exe):
        super().__init__(workdir)
        self.exe = exe
        self.headers = {"Content-Type": "application/json"}

    def start(self):
        env = dict(os.environ, ANONYMIZED_TELEMETRY="False")
        self.proc = subprocess.Popen([self.exe, "run", "--path", str(self.workdir / "chroma"), "--port",
                                      str(self.port), "--host", "127.0.0.1"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def wait_ready(self, session):
        await _wait(session, self.url + "/api/v2/heartbeat")
        body = {"name": "bench", "configuration": {"hnsw": {"space": "ip", "ef_search": 100,
                                                            "ef_construction": 100, "max_neighbors": 16}}}
        async with session.post(self.url + CHROMA_API + "/collections", json=body) as r:
            self.cid = (await r.json())["id"]
        self.base = f"{CHROMA_API}/collections/{self.cid}"

    def batch_request(self, x, ids):
        return ("POST", self.base + "/add", orjson.dumps({"ids": [str(i) for i in ids], "embeddings": x},
                                                         option=orjson.OPT_SERIALIZE_NUMPY))

    def query_request(self, q):
        return ("POST", self.base + "/query", orjson.dumps(
            {"query_embeddings": [q], "n_results": 10, "include": ["distances"]}, option=orjson.OPT_SERIALIZE_NUMPY))

    @staticmethod
    def result_ids(body):
        return [int(i) for i in orjson.loads(body)["ids"][0]]

    @staticmethod
    def row_map(acks, n, batch):
        return int  # ids were given by the client: id == row

    async def after_ingest(self, session, n):
        t0 = time.perf_counter()
        while True:
            async with session.get(self.url + self.base + "/count") as r:
                if int(await r.text()) >= n:
                    break
            await asyncio.sleep(0.1)
        return time.perf_counter() - t0


async def _wait(session, url, timeout=120):
    import aiohttp
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with session.get(url) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(url)


# ---------------------------------------------------------------------------- workload
async def run_requests(session, server, requests, concurrency):
    """Send pre-built requests over `concurrency` workers; returns (wall secs, latencies, bodies)."""
    latencies = [0.0] * len(requests)
    bodies = [None] * len(requests)
    it = iter(range(len(requests)))

    async def worker():
        for i in it:
            method, path, body = requests[i]
            t0 = time.perf_counter()
            async with session.request(method, server.url + path, data=body, headers=server.headers) as r:
                payload = await r.read()
                if r.status >= 300:
                    raise RuntimeError(f"{server.name} {path}: {r.status} {payload[:300]!r}")
            latencies[i] = time.perf_counter() - t0
            bodies[i] = payload

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0, latencies, bodies


async def bench_one(server, x, queries, truth, args):
    import aiohttp
    server.start()
    try:
        conn = aiohttp.TCPConnector(limit=max(args.concurrency, args.ingest_concurrency) + 2)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:
            await server.wait_ready(session)
            n = len(x)
            batches = [server.batch_request(x[i:i + args.batch], range(i, min(n, i + args.batch)))
                       for i in range(0, n, args.batch)]
            ingest_secs, _, acks = await run_requests(session, server, batches, args.ingest_concurrency)
            row_of = server.row_map(acks, n, args.batch)
            settle_secs = await server.after_ingest(session, n)
            reqs = [server.query_request(queries[i % len(queries)]) for i in range(args.queries)]
            await run_requests(session, server, reqs[:args.warmup], args.concurrency)
            query_secs, lat, bodies = await run_requests(session, server, reqs, args.concurrency)
            sample = min(len(queries), args.queries)
            hits = [len({row_of(j) for j in server.result_ids(bodies[i])} & set(truth[i].tolist()))
                    for i in range(sample)]
            return {"ingest_vectors_per_s": n / ingest_secs, "ingest_secs": ingest_secs,
                    "settle_secs": settle_secs, "indexed_vectors_per_s": n / (ingest_secs + settle_secs), "queries_per_s": args.queries / query_secs,
                    "recall_at_10": sum(hits) / (10 * sample), **percentiles(lat)}
    finally:
        server.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--ingest-concurrency", type=int, default=4)
    p.add_argument("--queries", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--chroma", default=os.environ.get("CHROMA_BIN") or shutil.which("chroma"))
    p.add_argument("--only", choices=["vibrato", "chroma"])
    p.add_argument("--json", type=Path, help="write the raw results here")
    p.add_argument("--no-isolate", action="store_true", help="do not re-exec in a loopback-only netns")
    args = p.parse_args()

    if not args.no_isolate and os.environ.get("VIBRATO_BENCH_NETNS") != "1" and os.geteuid() == 0 \
            and shutil.which("unshare") and shutil.which("ip"):
        cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, *sys.argv]
        os.execvpe("unshare", cmd, dict(os.environ, VIBRATO_BENCH_NETNS="1"))

    x, queries = load_vectors(args.n)
    truth = exact_top10(x, queries[:min(len(queries), args.queries)])
    systems = []
    if args.only != "chroma":
        systems.append("vibrato")
    if args.only != "vibrato":
        if not args.chroma:
            sys.exit("chroma not found: pip install chromadb==1.5.9 (a separate venv is fine) and pass --chroma")
        systems.append("chroma")
    results = {s: [] for s in systems}
    for run in range(args.runs):
        for s in systems:  # interleaved, so drift on the machine hits both alike
            with tempfile.TemporaryDirectory(prefix=f"bench_{s}_") as tmp:
                server = Vibrato(Path(tmp)) if s == "vibrato" else Chroma(Path(tmp), args.chroma)
                r = asyncio.run(bench_one(server, x, queries, truth, args))
            results[s].append(r)
            print(f"run {run + 1} {s:8s} " + " ".join(f"{k}={v:.3f}" for k, v in r.items()), flush=True)
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in results.items()}
    print(f"\nmedians over {args.runs} runs (n={args.n}, dim=128, k=10, batch={args.batch}, "
          f"ingest concurrency={args.ingest_concurrency}, query concurrency={args.concurrency}, cpus={os.cpu_count()})")
    keys = list(next(iter(med.values())))
    print(f"{'metric':24s}" + "".join(f"{s:>14s}" for s in med) + ("        ratio" if len(med) == 2 else ""))
    for k in keys:
        row = f"{k:24s}" + "".join(f"{med[s][k]:14.3f}" for s in med)
        if len(med) == 2:
            row += f"{med['vibrato'][k] / med['chroma'][k]:13.2f}x" if med["chroma"][k] else ""
        print(row)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results,
                                         "medians": med}, indent=2))


if __name__ == "__main__":
    main()
