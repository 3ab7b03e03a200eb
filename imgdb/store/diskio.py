"""The raw disk operations of the store's commits: positioned vector writes that loop over short
writes, fsync (off with `IMGDB_SYNC=off`), the id of this boot (a commit applied in an
earlier boot may not be on the disk yet), and the store's permissions for files made for it."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import replace
from pathlib import Path

IOV_MAX = 512


def same_access(path: str | Path, like: str | Path) -> None:
    """Give `path` the permission bits (execute bits aside) and, where allowed, the owner and
    group of the store `like`: a file written for a private store (a repaired copy, an index)
    is as private as the store, whatever the umask."""
    try:
        st = os.stat(like)
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o666)
    except OSError:
        return
    try:
        current = os.stat(path)
        if (current.st_uid, current.st_gid) != (st.st_uid, st.st_gid):
            os.chown(path, st.st_uid, st.st_gid)
    except OSError:
        pass  # not ours to give away: the mode is what matters


def create_like(path: str | Path, like: str | Path) -> None:
    """Create (or empty) `path` with the store `like`'s access before anything is written to
    it: open to no one else first, then as open as the store (writers that truncate it, such
    as HDF5's and Annoy's, keep that mode)."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    os.close(fd)
    same_access(path, like)


def sync_enabled() -> bool:
    """fsync at the commit point (IMGDB_SYNC=off: atomic against kills, not power loss)."""
    return os.environ.get("IMGDB_SYNC", "full").lower() not in ("off", "0", "no", "false")


def sync_fd(fd: int) -> None:
    if sync_enabled():
        os.fsync(fd)


def boot_id() -> bytes:
    """This boot's identity (Linux), or 16 zero bytes when unknown."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as fh:
            return bytes.fromhex(fh.read().strip().replace(b"-", b"").decode())[:16]
    except (OSError, ValueError):
        return bytes(16)


BOOT = boot_id()


def pwritev_all(fd: int, bufs: list, offset: int) -> None:
    """Write every buffer at `offset` (loops over short writes; raises OSError)."""
    views = [memoryview(b).cast("B") for b in bufs if len(b)]
    while views:
        batch = views[:IOV_MAX]
        total = sum(len(v) for v in batch)
        written = os.pwritev(fd, batch, offset)
        offset += written
        if written == total:
            views = views[IOV_MAX:]
            continue
        if written <= 0:
            raise OSError(errno.EIO, "short write")
        skip = written  # drop what was written and go on (a short write: the next one fails)
        while skip:
            if skip >= len(views[0]):
                skip -= len(views.pop(0))
            else:
                views[0] = views[0][skip:]
                skip = 0
