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
import threading
from pathlib import Path

from vibrato.errors import VibratoError

LAYOUT = ("segments", "quarantine", "snapshots", "tmp", "logs")
FILE_MODE = 0o600
DIR_MODE = 0o700
MAX_NAME_BYTES = 255
UNIX_PATH_MAX = 107   # bytes of an AF_UNIX socket path the kernel takes (sun_path, NUL excluded)


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


# ---------------------------------------------------------------------------- ownership and modes
CATALOG_FILES = ("catalog.sqlite3", "catalog.sqlite3-wal", "catalog.sqlite3-shm")
PRIVATE_FILES = CATALOG_FILES + ("api_pepper", "LOCK")


def _user(uid: int) -> str:
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return str(uid)


def _refuse_owner(path, what: str, uid: int):
    me = os.geteuid()
    raise UnsafeDataDirError(
        f"{what} {path} is owned by {_user(uid)} (uid {uid}) but Vibrato runs as {_user(me)} (uid {me}); "
        f"anyone who owns it can plant keys or files: run Vibrato as its owner, or if its content is "
        f"trusted: chown -R {_user(me)} {path}")


def check_entry(path, what: str, *, directory: bool = False) -> os.stat_result | None:
    """lstat `path` (None when absent) and refuse a symlink, the wrong file type, another owner or
    group/other write permission."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    kind = "directory" if directory else "file"
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeDataDirError(f"{what} {path} is a symlink; Vibrato follows no symlink inside a data dir: "
                                 f"replace it with a real {kind}")
    if not (stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)):
        raise UnsafeDataDirError(f"{what} {path} is not a regular {kind}")
    if st.st_uid != os.geteuid():
        _refuse_owner(path, what, st.st_uid)
    if st.st_mode & 0o022:
        raise UnsafeDataDirError(f"{what} {path} is writable by group/others (mode {stat.S_IMODE(st.st_mode):04o}): "
                                 f"chmod {DIR_MODE if directory else FILE_MODE:o} {path}")
    return st


def _check_ancestors(path: Path):
    """Every directory above the data dir must be owned by root or us and not writable by others
    (unless sticky, like /tmp): whoever can rename an ancestor can swap the data dir."""
    me = os.geteuid()
    for parent in path.parents:
        try:
            st = os.stat(parent)
        except FileNotFoundError:
            continue
        if st.st_uid not in (0, me):
            raise UnsafeDataDirError(
                f"data dir {path} lies under {parent}, owned by {_user(st.st_uid)} (uid {st.st_uid}), who can "
                f"replace it: put the data dir on a path owned by root or {_user(me)}")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise UnsafeDataDirError(
                f"data dir {path} lies under {parent}, writable by group/others without the sticky bit "
                f"(mode {stat.S_IMODE(st.st_mode):04o}), so anyone can replace it: chmod go-w {parent}")


def check_private(data_dir) -> None:
    """Refuse a data dir that someone other than the effective user could tamper with: the dir (a
    symlink to it is resolved), its layout dirs, catalog (+ -wal/-shm), pepper and LOCK must not be
    symlinks, must be owned by the effective uid and not writable by group/others. An absent data dir
    (or file) passes: it will be created private."""
    path = Path(os.path.abspath(data_dir))
    if not os.path.lexists(path):
        _check_ancestors(path)
        return
    real = path.resolve()
    _check_ancestors(real)
    if check_entry(real, "data dir", directory=True) is None:
        raise UnsafeDataDirError(f"data dir {path} is a dangling symlink")
    for sub in LAYOUT:
        check_entry(real / sub, f"data dir {sub}/", directory=True)
    for name in PRIVATE_FILES:
        check_entry(real / name, f"data dir file {name}")


def prepare(data_dir) -> Path:
    """Create the data dir and its layout (DIR_MODE) if missing, then check_private it. Returns the path."""
    path = Path(data_dir)
    check_private(path)  # before creating anything inside someone else's directory
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    for sub in LAYOUT:
        try:
            os.mkdir(path / sub, DIR_MODE)
        except FileExistsError:
            pass
    check_private(path)
    return path


def open_private(path, flags: int, what: str) -> int:
    """os.open with O_NOFOLLOW | O_CLOEXEC (created FILE_MODE); the file must be a regular file owned
    by the effective uid, not writable by group/others, and is tightened to FILE_MODE if they could
    read it (a file left by an older version)."""
    try:
        fd = open_regular(path, flags, what=what)
    except UnsafePathError as exc:
        raise UnsafeDataDirError(f"{exc.message}: replace it with a real file owned by {_user(os.geteuid())}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            _refuse_owner(path, what, st.st_uid)
        if st.st_mode & 0o022:
            raise UnsafeDataDirError(f"{what} {path} is writable by group/others "
                                     f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod {FILE_MODE:o} {path}")
        if st.st_mode & 0o077:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


_dir_fds: dict = {}   # directory -> (fd, st_dev, st_ino): unix_address's descriptors, one per directory
_dir_fds_lock = threading.Lock()


def unix_address(path) -> str:
    """The address to bind or reach the unix socket at `path` with: the path itself, or when it is longer
    than the kernel takes (a data dir deep in the tree) the same file through this process's descriptor
    of its directory, `/proc/self/fd/<n>/<name>`. The socket is still created in, and guarded by, that
    directory (0700); the address is valid in this process only."""
    path = os.fspath(path)
    if len(os.fsencode(path)) <= UNIX_PATH_MAX:
        return path
    directory, name = os.path.split(path)
    st = os.stat(directory, follow_symlinks=False)
    with _dir_fds_lock:
        held = _dir_fds.get(directory)
        if held is None or held[1:] != (st.st_dev, st.st_ino):  # a directory made again since
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            if held is not None:
                os.close(held[0])
            st = os.fstat(fd)
            held = _dir_fds[directory] = (fd, st.st_dev, st.st_ino)
    return f"/proc/self/fd/{held[0]}/{name}"
