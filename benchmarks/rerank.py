"""Speed of the re-ranking parts on synthetic clustered vectors, each beside the plain
dot-product ranking measured in the same run.

    python benchmarks/rerank.py                       # 200k x 128 graph, diffusion at 100k
    python benchmarks/rerank.py --n 1000000 --dim 128 --diffusion-n 100000 --json out.json

1. `imgdb fit graph` from an Annoy index, end to end on a store: a synthetic store of N rows
   (StoreWriter), `index build` (Annoy, --trees), then `fit_graph` (reads the index, one Annoy
   lookup per item in --threads threads, saves the model in one commit). Recall of the Annoy
   graph against the exact neighbours of 1,000 sampled items; the exact builder's time is
   measured on a block of rows and scaled to N (it is quadratic).
2. A diffusion query at --diffusion-n items (the first items of the same vectors, their exact
   graph): seed search + conjugate gradient + ranking, per query, against the plain ranking
   (one matrix-vector product + top-k) of the same queries; k-reciprocal and alpha-QE too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from imgdb.numeric import rank_rows
from imgdb.retrieval.graph import KnnGraph, knn_exact
from imgdb.retrieval.rerank import L2, Collection, Diffusion, KReciprocal, QueryExpansion
from imgdb.store import ImageRow, RowUpdate, StoreWriter


def clustered(n: int, dim: int, seed: int = 0, per_cluster: int = 50) -> np.ndarray:
    """Unit vectors in clusters of ~per_cluster around random centres (a collection with many
    views of each object)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // per_cluster), dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        lab = rng.integers(0, len(centres), e - s)
        out[s:e] = centres[lab] + 0.6 * rng.standard_normal((e - s, dim)).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def make_store(path: Path, x: np.ndarray, chunk: int = 50_000) -> None:
    ext = "syn-none-orig"
    with StoreWriter(path) as w:
        w.ensure_extractor(ext, {"backbone": "syn", "layers": ["l"], "poolings": ["p"]},
                           {("l", "p"): x.shape[1]})
        for s in range(0, len(x), chunk):
            e = min(len(x), s + chunk)
            ups = [RowUpdate(None, ImageRow(f"/syn/{i:08d}.png", 1, 1.0, f"{i:032x}", 8, 8, 0))
                   for i in range(s, e)]
            w.commit(ext, ups, {("l", "p"): x[s:e]})


def ms(values: list[float]) -> dict:
    a = np.asarray(values) * 1e3
    return {"median_ms": round(float(np.median(a)), 2), "p90_ms": round(float(np.percentile(a, 90)), 2),
            "mean_ms": round(float(a.mean()), 2)}


def timed_queries(ranker, queries: np.ndarray, coll: Collection, top: int) -> tuple[dict, list]:
    ranker.rank(queries[:1], coll, top=top)  # precomputation (normalisation, k-reciprocal sets)
    times, out = [], []
    for q in queries:
        t = time.perf_counter()
        out.append(ranker.rank(q[None], coll, top=top)[0])
        times.append(time.perf_counter() - t)
    return ms(times), out


def graph_part(args, x: np.ndarray, report: dict) -> None:
    from imgdb.retrieval.graph import fit_graph
    from imgdb.retrieval.index import build_index

    n = len(x)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        db = Path(tmp) / "bench.h5"
        t = time.perf_counter()
        make_store(db, x)
        report["store_write_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        build_index(db, "l/p", None, trees=args.trees)
        report["index_build_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        model = fit_graph(db, "l/p", None, k=args.k, method="annoy", threads=args.threads)
        report["fit_graph_annoy_s"] = round(time.perf_counter() - t, 1)
        report["fit_graph_search_k"] = model.attrs["search_k"]
        from imgdb.store import open_read
        from imgdb.retrieval.graph import load_graph

        with open_read(db) as view:
            graph = load_graph(view, model)
    # recall of the Annoy graph: exact neighbours of a sample
    rng = np.random.default_rng(1)
    sample = rng.choice(n, min(1000, n), replace=False)
    s = x[sample] @ x.T
    s[np.arange(len(sample)), sample] = -np.inf
    exact, _ = rank_rows(s, args.k)
    hits = [len(set(a) & set(b)) for a, b in zip(exact.tolist(), graph.neighbours[sample].tolist())]
    report["annoy_graph_recall_at_k"] = round(float(np.sum(hits)) / exact.size, 4)
    # the exact builder on one block of rows, scaled to n (it is quadratic in n)
    rows = min(n, 4096)
    t = time.perf_counter()
    block = x[:rows] @ x.T
    block[np.arange(rows), np.arange(rows)] = -np.inf
    rank_rows(block, args.k)
    per_row = (time.perf_counter() - t) / rows
    report["exact_graph_estimated_s"] = round(per_row * n, 1)
    report["exact_graph_estimated_1M_s"] = round(per_row * n * (1e6 / n) ** 2, 0)


def query_part(args, x: np.ndarray, report: dict) -> None:
    n = min(args.diffusion_n, len(x))
    base = x[:n]
    t = time.perf_counter()
    nbr, sim = knn_exact(base, max(args.k, 20))
    report["diffusion_graph_exact_s"] = round(time.perf_counter() - t, 1)
    graph = KnnGraph(nbr, sim, np.arange(n))
    coll = Collection(base, graph)
    rng = np.random.default_rng(2)
    picks = rng.choice(n, args.queries, replace=False)
    queries = base[picks] + 0.3 * rng.standard_normal((args.queries, base.shape[1])).astype(np.float32) / np.sqrt(base.shape[1])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    t = time.perf_counter()
    graph.normalized(args.k)  # the one-off normalisation (cached on the loaded graph)
    report["diffusion_normalisation_s"] = round(time.perf_counter() - t, 3)
    out = {}
    plain, ranked = timed_queries(L2(), queries, coll, args.top)
    out["L2 (dot product + top-k)"] = plain
    diff, dranked = timed_queries(Diffusion(k=args.k), queries, coll, args.top)
    out[f"diffusion k={args.k} alpha=0.99 20 CG iterations"] = diff
    t = time.perf_counter()
    KReciprocal().database(coll)
    report["kreciprocal_database_s"] = round(time.perf_counter() - t, 1)
    out["kreciprocal k1=20 k2=6"], _ = timed_queries(KReciprocal(), queries, coll, args.top)
    out["alpha-QE alpha=3 M=10"], _ = timed_queries(QueryExpansion(10, 3.0), queries, coll,
                                                    args.top)
    report["per_query"] = out
    # how much the diffusion changes the top of the ranking (sanity: it does something)
    same = [len(set(a.order[:10]) & set(b.order[:10])) / 10 for a, b in zip(ranked, dranked)]
    report["diffusion_top10_overlap_with_L2"] = round(float(np.mean(same)), 3)
    report["diffusion_n"] = n
    report["graph_edges_at_k"] = int(graph.affinity(args.k).nnz)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="items of the graph benchmark")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--trees", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--diffusion-n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--top", type=int, default=100)
    ap.add_argument("--skip-graph", action="store_true")
    ap.add_argument("--tmp", default=None, help="folder for the temporary store")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor()
                    or platform.machine(), "cpus": os.cpu_count(),
                    "loadavg_start": os.getloadavg(), "args": vars(args) | {"json": str(args.json)}}
    x = clustered(max(args.n, args.diffusion_n), args.dim)
    if not args.skip_graph:
        graph_part(args, x[:args.n], report)
        print(json.dumps(report, indent=1), file=sys.stderr)
    query_part(args, x, report)
    report["loadavg_end"] = os.getloadavg()
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
