"""Codebook methods (imgdb.codebooks: masks, reference, training): masks, VLAD, T-emb, FV, democratic aggregation.

Expected values are worked out by hand from the papers' equations (Hoang et al. 2017 eq. 1-6,
Ng et al. 2015 sec. 3.3, Jegou & Zisserman 2014 sec. 3) or computed by a plain loop
implementation written here -- never by the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import OXFORD_IMAGES
from imgdb.codebooks.masks import compute_mask, max_mask, select_local, sift_keypoints, sift_mask, sum_mask
from imgdb.codebooks.reference import (democratic, democratic_weights, fisher_vector, fv_embed,
                                       sum_aggregate, temb, vlad, vlad_embed)
from imgdb.codebooks.training import (HOANG_TABLE4, HOANG_TEMB_DROP, NG_VLAD, LocalPCA, TembModel,
                                      fit_gmm, fit_rotation, post_process)


def cells(mask: np.ndarray) -> set[tuple[int, int]]:
    """True cells of an (H, W) mask as (x, y) = (column, row)."""
    ys, xs = np.nonzero(mask)
    return set(zip(xs.tolist(), ys.tolist()))


# --------------------------------------------------------------------------- constants


def test_hoang_table4_and_ng_defaults():
    # Hoang Table 4, and D = d |C| - 128 (Table 2's T-emb row) for every entry
    assert HOANG_TABLE4 == {512: (32, 20), 1024: (64, 18), 2048: (64, 34), 4096: (64, 66),
                            8064: (128, 64)}
    for dim, (d, c) in HOANG_TABLE4.items():
        assert d * c - HOANG_TEMB_DROP == dim
    assert NG_VLAD == {"k": 100, "pca_dims": 128}


# --------------------------------------------------------------------------- MAX mask


def _map_3x3() -> np.ndarray:
    x = np.zeros((3, 3, 3), dtype=np.float32)
    x[0] = [[0, 1, 9], [0, 2, 0], [0, 0, 3]]  # max at row 0, col 2 -> (x=2, y=0)
    x[1] = [[1, 0, 0], [0, 0, 0], [0, 7, 0]]  # max at row 2, col 1 -> (x=1, y=2)
    x[2] = [[0, 0, 4], [1, 0, 0], [0, 0, 2]]  # max at row 0, col 2 again (shared)
    return x


def test_max_mask_unique_locations():
    m = max_mask(_map_3x3())
    assert m.shape == (3, 3) and m.dtype == bool
    assert cells(m) == {(2, 0), (1, 2)}  # 2 cells for C = 3 channels


def test_max_mask_ties_first_row_major_and_constant_channels():
    x = np.zeros((2, 3, 3))
    x[0] = [[0, 5, 0], [5, 0, 0], [0, 0, 5]]  # three maxima: first in row-major is (x=1, y=0)
    # x[1] is all zero: no argmax location -> skipped by default
    assert cells(max_mask(x)) == {(1, 0)}
    # authors' code behaviour: the first cell for a constant channel
    assert cells(max_mask(x, include_constant=True)) == {(1, 0), (0, 0)}
    assert not max_mask(np.zeros((4, 2, 2))).any()


def test_max_mask_batched_and_torch():
    a = _map_3x3()
    b = np.roll(a, 1, axis=2)  # every max moves one column right (with wrap)
    batch = max_mask(np.stack([a, b]))
    assert batch.shape == (2, 3, 3)
    assert cells(batch[0]) == {(2, 0), (1, 2)}
    assert cells(batch[1]) == {(0, 0), (2, 2)}
    assert np.array_equal(max_mask(torch.from_numpy(a)), batch[0])
    assert np.array_equal(max_mask(torch.from_numpy(a).half()), batch[0])


# --------------------------------------------------------------------------- SUM mask


def test_sum_mask_even_median():
    x = np.zeros((2, 2, 3))
    x[0] = [[1, 1, 1], [1, 1, 1]]
    x[1] = [[0, 1, 2], [3, 4, 5]]  # channel sums [[1, 2, 3], [4, 5, 6]]: median 3.5
    assert sum_mask(x).tolist() == [[False, False, False], [True, True, True]]


def test_sum_mask_median_ties():
    sums = np.array([[1, 2, 2], [2, 2, 3], [0, 0, 5]], dtype=np.float64)
    x = np.stack([sums / 2, sums / 2])  # channel sum == sums
    # sorted sums: 0 0 1 2 2 2 2 3 5 -> median 2; ties at the median are kept: 6 of 9 cells
    assert sum_mask(x).tolist() == [[False, True, True], [True, True, True],
                                    [False, False, True]]
    assert sum_mask(np.ones((3, 2, 2))).all()  # all equal -> all selected
    batch = sum_mask(np.stack([x, np.ones((2, 3, 3))]))
    assert batch.shape == (2, 3, 3) and batch[1].all()
    assert np.array_equal(batch[0], sum_mask(x))


# --------------------------------------------------------------------------- SIFT mask


def test_sift_mask_rounding_eq1():
    # image W_I x H_I = 200 x 60, grid W x H = 10 x 6: x scale 1/20, y scale 1/10
    kp = np.array([
        [0.0, 0.0],     # (0, 0)
        [29.0, 25.0],   # x 1.45 -> 1, y 2.5 -> 3 (halves round up)
        [31.0, 14.0],   # x 1.55 -> 2, y 1.4 -> 1
        [199.0, 59.0],  # x 9.95 -> 10 -> clipped 9, y 5.9 -> 6 -> clipped 5
        [90.0, 44.9],   # x 4.5 -> 5, y 4.49 -> 4
    ])
    m = sift_mask(kp, image_size=(200, 60), grid=(10, 6))
    assert m.shape == (6, 10)
    assert cells(m) == {(0, 0), (1, 3), (2, 1), (9, 5), (5, 4)}


def test_sift_mask_empty_and_radius():
    assert sift_mask(np.zeros((0, 2)), (100, 100), (7, 5)).all()
    assert sift_mask([], (100, 100), (7, 5)).shape == (5, 7)
    m = sift_mask(np.array([[0.0, 0.0], [50.0, 50.0]]), (100, 100), (10, 10), radius=1)
    assert cells(m) == {(x, y) for x in (0, 1) for y in (0, 1)} | \
        {(x, y) for x in (4, 5, 6) for y in (4, 5, 6)}


def test_sift_keypoints_on_a_real_photo():
    from PIL import Image

    path = sorted(OXFORD_IMAGES.glob("*.jpg"))
    img = Image.open(path[0]).convert("RGB")
    img.thumbnail((512, 512))
    rgb = np.asarray(img)
    kp = sift_keypoints(rgb)
    h, w = rgb.shape[:2]
    assert kp.ndim == 2 and kp.shape[1] == 2 and len(kp) > 50
    assert (kp[:, 0] >= 0).all() and (kp[:, 0] < w).all()
    assert (kp[:, 1] >= 0).all() and (kp[:, 1] < h).all()
    grid = (math.ceil(w / 16), math.ceil(h / 16))
    m = sift_mask(kp, (w, h), grid)
    assert m.shape == (grid[1], grid[0]) and 0 < m.sum() <= m.size
    assert len(sift_keypoints(np.zeros((64, 64), dtype=np.uint8))) == 0  # flat image


def test_select_local_and_compute_mask():
    x = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    mask = np.array([[True, False, True], [False, True, False]])
    f, xy = select_local(x, mask)
    assert f.tolist() == [[0, 6], [2, 8], [4, 10]]  # rows in row-major cell order
    assert xy.tolist() == [[0, 0], [2, 0], [1, 1]]  # (x, y)
    ft, xy2 = select_local(torch.from_numpy(x), mask)
    assert isinstance(ft, torch.Tensor) and ft.tolist() == f.tolist()
    assert np.array_equal(xy, xy2)
    assert compute_mask(x, "none").all()
    assert np.array_equal(compute_mask(_map_3x3(), "max"), max_mask(_map_3x3()))
    assert cells(compute_mask(x, "sift", keypoints_xy=[[10, 10]], image_size=(30, 20))) == {(1, 1)}
    with pytest.raises(ValueError):
        compute_mask(x, "median")


# --------------------------------------------------------------------------- VLAD / T-emb


F3 = np.array([[1.0, 0.0], [0.0, 0.5], [2.0, 3.0]])
C2 = np.array([[0.0, 0.0], [2.0, 2.0]])


def test_vlad_hand_case():
    # nearest: f1, f2 -> c1 (d2 1 vs 5, 0.25 vs 6.25); f3 -> c2 (1 vs 13)
    # residual sums: c1 (1, 0.5), c2 (0, 1); intra-L2: (2, 1)/sqrt5, (0, 1); global L2 / sqrt2
    expected = [2 / math.sqrt(10), 1 / math.sqrt(10), 0.0, 1 / math.sqrt(2)]
    assert np.allclose(vlad(F3, C2), expected, atol=1e-12)
    # without intra-normalisation: (1, .5, 0, 1) / 1.5
    assert np.allclose(vlad(F3, C2, intra=False), [2 / 3, 1 / 3, 0, 2 / 3], atol=1e-12)
    # an empty word keeps a zero block
    c3 = np.vstack([C2, [[10.0, 10.0]]])
    assert np.allclose(vlad(F3, c3), expected + [0.0, 0.0], atol=1e-12)
    # per-feature embedding (Hoang eq. 5) sums to the raw VLAD
    e = vlad_embed(F3, C2)
    assert e.tolist() == [[1, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 0, 1]]


def test_vlad_batched_torch_and_dtypes():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((3, 7, 4))
    c = rng.standard_normal((5, 4))
    batch = vlad(f, c)
    assert batch.shape == (3, 20)
    for i in range(3):
        assert np.allclose(batch[i], vlad(f[i], c))
    t = vlad(torch.from_numpy(f).float(), c)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    assert np.allclose(t.numpy(), batch, atol=1e-5)
    assert vlad(f[0].astype(np.float32), c).dtype == np.float32


def test_temb_hand_case():
    x = np.array([[1.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    c = np.array([[0.0, 0.0], [1.0, 2.0]])
    r2 = 1 / math.sqrt(2)
    expected = [
        [1, 0, 0, -1],                                 # (1,0)/1, (0,-2)/2
        [0.6, 0.8, r2, r2],                             # (3,4)/5, (2,2)/(2 sqrt2)
        [0, 0, -1 / math.sqrt(5), -2 / math.sqrt(5)],  # equal to c1: zero block
    ]
    assert np.allclose(temb(x, c), expected, atol=1e-12)
    tb = temb(torch.from_numpy(np.stack([x, x])), c)
    assert tb.shape == (2, 3, 4) and np.allclose(tb[1].numpy(), expected)


# --------------------------------------------------------------------------- democratic


def sinkhorn_loops(phi: np.ndarray, n_iter: int = 10) -> list[float]:
    """Democratic weights (Jegou & Zisserman 2014 sec. 3: Sinkhorn iteration on the Gram matrix
    with negative similarities clipped to 0) written out with plain loops."""
    n, dim = phi.shape
    g = [[max(sum(phi[i][k] * phi[j][k] for k in range(dim)), 0.0) for j in range(n)]
         for i in range(n)]
    lam = [1.0] * n
    for _ in range(n_iter):
        delta = [1.0 / math.sqrt(sum(g[i][j] for i in range(n))) for j in range(n)]
        g = [[delta[i] * g[i][j] * delta[j] for j in range(n)] for i in range(n)]
        lam = [lam[i] * delta[i] for i in range(n)]
    return lam


def test_democratic_closed_form():
    # two identical vectors and an orthogonal one: one iteration gives 1/sqrt2, 1/sqrt2, 1
    phi = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    r2 = 1 / math.sqrt(2)
    assert np.allclose(democratic_weights(phi), [r2, r2, 1.0], atol=1e-12)
    assert np.allclose(democratic(phi), [math.sqrt(2), 1.0], atol=1e-12)
    assert np.allclose(sum_aggregate(phi), [2.0, 1.0])


def test_democratic_matches_loop_sinkhorn():
    # 3 unit vectors; phi1.phi3 = -0.6 is clipped to 0, phi1.phi2 = .6, phi2.phi3 = .28
    phi = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.6, 0.8, 0.0]])
    for n_iter in (1, 2, 10):
        assert np.allclose(democratic_weights(phi, n_iter), sinkhorn_loops(phi, n_iter),
                           rtol=1e-12)
    # first iteration by hand: column sums 1.6, 1.88, 1.28
    assert np.allclose(democratic_weights(phi, 1), [1.6 ** -0.5, 1.88 ** -0.5, 1.28 ** -0.5])
    lam = np.array(sinkhorn_loops(phi))
    assert np.allclose(democratic(phi), (lam[:, None] * phi).sum(0), rtol=1e-12)
    # batched and torch
    two = np.stack([phi, phi[::-1].copy()])
    wb = democratic_weights(two)
    assert np.allclose(wb[0], lam) and np.allclose(wb[1], lam[::-1])
    wt = democratic_weights(torch.from_numpy(phi).float())
    assert isinstance(wt, torch.Tensor) and np.allclose(wt.numpy(), lam, rtol=1e-5)


def _contributions(phi: np.ndarray, lam: np.ndarray) -> np.ndarray:
    psi = (lam[:, None] * phi).sum(0)
    return lam * (phi @ psi)


def test_democratic_equalises_contributions_and_defeats_burstiness():
    rng = np.random.default_rng(0)
    # sparse non-negative unit vectors (post-ReLU-like): all similarities >= 0
    others = np.abs(rng.standard_normal((10, 32))) * (rng.random((10, 32)) < 0.3)
    others /= np.linalg.norm(others, axis=1, keepdims=True)
    burst = others[:1].repeat(10, axis=0)  # one vector repeated 10 times (burstiness)
    phi = np.vstack([burst, others[1:]])

    # democratic, 10 iterations: relative spread of lambda_i phi_i^T psi below 1e-2
    c = _contributions(phi, democratic_weights(phi, 10))
    assert (c.max() - c.min()) / c.mean() < 1e-2
    # sum aggregation: the repeated vector takes a far bigger share
    s = _contributions(phi, np.ones(len(phi)))
    assert (s.max() - s.min()) / s.mean() > 1.0
    assert s[:10].min() > 1.5 * s[10:].max()

    b = burst[0]

    def cos(v):
        return float(v @ b / np.linalg.norm(v))

    assert cos(sum_aggregate(phi)) > cos(democratic(phi)) + 0.05
    # exact burst with orthogonal rest: lambda_burst = 1/sqrt(10), psi . b / |psi| = sqrt(10/13)
    eye = np.eye(4)
    phi2 = np.vstack([eye[:1].repeat(10, axis=0), eye[1:]])
    lam2 = democratic_weights(phi2)
    assert np.allclose(lam2, [10 ** -0.5] * 10 + [1.0] * 3)
    assert math.isclose(cos_of(democratic(phi2), eye[0]), math.sqrt(10 / 13), rel_tol=1e-12)
    assert math.isclose(cos_of(sum_aggregate(phi2), eye[0]), 10 / math.sqrt(103), rel_tol=1e-12)


def cos_of(v: np.ndarray, b: np.ndarray) -> float:
    return float(v @ b / np.linalg.norm(v))


def test_democratic_zero_vector_and_empty_set():
    phi = np.array([[1.0, 0.0], [0.0, 0.0]])
    lam = democratic_weights(phi)
    assert np.isfinite(lam).all() and np.allclose(democratic(phi), [1.0, 0.0])
    assert democratic(np.zeros((0, 3))).tolist() == [0, 0, 0]


# --------------------------------------------------------------------------- T-emb model


def _local_sets(seed: int = 0, n_images: int = 6, n: int = 80, d: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_images):
        f = rng.standard_normal((n, d)) * [3.0, 1.0, 0.5, 0.2] + [1.0, 0.0, 0.0, 0.0]
        out.append(f / np.linalg.norm(f, axis=1, keepdims=True))
    return out


def test_temb_model_fit_transform_and_whitening():
    sets = _local_sets()
    model = TembModel(eig_floor_tail=2).fit(sets, k=3, seed=0)
    assert model.centroids.shape == (3, 4) and model.mean.shape == (12,)
    assert model.projection.shape == (12, 12) and model.eigenvalues.shape == (12,)
    y = model.transform(sets[0])
    assert y.shape == (80, 12)
    assert np.allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-6)

    x = np.concatenate(sets)
    raw = temb(x, model.centroids.astype(np.float64))
    assert np.allclose(raw.mean(0), model.mean, atol=1e-6)  # the training mean embedding
    w = model.embed(x, normalize=False)
    assert np.allclose(w.mean(0), 0.0, atol=1e-4)
    cov = w.T @ w / len(w)
    # identity on the 10 unfloored components; the 2 floored ones have variance < 1
    assert np.allclose(cov[:10, :10], np.eye(10), atol=1e-3)
    assert np.allclose(cov[10:, :10], 0.0, atol=1e-3)
    assert (np.diag(cov)[10:] < 1.0 + 1e-3).all()
    ev = model.eigenvalues
    assert (np.diff(ev) <= 1e-7).all() and ev[10] == ev[9] == ev[11]


def test_temb_model_deterministic_and_arrays_roundtrip():
    sets = _local_sets(3)
    a = TembModel(eig_floor_tail=2).fit(sets, k=3, seed=7)
    b = TembModel(eig_floor_tail=2).fit(sets, k=3, seed=7)
    for key, v in a.arrays().items():
        assert np.array_equal(v, b.arrays()[key]), key
    c = TembModel.from_arrays(a.arrays())
    assert np.allclose(c.transform(sets[1]), a.transform(sets[1]))
    small = TembModel(n_components=5, eig_floor_tail=1).fit(sets, k=2, seed=0)
    assert small.transform(sets[0]).shape == (80, 5)
    t = a.transform(torch.from_numpy(sets[0]).float())
    assert isinstance(t, torch.Tensor) and np.allclose(t.numpy(), a.transform(sets[0]),
                                                       atol=1e-4)


def test_local_pca():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((400, 3)) * [5.0, 1.0, 0.1] + [10.0, -3.0, 2.0]
    pca = LocalPCA(d=2).fit([x[:200], x[200:]])
    assert np.allclose(pca.mean, x.mean(0), atol=1e-5)
    assert np.allclose(np.abs(pca.components), [[1, 0, 0], [0, 1, 0]], atol=0.05)
    y = pca.transform(x)
    assert y.shape == (400, 2) and np.allclose(np.linalg.norm(y, axis=1), 1.0)


# --------------------------------------------------------------------------- Fisher vector


def fisher_loops(x, w, mu, var):
    """Sanchez et al. 2013 improved FV, element by element."""
    n, d = x.shape
    k = len(w)
    u = np.zeros((k, d))
    v = np.zeros((k, d))
    for t in range(n):
        lik = []
        for i in range(k):
            p = w[i]
            for j in range(d):
                p *= math.exp(-(x[t, j] - mu[i, j]) ** 2 / (2 * var[i, j])) / \
                    math.sqrt(2 * math.pi * var[i, j])
            lik.append(p)
        for i in range(k):
            gamma = lik[i] / sum(lik)
            for j in range(d):
                z = (x[t, j] - mu[i, j]) / math.sqrt(var[i, j])
                u[i, j] += gamma * z / math.sqrt(w[i])
                v[i, j] += gamma * (z * z - 1) / math.sqrt(2 * w[i])
    return np.concatenate([u.ravel(), v.ravel()]) / n


def test_fisher_vector_matches_loops():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 3))
    w = np.array([0.3, 0.7])
    mu = rng.standard_normal((2, 3)) * 0.5
    var = rng.random((2, 3)) + 0.5
    fv = fisher_vector(x, w, mu, var)
    assert fv.shape == (12,)
    assert np.allclose(fv, fisher_loops(x, w, mu, var), rtol=1e-10, atol=1e-12)
    assert np.allclose(fv_embed(x, w, mu, var).mean(0), fv)
    fb = fisher_vector(np.stack([x, x[::-1].copy()]), w, mu, var)
    assert fb.shape == (2, 12) and np.allclose(fb[1], fv)  # order-free
    weights, means, variances = fit_gmm(x.repeat(5, axis=0) + rng.normal(0, .1, (30, 3)), 2)
    assert fisher_vector(x, weights, means, variances).shape == (12,)


# --------------------------------------------------------------------------- post-processing


def test_post_process_power_and_l2_without_rotation():
    out = post_process(np.array([[4.0, -9.0]]), None, power=0.5)
    assert np.allclose(out, [[2 / math.sqrt(13), -3 / math.sqrt(13)]])
    assert post_process(np.array([3.0, 4.0]), power=None).tolist() == pytest.approx([0.6, 0.8])
    with pytest.raises(ValueError):
        post_process(np.ones((2, 4)), None, drop_first=1)


def test_fit_rotation_whitens_and_drops():
    rng = np.random.default_rng(5)
    agg = rng.standard_normal((60, 8)) * np.linspace(3, 0.5, 8)
    rot = fit_rotation(agg, whiten=True, power=0.5)
    assert rot["projection"].shape == (8, 8)
    prep = np.sign(agg) * np.sqrt(np.abs(agg))
    prep /= np.linalg.norm(prep, axis=1, keepdims=True)
    y = (prep - rot["mean"]) @ rot["projection"].T.astype(np.float64)
    assert np.allclose(y.T @ y / len(y), np.eye(8), atol=1e-4)  # whitened training vectors
    out = post_process(agg, rot, power=0.5, drop_first=3)
    assert out.shape == (60, 5) and out.dtype == np.float32
    expect = y[:, 3:] / np.linalg.norm(y[:, 3:], axis=1, keepdims=True)
    assert np.allclose(out, expect, atol=1e-5)


def test_fit_rotation_rank_deficient_is_a_full_rotation():
    rng = np.random.default_rng(6)
    agg = rng.standard_normal((5, 8))
    rot = fit_rotation(agg, whiten=False, power=None)
    p = rot["projection"].astype(np.float64)
    assert p.shape == (8, 8) and np.allclose(p @ p.T, np.eye(8), atol=1e-5)
    ev = rot["eigenvalues"]
    # 5 centred vectors span 4 dimensions; the other 4 are floored at the 4th eigenvalue
    assert ev[3] > 0 and np.allclose(ev[4:], ev[3])
    w = fit_rotation(agg, whiten=True, power=None)
    assert np.isfinite(w["projection"]).all()


# --------------------------------------------------------------------------- devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_stay_on_device():
    rng = np.random.default_rng(8)
    f = rng.standard_normal((2, 30, 4))
    f /= np.linalg.norm(f, axis=-1, keepdims=True)
    c = rng.standard_normal((3, 4))
    fc = torch.from_numpy(f).cuda()
    for fn in (vlad, temb, vlad_embed):
        out = fn(fc, c)
        assert out.device.type == "cuda"
        assert np.allclose(out.cpu().numpy(), fn(f, c), atol=1e-10)
    phi = temb(fc[0], c)
    assert np.allclose(democratic(phi).cpu().numpy(), democratic(temb(f[0], c)), atol=1e-10)
    assert np.allclose(fisher_vector(fc[0], [0.5, 0.5], c[:2], np.ones((2, 4))).cpu().numpy(),
                       fisher_vector(f[0], [0.5, 0.5], c[:2], np.ones((2, 4))), atol=1e-10)
    sets = _local_sets()
    cpu = TembModel(eig_floor_tail=2).fit(sets, k=3, seed=0)
    gpu = TembModel(eig_floor_tail=2).fit(sets, k=3, seed=0, device="cuda")
    assert np.allclose(cpu.eigenvalues, gpu.eigenvalues, rtol=1e-4)
    y = cpu.transform(torch.from_numpy(sets[0]).float().cuda())
    assert y.device.type == "cuda"
    assert np.allclose(y.cpu().numpy(), cpu.transform(sets[0]), atol=1e-4)
    x = torch.rand(2, 5, 4, 4, device="cuda")
    assert np.array_equal(max_mask(x), max_mask(x.cpu().numpy()))
    feats, _ = select_local(x[0], sum_mask(x[0]))
    assert feats.device.type == "cuda"
