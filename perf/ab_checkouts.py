"""A/B two checkouts of Vibrato on the same machine in one run (report, don't assert).

    .venv/bin/python perf/ab_checkouts.py OLD_CHECKOUT NEW_CHECKOUT [--runs 3] [--n 200000]

Each checkout must have its own built `.venv` (`make install`). Runs alternate (old, new, old, new, ...)
so both see the same machine load, and each figure is the median over --runs. Per run and checkout:
  * HNSW single-thread queries/s on shared/data/text (20k x 128, M=16, ef_construction=200, k=10) at
    ef=32 and ef=64, with recall@10 against the data set's ground truth; build time (1 thread);
  * the checkout's own perf/bench_engine.py at VIBRATO_BENCH_N=--n: batch ingest, single ingest from 8
    threads, hot / L0 / all / archive query p50, checkpoint and compaction seconds per 100k rows.
Prints a markdown table with the ratio new/old (> 1 is better for rates, < 1 for times).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import DATA  # noqa: E402

HNSW_CODE = r"""
import json, sys, time
import numpy as np
from vibrato.index import HnswIndex
d = sys.argv[1]
X = np.load(d + "/text/base_128.npy"); Q = np.load(d + "/text/queries_128.npy")
gt = np.load(d + "/text/gt_128_ids.npy")[:, :10]
index = HnswIndex(128, m=16, ef_construction=200, seed=0)
t = time.perf_counter(); index.add(X, threads=1); build = time.perf_counter() - t
out = {"hnsw_build_s": build}
for ef in (32, 64):
    index.search(Q[:100], k=10, ef=ef, threads=1)
    best, ids = 0.0, None
    for _ in range(3):
        t = time.perf_counter(); ids, _ = index.search(Q, k=10, ef=ef, threads=1); dt = time.perf_counter() - t
        best = max(best, len(Q) / dt)
    out[f"hnsw_qps_ef{ef}"] = best
    out[f"hnsw_recall_ef{ef}"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), gt.tolist())]))
print(json.dumps(out))
"""

# (label, key path in the merged result, "rate" | "time")
FIGURES = [
    ("HNSW q/s ef=32 (1 thread)", ("hnsw_qps_ef32",), "rate"),
    ("HNSW q/s ef=64 (1 thread)", ("hnsw_qps_ef64",), "rate"),
    ("HNSW recall@10 ef=64", ("hnsw_recall_ef64",), "rate"),
    ("HNSW build s (20k, 1 thread)", ("hnsw_build_s",), "time"),
    ("batch ingest vectors/s", ("batch_ingest_vectors_per_s",), "rate"),
    ("single ingest/s (8 threads)", ("single_ingest_8_threads_per_s",), "rate"),
    ("query p50 ms, hot tier", ("hot_query", "p50_ms"), "time"),
    ("query p50 ms, L0 segment", ("l0_query", "p50_ms"), "time"),
    ("query p50 ms, all tiers", ("all_query", "p50_ms"), "time"),
    ("query p50 ms, archive", ("archive_query", "p50_ms"), "time"),
    ("checkpoint s / 100k", ("checkpoint_s_per_100k_total",), "time"),
    ("compaction s / 100k", ("compaction_s_per_100k",), "time"),
]


def run_once(checkout: Path, n: int) -> dict:
    py = checkout / ".venv" / "bin" / "python"
    env = dict(os.environ, VIBRATO_SHARED_DATA=str(DATA), VIBRATO_BENCH_N=str(n))
    hnsw = subprocess.run([str(py), "-c", HNSW_CODE, str(DATA)], cwd=checkout, env=env, capture_output=True,
                          text=True, check=True)
    res = json.loads(hnsw.stdout.strip().splitlines()[-1])
    subprocess.run([str(py), "perf/bench_engine.py"], cwd=checkout, env=env, capture_output=True,
                   text=True, check=True)
    res.update(json.loads((checkout / "perf" / "results" / "bench_engine.json").read_text()))
    return res


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4g}"


def pick(res: dict, path: tuple):
    for k in path:
        res = res[k]
    return float(res)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--n", type=int, default=200_000)
    args = ap.parse_args()
    results = {"old": [], "new": []}
    for r in range(args.runs):
        for side in ("old", "new"):
            print(f"run {r + 1}/{args.runs}: {side} ({getattr(args, side)})", file=sys.stderr, flush=True)
            results[side].append(run_once(getattr(args, side).resolve(), args.n))
    print(f"\n| figure (median of {args.runs}) | old | new | new/old |\n|---|---:|---:|---:|")
    for label, path, _kind in FIGURES:
        old = statistics.median(pick(x, path) for x in results["old"])
        new = statistics.median(pick(x, path) for x in results["new"])
        print(f"| {label} | {_fmt(old)} | {_fmt(new)} | {new / old:.2f} |")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "ab_checkouts.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
