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
from ..errors import UsageError, UserError
from ..store import StoreView, open_read
from .index import AnnoySearcher, check_index, list_indexes, rebuild_command, topk_exact, usable_index
from .pca import model_version, post_processor
from .rerank import Collection, QueryExpansion, Ranker, average_query_expansion, expand, parse_qe
from .source import VectorSource, resolve


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
        name = resolve(view, descriptor).name
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


def make_searcher(view: StoreView, db: Path, plan: QueryPlan, source: VectorSource, transform,
              search_k: int | None):
    """A function (queries (q, d), k) -> per query [(row, cosine)], best first."""
    if plan.index is None:
        return lambda q, k: topk_exact(q, view, source, transform, k)
    return AnnoySearcher(view, db, plan.index, search_k)


def _stored_rows(view: StoreView, source: VectorSource, files: Sequence[Path]
                 ) -> list[int | None]:
    """Row of a valid stored image with the same content (file digest) as each query file."""
    if not files:
        return []
    sha = view.column("sha")
    valid = source.valid(view)
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
                bbox: tuple[float, float, float, float] | None = None,
                qe: int | str | QueryExpansion | None = 0, device: str = "auto",
                search_k: int | None = None, rerank: Ranker | None = None,
                graph: str | None = None) -> list[QueryResult]:
    """Answer each query image (or stored id) with its top-k hits.

    A query file whose content is already in the store (same digest) uses the stored vector;
    others are described exactly as ingest did. `qe`: average QE with the top M (an int), or
    alpha-QE (`alpha:A[,M]`). `rerank`: a re-ranker (diffusion, k-reciprocal) over the store's
    current graph of this descriptor and model (`graph`: its version, default the newest), exactly
    as `eval` ranks.
    """
    db = Path(db)
    expansion = qe if isinstance(qe, QueryExpansion) else parse_qe(qe) if qe else None
    if expansion is not None and rerank is not None:
        raise UsageError("--qe and --rerank are two re-rankings; give one (eval compares them "
                         "side by side)")
    files = [_check_query_file(p) for p in images]
    with open_read(db) as view:
        source = resolve(view, plan.descriptor)
        valid = source.valid(view)
        for row in ids:
            if not 0 <= row < len(valid) or not valid[row]:
                raise UserError(f"image id {row} is not an ingested image of this store "
                                f"(ids 0..{len(valid) - 1}; see imgdb info)")
        stored = _stored_rows(view, source, files) if bbox is None else [None] * len(files)
        lookup = list(ids) + [r for r in stored if r is not None]
        stored_vecs = dict(zip(lookup, source.vectors(view, lookup))) if lookup else {}
        id_paths = view.paths(list(ids)) if ids else []
        describers = {}
        if any(r is None for r in stored):
            from .describe import QueryDescriber

            describers = {ext: QueryDescriber(view, ext, source.wanted(ext), device)
                          for ext in source.extractors}
    names = [*id_paths, *(str(p) for p in files)]
    sources = ["store"] * len(ids) + ["store" if r is not None else "extracted" for r in stored]
    raws = [stored_vecs[r] for r in ids]
    for path, row in zip(files, stored):  # network forwards: outside the store's lock
        if row is not None:
            raws.append(stored_vecs[row])
        else:
            raws.append(source.from_described(
                {ext: d.describe(d.load(path, bbox)) for ext, d in describers.items()}))
    with open_read(db) as view:
        source = resolve(view, plan.descriptor)
        transform, model = post_processor(view, source.name, plan.model)
        queries = transform.transform(np.asarray(raws, dtype=np.float32))
        if rerank is not None:
            hits = _reranked(view, db, source, transform, model, queries, rerank, graph, k)
        else:
            search = make_searcher(view, db, plan, source, transform, search_k)
            hits = search(queries, k)
            if expansion is not None:
                tops = [found[:expansion.m] for found in hits]
                neighbours = [transform.transform(source.vectors(view, [r for r, _ in top]))
                              if top else np.zeros((0, queries.shape[1]), np.float32)
                              for top in tops]
                sims = [np.array([s for _, s in top], np.float32) for top in tops]
                hits = search(expand(queries, neighbours, sims, expansion.alpha), k)
        paths = view.paths(np.array([r for found in hits for r, _ in found], np.int64))
    results, i = [], 0
    for name, source_kind, found in zip(names, sources, hits):
        res = QueryResult(name, source_kind)
        for rank, (r, score) in enumerate(found, start=1):
            res.hits.append(Hit(rank, int(r), float(score), paths[i]))
            i += 1
        results.append(res)
    return results


def _reranked(view: StoreView, db: Path, source: VectorSource, transform, model,
              queries: np.ndarray, ranker: Ranker, graph_version: str | None, k: int
              ) -> list[list[tuple[int, float]]]:
    """Rank the graph's items for each query with a re-ranker (what eval computes)."""
    from .graph import find_graph, load_graph

    gm = find_graph(view, db, source, model, graph_version, ranker.min_graph_k)
    graph = load_graph(view, gm)
    rows, raw = source.valid_vectors(view)
    if not np.array_equal(rows, graph.rows):  # a current graph covers exactly the valid rows
        raise UserError(f"graph {gm.id} does not cover the store's images; rebuild it")
    coll = Collection(transform.transform(raw), graph)
    bound = ranker.bind(coll)
    return [[(int(graph.rows[p]), float(sc)) for p, sc in zip(r.order, r.scores)]
            for r in bound.rank(queries, coll, top=k)]


__all__ = ["Hit", "QueryResult", "QueryPlan", "plan_query", "run_queries",
           "average_query_expansion"]
