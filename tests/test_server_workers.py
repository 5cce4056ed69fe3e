"""serve-v2 --query-workers 2 (vibrato/server/workers.py), with real processes on 127.0.0.1: two query
workers serve the port (the writer leaves it to them once they listen) and pass writes to the writer;
acknowledged writes are visible to the next query on any connection, counters and audit rows cover
every process, a worker killed with SIGKILL comes back, SIGTERM drains them all, and the workers die
with the writer."""
import os
import signal
import time

import numpy as np
import pytest

from server_util import ServerProcess, child_pids
from vibrato.catalog import Catalog, audit as audit_sql
from vibrato.client import Client, VibratoHTTPError
from vibrato.server.workers import WORKER_SOCKET, _get_unix

DIM = 8


def unit_rows(n, seed):
    X = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def worker_pids(srv) -> list[int]:
    return child_pids(srv.proc.pid)


def wait_worker(srv, data, timeout=30, index=1):
    """Until worker `index` answers on its state socket; returns its state."""
    deadline = time.monotonic() + timeout
    path = str(data / "tmp" / WORKER_SOCKET.format(index))
    while time.monotonic() < deadline:
        try:
            return _get_unix(path, "/internal/state")
        except (OSError, ValueError):
            time.sleep(0.05)
    raise TimeoutError(srv.output())


def listeners(port) -> int:
    """TCP sockets listening on 127.0.0.1:port (from /proc/net/tcp)."""
    n = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, _, state = line.split()[1:4]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                n += 1
    return n


def wait_workers_own_the_port(srv, data, count=2, timeout=30):
    for i in range(1, count + 1):
        wait_worker(srv, data, index=i)
    deadline = time.monotonic() + timeout
    while listeners(srv.port) != count:
        assert time.monotonic() < deadline, f"{listeners(srv.port)} listeners on the port\n{srv.output()}"
        time.sleep(0.05)


@pytest.fixture
def served(tmp_path):
    data = tmp_path / "d"
    srv = ServerProcess(data, extra=["--query-workers", "2"]).wait_ready()
    wait_workers_own_the_port(srv, data)
    yield srv, data
    if srv.proc.poll() is None:
        srv.terminate(timeout=60)


def test_workers_run_on_one_cpu_each_when_there_is_one_per_cpu(served):
    """--pin-query-workers auto (the default): with as many workers as CPUs this server may use, worker
    i runs on the i-th of them, every thread of it; otherwise (a machine with more cores) none is pinned.
    The writer is never pinned."""
    from vibrato.config import worker_cpu
    srv, data = served
    allowed = os.sched_getaffinity(0)

    def cpus(pid):  # the CPU sets of the process's threads
        return {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}
    by_index = {}
    for pid in worker_pids(srv):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            by_index[int(f.read().split(b"\0")[-2])] = pid
    assert sorted(by_index) == [1, 2]
    for i, pid in by_index.items():
        cpu = worker_cpu(i, 2, allowed)
        assert cpus(pid) == {frozenset({cpu}) if cpu is not None else frozenset(allowed)}, (i, cpus(pid))
    assert cpus(srv.proc.pid) == {frozenset(allowed)}


def test_read_your_writes_on_any_connection_and_every_process_counted(served):
    srv, data = served
    token = srv.bootstrap_token
    X = unit_rows(1500, 1)
    misses = []
    for i, x in enumerate(X):
        writer, reader = Client(srv.url, token), Client(srv.url, token)  # two fresh connections each time
        try:
            vid, created = writer.ingest(x, metadata={"tags": ["t"] if i % 2 else [], "bpm": float(i)})
            # exact: the filter allows this row alone, so no search strategy can miss it
            res = reader.query(x, k=1, filter={"bpm_gte": float(i), "bpm_lte": float(i)}, search_tier="all",
                               include_metadata=False)["results"]
            if [r["id"] for r in res] != [vid]:
                misses.append((i, vid, res))
            if i % 2:  # through the graphs, with room for their recall
                res = reader.query(x, k=10, ef=200, filter={"tags_any": ["t"]}, search_tier="all")["results"]
                if vid not in [r["id"] for r in res]:
                    misses.append(("tag", i, vid))
            if i % 300 == 299:
                writer.checkpoint()
            if i == 1200:
                writer.compact()
        finally:
            writer.close()
            reader.close()
    assert not misses, misses[:5]
    queries = 1500 + 750
    served_by = [wait_worker(srv, data, index=i)["metrics"]["query_requests"] for i in (1, 2)]
    assert min(served_by) > 0 and sum(served_by) == queries, served_by  # the writer left the port
    admin = Client(srv.url, token)
    stats = admin.stats()
    assert stats["query_total"] == queries and stats["total_vectors"] == 1500
    _, _, body = admin.request("GET", "/v2/metrics")
    text = body.decode()
    assert f"vibrato_query_requests_total {queries}.0" in text
    assert f'vibrato_http_requests_total{{method="POST",route="/v2/query",status="200"}} {queries}.0' in text
    assert 'vibrato_http_requests_total{method="POST",route="/v2/vectors",status="201"} 1500.0' in text
    admin.close()
    assert srv.terminate(timeout=60) == 0
    with Catalog(data / "catalog.sqlite3") as cat:
        rows = cat.read(audit_sql.recent, 10_000)
    actions = [r["action"] for r in rows]
    assert actions.count("query") == queries and actions.count("ingest") == 1500
    assert all(r["client_ip"] == "127.0.0.1" for r in rows if r["action"] in ("query", "ingest"))


def test_auth_is_checked_by_the_process_that_takes_the_connection(served):
    srv, _ = served
    for _ in range(20):  # fresh connections: both processes get some
        bad = Client(srv.url, "vbk_1234567890abcdef0123456789abcdef." + "b" * 48)
        with pytest.raises(VibratoHTTPError) as e:
            bad.ingest(unit_rows(1, 2)[0])
        assert e.value.status == 401 and e.value.request_id
        with pytest.raises(VibratoHTTPError) as e:
            bad.query(unit_rows(1, 2)[0], k=1)
        assert e.value.status == 401
        bad.close()


def test_auth_failures_make_one_window_for_the_whole_server(served):
    """A client's auth failures spread over both workers (fresh connections) still make one first row
    and one summary per window: the writer aggregates what the workers pass on."""
    import orjson
    srv, data = served
    bad = Client(srv.url, "vbk_1234567890abcdef0123456789abcdef." + "b" * 48)
    n = 60
    for i in range(n):
        bad._local.conn = None  # a fresh connection each time: SO_REUSEPORT spreads them
        status, _, _ = bad.request("POST", "/v2/query", {"vector": [0.0] * DIM}, headers={"x-request-id": f"w-{i}"})
        assert status == 401
    bad.close()
    took = [wait_worker(srv, data, index=i)["metrics"]["auth_failures"] for i in (1, 2)]
    assert min(took) > 0 and sum(took) == n, took
    assert srv.terminate(timeout=60) == 0  # ends the window: the summary is written
    with Catalog(data / "catalog.sqlite3") as cat:
        rows = [r for r in cat.read(audit_sql.recent, 10_000) if r["request_id"].startswith("w-")]
    firsts = [r for r in rows if not orjson.loads(r["details_json"]).get("aggregated")]
    summaries = [r for r in rows if orjson.loads(r["details_json"]).get("aggregated")]
    assert len(firsts) == 1 and len(summaries) == 1, rows
    assert orjson.loads(summaries[0]["details_json"])["count"] == n - 1
    assert summaries[0]["client_ip"] == "127.0.0.1" and summaries[0]["endpoint"] == "/v2/query"


def test_a_killed_worker_comes_back_and_no_acknowledged_write_is_lost(served):
    srv, data = served
    token = srv.bootstrap_token
    X = unit_rows(600, 3)
    acked = {}
    before = worker_pids(srv)
    assert len(before) == 2
    old = before[0]
    for i, x in enumerate(X):
        if i == 200:
            os.kill(old, signal.SIGKILL)
        c = Client(srv.url, token, timeout=10)
        try:
            vid, _ = c.ingest(x, idempotency_key=f"k{i}")
            acked[i] = vid
        except (OSError, VibratoHTTPError):
            pass  # a connection the killed worker held; not acknowledged
        finally:
            c.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (len(worker_pids(srv)) < 2 or old in worker_pids(srv)):
        time.sleep(0.1)
    after = worker_pids(srv)
    assert len(after) == 2 and old not in after and before[1] in after
    wait_workers_own_the_port(srv, data)
    # --writer-nice (default 19): the writer yields the cores to the workers, the restarted one too
    assert os.getpriority(os.PRIO_PROCESS, srv.proc.pid) == 19
    assert [os.getpriority(os.PRIO_PROCESS, w) for w in after] == [0, 0]
    assert any("query worker exited" in line for line in srv.stderr_lines)
    c = Client(srv.url, token)
    for i, vid in acked.items():
        res = c.query(X[i], k=1, search_tier="all", include_metadata=False)["results"]
        assert res[0]["id"] == vid
    assert len(acked) >= 590
    c.close()


def test_sigterm_drains_every_process_and_the_worker_dies_with_the_writer(tmp_path):
    data = tmp_path / "d"
    srv = ServerProcess(data, extra=["--query-workers", "2"]).wait_ready()
    wait_workers_own_the_port(srv, data)
    pids = worker_pids(srv)
    assert srv.terminate(timeout=60) == 0
    assert any('"shutdown complete"' in line for line in srv.stderr_lines)
    assert not any(os.path.exists(f"/proc/{w}") for w in pids)
    assert not list((data / "tmp").glob("worker-*.wake"))
    srv = ServerProcess(data, extra=["--query-workers", "2"], bootstrap=False).wait_ready()
    wait_workers_own_the_port(srv, data)
    pids = worker_pids(srv)
    srv.kill()  # SIGKILL: the workers follow (PR_SET_PDEATHSIG)
    deadline = time.monotonic() + 20
    for worker in pids:
        while os.path.exists(f"/proc/{worker}") and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(f"/proc/{worker}/stat") if os.path.exists(f"/proc/{worker}") else open(os.devnull) as f:
            state = f.read().rsplit(")", 1)[-1].split()[:1]
        assert state in ([], ["Z"]), "a worker outlived the writer"


def test_a_second_server_with_workers_cannot_share_the_port(served, tmp_path):
    """Every process of a server with workers binds with SO_REUSEPORT, which would let another
    such server of the same user join the port and take a share of its connections: the second one
    must refuse to start instead, and the first keep serving alone."""
    srv, _ = served
    other = ServerProcess(tmp_path / "other", port=srv.port, extra=["--query-workers", "2"])
    try:
        assert other.wait_exit(60) == 1
    finally:
        if other.proc.poll() is None:  # it started after all: do not leave it serving the port
            other.kill()
    assert any(line.startswith("Error: cannot listen on") and "another server already listens" in line
               for line in other.stderr_lines), other.output()
    c = Client(srv.url, srv.bootstrap_token)
    for _ in range(20):  # new connections, all answered by the first server's processes
        assert Client(srv.url, srv.bootstrap_token).request("GET", "/v2/health/ready")[0] == 200
    assert c.request("GET", "/v2/health/live")[0] == 200


def writer_client(srv, data) -> Client:
    """A client whose connection is the writer's internal socket: it reaches the writer even while
    the workers, which alone serve the port, are stopped."""
    from vibrato.server.workers import INTERNAL_SOCKET, _UnixHTTPConnection
    c = Client(srv.url, srv.bootstrap_token, timeout=30)
    c._local.conn = _UnixHTTPConnection(str(data / "tmp" / INTERNAL_SOCKET), 30)
    return c


def test_a_write_is_answered_once_the_workers_applied_it_but_stopped_ones_do_not_hold_writes(served):
    """The writer holds an acknowledgement until the workers have applied the write (so their queries
    have nothing to catch up), but only for a bounded time: a worker that cannot keep up (here
    SIGSTOPped) is passed over, and it still shows every acknowledged write once it runs."""
    from vibrato.engine.shared_state import FollowerProgress, SharedState
    srv, data = served
    pids = worker_pids(srv)
    progress, state = FollowerProgress.open(data / "tmp"), SharedState.open(data / "tmp")
    c = writer_client(srv, data)
    X = unit_rows(60, 9)
    ids = []
    early = 0
    for x in X[:20]:
        ids.append(c.ingest(x)[0])
        slots = [progress.read(i) for i in (1, 2)]
        assert sorted(pid for pid, _ in slots) == sorted(pids)
        early += any(applied != state.lsn for _, applied in slots)
    if early:  # allowed only where the writer said it passed a worker over (a very slow machine)
        time.sleep(1.0)  # the server's log lines are written in batches
        assert any("did not apply lsn" in line for line in srv.stderr_lines), \
            f"{early} writes acknowledged before the workers applied them"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        for i, x in enumerate(X[20:]):
            ids.append(c.ingest(x, metadata={"bpm": float(i)})[0])
        gone = c.delete(ids=ids[:5])
        assert gone["deleted"] == 5
        assert all(progress.read(i)[1] < state.lsn for i in (1, 2))  # answered without the stopped workers
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    c.close()
    misses = []
    for i, x in enumerate(X):
        reader = Client(srv.url, srv.bootstrap_token)  # fresh connections: the worker takes some
        res = [r["id"] for r in reader.query(x, k=1, search_tier="all", include_metadata=False)["results"]]
        reader.close()
        ok = not set(res) & set(ids[:5]) if i < 5 else res == [ids[i]]  # the first 5 were deleted
        if not ok:
            misses.append((i, res))
    assert not misses, misses
    progress.close()
    state.close()


def test_max_connections_is_the_servers_not_each_workers(tmp_path):
    """--max-connections 8 with two workers: each takes 4, so the server never holds more than 8
    client connections, however the kernel spreads them."""
    from test_server_hardening import connect, read_response
    data = tmp_path / "d"
    srv = ServerProcess(data, extra=["--query-workers", "2", "--max-connections", "8",
                                     "--keepalive-timeout-secs", "30"]).wait_ready()
    try:
        wait_workers_own_the_port(srv, data)
        held, statuses = [], []
        for _ in range(30):
            s = connect(srv.port)
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                statuses.append(read_response(s)[0])
            except (ConnectionError, OSError):
                statuses.append(None)
            held.append(s)  # kept open: an answered connection stays (keep-alive)
        assert 1 <= statuses.count(200) <= 8, statuses
        assert statuses.count(200) + statuses.count(503) >= 28, statuses
        for s in held:
            s.close()
    finally:
        srv.terminate(timeout=60)


def test_a_data_dir_too_deep_for_a_unix_socket_path_still_gets_its_workers(tmp_path):
    """tmp/worker-1.sock under this data dir is longer than AF_UNIX takes (107 bytes): the sockets are
    bound and reached through a descriptor of tmp/ (datadir.unix_address), so the server starts with its
    workers (it failed with "AF_UNIX path too long" before), forwards writes and serves queries."""
    data = tmp_path / ("d" * 60) / ("e" * 60) / "data"
    assert len(str(data / "tmp" / "worker-1.sock").encode()) > 107
    srv = ServerProcess(data, extra=["--query-workers", "2"]).wait_ready()
    try:
        wait_workers_own_the_port(srv, data)
        c = srv.client(srv.bootstrap_token)
        X = unit_rows(20, 7)
        for i, x in enumerate(X):  # forwarded to the writer, acknowledged once both workers applied it
            vid, created = c.ingest(x, metadata={"source_file": f"{i}.wav"})
            assert created and [r["id"] for r in c.query(x, k=1)["results"]] == [vid]
        assert sorted(os.listdir(data / "tmp")) == ["followers.state", "internal.sock", "serving.state",
                                                    "worker-1.sock", "worker-1.wake", "worker-2.sock", "worker-2.wake",
                                                    "writer.wake"]
    finally:
        srv.terminate(timeout=60)


def test_a_workers_progress_datagram_wakes_the_writes_waiting_for_it(tmp_path, monkeypatch):
    """The writer's wait for its workers (WorkerPool.caught_up) is woken by the datagram a worker sends
    after it reports an applied lsn (follow_writer's report), not by its fallback look: with that look
    an hour away, a write waiting for a worker returns once the worker reports, and not before."""
    import asyncio
    import types
    from vibrato.config import Config
    from vibrato.engine.shared_state import FollowerProgress
    from vibrato.server import workers

    monkeypatch.setattr(workers, "ACK_POLL_SECS", 3600.0)
    monkeypatch.setattr(workers, "ACK_WAIT_SECS", 3600.0)
    config = Config(data_dir=tmp_path / "d", dim=DIM)
    os.makedirs(config.tmp_dir, mode=0o700)

    class Worker:  # the follower side: follow_writer with a stand-in for the Follower
        def follow(self, report, wake):
            self.report = report

    async def main():
        pool = workers.WorkerPool(config, 1)
        pool.progress = FollowerProgress.create(config.tmp_dir, 2)
        pool.procs = {1: types.SimpleNamespace(poll=lambda: None)}
        pool.listen_progress()
        worker = Worker()
        stop = workers.follow_writer(worker, config, 1)
        worker.report(3)  # applied lsn 3: the first report, before any write waits
        await asyncio.wait_for(pool.caught_up(3), 5)
        waiting = asyncio.ensure_future(pool.caught_up(7))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # the worker has not applied lsn 7
        worker.report(5)
        await asyncio.sleep(0.2)
        assert not waiting.done()
        worker.report(7)
        await asyncio.wait_for(waiting, 5)  # woken by the datagram: the fallback look is an hour away
        assert not pool._waiters
        stop()
        pool.close_progress()
        pool._spawner.shutdown(wait=False)
        assert not os.path.exists(os.path.join(config.tmp_dir, workers.PROGRESS_SOCKET))

    asyncio.run(main())


def test_on_a_single_core_the_default_is_one_worker_beside_the_writer(tmp_path):
    """--query-workers 0 (the default) on one usable core starts one query worker, which alone serves the
    port while the writer takes its forwarded writes at nice 19 (a single process would lose its queries
    to the ingest's GIL holds); --query-workers 1 still means the writer alone."""
    allowed = os.sched_getaffinity(0)
    cpu = min(allowed)
    os.sched_setaffinity(0, {cpu})  # the server inherits it: one usable core
    try:
        data = tmp_path / "d"
        srv = ServerProcess(data).wait_ready()
    finally:
        os.sched_setaffinity(0, allowed)
    try:
        assert srv.workers == 1
        wait_workers_own_the_port(srv, data, count=1)
        pids = worker_pids(srv)
        assert len(pids) == 1
        assert os.getpriority(os.PRIO_PROCESS, srv.proc.pid) == 19 and os.getpriority(os.PRIO_PROCESS, pids[0]) == 0
        c = srv.client(srv.bootstrap_token)
        X = unit_rows(30, 11)
        for i, x in enumerate(X):  # written through the worker (forwarded), read back through it
            vid, created = c.ingest(x, metadata={"source_file": f"{i}.wav"})
            assert created and [r["id"] for r in c.query(x, k=1, include_metadata=False)["results"]] == [vid]
        c.close()
        assert wait_worker(srv, data)["engine"]["query_total"] == 30  # every query answered by the worker
    finally:
        srv.terminate(timeout=60)
    solo = ServerProcess(tmp_path / "solo", extra=["--query-workers", "1"]).wait_ready()
    try:
        assert solo.workers == 0 and worker_pids(solo) == [] and listeners(solo.port) == 1
    finally:
        solo.terminate(timeout=60)
