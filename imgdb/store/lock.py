"""Locks that belong to the store file itself, not to the name used to reach it.

Three byte-range locks on the store file (Linux open-file-description locks, which the kernel
keys by inode, so symlinks, hard links, relative paths and a second mount of the same file all
meet the same locks, and which closing another descriptor of the file does not release):

- byte 0, the *writer* lock: exclusive, held by the one writer for its whole run;
- byte 1, the *commit* lock: readers hold it shared while they read, the writer holds it
  exclusive only while it commits, so a reader never sees half a commit;
- byte 2, the *turnstile*: a writer takes it before waiting for the commit lock and readers
  pass through it, so a stream of readers cannot starve a commit. A writer waits at most for
  the reads in progress, a reader at most for one commit.

The kernel drops every lock of a process that dies, so a `kill -9` never leaves a stale lock.
Elsewhere (no OFD locks) `flock` gives the commit lock and a `FILE.lock` beside the resolved path
the writer lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import StoreError

WRITER, COMMIT, TURNSTILE = 0, 1, 2
_OFD = hasattr(fcntl, "F_OFD_SETLK")
_TIMEOUT = float(os.environ.get("IMGDB_LOCK_TIMEOUT", "600"))


def _ofd(fd: int, kind: int, byte: int, wait: bool) -> bool:
    """Set (or clear, kind=F_UNLCK) a one-byte OFD lock; False when busy and not waiting."""
    cmd = fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
    try:
        fcntl.fcntl(fd, cmd, struct.pack("hhqqi4x", kind, os.SEEK_SET, byte, 1, 0))
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def _poll(try_once, what: str, path: Path) -> None:
    """Retry a non-blocking acquisition with a short backoff, up to IMGDB_LOCK_TIMEOUT seconds."""
    delay, waited = 0.001, 0.0
    while not try_once():
        if waited >= _TIMEOUT:
            raise StoreError(f"store {path} stayed busy for {_TIMEOUT:.0f}s ({what}); "
                             f"try again when the other imgdb command has finished")
        time.sleep(delay)
        waited += delay
        delay = min(delay * 2, 0.05)


def identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def fd_path(fd: int, path) -> str:
    """A name for exactly the file open as `fd` (Linux /proc), else its path."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else str(path)


def same_file(path: Path, fd: int) -> bool:
    """Does `path` still name the file open as `fd` (a repair may have swapped it)?"""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == identity(fd)


class _Shared:
    """This process's shared (reader) hold on one store file; re-entrant and thread-safe."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.count = 0


_readers: dict[tuple[int, int], _Shared] = {}
_writers: set[tuple[int, int]] = set()
_mutex = threading.RLock()


@contextmanager
def shared(path: Path) -> Iterator[int]:
    """Hold the commit lock shared for the duration of a read; yields a descriptor of the file.

    Nested and concurrent reads of the same file in one process share one hold, so a reader
    never waits behind a writer that is itself waiting for this process's outer read. The
    descriptor names the file that was locked (a repair that swapped the name meanwhile is
    seen, and the new file is read instead).
    """
    entry = None
    while entry is None:
        fd = os.open(path, os.O_RDONLY)
        try:
            key = identity(fd)
            with _mutex:
                entry = _readers.get(key)
                if entry is not None:
                    entry.count += 1
            if entry is not None:
                os.close(fd)
                break
            if _OFD:
                _poll(lambda: _ofd(fd, fcntl.F_RDLCK, TURNSTILE, False), "a commit", path)
                _poll(lambda: _ofd(fd, fcntl.F_RDLCK, COMMIT, False), "a commit", path)
                _ofd(fd, fcntl.F_UNLCK, TURNSTILE, False)
            else:
                _poll(lambda: _flock(fd, fcntl.LOCK_SH), "a commit", path)
        except BaseException:
            os.close(fd)
            raise
        if not same_file(path, fd):  # replaced meanwhile (repair): read the new file
            os.close(fd)
            continue
        with _mutex:
            entry = _readers.get(key)
            if entry is None:
                entry = _readers[key] = _Shared(fd)
            else:  # another thread of this process got there first: share its hold
                os.close(fd)
            entry.count += 1
    try:
        yield entry.fd
    finally:
        with _mutex:
            entry.count -= 1
            if entry.count == 0:
                if _readers.get(identity(entry.fd)) is entry:
                    del _readers[identity(entry.fd)]
                os.close(entry.fd)  # closing the description releases its locks


def _flock(fd: int, how: int) -> bool:
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class WriterLock:
    """The single writer's hold: the writer lock for its lifetime, the commit lock per commit."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd: int | None = fd
        self.key = identity(fd)
        self._side: int | None = None

    @classmethod
    def acquire(cls, path: Path, holder) -> "WriterLock":
        """Open `path` read-write and take the writer lock, or raise naming the holder.

        `holder()` reads the PID recorded by the current holder (for the message).
        """
        while True:
            try:
                fd = os.open(path, os.O_RDWR)
            except PermissionError:
                raise StoreError(f"store {path} is not writable by this user") from None
            except FileNotFoundError:
                raise StoreError(f"store {path} does not exist (it was removed or renamed "
                                 f"meanwhile)") from None
            except OSError as exc:
                raise StoreError(f"cannot open store {path} for writing: "
                                 f"{exc.strerror or exc}") from None
            lock = cls(path, fd)
            try:
                got = lock._take_writer()
            except BaseException:
                os.close(fd)
                raise
            if not got:
                pid = holder(fd)
                os.close(fd)
                raise StoreError(f"store {path} is locked by PID {pid or '?'} (another imgdb "
                                 f"command is writing to it); wait for it to finish")
            if same_file(path, fd):
                with _mutex:
                    _writers.add(lock.key)
                return lock
            lock.release()  # the file was replaced (repair) while we waited: take the new one

    def _take_writer(self) -> bool:
        if _OFD:
            return _ofd(self.fd, fcntl.F_WRLCK, WRITER, False)
        side = os.open(str(Path(os.path.realpath(self.path))) + ".lock", os.O_RDWR | os.O_CREAT,
                       0o644)
        if not _flock(side, fcntl.LOCK_EX):
            os.close(side)
            return False
        self._side = side
        return True

    def check_no_reader(self) -> None:
        """A commit while this process reads the same store would wait for itself."""
        with _mutex:
            if self.key in _readers:
                raise StoreError(f"store {self.path} is being read by this same process; a "
                                 f"commit now would wait for itself (finish the read first)")

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the commit lock exclusively (waits for the reads in progress)."""
        self.check_no_reader()
        if _OFD:
            _poll(lambda: _ofd(self.fd, fcntl.F_WRLCK, TURNSTILE, False), "readers", self.path)
            try:
                _poll(lambda: _ofd(self.fd, fcntl.F_WRLCK, COMMIT, False), "readers", self.path)
            finally:
                _ofd(self.fd, fcntl.F_UNLCK, TURNSTILE, False)
            try:
                yield
            finally:
                _ofd(self.fd, fcntl.F_UNLCK, COMMIT, False)
        else:
            _poll(lambda: _flock(self.fd, fcntl.LOCK_EX), "readers", self.path)
            try:
                yield
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)

    def release(self) -> None:
        if self.fd is None:
            return
        with _mutex:
            _writers.discard(self.key)
        if self._side is not None:
            os.close(self._side)
            self._side = None
        fd, self.fd = self.fd, None
        os.close(fd)  # drops every lock of this open file description
