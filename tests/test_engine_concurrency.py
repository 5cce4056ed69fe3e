"""Concurrency: ingest and query threads while checkpoint and compaction run.

Every acknowledged write must be visible to the next query that starts after the acknowledgement
(read-your-writes, CONTRACT.md D5), whatever tier it is in at that moment; ids stay dense; counts agree.
"""
import threading

import numpy as np

from enginetools import churning
from vibrato.engine import Engine

DIM = 32


def test_read_your_writes_during_checkpoint_and_compaction(tmp_path):
    eng = Engine.open(tmp_path / "d", dim=DIM, background=False, checkpoint_max_rows=200, hot_exact_rows=64)
    errors = []
    acked = {}
    lock = threading.Lock()

    def writer(w):
        rng = np.random.default_rng(w)
        try:
            for i in range(150):
                if rng.random() < 0.3:
                    items = [{"vector": rng.standard_normal(DIM).astype(np.float32),
                              "metadata": {"tags": [f"w{w}"], "bpm": float(i)}} for _ in range(5)]
                    res = eng.ingest_batch(items)
                    pairs = [(vid, it["vector"]) for (vid, created), it in zip(res, items)]
                else:
                    v = rng.standard_normal(DIM).astype(np.float32)
                    vid, created = eng.ingest(v, {"tags": [f"w{w}"]})
                    pairs = [(vid, v)]
                # read-your-writes: the very next query finds every id just acknowledged
                for vid, v in pairs:
                    res = eng.query(v, k=5, ef=128, search_tier="all", include_metadata=False)
                    if vid not in [r["id"] for r in res]:
                        errors.append(f"acked id {vid} not visible to the next query")
                with lock:
                    acked.update(pairs)
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    writers = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    with churning(eng) as maintenance_errors:
        for t in writers:
            t.start()
        for t in writers:
            t.join()
    assert not errors and not maintenance_errors, (errors + maintenance_errors)[:5]
    ids = sorted(acked)
    assert ids == list(range(len(ids))), "ids must be dense from 0"
    assert eng.stats()["total_vectors"] == len(ids)
    rng = np.random.default_rng(99)
    for vid in rng.choice(ids, 50, replace=False).tolist():
        res = eng.query(acked[vid], k=3, ef=128, search_tier="all", include_metadata=False)
        assert vid in [r["id"] for r in res]
    eng.close()
    eng = Engine.open(tmp_path / "d", dim=DIM, background=False)
    assert eng.stats()["total_vectors"] == len(ids)
    eng.close()


def test_background_loops_checkpoint_and_compact(tmp_path):
    eng = Engine.open(tmp_path / "d", dim=8, checkpoint_interval_secs=1, compaction_interval_secs=1,
                      checkpoint_max_rows=50, audio_colocated=False)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 8)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)  # unit rows: each row is its own best inner product
    for i in range(0, 400, 25):
        eng.ingest_batch([{"vector": v} for v in X[i:i + 25]])
    import time
    deadline = time.time() + 30
    while time.time() < deadline:
        st = eng.stats()
        if st["wal_pending"] == 0 and st["compaction_total"] > 0:
            break
        time.sleep(0.2)
    st = eng.stats()
    assert st["wal_pending"] == 0 and st["checkpoint_total"] > 0 and st["compaction_total"] > 0
    assert st["total_vectors"] == 400
    for i in (0, 199, 399):
        assert eng.query(X[i], k=1, ef=64, search_tier="all")[0]["id"] == i
    eng.close()
