"""The input rules have one owner (vibrato.engine.validation): HTTP and embedded callers get the same
400 messages, checked values pass the engine and the native index unchecked, and the idempotency
digest separates every field (CONTRACT.md §2, D3, D27)."""
import base64
import hashlib

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vibrato import index as index_mod
from vibrato.catalog import wal
from vibrato.config import Config, Limits
from vibrato.engine import Engine
from vibrato.engine import validation as rules
from vibrato.errors import BadRequestError, ConflictError, VibratoError
from vibrato.index import FiniteArray, HnswIndex
from vibrato.server.schemas import Validator
from test_server_inprocess import auth, env, expect_error, run, vec  # noqa: F401 - env is the module-scoped app fixture

DIM = 4
LIMITS = Limits(max_k=50, max_ef=200, max_batch=3, max_identify_frames=5, max_tags=2, max_tag_bytes=6,
                max_source_file_bytes=8, max_idempotency_key_bytes=5)
V1 = [0.5] * DIM


@pytest.fixture
def eng(tmp_path):
    e = Engine.open(tmp_path / "d", dim=DIM, background=False, limits=LIMITS)
    yield e
    e.close()


def _meta_case(meta):
    return "ingest", {"vector": V1, "metadata": meta}, lambda e: e.ingest(V1, meta)


# (HTTP route method, body, the engine call with the same values)
SAME_RULES = [
    ("query", {"vector": V1, "k": 51}, lambda e: e.query(V1, k=51)),
    ("query", {"vector": V1, "ef": 201}, lambda e: e.query(V1, ef=201)),
    ("query", {"vector": [1e39, 0, 0, 0]}, lambda e: e.query([1e39, 0, 0, 0])),
    ("query", {"vector": [1.0, 2.0]}, lambda e: e.query([1.0, 2.0])),
    ("query", {"vector": V1, "filter": {"bpm_gte": 130, "bpm_lte": 120.5}},
     lambda e: e.query(V1, filter={"bpm_gte": 130, "bpm_lte": 120.5})),
    ("query", {"vector": V1, "filter": {"bpm_lte": -1e39}}, lambda e: e.query(V1, filter={"bpm_lte": -1e39})),
    ("query", {"vector": V1, "filter": {"tags_all": ["a", "b", "c"]}},
     lambda e: e.query(V1, filter={"tags_all": ["a", "b", "c"]})),
    ("query", {"vector": V1, "filter": {"tags_any": ["x\x00"]}}, lambda e: e.query(V1, filter={"tags_any": ["x\x00"]})),
    _meta_case({"tags": ["a", "b", "c"]}),
    _meta_case({"tags": ["ok", "seven77"]}),
    _meta_case({"tags": ["a\x00b"]}),
    _meta_case({"source_file": "a\x00"}),
    _meta_case({"source_file": "é" * 5}),
    _meta_case({"bpm": 3.5e38}),
    ("ingest", {"vector": V1, "idempotency_key": "k\x00"}, lambda e: e.ingest(V1, idempotency_key="k\x00")),
    ("ingest", {"vector": V1, "idempotency_key": " kkk  "}, lambda e: e.ingest(V1, idempotency_key=" kkk  ")),
    ("ingest", {"vector": [0.5] * (DIM + 1)}, lambda e: e.ingest([0.5] * (DIM + 1))),
    ("ingest_batch", {"vectors": [{"vector": V1}] * 4}, lambda e: e.ingest_batch([{"vector": V1}] * 4)),
    ("ingest_batch", {"vectors": [{"vector": V1}, {"vector": [1.0]}]},
     lambda e: e.ingest_batch([{"vector": V1}, {"vector": [1.0]}])),
    ("ingest_batch", {"vectors": [{"vector": V1}, {"vector": [0, 0, -1e39, 0]}]},
     lambda e: e.ingest_batch([{"vector": V1}, {"vector": [0, 0, -1e39, 0]}])),
    ("ingest_batch", {"vectors": [{"vector": V1, "metadata": {"tags": ["\x00"]}}]},
     lambda e: e.ingest_batch([{"vector": V1, "metadata": {"tags": ["\x00"]}}])),
    ("identify", {"vectors": []}, lambda e: e.identify([])),
    ("identify", {"vectors": [V1] * 6}, lambda e: e.identify([V1] * 6)),
    ("identify", {"vectors": [V1, [1.0]]}, lambda e: e.identify([V1, [1.0]])),
    ("identify", {"vectors": [V1, [0, 1e39, 0, 0]]}, lambda e: e.identify([V1, [0, 1e39, 0, 0]])),
    ("identify", {"vectors": [V1], "k": 51}, lambda e: e.identify([V1], k=51)),
]


@pytest.mark.parametrize("method, body, call", SAME_RULES)
def test_http_and_engine_give_the_same_400(eng, method, body, call):
    with pytest.raises(BadRequestError) as http:
        getattr(Validator(Config(dim=DIM, limits=LIMITS)), method)(orjson.loads(orjson.dumps(body)))
    with pytest.raises(BadRequestError) as embedded:
        call(eng)
    assert http.value.status == 400 and http.value.message == embedded.value.message
    assert eng.stats()["total_vectors"] == 0, "nothing invalid was written"


def test_checked_values_pass_the_engine_as_they_are():
    v = Validator(Config(dim=DIM, limits=LIMITS))
    q = v.query({"vector": [1, 2.5, -3, 0], "filter": {"tags_any": [" A "], "bpm_gte": 90}})
    assert type(q["vector"]) is FiniteArray and not q["vector"].flags.writeable
    assert rules.check_vector(q["vector"], DIM) is q["vector"]
    assert q["filter"] == rules.QueryFilter(["a"], None, 90.0, None)
    assert rules.check_filter(q["filter"], LIMITS) is q["filter"]
    prep = v.ingest({"vector": V1, "metadata": {"tags": ["B", "a"], "bpm": 0.1}, "idempotency_key": " k "})
    assert rules.prepare_rows(prep, DIM, LIMITS) is prep
    assert prep.metas == [("", 0, 0, float(np.float32(0.1)), ["a", "b"])] and prep.rows[0][wal.ROW_KEY] == "k"
    # the embedded path normalises the same payload to the same row, digest included
    assert rules.prepare_rows([{"vector": np.array(V1), "metadata": {"tags": ["a", "B"], "bpm": 0.1},
                                "idempotency_key": "k"}], DIM, LIMITS, batch=False).rows == prep.rows
    frames = v.identify({"vectors": [V1, V1]})["vectors"]
    assert rules.check_identify(frames, 5, 100, "all", LIMITS, DIM) is frames


def test_identify_k0_is_decided_by_the_engine_before_any_dimension_check(eng):
    v = Validator(Config(dim=DIM, limits=LIMITS))
    req = v.identify({"vectors": [[1.0], ["not a number"]], "k": 0})
    assert req["vectors"] == [[1.0], ["not a number"]]  # not decoded: k == 0 answers first
    assert eng.identify(req["vectors"], k=0) == []
    with pytest.raises(BadRequestError, match="identify requires at least one vector"):
        v.identify({"vectors": [], "k": 0})


def test_finite_array_marker():
    a = rules.check_vector([1.0, 2.0, 3.0, 4.0], DIM)
    assert type(a) is FiniteArray and not a.flags.writeable
    with pytest.raises(ValueError):
        a[0] = np.inf
    assert type(a[1:]) is FiniteArray and type(a.reshape(2, 2)) is FiniteArray  # views keep it
    for derived in (a * 2, a + 0, -a, np.abs(a), np.stack([a, a]), np.asarray(a)):
        assert type(derived) is np.ndarray  # arithmetic may overflow: the marker is not inherited
    user = np.ones(DIM, np.float32)
    checked = rules.check_vector(user, DIM)
    user[0] = np.nan  # a caller's later change does not reach the checked copy
    assert np.isfinite(checked).all()


def test_native_index_trusts_checked_vectors_only(monkeypatch):
    calls = []
    real = index_mod._hnsw.first_nonfinite

    def counting(x):
        calls.append(x.shape)
        return real(x)

    monkeypatch.setattr(index_mod._hnsw, "first_nonfinite", counting)
    idx = HnswIndex(DIM)
    idx.add(np.random.default_rng(0).standard_normal((50, DIM)).astype(np.float32))
    calls.clear()
    q = rules.check_vector(V1, DIM)
    assert len(calls) == 1  # checked once, at the boundary
    for _ in range(3):
        idx.search(q, k=3)
    assert len(calls) == 1, "a FiniteArray is not re-checked per search"
    idx.search(np.array(V1, np.float32), k=3)
    assert len(calls) == 2, "an unmarked array still is"
    with pytest.raises(ValueError, match="non-finite"):
        idx.search(np.array([np.nan] * DIM, np.float32), k=3)
    with pytest.raises(ValueError, match="dimension"):
        idx.search(rules.check_vector([1.0, 2.0], 2), k=3)


def test_native_checks_run_once_per_query_not_per_segment(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    with Engine.open(tmp_path / "d", dim=DIM, background=False, checkpoint_max_rows=1000) as e:
        for _ in range(3):
            e.ingest_batch([{"vector": x} for x in rng.standard_normal((40, DIM)).astype(np.float32)])
            e.checkpoint()
        assert e.stats()["active_segments"] == 3
        calls = []
        real = index_mod._hnsw.first_nonfinite
        monkeypatch.setattr(index_mod._hnsw, "first_nonfinite", lambda x: calls.append(1) or real(x))
        assert len(e.query(V1, k=5, ef=16, search_tier="all")) == 5
        assert len(calls) == 1


# ---------------------------------------------------------------------------- idempotency digest (D27)
def _digest(src="", start=0, dur=0, bpm=0.0, tags=(), vector=V1):
    return rules.prepare_rows([{"vector": vector, "metadata": {"source_file": src, "start_time_ms": start,
                                                                "duration_ms": dur, "bpm": bpm, "tags": list(tags)}}],
                              DIM, Limits(), batch=False).rows[0][wal.ROW_SHA]


def _legacy(row):  # how 0.3.0 computed the stored digest
    h = hashlib.sha256(row[wal.ROW_VECTOR])
    h.update(f"{row[1]}\x00{row[2]}\x00{row[3]}\x00{row[4]!r}\x00{row[5]}".encode("utf-8", "surrogatepass"))
    return h.digest()


def test_digest_separates_fields():
    d = _digest("ab", tags=["c"])
    assert len(d) == 33 and d[:1] == rules.DIGEST_VERSION
    assert d == _digest("ab", tags=["C "])  # the normalised payload is what counts
    splits = [_digest("ab", tags=["c"]), _digest("a", tags=["bc"]), _digest("abc"), _digest("", tags=["abc"]),
              _digest(tags=["ab"]), _digest(tags=["a", "b"]), _digest(start=12, dur=3), _digest(start=1, dur=23),
              _digest("1", start=2), _digest("12"), _digest(bpm=-0.0), _digest(bpm=0.0)]
    assert len(set(splits)) == len(splits)
    # every variable-length field is length-prefixed: moving bytes across a boundary changes the digest
    blob, meta = b"\x00" * 16, ("a\x00b", 1, 2, 3.0, ["x"])
    moved = {rules.payload_digest(blob, meta, b'["x"]'), rules.payload_digest(blob, ("a", 1, 2, 3.0, []), b'\x00b["x"]'),
             rules.payload_digest(blob + b"a", ("\x00b", 1, 2, 3.0, []), b'["x"]')}
    assert len(moved) == 3


@pytest.mark.parametrize("first, second", [
    ({"source_file": "ab", "tags": ["c"]}, {"source_file": "a", "tags": ["bc"]}),
    ({"tags": ["ab"]}, {"tags": ["a", "b"]}),
    ({"start_time_ms": 12, "duration_ms": 3}, {"start_time_ms": 1, "duration_ms": 23}),
])
def test_key_reuse_across_a_field_boundary_conflicts(eng, first, second):
    vid, created = eng.ingest(V1, first, idempotency_key="k")
    assert created and eng.ingest(V1, first, idempotency_key="k") == (vid, False)
    with pytest.raises(ConflictError) as exc:
        eng.ingest(V1, second, idempotency_key="k")
    assert exc.value.status == 409


def test_keys_stored_by_0_3_0_still_replay(eng):
    """A row whose digest was stored the 0.3.0 way (32 bytes, NUL-separated fields) still answers a
    retry of the same payload with created=false, and a different payload with 409."""
    meta = {"source_file": "f.wav", "start_time_ms": 40, "duration_ms": 20, "bpm": 120.5, "tags": ["Kick"]}
    row = rules.prepare_rows([{"vector": V1, "metadata": meta, "idempotency_key": "old"}], DIM, LIMITS).rows[0]
    old = row[:wal.ROW_SHA] + (_legacy(row),)
    (vid, created, _lsn), = eng.catalog.write(wal.insert_batch, eng.cid, [old])
    assert created
    assert eng.ingest(V1, meta, idempotency_key="old") == (vid, False)
    assert eng.ingest_batch([{"vector": V1, "metadata": meta, "idempotency_key": "old"}]) == [(vid, False)]
    with pytest.raises(ConflictError):
        eng.ingest(V1, {**meta, "bpm": 121.0}, idempotency_key="old")
    with pytest.raises(ConflictError):
        eng.ingest([0.25] * DIM, meta, idempotency_key="old")


def test_http_boundary_split_conflicts_and_nul_is_400(env):  # noqa: F811 - the imported fixture
    async def body(client, tokens):
        h = {**auth(tokens["admin"]), "Content-Type": "application/json"}

        async def post(doc):
            return await client.post("/v2/vectors", data=orjson.dumps(doc), headers=h)
        first = {"vector": vec(1), "metadata": {"source_file": "ab", "tags": ["c"]}, "idempotency_key": "split-1"}
        resp = await post(first)
        assert resp.status == 201 and (await resp.json())["data"]["created"] is True
        resp = await post(first)
        assert resp.status == 201 and (await resp.json())["data"]["created"] is False
        await expect_error(await post({**first, "metadata": {"source_file": "a", "tags": ["bc"]}}), 409, "conflict",
                           "split-1")
        await expect_error(await post({"vector": vec(1), "metadata": {"tags": ["a\x00b"]}}), 400, "bad_request",
                           "metadata.tags[0] contains a NUL character")
        resp = await client.post("/v2/identify", data=orjson.dumps({"vectors": [[1.0]], "k": 0}), headers=h)
        assert resp.status == 200 and (await resp.json())["data"]["results"] == []
    run(env, body)


def test_every_error_is_a_vibrato_error():
    for bad in (None, 5, "x", [[1, 2]], {"vector": 1}):
        with pytest.raises(VibratoError):
            rules.prepare_rows(bad, DIM, LIMITS)


def b64(a) -> str:
    return base64.b64encode(np.asarray(a, dtype="<f4").tobytes()).decode()


def test_compact_vectors_decode_like_json_arrays():
    v = Validator(Config(dim=DIM))
    q = np.linspace(-3, 3e38, DIM).astype(np.float32)
    a, b = v.query({"vector": b64(q), "k": 3}, True), v.query({"vector": q.tolist(), "k": 3}, True)
    assert type(a["vector"]) is FiniteArray and np.array_equal(a["vector"], b["vector"])
    batch = v.ingest_batch({"vectors": [{"vector": b64(q)}, {"vector": q.tolist(), "metadata": {"bpm": 1.5}}]}, True)
    assert np.array_equal(batch.vectors[0], batch.vectors[1]) and batch.rows[0][-1] != batch.rows[1][-1]
    assert batch.rows[0][0] == batch.rows[1][0]  # the same stored vector blob either way
    frames = np.arange(3 * DIM, dtype=np.float32).reshape(3, DIM)
    assert np.array_equal(v.identify({"vectors": b64(frames), "k": 2}, True)["vectors"], frames)
    assert np.array_equal(v.identify({"vectors": [b64(f) for f in frames], "k": 2}, True)["vectors"], frames)


@pytest.mark.parametrize("doc,status,fragment", [
    ({"vector": "not base64!"}, 422, "base64 of little-endian float32"),
    ({"vector": base64.b64encode(b"abcde").decode()}, 400, "not a whole number of float32"),
    ({"vector": "AAAAAA=="}, 400, "dimension mismatch at vector"),  # one component
    ({"vector": None}, 422, "must not be null"),
])
def test_compact_vector_errors(doc, status, fragment):
    with pytest.raises(VibratoError) as e:
        Validator(Config(dim=DIM)).query({"k": 1, **doc}, True)
    assert e.value.status == status and fragment in e.value.message


def test_compact_nan_and_frames_errors():
    v = Validator(Config(dim=DIM))
    bad = np.zeros(DIM, np.float32)
    bad[2] = np.nan
    with pytest.raises(BadRequestError, match=r"vector\[2\] is not finite"):
        v.query({"vector": b64(bad)}, True)
    with pytest.raises(BadRequestError, match="not a whole number of"):
        v.identify({"vectors": b64(np.zeros(DIM + 1, np.float32)), "k": 1}, True)


def test_compact_vectors_over_http(env):  # noqa: F811 - the imported fixture
    async def body(client, tokens):
        h = {**auth(tokens["admin"]), "Content-Type": "application/json"}
        x = np.zeros(len(vec()), dtype=np.float32)  # the app's dim; far from the other tests' vectors
        x[-1], x[-2] = 1000.0, -3.0
        resp = await client.post("/v2/vectors", data=orjson.dumps({"vector": b64(x)}), headers=h)
        assert resp.status == 201, await resp.text()
        vid = (await resp.json())["data"]["id"]
        answers = []
        for form in (b64(x), x.tolist()):
            resp = await client.post("/v2/query", data=orjson.dumps({"vector": form, "k": 3, "search_tier": "all",
                                                                     "include_metadata": False}), headers=h)
            answers.append((await resp.json())["data"]["results"])
        assert answers[0] == answers[1] and answers[0][0]["id"] == vid, answers
        resp = await client.post("/v2/identify", data=orjson.dumps({"vectors": b64(np.stack([x, x])), "k": 1}),
                                 headers=h)
        assert resp.status == 200, await resp.text()
        spec = await (await client.get("/v2/openapi.json")).json()
        vector = spec["components"]["schemas"]["QueryRequest"]["properties"]["vector"]
        assert {s.get("format") for s in vector["oneOf"]} >= {"byte"}
    run(env, body)


# ---------------------------------------------------------------------------- JSON rows -> float32
_number = st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=64),
                    st.integers(min_value=-(2**53), max_value=2**53))


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 9).flatmap(lambda d: st.lists(st.lists(_number, min_size=d, max_size=d), min_size=1, max_size=5)))
def test_float32_rows_converts_numbers_as_numpy_does(rows):
    """The native conversion of parsed JSON rows (the server's common case) gives numpy's exact
    float32 values, overflow to +-inf included."""
    got = rules.float32_rows(rows, len(rows[0]))
    with np.errstate(over="ignore"):
        want = np.array(rows, dtype=np.float64 if any(type(x) is float for r in rows for x in r) else None)
        want = want.astype(np.float32)
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == want.shape
    assert np.array_equal(got, want)


@pytest.mark.parametrize("rows", [
    [[1.0, True, 0.0]],            # a boolean: numpy would take it as 1.0
    [[0.0, 0.0, False]],
    [[1.0, None, 0.0]],            # not a number
    [[1.0, "2", 0.0]],
    [[1.0, 2.0]],                  # another length
    [[1.0, 2.0, 3.0], [1.0, 2.0]],
    [[1.0, 2**53 + 1, 0.0]],       # beyond 2**53: numpy rounds int64 -> float32 once; left to it
    [[1.0, -(2**64), 0.0]],
    [(1.0, 2.0, 3.0)],             # not a list
    [np.zeros(3, np.float32)],     # the compact form, decoded elsewhere
    ((1.0, 2.0, 3.0),),
])
def test_float32_rows_leaves_everything_else_to_the_general_path(rows):
    assert rules.float32_rows(rows, 3) is None


def test_decode_vectors_still_names_a_boolean_the_native_pass_refused():
    v = Validator(Config(data_dir="/nonexistent", dim=3))
    with pytest.raises(VibratoError, match=r"vector\[1\]: expected a number, got a boolean"):
        v.query({"vector": [1.0, True, 0.0]}, True)
