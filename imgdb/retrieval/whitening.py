"""Post-processing of raw descriptors: power-norm -> L2 -> PCA (+whitening) -> L2.

Babenko et al. eq.5-6, Kalantidis et al. Alg.1 steps 5-7. `PCAWhitening` follows scikit-learn's
estimator shape (fit, then transform) and keeps its parameters as plain arrays so that a fitted
model is stored in, and read back from, the HDF5 store exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..numeric import l2_normalize, power_normalize, principal_axes


@dataclass
class PCAWhitening:
    """L2 -> PCA to `dims` (whitened: divided by the square roots of the eigenvalues) -> L2."""

    dims: int | None = None
    whiten: bool = True
    power: float | None = None
    mean: np.ndarray | None = None  # (D,)
    components: np.ndarray | None = None  # (dims, D), rows are principal axes
    eigenvalues: np.ndarray | None = None  # (dims,) variances along the axes

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.power is not None:
            x = power_normalize(x, self.power)
        return l2_normalize(x)  # float64 stays float64

    def fit(self, x: np.ndarray) -> "PCAWhitening":
        """Learn mean, axes and variances from raw vectors (n, D)."""
        n, d = x.shape
        limit = min(n, d)
        dims = self.dims or limit
        if dims > limit:
            raise UserError(f"cannot fit {dims} PCA dimensions on {n} vectors of {d} dimensions; "
                            f"use {{dims}} {limit} or fewer, or fit on a bigger store with "
                            f"{{from}}",
                            mentions=("dims", "from"))
        y = self._prepare(x)
        mean = y.mean(axis=0)
        ev, axes = principal_axes(y - mean, dims)
        self.dims = dims
        self.mean = mean.astype(np.float32)
        self.components = axes.astype(np.float32)
        # the unbiased variances (1/(n-1), as scikit-learn's PCA reports them); tiny ones
        # floored so that whitening never divides by ~0
        ev = ev * (n / max(n - 1, 1))
        floor = max(float(ev.max()) * 1e-9, 1e-12) if len(ev) else 1e-12
        self.eigenvalues = np.maximum(ev, floor).astype(np.float32)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Raw vectors (n, D) -> post-processed (n, dims) float32, unit L2 norm."""
        if self.components is None:
            raise RuntimeError("PCAWhitening.transform before fit")
        y = (self._prepare(x) - self.mean) @ self.components.T.astype(np.float64)
        if self.whiten:
            y = y / np.sqrt(self.eigenvalues.astype(np.float64))
        return l2_normalize(y.astype(np.float32))

    def arrays(self) -> dict[str, np.ndarray]:
        """The fitted parameters, for the store."""
        return {"mean": self.mean, "components": self.components, "eigenvalues": self.eigenvalues}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], whiten: bool, power: float | None
                    ) -> "PCAWhitening":
        comps = np.asarray(arrays["components"])
        return cls(dims=comps.shape[0], whiten=whiten, power=power,
                   mean=np.asarray(arrays["mean"]), components=comps,
                   eigenvalues=np.asarray(arrays["eigenvalues"]))


class Identity:
    """No model: power-norm (optional) and L2 only, so raw descriptors can be indexed as they are."""

    def __init__(self, power: float | None = None) -> None:
        self.power = power

    def transform(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.power is not None:
            x = power_normalize(x, self.power)
        return l2_normalize(x)
