"""Randomised model test: a pure-Python reference model against the real engine.

Hundreds of seeded operation sequences (ingest, batch with duplicate keys, conflicting keys,
filtered queries, deletes by id, by track and by filter, purge, checkpoint, compact, close + reopen)
on real SQLite and real segment files.
After every step the engine must agree with the model on ids, created flags, filter semantics,
metadata and counts, and the brute-force best match of every query must be returned.
VIBRATO_MODEL_SEEDS / VIBRATO_MODEL_OPS scale it (CI-sized defaults).
"""
import os

import numpy as np
import pytest

from vibrato.engine import Engine
from vibrato.errors import ConflictError

SEEDS = int(os.environ.get("VIBRATO_MODEL_SEEDS", "200"))
LONG_SEEDS = int(os.environ.get("VIBRATO_MODEL_LONG_SEEDS", "3"))
OPS = max(10, int(os.environ.get("VIBRATO_MODEL_OPS", "90")))
DIM = 16
TAG_POOL = ["drums", "kick", "snare", "hihat", "bass", "pad", "vocal", "fx"]


class Model:
    def __init__(self):
        self.rows = []          # index = id: (vector, metadata)
        self.keys = {}          # key -> (id, payload)
        self.deleted = set()    # deleted ids: a retried key answers its id, created=False, still deleted

    def live(self):
        return [i for i in range(len(self.rows)) if i not in self.deleted]

    def delete(self, ids) -> int:
        new = {i for i in ids if 0 <= i < len(self.rows)} - self.deleted
        self.deleted |= new
        return len(new)

    def ingest(self, vector, meta, key):
        payload = (vector.tobytes(), tuple(sorted(meta.items(), key=lambda kv: kv[0])))
        if key is not None and key in self.keys:
            vid, old = self.keys[key]
            if old != payload:
                return "conflict"
            return vid, False
        vid = len(self.rows)
        self.rows.append((vector, meta))
        if key is not None:
            self.keys[key] = (vid, payload)
        return vid, True

    def batch(self, items):
        snapshot = (list(self.rows), dict(self.keys))
        out = []
        for v, m, k in items:
            r = self.ingest(v, m, k)
            if r == "conflict":
                self.rows, self.keys = snapshot
                return "conflict"
            out.append(r)
        return out

    def matches(self, vid, flt):
        meta = self.rows[vid][1]
        tags = set(meta["tags"])
        if flt is None:
            return True
        if "tags_all" in flt and not set(flt["tags_all"]) <= tags:
            return False
        if "tags_any" in flt and not tags & set(flt["tags_any"]):
            return False
        if flt.get("bpm_gte") is not None and meta["bpm"] < flt["bpm_gte"]:
            return False
        if flt.get("bpm_lte") is not None and meta["bpm"] > flt["bpm_lte"]:
            return False
        return True


def norm_meta(meta):
    return {**meta, "tags": sorted({t.strip().lower() for t in meta["tags"] if t.strip()}),
            "bpm": float(np.float32(meta["bpm"]))}


def gen_meta(rng, step):
    tags = list(rng.choice(TAG_POOL, size=int(rng.integers(1, 3)), replace=False))
    if rng.random() < 0.3:
        tags = [t.upper() + "  " for t in tags]
    return {"source_file": f"prop_{step}.wav", "start_time_ms": step * 5, "duration_ms": 80,
            "bpm": 70 + int(rng.integers(0, 160)) * 0.5, "tags": tags}


def gen_key(rng, step):
    c = int(rng.integers(0, 5))
    if c == 0:
        return None
    if c in (1, 2):
        return f"shared-{int(rng.integers(0, 24))}"
    return f"unique-{step}-{int(rng.integers(0, 1 << 30))}"


def check_query(eng, model, rng):
    if not model.live():
        assert eng.query(model.rows[0][0], k=5, ef=64, search_tier="all") == []
        return
    target = int(rng.choice(model.live()))
    vec, meta = model.rows[target]
    mode = int(rng.integers(0, 5))
    flt = None
    if mode == 1:
        flt = {"tags_all": [meta["tags"][0]]}
    elif mode == 2:
        flt = {"tags_any": [meta["tags"][0].upper(), "missing-tag"]}
    elif mode == 3:
        flt = {"bpm_gte": meta["bpm"] - 0.01, "bpm_lte": meta["bpm"] + 0.01}
    elif mode == 4:
        flt = {"tags_all": [meta["tags"][0]], "bpm_gte": meta["bpm"] - 5}
    k = min(len(model.rows), 32)
    tier = ["active", "all"][int(rng.integers(0, 2))]
    res = eng.query(vec, k=k, ef=max(16 * k, 256), filter=flt, search_tier="all", include_metadata=True)
    del tier
    allowed = [i for i in model.live() if model.matches(i, _norm_filter(flt))]
    if not allowed:
        assert res == []
        return
    ids = [r["id"] for r in res]
    assert len(ids) == len(set(ids))
    for r in res:
        assert 0 <= r["id"] < len(model.rows) and r["id"] not in model.deleted
        assert model.matches(r["id"], _norm_filter(flt)), (r, flt)
        m = model.rows[r["id"]][1]
        got = r["metadata"]
        assert got["source_file"] == m["source_file"]
        assert got["start_time_ms"] == m["start_time_ms"] and got["duration_ms"] == m["duration_ms"]
        assert abs(got["bpm"] - m["bpm"]) < 1e-6 and got["tags"] == m["tags"]
        exact = float(np.dot(model.rows[r["id"]][0].astype(np.float64), vec.astype(np.float64)))
        assert abs(r["score"] - exact) < 1e-3 * max(1.0, abs(exact))
    X = np.stack([model.rows[i][0] for i in allowed]).astype(np.float64)
    best = allowed[int(np.argmax(X @ vec.astype(np.float64)))]
    assert best in ids, f"brute-force best {best} missing from {ids[:10]} (filter {flt})"
    assert len(res) == min(k, len(allowed))


def do_delete(eng, model, rng):
    """Delete by ids (some unknown or already deleted), by track (source_file) or by a tag + bpm filter."""
    mode = int(rng.integers(0, 3))
    if mode == 0:
        ids = [int(i) for i in rng.integers(0, len(model.rows) + 3, size=int(rng.integers(1, 5)))]
        want = model.delete(ids)
        got = eng.delete(ids=ids)
    elif mode == 1:
        names = sorted({model.rows[int(i)][1]["source_file"]
                        for i in rng.integers(0, len(model.rows), size=int(rng.integers(1, 3)))})
        want = model.delete([i for i in range(len(model.rows)) if model.rows[i][1]["source_file"] in names])
        got = eng.delete(filter={"source_file": names if len(names) > 1 else names[0]})
    else:
        meta = model.rows[int(rng.integers(0, len(model.rows)))][1]
        flt = {"tags_all": [meta["tags"][0]], "bpm_gte": meta["bpm"] - 3, "bpm_lte": meta["bpm"] + 3}
        want = model.delete([i for i in range(len(model.rows)) if model.matches(i, flt)])
        got = eng.delete(filter=flt)
    assert got["deleted"] == want
    assert (got["lsn"] is None) == (want == 0)


def _norm_filter(flt):
    if flt is None:
        return None
    out = dict(flt)
    for key in ("tags_any", "tags_all"):
        if key in out:
            out[key] = [t.strip().lower() for t in out[key]]
    return out


def run_sequence(seed, tmp_path, ops=OPS, drain=False, **overrides):
    rng = np.random.default_rng(seed)
    model = Model()
    data_dir = tmp_path / f"seed{seed}"
    opts = {**dict(dim=DIM, background=False, checkpoint_max_rows=64, hot_exact_rows=32, pq_min_rows=64), **overrides}
    eng = Engine.open(data_dir, **opts)
    try:
        for step in range(ops):
            roll = int(rng.integers(0, 100))
            if roll < 40:
                v = rng.standard_normal(DIM).astype(np.float32)
                meta, key = gen_meta(rng, step), gen_key(rng, step)
                if key is not None and key in model.keys and rng.random() < 0.5:
                    # replay the original payload: must give the original id, created=False
                    vid = model.keys[key][0]
                    v, meta = model.rows[vid][0], dict(model.rows[vid][1])
                want = model.ingest(v, norm_meta(meta), key)
                if want == "conflict":
                    with pytest.raises(ConflictError):
                        eng.ingest(v, meta, key)
                else:
                    assert eng.ingest(v, meta, key) == want
            elif roll < 60:
                items = []
                for i in range(int(rng.integers(1, 7))):
                    v = rng.standard_normal(DIM).astype(np.float32)
                    meta = gen_meta(rng, step * 10 + i)
                    key = f"batch-shared-{int(rng.integers(0, 16))}" if i % 3 == 0 else gen_key(rng, step * 10 + i)
                    if key is not None and key in model.keys and rng.random() < 0.7:
                        vid = model.keys[key][0]
                        v, meta = model.rows[vid][0], dict(model.rows[vid][1])
                    items.append((v, meta, key))
                want = model.batch([(v, norm_meta(m), k) for v, m, k in items])
                payload = [{"vector": v, "metadata": m, "idempotency_key": k} for v, m, k in items]
                if want == "conflict":
                    with pytest.raises(ConflictError):
                        eng.ingest_batch(payload)
                else:
                    assert eng.ingest_batch(payload) == want
            elif roll < 77:
                if model.rows:
                    check_query(eng, model, rng)
            elif roll < 81:
                if model.rows:
                    do_delete(eng, model, rng)
            elif roll < 82:
                eng.compact(purge=True)
            elif roll < 89:
                eng.checkpoint()
            elif roll < 95:
                eng.compact()
            else:
                eng.close()
                eng = Engine.open(data_dir, **opts)
            if step % 20 == 0 or step == ops - 1:
                stats = eng.stats()
                assert stats["total_vectors"] == len(model.rows) - len(model.deleted)
                assert stats["deleted_vectors"] == len(model.deleted)
        if drain:
            eng.checkpoint()
            while eng.compact()["state"] != "idle":
                pass
            kinds = eng.stats()["segments_by_level"]
            assert any("archive" in k for k in kinds), kinds
            for _ in range(40):
                check_query(eng, model, rng)
        for vid in list(range(min(6, len(model.rows)))) + list(range(max(0, len(model.rows) - 6), len(model.rows))):
            res = eng.query(model.rows[vid][0], k=20, ef=512, search_tier="all", include_metadata=False)
            assert (vid in [r["id"] for r in res]) == (vid not in model.deleted)
        eng.close()
        eng = Engine.open(data_dir, **opts)
        assert eng.stats()["total_vectors"] == len(model.rows) - len(model.deleted)
        assert eng.stats()["deleted_vectors"] == len(model.deleted)
    finally:
        eng.close()


@pytest.mark.parametrize("seed", range(SEEDS))
def test_model_sequence(seed, tmp_path):
    run_sequence(seed, tmp_path)


@pytest.mark.parametrize("seed", range(1000, 1000 + LONG_SEEDS))
def test_model_long_sequence_reaches_pq_archives(seed, tmp_path):
    """Long enough for L2 segments above the PQ threshold, so the archive path is checked too."""
    run_sequence(seed, tmp_path, ops=1500, drain=True, checkpoint_max_rows=256)
