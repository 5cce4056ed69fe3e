"""CPU feature detection and the process-wide SIMD level.

The level is decided once, when this module is first imported: the best the CPU and OS support,
lowered by ``VIBRATO_SIMD=scalar|neon|avx2|avx512`` if set (a request above what the machine can
run is clamped, with a warning). Every native module reads ``selected_level()`` at import and builds
its function-pointer table from it; nothing changes it afterwards.
"""
from vibrato._native._types cimport VB_SIMD_SCALAR, VB_SIMD_NEON, VB_SIMD_AVX2, VB_SIMD_AVX512

import os
import warnings

_NAMES = {VB_SIMD_SCALAR: "scalar", VB_SIMD_NEON: "neon", VB_SIMD_AVX2: "avx2", VB_SIMD_AVX512: "avx512"}
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
    return [lvl for lvl in (VB_SIMD_SCALAR, VB_SIMD_AVX2, VB_SIMD_AVX512) if lvl <= _max_level]


def level_name(int level):
    return _NAMES.get(level, "unknown")


def has_sse42():
    return bool(vb_cpu_has_sse42())


_selected = _decide_level()


def selected_level():
    """The level every native module uses in this process."""
    return _selected
