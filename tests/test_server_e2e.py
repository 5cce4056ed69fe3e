"""End-to-end tests: the real `vibrato serve-v2` as a subprocess on 127.0.0.1 (free port), real HTTP,
real SQLite. Most tests share one module-scoped server; lifecycle tests start their own."""
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from server_util import ServerProcess, free_port, run_cli
from test_server_inprocess import REFERENCE_SERIES, parse_metrics, validate_response
from vibrato.catalog import Catalog, audit as audit_sql
from vibrato.client import Client, VibratoHTTPError

DIM = 8
RID = re.compile(r"^req_\d+_[0-9a-f]{16}$")


def unit(rng, n, dim=DIM):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("e2e") / "data"
    with ServerProcess(data) as srv:
        srv.wait_ready()
        srv.data = data
        srv.admin = srv.bootstrap_token
        assert srv.admin and srv.admin.startswith("vbk_")
        yield srv


def make_key(data_dir, roles, name="t"):
    out = run_cli("key-create", "--data-dir", data_dir, "--name", name, "--roles", roles)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split("=", 1) for line in out.stdout.splitlines())
    return lines["id"], lines["token"]


@pytest.fixture(scope="module")
def spec(server):
    return server.client().openapi()


# ---------------------------------------------------------------------------- every route
def test_every_route_roundtrip_matches_openapi(server, spec):
    c = server.client(server.admin)
    rng = np.random.default_rng(7)
    x = unit(rng, 3)

    def call(method, path, body=None, expect=200):
        status, headers, raw = c.request(method, path, body)
        assert status == expect, (path, status, raw)
        assert RID.match(headers["x-request-id"])
        if path != "/v2/metrics":
            validate_response(spec, method, path, status, orjson.loads(raw))
        return raw

    call("POST", "/v2/vectors", {"vector": x[0], "metadata": {"source_file": "a.wav", "start_time_ms": 40,
                                                              "duration_ms": 20, "bpm": 99.5, "tags": ["x"]}}, 201)
    call("POST", "/v2/vectors/batch", {"vectors": [{"vector": x[1]}, {"vector": x[2], "idempotency_key": "k-1"}]},
         201)
    call("POST", "/v2/query", {"vector": x[0], "k": 2})
    call("POST", "/v2/identify", {"vectors": x[1:3], "k": 1})
    call("GET", "/v2/health/live")
    call("GET", "/v2/health/ready")
    call("POST", "/v2/admin/checkpoint")
    call("POST", "/v2/admin/compact")
    snap = orjson.loads(call("POST", "/v2/admin/snapshot"))["data"]
    assert snap["job_id"] == snap["details"]["snapshot_id"] and snap["state"] == "completed"
    call("GET", "/v2/admin/stats")
    raw = call("GET", "/v2/metrics")
    assert raw.startswith(b"# HELP vibrato_query_requests_total")
    call("GET", "/v2/openapi.json")
    status, _, _ = c.request("HEAD", "/v2/health/live")
    assert status == 200


def test_ingest_query_identify_hot_then_checkpointed(server):
    c = server.client(server.admin)
    rng = np.random.default_rng(11)
    track = unit(rng, 24)
    ids = c.ingest_batch(track, metadatas=[{"source_file": "song.wav", "start_time_ms": 25 * i, "duration_ms": 25,
                                            "bpm": 120, "tags": ["Song"]} for i in range(24)])
    first = ids[0][0]
    assert [i for i, _ in ids] == list(range(first, first + 24)) and all(cr for _, cr in ids)

    def check_identify():
        res = c.identify(track[5:13], k=3)["results"]
        top = res[0]
        assert top["id"] == first + 5
        assert top["score"] == pytest.approx(1.0, abs=1e-3)  # mean per-frame inner product (CONTRACT.md D1)
        assert top["start_timestamp_ms"] == 125 and top["duration_ms"] == 25 * 8
        no_meta = c.identify(track[5:13], k=1, include_metadata=False)["results"][0]
        assert "metadata" not in no_meta and no_meta["start_timestamp_ms"] == 125  # CONTRACT.md D7
        hits = c.query(track[3], k=1, filter={"tags_any": ["song"], "bpm_gte": 119.5, "bpm_lte": 120.5})["results"]
        assert hits[0]["id"] == first + 3 and hits[0]["metadata"]["source_file"] == "song.wav"
        assert c.query(track[3], k=5, filter={"tags_all": ["nope"]})["results"] == []

    check_identify()                      # hot tier
    job = c.checkpoint()
    assert job["state"] == "completed" and job["job_id"].startswith("chk_")
    assert c.checkpoint()["state"] == "idle"
    check_identify()                      # checkpointed segment
    stats = c.stats()
    assert stats["hot_vectors"] == 0 and stats["wal_pending"] == 0 and stats["total_vectors"] >= 24


def test_compaction_and_async_client(server):
    import asyncio
    from vibrato.client import AsyncClient
    rng = np.random.default_rng(21)
    a, b = unit(rng, 30), unit(rng, 30)

    async def main():
        async with AsyncClient(server.url, server.admin) as c:
            ids_a = [i for i, _ in await c.ingest_batch(a)]
            assert (await c.checkpoint())["state"] == "completed"
            ids_b = [i for i, _ in await c.ingest_batch(b)]
            assert (await c.checkpoint())["state"] == "completed"
            job = await c.compact()
            assert job["state"] == "completed" and job["job_id"].startswith("cmp_"), job
            assert job["details"]["output_level"] in (1, 2) and len(job["details"]["input_segments"]) >= 2
            for vecs, ids in ((a, ids_a), (b, ids_b)):
                for i in (0, 29):
                    hit = (await c.query(vecs[i], k=1, search_tier="all"))["results"][0]
                    assert hit["id"] == ids[i]
            assert (await c.health_ready())["ready"] is True
            assert "vibrato_compaction_total" in await c.metrics()
            with pytest.raises(VibratoHTTPError) as err:
                await c.query(a[0], k=5000)
            assert err.value.status == 400 and err.value.code == "bad_request"

    asyncio.run(main())


def test_idempotency_and_conflict(server):
    c = server.client(server.admin)
    v = np.full(DIM, 0.25, np.float32)
    vid, created = c.ingest(v, metadata={"tags": ["a"]}, idempotency_key="  same-key ")
    assert created
    assert c.ingest(v, metadata={"tags": ["a"]}, idempotency_key="same-key") == (vid, False)
    status, _, raw = c.request("POST", "/v2/vectors", {"vector": v, "metadata": {"tags": ["a"]},
                                                       "idempotency_key": "same-key"})
    assert status == 201 and orjson.loads(raw)["data"] == {"id": vid, "created": False}
    with pytest.raises(VibratoHTTPError) as err:
        c.ingest(v * 2, idempotency_key="same-key")
    assert err.value.status == 409 and err.value.code == "conflict"
    res = c.ingest_batch([{"vector": v, "idempotency_key": "b1"}, {"vector": v, "idempotency_key": "b1"},
                          {"vector": v, "metadata": {"tags": ["a"]}, "idempotency_key": "same-key"}])
    assert res[0][1] and res[1] == (res[0][0], False) and res[2] == (vid, False)


def test_batch_is_atomic(server):
    c = server.client(server.admin)
    before = c.stats()["next_id"]
    v = np.full(DIM, 0.5, np.float32)
    bad_batches = [
        ([{"vector": v}, {"vector": v}, {"vector": [1e39] * DIM}], 400),
        ([{"vector": v}, {"vector": [0.5] * (DIM - 1)}], 400),
        ([{"vector": v}, {"vector": v, "metadata": {"bpm": "fast"}}], 422),
        ([{"vector": v, "idempotency_key": "atomic-1"}, {"vector": v * 3, "idempotency_key": "atomic-1"}], 409),
    ]
    for items, status in bad_batches:
        with pytest.raises(VibratoHTTPError) as err:
            c.ingest_batch(items)
        assert err.value.status == status, err.value
    assert c.stats()["next_id"] == before
    assert c.ingest(v, idempotency_key="atomic-1")[1]  # the key was never consumed


def test_errors_have_json_bodies_and_request_ids(server):
    c = server.client(server.admin)
    cases = [
        ("POST", "/v2/query", b'{"vector": [1,2', {"Content-Type": "application/json"}, 400, "invalid_json"),
        ("POST", "/v2/query", b'{"vector": []}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
        ("POST", "/v2/query", b'{"vector": [' + b"1," * 1_100_000 + b"1]}", {"Content-Type": "application/json"},
         413, "payload_too_large"),
        ("POST", "/v2/query", b'{"vector": [1], "filter": {"tags": []}}', {"Content-Type": "application/json"},
         422, "validation_error"),
        ("GET", "/v2/does-not-exist", None, {}, 404, "not_found"),
        ("PUT", "/v2/vectors", None, {}, 405, "method_not_allowed"),
    ]
    for method, path, raw, headers, status, code in cases:
        st, hdrs, body = c.request(method, path, raw=raw, headers={**headers, "x-request-id": f"case-{status}"})
        assert st == status, body
        assert hdrs["content-type"].startswith("application/json")
        assert hdrs["x-request-id"] == f"case-{status}"
        assert orjson.loads(body)["code"] == code


def test_auth_roles_revocation_and_audit(server):
    ingest_id, ingest_tok = make_key(server.data, "ingest", "e2e-ingest")
    query_id, query_tok = make_key(server.data, "QUERY, bogus", "e2e-query")
    v = np.ones(DIM, np.float32)
    assert server.client(ingest_tok).ingest(v)[1]
    with pytest.raises(VibratoHTTPError) as err:
        server.client(ingest_tok).query(v)
    assert (err.value.status, err.value.code, err.value.message) == (403, "forbidden", "insufficient role")
    qc = server.client(query_tok)
    assert qc.query(v, k=1)["results"]
    with pytest.raises(VibratoHTTPError) as err:
        qc.stats()
    assert err.value.status == 403  # CONTRACT.md D19
    out = run_cli("key-revoke", "--data-dir", server.data, "--key-id", query_id)
    assert out.returncode == 0 and out.stdout.strip() == f"revoked={query_id}"
    time.sleep(1.05)  # CONTRACT.md D17: the server's key cache lives at most 1 s
    with pytest.raises(VibratoHTTPError) as err:
        qc.query(v, k=1)
    assert err.value.status == 403
    with pytest.raises(VibratoHTTPError) as err:  # CONTRACT.md D16: wrong secret on a revoked key is 401
        server.client(query_id + "." + "a" * 48).query(v, k=1)
    assert err.value.status == 401 and err.value.code == "invalid_authorization"
    with pytest.raises(VibratoHTTPError) as err:
        server.client(None).query(v)
    assert err.value.code == "missing_authorization"
    listing = run_cli("key-list", "--data-dir", server.data)
    assert listing.returncode == 0
    line = next(ln for ln in listing.stdout.splitlines() if ln.startswith(f"id={query_id} "))
    assert "name=e2e-query roles=query " in line and not line.endswith("revoked=-")
    assert query_tok.split(".")[1] not in listing.stdout
    with Catalog(Path(server.data) / "catalog.sqlite3") as cat:
        for _ in range(200):  # the audit writer flushes every 250 ms
            rows = cat.read(audit_sql.recent, 200)
            if any(r["endpoint"] == "/v2/admin/stats" and r["status_code"] == 403 for r in rows):
                break
            time.sleep(0.05)
    failures = [r for r in rows if r["status_code"] in (401, 403) and r["endpoint"] == "/v2/query"]
    assert failures and all(r["api_key_id"] is None and r["client_ip"] == "127.0.0.1" for r in failures)
    assert any(orjson.loads(r["details_json"]) == {"error": "insufficient role"} for r in failures)
    stats_fail = [r for r in rows if r["endpoint"] == "/v2/admin/stats" and r["status_code"] == 403]
    assert stats_fail and stats_fail[0]["action"] == "stats"


def test_stats_and_metrics_content(server):
    c = server.client(server.admin)
    stats = c.stats()
    from vibrato.server.openapi import STATS_FIELDS
    assert list(stats)[:15] == list(STATS_FIELDS)
    text = c.metrics()
    types, samples = parse_metrics(text)
    for name, kind in REFERENCE_SERIES:
        assert types[name] == kind
    assert samples["vibrato_total_vectors"] == stats["total_vectors"] or samples["vibrato_total_vectors"] >= 0
    assert samples["vibrato_ingest_requests_total"] >= 1 and samples["vibrato_checkpoint_total"] >= 0
    assert samples["vibrato_ready"] == 1


def test_limits_are_configurable_by_flags(tmp_path):
    with ServerProcess(tmp_path / "d", extra=["--max-k", "5", "--max-body-bytes", "10000000", "--max-batch",
                                              "20000", "--max-tags", "2"]) as srv:
        srv.wait_ready()
        c = srv.client(srv.bootstrap_token)
        with pytest.raises(VibratoHTTPError) as err:
            c.query(np.ones(DIM), k=6)
        assert err.value.status == 400 and "--max-k" in err.value.message
        with pytest.raises(VibratoHTTPError) as err:
            c.ingest(np.ones(DIM), metadata={"tags": ["a", "b", "c"]})
        assert err.value.status == 400 and "--max-tags" in err.value.message
        rows = c.ingest_batch(np.random.default_rng(0).standard_normal((12_000, DIM)).astype(np.float32))
        assert len(rows) == 12_000 and rows[-1][0] - rows[0][0] == 11_999


# ---------------------------------------------------------------------------- lifecycle
def test_sigterm_shutdown_restart_persistence_and_lock(tmp_path):
    data = tmp_path / "data"
    srv = ServerProcess(data, host="localhost").wait_ready()  # CONTRACT.md D26: hostnames
    c = srv.client(srv.bootstrap_token)
    rng = np.random.default_rng(3)
    x = unit(rng, 50)
    ids = [i for i, _ in c.ingest_batch(x[:40])]
    c.checkpoint()
    ids += [i for i, _ in c.ingest_batch(x[40:])]  # stays in the WAL tail
    # A second server on the same data dir is refused with a clear error and exit 1.
    second = ServerProcess(data, bootstrap=False)
    assert second.wait_exit(60) == 1
    assert any("locked" in line for line in second.stderr_lines), second.output()
    # In-flight requests finish during a graceful shutdown: the request's headers and half its body
    # are sent before SIGTERM, the rest after; the server must still answer it, then exit 0.
    body = orjson.dumps({"vectors": [{"vector": v} for v in unit(rng, 500)]}, option=orjson.OPT_SERIALIZE_NUMPY)
    head = (f"POST /v2/vectors/batch HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {srv.bootstrap_token}\r\nx-request-id: inflight-batch\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(head + body[:len(body) // 2])
        for _ in range(600):  # wait until the server is handling it (the metrics request is the other one)
            if parse_metrics(c.metrics())[1]["vibrato_http_requests_in_flight"] >= 2:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the half-sent request never became in-flight")
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        sock.sendall(body[len(body) // 2:])
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 201"), reply[:200]
    rc = srv.wait_exit()
    assert rc == 0, srv.output()
    assert any('"shutdown complete"' in line for line in srv.stderr_lines)
    # The lock is released and the SQLite WAL was truncated at close.
    wal = data / "catalog.sqlite3-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    # The audit queue was flushed at shutdown (the in-flight request's row is there).
    with Catalog(data / "catalog.sqlite3") as cat:
        rows = cat.read(audit_sql.recent, 50)
    assert any(r["request_id"] == "inflight-batch" and r["status_code"] == 201 for r in rows)
    # Restart (IPv6 loopback where available): every acknowledged write is still there.
    host = "::1" if _has_ipv6() else "127.0.0.1"
    srv2 = ServerProcess(data, host=host, bootstrap=False).wait_ready()
    try:
        assert srv2.bootstrap_token is None  # a live key exists: no new bootstrap key
        c2 = srv2.client(srv.bootstrap_token)
        for i in (0, 39, 40, 49):
            assert c2.query(x[i], k=1, search_tier="all")["results"][0]["id"] == ids[i]
        assert c2.stats()["next_id"] >= 50
    finally:
        assert srv2.terminate() == 0


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_port_in_use_and_bad_flags_exit_codes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        srv = ServerProcess(tmp_path / "d", port=port)
        assert srv.wait_exit(60) == 1
        assert any(line.startswith("Error: cannot listen on") for line in srv.stderr_lines), srv.output()
    out = run_cli("serve-v2", "--data-dir", tmp_path / "d", "--public-health-metrics", "FALSEY")
    assert out.returncode == 2
    out = run_cli("serve-v2", "--data-dir", tmp_path / "d", "--dim", "16", "--port", free_port())
    assert out.returncode == 1 and "exists with dim 8, expected 16" in out.stderr


def test_private_health_and_metrics(tmp_path):
    with ServerProcess(tmp_path / "d", extra=["--public-health-metrics", "false"]) as srv:
        srv.wait_ready()  # with the bootstrap admin key
        assert srv.client().request("GET", "/v2/health/live")[0] == 401
        assert srv.client().request("GET", "/v2/metrics")[0] == 401
        _, qtok = make_key(tmp_path / "d", "query")
        assert srv.client(qtok).health_live()["status"] == "ok"
        assert srv.client(qtok).health_ready()["ready"] is True
        with pytest.raises(VibratoHTTPError) as err:
            srv.client(qtok).metrics()
        assert err.value.status == 403
        assert "vibrato_query_requests_total" in srv.client(srv.bootstrap_token).metrics()


# ---------------------------------------------------------------------------- runbook verbatim
# CONTRACT.md §7.2 (runbook §1-§2: bootstrap and start, API key lifecycle)
def test_runbook_sections_1_and_2_verbatim(tmp_path):
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", 8080))
        except OSError:
            pytest.skip("port 8080 is busy on this machine")
    exe = shutil.which("vibrato", path=str(Path(sys.executable).parent)) or shutil.which("vibrato")
    if exe is None:
        pytest.skip("the vibrato console script is not installed")
    serve = ("serve-v2 --data-dir ./vibrato_data --collection default --dim 128 --port 8080 --host 0.0.0.0 "
             "--checkpoint-interval-secs 30 --compaction-interval-secs 180 --orphan-ttl-hours 168 "
             "--audio-colocated true --public-health-metrics true --bootstrap-admin-key true").split()
    srv = ServerProcess(None, port=8080, host="0.0.0.0", cwd=tmp_path, args=serve)
    try:
        srv.wait_ready()
        token = srv.bootstrap_token
        assert token and re.match(r"^vbk_\d+[0-9a-f]{24}\.[0-9a-f]{48}$", token)
        created = subprocess.run([exe, "key-create", "--data-dir", "./vibrato_data", "--name", "prod-query",
                                  "--roles", "query"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert created.returncode == 0, created.stderr
        lines = created.stdout.splitlines()
        assert lines[0].startswith("id=vbk_") and lines[1].startswith("token=" + lines[0][3:] + ".")
        key_id, token_q = lines[0][3:], lines[1][6:]
        assert Client("http://127.0.0.1:8080", token_q).query(np.ones(128), k=1)["results"] == []
        revoked = subprocess.run([exe, "key-revoke", "--data-dir", "./vibrato_data", "--key-id", key_id],
                                 cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert revoked.returncode == 0 and revoked.stdout == f"revoked={key_id}\n"
        curl = shutil.which("curl")
        if curl:  # CONTRACT.md §7.2 (runbook §3), verbatim (with the bootstrap token)
            for cmd in (f'curl -X POST http://127.0.0.1:8080/v2/admin/checkpoint -H "Authorization: Bearer {token}"',
                        f'curl -X POST http://127.0.0.1:8080/v2/admin/compact -H "Authorization: Bearer {token}"',
                        f'curl http://127.0.0.1:8080/v2/admin/stats -H "Authorization: Bearer {token}"'):
                out = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60)
                assert out.returncode == 0 and out.stdout.startswith('{"data":{'), (cmd, out.stdout)
        else:
            for path in ("/v2/admin/checkpoint", "/v2/admin/compact"):
                assert Client("http://127.0.0.1:8080", token).request("POST", path)[0] == 200
    finally:
        assert srv.terminate() == 0, srv.output()
    assert (tmp_path / "vibrato_data" / "catalog.sqlite3").exists()


def test_offline_commands_against_a_running_server(server):
    out = run_cli("snapshot-create", "--data-dir", server.data, "--collection", "default")
    assert out.returncode == 0, out.stderr
    lines = dict(line.split("=", 1) for line in out.stdout.splitlines())
    assert lines["snapshot_id"].startswith("snap_") and Path(lines["snapshot_dir"]).is_dir()
    out = run_cli("replay-to-lsn", "--data-dir", server.data, "--collection", "default", "--target-lsn", "1")
    assert out.returncode == 1 and out.stderr.startswith("Error: ") and out.stdout == ""
    out = run_cli("snapshot-restore", "--data-dir", server.data, "--snapshot-dir", lines["snapshot_dir"])
    assert out.returncode == 1 and out.stderr.startswith("Error: ") and out.stdout == ""
    assert server.client(server.admin).health_ready()["ready"] is True
