"""Malformed-input fuzzing of request validation (CONTRACT.md §6, Malformed input): arbitrary JSON and
mutated valid bodies either validate or fail with a 400/422 `VibratoError` naming a field — never
another exception."""
import math

import numpy as np
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vibrato.config import Config
from vibrato.errors import VibratoError
from vibrato.server.schemas import Validator
from test_server_inprocess import env, run  # noqa: F401 - env is the module-scoped app fixture

DIM = 4
V = Validator(Config(dim=DIM))
METHODS = ("ingest", "ingest_batch", "query", "identify")

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=25)
field_names = st.sampled_from(["vector", "vectors", "metadata", "idempotency_key", "k", "ef", "include_metadata",
                               "filter", "search_tier", "tags", "tags_any", "tags_all", "bpm", "bpm_gte",
                               "bpm_lte", "source_file", "start_time_ms", "duration_ms", "x"])


def valid_doc(method):
    vec = [0.5] * DIM
    return {
        "ingest": {"vector": vec, "metadata": {"tags": ["a"], "bpm": 120.0}, "idempotency_key": "k"},
        "ingest_batch": {"vectors": [{"vector": vec}, {"vector": vec, "metadata": {"source_file": "f"}}]},
        "query": {"vector": vec, "k": 3, "filter": {"tags_any": ["a"], "bpm_gte": 1.0}},
        "identify": {"vectors": [vec, vec], "k": 2, "search_tier": "all"},
    }[method]


def mutate(doc, path, value):
    """Replace (or add) the field at `path` (a list of keys / indexes) inside a deep copy of doc."""
    doc = orjson.loads(orjson.dumps(doc))
    cur = doc
    for key in path[:-1]:
        if isinstance(cur, dict) and key in cur:
            cur = cur[key]
        elif isinstance(cur, list) and isinstance(key, int) and 0 <= key < len(cur):
            cur = cur[key]
        else:
            return doc
    last = path[-1]
    if isinstance(cur, dict) and isinstance(last, str):
        cur[last] = value
    elif isinstance(cur, list) and isinstance(last, int) and 0 <= last < len(cur):
        cur[last] = value
    return doc


def check(method, doc, maybe_bools=True):
    try:
        out = getattr(V, method)(doc, maybe_bools)
    except VibratoError as exc:
        assert exc.status in (400, 422), exc
        assert exc.message
        return None
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(METHODS), json_values)
def test_arbitrary_json_never_crashes_validation(method, doc):
    check(method, doc)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(METHODS),
       st.lists(field_names | st.integers(min_value=0, max_value=2), min_size=1, max_size=3),
       json_values | st.sampled_from([1e39, -1e39, 3.5e38, 2**64, -1, 0.5, True, None, "", [], {}]))
def test_mutated_valid_bodies_validate_or_fail_cleanly(method, path, value):
    out = check(method, mutate(valid_doc(method), path, value))
    if out is None:
        return
    # Whatever passed validation is safe for the engine: vectors are finite float32 of the right shape.
    vectors = []
    if method in ("ingest", "ingest_batch"):
        vectors = list(out.vectors)
    elif method == "query":
        vectors = [out["vector"]]
    elif out["k"]:  # with k == 0 the frames are not decoded (the engine answers [] first)
        vectors = list(out["vectors"])
    for v in vectors:
        assert v.dtype == np.float32 and v.shape == (DIM,) and np.isfinite(v).all()
    if method == "query" and out["filter"] is not None:
        for bound in ("bpm_gte", "bpm_lte"):
            b = getattr(out["filter"], bound)
            assert b is None or (math.isfinite(b) and abs(b) <= float(np.finfo(np.float32).max) * 1.0000001)


def test_booleans_inside_vectors_are_rejected_even_on_the_fast_path():
    for method, doc in (("query", {"vector": [1.0, True, 0.0, 0.0]}),
                        ("ingest_batch", {"vectors": [{"vector": [0.0, 0.0, 0.0, False]}]})):
        assert check(method, doc, maybe_bools=True) is None


def test_integers_beyond_int64_in_vectors():
    out = check("query", {"vector": [2**64, 0, 0, -(2**63) - 1]})
    assert out["vector"].tolist() == [float(np.float32(2**64)), 0.0, 0.0, float(np.float32(-(2**63) - 1))]
    assert check("query", {"vector": [10**39, 0, 0, 0]}) is None  # beyond float32: 400
    assert check("query", {"vector": [10**400, 0, 0, 0]}) is None  # beyond float64: 400


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(min_value=-(2**66), max_value=2**66) | st.floats(allow_nan=False, width=64),
                         min_size=DIM, max_size=DIM), min_size=1, max_size=4))
def test_numeric_vectors_decode_exactly_or_fail_cleanly(rows):
    out = check("ingest_batch", {"vectors": [{"vector": r} for r in rows]})
    if out is None:
        return
    got = out.vectors
    with np.errstate(over="ignore"):
        expect = np.array([[float(x) for x in r] for r in rows], dtype=np.float64).astype(np.float32)
    assert np.array_equal(got, expect)


def test_http_fuzz_every_response_is_documented_json(env):  # noqa: F811 - the imported fixture
    """Random bodies, content types and auth headers against every route of the in-process app."""
    import random

    rng = random.Random(1234)
    routes = [("POST", "/v2/vectors"), ("POST", "/v2/vectors/batch"), ("POST", "/v2/query"),
              ("POST", "/v2/identify"), ("GET", "/v2/health/ready"), ("POST", "/v2/admin/checkpoint"),
              ("GET", "/v2/admin/stats"), ("GET", "/v2/metrics"), ("DELETE", "/v2/query"), ("GET", "/v2/x")]
    bodies = [b"", b"{", b"null", b"[]", b"{}", b'{"vector": []}', b'{"vector": "x"}', b"\xff\xfe",
              b'{"vectors": [[1e39]]}', b'{"vector": [' + b"1," * 3 + b"1]}", b'{"k": -1}', b'"\\u0000"']
    for method in METHODS:
        bodies.append(orjson.dumps(valid_doc(method)))
        for _ in range(10):
            path = [rng.choice(["vector", "vectors", "metadata", "k", "filter", 0, 1, "tags", "bpm"])
                    for _ in range(rng.randint(1, 3))]
            value = rng.choice([None, True, -1, 2**65, 1e39, "", [], {}, [None], {"a": 1}, "z" * 300])
            bodies.append(orjson.dumps(mutate(valid_doc(method), path, value)))

    async def body(client, tokens):
        spec = await (await client.get("/v2/openapi.json")).json()
        for _ in range(300):
            method, path = rng.choice(routes)
            auth = rng.choice([None, "Bearer " + tokens["admin"], "Bearer " + tokens["query"], "Bearer x.y",
                               "Basic zzz", "Bearer " + tokens["admin"][:-1] + "0"])
            headers = {"Content-Type": rng.choice(["application/json", "text/plain", "application/x+json"])}
            if auth:
                headers["Authorization"] = auth
            resp = await client.request(method, path, data=rng.choice(bodies), headers=headers)
            raw = await resp.read()
            assert resp.headers.get("x-request-id"), (method, path)
            assert resp.status < 500, (method, path, resp.status, raw)
            if path == "/v2/metrics" and resp.status == 200:
                continue
            doc = orjson.loads(raw)
            if resp.status >= 400 and resp.status != 503:
                assert set(doc) == {"code", "message"}, doc
            ops = spec["paths"].get(path, {})
            if method.lower() in ops:
                assert str(resp.status) in ops[method.lower()]["responses"], (method, path, resp.status, raw)

    run(env, body)

