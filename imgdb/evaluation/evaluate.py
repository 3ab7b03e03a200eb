"""`imgdb eval`: benchmark protocols on a store, swept over descriptors x whitening x dims.

Exact search only. Query vectors come from the store (query photos that are database images),
from `--queries DIR` (extracted with the store's own extractor settings, never added), or from a
second store. Ground-truth entries missing from the store are counted and reported; metrics are
computed over what exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InvalidRequest, UserError
from ..retrieval.pca import training_vectors
from ..retrieval.request import parse_qe, parse_rerank
from ..retrieval.rerank import Collection, Ranker, rank_chain
from ..retrieval.source import VectorSource, resolve, resolve_all
from ..retrieval.whitening import Identity, PCAWhitening
from ..store import open_read
from .groundtruth import GroundTruth, Query, image_key, load_ground_truth
from .metrics import (QueryScores, Summary, average_precision, ns_score, precision_at_k,
                      summarize)

KS = (1, 5, 10)


@dataclass
class EvalOptions:
    """What to sweep and how to query."""

    descriptors: Sequence[str] = ("all",)
    dims: Sequence[int] = ()
    pca_on_test: bool = False
    pca_from: Sequence[Path] = ()
    whiten: bool = True
    power: float | None = None
    query_mode: str = "full"  # full | crop-image | crop-features
    qe: object = 0  # M, "alpha:A[,M]", a QueryExpansion, or a sequence of them: rows of their own
    rerank: Sequence = ()  # "diffusion[:...]", "kreciprocal[:...]" or Rankers: rows of their own
    queries_dir: Path | None = None
    queries_db: Path | None = None
    protocol: str = "auto"
    group_regex: str | None = None
    device: str = "auto"
    regions: bool = False  # every ranking also with the query's crops (retrieval.views) ...
    turns: bool = False  # ... and/or its turns: one more row per ranking, with every view asked


@dataclass
class Cell:
    """One (descriptor, whitening, dims, setup) result."""

    descriptor: str
    whitening: str
    dims: int
    setup: str
    summary: Summary
    per_query: list[QueryScores]
    ns: float | None = None  # UKBench N-S score
    positions: dict[str, np.ndarray] = field(default_factory=dict)  # query -> 0-based ranks of
    # its positives in the ranking with junk removed (for precision-recall curves)
    ranking: str = "L2"  # the ranker's label (L2, QE M=2, diffusion k=10 alpha=0.99 ...)


@dataclass
class EvalResult:
    protocol: str
    gt_source: str
    n_database: int
    n_queries: int
    skipped_queries: list[tuple[str, str]] = field(default_factory=list)
    missing_positives: int = 0
    cells: list[Cell] = field(default_factory=list)
    rankings: dict = field(default_factory=dict)  # (descriptor, whitening, dims, ranking) ->
    # per query, the store rows of its top 10
    scores: dict = field(default_factory=dict)  # the same keys -> per query, their scores


# --------------------------------------------------------------------------------------------
# queries


@dataclass
class _QuerySet:
    """Queries that can be evaluated, with where their vectors come from."""

    queries: list[Query]
    gt_index: list[int]  # position of each query in the ground truth
    rows: list[int | None]  # store row of the query photo (None when it comes from elsewhere)
    files: list[Path | None]  # file to extract from (crop modes or --queries)


def _key_rows(paths: Sequence[str], valid: np.ndarray) -> dict[str, int]:
    rows: dict[str, int] = {}
    for i, p in enumerate(paths):
        if valid[i]:
            rows.setdefault(image_key(p), i)
    return rows


def _query_files(folder: Path) -> dict[str, Path]:
    from ..features.images import discover

    return {image_key(str(p)): p for p in discover([folder]).files}


def _select_queries(gt: GroundTruth, key_rows: dict[str, int], paths: list[str],
                    opts: EvalOptions) -> tuple[_QuerySet, list[tuple[str, str]]]:
    files = _query_files(opts.queries_dir) if opts.queries_dir else {}
    qs = _QuerySet([], [], [], [])
    skipped = []

    def take(i: int, q: Query, row: int | None, f: Path | None) -> None:
        qs.queries.append(q), qs.gt_index.append(i), qs.rows.append(row), qs.files.append(f)

    for i, q in enumerate(gt.queries):
        row = key_rows.get(q.image)
        if opts.queries_dir is not None:
            f = files.get(q.image)
            if f is None:
                skipped.append((q.name, f"query image {q.image} not found in {opts.queries_dir}"))
            else:
                take(i, q, row if gt.queries_in_database else None, f)
        elif opts.queries_db is not None:
            take(i, q, row, None)
        elif row is None:
            why = ("not in the store" if gt.queries_in_database else
                   "queries of this protocol are not database images: give the query "
                   "photos' folder or a store of them")
            skipped.append((q.name, f"query image {q.image} {why}"))
        else:
            take(i, q, row, Path(paths[row]) if opts.query_mode != "full" else None)
    return qs, skipped


class _QueryVectors:
    """Raw query vectors per descriptor: stored, from a second store, or described by the query
    path's describer (`QueryService.describe`: as ingest did, batched; network forwards happen
    outside the store's lock). Each image is described once per extractor, for every pooling."""

    def __init__(self, db: Path, qs: _QuerySet, opts: EvalOptions) -> None:
        from ..retrieval.service import QueryService

        self.db, self.qs, self.opts = db, qs, opts
        self.service = QueryService(db, opts.device)
        self._extracted: dict[str, list[dict]] = {}  # extractor -> per query (None: stored)
        self._contexts: dict[str, list] = {}  # extractor -> per query (keypoints)
        self._views = None  # (the other views of every query as inputs, whose each is)
        self._described_views: dict[str, list] = {}  # extractor -> per view {(layer,
        # pooling): vector}

    def get(self, source: VectorSource) -> np.ndarray:
        if self.opts.queries_db:
            other = self._other_store(source)
            missing = [q.image for q in self.qs.queries if q.image not in other]
            if missing:
                raise UserError(f"query image {missing[0]} is not in {self.opts.queries_db}")
            return np.asarray([other[q.image] for q in self.qs.queries], dtype=np.float32)
        stored_rows = [r for r, f in zip(self.qs.rows, self.qs.files) if f is None]
        with open_read(self.db) as view:
            stored = dict(zip(stored_rows, source.vectors(view, stored_rows))) \
                if stored_rows else {}
            todo = {ext: self.service.describer(view, ext) for ext in source.extractors
                    if ext not in self._extracted and any(f is not None for f in self.qs.files)}
        for ext, describer in todo.items():
            self._extracted[ext] = self._describe(describer)
        out = []
        for i, (row, f) in enumerate(zip(self.qs.rows, self.qs.files)):
            out.append(stored[row] if f is None else source.from_described(
                {ext: self._extracted[ext][i] for ext in source.extractors}))
        return np.asarray(out, dtype=np.float32)

    def _inputs(self, stored: bool) -> list:
        """The queries as the query path takes them (with `stored`, also those the store
        holds, by id; else only those read from files)."""
        from ..retrieval.service import QueryInput

        mode = self.opts.query_mode
        out = []
        for q, row, f in zip(self.qs.queries, self.qs.rows, self.qs.files):
            crop = q.bbox if mode == "crop-image" else None
            region = q.bbox if mode == "crop-features" else None
            if f is not None:
                out.append(QueryInput(q.name, path=f, crop=crop, region=region))
            elif stored:
                out.append(QueryInput(q.name, row=row, region=region))
        return out

    def _describe(self, describer) -> list[dict | None]:
        described = iter(self.service.describe(describer, self._inputs(stored=False)))
        return [next(described) if f is not None else None for f in self.qs.files]

    def views(self, source: VectorSource) -> list[np.ndarray]:
        """Each query's raw vectors of its other views (`QueryService.view_inputs`: the crops
        and turns asked), each view described once per extractor for every pooling (as `get`
        does)."""
        if self.opts.queries_db:
            raise UserError("crops and turns are taken from the query images; give them as a "
                            "folder ({queries}) instead of a store", mentions=("queries",))
        if self._views is None:
            self._views = self.service.view_inputs(self._inputs(stored=True), None,
                                                   self.opts.regions, self.opts.turns)
        views, owner = self._views
        with open_read(self.db) as view:
            todo = {ext: self.service.describer(view, ext) for ext in source.extractors
                    if ext not in self._described_views}
        for ext, describer in todo.items():
            self._described_views[ext] = self.service.describe(describer, views)
        raws = np.asarray([source.from_described({ext: self._described_views[ext][j]
                                                  for ext in source.extractors})
                           for j in range(len(views))], np.float32).reshape(len(views), -1)
        return [raws[owner == i] for i in range(len(self.qs.queries))]

    def contexts(self, source: VectorSource) -> list:
        """Each query's keypoints and the store's, for a verification stage (once per
        extractor that holds them)."""
        from ..retrieval.service import QueryPlan

        if self.opts.queries_db:
            raise UserError("verification reads the query images' keypoints; give the query "
                            "photos as a folder ({queries}) instead of a store",
                            mentions=("queries",))
        plan = QueryPlan(source.name, None, None)
        with open_read(self.db) as view:
            ext = self.service.keypoint_extractor(view, plan)
        if ext not in self._contexts:
            self._contexts[ext] = self.service.contexts(plan, self._inputs(stored=True))
        return self._contexts[ext]

    def _other_store(self, source: VectorSource) -> dict[str, np.ndarray]:
        with open_read(self.opts.queries_db) as view:
            try:
                other = resolve(view, source.name)
            except UserError:
                raise UserError(f"{self.opts.queries_db} has no descriptor {source.name}; "
                                f"ingest the queries with the same settings") from None
            rows, x = other.valid_vectors(view)
            paths = view.paths(rows)
        return {image_key(p): v for p, v in zip(paths, x)}


# --------------------------------------------------------------------------------------------
# evaluation


def _scores_for(gt: GroundTruth, qs: _QuerySet, rankings: list, db_keys: np.ndarray,
                db_rows: np.ndarray
                ) -> tuple[dict[str, list[QueryScores]], dict, list[float], list[tuple], int]:
    """Score every query's ranking (database positions, best first) in each setup (ids, not
    names, in the loop)."""
    setups = gt.setups()
    per_setup: dict[str, list[QueryScores]] = {s: [] for s in setups}
    positions: dict[str, dict[str, np.ndarray]] = {s: {} for s in setups}
    ns_values: list[float] = []
    top: list[tuple] = []  # per query: store rows of its top 10 and their scores
    key_pos: dict[str, int] = {}
    for i, k in enumerate(db_keys.tolist()):
        key_pos.setdefault(k, i)
    missing_total = 0
    row_pos = {int(r): i for i, r in enumerate(db_rows)}
    first_setup = next(iter(setups))
    for qi, (q, row, gi) in enumerate(zip(qs.queries, qs.rows, qs.gt_index)):
        order, scores = rankings[qi].order, rankings[qi].scores
        if gt.exclude_query_from_ranking and row is not None and row in row_pos:
            keep = order != row_pos[row]
            order, scores = order[keep], scores[keep]
        top.append((db_rows[order[:10]], np.asarray(scores[:10], np.float64)))
        for setup, pairs in setups.items():
            positives, junk = pairs[gi]
            if gt.exclude_query_from_ranking:
                positives = positives - {q.image}
            found = {key_pos[k] for k in positives if k in key_pos}
            junk_ids = {key_pos[k] for k in junk if k in key_pos}
            missing = len(positives) - len(found)
            if setup == first_setup:
                missing_total += missing
            ap = average_precision(order, found, junk_ids)
            pk = precision_at_k(order, found, junk_ids, KS)
            per_setup[setup].append(QueryScores(q.name, ap, dict(zip(KS, pk.tolist())),
                                                len(found), len(junk), missing))
            kept = order[~np.isin(order, list(junk_ids))] if junk_ids else order
            positions[setup][q.name] = np.flatnonzero(np.isin(kept, list(found)))
        if gt.protocol == "ukbench":
            group = {key_pos[k] for k in setups[first_setup][gi][0] if k in key_pos}
            ns_values.append(ns_score(order, group))
    return per_setup, positions, ns_values, top, missing_total


def rankers(opts: EvalOptions) -> list[tuple[Ranker, ...]]:
    """The rows' rankings: L2 first (no stage), then each query expansion and each re-ranking
    chain asked for (`--rerank verify,diffusion` is one row)."""
    out: list[tuple[Ranker, ...]] = [()]
    qes = opts.qe if isinstance(opts.qe, (list, tuple)) else [opts.qe]
    for qe in qes:
        ranker = qe if isinstance(qe, Ranker) else parse_qe(qe) if qe not in (None, "") else None
        if ranker is not None:
            out.append((ranker,))
    for spec in opts.rerank or ():
        chain = (spec,) if isinstance(spec, Ranker) else tuple(spec) \
            if isinstance(spec, (list, tuple)) else parse_rerank(spec)
        out.append(chain)
    labels = [chain_spec(c) for c in out]
    for i, lab in enumerate(labels):
        if lab in labels[:i]:
            raise UserError(f"the ranking {lab} is asked for twice")
    return out


def chain_spec(chain: Sequence[Ranker]) -> str:
    return ",".join(st.spec for st in chain) or "L2"


def chain_label(chain: Sequence[Ranker]) -> str:
    return " + ".join(st.label for st in chain) or "L2"


class _Collections:
    """The database side of each ranking for one (descriptor, whitening, dims): the store's
    current graph when there is one for this descriptor without PCA and it holds enough
    neighbours (what `imgdb query --rerank` uses), else the exact graph computed here."""

    def __init__(self, db: Path, source: VectorSource, vectors: np.ndarray, rows: np.ndarray,
                 stored_ok: bool) -> None:
        self.db, self.source, self.rows, self.stored_ok = db, source, rows, stored_ok
        self.plain = Collection(vectors, rows=rows)
        self._stored: dict[int, Collection | None] = {}

    def for_chain(self, chain: Sequence[Ranker]) -> tuple[Collection, tuple[Ranker, ...]]:
        need = max([st.min_graph_k for st in chain if st.graph_k] + [0])
        coll = (self._stored_graph(need) or self.plain) if need else self.plain
        return coll, tuple(st.bind(coll) for st in chain)

    def _stored_graph(self, need: int) -> Collection | None:
        if not self.stored_ok:
            return None
        if need not in self._stored:
            from ..retrieval.graph import find_graph, load_graph

            coll = None
            with open_read(self.db) as view:
                try:
                    model = find_graph(view, self.db, self.source, None, None, need)
                except UserError:
                    model = None
                if model is not None:
                    graph = load_graph(view, model)
            if model is not None and np.array_equal(graph.rows, self.rows):
                coll = Collection(self.plain.vectors, graph, rows=self.rows)
            self._stored[need] = coll
        return self._stored[need]


def _whitening_sources(opts: EvalOptions) -> list[tuple[str, Path | None]]:
    sources: list[tuple[str, Path | None]] = []
    if opts.pca_on_test:
        sources.append(("pca on test", None))
    for p in opts.pca_from:
        sources.append((f"pca from {Path(p).name}", Path(p)))
    return sources or [("none", None)]


def _fit(x_fit: np.ndarray, dims: int, opts: EvalOptions) -> PCAWhitening:
    return PCAWhitening(dims=dims, whiten=opts.whiten, power=opts.power).fit(x_fit)


def run_eval(db: Path, gt_path: Path | None, opts: EvalOptions) -> EvalResult:
    """Evaluate every requested descriptor x whitening source x dims on the ground truth."""
    db = Path(db)
    with open_read(db) as view:
        paths = view.paths()
        n_rows = len(paths)
        infos = view.descriptors()
        if not infos:
            raise UserError(f"store {db} has no descriptors; run imgdb ingest first")
        chosen = resolve_all(view, opts.descriptors)
    gt = load_ground_truth(gt_path, opts.protocol, images=paths, group_regex=opts.group_regex)
    if opts.query_mode != "full" and not any(q.bbox for q in gt.queries):
        raise InvalidRequest(f"{opts.query_mode} crops the queries to their boxes, but this "
                             f"{gt.protocol} ground truth has none", "query")
    result = EvalResult(gt.protocol, gt.source, 0, 0)
    qv = None
    qs = None
    chosen_rankers = rankers(opts)
    for source in chosen:
        with open_read(db) as view:
            valid = source.valid(view)[:n_rows]
            db_rows = np.flatnonzero(valid)
            raw_db = source.vectors(view, db_rows)
        keys = np.array([image_key(paths[r]) for r in db_rows])
        if qs is None:
            key_rows = _key_rows(paths, valid)
            qs, skipped = _select_queries(gt, key_rows, paths, opts)
            result.skipped_queries = skipped
            result.n_queries = len(qs.queries)
            result.n_database = len(db_rows)
            if not qs.queries:
                raise UserError("no query of the ground truth can be evaluated: "
                                + (skipped[0][1] if skipped else "the ground truth is empty"))
            qv = _QueryVectors(db, qs, opts)
        raw_q = qv.get(source)
        for label, whitening in _whitening_sources(opts):
            if label == "none":
                dims_list = [raw_db.shape[1]]
            else:
                fit_on = raw_db if whitening is None else training_vectors(whitening,
                                                                           source.name)[0]
                limit = min(fit_on.shape[0], fit_on.shape[1])
                dims_list = [d for d in (opts.dims or [min(limit, raw_db.shape[1])]) if d <= limit]
                if not dims_list:
                    raise UserError(f"{','.join(map(str, opts.dims))} exceed what "
                                    f"{limit} vectors allow for {source.name}", "dims")
            for dims in dims_list:
                transform = Identity(opts.power) if label == "none" else _fit(fit_on, dims, opts)
                db_vec = transform.transform(raw_db)
                q_vec = transform.transform(raw_q)
                # a stored graph was built on the stored vectors with L2 only
                colls = _Collections(db, source, db_vec, db_rows,
                                     label == "none" and opts.power is None)
                with_views = opts.regions or opts.turns
                for chain, viewed in [(c, v) for c in chosen_rankers
                                      for v in ((False, True) if with_views else (False,))]:
                    coll, bound = colls.for_chain(chain)
                    contexts = qv.contexts(source) if any(st.uses_keypoints for st in bound) \
                        else None
                    others = [transform.transform(r) if len(r) else r
                              for r in qv.views(source)] if viewed else None
                    per_setup, positions, ns_values, top, missing = _scores_for(
                        gt, qs, rank_chain(bound, q_vec, coll, contexts=contexts,
                                           views=others), keys, db_rows)
                    result.missing_positives = missing
                    name = chain_label(bound)
                    if viewed:
                        asked = "+".join(n for n, on in (("regions", opts.regions),
                                                         ("turns", opts.turns)) if on)
                        name = asked if name == "L2" else f"{asked} + {name}"
                    for setup, scores in per_setup.items():
                        result.cells.append(Cell(source.name, label, dims, setup,
                                                 summarize(scores),
                                                 scores, float(np.mean(ns_values))
                                                 if ns_values else None, positions[setup], name))
                    result.rankings[(source.name, label, dims, name)] = [r for r, _ in top]
                    result.scores[(source.name, label, dims, name)] = [s for _, s in top]
    return result
