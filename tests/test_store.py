"""The store's machinery, piece by piece: the overlay's byte semantics, journaled commits and
their recovery (kills and power cuts simulated at every write), failed writes, the locks
between processes, and check/repair on damaged and old-format stores.

Every expected value is worked out independently: a plain file driven by the same operations,
the rows a test committed itself, or the state before/after one commit.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from imgdb.errors import StoreDamaged, StoreError, UserError
from imgdb.store import ImageRow, RowUpdate, StoreWriter, diskio, journal, lock, open_read
from imgdb.store.check import check_store
from imgdb.store.repair import repair_store

ROOT = Path(__file__).resolve().parents[1]
DIMS = {("head", "sum"): 6, ("head", "mac"): 3}


# ---------------------------------------------------------------------------------------------
# helpers


def rows_for(commit: int, n: int = 4, start: int = 0) -> list[RowUpdate]:
    return [RowUpdate(None, ImageRow(f"/photos/c{commit}/img{start + i}.jpg", 1000 * commit + i,
                                     1.5e9 + commit, f"{commit:016x}{i:016x}", 40 + i, 30, 0))
            for i in range(n)]


def vectors_for(commit: int, n: int = 4) -> dict:
    return {k: np.full((n, d), commit + 0.25 * np.arange(n)[:, None], np.float32)
            for k, d in DIMS.items()}


def new_store(path: Path) -> StoreWriter:
    w = StoreWriter(path)
    w.ensure_extractor("ext", {"layers": ["head"], "poolings": ["mac", "sum"]}, DIMS)
    return w


def fill(path: Path, commits: int, n: int = 4) -> None:
    with new_store(path) as w:
        for c in range(commits):
            w.commit("ext", rows_for(c, n), vectors_for(c, n))


def snapshot(path: Path) -> dict:
    """What a reader sees: paths, sizes, every vector, the state column."""
    with open_read(path) as view:
        table = view.images()
        out = {"rows": view.rows, "paths": table.path, "size": table.size.tolist(),
               "state": view.state("ext").tolist() if "ext" in view.extractors() else []}
        for d in view.descriptors():
            out[d.name] = view.vectors(d).tolist()
        return out


def expected(commits: int, n: int = 4) -> dict:
    """The snapshot of a store made by `fill(path, commits, n)`, worked out by hand."""
    paths, sizes, sums, macs = [], [], [], []
    for c in range(commits):
        for i in range(n):
            paths.append(f"/photos/c{c}/img{i}.jpg")
            sizes.append(1000 * c + i)
            sums.append([c + 0.25 * i] * 6)
            macs.append([c + 0.25 * i] * 3)
    return {"rows": commits * n, "paths": paths, "size": sizes, "state": [1] * (commits * n),
            "ext/head/sum": sums, "ext/head/mac": macs}


def run_py(code: str, *args: str, check: bool = True, env: dict | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, env=full, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"child exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


# ---------------------------------------------------------------------------------------------
# the overlay: the same bytes as a plain file, whatever the sequence of operations


def _overlay_case(tmp_path: Path, seed: int, fail_writes: bool = False) -> None:
    """Random writes, reads and truncates on an overlay and on a plain file agree. With
    `fail_writes`, from a random operation on every write of new bytes to the file fails (as
    on a full disk): the overlay keeps them in memory and still agrees."""
    rng = random.Random(seed)
    base = rng.choice([0, 100, 4096, 5000, 3 * 4096 + 17])
    garbage = rng.randrange(0, 9000)  # bytes past the committed end: must never show
    content = bytes(rng.getrandbits(8) for _ in range(base))
    store = tmp_path / f"o{seed}.bin"
    store.write_bytes(content + bytes(rng.getrandbits(8) for _ in range(garbage)))
    fd = os.open(store, os.O_RDWR)
    direct_end = base + rng.choice([0, 0, 3000, 10_000, 1 << 40])
    ov = journal.Overlay(fd, base, direct_end)
    if base and rng.random() < 0.3:  # committed pages not yet applied to the file
        pages = {}
        for p in rng.sample(range(0, -(-base // journal.PAGE)), k=min(2, -(-base // 4096))):
            length = min(journal.PAGE, base - p * journal.PAGE)
            data = bytes(rng.getrandbits(8) for _ in range(length))
            pages[p] = memoryview(bytearray(data))
            content = content[:p * 4096] + data + content[p * 4096 + length:]
        ov.under = pages
    plain = tmp_path / f"plain{seed}.bin"
    plain.write_bytes(content)
    model = open(plain, "r+b", buffering=0)  # the reference: a plain file
    fail_from = rng.randrange(0, 20) if fail_writes else -1
    for i in range(rng.randrange(5, 60)):
        if i == fail_from:
            ov.fd = os.open(store, os.O_RDONLY)  # every write to the file fails from now on
        op = rng.random()
        if op < 0.45:
            at = rng.randrange(0, base + 12_000)
            data = bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 7, 100, 4096, 5000])))
            for f in (ov, model):
                f.seek(at)
                assert f.write(data) == len(data)
        elif op < 0.8:
            at = rng.randrange(0, base + 14_000)
            n = rng.choice([1, 10, 4096, 9000])
            ov.seek(at)
            model.seek(at)
            buf = bytearray(n)
            got = ov.readinto(buf)
            want = model.read(n)
            assert got == len(want) and bytes(buf[:got]) == want, (seed, at, n)
        else:
            size = rng.randrange(0, base + 12_000)
            ov.truncate(size)
            model.truncate(size)
        ov.seek(0, 2)
        assert ov.tell() == os.fstat(model.fileno()).st_size
    # a commit's records (plus the new bytes already in the file) turn the file into the model
    if ov.fd != fd:  # (a commit with a failing file is refused before it writes: not here)
        os.close(ov.fd)
        ov.fd = fd
    model.close()
    final = plain.read_bytes()
    for p, data in ov.under.items():  # the previous commit's pages, applied by that commit
        diskio.pwritev_all(fd, [data], p * journal.PAGE)
    t_off, t_len = ov.direct_tail()
    for offset, parts in ov.records():
        diskio.pwritev_all(fd, parts, offset)
    os.ftruncate(fd, len(final))
    os.close(fd)
    on_disk = store.read_bytes()
    # the user block is the commit header's: a commit never writes it
    assert on_disk[journal.HEADER_SIZE:] == final[journal.HEADER_SIZE:], seed
    if t_len:
        assert t_off == base


@pytest.mark.parametrize("seed", range(60))
def test_overlay_reads_writes_truncates_like_a_file(tmp_path: Path, seed: int) -> None:
    _overlay_case(tmp_path, seed)


@pytest.mark.parametrize("seed", range(30))
def test_overlay_keeps_new_bytes_in_memory_when_the_file_refuses_them(tmp_path: Path,
                                                                      seed: int) -> None:
    _overlay_case(tmp_path, 1000 + seed, fail_writes=True)


def test_lookup3_matches_hdf5_superblock_checksum(tmp_path: Path) -> None:
    path = tmp_path / "sb.h5"
    with h5py.File(path, "w", libver="latest", userblock_size=512) as fh:
        fh["x"] = np.arange(3)
    sb = path.read_bytes()[512:560]
    assert sb[8] == 3  # superblock version 3: 44 bytes, then the checksum
    assert journal.lookup3(sb[:44]) == int.from_bytes(sb[44:48], "little")
    page = bytearray(path.read_bytes()[:4096].ljust(4096, b"\0"))
    page[512 + 11] = 1  # 'open for write', as some HDF5 versions leave it
    journal.clear_superblock_flags(page)
    assert bytes(page[512:560]) == sb


def test_header_slots_pick_the_newest_valid_and_survive_a_torn_slot(tmp_path: Path) -> None:
    path = tmp_path / "h.h5"
    fill(path, 3)
    fd = os.open(path, os.O_RDWR)
    try:
        raw, slots = journal.read_slots(fd)
        best = journal.read_header(fd, path)
        assert best.state == journal.CLEAN and best.seq == 1 + 3  # ensure_extractor + 3
        assert best == max((h for h in slots if h), key=lambda h: h.key)
        # tear the best slot: the other one answers (an older header of the same file)
        i = slots.index(best)
        os.pwrite(fd, b"\xff" * 40, i * journal.SLOT_SIZE + 50)
        other = journal.read_header(fd, path)
        assert other.key < best.key
        os.pwrite(fd, b"\xff" * 40, (1 - i) * journal.SLOT_SIZE + 50)
        with pytest.raises(StoreDamaged, match="header of store .* is damaged; run: imgdb repair"):
            journal.read_header(fd, path)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# commits, reopen, recovery


@pytest.mark.parametrize("sync", ["full", "off"])
def test_commits_round_trip_and_close_leaves_a_clean_trimmed_file(tmp_path: Path, monkeypatch,
                                                                  sync: str) -> None:
    monkeypatch.setenv("IMGDB_SYNC", sync)
    path = tmp_path / "s.h5"
    w = new_store(path)
    for c in range(6):
        w.commit("ext", rows_for(c), vectors_for(c))
        assert snapshot(path) == expected(c + 1)  # a reader sees each commit as it returns
    w.close()
    assert snapshot(path) == expected(6)
    fd = os.open(path, os.O_RDONLY)
    header = journal.read_header(fd, path)
    os.close(fd)
    assert header.state == journal.CLEAN and header.cur is None
    assert path.stat().st_size == header.committed  # the journals are cut off
    assert check_store(path).ok
    with StoreWriter(path) as w:  # appendable
        w.commit("ext", rows_for(6), vectors_for(6))
    assert snapshot(path) == expected(7)


def test_odd_file_names_round_trip(tmp_path: Path) -> None:
    names = ["bad\udcff.png", "new\nline.jpg", "tab\tand\x01ctl.png", "café 東京.jpg", "a" * 300]
    path = tmp_path / "n.h5"
    with new_store(path) as w:
        w.commit("ext", [RowUpdate(None, ImageRow(f"/d/{n}", 1, 1.0, "x" * 32, 40, 40, 0))
                         for n in names], {k: np.zeros((len(names), d), np.float32)
                                           for k, d in DIMS.items()})
    with open_read(path) as view:
        stored = view.paths()
    assert stored == [f"/d/{n}" for n in names]
    assert [os.fsencode(p) for p in stored][0] == b"/d/bad\xff.png"


def test_failed_transaction_commits_nothing_and_writer_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    with new_store(path) as w:
        w.commit("ext", rows_for(0), vectors_for(0))
        bad = vectors_for(1)
        bad[("head", "sum")] = np.zeros((4, 5), np.float32)  # wrong width: h5py refuses
        with pytest.raises((TypeError, ValueError, OSError)):
            w.commit("ext", rows_for(1), bad)
        with pytest.raises(ValueError, match="same row twice"):
            w.commit("ext", [RowUpdate(0, rows_for(0)[0].image)] * 2,
                     {k: v[:2] for k, v in vectors_for(0).items()})
        assert snapshot(path) == expected(1)
        w.commit("ext", rows_for(1), vectors_for(1))
    assert snapshot(path) == expected(2)


def test_reentrancy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.h5"
    with new_store(path) as w:
        with w.transaction():
            with pytest.raises(RuntimeError, match="nested"):
                with w.transaction():
                    pass
        with open_read(path):
            with pytest.raises(StoreError, match="being read by this same process"):
                w.commit("ext", rows_for(0), vectors_for(0))
        with open_read(path):  # nested reads in one process share one hold
            with open_read(tmp_path / "." / "r.h5") as view:
                assert view.rows == 0
        w.commit("ext", rows_for(0), vectors_for(0))
    assert snapshot(path) == expected(1)


# ---------------------------------------------------------------------------------------------
# a write that fails at each step leaves the store as before (or, past the commit point, as
# after), openable and appendable


class _Fault(Exception):
    pass


def _inject(monkeypatch, name: str, nth: int, err: int) -> list:
    """Make the nth call of os.<name> made by the store raise OSError(err)."""
    calls = []
    real = getattr(os, name)

    def fake(*args):
        calls.append(name)
        if len(calls) == nth:
            raise OSError(err, os.strerror(err))
        return real(*args)

    monkeypatch.setattr(journal.os, name, fake)
    return calls


@pytest.mark.parametrize("name,err", [("pwrite", errno.EIO), ("pwritev", errno.ENOSPC),
                                      ("pwritev", errno.EFBIG), ("fsync", errno.EIO)])
@pytest.mark.parametrize("nth", [1, 2, 3, 4, 6])
def test_a_failing_write_leaves_the_store_before_or_after(tmp_path: Path, monkeypatch, name: str,
                                                          err: int, nth: int) -> None:
    monkeypatch.setenv("IMGDB_SYNC", "full")
    path = tmp_path / "e.h5"
    fill(path, 2)
    w = StoreWriter(path)
    calls = _inject(monkeypatch, name, nth, err)
    raised = None
    try:
        w.commit("ext", rows_for(2), vectors_for(2))
        w.commit("ext", rows_for(3), vectors_for(3))  # reports a failure of the flush before
    except UserError as exc:
        raised = exc
    try:
        w.close()  # reports a failure of the last flush
    except UserError as exc:
        raised = raised or exc
    monkeypatch.undo()
    if len(calls) < nth:
        assert raised is None and snapshot(path) == expected(4)
        return
    assert raised is not None and "\n" not in str(raised)
    if err == errno.ENOSPC:
        assert str(raised).startswith("disk full")
    if err == errno.EFBIG:
        assert str(raised).startswith("file-size limit")
    got = snapshot(path)
    assert got in (expected(2), expected(3), expected(4)), got["rows"]
    assert check_store(path).ok
    with StoreWriter(path) as again:  # appendable, rows never doubled
        n = again.images().__len__()
        again.commit("ext", rows_for(n // 4), vectors_for(n // 4))
    assert snapshot(path) == expected(n // 4 + 1)


# ---------------------------------------------------------------------------------------------
# kill -9 between any two writes of a commit: the store is the state before or after it


_CHILD_FILL = """
import os, signal, sys, threading
import numpy as np
from imgdb.store import ImageRow, RowUpdate, StoreWriter, journal
path, kill_at, commits = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
DIMS = {("head", "sum"): 6, ("head", "mac"): 3}
calls = [0]
mutex = threading.Lock()
def counted(real):
    def call(*args):
        with mutex:
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)
    return call
for name in ("pwrite", "pwritev", "fsync", "ftruncate"):
    setattr(journal.os, name, counted(getattr(os, name)))
w = StoreWriter(path)
for c in range(int(sys.argv[4]), int(sys.argv[4]) + commits):
    rows = [RowUpdate(None, ImageRow(f"/photos/c{c}/img{i}.jpg", 1000 * c + i, 1.5e9 + c,
                                     f"{c:016x}{i:016x}", 40 + i, 30, 0)) for i in range(4)]
    w.commit("ext", rows, {k: np.full((4, d), c + 0.25 * np.arange(4)[:, None], np.float32)
                           for k, d in DIMS.items()})
w.close()
print(calls[0])
"""


@pytest.mark.parametrize("sync", ["full", "off"])
def test_kill_9_between_any_two_writes(tmp_path: Path, sync: str) -> None:
    base = tmp_path / "base.h5"
    fill(base, 2)
    probe = tmp_path / "probe.h5"
    probe.write_bytes(base.read_bytes())
    total = int(run_py(_CHILD_FILL, str(probe), "0", "3", "2",
                       env={"IMGDB_SYNC": sync}).stdout.split()[-1])
    assert total >= 12
    seen = set()
    for kill_at in range(1, total + 1):
        path = tmp_path / f"k{kill_at}.h5"
        path.write_bytes(base.read_bytes())
        proc = run_py(_CHILD_FILL, str(path), str(kill_at), "3", "2", check=False,
                      env={"IMGDB_SYNC": sync})
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        got = snapshot(path)  # opens after the kill (replaying a pending journal in memory)
        m = got["rows"] // 4
        assert got == expected(m) and 2 <= m <= 5, (kill_at, got["rows"])
        seen.add(m)
        report = check_store(path)
        assert report.ok, (kill_at, report.problems)
        with StoreWriter(path) as w:  # recovers, then appends
            w.commit("ext", rows_for(m), vectors_for(m))
        assert snapshot(path) == expected(m + 1)
        assert check_store(path).ok
        path.unlink()
    assert seen == {2, 3, 4, 5}  # kills landed before, inside and after every commit


# ---------------------------------------------------------------------------------------------
# power cuts: any subset of the writes since the last fsync may have reached the disk


class _Recorder:
    """Performs the store's writes and remembers them (in the order they were made)."""

    def __init__(self, monkeypatch) -> None:
        import threading

        self.ops: list[tuple] = []
        self.mutex = threading.Lock()
        self.durable_commits: list[int] = []  # commits durable at each op index
        self.done = 0
        for name in ("pwrite", "pwritev", "fsync", "ftruncate"):
            monkeypatch.setattr(journal.os, name, self._wrap(name, getattr(os, name)))

    def _wrap(self, name: str, real):
        def call(fd, *args):
            with self.mutex:
                if name == "pwrite":
                    self.ops.append(("w", args[1], bytes(args[0])))
                elif name == "pwritev":
                    self.ops.append(("w", args[1], b"".join(bytes(b) for b in args[0])))
                elif name == "ftruncate":
                    self.ops.append(("t", args[0]))
                else:
                    self.ops.append(("s",))
                return real(fd, *args)
        return call


def _disk_image(start: bytes, ops: list[tuple], crash: int, rng: random.Random) -> bytes:
    """The disk after a power cut following ops[:crash]: everything before the last fsync,
    then each later write (each 512-byte sector of it) kept or lost at random."""
    synced = max([i for i, op in enumerate(ops[:crash]) if op[0] == "s"], default=-1)
    disk = bytearray(start)

    def put(offset: int, data: bytes) -> None:
        if len(disk) < offset + len(data):
            disk.extend(bytes(offset + len(data) - len(disk)))
        disk[offset:offset + len(data)] = data

    for i, op in enumerate(ops[:crash]):
        lost_ok = i > synced
        if op[0] == "w":
            offset, data = op[1], op[2]
            if not lost_ok:
                put(offset, data)
                continue
            for a in range(0, len(data), 512):
                if rng.random() < 0.5:
                    put(offset + a, data[a:a + 512])
        elif op[0] == "t" and (not lost_ok or rng.random() < 0.5):
            del disk[op[1]:]
            disk.extend(bytes(max(0, op[1] - len(disk))))
    return bytes(disk)


def test_power_cut_at_any_point_leaves_a_committed_state(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("IMGDB_SYNC", "full")
    path = tmp_path / "p.h5"
    fill(path, 2)
    start = path.read_bytes()
    rec = _Recorder(monkeypatch)
    marks = []  # (op index after which commit m had returned, m)
    w = StoreWriter(path)
    for c in range(2, 6):
        w.commit("ext", rows_for(c), vectors_for(c))
        w._settle()  # its flush done: from here on the commit must survive a power cut
        marks.append((len(rec.ops), c + 1))
    w.close()
    marks.append((len(rec.ops), 6))
    monkeypatch.undo()
    monkeypatch.setattr(diskio, "BOOT", b"another boot...!")  # the machine restarted
    monkeypatch.setenv("IMGDB_SYNC", "full")
    rng = random.Random(7)
    cases, seen, lost = 0, set(), 0
    for crash in range(0, len(rec.ops) + 1):
        durable = max([m for i, m in marks if i <= crash], default=2)
        for attempt in range(3):
            image = tmp_path / f"cut{crash}-{attempt}.h5"
            image.write_bytes(_disk_image(start, rec.ops, crash, rng))
            got = snapshot(image)
            m = got["rows"] // 4
            assert got == expected(m) and durable <= m <= 6, (crash, attempt, got["rows"])
            seen.add(m)
            lost += m < max([c for i, c in marks if i <= crash + 20], default=2)
            assert check_store(image).ok
            with StoreWriter(image) as again:
                again.commit("ext", rows_for(m), vectors_for(m))
            assert snapshot(image) == expected(m + 1)
            image.unlink()
            cases += 1
    assert cases > 60 and seen == {2, 3, 4, 5, 6} and lost  # cuts inside commits undid them


# ---------------------------------------------------------------------------------------------
# a writer killed after writing a commit: readers see it (replayed in memory), the next writer
# finishes it


def test_reader_reads_through_a_pending_journal(tmp_path: Path) -> None:
    path = tmp_path / "j.h5"
    fill(path, 2)
    # kill the writer right after its pending header is written (before the flush and apply)
    child = """
import os, signal, sys
import numpy as np
from imgdb.store import ImageRow, RowUpdate, StoreWriter, journal
real = journal.complete
journal.complete = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
w = StoreWriter(sys.argv[1])
rows = [RowUpdate(None, ImageRow(f"/photos/c2/img{i}.jpg", 2000 + i, 1.5e9 + 2,
                                 f"{2:016x}{i:016x}", 40 + i, 30, 0)) for i in range(4)]
w.commit("ext", rows, {k: np.full((4, d), 2 + 0.25 * np.arange(4)[:, None], np.float32)
                       for k, d in {("head", "sum"): 6, ("head", "mac"): 3}.items()})
"""
    proc = run_py(child, str(path), check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    fd = os.open(path, os.O_RDONLY)
    header = journal.read_header(fd, path)
    os.close(fd)
    assert header.state == journal.PENDING and header.seq == 4
    assert snapshot(path) == expected(3)  # the commit is there for every reader
    report = check_store(path)
    assert report.ok and report.pending
    # readers never wrote: the file's bytes in place are still those of the state before
    fd = os.open(path, os.O_RDONLY)
    with h5py.File(lock.fd_path(fd, path), "r", locking=False) as fh:
        assert int(fh.attrs["rows"]) == 8
    os.close(fd)
    with StoreWriter(path) as w:  # recovery applies it in place
        assert len(w.images()) == 12
    fd = os.open(path, os.O_RDONLY)
    assert journal.read_header(fd, path).state == journal.CLEAN
    os.close(fd)
    assert snapshot(path) == expected(3)


# ---------------------------------------------------------------------------------------------
# locks across processes, by file identity


_HOLD = """
import sys, time
from imgdb.store import StoreWriter, open_read
import numpy as np
mode, path, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
if mode == "writer":
    w = StoreWriter(path)
    print("ready", flush=True)
    time.sleep(seconds)
    w.close()
elif mode == "commit":  # hold the commit lock: a slow transaction
    w = StoreWriter(path)
    with w.transaction() as fh:
        print("ready", flush=True)
        time.sleep(seconds)
        fh.attrs["marker"] = 7
    w.close()
else:  # a slow read
    with open_read(path) as view:
        print("ready", flush=True)
        time.sleep(seconds)
"""


def _hold(mode: str, path: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, mode, str(path), str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def test_a_reader_waits_for_a_commit_and_sees_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "w.h5"
    fill(path, 1)
    child = _hold("commit", path, 1.5)
    t = time.monotonic()
    with open_read(path) as view:
        waited = time.monotonic() - t
        assert int(view.attrs.get("marker", 0)) == 7  # the commit it waited for, whole
    child.wait()
    assert child.returncode == 0
    assert waited > 0.8


def test_a_commit_waits_for_a_read(tmp_path: Path) -> None:
    path = tmp_path / "r.h5"
    fill(path, 1)
    with new_store(tmp_path / "other.h5"):
        pass
    child = _hold("reader", path, 1.5)
    t = time.monotonic()
    w = StoreWriter(path)  # a writer may start while a read runs ...
    started = time.monotonic() - t
    w.commit("ext", rows_for(1), vectors_for(1))  # ... but its commit waits for the read
    waited = time.monotonic() - t
    w.close()
    child.wait()
    assert child.returncode == 0 and started < 0.7 and waited > 0.8
    assert snapshot(path) == expected(2)


@pytest.mark.parametrize("alias", ["symlink", "hardlink", "relative", "dotdot"])
def test_one_writer_per_file_whatever_the_name(tmp_path: Path, monkeypatch, alias: str) -> None:
    path = tmp_path / "real.h5"
    fill(path, 1)
    sub = tmp_path / "sub"
    sub.mkdir()
    if alias == "symlink":
        other = tmp_path / "link.h5"
        other.symlink_to(path)
    elif alias == "hardlink":
        other = sub / "hard.h5"
        os.link(path, other)
    elif alias == "relative":
        monkeypatch.chdir(tmp_path)
        other = Path("real.h5")
    else:
        other = sub / ".." / "real.h5"
    child = _hold("writer", other, 30)
    try:
        with pytest.raises(StoreError, match=f"locked by PID {child.pid} "):
            StoreWriter(path)
        with pytest.raises(StoreError, match=f"locked by PID {child.pid} "):
            StoreWriter(other)
        assert snapshot(other) == expected(1)  # readers are not refused
    finally:
        child.kill()
        child.wait()
    with StoreWriter(path) as w:  # the lock went with the killed process
        w.commit("ext", rows_for(1), vectors_for(1))
    assert snapshot(other) == expected(2)


_STRESS = """
import os, sys, time
import numpy as np
from imgdb.errors import StoreError
from imgdb.store import ImageRow, RowUpdate, StoreWriter
path, tag, commits = sys.argv[1], sys.argv[2], int(sys.argv[3])
done, refused = 0, 0
while done < commits:
    try:
        w = StoreWriter(path)
    except StoreError as exc:
        assert "locked by PID" in str(exc), exc
        refused += 1
        time.sleep(0.002)
        continue
    with w:
        for _ in range(3):
            if done == commits:
                break
            rows = [RowUpdate(None, ImageRow(f"/{tag}/{done}/{i}", done, 1.0, "x" * 32, 1, 1, 0))
                    for i in range(2)]
            w.commit("ext", rows, {("head", "sum"): np.full((2, 6), done, np.float32),
                                   ("head", "mac"): np.full((2, 3), done, np.float32)})
            done += 1
print(refused)
"""


@pytest.mark.parametrize("alias", ["symlink", "hardlink"])
def test_two_processes_many_commits_through_two_names(tmp_path: Path, alias: str) -> None:
    path = tmp_path / "s.h5"
    fill(path, 0)
    other = tmp_path / "alias.h5"
    other.symlink_to(path) if alias == "symlink" else os.link(path, other)
    n = 60
    env = dict(os.environ, PYTHONPATH=str(ROOT), IMGDB_SYNC="off")
    procs = [subprocess.Popen([sys.executable, "-c", _STRESS, str(p), tag, str(n)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for p, tag in ((path, "a"), (other, "b"))]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert sum(int(out.split()[-1]) for out, _ in outs) > 0  # they did collide
    assert check_store(path).ok
    with open_read(other) as view:
        paths = view.paths()
        sums = view.vectors(view.descriptor("sum"))[:, 0]
    for tag in "ab":
        mine = [p for p in paths if p.startswith(f"/{tag}/")]
        assert sorted(mine) == sorted(f"/{tag}/{d}/{i}" for d in range(n) for i in range(2))
    assert all(float(s) == int(p.split("/")[2]) for p, s in zip(paths, sums))


# ---------------------------------------------------------------------------------------------
# check and repair


def flip_in_dataset(path: Path, dataset: str, row: int, nbytes: int = 3) -> None:
    """Flip bytes inside the stored chunk holding `row` of `dataset` (found with HDF5's own
    chunk index), the way a bad disk sector would."""
    fd = os.open(path, os.O_RDONLY)
    with h5py.File(lock.fd_path(fd, path), "r", locking=False) as fh:
        ds = fh[dataset]
        offset = ds.id.get_chunk_info_by_coord((row // ds.chunks[0] * ds.chunks[0],)
                                               + (0,) * (ds.ndim - 1))
        start, size = offset.byte_offset, offset.size
        within = (row % ds.chunks[0]) * ds.dtype.itemsize * int(np.prod(ds.shape[1:]))
    os.close(fd)
    with open(path, "r+b") as f:
        for k in range(nbytes):
            at = start + min(size - 5, within + k)
            f.seek(at)
            b = f.read(1)
            f.seek(at)
            f.write(bytes([b[0] ^ 0x40]))


def test_check_names_a_damaged_vector_and_repair_recomputes_only_it(tmp_path: Path) -> None:
    path = tmp_path / "v.h5"
    fill(path, 3)
    assert check_store(path).ok
    flip_in_dataset(path, "descriptors/ext/head/sum", row=5)
    report = check_store(path)
    assert not report.ok
    lines = [p.line() for p in report.problems]
    assert lines == ["/descriptors/ext/head/sum: fails its checksum (rows 0-11)"], lines
    with open_read(path) as view:
        with pytest.raises(StoreDamaged, match="descriptor ext/head/sum cannot be read "
                                               r"\(checksum mismatch\).*imgdb repair"):
            view.vectors(view.descriptor("sum"))
        assert view.vectors(view.descriptor("mac")).shape == (12, 3)  # the rest reads fine
    rep = repair_store(path)
    assert rep.pending_rows == {"ext": 12} and rep.lost_rows == 0 and Path(rep.backup).exists()
    assert check_store(path).ok
    got = snapshot(path)
    want = expected(3)
    assert got["paths"] == want["paths"] and got["ext/head/mac"] == want["ext/head/mac"]
    assert got["state"] == [0] * 12  # to be computed again by the next ingest
    assert not check_store(Path(rep.backup)).ok  # the damaged original is kept as it was


@pytest.mark.parametrize("mode", [0o600, 0o640])
def test_repair_through_a_symlink_mends_the_store_it_names_and_keeps_its_mode(
        tmp_path: Path, mode: int) -> None:
    real = tmp_path / "data" / "v.h5"
    real.parent.mkdir()
    fill(real, 3)
    real.chmod(mode)
    flip_in_dataset(real, "descriptors/ext/head/sum", row=5)
    link = tmp_path / "link.h5"
    link.symlink_to(real)
    rep = repair_store(link)
    assert link.is_symlink() and os.readlink(link) == str(real)  # still the same link
    assert check_store(real).ok and check_store(link).ok  # the store it names is mended
    backup = Path(rep.backup)
    assert backup.parent == real.parent and not backup.is_symlink()
    assert not check_store(backup).ok  # the damaged file, kept as it was
    for path in (real, backup):
        assert stat.S_IMODE(path.stat().st_mode) == mode, oct(path.stat().st_mode)


def test_repair_keeps_rows_whose_facts_are_damaged_as_changed(tmp_path: Path) -> None:
    path = tmp_path / "i.h5"
    fill(path, 2)
    flip_in_dataset(path, "images/size", row=1)
    report = check_store(path)
    assert [p.where for p in report.problems] == ["/images/size"]
    with pytest.raises(StoreDamaged, match="/images/size cannot be read"):
        snapshot(path)
    rep = repair_store(path)
    assert rep.lost_rows == 0 and rep.stale_rows == 8  # one chunk holds all 8 rows
    with open_read(path) as view:
        table = view.images()
        assert table.path == expected(2)["paths"]
        assert table.size.tolist() == [-1] * 8  # never equal to a file's size: 'changed'
        assert (view.state("ext") == 0).all()


def test_repair_turns_rows_with_a_damaged_path_into_tombstones(tmp_path: Path) -> None:
    path = tmp_path / "p.h5"
    fill(path, 2)
    flip_in_dataset(path, "images/path_data", row=3)
    assert "/images/path_data" in [p.where for p in check_store(path).problems]
    rep = repair_store(path)
    assert rep.lost_rows == 8
    with open_read(path) as view:
        table = view.images()
    assert table.path == [""] * 8 and (table.status == 3).all()  # ids stay dense
    with new_store(tmp_path / "x.h5"):
        pass
    assert check_store(path).ok


def test_damaged_model_array_is_named_and_dropped_by_repair(tmp_path: Path) -> None:
    path = tmp_path / "m.h5"
    fill(path, 1)
    with StoreWriter(path) as w:
        model = w.save_model("pca", "ext/head/sum", {"mean": np.arange(4000, dtype=np.float64)},
                             {"dims": 3, "whiten": 1})
    with open_read(path) as view:
        m = view.model("pca", "ext/head/sum", "v1")
        assert view.model_arrays(m)["mean"][3999] == 3999
        assert m.attrs["dims"] == 3 and m.id == model.id
    flip_in_dataset(path, "models/pca/ext/head/sum/v1/mean", row=100)
    assert [p.where for p in check_store(path).problems] == ["/models/pca/ext/head/sum/v1/mean"]
    with open_read(path) as view:
        with pytest.raises(StoreDamaged, match="model pca/ext/head/sum/v1 cannot be read"):
            view.model_arrays(view.model("pca", "ext/head/sum", "v1"))
    rep = repair_store(path)
    assert rep.models == 0 and any("pca/ext/head/sum/v1" in d for d in rep.dropped)
    with StoreWriter(path) as w:  # numbers are never reused
        assert w.save_model("pca", "ext/head/sum", {"mean": np.zeros(2)}, {}).version == "v2"


def test_damaged_header_and_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "h.h5"
    fill(path, 2)
    data = bytearray(path.read_bytes())
    data[40:80] = b"\xff" * 40
    data[journal.SLOT_SIZE + 40:journal.SLOT_SIZE + 80] = b"\xff" * 40
    path.write_bytes(data)
    with pytest.raises(StoreDamaged, match="header of store .* is damaged; run: imgdb repair"):
        open_read(path).__enter__()
    assert [p.where for p in check_store(path).problems] == ["header"]
    rep = repair_store(path)
    assert rep.rows == 8 and check_store(path).ok and snapshot(path) == expected(2)
    path.write_bytes(path.read_bytes()[:-3000])
    report = check_store(path)
    assert not report.ok and report.problems[0].where == "file"
    with pytest.raises(StoreDamaged):
        snapshot(path)


def test_repair_twice_in_one_second_keeps_both_backups(tmp_path: Path) -> None:
    path = tmp_path / "b.h5"
    fill(path, 1)
    first = repair_store(path)
    second = repair_store(path)
    assert first.backup != second.backup
    assert Path(first.backup).exists() and Path(second.backup).exists()
    assert snapshot(Path(first.backup)) == expected(1) == snapshot(path)


def _format1_store(path: Path) -> None:
    """A store as imgdb 0.1 wrote it (vlen UTF-8 text, `computed`, libver earliest, no
    checksums), with a torn last commit (datasets longer than /images/path) and a model."""
    s = h5py.string_dtype("utf-8")
    with h5py.File(path, "w", libver="earliest") as fh:
        fh.attrs["format"] = "imgdb-store"
        fh.attrs["format_version"] = 1
        fh.attrs["created"] = "2026-01-01T00:00:00+00:00"
        g = fh.create_group("images")
        n = 8
        cols = {"size": np.arange(n) * 1000, "mtime": np.full(n, 1.5e9),
                "sha": np.array([f"{i:032x}".encode() for i in range(n)], "S32"),
                "width": np.full(n, 40), "height": np.full(n, 30), "status": np.zeros(n, "i1")}
        for name, values in cols.items():
            g.create_dataset(name, data=np.concatenate([values, values[:2]]), maxshape=(None,),
                             chunks=(4096,))
        g.create_dataset("error", data=np.array([""] * n, dtype=object), dtype=s,
                         maxshape=(None,), chunks=(4096,))
        g.create_dataset("path", data=np.array([f"/photos/é{i}.jpg" for i in range(n)],
                                               dtype=object), dtype=s, maxshape=(None,),
                         chunks=(4096,))
        for top in ("local", "indexes"):
            fh.create_group(top)
        e = fh.create_group("descriptors").create_group("ext")
        e.attrs["settings"] = json.dumps({"layers": ["head"], "poolings": ["sum"]})
        e.attrs["revision"] = 3
        e.create_dataset("computed", data=np.ones(n + 2, np.uint8), maxshape=(None,),
                         chunks=(4096,))
        e.create_group("head").create_dataset("sum", data=np.arange((n + 2) * 4, dtype="f4")
                                              .reshape(n + 2, 4), maxshape=(None, 4),
                         chunks=(16, 4))
        m = fh.create_group("models/pca/ext/head/sum/v1")
        m.create_dataset("mean", data=np.arange(4.0))
        for key, value in {"dims": 2, "fitted_on": "/data/x.h5", "kind": "pca",
                           "descriptor": "ext/head/sum", "version": "v1",
                           "created": "2026-01-02T00:00:00+00:00", "complete": 1}.items():
            m.attrs[key] = value
        fh["models/pca/ext/head/sum"].attrs["next_version"] = 2
        half = fh.create_group("models/pca/ext/head/sum/v2")  # an interrupted fit
        half.create_dataset("mean", data=np.arange(2.0))
        # an Annoy index registered by imgdb 0.1
        from annoy import AnnoyIndex

        from imgdb.digest import file_digest

        ann = AnnoyIndex(4, "angular")
        for i in range(n):
            ann.add_item(i, [float(i + 1), 1.0, 0.5, 0.25])
        ann.build(2)
        index_file = path.with_name(f"{path.name}.ext.head.sum.raw.ann")
        ann.save(str(index_file))
        ann.unload()
        r = fh["indexes"].create_group("ext.head.sum.raw")
        r.create_dataset("rows", data=np.arange(n, dtype=np.int64))
        for key, value in {"file": index_file.name, "descriptor": "ext/head/sum",
                           "model": "none", "dims": 4, "metric": "angular", "trees": 2,
                           "seed": 0, "items": n, "extractor_revision": 3,
                           "file_bytes": index_file.stat().st_size,
                           "file_mtime": index_file.stat().st_mtime,
                           "file_hash": file_digest(index_file), "build_seconds": 0.1,
                           "created": "2026-01-02T00:00:00+00:00"}.items():
            r.attrs[key] = value


def test_format_1_is_refused_with_the_upgrade_command_and_repair_upgrades(tmp_path: Path) -> None:
    path = tmp_path / "old.h5"
    _format1_store(path)
    with pytest.raises(StoreError, match=r"older imgdb \(format 1\); upgrade it once with: "
                                         r"imgdb repair --db"):
        open_read(path).__enter__()
    with pytest.raises(StoreError, match="format 1"):
        StoreWriter(path)
    rep = repair_store(path)
    assert rep.upgraded and rep.rows == 8 and rep.lost_rows == 0 and rep.models == 1
    assert rep.indexes == 1 and rep.dropped == []
    assert check_store(path).ok
    with open_read(path) as view:
        assert view.paths() == [f"/photos/é{i}.jpg" for i in range(8)]
        assert view.vectors(view.descriptor("sum")).tolist() == \
            np.arange(32, dtype="f4").reshape(8, 4).tolist()
        assert (view.state("ext") == 1).all() and view.revision("ext") == 3
        m = view.model("pca", "ext/head/sum", None)
        assert m.version == "v1" and m.attrs["dims"] == 2 and m.attrs["fitted_on"] == "/data/x.h5"
        assert view.model_arrays(m)["mean"].tolist() == [0, 1, 2, 3]
        assert [e.name for e in view.indexes()] == ["ext.head.sum.raw"]
        assert view.index_rows("ext.head.sum.raw").tolist() == list(range(8))
    from imgdb.retrieval.index import check_index

    with open_read(path) as view:  # the extractor's revision is kept: the index is current
        status = check_index(view, path, "ext.head.sum.raw", verify=True, full=True)
    assert status.problem is None
    with StoreWriter(path) as w:
        w.commit("ext", [RowUpdate(None, ImageRow("/photos/new.jpg", 1, 1.0, "y" * 32, 1, 1, 0))],
                 {("head", "sum"): np.ones((1, 4), np.float32)})
        assert w.save_model("pca", "ext/head/sum", {"mean": np.zeros(1)}, {}).version == "v2"
    assert snapshot(path)["rows"] == 9


@pytest.mark.parametrize("limit_room", [0, 600_000, 700_000, 2_000_000, None])
def test_a_journal_is_never_placed_inside_its_commits_own_data(limit_room) -> None:
    """The case a file-size limit found: the previous journal ends below this commit's data end,
    and only a spot right after that journal fits the limit. That spot lies inside the new data
    (applying the commit would overwrite its own journal), so it must never be chosen."""
    import resource

    prev = journal.JournalRef(offset=679_936, length=15_968, crc=0)
    data_end, length = 865_297, 685_846
    limit = resource.RLIM_INFINITY if limit_room is None else data_end + limit_room
    at = journal._place(data_end, journal.MIN_GAP, length, prev, limit)
    assert at >= data_end and not journal._overlaps(at, at + length, prev)
    if limit_room is None or limit_room >= journal.MIN_GAP + length + 8192:
        assert at >= data_end + journal.MIN_GAP  # room for the next commits' direct writes
