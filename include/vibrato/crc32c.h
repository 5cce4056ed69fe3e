/*
 * CRC32C (Castagnoli, the iSCSI/ext4 polynomial 0x1EDC6F41, reflected 0x82F63B78) for checksumming
 * file sections. The SSE4.2 crc32 instruction does 8 bytes per step on x86-64; elsewhere a
 * slice-by-8 table runs at ~1-2 GB/s. Both give identical results (tests compare them).
 *
 * Usage: crc = vb_crc32c(0, buf, len); continue a running CRC by passing the previous value.
 * Thread-safe once vb_crc32c_init() has run (every native module calls it once, at import): it builds
 * the tables and records in vb_crc32c_hw whether the SSE4.2 instruction is used.
 */
#pragma once

#include <string.h>

#include "vibrato/common.h"
#include "vibrato/cpu.h"

static uint32_t vb_crc32c_table[8][256];
static int vb_crc32c_tables_ready = 0;
static int vb_crc32c_hw = 0; /* the SSE4.2 crc32 instruction is used (set by vb_crc32c_init) */

static inline void vb_crc32c_init(void) {
    if (vb_crc32c_tables_ready) return;
    vb_crc32c_hw = vb_cpu_has_sse42();
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
        vb_crc32c_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = vb_crc32c_table[0][i];
        for (int t = 1; t < 8; t++) {
            c = vb_crc32c_table[0][c & 0xFF] ^ (c >> 8);
            vb_crc32c_table[t][i] = c;
        }
    }
    vb_crc32c_tables_ready = 1;
}

static uint32_t vb_crc32c_sw(uint32_t crc, const void *buf, size_t len) {
    const uint8_t *p = (const uint8_t *)buf;
    crc = ~crc;
    while (len >= 8) {
        uint64_t w = vb_load_le64(p) ^ crc;
        crc = vb_crc32c_table[7][w & 0xFF] ^ vb_crc32c_table[6][(w >> 8) & 0xFF] ^
              vb_crc32c_table[5][(w >> 16) & 0xFF] ^ vb_crc32c_table[4][(w >> 24) & 0xFF] ^
              vb_crc32c_table[3][(w >> 32) & 0xFF] ^ vb_crc32c_table[2][(w >> 40) & 0xFF] ^
              vb_crc32c_table[1][(w >> 48) & 0xFF] ^ vb_crc32c_table[0][w >> 56];
        p += 8;
        len -= 8;
    }
    while (len--) crc = vb_crc32c_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

#if VB_X86_64
#include <nmmintrin.h>
VB_TARGET("sse4.2") static uint32_t vb_crc32c_sse42(uint32_t crc, const void *buf, size_t len) {
    const uint8_t *p = (const uint8_t *)buf;
    uint64_t c = ~crc;
    while (len >= 8) {
        c = _mm_crc32_u64(c, vb_load_le64(p));
        p += 8;
        len -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (len--) c32 = _mm_crc32_u8(c32, *p++);
    return ~c32;
}
#endif

/* hw: 1 = the SSE4.2 instruction (only when vb_crc32c_hw says this CPU has it), 0 = the tables. Tests
 * compare the two; everything else calls vb_crc32c. */
static inline uint32_t vb_crc32c_with(uint32_t crc, const void *buf, size_t len, int hw) {
#if VB_X86_64
    if (hw) return vb_crc32c_sse42(crc, buf, len);
#endif
    (void)hw;
    return vb_crc32c_sw(crc, buf, len);
}

static inline uint32_t vb_crc32c(uint32_t crc, const void *buf, size_t len) {
    return vb_crc32c_with(crc, buf, len, vb_crc32c_hw);
}
