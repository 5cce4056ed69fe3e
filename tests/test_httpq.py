"""The native request reader (vibrato/_native/httpq.pyx, include/vibrato/httpq.h).

What must hold, since the server answers what it accepts without the regular route's checks:
* a query body it accepts gives exactly what the regular route's parser and validator give: the same
  float32 vector bit for bit (numbers in every JSON spelling), k, ef, include_metadata, search_tier;
* a body or head it does not understand is refused (never a guess), bytes of any kind never crash it;
* a head it accepts is framed as aiohttp frames it: one message, the same Content-Length.
"""
import asyncio
import json

import numpy as np
import orjson
import pytest
from aiohttp.http_parser import HttpRequestParser
from hypothesis import given, settings
from hypothesis import strategies as st

from vibrato._native.httpq import RequestReader
from vibrato.config import Config, Limits
from vibrato.server.handlers import parse_and_validate
from vibrato.server.schemas import Validator

DIM = 6
MAX_K, MAX_EF = 1000, 4096


def head(body: bytes, *fields: str, line: str = "POST /v2/query HTTP/1.1") -> bytes:
    fields = ("Host: x",) + (fields or ("Authorization: Bearer k.s", "Content-Type: application/json"))
    return (line + "\r\n" + "".join(f + "\r\n" for f in fields)
            + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def read(raw: bytes, dim: int = DIM):
    """(framed length, candidate, vector or None, fields) of one read; fields end with the filter
    object's bytes (None: no filter)."""
    r = RequestReader(dim, MAX_K, MAX_EF)
    buf = bytearray(raw)
    total = r.head(buf, len(buf))
    vec = r.query_vector(buf, np.ndarray) if total == len(buf) and r.candidate else None
    return total, r.candidate if total >= 0 else False, vec, (
        (r.k, r.ef, r.include_metadata, r.search_tier, r.filter_json) if vec is not None else None)


def regular(body: bytes, dim: int = DIM):
    """The regular route's reading of a body: (vector, (k, ef, include_metadata, search_tier)), or None."""
    validator = Validator(Config(data_dir="/nonexistent", dim=dim))
    try:
        req = parse_and_validate(body, validator.query)
    except Exception:  # noqa: BLE001 - any refusal
        return None
    return np.asarray(req["vector"]), (req["k"], req["ef"], req["include_metadata"], req["search_tier"]), req["filter"]


def same_as_regular(body: bytes, dim: int = DIM) -> bool:
    """True when the reader accepted the body and the filter's bytes validate as the fast path checks
    them; asserts the regular route reads the body the same way."""
    _, _, vec, fields = read(head(body), dim)
    if vec is None:
        return False
    flt = None
    if fields[4] is not None:
        try:
            flt = Validator(Config(data_dir="/nonexistent", dim=dim)).query_filter(fields[4])
        except Exception:  # noqa: BLE001 - the fast path declines it too
            assert regular(body, dim) is None, body
            return False
    want = regular(body, dim)
    assert want is not None, body
    np.testing.assert_array_equal(vec.view(np.uint32), want[0].view(np.uint32))
    assert fields[:4] == want[1] and flt == want[2]
    return True


# ------------------------------------------------------------------------------------------ bodies
def test_reads_the_common_query():
    v = np.array([0.1, -2.5e-3, 3, 1e-30, -0.0, 7.5], np.float32)
    body = orjson.dumps({"vector": v, "k": 5, "ef": 64, "include_metadata": False, "search_tier": "all",
                         "filter": None}, option=orjson.OPT_SERIALIZE_NUMPY)
    total, candidate, vec, fields = read(head(body))
    assert total == len(head(body)) and candidate
    np.testing.assert_array_equal(vec.view(np.uint32), v.view(np.uint32))
    assert fields == (5, 64, False, "all", None)
    assert same_as_regular(body)


def test_defaults_are_the_regular_routes():
    body = b'{"vector": [1, 2, 3, 4, 5, 6]}'
    assert read(head(body))[3] == (10, 50, True, "active", None)
    assert same_as_regular(body)


floats32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(st.lists(floats32, min_size=DIM, max_size=DIM), st.sampled_from(["f32", "f64", "json", "exp", "int"]))
def test_every_spelling_of_a_number_converts_as_the_regular_route(values, spelling):
    v = np.array(values, np.float32)
    if spelling == "f32":  # shortest float32 repr (orjson's numpy output, vibrato.client's)
        text = orjson.dumps(v, option=orjson.OPT_SERIALIZE_NUMPY).decode()
    elif spelling == "f64":  # the float32 values as doubles, 17 digits
        text = orjson.dumps(v.astype(np.float64).tolist()).decode()
    elif spelling == "json":  # Python's own repr of doubles near them
        text = json.dumps([float(x) * 1.0000001 for x in v])
    elif spelling == "exp":
        text = "[" + ",".join(f"{float(x):.12E}" for x in v) + "]"
    else:
        text = "[" + ",".join(str(int(x)) if abs(x) < 2 ** 60 else "1" for x in v) + "]"
    body = ('{"vector": %s, "k": 3}' % text).encode()
    if not same_as_regular(body):
        # refused: integers beyond 2^53 are left to the regular route, and what it refuses itself
        # (a double past float32's range)
        assert (spelling == "int" and any(2 ** 53 < abs(int(x)) < 2 ** 60 for x in v)) or regular(body) is None, body


@pytest.mark.parametrize("number", ["0", "-0", "-0.0", "0.0e5", "1E+2", "1e-400", "123456789012345678901234",
                                    "0.1000000000000000055511151231257827", "3.4028235e38", "-1.17549435e-38",
                                    "1.4e-45", "9007199254740993", "9007199254740992", "4.9406564584124654e-324",
                                    "2.2250738585072011e-308", "0.000000000000000000000000000001"])
def test_edge_numbers_convert_as_the_regular_route_or_are_refused(number):
    body = ('{"vector": [%s, 0, 0, 0, 0, 0]}' % number).encode()
    if not same_as_regular(body):
        # refused: only integers beyond 2^53 and values beyond float32's range may be
        assert number in ("9007199254740993", "123456789012345678901234") or regular(body) is None


REFUSED_BODIES = [
    b'{"vector": [1, 2, 3, 4, 5]}',                    # wrong dim: the regular route names it
    b'{"vector": [1, 2, 3, 4, 5, 6, 7]}',
    b'{"vector": [1, 2, 3, 4, 5, 6], "k": 3, "k": 4}',  # a repeated field
    b'{"vector": [1, 2, 3, 4, 5, 1e39]}',               # beyond float32
    b'{"vector": [1, 2, 3, 4, 5, 6], "k": -1}',
    b'{"vector": [1, 2, 3, 4, 5, 6], "k": 1001}',       # past max_k
    b'{"vector": [1, 2, 3, 4, 5, 6], "ef": 4097}',
    b'{"vector": [1, 2, 3, 4, 5, 6], "k": 3.0}',
    b'{"vector": [1, 2, 3, 4, 5, 6], "k": "3"}',
    b'{"vector": [1, 2, 3, 4, 5, 6], "k": 03}',
    b'{"vector": [1, 2, 3, 4, 5, 6], "filter": []}',   # a filter that is not an object
    b'{"vector": [1, 2, 3, 4, 5, 6], "filter": {"tags_any": ["a"}}',
    b'{"vector": [1, 2, 3, 4, 5, 6], "filter": {"tags_any": ["a\\"]}',
    b'{"vector": "AAAA"}',                              # the compact form: the parsed step
    b'{"vector": [1, 2, 3, 4, 5, true]}',
    b'{"vector": [1, 2, 3, 4, 5, 6], "search_tier": "ALL"}',
    b'{"vector": [1, 2, 3, 4, 5, 6], "include_metadata": 1}',
    b'{"vector": [1, 2, 3, 4, 5, 6], "extra": 1}',
    b'{"vector": [1, 2, 3, 4, 5, 6], "k\\u0000": 1}',
    b'{"vector": [1, 2, 3, 4, 5, .6]}',
    b'{"vector": [1, 2, 3, 4, 5, 6.]}',
    b'{"vector": [1, 2, 3, 4, 5, 6],}',
    b'{"vector": [1, 2, 3, 4, 5, 6]} x',
    b'{"vector": [1, 2, 3, 4, 5, 6]',
    b'{"vector": [1, 2, 3, 4, 5, 6,]}',
    b'{"vector": [NaN, 2, 3, 4, 5, 6]}',
    b'{}',
    b'[]',
    b'',
]


@pytest.mark.parametrize("body", REFUSED_BODIES)
def test_refuses_anything_but_the_plain_query(body):
    assert read(head(body))[2] is None


@pytest.mark.parametrize("flt", [
    {}, {"tags_any": ["p10"]}, {"tags_all": ["A", " b ", "a"], "bpm_gte": 90, "bpm_lte": 120.5},
    {"tags_any": ["say \"}]{\\", "\u00e9t\u00e9"]}, {"bpm_gte": None}, {"tags_any": []},
])
def test_a_filter_object_is_handed_over_and_reads_as_the_regular_routes(flt):
    body = orjson.dumps({"vector": [1, 2, 3, 4, 5, 6], "k": 4, "filter": flt})
    assert same_as_regular(body)
    assert orjson.loads(read(head(body))[3][4]) == flt  # exactly the filter's bytes


@pytest.mark.parametrize("flt", [b'{"bpm_gte": 120, "bpm_lte": 90}', b'{"tags_any": "x"}', b'{"nope": 1}',
                                 b'{"bpm_gte": 1e39}', b'{"tags_any": [1]}', b'{"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}'])
def test_a_filter_the_validator_refuses_is_declined(flt):
    body = b'{"vector": [1, 2, 3, 4, 5, 6], "filter": ' + flt + b'}'
    assert not same_as_regular(body) and regular(body) is None


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_a_mutated_body_is_refused_or_read_as_the_regular_route_reads_it(data):
    v = np.array(data.draw(st.lists(floats32, min_size=DIM, max_size=DIM)), np.float32)
    doc = {"vector": v, "k": 7, "ef": 20, "include_metadata": False}
    if data.draw(st.booleans()):
        doc["filter"] = {"tags_any": ["a", "b\\c"], "bpm_lte": 100}
    body = bytearray(orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(body)))
        op = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = data.draw(st.sampled_from(list(b' ,.:[]{}"-+eE019tnx\\\x00\xff')))
        if op == "insert":
            body[at:at] = bytes([byte])
        elif at < len(body):
            body[at:at + 1] = b"" if op == "delete" else bytes([byte])
    same_as_regular(bytes(body))


# ------------------------------------------------------------------------------------------ heads
class _Protocol:
    _reading_paused = False

    def pause_reading(self, **_):
        pass

    def resume_reading(self, **_):
        pass


def aiohttp_frames(raw: bytes):
    """(messages, content lengths) aiohttp's own parser makes of raw, or None if it refuses it."""
    async def run():
        parser = HttpRequestParser(_Protocol(), asyncio.get_running_loop(), 2 ** 16, max_line_size=8190,
                                   max_field_size=8190)
        try:
            msgs = parser.feed_data(raw)[0]
        except Exception:  # noqa: BLE001 - aiohttp answers 400
            return None
        return [m.headers.get("Content-Length") for m, _ in msgs]
    return asyncio.run(run())


REFUSED_HEADS = [
    b"POST /v2/query HTTP/1.1\r\nHost: x\r\n",                           # incomplete
    b"POST /v2/query HTTP/1.1\r\nContent-Length: 0\r\n\r\n",              # no Host: aiohttp answers 400
    b"POST /v2/query HTTP/1.0\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"POST /v2/query HTTP/1.1\r\nHost: x\r\n folded\r\nContent-Length: 0\r\n\r\n",
    b"POST /v2/query HTTP/1.1\r\nHost: \xc3\xa9\r\nContent-Length: 0\r\n\r\n",
    b"POST /v2/query HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /v2/query HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: 0\r\n\r\n",
    b"POST /v2/query HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\n{}",
    b"POST /v2/query HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /v2/query HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n",
    b"POST /v2/query HTTP/1.1\nHost: x\nContent-Length: 0\n\n",
    b"POST  /v2/query HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"POST /v2/query HTTP/1.1\r\nHost: x\r\nBad Name: x\r\nContent-Length: 0\r\n\r\n",
    b"POST /v2/query HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
]


@pytest.mark.parametrize("raw", REFUSED_HEADS)
def test_refuses_heads_it_cannot_frame_for_sure(raw):
    assert read(raw)[0] == -1


@pytest.mark.parametrize("fields,candidate", [
    (("Authorization: Bearer k.s", "Content-Type: application/json"), True),
    (("authorization: Bearer k.s", "content-type: Application/JSON; charset=utf-8", "Connection: keep-alive"), True),
    (("Authorization: Bearer k.s", "Content-Type: application/vnd.x+json"), True),
    (("Authorization: Bearer k.s", "Content-Type: text/plain"), False),
    (("Authorization: Bearer k.s",), False),
    (("Content-Type: application/json",), False),
    (("Authorization: Bearer a.b", "Authorization: Bearer k.s", "Content-Type: application/json"), False),
    (("Authorization: Bearer k.s", "Content-Type: application/json", "Connection: close"), False),
    (("Authorization: Bearer k.s", "Content-Type: application/json", "Expect: 100-continue"), False),
    (("Authorization: Bearer k.s", "Content-Type: application/json", "Content-Encoding: gzip"), False),
    (("Authorization: Bearer k.s", "Content-Type: application/json", "x-request-id: a", "x-request-id: b"), False),
])
def test_a_candidate_is_only_the_plain_query(fields, candidate):
    body = b'{"vector": [1, 2, 3, 4, 5, 6]}'
    raw = head(body, *fields)
    total, got, _, _ = read(raw)
    assert got == candidate
    if total >= 0:
        assert total == len(raw)


def test_fields_are_read_trimmed():
    raw = head(b"{}", "Authorization:   Bearer k.s \t", "X-Request-Id: abc ", "Content-Type: application/json")
    r = RequestReader(DIM, MAX_K, MAX_EF)
    assert r.head(bytearray(raw), len(raw)) == len(raw)
    assert (r.authorization, r.request_id) == ("Bearer k.s", "abc")


def test_other_requests_are_framed_for_the_connection():
    get = b"GET /v2/health HTTP/1.1\r\nHost: x\r\n\r\n"
    post = b"POST /v2/vectors HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
    r = RequestReader(DIM, MAX_K, MAX_EF)
    assert r.head(bytearray(get), len(get)) == len(get) and not r.candidate
    assert r.head(bytearray(post), len(post)) == len(post) + 10 and not r.candidate
    assert r.head(bytearray(get + post), len(get)) == len(get)  # only n bytes are looked at


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_a_head_it_frames_is_one_message_to_aiohttp_with_the_same_length(data):
    fields = data.draw(st.lists(st.sampled_from([
        "Host: x", "Content-Type: application/json", "Authorization: Bearer k.s", "Content-Length: 3",
        "Content-Length: 0", "Transfer-Encoding: chunked", "X-A: b", "x-a:\tb ", "Connection: close",
        "Expect: 100-continue", "X-Request-Id: r", "User-Agent: u", "Bad\x7f: x", "X: \x01", "Upgrade: h2c",
    ]), max_size=6))
    method = data.draw(st.sampled_from(["POST /v2/query", "GET /v2/health", "PUT /x?y=1", "P@ST /"]))
    raw = (method + " HTTP/1.1\r\n" + "".join(f + "\r\n" for f in fields) + "\r\n").encode()
    raw += data.draw(st.binary(max_size=8))
    r = RequestReader(DIM, MAX_K, MAX_EF)
    total = r.head(bytearray(raw), len(raw))
    if total < 0 or total > len(raw):
        return
    frames = aiohttp_frames(raw[:total])
    assert frames is not None and len(frames) == 1, raw
    assert int(frames[0] or 0) == total - raw.index(b"\r\n\r\n") - 4


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_refused_or_framed_never_a_crash(raw):
    r = RequestReader(DIM, MAX_K, MAX_EF)
    buf = bytearray(raw)
    total = r.head(buf, len(buf))
    assert total == -1 or total >= 4
    r.query_body(buf, np.empty(DIM, np.float32))
    r.query_vector(buf, np.ndarray)


def test_checks_its_arguments():
    r = RequestReader(DIM, MAX_K, MAX_EF)
    with pytest.raises(ValueError):
        r.head(bytearray(b"abc"), 4)
    raw = bytearray(head(b'{"vector": [1, 2, 3, 4, 5, 6]}'))
    assert r.head(raw, len(raw)) == len(raw)
    with pytest.raises(ValueError):
        r.query_body(raw, np.empty(DIM + 1, np.float32))
    with pytest.raises(ValueError):
        RequestReader(0, 1, 1)


def test_query_vector_is_a_new_read_only_array_of_the_callers_type():
    class Marked(np.ndarray):
        pass
    r = RequestReader(DIM, MAX_K, MAX_EF)
    raw = bytearray(head(b'{"vector": [1, 2, 3, 4, 5, 6.5]}'))
    assert r.head(raw, len(raw)) == len(raw)
    a, b = r.query_vector(raw, Marked), r.query_vector(raw, Marked)
    assert type(a) is Marked and a is not b and not a.flags.writeable and a.dtype == np.float32
    np.testing.assert_array_equal(a, [1, 2, 3, 4, 5, 6.5])
    bad = bytearray(head(b'{"vector": [1, 2]}'))
    assert r.head(bad, len(bad)) == len(bad) and r.query_vector(bad, Marked) is None


# ------------------------------------------------------------------------------------------ identify
def identify_pair(body: bytes, dim: int = DIM, max_frames: int = 50):
    """(the C reading, the regular route's reading) of an identify body, each None when refused."""
    validator = Validator(Config(data_dir="/nonexistent", dim=dim, limits=Limits(max_identify_frames=max_frames)))
    fast = validator.identify_bytes(body)
    try:
        slow = parse_and_validate(body, validator.identify)
    except Exception:  # noqa: BLE001 - any refusal
        slow = None
    return fast, slow


def same_identify(body: bytes, **kw) -> bool:
    """True when the C reader accepted the body; asserts the regular route reads it the same way."""
    fast, slow = identify_pair(body, **kw)
    if fast is None:
        return False
    assert slow is not None, body
    assert type(fast["vectors"]) is type(slow["vectors"]) and not fast["vectors"].flags.writeable
    np.testing.assert_array_equal(fast["vectors"].view(np.uint32), np.asarray(slow["vectors"]).view(np.uint32))
    assert {k: v for k, v in fast.items() if k != "vectors"} == {k: v for k, v in slow.items() if k != "vectors"}
    return True


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12), st.data(), st.sampled_from(["f32", "f64"]))
def test_an_identify_body_is_read_as_the_regular_route_reads_it(n, data, spelling):
    frames = np.array(data.draw(st.lists(st.lists(floats32, min_size=DIM, max_size=DIM), min_size=n, max_size=n)),
                      np.float32)
    extra = data.draw(st.fixed_dictionaries({}, optional={
        "k": st.integers(1, 50), "ef": st.integers(0, 300), "include_metadata": st.booleans(),
        "search_tier": st.sampled_from(["active", "archive", "all"])}))
    rows = frames if spelling == "f32" else frames.astype(np.float64).tolist()
    body = orjson.dumps({"vectors": rows, **extra}, option=orjson.OPT_SERIALIZE_NUMPY)
    assert same_identify(body)


IDENTIFY_REFUSED = [
    b'{"vectors": [[1, 2, 3, 4, 5, 6]], "k": 0}',        # k = 0 answers before the dimension check
    b'{"vectors": []}',
    b'{"vectors": [[1, 2, 3, 4, 5]]}',
    b'{"vectors": [[1, 2, 3, 4, 5, 6], [1, 2]]}',
    b'{"vectors": "AAAA"}',                               # the compact form: the regular route
    b'{"vectors": [[1, 2, 3, 4, 5, 6]], "filter": null}',
    b'{"vectors": [[1, 2, 3, 4, 5, 6]], "k": 3, "k": 3}',
    b'{"vectors": [[1, 2, 3, 4, 5, 6]], "k": 1001}',
    b'{"vectors": [[1, 2, 3, 4, 5, 1e39]]}',
    b'{"vectors": [[1, 2, 3, 4, 5, 6],]}',
    b'{"vector": [1, 2, 3, 4, 5, 6]}',
    b'{"k": 3}',
]


@pytest.mark.parametrize("body", IDENTIFY_REFUSED)
def test_other_identify_bodies_are_left_to_the_regular_route(body):
    assert identify_pair(body)[0] is None


def test_more_frames_than_the_limit_are_left_to_the_regular_route():
    body = orjson.dumps({"vectors": [[1.0] * DIM] * 4})
    assert same_identify(body, max_frames=4)
    fast, slow = identify_pair(body, max_frames=3)
    assert fast is None and slow is None  # the regular route answers the limit's 400


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_mutated_identify_body_is_refused_or_read_as_the_regular_route_reads_it(data):
    body = bytearray(orjson.dumps({"vectors": [[0.5, -1.25, 3, 4e-3, 5, 6]] * 2, "k": 4, "search_tier": "all"}))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(body)))
        byte = data.draw(st.sampled_from(list(b' ,.:[]{}"-eE019tnx\\\x00\xff')))
        if data.draw(st.booleans()):
            body[at:at] = bytes([byte])
        elif at < len(body):
            del body[at]
    same_identify(bytes(body))


# ---------------------------------------------------------------------------- the answer
def _shaped_answer(ids, scores, took):
    from vibrato.engine.planner import shape_results
    return orjson.dumps({"data": {"results": shape_results(ids, scores), "query_time_ms": took}})


def _answer(ids, scores, took):
    from vibrato._native.httpq import query_answer
    return query_answer(ids, orjson.dumps(scores, option=orjson.OPT_SERIALIZE_NUMPY), orjson.dumps(took))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.integers(-2 ** 63, 2 ** 63 - 1), st.floats(width=32)), max_size=12),
       st.floats(0, 1e6))
def test_the_native_answer_is_the_shaped_one_or_none(rows, took):
    """query_answer writes exactly what orjson writes for the shaped results (any float32 score,
    NaN and infinities included), or declines: never other bytes."""
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    scores = np.array([r[1] for r in rows], dtype=np.float32)
    got = _answer(ids, scores, took)
    assert got is None or got == _shaped_answer(ids, scores, took)


def test_the_native_answer_takes_the_scores_of_a_query_and_declines_what_it_cannot_write():
    rng = np.random.default_rng(5)
    for _ in range(2000):  # scores of unit vectors: taken, and the same bytes
        k = int(rng.integers(0, 11))
        ids = rng.integers(0, 2 ** 40, k).astype(np.int64)
        scores = np.sort(rng.uniform(-1, 1, k).astype(np.float32))[::-1].copy()
        scores[np.abs(scores) < 1e-3] = 0.5
        assert _answer(ids, scores, 0.25) == _shaped_answer(ids, scores, 0.25)
    ids = np.arange(3, dtype=np.int64)
    for odd in (1e-5, -3e-7, 2.5e13, float("inf"), float("nan")):  # written differently: declined
        assert _answer(ids, np.array([0.5, odd, 0.25], np.float32), 1.0) is None
    from vibrato._native.httpq import query_answer
    assert query_answer(ids, b"[0.5,0.25]", b"1.0") is None  # fewer scores than ids
    assert query_answer(ids[:1], b"[0.5,0.25]", b"1.0") is None  # more
    assert query_answer(ids[:0], b"[]", b"0.5") == b'{"data":{"results":[],"query_time_ms":0.5}}'
    assert query_answer(ids[:0], b"", b"0.5") is None
