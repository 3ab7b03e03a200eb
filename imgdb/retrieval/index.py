"""Annoy indexes registered in the store, and exact (brute-force) search.

An index file lives beside the store (`STORE.h5.<name>.<build>.ann`, `<build>` new for every
build); the registry entry says what it was built from (descriptor, model version, the
extractor's revision, dims, trees, seed, items, file size and digest) and maps Annoy item ids to
image ids. A rebuild writes its files under new names and the one commit that registers them
makes them current: until then the old index is whole and in use; after it the old files go. An
interrupted build registers nothing; its files are swept by the next build of that name.

A store deletes only the index files it owns: those its registry names that carry its own file
name (`STORE.h5.`). A copy of a store (`cp full.h5 copy.h5`, a repair's backup) shares the
original's files while they match their digests, and never removes or replaces them.

A file is verified against its recorded digest before Annoy maps it (Annoy trusts its input: a
damaged file can crash the process). The full digest is computed once per file state and
remembered in a stamp beside it (`.ann.ok`: inode, size, mtime and ctime); while those are
unchanged, later loads only compare them.

A sharded index (`shards=N`) is one logical index of N Annoy files (`...<build>.<i>of<N>.ann`),
each holding a contiguous part of the valid rows, built in parallel processes; the registry entry
lists every shard file with its size, digest and item count (`shard_files`, `shard_bytes`,
`shard_hashes`, `shard_items`; `file`/`file_bytes`/`file_hash` name shard 0), and a query searches
every shard and merges their top-k.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..digest import file_digest
from ..errors import DiskFull, InvalidRequest, StoreDamaged, UserError
from ..numeric import rank_order
from ..store import DescriptorInfo, IndexEntry, StoreView, StoreWriter, now_iso, open_read
from ..store.diskio import same_access
from ..store.indexfiles import IndexFile, index_files, stamp_built, stamp_path, verify_file
from ..store.validate import index_rows_problem
from .pca import model_version, post_processor
from .source import VectorSource, resolve

DEFAULT_TREES = 50
METRIC = "angular"  # on unit vectors: distance^2 = 2 - 2 cos
_NAME = re.compile(r"^[A-Za-z0-9_+][A-Za-z0-9._+-]{0,199}$")


@dataclass(frozen=True)
class IndexStatus:
    """A registry entry and whether it can be used: `stale` (rebuild) or `damaged` (the file
    does not match its digest), None when fine."""

    name: str
    attrs: dict
    stale: str | None
    damaged: str | None = None

    @property
    def problem(self) -> str | None:
        return self.damaged or self.stale


def check_index_name(name: str) -> str:
    """Index names become file names: letters, digits and . _ + - only."""
    if not _NAME.match(name) or ".." in name:
        raise InvalidRequest(f"index name {name!r} is not allowed: use letters, digits, '.', '_', "
                         f"'+' and '-' (no '/', no leading '.')")
    return name


def default_index_name(descriptor: str, model_id: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", descriptor.replace("/", ".").replace("*", "x"))
    return f"{name}.{model_version(model_id).replace('none', 'raw')}"


def index_file(db: Path, name: str) -> Path:
    return db.with_name(f"{db.name}.{name}.ann")


def registered_file(db: Path, entry: IndexEntry) -> Path:
    """Where a registered index file is: beside the store, under its recorded file name."""
    return Path(db).with_name(entry.file)


def new_index_files(db: Path, name: str, shards: int = 1) -> list[Path]:
    """Fresh names for one build's files (shard order): never a file in use."""
    build = secrets.token_hex(4)
    if shards == 1:
        return [db.with_name(f"{db.name}.{name}.{build}.ann")]
    return [db.with_name(f"{db.name}.{name}.{build}.{i}of{shards}.ann") for i in range(shards)]


def owned(db: Path, paths) -> set[Path]:
    """The files of `paths` this store may delete: beside it, under its own file name (a
    copy's registry names the original's files, which stay the original's)."""
    return {p for p in paths if p.parent == db.parent and p.name.startswith(f"{db.name}.")}


@contextmanager
def _private_room(db: Path):
    """A folder beside the store that only this user can enter, where a build writes its
    files (Annoy creates them with the umask's mode), removed afterwards."""
    room = Path(tempfile.mkdtemp(prefix=f".{db.name}.build-", dir=db.parent))
    try:
        yield room
    finally:
        shutil.rmtree(room, ignore_errors=True)


def _move_in(room: Path, paths: list[Path], db: Path) -> None:
    """A build's files, given the store's access, renamed to their places beside it."""
    for path in paths:
        same_access(room / path.name, db)
        os.replace(room / path.name, path)


def _sweep(writer: StoreWriter, db: Path, name: str) -> None:
    """Remove what killed builds of index `name` left: its files that no entry registers
    (and the rooms builds write in: one build at a time holds the store's writer lock)."""
    for room in db.parent.glob(f".{db.name}.build-*"):
        shutil.rmtree(room, ignore_errors=True)
    pattern = re.compile(rf"^{re.escape(db.name)}\.{re.escape(name)}(\.[0-9a-f]{{8}})?"
                         rf"(\.\d+of\d+)?\.ann(\.tmp\d+)?$")
    with writer.read() as view:
        registered = {db.with_name(f.file) for e in view.indexes()
                      for f in _files_or_none(e.attrs)}
    _remove_files(p for p in db.parent.iterdir()
                  if pattern.match(p.name) and p not in registered)


def check_index(view: StoreView, db: Path, name: str, verify: bool = False,
                full: bool = False) -> IndexStatus:
    """Registry entry with its staleness (store changed, model removed, file missing) and, with
    `verify`, its integrity (size and digest)."""
    entry = view.index(name)
    attrs = entry.attrs
    try:
        files = index_files(attrs)
    except StoreDamaged as exc:  # a crafted entry: never a path outside the store's folder
        return IndexStatus(name, attrs, None, str(exc))
    if verify:
        problem = index_rows_problem(view.read_dataset(view.fh["indexes"][name]["rows"]),
                                     view.rows)
        if problem:  # ids out of range or repeated: answers would name them
            return IndexStatus(name, attrs, None, problem)
    try:
        revision = resolve(view, str(attrs["descriptor"])).revision(view)
    except UserError:
        revision = None  # its descriptor (or an extractor of it) is gone
    stale = None
    absent = [f.file for f in files if not Path(db).with_name(f.file).exists()]
    if absent:
        stale = f"index file {absent[0]} is missing"
    elif attrs["model"] != "none" and view.model_by_id(str(attrs["model"])) is None:
        stale = f"its model {attrs['model']} was removed"
    elif revision is None or revision != attrs.get("extractor_revision"):
        stale = "the store changed since it was built (images added, changed or removed)"
    damaged = None
    if stale is None and verify:
        for f in files:
            damaged = verify_file(Path(db).with_name(f.file), f.bytes, f.hash, full)
            if damaged:
                break
    return IndexStatus(name, attrs, stale, damaged)


def list_indexes(view: StoreView, db: Path, verify: bool = False) -> list[IndexStatus]:
    return [check_index(view, db, e.name, verify) for e in view.indexes()]


def rebuild_command(db: Path, status: IndexStatus) -> str:
    a = status.attrs
    shards = int(a.get("shards", 1))
    return (f"imgdb index build --db {db} --descriptor {a['descriptor']} "
            f"--pca {model_version(a['model'])} --name {status.name} --trees {a['trees']} "
            f"--seed {a['seed']}" + (f" --shards {shards}" if shards > 1 else ""))


def usable_index(view: StoreView, db: Path, name: str) -> IndexStatus:
    """An index that may be loaded: current and intact, else a one-line error with the fix."""
    status = check_index(view, db, name, verify=True)
    if status.stale:
        raise UserError(f"index {name} is stale ({status.stale}); rebuild it with: "
                        f"{rebuild_command(db, status)}")
    if status.damaged:
        raise StoreDamaged(f"index {name} is damaged ({status.damaged}); rebuild it with: "
                           f"{rebuild_command(db, status)}")
    return status


# ---------------------------------------------------------------------------------------------
# building


def build_index(db: Path, descriptor: str, model: str | None, name: str | None = None,
                trees: int = DEFAULT_TREES, seed: int = 0, shards: int = 1,
                jobs: int | None = None) -> IndexStatus:
    """Build (or rebuild) an Annoy index of a descriptor under a model; register it. With
    `shards` > 1: that many Annoy files over contiguous parts of the rows, built by `jobs`
    processes at once (default: one per shard, at most one per CPU)."""
    from annoy import AnnoyIndex

    db = Path(db)
    if name is not None:
        check_index_name(name)
    if shards < 1:
        raise InvalidRequest("must be at least 1", "shards")
    if shards > 1:
        return _build_sharded(db, descriptor, model, name, trees, seed, shards, jobs)
    with StoreWriter(db, create=False) as writer:
        with writer.read() as view:
            info = resolve(view, descriptor)
            transform, model_info = post_processor(view, info.name, model)
            model_id = model_info.id if model_info else "none"
            name = name or default_index_name(info.name, model_id)
            started = time.perf_counter()
            index = None
            parts = []
            count = 0
            for rows, raw in info.iter_valid(view):
                vecs = transform.transform(raw)
                finite = np.isfinite(vecs).all(axis=1)  # damaged rows are not indexed
                rows, vecs = rows[finite], vecs[finite]
                if index is None:
                    index = AnnoyIndex(vecs.shape[1], METRIC)
                    index.set_seed(seed)
                for j, v in enumerate(vecs.tolist(), start=count):
                    index.add_item(j, v)
                count += len(rows)
                parts.append(rows)
            if index is None:
                raise UserError(f"descriptor {info.name} has no vectors to index; run imgdb ingest")
            dims = index.f
            revision = info.revision(view)
        index.build(trees, n_jobs=1)  # one thread: the same trees for the same seed
        _sweep(writer, db, name)
        path, = new_index_files(db, name)
        with _private_room(db) as room:
            try:
                index.save(str(room / path.name))
            except OSError as exc:
                raise DiskFull(f"cannot write index file {path.name}: {exc}; nothing was "
                               f"changed") from None
            finally:
                index.unload()
            _move_in(room, [path], db)
        st = path.stat()
        attrs = {
            "file": path.name, "descriptor": info.name, "model": model_id, "dims": int(dims),
            "metric": METRIC, "trees": int(trees), "seed": int(seed), "items": int(count),
            "extractor_revision": revision, "file_bytes": int(st.st_size),
            "file_hash": file_digest(path), "build_seconds": round(time.perf_counter() - started, 3),
            "created": now_iso(),
        }
        _register(writer, db, name, attrs, np.concatenate(parts), [path])
        return IndexStatus(name, attrs, None)


def _register(writer: StoreWriter, db: Path, name: str, attrs: dict, rows: np.ndarray,
              paths: list[Path]) -> None:
    """The commit that makes a build's files the index `name`; then the files it replaced
    (those this store owns) go. A failed commit leaves the old index and removes the new."""
    old = _registered_files(writer, db, name)
    try:
        writer.register_index(name, attrs, rows)
    except BaseException:
        _remove_files(paths)
        raise
    for f in index_files(attrs):
        stamp_built(db.with_name(f.file), f.hash)  # its digest was taken after the move in
    _remove_files(owned(db, old) - set(paths))


def _registered_files(writer: StoreWriter, db: Path, name: str) -> set[Path]:
    """The files an index of this name has now (removed once a rebuild is registered)."""
    with writer.read() as view:
        if name not in {e.name for e in view.indexes()}:
            return set()
        return {db.with_name(f.file) for f in _files_or_none(view.index(name).attrs)}


def _files_or_none(attrs: dict) -> list[IndexFile]:
    """The files an entry names, none when the entry is damaged (nothing of it is deleted)."""
    try:
        return index_files(attrs)
    except (StoreDamaged, KeyError, ValueError, TypeError):
        return []


def _remove_files(paths) -> None:
    for p in paths:
        p.unlink(missing_ok=True)
        stamp_path(p).unlink(missing_ok=True)


def _build_shard(db: str, descriptor: str, model: str | None, lo: int, hi: int, trees: int,
                 seed: int, out: str) -> tuple[np.ndarray, int]:
    """Build one shard (in its own process): the valid rows lo..hi-1 of the store into an
    Annoy file `out`. Returns (image ids in item order, dims)."""
    from annoy import AnnoyIndex

    with open_read(db) as view:
        info = view.descriptor(descriptor)
        transform, _ = post_processor(view, info.name, model)
        valid = view.valid(info.extractor)
        index, rows, count = None, [], 0
        for start in range(lo, hi, 65536):
            stop = min(hi, start + 65536)
            take = np.flatnonzero(valid[start:stop]) + start
            if not len(take):
                continue
            vecs = transform.transform(view.vectors(info, np.arange(start, stop))[take - start])
            finite = np.isfinite(vecs).all(axis=1)  # damaged rows are not indexed
            take, vecs = take[finite], vecs[finite]
            if not len(take):
                continue
            if index is None:
                index = AnnoyIndex(vecs.shape[1], METRIC)
                index.set_seed(seed)
            for j, v in enumerate(vecs.tolist(), start=count):
                index.add_item(j, v)
            count += len(take)
            rows.append(take)
    index.build(trees, n_jobs=1)
    try:
        index.save(out)
    except OSError as exc:
        Path(out).unlink(missing_ok=True)
        raise DiskFull(f"cannot write index file {Path(out).name}: {exc}; nothing was changed")
    dims = index.f
    index.unload()
    return np.concatenate(rows), dims


def _build_sharded(db: Path, descriptor: str, model: str | None, name: str | None, trees: int,
                   seed: int, shards: int, jobs: int | None) -> IndexStatus:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with StoreWriter(db, create=False) as writer:
        with writer.read() as view:
            info = view.descriptor(descriptor)
            _, model_info = post_processor(view, info.name, model)
            model_id = model_info.id if model_info else "none"
            name = name or default_index_name(info.name, model_id)
            valid = np.flatnonzero(view.valid(info.extractor))
            revision = view.revision(info.extractor)
        if len(valid) < shards:
            raise UserError(f"descriptor {info.name} has {len(valid)} vectors: too few for "
                            f"{shards} shards" if len(valid) else
                            f"descriptor {info.name} has no vectors to index; run imgdb ingest")
        # contiguous row ranges holding equal numbers of valid rows
        cuts = [int(valid[len(valid) * i // shards]) for i in range(shards)] + \
            [int(valid[-1]) + 1]
        _sweep(writer, db, name)
        paths = new_index_files(db, name, shards)
        started = time.perf_counter()
        workers = max(1, min(shards, jobs or os.cpu_count() or 1))
        with _private_room(db) as room:
            # spawned processes: a forked copy of this process's HDF5 state is not safe
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) \
                    as pool:
                futures = [pool.submit(_build_shard, str(db), info.name,
                                       None if model_id == "none" else model_version(model_id),
                                       cuts[i], cuts[i + 1], trees, seed,
                                       str(room / paths[i].name))
                           for i in range(shards)]
                results = [f.result() for f in futures]
            _move_in(room, paths, db)
        stats = [p.stat() for p in paths]
        hashes = [file_digest(p) for p in paths]
        items = [len(r) for r, _ in results]
        attrs = {
            "file": paths[0].name, "descriptor": info.name, "model": model_id,
            "dims": int(results[0][1]), "metric": METRIC, "trees": int(trees), "seed": int(seed),
            "items": int(sum(items)), "extractor_revision": revision,
            "file_bytes": int(stats[0].st_size), "file_hash": hashes[0],
            "shards": shards, "shard_files": [p.name for p in paths],
            "shard_bytes": [int(st.st_size) for st in stats], "shard_hashes": hashes,
            "shard_items": items, "build_jobs": workers,
            "build_seconds": round(time.perf_counter() - started, 3), "created": now_iso(),
        }
        _register(writer, db, name, attrs, np.concatenate([r for r, _ in results]), paths)
        return IndexStatus(name, attrs, None)


def remove_index(db: Path, name: str) -> None:
    """The file first, then the registry entry: a kill in between leaves an entry whose file
    is missing (listed as stale), which the rerun removes; a file left by an older version
    (no entry) is removed too."""
    db = Path(db)
    with StoreWriter(db, create=False) as writer:
        with writer.read() as view:
            known = name in [e.name for e in view.indexes()]
            if known:
                paths = [db.with_name(f.file) for f in _files_or_none(view.index(name).attrs)]
            else:  # a file left by an older build, not registered: remove it too
                paths = [index_file(db, name)]
                if not paths[0].exists():
                    view.index(name)  # raises: no such index
        # the files first (a kill in between leaves a stale entry, which a rerun removes);
        # only those this store owns: a copy's entry names the original's files
        _remove_files(owned(db, paths))
        if known:
            writer.remove_index(name)


# ---------------------------------------------------------------------------------------------
# searching


class AnnoySearcher:
    """A loaded, verified Annoy index: queries (q, d) -> per query [(row, cosine)], best first."""

    DEFAULT_SEARCH_K = 10_000  # recall@10 0.9999 at 1M x 256 (benchmarks/RESULTS-search.md)

    def __init__(self, view: StoreView, db: Path, name: str, search_k: int | None = None) -> None:
        from annoy import AnnoyIndex

        status = usable_index(view, db, name)
        rows = view.index_rows(name)
        self.trees = int(status.attrs["trees"])
        self.search_k = search_k
        self.shards: list[tuple[object, np.ndarray]] = []  # (Annoy index, its image ids)
        offset = 0
        for f in index_files(status.attrs):
            ann = AnnoyIndex(int(status.attrs["dims"]), str(status.attrs["metric"]))
            ann.load(str(Path(db).with_name(f.file)))
            self.shards.append((ann, rows[offset:offset + f.items]))
            offset += f.items
        self.ann, self.rows = self.shards[0]

    def __call__(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        # Annoy's default (k x trees candidates) loses recall on big indexes: look wider. Every
        # shard gets the whole budget (it holds a part of the items: its recall is no lower).
        budget = self.search_k or max(self.DEFAULT_SEARCH_K, k * self.trees)
        out = []
        for q in np.asarray(queries, np.float32):
            vec = q.tolist()
            found = []
            for ann, rows in self.shards:
                items, dist = ann.get_nns_by_vector(vec, k, search_k=budget,
                                                    include_distances=True)
                found.extend((int(rows[i]), 1.0 - d * d / 2.0) for i, d in zip(items, dist))
            if len(self.shards) > 1:  # merge the shards' top-k: by similarity, ties by id
                ids = np.array([r for r, _ in found], np.int64)
                sims = np.array([s for _, s in found], np.float64)
                found = [found[i] for i in rank_order(sims, ids=ids, top=k)]
            out.append(found[:k])
        return out


def topk_exact(queries: np.ndarray, view: StoreView, source: VectorSource | DescriptorInfo,
               transform, k: int, among: np.ndarray | None = None
               ) -> list[list[tuple[int, float]]]:
    """Brute-force cosine top-k of every query over all valid stored vectors, one streamed pass
    (`among`: sorted rows to keep, so that a search planned on one commit ignores rows that a
    running ingest committed since)."""
    nq = len(queries)
    best_rows = np.zeros((nq, 0), np.int64)
    best_sims = np.zeros((nq, 0), np.float32)
    stream = source.iter_valid(view) if isinstance(source, VectorSource) \
        else view.iter_valid(source)
    for rows, raw in stream:
        if among is not None:
            keep_rows = np.isin(rows, among, assume_unique=True)
            rows, raw = rows[keep_rows], raw[keep_rows]
            if not len(rows):
                continue
        vecs = transform.transform(raw)
        finite = np.isfinite(vecs).all(axis=1)  # a damaged row (check names it) never ranks
        if not finite.all():
            rows, vecs = rows[finite], vecs[finite]
        sims = np.concatenate([best_sims, queries @ vecs.T], axis=1)
        cand = np.concatenate([best_rows, np.broadcast_to(rows, (nq, len(rows)))], axis=1)
        keep = [rank_order(sims[q], ids=cand[q], top=k) for q in range(nq)]
        best_sims = np.stack([sims[q, i] for q, i in enumerate(keep)])
        best_rows = np.stack([cand[q, i] for q, i in enumerate(keep)])
    out = []
    for q in range(nq):
        # kept in rank order: by similarity, ties by id
        out.append([(int(r), float(s)) for r, s in zip(best_rows[q], best_sims[q])])
    return out


__all__ = ["IndexStatus", "IndexFile", "index_files", "build_index", "check_index", "list_indexes", "remove_index",
           "rebuild_command", "usable_index", "AnnoySearcher", "topk_exact", "index_file",
           "new_index_files", "owned",
           "default_index_name", "check_index_name", "verify_file", "open_read"]
