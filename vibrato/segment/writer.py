"""Writing segment files: ``write_segment_tmp`` (write + fsync) and ``publish_segment`` (rename +
fsync the directory).

Durable order, as the engine runs it (CONTRACT.md D4: every step is safe to crash after)::

    info = write_segment_tmp(tmp_path, data)     # 1. whole file written, fsync(file): durable bytes
    catalog: insert segment row (state building)  # 2. the catalog knows the final path
    publish_segment(tmp_path, final_path)        # 3. rename(tmp, final), fsync(dir): durable name
    catalog: activate + mark WAL rows checkpointed (one transaction)

A crash before 3 leaves only a temp file (recovery deletes it); a crash after 3 leaves a complete,
checksummed file under its final name. Files are never modified after publish.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from vibrato import kernels
from vibrato._native import segio as _segio
from vibrato.datadir import FILE_MODE, fsync_dir
from vibrato.segment import format as F
from vibrato.segment.data import SegmentData, StreamedVectors, encode_utf8

_IOV_MAX = 1024  # Linux's UIO_MAXIOV
_WRITE_CHUNK = 1 << 30  # stay below Linux's 0x7ffff000 bytes per write call


@dataclass(frozen=True)
class SectionInfo:
    name: str
    offset: int
    length: int
    crc32c: int


@dataclass(frozen=True)
class SegmentInfo:
    """What write_segment_tmp wrote (for the catalog row).

    ``checksum`` is the header CRC32C. The header holds every section's CRC32C and ``verify``
    requires all padding to be zero, so this one number identifies the whole file's content.
    """

    path: str
    size_bytes: int
    kind: F.SegmentKind
    count: int
    live_count: int
    dim: int
    level: int
    id_start: int
    id_end: int  # inclusive
    pq_m: int
    has_graph: bool
    checksum: int
    sections: tuple[SectionInfo, ...]


def _scan_codes(vectors) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(codes int8 (n, d), scale float32 (n,), crc) of a raw segment's vectors (kernels.scan_codes).
    Streamed vectors are encoded chunk by chunk (d + 4 bytes a row in memory, a quarter of the
    vectors' size) in their checksum pass, so crc is their CRC32C; None for an array."""
    if isinstance(vectors, np.ndarray):
        return *kernels.scan_codes(vectors), None
    n, dim = vectors.shape
    codes, scale = np.empty((n, dim), dtype=np.int8), np.empty(n, dtype=np.float32)
    row, crc = 0, 0
    for chunk in _stream_chunks(vectors):
        crc = _segio.crc32c(chunk, crc)
        rows = chunk.nbytes // (4 * dim)
        c, s = kernels.scan_codes(np.frombuffer(chunk, dtype=np.float32).reshape(rows, dim))
        codes[row:row + rows], scale[row:row + rows] = c, s
        row += rows
    return codes, scale, crc


def _section_buffers(data: SegmentData, scan_codes: bool) -> tuple[dict[F.Section, memoryview], dict[F.Section, int]]:
    """Every section's bytes, built with numpy (no per-row Python work beyond the string encodes),
    and the CRC32Cs already computed on the way (streamed vectors, when their codes were made)."""
    S = F.Section
    tags = data.tags
    dict_encoded = encode_utf8(tags.dictionary, "tags: tag {s!r}")
    dict_offsets = np.zeros(len(dict_encoded) + 1, dtype="<u4")
    if dict_encoded:
        total = sum(map(len, dict_encoded))
        if total > F.MAX_TAG_BYTES:
            raise ValueError(f"tags: the tag dictionary needs {total} bytes, more than {F.MAX_TAG_BYTES}")
        dict_offsets[1:] = np.cumsum(np.fromiter(map(len, dict_encoded), dtype=np.int64, count=len(dict_encoded)))
    bufs = {
        S.VECTORS: data.vectors,
        S.LIVE: data.live.view(np.uint8),
        S.START_TIME_MS: data.start_time_ms,
        S.DURATION_MS: data.duration_ms,
        S.BPM: data.bpm,
        S.TAG_DICT_OFFSETS: dict_offsets,
        S.TAG_DICT_BLOB: b"".join(dict_encoded),
        S.TAG_OFFSETS: tags.offsets,
        S.TAG_IDS: tags.ids,
        S.SOURCE_OFFSETS: data.source_file.offsets,
        S.SOURCE_BLOB: data.source_file.blob,
    }
    if data.kind is F.SegmentKind.ARCHIVE:
        bufs[S.PQ_CODEBOOK] = data.pq_codebook
        bufs[S.PQ_CODES] = data.pq_codes
    if data.graph is not None:
        bufs[S.GRAPH] = data.graph
    crcs = {}
    if scan_codes and data.kind is F.SegmentKind.RAW:
        bufs[S.SCAN_CODES], bufs[S.SCAN_SCALE], crc = _scan_codes(data.vectors)
        if crc is not None:
            crcs[S.VECTORS] = crc
    return {k: b if isinstance(b, StreamedVectors) else memoryview(b).cast("B") if not isinstance(b, bytes)
            else memoryview(b) for k, b in bufs.items()}, crcs


def _stream_chunks(stream: StreamedVectors):
    """The stream's chunks as byte views, checked against its declared shape."""
    n, dim = stream.shape
    rows = 0
    for chunk in stream.chunks():
        if not (isinstance(chunk, np.ndarray) and chunk.dtype == np.float32 and chunk.ndim == 2
                and chunk.shape[1] == dim and chunk.flags.c_contiguous):
            raise ValueError(f"streamed vectors: a chunk must be a C-contiguous float32 (rows, {dim}) array")
        rows += chunk.shape[0]
        if rows > n:
            raise ValueError(f"streamed vectors: more than the declared {n} rows")
        if chunk.shape[0]:
            yield memoryview(chunk).cast("B")
    if rows != n:
        raise ValueError(f"streamed vectors: {rows} rows, {n} declared")


def _crc(buf) -> int:
    if not isinstance(buf, StreamedVectors):
        return _segio.crc32c(buf)
    crc = 0
    for chunk in _stream_chunks(buf):
        crc = _segio.crc32c(chunk, crc)
    return crc


def _write_all(fd: int, bufs: list) -> int:
    """Write every buffer, in order, with as few syscalls as possible; handles partial writes."""
    pending = [b for b in bufs if len(b)]
    total = 0
    i = 0
    while i < len(pending):
        batch, room = [], _WRITE_CHUNK
        j = i
        while j < len(pending) and len(batch) < _IOV_MAX and room > 0:
            b = pending[j]
            if len(b) > room:
                b = b[:room]
            batch.append(b)
            room -= len(b)
            j += 1
        n = os.writev(fd, batch)
        if n <= 0:
            raise OSError(f"writev wrote {n} bytes")
        total += n
        while n > 0:
            if n >= len(pending[i]):
                n -= len(pending[i])
                i += 1
            else:
                pending[i] = pending[i][n:]
                n = 0
    return total


def write_segment_tmp(tmp_path, data: SegmentData, *, scan_codes: bool = True) -> SegmentInfo:
    """Write ``data`` as a complete segment file at ``tmp_path`` and fsync it (durable on return).

    A raw segment gets the int8 scan codes of its vectors (format.py, HAS_SCAN_CODES) unless
    ``scan_codes`` is False, which writes the layout of earlier versions (tests of reading them).

    ``tmp_path`` is created or truncated. On any failure the partial file is removed and the error
    re-raised (ValueError for invalid data, OSError for I/O). The file is not visible under its final
    name until publish_segment. Vectors, codes and columns are streamed from their numpy buffers
    with writev (no copies beyond the kernel's).
    """
    if not isinstance(data, SegmentData):
        raise ValueError(f"data must be a SegmentData, got {type(data).__name__}")
    data.validate()
    path = os.fspath(tmp_path)
    bufs, crcs = _section_buffers(data, scan_codes)
    lengths = {k: b.nbytes if isinstance(b, StreamedVectors) else len(b) for k, b in bufs.items()}
    offsets, file_size = F.plan_layout(lengths)
    sections = {k: (offsets[k], lengths[k], crcs[k] if k in crcs else _crc(b)) for k, b in bufs.items()}
    kind = data.kind
    has_graph = data.graph is not None
    header = F.pack_header(kind=kind, has_graph=has_graph, count=data.count, id_start=data.id_start, dim=data.dim,
                           level=data.level, pq_m=data.pq_m, file_size=file_size, sections=sections)
    layout = _segio.parse_header(header, file_size)  # the reader's own checks, before any byte is written

    pieces = [memoryview(header)]
    pos = len(header)
    for sec in sorted(bufs, key=lambda k: (offsets[k], lengths[k])):  # empty sections first at a tie
        if offsets[sec] > pos:
            pieces.append(memoryview(bytes(offsets[sec] - pos)))
            pos = offsets[sec]
        pieces.append(bufs[sec])
        pos += lengths[sec]
    assert pos == file_size

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        written, run = 0, []
        for piece in pieces + [None]:
            if piece is None or isinstance(piece, StreamedVectors):
                written += _write_all(fd, run)
                run = []
            if isinstance(piece, StreamedVectors):
                crc = 0
                for chunk in _stream_chunks(piece):
                    crc = _segio.crc32c(chunk, crc)
                    written += _write_all(fd, [chunk])
                if crc != sections[F.Section.VECTORS][2]:
                    raise ValueError("streamed vectors: the write pass produced other bytes than the checksum pass")
            elif piece is not None:
                run.append(piece)
        if written != file_size:
            raise OSError(f"{path}: wrote {written} bytes, expected {file_size}")
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    os.close(fd)
    return SegmentInfo(
        path=path, size_bytes=file_size, kind=kind, count=data.count, live_count=int(np.count_nonzero(data.live)),
        dim=data.dim, level=data.level, id_start=data.id_start, id_end=data.id_start + data.count - 1,
        pq_m=data.pq_m, has_graph=has_graph, checksum=layout.header_crc,
        sections=tuple(SectionInfo(name, off, ln, crc) for name, (off, ln, crc) in layout.sections.items()))


def publish_segment(tmp_path, final_path) -> None:
    """Give a written segment its final name: rename(tmp, final), then fsync the destination
    directory (and the source directory when it differs). Durable on return.

    Both paths must be on one filesystem (os.rename is atomic there; across filesystems it fails
    with EXDEV rather than copying). An existing ``final_path`` is never replaced: published
    segments are immutable, so that is a FileExistsError.
    """
    tmp, final = os.fspath(tmp_path), os.fspath(final_path)
    if os.path.lexists(final):
        raise FileExistsError(f"segment {final} already exists; segments are never replaced")
    os.rename(tmp, final)
    dst_dir = os.path.dirname(os.path.abspath(final))
    src_dir = os.path.dirname(os.path.abspath(tmp))
    fsync_dir(dst_dir)
    if src_dir != dst_dir:
        fsync_dir(src_dir)
