"""Fitting codebook models: k-means and GMM codebooks, local PCA, whitened T-emb, and the
rotation learned on aggregated training vectors, with the papers' table settings.

Hoang et al. 2017 sec. 4.1 (local PCA + L2), sec. 4.2 (T-emb centred and whitened), sec. 4.4
(power-law, rotation, dropped components), Table 2/4; Ng et al. 2015 sec. 3.3 (k = 100, 128-D).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from ..numeric import power_normalize, principal_axes
from .reference import temb
from .tensors import EPS, as_tensor, l2_normalize, stack_features

#: Hoang Table 4: final dimension D -> (local PCA d, codebook size |C|) for T-emb + democratic.
#: D = d * |C| - 128 (the first 128 rotated components are dropped, HOANG_TEMB_DROP).
HOANG_TABLE4: dict[int, tuple[int, int]] = {
    512: (32, 20),
    1024: (64, 18),
    2048: (64, 34),
    4096: (64, 66),
    8064: (128, 64),
}
#: Hoang Table 2 (framework comparison at D = 4224): embedding -> (d, |C|).
HOANG_TABLE2: dict[str, tuple[int, int]] = {"fv": (48, 44), "vlad": (64, 66), "temb": (64, 68)}
#: Components dropped after the rotation for T-emb (Hoang Table 2: D = d|C| - 128; J&Z 2014).
HOANG_TEMB_DROP = 128
#: Ng et al. sec. 3.3 / 4.3 defaults: k-means codebook of 100 words, PCA-whitening to 128-D.
NG_VLAD: dict[str, int] = {"k": 100, "pca_dims": 128}


def fit_kmeans(features, k: int, seed: int = 0, max_iter: int = 100) -> np.ndarray:
    """k-means codebook (k, d) with scikit-learn ``KMeans`` (k-means++, fixed random_state).

    ``features``: (N, d) or a list of per-image (N_i, d) arrays.  Deterministic for a seed.
    """
    from sklearn.cluster import KMeans

    x = stack_features(features).astype(np.float64)
    if len(x) < k:
        raise UserError(f"cannot fit a codebook of {k} words on {len(x)} local features; "
                        f"use fewer words or more training images")
    km = KMeans(n_clusters=k, n_init=1, max_iter=max_iter, random_state=seed).fit(x)
    return km.cluster_centers_.astype(np.float32)


def fit_gmm(features, k: int, seed: int = 0, max_iter: int = 100
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Diagonal GMM for Fisher vectors (Hoang sec. 4.2 C_G): (weights (k,), means (k, d),
    variances (k, d)) with scikit-learn ``GaussianMixture(covariance_type="diag")``."""
    from sklearn.mixture import GaussianMixture

    x = stack_features(features).astype(np.float64)
    gmm = GaussianMixture(n_components=k, covariance_type="diag", max_iter=max_iter,
                          random_state=seed, reg_covar=1e-6).fit(x)
    return (gmm.weights_.astype(np.float32), gmm.means_.astype(np.float32),
            gmm.covariances_.astype(np.float32))


@dataclass
class LocalPCA:
    """Hoang sec. 4.1: local features -> PCA to d dims (mean-centred, no whitening) -> L2.

    ``fit`` on held-out local features ((N, C) or a list of per-image arrays); parameters are
    arrays (``mean`` (C,), ``components`` (d, C)) for the store.
    """

    d: int | None = None
    mean: np.ndarray | None = None
    components: np.ndarray | None = None

    def fit(self, local_features) -> "LocalPCA":
        x = stack_features(local_features).astype(np.float64)
        n, c = x.shape
        d = self.d or c
        if d > c:
            raise UserError(f"cannot keep {d} PCA dimensions of {c}-dimensional local features")
        mean = x.mean(axis=0)
        _, axes = principal_axes(x - mean, d, complete=True)
        self.d = d
        self.mean = mean.astype(np.float32)
        self.components = axes.astype(np.float32)
        return self

    def transform(self, features):
        """(N, C) -> (N, d) projected and L2-normalised (numpy or torch, see module doc)."""
        if self.components is None:
            raise RuntimeError("LocalPCA.transform before fit")
        t, finish = as_tensor(features)
        mean, _ = as_tensor(self.mean, like=t)
        comps, _ = as_tensor(self.components, like=t)
        return finish(l2_normalize((t - mean) @ comps.T))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "components": self.components}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "LocalPCA":
        comps = np.asarray(arrays["components"])
        return cls(d=comps.shape[0], mean=np.asarray(arrays["mean"]), components=comps)


@dataclass
class TembModel:
    """T-emb with centring and whitening (Hoang sec. 4.2; J&Z 2014; Babenko sec. 2).

    ``fit(local_features_per_image, k, seed)`` learns, from held-out local features (already
    local-PCA'd and L2-normalised, Hoang sec. 4.1):

    * ``centroids`` (k, d): k-means codebook (:func:`fit_kmeans`, seed -> random_state);
    * ``mean`` (D,), D = k d: the mean raw embedding :func:`temb` of the training features;
    * ``projection`` (n_components, D) = diag(lambda^-1/2) U^T: PCA of the centred embeddings
      (covariance with 1/N), whitened.  Eigenvalues are floored: the smallest
      ``eig_floor_tail`` kept eigenvalues are raised to the value of the next larger one (the
      smallest kept eigenvalue left as is), as the authors' code does with 32
      (``eigval(end-32:end) = eigval(end-32)``), so near-null directions are not blown up; a
      relative floor of 1e-9 times the largest eigenvalue also applies (rank-deficient
      training sets).  ``eigenvalues`` keeps the floored values.

    ``transform(features)`` -> (N, n_components): phi -> centre -> whiten -> per-vector L2
    (docs/design.md §3: "centred by the training mean embedding and whitened ..., each embedded
    vector L2-normalised").  ``n_components=None`` keeps all D (Hoang/J&Z do not reduce here;
    dimensions are dropped after aggregation, see :func:`post_process`).  The floor tail is
    clamped to n_components - 1 (with tiny D and the default 32 that means no whitening,
    only a scaled rotation).
    """

    n_components: int | None = None
    eig_floor_tail: int = 32
    chunk: int = 4096
    k: int | None = None
    seed: int | None = None
    centroids: np.ndarray | None = None
    mean: np.ndarray | None = None
    projection: np.ndarray | None = None
    eigenvalues: np.ndarray | None = None

    def fit(self, local_features_per_image, k: int, seed: int = 0,
            device: str | torch.device | None = None) -> "TembModel":
        """Learn codebook, mean embedding and whitening from (N_i, d) local feature sets.

        ``device`` (e.g. "cuda") runs the embedding, covariance and eigendecomposition there
        in float64; the default is the CPU (numpy's ``eigh``).  Cost: N (kd)^2 for the
        covariance and (kd)^3 for the eigendecomposition -- subsample big training sets.
        """
        x = stack_features(local_features_per_image).astype(np.float64)
        n, d = x.shape
        big_d = k * d
        n_keep = self.n_components or big_d
        if n_keep > big_d:
            raise UserError(f"T-emb gives {big_d} dimensions (k={k} x d={d}); "
                            f"cannot keep {n_keep}")
        centroids = fit_kmeans(x, k, seed).astype(np.float64)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        xt = torch.from_numpy(x).to(dev)
        ct = torch.from_numpy(centroids).to(dev)
        # pass 1: mean embedding; pass 2: covariance of the centred embeddings (chunked)
        total = torch.zeros(big_d, dtype=torch.float64, device=dev)
        for i in range(0, n, self.chunk):
            total += temb(xt[i:i + self.chunk], ct).sum(dim=0)
        mean = total / n
        cov = torch.zeros(big_d, big_d, dtype=torch.float64, device=dev)
        for i in range(0, n, self.chunk):
            phi = temb(xt[i:i + self.chunk], ct) - mean
            cov.addmm_(phi.T, phi)
        cov /= n
        ev, axes = principal_axes(cov=cov.numpy() if dev.type == "cpu" else cov, dims=n_keep)
        del cov
        tail = min(max(int(self.eig_floor_tail), 0), n_keep - 1)
        floor = max(ev[n_keep - 1 - tail], ev[0] * 1e-9, EPS)
        ev = np.maximum(ev, floor)
        self.k, self.seed = k, seed
        self.centroids = centroids.astype(np.float32)
        self.mean = mean.cpu().numpy().astype(np.float32)
        self.eigenvalues = ev.astype(np.float32)
        self.projection = (axes / np.sqrt(ev)[:, None]).astype(np.float32)
        return self

    def embed(self, features, normalize: bool = True):
        """(…, N, d) -> (…, N, n_components): centred, whitened and (by default) L2'd T-emb."""
        if self.projection is None:
            raise RuntimeError("TembModel.transform before fit")
        phi = temb(features, self.centroids)
        t, finish = as_tensor(phi)
        mean, _ = as_tensor(self.mean, like=t)
        proj, _ = as_tensor(self.projection, like=t)
        y = (t - mean) @ proj.T
        return finish(l2_normalize(y) if normalize else y)

    def transform(self, features):
        """Centred, whitened, per-vector L2-normalised embeddings (N, n_components)."""
        return self.embed(features, normalize=True)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"centroids": self.centroids, "mean": self.mean, "projection": self.projection,
                "eigenvalues": self.eigenvalues}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "TembModel":
        c = np.asarray(arrays["centroids"])
        proj = np.asarray(arrays["projection"])
        return cls(n_components=proj.shape[0], k=c.shape[0], centroids=c,
                   mean=np.asarray(arrays["mean"]), projection=proj,
                   eigenvalues=np.asarray(arrays["eigenvalues"]))


def _prep_aggregates(agg, power: float | None) -> np.ndarray:
    if isinstance(agg, torch.Tensor):
        agg = agg.detach().cpu().numpy()
    return l2_normalize(power_normalize(np.asarray(agg, dtype=np.float64), power))


def fit_rotation(agg_train, whiten: bool = True, power: float | None = 0.5,
                 dims: int | None = None, rel_floor: float = 0.0) -> dict[str, np.ndarray]:
    """Rotation learned on aggregated training vectors (Hoang sec. 4.4, J&Z 2014, Jegou & Chum
    2012): PCA of power-law + L2-normalised aggregates (n, D), the same preparation as
    :func:`post_process` applies.

    Returns arrays ``mean`` (D,), ``projection`` (dims, D), ``eigenvalues`` (dims,).  With
    ``whiten`` the projection rows are the principal axes divided by sqrt(eigenvalue)
    (PCA-whitening, docs/design.md §3); ``whiten=False`` is a pure rotation, as the authors' code.
    ``dims`` defaults to D: when there are fewer training vectors than dimensions, the axes
    beyond the data's rank complete an orthonormal basis and their eigenvalues are floored at
    the smallest kept (non-null) eigenvalue, like the authors' ``learn_rn``.  ``rel_floor``
    raises every eigenvalue to at least that fraction of the largest, so whitening amplifies
    no direction more than 1/sqrt(rel_floor) times the first (near-null directions of a small
    training set would otherwise turn float16 noise into most of the vector).
    """
    x = _prep_aggregates(agg_train, power)
    if x.ndim != 2 or len(x) < 2:
        raise UserError("the rotation needs at least 2 aggregated training vectors")
    n, d = x.shape
    dims = dims or d
    if dims > d:
        raise UserError(f"cannot keep {dims} rotated dimensions of {d}-dimensional vectors")
    mean = x.mean(axis=0)
    # fewer vectors than dimensions: the data's basis completed to D axes only when asked for
    ev, axes = principal_axes(x - mean, complete=dims > n)
    rank = int((ev > max(ev[0], EPS) * 1e-10).sum()) or 1
    ev[rank:] = ev[rank - 1]
    ev = np.maximum(ev, ev[0] * rel_floor)
    ev, axes = ev[:dims], axes[:dims]
    proj = axes / np.sqrt(np.maximum(ev, EPS))[:, None] if whiten else axes
    return {"mean": mean.astype(np.float32), "projection": proj.astype(np.float32),
            "eigenvalues": ev.astype(np.float32)}


def post_process(agg, rotation_model: dict[str, np.ndarray] | None = None,
                 power: float | None = 0.5, drop_first: int = 0) -> np.ndarray:
    """Final image vectors (Hoang sec. 4.4; docs/design.md §3): power-law -> L2 -> rotation
    (``(x - mean) @ projection.T``, from :func:`fit_rotation`) -> drop the first
    ``drop_first`` components (128 for T-emb, :data:`HOANG_TEMB_DROP`) -> L2.

    ``agg``: (n, D) or (D,) aggregates (numpy or torch).  Returns float32 numpy.  The power
    and L2 before the rotation match :func:`fit_rotation`'s preparation, so fit it with the
    same ``power``.
    """
    x = _prep_aggregates(agg, power)
    single = x.ndim == 1
    x = np.atleast_2d(x)
    if rotation_model is not None:
        x = (x - np.asarray(rotation_model["mean"], dtype=np.float64)) \
            @ np.asarray(rotation_model["projection"], dtype=np.float64).T
    elif drop_first:
        raise ValueError("drop_first needs a rotation model (the components are the rotated ones)")
    if drop_first:
        if drop_first >= x.shape[1]:
            raise ValueError(f"cannot drop {drop_first} of {x.shape[1]} components")
        x = x[:, drop_first:]
    x = l2_normalize(x).astype(np.float32)
    return x[0] if single else x
