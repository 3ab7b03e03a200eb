"""How a commit's rows are laid into the store's datasets: the image table (facts, ragged paths and
errors), one value per row of a row-aligned dataset, appended local-feature segments, and the
revision counter a change bumps. The writer and merge share it; schema.py names the datasets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import h5py
import numpy as np

from .schema import IMAGE_COLUMNS, STATE_COMPUTED, ImageRow, encode_path


@dataclass
class RowUpdate:
    """One row of a commit: the file's facts and this extractor's outcome for it."""

    row: int | None  # None: a new row
    image: ImageRow
    state: int = STATE_COMPUTED  # the extractor's outcome (schema.STATE_*)
    error: str = ""  # why the extractor failed the row (extractor-level failures)


def bump_revision(group: h5py.Group) -> None:
    """Count one more change of a group (readers compare revisions to spot staleness)."""
    group.attrs["revision"] = int(group.attrs.get("revision", 0)) + 1


class RowPutter:
    """Writes one value per row into a row-aligned dataset, in id order (h5py needs
    increasing indices; a contiguous run is one slice). Shared by the writer and merge."""

    def __init__(self, ids: np.ndarray) -> None:
        self.order = np.argsort(ids, kind="stable")
        self.sorted = ids[self.order]
        uniq = np.unique(self.sorted)
        if len(uniq) != len(self.sorted):
            raise ValueError("a commit names the same row twice")
        self.contiguous = bool(len(self.sorted)) and \
            int(self.sorted[-1] - self.sorted[0]) + 1 == len(self.sorted)

    def __call__(self, ds: h5py.Dataset, values: np.ndarray) -> None:
        values = np.asarray(values)[self.order]
        if self.contiguous:
            write_rows(ds, int(self.sorted[0]), values)
        elif len(self.sorted):
            ds[self.sorted] = values


def write_rows(ds: h5py.Dataset, start: int, values: np.ndarray) -> None:
    """`ds[start:start + len(values)] = values` through HDF5's own call (h5py's selection
    machinery costs more than the write of a commit's few rows)."""
    values = np.ascontiguousarray(values, dtype=ds.dtype)
    if values.shape[1:] != ds.shape[1:] or start + len(values) > ds.shape[0] or start < 0:
        ds[start:start + len(values)] = values  # let h5py raise its usual error
        return
    if not len(values):
        return
    fspace = ds.id.get_space()
    fspace.select_hyperslab((start,) + (0,) * (values.ndim - 1), values.shape)
    ds.id.write(h5py.h5s.create_simple(values.shape), fspace, values)


def append_text(node, group: str, name: str, put: "RowPutter", texts: list[bytes]) -> None:
    """Append the bytes of each row's text and point its (start, len) at them."""
    data = node(f"{group}/{name}_data")
    end = data.shape[0]
    lengths = np.array([len(t) for t in texts], np.int64)
    starts = end + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    total = int(lengths.sum())
    if total:
        data.resize(end + total, axis=0)
        write_rows(data, end, np.frombuffer(b"".join(texts), np.uint8))
    put(node(f"{group}/{name}_start"), np.where(lengths > 0, starts, 0))
    put(node(f"{group}/{name}_len"), lengths.astype(np.int32))


def write_images(node, put: RowPutter, rows: Sequence[RowUpdate]) -> None:
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
        put(node(f"images/{name}"), cols[name])
    new = [u.row is None for u in rows]
    # a row's path never changes: write it for new rows only (rewrites keep their bytes)
    if all(new):
        append_text(node, "images", "path", put, [encode_path(u.image.path) for u in rows])
    elif any(new):
        sub = [u for u in rows if u.row is None]
        ids = put.sorted[np.argsort(put.order)]  # ids in update order
        sub_put = RowPutter(np.asarray([i for i, u in zip(ids, rows) if u.row is None]))
        append_text(node, "images", "path", sub_put, [encode_path(u.image.path) for u in sub])
    append_text(node, "images", "error", put,
              [u.image.error.encode("utf-8", "replace") for u in rows])


def write_local(node, extractor: str, put: RowPutter, rows: Sequence[RowUpdate],
                 ids: list[int], local: dict[str, list], changed: set[int]) -> None:
    """Append the kept cells of each computed row as a new segment of the flat arrays; a row
    recomputed only because the extractor gained a dataset keeps its (identical) segment."""
    for key, sets in local.items():
        kg = node(f"local/{extractor}/{key}")
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
                write_rows(ds, old_end, data)
        put(kg["start"], starts)
        put(kg["count"], counts)
        put(kg["grid"], grids)


__all__ = ["RowUpdate", "RowPutter", "write_rows", "append_text", "write_images",
           "write_local", "bump_revision"]
