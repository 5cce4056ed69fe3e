"""Filtered-query benchmark (report, don't assert). Run: `.venv/bin/python perf/bench_filtered.py`.

Measures engine query latency (k=10, ef=64, include_metadata, search_tier "active") with filters of
0.1%, 10% and 100% selectivity (a tag on that share of rows, scattered at random), a 10% bpm range
(no tag, so the filter index scans its bpm column), and no filter, in two states:
  * segments: VIBRATO_BENCH_N rows (default 200,000) in L0 segments of 50,000, hot tier empty;
  * hot+segments: the same plus VIBRATO_BENCH_TAIL rows (default 20,000) in the hot tier.
Each state runs VIBRATO_BENCH_ROUNDS rounds (default 5) over 200 queries; a case reports the median
of its per-round p50s and the worst per-round p99.

The segment data dir is built once and cached in VIBRATO_BENCH_CACHE (default
/tmp/vibrato-bench-filtered-<N>); every run works on a copy, so before/after runs of two checkouts
search the same files. Vectors: /work/shared/data/text base_128.npy tiled with small noise.
Results are printed and saved to perf/results/bench_filtered.json.
"""
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import text_vectors as vectors  # noqa: E402
from vibrato.engine import Engine  # noqa: E402

N = int(os.environ.get("VIBRATO_BENCH_N", "200000"))
TAIL = int(os.environ.get("VIBRATO_BENCH_TAIL", "20000"))
ROUNDS = int(os.environ.get("VIBRATO_BENCH_ROUNDS", "5"))
CACHE = Path(os.environ.get("VIBRATO_BENCH_CACHE", f"/tmp/vibrato-bench-filtered-{N}"))
OUT = Path(__file__).resolve().parent / "results"
SEGMENT_ROWS = 50_000

CASES = {
    "none": None,
    "tag_0.1%": {"tags_all": ["p0_1"]},
    "tag_10%": {"tags_all": ["p10"]},
    "tag_100%": {"tags_all": ["p100"]},
    "bpm_10%": {"bpm_gte": 100.0, "bpm_lte": 109.0},
}


def items(X, lo, hi, rng):
    out = []
    for i in range(lo, hi):
        tags = ["p100"]
        u = rng.random()
        if u < 0.1:
            tags.append("p10")
        if u < 0.001:
            tags.append("p0_1")
        out.append({"vector": X[i], "metadata": {"source_file": f"t{i // 1000}.wav",
                                                 "start_time_ms": (i % 1000) * 40, "duration_ms": 40,
                                                 "bpm": float(60 + (i * 7919) % 100), "tags": tags}})
    return out


def build(path: Path, X):
    tmp = path.with_name(path.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(1)
    eng = Engine.open(tmp, dim=128, background=False, checkpoint_max_rows=SEGMENT_ROWS)
    try:
        for lo in range(0, N, SEGMENT_ROWS):
            hi = min(N, lo + SEGMENT_ROWS)
            for j in range(lo, hi, 1000):
                eng.ingest_batch(items(X, j, min(hi, j + 1000), rng))
            eng.checkpoint()
            print(f"  built {hi} rows", flush=True)
    finally:
        eng.close()
    tmp.rename(path)


def measure(eng, Q, rounds):
    per_case = {name: [] for name in CASES}
    for _ in range(rounds):
        for name, flt in CASES.items():
            lat = []
            for q in Q:
                t = time.perf_counter()
                eng.query(q, k=10, ef=64, filter=flt, search_tier="active", include_metadata=True)
                lat.append((time.perf_counter() - t) * 1e3)
            lat.sort()
            per_case[name].append((statistics.median(lat), lat[int(0.99 * (len(lat) - 1))]))
    return {name: {"p50_ms": round(statistics.median(p for p, _ in runs), 4),
                   "p99_ms": round(max(p for _, p in runs), 4),
                   "round_p50s": [round(p, 4) for p, _ in runs]}
            for name, runs in per_case.items()}


def main():
    OUT.mkdir(exist_ok=True)
    X = vectors(N + TAIL)
    Q = vectors(200, seed=7)
    if not CACHE.exists():
        print(f"building {CACHE} ...", flush=True)
        build(CACHE, X)
    root = Path(tempfile.mkdtemp(prefix="vibrato-bench-filtered-"))
    res = {"N": N, "tail": TAIL, "rounds": ROUNDS}
    try:
        d = root / "data"
        shutil.copytree(CACHE, d)
        eng = Engine.open(d, dim=128, background=False, checkpoint_max_rows=10 * (N + TAIL))
        try:
            for flt in CASES.values():  # warm-up: page in the segments, build lazy filter structures
                [eng.query(q, k=10, ef=64, filter=flt, search_tier="active") for q in Q[:20]]
            res["segments"] = measure(eng, Q, ROUNDS)
            rng = np.random.default_rng(2)
            for j in range(N, N + TAIL, 1000):
                eng.ingest_batch(items(X, j, min(N + TAIL, j + 1000), rng))
            for flt in CASES.values():
                [eng.query(q, k=10, ef=64, filter=flt, search_tier="active") for q in Q[:20]]
            res["hot+segments"] = measure(eng, Q, ROUNDS)
        finally:
            eng.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({state: {c: v["p50_ms"] for c, v in res[state].items()}
                      for state in ("segments", "hot+segments")}, indent=2))
    (OUT / "bench_filtered.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
