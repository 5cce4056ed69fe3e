"""Canary + rollback drill (CONTRACT.md §6, runbook §13), driven by scripts/ops/canary_rollback_drill.sh.

1. Data dir: DATA_DIR if set (an operator's; no server may be running on it), else a temp dir seeded
   with VIBRATO_CANARY_SEED_ROWS (5000) vectors through a real server (checkpointed, plus a 10% WAL
   tail that stays in the hot tier).
2. Pre-canary snapshot: `vibrato snapshot-create`; then a fingerprint of the data with the server
   stopped (engine opened offline): total/next id, and the exact vector bytes and metadata of
   VIBRATO_CANARY_SAMPLE (200) sampled ids.
3. Canary: `vibrato serve-v2` (background checkpoints/compactions every few seconds) with real
   traffic for VIBRATO_CANARY_SECS (30): single and batch ingests with fresh keys, filtered queries,
   identify, admin checkpoints.
4. SLOs from /v2/metrics (deltas over the canary window): 5xx rate <= VIBRATO_CANARY_MAX_ERROR_RATE
   (0.001), query p99 from the per-route latency histogram <= VIBRATO_CANARY_MAX_QUERY_P99_MS (250);
   integrity from /v2/admin/stats: ready, no failed segments, nothing quarantined, total_vectors ==
   pre-canary total + vectors the canary created.
5. Rollback: SIGTERM (exit 0), `vibrato snapshot-restore`, restart, then verify the data equals the
   snapshot: total and next id equal, no canary id is served, sampled vectors found by self-query with
   their metadata; server stopped again and the offline fingerprint compared byte for byte.
Exit 0 only when every step and check passes; each miss is printed.
"""
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "gates"))
from gatelib import GateServer, create_key, env_float, env_int, free_port, run_cli  # noqa: E402

from vibrato.client import VibratoHTTPError  # noqa: E402

CANARY_SECS = env_float("VIBRATO_CANARY_SECS", 30)
SEED_ROWS = env_int("VIBRATO_CANARY_SEED_ROWS", 5000)
SAMPLE = env_int("VIBRATO_CANARY_SAMPLE", 200)
MAX_ERROR_RATE = env_float("VIBRATO_CANARY_MAX_ERROR_RATE", 0.001)
MAX_QUERY_P99_MS = env_float("VIBRATO_CANARY_MAX_QUERY_P99_MS", 250)
COLLECTION = os.environ.get("COLLECTION", "default")
PORT = env_int("PORT", 0) or None
DIM_DEFAULT = env_int("VIBRATO_CANARY_DIM", 16)

misses: list[str] = []


def check(ok: bool, what: str):
    print(f"[canary] {'ok  ' if ok else 'MISS'} {what}", flush=True)
    if not ok:
        misses.append(what)


def collection_dim(data_dir: Path) -> int:
    from vibrato.catalog import collections
    from vibrato.catalog.connection import open_reader
    conn = open_reader(str(data_dir / "catalog.sqlite3"), busy_timeout_ms=5000)
    try:
        return collections.get(conn, COLLECTION)["dim"]
    finally:
        conn.close()


def fingerprint(data_dir: Path, dim: int, ids=None) -> dict:
    """Exact state read offline (the engine takes the data-dir lock, so no server may run)."""
    from vibrato.engine import Engine
    eng = Engine.open(data_dir, collection=COLLECTION, dim=dim, background=False)
    try:
        st = eng.stats()
        if ids is None:
            top = st["next_id"]
            ids = sorted(random.Random(7).sample(range(top), min(SAMPLE, top))) if top else []
        view = eng.view()
        arr = np.asarray(ids, dtype=np.int64)
        vecs, found = view.vectors_for(arr, "all") if len(arr) else (np.zeros((0, dim), np.float32), [])
        rows = {}
        for i, vid in enumerate(ids):
            if found[i]:
                rows[vid] = (np.ascontiguousarray(vecs[i]).tobytes(), view.metadata(vid))
        return {"total": st["total_vectors"], "next_id": st["next_id"], "ids": list(ids), "rows": rows}
    finally:
        eng.close()


def seed_data_dir(data: Path, token: str, dim: int):
    srv = GateServer(data, dim=dim, port=free_port(), log_dir=data.parent)
    try:
        srv.wait_ready()
        c = srv.client(token, timeout=120)
        rng = np.random.default_rng(2024)
        n_seg = SEED_ROWS - SEED_ROWS // 10
        for start in range(0, SEED_ROWS, 500):
            n = min(500, SEED_ROWS - start)
            X = rng.standard_normal((n, dim)).astype(np.float32)
            X /= np.linalg.norm(X, axis=1, keepdims=True)
            c.ingest_batch([{"vector": X[i], "metadata": {"source_file": f"track_{(start + i) // 100}.wav",
                                                           "start_time_ms": ((start + i) % 100) * 20, "duration_ms": 20,
                                                           "bpm": 100 + (start + i) % 40, "tags": ["seed", f"g{i % 4}"]},
                             "idempotency_key": f"seed-{start + i}"} for i in range(n)])
            if start + n == n_seg:
                c.checkpoint()
        assert srv.terminate() == 0, "seeding server did not shut down cleanly"
    finally:
        srv.stop()


class Traffic:
    def __init__(self, srv, token, dim, secs):
        self.srv, self.token, self.dim, self.secs = srv, token, dim, secs
        self.created = 0
        self.canary_vectors = []
        self.client_errors = []
        self.requests = 0
        self.lock = threading.Lock()

    def run_worker(self, w):
        c = self.srv.client(self.token, timeout=30)
        rnd = random.Random(w)
        rng = np.random.default_rng([99, w])
        deadline = time.monotonic() + self.secs
        i = 0
        while time.monotonic() < deadline:
            i += 1
            roll = rnd.randrange(100)
            try:
                if roll < 25:
                    v = rng.standard_normal(self.dim).astype(np.float32)
                    vid, created = c.ingest(v, {"source_file": "canary.wav", "tags": ["canary"]}, f"canary-{w}-{i}")
                    with self.lock:
                        self.created += created
                        self.canary_vectors.append((vid, v))
                elif roll < 35:
                    X = rng.standard_normal((20, self.dim)).astype(np.float32)
                    res = c.ingest_batch([{"vector": X[j], "metadata": {"tags": ["canary", "batch"]},
                                           "idempotency_key": f"canary-b-{w}-{i}-{j}"} for j in range(20)])
                    with self.lock:
                        self.created += sum(cr for _, cr in res)
                elif roll < 85:
                    q = rng.standard_normal(self.dim).astype(np.float32)
                    flt = [None, {"tags_any": ["seed"]}, {"bpm_gte": 110, "bpm_lte": 120}][rnd.randrange(3)]
                    c.query(q, k=10, ef=64, filter=flt, search_tier="all")
                elif roll < 98:
                    c.identify(rng.standard_normal((8, self.dim)).astype(np.float32), k=3)
                else:
                    c.checkpoint()
                with self.lock:
                    self.requests += 1
            except (OSError, VibratoHTTPError) as exc:
                with self.lock:
                    self.client_errors.append(repr(exc))
            time.sleep(0.002)


def parse_metrics(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        try:
            out[name_labels] = float(value)
        except ValueError:
            pass
    return out


def delta(after: dict, before: dict, prefix: str) -> dict:
    return {k: after[k] - before.get(k, 0.0) for k in after if k.startswith(prefix)}


def quantile_from_buckets(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus-style histogram_quantile over cumulative (le, count) pairs (linear within a bucket)."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return 0.0
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / max(1e-12, c - prev_c))
        prev_le, prev_c = le, c
    return prev_le


def slo_check(before: dict, after: dict):
    reqs = delta(after, before, "vibrato_http_requests_total{")
    total = sum(reqs.values())
    errors = sum(v for k, v in reqs.items() if 'status="5' in k)
    rate = errors / total if total else 1.0
    check(total > 0, f"canary served requests (HTTP requests in window: {total:.0f})")
    check(rate <= MAX_ERROR_RATE, f"5xx error rate {rate:.5f} <= {MAX_ERROR_RATE} ({errors:.0f} of {total:.0f})")
    hist = delta(after, before, "vibrato_http_request_duration_seconds_bucket{")
    buckets = []
    for k, v in hist.items():
        if 'route="/v2/query"' in k:
            le = k.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), v))
    p99_ms = quantile_from_buckets(buckets, 0.99) * 1000
    check(bool(buckets), "per-route latency histogram for /v2/query present")
    check(p99_ms <= MAX_QUERY_P99_MS, f"query p99 {p99_ms:.1f} ms (histogram) <= {MAX_QUERY_P99_MS} ms")
    return rate, p99_ms


def main() -> int:
    given = os.environ.get("DATA_DIR")
    work = Path(tempfile.mkdtemp(prefix="vibrato-canary-"))
    data = Path(given).resolve() if given else work / "data"
    print(f"[canary] data dir {data} ({'given' if given else 'seeded'}); canary {CANARY_SECS:g}s; logs in {work}")
    token = create_key(data, "canary-drill")
    if not given:
        seed_data_dir(data, token, DIM_DEFAULT)
    dim = collection_dim(data)

    # 2. snapshot + fingerprint (server stopped)
    snap = run_cli("snapshot-create", "--data-dir", data, "--collection", COLLECTION)
    snap_dir = snap["snapshot_dir"]
    print(f"[canary] snapshot {snap['snapshot_id']} at {snap_dir} ({snap['segments']} segments)")
    before = fingerprint(data, dim)
    print(f"[canary] pre-canary: total_vectors={before['total']} next_id={before['next_id']} "
          f"sampled={len(before['rows'])}")

    # 3. canary with traffic
    port = PORT or free_port()
    srv = GateServer(data, dim=dim, port=port, log_dir=work, checkpoint_secs=5, compaction_secs=10,
                     log_level="warning")
    try:
        srv.wait_ready(timeout=300)
        admin = srv.client(token, timeout=60)
        m0 = parse_metrics(admin.metrics())
        traffic = Traffic(srv, token, dim, CANARY_SECS)
        threads = [threading.Thread(target=traffic.run_worker, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        m1 = parse_metrics(admin.metrics())
        print(f"[canary] traffic: {traffic.requests} requests, {traffic.created} vectors created, "
              f"{len(traffic.client_errors)} client errors")
        check(not traffic.client_errors, f"no client-side errors ({traffic.client_errors[:3]})")
        # 4. SLOs and integrity
        slo_check(m0, m1)
        st = admin.stats()
        check(st["ready"] is True, "stats.ready is true")
        check(st["failed_segments"] == 0, f"no failed segments ({st['failed_segments']})")
        check(st["quarantine_files"] == 0, f"nothing quarantined ({st['quarantine_files']})")
        check(st["total_vectors"] == before["total"] + traffic.created,
              f"total_vectors {st['total_vectors']} == pre-canary {before['total']} + created {traffic.created}")
        # 5. rollback
        rc = srv.terminate(timeout=120)
        check(rc == 0, f"canary stopped with SIGTERM, exit code {rc}")
    finally:
        srv.stop()
    print("[canary] rollback: snapshot-restore")
    out = run_cli("snapshot-restore", "--data-dir", data, "--snapshot-dir", snap_dir, check=False)
    check(out["_returncode"] == 0 and out.get("restored_snapshot"),
          f"vibrato snapshot-restore exit {out['_returncode']} {out.get('_stderr', '').strip()[:300]}")
    srv = GateServer(data, dim=dim, port=port, log_dir=work, log_level="warning")
    try:
        srv.wait_ready(timeout=300)
        c = srv.client(token, timeout=60)
        st = c.stats()
        check(st["total_vectors"] == before["total"],
              f"after restore total_vectors {st['total_vectors']} == snapshot {before['total']}")
        check(st["next_id"] == before["next_id"], f"after restore next_id {st['next_id']} == snapshot {before['next_id']}")
        served = 0
        for vid, v in traffic.canary_vectors[:100]:
            res = c.query(v, k=5, ef=128, search_tier="all", include_metadata=False)["results"]
            served += any(r["id"] == vid for r in res)
        check(served == 0, f"no canary-written vector is served after the rollback ({served} found)")
        missing = 0
        for vid, (vbytes, meta) in before["rows"].items():
            v = np.frombuffer(vbytes, dtype=np.float32)
            res = c.query(v, k=10, ef=256, search_tier="all", include_metadata=True)["results"]
            hit = next((r for r in res if r["id"] == vid), None)
            if hit is None or hit["metadata"]["source_file"] != meta["source_file"] or \
                    hit["metadata"]["tags"] != list(meta["tags"]):
                missing += 1
        check(missing == 0, f"sampled vectors found by self-query with their metadata ({missing} of "
                            f"{len(before['rows'])} missing or different)")
        rc = srv.terminate(timeout=120)
        check(rc == 0, f"restored server stopped with SIGTERM, exit code {rc}")
    finally:
        srv.stop()
    after = fingerprint(data, dim, before["ids"])
    check(after["total"] == before["total"] and after["next_id"] == before["next_id"],
          "offline fingerprint: counts equal the snapshot")
    check(after["rows"] == before["rows"], f"offline fingerprint: {len(before['rows'])} sampled vectors and "
                                           f"metadata equal the snapshot byte for byte")
    if misses:
        print(f"[canary] FAILED: {len(misses)} check(s) missed; logs and data in {work}")
        for m in misses:
            print(f"[canary]   - {m}")
        return 1
    print(f"[canary] drill passed: snapshot {snap['snapshot_id']} restored and verified")
    if not given and os.environ.get("VIBRATO_GATE_KEEP") != "1":
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
