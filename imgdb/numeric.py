"""The shared numeric helpers (one home): L2 and power normalisation of row vectors.

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
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def power_normalize(x, alpha: float | None):
    """sign(x) |x|^alpha (alpha = 0.5: the signed square root); None or 1 leaves x as it is."""
    if alpha is None or alpha == 1:
        return x
    if _is_tensor(x):
        return x.sign() * x.abs().pow(alpha)
    x = np.asarray(x)
    return np.sign(x) * np.abs(x) ** alpha
