"""Query pipeline: query vectors (stored, or described as ingest did) -> model -> index -> hits.

Reads of the store are short (the shared lock is held only while reading); describing a new
image (a network forward) happens between them, so a running ingest is never held up by it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..digest import file_digest
from ..errors import UserError
from ..numeric import l2_normalize
from ..store import StoreView, open_read
from .index import AnnoySearcher, check_index, list_indexes, rebuild_command, topk_exact, usable_index
from .pca import model_version, post_processor


@dataclass
class Hit:
    rank: int
    id: int
    score: float
    path: str


@dataclass
class QueryResult:
    query: str
    source: str  # "store" (vector looked up) or "extracted"
    hits: list[Hit] = field(default_factory=list)


@dataclass(frozen=True)
class QueryPlan:
    """Which descriptor, model and index (or exact search) answers the queries."""

    descriptor: str
    model: str | None  # model version (vN) or None
    index: str | None  # registry name, None for exact search


def plan_query(view: StoreView, db: Path, index: str | None, descriptor: str | None,
               pca: str | None, exact: bool) -> QueryPlan:
    """Choose the index/descriptor from the options; refuse stale or damaged indexes with the fix."""
    if index:
        # exact search only borrows the index's descriptor and model: staleness is no matter
        status = check_index(view, db, index) if exact else usable_index(view, db, index)
        model = model_version(status.attrs["model"])
        return QueryPlan(status.attrs["descriptor"], None if model == "none" else model,
                         None if exact else index)
    if descriptor:
        name = view.descriptor(descriptor).name
        if exact:
            if pca not in (None, "none"):
                view.model("pca", name, pca)  # exists?
            return QueryPlan(name, None if pca in (None, "none") else pca, None)
        candidates = [s for s in list_indexes(view, db) if s.attrs["descriptor"] == name
                      and (pca is None or model_version(s.attrs["model"]) == pca)]
        current = [s for s in candidates if not s.stale]
        if current:
            chosen = current[-1]
            model = model_version(chosen.attrs["model"])
            return QueryPlan(name, None if model == "none" else model, chosen.name)
        if candidates:
            raise UserError(f"index {candidates[0].name} is stale ({candidates[0].stale}); "
                            f"rebuild it with: {rebuild_command(db, candidates[0])}")
        raise UserError(f"no index for {name}; build one with: imgdb index build --db {db} "
                        f"--descriptor {name}, or search without one with --exact")
    entries = view.indexes()
    if len(entries) == 1:
        return plan_query(view, db, entries[0].name, None, None, exact)
    if not entries:
        raise UserError(f"the store has no index; build one with: imgdb index build --db {db} "
                        f"--descriptor DESCRIPTOR (see imgdb info), or pass --descriptor and --exact")
    raise UserError("the store has several indexes; choose one with --index: "
                    + ", ".join(e.name for e in entries))


def average_query_expansion(queries: np.ndarray, neighbours: list[np.ndarray]) -> np.ndarray:
    """Average QE (Kalantidis et al. sec.5.1, Chum et al. 2007): each query plus its top-M
    post-processed results, L2-normalised."""
    out = [q + nb.sum(axis=0) if len(nb) else q for q, nb in zip(queries, neighbours)]
    return l2_normalize(np.asarray(out, dtype=np.float32))


def _searcher(view: StoreView, db: Path, plan: QueryPlan, info, transform,
              search_k: int | None):
    """A function (queries (q, d), k) -> per query [(row, cosine)], best first."""
    if plan.index is None:
        return lambda q, k: topk_exact(q, view, info, transform, k)
    return AnnoySearcher(view, db, plan.index, search_k)


def _stored_rows(view: StoreView, info, files: Sequence[Path]) -> list[int | None]:
    """Row of a valid stored image with the same content (file digest) as each query file."""
    if not files:
        return []
    sha = view.column("sha")
    valid = view.valid(info.extractor)
    out: list[int | None] = []
    for path in files:
        try:
            digest = file_digest(path).encode()
        except OSError:
            out.append(None)
            continue
        hits = np.flatnonzero((sha == digest) & valid)
        out.append(int(hits[0]) if len(hits) else None)
    return out


def _check_query_file(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    if path.is_dir():
        raise UserError(f"query {path} is a directory; give image files")
    if not path.is_file():
        raise UserError(f"query image {path} does not exist")
    return path


def run_queries(db: Path, images: Sequence[Path], ids: Sequence[int], plan: QueryPlan, k: int,
                bbox: tuple[float, float, float, float] | None = None, qe: int = 0,
                device: str = "auto", search_k: int | None = None) -> list[QueryResult]:
    """Answer each query image (or stored id) with its top-k hits.

    A query file whose content is already in the store (same digest) uses the stored vector;
    others are described exactly as ingest did.
    """
    db = Path(db)
    files = [_check_query_file(p) for p in images]
    with open_read(db) as view:
        info = view.descriptor(plan.descriptor)
        valid = view.valid(info.extractor)
        for row in ids:
            if not 0 <= row < len(valid) or not valid[row]:
                raise UserError(f"image id {row} is not an ingested image of this store "
                                f"(ids 0..{len(valid) - 1}; see imgdb info)")
        stored = _stored_rows(view, info, files) if bbox is None else [None] * len(files)
        lookup = list(ids) + [r for r in stored if r is not None]
        stored_vecs = dict(zip(lookup, view.vectors(info, lookup))) if lookup else {}
        id_paths = view.paths(list(ids)) if ids else []
        describer = None
        if any(r is None for r in stored):
            from .describe import QueryDescriber

            describer = QueryDescriber(view, info.extractor, [(info.layer, info.pooling)], device)
    names = [*id_paths, *(str(p) for p in files)]
    sources = ["store"] * len(ids) + ["store" if r is not None else "extracted" for r in stored]
    raws = [stored_vecs[r] for r in ids]
    for path, row in zip(files, stored):  # network forwards: outside the store's lock
        raws.append(stored_vecs[row] if row is not None
                    else describer.vector(path, info.layer, info.pooling, bbox))
    with open_read(db) as view:
        info = view.descriptor(plan.descriptor)
        transform, _ = post_processor(view, info.name, plan.model)
        queries = transform.transform(np.asarray(raws, dtype=np.float32))
        search = _searcher(view, db, plan, info, transform, search_k)
        hits = search(queries, k)
        if qe > 0:
            tops = [sorted(r for r, _ in found[:qe]) for found in hits]
            neighbours = [transform.transform(view.vectors(info, top)) if top else
                          np.zeros((0, queries.shape[1]), np.float32) for top in tops]
            hits = search(average_query_expansion(queries, neighbours), k)
        paths = view.paths(np.array([r for found in hits for r, _ in found], np.int64))
    results, i = [], 0
    for name, source, found in zip(names, sources, hits):
        res = QueryResult(name, source)
        for rank, (r, score) in enumerate(found, start=1):
            res.hits.append(Hit(rank, int(r), float(score), paths[i]))
            i += 1
        results.append(res)
    return results
