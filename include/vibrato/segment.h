/*
 * Segment file format (".vdb" v1 of Vibrato): structural validation of untrusted bytes.
 *
 * The layout is documented in vibrato/segment/format.py (the single source of truth for writers);
 * this header holds the constants it shares with that file and the checks a reader runs before it
 * serves anything from a segment. Every function here treats its input as hostile: every count is
 * checked against the bytes it describes, every product and sum is overflow-checked, and nothing
 * is allocated from a size read from the file.
 *
 * All integers are little-endian; loads go through vb_load_le32/64 (common.h), so no pointer passed
 * here needs any alignment (the format aligns sections anyway). Little-endian hosts only.
 *
 * Errors: functions return VB_OK, VB_ECORRUPT (a structural problem; `err` gets a message naming
 * the field, the bad value and the limit), VB_SEG_ECHECKSUM (a CRC32C mismatch) or VB_SEG_EIO
 * (a read failed; errno is kept in the result). Nothing aborts, nothing exits.
 *
 * Thread-safety: every function is pure over its inputs (plus pread on a caller's fd), so calls
 * may run concurrently once vb_crc32c_init() has run. Callers release the GIL around them.
 */
#pragma once

#include <errno.h>
#include <float.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vibrato/common.h"
#include "vibrato/crc32c.h"

#define VB_SEG_ECHECKSUM (-16) /* a stored CRC32C does not match the bytes */
#define VB_SEG_EIO (-17)       /* pread failed or the file shrank while being read */

#define VB_SEG_MAGIC "\x89VBSEG\r\n" /* 8 bytes; \r\n catches text-mode transfers, like PNG */
#define VB_SEG_MAGIC_LEN 8
#define VB_SEG_VERSION 2u          /* written; 2 adds the graph section to archive segments */
#define VB_SEG_VERSION_MIN 1u      /* oldest version read (0.3.0's segments) */
#define VB_SEG_HEADER_SIZE 64u     /* fixed header; the section table follows it */
#define VB_SEG_ENTRY_SIZE 32u      /* one section-table entry */
#define VB_SEG_MAX_SECTIONS 16u    /* table size cap: the header block is at most 576 bytes */
#define VB_SEG_MAX_HEADER_LEN (VB_SEG_HEADER_SIZE + VB_SEG_MAX_SECTIONS * VB_SEG_ENTRY_SIZE)
#define VB_SEG_CRC_FIELD 60u       /* offset of the header CRC; the CRC covers [0,60) + table */
#define VB_SEG_PAGE_ALIGN 4096u    /* vector section alignment (file offset) */
#define VB_SEG_ALIGN 64u           /* every other section's alignment (file offset) */
#define VB_SEG_MAX_DIM 4096u
#define VB_SEG_MAX_COUNT 0x7FFFFFFFull /* rows are uint32 internal ids; keep the top bit free */
#define VB_SEG_MAX_LEVEL 255u
#define VB_SEG_MAX_ID 0x7FFFFFFFFFFFFFFFull /* ids are int64 to every caller */

/* flags (header offset 0x0C) */
#define VB_SEG_FLAG_KIND_MASK 0x3u /* 0 = raw, 1 = archive */
#define VB_SEG_FLAG_HAS_GRAPH 0x4u
#define VB_SEG_FLAG_HAS_PQ 0x8u
#define VB_SEG_FLAG_HAS_SCAN_CODES 0x10u /* raw, version 2: int8 scan codes of the vectors */
#define VB_SEG_FLAGS_KNOWN 0x1Fu

#define VB_SEG_KIND_RAW 0u
#define VB_SEG_KIND_ARCHIVE 1u

/* Section kinds (table entries are sorted by kind, each at most once). */
enum {
    VB_SEC_VECTORS = 1,          /* float32[count][dim], row-major, page-aligned */
    VB_SEC_LIVE = 2,             /* uint8[count]: 1 = live, 0 = tombstone, nothing else */
    VB_SEC_START_TIME_MS = 3,    /* uint32[count] */
    VB_SEC_DURATION_MS = 4,      /* uint32[count] */
    VB_SEC_BPM = 5,              /* float32[count] (0 = unknown) */
    VB_SEC_TAG_DICT_OFFSETS = 6, /* uint32[ntags + 1], 0 .. len(TAG_DICT_BLOB), non-decreasing */
    VB_SEC_TAG_DICT_BLOB = 7,    /* utf-8 tag strings, strictly ascending in byte order */
    VB_SEC_TAG_OFFSETS = 8,      /* uint32[count + 1], 0 .. nnz, non-decreasing (CSR row pointers) */
    VB_SEC_TAG_IDS = 9,          /* uint32[nnz], each < ntags, strictly ascending within a row */
    VB_SEC_SOURCE_OFFSETS = 10,  /* uint64[count + 1], 0 .. len(SOURCE_BLOB), non-decreasing */
    VB_SEC_SOURCE_BLOB = 11,     /* utf-8 source_file strings, concatenated */
    VB_SEC_GRAPH = 12,           /* opaque HNSW graph bytes (HAS_GRAPH: raw, or archive from version 2) */
    VB_SEC_PQ_CODEBOOK = 13,     /* opaque ProductQuantizer.to_bytes() (archive) */
    VB_SEC_PQ_CODES = 14,        /* uint8[count][pq_m] (archive) */
    VB_SEC_SCAN_SCALE = 15,      /* float32[count], finite and >= 0 (HAS_SCAN_CODES) */
    VB_SEC_SCAN_CODES = 16,      /* int8[count][dim]: row r ~ scan_scale[r] * codes (HAS_SCAN_CODES) */
    VB_SEC_NKINDS = 16,
};

static inline const char *vb_seg_section_name(uint32_t kind) {
    switch (kind) {
    case VB_SEC_VECTORS: return "vectors";
    case VB_SEC_LIVE: return "live";
    case VB_SEC_START_TIME_MS: return "start_time_ms";
    case VB_SEC_DURATION_MS: return "duration_ms";
    case VB_SEC_BPM: return "bpm";
    case VB_SEC_TAG_DICT_OFFSETS: return "tag_dict_offsets";
    case VB_SEC_TAG_DICT_BLOB: return "tag_dict_blob";
    case VB_SEC_TAG_OFFSETS: return "tag_offsets";
    case VB_SEC_TAG_IDS: return "tag_ids";
    case VB_SEC_SOURCE_OFFSETS: return "source_offsets";
    case VB_SEC_SOURCE_BLOB: return "source_blob";
    case VB_SEC_GRAPH: return "graph";
    case VB_SEC_PQ_CODEBOOK: return "pq_codebook";
    case VB_SEC_PQ_CODES: return "pq_codes";
    case VB_SEC_SCAN_SCALE: return "scan_scale";
    case VB_SEC_SCAN_CODES: return "scan_codes";
    default: return "unknown";
    }
}

typedef struct {
    uint32_t kind;   /* VB_SEC_*; 0 in an absent slot */
    uint32_t crc;    /* CRC32C of the section's bytes (0 for an empty section) */
    uint64_t offset; /* from the start of the file */
    uint64_t length; /* bytes */
} vb_seg_section_t;

/* A validated header: every field below has passed vb_seg_parse_header's checks. */
typedef struct {
    uint32_t version;
    uint32_t flags;
    uint32_t seg_kind; /* VB_SEG_KIND_* */
    uint32_t dim;
    uint32_t level;
    uint32_t pq_m;     /* 0 unless HAS_PQ */
    uint32_t nsections;
    uint32_t header_crc;
    uint64_t count;
    uint64_t id_start;
    uint64_t file_size;
    uint64_t header_len; /* 64 + 32 * nsections */
    uint64_t ntags;      /* derived: entries of the tag dictionary */
    uint64_t nnz;        /* derived: total tag assignments */
    uint32_t present;    /* bit k set when section kind k is present */
    vb_seg_section_t sec[VB_SEC_NKINDS + 1]; /* indexed by kind; sec[0] unused */
} vb_seg_layout_t;

/* Sections a segment with these flags must hold (bit k = kind k); nothing else is allowed. */
static inline uint32_t vb_seg_required_mask(uint32_t flags) {
    uint32_t m = 0;
    for (uint32_t k = VB_SEC_VECTORS; k <= VB_SEC_SOURCE_BLOB; k++) m |= 1u << k;
    if (flags & VB_SEG_FLAG_HAS_GRAPH) m |= 1u << VB_SEC_GRAPH;
    if (flags & VB_SEG_FLAG_HAS_PQ) m |= (1u << VB_SEC_PQ_CODEBOOK) | (1u << VB_SEC_PQ_CODES);
    if (flags & VB_SEG_FLAG_HAS_SCAN_CODES) m |= (1u << VB_SEC_SCAN_SCALE) | (1u << VB_SEC_SCAN_CODES);
    return m;
}

/* The present sections' kinds in file order, by (offset, length); returns how many. */
static inline uint32_t vb_seg_sorted_sections(const vb_seg_layout_t *L, uint32_t order[VB_SEC_NKINDS]) {
    uint32_t m = 0;
    for (uint32_t k = 1; k <= VB_SEC_NKINDS; k++) {
        if (!(L->present & (1u << k))) continue;
        uint32_t j = m++;
        while (j > 0 && (L->sec[order[j - 1]].offset > L->sec[k].offset ||
                         (L->sec[order[j - 1]].offset == L->sec[k].offset &&
                          L->sec[order[j - 1]].length > L->sec[k].length))) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = k;
    }
    return m;
}

/*
 * Parse and validate the fixed header and the section table.
 *
 * buf: the first min(file_size, VB_SEG_MAX_HEADER_LEN) bytes of the file (more is fine).
 * file_size: the file's real size (fstat), checked against the size the header records.
 * Checks, in order: length, magic, version, table size, header CRC32C, recorded file size, flags,
 * field caps (dim, count, level, id range, pq_m), then every table entry (known kind, ascending,
 * reserved zero, alignment, after the header, inside the file with overflow-checked ends), the
 * exact set of sections the flags require, each section's length against count/dim/pq_m, and
 * finally that no two sections overlap. On VB_OK, *out is fully filled.
 */
static inline int vb_seg_parse_header(const uint8_t *buf, size_t buflen, uint64_t file_size,
                                      vb_seg_layout_t *out, char *err, size_t errlen) {
    memset(out, 0, sizeof(*out));
    if (buflen >= VB_SEG_MAGIC_LEN && memcmp(buf, VB_SEG_MAGIC, VB_SEG_MAGIC_LEN) != 0)
        return vb_fail(err, errlen, VB_ECORRUPT, "bad magic: not a Vibrato segment file");
    if (buflen < VB_SEG_HEADER_SIZE || file_size < VB_SEG_HEADER_SIZE)
        return vb_fail(err, errlen, VB_ECORRUPT,
                           "file is %llu bytes, shorter than the %u-byte segment header",
                           (unsigned long long)(file_size < buflen ? file_size : buflen), VB_SEG_HEADER_SIZE);
    if (memcmp(buf, VB_SEG_MAGIC, VB_SEG_MAGIC_LEN) != 0)
        return vb_fail(err, errlen, VB_ECORRUPT, "bad magic: not a Vibrato segment file");
    uint32_t version = vb_load_le32(buf + 0x08);
    if (version < VB_SEG_VERSION_MIN || version > VB_SEG_VERSION)
        return vb_fail(err, errlen, VB_ECORRUPT,
                           "unsupported segment format version %u (this reader reads versions %u..%u)",
                           version, VB_SEG_VERSION_MIN, VB_SEG_VERSION);
    uint32_t nsec = vb_load_le32(buf + 0x2C);
    if (nsec == 0 || nsec > VB_SEG_MAX_SECTIONS)
        return vb_fail(err, errlen, VB_ECORRUPT, "section_count %u is outside 1..%u", nsec,
                           VB_SEG_MAX_SECTIONS);
    uint64_t header_len = VB_SEG_HEADER_SIZE + (uint64_t)nsec * VB_SEG_ENTRY_SIZE;
    if (header_len > buflen || header_len > file_size)
        return vb_fail(err, errlen, VB_ECORRUPT,
                           "header and section table need %llu bytes, the file has %llu (truncated)",
                           (unsigned long long)header_len,
                           (unsigned long long)(file_size < buflen ? file_size : buflen));
    uint32_t stored_crc = vb_load_le32(buf + VB_SEG_CRC_FIELD);
    uint32_t crc = vb_crc32c(0, buf, VB_SEG_CRC_FIELD);
    crc = vb_crc32c(crc, buf + VB_SEG_HEADER_SIZE, (size_t)(header_len - VB_SEG_HEADER_SIZE));
    if (crc != stored_crc)
        return vb_fail(err, errlen, VB_SEG_ECHECKSUM,
                           "header checksum mismatch: stored 0x%08x, computed 0x%08x", stored_crc, crc);

    out->version = version;
    out->flags = vb_load_le32(buf + 0x0C);
    out->count = vb_load_le64(buf + 0x10);
    out->id_start = vb_load_le64(buf + 0x18);
    out->dim = vb_load_le32(buf + 0x20);
    out->level = vb_load_le32(buf + 0x24);
    out->pq_m = vb_load_le32(buf + 0x28);
    out->nsections = nsec;
    out->file_size = vb_load_le64(buf + 0x30);
    out->header_crc = stored_crc;
    out->header_len = header_len;
    uint32_t reserved = vb_load_le32(buf + 0x38);

    if (out->file_size != file_size)
        return vb_fail(err, errlen, VB_ECORRUPT,
                           "file is %llu bytes but its header records %llu (truncated or extended)",
                           (unsigned long long)file_size, (unsigned long long)out->file_size);
    if (reserved != 0)
        return vb_fail(err, errlen, VB_ECORRUPT, "reserved header field is 0x%08x, expected 0", reserved);
    if (out->flags & ~VB_SEG_FLAGS_KNOWN)
        return vb_fail(err, errlen, VB_ECORRUPT, "unknown header flags 0x%08x (known: 0x%x)", out->flags,
                           VB_SEG_FLAGS_KNOWN);
    out->seg_kind = out->flags & VB_SEG_FLAG_KIND_MASK;
    int has_graph = (out->flags & VB_SEG_FLAG_HAS_GRAPH) != 0;
    int has_pq = (out->flags & VB_SEG_FLAG_HAS_PQ) != 0;
    int has_scan_codes = (out->flags & VB_SEG_FLAG_HAS_SCAN_CODES) != 0;
    if (out->seg_kind == VB_SEG_KIND_RAW) {
        if (has_pq) return vb_fail(err, errlen, VB_ECORRUPT, "a raw segment must not set HAS_PQ");
        if (has_scan_codes && out->version < 2)
            return vb_fail(err, errlen, VB_ECORRUPT, "a version-1 segment must not set HAS_SCAN_CODES");
    } else if (out->seg_kind == VB_SEG_KIND_ARCHIVE) {
        if (!has_pq) return vb_fail(err, errlen, VB_ECORRUPT, "an archive segment must set HAS_PQ");
        if (has_scan_codes)
            return vb_fail(err, errlen, VB_ECORRUPT, "an archive segment must not set HAS_SCAN_CODES");
        if (has_graph && out->version < 2)
            return vb_fail(err, errlen, VB_ECORRUPT, "a version-1 archive segment must not set HAS_GRAPH");
    } else {
        return vb_fail(err, errlen, VB_ECORRUPT, "unknown segment kind %u (0 = raw, 1 = archive)",
                           out->seg_kind);
    }
    if (out->dim == 0 || out->dim > VB_SEG_MAX_DIM)
        return vb_fail(err, errlen, VB_ECORRUPT, "dim %u is outside 1..%u", out->dim, VB_SEG_MAX_DIM);
    if (out->count == 0 || out->count > VB_SEG_MAX_COUNT)
        return vb_fail(err, errlen, VB_ECORRUPT, "count %llu is outside 1..%llu",
                           (unsigned long long)out->count, (unsigned long long)VB_SEG_MAX_COUNT);
    if (out->level > VB_SEG_MAX_LEVEL)
        return vb_fail(err, errlen, VB_ECORRUPT, "level %u exceeds %u", out->level, VB_SEG_MAX_LEVEL);
    if (out->id_start > VB_SEG_MAX_ID - (out->count - 1))
        return vb_fail(err, errlen, VB_ECORRUPT, "id range %llu + %llu rows exceeds the int64 id space",
                           (unsigned long long)out->id_start, (unsigned long long)out->count);
    if (has_pq ? (out->pq_m == 0 || out->pq_m > out->dim) : out->pq_m != 0)
        return vb_fail(err, errlen, VB_ECORRUPT, "pq_m %u is invalid (1..dim=%u with PQ, 0 without)",
                           out->pq_m, out->dim);

    /* Section table. */
    uint32_t prev_kind = 0;
    for (uint32_t i = 0; i < nsec; i++) {
        const uint8_t *e = buf + VB_SEG_HEADER_SIZE + (size_t)i * VB_SEG_ENTRY_SIZE;
        uint32_t kind = vb_load_le32(e);
        uint32_t scrc = vb_load_le32(e + 4);
        uint64_t off = vb_load_le64(e + 8);
        uint64_t len = vb_load_le64(e + 16);
        uint64_t res = vb_load_le64(e + 24);
        uint64_t end;
        if (kind == 0 || kind > VB_SEC_NKINDS)
            return vb_fail(err, errlen, VB_ECORRUPT, "section table entry %u has unknown kind %u", i, kind);
        const char *name = vb_seg_section_name(kind);
        if (kind <= prev_kind)
            return vb_fail(err, errlen, VB_ECORRUPT,
                               "section table entry %u (%s) is out of order or repeated (kinds must ascend)",
                               i, name);
        prev_kind = kind;
        if (res != 0)
            return vb_fail(err, errlen, VB_ECORRUPT, "section %s: reserved field is %llu, expected 0", name,
                               (unsigned long long)res);
        uint64_t align = kind == VB_SEC_VECTORS ? VB_SEG_PAGE_ALIGN : VB_SEG_ALIGN;
        if (off % align != 0)
            return vb_fail(err, errlen, VB_ECORRUPT, "section %s: offset %llu is not %llu-byte aligned",
                               name, (unsigned long long)off, (unsigned long long)align);
        if (off < header_len)
            return vb_fail(err, errlen, VB_ECORRUPT,
                               "section %s: offset %llu overlaps the header (%llu bytes)", name,
                               (unsigned long long)off, (unsigned long long)header_len);
        if (vb_add_overflow(off, len, &end) || end > file_size)
            return vb_fail(err, errlen, VB_ECORRUPT,
                               "section %s: offset %llu + length %llu runs past the end of the file (%llu bytes)",
                               name, (unsigned long long)off, (unsigned long long)len,
                               (unsigned long long)file_size);
        out->sec[kind].kind = kind;
        out->sec[kind].crc = scrc;
        out->sec[kind].offset = off;
        out->sec[kind].length = len;
        out->present |= 1u << kind;
    }
    uint32_t required = vb_seg_required_mask(out->flags);
    for (uint32_t k = 1; k <= VB_SEC_NKINDS; k++) {
        uint32_t bit = 1u << k;
        if ((required & bit) && !(out->present & bit))
            return vb_fail(err, errlen, VB_ECORRUPT, "required section %s is missing", vb_seg_section_name(k));
        if (!(required & bit) && (out->present & bit))
            return vb_fail(err, errlen, VB_ECORRUPT, "section %s is not allowed with flags 0x%x",
                               vb_seg_section_name(k), out->flags);
    }

    /* Lengths against count / dim / pq_m (count <= 2^31 and dim <= 4096, but check anyway). */
    uint64_t n = out->count, want, n1 = out->count + 1;
#define VB_SEG_WANT(kind_, a_, b_)                                                                         \
    do {                                                                                                   \
        if (vb_mul_overflow((a_), (b_), &want) || out->sec[kind_].length != want)                             \
            return vb_fail(err, errlen, VB_ECORRUPT,                                                   \
                               "section %s: length %llu does not match the header (expected %llu * %llu)", \
                               vb_seg_section_name(kind_), (unsigned long long)out->sec[kind_].length,     \
                               (unsigned long long)(a_), (unsigned long long)(b_));                        \
    } while (0)
    uint64_t row_bytes;
    if (vb_mul_overflow((uint64_t)out->dim, 4, &row_bytes))
        return vb_fail(err, errlen, VB_ECORRUPT, "dim overflows");
    VB_SEG_WANT(VB_SEC_VECTORS, n, row_bytes);
    VB_SEG_WANT(VB_SEC_LIVE, n, 1);
    VB_SEG_WANT(VB_SEC_START_TIME_MS, n, 4);
    VB_SEG_WANT(VB_SEC_DURATION_MS, n, 4);
    VB_SEG_WANT(VB_SEC_BPM, n, 4);
    VB_SEG_WANT(VB_SEC_TAG_OFFSETS, n1, 4);
    VB_SEG_WANT(VB_SEC_SOURCE_OFFSETS, n1, 8);
    if (has_pq) VB_SEG_WANT(VB_SEC_PQ_CODES, n, (uint64_t)out->pq_m);
    if (has_scan_codes) {
        VB_SEG_WANT(VB_SEC_SCAN_SCALE, n, 4);
        VB_SEG_WANT(VB_SEC_SCAN_CODES, n, (uint64_t)out->dim);
    }
#undef VB_SEG_WANT
    uint64_t dol = out->sec[VB_SEC_TAG_DICT_OFFSETS].length;
    if (dol < 4 || dol % 4 != 0)
        return vb_fail(err, errlen, VB_ECORRUPT,
                           "section tag_dict_offsets: length %llu is not a positive multiple of 4",
                           (unsigned long long)dol);
    out->ntags = dol / 4 - 1;
    uint64_t til = out->sec[VB_SEC_TAG_IDS].length;
    if (til % 4 != 0)
        return vb_fail(err, errlen, VB_ECORRUPT, "section tag_ids: length %llu is not a multiple of 4",
                           (unsigned long long)til);
    out->nnz = til / 4;
    if (out->ntags > UINT32_MAX || out->nnz > UINT32_MAX)
        return vb_fail(err, errlen, VB_ECORRUPT, "tag dictionary or tag_ids exceed 2^32 entries");
    if (out->sec[VB_SEC_TAG_DICT_BLOB].length > UINT32_MAX)
        return vb_fail(err, errlen, VB_ECORRUPT, "section tag_dict_blob exceeds 4 GiB");

    /* No two sections overlap, and an empty section does not sit inside another one: sort the
     * (at most 16) half-open ranges by (offset, length) and compare neighbours. */
    uint32_t order[VB_SEC_NKINDS];
    uint32_t m = vb_seg_sorted_sections(out, order);
    for (uint32_t i = 1; i < m; i++) {
        const vb_seg_section_t *a = &out->sec[order[i - 1]], *b = &out->sec[order[i]];
        if (a->offset + a->length > b->offset) /* ends were checked for overflow above */
            return vb_fail(err, errlen, VB_ECORRUPT, "sections %s [%llu, +%llu) and %s [%llu, +%llu) overlap",
                               vb_seg_section_name(a->kind), (unsigned long long)a->offset,
                               (unsigned long long)a->length, vb_seg_section_name(b->kind),
                               (unsigned long long)b->offset, (unsigned long long)b->length);
    }
    return VB_OK;
}

/* ---- Column checks. Each returns VB_OK or VB_ECORRUPT with *bad = the first bad index. ---- */

/* uint8 flags: only 0 (tombstone) and 1 (live). */
static inline int vb_seg_check_live(const uint8_t *p, size_t n, size_t *bad) {
    for (size_t i = 0; i < n; i++)
        if (p[i] > 1) {
            *bad = i;
            return VB_ECORRUPT;
        }
    return VB_OK;
}

/* Scan-code scales: finite and >= 0 (vb_sq8_encode writes amax / 127, or 0 for a zero row), so the
 * int8 kernels never see a NaN or an infinity from a file. */
static inline int vb_seg_check_scales(const uint8_t *p, size_t n, size_t *bad) {
    for (size_t i = 0; i < n; i++) {
        uint32_t bits = vb_load_le32(p + 4 * i);
        float v;
        memcpy(&v, &bits, 4);
        if (!(v >= 0.f && v <= FLT_MAX)) { /* false for NaN, negatives and +inf */
            *bad = i;
            return VB_ECORRUPT;
        }
    }
    return VB_OK;
}

/* CSR row pointers, n1 = rows + 1 entries: off[0] == 0, non-decreasing, off[n1-1] == end.
 * *bad = the index of the first entry that breaks it (n1 - 1 when only the last value is wrong). */
static inline int vb_seg_check_offsets32(const uint8_t *p, size_t n1, uint64_t end, size_t *bad) {
    if (n1 == 0 || vb_load_le32(p) != 0) {
        *bad = 0;
        return VB_ECORRUPT;
    }
    uint32_t prev = 0;
    for (size_t i = 1; i < n1; i++) {
        uint32_t v = vb_load_le32(p + 4 * i);
        if (v < prev) {
            *bad = i;
            return VB_ECORRUPT;
        }
        prev = v;
    }
    if ((uint64_t)prev != end) {
        *bad = n1 - 1;
        return VB_ECORRUPT;
    }
    return VB_OK;
}

static inline int vb_seg_check_offsets64(const uint8_t *p, size_t n1, uint64_t end, size_t *bad) {
    if (n1 == 0 || vb_load_le64(p) != 0) {
        *bad = 0;
        return VB_ECORRUPT;
    }
    uint64_t prev = 0;
    for (size_t i = 1; i < n1; i++) {
        uint64_t v = vb_load_le64(p + 8 * i);
        if (v < prev) {
            *bad = i;
            return VB_ECORRUPT;
        }
        prev = v;
    }
    if (prev != end) {
        *bad = n1 - 1;
        return VB_ECORRUPT;
    }
    return VB_OK;
}

/* Tag ids of each row (offsets already valid, n rows): every id < ntags and strictly ascending
 * within its row (the caller's tags are sorted and de-duplicated; the dictionary is sorted).
 * *bad = the row. */
static inline int vb_seg_check_tag_ids(const uint8_t *offs, size_t n, const uint8_t *ids, uint64_t ntags,
                                       size_t *bad) {
    for (size_t r = 0; r < n; r++) {
        uint32_t a = vb_load_le32(offs + 4 * r), b = vb_load_le32(offs + 4 * (r + 1));
        uint64_t prev = 0;
        for (uint32_t j = a; j < b; j++) {
            uint64_t id = vb_load_le32(ids + 4 * (size_t)j);
            if (id >= ntags || (j > a && id <= prev)) {
                *bad = r;
                return VB_ECORRUPT;
            }
            prev = id;
        }
    }
    return VB_OK;
}

/* Dictionary strings (offsets already valid) strictly ascending in byte order (= code-point order
 * for valid UTF-8), hence unique. *bad = the index of the first string not above its predecessor. */
static inline int vb_seg_check_dict_order(const uint8_t *doffs, size_t ntags, const uint8_t *blob, size_t *bad) {
    for (size_t i = 1; i < ntags; i++) {
        uint32_t a0 = vb_load_le32(doffs + 4 * (i - 1)), a1 = vb_load_le32(doffs + 4 * i);
        uint32_t b1 = vb_load_le32(doffs + 4 * (i + 1));
        size_t la = a1 - a0, lb = b1 - a1;
        int c = memcmp(blob + a0, blob + a1, la < lb ? la : lb);
        if (c > 0 || (c == 0 && la >= lb)) {
            *bad = i;
            return VB_ECORRUPT;
        }
    }
    return VB_OK;
}

/* Strict UTF-8 (RFC 3629: no overlongs, no surrogates, <= U+10FFFF). Returns the length of the valid
 * prefix (== len when valid). */
static inline size_t vb_seg_utf8_valid_prefix(const uint8_t *s, size_t len) {
    size_t i = 0;
    while (i < len) {
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t need;
        uint8_t lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) need = 1;
        else if (c == 0xE0) { need = 2; lo = 0xA0; }
        else if (c >= 0xE1 && c <= 0xEC) need = 2;
        else if (c == 0xED) { need = 2; hi = 0x9F; }
        else if (c >= 0xEE && c <= 0xEF) need = 2;
        else if (c == 0xF0) { need = 3; lo = 0x90; }
        else if (c >= 0xF1 && c <= 0xF3) need = 3;
        else if (c == 0xF4) { need = 3; hi = 0x8F; }
        else return i;
        if (len - i <= need) return i;
        if (s[i + 1] < lo || s[i + 1] > hi) return i;
        for (size_t k = 2; k <= need; k++)
            if ((s[i + k] & 0xC0) != 0x80) return i;
        i += need + 1;
    }
    return len;
}

/* Every string of a CSR string column (uint64 offsets, already valid) is valid UTF-8 on its own.
 * *bad = the row of the first invalid string. */
static inline int vb_seg_check_utf8_csr64(const uint8_t *offs, size_t n, const uint8_t *blob, size_t *bad) {
    for (size_t r = 0; r < n; r++) {
        uint64_t a = vb_load_le64(offs + 8 * r), b = vb_load_le64(offs + 8 * (r + 1));
        if (vb_seg_utf8_valid_prefix(blob + a, (size_t)(b - a)) != (size_t)(b - a)) {
            *bad = r;
            return VB_ECORRUPT;
        }
    }
    return VB_OK;
}

static inline int vb_seg_check_utf8_csr32(const uint8_t *offs, size_t n, const uint8_t *blob, size_t *bad) {
    for (size_t r = 0; r < n; r++) {
        uint32_t a = vb_load_le32(offs + 4 * r), b = vb_load_le32(offs + 4 * (r + 1));
        if (vb_seg_utf8_valid_prefix(blob + a, (size_t)(b - a)) != (size_t)(b - a)) {
            *bad = r;
            return VB_ECORRUPT;
        }
    }
    return VB_OK;
}

/*
 * Every column of a parsed segment, over the file's bytes (base, len: the mapped file or a buffer
 * holding all of it): live flags, scan-code scales (finite, >= 0), the three CSR offset arrays
 * against their blobs, tag ids against the dictionary, dictionary order and UTF-8. Linear in
 * count + nnz + ntags + len(dictionary); the
 * source blob's UTF-8 is left to vb_seg_verify_fd (it is the only column whose size is unbounded).
 */
static inline int vb_seg_check_columns(const uint8_t *base, size_t len, const vb_seg_layout_t *L, char *err,
                                       size_t errlen) {
    if ((uint64_t)len < L->file_size)
        return vb_fail(err, errlen, VB_ECORRUPT, "buffer holds %llu bytes, the segment %llu",
                           (unsigned long long)len, (unsigned long long)L->file_size);
    size_t n = (size_t)L->count, bad = 0;
#define VB_SEC_PTR(k) (base + L->sec[k].offset)
    if (vb_seg_check_live(VB_SEC_PTR(VB_SEC_LIVE), n, &bad))
        return vb_fail(err, errlen, VB_ECORRUPT, "section live: row %zu has flag %u (expected 0 or 1)", bad,
                           (unsigned)VB_SEC_PTR(VB_SEC_LIVE)[bad]);
    if (vb_seg_check_offsets32(VB_SEC_PTR(VB_SEC_TAG_OFFSETS), n + 1, L->nnz, &bad))
        return vb_fail(err, errlen, VB_ECORRUPT,
                           "section tag_offsets: entry %zu breaks 0 = off[0] <= ... <= off[count] = nnz (%llu)",
                           bad, (unsigned long long)L->nnz);
    if (vb_seg_check_offsets32(VB_SEC_PTR(VB_SEC_TAG_DICT_OFFSETS), (size_t)L->ntags + 1,
                               L->sec[VB_SEC_TAG_DICT_BLOB].length, &bad))
        return vb_fail(err, errlen, VB_ECORRUPT,
                           "section tag_dict_offsets: entry %zu breaks 0 = off[0] <= ... <= off[ntags] = %llu", bad,
                           (unsigned long long)L->sec[VB_SEC_TAG_DICT_BLOB].length);
    if (vb_seg_check_offsets64(VB_SEC_PTR(VB_SEC_SOURCE_OFFSETS), n + 1, L->sec[VB_SEC_SOURCE_BLOB].length, &bad))
        return vb_fail(err, errlen, VB_ECORRUPT,
                           "section source_offsets: entry %zu breaks 0 = off[0] <= ... <= off[count] = %llu", bad,
                           (unsigned long long)L->sec[VB_SEC_SOURCE_BLOB].length);
    if (vb_seg_check_tag_ids(VB_SEC_PTR(VB_SEC_TAG_OFFSETS), n, VB_SEC_PTR(VB_SEC_TAG_IDS), L->ntags, &bad))
        return vb_fail(err, errlen, VB_ECORRUPT,
                           "section tag_ids: row %zu has a tag id >= ntags (%llu) or ids not strictly ascending",
                           bad, (unsigned long long)L->ntags);
    if (vb_seg_check_utf8_csr32(VB_SEC_PTR(VB_SEC_TAG_DICT_OFFSETS), (size_t)L->ntags,
                                VB_SEC_PTR(VB_SEC_TAG_DICT_BLOB), &bad))
        return vb_fail(err, errlen, VB_ECORRUPT, "section tag_dict_blob: tag %zu is not valid UTF-8", bad);
    if ((L->flags & VB_SEG_FLAG_HAS_SCAN_CODES) && vb_seg_check_scales(VB_SEC_PTR(VB_SEC_SCAN_SCALE), n, &bad))
        return vb_fail(err, errlen, VB_ECORRUPT, "section scan_scale: row %zu is not a finite value >= 0", bad);
    if (vb_seg_check_dict_order(VB_SEC_PTR(VB_SEC_TAG_DICT_OFFSETS), (size_t)L->ntags,
                                VB_SEC_PTR(VB_SEC_TAG_DICT_BLOB), &bad))
        return vb_fail(err, errlen, VB_ECORRUPT,
                           "section tag_dict_blob: tag %zu is not strictly above tag %zu (the dictionary must be "
                           "sorted and unique)",
                           bad, bad - 1);
#undef VB_SEC_PTR
    return VB_OK;
}

/* ---- Full verification by streaming the file through pread (no mapping is touched). ---- */

typedef struct {
    uint32_t kind;      /* the failing section (0 = header or padding) */
    uint32_t stored;    /* stored CRC (checksum failures) */
    uint32_t computed;  /* computed CRC */
    int sys_errno;      /* errno when VB_SEG_EIO */
    uint64_t offset;    /* file offset of the failure (padding byte, short read) */
    uint64_t bytes;     /* bytes read in total */
} vb_seg_verify_t;

/* Read [off, off+len) in chunks; crc != NULL: fold into *crc, else require every byte to be zero. */
static inline int vb_seg_stream(int fd, uint64_t off, uint64_t len, uint8_t *chunk, size_t chunk_len,
                                uint32_t *crc, vb_seg_verify_t *res) {
    while (len > 0) {
        size_t want = len < chunk_len ? (size_t)len : chunk_len;
        ssize_t got = pread(fd, chunk, want, (off_t)off);
        if (got < 0) {
            if (errno == EINTR) continue;
            res->sys_errno = errno;
            res->offset = off;
            return VB_SEG_EIO;
        }
        if (got == 0) { /* the file shrank under us */
            res->sys_errno = 0;
            res->offset = off;
            return VB_SEG_EIO;
        }
        if (crc) {
            *crc = vb_crc32c(*crc, chunk, (size_t)got);
        } else {
            for (ssize_t i = 0; i < got; i++)
                if (chunk[i] != 0) {
                    res->offset = off + (uint64_t)i;
                    return VB_ECORRUPT;
                }
        }
        res->bytes += (uint64_t)got;
        off += (uint64_t)got;
        len -= (uint64_t)got;
    }
    return VB_OK;
}

/*
 * Re-read the whole file: the header CRC, every section's CRC32C, and that every byte outside the
 * header and the sections (alignment padding) is zero, so that every byte of the file is covered.
 * L must come from vb_seg_parse_header on this file. Sections are streamed in file order with one
 * `chunk_len` buffer (malloc'ed here, freed here). Does not touch any mapping, so it neither faults
 * pages into the caller's address space nor is affected by madvise(MADV_RANDOM) on it.
 * Sections whose kind bit is set in `skip_kinds` (bit 1u << kind) are not read: the engine's
 * start-up check skips the bulk vector section and leaves it to the background scrubber.
 */
static inline int vb_seg_verify_fd(int fd, const vb_seg_layout_t *L, size_t chunk_len,
                                   uint32_t skip_kinds, vb_seg_verify_t *res) {
    memset(res, 0, sizeof(*res));
    if (chunk_len < 4096) chunk_len = 4096;
    uint8_t *chunk = (uint8_t *)malloc(chunk_len);
    if (!chunk) return VB_ENOMEM;
    int rc;
    /* Header: recompute its CRC from the bytes on disk now. */
    uint32_t hcrc = 0;
    rc = vb_seg_stream(fd, 0, VB_SEG_CRC_FIELD, chunk, chunk_len, &hcrc, res);
    if (rc == VB_OK) rc = vb_seg_stream(fd, VB_SEG_HEADER_SIZE, L->header_len - VB_SEG_HEADER_SIZE, chunk,
                                        chunk_len, &hcrc, res);
    if (rc == VB_OK) {
        uint8_t stored[4];
        ssize_t got;
        do got = pread(fd, stored, 4, VB_SEG_CRC_FIELD); while (got < 0 && errno == EINTR);
        if (got != 4) {
            res->sys_errno = got < 0 ? errno : 0;
            res->offset = VB_SEG_CRC_FIELD;
            rc = VB_SEG_EIO;
        } else if ((res->bytes += 4, vb_load_le32(stored) != hcrc || hcrc != L->header_crc)) {
            res->kind = 0;
            res->stored = vb_load_le32(stored);
            res->computed = hcrc;
            rc = VB_SEG_ECHECKSUM;
        }
    }
    /* Sections in file order, zero padding between them. */
    uint32_t order[VB_SEC_NKINDS];
    uint32_t m = vb_seg_sorted_sections(L, order);
    uint64_t pos = L->header_len;
    for (uint32_t i = 0; i < m && rc == VB_OK; i++) {
        const vb_seg_section_t *s = &L->sec[order[i]];
        if (s->offset > pos) {
            rc = vb_seg_stream(fd, pos, s->offset - pos, chunk, chunk_len, NULL, res);
            if (rc != VB_OK) break;
            pos = s->offset;
        }
        if (skip_kinds & (1u << s->kind)) {
            if (s->offset + s->length > pos) pos = s->offset + s->length;
            continue;
        }
        uint32_t c = 0;
        rc = vb_seg_stream(fd, s->offset, s->length, chunk, chunk_len, &c, res);
        if (rc != VB_OK) break;
        if (c != s->crc) {
            res->kind = s->kind;
            res->stored = s->crc;
            res->computed = c;
            res->offset = s->offset;
            rc = VB_SEG_ECHECKSUM;
            break;
        }
        if (s->offset + s->length > pos) pos = s->offset + s->length;
    }
    if (rc == VB_OK && pos < L->file_size)
        rc = vb_seg_stream(fd, pos, L->file_size - pos, chunk, chunk_len, NULL, res);
    if (rc == VB_OK) { /* nothing may follow the recorded end */
        uint8_t extra;
        ssize_t got;
        do got = pread(fd, &extra, 1, (off_t)L->file_size); while (got < 0 && errno == EINTR);
        if (got != 0) {
            res->offset = L->file_size;
            res->sys_errno = got < 0 ? errno : 0;
            rc = got < 0 ? VB_SEG_EIO : VB_ECORRUPT;
        }
    }
    free(chunk);
    return rc;
}
