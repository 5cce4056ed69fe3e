"""What goes into a segment: SegmentData and the two CSR column types (tags, source strings).

Everything here validates eagerly and raises ValueError naming the field, the bad value and the
limit, so that the writer never produces a file the reader would reject.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vibrato._native import segio as _segio
from vibrato.segment import format as F

_U32_MAX = 2**32 - 1


@dataclass(frozen=True, eq=False)
class StringsCSR:
    """n strings as CSR: ``offsets`` uint64 (n+1,) into ``blob`` (UTF-8, concatenated).

    String i is ``blob[offsets[i]:offsets[i+1]].decode()``. Readers hand out zero-copy instances
    (``blob`` is then a read-only memoryview into the mapping).
    """

    offsets: np.ndarray  # (n+1,) uint64, 0 = o[0] <= ... <= o[n] = len(blob)
    blob: bytes | memoryview

    @classmethod
    def from_list(cls, strings, field_name: str = "source_file") -> "StringsCSR":
        encoded = encode_utf8(strings, field_name + "[{i}]")
        offsets = np.zeros(len(encoded) + 1, dtype="<u8")
        if encoded:
            np.cumsum(np.fromiter(map(len, encoded), dtype=np.uint64, count=len(encoded)), out=offsets[1:])
        return cls(offsets, b"".join(encoded))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return str(self.blob[a:b], "utf-8")

    def to_list(self) -> list[str]:
        o = self.offsets.tolist()
        blob = bytes(self.blob)
        return [blob[o[i]:o[i + 1]].decode("utf-8") for i in range(len(o) - 1)]

    def validate(self, n: int, field_name: str = "source_file") -> "StringsCSR":
        """Check shape/dtype/monotonicity against n rows; returns a canonical (uint64 LE) copy if needed."""
        offsets = _as_1d(self.offsets, f"{field_name}.offsets")
        if offsets.dtype.kind not in "ui":
            raise ValueError(f"{field_name}.offsets must be an integer array, got {offsets.dtype}")
        if offsets.shape[0] != n + 1:
            raise ValueError(f"{field_name}.offsets must have n+1 = {n + 1} entries, got {offsets.shape[0]}")
        if offsets.dtype.kind == "i" and offsets.size and offsets.min() < 0:
            raise ValueError(f"{field_name}.offsets must be non-negative")
        offsets = np.ascontiguousarray(offsets, dtype="<u8")
        try:
            blob = memoryview(self.blob).cast("B")
        except TypeError:
            raise ValueError(f"{field_name}.blob must be bytes-like, got {type(self.blob).__name__}") from None
        bad = _segio.check_offsets(offsets, len(blob))
        if bad >= 0:
            raise ValueError(f"{field_name}.offsets[{bad}] breaks 0 = o[0] <= ... <= o[n] = len(blob) = {len(blob)}")
        return StringsCSR(offsets, blob)

    @staticmethod
    def concat(parts) -> "StringsCSR":
        """One CSR holding the rows of ``parts`` in order (for compaction)."""
        parts = list(parts)
        blobs = [bytes(p.blob) for p in parts]
        offsets = [np.zeros(1, dtype="<u8")]
        base = 0
        for p, b in zip(parts, blobs):
            offsets.append(np.asarray(p.offsets[1:], dtype="<u8") + np.uint64(base))
            base += len(b)
        return StringsCSR(np.concatenate(offsets), b"".join(blobs))


@dataclass(frozen=True, eq=False)
class TagsCSR:
    """Per-row tag lists as CSR over a per-segment dictionary.

    ``dictionary``: sorted, unique tag strings. Row i's tags are
    ``[dictionary[t] for t in ids[offsets[i]:offsets[i+1]]]`` with ids strictly ascending in a row
    (so each row's tags come out sorted and de-duplicated, as the engine normalises them).
    """

    dictionary: list[str]
    offsets: np.ndarray  # (n+1,) uint32, 0 .. nnz
    ids: np.ndarray  # (nnz,) uint32, < len(dictionary)

    @classmethod
    def from_lists(cls, rows, field_name: str = "tags") -> "TagsCSR":
        """Build from ``rows``: a sequence of n sequences of str, each sorted and de-duplicated."""
        rows = list(rows)
        flat = []
        for i, row in enumerate(rows):
            if isinstance(row, (str, bytes)) or not hasattr(row, "__len__"):
                raise ValueError(f"{field_name}[{i}] must be a list of str, got {type(row).__name__}")
            flat.extend(row)
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        if len(flat) > _U32_MAX:
            raise ValueError(f"{field_name}: {len(flat)} tag assignments exceed the limit {_U32_MAX}")
        offsets = np.zeros(len(rows) + 1, dtype="<u4")
        if rows:
            offsets[1:] = np.cumsum(lengths)
        if not flat:
            return cls([], offsets, np.zeros(0, dtype="<u4"))
        for j, t in enumerate(flat):
            if not isinstance(t, str):
                row = int(np.searchsorted(offsets, j, side="right")) - 1
                raise ValueError(f"{field_name}[{row}] holds a {type(t).__name__}, expected str")
        dictionary = sorted(set(flat))
        _check_utf8(dictionary, field_name)
        index = {t: i for i, t in enumerate(dictionary)}
        ids = np.fromiter(map(index.__getitem__, flat), dtype="<u4", count=len(flat))
        csr = cls(dictionary, offsets, ids)
        bad = _segio.check_tag_rows(csr.offsets, csr.ids, len(csr.dictionary))
        if bad >= 0:
            raise ValueError(f"{field_name}[{bad}] = {rows[bad]!r} is not sorted and de-duplicated "
                             f"(the caller normalises tags: trimmed, lower-cased, sorted, unique)")
        return csr

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> list[str]:
        d = self.dictionary
        return [d[t] for t in self.ids[int(self.offsets[i]):int(self.offsets[i + 1])].tolist()]

    def to_lists(self) -> list[list[str]]:
        d = self.dictionary
        o = self.offsets.tolist()
        ids = self.ids.tolist()
        return [[d[t] for t in ids[o[i]:o[i + 1]]] for i in range(len(o) - 1)]

    def validate(self, n: int, field_name: str = "tags") -> "TagsCSR":
        """Check against n rows; returns a canonical (uint32 LE arrays, list dictionary) instance."""
        dictionary = list(self.dictionary)
        for j, t in enumerate(dictionary):
            if not isinstance(t, str):
                raise ValueError(f"{field_name}.dictionary[{j}] must be a str, got {type(t).__name__}")
        if any(dictionary[j] >= dictionary[j + 1] for j in range(len(dictionary) - 1)):
            raise ValueError(f"{field_name}.dictionary must be sorted and unique")
        _check_utf8(dictionary, field_name)
        offsets = _as_1d(self.offsets, f"{field_name}.offsets")
        ids = _as_1d(self.ids, f"{field_name}.ids")
        for name, a in (("offsets", offsets), ("ids", ids)):
            if a.dtype.kind not in "ui":
                raise ValueError(f"{field_name}.{name} must be an integer array, got {a.dtype}")
            if a.size and (a.min() < 0 or a.max() > _U32_MAX):
                raise ValueError(f"{field_name}.{name} values must lie in [0, 2^32)")
        if offsets.shape[0] != n + 1:
            raise ValueError(f"{field_name}.offsets must have n+1 = {n + 1} entries, got {offsets.shape[0]}")
        offsets = np.ascontiguousarray(offsets, dtype="<u4")
        ids = np.ascontiguousarray(ids, dtype="<u4")
        bad = _segio.check_offsets(offsets, ids.shape[0])
        if bad >= 0:
            raise ValueError(f"{field_name}.offsets[{bad}] breaks 0 = o[0] <= ... <= o[n] = len(ids) = {ids.shape[0]}")
        bad = _segio.check_tag_rows(offsets, ids, len(dictionary))
        if bad >= 0:
            raise ValueError(f"{field_name}: row {bad} has an id >= len(dictionary) = {len(dictionary)} "
                             f"or ids that are not strictly ascending")
        return TagsCSR(dictionary, offsets, ids)

    @staticmethod
    def concat(parts) -> "TagsCSR":
        """One CSR holding the rows of ``parts`` in order, over the union of their dictionaries.

        Ids are remapped with numpy (each part's dictionary is sorted, so the remap is monotonic and
        rows stay strictly ascending). For compaction.
        """
        parts = list(parts)
        merged = sorted(set().union(*(p.dictionary for p in parts))) if parts else []
        index = {t: i for i, t in enumerate(merged)}
        offsets = [np.zeros(1, dtype="<u4")]
        ids = []
        base = 0
        for p in parts:
            remap = np.fromiter((index[t] for t in p.dictionary), dtype="<u4", count=len(p.dictionary))
            ids.append(remap[np.asarray(p.ids, dtype=np.intp)] if len(p.ids) else np.zeros(0, dtype="<u4"))
            offsets.append(np.asarray(p.offsets[1:], dtype=np.uint64) + base)
            base += len(p.ids)
        if base > _U32_MAX:
            raise ValueError(f"tags: {base} tag assignments exceed the limit {_U32_MAX}")
        return TagsCSR(merged, np.concatenate(offsets).astype("<u4"),
                       np.concatenate(ids).astype("<u4") if ids else np.zeros(0, dtype="<u4"))


class StreamedVectors:
    """(n, dim) float32 vectors produced in chunks instead of held in memory, so that writing a
    large segment (a compaction's output) needs one chunk of memory, not the whole section.

    ``chunks()`` must yield C-contiguous float32 arrays of shape (rows, dim), in row order, whose
    rows add up to n; the writer calls it twice (checksum pass, then write pass) and checks that
    both passes produce the same bytes. A yielded array may be reused by the next step.
    """

    dtype = np.dtype("<f4")
    ndim = 2

    def __init__(self, n: int, dim: int, chunks):
        self.shape = (int(n), int(dim))
        self.chunks = chunks

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * 4


@dataclass(eq=False)
class SegmentData:
    """The content of one segment, validated and normalised on construction (and again on write).

    Rows are ids ``id_start .. id_start + n - 1``. Kind: ARCHIVE when ``pq_codebook``/``pq_codes``
    are given (both required), RAW otherwise. ``graph`` is optional for both (the engine always
    passes one; archives without one are version-1 files, which are only read). After construction the fields hold canonical types: C-contiguous numpy arrays of
    the documented dtypes, ``tags`` a TagsCSR, ``source_file`` a StringsCSR.

    Not checked here: that vectors are finite (the engine rejects non-finite input at ingest,
    CONTRACT.md D3), and the content of the opaque graph / codebook blobs.
    """

    level: int
    id_start: int
    vectors: np.ndarray | StreamedVectors  # (n, dim) float32; a non-contiguous array is copied once
    live: np.ndarray  # (n,) bool (or 0/1 integers); False = tombstone
    start_time_ms: np.ndarray  # (n,) integers in [0, 2^32)
    duration_ms: np.ndarray  # (n,) integers in [0, 2^32)
    bpm: np.ndarray  # (n,) finite floats (stored as float32; 0 = unknown)
    tags: list | TagsCSR  # n lists of str (sorted, unique) or a TagsCSR
    source_file: list | StringsCSR  # n str or a StringsCSR
    graph: bytes | memoryview | None = None  # HnswIndex.graph_bytes()
    pq_codebook: bytes | memoryview | None = None  # ProductQuantizer.to_bytes() (archive)
    pq_codes: np.ndarray | None = None  # (n, m) uint8 (archive)

    def __post_init__(self):
        self.validate()

    @property
    def kind(self) -> F.SegmentKind:
        return F.SegmentKind.ARCHIVE if self.pq_codebook is not None else F.SegmentKind.RAW

    @property
    def count(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def pq_m(self) -> int:
        return 0 if self.pq_codes is None else int(self.pq_codes.shape[1])

    def validate(self) -> "SegmentData":
        """Check every field and normalise it in place; raises ValueError naming the field."""
        v = self.vectors
        if not isinstance(v, (np.ndarray, StreamedVectors)):
            raise ValueError(f"vectors must be a numpy float32 array, got {type(v).__name__}")
        if v.dtype != np.float32:
            raise ValueError(f"vectors must have dtype float32, got {v.dtype}")
        if v.ndim != 2:
            raise ValueError(f"vectors must be 2-D (n, dim), got shape {v.shape}")
        n, dim = v.shape
        if not 1 <= n <= F.MAX_COUNT:
            raise ValueError(f"vectors must have 1..{F.MAX_COUNT} rows, got {n}")
        if not 1 <= dim <= F.MAX_DIM:
            raise ValueError(f"vectors must have dim in 1..{F.MAX_DIM}, got {dim}")
        if isinstance(v, np.ndarray):
            self.vectors = np.ascontiguousarray(v, dtype="<f4")

        self.level = _int_in(self.level, "level", 0, F.MAX_LEVEL)
        self.id_start = _int_in(self.id_start, "id_start", 0, F.MAX_ID - (n - 1))

        live = np.asarray(self.live)
        if live.shape != (n,):
            raise ValueError(f"live must have shape ({n},), got {live.shape}")
        if live.dtype != np.bool_:
            if live.dtype.kind not in "ui" or (n and not np.isin(live, (0, 1)).all()):
                raise ValueError(f"live must be a bool array (or integers 0/1), got dtype {live.dtype}")
            live = live.astype(np.bool_)
        self.live = np.ascontiguousarray(live)

        self.start_time_ms = _u32_column(self.start_time_ms, "start_time_ms", n)
        self.duration_ms = _u32_column(self.duration_ms, "duration_ms", n)
        bpm = np.asarray(self.bpm)
        if bpm.shape != (n,):
            raise ValueError(f"bpm must have shape ({n},), got {bpm.shape}")
        if bpm.dtype.kind not in "uif":
            raise ValueError(f"bpm must be numeric, got dtype {bpm.dtype}")
        with np.errstate(over="ignore"):
            bpm32 = np.ascontiguousarray(bpm, dtype="<f4")
        finite = np.isfinite(bpm32)
        if not finite.all():
            i = int(np.argmin(finite))
            raise ValueError(f"bpm[{i}] = {bpm[i]!r} is not finite in float32")
        self.bpm = bpm32

        if isinstance(self.tags, TagsCSR):
            self.tags = self.tags.validate(n)
        else:
            if not hasattr(self.tags, "__len__") or isinstance(self.tags, (str, bytes)):
                raise ValueError(f"tags must be a list of n lists of str or a TagsCSR, got {type(self.tags).__name__}")
            if len(self.tags) != n:
                raise ValueError(f"tags must have n = {n} rows, got {len(self.tags)}")
            self.tags = TagsCSR.from_lists(self.tags)
        if len(self.tags.ids) > _U32_MAX:
            raise ValueError(f"tags: {len(self.tags.ids)} tag assignments exceed the limit {_U32_MAX}")

        if isinstance(self.source_file, StringsCSR):
            self.source_file = self.source_file.validate(n)
        else:
            if not hasattr(self.source_file, "__len__") or isinstance(self.source_file, (str, bytes)):
                raise ValueError(f"source_file must be a list of n str or a StringsCSR, "
                                 f"got {type(self.source_file).__name__}")
            if len(self.source_file) != n:
                raise ValueError(f"source_file must have n = {n} entries, got {len(self.source_file)}")
            self.source_file = StringsCSR.from_list(self.source_file)

        archive = self.pq_codebook is not None or self.pq_codes is not None
        if archive:
            if self.pq_codebook is None or self.pq_codes is None:
                raise ValueError("an archive segment needs both pq_codebook and pq_codes")
            self.pq_codebook = _blob(self.pq_codebook, "pq_codebook")
            if len(self.pq_codebook) == 0:
                raise ValueError("pq_codebook must not be empty")
            c = self.pq_codes
            if not isinstance(c, np.ndarray) or c.dtype != np.uint8 or c.ndim != 2:
                raise ValueError(f"pq_codes must be a 2-D uint8 numpy array (n, m), got "
                                 f"{getattr(c, 'dtype', type(c).__name__)} {getattr(c, 'shape', '')}")
            if c.shape[0] != n or not 1 <= c.shape[1] <= dim:
                raise ValueError(f"pq_codes must have shape ({n}, m) with 1 <= m <= dim = {dim}, got {c.shape}")
            self.pq_codes = np.ascontiguousarray(c)
        if self.graph is not None:
            self.graph = _blob(self.graph, "graph")
        return self


def encode_utf8(strings, where: str) -> list[bytes]:
    """Each string's UTF-8 bytes. A non-str, or a str UTF-8 cannot encode (a lone surrogate), is a
    ValueError naming where.format(i=index, s=string)."""
    out = []
    for i, s in enumerate(strings):
        if not isinstance(s, str):
            raise ValueError(f"{where.format(i=i, s=s)} must be a str, got {type(s).__name__}")
        try:
            out.append(s.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise ValueError(f"{where.format(i=i, s=s)} cannot be encoded as UTF-8: {e.reason}") from None
    return out


def _check_utf8(strings, field_name):
    encode_utf8(strings, field_name + ": tag {s!r}")


def _as_1d(a, name):
    a = np.asarray(a)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a


def _int_in(x, name, lo, hi):
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {type(x).__name__}")
    x = int(x)
    if not lo <= x <= hi:
        raise ValueError(f"{name} = {x} is outside [{lo}, {hi}]")
    return x


def _u32_column(a, name, n):
    a = np.asarray(a)
    if a.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {a.shape}")
    if a.dtype.kind not in "ui":
        raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
    if n and a.dtype != np.uint32 and (int(a.min()) < 0 or int(a.max()) > _U32_MAX):
        i = int(np.argmax((a < 0) | (a > _U32_MAX)))
        raise ValueError(f"{name}[{i}] = {a[i]} is outside [0, 2^32)")
    return np.ascontiguousarray(a, dtype="<u4")


def _blob(b, name):
    if isinstance(b, bytes):
        return b
    try:
        m = memoryview(b)
    except TypeError:
        raise ValueError(f"{name} must be bytes-like, got {type(b).__name__}") from None
    if not m.c_contiguous:
        raise ValueError(f"{name} must be a contiguous buffer")
    return m.cast("B") if (m.format != "B" or m.ndim != 1) else m
