"""Writing a store: one `StoreWriter` at a time; every change is an atomic, journaled commit.

The writer holds the store's writer lock for its lifetime and the commit lock only inside a
`transaction` (readers go on between commits). A transaction opens the HDF5 file over an
in-memory overlay and `journal.commit` puts the changed bytes on disk all or nothing, so a kill,
a full disk, a file-size limit or an I/O error leaves the store as it was before that commit.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from ..errors import StoreError, UserError
from . import journal, lock
from .reader import StoreView, check_exists, plain
from .schema import (FAILURE_NONE, IMAGE_COLUMNS, STATE_COMPUTED, STATE_PENDING, STATUS_OK,
                     USERBLOCK, ImageRow, ImageTable, ModelInfo, aligned_datasets, create_array,
                     create_extractor, create_layout, create_local, create_vectors, encode_path,
                     extractor_names, extractor_path, index_path, local_groups, model_group_path,
                     now_iso)

#: Kinds whose version numbers are unique in the whole store, not per descriptor.
STORE_WIDE_NUMBERS = ("codebook",)
LIBVER = "latest"  # v3 superblock, checksummed object headers and chunk indexes


@dataclass
class RowUpdate:
    """One row of a commit: the file's facts and this extractor's outcome for it."""

    row: int | None  # None: a new row
    image: ImageRow
    state: int = STATE_COMPUTED  # the extractor's outcome (schema.STATE_*)
    error: str = ""  # why the extractor failed the row (extractor-level failures)


def create_store(path: Path) -> None:
    """Create an empty store at `path` atomically (nothing is left if this is interrupted)."""
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    try:
        with h5py.File(tmp, "w", libver=LIBVER, userblock_size=USERBLOCK, locking=False) as fh:
            create_layout(fh)
        fd = os.open(tmp, os.O_RDWR)
        try:
            journal.init_header(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process created it first: keep theirs
        except FileExistsError:
            pass
        except OSError:  # no hard links on this file system
            if not path.exists():
                os.replace(tmp, path)
    except OSError as exc:
        raise StoreError(f"cannot create store {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


class StoreWriter:
    """The single writer of a store."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path)
        if not create or self.path.exists():
            check_exists(self.path)
        self.created = False
        if not self.path.exists():
            if not self.path.parent.exists():
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise StoreError(f"cannot create {self.path.parent}: "
                                     f"{exc.strerror or exc}") from None
            create_store(self.path)
            self.created = True
        self.lock = lock.WriterLock.acquire(self.path, self._holder)
        try:
            self.header = journal.recover(self.path, self.lock.fd)
            self.header.pid = os.getpid()
            journal.write_header(self.lock.fd, self.header)
            with self.read():
                pass  # validates format and version
        except BaseException:
            self.lock.release()
            raise

    def _holder(self, fd: int) -> int | None:
        try:
            return journal.read_header(fd, self.path).pid
        except UserError:
            return None

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def discard_if_empty(self) -> None:
        """Remove a store this writer created and never filled (a failed first ingest)."""
        if self.created:
            with self.read() as view:
                empty = view.rows == 0 and not view.extractors()
            if empty:
                self.path.unlink(missing_ok=True)

    # -- reading and transactions ---------------------------------------------------------------
    @contextmanager
    def read(self) -> Iterator[StoreView]:
        """A view of the committed state (no lock needed: only this writer commits)."""
        try:
            fh = h5py.File(self.path, "r", locking=False)
        except OSError as exc:
            raise StoreError(f"cannot open store {self.path}: {str(exc).splitlines()[0]}; run "
                             f"imgdb check --db {self.path}") from None
        try:
            yield StoreView(fh, self.path)
        finally:
            fh.close()

    @contextmanager
    def transaction(self) -> Iterator[h5py.File]:
        """Open the store for writing; on a clean exit every change is committed atomically,
        on an exception none is."""
        with self.lock.exclusive():
            self.header = journal.recover(self.path, self.lock.fd)
            overlay = journal.Overlay(self.lock.fd, os.fstat(self.lock.fd).st_size)
            fh = h5py.File(overlay, "r+", libver=LIBVER)
            try:
                yield fh
                fh.attrs["modified"] = now_iso()
            finally:
                fh.close()
            self.header = journal.commit(self.path, self.lock.fd, self.header, overlay)

    def images(self) -> ImageTable:
        with self.read() as view:
            return view.images()

    def state(self, extractor: str) -> np.ndarray:
        with self.read() as view:
            if extractor not in view.extractors():
                return np.zeros(view.rows, np.int8)
            return view.state(extractor)

    def settings(self, extractor: str) -> dict | None:
        with self.read() as view:
            return view.settings(extractor) if extractor in view.extractors() else None

    # -- schema ------------------------------------------------------------------------------------
    def ensure_extractor(self, extractor: str, settings: dict,
                         dims: dict[tuple[str, str], int], dtype: str = "float32",
                         local: dict[str, int] | None = None) -> bool:
        """Create the extractor's group and datasets; list-valued settings (layers, poolings,
        keep_local) are merged with what is stored. Adding a dataset to an extractor that has
        rows resets every row to pending (all its datasets must stay complete). Returns whether
        anything was added."""
        with self.transaction() as fh:
            n = int(fh.attrs["rows"])
            g = fh["descriptors"].get(extractor)
            if g is None:
                g = create_extractor(fh, extractor, settings, n)
            else:
                old = json.loads(g.attrs["settings"])
                merged = dict(old)
                for key in ("layers", "poolings", "keep_local"):
                    if key in settings or key in old:
                        merged[key] = sorted(set(old.get(key, [])) | set(settings.get(key, [])))
                g.attrs["settings"] = json.dumps(merged, sort_keys=True)
            added = False
            for (layer, pooling), dim in dims.items():
                lg = g.require_group(layer)
                if pooling not in lg:
                    create_vectors(lg, pooling, n, dim, dtype)
                    added = True
            for key, channels in (local or {}).items():
                if key not in fh.require_group("local").require_group(extractor):
                    create_local(fh, extractor, key, channels, n)
                    added = True
            if added and n:
                state = g["state"][:n]
                state[state == STATE_COMPUTED] = STATE_PENDING
                g["state"][:n] = state
                _bump(g)
        return added

    # -- rows --------------------------------------------------------------------------------------
    def commit(self, extractor: str | None, rows: Sequence[RowUpdate],
               vectors: dict[tuple[str, str], np.ndarray] | None = None,
               file_changed: Sequence[int] = (), local: dict[str, list] | None = None
               ) -> list[int]:
        """Write a batch of rows: new ones appended, others overwritten in place.

        `vectors[(layer, pooling)]` has one row per update (ignored where the state is not
        computed). `file_changed`: existing rows whose file changed on disk, so every other
        extractor's vectors of them are outdated. `local[key]`: one LocalSet (or None) per
        update. Returns the row ids used.
        """
        if not rows:
            return []
        with self.transaction() as fh:
            n = int(fh.attrs["rows"])
            ids, new_n = [], n
            for u in rows:
                if u.row is None:
                    ids.append(new_n)
                    new_n += 1
                else:
                    ids.append(u.row)
            ids_arr = np.asarray(ids, dtype=np.int64)
            for ds in aligned_datasets(fh):
                if ds.shape[0] < new_n:
                    ds.resize(new_n, axis=0)
            put = _Putter(ids_arr)
            _write_images(fh, put, rows)
            changed = sorted(set(int(r) for r in file_changed))
            if extractor is not None:
                g = fh[extractor_path(extractor)]
                state = np.array([u.state for u in rows], np.int8)
                ok = state == STATE_COMPUTED
                for (layer, pooling), vec in (vectors or {}).items():
                    ds = g[layer][pooling]
                    vec = np.array(vec, dtype=ds.dtype)
                    vec[~ok] = np.nan
                    put(ds, vec)
                put(g["state"], state)
                _put_text(g, "error", put, [u.error.encode("utf-8", "replace") for u in rows])
                if local:
                    _write_local(fh, extractor, put, rows, ids, local, set(changed))
                _bump(g)
            if changed:  # files changed on disk: other extractors' vectors are outdated
                idx = np.asarray(changed, dtype=np.int64)
                for other in extractor_names(fh):
                    if other == extractor:
                        continue
                    og = fh[extractor_path(other)]
                    st = og["state"][idx]
                    if (st != STATE_PENDING).any():
                        og["state"][idx] = np.zeros(len(idx), np.int8)
                        _bump(og)
            fh.attrs["rows"] = new_n
        return ids

    def set_status(self, row_ids: Sequence[int], status: int, error: str = "") -> None:
        """Mark rows (e.g. files deleted from disk as missing) without touching descriptors."""
        if not len(row_ids):
            return
        with self.transaction() as fh:
            idx = np.array(sorted(set(int(r) for r in row_ids)), dtype=np.int64)
            put = _Putter(idx)
            g = fh["images"]
            put(g["status"], np.full(len(idx), status, np.int8))
            put(g["failure"], np.full(len(idx), FAILURE_NONE, np.int8))
            _put_text(g, "error", put, [error.encode()] * len(idx))
            for ext in extractor_names(fh):
                _bump(fh[extractor_path(ext)])

    def write_vectors(self, extractor: str, rows: Sequence[int],
                      vectors: dict[tuple[str, str], np.ndarray]) -> None:
        """Store computed vectors of existing rows (e.g. codebook encodings) and mark them."""
        if not len(rows):
            return
        with self.transaction() as fh:
            g = fh[extractor_path(extractor)]
            put = _Putter(np.asarray(rows, dtype=np.int64))
            for (layer, name), data in vectors.items():
                put(g[layer][name], np.asarray(data, dtype=g[layer][name].dtype))
            put(g["state"], np.full(len(rows), STATE_COMPUTED, np.int8))
            _bump(g)

    # -- models ------------------------------------------------------------------------------------
    def save_model(self, kind: str, descriptor: str, arrays: dict[str, np.ndarray],
                   attrs: dict) -> ModelInfo:
        """Write a new model version (never overwriting; numbers never reused)."""
        with self.transaction() as fh:
            g = fh.require_group(model_group_path(kind, descriptor))
            existing = [int(k[1:]) for k in g.keys() if re.fullmatch(r"v\d+", k)]
            number = max([int(g.attrs.get("next_version", 1)) - 1, *existing, 0]) + 1
            top = fh["models"][kind]
            if kind in STORE_WIDE_NUMBERS:  # `--codebook vN` alone names one model of the store
                number = max(number, int(top.attrs.get("next_version", 1)))
                top.attrs["next_version"] = number + 1
            version = f"v{number}"
            mg = g.create_group(version)
            for name, arr in arrays.items():
                create_array(mg, name, arr)
            full = dict(attrs, kind=kind, descriptor=descriptor, version=version,
                        created=now_iso())
            for key, value in full.items():
                mg.attrs[key] = json.dumps(value) if isinstance(value, (dict, list, tuple)) \
                    else value
            g.attrs["next_version"] = number + 1
        return ModelInfo(kind, descriptor, version, {k: plain(_attr(v)) for k, v in full.items()})

    def remove_model(self, model: ModelInfo) -> None:
        """Delete one version (explicitly asked for; its number is not reused)."""
        with self.transaction() as fh:
            g = fh[model_group_path(model.kind, model.descriptor)]
            g.attrs["next_version"] = max(int(g.attrs.get("next_version", 1)), model.number + 1)
            del g[model.version]

    # -- indexes -----------------------------------------------------------------------------------
    def register_index(self, name: str, attrs: dict, rows: np.ndarray) -> None:
        """Record an index file (written and renamed into place before this)."""
        with self.transaction() as fh:
            reg = fh.require_group("indexes")
            if name in reg:
                del reg[name]
            g = reg.create_group(name)
            create_array(g, "rows", np.asarray(rows, dtype=np.int64))
            for k, v in attrs.items():
                g.attrs[k] = json.dumps(v) if isinstance(v, (dict, list, tuple)) else v

    def remove_index(self, name: str) -> None:
        with self.transaction() as fh:
            if name in fh["indexes"]:
                del fh[index_path(name)]


def _attr(value):
    return json.dumps(value) if isinstance(value, (dict, list, tuple)) else value


def _bump(group: h5py.Group) -> None:
    group.attrs["revision"] = int(group.attrs.get("revision", 0)) + 1


class _Putter:
    """Writes one value per update into a row-aligned dataset, in id order (h5py needs
    increasing indices; a contiguous run is one slice)."""

    def __init__(self, ids: np.ndarray) -> None:
        self.order = np.argsort(ids, kind="stable")
        self.sorted = ids[self.order]
        uniq = np.unique(self.sorted)
        if len(uniq) != len(self.sorted):
            raise ValueError("a commit names the same row twice")
        self.contiguous = len(self.sorted) and \
            self.sorted[-1] - self.sorted[0] + 1 == len(self.sorted)

    def __call__(self, ds: h5py.Dataset, values: np.ndarray) -> None:
        values = np.asarray(values)[self.order]
        if self.contiguous:
            ds[int(self.sorted[0]):int(self.sorted[-1]) + 1] = values
        else:
            ds[self.sorted] = values


def _put_text(group: h5py.Group, name: str, put: _Putter, texts: list[bytes]) -> None:
    """Append the bytes of each row's text and point its (start, len) at them."""
    data = group[f"{name}_data"]
    end = data.shape[0]
    lengths = np.array([len(t) for t in texts], np.int64)
    starts = end + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    total = int(lengths.sum())
    if total:
        data.resize(end + total, axis=0)
        data[end:end + total] = np.frombuffer(b"".join(texts), np.uint8)
    put(group[f"{name}_start"], np.where(lengths > 0, starts, 0))
    put(group[f"{name}_len"], lengths.astype(np.int32))


def _write_images(fh: h5py.File, put: _Putter, rows: Sequence[RowUpdate]) -> None:
    g = fh["images"]
    cols = {
        "size": np.array([u.image.size for u in rows], np.int64),
        "mtime": np.array([u.image.mtime for u in rows], np.float64),
        "sha": np.array([u.image.sha.encode() for u in rows], "S32"),
        "width": np.array([u.image.width for u in rows], np.int32),
        "height": np.array([u.image.height for u in rows], np.int32),
        "status": np.array([u.image.status for u in rows], np.int8),
        "failure": np.array([u.image.failure for u in rows], np.int8),
    }
    for name in IMAGE_COLUMNS:
        put(g[name], cols[name])
    new = [u.row is None for u in rows]
    # a row's path never changes: write it for new rows only (rewrites keep their bytes)
    if all(new):
        _put_text(g, "path", put, [encode_path(u.image.path) for u in rows])
    elif any(new):
        sub = [u for u in rows if u.row is None]
        ids = put.sorted[np.argsort(put.order)]  # ids in update order
        sub_put = _Putter(np.asarray([i for i, u in zip(ids, rows) if u.row is None]))
        _put_text(g, "path", sub_put, [encode_path(u.image.path) for u in sub])
    _put_text(g, "error", put, [u.image.error.encode("utf-8", "replace") for u in rows])


def _write_local(fh: h5py.File, extractor: str, put: _Putter, rows: Sequence[RowUpdate],
                 ids: list[int], local: dict[str, list], changed: set[int]) -> None:
    """Append the kept cells of each computed row as a new segment of the flat arrays; a row
    recomputed only because the extractor gained a dataset keeps its (identical) segment."""
    for key, sets in local.items():
        kg = fh["local"][extractor][key]
        starts = np.full(len(rows), -1, np.int64)
        counts = np.zeros(len(rows), np.int32)
        grids = np.zeros((len(rows), 2), np.int32)
        end = kg["features"].shape[0]
        fresh = []
        for i, (u, rid, ls) in enumerate(zip(rows, ids, sets)):
            if u.state != STATE_COMPUTED or ls is None:
                continue
            old = int(kg["start"][rid]) if u.row is not None and rid not in changed else -1
            if old >= 0:
                starts[i], counts[i], grids[i] = old, kg["count"][rid], kg["grid"][rid]
            else:
                starts[i], counts[i], grids[i] = end, len(ls.features), ls.grid
                end += len(ls.features)
                fresh.append(ls)
        if fresh:
            for name in ("features", "coords"):
                data = np.concatenate([getattr(ls, name) for ls in fresh])
                ds = kg[name]
                old_end = ds.shape[0]
                ds.resize(end, axis=0)
                ds[old_end:end] = data
        put(kg["start"], starts)
        put(kg["count"], counts)
        put(kg["grid"], grids)


__all__ = ["StoreWriter", "RowUpdate", "create_store", "STORE_WIDE_NUMBERS", "local_groups",
           "STATUS_OK"]
