"""Atomic commits for an HDF5 file: HDF5 writes into memory, imgdb puts the bytes on disk.

HDF5 updates a file in place and keeps no journal, so a write that fails half-way (disk full, a
file-size limit, an I/O error, a kill, a power cut) can leave metadata that no longer parses.
Here the writer's HDF5 file sits on an :class:`Overlay`, a file object that keeps every change
of the bytes in use (below the committed end) in memory as pages; new bytes (past the end) go
straight to the file's free space there, which no committed state uses. At a commit HDF5
flushes into the overlay and :func:`commit` writes the changes like a database with a redo log:

1. refuse, before writing anything, a commit that cannot fit (free space, `ulimit -f`);
2. write a *journal* of the in-place pages past the data, away from the journal a recovery may
   still need, and a *pending* header pointing at it: the commit is now visible to every
   process (a reader replays the journal in memory);
3. :func:`complete`: *seal* the header with the CRC-32 of the new bytes, fsync (the commit's
   durable point, its only fsync), apply the pages in place, and record in the other header
   slot that they are applied (with the boot they were applied in). The writer runs this on a
   thread while its caller goes on; its next commit waits for it.

A failure in 1-2 restores the header slot and cuts the journal off: nothing committed. After 2,
the commit stands; a failure in 3 stops the writer and the next opener finishes the commit.

Why one fsync suffices. The header is two 224-byte slots in HDF5's user block; the valid slot
with the highest (commit number, state) wins, so a torn header write falls back to the other
slot. A pending header names its commit's journal (*cur*) and the previous commit's (*prev*),
each with its CRC-32 and, once sealed, the CRC-32 of that commit's new bytes. Nothing that a
recovery from the last durable header may need is written over before the next fsync: new
bytes go only below the first journal still needed, journals go past both, and the pages of
commit k are applied only after the fsync of commit k, which also made commit k-1's pages
durable. So whoever opens the file replays, in memory (a reader) or in place (the writer):
*prev* if it is still intact, then *cur*; if *cur* fails its checks (or was never sealed and
the machine restarted since) the crash came before its durable point, and *prev* alone gives the
state before it. An *applied* header of the current boot means the bytes are in place (the page
cache holds them even when the disk does not yet): readers open the file directly. When the
writer closes it flushes, marks the file *clean* (the other slot) and cuts the journals off.
Power cuts at every point of a commit are simulated in tests/test_store.py.

`IMGDB_SYNC=off` skips the fsyncs and the seal: commits stay atomic against kills, full disks
and I/O errors (the page cache keeps write order for every later process), not power loss.
"""

from __future__ import annotations

# The protocol's parts: `diskio` (positioned writes, fsync, the boot id), `header` (the two
# checksummed slots and the writer's PID), `overlay` (the writer's file object over HDF5),
# `redo` (journals, their seal, and recovery); this module runs a commit through them.

import errno
import os
import resource
from dataclasses import dataclass, replace

from ..errors import DiskFull, StoreError
from . import diskio
from .diskio import pwritev_all, sync_enabled, sync_fd
# the parts of the protocol, one job a module, under the names the store uses them by
from .header import (APPLIED, CLEAN, HDF5_SIGNATURE, HEADER_SIZE,  # noqa: F401
                     PENDING, SLOT_SIZE, Header, JournalRef, init_header, read_header, read_pid,
                     read_slots, slot_of, write_header, write_pid)
from .overlay import PAGE, Overlay, clear_superblock_flags, lookup3  # noqa: F401
from .redo import journal_buffers, plan, recover, seal, view_of  # noqa: F401


ALIGN = 4096


def _free_bytes(path) -> int:
    st = os.statvfs(os.path.dirname(os.path.abspath(path)) or ".")
    return st.f_bavail * st.f_frsize


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 10e9 else f"{n / 1e9:.1f} GB"


def check_room(path, grow_to: int, needed: int) -> None:
    """Refuse, before writing anything, a commit that cannot fit (free space, ulimit -f)."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and grow_to > limit:
        raise DiskFull(f"file-size limit (ulimit -f) is {_mb(limit)}, this commit needs the "
                       f"store to grow to {_mb(grow_to)}; nothing committed is lost; raise the "
                       f"limit and rerun")
    free = _free_bytes(path)
    if needed > free:
        raise DiskFull(f"disk full: {_mb(free)} free, this commit needs about {_mb(needed)}; "
                       f"nothing committed is lost; free space and rerun")


def os_error(path, exc: OSError, kept: bool = False) -> StoreError:
    """A one-line error for a failed write; `kept`: the commit is durable (finished later)."""
    outcome = ("the commit is kept and is finished when the store is next opened" if kept
               else "nothing committed is lost")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"disk full while writing {path}: {_mb(_free_bytes(path))} free; "
                        f"{outcome}; free space and rerun")
    if exc.errno == errno.EFBIG:
        return DiskFull(f"file-size limit reached while writing {path}; {outcome}; raise the "
                        f"limit (ulimit -f) and rerun")
    return StoreError(f"I/O error while writing {path} ({exc.strerror or exc}); {outcome}; "
                      f"rerun")


class CommitIncomplete(StoreError):
    """A commit that is written (visible to every later reader) could not be flushed or
    applied in place; the next opener finishes it. The writer that raised it must stop."""


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _place(data_end: int, gap: int, length: int, avoid: JournalRef | None, limit) -> int:
    """Where a journal goes: past the data, not over `avoid` (the journal a recovery may still
    need); preferably `gap` bytes on (room for the next commits' new bytes to go straight to
    the file), else as low as possible; within the file-size limit when it can be."""
    candidates = [_align(data_end + gap), _align(data_end)]
    if avoid is not None:  # just past it, but never inside this commit's own data
        candidates.append(_align(max(data_end, avoid.end)))
    free = [c for c in candidates if not _overlaps(c, c + length, avoid)]
    fitting = [c for c in free if limit == resource.RLIM_INFINITY or c + length <= limit]
    return (fitting or free)[0]


def _overlaps(a: int, b: int, ref: JournalRef | None) -> bool:
    return ref is not None and a < ref.end and ref.offset < b


#: Room left between the data and a journal, so that the next commits' new bytes can be
#: written in place (not copied into a journal): four times this commit's, at least this.
MIN_GAP = 1 << 20


@dataclass
class Written:
    """A commit whose journal and pending header are written: committed for every later
    opener. `complete` makes it durable (fsync) and applies it in place. `overlaid`: every byte
    still to apply lies in the overlay's committed in-place pages (no journaled tail, no cut),
    so the writer may go on reading through them while `complete` runs."""

    path: object
    pending: Header
    runs: list[tuple[int, list]]
    overlaid: bool = False


def commit(path, fd: int, header: Header, overlay: Overlay) -> Written | None:
    """Write a commit's journal and pending header (see the module docstring); None when the
    overlay holds no change. Raises DiskFull or StoreError with nothing changed."""
    old, new_size = header.committed, overlay.size
    keep = header.cur if header.state != CLEAN else None
    end_before = os.fstat(fd).st_size
    slot = slot_of(header.seq + 1, PENDING) * SLOT_SIZE
    before = os.pread(fd, SLOT_SIZE, slot)
    try:
        t_off, t_len = overlay.direct_tail()  # new bytes already in the file (free space)
    except OSError as exc:
        _rollback(fd, slot, before, end_before)
        raise os_error(path, exc) from None
    runs = overlay.records()  # still to write: in-place pages, new bytes kept in memory
    if not runs and new_size == old:
        return None
    if _overlaps(t_off, t_off + t_len, keep):
        raise AssertionError("new bytes were written over the journal a recovery needs")
    seq = header.seq + 1
    bufs, length, crc = journal_buffers(seq, new_size, runs, (t_off, t_len))
    gap = max(MIN_GAP, 4 * (new_size - old))
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    at = _place(max(old, new_size), gap, length, keep, limit)
    check_room(path, max(end_before, at + length), length + (64 << 10))
    pending = Header(seq=seq, state=PENDING, committed=new_size, prev_size=old,
                     cur=JournalRef(at, length, crc, sealed=not t_len), prev=keep, boot=diskio.BOOT)
    try:
        pwritev_all(fd, bufs, at)
        os.pwrite(fd, pending.pack(), slot)
    except OSError as exc:
        _rollback(fd, slot, before, end_before)
        raise os_error(path, exc) from None
    return Written(path, pending, runs,
                   overlaid=overlay.size <= overlay.direct_end and overlay.valid >= old)


def complete(fd: int, written: Written, sync: bool | None = None) -> Header:
    """Make a written commit durable and apply it in place; returns its applied header.

    With sync: seal the pending header (the CRC of the new bytes, read back), flush to disk
    (the commit's durable point), apply. Raises CommitIncomplete: the commit stays visible and a
    later opener finishes it; the writer must stop."""
    path = written.path
    pending = written.pending
    try:
        if sync_enabled() if sync is None else sync:
            if not pending.cur.sealed:
                pending = replace(pending, cur=seal(fd, pending.cur))
                write_header(fd, pending)
            os.fsync(fd)
    except OSError as exc:
        raise CommitIncomplete(f"I/O error while flushing {path} to disk ({exc.strerror or exc})"
                               f"; what was committed can be read, but the last commit may be "
                               f"lost if the machine stops; run imgdb check --db {path}") from None
    try:
        for offset, parts in written.runs:
            pwritev_all(fd, parts, offset)
        applied = replace(pending, state=APPLIED)
        write_header(fd, applied)
    except OSError as exc:
        raise CommitIncomplete(str(os_error(path, exc, kept=True))) from None
    return applied


def _rollback(fd: int, slot: int, before: bytes, end_before: int) -> None:
    """Undo a commit whose pending header was not written: the header slot as it was, the
    journal cut off (an invalid journal under a pending header also reads as 'not applied')."""
    try:
        os.pwrite(fd, before, slot)
    except OSError:
        pass
    try:
        os.ftruncate(fd, end_before)
    except OSError:
        pass


def finish(path, fd: int, header: Header) -> Header:
    """A writer's clean close: flush, mark the file clean, cut the journals off."""
    if header.state == CLEAN:
        return header
    sync_fd(fd)
    clean = Header(seq=header.seq, state=CLEAN, committed=header.committed,
                   prev_size=header.committed, boot=diskio.BOOT)
    write_header(fd, clean)
    sync_fd(fd)
    os.ftruncate(fd, header.committed)
    return clean
