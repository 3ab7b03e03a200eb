"""The redo log of a commit and recovery from it: a journal of the in-place pages (written,
parsed, checked, sealed with the CRC of the commit's new bytes), and, when a store is opened,
the plan of what to replay (`plan`), in memory for a reader (`view_of`) or in place for the
writer (`recover`)."""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, replace

from ..errors import StoreDamaged
from . import diskio
from .diskio import pwritev_all, sync_fd
from .header import (SLOT_SIZE, PENDING, APPLIED, CLEAN, JournalRef, Header, slot_of, read_header,
                     write_header)
from .overlay import Overlay


JOURNAL_MAGIC = b"IMGDBJN3"
_JHEAD = struct.Struct("<8sQQQQQ")  # magic, seq, new size, records, tail offset, tail length
_RECORD = struct.Struct("<QQ")  # offset, length


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
        elif boot != diskio.BOOT or diskio.BOOT == bytes(16):
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
        header.boot == diskio.BOOT or diskio.BOOT == bytes(16)
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
            sync_fd(fd)
        for offset, data in records:
            pwritev_all(fd, [data], offset)
    if not p.undone:
        # the state of commit `seq`: its applied header goes to the slot its pending one is not
        new = replace(h, state=APPLIED, boot=diskio.BOOT, cur=seal(fd, h.cur))
        write_header(fd, new)
        return new
    # the last commit never reached its durable point: back to the state before it, written
    # over the slot of that commit's pending header (never over the other, still needed, one)
    back = seal(fd, h.prev) if h.prev is not None else None
    new = Header(seq=h.seq - 1, state=APPLIED if back else CLEAN, committed=p.size,
                 prev_size=p.size, cur=back, prev=None, boot=diskio.BOOT)
    os.pwrite(fd, new.pack(), slot_of(h.seq, PENDING) * SLOT_SIZE)
    return new
