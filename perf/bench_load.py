"""Loading a catalog over HTTP (issue 18). Report, don't assert.

    .venv/bin/python perf/bench_load.py [--n 1000000] [--batch 2000] [--settle 60] [--server-args "..."]

`vibrato serve-v2` with the runbook's defaults (checkpoint every 30 s, compaction every 180 s,
--audio-colocated true) and one `vibrato.client.Client` posting batches of --batch x 128 vectors
(shared/data/text tiled with noise, compact base64 encoding, retrying 429s after Retry-After) as fast as
it can until --n are acknowledged. Sampled every 0.5 s from /v2/admin/stats: the hot tier
(`hot_vectors`) and the segment count. Reported: acknowledged vectors/s, the hot tier's peak, the
server's peak RSS (VmHWM of the serve-v2 process; each query worker's too, and the sampled peaks of
a worker's and of all processes' anonymous memory, the part not shared) at the end of the load and
after the queries and --settle
(sampled RssAnon / RssFile say how much of it is mapped segment pages the queries touched), query p50 / recall@10 (200 queries, k=10, ef=64, exact
ground truth) right after the last batch and --settle s later, and the same once everything is
checkpointed and compacted (the "fully compacted" reference). Results: perf/results/bench_load.json.
"""
import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import exact_top10, text_vectors  # noqa: E402
from bench_http import free_port  # noqa: E402
from bench_wrk import child_pids  # noqa: E402  (the query workers: the server's children)
from vibrato.client import Client  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_parts_mib(pid: int) -> dict:
    """The server's resident memory now, split as /proc reports it: anonymous (heap, numpy arrays,
    graphs being built), file pages it has mapped (segments, the catalog) and shared memory."""
    out = {}
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:  # a worker that exited
        return out
    for line in lines:
        key = line.split(":", 1)[0]
        if key in ("RssAnon", "RssFile", "RssShmem"):
            out[key] = int(line.split()[1]) / 1024
    return out


def rss_by_mapping_mib(pid: int, top: int = 8) -> list:
    """The mappings holding the most resident memory (smaps), grouped by file name (anonymous ones as
    [anon]), largest first: what the file-backed part of the peak is made of."""
    import collections
    import re

    out, cur = collections.Counter(), "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            parts = line.split()
            cur = os.path.basename(parts[5]) if len(parts) > 5 else "[anon]"
            cur = re.sub(r"seg_\w+\.vdb", "seg_*.vdb", cur)
        elif line.startswith("Rss:"):
            out[cur] += int(line.split()[1]) / 1024
    return [(name, round(mib, 1)) for name, mib in out.most_common(top)]


def query_figures(c, Q, truth):
    lat, hits = [], 0
    for q, t in zip(Q, truth):
        t0 = time.perf_counter()
        res = c.query(q, k=10, ef=64, search_tier="all", include_metadata=False)["results"]
        lat.append(time.perf_counter() - t0)
        hits += len({r["id"] for r in res} & set(t.tolist()))
    return {"p50_ms": round(statistics.median(lat) * 1e3, 3), "recall@10": round(hits / truth.size, 4)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--settle", type=float, default=60.0)
    ap.add_argument("--server-args", default="")
    ap.add_argument("--py-spy", type=Path, help="record the server with py-spy (raw) while the queries --settle s "
                                                "after the load run (perf/spy_top.py summarises it)")
    args = ap.parse_args()
    X = text_vectors(args.n)
    rng = np.random.default_rng(9)
    Q = X[rng.choice(args.n, 200, replace=False)] + rng.normal(0, 0.05, (200, X.shape[1])).astype(np.float32)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    truth = exact_top10(X, Q)
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="vibrato-bench-load-"))
    cmd = [sys.executable, "-m", "vibrato.cli", "serve-v2", "--data-dir", str(work / "data"), "--dim", "128",
           "--host", "127.0.0.1", "--port", str(port), "--bootstrap-admin-key", "true", "--log-level", "warning",
           *shlex.split(args.server_args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    res = {"n": args.n, "batch": args.batch, "server_args": args.server_args}
    try:
        token = proc.stdout.readline().strip().split("=", 1)[1]
        c = Client(f"http://127.0.0.1:{port}", token, timeout=600)
        for _ in range(600):
            try:
                if c.health_ready()["ready"]:
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.1)
        samples, parts, peak_maps, totals, stop = [], [], [], [], threading.Event()

        def sample():
            mon = Client(f"http://127.0.0.1:{port}", token, timeout=60)
            while not stop.is_set():
                s = mon.stats()
                samples.append((time.monotonic(), s["hot_vectors"], s["active_segments"]))
                parts.append((time.monotonic(), rss_parts_mib(proc.pid)))
                workers = child_pids(proc.pid)
                anon = [rss_parts_mib(p).get("RssAnon", 0.0) for p in workers]
                totals.append((parts[-1][1].get("RssAnon", 0.0) + sum(anon), max(anon, default=0.0)))
                if sum(parts[-1][1].values()) >= max(sum(p[1].values()) for p in parts):
                    peak_maps[:] = rss_by_mapping_mib(proc.pid)
                stop.wait(0.5)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        t0 = time.monotonic()
        for lo in range(0, args.n, args.batch):
            c.ingest_batch(X[lo:lo + args.batch])
        load_s = time.monotonic() - t0
        # the load's own peak, before any query maps segment pages in (VmHWM so far: kernel-tracked)
        res["peak_rss_during_load_mib"] = round(peak_rss_mib(proc.pid), 1)
        res["acked_vectors_per_s"] = round(args.n / load_s, 1)
        res["hot_peak"] = max(h for _, h, _ in samples)
        res["after_load"] = {**query_figures(c, Q, truth), "stats": {k: c.stats()[k] for k in
                                                                     ("hot_vectors", "active_segments")}}
        print(json.dumps(res, indent=1), flush=True)
        time.sleep(max(0.0, args.settle - (time.monotonic() - t0 - load_s)))
        spy = None
        if args.py_spy:
            spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "-r", "200", "-d", "15",
                                    "-f", "raw", "--threads", "-o", str(args.py_spy), "-p", str(proc.pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        res[f"after_{args.settle:g}s"] = {**query_figures(c, Q, truth), "stats": {k: c.stats()[k] for k in
                                                                                  ("hot_vectors", "active_segments",
                                                                                   "segments_by_level")}}
        if spy is not None:
            spy.wait(60)
        stop.set()
        t.join()
        res["peak_rss_mib"] = round(peak_rss_mib(proc.pid), 1)  # load + the queries + --settle s
        # the query workers hold their own copy of the hot tier: their peaks, and the whole server's
        # (anonymous memory: their own; file pages of the segments are the shared page cache)
        res["workers_peak_rss_mib"] = [round(peak_rss_mib(p), 1) for p in child_pids(proc.pid)]
        res["worker_rss_anon_sampled_peak_mib"] = round(max((w for _, w in totals), default=0.0), 1)
        res["server_rss_anon_sampled_peak_mib"] = round(max((t for t, _ in totals), default=0.0), 1)
        top = max(parts, key=lambda p: sum(p[1].values()))
        res["rss_at_sampled_peak_mib"] = {"t": round(top[0] - t0, 1), **{k: round(v, 1) for k, v in top[1].items()}}
        res["rss_anon_peak_mib"] = round(max(p[1].get("RssAnon", 0) for p in parts), 1)
        res["rss_by_mapping_at_peak_mib"] = peak_maps
        res["rss_series"] = [(round(ts - t0, 1), round(p.get("RssAnon", 0)), round(p.get("RssFile", 0)))
                             for ts, p in parts[::4]]
        while c.checkpoint()["state"] != "idle":
            pass
        while c.compact()["state"] != "idle":
            pass
        res["fully_compacted"] = {**query_figures(c, Q, truth),
                                  "stats": {k: c.stats()[k] for k in ("active_segments", "segments_by_level")}}
        res["hot_series"] = [(round(ts - t0, 1), h, n) for ts, h, n in samples[::4]]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_load.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k not in ("hot_series", "rss_series")}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
