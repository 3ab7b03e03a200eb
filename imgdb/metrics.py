"""Retrieval metrics exactly as the official evaluation code computes them.

- AP: Oxford's `compute_ap.cpp` (Philbin et al.): junk images are removed from the ranking,
  precision/recall integrated by the trapezoid rule. Identical to revisitop's `compute_ap` on
  junk-shifted positions and to Jegou's Holidays script.
- mP@k: revisitop's `compute_map` (kq = min(max(pos), k)).
- N-S score: UKBench, the number of the 4 group images in the top 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Collection, Sequence

import numpy as np


def _positions(ranking: Sequence | np.ndarray, positives: Collection, junk: Collection
               ) -> np.ndarray:
    """0-based positions of the positives in the ranking with the junk removed."""
    ranking = np.asarray(list(ranking) if isinstance(ranking, str) else ranking)
    if len(junk):
        ranking = ranking[~np.isin(ranking, np.asarray(list(junk)))]
    if not len(positives):
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.isin(ranking, np.asarray(list(positives))))


def ap_from_positions(pos: np.ndarray, n_positives: int) -> float:
    """revisitop `compute_ap`: trapezoid rule over 0-based positions of the found positives."""
    if n_positives == 0:
        return math.nan
    pos = np.asarray(pos, dtype=np.float64)
    j = np.arange(len(pos), dtype=np.float64)
    precision_0 = np.where(pos == 0, 1.0, j / np.where(pos == 0, 1.0, pos))
    precision_1 = (j + 1) / (pos + 1)
    return float(np.sum((precision_0 + precision_1) / 2.0) / n_positives)


def average_precision(ranking: Sequence | np.ndarray, positives: Collection,
                      junk: Collection = ()) -> float:
    """Oxford AP of one ranked list (best first); positives never retrieved still count."""
    positives = set(positives)
    if not positives:
        return math.nan
    return ap_from_positions(_positions(ranking, positives, set(junk) - positives), len(positives))


def precision_at_k(ranking: Sequence | np.ndarray, positives: Collection, junk: Collection = (),
                   ks: Sequence[int] = (1, 5, 10)) -> np.ndarray:
    """revisitop mP@k of one query: with 1-based junk-shifted positions, kq = min(max(pos), k)."""
    positives = set(positives)
    if not positives:
        return np.full(len(ks), np.nan)
    pos = _positions(ranking, positives, set(junk) - positives) + 1
    if not len(pos):
        return np.zeros(len(ks))
    out = []
    for k in ks:
        kq = min(int(pos.max()), k)
        out.append(float((pos <= kq).sum()) / kq)
    return np.asarray(out)


def ns_score(ranking: Sequence | np.ndarray, group: Collection) -> int:
    """UKBench: how many of the group's images (the query included) are in the top 4."""
    top = np.asarray(list(ranking) if isinstance(ranking, str) else ranking)[:4]
    return int(np.isin(top, np.asarray(list(group))).sum())


@dataclass
class QueryScores:
    """The scores of one query."""

    name: str
    ap: float
    precisions: dict[int, float] = field(default_factory=dict)
    positives: int = 0
    junk: int = 0
    missing_positives: int = 0


@dataclass
class Summary:
    """Means over the queries that have positives (the others are counted in `n_empty`)."""

    mAP: float
    mP: dict[int, float]
    n_queries: int
    n_empty: int


def summarize(scores: Sequence[QueryScores]) -> Summary:
    """compute_map's averages: NaN queries (no positives) excluded and counted."""
    aps = np.array([s.ap for s in scores], dtype=np.float64)
    keep = ~np.isnan(aps)
    ks = sorted({k for s in scores for k in s.precisions})
    mp = {}
    for k in ks:
        vals = np.array([s.precisions.get(k, math.nan) for s in scores], dtype=np.float64)[keep]
        mp[k] = float(vals.mean()) if len(vals) else math.nan
    return Summary(float(aps[keep].mean()) if keep.any() else math.nan, mp, len(scores),
                   int((~keep).sum()))


def rank_ids(similarities: np.ndarray) -> np.ndarray:
    """(n_queries, n_db) similarities -> database ids best first, ties by lower id."""
    sims = np.atleast_2d(similarities)
    ids = np.broadcast_to(np.arange(sims.shape[1]), sims.shape)
    return np.lexsort((ids, -sims), axis=1)
