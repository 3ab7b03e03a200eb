"""Codebook methods: selective masks, embeddings (VLAD, T-emb, FV) and aggregation.

The formulas of the reference papers are the specification (DESIGN.md section 3, "Codebook
methods"); every function names the equation it implements.

* Hoang et al. 2017, "Selective deep convolutional features for image retrieval" (MM'17):
  sec. 3.2 masks (eq. 1 SIFT, eq. 2 MAX, eq. 3 SUM); sec. 4.1 local PCA + L2; sec. 4.2
  embeddings (eq. 4 FV, eq. 5 VLAD, eq. 6 T-emb); sec. 4.3 democratic aggregation; sec. 4.4
  power-law + rotation; Table 2 / Table 4 (d, |C|) per final dimension.
* Ng et al. 2015, "Exploiting local features from deep networks for image retrieval",
  sec. 3.3: VLAD of L2-normalised conv features, k = 100, intra-normalisation, PCA-whitening
  to 128-D.
* Jegou & Zisserman 2014, "Triangulation embedding and democratic aggregation" (T-emb, the
  Sinkhorn-style democratic weights), as used by Hoang sec. 4; Babenko & Lempitsky 2015 Table 1
  (T-emb "centred, whitened and normalised").
* Sanchez et al. 2013, "Image classification with the Fisher vector" (improved FV, Fisher
  information normalisation).

Conventions
-----------
* A feature map is ``x`` of shape (C, H, W) (post-ReLU).  Masks are (H, W) boolean numpy
  arrays; mask functions also accept a batch (B, C, H, W) and then return (B, H, W).
* Local features are rows: (N, d).  Embeddings are rows: (N, D).  The numeric functions
  (``vlad``, ``temb``, ``fisher_vector``, ``democratic_weights`` ...) accept numpy arrays or
  torch tensors, with an optional leading batch axis (B, N, d) for equal-sized sets.  numpy in
  -> numpy out (computed in float64, returned in the input's float dtype, float64 for
  integers); torch in -> torch out on the same device (float32/float64 kept, other dtypes
  computed in float32).  Codebook parameters may be numpy even when the features are tensors.
* Grid coordinates are (x, y) = (column, row), 0-based, as in Hoang sec. 3.2 ({(x, y)}).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .errors import UserError

__all__ = [
    "HOANG_TABLE4",
    "HOANG_TABLE2",
    "HOANG_TEMB_DROP",
    "NG_VLAD",
    "MASK_METHODS",
    "max_mask",
    "sum_mask",
    "sift_mask",
    "sift_keypoints",
    "compute_mask",
    "select_local",
    "fit_kmeans",
    "fit_gmm",
    "LocalPCA",
    "vlad_embed",
    "vlad",
    "temb",
    "fv_embed",
    "fisher_vector",
    "TembModel",
    "democratic_weights",
    "sinkhorn_weights",
    "democratic",
    "sum_aggregate",
    "power_law",
    "fit_rotation",
    "post_process",
]

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

_EPS = 1e-12


# --------------------------------------------------------------------------- array plumbing


def _as_tensor(a, like: torch.Tensor | None = None) -> tuple[torch.Tensor, Callable]:
    """(tensor, finish): numpy -> float64 CPU tensor, back to numpy in ``finish``.

    With ``like`` given, ``a`` is moved to its device and dtype (codebook parameters).
    """
    if like is not None:
        if isinstance(a, torch.Tensor):
            return a.to(device=like.device, dtype=like.dtype), _identity
        return torch.as_tensor(np.asarray(a), dtype=like.dtype, device=like.device), _identity
    if isinstance(a, torch.Tensor):
        t = a if a.dtype in (torch.float32, torch.float64) else a.float()
        return t, _identity
    arr = np.asarray(a)
    out_dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.dtype(np.float64)
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))

    def finish(r: torch.Tensor) -> np.ndarray:
        return r.numpy().astype(out_dtype, copy=False)

    return t, finish


def _identity(r):
    return r


def _l2_rows(t: torch.Tensor) -> torch.Tensor:
    """Last axis scaled to unit L2 norm; zero vectors stay zero."""
    return t / t.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def _check_features(t: torch.Tensor, name: str = "features") -> None:
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must be (N, d) or (B, N, d), got shape {tuple(t.shape)}")


def _to_numpy_map(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = (x if x.dtype in (torch.float32, torch.float64) else x.float()).numpy()
    x = np.asarray(x)
    if x.ndim not in (3, 4):
        raise ValueError(f"feature map must be (C, H, W) or (B, C, H, W), got shape {x.shape}")
    return x


# --------------------------------------------------------------------------- masks (Hoang 3.2)


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
    a = _to_numpy_map(x)
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
    a = _to_numpy_map(x)
    s = a.sum(axis=-3, dtype=np.float64)  # (..., H, W): Sigma^F_(x, y)
    med = np.median(s.reshape(*s.shape[:-2], -1), axis=-1)  # alpha = median(Sigma^F)
    return s >= np.asarray(med)[..., None, None]


def sift_mask(keypoints_xy, image_size: tuple[int, int], grid: tuple[int, int],
              radius: int = 0) -> np.ndarray:
    """SIFT-mask, Hoang sec. 3.2.1 eq. 1: conv-grid cells that hold a SIFT keypoint.

    ``keypoints_xy``: (K, 2) keypoint positions (x, y) in pixels of the image the feature map
    was computed from, ``image_size`` = (W_I, H_I) of that image, ``grid`` = (W, H) of the
    feature map.  Each keypoint goes to the cell x_grid = round(x W / W_I),
    y_grid = round(y H / H_I) (eq. 1; halves round up, as Matlab's ``round`` on non-negative
    values), clipped to [0, W-1] x [0, H-1].  Eq. 1 is used on 0-based pixel and grid
    coordinates, as written; note that it maps a pixel to the cell whose left/top edge is
    nearest, i.e. half a cell away from the cell that contains it (the paper's own rounding).

    No keypoint (K == 0): every cell is selected (Hoang sec. 5.1 "the SIFT-mask is ignored").

    ``radius`` > 0 also selects the cells within that Chebyshev distance of each keypoint's
    cell; the authors' released code does this with radius 1, the paper (default 0) does not.
    Returns a bool (H, W) mask.
    """
    w_grid, h_grid = int(grid[0]), int(grid[1])
    w_img, h_img = float(image_size[0]), float(image_size[1])
    if w_grid <= 0 or h_grid <= 0 or w_img <= 0 or h_img <= 0:
        raise ValueError(f"bad sizes: image {image_size}, grid {grid}")
    kp = np.asarray(keypoints_xy, dtype=np.float64).reshape(-1, 2)
    if len(kp) == 0:
        return np.ones((h_grid, w_grid), dtype=bool)
    gx = np.floor(kp[:, 0] * w_grid / w_img + 0.5).astype(np.int64)
    gy = np.floor(kp[:, 1] * h_grid / h_img + 0.5).astype(np.int64)
    gx = np.clip(gx, 0, w_grid - 1)
    gy = np.clip(gy, 0, h_grid - 1)
    mask = np.zeros((h_grid, w_grid), dtype=bool)
    mask[gy, gx] = True
    if radius > 0:
        grown = mask.copy()
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                ys, xs = np.clip(gy + dy, 0, h_grid - 1), np.clip(gx + dx, 0, w_grid - 1)
                grown[ys, xs] = True
        mask = grown
    return mask


def sift_keypoints(image, nfeatures: int = 0) -> np.ndarray:
    """SIFT keypoint positions (K, 2) float32 as (x, y) pixels, OpenCV ``cv2.SIFT_create``.

    ``image``: uint8 RGB (H, W, 3) or grayscale (H, W); RGB is converted to grayscale first.
    Positions are OpenCV's (0-based, pixel centres at integers); a keypoint detected with
    several orientations appears several times (harmless for the mask).  Hoang used VLFeat's
    detector (sec. 5.1); OpenCV's is the same Lowe detector with its own defaults.
    """
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UserError("the SIFT mask needs OpenCV: install it with "
                        "`pip install opencv-python-headless`") from exc
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"sift_keypoints expects a uint8 image, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 3:
        gray = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
    elif img.ndim == 2:
        gray = np.ascontiguousarray(img)
    else:
        raise ValueError(f"sift_keypoints expects (H, W, 3) RGB or (H, W) gray, got {img.shape}")
    kps = cv2.SIFT_create(nfeatures=nfeatures).detect(gray, None)
    if not kps:
        return np.zeros((0, 2), dtype=np.float32)
    return np.array([kp.pt for kp in kps], dtype=np.float32)


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


# --------------------------------------------------------------------------- codebooks


def _stack_features(local_features) -> np.ndarray:
    if isinstance(local_features, np.ndarray) and local_features.ndim == 2:
        return local_features
    parts = [np.asarray(f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else f)
             for f in local_features]
    parts = [p for p in parts if len(p)]
    if not parts:
        raise ValueError("no local features to fit on")
    return np.concatenate(parts, axis=0)


def fit_kmeans(features, k: int, seed: int = 0, max_iter: int = 100) -> np.ndarray:
    """k-means codebook (k, d) with scikit-learn ``KMeans`` (k-means++, fixed random_state).

    ``features``: (N, d) or a list of per-image (N_i, d) arrays.  Deterministic for a seed.
    """
    from sklearn.cluster import KMeans

    x = _stack_features(features).astype(np.float64)
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

    x = _stack_features(features).astype(np.float64)
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
        x = _stack_features(local_features).astype(np.float64)
        n, c = x.shape
        d = self.d or c
        if d > c:
            raise UserError(f"cannot keep {d} PCA dimensions of {c}-dimensional local features")
        mean = x.mean(axis=0)
        xc = x - mean
        cov = xc.T @ xc / max(n, 1)
        ev, vec = np.linalg.eigh(cov)
        order = np.argsort(ev)[::-1][:d]
        self.d = d
        self.mean = mean.astype(np.float32)
        self.components = vec[:, order].T.astype(np.float32)
        return self

    def transform(self, features):
        """(N, C) -> (N, d) projected and L2-normalised (numpy or torch, see module doc)."""
        if self.components is None:
            raise RuntimeError("LocalPCA.transform before fit")
        t, finish = _as_tensor(features)
        mean, _ = _as_tensor(self.mean, like=t)
        comps, _ = _as_tensor(self.components, like=t)
        return finish(_l2_rows((t - mean) @ comps.T))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "components": self.components}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "LocalPCA":
        comps = np.asarray(arrays["components"])
        return cls(d=comps.shape[0], mean=np.asarray(arrays["mean"]), components=comps)


# --------------------------------------------------------------------------- embeddings


def _nearest(t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (squared Euclidean), first one on ties: (..., N)."""
    d2 = ((t[..., :, None, :] - c) ** 2).sum(-1) if t.shape[-2] * c.shape[0] <= 65536 \
        else torch.cdist(t, c.expand(*t.shape[:-2], *c.shape)) ** 2
    return d2.argmin(dim=-1)


def vlad_embed(features, centroids):
    """Per-feature VLAD embedding, Hoang eq. 5: phi(x) = [q_i (x - c_i)]_i, (..., N, k*d).

    q_i = 1 for the nearest centroid (first on ties), 0 otherwise; blocks are centroid-major.
    """
    t, finish = _as_tensor(features)
    _check_features(t)
    c, _ = _as_tensor(centroids, like=t)
    k, d = c.shape
    onehot = torch.nn.functional.one_hot(_nearest(t, c), k).to(t.dtype)  # (..., N, k)
    res = (t[..., :, None, :] - c) * onehot[..., None]
    return finish(res.reshape(*t.shape[:-1], k * d))


def vlad(features, centroids, intra: bool = True):
    """VLAD of a set of local features, Ng et al. sec. 3.3 (Jegou et al. 2010; Hoang eq. 5).

    v_i = sum over the features whose nearest centroid is c_i of (x - c_i); each block v_i is
    L2-normalised (intra-normalisation, Arandjelovic & Zisserman 2013, as Ng sec. 3.3; a block
    with no feature stays zero), then the whole vector is L2-normalised.  Ng L2-normalises the
    local features first (the caller does that).  (N, d) -> (k*d,), or batched
    (B, N, d) -> (B, k*d).  ``intra=False`` gives the original VLAD (global L2 only).
    """
    t, finish = _as_tensor(features)
    _check_features(t)
    c, _ = _as_tensor(centroids, like=t)
    k, d = c.shape
    onehot = torch.nn.functional.one_hot(_nearest(t, c), k).to(t.dtype)  # (..., N, k)
    sums = onehot.transpose(-1, -2) @ t  # (..., k, d): sum of assigned x
    counts = onehot.sum(dim=-2)[..., None]  # (..., k, 1)
    v = sums - counts * c  # sum of residuals x - c_i
    if intra:
        v = _l2_rows(v)
    return finish(_l2_rows(v.reshape(*v.shape[:-2], k * d)))


def temb(features, centroids):
    """Triangulation embedding, Hoang eq. 6 / Jegou & Zisserman 2014 eq. 3 (raw, uncentred).

    phi(x) = [(x - c_1)/||x - c_1||, ..., (x - c_k)/||x - c_k||], shape (..., N, k*d),
    centroid-major.  A feature equal to a centroid gets a zero block there.  Centring and
    whitening are :class:`TembModel`'s job.
    """
    t, finish = _as_tensor(features)
    _check_features(t)
    c, _ = _as_tensor(centroids, like=t)
    k, d = c.shape
    r = _l2_rows(t[..., :, None, :] - c)  # (..., N, k, d)
    return finish(r.reshape(*t.shape[:-1], k * d))


def _fv_parts(t, weights, means, variances):
    w, _ = _as_tensor(weights, like=t)
    mu, _ = _as_tensor(means, like=t)
    var, _ = _as_tensor(variances, like=t)
    var = var.clamp_min(_EPS)
    sigma = var.sqrt()
    z = (t[..., :, None, :] - mu) / sigma  # (..., N, k, d)
    # log w_i N(x; mu_i, diag var_i), posteriors gamma_t(i) by log-sum-exp
    logp = (torch.log(w.clamp_min(_EPS))
            - 0.5 * (torch.log(2 * torch.pi * var).sum(-1) + (z ** 2).sum(-1)))
    gamma = torch.softmax(logp, dim=-1)  # (..., N, k)
    u = gamma[..., None] * z / w.sqrt()[:, None]
    v = gamma[..., None] * (z ** 2 - 1) / (2 * w).sqrt()[:, None]
    return u, v


def fv_embed(features, gmm_weights, means, covariances_diag):
    """Per-feature Fisher vector, Hoang eq. 4: phi(x) = [u_1..u_k, v_1..v_k], (..., N, 2kd).

    u_i = p_i(x)/sqrt(w_i) (x - mu_i)/sigma_i,
    v_i = p_i(x)/sqrt(2 w_i) [((x - mu_i)/sigma_i)^2 - 1]
    with p_i(x) the GMM posterior and sigma_i^2 = ``covariances_diag[i]`` (variances).
    """
    t, finish = _as_tensor(features)
    _check_features(t)
    u, v = _fv_parts(t, gmm_weights, means, covariances_diag)
    lead = t.shape[:-1]
    return finish(torch.cat([u.reshape(*lead, -1), v.reshape(*lead, -1)], dim=-1))


def fisher_vector(features, gmm_weights, means, covariances_diag):
    """Improved Fisher vector of a set, Sanchez et al. 2013 (Perronnin et al. 2010), (2kd,).

    G_mu_i = 1/(N sqrt(w_i)) sum_t gamma_t(i) (x_t - mu_i)/sigma_i and
    G_sigma_i = 1/(N sqrt(2 w_i)) sum_t gamma_t(i) [((x_t - mu_i)/sigma_i)^2 - 1]: gradients
    w.r.t. means and standard deviations normalised by the (diagonal, closed-form) Fisher
    information; concatenated as [G_mu_1..G_mu_k, G_sigma_1..G_sigma_k] (Hoang eq. 4 order).
    It is the mean of :func:`fv_embed` over the set.  No power or L2 normalisation here.
    (N, d) -> (2kd,), batched (B, N, d) -> (B, 2kd); N = 0 gives zeros.
    """
    t, finish = _as_tensor(features)
    _check_features(t)
    u, v = _fv_parts(t, gmm_weights, means, covariances_diag)
    n = max(t.shape[-2], 1)
    lead = t.shape[:-2]
    return finish(torch.cat([u.sum(-3).reshape(*lead, -1), v.sum(-3).reshape(*lead, -1)],
                            dim=-1) / n)


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
    (DESIGN.md 3: "centred by the training mean embedding and whitened ..., each embedded
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
        x = _stack_features(local_features_per_image).astype(np.float64)
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
        if dev.type == "cpu":
            ev, vec = np.linalg.eigh(cov.numpy())
        else:
            ev_t, vec_t = torch.linalg.eigh(cov)
            ev, vec = ev_t.cpu().numpy(), vec_t.cpu().numpy()
        del cov
        order = np.argsort(ev)[::-1][:n_keep]
        ev, vec = np.clip(ev[order], 0.0, None), vec[:, order]
        tail = min(max(int(self.eig_floor_tail), 0), n_keep - 1)
        floor = max(ev[n_keep - 1 - tail], ev[0] * 1e-9, _EPS)
        ev = np.maximum(ev, floor)
        self.k, self.seed = k, seed
        self.centroids = centroids.astype(np.float32)
        self.mean = mean.cpu().numpy().astype(np.float32)
        self.eigenvalues = ev.astype(np.float32)
        self.projection = (vec / np.sqrt(ev)).T.astype(np.float32)
        return self

    def embed(self, features, normalize: bool = True):
        """(…, N, d) -> (…, N, n_components): centred, whitened and (by default) L2'd T-emb."""
        if self.projection is None:
            raise RuntimeError("TembModel.transform before fit")
        phi = temb(features, self.centroids)
        t, finish = _as_tensor(phi)
        mean, _ = _as_tensor(self.mean, like=t)
        proj, _ = _as_tensor(self.projection, like=t)
        y = (t - mean) @ proj.T
        return finish(_l2_rows(y) if normalize else y)

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


# --------------------------------------------------------------------------- aggregation


def democratic_weights(phi, n_iter: int = 10):
    """Democratic aggregation weights lambda (…, N), exactly as DESIGN.md section 3 writes it.

    Jegou & Zisserman 2014 sec. 3 (Hoang sec. 4.3 psi_d; the authors' ``qdemocratic`` /
    ``sinkhornm`` with reg = 0.5 and 10 iterations).  With the embedded vectors as the rows of
    ``phi`` (N, D) (DESIGN's Phi has them as columns):

        G = max(phi phi^T, 0)                (N x N Gram matrix, negatives clipped)
        lambda = 1
        repeat n_iter times:
            delta = 1 / (column sums of G)^0.5
            G = diag(delta) G diag(delta)
            lambda = lambda * delta

    so that diag(lambda) G diag(lambda) tends to a doubly stochastic matrix: every vector has
    the same total similarity lambda_i sum_j G_ij lambda_j (= lambda_i phi_i^T psi when no
    similarity is negative) with the aggregate psi = sum_i lambda_i phi_i.  A zero vector has
    a zero column; its delta is taken as 1 (it contributes nothing either way).
    Batched (B, N, D) -> (B, N) for equal-sized sets.
    """
    t, finish = _as_tensor(phi)
    _check_features(t, "phi")
    return finish(sinkhorn_weights((t @ t.transpose(-1, -2)).clamp_min(0), n_iter))


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


def democratic(phi, n_iter: int = 10):
    """Democratic aggregate psi_d = sum_i lambda_i phi_i (Hoang sec. 4.3; J&Z 2014), (…, D)."""
    t, finish = _as_tensor(phi)
    lam, _ = _as_tensor(democratic_weights(t, n_iter))
    return finish((lam[..., None] * t).sum(dim=-2))


def sum_aggregate(phi):
    """Sum aggregate psi_s = sum_i phi_i (Hoang sec. 4.3), (…, N, D) -> (…, D)."""
    t, finish = _as_tensor(phi)
    _check_features(t, "phi")
    return finish(t.sum(dim=-2))


# --------------------------------------------------------------------------- post-processing


def power_law(x, alpha: float | None = 0.5) -> np.ndarray:
    """PN(x) = sign(x) |x|^alpha (Hoang sec. 4.4, Perronnin et al. 2010); None/1: unchanged."""
    x = np.asarray(x, dtype=np.float64)
    if alpha is None or alpha == 1:
        return x
    return np.sign(x) * np.abs(x) ** alpha


def _l2_np(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def _prep_aggregates(agg, power: float | None) -> np.ndarray:
    if isinstance(agg, torch.Tensor):
        agg = agg.detach().cpu().numpy()
    return _l2_np(power_law(agg, power))


def fit_rotation(agg_train, whiten: bool = True, power: float | None = 0.5,
                 dims: int | None = None, rel_floor: float = 0.0) -> dict[str, np.ndarray]:
    """Rotation learned on aggregated training vectors (Hoang sec. 4.4, J&Z 2014, Jegou & Chum
    2012): PCA of power-law + L2-normalised aggregates (n, D), the same preparation as
    :func:`post_process` applies.

    Returns arrays ``mean`` (D,), ``projection`` (dims, D), ``eigenvalues`` (dims,).  With
    ``whiten`` the projection rows are the principal axes divided by sqrt(eigenvalue)
    (PCA-whitening, DESIGN.md); ``whiten=False`` is a pure rotation, as the authors' code.
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
    xc = x - mean
    if n < d:  # SVD of the data: all D right-singular vectors form an orthonormal basis
        # (the full D x D basis only when more axes than data points are asked for)
        _, s, vt = np.linalg.svd(xc, full_matrices=dims > n)
        ev = np.zeros(len(vt))
        ev[: len(s)] = s ** 2 / n
        axes = vt
    else:
        ev, vec = np.linalg.eigh(xc.T @ xc / n)
        order = np.argsort(ev)[::-1]
        ev, axes = ev[order], vec[:, order].T
    ev = np.clip(ev, 0.0, None)
    rank = int((ev > max(ev[0], _EPS) * 1e-10).sum()) or 1
    ev[rank:] = ev[rank - 1]
    ev = np.maximum(ev, ev[0] * rel_floor)
    ev, axes = ev[:dims], axes[:dims]
    proj = axes / np.sqrt(np.maximum(ev, _EPS))[:, None] if whiten else axes
    return {"mean": mean.astype(np.float32), "projection": proj.astype(np.float32),
            "eigenvalues": ev.astype(np.float32)}


def post_process(agg, rotation_model: dict[str, np.ndarray] | None = None,
                 power: float | None = 0.5, drop_first: int = 0) -> np.ndarray:
    """Final image vectors (Hoang sec. 4.4; DESIGN.md 3): power-law -> L2 -> rotation
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
    x = _l2_np(x).astype(np.float32)
    return x[0] if single else x
