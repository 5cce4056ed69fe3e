"""Helpers shared by the engine tests (not a test module)."""
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading

import numpy as np


def payload(key: str, dim: int):
    """A deterministic (vector, metadata) for a key, so a crashed writer's attempts can be replayed."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(dim).astype(np.float32)
    meta = {"source_file": f"{key}.wav", "start_time_ms": int(rng.integers(0, 1 << 20)), "duration_ms": 50,
            "bpm": float(np.float32(90 + int(rng.integers(0, 160)) * 0.5)), "tags": sorted({"crash", key[:6]})}
    return v, meta


def dump(eng):
    """{id: (vector bytes, metadata)} for every live id, read through the engine's tiers."""
    view = eng.view()
    top = eng.stats()["next_id"]
    ids = np.arange(top, dtype=np.int64)
    vecs, found = view.vectors_for(ids, "all")
    out = {}
    for vid in ids[found].tolist():
        out[vid] = (vecs[vid].tobytes(), view.metadata(vid))
    return out


@contextlib.contextmanager
def churning(eng):
    """Run checkpoint + compact on `eng` back to back in a thread while the body runs; yields the
    list the thread appends its exception to (empty when all went well)."""
    stop, errors = threading.Event(), []

    def churn():
        try:
            while not stop.is_set():
                eng.checkpoint()
                eng.compact()
        except Exception as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    t = threading.Thread(target=churn, name="churn")
    t.start()
    try:
        yield errors
    finally:
        stop.set()
        t.join()


def run_python(code: str, args, env_extra=None, kill_after=None) -> tuple[int, str]:
    """Run `code` in a child Python with `args`; SIGKILL it after `kill_after` s (None: let it end).
    Returns (exit code, stderr)."""
    env = dict(os.environ, **(env_extra or {}))
    p = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    if kill_after is not None:
        try:
            p.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
    rc = p.wait(timeout=120)
    err = p.stderr.read().decode()
    p.stderr.close()
    return rc, err
