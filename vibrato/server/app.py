"""The aiohttp application factory and the `serve-v2` runner.

`create_app(config, engine=None)` builds the app and does nothing else: resources are opened by
cleanup contexts when the app starts, in this order, and closed in reverse:

1. engine — `Engine.open_config(config, recover_async=True)` takes the data-dir lock, opens the
   catalog and starts recovery in the background, so the port binds at once (CONTRACT.md D21); then the
   pepper, the bootstrap admin key (printed on stdout before the port is bound) and the key store.
   An engine passed in by the caller is used as is and not closed.
2. executor — the ThreadPoolExecutor for every blocking call (engine, catalog reads for auth).
3. audit writer — flushes every 250 ms / 500 events; flushed on shutdown.
4. background loops — a readiness watcher that logs when recovery finishes.

`serve(config)` runs the app behind the hardened connection layer of `protocol.py` (keep-alive,
header and body timeouts, the connection cap, value-free 400s) until SIGTERM/SIGINT, then shuts
down gracefully (CONTRACT.md D22): stop accepting, let in-flight requests finish (up to
`shutdown_timeout_secs`), flush the audit queue, `engine.close()` (TRUNCATE-checkpoints the SQLite
WAL and releases the lock).
"""
import asyncio
import logging
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from vibrato import apikeys
from vibrato.config import Config
from vibrato.datadir import unix_address
from vibrato.engine.memory import freeze_heap, tune_allocator
from vibrato.engine.throttle import lower_process_priority
from vibrato.server import handlers as h
from vibrato.server import openapi
from vibrato.server import state as K
from vibrato.server.audit import AuditWriter
from vibrato.server.metrics import ServerMetrics
from vibrato.server import workers
from vibrato.server.middlewares import (access_middleware, auth_middleware, deferred_expect_handler, error_middleware,
                                        forward_middleware, request_id_middleware)
from vibrato.server.protocol import loop_exception_handler, make_runner, run
from vibrato.server.schemas import Validator
from vibrato.server.state import Policy

log = logging.getLogger("vibrato.server")


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: object
    policy: Policy
    summary: str
    request: str | None = None
    responses: dict = field(default_factory=dict)
    body_optional: bool = False   # the request body may be left out
    description: str = ""         # OpenAPI text; {limit names} are filled from Config.limits


def _route(method, path, handler, action, role, summary, *, audited=False, public=False, request=None,
           responses=None, body_optional=False, description=""):
    return Route(method, path, handler, Policy(path, action, role, audited, public), summary, request,
                 responses or {}, body_optional, description)


ROUTES = (
    _route("POST", "/v2/vectors", h.ingest, "ingest", "ingest", "Ingest one vector", audited=True,
           request="IngestRequest", responses={"201": "IngestResponse", "409": "Error", "429": "backpressure"}),
    _route("POST", "/v2/vectors/batch", h.ingest_batch, "ingest_batch", "ingest",
           "Ingest a batch atomically (all or nothing)", audited=True, request="BatchIngestRequest",
           responses={"201": "BatchIngestResponse", "409": "Error", "429": "backpressure"}),
    _route("POST", "/v2/vectors/delete", h.delete, "delete", "ingest",
           "Delete vectors by id or by filter (durable and invisible to every later query when answered)",
           audited=True, request="DeleteRequest", responses={"200": "DeleteResponse"},
           description="Exactly one of `ids` (at most {max_delete_ids} ids, --max-delete-ids) or `filter` (the "
                       "query filter's clauses plus `source_file`: one name or at most {max_delete_source_files} "
                       "names, --max-delete-source-files; at least one condition). Ids that do not exist or are "
                       "already deleted count 0; `lsn` is null when nothing was deleted. Shape errors (unknown "
                       "field, ids not an array) are 422; an id that is not a u64 integer, both or neither of "
                       "ids and filter, an empty filter, an empty source_file list and values above a limit are "
                       "400. The payloads "
                       "leave the data dir as segments are rewritten, or at once with POST /v2/admin/compact "
                       "{{\"purge\": true}}."),
    _route("DELETE", "/v2/vectors/{id}", h.delete_one, "delete", "ingest", "Delete one vector by id",
           audited=True, responses={"200": "DeleteResponse"},
           description="Answers like POST /v2/vectors/delete with {{\"ids\": [id]}} (deleted 0 or 1); an id that "
                       "is not an integer from 0 to 2^64-1 is 400."),
    _route("POST", "/v2/query", h.query, "query", "query", "k-nearest-neighbour search (inner product)",
           audited=True, request="QueryRequest", responses={"200": "QueryResponse"}),
    _route("POST", "/v2/identify", h.identify, "identify", "query", "Identify a sequence of frames",
           audited=True, request="IdentifyRequest", responses={"200": "IdentifyResponse"}),
    _route("GET", "/v2/health/live", h.health_live, "health_live", "query", "Liveness", public=True,
           responses={"200": "HealthResponse"}),
    _route("GET", "/v2/health/ready", h.health_ready, "health_ready", "query", "Readiness (503 until ready)",
           public=True, responses={"200": "HealthResponse", "503": "HealthResponse"}),
    _route("POST", "/v2/admin/checkpoint", h.admin_checkpoint, "checkpoint", "admin",
           "Flush the WAL tail into an L0 segment", audited=True, responses={"200": "JobResponse"}),
    _route("POST", "/v2/admin/compact", h.admin_compact, "compact", "admin",
           "Run one compaction step, or purge deleted rows", audited=True, request="CompactRequest",
           body_optional=True, responses={"200": "JobResponse"},
           description="Without a body (or with {{\"purge\": false}}) one compaction step. With {{\"purge\": "
                       "true}} it erases the payloads of every delete acknowledged before it starts (checkpoint, "
                       "rewrite the segments holding them, erase the catalog's copies, delete quarantined files, "
                       "truncate the SQLite WAL) and answers when that is durable: job_id prg_..., state completed, "
                       "details purged_ids, checkpoints, segments_rewritten, obsolete_files_deleted, "
                       "quarantine_files_deleted, vacuumed, seconds. It can take minutes."),
    _route("POST", "/v2/admin/snapshot", h.admin_snapshot, "snapshot", "admin", "Create a snapshot",
           audited=True, responses={"200": "JobResponse"}),
    _route("GET", "/v2/admin/stats", h.admin_stats, "stats", "admin", "Engine statistics",
           responses={"200": "StatsResponse"}),
    _route("GET", "/v2/metrics", h.metrics, "metrics", "admin", "Prometheus metrics", public=True,
           responses={"200": "text"}),
    _route("GET", "/v2/openapi.json", h.openapi, "openapi", None, "This document",
           responses={"200": "OpenApiResponse"}),
)


def default_threads() -> int:
    return min(32, 4 * (os.cpu_count() or 1) + 4)


def create_app(config: Config, engine=None, *, worker: int | None = None) -> web.Application:
    """Build the app for `config`; resources open when it starts (see the module docstring).
    worker: this is query worker `worker` and `engine` its Follower (server/workers.py)."""
    chain = [request_id_middleware, access_middleware, error_middleware, auth_middleware]
    app = web.Application(middlewares=chain + ([forward_middleware] if worker is not None else []),
                          client_max_size=config.limits.max_body_bytes + 1)
    app[K.CONFIG] = config
    app[K.METRICS] = ServerMetrics()
    app[K.VALIDATOR] = Validator(config)
    app[K.POLICIES] = {r.path: r.policy for r in ROUTES}
    app[K.OPENAPI] = orjson.dumps(openapi.build(ROUTES, dim=config.dim, limits=config.limits))
    app[K.INFLIGHT] = inflight = K.InFlight()
    app[K.METRICS].in_flight_fn = lambda: inflight.count
    app[K.WORKERS] = None
    for r in ROUTES:
        if r.method == "GET":
            app.router.add_get(r.path, r.handler, expect_handler=deferred_expect_handler)
        else:
            app.router.add_route(r.method, r.path, r.handler, expect_handler=deferred_expect_handler)
    if worker is None:
        app.router.add_post("/internal/audit", workers.internal_audit)
    else:
        app.router.add_get("/internal/state", workers.internal_state)
    holder = _Resources(engine, worker)
    app.cleanup_ctx.append(holder.engine_ctx)
    app.cleanup_ctx.append(holder.executor_ctx)
    if worker is not None:
        app.cleanup_ctx.append(holder.forwarder_ctx)
    app.cleanup_ctx.append(holder.audit_ctx)
    app.cleanup_ctx.append(holder.background_ctx)
    return app


class _Resources:
    """The cleanup contexts of one app (setup before `yield`, teardown after)."""

    def __init__(self, engine, worker=None):
        self.given_engine = engine
        self.worker = worker

    async def engine_ctx(self, app: web.Application):
        config = app[K.CONFIG]
        engine = self.given_engine
        if engine is None:
            from vibrato.engine import Engine  # imported here: the engine loads native modules
            engine = await asyncio.to_thread(Engine.open_config, config, recover_async=True, background=True)
        try:
            pepper = await asyncio.to_thread(apikeys.load_pepper, config.data_dir)
            if config.bootstrap_admin_key:
                token = await asyncio.to_thread(apikeys.bootstrap_admin_key, engine.catalog, pepper)
                if token is not None:
                    sys.stdout.write(f"BOOTSTRAP_ADMIN_KEY={token}\n")
                    sys.stdout.flush()
            app[K.ENGINE] = engine
            app[K.KEYSTORE] = apikeys.KeyStore(engine.catalog, pepper, ttl=config.key_cache_ttl_secs)
            if self.worker is None:
                app[K.METRICS].bind_stats(lambda: _stats(app))
        except BaseException:
            if self.given_engine is None:
                await asyncio.to_thread(engine.close)
            raise
        yield
        if self.given_engine is None:
            log.info("closing engine")
            await asyncio.to_thread(engine.close)
            log.info("engine closed; data-dir lock released")

    async def executor_ctx(self, app: web.Application):
        config = app[K.CONFIG]
        executor = ThreadPoolExecutor(max_workers=config.server_threads or default_threads(),
                                      thread_name_prefix="vibrato-http")
        app[K.EXECUTOR] = executor
        yield
        await asyncio.to_thread(executor.shutdown, wait=True)

    async def forwarder_ctx(self, app: web.Application):
        """A query worker's connection pool to the writer's internal socket."""
        import aiohttp
        path = os.path.join(app[K.CONFIG].tmp_dir, workers.INTERNAL_SOCKET)
        session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=unix_address(path), limit=64),
                                        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        app[K.FORWARDER] = session
        yield
        await session.close()

    async def audit_ctx(self, app: web.Application):
        config = app[K.CONFIG]
        if self.worker is None:
            writer = AuditWriter(app[K.ENGINE].catalog, app[K.METRICS], retention_days=config.audit_retention_days)
        else:
            session = app[K.FORWARDER]

            async def to_writer(rows):  # the writer stamps its own flush time
                body = orjson.dumps([r[:-1] for r in rows])
                async with session.post("http://writer/internal/audit", data=body) as resp:
                    if resp.status != 204:
                        raise RuntimeError(f"the writer answered {resp.status}")
            writer = AuditWriter(None, app[K.METRICS], sink=to_writer, retention_days=0, aggregate_auth=False)
        app[K.AUDIT] = writer
        await writer.start()
        yield
        await writer.close()
        log.info("audit queue flushed", extra={"fields": {"audit_events_written": writer.written_total}})

    async def background_ctx(self, app: web.Application):
        task = asyncio.create_task(_watch_readiness(app), name="vibrato-readiness-watch")
        yield
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


def _stats(app: web.Application) -> dict:
    """engine.stats(), with the query workers' counters when there are any (blocking)."""
    stats = app[K.ENGINE].stats()
    pool = app[K.WORKERS]
    return workers.merged_stats(stats, pool.states()) if pool is not None else stats


async def _watch_readiness(app: web.Application):
    """Log the recovery report once recovery finishes (readiness itself is evaluated per request)."""
    engine = app[K.ENGINE]
    delay = 0.05
    while True:
        try:
            ready, report = await asyncio.to_thread(engine.readiness)
        except Exception as exc:  # noqa: BLE001
            log.warning("readiness check failed: %s", exc)
            ready, report = False, str(exc)
        if report != "recovering":
            log.info(report, extra={"fields": {"ready": ready}})
            return
        await asyncio.sleep(delay)
        delay = min(1.0, delay * 2)


# ---------------------------------------------------------------------------- the serve-v2 runner
def bind_host(host: str) -> str:
    """Hostnames, IPv4 and IPv6 literals (with or without brackets) are accepted (CONTRACT.md D26)."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def refuse_taken_port(host: str, port: int) -> None:
    """Raise OSError when anything already listens on host:port. With query workers every process
    binds with SO_REUSEPORT, and Linux lets any other SO_REUSEPORT socket of the same user join the
    port: a second server started there (another data dir, say) would silently take a share of the
    connections. A bind without the option fails on a port any socket holds, so one is tried first."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc}") from exc
    for family, addr in dict.fromkeys((info[0], info[4]) for info in infos):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio binds it
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(addr)
            except OSError as exc:
                raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc} "
                              "(another server already listens there)") from exc


def serve(config: Config) -> None:
    """Run serve-v2 until SIGTERM/SIGINT. Raises on startup failure (locked data dir, port in use)."""
    tune_allocator()
    # with query workers the writer is off the query path (it takes forwarded writes): no polling
    run(_serve(config), 0 if config.worker_processes else config.idle_spin_us)


FD_RESERVE = 256  # descriptors kept for the engine (catalog, segments, WAL), logs and refused sockets


def fd_budget(max_connections: int) -> int:
    """Raise the soft open-file limit to fit `max_connections` plus FD_RESERVE if the hard limit
    allows; otherwise warn and return the connection cap that does fit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < want:
        cap = max(1, min(max_connections, soft - FD_RESERVE if soft > 2 * FD_RESERVE else soft // 2))
        log.warning("open-file limit %d is below --max-connections %d + %d reserved; capping connections at %d "
                    "(raise `ulimit -n` / LimitNOFILE=)", soft, max_connections, FD_RESERVE, cap)
        return cap
    return max_connections


def _stop_on_signals() -> asyncio.Event:
    """The running loop's exception handler set, and an event that SIGTERM/SIGINT set."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(loop_exception_handler)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _drain(app: web.Application, config: Config):
    """Let in-flight requests finish, for at most shutdown_timeout_secs."""
    try:
        await asyncio.wait_for(app[K.INFLIGHT].idle(), config.shutdown_timeout_secs)
    except asyncio.TimeoutError:
        log.warning("shutdown timeout: cancelling %d in-flight requests", app[K.INFLIGHT].count)


async def _serve(config: Config) -> None:
    stop = _stop_on_signals()
    # resolved once here: the workers' count, each one's share of --max-connections, the log line
    workers_count = config.worker_processes
    several = workers_count > 0
    config = config.replace(query_workers=max(1, workers_count))  # with `several`: how many workers
    if several:
        config = config.replace(publish_state=True)
    app = create_app(config)
    runner = make_runner(app, config.replace(max_connections=fd_budget(config.max_connections)))
    try:
        await runner.setup()
    except BaseException:
        # Contexts that did start (e.g. the engine, if a later one failed) are closed in reverse.
        try:
            await runner.cleanup()
        except Exception:  # noqa: BLE001 - the setup error is the one to report
            log.exception("cleanup after a failed startup")
        raise
    try:
        host = bind_host(config.host)
        if several:
            refuse_taken_port(host, config.port)
        site = web.TCPSite(runner, host, config.port, reuse_address=True, reuse_port=several or None)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from exc
        internal = None
        if several:
            internal = web.UnixSite(runner, unix_address(os.path.join(config.tmp_dir, workers.INTERNAL_SOCKET)))
            await internal.start()
            starter = asyncio.create_task(_start_workers(app, config, site), name="vibrato-start-workers")
        else:
            starter = asyncio.create_task(_when_recovered(app[K.ENGINE]), name="vibrato-freeze-heap")
        shown = f"[{host}]" if ":" in host else host
        log.info(f"Starting Vibrato v2 server on http://{shown}:{config.port}",
                 extra={"fields": {"data_dir": str(config.data_dir), "collection": config.collection,
                                   "dim": config.dim, "pid": os.getpid()}})
        from vibrato.server.notify import Notifier  # systemd READY=1/STOPPING=1; no-op without NOTIFY_SOCKET
        notifier = Notifier.start(app[K.ENGINE])
        await stop.wait()
        notifier.stopping()
        log.info("shutdown requested: no longer accepting connections, finishing in-flight requests",
                 extra={"fields": {"in_flight": app[K.INFLIGHT].count}})
        if site in runner.sites:  # with workers serving, the writer already left the port
            await site.stop()
        starter.cancel()
        if several:
            if app[K.WORKERS] is not None:  # they drain first: their forwarded requests need the writer
                await app[K.WORKERS].stop(config.shutdown_timeout_secs + 5)
        for s in list(runner.sites):
            await s.stop()
        await _drain(app, config)
    finally:
        await runner.cleanup()
    log.info("shutdown complete")


async def _when_recovered(engine):
    """Wait until recovery is over, then freeze the heap: what start-up and recovery built lives as
    long as the process, and out of the garbage collector's full passes it no longer stalls queries
    (engine/memory.py)."""
    while engine.readiness()[1] == "recovering":
        await asyncio.sleep(0.05)
    freeze_heap()


async def _start_workers(app: web.Application, config: Config, site: web.TCPSite):
    """Start the query workers once recovery has published the serving state; once they all listen,
    the writer leaves the public port to them (server/workers.py)."""
    engine = app[K.ENGINE]
    await _when_recovered(engine)
    if engine.shared_state is None:
        log.error("recovery failed: no query workers are started")
        return
    pool = workers.WorkerPool(config, config.query_workers)
    engine.shared_state.wake_followers(pool.wake_paths())
    await pool.start()
    engine.shared_state.defer_visible = True  # published by the write handlers once workers applied it
    app[K.WORKERS] = pool
    if await pool.listening(workers.START_TIMEOUT_SECS):
        await site.stop()
        if config.writer_nice:  # queries first when the cores are busy (docs/SERVER.md)
            lower_process_priority(config.writer_nice, keep={pool.spawner_tid})
        log.info("query workers serving the port; the writer takes their forwarded requests",
                 extra={"fields": {"workers": config.query_workers, "writer_nice": config.writer_nice}})
    else:
        log.error("query workers did not start listening in time; the writer keeps serving the port too")


# ---------------------------------------------------------------------------- a query worker
def serve_worker(config: Config, index: int) -> None:
    """Run query worker `index` until SIGTERM (server/workers.py)."""
    tune_allocator()
    # --max-connections is the server's: each of the N workers takes its share (the writer, off the
    # port once they listen, keeps its own cap for its start-up and forwarded requests)
    share = max(1, config.max_connections // config.query_workers)
    run(_serve_worker(config.replace(bootstrap_admin_key=False, publish_state=False, query_workers=1,
                                     max_connections=share), index), config.idle_spin_us)


def _open_follower(config: Config):
    from vibrato.engine.follower import Follower
    deadline = time.monotonic() + 60
    while True:
        try:
            return Follower(config)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


async def _serve_worker(config: Config, index: int) -> None:
    stop = _stop_on_signals()
    engine = await asyncio.to_thread(_open_follower, config)
    stop_following = workers.follow_writer(engine, config, index)
    app = create_app(config, engine=engine, worker=index)
    runner = make_runner(app, config.replace(max_connections=fd_budget(config.max_connections)))
    try:
        await runner.setup()
        site = web.TCPSite(runner, bind_host(config.host), config.port, reuse_address=True, reuse_port=True)
        await site.start()
        state_path = os.path.join(config.tmp_dir, workers.WORKER_SOCKET.format(index))
        state_site = web.UnixSite(runner, unix_address(state_path))
        await state_site.start()
        log.info("query worker serving", extra={"fields": {"worker": index, "pid": os.getpid()}})
        freeze_heap()  # the follower is loaded (engine/memory.py)
        await stop.wait()
        await site.stop()
        await _drain(app, config)
    finally:
        await runner.cleanup()  # flushes the audit queue to the writer
        engine.close()
        if stop_following is not None:
            stop_following()
