"""The shared numeric helpers (one home): L2 and power normalisation of row vectors, the
merge of multi-scale vectors, the feature-map cells (and crop) of a query region.

They take numpy arrays or torch tensors (without importing torch), so the CLI paths that never
touch a network stay light.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def _is_tensor(x) -> bool:
    return type(x).__module__.startswith("torch")


def l2_normalize(x, eps: float = EPS):
    """Rows (last axis) scaled to unit L2 norm; zero rows stay zero. numpy -> float32 numpy
    (float64 input stays float64), tensor -> tensor of the same dtype and device."""
    if _is_tensor(x):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    x = np.asarray(x)
    if x.dtype != np.float64:
        x = x.astype(np.float32, copy=False)
    with np.errstate(invalid="ignore", over="ignore"):  # a non-finite row stays non-finite
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def power_normalize(x, alpha: float | None):
    """sign(x) |x|^alpha (alpha = 0.5: the signed square root); None or 1 leaves x as it is."""
    if alpha is None or alpha == 1:
        return x
    if _is_tensor(x):
        return x.sign() * x.abs().pow(alpha)
    x = np.asarray(x)
    return np.sign(x) * np.abs(x) ** alpha


def merge_scales(per_scale: list[np.ndarray]) -> np.ndarray:
    """One scale: the raw vector. Several: the mean of the L2-normalised per-scale vectors."""
    if len(per_scale) == 1:
        return per_scale[0]
    return l2_normalize(np.stack(per_scale).astype(np.float32)).mean(axis=0)


def region_cells(h: int, w: int, region: tuple[float, float, float, float]) -> np.ndarray:
    """(h, w) bool: cells whose centres ((j + 0.5) / w, (i + 0.5) / h) lie in the fractional box
    (x1, y1, x2, y2), or the cell nearest its centre when none does (Babenko sec. 4's
    query-region protocol on a feature map)."""
    x1, y1, x2, y2 = region
    cols = [j for j in range(w) if x1 <= (j + 0.5) / w <= x2]
    rows = [i for i in range(h) if y1 <= (i + 0.5) / h <= y2]
    cols = cols or [min(w - 1, max(0, int((x1 + x2) / 2 * w)))]
    rows = rows or [min(h - 1, max(0, int((y1 + y2) / 2 * h)))]
    out = np.zeros((h, w), dtype=bool)
    out[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
    return out


def crop_feature_map(fmap, region: tuple[float, float, float, float]):
    """Keep the cells of a (B, C, h, w) map (numpy or torch) whose centres
    ((j + 0.5) / w, (i + 0.5) / h) lie in the fractional box (x1, y1, x2, y2); at least the one
    cell nearest to the box centre."""
    ys, xs = np.nonzero(region_cells(fmap.shape[-2], fmap.shape[-1], region))
    return fmap[..., ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def principal_axes(x: np.ndarray | None = None, dims: int | None = None, *, cov=None,
                   complete: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The principal axes of centred data `x` (n, D), or of a covariance `cov` (D, D; numpy, or
    a torch tensor decomposed on its device), largest variance first: the variances (k,)
    (covariance with 1/n, clipped at 0) and the axes as rows (k, D), k = `dims` or all. The one
    PCA of the project (PCA-whitening, local-feature PCA, T-emb's whitening, the rotation).

    From the SVD of the data when n < D (exact where the covariance is rank-deficient), else
    the eigendecomposition of the covariance. `complete`: n < D still gives D axes, the data's
    orthonormal basis completed (variance 0 past the rank). Each axis's sign is fixed (its
    largest coordinate positive), so the same data gives the same model whichever way."""
    if cov is not None:
        if _is_tensor(cov):
            import torch  # only a tensor's owner gets here: torch is already loaded

            ev_t, vec_t = torch.linalg.eigh(cov)
            ev, vec = ev_t.cpu().numpy(), vec_t.cpu().numpy()
        else:
            ev, vec = np.linalg.eigh(np.asarray(cov, dtype=np.float64))
        order = np.argsort(ev)[::-1]
        ev, axes = ev[order], vec[:, order].T
    else:
        x = np.asarray(x, dtype=np.float64)
        n, d = x.shape
        if n < d:
            _, sv, axes = np.linalg.svd(x, full_matrices=complete)
            ev = np.zeros(len(axes))
            ev[:len(sv)] = sv ** 2 / n
        else:
            ev, vec = np.linalg.eigh(x.T @ x / n)
            order = np.argsort(ev)[::-1]
            ev, axes = ev[order], vec[:, order].T
    ev, axes = np.clip(ev[:dims], 0.0, None), axes[:dims]
    if len(axes):
        signs = np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])
        axes = axes * np.where(signs == 0, 1.0, signs)[:, None]
    return ev, axes


def rank_order(primary: np.ndarray, *tiebreak: np.ndarray, top: int | None = None,
               ids: np.ndarray | None = None) -> np.ndarray:
    """Positions by descending `primary`, ties by descending `tiebreak` keys, then by the lower
    id (`ids`, default the position itself); only the first `top` when given, without sorting
    the rest. The one top-k of the project: every ranking (exact, index, shard merge,
    re-ranking) orders its items with it, so equal scores always come out in the same order."""
    primary = np.asarray(primary)
    idx = np.arange(len(primary))
    key = idx if ids is None else np.asarray(ids)
    return _rank_subset(idx, key, (primary, *tiebreak), top)


def rank_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a score matrix, the k highest scores' columns (int32) and values (float32),
    best first, ties by the lower column: `rank_order` of each row, batched. One argpartition
    for the whole block; only a row whose k-th score is tied across the cut is ranked alone."""
    scores = np.atleast_2d(np.asarray(scores))
    rows, n = scores.shape
    k = max(0, min(k, n))
    if k < n and k:
        cand = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(scores, cand, axis=1)
        edge = vals.min(axis=1, keepdims=True)
        # a score equal to the edge left outside: which tied columns made the cut is arbitrary
        crossed = np.flatnonzero((scores >= edge).sum(axis=1) > k)
    else:
        cand = np.broadcast_to(np.arange(n), (rows, n))[:, :k].copy()
        vals = np.take_along_axis(scores, cand, axis=1)
        crossed = np.empty(0, np.int64)
    order = np.lexsort((cand, -vals), axis=1) if rows and k else cand
    cols = np.take_along_axis(cand, order, axis=1)
    for r in crossed:
        cols[r] = rank_order(scores[r], top=k)
    return cols.astype(np.int32), np.take_along_axis(scores, cols, axis=1).astype(np.float32)


def _rank_subset(idx: np.ndarray, key: np.ndarray, keys: tuple, top: int | None) -> np.ndarray:
    if top is None or top >= len(idx):
        return idx[np.lexsort([key[idx]] + [-k[idx] for k in reversed(keys)])]
    if top <= 0:
        return idx[:0]
    if not keys:
        return idx[np.argsort(key[idx], kind="stable")][:top]
    p = keys[0][idx]
    edge = p[np.argpartition(-p, top - 1)[:top]].min()
    above = idx[p > edge]  # fewer than `top`: all kept, sorted in full
    tied = idx[p == edge]  # compete for the remaining places by the next key
    return np.concatenate([_rank_subset(above, key, keys, None),
                           _rank_subset(tied, key, keys[1:], top - len(above))])
