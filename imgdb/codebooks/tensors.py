"""Array plumbing shared by the codebook code: numpy/torch in, the same kind out.

numpy in -> numpy out (computed in float64, returned in the input's float dtype, float64 for
integers); torch in -> torch out on the same device (float32/float64 kept, other dtypes
computed in float32). Codebook parameters may be numpy even when the features are tensors.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..numeric import EPS, l2_normalize

__all__ = ["EPS", "as_tensor", "identity", "check_features", "to_numpy_map", "stack_features",
           "nearest_centroid", "sinkhorn_weights", "l2_normalize"]


def as_tensor(a, like: torch.Tensor | None = None) -> tuple[torch.Tensor, Callable]:
    """(tensor, finish): numpy -> float64 CPU tensor, back to numpy in ``finish``.

    With ``like`` given, ``a`` is moved to its device and dtype (codebook parameters).
    """
    if like is not None:
        if isinstance(a, torch.Tensor):
            return a.to(device=like.device, dtype=like.dtype), identity
        return torch.as_tensor(np.asarray(a), dtype=like.dtype, device=like.device), identity
    if isinstance(a, torch.Tensor):
        t = a if a.dtype in (torch.float32, torch.float64) else a.float()
        return t, identity
    arr = np.asarray(a)
    out_dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.dtype(np.float64)
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))

    def finish(r: torch.Tensor) -> np.ndarray:
        return r.numpy().astype(out_dtype, copy=False)

    return t, finish


def identity(r):
    return r


def check_features(t: torch.Tensor, name: str = "features") -> None:
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must be (N, d) or (B, N, d), got shape {tuple(t.shape)}")


def to_numpy_map(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = (x if x.dtype in (torch.float32, torch.float64) else x.float()).numpy()
    x = np.asarray(x)
    if x.ndim not in (3, 4):
        raise ValueError(f"feature map must be (C, H, W) or (B, C, H, W), got shape {x.shape}")
    return x


def stack_features(local_features) -> np.ndarray:
    if isinstance(local_features, np.ndarray) and local_features.ndim == 2:
        return local_features
    parts = [np.asarray(f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else f)
             for f in local_features]
    parts = [p for p in parts if len(p)]
    if not parts:
        raise ValueError("no local features to fit on")
    return np.concatenate(parts, axis=0)


def nearest_centroid(t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (squared Euclidean), first one on ties: (..., N)."""
    d2 = ((t[..., :, None, :] - c) ** 2).sum(-1) if t.shape[-2] * c.shape[0] <= 65536 \
        else torch.cdist(t, c.expand(*t.shape[:-2], *c.shape)) ** 2
    return d2.argmin(dim=-1)


def sinkhorn_weights(g: torch.Tensor, n_iter: int = 10) -> torch.Tensor:
    """The loop of :func:`democratic_weights` on a given clipped Gram matrix G (…, N, N)
    (a tensor; it is not modified): lambda (…, N) with diag(lambda) G diag(lambda) near doubly
    stochastic.  Callers that know G without the embeddings (VLAD: residual products of
    features sharing a word) use it directly."""
    lam = torch.ones(g.shape[:-1], dtype=g.dtype, device=g.device)
    for _ in range(n_iter):
        colsum = g.sum(dim=-2)  # (..., N)
        delta = torch.where(colsum > 0, colsum.clamp_min(torch.finfo(g.dtype).tiny).rsqrt(),
                            torch.ones_like(colsum))
        g = delta[..., :, None] * g * delta[..., None, :]
        lam = lam * delta
    return lam
