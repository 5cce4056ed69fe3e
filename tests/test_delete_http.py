"""Deletes over HTTP (CONTRACT.md D40): `POST /v2/vectors/delete`, `DELETE /v2/vectors/{id}` and
`POST /v2/admin/compact {"purge": true}`, with the real `vibrato serve-v2` as a subprocess on 127.0.0.1
and the real client and CLI: what a delete hides (query, identify, every tier), the 400/422 split, roles,
stats and metrics, idempotent retries, audit rows without the filter's names, purge, and read-your-deletes
across `--query-workers 2`. The engine's own delete tests are tests/test_deletes*.py."""
import asyncio
import os
import time
import uuid
from pathlib import Path

import numpy as np
import orjson
import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_util import ServerProcess, run_cli
from test_server_e2e import make_key
from test_server_inprocess import parse_metrics, validate_response
from test_server_workers import wait_worker
from vibrato.catalog import Catalog, audit as audit_sql
from vibrato.client import AsyncClient, Client, VibratoHTTPError
from vibrato.config import Config, Limits
from vibrato.errors import VibratoError
from vibrato.server.schemas import Validator

DIM = 8
MAX_IDS = 20
MAX_NAMES = 3
VALIDATOR = Validator(Config(dim=DIM, limits=Limits(max_delete_ids=MAX_IDS, max_delete_source_files=MAX_NAMES)))

_names = st.sampled_from(["ids", "filter", "purge", "source_file", "tags_any", "tags_all", "bpm_gte", "bpm_lte", "x"])
_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6))
json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=6)
                           | st.dictionaries(_names | st.text(max_size=4), inner, max_size=4), max_leaves=30)


def unit(n, seed):
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("deletes") / "data"
    with ServerProcess(data, extra=["--max-delete-ids", str(MAX_IDS),
                                    "--max-delete-source-files", str(MAX_NAMES)]) as srv:
        srv.wait_ready()
        srv.data = data
        srv.admin = srv.bootstrap_token
        srv.ingest_token = make_key(data, "ingest", "del-ingest")[1]
        srv.query_token = make_key(data, "query", "del-query")[1]
        yield srv


@pytest.fixture(scope="module")
def spec(server):
    return server.client().openapi()


def ingest_rows(c, n, seed, **meta):
    """n unit rows with metadata `meta` (a callable of i, or a value); returns (vectors, ids)."""
    X = unit(n, seed)
    metas = [{k: (v(i) if callable(v) else v) for k, v in meta.items()} for i in range(n)]
    ids = [vid for vid, created in c.ingest_batch(X, metadatas=metas)]
    return X, ids


def live_ids(c, x, k=10, **kw):
    return [r["id"] for r in c.query(x, k=k, ef=400, search_tier="all", include_metadata=False, **kw)["results"]]


def metric(c, name) -> float:
    return parse_metrics(c.metrics())[1].get(name, 0.0)


def audit_rows(data, want):
    """Audit rows once the writer has flushed the ones `want(rows)` waits for (every 250 ms)."""
    with Catalog(Path(data) / "catalog.sqlite3") as cat:
        for _ in range(200):
            rows = cat.read(audit_sql.recent, 1000)
            if want(rows):
                return rows
            time.sleep(0.05)
    raise AssertionError("audit rows not flushed")


# ---------------------------------------------------------------------------- what a delete hides
def test_delete_by_ids_hides_rows_in_every_tier_and_repeats_count_zero(server, spec):
    c = server.client(server.admin)
    total = c.stats()["total_vectors"]
    X, ids = ingest_rows(c, 60, 1, source_file="ids-track.wav", start_time_ms=lambda i: 25 * i, duration_ms=25)
    doomed = ids[10:14] + ids[40:42]
    status, _, raw = c.request("POST", "/v2/vectors/delete", {"ids": doomed + [10**12]})
    assert status == 200
    body = orjson.loads(raw)
    validate_response(spec, "POST", "/v2/vectors/delete", status, body)
    out = body["data"]
    assert out["deleted"] == len(doomed) and isinstance(out["lsn"], int) and out["lsn"] > 0
    assert c.stats()["total_vectors"] == total + 60 - len(doomed)

    def hidden():
        for i, vid in enumerate(ids):
            got = live_ids(c, X[i])
            assert len(got) == 10, got  # k results: enough live rows remain
            if vid in doomed:
                assert vid not in got
            else:
                assert got[0] == vid
        # identify: the deleted frames never start (or join) a matched run; the rest still match
        for r in c.identify(X[9:15], k=5, search_tier="all")["results"]:
            assert r["id"] not in doomed
        top = c.identify(X[20:28], k=1, search_tier="all")["results"][0]
        assert top["id"] == ids[20] and top["start_timestamp_ms"] == 500

    hidden()                                       # hot tier
    assert c.checkpoint()["state"] == "completed"
    hidden()                                       # L0 segment (written with tombstones)
    c.compact()
    hidden()
    again = c.delete(doomed)                       # idempotent: nothing left to delete
    assert again == {"deleted": 0, "lsn": None}
    assert c.delete([10**12, 2**64 - 1]) == {"deleted": 0, "lsn": None}
    assert c.delete([]) == {"deleted": 0, "lsn": None}


def test_delete_one_by_path(server, spec):
    c = server.client(server.ingest_token)
    X, ids = ingest_rows(c, 3, 2)
    status, _, raw = c.request("DELETE", f"/v2/vectors/{ids[1]}")
    assert status == 200
    validate_response(spec, "DELETE", "/v2/vectors/{id}", status, orjson.loads(raw))
    assert orjson.loads(raw)["data"]["deleted"] == 1
    assert c.delete_one(ids[1]) == {"deleted": 0, "lsn": None}
    q = server.client(server.admin)
    assert ids[1] not in live_ids(q, X[1]) and live_ids(q, X[0])[0] == ids[0]
    for bad in ("abc", "-1", "1.5", "+3", "%203", str(2**64), "9" * 400, "batch", "delete", "0x10"):
        status, headers, raw = c.request("DELETE", f"/v2/vectors/{bad}")
        assert status == 400, (bad, raw)
        err = orjson.loads(raw)
        assert err["code"] == "bad_request" and "vector id in the path" in err["message"]
        assert bad not in err["message"]  # the path segment is never echoed
        validate_response(spec, "DELETE", "/v2/vectors/{id}", status, err)
    status, headers, _ = c.request("GET", f"/v2/vectors/{ids[0]}")
    assert status == 405 and "DELETE" in headers["allow"]
    assert c.delete_one(2**64 - 1) == {"deleted": 0, "lsn": None}


def test_delete_by_source_file_one_name_and_a_list(server):
    c = server.client(server.admin)
    X, ids = ingest_rows(c, 40, 3, source_file=lambda i: f"sf-{i % 4}.wav", tags=["keep"])
    by_name = {f"sf-{j}.wav": [vid for i, vid in enumerate(ids) if i % 4 == j] for j in range(4)}
    assert c.delete(filter={"source_file": "sf-0.wav"})["deleted"] == 10
    assert c.delete(filter={"source_file": ["sf-1.wav", "sf-2.wav", "no-such.wav"]})["deleted"] == 20
    assert c.delete(filter={"source_file": "sf-0.wav"}) == {"deleted": 0, "lsn": None}
    gone = set(by_name["sf-0.wav"] + by_name["sf-1.wav"] + by_name["sf-2.wav"])
    c.checkpoint()
    for i, vid in enumerate(ids):
        res = c.query(X[i], k=10, ef=400, filter={"tags_any": ["keep"]}, search_tier="all")["results"]
        assert len(res) == 10
        assert {r["metadata"]["source_file"] for r in res} == {"sf-3.wav"}
        assert not gone & {r["id"] for r in res}
    # a name matches exactly: no prefix, no case folding
    assert c.delete(filter={"source_file": ["SF-3.WAV", "sf-3"]})["deleted"] == 0


def test_delete_by_tag_and_bpm_filter(server):
    c = server.client(server.admin)
    X, ids = ingest_rows(c, 30, 4, tags=lambda i: ["Drop", "x"] if i % 3 == 0 else ["x"], bpm=lambda i: float(i))
    out = c.delete(filter={"tags_all": [" DROP ", "x"], "bpm_gte": 10, "bpm_lte": 20})  # normalised like queries
    assert out["deleted"] == len([i for i in range(30) if i % 3 == 0 and 10 <= i <= 20])
    left = c.query(X[0], k=30, ef=400, filter={"tags_any": ["drop"]}, search_tier="all")["results"]
    assert sorted(r["id"] for r in left) == sorted(ids[i] for i in range(30) if i % 3 == 0 and not 10 <= i <= 20)
    assert c.delete(filter={"tags_any": ["drop"], "source_file": "no-such.wav"})["deleted"] == 0  # ANDed
    assert c.delete(filter={"tags_any": ["drop"]})["deleted"] == len(left)
    assert c.query(X[0], k=5, filter={"tags_any": ["drop"]}, search_tier="all")["results"] == []


# ---------------------------------------------------------------------------- errors
BAD = [
    # shape: 422 (schemas.py)
    ({"ids": [1], "extra": 1}, 422, "validation_error", ["unknown field 'extra'"]),
    ({"filter": {"source": "a.wav"}}, 422, "validation_error", ["filter.source"]),
    ({"filter": {"tags": ["a"]}}, 422, "validation_error", ["filter.tags"]),
    ({"ids": 1}, 422, "validation_error", ["ids"]),
    ({"ids": None}, 422, "validation_error", ["ids", "null"]),
    ({"filter": None}, 422, "validation_error", ["filter", "null"]),
    ({"filter": []}, 422, "validation_error", ["filter"]),
    ({"filter": {"source_file": 3}}, 422, "validation_error", ["filter.source_file"]),
    ({"filter": {"source_file": ["a", 3]}}, 422, "validation_error", ["filter.source_file[1]"]),
    ([1, 2], 422, "validation_error", ["object"]),
    # values: 400 (a bad id, as for DELETE /v2/vectors/{id}, and the engine's rules, check_delete)
    ({"ids": ["1"]}, 400, "bad_request", ["ids[0]"]),
    ({"ids": [3, -1]}, 400, "bad_request", ["ids[1]"]),
    ({"ids": [1.5]}, 400, "bad_request", ["ids[0]"]),
    ({"ids": [True]}, 400, "bad_request", ["ids[0]"]),
    ('{"ids": [%d]}' % 2**64, 400, "bad_request", ["ids[0]"]),
    ({"ids": [1], "filter": {"source_file": "a.wav"}}, 400, "bad_request", ["exactly one of ids or filter"]),
    ({}, 400, "bad_request", ["exactly one of ids or filter"]),
    ({"filter": {}}, 400, "bad_request", ["at least one condition"]),
    ({"filter": {"tags_any": [], "tags_all": []}}, 400, "bad_request", ["at least one condition"]),
    ({"filter": {"source_file": []}}, 400, "bad_request", ["non-empty"]),
    ({"ids": list(range(MAX_IDS + 1))}, 400, "bad_request", [f"limit of {MAX_IDS}", "--max-delete-ids"]),
    ({"filter": {"source_file": [f"n{i}" for i in range(MAX_NAMES + 1)]}}, 400, "bad_request",
     [f"limit of {MAX_NAMES}", "--max-delete-source-files"]),
    ({"filter": {"source_file": "a\x00b"}}, 400, "bad_request", ["NUL"]),
    ({"filter": {"source_file": "x" * 4097}}, 400, "bad_request", ["--max-source-file-bytes"]),
    ({"filter": {"bpm_gte": 130, "bpm_lte": 120}}, 400, "bad_request", ["bpm_gte"]),
    ({"filter": {"tags_any": ["t"] * 65}}, 400, "bad_request", ["--max-tags"]),
    ("{", 400, "invalid_json", []),
]


@pytest.mark.parametrize("body, status, code, fragments", BAD)
def test_delete_errors_shape_is_422_values_are_400(server, spec, body, status, code, fragments):
    c = server.client(server.admin)
    before = c.stats()["deleted_vectors"]
    if isinstance(body, str):
        st, _, raw = c.request("POST", "/v2/vectors/delete", raw=body.encode(),
                               headers={"Content-Type": "application/json"})
    else:
        st, _, raw = c.request("POST", "/v2/vectors/delete", body)
    err = orjson.loads(raw)
    assert st == status, err
    assert set(err) == {"code", "message"} and err["code"] == code, err
    for f in fragments:
        assert f in err["message"], (f, err)
    validate_response(spec, "POST", "/v2/vectors/delete", st, err)
    assert c.stats()["deleted_vectors"] == before


def test_delete_content_type_and_body_size(server):
    c = server.client(server.admin)
    st, _, raw = c.request("POST", "/v2/vectors/delete", raw=b'{"ids": [1]}', headers={"Content-Type": "text/plain"})
    assert st == 415 and orjson.loads(raw)["code"] == "unsupported_media_type"
    big = b'{"ids": [' + b"1," * 1_100_000 + b"1]}"
    st, _, raw = c.request("POST", "/v2/vectors/delete", raw=big, headers={"Content-Type": "application/json"})
    assert st == 413 and orjson.loads(raw)["code"] == "payload_too_large"


def test_roles_query_key_is_403_ingest_key_deletes_but_cannot_purge(server):
    X, ids = ingest_rows(server.client(server.admin), 2, 5)
    q = server.client(server.query_token)
    for call in (lambda: q.delete([ids[0]]), lambda: q.delete_one(ids[0]),
                 lambda: q.delete(filter={"source_file": "a.wav"})):
        with pytest.raises(VibratoHTTPError) as err:
            call()
        assert (err.value.status, err.value.code, err.value.message) == (403, "forbidden", "insufficient role")
    with pytest.raises(VibratoHTTPError) as err:
        server.client(None).delete([ids[0]])
    assert err.value.status == 401
    i = server.client(server.ingest_token)
    assert i.delete([ids[0]])["deleted"] == 1
    with pytest.raises(VibratoHTTPError) as err:
        i.compact(purge=True)
    assert err.value.status == 403
    assert live_ids(q, X[1])[0] == ids[1]


# ---------------------------------------------------------------------------- counters, idempotency, audit
def test_stats_and_metrics_move_by_exactly_the_deleted_count(server):
    c = server.client(server.admin)
    X, ids = ingest_rows(c, 12, 6, source_file="count.wav")
    s0 = c.stats()
    m0 = metric(c, "vibrato_deleted_vectors_total")
    g0 = metric(c, "vibrato_deleted_vectors")
    n = c.delete(ids[:5] + ids[:2] + [10**12])["deleted"]     # repeats and unknown ids count once / 0
    n += c.delete_one(ids[5])["deleted"] + c.delete_one(ids[5])["deleted"]
    n += c.delete(filter={"source_file": "count.wav"})["deleted"]
    assert n == 12
    s1 = c.stats()
    assert s1["deleted_vectors"] - s0["deleted_vectors"] == 12
    assert s1["delete_vectors_total"] - s0["delete_vectors_total"] == 12
    assert s0["total_vectors"] - s1["total_vectors"] == 12
    assert metric(c, "vibrato_deleted_vectors_total") - m0 == 12
    assert metric(c, "vibrato_deleted_vectors") - g0 == 12
    text = c.metrics()
    assert "# TYPE vibrato_deleted_vectors_total counter" in text and "# TYPE vibrato_deleted_vectors gauge" in text
    assert "vibrato_delete_vectors_total" not in text  # the engine counter's one series is the contract's name
    assert 'vibrato_http_requests_total{method="DELETE",route="/v2/vectors/{id}",status="200"}' in text
    assert 'route="/v2/vectors/delete"' in text


def test_idempotent_retry_of_a_deleted_row_answers_created_false_and_stays_deleted(server):
    c = server.client(server.ingest_token)
    x = unit(1, 7)[0]
    key = f"retry-{uuid.uuid4().hex}"
    vid, created = c.ingest(x, metadata={"tags": ["retry"]}, idempotency_key=key)
    assert created
    assert c.delete_one(vid)["deleted"] == 1
    assert c.ingest(x, metadata={"tags": ["retry"]}, idempotency_key=key) == (vid, False)
    assert c.ingest_batch([{"vector": x, "metadata": {"tags": ["retry"]}, "idempotency_key": key}]) == [(vid, False)]
    with pytest.raises(VibratoHTTPError) as err:
        c.ingest(x * 0.5, idempotency_key=key)  # a different payload is still a conflict
    assert err.value.status == 409
    q = server.client(server.admin)
    assert q.query(x, k=5, filter={"tags_any": ["retry"]}, search_tier="all")["results"] == []
    assert vid not in live_ids(q, x)
    assert c.delete_one(vid) == {"deleted": 0, "lsn": None}


def test_audit_rows_record_counts_never_the_filter(server):
    c = server.client(server.ingest_token)
    name = f"secret-takedown-{uuid.uuid4().hex}.wav"
    other = f"other-secret-{uuid.uuid4().hex}.wav"
    X, ids = ingest_rows(c, 4, 8, source_file=name)
    tag = uuid.uuid4().hex[:12]
    calls = [("POST", "/v2/vectors/delete", {"filter": {"source_file": [name, other], "tags_any": []}}, 200),
             # failed deletes: their error details name no value either
             ("POST", "/v2/vectors/delete", {"filter": {"source_file": [name, other, "a", "b"]}}, 400),
             ("POST", "/v2/vectors/delete", {"filter": {"source_file": name + "\x00"}}, 400),
             ("POST", "/v2/vectors/delete", {"filter": {"source_file": [name, 1]}}, 422),
             ("DELETE", f"/v2/vectors/{ids[0]}", None, 200),
             ("DELETE", f"/v2/vectors/{name}", None, 400)]
    answers = {}
    for n, (method, path, body, status) in enumerate(calls):
        st, _, raw = c.request(method, path, body, headers={"x-request-id": f"audit-{tag}-{n}"})
        assert st == status, raw
        answers[f"audit-{tag}-{n}"] = orjson.loads(raw)
    last = f"audit-{tag}-{len(calls) - 1}"
    rows = audit_rows(server.data, lambda rows: any(r["request_id"] == last for r in rows))
    mine = {r["request_id"]: r for r in rows if r["request_id"].startswith(f"audit-{tag}-")}
    assert len(mine) == len(calls) and all(r["action"] == "delete" for r in mine.values())
    first = mine[f"audit-{tag}-0"]
    lsn = answers[f"audit-{tag}-0"]["data"]["lsn"]
    assert first["endpoint"] == "/v2/vectors/delete" and first["status_code"] == 200 and first["api_key_id"]
    assert orjson.loads(first["details_json"]) == {"deleted": 4, "lsn": lsn, "by": "filter"}
    assert orjson.loads(mine[f"audit-{tag}-4"]["details_json"]) == {"deleted": 0, "lsn": None, "by": "ids"}
    assert mine[f"audit-{tag}-4"]["endpoint"] == "/v2/vectors/{id}"
    for n in (1, 2, 3, 5):
        assert set(orjson.loads(mine[f"audit-{tag}-{n}"]["details_json"])) == {"error"}
    for r in rows:
        flat = orjson.dumps(r).decode()
        assert name not in flat and other not in flat, r
    log = "\n".join(server.stderr_lines)
    assert other not in log  # access lines and everything else the server logged
    # (the path of the last call is the client's own URL, logged as sent; no filter name is ever logged)
    assert [line for line in server.stderr_lines if name in line] == [
        line for line in server.stderr_lines if f"/v2/vectors/{name}" in line]


# ---------------------------------------------------------------------------- purge
def test_purge_over_http_erases_every_copy_of_the_deleted_rows(tmp_path):
    data = tmp_path / "d"
    name = f"purge-me-{uuid.uuid4().hex}.wav".encode()
    with ServerProcess(data) as srv:
        srv.wait_ready()
        c = Client(srv.url, srv.bootstrap_token, timeout=600)
        X, ids = ingest_rows(c, 50, 9, source_file=lambda i: name.decode() if i % 5 == 0 else "keep.wav")
        c.checkpoint()                                  # half in a segment,
        Y, more = ingest_rows(c, 20, 10, source_file=lambda i: name.decode() if i % 5 == 0 else "keep.wav")
        c.compact()                                     # half still in the WAL tail
        assert c.compact()["job_id"].startswith("cmp_")  # no body: a compaction step, as before
        st, _, raw = c.request("POST", "/v2/admin/compact", {"purge": False})
        assert st == 200 and orjson.loads(raw)["data"]["job_id"].startswith("cmp_")
        out = c.delete(filter={"source_file": name.decode()})
        assert out["deleted"] == 14
        job = c.compact(purge=True)
        assert job["job_id"].startswith("prg_") and job["state"] == "completed"
        d = job["details"]
        assert set(d) >= {"purged_ids", "checkpoints", "segments_rewritten", "obsolete_files_deleted",
                          "quarantine_files_deleted", "vacuumed", "seconds"}
        assert d["purged_ids"] == 14 and d["checkpoints"] >= 1 and len(d["segments_rewritten"]) >= 1
        validate_response(c.openapi(), "POST", "/v2/admin/compact", 200, {"data": job})
        again = c.compact(purge=True)
        assert again["state"] == "completed" and again["details"]["purged_ids"] == 0
        for i, vid in enumerate(ids):
            assert (vid in live_ids(c, X[i])) == (i % 5 != 0)
        stats = c.stats()
        assert stats["total_vectors"] == 56 and stats["deleted_vectors"] == 14
        audit_rows(data, lambda rows: any(r["action"] == "compact" and orjson.loads(r["details_json"]) ==
                                          {"purge": True, "purged_ids": 0} for r in rows))
    assert srv.proc.returncode == 0
    log = "\n".join(srv.stderr_lines)
    found = [str(p) for p in data.rglob("*") if p.is_file() and name in p.read_bytes()]
    assert not found, found
    assert name.decode() not in log


def test_compact_body_errors(server, spec):
    c = server.client(server.admin)
    cases = [(b'{"purge": 1}', "application/json", 422, "purge"),
             (b'{"purge": true, "x": 1}', "application/json", 422, "'x'"),
             (b"null", "application/json", 422, "object"),
             (b"{", "application/json", 400, ""),
             (b'{"purge": true}', "text/plain", 415, "Content-Type")]
    for raw, ctype, status, fragment in cases:
        st, _, body = c.request("POST", "/v2/admin/compact", raw=raw, headers={"Content-Type": ctype})
        err = orjson.loads(body)
        assert st == status and fragment in err["message"], (raw, st, err)
        validate_response(spec, "POST", "/v2/admin/compact", st, err)
    for raw, headers in ((b"", {}), (b"", {"Content-Type": "application/json"}), (b"{}", {"Content-Type":
                                                                                          "application/json"})):
        st, _, body = c.request("POST", "/v2/admin/compact", raw=raw, headers=headers)
        assert st == 200 and orjson.loads(body)["data"]["job_id"].startswith("cmp_"), body


def test_async_client(server):
    async def main():
        async with AsyncClient(server.url, server.admin) as c:
            X = unit(3, 11)
            ids = [vid for vid, _ in await c.ingest_batch(X)]
            assert (await c.delete(ids[:1]))["deleted"] == 1
            assert (await c.delete_one(ids[1]))["deleted"] == 1
            assert (await c.delete(filter={"source_file": "nothing-has-this.wav"}))["deleted"] == 0
            assert (await c.compact())["job_id"].startswith("cmp_")
            job = await c.compact(purge=True)
            assert job["job_id"].startswith("prg_") and job["state"] == "completed"
            with pytest.raises(VibratoHTTPError) as err:
                await c.delete()
            assert err.value.status == 400
    asyncio.run(main())


def test_openapi_documents_the_delete_routes_and_limits(server, spec):
    post = spec["paths"]["/v2/vectors/delete"]["post"]
    assert post["security"] == [{"bearer": []}] and "`ingest`" in post["description"]
    assert f"at most {MAX_IDS} ids" in post["description"] and "--max-delete-ids" in post["description"]
    assert f"{MAX_NAMES} names" in post["description"]
    assert {"200", "400", "401", "403", "413", "415", "422", "500", "503"} <= set(post["responses"])
    one = spec["paths"]["/v2/vectors/{id}"]["delete"]
    assert one["parameters"][0]["name"] == "id" and one["parameters"][0]["in"] == "path"
    assert post["operationId"] != one["operationId"]
    compact = spec["paths"]["/v2/admin/compact"]["post"]
    assert compact["requestBody"]["required"] is False and "422" in compact["responses"]
    schemas = spec["components"]["schemas"]
    assert set(schemas["DeleteRequest"]["properties"]) == {"ids", "filter"}
    assert schemas["DeleteRequest"]["oneOf"] == [{"required": ["ids"]}, {"required": ["filter"]}]
    assert set(schemas["DeleteRequest"]["properties"]["filter"]["properties"]) == {
        "source_file", "tags_any", "tags_all", "bpm_gte", "bpm_lte"}
    assert schemas["CompactRequest"]["properties"]["purge"]["default"] is False


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["delete", "compact"]), json_values)
def test_arbitrary_json_bodies_validate_or_fail_with_400_or_422(method, doc):
    """The delete and compact bodies under malformed input: a clean 400/422 naming a field, or a value
    Engine.delete / Engine.compact takes as it is."""
    try:
        out = getattr(VALIDATOR, method)(doc, True)
    except VibratoError as exc:
        assert exc.status in (400, 422) and exc.message, exc
        return
    if method == "compact":
        assert out == {"purge": doc.get("purge", False)}
        return
    assert (out["ids"] is None) != (out["filter"] is None)
    assert out["filter"] is None or set(out["filter"]) == set(doc["filter"])
    if out["ids"] is not None:
        assert all(type(i) is int and 0 <= i < 2**64 for i in out["ids"]) and len(out["ids"]) <= MAX_IDS


# ---------------------------------------------------------------------------- CLI
def test_cli_delete_and_purge_against_the_running_server(server, tmp_path):
    c = server.client(server.admin)
    name = f"cli-{uuid.uuid4().hex}.wav"
    X, ids = ingest_rows(c, 10, 12, source_file=lambda i: name if i >= 6 else "cli-keep.wav")
    url, tok = server.url, server.ingest_token

    out = run_cli("delete", "--url", url, "--token", tok, "--ids", f"{ids[0]}, {ids[1]},{ids[0]}")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "deleted=2" and lines[1].startswith("lsn=") and int(lines[1][4:]) > 0 and len(lines) == 2
    out = run_cli("delete", "--url", url, "--token", tok, "--ids", str(ids[0]))
    assert out.returncode == 0 and out.stdout == "deleted=0\nlsn=-\n", out

    f = tmp_path / "ids.txt"
    f.write_text(f"{ids[2]}\n{ids[3]} {ids[4]}\n")
    out = run_cli("delete", "--url", url, "--token", tok, "--ids-file", f)
    assert out.returncode == 0 and out.stdout.startswith("deleted=3\n"), out

    out = run_cli("delete", "--url", url, "--source-file", name, "--source-file", "nothing.wav",
                  env={"VIBRATO_TOKEN": tok})
    assert out.returncode == 0 and out.stdout.startswith("deleted=4\n"), out
    assert live_ids(c, X[5])[0] == ids[5]
    for i in (0, 1, 2, 3, 4, 6, 7, 8, 9):
        assert ids[i] not in live_ids(c, X[i])

    out = run_cli("purge", "--url", url, "--token", server.admin)
    assert out.returncode == 0, out.stderr
    kv = dict(line.split("=", 1) for line in out.stdout.splitlines())
    assert kv["job_id"].startswith("prg_") and kv["state"] == "completed"
    assert int(kv["purged_ids"]) >= 9 and kv["vacuumed"] in ("true", "false") and "seconds" in kv

    # errors: HTTP errors exit 1 with one Error: line; usage errors exit 2
    out = run_cli("delete", "--url", url, "--token", server.query_token, "--ids", "1")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip() == "Error: HTTP 403 forbidden: insufficient role"
    out = run_cli("purge", "--url", url, "--token", tok)
    assert out.returncode == 1 and "HTTP 403" in out.stderr
    out = run_cli("delete", "--url", url, "--token", tok, "--ids", ",".join(map(str, range(MAX_IDS + 1))))
    assert out.returncode == 1 and "--max-delete-ids" in out.stderr
    out = run_cli("delete", "--url", url, "--token", tok, "--ids", "1,x")
    assert out.returncode == 1 and "'x' is not a vector id" in out.stderr
    out = run_cli("delete", "--url", url, "--token", tok, "--ids-file", tmp_path / "missing.txt")
    assert out.returncode == 1 and out.stderr.startswith("Error: ")
    out = run_cli("delete", "--url", "http://127.0.0.1:1", "--token", tok, "--ids", "1")
    assert out.returncode == 1 and "cannot reach" in out.stderr
    for args in ([], ["--ids", "1", "--source-file", "a"], ["--ids", "1", "--ids-file", f]):
        out = run_cli("delete", "--url", url, "--token", tok, *args)
        assert out.returncode == 2 and "exactly one of" in out.stderr, out
    out = run_cli("delete", "--url", url, "--ids", "1", env={"VIBRATO_TOKEN": ""})
    assert out.returncode == 2


def test_serve_v2_limit_flags_reach_the_limits():
    from vibrato.cli import cli
    params = cli.commands["serve-v2"].make_context("serve-v2", []).params
    assert params["max_delete_ids"] == 10_000 and params["max_delete_source_files"] == 1000
    params = cli.commands["serve-v2"].make_context(
        "serve-v2", ["--max-delete-ids", "7", "--max-delete-source-files", "2"]).params
    assert params["max_delete_ids"] == 7 and params["max_delete_source_files"] == 2


# ---------------------------------------------------------------------------- several processes
def test_read_your_deletes_on_every_process(tmp_path):
    """--query-workers 2: a delete acknowledged on one connection is invisible to the very next query on
    a fresh connection, whichever process takes either; counted once."""
    data = tmp_path / "d"
    srv = ServerProcess(data, extra=["--query-workers", "2"]).wait_ready()
    try:
        wait_worker(srv, data)
        token = srv.bootstrap_token
        n = 300
        X = unit(n, 13)
        admin = Client(srv.url, token)
        ids = [vid for vid, _ in admin.ingest_batch(X, metadatas=[{"bpm": float(i), "tags": ["w"]} for i in range(n)])]
        misses = []
        for i in range(0, n, 2):
            writer, reader = Client(srv.url, token), Client(srv.url, token)  # fresh connections each time
            try:
                out = writer.delete([ids[i]]) if i % 4 else writer.delete_one(ids[i])
                assert out["deleted"] == 1
                # exact: the filter allows this row alone
                res = reader.query(X[i], k=1, filter={"bpm_gte": float(i), "bpm_lte": float(i)},
                                   search_tier="all", include_metadata=False)["results"]
                if res:
                    misses.append(("exact", i, res))
                res = reader.query(X[i], k=10, ef=200, filter={"tags_any": ["w"]}, search_tier="all")["results"]
                if ids[i] in [r["id"] for r in res] or len(res) != 10:
                    misses.append(("graph", i, res))
                if i == 100:
                    writer.checkpoint()
                if i == 200:
                    writer.compact()
            finally:
                writer.close()
                reader.close()
        assert not misses, misses[:5]
        worker = wait_worker(srv, data)
        assert worker["metrics"]["query_requests"] > 0, "the worker served no query"
        deleted = n // 2
        stats = admin.stats()
        assert stats["deleted_vectors"] == deleted and stats["delete_vectors_total"] == deleted
        assert stats["total_vectors"] == n - deleted
        text = admin.metrics()
        assert f"vibrato_deleted_vectors_total {deleted}.0" in text
        assert f"vibrato_deleted_vectors {deleted}.0" in text
        job = Client(srv.url, token, timeout=600).compact(purge=True)  # forwarded to the writer
        assert job["state"] == "completed" and job["details"]["purged_ids"] == deleted
        for i in range(1, n, 50):
            assert live_ids(admin, X[i])[0] == ids[i]
        admin.close()
    finally:
        if srv.proc.poll() is None:
            assert srv.terminate(timeout=60) == 0
    with Catalog(data / "catalog.sqlite3") as cat:
        rows = cat.read(audit_sql.recent, 10_000)
    dels = [r for r in rows if r["action"] == "delete"]
    assert len(dels) == n // 2  # each forwarded delete audited once, by the writer
    assert all(r["client_ip"] == "127.0.0.1" for r in dels)
    assert os.path.exists(data / "catalog.sqlite3")
