"""Typed keys for everything the app and its requests carry (no globals).

AppKeys hold per-app resources created by `create_app`'s cleanup contexts; RequestKeys hold
per-request values set by the middlewares and handlers.
"""
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from vibrato.apikeys import KeyStore
from vibrato.config import Config
from vibrato.server.audit import AuditWriter
from vibrato.server.metrics import ServerMetrics
from vibrato.server.schemas import Validator


@dataclass(frozen=True)
class Policy:
    """How one route is authorized and audited.

    role: required key role (None = no auth). public_when_flag: the route is public when
    --public-health-metrics is true (health: query role otherwise; metrics: admin).
    audited: audit success and failure (auth failures are audited on every route).
    """
    path: str
    action: str
    role: str | None
    audited: bool = False
    public_when_flag: bool = False


class InFlight:
    """Requests being handled, so shutdown can drain them before aiohttp closes connections.

    (aiohttp's own shutdown stops reading from every connection first, so a request whose body is
    still arriving would hang until the timeout; `serve` therefore stops the listeners, waits for
    `idle()`, and only then runs the runner's cleanup.) Event-loop thread only.
    """

    def __init__(self):
        self.count = 0
        self.draining = False
        self._idle = None

    def enter(self):
        self.count += 1

    def leave(self):
        self.count -= 1
        if self.count == 0 and self._idle is not None:
            self._idle.set()

    async def idle(self):
        import asyncio
        self.draining = True
        if self.count == 0:
            return
        self._idle = asyncio.Event()
        await self._idle.wait()


CONFIG = web.AppKey("config", Config)
ENGINE = web.AppKey("engine", object)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
KEYSTORE = web.AppKey("keystore", KeyStore)
METRICS = web.AppKey("metrics", ServerMetrics)
AUDIT = web.AppKey("audit", AuditWriter)
VALIDATOR = web.AppKey("validator", Validator)
POLICIES = web.AppKey("policies", dict)
OPENAPI = web.AppKey("openapi", bytes)
INFLIGHT = web.AppKey("inflight", InFlight)
WORKERS = web.AppKey("workers", object)           # the writer's WorkerPool (None: one process)
FORWARDER = web.AppKey("forwarder", object)       # a query worker's ClientSession to the writer

REQUEST_ID = web.RequestKey("request_id", str)
STARTED = web.RequestKey("started", tuple)          # (unix time, perf_counter) at arrival
KEY_ID = web.RequestKey("key_id", str)
AUTH_FAILED = web.RequestKey("auth_failed", bool)
AUDIT_DETAILS = web.RequestKey("audit_details", dict)
ERROR_MESSAGE = web.RequestKey("error_message", str)
UNCOUNTED = web.RequestKey("uncounted", bool)     # forwarded or internal: not counted, logged or audited here
