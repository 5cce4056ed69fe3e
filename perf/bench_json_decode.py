"""Vector decoding in the HTTP layer: numpy bulk decoding (vibrato.server.schemas.decode_vectors)
against naive per-float Python handling, on the parsed JSON of real request bodies.

    .venv/bin/python perf/bench_json_decode.py

"naive" is what a straightforward handler does: for every component check the type, check it is
finite and inside float32 range, append, then build the array. "bulk" is the server's path:
`np.array(rows)` over the parsed lists, one float32 cast, one `isfinite` pass (the per-row type
scan runs only when the body contains a JSON boolean literal). Both accept and reject the same
inputs. Figures are the best of several repeats (ms); ratio = naive / bulk.
"""
import math
import time

import numpy as np
import orjson

from vibrato.config import Config
from vibrato.server.schemas import Validator, decode_vectors

F32_MAX = float(np.finfo(np.float32).max)


def naive_decode(rows, dim):
    out = np.empty((len(rows), dim), dtype=np.float32)
    for i, row in enumerate(rows):
        if len(row) != dim:
            raise ValueError("dimension mismatch")
        vals = []
        for x in row:
            if type(x) not in (int, float):
                raise ValueError("not a number")
            if not math.isfinite(x) or abs(x) > F32_MAX:
                raise ValueError("not finite")
            vals.append(x)
        out[i] = vals
    return out


def best(fn, repeat=7):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1000.0


def main():
    rng = np.random.default_rng(0)
    dim = 128
    validator = Validator(Config(dim=dim, limits=Config().limits))
    print(f"{'case':38s}{'naive ms':>11s}{'bulk ms':>11s}{'ratio':>8s}")
    for n in (1, 100, 1000, 10_000):
        x = rng.standard_normal((n, dim)).astype(np.float32)
        body = orjson.dumps({"vectors": [{"vector": v, "metadata": {"tags": ["a"]}} for v in x]},
                            option=orjson.OPT_SERIALIZE_NUMPY)
        rows = [it["vector"] for it in orjson.loads(body)["vectors"]]
        assert np.array_equal(naive_decode(rows, dim), decode_vectors(rows, dim, "batch", False))
        t_naive = best(lambda: naive_decode(rows, dim))
        t_bulk = best(lambda: decode_vectors(rows, dim, "batch", False))
        print(f"{f'decode {n} x {dim}':38s}{t_naive:11.3f}{t_bulk:11.3f}{t_naive / t_bulk:7.1f}x")
        t_bulk_scan = best(lambda: decode_vectors(rows, dim, "batch", True))
        print(f"{f'  bulk + per-row type scan':38s}{'':11s}{t_bulk_scan:11.3f}{t_naive / t_bulk_scan:7.1f}x")
        t_loads = best(lambda: orjson.loads(body))
        t_full = best(lambda: validator.ingest_batch(orjson.loads(body), b"true" in body or b"false" in body))
        print(f"{f'  orjson.loads {len(body) / 1e6:.2f} MB':38s}{'':11s}{t_loads:11.3f}")
        print(f"{f'  loads + full validation':38s}{t_loads + t_naive:11.3f}{t_full:11.3f}"
              f"{(t_loads + t_naive) / t_full:7.1f}x")


if __name__ == "__main__":
    main()
