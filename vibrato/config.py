"""One frozen, typed configuration shared by `serve-v2`, the engine and the admin commands.

Field names match the serve-v2 flags (with dashes as underscores); defaults are v2.1's (CONTRACT.md §1.8, R1).
Limits (CONTRACT.md D20) are documented here and answered with 400/413 by the server.
"""
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

MADVISE_MODES = ("normal", "random", "sequential", "willneed")
PIN_MODES = ("auto", "off")
# Each query worker holds its own copy of the un-checkpointed rows and every write waits for each to
# apply it, so `--query-workers 0` stops at this many even on a larger machine (docs/SERVER.md).
MAX_AUTO_QUERY_WORKERS = 8


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, lowered by its cgroup's CPU quota when one is
    set (a container's --cpus, systemd's CPUQuota=)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def worker_cpu(index: int, workers: int, allowed) -> int | None:
    """The CPU query worker `index` (1-based) of `workers` is pinned to under --pin-query-workers auto:
    the index-th of the CPUs this process may run on (`allowed`, its affinity) when there is exactly one
    worker per such CPU, else None (fewer workers, as under a CPU quota or an explicit lower count,
    leave the scheduler free to move them). A worker that stays on one core keeps its caches there:
    moved between cores with wrk's threads, it spent ~5% more CPU per query (perf/README.md)."""
    cpus = sorted(allowed)
    if workers < 2 or len(cpus) != workers or not 1 <= index <= workers:
        return None
    return cpus[index - 1]


def cgroup_cpu_quota(proc_cgroup="/proc/self/cgroup", root="/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in cores (quota / period: cgroup v2 `cpu.max`, or v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`), or None when there is none or it cannot be read."""
    try:
        with open(proc_cgroup) as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    for hier, controllers, rel in (parts for parts in lines if len(parts) == 3):
        rel = rel.rstrip("/")
        if hier == "0" and not controllers:  # v2: "0::/path"
            candidates = [(f"{root}{rel}/cpu.max", None), (f"{root}/cpu.max", None)]
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/path"
            base = f"{root}/{controllers}"
            candidates = [(f"{base}{rel}/cpu.cfs_quota_us", f"{base}{rel}/cpu.cfs_period_us"),
                          (f"{base}/cpu.cfs_quota_us", f"{base}/cpu.cfs_period_us")]
        else:
            continue
        for quota_path, period_path in candidates:
            try:
                with open(quota_path) as f:
                    fields = f.read().split()
                if period_path is not None:
                    with open(period_path) as f:
                        fields += f.read().split()
                quota, period = fields[0], fields[1]
                if quota in ("max", "-1"):
                    return None
                return int(quota) / int(period)
            except (OSError, ValueError, IndexError, ZeroDivisionError):
                continue
    return None


@dataclass(frozen=True)
class Limits:
    max_k: int = 1000                 # query/identify k
    max_ef: int = 4096                # query/identify ef
    max_batch: int = 10_000           # vectors per /v2/vectors/batch
    max_identify_frames: int = 4096   # frames per /v2/identify
    max_tags: int = 64                # tags per vector and per filter clause
    max_tag_bytes: int = 128          # utf-8 bytes per tag
    max_source_file_bytes: int = 4096
    max_idempotency_key_bytes: int = 256
    max_body_bytes: int = 2 * 1024 * 1024  # v2.1's (axum's) default body limit (CONTRACT.md §2)
    max_delete_ids: int = 10_000      # ids per /v2/vectors/delete (CONTRACT.md D40)
    max_delete_source_files: int = 1000  # source_file names in one delete filter


@dataclass(frozen=True)
class Config:
    data_dir: Path = Path("vibrato_data")
    collection: str = "default"
    dim: int = 128
    # server
    host: str = "0.0.0.0"
    port: int = 8080
    public_health_metrics: bool = True
    bootstrap_admin_key: bool = False
    shutdown_timeout_secs: float = 30.0   # graceful shutdown: wait this long for in-flight requests
    audit_retention_days: int = 30        # audit rows older than this are pruned (0 keeps them forever)
    server_threads: int = 0               # executor threads for blocking work; 0 = min(32, 4 * cpus + 4)
    inline_search: bool = True            # small queries (k <= 100, ef <= 256) run on the event loop
    fast_query_path: bool = True          # such queries skip aiohttp's request machinery (server/fastpath.py)
    query_workers: int = 0                # processes serving HTTP: 1 the writer; N > 1 query workers
                                          # (server/workers.py); 0 = one per usable core, at most
                                          # MAX_AUTO_QUERY_WORKERS
    writer_nice: int = 19                 # with query workers: the writer's nice value once they serve the port
    pin_query_workers: str = "auto"       # auto: worker i runs on the i-th allowed CPU when there is one per CPU
    idle_spin_us: int = 100               # a serving loop polls this long before it sleeps (server/protocol.py)
    key_cache_ttl_secs: float = 1.0       # API-key cache entry lifetime; revocation applies within it (CONTRACT.md D17)
    keepalive_timeout_secs: float = 75.0  # an idle connection (no request in progress) is closed after this
    header_timeout_secs: float = 10.0     # time allowed to receive a request head, from its first byte
    body_timeout_secs: float = 0.0        # time allowed to receive a body; 0 = max(30 s, max_body_bytes / 64 KiB/s)
    max_connections: int = 1024           # open client connections; beyond it new ones get 503 and are closed
    log_level: str = "info"
    # background work
    checkpoint_interval_secs: int = 30
    compaction_interval_secs: int = 180
    orphan_ttl_hours: int = 168
    audio_colocated: bool = True
    background_io_mb_per_sec: int = 40
    # catalog
    catalog_read_timeout_ms: int = 5000
    sqlite_wal_autocheckpoint_pages: int = 1000
    sqlite_wal_max_bytes: int = 64 * 1024 * 1024   # TRUNCATE-checkpoint the SQLite WAL above this
    sqlite_passive_checkpoint_secs: float = 5.0
    wal_retention_secs: int = 3600                 # keep checkpointed vector blobs this long
    # quarantine
    quarantine_max_files: int = 50
    quarantine_max_bytes: int = 5_368_709_120
    # tiers and indexes
    hot_index_shards: int = 8          # accepted for v2.1's CLI; the hot tier is organised in
                                       # hot_exact_rows chunks instead (identify stays exact, CONTRACT.md D1)
    hot_exact_rows: int = 16_384       # hot rows scanned exactly; sealed chunks beyond get an HNSW
    checkpoint_max_rows: int = 50_000  # rows per L0 segment; also triggers an early checkpoint
    hot_max_rows: int = 0              # bound on un-checkpointed rows; 0 = 4 x checkpoint_max_rows (CONTRACT.md D41)
    ingest_backpressure_wait_secs: float = 5.0  # an ingest at the bound waits this long, then 429
    publish_state: bool = False        # keep tmp/serving.state current for follower processes (engine/follower.py)
    compaction_max_inputs: int = 10      # fan-in of a merge; a 1M load's 20 L0s become 2 L1s, not 3 (perf/README.md)
    l2_merge_max_rows: int = 4_000_000  # L2 archive segments are merged until this size (CONTRACT.md D24)
    hnsw_m: int = 16
    hnsw_ef_construction: int = 100    # 200 builds 2.6x slower for +0.002 recall@10 (text set, ef 64)
    l0_ef_construction: int = 48       # hot chunks and L0 segments (rebuilt by compaction): 2.1x faster
                                       # builds, recall@10 0.991 vs 0.998 at ef 64 (50k text rows)
    l1_ef_construction: int = 64       # L1 segments (rebuilt into archives): 1.6x faster builds, recall@10
                                       # at ef 64 0.985 vs 0.988 (text set), 0.955 vs 0.9625 (tiled 100k)
    import_ef_construction: int = 24   # `vibrato import`'s L0 segments (rebuilt by compaction): 2x faster again
    pq_min_rows: int = 256
    archive_rerank_factor: int = 8     # exact rerank of k * factor ADC candidates (CONTRACT.md D14)
    vector_madvise_mode: str = "random"  # v2.1: normal; CONTRACT.md D39
    limits: Limits = field(default_factory=Limits)

    @property
    def worker_processes(self) -> int:
        """The query worker processes serve-v2 starts (0: the writer serves alone). --query-workers N > 1
        starts N and 1 none; 0 (the default) one per core this process may use, at most
        MAX_AUTO_QUERY_WORKERS, and on a single core one beside the writer: there the kernel's scheduler,
        not the GIL, then decides who runs, and a query worker preempts the writer at its lower priority
        (one process: p99 under ingest 23x its p99 alone; one worker: 2.2x; perf/README.md)."""
        if self.query_workers:
            return 0 if self.query_workers == 1 else self.query_workers
        return max(1, min(MAX_AUTO_QUERY_WORKERS, usable_cores()))

    @property
    def effective_body_timeout_secs(self) -> float:
        """--body-timeout-secs, or when 0 the time to receive --max-body-bytes at 64 KiB/s (at least 30 s)."""
        if self.body_timeout_secs > 0:
            return float(self.body_timeout_secs)
        return max(30.0, self.limits.max_body_bytes / 65536.0)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def __post_init__(self):
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        mode = str(self.vector_madvise_mode).strip().lower()
        if mode not in MADVISE_MODES:
            raise ValueError(f"--vector-madvise-mode must be one of {', '.join(MADVISE_MODES)}, got {self.vector_madvise_mode!r}")
        object.__setattr__(self, "vector_madvise_mode", mode)
        if not 1 <= self.dim <= 4096:
            raise ValueError(f"--dim must be between 1 and 4096, got {self.dim}")
        shards = max(1, int(self.hot_index_shards))
        object.__setattr__(self, "hot_index_shards", 1 << (shards - 1).bit_length())
        for name in ("checkpoint_interval_secs", "compaction_interval_secs", "catalog_read_timeout_ms",
                     "quarantine_max_files", "quarantine_max_bytes", "background_io_mb_per_sec",
                     "hot_max_rows", "ingest_backpressure_wait_secs"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.query_workers <= 64:
            raise ValueError(f"--query-workers must be between 0 (one per core) and 64, got {self.query_workers}")
        if not 0 <= self.writer_nice <= 19:
            raise ValueError(f"--writer-nice must be between 0 and 19, got {self.writer_nice}")
        if not 0 <= self.idle_spin_us <= 10_000:
            raise ValueError(f"--idle-spin-us must be between 0 and 10000, got {self.idle_spin_us}")
        pin = str(self.pin_query_workers).strip().lower()
        if pin not in PIN_MODES:
            raise ValueError(f"--pin-query-workers must be one of {', '.join(PIN_MODES)}, got {self.pin_query_workers!r}")
        object.__setattr__(self, "pin_query_workers", pin)
        for name in ("keepalive_timeout_secs", "header_timeout_secs", "max_connections"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.body_timeout_secs < 0:
            raise ValueError(f"--body-timeout-secs must be >= 0, got {self.body_timeout_secs}")
        for name, lo, hi in (("hot_exact_rows", 16, 1 << 22), ("checkpoint_max_rows", 1, 1 << 24),
                             ("compaction_max_inputs", 2, 64), ("hnsw_m", 2, 256),
                             ("hnsw_ef_construction", 1, 4096), ("l0_ef_construction", 1, 4096),
                             ("l1_ef_construction", 1, 4096), ("import_ef_construction", 1, 4096),
                             ("archive_rerank_factor", 1, 1024)):
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}, got {v}")

    # derived paths (the data-dir layout, CONTRACT.md §4.1)
    @property
    def catalog_path(self) -> Path:
        return self.data_dir / "catalog.sqlite3"

    @property
    def segments_dir(self) -> Path:
        return self.data_dir / "segments"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def snapshots_dir(self) -> Path:
        return self.data_dir / "snapshots"

    @property
    def hot_bound(self) -> int:
        """Un-checkpointed rows the hot tier may hold (hot_max_rows, default 4 x checkpoint_max_rows)."""
        return self.hot_max_rows or 4 * self.checkpoint_max_rows

    @property
    def checkpoint_due_rows(self) -> int:
        """Hot rows that make a checkpoint due before its timer: a full checkpoint's, or half the
        hot tier's bound when that is smaller (ingest is held at the bound)."""
        return min(self.checkpoint_max_rows, self.hot_bound // 2)

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"
