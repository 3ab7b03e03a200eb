"""Rankings beyond one dot product: query expansion, diffusion, k-reciprocal re-ranking.

A ranker takes post-processed query vectors and a `Collection` (the database's post-processed
vectors and, when it needs one, their kNN graph) and returns one `Ranking` per query: database
positions best first with the ranker's scores. `query`, `eval` and `serve` call the same rankers
on the same inputs, so a query answered by `imgdb query` is ranked exactly as `eval` ranks it.
Every query is ranked on its own (no batch effects): the answer never depends on which other
queries were asked with it.

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

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..errors import UsageError, UserError
from ..numeric import l2_normalize
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
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        if self.graph is not None and self.graph.n != len(self.vectors):
            raise ValueError(f"the graph has {self.graph.n} items, the collection "
                             f"{len(self.vectors)}")

    @property
    def n(self) -> int:
        return len(self.vectors)

    def similarities(self, q: np.ndarray) -> np.ndarray:
        """Cosine similarity of one query to every item (one matrix-vector product)."""
        return self.vectors @ np.asarray(q, np.float32)

    def knn(self, k: int) -> KnnGraph:
        """A graph with at least k neighbours per item: the given one, or (without one) the
        exact graph, computed once."""
        if self.graph is not None:
            if self.graph.k < k:
                raise UserError(f"{self.graph.label} holds {self.graph.k} neighbours per image; "
                                f"this re-ranking needs {k} (fit a graph with --k {k})")
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
    position; only the first `top` when given (without sorting the rest)."""
    return _rank_subset(np.arange(len(primary)), (primary, *tiebreak), top)


def _rank_subset(idx: np.ndarray, keys: tuple, top: int | None) -> np.ndarray:
    if top is None or top >= len(idx):
        return idx[np.lexsort([idx] + [-k[idx] for k in reversed(keys)])]
    if top <= 0:
        return idx[:0]
    if not keys:
        return np.sort(idx)[:top]
    p = keys[0][idx]
    edge = p[np.argpartition(-p, top - 1)[:top]].min()
    above = idx[p > edge]  # fewer than `top`: all kept, sorted in full
    tied = idx[p == edge]  # compete for the remaining places by the next key
    return np.concatenate([_rank_subset(above, keys, None),
                           _rank_subset(tied, keys[1:], top - len(above))])


class Ranker:
    """A way to rank the collection for a query."""

    #: the option text that names this ranker (`diffusion:k=10,alpha=0.99`)
    spec: str = "L2"
    #: neighbours per database item it needs from a graph computed for it (0: no graph)
    graph_k: int = 0
    #: neighbours per database item a given (stored) graph must hold
    min_graph_k: int = 0

    @property
    def label(self) -> str:
        return self.spec

    def bind(self, coll: "Collection") -> "Ranker":
        """This ranker with every parameter that depends on the collection made concrete (a
        stored graph's k and gamma are the defaults of diffusion on it)."""
        return self

    def rank_one(self, q: np.ndarray, coll: Collection, top: int | None) -> Ranking:
        raise NotImplementedError

    def rank(self, queries: np.ndarray, coll: Collection, top: int | None = None
             ) -> list[Ranking]:
        """Rank the collection for each query (the whole collection when `top` is None)."""
        queries = np.asarray(queries, np.float32)
        return [self.rank_one(q, coll, top) for q in queries]


class L2(Ranker):
    """Cosine similarity of unit vectors (the papers' ranking)."""

    spec = "L2"

    def rank_one(self, q: np.ndarray, coll: Collection, top: int | None) -> Ranking:
        s = coll.similarities(q)
        order = _order(s, top=top)
        return Ranking(order, s[order])


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

    def __init__(self, m: int, alpha: float = 0.0) -> None:
        self.m, self.alpha = int(m), float(alpha)
        self.spec = f"{self.m}" if self.alpha == 0 else f"alpha:{self.alpha:g},{self.m}"

    @property
    def label(self) -> str:
        return f"QE M={self.m}" if self.alpha == 0 else f"alpha-QE alpha={self.alpha:g} M={self.m}"

    def rank_one(self, q: np.ndarray, coll: Collection, top: int | None) -> Ranking:
        s = coll.similarities(q)
        first = _order(s, top=self.m)
        q2 = expand(q[None], [coll.vectors[first]], [s[first]], self.alpha)[0]
        s2 = coll.similarities(q2)
        order = _order(s2, top=top)
        return Ranking(order, s2[order])


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
                 tol: float = 1e-6) -> None:
        self.k, self.alpha, self.gamma = k, float(alpha), gamma
        self.iterations, self.tol = int(iterations), float(tol)
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
        return "diffusion:" + ",".join(parts)

    @property
    def label(self) -> str:
        text = self.spec.replace(":", " ").replace(",", " ")
        return f"{text} ({self.graph_label})" if self.graph_label else text

    def bind(self, coll: Collection) -> "Diffusion":
        k = self._k(coll)
        graph = coll.knn(k)
        bound = Diffusion(k, self.alpha, graph.gamma if self.gamma is None else self.gamma,
                          self.iterations, self.tol)
        bound.graph_label = graph.label if graph.model is not None else ""
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

    def rank_one(self, q: np.ndarray, coll: Collection, top: int | None) -> Ranking:
        return self.rank(q[None], coll, top)[0]

    def rank(self, queries: np.ndarray, coll: Collection, top: int | None = None
             ) -> list[Ranking]:
        op = self.operator(coll)
        out = []
        for q in np.asarray(queries, np.float32):
            s = coll.similarities(q)
            f = self.solve(s, *op)
            order = _order(f, s, top=top)
            out.append(Ranking(order, f[order]))
        return out

    def solve(self, s: np.ndarray, k: int, gamma: float, s_mat, components=None) -> np.ndarray:
        """The diffusion scores f of one query whose similarities to the items are `s`.

        The seeds are the query's k most similar items, y = s^gamma on them. CG runs on the
        items of the seeds' connected components only: elsewhere y, and so every iterate, is
        zero (the same iterates as on the whole graph, a fraction of the work)."""
        n = len(s)
        seeds = _order(s, top=k)
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


def kreciprocal_query(s: np.ndarray, data: _KRData, k1: int, k2: int, lam: float
                      ) -> np.ndarray:
    """Final distance (eq.12) of one query to every database item, given its similarities `s`
    to them. The query is pool item `n` (after the database's 0..n-1)."""
    n = len(s)
    kh = _half(k1)
    d = 1.0 - s.astype(np.float64)
    near = _order(s, top=max(k1, k2 - 1, 1))

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
                 lam: float = KRECIPROCAL_LAMBDA) -> None:
        self.k1, self.k2, self.lam = int(k1), int(k2), float(lam)
        self.graph_k = self.min_graph_k = max(self.k1, self.k2 - 1)
        self.graph_label = ""

    @property
    def spec(self) -> str:
        return f"kreciprocal:k1={self.k1},k2={self.k2},lambda={self.lam:g}"

    @property
    def label(self) -> str:
        text = self.spec.replace(":", " ").replace(",", " ")
        return f"{text} ({self.graph_label})" if self.graph_label else text

    def bind(self, coll: Collection) -> "KReciprocal":
        graph = coll.knn(self.graph_k)
        bound = KReciprocal(self.k1, self.k2, self.lam)
        bound.graph_label = graph.label if graph.model is not None else ""
        return bound

    def database(self, coll: Collection) -> _KRData:
        key = ("kr", self.k1, self.k2)
        graph = coll.knn(self.graph_k)
        cache = graph._cache
        if key not in cache:
            cache[key] = kreciprocal_database(graph.neighbours, graph.similarities, self.k1,
                                              self.k2, coll.pair_similarities)
        return cache[key]

    def rank_one(self, q: np.ndarray, coll: Collection, top: int | None) -> Ranking:
        data = self.database(coll)
        s = coll.similarities(q)
        final = kreciprocal_query(s, data, self.k1, self.k2, self.lam)
        order = _order(-final, s, top=top)
        return Ranking(order, 1.0 - final[order])


# ---------------------------------------------------------------------------------------------
# option parsing (plain functions of one string: the CLI, tests and the server share them)

_SPEC = re.compile(r"^\s*([a-z][a-z0-9-]*)\s*(?::\s*(.*))?$", re.IGNORECASE)


def _params(text: str, allowed: dict[str, Callable[[str, str], object]], what: str) -> dict:
    out: dict = {}
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq or not value.strip():
            raise UsageError(f"{what}: {item!r} must be KEY=VALUE (keys: {', '.join(allowed)})")
        if key not in allowed:
            raise UsageError(f"{what}: unknown parameter {key!r} (keys: {', '.join(allowed)})")
        if key in out:
            raise UsageError(f"{what}: {key} is given twice")
        out[key] = allowed[key](key, value.strip())
    return out


def _int(low: int, high: int) -> Callable[[str, str], int]:
    def parse(key: str, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise UsageError(f"{key}={text!r} must be an integer") from None
        if not low <= value <= high:
            raise UsageError(f"{key}={value} must be between {low} and {high}")
        return value
    return parse


def _float(low: float, high: float, low_open: bool = False, high_open: bool = False
           ) -> Callable[[str, str], float]:
    def parse(key: str, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"{key}={text!r} must be a number") from None
        bad = (not math.isfinite(value) or value < low or value > high
               or (low_open and value == low) or (high_open and value == high))
        if bad:
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            raise UsageError(f"{key}={text} must be in {lo}{low:g}, {high:g}{hi}")
        return value
    return parse


RERANKERS = ("diffusion", "kreciprocal")


def parse_rerank(text: str) -> Ranker:
    """`diffusion[:k=K,alpha=A,gamma=G,iter=N]` or `kreciprocal[:k1=K1,k2=K2,lambda=L]`."""
    m = _SPEC.match(str(text))
    if not m or m.group(1).lower() not in RERANKERS:
        raise UsageError(f"--rerank {text!r}: give diffusion[:k=..,alpha=..] or "
                         f"kreciprocal[:k1=..,k2=..,lambda=..]")
    kind, rest = m.group(1).lower(), m.group(2) or ""
    if kind == "diffusion":
        p = _params(rest, {"k": _int(1, 1000), "alpha": _float(0, 1, True, True),
                           "gamma": _float(0, 100, True), "iter": _int(1, 1000)},
                    "--rerank diffusion")
        return Diffusion(p.get("k"), p.get("alpha", DIFFUSION_ALPHA), p.get("gamma"),
                         p.get("iter", DIFFUSION_ITERATIONS))
    p = _params(rest, {"k1": _int(1, 1000), "k2": _int(1, 1000), "lambda": _float(0, 1)},
                "--rerank kreciprocal")
    return KReciprocal(p.get("k1", KRECIPROCAL_K1), p.get("k2", KRECIPROCAL_K2),
                       p.get("lambda", KRECIPROCAL_LAMBDA))


def parse_qe(text: str | int) -> QueryExpansion | None:
    """`M` (average QE with the top M; 0: none) or `alpha:A[,M]` (alpha-QE)."""
    raw = str(text).strip()
    if re.fullmatch(r"\d+", raw):
        m = int(raw)
        if m > 10000:
            raise UsageError(f"--qe {m}: at most 10000 neighbours")
        return QueryExpansion(m) if m > 0 else None
    match = re.fullmatch(r"alpha\s*:\s*([^,]+?)\s*(?:,\s*(\S+))?", raw, re.IGNORECASE)
    if not match:
        raise UsageError(f"--qe {raw!r}: give M (average QE with the top M) or alpha:A[,M] "
                         f"(alpha-QE)")
    alpha = _float(0, 100)("alpha", match.group(1))
    m = _int(1, 10000)("M", match.group(2)) if match.group(2) else ALPHA_QE_M
    return QueryExpansion(m, alpha)


__all__ = ["Ranking", "Collection", "Ranker", "L2", "QueryExpansion", "Diffusion",
           "KReciprocal", "expand", "qe_weights", "average_query_expansion", "conjugate_gradient", "kreciprocal_database",
           "kreciprocal_query", "parse_rerank", "parse_qe"]
