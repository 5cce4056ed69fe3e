"""CPU feature detection and the process-wide SIMD level.

The level is decided once, when this module is first imported: the best the CPU and OS support,
lowered by ``VIBRATO_SIMD=scalar|neon|avx2|avx512|avx512vbmi`` if set (a request above what the
machine can run is clamped, with a warning). ``avx512`` is AVX-512F alone; ``avx512vbmi`` adds the
byte-permute extensions that PQ's lookup kernel uses. Every native module reads ``selected_level()`` at
import and picks its kernel tables (distance, PQ) from it; nothing changes it afterwards.
"""
from vibrato._native._common cimport (VB_SIMD_SCALAR, VB_SIMD_NEON, VB_SIMD_AVX2, VB_SIMD_AVX512,
                                     VB_SIMD_AVX512VBMI)

import os
import warnings

_X86_LEVELS = (VB_SIMD_SCALAR, VB_SIMD_AVX2, VB_SIMD_AVX512, VB_SIMD_AVX512VBMI)
_NAMES = {lvl: vb_simd_level_name(lvl).decode() for lvl in _X86_LEVELS + (VB_SIMD_NEON,)}
_BY_NAME = {v: k for k, v in _NAMES.items()}

cdef int _max_level = vb_cpu_max_level()


def _decide_level():
    requested = os.environ.get("VIBRATO_SIMD", "").strip().lower()
    if not requested:
        return _max_level
    if requested not in _BY_NAME:
        raise ValueError(
            f"VIBRATO_SIMD={requested!r} is not a SIMD level; expected one of {sorted(_BY_NAME)}")
    level = _BY_NAME[requested]
    if level not in available_levels():
        warnings.warn(
            f"VIBRATO_SIMD={requested} is not supported on this CPU; using {_NAMES[_max_level]}",
            RuntimeWarning, stacklevel=2)
        return _max_level
    return level


def max_level():
    """The best SIMD level this CPU and OS support (an int, see level_name)."""
    return _max_level


def available_levels():
    """Every level that can run here, lowest first (scalar always; neon on aarch64; x86 up to the max)."""
    if _max_level == VB_SIMD_NEON:
        return [VB_SIMD_SCALAR, VB_SIMD_NEON]
    return [lvl for lvl in _X86_LEVELS if lvl <= _max_level]


def level_name(int level):
    return _NAMES.get(level, "unknown")


def has_sse42():
    return bool(vb_cpu_has_sse42())


_selected = _decide_level()


def selected_level():
    """The level every native module uses in this process."""
    return _selected
