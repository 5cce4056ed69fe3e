"""HNSW benchmarks (report, don't assert). Run: `.venv/bin/python perf/bench_hnsw.py [--runs 5]`.

Everything is measured in one process, interleaved run by run, so the peers see the same machine
state; figures are medians over --runs and ratios are taken against the peer of the same run.

  1. recall@10 / queries-per-second curve on shared/data/text (20k x 128 unit rows, 500 queries,
     exact inner-product ground truth), ef in 10..400, k=10, ONE thread, a batch of 500 queries
     per call: vibrato HnswIndex vs hnswlib 0.8.0 (space 'ip') vs faiss IndexHNSWFlat
     (METRIC_INNER_PRODUCT, omp_set_num_threads(1)); all with M=16, ef_construction=200.
  2. single-query latency (one Python call per query) at ef=64, vibrato vs hnswlib.
  3. build time of the 20k index: vibrato threads=1/2 vs hnswlib num_threads=1/2 (faiss with 1 OpenMP
     thread for reference).
  4. filtered search at 0.1/1/10/50% random selectivity: recall@10 vs the exact filtered top-10 and
     mean latency per query, auto strategy vs a forced exact SIMD scan of the allowed rows (and
     numpy's X[allowed] @ q for reference). --big adds a 200k synthetic set (clustered unit rows),
     where the graph path matters more.
  5. identify through the engine on shared/data/audio: 100 noisy 75-frame queries, top-1 track and
     start frame accuracy, latency p50/p99.

Requires the bench extra: hnswlib==0.8.0 faiss-cpu==1.15.1 matplotlib==3.11.2 threadpoolctl==3.8.0.
Results: printed as markdown tables and saved to perf/results/bench_hnsw.json; draw the plot with
perf/plot_hnsw.py.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vibrato import kernels  # noqa: E402
from vibrato.index import HnswIndex  # noqa: E402

DATA = Path(os.environ.get("VIBRATO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
OUT = Path(__file__).resolve().parent / "results"
EFS = [10, 16, 24, 32, 48, 64, 96, 128, 200, 300, 400]
M, EFC = 16, 200


def med(xs):
    return statistics.median(xs)


def recall(ids, gt, k=10):
    return float(np.mean([len(set(ids[i, :k].tolist()) & set(gt[i, :k].tolist())) / k for i in range(len(gt))]))


def timed(fn, *a, **kw):
    t = time.perf_counter()
    r = fn(*a, **kw)
    return r, time.perf_counter() - t


# ------------------------------------------------------------------------------------------ peers


class Vibrato:
    name = "vibrato"

    def __init__(self, X, threads):
        self.index = HnswIndex(X.shape[1], m=M, ef_construction=EFC, seed=0)
        self.index.add(X, threads=threads)

    def search(self, Q, ef):
        return self.index.search(Q, k=10, ef=ef, threads=1)[0]

    def one(self, q, ef):
        return self.index.search(q, k=10, ef=ef)


class Hnswlib:
    name = "hnswlib"

    def __init__(self, X, threads):
        import hnswlib
        self.index = hnswlib.Index(space="ip", dim=X.shape[1])
        self.index.init_index(max_elements=X.shape[0], M=M, ef_construction=EFC, random_seed=0)
        self.index.add_items(X, num_threads=threads)
        self.index.set_num_threads(1)

    def search(self, Q, ef):
        self.index.set_ef(ef)
        return self.index.knn_query(Q, k=10, num_threads=1)[0]

    def one(self, q, ef):
        self.index.set_ef(ef)
        return self.index.knn_query(q, k=10, num_threads=1)


class Faiss:
    name = "faiss"

    def __init__(self, X, threads):
        import faiss
        faiss.omp_set_num_threads(threads)
        self.index = faiss.IndexHNSWFlat(X.shape[1], M, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = EFC
        self.index.add(X)
        faiss.omp_set_num_threads(1)

    def search(self, Q, ef):
        self.index.hnsw.efSearch = ef
        return self.index.search(Q, 10)[1]


# ------------------------------------------------------------------------------------------ sections


def bench_curve(X, Q, gt, runs):
    print("\n## 1. recall@10 vs queries/s (single thread, batch of %d queries)" % len(Q))
    print("building the three indexes (threads=1) ...", flush=True)
    peers = [Vibrato(X, 1), Hnswlib(X, 1), Faiss(X, 1)]
    for p in peers:  # warm-up (page in, pool scratch)
        p.search(Q, 64)
    rows = []
    for ef in EFS:
        times = {p.name: [] for p in peers}
        rec = {}
        for _ in range(runs):
            for p in peers:
                ids, dt = timed(p.search, Q, ef)
                times[p.name].append(dt)
                rec[p.name] = recall(ids, gt)
        row = {"ef": ef}
        for p in peers:
            row[p.name] = {"recall": rec[p.name], "qps": len(Q) / med(times[p.name]),
                           "qps_runs": [len(Q) / t for t in times[p.name]]}
        # the per-run ratio (same run, same machine state), then its median
        row["ratio_hnswlib"] = med([b / a for a, b in zip(times["vibrato"], times["hnswlib"])])
        row["ratio_faiss"] = med([b / a for a, b in zip(times["vibrato"], times["faiss"])])
        rows.append(row)
    print("\n| ef | vibrato recall | vibrato q/s | hnswlib recall | hnswlib q/s | faiss recall | faiss q/s "
          "| vibrato/hnswlib | vibrato/faiss |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['ef']} | {r['vibrato']['recall']:.4f} | {r['vibrato']['qps']:,.0f} | "
              f"{r['hnswlib']['recall']:.4f} | {r['hnswlib']['qps']:,.0f} | {r['faiss']['recall']:.4f} | "
              f"{r['faiss']['qps']:,.0f} | {r['ratio_hnswlib']:.2f}x | {r['ratio_faiss']:.2f}x |")

    # Throughput at recall >= 0.95: the fastest configuration of each library reaching it.
    at95 = {}
    for name in ("vibrato", "hnswlib", "faiss"):
        ok = [r for r in rows if r[name]["recall"] >= 0.95]
        best = max(ok, key=lambda r: r[name]["qps"]) if ok else None
        at95[name] = {"ef": best["ef"], "recall": best[name]["recall"], "qps": best[name]["qps"]} if best else None
    print("\nAt recall@10 >= 0.95 (fastest ef reaching it):")
    for name, v in at95.items():
        print(f"  {name:8s} ef={v['ef']:4d} recall={v['recall']:.4f} {v['qps']:,.0f} q/s" if v else f"  {name}: n/a")
    if at95["vibrato"] and at95["hnswlib"]:
        print(f"  vibrato / hnswlib = {at95['vibrato']['qps'] / at95['hnswlib']['qps']:.2f}x")
    if at95["vibrato"] and at95["faiss"]:
        print(f"  vibrato / faiss   = {at95['vibrato']['qps'] / at95['faiss']['qps']:.2f}x")

    # Single-query calls (one Python call per query): what a server handler pays.
    lat = {"vibrato": [], "hnswlib": []}
    for _ in range(runs):
        for p in peers[:2]:
            t0 = time.perf_counter()
            for q in Q:
                p.one(q, 64)
            lat[p.name].append((time.perf_counter() - t0) / len(Q))
    single = {k: med(v) * 1e6 for k, v in lat.items()}
    print(f"\nSingle-query call at ef=64 (mean per call, incl. Python): vibrato {single['vibrato']:.1f} us, "
          f"hnswlib {single['hnswlib']:.1f} us")
    return {"rows": rows, "at_recall_095": at95, "single_query_us_ef64": single}


def bench_build(X, runs):
    print("\n## 2. build time (20k x 128, M=16, ef_construction=200)")
    res = {k: [] for k in ("vibrato_t1", "vibrato_t2", "hnswlib_t1", "hnswlib_t2", "faiss_t1")}
    for _ in range(runs):
        for key, cls, th in (("vibrato_t1", Vibrato, 1), ("hnswlib_t1", Hnswlib, 1), ("vibrato_t2", Vibrato, 2),
                             ("hnswlib_t2", Hnswlib, 2), ("faiss_t1", Faiss, 1)):
            _, dt = timed(cls, X, th)
            res[key].append(dt)
    out = {k: med(v) for k, v in res.items()}
    out["ratio_t1"] = med([a / b for a, b in zip(res["vibrato_t1"], res["hnswlib_t1"])])
    out["ratio_t2"] = med([a / b for a, b in zip(res["vibrato_t2"], res["hnswlib_t2"])])
    print("\n| threads | vibrato s | hnswlib s | vibrato / hnswlib (lower is better) |")
    print("|---:|---:|---:|---:|")
    print(f"| 1 | {out['vibrato_t1']:.2f} | {out['hnswlib_t1']:.2f} | {out['ratio_t1']:.2f}x |")
    print(f"| 2 | {out['vibrato_t2']:.2f} | {out['hnswlib_t2']:.2f} | {out['ratio_t2']:.2f}x |")
    print(f"faiss (1 thread): {out['faiss_t1']:.2f} s")
    return {"median_s": out, "runs_s": res}


def bench_filtered(name, X, Q, runs, index=None):
    print(f"\n## 3. filtered search on {name} ({X.shape[0]} rows, {len(Q)} queries, k=10, ef=64, 1 thread)")
    from threadpoolctl import threadpool_limits
    if index is None:
        index = HnswIndex(X.shape[1], m=M, ef_construction=EFC, seed=0)
        index.add(X, threads=2)
    S = X @ Q.T
    rng = np.random.default_rng(0)
    rows = []
    for sel in (0.001, 0.01, 0.1, 0.5):
        mask = rng.random(X.shape[0]) < sel
        gt = np.argsort(-np.where(mask[:, None], S, -np.inf), axis=0)[:10].T
        t = {"auto": [], "scan": [], "graph": [], "numpy": [], "one": []}
        got, used = {}, {}
        rows_allowed = np.flatnonzero(mask)

        def run(kind):
            if kind == "numpy":
                with threadpool_limits(1):
                    t0 = time.perf_counter()
                    for q in Q:
                        sc = X[np.flatnonzero(mask)] @ q
                        rows_allowed[np.argpartition(-sc, min(10, len(sc) - 1))[:10]]
                    return None, time.perf_counter() - t0
            if kind == "one":  # auto and scan interleaved query by query, alternating which goes first
                dt = {"auto": 0.0, "scan": 0.0}
                for i, q in enumerate(Q[:40]):
                    for mode in (("auto", "scan") if i % 2 else ("scan", "auto")):
                        t0 = time.perf_counter()
                        index.search(q, 10, 64, mask, mode=mode)
                        dt[mode] += time.perf_counter() - t0
                return None, {m: v * len(Q) / 40 for m, v in dt.items()}
            st0 = index.stats()
            (ids, _), dt = timed(index.search, Q, 10, 64, mask, mode=kind)
            st1 = index.stats()
            if kind == "auto":
                used.update({k: st1[k] - st0[k] for k in ("graph_searches", "scan_searches", "scan_fallbacks")})
            return ids, dt

        kinds = list(t)
        for r in range(runs):  # rotate the order so no variant always runs on a cache the previous one thrashed
            for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                ids, dt = run(kind)
                t[kind].append(dt)
                if ids is not None:
                    got[kind] = ids
        ids, ids_g = got["auto"], got["graph"]
        t_auto, t_scan, t_graph, t_np = t["auto"], t["scan"], t["graph"], t["numpy"]
        strategy = "scan" if used["scan_searches"] and not used["graph_searches"] else (
            "graph" if not used["scan_searches"] else "mixed")
        r = {"selectivity": sel, "allowed": int(mask.sum()), "recall_auto": recall(ids, gt),
             "recall_graph": recall(ids_g, gt), "strategy": strategy, "fallbacks": used["scan_fallbacks"],
             "auto_us": med(t_auto) / len(Q) * 1e6, "scan_us": med(t_scan) / len(Q) * 1e6,
             "graph_us": med(t_graph) / len(Q) * 1e6, "numpy_us": med(t_np) / len(Q) * 1e6,
             "single_call_auto_us": med([x["auto"] for x in t["one"]]) / len(Q) * 1e6,
             "single_call_scan_us": med([x["scan"] for x in t["one"]]) / len(Q) * 1e6,
             "auto_over_scan": med([a / b for a, b in zip(t_auto, t_scan)])}
        rows.append(r)
    print("\nus = mean microseconds per query in a batch call; 1-call = one Python call per query.")
    print("\n| allowed | rows | auto picks | recall@10 auto | auto us | exact scan us | auto / scan "
          "| 1-call auto us | 1-call scan us | forced graph recall | forced graph us | numpy X[allowed]@q us |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['selectivity'] * 100:g}% | {r['allowed']} | {r['strategy']} | {r['recall_auto']:.4f} | "
              f"{r['auto_us']:.1f} | {r['scan_us']:.1f} | {r['auto_over_scan']:.2f}x | "
              f"{r['single_call_auto_us']:.1f} | {r['single_call_scan_us']:.1f} | {r['recall_graph']:.4f} | "
              f"{r['graph_us']:.1f} | {r['numpy_us']:.1f} |")
    return rows


def bench_subsequence(runs):
    """Identify runs in the engine (vibrato/engine/identify.py: anchors, candidate starts, exact window
    scores across every tier); this times it over the layout tests/test_engine_search.py uses."""
    import tempfile

    from vibrato.engine import Engine

    print("\n## 4. identify (engine) on shared/data/audio")
    A = DATA / "audio"
    frames = np.load(A / "frames.npy")
    queries = np.load(A / "queries.npy")
    truth = np.load(A / "queries_truth.npy")
    frame_track = np.load(A / "frame_track.npy")
    out = {"configs": []}
    print("\n| layout | start correct | track correct | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|")
    for label, max_rows, checkpoints in (("all frames in 1 segment", len(frames), 1),
                                         ("2 segments + hot tier", 15000, 2)):
        with tempfile.TemporaryDirectory() as tmp, \
                Engine.open(Path(tmp) / "d", dim=128, background=False, checkpoint_max_rows=max_rows) as e:
            for i in range(0, len(frames), 5000):
                e.ingest_batch([{"vector": f} for f in frames[i:i + 5000]])
            for _ in range(checkpoints):
                e.checkpoint()
            lat, start_ok, track_ok = [], 0, 0
            for r in range(runs):
                for q, (track, start) in zip(queries, truth):
                    res, dt = timed(e.identify, q, 5, 100, include_metadata=False)
                    lat.append(dt)
                    if r == 0 and res:
                        start_ok += int(res[0]["id"] == start)
                        track_ok += int(frame_track[res[0]["id"]] == track)
        res = {"config": label, "start_correct": start_ok, "track_correct": track_ok, "queries": len(queries),
               "p50_ms": float(np.percentile(lat, 50) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3)}
        out["configs"].append(res)
        print(f"| {label} | {start_ok}/{len(queries)} | {track_ok}/{len(queries)} | {res['p50_ms']:.2f} | "
              f"{res['p99_ms']:.2f} |")
    return out


def synthetic(n, nq, d=128, seed=5):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((2000, d)).astype(np.float32)
    X = centers[rng.integers(0, 2000, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    Q = centers[rng.integers(0, 2000, nq)] + 0.35 * rng.standard_normal((nq, d)).astype(np.float32)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    return X, Q


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="repetitions per measurement (medians reported)")
    ap.add_argument("--build-runs", type=int, default=3)
    ap.add_argument("--big", action="store_true", help="also run filtered search on a 200k synthetic set")
    ap.add_argument("--only", default="curve,build,filter,subseq", help="comma-separated sections")
    ap.add_argument("--out", default=str(OUT / "bench_hnsw.json"))
    args = ap.parse_args()
    only = set(args.only.split(","))

    T = DATA / "text"
    X = np.load(T / "base_128.npy")
    Q = np.load(T / "queries_128.npy")
    gt = np.load(T / "gt_128_ids.npy")
    import faiss
    import hnswlib  # noqa: F401
    env = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
           "vibrato_isa": kernels.isa(), "faiss": faiss.__version__, "runs": args.runs,
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"# HNSW benchmark  ({env})")
    results = {"env": env}
    if "curve" in only:
        results["curve"] = bench_curve(X, Q, gt, args.runs)
    if "build" in only:
        results["build"] = bench_build(X, args.build_runs)
    if "filter" in only:
        results["filtered_text"] = bench_filtered("text", X, Q[:200], args.runs)
        if args.big:
            Xb, Qb = synthetic(200_000, 100)
            results["filtered_200k"] = bench_filtered("synthetic 200k", Xb, Qb, max(3, args.runs // 2))
    if "subseq" in only:
        results["subsequence"] = bench_subsequence(max(1, args.runs // 2))
    OUT.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nsaved {args.out}")


if __name__ == "__main__":
    main()
