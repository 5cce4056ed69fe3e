"""Identify: find where a sequence of query frames occurs in the stored frames (subsequence search).

Frames of a track are ingested consecutively, so frame i of a match starting at id s is id s + i.
Across every searched tier (ids are dense across tiers, so a match may span hot tier and segments,
CONTRACT.md D1):
  1. probes: up to VOTERS frames spread evenly over the query, each minus CENTRE times the query's
     mean frame (renormalised). Noise and the room add a component common to every frame of the
     query; the raw frames' nearest neighbours are then frames that resemble that component (pauses,
     breath, hiss) from anywhere in the catalog, while the centred probes' are the frames that
     match what changes over the query. Probes only choose candidates: scores use the frames as
     given. On perf/bench_identify_noise.py's set at 10 dB the true start ranks in the top 16
     votes for 60/60 queries centred, 50/60 with the raw frames;
  2. voting (a Hough histogram, as audio fingerprinting does with hash hits): each probe's
     neighbours give starts s = hit - offset; a start's votes are its own plus its better adjacent
     start's, since an excerpt cut between two frames splits its votes over both;
  3. the best-voted starts (and their neighbours) are scored as windows s .. s+L-1 by id (in place
     where a window lies in one segment, tiers.View.window_scores); a window with a missing,
     tombstoned, deleted or replayed-away id is rejected (the hole guard), the rest are scored
     exactly as the mean per-frame inner product of the frames as given, and the top k returned.
"""
import numpy as np

VOTERS = 16                   # query frames that vote (all of them when fewer)
VOTE_K_MIN = 32               # neighbours per voting frame (at least 4k)
CENTRE = 0.8                  # share of the query's mean frame taken out of each probe
CENTRE_MIN_FRAMES = 16        # shorter queries probe with their frames as given
RESCORE_MIN = 64              # best-voted starts scored in full (at least 8k), plus neighbours of the best
SEARCH_THREADS = 2            # the probes' searches run on this many threads (GIL released)


def choose_anchors(n_frames: int, max_anchors: int = VOTERS) -> np.ndarray:
    a = min(n_frames, max_anchors)
    return np.unique(np.linspace(0, n_frames - 1, a).round().astype(np.int64))


def probes(frames: np.ndarray) -> np.ndarray:
    """The frames the neighbour searches use (see the module docstring, step 1)."""
    if frames.shape[0] < CENTRE_MIN_FRAMES:
        return frames
    p = frames - CENTRE * frames.mean(axis=0, dtype=np.float64).astype(np.float32)
    norm = np.linalg.norm(p, axis=1, keepdims=True)
    return np.where(norm > 0, p / np.where(norm > 0, norm, 1), frames).astype(np.float32)


def vote(starts: np.ndarray, keep: int, spread: int) -> np.ndarray:
    """The `keep` best-voted starts (votes of s plus the better of s-1, s+1), and the two
    neighbours of the best `spread` of them; sorted, non-negative."""
    starts = starts[starts >= 0]
    if starts.shape[0] == 0:
        return starts
    u, c = np.unique(starts, return_counts=True)  # sparse: starts spread over the whole id space
    adjacent = np.diff(u) == 1
    left, right = np.zeros_like(c), np.zeros_like(c)
    left[1:][adjacent] = c[:-1][adjacent]
    right[:-1][adjacent] = c[1:][adjacent]
    score = c + np.maximum(left, right)
    order = np.lexsort((u, -score))
    best = u[order[:keep]]
    top = best[:spread]
    out = np.unique(np.concatenate((best, top - 1, top + 1)))
    return out[out >= 0]


def identify(view, frames: np.ndarray, k: int, ef: int, search_tier: str, include_metadata: bool) -> list:
    L = frames.shape[0]
    anchors = choose_anchors(L)
    probe = probes(frames)
    kk = max(4 * k, VOTE_K_MIN)
    hits = view.search_many(np.ascontiguousarray(probe[anchors]), kk, max(ef, kk), search_tier, SEARCH_THREADS)
    starts = np.concatenate([ids - o for (ids, _), o in zip(hits, anchors.tolist())])
    cand = vote(starts, max(8 * k, RESCORE_MIN), max(2 * k, 16))
    if cand.shape[0] == 0:
        return []
    scores = view.window_scores(cand, frames.reshape(-1), L, search_tier)
    valid = np.isfinite(scores)
    if not valid.any():
        return []
    cand, scores = cand[valid], scores[valid]
    order = np.lexsort((cand, -scores))[:k]
    out = []
    for start, score in zip(cand[order].tolist(), scores[order].tolist()):
        first = view.metadata(start)
        last = view.metadata(start + L - 1) if L > 1 else first
        ts, dur = _span(first, last, L)
        r = {"id": start, "start_timestamp_ms": ts, "duration_ms": dur, "score": float(np.float32(score))}
        if include_metadata and first is not None:
            r["metadata"] = first
        out.append(r)
    return out


def _span(first, last, L):
    """start time of the first frame; duration up to the end of the last frame when both frames
    carry consistent times from the same source, else the first frame's duration times L."""
    if first is None:
        return 0, 0
    ts = int(first["start_time_ms"])
    if last is not None and last["source_file"] == first["source_file"]:
        end = int(last["start_time_ms"]) + int(last["duration_ms"])
        if end >= ts and (end > ts or first["duration_ms"] == 0):
            return ts, end - ts
    return ts, min(int(first["duration_ms"]) * L, 2**63 - 1)
