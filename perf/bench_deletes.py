"""Deletes benchmark (report, don't assert): `.venv/bin/python perf/bench_deletes.py [--n 200000]`.

Measures, on the embedded engine (the HTTP route is one catalog write around the same call):
  * deletes per second: by id (batches of 1 and of 1,000 ids) and by whole track (`source_file`,
    one track of `--track-frames` rows per call), each durable (fsynced) on return;
  * query cost (p50 over 500 queries, k=10, ef=64, search_tier all) and recall@10 against the exact
    top 10 of the live rows, with 0%, 10% and 50% of the rows deleted, before and after a purge;
  * purge time per 100k rows of the store;
  * the same query cost and recall in hnswlib (the peer, same run) with the same rows marked deleted
    (`mark_deleted`), so the ratio of the query cost with deletes to without is compared side by side.

Vectors: shared/data/text tiled with small noise (benchlib.text_vectors), in tracks of consecutive rows.
The store is settled first (checkpointed and compacted). Results are printed and saved to
perf/results/bench_deletes.json.
"""
import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import text_vectors  # noqa: E402
from vibrato.engine import Engine  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


def build(path, X, track_frames):
    eng = Engine.open(path, dim=X.shape[1], background=False)
    for lo in range(0, X.shape[0], 2000):
        eng.ingest_batch([{"vector": X[i], "metadata": {"source_file": f"track-{i // track_frames:06d}.wav",
                                                        "start_time_ms": (i % track_frames) * 40,
                                                        "duration_ms": 40, "bpm": 120.0, "tags": ["t"]}}
                          for i in range(lo, min(X.shape[0], lo + 2000))])
        if eng.stats()["hot_vectors"] >= 50_000:
            eng.checkpoint()
    while eng.checkpoint()["state"] != "idle":
        pass
    while eng.compact()["state"] != "idle":
        pass
    return eng


def exact_top(X, live, Q, k=10):
    S = Q @ X.T
    S[:, ~live] = -np.inf
    return np.argsort(-S, axis=1)[:, :k]


def measure_ours(eng, Q, truth, rounds=3):
    lat, hits = [], 0
    for r in range(rounds):
        for qi, q in enumerate(Q):
            t = time.perf_counter()
            res = eng.query(q, k=10, ef=64, search_tier="all", include_metadata=False)
            lat.append(time.perf_counter() - t)
            if r == 0:
                hits += len({x["id"] for x in res} & set(truth[qi].tolist()))
    return {"p50_ms": round(statistics.median(lat) * 1e3, 4), "recall@10": round(hits / (10 * len(Q)), 4)}


def measure_hnswlib(index, Q, truth, rounds=3):
    index.set_ef(64)
    lat, hits = [], 0
    for r in range(rounds):
        for qi, q in enumerate(Q):
            t = time.perf_counter()
            labels, _ = index.knn_query(q, k=10)
            lat.append(time.perf_counter() - t)
            if r == 0:
                hits += len(set(labels[0].tolist()) & set(truth[qi].tolist()))
    return {"p50_ms": round(statistics.median(lat) * 1e3, 4), "recall@10": round(hits / (10 * len(Q)), 4)}


def purge_and_measure(eng, Q, truth, n) -> dict:
    """Purge (timed), then the query figures again."""
    t = time.perf_counter()
    out = eng.compact(purge=True)["details"]
    secs = time.perf_counter() - t
    return {"purge_s": round(secs, 2), "purge_s_per_100k_rows": round(secs * 100_000 / n, 2),
            "purge_details": {k: (len(v) if isinstance(v, list) else v) for k, v in out.items()},
            "vibrato_after_purge": measure_ours(eng, Q, truth)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--track-frames", type=int, default=100)
    ap.add_argument("--queries", type=int, default=500)
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    X = text_vectors(args.n)
    rng = np.random.default_rng(5)
    Q = X[rng.choice(args.n, args.queries, replace=False)] + rng.normal(0, 0.05, (args.queries, X.shape[1])).astype(np.float32)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    n_tracks = -(-args.n // args.track_frames)
    root = Path(tempfile.mkdtemp(prefix="vibrato-bench-deletes-"))
    res = {"n": args.n, "track_frames": args.track_frames, "queries": args.queries}
    try:
        t = time.perf_counter()
        eng = build(root / "data", X, args.track_frames)
        res["build_s"] = round(time.perf_counter() - t, 1)
        res["segments_by_level"] = eng.stats()["segments_by_level"]
        import hnswlib
        peer = hnswlib.Index(space="ip", dim=X.shape[1])
        peer.init_index(max_elements=args.n, M=16, ef_construction=200)
        peer.add_items(X, np.arange(args.n), num_threads=2)

        live = np.ones(args.n, dtype=bool)
        truth = exact_top(X, live, Q)
        res["0%"] = {"vibrato": measure_ours(eng, Q, truth), "hnswlib": measure_hnswlib(peer, Q, truth)}
        print("0% deleted:", res["0%"], flush=True)

        # whole tracks until 10% of the rows are gone
        order = rng.permutation(n_tracks)
        want_tracks = int(0.1 * n_tracks)
        t = time.perf_counter()
        for tr in order[:want_tracks].tolist():
            eng.delete(filter={"source_file": f"track-{tr:06d}.wav"})
        dt = time.perf_counter() - t
        res["delete_tracks_per_s"] = round(want_tracks / dt, 1)
        res["delete_track_rows_per_s"] = round(want_tracks * args.track_frames / dt, 1)
        for tr in order[:want_tracks].tolist():
            lo, hi = tr * args.track_frames, min(args.n, (tr + 1) * args.track_frames)
            live[lo:hi] = False
            for i in range(lo, hi):
                peer.mark_deleted(i)
        print(f"deleted {want_tracks} tracks: {res['delete_tracks_per_s']} tracks/s", flush=True)
        truth = exact_top(X, live, Q)
        res["10%"] = {"vibrato": measure_ours(eng, Q, truth), "hnswlib": measure_hnswlib(peer, Q, truth)}
        res["10%"].update(purge_and_measure(eng, Q, truth, args.n))
        print("10% deleted:", res["10%"], flush=True)

        # single ids, then batches of 1,000, until half of the rows are gone
        rest = rng.permutation(np.flatnonzero(live))
        need = int(0.5 * args.n) - int((~live).sum())
        singles = rest[:2000]
        t = time.perf_counter()
        for i in singles.tolist():
            eng.delete(ids=[i])
        res["delete_single_ids_per_s"] = round(singles.shape[0] / (time.perf_counter() - t), 1)
        batches = rest[2000:need]
        t = time.perf_counter()
        for b in range(0, batches.shape[0], 1000):
            eng.delete(ids=batches[b:b + 1000].tolist())
        res["delete_ids_in_batches_of_1000_per_s"] = round(batches.shape[0] / (time.perf_counter() - t), 1)
        gone = rest[:need]
        live[gone] = False
        for i in gone.tolist():
            peer.mark_deleted(i)
        print(f"ids/s single {res['delete_single_ids_per_s']}, batched {res['delete_ids_in_batches_of_1000_per_s']}",
              flush=True)
        truth = exact_top(X, live, Q)
        res["50%"] = {"vibrato": measure_ours(eng, Q, truth), "hnswlib": measure_hnswlib(peer, Q, truth)}
        res["50%"].update(purge_and_measure(eng, Q, truth, args.n))
        print("50% deleted:", res["50%"], flush=True)
        eng.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for pct in ("10%", "50%"):
        for who in ("vibrato", "hnswlib"):
            res[pct][who]["p50_vs_0%"] = round(res[pct][who]["p50_ms"] / res["0%"][who]["p50_ms"], 2)
    (OUT / "bench_deletes.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
