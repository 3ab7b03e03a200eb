"""The built-in poolings on numpy arrays, for the paths that run without torch (a cold query).

Each function here computes what `features.pooling` computes on a torch tensor, from the same
formulas (the table `features.poolings`) and the same helpers (the SPoC weights and the R-MAC
regions are defined here once and used by both); tests/test_light.py checks every family
against the torch registry. A pooling registered only in `features.pooling` (a user's own) has
no numpy form: `numpy_pooling` returns None and the caller runs torch.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterable

import numpy as np

from .poolings import SPECS, SPOC_DEFAULT_S, TABLE, parse_pooling  # noqa: F401

#: CroW epsilon of the channel (sparsity-sensitive) weight, Kalantidis eq. 6.
CROW_EPS = 1e-6
#: GeM clamp floor and R-MAC normalisation epsilon (cnnimageretrieval-pytorch defaults).
GEM_EPS = 1e-6
RMAC_EPS = 1e-6
RMAC_OVERLAP = 0.4


@functools.lru_cache(maxsize=256)
def spoc_weights(h: int, w: int, s: float) -> np.ndarray:
    """(h, w) float32 centred Gaussian, sigma = s * min(h, w) / 2 (Babenko eq. 3-4)."""
    sigma = s * (min(h, w) / 2.0)
    y = np.arange(h, dtype=np.float64) - (h - 1) / 2.0
    x = np.arange(w, dtype=np.float64) - (w - 1) / 2.0
    d2 = y[:, None] ** 2 + x[None, :] ** 2
    out = np.exp(-d2 / (2.0 * sigma * sigma)).astype(np.float32)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=256)
def rmac_regions(h: int, w: int, levels: int) -> tuple[tuple[int, int, int], ...]:
    """R-MAC regions (top, left, side) for an h x w map, Tolias et al. 2016.

    Follows cnnimageretrieval-pytorch ``rmac(x, L, eps)`` step by step, including its float32
    arithmetic, so the selected regions are identical."""
    steps = np.array([2, 3, 4, 5, 6, 7], dtype=np.float32)
    short = min(w, h)
    b = np.float32(max(h, w) - short) / (steps - np.float32(1))
    idx = int(np.argmin(np.abs(((np.float32(short ** 2) - np.float32(short) * b)
                                / np.float32(short ** 2)) - np.float32(RMAC_OVERLAP))))
    wd = hd = 0
    if h < w:
        wd = idx + 1
    elif h > w:
        hd = idx + 1
    regions: list[tuple[int, int, int]] = []
    for l in range(1, levels + 1):
        wl = math.floor(2 * short / (l + 1))
        if wl == 0:
            continue
        wl2 = math.floor(wl / 2 - 1)
        bw = 0 if l + wd == 1 else (w - wl) / (l + wd - 1)
        cen_w = np.floor(np.float32(wl2) + np.arange(l + wd, dtype=np.float32) * np.float32(bw)) \
            - np.float32(wl2)
        bh = 0 if l + hd == 1 else (h - wl) / (l + hd - 1)
        cen_h = np.floor(np.float32(wl2) + np.arange(l + hd, dtype=np.float32) * np.float32(bh)) \
            - np.float32(wl2)
        for i in cen_h.tolist():
            for j in cen_w.tolist():
                regions.append((int(i), int(j), wl))
    return tuple(regions)


def quadrant_bounds(h: int, w: int) -> list[tuple[int, int, int, int]]:
    """(r0, r1, c0, c1) of the TL, TR, BL, BR quadrants (overlapping by a row/column when odd)."""
    rows = ((0, math.ceil(h / 2)), (h // 2, h))
    cols = ((0, math.ceil(w / 2)), (w // 2, w))
    return [(r0, r1, c0, c1) for r0, r1 in rows for c0, c1 in cols]


# --------------------------------------------------------------------------- the functions


def _crow_spatial(x: np.ndarray) -> np.ndarray:
    sp = x.sum(axis=1, keepdims=True)
    norm = np.sqrt((sp.reshape(len(sp), -1) ** 2).sum(axis=1)).reshape(-1, 1, 1, 1)
    norm = np.where(norm == 0, np.float32(1.0), norm)
    return np.sqrt(np.maximum(sp / norm, np.float32(0)))


def _crow_channel(x: np.ndarray) -> np.ndarray:
    k, area = x.shape[1], x.shape[2] * x.shape[3]
    counts = (x > 0).sum(axis=(2, 3))
    others = (counts.sum(axis=1, keepdims=True) - counts).astype(np.float32)
    eps_area = CROW_EPS * area
    return np.log1p(((k - 1) * eps_area + others) / (eps_area + counts.astype(np.float32)))


def _l2n(v: np.ndarray) -> np.ndarray:
    return v / (np.sqrt((v * v).sum(axis=1, keepdims=True)) + np.float32(RMAC_EPS))


def _rmac(x: np.ndarray, levels: int) -> np.ndarray:
    v = _l2n(x.max(axis=(2, 3)))
    for top, left, side in rmac_regions(x.shape[2], x.shape[3], levels):
        v = v + _l2n(x[:, :, top:top + side, left:left + side].max(axis=(2, 3)))
    return v


def _gem(x: np.ndarray, p: float) -> np.ndarray:
    return np.power(np.power(np.maximum(x, np.float32(GEM_EPS)), np.float32(p)).mean(axis=(2, 3)),
                    np.float32(1.0 / p))


def _spoc(x: np.ndarray, s: float) -> np.ndarray:
    return (x * spoc_weights(x.shape[2], x.shape[3], s)).sum(axis=(2, 3))


def _mac2x2(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x[:, :, r0:r1, c0:c1].max(axis=(2, 3))
                           for r0, r1, c0, c1 in quadrant_bounds(*x.shape[2:])], axis=1)


#: family -> numpy function of (map, parameter): every family of the table that has one
NUMPY: dict[str, Callable[[np.ndarray, float | int | None], np.ndarray]] = {
    "sum": lambda x, _: x.sum(axis=(2, 3)),
    "spoc": _spoc,
    "mac": lambda x, _: x.max(axis=(2, 3)),
    "mac2x2": lambda x, _: _mac2x2(x),
    "crow": lambda x, _: _crow_channel(x) * (x * _crow_spatial(x)).sum(axis=(2, 3)),
    "crow-sw": lambda x, _: (x * _crow_spatial(x)).sum(axis=(2, 3)),
    "crow-ssw": lambda x, _: _crow_channel(x) * x.sum(axis=(2, 3)),
    "gem": _gem,
    "rmac": lambda x, n: _rmac(x, int(n)),
}


def numpy_pooling(name: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """The numpy function of a canonical pooling name ((B, C, H, W) float32 -> (B, D) float32),
    or None when only torch has it (a user's own pooling) or the name is not canonical."""
    try:
        spec, param = parse_pooling(name)
    except ValueError:
        return None
    if spec.name(param) != name:
        return None
    fn = NUMPY.get(spec.family) if SPECS.get(spec.family) in TABLE else None
    if fn is None:
        return None
    return lambda x: fn(x, param)


def pool_all_np(x: np.ndarray, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Several poolings of one float32 (B, C, H, W) map; KeyError for a name without a numpy
    form (check with `numpy_pooling` first)."""
    x = np.asarray(x, dtype=np.float32)
    out = {}
    for name in names:
        fn = numpy_pooling(name)
        if fn is None:
            raise KeyError(name)
        out[name] = np.asarray(fn(x), dtype=np.float32)
    return out
