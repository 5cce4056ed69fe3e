"""The audit writer (api.md §8 with SPEC D26 fixes).

Handlers call `record(...)` on the event loop; it appends to a bounded in-memory queue and never
blocks (a full queue drops the event and counts it in `vibrato_audit_failures_total`). A task on
the loop flushes every `interval` seconds, or as soon as `batch` events are queued, as one
`catalog.write(audit.insert_many, rows)` transaction. The write is submitted with
`Catalog.write_async`, so no SQLite call ever runs on the loop. A failed batch is dropped and
counted. `close()` flushes what is left (graceful shutdown, SPEC D22).

Rows carry the request time (not the flush time, which has its own column), the key id, the client
address, the endpoint, the action, the status, the latency and JSON details.
"""
import asyncio
import logging
import time
from collections import deque

import orjson

from vibrato.catalog import audit as audit_sql

log = logging.getLogger("vibrato.audit")


class AuditWriter:
    def __init__(self, catalog, metrics, *, interval: float = 0.25, batch: int = 500, capacity: int = 4096,
                 retention_days: int = 30, prune_every_secs: float = 3600.0):
        self.catalog = catalog
        self.metrics = metrics
        self.interval = interval
        self.batch = batch
        self.capacity = capacity
        self.retention_days = retention_days
        self.prune_every_secs = prune_every_secs
        self.written_total = 0
        self._queue = deque()
        self._wake = asyncio.Event()
        self._task = None
        self._prune_task = None
        self._closing = False

    def record(self, *, ts: float, request_id: str, api_key_id, endpoint: str, action: str, status: int,
               latency_ms: float, client_ip, details: dict) -> None:
        """Queue one event (non-blocking; drops and counts when the queue is full)."""
        if len(self._queue) >= self.capacity:
            self.metrics.audit_failures += 1
            return
        self._queue.append((int(ts), request_id, api_key_id, endpoint, action, int(status), float(latency_ms),
                            client_ip, orjson.dumps(details).decode()))
        if len(self._queue) >= self.batch:
            self._wake.set()

    async def start(self):
        self._task = asyncio.create_task(self._run(), name="vibrato-audit-writer")
        if self.retention_days > 0:
            self._prune_task = asyncio.create_task(self._prune_loop(), name="vibrato-audit-retention")

    async def _run(self):
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self):
        while self._queue:
            n = min(len(self._queue), self.batch)
            now = int(time.time())
            rows = [self._queue.popleft() + (now,) for _ in range(n)]
            try:
                await asyncio.wrap_future(self.catalog.write_async(audit_sql.insert_many, rows))
                self.written_total += n
            except Exception as exc:  # noqa: BLE001 - dropped and counted, never raised to requests
                self.metrics.audit_failures += n
                log.error("audit batch of %d events dropped: %s", n, exc)

    async def _prune_loop(self):
        while not self._closing:
            cutoff = int(time.time()) - self.retention_days * 86400
            try:
                deleted = await asyncio.wrap_future(self.catalog.write_async(audit_sql.prune, cutoff))
                if deleted:
                    log.info("audit retention pruned %d events older than %d days", deleted, self.retention_days)
            except Exception as exc:  # noqa: BLE001
                log.warning("audit retention pruning failed: %s", exc)
            await asyncio.sleep(self.prune_every_secs)

    async def close(self):
        """Stop the loops and flush every queued event."""
        self._closing = True
        self._wake.set()
        for task in (self._task, self._prune_task):
            if task is not None:
                task.cancel() if task is self._prune_task else None
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        await self.flush()
