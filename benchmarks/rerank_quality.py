"""mAP of every re-ranking setting on a store: the measurements behind the defaults.

    python benchmarks/rerank_quality.py --db coil.h5 --gt queries.csv --descriptor head/mac ...
    python benchmarks/rerank_quality.py --db skimage.h5 --gt skimage/ --grid defaults

Runs `imgdb eval`'s own code (run_eval: same queries, same exclusions, same AP) once with every
ranker of the grid as a row, for each descriptor (default: every `head` pooling), and prints a
markdown table: rows = rankers, columns = descriptors, plus the mean gain over L2. Query
similarities are memoised across rankers (the same numbers, computed once).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from imgdb.evaluation.evaluate import EvalOptions, run_eval
from imgdb.retrieval import rerank
from imgdb.store import open_read

GRIDS = {
    "defaults": {"rerank": ["diffusion", "kreciprocal"], "qe": ["2", "alpha:3"]},
    "full": {
        "rerank": [f"diffusion:k={k},alpha={a}" for k in (5, 10, 15, 20, 30, 50)
                   for a in (0.9, 0.95, 0.99)]
        + [f"diffusion:k={k},alpha=0.99,gamma=1" for k in (10, 20)]
        + [f"kreciprocal:k1={k1},k2={k2},lambda={lam}" for k1 in (5, 10, 15, 20, 30)
           for k2 in (1, 3, 6) for lam in (0.1, 0.3, 0.6)],
        "qe": [str(m) for m in (1, 2, 5, 10)]
        + [f"alpha:{a},{m}" for a in (1, 3, 5) for m in (2, 5, 10, 20, 50)],
    },
}


def memoise_similarities() -> None:
    cache: dict = {}
    plain = rerank.Collection.similarities

    def similarities(self, q):
        key = (id(self.vectors), np.asarray(q, np.float32).tobytes())
        if key not in cache:
            if len(cache) > 200_000:
                cache.clear()
            cache[key] = plain(self, q)
        return cache[key]

    rerank.Collection.similarities = similarities


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", type=Path, required=True)
    ap.add_argument("--gt", type=Path, help="ground truth (csv, groups folder, ...)")
    ap.add_argument("--group-regex")
    ap.add_argument("--descriptor", action="append", help="default: every head pooling")
    ap.add_argument("--grid", choices=sorted(GRIDS), default="full")
    args = ap.parse_args(argv)
    memoise_similarities()
    with open_read(args.db) as view:
        descriptors = args.descriptor or [d.name for d in view.descriptors()
                                          if d.layer == "head"]
    grid = GRIDS[args.grid]
    table: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    for name in descriptors:
        result = run_eval(args.db, args.gt, EvalOptions(
            descriptors=[name], rerank=grid["rerank"], qe=grid["qe"],
            group_regex=args.group_regex))
        for cell in result.cells:
            table.setdefault(cell.ranking, {})[name.split("/", 1)[-1]] = cell.summary.mAP
        print(f"{name}: {len(result.cells)} rankings, {result.n_queries} queries, "
              f"{result.n_database} images, {time.perf_counter() - started:.0f}s",
              file=sys.stderr)
    cols = [d.split("/", 1)[-1] for d in descriptors]
    base = table["L2"]
    print(f"| ranking | {' | '.join(c.split('/', 1)[-1] for c in cols)} | mean | min gain |")
    print("|---" * (len(cols) + 3) + "|")
    for ranking, values in table.items():
        gains = [values[c] - base[c] for c in cols]
        print(f"| {ranking} | " + " | ".join(f"{values[c]:.3f}" for c in cols)
              + f" | {np.mean([values[c] for c in cols]):.3f} | {min(gains):+.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
