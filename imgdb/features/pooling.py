"""Training-free global poolings of CNN feature maps.

Every pooling is a pure function ``f(x) -> Tensor`` mapping a feature map
``x`` of shape (B, C, H, W) (any device, any floating dtype) to a float32
descriptor of shape (B, D) on the same device.  Computation is done in float32.
Feature maps are expected to be post-ReLU (non-negative) but any finite input
is accepted.

References (see DESIGN.md section 3):

* Babenko & Lempitsky 2015 (SPoC), sec. 3.2 eq. 3-4.
* Kalantidis et al. 2016 (CroW), sec. 4 eq. 3-6.
* Comor et al. 2016 (global pooling), eq. 1-3.
* Radenovic et al. 2018 (GeM); Tolias et al. 2016 (R-MAC, ICLR).

Names are public identifiers and carry their parameters: ``gem-p3``,
``rmac-l3``, ``spoc-s0.5``.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Callable, Iterable

import torch

__all__ = [
    "POOLINGS",
    "DEFAULT_POOLINGS",
    "get_pooling",
    "pooled_dim",
    "canonical_pooling_name",
    "pool_all",
    "sum_pool",
    "spoc",
    "mac",
    "mac2x2",
    "crow",
    "crow_sw",
    "crow_ssw",
    "gem",
    "rmac",
]

PoolFn = Callable[[torch.Tensor], torch.Tensor]

#: Default SPoC sigma factor: one third of the distance centre -> closest boundary.
SPOC_DEFAULT_S = 1.0 / 3.0
#: CroW epsilon of the channel (sparsity-sensitive) weight, Kalantidis eq. 6.
CROW_EPS = 1e-6
#: GeM clamp floor and R-MAC normalisation epsilon (cnnimageretrieval-pytorch defaults).
GEM_EPS = 1e-6
RMAC_EPS = 1e-6
RMAC_OVERLAP = 0.4


# --------------------------------------------------------------------------- helpers


def _prep(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"pooling expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"pooling expects a (B, C, H, W) feature map, got shape {tuple(x.shape)}")
    return x.float()


def _spatial_sum(x: torch.Tensor) -> torch.Tensor:
    return x.sum(dim=(2, 3))


def _spatial_max(x: torch.Tensor) -> torch.Tensor:
    return x.amax(dim=(2, 3))


@functools.lru_cache(maxsize=256)
def _spoc_weights_cpu(h: int, w: int, s: float) -> torch.Tensor:
    sigma = s * (min(h, w) / 2.0)
    y = torch.arange(h, dtype=torch.float64) - (h - 1) / 2.0
    xx = torch.arange(w, dtype=torch.float64) - (w - 1) / 2.0
    d2 = y[:, None] ** 2 + xx[None, :] ** 2
    return torch.exp(-d2 / (2.0 * sigma * sigma)).float()


def _spoc_weights(h: int, w: int, s: float, device: torch.device) -> torch.Tensor:
    return _spoc_weights_cpu(h, w, float(s)).to(device)


def _quadrant_macs(x: torch.Tensor) -> list[torch.Tensor]:
    """MAC of TL, TR, BL, BR quadrants (each (B, C))."""
    h, w = x.shape[-2:]
    top, bottom = (0, math.ceil(h / 2)), (h // 2, h)
    left, right = (0, math.ceil(w / 2)), (w // 2, w)
    out = []
    for r0, r1 in (top, bottom):
        for c0, c1 in (left, right):
            out.append(_spatial_max(x[:, :, r0:r1, c0:c1]))
    return out


def _crow_spatial(x: torch.Tensor) -> torch.Tensor:
    """Kalantidis eq. 3-4 with a=2, b=2: S = (S' / ||S'||_2)^(1/2), shape (B, 1, H, W)."""
    sp = x.sum(dim=1, keepdim=True)  # S' (B,1,H,W), eq. 3
    norm = torch.linalg.vector_norm(sp.flatten(1), ord=2, dim=1).view(-1, 1, 1, 1)
    norm = norm.masked_fill(norm == 0, 1.0)  # ||S'|| == 0  =>  S' == 0  =>  S == 0
    # clamp only matters for non post-ReLU input (negative spatial mass gets weight 0)
    return (sp / norm).clamp(min=0).sqrt()


def _crow_channel(x: torch.Tensor) -> torch.Tensor:
    """Kalantidis eq. 6: beta_k = log((K eps + sum_h Q_h) / (eps + Q_k)), shape (B, C)."""
    # With N_k = #{positions: X_k > 0} and Q_k = N_k / HW, the ratio equals
    # (K eps HW + sum_h N_h) / (eps HW + N_k).  Writing it as log1p of an exact integer
    # difference keeps float32 accurate when the ratio is ~1 (e.g. one active channel).
    k = x.shape[1]
    area = x.shape[2] * x.shape[3]
    counts = (x > 0).sum(dim=(2, 3))  # N_k, int64, exact
    others = (counts.sum(dim=1, keepdim=True) - counts).float()  # sum_{h != k} N_h
    eps_area = CROW_EPS * area
    return torch.log1p(((k - 1) * eps_area + others) / (eps_area + counts.float()))


def _crow_weighted_sum(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (x * s).sum(dim=(2, 3))


def _gem_from_clamped(xc: torch.Tensor, p: float) -> torch.Tensor:
    return xc.pow(p).mean(dim=(2, 3)).pow(1.0 / p)


@functools.lru_cache(maxsize=256)
def _rmac_regions(h: int, w: int, levels: int) -> tuple[tuple[int, int, int], ...]:
    """R-MAC regions (top, left, side) for an h x w map, Tolias et al. 2016.

    Follows cnnimageretrieval-pytorch ``rmac(x, L, eps)`` step by step, including its
    float32 arithmetic, so the selected regions are identical.
    """
    steps = torch.tensor([2, 3, 4, 5, 6, 7], dtype=torch.float32)
    short = min(w, h)
    b = (max(h, w) - short) / (steps - 1)
    idx = int(torch.argmin(torch.abs(((short**2 - short * b) / short**2) - RMAC_OVERLAP)))
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
        cen_w = torch.floor(wl2 + torch.arange(l + wd, dtype=torch.float32) * bw) - wl2
        bh = 0 if l + hd == 1 else (h - wl) / (l + hd - 1)
        cen_h = torch.floor(wl2 + torch.arange(l + hd, dtype=torch.float32) * bh) - wl2
        for i in cen_h.tolist():
            for j in cen_w.tolist():
                regions.append((int(i), int(j), wl))
    return tuple(regions)


def _l2n(v: torch.Tensor, eps: float = RMAC_EPS) -> torch.Tensor:
    return v / (torch.linalg.vector_norm(v, ord=2, dim=1, keepdim=True) + eps)


def _rmac_from_mac(x: torch.Tensor, global_mac: torch.Tensor, levels: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    v = _l2n(global_mac)
    for top, left, side in _rmac_regions(h, w, levels):
        v = v + _l2n(_spatial_max(x[:, :, top : top + side, left : left + side]))
    return v


# --------------------------------------------------------------------------- poolings


def sum_pool(x: torch.Tensor) -> torch.Tensor:
    """Sum pooling over H, W (Comor eq. 1; Kalantidis "uCroW")."""
    return _spatial_sum(_prep(x))


def spoc(x: torch.Tensor, s: float = SPOC_DEFAULT_S) -> torch.Tensor:
    """SPoC: centred-Gaussian weighted sum, sigma = s * min(H, W) / 2 (Babenko eq. 3-4)."""
    x = _prep(x)
    alpha = _spoc_weights(x.shape[2], x.shape[3], s, x.device)
    return (x * alpha).sum(dim=(2, 3))


def mac(x: torch.Tensor) -> torch.Tensor:
    """MAC: max over H, W (Comor eq. 2)."""
    return _spatial_max(_prep(x))


def mac2x2(x: torch.Tensor) -> torch.Tensor:
    """MAC of the four quadrants, [TL | TR | BL | BR], shape (B, 4C) (Comor eq. 3)."""
    return torch.cat(_quadrant_macs(_prep(x)), dim=1)


def crow(x: torch.Tensor) -> torch.Tensor:
    """CroW: spatial (a=2, b=2) and sparsity channel weighting (Kalantidis eq. 1, 3-6)."""
    x = _prep(x)
    return _crow_channel(x) * _crow_weighted_sum(x, _crow_spatial(x))


def crow_sw(x: torch.Tensor) -> torch.Tensor:
    """CroW spatial weighting only, uCroW+SW (Kalantidis eq. 3-4, Fig. 5b)."""
    x = _prep(x)
    return _crow_weighted_sum(x, _crow_spatial(x))


def crow_ssw(x: torch.Tensor) -> torch.Tensor:
    """CroW channel (sparsity-sensitive) weighting only, uCroW+SSW (Kalantidis eq. 6, Fig. 5b)."""
    x = _prep(x)
    return _crow_channel(x) * _spatial_sum(x)


def gem(x: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """GeM: (mean_HW clamp(x, 1e-6)^p)^(1/p) (Radenovic et al. 2018, eq. 2)."""
    return _gem_from_clamped(_prep(x).clamp(min=GEM_EPS), p)


def rmac(x: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """R-MAC: sum of L2-normalised regional MACs over L scales (Tolias et al. ICLR 2016, sec. 3)."""
    x = _prep(x)
    return _rmac_from_mac(x, _spatial_max(x), levels)


# --------------------------------------------------------------------------- registry


def _fmt_num(v: float) -> str:
    if math.isfinite(v) and v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


_PARAM_RE = re.compile(r"^(gem)-p(.+)$|^(spoc)-s(.+)$|^(rmac)-l(.+)$")


def _parse(name: str) -> tuple[str, float | int | None]:
    """Return (family, parameter) for a pooling name; raises ValueError when invalid."""
    if not isinstance(name, str):
        raise ValueError(_unknown_msg(name))
    key = name.strip().lower()
    if key in ("sum", "mac", "mac2x2", "crow", "crow-sw", "crow-ssw"):
        return key, None
    if key == "spoc":
        return "spoc", SPOC_DEFAULT_S
    if key == "gem":
        return "gem", 3.0
    if key == "rmac":
        return "rmac", 3
    m = _PARAM_RE.match(key)
    if m is None:
        raise ValueError(_unknown_msg(name))
    family = m.group(1) or m.group(3) or m.group(5)
    raw = m.group(2) or m.group(4) or m.group(6)
    if family == "rmac":
        try:
            val = float(raw)
        except ValueError:
            raise ValueError(_unknown_msg(name)) from None
        if not (math.isfinite(val) and val == int(val) and val >= 1):
            raise ValueError(f"Invalid pooling {name!r}: rmac-l<int> needs an integer number of levels >= 1.")
        return "rmac", int(val)
    try:
        val = float(raw)
    except ValueError:
        raise ValueError(_unknown_msg(name)) from None
    if not (math.isfinite(val) and val > 0):
        what = "exponent p" if family == "gem" else "sigma factor s"
        raise ValueError(f"Invalid pooling {name!r}: the {what} must be a finite number > 0.")
    return family, val


def _unknown_msg(name: object) -> str:
    return (
        f"Unknown pooling {name!r}; valid names are {', '.join(DEFAULT_POOLINGS)}"
        " and the parametrised forms gem-p<float>, rmac-l<int>, spoc-s<float>."
    )


def _canonical(family: str, param: float | int | None) -> str:
    if family == "gem":
        return f"gem-p{_fmt_num(param)}"
    if family == "rmac":
        return f"rmac-l{int(param)}"
    if family == "spoc":
        return "spoc" if param == SPOC_DEFAULT_S else f"spoc-s{_fmt_num(param)}"
    return family


def canonical_pooling_name(name: str) -> str:
    """Normalise a pooling name (case, numeric form), e.g. 'GEM-P3.0' -> 'gem-p3' (see POOLINGS)."""
    return _canonical(*_parse(name))


POOLINGS: dict[str, PoolFn] = {
    "sum": sum_pool,
    "spoc": spoc,
    "mac": mac,
    "mac2x2": mac2x2,
    "crow": crow,
    "crow-sw": crow_sw,
    "crow-ssw": crow_ssw,
    "gem-p3": gem,
    "rmac-l3": rmac,
}

DEFAULT_POOLINGS: tuple[str, ...] = tuple(POOLINGS)


@functools.lru_cache(maxsize=128)
def _build(canonical: str) -> PoolFn:
    family, param = _parse(canonical)
    if family == "gem":
        def fn(x: torch.Tensor) -> torch.Tensor:
            return gem(x, p=param)
    elif family == "rmac":
        def fn(x: torch.Tensor) -> torch.Tensor:
            return rmac(x, levels=param)
    elif family == "spoc":
        def fn(x: torch.Tensor) -> torch.Tensor:
            return spoc(x, s=param)
    else:  # pragma: no cover - every fixed name is in POOLINGS
        raise ValueError(_unknown_msg(canonical))
    fn.__name__ = fn.__qualname__ = canonical.replace("-", "_").replace(".", "_")
    fn.__doc__ = f"Pooling {canonical!r}."
    return fn


def get_pooling(name: str) -> PoolFn:
    """Return the pooling function for a (possibly parametrised) name (Babenko eq. 3, Comor eq. 1-3, Kalantidis eq. 1)."""
    canonical = canonical_pooling_name(name)
    if canonical in POOLINGS:
        return POOLINGS[canonical]
    return _build(canonical)


def pooled_dim(name: str, channels: int) -> int:
    """Descriptor length for a pooling of a C-channel map: 4C for mac2x2 (Comor eq. 3), else C."""
    return 4 * int(channels) if canonical_pooling_name(name) == "mac2x2" else int(channels)


def pool_all(x: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Compute several poolings of one map at once, sharing sums, maxima and CroW weights (Kalantidis eq. 3-6)."""
    # Result keys are the names exactly as given; each value equals get_pooling(name)(x)
    # because the shared pieces are computed by the same helpers as the single functions.
    names = list(names)
    parsed = [(n, canonical_pooling_name(n)) for n in names]  # validate before any work
    x = _prep(x)
    cache: dict[str, object] = {}

    def memo(key: str, make: Callable[[], object]):
        if key not in cache:
            cache[key] = make()
        return cache[key]

    quads = lambda: memo("quads", lambda: _quadrant_macs(x))  # noqa: E731
    gmax = lambda: memo("mac", lambda: _spatial_max(x))  # noqa: E731
    gsum = lambda: memo("sum", lambda: _spatial_sum(x))  # noqa: E731
    cs = lambda: memo("crow_s", lambda: _crow_spatial(x))  # noqa: E731
    cb = lambda: memo("crow_b", lambda: _crow_channel(x))  # noqa: E731
    csum = lambda: memo("crow_ws", lambda: _crow_weighted_sum(x, cs()))  # noqa: E731
    clamped = lambda: memo("gem_clamp", lambda: x.clamp(min=GEM_EPS))  # noqa: E731

    out: dict[str, torch.Tensor] = {}
    results: dict[str, torch.Tensor] = {}
    for given, canon in parsed:
        if canon not in results:
            family, param = _parse(canon)
            if family == "sum":
                r = gsum()
            elif family == "mac":
                r = gmax()
            elif family == "mac2x2":
                r = torch.cat(quads(), dim=1)
            elif family == "crow":
                r = cb() * csum()
            elif family == "crow-sw":
                r = csum()
            elif family == "crow-ssw":
                r = cb() * gsum()
            elif family == "gem":
                r = _gem_from_clamped(clamped(), param)
            elif family == "rmac":
                r = _rmac_from_mac(x, gmax(), param)
            elif family == "spoc":
                r = spoc(x, s=param)
            else:  # pragma: no cover
                raise ValueError(_unknown_msg(given))
            results[canon] = r
        out[given] = results[canon]
    return out
