"""When a re-ranking stage steps aside: re-ranking that never does worse than the cosine order.

Query expansion, diffusion and k-reciprocal re-ranking assume that a query's relevant images are
many and linked to each other (views of one object, photos of one landmark), so that walking from
the first results finds more of them. On a collection of unrelated images (near-duplicate search:
one original per query among photos of other things) that walk leaves the original for its
neighbours, and the right image falls from first place (a measured copy-detection set: mAP 0.95
-> 0.28 with diffusion). Two checks guard each stage:

- **The collection** (once per search space): the reciprocity of its 10-NN graph, the share of
  neighbour links that are mutual. Collections of many views per object measure 0.79-0.87 (where
  diffusion lifts mAP to 0.99), copy-detection, landmark and phone-photo sets 0.43-0.65 (where it
  loses up to 0.67). Below `MIN_RECIPROCITY` the stage steps aside and says so in its label.
- **The query** (each one): the leading results that are closer to the query than to any other
  database image (cosine at least their first neighbour's) are near-duplicates of it; they stay
  first, in their order, and the stage re-ranks what follows.

`guard=0` in a stage's options turns both off (the published method exactly).
"""

from __future__ import annotations

import numpy as np

#: reciprocity of the 10-NN graph below which a stage steps aside (benchmarks/RESULTS-rerank.md)
MIN_RECIPROCITY = 0.75
#: neighbours per image of the graph whose reciprocity is measured
RECIPROCITY_K = 10
#: images sampled when the reciprocity is measured through searches (no graph at hand)
RECIPROCITY_SAMPLE = 64


def graph_reciprocity(neighbours: np.ndarray, k: int = RECIPROCITY_K) -> float:
    """Share of the kNN links i -> j (i's k nearest) whose reverse j -> i is one too."""
    nbr = np.asarray(neighbours)[:, :k].astype(np.int64)
    n, k = nbr.shape
    if not n or not k:
        return 1.0
    links = np.unique(np.arange(n, dtype=np.int64).repeat(k) * n + nbr.ravel())
    reverse = nbr.ravel() * n + np.arange(n, dtype=np.int64).repeat(k)
    return float(np.isin(reverse, links).mean())


def sampled_reciprocity(space, k: int = RECIPROCITY_K, sample: int = RECIPROCITY_SAMPLE
                        ) -> float:
    """The same share over the links of at most `sample` evenly spaced images, found by
    searching the space (exact for exact spaces; what an index returns otherwise)."""
    n = len(space.rows)
    if n <= k:
        return 1.0
    picks = np.unique(np.linspace(0, n - 1, min(sample, n)).astype(np.int64))
    lists = _neighbour_lists(space, picks, k)
    ends = np.unique(np.concatenate([lists[p] for p in picks]))
    lists.update(_neighbour_lists(space, np.setdiff1d(ends, picks), k))
    hits = [p in set(lists[j].tolist()) for p in picks for j in lists[p]]
    return float(np.mean(hits)) if hits else 1.0


def _neighbour_lists(space, positions: np.ndarray, k: int) -> dict[int, np.ndarray]:
    if not len(positions):
        return {}
    vectors = space.vectors_at(positions)
    many = getattr(space, "search_many", None)
    found = many(vectors, k + 1) if many is not None else \
        [space.search(v, k + 1) for v in vectors]
    return {int(p): r.order[r.order != p][:k] for p, r in zip(positions, found)}


def first_neighbour_similarity(space, positions: np.ndarray) -> np.ndarray:
    """Cosine of each item at `positions` to its most similar other item (searched)."""
    positions = np.asarray(positions, np.int64)
    cache = getattr(space, "_cache", None)
    known = cache.setdefault("first neighbour", {}) if cache is not None else {}
    todo = np.array([p for p in dict.fromkeys(positions.tolist()) if p not in known], np.int64)
    if len(todo):
        vectors = space.vectors_at(todo)
        many = getattr(space, "search_many", None)
        found = many(vectors, 2) if many is not None else [space.search(v, 2) for v in vectors]
        for p, r in zip(todo.tolist(), found):
            other = r.order != p
            known[p] = float(r.scores[other][0]) if other.any() else -np.inf
    return np.array([known[p] for p in positions.tolist()], np.float32)


def near_duplicates(cosines: np.ndarray, first_neighbour: np.ndarray) -> int:
    """How many leading results are near-duplicates of the query: each at least as similar to
    it as to its own nearest other image (`cosines` and `first_neighbour` in ranking order)."""
    closer = np.asarray(cosines) >= np.asarray(first_neighbour)
    return int(len(closer) if closer.all() else np.argmin(closer))


def pin_first(kept: np.ndarray, order: np.ndarray, scores: np.ndarray, top: int | None
              ) -> tuple[np.ndarray, np.ndarray]:
    """`order` with the positions `kept` moved to its front in their order; each kept item
    scores at least as high as what follows (so that scores still fall down the list)."""
    kept = np.asarray(kept, np.int64)
    if not len(kept):
        return order[:top], scores[:top]
    rest = ~np.isin(order, kept)
    own = dict(zip(order.tolist(), scores.tolist()))
    after = float(scores[rest][0]) if rest.any() else 0.0
    head = np.array([max(own.get(int(p), after), after) for p in kept], np.float64)
    head = np.maximum.accumulate(head[::-1])[::-1]
    new_order = np.concatenate([kept, order[rest]])
    new_scores = np.concatenate([head, scores[rest]]).astype(scores.dtype, copy=False)
    return new_order[:top], new_scores[:top]


def aside_reason(reciprocity: float) -> str | None:
    """Why a stage steps aside on a collection of this reciprocity (None: it runs)."""
    if reciprocity >= MIN_RECIPROCITY:
        return None
    return (f"steps aside: the collection's {RECIPROCITY_K}-NN links are {reciprocity:.0%} "
            f"mutual (< {MIN_RECIPROCITY:.0%}: no neighbourhoods to walk); guard=0 forces it")


__all__ = ["MIN_RECIPROCITY", "RECIPROCITY_K", "graph_reciprocity", "sampled_reciprocity",
           "first_neighbour_similarity", "near_duplicates", "pin_first", "aside_reason"]
