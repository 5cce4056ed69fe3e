"""Distance-kernel benchmarks (report, don't assert): vibrato.kernels against numpy's BLAS in the same run.

Run with the OpenBLAS tuning variables removed for this command only (they slow numpy down here and
would flatter us); never unset them in tests:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python -m pytest perf/bench_kernels.py -s -q

Cases:
  * dot_many: q (128,) against X (100,000 x 128) float32, vs numpy ``X @ q`` (sgemv), with the default
    threads of each (vibrato splits scans over 4 MiB across the cores; OpenBLAS uses its pool) and with
    one thread each (threads=1 / threadpoolctl.threadpool_limits(1)).
  * l2sq_many: squared L2 to every row vs numpy's fastest formula with precomputed row norms
    (``xx - 2 X @ q + q.q``).
  * dot_matrix: Q (100 x 128) x X (100,000 x 128) and Q (1,000 x 128) x X (20,000 x 128) vs ``Q @ X.T``
    (sgemm).
  * single pair, 128-d, dot and squared L2, ns per call in a native loop, per ISA level
    (vibrato._native.distance.bench_pair), plus the cost of one call from Python for context.
Each case ends in a paired A/B measurement (alternating vibrato and numpy calls, median of per-pair
ratios), which resists the load drift of this shared 2-core machine better than comparing two
separately timed benchmarks. BLAS details (threadpoolctl.threadpool_info()) and the OPENBLAS_*
variables in effect are saved with the results in perf/results/bench_kernels.json.
"""
import json
import os
import platform
import statistics
import timeit
from pathlib import Path

import numpy as np
import pytest

import vibrato.kernels as K
from vibrato._native import cpu
from vibrato._native import distance as D
from benchlib import paired_times

threadpoolctl = pytest.importorskip("threadpoolctl")

ROOT = Path(__file__).resolve().parent
RESULTS = {}
PAIRED = {}
PAIR_NS = {}


def record(benchmark, case, items=None, unit=None):
    med = benchmark.stats.stats.median
    RESULTS[case] = {"median_s": med}
    if items:
        RESULTS[case].update(rate=items / med, unit=unit)


def paired(case, ours, peer, rounds=15):
    """Median of t(ours)/t(peer) over alternating calls (each side timed right after the other)."""
    to, tp = paired_times(ours, peer, rounds)
    ratios = [a / b for a, b in zip(to, tp)]
    PAIRED[case] = {"time_ratio_ours_over_peer": statistics.median(ratios),
                    "ours_median_s": statistics.median(to), "peer_median_s": statistics.median(tp)}
    return PAIRED[case]


@pytest.fixture(scope="module")
def X100k():
    return np.random.default_rng(0).standard_normal((100_000, 128)).astype(np.float32)


@pytest.fixture(scope="module")
def q():
    return np.random.default_rng(1).standard_normal(128).astype(np.float32)


def ref_dot(X, q):
    return X.astype(np.float64) @ q.astype(np.float64)


# -- one-to-many --------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [None, 1], ids=["default-threads", "1-thread"])
def test_dot_many_vibrato(benchmark, X100k, q, threads):
    benchmark.group = "dot_many 100k x 128"
    out = benchmark(K.dot_many, q, X100k, None, threads)
    np.testing.assert_allclose(out, ref_dot(X100k, q), rtol=1e-4, atol=1e-3)
    record(benchmark, f"dot_many vibrato {'default' if threads is None else '1t'}", len(X100k), "rows/s")


@pytest.mark.parametrize("threads", [None, 1], ids=["default-threads", "1-thread"])
def test_dot_many_numpy(benchmark, X100k, q, threads):
    benchmark.group = "dot_many 100k x 128"
    with threadpoolctl.threadpool_limits(threads):
        out = benchmark(np.matmul, X100k, q)
    np.testing.assert_allclose(out, ref_dot(X100k, q), rtol=1e-4, atol=1e-3)
    record(benchmark, f"dot_many numpy {'default' if threads is None else '1t'}", len(X100k), "rows/s")


def test_dot_many_paired(X100k, q):
    paired("dot_many 100k x 128, default threads", lambda: K.dot_many(q, X100k), lambda: X100k @ q, rounds=31)
    with threadpoolctl.threadpool_limits(1):
        paired("dot_many 100k x 128, 1 thread", lambda: K.dot_many(q, X100k, threads=1), lambda: X100k @ q,
               rounds=31)


def test_l2sq_many_vibrato(benchmark, X100k, q):
    benchmark.group = "l2sq_many 100k x 128"
    out = benchmark(K.l2sq_many, q, X100k)
    d = X100k.astype(np.float64) - q
    np.testing.assert_allclose(out, (d * d).sum(1), rtol=1e-4, atol=1e-3)
    record(benchmark, "l2sq_many vibrato default", len(X100k), "rows/s")


def test_l2sq_many_numpy(benchmark, X100k, q):
    benchmark.group = "l2sq_many 100k x 128"
    xx = np.einsum("ij,ij->i", X100k, X100k)
    qq = float(q @ q)
    benchmark(lambda: xx - 2 * (X100k @ q) + qq)
    record(benchmark, "l2sq_many numpy (norms precomputed)", len(X100k), "rows/s")
    paired("l2sq_many 100k x 128, default threads", lambda: K.l2sq_many(q, X100k),
           lambda: xx - 2 * (X100k @ q) + qq, rounds=31)


# -- many-to-many -------------------------------------------------------------------------------------

MATRIX_CASES = [(100, 100_000), (1000, 20_000)]


def _matrix_case(benchmark, nq, nx):
    benchmark.group = f"dot_matrix {nq} x {nx} x 128"
    rng = np.random.default_rng(nq)
    return rng.standard_normal((nq, 128)).astype(np.float32), rng.standard_normal((nx, 128)).astype(np.float32)


@pytest.mark.parametrize("nq,nx", MATRIX_CASES, ids=[f"{a}x{b}" for a, b in MATRIX_CASES])
def test_dot_matrix(benchmark, nq, nx):
    Q, X = _matrix_case(benchmark, nq, nx)
    out = benchmark.pedantic(K.dot_matrix, args=(Q, X), rounds=7, iterations=1, warmup_rounds=1)
    np.testing.assert_allclose(out[:5], Q[:5].astype(np.float64) @ X.T.astype(np.float64), rtol=1e-4, atol=1e-3)
    record(benchmark, f"dot_matrix {nq}x{nx} vibrato", nq * nx, "pairs/s")
    paired(f"dot_matrix {nq}x{nx}, default threads", lambda: K.dot_matrix(Q, X), lambda: Q @ X.T, rounds=9)


@pytest.mark.parametrize("nq,nx", MATRIX_CASES, ids=[f"{a}x{b}" for a, b in MATRIX_CASES])
def test_matmul_numpy(benchmark, nq, nx):
    Q, X = _matrix_case(benchmark, nq, nx)
    benchmark.pedantic(np.matmul, args=(Q, X.T), rounds=7, iterations=1, warmup_rounds=1)
    record(benchmark, f"dot_matrix {nq}x{nx} numpy", nq * nx, "pairs/s")


# -- single pair --------------------------------------------------------------------------------------

LEVELS = cpu.available_levels()


@pytest.mark.parametrize("metric", [0, 1], ids=["dot", "l2sq"])
@pytest.mark.parametrize("level", LEVELS, ids=[cpu.level_name(lvl) for lvl in LEVELS])
def test_pair_native_loop(level, metric):
    rng = np.random.default_rng(2)
    a = rng.standard_normal(128).astype(np.float32)
    b = rng.standard_normal(128).astype(np.float32)
    want = float(a.astype(np.float64) @ b) if metric == 0 else float(((a.astype(np.float64) - b) ** 2).sum())
    got = D.dot(a, b, level) if metric == 0 else D.l2sq(a, b, level)
    assert abs(got - want) <= 1e-4 * (1 + abs(want))
    runs = [D.bench_pair(a, b, metric, 2_000_000, level) for _ in range(9)]
    name = f"{'dot' if metric == 0 else 'l2sq'} 128-d {cpu.level_name(level)}"
    PAIR_NS[name] = {"median_ns": statistics.median(runs), "min_ns": min(runs)}


def test_pair_python_call():
    rng = np.random.default_rng(3)
    a = rng.standard_normal(128).astype(np.float32)
    b = rng.standard_normal(128).astype(np.float32)
    n = 200_000
    for name, fn in (("K.dot from Python", lambda: K.dot(a, b)), ("np.dot from Python", lambda: np.dot(a, b))):
        runs = [timeit.timeit(fn, number=n) / n * 1e9 for _ in range(5)]
        PAIR_NS[name] = {"median_ns": statistics.median(runs), "min_ns": min(runs)}


# -- summary ------------------------------------------------------------------------------------------


def test_zz_report():
    """Prints the tables and saves perf/results/bench_kernels.json."""
    lines = ["", f"{'case':44s} {'median':>11s} {'rate':>16s}"]
    for case, r in RESULTS.items():
        rate = f"{r['rate'] / 1e6:9.1f} M {r['unit']}" if "rate" in r else ""
        lines.append(f"{case:44s} {r['median_s'] * 1e3:9.3f}ms {rate}")
    lines += ["", f"{'paired A/B (alternating calls)':44s} {'ours':>10s} {'numpy':>10s}  numpy/ours speed"]
    for case, r in PAIRED.items():
        lines.append(f"{case:44s} {r['ours_median_s'] * 1e3:8.3f}ms {r['peer_median_s'] * 1e3:8.3f}ms  "
                     f"{1 / r['time_ratio_ours_over_peer']:.2f}x")
    lines += ["", f"{'single pair':44s} {'median':>10s} {'min':>10s}"]
    for case, r in PAIR_NS.items():
        lines.append(f"{case:44s} {r['median_ns']:8.2f}ns {r['min_ns']:8.2f}ns")
    blas = threadpoolctl.threadpool_info()
    env = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
                                          "OMP_NUM_THREADS", "VIBRATO_SIMD")}
    lines += ["", f"BLAS: {json.dumps(blas)}", f"env: {env}", f"vibrato kernels: {K.isa()}"]
    print("\n".join(lines))
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    meta = {"cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count(), "numpy": np.__version__,
            "vibrato_isa": K.isa(), "blas": blas, "env": env}
    (out / "bench_kernels.json").write_text(json.dumps(
        {"meta": meta, "results": RESULTS, "paired": PAIRED, "pair_ns": PAIR_NS}, indent=1))
