"""The search engine behind `imgdb serve`: the store read as a reader, networks, models and
indexes loaded once, queries and explanation maps. No HTTP here (see `app`).

Queries go through the one query path (`retrieval.service.QueryService`), exactly as `imgdb
query` and `imgdb eval` answer them; what this adds is what a long-lived server needs: the
image table kept in memory (and re-read when the store file changed: every request compares
the file's identity, size and mtime with the ones last read), a micro-batcher so concurrent
new-image queries share a forward, thumbnails, and query images kept for their maps. The
service keeps each loaded search space only while the store file (its inode), the extractor's
revision, the model and the index file are the ones it was loaded from; a stale or damaged
index is never used: its descriptor is searched exactly and the answer says so with the command
that rebuilds it.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import UserError
from ..retrieval.request import QueryRequest
from ..retrieval.service import QueryPlan, QueryService
from ..store import STATUS_OK, open_read
from .batcher import MicroBatcher

THUMB_SIDE = 320
FULL_SIDE = 2048
MAX_K = 100
MAX_QE = 50
#: Forwards one occlusion map may take (the default patch and stride take 25-60).
MAX_OCCLUSION_POSITIONS = 400


class RequestError(UserError):
    """A request that cannot be answered: `status` is the HTTP status (4xx)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Choice:
    """What a query searches: an index (descriptor + model), or a descriptor searched exactly."""

    key: str  # the index name, or the descriptor name for exact search
    descriptor: str
    model: str | None  # vN or None
    index: str | None

    def request(self, **values) -> QueryRequest:
        """The query request of this choice (with the request's own values)."""
        if self.index is not None:
            return QueryRequest(index=self.index, **values)
        return QueryRequest(descriptor=self.descriptor, model=self.model or "none", exact=True,
                            **values)


@dataclass
class StoreState:
    signature: tuple
    rows: int
    paths: list[str]
    sha: np.ndarray
    status: np.ndarray
    width: np.ndarray
    height: np.ndarray
    valid: dict[str, np.ndarray]
    revision: dict[str, int]
    settings: dict[str, dict]
    choices: list[Choice]
    index_state: dict[str, str | None]  # index name -> None (current) or why not usable
    index_attrs: dict[str, dict]
    descriptors: list[str]
    loaded_at: float


@dataclass
class QueryImage:
    """A query kept for the explanation maps: the decoded image (as the network saw it)."""

    token: str
    extractor: str
    image: Any  # DecodedImage
    row: int | None = None


def _signature(db: Path) -> tuple:
    try:
        st = os.stat(db)
    except OSError as exc:
        raise RequestError(f"the store {db} cannot be read now ({exc.strerror})", 503) from None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class Engine:
    """Everything a server answers with, loaded once and kept current with the store."""

    def __init__(self, db: str | Path, descriptor: str | None = None, index: str | None = None,
                 device: str = "auto", max_pixels: int = 40_000_000, max_batch: int = 8,
                 linger: float = 0.05, warm: bool = True) -> None:
        from ..store.reader import check_exists

        self.db = Path(db)
        check_exists(self.db)
        _single_thread_blas()
        self.device = device
        self.max_pixels = int(max_pixels)
        self.service = QueryService(self.db, device, fallback=True)
        self._lock = threading.RLock()
        self._state: StoreState | None = None
        self._plans: dict[tuple, QueryPlan] = {}
        self._queries: OrderedDict[str, QueryImage] = OrderedDict()
        self._thumbs: OrderedDict[tuple, bytes] = OrderedDict()
        self._thumb_bytes = 0
        self.batcher = MicroBatcher(self._forward, max_batch=max_batch, linger=linger)
        self.explain_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgdb-explain")
        self.state()
        self.default = self._default_choice(descriptor, index)
        if warm:
            self.warm()

    # -- the store ---------------------------------------------------------------------------
    def state(self) -> StoreState:
        """The store as last read, re-read first when the file changed."""
        sig = _signature(self.db)
        current = self._state
        if current is not None and current.signature == sig:
            return current
        with self._lock:
            if self._state is not None and self._state.signature == _signature(self.db):
                return self._state
            self._state = self._read_state()
            self._plans.clear()
            return self._state

    def _read_state(self) -> StoreState:
        from ..retrieval.index import check_index
        from ..retrieval.pca import model_version

        while True:
            before = _signature(self.db)
            with open_read(self.db) as view:
                extractors = view.extractors()
                descriptors = [d.name for d in view.descriptors()]
                choices, index_state, index_attrs = [], {}, {}
                for entry in view.indexes():
                    status = check_index(view, self.db, entry.name)
                    model = model_version(status.attrs["model"])
                    choices.append(Choice(entry.name, status.attrs["descriptor"],
                                          None if model == "none" else model, entry.name))
                    index_state[entry.name] = status.stale
                    index_attrs[entry.name] = status.attrs
                choices += [Choice(d, d, None, None) for d in descriptors]  # exact, raw + L2
                state = StoreState(
                    signature=before, rows=view.rows, paths=view.paths(),
                    sha=view.column("sha"), status=view.column("status"),
                    width=view.column("width"), height=view.column("height"),
                    valid={e: view.valid(e) for e in extractors},
                    revision={e: view.revision(e) for e in extractors},
                    settings={e: view.settings(e) for e in extractors},
                    choices=choices, index_state=index_state, index_attrs=index_attrs,
                    descriptors=descriptors, loaded_at=time.time())
            if _signature(self.db) == before:  # no commit slipped in between stat and read
                return state

    def _default_choice(self, descriptor: str | None, index: str | None) -> Choice:
        state = self.state()
        if index:
            return self.choice(index)
        if descriptor:
            with open_read(self.db) as view:
                name = view.descriptor(descriptor).name
            matching = [c for c in state.choices if c.descriptor == name]
            current = [c for c in matching if c.index and state.index_state[c.index] is None]
            return (current or matching)[-1]
        indexed = [c for c in state.choices if c.index]
        if indexed:
            current = [c for c in indexed if state.index_state[c.index] is None] or indexed
            return max(current, key=lambda c: str(state.index_attrs[c.index].get("created", "")))
        if not state.choices:
            raise UserError(f"the store {self.db} has no descriptors yet; ingest images first: "
                            f"imgdb ingest PHOTOS --db {self.db}")
        return state.choices[0]

    def choice(self, key: str | None) -> Choice:
        """The index or descriptor a request names (None: the default)."""
        if not key:
            return self.default
        state = self.state()
        for c in state.choices:
            if c.key == key:
                return c
        for c in state.choices:  # a descriptor by a unique suffix, as the CLI accepts it
            if c.index is None and c.descriptor.endswith("/" + key.strip("/")):
                return c
        known = ", ".join(c.key for c in state.choices if c.index) or "none"
        raise RequestError(f"unknown index or descriptor {key!r}; indexes: {known}; or any "
                           f"descriptor listed by /info", 400)

    # -- the query path ----------------------------------------------------------------------
    def plan(self, request: QueryRequest) -> QueryPlan:
        """The service's plan of a request, kept until the store file changes."""
        state = self.state()
        key = (request.descriptor, request.model, request.index, request.exact,
               request.graph_stages, state.signature)
        found = self._plans.get(key)
        if found is None:
            try:
                found = self.service.plan(request)
            except UserError as exc:
                raise RequestError(str(exc), 409) from None
            with self._lock:
                self._plans[key] = found
        return found

    def describer(self, extractor: str):
        """The service's describer of an extractor (the same one `imgdb query` builds)."""
        with open_read(self.db) as view:
            return self.service.describer(view, extractor)

    def _forward(self, key, images):
        """The batcher's work: one extractor's queued images -> raw vectors, one batched
        forward (the service's describer)."""
        return self.describer(key).describe_many(list(images))

    def warm(self) -> None:
        """Load the default space and network and describe one image (first queries are fast)."""
        from types import SimpleNamespace

        from ..features.images import SizePolicy

        request = self.default.request()
        self.service.space(self.plan(request), request)
        extractor = self.extractor(self.default)
        describer = self.describer(extractor)
        describer.prepare()
        width, height = SizePolicy.parse(describer.base["size"]).target(512, 384)
        probe = np.full((height, width, 3), 128, np.uint8)
        self._forward(extractor, [SimpleNamespace(pixels=[probe] * len(describer.base["scales"]))])

    @staticmethod
    def extractor(choice: Choice) -> str:
        return choice.descriptor.split("/")[0]

    @staticmethod
    def pair(choice: Choice) -> tuple[str, str]:
        """(layer, pooling) of a searchable choice's descriptor."""
        _, layer, pooling = choice.descriptor.rsplit("/", 2)
        return layer, pooling

    def source(self, plan: QueryPlan):
        """The vector source of a plan's descriptor (kept until the store file changes)."""
        from ..retrieval.source import resolve

        key = ("source", plan.descriptor, self.state().signature)
        found = self._plans.get(key)
        if found is None:
            with open_read(self.db) as view:
                found = resolve(view, plan.descriptor)
            with self._lock:
                self._plans[key] = found
        return found

    def extractors(self, plan: QueryPlan) -> list[str]:
        """The extractors whose vectors make a plan's descriptor (several for a fusion)."""
        return list(self.source(plan).extractors)

    def combine(self, plan: QueryPlan, described: dict) -> np.ndarray:
        """Each extractor's description of one query -> the plan's raw vector."""
        return self.source(plan).from_described(described)

    def stored_vector(self, plan: QueryPlan, row: int) -> np.ndarray:
        """The raw stored vector of a row (the service's lookup)."""
        from ..retrieval.service import QueryInput

        return self.service.raw_vectors(plan, [QueryInput(str(row), row=row)])[0][0]

    def rank(self, plan: QueryPlan, request: QueryRequest, raw: np.ndarray, query=None,
             size: tuple[int, int] | None = None
             ) -> tuple[list[tuple[int, float]], dict[int, dict]]:
        """A raw query vector -> top-k (row, score) after the request's stages (`query`: the
        service's QueryInput, whose keypoints a verification stage reads), and what
        verification found for each verified result (`explain.geometry_json`, in original
        pixels of the query of upright `size` and of the result)."""
        try:
            vector = self.service.post_process(plan, request, raw[None])
            contexts = self.service.contexts(plan, [query], request.bbox) \
                if request.uses_keypoints and query is not None else None
            views = self.service.view_vectors(plan, request, [query]) \
                if request.views and query is not None else None
            hits = self.service.rank(plan, request, vector, contexts, views)[0]
        except UserError as exc:
            if isinstance(exc, RequestError):
                raise
            raise RequestError(str(exc), 409) from None
        found = self._verified(request, contexts[0], hits, query, size) if contexts else {}
        return hits, found

    def _verified(self, request: QueryRequest, context, hits, query, size) -> dict[int, dict]:
        from ..retrieval.explain import geometry_json

        minimum = min(st.min_inliers for st in request.rerank if st.uses_keypoints)
        rows = [r for r, _ in hits if r in context.found
                and context.found[r].inliers >= minimum]
        if not rows or context.keypoints is None or size is None:
            return {}
        crop = getattr(query, "crop", None)
        frame = (crop[0], crop[1], crop[2] - crop[0], crop[3] - crop[1]) if crop else \
            (0, 0, size[0], size[1])
        out = {}
        for row, other in zip(rows, context.database(rows)):
            if other is not None:
                w, h = self.service._image_size(row)
                out[row] = geometry_json(context.keypoints, other, context.found[row], frame,
                                         (w, h))
                out[row]["verified"] = True
                out[row]["result_pixels"] = [w, h]
        return out

    def post_vector(self, choice: Choice, row: int) -> np.ndarray:
        """The post-processed vector of a stored row under a choice."""
        request = choice.request()
        plan = self.plan(request)
        return self.service.post_process(plan, request, self.stored_vector(plan, row)[None])[0]

    def transform(self, choice: Choice):
        request = choice.request()
        return self.service.space(self.plan(request), request)[1]

    # -- queries -----------------------------------------------------------------------------
    def decode(self, data: bytes, extractor: str, bbox: tuple | None):
        """Upload bytes -> the image decoded as ingest decoded the store's (4xx on bad input)."""
        from ..features.images import ImageError, decode_query_bytes

        settings = self._base_settings(extractor)
        try:
            return decode_query_bytes(data, settings, bbox, self.max_pixels)
        except ImageError as exc:
            text = str(exc)
            status = 413 if text.startswith("image too large") else \
                415 if text.startswith("not an image") else 400
            raise RequestError(f"cannot use the uploaded image: {text}", status) from None

    def load_row(self, row: int, extractor: str, bbox: tuple | None):
        """A stored image decoded again as ingest did (for a box query or maps of a result)."""
        from ..features.images import ImageError, decode_query_bytes

        data = self.row_bytes(row)
        try:
            return decode_query_bytes(data, self._base_settings(extractor), bbox, self.max_pixels)
        except ImageError as exc:
            raise RequestError(f"cannot use image {row}: {exc}", 400) from None

    def _base_settings(self, extractor: str) -> dict:
        settings = self.state().settings[extractor]
        enc = settings.get("encoding")
        return self.state().settings[enc["extractor"]] if enc else settings

    def check_row(self, row: int, extractor: str | None = None) -> None:
        state = self.state()
        if not 0 <= row < state.rows:
            raise RequestError(f"no image {row} in the store (ids 0..{state.rows - 1})", 404)
        if state.status[row] != STATUS_OK:
            raise RequestError(f"image {row} is not an ingested image (failed or missing)", 404)
        if extractor is not None and not state.valid[extractor][row]:
            raise RequestError(f"image {row} has no vectors of {extractor} yet", 404)

    def stored_row(self, sha: str, extractors) -> int | None:
        """A valid stored row with this content digest (its stored vector answers the query)."""
        from ..retrieval.service import find_stored

        state = self.state()
        names = [extractors] if isinstance(extractors, str) else list(extractors)
        valid = np.logical_and.reduce([state.valid[e] for e in names])
        return find_stored(state.sha, valid, [sha])[0]

    def keep_query(self, extractor: str, image, row: int | None = None) -> str:
        token = secrets.token_hex(12)
        with self._lock:
            self._queries[token] = QueryImage(token, extractor, image, row)
            # the latest 64 queries, within 256 MiB of pixels (for their maps)
            while len(self._queries) > 1 and (
                    len(self._queries) > 64 or sum(sum(p.nbytes for p in q.image.pixels)
                                                   for q in self._queries.values()) > 256 << 20):
                self._queries.popitem(last=False)
        return token

    def query_image(self, token: str) -> QueryImage:
        with self._lock:
            found = self._queries.get(token)
        if found is None:
            raise RequestError("unknown or expired query token; query again", 404)
        return found

    def results(self, hits: list[tuple[int, float]]) -> list[dict]:
        state = self.state()
        out = []
        for rank, (row, score) in enumerate(hits, start=1):
            path = state.paths[row] if row < len(state.paths) else ""
            out.append({"rank": rank, "id": row, "score": round(float(score), 6), "path": path,
                        "name": Path(path).name, "thumbnail": f"/images/{row}?size=thumb",
                        "image": f"/images/{row}"})
        return out

    # -- images ------------------------------------------------------------------------------
    def row_bytes(self, row: int) -> bytes:
        """The file of a stored row, if it still holds what was ingested."""
        self.check_row(row)
        state = self.state()
        path = state.paths[row]
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 30)
        except OSError as exc:
            raise RequestError(f"the file of image {row} cannot be read ({exc.strerror})",
                               404) from None
        if hashlib.blake2b(data, digest_size=16).hexdigest().encode() != state.sha[row]:
            raise RequestError(f"the file of image {row} changed since it was ingested; rerun "
                               f"imgdb ingest to update the store", 409)
        return data

    def picture(self, row: int, size: str) -> bytes:
        """A JPEG of a stored row: `thumb` (320 px) or `full` (at most 2048 px a side)."""
        if size not in ("thumb", "full"):
            raise RequestError("size must be thumb or full", 400)
        self.check_row(row)
        state = self.state()
        key = (row, bytes(state.sha[row]), size)
        with self._lock:
            cached = self._thumbs.get(key)
            if cached is not None:
                self._thumbs.move_to_end(key)
                return cached
        jpeg = jpeg_bytes(self.row_bytes(row), THUMB_SIDE if size == "thumb" else FULL_SIDE,
                          self.max_pixels)
        with self._lock:
            self._thumbs[key] = jpeg
            self._thumb_bytes += len(jpeg)
            while self._thumb_bytes > 64 << 20:
                _, old = self._thumbs.popitem(last=False)
                self._thumb_bytes -= len(old)
        return jpeg

    # -- info --------------------------------------------------------------------------------
    def info(self) -> dict:
        state = self.state()
        choices = []
        for c in state.choices:
            stale = state.index_state.get(c.index) if c.index else None
            choices.append({"key": c.key, "descriptor": c.descriptor, "model": c.model or "none",
                            "index": c.index, "search": "index" if c.index else "exact",
                            "state": "current" if stale is None else f"stale: {stale}"})
        return {"store": str(self.db), "rows": state.rows,
                "images_ok": int((state.status == STATUS_OK).sum()),
                "default": self.default.key, "choices": choices,
                "extractors": [{"name": e, "size": s.get("size"), "backbone": s.get("backbone"),
                                "valid": int(state.valid[e].sum())}
                               for e, s in state.settings.items()],
                "max_k": MAX_K, "max_qe": MAX_QE, "max_pixels": self.max_pixels,
                "max_occlusion_positions": MAX_OCCLUSION_POSITIONS,
                "batches": list(self.batcher.batches)[-20:]}

    def close(self) -> None:
        self.batcher.close()
        self.explain_pool.shutdown(wait=False, cancel_futures=True)


def _single_thread_blas() -> None:
    """numpy's BLAS on one thread in the server: its products here are small (a query against
    at most ~10^4 vectors, a PCA of one vector) and the cores belong to the network. With two
    threads each product pays a wake-up of the BLAS worker, tens of milliseconds when the cores
    are busy (measured: 24 ms against 0.1 ms for 10,000 x 128), and the worker's spinning
    slows the next forward."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn brings it; without it, BLAS keeps its threads
        return
    threadpool_limits(1, user_api="blas")


def jpeg_bytes(data: bytes, side: int, max_pixels: int) -> bytes:
    """Image bytes -> an upright RGB JPEG at most `side` px a side (decoded with a pixel limit)."""
    from PIL import Image, ImageOps

    from ..features.images import open_formats

    try:
        with Image.open(io.BytesIO(data), formats=open_formats()) as im:
            if im.size[0] * im.size[1] > max_pixels:
                raise RequestError(f"image of {im.size[0]}x{im.size[1]} pixels is over the "
                                   f"server's limit", 413)
            im.draft("RGB", (side, side))
            im = ImageOps.exif_transpose(im)
            im.thumbnail((side, side))
            if im.mode != "RGB":
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, rgba).convert("RGB")
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
            return buf.getvalue()
    except RequestError:
        raise
    except Exception as exc:
        raise RequestError(f"the image cannot be decoded ({type(exc).__name__})", 415) from None


def array_jpeg(pixels: np.ndarray, quality: int = 88) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# explanation maps

EXPLAIN_KINDS = ("crow", "similarity", "occlusion")


def explain(engine: Engine, kind: str, on: str, choice: Choice, result: int,
            query: QueryImage | None, query_row: int | None, patch: int | None = None,
            stride: int | None = None, cancelled: Callable[[], bool] | None = None
            ) -> tuple[Any, np.ndarray]:
    """One explanation map of a query/result pair -> (ExplanationMap, the image it lies on).
    `cancelled`: asked between forwards (a client that went away stops the work)."""
    from ..retrieval.explain import Explainer

    if kind not in EXPLAIN_KINDS:
        raise RequestError(f"unknown map {kind!r}; maps: {', '.join(EXPLAIN_KINDS)}", 400)
    if on not in ("query", "result"):
        raise RequestError("on must be query or result", 400)
    extractor = choice.descriptor.split("/")[0]
    engine.check_row(result, extractor)
    if query is None and query_row is None:
        raise RequestError("give the query: query=TOKEN (from /query) or query_id=ID", 400)
    if query is not None and query.extractor != extractor:
        raise RequestError("the query was described for another extractor; query again", 409)
    if query_row is not None:
        engine.check_row(query_row, extractor)
    layer, pooling = Engine.pair(choice)
    ex = Explainer(engine.describer(extractor), layer, pooling, engine.transform(choice))
    if ex.describer.encoding is not None:
        ex.layer = ex.describer.encoding["key"].split(":")[0]

    def stored(row: int) -> np.ndarray:
        return engine.post_vector(choice, row)

    query_image = query.image if query is not None else engine.load_row(query_row, extractor, None)
    if on == "result":
        image = engine.load_row(result, extractor, None)
        other = stored(query_row) if query is None else ex.vector(query.image)
    else:
        image = query_image
        other = stored(result)
    try:
        if kind == "crow":
            m = ex.crow_map(image)
        elif kind == "similarity":
            m = ex.similarity_map(image, other)
        else:
            m = ex.occlusion_map(image, other, patch, stride,
                                 max_positions=MAX_OCCLUSION_POSITIONS, cancelled=cancelled)
    except UserError as exc:
        raise RequestError(str(exc), 400) from None
    return m, image.pixels[0]
