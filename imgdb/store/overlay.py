"""The writer's view of its HDF5 file (`Overlay`): reads from the file, changes to bytes in use kept
in memory as pages, new bytes past the committed end written straight to free space; and
HDF5's own metadata checksum (lookup3), needed to clear the superblock's open-file flags."""

from __future__ import annotations

import io
import os

from .diskio import pwritev_all
from .header import HDF5_SIGNATURE, HEADER_SIZE


PAGE = 4096
TAIL_BLOCK = 1 << 20  # new bytes past the end are kept in blocks of this size


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
            pwritev_all(self.fd, [data], at)
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
            clear_superblock_flags(self.pages[0])
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


def clear_superblock_flags(page0: bytearray) -> None:
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
