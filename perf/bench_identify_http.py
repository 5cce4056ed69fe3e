"""identify over HTTP against the same call in-process (report, don't assert).

    .venv/bin/python perf/bench_identify_http.py [--rounds 3]

shared/data/audio's frames are ingested and checkpointed into one data dir, which is then copied:
`vibrato serve-v2` serves one copy, an in-process `Engine` opens the other. The data set's 100 noisy
75-frame queries (k=5, ef=100, include_metadata=true) run --rounds times each way, one at a time:
  * in-process: Engine.identify;
  * HTTP, JSON arrays of floats (the contract's form), one keep-alive connection;
  * HTTP, the compact form (base64 of little-endian float32, as vibrato.client sends numpy input).
Prints p50/p99 per way and the HTTP / in-process ratios of the p50s.
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
from benchlib import DATA  # noqa: E402
from vibrato.client import Client, pack_f32  # noqa: E402
from vibrato.engine import Engine  # noqa: E402


def p50_p99(lat):
    lat = sorted(lat)
    return statistics.median(lat) * 1e3, lat[int(0.99 * (len(lat) - 1))] * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    frames = np.load(DATA / "audio" / "frames.npy").astype(np.float32)
    queries = np.load(DATA / "audio" / "queries.npy").astype(np.float32)
    root = Path(tempfile.mkdtemp(prefix="vibrato-identify-"))
    try:
        with Engine.open(root / "a", dim=frames.shape[1], background=False, checkpoint_max_rows=len(frames)) as e:
            for i in range(0, len(frames), 5000):
                e.ingest_batch([{"vector": f, "metadata": {"source_file": f"t{i}.wav"}} for f in frames[i:i + 5000]])
            e.checkpoint()
        shutil.copytree(root / "a", root / "b")
        port = 18000 + int(time.time()) % 1000
        srv = subprocess.Popen([sys.executable, "-m", "vibrato.cli", "serve-v2", "--data-dir", str(root / "a"),
                                "--dim", str(frames.shape[1]), "--host", "127.0.0.1", "--port", str(port),
                                "--bootstrap-admin-key", "true", "--audio-colocated", "false",
                                "--max-body-bytes", str(8 << 20)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            token = srv.stdout.readline().strip().split("=", 1)[1]
            client = Client(f"http://127.0.0.1:{port}", token)
            while True:
                try:
                    if client.health_ready()["ready"]:
                        break
                except OSError:
                    time.sleep(0.1)
            json_bodies = [orjson.dumps({"vectors": q.tolist(), "k": 5, "ef": 100}) for q in queries]
            packed_bodies = [orjson.dumps({"vectors": pack_f32(q), "k": 5, "ef": 100}) for q in queries]
            ways = {"in-process": [], "http json floats": [], "http compact": []}
            with Engine.open(root / "b", dim=frames.shape[1], background=False) as local:
                for _ in range(args.rounds):
                    for i, q in enumerate(queries):
                        t = time.perf_counter()
                        local.identify(q, k=5, ef=100)
                        ways["in-process"].append(time.perf_counter() - t)
                        for name, bodies in (("http json floats", json_bodies), ("http compact", packed_bodies)):
                            t = time.perf_counter()
                            status, _, _ = client.request("POST", "/v2/identify", raw=bodies[i],
                                                          headers={"Content-Type": "application/json"})
                            ways[name].append(time.perf_counter() - t)
                            assert status == 200, status
            base = p50_p99(ways["in-process"])[0]
            print(f"identify, {len(queries)} queries x {args.rounds} rounds, 75 frames, k=5, ef=100, metadata on")
            print("| way | p50 ms | p99 ms | p50 / in-process |\n|---|---:|---:|---:|")
            for name, lat in ways.items():
                p50, p99 = p50_p99(lat)
                print(f"| {name} | {p50:.3f} | {p99:.3f} | {p50 / base:.2f}x |")
            print(f"body size: json {len(json_bodies[0]):,} B, compact {len(packed_bodies[0]):,} B")
        finally:
            srv.terminate()
            srv.wait(60)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
