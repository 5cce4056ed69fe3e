"""Exclusive ownership of a data directory by one process (fcntl lock on `data_dir/LOCK`).

The kernel drops the lock when the process dies, so a SIGKILLed server never leaves a stale lock.
LOCK is opened with O_NOFOLLOW and is private (0600, in a 0700 data dir): another local user can
neither point it elsewhere nor take a shared lock on it to block the server.
"""
import fcntl
import os
from pathlib import Path

from vibrato import datadir
from vibrato.errors import DataDirLockedError

LOCK_NAME = "LOCK"


class DataDirLock:
    def __init__(self, data_dir):
        self.path = Path(data_dir) / LOCK_NAME
        self._fd = None

    def acquire(self, purpose: str = "serve") -> "DataDirLock":
        fd = datadir.open_private(self.path, os.O_RDWR | os.O_CREAT, "data dir lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            try:
                holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
            except OSError:
                pass
            os.close(fd)
            who = f" ({holder})" if holder else ""
            raise DataDirLockedError(
                f"data dir {self.path.parent} is locked by another process{who}; stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} purpose={purpose}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self):
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc):
        self.release()


def is_locked(data_dir) -> bool:
    """True when another process holds the data dir (used by offline commands to refuse)."""
    path = Path(data_dir) / LOCK_NAME
    try:
        fd = datadir.open_private(path, os.O_RDONLY, "data dir lock")
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
