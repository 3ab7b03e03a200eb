"""`imgdb repair`: rebuild a clean store from every intact part of a damaged one.

`repair` copies every intact committed row, model and index registration into a fresh store
(rows whose vectors are damaged become pending, so a rerun of ingest recomputes them; rows whose
file facts are lost are kept as `lost` tombstones so ids stay dense), reclaims dead space, swaps
it in atomically and keeps the old file as a backup. It also upgrades stores of the first format
(imgdb 0.1). Intact rows are found by `check`'s chunk scanner.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import DiskFull, NotAStore, StoreError, UserError
from . import journal, lock
from .check import first_line, scan, scan_ragged
from .diskio import create_like
from .indexfiles import index_files, verify_file
from .overlay import Overlay
from .reader import check_exists, plain
from .schema import (EXTRACTOR_FIELDS, FORMAT, FORMAT_VERSION, IMAGE_COLUMNS, STATE_COMPUTED,
                     STATE_PENDING, STATUS_LOST, STATUS_OK, USERBLOCK, attr_text, create_array,
                     create_extractor, create_layout, create_local, create_vectors, now_iso,
                     set_attr)
from .validate import index_rows_problem, model_problem, unknown_status, vectors_problem


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
        # the image table's length (the root attribute may be damaged or crafted: a count of
        # 10^9 or -5 must not become the size of anything)
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
        if name == "status" and values is not None:
            bad |= unknown_status(values)  # no status imgdb writes: the file is looked at again
        stale |= bad
        cols[name] = values.astype(dtype) if values is not None else np.full(n, fill, dtype)
    if src.version == 1:
        paths, bad_p = _legacy_text(g["path"], n)
        errors, bad_e = _legacy_text(g["error"], n)
    else:
        paths, bad_p = scan_ragged(g, "path", n, None)
        errors, bad_e = scan_ragged(g, "error", n, None)
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
        report.dropped.append(f"extractor {ext} (settings unreadable: {first_line(exc)})")
        return
    if src.version == 1:
        computed, bad = scan(g["computed"], n)
        state = np.where(computed.astype(bool), STATE_COMPUTED, STATE_PENDING).astype(np.int8) \
            if computed is not None else np.zeros(n, np.int8)
        errors = [b""] * n
    else:
        state, bad = scan(g["state"], n)
        state = state.astype(np.int8) if state is not None else np.zeros(n, np.int8)
        errors, bad_e = scan_ragged(g, "error", n, None)
        errors = [e if not b else b"" for e, b in zip(errors, bad_e)]
    redo = bad.copy()  # rows whose vectors must be computed again
    og = create_extractor(out, ext, settings, n)
    set_attr(og, "created", created)
    for layer in sorted(k for k in g.keys() if k not in EXTRACTOR_FIELDS + ("computed",)):
        if not isinstance(g[layer], h5py.Group):
            continue
        for pooling in sorted(g[layer].keys()):
            ds = g[layer][pooling]
            problem = vectors_problem(ds.shape, ds.dtype, ds.shape[0] if ds.ndim else -1)
            if problem:  # not vectors imgdb wrote: the descriptor goes (ingest adds it again)
                report.dropped.append(f"descriptor {ext}/{layer}/{pooling} ({problem})")
                redo[:] = True
                continue
            data, bad_v = scan(ds, n)
            if data is None:
                data = np.full((n,) + ds.shape[1:], np.nan, np.float32)
            redo |= bad_v | ~np.isfinite(data[:n]).all(axis=1)
            target = create_vectors(og.require_group(layer), pooling, n, ds.shape[1], "float32")
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
        report.dropped.append(f"part of the model registry ({first_line(exc)})")
    for name, g in groups:
        try:
            attrs = dict(g.attrs)
        except Exception as exc:
            report.dropped.append(f"models/{name} ({first_line(exc)})")
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
            report.dropped.append(f"model {name} (arrays damaged: {first_line(exc)})")
            continue
        problem = model_problem({k: np.shape(v) for k, v in arrays.items()},
                                {k: plain(v) for k, v in attrs.items()})
        if problem:
            report.dropped.append(f"model {name} ({problem}; fit it again)")
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
            report.dropped.append(f"index {name} (registry damaged: {first_line(exc)})")
            continue
        problem = index_rows_problem(rows, src.rows)
        if problem:
            report.dropped.append(f"index {name} ({problem}; rebuild it)")
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
        plan = journal.plan(db, fd)
        view = journal.view_of(fd, plan)
        length = os.fstat(fd).st_size
        if view is None and length < plan.size:
            # cut short (a copy that stopped, a full disk): the missing bytes read as zeros, so
            # HDF5 opens the file and the checksums tell which rows the cut took
            view = Overlay(fd, plan.size)
            view.valid = length
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


def _check_room(db: Path) -> None:
    """Refuse before writing when the repaired copy may not fit (free space, the file-size
    limit): HDF5 cannot survive a failed write mid-build (its file closes with errors, the
    process may crash), so the copy must have room for about the store's size."""
    need = int(db.stat().st_size * 1.25) + (1 << 20)
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft == resource.RLIM_INFINITY:
            soft = -1
    except (ImportError, OSError, ValueError):  # no such limit here (Windows)
        soft = -1
    if soft != -1 and soft < need:
        raise DiskFull(f"the file-size limit ({soft} bytes, ulimit -f) is below what the "
                       f"repaired copy of {db} may take (about {need} bytes); nothing was "
                       f"changed: raise the limit and rerun")
    try:
        st = os.statvfs(db.parent)
        free = st.f_bavail * st.f_frsize
    except OSError:
        return
    if free < need:
        raise DiskFull(f"{free >> 20} MB free beside {db}, the repaired copy may take about "
                       f"{need >> 20} MB; nothing was changed: free space and rerun")


def repair_store(db: str | Path) -> RepairReport:
    """Rebuild the store from every intact piece; swap it in; keep the old file as a backup."""
    from .writer import LIBVER

    db = Path(db)
    check_exists(db)
    if db.is_symlink():  # repair the store the link names, beside it; the link stays a link
        db = Path(os.path.realpath(db))
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
            raise StoreError(f"{db} cannot be read at all ({first_line(exc)}); there is "
                             f"nothing to salvage") from None
        report.upgraded = version == 1
        if plain(fh.attrs.get("format", b"")) != FORMAT:
            fh.close()
            raise NotAStore(f"{db} is an HDF5 file but not an imgdb store; there is nothing "
                            f"to repair")
        try:
            _check_room(db)
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
    create_like(tmp, db)  # the repaired store keeps the store's mode and owner
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



__all__ = ["repair_store", "RepairReport"]
