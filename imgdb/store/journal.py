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

import errno
import hashlib
import io
import os
import resource
import struct
import zlib
from dataclasses import dataclass, replace

from ..errors import DiskFull, StoreDamaged, StoreError

HEADER_SIZE = 512  # HDF5's user block
SLOT_SIZE = 224
SLOT_MAGIC = b"IMGDBHD3"
PID_AT, PID_MAGIC = 448, b"IMGDBPID"
PENDING, APPLIED, CLEAN = 0, 1, 2
STATE_NAMES = {PENDING: "pending", APPLIED: "applied", CLEAN: "clean"}
JOURNAL_MAGIC = b"IMGDBJN3"
PAGE = 4096
TAIL_BLOCK = 1 << 20  # new bytes past the end are kept in blocks of this size
ALIGN = 4096
IOV_MAX = 512
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_DEV_MAGIC = b"IMGDB-STORE\x00v2\x00\x00"  # the single-slot header of a development version

# magic, layout, seq, state, committed, prev_size, cur (offset, length, crc, tail crc, sealed),
# prev (the same), boot id
_SLOT = struct.Struct("<8sIQBQQQQIIBQQIIB16s")
_JHEAD = struct.Struct("<8sQQQQQ")  # magic, seq, new size, records, tail offset, tail length
#                                     (the new bytes written in place, not in the journal)
_RECORD = struct.Struct("<QQ")  # offset, length
_PID = struct.Struct("<8sQQ")  # magic, pid, pid ^ constant


def sync_enabled() -> bool:
    """fsync at the commit point (IMGDB_SYNC=off: atomic against kills, not power loss)."""
    return os.environ.get("IMGDB_SYNC", "full").lower() not in ("off", "0", "no", "false")


def _sync(fd: int) -> None:
    if sync_enabled():
        os.fsync(fd)


def boot_id() -> bytes:
    """This boot's identity (Linux), or 16 zero bytes when unknown."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as fh:
            return bytes.fromhex(fh.read().strip().replace(b"-", b"").decode())[:16]
    except (OSError, ValueError):
        return bytes(16)


_BOOT = boot_id()


# ---------------------------------------------------------------------------------------------
# header


@dataclass(frozen=True)
class JournalRef:
    """Where a commit's journal is, its CRC-32, and the CRC-32 of the commit's new bytes written
    in place (its tail, named in the journal) once known (`sealed`)."""

    offset: int
    length: int
    crc: int
    tail_crc: int = 0
    sealed: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length

    def fields(self) -> tuple:
        return self.offset, self.length, self.crc, self.tail_crc, int(self.sealed)


_NO_REF = JournalRef(0, 0, 0)


@dataclass(frozen=True)
class Header:
    seq: int = 0  # commits so far
    state: int = CLEAN
    committed: int = 0  # bytes of HDF5 data after commit `seq`
    prev_size: int = 0  # ... and before it
    cur: JournalRef | None = None  # the journal of commit `seq`
    prev: JournalRef | None = None  # the journal of commit `seq - 1`
    boot: bytes = bytes(16)

    @property
    def key(self) -> tuple[int, int]:
        return self.seq, self.state

    def pack(self) -> bytes:
        body = _SLOT.pack(SLOT_MAGIC, 3, self.seq, self.state, self.committed, self.prev_size,
                          *(self.cur or _NO_REF).fields(), *(self.prev or _NO_REF).fields(),
                          self.boot)
        body = body.ljust(SLOT_SIZE - 16, b"\0")
        return body + hashlib.blake2b(body, digest_size=16).digest()

    @classmethod
    def unpack(cls, raw: bytes) -> "Header | None":
        """The header in a slot, or None when the slot is empty, torn or damaged."""
        if len(raw) < SLOT_SIZE or not raw.startswith(SLOT_MAGIC):
            return None
        body, digest = raw[:SLOT_SIZE - 16], raw[SLOT_SIZE - 16:SLOT_SIZE]
        if hashlib.blake2b(body, digest_size=16).digest() != digest:
            return None
        (_, layout, seq, state, committed, prev_size, co, cl, cc, ct, cs, po, pl, pc, pt, ps,
         boot) = _SLOT.unpack_from(body)
        if layout != 3 or state not in STATE_NAMES:
            return None
        return cls(seq, state, committed, prev_size,
                   JournalRef(co, cl, cc, ct, bool(cs)) if cl else None,
                   JournalRef(po, pl, pc, pt, bool(ps)) if pl else None, boot)


def slot_of(seq: int, state: int) -> int:
    """Where a header is written: a commit's pending (and clean) header in slot seq % 2, its
    applied header in the other one, so the last durable header is never overwritten before a
    newer one is durable."""
    return (seq + (state == APPLIED)) % 2


def read_slots(fd: int) -> tuple[bytes, list[Header | None]]:
    raw = os.pread(fd, HEADER_SIZE, 0)
    return raw, [Header.unpack(raw[i * SLOT_SIZE:(i + 1) * SLOT_SIZE]) for i in (0, 1)]


def read_header(fd: int, path) -> Header:
    """The current header (the valid slot with the highest commit number and state)."""
    raw, slots = read_slots(fd)
    valid = [h for h in slots if h is not None]
    if valid:
        return max(valid, key=lambda h: h.key)
    if raw.startswith(HDF5_SIGNATURE):
        raise StoreError(f"{path} is a store of an older imgdb (format 1); upgrade it once "
                         f"with: imgdb repair --db {path}")
    if raw.startswith(_DEV_MAGIC):
        raise StoreError(f"{path} was written by a development version of imgdb; upgrade it "
                         f"once with: imgdb repair --db {path}")
    if os.pread(fd, 8, HEADER_SIZE) == HDF5_SIGNATURE:
        raise StoreDamaged(f"the commit header of store {path} is damaged; run: imgdb repair "
                           f"--db {path}")
    raise StoreError(f"{path} is not an imgdb store (no imgdb header)")


def write_header(fd: int, header: Header) -> None:
    os.pwrite(fd, header.pack(), slot_of(header.seq, header.state) * SLOT_SIZE)


def write_pid(fd: int, pid: int) -> None:
    """Who writes now (for 'locked by PID N'); informational, never trusted for anything else."""
    os.pwrite(fd, _PID.pack(PID_MAGIC, pid, pid ^ 0x5A5A5A5A5A5A5A5A), PID_AT)


def read_pid(fd: int) -> int | None:
    try:
        magic, pid, check = _PID.unpack(os.pread(fd, _PID.size, PID_AT))
    except (OSError, struct.error):
        return None
    return pid if magic == PID_MAGIC and check == pid ^ 0x5A5A5A5A5A5A5A5A else None


def init_header(fd: int, size: int) -> Header:
    """The header of a new store (clean, no commit yet), made durable."""
    header = Header(seq=0, state=CLEAN, committed=size, prev_size=size, boot=_BOOT)
    os.pwrite(fd, bytes(HEADER_SIZE - PID_AT), PID_AT)
    os.pwrite(fd, bytes(SLOT_SIZE), SLOT_SIZE * (1 - slot_of(0, CLEAN)))
    write_header(fd, header)
    _sync(fd)
    return header


# ---------------------------------------------------------------------------------------------
# the in-memory overlay


class Overlay(io.RawIOBase):
    """A file object over a store file: reads see the file plus the writes made through it;
    writes below `base` (the end of the committed data) stay in memory as pages; writes from
    `base` on (new space) go to memory too, or, before `direct_end`, straight to the file: that
    space holds nothing anyone needs (the committed data ends at `base`, the journal a crash
    recovery may still need starts at `direct_end`). Handed to h5py as its file.

    The file may be longer than `base` (journals, bytes of aborted commits); past `base` only
    this overlay's own bytes are visible. As with a real file, bytes cut by a truncate, or never
    written below the end, read as zeros.
    """

    def __init__(self, fd: int, base: int, direct_end: int | None = None) -> None:
        super().__init__()
        self.fd = fd
        self.error: OSError | None = None  # the last failed write to the file
        self.rebase(base, direct_end=direct_end)
        self.pos = 0

    def rebase(self, base: int, under: dict[int, memoryview] | None = None,
               direct_end: int | None = None) -> None:
        """Forget every change: the file (up to `base`) is the content again, seen through
        `under` (committed pages not yet applied to the file: page -> its first bytes)."""
        self.base = base
        self.size = base
        self.valid = base  # file bytes below this show through clean pages; above: zeros
        self.pages: dict[int, bytearray] = {}
        self.blocks: dict[int, bytearray] = {}  # new bytes past direct_end, by TAIL_BLOCK
        self.under: dict[int, memoryview] = under or {}
        self.direct_end = base if direct_end is None else max(base, direct_end)
        self.hwm = base  # bytes in [base, hwm) were written to the file by this overlay

    # -- io.RawIOBase ---------------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            pos = offset
        elif whence == 1:
            pos = self.pos + offset
        elif whence == 2:
            pos = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self.pos = pos
        return pos

    def tell(self) -> int:
        return self.pos

    def _pread_into(self, out: memoryview, at: int, limit: int) -> None:
        """Fill `out` with the file's bytes at `at`, zeros at and past `limit`."""
        n = len(out)
        take = max(0, min(n, limit - at))
        got = 0
        while got < take:
            r = os.preadv(self.fd, [out[got:take]], at + got)
            if r <= 0:
                break
            got += r
        if got < n:
            out[got:n] = bytes(n - got)

    def _file_into(self, out: memoryview, at: int) -> None:
        """Fill `out` with the committed bytes at `at` (< base): the file (zeros at and past
        `valid`) patched with the `under` pages."""
        n = len(out)
        self._pread_into(out, at, self.valid)
        if self.under:
            first, last = at // PAGE, (at + n - 1) // PAGE
            pages = range(first, last + 1) if last - first < len(self.under) else \
                [p for p in self.under if first <= p <= last]
            for p in pages:
                u = self.under.get(p)
                if u is None:
                    continue
                ps = p * PAGE
                a, b = max(at, ps), min(at + n, ps + len(u), self.valid)
                if a < b:
                    out[a - at:b - at] = u[a - ps:b - ps]

    def readinto(self, buffer) -> int:
        out = memoryview(buffer).cast("B")
        want = len(out)
        n = max(0, min(want, self.size - self.pos))
        done = 0
        while done < n:
            at = self.pos + done
            if at >= self.direct_end:  # new bytes kept in memory
                t = at - self.base
                while done < n:
                    b, w = divmod(t, TAIL_BLOCK)
                    take = min(TAIL_BLOCK - w, n - done)
                    blk = self.blocks.get(b)
                    out[done:done + take] = blk[w:w + take] if blk is not None else bytes(take)
                    done += take
                    t += take
                break
            if at >= self.base:  # new bytes written to the file
                take = min(n - done, self.direct_end - at)
                self._pread_into(out[done:done + take], at, self.hwm)
                done += take
                continue
            page, within = divmod(at, PAGE)
            take = min(PAGE - within, n - done, self.base - at)
            dirty = self.pages.get(page)
            if dirty is not None:
                out[done:done + take] = dirty[within:within + take]
            else:  # a run of clean pages in one read
                nxt = page + 1
                while done + take < n and at + take < self.base and nxt not in self.pages:
                    take = min(n - done, self.base - at, (nxt + 1) * PAGE - at)
                    nxt += 1
                self._file_into(out[done:done + take], at)
            done += take
        if n < want:  # past the end: zeros (h5py does not look at the count)
            out[n:want] = bytes(want - n)
        self.pos += n
        return n

    def _pwrite(self, data, at: int) -> None:
        try:
            _pwritev_all(self.fd, [data], at)
        except OSError as exc:
            self.error = exc
            raise

    def _zero_file(self, start: int, stop: int) -> None:
        zeros = bytes(min(stop - start, 1 << 20))
        while start < stop:
            take = min(len(zeros), stop - start)
            self._pwrite(memoryview(zeros)[:take], start)
            start += take

    def _keep(self, t: int, src: memoryview) -> None:
        """Keep new bytes in memory, `t` bytes past `base`."""
        done, n = 0, len(src)
        while done < n:
            b, w = divmod(t, TAIL_BLOCK)
            take = min(TAIL_BLOCK - w, n - done)
            blk = self.blocks.get(b)
            if blk is None:
                blk = self.blocks[b] = bytearray(TAIL_BLOCK)
            blk[w:w + take] = src[done:done + take]
            done += take
            t += take

    def _spill(self, at: int) -> None:
        """A write of new bytes to the file failed (disk full, file-size limit, I/O error):
        keep every new byte from `at` on in memory instead. HDF5 never sees the failure (a
        driver error inside HDF5, e.g. while it frees an object, can crash the process); the
        commit then measures the room it needs and refuses cleanly, or writes it."""
        lo = min(at, self.hwm)
        if self.hwm > lo:  # bytes this overlay already wrote at and past `lo`: into memory
            buf = bytearray(self.hwm - lo)
            self._pread_into(memoryview(buf), lo, self.hwm)
            self._keep(lo - self.base, memoryview(buf))
        self.direct_end = self.hwm = lo

    def write(self, data) -> int:
        src = memoryview(data).cast("B")
        n = len(src)
        done = 0
        while done < n:
            at = self.pos + done
            if at >= self.direct_end:
                self._keep(at - self.base, src[done:])
                break
            if at >= self.base:
                take = min(n - done, self.direct_end - at)
                try:
                    if at > self.hwm:  # a hole below this write reads as zeros
                        self._zero_file(self.hwm, at)
                    self._pwrite(src[done:done + take], at)
                except OSError:
                    self._spill(at)  # from here on in memory: the loop goes on there
                    continue
                self.hwm = max(self.hwm, at + take)
                done += take
                continue
            page, within = divmod(at, PAGE)
            take = min(PAGE - within, n - done, self.base - at)
            dirty = self.pages.get(page)
            if dirty is None:
                dirty = bytearray(PAGE)
                if take < PAGE:  # keep the rest of the page
                    self._file_into(memoryview(dirty), page * PAGE)
                self.pages[page] = dirty
            dirty[within:within + take] = src[done:done + take]
            done += take
        self.pos += n
        self.size = max(self.size, self.pos)
        return n

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else int(size)
        if size < 0:
            raise ValueError("negative size")
        if size >= self.base:
            self.hwm = min(self.hwm, size)
            self._cut_tail(size - self.base)
        else:
            self.blocks.clear()
            self.hwm = self.base
            self.valid = min(self.valid, size)
            first, within = divmod(size, PAGE)
            for page in [p for p in self.pages if p > first or (p == first and within == 0)]:
                del self.pages[page]
            if within and first in self.pages:
                self.pages[first][within:] = bytes(PAGE - within)
        self.size = size
        return size

    def _cut_tail(self, keep: int) -> None:
        """Bytes of the tail at and past `keep` are gone (they read as zeros if it grows)."""
        last, within = divmod(keep, TAIL_BLOCK)
        for b in [b for b in self.blocks if b > last or (b == last and within == 0)]:
            del self.blocks[b]
        if within and last in self.blocks:
            self.blocks[last][within:] = bytes(TAIL_BLOCK - within)

    def flush(self) -> None:
        pass

    # -- what a commit writes -----------------------------------------------------------------
    def direct_tail(self) -> tuple[int, int]:
        """(offset, length) of the new bytes that are already in the file; makes the bytes
        of that range this overlay never wrote zeros in the file too."""
        stop = min(self.size, self.direct_end)
        if stop > self.hwm:
            self._zero_file(self.hwm, stop)
            self.hwm = stop
        return self.base, max(0, stop - self.base)

    def records(self) -> list[tuple[int, list]]:
        """Runs of changed bytes still to write: [(offset, [buffers...])], in file order: the
        in-place pages (below `base`) and the new bytes kept in memory (from `direct_end`)."""
        end = min(self.base, self.size)
        runs: list[tuple[int, list]] = []
        cur_off, cur_bufs, cur_end = -1, [], -1

        def add(offset: int, buf) -> None:
            nonlocal cur_off, cur_bufs, cur_end
            if not len(buf):
                return
            if offset == cur_end:
                cur_bufs.append(buf)
            else:
                if cur_bufs:
                    runs.append((cur_off, cur_bufs))
                cur_off, cur_bufs = offset, [buf]
            cur_end = offset + len(buf)

        if 0 in self.pages:
            _clear_superblock_flags(self.pages[0])
        zero_from = self.valid  # clean bytes in [valid, end) must become zeros on disk
        dirty = sorted(p for p in self.pages if p * PAGE < end)
        pos = HEADER_SIZE  # the user block holds imgdb's header: never part of a commit
        for page in dirty:
            start = max(page * PAGE, HEADER_SIZE)
            stop = min(page * PAGE + PAGE, end)
            if stop <= start:
                continue
            if zero_from < start and pos < start:
                a = max(zero_from, pos)
                if a < start:
                    add(a, bytes(start - a))
            add(start, memoryview(self.pages[page])[start - page * PAGE:stop - page * PAGE])
            pos = stop
        if zero_from < end and pos < end:
            a = max(zero_from, pos)
            add(a, bytes(end - a))
        if cur_bufs:
            runs.append((cur_off, cur_bufs))
        if self.size > self.direct_end:  # new bytes kept in memory: a run of their own
            start = self.direct_end - self.base
            length = self.size - self.direct_end
            bufs = []
            t = start
            while t < start + length:
                b, w = divmod(t, TAIL_BLOCK)
                take = min(TAIL_BLOCK - w, start + length - t)
                blk = self.blocks.get(b)
                bufs.append(memoryview(blk)[w:w + take] if blk is not None else bytes(take))
                t += take
            runs.append((self.direct_end, bufs))
        return runs

    def committed_pages(self) -> dict[int, memoryview]:
        """After a commit: its in-place pages, for `rebase(under=...)`."""
        return {p: memoryview(b)[:min(PAGE, self.base - p * PAGE)]
                for p, b in self.pages.items() if p * PAGE < self.base}


def _clear_superblock_flags(page0: bytearray) -> None:
    """HDF5 versions that mark a version-3 superblock 'open for write' while a writer has the
    file open would make readers refuse the committed bytes: commit it with the flag clear."""
    sb = 512
    if bytes(page0[sb:sb + 8]) != HDF5_SIGNATURE or page0[sb + 8] < 2 or page0[sb + 11] == 0:
        return
    size = 12 + 4 * page0[sb + 9]
    page0[sb + 11] = 0
    page0[sb + size:sb + size + 4] = lookup3(bytes(page0[sb:sb + size])).to_bytes(4, "little")


_M32 = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 `hashlittle`: HDF5's metadata checksum."""
    n = len(data)
    a = b = c = (0xDEADBEEF + n + initval) & _M32
    i = 0
    while n > 12:
        a = (a + int.from_bytes(data[i:i + 4], "little")) & _M32
        b = (b + int.from_bytes(data[i + 4:i + 8], "little")) & _M32
        c = (c + int.from_bytes(data[i + 8:i + 12], "little")) & _M32
        a = (a - c) & _M32; a ^= _rot(c, 4); c = (c + b) & _M32  # noqa: E702
        b = (b - a) & _M32; b ^= _rot(a, 6); a = (a + c) & _M32  # noqa: E702
        c = (c - b) & _M32; c ^= _rot(b, 8); b = (b + a) & _M32  # noqa: E702
        a = (a - c) & _M32; a ^= _rot(c, 16); c = (c + b) & _M32  # noqa: E702
        b = (b - a) & _M32; b ^= _rot(a, 19); a = (a + c) & _M32  # noqa: E702
        c = (c - b) & _M32; c ^= _rot(b, 4); b = (b + a) & _M32  # noqa: E702
        i += 12
        n -= 12
    if n == 0:
        return c
    last = bytes(data[i:i + n]).ljust(12, b"\0")
    a = (a + int.from_bytes(last[0:4], "little")) & _M32
    b = (b + int.from_bytes(last[4:8], "little")) & _M32
    c = (c + int.from_bytes(last[8:12], "little")) & _M32
    c ^= b; c = (c - _rot(b, 14)) & _M32  # noqa: E702
    a ^= c; a = (a - _rot(c, 11)) & _M32  # noqa: E702
    b ^= a; b = (b - _rot(a, 25)) & _M32  # noqa: E702
    c ^= b; c = (c - _rot(b, 16)) & _M32  # noqa: E702
    a ^= c; a = (a - _rot(c, 4)) & _M32  # noqa: E702
    b ^= a; b = (b - _rot(a, 14)) & _M32  # noqa: E702
    c ^= b; c = (c - _rot(b, 24)) & _M32  # noqa: E702
    return c


# ---------------------------------------------------------------------------------------------
# journals


def _pwritev_all(fd: int, bufs: list, offset: int) -> None:
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


def journal_buffers(seq: int, size: int, runs: list[tuple[int, list]],
                    tail: tuple[int, int] = (0, 0)) -> tuple[list, int, int]:
    """(buffers, total length, CRC-32) of a journal; `tail` = (offset, length) of the commit's
    new bytes written in place (their CRC, once computed, seals the commit's header)."""
    bufs: list = [_JHEAD.pack(JOURNAL_MAGIC, seq, size, len(runs), *tail)]
    for offset, parts in runs:
        bufs.append(_RECORD.pack(offset, sum(len(p) for p in parts)))
        bufs.extend(parts)
    crc, total = 0, 0
    for b in bufs:
        crc = zlib.crc32(b, crc)
        total += len(b)
    return bufs, total, crc


def parse_journal(raw: bytes) -> tuple[int, int, list[tuple[int, memoryview]], tuple[int, int]]:
    """(seq, new size, [(offset, bytes)], (tail offset, tail length)) of a verified journal."""
    magic, seq, size, count, t_off, t_len = _JHEAD.unpack_from(raw, 0)
    if magic != JOURNAL_MAGIC:
        raise ValueError("not a journal")
    view = memoryview(raw)
    pos = _JHEAD.size
    out = []
    for _ in range(count):
        offset, length = _RECORD.unpack_from(raw, pos)
        pos += _RECORD.size
        if pos + length > len(raw):
            raise ValueError("record past the end")
        out.append((offset, view[pos:pos + length]))
        pos += length
    return seq, size, out, (t_off, t_len)


def _crc_at(fd: int, offset: int, length: int) -> int | None:
    """CRC-32 of the file's bytes [offset, offset + length), None when the file is shorter."""
    crc, done = 0, 0
    while done < length:
        block = os.pread(fd, min(length - done, 8 << 20), offset + done)
        if not block:
            return None
        crc = zlib.crc32(block, crc)
        done += len(block)
    return crc


def load_journal(fd: int, ref: JournalRef | None, boot: bytes
                 ) -> list[tuple[int, memoryview]] | None:
    """The records of a journal if its commit is intact, else None: the journal's length, CRC
    and magic, and its new bytes written in place: their CRC when the header is sealed, else
    (a commit whose flush had not finished) only in the boot that wrote them, whose page cache
    holds them whole (`boot`: of the header naming the journal)."""
    if ref is None:
        return None
    raw = os.pread(fd, ref.length, ref.offset)
    if len(raw) != ref.length or zlib.crc32(raw) != ref.crc:
        return None
    try:
        _, _, records, (t_off, t_len) = parse_journal(raw)
    except (ValueError, struct.error):
        return None
    if t_len:
        if ref.sealed:
            if _crc_at(fd, t_off, t_len) != ref.tail_crc:
                return None
        elif boot != _BOOT or _BOOT == bytes(16):
            return None
    return records


def tail_of(fd: int, ref: JournalRef) -> tuple[int, int]:
    """(offset, length) of a journal's new bytes written in place."""
    raw = os.pread(fd, _JHEAD.size, ref.offset)
    return tuple(_JHEAD.unpack(raw)[4:6]) if len(raw) == _JHEAD.size else (0, 0)


def seal(fd: int, ref: JournalRef) -> JournalRef:
    """The reference with the CRC of the commit's new bytes (read back from the file)."""
    if ref.sealed:
        return ref
    t_off, t_len = tail_of(fd, ref)
    return replace(ref, tail_crc=(_crc_at(fd, t_off, t_len) or 0) if t_len else 0, sealed=True)


@dataclass
class Plan:
    """What a header means: the data size, and the journals to replay (in order) when the
    bytes in place cannot be trusted; `direct` when the file can be read as it is; `undone`
    when the last commit never reached its durable point (the state is the one before it)."""

    header: Header
    size: int
    replay: list[list[tuple[int, memoryview]]]
    direct: bool
    undone: bool = False


def plan(path, fd: int, header: Header | None = None) -> Plan:
    """Decide how to read (or recover) the store from its header (see the module docstring)."""
    header = header or read_header(fd, path)
    in_place = header.state == APPLIED and (
        header.boot == _BOOT or _BOOT == bytes(16)
        # never flushed (IMGDB_SYNC=off) and the machine restarted: nothing better than the
        # bytes in place (their checksums tell if a power cut damaged them)
        or (header.cur is not None and not header.cur.sealed))
    if header.state == CLEAN or in_place:
        return Plan(header, header.committed, [], True)
    cur = load_journal(fd, header.cur, header.boot)
    prev = load_journal(fd, header.prev, header.boot)
    if cur is not None:
        return Plan(header, header.committed, [j for j in (prev, cur) if j is not None], False)
    if header.state != PENDING:
        raise StoreDamaged(f"store {path}: the journal of its last commit is damaged; run: "
                           f"imgdb repair --db {path}")
    if header.prev is not None and prev is None:
        raise StoreDamaged(f"store {path}: the journals of its last two commits are damaged; "
                           f"run: imgdb repair --db {path}")
    return Plan(header, header.prev_size, [prev] if prev is not None else [], False, True)


def view_of(fd: int, p: Plan) -> Overlay | None:
    """For a reader: None when the file can be read directly, else an overlay with the
    journals applied in memory (a writer died inside a commit, or the machine restarted)."""
    if p.direct:
        return None
    view = Overlay(fd, p.size)
    view.valid = min(p.size, os.fstat(fd).st_size)
    for records in p.replay:
        for offset, data in records:
            if offset < p.size:
                view.seek(offset)
                view.write(data[:max(0, p.size - offset)])
    view.size = p.size
    view.seek(0)
    return view


def recover(path, fd: int) -> Header:
    """Make the bytes in place match the header (replay journals); called by the writer, which
    holds the commit lock. Returns the header to continue from."""
    p = plan(path, fd)
    h = p.header
    if p.direct:
        return h
    for i, records in enumerate(p.replay):
        if i == 1:  # the older journal's bytes durable before the newer may overwrite them
            _sync(fd)
        for offset, data in records:
            _pwritev_all(fd, [data], offset)
    if not p.undone:
        # the state of commit `seq`: its applied header goes to the slot its pending one is not
        new = replace(h, state=APPLIED, boot=_BOOT, cur=seal(fd, h.cur))
        write_header(fd, new)
        return new
    # the last commit never reached its durable point: back to the state before it, written
    # over the slot of that commit's pending header (never over the other, still needed, one)
    back = seal(fd, h.prev) if h.prev is not None else None
    new = Header(seq=h.seq - 1, state=APPLIED if back else CLEAN, committed=p.size,
                 prev_size=p.size, cur=back, prev=None, boot=_BOOT)
    os.pwrite(fd, new.pack(), slot_of(h.seq, PENDING) * SLOT_SIZE)
    return new


# ---------------------------------------------------------------------------------------------
# committing


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
                     cur=JournalRef(at, length, crc, sealed=not t_len), prev=keep, boot=_BOOT)
    try:
        _pwritev_all(fd, bufs, at)
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
            _pwritev_all(fd, parts, offset)
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
    _sync(fd)
    clean = Header(seq=header.seq, state=CLEAN, committed=header.committed,
                   prev_size=header.committed, boot=_BOOT)
    write_header(fd, clean)
    _sync(fd)
    os.ftruncate(fd, header.committed)
    return clean
