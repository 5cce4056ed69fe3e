"""Mixed-workload soak gate (CONTRACT.md §6, runbook §12) against the real `vibrato serve-v2`.

Workers share one paced schedule of operations at VIBRATO_SOAK_TARGET_OPS_PER_SEC. Each operation
rolls 0..99 from (seed, op index): < 60 single ingest with a unique idempotency key (201 required),
< 90 query of a previously ingested vector (200), < 97 POST /v2/admin/checkpoint (200), else
POST /v2/admin/compact (200). The server also runs its own background checkpoints (15 s) and
compactions (60 s). Every 200 operations an unauthenticated /v2/health/ready must answer 200.

Before the clock starts the store is preloaded with VIBRATO_SOAK_PRELOAD (50,000) vectors in batches
and checkpointed, so caches that are bounded by design (SQLite's 64 MB page cache, the hot tier's
first chunk) are warm; RSS and fd baselines are the first sample taken after VIBRATO_SOAK_WARMUP_SECS
of mixed load: 60 s as in v2.1's soak (whose first sample comes one 60 s interval in, CONTRACT.md R6),
or a third of a shorter run. Without that, a 90 s soak starting from an empty 60 MB process measures cache
warm-up, not leaks.

Every sample interval the harness records the server's RSS (VmRSS and RssAnon) and open fds, summed
over its processes (the writer and its query workers),
`tmp/*.vdb.tmp` files, the catalog's SQLite -wal size, active segments (from /v2/admin/stats),
achieved ops/s and query p50/p99. At the end (after the load stops and background jobs are idle) it
asserts:
* RSS growth (max - baseline) / baseline <= VIBRATO_SOAK_MAX_RSS_GROWTH_PCT (35) with >= 4 samples;
* open fds <= first + VIBRATO_SOAK_MAX_FD_GROWTH (256);
* temp segment files <= VIBRATO_SOAK_MAX_TMP_VDB_FILES (8) at every sample and 0 once idle;
* SQLite -wal <= VIBRATO_SOAK_MAX_SQLITE_WAL_BYTES (64 MiB, the server's TRUNCATE threshold);
* active segments <= VIBRATO_SOAK_MAX_ACTIVE_SEGMENTS (64; 0 disables) at every sample (CONTRACT.md D24:
  "segment count stays bounded");
* exact counts: total_vectors == acknowledged ingests, ids dense 0..n-1, sampled ingested vectors
  found by a self-query, no operation failed.
Samples go to a CSV and a PNG plot in VIBRATO_SOAK_OUT (default perf/results/soak).
"""
import csv
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gatelib import (REPO, GateServer, WorkDir, create_key, env_float, env_int, percentile, sqlite_wal_bytes,
                     tmp_segment_files)
from vibrato.client import Client, VibratoHTTPError

DIM = 16
SECS = env_int("VIBRATO_SOAK_SECS", 90)
SEED = env_int("VIBRATO_SOAK_SEED", 42)
SAMPLE_SECS = max(1, env_int("VIBRATO_SOAK_SAMPLE_INTERVAL_SECS", max(1, min(60, SECS // 30))))
TARGET_OPS = env_float("VIBRATO_SOAK_TARGET_OPS_PER_SEC", 500)
MAX_RSS_GROWTH_PCT = env_float("VIBRATO_SOAK_MAX_RSS_GROWTH_PCT", 35.0)
MAX_FD_GROWTH = env_int("VIBRATO_SOAK_MAX_FD_GROWTH", 256)
MAX_TMP_VDB = env_int("VIBRATO_SOAK_MAX_TMP_VDB_FILES", 8)
MAX_SQLITE_WAL = env_int("VIBRATO_SOAK_MAX_SQLITE_WAL_BYTES", 64 * 1024 * 1024)
WORKERS = env_int("VIBRATO_SOAK_WORKERS", 4)
PRELOAD = env_int("VIBRATO_SOAK_PRELOAD", 50_000)
WARMUP_SECS = env_float("VIBRATO_SOAK_WARMUP_SECS", max(5.0, min(60.0, SECS / 3)))
MAX_ACTIVE_SEGMENTS = env_int("VIBRATO_SOAK_MAX_ACTIVE_SEGMENTS", 64)
OUT = Path(os.environ.get("VIBRATO_SOAK_OUT", REPO / "perf" / "results" / "soak"))


def vec(op: int) -> np.ndarray:
    v = np.random.default_rng([SEED, op]).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


class Soak:
    def __init__(self, srv: GateServer, token: str):
        self.srv, self.token = srv, token
        self.lock = threading.Lock()
        self.next_op = 0
        self.t0 = time.monotonic()
        self.deadline = self.t0 + SECS
        self.ingested = {}          # op -> id (acknowledged, created)
        self.ingested_ops = []      # ops in ack order (query targets)
        self.counts = {"ingest": 0, "query": 0, "checkpoint": 0, "compact": 0, "ready": 0}
        self.latencies = []         # (t, seconds) of queries, for the per-interval percentiles
        self.failures = []
        self.schedule_base = self.t0
        self.schedule_ops = 0

    def claim(self):
        """The next op index and its scheduled start (paced; a lag over 1 s is forgiven, not burst)."""
        with self.lock:
            op = self.next_op
            self.next_op += 1
            now = time.monotonic()
            due = self.schedule_base + (op - self.schedule_ops) / TARGET_OPS
            if now - due > 1.0:
                self.schedule_base, self.schedule_ops = now, op
                due = now
            return op, due

    def worker(self, w: int):
        c = Client(self.srv.url, self.token, timeout=60)
        anon = Client(self.srv.url, None, timeout=10)
        while not self.failures:
            op, due = self.claim()
            if due >= self.deadline:
                return
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            roll = random.Random(SEED * 1_000_003 + op).randrange(100)
            try:
                if roll < 60:
                    vid, created = c.ingest(vec(op), {"source_file": f"soak_{op}.wav", "start_time_ms": op,
                                                      "duration_ms": 20, "bpm": 120 + op % 20,
                                                      "tags": ["soak", "mixed"]}, f"soak-{SEED}-{op}")
                    if not created:
                        raise AssertionError(f"op {op}: fresh key answered created=false (id {vid})")
                    with self.lock:
                        self.ingested[op] = vid
                        self.ingested_ops.append(op)
                        self.counts["ingest"] += 1
                elif roll < 90:
                    with self.lock:
                        n = len(self.ingested_ops)
                        target = self.ingested_ops[random.Random(op).randrange(n)] if n else None
                    if target is None:
                        continue
                    t = time.perf_counter()
                    c.query(vec(target), k=10, ef=50, include_metadata=True)
                    dt = time.perf_counter() - t
                    with self.lock:
                        self.latencies.append((time.monotonic(), dt))
                        self.counts["query"] += 1
                elif roll < 97:
                    c.checkpoint()
                    with self.lock:
                        self.counts["checkpoint"] += 1
                else:
                    c.compact()
                    with self.lock:
                        self.counts["compact"] += 1
                if op % 200 == 0:
                    status, _, raw = anon.request("GET", "/v2/health/ready", auth=False)
                    if status != 200:
                        raise AssertionError(f"op {op}: /v2/health/ready answered {status}: {raw[:200]!r}")
                    with self.lock:
                        self.counts["ready"] += 1
            except (OSError, VibratoHTTPError, AssertionError) as exc:
                with self.lock:
                    self.failures.append(f"op {op} (roll {roll}) at t={time.monotonic() - self.t0:.1f}s: {exc!r}")
                return


def write_plot(rows, png: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = [r["t_s"] for r in rows]
    fig, ax = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    ax[0, 0].plot(t, [r["rss_bytes"] / 2**20 for r in rows], label="VmRSS")
    ax[0, 0].plot(t, [r["rss_anon_bytes"] / 2**20 for r in rows], label="RssAnon")
    ax[0, 0].set_ylabel("MiB"), ax[0, 0].legend(), ax[0, 0].set_title("server memory")
    ax[0, 1].plot(t, [r["open_fds"] for r in rows], label="open fds")
    ax[0, 1].plot(t, [r["tmp_vdb_files"] for r in rows], label="tmp/*.vdb.tmp")
    ax[0, 1].legend(), ax[0, 1].set_title("fds and temp segment files")
    ax[1, 0].plot(t, [r["sqlite_wal_bytes"] / 2**20 for r in rows], label="sqlite -wal MiB")
    ax3 = ax[1, 0].twinx()
    ax3.plot(t, [r["active_segments"] for r in rows], color="tab:green", label="active segments")
    ax3.set_ylabel("active segments")
    ax[1, 0].set_ylabel("MiB"), ax[1, 0].set_title("catalog.sqlite3-wal and active segments")
    ax[1, 0].set_xlabel("seconds"), ax[1, 0].legend(loc="upper left"), ax3.legend(loc="lower right")
    ax[1, 1].plot(t, [r["ops_per_s"] for r in rows], label="ops/s")
    ax2 = ax[1, 1].twinx()
    ax2.plot(t, [r["query_p99_ms"] for r in rows], color="tab:red", label="query p99 ms")
    ax2.set_ylabel("query p99 ms")
    ax[1, 1].set_title("throughput and query p99"), ax[1, 1].set_xlabel("seconds"), ax[1, 1].legend(loc="upper left")
    fig.suptitle(f"vibrato soak: {SECS}s, seed {SEED}, target {TARGET_OPS:g} ops/s")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


@pytest.mark.timeout(0)
def test_mixed_workload_soak():
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    csv_path, png_path = OUT / f"soak_{stamp}.csv", OUT / f"soak_{stamp}.png"
    with WorkDir("vibrato-soak-") as work:
        data = work / "data"
        token = create_key(data, "soak")
        srv = GateServer(data, dim=DIM, log_dir=work, checkpoint_secs=15, compaction_secs=60)
        try:
            srv.wait_ready()
            admin = srv.client(token, timeout=300)
            rng = np.random.default_rng([SEED, 7])
            for start in range(0, PRELOAD, 2000):
                n = min(2000, PRELOAD - start)
                X = rng.standard_normal((n, DIM)).astype(np.float32)
                X /= np.linalg.norm(X, axis=1, keepdims=True)
                admin.ingest_batch([{"vector": X[i], "metadata": {"source_file": "preload.wav", "tags": ["preload"]},
                                     "idempotency_key": f"preload-{SEED}-{start + i}"} for i in range(n)])
            if PRELOAD:
                admin.checkpoint()
            soak = Soak(srv, token)
            threads = [threading.Thread(target=soak.worker, args=(w,), daemon=True) for w in range(WORKERS)]
            for t in threads:
                t.start()
            rows = []
            last_ops, last_t = 0, time.monotonic()
            print(f"[soak] {SECS}s at {TARGET_OPS:g} ops/s, {WORKERS} workers, sample every {SAMPLE_SECS}s, "
                  f"seed {SEED}; samples -> {csv_path}", flush=True)
            while any(t.is_alive() for t in threads):
                time.sleep(min(SAMPLE_SECS, max(0.05, soak.deadline - time.monotonic())) if
                           time.monotonic() < soak.deadline else 0.2)
                now = time.monotonic()
                with soak.lock:
                    ops = sum(soak.counts[k] for k in ("ingest", "query", "checkpoint", "compact"))
                    lat = [dt for (ts, dt) in soak.latencies if ts > last_t]
                assert srv.alive(), f"server died during the soak:\n{srv.tail()}"
                row = {"t_s": round(now - soak.t0, 2), "rss_bytes": srv.rss_bytes(), "rss_anon_bytes": srv.rss_anon_bytes(),
                       "open_fds": srv.open_fds(), "tmp_vdb_files": len(tmp_segment_files(data)),
                       "sqlite_wal_bytes": sqlite_wal_bytes(data),
                       "active_segments": admin.stats()["active_segments"], "ops_total": ops,
                       "ops_per_s": round((ops - last_ops) / max(1e-9, now - last_t), 1),
                       "ingested": soak.counts["ingest"],
                       "query_p50_ms": round(percentile(lat, 0.50) * 1000, 3) if lat else 0.0,
                       "query_p99_ms": round(percentile(lat, 0.99) * 1000, 3) if lat else 0.0}
                rows.append(row)
                last_ops, last_t = ops, now
                print("[soak] " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            for t in threads:
                t.join()
            assert not soak.failures, "operations failed during the soak:\n" + "\n".join(soak.failures[:20])

            # Idle: wait until no checkpoint/compaction is in flight, then check temp files and counts.
            c = srv.client(token, timeout=120)
            for _ in range(600):
                st = c.stats()
                if st["checkpoint_jobs_inflight"] == 0 and st["compaction_jobs_inflight"] == 0:
                    break
                time.sleep(0.1)
            leftovers = tmp_segment_files(data)
            with open(csv_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            write_plot(rows, png_path)
            print(f"[soak] wrote {csv_path} and {png_path}")

            elapsed = time.monotonic() - soak.t0
            total_ops = rows[-1]["ops_total"]
            steady = [r for r in rows if r["t_s"] >= WARMUP_SECS] or rows[-1:]
            first, peak_rss = steady[0]["rss_bytes"], max(r["rss_bytes"] for r in steady)
            growth = (peak_rss - first) / first * 100.0
            fd_first, fd_peak = steady[0]["open_fds"], max(r["open_fds"] for r in steady)
            seg_peak = max(r["active_segments"] for r in rows)
            wal_peak = max(r["sqlite_wal_bytes"] for r in rows)
            tmp_peak = max(r["tmp_vdb_files"] for r in rows)
            print(f"[soak] summary: ops={total_ops} ({total_ops / elapsed:.0f}/s of {TARGET_OPS:g} target) "
                  f"counts={soak.counts} rss_first={first / 2**20:.1f}MiB rss_peak={peak_rss / 2**20:.1f}MiB "
                  f"growth={growth:.1f}% fds {fd_first}->{fd_peak} sqlite_wal_peak={wal_peak} tmp_peak={tmp_peak} "
                  f"leftover_tmp={len(leftovers)} active_segments_peak={seg_peak} samples={len(rows)} "
                  f"(baseline at t={steady[0]['t_s']}s)")
            if len(steady) >= 4:
                assert growth <= MAX_RSS_GROWTH_PCT, \
                    f"RSS grew {growth:.1f}% ({first} -> {peak_rss} bytes), limit {MAX_RSS_GROWTH_PCT}%"
                assert fd_peak <= fd_first + MAX_FD_GROWTH, f"open fds {fd_first} -> {fd_peak}, limit +{MAX_FD_GROWTH}"
            assert tmp_peak <= MAX_TMP_VDB, f"{tmp_peak} temp segment files at once, limit {MAX_TMP_VDB}"
            assert not leftovers, f"temp segment files left once idle: {leftovers}"
            assert wal_peak <= MAX_SQLITE_WAL, f"SQLite -wal reached {wal_peak} bytes, limit {MAX_SQLITE_WAL}"
            if MAX_ACTIVE_SEGMENTS:
                assert seg_peak <= MAX_ACTIVE_SEGMENTS, \
                    (f"active segments reached {seg_peak}, limit {MAX_ACTIVE_SEGMENTS}: the segment count is not "
                     f"bounded (CONTRACT.md D24); segments by level now: {c.stats()['segments_by_level']}")

            st = c.stats()
            n = len(soak.ingested)
            assert st["total_vectors"] == PRELOAD + n, \
                f"total_vectors {st['total_vectors']} != {PRELOAD} preloaded + {n} acknowledged ingests"
            assert sorted(soak.ingested.values()) == list(range(PRELOAD, PRELOAD + n)), \
                "ingest ids are not dense after the preload"
            rnd = random.Random(SEED)
            sample = rnd.sample(sorted(soak.ingested), min(200, n))
            for op in sample:
                ids = [r["id"] for r in c.query(vec(op), k=10, ef=128, search_tier="all",
                                                include_metadata=False)["results"]]
                assert soak.ingested[op] in ids, f"ingested op {op} (id {soak.ingested[op]}) not found: {ids}"
            assert srv.terminate() == 0, f"graceful shutdown failed:\n{srv.tail()}"
        except BaseException:
            print(f"[soak] FAILED; server logs:\n{srv.tail(20)}")
            raise
        finally:
            srv.stop()
