"""Query latency in process, alone and beside a steady ingest, with the hot tier sampled (issue 13).

    .venv/bin/python perf/bench_hot_ingest.py [--n 50000] [--rate 14000] [--secs 8] [--runs 2]

Per run, on a fresh data dir in /tmp: an Engine with its background threads (checkpoint and
compaction on their own triggers, timers off) loads --n rows of the tiled text set and compacts
them; then one thread queries (k=10, ef=64, no metadata, a 1 ms pause between queries) for --secs
alone, and again while another thread ingests 1,000-row batches at --rate vectors/s. Each second it
prints the hot tier: rows, rows without a graph (scanned exactly by every query), slices, segments.
No HTTP, so what it shows is the engine's share: the cost of fresh rows to a query.
A benchmark: it asserts nothing. Prints p50 / p99 per phase and the medians over --runs.
"""
import argparse
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
from vibrato.engine import Engine  # noqa: E402

BATCH = 1000


def query_phase(eng, Q, secs):
    lat, t0, i = [], time.time(), 0
    while time.time() - t0 < secs:
        a = time.perf_counter()
        eng.query(Q[i % len(Q)], k=10, ef=64, include_metadata=False)
        lat.append(time.perf_counter() - a)
        i += 1
        time.sleep(0.001)
    lat.sort()
    return lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3


def one_run(args, X, Q):
    root = Path(tempfile.mkdtemp(prefix="vibrato-bench-hot-"))
    eng = Engine.open(root / "data", dim=128, background=True, checkpoint_interval_secs=3600,
                      compaction_interval_secs=3600)
    try:
        for j in range(0, args.n, 2 * BATCH):
            eng.ingest_batch([{"vector": X[i], "metadata": {"tags": ["t"]}} for i in range(j, j + 2 * BATCH)])
        while eng.checkpoint()["state"] != "idle":
            pass
        while eng.compact()["state"] != "idle":
            pass
        alone = query_phase(eng, Q, args.secs)
        stop = threading.Event()

        def ingest():
            j, t0 = args.n, time.time()
            while not stop.is_set() and j + BATCH <= X.shape[0]:
                eng.ingest_batch([{"vector": X[i], "metadata": {"tags": ["t"]}} for i in range(j, j + BATCH)])
                j += BATCH
                ahead = (j - args.n) / args.rate - (time.time() - t0)
                if ahead > 0:
                    time.sleep(ahead)
            print(f"  ingested {j - args.n} rows in {time.time() - t0:.1f} s", flush=True)

        def sample():
            while not stop.wait(1.0):
                view = eng.view()
                bare = sum(s.hi - s.lo for s in view.hot.slices if s.chunk.index is None)
                print(f"  hot rows {view.hot.count}, without a graph {bare}, slices {len(view.hot.slices)}, "
                      f"segments {len(view.segments)}", flush=True)

        threads = [threading.Thread(target=ingest), threading.Thread(target=sample)]
        for t in threads:
            t.start()
        try:
            loaded = query_phase(eng, Q, args.secs)
        finally:
            stop.set()
            for t in threads:
                t.join()
    finally:
        eng.close()
        shutil.rmtree(root, ignore_errors=True)
    print(f"alone p50 / p99 {alone[0]:.3f} / {alone[1]:.3f} ms; under ingest {loaded[0]:.3f} / {loaded[1]:.3f} ms",
          flush=True)
    return alone, loaded


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--rate", type=int, default=14_000, help="ingest vectors/s in the loaded phase")
    p.add_argument("--secs", type=float, default=8.0)
    p.add_argument("--runs", type=int, default=2)
    args = p.parse_args()
    X = vectors(args.n + int(args.rate * args.secs * 1.5) + BATCH)
    Q = vectors(200, seed=7)
    runs = [one_run(args, X, Q) for _ in range(args.runs)]
    med = [statistics.median(r[phase][i] for r in runs) for phase in (0, 1) for i in (0, 1)]
    print(f"medians over {args.runs} runs: alone p50 / p99 {med[0]:.3f} / {med[1]:.3f} ms, "
          f"under ingest {med[2]:.3f} / {med[3]:.3f} ms ({med[3] / med[1]:.1f}x the p99 alone)")


if __name__ == "__main__":
    main()
