"""The HDF5 store: image table, raw descriptors per extractor/layer/pooling, models, index registry.

Crash safety comes from how the file is written, not from HDF5 itself: a writer opens the file,
appends a batch of rows, and closes it again (a *commit*). Between commits the file on disk is a
closed, consistent HDF5 file, so a `kill -9` at any moment outside the few milliseconds of a
commit leaves nothing to repair. Inside a commit, rows are written descriptors first and the
image paths last; the length of `/images/path` is the number of committed rows, and opening for
write trims (or pads) every row-aligned dataset to it, so a torn commit is rolled back and the
rerun redoes those images. One writer at a time is enforced with a lock file (`FILE.lock`).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from .errors import UserError

FORMAT = "imgdb-store"
FORMAT_VERSION = 1

STATUS_OK, STATUS_FAILED, STATUS_MISSING = 0, 1, 2
STATUS_NAMES = {STATUS_OK: "ok", STATUS_FAILED: "failed", STATUS_MISSING: "missing"}

_STR = h5py.string_dtype("utf-8")
# name -> (dtype, fill value); the column order is the write order, `path` (the commit mark) last
IMAGE_COLUMNS: dict[str, tuple[object, object]] = {
    "size": (np.int64, 0),
    "mtime": (np.float64, 0.0),
    "sha": ("S32", b""),
    "width": (np.int32, 0),
    "height": (np.int32, 0),
    "status": (np.int8, STATUS_OK),
    "error": (_STR, ""),
    "path": (_STR, ""),
}


class StoreError(UserError):
    """The store is missing, foreign, locked or damaged."""


def now_iso() -> str:
    """UTC timestamp for provenance attributes."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class ImageTable:
    """The `/images` table in memory (columns as numpy arrays; row i is image id i)."""

    path: list[str] = field(default_factory=list)
    size: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    mtime: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    sha: np.ndarray = field(default_factory=lambda: np.zeros(0, "S32"))
    width: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    height: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    status: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    error: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.path)

    def row_of(self) -> dict[str, int]:
        """Map path -> row id."""
        return {p: i for i, p in enumerate(self.path)}


@dataclass
class ImageRow:
    """One image's metadata as written by ingest."""

    path: str
    size: int
    mtime: float
    sha: str
    width: int
    height: int
    status: int
    error: str = ""


@dataclass(frozen=True)
class DescriptorInfo:
    """A stored descriptor: `EXTRACTOR/LAYER/POOLING`, its shape and dtype."""

    name: str
    extractor: str
    layer: str
    pooling: str
    shape: tuple[int, ...]
    dtype: str


def _decode(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


# ---------------------------------------------------------------------------------------------
# reading


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise StoreError(f"store {path} does not exist; create it with: imgdb ingest PHOTOS --db {path}")


@contextmanager
def open_read(path: str | Path) -> Iterator[h5py.File]:
    """Open a store read-only (works while a writer is between commits)."""
    path = Path(path)
    _check_exists(path)
    try:
        fh = h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise StoreError(f"cannot open store {path}: {str(exc).splitlines()[0]}") from None
    try:
        if fh.attrs.get("format") != FORMAT:
            raise StoreError(f"{path} is an HDF5 file but not an imgdb store")
        yield fh
    finally:
        fh.close()


def read_images(fh: h5py.File) -> ImageTable:
    """Load the whole image table (committed rows only)."""
    g = fh["images"]
    n = min(g[name].shape[0] for name in IMAGE_COLUMNS)
    return ImageTable(
        path=_decode(g["path"][:n]),
        size=g["size"][:n],
        mtime=g["mtime"][:n],
        sha=g["sha"][:n],
        width=g["width"][:n],
        height=g["height"][:n],
        status=g["status"][:n],
        error=_decode(g["error"][:n]),
    )


def image_count(fh: h5py.File) -> int:
    """Committed rows."""
    return int(fh["images/path"].shape[0])


def list_extractors(fh: h5py.File) -> list[str]:
    return sorted(fh["descriptors"].keys()) if "descriptors" in fh else []


def extractor_attrs(fh: h5py.File, extractor: str) -> dict:
    """The extraction settings recorded with an extractor."""
    if extractor not in fh.get("descriptors", {}):
        raise StoreError(f"the store has no extractor {extractor!r}; run imgdb info to list them")
    return json.loads(fh["descriptors"][extractor].attrs["settings"])


def list_descriptors(fh: h5py.File) -> list[DescriptorInfo]:
    """Every stored descriptor, named `EXTRACTOR/LAYER/POOLING`."""
    out = []
    for ext in list_extractors(fh):
        g = fh["descriptors"][ext]
        for layer in sorted(k for k in g.keys() if isinstance(g[k], h5py.Group)):
            for pooling in sorted(g[layer].keys()):
                ds = g[layer][pooling]
                out.append(DescriptorInfo(f"{ext}/{layer}/{pooling}", ext, layer, pooling,
                                          tuple(ds.shape), str(ds.dtype)))
    return out


def resolve_descriptor(fh: h5py.File, name: str) -> DescriptorInfo:
    """Find a descriptor by its full name (or a unique suffix like `pool5/crow`)."""
    infos = list_descriptors(fh)
    exact = [d for d in infos if d.name == name]
    if exact:
        return exact[0]
    tail = name.strip("/")  # a suffix after a "/" or after the "+" of an encoding's name
    matches = [d for d in infos if d.name.endswith("/" + tail) or d.name.endswith("+" + tail)]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(d.name for d in infos[:6]) + (" ..." if len(infos) > 6 else "")
    if not matches:
        raise StoreError(f"the store has no descriptor {name!r}; stored: {known or 'none'}")
    raise StoreError(f"descriptor {name!r} is ambiguous; use one of: "
                     + ", ".join(d.name for d in matches))


def valid_mask(fh: h5py.File, extractor: str) -> np.ndarray:
    """Rows that are ok images with this extractor's vectors computed."""
    n = image_count(fh)
    computed = fh["descriptors"][extractor]["computed"][:n].astype(bool)
    return computed & (fh["images/status"][:n] == STATUS_OK)


def read_descriptor(fh: h5py.File, info: DescriptorInfo) -> tuple[np.ndarray, np.ndarray]:
    """(vectors (n, D) float32, valid mask (n,)) of a whole descriptor."""
    n = image_count(fh)
    vectors = fh["descriptors"][info.extractor][info.layer][info.pooling][:n]
    return vectors.astype(np.float32, copy=False), valid_mask(fh, info.extractor)


def extractor_revision(fh: h5py.File, extractor: str) -> int:
    """Counter bumped whenever this extractor's set of valid rows or their vectors may change.

    Indexes record it at build time: comparing it is O(1) however big the store is.
    """
    return int(fh["descriptors"][extractor].attrs.get("revision", 0))


def _bump(group: h5py.Group) -> None:
    group.attrs["revision"] = int(group.attrs.get("revision", 0)) + 1


def read_column(fh: h5py.File, name: str, rows: np.ndarray | None = None) -> list | np.ndarray:
    """One `/images` column, whole or at some rows (strings decoded)."""
    ds = fh["images"][name]
    if rows is None:
        values = ds[:image_count(fh)]
    else:
        uniq, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        values = ds[uniq][inverse] if len(uniq) else ds[:0]
    return _decode(values) if ds.dtype.kind == "O" else np.asarray(values)


def training_vectors(db: str | Path, name: str) -> tuple[np.ndarray, str]:
    """Valid vectors of a descriptor in a (possibly other) store, and that store's content hash
    for it: what a model is fitted on."""
    with open_read(db) as fh:
        try:
            info = resolve_descriptor(fh, name)
        except UserError:
            raise StoreError(f"{db} has no descriptor {name}; ingest it with the same extractor "
                             f"settings to fit on it") from None
        x, valid = read_descriptor(fh, info)
        return x[valid], content_hash(fh, info.extractor)


def content_hash(fh: h5py.File, extractor: str | None = None) -> str:
    """Digest of the image table (paths, file digests, statuses) and of which rows have vectors.

    With `extractor`, only that extractor's vectors count: what models and indexes built on its
    descriptors depend on (ingesting another extractor does not make them stale).
    """
    h = hashlib.blake2b(digest_size=16)
    n = image_count(fh)
    for name in ("path", "sha", "status"):
        col = fh["images"][name][:n]
        h.update(b"\0".join(v if isinstance(v, bytes) else str(v).encode() for v in col)
                 if col.dtype.kind == "O" else np.ascontiguousarray(col).tobytes())
    for ext in ([extractor] if extractor else list_extractors(fh)):
        h.update(ext.encode())
        h.update(np.ascontiguousarray(fh["descriptors"][ext]["computed"][:n]).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# writing


class StoreLock:
    """An exclusive advisory lock beside the store; released by the OS if the process dies."""

    def __init__(self, path: Path) -> None:
        self.path = _lock_path(path)
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = os.read(fd, 64).decode().strip() or "?"
            finally:
                os.close(fd)
            raise StoreError(f"store {self.path.with_suffix('')} is locked by PID {pid} "
                             f"(another imgdb command is writing to it); wait for it to finish")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)
                self.fd = None


def _create_empty(path: Path) -> None:
    tmp = path.with_name(path.name + ".creating")
    # superblock v0 (libver earliest) has no "open for write" flag: after a kill -9 the file
    # opens again without h5clear (v2/v3 superblocks would refuse until the flag is cleared)
    with h5py.File(tmp, "w", libver="earliest") as fh:
        fh.attrs["format"] = FORMAT
        fh.attrs["format_version"] = FORMAT_VERSION
        fh.attrs["created"] = now_iso()
        g = fh.create_group("images")
        for name, (dtype, fill) in IMAGE_COLUMNS.items():
            g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(4096,),
                             fillvalue=fill if dtype is not _STR else None)
        fh.create_group("descriptors")
        fh.create_group("local")
        fh.create_group("models")
        fh.create_group("indexes")
    os.replace(tmp, path)


def _aligned_datasets(fh: h5py.File) -> Iterator[h5py.Dataset]:
    """Every dataset whose rows are image ids."""
    for name in IMAGE_COLUMNS:
        yield fh["images"][name]
    for ext in list_extractors(fh):
        g = fh["descriptors"][ext]
        yield g["computed"]
        for layer in g.keys():
            if isinstance(g[layer], h5py.Group):
                for pooling in g[layer].keys():
                    yield g[layer][pooling]
    for g in _local_groups(fh):
        for name in LOCAL_ALIGNED:
            yield g[name]


# ---------------------------------------------------------------------------------------------
# local features: /local/<extractor>/<key>/{features (M, C) f16, coords (M, 2) i16} flat, plus
# row-aligned start (n,) i64 (-1: none stored), count (n,) i32 and grid (n, 2) i32 = (W, H)

LOCAL_ALIGNED = ("start", "count", "grid")


@dataclass(frozen=True)
class LocalInfo:
    """Stored local features of one extractor and key (`LAYER` or `LAYER:MASK`)."""

    extractor: str
    key: str
    channels: int
    images: int  # rows with features stored
    features: int  # kept cells, all rows
    bytes: int  # on disk, features + coords

    @property
    def name(self) -> str:
        return f"{self.extractor}/{self.key}"


def _local_groups(fh: h5py.File) -> Iterator[h5py.Group]:
    if "local" not in fh:
        return
    for ext in sorted(fh["local"].keys()):
        for key in sorted(fh["local"][ext].keys()):
            yield fh["local"][ext][key]


def list_local(fh: h5py.File) -> list[LocalInfo]:
    """Every stored local-feature set with its size."""
    out = []
    n = image_count(fh)
    for g in _local_groups(fh):
        count = g["count"][:n]
        stored = g["start"][:n] >= 0
        out.append(LocalInfo(g.parent.name.split("/")[-1], g.name.split("/")[-1],
                             int(g["features"].shape[1]), int(stored.sum()),
                             int(count[stored].sum()),
                             int(g["features"].id.get_storage_size() + g["coords"].id.get_storage_size())))
    return out


def resolve_local(fh: h5py.File, name: str) -> LocalInfo:
    """Find local features by `EXTRACTOR/KEY` or a unique suffix such as `conv5_3:max`."""
    infos = list_local(fh)
    matches = [i for i in infos if i.name == name] or \
        [i for i in infos if i.name.endswith("/" + name.strip("/")) or i.key == name]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(i.name for i in infos) or "none (ingest with --keep-local LAYER[:MASK])"
    if not matches:
        raise StoreError(f"the store has no local features {name!r}; stored: {known}")
    raise StoreError(f"local features {name!r} are ambiguous; use one of: "
                     + ", ".join(i.name for i in matches))


def local_spans(fh: h5py.File, info: LocalInfo) -> tuple[np.ndarray, np.ndarray]:
    """(start (n,), count (n,)) of every committed row; start -1 where nothing is stored."""
    n = image_count(fh)
    g = fh["local"][info.extractor][info.key]
    return g["start"][:n], g["count"][:n]


def iter_local(fh: h5py.File, info: LocalInfo, rows: Sequence[int],
               block: int = 1 << 18) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(row, features (N, C) float16, coords (N, 2)) for each row that has local features, read
    in large contiguous slices (one HDF5 read per ~`block` features, not one per image)."""
    g = fh["local"][info.extractor][info.key]
    start, count = local_spans(fh, info)
    rows = [int(r) for r in rows if start[r] >= 0]
    rows.sort(key=lambda r: start[r])
    i = 0
    while i < len(rows):
        j, lo, hi = i, int(start[rows[i]]), int(start[rows[i]] + count[rows[i]])
        while j + 1 < len(rows) and max(hi, start[rows[j + 1]] + count[rows[j + 1]]) - lo <= block:
            j += 1
            hi = max(hi, int(start[rows[j]] + count[rows[j]]))
        feats, coords = g["features"][lo:hi], g["coords"][lo:hi]
        for r in rows[i:j + 1]:
            a = int(start[r]) - lo
            yield r, feats[a:a + int(count[r])], coords[a:a + int(count[r])]
        i = j + 1


class StoreWriter:
    """The single writer of a store. Holds the lock; every `commit` is open-append-close."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path)
        if not create:
            _check_exists(self.path)
        if self.path.exists() and self.path.is_dir():
            raise StoreError(f"--db {self.path} is a directory; give a file name such as photos.h5")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = StoreLock(self.path)
        self.lock.acquire()
        try:
            if not self.path.exists():
                _create_empty(self.path)
            with self._open() as fh:
                if fh.attrs.get("format") != FORMAT:
                    raise StoreError(f"{self.path} is an HDF5 file but not an imgdb store")
                self._reconcile(fh)
        except BaseException:
            self.lock.release()
            raise

    @contextmanager
    def _open(self) -> Iterator[h5py.File]:
        try:
            fh = h5py.File(self.path, "a", locking=False)
        except OSError as exc:
            raise StoreError(f"cannot open store {self.path} for writing: "
                             f"{str(exc).splitlines()[0]}") from None
        try:
            yield fh
        finally:
            fh.close()

    @staticmethod
    def _reconcile(fh: h5py.File) -> None:
        """Trim or pad every row-aligned dataset to the committed row count (undo a torn commit)."""
        n = image_count(fh)
        for ds in _aligned_datasets(fh):
            if ds.shape[0] != n:
                ds.resize(n, axis=0)
        for g in _local_groups(fh):  # flat arrays end where the last committed segment ends
            start, count = g["start"][:n], g["count"][:n]
            end = int((start + count)[start >= 0].max()) if (start >= 0).any() else 0
            for name in ("features", "coords"):
                if g[name].shape[0] != end:
                    g[name].resize(end, axis=0)

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reads under the lock -------------------------------------------------------------
    def images(self) -> ImageTable:
        with self._open() as fh:
            return read_images(fh)

    def computed(self, extractor: str) -> np.ndarray:
        with self._open() as fh:
            g = fh["descriptors"].get(extractor)
            n = image_count(fh)
            return g["computed"][:n].astype(bool) if g is not None else np.zeros(n, bool)

    # -- schema -----------------------------------------------------------------------------
    def ensure_extractor(self, extractor: str, settings: dict,
                         dims: dict[tuple[str, str], int], dtype: str = "float32",
                         local: dict[str, int] | None = None) -> None:
        """Create the extractor's group and datasets (rows padded with NaN, computed = 0), and
        its local-feature groups (`local`: key -> channels)."""
        with self._open() as fh:
            n = image_count(fh)
            g = fh["descriptors"].get(extractor)
            if g is None:
                g = fh["descriptors"].create_group(extractor)
                g.attrs["settings"] = json.dumps(settings, sort_keys=True)
                g.attrs["created"] = now_iso()
                g.create_dataset("computed", shape=(n,), maxshape=(None,), dtype=np.uint8,
                                 chunks=(4096,), fillvalue=0)
            else:
                old = json.loads(g.attrs["settings"])
                merged = dict(old)
                merged["layers"] = sorted(set(old.get("layers", [])) | set(settings["layers"]))
                merged["poolings"] = sorted(set(old.get("poolings", [])) | set(settings["poolings"]))
                merged["keep_local"] = sorted(set(old.get("keep_local", []))
                                              | set(settings.get("keep_local", [])))
                g.attrs["settings"] = json.dumps(merged, sort_keys=True)
            added = False
            for (layer, pooling), dim in dims.items():
                lg = g.require_group(layer)
                if pooling not in lg:
                    rows = max(1, min(1024, (1 << 16) // (4 * dim)))  # ~64 KiB chunks
                    lg.create_dataset(pooling, shape=(n, dim), maxshape=(None, dim), dtype=dtype,
                                      chunks=(rows, dim), fillvalue=np.nan)
                    added = True
            for key, channels in (local or {}).items():
                lg = fh.require_group("local").require_group(extractor)
                if key in lg:
                    continue
                kg = lg.create_group(key)
                rows = max(256, (1 << 17) // (2 * channels))  # ~128 KiB chunks
                kg.create_dataset("features", shape=(0, channels), maxshape=(None, channels),
                                  dtype=np.float16, chunks=(rows, channels))
                kg.create_dataset("coords", shape=(0, 2), maxshape=(None, 2), dtype=np.int16,
                                  chunks=(4096, 2))
                kg.create_dataset("start", shape=(n,), maxshape=(None,), dtype=np.int64,
                                  chunks=(4096,), fillvalue=-1)
                kg.create_dataset("count", shape=(n,), maxshape=(None,), dtype=np.int32,
                                  chunks=(4096,), fillvalue=0)
                kg.create_dataset("grid", shape=(n, 2), maxshape=(None, 2), dtype=np.int32,
                                  chunks=(4096, 2), fillvalue=0)
                added = True
            if added and n:
                # `computed` covers every dataset of the extractor: new ones need all rows again
                g["computed"][:] = 0
                _bump(g)

    # -- data ---------------------------------------------------------------------------------
    def commit(self, extractor: str | None, rows: list[tuple[int | None, ImageRow]],
               vectors: dict[tuple[str, str], np.ndarray] | None,
               file_changed: Sequence[int] = (), local: dict[str, list] | None = None) -> list[int]:
        """Write a batch: rows with id None are appended, others overwritten in place.

        `vectors[(layer, pooling)]` has one row per entry of `rows` (NaN rows for failed images).
        `file_changed` lists existing rows whose file changed on disk: other extractors' vectors
        of those rows are outdated and marked not computed. `local[key]` has one LocalSet (or
        None) per entry of `rows`; they are appended to the flat arrays (a rewritten row gets a
        new segment). Returns the row ids used. Order of writes: local features, descriptors,
        image columns, `path` last.
        """
        if not rows:
            return []
        with self._open() as fh:
            n = image_count(fh)
            ids: list[int] = []
            next_id = n
            for row_id, _ in rows:
                if row_id is None:
                    ids.append(next_id)
                    next_id += 1
                else:
                    ids.append(row_id)
            new_n = next_id
            ids_arr = np.asarray(ids)
            for ds in _aligned_datasets(fh):
                if ds.shape[0] < new_n and ds.name.split("/")[-1] != "path":
                    ds.resize(new_n, axis=0)
            order = np.argsort(ids_arr, kind="stable")
            sorted_ids = ids_arr[order]
            contiguous = len(sorted_ids) and sorted_ids[-1] - sorted_ids[0] + 1 == len(sorted_ids)

            def put(ds: h5py.Dataset, values: np.ndarray) -> None:
                values = values[order]
                if contiguous:
                    ds[int(sorted_ids[0]):int(sorted_ids[-1]) + 1] = values
                else:
                    ds[sorted_ids] = values  # h5py needs increasing indices

            if extractor is not None and local:
                changed_set = set(int(r) for r in file_changed)
                for key, sets in local.items():
                    kg = fh["local"][extractor][key]
                    starts = np.full(len(rows), -1, np.int64)
                    counts = np.zeros(len(rows), np.int32)
                    grids = np.zeros((len(rows), 2), np.int32)
                    end = kg["features"].shape[0]
                    # a row recomputed only because the extractor gained a dataset keeps its
                    # stored cells (identical); a changed file or a first time gets a segment
                    old_start = {rid: int(kg["start"][rid]) for rid, _ in rows
                                 if rid is not None and rid < kg["start"].shape[0]
                                 and rid not in changed_set}
                    kept = [(i, ls) for i, ((rid, r), ls) in enumerate(zip(rows, sets))
                            if ls is not None and r.status == STATUS_OK
                            and old_start.get(rid, -1) < 0]
                    for i, (rid, r) in enumerate(rows):
                        if old_start.get(rid, -1) >= 0 and r.status == STATUS_OK:
                            starts[i] = old_start[rid]
                            counts[i] = kg["count"][rid]
                            grids[i] = kg["grid"][rid]
                    for i, ls in kept:
                        starts[i], counts[i], grids[i] = end, len(ls.features), ls.grid
                        end += len(ls.features)
                    if kept:
                        for name in ("features", "coords"):
                            data = np.concatenate([getattr(ls, name) for _, ls in kept])
                            ds = kg[name]
                            old = ds.shape[0]
                            ds.resize(end, axis=0)
                            ds[old:end] = data
                    put(kg["start"], starts)
                    put(kg["count"], counts)
                    put(kg["grid"], grids)
            if extractor is not None:
                g = fh["descriptors"][extractor]
                ok = np.array([r.status == STATUS_OK for _, r in rows])
                for (layer, pooling), vec in (vectors or {}).items():
                    vec = np.asarray(vec, dtype=g[layer][pooling].dtype)
                    vec[~ok] = np.nan
                    put(g[layer][pooling], vec)
                put(g["computed"], ok.astype(np.uint8))
                _bump(g)
            changed = np.array(sorted(set(file_changed)), dtype=np.int64)
            if len(changed):  # files changed on disk: other extractors' vectors are outdated
                for other in list_extractors(fh):
                    if other != extractor:
                        og = fh["descriptors"][other]
                        if og["computed"][changed].any():
                            og["computed"][changed] = 0
                            _bump(og)
            cols = {
                "size": np.array([r.size for _, r in rows], np.int64),
                "mtime": np.array([r.mtime for _, r in rows], np.float64),
                "sha": np.array([r.sha.encode() for _, r in rows], "S32"),
                "width": np.array([r.width for _, r in rows], np.int32),
                "height": np.array([r.height for _, r in rows], np.int32),
                "status": np.array([r.status for _, r in rows], np.int8),
                "error": np.array([r.error for _, r in rows], dtype=object),
                "path": np.array([r.path for _, r in rows], dtype=object),
            }
            for name in IMAGE_COLUMNS:  # `path` last: its length is the commit mark
                ds = fh["images"][name]
                if ds.shape[0] < new_n:
                    ds.resize(new_n, axis=0)
                put(ds, cols[name])
            fh.attrs["modified"] = now_iso()
        return ids

    def set_status(self, row_ids: list[int], status: int, error: str = "") -> None:
        """Mark rows (e.g. files deleted from disk as missing) without touching descriptors."""
        if not row_ids:
            return
        with self._open() as fh:
            idx = np.array(sorted(row_ids))
            fh["images/status"][idx] = status
            fh["images/error"][idx] = np.array([error] * len(idx), dtype=object)
            fh.attrs["modified"] = now_iso()
            for ext in list_extractors(fh):
                _bump(fh["descriptors"][ext])

    @contextmanager
    def file(self) -> Iterator[h5py.File]:
        """Direct access for model/index writers (under the lock)."""
        with self._open() as fh:
            yield fh
