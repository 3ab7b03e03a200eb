"""Retrieval metrics computed the same way as the official evaluation code.

- AP: Oxford/Paris `compute_ap.cpp` (Philbin et al.). Positives are good + ok. Junk images are
  dropped from the ranking: they are not hits and they do not move the rank. Precision and
  recall are integrated with the trapezoid rule, and a positive that never appears in the
  ranking still counts in the denominator. The sum is computed with the arithmetic of
  revisitop's `compute_ap` (Radenovic et al. 2018) and of Jegou's `holidays_map.py`: one
  trapezoid per positive, `(p0 + p1) * (1 / nres) / 2`, added up in ranking order. That gives
  their float64 results bit for bit. `compute_ap.cpp` itself computes in single precision, so it
  only agrees to about 6-7 significant digits, which is what its output prints.
- mP@k: revisitop `compute_map`. Positions are 1-based and junk-shifted, kq = min(max(pos), k),
  and P = #(pos <= kq) / kq.
- N-S score: UKBench, the number of the query's 4 group images (the query included) in the top 4.
- Means: like `compute_map`, queries with no positives (NaN) are left out and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Collection, Sequence

import numpy as np

__all__ = ["average_precision", "ap_from_positions", "precision_at_k", "ns_score",
           "QueryScores", "Summary", "summarize", "rank_ids"]


def _as_ranking(ranking: Sequence | np.ndarray) -> np.ndarray:
    arr = np.asarray(list(ranking) if isinstance(ranking, str) else ranking)
    if arr.ndim != 1:
        raise ValueError(f"a ranking must be one-dimensional, got shape {arr.shape}")
    return arr


def _as_set(items: Collection) -> set:
    return set(items.tolist()) if isinstance(items, np.ndarray) else set(items)


def _member(arr: np.ndarray, items: set) -> np.ndarray:
    """Boolean mask: which elements of `arr` are in `items` (compared by equality)."""
    if not items or arr.size == 0:
        return np.zeros(arr.shape, dtype=bool)
    return np.isin(arr, np.asarray(list(items)))


def _positions(ranking: np.ndarray, positives: set, junk: set) -> np.ndarray:
    """Sorted 0-based positions of the positives in the ranking once the junk is removed.

    An item that is both positive and junk is treated as junk, as compute_ap.cpp does (it checks
    the junk set first). It is skipped but still counts in |positives|."""
    hit = _member(ranking, positives)
    if junk:
        is_junk = _member(ranking, junk)
        hit &= ~is_junk
        idx = np.flatnonzero(hit)
        # each position drops by the number of junk items ranked before it
        return idx - np.searchsorted(np.flatnonzero(is_junk), idx)
    return np.flatnonzero(hit)


def ap_from_positions(pos: np.ndarray, n_positives: int) -> float:
    """revisitop `compute_ap(ranks, nres)` (same as Holidays `score_ap_from_ranks_1`).

    `pos`: 0-based (junk-shifted) positions of the positives found; they are sorted here.
    `n_positives` (nres): all positives, including the ones that were not found.
    Returns NaN when `n_positives` is 0. Bit-identical to the official loop."""
    if n_positives <= 0:
        return math.nan
    rank = np.sort(np.asarray(pos, dtype=np.int64).ravel()).astype(np.float64)
    if rank.size == 0:
        return 0.0
    j = np.arange(rank.size, dtype=np.float64)
    precision_0 = np.ones_like(rank)
    nz = rank != 0
    precision_0[nz] = j[nz] / rank[nz]
    precision_1 = (j + 1.0) / (rank + 1.0)
    recall_step = 1.0 / n_positives
    terms = (precision_0 + precision_1) * recall_step / 2.0
    # cumsum adds in order like the official `ap += ...` loop (np.sum would add pairwise)
    return float(np.cumsum(terms)[-1])


def average_precision(ranking: Sequence[str] | np.ndarray, positives: Collection,
                      junk: Collection = ()) -> float:
    """Oxford AP of one ranked list, best first. The list may be the whole database or a prefix.

    Junk is removed before counting. A positive that is never retrieved still counts in the
    denominator. Returns NaN if there are no positives."""
    pos_set = _as_set(positives)
    if not pos_set:
        return math.nan
    return ap_from_positions(_positions(_as_ranking(ranking), pos_set, _as_set(junk)),
                             len(pos_set))


def precision_at_k(ranking: Sequence[str] | np.ndarray, positives: Collection,
                   junk: Collection = (), ks: Sequence[int] = (1, 5, 10)) -> np.ndarray:
    """revisitop mP@k of one query, one value per k (float64 array).

    Positions are 1-based after removing the junk, kq = min(max(pos), k), P = #(pos <= kq) / kq.
    Returns all NaN if there are no positives, and all 0 if none of the positives is in the
    ranking (the official code raises an error in that case)."""
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"precision cut-offs must be >= 1, got {ks}")
    pos_set = _as_set(positives)
    if not pos_set:
        return np.full(len(ks), np.nan)
    pos = _positions(_as_ranking(ranking), pos_set, _as_set(junk)) + 1
    if pos.size == 0:
        return np.zeros(len(ks))
    top = int(pos.max())
    out = np.empty(len(ks))
    for i, k in enumerate(ks):
        kq = min(top, k)
        out[i] = int((pos <= kq).sum()) / kq
    return out


def ns_score(ranking: Sequence[str] | np.ndarray, group: Collection) -> int:
    """UKBench N-S score of one query: how many of `ranking[:4]` are in `group`.

    `group` is the query's 4 images, the query included, so the query must stay in the
    ranking."""
    return int(_member(_as_ranking(ranking)[:4], _as_set(group)).sum())


@dataclass
class QueryScores:
    """The scores of one query (ap and precisions are NaN when it has no positives)."""

    name: str
    ap: float
    precisions: dict[int, float]
    positives: int
    junk: int
    missing_positives: int = 0


@dataclass
class Summary:
    """Means over the queries that have positives. `n_empty` counts the ones left out."""

    mAP: float
    mP: dict[int, float]
    n_queries: int
    n_empty: int


def summarize(scores: Sequence[QueryScores]) -> Summary:
    """Mean AP and mean P@k the way `compute_map` computes them.

    Queries whose AP is NaN (no positives) are left out of every mean and counted in `n_empty`.
    Values are added in query order and divided by the count, as compute_map does.
    Cut-offs are the union of the queries' `precisions` keys. A kept query without a
    cut-off makes that mean NaN. Everything is NaN if all queries are empty."""
    kept = [s for s in scores if not math.isnan(s.ap)]
    ks = sorted({k for s in kept for k in s.precisions})
    n = len(kept)
    total = 0.0
    sums = {k: 0.0 for k in ks}
    for s in kept:
        total = total + s.ap
        for k in ks:
            sums[k] = sums[k] + s.precisions.get(k, math.nan)
    mean_ap = total / n if n else math.nan
    mp = {k: (sums[k] / n if n else math.nan) for k in ks}
    return Summary(mean_ap, mp, len(scores), len(scores) - n)


def rank_ids(similarities: np.ndarray) -> np.ndarray:
    """(n_queries, n_db) similarities -> (n_queries, n_db) database ids, best first.

    Equal similarities are ordered by the lower id (stable sort). A 1-D input counts as one
    query. NaN similarities go last."""
    sims = np.atleast_2d(np.asarray(similarities))
    if sims.ndim != 2:
        raise ValueError(f"similarities must be (n_queries, n_db), got shape {sims.shape}")
    # negate into an ascending key; ~x for integers cannot overflow (unsigned, INT_MIN) and is
    # logical not for bools, which keeps the order
    key = ~sims if sims.dtype.kind in "biu" else -sims
    return np.argsort(key, axis=1, kind="stable")
