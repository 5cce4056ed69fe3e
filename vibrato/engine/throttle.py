"""Keeping background work out of the way of audio (`--audio-colocated`).

* `lower_thread_priority()`: nice +15 and the idle I/O class for the calling thread (Linux); native
  worker threads it starts inherit the nice value.
* `lower_process_priority(nice, keep)`: the same nice value for every thread of this process but
  `keep` (serve-v2's writer once query workers serve the port, `--writer-nice`).
* `IoThrottle`: a reservation token bucket in bytes/s for background segment I/O. Manual admin calls
  are not throttled (CONTRACT.md D37; v2.1's throttle slowed them too, R5).
"""
import ctypes
import logging
import os
import platform
import threading
import time

log = logging.getLogger("vibrato.engine")

_IOPRIO_CLASS_IDLE = 3
_IOPRIO_WHO_PROCESS = 1
_SYS_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}.get(platform.machine())


def lower_thread_priority():
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, 15)
    except (OSError, AttributeError) as exc:
        log.debug("setpriority failed: %s", exc)
    if _SYS_IOPRIO_SET is not None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall(_SYS_IOPRIO_SET, _IOPRIO_WHO_PROCESS, tid, _IOPRIO_CLASS_IDLE << 13)
        except OSError as exc:
            log.debug("ioprio_set failed: %s", exc)


def lower_process_priority(nice: int, keep=()) -> int:
    """Raise every thread's nice value to at least `nice` (never lower one: that needs privilege),
    except the native thread ids in `keep`; threads started later inherit it from their creator.
    Returns how many threads changed."""
    changed = 0
    for name in os.listdir("/proc/self/task"):
        tid = int(name)
        if tid in keep:
            continue
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                changed += 1
        except OSError:  # the thread ended meanwhile
            pass
    return changed


class IoThrottle:
    def __init__(self, mb_per_sec: float):
        self.rate = float(mb_per_sec) * 1024 * 1024
        self._next = 0.0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def consume(self, nbytes: int):
        if self.rate <= 0 or nbytes <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now)
            self._next = start + nbytes / self.rate
        if start > now:
            time.sleep(start - now)
