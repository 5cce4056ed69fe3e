/*
 * Run-time CPU feature detection.
 *
 * vb_cpu_max_level() checks both the instruction set (CPUID, via the compiler builtins) and that the
 * OS saves the wide registers (XGETBV), as hnswlib's AVXCapable() does. Adapted from the approach in
 * https://github.com/Mysticial/FeatureDetector. Call it once; callers cache the result.
 */
#pragma once

#include "vibrato/common.h"

#if VB_X86_64
static inline uint64_t vb_xgetbv0(void) {
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((uint64_t)edx << 32) | eax;
}
#endif

static inline vb_simd_level_t vb_cpu_max_level(void) {
#if VB_X86_64
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx")) return VB_SIMD_SCALAR;
    /* OSXSAVE must be on before XGETBV may run; "avx" support implies the OS reported it. */
    uint64_t xcr0 = vb_xgetbv0();
    int ymm_saved = (xcr0 & 0x6) == 0x6;           /* SSE + AVX state */
    int zmm_saved = (xcr0 & 0xE6) == 0xE6;         /* + opmask, ZMM_Hi256, Hi16_ZMM */
    /* BW too: the int8 kernels widen bytes to 16 bits (every AVX-512 CPU but Xeon Phi has it) */
    if (zmm_saved && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return __builtin_cpu_supports("avx512vbmi") ? VB_SIMD_AVX512VBMI : VB_SIMD_AVX512;
    if (ymm_saved && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return VB_SIMD_AVX2;
    return VB_SIMD_SCALAR;
#elif VB_AARCH64
    return VB_SIMD_NEON; /* NEON is baseline on aarch64 */
#else
    return VB_SIMD_SCALAR;
#endif
}

static inline int vb_cpu_has_sse42(void) {
#if VB_X86_64
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2");
#else
    return 0;
#endif
}

static inline const char *vb_simd_level_name(int level) {
    switch (level) {
    case VB_SIMD_SCALAR: return "scalar";
    case VB_SIMD_NEON: return "neon";
    case VB_SIMD_AVX2: return "avx2";
    case VB_SIMD_AVX512: return "avx512";
    case VB_SIMD_AVX512VBMI: return "avx512vbmi";
    default: return "unknown";
    }
}
