"""`vibrato import` (CONTRACT.md D42): checked before anything is written, ids continue the collection's,
all or nothing under SIGKILL at every step, refused on a locked data dir. Real files, real processes."""
import json
import signal
import textwrap

import numpy as np
import pytest

from enginetools import dump, run_python
from server_util import run_cli
from vibrato.engine import Engine
from vibrato.engine import bulk_import
from vibrato.errors import BadRequestError, DataDirLockedError, VibratoError

DIM = 16


def unit(rng, n):
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_inputs(tmp_path, X, name="v"):
    vp, mp = tmp_path / f"{name}.npy", tmp_path / f"{name}.jsonl"
    np.save(vp, X)
    mp.write_text("".join(json.dumps({"source_file": f"t{i // 50}.wav", "start_time_ms": (i % 50) * 40,
                                      "duration_ms": 40, "bpm": 120.5, "tags": ["Imported", "x"]}) + "\n"
                          for i in range(X.shape[0])))
    return vp, mp


def test_import_continues_the_ids_and_is_searchable_with_metadata(tmp_path, monkeypatch):
    monkeypatch.setattr(bulk_import, "IMPORT_SEGMENT_ROWS", 300)
    rng = np.random.default_rng(1)
    d = tmp_path / "d"
    with Engine.open(d, dim=DIM, background=False) as eng:  # an existing collection: 10 rows
        eng.ingest_batch([{"vector": v} for v in unit(rng, 10)])
    X = unit(rng, 1000)
    vp, mp = write_inputs(tmp_path, X)
    out = bulk_import.run(d, "default", vp, mp)
    assert out == {"imported": 1000, "id_start": 10, "id_end": 1009, "segments": 4}
    with Engine.open(d, dim=DIM, background=False) as eng:
        assert eng.stats()["total_vectors"] == 1010 and eng.stats()["next_id"] == 1010
        rows = dump(eng)
        assert sorted(rows) == list(range(1010))
        assert rows[10 + 123][0] == X[123].tobytes()
        res = eng.query(X[123], k=1, ef=64, search_tier="all")[0]
        assert res["id"] == 133 and res["metadata"] == {"source_file": "t2.wav", "start_time_ms": 23 * 40,
                                                         "duration_ms": 40, "bpm": 120.5,
                                                         "tags": ["imported", "x"]}
        assert eng.delete(filter={"source_file": "t0.wav"})["deleted"] == 50  # the catalog knows them
        new = eng.ingest(X[0])
        assert new == (1010, True)


@pytest.mark.parametrize("case", ["nan", "dim1", "dtype", "badjson", "badfield", "count", "extra"])
def test_malformed_input_is_refused_before_anything_is_written(tmp_path, case):
    rng = np.random.default_rng(2)
    d = tmp_path / "d"
    X = unit(rng, 100)
    vp, mp = write_inputs(tmp_path, X)
    lines = mp.read_text().splitlines(keepends=True)
    want = {"nan": "row 37", "dim1": "shape", "dtype": "int64", "badjson": "line 5", "badfield": "line 9",
            "count": "99 lines", "extra": "more than 100 lines"}[case]
    if case == "nan":
        X[37, 3] = np.nan
        np.save(vp, X)
    elif case == "dim1":
        np.save(vp, X[:, 0])
    elif case == "dtype":
        np.save(vp, np.ones((100, DIM), dtype=np.int64))
    elif case == "badjson":
        lines[4] = "{not json\n"
    elif case == "badfield":
        lines[8] = json.dumps({"source_file": "a", "color": "red"}) + "\n"
    elif case == "count":
        lines = lines[:99]
    elif case == "extra":
        lines.append(lines[-1])
    mp.write_text("".join(lines))
    with pytest.raises(BadRequestError, match=want):
        bulk_import.run(d, "default", vp, mp)
    assert not d.exists()  # nothing was created, not even the data dir


@pytest.mark.parametrize("point", ["import:segment_written", "import:renamed"])
def test_an_error_while_the_activation_is_open_rolls_it_back_and_removes_the_files(tmp_path, monkeypatch, point):
    """The activating transaction inserts the WAL rows while segments are still being written; a failure
    then must roll those rows back and leave no segment file behind, and the import can run again."""
    from vibrato.engine import faults

    monkeypatch.setattr(bulk_import, "IMPORT_SEGMENT_ROWS", 200)
    rng = np.random.default_rng(6)
    d = tmp_path / "d"
    with Engine.open(d, dim=DIM, background=False) as eng:
        eng.ingest_batch([{"vector": v} for v in unit(rng, 20)])
        eng.checkpoint()
    files_before = sorted(p.name for p in (d / "segments").iterdir())
    X = unit(rng, 700)
    vp, mp = write_inputs(tmp_path, X)
    faults.arm(point)
    try:
        with pytest.raises(OSError, match="injected"):
            bulk_import.run(d, "default", vp, mp)
    finally:
        faults.disarm_all()
    assert sorted(p.name for p in (d / "segments").iterdir()) == files_before
    assert not list((d / "tmp").glob("*.vdb.tmp"))
    with Engine.open(d, dim=DIM, background=False) as eng:
        assert sorted(dump(eng)) == list(range(20)) and eng.stats()["next_id"] == 20
    assert bulk_import.run(d, "default", vp, mp)["id_start"] == 20


def test_a_server_compacts_imported_segments_at_start_not_at_its_timer(tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(bulk_import, "IMPORT_SEGMENT_ROWS", 100)
    rng = np.random.default_rng(8)
    d = tmp_path / "d"
    X = unit(rng, 1000)
    vp, mp = write_inputs(tmp_path, X)
    assert bulk_import.run(d, "default", vp, mp)["segments"] == 10  # compaction_max_inputs
    with Engine.open(d, dim=DIM, compaction_interval_secs=3600, checkpoint_interval_secs=3600) as eng:
        deadline = time.monotonic() + 20  # both timers are an hour away
        while any(s.level == 0 for s in eng.segment_set.handles) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(s.level == 0 for s in eng.segment_set.handles)
        assert eng.query(X[321], k=1, ef=64)[0]["id"] == 321


def test_import_refuses_a_locked_data_dir_and_the_cli_prints_key_values(tmp_path):
    rng = np.random.default_rng(3)
    d = tmp_path / "d"
    vp, mp = write_inputs(tmp_path, unit(rng, 50))
    eng = Engine.open(d, dim=DIM, background=False)
    try:
        with pytest.raises((VibratoError, DataDirLockedError), match="in use|locked"):
            bulk_import.run(d, "default", vp, mp)
    finally:
        eng.close()
    r = run_cli("import", "--data-dir", str(d), "--vectors", str(vp), "--metadata", str(mp))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["imported=50", "id_start=0", "id_end=49", "segments=1"]
    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((3, DIM), np.inf, dtype=np.float32))
    r = run_cli("import", "--data-dir", str(d), "--vectors", str(bad))
    assert r.returncode == 1 and "row 0" in r.stderr


CHILD = textwrap.dedent("""
    import sys
    from vibrato.engine import bulk_import
    bulk_import.IMPORT_SEGMENT_ROWS = 200
    bulk_import.run(sys.argv[1], "default", sys.argv[2], sys.argv[3])
""")


@pytest.mark.parametrize("point", ["import:segment_written", "import:renamed", "import:activated"])
def test_sigkill_at_each_import_step_leaves_the_store_as_before_or_fully_imported(tmp_path, point):
    rng = np.random.default_rng(4)
    d = tmp_path / "d"
    before = unit(rng, 30)
    with Engine.open(d, dim=DIM, background=False) as eng:
        eng.ingest_batch([{"vector": v} for v in before])
        eng.checkpoint()
    X = unit(rng, 700)
    vp, mp = write_inputs(tmp_path, X)
    rc, err = run_python(CHILD, [d, vp, mp], {"VIBRATO_FAULT": f"{point}=kill"}, kill_after=120)
    assert rc == -signal.SIGKILL, err[-2000:]
    with Engine.open(d, dim=DIM, background=False) as eng:
        rows = dump(eng)
        if point == "import:activated":
            assert sorted(rows) == list(range(730)) and rows[30 + 699][0] == X[699].tobytes()
        else:
            assert sorted(rows) == list(range(30)) and eng.stats()["next_id"] == 30
            assert eng.recovery_report()["blockers"] == []
        assert eng.readiness()[0]
    # and the import can simply be run again
    out = bulk_import.run(d, "default", vp, mp)
    assert out["id_start"] == (730 if point == "import:activated" else 30)
