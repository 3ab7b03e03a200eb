"""Re-ranking: kNN graphs, diffusion, k-reciprocal, query expansion, layer fusion.

Every expected value is computed independently: by hand on tiny graphs, by a dense linear solve,
or by a direct (sets and loops) implementation of Zhong et al.'s formulas. Stores are written
with StoreWriter from generated vectors; nothing is read from outside the repository.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from imgdb.errors import InvalidRequest, UserError
from imgdb.numeric import rank_rows
from imgdb.retrieval.graph import (exact_graph, find_graph, fit_graph, graph_status,
                                   knn_exact, load_graph, mutual_affinity, symmetric_normalize)
from imgdb.retrieval.rerank import (L2, Collection, Diffusion, KReciprocal, QueryExpansion,
                                    conjugate_gradient, expand, kreciprocal_database,
                                    kreciprocal_query, qe_weights)
from imgdb.retrieval.request import parse_qe, parse_rerank
from imgdb.retrieval.source import resolve
from imgdb.store import ImageRow, RowUpdate, StoreWriter, open_read

EXT = "syn-none-orig"


def unit(deg: float, z: float = 0.0) -> np.ndarray:
    v = np.array([math.cos(math.radians(deg)), math.sin(math.radians(deg)), z])
    return v / np.linalg.norm(v)


def make_store(path: Path, vectors: dict[tuple[str, str], np.ndarray], start: int = 0) -> None:
    """A store whose rows carry the given vectors (one descriptor per (layer, pooling))."""
    n = len(next(iter(vectors.values())))
    with StoreWriter(path) as w:
        w.ensure_extractor(EXT, {"backbone": "syn", "layers": sorted({l for l, _ in vectors}),
                                 "poolings": sorted({p for _, p in vectors})},
                           {key: v.shape[1] for key, v in vectors.items()})
        ups = [RowUpdate(None, ImageRow(f"/syn/img{start + i:05d}.png", 100 + i, 1.0,
                                        f"{start + i:032x}", 64, 64, 0)) for i in range(n)]
        w.commit(EXT, ups, {k: np.asarray(v, np.float32) for k, v in vectors.items()})


# ---------------------------------------------------------------------------------------------
# the graph and diffusion on a 6-node chain


def chain() -> tuple[np.ndarray, np.ndarray]:
    """Six points 20 degrees apart on a circle (a 1-D manifold) and an outlier at 53 degrees
    off its plane: cos 0.6 to node 0, the query's position."""
    nodes = np.array([unit(20 * i) for i in range(6)])
    outlier = np.array([0.6, 0.0, 0.8])
    return np.vstack([nodes, outlier]).astype(np.float32), nodes[0].astype(np.float32)


def test_mutual_knn_graph_of_the_chain_by_hand() -> None:
    x, _ = chain()
    nbr, sim = knn_exact(x, 2)
    # node 0: nearest node 1 (cos 20 deg), then node 2 (cos 40 deg); the outlier's: 0 then 1
    assert nbr[0].tolist() == [1, 2] and nbr[6].tolist() == [0, 1]
    assert sim[0] == pytest.approx([math.cos(math.radians(20)), math.cos(math.radians(40))],
                                   abs=1e-6)
    w = mutual_affinity(nbr, sim, 2, 3.0).toarray()
    edges = {(i, j) for i, j in zip(*np.nonzero(w)) if i < j}
    assert edges == {(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)}  # a path; the outlier is alone
    assert w[2, 3] == pytest.approx(math.cos(math.radians(20)) ** 3, abs=1e-6)
    assert np.allclose(w, w.T)
    s = symmetric_normalize(mutual_affinity(nbr, sim, 2, 3.0)).toarray()
    c3 = math.cos(math.radians(20)) ** 3
    assert s[0, 1] == pytest.approx(c3 / math.sqrt(c3 * 2 * c3), abs=1e-6)  # deg(0)=c3, deg(1)=2c3
    assert not s[6].any()


def test_diffusion_ranks_the_far_end_of_the_manifold_above_a_closer_outlier() -> None:
    x, q = chain()
    coll = Collection(x)
    l2 = L2().rank(q[None], coll)[0].order.tolist()
    assert l2 == [0, 1, 2, 6, 3, 4, 5]  # the outlier (cos 0.6) beats nodes 3, 4, 5
    got = Diffusion(k=2, alpha=0.99, guard=False).rank(q[None], coll)[0]
    # the whole chain, its far end (cos -0.17 to the query) included, before the outlier
    assert sorted(got.order[:6].tolist()) == [0, 1, 2, 3, 4, 5] and got.order[6] == 6
    # with little propagation (alpha 0.5) the scores decay hop by hop along the chain
    assert Diffusion(k=2, alpha=0.5, guard=False).rank(q[None], coll)[0].order.tolist() == list(range(7))
    # f is the solution of (I - alpha S) f = y, y = the query's top-2 similarities cubed
    s = symmetric_normalize(mutual_affinity(*knn_exact(x, 2), 2, 3.0)).toarray()
    y = np.zeros(7)
    y[[0, 1]] = [1.0, math.cos(math.radians(20)) ** 3]
    f = np.linalg.solve(np.eye(7) - 0.99 * s, y)
    assert got.scores == pytest.approx(f[got.order], rel=1e-7, abs=1e-9)
    assert f[5] > 0 and f[6] == 0


def test_conjugate_gradient_against_a_dense_solve() -> None:
    rng = np.random.default_rng(3)
    m = rng.normal(size=(30, 30))
    a = m @ m.T + 30 * np.eye(30)
    y = rng.normal(size=30)
    f = conjugate_gradient(lambda p: a @ p, y, 200, 1e-12)
    assert f == pytest.approx(np.linalg.solve(a, y), rel=1e-8, abs=1e-10)
    few = conjugate_gradient(lambda p: a @ p, y, 1)  # one step: along y, exact line search
    assert few == pytest.approx(y * (y @ y) / (y @ a @ y), rel=1e-10)


def test_exact_knn_in_blocks_equals_a_full_sort() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(257, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    ref = np.argsort(-s, axis=1, kind="stable")[:, :7]
    for block in (1, 10, 64, 1000):
        nbr, sim = knn_exact(x, 7, block=block)
        assert np.array_equal(nbr, ref)
        assert sim == pytest.approx(np.take_along_axis(s, ref, axis=1), abs=1e-6)
    idx, vals = rank_rows(np.array([[0.5, 0.9, 0.5, 0.1]]), 3)  # ties by the lower column
    assert idx.tolist() == [[1, 0, 2]] and vals.tolist() == [[pytest.approx(0.9), 0.5, 0.5]]


def test_rank_rows_breaks_ties_across_the_cut_by_the_lower_column():
    # three scores tie for the last two places: the lower columns win, whatever argpartition
    # happened to leave inside the cut
    assert rank_rows(np.array([[0.5, 0.9, 0.2, 0.5, 0.5, 0.1]]), 3)[0].tolist() == [[1, 0, 3]]
    rng = np.random.default_rng(3)
    s = rng.integers(0, 4, size=(200, 40)).astype(np.float32)  # ties everywhere
    for k in (1, 5, 39, 40, 60):
        idx, vals = rank_rows(s, k)
        ref = np.argsort(-s, axis=1, kind="stable")[:, :k]  # stable: ties by the lower column
        assert np.array_equal(idx, ref)
        assert np.array_equal(vals, np.take_along_axis(s, ref, axis=1))


# ---------------------------------------------------------------------------------------------
# k-reciprocal re-ranking against a direct implementation of Zhong et al.'s formulas


def zhong_direct(sim_db: np.ndarray, sim_q: np.ndarray, k1: int, k2: int, lam: float
                 ) -> np.ndarray:
    """Zhong et al. 2017 written out with sets over the pool {query} + database (query first):
    N(p, k) the k nearest (p itself first), R(p, k) = {x in N(p, k+1): p in N(x, k+1)} (eq.4),
    R* by the 2/3 rule with R(., round(k1/2)) (eq.6), V_p = exp(-d) on R*(p) normalised to sum 1
    (eq.8 as the authors' code), V averaged over N(p, k2) (eq.11), Jaccard of min/max sums
    (eq.10), d* = (1 - lam) d_J + lam d (eq.12). The database's own neighbourhoods are taken in
    the database alone; d = 1 - cos."""
    n = len(sim_db)
    d = np.zeros((n + 1, n + 1))
    d[0, 1:] = d[1:, 0] = 1 - sim_q
    d[1:, 1:] = 1 - sim_db
    np.fill_diagonal(d, 0)
    kh = int(np.around(k1 / 2))

    def nearest(p: int, k: int) -> list[int]:
        if p == 0:
            return list(np.argsort(d[0], kind="stable")[:k])
        return [1 + x for x in np.argsort(d[p, 1:], kind="stable")[:k]]

    def reciprocal(p: int, k: int) -> set[int]:
        if p == 0:  # the query's reciprocity is judged in the pool
            return {x for x in nearest(0, k + 1)
                    if 0 in list(np.argsort(d[x], kind="stable")[:k + 1])}
        return {x for x in nearest(p, k + 1) if p in nearest(x, k + 1)}

    def r_star(p: int) -> set[int]:
        r = reciprocal(p, k1)
        out = set(r)
        for c in r:
            rc = reciprocal(c, kh)
            if len(rc & r) > 2 / 3 * len(rc):
                out |= rc
        return out

    v = {}
    for p in range(n + 1):
        members = r_star(p)
        total = sum(math.exp(-d[p, x]) for x in members)
        v[p] = {x: math.exp(-d[p, x]) / total for x in members}

    def expanded(p: int) -> dict[int, float]:
        acc: dict[int, float] = {}
        near = nearest(p, k2)
        for x in near:
            for j, w in v[x].items():
                acc[j] = acc.get(j, 0.0) + w / len(near)
        return acc

    vq = expanded(0)
    out = np.zeros(n)
    for g in range(n):
        vg = expanded(1 + g)
        keys = set(vq) | set(vg)
        lo = sum(min(vq.get(j, 0.0), vg.get(j, 0.0)) for j in keys)
        hi = sum(max(vq.get(j, 0.0), vg.get(j, 0.0)) for j in keys)
        out[g] = (1 - lam) * (1 - lo / hi) + lam * d[0, 1 + g]
    return out


def kr_final(sim_db: np.ndarray, sim_q: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    s = sim_db.copy()
    np.fill_diagonal(s, -np.inf)
    nbr = np.argsort(-s, axis=1, kind="stable")[:, :max(k1, k2 - 1)]
    sim = np.take_along_axis(sim_db, nbr.astype(np.int64), axis=1).astype(np.float32)
    data = kreciprocal_database(nbr, sim, k1, k2, lambda a, b: sim_db[a, b])
    return kreciprocal_query(sim_q, data, k1, k2, lam)


# A handmade similarity matrix: two tight groups {0, 1, 2} and {4, 5, 6}, and item 3 that sits
# between them, nearer to the query than item 2 but no one's reciprocal neighbour but 6's.
HAND = np.array([
    [1.00, 0.90, 0.85, 0.40, 0.10, 0.10, 0.20],
    [0.90, 1.00, 0.88, 0.35, 0.10, 0.10, 0.15],
    [0.85, 0.88, 1.00, 0.30, 0.05, 0.10, 0.10],
    [0.40, 0.35, 0.30, 1.00, 0.50, 0.55, 0.60],
    [0.10, 0.10, 0.05, 0.50, 1.00, 0.92, 0.90],
    [0.10, 0.10, 0.10, 0.55, 0.92, 1.00, 0.91],
    [0.20, 0.15, 0.10, 0.60, 0.90, 0.91, 1.00],
])
HAND_Q = np.array([0.95, 0.86, 0.70, 0.72, 0.15, 0.12, 0.25])


def test_kreciprocal_on_a_handmade_matrix() -> None:
    final = kr_final(HAND, HAND_Q, 2, 1, 0.3)
    assert final == pytest.approx(zhong_direct(HAND, HAND_Q, 2, 1, 0.3), abs=1e-12)
    # By hand, k1 = 2 (round(k1/2) = 1), k2 = 1, lambda = 0.3, d = 1 - cos:
    # the query's 2 nearest are 0 (0.95) and 1 (0.86); it would be among item 0's 2 nearest
    # (0.95 >= 0.85, item 2) but not item 1's (0.86 < 0.88), so R(q) = {q, 0} = R*(q) and
    # V_q = (1, e^-0.05) / (1 + e^-0.05). Items 0, 1, 2 are each other's reciprocal neighbours:
    # R*(g) = {0, 1, 2}, V_g = exp(-d(g, .)) normalised; item 3's 2 nearest (6, 5) do not
    # return the favour: R*(3) = {3}, nothing shared with the query, Jaccard distance 1.
    e = math.exp
    vq0 = e(-0.05) / (1 + e(-0.05))
    v = {0: 1 / (1 + e(-0.10) + e(-0.15)),
         1: e(-0.10) / (e(-0.10) + 1 + e(-0.12)),
         2: e(-0.15) / (e(-0.15) + e(-0.12) + 1)}  # V_g[0] of g = 0, 1, 2
    for g, vg0 in v.items():
        m = min(vq0, vg0)
        assert final[g] == pytest.approx(0.7 * (1 - m / (2 - m)) + 0.3 * (1 - HAND_Q[g]),
                                         abs=1e-6)
    for g in (3, 4, 5, 6):
        assert final[g] == pytest.approx(0.7 + 0.3 * (1 - HAND_Q[g]), abs=1e-6)
    assert np.argsort(-HAND_Q, kind="stable").tolist() == [0, 1, 3, 2, 6, 4, 5]  # L2
    # re-ranked: item 2 joins its group ahead of the in-between item 3
    assert np.lexsort((np.arange(7), -HAND_Q, final)).tolist() == [0, 1, 2, 3, 6, 4, 5]


@pytest.mark.parametrize("seed", range(12))
def test_kreciprocal_equals_zhongs_formulas(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 36))
    x = rng.normal(size=(n, 5))
    x[:, 0] += 2.0
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.integers(n)] if seed % 3 == 0 else x[0] + 0.3 * rng.normal(size=5)
    q = q / np.linalg.norm(q)
    k1 = int(rng.integers(1, min(12, n - 2)))
    k2 = int(rng.integers(1, k1 + 2))
    lam = float(rng.random())
    sim_db, sim_q = x @ x.T, x @ q
    got = kr_final(sim_db, sim_q, k1, k2, lam)
    assert got == pytest.approx(zhong_direct(sim_db, sim_q, k1, k2, lam), abs=1e-12)


def test_kreciprocal_ranker_ranks_by_the_final_distance() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(60, 6)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[7] + 0.2 * rng.normal(size=6).astype(np.float32)
    q /= np.linalg.norm(q)
    coll = Collection(x)
    got = KReciprocal(8, 3, 0.3, guard=False).rank(q[None], coll)[0]
    s = (x @ q).astype(np.float64)
    sim_db = (x @ x.T).astype(np.float64)
    ref = zhong_direct(sim_db, s, 8, 3, 0.3)
    assert got.scores == pytest.approx(1 - ref[got.order], abs=1e-5)
    assert np.all(np.diff(ref[got.order]) >= -1e-9)
    top = KReciprocal(8, 3, 0.3, guard=False).rank(q[None], coll, top=5)[0]
    assert top.order.tolist() == got.order[:5].tolist()


# ---------------------------------------------------------------------------------------------
# query expansion


def test_alpha_qe_weights_by_hand() -> None:
    q = np.array([[1.0, 0.0]], np.float32)
    nb = [np.array([[0.6, 0.8], [0.8, -0.6], [-1.0, 0.0]], np.float32)]
    sims = [np.array([0.6, 0.8, -1.0], np.float32)]
    assert qe_weights(sims[0], 3).tolist() == pytest.approx([0.216, 0.512, 0.0])
    a = expand(q, nb, sims, alpha=3)[0]
    want = np.array([1 + 0.216 * 0.6 + 0.512 * 0.8, 0.216 * 0.8 - 0.512 * 0.6])
    assert a == pytest.approx(want / np.linalg.norm(want), abs=1e-6)
    avg = expand(q, nb)[0]  # average QE: every neighbour counts once
    want = np.array([1 + 0.6 + 0.8 - 1.0, 0.8 - 0.6])
    assert avg == pytest.approx(want / np.linalg.norm(want), abs=1e-6)


def test_query_expansion_ranker() -> None:
    x = np.array([unit(0), unit(10), unit(30), unit(80), unit(-60)], np.float32)
    q = unit(5).astype(np.float32)
    coll = Collection(x)
    got = QueryExpansion(2, alpha=3, guard=False).rank(q[None], coll)[0]
    s = x @ q
    q2 = q + s[0] ** 3 * x[0] + s[1] ** 3 * x[1]
    q2 /= np.linalg.norm(q2)
    assert got.order.tolist() == np.argsort(-(x @ q2), kind="stable").tolist()
    assert got.scores == pytest.approx(np.sort(x @ q2)[::-1], abs=1e-6)


def test_option_parsers() -> None:
    (d,) = parse_rerank("diffusion:k=7,alpha=0.9")
    assert (d.k, d.alpha) == (7, 0.9) and d.spec == "diffusion:k=7,alpha=0.9"
    (kr,) = parse_rerank("kreciprocal:k1=12,k2=4,lambda=0.2")
    assert (kr.k1, kr.k2, kr.lam) == (12, 4, 0.2)
    assert parse_rerank("kreciprocal")[0].spec == "kreciprocal:k1=20,k2=6,lambda=0.3"
    # a chain: an item with '=' and no ':' belongs to the stage before it
    chain = parse_rerank("diffusion:k=7,alpha=0.9,kreciprocal:k1=5,k2=2")
    assert [st.spec for st in chain] == ["diffusion:k=7,alpha=0.9",
                                         "kreciprocal:k1=5,k2=2,lambda=0.3"]
    assert parse_qe("3").m == 3 and parse_qe("3").alpha == 0 and parse_qe("0") is None
    a = parse_qe("alpha:3,7")
    assert (a.alpha, a.m) == (3.0, 7)
    assert parse_qe("alpha:1").m == 10
    for bad in ("diffusion:k=0", "diffusion:alpha=1", "diffusion:beta=2", "kreciprocal:k1",
                "pagerank", "diffusion:k=3,k=4", "kreciprocal:lambda=nan", "diffusion,diffusion",
                "diffusion,", ""):
        with pytest.raises(InvalidRequest):
            parse_rerank(bad)
    for bad in ("alpha", "alpha:x", "alpha:3,0", "-1", "beta:2"):
        with pytest.raises(InvalidRequest):
            parse_qe(bad)


# ---------------------------------------------------------------------------------------------
# layer fusion and stored graphs


def test_fusion_vectors_by_hand(tmp_path: Path) -> None:
    db = tmp_path / "f.h5"
    a = np.array([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])
    b = np.array([[0.0, 0.0, 5.0], [1.0, 2.0, 2.0], [0.0, 1.0, 0.0]])
    make_store(db, {("block6", "mac"): a, ("head", "gem-p3"): b})
    with open_read(db) as view:
        src = resolve(view, "0.5*block6/mac+head/gem-p3")
        assert src.name == f"0.5*{EXT}/block6/mac+{EXT}/head/gem-p3" and src.dim == 5
        rows, fused = src.valid_vectors(view)
        assert rows.tolist() == [0, 1, 2]
        assert fused[0] == pytest.approx([0.3, 0.4, 0, 0, 1])
        assert fused[1] == pytest.approx([0, 0.5, 1 / 3, 2 / 3, 2 / 3])
        assert src.vectors(view, [2, 0])[0] == pytest.approx([0.5, 0, 0, 1, 0])
        plain = resolve(view, "head/gem-p3")
        assert not plain.fused and plain.vectors(view, [1])[0] == pytest.approx([1, 2, 2])
        assert resolve(view, src.name).name == src.name  # the canonical name resolves again
        for bad in ("head/mac+head/gem-p3", "block6/mac+block6/mac", "0*block6/mac+head/gem-p3",
                    "0.5*head/gem-p3"):
            with pytest.raises(UserError):
                resolve(view, bad)


def test_fusion_through_pca_index_graph_and_query(tmp_path: Path) -> None:
    from imgdb.retrieval.index import build_index
    from imgdb.retrieval.pca import fit_pca_model
    from imgdb.retrieval.request import QueryRequest
    from imgdb.retrieval.service import QueryService

    rng = np.random.default_rng(1)
    db = tmp_path / "f.h5"
    centres = rng.normal(size=(6, 16))
    labels = np.repeat(np.arange(6), 10)
    a = np.abs(centres[labels] + 0.3 * rng.normal(size=(60, 16)))
    b = np.abs(rng.normal(size=(60, 4)))
    make_store(db, {("block6", "mac"): a, ("head", "mac"): b})
    name = "block6/mac+0.25*head/mac"
    pca = fit_pca_model(db, name, 8, True, None)
    assert pca.descriptor == f"{EXT}/block6/mac+0.25*{EXT}/head/mac" and pca.attrs["dims"] == 8
    status = build_index(db, name, "v1")
    assert status.attrs["descriptor"] == pca.descriptor and status.attrs["items"] == 60
    model = fit_graph(db, name, "v1", k=5)
    assert model.attrs["method"] == "annoy" and model.attrs["pca"] == pca.id
    exact = fit_graph(db, name, "v1", k=5, method="exact")
    with open_read(db) as view:
        ann, ex = load_graph(view, model), load_graph(view, exact)
    # Annoy on 60 items with 50 trees finds the exact neighbours
    assert np.array_equal(ann.neighbours, ex.neighbours)
    assert ann.similarities == pytest.approx(ex.similarities, abs=1e-5)
    _, res = QueryService(db).answer(QueryRequest(descriptor=name, model="v1", k=5,
                                                  rerank=(Diffusion(),)), ids=[12])
    assert res[0].hits[0].id == 12
    assert all(labels[h.id] == labels[12] for h in res[0].hits)


def test_graph_model_provenance_staleness_and_exactness(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    db = tmp_path / "g.h5"
    x = rng.normal(size=(40, 8)).astype(np.float32)
    make_store(db, {("head", "mac"): x})
    m1 = fit_graph(db, "head/mac", k=4, gamma=2)
    m2 = fit_graph(db, "head/mac", k=6)
    assert (m1.version, m2.version) == ("v1", "v2")
    a = m1.attrs
    assert (a["k"], a["gamma"], a["method"], a["pca"], a["image_count"]) == (4, 2.0, "exact",
                                                                               "none", 40)
    with open_read(db) as view:
        assert a["extractor_revision"] == view.revision(EXT)
        assert a["content_hash"] == view.content_hash(EXT)
        g = load_graph(view, m1)
        assert [m.version for m in view.models("graph")] == ["v1", "v2"]
        src = resolve(view, "head/mac")
        assert find_graph(view, db, src, None).version == "v2"
        assert find_graph(view, db, src, None, "v1").version == "v1"
        with pytest.raises(UserError, match="holds 6 neighbours"):
            find_graph(view, db, src, None, min_k=8)
    unit_x = x / np.linalg.norm(x, axis=1, keepdims=True)
    ref = exact_graph(unit_x, 4, 2.0)
    assert np.array_equal(g.neighbours, ref.neighbours) and g.rows.tolist() == list(range(40))
    assert abs(g.affinity() - ref.affinity()).max() < 1e-6  # the stored CSR is the derived one
    # a new image makes every graph stale, with the command that rebuilds it
    make_store(db, {("head", "mac"): x[:1]}, start=40)
    with open_read(db) as view:
        assert "images added" in graph_status(view, m2)
        with pytest.raises(UserError, match=r"stale .* imgdb fit graph --db .* --k 6 --gamma 3"):
            find_graph(view, db, resolve(view, "head/mac"), None)


def test_diffusion_query_through_the_store_equals_the_in_memory_ranking(tmp_path: Path) -> None:
    from imgdb.retrieval.request import QueryRequest
    from imgdb.retrieval.service import QueryService

    rng = np.random.default_rng(4)
    db = tmp_path / "d.h5"
    x = np.abs(rng.normal(size=(80, 12))).astype(np.float32)
    make_store(db, {("head", "mac"): x})
    fit_graph(db, "head/mac", k=10)
    request = QueryRequest(descriptor=f"{EXT}/head/mac", exact=True, k=80, rerank=(Diffusion(),))
    _, got = QueryService(db).answer(request, ids=[3, 50])
    unit_x = x / np.linalg.norm(x, axis=1, keepdims=True)
    coll = Collection(unit_x)
    want = Diffusion(k=10).rank(unit_x[[3, 50]], coll)
    for res, ref in zip(got, want):
        assert [h.id for h in res.hits] == ref.order.tolist()
        assert [h.score for h in res.hits] == pytest.approx(ref.scores.tolist(), rel=1e-6)
