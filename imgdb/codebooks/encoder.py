"""Batched encoding of local features with a fitted codebook: the fast path.

Each codebook method is one class in `METHODS` (fit its arrays; aggregate the features of many
images in one device pass, by sum or democratic weights); the `Encoder` applies what all share:
the preparation of local features (Ng: L2; Hoang sec.4.1: local PCA + L2) and the
post-processing (power-law, L2, rotation, dropped components, L2). Tests compare every path
with the paper-literal functions of `imgdb.codebooks.reference`.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import InvalidRequest, UserError
from . import reference
from .tensors import EPS, l2_normalize, nearest_centroid, sinkhorn_weights
from .training import TembModel, fit_gmm, fit_kmeans, post_process

AGGREGATES = ("sum", "democratic")


def segments(seg: torch.Tensor, n_sets: int, chunked: bool = False, chunk: int = 8192
             ) -> Iterator[tuple[int | None, torch.Tensor]]:
    """Index ranges of each set: (set, idx); `chunked`: ranges of ~chunk rows, set None."""
    if chunked:
        total = len(seg)
        for a in range(0, total, chunk):
            yield None, torch.arange(a, min(total, a + chunk), device=seg.device)
        return
    counts = torch.bincount(seg, minlength=n_sets).tolist()
    start = 0
    for s, c in enumerate(counts):
        yield s, torch.arange(start, start + c, device=seg.device)
        start += c


class VladMethod:
    """VLAD (Ng et al. sec.3.3; Hoang eq.5): residual sums per word, intra-normalised, L2."""

    name = "vlad"
    l2_input = True  # Ng L2-normalises the conv features before the codebook

    @staticmethod
    def fit(x: np.ndarray, k: int, seed: int, device: torch.device) -> dict[str, np.ndarray]:
        return {"centroids": fit_kmeans(x, k, seed)}

    def __init__(self, arrays: dict[str, torch.Tensor]) -> None:
        self.centroids = arrays["centroids"]

    @property
    def raw_dim(self) -> int:
        return int(self.centroids.numel())

    def aggregate(self, x: torch.Tensor, seg: torch.Tensor, n_sets: int,
                  democratic: bool) -> torch.Tensor:
        k, d = self.centroids.shape
        assign = torch.cat([nearest_centroid(x[i:i + 4096], self.centroids)
                            for i in range(0, len(x), 4096)]) if len(x) else \
            torch.zeros(0, dtype=torch.long, device=x.device)
        res = x - self.centroids[assign]
        if democratic:
            # VLAD embeddings of two features are orthogonal unless they share a word, where
            # their product is that of the residuals: the Gram matrix without the embedding
            lam = torch.ones(len(res), dtype=res.dtype, device=res.device)
            for _, idx in segments(seg, n_sets):
                r, a = res[idx], assign[idx]
                lam[idx] = sinkhorn_weights(((r @ r.T) * (a[:, None] == a[None, :])).clamp_min(0))
            res = res * lam[:, None]
        v = torch.zeros(n_sets * k, d, dtype=x.dtype, device=x.device)
        v.index_add_(0, seg * k + assign, res)
        v = l2_normalize(v.reshape(n_sets, k, d))
        return l2_normalize(v.reshape(n_sets, k * d))


class _EmbeddingMethod:
    """Methods with a per-feature embedding phi: sum or democratic (Sinkhorn) aggregation."""

    l2_input = False

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def aggregate(self, x: torch.Tensor, seg: torch.Tensor, n_sets: int,
                  democratic: bool) -> torch.Tensor:
        out = torch.zeros(n_sets, self.raw_dim, dtype=x.dtype, device=x.device)
        for s, idx in segments(seg, n_sets, chunked=not democratic):
            phi = self.embed(x[idx])
            if democratic:
                phi = phi * sinkhorn_weights((phi @ phi.T).clamp_min(0))[:, None]
            if s is None:  # a chunk of several sets: sum per set
                out.index_add_(0, seg[idx], phi)
            else:
                out[s] = phi.sum(dim=0)
        return out


class TembMethod(_EmbeddingMethod):
    """Triangulation embedding, centred and whitened (Hoang sec.4.2; Jegou & Zisserman 2014)."""

    name = "temb"

    @staticmethod
    def fit(x: np.ndarray, k: int, seed: int, device: torch.device) -> dict[str, np.ndarray]:
        tm = TembModel().fit(x, k, seed, device=device)
        return {"centroids": tm.centroids, "temb_mean": tm.mean,
                "temb_projection": tm.projection, "temb_eigenvalues": tm.eigenvalues}

    def __init__(self, arrays: dict[str, torch.Tensor]) -> None:
        self.centroids = arrays["centroids"]
        self.mean, self.projection = arrays["temb_mean"], arrays["temb_projection"]

    @property
    def raw_dim(self) -> int:
        return int(self.projection.shape[0])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return l2_normalize((reference.temb(x, self.centroids) - self.mean) @ self.projection.T)


class FisherMethod(_EmbeddingMethod):
    """Fisher vectors over a diagonal GMM (Sanchez et al. 2013; Hoang eq.4): the mean of the
    per-feature gradients over the set."""

    name = "fv"

    @staticmethod
    def fit(x: np.ndarray, k: int, seed: int, device: torch.device) -> dict[str, np.ndarray]:
        w, m, v = fit_gmm(x, k, seed)
        return {"gmm_weights": w, "gmm_means": m, "gmm_variances": v}

    def __init__(self, arrays: dict[str, torch.Tensor]) -> None:
        self.weights, self.means = arrays["gmm_weights"], arrays["gmm_means"]
        self.variances = arrays["gmm_variances"]

    @property
    def raw_dim(self) -> int:
        return 2 * int(self.means.numel())

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return reference.fv_embed(x, self.weights, self.means, self.variances)

    def aggregate(self, x: torch.Tensor, seg: torch.Tensor, n_sets: int,
                  democratic: bool) -> torch.Tensor:
        out = super().aggregate(x, seg, n_sets, True) if democratic else \
            self._sum(x, seg, n_sets)
        counts = torch.bincount(seg, minlength=n_sets).clamp_min(1).to(out.dtype)
        return out / counts[:, None]

    def _sum(self, x: torch.Tensor, seg: torch.Tensor, n_sets: int) -> torch.Tensor:
        """Sums of the per-feature gradients from the posteriors' zeroth, first and second
        moments per set: the same sums without the (N, 2kd) embeddings."""
        w, mu, var = self.weights, self.means, self.variances.clamp_min(EPS)
        inv = 1.0 / var
        quad = (x * x) @ inv.T - 2 * x @ (mu * inv).T + (mu * mu * inv).sum(1)  # (N, k)
        logp = torch.log(w.clamp_min(EPS)) - 0.5 * (torch.log(2 * torch.pi * var).sum(1) + quad)
        gamma = torch.softmax(logp, dim=-1)
        k, d = mu.shape
        out = torch.zeros(n_sets, 2 * k * d, dtype=x.dtype, device=x.device)
        for s, idx in segments(seg, n_sets):
            if not len(idx):
                continue
            g, xs = gamma[idx], x[idx]
            s0, s1, s2 = g.sum(0)[:, None], g.T @ xs, g.T @ (xs * xs)
            u = (s1 - s0 * mu) / var.sqrt() / w.sqrt()[:, None]
            v = ((s2 - 2 * mu * s1 + s0 * mu * mu) / var - s0) / (2 * w).sqrt()[:, None]
            out[s] = torch.cat([u.reshape(-1), v.reshape(-1)])
        return out


#: name -> method class: adding a codebook method is one class and one line here.
METHODS = {m.name: m for m in (VladMethod, TembMethod, FisherMethod)}


def method(name: str):
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"unknown method {name!r}; use {', '.join(METHODS)}") from None


class Encoder:
    """A fitted codebook ready to encode sets of local features on a device."""

    def __init__(self, arrays: dict[str, np.ndarray], attrs: dict, aggregate: str = "sum",
                 power: float | None | str = "model", device: str | torch.device = "cpu") -> None:
        if aggregate not in AGGREGATES:
            raise UserError(f"unknown aggregation {aggregate!r}; use {', '.join(AGGREGATES)}")
        self.attrs, self.aggregate = attrs, aggregate
        self.device = torch.device(device)
        fit_power = float(attrs["power"]) or None
        self.power = fit_power if power == "model" else power
        self.rotation = None
        if int(attrs["rotate"]):
            if self.power != fit_power:
                raise InvalidRequest(f"the codebook's rotation was learned with power "
                                f"{fit_power or 'none'}; encode with that power or refit the "
                                f"codebook with another power", "power")
            self.rotation = {n: arrays[f"rotation_{aggregate}_{n}"] for n in ("mean", "projection")}
        self.drop = int(attrs["drop"])
        tensors = {name: torch.from_numpy(np.asarray(a, np.float32)).to(self.device)
                   for name, a in arrays.items()}
        self.pca = (tensors["pca_mean"], tensors["pca_components"]) \
            if "pca_components" in tensors else None
        self.method = method(str(attrs["method"]))(tensors)

    @property
    def raw_dim(self) -> int:
        """Dimension of an aggregate before post-processing."""
        return self.method.raw_dim

    @property
    def dim(self) -> int:
        """Dimension of a final vector: rotated components kept after the drop."""
        rows = self.rotation["projection"].shape[0] if self.rotation is not None else self.raw_dim
        return rows - self.drop

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Local features -> what the codebook was fitted on (Ng: L2; Hoang sec.4.1: PCA + L2)."""
        if self.method.l2_input:
            x = l2_normalize(x)
        if self.pca is not None:
            mean, comps = self.pca
            x = l2_normalize((x - mean) @ comps.T)
        return x

    def aggregate_sets(self, sets: Sequence[np.ndarray]) -> np.ndarray:
        """(N_i, C) local features per image -> (B, raw_dim) aggregates, one device pass."""
        n_sets = len(sets)
        x = torch.from_numpy(np.concatenate([np.asarray(s, np.float32) for s in sets])
                             if n_sets else np.zeros((0, 1), np.float32)).to(self.device)
        seg = torch.repeat_interleave(torch.arange(n_sets, device=self.device),
                                      torch.tensor([len(s) for s in sets], device=self.device))
        out = self.method.aggregate(self.prepare(x), seg, n_sets, self.aggregate == "democratic")
        return out.cpu().numpy()

    def finish(self, agg: np.ndarray) -> np.ndarray:
        """Post-processing (Hoang sec.4.4): power-law, L2, rotation, drop the first, L2."""
        return post_process(agg, self.rotation, power=self.power, drop_first=self.drop)

    def encode(self, sets: Sequence[np.ndarray]) -> np.ndarray:
        """Final vectors (B, dim) float32 of sets of local features."""
        return self.finish(self.aggregate_sets(sets))
