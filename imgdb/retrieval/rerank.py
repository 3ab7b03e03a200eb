"""Rankings beyond one dot product: query expansion, diffusion, k-reciprocal re-ranking.

A ranker is one *stage* of the query path: it takes a post-processed query vector, the ranking
so far (`prior`: cosine order for the first stage) and a search space (a `Collection` of the
database's post-processed vectors and, when it needs one, their kNN graph; or an index) and
returns a `Ranking`: database positions best first with the stage's scores. `rank_chain` runs a
chain of stages (`verify,diffusion`: diffusion seeded by what the stage before ranked first).
`query`, `eval` and `serve` call the same chain on the same inputs (`retrieval.service`), so a
query answered by `imgdb query` is ranked exactly as `eval` ranks it. Every query is ranked on
its own (no batch effects): the answer never depends on which other queries were asked with it.

- `L2`: cosine similarity (the dot product of unit vectors), ties by lower position.
- `QueryExpansion`: average QE (Chum et al. 2007; Kalantidis et al. sec.5.1: the query plus its
  top M, L2-normalised) and alpha-QE (Radenovic et al., TPAMI 2018, sec.4.3: the query plus its
  top M weighted by sim^alpha), then searched again.
- `Diffusion`: Iscen et al., CVPR 2017 (sec.3-4): mutual kNN graph with weights s^gamma,
  symmetric normalisation S = D^-1/2 W D^-1/2, the query seeded on its top k with weights
  s^gamma, f solving (I - alpha S) f = y by conjugate gradient; ranked by f (images the diffusion
  does not reach follow, by cosine).
- `KReciprocal`: Zhong et al., CVPR 2017: k-reciprocal sets R(p, k1) (eq.4) expanded to R* by
  the 2/3 rule (eq.6), weights exp(-d) on R* (eq.8; rows normalised to sum 1 as the authors'
  code does), local query expansion over the k2 nearest (eq.11), Jaccard distance (eq.10) and
  the final distance (1 - lambda) d_J + lambda d (eq.12). The original distance is
  d = 1 - cos (half the squared Euclidean distance of unit vectors). The database's own sets are
  computed once from the database alone (query-independent, from the graph's kNN lists); a query
  joins the pool {query} + database for its own sets (the query is placed first, so it wins
  ties, as in the authors' code where queries precede the gallery).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..errors import UserError
from ..numeric import l2_normalize, rank_order
from . import guard as guarding
from .graph import DEFAULT_GAMMA, KnnGraph, exact_graph

# defaults (chosen by measurement on two collections: see README "Re-ranking")
DIFFUSION_K = 10
DIFFUSION_ALPHA = 0.99
DIFFUSION_ITERATIONS = 20
KRECIPROCAL_K1 = 20
KRECIPROCAL_K2 = 6
KRECIPROCAL_LAMBDA = 0.3
ALPHA_QE_M = 10


@dataclass
class Ranking:
    """One query's answer: database positions best first, and the ranker's score of each."""

    order: np.ndarray
    scores: np.ndarray


@dataclass
class Collection:
    """The database side of a ranking: post-processed unit vectors (n, d), in the order of the
    graph's items when a graph is given."""

    vectors: np.ndarray
    graph: KnnGraph | None = None
    gamma: float = DEFAULT_GAMMA  # of a graph computed here (a stored graph has its own)
    rows: np.ndarray | None = None  # the store row of each item (default: its position)
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        if self.rows is None:
            self.rows = np.arange(len(self.vectors), dtype=np.int64)
        if self.graph is not None and self.graph.n != len(self.vectors):
            raise ValueError(f"the graph has {self.graph.n} items, the collection "
                             f"{len(self.vectors)}")

    @property
    def n(self) -> int:
        return len(self.vectors)

    def similarities(self, q: np.ndarray) -> np.ndarray:
        """Cosine similarity of one query to every item (one matrix-vector product)."""
        return self.vectors @ np.asarray(q, np.float32)

    def search(self, q: np.ndarray, top: int | None) -> Ranking:
        """Cosine ranking of the items for one query (ties by the lower position)."""
        s = self.similarities(q)
        order = _order(s, top=top)
        return Ranking(order, s[order])

    def vectors_at(self, positions: np.ndarray) -> np.ndarray:
        """Post-processed vectors of some items."""
        return self.vectors[np.asarray(positions, np.int64)]

    def knn(self, k: int) -> KnnGraph:
        """A graph with at least k neighbours per item: the given one, or (without one) the
        exact graph, computed once."""
        if self.graph is not None:
            if self.graph.k < k:
                raise UserError(f"{self.graph.label} holds {self.graph.k} neighbours per image; "
                                f"this re-ranking needs {k} (fit a graph with imgdb fit graph "
                                f"--k {k})")
            return self.graph
        if k >= self.n:
            raise UserError(f"a {k}-NN graph needs more than {k} images (the collection has "
                            f"{self.n})")
        built = self._cache.get("graph")
        if built is None or built.k < k:
            built = exact_graph(self.vectors, k, self.gamma)
            self._cache["graph"] = built
        return built

    def pair_similarities(self, a: np.ndarray, b: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
        """Cosine similarity of items a[i] and b[i]."""
        out = np.empty(len(a), np.float32)
        for s in range(0, len(a), chunk):
            out[s:s + chunk] = np.einsum("ij,ij->i", self.vectors[a[s:s + chunk]],
                                         self.vectors[b[s:s + chunk]])
        return out


def _order(primary: np.ndarray, *tiebreak: np.ndarray, top: int | None = None) -> np.ndarray:
    """Positions by descending `primary`, ties by descending tiebreak keys, then by the lower
    position; only the first `top` when given (`numeric.rank_order`)."""
    return rank_order(primary, *tiebreak, top=top)


@dataclass
class QueryContext:
    """What a stage may need of one query beyond its vector: its keypoints and a reader of the
    database's (`database(rows)` -> one `verify.Keypoints` or None per row), for verification;
    `record` keeps what verification found (rows -> geometry) for explanations."""

    keypoints: object = None
    database: Callable | None = None
    found: dict = field(default_factory=dict)  # store row -> geometry (the latest stage's)
    cache: dict = field(default_factory=dict)  # (row, *the stage's settings) -> geometry

    def record(self, rows: np.ndarray, results: Sequence) -> None:
        self.found.update(zip((int(r) for r in rows), results))


class Ranker:
    """A stage of the query path: re-orders the collection for a query, given the ranking so
    far."""

    #: the option text that names this ranker (`diffusion:k=10,alpha=0.99`)
    spec: str = "L2"
    #: neighbours per database item it needs from a graph computed for it (0: no graph)
    graph_k: int = 0
    #: neighbours per database item a given (stored) graph must hold
    min_graph_k: int = 0
    #: whether it needs every item's similarity (a `Collection`), not just an index's top-k
    needs_collection: bool = True
    #: whether it reads the query's and the database's keypoints (its `QueryContext`)
    uses_keypoints: bool = False
    #: whether the stage is guarded (`retrieval.guard`: steps aside on collections without
    #: neighbourhoods, keeps the query's near-duplicates first); `guard=0` turns it off
    guard: bool = False
    #: why the bound stage steps aside on its collection (None: it re-ranks)
    aside: str | None = None

    @property
    def label(self) -> str:
        return self._with_aside(self.spec)

    def _with_aside(self, text: str) -> str:
        return f"{text} ({self.aside.split(':')[0]})" if self.aside else text

    @property
    def needs(self) -> int:
        """How many of the prior ranking's first items this stage reads."""
        return 0

    def report(self) -> dict:
        """What the bound stage did on its collection (for --json): its spec, whether it
        re-ranked, and why not."""
        return {"stage": self.spec, "applied": self.aside is None, "reason": self.aside}

    def _step_aside(self, q: np.ndarray, prior: Ranking, coll, top: int | None) -> Ranking:
        """The ranking before this stage, unchanged (searched again when `prior` holds fewer
        items than asked: the first stage is given only what it reads)."""
        want = top if top is not None else len(coll.rows)
        if len(prior.order) >= want:
            return Ranking(prior.order[:want], prior.scores[:want])
        return coll.search(q, top)

    def _pinned(self, q: np.ndarray, prior: Ranking, coll, ranking: Ranking, top: int | None,
                first_neighbour: Callable[[np.ndarray], np.ndarray]) -> Ranking:
        """`ranking` with the query's near-duplicates among the prior's first results kept
        first (guard.near_duplicates)."""
        head = prior.order[:max(1, min(self.needs, 10))]
        cos = coll.vectors_at(head) @ np.asarray(q, np.float32) if len(head) else head
        n = guarding.near_duplicates(cos, first_neighbour(head)) if len(head) else 0
        order, scores = guarding.pin_first(head[:n], ranking.order, ranking.scores, top)
        return Ranking(order, scores)

    def bind(self, coll: "Collection") -> "Ranker":
        """This ranker with every parameter that depends on the collection made concrete (a
        stored graph's k and gamma are the defaults of diffusion on it)."""
        return self

    def rerank(self, q: np.ndarray, prior: Ranking, coll, top: int | None,
               context: "QueryContext | None" = None) -> Ranking:
        """The ranking of one query after this stage (`prior`: the ranking before it, at least
        `needs` long)."""
        raise NotImplementedError

    def rank(self, queries: np.ndarray, coll: Collection, top: int | None = None
             ) -> list[Ranking]:
        """Rank the collection for each query (the whole collection when `top` is None), this
        stage alone after the cosine ranking (bound to `coll` first)."""
        return rank_chain((self.bind(coll),), queries, coll, top)


class L2(Ranker):
    """Cosine similarity of unit vectors (the papers' ranking)."""

    spec = "L2"
    needs_collection = False

    def rerank(self, q: np.ndarray, prior: Ranking, coll, top: int | None,
               context: "QueryContext | None" = None) -> Ranking:
        return coll.search(q, top)


def rank_chain(stages, queries: np.ndarray, space, top: int | None = None,
               contexts: Sequence[QueryContext | None] | None = None,
               views: Sequence[np.ndarray | None] | None = None) -> list[Ranking]:
    """Each query ranked by cosine similarity, then by each stage in turn (each one given what
    the one before ranked, and the query's context). `stages` must already be bound to `space`
    when they need a graph (`Ranker.bind`); an empty chain is the cosine ranking. `views`:
    each query's vectors of its other views (crops, turns: `retrieval.views`): the first
    ranking is then every item's best cosine to the query or any of them."""
    from .views import merged_search

    stages = [st for st in stages if not isinstance(st, L2)]
    out = []
    queries = np.asarray(queries, np.float32)
    contexts = list(contexts) if contexts is not None else [None] * len(queries)
    views = list(views) if views is not None else [None] * len(queries)
    for q, context, others in zip(queries, contexts, views):
        # each stage reads the first `needs` items of the one before; the last gives `top`
        # each ranking is as long as the stages after it read (a stage hands on at least what
        # the next one seeds from); no top: the whole ranking, so what a stage does not
        # reorder still follows in its order (verification reorders only its first k)
        reads = [max([st.needs for st in stages[i:]] + [0]) for i in range(len(stages))]
        tops = [None if top is None else max(top, r) for r in reads] + [top]
        if others is None or not len(others):
            ranking = space.search(q, tops[0])
        else:  # whole when no top is asked: a stage that steps aside gives back this ranking
            ranking = merged_search(space, np.vstack([q[None], others]),
                                    None if top is None else tops[0])
        for st, want in zip(stages, tops[1:]):
            ranking = st.rerank(q, ranking, space, want, context)
        out.append(ranking)
    return out


# ---------------------------------------------------------------------------------------------
# query expansion


def qe_weights(similarities: np.ndarray, alpha: float) -> np.ndarray:
    """Weights of the top-M neighbours: 1 each (average QE, alpha 0), or sim^alpha with
    negative similarities counted as 0 (alpha-QE)."""
    s = np.asarray(similarities, np.float64)
    if alpha == 0:
        return np.ones_like(s)
    return np.maximum(s, 0.0) ** alpha


def expand(queries: np.ndarray, neighbours: Sequence[np.ndarray],
           similarities: Sequence[np.ndarray] | None = None, alpha: float = 0.0) -> np.ndarray:
    """Query expansion: each query (weight 1) plus its neighbours' vectors weighted by
    `qe_weights`, L2-normalised. `similarities` (each neighbour's similarity to its query) are
    needed for alpha > 0."""
    out = []
    for i, (q, nb) in enumerate(zip(np.asarray(queries, np.float32), neighbours)):
        nb = np.asarray(nb, np.float32).reshape(-1, len(q))
        if not len(nb):
            out.append(q)
            continue
        if alpha == 0:
            out.append(q + nb.sum(axis=0))
        else:
            w = qe_weights(similarities[i], alpha).astype(np.float32)
            out.append(q + w @ nb)
    return l2_normalize(np.asarray(out, dtype=np.float32).reshape(len(out), -1))


def average_query_expansion(queries: np.ndarray, neighbours: Sequence[np.ndarray]) -> np.ndarray:
    """Average QE (Kalantidis et al. sec.5.1, Chum et al. 2007): each query plus its top-M
    post-processed results, L2-normalised."""
    return expand(queries, neighbours)


class QueryExpansion(Ranker):
    """Average QE (alpha 0) or alpha-QE over the top M, then cosine ranking again."""

    needs_collection = False  # searches again: an index will do

    def __init__(self, m: int, alpha: float = 0.0, guard: bool = True) -> None:
        self.m, self.alpha, self.guard = int(m), float(alpha), bool(guard)
        self.spec = (f"{self.m}" if self.alpha == 0 else f"alpha:{self.alpha:g},{self.m}") + \
            ("" if self.guard else ",guard=0")

    @property
    def label(self) -> str:
        text = f"QE M={self.m}" if self.alpha == 0 else \
            f"alpha-QE alpha={self.alpha:g} M={self.m}"
        return self._with_aside(text + ("" if self.guard else " guard=0"))

    @property
    def needs(self) -> int:
        return self.m

    def bind(self, coll) -> "QueryExpansion":
        if not self.guard:
            return self
        bound = QueryExpansion(self.m, self.alpha, self.guard)
        cache = getattr(coll, "_cache", None)
        key = ("reciprocity", "sampled")
        value = cache.get(key) if cache is not None else None
        if value is None:
            value = guarding.sampled_reciprocity(coll)
            if cache is not None:
                cache[key] = value
        bound.aside = guarding.aside_reason(value)
        return bound

    def rerank(self, q: np.ndarray, prior: Ranking, coll, top: int | None,
               context: "QueryContext | None" = None) -> Ranking:
        if self.aside:
            return self._step_aside(q, prior, coll, top)
        first = prior.order[:self.m]
        sims = prior.scores[:self.m]
        q2 = expand(q[None], [coll.vectors_at(first)], [sims], self.alpha)[0]
        ranking = coll.search(q2, top)
        if not self.guard:
            return ranking
        return self._pinned(q, prior, coll, ranking, top,
                            lambda p: guarding.first_neighbour_similarity(coll, p))


# ---------------------------------------------------------------------------------------------
# diffusion


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Inner product without BLAS (a threaded BLAS call per step costs more than the step)."""
    return float(np.einsum("i,i->", a, b))


def conjugate_gradient(matvec: Callable[[np.ndarray], np.ndarray], y: np.ndarray,
                       iterations: int, tol: float = 1e-6) -> np.ndarray:
    """Solve A f = y (A symmetric positive definite, given by `matvec`) from f = 0, at most
    `iterations` steps, stopping when ||r|| <= tol ||y||."""
    f = np.zeros_like(y)
    r = y.copy()
    p = r.copy()
    rs = _dot(r, r)
    stop = tol * tol * rs
    for _ in range(iterations):
        if rs <= stop or rs == 0.0:
            break
        ap = matvec(p)
        a = rs / _dot(p, ap)
        f += a * p
        r -= a * ap
        rs_new = _dot(r, r)
        p *= rs_new / rs
        p += r
        rs = rs_new
    return f


class Diffusion(Ranker):
    """Iscen et al.'s diffusion on the collection's mutual kNN graph."""

    def __init__(self, k: int | None = None, alpha: float = DIFFUSION_ALPHA,
                 gamma: float | None = None, iterations: int = DIFFUSION_ITERATIONS,
                 tol: float = 1e-6, guard: bool = True) -> None:
        self.k, self.alpha, self.gamma = k, float(alpha), gamma
        self.iterations, self.tol, self.guard = int(iterations), float(tol), bool(guard)
        self.graph_k = k or DIFFUSION_K
        self.min_graph_k = k or 1
        self.graph_label = ""

    @property
    def spec(self) -> str:
        parts = [f"k={self.k or DIFFUSION_K}", f"alpha={self.alpha:g}"]
        if self.gamma is not None and self.gamma != DEFAULT_GAMMA:
            parts.append(f"gamma={self.gamma:g}")
        if self.iterations != DIFFUSION_ITERATIONS:
            parts.append(f"iter={self.iterations}")
        if not self.guard:
            parts.append("guard=0")
        return "diffusion:" + ",".join(parts)

    @property
    def label(self) -> str:
        text = self.spec.replace(":", " ").replace(",", " ")
        return self._with_aside(f"{text} ({self.graph_label})" if self.graph_label else text)

    def bind(self, coll: Collection) -> "Diffusion":
        k = self._k(coll)
        graph = coll.knn(k)
        bound = Diffusion(k, self.alpha, graph.gamma if self.gamma is None else self.gamma,
                          self.iterations, self.tol, self.guard)
        bound.graph_label = graph.label if graph.model is not None else ""
        bound.aside = _graph_aside(coll, graph) if self.guard else None
        return bound

    def _k(self, coll: Collection) -> int:
        if self.k is not None:
            return self.k
        # a stored graph's own k is its default neighbourhood
        return coll.graph.k if coll.graph is not None else DIFFUSION_K

    def operator(self, coll: Collection):
        """(k, gamma, S, components) for this collection (cached on the graph)."""
        k = self._k(coll)
        graph = coll.knn(k)
        gamma = graph.gamma if self.gamma is None else self.gamma
        return k, gamma, graph.normalized(k, gamma), graph.components(k, gamma)

    @property
    def needs(self) -> int:
        return self.k or DIFFUSION_K

    def rerank(self, q: np.ndarray, prior: Ranking, coll: Collection, top: int | None,
               context: "QueryContext | None" = None) -> Ranking:
        if self.aside:
            return self._step_aside(q, prior, coll, top)
        op = self.operator(coll)
        s = coll.similarities(q)
        f = self.solve(s, *op, seeds=prior.order[:op[0]])
        order = _order(f, s, top=None if self.guard else top)
        ranking = Ranking(order, f[order])
        if not self.guard:
            return ranking
        first = coll.knn(op[0]).similarities[:, 0]
        return self._pinned(q, prior, coll, ranking, top, lambda p: first[p])

    def solve(self, s: np.ndarray, k: int, gamma: float, s_mat, components=None,
              seeds: np.ndarray | None = None) -> np.ndarray:
        """The diffusion scores f of one query whose similarities to the items are `s`.

        The seeds are the first k items of the ranking before (default: the k most similar),
        y = s^gamma on them. CG runs on the items of the seeds' connected components only:
        elsewhere y, and so every iterate, is zero (the same iterates as on the whole graph, a
        fraction of the work)."""
        n = len(s)
        seeds = _order(s, top=k) if seeds is None else np.asarray(seeds[:k], np.int64)
        y_seeds = np.maximum(s[seeds].astype(np.float64), 0.0) ** gamma
        nodes = None
        if components is not None:
            labels, members, starts = components
            seeded = np.unique(labels[seeds])
            size = int((starts[seeded + 1] - starts[seeded]).sum())
            if size < n // 2:
                nodes = np.sort(np.concatenate([members[starts[c]:starts[c + 1]]
                                                for c in seeded]))
        if nodes is None:
            sub, y = s_mat, np.zeros(n, np.float64)
            y[seeds] = y_seeds
        else:
            sub = s_mat[nodes][:, nodes]
            y = np.zeros(len(nodes), np.float64)
            y[np.searchsorted(nodes, seeds)] = y_seeds
        alpha = self.alpha

        def matvec(p: np.ndarray) -> np.ndarray:
            out = sub @ p
            out *= -alpha
            out += p
            return out

        f = conjugate_gradient(matvec, y, self.iterations, self.tol)
        if nodes is None:
            return f
        full = np.zeros(n, np.float64)
        full[nodes] = f
        return full


def _graph_aside(coll: Collection, graph: KnnGraph) -> str | None:
    """Why a graph stage steps aside on this collection (None: it runs): measured on its
    RECIPROCITY_K-NN graph (computed when the stage's own holds fewer; a stored graph's k when
    it has fewer)."""
    if graph.k < guarding.RECIPROCITY_K and coll.graph is None and \
            coll.n > guarding.RECIPROCITY_K:
        graph = coll.knn(guarding.RECIPROCITY_K)
    key = ("reciprocity", guarding.RECIPROCITY_K)
    if key not in graph._cache:
        graph._cache[key] = guarding.graph_reciprocity(
            graph.neighbours, min(guarding.RECIPROCITY_K, graph.k))
    return guarding.aside_reason(graph._cache[key])


# ---------------------------------------------------------------------------------------------
# k-reciprocal re-ranking


def _half(k1: int) -> int:
    """round(k1 / 2) as the authors' code computes it (numpy rounds halves to even)."""
    return max(1, int(np.around(k1 / 2.0)))


def _reciprocal(nbr: np.ndarray, k: int):
    """R(g, k) of every item (eq.4), self included, as a boolean CSR matrix: x is in R(g, k)
    when x is among g's k nearest others and g among x's."""
    from scipy import sparse

    n = len(nbr)
    cols = np.asarray(nbr[:, :k], np.int64).ravel()
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    a = sparse.csr_matrix((np.ones(len(cols), np.int8), (rows, cols)), shape=(n, n))
    mutual = a.multiply(a.T).tocsr()
    out = (mutual + sparse.identity(n, dtype=np.int8, format="csr")).tocsr()
    out.data[:] = 1
    out.sort_indices()
    return out


def _gather(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions in a CSR matrix's indices/data of the entries of `rows`, concatenated, and
    the place in `rows` each belongs to."""
    starts = indptr[rows]
    lens = indptr[rows + 1] - starts
    owner = np.repeat(np.arange(len(rows)), lens)
    pos = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))
    return pos.astype(np.int64), owner


@dataclass
class _KRData:
    """The database side of k-reciprocal re-ranking for one (k1, k2)."""

    nbr: np.ndarray  # (n, K) kNN lists
    sim: np.ndarray  # (n, K) their similarities
    rh: object  # R(g, round(k1/2)) CSR
    v: object  # V (eq.8) CSR, rows sum to 1
    v_qe_t: object  # V after local query expansion (eq.11), transposed (CSR of columns)


def kreciprocal_database(nbr: np.ndarray, sim: np.ndarray, k1: int, k2: int,
                         pair_similarities: Callable[[np.ndarray, np.ndarray], np.ndarray],
                         chunk: int = 1 << 20) -> _KRData:
    """R*, V and the expanded V of every database item, from its kNN lists (K >= k1)."""
    from scipy import sparse

    n = len(nbr)
    kh = _half(k1)
    r1 = _reciprocal(nbr, k1)
    rh = r1 if kh == k1 else _reciprocal(nbr, kh)
    size_h = np.diff(rh.indptr)
    # pairs (g, c) with c in R(g, k1): does R(c, kh) share more than 2/3 of itself with R(g, k1)?
    g_of = np.repeat(np.arange(n, dtype=np.int64), np.diff(r1.indptr))
    c_of = r1.indices.astype(np.int64)
    keys1 = g_of * n + c_of  # sorted (rows in order, columns sorted within rows)
    take = np.zeros(len(c_of), bool)
    for s in range(0, len(c_of), max(1, chunk // max(1, kh + 1))):
        e = min(len(c_of), s + max(1, chunk // max(1, kh + 1)))
        pos, owner = _gather(rh.indptr, c_of[s:e])
        xs = rh.indices[pos].astype(np.int64)
        probe = g_of[s:e][owner] * n + xs
        pos = np.minimum(np.searchsorted(keys1, probe), len(keys1) - 1)
        hits = np.bincount(owner, weights=(keys1[pos] == probe), minlength=e - s)
        take[s:e] = hits > (2.0 / 3.0) * size_h[c_of[s:e]]
    pos, owner = _gather(rh.indptr, c_of[take])
    xs = rh.indices[pos]
    rows = np.concatenate([g_of, g_of[take][owner]])
    cols = np.concatenate([c_of, xs.astype(np.int64)])
    rstar = sparse.csr_matrix((np.ones(len(rows), np.float64), (rows, cols)), shape=(n, n))
    rstar.sum_duplicates()
    rstar.sort_indices()
    # V: exp(-d) on R*, d = 1 - cos, rows normalised to sum 1
    g_rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(rstar.indptr))
    d = 1.0 - pair_similarities(g_rows, rstar.indices.astype(np.int64)).astype(np.float64)
    d[g_rows == rstar.indices] = 0.0
    w = np.exp(-d)
    sums = np.bincount(g_rows, weights=w, minlength=n)
    v = sparse.csr_matrix((w / sums[g_rows], rstar.indices, rstar.indptr), shape=(n, n))
    if k2 > 1:
        qrows = np.repeat(np.arange(n, dtype=np.int64), k2)
        qcols = np.concatenate([np.arange(n)[:, None], nbr[:, :k2 - 1]], axis=1).ravel()
        avg = sparse.csr_matrix((np.full(len(qcols), 1.0 / k2), (qrows, qcols)), shape=(n, n))
        v_qe = (avg @ v).tocsr()
    else:
        v_qe = v
    v_qe_t = v_qe.T.tocsr()
    v_qe_t.sort_indices()
    return _KRData(nbr, sim, rh, v, v_qe_t)


def kreciprocal_query(s: np.ndarray, data: _KRData, k1: int, k2: int, lam: float,
                      near: np.ndarray | None = None) -> np.ndarray:
    """Final distance (eq.12) of one query to every database item, given its similarities `s`
    to them. The query is pool item `n` (after the database's 0..n-1). `near`: the query's
    nearest items, best first (default: by `s`)."""
    n = len(s)
    kh = _half(k1)
    d = 1.0 - s.astype(np.float64)
    need = max(k1, k2 - 1, 1)
    near = _order(s, top=need) if near is None else np.asarray(near[:need], np.int64)

    def reciprocal(k: int) -> list[int]:
        # g in the query's k nearest whose own k nearest others would admit the query: the
        # query wins ties (it precedes the database in the pool)
        cand = near[:k]
        ok = s[cand] >= data.sim[cand, k - 1]
        return [n] + [int(g) for g in cand[ok]]

    rq1 = reciprocal(k1)
    rqh = reciprocal(kh)
    set1 = set(rq1)
    star = set(rq1)
    for c in rq1:
        cand = rqh if c == n else data.rh.indices[data.rh.indptr[c]:data.rh.indptr[c + 1]]
        cand_set = set(int(x) for x in cand)
        if len(cand_set & set1) > (2.0 / 3.0) * len(cand_set):
            star |= cand_set
    members = np.array(sorted(star), np.int64)
    dist = np.where(members == n, 0.0, d[np.minimum(members, n - 1)])
    w = np.exp(-dist)
    w /= w.sum()
    vq = np.zeros(n + 1, np.float64)
    vq[members] = w
    if k2 > 1:  # local query expansion: the query and its k2 - 1 nearest
        acc = vq.copy()
        v = data.v
        for g in near[:k2 - 1]:
            acc[v.indices[v.indptr[g]:v.indptr[g + 1]]] += v.data[v.indptr[g]:v.indptr[g + 1]]
        vq = acc / k2
    # Jaccard distance (eq.10): sum of minima over the shared database items
    support = np.flatnonzero(vq[:n])
    t = data.v_qe_t
    pos, owner = _gather(t.indptr, support)
    gs = t.indices[pos]
    mins = np.minimum(vq[support][owner], t.data[pos])
    shared = np.bincount(gs, weights=mins, minlength=n)
    jaccard = 1.0 - shared / (2.0 - shared)
    return (1.0 - lam) * jaccard + lam * d


class KReciprocal(Ranker):
    """Zhong et al.'s k-reciprocal re-ranking."""

    def __init__(self, k1: int = KRECIPROCAL_K1, k2: int = KRECIPROCAL_K2,
                 lam: float = KRECIPROCAL_LAMBDA, guard: bool = True) -> None:
        self.k1, self.k2, self.lam, self.guard = int(k1), int(k2), float(lam), bool(guard)
        self.graph_k = self.min_graph_k = max(self.k1, self.k2 - 1)
        self.graph_label = ""

    @property
    def spec(self) -> str:
        return f"kreciprocal:k1={self.k1},k2={self.k2},lambda={self.lam:g}" + \
            ("" if self.guard else ",guard=0")

    @property
    def label(self) -> str:
        text = self.spec.replace(":", " ").replace(",", " ")
        return self._with_aside(f"{text} ({self.graph_label})" if self.graph_label else text)

    def bind(self, coll: Collection) -> "KReciprocal":
        graph = coll.knn(self.graph_k)
        bound = KReciprocal(self.k1, self.k2, self.lam, self.guard)
        bound.graph_label = graph.label if graph.model is not None else ""
        bound.aside = _graph_aside(coll, graph) if self.guard else None
        return bound

    def database(self, coll: Collection) -> _KRData:
        key = ("kr", self.k1, self.k2)
        graph = coll.knn(self.graph_k)
        cache = graph._cache
        if key not in cache:
            cache[key] = kreciprocal_database(graph.neighbours, graph.similarities, self.k1,
                                              self.k2, coll.pair_similarities)
        return cache[key]

    @property
    def needs(self) -> int:
        return max(self.k1, self.k2 - 1, 1)

    def rerank(self, q: np.ndarray, prior: Ranking, coll: Collection, top: int | None,
               context: "QueryContext | None" = None) -> Ranking:
        if self.aside:
            return self._step_aside(q, prior, coll, top)
        data = self.database(coll)
        s = coll.similarities(q)
        final = kreciprocal_query(s, data, self.k1, self.k2, self.lam, prior.order)
        order = _order(-final, s, top=None if self.guard else top)
        ranking = Ranking(order, 1.0 - final[order])
        if not self.guard:
            return ranking
        first = coll.knn(self.graph_k).similarities[:, 0]
        return self._pinned(q, prior, coll, ranking, top, lambda p: first[p])


__all__ = ["Ranking", "Collection", "Ranker", "L2", "QueryExpansion", "Diffusion",
           "KReciprocal", "QueryContext", "rank_chain", "expand", "qe_weights",
           "average_query_expansion",
           "conjugate_gradient", "kreciprocal_database", "kreciprocal_query"]
