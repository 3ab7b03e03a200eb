"""Selective masks of Hoang et al. 2017 sec. 3.2, paper-literal on numpy (the reference).

Ingest computes the same masks for whole batches on the network's device
(`imgdb.features.localfeat.device_masks`); tests compare the two. A feature map is (C, H, W)
(post-ReLU); masks are (H, W) bool arrays (batched (B, C, H, W) -> (B, H, W)). Grid coordinates
are (x, y) = (column, row), 0-based.
"""

from __future__ import annotations

import numpy as np
import torch

from ..features.localfeat import sift_keypoints, sift_mask
from .tensors import to_numpy_map

__all__ = ["MASK_METHODS", "max_mask", "sum_mask", "sift_mask", "sift_keypoints",
           "compute_mask", "select_local"]


def max_mask(x, include_constant: bool = False) -> np.ndarray:
    """MAX-mask, Hoang sec. 3.2.2 eq. 2: the argmax cell of every channel, as a set.

    ``x``: feature map (C, H, W) (or a batch (B, C, H, W)), numpy or torch.  Returns a bool
    (H, W) mask (or (B, H, W)) with one True cell per distinct argmax location, so at most C
    cells and usually fewer (several channels peak at the same cell; eq. 2 is a set).

    Ties inside a channel: the first maximal cell in row-major order (numpy ``argmax`` on the
    row-major flattening).  The authors' Matlab code picks the first in column-major order;
    this only matters for exact ties.

    Constant channels (for post-ReLU maps: all-zero channels) have no argmax location: every
    cell is a maximiser, so eq. 2 ("the location corresponding to the max activation value")
    selects nothing and such channels are skipped.  ``include_constant=True`` reproduces the
    authors' code instead, where Matlab's ``max`` returns the first cell (top-left) for them.
    If every channel is constant the mask is empty.
    """
    a = to_numpy_map(x)
    single = a.ndim == 3
    if single:
        a = a[None]
    b, c, h, w = a.shape
    flat = a.reshape(b, c, h * w)
    idx = flat.argmax(axis=-1)  # (B, C), first maximum in row-major order
    keep = np.ones((b, c), dtype=bool)
    if not include_constant:
        keep = flat.max(axis=-1) > flat.min(axis=-1)
    mask = np.zeros((b, h * w), dtype=bool)
    bi = np.broadcast_to(np.arange(b)[:, None], (b, c))
    mask[bi[keep], idx[keep]] = True
    mask = mask.reshape(b, h, w)
    return mask[0] if single else mask


def sum_mask(x) -> np.ndarray:
    """SUM-mask, Hoang sec. 3.2.3 eq. 3: cells whose channel sum is >= the median channel sum.

    The median is numpy's (mean of the two middle values for an even number of cells, as the
    authors' ``prctile(., 50)``).  Cells equal to the median are kept, so at least half of the
    cells are selected (all of them when all sums are equal).  (C, H, W) -> (H, W) bool, or
    batched (B, C, H, W) -> (B, H, W).  Sums are taken in float64.
    """
    a = to_numpy_map(x)
    s = a.sum(axis=-3, dtype=np.float64)  # (..., H, W): Sigma^F_(x, y)
    med = np.median(s.reshape(*s.shape[:-2], -1), axis=-1)  # alpha = median(Sigma^F)
    return s >= np.asarray(med)[..., None, None]


MASK_METHODS = ("none", "max", "sum", "sift")


def compute_mask(x, method: str, *, keypoints_xy=None,
                 image_size: tuple[int, int] | None = None, sift_radius: int = 0) -> np.ndarray:
    """The (H, W) mask of one feature map (C, H, W) by name: none, max, sum or sift.

    ``sift`` needs ``keypoints_xy`` and ``image_size`` = (W_I, H_I) (see :func:`sift_mask`).
    """
    h, w = x.shape[-2], x.shape[-1]
    if method == "none":
        return np.ones((h, w), dtype=bool)
    if method == "max":
        return max_mask(x)
    if method == "sum":
        return sum_mask(x)
    if method == "sift":
        if keypoints_xy is None or image_size is None:
            raise ValueError("the sift mask needs keypoints_xy and image_size")
        return sift_mask(keypoints_xy, image_size, (w, h), radius=sift_radius)
    raise ValueError(f"unknown mask {method!r}; choose one of {', '.join(MASK_METHODS)}")


def select_local(x, mask) -> tuple[np.ndarray | torch.Tensor, np.ndarray]:
    """The local features of the selected cells: ((N, C) features, (N, 2) int64 (x, y)).

    ``x``: (C, H, W) numpy or torch (a tensor stays on its device); ``mask``: (H, W) bool.
    Rows follow row-major cell order (by row y, then column x).
    """
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask, dtype=bool)
    if x.ndim != 3 or tuple(x.shape[-2:]) != mask.shape:
        raise ValueError(f"mask {mask.shape} does not fit feature map {tuple(x.shape)}")
    ys, xs = np.nonzero(mask)  # row-major order
    coords = np.stack([xs, ys], axis=1).astype(np.int64)
    if isinstance(x, torch.Tensor):
        yi = torch.as_tensor(ys, device=x.device)
        xi = torch.as_tensor(xs, device=x.device)
        return x[:, yi, xi].T, coords
    return np.asarray(x)[:, ys, xs].T, coords
