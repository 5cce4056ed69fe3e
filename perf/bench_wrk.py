"""Serving-path benchmark: Vibrato `serve-v2` vs the Chroma server under wrk, same machine, same run.

    .venv/bin/python perf/bench_wrk.py [--n 100000] [--runs 3] [--duration 10] [--chroma /path/to/chroma]

Per system and run, on a fresh data dir: ingest --n vectors (shared/data/text tiled with noise, as in
bench_http.py) over HTTP, make them searchable (Vibrato: checkpoint until idle, then compact until idle,
so the rows sit in compacted segments; Chroma: wait for `count`), then with pre-built bodies of 200
distinct queries (k=10, ef=64, include_metadata=false, search_tier=all; Chroma: n_results=10,
ef_search=64, include=["distances"]):
  * `wrk -t2 -c16 -d<duration>s` -> req/s, and server CPU per request from /proc (utime+stime of the
    server's whole process tree, before and after, divided by the requests wrk completed);
  * `wrk -t1 -c1` -> single-connection latency p50/p99 (wrk --latency);
  * Vibrato only: the same wrk -t2 -c16 run for a filtered query (a tag on 10% of the rows) and for
    include_metadata=true, as ratios to the plain query's CPU per request;
  * recall@10 of the plain query against exact inner-product top-10 (a 200-query sample).
Vibrato runs with its default logging (one JSON access-log line per request, to a file) and
`--audio-colocated false`; extra serve-v2 flags come from VIBRATO_BENCH_SERVER_ARGS.
wrk is a Debian package: the script installs it with apt-get when missing (as root).
Figures are medians over --runs, printed as a markdown table with the Vibrato / Chroma ratios, and
written to perf/results/bench_wrk.json. A benchmark: it asserts nothing about speed.
"""
import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_http as H  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
OUT = Path(__file__).resolve().parent / "results"
TAG_SHARE = 10  # every 10th row carries the tag "p10": a 10%-selective filter


# ---------------------------------------------------------------------------- /proc
def child_pids(pid: int) -> list[int]:
    """Children of every thread of pid (a child is listed under the thread that started it)."""
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def tree_cpu_secs(pid: int) -> float:
    """utime + stime of pid and all its descendants, in seconds."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        todo.extend(child_pids(p))
    return total / CLK_TCK


# ---------------------------------------------------------------------------- wrk
def ensure_wrk() -> str:
    exe = shutil.which("wrk")
    if exe:
        return exe
    if os.geteuid() != 0:
        sys.exit("wrk not found: apt-get install wrk")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True,
                   env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    return shutil.which("wrk")


def lua_script(path: str, headers: dict, bodies: list[bytes]) -> str:
    def lua_str(b: bytes) -> str:
        return '"' + b.decode().replace("\\", "\\\\").replace('"', '\\"') + '"'
    hdrs = "\n".join(f'wrk.headers[{lua_str(k.encode())}] = {lua_str(v.encode())}' for k, v in headers.items())
    return (f'wrk.method = "POST"\n{hdrs}\nlocal path = {lua_str(path.encode())}\n'
            f"local bodies = {{{','.join(lua_str(b) for b in bodies)}}}\n"
            "local i = 0\n"
            "function setup(thread) thread:set('i0', math.random(#bodies)) end\n"
            "function init(args) i = i0 or 0 end\n"
            "function request() i = i % #bodies + 1; return wrk.format(nil, path, nil, bodies[i]) end\n")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(wrk: str, url: str, script: str, threads: int, conns: int, secs: float, pid: int, workdir: Path):
    lua = workdir / "bench.lua"
    lua.write_text(script)
    cpu0 = tree_cpu_secs(pid)
    out = subprocess.run([wrk, f"-t{threads}", f"-c{conns}", f"-d{max(1, round(secs))}s", "--latency", "-s", str(lua), url],
                         capture_output=True, text=True).stdout
    cpu = tree_cpu_secs(pid) - cpu0
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if non2xx or errors:
        raise RuntimeError(f"wrk saw failures:\n{out}")
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    return {"req_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "cpu_us_per_req": cpu / max(1, reqs) * 1e6, "p50_ms": _ms(lat["50"]), "p99_ms": _ms(lat["99"])}


# ---------------------------------------------------------------------------- servers
class Vibrato(H.Vibrato):
    def __init__(self, workdir, workers: int | None = None, checkout=None):
        super().__init__(workdir)
        self.workers = workers
        # the checkout the server runs: `python -m` puts its working directory first on sys.path
        # (before PYTHONPATH), so it runs from there
        self.checkout = checkout

    def start(self, headers=None):
        """Start the server; `headers`: those of a data dir that already has its key (a copy of a
        loaded one): no bootstrap key is printed then, so wait for readiness instead."""
        cmd = [sys.executable, "-m", "vibrato.cli", "serve-v2", "--data-dir", str(self.workdir / "vibrato"),
               "--dim", "128", "--host", "127.0.0.1", "--port", str(self.port), "--bootstrap-admin-key", "true",
               "--checkpoint-interval-secs", "3600", "--compaction-interval-secs", "3600",
               "--audio-colocated", "false", "--max-body-bytes", str(64 << 20),
               *(["--query-workers", str(self.workers)] if self.workers else []),  # None: the server's default
               *os.environ.get("VIBRATO_BENCH_SERVER_ARGS", "").split()]
        self.log = open(self.workdir / "vibrato.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=self.checkout)
        if headers is not None:
            self.headers = dict(headers)
            asyncio.run(_ready(self))
            return
        line = self.proc.stdout.readline()
        assert line.startswith("BOOTSTRAP_ADMIN_KEY="), line
        self.headers = {"Authorization": f"Bearer {line.strip().split('=', 1)[1]}",
                        "Content-Type": "application/json"}

    def batch_request(self, x, ids):
        items = [{"vector": v, "metadata": {"tags": ["p10"] if i % TAG_SHARE == 0 else []}} for v, i in zip(x, ids)]
        return ("POST", "/v2/vectors/batch", orjson.dumps({"vectors": items}, option=orjson.OPT_SERIALIZE_NUMPY))

    def query_body(self, q, **extra):
        return orjson.dumps({"vector": q, "k": 10, "ef": 64, "include_metadata": False, "search_tier": "all",
                             **extra}, option=orjson.OPT_SERIALIZE_NUMPY)

    def query_request(self, q):
        return ("POST", "/v2/query", self.query_body(q))

    query_path = "/v2/query"

    async def after_ingest(self, session, n):
        t0 = time.perf_counter()
        for route in ("checkpoint", "compact"):
            while True:
                async with session.post(f"{self.url}/v2/admin/{route}", headers=self.headers) as r:
                    if (await r.json())["data"]["state"] == "idle":
                        break
        return time.perf_counter() - t0


async def _ready(server):
    import aiohttp
    async with aiohttp.ClientSession() as session:
        await server.wait_ready(session)


class Chroma(H.Chroma):
    async def wait_ready(self, session):
        await H._wait(session, self.url + "/api/v2/heartbeat")
        body = {"name": "bench", "configuration": {"hnsw": {"space": "ip", "ef_search": 64,
                                                            "ef_construction": 100, "max_neighbors": 16}}}
        async with session.post(self.url + H.CHROMA_API + "/collections", json=body) as r:
            self.cid = (await r.json())["id"]
        self.base = f"{H.CHROMA_API}/collections/{self.cid}"

    def query_body(self, q):
        return orjson.dumps({"query_embeddings": [q], "n_results": 10, "include": ["distances"]},
                            option=orjson.OPT_SERIALIZE_NUMPY)

    @property
    def query_path(self):
        return self.base + "/query"


async def load(server, x, queries, truth, args):
    """Start, ingest, settle, and measure recall; the server stays up for wrk."""
    import aiohttp
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        await server.wait_ready(session)
        n = len(x)
        batches = [server.batch_request(x[i:i + args.batch], range(i, min(n, i + args.batch)))
                   for i in range(0, n, args.batch)]
        _, _, acks = await H.run_requests(session, server, batches, 4)
        row_of = server.row_map(acks, n, args.batch)
        settle = await server.after_ingest(session, n)
        reqs = [server.query_request(q) for q in queries]
        _, _, bodies = await H.run_requests(session, server, reqs, 4)
        hits = [len({row_of(j) for j in server.result_ids(b)} & set(t.tolist())) for b, t in zip(bodies, truth)]
        return {"settle_s": settle, "recall_at_10": sum(hits) / (10 * len(truth))}


def bench_one(name, x, queries, truth, args, wrk):
    with tempfile.TemporaryDirectory(prefix=f"bench_wrk_{name}_") as tmp:
        tmp = Path(tmp)
        if name.startswith("vibrato"):
            server = Vibrato(tmp, int(name.partition("-w")[2] or 1))
        else:
            server = Chroma(tmp, args.chroma)
        server.start()
        try:
            res = asyncio.run(load(server, x, queries, truth, args))
            url = server.url
            hdrs = {k: v for k, v in server.headers.items()}
            plain = lua_script(server.query_path, hdrs, [server.query_body(q) for q in queries])
            run_wrk(wrk, url, plain, 2, 16, min(2.0, args.duration), server.proc.pid, tmp)  # warm-up
            spy = None
            if args.py_spy and name.startswith("vibrato"):
                spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(server.proc.pid), "--duration",
                                        str(max(1, round(args.duration))), "--rate", "250", *(["--nonblocking"] if args.py_spy_nonblocking else []),
                                        "--threads", "--format", "raw", "--output", str(args.py_spy)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            res.update({f"c16_{k}": v for k, v in
                        run_wrk(wrk, url, plain, 2, 16, args.duration, server.proc.pid, tmp).items()})
            if spy is not None:
                spy.wait()
            res.update({f"c1_{k}": v for k, v in
                        run_wrk(wrk, url, plain, 1, 1, args.duration, server.proc.pid, tmp).items()})
            if name.startswith("vibrato"):
                for label, extra in (("filtered10", {"filter": {"tags_any": ["p10"]}}),
                                     ("metadata", {"include_metadata": True})):
                    script = lua_script(server.query_path, hdrs, [server.query_body(q, **extra) for q in queries])
                    r = run_wrk(wrk, url, script, 2, 16, args.duration, server.proc.pid, tmp)
                    res[f"{label}_req_per_s"] = r["req_per_s"]
                    res[f"{label}_cpu_us_per_req"] = r["cpu_us_per_req"]
            return res
        finally:
            server.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--chroma", default=os.environ.get("CHROMA_BIN") or shutil.which("chroma"))
    p.add_argument("--only", choices=["vibrato", "chroma"])
    p.add_argument("--query-workers", type=int, default=os.cpu_count() or 1,
                   help="also run Vibrato with this many serving processes (shown as vibrato-wN; 1: skip)")
    p.add_argument("--py-spy", type=Path, help="profile Vibrato during the wrk -c16 run: py-spy raw (collapsed) "
                                               "stacks to this file (summarise with perf/spy_top.py)")
    p.add_argument("--py-spy-nonblocking", action="store_true",
                   help="sample without pausing the server (less overhead, idle time not told apart)")
    args = p.parse_args()
    wrk = ensure_wrk()
    x, queries = H.load_vectors(args.n)
    queries = queries[:200]
    truth = H.exact_top10(x, queries)
    systems = ["vibrato", "chroma"] if args.only is None else [args.only]
    if args.query_workers > 1 and args.only != "chroma":
        systems.insert(1, f"vibrato-w{args.query_workers}")
    if "chroma" in systems and not args.chroma:
        sys.exit("chroma not found: pip install chromadb==1.5.9 (a separate venv is fine) and pass --chroma")
    results = {s: [] for s in systems}
    for run in range(args.runs):
        for s in systems:  # interleaved, so drift on the machine hits both alike
            r = bench_one(s, x, queries, truth, args, wrk)
            results[s].append(r)
            print(f"run {run + 1} {s:8s} " + " ".join(f"{k}={v:.3f}" for k, v in r.items()), flush=True)
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in results.items()}
    print(f"\nmedians over {args.runs} runs (n={args.n}, dim=128, k=10, ef=64, {args.duration:g} s per wrk run, "
          f"cpus={os.cpu_count()})\n")
    ours = [s for s in systems if s.startswith("vibrato")]
    peer = "chroma" if "chroma" in systems else None
    ratio_cols = [f"{s} / chroma" for s in ours] if peer else []
    print("| figure | " + " | ".join(systems + ratio_cols) + " |")
    print("|---|" + "---:|" * (len(systems) + len(ratio_cols)))
    keys = list(dict.fromkeys(k for s in systems for k in med[s]))
    for k in keys:
        vals = [med[s].get(k) for s in systems]
        row = f"| {k} | " + " | ".join("" if v is None else f"{v:,.3f}" for v in vals) + " |"
        for s in (ours if peer else ()):
            a, b = med[s].get(k), med[peer].get(k)
            row += f" {a / b:.2f}x |" if a is not None and b else " |"
        print(row)
    for s in ours:
        v = med[s]
        print(f"\n{s}: filtered(10%) / plain CPU per request {v['filtered10_cpu_us_per_req'] / v['c16_cpu_us_per_req']:.2f}x, "
              f"include_metadata / plain {v['metadata_cpu_us_per_req'] / v['c16_cpu_us_per_req']:.2f}x")
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_wrk.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                  "runs": results, "medians": med}, indent=2))


if __name__ == "__main__":
    main()
