"""Ingest backpressure (CONTRACT.md D41): the hot tier (un-checkpointed rows) never exceeds its bound;
at the bound an ingest waits for the checkpointer, then gets 429 with Retry-After, which the client
honours. Real engine, real background threads, real server on 127.0.0.1."""
import threading
import time

import numpy as np
import orjson
import pytest

from vibrato.engine import Engine
from vibrato.errors import BackpressureError

DIM = 8


def batch(rng, n):
    return [{"vector": v} for v in rng.standard_normal((n, DIM)).astype(np.float32)]


def test_the_hot_tier_never_exceeds_its_bound_while_the_checkpointer_keeps_up(tmp_path):
    rng = np.random.default_rng(1)
    eng = Engine.open(tmp_path / "d", dim=DIM, checkpoint_max_rows=200, hot_max_rows=500,
                      checkpoint_interval_secs=3600, compaction_interval_secs=0)
    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], eng.segment_set.hot_count())

    t = threading.Thread(target=watch)
    t.start()
    try:
        writers = [threading.Thread(target=lambda: [eng.ingest_batch(batch(rng, 90)) for _ in range(12)])
                   for _ in range(3)]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
    finally:
        stop.set()
        t.join()
    try:
        assert eng.stats()["next_id"] == 3 * 12 * 90 and eng.stats()["total_vectors"] == 3 * 12 * 90
        assert 0 < peak[0] <= 500
        assert eng.stats()["checkpoint_total"] >= 4
    finally:
        eng.close()


def test_at_the_bound_an_ingest_waits_then_gets_backpressure(tmp_path):
    rng = np.random.default_rng(2)
    eng = Engine.open(tmp_path / "d", dim=DIM, checkpoint_max_rows=10_000, hot_max_rows=300,
                      ingest_backpressure_wait_secs=0.3, checkpoint_interval_secs=3600, compaction_interval_secs=0)
    try:
        eng.ingest_batch(batch(rng, 250))
        with eng.checkpoint_lock:  # the checkpointer is stuck behind this
            t0 = time.monotonic()
            with pytest.raises(BackpressureError) as err:
                eng.ingest_batch(batch(rng, 100))
            assert time.monotonic() - t0 >= 0.3
            assert err.value.status == 429 and err.value.retry_after > 0
            assert "--hot-max-rows" in err.value.message
            eng.ingest_batch(batch(rng, 50))  # what still fits is admitted
            assert eng.stats()["next_id"] == 300
        eng.ingest_batch(batch(rng, 100))  # the checkpointer makes room
        assert eng.stats()["next_id"] == 400 and eng.segment_set.hot_count() <= 300
    finally:
        eng.close()


def test_embedded_without_background_work_checkpoints_at_the_bound(tmp_path):
    rng = np.random.default_rng(3)
    with Engine.open(tmp_path / "d", dim=DIM, background=False, checkpoint_max_rows=100, hot_max_rows=250) as eng:
        X = rng.standard_normal((1000, DIM)).astype(np.float32)
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        for lo in range(0, 1000, 100):
            eng.ingest_batch([{"vector": v} for v in X[lo:lo + 100]])
            assert eng.segment_set.hot_count() <= 250
        assert eng.stats()["total_vectors"] == 1000 and eng.stats()["active_segments"] >= 7
        assert eng.query(X[3], k=1, ef=64, search_tier="all")[0]["id"] == 3
        # a batch larger than the bound is admitted into an empty tier
        eng.checkpoint()
        while eng.segment_set.hot_count():
            eng.checkpoint()
        eng.ingest_batch([{"vector": v} for v in X[:400]])
        assert eng.segment_set.hot_count() == 400


def test_http_429_with_retry_after_and_the_client_retries(tmp_path):
    from server_util import ServerProcess

    with ServerProcess(tmp_path / "data", extra=["--hot-max-rows", "1000",
                                                 "--ingest-backpressure-wait-secs", "0"]) as srv:
        srv.wait_ready()
        rng = np.random.default_rng(4)
        c = srv.client(srv.bootstrap_token)
        statuses = []
        for _ in range(12):
            body = {"vectors": [{"vector": v.tolist()} for v in rng.standard_normal((400, DIM))]}
            status, headers, data = c.request("POST", "/v2/vectors/batch", body)
            statuses.append(status)
            if status == 429:
                assert int(headers["retry-after"]) >= 1
                assert orjson.loads(data)["code"] == "ingest_backpressure"
            assert c.stats()["hot_vectors"] <= 1000
        assert 429 in statuses and 201 in statuses
        created = 400 * statuses.count(201)
        assert c.stats()["next_id"] == created
        # the client waits out the 429s: every batch lands
        for _ in range(6):
            c.ingest_batch(rng.standard_normal((400, DIM)).astype(np.float32))
        assert c.stats()["next_id"] == created + 2400


def test_compaction_starts_when_l0_segments_wait_not_only_on_its_timer(tmp_path):
    rng = np.random.default_rng(5)
    eng = Engine.open(tmp_path / "d", dim=DIM, checkpoint_max_rows=100, compaction_max_inputs=3,
                      checkpoint_interval_secs=3600, compaction_interval_secs=3600)
    try:
        for _ in range(6):
            eng.ingest_batch(batch(rng, 100))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and eng.stats()["compaction_total"] == 0:
            time.sleep(0.05)
        assert eng.stats()["compaction_total"] >= 1  # the timer alone would wait an hour
        assert eng.stats()["total_vectors"] == 600
    finally:
        eng.close()


def test_a_client_is_usable_after_a_refused_connection(tmp_path):
    from server_util import ServerProcess, free_port
    from vibrato.client import Client

    port = free_port()
    c = Client(f"http://127.0.0.1:{port}")
    with pytest.raises(ConnectionRefusedError):
        c.health_live()
    with ServerProcess(tmp_path / "data", port=port) as srv:
        srv.wait_ready()
        assert c.health_live()["status"] == "ok"  # the same client, a new connection
