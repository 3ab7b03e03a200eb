"""Geometric verification of the global shortlist with local features (`--rerank verify`).

For the first k images of the ranking before it, the stage matches the query's RootSIFT
keypoints to each image's stored keypoints (one matrix product for the whole shortlist, Lowe's
ratio test on the two nearest), fits a homography to the tentative matches with OpenCV's
MAGSAC++ (USAC; a similarity transform when no homography holds) and counts the inliers (each
query and each database keypoint counted once). An image with at least `min_inliers` is
*verified*: verified images come first, by the inlier count fused with the global similarity
(score = inliers + similarity), the others keep their order and scores after them. This is the
spatial verification of Philbin et al. 2007 and of DELF/DELG's re-ranking, with the robust fit of
Barath et al. 2020; a collection where nothing verifies keeps its global ranking exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import UserError
from ..numeric import l2_normalize
from .rerank import QueryContext, Ranker, Ranking

VERIFY_K = 50  # shortlist verified per query
VERIFY_MIN_INLIERS = 12  # inliers that make an image verified
VERIFY_RATIO = 0.8  # Lowe's ratio test on descriptor distances
VERIFY_THRESHOLD = 6.0  # reprojection error of an inlier, pixels of the detection images
VERIFY_EXPAND = 0  # verified images added to the query for a second, verified search (0: none)


@dataclass
class Keypoints:
    """One image's keypoints as matching uses them: positions (n, 2) float32 in pixels of the
    image they were detected on (of size `size` = (width, height)), RootSIFT rows (n, 128)."""

    xy: np.ndarray
    desc: np.ndarray
    size: tuple[int, int]

    @staticmethod
    def from_stored(features: np.ndarray, coords: np.ndarray, grid) -> "Keypoints":
        from ..features.verifyfeat import rootsift

        return Keypoints(np.asarray(coords, np.float32).reshape(-1, 2), rootsift(features),
                         (int(grid[0]), int(grid[1])))

    def __len__(self) -> int:
        return len(self.xy)

    def inside(self, box: tuple[float, float, float, float] | None) -> "Keypoints":
        """The keypoints in a box given as fractions (x1, y1, x2, y2) of the image."""
        if box is None:
            return self
        w, h = self.size
        x, y = self.xy[:, 0] / max(w, 1), self.xy[:, 1] / max(h, 1)
        keep = (x >= box[0]) & (x <= box[2]) & (y >= box[1]) & (y <= box[3])
        return Keypoints(self.xy[keep], self.desc[keep], self.size)


@dataclass
class Geometry:
    """The verification of one pair: inlier count, the fitted transform (3 x 3, query pixels to
    database pixels) and the inlier matches (m, 2): query keypoint, database keypoint."""

    inliers: int = 0
    transform: np.ndarray | None = None
    matches: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))


def tentative_matches(query: Keypoints, shortlist: Sequence[Keypoints | None],
                      ratio: float = VERIFY_RATIO) -> list[np.ndarray]:
    """For each shortlisted image, the (m, 2) query/database keypoint pairs whose nearest
    database descriptor passes the ratio test against the second nearest: one product of the
    query's descriptors with every shortlisted descriptor (padded to the longest set)."""
    out = [np.zeros((0, 2), np.int64) for _ in shortlist]
    live = [j for j, kp in enumerate(shortlist) if kp is not None and len(kp) >= 2]
    if len(query) == 0 or not live:
        return out
    longest = max(len(shortlist[j]) for j in live)
    stack = np.full((len(live), longest, query.desc.shape[1]), 0.0, np.float32)
    for a, j in enumerate(live):
        stack[a, :len(shortlist[j])] = shortlist[j].desc
    sim = (query.desc @ stack.reshape(-1, stack.shape[2]).T).reshape(len(query), len(live),
                                                                      longest)
    for a, j in enumerate(live):
        sim[:, a, len(shortlist[j]):] = -1.0  # padding: farther than any descriptor
    best = sim.argmax(axis=2)
    s1 = np.take_along_axis(sim, best[:, :, None], axis=2)[:, :, 0]
    np.put_along_axis(sim, best[:, :, None], -1.0, axis=2)
    s2 = sim.max(axis=2)
    # unit vectors: squared distance 2 - 2s; the ratio test on distances, squared
    passed = (2.0 - 2.0 * s1) < (ratio * ratio) * (2.0 - 2.0 * s2)
    for a, j in enumerate(live):
        qi = np.flatnonzero(passed[:, a])
        out[j] = np.stack([qi, best[qi, a]], axis=1).astype(np.int64)
    return out


def fit_geometry(query: Keypoints, other: Keypoints, pairs: np.ndarray,
                 threshold: float = VERIFY_THRESHOLD) -> Geometry:
    """A homography (MAGSAC++), else a similarity transform (RANSAC), fitted to the tentative
    pairs; a transform that mirrors or collapses the image counts as none."""
    import cv2

    if len(pairs) < 4:
        return Geometry()
    src = query.xy[pairs[:, 0]].reshape(-1, 1, 2)
    dst = other.xy[pairs[:, 1]].reshape(-1, 1, 2)
    h, mask = cv2.findHomography(src, dst, cv2.USAC_MAGSAC, threshold, maxIters=2000,
                                 confidence=0.999)
    if h is None or not _plausible(h):
        a, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC,
                                              ransacReprojThreshold=threshold, maxIters=2000,
                                              confidence=0.999)
        if a is None:
            return Geometry()
        h = np.vstack([a, [0.0, 0.0, 1.0]])
        if not _plausible(h):
            return Geometry()
    keep = pairs[np.asarray(mask).ravel().astype(bool)]
    count = min(len(np.unique(keep[:, 0])), len(np.unique(keep[:, 1])))
    return Geometry(int(count), h, keep)


def _plausible(h: np.ndarray) -> bool:
    """An orientation-preserving transform that neither collapses nor explodes areas."""
    if not np.isfinite(h).all() or abs(h[2, 2]) < 1e-12:
        return False
    a = h[:2, :2] / h[2, 2]
    det = float(np.linalg.det(a))
    return 1e-3 < det < 1e3


def verify_shortlist(query: Keypoints, shortlist: Sequence[Keypoints | None],
                     ratio: float = VERIFY_RATIO, threshold: float = VERIFY_THRESHOLD
                     ) -> list[Geometry]:
    """The geometry of the query against each shortlisted image (None: no keypoints)."""
    pairs = tentative_matches(query, shortlist, ratio)
    return [fit_geometry(query, kp, p, threshold) if kp is not None else Geometry()
            for kp, p in zip(shortlist, pairs)]


class Verify(Ranker):
    """Spatial verification of the first k images of the ranking before it (module docstring)."""

    needs_collection = False  # reads only the shortlist: any index kind will do
    uses_keypoints = True

    def __init__(self, k: int = VERIFY_K, min_inliers: int = VERIFY_MIN_INLIERS,
                 ratio: float = VERIFY_RATIO, threshold: float = VERIFY_THRESHOLD,
                 expand: int = VERIFY_EXPAND) -> None:
        self.k, self.min_inliers, self.ratio, self.threshold = k, min_inliers, ratio, threshold
        self.expand = expand

    @property
    def spec(self) -> str:
        return (f"verify:k={self.k},inliers={self.min_inliers},ratio={self.ratio:g},"
                f"px={self.threshold:g},qe={self.expand}")

    @property
    def label(self) -> str:
        """`verify k=50`, plus every parameter that differs from its default."""
        extra = [f"{name}={value:g}" for name, value, default in (
            ("inliers", self.min_inliers, VERIFY_MIN_INLIERS), ("ratio", self.ratio, VERIFY_RATIO),
            ("px", self.threshold, VERIFY_THRESHOLD), ("qe", self.expand, VERIFY_EXPAND))
            if value != default]
        return " ".join([f"verify k={self.k}", *extra])

    @property
    def needs(self) -> int:
        return self.k

    def rerank(self, q: np.ndarray, prior: Ranking, space, top: int | None,
               context: QueryContext | None = None) -> Ranking:
        if context is None or context.keypoints is None or context.database is None:
            raise UserError("verification needs the query's keypoints and the store's "
                            "(ingest with {verify_features} sift)", mentions=("verify_features",))
        verified: dict[int, float] = {}  # position -> fused score
        self._round(prior, space, context, verified)
        linked: dict[int, float] = {}  # position -> score, verified through a verified image
        if self.expand and verified:
            # verified query expansion (Chum et al. 2007): the query plus the best verified
            # images, searched again; the new shortlist is verified against the query and
            # against those images (another view of the object links to one of them)
            best = sorted(verified, key=lambda p: (-verified[p], p))[:self.expand]
            x = np.asarray(space.vectors_at(np.asarray(best, np.int64)), np.float32)
            q2 = l2_normalize((np.asarray(q, np.float32) + x.sum(axis=0))[None])[0]
            want = None if top is None else max(top, self.k) + len(verified)
            prior = space.search(q2, want)
            self._round(prior, space, context, verified)
            self._link(prior, space, context, best, verified, linked)
        first = sorted(verified, key=lambda p: (-verified[p], p))
        then = sorted(linked, key=lambda p: (-linked[p], p))
        rest = [(int(p), float(sc)) for p, sc in zip(prior.order, prior.scores)
                if int(p) not in verified and int(p) not in linked]
        order = np.array(first + then + [p for p, _ in rest], np.int64)
        scores = np.array([verified[p] for p in first] + [linked[p] for p in then]
                          + [sc for _, sc in rest], np.float32)
        if top is not None:
            order, scores = order[:top], scores[:top]
        return Ranking(order, scores)

    def _link(self, prior: Ranking, space, context: QueryContext, best: list[int],
              verified: dict[int, float], linked: dict[int, float]) -> None:
        """The unverified first k of a ranking verified against each of the `best` verified
        images; one that verifies joins `linked` (its most inliers plus its score)."""
        cands = [(int(p), float(sc)) for p, sc in zip(prior.order[:self.k], prior.scores)
                 if int(p) not in verified]
        if not cands:
            return
        rows = np.asarray(space.rows, np.int64)
        kps = context.database(rows[np.array([p for p, _ in cands], np.int64)])
        for b, kb in zip(best, context.database(rows[np.asarray(best, np.int64)])):
            if kb is None:
                continue
            for (p, score), g in zip(cands, verify_shortlist(kb, kps, self.ratio,
                                                             self.threshold)):
                if g.inliers >= self.min_inliers:
                    linked[p] = max(linked.get(p, -np.inf), g.inliers + score)

    def _round(self, prior: Ranking, space, context: QueryContext,
               verified: dict[int, float]) -> None:
        """Verify the first k of a ranking (pairs verified before are not matched again); the
        verified positions join `verified` with their fused score."""
        head = [int(p) for p in prior.order[:self.k]]
        rows = [int(r) for r in np.asarray(space.rows, np.int64)[np.asarray(head, np.int64)]]
        keys = [(r, self.ratio, self.threshold) for r in rows]
        todo = [key for key in keys if key not in context.cache]
        if todo:
            geoms = verify_shortlist(context.keypoints,
                                     context.database(np.array([key[0] for key in todo])),
                                     self.ratio, self.threshold)
            context.cache.update(zip(todo, geoms))
        context.record(np.array(rows), [context.cache[key] for key in keys])
        for p, key, score in zip(head, keys, prior.scores[:self.k]):
            g = context.cache[key]
            if g.inliers >= self.min_inliers and p not in verified:
                verified[p] = g.inliers + float(score)


__all__ = ["Verify", "Keypoints", "Geometry", "tentative_matches", "fit_geometry",
           "verify_shortlist", "VERIFY_K", "VERIFY_MIN_INLIERS", "VERIFY_RATIO",
           "VERIFY_THRESHOLD", "VERIFY_EXPAND"]
