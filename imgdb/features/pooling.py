"""Training-free global poolings of CNN feature maps on torch, one function per family.

Every pooling maps a feature map ``x`` of shape (B, C, H, W) (any device, any floating dtype;
post-ReLU expected, any finite input accepted) to a float32 descriptor (B, D) on the same
device. A pooling is one function of a `FeatureMap` (which computes and shares the pieces
several poolings use: sums, maxima, quadrant maxima, CroW weights) plus one `register` line;
its name, parameter, default and formula are its row of the torch-free table
(`features.poolings`); names carry their parameter (``gem-p3``, ``rmac-l3``, ``spoc-s0.5``).

References: Babenko & Lempitsky 2015 (SPoC) sec. 3.2 eq. 3-4; Kalantidis et al. 2016 (CroW)
sec. 4 eq. 3-6; Comor et al. 2016 eq. 1-3; Radenovic et al. 2018 (GeM); Tolias et al. 2016
(R-MAC, ICLR).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

__all__ = [
    "POOLINGS", "DEFAULT_POOLINGS", "REGISTRY", "Pooling", "FeatureMap", "register",
    "unregister", "get_pooling", "pooled_dim", "canonical_pooling_name", "parse_pooling",
    "pool_all", "sum_pool", "spoc", "mac", "mac2x2", "crow", "crow_sw", "crow_ssw", "gem", "rmac",
    "crow_spatial_weights", "crow_channel_weights",
]

from . import poolings as table
from .pooling_np import (CROW_EPS, GEM_EPS, RMAC_EPS, RMAC_OVERLAP,  # noqa: F401
                         quadrant_bounds, rmac_regions, spoc_weights)
from .poolings import DEFAULT_POOLINGS, SPOC_DEFAULT_S, canonical_pooling_name, pooled_dim

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
    return torch.tensor(spoc_weights(h, w, s))


def _spoc_weights(h: int, w: int, s: float, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return _spoc_weights_cpu(h, w, float(s))
    return _spoc_weights_on(h, w, float(s), device)


@functools.lru_cache(maxsize=256)
def _spoc_weights_on(h: int, w: int, s: float, device: torch.device) -> torch.Tensor:
    """The weights on an accelerator, copied once per shape (a copy from pageable host memory
    would wait for the device on every batch)."""
    return _spoc_weights_cpu(h, w, s).to(device)


def _quadrant_macs(x: torch.Tensor) -> list[torch.Tensor]:
    """MAC of TL, TR, BL, BR quadrants (each (B, C))."""
    return [_spatial_max(x[:, :, r0:r1, c0:c1]) for r0, r1, c0, c1 in quadrant_bounds(*x.shape[-2:])]


def crow_spatial_weights(x: torch.Tensor) -> torch.Tensor:
    """Kalantidis eq. 3-4 with a=2, b=2: S = (S' / ||S'||_2)^(1/2), shape (B, 1, H, W)."""
    sp = x.sum(dim=1, keepdim=True)  # S' (B,1,H,W), eq. 3
    norm = torch.linalg.vector_norm(sp.flatten(1), ord=2, dim=1).view(-1, 1, 1, 1)
    norm = norm.masked_fill(norm == 0, 1.0)  # ||S'|| == 0  =>  S' == 0  =>  S == 0
    # clamp only matters for non post-ReLU input (negative spatial mass gets weight 0)
    return (sp / norm).clamp(min=0).sqrt()


def crow_channel_weights(x: torch.Tensor) -> torch.Tensor:
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


def _l2n(v: torch.Tensor, eps: float = RMAC_EPS) -> torch.Tensor:
    return v / (torch.linalg.vector_norm(v, ord=2, dim=1, keepdim=True) + eps)


def _rmac_from_mac(x: torch.Tensor, global_mac: torch.Tensor, levels: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    v = _l2n(global_mac)
    for top, left, side in rmac_regions(h, w, levels):  # shared with the numpy form
        v = v + _l2n(_spatial_max(x[:, :, top : top + side, left : left + side]))
    return v


# --------------------------------------------------------------------------- shared pieces


class FeatureMap:
    """A (B, C, H, W) map as float32 with the pieces poolings share, each computed once."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = _prep(x)

    @functools.cached_property
    def sum(self) -> torch.Tensor:
        return _spatial_sum(self.x)

    @functools.cached_property
    def max(self) -> torch.Tensor:
        return _spatial_max(self.x)

    @functools.cached_property
    def quadrant_maxima(self) -> list[torch.Tensor]:
        return _quadrant_macs(self.x)

    @functools.cached_property
    def crow_spatial(self) -> torch.Tensor:
        return crow_spatial_weights(self.x)

    @functools.cached_property
    def crow_channel(self) -> torch.Tensor:
        return crow_channel_weights(self.x)

    @functools.cached_property
    def crow_weighted_sum(self) -> torch.Tensor:
        return _crow_weighted_sum(self.x, self.crow_spatial)

    @functools.cached_property
    def clamped(self) -> torch.Tensor:
        return self.x.clamp(min=GEM_EPS)


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Pooling:
    """One pooling family's torch computation, `compute(map, param)`, with its name and
    parameter as the table (`features.poolings`) gives them; a user's own family declares them
    here and `register` adds them to the table."""

    family: str
    compute: Callable[[FeatureMap, float | int | None], torch.Tensor]
    letter: str | None = None
    default: float | int | None = None
    integer: bool = False
    show_default: bool = True
    dim_factor: int = 1
    doc: str = ""

    @classmethod
    def of(cls, family: str, compute: Callable) -> "Pooling":
        """A built-in family: its name, parameter and formula from the table."""
        s = table.SPECS[family]
        return cls(family, compute, s.letter, s.default, s.integer, s.show_default,
                   s.dim_factor, f"{s.formula} ({s.reference})")

    @property
    def spec(self) -> table.PoolingSpec:
        return table.SPECS[self.family]


REGISTRY: dict[str, Pooling] = {}


_FUNCTIONS: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {}


def _function(canonical: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function of a canonical name, made once (its family's re-registration drops it)."""
    found = _FUNCTIONS.get(canonical)
    if found is None:
        pooling = parse_pooling(canonical)[0]
        found = _FUNCTIONS[canonical] = (pooling.family, _make_function(canonical))
    return found[1]


def _forget(family: str) -> None:
    for name in [n for n, (f, _) in _FUNCTIONS.items() if f == family]:
        del _FUNCTIONS[name]


def _make_function(canonical: str) -> Callable[[torch.Tensor], torch.Tensor]:
    pooling, param = parse_pooling(canonical)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return pooling.compute(FeatureMap(x), param)

    fn.__name__ = fn.__qualname__ = canonical.replace("-", "_").replace(".", "_")
    fn.__doc__ = f"Pooling {canonical!r}: {pooling.doc}."
    return fn


def register(pooling: Pooling) -> Pooling:
    """Add a pooling family (its default-parameter name becomes usable everywhere)."""
    if pooling.family not in table.SPECS or table.SPECS[pooling.family] not in table.TABLE:
        table.add(table.PoolingSpec(pooling.family, pooling.doc, "", pooling.letter,
                                    pooling.default, pooling.integer, pooling.show_default,
                                    pooling.dim_factor, in_defaults=False))
    REGISTRY[pooling.family] = pooling
    _forget(pooling.family)
    return pooling


def unregister(family: str) -> None:
    """Remove a family a user registered (the built-ins stay)."""
    if family in REGISTRY and table.SPECS.get(family) not in table.TABLE:
        REGISTRY.pop(family)
        table.remove(family)
        _forget(family)


register(Pooling.of("sum", lambda m, _: m.sum))
register(Pooling.of("spoc", lambda m, s: (m.x * _spoc_weights(m.x.shape[2], m.x.shape[3], s,
                                                                m.x.device)).sum(dim=(2, 3))))
register(Pooling.of("mac", lambda m, _: m.max))
register(Pooling.of("mac2x2", lambda m, _: torch.cat(m.quadrant_maxima, dim=1)))
register(Pooling.of("crow", lambda m, _: m.crow_channel * m.crow_weighted_sum))
register(Pooling.of("crow-sw", lambda m, _: m.crow_weighted_sum))
register(Pooling.of("crow-ssw", lambda m, _: m.crow_channel * m.sum))
register(Pooling.of("gem", lambda m, p: _gem_from_clamped(m.clamped, p)))
register(Pooling.of("rmac", lambda m, n: _rmac_from_mac(m.x, m.max, n)))


def parse_pooling(name: str) -> tuple[Pooling, float | int | None]:
    """(family, parameter) of a pooling name, by the table's parser; ValueError naming the
    valid forms (or a family without a torch computation)."""
    spec, param = table.parse_pooling(name)
    if spec.family not in REGISTRY:
        raise ValueError(f"pooling {spec.family!r} has no torch computation")
    return REGISTRY[spec.family], param


def get_pooling(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The pooling function of a (possibly parametrised) name."""
    return _function(canonical_pooling_name(name))


#: The default poolings by name (name -> function of a (B, C, H, W) map).
POOLINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {n: get_pooling(n)
                                                                 for n in DEFAULT_POOLINGS}


def pool_all(x: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Several poolings of one map at once, sharing sums, maxima and CroW weights; keys are
    the names as given, and each value equals get_pooling(name)(x)."""
    names = list(names)
    parsed = [(n, parse_pooling(n)) for n in names]  # validate before any work
    fmap = FeatureMap(x)
    done: dict[tuple[str, float | int | None], torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for given, (pooling, param) in parsed:
        key = (pooling.family, param)
        if key not in done:
            done[key] = pooling.compute(fmap, param)
        out[given] = done[key]
    return out


# --------------------------------------------------------------------------- single functions


def sum_pool(x: torch.Tensor) -> torch.Tensor:
    """Sum pooling over H, W (Comor eq. 1; Kalantidis "uCroW")."""
    return POOLINGS["sum"](x)


def spoc(x: torch.Tensor, s: float = SPOC_DEFAULT_S) -> torch.Tensor:
    """SPoC: centred-Gaussian weighted sum, sigma = s * min(H, W) / 2 (Babenko eq. 3-4)."""
    return REGISTRY["spoc"].compute(FeatureMap(x), s)


def mac(x: torch.Tensor) -> torch.Tensor:
    """MAC: max over H, W (Comor eq. 2)."""
    return POOLINGS["mac"](x)


def mac2x2(x: torch.Tensor) -> torch.Tensor:
    """MAC of the four quadrants, [TL | TR | BL | BR], shape (B, 4C) (Comor eq. 3)."""
    return POOLINGS["mac2x2"](x)


def crow(x: torch.Tensor) -> torch.Tensor:
    """CroW: spatial (a=2, b=2) and sparsity channel weighting (Kalantidis eq. 1, 3-6)."""
    return POOLINGS["crow"](x)


def crow_sw(x: torch.Tensor) -> torch.Tensor:
    """CroW spatial weighting only, uCroW+SW (Kalantidis eq. 3-4, Fig. 5b)."""
    return POOLINGS["crow-sw"](x)


def crow_ssw(x: torch.Tensor) -> torch.Tensor:
    """CroW channel (sparsity-sensitive) weighting only, uCroW+SSW (Kalantidis eq. 6, Fig. 5b)."""
    return POOLINGS["crow-ssw"](x)


def gem(x: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """GeM: (mean_HW clamp(x, 1e-6)^p)^(1/p) (Radenovic et al. 2018, eq. 2)."""
    return REGISTRY["gem"].compute(FeatureMap(x), p)


def rmac(x: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """R-MAC: sum of L2-normalised regional MACs over L scales (Tolias et al. ICLR 2016)."""
    return REGISTRY["rmac"].compute(FeatureMap(x), levels)
