"""What a store's data must be beyond its checksums: shapes, types, value ranges, names.

A checksum proves that bytes are the bytes written, not that they were written by imgdb: a
crafted or hand-edited file passes every checksum. Each rule here names what is wrong in one
line; readers call the cheap ones (metadata only) before they use a dataset, `check` calls all
of them, and `repair` drops or recomputes what they reject.
"""

from __future__ import annotations

import numpy as np

from .schema import STATUS_NAMES

#: Vector dtype kinds a descriptor may hold: imgdb writes float32; any float is read as it.
VECTOR_KINDS = ("f",)


def rows_problem(declared: int, table: int) -> str | None:
    """The root attribute `rows` against the image table's length."""
    if declared < 0 or declared != table:
        return f"its attribute rows says {declared}, its image table holds {table} rows"
    return None


def vectors_problem(shape: tuple, dtype: np.dtype, rows: int) -> str | None:
    """A descriptor's dataset: (rows, dim) floating point, dim >= 1."""
    if len(shape) != 2 or shape[1] < 1:
        return f"holds an array of shape {tuple(shape)}, not (images, dims)"
    if np.dtype(dtype).kind not in VECTOR_KINDS:
        return f"holds {np.dtype(dtype)} values, not floating-point vectors"
    if shape[0] != rows:
        return f"has {shape[0]} rows, the store {rows}"
    return None


def unknown_status(status: np.ndarray) -> np.ndarray:
    """Mask of image rows whose status is no status imgdb writes."""
    return ~np.isin(status, np.fromiter(STATUS_NAMES, np.int64))


def file_name_problem(name: str) -> str | None:
    """A file a registry entry names must be a plain name beside the store."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        return f"names {name!r}, not a file beside the store"
    return None


def index_rows_problem(rows: np.ndarray, n: int) -> str | None:
    """An index's item -> image id map: 1-D, ids in range, each image at most once."""
    rows = np.asarray(rows)
    if rows.ndim != 1 or rows.dtype.kind not in "iu":
        return f"its rows are an array of shape {rows.shape} ({rows.dtype}), not image ids"
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        return f"its rows name image ids outside 0..{n - 1}"
    if len(rows) and np.bincount(rows, minlength=1).max() > 1:  # linear: ids are < n
        return "its rows name an image more than once"
    return None


def model_problem(arrays: dict[str, tuple], attrs: dict) -> str | None:
    """A PCA model's arrays against its own attributes: mean (D,), components (dims, D)."""
    if "components" not in arrays or "mean" not in arrays:
        return None  # not a PCA model (codebooks have their own arrays)
    comp, mean = arrays["components"], arrays["mean"]
    dims, dim = attrs.get("dims"), attrs.get("input_dim")
    if len(comp) != 2 or len(mean) != 1 or comp[1] != mean[0]:
        return f"components {tuple(comp)} and mean {tuple(mean)} do not fit each other"
    if dim is not None and int(dim) != mean[0]:
        return f"has {mean[0]} input dims, its attributes say {dim}"
    if dims is not None and int(dims) != comp[0]:
        return f"has {comp[0]} components, its attributes say {dims}"
    return None


__all__ = ["rows_problem", "vectors_problem", "unknown_status", "file_name_problem",
           "index_rows_problem", "model_problem"]
