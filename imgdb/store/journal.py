"""Atomic commits for an HDF5 file: HDF5 writes into memory, imgdb puts the bytes on disk.

HDF5 updates a file in place and keeps no journal, so a write that fails half-way (disk full,
a file-size limit, an I/O error, a kill) can leave metadata that no longer parses. Here a commit
opens the file through :class:`Overlay`, a file object whose reads come from the file and whose
writes stay in memory; when HDF5 has closed the file, :func:`commit` knows every byte that
changed and writes them like a database with a redo journal:

1. check free space and the file-size limit against the exact number of bytes needed;
2. write the bytes past the committed end of the file (new data: the old file does not use
   them) and a journal of the in-place changes after them; flush to disk;
3. point the header at the journal (one 512-byte sector, with its own checksum); flush;
4. apply the in-place changes; flush; clear the pointer, record the new size; drop the journal.

A failure before step 3 leaves the old file (bytes past its end are cut off); after it, the
journal is complete and whoever opens the file next replays it (a reader that may not write
reads through the journal in memory). So a commit is all or nothing.

The header lives in HDF5's user block (the first 512 bytes, which HDF5 reserves for its users).
"""

from __future__ import annotations

import hashlib
import io
import os
import resource
import struct
from dataclasses import dataclass

from ..errors import DiskFull, StoreDamaged, StoreError

MAGIC = b"IMGDB-STORE\x00v2\x00\x00"  # 16 bytes
JOURNAL_MAGIC = b"IMGDBJNL"
HEADER = struct.Struct("<16sQQQQ32sQI")  # magic, committed size, journal offset, journal length,
#                                         commit count, journal digest, reserved, writer pid
HEADER_SIZE = 512
PAGE = 4096
SYNC = os.environ.get("IMGDB_SYNC", "full").lower() != "off"  # fsync at each step


@dataclass
class Header:
    committed: int = 0  # file size after the last commit
    journal_offset: int = 0  # 0: no pending journal
    journal_length: int = 0
    commits: int = 0
    journal_digest: bytes = b"\0" * 32
    pid: int = 0

    def pack(self) -> bytes:
        body = HEADER.pack(MAGIC, self.committed, self.journal_offset, self.journal_length,
                           self.commits, self.journal_digest, 0, self.pid)
        body = body.ljust(HEADER_SIZE - 32, b"\0")
        return body + hashlib.blake2b(body, digest_size=32).digest()

    @classmethod
    def unpack(cls, raw: bytes, path) -> "Header":
        if len(raw) < HEADER_SIZE or not raw.startswith(MAGIC):
            if raw.startswith(b"\x89HDF\r\n\x1a\n"):
                raise StoreError(f"{path} is a store of an older imgdb (format 1); upgrade it "
                                 f"once with: imgdb repair --db {path}")
            raise StoreError(f"{path} is not an imgdb store (no imgdb header)")
        body, digest = raw[:HEADER_SIZE - 32], raw[HEADER_SIZE - 32:HEADER_SIZE]
        if hashlib.blake2b(body, digest_size=32).digest() != digest:
            raise StoreDamaged(f"the header of store {path} is damaged; run: imgdb repair "
                               f"--db {path}")
        _, committed, off, length, commits, jdigest, _, pid = HEADER.unpack_from(body)
        return cls(committed, off, length, commits, jdigest, pid)


def read_header(fd: int, path) -> Header:
    return Header.unpack(os.pread(fd, HEADER_SIZE, 0), path)


def write_header(fd: int, header: Header) -> None:
    os.pwrite(fd, header.pack(), 0)


# ---------------------------------------------------------------------------------------------
# the in-memory overlay


class Overlay(io.RawIOBase):
    """A file object over a store file: reads see the file plus this commit's writes, writes go
    to memory (pages below the committed end, a tail beyond it). Handed to h5py as `fileobj`."""

    def __init__(self, fd: int, base: int, pages: dict[int, bytes] | None = None) -> None:
        super().__init__()
        self.fd = fd
        self.base = base  # committed size: bytes at and after it are new
        self.size = base
        self.pages: dict[int, bytearray] = {p: bytearray(b) for p, b in (pages or {}).items()}
        self.tail = bytearray()
        self.pos = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        out = memoryview(buffer).cast("B")
        n = max(0, min(len(out), self.size - self.pos))
        done = 0
        while done < n:
            at = self.pos + done
            if at >= self.base:
                chunk = self.tail[at - self.base:at - self.base + n - done]
                out[done:done + len(chunk)] = chunk
                out[done + len(chunk):n] = bytes(n - done - len(chunk))  # a hole reads as zeros
                break
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
                data = os.pread(self.fd, take, at)
                out[done:done + len(data)] = data
                if len(data) < take:
                    out[done + len(data):done + take] = bytes(take - len(data))
            done += take
        self.pos += n
        return n

    def write(self, data) -> int:
        src = memoryview(data).cast("B")
        n = len(src)
        done = 0
        while done < n:
            at = self.pos + done
            if at >= self.base:
                t = at - self.base
                if t > len(self.tail):
                    self.tail.extend(bytes(t - len(self.tail)))
                self.tail[t:t + n - done] = src[done:]
                break
            page, within = divmod(at, PAGE)
            take = min(PAGE - within, n - done, self.base - at)
            dirty = self.pages.get(page)
            if dirty is None:
                dirty = bytearray(PAGE) if take == PAGE else \
                    bytearray(os.pread(self.fd, PAGE, page * PAGE).ljust(PAGE, b"\0"))
                self.pages[page] = dirty
            dirty[within:within + take] = src[done:done + take]
            done += take
        self.pos += n
        self.size = max(self.size, self.base + len(self.tail))
        return n

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        if size >= self.base:
            del self.tail[size - self.base:]
            if size - self.base > len(self.tail):
                self.tail.extend(bytes(size - self.base - len(self.tail)))
        else:
            self.tail.clear()
        self.size = size
        return size

    def flush(self) -> None:
        pass

    # -- what the commit writes ------------------------------------------------------------
    def changed_pages(self) -> list[tuple[int, bytes]]:
        """(offset, bytes) of every changed page below the committed end (clipped to it)."""
        out = []
        for page in sorted(self.pages):
            start = page * PAGE
            end = min(start + PAGE, self.base, self.size)
            if end > start:
                out.append((start, bytes(self.pages[page][:end - start])))
        return out


def _journal_bytes(base: int, size: int, pages: list[tuple[int, bytes]]) -> bytes:
    parts = [JOURNAL_MAGIC, struct.pack("<QQI", base, size, len(pages))]
    for offset, data in pages:
        parts.append(struct.pack("<QI", offset, len(data)))
        parts.append(data)
    return b"".join(parts)


def _parse_journal(raw: bytes) -> tuple[int, int, list[tuple[int, bytes]]]:
    if not raw.startswith(JOURNAL_MAGIC):
        raise ValueError("bad journal")
    base, size, count = struct.unpack_from("<QQI", raw, 8)
    pos = 8 + 20
    pages = []
    for _ in range(count):
        offset, length = struct.unpack_from("<QI", raw, pos)
        pos += 12
        pages.append((offset, raw[pos:pos + length]))
        pos += length
    return base, size, pages


def _sync(fd: int) -> None:
    if SYNC:
        os.fsync(fd)


def _free_bytes(path) -> int:
    st = os.statvfs(os.path.dirname(os.path.abspath(path)) or ".")
    return st.f_bavail * st.f_frsize


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 10e9 else f"{n / 1e9:.1f} GB"


def check_room(path, fd: int, grow_to: int, extra: int) -> None:
    """Refuse, before writing anything, a commit that cannot fit (free space, ulimit -f)."""
    size = os.fstat(fd).st_size
    needed = max(0, grow_to - size) + extra
    free = _free_bytes(path)
    if needed > free:
        raise DiskFull(f"disk full: {_mb(free)} free, this commit needs about {_mb(needed)}; "
                       f"nothing committed is lost; free space and rerun")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and grow_to + extra > limit:
        raise DiskFull(f"file-size limit (ulimit -f) is {_mb(limit)}, this commit needs the "
                       f"store to grow to {_mb(grow_to + extra)}; nothing committed is lost; "
                       f"raise the limit and rerun")


def _os_error(path, exc: OSError) -> StoreError:
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"disk full while writing {path}: {_mb(_free_bytes(path))} free; "
                        f"nothing committed is lost; free space and rerun")
    if exc.errno == errno.EFBIG:
        return DiskFull(f"file-size limit reached while writing {path}; nothing committed is "
                        f"lost; raise the limit (ulimit -f) and rerun")
    return StoreError(f"I/O error while writing {path} ({exc.strerror or exc}); nothing "
                      f"committed is lost; rerun")


def commit(path, fd: int, header: Header, overlay: Overlay) -> Header:
    """Put the overlay's bytes on disk atomically (see the module docstring); returns the new
    header. Raises DiskFull/StoreError with the store unchanged when the bytes do not fit."""
    base, size = overlay.base, overlay.size
    pages = overlay.changed_pages()
    journal = _journal_bytes(base, size, pages) if pages else b""
    tail = bytes(overlay.tail[:max(0, size - base)])
    joff = max(size, base)
    joff += (-joff) % 8
    check_room(path, fd, joff, len(journal))
    try:
        if tail:
            os.pwrite(fd, tail, base)
        if journal:
            os.pwrite(fd, journal, joff)
        _sync(fd)
    except OSError as exc:
        _cut(fd, base)
        raise _os_error(path, exc) from None
    new = Header(committed=size, commits=header.commits + 1, pid=header.pid)
    if journal:
        pending = Header(header.committed, joff, len(journal), header.commits,
                         hashlib.blake2b(journal, digest_size=32).digest(), header.pid)
        try:
            write_header(fd, pending)
            _sync(fd)
        except OSError as exc:
            _restore_header(fd, header)
            _cut(fd, base)
            raise _os_error(path, exc) from None
        try:
            _apply(fd, pages, size)
        except OSError as exc:  # the journal is complete: the next opener replays it
            raise StoreError(f"I/O error while writing {path} ({exc.strerror or exc}); the "
                             f"commit is kept in its journal and finished when the store is "
                             f"next opened") from None
    write_header(fd, new)
    _sync(fd)
    os.ftruncate(fd, size)
    return new


def _apply(fd: int, pages: list[tuple[int, bytes]], size: int) -> None:
    for offset, data in pages:
        os.pwrite(fd, data, offset)
    _sync(fd)


def _cut(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError:
        pass


def _restore_header(fd: int, header: Header) -> None:
    try:
        write_header(fd, header)
    except OSError:
        pass


def pending_pages(path, fd: int, header: Header) -> tuple[int, int, list[tuple[int, bytes]]] | None:
    """The journal of an interrupted commit, verified: (base, size, pages), or None."""
    if not header.journal_offset:
        return None
    raw = os.pread(fd, header.journal_length, header.journal_offset)
    if len(raw) != header.journal_length or \
            hashlib.blake2b(raw, digest_size=32).digest() != header.journal_digest:
        raise StoreDamaged(f"store {path} has an interrupted commit whose journal is damaged; "
                           f"run: imgdb repair --db {path}")
    return _parse_journal(raw)


def recover(path, fd: int) -> Header:
    """Finish an interrupted commit (replay its journal). Called by the writer, which holds
    the store's locks. Bytes a killed commit left past the end are harmless: HDF5 never reads
    past its end of allocation and cuts the file there when the next commit closes it."""
    header = read_header(fd, path)
    journal = pending_pages(path, fd, header)
    if journal is not None:
        _, size, pages = journal
        _apply(fd, pages, size)
        header = Header(size, 0, 0, header.commits + 1, b"\0" * 32, header.pid)
        write_header(fd, header)
        _sync(fd)
    return header


def read_view(path, fd: int) -> Overlay | None:
    """For a reader: None when the file is clean, else an overlay with the pending journal
    applied in memory (the writer died inside a commit; the next writer will replay it)."""
    header = read_header(fd, path)
    journal = pending_pages(path, fd, header)
    if journal is None:
        return None
    _, size, pages = journal
    view = Overlay(fd, size)  # new data [old end, size) is already in the file; pages below
    for offset, data in pages:
        view.seek(offset)
        view.write(data)
    view.size = size
    view.seek(0)
    return view


def init_header(fd: int, size: int) -> Header:
    header = Header(committed=size)
    write_header(fd, header)
    _sync(fd)
    return header
