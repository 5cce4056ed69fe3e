"""Prometheus metrics for one app (CONTRACT.md D25), exposed through `prometheus_client`.

Everything is registered on a `CollectorRegistry` owned by the app (no global registry). A custom
collector yields metric families, so the 22 v2.1 series (CONTRACT.md §1.6) keep their names,
types and `le` labels exactly (`le="10"`, not `le="10.0"`) and no `_created` series appear.
On top of v2.1's: HELP lines, `vibrato_query_latency_us` buckets continued up to 10 s,
per-route request counters by method and status, per-route latency histograms up to 10 s,
`vibrato_ready`, `vibrato_http_requests_in_flight`, and every other numeric field of `engine.stats()`.

Server-side counters are plain integers mutated on the event loop only; `render()` may run on an
executor thread (it calls `engine.stats()`, which reads the catalog) and only reads them.
"""
from bisect import bisect_left

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4"

# v2.1's µs buckets (CONTRACT.md §1.6), then continued to 10 s (additions only; the first nine are unchanged).
QUERY_LATENCY_BUCKETS_US = (10, 25, 50, 100, 250, 500, 1000, 2500, 5000,
                            10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
                            10_000_000)
HTTP_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# (stats field, metric name, type, help) for the v2.1 series read from engine.stats(), in order.
_STATS_SERIES = [
    ("checkpoint_total", "vibrato_checkpoint_total", "counter", "Completed (non-idle) checkpoints, manual and background."),
    ("compaction_total", "vibrato_compaction_total", "counter", "Completed compactions."),
    ("obsolete_files_deleted_total", "vibrato_obsolete_files_deleted_total", "counter",
     "Obsolete segment files deleted."),
    (None, "vibrato_query_latency_us", "histogram", None),
    ("active_segments", "vibrato_active_segments", "gauge", "Segments loaded and searchable."),
    ("obsolete_segments", "vibrato_obsolete_segments", "gauge", "Catalog segment rows in state obsolete."),
    ("failed_segments", "vibrato_failed_segments", "gauge", "Catalog segment rows in state failed."),
    ("hot_vectors", "vibrato_hot_vectors", "gauge", "Vectors in the hot tier (WAL tail not yet checkpointed)."),
    ("wal_pending", "vibrato_wal_pending", "gauge", "WAL rows not yet checkpointed."),
    ("total_vectors", "vibrato_total_vectors", "gauge", "Vectors stored (tombstones excluded)."),
    ("checkpoint_jobs_inflight", "vibrato_checkpoint_jobs_inflight", "gauge", "Checkpoint jobs building or pending activation."),
    ("compaction_jobs_inflight", "vibrato_compaction_jobs_inflight", "gauge", "Compaction jobs building or pending activation."),
    ("sqlite_wal_bytes", "vibrato_sqlite_wal_bytes", "gauge", "Size of catalog.sqlite3-wal in bytes."),
    ("catalog_read_timeout_total", "vibrato_catalog_read_timeout_total", "counter", "Catalog reads that timed out."),
    ("quarantine_files", "vibrato_quarantine_files", "gauge", "Orphan files in quarantine."),
    ("quarantine_bytes", "vibrato_quarantine_bytes", "gauge", "Bytes of orphan files in quarantine."),
    ("quarantine_evictions_total", "vibrato_quarantine_evictions_total", "counter",
     "Quarantined files evicted by the caps in this process."),
]
_REFERENCE_STATS_FIELDS = {s[0] for s in _STATS_SERIES if s[0]} | {"ready", "live"}

# Addition series whose name or HELP text is not the generic `vibrato_<field>` / "Engine statistic
# <field>.": field -> (name, help). The engine's delete counter is exported under the name the contract
# gives it (CONTRACT.md D40); it counts in the writer only (deletes are forwarded there), so the query
# workers' counters never add to it.
_STATS_NAMES = {
    "delete_vectors_total": ("vibrato_deleted_vectors_total",
                             "Vectors deleted (live when the delete committed) through /v2/vectors/delete and "
                             "DELETE /v2/vectors/{id} since the server started."),
    "deleted_vectors": ("vibrato_deleted_vectors", "Deleted vector ids recorded in the catalog (never served "
                                                   "again)."),
}


def _label(bound: float) -> str:
    """Bucket label as in v2.1 (CONTRACT.md §1.6): integers without '.0'."""
    return str(int(bound)) if float(bound).is_integer() else repr(float(bound))


class Histogram:
    """Cumulative-bucket histogram keyed by a label tuple. Loop-thread writes only."""

    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.series = {}  # labels -> [counts per bucket + overflow, sum]

    def observe(self, value: float, labels: tuple = ()):
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = [[0] * (len(self.buckets) + 1), 0.0]
        s[0][bisect_left(self.buckets, value)] += 1
        s[1] += value

    def state(self) -> list:
        return [[list(labels), counts, total] for labels, (counts, total) in self.series.items()]

    def add_state(self, series: list):
        for labels, counts, total in series:
            s = self.series.setdefault(tuple(labels), [[0] * (len(self.buckets) + 1), 0.0])
            s[0] = [a + int(b) for a, b in zip(s[0], counts)]
            s[1] += float(total)

    def family(self, name, doc, label_names=(), integer=False):
        fam = HistogramMetricFamily(name, doc, labels=list(label_names))
        for labels, (counts, total) in sorted(self.series.items()):
            cum, acc = [], 0
            for bound, c in zip(self.buckets, counts):
                acc += c
                cum.append((_label(bound), acc))
            cum.append(("+Inf", acc + counts[-1]))
            fam.add_metric(list(labels), cum, round(total) if integer else total)
        if not self.series and not label_names:
            fam.add_metric([], [(_label(b), 0) for b in self.buckets] + [("+Inf", 0)], 0)
        return fam


class ServerMetrics:
    """Counters kept by the HTTP layer plus a collector that merges them with `engine.stats()`."""

    def __init__(self):
        self.query_requests = 0
        self.identify_requests = 0
        self.ingest_vectors = 0
        self.auth_failures = 0
        self.audit_failures = 0
        self.query_latency_us = Histogram(QUERY_LATENCY_BUCKETS_US)
        self.http_requests = {}  # (method, route, status) -> count
        self.http_latency = Histogram(HTTP_LATENCY_BUCKETS_S)
        self.registry = CollectorRegistry(auto_describe=False)
        self._stats_fn = None
        self.in_flight_fn = lambda: 0
        self.registry.register(_Collector(self))

    def bind_stats(self, stats_fn):
        """stats_fn() -> engine.stats() dict (blocking; render() runs off the event loop)."""
        self._stats_fn = stats_fn

    def stats(self) -> dict:
        """The bound stats (blocking): /v2/admin/stats."""
        return self._stats_fn()

    def observe_request(self, method: str, route: str, status: int, seconds: float):
        key = (method, route, str(status))
        self.http_requests[key] = self.http_requests.get(key, 0) + 1
        self.http_latency.observe(seconds, (method, route))

    def observe_search(self, kind: str, engine_seconds: float):
        if kind == "query":
            self.query_requests += 1
        else:
            self.identify_requests += 1
        self.query_latency_us.observe(engine_seconds * 1e6)

    def render(self, peer_states=()) -> bytes:
        """The exposition text (blocking: reads engine.stats()), with the counters of `peer_states`
        (other processes' `state()`, server/workers.py) added."""
        if not peer_states:
            return generate_latest(self.registry)
        merged = ServerMetrics()
        for st in (self.state(), *peer_states):
            merged.add_state(st)
        merged._stats_fn, merged.in_flight_fn = self._stats_fn, self.in_flight_fn
        return generate_latest(merged.registry)

    _COUNTS = ("query_requests", "identify_requests", "ingest_vectors", "auth_failures", "audit_failures")

    def state(self) -> dict:
        """Every counter and histogram as JSON-able values (a query worker hands them to the writer)."""
        return {**{name: getattr(self, name) for name in self._COUNTS},
                "http_requests": [[list(k), n] for k, n in self.http_requests.items()],
                "query_latency_us": self.query_latency_us.state(),
                "http_latency": self.http_latency.state()}

    def add_state(self, st: dict):
        for name in self._COUNTS:
            setattr(self, name, getattr(self, name) + int(st[name]))
        for key, n in st["http_requests"]:
            key = tuple(key)
            self.http_requests[key] = self.http_requests.get(key, 0) + int(n)
        self.query_latency_us.add_state(st["query_latency_us"])
        self.http_latency.add_state(st["http_latency"])


class _Collector:
    def __init__(self, m: ServerMetrics):
        self.m = m

    def collect(self):
        m = self.m
        stats = m._stats_fn() if m._stats_fn is not None else {}
        yield CounterMetricFamily("vibrato_query_requests_total", "Successful /v2/query requests.",
                                  value=m.query_requests)
        yield CounterMetricFamily("vibrato_identify_requests_total", "Successful /v2/identify requests with k>0.",
                                  value=m.identify_requests)
        yield CounterMetricFamily("vibrato_ingest_requests_total",
                                  "Vectors created through /v2/vectors and /v2/vectors/batch (replays excluded).",
                                  value=m.ingest_vectors)
        yield CounterMetricFamily("vibrato_auth_failures_total", "Requests rejected by authentication or authorization.",
                                  value=m.auth_failures)
        yield CounterMetricFamily("vibrato_audit_failures_total", "Audit events dropped (queue full or write failed).",
                                  value=m.audit_failures)
        for field, name, kind, doc in _STATS_SERIES:
            if kind == "histogram":
                yield m.query_latency_us.family(
                    "vibrato_query_latency_us", "Engine time of /v2/query and /v2/identify in microseconds.",
                    integer=True)
                continue
            value = _number(stats.get(field, 0))
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield cls(name, doc, value=value)
        # Additions (names outside v2.1's 22, CONTRACT.md §1.6).
        yield GaugeMetricFamily("vibrato_ready", "1 when the engine is ready to serve data requests.",
                                value=1 if stats.get("ready") else 0)
        yield GaugeMetricFamily("vibrato_http_requests_in_flight", "HTTP requests being handled (this one included).",
                                value=m.in_flight_fn())
        for field, value in stats.items():
            if field in _REFERENCE_STATS_FIELDS or field in ("checkpoint_total", "compaction_total"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name, doc = _STATS_NAMES.get(field, ("vibrato_" + field, f"Engine statistic {field}."))
            if field.endswith("_total"):
                yield CounterMetricFamily(name, doc, value=value)
            else:
                yield GaugeMetricFamily(name, doc, value=value)
        req = CounterMetricFamily("vibrato_http_requests_total", "HTTP requests by method, route and status.",
                                  labels=["method", "route", "status"])
        for key, count in sorted(m.http_requests.items()):
            req.add_metric(list(key), count)
        yield req
        yield m.http_latency.family("vibrato_http_request_duration_seconds",
                                    "HTTP request latency by method and route, in seconds.", ("method", "route"))


def _number(value):
    if isinstance(value, bool):
        return int(value)
    return value if isinstance(value, (int, float)) else 0
