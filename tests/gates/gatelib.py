"""Shared machinery for the operational gates (crash matrix, soak, stress, canary, fuzz).

Each gate drives the real `vibrato serve-v2` process over HTTP on 127.0.0.1. Nothing here is a test;
the gate modules and scripts import it. The server's stdout/stderr go to files next to its data dir
(a soak would otherwise keep millions of log lines in memory), so a failure can point at them.
"""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vibrato.client import Client

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # the tests' server helpers, also for the perf scripts importing this
from server_util import child_pids  # noqa: E402


def vibrato_cmd() -> list[str]:
    """The installed `vibrato` console script beside this interpreter, else `python -m vibrato.cli`."""
    exe = Path(sys.executable).with_name("vibrato")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vibrato.cli"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def _child_env(extra=None) -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def run_cli(*args, env=None, timeout=300, check=True) -> dict:
    """Run a `vibrato` CLI command; returns its key=value stdout lines as a dict (exit 0 required if check)."""
    cmd = [*vibrato_cmd(), *map(str, args)]
    print("+ " + " ".join(cmd), flush=True)
    out = subprocess.run(cmd, env=_child_env(env), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()}")
    lines = {}
    for line in out.stdout.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            lines[k.strip()] = v.strip()
    lines["_returncode"] = out.returncode
    lines["_stderr"] = out.stderr
    return lines


def create_key(data_dir, name="gate", roles="admin,query,ingest") -> str:
    """`vibrato key-create` (CONTRACT.md §7.2, runbook §2: the key command); returns the token."""
    return run_cli("key-create", "--data-dir", data_dir, "--name", name, "--roles", roles)["token"]


class GateServer:
    """A `vibrato serve-v2` child on 127.0.0.1 with its output in <log_dir>/server-<n>.{out,err}."""

    _starts = 0

    def __init__(self, data_dir, *, dim=16, port=None, extra=(), env=None, log_dir=None,
                 checkpoint_secs=3600, compaction_secs=3600, log_level="warning"):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.dim = dim
        self.log_dir = Path(log_dir) if log_dir else self.data_dir.parent
        self.log_dir.mkdir(parents=True, exist_ok=True)
        GateServer._starts += 1
        stem = self.log_dir / f"server-{GateServer._starts}-{self.port}"
        self.out_path, self.err_path = stem.with_suffix(".out"), stem.with_suffix(".err")
        self.args = ["serve-v2", "--data-dir", str(self.data_dir), "--collection", "default", "--dim", str(dim),
                     "--host", "127.0.0.1", "--port", str(self.port),
                     "--checkpoint-interval-secs", str(checkpoint_secs),
                     "--compaction-interval-secs", str(compaction_secs),
                     "--public-health-metrics", "true", "--log-level", log_level, *map(str, extra),
                     # e.g. VIBRATO_GATE_SERVER_ARGS="--query-workers 2": a gate against several processes
                     *os.environ.get("VIBRATO_GATE_SERVER_ARGS", "").split()]
        cmd = [*vibrato_cmd(), *self.args]
        print("+ " + " ".join(cmd), flush=True)
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(cmd, env=_child_env(env), stdout=self._out, stderr=self._err,
                                     stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, token=None, timeout=30.0) -> Client:
        return Client(self.url, token, timeout=timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n=40) -> str:
        parts = []
        for p in (self.out_path, self.err_path):
            try:
                lines = p.read_text(errors="replace").splitlines()[-n:]
            except OSError:
                lines = []
            parts.append(f"--- {p}\n" + "\n".join(lines))
        return "\n".join(parts)

    def wait_ready(self, timeout=120.0) -> "GateServer":
        deadline = time.monotonic() + timeout
        probe = Client(self.url, None, timeout=5)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before ready:\n{self.tail()}")
            try:
                status, _, _ = probe.request("GET", "/v2/health/ready", auth=False)
                if status == 200:
                    return self
            except OSError:
                probe.close()
            time.sleep(0.05)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.tail()}")

    def kill9(self):
        """SIGKILL and reap (the crash under test)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._close_logs()

    def terminate(self, timeout=60.0) -> int:
        """SIGTERM (graceful shutdown) and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            self._close_logs()
        return rc

    def _close_logs(self):
        for f in (self._out, self._err):
            with contextlib.suppress(Exception):
                f.close()

    def stop(self):
        """Best-effort cleanup: SIGTERM, then SIGKILL if it does not exit."""
        if self.proc.poll() is None:
            try:
                self.terminate(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()
        self._close_logs()

    # -------------------------------------------------------------- process sampling (Linux /proc)
    def pids(self) -> list[int]:
        """The server's processes: the writer and its query workers (its children), which the resource
        figures below add up, since with workers (the default on two or more cores) they hold memory and
        connections too."""
        return [self.pid, *child_pids(self.pid)]

    def _status_bytes(self, field: str) -> int:
        """A kB field of /proc/<pid>/status, in bytes, summed over the server's processes (0 when absent)."""
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith(field + ":"):
                            total += int(line.split()[1]) * 1024
                            break
            except OSError:  # a worker that exited between the listing and the read
                continue
        return total

    def rss_bytes(self) -> int:
        return self._status_bytes("VmRSS")

    def rss_anon_bytes(self) -> int:
        return self._status_bytes("RssAnon")

    def open_fds(self) -> int:
        total = 0
        for pid in self.pids():
            try:
                total += len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                continue
        return total


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def normalized_metadata(meta: dict) -> dict:
    """What the server returns for `meta`: tags trimmed, lower-cased, sorted, de-duplicated; bpm as float32."""
    tags = sorted({t.strip().lower() for t in meta.get("tags", []) if t.strip()})
    return {"source_file": meta.get("source_file", ""), "start_time_ms": int(meta.get("start_time_ms", 0)),
            "duration_ms": int(meta.get("duration_ms", 0)), "bpm": float(np.float32(meta.get("bpm", 0.0))),
            "tags": tags}


def metadata_equal(got: dict, want: dict) -> bool:
    want = normalized_metadata(want)
    return (got.get("source_file") == want["source_file"] and got.get("start_time_ms") == want["start_time_ms"]
            and got.get("duration_ms") == want["duration_ms"] and list(got.get("tags", [])) == want["tags"]
            and abs(float(got.get("bpm", 0.0)) - want["bpm"]) <= 1e-4 * max(1.0, abs(want["bpm"])))


def read_catalog_metadata(data_dir, ids, collection="default") -> dict:
    """{id: metadata dict} straight from catalog.sqlite3, read-only, after the server has stopped.

    Uses the catalog package's own functions (no SQL here).
    """
    import json

    from vibrato.catalog import collections, wal
    from vibrato.catalog.connection import open_reader
    conn = open_reader(str(Path(data_dir) / "catalog.sqlite3"), busy_timeout_ms=5000)
    try:
        cid = collections.get(conn, collection)["id"]
        out = {}
        ids = list(ids)
        for i in range(0, len(ids), 5000):
            for vid, (src, start, dur, bpm, tags) in wal.metadata_for_ids(conn, cid, ids[i:i + 5000]).items():
                out[vid] = {"source_file": src, "start_time_ms": start, "duration_ms": dur, "bpm": bpm,
                            "tags": json.loads(tags) if isinstance(tags, str) else list(tags or [])}
        return out
    finally:
        conn.close()


def tmp_segment_files(data_dir) -> list[Path]:
    """Temporary segment files (`tmp/*.vdb.tmp`) left in the data dir."""
    tmp = Path(data_dir) / "tmp"
    return sorted(tmp.glob("*.vdb.tmp")) if tmp.exists() else []


def sqlite_wal_bytes(data_dir) -> int:
    try:
        return os.path.getsize(Path(data_dir) / "catalog.sqlite3-wal")
    except OSError:
        return 0


class WorkDir:
    """A scratch directory that is deleted on success and kept (path printed) on failure."""

    def __init__(self, prefix: str):
        base = os.environ.get("VIBRATO_GATE_WORKDIR") or None
        if base:
            Path(base).mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        self.keep = os.environ.get("VIBRATO_GATE_KEEP", "0") == "1"

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or self.keep:
            print(f"\n[gate] data kept for inspection: {self.path}", flush=True)
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        return False


def percentile(values, q: float) -> float:
    """Nearest-rank percentile on a sorted copy (v2.1's round((n-1) * q) index, CONTRACT.md R6)."""
    if not len(values):
        return float("nan")
    s = sorted(values)
    return float(s[int(round((len(s) - 1) * q))])
