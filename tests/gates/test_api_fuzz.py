"""Malformed-input gate for the HTTP API (CONTRACT.md §6, Malformed input): schemathesis
generates requests from the server's own OpenAPI description (`GET /v2/openapi.json`), valid and
invalid (positive and negative modes), and sends them to a real `vibrato serve-v2` with an admin key.

Per generated case: no 5xx (schemathesis' `not_a_server_error`), an error answer is a JSON
`{"code", "message"}` body (CONTRACT.md D12), the request finishes within VIBRATO_FUZZ_REQUEST_TIMEOUT_SECS
(10; no hang) and the server process is still alive (no crash). Bounded: VIBRATO_FUZZ_MAX_EXAMPLES
(100) cases per operation and mode, derandomized (the same cases every run) so a failure replays.
After the run the server must still answer ready and shut down cleanly on SIGTERM.
"""
import json

import hypothesis
import hypothesis.errors
from hypothesis import strategies as st
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from gatelib import GateServer, WorkDir, create_key, env_int

MAX_EXAMPLES = env_int("VIBRATO_FUZZ_MAX_EXAMPLES", 100)
REQUEST_TIMEOUT = env_int("VIBRATO_FUZZ_REQUEST_TIMEOUT_SECS", 10)
DIM = 8
STATE = {}


@pytest.fixture(scope="module")
def server():
    with WorkDir("vibrato-fuzz-") as work:
        data = work / "data"
        token = create_key(data, "fuzz")
        srv = GateServer(data, dim=DIM, log_dir=work, log_level="error",
                         extra=["--max-batch", "64", "--max-identify-frames", "64"])
        try:
            srv.wait_ready()
            srv.token = token
            c = srv.client(token)
            for i in range(32):  # something to find
                c.ingest([float((i + j) % 5) for j in range(DIM)], {"tags": ["fuzz"]}, f"fuzz-seed-{i}")
            STATE["server"] = srv
            yield srv
            st = c.health_ready()
            assert srv.alive(), f"server died during the fuzz run:\n{srv.tail()}"
            assert st.get("ready") is True or st.get("status") == "ok", st
            assert srv.terminate() == 0, f"unclean shutdown after the fuzz run:\n{srv.tail()}"
        finally:
            srv.stop()


def pin_vector_lengths(node, dim):
    """The document cannot know the served `--dim`; pin vector arrays to it so that positive cases
    get past the dimension check into the engine (negative cases still break it)."""
    if isinstance(node, dict):
        props = node.get("properties")
        if isinstance(props, dict):
            v = props.get("vector")
            if isinstance(v, dict) and v.get("type") == "array":
                v.update(minItems=dim, maxItems=dim)
            vs = props.get("vectors")
            if isinstance(vs, dict) and isinstance(vs.get("items"), dict) and vs["items"].get("type") == "array":
                vs["items"].update(minItems=dim, maxItems=dim)
        for child in node.values():
            pin_vector_lengths(child, dim)
    elif isinstance(node, list):
        for child in node:
            pin_vector_lengths(child, dim)
    return node


@pytest.fixture(scope="module")
def api_schema(server):
    spec = pin_vector_lengths(server.client(server.token).openapi(), DIM)
    schema = schemathesis.openapi.from_dict(spec)
    schema.config.update(base_url=server.url)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                    max_examples=MAX_EXAMPLES, deterministic=True, no_shrink=False)
    return schema


def check_case(case, server):
    headers = {"Authorization": f"Bearer {server.token}"}
    try:
        response = case.call(headers=headers, timeout=REQUEST_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - a timeout or reset is a hang/crash
        alive = server.alive()
        raise AssertionError(f"{case.method} {case.path}: no answer within {REQUEST_TIMEOUT}s ({exc!r}); "
                             f"server alive={alive}\nreproduce: {case.as_curl_command(headers)}") from None
    assert server.alive(), f"server died on {case.method} {case.path}:\n{server.tail()}"
    case.validate_response(response, checks=(not_a_server_error,), headers=headers)
    if response.status_code >= 400:
        try:
            body = json.loads(response.content)
        except ValueError:
            body = None
        assert isinstance(body, dict) and isinstance(body.get("code"), str) and isinstance(body.get("message"), str), \
            (f"{case.method} {case.path} -> {response.status_code} without a JSON {{code, message}} body: "
             f"{response.content[:300]!r}\nreproduce: {case.as_curl_command(headers)}")
    return response.status_code


# schemathesis' pytest plugin (`from_fixture` + `parametrize`) does not run under pytest 9, so the
# cases are drawn with its strategies and hypothesis directly: one test per generation mode, every
# operation of the document inside it, failures collected per operation.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_openapi_fuzz(api_schema, server, mode):
    failures, summary = [], []
    operations = [r.ok() for r in api_schema.get_all_operations()]
    assert len(operations) >= 11, f"the OpenAPI document lists only {len(operations)} operations"
    for op in operations:
        statuses = {}

        @hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck), phases=[
                                 hypothesis.Phase.explicit, hypothesis.Phase.generate, hypothesis.Phase.shrink])
        @hypothesis.given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            code = check_case(case, server)
            statuses[code] = statuses.get(code, 0) + 1

        try:
            run()
        except hypothesis.errors.Unsatisfiable:
            pass  # nothing to make invalid (no parameters and no body): the positive run covers it
        except Exception as exc:  # noqa: BLE001 - reported together below
            failures.append(f"{op.method.upper()} {op.path} ({mode.value}): {exc}")
        summary.append(f"{op.method.upper()} {op.path}: {sum(statuses.values())} cases, statuses {dict(sorted(statuses.items()))}")
    print(f"\n[fuzz] {mode.value}:\n  " + "\n  ".join(summary))
    assert not failures, "\n\n".join(failures)


JSON_ROUTES = ("/v2/vectors", "/v2/vectors/batch", "/v2/query", "/v2/identify")
_json = st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
                     max_leaves=30)
_bodies = st.one_of(
    st.binary(max_size=512),                                                   # not JSON at all
    _json.map(lambda v: json.dumps(v).encode()),                                # JSON of any shape
    st.integers(1, 20000).map(lambda n: b"[" * n + b"]" * n),                   # deep nesting
    st.sampled_from([b'{"vector": [1e309]}', b'{"vector": [NaN]}', b'{"vector": "' + b"9" * 5000 + b'"}',
                     b'{"vectors": [[]]}', b'{"k": -1, "vector": [0]}', b'\xff\xfe{}', b'{"vector":[0,0,0,0,0,0,0,0],'
                     b'"filter":{"bpm_gte":1e39}}', b'{"vector":[0,0,0,0,0,0,0,0],"k":1e300}']),
)


@hypothesis.settings(max_examples=MAX_EXAMPLES * 4, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(route=st.sampled_from(JSON_ROUTES), body=_bodies,
                  content_type=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain"]))
def test_raw_malformed_bodies(server, route, body, content_type):
    """Bytes schemathesis never sends (broken JSON, deep nesting, non-finite numbers): a 4xx JSON error."""
    c = server.client(server.token, timeout=REQUEST_TIMEOUT)
    status, headers, raw = c.request("POST", route, raw=body, headers={"Content-Type": content_type})
    assert server.alive(), f"server died on POST {route} with {body[:200]!r}:\n{server.tail()}"
    assert status < 500, f"POST {route} {content_type} {body[:300]!r} -> {status}: {raw[:300]!r}"
    if status >= 400:
        err = json.loads(raw)
        assert isinstance(err.get("code"), str) and isinstance(err.get("message"), str), raw[:300]
