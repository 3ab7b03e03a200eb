"""Reading a store: `open_read(db)` holds the shared lock for one read and yields a `StoreView`.

A view answers in the store's terms (images, descriptors, local features, models, indexes);
callers never spell a dataset path. Stored data carry checksums: a chunk that fails its check
raises `StoreDamaged` naming the dataset and rows, never garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from ..errors import StoreDamaged, StoreError, UserError
from . import journal, lock
from .schema import (EXTRACTOR_FIELDS, FORMAT, FORMAT_VERSION, IMAGE_COLUMNS, STATE_COMPUTED,
                     STATUS_OK, DescriptorInfo, ImageTable, IndexEntry, LocalInfo, ModelInfo,
                     decode_path, extractor_names, local_groups, model_group_path,
                     vector_datasets)
from .validate import index_rows_problem, model_problem, rows_problem, vectors_problem


def plain(value):
    """An HDF5 attribute as a plain Python value (JSON strings of lists/dicts decoded)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def check_exists(path: Path) -> None:
    if not path.exists():
        raise StoreError(f"store {path} does not exist; create it with: imgdb ingest PHOTOS "
                         f"--db {path}")
    if path.is_dir():
        raise StoreError(f"{path} is a directory; give a file name such as photos.h5", "db")


def hdf5_error(exc: BaseException) -> bool:
    """Did HDF5 (through h5py) raise this: damaged metadata, a failed checksum, a bad read?"""
    if not isinstance(exc, (OSError, KeyError, RuntimeError, ValueError, TypeError)) or \
            isinstance(exc, UserError):
        return False
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    # raised by h5py's compiled layer from an HDF5 error stack (its Python layer raises for
    # mistakes in the call, such as shapes that do not broadcast)
    name = last.tb_frame.f_code.co_filename if last is not None else ""
    return name.startswith("h5py") and name.endswith(".pyx")


def damaged(path: Path, exc: BaseException, what: str = "it") -> StoreDamaged:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "filter returned failure" in first or "checksum" in first.lower():
        first = "checksum mismatch" + (" in its metadata" if "metadata" in first else "")
    return StoreDamaged(f"store {path} is damaged: {what} cannot be read ({first}); run imgdb "
                        f"check --db {path} for a full report, then imgdb repair --db {path}")


def guarded(what: str, path: Path):
    """Turn an HDF5 read failure (checksum, structure) into StoreDamaged naming `what`."""
    return _Guard(what, path)


class _Guard:
    def __init__(self, what: str, path: Path) -> None:
        self.what, self.path = what, path

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, UserError) or not isinstance(exc, (OSError, KeyError,
                                                                              RuntimeError,
                                                                              ValueError)):
            return False
        raise damaged(self.path, exc, self.what) from None


class StoreView:
    """Read access to one consistent state of a store (an open HDF5 file)."""

    def __init__(self, fh: h5py.File, path: Path) -> None:
        self.fh = fh
        self.path = path
        with guarded("the root attributes", path):
            fmt = plain(fh.attrs.get("format", b""))
            if fmt != FORMAT:
                raise StoreError(f"{path} is an HDF5 file but not an imgdb store")
            version = int(fh.attrs.get("format_version", 0))
            if version != FORMAT_VERSION:
                raise StoreError(f"{path} has store format {version}; this imgdb reads format "
                                 f"{FORMAT_VERSION} (upgrade with: imgdb repair --db {path})")
            self.rows = int(fh.attrs["rows"])
            problem = rows_problem(self.rows, int(fh["images"]["status"].shape[0]))
        if problem:
            raise StoreDamaged(f"store {path} is damaged: {problem}; repair it with: "
                               f"imgdb repair --db {path}")

    # -- attributes --------------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        return {k: plain(v) for k, v in self.fh.attrs.items()}

    @property
    def store_id(self) -> str:
        """Which store this is: a random id given at creation (a store made by a copy of the
        file shares it; one made again under the same name, even on a reused inode, does
        not). Stores of earlier releases: their creation time."""
        with guarded("the root attributes", self.path):
            value = self.fh.attrs.get("store_id", self.fh.attrs.get("created", ""))
        return str(plain(value))

    def _read(self, what: str, ds: h5py.Dataset, sel=slice(None)) -> np.ndarray:
        with guarded(what, self.path):
            return ds[sel]

    def read_dataset(self, ds: h5py.Dataset, sel=slice(None)) -> np.ndarray:
        """`ds[sel]` of one of this store's datasets; damage becomes a StoreDamaged naming it."""
        return self._read(ds.name, ds, sel)

    # -- images ------------------------------------------------------------------------------
    def _text(self, group: h5py.Group, name: str, rows: np.ndarray | None,
              decode=decode_path) -> list[str]:
        n = self.rows
        sel = slice(0, n) if rows is None else rows
        start = self._read(f"{group.name}/{name}_start", group[f"{name}_start"], sel)
        length = self._read(f"{group.name}/{name}_len", group[f"{name}_len"], sel)
        if not len(start):
            return []
        data_ds = group[f"{name}_data"]
        if rows is None or len(start) > 64:
            lo, hi = int(start.min()), int((start + length).max())
            data = self._read(f"{group.name}/{name}_data", data_ds, slice(lo, hi)).tobytes() \
                if hi > lo else b""
            return [decode(data[s - lo:s - lo + ln]) for s, ln in zip(start.tolist(),
                                                                        length.tolist())]
        return [decode(self._read(f"{group.name}/{name}_data", data_ds,
                                  slice(s, s + ln)).tobytes()) if ln else ""
                for s, ln in zip(start.tolist(), length.tolist())]

    def images(self) -> ImageTable:
        """The whole image table."""
        g = self.fh["images"]
        n = self.rows
        cols = {name: self._read(f"/images/{name}", g[name], slice(0, n)) for name in IMAGE_COLUMNS}
        return ImageTable(path=self._text(g, "path", None), error=self._text(g, "error", None,
                                                                          _utf8), **cols)

    def column(self, name: str, rows: Sequence[int] | np.ndarray | None = None):
        """One image column, whole or at some rows (`path` and `error` as strings)."""
        g = self.fh["images"]
        idx = None if rows is None else np.asarray(rows, dtype=np.int64)
        if idx is not None and len(idx) and (idx.min() < 0 or idx.max() >= self.rows):
            raise UserError(f"image id out of range (the store has ids 0..{self.rows - 1})")
        if name in ("path", "error"):
            if idx is None:
                return self._text(g, name, None, decode_path if name == "path" else _utf8)
            uniq, inverse = np.unique(idx, return_inverse=True)
            vals = self._text(g, name, uniq, decode_path if name == "path" else _utf8)
            return [vals[i] for i in inverse]
        ds = g[name]
        if idx is None:
            return self._read(f"/images/{name}", ds, slice(0, self.rows))
        uniq, inverse = np.unique(idx, return_inverse=True)
        return self._read(f"/images/{name}", ds, uniq)[inverse] if len(uniq) else ds[:0]

    def paths(self, rows: Sequence[int] | np.ndarray | None = None) -> list[str]:
        return self.column("path", rows)

    # -- extractors and descriptors ------------------------------------------------------------
    def extractors(self) -> list[str]:
        return extractor_names(self.fh)

    def _extractor(self, extractor: str) -> h5py.Group:
        top = self.fh["descriptors"]
        if extractor not in top:  # (`get` would take damage for absence)
            raise StoreError(f"the store has no extractor {extractor!r}; run imgdb info to list "
                             f"them")
        with guarded(f"extractor {extractor}", self.path):
            return top[extractor]

    def settings(self, extractor: str) -> dict:
        """The extraction settings recorded with an extractor."""
        with guarded(f"the settings of {extractor}", self.path):
            return json.loads(self._extractor(extractor).attrs["settings"])

    def revision(self, extractor: str) -> int:
        """Counter bumped whenever this extractor's valid rows or their vectors may change
        (indexes and graphs record it at build time: an O(1) staleness check)."""
        return int(self._extractor(extractor).attrs.get("revision", 0))

    def state(self, extractor: str) -> np.ndarray:
        """Per-row state of an extractor (schema.STATE_*)."""
        g = self._extractor(extractor)
        return self._read(f"{g.name}/state", g["state"], slice(0, self.rows))

    def extractor_errors(self, extractor: str, rows: np.ndarray) -> list[str]:
        return self._text(self._extractor(extractor), "error", np.asarray(rows, np.int64), _utf8)

    def valid(self, extractor: str) -> np.ndarray:
        """Rows that are ok images with this extractor's vectors computed."""
        status = self.column("status")
        return (self.state(extractor) == STATE_COMPUTED) & (status == STATUS_OK)

    def descriptors(self) -> list[DescriptorInfo]:
        """Every stored descriptor, named `EXTRACTOR/LAYER/POOLING`."""
        out = []
        for ext in self.extractors():
            for layer, pooling, ds in vector_datasets(self.fh["descriptors"][ext]):
                problem = vectors_problem(ds.shape, ds.dtype, self.rows)
                if problem:
                    raise StoreDamaged(f"descriptor {ext}/{layer}/{pooling} of {self.path} "
                                       f"{problem}; repair the store with: imgdb repair --db "
                                       f"{self.path}")
                out.append(DescriptorInfo(f"{ext}/{layer}/{pooling}", ext, layer, pooling,
                                          (self.rows, int(ds.shape[1])), str(ds.dtype)))
        return out

    def descriptor(self, name: str) -> DescriptorInfo:
        """Find a descriptor by its full name or a unique suffix (`pool5/crow`)."""
        infos = self.descriptors()
        exact = [d for d in infos if d.name == name]
        if exact:
            return exact[0]
        tail = name.strip("/")
        matches = [d for d in infos if d.name.endswith("/" + tail) or d.name.endswith("+" + tail)]
        if len(matches) == 1:
            return matches[0]
        known = ", ".join(d.name for d in infos[:6]) + (" ..." if len(infos) > 6 else "")
        if not matches:
            raise StoreError(f"the store has no descriptor {name!r}; stored: {known or 'none'}")
        raise StoreError(f"descriptor {name!r} is ambiguous; use one of: "
                         + ", ".join(d.name for d in matches))

    def _vectors_ds(self, info: DescriptorInfo) -> h5py.Dataset:
        return self.fh["descriptors"][info.extractor][info.layer][info.pooling]

    def vectors(self, info: DescriptorInfo, rows: Sequence[int] | np.ndarray | None = None
                ) -> np.ndarray:
        """Raw vectors (float32) of all rows or of some rows, in the order given."""
        ds = self._vectors_ds(info)
        if rows is None:
            x = self._read(f"descriptor {info.name}", ds, slice(0, self.rows))
        else:
            idx = np.asarray(rows, dtype=np.int64)
            if not len(idx):
                return np.zeros((0, ds.shape[1]), np.float32)
            uniq, inverse = np.unique(idx, return_inverse=True)
            x = self._read(f"descriptor {info.name} rows {uniq[0]}..{uniq[-1]}", ds, uniq)[inverse]
        return x.astype(np.float32, copy=False)

    def stored_bytes(self, info: DescriptorInfo) -> int:
        """Bytes a descriptor takes on disk."""
        return int(self._vectors_ds(info).id.get_storage_size())

    def iter_valid(self, info: DescriptorInfo, chunk: int = 65536
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row ids, raw vectors) of the valid rows, in chunks (flat memory on big stores)."""
        valid = self.valid(info.extractor)
        ds = self._vectors_ds(info)
        for start in range(0, self.rows, chunk):
            stop = min(self.rows, start + chunk)
            rows = np.flatnonzero(valid[start:stop]) + start
            if len(rows):
                block = self._read(f"descriptor {info.name} rows {start}..{stop - 1}", ds,
                                   slice(start, stop))
                yield rows, block[rows - start].astype(np.float32)

    def valid_vectors(self, info: DescriptorInfo) -> tuple[np.ndarray, np.ndarray]:
        """(valid row ids, their raw vectors)."""
        parts = list(self.iter_valid(info))
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, info.shape[1]), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def content_hash(self, extractor: str | None = None) -> str:
        """Digest of the image table (paths, file digests, statuses) and of which rows have
        vectors; with `extractor`, only that extractor's rows count (what its models and indexes
        depend on: ingesting another extractor does not make them stale)."""
        h = hashlib.blake2b(digest_size=16)
        g = self.fh["images"]
        n = self.rows
        for name in ("path_start", "path_len", "sha", "status"):
            h.update(np.ascontiguousarray(self._read(f"/images/{name}", g[name],
                                                     slice(0, n))).tobytes())
        if n:
            h.update(self._read("/images/path_data", g["path_data"]).tobytes())
        for ext in ([extractor] if extractor else self.extractors()):
            h.update(ext.encode())
            h.update(np.ascontiguousarray(self.state(ext) == STATE_COMPUTED).tobytes())
        return h.hexdigest()

    # -- local features ------------------------------------------------------------------------
    def local_sets(self) -> list[LocalInfo]:
        """Every stored local-feature set with its size."""
        out = []
        n = self.rows
        for g in local_groups(self.fh):
            start = self._read(f"{g.name}/start", g["start"], slice(0, n))
            count = self._read(f"{g.name}/count", g["count"], slice(0, n))
            stored = start >= 0
            out.append(LocalInfo(g.parent.name.split("/")[-1], g.name.split("/")[-1],
                                 int(g["features"].shape[1]), int(stored.sum()),
                                 int(count[stored].sum()),
                                 int(g["features"].id.get_storage_size()
                                     + g["coords"].id.get_storage_size())))
        return out

    def local(self, name: str) -> LocalInfo:
        """Find local features by `EXTRACTOR/KEY` or a unique suffix such as `conv5_3:max`."""
        infos = self.local_sets()
        matches = [i for i in infos if i.name == name] or \
            [i for i in infos if i.name.endswith("/" + name.strip("/")) or i.key == name]
        if len(matches) == 1:
            return matches[0]
        known = ", ".join(i.name for i in infos) or "none (ingest with --keep-local LAYER[:MASK])"
        if not matches:
            raise StoreError(f"the store has no local features {name!r}; stored: {known}")
        raise StoreError(f"local features {name!r} are ambiguous; use one of: "
                         + ", ".join(i.name for i in matches))

    def verify_set(self, extractor: str) -> LocalInfo | None:
        """The extractor's verification keypoints (None: it keeps none)."""
        found = [i for i in self.local_sets() if i.extractor == extractor and i.verify]
        return found[0] if found else None

    def local_grids(self, info: LocalInfo, rows: Sequence[int]) -> np.ndarray:
        """(len(rows), 2) grid (width, height) of each row's local features."""
        g = self._local_group(info)
        grid = self._read(f"{g.name}/grid", g["grid"], slice(0, self.rows))
        return grid[np.asarray(rows, np.int64)]

    def _local_group(self, info: LocalInfo) -> h5py.Group:
        return self.fh["local"][info.extractor][info.key]

    def local_spans(self, info: LocalInfo) -> tuple[np.ndarray, np.ndarray]:
        """(start (n,), count (n,)) of every row; start -1 where nothing is stored."""
        g = self._local_group(info)
        n = self.rows
        return (self._read(f"{g.name}/start", g["start"], slice(0, n)),
                self._read(f"{g.name}/count", g["count"], slice(0, n)))

    def local_usable_rows(self, info: LocalInfo) -> np.ndarray:
        """Valid rows of the extractor that have local features stored."""
        start, _ = self.local_spans(info)
        return np.flatnonzero(self.valid(info.extractor) & (start >= 0))

    def iter_local(self, info: LocalInfo, rows: Sequence[int], block: int = 1 << 18
                   ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(row, features (N, C) float16, coords (N, 2)) for each row with local features,
        read in large contiguous slices (one HDF5 read per ~`block` features)."""
        g = self._local_group(info)
        start, count = self.local_spans(info)
        rows = sorted((int(r) for r in rows if start[r] >= 0), key=lambda r: start[r])
        i = 0
        while i < len(rows):
            j, lo, hi = i, int(start[rows[i]]), int(start[rows[i]] + count[rows[i]])
            while j + 1 < len(rows) and max(hi, start[rows[j + 1]] + count[rows[j + 1]]) - lo <= block:
                j += 1
                hi = max(hi, int(start[rows[j]] + count[rows[j]]))
            what = f"local features {info.name} rows {rows[i]}..{rows[j]}"
            feats = self._read(what, g["features"], slice(lo, hi))
            coords = self._read(what, g["coords"], slice(lo, hi))
            for r in rows[i:j + 1]:
                a = int(start[r]) - lo
                yield r, feats[a:a + int(count[r])], coords[a:a + int(count[r])]
            i = j + 1

    # -- models ----------------------------------------------------------------------------------
    def models(self, kind: str | None = None, descriptor: str | None = None) -> list[ModelInfo]:
        """Every model version, sorted by kind, descriptor and version number."""
        out: list[ModelInfo] = []
        if "models" not in self.fh:
            return out

        def visit(name: str, obj) -> None:
            if isinstance(obj, h5py.Group) and "version" in obj.attrs:
                parts = name.split("/")
                k, ver, desc = parts[0], parts[-1], "/".join(parts[1:-1])
                if (kind is None or k == kind) and (descriptor is None or desc == descriptor):
                    out.append(ModelInfo(k, desc, ver, {a: plain(v) for a, v in obj.attrs.items()}))

        with guarded("the model registry", self.path):
            self.fh["models"].visititems(visit)
        return sorted(out, key=lambda m: (m.kind, m.descriptor, m.number))

    def model(self, kind: str, descriptor: str, version: str | None) -> ModelInfo:
        """`vN` (or the latest when None/'latest') of a kind of model for a descriptor."""
        models = self.models(kind, descriptor)
        if not models:
            raise UserError(f"no {kind} model for {descriptor}; fit one with: imgdb fit {kind} "
                            f"--db {self.path} --descriptor {descriptor}")
        if version in (None, "latest"):
            return models[-1]
        version = version if version.startswith("v") else f"v{version}"
        for m in models:
            if m.version == version:
                return m
        raise UserError(f"no {kind} model {version} for {descriptor}; stored versions: "
                        + ", ".join(m.version for m in models))

    def model_by_id(self, model_id: str) -> ModelInfo | None:
        kind, _, rest = model_id.partition("/")
        descriptor, _, version = rest.rpartition("/")
        for m in self.models(kind, descriptor):
            if m.version == version:
                return m
        return None

    def model_arrays(self, model: ModelInfo) -> dict[str, np.ndarray]:
        g = self.fh[model_group_path(model.kind, model.descriptor)][model.version]
        with guarded(f"model {model.id}", self.path):
            arrays = {name: g[name][()] for name in g.keys()}
        problem = model_problem({k: np.shape(v) for k, v in arrays.items()}, model.attrs)
        if problem:
            raise StoreDamaged(f"model {model.id} of {self.path} is damaged ({problem}); repair "
                               f"the store with: imgdb repair --db {self.path}")
        return arrays

    # -- indexes ---------------------------------------------------------------------------------
    def indexes(self) -> list[IndexEntry]:
        reg = self.fh.get("indexes")
        if reg is None:
            return []
        with guarded("the index registry", self.path):
            return [IndexEntry(name, {k: plain(v) for k, v in reg[name].attrs.items()})
                    for name in sorted(reg.keys())]

    def index(self, name: str) -> IndexEntry:
        for entry in self.indexes():
            if entry.name == name:
                return entry
        known = ", ".join(e.name for e in self.indexes()) or "none"
        raise UserError(f"the store has no index {name!r} (indexes: {known}); build one with: "
                        f"imgdb index build --db {self.path} --descriptor DESCRIPTOR")

    def index_rows(self, name: str) -> np.ndarray:
        """Index item j -> image id."""
        reg = self.fh["indexes"][name]
        rows = self._read(f"the rows of index {name}", reg["rows"])
        problem = index_rows_problem(rows, self.rows)
        if problem:
            raise StoreDamaged(f"index {name} is damaged ({problem}); rebuild it with: imgdb "
                               f"index build --db {self.path} --name {name} --descriptor "
                               f"{plain(reg.attrs.get('descriptor', 'DESCRIPTOR'))}")
        return rows

    def file_bytes(self) -> int:
        return os.path.getsize(self.path)


def _utf8(raw: bytes) -> str:
    return bytes(raw).decode("utf-8", "replace")


def open_file(path: Path, fd: int) -> h5py.File:
    """The committed state of the store open as `fd` (its shared lock held): the file itself,
    or, after an interrupted commit or a restart, the file with its journals replayed in
    memory."""
    try:
        view = journal.view_of(fd, journal.plan(path, fd))
    except OSError as exc:
        raise StoreError(f"cannot read store {path}: {exc.strerror or exc}") from None
    try:
        if view is not None:
            return h5py.File(view, "r")
        return h5py.File(lock.fd_path(fd, path), "r", locking=False)
    except OSError as exc:
        raise StoreDamaged(f"cannot open store {path}: {str(exc).splitlines()[0]}; run "
                           f"imgdb check --db {path}") from None


@contextmanager
def open_read(path: str | Path) -> Iterator[StoreView]:
    """Read a store under its shared lock (works while a writer runs: between its commits)."""
    path = Path(path)
    check_exists(path)
    try:
        held = lock.shared(path)
        fd = held.__enter__()
    except PermissionError:
        raise StoreError(f"cannot read store {path}: permission denied") from None
    except OSError as exc:
        raise StoreError(f"cannot open store {path}: {exc.strerror or exc}") from None
    try:
        fh = open_file(path, fd)
        try:
            yield StoreView(fh, path)
        except Exception as exc:  # damaged metadata met anywhere in the read: name it
            if hdf5_error(exc):
                raise damaged(path, exc) from None
            raise
        finally:
            fh.close()
    finally:
        held.__exit__(None, None, None)


__all__ = ["StoreView", "open_read", "plain", "guarded", "check_exists", "EXTRACTOR_FIELDS",
           "hdf5_error", "damaged"]
