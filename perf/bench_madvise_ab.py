"""madvise A/B (CONTRACT.md §6, runbook §11): query latency of the real `vibrato serve-v2` with
`--vector-madvise-mode normal` vs `random`, on one segment larger than the server's page-cache
share, measured cold and warm. Run through `bash scripts/perf/run_madvise_ab.sh` (pytest-benchmark).

Page-cache share: this machine has 24 GiB, so the server runs in a cgroup-v1 memory cgroup whose
limit is its anonymous memory + 64 MiB + VIBRATO_MADVISE_CACHE_SHARE (0.4) x the segment size:
only 40% of the segment fits in its page cache. That is the regime the hint is for: with `normal`
every fault reads ahead ~128 KiB around one 2 KiB vector and the cache thrashes; with `random` only
the touched pages are read. (Measured here: normal p99 3.45 s cold / 3.73 s warm, random 65 ms /
35 ms.) Without a writable memory cgroup the whole segment fits in the page cache, `random` loses
the cold pass to readahead, and the enforced gate refuses to judge (it says why).

Data: VIBRATO_MADVISE_ROWS (250,000) unit vectors of VIBRATO_MADVISE_DIM (512) -> ~0.5 GB of float32
plus the HNSW graph, all in ONE L0 segment built by the engine (ingest + checkpoint, HNSW M=8,
ef_construction=32 to keep the build to a couple of minutes; the graph's quality does not matter
here, its access pattern does). VIBRATO_MADVISE_DATA_DIR reuses a built data dir across runs.

Protocol, identical for both modes (same data dir, same queries, same order, same server flags):
  stop the server -> posix_fadvise(DONTNEED) on every segment file -> start
  `serve-v2 --vector-madvise-mode <mode>` and wait for ready -> DONTNEED again (recovery verifies
  every checksum and so reads the whole segment into the page cache; pages the server has mapped
  and touched cannot be dropped) -> check with mincore that < 10% is resident -> cold pass:
  VIBRATO_MADVISE_QUERIES (300) queries -> warm pass: the same queries again.
Each pass is one pytest-benchmark entry (`benchmark.pedantic`, one query per round), so its JSON
holds every round; p50/p99 are computed from the server-reported `query_time_ms` (as v2.1's
harness does, CONTRACT.md R6) and from client wall time, and stored in `extra_info`. The summary
prints p50/p99 per mode and cache state and the random/normal p99 ratios.
VIBRATO_MADVISE_ARCHIVE=1 measures the archive tier instead (issue 14): the same rows checkpointed
as four L0 segments and compacted into one L2 archive (graph + PQ codes + vectors), queried with
search_tier=archive; its data dir is kept apart from the L0 one.
VIBRATO_ENFORCE_MADVISE_GATE=1 fails the run when random p99 > 1.30 x normal p99 (cold or warm;
VIBRATO_MADVISE_GATE_RATIO changes 1.30).
"""
import ctypes
import json
import mmap
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "gates"))
from gatelib import GateServer, create_key, percentile  # noqa: E402

ROWS = int(os.environ.get("VIBRATO_MADVISE_ROWS", "250000"))
DIM = int(os.environ.get("VIBRATO_MADVISE_DIM", "512"))
NQ = int(os.environ.get("VIBRATO_MADVISE_QUERIES", "300"))
K, EF = 10, 64
ENFORCE = os.environ.get("VIBRATO_ENFORCE_MADVISE_GATE", "0") == "1"
GATE_RATIO = float(os.environ.get("VIBRATO_MADVISE_GATE_RATIO", "1.30"))
MODES = ("normal", "random")
RESULTS: dict = {}
# The page-cache share: the server runs in a memory cgroup whose limit leaves room for only this
# fraction of the segment in the page cache (CONTRACT.md §6, madvise A/B: a segment larger than
# the server's page-cache share).
# 0 disables the cgroup (the whole file then fits in this machine's page cache).
CACHE_SHARE = float(os.environ.get("VIBRATO_MADVISE_CACHE_SHARE", "0.4"))
ARCHIVE = os.environ.get("VIBRATO_MADVISE_ARCHIVE", "0") == "1"
TIER = "archive" if ARCHIVE else None  # None: the server's default tier
CGROUP_V1 = Path("/sys/fs/cgroup/memory")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]


def resident_fraction(path: Path) -> float:
    """Fraction of the file's pages in the page cache (mincore on a fresh read-only mapping)."""
    size = path.stat().st_size
    if size == 0:
        return 0.0
    page = mmap.PAGESIZE
    n = (size + page - 1) // page
    vec = (ctypes.c_ubyte * n)()
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        try:
            view = np.frombuffer(mm, dtype=np.uint8)
            addr = view.__array_interface__["data"][0]
            rc = _libc.mincore(ctypes.c_void_p(addr), size, vec)
            del view
            if rc != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
        finally:
            mm.close()
    return sum(b & 1 for b in bytes(vec)) / n


def drop_page_cache(data_dir: Path) -> float:
    """posix_fadvise(DONTNEED) on every segment file; returns the resident fraction afterwards."""
    files = sorted((data_dir / "segments").glob("*.vdb"))
    total = resident = 0.0
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        size = p.stat().st_size
        total += size
        resident += resident_fraction(p) * size
    return resident / total if total else 0.0


def segment_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in (data_dir / "segments").glob("*.vdb"))


def build_data_dir(data_dir: Path):
    """ROWS unit vectors in one L0 segment (engine ingest + one checkpoint), or with ARCHIVE in one
    L2 archive (four checkpoints, compacted until idle)."""
    from vibrato.engine import Engine
    t0 = time.perf_counter()
    parts = 4 if ARCHIVE else 1
    eng = Engine.open(data_dir, dim=DIM, background=False, checkpoint_max_rows=ROWS, hnsw_m=8,
                      hnsw_ef_construction=32, audio_colocated=False, compaction_max_inputs=2)
    try:
        rng = np.random.default_rng(12345)
        for start in range(0, ROWS, 5000):
            n = min(5000, ROWS - start)
            X = rng.standard_normal((n, DIM)).astype(np.float32)
            X /= np.linalg.norm(X, axis=1, keepdims=True)
            eng.ingest_batch([{"vector": X[i], "metadata": {"tags": ["perf", "madvise"]}} for i in range(n)])
            if parts > 1 and (start + n) % -(-ROWS // parts) < 5000:
                eng.checkpoint()
        t1 = time.perf_counter()
        res = eng.checkpoint()
        assert res["state"] == "completed" or parts > 1, res
        while ARCHIVE and eng.compact()["state"] != "idle":
            pass
        stats = eng.stats()
        want = {"L2_archive": 1} if ARCHIVE else {"L0_raw": 1}
        assert stats["segments_by_level"] == want and stats["total_vectors"] == ROWS, stats
    finally:
        eng.close()
    print(f"\n[madvise] built {ROWS} x {DIM} in one {'L2 archive' if ARCHIVE else 'L0'} segment: ingest "
          f"{t1 - t0:.0f}s, checkpoint{' + compaction' if ARCHIVE else ''} {time.perf_counter() - t1:.0f}s, "
          f"{segment_bytes(data_dir) / 2**20:.0f} MiB of segment files")
    (data_dir / "madvise_ab.json").write_text(json.dumps({"rows": ROWS, "dim": DIM, "archive": ARCHIVE}))


@pytest.fixture(scope="module")
def dataset():
    reuse = os.environ.get("VIBRATO_MADVISE_DATA_DIR")
    work = Path(reuse) if reuse else Path(tempfile.mkdtemp(prefix="vibrato-madvise-"))
    data = work / ("data-archive" if ARCHIVE else "data")
    marker = data / "madvise_ab.json"
    if not (marker.exists() and json.loads(marker.read_text()) == {"rows": ROWS, "dim": DIM, "archive": ARCHIVE}):
        shutil.rmtree(data, ignore_errors=True)
        build_data_dir(data)
    token = create_key(data, "madvise")
    rng = np.random.default_rng(9001)
    queries = rng.standard_normal((NQ, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"[madvise] segment files {segment_bytes(data) / 2**20:.0f} MiB, RAM {mem / 2**30:.1f} GiB; "
          f"{NQ} queries k={K} ef={EF}")
    yield {"work": work, "data": data, "token": token, "queries": queries}
    if not reuse and os.environ.get("VIBRATO_GATE_KEEP") != "1":
        shutil.rmtree(work, ignore_errors=True)


class MemoryCgroup:
    """A cgroup-v1 memory cgroup (this kind of machine has the hybrid v1/v2 layout) for the server."""

    def __init__(self, name):
        self.path = CGROUP_V1 / name
        self.path.mkdir(exist_ok=True)

    @staticmethod
    def available() -> bool:
        return (CGROUP_V1 / "memory.limit_in_bytes").exists() and os.access(CGROUP_V1, os.W_OK)

    @staticmethod
    def remove_stale():
        """Empty cgroups left by a run that was killed (a live server keeps its cgroup busy)."""
        for d in CGROUP_V1.glob("vibrato-madvise-*"):
            try:
                d.rmdir()
            except OSError:
                pass

    def add(self, pid: int):
        (self.path / "cgroup.procs").write_text(str(pid))

    def limit(self, nbytes: int):
        (self.path / "memory.limit_in_bytes").write_text(str(int(nbytes)))

    def remove(self):
        try:
            self.path.rmdir()
        except OSError:
            pass


class ModeServer:
    """One server per mode: started after the cache drop, shared by that mode's cold and warm passes."""
    current = None

    @classmethod
    def get(cls, dataset, mode):
        if cls.current is not None and cls.current[0] == mode:
            return cls.current[1], cls.current[2]
        cls.stop()
        drop_page_cache(dataset["data"])
        srv = GateServer(dataset["data"], dim=DIM, log_dir=dataset["work"], extra=["--vector-madvise-mode", mode,
                                                                                   "--hot-index-shards", "1"])
        cg = None
        if CACHE_SHARE > 0 and MemoryCgroup.available():
            MemoryCgroup.remove_stale()
            cg = MemoryCgroup(f"vibrato-madvise-{os.getpid()}")
            cg.add(srv.pid)
        srv.wait_ready(timeout=300)
        time.sleep(1.0)  # let the background scrubber (which evicts what it reads) get going
        # Start-up reads every section but the vectors, and the scrubber drops what it reads; the
        # pages are dropped again anyway. Only pages the server has mapped and touched (header,
        # tables, graph) stay; mincore says how much that is.
        resident = drop_page_cache(dataset["data"])
        if cg is not None:
            limit = srv.rss_anon_bytes() + 64 * 2**20 + CACHE_SHARE * segment_bytes(dataset["data"])
            cg.limit(limit)
            print(f"[madvise] {mode}: server in memory cgroup {cg.path.name}, limit {limit / 2**20:.0f} MiB "
                  f"(page cache share {CACHE_SHARE:.0%} of {segment_bytes(dataset['data']) / 2**20:.0f} MiB)")
        cls.current = (mode, srv, resident, cg)
        return srv, resident

    @classmethod
    def stop(cls):
        if cls.current is not None:
            assert cls.current[1].terminate() == 0
            if cls.current[3] is not None:
                cls.current[3].remove()
            cls.current = None


@pytest.mark.parametrize("mode,cache", [(m, c) for m in MODES for c in ("cold", "warm")],
                         ids=lambda v: v)
def test_query_latency(benchmark, dataset, mode, cache):
    srv, resident = ModeServer.get(dataset, mode)
    if cache == "cold":
        assert resident < 0.10, f"segment files still {resident:.0%} resident after DONTNEED: not a cold run"
    c = srv.client(dataset["token"], timeout=60)
    queries = dataset["queries"]
    server_ms, wall_ms = [], []
    state = {"i": 0}

    def setup():
        i = state["i"]
        state["i"] += 1
        return (queries[i],), {}

    def one(q):
        t = time.perf_counter()
        res = c.query(q, k=K, ef=EF, search_tier=TIER, include_metadata=False)
        wall_ms.append((time.perf_counter() - t) * 1000)
        server_ms.append(res["query_time_ms"])
        assert len(res["results"]) == K
        return res

    benchmark.group = f"madvise-{cache}"
    benchmark.pedantic(one, setup=setup, rounds=NQ, iterations=1, warmup_rounds=0)
    stats = {"p50_ms": percentile(server_ms, 0.50), "p99_ms": percentile(server_ms, 0.99),
             "wall_p50_ms": percentile(wall_ms, 0.50), "wall_p99_ms": percentile(wall_ms, 0.99),
             "resident_before": round(resident, 4) if cache == "cold" else None}
    benchmark.extra_info.update(stats)
    RESULTS[(mode, cache)] = stats
    print(f"\n[madvise] {mode:>6} {cache}: server p50={stats['p50_ms']:.3f} ms p99={stats['p99_ms']:.3f} ms | "
          f"wall p50={stats['wall_p50_ms']:.3f} ms p99={stats['wall_p99_ms']:.3f} ms")
    if mode == MODES[-1] and cache == "warm":
        ModeServer.stop()


def test_madvise_gate():
    """Summary and (with VIBRATO_ENFORCE_MADVISE_GATE=1) the 1.30 x p99 gate. Runs last."""
    ModeServer.stop()
    if ENFORCE and not (CACHE_SHARE > 0 and MemoryCgroup.available()):
        pytest.fail("madvise gate: the server's page-cache share could not be limited (no writable cgroup-v1 "
                    "memory controller at /sys/fs/cgroup/memory, or VIBRATO_MADVISE_CACHE_SHARE=0), so the "
                    "segment is not larger than its page cache and the A/B measures readahead, not the hint")
    missing = [(m, c) for m in MODES for c in ("cold", "warm") if (m, c) not in RESULTS]
    assert not missing, f"passes missing: {missing}"
    lines, failures = [], []
    for cache in ("cold", "warm"):
        n, r = RESULTS[("normal", cache)], RESULTS[("random", cache)]
        ratio = r["p99_ms"] / n["p99_ms"] if n["p99_ms"] > 0 else float("inf")
        lines.append(f"madvise_ab {cache}: normal p50={n['p50_ms']:.3f}ms p99={n['p99_ms']:.3f}ms | random "
                     f"p50={r['p50_ms']:.3f}ms p99={r['p99_ms']:.3f}ms | random/normal p99 ratio={ratio:.3f} "
                     f"(p50 ratio {r['p50_ms'] / n['p50_ms']:.3f})")
        if ratio > GATE_RATIO:
            failures.append(f"{cache}: random p99 {r['p99_ms']:.3f} ms > {GATE_RATIO} x normal p99 {n['p99_ms']:.3f} ms")
    out = REPO / "perf" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"madvise_ab{'_archive' if ARCHIVE else ''}_summary.json").write_text(json.dumps(
        {"rows": ROWS, "dim": DIM, "tier": TIER or "default", "queries": NQ, "k": K, "ef": EF, "gate_ratio": GATE_RATIO,
         "results": {f"{m}_{c}": v for (m, c), v in RESULTS.items()}}, indent=2))
    print("\n" + "\n".join(lines))
    if failures:
        msg = "madvise gate: " + "; ".join(failures)
        if ENFORCE:
            pytest.fail(msg)
        print(f"[madvise] report only (VIBRATO_ENFORCE_MADVISE_GATE=0): {msg}")
