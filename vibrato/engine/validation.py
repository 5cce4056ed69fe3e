"""The input rules, in one place (CONTRACT.md §1.3, §2, D3, D6, D20, D27).

Limits, dimension, finiteness, bpm order, NUL rejection and normalisation are decided here, for both
ways in:
  * HTTP: vibrato/server/schemas.py maps JSON shape to typed values (its own 422s) and calls the rule
    functions below for the values (400s), at the points where it meets them;
  * embedded callers of `Engine` pass Python values: `check_*` / `prepare_rows` type-check them (400;
    there is no 422 outside HTTP) and apply the same rules, with the same messages.

Every error is a BadRequestError whose message names the field, the bad value and the limit (and
the flag that raises it). What comes out is trusted downstream and passes the engine's checks
unchanged: vectors are read-only `FiniteArray`s (native code skips its finiteness re-check), a
filter is a `QueryFilter`, ingest input a `PreparedBatch` (catalog WAL rows with payload digests).
"""
import hashlib
import math
import struct
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import orjson

from vibrato._native.rows import float32_rows  # noqa: F401 - re-exported: JSON rows -> float32 (server/schemas.py)
from vibrato.config import Limits
from vibrato.errors import BadRequestError
from vibrato.index import FiniteArray, first_nonfinite

_F32_INF_AT = 2.0**128 - 2.0**103  # halfway from float32's largest finite value to 2**128: beyond it, ±inf
U16_MAX = 2**16 - 1  # duration_ms is a u16 in the contract, though segments store it as u32
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
METADATA_FIELDS = ("source_file", "start_time_ms", "duration_ms", "bpm", "tags")
FILTER_FIELDS = ("tags_any", "tags_all", "bpm_gte", "bpm_lte")
ITEM_FIELDS = ("vector", "metadata", "idempotency_key")
SEARCH_TIERS = ("active", "all", "archive")
DEFAULT_META = ("", 0, 0, 0.0, [])
_F32 = struct.Struct("<f")


# ---------------------------------------------------------------------------- rules on typed values
def flag(attr: str) -> str:
    """The serve-v2 flag that sets Limits.<attr> (max_k -> --max-k)."""
    return "--" + attr.replace("_", "-")


def check_limit(path: str, value: int, limits: Limits, attr: str) -> int:
    lim = getattr(limits, attr)
    if value > lim:
        raise BadRequestError(f"{path}={value} exceeds the limit of {lim} ({flag(attr)})")
    return value


def check_count(path: str, n: int, limits: Limits, attr: str, noun: str = "items"):
    lim = getattr(limits, attr)
    if n > lim:
        raise BadRequestError(f"{path} has {n} {noun}, exceeding the limit of {lim} ({flag(attr)})")


def check_text(value: str, path: str, limits: Limits, attr: str | None) -> str:
    """No NUL in any string (CONTRACT.md §2); at most Limits.<attr> UTF-8 bytes."""
    if "\x00" in value:
        raise BadRequestError(f"{path} contains a NUL character")
    if attr is not None:
        lim = getattr(limits, attr)
        if len(value) * 4 > lim:  # at most 4 bytes per code point: encode only when it could be too long
            n = len(value.encode("utf-8", "surrogatepass"))
            if n > lim:
                raise BadRequestError(f"{path} is {n} bytes, exceeding the limit of {lim} bytes ({flag(attr)})")
    return value


def not_finite(path: str, value) -> BadRequestError:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return BadRequestError(f"{path} is not finite: {value!r}")
    return BadRequestError(f"{path} is not finite: {value!r} is outside the float32 range")


def check_f32(value, path: str) -> float:
    """A number (int or float) that stays finite when narrowed to float32 (CONTRACT.md D3), as a float
    (not yet narrowed)."""
    try:
        f = float(value)
    except OverflowError:  # an int beyond float64 range
        raise not_finite(path, value) from None
    if not abs(f) < _F32_INF_AT:  # NaN compares false too
        raise not_finite(path, value)
    return f


def check_bpm_order(lo, hi):
    if lo is not None and hi is not None and lo > hi:
        raise BadRequestError(f"filter.bpm_gte ({lo!r}) must not be greater than filter.bpm_lte ({hi!r})")


# ---------------------------------------------------------------------------- vectors
# Three shapes of vector input, each with its own paths in messages:
#   VECTOR: ingest/query `vector`; BATCH: `vectors[i].vector`; FRAMES: identify `vectors[i]`.
VECTOR, BATCH, FRAMES = "vector", "batch", "frames"


def element_path(kind: str, i: int) -> str:
    return "vector" if kind == VECTOR else f"vectors[{i}].vector" if kind == BATCH else f"vectors[{i}]"


def dim_mismatch(kind: str, i: int, dim: int, n: int) -> BadRequestError:
    at = "" if kind == VECTOR else f" at index {i}" if kind == BATCH else f" at vectors[{i}]"
    return BadRequestError(f"dimension mismatch{at}: expected {dim}, got {n}")


def finite_rows(out: np.ndarray, kind: str, raw, first: int = 0) -> FiniteArray:
    """out: C-contiguous float32 (n, dim) made from raw (rows as given, for the message). Marked
    finite and read-only, or 400 naming the first element that is not finite."""
    bad = first_nonfinite(out)
    if bad >= 0:
        i, j = divmod(bad, out.shape[-1])
        raise not_finite(f"{element_path(kind, first + i)}[{j}]", raw[i][j])
    return _mark(out)


def _mark(out: np.ndarray) -> FiniteArray:
    out = out.view(FiniteArray)
    out.flags.writeable = False
    return out


def check_vector(vector, dim: int, kind: str = VECTOR, i: int = 0) -> FiniteArray:
    """A finite float32 (dim,) vector from a sequence or an array (a FiniteArray passes as it is)."""
    if type(vector) is FiniteArray and vector.shape == (dim,):
        return vector
    path = element_path(kind, i)
    try:
        arr = vector if isinstance(vector, np.ndarray) and vector.dtype == np.float32 else \
            np.asarray(vector, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise BadRequestError(f"{path} must be an array of numbers") from None
    if arr.ndim != 1:
        raise BadRequestError(f"{path} must be a flat array of numbers")
    if arr.shape[0] != dim:
        raise dim_mismatch(kind, i, dim, arr.shape[0])
    if arr.dtype == np.float32:
        out = arr.reshape(1, dim).copy()  # a copy the caller cannot change after the check
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            out = arr.astype(np.float32).reshape(1, dim)
    return finite_rows(out, kind, arr.reshape(1, dim), i)[0]


def _stack_vectors(items, dim: int, kind: str) -> FiniteArray:
    """(n, dim) float32 of every item's vector. Fast path: every vector is already a float32 (dim,)
    array, checked for finiteness in one pass."""
    n = len(items)
    try:
        vecs = [item["vector"] for item in items]
    except (TypeError, KeyError):
        vecs = None
    if vecs is not None and all(isinstance(v, np.ndarray) and v.dtype == np.float32 and v.shape == (dim,)
                                for v in vecs):
        out = np.stack(vecs) if n else np.empty((0, dim), np.float32)
        return finite_rows(out, kind, out)
    out = np.empty((n, dim), dtype=np.float32)
    for i, item in enumerate(items):
        pre = f"vectors[{i}]." if kind == BATCH else ""
        if not isinstance(item, dict):
            raise BadRequestError(f"vectors[{i}] must be an object")
        if "vector" not in item:
            raise BadRequestError(f"{pre}vector is required")
        out[i] = check_vector(item["vector"], dim, kind, i)
    return _mark(out)


# ---------------------------------------------------------------------------- normalisation
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


def make_meta(source_file: str, start_time_ms: int, duration_ms: int, bpm: float, tags: list) -> tuple:
    """Checked metadata values in their stored form: bpm rounded to float32, tags normalised."""
    return (source_file, start_time_ms, duration_ms, _F32.unpack(_F32.pack(bpm))[0],
            normalize_tags(tags) if tags else [])


def key_value(key):
    """An idempotency key (already checked as text) trimmed; blank means none (CONTRACT.md §1.3)."""
    if key is None:
        return None
    return key.strip() or None


class QueryFilter(NamedTuple):
    """A normalised filter: None for a clause that does not filter; bpm bounds narrowed to float32."""
    tags_any: list | None
    tags_all: list | None
    bpm_gte: float | None
    bpm_lte: float | None


def make_filter(tags_any, tags_all, bpm_gte, bpm_lte) -> QueryFilter | None:
    """From checked clause values (tags as given, bounds checked finite). A tags clause given with tags
    filters even when normalising leaves none (to the empty set); None when nothing filters."""
    check_bpm_order(bpm_gte, bpm_lte)
    if not tags_any and not tags_all and bpm_gte is None and bpm_lte is None:
        return None
    return QueryFilter(normalize_tags(tags_any) if tags_any else None,
                       normalize_tags(tags_all) if tags_all else None,
                       None if bpm_gte is None else float(np.float32(bpm_gte)),
                       None if bpm_lte is None else float(np.float32(bpm_lte)))


class DeleteRequest(NamedTuple):
    """A checked delete: exactly one of `ids` (sorted unique int64) or a filter, which is the query's
    (`flt`, may be None) plus `source_files` (None: any)."""
    ids: np.ndarray | None
    flt: QueryFilter | None
    source_files: list | None


def check_delete(ids, flt, limits: Limits) -> DeleteRequest:
    """Exactly one of ids / filter (CONTRACT.md D40). A filter must name at least one condition: an
    empty one would delete everything, which is never what a takedown means."""
    if (ids is None) == (flt is None):
        raise BadRequestError("give exactly one of ids or filter")
    if ids is not None:
        if isinstance(ids, (str, bytes, dict)) or not hasattr(ids, "__len__"):
            raise BadRequestError("ids must be an array of vector ids")
        check_count("ids", len(ids), limits, "max_delete_ids", "ids")
        for i, v in enumerate(ids):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= U64_MAX:
                raise BadRequestError(f"ids[{i}] must be a non-negative integer, got {v!r}")
        # ids at or past 2**63 cannot exist (ids are dense from 0): they simply match nothing
        out = np.unique(np.array([int(v) for v in ids if v < 2**63], dtype=np.int64))
        return DeleteRequest(out, None, None)
    if not isinstance(flt, dict):
        raise BadRequestError("filter must be an object")
    rest = {k: v for k, v in flt.items() if k != "source_file"}
    sources = None
    if "source_file" in flt:
        raw = flt["source_file"]
        names = [raw] if isinstance(raw, str) else raw
        if not isinstance(names, list) or not names:
            raise BadRequestError("filter.source_file must be a name or a non-empty array of names")
        check_count("filter.source_file", len(names), limits, "max_delete_source_files", "names")
        for i, name in enumerate(names):
            where = "filter.source_file" if isinstance(raw, str) else f"filter.source_file[{i}]"
            if not isinstance(name, str):
                raise BadRequestError(f"{where} must be a string")
            check_text(name, where, limits, "max_source_file_bytes")
        sources = sorted(set(names))
    query_filter = check_filter(rest, limits)
    if sources is None and query_filter is None:
        raise BadRequestError("filter must have at least one condition (source_file, tags_any, tags_all, "
                              "bpm_gte or bpm_lte)")
    return DeleteRequest(None, query_filter, sources)


# ---------------------------------------------------------------------------- ingest rows
@dataclass
class PreparedBatch:
    """Validated ingest input: catalog rows plus the columns the hot tier appends."""
    rows: list            # catalog.wal rows, see vibrato.catalog.wal.ROW_*
    vectors: np.ndarray   # (n, dim) float32, a FiniteArray
    metas: list           # [(source_file, start_time_ms, duration_ms, bpm, tags)]


DIGEST_VERSION = b"\x01"
_DIGEST_HEAD = struct.Struct("<QQQQdQ")


def payload_digest(blob: bytes, meta: tuple, tags_json: bytes) -> bytes:
    """Version byte + SHA-256 of one normalised payload (CONTRACT.md D27). A fixed-size head carries the
    numbers and the byte length of each variable field (vector, source_file, tags), so two different
    payloads never hash the same bytes."""
    src = meta[0].encode("utf-8", "surrogatepass")
    h = hashlib.sha256(_DIGEST_HEAD.pack(len(blob), len(src), meta[1], meta[2], meta[3], len(tags_json)))
    h.update(blob)
    h.update(src)
    h.update(tags_json)
    return DIGEST_VERSION + h.digest()


def prepare_checked(vectors: FiniteArray, metas: list, keys: list) -> PreparedBatch:
    """Catalog rows from checked, normalised values (vectors from `finite_rows`, metas from `make_meta`,
    keys from `key_value`)."""
    rows = []
    width = vectors.shape[1] * 4
    blobs = vectors.tobytes()  # float32 little-endian on every supported host
    for i, (meta, key) in enumerate(zip(metas, keys)):
        blob = blobs[i * width:(i + 1) * width]
        tags_json = orjson.dumps(meta[4])
        rows.append((blob, meta[0], meta[1], meta[2], meta[3], tags_json.decode(), key,
                     payload_digest(blob, meta, tags_json)))
    return PreparedBatch(rows, vectors, metas)


# ---------------------------------------------------------------------------- Python values (Engine)
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


def _number(value, where) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise BadRequestError(f"{where} must be a number")
    return check_f32(value, where)


def _text(value, where, limits, attr) -> str:
    if not isinstance(value, str):
        raise BadRequestError(f"{where} must be a string")
    return check_text(value, where, limits, attr)


def check_tags(tags, limits: Limits, where: str) -> list:
    """Checked tags, as given (normalising is `make_meta`'s / `make_filter`'s)."""
    if not isinstance(tags, (list, tuple)):
        raise BadRequestError(f"{where} must be an array of strings")
    check_count(where, len(tags), limits, "max_tags", "tags")
    for i, t in enumerate(tags):
        _text(t, f"{where}[{i}]", limits, "max_tag_bytes")
    return tags


def check_metadata(meta, limits: Limits, where: str = "metadata") -> tuple:
    """(source_file, start_time_ms, duration_ms, bpm, tags), defaults filled in, normalised."""
    if meta is None:
        return DEFAULT_META
    if not isinstance(meta, dict):
        raise BadRequestError(f"{where} must be an object")
    for k in meta:
        if k not in METADATA_FIELDS:
            raise BadRequestError(f"{where}.{k} is not a known field (expected one of {', '.join(METADATA_FIELDS)})")
    # Fast path: every value well-typed and inside its limit (no error path is built); anything else
    # goes through the per-field checks below, which name the field and the limit.
    src, start = meta.get("source_file", ""), meta.get("start_time_ms", 0)
    dur, bpm, tags = meta.get("duration_ms", 0), meta.get("bpm", 0.0), meta.get("tags", [])
    if (type(src) is str and len(src) * 4 <= limits.max_source_file_bytes and "\x00" not in src
            and type(start) is int and 0 <= start <= U32_MAX and type(dur) is int and 0 <= dur <= U16_MAX
            and (type(bpm) is float or type(bpm) is int) and abs(bpm) < _F32_INF_AT
            and type(tags) is list and len(tags) <= limits.max_tags
            and all(type(t) is str and len(t) * 4 <= limits.max_tag_bytes and "\x00" not in t for t in tags)):
        return make_meta(src, start, dur, float(bpm), tags)
    return make_meta(_text(meta.get("source_file", ""), f"{where}.source_file", limits, "max_source_file_bytes"),
                     _uint(meta.get("start_time_ms", 0), f"{where}.start_time_ms"),
                     _uint(meta.get("duration_ms", 0), f"{where}.duration_ms", U16_MAX),
                     _number(meta.get("bpm", 0.0), f"{where}.bpm"),
                     check_tags(meta.get("tags", []), limits, f"{where}.tags"))


def check_key(key, limits: Limits, where: str = "idempotency_key"):
    if key is None:
        return None
    return key_value(_text(key, where, limits, "max_idempotency_key_bytes"))


def prepare_rows(items, dim: int, limits: Limits, batch: bool = True) -> PreparedBatch:
    """Ingest items ({"vector", "metadata"?, "idempotency_key"?}) as catalog rows; a PreparedBatch (the
    server's, already checked) passes as it is. batch: the items are `vectors` of a batch call (the
    array and its length are checked, messages say `vectors[i]`)."""
    if type(items) is PreparedBatch:
        return items
    if batch:
        if not isinstance(items, (list, tuple)):
            raise BadRequestError("vectors must be an array")
        check_count("vectors", len(items), limits, "max_batch")
    vectors = _stack_vectors(items, dim, BATCH if batch else VECTOR)
    metas, keys = [], []
    for i, item in enumerate(items):
        pre = f"vectors[{i}]." if batch else ""
        if not isinstance(item, dict):
            raise BadRequestError(f"vectors[{i}] must be an object")
        for k in item:
            if k not in ITEM_FIELDS:
                raise BadRequestError(f"{pre}{k} is not a known field")
        meta = item.get("metadata")
        metas.append(DEFAULT_META if meta is None else check_metadata(meta, limits, f"{pre}metadata"))
        keys.append(check_key(item.get("idempotency_key"), limits, f"{pre}idempotency_key"))
    return prepare_checked(vectors, metas, keys)


def check_filter(flt, limits: Limits) -> QueryFilter | None:
    """A normalised filter (a QueryFilter passes as it is), or None when no clause filters anything."""
    if flt is None or type(flt) is QueryFilter:
        return flt
    if not isinstance(flt, dict):
        raise BadRequestError("filter must be an object")
    for k in flt:
        if k not in FILTER_FIELDS:
            raise BadRequestError(f"filter.{k} is not a known filter clause (expected one of "
                                  f"{', '.join(FILTER_FIELDS)})")
    tags = [check_tags(flt.get(name) or [], limits, f"filter.{name}") for name in ("tags_any", "tags_all")]
    lo, hi = (None if flt.get(name) is None else _number(flt[name], f"filter.{name}")
              for name in ("bpm_gte", "bpm_lte"))
    return make_filter(tags[0], tags[1], lo, hi)


def check_search(k, ef, search_tier, limits: Limits):
    for name, v, attr in (("k", k, "max_k"), ("ef", ef, "max_ef")):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise BadRequestError(f"{name} must be a non-negative integer, got {v!r}")
        check_limit(name, v, limits, attr)
    if search_tier not in SEARCH_TIERS:
        raise BadRequestError(f"search_tier must be one of {', '.join(SEARCH_TIERS)}, got {search_tier!r}")


def identify_frames(vectors, k: int, limits: Limits, decode):
    """Identify's frame rules, in v2.1's order (CONTRACT.md §1.3): at least one frame, at most
    max_identify_frames; then k == 0 answers no results before any dimension check (None here);
    else `decode(vectors)` gives the checked (n, dim) frames."""
    try:
        n = 0 if vectors is None else len(vectors)
    except TypeError:
        raise BadRequestError("vectors must be an array of vectors") from None
    if n == 0:
        raise BadRequestError("identify requires at least one vector")
    check_count("vectors", n, limits, "max_identify_frames")
    if k == 0:
        return None
    return decode(vectors)


def check_identify(vectors, k, ef, search_tier, limits: Limits, dim: int) -> FiniteArray | None:
    """The frames as a checked (n, dim) float32 array (a FiniteArray passes as it is), or None for k == 0."""
    check_search(k, ef, search_tier, limits)
    return identify_frames(vectors, k, limits, lambda v: _frames(v, dim))


def _frames(vectors, dim: int) -> FiniteArray:
    if type(vectors) is FiniteArray and vectors.ndim == 2 and vectors.shape[1] == dim:
        return vectors
    frames = np.empty((len(vectors), dim), dtype=np.float32)
    for i, v in enumerate(vectors):
        frames[i] = check_vector(v, dim, FRAMES, i)
    return _mark(frames)
