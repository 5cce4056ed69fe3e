"""What the writer process and the processes that follow it tell each other: two small mmapped files
(`serving.state`, written by the writer; `followers.state`, one slot per follower) and a wake-up
datagram per publication.

`<data-dir>/tmp/serving.state` (0600, 64 bytes, little-endian int64 words):

    0  magic      b"VBSTATE1"
    1  epoch      the writer's start time in ns: a new writer makes a new file (followers reopen)
    2  seq        segment-set sequence: odd while the writer publishes a change (seqlock)
    3  lsn        the highest committed WAL lsn, published after each commit and before its
                  acknowledgement, so a write acknowledged anywhere is behind a published lsn
    4  pid        the writer's pid
    5  visible    the highest lsn a write may have been acknowledged at: with query workers the server
                  publishes it just before the answer, once they applied the write or it stopped
                  waiting for them (server/workers.py); else it follows lsn
    6  retired    0; a new writer sets it to 1 in its predecessor's file before it replaces that file,
                  so a follower still mapping the old one (a query worker of a writer that died,
                  draining) notices with a load instead of a stat per query (Follower._current)

The writer (`SharedState.create`) is the only one that writes. A follower's sync
(vibrato.engine.follower) reads `seq`, catches up with `lsn`, and reads `seq` again; a change of the
segment set that overlaps its catch-up reads shows as a changed `seq`, so it retries. A query on a
follower whose follow thread runs skips the sync when its last completed one covers `visible`
(read-your-writes across processes, CONTRACT.md D5). Words are 8-byte aligned: a load or store of one
is atomic on every supported CPU; the catalog reads between the loads are system calls, which order
them.
"""
import mmap
import os
import socket
import struct
import threading
import time

from vibrato.datadir import FILE_MODE, UnsafePathError, open_regular, unix_address

FILE_NAME = "serving.state"
MAGIC = b"VBSTATE1"
SIZE = 64
_WORD = struct.Struct("<q")
_EPOCH, _SEQ, _LSN, _PID, _VISIBLE, _RETIRED = 8, 16, 24, 32, 40, 48


class SharedState:
    def __init__(self, mm: mmap.mmap, writable: bool):
        self._mm = mm
        self.writable = writable
        self._lock = threading.Lock()
        self._changes = 0  # writer: changes in progress (checkpoint and compaction may overlap)
        self.defer_visible = False  # writer: the server publishes `visible` itself (after its workers)
        self._wake_paths = ()       # writer: the followers' wake sockets (wake_socket)
        self._wake_sock = None

    # ------------------------------------------------------------------ open
    @classmethod
    def create(cls, tmp_dir, lsn: int) -> "SharedState":
        """The writer, at start-up: a fresh file (written aside, renamed into place) with seq 0, after
        the previous writer's file, if any, is marked retired."""
        path = os.path.join(os.fspath(tmp_dir), FILE_NAME)
        _retire(path)
        content = MAGIC + struct.pack("<qqqqqq", time.time_ns(), 0, int(lsn), os.getpid(), int(lsn), 0)
        return cls(_create_mapped(path, content + bytes(SIZE - len(content))), True)

    @classmethod
    def open(cls, tmp_dir) -> "SharedState":
        """A follower: the writer's file, read-only (UnsafePathError / ValueError when it is not one)."""
        path = os.path.join(os.fspath(tmp_dir), FILE_NAME)
        fd = open_regular(path, what="serving state")
        try:
            if os.fstat(fd).st_size != SIZE:
                raise ValueError(f"serving state {path!r} has {os.fstat(fd).st_size} bytes, expected {SIZE}")
            mm = mmap.mmap(fd, SIZE, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        if mm[:8] != MAGIC:
            mm.close()
            raise UnsafePathError(f"serving state {path!r} is not a Vibrato serving state file")
        return cls(mm, False)

    def close(self):
        self._mm.close()
        if self._wake_sock is not None:
            self._wake_sock.close()

    # ------------------------------------------------------------------ wake-ups
    def wake_followers(self, paths):
        """Writer: after each publication, send a datagram to these sockets (wake_socket) so that
        following processes need not poll."""
        if self._wake_sock is None:
            self._wake_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self._wake_paths = tuple(unix_address(p) for p in paths)

    def _wake(self):
        for path in self._wake_paths:
            try:
                self._wake_sock.sendto(b"w", path)
            except OSError:  # not bound yet, gone, or its queue full (a wake-up is pending anyway)
                pass

    # ------------------------------------------------------------------ words
    def _get(self, off: int) -> int:
        return _WORD.unpack_from(self._mm, off)[0]

    def _set(self, off: int, value: int):
        if not self.writable:
            raise PermissionError("a follower never writes the serving state")
        _WORD.pack_into(self._mm, off, value)

    epoch = property(lambda self: self._get(_EPOCH))
    seq = property(lambda self: self._get(_SEQ))
    lsn = property(lambda self: self._get(_LSN))
    pid = property(lambda self: self._get(_PID))
    visible = property(lambda self: self._get(_VISIBLE))
    retired = property(lambda self: self._get(_RETIRED))

    # ------------------------------------------------------------------ writer side
    def publish_lsn(self, lsn: int):
        """After a commit, before its acknowledgement (the catalog writer thread, in commit order)."""
        if lsn > self._get(_LSN):
            self._set(_LSN, lsn)
        if not self.defer_visible:
            self.publish_visible(lsn)
        self._wake()

    def publish_visible(self, lsn: int):
        """Before a write at `lsn` (or below) is acknowledged: a follower must have applied it before
        it answers a query (engine/follower.py)."""
        with self._lock:
            if lsn > self._get(_VISIBLE):
                self._set(_VISIBLE, lsn)

    def begin_change(self):
        """Before the transaction that changes the segment set: seq is odd until every change begun
        has ended."""
        with self._lock:
            self._changes += 1
            if self._changes == 1:
                self._set(_SEQ, self._get(_SEQ) + 1)

    def end_change(self):
        """After the change is published in memory (or failed): seq becomes even with the last one."""
        with self._lock:
            self._changes -= 1
            if self._changes == 0:
                self._set(_SEQ, self._get(_SEQ) + 1)
        self._wake()


def _retire(path: str):
    """Set `retired` in the serving state file at path, if there is one that followers could have
    mapped (a regular file with the magic: SharedState.open takes no other)."""
    try:
        fd = open_regular(path, os.O_RDWR, what="serving state")
    except (OSError, UnsafePathError):  # none, or not one a follower could have opened
        return
    try:
        if os.fstat(fd).st_size == SIZE and os.pread(fd, len(MAGIC), 0) == MAGIC:
            os.pwrite(fd, _WORD.pack(1), _RETIRED)
    finally:
        os.close(fd)


def _create_mapped(path: str, content: bytes) -> mmap.mmap:
    """A fresh file with `content` (0600; written aside and renamed into place, so a reader never sees
    it half-written), mapped read-write."""
    aside = path + ".new"
    try:
        os.unlink(aside)
    except FileNotFoundError:
        pass
    fd = os.open(aside, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        os.write(fd, content)
        os.replace(aside, path)
        return mmap.mmap(fd, len(content))
    finally:
        os.close(fd)


def wake_socket(path) -> socket.socket:
    """A wake-up socket: a follower's (the writer published) or the writer's (a follower reported its
    progress, server/workers.py). A datagram socket bound at `path`, in the 0700 tmp dir; a stale one
    from a previous process is replaced. Its datagrams carry nothing: each only says "look again"."""
    path = os.fspath(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(unix_address(path))
        os.chmod(path, FILE_MODE)
    except BaseException:
        sock.close()
        raise
    return sock


# ---------------------------------------------------------------------------- the followers' answer
PROGRESS_FILE = "followers.state"
PROGRESS_MAGIC = b"VBFOLLW1"
MAX_SLOTS = 256
_SLOT = struct.Struct("<qq")  # pid (0: no follower), applied lsn
_SLOTS_AT = 16                # after the magic and the slot count


class FollowerProgress:
    """How far each query worker has applied the writer's lsn: `<data-dir>/tmp/followers.state`
    (0600), one (pid, applied lsn) slot per worker after a 16-byte header (magic, slot count).

    The writer creates it before it starts its workers; worker i writes slot i after each catch-up
    (engine/follower.py `follow`) and the writer reads it to hold an acknowledgement until the workers
    have applied the write (server/workers.py), so that a query on a worker rarely has rows to catch up
    itself. Only pacing: a worker that is behind still catches up inline before it searches."""

    def __init__(self, mm: mmap.mmap, slots: int):
        self._mm = mm
        self.slots = slots

    @classmethod
    def create(cls, tmp_dir, slots: int) -> "FollowerProgress":
        if not 0 < slots <= MAX_SLOTS:
            raise ValueError(f"slots must be in [1, {MAX_SLOTS}], got {slots}")
        content = PROGRESS_MAGIC + struct.pack("<q", slots) + bytes(slots * _SLOT.size)
        return cls(_create_mapped(os.path.join(os.fspath(tmp_dir), PROGRESS_FILE), content), slots)

    @classmethod
    def open(cls, tmp_dir) -> "FollowerProgress":
        """A worker: the writer's file, read-write (UnsafePathError / ValueError when it is not one)."""
        path = os.path.join(os.fspath(tmp_dir), PROGRESS_FILE)
        fd = open_regular(path, os.O_RDWR, what="followers state")
        try:
            size = os.fstat(fd).st_size
            if size < _SLOTS_AT or (size - _SLOTS_AT) % _SLOT.size:
                raise ValueError(f"followers state {path!r} has {size} bytes")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        slots = _WORD.unpack_from(mm, 8)[0]
        if mm[:8] != PROGRESS_MAGIC or slots != (size - _SLOTS_AT) // _SLOT.size:
            mm.close()
            raise UnsafePathError(f"followers state {path!r} is not a Vibrato followers state file")
        return cls(mm, slots)

    def close(self):
        self._mm.close()

    def _check(self, slot: int):
        if not 0 <= slot < self.slots:
            raise IndexError(f"follower slot {slot} outside [0, {self.slots})")

    def report(self, slot: int, pid: int, applied: int):
        """Worker side: applied is written before pid, so a reader never pairs a new pid with an old lsn
        of another process (each word is stored whole)."""
        self._check(slot)
        off = _SLOTS_AT + slot * _SLOT.size
        _WORD.pack_into(self._mm, off + 8, int(applied))
        _WORD.pack_into(self._mm, off, int(pid))

    def read(self, slot: int) -> tuple[int, int]:
        """(pid, applied lsn) of a slot; pid 0 when no worker has reported in it."""
        self._check(slot)
        return _SLOT.unpack_from(self._mm, _SLOTS_AT + slot * _SLOT.size)
