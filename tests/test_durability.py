"""Durability: real processes SIGKILLed mid-work, injected faults at every step, snapshot/restore,
replay-to-LSN and recovery from damaged data dirs. Real SQLite, real files, real subprocesses.

VIBRATO_CRASH_SEEDS scales the random-kill test (CI-sized default).
"""
import json
import os
import shutil
import signal
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from enginetools import churning, dump, payload, run_python
from vibrato.engine import Engine, faults, replay_to_lsn, snapshot_create, snapshot_restore
from vibrato.errors import DataDirLockedError

DIM = 16
CRASH_SEEDS = int(os.environ.get("VIBRATO_CRASH_SEEDS", "6"))

CHILD = textwrap.dedent("""
    import sys, os, random
    sys.path.insert(0, {tests!r})
    from enginetools import payload
    from vibrato.engine import Engine
    data_dir, ledger_path, seed, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    rnd = random.Random(seed)
    eng = Engine.open(data_dir, dim={dim}, background=False, checkpoint_max_rows=40, hot_exact_rows=16,
                      pq_min_rows=64)
    ledger = open(ledger_path, "a", buffering=1)
    i = 0
    while True:
        op = rnd.random()
        if op < 0.6:
            keys = [f"s{{seed}}-{{i + j}}" for j in range(rnd.randint(1, 8))]
            i += len(keys)
            for k in keys:
                ledger.write("attempt " + k + "\\n")
            items = []
            for k in keys:
                v, m = payload(k, {dim})
                items.append({{"vector": v, "metadata": m, "idempotency_key": k}})
            res = eng.ingest_batch(items) if len(items) > 1 else [eng.ingest(items[0]["vector"], items[0]["metadata"], keys[0])]
            for k, (vid, created) in zip(keys, res):
                ledger.write(f"ack {{k}} {{vid}}\\n")
        elif op < 0.8:
            eng.checkpoint()
        else:
            eng.compact()
""")


def run_child(data_dir, ledger, seed, env_extra=None, kill_after=None):
    code = CHILD.format(tests=str(Path(__file__).parent), dim=DIM)
    return run_python(code, [data_dir, ledger, seed, "x"], env_extra, kill_after)


def read_ledger(ledger):
    attempted, acked = [], {}
    for line in Path(ledger).read_text().splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue  # a torn last line
        if parts[0] == "attempt":
            attempted.append(parts[1])
        elif parts[0] == "ack" and len(parts) == 3:
            acked[parts[1]] = int(parts[2])
    return attempted, acked


def verify_after_crash(data_dir, ledger, seed):
    attempted, acked = read_ledger(ledger)
    eng = Engine.open(data_dir, dim=DIM, background=False)
    try:
        ready, report = eng.readiness()
        assert ready, f"seed {seed}: not ready after crash: {report}"
        stored = dump(eng)
        total = eng.stats()["total_vectors"]
        assert total == len(stored)
        # every acknowledged write is present, same id, same vector and metadata
        for key, vid in acked.items():
            v, m = payload(key, DIM)
            assert vid in stored, f"seed {seed}: acked {key} (id {vid}) lost; data dir kept at {data_dir}"
            assert stored[vid][0] == v.tobytes()
            assert stored[vid][1] == m
        # nothing unattempted exists: replaying every attempt finds exactly the stored rows
        existing = 0
        for key in dict.fromkeys(attempted):
            v, m = payload(key, DIM)
            vid, created = eng.ingest(v, m, key)
            if not created:
                existing += 1
                if key in acked:
                    assert vid == acked[key]
        assert existing == total, f"seed {seed}: store holds {total} rows but only {existing} were attempted"
        ids = sorted(dump(eng))
        assert ids == list(range(len(ids))), f"seed {seed}: ids not dense"
    finally:
        eng.close()


@pytest.mark.parametrize("seed", range(CRASH_SEEDS))
def test_sigkill_at_random_points(tmp_path, seed):
    data_dir, ledger = tmp_path / "data", tmp_path / "ledger"
    rng = np.random.default_rng(seed)
    for round_ in range(2):
        rc, err = run_child(data_dir, ledger, seed * 10 + round_, kill_after=float(rng.uniform(1.5, 4.0)))
        assert rc == -signal.SIGKILL, f"seed {seed}: child exited {rc}: {err[-2000:]}"
        verify_after_crash(data_dir, ledger, seed)


STEPS = ["before_write", "segment_written", "registered", "renamed", "loaded", "activated"]


@pytest.mark.parametrize("job", ["checkpoint", "compaction"])
@pytest.mark.parametrize("step", STEPS)
def test_sigkill_at_each_durable_step(tmp_path, job, step):
    data_dir, ledger = tmp_path / "data", tmp_path / "ledger"
    rc, err = run_child(data_dir, ledger, 7, env_extra={"VIBRATO_FAULT": f"{job}:{step}=kill"}, kill_after=60)
    assert rc == -signal.SIGKILL, f"the child never reached {job}:{step} (rc {rc}): {err[-2000:]}"
    verify_after_crash(data_dir, ledger, 7)
    eng = Engine.open(data_dir, dim=DIM, background=False)
    try:
        assert eng.stats()["checkpoint_jobs_inflight"] == 0 and eng.stats()["compaction_jobs_inflight"] == 0
        eng.checkpoint()
        while eng.compact()["state"] != "idle":
            pass
        assert eng.readiness()[0]
    finally:
        eng.close()


def ingest_keys(eng, keys):
    out = {}
    for k in keys:
        v, m = payload(k, DIM)
        out[k] = eng.ingest(v, m, k)[0]
    return out


@pytest.mark.parametrize("job", ["checkpoint", "compaction"])
@pytest.mark.parametrize("step", STEPS)
def test_injected_failure_at_each_step(tmp_path, job, step):
    eng = Engine.open(tmp_path / "d", dim=DIM, background=False, checkpoint_max_rows=30, pq_min_rows=64)
    try:
        acked = ingest_keys(eng, [f"a{i}" for i in range(60)])
        if job == "compaction":
            eng.checkpoint()
            eng.checkpoint()
        faults.arm(f"{job}:{step}", OSError(28, "No space left on device (injected)"))
        with pytest.raises(OSError):
            eng.checkpoint() if job == "checkpoint" else eng.compact()
        faults.disarm_all()
        before = dump(eng)
        assert len(before) == 60
        acked.update(ingest_keys(eng, [f"b{i}" for i in range(10)]))
        # the engine keeps working: the same job succeeds now
        (eng.checkpoint if job == "checkpoint" else eng.compact)()
        eng.checkpoint()
        eng.compact()
        after = dump(eng)
        for k, vid in acked.items():
            v, m = payload(k, DIM)
            assert after[vid] == (v.tobytes(), m)
        assert eng.stats()["total_vectors"] == 70
    finally:
        faults.disarm_all()
        eng.close()
    eng = Engine.open(tmp_path / "d", dim=DIM, background=False)
    try:
        assert eng.readiness()[0], eng.readiness()[1]
        assert dump(eng) == after
        leftovers = [p for p in (tmp_path / "d" / "tmp").iterdir() if p.suffix == ".tmp"]
        assert not leftovers
    finally:
        eng.close()


def test_snapshot_during_checkpoint_and_compaction_restores_exactly(tmp_path):
    src = tmp_path / "src"
    eng = Engine.open(src, dim=DIM, background=False, checkpoint_max_rows=25, pq_min_rows=64)
    ingest_keys(eng, [f"k{i}" for i in range(300)])
    snaps = []
    with churning(eng) as errors:
        for _ in range(3):
            snaps.append(eng.snapshot()["details"])
            time.sleep(0.05)
    assert not errors
    expected = dump(eng)
    eng.close()
    # every snapshot restores to exactly the same content, into a fresh dir and into the original
    for i, snap in enumerate(snaps):
        fresh = tmp_path / f"fresh{i}"
        assert snapshot_restore(fresh, snap["snapshot_dir"]) == {"restored_snapshot": snap["snapshot_dir"]}
        with Engine.open(fresh, dim=DIM, background=False) as e2:
            assert e2.readiness()[0], e2.readiness()[1]
            assert dump(e2) == expected
    with Engine.open(src, dim=DIM, background=False) as e3:
        ingest_keys(e3, [f"later{i}" for i in range(20)])
        e3.checkpoint()
    res = snapshot_restore(src, snaps[-1]["snapshot_dir"])
    assert res["restored_snapshot"] == snaps[-1]["snapshot_dir"]
    assert list((src / "tmp").glob("restore_backup_*")), "the previous state is kept"
    with Engine.open(src, dim=DIM, background=False) as e4:
        assert dump(e4) == expected
        # ids are never reused after a restore of an older state either: the counter came back
        vid, _ = e4.ingest(*payload("after-restore", DIM))
        assert vid == 300


def test_snapshot_cli_path_while_engine_holds_lock(tmp_path):
    d = tmp_path / "d"
    eng = Engine.open(d, dim=DIM, background=False)
    ingest_keys(eng, [f"k{i}" for i in range(40)])
    eng.checkpoint()
    ingest_keys(eng, [f"m{i}" for i in range(5)])  # an un-checkpointed tail
    expected = dump(eng)
    res = snapshot_create(d, "default")  # what cron runs against a live server
    assert res["segments"] == 1 and Path(res["snapshot_dir"]).is_dir()
    manifest = json.loads((Path(res["snapshot_dir"]) / "manifest.json").read_text())
    assert manifest["snapshot_id"] == res["snapshot_id"] and len(manifest["segments"]) == 1
    with pytest.raises(Exception, match="running server"):
        snapshot_restore(d, res["snapshot_dir"])
    with pytest.raises(Exception, match="running server"):
        replay_to_lsn(d, "default", 3)
    eng.close()
    fresh = tmp_path / "fresh"
    snapshot_restore(fresh, res["snapshot_dir"])
    with Engine.open(fresh, dim=DIM, background=False) as e2:
        assert dump(e2) == expected


def test_restore_refuses_corrupt_snapshot_before_touching_live_data(tmp_path):
    d = tmp_path / "d"
    with Engine.open(d, dim=DIM, background=False) as eng:
        ingest_keys(eng, [f"k{i}" for i in range(30)])
        eng.checkpoint()
        snap = eng.snapshot()["details"]["snapshot_dir"]
        ingest_keys(eng, [f"n{i}" for i in range(5)])
        expected = dump(eng)
    seg = next((Path(snap) / "segments").iterdir())
    raw = bytearray(seg.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    seg.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="checksum mismatch"):
        snapshot_restore(d, snap)
    with Engine.open(d, dim=DIM, background=False) as eng:
        assert dump(eng) == expected
    cat = Path(snap) / "catalog.sqlite3"
    cat.write_bytes(cat.read_bytes() + b"x")
    with pytest.raises(Exception, match="catalog checksum mismatch"):
        snapshot_restore(d, snap)


def test_replay_to_lsn_never_reuses_ids(tmp_path):
    d = tmp_path / "d"
    with Engine.open(d, dim=DIM, background=False, checkpoint_max_rows=15) as eng:
        ids = ingest_keys(eng, [f"k{i}" for i in range(40)])
        eng.checkpoint()  # rows 0..14 -> a segment; 15..39 stay hot (or in later segments)
        eng.checkpoint()
    assert ids[f"k{39}"] == 39
    for target, expect in ((30, 30), (20, 20), (10, 10)):
        out = replay_to_lsn(d, "default", target)
        assert out == {"replayed_to_lsn": target, "collection": "default"}
        with Engine.open(d, dim=DIM, background=False) as eng:
            assert eng.readiness()[0], eng.readiness()[1]
            assert eng.stats()["total_vectors"] == expect
            stored = dump(eng)
            assert sorted(stored) == list(range(expect))
    with Engine.open(d, dim=DIM, background=False) as eng:
        vid, created = eng.ingest(*payload("new", DIM))
        assert created and vid == 40, "an id handed out before the replay must never be issued again"
        # a discarded key may be ingested again; it gets a fresh id
        v, m = payload("k35", DIM)
        vid2, created2 = eng.ingest(v, m, "k35")
        assert created2 and vid2 == 41
        eng.checkpoint()
        eng.compact()
        assert eng.stats()["total_vectors"] == 12
    with Engine.open(d, dim=DIM, background=False) as eng:
        assert eng.stats()["total_vectors"] == 12
        assert sorted(dump(eng)) == list(range(10)) + [40, 41]
    with pytest.raises(Exception, match="not found"):
        replay_to_lsn(d, "nope", 5)


def _checkpointed_dir(tmp_path, n_segments=2):
    d = tmp_path / "d"
    with Engine.open(d, dim=DIM, background=False, checkpoint_max_rows=20) as eng:
        ingest_keys(eng, [f"k{i}" for i in range(20 * n_segments)])
        for _ in range(n_segments):
            eng.checkpoint()
    return d


def test_recovery_quarantines_orphans_with_caps(tmp_path):
    d = _checkpointed_dir(tmp_path)
    seg = next((d / "segments").iterdir())
    for i in range(5):
        shutil.copy(seg, d / "segments" / f"orphan_{i}.vdb")
    (d / "segments" / "notes.txt").write_text("not a segment")
    with Engine.open(d, dim=DIM, background=False, quarantine_max_files=3) as eng:
        rep = eng.recovery_report()
        assert rep["quarantined"] == 5 and rep["quarantine_evictions"] == 2
        st = eng.stats()
        assert st["quarantine_files"] == 3 and st["quarantine_evictions_total"] == 2
        assert len(list((d / "quarantine").iterdir())) == 3
        assert (d / "segments" / "notes.txt").exists()
        assert eng.readiness()[0]
        assert st["total_vectors"] == 40


def test_recovery_quarantine_ttl_gc(tmp_path):
    d = _checkpointed_dir(tmp_path)
    seg = next((d / "segments").iterdir())
    shutil.copy(seg, d / "segments" / "orphan.vdb")
    with Engine.open(d, dim=DIM, background=False) as eng:
        assert eng.recovery_report()["quarantined"] == 1
    with Engine.open(d, dim=DIM, background=False, orphan_ttl_hours=0) as eng:
        assert eng.recovery_report()["gc_deleted"] == 1
        assert eng.stats()["quarantine_files"] == 0
    assert not list((d / "quarantine").iterdir())


@pytest.mark.parametrize("damage", ["bitflip_metadata", "truncate", "missing"])
def test_recovery_blocks_on_damaged_active_segment(tmp_path, damage):
    d = _checkpointed_dir(tmp_path)
    seg = sorted((d / "segments").iterdir())[0]
    if damage == "bitflip_metadata":
        from vibrato.segment import SegmentReader
        with SegmentReader.open(seg) as r:
            off = r.sections["bpm"][0]
        raw = bytearray(seg.read_bytes())
        raw[off] ^= 0x01
        seg.write_bytes(bytes(raw))
    elif damage == "truncate":
        seg.write_bytes(seg.read_bytes()[: seg.stat().st_size // 2])
    else:
        seg.unlink()
    with Engine.open(d, dim=DIM, background=False) as eng:
        ready, report = eng.readiness()
        assert not ready
        assert report.startswith("degraded:") and "blockers=" in report and "active segment" in report
        assert eng.stats()["failed_segments"] == 1
        assert eng.stats()["total_vectors"] == 20  # the other segment still serves
        assert "acknowledged ids are in no active segment" in report


def test_damaged_vectors_found_by_the_scrubber_after_a_fast_start(tmp_path):
    """Start-up does not read the bulk vector sections (no full scan); the scrubber verifies them
    right after and a failure degrades readiness live."""
    from vibrato.engine import maintenance
    from vibrato.segment import SegmentReader

    d = _checkpointed_dir(tmp_path)
    seg = sorted((d / "segments").iterdir())[0]
    with SegmentReader.open(seg) as r:
        off, length = r.sections["vectors"][:2]
    raw = bytearray(seg.read_bytes())
    raw[off + length // 2] ^= 0x10
    seg.write_bytes(bytes(raw))
    with Engine.open(d, dim=DIM, background=False) as eng:
        assert eng.readiness()[0], "vectors are not checksummed at start-up"
        assert len(eng.housekeeping.unscrubbed) == 2
        maintenance.scrub_one(eng)
        maintenance.scrub_one(eng)
        ready, report = eng.readiness()
        assert not ready and "active segment" in report and "checksum mismatch" in report
        assert not eng.housekeeping.unscrubbed


def test_recovery_cleans_stale_temp_files(tmp_path):
    d = _checkpointed_dir(tmp_path)
    (d / "tmp" / "seg_1_abc.vdb.tmp").write_bytes(b"partial")
    with Engine.open(d, dim=DIM, background=False) as eng:
        assert eng.recovery_report()["temp_files_removed"] == 1
        assert eng.readiness()[0]
    assert not (d / "tmp" / "seg_1_abc.vdb.tmp").exists()


def test_second_engine_on_same_dir_is_refused(tmp_path):
    d = tmp_path / "d"
    with Engine.open(d, dim=DIM, background=False):
        with pytest.raises(DataDirLockedError, match="locked by another process"):
            Engine.open(d, dim=DIM, background=False)
