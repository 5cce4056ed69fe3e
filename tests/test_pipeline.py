"""The segment publish pipeline (vibrato/engine/pipeline.py): one durable order for checkpoint and
compaction, its fault points in order, rollback before activation, recovery's roll-forward through
the operations' own activate transactions, and the one home of the HNSW build parameters."""
import pytest

from enginetools import dump, payload
from vibrato.engine import Engine, checkpoint, compaction, faults, pipeline

DIM = 16
STEPS = ["before_write", "segment_written", "registered", "renamed", "loaded", "activated"]


def ingest(eng, keys):
    eng.ingest_batch([{"vector": v, "metadata": m, "idempotency_key": k} for k in keys for v, m in [payload(k, DIM)]])


def open_engine(d, **kw):
    return Engine.open(d, dim=DIM, background=False, checkpoint_max_rows=20, pq_min_rows=64, **kw)


def record_points(monkeypatch, module):
    seen = []
    real = module.fault_point

    def hook(name):
        seen.append(name)
        real(name)
    monkeypatch.setattr(module, "fault_point", hook)
    return seen


@pytest.mark.parametrize("job", ["checkpoint", "compaction"])
def test_every_fault_point_is_reached_in_the_durable_order(tmp_path, monkeypatch, job):
    with open_engine(tmp_path / "d") as eng:
        ingest(eng, [f"k{i}" for i in range(40)])
        if job == "compaction":
            eng.checkpoint()
            eng.checkpoint()
        seen = record_points(monkeypatch, checkpoint if job == "checkpoint" else compaction)
        res = eng.checkpoint() if job == "checkpoint" else eng.compact()
        assert res["state"] == "completed"
        assert seen == [f"{job}:{s}" for s in STEPS]
        counters = eng.counters.as_dict()
        assert counters[f"{job}_total"] == 1 and counters[f"{job}_failures_total"] == 0


def test_idle_runs_touch_nothing(tmp_path, monkeypatch):
    with open_engine(tmp_path / "d") as eng:
        seen = (record_points(monkeypatch, checkpoint), record_points(monkeypatch, compaction))
        assert eng.checkpoint()["details"] == {"reason": "no_pending_wal"}
        assert eng.compact()["details"] == {"reason": "not_enough_compaction_candidates"}
        assert seen == ([], []) and eng.stats()["active_segments"] == 0


@pytest.mark.parametrize("job", ["checkpoint", "compaction"])
def test_a_failure_before_activation_rolls_back_in_one_place(tmp_path, job):
    with open_engine(tmp_path / "d") as eng:
        ingest(eng, [f"k{i}" for i in range(40)])
        if job == "compaction":
            eng.checkpoint()
            eng.checkpoint()
        before = dump(eng)
        segs_before = {s.id for s in eng.segment_set.handles}
        faults.arm(f"{job}:loaded", OSError(28, "injected"))
        try:
            with pytest.raises(OSError, match="injected"):
                eng.checkpoint() if job == "checkpoint" else eng.compact()
        finally:
            faults.disarm_all()
        assert eng.counters.as_dict()[f"{job}_failures_total"] == 1
        assert {s.id for s in eng.segment_set.handles} == segs_before
        st = eng.stats()
        assert st["failed_segments"] == 1 and st[f"{job}_jobs_inflight"] == 0
        assert dump(eng) == before
        assert not list((tmp_path / "d" / "tmp").iterdir())
        assert len(list((tmp_path / "d" / "segments").iterdir())) == len(segs_before)


@pytest.mark.parametrize("job", ["checkpoint", "compaction"])
def test_recovery_rolls_forward_through_the_same_activate_transaction(tmp_path, monkeypatch, job):
    """A job 'crashes' after its output is loaded (no rollback runs, as after SIGKILL); recovery
    finishes it with the operation's own activate function."""
    d = tmp_path / "d"
    with open_engine(d) as eng:
        ingest(eng, [f"k{i}" for i in range(40)])
        if job == "compaction":
            eng.checkpoint()
            eng.checkpoint()
        expected = dump(eng)
        with monkeypatch.context() as m:
            m.setattr(pipeline, "_fail", lambda *a, **kw: None)  # the process dies: nothing is cleaned up
            faults.arm(f"{job}:loaded", RuntimeError("crash"))
            try:
                with pytest.raises(RuntimeError):
                    eng.checkpoint() if job == "checkpoint" else eng.compact()
            finally:
                faults.disarm_all()
        assert eng.stats()[f"{job}_jobs_inflight"] == 1
    module = checkpoint if job == "checkpoint" else compaction
    calls = []
    real = module.activate

    def spy(*a, **kw):
        calls.append(a)
        return real(*a, **kw)
    monkeypatch.setattr(module, "activate", spy)
    with open_engine(d) as eng:
        rep = eng.recovery_report()
        assert rep["jobs_rolled_forward"] == 1 and rep["jobs_rolled_back"] == 0
        assert len(calls) == 1 and calls[0][-1]["recovered"] is True and calls[0][-1]["phase"] == "completed"
        assert eng.readiness()[0], eng.readiness()[1]
        st = eng.stats()
        assert st[f"{job}_jobs_inflight"] == 0 and st["failed_segments"] == 0
        assert dump(eng) == expected
        if job == "checkpoint":
            assert st["wal_pending"] == 20 and st["active_segments"] == 1
        else:
            assert st["active_segments"] == 1 and st["segments_by_level"] == {"L1_raw": 1}


def test_hnsw_build_parameters_come_from_config(tmp_path, monkeypatch):
    import vibrato.index as index_mod

    built = []
    real = index_mod.HnswIndex

    class Spy(real):
        def __init__(self, dim, m=16, ef_construction=200, seed=0):
            built.append((m, ef_construction))
            super().__init__(dim, m=m, ef_construction=ef_construction, seed=seed)
    monkeypatch.setattr(index_mod, "HnswIndex", Spy)
    with open_engine(tmp_path / "d", hnsw_m=8, hnsw_ef_construction=40, l0_ef_construction=12,
                     l1_ef_construction=20) as eng:
        for part in range(2):
            ingest(eng, [f"k{part}_{i}" for i in range(40)])
            eng.checkpoint()
            eng.checkpoint()
            # the L0 checkpoints and the L1 their compaction makes get the short-lived graphs
            assert eng.compact()["state"] == "completed"
        assert [(s.level, s.index.ef_construction) for s in eng.segment_set.handles] == [(1, 20), (1, 20)]
        assert eng.compact()["state"] == "completed"  # two L1s -> an L2: the full graph
        assert [(s.level, s.index.m, s.index.ef_construction) for s in eng.segment_set.handles] == [(2, 8, 40)]
    assert built == [(8, 12), (8, 12), (8, 20)] * 2 + [(8, 40)]
    g = pipeline.build_graph(eng.config, DIM, payload("x", DIM)[0].reshape(1, DIM), seed=0, threads=1)
    assert (g.m, g.ef_construction) == (8, 40) and len(g) == 1
