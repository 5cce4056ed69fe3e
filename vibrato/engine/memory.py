"""Keep the server's resident memory proportional to what it holds, not to what it once allocated.

Checkpoint and compaction allocate and free tens of MB at a time (a segment's vectors, a graph being
built). With glibc's defaults two things make that memory stick: the mmap threshold adapts upwards
after the first large free, so later large blocks come from the heap and fragment it; and every
thread may get its own arena (8 x cores). Measured in-process with 220k ingested 128-d vectors
(checkpoints + compactions): RssAnon 156 MB with the defaults, 95-118 MB with the settings below.
Both are no-ops where the C library is not glibc.

The cyclic garbage collector is the other process-wide cost: a full collection walks every tracked
object while holding the GIL, and a serving process holds ~50k of them from its imports alone. In a
query worker under an ingest load full collections took 30-41 ms, every query in flight waiting
(perf/README.md); `freeze_heap` moves what start-up built out of its reach.
"""
import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger("vibrato.engine")

_M_MMAP_THRESHOLD = -3   # mallopt parameters from glibc's malloc.h
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 256 * 1024
ARENA_MAX = 2


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


def tune_allocator() -> bool:
    """Fixed mmap threshold (blocks >= 256 KiB go back to the OS on free) and at most 2 arenas.
    Process-wide, so the server calls it at start; an embedding application may call it too."""
    if _LIBC is None:
        return False
    ok = _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = _LIBC.mallopt(_M_ARENA_MAX, ARENA_MAX) == 1 and ok
    if not ok:
        log.warning("mallopt refused the allocator settings; resident memory may grow with fragmentation")
    return ok


def release_free_memory() -> None:
    """Return free heap pages to the OS (housekeeping calls this after background work)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def freeze_heap() -> None:
    """Once a server process serves (start-up and recovery done): collect, then exempt every object
    alive now from later collections (gc.freeze). They are modules, classes and the loaded state,
    kept for the process's life; reference counting still frees any of them that goes away. Later
    full collections then walk only what was allocated since."""
    gc.collect()
    gc.freeze()
