"""The store's file layout: every dataset path, dtype, fill value and chunking, in one place.

Only the `imgdb.store` package reads or writes these paths. Every dataset is chunked and carries
HDF5's fletcher32 checksum, and nothing uses a variable-length type (their bytes would live in
the global heap, which has no checksum): text columns are ragged byte arrays (`<name>_data` plus
row-aligned `<name>_start` / `<name>_len`), so any file name the OS gives is stored losslessly,
and text attributes are fixed-length byte strings (`set_attr`), kept in the object headers,
which the file format version used here (`libver="latest"`) checksums like every other piece of
metadata (superblock, B-trees, heaps).

```
/                              attrs format, format_version, created, modified, rows
/images/                       row i = image id i (dense, never reused)
    size, mtime, sha, width, height, status, failure        (rows,)
    path_data u1, path_start i8, path_len i4                 os.fsencode(path)
    error_data u1, error_start i8, error_len i4              utf-8 reason
/descriptors/<extractor>/      attrs settings (JSON), created, revision
    state i1 (rows,)           0 pending, 1 computed, 2 failed (permanent), 3 failed (transient)
    error_data, error_start, error_len                       why this extractor failed a row
    <layer>/<pooling> f4 (rows, D)
/local/<extractor>/<key>/      features f2 (M, C), coords i2 (M, 2); start i8, count i4, grid i4
/local/<extractor>/verify.<k>/ the same with features u1 (M, 128): keypoints for verification
/models/<kind>/<descriptor>/v<N>/   arrays + attrs (JSON for nested values)
/indexes/<name>/               rows i8 (items,) + attrs
```
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
from dataclasses import dataclass, field
from typing import Iterator

import h5py
import numpy as np

FORMAT = "imgdb-store"
FORMAT_VERSION = 2
USERBLOCK = 512  # bytes before the HDF5 superblock: imgdb's commit header (see journal.py)

STATUS_OK, STATUS_FAILED, STATUS_MISSING, STATUS_LOST = 0, 1, 2, 3
STATUS_NAMES = {STATUS_OK: "ok", STATUS_FAILED: "failed", STATUS_MISSING: "missing",
                STATUS_LOST: "lost"}
#: Why a row failed: a permanent failure (the bytes are not a usable image) is not retried until
#: the file changes; a transient one (permission, memory, I/O) is retried by every rerun.
FAILURE_NONE, FAILURE_PERMANENT, FAILURE_TRANSIENT = 0, 1, 2

#: local sets whose name starts so hold verification keypoints (uint8 descriptors)
VERIFY_PREFIX = "verify."

#: Per-extractor state of a row.
STATE_PENDING, STATE_COMPUTED, STATE_FAILED, STATE_FAILED_TRANSIENT = 0, 1, 2, 3

# name -> (dtype, fill); fixed-size columns of /images
IMAGE_COLUMNS: dict[str, tuple[str, object]] = {
    "size": ("i8", 0),
    "mtime": ("f8", 0.0),
    "sha": ("S32", b""),
    "width": ("i4", 0),
    "height": ("i4", 0),
    "status": ("i1", STATUS_OK),
    "failure": ("i1", FAILURE_NONE),
}
IMAGE_TEXT = ("path", "error")

# Small chunks for row columns: a commit rewrites the partly filled last chunk of every
# row-aligned column (in place, so through the journal); 1024 rows keep that to a few KiB.
ROW_CHUNK = 1024
BYTES_CHUNK = 1 << 14


def now_iso() -> str:
    """UTC timestamp for provenance attributes."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def set_attr(obj, key: str, value) -> None:
    """Store an attribute; text (and JSON of lists/dicts) as a fixed-length UTF-8 byte string,
    which HDF5 keeps inside the checksummed object header (a `str` would go to the global heap,
    which has no checksum)."""
    if isinstance(value, (dict, list, tuple)):
        value = json.dumps(value)
    if isinstance(value, bytes) and not isinstance(value, np.bytes_):
        value = np.bytes_(value)
    elif isinstance(value, str):
        value = np.bytes_(value.encode("utf-8", "surrogateescape"))
    obj.attrs[key] = value


def attr_text(value) -> str:
    """A text attribute as str (fixed-length bytes, or a variable-length str of format 1)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


# ---------------------------------------------------------------------------------------------
# records


@dataclass
class ImageTable:
    """The `/images` table in memory (columns as arrays; row i is image id i)."""

    path: list[str] = field(default_factory=list)  # os.fsdecode'd: surrogates round-trip
    size: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    mtime: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    sha: np.ndarray = field(default_factory=lambda: np.zeros(0, "S32"))
    width: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    height: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    status: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    failure: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    error: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.path)

    def row_of(self) -> dict[str, int]:
        """Map path -> row id (rows lost in a repair have no path and are left out)."""
        return {p: i for i, p in enumerate(self.path) if p}


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
    failure: int = FAILURE_NONE


@dataclass(frozen=True)
class DescriptorInfo:
    """A stored descriptor: `EXTRACTOR/LAYER/POOLING`, its shape and dtype."""

    name: str
    extractor: str
    layer: str
    pooling: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class LocalInfo:
    """Local features kept by ingest: `EXTRACTOR/KEY` where KEY is `layer` or `layer:mask`."""

    extractor: str
    key: str
    channels: int
    images: int  # rows with features stored
    features: int  # stored rows in use
    bytes: int  # on disk (features + coords)

    @property
    def name(self) -> str:
        return f"{self.extractor}/{self.key}"

    @property
    def verify(self) -> bool:
        """Keypoints kept for geometric verification (not conv cells for codebooks)."""
        return self.key.startswith(VERIFY_PREFIX)


@dataclass(frozen=True)
class ModelInfo:
    """One stored model version and its provenance attributes."""

    kind: str
    descriptor: str
    version: str
    attrs: dict

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.descriptor}/{self.version}"

    @property
    def number(self) -> int:
        return int(self.version[1:])


@dataclass(frozen=True)
class IndexEntry:
    """An index registry entry: what the index file was built from."""

    name: str
    attrs: dict

    @property
    def file(self) -> str:
        return attr_text(self.attrs["file"])


# ---------------------------------------------------------------------------------------------
# paths


def encode_path(path: str | os.PathLike) -> bytes:
    """The OS's bytes of a path (surrogate escapes restored): what is stored."""
    return os.fsencode(path)


def decode_path(raw: bytes) -> str:
    """Stored bytes -> str that round-trips through os.fsencode (surrogateescape)."""
    return os.fsdecode(bytes(raw))


def descriptor_path(extractor: str, layer: str, pooling: str) -> str:
    return f"descriptors/{extractor}/{layer}/{pooling}"


def extractor_path(extractor: str) -> str:
    return f"descriptors/{extractor}"


def local_path(extractor: str, key: str) -> str:
    return f"local/{extractor}/{key}"


def model_group_path(kind: str, descriptor: str) -> str:
    return f"models/{kind}/{descriptor}"


def index_path(name: str) -> str:
    return f"indexes/{name}"


#: Reserved names inside an extractor group (everything else is a layer group).
EXTRACTOR_FIELDS = ("state", "error_data", "error_start", "error_len")


# ---------------------------------------------------------------------------------------------
# creating datasets


def _dataset(group: h5py.Group, name: str, shape: tuple, dtype, chunks: tuple, fill=None,
             maxshape: tuple | None = None) -> h5py.Dataset:
    kwargs = {"fillvalue": fill} if fill is not None else {}
    return group.create_dataset(name, shape=shape, maxshape=maxshape or (None,) + shape[1:],
                                dtype=dtype, chunks=chunks, fletcher32=True, **kwargs)


def create_ragged(group: h5py.Group, name: str, rows: int) -> None:
    """A text column: flat bytes plus row-aligned (start, len)."""
    _dataset(group, f"{name}_data", (0,), "u1", (BYTES_CHUNK,))
    _dataset(group, f"{name}_start", (rows,), "i8", (ROW_CHUNK,), 0)
    _dataset(group, f"{name}_len", (rows,), "i4", (ROW_CHUNK,), 0)


def create_layout(fh: h5py.File) -> None:
    """The groups and datasets of an empty store."""
    created = now_iso()
    set_attr(fh, "format", FORMAT)
    fh.attrs["format_version"] = FORMAT_VERSION
    set_attr(fh, "created", created)
    set_attr(fh, "modified", created)
    set_attr(fh, "store_id", secrets.token_hex(16))
    fh.attrs["rows"] = 0
    g = fh.create_group("images")
    for name, (dtype, fill) in IMAGE_COLUMNS.items():
        _dataset(g, name, (0,), dtype, (ROW_CHUNK,), fill)
    for name in IMAGE_TEXT:
        create_ragged(g, name, 0)
    for top in ("descriptors", "local", "models", "indexes"):
        fh.create_group(top)


def vector_chunk_rows(dim: int, itemsize: int = 4) -> int:
    """Rows per chunk of a (rows, dim) dataset: ~64 KiB chunks."""
    return max(1, min(1024, (1 << 16) // (itemsize * dim)))


def create_extractor(fh: h5py.File, extractor: str, settings: dict, rows: int) -> h5py.Group:
    g = fh["descriptors"].create_group(extractor)
    set_attr(g, "settings", json.dumps(settings, sort_keys=True))
    set_attr(g, "created", now_iso())
    g.attrs["revision"] = 0
    _dataset(g, "state", (rows,), "i1", (ROW_CHUNK,), STATE_PENDING)
    create_ragged(g, "error", rows)
    return g


def create_vectors(group: h5py.Group, name: str, rows: int, dim: int,
                   dtype: str = "float32") -> h5py.Dataset:
    itemsize = np.dtype(dtype).itemsize
    return _dataset(group, name, (rows, dim), dtype, (vector_chunk_rows(dim, itemsize), dim),
                    np.nan)


def verify_key(kind: str) -> str:
    """The local-set name of an extractor's verification keypoints of one kind (`verify.sift`)."""
    return VERIFY_PREFIX + kind


def local_dtype(key: str) -> str:
    """The feature dtype of a local set: uint8 SIFT descriptors for verification keypoints,
    float16 activations for conv cells."""
    return "u1" if key.startswith(VERIFY_PREFIX) else "f2"


def create_local(fh: h5py.File, extractor: str, key: str, channels: int, rows: int) -> h5py.Group:
    g = fh.require_group("local").require_group(extractor).create_group(key)
    dtype = local_dtype(key)
    item = np.dtype(dtype).itemsize
    _dataset(g, "features", (0, channels), dtype,
             (max(32, (1 << 16) // (item * channels)), channels))
    _dataset(g, "coords", (0, 2), "i2", (ROW_CHUNK, 2))
    _dataset(g, "start", (rows,), "i8", (ROW_CHUNK,), -1)
    _dataset(g, "count", (rows,), "i4", (ROW_CHUNK,), 0)
    _dataset(g, "grid", (rows, 2), "i4", (ROW_CHUNK, 2), 0)
    return g


def create_array(group: h5py.Group, name: str, data: np.ndarray) -> h5py.Dataset:
    """A model's or registry's array, chunked so that it carries a checksum."""
    data = np.asarray(data)
    if data.size == 0 or data.ndim == 0:
        return group.create_dataset(name, data=data)
    return group.create_dataset(name, data=data, chunks=True, fletcher32=True)


# ---------------------------------------------------------------------------------------------
# what is row-aligned


def extractor_names(fh: h5py.File) -> list[str]:
    return sorted(fh["descriptors"].keys()) if "descriptors" in fh else []


def local_groups(fh: h5py.File) -> Iterator[h5py.Group]:
    if "local" not in fh:
        return
    for ext in sorted(fh["local"].keys()):
        for key in sorted(fh["local"][ext].keys()):
            yield fh["local"][ext][key]


def vector_datasets(group: h5py.Group) -> Iterator[tuple[str, str, h5py.Dataset]]:
    """(layer, pooling, dataset) of an extractor group."""
    for layer in sorted(k for k in group.keys() if k not in EXTRACTOR_FIELDS):
        lg = group[layer]
        if isinstance(lg, h5py.Group):
            for pooling in sorted(lg.keys()):
                yield layer, pooling, lg[pooling]


def aligned_datasets(fh: h5py.File) -> Iterator[h5py.Dataset]:
    """Every dataset whose first axis is the image id."""
    g = fh["images"]
    for name in IMAGE_COLUMNS:
        yield g[name]
    for name in IMAGE_TEXT:
        yield g[f"{name}_start"]
        yield g[f"{name}_len"]
    for ext in extractor_names(fh):
        eg = fh["descriptors"][ext]
        for name in ("state", "error_start", "error_len"):
            yield eg[name]
        for _, _, ds in vector_datasets(eg):
            yield ds
    for lg in local_groups(fh):
        for name in ("start", "count", "grid"):
            yield lg[name]
