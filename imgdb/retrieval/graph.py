"""The kNN graph of a collection, kept in the store as a versioned model (`graph/<D>/vN`).

For every valid stored image under a descriptor (and optional PCA model), its `k` nearest
neighbours by cosine similarity, self excluded, best first: computed exactly in blocks (one
block of rows against all: memory bounded by the block, not by n^2), or read from the
descriptor's current Annoy index (each item's neighbours by one Annoy lookup: scales to
millions). From the lists, the graph diffusion uses (Iscen et al., CVPR 2017, sec.3): an edge
between two images when each is among the other's k nearest (mutual kNN), weighted s^gamma
(s clipped at 0; gamma 3). Both are stored in one atomic commit with their provenance
(descriptor, PCA model, k, gamma, the extractor's revision and content hash, image count,
method); a graph is stale, and refused with the command that rebuilds it, once images are
added, changed or removed.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InvalidRequest, UserError
from ..numeric import rank_rows
from ..store import ModelInfo, StoreView, StoreWriter, open_read
from .pca import model_version, post_processor
from .source import VectorSource, resolve

KIND = "graph"
DEFAULT_K = 10
DEFAULT_GAMMA = 3.0
MAX_K = 1000
BLOCK_ENTRIES = 1 << 24  # similarities held at once by the exact builder (64 MiB of float32)
METHODS = ("auto", "exact", "annoy")


# ---------------------------------------------------------------------------------------------
# kNN lists


def knn_exact(x: np.ndarray, k: int, block: int | None = None,
              progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k most similar other rows of `x` (unit vectors) by dot product, best first
    (ties by lower position): (neighbours (n, k) int32, similarities (n, k) float32)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if not 0 < k < n:
        raise UserError(f"a {k}-NN graph needs more than {k} images (the collection has {n})")
    block = block or max(1, min(n, BLOCK_ENTRIES // max(n, 1)))
    nbr = np.empty((n, k), np.int32)
    sim = np.empty((n, k), np.float32)
    for start in range(0, n, block):
        stop = min(n, start + block)
        s = x[start:stop] @ x.T
        s[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # not its own neighbour
        nbr[start:stop], sim[start:stop] = rank_rows(s, k)
        if progress:
            progress(stop)
    return nbr, sim


def knn_annoy(ann, n: int, k: int, search_k: int = -1, threads: int = 1,
              progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each Annoy item's k nearest other items (angular metric on unit vectors -> cosine),
    by one lookup per item; lookups run in `threads` threads (Annoy releases the GIL)."""
    nbr = np.empty((n, k), np.int32)
    sim = np.empty((n, k), np.float32)

    def one(i: int) -> None:
        items, dist = ann.get_nns_by_item(i, k + 1, search_k, include_distances=True)
        pairs = [(j, d) for j, d in zip(items, dist) if j != i][:k]
        if len(pairs) < k:  # Annoy found fewer candidates than asked (tiny or odd indexes)
            raise UserError(f"the Annoy index returned {len(pairs)} neighbours of item {i}, "
                            f"{k} were asked; build the graph with {{method}} exact",
                            mentions=("method",))
        js = np.fromiter((j for j, _ in pairs), np.int64, k)
        ds = np.fromiter((d for _, d in pairs), np.float64, k)
        s = 1.0 - ds * ds / 2.0
        order = np.lexsort((js, -s))
        nbr[i], sim[i] = js[order], s[order]

    step = 4096
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for start in range(0, n, step):
            list(pool.map(one, range(start, min(n, start + step))))
            if progress:
                progress(min(n, start + step))
    return nbr, sim


# ---------------------------------------------------------------------------------------------
# the graph


def mutual_affinity(neighbours: np.ndarray, similarities: np.ndarray, k: int, gamma: float):
    """The symmetric affinity matrix of Iscen et al. sec.3: w_ij = s_ij^gamma when i and j are
    each among the other's first k neighbours (s clipped at 0), zero diagonal (scipy CSR)."""
    from scipy import sparse

    n = len(neighbours)
    nb = np.asarray(neighbours[:, :k], np.int64)
    s = np.maximum(np.asarray(similarities[:, :k], np.float64), 0.0) ** gamma
    rows = np.repeat(np.arange(n, dtype=np.int64), nb.shape[1])
    a = sparse.csr_matrix((s.ravel(), (rows, nb.ravel())), shape=(n, n))
    a.sum_duplicates()
    mutual = a.minimum(a.T).tocsr()  # non-zero only where both directions exist
    mutual.eliminate_zeros()  # (the diagonal is empty: no item is its own neighbour)
    mutual.sort_indices()
    return mutual


def symmetric_normalize(w):
    """S = D^-1/2 W D^-1/2 (D the degrees; isolated nodes keep zero rows)."""
    from scipy import sparse

    deg = np.asarray(w.sum(axis=1)).ravel()
    inv = np.zeros_like(deg)
    np.divide(1.0, np.sqrt(deg), out=inv, where=deg > 0)
    d = sparse.diags(inv)
    return (d @ w @ d).tocsr()


@dataclass
class KnnGraph:
    """kNN lists of a collection's items (positions 0..n-1; `rows` maps them to image ids),
    with the mutual, weighted graph derived from them (cached per (k, gamma))."""

    neighbours: np.ndarray  # (n, K) int32, best first, self excluded
    similarities: np.ndarray  # (n, K) float32
    rows: np.ndarray | None = None  # (n,) image ids
    gamma: float = DEFAULT_GAMMA
    model: ModelInfo | None = None  # when loaded from the store
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def k(self) -> int:
        return int(self.neighbours.shape[1])

    @property
    def n(self) -> int:
        return int(self.neighbours.shape[0])

    @property
    def label(self) -> str:
        return f"graph {self.model.version}" if self.model else "exact graph"

    def affinity(self, k: int | None = None, gamma: float | None = None):
        k, gamma = k or self.k, self.gamma if gamma is None else gamma
        if k > self.k:
            raise UserError(f"{self.label} holds {self.k} neighbours per image; {k} were asked")
        key = ("w", k, gamma)
        if key not in self._cache:
            self._cache[key] = mutual_affinity(self.neighbours, self.similarities, k, gamma)
        return self._cache[key]

    def normalized(self, k: int | None = None, gamma: float | None = None):
        k, gamma = k or self.k, self.gamma if gamma is None else gamma
        key = ("s", k, gamma)
        if key not in self._cache:
            self._cache[key] = symmetric_normalize(self.affinity(k, gamma))
        return self._cache[key]

    def components(self, k: int | None = None, gamma: float | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Connected components of the mutual graph: (label of each item, items grouped by
        label, start of each label's group) (cached)."""
        from scipy.sparse.csgraph import connected_components

        k, gamma = k or self.k, self.gamma if gamma is None else gamma
        key = ("c", k, gamma)
        if key not in self._cache:
            _, labels = connected_components(self.affinity(k, gamma), directed=False)
            members = np.argsort(labels, kind="stable")
            starts = np.searchsorted(labels[members], np.arange(labels.max() + 2))
            self._cache[key] = (labels, members, starts)
        return self._cache[key]

    def arrays(self) -> dict[str, np.ndarray]:
        w = self.affinity()
        return {"rows": np.asarray(self.rows, np.int64),
                "neighbours": self.neighbours.astype(np.int32),
                "similarities": self.similarities.astype(np.float32),
                "indptr": w.indptr.astype(np.int64), "indices": w.indices.astype(np.int32),
                "weights": w.data.astype(np.float64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], gamma: float,
                    model: ModelInfo | None = None) -> "KnnGraph":
        from scipy import sparse

        g = cls(np.asarray(arrays["neighbours"]), np.asarray(arrays["similarities"]),
                np.asarray(arrays["rows"]), gamma, model)
        n = g.n
        g._cache[("w", g.k, gamma)] = sparse.csr_matrix(
            (np.asarray(arrays["weights"]), np.asarray(arrays["indices"]),
             np.asarray(arrays["indptr"])), shape=(n, n))
        return g


def exact_graph(vectors: np.ndarray, k: int, gamma: float = DEFAULT_GAMMA,
                rows: np.ndarray | None = None) -> KnnGraph:
    """The exact kNN graph of post-processed vectors (what `fit graph --method exact` stores)."""
    nbr, sim = knn_exact(vectors, k)
    return KnnGraph(nbr, sim, rows if rows is not None else np.arange(len(vectors)), gamma)


# ---------------------------------------------------------------------------------------------
# stored graphs


def check_params(k: int, gamma: float) -> None:
    if not 1 <= k <= MAX_K:
        raise InvalidRequest(f"{k} is out of range: give 1 to {MAX_K} neighbours", "k")
    if not (np.isfinite(gamma) and gamma > 0):
        raise InvalidRequest(f"{gamma} must be a positive number", "gamma")


def rebuild_command(db: Path, model: ModelInfo) -> str:
    a = model.attrs
    return (f"imgdb fit graph --db {db} --descriptor {a['descriptor']} --pca "
            f"{model_version(a.get('pca'))} --k {a['k']} --gamma {a['gamma']:g}")


def graph_status(view: StoreView, model: ModelInfo) -> str | None:
    """Why a stored graph cannot be used (None when it is current)."""
    a = model.attrs
    try:
        source = resolve(view, str(a["descriptor"]))
    except UserError:
        return f"its descriptor {a['descriptor']} is no longer in the store"
    pca = str(a.get("pca", "none"))
    if pca != "none" and view.model_by_id(pca) is None:
        return f"its model {pca} was removed"
    if source.revision(view) != a.get("extractor_revision"):
        return "the store changed since it was built (images added, changed or removed)"
    return None


def find_graph(view: StoreView, db: Path, source: VectorSource, pca: ModelInfo | None,
               version: str | None = None, min_k: int = 1) -> ModelInfo:
    """The graph to use for a descriptor under a model: `version`, or the newest current one
    with at least `min_k` neighbours; stale or missing graphs are refused with the fix."""
    pca_id = pca.id if pca else "none"
    fit = (f"imgdb fit graph --db {db} --descriptor {source.name} --pca "
           f"{model_version(pca)} --k {max(min_k, DEFAULT_K)}")
    if version not in (None, "latest"):
        model = view.model(KIND, source.name, version)
        if model.attrs.get("pca") != pca_id:
            raise UserError(f"graph {model.id} was built with model {model.attrs.get('pca')}, "
                            f"not {pca_id}")
        candidates = [model]
    else:
        candidates = [m for m in view.models(KIND, source.name) if m.attrs.get("pca") == pca_id]
    if not candidates:
        raise UserError(f"no graph of {source.name} with model {pca_id}; fit one with: {fit}")
    usable = [m for m in candidates if int(m.attrs["k"]) >= min_k]
    if not usable:
        best = max(candidates, key=lambda m: int(m.attrs["k"]))
        raise UserError(f"graph {best.id} holds {best.attrs['k']} neighbours per image and "
                        f"{min_k} are needed; fit one with: {fit}")
    for model in reversed(usable):
        problem = graph_status(view, model)
        if problem is None:
            return model
    model = usable[-1]
    raise UserError(f"graph {model.id} is stale ({graph_status(view, model)}); rebuild it with: "
                    f"{rebuild_command(db, model)}")


def load_graph(view: StoreView, model: ModelInfo) -> KnnGraph:
    return KnnGraph.from_arrays(view.model_arrays(model), float(model.attrs["gamma"]), model)


def _annoy_index_for(view: StoreView, db: Path, source: VectorSource, pca_id: str):
    """The newest current index of this descriptor and model, or None."""
    from .index import list_indexes

    found = [s for s in list_indexes(view, db) if s.attrs["descriptor"] == source.name
             and s.attrs["model"] == pca_id and s.problem is None
             and int(s.attrs.get("shards", 1)) == 1]  # one file holds every row
    return found[-1] if found else None


def fit_graph(db: Path, descriptor: str, pca: str | None = None, k: int = DEFAULT_K,
              gamma: float = DEFAULT_GAMMA, method: str = "auto", search_k: int | None = None,
              threads: int = 1, log: Callable[[str], None] | None = None,
              progress: Callable[[int, int], None] | None = None) -> ModelInfo:
    """Compute the kNN graph of every valid stored image under `descriptor` (+ PCA model) and
    save it as a new version `graph/<descriptor>/vN` in one atomic commit."""
    from .. import __version__

    check_params(k, gamma)
    if method not in METHODS:
        raise InvalidRequest(f"must be one of {', '.join(METHODS)}", "method")
    db = Path(db)
    started = time.perf_counter()
    with open_read(db) as view:
        source = resolve(view, descriptor)
        transform, model = post_processor(view, source.name, pca)
        pca_id = model.id if model else "none"
        revision = source.revision(view)
        content_hash = source.content_hash(view)
        index = _annoy_index_for(view, db, source, pca_id) if method != "exact" else None
        if method == "annoy" and index is None:
            raise UserError(f"no current Annoy index of {source.name} with model {pca_id}; build "
                            f"one with: imgdb index build --db {db} --descriptor {source.name} "
                            f"--pca {model_version(model)}, or build the graph {{method}} exact",
                            mentions=("method",))
        extra: dict = {}
        if index is not None:
            from annoy import AnnoyIndex

            from .index import registered_file, usable_index

            usable_index(view, db, index.name)  # verifies the file's digest before mapping it
            rows = view.index_rows(index.name)
            ann = AnnoyIndex(int(index.attrs["dims"]), str(index.attrs["metric"]))
            ann.load(str(registered_file(db, view.index(index.name))))
            vectors = None
        else:
            parts = [(r, transform.transform(raw)) for r, raw in source.iter_valid(view)]
            rows = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
            vectors = np.concatenate([p[1] for p in parts]) if parts else None
    n = len(rows)
    if n <= k:
        raise UserError(f"{source.name} has {n} usable images; a {k}-NN graph needs more than {k}")
    if vectors is not None:
        if log:
            log(f"exact {k}-NN graph of {n} images ({vectors.shape[1]} dims)")
        nbr, sim = knn_exact(vectors, k, progress=progress and (lambda done: progress(done, n)))
        used = "exact"
    else:
        budget = search_k or max(k + 1, 1) * int(index.attrs["trees"])
        if log:
            log(f"{k}-NN graph of {n} images from Annoy index {index.name} (search_k {budget})")
        try:
            nbr, sim = knn_annoy(ann, n, k, budget, threads,
                                 progress and (lambda done: progress(done, n)))
        finally:
            ann.unload()
        used = "annoy"
        extra = {"index": index.name, "search_k": int(budget), "trees": int(index.attrs["trees"])}
    graph = KnnGraph(nbr, sim, np.asarray(rows, np.int64), float(gamma))
    arrays = graph.arrays()
    attrs = {
        "descriptor": source.name, "pca": pca_id, "k": int(k), "gamma": float(gamma),
        "method": used, "extractor_revision": revision, "content_hash": content_hash,
        "image_count": int(n), "edges": int(graph.affinity().nnz // 2),
        "seconds": round(time.perf_counter() - started, 3), "imgdb": __version__, **extra,
    }
    with StoreWriter(db, create=False) as writer:
        with writer.read() as view:  # nothing may have changed while computing
            if source.revision(view) != revision:
                raise UserError("the store changed while the graph was computed (an ingest ran); "
                                "run the command again")
        return writer.save_model(KIND, source.name, arrays, attrs)


__all__ = ["KnnGraph", "knn_exact", "knn_annoy", "mutual_affinity",
           "symmetric_normalize", "exact_graph", "fit_graph", "find_graph", "load_graph",
           "graph_status", "rebuild_command", "DEFAULT_K", "DEFAULT_GAMMA", "KIND"]
