"""Validate and normalise ingest input before anything is written (CONTRACT.md D3, D20).

Every error is a BadRequestError whose message names the field, the bad value and the limit.
`prepare_rows` turns API items into catalog WAL rows plus the arrays the hot tier needs.
"""
import hashlib
import math
import struct
from dataclasses import dataclass

import numpy as np
import orjson

from vibrato.config import Limits
from vibrato.errors import BadRequestError

F32_MAX = float(np.finfo(np.float32).max)
U32_MAX = 2**32 - 1
U16_MAX = 2**16 - 1  # duration_ms is a u16 in the contract, though segments store it as u32
METADATA_FIELDS = ("source_file", "start_time_ms", "duration_ms", "bpm", "tags")
FILTER_FIELDS = ("tags_any", "tags_all", "bpm_gte", "bpm_lte")
SEARCH_TIERS = ("active", "all", "archive")
_META_KEYS = frozenset(METADATA_FIELDS)
_F32 = struct.Struct("<f")


def normalize_tags(tags) -> list[str]:
    """Trim, ASCII-lowercase (other letters untouched, as in v2.1), drop empties, sort (code point
    order = UTF-8 byte order), de-duplicate (CONTRACT.md §1.3, Tags)."""
    out = set()
    for t in tags:
        t = t.strip()
        if t:
            out.add(t.lower() if t.isascii() else t.translate(_ASCII_LOWER))
    return sorted(out)


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def _utf8_len_over(s: str, limit: int) -> bool:
    # a str of n code points is at most 4n UTF-8 bytes: encode only when it could be too long
    return len(s) * 4 > limit and len(s.encode("utf-8", "surrogatepass")) > limit


def check_vector(vector, dim: int, where: str = "vector", index_word: str = "") -> np.ndarray:
    """A float32 (dim,) array from a sequence or array; finite and within float32 range."""
    try:
        arr = np.asarray(vector, dtype=np.float64) if not (
            isinstance(vector, np.ndarray) and vector.dtype == np.float32) else vector
    except (TypeError, ValueError):
        raise BadRequestError(f"{where} must be an array of numbers") from None
    if arr.ndim != 1:
        raise BadRequestError(f"{where} must be a flat array of numbers")
    if arr.shape[0] != dim:
        raise BadRequestError(f"dimension mismatch{index_word}: expected {dim}, got {arr.shape[0]}")
    if arr.dtype != np.float32:
        bad = ~np.isfinite(arr) | (np.abs(arr) > F32_MAX)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise BadRequestError(f"{where}[{j}] is not a finite float32 value ({arr[j]!r})")
        arr = arr.astype(np.float32)
    else:
        bad = ~np.isfinite(arr)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise BadRequestError(f"{where}[{j}] is not a finite float32 value ({arr[j]!r})")
    return np.ascontiguousarray(arr)


def check_metadata(meta, limits: Limits, where: str = "metadata") -> tuple:
    """(source_file, start_time_ms, duration_ms, bpm, tags) with defaults filled in."""
    if meta is None:
        return ("", 0, 0, 0.0, [])
    if not isinstance(meta, dict):
        raise BadRequestError(f"{where} must be an object")
    if not _META_KEYS.issuperset(meta):
        unknown = next(k for k in meta if k not in _META_KEYS)
        raise BadRequestError(f"{where}.{unknown} is not a known field (expected one of {', '.join(METADATA_FIELDS)})")
    src = meta.get("source_file", "")
    if not isinstance(src, str):
        raise BadRequestError(f"{where}.source_file must be a string")
    if _utf8_len_over(src, limits.max_source_file_bytes):
        raise BadRequestError(f"{where}.source_file is longer than {limits.max_source_file_bytes} bytes")
    start = _uint(meta.get("start_time_ms", 0), f"{where}.start_time_ms")
    dur = _uint(meta.get("duration_ms", 0), f"{where}.duration_ms", U16_MAX)
    bpm = meta.get("bpm", 0.0)
    if isinstance(bpm, bool) or not isinstance(bpm, (int, float)):
        raise BadRequestError(f"{where}.bpm must be a number")
    bpm = float(bpm)
    if not math.isfinite(bpm) or abs(bpm) > F32_MAX:
        raise BadRequestError(f"{where}.bpm must be a finite float32 value, got {bpm!r}")
    bpm = _F32.unpack(_F32.pack(bpm))[0]  # round to float32, as stored
    tags = meta.get("tags", [])
    tags = [] if isinstance(tags, list) and not tags else check_tags(tags, limits, f"{where}.tags")
    return (src, start, dur, bpm, tags)


def check_tags(tags, limits: Limits, where: str) -> list[str]:
    if not isinstance(tags, (list, tuple)):
        raise BadRequestError(f"{where} must be an array of strings")
    if len(tags) > limits.max_tags:
        raise BadRequestError(f"{where} has {len(tags)} tags; the limit is {limits.max_tags}")
    for i, t in enumerate(tags):
        if not isinstance(t, str):
            raise BadRequestError(f"{where}[{i}] must be a string")
        if _utf8_len_over(t, limits.max_tag_bytes):
            raise BadRequestError(f"{where}[{i}] is longer than {limits.max_tag_bytes} bytes")
    return normalize_tags(tags)


def _uint(value, where, maximum=U32_MAX):
    if type(value) is int and 0 <= value <= maximum:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise BadRequestError(f"{where} must be an integer")
    if not 0 <= value <= maximum:
        raise BadRequestError(f"{where} must be between 0 and {maximum}, got {value}")
    return int(value)


def check_key(key, limits: Limits, where: str = "idempotency_key"):
    if key is None:
        return None
    if not isinstance(key, str):
        raise BadRequestError(f"{where} must be a string")
    key = key.strip()
    if not key:
        return None
    if len(key.encode("utf-8", "surrogatepass")) > limits.max_idempotency_key_bytes:
        raise BadRequestError(f"{where} is longer than {limits.max_idempotency_key_bytes} bytes")
    return key


@dataclass
class PreparedBatch:
    """Validated ingest input: catalog rows plus the columns the hot tier appends."""
    rows: list            # catalog.wal rows, see vibrato.catalog.wal.ROW_*
    vectors: np.ndarray   # (n, dim) float32
    metas: list           # [(source_file, start_time_ms, duration_ms, bpm, tags)]


def _stack_vectors(items, dim: int, batch: bool) -> np.ndarray:
    """(n, dim) float32 of every item's vector. Fast path: every vector is already a float32 (dim,)
    array (the server decodes JSON that way), checked for finiteness in one pass."""
    n = len(items)
    try:
        vecs = [item["vector"] for item in items]
    except (TypeError, KeyError):
        vecs = None
    if vecs is not None and all(isinstance(v, np.ndarray) and v.dtype == np.float32 and v.shape == (dim,)
                                for v in vecs):
        out = np.stack(vecs) if n else np.empty((0, dim), np.float32)
        bad = ~np.isfinite(out)
        if bad.any():
            i, j = (int(x) for x in np.argwhere(bad)[0])
            where = f"vectors[{i}].vector" if batch else "vector"
            raise BadRequestError(f"{where}[{j}] is not a finite float32 value ({out[i, j]!r})")
        return out
    out = np.empty((n, dim), dtype=np.float32)
    for i, item in enumerate(items):
        pre = f"vectors[{i}]." if batch else ""
        if not isinstance(item, dict):
            raise BadRequestError(f"vectors[{i}] must be an object")
        if "vector" not in item:
            raise BadRequestError(f"{pre}vector is required")
        out[i] = check_vector(item["vector"], dim, f"{pre}vector", f" at index {i}" if batch else "")
    return out


_ITEM_FIELDS = frozenset(("vector", "metadata", "idempotency_key"))
_DEFAULT_META = ("", 0, 0, 0.0, [])


def prepare_rows(items, dim: int, limits: Limits, batch: bool) -> PreparedBatch:
    vectors = _stack_vectors(items, dim, batch)
    rows, metas = [], []
    for i, item in enumerate(items):
        pre = f"vectors[{i}]." if batch else ""
        if not isinstance(item, dict):
            raise BadRequestError(f"vectors[{i}] must be an object")
        if not _ITEM_FIELDS.issuperset(item):
            unknown = next(k for k in item if k not in _ITEM_FIELDS)
            raise BadRequestError(f"{pre}{unknown} is not a known field")
        meta_in = item.get("metadata")
        meta = _DEFAULT_META if meta_in is None else check_metadata(meta_in, limits, f"{pre}metadata")
        key = check_key(item.get("idempotency_key"), limits, f"{pre}idempotency_key")
        blob = vectors[i].tobytes()  # float32 little-endian on every supported host
        tags_json = orjson.dumps(meta[4]).decode()
        digest = hashlib.sha256(blob)
        digest.update(f"{meta[0]}\x00{meta[1]}\x00{meta[2]}\x00{meta[3]!r}\x00{tags_json}".encode("utf-8", "surrogatepass"))
        rows.append((blob, meta[0], meta[1], meta[2], meta[3], tags_json, key, digest.digest()))
        metas.append(meta)
    return PreparedBatch(rows, vectors, metas)


def check_filter(flt, limits: Limits):
    """Normalised (tags_any, tags_all, bpm_gte, bpm_lte), or None when no clause filters anything."""
    if flt is None:
        return None
    if not isinstance(flt, dict):
        raise BadRequestError("filter must be an object")
    unknown = [k for k in flt if k not in FILTER_FIELDS]
    if unknown:
        raise BadRequestError(f"filter.{unknown[0]} is not a known filter clause (expected one of "
                              f"{', '.join(FILTER_FIELDS)})")
    any_ = check_tags(flt.get("tags_any") or [], limits, "filter.tags_any")
    all_ = check_tags(flt.get("tags_all") or [], limits, "filter.tags_all")
    lo, hi = flt.get("bpm_gte"), flt.get("bpm_lte")
    for name, v in (("bpm_gte", lo), ("bpm_lte", hi)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or abs(v) > F32_MAX):
            raise BadRequestError(f"filter.{name} must be a finite float32 value, got {v!r}")
    lo = None if lo is None else float(np.float32(lo))
    hi = None if hi is None else float(np.float32(hi))
    if lo is not None and hi is not None and lo > hi:
        raise BadRequestError(f"filter.bpm_gte ({lo:g}) must be <= filter.bpm_lte ({hi:g})")
    # tags_any/tags_all given but normalising to nothing still filter (to the empty set)
    has_any = "tags_any" in flt and flt.get("tags_any")
    has_all = "tags_all" in flt and flt.get("tags_all")
    if not has_any and not has_all and lo is None and hi is None:
        return None
    return (any_ if has_any else None, all_ if has_all else None, lo, hi)


def check_search(k, ef, search_tier, limits: Limits):
    for name, v, cap in (("k", k, limits.max_k), ("ef", ef, limits.max_ef)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise BadRequestError(f"{name} must be a non-negative integer, got {v!r}")
        if v > cap:
            raise BadRequestError(f"{name} = {v} exceeds the limit of {cap}")
    if search_tier not in SEARCH_TIERS:
        raise BadRequestError(f"search_tier must be one of {', '.join(SEARCH_TIERS)}, got {search_tier!r}")
