"""The storage engine: ingest, tiers, query/identify planning, and the lifecycle around them.

Threads: callers (server executor threads or an embedding program) call the public methods
concurrently. Writes go through the catalog's writer thread (group commit); its after-commit hook
appends to the segment set (hot tier + filter index, state.SegmentSet) before the write is
acknowledged. Queries take a `View` from it (O(segments + hot chunks)) and search it without locks.
Checkpoint and compaction run on background threads (or on an admin call), each under its own lock,
and publish their results with one `SegmentSet.swap`. Readiness and counters are typed state
(state.Readiness, state.Counters); maintenance bookkeeping is maintenance.Housekeeping.
"""
import logging
import threading

import numpy as np

from vibrato import datadir
from vibrato.catalog import Catalog, collections, jobs, orphans, segments as seg_sql, wal
from vibrato.config import Config
from vibrato.engine import checkpoint as _checkpoint
from vibrato.engine import compaction as _compaction
from vibrato.engine import deletes as _deletes
from vibrato.engine import planner as _planner
from vibrato.engine import recovery as _recovery
from vibrato.engine.background import BackgroundWorkers
from vibrato.engine.identify import identify as _identify
from vibrato.engine.lock import DataDirLock
from vibrato.engine.maintenance import Housekeeping
from vibrato.engine.shared_state import SharedState
from vibrato.engine.state import Counter, Counters, Readiness, SegmentSet
from vibrato.engine.throttle import IoThrottle
from vibrato.engine.tiers import View
from vibrato.engine.validation import check_filter, check_identify, check_search, check_vector, prepare_rows
from vibrato.errors import BackpressureError, NotReadyError
from vibrato.ids import job_id as new_job_id

log = logging.getLogger("vibrato.engine")

BACKPRESSURE_RETRY_SECS = 1.0  # Retry-After of a 429 at the hot tier's bound


class Searcher:
    """query and identify over `view()`: shared by the Engine (the writer) and a Follower (a read-only
    process; engine/follower.py). Subclasses provide config, dim, segment_set, counters, view(),
    _require_ready() and close()."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def query(self, vector, k: int = 10, ef: int = 50, filter=None, search_tier: str = "active",
              include_metadata: bool = True) -> list[dict]:
        self._require_ready()
        q = check_vector(vector, self.dim)
        check_search(k, ef, search_tier, self.config.limits)
        flt = check_filter(filter, self.config.limits)
        if k == 0:
            self.counters.add(Counter.QUERY)
            return []
        view, allowed = self._view_allowed(flt)
        out = _planner.query(view, q, k, ef, allowed, search_tier, include_metadata)
        self.counters.add(Counter.QUERY)
        return out

    def query_top(self, q, k: int, ef: int, search_tier: str, filter=None):
        """query() without metadata, unshaped: (ids int64, scores float32) best first
        (planner.shape_results gives query()'s list). For the server's fast path, whose request
        reader and validator checked what query() checks: q a FiniteArray of dim, 1 <= k <= max_k,
        ef <= max_ef, a known search_tier, filter None or a QueryFilter."""
        self._require_ready()
        q = check_vector(q, self.dim)
        view, allowed = self._view_allowed(check_filter(filter, self.config.limits))
        ids, scores = _planner.search(view, q, k, ef, allowed, search_tier)
        self.counters.add(Counter.QUERY)
        return ids, scores

    def _view_allowed(self, flt):
        """The view a query searches and its filter's evaluation (None without one). The view comes
        first: a follower catches up there, its filter index included."""
        view = self.view()
        return view, (self.segment_set.filters.evaluate(flt) if flt is not None else None)

    def identify(self, vectors, k: int = 5, ef: int = 100, search_tier: str = "all",
                 include_metadata: bool = True) -> list[dict]:
        self._require_ready()
        frames = check_identify(vectors, k, ef, search_tier, self.config.limits, self.dim)
        if frames is None:  # k == 0: no results, before any dimension check (CONTRACT.md §1.3)
            return []
        out = _planner.shape_identify(_identify(self.view(), frames, k, ef, search_tier, include_metadata))
        self.counters.add(Counter.IDENTIFY)
        return out


class Engine(Searcher):
    """See docs/ENGINE_API.md for the contract."""

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def open(cls, data_dir, collection: str = "default", dim: int = 128, *, recover_async: bool = False,
             background: bool = True, progress=None, **options) -> "Engine":
        config = Config(data_dir=data_dir, collection=collection, dim=dim, **options)
        return cls.open_config(config, recover_async=recover_async, background=background, progress=progress)

    @classmethod
    def open_config(cls, config: Config, *, recover_async: bool = False, background: bool = True,
                    progress=None) -> "Engine":
        eng = cls(config)
        try:
            eng._start(recover_async=recover_async, background=background, progress=progress)
        except BaseException:
            eng.close()
            raise
        return eng

    def __init__(self, config: Config):
        self.config = config
        datadir.prepare(config.data_dir)  # the layout, private; refuses a dir others could tamper with
        self._dir_lock = DataDirLock(config.data_dir).acquire("serve")
        from vibrato.engine.snapshot import finish_interrupted_restore
        try:
            finish_interrupted_restore(config.data_dir)  # a restore that crashed mid-swap
        except BaseException:
            self._dir_lock.release()
            raise
        self.catalog = None
        self._workers = None
        self._closed = False
        try:
            self.catalog = Catalog(config.catalog_path, read_timeout_ms=config.catalog_read_timeout_ms,
                                   wal_autocheckpoint_pages=config.sqlite_wal_autocheckpoint_pages,
                                   wal_max_bytes=config.sqlite_wal_max_bytes,
                                   passive_checkpoint_secs=config.sqlite_passive_checkpoint_secs)
            self.collection = self.catalog.write(collections.ensure, config.collection, config.dim)
        except BaseException:
            if self.catalog is not None:
                self.catalog.close()
            self._dir_lock.release()
            raise
        self.cid = self.collection["id"]
        self.dim = config.dim
        self.segment_set = SegmentSet.for_config(config)
        self.readiness_state = Readiness()
        self.counters = Counters()
        self.housekeeping = Housekeeping()
        self.checkpoint_lock = threading.Lock()
        self.compaction_lock = threading.Lock()
        self.throttle = IoThrottle(config.background_io_mb_per_sec if config.audio_colocated else 0)
        self._recovery: dict = {}
        self._recovery_thread = None
        self.shared_state = None  # SharedState when config.publish_state: followers read it

    def _start(self, *, recover_async: bool, background: bool, progress):
        def run():
            try:
                self._recovery = _recovery.recover(self, progress=progress)
                if self.config.publish_state:
                    self.shared_state = SharedState.create(
                        self.config.tmp_dir, self.catalog.read(wal.last_lsn, self.cid))
                self.readiness_state.finish(self._recovery["summary"], self._recovery["blockers"])
                log.info("recovery finished: %s", self.readiness_state.state()[1])
            except BaseException as exc:  # noqa: BLE001 - surfaced through readiness
                log.exception("recovery failed")
                self.readiness_state.finish(None, [f"recovery failed: {exc}"])
                if not recover_async:
                    raise
            if background and not self._closed:
                self._workers = BackgroundWorkers(self)
                self._workers.start()

        if recover_async:
            self._recovery_thread = threading.Thread(target=run, name="vibrato-recovery", daemon=True)
            self._recovery_thread.start()
        else:
            run()

    def close(self):
        """Stop background work, let in-flight jobs finish, TRUNCATE the SQLite WAL, unlock."""
        if self._closed:
            return
        self._closed = True
        if self._recovery_thread is not None:
            self._recovery_thread.join()
        if self._workers is not None:
            self._workers.stop()
        with self.checkpoint_lock, self.compaction_lock:
            if self.catalog is not None:
                self.catalog.close()
        if self.shared_state is not None:
            self.shared_state.close()
        self._dir_lock.release()

    # ------------------------------------------------------------------ state
    def readiness(self) -> tuple[bool, str]:
        """(ready, report): see state.Readiness."""
        return self.readiness_state.state()

    @property
    def live(self) -> bool:
        return not self._closed

    def recovery_report(self) -> dict:
        ready, report = self.readiness()
        return dict(self._recovery, blockers=self.readiness_state.blockers, ready=ready, report=report)

    def add_blocker(self, blocker: str):
        """A failure found after startup (e.g. by the scrubber) degrades readiness live (CONTRACT.md D21)."""
        self.readiness_state.add_blocker(blocker)

    def _require_ready(self):
        if self._closed:
            raise NotReadyError("engine is closed")
        if self.readiness_state.recovering:
            raise NotReadyError("engine is recovering; retry when /v2/health/ready is 200")

    def view(self) -> View:
        """The immutable snapshot a query searches (state.SegmentSet.view)."""
        return self.segment_set.view()

    # ------------------------------------------------------------------ ingest
    def ingest(self, vector, metadata=None, idempotency_key=None) -> tuple[int, bool]:
        self._require_ready()
        item = {"vector": vector}
        if metadata is not None:
            item["metadata"] = metadata
        if idempotency_key is not None:
            item["idempotency_key"] = idempotency_key
        (vid, created), = self._ingest(prepare_rows([item], self.dim, self.config.limits, batch=False))
        return vid, created

    def ingest_batch(self, items) -> list[tuple[int, bool]]:
        """items: dicts {"vector", "metadata"?, "idempotency_key"?}, or the server's PreparedBatch."""
        self._require_ready()
        prep = prepare_rows(items, self.dim, self.config.limits)
        return self._ingest(prep) if prep.rows else []

    def _ingest(self, prep):

        def apply(results):
            # Runs after the commit: the rows are durable whatever happens here, so a failure must
            # not turn into an error for the caller (a retry would duplicate keyless rows). It
            # degrades readiness instead; a restart rebuilds the hot tier from the WAL.
            created = [i for i, r in enumerate(results) if r[1]]
            if not created:
                return
            try:
                ids = np.array([results[i][0] for i in created], dtype=np.int64)
                lsns = np.array([results[i][2] for i in created], dtype=np.int64)
                self.segment_set.append(ids, lsns, prep.vectors[created], [prep.metas[i] for i in created])
                if self.shared_state is not None:
                    self.shared_state.publish_lsn(int(lsns[-1]))  # before the acknowledgement
            except Exception as exc:  # noqa: BLE001
                log.exception("acknowledged rows could not be added to the hot tier")
                self.add_blocker(f"hot tier out of step with the WAL after {exc!r}; restart to rebuild it")
            self.counters.add(Counter.INGEST_VECTORS, len(created))

        n = len(prep.rows)
        self._admit(n)
        try:
            results = self.catalog.write(wal.insert_batch, self.cid, prep.rows, after_commit=apply)
        finally:
            self.segment_set.release(n)
        if self._workers is not None and self.segment_set.hot_count() >= self.config.checkpoint_due_rows:
            self._workers.wake_checkpoint()
        return [(r[0], r[1]) for r in results]

    def _admit(self, n: int):
        """Backpressure (CONTRACT.md D41): the hot tier never holds more than config.hot_bound rows.
        A batch that does not fit waits for the checkpointer (embedded without background work:
        checkpoints here), at most ingest_backpressure_wait_secs, then BackpressureError (429)."""
        cfg, rows = self.config, self.segment_set
        if self._workers is None:
            while not rows.reserve(n, cfg.hot_bound, 0.0, lambda: None):
                self.checkpoint()
            return
        if not rows.reserve(n, cfg.hot_bound, cfg.ingest_backpressure_wait_secs, self._workers.wake_checkpoint):
            raise BackpressureError(
                f"ingest paused: the hot tier holds {rows.hot_count()} un-checkpointed rows, at its bound of "
                f"{cfg.hot_bound} (--hot-max-rows); retry after a checkpoint drains it",
                retry_after=BACKPRESSURE_RETRY_SECS)

    # ------------------------------------------------------------------ delete
    def delete(self, ids=None, *, filter=None) -> dict:
        """Delete by `ids` or by `filter` (the query's clauses plus `source_file`: one name or a list);
        exactly one. Returns {"deleted": n, "lsn": lsn or None}; durable and invisible to every later
        query when it returns (CONTRACT.md D40)."""
        self._require_ready()
        return _deletes.delete(self, ids, filter)

    # ------------------------------------------------------------------ admin
    def checkpoint(self, *, background: bool = False) -> dict:
        self._require_ready()
        return _checkpoint.run(self, background=background)

    def compact(self, *, background: bool = False, purge: bool = False, progress=None) -> dict:
        """One compaction step; with purge=True instead erase every deleted row's payload now and
        return only when that is durable (engine/deletes.py, CONTRACT.md D40)."""
        self._require_ready()
        if purge:
            return {"job_id": new_job_id("prg"), "state": "completed",
                    "details": _deletes.purge(self, progress=progress)}
        return _compaction.run(self, background=background)

    def snapshot(self, progress=None) -> dict:
        from vibrato.engine import snapshot as _snapshot
        self._require_ready()
        res = _snapshot.create(self.config.data_dir, self.config.collection, catalog=self.catalog,
                               progress=progress)
        return {"job_id": res["snapshot_id"], "state": "completed", "details": res}

    def stats(self) -> dict:
        def read(conn):
            states = seg_sql.count_by_state(conn, self.cid)
            return (states, wal.count_pending(conn, self.cid),
                    jobs.count_inflight(conn, "checkpoint", self.cid),
                    jobs.count_inflight(conn, "compaction", self.cid), orphans.usage(conn))

        states, pending, chk_inflight, cmp_inflight, (q_files, q_bytes) = self.catalog.read(read)
        segs, hot = self.segment_set.handles_and_hot_count()
        wal_stats = self.catalog.wal_stats()
        ready, report = self.readiness()
        counters = self.counters.as_dict()
        stats = {
            "ready": ready,
            "live": self.live,
            "active_segments": len(segs),
            "obsolete_segments": states.get("obsolete", 0),
            "failed_segments": states.get("failed", 0),
            "hot_vectors": hot,
            "wal_pending": pending,
            "total_vectors": sum(s.live_count for s in segs) + hot,
            "checkpoint_jobs_inflight": chk_inflight,
            "compaction_jobs_inflight": cmp_inflight,
            "sqlite_wal_bytes": wal_stats["sqlite_wal_bytes"],
            "catalog_read_timeout_total": wal_stats["catalog_read_timeout_total"],
            "quarantine_files": q_files,
            "quarantine_bytes": q_bytes,
            "quarantine_evictions_total": counters["quarantine_evictions_total"],
        }
        levels = {}
        for s in segs:
            key = f"L{s.level}_{s.kind}"
            levels[key] = levels.get(key, 0) + 1
        stats.update({
            "report": report,
            "collection": self.config.collection,
            "dim": self.dim,
            "next_id": self.catalog.read(collections.next_id, self.cid),
            "segments_by_level": levels,
            "segment_rows": sum(s.n for s in segs),
            "deleted_vectors": int(self.segment_set.deleted.shape[0]),
            "sqlite_db_bytes": wal_stats["sqlite_db_bytes"],
            "sqlite_wal_checkpoints": wal_stats["sqlite_wal_checkpoints"],
            "catalog_group_commits_total": wal_stats["catalog_group_commits_total"],
            "catalog_writes_total": wal_stats["catalog_writes_total"],
            **counters,
        })
        return stats
