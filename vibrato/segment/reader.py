"""Reading segment files: a validated, read-only, zero-copy view over one mmapped segment.

``SegmentReader.open(path)`` does, in order:

1. ``open`` + ``fstat`` + ``pread`` of the first bytes; the header and section table are checked in C
   (``segio.parse_header``: magic, version, header CRC32C, overflow-checked sizes, every section
   aligned, inside the file, non-overlapping, present exactly as the flags require, lengths
   consistent with count/dim/pq_m). Nothing is mapped before this passes.
2. ``mmap`` (PROT_READ, MAP_SHARED) of the whole file, then ``segio.check_columns`` over the
   mapping (live flags, CSR offsets, tag ids, tag dictionary order and UTF-8), GIL released.
3. numpy views over the mapping, the tag dictionary decoded once, and madvise: WILLNEED for the
   pages before the vectors (metadata, codes, graph) and the chosen mode for the vector pages.

Section CRCs are *not* read by ``open`` (that would read the whole file); ``verify()`` does that,
and the engine calls it before a segment becomes readable at recovery, restore and snapshot.

Lifetime: every view (``vectors``, columns, ``graph`` ...) holds a reference to the mapping, so the
memory stays mapped while any view is alive, even after ``close()`` (which only drops the reader's
own references and its file descriptor). A view can therefore never dangle; the cost is that a
view kept past ``close()`` keeps the mapping (address space, not memory) alive until it is freed.

Thread-safety: after ``open`` returns, a reader is immutable; every property and method may be
called from any number of threads (``verify``, ``madvise`` and ``drop_page_cache`` are plain
syscalls on a shared fd/mapping). ``close()`` must not race with other calls on the same reader
(a racing call gets a ValueError, never a crash).

SIGBUS: a mapped file that is truncated underneath the process faults on access. Segment files are
never modified after publish (recovery only deletes files the catalog does not reference), which
is what makes mapping them safe.
"""
from __future__ import annotations

import logging
import mmap as _mmap
import operator
import os
import stat
from bisect import bisect_left

import numpy as np

from vibrato._native import segio as _segio
from vibrato._native.segio import SegmentChecksumError, SegmentFormatError
from vibrato.segment import format as F
from vibrato.segment.data import StringsCSR, TagsCSR

log = logging.getLogger("vibrato.segment")

_S = F.Section


class SegmentReader:
    """A validated, read-only segment. Build with ``SegmentReader.open(path)``."""

    def __init__(self):  # use open()
        self._closed = True
        self._fd = -1

    # ------------------------------------------------------------------------------------ open
    @classmethod
    def open(cls, path, madvise: str = "normal", prefetch_metadata: bool = True,
             strict_madvise: bool = False, kind: F.SegmentKind | str | None = None) -> "SegmentReader":
        """Open and validate ``path`` (see the module docstring for the order of checks).

        madvise: advice for the vector pages, one of "normal", "random", "sequential", "willneed".
        prefetch_metadata: MADV_WILLNEED on the pages before the vectors (metadata, codes, graph).
        strict_madvise: raise if the kernel refuses an madvise; by default a refusal is logged at
        WARNING (with the path, mode and errno) and kept in ``advice_error``, since the hint is not
        needed for correctness.
        kind: if given ("raw"/"archive"), a file of the other kind is a SegmentFormatError (the
        catalog row says what the file must be).

        Raises SegmentChecksumError (header CRC), SegmentFormatError (anything structural),
        OSError (I/O), ValueError (an unknown madvise mode).
        """
        if madvise not in F.MADVISE_MODES:
            raise ValueError(f"madvise must be one of {sorted(F.MADVISE_MODES)}, got {madvise!r}")
        expect = None if kind is None else F.SegmentKind(kind)
        self = cls()
        path = os.fspath(path)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)  # a symlink is ELOOP: never followed
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SegmentFormatError(f"{path}: not a regular file", path)
            head = os.pread(fd, F.MAX_HEADER_LEN, 0)
            layout = _segio.parse_header(head, st.st_size, path)
            if expect is not None and F.SegmentKind.from_code(layout.seg_kind) is not expect:
                raise SegmentFormatError(f"{path}: segment kind is {F.SegmentKind.from_code(layout.seg_kind)}, "
                                         f"expected {expect}", path)
            mapping = _segio.Mapping(fd, layout.file_size)
            _segio.check_columns(layout, mapping, path)
            self._init(path, fd, layout, mapping)
        except BaseException:
            os.close(fd)
            raise
        self._advice = None
        self.advice_error = None
        try:
            if prefetch_metadata:
                self._advise_front()
            self.madvise(madvise)
        except OSError as e:
            if strict_madvise:
                self.close()
                raise
            self.advice_error = e
            log.warning("madvise failed on segment %s (mode=%s): %s", path, madvise, e)
        return self

    def _init(self, path, fd, layout, mapping):
        self._path = path
        self._fd = fd
        self._layout = layout
        self._mapping = mapping
        self._kind = F.SegmentKind.from_code(layout.seg_kind)
        self._sections = layout.sections  # name -> (offset, length, crc)
        n, d = layout.count, layout.dim
        self._vectors = self._view(_S.VECTORS, "<f4", n * d).reshape(n, d)
        self._live = self._view(_S.LIVE, np.bool_, n)  # bytes validated to be 0 or 1
        self._start = self._view(_S.START_TIME_MS, "<u4", n)
        self._duration = self._view(_S.DURATION_MS, "<u4", n)
        self._bpm = self._view(_S.BPM, "<f4", n)
        self._tag_offsets = self._view(_S.TAG_OFFSETS, "<u4", n + 1)
        self._tag_ids = self._view(_S.TAG_IDS, "<u4", layout.nnz)
        self._tag_dict_offsets = self._view(_S.TAG_DICT_OFFSETS, "<u4", layout.ntags + 1)
        self._source_offsets = self._view(_S.SOURCE_OFFSETS, "<u8", n + 1)
        self._source_blob = self._bytes(_S.SOURCE_BLOB)
        blob = bytes(self._bytes(_S.TAG_DICT_BLOB))  # small; UTF-8 and order checked in C
        o = self._tag_dict_offsets.tolist()
        try:
            self._tag_dictionary = tuple(blob[o[i]:o[i + 1]].decode("utf-8") for i in range(len(o) - 1))
        except UnicodeDecodeError as e:  # unreachable after check_columns; kept as a backstop
            raise SegmentFormatError(f"{path}: section tag_dict_blob: {e}", path, "tag_dict_blob") from None
        self._tags = TagsCSR(list(self._tag_dictionary), self._tag_offsets, self._tag_ids)
        self._sources = StringsCSR(self._source_offsets, self._source_blob)
        self._graph = self._bytes(_S.GRAPH) if layout.has_graph else None
        if layout.has_pq:
            self._pq_codebook = self._bytes(_S.PQ_CODEBOOK)
            self._pq_codes = self._view(_S.PQ_CODES, "u1", n * layout.pq_m).reshape(n, layout.pq_m)
        else:
            self._pq_codebook = None
            self._pq_codes = None
        if layout.has_scan_codes:
            self._scan_scale = self._view(_S.SCAN_SCALE, "<f4", n)  # finite, >= 0: checked in C
            self._scan_codes = self._view(_S.SCAN_CODES, "i1", n * d).reshape(n, d)
        else:
            self._scan_scale = self._scan_codes = None
        self._closed = False

    def _view(self, sec: F.Section, dtype, count: int) -> np.ndarray:
        off, length, _ = self._sections[sec.label]
        if count == 0:
            a = np.empty(0, dtype=dtype)
            a.flags.writeable = False
            return a
        a = np.frombuffer(self._mapping, dtype=dtype, count=count, offset=off)
        assert a.nbytes == length
        return a

    def _bytes(self, sec: F.Section) -> memoryview:
        off, length, _ = self._sections[sec.label]
        return memoryview(self._mapping)[off:off + length]

    # ---------------------------------------------------------------------------- properties
    def _check_open(self):
        if self._closed:
            raise ValueError(f"segment reader for {getattr(self, '_path', '?')} is closed")

    @property
    def path(self) -> str:
        return self._path

    @property
    def kind(self) -> F.SegmentKind:
        return self._kind

    @property
    def count(self) -> int:
        return self._layout.count

    @property
    def dim(self) -> int:
        return self._layout.dim

    @property
    def level(self) -> int:
        return self._layout.level

    @property
    def id_start(self) -> int:
        return self._layout.id_start

    @property
    def id_end(self) -> int:
        """The last id in the segment (inclusive)."""
        return self._layout.id_start + self._layout.count - 1

    @property
    def pq_m(self) -> int:
        return self._layout.pq_m

    @property
    def has_graph(self) -> bool:
        return self._layout.has_graph

    @property
    def scan_codes(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The int8 scan codes of the vectors, (codes (count, dim) int8, scale (count,) float32),
        read-only and zero-copy, or None for a segment written without them (format.py)."""
        self._check_open()
        return None if self._scan_codes is None else (self._scan_codes, self._scan_scale)

    @property
    def size_bytes(self) -> int:
        return self._layout.file_size

    @property
    def checksum(self) -> int:
        """The header CRC32C (covers every section CRC; equals SegmentInfo.checksum)."""
        return self._layout.header_crc

    @property
    def sections(self) -> dict:
        """{name: (offset, length, crc32c)} as stored in the section table."""
        return dict(self._sections)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def vectors(self) -> np.ndarray:
        """(count, dim) float32, read-only, zero-copy; the data is 4096-byte aligned in memory."""
        self._check_open()
        return self._vectors

    def read_vectors_into(self, out: np.ndarray, start: int = 0) -> None:
        """Copy rows [start, start + len(out)) into ``out`` ((rows, dim) float32, C-contiguous) with
        pread.

        For bulk copies (compaction): unlike reading through the mapping, this neither adds the
        file's pages to this process's resident set nor is slowed by MADV_RANDOM on the mapping.
        """
        self._check_open()
        n, dim = self._vectors.shape
        if (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.ndim != 2 or out.shape[1] != dim
                or not out.flags.c_contiguous):
            raise ValueError(f"out must be a C-contiguous float32 array of shape (rows, {dim})")
        if not 0 <= start <= n - out.shape[0]:
            raise ValueError(f"rows [{start}, {start + out.shape[0]}) are outside the segment's {n} rows")
        off = self._sections[_S.VECTORS.label][0] + start * dim * 4
        view = memoryview(out).cast("B")
        length, done = len(view), 0
        while done < length:
            got = os.preadv(self._fd, [view[done:min(length, done + (64 << 20))]], off + done)
            if got <= 0:
                raise SegmentFormatError(f"{self._path}: vectors section ends early ({done} of {length} bytes)",
                                         self._path, "vectors")
            done += got

    @property
    def live(self) -> np.ndarray:
        """(count,) bool, read-only: True = live, False = tombstone."""
        self._check_open()
        return self._live

    @property
    def start_time_ms(self) -> np.ndarray:
        """(count,) uint32, read-only."""
        self._check_open()
        return self._start

    @property
    def duration_ms(self) -> np.ndarray:
        """(count,) uint32, read-only."""
        self._check_open()
        return self._duration

    @property
    def bpm(self) -> np.ndarray:
        """(count,) float32, read-only (0 = unknown)."""
        self._check_open()
        return self._bpm

    @property
    def tag_offsets(self) -> np.ndarray:
        """(count+1,) uint32 CSR row pointers into tag_ids."""
        self._check_open()
        return self._tag_offsets

    @property
    def tag_ids(self) -> np.ndarray:
        """(nnz,) uint32 indexes into tag_dictionary, strictly ascending within a row."""
        self._check_open()
        return self._tag_ids

    @property
    def tag_dictionary(self) -> tuple[str, ...]:
        """The segment's sorted, unique tags (decoded once at open)."""
        return self._tag_dictionary

    @property
    def source_offsets(self) -> np.ndarray:
        """(count+1,) uint64 CSR row pointers into source_blob."""
        self._check_open()
        return self._source_offsets

    @property
    def source_blob(self) -> memoryview:
        """The concatenated UTF-8 source_file strings (read-only memoryview into the mapping)."""
        self._check_open()
        return self._source_blob

    @property
    def graph(self) -> memoryview | None:
        """The HNSW graph bytes (read-only memoryview) or None (a version-1 archive, or raw without one)."""
        self._check_open()
        return self._graph

    @property
    def pq_codebook(self) -> memoryview | None:
        """ProductQuantizer.to_bytes() bytes (read-only memoryview, 64-byte aligned) or None (raw)."""
        self._check_open()
        return self._pq_codebook

    @property
    def pq_codes(self) -> np.ndarray | None:
        """(count, pq_m) uint8, read-only, or None (raw)."""
        self._check_open()
        return self._pq_codes

    @property
    def tag_dict(self) -> tuple[str, ...]:
        """Alias of tag_dictionary."""
        return self._tag_dictionary

    @property
    def tags(self) -> TagsCSR:
        """The tag column as a TagsCSR over zero-copy arrays (``.row(i)``, ``.to_lists()``; compaction
        passes it straight into SegmentData / TagsCSR.concat)."""
        self._check_open()
        return self._tags

    @property
    def source_file(self) -> StringsCSR:
        """The source_file column as a StringsCSR over the mapping (``[i]`` decodes row i)."""
        self._check_open()
        return self._sources

    # ------------------------------------------------------------------------------ metadata
    def row_of(self, id_: int) -> int:
        """The row holding id ``id_``; IndexError outside [id_start, id_end]."""
        i = operator.index(id_)
        if not self.id_start <= i <= self.id_end:
            raise IndexError(f"id {i} is outside segment {self._path} [{self.id_start}, {self.id_end}]")
        return i - self.id_start

    def _row(self, row) -> int:
        r = operator.index(row)
        if not 0 <= r < self._layout.count:
            raise IndexError(f"row {r} is outside [0, {self._layout.count}) in segment {self._path}")
        return r

    def _decode_source(self, a: int, b: int, row: int) -> str:
        try:
            return str(self._source_blob[a:b], "utf-8")
        except UnicodeDecodeError as e:
            raise self._not_utf8(row, e.reason) from None

    def _not_utf8(self, row: int, reason: str) -> SegmentFormatError:
        return SegmentFormatError(f"{self._path}: section source_blob: row {row} is not valid UTF-8 ({reason})",
                                  self._path, "source_blob")

    def row_tags(self, row: int) -> list[str]:
        """Tags of one row (sorted, unique)."""
        self._check_open()
        r = self._row(row)
        d = self._tag_dictionary
        a, b = int(self._tag_offsets[r]), int(self._tag_offsets[r + 1])
        return [d[t] for t in self._tag_ids[a:b].tolist()]

    def row_source_file(self, row: int) -> str:
        """source_file of one row; SegmentFormatError if its bytes are not valid UTF-8."""
        self._check_open()
        r = self._row(row)
        return self._decode_source(int(self._source_offsets[r]), int(self._source_offsets[r + 1]), r)

    def metadata(self, row: int) -> dict:
        """{"source_file", "start_time_ms", "duration_ms", "bpm", "tags"} of one row, decoded now."""
        self._check_open()
        return self.metadata_rows(np.array([self._row(row)], dtype=np.int64))[0]

    def metadata_rows(self, rows) -> list[dict]:
        """metadata() for many rows at once, read from the columns in one native loop
        (segio.metadata_rows); IndexError on a bad row."""
        self._check_open()
        rows = np.asarray(rows)
        if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "ui"):
            raise IndexError(f"rows must be a 1-D array of integers, got {rows.dtype} {rows.shape}")
        try:
            return _segio.metadata_rows(np.ascontiguousarray(rows, dtype=np.int64), self._start, self._duration,
                                        self._bpm, self._source_offsets, self._source_blob, self._tag_offsets,
                                        self._tag_ids, self._tag_dictionary)
        except _segio.SourceNotUtf8 as e:
            raise self._not_utf8(e.row, e.reason) from None

    def tag_id(self, tag: str) -> int | None:
        """The dictionary index of ``tag`` or None if no row has it."""
        d = self._tag_dictionary
        i = bisect_left(d, tag)
        return i if i < len(d) and d[i] == tag else None

    def rows_with_tag(self, tag: str) -> np.ndarray:
        """Sorted int64 rows that carry ``tag`` (O(nnz); for building filter indexes)."""
        self._check_open()
        t = self.tag_id(tag)
        if t is None:
            return np.zeros(0, dtype=np.int64)
        pos = np.flatnonzero(self._tag_ids == t)
        return np.searchsorted(self._tag_offsets, pos, side="right").astype(np.int64) - 1

    # ------------------------------------------------------------------------ integrity / IO
    def verify(self, *, skip_vectors: bool = False, evict: bool = False) -> int:
        """Re-read the whole file and check the header CRC, every section's CRC32C, that all padding
        is zero and that every source_file string is valid UTF-8. Returns the bytes checked.

        skip_vectors: leave the (bulk) vector section unread — the quick check the engine runs at
        start-up so that opening a large data dir is not a full scan; the background scrubber
        verifies the vectors later.
        evict: afterwards, drop the file's page-cache pages that no mapping uses
        (posix_fadvise DONTNEED), so a background scrub does not push the queries' working set out
        of the page cache; pages this process has mapped and touched stay.

        Raises SegmentChecksumError naming the section and file, SegmentFormatError, OSError.
        Reads with pread (GIL released), so it neither populates the mapping nor is slowed by
        MADV_RANDOM on it.
        """
        self._check_open()
        skip = (1 << int(_S.VECTORS)) if skip_vectors else 0
        try:
            nbytes = _segio.verify_fd(self._layout, self._fd, self._path, skip_kinds=skip)
        finally:
            if evict:
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        _segio.check_source_utf8(self._layout, self._mapping, self._path)
        return nbytes

    def madvise(self, mode: str) -> None:
        """Apply ``mode`` ("normal", "random", "sequential", "willneed") to the vector pages.

        The vector section starts on a 4096-byte boundary; the range is rounded out to the system
        page size. Raises OSError if the kernel refuses (never a silent no-op). May be called again
        at runtime to change the advice.
        """
        self._check_open()
        if mode not in F.MADVISE_MODES:
            raise ValueError(f"madvise mode must be one of {sorted(F.MADVISE_MODES)}, got {mode!r}")
        off, length, _ = self._sections[_S.VECTORS.label]
        try:
            self._mapping.madvise(off, length, F.MADVISE_MODES[mode])
        except OSError as e:
            raise OSError(e.errno, f"{self._path}: madvise({mode}) on the vector section failed: "
                                   f"{e.strerror}") from None
        self._advice = mode

    @property
    def advice(self) -> str | None:
        """The madvise mode last applied successfully to the vector pages."""
        return self._advice

    def _advise_front(self) -> None:
        """MADV_WILLNEED on every non-vector section (rounded out to pages)."""
        ranges = sorted((off, off + ln) for name, (off, ln, _) in self._sections.items()
                        if name != _S.VECTORS.label and ln)
        merged = []
        for a, b in ranges:
            if merged and a <= F.align_up(merged[-1][1], _segio.PAGE_SIZE):
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        for a, b in merged:
            try:
                self._mapping.madvise(a, b - a, F.MADVISE_MODES["willneed"])
            except OSError as e:
                raise OSError(e.errno, f"{self._path}: madvise(willneed) on [{a}, {b}) failed: {e.strerror}") from None

    def resident_fraction(self) -> float:
        """Fraction of the vector pages resident in memory (mincore); for cache benchmarks."""
        self._check_open()
        off, length, _ = self._sections[_S.VECTORS.label]
        res, total = self._mapping.resident_pages(off, length)
        return res / total if total else 1.0

    def drop_page_cache(self) -> None:
        """Evict this file's pages: MADV_DONTNEED on the mapping (drops this process's page-table
        entries, which keep pages pinned), then posix_fadvise(DONTNEED) on the file. For cold-cache
        benchmarks; other processes that map the file keep their pages. Raises OSError on failure.
        """
        self._check_open()
        self._mapping.madvise(0, self._mapping.size, _mmap.MADV_DONTNEED)
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    # ------------------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Close the fd and drop the reader's views (idempotent). Views handed out earlier stay
        valid (they keep the mapping alive); the mapping is unmapped when the last one is freed."""
        if self._closed:
            return
        self._closed = True
        fd, self._fd = self._fd, -1
        for name in ("_vectors", "_live", "_start", "_duration", "_bpm", "_tag_offsets", "_tag_ids",
                     "_tag_dict_offsets", "_source_offsets", "_source_blob", "_tags", "_sources", "_graph",
                     "_pq_codebook", "_pq_codes", "_mapping"):
            setattr(self, name, None)
        if fd >= 0:
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        state = "closed" if self._closed else "open"
        return (f"SegmentReader({getattr(self, '_path', '?')!r}, {state}, kind={getattr(self, '_kind', '?')}, "
                f"count={self.count if hasattr(self, '_layout') else '?'})")


__all__ = ["SegmentReader", "SegmentFormatError", "SegmentChecksumError"]
