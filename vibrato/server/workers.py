"""Serving from several processes: the writer and its query workers (`--query-workers N`).

One Python process tops out at about one core (the GIL), so with N > 1 the serve-v2 process (the
writer) starts N query workers once recovery is done. They listen on the same port (SO_REUSEPORT:
the kernel spreads connections over them; the writer refuses a port another server already holds,
app.refuse_taken_port). The writer listens there too until they all do, then leaves the port to them
(it answers during recovery, CONTRACT.md D21): a query that landed on the writer would wait behind its
ingest parsing, catalog commits and graph builds, which under a sustained ingest made the slowest 1%
of queries 4-7x slower than with the workers alone on the port (perf/README.md):

* the writer owns the data dir exactly as with one process (lock, catalog writes, checkpoint,
  compaction, recovery) and publishes its committed lsn and segment-set changes in
  `tmp/serving.state` (engine/shared_state.py);
* a worker serves `/v2/query`, `/v2/identify`, `/v2/health/live` and `/v2/openapi.json` itself,
  through a `Follower` (engine/follower.py: read-your-writes across processes, CONTRACT.md D5);
  every other request is authenticated there (before its body is read, D15) and then forwarded,
  body streamed, to the writer over `tmp/internal.sock`, which answers it as if the client had
  connected to it (the client's address travels in `x-vibrato-forwarded-for`, trusted only on that
  socket). A forwarded request is logged, counted and audited by the writer alone;
* a write is acknowledged once every live worker has applied it, or after ACK_WAIT_SECS (a worker that
  misses it is not waited for again until it catches up): each worker's follow thread catches up as
  soon as the writer publishes, reports its applied lsn in `tmp/followers.state` and sends a datagram
  to `tmp/writer.wake`, which wakes the writes waiting for it (they look again every ACK_POLL_SECS
  should a datagram be lost), so that queries on a worker under an ingest load do not catch up
  themselves. Only pacing: a query on a worker that is behind still catches up before it searches
  (read-your-writes does not depend on this);
* a worker's audit events go to the writer in batches (`POST /internal/audit` on that socket);
* `/v2/metrics` and `/v2/admin/stats` are answered by the writer with every worker's counters
  added: it reads each worker's state over `tmp/worker-<i>.sock` (`GET /internal/state`) when it
  renders them, so a request answered before the scrape is counted (a worker killed with SIGKILL
  takes its uncollected counts with it);
* a worker that exits is started again (after 1 s); SIGTERM to the writer is passed on to the
  workers, which drain their in-flight requests before the writer closes the engine; a worker
  dies with the writer (PR_SET_PDEATHSIG).
The unix sockets live in `tmp/` (mode 0700): only the data dir's owner can reach them.
"""
import asyncio
import ctypes
import dataclasses
import http.client
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import orjson
from aiohttp import web

from vibrato.config import Config, Limits
from vibrato.datadir import UnsafePathError, unix_address

log = logging.getLogger("vibrato.server")

INTERNAL_SOCKET = "internal.sock"
WORKER_SOCKET = "worker-{}.sock"
WAKE_SOCKET = "worker-{}.wake"  # datagrams from the writer: "the serving state moved"
PROGRESS_SOCKET = "writer.wake"  # datagrams from the workers: "my slot in followers.state moved"
FORWARDED_FOR = "x-vibrato-forwarded-for"
LOCAL_ROUTES = frozenset({"/v2/query", "/v2/identify", "/v2/health/live", "/v2/openapi.json"})
RESTART_DELAY_SECS = 1.0
START_TIMEOUT_SECS = 60.0  # for every worker to listen before the writer leaves the port
ACK_WAIT_SECS = 0.25     # longest a write's acknowledgement waits for the workers to apply it
ACK_POLL_SECS = 0.01      # a waiting write looks again this often without a worker's datagram
STATE_TIMEOUT_SECS = 2.0
_CONFIG_ENV = "VIBRATO_WORKER_CONFIG"
# request headers not passed on (hop-by-hop, or set by the forwarding client itself)
_DROP_REQUEST = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "content-length", "expect",
                           "te", "trailer", "upgrade", "proxy-connection", FORWARDED_FOR})
_KEEP_RESPONSE = frozenset({"content-type", "x-request-id", "allow", "retry-after"})


# ---------------------------------------------------------------------------- requests
def is_internal(request: web.Request) -> bool:
    """True for a request that came over one of the data dir's unix sockets."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and sock.family == socket.AF_UNIX


def client_address(request: web.Request):
    """The client's address: the forwarding worker's word for it on the internal socket."""
    forwarded = request.headers.get(FORWARDED_FOR)
    if forwarded is not None and is_internal(request):
        return forwarded or None
    return request.remote


# ---------------------------------------------------------------------------- config passing
def config_to_json(config: Config) -> str:
    d = dataclasses.asdict(config)
    d["data_dir"] = str(config.data_dir)
    return orjson.dumps(d).decode()


def config_from_json(text: str) -> Config:
    d = orjson.loads(text)
    d["limits"] = Limits(**d["limits"])
    return Config(**d)


# ---------------------------------------------------------------------------- writer side
class WorkerPool:
    """The writer's query workers: started after recovery, restarted when they exit, stopped at
    shutdown."""

    def __init__(self, config: Config, count: int):
        self.config = config
        self.count = count
        self.procs: dict[int, subprocess.Popen] = {}
        self.restarts = 0
        self._stopping = False
        self._task = None
        self.progress = None   # FollowerProgress: slot i is worker i's applied lsn
        # Workers are started from this thread, which keeps the writer's first nice value: a child
        # inherits its creator thread's, and the writer may lower its own (--writer-nice) but could
        # not give a restarted worker back the higher priority. It must live as long as the workers:
        # PR_SET_PDEATHSIG fires when the thread that started a worker exits, not only the process.
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="vibrato-spawn")
        self.spawner_tid = self._spawner.submit(threading.get_native_id).result()
        self._lagging = set()  # workers that missed an ACK_WAIT_SECS: not waited for until caught up
        self._progress_sock = None  # PROGRESS_SOCKET, read on the event loop
        self._waiters = set()       # futures of the writes waiting for the workers' progress

    def socket_path(self, i: int) -> str:
        return os.path.join(self.config.tmp_dir, WORKER_SOCKET.format(i))

    def wake_paths(self) -> list[str]:
        return [os.path.join(self.config.tmp_dir, WAKE_SOCKET.format(i)) for i in range(1, self.count + 1)]

    def _spawn(self, i: int):
        self._spawner.submit(self._popen, i).result()

    def _popen(self, i: int):
        env = dict(os.environ, **{_CONFIG_ENV: config_to_json(self.config)})
        self.procs[i] = subprocess.Popen([sys.executable, "-c", "from vibrato.server.workers import main; main()",
                                          str(i)], env=env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        log.info("query worker started", extra={"fields": {"worker": i, "pid": self.procs[i].pid}})

    async def start(self):
        from vibrato.engine.shared_state import FollowerProgress
        self.progress = FollowerProgress.create(self.config.tmp_dir, self.count + 1)  # slot i: worker i
        self.listen_progress()
        for i in range(1, self.count + 1):
            self._spawn(i)
        self._task = asyncio.create_task(self._supervise(), name="vibrato-worker-supervisor")

    async def _supervise(self):
        while not self._stopping:
            await asyncio.sleep(RESTART_DELAY_SECS)
            for i, proc in list(self.procs.items()):
                code = proc.poll()
                if code is not None and not self._stopping:
                    log.error("query worker exited; starting it again",
                              extra={"fields": {"worker": i, "pid": proc.pid, "exit_code": code}})
                    self.restarts += 1
                    self.progress.report(i, 0, 0)  # nothing to wait for until the new one reports
                    self._spawn(i)

    async def stop(self, timeout: float):
        """SIGTERM every worker and wait for them to drain (SIGKILL after `timeout`)."""
        self._stopping = True
        self.close_progress()
        if self._task is not None:
            self._task.cancel()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                await asyncio.to_thread(proc.wait, max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("query worker did not drain in time; killing it", extra={"fields": {"pid": proc.pid}})
                proc.kill()
                await asyncio.to_thread(proc.wait)
        self._spawner.shutdown(wait=False)

    async def listening(self, timeout: float) -> bool:
        """True once every worker answers on its state socket (it starts that right after the port)."""
        deadline = time.monotonic() + timeout
        pending = set(self.procs)
        while pending and time.monotonic() < deadline and not self._stopping:
            for i in list(pending):
                try:
                    await asyncio.to_thread(_get_unix, self.socket_path(i), "/internal/state")
                    pending.discard(i)
                except (OSError, ValueError, http.client.HTTPException):
                    pass
            if pending:
                await asyncio.sleep(0.05)
        return not pending

    def listen_progress(self):
        """Bind PROGRESS_SOCKET and read it on the running loop: each datagram wakes the waiting writes."""
        from vibrato.engine.shared_state import wake_socket
        try:
            sock = wake_socket(os.path.join(self.config.tmp_dir, PROGRESS_SOCKET))
        except OSError as exc:
            log.warning("no progress socket for the query workers (%s): waiting writes poll", exc)
            return
        sock.setblocking(False)
        self._progress_sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_progress)

    def _on_progress(self):
        try:
            while self._progress_sock.recv(64):  # drain: one look covers every datagram queued
                pass
        except OSError:  # BlockingIOError: drained
            pass
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)

    async def _progressed(self, timeout: float):
        """Until a worker's datagram arrives, or `timeout` s."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiters.add(fut)
        timer = loop.call_later(timeout, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            timer.cancel()
            self._waiters.discard(fut)

    def close_progress(self):
        if self._progress_sock is not None:
            asyncio.get_running_loop().remove_reader(self._progress_sock.fileno())
            self._progress_sock.close()
            self._progress_sock = None
            try:
                os.unlink(os.path.join(self.config.tmp_dir, PROGRESS_SOCKET))
            except OSError:
                pass

    async def caught_up(self, lsn: int):
        """Hold a write's acknowledgement until every live worker has applied `lsn` (at most
        ACK_WAIT_SECS; see the module docstring). Checked, then slept on until a worker's datagram
        (or ACK_POLL_SECS), with no await in between: a datagram can never fall between the two."""
        deadline = None
        while True:
            behind = []
            for i in self.procs:
                pid, applied = self.progress.read(i)
                if pid and applied < lsn and self.procs[i].poll() is None:
                    behind.append(i)
                elif i in self._lagging:
                    self._lagging.discard(i)
            waiting = [i for i in behind if i not in self._lagging]
            if not waiting:
                return
            now = time.monotonic()
            if deadline is None:
                deadline = now + ACK_WAIT_SECS
            elif now > deadline:
                log.warning("query workers %s did not apply lsn %d within %g s; acknowledging without them",
                            waiting, lsn, ACK_WAIT_SECS)
                self._lagging.update(waiting)
                return
            await self._progressed(min(ACK_POLL_SECS, deadline - now + 0.001))

    def states(self) -> list[dict]:
        """Every running worker's counters (blocking: render() runs on the executor)."""
        out = []
        for i, proc in self.procs.items():
            if proc.poll() is not None:
                continue
            try:
                out.append(_get_unix(self.socket_path(i), "/internal/state"))
            except (OSError, ValueError, http.client.HTTPException) as exc:
                log.warning("could not read query worker %d's counters: %s", i, exc)
        return out


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(unix_address(self._path))


def _get_unix(path: str, target: str) -> dict:
    conn = _UnixHTTPConnection(path, STATE_TIMEOUT_SECS)
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise ValueError(f"{target} answered {resp.status}")
        return orjson.loads(body)
    finally:
        conn.close()


# ---------------------------------------------------------------------------- worker side
async def forward(request: web.Request, session, request_id: str) -> web.Response:
    """Pass an authenticated request on to the writer and its answer back (body streamed)."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
    headers[FORWARDED_FOR] = request.remote or ""
    headers["x-request-id"] = request_id  # the writer logs and audits it under the id the client gets
    data = request.content if request.body_exists else None
    async with session.request(request.method, "http://writer" + request.path_qs, headers=headers, data=data,
                               allow_redirects=False) as resp:
        body = await resp.read()
        out = web.Response(status=resp.status, body=body,
                           headers={k: v for k, v in resp.headers.items() if k.lower() in _KEEP_RESPONSE})
    return out


def follow_writer(follower, config: Config, index: int):
    """Worker side: keep `follower` current in a thread, woken by the writer's datagrams, and report
    each applied lsn in slot `index` of the writer's followers state. Returns what to call after
    follower.close(); None (and no thread) when the file cannot be opened: queries then catch up
    themselves."""
    from vibrato.engine.shared_state import FollowerProgress, wake_socket
    try:
        progress = FollowerProgress.open(config.tmp_dir)
        progress.read(index)
    except (OSError, ValueError, IndexError, UnsafePathError) as exc:
        log.warning("query worker %d: no followers state (%s); queries catch up themselves", index, exc)
        return None
    wake_path = os.path.join(config.tmp_dir, WAKE_SOCKET.format(index))
    try:
        wake = wake_socket(wake_path)
        wake_ino = os.stat(wake_path).st_ino
    except OSError as exc:
        log.warning("query worker %d: no wake-up socket (%s); following by polling", index, exc)
        wake = None
    pid = os.getpid()
    writer_wake = unix_address(os.path.join(config.tmp_dir, PROGRESS_SOCKET))
    tell = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)

    def report(applied: int):
        progress.report(index, pid, applied)
        try:  # wake the writes waiting for this worker (they also look every ACK_POLL_SECS)
            tell.sendto(b"p", writer_wake)
        except OSError:  # not bound (yet), or its queue full: a wake-up is pending anyway
            pass
    follower.follow(report, wake)

    def stop_following():
        """After follower.close() (which stops the thread): the slot says no worker, the socket goes."""
        progress.report(index, 0, 0)
        progress.close()
        tell.close()
        if wake is not None:
            wake.close()
            try:  # unless a newer worker i (this one was still draining) has bound the path since
                if os.stat(wake_path).st_ino == wake_ino:
                    os.unlink(wake_path)
            except OSError:
                pass
    return stop_following


# ---------------------------------------------------------------------------- internal routes
def _internal_only(request: web.Request):
    if not is_internal(request):
        raise web.HTTPNotFound()
    from vibrato.server import state as K
    request[K.UNCOUNTED] = True
    return K


async def internal_audit(request: web.Request) -> web.Response:
    """The writer: audit events recorded by a query worker."""
    K = _internal_only(request)
    request.app[K.AUDIT].extend(orjson.loads(await request.read()))
    return web.Response(status=204)


async def internal_state(request: web.Request) -> web.Response:
    """A query worker: its counters, for the writer's /v2/metrics and /v2/admin/stats."""
    K = _internal_only(request)
    body = {"metrics": request.app[K.METRICS].state(), "engine": request.app[K.ENGINE].counters.as_dict()}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def merged_stats(stats: dict, states: list) -> dict:
    """engine.stats() with the query workers' engine counters (query_total, identify_total) added."""
    out = dict(stats)
    for st in states:
        for name in ("query_total", "identify_total"):
            out[name] = out.get(name, 0) + int(st["engine"].get(name, 0))
    return out


def _die_with_parent():
    """PR_SET_PDEATHSIG: SIGTERM this worker when the writer exits, however it exits."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the writer is already gone
        sys.exit(0)


def _pin(config: Config, index: int) -> int | None:
    """--pin-query-workers auto: run on one CPU (config.worker_cpu), every thread of the process; the
    threads started later inherit it. The CPU, or None when not pinned."""
    from vibrato.config import worker_cpu
    if config.pin_query_workers != "auto":
        return None
    try:
        cpu = worker_cpu(index, config.query_workers, os.sched_getaffinity(0))
        if cpu is not None:
            for tid in os.listdir("/proc/self/task"):
                os.sched_setaffinity(int(tid), {cpu})
    except OSError as exc:  # a sandbox may refuse it: the scheduler places the worker then
        log.warning("query worker %d could not be pinned to a CPU: %s", index, exc)
        return None
    return cpu


def main():
    """Entry point of a query worker process (started by WorkerPool, never by hand)."""
    _die_with_parent()
    index = int(sys.argv[1])
    config = config_from_json(os.environ.pop(_CONFIG_ENV))
    cpu = _pin(config, index)  # first: before logs.configure starts a thread
    from vibrato.server import logs
    from vibrato.server.app import serve_worker
    logs.configure(config.log_level)
    if cpu is not None:
        log.info("query worker pinned to a CPU", extra={"fields": {"worker": index, "cpu": cpu}})
    try:
        serve_worker(config, index)
    except Exception as exc:  # noqa: BLE001
        log.error("query worker %d failed: %s", index, exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
