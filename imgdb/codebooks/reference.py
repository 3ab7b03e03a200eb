"""Paper-literal codebook embeddings and aggregations: the reference the fast paths are tested against.

The formulas of the reference papers are the specification (docs/design.md §3, "Codebook
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

import torch

from .tensors import EPS, as_tensor, check_features, l2_normalize, nearest_centroid, sinkhorn_weights

__all__ = ["vlad_embed", "vlad", "temb", "fv_embed", "fisher_vector", "democratic_weights",
           "democratic", "sum_aggregate", "sinkhorn_weights"]


def vlad_embed(features, centroids):
    """Per-feature VLAD embedding, Hoang eq. 5: phi(x) = [q_i (x - c_i)]_i, (..., N, k*d).

    q_i = 1 for the nearest centroid (first on ties), 0 otherwise; blocks are centroid-major.
    """
    t, finish = as_tensor(features)
    check_features(t)
    c, _ = as_tensor(centroids, like=t)
    k, d = c.shape
    onehot = torch.nn.functional.one_hot(nearest_centroid(t, c), k).to(t.dtype)  # (..., N, k)
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
    t, finish = as_tensor(features)
    check_features(t)
    c, _ = as_tensor(centroids, like=t)
    k, d = c.shape
    onehot = torch.nn.functional.one_hot(nearest_centroid(t, c), k).to(t.dtype)  # (..., N, k)
    sums = onehot.transpose(-1, -2) @ t  # (..., k, d): sum of assigned x
    counts = onehot.sum(dim=-2)[..., None]  # (..., k, 1)
    v = sums - counts * c  # sum of residuals x - c_i
    if intra:
        v = l2_normalize(v)
    return finish(l2_normalize(v.reshape(*v.shape[:-2], k * d)))


def temb(features, centroids):
    """Triangulation embedding, Hoang eq. 6 / Jegou & Zisserman 2014 eq. 3 (raw, uncentred).

    phi(x) = [(x - c_1)/||x - c_1||, ..., (x - c_k)/||x - c_k||], shape (..., N, k*d),
    centroid-major.  A feature equal to a centroid gets a zero block there.  Centring and
    whitening are :class:`TembModel`'s job.
    """
    t, finish = as_tensor(features)
    check_features(t)
    c, _ = as_tensor(centroids, like=t)
    k, d = c.shape
    r = l2_normalize(t[..., :, None, :] - c)  # (..., N, k, d)
    return finish(r.reshape(*t.shape[:-1], k * d))


def _fv_parts(t, weights, means, variances):
    w, _ = as_tensor(weights, like=t)
    mu, _ = as_tensor(means, like=t)
    var, _ = as_tensor(variances, like=t)
    var = var.clamp_min(EPS)
    sigma = var.sqrt()
    z = (t[..., :, None, :] - mu) / sigma  # (..., N, k, d)
    # log w_i N(x; mu_i, diag var_i), posteriors gamma_t(i) by log-sum-exp
    logp = (torch.log(w.clamp_min(EPS))
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
    t, finish = as_tensor(features)
    check_features(t)
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
    t, finish = as_tensor(features)
    check_features(t)
    u, v = _fv_parts(t, gmm_weights, means, covariances_diag)
    n = max(t.shape[-2], 1)
    lead = t.shape[:-2]
    return finish(torch.cat([u.sum(-3).reshape(*lead, -1), v.sum(-3).reshape(*lead, -1)],
                            dim=-1) / n)


def democratic_weights(phi, n_iter: int = 10):
    """Democratic aggregation weights lambda (…, N), exactly as docs/design.md §3 writes it.

    Jegou & Zisserman 2014 sec. 3 (Hoang sec. 4.3 psi_d; the authors' ``qdemocratic`` /
    ``sinkhornm`` with reg = 0.5 and 10 iterations).  With the embedded vectors as the rows of
    ``phi`` (N, D) (the design note's Phi has them as columns):

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
    t, finish = as_tensor(phi)
    check_features(t, "phi")
    return finish(sinkhorn_weights((t @ t.transpose(-1, -2)).clamp_min(0), n_iter))


def democratic(phi, n_iter: int = 10):
    """Democratic aggregate psi_d = sum_i lambda_i phi_i (Hoang sec. 4.3; J&Z 2014), (…, D)."""
    t, finish = as_tensor(phi)
    lam, _ = as_tensor(democratic_weights(t, n_iter))
    return finish((lam[..., None] * t).sum(dim=-2))


def sum_aggregate(phi):
    """Sum aggregate psi_s = sum_i phi_i (Hoang sec. 4.3), (…, N, D) -> (…, D)."""
    t, finish = as_tensor(phi)
    check_features(t, "phi")
    return finish(t.sum(dim=-2))
