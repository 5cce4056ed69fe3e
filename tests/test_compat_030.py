"""A data dir written by Vibrato 0.3.0 opens and serves with this version.

The fixture (tests/data/datadir-0.3.0.tar.gz, made as tests/data/README.md says) holds a catalog,
an L2 archive segment in format version 1 (PQ codes, no graph), an L0 raw segment next to it and 100
rows only in the WAL (the hot tier), 16-dim vectors, plus the vectors themselves for ground truth.
Version-1 archives take the PQ-scan path until a compaction rewrites them; new segments are
written in version 2 beside them.
"""
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from vibrato.engine import Engine

FIXTURE = Path(__file__).parent / "data" / "datadir-0.3.0.tar.gz"
DIM = 16


@pytest.fixture
def old(tmp_path):
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    data = tmp_path / "dd030"
    for root, dirs, files in os.walk(data):  # as an operator restores a backup: private modes
        os.chmod(root, 0o700)
        for f in files:
            os.chmod(os.path.join(root, f), 0o600)
    return data, np.load(tmp_path / "dd030_vectors.npy")


def _version(path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(12)[8:12], "little")


def _metadata(i):
    return {"tags": sorted([f"t{i % 7}"] + (["rare"] if i % 101 == 0 else [])), "bpm": float(60 + i % 90),
            "source_file": f"album/{i // 100}.wav", "start_time_ms": (i % 100) * 40, "duration_ms": 40}


def test_a_0_3_0_data_dir_opens_and_serves(old):
    data, X = old
    with Engine.open(data, dim=DIM, background=False) as e:
        handles = e.segment_set.handles
        archive = [s for s in handles if s.kind == "archive"]
        assert len(archive) == 1 and archive[0].index is None and not archive[0].reader.has_graph
        assert {(s.level, s.kind) for s in handles} == {(2, "archive"), (0, "raw")}
        assert e.stats()["total_vectors"] == 1500 and e.stats()["hot_vectors"] == 100
        # every row (archive, raw segment and hot) is found by its own vector, with its metadata
        for i in list(range(0, 1500, 29)) + [1199, 1200, 1399, 1400, 1499]:
            top = e.query(X[i], k=1, ef=64, search_tier="all")[0]
            assert top["id"] == i and abs(top["score"] - float(X[i] @ X[i])) < 1e-4
            got = {k: top["metadata"][k] for k in ("tags", "bpm", "source_file", "start_time_ms", "duration_ms")}
            assert got == _metadata(i)
        # recall against exact search in every tier
        rng = np.random.default_rng(1)
        for tier, ids in (("all", np.arange(1500)), ("archive", np.arange(1200)), ("active", np.arange(1200, 1500))):
            hits = 0
            for q in X[rng.choice(1500, 40, replace=False)]:
                want = ids[np.argsort(-(X[ids] @ q), kind="stable")[:10]]
                got = [r["id"] for r in e.query(q, k=10, ef=64, search_tier=tier, include_metadata=False)]
                hits += len(set(got) & set(want.tolist()))
            assert hits / 400 >= 0.95, (tier, hits)
        # a filter over the old columns is exact
        rare = np.array([i for i in range(1500) if i % 101 == 0])
        want = rare[np.argsort(-(X[rare] @ X[5]), kind="stable")].tolist()
        assert [r["id"] for r in e.query(X[5], k=50, filter={"tags_all": ["rare"]}, search_tier="all")] == want
        # new writes land in version-2 segments beside the old ones, and everything stays searchable
        e.ingest_batch([{"vector": X[i] * -1.0} for i in range(300)])
        e.checkpoint()
        new = [s for s in e.segment_set.handles if s.id_end >= 1500]  # the WAL tail and the new rows
        assert new and all(s.reader.has_graph and _version(s.reader.path) == 2 for s in new)
        assert {_version(s.reader.path) for s in e.segment_set.handles} == {1, 2}
        assert e.query(-X[7], k=1, search_tier="all")[0]["id"] == 1507
        assert e.query(X[7], k=1, search_tier="all")[0]["id"] == 7
    # and it opens again (recovery over the mixed versions)
    with Engine.open(data, dim=DIM, background=False) as e:
        assert e.stats()["total_vectors"] == 1800 and e.query(X[3], k=1, search_tier="all")[0]["id"] == 3


def test_the_fixture_is_what_0_3_0_wrote():
    """Guard against regenerating the fixture with a newer version by mistake."""
    with tarfile.open(FIXTURE) as tar:
        names = tar.getnames()
        segs = [n for n in names if n.startswith("dd030/segments/") and n.endswith(".vdb")]
        assert len(segs) == 2
        for n in segs:
            head = tar.extractfile(n).read(16)
            assert head[:8] == b"\x89VBSEG\r\n" and int.from_bytes(head[8:12], "little") == 1
