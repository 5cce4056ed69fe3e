/*
 * Vibrato native core: shared definitions.
 *
 * Conventions: C11, static inline in headers, the vb_ prefix on every symbol,
 * functions that can fail return 0 or a negative VB_E* code and never abort or exit.
 */
#pragma once

#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define VB_OK 0
#define VB_ENOMEM (-1)   /* an allocation failed */
#define VB_EINVAL (-2)   /* a bad argument (shape, range, parameter) */
#define VB_ECORRUPT (-3) /* untrusted bytes failed validation */
#define VB_ETHREAD (-4)  /* a worker thread could not be started */

#if defined(__GNUC__) || defined(__clang__)
#define VB_TARGET(isa) __attribute__((target(isa)))
#define VB_PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 3)
#define VB_LIKELY(x) __builtin_expect(!!(x), 1)
#define VB_UNLIKELY(x) __builtin_expect(!!(x), 0)
/* For short kernels called once per row from a loop of the same ISA: the call would cost more than
 * the row (GCC declines to inline them on its own at -O3). */
#define VB_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define VB_TARGET(isa)
#define VB_PREFETCH(p) ((void)0)
#define VB_LIKELY(x) (x)
#define VB_UNLIKELY(x) (x)
#define VB_ALWAYS_INLINE inline
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define VB_X86_64 1
#endif
#if defined(__aarch64__)
#define VB_AARCH64 1
#endif

/*
 * SIMD levels, ordered: a higher level on x86 implies the lower ones are available. One level is chosen
 * per process (vibrato._native.cpu: the CPU's best, or VIBRATO_SIMD) and every kernel table (distance.h,
 * pq.h) is picked from it; a table without its own variant for a level uses the next lower one.
 */
typedef enum {
    VB_SIMD_SCALAR = 0,
    VB_SIMD_NEON = 1,
    VB_SIMD_AVX2 = 2,       /* AVX2 + FMA */
    VB_SIMD_AVX512 = 3,     /* AVX-512F and BW */
    VB_SIMD_AVX512VBMI = 4, /* AVX-512F + BW + VBMI (byte permutes: the PQ lookup kernel) */
} vb_simd_level_t;

/*
 * Overflow-checked arithmetic for anything derived from untrusted counts: 1 on overflow, else 0 with
 * the result in *out. Type-generic (size_t or uint64_t operands and result), as the builtins are.
 */
#define vb_mul_overflow(a, b, out) __builtin_mul_overflow((a), (b), (out))
#define vb_add_overflow(a, b, out) __builtin_add_overflow((a), (b), (out))

/*
 * Little-endian integers at any alignment. Every on-disk integer (segments, graphs, codebooks) goes
 * through these; memcpy compiles to a plain load or store on x86-64 and aarch64.
 */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "Vibrato's file formats are little-endian and are read in native byte order: little-endian hosts only"
#endif

static inline uint32_t vb_load_le32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint64_t vb_load_le64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline void vb_store_le32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void vb_store_le64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/*
 * splitmix64: the next 64 random bits from state *s. Small, fast and fully determined by its state, so
 * seeded results (HNSW level draws, PQ training) reproduce across platforms and library versions.
 */
/* Index of the smallest of d[0..n) (the first on ties; 0 when every value is NaN or n == 0), its
 * value in *best (INFINITY when n == 0). */
static inline uint32_t vb_argmin_f32(const float *d, uint32_t n, float *best) {
    float b = (float)INFINITY;
    uint32_t bi = 0;
    for (uint32_t i = 0; i < n; i++)
        if (d[i] < b) {
            b = d[i];
            bi = i;
        }
    *best = b;
    return bi;
}

static inline uint64_t vb_splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/*
 * Writes a printf-style message into msg (msglen bytes, may be NULL/0) and returns code: the loaders of
 * untrusted bytes use it to say what failed, the bad value and the limit.
 */
static inline int vb_fail(char *msg, size_t msglen, int code, const char *fmt, ...) {
    if (msg && msglen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, msglen, fmt, ap);
        va_end(ap);
    }
    return code;
}
