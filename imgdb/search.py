"""Query pipeline: query descriptor (stored or extracted as ingest did) -> model -> index -> hits.

Optional average query expansion (Kalantidis et al. sec.5.1): the query plus its top-M results,
L2-normalised, searched again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from .digest import file_digest
from .errors import UserError
from .index import (check_index, index_path, list_indexes, post_processor, rebuild_command,
                    topk_exact)
from .store import extractor_attrs, open_read, read_column, resolve_descriptor, valid_mask
from .whitening import l2_normalize


DEFAULT_SEARCH_K = 10_000  # candidates Annoy inspects: recall@10 0.9999 at 1M x 256 (RESULTS)


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
    model: str | None  # model version or None
    index: str | None  # registry name, None for exact search


def plan_query(fh: h5py.File, db: Path, index: str | None, descriptor: str | None,
               pca: str | None, exact: bool) -> QueryPlan:
    """Choose the index/descriptor from the options; refuse stale indexes with the fix."""
    if index:
        info = check_index(fh, db, index, full_hash=False)
        if info.stale and not exact:
            raise UserError(f"index {index} is stale ({info.stale}); rebuild it with: "
                            f"{rebuild_command(db, info)}")
        model = info.attrs["model"].rsplit("/", 1)[-1] if info.attrs["model"] != "none" else None
        return QueryPlan(info.attrs["descriptor"], model, None if exact else index)
    if descriptor:
        name = resolve_descriptor(fh, descriptor).name
        if exact:
            return QueryPlan(name, pca, None)
        candidates = [i for i in list_indexes(fh, db) if i.attrs["descriptor"] == name
                      and (pca is None or i.attrs["model"].endswith("/" + pca)
                           or (pca == "none" and i.attrs["model"] == "none"))]
        current = [i for i in candidates if not i.stale]
        if current:
            chosen = current[-1]
            model = chosen.attrs["model"].rsplit("/", 1)[-1] if chosen.attrs["model"] != "none" else None
            return QueryPlan(name, model, chosen.name)
        if candidates:
            raise UserError(f"index {candidates[0].name} is stale ({candidates[0].stale}); rebuild "
                            f"it with: {rebuild_command(db, candidates[0])}")
        raise UserError(f"no index for {name}; build one with: imgdb index build --db {db} "
                        f"--descriptor {name}, or search without one with --exact")
    indexes = list_indexes(fh, db)
    if len(indexes) == 1:
        return plan_query(fh, db, indexes[0].name, None, None, exact)
    if not indexes:
        raise UserError(f"the store has no index; build one with: imgdb index build --db {db} "
                        f"--descriptor DESCRIPTOR (see imgdb info), or pass --descriptor and --exact")
    raise UserError("the store has several indexes; choose one with --index: "
                    + ", ".join(i.name for i in indexes))


def _stored_row(sha: np.ndarray, valid: np.ndarray, path: Path) -> int | None:
    """Row of a valid stored image with the same content as `path` (found by file digest)."""
    try:
        digest = file_digest(path).encode()
    except OSError:
        return None
    hits = np.flatnonzero((sha == digest) & valid)
    return int(hits[0]) if len(hits) else None


class _Extractor:
    """Rebuilds the store's extractor for one (layer, pooling), lazily (torch only if needed)."""

    def __init__(self, fh: h5py.File, settings: dict, layer: str, pooling: str, device: str) -> None:
        self.fh, self.settings, self.layer, self.pooling, self.device = fh, settings, layer, pooling, device
        self._ext = None

    def __call__(self, path: Path, bbox: tuple[float, float, float, float] | None) -> np.ndarray:
        from .backbones import get_backbone, stored_weights
        from .extract import FeatureExtractor, resolve_device
        from .images import load_query_image

        s = self.settings
        if "encoding" in s:  # a codebook encoding: local features of the image, then encode
            if self._ext is None:
                from .codebook import EncodedDescriber

                self._ext = EncodedDescriber(self.fh, s["encoding"], self.device)
            return self._ext.describe(self._ext.load(path, bbox).pixels)
        if self._ext is None:
            self._ext = FeatureExtractor(get_backbone(s["backbone"]), stored_weights(s), (self.layer,),
                                         (self.pooling,), resolve_device(self.device))
        img = load_query_image(path, s, bbox)
        return self._ext.describe(img.pixels)[(self.layer, self.pooling)]


def run_queries(db: Path, images: Sequence[Path], ids: Sequence[int], plan: QueryPlan, k: int,
                bbox: tuple[float, float, float, float] | None = None, qe: int = 0,
                device: str = "auto", search_k: int | None = None) -> list[QueryResult]:
    """Answer each query image (or stored id) with its top-k hits.

    A query file whose content is already in the store (same digest) uses the stored vector;
    others are described exactly as ingest did. Only the columns needed are read, so the cost
    does not grow with the store beyond one pass over the digests.
    """
    with open_read(db) as fh:
        info = resolve_descriptor(fh, plan.descriptor)
        transform, _ = post_processor(fh, info.name, plan.model)
        ds = fh["descriptors"][info.extractor][info.layer][info.pooling]
        valid = valid_mask(fh, info.extractor)
        extractor = _Extractor(fh, extractor_attrs(fh, info.extractor), info.layer, info.pooling,
                               device)

        names: list[str] = []
        sources: list[str] = []
        raws: list[np.ndarray] = []
        sha = read_column(fh, "sha") if images and bbox is None else None
        for row in ids:
            if not 0 <= row < len(valid) or not valid[row]:
                raise UserError(f"image id {row} is not an ingested image of this store "
                                f"(ids 0..{len(valid) - 1}; see imgdb info)")
            names.append(read_column(fh, "path", np.array([row]))[0])
            sources.append("store")
            raws.append(ds[row])
        for path in images:
            path = Path(os.path.abspath(path))
            if not path.is_file():
                raise UserError(f"query image {path} does not exist")
            row = _stored_row(sha, valid, path) if sha is not None else None
            names.append(str(path))
            sources.append("store" if row is not None else "extracted")
            raws.append(ds[row] if row is not None else extractor(path, bbox))

        queries = transform.transform(np.asarray(raws, dtype=np.float32))
        search = _searcher(fh, db, plan, info.name, transform, search_k)
        hits = search(queries, k)
        if qe > 0:
            expanded = []
            for q, found in zip(queries, hits):
                top = sorted(r for r, _ in found[:qe])
                expanded.append(q + transform.transform(ds[top]).sum(axis=0) if top else q)
            hits = search(l2_normalize(np.asarray(expanded)), k)
        paths = read_column(fh, "path", np.array([r for found in hits for r, _ in found], np.int64))
        results, i = [], 0
        for name, source, found in zip(names, sources, hits):
            res = QueryResult(name, source)
            for rank, (r, score) in enumerate(found, start=1):
                res.hits.append(Hit(rank, int(r), float(score), paths[i]))
                i += 1
            results.append(res)
        return results


def _searcher(fh: h5py.File, db: Path, plan: QueryPlan, descriptor: str, transform,
              search_k: int | None):
    """A function (queries (q, d), k) -> per query [(row, cosine)], best first."""
    if plan.index is None:
        return lambda q, k: topk_exact(q, fh, descriptor, transform, k)
    from annoy import AnnoyIndex

    reg = fh["indexes"][plan.index]
    rows = reg["rows"][()]
    trees = int(reg.attrs["trees"])
    ann = AnnoyIndex(int(reg.attrs["dims"]), str(reg.attrs["metric"]))
    ann.load(str(index_path(db, plan.index)))

    def search(queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        # Annoy's default (k x trees candidates) loses recall on big indexes: look wider
        budget = search_k if search_k else max(DEFAULT_SEARCH_K, k * trees)
        out = []
        for q in queries:
            items, dist = ann.get_nns_by_vector(q.tolist(), k, search_k=budget,
                                                include_distances=True)
            out.append([(int(rows[i]), 1.0 - d * d / 2.0) for i, d in zip(items, dist)])
        return out

    return search
