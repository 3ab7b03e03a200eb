#!/usr/bin/env python
"""Search benchmark: Annoy index build time, warm query latency, recall@10, exact search, CLI start.

Synthetic store: N vectors of D dims written straight into an imgdb store with StoreWriter
(chunked commits, flat memory). The vectors are CLUSTERED, not pure noise: C gaussian centres
(components N(0, 1)) and every vector = a random centre + isotropic gaussian noise (sigma
--noise). Real descriptors are clustered; pure noise in 256-d is Annoy's worst case. Within a
cluster the noise is still isotropic, so the recall measured here is a pessimistic proxy for
real descriptors, which have much lower intrinsic dimension. Queries are held out: drawn the same
way with another random stream, never stored.

What is measured (each with the code path named):
  build     imgdb.retrieval.index.build_index(db, descriptor, "none", trees=T, seed=0), wall time, with a
            phase breakdown (add_item loop incl. HDF5 reads / Annoy build / save / rest) taken by
            timestamping a subclass of annoy.AnnoyIndex (patched into the annoy module).
  warm      in-process, loaded once as `imgdb query` does: QueryService.plan -> .space (the
            index loaded); then each query is timed as the query path runs it
            (transform.transform + QueryService.rank) -> p50 / p99 / mean ms.
  exact     imgdb.retrieval.index.topk_exact through make_searcher with no index (what `imgdb query --exact`
            runs), one query at a time, for a few queries: it streams the whole store.
  recall@10 Annoy (as above) against exact top-10 computed in numpy on the same L2-normalised
            vectors (one chunked pass over the store for all queries). Optionally also with
            other Annoy search_k values than the CLI default (`--search-k` sets it per query).
  CLI       wall time of `imgdb query --id 0 --db STORE -k 10` (fresh process; the OS page
            cache is warm from the runs above), of `python -c "import imgdb.cli"`, and whether
            torch ends up in sys.modules after each.
  shards    with --shards N[,M...]: build_index(..., shards=N) (N Annoy files built by parallel
            processes, `imgdb index build --shards N`), its build wall time, and recall@10 and
            latency of imgdb.retrieval.index.AnnoySearcher over all shards (top-k merged) with
            the CLI's default search_k, against the same exact top-10 as the single index.

Examples:
  python benchmarks/search.py --n 100000
  python benchmarks/search.py --store /tmp/bench1m.h5 --keep-store --out results.json
  python benchmarks/search.py --store /tmp/bench1m.h5 --reuse-index --queries 200
  python benchmarks/search.py --n 1000000 --shards 2,4 --cli-repeats 0 --out shards.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

EXTRACTOR = "synthetic-bench"
LAYER, POOLING = "layer", "vec"
DESCRIPTOR = f"{EXTRACTOR}/{LAYER}/{POOLING}"
K = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=None,
                   help="Store to create, or reuse if it exists with the same synthetic "
                        "parameters (default: a new file in the temp dir, deleted at the end).")
    p.add_argument("--keep-store", action="store_true",
                   help="Keep the store and its index at the end (a --store is always kept).")
    p.add_argument("--n", type=int, default=1_000_000, help="Vectors in the store (1000000).")
    p.add_argument("--dims", type=int, default=256, help="Dimensions (256).")
    p.add_argument("--clusters", type=int, default=1000, help="Gaussian cluster centres (1000).")
    p.add_argument("--noise", type=float, default=0.5,
                   help="Noise sigma around a centre; centre components are N(0, 1) (0.5).")
    p.add_argument("--seed", type=int, default=0, help="Data seed (0).")
    p.add_argument("--chunk", type=int, default=50_000, help="Rows per StoreWriter.commit.")
    p.add_argument("--trees", type=int, default=None,
                   help="Annoy trees (default: imgdb.index.DEFAULT_TREES, the CLI default).")
    p.add_argument("--reuse-index", action="store_true",
                   help="Skip the build when the store already has a current index with --trees.")
    p.add_argument("--queries", type=int, default=1000, help="Held-out queries timed (1000).")
    p.add_argument("--recall-queries", type=int, default=0,
                   help="Queries used for recall@10 (default 0 = all --queries).")
    p.add_argument("--exact-queries", type=int, default=3,
                   help="Queries timed with exact brute-force search, one at a time (3).")
    p.add_argument("--search-k", default="2000,10000,50000",
                   help="Extra Annoy search_k values for a recall/latency sweep that the CLI "
                        "does not expose; '' to skip (default 2000,10000,50000; Annoy's own "
                        "default is k * trees).")
    p.add_argument("--cli-repeats", type=int, default=3,
                   help="Runs of each CLI timing (3; 0 skips the CLI timings).")
    p.add_argument("--shards", default="",
                   help="Also build sharded indexes with these shard counts, e.g. 2,4 (one "
                        "process per shard, at most one per CPU), and compare with the single "
                        "index: build time, recall@10, latency ('' skips).")
    p.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    args = p.parse_args(argv)
    if args.n < K or args.dims < 2 or args.clusters < 1 or args.queries < 1:
        p.error("need --n >= 10, --dims >= 2, --clusters >= 1, --queries >= 1")
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# synthetic data


def bench_params(args: argparse.Namespace) -> dict:
    return {"n": args.n, "dims": args.dims, "clusters": args.clusters, "noise": args.noise,
            "seed": args.seed}


def centres(args: argparse.Namespace) -> np.ndarray:
    return np.random.default_rng([args.seed, 0]).normal(size=(args.clusters, args.dims)
                                                       ).astype(np.float32)


def draw(rng: np.random.Generator, c: np.ndarray, m: int, noise: float) -> np.ndarray:
    labels = rng.integers(0, len(c), m)
    return (c[labels] + noise * rng.standard_normal((m, c.shape[1]), dtype=np.float32)
            ).astype(np.float32)


def ensure_store(args: argparse.Namespace, db: Path) -> dict:
    """Create the synthetic store, or check that an existing one was made with these params."""
    from imgdb.store import STATUS_OK, ImageRow, RowUpdate, StoreWriter, open_read

    params = bench_params(args)
    if db.exists():
        with open_read(db) as view:
            try:
                found = view.settings(EXTRACTOR).get("bench")
            except Exception:  # noqa: BLE001 - any store without our extractor
                found = None
        if found != params:
            sys.exit(f"{db} exists but was not made by this benchmark with {params} "
                     f"(it has {found}); delete it or pick another --store")
        log(f"reusing store {db} ({db.stat().st_size / 2**30:.2f} GiB)")
        return {"created": False, "seconds": None}
    c = centres(args)
    started = time.perf_counter()
    with StoreWriter(db) as writer:
        writer.ensure_extractor(EXTRACTOR, {"backbone": "synthetic", "layers": [LAYER],
                                            "poolings": [POOLING], "bench": params},
                                {(LAYER, POOLING): args.dims})
        for i, start in enumerate(range(0, args.n, args.chunk)):
            stop = min(args.n, start + args.chunk)
            vecs = draw(np.random.default_rng([args.seed, 1, i]), c, stop - start, args.noise)
            rows = [RowUpdate(None, ImageRow(f"/synthetic/{j:08d}.jpg", 1, 0.0, "0" * 32, 64,
                                             64, STATUS_OK)) for j in range(start, stop)]
            writer.commit(EXTRACTOR, rows, {(LAYER, POOLING): vecs})
            if i % 5 == 4 or stop == args.n:
                log(f"  store: {stop}/{args.n} rows, {time.perf_counter() - started:.1f}s")
    secs = time.perf_counter() - started
    log(f"created store {db} in {secs:.1f}s ({db.stat().st_size / 2**30:.2f} GiB)")
    return {"created": True, "seconds": round(secs, 2)}


def held_out_queries(args: argparse.Namespace) -> np.ndarray:
    return draw(np.random.default_rng([args.seed, 2]), centres(args), args.queries, args.noise)


# ---------------------------------------------------------------------------------------------
# build


def timed_build(db: Path, trees: int) -> dict:
    """build_index with a phase breakdown from a timestamping AnnoyIndex subclass."""
    import annoy

    from imgdb.retrieval.index import build_index

    marks: dict[str, float] = {}
    original = annoy.AnnoyIndex

    class Stamped(original):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **kw):
            marks["init"] = time.perf_counter()
            super().__init__(*a, **kw)

        def build(self, *a, **kw):
            marks["build0"] = time.perf_counter()
            try:
                return super().build(*a, **kw)
            finally:
                marks["build1"] = time.perf_counter()

        def save(self, *a, **kw):
            marks["save0"] = time.perf_counter()
            try:
                return super().save(*a, **kw)
            finally:
                marks["save1"] = time.perf_counter()

    annoy.AnnoyIndex = Stamped
    try:
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        info = build_index(db, DESCRIPTOR, "none", trees=trees, seed=0)
        t1 = time.perf_counter()
        cpu = time.process_time() - cpu0
    finally:
        annoy.AnnoyIndex = original
    phases = {
        "before_first_add_s": marks["init"] - t0,  # lock, open, first chunk read + transform
        "add_loop_s": marks["build0"] - marks["init"],  # add_item + remaining HDF5 reads
        "annoy_build_s": marks["build1"] - marks["build0"],
        "save_s": marks["save1"] - marks["save0"],
        "after_save_s": t1 - marks["save1"],  # file digest, registry write
    }
    return {"name": info.name, "seconds": round(t1 - t0, 2), "cpu_seconds": round(cpu, 2),
            "phases": {k: round(v, 2) for k, v in phases.items()},
            "file_bytes": int(info.attrs["file_bytes"]), "items": int(info.attrs["items"]),
            "trees": trees, "reused": False}


def read_only_pass(db: Path) -> float:
    """Seconds to stream + L2-normalise every vector as build_index does, without Annoy."""
    from imgdb.retrieval.whitening import Identity
    from imgdb.store import open_read

    t = time.perf_counter()
    ident = Identity()
    with open_read(db) as view:
        for _, raw in view.iter_valid(view.descriptor(DESCRIPTOR)):
            ident.transform(raw)
    return time.perf_counter() - t


def existing_index(db: Path, trees: int) -> dict | None:
    from imgdb.retrieval.index import list_indexes
    from imgdb.store import open_read

    with open_read(db) as view:
        for info in list_indexes(view, db):
            if info.stale is None and info.attrs["trees"] == trees \
                    and info.attrs["descriptor"] == DESCRIPTOR \
                    and int(info.attrs.get("shards", 1)) == 1:
                return {"name": info.name, "seconds": info.attrs.get("build_seconds"),
                        "phases": None, "file_bytes": int(info.attrs["file_bytes"]),
                        "items": int(info.attrs["items"]), "trees": trees, "reused": True}
    return None


# ---------------------------------------------------------------------------------------------
# queries


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def exact_top10(db: Path, queries: np.ndarray) -> tuple[np.ndarray, float]:
    """(Q, 10) exact row ids by cosine on L2-normalised vectors, one chunked pass over the store."""
    from imgdb.numeric import l2_normalize
    from imgdb.store import open_read

    t = time.perf_counter()
    qn = l2_normalize(queries)
    best_s = np.full((len(qn), K), -np.inf, np.float32)
    best_r = np.full((len(qn), K), -1, np.int64)
    with open_read(db) as view:
        for rows, raw in view.iter_valid(view.descriptor(DESCRIPTOR)):
            sims = qn @ l2_normalize(raw).T
            s = np.concatenate([best_s, sims], axis=1)
            r = np.concatenate([best_r, np.broadcast_to(rows, sims.shape)], axis=1)
            keep = np.argpartition(-s, K - 1, axis=1)[:, :K]
            best_s = np.take_along_axis(s, keep, 1)
            best_r = np.take_along_axis(r, keep, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_r, order, 1), time.perf_counter() - t


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[:K]) & set(t.tolist())) / K for f, t in zip(found, truth)]))


def warm_queries(args: argparse.Namespace, db: Path, queries: np.ndarray) -> dict:
    from imgdb.retrieval.request import QueryRequest
    from imgdb.retrieval.service import QueryPlan, QueryService
    from imgdb.store import open_read

    out: dict = {}
    service = QueryService(db)
    with open_read(db) as view:
        t = time.perf_counter()
        request = QueryRequest(k=K)
        plan = service.plan(request)  # what `imgdb query --id 0` does
        out["plan_query_s"] = time.perf_counter() - t
        t = time.perf_counter()
        _, transform = service.space(plan, request)  # the CLI default search_k
        out["searcher_load_s"] = time.perf_counter() - t

        def search(q: np.ndarray, k: int):  # the query path's search (the loaded space)
            return service.rank(plan, request, q)
        t = time.perf_counter()
        view.content_hash(EXTRACTOR)
        out["content_hash_s"] = time.perf_counter() - t
        t = time.perf_counter()
        view.images()
        out["read_images_s"] = time.perf_counter() - t

        def one(q: np.ndarray, fn) -> tuple[list[int], float]:
            t0 = time.perf_counter()
            hits = fn(transform.transform(q[None].astype(np.float32)), K)[0]
            return [r for r, _ in hits], (time.perf_counter() - t0) * 1e3

        for q in queries[:20]:  # warm-up: page in the index, first-call costs
            one(q, search)
        ids, lat = [], []
        for q in queries:
            found, ms = one(q, search)
            ids.append(found)
            lat.append(ms)
        out["annoy_ids"] = ids
        out["latency_ms"] = {"p50": pct(lat, 50), "p99": pct(lat, 99),
                             "mean": statistics.fmean(lat), "max": max(lat), "n": len(lat)}
        log(f"warm Annoy queries: p50 {out['latency_ms']['p50']:.3f} ms, "
            f"p99 {out['latency_ms']['p99']:.3f} ms over {len(lat)}")

        exact_plan = QueryPlan(plan.descriptor, None, None)

        def exact(q: np.ndarray, k: int):  # every stored vector, streamed
            return service.rank(exact_plan, request, q)
        ex_ids, ex_ms = [], []
        for q in queries[:args.exact_queries]:
            found, ms = one(q, exact)
            ex_ids.append(found)
            ex_ms.append(ms)
            log(f"exact query (streamed): {ms / 1e3:.2f} s")
        out["exact_ids"] = ex_ids
        out["exact_ms"] = ex_ms
    return out


def search_k_sweep(db: Path, name: str, queries: np.ndarray, truth: np.ndarray,
                   values: list[int]) -> list[dict]:
    """Recall/latency at larger search_k on the same index file (not reachable from the CLI)."""
    from annoy import AnnoyIndex

    from imgdb.numeric import l2_normalize
    from imgdb.retrieval.index import registered_file
    from imgdb.store import open_read

    with open_read(db) as view:
        entry = view.index(name)
        rows = view.index_rows(name)
        ann = AnnoyIndex(int(entry.attrs["dims"]), str(entry.attrs["metric"]))
    ann.load(str(registered_file(db, entry)))
    out = []
    for sk in values:
        lat, found = [], []
        for q in queries[:len(truth)]:
            t = time.perf_counter()
            items = ann.get_nns_by_vector(l2_normalize(q[None])[0].tolist(), K, search_k=sk)
            lat.append((time.perf_counter() - t) * 1e3)
            found.append([int(rows[i]) for i in items])
        r = {"search_k": sk, "recall_at_10": recall(found, truth), "p50_ms": pct(lat, 50),
             "p99_ms": pct(lat, 99)}
        log(f"search_k={sk}: recall@10 {r['recall_at_10']:.3f}, p50 {r['p50_ms']:.2f} ms")
        out.append(r)
    ann.unload()
    return out


# ---------------------------------------------------------------------------------------------
# sharded indexes


def sharded(db: Path, trees: int, counts: list[int], queries: np.ndarray, truth: np.ndarray
            ) -> list[dict]:
    """Build a sharded index per count; recall@10 and latency of AnnoySearcher over its shards
    with the CLI's default search_k (what `imgdb query` does with that index)."""
    from imgdb.retrieval.index import AnnoySearcher, build_index, remove_index
    from imgdb.retrieval.pca import post_processor
    from imgdb.store import open_read

    out = []
    for n in counts:
        name = f"bench-{n}-shards"
        log(f"building {n} shards: build_index(trees={trees}, seed=0, shards={n}) "
            f"({min(n, os.cpu_count() or 1)} processes at once)")
        import resource

        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        info = build_index(db, DESCRIPTOR, "none", name, trees=trees, seed=0, shards=n)
        secs = time.perf_counter() - t0
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (time.process_time() - cpu0 + kids1.ru_utime - kids0.ru_utime
               + kids1.ru_stime - kids0.ru_stime)  # this process + the shard builders
        log(f"  built in {secs:.1f}s, shard items {info.attrs['shard_items']}")
        with open_read(db) as view:
            transform, _ = post_processor(view, DESCRIPTOR, None)
            search = AnnoySearcher(view, db, name)
            found, lat = [], []
            for q in queries[:20]:
                search(transform.transform(q[None].astype(np.float32)), K)
            for q in queries[:len(truth)]:
                t = time.perf_counter()
                hits = search(transform.transform(q[None].astype(np.float32)), K)[0]
                lat.append((time.perf_counter() - t) * 1e3)
                found.append([r for r, _ in hits])
        r = {"shards": n, "build_s": round(secs, 2), "cpu_s": round(cpu, 2),
             "jobs": info.attrs["build_jobs"],
             "file_bytes": int(sum(info.attrs["shard_bytes"])),
             "recall_at_10": recall(found, truth), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
        log(f"  recall@10 {r['recall_at_10']:.4f}, p50 {r['p50_ms']:.2f} ms, "
            f"p99 {r['p99_ms']:.2f} ms")
        out.append(r)
        remove_index(db, name)
    return out


# ---------------------------------------------------------------------------------------------
# CLI


def cli_timings(db: Path, repeats: int) -> dict:
    exe = Path(sys.executable).with_name("imgdb")
    cmd = [str(exe) if exe.exists() else "imgdb", "query", "--id", "0", "--db", str(db), "-k", "10"]
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        runs.append(time.perf_counter() - t)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    lines = proc.stdout.strip().splitlines()
    log(f"CLI query wall: {', '.join(f'{s:.2f}' for s in runs)} s")

    def py(code: str, *extra: str) -> tuple[float, str]:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code, *extra], capture_output=True, text=True)
        secs = time.perf_counter() - t
        if proc.returncode:
            raise RuntimeError(f"python -c failed:\n{proc.stderr[-2000:]}")
        return secs, proc.stdout.strip()

    bare = [py("pass")[0] for _ in range(repeats)]
    imp = [py("import sys, imgdb.cli; print('torch' in sys.modules)") for _ in range(repeats)]
    # the query command itself, run through main() in one process, then look for torch
    code = ("import sys\nfrom imgdb.cli import main\nsys.argv = ['imgdb'] + sys.argv[1:]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('TORCH', 'torch' in sys.modules)")
    _, qout = py(code, "query", "--id", "0", "--db", str(db), "-k", "10")
    return {
        "command": " ".join(["imgdb"] + cmd[1:]),
        "query_wall_s": runs, "query_wall_median_s": statistics.median(runs),
        "query_first_hit": lines[1] if len(lines) > 1 else "",
        "python_pass_s": statistics.median(bare),
        "import_cli_s": statistics.median(s for s, _ in imp),
        "torch_after_import_cli": any(o == "True" for _, o in imp),
        "torch_after_query": qout.splitlines()[-1] == "TORCH True",
    }


# ---------------------------------------------------------------------------------------------


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f} at start"


def cleanup(db: Path) -> None:
    for p in db.parent.glob(db.name + "*"):
        p.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from imgdb.retrieval.index import DEFAULT_TREES

    trees = args.trees or DEFAULT_TREES
    own = args.store is None
    db = args.store or Path(tempfile.gettempdir()) / f"imgdb-bench-search-{args.n}x{args.dims}-{os.getpid()}.h5"
    db = db.resolve()
    res: dict = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                 "machine": machine(), "argv": sys.argv, "params": bench_params(args),
                 "trees": trees, "store": str(db),
                 "data": (f"{args.clusters} gaussian centres N(0,1)^{args.dims} + isotropic "
                          f"noise sigma {args.noise}; held-out queries drawn the same way")}
    log(f"machine: {res['machine']}")
    log(f"data: {res['data']} (clustered, not pure noise: pure noise is Annoy's worst case)")
    try:
        res["store_create"] = ensure_store(args, db)
        res["store_bytes"] = db.stat().st_size

        build = existing_index(db, trees) if args.reuse_index else None
        if build is None:
            log(f"building Annoy index: build_index(trees={trees}, seed=0) on {args.n} x {args.dims}")
            build = timed_build(db, trees)
            log(f"built in {build['seconds']:.1f}s: {build['phases']}")
            res["read_pass_s"] = round(read_only_pass(db), 2)
            log(f"reading + normalising the store alone: {res['read_pass_s']}s")
        else:
            log(f"reusing index {build['name']}")
        res["build"] = build

        queries = held_out_queries(args)
        warm = warm_queries(args, db, queries)
        nrec = args.recall_queries or args.queries
        truth, secs = exact_top10(db, queries[:nrec])
        log(f"numpy exact top-10 for {nrec} queries: {secs:.1f}s")
        res["recall_at_10"] = recall(warm["annoy_ids"][:nrec], truth)
        res["recall_queries"] = nrec
        res["exact_numpy_batch_s"] = round(secs, 2)
        log(f"recall@10 (Annoy defaults as imgdb queries) = {res['recall_at_10']:.4f}")
        agree = [warm["exact_ids"][i] == truth[i].tolist() for i in range(min(nrec, len(warm["exact_ids"])))]
        res["topk_exact_agrees_with_numpy"] = all(agree) if agree else None
        res["latency_ms"] = warm["latency_ms"]
        res["exact_ms_per_query"] = warm["exact_ms"]
        for key in ("plan_query_s", "searcher_load_s", "content_hash_s", "read_images_s"):
            res[key] = round(warm[key], 4)
        sweep = [int(v) for v in args.search_k.split(",") if v.strip()]
        res["search_k_sweep"] = search_k_sweep(db, build["name"], queries, truth, sweep) if sweep else []
        counts = [int(v) for v in args.shards.split(",") if v.strip()]
        res["sharded"] = sharded(db, trees, counts, queries, truth) if counts else []
        res["cli"] = cli_timings(db, args.cli_repeats) if args.cli_repeats > 0 else None
    finally:
        if own and not args.keep_store:
            cleanup(db)
            log(f"deleted {db} and its index")

    lat, b, c = res["latency_ms"], res["build"], res["cli"]
    print()
    print(f"data: {res['data']}")
    print("clustered vectors, not pure noise (pure noise in high dims is Annoy's worst case)")
    hdr = ["N", "D", "trees", "build s", "index MiB", "p50 ms", "p99 ms", "mean ms",
           "recall@10", "exact ms/q", "CLI query s"]
    row = [args.n, args.dims, trees, b["seconds"], f"{b['file_bytes'] / 2**20:.0f}",
           f"{lat['p50']:.3f}", f"{lat['p99']:.3f}", f"{lat['mean']:.3f}",
           f"{res['recall_at_10']:.3f}", f"{statistics.median(res['exact_ms_per_query']):.0f}"
           if res["exact_ms_per_query"] else "-", f"{c['query_wall_median_s']:.2f}" if c else "-"]
    widths = [max(len(str(h)), len(str(v))) for h, v in zip(hdr, row)]
    print("  ".join(str(h).rjust(w) for h, w in zip(hdr, widths)))
    print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))
    print()
    if b.get("phases"):
        print(f"build phases (s): {b['phases']}; read+normalise pass alone: {res['read_pass_s']} s")
    print(f"query set-up in-process: plan_query {res['plan_query_s']:.3f} s (content_hash alone "
          f"{res['content_hash_s']:.3f} s), load searcher {res['searcher_load_s']:.3f} s, "
          f"read_images {res['read_images_s']:.3f} s")
    print(f"topk_exact agrees with numpy exact: {res['topk_exact_agrees_with_numpy']}")
    for s in res["search_k_sweep"]:
        print(f"  search_k={s['search_k']:>6} (imgdb query --search-k): recall@10 "
              f"{s['recall_at_10']:.3f}, p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms")
    for r in res["sharded"]:
        print(f"  {r['shards']} shards ({r['jobs']} processes): build {r['build_s']:.1f} s "
              f"(single: {b['seconds']} s), recall@10 {r['recall_at_10']:.4f} (single: "
              f"{res['recall_at_10']:.4f}, ratio {r['recall_at_10'] / res['recall_at_10']:.4f}), "
              f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms")
    if c:
        print(f"CLI: {c['command']}: {', '.join(f'{s:.2f}' for s in c['query_wall_s'])} s "
              f"(python -c pass {c['python_pass_s']:.2f} s, import imgdb.cli "
              f"{c['import_cli_s']:.2f} s); torch imported: after import imgdb.cli "
              f"{c['torch_after_import_cli']}, after query {c['torch_after_query']}")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2, default=float) + "\n")
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
