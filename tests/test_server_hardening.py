"""Connection-level hardening of `vibrato serve-v2`: secrets never reach logs or responses, one
Authorization header, keep-alive/header/body timeouts, the connection cap, rate-limited accept
errors, aggregated auth-failure audit rows, and `Expect: 100-continue` only after authentication.

Most tests talk raw HTTP/1.1 over a socket (HTTP clients normalise exactly what is tested here) to
a real server subprocess on 127.0.0.1 with small timeouts set by flags.
"""
import asyncio
import concurrent.futures
import os
import resource
import socket
import threading
import time
import uuid

import aiohttp
import numpy as np
import orjson
import pytest
from aiohttp import web

from server_util import ServerProcess, embedded_engine
from vibrato.catalog import audit as audit_sql
from vibrato.config import Config
from vibrato.server import create_app
from vibrato.server.audit import AuditWriter
from vibrato.server.protocol import loop_exception_handler, make_runner

DIM = 8
FAST = ["--keepalive-timeout-secs", "1.5", "--header-timeout-secs", "1", "--body-timeout-secs", "1"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("hardening") / "data"
    with ServerProcess(data, extra=[*FAST, "--log-level", "debug"]) as srv:
        srv.wait_ready()
        srv.admin = srv.bootstrap_token
        yield srv


# ---------------------------------------------------------------------------- raw HTTP helpers
def connect(port, timeout=10.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_response(s: socket.socket) -> tuple[int, dict, bytes, bytes]:
    """One response (status, lower-cased headers, body, raw bytes); interim 1xx ones are returned too."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", 0)) if status >= 200 else 0
    while len(rest) < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest[:n], head + b"\r\n\r\n" + rest[:n]


def read_until_closed(s: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything until the server closes the connection, and how long that took."""
    t0 = time.monotonic()
    s.settimeout(limit)
    out = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    except ConnectionResetError:
        pass
    except socket.timeout:
        raise AssertionError(f"connection still open after {limit} s; got {out!r}") from None
    return out, time.monotonic() - t0


def exchange(port, data: bytes) -> tuple[int, dict, bytes, bytes]:
    with connect(port) as s:
        s.sendall(data)
        return read_response(s)


def assert_json_error(status, headers, body, want_status, want_code):
    assert status == want_status, body
    assert headers["content-type"].startswith("application/json")
    assert headers.get("x-request-id", "").startswith("req_")
    doc = orjson.loads(body)
    assert set(doc) == {"code", "message"} and doc["code"] == want_code, doc
    return doc


# ---------------------------------------------------------------------------- receive buffer
def _post(path, token, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def test_reads_of_interleaved_connections_and_bodies_beyond_the_receive_buffer_arrive_intact(server):
    """Every connection's reads pass through one shared receive buffer (protocol.py): a request
    split over many reads while other connections are read in between, and a batch body several
    times the buffer's size, must each reach the handler byte for byte."""
    from vibrato.server.protocol import RECV_BUFFER_BYTES

    rng = np.random.default_rng(7)
    n = 4 * RECV_BUFFER_BYTES // (DIM * 20) + 1  # JSON floats: ~20 bytes each
    vecs = rng.standard_normal((n, DIM)).astype("float32")
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)  # each its own best match
    big = orjson.dumps({"vectors": [{"vector": v.tolist(), "idempotency_key": f"rb-{uuid.uuid4()}"} for v in vecs]})
    assert len(big) > 3 * RECV_BUFFER_BYTES
    q = orjson.dumps({"vector": vecs[0].tolist(), "k": 1, "search_tier": "all", "include_metadata": False})
    slow, other = connect(server.port), connect(server.port)
    try:
        data = _post("/v2/vectors/batch", server.admin, big)
        step = len(data) // 7 + 1
        for i in range(0, len(data), step):
            slow.sendall(data[i:i + step])
            time.sleep(0.02)  # the server reads this piece alone ...
            other.sendall(_post("/v2/query", server.admin, q))  # ... then a whole request elsewhere
            status, _, body, _ = read_response(other)
            assert status == 200, body
        status, _, body, _ = read_response(slow)
        assert status == 201, body
        acks = orjson.loads(body)["data"]["results"]
        assert len(acks) == n and all(a["created"] for a in acks)
        other.sendall(_post("/v2/query", server.admin, q))
        status, _, body, _ = read_response(other)
        top = orjson.loads(body)["data"]["results"][0]
        assert top["id"] == acks[0]["id"]  # the first row of the body, stored as sent
        assert abs(top["score"] - 1.0) < 1e-3
    finally:
        slow.close()
        other.close()


# ---------------------------------------------------------------------------- 3. no secrets in logs
def test_malformed_authorization_header_never_leaks_the_secret(server):
    secrets_sent = []

    def secret():
        s = "s3cr3t" + uuid.uuid4().hex
        secrets_sent.append(s)
        return s

    requests = [
        b"GET /v2/admin/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer vbk_1." + secret().encode()
        + b"\x00tail\r\n\r\n",                                                    # NUL
        b"GET /v2/admin/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + secret().encode()
        + b"\rmore\r\n\r\n",                                                      # bare CR
        b"GET /v2/admin/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer\r\n "
        + secret().encode() + b"\r\n\r\n",                                        # obsolete line folding
        b"GET /v2/admin/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + secret().encode()
        + b"a" * 9000 + b"\r\n\r\n",                                              # field too long
        b"GET /v2/admin/stats HTTP/1.1\r\nHost: x\r\nAuthori zation: Bearer " + secret().encode()
        + b"\r\n\r\n",                                                            # bad field name
        b"GET /v2/admin/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer vbk_1." + secret().encode()
        + b"\x7f\r\n\r\n",                                                        # DEL
    ]
    for raw in requests:
        with connect(server.port) as s:
            s.sendall(raw)
            status, headers, body, whole = read_response(s)
            assert read_until_closed(s, 3)[0] == b""  # and the connection is closed
        assert_json_error(status, headers, body, 400, "bad_request")
        for s in secrets_sent:
            assert s.encode() not in whole, (raw[:60], whole)
    # The server still serves, and nothing it logged (at debug level) contains a secret.
    assert server.client().request("GET", "/v2/health/live")[0] == 200
    time.sleep(0.3)
    log_text = "\n".join(server.stderr_lines + server.stdout_lines)
    for s in secrets_sent:
        assert s not in log_text
    assert "malformed HTTP request" in log_text


# ---------------------------------------------------------------------------- 4. two Authorization headers
def test_two_authorization_headers_are_a_400(server):
    good = server.admin
    bad = "vbk_1234567890abcdef0123456789abcdef.dead" + "0" * 44
    for first, second in ((good, bad), (bad, good), (good, good)):
        raw = (f"GET /v2/admin/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {first}\r\n"
               f"Authorization: Bearer {second}\r\n\r\n").encode()
        status, headers, body, whole = exchange(server.port, raw)
        doc = assert_json_error(status, headers, body, 400, "bad_request")
        assert "Authorization" in doc["message"]
        assert good.split(".")[1].encode() not in whole and b"dead" not in whole
    # One header still works.
    status, _, _, _ = exchange(server.port, f"GET /v2/admin/stats HTTP/1.1\r\nHost: x\r\n"
                                            f"Authorization: Bearer {good}\r\n\r\n".encode())
    assert status == 200


# ---------------------------------------------------------------------------- 10. Expect: 100-continue
def test_expect_100_continue_only_after_authentication(server):
    body = orjson.dumps({"vector": [0.1] * DIM, "k": 1})
    for token in (None, "vbk_1234567890abcdef0123456789abcdef." + "a" * 48):
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        with connect(server.port) as s:
            s.sendall((f"POST /v2/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}"
                       f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n").encode())
            status, headers, resp, whole = read_response(s)
            assert status == 401, whole  # a final answer, not "100 Continue"
            assert b"100 Continue" not in whole
            assert headers.get("x-request-id") and headers.get("connection", "").lower() == "close"
    # Authorized: 100 Continue, then the body, then the answer.
    with connect(server.port) as s:
        s.sendall((f"POST /v2/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Authorization: Bearer {server.admin}\r\nContent-Length: {len(body)}\r\n"
                   f"Expect: 100-continue\r\n\r\n").encode())
        status, _, _, _ = read_response(s)
        assert status == 100
        s.sendall(body)
        status, headers, resp, _ = read_response(s)
        assert status == 200 and headers.get("x-request-id"), resp
    # An unknown expectation from an authorized client: 417 with the JSON envelope.
    status, headers, resp, _ = exchange(server.port, (
        f"POST /v2/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer "
        f"{server.admin}\r\nContent-Length: {len(body)}\r\nExpect: something-else\r\n\r\n").encode())
    assert_json_error(status, headers, resp, 417, "expectation_failed")


# ---------------------------------------------------------------------------- 5. idle and slow clients
def test_idle_slowloris_and_trickling_body_are_cut_off_while_others_are_served(server):
    results = {}

    def idle_before_first_request():
        with connect(server.port) as s:
            results["idle"] = read_until_closed(s, 8)

    def idle_after_a_request():
        with connect(server.port) as s:
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(s)[0] == 200
            results["keepalive"] = read_until_closed(s, 8)

    def slowloris():
        with connect(server.port) as s:
            head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 200
            t0 = time.monotonic()
            try:
                for b in head:  # one byte every 50 ms: never a complete head
                    s.send(bytes([b]))
                    time.sleep(0.05)
                    if time.monotonic() - t0 > 8:
                        break
            except (BrokenPipeError, ConnectionResetError):
                pass
            results["slowloris"] = (*read_until_closed(s, 8), time.monotonic() - t0)

    def trickling_body():
        with connect(server.port) as s:
            s.sendall((f"POST /v2/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       f"Authorization: Bearer {server.admin}\r\nContent-Length: 5000\r\n\r\n").encode())
            t0 = time.monotonic()
            try:
                for _ in range(200):
                    s.send(b" ")
                    time.sleep(0.05)
                    if time.monotonic() - t0 > 8:
                        break
            except (BrokenPipeError, ConnectionResetError):
                pass
            results["trickle"] = (*read_until_closed(s, 8), time.monotonic() - t0)

    threads = [threading.Thread(target=f) for f in (idle_before_first_request, idle_after_a_request, slowloris,
                                                    trickling_body)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    assert server.client(server.admin).request("GET", "/v2/admin/stats")[0] == 200
    assert time.monotonic() - t0 < 1.0
    for t in threads:
        t.join(20)
    _, idle_secs = results["idle"]
    assert 1.0 <= idle_secs <= 4.0, idle_secs        # --keepalive-timeout-secs 1.5
    _, keepalive_secs = results["keepalive"]
    assert 1.0 <= keepalive_secs <= 4.0, keepalive_secs
    raw, _, slow_total = results["slowloris"]
    assert slow_total <= 4.0, slow_total             # --header-timeout-secs 1, despite a byte every 50 ms
    assert raw.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in raw and b"x-request-id: req_" in raw
    raw, _, trickle_total = results["trickle"]
    assert trickle_total <= 4.0, trickle_total       # --body-timeout-secs 1
    assert raw.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in raw and b"x-request-id" in raw
    assert server.client().request("GET", "/v2/health/live")[0] == 200


def test_timeout_defaults_and_flags():
    c = Config()
    assert (c.keepalive_timeout_secs, c.header_timeout_secs, c.max_connections) == (75.0, 10.0, 1024)
    assert c.effective_body_timeout_secs == 32.0  # 2 MiB at 64 KiB/s
    assert Config(body_timeout_secs=5).effective_body_timeout_secs == 5.0
    for bad in ({"keepalive_timeout_secs": 0}, {"header_timeout_secs": -1}, {"max_connections": 0},
                {"body_timeout_secs": -1}):
        with pytest.raises(ValueError):
            Config(**bad)


# ---------------------------------------------------------------------------- 5. the connection cap
def _fd_count(pid) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_connections_beyond_the_cap_get_503_and_fds_stay_bounded(tmp_path):
    # one process and its own cap (how query workers split it: tests/test_server_workers.py)
    with ServerProcess(tmp_path / "data", extra=["--max-connections", "8", "--keepalive-timeout-secs", "30",
                                                 "--query-workers", "1"]) as srv:
        srv.wait_ready()
        time.sleep(0.5)
        base_fds = _fd_count(srv.proc.pid)
        held = [connect(srv.port) for _ in range(8)]
        time.sleep(0.3)
        extra = []
        t0 = time.monotonic()
        for _ in range(60):
            s = connect(srv.port)
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            extra.append(s)
        answers = []
        for s in extra:
            try:
                answers.append(read_response(s))
            except (ConnectionError, OSError):
                answers.append(None)
        assert time.monotonic() - t0 < 5.0
        got = [a for a in answers if a is not None]
        assert len(got) >= 50, len(got)  # answered, not just reset
        for status, headers, body, _ in got:
            assert_json_error(status, headers, body, 503, "overloaded")
            assert headers.get("retry-after") == "1"
        time.sleep(1.0)  # refused sockets are closed by the server within 0.5 s
        assert _fd_count(srv.proc.pid) <= base_fds + 8 + 4
        for s in extra:
            s.close()
        for s in held[:3]:
            s.close()
        time.sleep(0.3)
        assert srv.client().request("GET", "/v2/health/live")[0] == 200
        for s in held[3:]:
            s.close()
    assert any("connection refused" in line for line in srv.stderr_lines)
    assert sum("connection refused" in line for line in srv.stderr_lines) <= 2  # rate-limited


def test_accept_errors_at_the_fd_limit_are_rate_limited(tmp_path):
    # one process: the fd limit is set on the process that accepts (a query worker runs the same loop code)
    with ServerProcess(tmp_path / "data", extra=["--max-connections", "1000", "--keepalive-timeout-secs", "30",
                                                 "--query-workers", "1"]) as srv:
        srv.wait_ready()
        time.sleep(0.3)
        limit = _fd_count(srv.proc.pid) + 20
        resource.prlimit(srv.proc.pid, resource.RLIMIT_NOFILE, (limit, limit))
        socks = []
        for _ in range(120):  # the kernel's backlog accepts them; the server runs out of fds
            try:
                socks.append(socket.create_connection(("127.0.0.1", srv.port), timeout=2))
            except OSError:
                break
        time.sleep(4.0)
        for s in socks:
            s.close()
        time.sleep(1.5)  # the server accepts again (asyncio retries every second)
        assert srv.client().request("GET", "/v2/health/live")[0] == 200
    errors = [line for line in srv.stderr_lines if '"level":"error"' in line]
    accept_lines = [line for line in errors if "cannot accept connections" in line]
    assert accept_lines, srv.output()
    assert len(errors) <= 3, (len(errors), errors[:3])  # once per 10 s, not thousands a second
    assert not any("socket.accept() out of system resource" in line for line in srv.stderr_lines)


def test_loop_exception_handler_rate_limits_accept_errors(caplog):
    loop = asyncio.new_event_loop()
    try:
        ctx = {"message": "socket.accept() out of system resource", "exception": OSError(24, "Too many open files")}
        with caplog.at_level("ERROR"):
            for _ in range(5000):
                loop_exception_handler(loop, ctx)
        lines = [r for r in caplog.records if "cannot accept connections" in r.getMessage()]
        assert len(lines) <= 1
    finally:
        loop.close()


# ---------------------------------------------------------------------------- 6. auth-failure audit rows
@pytest.fixture(scope="module")
def engine_env(tmp_path_factory):
    with embedded_engine(tmp_path_factory.mktemp("hardening-inproc"), DIM, header_timeout_secs=1.0,
                         body_timeout_secs=1.0) as (config, engine, tokens):
        yield {"config": config, "engine": engine, "admin": tokens["admin"]}


async def _serve_inprocess(env, body):
    """Run `await body(base_url)` against create_app behind serve-v2's runner, then shut it down."""
    app = create_app(env["config"], engine=env["engine"])
    runner = make_runner(app, env["config"])
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        await body(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()  # flushes the audit writer, window summaries included


def test_auth_failures_are_aggregated_per_client_window(engine_env):
    catalog = engine_env["catalog"] if "catalog" in engine_env else engine_env["engine"].catalog
    marker = "agg-" + uuid.uuid4().hex[:8]
    bad = "vbk_1234567890abcdef0123456789abcdef." + "b" * 48

    async def body(url):
        async with aiohttp.ClientSession() as session:
            for i in range(200):
                async with session.post(f"{url}/v2/query", data=b"{}", headers={
                        "Authorization": f"Bearer {bad}", "Content-Type": "application/json",
                        "x-request-id": f"{marker}-{i}"}) as resp:
                    assert resp.status == 401
                    assert resp.headers["x-request-id"] == f"{marker}-{i}"
            async with session.get(f"{url}/v2/metrics") as resp:
                text = await resp.text()
            assert "vibrato_auth_failures_total 200" in text.replace(".0\n", "\n")

    asyncio.run(_serve_inprocess(engine_env, body))
    rows = [r for r in catalog.read(audit_sql.recent, 1000) if r["request_id"].startswith(marker)]
    assert len(rows) == 2, rows
    first = next(r for r in rows if r["request_id"] == f"{marker}-0")
    assert orjson.loads(first["details_json"]) == {"error": "invalid api key"}
    summary = next(r for r in rows if r is not first)
    details = orjson.loads(summary["details_json"])
    assert details["aggregated"] is True and details["count"] == 199 and details["error"] == "invalid api key"
    assert summary["request_id"] == f"{marker}-199" and summary["status_code"] == 401
    assert summary["endpoint"] == "/v2/query" and summary["client_ip"] == "127.0.0.1"


class _FakeCatalog:
    def __init__(self):
        self.rows = []

    def write_async(self, fn, rows):
        self.rows.extend(rows)
        f = concurrent.futures.Future()
        f.set_result(None)
        return f


class _Metrics:
    audit_failures = 0


def test_audit_window_ends_and_the_key_map_is_bounded():
    async def main():
        cat = _FakeCatalog()
        w = AuditWriter(cat, _Metrics(), retention_days=0, auth_window_secs=0.3, auth_max_keys=4)

        def fail(ip, i, endpoint="/v2/query"):
            w.record(ts=time.time(), request_id=f"r{ip}-{i}", api_key_id=None, endpoint=endpoint, action="query",
                     status=401, latency_ms=1.0, client_ip=ip, details={"error": "invalid api key"},
                     auth_failure=True)

        for i in range(50):
            fail("10.0.0.1", i)
        await w.flush()
        assert len(cat.rows) == 1  # the first failure only
        await asyncio.sleep(0.4)
        await w.flush()  # the window ended: one summary row
        assert len(cat.rows) == 2 and orjson.loads(cat.rows[1][8])["count"] == 49
        fail("10.0.0.1", 50)  # a new window starts with a full row
        await w.flush()
        assert len(cat.rows) == 3 and cat.rows[2][1] == "r10.0.0.1-50"
        # Many clients: at most auth_max_keys windows (+ the overflow one), the rest are counted.
        for n in range(1000):
            fail(f"10.1.{n // 256}.{n % 256}", 0)
        assert len(w._windows) <= 5
        await w.close()
        overflow = [orjson.loads(r[8]) for r in cat.rows if orjson.loads(r[8]).get("overflow")]
        assert len(overflow) == 1 and overflow[0]["count"] == 1000 - 3
        assert len(cat.rows) == 3 + 3 + 1
        # Non-auth events are never aggregated.
        before = len(cat.rows)
        for i in range(5):
            w.record(ts=time.time(), request_id=f"ok{i}", api_key_id="k", endpoint="/v2/query", action="query",
                     status=200, latency_ms=1.0, client_ip="10.0.0.1", details={})
        await w.flush()
        assert len(cat.rows) == before + 5

    asyncio.run(main())


def test_audit_flush_writes_what_was_queued_and_leaves_later_events_for_the_next_round():
    """Under a steady load, events keep arriving while a batch is written; a flush that drained the
    queue until empty would commit (and fsync) a few rows at a time, back to back."""
    async def main():
        writes = []

        def ok(w, i):
            w.record(ts=time.time(), request_id=f"q{i}", api_key_id="k", endpoint="/v2/query", action="query",
                     status=200, latency_ms=1.0, client_ip="10.0.0.1", details={})

        async def sink(rows):
            writes.append(len(rows))
            for i in range(0 if w._closing or len(writes) > 6 else 3):  # requests answered meanwhile
                ok(w, 1000 + len(writes) * 10 + i)
            await asyncio.sleep(0)

        w = AuditWriter(None, _Metrics(), sink=sink, retention_days=0, batch=4)
        for i in range(10):
            ok(w, i)
        await w.flush()
        assert writes == [4, 4, 4]  # the 10 queued at the start (the last batch takes 2 newcomers along)
        assert len(w._queue) == 3 * 3 - 2
        await w.close()  # closing (no more requests) writes everything
        assert not w._queue and sum(writes) == 10 + 3 * 3
    asyncio.run(main())
