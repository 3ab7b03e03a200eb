"""The raw disk operations of the store's commits: positioned vector writes that loop over short
writes, fsync (off with `IMGDB_SYNC=off`), and the id of this boot (a commit applied in an
earlier boot may not be on the disk yet)."""

from __future__ import annotations

import errno
import os
from dataclasses import replace




IOV_MAX = 512


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
