"""Other views of the query: its crops (regional search) and its turns, searched beside it.

The object of a phone photo fills only part of the frame, and a photo held sideways whose EXIF
orientation was lost reaches the network turned by 90 degrees.

One vector of the whole photo mixes the object with the clutter around it, and the right image
can fall out of the shortlist that verification looks at. The query is therefore also described
at crops of itself, R-MAC's multi-scale grid applied to the image rather than to the feature map
(Tolias et al., ICLR 2016, sec.3: square-ish regions at L scales, overlapping): 2 x 2 crops of
0.6 and 3 x 3 crops of 0.4 of each side. Each crop is decoded and described as a query file is
(so a small object is seen at the network's scale: pooling the full-image map over the same
boxes measured far worse, 35% vs 70% of the right covers in the top 20). Every database image
scores its best similarity to any of the query's vectors (the whole image's included), and that
ranking is the first stage of the query path (`rerank.rank_chain`).

Turns (`TURNS`) describe the whole query turned by 90, 180 and 270 degrees (a CNN vector is not
rotation invariant; the keypoints that verify are).

Measured on the phone-photo set (benchmarks/RESULTS-verify.md): the right cover in the top 50
for 78% of the photos with the whole image, 95% with its regions.
"""

from __future__ import annotations

import numpy as np

from ..numeric import rank_order

#: (share of each side, crops per side) of the regional grid; the whole image is always searched
GRID = ((0.6, 2), (0.4, 3))
#: the turns of the query searched with `turns` (degrees, counter-clockwise)
TURNS = (90, 180, 270)


def query_boxes(width: float, height: float, box=None) -> list[tuple[float, float, float, float]]:
    """The crops of an image (pixels) that a regional query describes besides the whole
    image; inside `box` (x1, y1, x2, y2) when the query is a box of the image."""
    x0, y0, x1, y1 = box if box is not None else (0.0, 0.0, float(width), float(height))
    w, h = x1 - x0, y1 - y0
    out = []
    for share, n in GRID:
        bw, bh = w * share, h * share
        for j in range(n):
            for i in range(n):
                left = x0 + (w - bw) * i / (n - 1)
                top = y0 + (h - bh) * j / (n - 1)
                out.append((round(left, 3), round(top, 3), round(left + bw, 3),
                            round(top + bh, 3)))
    return out


def merged_search(space, vectors: np.ndarray, top: int | None):
    """The ranking of every item by its best cosine to any of `vectors` (the query's: whole
    image first, then its other views), ties by the lower position."""
    from .rerank import Ranking

    vectors = np.asarray(vectors, np.float32)
    want = top if top is not None else len(space.rows)
    many = getattr(space, "search_many", None)
    found = many(vectors, want) if many is not None else [space.search(v, want) for v in vectors]
    best: dict[int, float] = {}
    for r in found:
        for p, s in zip(r.order.tolist(), r.scores.tolist()):
            if s > best.get(p, -np.inf):
                best[p] = s
    positions = np.fromiter(best.keys(), np.int64, len(best))
    scores = np.fromiter(best.values(), np.float64, len(best))
    keep = rank_order(scores, ids=positions, top=want)
    return Ranking(positions[keep], scores[keep].astype(np.float32))


__all__ = ["GRID", "TURNS", "query_boxes", "merged_search"]
