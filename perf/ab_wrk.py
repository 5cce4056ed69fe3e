"""A/B two checkouts' HTTP query path under wrk, both servers up at once (report, don't assert).

    .venv/bin/python perf/ab_wrk.py OLD_CHECKOUT NEW_CHECKOUT [--workers 1] [--rounds 6] [--secs 5]
    .venv/bin/python perf/ab_wrk.py . . --old-args "--idle-spin-us 0"     # a flag's A/B on one checkout

Each checkout needs its native modules built (`make install`, or `setup.py build_ext --inplace` in
a git worktree); this machine's .venv runs both, each with PYTHONPATH set to its checkout. Both
servers get the same rows (perf/bench_http.py's 100k set, checkpointed and compacted as in
perf/bench_wrk.py) and stay up; `wrk -t2 -c16` runs then alternate between them (A B, B A, ...), so
drift on the machine hits both alike, which separate bench_wrk runs minutes apart do not on this
noisy 2-core machine. The rows are loaded once (by the old checkout) and each server serves its own
copy of that data dir, so both walk the same graph; each server runs from its checkout's directory
(`python -m` puts the working directory first on sys.path: before this, both servers of a checkout
A/B run from /work/main ran the new code). Prints each run and the medians of requests/s, server CPU per request (the
whole process tree, /proc) and wrk's p50 / p99, with the ratio new/old.
"""
import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_http as H  # noqa: E402
import bench_wrk as W  # noqa: E402


class _LoadArgs:
    batch = 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--workers", type=int, default=1, help="--query-workers of both servers")
    ap.add_argument("--rounds", type=int, default=6, help="wrk runs per server")
    ap.add_argument("--secs", type=float, default=5.0, help="seconds per wrk run")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--old-args", default="", help="extra serve-v2 flags of the old server (a config A/B: "
                                                     "give the same checkout twice)")
    ap.add_argument("--new-args", default="", help="extra serve-v2 flags of the new server")
    args = ap.parse_args()
    wrk = W.ensure_wrk()
    x, queries = H.load_vectors(args.n)
    queries = queries[:200]
    truth = H.exact_top10(x, queries)
    servers, runs = {}, {"old": [], "new": []}
    try:
        # One data dir, loaded by the old checkout, then copied: both serve the same segment files
        # (two graph builds differ, and with them the walks' cost).
        loaded = Path(tempfile.mkdtemp(prefix="ab_wrk_load_"))
        first = W.Vibrato(loaded, args.workers, checkout=os.path.abspath(args.old))
        os.environ["PYTHONPATH"] = os.path.abspath(args.old)
        try:
            first.start()
            print("loaded", asyncio.run(W.load(first, x, queries, truth, _LoadArgs)), flush=True)
        finally:
            first.stop()
        for name, tree in (("old", args.old), ("new", args.new)):
            tmp = Path(tempfile.mkdtemp(prefix=f"ab_wrk_{name}_"))
            shutil.copytree(loaded / "vibrato", tmp / "vibrato", symlinks=True,
                            ignore=shutil.ignore_patterns("*.sock"))  # the stopped server's sockets
            os.environ["PYTHONPATH"] = os.path.abspath(tree)  # the server process runs this checkout
            os.environ["VIBRATO_BENCH_SERVER_ARGS"] = args.old_args if name == "old" else args.new_args
            server = W.Vibrato(tmp, args.workers, checkout=os.path.abspath(tree))
            servers[name] = (server, tmp)
            server.start(first.headers)
        shutil.rmtree(loaded, ignore_errors=True)
        for r in range(args.rounds):
            for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
                server, tmp = servers[name]
                script = W.lua_script(server.query_path, dict(server.headers), [server.query_body(q) for q in queries])
                res = W.run_wrk(wrk, server.url, script, 2 if args.conns > 1 else 1, args.conns, args.secs,
                                server.proc.pid, tmp)
                runs[name].append(res)
                print(name, r, {k: round(v, 3) for k, v in res.items()}, flush=True)
    finally:
        for server, tmp in servers.values():
            server.stop()
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nmedians of {args.rounds} runs each (--query-workers {args.workers}, n={args.n}, wrk -c{args.conns})")
    for key in ("req_per_s", "cpu_us_per_req", "p50_ms", "p99_ms"):
        a = statistics.median(r[key] for r in runs["old"])
        b = statistics.median(r[key] for r in runs["new"])
        print(f"{key}: old {a:.3f}  new {b:.3f}  new/old {b / a:.3f}")


if __name__ == "__main__":
    main()
