"""Storage-engine benchmarks (report, don't assert). Run: `.venv/bin/python perf/bench_engine.py`.

Measures, on real files and real SQLite (durable, fsynced commits):
  * batch ingest vectors/s (128-d, batches of 1,000, durable acknowledgement)
  * single-vector ingest/s from 8 threads (group commit)
  * query latency per tier (hot exact, L0/L1 raw HNSW, L2 PQ archive with exact rerank), k=10
  * checkpoint time per 100k vectors and compaction time per 100k vectors
  * open/recovery time of a data dir with N vectors in segments plus a WAL tail (CONTRACT.md §5)
  * snapshot and restore throughput (MB/s)
  * RSS after recovery and after a query workload, per million vectors
Sizes: VIBRATO_BENCH_N (default 1,000,000 rows in segments), VIBRATO_BENCH_TAIL (50,000).
Vectors: /work/shared/data/text base_128.npy tiled with small noise (unit rows).
Results are printed and saved to perf/results/bench_engine.json.
"""
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import text_vectors as vectors  # noqa: E402
from vibrato.engine import Engine, snapshot_create, snapshot_restore  # noqa: E402

N = int(os.environ.get("VIBRATO_BENCH_N", "1000000"))
TAIL = int(os.environ.get("VIBRATO_BENCH_TAIL", "50000"))
OUT = Path(__file__).resolve().parent / "results"


def timed(fn, *a, **kw):
    t = time.perf_counter()
    r = fn(*a, **kw)
    return r, time.perf_counter() - t


def items(X, lo, hi):
    return [{"vector": X[i], "metadata": {"source_file": f"t{i // 1000}.wav", "start_time_ms": (i % 1000) * 40,
                                          "duration_ms": 40, "bpm": float(90 + i % 60), "tags": [f"g{i % 16}"]}}
            for i in range(lo, hi)]


def lat_ms(eng, Q, tier, k=10, ef=64, reps=1):
    out = []
    for _ in range(reps):
        for q in Q:
            t = time.perf_counter()
            eng.query(q, k=k, ef=ef, search_tier=tier, include_metadata=True)
            out.append((time.perf_counter() - t) * 1e3)
    out.sort()
    return {"p50_ms": round(statistics.median(out), 3), "p99_ms": round(out[int(0.99 * (len(out) - 1))], 3)}


def main():
    OUT.mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="vibrato-bench-"))
    res = {"N": N, "tail": TAIL}
    X = vectors(N + TAIL)
    Q = vectors(200, seed=7)
    d = root / "data"
    eng = Engine.open(d, dim=128, background=False, checkpoint_max_rows=50_000)

    # ingest throughput into the hot tier (durable group commits)
    _, t = timed(lambda: [eng.ingest_batch(items(X, i, i + 1000)) for i in range(0, 50_000, 1000)])
    res["batch_ingest_vectors_per_s"] = round(50_000 / t)
    res["hot_query"] = lat_ms(eng, Q, "active")
    _, t = timed(eng.checkpoint)
    res["checkpoint_s_per_100k"] = round(t * 2, 2)
    res["l0_query"] = lat_ms(eng, Q, "active")

    def single(w, n, off):
        for i in range(n):
            eng.ingest(X[off + w * n + i])
    threads = [threading.Thread(target=single, args=(w, 500, 50_000)) for w in range(8)]
    t0 = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    res["single_ingest_8_threads_per_s"] = round(4000 / (time.perf_counter() - t0))
    eng.checkpoint()

    # fill to N rows in segments (checkpoints of 50k), compacting as we go
    i = 54_000
    t_ckpt, n_ckpt, t_cmp, n_cmp = 0.0, 0, 0.0, 0
    while i < N:
        hi = min(N, i + 50_000)
        for j in range(i, hi, 1000):
            eng.ingest_batch(items(X, j, min(hi, j + 1000)))
        r, t = timed(eng.checkpoint)
        t_ckpt += t
        n_ckpt += r["details"].get("rows", 0)
        i = hi
        print(f"  {i} rows", flush=True)
    while True:
        before = {s.id: s.n for s in eng.segment_set.handles}
        r, t = timed(eng.compact)
        if r["state"] == "idle":
            break
        t_cmp += t
        n_cmp += sum(before[s] for s in r["details"]["input_segments"])
        print(f"  compaction -> L{r['details']['output_level']} {'pq' if r['details']['archive_pq'] else 'raw'} "
              f"{t:.1f}s", flush=True)
    res["checkpoint_s_per_100k_total"] = round(t_ckpt / max(1, n_ckpt) * 1e5, 2)
    res["compaction_s_per_100k"] = round(t_cmp / max(1, n_cmp) * 1e5, 2)
    res["segments"] = eng.stats()["segments_by_level"]
    res["all_query"] = lat_ms(eng, Q, "all")
    res["archive_query"] = lat_ms(eng, Q, "archive")
    res["active_query"] = lat_ms(eng, Q, "active")
    # the WAL tail for the recovery benchmark
    for j in range(N, N + TAIL, 1000):
        eng.ingest_batch(items(X, j, min(N + TAIL, j + 1000)))
    eng.close()

    # open/recovery time (separate process so RSS is clean)
    import subprocess
    code = (f"import time,sys; sys.path.insert(0,{str(Path(__file__).resolve().parent.parent)!r}); "
            "from vibrato.engine import Engine; import numpy as np; t=time.perf_counter(); "
            f"e=Engine.open({str(d)!r}, dim=128, background=False); dt=time.perf_counter()-t; "
            "import json; rss=lambda: [int(l.split()[1]) for l in open('/proc/self/status').read().splitlines() "
            "if l.startswith('VmRSS')][0]/1024; r0=rss(); "
            "Q=np.random.default_rng(1).standard_normal((300,128)).astype(np.float32); "
            "[e.query(q, k=10, ef=64, search_tier='all') for q in Q]; "
            "print(json.dumps({'open_s': round(dt,3), 'rss_after_open_mb': round(r0,1), "
            "'rss_after_queries_mb': round(rss(),1), 'ready': e.readiness()[0], "
            "'total': e.stats()['total_vectors']})); e.close()")
    runs = [json.loads(subprocess.check_output([sys.executable, "-c", code]).decode().strip().splitlines()[-1])
            for _ in range(3)]
    res["recovery_open_s_median"] = statistics.median(r["open_s"] for r in runs)
    res["recovery_runs"] = runs

    rss_q = statistics.median(r["rss_after_queries_mb"] for r in runs)
    res["rss_mb_after_queries"] = rss_q
    res["rss_mb_per_million"] = round(rss_q / ((N + TAIL) / 1e6), 1)

    size = sum(p.stat().st_size for p in (d / "segments").iterdir()) + (d / "catalog.sqlite3").stat().st_size
    snap, t = timed(snapshot_create, d, "default")
    res["snapshot_mb_per_s"] = round(size / 1e6 / t, 1)
    _, t = timed(snapshot_restore, root / "restored", snap["snapshot_dir"])
    res["restore_mb_per_s"] = round(size / 1e6 / t, 1)
    res["data_mb"] = round(size / 1e6, 1)
    print(json.dumps(res, indent=2))
    (OUT / "bench_engine.json").write_text(json.dumps(res, indent=2))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
