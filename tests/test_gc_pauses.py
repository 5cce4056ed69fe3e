"""Full passes of Python's cyclic garbage collector hold the GIL for as long as they walk the tracked
objects (30-41 ms in a query worker under ingest, every query in flight waiting; perf/README.md).
A serving process keeps that walk short: start-up's objects are frozen once recovery is over, and the
hot tier's per-row tags are tuples, which the collector stops tracking."""
import asyncio
import gc

import numpy as np

from vibrato.engine import Engine
from vibrato.server.app import _when_recovered

DIM = 8


def test_hot_rows_leave_nothing_for_the_collector_to_walk(tmp_path):
    X = np.random.default_rng(0).standard_normal((3000, DIM)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    items = [{"vector": x, "metadata": {"source_file": f"s{i}.wav", "tags": ["t", f"g{i % 7}"]}}
             for i, x in enumerate(X)]
    with Engine.open(tmp_path / "d", dim=DIM, background=False) as eng:
        eng.ingest_batch(items)
        gc.collect()  # a collection untracks tuples that hold only untracked objects (strings)
        chunks = eng.segment_set._hot.chunks
        tags = [t for ch in chunks for t in ch.tags[:ch.n]]
        assert len(tags) == 3000
        assert not any(gc.is_tracked(t) for t in tags)
        # the contract's shape is unchanged: tags come back as a JSON array
        got = eng.query(X[5], k=1, ef=16, include_metadata=True)[0]
        assert got["id"] == 5 and got["metadata"]["tags"] == ["g5", "t"]  # normalised: sorted


class _Recovering:
    def __init__(self, polls):
        self.polls = polls

    def readiness(self):
        self.polls -= 1
        return (False, "recovering") if self.polls > 0 else (True, "ready")


def test_the_heap_is_frozen_once_recovery_is_over_not_before():
    gc.unfreeze()

    async def run():
        engine = _Recovering(polls=3)
        task = asyncio.create_task(_when_recovered(engine))
        await asyncio.sleep(0.01)
        assert not task.done() and gc.get_freeze_count() == 0  # still recovering: nothing frozen
        await asyncio.wait_for(task, 5)
        assert engine.polls == 0

    try:
        asyncio.run(run())
        assert gc.get_freeze_count() > 1000  # modules, classes, functions: start-up's objects
    finally:
        gc.unfreeze()
