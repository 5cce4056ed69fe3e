/*
 * Vibrato native core: shared definitions.
 *
 * Conventions: C11, static inline in headers, the vb_ prefix on every symbol,
 * functions that can fail return 0 or a negative VB_E* code and never abort or exit.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

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
#else
#define VB_TARGET(isa)
#define VB_PREFETCH(p) ((void)0)
#define VB_LIKELY(x) (x)
#define VB_UNLIKELY(x) (x)
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define VB_X86_64 1
#endif
#if defined(__aarch64__)
#define VB_AARCH64 1
#endif

/* SIMD levels, ordered: a higher level on x86 implies the lower ones are available. */
typedef enum {
    VB_SIMD_SCALAR = 0,
    VB_SIMD_NEON = 1,
    VB_SIMD_AVX2 = 2,   /* AVX2 + FMA */
    VB_SIMD_AVX512 = 3, /* AVX-512F */
} vb_simd_level_t;

/* Overflow-checked size arithmetic for anything derived from untrusted counts. */
static inline int vb_mul_overflow(size_t a, size_t b, size_t *out) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_mul_overflow(a, b, out);
#else
    if (a != 0 && b > SIZE_MAX / a) return 1;
    *out = a * b;
    return 0;
#endif
}

static inline int vb_add_overflow(size_t a, size_t b, size_t *out) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_add_overflow(a, b, out);
#else
    if (b > SIZE_MAX - a) return 1;
    *out = a + b;
    return 0;
#endif
}
