"""`imgdb check` and `imgdb repair`: find damage in a store, and rebuild a clean one.

`check` verifies the commit header, that HDF5 can read every object, every chunk of every
dataset against its fletcher32 checksum, the structure (row counts, ragged spans, local
segments, states), the model and index registries, and each registered index file against
its digest. `repair` copies every intact committed row, model and index registration into a
fresh store (rows whose vectors are damaged become pending, so a rerun of ingest recomputes
them; rows whose file facts are lost are kept as `lost` tombstones so ids stay dense), reclaims
dead space, swaps it in atomically and keeps the old file as a backup. It also upgrades stores
of the first format (imgdb 0.1).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from ..errors import StoreError, UserError
from . import journal, lock
from .indexfiles import index_files, verify_file
from .reader import check_exists, plain
from .schema import (EXTRACTOR_FIELDS, FORMAT, FORMAT_VERSION, IMAGE_COLUMNS, IMAGE_TEXT,
                     STATE_COMPUTED, STATE_FAILED_TRANSIENT, STATE_PENDING, STATUS_LOST,
                     STATUS_OK, USERBLOCK, attr_text, create_array, create_extractor,
                     create_layout, create_local, create_vectors, encode_path, now_iso,
                     set_attr)

BLOCK_BYTES = 64 << 20  # read this much per HDF5 call while scanning


@dataclass
class Problem:
    """One piece of damage: where, what, and which rows (when row-aligned)."""

    where: str
    what: str
    rows: list[tuple[int, int]] = field(default_factory=list)  # inclusive ranges

    def line(self) -> str:
        rows = ""
        if self.rows:
            shown = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in self.rows[:8])
            rows = f" (rows {shown}{' ...' if len(self.rows) > 8 else ''})"
        return f"{self.where}: {self.what}{rows}"


@dataclass
class CheckReport:
    store: str
    format_version: int = 0
    rows: int = 0
    datasets: int = 0
    bytes_read: int = 0
    indexes: int = 0
    seconds: float = 0.0
    pending: bool = False  # an interrupted commit that the next writer finishes (not damage)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"store": self.store, "ok": self.ok, "format_version": self.format_version,
                "rows": self.rows, "datasets_checked": self.datasets,
                "bytes_read": self.bytes_read, "indexes_checked": self.indexes,
                "seconds": round(self.seconds, 3), "pending_commit": self.pending,
                "problems": [{"where": p.where, "what": p.what,
                              "rows": [list(r) for r in p.rows]} for p in self.problems]}


# ---------------------------------------------------------------------------------------------
# scanning datasets


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _ranges(bad: np.ndarray) -> list[tuple[int, int]]:
    """Inclusive ranges of the True positions."""
    idx = np.flatnonzero(bad)
    if not len(idx):
        return []
    breaks = np.flatnonzero(np.diff(idx) > 1)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]])
    return [(int(a), int(b)) for a, b in zip(starts, ends)]


def scan(ds: h5py.Dataset, length: int | None = None) -> tuple[np.ndarray | None, np.ndarray]:
    """Read a dataset's first `length` rows chunk-block by chunk-block.

    Returns (data with damaged rows zeroed, or None when nothing could be read; bool mask of
    damaged rows). A block that fails its checksum is re-read chunk by chunk to find the bad
    chunks."""
    n = ds.shape[0] if length is None else length
    have = min(n, ds.shape[0])  # rows past the dataset's end (a damaged shape) count as bad
    bad = np.zeros(n, bool)
    bad[have:] = True
    if ds.chunks is None:
        try:
            out = np.zeros((n,) + ds.shape[1:], dtype=ds.dtype)
            out[:have] = ds[:have]
            return out, bad
        except Exception:
            bad[:] = True
            return None, bad
    out = np.zeros((n,) + ds.shape[1:], dtype=ds.dtype)
    chunk_rows = ds.chunks[0]
    row_bytes = max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64)))
    block = max(chunk_rows, (BLOCK_BYTES // row_bytes) // chunk_rows * chunk_rows)
    for start in range(0, have, block):
        stop = min(have, start + block)
        try:
            out[start:stop] = ds[start:stop]
            continue
        except Exception:
            pass
        for a in range(start, stop, chunk_rows):
            b = min(stop, a + chunk_rows)
            try:
                out[a:b] = ds[a:b]
            except Exception:
                bad[a:b] = True
    return out, bad


def _scan_ragged(group: h5py.Group, name: str, n: int, report: CheckReport | None
                 ) -> tuple[list[bytes | None], np.ndarray]:
    """A text column's bytes per row (None where damaged) and the damaged-row mask."""
    start, bad_s = scan(group[f"{name}_start"], n)
    length, bad_l = scan(group[f"{name}_len"], n)
    data_ds = group[f"{name}_data"]
    data, bad_d = scan(data_ds)
    bad = bad_s | bad_l
    out: list[bytes | None] = [None] * n
    if start is None or length is None:
        return out, np.ones(n, bool)
    end = start + length
    outside = (start < 0) | (length < 0) | (end > data_ds.shape[0])
    if outside.any() and report is not None:
        report.problems.append(Problem(group.name + f"/{name}", "spans point outside the data",
                                       _ranges(outside)))
    bad |= outside
    for i in range(n):
        if bad[i]:
            continue
        s, e = int(start[i]), int(end[i])
        if data is None or bad_d[s:e].any():
            bad[i] = True
            continue
        out[i] = data[s:e].tobytes()
    return out, bad


# ---------------------------------------------------------------------------------------------
# check


def check_store(db: str | Path, verify_indexes: bool = True) -> CheckReport:
    """Verify everything a store holds; damage is reported, never raised."""
    db = Path(db)
    check_exists(db)
    started = time.perf_counter()
    report = CheckReport(str(db))
    with lock.shared(db) as fd:
        try:
            header = journal.read_header(fd, db)
        except UserError as exc:
            report.problems.append(Problem("header", str(exc)))
            report.seconds = time.perf_counter() - started
            return report
        view, size = None, header.committed
        try:
            p = journal.plan(db, fd, header)
            view, size = journal.view_of(fd, p), p.size
        except UserError as exc:
            report.problems.append(Problem("journal", str(exc)))
        report.pending = header.state == journal.PENDING
        file_size = os.fstat(fd).st_size
        if view is None and file_size < size:
            report.problems.append(Problem("file", f"the file is shorter ({file_size} bytes) "
                                                   f"than its last commit ({size} bytes): "
                                                   f"truncated"))
        try:
            fh = h5py.File(view, "r") if view is not None else \
                h5py.File(lock.fd_path(fd, db), "r", locking=False)
        except Exception as exc:
            report.problems.append(Problem("HDF5", f"the file cannot be opened: "
                                                   f"{_first_line(exc)}"))
            report.seconds = time.perf_counter() - started
            return report
        try:
            _check_file(fh, db, report, verify_indexes)
        finally:
            fh.close()
    report.seconds = time.perf_counter() - started
    return report


def _check_file(fh: h5py.File, db: Path, report: CheckReport, verify_indexes: bool) -> None:
    try:
        if plain(fh.attrs.get("format", b"")) != FORMAT:
            report.problems.append(Problem("/", "not an imgdb store"))
            return
        report.format_version = int(fh.attrs.get("format_version", 0))
        n = report.rows = int(fh.attrs["rows"])
    except Exception as exc:
        report.problems.append(Problem("/", f"root attributes unreadable: {_first_line(exc)}"))
        return
    objects: list[tuple[str, object]] = []
    try:
        fh.visititems(lambda name, obj: objects.append((name, obj)))
    except Exception as exc:
        report.problems.append(Problem("/", f"the object tree cannot be walked: "
                                            f"{_first_line(exc)}"))
    aligned = set()
    try:
        from .schema import aligned_datasets

        aligned = {ds.name for ds in aligned_datasets(fh)}
    except Exception as exc:
        report.problems.append(Problem("/", f"the layout is incomplete: {_first_line(exc)}"))
    for name, obj in objects:
        if not isinstance(obj, h5py.Dataset):
            try:
                dict(obj.attrs)
            except Exception as exc:
                report.problems.append(Problem("/" + name, f"attributes unreadable: "
                                                           f"{_first_line(exc)}"))
            continue
        report.datasets += 1
        ds = obj
        if ds.name in aligned and ds.shape[0] != n:
            report.problems.append(Problem(ds.name, f"has {ds.shape[0]} rows, the store {n}"))
        try:
            _, bad = scan(ds)
        except Exception as exc:
            report.problems.append(Problem(ds.name, f"unreadable: {_first_line(exc)}"))
            continue
        report.bytes_read += int(ds.size * ds.dtype.itemsize)
        if bad.any():
            what = "fails its checksum" if ds.fletcher32 else "cannot be read"
            rows = _ranges(bad) if ds.name in aligned else []
            if ds.name not in aligned and ds.ndim:
                rows = []
                what += f" ({int(bad.sum())} of {len(bad)} entries)"
            report.problems.append(Problem(ds.name, what, rows))
    _check_structure(fh, n, report)
    if verify_indexes:
        _check_indexes(fh, db, report)


def _check_structure(fh: h5py.File, n: int, report: CheckReport) -> None:
    try:
        for name in IMAGE_TEXT:
            _scan_ragged(fh["images"], name, n, report)
        for ext in sorted(fh["descriptors"].keys()):
            g = fh["descriptors"][ext]
            json.loads(g.attrs["settings"])
            state, _ = scan(g["state"], n)
            if state is not None and ((state < 0) | (state > STATE_FAILED_TRANSIENT)).any():
                report.problems.append(Problem(g.name + "/state", "holds unknown values",
                                               _ranges((state < 0) | (state > 3))))
            _scan_ragged(g, "error", n, report)
        for ext in sorted(fh["local"].keys()):
            for key in sorted(fh["local"][ext].keys()):
                lg = fh["local"][ext][key]
                start, _ = scan(lg["start"], n)
                count, _ = scan(lg["count"], n)
                if start is None or count is None:
                    continue
                total = lg["features"].shape[0]
                outside = (start >= 0) & ((start + count > total) | (count < 0))
                if outside.any():
                    report.problems.append(Problem(lg.name, "segments point outside the "
                                                            "features", _ranges(outside)))
                if lg["coords"].shape[0] != total:
                    report.problems.append(Problem(lg.name, "features and coords differ in "
                                                            "length"))
    except Exception as exc:
        report.problems.append(Problem("/", f"the layout is damaged: {_first_line(exc)}"))


def _check_indexes(fh: h5py.File, db: Path, report: CheckReport) -> None:

    if "indexes" not in fh:
        return
    for name in sorted(fh["indexes"].keys()):
        g = fh["indexes"][name]
        try:
            attrs = {k: plain(v) for k, v in g.attrs.items()}
            rows = g["rows"][()]
        except Exception as exc:
            report.problems.append(Problem(f"index {name}", f"registry entry unreadable: "
                                                            f"{_first_line(exc)}"))
            continue
        report.indexes += 1
        if len(rows) != int(attrs.get("items", -1)):
            report.problems.append(Problem(f"index {name}", "registry rows do not match its "
                                                            "item count"))
        try:
            files = index_files(attrs)  # every shard of a sharded index
        except (KeyError, ValueError, TypeError) as exc:
            report.problems.append(Problem(f"index {name}", f"registry entry incomplete: "
                                                            f"{_first_line(exc)}"))
            continue
        for f in files:
            path = db.with_name(f.file)
            if not path.exists():
                continue  # missing: stale, not damaged (index ls says so)
            problem = verify_file(path, f.bytes, f.hash, full=True)
            if problem:
                report.problems.append(Problem(f"index {name}", problem + "; rebuild it (imgdb "
                                                                          "index ls shows how)"))
                break


# ---------------------------------------------------------------------------------------------
# repair


@dataclass
class RepairReport:
    store: str
    backup: str
    rows: int = 0
    lost_rows: int = 0
    stale_rows: int = 0  # path intact, other facts damaged: recomputed by the next ingest
    pending_rows: dict[str, int] = field(default_factory=dict)  # extractor -> rows to recompute
    dropped: list[str] = field(default_factory=list)  # what could not be kept
    models: int = 0
    indexes: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    upgraded: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__, seconds=round(self.seconds, 3))


class _Source:
    """A store being salvaged: its HDF5 file and format (1: imgdb 0.1, 2: now)."""

    def __init__(self, fh: h5py.File, version: int) -> None:
        self.fh, self.version = fh, version
        if version == 1:
            self.rows = int(fh["images/path"].shape[0])
            return
        try:
            self.rows = int(fh.attrs["rows"])
        except Exception:  # the root attributes are damaged: the image table's length
            self.rows = min(int(fh["images"][name].shape[0]) for name in IMAGE_COLUMNS
                            if name in fh["images"])


def _legacy_text(ds: h5py.Dataset, n: int) -> tuple[list[bytes | None], np.ndarray]:
    values, bad = scan(ds, n)
    out: list[bytes | None] = [None] * n
    if values is None:
        return out, np.ones(n, bool)
    for i in range(n):
        if not bad[i]:
            v = values[i]
            out[i] = v if isinstance(v, bytes) else str(v).encode("utf-8", "surrogateescape")
    return out, bad


def _read_images(src: _Source) -> tuple[dict[str, np.ndarray], list[bytes | None],
                                        list[bytes | None], np.ndarray, np.ndarray]:
    """(columns, path bytes, error bytes, lost rows, stale rows) of the source's image table.

    A row whose path is damaged is lost (kept as a tombstone: ids stay dense); a row whose path
    is intact but whose other facts are damaged is stale: kept, with its file facts reset so
    that the next ingest sees the file as changed and recomputes it in place."""
    g = src.fh["images"]
    n = src.rows
    stale = np.zeros(n, bool)
    cols = {}
    for name, (dtype, fill) in IMAGE_COLUMNS.items():
        if name not in g:  # `failure` is new in format 2
            cols[name] = np.full(n, fill, dtype=dtype)
            continue
        values, bad = scan(g[name], n)
        stale |= bad
        cols[name] = values.astype(dtype) if values is not None else np.full(n, fill, dtype)
    if src.version == 1:
        paths, bad_p = _legacy_text(g["path"], n)
        errors, bad_e = _legacy_text(g["error"], n)
    else:
        paths, bad_p = _scan_ragged(g, "path", n, None)
        errors, bad_e = _scan_ragged(g, "error", n, None)
    lost = bad_p.copy()
    stale &= ~lost
    errors = [e if not b else b"" for e, b in zip(errors, bad_e)]
    if stale.any():  # facts unknown: 'changed' for the next ingest (size -1 never matches)
        cols["size"] = np.where(stale, -1, cols["size"])
        cols["mtime"] = np.where(stale, 0.0, cols["mtime"])
        cols["sha"] = np.where(stale, b"", cols["sha"]).astype("S32")
        cols["status"] = np.where(stale, STATUS_OK, cols["status"]).astype(np.int8)
        cols["failure"] = np.where(stale, 0, cols["failure"]).astype(np.int8)
    return cols, paths, errors, lost, stale


def _write_text(group: h5py.Group, name: str, values: list[bytes]) -> None:
    lengths = np.array([len(v) for v in values], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(values) \
        else np.zeros(0, np.int64)
    blob = np.frombuffer(b"".join(values), np.uint8)
    for suffix, data in (("data", blob), ("start", np.where(lengths > 0, starts, 0)),
                         ("len", lengths.astype(np.int32))):
        ds = group[f"{name}_{suffix}"]
        ds.resize(len(data), axis=0)
        if len(data):
            ds[:] = data


def _copy_extractor(src: _Source, ext: str, out: h5py.File, lost: np.ndarray,
                    report: RepairReport) -> None:
    n = src.rows
    g = src.fh["descriptors"][ext]
    try:
        settings = json.loads(g.attrs["settings"])
        revision = int(g.attrs.get("revision", 0))
        created = attr_text(g.attrs.get("created", now_iso()))
    except Exception as exc:
        report.dropped.append(f"extractor {ext} (settings unreadable: {_first_line(exc)})")
        return
    if src.version == 1:
        computed, bad = scan(g["computed"], n)
        state = np.where(computed.astype(bool), STATE_COMPUTED, STATE_PENDING).astype(np.int8) \
            if computed is not None else np.zeros(n, np.int8)
        errors = [b""] * n
    else:
        state, bad = scan(g["state"], n)
        state = state.astype(np.int8) if state is not None else np.zeros(n, np.int8)
        errors, bad_e = _scan_ragged(g, "error", n, None)
        errors = [e if not b else b"" for e, b in zip(errors, bad_e)]
    redo = bad.copy()  # rows whose vectors must be computed again
    og = create_extractor(out, ext, settings, n)
    set_attr(og, "created", created)
    for layer in sorted(k for k in g.keys() if k not in EXTRACTOR_FIELDS + ("computed",)):
        if not isinstance(g[layer], h5py.Group):
            continue
        for pooling in sorted(g[layer].keys()):
            ds = g[layer][pooling]
            data, bad_v = scan(ds, n)
            if data is None:
                data = np.full((n,) + ds.shape[1:], np.nan, np.float32)
            redo |= bad_v
            target = create_vectors(og.require_group(layer), pooling, n, ds.shape[1],
                                    str(ds.dtype))
            if n:
                target[:] = data[:n]
    if src.fh.get("local") is not None and ext in src.fh["local"]:
        for key in sorted(src.fh["local"][ext].keys()):
            redo |= _copy_local(src.fh["local"][ext][key], out, ext, key, n, state)
    redo &= state == STATE_COMPUTED
    redo |= bad & ~lost  # an unreadable state: computed again
    state[redo | lost] = STATE_PENDING
    og["state"][:] = state
    _write_text(og, "error", errors)
    # indexes and graphs built on this extractor stay current only if no row changed
    og.attrs["revision"] = revision + (1 if (redo | lost).any() else 0)
    if redo.any():
        report.pending_rows[ext] = int(redo.sum())


def _copy_local(lg: h5py.Group, out: h5py.File, ext: str, key: str, n: int,
                state: np.ndarray) -> np.ndarray:
    """Copy the live segments (compacted); returns rows whose segment is damaged."""
    start, bad_s = scan(lg["start"], n)
    count, bad_c = scan(lg["count"], n)
    grid, bad_g = scan(lg["grid"], n)
    channels = int(lg["features"].shape[1])
    target = create_local(out, ext, key, channels, n)
    bad = bad_s | bad_c | bad_g
    if start is None or count is None:
        return np.ones(n, bool)
    total = lg["features"].shape[0]
    keep = (start >= 0) & ~bad & (state == STATE_COMPUTED) & (start + count <= total)
    new_start = np.full(n, -1, np.int64)
    new_count = np.zeros(n, np.int32)
    pos = 0
    pieces_f, pieces_c = [], []
    for r in np.flatnonzero(keep):
        a, c = int(start[r]), int(count[r])
        try:
            f = lg["features"][a:a + c]
            xy = lg["coords"][a:a + c]
        except Exception:
            bad[r] = True
            continue
        pieces_f.append(f)
        pieces_c.append(xy)
        new_start[r], new_count[r] = pos, c
        pos += c
    if pieces_f:
        target["features"].resize(pos, axis=0)
        target["features"][:] = np.concatenate(pieces_f)
        target["coords"].resize(pos, axis=0)
        target["coords"][:] = np.concatenate(pieces_c)
    target["start"][:] = new_start
    target["count"][:] = new_count
    if grid is not None:
        target["grid"][:] = grid
    return bad & (state == STATE_COMPUTED)


def _copy_models(src: _Source, out: h5py.File, report: RepairReport) -> None:
    if "models" not in src.fh:
        return
    groups: list[tuple[str, h5py.Group]] = []
    try:
        src.fh["models"].visititems(lambda name, obj: groups.append((name, obj))
                                    if isinstance(obj, h5py.Group) else None)
    except Exception as exc:
        report.dropped.append(f"part of the model registry ({_first_line(exc)})")
    for name, g in groups:
        try:
            attrs = dict(g.attrs)
        except Exception as exc:
            report.dropped.append(f"models/{name} ({_first_line(exc)})")
            continue
        if "version" not in attrs and "kind" not in attrs:
            if "next_version" in attrs:  # a descriptor's or kind's group: keep the counter
                out.require_group(f"models/{name}").attrs["next_version"] = attrs["next_version"]
            continue
        if src.version == 1 and int(attrs.get("complete", 0)) != 1:
            continue
        try:
            arrays = {k: g[k][()] for k in g.keys() if isinstance(g[k], h5py.Dataset)}
        except Exception as exc:
            report.dropped.append(f"model {name} (arrays damaged: {_first_line(exc)})")
            continue
        mg = out.require_group(f"models/{name}")
        for k, v in arrays.items():
            create_array(mg, k, v)
        attrs.pop("complete", None)
        for k, v in attrs.items():
            set_attr(mg, k, attr_text(v) if isinstance(v, (str, bytes)) else v)
        report.models += 1


def _copy_indexes(src: _Source, out: h5py.File, db: Path, report: RepairReport) -> None:

    if "indexes" not in src.fh:
        return
    for name in sorted(src.fh["indexes"].keys()):
        g = src.fh["indexes"][name]
        try:
            attrs = {k: v for k, v in g.attrs.items()}
            rows = g["rows"][()]
            files = index_files({k: plain(v) for k, v in attrs.items()})
            ok = all(db.with_name(f.file).exists() and
                     verify_file(db.with_name(f.file), f.bytes, f.hash, full=True) is None
                     for f in files)
        except Exception as exc:
            report.dropped.append(f"index {name} (registry damaged: {_first_line(exc)})")
            continue
        if not ok:
            report.dropped.append(f"index {name} (its file is missing or damaged; rebuild it)")
            continue
        ig = out.require_group("indexes").create_group(name)
        create_array(ig, "rows", np.asarray(rows, np.int64))
        attrs.pop("store_hash", None)
        for k, v in attrs.items():
            set_attr(ig, k, attr_text(v) if isinstance(v, (str, bytes)) else v)
        report.indexes += 1


def _open_source(db: Path, fd: int) -> tuple[h5py.File, int]:
    """The damaged store's HDF5 file (journals replayed when intact) and its format version."""
    name = lock.fd_path(fd, db)
    if os.pread(fd, 8, 0) == journal.HDF5_SIGNATURE:
        return h5py.File(name, "r", locking=False), 1
    view = None
    try:
        view = journal.view_of(fd, journal.plan(db, fd))
    except UserError:
        pass  # a damaged or foreign header or journal: salvage the file as it is
    fh = h5py.File(view, "r") if view is not None else h5py.File(name, "r", locking=False)
    return fh, int(fh.attrs.get("format_version", FORMAT_VERSION))


def _backup_name(db: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup = db.with_name(f"{db.name}.bak-{stamp}")
    n = 1
    while os.path.lexists(backup):
        n += 1
        backup = db.with_name(f"{db.name}.bak-{stamp}-{n}")
    return backup


def repair_store(db: str | Path) -> RepairReport:
    """Rebuild the store from every intact piece; swap it in; keep the old file as a backup."""
    from .writer import LIBVER

    db = Path(db)
    check_exists(db)
    started = time.perf_counter()
    tmp = db.with_name(f".{db.name}.repair-{os.getpid()}")
    held = lock.WriterLock.acquire(db, journal.read_pid)
    report = RepairReport(str(db), "", bytes_before=db.stat().st_size)
    try:
        prefix = f".{db.name}.repair-"
        for leftover in os.listdir(db.parent):  # of a killed repair (we hold the lock now)
            if leftover.startswith(prefix):
                (db.parent / leftover).unlink(missing_ok=True)
        try:
            fh, version = _open_source(db, held.fd)
        except Exception as exc:
            raise StoreError(f"{db} cannot be read at all ({_first_line(exc)}); there is "
                             f"nothing to salvage") from None
        report.upgraded = version == 1
        try:
            src = _Source(fh, version)
            try:
                _build(src, tmp, db, report, LIBVER)
            except OSError as exc:
                raise journal.os_error(tmp, exc) from None
        finally:
            fh.close()
        with held.exclusive():  # no reader mid-read while the name moves to the new file
            backup = _backup_name(db)
            report.backup = str(backup)
            try:
                os.link(db, backup)
            except OSError:
                import shutil

                try:
                    shutil.copy2(db, backup)
                except OSError as exc:
                    raise journal.os_error(backup, exc) from None
            os.replace(tmp, db)
            try:
                dfd = os.open(db.parent, os.O_RDONLY)
                try:
                    if journal.sync_enabled():
                        os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError:
                pass
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        held.release()
    report.bytes_after = db.stat().st_size
    report.seconds = time.perf_counter() - started
    return report


def _build(src: _Source, tmp: Path, db: Path, report: RepairReport, libver: str) -> None:
    n = src.rows
    report.rows = n
    cols, paths, errors, lost, stale = _read_images(src)
    with h5py.File(tmp, "w", libver=libver, userblock_size=USERBLOCK, locking=False) as out:
        create_layout(out)
        try:
            set_attr(out, "created", attr_text(src.fh.attrs.get("created", now_iso())))
        except Exception:
            pass
        g = out["images"]
        cols["status"] = np.where(lost, STATUS_LOST, cols["status"]).astype(np.int8)
        for name in IMAGE_COLUMNS:
            g[name].resize(n, axis=0)
            if n:
                g[name][:] = np.where(lost, np.zeros(1, cols[name].dtype), cols[name]) \
                    if name != "status" else cols[name]
        _write_text(g, "path", [b"" if lost[i] or paths[i] is None else paths[i]
                                for i in range(n)])
        _write_text(g, "error", [b"lost in repair: its row was damaged" if lost[i]
                                 else (errors[i] or b"") for i in range(n)])
        report.lost_rows = int(lost.sum())
        report.stale_rows = int(stale.sum())
        for ext in sorted(src.fh["descriptors"].keys()) if "descriptors" in src.fh else []:
            _copy_extractor(src, ext, out, lost | stale, report)
        _copy_models(src, out, report)
        _copy_indexes(src, out, db, report)
        out.attrs["rows"] = n
        set_attr(out, "modified", now_iso())
        set_attr(out, "repaired", now_iso())
    fd = os.open(tmp, os.O_RDWR)
    try:
        journal.init_header(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def iter_problems(report: CheckReport) -> Iterator[str]:
    for p in report.problems:
        yield p.line()


__all__ = ["check_store", "repair_store", "CheckReport", "RepairReport", "Problem", "scan",
           "encode_path", "STATUS_OK"]
