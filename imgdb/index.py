"""Annoy indexes registered in the store, and exact (brute-force) search.

An index file lives beside the store (`STORE.h5.<name>.ann`); the registry `/indexes/<name>` says
what it was built from (descriptor, model version, store content hash, dims, trees, seed, items,
file size and digest) and maps Annoy item ids to image ids. Files are written under a temporary
name and renamed; the registry entry is written after the rename, so an interrupted build leaves
no registered index and no half file in use.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from .digest import file_digest
from .errors import UserError
from .models import load_pca, resolve_model
from .store import (StoreWriter, extractor_revision, image_count, now_iso, resolve_descriptor,
                    valid_mask)
from .whitening import Identity

DEFAULT_TREES = 50
METRIC = "angular"  # on unit vectors: distance^2 = 2 - 2 cos


@dataclass(frozen=True)
class IndexInfo:
    """A registry entry plus whether it can still be trusted."""

    name: str
    attrs: dict
    stale: str | None  # None when current, else the reason

    @property
    def file(self) -> str:
        return self.attrs["file"]


def post_processor(fh: h5py.File, descriptor: str, model: str | None):
    """The transform named by `model` ('none' or a pca version) and its full model id."""
    if model in (None, "", "none", "raw"):
        return Identity(), "none"
    m = resolve_model(fh, "pca", descriptor, model)
    return load_pca(fh, m), m.id


def default_index_name(descriptor: str, model_id: str) -> str:
    version = model_id.rsplit("/", 1)[-1] if model_id != "none" else "raw"
    return f"{descriptor.replace('/', '.')}.{version}"


def index_path(db: Path, name: str) -> Path:
    return db.with_name(f"{db.name}.{name}.ann")


def iter_valid(fh: h5py.File, descriptor: str, chunk: int = 65536
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row ids, raw vectors) of the valid rows, in chunks (flat memory on big stores)."""
    info = resolve_descriptor(fh, descriptor)
    valid = valid_mask(fh, info.extractor)
    ds = fh["descriptors"][info.extractor][info.layer][info.pooling]
    n = image_count(fh)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        rows = np.flatnonzero(valid[start:stop]) + start
        if len(rows):
            yield rows, ds[start:stop][rows - start].astype(np.float32)


def build_index(db: Path, descriptor: str, model: str | None, name: str | None = None,
                trees: int = DEFAULT_TREES, seed: int = 0) -> IndexInfo:
    """Build (or rebuild) an Annoy index of a descriptor under a model; register it."""
    from annoy import AnnoyIndex

    with StoreWriter(db, create=False) as writer:
        with writer.file() as fh:
            info = resolve_descriptor(fh, descriptor)
            transform, model_id = post_processor(fh, info.name, model)
            name = name or default_index_name(info.name, model_id)
            path = index_path(db, name)
            for stale_tmp in path.parent.glob(path.name + ".tmp*"):
                stale_tmp.unlink(missing_ok=True)  # leftovers of a killed build
            started = time.perf_counter()
            index = None
            rows_all = []
            for rows, raw in iter_valid(fh, info.name):
                vecs = transform.transform(raw)
                if index is None:
                    index = AnnoyIndex(vecs.shape[1], METRIC)
                    index.set_seed(seed)
                for j, v in enumerate(vecs.tolist(), start=sum(len(r) for r in rows_all)):
                    index.add_item(j, v)
                rows_all.append(rows)
            if index is None:
                raise UserError(f"descriptor {info.name} has no vectors to index; run imgdb ingest")
            dims = index.f
            revision = extractor_revision(fh, info.extractor)
        index.build(trees, n_jobs=1)  # one thread: the same trees for the same seed
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        index.save(str(tmp))
        index.unload()
        os.replace(tmp, path)
        st = path.stat()
        attrs = {
            "file": path.name, "descriptor": info.name, "model": model_id, "dims": int(dims),
            "metric": METRIC, "trees": int(trees), "seed": int(seed),
            "items": int(sum(len(r) for r in rows_all)), "extractor_revision": revision,
            "file_bytes": int(st.st_size), "file_mtime": float(st.st_mtime),
            "file_hash": file_digest(path), "build_seconds": round(time.perf_counter() - started, 3),
            "created": now_iso(),
        }
        with writer.file() as fh:
            reg = fh.require_group("indexes")
            if name in reg:
                del reg[name]
            g = reg.create_group(name)
            g.create_dataset("rows", data=np.concatenate(rows_all).astype(np.int64))
            for k, v in attrs.items():
                g.attrs[k] = v
            return IndexInfo(name, attrs, None)


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


def check_index(fh: h5py.File, db: Path, name: str, full_hash: bool = False) -> IndexInfo:
    """Registry entry with its staleness: store changed, model removed, file missing/changed.

    Cheap (no pass over the data) unless `full_hash` asks to re-digest the index file.
    """
    reg = fh.get("indexes")
    if reg is None or name not in reg:
        known = ", ".join(reg.keys()) if reg is not None and len(reg) else "none"
        raise UserError(f"the store has no index {name!r} (indexes: {known}); build one with: "
                        f"imgdb index build --db {db} --descriptor DESCRIPTOR")
    attrs = {k: _plain(v) for k, v in reg[name].attrs.items()}
    stale = None
    path = db.with_name(attrs["file"])
    extractor = attrs["descriptor"].split("/")[0]
    if not path.exists():
        stale = f"index file {path.name} is missing"
    elif attrs["model"] != "none" and not _model_exists(fh, attrs["model"]):
        stale = f"its model {attrs['model']} was removed"
    elif extractor_revision(fh, extractor) != attrs.get("extractor_revision"):
        stale = "the store changed since it was built (images added, changed or removed)"
    else:
        st = path.stat()
        if st.st_size != attrs["file_bytes"] or (full_hash and file_digest(path) != attrs["file_hash"]):
            stale = f"index file {path.name} was modified"
    return IndexInfo(name, attrs, stale)


def _model_exists(fh: h5py.File, model_id: str) -> bool:
    g = fh.get(f"models/{model_id}")
    return g is not None and g.attrs.get("complete", 0) == 1


def list_indexes(fh: h5py.File, db: Path) -> list[IndexInfo]:
    return [check_index(fh, db, name) for name in (fh["indexes"].keys() if "indexes" in fh else [])]


def rebuild_command(db: Path, info: IndexInfo) -> str:
    model = info.attrs["model"].rsplit("/", 1)[-1] if info.attrs["model"] != "none" else "none"
    return (f"imgdb index build --db {db} --descriptor {info.attrs['descriptor']} --pca {model} "
            f"--name {info.name} --trees {info.attrs['trees']} --seed {info.attrs['seed']}")


def remove_index(db: Path, name: str) -> None:
    with StoreWriter(db, create=False) as writer:
        with writer.file() as fh:
            info = check_index(fh, db, name)
            del fh["indexes"][name]
        db.with_name(info.file).unlink(missing_ok=True)


def topk_exact(queries: np.ndarray, fh: h5py.File, descriptor: str, transform, k: int
               ) -> list[list[tuple[int, float]]]:
    """Brute-force cosine top-k of every query over all valid stored vectors, in one streamed pass."""
    nq = len(queries)
    best_rows = np.zeros((nq, 0), np.int64)
    best_sims = np.zeros((nq, 0), np.float32)
    for rows, raw in iter_valid(fh, descriptor):
        sims = np.concatenate([best_sims, queries @ transform.transform(raw).T], axis=1)
        cand = np.concatenate([best_rows, np.broadcast_to(rows, (nq, len(rows)))], axis=1)
        keep = min(k, sims.shape[1])
        part = np.argpartition(-sims, keep - 1, axis=1)[:, :keep] if keep < sims.shape[1] \
            else np.broadcast_to(np.arange(sims.shape[1]), (nq, sims.shape[1]))
        best_sims = np.take_along_axis(sims, part, axis=1)
        best_rows = np.take_along_axis(cand, part, axis=1)
    out = []
    for q in range(nq):
        order = np.lexsort((best_rows[q], -best_sims[q]))  # by similarity, ties by id
        out.append([(int(best_rows[q, i]), float(best_sims[q, i])) for i in order])
    return out
