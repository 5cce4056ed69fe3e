"""The data directory on disk: its layout, who may own it, and how a path read from it is trusted.

Everything under a data dir is private to the user that runs Vibrato: files are created 0600 and
directories 0700, and a data dir (or its catalog, pepper or LOCK) owned by someone else or writable
by group/others is refused, because whoever can write there can plant keys, journals or symlinks.

Paths stored in the catalog or a journal are hostile input (a tampered snapshot brings its own
catalog): each one must be a plain file name inside its expected sub-directory, and is resolved
with `resolve_rel`, never joined blindly. Files are opened with O_NOFOLLOW.
"""
import errno
import os
import stat
from pathlib import Path

from vibrato.errors import VibratoError

LAYOUT = ("segments", "quarantine", "snapshots", "tmp", "logs")
FILE_MODE = 0o600
DIR_MODE = 0o700
MAX_NAME_BYTES = 255


class UnsafePathError(VibratoError):
    """A path from the catalog, a journal or a manifest is not a plain name inside its directory."""
    code = "unsafe_path"
    status = 500


class UnsafeDataDirError(VibratoError):
    """The data dir (or a file in it) is owned by another user or writable by group/others."""
    code = "unsafe_data_dir"
    status = 500


def fsync_dir(path) -> None:
    """fsync a directory, making the names created/renamed in it durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_name(name, what: str) -> str:
    """`name` itself when it is a plain file name (no separator, NUL, '.' or '..'); else UnsafePathError."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\x00" in name or len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES):
        raise UnsafePathError(f"{what}: {name!r} is not a plain file name")
    return name


def resolve_rel(data_dir, rel, subdir: str, what: str) -> Path:
    """data_dir/subdir/NAME for a stored relative path that must read exactly 'subdir/NAME'."""
    if not isinstance(rel, str) or not rel.startswith(subdir + "/"):
        raise UnsafePathError(f"{what}: {rel!r} is not inside {subdir}/")
    return Path(data_dir) / subdir / plain_name(rel[len(subdir) + 1:], what)


def open_regular(path, flags: int = os.O_RDONLY, *, dir_fd=None, what: str = "file") -> int:
    """os.open that never follows a symlink and accepts only a regular file (UnsafePathError else).
    FileNotFoundError passes through, so callers can tell "missing" from "unsafe"."""
    try:
        fd = os.open(os.fspath(path), flags | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(f"{what} {os.fspath(path)!r} is a symlink; only regular files are accepted") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePathError(f"{what} {os.fspath(path)!r} is not a regular file")
    return fd
