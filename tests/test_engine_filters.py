"""FilterIndex against a brute-force model: tags_any / tags_all / bpm ranges over ids appended by
ingest (add_rows) and by segment columns (add_columns), with ids killed by replay, across the
switch of frequent tags from posting lists to bitmaps and the capacity growth of those bitmaps."""
import numpy as np
from hypothesis import given, settings, strategies as st

from vibrato.engine.filters import PENDING_FLUSH, FilterIndex

TAGS = ["kick", "snare", "pad", "fx", "rare"]


def model_mask(rows, live, flt):
    tags_any, tags_all, lo, hi = flt
    out = np.zeros(len(rows), dtype=bool)
    for i, (bpm, tags) in enumerate(rows):
        ok = live[i]
        if tags_all is not None:
            ok = ok and bool(tags_all) and all(t in tags for t in tags_all)
        if tags_any is not None:
            ok = ok and any(t in tags for t in tags_any)
        if lo is not None:
            ok = ok and bpm >= lo
        if hi is not None:
            ok = ok and bpm <= hi
        out[i] = ok
    return out


def random_rows(rng, n, weights):
    rows = []
    for _ in range(n):
        tags = [t for t, w in zip(TAGS, weights) if rng.random() < w]
        rows.append((float(rng.integers(60, 180)), tags))
    return rows


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), capacity=st.sampled_from([16, 64, 1024]),
       batches=st.lists(st.tuples(st.booleans(), st.integers(1, 300)), min_size=1, max_size=8))
def test_filters_match_model(seed, capacity, batches):
    rng = np.random.default_rng(seed)
    weights = [0.9, 0.5, 0.1, 0.02, 0.001]  # dense ... sparse tags
    index, rows, live = FilterIndex(capacity=capacity), [], []
    for from_segment, n in batches:
        new = random_rows(rng, n, weights)
        start = len(rows)
        if from_segment:
            seg_live = rng.random(n) > 0.1
            dict_ = sorted({t for _, tags in new for t in tags})
            offsets, tag_ids = [0], []
            for _, tags in new:
                tag_ids += [dict_.index(t) for t in tags]
                offsets.append(len(tag_ids))
            index.add_columns(start, seg_live, np.array([b for b, _ in new], np.float32), dict_,
                              np.array(offsets, np.int64), np.array(tag_ids, np.int64))
            live += seg_live.tolist()
        else:
            index.add_rows(np.arange(start, start + n, dtype=np.int64),
                           np.array([b for b, _ in new], np.float32), [tags for _, tags in new])
            live += [True] * n
        rows += new
        if rng.random() < 0.3 and len(rows) > 2:  # replay-to-lsn kills a range
            lo = int(rng.integers(0, len(rows)))
            hi = int(rng.integers(lo, len(rows)))
            index.kill_range(lo, hi)
            live[lo:hi + 1] = [False] * (hi + 1 - lo)
        for flt in ((["kick"], None, None, None), (None, ["kick", "snare"], None, None),
                    (["rare", "fx"], None, 100.0, None), (None, ["pad"], None, 120.0),
                    (["missing"], None, None, None), (None, [], None, None), (None, None, 90.0, 150.0),
                    ([], None, None, None), (["fx", "kick"], ["rare"], None, None),
                    (["pad", "rare"], ["kick", "fx"], 80.0, 170.0), (None, ["missing", "kick"], None, None)):
            allowed = index.evaluate(flt)
            got = allowed.to_mask()
            assert got.shape == (len(rows),) and allowed.n == len(rows)
            want = model_mask(rows, live, flt)
            np.testing.assert_array_equal(got, want, err_msg=str(flt))
            assert allowed.count == int(want.sum())
            if allowed.sparse:  # sorted, unique, in range
                assert (np.diff(allowed.ids) > 0).all() and (allowed.ids < len(rows)).all()
            lo, hi = sorted(int(x) for x in rng.integers(-2, len(rows) + 3, 2))
            np.testing.assert_array_equal(allowed.ids_in(lo, hi), np.flatnonzero(want) [
                (np.flatnonzero(want) >= lo) & (np.flatnonzero(want) < hi)])
            padded = np.concatenate([np.zeros(2, bool), want, np.zeros(3, bool)])
            np.testing.assert_array_equal(allowed.mask_in(lo, hi), padded[lo + 2:hi + 2])
            for _ in range(2):  # computed, then remembered
                assert allowed.count_in(lo, hi) == int(padded[lo + 2:hi + 2].sum())
            assert index.evaluate(flt) is allowed  # remembered until the index changes


def test_evaluations_are_remembered_only_while_the_index_is_unchanged():
    """A repeated filter reuses its evaluation; every kind of change (rows appended, a segment's
    columns, a delete, a replay's range kill) makes the next evaluation see it."""
    index = FilterIndex(capacity=64)
    index.add_rows(np.arange(10, dtype=np.int64), np.full(10, 120.0, np.float32), [["a"]] * 10)
    flt = (["a"], None, None, None)
    first = index.evaluate(flt)
    assert index.evaluate(flt) is first and first.count == 10
    index.add_rows(np.arange(10, 12, dtype=np.int64), np.full(2, 120.0, np.float32), [["a"], ["b"]])
    after_append = index.evaluate(flt)
    assert after_append is not first and after_append.count == 11
    index.add_columns(12, np.ones(3, bool), np.full(3, 90.0, np.float32), ["a"],
                      np.array([0, 1, 2, 3], np.int64), np.array([0, 0, 0], np.int64))
    assert index.evaluate(flt).count == 14
    index.kill_ids(np.array([0, 1], np.int64))
    assert index.evaluate(flt).count == 12
    index.kill_range(12, 14)
    assert index.evaluate(flt).to_mask().tolist() == [False] * 2 + [True] * 9 + [False] * 4
    assert index.evaluate((["a"], None, None, 100.0)).count == 0  # another key, evaluated afresh


def test_frequent_tag_becomes_a_bitmap_and_rare_tag_stays_a_posting_list():
    index = FilterIndex(capacity=1024)
    n = 4 * PENDING_FLUSH
    ids = np.arange(n, dtype=np.int64)
    tags = [["all"] + (["rare"] if i % 1000 == 0 else []) for i in range(n)]
    index.add_rows(ids, np.full(n, 120.0, np.float32), tags)
    assert index.evaluate((["all"], None, None, None)).to_mask().all()
    rare = index.evaluate((["rare"], None, None, None))
    assert rare.sparse and rare.ids.tolist() == list(range(0, n, 1000))
    assert "all" in index._dense and "rare" not in index._dense
    assert index._dense["all"].nbytes * 8 >= n  # one bit per id, not 8 bytes


def test_selective_tag_filters_are_answered_from_posting_lists(monkeypatch):
    """A filter on a rare tag (alone, with a frequent tag, with bpm) never scans the id space."""
    index = FilterIndex(capacity=1024)
    n = 20 * PENDING_FLUSH
    tags = [["all"] + (["rare"] if i % 997 == 0 else []) for i in range(n)]
    index.add_rows(np.arange(n, dtype=np.int64), (60 + np.arange(n) % 100).astype(np.float32), tags)

    def no_scan(*a, **kw):
        raise AssertionError("the id space was scanned")
    monkeypatch.setattr(index, "_tag_mask", no_scan)
    want = [i for i in range(0, n, 997)]
    for flt, ids in (((["rare"], None, None, None), want), ((None, ["all", "rare"], None, None), want),
                     ((None, ["rare"], 100.0, 120.0), [i for i in want if 100 <= 60 + i % 100 <= 120]),
                     ((["rare", "missing"], ["all"], None, None), want)):
        allowed = index.evaluate(flt)
        assert allowed.sparse and allowed.ids.tolist() == ids, flt


def test_unsorted_posting_parts_are_merged_in_id_order():
    """Segments loaded after newer rows (or out of id order) still give sorted ids."""
    index = FilterIndex(capacity=1 << 16)
    index.add_rows(np.arange(500, 600, dtype=np.int64), np.zeros(100, np.float32), [["t"]] * 100)
    index.evaluate((None, ["t"], None, None))  # flushes the pending ids into a posting part
    index.add_columns(0, np.ones(100, bool), np.zeros(100, np.float32), ["t"], np.arange(101, dtype=np.int64),
                      np.zeros(100, np.int64))
    allowed = index.evaluate((None, ["t"], None, None))
    assert allowed.sparse and allowed.ids.tolist() == list(range(100)) + list(range(500, 600))
