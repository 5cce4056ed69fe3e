"""Background loops: checkpoint, compaction, and housekeeping.

Three daemon threads, each lowering its own CPU and I/O priority when `audio_colocated`:
  checkpoint   every checkpoint_interval_secs, or at once when the hot tier reaches
               checkpoint_due_rows or an ingest waits for room; also builds graphs for sealed hot
               chunks (pipeline.build_graph)
  compaction   every compaction_interval_secs, or at once when a checkpoint (or the start, after an
               import) leaves compaction_max_inputs L0 segments waiting; as many steps as there is work
  housekeeping every few seconds (maintenance.run_once): delete obsolete segment files and expired
               quarantined files, prune checkpointed WAL blobs past the retention window, purge
               old job/segment/audit rows, scrub one segment's checksums
An interval of 0 disables that loop. Errors are logged and counted, never fatal.
"""
import logging
import threading
import time

from vibrato.engine.pipeline import build_graph
from vibrato.engine.throttle import lower_thread_priority

log = logging.getLogger("vibrato.engine")


class BackgroundWorkers:
    def __init__(self, engine):
        self.engine = engine
        self._stop = threading.Event()
        self._wake_checkpoint = threading.Event()
        self._wake_compaction = threading.Event()
        self._threads = []

    def start(self):
        cfg = self.engine.config
        loops = [("vibrato-bg-checkpoint", self._checkpoint_loop),
                 ("vibrato-bg-housekeeping", self._housekeeping_loop)]
        if cfg.compaction_interval_secs > 0:
            loops.append(("vibrato-bg-compaction", self._compaction_loop))
        for name, fn in loops:
            t = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
            t.start()
            self._threads.append(t)
        if self._l0_waiting():  # e.g. after `vibrato import`: do not leave its segments to the timer
            self.wake_compaction()

    def _l0_waiting(self) -> bool:
        return (sum(1 for s in self.engine.segment_set.handles if s.level == 0)
                >= self.engine.config.compaction_max_inputs)

    def stop(self):
        self._stop.set()
        self._wake_checkpoint.set()
        self._wake_compaction.set()
        for t in self._threads:
            t.join()

    def wake_checkpoint(self):
        self._wake_checkpoint.set()

    def _run(self, fn):
        if self.engine.config.audio_colocated:
            lower_thread_priority()
        fn()

    def _checkpoint_loop(self):
        eng, cfg = self.engine, self.engine.config
        interval = cfg.checkpoint_interval_secs
        next_due = time.monotonic() + interval if interval > 0 else float("inf")
        while not self._stop.is_set():
            self._wake_checkpoint.wait(timeout=min(1.0, max(0.0, next_due - time.monotonic())))
            self._wake_checkpoint.clear()
            if self._stop.is_set():
                break
            # due by size, or an ingest waiting for room
            full = eng.segment_set.hot_count() >= cfg.checkpoint_due_rows or eng.segment_set.waiting
            if not full:
                self._build_hot_graphs()  # backpressured ingests wait for the checkpoint, not for these
            if not full and time.monotonic() < next_due:
                continue
            try:
                while not self._stop.is_set():
                    res = eng.checkpoint(background=True)
                    if res["state"] == "idle" or (eng.segment_set.hot_count() < cfg.checkpoint_due_rows
                                                  and not eng.segment_set.waiting):
                        break
            except Exception as exc:  # noqa: BLE001
                log.warning("background checkpoint failed: %s", exc)
            if interval > 0:
                next_due = time.monotonic() + interval
            if self._l0_waiting():
                self.wake_compaction()  # the work waiting triggers compaction, not only its timer

    def _build_hot_graphs(self):
        eng = self.engine
        for ch in eng.segment_set.hot_chunks_needing_graph():
            if self._stop.is_set():
                return
            try:
                ch.index = build_graph(eng.config, eng.dim, ch.vectors, seed=0, threads=1,
                                       ef_construction=eng.config.l0_ef_construction)
            except Exception as exc:  # noqa: BLE001
                log.warning("hot chunk graph build failed: %s", exc)
                return

    def wake_compaction(self):
        self._wake_compaction.set()

    def _compaction_loop(self):
        eng, cfg = self.engine, self.engine.config
        while not self._stop.is_set():
            self._wake_compaction.wait(timeout=cfg.compaction_interval_secs)
            self._wake_compaction.clear()
            if self._stop.is_set():
                break
            try:
                for _ in range(16):
                    if self._stop.is_set() or eng.compact(background=True)["state"] == "idle":
                        break
            except Exception as exc:  # noqa: BLE001
                log.warning("background compaction failed: %s", exc)

    def _housekeeping_loop(self):
        from vibrato.engine import maintenance

        while not self._stop.wait(timeout=5.0):
            try:
                maintenance.run_once(self.engine)
            except Exception as exc:  # noqa: BLE001
                log.warning("housekeeping failed: %s", exc)
