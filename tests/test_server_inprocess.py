"""In-process tests of the v2 app (`create_app` over a real engine on a temp data dir, aiohttp's
test server on 127.0.0.1): request validation, auth outcomes, error bodies, request ids, metrics,
audit rows and the OpenAPI document. The subprocess tests are in test_server_e2e.py."""
import asyncio
import re
import threading
import time

import jsonschema
import numpy as np
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from server_util import embedded_engine
from vibrato import apikeys
from vibrato.catalog import audit as audit_sql
from vibrato.config import Config, Limits
from vibrato.engine import Engine
from vibrato.server import create_app
from vibrato.server.app import ROUTES

DIM = 8
RID = re.compile(r"^req_\d+_[0-9a-f]{16}$")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    keys = [("admin", "admin"), ("query", "query"), ("ingest", "ingest"), ("revoked", "admin,query")]
    with embedded_engine(tmp_path_factory.mktemp("inproc"), DIM, keys) as (config, engine, tokens):
        apikeys.revoke_key(engine.catalog, tokens["revoked"].split(".")[0])
        yield {"config": config, "engine": engine, "tokens": tokens}


def run(env, body, **config_changes):
    """Run `await body(client, tokens)` against a fresh app over the shared engine."""
    config = env["config"].replace(**config_changes) if config_changes else env["config"]

    async def main():
        app = create_app(config, engine=env["engine"])
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            await body(client, env["tokens"])

    asyncio.run(main())


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def vec(*head):
    v = [0.0] * DIM
    v[:len(head)] = head
    return v


async def expect_error(resp, status, code, *fragments):
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    assert resp.headers.get("x-request-id")
    body = await resp.json()
    assert set(body) == {"code", "message"}, body
    assert body["code"] == code, body
    for f in fragments:
        assert f in body["message"], (f, body)
    return body


# ---------------------------------------------------------------------------- request validation
VALIDATION_CASES = [
    # (path, body, status, code, message fragments)
    ("/v2/query", {"vector": vec(1), "filter": {"tags": ["rock"]}}, 422, "validation_error", ["filter.tags"]),
    ("/v2/query", {"vector": vec(1), "kk": 3}, 422, "validation_error", ["kk"]),
    ("/v2/query", {"vector": vec(1), "search_tier": "hot"}, 422, "validation_error", ["search_tier", "hot"]),
    ("/v2/query", {"vector": vec(1), "k": None}, 422, "validation_error", ["k", "null"]),
    ("/v2/query", {"vector": vec(1), "k": -1}, 422, "validation_error", ["k"]),
    ("/v2/query", {"vector": vec(1), "k": 2.5}, 422, "validation_error", ["k"]),
    ("/v2/query", {"vector": vec(1), "k": "3"}, 422, "validation_error", ["k"]),
    ("/v2/query", {"vector": vec(1), "include_metadata": 1}, 422, "validation_error", ["include_metadata"]),
    ("/v2/query", {"k": 3}, 422, "validation_error", ["vector"]),
    ("/v2/query", [vec(1)], 422, "validation_error", ["object"]),
    ("/v2/query", {"vector": [1, "2"] + [0] * (DIM - 2)}, 422, "validation_error", ["vector[1]"]),
    ("/v2/query", {"vector": [1, True] + [0] * (DIM - 2)}, 422, "validation_error", ["vector[1]"]),
    ("/v2/query", {"vector": vec(1), "k": 1001}, 400, "bad_request", ["k=1001", "1000", "--max-k"]),
    ("/v2/query", {"vector": vec(1), "ef": 5000}, 400, "bad_request", ["ef=5000", "4096", "--max-ef"]),
    ("/v2/query", {"vector": [1e39] + [0] * (DIM - 1)}, 400, "bad_request", ["vector[0]", "not finite"]),
    ("/v2/query", {"vector": vec(1), "filter": {"bpm_gte": 1e39}}, 400, "bad_request", ["filter.bpm_gte"]),
    ("/v2/query", {"vector": vec(1), "filter": {"bpm_gte": 130, "bpm_lte": 120}}, 400, "bad_request",
     ["bpm_gte", "bpm_lte"]),
    ("/v2/query", {"vector": [1.0, 2.0]}, 400, "bad_request", [f"dimension mismatch: expected {DIM}, got 2"]),
    ("/v2/query", {"vector": vec(1), "filter": {"tags_any": ["x"] * 65}}, 400, "bad_request",
     ["filter.tags_any", "65", "64"]),
    ("/v2/vectors", {"vector": vec(1), "metadata": None}, 422, "validation_error", ["metadata"]),
    ("/v2/vectors", {"vector": vec(1), "metadata": {"source_id": "x"}}, 422, "validation_error",
     ["metadata.source_id"]),
    ("/v2/vectors", {"vector": vec(1), "metadata": {"start_time_ms": 2**32}}, 422, "validation_error",
     ["metadata.start_time_ms"]),
    # integer bounds of the contract: start_time_ms u32, duration_ms u16, k/ef u64 (single and batch)
    ("/v2/vectors", {"vector": vec(1), "metadata": {"start_time_ms": -1}}, 422, "validation_error",
     ["metadata.start_time_ms"]),
    ("/v2/vectors", {"vector": vec(1), "metadata": {"duration_ms": 65536}}, 422, "validation_error",
     ["metadata.duration_ms", "65535"]),
    ("/v2/vectors", {"vector": vec(1), "metadata": {"duration_ms": -1}}, 422, "validation_error",
     ["metadata.duration_ms"]),
    ("/v2/vectors/batch", {"vectors": [{"vector": vec(1)}, {"vector": vec(1), "metadata": {"duration_ms": 70000}}]},
     422, "validation_error", ["vectors[1].metadata.duration_ms", "65535"]),
    ("/v2/vectors/batch", {"vectors": [{"vector": vec(1), "metadata": {"start_time_ms": 2**32}}]},
     422, "validation_error", ["vectors[0].metadata.start_time_ms"]),
    # (a raw body: 2**64 does not fit the client's JSON encoder)
    ("/v2/query", '{"vector": %s, "k": %d}' % (vec(1), 2**64), 422, "validation_error", ["k"]),
    ("/v2/identify", '{"vectors": [%s], "ef": %d}' % (vec(1), 2**64), 422, "validation_error", ["ef"]),
    ("/v2/vectors", {"vector": vec(1), "metadata": {"bpm": 1e39}}, 400, "bad_request", ["metadata.bpm"]),
    ("/v2/vectors", {"vector": vec(1), "metadata": {"tags": ["a" * 129]}}, 400, "bad_request",
     ["metadata.tags[0]", "129", "128"]),
    ("/v2/vectors", {"vector": vec(1), "metadata": {"tags": ["t"] * 65}}, 400, "bad_request", ["65", "64"]),
    ("/v2/vectors", {"vector": vec(1), "idempotency_key": 5}, 422, "validation_error", ["idempotency_key"]),
    ("/v2/vectors", {"vector": [0.5] * (DIM + 1)}, 400, "bad_request", ["dimension mismatch"]),
    ("/v2/vectors/batch", {}, 422, "validation_error", ["vectors"]),
    ("/v2/vectors/batch", {"vectors": [{"vector": vec(1)}, {"vector": vec(1), "extra": 1}]}, 422,
     "validation_error", ["vectors[1].extra"]),
    ("/v2/vectors/batch", {"vectors": [{"vector": vec(1)}, {"vector": [1.0]}]}, 400, "bad_request",
     [f"dimension mismatch at index 1: expected {DIM}, got 1"]),
    ("/v2/vectors/batch", {"vectors": [{"vector": vec(1)}, {"vector": [1e39] * DIM}]}, 400, "bad_request",
     ["vectors[1].vector[0]"]),
    ("/v2/identify", {"vectors": []}, 400, "bad_request", ["identify requires at least one vector"]),
    ("/v2/identify", {"vectors": [vec(1)], "filter": {}}, 422, "validation_error", ["filter"]),
    ("/v2/identify", {"vectors": [vec(1), [1.0]]}, 400, "bad_request",
     [f"dimension mismatch at vectors[1]: expected {DIM}, got 1"]),
    ("/v2/identify", {"vectors": [vec(1)] * 4097}, 400, "bad_request", ["4097", "4096", "--max-identify-frames"]),
]


def test_validation_errors_are_json_with_field_names(env):
    async def body(client, tokens):
        headers = auth(tokens["admin"])
        for path, payload, status, code, fragments in VALIDATION_CASES:
            data = payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
            resp = await client.post(path, data=data,
                                     headers={**headers, "Content-Type": "application/json"})
            await expect_error(resp, status, code, *fragments)
    run(env, body)


def test_batch_limit_and_empty_batch(env):
    async def body(client, tokens):
        h = {**auth(tokens["ingest"]), "Content-Type": "application/json"}
        resp = await client.post("/v2/vectors/batch", data=orjson.dumps({"vectors": [{"vector": vec(1)}] * 4}),
                                 headers=h)
        await expect_error(resp, 400, "bad_request", "vectors has 4 items", "limit of 3", "--max-batch")
        resp = await client.post("/v2/vectors/batch", data=b'{"vectors": []}', headers=h)
        assert resp.status == 201 and await resp.json() == {"data": {"results": []}}
    run(env, body, limits=Limits(max_batch=3))


def test_body_content_type_and_json_errors(env):
    async def body(client, tokens):
        h = auth(tokens["admin"])
        resp = await client.post("/v2/query", data=orjson.dumps({"vector": vec(1)}),
                                 headers={**h, "Content-Type": "text/plain"})
        await expect_error(resp, 415, "unsupported_media_type", "application/json")
        resp = await client.post("/v2/query", data=orjson.dumps({"vector": vec(1)}), headers=h)
        await expect_error(resp, 415, "unsupported_media_type")
        resp = await client.post("/v2/query", data=b'{"vector": [1,', headers={**h, "Content-Type": "application/json"})
        await expect_error(resp, 400, "invalid_json", "not valid JSON")
        resp = await client.post("/v2/query", data=b'{"vector": [1e400]}',
                                 headers={**h, "Content-Type": "application/vnd.api+json; charset=utf-8"})
        await expect_error(resp, 400, "invalid_json")
        big = b'{"vector": [' + b"0.000000001," * 300_000 + b'0]}'
        assert len(big) > 2 * 1024 * 1024
        resp = await client.post("/v2/query", data=big, headers={**h, "Content-Type": "application/json"})
        await expect_error(resp, 413, "payload_too_large", "2097152", "--max-body-bytes")

        async def chunks():  # chunked upload: no Content-Length, the limit still applies while reading
            for _ in range(30):
                yield b" " * 100_000
        resp = await client.post("/v2/query", data=chunks(), headers={**h, "Content-Type": "application/json"})
        await expect_error(resp, 413, "payload_too_large")
        resp = await client.get("/v2/nope")
        await expect_error(resp, 404, "not_found", "/v2/nope")
        resp = await client.get("/v2/query", headers=h)
        await expect_error(resp, 405, "method_not_allowed")
        assert resp.headers["Allow"] == "POST"
        resp = await client.delete("/v2/admin/stats", headers=h)
        await expect_error(resp, 405, "method_not_allowed")
    run(env, body)


def test_max_body_bytes_flag(env):
    async def body(client, tokens):
        h = {**auth(tokens["admin"]), "Content-Type": "application/json"}
        resp = await client.post("/v2/query", data=orjson.dumps({"vector": vec(1), "k": 1, "ef": 10}), headers=h)
        await expect_error(resp, 413, "payload_too_large", "limit of 40 bytes")
    run(env, body, limits=Limits(max_body_bytes=40))


def test_request_id_echo_and_generation(env):
    async def body(client, tokens):
        resp = await client.get("/v2/health/live", headers={"x-request-id": "trace-abc-123"})
        assert resp.headers["x-request-id"] == "trace-abc-123"
        for headers in ({}, {"x-request-id": "   "}):
            resp = await client.get("/v2/health/live", headers=headers)
            assert RID.match(resp.headers["x-request-id"])
        resp = await client.get("/v2/metrics")
        assert RID.match(resp.headers["x-request-id"])
        resp = await client.post("/v2/query")
        assert resp.status == 401 and RID.match(resp.headers["x-request-id"])
    run(env, body)


# ---------------------------------------------------------------------------- auth
def test_auth_outcomes(env):
    async def body(client, tokens):
        q = {"vector": vec(1)}
        cases = [
            ({}, 401, "missing_authorization", "missing bearer token"),
            ({"Authorization": "Basic abc"}, 401, "invalid_authorization", "invalid api key"),
            ({"Authorization": "Bearer"}, 401, "invalid_authorization", "invalid api key"),
            ({"Authorization": "Bearer abc.def"}, 401, "invalid_authorization", "invalid api key"),
            ({"Authorization": "Bearer vbk_1700000000a1b2c3d4e5f6a7b8c9d0e1f2"}, 401, "invalid_authorization", ""),
            (auth(tokens["admin"].split(".")[0] + "." + "0" * 48), 401, "invalid_authorization", ""),
            (auth("vbk_1700000000a1b2c3d4e5f6a7b8c9d0e1f2." + "0" * 48), 401, "invalid_authorization", ""),
            (auth(tokens["ingest"]), 403, "forbidden", "insufficient role"),
            (auth(tokens["revoked"]), 403, "forbidden", "insufficient role"),
            # CONTRACT.md D16: a wrong secret on a revoked key is 401, never a revocation oracle.
            (auth(tokens["revoked"].split(".")[0] + "." + "1" * 48), 401, "invalid_authorization", ""),
        ]
        for headers, status, code, msg in cases:
            resp = await client.post("/v2/query", data=orjson.dumps(q), headers=headers)
            await expect_error(resp, status, code, msg)
        # Bearer scheme is case-insensitive and tolerates extra whitespace.
        resp = await client.post("/v2/query", data=orjson.dumps(q),
                                 headers={"Authorization": f"bEaReR \t {tokens['query']}",
                                          "Content-Type": "application/json"})
        assert resp.status == 200, await resp.text()
        # Authentication precedes body parsing (CONTRACT.md D15): bad body + no key = 401.
        resp = await client.post("/v2/query", data=b"not json", headers={"Content-Type": "text/plain"})
        await expect_error(resp, 401, "missing_authorization")
        # CONTRACT.md D19: stats reports auth errors like every other endpoint.
        resp = await client.get("/v2/admin/stats")
        await expect_error(resp, 401, "missing_authorization")
        resp = await client.get("/v2/admin/stats", headers=auth(tokens["query"]))
        await expect_error(resp, 403, "forbidden")
        for path in ("/v2/admin/checkpoint", "/v2/admin/compact", "/v2/admin/snapshot"):
            resp = await client.post(path, headers=auth(tokens["query"]))
            await expect_error(resp, 403, "forbidden")
        resp = await client.post("/v2/vectors", data=orjson.dumps({"vector": vec(1)}),
                                 headers={**auth(tokens["query"]), "Content-Type": "application/json"})
        await expect_error(resp, 403, "forbidden")
        metrics = await (await client.get("/v2/metrics")).text()
        failures = float(re.search(r"^vibrato_auth_failures_total (\S+)$", metrics, re.M).group(1))
        assert failures == 17
    run(env, body)


def test_public_and_private_health_and_metrics(env):
    async def public(client, tokens):
        for path in ("/v2/health/live", "/v2/health/ready", "/v2/metrics"):
            resp = await client.get(path, headers={"Authorization": "garbage"})
            assert resp.status == 200, path

    async def private(client, tokens):
        for path in ("/v2/health/live", "/v2/health/ready"):
            await expect_error(await client.get(path), 401, "missing_authorization")
            await expect_error(await client.get(path, headers=auth(tokens["ingest"])), 403, "forbidden")
            assert (await client.get(path, headers=auth(tokens["query"]))).status == 200
        await expect_error(await client.get("/v2/metrics"), 401, "missing_authorization")
        await expect_error(await client.get("/v2/metrics", headers=auth(tokens["query"])), 403, "forbidden")
        resp = await client.get("/v2/metrics", headers=auth(tokens["admin"]))
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4"
        assert (await client.get("/v2/openapi.json")).status == 200

    run(env, public)
    run(env, private, public_health_metrics=False)


def test_revocation_applies_within_one_second(env):
    engine = env["engine"]
    pepper = apikeys.load_pepper(env["config"].data_dir)
    key_id, token = apikeys.create_key(engine.catalog, pepper, "short-lived", "query")

    async def body(client, tokens):
        h = {**auth(token), "Content-Type": "application/json"}
        q = orjson.dumps({"vector": vec(1)})
        assert (await client.post("/v2/query", data=q, headers=h)).status == 200  # now cached
        await asyncio.to_thread(apikeys.revoke_key, engine.catalog, key_id)
        await asyncio.sleep(1.05)  # the cache TTL is 1 s (CONTRACT.md D17)
        await expect_error(await client.post("/v2/query", data=q, headers=h), 403, "forbidden")
    run(env, body)


# ---------------------------------------------------------------------------- data, metrics, audit
def test_scores_are_shortest_float32_and_audit_rows(env):
    async def body(client, tokens):
        h = {**auth(tokens["admin"]), "Content-Type": "application/json", "x-request-id": "audit-me-1"}
        resp = await client.post("/v2/vectors", headers=h, data=orjson.dumps(
            {"vector": vec(0, 0, 0, 0, 0, 0, 0, 1), "metadata": {"bpm": 120.1, "tags": [" Rock", "rock", "Jazz "]}}))
        assert resp.status == 201, await resp.text()
        vid = (await resp.json())["data"]["id"]
        resp = await client.post("/v2/query", headers={**h, "x-request-id": "audit-me-2"}, data=orjson.dumps(
            {"vector": vec(0, 0, 0, 0, 0, 0, 0, 0.1), "k": 1, "filter": {"tags_all": ["ROCK", "jazz"]}}))
        raw = await resp.read()
        assert resp.status == 200, raw
        assert b'"score":0.1,' in raw and b'"bpm":120.1,' in raw, raw
        hit = orjson.loads(raw)["data"]["results"][0]
        assert hit["id"] == vid and hit["metadata"]["tags"] == ["jazz", "rock"]
        for _ in range(200):  # the audit writer flushes every 250 ms
            rows = await asyncio.to_thread(env["engine"].catalog.read, audit_sql.recent, 50)
            mine = {r["request_id"]: r for r in rows if r["request_id"].startswith("audit-me")}
            if len(mine) == 2:
                break
            await asyncio.sleep(0.05)
        assert mine["audit-me-1"]["action"] == "ingest" and mine["audit-me-1"]["status_code"] == 201
        assert mine["audit-me-2"]["action"] == "query" and mine["audit-me-2"]["client_ip"] == "127.0.0.1"
        assert mine["audit-me-2"]["api_key_id"] == tokens["admin"].split(".")[0]
        assert orjson.loads(mine["audit-me-2"]["details_json"]) == {"k": 1, "ef": 50}
        assert abs(mine["audit-me-1"]["ts"] - time.time()) < 60
    run(env, body)


@pytest.mark.parametrize("inline", [True, False])
def test_small_queries_run_on_the_loop_unless_inline_search_is_off(env, inline, monkeypatch):
    """--inline-search: a small query runs on the event loop's thread, a large one (or any, when it is
    off) on an executor thread; the answers are the same either way."""
    engine = env["engine"]
    threads = []
    real = engine.query

    def spy(*a, **kw):
        threads.append(threading.current_thread().name)
        return real(*a, **kw)
    monkeypatch.setattr(engine, "query", spy)

    async def body(client, tokens):
        h = {**auth(tokens["admin"]), "Content-Type": "application/json"}
        loop_thread = threading.current_thread().name
        answers = []
        for k, ef in ((5, 50), (5, 4000)):
            resp = await client.post("/v2/query", headers=h, data=orjson.dumps(
                {"vector": vec(1, 0.5), "k": k, "ef": ef, "search_tier": "all"}))
            assert resp.status == 200, await resp.text()
            answers.append([r["id"] for r in (await resp.json())["data"]["results"]])
        assert answers[0] == answers[1]
        small, large = threads
        assert (small == loop_thread) is inline and large.startswith("vibrato-http")
    run(env, body, inline_search=inline)


# v2.1's 22 series, names, types and order (CONTRACT.md §1.6, R1).
REFERENCE_SERIES = [
    ("vibrato_query_requests_total", "counter"), ("vibrato_identify_requests_total", "counter"),
    ("vibrato_ingest_requests_total", "counter"), ("vibrato_auth_failures_total", "counter"),
    ("vibrato_audit_failures_total", "counter"), ("vibrato_checkpoint_total", "counter"),
    ("vibrato_compaction_total", "counter"), ("vibrato_obsolete_files_deleted_total", "counter"),
    ("vibrato_query_latency_us", "histogram"), ("vibrato_active_segments", "gauge"),
    ("vibrato_obsolete_segments", "gauge"), ("vibrato_failed_segments", "gauge"), ("vibrato_hot_vectors", "gauge"),
    ("vibrato_wal_pending", "gauge"), ("vibrato_total_vectors", "gauge"),
    ("vibrato_checkpoint_jobs_inflight", "gauge"), ("vibrato_compaction_jobs_inflight", "gauge"),
    ("vibrato_sqlite_wal_bytes", "gauge"), ("vibrato_catalog_read_timeout_total", "counter"),
    ("vibrato_quarantine_files", "gauge"), ("vibrato_quarantine_bytes", "gauge"),
    ("vibrato_quarantine_evictions_total", "counter"),
]


def parse_metrics(text):
    types, samples = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return types, samples


def test_metrics_exposition(env):
    async def body(client, tokens):
        h = {**auth(tokens["admin"]), "Content-Type": "application/json"}
        await client.post("/v2/query", headers=h, data=orjson.dumps({"vector": vec(1)}))
        await client.post("/v2/identify", headers=h, data=orjson.dumps({"vectors": [vec(1)], "k": 2}))
        resp = await client.get("/v2/metrics")
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4"
        text = await resp.text()
        types, samples = parse_metrics(text)
        order = [n for n in types if n in dict(REFERENCE_SERIES)]
        assert order == [n for n, _ in REFERENCE_SERIES]
        for name, kind in REFERENCE_SERIES:
            assert types[name] == kind, name
            assert f"# HELP {name} " in text
        assert "_created" not in text
        assert samples["vibrato_query_requests_total"] >= 1 and samples["vibrato_identify_requests_total"] >= 1
        buckets = re.findall(r'vibrato_query_latency_us_bucket\{le="([^"]+)"\}', text)
        assert buckets[:9] == ["10", "25", "50", "100", "250", "500", "1000", "2500", "5000"]
        assert buckets[-2:] == ["10000000", "+Inf"]
        assert samples['vibrato_query_latency_us_bucket{le="+Inf"}'] == samples["vibrato_query_latency_us_count"]
        assert samples['vibrato_http_requests_total{method="POST",route="/v2/query",status="200"}'] >= 1
        assert 'vibrato_http_request_duration_seconds_bucket{le="10",method="POST",route="/v2/query"}' in text
        assert types["vibrato_http_request_duration_seconds"] == "histogram"
    run(env, body)


# ---------------------------------------------------------------------------- OpenAPI
def test_openapi_documents_every_route_and_validates_responses(env):
    async def body(client, tokens):
        spec = await (await client.get("/v2/openapi.json")).json()
        jsonschema.Draft202012Validator.check_schema({"$defs": spec["components"]["schemas"]})
        app_routes = {(r.method, r.resource.canonical) for r in client.app.router.routes() if r.method != "HEAD"}
        documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
        # /internal/ routes answer only on the data dir's unix sockets (server/workers.py): a 404 here
        internal = {r for r in app_routes if r[1].startswith("/internal/")}
        assert internal == {("POST", "/internal/audit")}
        resp = await client.post("/internal/audit", data=b"[]")
        assert resp.status == 404 and (await resp.json())["code"] == "not_found"
        assert app_routes - internal == documented
        assert {(r.method, r.path) for r in ROUTES} == documented
        h = {**auth(tokens["admin"]), "Content-Type": "application/json"}
        calls = [("POST", "/v2/vectors", {"vector": vec(1), "metadata": {"tags": ["a"]}}),
                 ("POST", "/v2/vectors/batch", {"vectors": [{"vector": vec(0, 1)}, {"vector": vec(0, 0, 1)}]}),
                 ("POST", "/v2/query", {"vector": vec(1), "k": 3}),
                 ("POST", "/v2/identify", {"vectors": [vec(0, 1), vec(0, 0, 1)], "k": 2}),
                 ("GET", "/v2/health/live", None), ("GET", "/v2/health/ready", None),
                 ("GET", "/v2/admin/stats", None), ("POST", "/v2/query", {"vector": vec(1), "kk": 1}),
                 ("POST", "/v2/query", {"vector": [1.0]})]
        for method, path, payload in calls:
            resp = await client.request(method, path, headers=h,
                                        data=None if payload is None else orjson.dumps(payload))
            validate_response(spec, method, path, resp.status, await resp.json())
    run(env, body)


def validate_response(spec, method, path, status, body):
    """Validate a JSON response body against the schema documented for (method, path, status)."""
    op = spec["paths"][path][method.lower()]
    assert str(status) in op["responses"], (method, path, status)
    schema = op["responses"][str(status)]["content"]["application/json"]["schema"]
    resolver_doc = {**schema, "components": spec["components"]}
    jsonschema.validate(body, resolver_doc, cls=jsonschema.Draft202012Validator)


def test_vector_decoding_matches_numpy_reference():
    from vibrato.server.schemas import Validator
    v = Validator(Config(dim=4))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 4)).astype(np.float32)
    prep = v.ingest_batch(orjson.loads(orjson.dumps({"vectors": [{"vector": r.tolist()} for r in x]})))
    assert np.array_equal(prep.vectors, x)
    mixed = v.query({"vector": [1, 2.5, -3, 0]})
    assert mixed["vector"].dtype == np.float32 and mixed["vector"].tolist() == [1.0, 2.5, -3.0, 0.0]


def test_recovery_window_live_ready_and_not_ready(tmp_path, monkeypatch):
    """CONTRACT.md D21: while recovery runs, live is 200, ready is 503 `recovering` and data calls are 503 not_ready."""
    import threading
    monkeypatch.delenv("VIBRATO_API_PEPPER", raising=False)
    gate = threading.Event()
    config = Config(data_dir=tmp_path, dim=DIM, audio_colocated=False)
    # The progress callback runs inside recovery; holding it keeps the engine in its recovering state.
    engine = Engine.open_config(config, recover_async=True, background=False,
                                progress=lambda stage, done, total: gate.wait(60))
    try:
        token = apikeys.create_key(engine.catalog, apikeys.load_pepper(tmp_path), "t", "admin")[1]

        async def main():
            async with TestClient(TestServer(create_app(config, engine=engine), host="127.0.0.1")) as client:
                h = {**auth(token), "Content-Type": "application/json"}
                resp = await client.get("/v2/health/live")
                assert resp.status == 200
                resp = await client.get("/v2/health/ready")
                assert resp.status == 503
                assert await resp.json() == {"data": {"status": "degraded", "ready": False, "report": "recovering"}}
                for path, payload in (("/v2/query", {"vector": vec(1)}), ("/v2/vectors", {"vector": vec(1)}),
                                      ("/v2/identify", {"vectors": [vec(1)]}), ("/v2/admin/checkpoint", None),
                                      ("/v2/vectors/batch", {"vectors": []}),
                                      ("/v2/identify", {"vectors": [vec(1)], "k": 0})):
                    resp = await client.post(path, headers=h, data=None if payload is None else orjson.dumps(payload))
                    await expect_error(resp, 503, "not_ready")
                gate.set()
                for _ in range(200):
                    resp = await client.get("/v2/health/ready")
                    if resp.status == 200:
                        break
                    await asyncio.sleep(0.05)
                assert resp.status == 200 and (await resp.json())["data"]["report"].startswith("recovered")
                resp = await client.post("/v2/vectors", headers=h, data=orjson.dumps({"vector": vec(1)}))
                assert resp.status == 201

        asyncio.run(main())
    finally:
        gate.set()
        engine.close()


def test_audit_retention_prunes_old_rows(env):
    engine = env["engine"]
    old = int(time.time()) - 40 * 86400
    engine.catalog.write(audit_sql.insert_many, [(old, "ancient-1", None, "/v2/query", "query", 200, 1.0, None,
                                                  "{}", old)])

    async def body(client, tokens):
        for _ in range(100):  # the retention loop prunes once at start, then hourly
            rows = await asyncio.to_thread(engine.catalog.read, audit_sql.recent, 1000)
            if not any(r["request_id"] == "ancient-1" for r in rows):
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the 40-day-old audit row was not pruned")
    run(env, body, audit_retention_days=30)
