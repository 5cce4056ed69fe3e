"""Identify: find where a sequence of query frames occurs in the stored frames (subsequence search).

Frames of a track are ingested consecutively, so frame i of a match starting at id s is id s + i.
Across every searched tier (ids are dense across tiers, so a match may span hot tier and segments,
CONTRACT.md D1):
  1. anchors: a few frames spread evenly over the query (norm salience is meaningless for unit
     vectors, so spacing is what matters);
  2. each anchor's nearest neighbours give candidate starts s = hit - anchor_offset;
  3. a cheap pre-score of every candidate on the anchor frames only keeps the most promising ones;
  4. each surviving window s .. s+L-1 is gathered by id; a window with a missing, tombstoned or
     replayed-away id is rejected (the hole guard), the rest are scored exactly as the mean per-frame
     inner product, and the top k returned.
On the audio set (100 noisy 75-frame queries over 41k frames) 8 anchors x 32 neighbours find the
right track and start frame for all queries; fewer anchors start to miss.
"""
import numpy as np

from vibrato import kernels

MAX_ANCHORS = 8
ANCHOR_K_MIN = 32
RESCORE_MIN = 64              # windows scored in full after the anchor pre-score (at least 8k)
WINDOW_BUDGET_ROWS = 1 << 19  # gather at most this many rows per scoring block


def choose_anchors(n_frames: int, max_anchors: int = MAX_ANCHORS) -> np.ndarray:
    a = min(n_frames, max_anchors)
    return np.unique(np.linspace(0, n_frames - 1, a).round().astype(np.int64))


def identify(view, frames: np.ndarray, k: int, ef: int, search_tier: str, include_metadata: bool) -> list:
    L = frames.shape[0]
    anchors = choose_anchors(L)
    kk = max(4 * k, ANCHOR_K_MIN)
    starts = []
    for o in anchors.tolist():
        ids, _ = view.search(frames[o], kk, max(ef, kk), None, search_tier)
        s = ids - o
        starts.append(s[s >= 0])
    if not starts:
        return []
    cand = np.unique(np.concatenate(starts))
    if cand.shape[0] == 0:
        return []
    keep = max(8 * k, RESCORE_MIN)
    if cand.shape[0] > keep:
        cand = _prescore(view, frames, anchors, cand, search_tier, keep)
    scores = np.full(cand.shape[0], -np.inf, dtype=np.float64)
    offsets = np.arange(L, dtype=np.int64)
    flat_query = frames.reshape(-1)
    block = max(1, WINDOW_BUDGET_ROWS // L)
    for b in range(0, cand.shape[0], block):
        c = cand[b:b + block]
        win = (c[:, None] + offsets[None, :]).reshape(-1)
        vecs, found = view.vectors_for(win, search_tier)
        ok = found.reshape(c.shape[0], L).all(axis=1)
        if not ok.any():
            continue
        v = vecs.reshape(c.shape[0], L * frames.shape[1])[ok]
        scores[np.flatnonzero(ok) + b] = kernels.dot_many(flat_query, v, threads=1) / L
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


def _prescore(view, frames, anchors, cand, search_tier, keep):
    """The `keep` candidates with the best mean score over the anchor frames (windows with a hole on
    an anchor frame drop out here already)."""
    ids = (cand[:, None] + anchors[None, :]).reshape(-1)
    vecs, found = view.vectors_for(ids, search_tier)
    d = frames.shape[1]
    part = np.einsum("cad,ad->c", vecs.reshape(cand.shape[0], anchors.shape[0], d), frames[anchors])
    part[~found.reshape(cand.shape[0], anchors.shape[0]).all(axis=1)] = -np.inf
    top = np.argpartition(-part, keep - 1)[:keep]
    return np.sort(cand[top])


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
