"""Tests for imgdb.pooling.

Expected values come either from hand computation (literals, derivations in comments)
or from deliberately naive numpy re-implementations with explicit Python loops written
from the papers' equations -- never from the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from imgdb.features.pooling import (
    DEFAULT_POOLINGS,
    POOLINGS,
    canonical_pooling_name,
    get_pooling,
    pool_all,
    pooled_dim,
)

RTOL = 1e-5
ATOL = 1e-7
EPS = 1e-6

ALL_NAMES = DEFAULT_POOLINGS + ("gem-p1", "gem-p2.5", "rmac-l1", "rmac-l2", "spoc-s0.667", "spoc-s0.5")


def t(a) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32)


def check(actual: torch.Tensor, expected) -> None:
    assert actual.dtype == torch.float32
    np.testing.assert_allclose(actual.detach().cpu().numpy(), np.asarray(expected, dtype=np.float64), rtol=RTOL, atol=ATOL)


def relu_randn(shape, seed: int, zero_channel: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(*shape, generator=g))
    if zero_channel is not None:
        x[:, zero_channel] = 0.0
    return x


# --------------------------------------------------------------------------- hand-made maps

# C=2, H=2, W=3
HAND = t(
    [
        [
            [[1, 2, 0], [3, 0, 4]],  # channel 0
            [[0, 0, 5], [1, 2, 0]],  # channel 1
        ]
    ]
)


def test_sum_hand():
    # ch0: 1+2+0+3+0+4 = 10 ; ch1: 0+0+5+1+2+0 = 8
    check(get_pooling("sum")(HAND), [[10, 8]])


def test_mac_hand():
    check(get_pooling("mac")(HAND), [[4, 5]])


def test_mac2x2_hand_even_rows_odd_cols():
    # H=2: top rows [0,1), bottom [1,2); W=3: left cols [0,2), right cols [1,3)
    # TL: ch0 [1,2] -> 2, ch1 [0,0] -> 0     TR: ch0 [2,0] -> 2, ch1 [0,5] -> 5
    # BL: ch0 [3,0] -> 3, ch1 [1,2] -> 2     BR: ch0 [0,4] -> 4, ch1 [2,0] -> 2
    check(get_pooling("mac2x2")(HAND), [[2, 0, 2, 5, 3, 2, 4, 2]])


def test_mac2x2_hand_odd_square():
    # H=W=3: rows/cols [0,2) and [1,3); the centre (value 5) belongs to all four quadrants
    x = t([[[[8, 1, 2], [1, 5, 1], [0, 1, 6]]]])
    # TL [[8,1],[1,5]] -> 8 ; TR [[1,2],[5,1]] -> 5 ; BL [[1,5],[0,1]] -> 5 ; BR [[5,1],[1,6]] -> 6
    check(get_pooling("mac2x2")(x), [[8, 5, 5, 6]])
    x2 = t([[[[8, 1, 2], [1, 0, 1], [0, 1, 6]]]])
    # TL 8 ; TR [[1,2],[0,1]] -> 2 ; BL [[1,0],[0,1]] -> 1 ; BR [[0,1],[1,6]] -> 6
    check(get_pooling("mac2x2")(x2), [[8, 2, 1, 6]])


def test_mac2x2_hand_single_row():
    # H=1: top and bottom are both row 0; W=3: left [3,1] -> 3, right [1,2] -> 2
    x = t([[[[3, 1, 2]]]])
    check(get_pooling("mac2x2")(x), [[3, 2, 3, 2]])


def test_spoc_hand_3x3():
    # H=W=3: centre (1,1); sigma = (1/3) * (3/2) = 0.5, 2 sigma^2 = 0.5, alpha = exp(-2 d^2)
    # all-ones map: 1 (centre) + 4 exp(-2) (edges, d^2=1) + 4 exp(-4) (corners, d^2=2)
    x = torch.ones(1, 1, 3, 3)
    check(get_pooling("spoc")(x), [[1.6146036885013875]])
    # s = 1: sigma = 1.5, 2 sigma^2 = 4.5 -> 1 + 4 exp(-1/4.5) + 4 exp(-2/4.5)
    check(get_pooling("spoc-s1")(x), [[1 + 4 * math.exp(-1 / 4.5) + 4 * math.exp(-2 / 4.5)]])


# C=2, H=2, W=3 map for CroW
CROW_HAND = t(
    [
        [
            [[0, 0, 1], [3, 0, 0]],  # channel 0
            [[0, 0, 3], [0, 0, 0]],  # channel 1
        ]
    ]
)
# S' = ch0 + ch1 = [[0,0,4],[3,0,0]], ||S'||_2 = sqrt(16+9) = 5
# S = sqrt(S'/5) = [[0, 0, sqrt(0.8)], [sqrt(0.6), 0, 0]]
# Q_0 = 2/6 = 1/3, Q_1 = 1/6, sum Q = 1/2, K = 2, eps = 1e-6
# beta_0 = log((2e-6 + 0.5) / (1e-6 + 1/3)) = 0.4054661081046644   (~ log 1.5)
# beta_1 = log((2e-6 + 0.5) / (1e-6 + 1/6)) = 1.0986102886781095   (~ log 3)
# spatially weighted sums: ch0 = 1*sqrt(0.8) + 3*sqrt(0.6) = 3.218217198724366
#                          ch1 = 3*sqrt(0.8)               = 2.6832815729997477
# plain sums: ch0 = 4, ch1 = 3
BETA0, BETA1 = 0.4054661081046644, 1.0986102886781095
SW0, SW1 = 3.218217198724366, 2.6832815729997477


def test_crow_hand():
    check(get_pooling("crow")(CROW_HAND), [[BETA0 * SW0, BETA1 * SW1]])


def test_crow_sw_hand():
    check(get_pooling("crow-sw")(CROW_HAND), [[SW0, SW1]])


def test_crow_ssw_hand():
    check(get_pooling("crow-ssw")(CROW_HAND), [[BETA0 * 4, BETA1 * 3]])


# R-MAC regions for H=5, W=7, L=3 (worked out by hand from the Tolias definition):
#   w = min = 5; for m = 1..6 extra regions on the long side, b = (7-5)/m and the overlap
#   (w^2 - w b)/w^2 = 0.6, 0.8, 0.867, ... -> closest to 0.4 is m = 1 (W gets l+1 regions).
#   l=1: side 5, rows {0..4}, cols {0..4}, {2..6}                          -> 2 regions
#   l=2: side 3, rows {0..2},{2..4}; cols {0..2},{2..4},{4..6}             -> 6 regions
#   l=3: side 2, rows start 0,1,3 (floor(k*1.5)); cols start 0,1,3,5 (floor(k*5/3)) -> 12
#   plus the global MAC: 21 terms, each L2-normalised as v / (||v|| + eps).
def _spike(h, w, pos, c=1, value=1.0, channel=0):
    x = torch.zeros(1, c, h, w)
    x[0, channel, pos[0], pos[1]] = value
    return x


@pytest.mark.parametrize(
    "pos,count",
    [
        ((2, 3), 6),  # global + l1: both + l2: rows{0..2},{2..4} x cols{2..4} + l3: rows{1,2} x cols{3,4}
        ((0, 0), 4),  # global + one region per level
        ((4, 6), 4),  # global + one region per level (bottom-right corner)
        ((1, 1), 7),  # global + l1: 1 + l2: 1 + l3: rows{0,1},{1,2} x cols{0,1},{1,2} = 4
    ],
)
def test_rmac_hand_region_counts(pos, count):
    # C=1 and a single 1.0: each region containing the spike contributes 1/(1+eps), others 0
    check(get_pooling("rmac-l3")(_spike(5, 7, pos)), [[count / (1 + EPS)]])


def test_rmac_hand_two_channels():
    # ch0 = 3 at (2,3), ch1 = 4 at (0,0), H=5, W=7
    x = _spike(5, 7, (2, 3), c=2, value=3.0, channel=0)
    x[0, 1, 0, 0] = 4.0
    # global (3,4)/(5+e); l1 rows0-4 cols0-4: (3,4)/(5+e); l1 cols2-6: (3,0)/(3+e)
    # l2: ch1 alone in rows0-2 cols0-2 -> (0,4)/(4+e); ch0 alone in 2 regions -> 2*(3,0)/(3+e)
    # l3: ch1 alone rows0-1 cols0-1; ch0 alone rows1-2 cols3-4
    e = EPS
    ch0 = 6 / (5 + e) + 12 / (3 + e)  # 5.199998426667159
    ch1 = 8 / (5 + e) + 8 / (4 + e)  # 3.599999180000189
    check(get_pooling("rmac-l3")(x), [[ch0, ch1]])


# --------------------------------------------------------------------------- numpy loop references


def np_spoc(x: np.ndarray, s: float = 1 / 3) -> np.ndarray:
    B, C, H, W = x.shape
    sigma = s * min(H, W) / 2
    cy, cx = (H - 1) / 2, (W - 1) / 2
    out = np.zeros((B, C))
    for b in range(B):
        for c in range(C):
            acc = 0.0
            for i in range(H):
                for j in range(W):
                    alpha = math.exp(-((i - cy) ** 2 + (j - cx) ** 2) / (2 * sigma**2))
                    acc += alpha * x[b, c, i, j]
            out[b, c] = acc
    return out


def np_crow(x: np.ndarray, spatial: bool = True, channel: bool = True) -> np.ndarray:
    B, C, H, W = x.shape
    out = np.zeros((B, C))
    for b in range(B):
        # spatial weight, Kalantidis eq. 3-4 with a = b = 2
        sp = np.zeros((H, W))
        for i in range(H):
            for j in range(W):
                sp[i, j] = sum(float(x[b, k, i, j]) for k in range(C))
        norm = math.sqrt(sum(sp[i, j] ** 2 for i in range(H) for j in range(W)))
        S = np.zeros((H, W))
        for i in range(H):
            for j in range(W):
                S[i, j] = math.sqrt(sp[i, j] / norm) if norm > 0 else 0.0
        if not spatial:
            S[:] = 1.0
        # channel weight, eq. 6
        Q = [sum(1 for i in range(H) for j in range(W) if x[b, k, i, j] > 0) / (H * W) for k in range(C)]
        for k in range(C):
            beta = math.log((C * EPS + sum(Q)) / (EPS + Q[k])) if channel else 1.0
            out[b, k] = sum(S[i, j] * beta * x[b, k, i, j] for i in range(H) for j in range(W))
    return out


def np_gem(x: np.ndarray, p: float) -> np.ndarray:
    B, C, H, W = x.shape
    out = np.zeros((B, C))
    for b in range(B):
        for c in range(C):
            acc = 0.0
            for i in range(H):
                for j in range(W):
                    acc += max(float(x[b, c, i, j]), EPS) ** p
            out[b, c] = (acc / (H * W)) ** (1 / p)
    return out


def tolias_regions(H: int, W: int, L: int) -> list[tuple[int, int, int]]:
    """Square regions (top, left, side) per Tolias et al.: side 2*min/(l+1), ~40% overlap."""
    w, long_side = min(H, W), max(H, W)
    best_m, best_err = 1, None
    for m in range(1, 7):  # 2..7 regions along the long side at the coarsest scale
        b = (long_side - w) / m
        err = abs((w * w - w * b) / (w * w) - 0.4)
        if best_err is None or err < best_err:
            best_m, best_err = m, err
    extra_h = best_m if H > W else 0
    extra_w = best_m if W > H else 0
    regions = []
    for l in range(1, L + 1):
        side = (2 * w) // (l + 1)
        if side == 0:
            continue
        nh, nw = l + extra_h, l + extra_w
        tops = [0] if nh == 1 else [math.floor(k * (H - side) / (nh - 1)) for k in range(nh)]
        lefts = [0] if nw == 1 else [math.floor(k * (W - side) / (nw - 1)) for k in range(nw)]
        for top in tops:
            for left in lefts:
                regions.append((top, left, side))
    return regions


def np_rmac(x: np.ndarray, L: int) -> np.ndarray:
    B, C, H, W = x.shape
    out = np.zeros((B, C))
    for b in range(B):
        for top, left, side in [(0, 0, None)] + tolias_regions(H, W, L):
            rows = range(H) if side is None else range(top, top + side)
            cols = range(W) if side is None else range(left, left + side)
            v = np.array([max(float(x[b, c, i, j]) for i in rows for j in cols) for c in range(C)])
            out[b] += v / (math.sqrt(sum(e * e for e in v)) + EPS)
    return out


def test_tolias_regions_match_hand_listing():
    # sanity check of the test's own reference against the hand listing above
    regs = tolias_regions(5, 7, 3)
    assert len(regs) == 20
    assert regs[:2] == [(0, 0, 5), (0, 2, 5)]
    assert sorted({r[0] for r in regs if r[2] == 2}) == [0, 1, 3]
    assert sorted({r[1] for r in regs if r[2] == 2}) == [0, 1, 3, 5]


# Shapes whose R-MAC step choice has no exact tie in the overlap criterion (e.g. 9x5 ties
# m=1 and m=2 at |overlap-0.4| = 0.2, and the widely used implementation settles that by its
# float32 rounding).  4x20 picks m=6 and 3x8 picks m=3 extra regions on the long side.
SHAPES = [(2, 5, 7, 9), (1, 4, 6, 6), (2, 3, 10, 6), (1, 3, 1, 5), (1, 3, 13, 10), (1, 2, 4, 20), (1, 2, 3, 8)]


@pytest.mark.parametrize("shape", SHAPES)
def test_random_vs_numpy_references(shape):
    x = relu_randn(shape, seed=sum(shape), zero_channel=1)
    assert (x == 0).any()
    xn = x.double().numpy()
    check(get_pooling("sum")(x), [[float(xn[b, c].sum()) for c in range(shape[1])] for b in range(shape[0])])
    check(get_pooling("mac")(x), [[float(xn[b, c].max()) for c in range(shape[1])] for b in range(shape[0])])
    check(get_pooling("spoc")(x), np_spoc(xn))
    check(get_pooling("spoc-s0.667")(x), np_spoc(xn, 0.667))
    check(get_pooling("crow")(x), np_crow(xn))
    check(get_pooling("crow-sw")(x), np_crow(xn, channel=False))
    check(get_pooling("crow-ssw")(x), np_crow(xn, spatial=False))
    check(get_pooling("gem-p3")(x), np_gem(xn, 3.0))
    check(get_pooling("gem-p2.5")(x), np_gem(xn, 2.5))
    check(get_pooling("gem-p1")(x), np_gem(xn, 1.0))
    for L in (1, 2, 3):
        check(get_pooling(f"rmac-l{L}")(x), np_rmac(xn, L))


def test_mac2x2_random_vs_loops():
    for shape in [(2, 3, 7, 9), (1, 2, 6, 4), (1, 2, 1, 1)]:
        x = relu_randn(shape, seed=7)
        xn = x.numpy()
        B, C, H, W = shape
        halves_h = [range(0, (H + 1) // 2), range(H // 2, H)]
        halves_w = [range(0, (W + 1) // 2), range(W // 2, W)]
        exp = np.zeros((B, 4 * C))
        for b in range(B):
            q = 0
            for rows in halves_h:
                for cols in halves_w:
                    for c in range(C):
                        exp[b, q * C + c] = max(xn[b, c, i, j] for i in rows for j in cols)
                    q += 1
        check(get_pooling("mac2x2")(x), exp)


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("name", ALL_NAMES)
def test_batch_consistency_and_dims(name):
    x = relu_randn((3, 6, 7, 10), seed=3, zero_channel=2)
    fn = get_pooling(name)
    y = fn(x)
    assert y.shape == (3, pooled_dim(name, 6))
    assert y.dtype == torch.float32
    for i in range(3):
        np.testing.assert_allclose(y[i].numpy(), fn(x[i : i + 1])[0].numpy(), rtol=1e-6, atol=1e-7)


def test_pooled_dim():
    assert pooled_dim("mac2x2", 512) == 2048
    assert pooled_dim("MAC2X2", 3) == 12
    for name in ("sum", "spoc", "mac", "crow", "crow-sw", "crow-ssw", "gem-p3", "rmac-l3", "gem-p2.5"):
        assert pooled_dim(name, 512) == 512
    with pytest.raises(ValueError):
        pooled_dim("nope", 4)


def test_registry_order_and_defaults():
    assert DEFAULT_POOLINGS == (
        "sum", "spoc", "mac", "mac2x2", "crow", "crow-sw", "crow-ssw", "gem-p3", "rmac-l3",
    )
    assert tuple(POOLINGS) == DEFAULT_POOLINGS
    for name in DEFAULT_POOLINGS:
        assert get_pooling(name) is POOLINGS[name]
        assert canonical_pooling_name(name) == name


@pytest.mark.parametrize(
    "given,canon",
    [
        ("gem-p3.0", "gem-p3"),
        ("GEM-P3", "gem-p3"),
        ("gem-p2.50", "gem-p2.5"),
        (" Sum ", "sum"),
        ("rmac-l03", "rmac-l3"),
        ("rmac-l2", "rmac-l2"),
        ("spoc-s0.5", "spoc-s0.5"),
        ("SPOC-S0.667", "spoc-s0.667"),
        ("CroW-SSW", "crow-ssw"),
    ],
)
def test_canonical_names(given, canon):
    assert canonical_pooling_name(given) == canon


def test_parametrised_entries_use_their_parameter():
    x = relu_randn((1, 3, 4, 5), seed=11)
    xn = x.double().numpy()
    check(get_pooling("gem-p3.0")(x), np_gem(xn, 3.0))
    check(get_pooling("GEM-P2.5")(x), np_gem(xn, 2.5))
    check(get_pooling("spoc-s0.5")(x), np_spoc(xn, 0.5))
    check(get_pooling("rmac-l2")(x), np_rmac(xn, 2))


@pytest.mark.parametrize(
    "bad",
    ["", "foo", "gem-p", "gem-pabc", "gem-p0", "gem-p-1", "gem-pnan", "gem-pinf",
     "rmac-l0", "rmac-l2.5", "rmac-lx", "spoc-s0", "spoc-s-1", "mac3x3", "crow-xx"],
)
def test_unknown_names_raise(bad):
    with pytest.raises(ValueError):
        get_pooling(bad)


def test_bare_family_names_alias_defaults():
    assert canonical_pooling_name("gem") == "gem-p3"
    assert canonical_pooling_name("rmac") == "rmac-l3"
    assert get_pooling("gem") is POOLINGS["gem-p3"]
    assert canonical_pooling_name("spoc-s0.3333333333333333") == "spoc"


def test_unknown_message_lists_valid_names():
    with pytest.raises(ValueError) as info:
        get_pooling("foo")
    msg = str(info.value)
    for name in DEFAULT_POOLINGS:
        assert name in msg
    assert "foo" in msg


def test_pool_all_equals_individual():
    x = relu_randn((2, 5, 7, 8), seed=5, zero_channel=0)
    names = list(ALL_NAMES) + ["GEM-P3.0", "rmac"]
    res = pool_all(x, names)
    assert list(res) == names
    for name in names:
        assert torch.equal(res[name], get_pooling(name)(x)), name


def test_pool_all_validates_names():
    with pytest.raises(ValueError):
        pool_all(torch.zeros(1, 2, 3, 3), ["sum", "bogus"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_input_gives_float32(dtype):
    x = relu_randn((2, 4, 5, 6), seed=9).to(dtype)
    ref = x.float()
    for name in ALL_NAMES:
        y = get_pooling(name)(x)
        assert y.dtype == torch.float32, name
        np.testing.assert_allclose(y.numpy(), get_pooling(name)(ref).numpy(), rtol=1e-6, atol=1e-6)
    for name, y in pool_all(x, ALL_NAMES).items():
        assert y.dtype == torch.float32, name


def test_all_zero_map_gives_no_nan():
    x = torch.zeros(2, 4, 5, 6)
    for name in ALL_NAMES:
        y = get_pooling(name)(x)
        assert torch.isfinite(y).all(), name
        if name.startswith("gem"):
            check(y, np.full((2, 4), EPS))  # (mean eps^p)^(1/p) = eps
        else:
            check(y, np.zeros((2, pooled_dim(name, 4))))


def test_signed_input_does_not_crash():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 5, 6, generator=g)
    for name in ALL_NAMES:
        y = get_pooling(name)(x)
        assert y.shape == (2, pooled_dim(name, 4))
        assert torch.isfinite(y).all(), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    x = relu_randn((2, 8, 9, 7), seed=13, zero_channel=3)
    xc = x.cuda().half()
    for name in ALL_NAMES:
        y = get_pooling(name)(xc)
        assert y.device == xc.device and y.dtype == torch.float32
        np.testing.assert_allclose(y.cpu().numpy(), get_pooling(name)(x.half()).numpy(), rtol=1e-5, atol=1e-5)
