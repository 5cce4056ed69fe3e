"""Request bodies of the v2 API: JSON shape to typed values, and the JSON Schemas it is documented with.

Each request body is described once, as a tree of field specs; the same tree validates requests
and produces the OpenAPI schema (`json_schema()`), so documentation and behaviour cannot drift.

Outcomes (CONTRACT.md D3, D12, D20):
  * 422 `validation_error`, decided here — wrong shape: unknown field (misspelled filter clauses
    included), missing required field, wrong type, `null` for a non-optional field,
    negative/fractional/overflowing integer, unknown `search_tier`, an array where an object is
    expected. The message names the field.
  * 400 `bad_request`, decided by the engine's rules (vibrato.engine.validation), which the specs call
    where they meet a value — well-typed but unacceptable values: non-finite numbers (beyond float32
    range, e.g. 1e39) in vectors, bpm or filters; dimension mismatches; values above a configured
    limit; NUL in a string; an inverted bpm range.

`Validator` returns what the engine takes without checking again: a `PreparedBatch` for ingest,
`FiniteArray` vectors and a `QueryFilter` for searches.

Vectors are decoded in bulk: `np.array(rows)` over the parsed lists, one float32 cast and one native
finiteness pass; a per-row slow path runs only to name the offending element when the fast path
fails (perf/RESULTS_http.md has the numbers against per-float Python handling).
"""
import base64
import binascii

import orjson

import numpy as np

from vibrato._native.httpq import RequestReader
from vibrato.config import Config
from vibrato.engine import validation as rules
from vibrato.engine.validation import (DEFAULT_META, SEARCH_TIERS, U16_MAX, U32_MAX, U64_MAX, check_count, check_f32,
                                       check_limit, check_text, key_value, make_filter, make_meta, prepare_checked)
from vibrato.errors import BadRequestError
from vibrato.index import FiniteArray
from vibrato.server.errors import ValidationError


def _type_name(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# ---------------------------------------------------------------------------- field specs
class Spec:
    """A JSON value spec: `check(value, path, ctx)` returns the parsed value or raises."""
    nullable = False
    description = ""

    def check(self, value, path, ctx):  # pragma: no cover - abstract
        raise NotImplementedError

    def schema(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def json_schema(self) -> dict:
        s = self.schema()
        if self.description:
            s["description"] = self.description
        if self.nullable:
            s = {"anyOf": [s, {"type": "null"}]}
            if self.description:
                s["description"] = self.description
        return s


class Int(Spec):
    def __init__(self, maximum=U64_MAX, limit=None, description=""):
        self.maximum = maximum
        self.limit = limit  # a Limits attribute, checked with 400
        self.description = description

    def check(self, value, path, ctx):
        if type(value) is not int:
            if type(value) is float:
                raise ValidationError(f"{path}: expected a non-negative integer, got {value!r}")
            raise ValidationError(f"{path}: expected a non-negative integer, got {_type_name(value)}")
        if value < 0 or value > self.maximum:
            raise ValidationError(f"{path}: expected an integer between 0 and {self.maximum}, got {value}")
        if self.limit is not None:
            check_limit(path, value, ctx.limits, self.limit)
        return value

    def schema(self):
        return {"type": "integer", "minimum": 0, "maximum": self.maximum}


class Float32(Spec):
    def __init__(self, nullable=False, description=""):
        self.nullable = nullable
        self.description = description

    def check(self, value, path, ctx):
        if value is None and self.nullable:
            return None
        if type(value) not in (int, float):
            raise ValidationError(f"{path}: expected a number, got {_type_name(value)}")
        return check_f32(value, path)

    def schema(self):
        return {"type": "number", "format": "float"}


class Bool(Spec):
    def __init__(self, description=""):
        self.description = description

    def check(self, value, path, ctx):
        if type(value) is not bool:
            raise ValidationError(f"{path}: expected a boolean, got {_type_name(value)}")
        return value

    def schema(self):
        return {"type": "boolean"}


class Str(Spec):
    def __init__(self, limit=None, nullable=False, description=""):
        self.limit = limit  # a Limits attribute bounding the utf-8 byte length
        self.nullable = nullable
        self.description = description

    def check(self, value, path, ctx):
        if value is None and self.nullable:
            return None
        if type(value) is not str:
            raise ValidationError(f"{path}: expected a string, got {_type_name(value)}")
        return check_text(value, path, ctx.limits, self.limit)

    def schema(self):
        return {"type": "string"}


class Enum(Spec):
    def __init__(self, values, description=""):
        self.values = tuple(values)
        self.description = description

    def check(self, value, path, ctx):
        if type(value) is not str or value not in self.values:
            got = repr(value) if isinstance(value, str) else _type_name(value)
            raise ValidationError(f"{path}: expected one of {', '.join(self.values)}, got {got}")
        return value

    def schema(self):
        return {"type": "string", "enum": list(self.values)}


def _strings(value: list, path, ctx, count_attr: str, noun: str, bytes_attr: str) -> list:
    """A list of strings: at most Limits.<count_attr> of them (400), each a string (422) of at most
    Limits.<bytes_attr> UTF-8 bytes without NUL (400)."""
    check_count(path, len(value), ctx.limits, count_attr, noun)
    for i, item in enumerate(value):
        if type(item) is not str:
            raise ValidationError(f"{path}[{i}]: expected a string, got {_type_name(item)}")
        check_text(item, f"{path}[{i}]", ctx.limits, bytes_attr)
    return value


class Tags(Spec):
    """An array of strings, at most `max_tags` of at most `max_tag_bytes` utf-8 bytes each."""

    def __init__(self, description=""):
        self.description = description

    def check(self, value, path, ctx):
        if type(value) is not list:
            raise ValidationError(f"{path}: expected an array of strings, got {_type_name(value)}")
        return _strings(value, path, ctx, "max_tags", "tags", "max_tag_bytes")

    def schema(self):
        return {"type": "array", "items": {"type": "string"}}


def unpack_f32(value: str, path: str, dim: int, rows: bool = False) -> np.ndarray:
    """The compact vector encoding: standard base64 of little-endian float32 components. One vector
    of `dim` components, or with `rows` a whole number of them as (n, dim). Not yet checked finite."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError(f"{path}: expected an array of numbers or base64 of little-endian float32") from None
    if len(raw) % 4:
        raise BadRequestError(f"{path}: {len(raw)} bytes is not a whole number of float32 components")
    n = len(raw) // 4
    if not rows:
        if n != dim:
            raise BadRequestError(f"dimension mismatch at {path}: expected {dim}, got {n}")
        return np.frombuffer(raw, dtype="<f4")
    if n % dim or n == 0:
        raise BadRequestError(f"{path}: {n} float32 components are not a whole number of {dim}-component frames")
    return np.frombuffer(raw, dtype="<f4").reshape(n // dim, dim)


_PACKED = {"type": "string", "format": "byte",
           "description": "compact form: standard base64 of the little-endian float32 components"}


class Vector(Spec):
    """One vector: an array of numbers, or its compact form (`unpack_f32`). Checked for type here;
    decoded in bulk by `decode_vectors`."""

    def __init__(self, description=""):
        self.description = description

    def check(self, value, path, ctx):
        if type(value) is list:
            return value
        if type(value) is str:
            return unpack_f32(value, path, ctx.dim)
        raise ValidationError(f"{path}: expected an array of numbers, got {_type_name(value)}")

    def schema(self):
        return {"oneOf": [{"type": "array", "items": {"type": "number", "format": "float"}}, _PACKED]}


class Frames(Spec):
    """identify's frames: an array of vectors, or all of them in one compact string ((n, dim) rows)."""

    def __init__(self, limit, description=""):
        self.array = Array(Vector(), limit=limit)
        self.description = description

    def check(self, value, path, ctx):
        if type(value) is str:
            return unpack_f32(value, path, ctx.dim, rows=True)
        return self.array.check(value, path, ctx)

    def schema(self):
        return {"oneOf": [self.array.json_schema(), {**_PACKED, "description": "compact form: base64 of every "
                                                     "frame's little-endian float32 components, frame after frame"}]}


class Names(Spec):
    """A delete filter's `source_file`: one name, or an array of at most `max_delete_source_files` names.
    An empty array has the right shape; the engine's rule refuses it (400)."""

    def __init__(self, description=""):
        self.description = description

    def check(self, value, path, ctx):
        if type(value) is str:
            return check_text(value, path, ctx.limits, "max_source_file_bytes")
        if type(value) is not list:
            raise ValidationError(f"{path}: expected a string or an array of strings, got {_type_name(value)}")
        return _strings(value, path, ctx, "max_delete_source_files", "names", "max_source_file_bytes")

    def schema(self):
        return {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]}


class Array(Spec):
    def __init__(self, items: Spec, limit=None, description=""):
        self.items = items
        self.limit = limit  # a Limits attribute bounding the length, checked with 400
        self.description = description

    def check(self, value, path, ctx):
        if type(value) is not list:
            raise ValidationError(f"{path}: expected an array, got {_type_name(value)}")
        if self.limit is not None:
            check_count(path, len(value), ctx.limits, self.limit)
        check = self.items.check
        return [check(v, f"{path}[{i}]", ctx) for i, v in enumerate(value)]

    def schema(self):
        return {"type": "array", "items": self.items.json_schema()}


class VectorId(Int):
    """A vector id in a delete: not a JSON integer in 0..2^64-1 is a bad id, 400 (CONTRACT.md D40),
    where other integer fields answer a wrong type with 422."""

    def check(self, value, path, ctx):
        try:
            return super().check(value, path, ctx)
        except ValidationError as exc:
            raise BadRequestError(str(exc)) from None


class Object(Spec):
    """A JSON object with a closed set of fields. `fields`: name -> (spec, required, default).
    one_of: names of which exactly one must be given, documented in the schema only (the caller
    enforces it, as a 400 of the engine's rules)."""

    def __init__(self, fields, nullable=False, description="", one_of=()):
        self.fields = fields
        self.nullable = nullable
        self.description = description
        self.one_of = tuple(one_of)
        self._allowed = ", ".join(fields)

    def check(self, value, path, ctx):
        if value is None and self.nullable:
            return None
        if type(value) is not dict:
            raise ValidationError(f"{path or 'body'}: expected an object, got {_type_name(value)}")
        for key in value:
            if key not in self.fields:
                raise ValidationError(f"unknown field '{_join(path, key)}' (expected one of {self._allowed})")
        out = {}
        for name, (spec, required, default) in self.fields.items():
            if name in value:
                v = value[name]
                if v is None and not spec.nullable:
                    raise ValidationError(f"{_join(path, name)}: must not be null")
                out[name] = spec.check(v, _join(path, name), ctx)
            elif required:
                raise ValidationError(f"missing required field '{_join(path, name)}'")
            else:
                out[name] = default
        return out

    def schema(self):
        props = {}
        required = []
        for name, (spec, req, default) in self.fields.items():
            s = spec.json_schema()
            if not req and default is not None:
                s = {**s, "default": default}
            props[name] = s
            if req:
                required.append(name)
        s = {"type": "object", "properties": props, "additionalProperties": False}
        if required:
            s["required"] = required
        if self.one_of:
            s["oneOf"] = [{"required": [name]} for name in self.one_of]
        return s


# ---------------------------------------------------------------------------- request bodies
METADATA = Object({
    "source_file": (Str(limit="max_source_file_bytes"), False, ""),
    "start_time_ms": (Int(U32_MAX), False, 0),
    "duration_ms": (Int(U16_MAX), False, 0),
    "bpm": (Float32(), False, 0.0),
    "tags": (Tags(description="trimmed, lower-cased, sorted and de-duplicated on ingest"), False, []),
}, description="Frame metadata; every field is optional")

INGEST = Object({
    "vector": (Vector(description="float32 components; length must equal the collection dim"), True, None),
    "metadata": (METADATA, False, None),
    "idempotency_key": (Str(limit="max_idempotency_key_bytes", nullable=True,
                            description="a repeat returns the original id with created=false"), False, None),
})

BATCH = Object({
    "vectors": (Array(INGEST, limit="max_batch"), True, None),
})

FILTER = Object({
    "tags_any": (Tags(description="union of the tags' vectors"), False, []),
    "tags_all": (Tags(description="intersection of the tags' vectors"), False, []),
    "bpm_gte": (Float32(nullable=True), False, None),
    "bpm_lte": (Float32(nullable=True), False, None),
}, nullable=True, description="clauses are ANDed; bpm bounds are inclusive")

QUERY = Object({
    "vector": (Vector(), True, None),
    "k": (Int(limit="max_k"), False, 10),
    "ef": (Int(limit="max_ef"), False, 50),
    "include_metadata": (Bool(), False, True),
    "filter": (FILTER, False, None),
    "search_tier": (Enum(SEARCH_TIERS), False, "active"),
})

IDENTIFY = Object({
    "vectors": (Frames(limit="max_identify_frames", description="ordered query frames"), True, None),
    "k": (Int(limit="max_k"), False, 5),
    "ef": (Int(limit="max_ef"), False, 100),
    "include_metadata": (Bool(), False, True),
    "search_tier": (Enum(SEARCH_TIERS), False, "all"),
})

DELETE_FILTER = Object({
    "source_file": (Names(description="one source_file name or a non-empty array of at most "
                                      "--max-delete-source-files (1000) names; exact match"), False, None),
    "tags_any": FILTER.fields["tags_any"],
    "tags_all": FILTER.fields["tags_all"],
    "bpm_gte": FILTER.fields["bpm_gte"],
    "bpm_lte": FILTER.fields["bpm_lte"],
}, description="the query filter's clauses plus source_file, ANDed; at least one condition is required")

DELETE = Object({
    "ids": (Array(VectorId(), limit="max_delete_ids",
                  description="vector ids, at most --max-delete-ids (10000); unknown or already deleted ids "
                              "count 0"), False, None),
    "filter": (DELETE_FILTER, False, None),
}, one_of=("ids", "filter"), description="exactly one of ids or filter")

COMPACT = Object({
    "purge": (Bool(description="erase the payloads of every deleted row now instead of one compaction step"),
              False, False),
}, description="optional; no body is a compaction step")

REQUEST_BODIES = {"IngestRequest": INGEST, "BatchIngestRequest": BATCH, "QueryRequest": QUERY,
                  "IdentifyRequest": IDENTIFY, "DeleteRequest": DELETE, "CompactRequest": COMPACT}


# ---------------------------------------------------------------------------- vector decoding
def decode_vectors(rows: list, dim: int, kind: str, maybe_bools: bool = True) -> np.ndarray:
    """Turn parsed JSON arrays into one checked (n, dim) float32 FiniteArray, or raise naming the bad element.

    rows: lists already known to be JSON arrays. kind: rules.VECTOR, BATCH or FRAMES (the field paths
    and dimension messages of that body). Rows of plain numbers are converted natively
    (rules.float32_rows, which refuses booleans itself); the general path below takes the rest.
    maybe_bools: false when the body cannot contain a JSON boolean (skips the general path's per-row
    type scan that numpy's upcasting of True/False to 1.0/0.0 would otherwise need); its truth is
    only asked for there (handlers.parse_and_validate passes a lazy one).
    """
    n = len(rows)
    if n == 0:
        return rules.finite_rows(np.empty((0, dim), dtype=np.float32), kind, rows)
    out = rules.float32_rows(rows, dim)  # the common case, in one native pass; None: see below
    if out is not None:
        return rules.finite_rows(out, kind, rows)
    arr = None
    try:
        arr = np.array(rows)
    except (ValueError, TypeError, OverflowError):
        pass  # ragged or unconvertible: the slow path names the row
    ok = (arr is not None and arr.ndim == 2 and arr.dtype.kind in "fiu"
          and (not maybe_bools or all(type(r) is np.ndarray or set(map(type, r)) <= _NUMBER_TYPES for r in rows)))
    if not ok:
        # Raises for a bad element or row; if none is bad the rows only defeated numpy's type
        # inference (e.g. integers beyond int64 make an object array), so convert explicitly.
        _first_bad_row(rows, dim, kind)
        arr = np.array(rows, dtype=np.float64)
    if arr.shape[1] != dim:
        raise rules.dim_mismatch(kind, 0, dim, arr.shape[1])
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(np.float32)
    return rules.finite_rows(out, kind, rows)


_NUMBER_TYPES = {int, float}


def _first_bad_row(rows, dim, kind):
    # Types first (422, like a deserializer would), then lengths and values (400, the engine's rules).
    for i, r in enumerate(rows):
        if type(r) is np.ndarray:  # compact form: float32 already
            continue
        for j, x in enumerate(r):
            if type(x) not in _NUMBER_TYPES:
                raise ValidationError(f"{rules.element_path(kind, i)}[{j}]: expected a number, got {_type_name(x)}")
    for i, r in enumerate(rows):
        if len(r) != dim:
            raise rules.dim_mismatch(kind, i, dim, len(r))
    for i, r in enumerate(rows):
        for j, x in enumerate(r):
            check_f32(x, f"{rules.element_path(kind, i)}[{j}]")


def _query_filter(f):
    """The QueryFilter (or None) of a checked FILTER value."""
    return None if f is None else make_filter(f["tags_any"], f["tags_all"], f["bpm_gte"], f["bpm_lte"])


def _meta(m) -> tuple:
    if m is None:
        return DEFAULT_META
    return make_meta(m["source_file"], m["start_time_ms"], m["duration_ms"], m["bpm"], m["tags"])


class Validator:
    """Validates v2 request bodies for one collection (dim) under `Config.limits`.

    Each method takes the parsed JSON document and returns the engine call's input, checked.
    """

    def __init__(self, config: Config):
        self.dim = config.dim
        self.limits = config.limits
        self._reader = RequestReader(config.dim, config.limits.max_k, config.limits.max_ef)

    def ingest(self, doc, maybe_bools=True) -> rules.PreparedBatch:
        """One row, for Engine.ingest_batch."""
        req = INGEST.check(doc, "", self)
        vec = decode_vectors([req["vector"]], self.dim, rules.VECTOR, maybe_bools)
        return prepare_checked(vec, [_meta(req["metadata"])], [key_value(req["idempotency_key"])])

    def ingest_batch(self, doc, maybe_bools=True) -> rules.PreparedBatch:
        items = BATCH.check(doc, "", self)["vectors"]
        vecs = decode_vectors([it["vector"] for it in items], self.dim, rules.BATCH, maybe_bools)
        return prepare_checked(vecs, [_meta(it["metadata"]) for it in items],
                               [key_value(it["idempotency_key"]) for it in items])

    def query(self, doc, maybe_bools=True) -> dict:
        """Engine.query's keyword arguments: vector a FiniteArray, filter a QueryFilter or None."""
        req = QUERY.check(doc, "", self)
        req["vector"] = decode_vectors([req["vector"]], self.dim, rules.VECTOR, maybe_bools)[0]
        req["filter"] = _query_filter(req["filter"])
        return req

    def identify(self, doc, maybe_bools=True) -> dict:
        """Engine.identify's keyword arguments: vectors a FiniteArray (n, dim), or as given when k == 0
        (the engine answers that before any dimension check)."""
        req = IDENTIFY.check(doc, "", self)
        frames = rules.identify_frames(req["vectors"], req["k"], self.limits,
                                       lambda rows: decode_vectors(rows, self.dim, rules.FRAMES, maybe_bools))
        if frames is not None:
            req["vectors"] = frames
        return req

    def query_filter(self, raw: bytes):
        """A query's `filter` value given as its JSON bytes (the bytes reader's, server/fastpath.py), as
        query() makes it: a QueryFilter or None; raises as query() would."""
        return _query_filter(FILTER.check(orjson.loads(raw), "filter", self))

    def identify_bytes(self, body: bytes) -> dict | None:
        """identify(orjson.loads(body)) for a body in its plainest form (JSON arrays of numbers, no
        k = 0), read in C without building a Python float per component (vibrato/_native/httpq.pyx);
        None for any other body: parse it."""
        got = self._reader.identify_body(body, self.limits.max_identify_frames, FiniteArray)
        if got is None:
            return None
        frames, k, ef, include_metadata, search_tier = got
        return {"vectors": frames, "k": k, "ef": ef, "include_metadata": include_metadata, "search_tier": search_tier}

    def delete(self, doc, maybe_bools=True) -> dict:
        """Engine.delete's arguments: {"ids": list or None, "filter": dict or None}, the filter with only
        the clauses sent (the engine tells an absent source_file from a given one). The engine's rules
        (check_delete) run here too, so their 400s (exactly one of ids / filter, an empty filter, an
        empty source_file list) come before readiness, like every other value check."""
        req = DELETE.check(doc, "", self)
        flt = req["filter"]
        if flt is not None:
            flt = {name: flt[name] for name in doc["filter"]}
        rules.check_delete(req["ids"], flt, self.limits)
        return {"ids": req["ids"], "filter": flt}

    def compact(self, doc, maybe_bools=True) -> dict:
        return COMPACT.check(doc, "", self)
