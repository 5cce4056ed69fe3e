"""Strict request validation for the v2 API, and the JSON Schemas it is documented with.

Each request body is described once, as a tree of field specs; the same tree validates requests
and produces the OpenAPI schema (`json_schema()`), so documentation and behaviour cannot drift.

Outcomes (CONTRACT.md D3, D12, D20):
  * 422 `validation_error` — wrong shape: unknown field (misspelled filter clauses included), missing
    required field, wrong type, `null` for a non-optional field, negative/fractional/overflowing
    integer, unknown `search_tier`, an array where an object is expected. The message names the field.
  * 400 `bad_request` — well-typed but unacceptable values: non-finite numbers (beyond float32 range,
    e.g. 1e39) in vectors, bpm or filters; dimension mismatches; values above a configured limit
    (the message names the field, the value, the limit and the flag that raises it).

Vectors are decoded in bulk: `np.array(rows)` over the parsed lists, one float32 cast and one
`isfinite` pass; a per-row slow path runs only to name the offending element when the fast path
fails (perf/RESULTS_http.md has the numbers against per-float Python handling).
"""
import math

import numpy as np

from vibrato.config import Config
from vibrato.server.errors import BadRequestError, ValidationError

U16_MAX = 2**16 - 1
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
SEARCH_TIERS = ("active", "all", "archive")


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
        self.limit = limit  # (Limits attribute, flag) checked with 400
        self.description = description

    def check(self, value, path, ctx):
        if type(value) is not int:
            if type(value) is float:
                raise ValidationError(f"{path}: expected a non-negative integer, got {value!r}")
            raise ValidationError(f"{path}: expected a non-negative integer, got {_type_name(value)}")
        if value < 0 or value > self.maximum:
            raise ValidationError(f"{path}: expected an integer between 0 and {self.maximum}, got {value}")
        if self.limit is not None:
            attr, flag = self.limit
            lim = getattr(ctx.limits, attr)
            if value > lim:
                raise BadRequestError(f"{path}={value} exceeds the limit of {lim} ({flag})")
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
        return check_finite_f32(value, path)

    def schema(self):
        return {"type": "number", "format": "float"}


def check_finite_f32(value, path) -> float:
    try:
        with np.errstate(over="ignore"):
            narrowed = float(np.float32(value)) if math.isfinite(value) else value
    except OverflowError:  # an int beyond float64 range
        narrowed = math.inf
    if not math.isfinite(narrowed):
        raise BadRequestError(f"{path} is not finite: {value!r} is outside the float32 range")
    return float(value)


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
        self.limit = limit  # (Limits attribute, flag) on the utf-8 byte length
        self.nullable = nullable
        self.description = description

    def check(self, value, path, ctx):
        if value is None and self.nullable:
            return None
        if type(value) is not str:
            raise ValidationError(f"{path}: expected a string, got {_type_name(value)}")
        if "\x00" in value:
            raise BadRequestError(f"{path} contains a NUL character")
        if self.limit is not None:
            attr, flag = self.limit
            lim = getattr(ctx.limits, attr)
            n = len(value.encode())
            if n > lim:
                raise BadRequestError(f"{path} is {n} bytes, exceeding the limit of {lim} bytes ({flag})")
        return value

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


class Tags(Spec):
    """An array of strings, at most `max_tags` of at most `max_tag_bytes` utf-8 bytes each."""

    def __init__(self, description=""):
        self.description = description

    def check(self, value, path, ctx):
        if type(value) is not list:
            raise ValidationError(f"{path}: expected an array of strings, got {_type_name(value)}")
        lim = ctx.limits
        if len(value) > lim.max_tags:
            raise BadRequestError(f"{path} has {len(value)} tags, exceeding the limit of {lim.max_tags} (--max-tags)")
        for i, tag in enumerate(value):
            if type(tag) is not str:
                raise ValidationError(f"{path}[{i}]: expected a string, got {_type_name(tag)}")
            if "\x00" in tag:
                raise BadRequestError(f"{path}[{i}] contains a NUL character")
            n = len(tag.encode())
            if n > lim.max_tag_bytes:
                raise BadRequestError(f"{path}[{i}] is {n} bytes, exceeding the limit of {lim.max_tag_bytes} "
                                      f"bytes (--max-tag-bytes)")
        return value

    def schema(self):
        return {"type": "array", "items": {"type": "string"}}


class Vector(Spec):
    """One vector: an array of numbers. Checked for type here; decoded in bulk by `decode_vectors`."""

    def __init__(self, description=""):
        self.description = description

    def check(self, value, path, ctx):
        if type(value) is not list:
            raise ValidationError(f"{path}: expected an array of numbers, got {_type_name(value)}")
        return value

    def schema(self):
        return {"type": "array", "items": {"type": "number", "format": "float"}}


class Array(Spec):
    def __init__(self, items: Spec, limit=None, description=""):
        self.items = items
        self.limit = limit  # (Limits attribute, flag) on the length, checked with 400
        self.description = description

    def check(self, value, path, ctx):
        if type(value) is not list:
            raise ValidationError(f"{path}: expected an array, got {_type_name(value)}")
        if self.limit is not None:
            attr, flag = self.limit
            lim = getattr(ctx.limits, attr)
            if len(value) > lim:
                raise BadRequestError(f"{path} has {len(value)} items, exceeding the limit of {lim} ({flag})")
        check = self.items.check
        return [check(v, f"{path}[{i}]", ctx) for i, v in enumerate(value)]

    def schema(self):
        return {"type": "array", "items": self.items.json_schema()}


class Object(Spec):
    """A JSON object with a closed set of fields. `fields`: name -> (spec, required, default)."""

    def __init__(self, name, fields, nullable=False, description=""):
        self.name = name
        self.fields = fields
        self.nullable = nullable
        self.description = description
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
        return s


# ---------------------------------------------------------------------------- request bodies
METADATA = Object("Metadata", {
    "source_file": (Str(limit=("max_source_file_bytes", "--max-source-file-bytes")), False, ""),
    "start_time_ms": (Int(U32_MAX), False, 0),
    "duration_ms": (Int(U16_MAX), False, 0),
    "bpm": (Float32(), False, 0.0),
    "tags": (Tags(description="trimmed, lower-cased, sorted and de-duplicated on ingest"), False, []),
}, description="Frame metadata; every field is optional")

INGEST = Object("IngestRequest", {
    "vector": (Vector(description="float32 components; length must equal the collection dim"), True, None),
    "metadata": (METADATA, False, None),
    "idempotency_key": (Str(limit=("max_idempotency_key_bytes", "--max-idempotency-key-bytes"), nullable=True,
                            description="a repeat returns the original id with created=false"), False, None),
})

BATCH = Object("BatchIngestRequest", {
    "vectors": (Array(INGEST, limit=("max_batch", "--max-batch")), True, None),
})

FILTER = Object("Filter", {
    "tags_any": (Tags(description="union of the tags' vectors"), False, []),
    "tags_all": (Tags(description="intersection of the tags' vectors"), False, []),
    "bpm_gte": (Float32(nullable=True), False, None),
    "bpm_lte": (Float32(nullable=True), False, None),
}, nullable=True, description="clauses are ANDed; bpm bounds are inclusive")

QUERY = Object("QueryRequest", {
    "vector": (Vector(), True, None),
    "k": (Int(limit=("max_k", "--max-k")), False, 10),
    "ef": (Int(limit=("max_ef", "--max-ef")), False, 50),
    "include_metadata": (Bool(), False, True),
    "filter": (FILTER, False, None),
    "search_tier": (Enum(SEARCH_TIERS), False, "active"),
})

IDENTIFY = Object("IdentifyRequest", {
    "vectors": (Array(Vector(), limit=("max_identify_frames", "--max-identify-frames"),
                      description="ordered query frames"), True, None),
    "k": (Int(limit=("max_k", "--max-k")), False, 5),
    "ef": (Int(limit=("max_ef", "--max-ef")), False, 100),
    "include_metadata": (Bool(), False, True),
    "search_tier": (Enum(SEARCH_TIERS), False, "all"),
})

REQUEST_BODIES = {"IngestRequest": INGEST, "BatchIngestRequest": BATCH, "QueryRequest": QUERY,
                  "IdentifyRequest": IDENTIFY}


# ---------------------------------------------------------------------------- vector decoding
def decode_vectors(rows: list, dim: int, paths, mismatch_message, maybe_bools: bool = True) -> np.ndarray:
    """Turn parsed JSON arrays into one (n, dim) float32 array, or raise naming the bad element.

    rows: lists already known to be JSON arrays. paths(i) -> the field path of row i (e.g.
    "vectors[3].vector"). mismatch_message(i, n) -> the 400 message for a row of length n.
    maybe_bools: False when the body cannot contain a JSON boolean (skips a per-row type scan that
    numpy's upcasting of True/False to 1.0/0.0 would otherwise need).
    """
    n = len(rows)
    if n == 0:
        return np.empty((0, dim), dtype=np.float32)
    arr = None
    try:
        arr = np.array(rows)
    except (ValueError, TypeError, OverflowError):
        pass  # ragged or unconvertible: the slow path names the row
    ok = (arr is not None and arr.ndim == 2 and arr.dtype.kind in "fiu"
          and (not maybe_bools or all(set(map(type, r)) <= _NUMBER_TYPES for r in rows)))
    if not ok:
        # Raises for a bad element or row; if none is bad the rows only defeated numpy's type
        # inference (e.g. integers beyond int64 make an object array), so convert explicitly.
        _first_bad_row(rows, dim, paths, mismatch_message)
        arr = np.array(rows, dtype=np.float64)
    if arr.shape[1] != dim:
        raise BadRequestError(mismatch_message(0, arr.shape[1]))
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(np.float32)
    finite = np.isfinite(out)
    if not finite.all():
        i, j = map(int, np.argwhere(~finite)[0])
        raise BadRequestError(f"{paths(i)}[{j}] is not finite: {rows[i][j]!r} is outside the float32 range")
    return out


_NUMBER_TYPES = {int, float}


def _first_bad_row(rows, dim, paths, mismatch_message):
    # Types first (422, like a deserializer would), then lengths (400).
    for i, r in enumerate(rows):
        for j, x in enumerate(r):
            if type(x) not in _NUMBER_TYPES:
                raise ValidationError(f"{paths(i)}[{j}]: expected a number, got {_type_name(x)}")
    for i, r in enumerate(rows):
        if len(r) != dim:
            raise BadRequestError(mismatch_message(i, len(r)))
    for i, r in enumerate(rows):
        for j, x in enumerate(r):
            check_finite_f32(x, f"{paths(i)}[{j}]")


class Validator:
    """Validates v2 request bodies for one collection (dim) under `Config.limits`.

    Each method takes the parsed JSON document and returns the keyword arguments of one engine call.
    """

    def __init__(self, config: Config):
        self.dim = config.dim
        self.limits = config.limits

    def ingest(self, doc, maybe_bools=True) -> dict:
        req = INGEST.check(doc, "", self)
        vec = decode_vectors([req["vector"]], self.dim, lambda i: "vector",
                             lambda i, n: f"dimension mismatch: expected {self.dim}, got {n}", maybe_bools)
        return {"vector": vec[0], "metadata": req["metadata"], "idempotency_key": req["idempotency_key"]}

    def ingest_batch(self, doc, maybe_bools=True) -> list:
        req = BATCH.check(doc, "", self)
        items = req["vectors"]
        vecs = decode_vectors([it["vector"] for it in items], self.dim, lambda i: f"vectors[{i}].vector",
                              lambda i, n: f"dimension mismatch at index {i}: expected {self.dim}, got {n}",
                              maybe_bools)
        for it, v in zip(items, vecs):
            it["vector"] = v
        return items

    def query(self, doc, maybe_bools=True) -> dict:
        req = QUERY.check(doc, "", self)
        req["vector"] = decode_vectors([req["vector"]], self.dim, lambda i: "vector",
                                       lambda i, n: f"dimension mismatch: expected {self.dim}, got {n}",
                                       maybe_bools)[0]
        f = req["filter"]
        if f is not None:
            lo, hi = f["bpm_gte"], f["bpm_lte"]
            if lo is not None and hi is not None and lo > hi:
                raise BadRequestError(f"filter.bpm_gte ({lo!r}) must not be greater than filter.bpm_lte ({hi!r})")
        return req

    def identify(self, doc, maybe_bools=True) -> dict:
        req = IDENTIFY.check(doc, "", self)
        frames = req["vectors"]
        if not frames:
            raise BadRequestError("identify requires at least one vector")
        if req["k"] == 0:
            req["vectors"] = None  # k=0: an empty list before any dim check, as v2.1 (CONTRACT.md §1.3)
            return req
        req["vectors"] = decode_vectors(frames, self.dim, lambda i: f"vectors[{i}]",
                                        lambda i, n: f"dimension mismatch at vectors[{i}]: expected {self.dim}, "
                                                     f"got {n}", maybe_bools)
        return req
