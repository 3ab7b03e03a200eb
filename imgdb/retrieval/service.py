"""The one query path: plan -> describe -> post-process -> search -> re-rank.

A `QueryRequest` (`retrieval.request`) becomes a `QueryPlan` (which descriptor, model and index,
refused with the fix when stale); each query becomes a raw vector (a stored image's vector, a
stored file found by its digest, or an image described exactly as ingest did by ONE
`QueryDescriber` per extractor); ONE post-processor (the plan's PCA model, or L2) makes it a
unit vector; ONE search space answers the cosine top-k (an Annoy index, the stored vectors
streamed, or all of them in memory with their kNN graph); then the request's chain of stages
re-ranks (`rerank.rank_chain`). `imgdb query`, `imgdb eval`, `imgdb explain`, `imgdb serve`
and the Python API all go through `QueryService`, so the same question gets the same answer.

Reads of the store are short (the shared lock is held only while reading); network forwards
happen between them, so a running ingest is never held up by a query. A service kept alive (the
server) keeps what it loaded: describers while the extractor's settings hold, search spaces
while the store file, the extractor's revision, the model and the index file are the same.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..digest import file_digest
from ..errors import InvalidRequest, StoreDamaged, UserError
from ..store import StoreView, open_read
from .index import (AnnoySearcher, check_index, list_indexes, rebuild_command, topk_exact,
                    usable_index)
from .pca import model_version, post_processor
from .request import QueryRequest
from .rerank import Collection, QueryContext, Ranking, rank_chain
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
    stages: list[dict] = field(default_factory=list)  # what each re-ranking stage did


@dataclass(frozen=True)
class QueryPlan:
    """Which descriptor, model and index (or exact search) answers the queries."""

    descriptor: str
    model: str | None  # model version (vN) or None
    index: str | None  # registry name, None for exact search
    note: str | None = None  # why a chosen index is not used (a server searching exactly)


@dataclass
class QueryInput:
    """One query: a stored image (`row`), an image file (`path`), or an image already decoded
    (`image`, with the digest of its bytes in `sha`)."""

    name: str
    row: int | None = None
    path: Path | None = None
    image: Any = None
    sha: str | None = None
    data: bytes | None = None  # the file's bytes (an upload), for decoding it another way
    crop: tuple[float, float, float, float] | None = None  # pixels: the image is cropped to it
    region: tuple[float, float, float, float] | None = None  # pixels: only the feature-map
    # cells whose receptive-field centres fall in it are pooled (Babenko sec.4)
    turn: int = 0  # degrees counter-clockwise the decoded image is turned (a view of a query)


# ---------------------------------------------------------------------------------------------
# plan


def plan_query(view: StoreView, db: Path, request: QueryRequest, fallback: bool = False
               ) -> QueryPlan:
    """Choose the index/descriptor a request names; refuse stale or damaged indexes with the
    fix (`fallback`: search that descriptor exactly instead, saying why)."""
    exact = request.exact or request.graph_stages
    index, descriptor, pca = request.index, request.descriptor, request.model
    if index:
        # exact search only borrows the index's descriptor and model: staleness is no matter
        try:
            status = check_index(view, db, index) if exact else usable_index(view, db, index)
        except (UserError, StoreDamaged) as exc:
            if not fallback or "no index" in str(exc):
                raise
            status = check_index(view, db, index)
            model = model_version(status.attrs["model"])
            return QueryPlan(status.attrs["descriptor"], None if model == "none" else model,
                             None, f"index {index} is not used ({str(exc).split(';')[0]}); "
                                   f"searched exactly instead. Rebuild it with: "
                                   f"{rebuild_command(db, status)}")
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
                        f"--descriptor {name}, or search without one ({{exact}})",
                        mentions=("exact",))
    entries = view.indexes()
    if len(entries) == 1:
        return plan_query(view, db, request.with_(index=entries[0].name), fallback)
    if not entries:
        raise UserError(f"the store has no index; build one with: imgdb index build --db {db} "
                        f"--descriptor DESCRIPTOR (see imgdb info), or give {{descriptor}} and "
                        f"{{exact}}", mentions=("descriptor", "exact"))
    raise UserError("the store has several indexes; choose one with {index}: "
                    + ", ".join(e.name for e in entries), mentions=("index",))


# ---------------------------------------------------------------------------------------------
# search spaces: search(q, top) -> Ranking of positions in `rows`; vectors_at(positions)


class StreamedSpace:
    """Every valid stored vector, read in chunks for each search (flat memory)."""

    def __init__(self, db: Path, source: str, transform, rows: np.ndarray) -> None:
        self.db, self.source, self.transform, self.rows = Path(db), source, transform, rows
        self._cache: dict = {}

    def search(self, q: np.ndarray, top: int | None) -> Ranking:
        return self.search_many(np.asarray(q, np.float32)[None], top)[0]

    def search_many(self, queries: np.ndarray, top: int | None) -> list[Ranking]:
        """The top of every query in one streamed pass."""
        with open_read(self.db) as view:
            found = topk_exact(np.asarray(queries, np.float32), view,
                               resolve(view, self.source), self.transform,
                               top or len(self.rows), among=self.rows)
        return [_ranking(self.rows, f) for f in found]

    def vectors_at(self, positions: np.ndarray) -> np.ndarray:
        with open_read(self.db) as view:
            raw = resolve(view, self.source).vectors(view, self.rows[np.asarray(positions)])
        return self.transform.transform(raw) if len(raw) else np.zeros((0, 0), np.float32)


class IndexSpace:
    """A loaded, verified Annoy index (every shard)."""

    def __init__(self, searcher: AnnoySearcher) -> None:
        self.searcher = searcher
        self.rows = np.concatenate([r for _, r in searcher.shards])
        self._order = np.argsort(self.rows, kind="stable")
        self._cache: dict = {}

    def search(self, q: np.ndarray, top: int | None) -> Ranking:
        found = self.searcher(np.asarray(q, np.float32)[None], top or len(self.rows))[0]
        return _ranking(self.rows, found, self._order)

    def vectors_at(self, positions: np.ndarray) -> np.ndarray:
        out = []
        for p in np.asarray(positions, np.int64):
            offset = 0
            for ann, rows in self.searcher.shards:
                if p < offset + len(rows):
                    out.append(ann.get_item_vector(int(p - offset)))
                    break
                offset += len(rows)
        return np.asarray(out, np.float32).reshape(len(out), -1)


def _ranking(rows: np.ndarray, found: list[tuple[int, float]], order: np.ndarray | None = None
             ) -> Ranking:
    """[(row, score)] -> a Ranking of positions in `rows`."""
    ids = np.array([r for r, _ in found], np.int64)
    if order is None:
        pos = np.searchsorted(rows, ids)
    else:
        pos = order[np.searchsorted(rows[order], ids)]
    return Ranking(pos.astype(np.int64), np.array([s for _, s in found], np.float32))


# ---------------------------------------------------------------------------------------------
# the service


def find_stored(sha: np.ndarray, valid: np.ndarray, digests: Sequence[str | None]
                ) -> list[int | None]:
    """The first valid stored row holding the same content (file digest) as each query, or
    None: that query's stored vector answers it."""
    out: list[int | None] = []
    for digest in digests:
        if digest is None:
            out.append(None)
            continue
        hits = np.flatnonzero((sha == str(digest).encode()) & valid)
        out.append(int(hits[0]) if len(hits) else None)
    return out


def check_query_file(path: Path) -> Path:
    """A query image file that exists (a folder or a missing file: one line)."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        raise InvalidRequest(f"query {path} is a directory; give image files", "images")
    if not path.is_file():
        raise UserError(f"query image {path} does not exist")
    return path


def _identity(db: Path) -> tuple:
    st = os.stat(db)
    return st.st_dev, st.st_ino


def _signature(db: Path) -> tuple:
    st = os.stat(db)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class QueryService:
    """Answers query requests on one store; keeps describers and search spaces loaded for as
    long as they match the store (`fallback`: a stale or damaged index is searched exactly,
    with a note, instead of refused: what a server does)."""

    def __init__(self, db: str | Path, device: str = "auto", fallback: bool = False) -> None:
        self.db = Path(db)
        self.device = device
        self.fallback = fallback
        self._lock = threading.RLock()
        self._describers: dict[str, Any] = {}
        self._spaces: dict[tuple, Any] = {}  # by the state of every input
        self._recent: dict[tuple, Any] = {}  # by the store file's stat signature

    # -- plan --------------------------------------------------------------------------------
    def plan(self, request: QueryRequest) -> QueryPlan:
        with open_read(self.db) as view:
            return plan_query(view, self.db, request, self.fallback)

    # -- describe ----------------------------------------------------------------------------
    def describer(self, view: StoreView, extractor: str):
        """The one describer of an extractor (rebuilt when its settings changed)."""
        from .describe import QueryDescriber

        settings = view.settings(extractor)
        with self._lock:
            found = self._describers.get(extractor)
            if found is None or found.settings != settings:
                found = QueryDescriber(view, extractor, None, self.device)
                self._describers[extractor] = found
            return found

    def raw_vectors(self, plan: QueryPlan, inputs: Sequence[QueryInput], bbox=None
                    ) -> tuple[np.ndarray, list[str]]:
        """Raw vectors of the plan's descriptor for each query, and where each came from
        (`store` or `extracted`). A stored id uses its stored vector; an image file or decoded
        image whose content is in the store (same digest) does too, unless `bbox` crops it or a
        region is asked; every other query is described as ingest did, in one batch."""
        with open_read(self.db) as view:
            source = resolve(view, plan.descriptor)
            valid = source.valid(view)
            for q in inputs:
                if q.row is not None and (not 0 <= q.row < len(valid) or not valid[q.row]):
                    raise UserError(f"image id {q.row} is not an ingested image of this store "
                                    f"(ids 0..{len(valid) - 1}; see imgdb info)")
            digests = [None if q.row is not None or bbox is not None or q.region is not None
                       or q.crop is not None or q.turn
                       else q.sha if q.sha is not None else _digest(q.path) for q in inputs]
            found = find_stored(view.column("sha"), valid, digests)
            rows = [q.row if q.row is not None else f for q, f in zip(inputs, found)]
            lookup = sorted({r for r in rows if r is not None})
            stored = dict(zip(lookup, source.vectors(view, lookup))) if lookup else {}
            broken = [r for r in lookup if not np.isfinite(stored[r]).all()]
            if broken:
                raise StoreDamaged(f"the stored vector of image {broken[0]} is not finite: the "
                                   f"store is damaged; repair it with: imgdb repair --db "
                                   f"{self.db}")
            describers = {ext: self.describer(view, ext) for ext in source.extractors} \
                if any(r is None for r in rows) else {}
        todo = [i for i, r in enumerate(rows) if r is None]
        described: dict[int, np.ndarray] = {}
        if todo:  # network forwards: outside the store's lock
            per_ext = {ext: self.describe(d, [inputs[i] for i in todo], bbox)
                       for ext, d in describers.items()}
            for j, i in enumerate(todo):
                described[i] = source.from_described({ext: per_ext[ext][j] for ext in describers})
        raws = [stored[r] if r is not None else described[i] for i, r in enumerate(rows)]
        kinds = ["store" if r is not None else "extracted" for r in rows]
        return np.asarray(raws, np.float32).reshape(len(raws), -1), kinds

    def describe(self, describer, inputs: Sequence[QueryInput], bbox=None, batch: int = 8
                 ) -> list[dict]:
        """Query images -> {(layer, pooling): raw vector} each, by one describer, `batch` images
        decoded and described at a time (files are decoded as ingest decoded the store's;
        `bbox` or each input's `crop` crops them; a `region` keeps the cells in it)."""
        out: list[dict] = []
        describer.start_light()  # the ONNX session is built while the first images decode
        for start in range(0, len(inputs), batch):
            chunk = inputs[start:start + batch]
            images = [_image_for(q, describer, q.crop if q.crop is not None else bbox)
                      for q in chunk]
            regions = [_fraction(q.region, im) for q, im in zip(chunk, images)]
            out += describer.describe_many(images, regions)
        return out

    # -- post-process and search -------------------------------------------------------------
    def space(self, plan: QueryPlan, request: QueryRequest):
        """(search space, post-processor) of a plan, loaded once per state of its inputs (a
        store file whose identity, size and mtime are unchanged is not opened again)."""
        graph_need = max([st.min_graph_k for st in request.rerank] + [0])
        quick = (_signature(self.db), plan, request.search_k,
                 graph_need and (request.graph or "latest"), graph_need)
        with self._lock:
            found = self._recent.get(quick)
        if found is not None:
            return found
        found = self._load_space(plan, request, graph_need)
        with self._lock:
            self._recent = {k: v for k, v in self._recent.items() if k[1] != plan}
            self._recent[quick] = found
        return found

    def _load_space(self, plan: QueryPlan, request: QueryRequest, graph_need: int):
        with open_read(self.db) as view:
            source = resolve(view, plan.descriptor)
            transform, model = post_processor(view, source.name, plan.model)
            key = (_identity(self.db), view.store_id, plan, source.revision(view),
                   model.id if model else None,
                   request.search_k, graph_need and (request.graph or "latest"), graph_need,
                   self._index_key(view, plan))
            with self._lock:
                found = self._spaces.get(key)
            if found is not None:
                return found
            if plan.index is not None:
                space = IndexSpace(AnnoySearcher(view, self.db, plan.index, request.search_k))
            elif graph_need or self.fallback:
                space = self._collection(view, source, transform, model, request, graph_need)
            else:
                space = StreamedSpace(self.db, source.name, transform,
                                      np.flatnonzero(source.valid(view)))
        with self._lock:
            for old in [k for k in self._spaces if k[2] == plan]:
                del self._spaces[old]  # one state of each plan kept
            self._spaces[key] = (space, transform)
        return space, transform

    def _index_key(self, view: StoreView, plan: QueryPlan):
        if plan.index is None:
            return None
        attrs = view.index(plan.index).attrs
        return attrs.get("file_hash"), str(attrs.get("created", ""))

    def _collection(self, view: StoreView, source: VectorSource, transform, model,
                    request: QueryRequest, graph_need: int) -> Collection:
        rows, raw = source.valid_vectors(view)
        graph = None
        if graph_need:
            from .graph import find_graph, load_graph

            gm = find_graph(view, self.db, source, model, request.graph, graph_need)
            graph = load_graph(view, gm)
            if not np.array_equal(rows, graph.rows):  # a current graph covers the valid rows
                raise UserError(f"graph {gm.id} does not cover the store's images; rebuild it")
        vectors = transform.transform(raw) if len(rows) else np.zeros((0, source.dim), np.float32)
        return Collection(vectors, graph, rows=rows)

    # -- other views of the query: crops and turns ---------------------------------------------
    def view_vectors(self, plan: QueryPlan, request: QueryRequest,
                     inputs: Sequence[QueryInput]) -> list[np.ndarray]:
        """Each query's post-processed vectors of the views the request asks (`view_raw`)."""
        raws = self.view_raw(plan, inputs, request.bbox, request.regions, request.turns)
        return [self.post_process(plan, request, r) if len(r) else r for r in raws]

    def view_raw(self, plan: QueryPlan, inputs: Sequence[QueryInput], bbox=None,
                 regions: bool = True, turns: bool = False) -> list[np.ndarray]:
        """Each query's raw vectors of its views (`view_inputs`), described as query files
        are, in one batch."""
        views, owner = self.view_inputs(inputs, bbox, regions, turns)
        if not views:
            return [np.zeros((0, 0), np.float32) for _ in inputs]
        raws, _ = self.raw_vectors(plan, views)
        return [raws[owner == i] for i in range(len(inputs))]

    def view_inputs(self, inputs: Sequence[QueryInput], bbox=None, regions: bool = True,
                    turns: bool = False) -> tuple[list[QueryInput], np.ndarray]:
        """The other views of every query as query inputs, and the query each belongs to:
        its crops (`views.query_boxes`, inside `bbox` or the input's crop) and its turns
        (`views.TURNS`); a stored image is read from its file."""
        from .views import TURNS, query_boxes

        views, owner = [], []
        for i, q in enumerate(inputs):
            source = self._region_source(q)
            box = q.crop if q.crop is not None else bbox
            found = []
            if regions:
                width, height = self._upright_size(source)
                found += [(b, 0) for b in query_boxes(width, height, box)]
            if turns:
                found += [(box, t) for t in TURNS]
            for b, t in found:
                views.append(QueryInput(f"{q.name}#{len(views)}", path=source.path,
                                        data=source.data, crop=b, turn=t))
                owner.append(i)
        return views, np.asarray(owner, np.int64)

    def _region_source(self, q: QueryInput) -> QueryInput:
        """The query as an image file or bytes that can be cropped (a stored id: its file)."""
        if q.path is not None or q.data is not None:
            return q
        if q.row is not None:
            with open_read(self.db) as view:
                path = Path(view.paths([q.row])[0])
            if path.is_file():
                return QueryInput(q.name, path=path)
            raise UserError(f"image {q.row} is not at {path} any more; a query's crops and "
                            f"turns are taken from its file")
        raise UserError(f"query {q.name} has no image file to take other views of")

    @staticmethod
    def _upright_size(q: QueryInput) -> tuple[int, int]:
        from ..features.images import ImageError, upright_size

        try:
            return upright_size(q.path if q.path is not None else q.data)
        except ImageError as exc:
            raise UserError(f"cannot use query image {q.name}: {exc}") from None

    # -- keypoints for verification ----------------------------------------------------------
    def keypoint_extractor(self, view: StoreView, plan: QueryPlan) -> str:
        """The extractor whose verification keypoints serve the plan's descriptor (an encoding's
        base extractor; the first of a fusion that keeps them)."""
        source = resolve(view, plan.descriptor)
        names = []
        for ext in source.extractors:
            enc = view.settings(ext).get("encoding")
            names.append(enc["extractor"] if enc else ext)
        for ext in names:
            if view.verify_set(ext) is not None:
                return ext
        raise UserError(f"the store keeps no keypoints for verification of {plan.descriptor}; "
                        f"add them with: imgdb ingest FOLDER --db {self.db} {{verify_features}} "
                        f"sift (no forward runs again)", mentions=("verify_features",))

    def stored_keypoints(self, extractor: str, rows: Sequence[int]) -> list:
        """`verify.Keypoints` of stored rows (None where a row has none)."""
        from .verify import Keypoints

        rows = [int(r) for r in rows]
        with open_read(self.db) as view:
            info = view.verify_set(extractor)
            if info is None:
                return [None] * len(rows)
            grids = dict(zip(rows, view.local_grids(info, rows)))
            found = {r: Keypoints.from_stored(f, c, grids[r])
                     for r, f, c in view.iter_local(info, rows)}
        return [found.get(r) for r in rows]

    def contexts(self, plan: QueryPlan, inputs: Sequence[QueryInput], bbox=None
                 ) -> list[QueryContext]:
        """Each query's keypoints (a stored image's, or found in its image as ingest found the
        store's) and a reader of the database's, for verification."""
        from ..features.verifyfeat import VerifySettings, sift_features
        from .verify import Keypoints

        with open_read(self.db) as view:
            ext = self.keypoint_extractor(view, plan)
            settings = VerifySettings.from_settings(view.settings(ext))
            describer = self.describer(view, ext)
            valid = view.valid(ext)
            digests = [None if q.row is not None or bbox is not None or q.crop is not None
                       else q.sha if q.sha is not None else _digest(q.path) for q in inputs]
            found = find_stored(view.column("sha"), valid, digests)
        rows = [q.row if q.row is not None else f for q, f in zip(inputs, found)]
        stored = dict(zip([r for r in rows if r is not None],
                          self.stored_keypoints(ext, [r for r in rows if r is not None])))
        out = []
        for q, r in zip(inputs, rows):
            if r is not None:
                kp = stored[r]
                if kp is not None and q.region is not None:
                    w, h = self._image_size(r)
                    x1, y1, x2, y2 = q.region
                    kp = kp.inside((x1 / w, y1 / h, x2 / w, y2 / h)) if w and h else kp
            else:
                image = self._verify_image(q, describer, q.crop if q.crop is not None else bbox,
                                           settings.for_query().side)
                ls = sift_features(image.pixels[0], settings.for_query())
                kp = Keypoints.from_stored(ls.features, ls.coords, ls.grid)
                kp = kp.inside(_fraction(q.region, image))
            out.append(QueryContext(kp, lambda rs, ext=ext: self.stored_keypoints(ext, rs)))
        return out

    @staticmethod
    def _verify_image(q: QueryInput, describer, crop, side: int):
        """A query image for keypoint detection: a file (or an upload's bytes) decoded at
        `side` px (a photo's object may be small); else the image as it was decoded."""
        from ..features.images import ImageError, decode_query_bytes, load_query_image

        settings = dict(describer.base, size=f"max:{side}", scales=[1.0])
        if q.path is not None:
            return load_query_image(q.path, settings, crop)
        if q.data is not None:
            try:
                return decode_query_bytes(q.data, settings, crop)
            except ImageError as exc:
                raise UserError(f"cannot use query image {q.name}: {exc}") from None
        return _image_for(q, describer, crop)

    def _image_size(self, row: int) -> tuple[int, int]:
        with open_read(self.db) as view:
            table = view.images()
            return int(table.width[row]), int(table.height[row])

    def rank(self, plan: QueryPlan, request: QueryRequest, queries: np.ndarray,
             contexts: Sequence[QueryContext | None] | None = None,
             views: Sequence[np.ndarray] | None = None) -> list[list[tuple[int, float]]]:
        """Post-processed query vectors -> per query [(row, score)], best first: the top-k of
        the plan's space, then the request's chain of stages (`contexts`: each query's
        keypoints, which a verification stage needs)."""
        space, _ = self.space(plan, request)
        bound = self.chain(plan, request)
        rankings = rank_chain(bound, queries, space, request.k, contexts, views)
        return [[(int(space.rows[p]), float(s)) for p, s in zip(r.order, r.scores)]
                for r in rankings]

    def chain(self, plan: QueryPlan, request: QueryRequest) -> list:
        """The request's stages bound to the plan's space (a stage that steps aside on this
        collection says why: `Ranker.report`)."""
        space, _ = self.space(plan, request)
        return [st.bind(space) for st in request.chain]

    def post_process(self, plan: QueryPlan, request: QueryRequest, raw: np.ndarray
                     ) -> np.ndarray:
        """Raw vectors -> the plan's unit vectors (its PCA model, or L2)."""
        _, transform = self.space(plan, request)
        return transform.transform(np.asarray(raw, np.float32))

    # -- everything --------------------------------------------------------------------------
    def answer(self, request: QueryRequest, files: Sequence[Path] = (), ids: Sequence[int] = ()
               ) -> tuple[QueryPlan, list[QueryResult]]:
        """Answer each query image file (or stored id) with its top-k hits."""
        request.check(len(files), len(ids))
        files = [check_query_file(p) for p in files]
        plan = self.plan(request)
        inputs = [QueryInput(str(i), row=int(i)) for i in ids] + \
                 [QueryInput(str(p), path=p) for p in files]
        raws, kinds = self.raw_vectors(plan, inputs, request.bbox)
        contexts = self.contexts(plan, inputs, request.bbox) if request.uses_keypoints else None
        views = self.view_vectors(plan, request, inputs) if request.views else None
        hits = self.rank(plan, request, self.post_process(plan, request, raws), contexts,
                         views)
        with open_read(self.db) as view:
            paths = view.paths(np.array([r for found in hits for r, _ in found], np.int64))
            id_paths = view.paths(list(ids)) if ids else []
        names = [*id_paths, *(str(p) for p in files)]
        results, i = [], 0
        stages = [st.report() for st in self.chain(plan, request)]
        for name, kind, found in zip(names, kinds, hits):
            res = QueryResult(name, kind, stages=stages)
            for rank, (r, score) in enumerate(found, start=1):
                res.hits.append(Hit(rank, int(r), float(score), paths[i]))
                i += 1
            results.append(res)
        return plan, results


def _image_for(q: QueryInput, describer, bbox):
    """A query's image as the describer's extractor decodes it (decoded already, or loaded
    from its file), turned when the input is a turn of it."""
    image = _decoded_for(q, describer, bbox)
    if not q.turn:
        return image
    from dataclasses import replace

    quarter = (q.turn // 90) % 4
    pixels = [np.ascontiguousarray(np.rot90(p, quarter)) for p in image.pixels]
    w, h = (image.height, image.width) if quarter % 2 else (image.width, image.height)
    return replace(image, pixels=pixels, width=w, height=h)


def _decoded_for(q: QueryInput, describer, bbox):
    if q.image is not None:
        return q.image[describer.extractor] if isinstance(q.image, dict) else q.image
    if q.path is None and q.data is not None:  # an upload, cropped (a region of it)
        from ..features.images import ImageError, decode_query_bytes

        try:
            return decode_query_bytes(q.data, describer.base, bbox)
        except ImageError as exc:
            raise UserError(f"cannot use query image {q.name}: {exc}") from None
    if q.path is None:
        raise UserError(f"query {q.name} has no image to describe")
    return describer.load(q.path, bbox)


def _fraction(region, image):
    """A pixel box -> fractions of the image (the feature-map region of Babenko sec.4)."""
    if region is None:
        return None
    x1, y1, x2, y2 = region
    return (x1 / image.width, y1 / image.height, x2 / image.width, y2 / image.height)


def _digest(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return file_digest(path)
    except OSError:
        return None


__all__ = ["Hit", "QueryResult", "QueryPlan", "QueryInput", "QueryService", "plan_query",
           "find_stored", "check_query_file", "StreamedSpace", "IndexSpace"]
