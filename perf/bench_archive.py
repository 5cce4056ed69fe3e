"""Archive tier benchmark (issue 14): recall, latency, build time and memory of L2 archive segments.

    .venv/bin/python perf/bench_archive.py [--n 1000000] [--queries 200] [--skip-real] [--skip-scale]
                                           [--skip-peers] [--data-dir DIR]

The 10M long form: VIBRATO_BENCH_N=10000000 ... --skip-real --skip-peers --checkpoint-rows 100000
--data-dir DIR (L0 segments of 100k: three compaction levels instead of four). With
--data-dir the scale data dir is kept there, and a later run given the same DIR (holding --n rows)
skips the build and only re-runs the probe: to re-measure memory or latency after a change.

Part 1, real data (shared/data/text, 20k x 128, its 500 queries and exact ground truth): every row
compacted into L2 archives with the embedded Engine; recall@10 at ef 16/64/256 in the `archive` and
`all` tiers, and filtered recall on the archive at 0.1%-100% selectivity. The same archive searched
the version-1 way (no graph: PQ scan + exact rerank, what 0.3.0 did) is measured in the same run.

Part 1b, identify (shared/data/audio, 41k frames, 100 queries of 75 noisy frames, k=5, ef=100):
every frame archived; top-1 track and start (within one frame) and p50, graph vs version-1 way.

Part 1c, identify at scale (--identify-n frames, default 1M): the audio frames plus noisy copies of
them (N(0, 0.02), renormalised; copy c of track t is its own source file) until --identify-n frames,
all compacted to L2; the same 100 queries; a hit is a top-1 whose frame is the query's track and
start (within one frame) in any copy. --identify-n 0 skips it.

Part 2, scale (--n rows of the text set tiled with noise, benchlib.text_vectors): ingest, checkpoint
and compact until everything is one L2 archive; the L2 compaction time against hnswlib's build of
the same vectors (same M, ef_construction and threads); one-thread archive query p50/p99 at ef=64
and recall@10 against exact search (numpy, float64) on --queries queries, with the ef sweep 16/32/64
(p50 and recall each); next to hnswlib (same sweep) and faiss IndexHNSWPQ and IndexIVFPQ, each with
an exact refine, at the efSearch/nprobe that first reaches recall 0.95; anonymous and file RSS per
vector of a fresh process that opens the data dir and runs the queries (the first open after the
build also runs SQLite's PRAGMA optimize, whose page cache is a fixed ~15 MB, not per vector).
A benchmark: it asserts nothing. Results: printed, and perf/results/bench_archive.json.
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import DATA, exact_top10, text_vectors  # noqa: E402
from vibrato.engine import Engine  # noqa: E402
from vibrato.engine.pipeline import build_threads  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


def compact_all(e) -> float:
    t0 = time.perf_counter()
    while e.compact()["state"] != "idle":
        pass
    return time.perf_counter() - t0


def recall(got: list, truth: np.ndarray) -> float:
    return sum(len(set(g) & set(t.tolist())) for g, t in zip(got, truth)) / truth.size


def ingest(e, X, batch=5000, tags=None, checkpoint_rows=None):
    """Ingest X in batches, checkpointing after every batch (or every checkpoint_rows rows)."""
    every = checkpoint_rows or batch
    for i in range(0, X.shape[0], batch):
        end = min(i + batch, X.shape[0])
        e.ingest_batch([{"vector": X[j], **({"metadata": {"tags": tags[j]}} if tags else {})} for j in range(i, end)])
        if end % every == 0 or end == X.shape[0]:
            e.checkpoint()


# ------------------------------------------------------------------------------------ part 1
SELECTIVITY = {"s0_1": 0.001, "s1": 0.01, "s10": 0.1, "s50": 0.5, "s100": 1.0}


def real_data(tmp: Path, nq: int) -> dict:
    base = np.load(DATA / "text" / "base_128.npy")
    queries = np.load(DATA / "text" / "queries_128.npy")[:nq]
    gt = np.load(DATA / "text" / "gt_128_ids.npy")[:nq, :10]
    u = np.random.default_rng(3).random(base.shape[0])
    tags = [[t for t, p in SELECTIVITY.items() if u[i] < p] for i in range(base.shape[0])]
    out = {}
    with Engine.open(tmp / "real", dim=128, background=False, checkpoint_max_rows=5000,
                     compaction_max_inputs=2) as e:
        ingest(e, base, tags=tags)
        out["compact_s"] = compact_all(e)
        out["segments"] = [(s.level, s.kind, s.n, s.index is not None) for s in e.segment_set.handles]

        def run(ef, tier, flt=None, k=10):
            return [[r["id"] for r in e.query(q, k=k, ef=ef, search_tier=tier, filter=flt, include_metadata=False)]
                    for q in queries]
        for tier in ("archive", "all"):
            for ef in (16, 64, 256):
                out[f"recall_{tier}_ef{ef}"] = recall(run(ef, tier), gt)
        for name, p in SELECTIVITY.items():
            allowed = np.array([i for i in range(base.shape[0]) if name in tags[i]])
            truth = np.stack([allowed[np.argsort(-(base[allowed] @ q), kind="stable")[:10]] for q in queries])
            got = run(64, "archive", {"tags_all": [name]})
            out[f"filtered_recall_{name}"] = recall([g[:10] for g in got], truth)
        out["archive_p50_ms"] = archive_p50_ms(e, queries)
        with version_1_way(e):  # same archive, same run: no graph -> PQ scan + exact rerank
            for ef in (64, 256):
                out[f"v1_recall_archive_ef{ef}"] = recall(run(ef, "archive"), gt)
            out["v1_archive_p50_ms"] = archive_p50_ms(e, queries)
    return out


def archive_p50_ms(e, queries) -> float:
    """p50 of one-thread archive-tier queries, k=10, ef=64."""
    t = []
    for q in queries:
        t0 = time.perf_counter()
        e.query(q, k=10, ef=64, search_tier="archive", include_metadata=False)
        t.append(time.perf_counter() - t0)
    return statistics.median(t) * 1e3


@contextlib.contextmanager
def version_1_way(e):
    """Search the engine's archives as 0.3.0 did (no graph: the planner's PQ path) while inside."""
    saved = [(s, s.index) for s in e.segment_set.handles if s.kind == "archive"]
    for s, _ in saved:
        s.index = None
    try:
        yield
    finally:
        for s, index in saved:
            s.index = index


def audio(tmp: Path) -> dict:
    """identify on shared/data/audio with every frame archived: top-1 track and start, p50."""
    frames = np.load(DATA / "audio" / "frames.npy").astype(np.float32)
    track = np.load(DATA / "audio" / "frame_track.npy")
    queries = np.load(DATA / "audio" / "queries.npy").astype(np.float32)
    truth = np.load(DATA / "audio" / "queries_truth.npy")
    out = {"frames": int(frames.shape[0])}
    with Engine.open(tmp / "audio", dim=frames.shape[1], background=False, checkpoint_max_rows=10_000,
                     compaction_max_inputs=2) as e:
        for i in range(0, frames.shape[0], 10_000):
            e.ingest_batch([{"vector": frames[j], "metadata": {"source_file": f"track{int(track[j])}.wav",
                                                                "start_time_ms": int(j) * 40, "duration_ms": 40}}
                            for j in range(i, min(i + 10_000, frames.shape[0]))])
            e.checkpoint()
        compact_all(e)
        out["segments"] = [(s.level, s.kind, s.n, s.index is not None) for s in e.segment_set.handles]

        def run(label):
            hits, t = 0, []
            for q, (tr, start) in zip(queries, truth):
                t0 = time.perf_counter()
                res = e.identify(q, k=5, ef=100, search_tier="archive", include_metadata=False)
                t.append(time.perf_counter() - t0)
                if res and track[res[0]["id"]] == tr and abs(int(res[0]["id"]) - int(start)) <= 1:
                    hits += 1
            out[f"{label}top1"] = hits / len(queries)
            out[f"{label}p50_ms"] = statistics.median(t) * 1e3
        run("")
        with version_1_way(e):
            run("v1_")
    return out


def identify_scale(tmp: Path, n: int) -> dict:
    """identify (75 frames, k=5, ef=100, archive tier) over n archived frames: the audio set and
    noisy copies of it. A hit is a top-1 on the query's track and start (+-1 frame) in any copy."""
    frames = np.load(DATA / "audio" / "frames.npy").astype(np.float32)
    track = np.load(DATA / "audio" / "frame_track.npy")
    queries = np.load(DATA / "audio" / "queries.npy").astype(np.float32)
    truth = np.load(DATA / "audio" / "queries_truth.npy")
    f = frames.shape[0]
    rng = np.random.default_rng(5)
    out = {"frames": n}
    t0 = time.perf_counter()
    with Engine.open(tmp / "identify", dim=frames.shape[1], background=False, checkpoint_max_rows=100_000) as e:
        for lo in range(0, n, 10_000):
            j = np.arange(lo, min(lo + 10_000, n))
            x = frames[j % f]
            if lo >= f:  # copies beyond the first carry noise (the first copy is the data set itself)
                x = x + rng.normal(0, 0.02, x.shape).astype(np.float32)
                x /= np.linalg.norm(x, axis=1, keepdims=True)
            e.ingest_batch([{"vector": x[i], "metadata": {"source_file": f"copy{jj // f}/track{int(track[jj % f])}.wav",
                                                          "start_time_ms": int(jj % f) * 40, "duration_ms": 40}}
                            for i, jj in enumerate(j.tolist())])
            e.checkpoint()
        out["ingest_s"] = time.perf_counter() - t0
        out["compact_s"] = compact_all(e)
        out["segments"] = [(s.level, s.kind, s.n, s.index is not None) for s in e.segment_set.handles]
        hits, t = 0, []
        for q, (tr, start) in zip(queries, truth):
            t0 = time.perf_counter()
            res = e.identify(q, k=5, ef=100, search_tier="archive", include_metadata=False)
            t.append(time.perf_counter() - t0)
            if res:
                row = int(res[0]["id"]) % f
                hits += track[row] == tr and abs(row - int(start)) <= 1
        out["top1"] = hits / len(queries)
        out["p50_ms"], out["p99_ms"] = statistics.median(t) * 1e3, float(np.percentile(t, 99)) * 1e3
    return out


# ------------------------------------------------------------------------------------ part 2
PROBE = r'''
import json, resource, statistics, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from vibrato.engine import Engine

def rss():
    f = {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(("RssAnon", "RssFile"))}
    return f["RssAnon"] * 1024, f["RssFile"] * 1024
Q = np.load(sys.argv[3])
before = rss()
with Engine.open(sys.argv[2], dim=Q.shape[1], background=False) as e:
    opened = rss()
    sweep = {}
    for ef in (16, 32, 128, 256, 64):  # ef=64 last: the headline p50/p99 and memory figures are after it
        ids, t = [], []
        for q in Q:
            t0 = time.perf_counter()
            r = e.query(q, k=10, ef=ef, search_tier="archive", include_metadata=False)
            t.append(time.perf_counter() - t0)
            ids.append([x["id"] for x in r])
        sweep[ef] = (ids, t)
    after = rss()
ids, t = sweep[64]
print(json.dumps({"ids": ids, "p50_ms": statistics.median(t) * 1e3, "p99_ms": float(np.percentile(t, 99)) * 1e3,
                  "sweep": {ef: {"ids": i, "p50_ms": statistics.median(tt) * 1e3} for ef, (i, tt) in sweep.items()},
                  "rss_anon_open": opened[0] - before[0], "rss_anon_after": after[0] - before[0],
                  "rss_file_after": after[1] - before[1]}))
'''


def scale(tmp: Path, n: int, nq: int, peers: bool, data: Path | None, checkpoint_rows: int) -> dict:
    X = text_vectors(n, seed=1)
    Q = text_vectors(nq, seed=99)
    truth = exact_top10(X, Q)
    out = {"n": n, "threads": build_threads()}
    data = data or tmp / "scale"
    if not (data / "catalog.sqlite3").exists():
        out.update(build_scale(data, X, checkpoint_rows))
    out["data_dir_bytes"] = sum(f.stat().st_size for f in data.rglob("*") if f.is_file())
    qpath = tmp / "q.npy"
    np.save(qpath, Q)
    probe = json.loads(subprocess.run([sys.executable, "-c", PROBE, str(Path(__file__).resolve().parent.parent),
                                       str(data), str(qpath)], capture_output=True, text=True, check=True).stdout)
    out.update({k: v for k, v in probe.items() if k not in ("ids", "sweep")})
    out["recall_archive_ef64"] = recall(probe["ids"], truth)
    out["ef_sweep"] = {ef: {"p50_ms": r["p50_ms"], "recall": recall(r["ids"], truth)} for ef, r in probe["sweep"].items()}
    out["rss_anon_per_vector"] = probe["rss_anon_after"] / n
    print(json.dumps(out, indent=1), flush=True)  # ours first: a peer failing below loses nothing
    if peers:
        try:
            out.update(peer_figures(X, Q, truth))
        except Exception as exc:  # noqa: BLE001 - a benchmark reports what it could measure
            out["peer_error"] = repr(exc)
    return out


def build_scale(data: Path, X: np.ndarray, checkpoint_rows: int) -> dict:
    """Ingest X in batches of 10k with a checkpoint per checkpoint_rows and compact until idle; the
    phases' times."""
    out = {}
    t0 = time.perf_counter()
    with Engine.open(data, dim=X.shape[1], background=False, checkpoint_max_rows=100_000) as e:
        ingest(e, X, batch=10_000, checkpoint_rows=checkpoint_rows)
        out["ingest_checkpoint_s"] = time.perf_counter() - t0
        # L0 -> L1 steps, then the L1 -> L2 step(s) timed on their own
        t1 = time.perf_counter()
        while True:
            levels = [s.level for s in e.segment_set.handles]
            if levels.count(0) < 2:
                break
            e.compact()
        out["l1_compaction_s"] = time.perf_counter() - t1
        out["l2_compaction_s"] = compact_all(e)
        out["segments"] = [(s.level, s.kind, s.n) for s in e.segment_set.handles]
    return out


def peer_figures(X, Q, truth) -> dict:
    import faiss
    import hnswlib
    out = {}
    threads = build_threads()
    idx = hnswlib.Index(space="ip", dim=X.shape[1])
    t0 = time.perf_counter()
    idx.init_index(max_elements=X.shape[0], M=16, ef_construction=100, random_seed=1)
    idx.add_items(X, num_threads=threads)
    out["hnswlib_build_s"] = time.perf_counter() - t0
    idx.set_num_threads(1)
    out["hnswlib_ef_sweep"] = {}
    for ef in (16, 32, 64):
        idx.set_ef(ef)
        p50, r = _timed_recall(lambda q: idx.knn_query(q, k=10)[0][0], Q, truth)
        out["hnswlib_ef_sweep"][ef] = {"p50_ms": p50, "recall": r}
    out["hnswlib_p50_ms"], out["hnswlib_recall_ef64"] = p50, r
    # HNSW over PQ codes (L2 on unit vectors ranks as inner product), exact refine of k * 8 candidates
    hnswpq = faiss.IndexHNSWPQ(X.shape[1], 32, 16)
    hnswpq.hnsw.efConstruction = 100
    refine, out["faiss_hnswpq_build_s"] = _faiss_refined(faiss, hnswpq, X, threads)
    setting, out["faiss_hnswpq_refine_recall"], out["faiss_hnswpq_refine_p50_ms"] = _first_at_recall(
        lambda ef: setattr(hnswpq.hnsw, "efSearch", ef), (16, 32, 64, 128, 256), refine, Q, truth)
    out["faiss_hnswpq_refine_ef"] = setting
    nlist = int(4 * np.sqrt(X.shape[0]))
    quant = faiss.IndexFlatIP(X.shape[1])  # kept in a name: the IVF index borrows it
    ivf = faiss.IndexIVFPQ(quant, X.shape[1], nlist, 32, 8, faiss.METRIC_INNER_PRODUCT)
    refine, out["faiss_ivfpq_build_s"] = _faiss_refined(faiss, ivf, X, threads)
    setting, out["faiss_ivfpq_refine_recall"], out["faiss_ivfpq_refine_p50_ms"] = _first_at_recall(
        lambda nprobe: setattr(ivf, "nprobe", nprobe), (4, 8, 16, 32, 64, 128), refine, Q, truth)
    out["faiss_ivfpq_refine_nprobe"] = setting
    return out


def _faiss_refined(faiss, index, X, threads):
    """(IndexRefineFlat over index with an exact rerank of k * 8 candidates, build seconds): trained on
    up to 100k rows and filled with X on `threads` threads; searches then run on one thread."""
    faiss.omp_set_num_threads(threads)
    refine = faiss.IndexRefineFlat(index)
    refine.k_factor = 8
    t0 = time.perf_counter()
    refine.train(X[np.random.default_rng(0).choice(X.shape[0], min(X.shape[0], 100_000), replace=False)])
    refine.add(X)
    build_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)
    return refine, build_s


def _first_at_recall(set_param, values, refine, Q, truth):
    """(setting, recall, p50 ms) at the first of `values` whose recall@10 reaches 0.95 (else the last)."""
    for v in values:
        set_param(v)
        p50, r = _timed_recall(lambda q: refine.search(q[None, :], 10)[1][0], Q, truth)
        if r >= 0.95:
            break
    return v, r, p50


def _timed_recall(search, Q, truth) -> tuple[float, float]:
    """(p50 ms, recall@10) of search(q) -> top-10 labels over the queries, one at a time."""
    t, got = [], []
    for q in Q:
        t0 = time.perf_counter()
        labels = search(q)
        t.append(time.perf_counter() - t0)
        got.append(np.asarray(labels).tolist())
    return statistics.median(t) * 1e3, recall(got, truth)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=int(os.environ.get("VIBRATO_BENCH_N", 1_000_000)))
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--skip-real", action="store_true", help="skip parts 1 and 1b (real text and audio sets)")
    p.add_argument("--identify-only", action="store_true", help="run parts 1b and 1c (identify) alone")
    p.add_argument("--skip-scale", action="store_true")
    p.add_argument("--skip-peers", action="store_true")
    p.add_argument("--identify-n", type=int, default=1_000_000, help="frames for part 1c (0: skip it)")
    p.add_argument("--checkpoint-rows", type=int, default=10_000,
                   help="part 2: rows per checkpoint (L0 segment); the 10M long form uses 100000")
    p.add_argument("--data-dir", type=Path, help="keep the scale data dir here; reuse it when it exists")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_archive_") as tmp:
        tmp = Path(tmp)
        if not args.skip_real:
            if not args.identify_only:
                results["real"] = real_data(tmp, min(args.queries, 500))
                print(json.dumps(results["real"], indent=1), flush=True)
            results["audio"] = audio(tmp)
            print(json.dumps(results["audio"], indent=1), flush=True)
            if args.identify_n:
                results["identify_scale"] = identify_scale(tmp, args.identify_n)
                print(json.dumps(results["identify_scale"], indent=1), flush=True)
        if not args.skip_scale and not args.identify_only:
            results["scale"] = scale(tmp, args.n, args.queries, not args.skip_peers, args.data_dir,
                                     args.checkpoint_rows)
            print(json.dumps(results["scale"], indent=1), flush=True)
    OUT.mkdir(exist_ok=True)
    name = "bench_archive.json" if args.n == 1_000_000 else f"bench_archive_n{args.n}.json"
    if args.identify_only:
        name = "bench_archive_identify.json"
    (OUT / name).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
