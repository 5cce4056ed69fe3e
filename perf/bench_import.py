"""Bulk import (`vibrato import`, issue 18): vectors per second into a fresh data dir, and what the
imported store answers before any compaction (report, don't assert).

    .venv/bin/python perf/bench_import.py [--n 1000000] [--no-metadata] [--runs 1] [--peer]

--n rows of the tiled text set (benchlib.text_vectors) are written to a .npy file, with a metadata line
each (source_file, start_time_ms, duration_ms, bpm, one tag: what an audio catalog carries) unless
--no-metadata. Each run imports them with the CLI, as an operator would (`vibrato import --data-dir D
--collection default --vectors V.npy --metadata M.jsonl`, a fresh D each run), and times the whole
command. After the last run the store is opened in-process and 200 noisy queries measure recall@10 (ef 64)
against exact inner-product top-10, and the query p50. --peer builds hnswlib (M=16, ef_construction=100,
2 threads) over the same vectors in the same session, for its rows per second.
"""
import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import exact_top10, text_vectors  # noqa: E402

FRAMES_PER_TRACK = 750


def write_inputs(root: Path, n: int, metadata: bool):
    X = text_vectors(n, seed=3)
    np.save(root / "vectors.npy", X)
    if not metadata:
        return X, None
    path = root / "metadata.jsonl"
    with open(path, "wb") as f:
        for lo in range(0, n, 100_000):
            f.write(b"".join(orjson.dumps({"source_file": f"track{i // FRAMES_PER_TRACK:06d}.wav",
                                           "start_time_ms": (i % FRAMES_PER_TRACK) * 40, "duration_ms": 40,
                                           "bpm": 90.0 + (i // FRAMES_PER_TRACK) % 60,
                                           "tags": [f"genre{(i // FRAMES_PER_TRACK) % 12}"]}) + b"\n"
                             for i in range(lo, min(n, lo + 100_000))))
    return X, path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--no-metadata", action="store_true")
    ap.add_argument("--peer", action="store_true", help="also build hnswlib over the same vectors")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vibrato-import-"))
    try:
        X, meta = write_inputs(root, args.n, not args.no_metadata)
        secs = []
        for run in range(args.runs):
            d = root / f"d{run}"
            cmd = [sys.executable, "-m", "vibrato.cli", "import", "--data-dir", str(d), "--collection", "default",
                   "--vectors", str(root / "vectors.npy")] + (["--metadata", str(meta)] if meta else [])
            t = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            secs.append(time.perf_counter() - t)
            print(f"run {run + 1}: {args.n:,} rows in {secs[-1]:.1f} s = {args.n / secs[-1]:,.0f} vectors/s", flush=True)
            if run < args.runs - 1:
                shutil.rmtree(d)
        from vibrato.engine import Engine
        rng = np.random.default_rng(7)
        Q = X[rng.choice(args.n, 200, replace=False)] + rng.normal(0, 0.01, (200, X.shape[1])).astype(np.float32)
        truth = exact_top10(X, Q)
        with Engine.open(root / f"d{args.runs - 1}", dim=X.shape[1], background=False) as e:
            levels = sorted(s.level for s in e.view().segments)
            lat, hits = [], 0
            for q, t in zip(Q, truth):
                t0 = time.perf_counter()
                res = e.query(q, k=10, ef=64, include_metadata=False)
                lat.append(time.perf_counter() - t0)
                hits += len({r["id"] for r in res} & set(t.tolist()))
        med = statistics.median(secs)
        print(f"import ({'no metadata' if meta is None else 'with metadata'}): median {med:.1f} s = "
              f"{args.n / med:,.0f} vectors/s over {args.runs} run(s); segments by level {levels}")
        print(f"imported store, before compaction: recall@10 (ef 64) {hits / 2000:.4f}, "
              f"query p50 {statistics.median(lat) * 1e3:.3f} ms")
        if args.peer:
            import hnswlib
            p = hnswlib.Index(space="ip", dim=X.shape[1])
            p.init_index(max_elements=args.n, M=16, ef_construction=100)
            p.set_num_threads(2)
            t = time.perf_counter()
            p.add_items(X)
            ps = time.perf_counter() - t
            print(f"peer: hnswlib build (M=16, ef_construction=100, 2 threads) {ps:.1f} s = {args.n / ps:,.0f} rows/s; "
                  f"import / hnswlib build rate {ps / med:.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
