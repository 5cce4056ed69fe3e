"""Snapshots: consistency with in-flight jobs, restore hardening against hostile snapshots, and the
snapshot lifecycle commands (list, verify, prune, create --out-dir). Real engines, real files."""
import json
import os
from pathlib import Path

import pytest

from enginetools import dump, payload
from vibrato.engine import Engine, snapshot as snapmod, snapshot_restore

DIM = 16


def ingest(eng, keys):
    for k in keys:
        v, m = payload(k, DIM)
        eng.ingest(v, m, k)


def open_engine(d, **kw):
    return Engine.open(d, dim=DIM, background=False, checkpoint_max_rows=20, pq_min_rows=64, **kw)


def snapshot_inside(monkeypatch, module, point):
    """Take a snapshot from inside a running job, when it reaches the fault point `point`."""
    taken = {}
    real = module.fault_point

    def hook(name):
        if name == point and "snap" not in taken:
            taken["snap"] = taken["engine"].snapshot()["details"]
        real(name)
    monkeypatch.setattr(module, "fault_point", hook)
    return taken


# ---------------------------------------------------------------------------- in-flight jobs
@pytest.mark.parametrize("job, point", [
    ("checkpoint", "checkpoint:registered"), ("checkpoint", "checkpoint:renamed"),
    ("checkpoint", "checkpoint:loaded"), ("compaction", "compaction:registered"),
    ("compaction", "compaction:renamed"), ("compaction", "compaction:loaded"),
])
def test_snapshot_during_inflight_job_restores_without_failed_segments(tmp_path, monkeypatch, job, point):
    from vibrato.engine import checkpoint, compaction

    eng = open_engine(tmp_path / "src")
    try:
        ingest(eng, [f"k{i}" for i in range(50)])
        if job == "compaction":
            eng.checkpoint()
            eng.checkpoint()
        expected = dump(eng)
        taken = snapshot_inside(monkeypatch, checkpoint if job == "checkpoint" else compaction, point)
        taken["engine"] = eng
        eng.checkpoint() if job == "checkpoint" else eng.compact()
        snap = taken["snap"]
    finally:
        eng.close()
    fresh = tmp_path / "fresh"
    snapshot_restore(fresh, snap["snapshot_dir"])
    with open_engine(fresh) as e2:
        stats = e2.stats()
        assert e2.readiness()[0], e2.readiness()[1]
        assert stats["failed_segments"] == 0, e2._recovery
        assert stats["checkpoint_jobs_inflight"] == 0 and stats["compaction_jobs_inflight"] == 0
        assert e2._recovery["jobs_rolled_back"] == 0 and e2._recovery["jobs_rolled_forward"] == 0
        assert dump(e2) == expected
        # the un-activated checkpoint's rows are pending again and checkpoint cleanly
        e2.checkpoint()
        while e2.compact()["state"] != "idle":
            pass
        assert dump(e2) == expected and e2.stats()["failed_segments"] == 0
