"""Query planning: one plan per query, decided per searched target from its allowed row count.

A query's filter is evaluated once, to an `Allowed` (filters.py): the sorted allowed ids when the
filter is selective, else a bool mask over the id space. `plan` then walks the targets the search
tier covers (hot slices, then segments by id) and gives each one step:

  skip   the filter allows no row of the target;
  exact  score the target's allowed rows with the SIMD kernels and keep the top k: the rows come
         straight from the sorted ids (or a slice of the mask), no per-target mask is built;
  graph  the target's HNSW graph (raw segments, archives written by format version 2, sealed hot
         chunks once their graph is built), with
         a bool mask local to the target (None when every row is allowed). The native search keeps
         its own cost model and may still scan (include/vibrato/hnsw.h, vb_hnsw_search_one);
  scan   a raw segment whose graph search would scan at least SCAN_CODES_MIN_ROWS allowed rows:
         the native exact scan under a target-local mask, ranking on the segment's int8 scan codes
         (built in RAM on its first such query, d + 4 bytes per row) and rescoring the best
         max(8k, ef) rows on the float vectors, so the scores stay exact;
  pq     version-1 archive segments (no graph): ADC scan of the PQ codes under a target-local mask,
         exact rerank of the best max(k * rerank_factor, ef) (CONTRACT.md D14).

When `exact` is chosen (see `_exact_is_cheaper`):
  * hot slices: always unless the chunk has a graph and more than HOT_GRAPH_MIN_FACTOR * k rows are
    allowed ("exact scan below a size threshold, HNSW above"); a whole slice of at least
    SCAN_CODES_MIN_ROWS rows (the growing chunk, a sealed one before its graph) is ranked on the
    chunk's int8 scan codes and its best max(8k, ef) rows rescored exactly, like a `scan` step;
  * raw segments: only where the native cost model would scan too (`native_scans`, a strictly
    weaker form of it), so results never change, and only when the filter is selective enough
    that building the segment-sized mask would cost more than scoring the rows; where it scans
    SCAN_CODES_MIN_ROWS rows or more, `scan` instead;
  * version-1 archive segments: when at most max(k * rerank_factor, ef) rows are allowed (the ADC
    scan would return them all for rerank anyway); archives with a graph plan like raw segments.
Exact steps break score ties by the lower row, as the native scan and ADC scan do, so a result
does not depend on which executor ran. Per-target results are merged by score, ties by id
(`merge_topk`); metadata for the final ids is fetched in one batch (`View.metadata_many`) and the
results are shaped here, once, as the engine returns them (docs/ENGINE_API.md); the HTTP handler
serializes them as they are.
"""
import math
from typing import NamedTuple

import numpy as np
import orjson

from vibrato import kernels
from vibrato._native import hnsw as _hnsw
from vibrato.engine.hot import HotSlice

HOT_GRAPH_MIN_FACTOR = 4   # a hot chunk's graph is used only above this many allowed rows per k
TOPK_SORT_MAX = 256        # top-k of at most this many scores: one stable sort beats partition + tie fix
EXACT_MAX_FRACTION = 16    # raw segment: exact from a row list only when <= 1 row in this many is allowed
SCAN_CODES_MIN_ROWS = 2048  # a scan of at least this many rows ranks on int8 codes (~2.5x cheaper)
SCAN_ROWS_LIST_MAX = 4      # a scan step lists its rows (4 bytes each) when at most 1 in this many is allowed
SCAN_CODES_RERANK_PER_K = _hnsw.SQ8_RERANK_PER_K  # ... and rescores max(this * k, ef) rows exactly, as the native one
ARCHIVE_BEAM_FACTOR = 3    # an archive's walk on codes keeps this many times ef rows to rescore exactly
MAX_EF = _hnsw.MAX_EF
# The native filtered-search cost model (include/vibrato/hnsw.h: VB_HNSW_COST_PER_EF,
# VB_HNSW_SCAN_SPEEDUP, vb_hnsw_filtered_ef); tests/test_planner.py checks `native_scans` against
# the native search's own choice.
_COST_PER_EF = 12.0
_SCAN_SPEEDUP = 2.5
_EMPTY_IDS = np.empty(0, np.int64)
_EMPTY_SCORES = np.empty(0, np.float32)


class Step(NamedTuple):
    kind: str          # "skip" | "exact" | "graph" | "scan" | "pq"
    target: object     # a HotSlice or a SegmentHandle
    rows: object       # exact: int64 rows of the target's arrays, or None for rows [lo, hi) of a hot slice;
                       # scan: the mask's rows as uint32 when the filter's evaluation keeps them, or None
    mask: object       # graph/scan/pq: bool mask over the target's rows (None: every row allowed)
    count: object = None  # graph/scan on a segment: how many rows the mask allows, when known


def tier_filter(search_tier: str):
    """(include_hot, segment predicate) for a search_tier value (CONTRACT.md §1.3, Search tiers)."""
    if search_tier == "active":
        return True, lambda s: s.level <= 1
    if search_tier == "archive":
        return False, lambda s: s.level >= 2
    return True, lambda s: True


def native_scans(allowed: int, n: int, k: int, ef: int) -> bool:
    """True only when the native filtered search on n rows, `allowed` of them allowed, would choose an
    exact scan (its graph cost estimate minus the descent term already reaches the scan cost)."""
    if allowed >= n:
        return False
    s = allowed / n
    efs = max(ef, k)
    e = efs * min(2.0, 1.0 / math.sqrt(s))
    efs = _hnsw.MAX_EF if e > _hnsw.MAX_EF else int(e)
    return _COST_PER_EF * efs / s >= allowed / _SCAN_SPEEDUP


# ------------------------------------------------------------------------------------------ plan
def plan(view, allowed, k: int, ef: int, search_tier: str) -> list:
    """The steps of one query over `view` (allowed: an `Allowed` or None for no filter)."""
    include_hot, pred = tier_filter(search_tier)
    steps = []
    if include_hot and view.hot.count:
        steps.extend(_plan_hot(s, allowed, k, ef) for s in view.hot.slices)
    steps.extend(_plan_segment(seg, allowed, k, ef) for seg in view.segments if pred(seg))
    return steps


def _plan_hot(sl, allowed, k, ef) -> Step:
    ch = sl.chunk
    rows = None if allowed is None else _hot_rows(sl, allowed)
    if ch.live is not None:  # rows deleted in this chunk
        keep = ch.live[sl.lo:sl.hi] if rows is None else ch.live[rows]
        if not keep.all():
            rows = np.flatnonzero(keep) + sl.lo if rows is None else rows[keep]
    a = sl.hi - sl.lo if rows is None else rows.shape[0]
    if a == 0:
        return Step("skip", sl, None, None)
    if ch.index is None or (rows is not None and a <= HOT_GRAPH_MIN_FACTOR * k):
        return Step("exact", sl, rows, None)
    if rows is None and sl.lo == 0 and sl.hi == ch.capacity:
        return Step("graph", sl, None, None)
    if native_scans(a, ch.capacity, k, max(ef, k)):
        return Step("exact", sl, rows, None)
    mask = np.zeros(ch.capacity, dtype=bool)
    if rows is None:
        mask[sl.lo:sl.hi] = True
    else:
        mask[rows] = True
    return Step("graph", sl, None, mask)


def _hot_rows(sl, allowed) -> np.ndarray:
    """Rows of the slice's chunk (ascending) whose ids the filter allows."""
    ids = sl.chunk.ids[sl.lo:sl.hi]
    first, last = int(ids[0]), int(ids[-1])
    contiguous = last - first == ids.shape[0] - 1
    if allowed.sparse or not contiguous:
        want = allowed.ids_in(first, last + 1)
        if contiguous or want.shape[0] == 0:
            return want - (first - sl.lo)
        pos = np.searchsorted(ids, want)
        hit = ids[np.minimum(pos, ids.shape[0] - 1)] == want
        return pos[hit] + sl.lo
    return np.flatnonzero(allowed.mask_in(first, last + 1)) + sl.lo


def _plan_segment(seg, allowed, k, ef) -> Step:
    if allowed is None:
        if seg.live_count == 0:
            return Step("skip", seg, None, None)
        return Step("graph" if seg.index is not None else "pq", seg, None, None if seg.all_live else seg.live)
    lo, hi = seg.id_start, seg.id_end + 1
    rows = mask = None
    if allowed.sparse:
        rows = allowed.ids_in(lo, hi) - lo
        if not seg.all_live:
            rows = rows[seg.live[rows]]
        a = rows.shape[0]
    else:
        mask = allowed.mask_in(lo, hi)
        if seg.all_live:
            a = allowed.count_in(lo, hi)  # remembered with the evaluation: repeated filters count once
        else:
            mask = mask & seg.live
            a = int(np.count_nonzero(mask))
    if a == 0:
        return Step("skip", seg, None, None)
    if a == seg.n:
        return Step("graph" if seg.index is not None else "pq", seg, None, None)
    if seg.index is None:
        exact = a <= _pq_candidates(seg, k, ef)
    else:
        scans = native_scans(a, seg.n, k, max(ef, k))
        if scans and a >= SCAN_CODES_MIN_ROWS and seg.ram_codes is None:
            # the scan reads the allowed rows from a list the evaluation keeps (an untouched segment)
            # instead of collecting them from the mask each query
            listed = allowed.rows_in(lo, hi) if seg.all_live and a * SCAN_ROWS_LIST_MAX <= seg.n else None
            return Step("scan", seg, listed, mask if mask is not None else _rows_mask(rows, seg.n), a)
        exact = a * EXACT_MAX_FRACTION <= seg.n and scans
    if exact:
        return Step("exact", seg, rows if rows is not None else np.flatnonzero(mask), None)
    return Step("graph" if seg.index is not None else "pq", seg, None,
                mask if mask is not None else _rows_mask(rows, seg.n), a)


def _rows_mask(rows, n) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return mask


def _pq_candidates(seg, k, ef) -> int:
    """Rerank depth of a version-1 archive: grows with ef, like a graph search's breadth."""
    return max(k * seg.rerank_factor, ef, 32)


def archive_beam(seg, k, ef) -> int:
    """Beam of a graph walk on an archive's codes, all of it rescored exactly: wider than ef, since
    the codes only approximate the order (ARCHIVE_BEAM_FACTOR), and at least k * rerank_factor."""
    return min(max(k * seg.rerank_factor, ARCHIVE_BEAM_FACTOR * ef), MAX_EF)


# ------------------------------------------------------------------------------------------ execute
def search(view, q, k: int, ef: int, allowed, search_tier: str):
    """Top-k (ids int64, scores float32) over the view, best first (ties by id)."""
    if allowed is None:
        seg = walk_alone(view, search_tier)
        if seg is not None:
            return seg.index.search_one(q, k, max(ef, k))
    steps = plan(view, allowed, k, ef, search_tier)
    if len(steps) == 1:  # one step's order is already the merged order (walk_alone)
        if _whole_segment_walk(steps[0]):  # a filter that allows every row of the one segment
            return steps[0].target.index.search_one(q, k, max(ef, k))
        if steps[0].kind == "scan":
            return _run(steps[0], q, k, ef)
    ids, scores = [], []
    for step in steps:
        if step.kind != "skip":
            i, s = _run(step, q, k, ef)
            ids.append(i)
            scores.append(s)
    return merge_topk(ids, scores, k)


def walk_alone(view, search_tier: str):
    """The segment whose walk alone answers a query without a filter on `view`, or None.

    When one segment holds every row searched (a compacted collection, nothing in the hot tier, no
    row deleted) its walk returns distinct ids best first, ties to the lower id: already the merged
    order, so the common query needs no plan, step or merge. Without a filter the plan depends only
    on the view and the tier, and a view never changes (state.SegmentSet makes a new one at every
    change, deletes included), so this is decided once per view and tier."""
    memo = view.alone
    if search_tier in memo:
        return memo[search_tier]
    steps = plan(view, None, 1, 1, search_tier)
    seg = steps[0].target if len(steps) == 1 and _whole_segment_walk(steps[0]) else None
    memo[search_tier] = seg
    return seg


def _whole_segment_walk(step: Step) -> bool:
    """A graph step on every row of a segment walked on its vectors (no mask, not an archive's codes)."""
    return (step.kind == "graph" and step.mask is None and not isinstance(step.target, HotSlice)
            and step.target.ram_codes is None)


def _run(step: Step, q, k, ef):
    t = step.target
    hot = isinstance(t, HotSlice)
    if step.kind == "exact":
        if hot:
            if step.rows is None and t.hi - t.lo >= SCAN_CODES_MIN_ROWS:
                return _hot_codes_scan(q, t, k, ef)
            if step.rows is None:
                scores = kernels.dot_many(q, t.chunk.vectors[t.lo:t.hi], threads=1)
                take = topk(scores, k)
                return t.chunk.ids[t.lo + take], scores[take]
            scores = kernels.dot_many(q, t.chunk.vectors, step.rows, threads=1)
            take = topk(scores, k)
            return t.chunk.ids[step.rows[take]], scores[take]
        scores = kernels.dot_many(q, t.vectors, step.rows, threads=1)
        take = topk(scores, k)
        return step.rows[take] + t.id_start, scores[take]
    if step.kind == "graph":
        return _graph(step, q.reshape(1, -1), k, ef, 1)[0]
    if step.kind == "scan":
        t.ensure_scan_codes()
        return t.index.search_one(q, k, max(ef, k), step.mask, mode="scan", allowed_count=step.count,
                                  allowed_rows=step.rows)
    # pq
    rows, _approx = t.pq.adc_scan(q, t.codes, _pq_candidates(t, k, ef), step.mask)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.shape[0] == 0:
        return _EMPTY_IDS, _EMPTY_SCORES
    exact = kernels.dot_many(q, t.vectors, rows, threads=1)
    take = topk(exact, k)
    return rows[take] + t.id_start, exact[take]


def _hot_codes_scan(q, sl, k, ef):
    """Top-k of a whole hot slice, natively: its rows ranked on the chunk's int8 scan codes (a quarter
    of the memory traffic), the best max(8k, ef) rescored exactly, ties to the lower row as in the
    float scan (the same code as a segment's scan on codes, include/vibrato/hnsw.h vb_sq8_topk)."""
    ch, lo, hi = sl.chunk, sl.lo, sl.hi
    depth = min(max(SCAN_CODES_RERANK_PER_K * k, ef), MAX_EF)  # capped as the segment scan caps it
    rows, scores = _unpadded(*_hnsw.codes_topk(q, ch.codes[lo:hi], ch.scale[lo:hi], ch.vectors[lo:hi], k, depth))
    return ch.ids[rows + lo], scores


def _graph(step: Step, Q, k, ef, threads):
    """A graph step for every row of Q (nq, dim) in one native call: per row, (ids, scores) of the
    results found, best first, ids global."""
    t = step.target
    if isinstance(t, HotSlice):
        ids, scores = t.chunk.index.search(Q, k=k, ef=max(ef, k), allowed=step.mask, threads=threads)
    elif t.ram_codes is not None:  # an archive: walk on its codes, rescore the beam exactly
        ids, scores = t.index.search(Q, k=k, ef=max(ef, k), allowed=step.mask, threads=threads, codes=t.ram_codes,
                                     luts=t.pq.adc_tables(Q), rerank=archive_beam(t, k, ef), allowed_count=step.count)
    else:
        ids, scores = t.index.search(Q, k=k, ef=max(ef, k), allowed=step.mask, threads=threads,
                                     allowed_count=step.count)
    rows_of = t.chunk.ids if isinstance(t, HotSlice) else None  # hot: chunk rows -> ids
    out = []
    for row_ids, row_scores in zip(ids, scores):
        row_ids, row_scores = _unpadded(row_ids, row_scores)
        out.append((row_ids if rows_of is None else rows_of[row_ids], row_scores))
    return out


def _unpadded(rows, scores):
    """One native result row without its padding (-1 / -inf at the tail when fewer than k were found)."""
    if rows.shape[0] and rows[-1] < 0:
        found = int(np.count_nonzero(rows >= 0))
        return rows[:found], scores[:found]
    return rows, scores


def search_many(view, Q, k: int, ef: int, search_tier: str, threads: int = 1) -> list:
    """Top-k (ids, scores) for every row of Q (nq, dim), no filter: each graph target searched once
    for all rows (identify's probes; the native search splits them over `threads`), the others row
    by row."""
    nq = Q.shape[0]
    ids = [[] for _ in range(nq)]
    scores = [[] for _ in range(nq)]
    for step in plan(view, None, k, ef, search_tier):
        if step.kind == "skip":
            continue
        if step.kind == "graph":
            got = _graph(step, Q, k, ef, threads)
        else:
            got = (_run(step, q, k, ef) for q in Q)
        for i, (a, b) in enumerate(got):
            ids[i].append(a)
            scores[i].append(b)
    return [merge_topk(a, b, k) for a, b in zip(ids, scores)]


def topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best scores, best first; equal scores keep the lower position first (also
    across the k-th place, as the native scans do)."""
    n = scores.shape[0]
    if k >= n or n <= TOPK_SORT_MAX:
        return np.argsort(-scores, kind="stable")[:k]
    part = np.argpartition(scores, n - k)[n - k:]
    kth = scores[part].min()
    if np.count_nonzero(scores == kth) > np.count_nonzero(scores[part] == kth):
        above = np.flatnonzero(scores > kth)
        part = np.concatenate([above, np.flatnonzero(scores == kth)[:k - above.shape[0]]])
    else:
        part.sort()
    return part[np.argsort(-scores[part], kind="stable")]


def merge_topk(ids_list, scores_list, k):
    """Keep the best score per id across tiers, then the top k by score (descending, ties by id)."""
    if not ids_list:
        return _EMPTY_IDS, _EMPTY_SCORES
    if len(ids_list) == 1:
        # One target answered (the common case): its ids are distinct and come best first; only
        # equal scores may need their ids reordered, which the general path below does.
        ids, scores = ids_list[0], scores_list[0].astype(np.float32, copy=False)
        if ids.shape[0] < 2 or bool((scores[:-1] > scores[1:]).all()):
            return ids[:k], scores[:k]
    ids = np.concatenate(ids_list)
    scores = np.concatenate(scores_list).astype(np.float32, copy=False)
    if ids.shape[0] == 0:
        return ids, scores
    order = np.lexsort((ids, -scores))  # by score desc, ties by id
    ids, scores = ids[order], scores[order]
    _, first = np.unique(ids, return_index=True)
    first.sort()
    ids, scores = ids[first], scores[first]
    return ids[:k], scores[:k]


# ------------------------------------------------------------------------------------------ results
def f32_floats(values) -> list:
    """float32 values as the floats of their shortest repr (0.1, not 0.10000000149011612), in one
    pass; NaN and infinities stay floats (the HTTP layer serializes them as null)."""
    arr = np.asarray(values, dtype=np.float32)
    raw = orjson.dumps(arr, option=orjson.OPT_SERIALIZE_NUMPY)
    out = orjson.loads(raw)
    if b"null" in raw:  # orjson writes NaN and infinities as null
        out = [float(arr[i]) if v is None else v for i, v in enumerate(out)]
    return out


def query(view, q, k: int, ef: int, allowed, search_tier: str, include_metadata: bool) -> list:
    """One query planned and run, its metadata fetched in one batch, shaped as returned:
    [{"id", "score", "metadata"?}] with score and bpm as shortest float32 values."""
    ids, scores = search(view, q, k, ef, allowed, search_tier)
    if ids.shape[0] == 0:
        return []
    if not include_metadata:
        return shape_results(ids, scores)
    metas = view.metadata_many(ids)
    found = [m for m in metas if m is not None]
    floats = f32_floats(np.concatenate([scores, np.array([m["bpm"] for m in found], dtype=np.float32)]))
    for m, bpm in zip(found, floats[ids.shape[0]:]):
        m["bpm"] = bpm  # every lookup returns fresh dicts
    return [{"id": vid, "score": s} if m is None else {"id": vid, "score": s, "metadata": m}
            for vid, s, m in zip(ids.tolist(), floats, metas)]


def shape_results(ids, scores) -> list:
    """search()'s (ids, scores) as query() returns them without metadata: [{"id", "score"}]."""
    return [{"id": vid, "score": s} for vid, s in zip(ids.tolist(), f32_floats(scores))]


def shape_identify(results: list) -> list:
    """identify's results as returned: ints, score and metadata bpm as shortest float32 values."""
    if not results:
        return results
    metas = [r.get("metadata") for r in results]
    found = [m for m in metas if m is not None]
    floats = f32_floats([r["score"] for r in results] + [m["bpm"] for m in found])
    bpms = iter(floats[len(results):])
    out = []
    for r, score, m in zip(results, floats, metas):
        o = {"id": int(r["id"]), "start_timestamp_ms": int(r["start_timestamp_ms"]),
             "duration_ms": int(r["duration_ms"]), "score": score}
        if m is not None:
            o["metadata"] = {"source_file": m["source_file"], "start_time_ms": int(m["start_time_ms"]),
                             "duration_ms": int(m["duration_ms"]), "bpm": next(bpms), "tags": list(m["tags"])}
        out.append(o)
    return out
