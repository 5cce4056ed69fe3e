"""The audit writer (CONTRACT.md §1.7, with the CONTRACT.md D26 fixes).

Handlers call `record(...)` on the event loop; it appends to a bounded in-memory queue and never
blocks (a full queue drops the event and counts it in `vibrato_audit_failures_total`). A task on
the loop flushes every `interval` seconds, or as soon as `batch` events are queued, as one
`catalog.write(audit.insert_many, rows)` transaction. The write is submitted with
`Catalog.write_async`, so no SQLite call ever runs on the loop. A failed batch is dropped and
counted. `close()` flushes what is left (graceful shutdown, CONTRACT.md D22).

Rows carry the request time (not the flush time, which has its own column), the key id, the client
address, the endpoint, the action, the status, the latency and JSON details.

Auth failures are aggregated so a flood of bad tokens cannot fill the table: per (client address,
endpoint, status) and window (`auth_window_secs`, 60 s from the first failure), the first failure
is written as usual; later ones are only counted, and when the window ends one summary row is
written with `details = {"error", "aggregated": true, "count": <failures after the first>,
"first_ts", "last_ts", "window_secs"}` (ts, request id and error of the last one, mean latency).
At most `auth_max_keys` windows are tracked; failures of further keys are counted in one overflow
summary (client `NULL`, endpoint `*`, `"overflow": true`) — memory stays bounded. With query workers
(server/workers.py) the windows are the writer's: a worker passes its auth failures on marked as such
(`aggregate_auth=False`) and the writer's `extend` aggregates them with its own, so a client's failures
make one first row and one summary per window for the whole server, whichever process took them.
"""
import asyncio
import logging
import time
from collections import deque

import orjson

from vibrato.catalog import audit as audit_sql

log = logging.getLogger("vibrato.audit")


_ROW = 9  # fields of a queued event: ts, request id, key id, endpoint, action, status, latency, client, details


class _Window:
    __slots__ = ("ends", "count", "first_ts", "last_ts", "request_id", "action", "status", "latency_sum", "error")

    def __init__(self, ends: float):
        self.ends = ends
        self.count = 0
        self.first_ts = self.last_ts = 0.0
        self.request_id = self.action = self.error = ""
        self.status = 0
        self.latency_sum = 0.0

    def add(self, ts, request_id, action, status, latency_ms, error):
        if not self.count:
            self.first_ts = ts
        self.count += 1
        self.last_ts = ts
        self.request_id, self.action, self.status, self.error = request_id, action, status, error
        self.latency_sum += latency_ms


_OVERFLOW = ("*overflow*",)


class AuditWriter:
    """`sink(rows)` (a coroutine) stores a batch: the catalog by default; a query worker's sends it to
    the writer (server/workers.py), which `extend`s its own queue with it. aggregate_auth=False (a
    worker): auth failures are queued as they come, each row with a trailing True, for the writer to
    aggregate."""

    def __init__(self, catalog, metrics, *, sink=None, interval: float = 0.25, batch: int = 500, capacity: int = 4096,
                 retention_days: int = 30, prune_every_secs: float = 3600.0, auth_window_secs: float = 60.0,
                 auth_max_keys: int = 1024, aggregate_auth: bool = True):
        self.catalog = catalog
        self.aggregate_auth = aggregate_auth
        self.metrics = metrics
        self._sink = sink if sink is not None else self._to_catalog
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
        self.auth_window_secs = auth_window_secs
        self.auth_max_keys = auth_max_keys
        self._windows = {}  # (client_ip, endpoint, status) -> _Window, in window-end order

    def record(self, *, ts: float, request_id: str, api_key_id, endpoint: str, action: str, status: int,
               latency_ms: float, client_ip, details: dict, auth_failure: bool = False) -> None:
        """Queue one event (non-blocking; drops and counts when the queue is full). An auth failure
        within the window of an earlier one from the same client, endpoint and status is only counted."""
        if auth_failure and not self.aggregate_auth:
            self._append(ts, request_id, api_key_id, endpoint, action, status, latency_ms, client_ip, details,
                         mark=True)
            return
        if auth_failure and self._aggregated(ts, request_id, endpoint, action, status, latency_ms, client_ip,
                                             details):
            return
        self._append(ts, request_id, api_key_id, endpoint, action, status, latency_ms, client_ip, details)

    def _aggregated(self, ts, request_id, endpoint, action, status, latency_ms, client_ip, details) -> bool:
        now = time.monotonic()
        self._expire(now)
        key = (client_ip, endpoint, int(status))
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) < self.auth_max_keys:
                self._windows[key] = _Window(now + self.auth_window_secs)
                return False  # the first failure of a window is written in full
            key = _OVERFLOW
            window = self._windows.get(key)
            if window is None:  # the overflow window itself may exceed the cap by one
                window = self._windows[key] = _Window(now + self.auth_window_secs)
        window.add(ts, request_id, action, int(status), latency_ms, str(details.get("error", "")))
        return True

    def _expire(self, now: float, everything: bool = False) -> None:
        """Write the summary of every window that ended (all of them when closing)."""
        windows = self._windows
        while windows:
            key = next(iter(windows))
            window = windows[key]
            if window.ends > now and not everything:
                break
            del windows[key]
            if window.count:
                overflow = key is _OVERFLOW
                details = {"error": window.error, "aggregated": True, "count": window.count,
                           "first_ts": round(window.first_ts, 3), "last_ts": round(window.last_ts, 3),
                           "window_secs": self.auth_window_secs}
                if overflow:
                    details["overflow"] = True
                self._append(window.last_ts, window.request_id, None, "*" if overflow else key[1], window.action,
                             window.status, window.latency_sum / window.count, None if overflow else key[0], details)

    def _append(self, ts, request_id, api_key_id, endpoint, action, status, latency_ms, client_ip, details,
                mark=False):
        if len(self._queue) >= self.capacity:
            self.metrics.audit_failures += 1
            return
        row = (int(ts), request_id, api_key_id, endpoint, action, int(status), float(latency_ms), client_ip,
               orjson.dumps(details).decode())
        self._queue.append(row + (True,) if mark else row)
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
        """Write the events queued now, `batch` per transaction. Events recorded while a batch is
        being written wait for the next round: draining until the queue is empty would, under a
        steady load, commit (and fsync) a handful of rows at a time, back to back."""
        self._expire(time.monotonic(), everything=self._closing)
        pending = len(self._queue)
        while pending > 0 or (self._closing and self._queue):
            n = min(len(self._queue), self.batch)
            pending -= n
            now = int(time.time())
            rows = [self._queue.popleft() + (now,) for _ in range(n)]
            try:
                await self._sink(rows)
                self.written_total += n
            except Exception as exc:  # noqa: BLE001 - dropped and counted, never raised to requests
                self.metrics.audit_failures += n
                log.error("audit batch of %d events dropped: %s", n, exc)

    async def _to_catalog(self, rows):
        await asyncio.wrap_future(self.catalog.write_async(audit_sql.insert_many, rows))

    def extend(self, events: list):
        """Queue events another process recorded (rows as `_append` makes them, without the flush
        time); dropped and counted past the queue's capacity like local ones. A row with a trailing
        True is an auth failure, aggregated here like the writer's own."""
        for ev in events:
            if len(ev) == _ROW + 1 and ev[_ROW] is True:
                ts, request_id, _key, endpoint, action, status, latency_ms, client_ip, details = ev[:_ROW]
                if self._aggregated(ts, request_id, endpoint, action, status, latency_ms, client_ip,
                                    orjson.loads(details)):
                    continue
                ev = ev[:_ROW]
            if len(self._queue) >= self.capacity:
                self.metrics.audit_failures += 1
                continue
            self._queue.append(tuple(ev))
        if len(self._queue) >= self.batch:
            self._wake.set()

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
