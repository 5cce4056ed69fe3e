"""Distance kernels: every ISA path against numpy in float64, every bad input a clear ValueError."""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import vibrato.kernels as K
from vibrato._native import cpu
from vibrato._native import distance as D

LEVELS = cpu.available_levels()


def ref_dot(a, b):
    return float(np.dot(a.astype(np.float64), b.astype(np.float64)))


def ref_l2sq(a, b):
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(np.dot(d, d))


def close(got, want, d, scale):
    # float32 accumulation over d terms, reordered differently per ISA
    return abs(got - want) <= 1e-5 * scale * max(1.0, np.sqrt(d)) + 1e-6


finite = st.floats(-4.0, 4.0, width=32, allow_nan=False, allow_infinity=False)


@pytest.fixture(scope="module", params=LEVELS, ids=[cpu.level_name(lvl) for lvl in LEVELS])
def level(request):
    return request.param


@pytest.mark.parametrize("d", list(range(1, 70)) + [127, 128, 129, 255, 256, 384, 1000, 4096])
def test_pair_every_tail(level, d):
    rng = np.random.default_rng(d)
    a = rng.standard_normal(d).astype(np.float32)
    b = rng.standard_normal(d).astype(np.float32)
    scale = float(np.abs(a).dot(np.abs(b)) + 1)
    assert close(D.dot(a, b, level), ref_dot(a, b), d, scale)
    assert close(D.l2sq(a, b, level), ref_l2sq(a, b), d, ref_l2sq(a, b) + 1)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), d=st.integers(1, 300), offset=st.integers(0, 7))
def test_pair_unaligned_memory(level, data, d, offset):
    # Slice a float32 buffer at an odd element offset so the data is not 32/64-byte aligned.
    buf = data.draw(hnp.arrays(np.float32, 2 * d + 16, elements=finite))
    a = buf[offset:offset + d]
    b = buf[offset + d + 1:offset + 2 * d + 1]
    scale = float(np.abs(a).astype(np.float64).dot(np.abs(b)) + 1)
    assert close(D.dot(a, b, level), ref_dot(a, b), d, scale)
    assert close(D.l2sq(a, b, level), ref_l2sq(a, b), d, ref_l2sq(a, b) + 1)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 40), d=st.integers(1, 200), seed=st.integers(0, 2**32 - 1))
def test_many_and_ids(level, n, d, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    q = rng.standard_normal(d).astype(np.float32)
    X64, q64 = X.astype(np.float64), q.astype(np.float64)
    tol = 1e-4 * np.sqrt(d)
    np.testing.assert_allclose(D.dot_many(q, X, None, level), X64 @ q64, rtol=1e-4, atol=tol)
    np.testing.assert_allclose(D.l2sq_many(q, X, None, level), ((X64 - q64) ** 2).sum(1), rtol=1e-4, atol=tol)
    if n:
        ids = rng.integers(0, n, size=2 * n).astype(np.int64)
        np.testing.assert_allclose(D.dot_many(q, X, ids, level), X64[ids] @ q64, rtol=1e-4, atol=tol)
        np.testing.assert_allclose(D.l2sq_many(q, X, ids, level), ((X64[ids] - q64) ** 2).sum(1),
                                   rtol=1e-4, atol=tol)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), d=st.integers(1, 40), L=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_windows_score_consecutive_rows_in_place(level, n, d, L, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    q = rng.standard_normal(L * d).astype(np.float32)
    if L > n:
        with pytest.raises(ValueError, match="does not fit"):
            D.dot_windows(q, X, np.zeros(1, np.int64), level)
        return
    starts = rng.integers(0, n - L + 1, size=8).astype(np.int64)
    want = [X[s:s + L].astype(np.float64).ravel() @ q.astype(np.float64) for s in starts]
    np.testing.assert_allclose(D.dot_windows(q, X, starts, level), want, rtol=1e-4, atol=1e-4 * np.sqrt(L * d))
    with pytest.raises(ValueError, match=rf"\[0, {n - L + 1}\)"):
        D.dot_windows(q, X, np.array([n - L + 1], np.int64), level)



@pytest.mark.parametrize("d", [1, 7, 16, 31, 64, 100, 128, 129, 384])
def test_sq8_codes_round_trip_within_half_a_step(d):
    rng = np.random.default_rng(d)
    X = rng.standard_normal((300, d)).astype(np.float32) * rng.uniform(0.01, 100, (300, 1)).astype(np.float32)
    X[0] = 0.0
    X[1, d // 2] = np.nan
    X[2, 0] = np.inf
    codes, scale = D.sq8_encode(X)
    assert codes.dtype == np.int8 and codes.shape == X.shape and scale.shape == (300,)
    assert (scale[:3] == 0).all() and (codes[:3] == 0).all()  # zero and non-finite rows score 0
    assert codes.min() >= -127
    err = np.abs(codes[3:].astype(np.float64) * scale[3:, None] - X[3:])
    assert (err <= scale[3:, None] * 0.5 * (1 + 1e-5) + 1e-12).all()
    assert (np.abs(codes[3:]).max(axis=1) == 127).all()  # each row uses the full range


@pytest.mark.parametrize("d", [1, 15, 16, 33, 64, 128, 200])
def test_sq8_dot_every_level_matches_numpy(level, d):
    rng = np.random.default_rng(d)
    X = rng.standard_normal((500, d)).astype(np.float32)
    codes, scale = D.sq8_encode(X)
    q = rng.standard_normal(d).astype(np.float32)
    ids = rng.choice(500, 120).astype(np.int64)  # repeats and any order
    want = (codes[ids].astype(np.float64) @ q.astype(np.float64)) * scale[ids]
    got = D.dot_sq8(q, codes, scale, ids, level=level)
    # the query is rounded to int16 first (vb_sq8_query): each component moves by at most half a step
    step = float(np.abs(q).max()) / min(32767, (2**31 - 1) // (127 * d))
    bound = 0.5 * step * np.abs(codes[ids]).sum(axis=1) * scale[ids]
    assert (np.abs(got - want) <= bound + 1e-5 * np.abs(want) + 1e-6).all()
    assert D.dot_sq8(q, codes, scale, np.empty(0, np.int64), level=level).shape == (0,)
    every = D.dot_sq8(q, codes, scale, level=level)  # every row, contiguous
    np.testing.assert_array_equal(every[ids], got)
    for n in (1, 2, 3, 5, 7, 123):  # by id, four rows at a time and the rest one by one: the same sums
        some = rng.choice(500, n).astype(np.int64)
        np.testing.assert_array_equal(D.dot_sq8(q, codes, scale, some, level=level), every[some])
    import vibrato.kernels as K
    np.testing.assert_array_equal(K.scan_codes(X)[0], codes)


@pytest.mark.parametrize("call, message", [
    (lambda c, s, q: D.dot_sq8(q, c, s, np.array([50], np.int64)), "ids must lie in"),
    (lambda c, s, q: D.dot_sq8(q, c, s, np.array([-1], np.int64)), "ids must lie in"),
    (lambda c, s, q: D.dot_sq8(q[:7], c, s, np.array([0], np.int64)), "dimension mismatch"),
    (lambda c, s, q: D.dot_sq8(q, c.astype(np.uint8), s, np.array([0], np.int64)), "codes must be"),
    (lambda c, s, q: D.dot_sq8(q, c, s[:10], np.array([0], np.int64)), "scale must be"),
    (lambda c, s, q: D.sq8_encode(np.zeros((3, 8), np.float64)), "float32"),
])
def test_sq8_bad_input_is_a_clear_value_error(call, message):
    codes, scale = D.sq8_encode(np.ones((50, 8), np.float32))
    with pytest.raises(ValueError, match=message):
        call(codes, scale, np.ones(8, np.float32))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_threaded_equals_single(level, threads):
    rng = np.random.default_rng(7)
    X = rng.standard_normal((50_001, 33)).astype(np.float32)
    q = rng.standard_normal(33).astype(np.float32)
    one = D.dot_many(q, X, None, level, threads=1)
    np.testing.assert_array_equal(D.dot_many(q, X, None, level, threads=threads), one)
    ids = rng.integers(0, len(X), 30_000).astype(np.int64)
    np.testing.assert_array_equal(D.l2sq_many(q, X, ids, level, threads=threads),
                                  D.l2sq_many(q, X, ids, level, threads=1))


@pytest.mark.parametrize("nq,nx,d", [(1, 1, 1), (3, 17, 5), (33, 300, 129), (64, 1000, 8)])
def test_matrix(level, nq, nx, d):
    rng = np.random.default_rng(nq * nx + d)
    Q = rng.standard_normal((nq, d)).astype(np.float32)
    X = rng.standard_normal((nx, d)).astype(np.float32)
    Q64, X64 = Q.astype(np.float64), X.astype(np.float64)
    np.testing.assert_allclose(D.distance_matrix(Q, X, 0, level), Q64 @ X64.T, rtol=1e-4, atol=1e-4 * np.sqrt(d))
    l2 = (Q64 ** 2).sum(1)[:, None] + (X64 ** 2).sum(1)[None, :] - 2 * Q64 @ X64.T
    np.testing.assert_allclose(D.distance_matrix(Q, X, 1, level), l2, rtol=1e-4, atol=1e-3 * np.sqrt(d))
    np.testing.assert_array_equal(D.distance_matrix(Q, X, 0, level, threads=2),
                                  D.distance_matrix(Q, X, 0, level, threads=1))


def test_public_api_matches_native():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((100, 128)).astype(np.float32)
    q = X[5]
    assert K.dot(q, q) == pytest.approx(ref_dot(q, q), rel=1e-5)
    assert K.l2sq(q, q) == 0.0
    assert int(np.argmax(K.dot_many(q, X))) == 5
    assert K.l2sq_many(q, X, np.array([5, 6], dtype=np.int64))[0] == 0.0
    assert K.dot_matrix(X[:3], X).shape == (3, 100)
    assert K.isa() in ("scalar", "neon", "avx2", "avx512", "avx512vbmi")


def test_empty_inputs():
    q = np.ones(4, np.float32)
    assert K.dot_many(q, np.empty((0, 4), np.float32)).shape == (0,)
    assert K.dot_many(q, np.ones((3, 4), np.float32), np.empty(0, np.int64)).shape == (0,)
    assert K.dot_windows(q, np.ones((3, 4), np.float32), np.empty(0, np.int64)).shape == (0,)
    assert K.dot_matrix(np.empty((0, 4), np.float32), np.ones((3, 4), np.float32)).shape == (0, 3)


BAD_CALLS = [
    (lambda: K.dot(np.ones(3), np.ones(3, np.float32)), "dtype float32"),
    (lambda: K.dot([1.0, 2.0], np.ones(2, np.float32)), "numpy float32 array"),
    (lambda: K.dot(np.ones(3, np.float32), np.ones(4, np.float32)), "dimension mismatch"),
    (lambda: K.dot(np.ones((2, 2), np.float32), np.ones(4, np.float32)), "1-D"),
    (lambda: K.dot(np.ones(8, np.float32)[::2], np.ones(4, np.float32)), "C-contiguous"),
    (lambda: K.dot(np.ones(0, np.float32), np.ones(0, np.float32)), "empty"),
    (lambda: K.dot_many(np.ones(3, np.float32), np.ones((4, 4), np.float32)), "dimension mismatch"),
    (lambda: K.dot_many(np.ones(4, np.float32), np.ones((4, 8), np.float32)[:, ::2]), "C-contiguous"),
    (lambda: K.dot_many(np.ones(4, np.float32), np.ones(4, np.float32)), "2-D"),
    (lambda: K.dot_many(np.ones(4, np.float32), np.ones((4, 4), np.float32), np.array([1], np.int32)), "int64"),
    (lambda: K.dot_many(np.ones(4, np.float32), np.ones((4, 4), np.float32), np.array([4], np.int64)),
     r"\[0, 4\)"),
    (lambda: K.dot_many(np.ones(4, np.float32), np.ones((4, 4), np.float32), np.array([-1], np.int64)),
     r"\[0, 4\)"),
    (lambda: K.l2sq_many(np.ones(4, np.float32), np.ones((4, 4), np.float16)), "float32"),
    (lambda: K.dot_matrix(np.ones((2, 3), np.float32), np.ones((2, 4), np.float32)), "dimension mismatch"),
    (lambda: K.dot_windows(np.ones(6, np.float32), np.ones((4, 4), np.float32), np.zeros(1, np.int64)),
     "multiple of X's row length"),
    (lambda: K.dot_windows(np.ones(8, np.float32), np.ones((4, 4), np.float32), np.array([3], np.int64)),
     r"\[0, 3\)"),
    (lambda: K.dot_many(np.ones(4, np.float32), np.ones((4, 4), np.float32), threads=0), "threads"),
]


@pytest.mark.parametrize("call,message", BAD_CALLS)
def test_bad_input_is_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("threads", [0, 257, True, 1.5, "2"])
def test_threads_argument_is_checked_the_same_in_every_module(threads):
    """One threads_for (vibrato/_native/_common.pxd) for the distance and PQ wrappers: same rule, same words."""
    from vibrato._native import pq as P
    q, X = np.ones(4, np.float32), np.ones((8, 4), np.float32)
    calls = [lambda: K.dot_many(q, X, threads=threads), lambda: K.dot_matrix(X, X, threads=threads),
             lambda: P.adc_scan(np.zeros((2, 256), np.float32), np.zeros((3, 2), np.uint8), 1, threads=threads),
             lambda: P.encode(np.zeros((2, 256, 2), np.float32), X, threads=threads)]
    messages = set()
    for call in calls:
        with pytest.raises(ValueError, match="threads must be") as e:
            call()
        messages.add(str(e.value))
    assert len(messages) == 1, messages


def test_simd_levels_are_one_ordered_list():
    """Every level that runs here has a name VIBRATO_SIMD accepts; PQ has a kernel set per level."""
    from vibrato._native import pq as P
    names = [cpu.level_name(lvl) for lvl in LEVELS]
    assert names[0] == "scalar" and LEVELS == sorted(LEVELS) and "unknown" not in names
    assert P.kernels() == names
    assert K.isa() == cpu.level_name(cpu.selected_level())


def test_unsupported_level_rejected():
    with pytest.raises(ValueError, match="cannot run"):
        D.dot(np.ones(4, np.float32), np.ones(4, np.float32), 99)


@pytest.mark.parametrize("name", ["scalar"] + [cpu.level_name(lvl) for lvl in LEVELS if lvl > 0])
def test_vibrato_simd_env_forces_level(name):
    code = ("import numpy as np, vibrato.kernels as K; "
            "a = np.arange(37, dtype=np.float32); print(K.isa(), K.dot(a, a))")
    env = dict(os.environ, VIBRATO_SIMD=name)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    isa, value = out.stdout.split()
    assert isa == name
    assert float(value) == pytest.approx(sum(i * i for i in range(37)))


def test_vibrato_simd_env_rejects_unknown_name():
    env = dict(os.environ, VIBRATO_SIMD="sse9")
    out = subprocess.run([sys.executable, "-c", "import vibrato.kernels"], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "VIBRATO_SIMD='sse9' is not a SIMD level" in out.stderr
