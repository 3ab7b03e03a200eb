"""The store's commit header: two checksummed 224-byte slots in HDF5's user block (commit number,
state, size, the journals of the last two commits), and the writer's PID beside them. The valid
slot with the highest (commit number, state) wins, so a torn write falls back to the other."""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

from ..errors import NotAStore, StoreDamaged, StoreError
from . import diskio
from .diskio import sync_fd


HEADER_SIZE = 512  # HDF5's user block
SLOT_SIZE = 224
SLOT_MAGIC = b"IMGDBHD3"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
PID_AT, PID_MAGIC = 448, b"IMGDBPID"
PENDING, APPLIED, CLEAN = 0, 1, 2
STATE_NAMES = {PENDING: "pending", APPLIED: "applied", CLEAN: "clean"}
_DEV_MAGIC = b"IMGDB-STORE\x00v2\x00\x00"  # the single-slot header of a development version
_SLOT = struct.Struct("<8sIQBQQQQIIBQQIIB16s")
_PID = struct.Struct("<8sQQ")  # magic, pid, pid ^ constant


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
        if not _imgdb_hdf5(fd, path):
            raise NotAStore(f"{path} is an HDF5 file but not an imgdb store")
        raise StoreError(f"{path} is a store of an older imgdb (format 1); upgrade it once "
                         f"with: imgdb repair --db {path}")
    if raw.startswith(_DEV_MAGIC):
        raise StoreError(f"{path} was written by a development version of imgdb; upgrade it "
                         f"once with: imgdb repair --db {path}")
    if os.pread(fd, 8, HEADER_SIZE) == HDF5_SIGNATURE:
        raise StoreDamaged(f"the commit header of store {path} is damaged; run: imgdb repair "
                           f"--db {path}")
    raise NotAStore(f"{path} is not an imgdb store (no imgdb header)")


def _imgdb_hdf5(fd: int, path) -> bool:
    """Whether an HDF5 file without imgdb's header says it is an imgdb store (format 1)."""
    import h5py

    from .lock import fd_path
    from .schema import FORMAT

    try:
        with h5py.File(fd_path(fd, path), "r", locking=False) as fh:
            value = fh.attrs.get("format", b"")
    except Exception:  # noqa: BLE001 - unreadable: not recognisably a store
        return False
    value = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return value == FORMAT


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
    header = Header(seq=0, state=CLEAN, committed=size, prev_size=size, boot=diskio.BOOT)
    os.pwrite(fd, bytes(HEADER_SIZE - PID_AT), PID_AT)
    os.pwrite(fd, bytes(SLOT_SIZE), SLOT_SIZE * (1 - slot_of(0, CLEAN)))
    write_header(fd, header)
    sync_fd(fd)
    return header
