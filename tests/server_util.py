"""Helpers for tests that run the real `vibrato serve-v2` as a subprocess on 127.0.0.1."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from vibrato.client import Client
from vibrato.config import Config

REPO = Path(__file__).resolve().parent.parent
VIBRATO = [sys.executable, "-m", "vibrato.cli"]


def free_port(host="127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is pid (a server's query workers), from /proc."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def query_workers(args) -> int:
    """How many query workers serve-v2 started with `args` runs (0: the writer alone), as it resolves
    --query-workers (the last one given; 0 or none: one per usable core)."""
    args = [str(a) for a in args]
    if not args or args[0] != "serve-v2":
        return 0
    value = 0
    for i, a in enumerate(args):
        if a == "--query-workers" and i + 1 < len(args):
            value = int(args[i + 1])
        elif a.startswith("--query-workers="):
            value = int(a.split("=", 1)[1])
    return Config(query_workers=value).worker_processes


def run_cli(*args, cwd=None, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([*VIBRATO, *map(str, args)], cwd=cwd, env=_env(env), capture_output=True, text=True,
                          timeout=timeout)


def _env(extra=None):
    env = dict(os.environ)
    env.pop("VIBRATO_API_PEPPER", None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


class ServerProcess:
    """A `vibrato serve-v2` child. stdout/stderr are collected by reader threads."""

    def __init__(self, data_dir, *, port=None, host="127.0.0.1", extra=(), env=None, cwd=None,
                 bootstrap=True, args=None):
        self.host = host
        self.port = port or free_port(host if host not in ("localhost", "0.0.0.0") else "127.0.0.1")
        if args is None:
            args = ["serve-v2", "--data-dir", str(data_dir), "--port", str(self.port), "--host", host,
                    "--dim", "8", "--checkpoint-interval-secs", "3600", "--compaction-interval-secs", "3600",
                    "--audio-colocated", "false"]
            if bootstrap:
                args += ["--bootstrap-admin-key", "true"]
            args += list(extra)
        self.args = args
        self.workers = query_workers(args)
        self.proc = subprocess.Popen([*VIBRATO, *args], cwd=cwd, env=_env(env), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.stdout_lines, self.stderr_lines = [], []
        self._readers = [threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout_lines), daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr_lines), daemon=True)]
        for t in self._readers:
            t.start()

    @staticmethod
    def _pump(stream, sink):
        for line in stream:
            sink.append(line.rstrip("\n"))

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "localhost") else self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def bootstrap_token(self) -> str | None:
        for line in self.stdout_lines:
            if line.startswith("BOOTSTRAP_ADMIN_KEY="):
                return line.split("=", 1)[1]
        return None

    def client(self, token=None) -> Client:
        return Client(self.url, token)

    def wait_ready(self, timeout=60.0) -> "ServerProcess":
        """Wait until /v2/health/ready answers 200 and, with query workers, until they serve the port
        (the writer answers alone until then): a test then talks to the processes a client meets
        once the server has started (fails if the process exits first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                # The bootstrap token (if any) is printed before the port binds; it also passes
                # private health checks (--public-health-metrics false).
                status, _, _ = Client(self.url, self.bootstrap_token, timeout=5).request("GET", "/v2/health/ready")
                if status == 200 and self.workers_serving():
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server not ready after {timeout}s: {self.output()}")

    def workers_serving(self) -> bool:
        """True with one process, or once the writer logged that its query workers serve the port."""
        if not self.workers:
            return True
        lines = list(self.stderr_lines)
        if any("did not start listening" in line for line in lines):
            raise RuntimeError(f"query workers did not start: {self.output()}")
        return any("query workers serving the port" in line for line in lines)

    def wait_exit(self, timeout=60.0) -> int:
        rc = self.proc.wait(timeout=timeout)
        for t in self._readers:
            t.join(timeout=5)
        return rc

    def terminate(self, timeout=60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def output(self) -> str:
        return "\n".join(["--- stdout"] + self.stdout_lines[-30:] + ["--- stderr"] + self.stderr_lines[-30:])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.terminate(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()


@contextlib.contextmanager
def embedded_engine(data_dir, dim: int, keys=(("admin", "admin"),), **config_changes):
    """For tests that run create_app in this process: an Engine with no background work on
    `data_dir` (background intervals pushed out, the pepper made in the data dir) and an API key per
    (name, roles) in `keys`. Yields (config, engine, {name: token})."""
    from vibrato import apikeys
    from vibrato.config import Config
    from vibrato.engine import Engine

    saved = os.environ.pop("VIBRATO_API_PEPPER", None)
    config = Config(data_dir=data_dir, dim=dim, audio_colocated=False, checkpoint_interval_secs=3600,
                    compaction_interval_secs=3600, **config_changes)
    engine = Engine.open_config(config, background=False)
    try:
        pepper = apikeys.load_pepper(data_dir)
        tokens = {name: apikeys.create_key(engine.catalog, pepper, name, roles)[1] for name, roles in keys}
        yield config, engine, tokens
    finally:
        engine.close()
        if saved is not None:
            os.environ["VIBRATO_API_PEPPER"] = saved
