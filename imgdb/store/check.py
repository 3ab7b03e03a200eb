"""`imgdb check`: find damage in a store (`repair` mends it: `store/repair.py`).

`check` verifies the commit header, that HDF5 can read every object, every chunk of every
dataset against its fletcher32 checksum, the structure (row counts, ragged spans, local
segments, states), the model and index registries, and each registered index file against
its digest. The chunk scanner here is what repair reads intact rows with.
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

from ..errors import NotAStore, StoreDamaged, UserError
from . import journal, lock
from .indexfiles import index_files, verify_file
from .reader import check_exists, plain
from .schema import FORMAT, IMAGE_TEXT, STATE_COMPUTED, STATE_FAILED_TRANSIENT, vector_datasets
from .validate import (index_rows_problem, model_problem, rows_problem, unknown_status,
                       vectors_problem)

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


def first_line(exc: BaseException) -> str:
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


def scan_ragged(group: h5py.Group, name: str, n: int, report: CheckReport | None
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
        except NotAStore:
            raise  # not damage: nothing of imgdb's to check
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
                                                   f"{first_line(exc)}"))
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
        report.problems.append(Problem("/", f"root attributes unreadable: {first_line(exc)}"))
        return
    try:  # the image table decides how many rows there are; a crafted count is damage
        table = int(fh["images"]["status"].shape[0])
        problem = rows_problem(n, table)
        if problem:
            report.problems.append(Problem("/", problem))
            n = report.rows = table
    except Exception as exc:
        report.problems.append(Problem("/images", f"unreadable: {first_line(exc)}"))
    computed = _computed_rows(fh, n)
    objects: list[tuple[str, object]] = []
    try:
        fh.visititems(lambda name, obj: objects.append((name, obj)))
    except Exception as exc:
        report.problems.append(Problem("/", f"the object tree cannot be walked: "
                                            f"{first_line(exc)}"))
    aligned = set()
    try:
        from .schema import aligned_datasets

        aligned = {ds.name for ds in aligned_datasets(fh)}
    except Exception as exc:
        report.problems.append(Problem("/", f"the layout is incomplete: {first_line(exc)}"))
    for name, obj in objects:
        if not isinstance(obj, h5py.Dataset):
            try:
                dict(obj.attrs)
            except Exception as exc:
                report.problems.append(Problem("/" + name, f"attributes unreadable: "
                                                           f"{first_line(exc)}"))
            continue
        report.datasets += 1
        ds = obj
        if ds.name in aligned and ds.shape[0] != n:
            report.problems.append(Problem(ds.name, f"has {ds.shape[0]} rows, the store {n}"))
        try:
            data, bad = scan(ds)
        except Exception as exc:
            report.problems.append(Problem(ds.name, f"unreadable: {first_line(exc)}"))
            continue
        if ds.name in computed:
            _check_vectors(ds, data, bad, computed[ds.name], n, report)
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
        _check_indexes(fh, db, n, report)


def _computed_rows(fh: h5py.File, n: int) -> dict[str, np.ndarray]:
    """Each descriptor dataset's name -> the rows its extractor says are computed."""
    out = {}
    try:
        for ext in sorted(fh["descriptors"].keys()):
            g = fh["descriptors"][ext]
            state, _ = scan(g["state"], n)
            done = state == STATE_COMPUTED if state is not None else np.zeros(n, bool)
            for _, _, ds in vector_datasets(g):
                out[ds.name] = done
    except Exception:  # noqa: BLE001 - the layout check names it
        pass
    return out


def _check_vectors(ds: h5py.Dataset, data, bad: np.ndarray, computed: np.ndarray, n: int,
                   report: CheckReport) -> None:
    """A descriptor's dataset: (images, dims) floats, finite wherever a row is computed."""
    problem = vectors_problem(ds.shape, ds.dtype, n)
    if problem:
        report.problems.append(Problem(ds.name, problem))
        return
    if data is None:
        return
    rows = min(len(data), len(computed))
    broken = np.zeros(n, bool)
    broken[:rows] = computed[:rows] & ~bad[:rows] & ~np.isfinite(data[:rows]).all(axis=1)
    if broken.any():
        report.problems.append(Problem(ds.name, "holds vectors that are not finite (NaN or "
                                                "infinite)", _ranges(broken)))


def _check_models(fh: h5py.File, report: CheckReport) -> None:
    """Every stored model's arrays against its attributes (a PCA of the wrong shape)."""
    groups: list[h5py.Group] = []
    if "models" in fh:
        fh["models"].visititems(lambda _, obj: groups.append(obj)
                                if isinstance(obj, h5py.Group) and "components" in obj
                                and "mean" in obj else None)
    for g in groups:
        try:
            problem = model_problem({k: g[k].shape for k in ("components", "mean")},
                                    {k: plain(v) for k, v in g.attrs.items()})
        except Exception as exc:  # noqa: BLE001
            problem = f"unreadable: {first_line(exc)}"
        if problem:
            report.problems.append(Problem(g.name, problem))


def _check_structure(fh: h5py.File, n: int, report: CheckReport) -> None:
    try:
        status, _ = scan(fh["images"]["status"], n)
        unknown = unknown_status(status) if status is not None else np.zeros(0, bool)
        if unknown.any():
            report.problems.append(Problem("/images/status", "holds unknown values",
                                           _ranges(unknown)))
        _check_models(fh, report)
        for name in IMAGE_TEXT:
            scan_ragged(fh["images"], name, n, report)
        for ext in sorted(fh["descriptors"].keys()):
            g = fh["descriptors"][ext]
            json.loads(g.attrs["settings"])
            state, _ = scan(g["state"], n)
            if state is not None and ((state < 0) | (state > STATE_FAILED_TRANSIENT)).any():
                report.problems.append(Problem(g.name + "/state", "holds unknown values",
                                               _ranges((state < 0) | (state > 3))))
            scan_ragged(g, "error", n, report)
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
        report.problems.append(Problem("/", f"the layout is damaged: {first_line(exc)}"))


def _check_indexes(fh: h5py.File, db: Path, n: int, report: CheckReport) -> None:
    if "indexes" not in fh:
        return
    for name in sorted(fh["indexes"].keys()):
        g = fh["indexes"][name]
        try:
            attrs = {k: plain(v) for k, v in g.attrs.items()}
            rows = g["rows"][()]
        except Exception as exc:
            report.problems.append(Problem(f"index {name}", f"registry entry unreadable: "
                                                            f"{first_line(exc)}"))
            continue
        report.indexes += 1
        if len(rows) != int(attrs.get("items", -1)):
            report.problems.append(Problem(f"index {name}", "registry rows do not match its "
                                                            "item count"))
        problem = index_rows_problem(rows, n)
        if problem:
            report.problems.append(Problem(f"index {name}", problem + "; rebuild it (imgdb "
                                                                      "index ls shows how)"))
        try:
            files = index_files(attrs)  # every shard of a sharded index
        except StoreDamaged as exc:
            report.problems.append(Problem(f"index {name}", str(exc)))
            continue
        except (KeyError, ValueError, TypeError) as exc:
            report.problems.append(Problem(f"index {name}", f"registry entry incomplete: "
                                                            f"{first_line(exc)}"))
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


def iter_problems(report: CheckReport) -> Iterator[str]:
    for p in report.problems:
        yield p.line()


__all__ = ["check_store", "CheckReport", "Problem", "scan", "scan_ragged", "first_line",
           "iter_problems"]
