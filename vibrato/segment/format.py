"""The segment file format, version 2: one immutable file per segment (``segments/<seg_id>.vdb``).

A segment holds ``count`` rows with dense ids ``id_start .. id_start + count - 1`` (row i is id
``id_start + i``). Two kinds share one layout:

* RAW: float32 vectors + metadata columns + (optionally, flag HAS_GRAPH) an opaque HNSW graph blob
  + (version 2, flag HAS_SCAN_CODES) int8 scan codes of the vectors, which graph walks and filtered
  scans rank on before they rescore exactly (shared page cache, not each process's memory).
* ARCHIVE: float32 vectors (kept for exact scoring, CONTRACT.md D14) + metadata + an opaque PQ codebook
  blob + PQ codes ``uint8[count][pq_m]`` + (version 2, flag HAS_GRAPH) an HNSW graph blob built at
  compaction, so an archive query is a graph search like a raw segment's, not a scan of every code.

Versions: 2 is written; 1 (0.3.0) is still read. The only difference is that a version-1 archive
never has a graph (it is searched by a PQ scan + exact rerank until a compaction rewrites it).
HAS_SCAN_CODES came later within version 2: a raw segment without it (version 1, or written before)
is read as before, and a process builds the codes in its own memory on the first filtered scan
(a file's own codes are read in place then: engine/tiers.py, ensure_scan_codes).

Every integer is little-endian. Every byte of the file is covered by a checksum: the header CRC
covers the header and the section table (which holds each section's CRC32C), each section has its
own CRC32C, and the alignment padding between sections must be zero (``verify`` checks it).

File layout (as written; readers accept any order that satisfies the rules below)::

    offset                 what
    0                      fixed header (64 bytes)
    64                     section table: section_count entries of 32 bytes, sorted by kind
    64-aligned ...         live, start_time_ms, duration_ms, bpm, tag_offsets, tag_ids,
                           tag_dict_offsets, tag_dict_blob, source_offsets, source_blob,
                           [pq_codebook, pq_codes] (archive), [scan_scale, scan_codes]
                           (HAS_SCAN_CODES), [graph] (HAS_GRAPH),
                           each at a 64-byte aligned offset, zero padding in between
    4096-aligned .. EOF    vectors: float32[count][dim], row-major (last, page-aligned)

Everything the engine reads at startup (metadata, graph, codes) sits in one contiguous run of pages
before the vectors, so one ``MADV_WILLNEED`` prefetches it, and the vector pages get their own
advice (``normal``/``random``/``sequential``/``willneed``) without sharing a page with anything else.

Fixed header (64 bytes)::

    off   size  field
    0x00  8     magic  b"\\x89VBSEG\\r\\n"
    0x08  u32   version = 2 (1 is read too)
    0x0C  u32   flags: bits 0-1 kind (0 raw, 1 archive), bit 2 HAS_GRAPH, bit 3 HAS_PQ,
                bit 4 HAS_SCAN_CODES (raw only, version 2); others 0
    0x10  u64   count            1 .. 2^31-1
    0x18  u64   id_start         id_start + count - 1 <= 2^63-1
    0x20  u32   dim              1 .. 4096
    0x24  u32   level            0 .. 255 (compaction level)
    0x28  u32   pq_m             1 .. dim with HAS_PQ, else 0
    0x2C  u32   section_count    1 .. 16
    0x30  u64   file_size        the exact length of the file (catches truncation and appends)
    0x38  u32   reserved = 0
    0x3C  u32   header_crc       CRC32C over bytes [0, 0x3C) followed by the section table

Section table entry (32 bytes)::

    +0  u32 kind    +4  u32 crc32c of the section bytes    +8  u64 offset    +16 u64 length
    +24 u64 reserved = 0

Sections (kind: name, content; "n" = count)::

    1  vectors           float32[n][dim]; offset % 4096 == 0; length n*dim*4
    2  live              uint8[n]: 1 live, 0 tombstone (gap filler or deleted); no other value
    3  start_time_ms     uint32[n]
    4  duration_ms       uint32[n]
    5  bpm               float32[n] (0 = unknown)
    6  tag_dict_offsets  uint32[ntags+1]: 0 = o[0] <= ... <= o[ntags] = len(tag_dict_blob)
    7  tag_dict_blob     UTF-8 tag strings, strictly ascending in byte (= code point) order
    8  tag_offsets       uint32[n+1]: CSR row pointers into tag_ids, 0 .. nnz
    9  tag_ids           uint32[nnz]: < ntags, strictly ascending within a row
    10 source_offsets    uint64[n+1]: CSR row pointers into source_blob
    11 source_blob       UTF-8 source_file strings, concatenated (no separators, no length cap)
    12 graph             opaque HNSW bytes (HnswIndex.graph_bytes()); HAS_GRAPH only (archive: version 2)
    13 pq_codebook       opaque ProductQuantizer.to_bytes(); 64-byte aligned; archive only
    14 pq_codes          uint8[n][pq_m]; archive only
    15 scan_scale        float32[n], finite and >= 0; HAS_SCAN_CODES only
    16 scan_codes        int8[n][dim]: vector r ~ scan_scale[r] * scan_codes[r] (distance.sq8_encode,
                         |code| <= 127); HAS_SCAN_CODES only

Rules a reader enforces before mapping anything (include/vibrato/segment.h): magic, version,
header CRC, recorded == real file size, known flags and a consistent kind, the caps above, table
entries with known kinds in ascending order, reserved fields zero, every offset aligned (4096 for
vectors, 64 otherwise), after the header, inside the file (overflow-checked), no overlaps, exactly
the sections the flags require, and every length consistent with count/dim/pq_m. Then, over the
mapped bytes: live flags in {0, 1}, scan scales finite and >= 0, all three offset arrays monotonic and ending at their blob's
length, tag ids < ntags and ascending per row, the dictionary valid UTF-8, sorted and unique. The
source strings' UTF-8 is checked by ``verify()`` and, lazily, when a row is decoded. The two opaque
blobs are validated by their owners (``HnswIndex.from_graph``, ``ProductQuantizer.from_bytes``).
Scan codes are not compared with the vectors: they only choose which rows a search rescores on the
float vectors, so codes that disagree with them (a forged file with valid CRCs) cost recall, never
a wrong score, and any int8 value is in range for the kernels.

What this fixes from v2.1's .vdb v2 (CONTRACT.md D38; v2.1's format is CONTRACT.md R3): checksums
on everything, overflow-checked sizes, every section aligned (the PQ codebook too), page-aligned
vectors so madvise can apply, columnar metadata without truncation or comma-joined tags,
``duration_ms`` as uint32.
"""
from __future__ import annotations

import enum
import mmap as _mmap
import struct

from vibrato._native import segio as _segio

MAGIC = b"\x89VBSEG\r\n"
VERSION = 2  # written; readers also take MIN_VERSION
MIN_VERSION = 1
HEADER_SIZE = 64
ENTRY_SIZE = 32
MAX_SECTIONS = 16
MAX_HEADER_LEN = HEADER_SIZE + MAX_SECTIONS * ENTRY_SIZE
PAGE_ALIGN = 4096  # vector section (file offset)
ALIGN = 64  # every other section (file offset)
MAX_DIM = 4096
MAX_COUNT = 2**31 - 1
MAX_LEVEL = 255
MAX_ID = 2**63 - 1
MAX_TAG_BYTES = 2**32 - 1  # the tag dictionary blob and nnz are addressed by uint32

FLAG_KIND_MASK = 0x3
FLAG_HAS_GRAPH = 0x4
FLAG_HAS_PQ = 0x8
FLAG_HAS_SCAN_CODES = 0x10

# struct layouts (little-endian, no implicit padding)
HEADER_STRUCT = struct.Struct("<8sIIQQIIIIQI")  # everything before header_crc: 60 bytes
CRC_STRUCT = struct.Struct("<I")
ENTRY_STRUCT = struct.Struct("<IIQQQ")
assert HEADER_STRUCT.size == 60 and ENTRY_STRUCT.size == ENTRY_SIZE


class SegmentKind(enum.StrEnum):
    """What a segment holds. The string value is what the catalog stores."""

    RAW = "raw"
    ARCHIVE = "archive"

    @property
    def code(self) -> int:
        return 0 if self is SegmentKind.RAW else 1

    @classmethod
    def from_code(cls, code: int) -> "SegmentKind":
        return cls.RAW if code == 0 else cls.ARCHIVE


class Section(enum.IntEnum):
    """Section kinds (the numbers are part of the format)."""

    VECTORS = 1
    LIVE = 2
    START_TIME_MS = 3
    DURATION_MS = 4
    BPM = 5
    TAG_DICT_OFFSETS = 6
    TAG_DICT_BLOB = 7
    TAG_OFFSETS = 8
    TAG_IDS = 9
    SOURCE_OFFSETS = 10
    SOURCE_BLOB = 11
    GRAPH = 12
    PQ_CODEBOOK = 13
    PQ_CODES = 14
    SCAN_SCALE = 15
    SCAN_CODES = 16

    @property
    def label(self) -> str:
        """The section's name in messages and SegmentInfo ("vectors", "tag_ids", ...)."""
        return self.name.lower()


# The order sections are written in (vectors last, page-aligned; see the module docstring).
WRITE_ORDER = (
    Section.LIVE, Section.START_TIME_MS, Section.DURATION_MS, Section.BPM,
    Section.TAG_OFFSETS, Section.TAG_IDS, Section.TAG_DICT_OFFSETS, Section.TAG_DICT_BLOB,
    Section.SOURCE_OFFSETS, Section.SOURCE_BLOB,
    Section.PQ_CODEBOOK, Section.PQ_CODES, Section.SCAN_SCALE, Section.SCAN_CODES, Section.GRAPH,
    Section.VECTORS,
)

# Element dtypes of the columnar sections (little-endian, as stored).
DTYPES = {
    Section.VECTORS: "<f4",
    Section.LIVE: "u1",
    Section.START_TIME_MS: "<u4",
    Section.DURATION_MS: "<u4",
    Section.BPM: "<f4",
    Section.TAG_DICT_OFFSETS: "<u4",
    Section.TAG_OFFSETS: "<u4",
    Section.TAG_IDS: "<u4",
    Section.SOURCE_OFFSETS: "<u8",
    Section.PQ_CODES: "u1",
    Section.SCAN_SCALE: "<f4",
    Section.SCAN_CODES: "i1",
}

# madvise modes for the vector section; every other section gets WILLNEED at open.
MADVISE_MODES = {
    "normal": _mmap.MADV_NORMAL,
    "random": _mmap.MADV_RANDOM,
    "sequential": _mmap.MADV_SEQUENTIAL,
    "willneed": _mmap.MADV_WILLNEED,
}


def align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def flags_for(kind: SegmentKind, has_graph: bool, has_scan_codes: bool = False) -> int:
    flags = kind.code
    if kind is SegmentKind.ARCHIVE:
        flags |= FLAG_HAS_PQ
    if has_graph:
        flags |= FLAG_HAS_GRAPH
    if has_scan_codes:
        flags |= FLAG_HAS_SCAN_CODES
    return flags


def plan_layout(lengths: dict[Section, int]) -> tuple[dict[Section, int], int]:
    """Offsets for the sections in ``lengths`` (write order, aligned) and the resulting file size."""
    header_len = HEADER_SIZE + ENTRY_SIZE * len(lengths)
    pos = align_up(header_len, ALIGN)
    offsets = {}
    for sec in WRITE_ORDER:
        if sec not in lengths:
            continue
        pos = align_up(pos, PAGE_ALIGN if sec is Section.VECTORS else ALIGN)
        offsets[sec] = pos
        pos += lengths[sec]
    return offsets, pos


def pack_header(*, kind: SegmentKind, has_graph: bool, count: int, id_start: int, dim: int, level: int,
                pq_m: int, file_size: int, sections: dict[Section, tuple[int, int, int]]) -> bytes:
    """The header + section table bytes; ``sections`` maps kind -> (offset, length, crc32c)
    (HAS_SCAN_CODES follows from the scan sections' presence)."""
    flags = flags_for(kind, has_graph, Section.SCAN_CODES in sections)
    head = HEADER_STRUCT.pack(MAGIC, VERSION, flags, count, id_start, dim, level, pq_m,
                              len(sections), file_size, 0)
    table = b"".join(ENTRY_STRUCT.pack(int(sec), crc, off, length, 0)
                     for sec, (off, length, crc) in sorted(sections.items()))
    crc = _segio.crc32c(table, _segio.crc32c(head))
    return head + CRC_STRUCT.pack(crc) + table
