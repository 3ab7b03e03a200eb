"""`imgdb fit codebook`: fit a codebook model on stored local features; a new model version.

Local features are sampled uniformly (seeded) from every usable image, prepared (L2 for VLAD,
local PCA + L2), and handed to the method's fit (k-means, whitened T-emb, GMM); the rotation
(Hoang sec.4.4) is learned on the aggregated training vectors. The model records what it was
fitted on (store, content hash, image and feature counts, held-out or not).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import InvalidRequest, UserError, refuse
from ..store import LocalInfo, ModelInfo, StoreView, StoreWriter, open_read
from .encoder import AGGREGATES, Encoder, method
from .tensors import l2_normalize
from .training import (HOANG_TABLE2, HOANG_TABLE4, HOANG_TEMB_DROP, NG_VLAD, LocalPCA,
                       fit_rotation)

#: Named settings from the papers: method, codebook size k, local PCA d (None: no local PCA).
PRESETS: dict[str, tuple[str, int, int | None]] = {
    "ng": ("vlad", NG_VLAD["k"], None),  # Ng et al. sec. 3.3: k=100, then PCA-whiten to 128
    **{f"hoang-{dim}": ("temb", k, d) for dim, (d, k) in HOANG_TABLE4.items()},
    "hoang-vlad": ("vlad", HOANG_TABLE2["vlad"][1], HOANG_TABLE2["vlad"][0]),
    "hoang-fv": ("fv", HOANG_TABLE2["fv"][1], HOANG_TABLE2["fv"][0]),
    # Perronnin et al. 2010's improved FV (power + L2, no rotation) at Hoang Table 2's size
    "improved-fv": ("fv", HOANG_TABLE2["fv"][1], HOANG_TABLE2["fv"][0]),
}
DEFAULT_PRESET = {"vlad": "ng", "temb": "hoang-1024", "fv": "improved-fv"}
#: Post-processing per preset: (power, rotation learned on the training aggregates, components
#: dropped first, components kept after that (None: all)). Ng sec.3.3: VLAD -> PCA-whitening to
#: 128-D; Hoang sec.4.4: power 0.5 -> whitening rotation -> drop 128 (T-emb) -> L2.
POST: dict[str, tuple[float | None, bool, int, int | None]] = {
    "ng": (None, True, 0, NG_VLAD["pca_dims"]),
    **{f"hoang-{dim}": (0.5, True, HOANG_TEMB_DROP, None) for dim in HOANG_TABLE4},
    "hoang-vlad": (0.5, True, 0, None),
    "hoang-fv": (0.5, True, 0, None),
    "improved-fv": (0.5, False, 0, None),
}

#: Whitening of the rotation never amplifies a direction more than 100x the first one
#: (eigenvalues floored at 1e-4 of the largest; see training.fit_rotation).
ROTATION_FLOOR = 1e-4
#: The rotation is learned on at most this many training images (a seeded sample): memory.
ROTATION_MAX_IMAGES = 10_000


@dataclass
class CodebookOptions:
    """What `imgdb fit codebook` was asked for (None: the preset's value)."""

    method: str = "temb"
    preset: str | None = None
    k: int | None = None
    pca_d: int | None = None
    max_features: int = 100_000
    power: float | None = None
    rotate: bool | None = None
    drop: int | None = None
    dims: int | None = None
    seed: int = 0
    device: str = "auto"


def resolve_options(o: CodebookOptions) -> dict:
    """The full setting of a fit: preset filled in, checked. Returns plain attributes."""
    method(o.method)
    preset = o.preset or DEFAULT_PRESET[o.method]
    if preset not in PRESETS:
        raise InvalidRequest(f"unknown preset {preset!r}; use {', '.join(PRESETS)}")
    p_method, p_k, p_d = PRESETS[preset]
    if p_method != o.method:
        raise InvalidRequest(f"preset {preset} is a {p_method} setting, not {o.method}")
    power, rotate, drop, keep = POST[preset]
    rotate = rotate if o.rotate is None else o.rotate
    out = {
        "method": o.method, "preset": preset, "k": o.k or p_k,
        "pca_d": o.pca_d if o.pca_d is not None else (p_d or 0),
        "power": power if o.power is None else o.power,
        "rotate": rotate,
        "drop": (drop if rotate else 0) if o.drop is None else o.drop,
        "keep": ((keep or 0) if rotate else 0) if o.dims is None else o.dims,
        "max_features": o.max_features, "seed": o.seed,
    }
    if (out["drop"] or out["keep"]) and not out["rotate"]:
        raise refuse("{drop} and {dims} apply to the rotation; they need {rotate}", "drop",
                     "dims", "rotate")
    if out["k"] < 1:
        raise InvalidRequest("must be at least 1", "k")
    return out


def sample_features(view: StoreView, info: LocalInfo, max_features: int, seed: int
                    ) -> tuple[np.ndarray, int, int]:
    """Up to ~`max_features` local features drawn uniformly (seeded) from every usable image,
    streamed. Returns (features float32 (N, C), images used, features available)."""
    rows = view.local_usable_rows(info)
    _, count = view.local_spans(info)
    total = int(count[rows].sum())
    if total == 0:
        raise UserError(f"{info.name} holds no local features to fit on")
    p = min(1.0, max_features / total)
    rng = np.random.default_rng(seed)
    parts = []
    for _, feats, _ in view.iter_local(info, rows):
        parts.append(feats if p >= 1 else feats[rng.random(len(feats)) < p])
    return np.concatenate(parts).astype(np.float32), len(rows), total


def plan_batches(spans: tuple[np.ndarray, np.ndarray], rows: Sequence[int],
                 max_features: int = 32768) -> list[list[int]]:
    """Rows grouped in storage order into batches of about `max_features` local features."""
    start, count = spans
    out: list[list[int]] = []
    current: list[int] = []
    size = 0
    for r in sorted((int(r) for r in rows), key=lambda r: start[r]):
        current.append(r)
        size += int(count[r])
        if size >= max_features:
            out.append(current)
            current, size = [], 0
    if current:
        out.append(current)
    return out


def local_batches(view: StoreView, info: LocalInfo, rows: Sequence[int]
                  ) -> Iterator[tuple[list[int], list[np.ndarray]]]:
    """(rows, local feature sets) in batches of ~32k features (see plan_batches)."""
    for batch in plan_batches(view.local_spans(info), rows):
        got = [(r, feats) for r, feats, _ in view.iter_local(info, batch)]
        yield [r for r, _ in got], [f for _, f in got]


def _check_rotation_images(n: int, opts: dict) -> None:
    """The rotation is learned on the training images' aggregates: refuse too few of them."""
    if n <= 2 * opts["drop"]:
        raise UserError(f"the rotation is learned on {n} images, too few to drop "
                        f"{opts['drop']} components (their vectors would be all noise); "
                        f"fit on a bigger store with {{from}}, or lower {{drop}} (need "
                        f"images > 2 x drop), or {{no_rotate}}",
                        mentions=("from", "drop", "no_rotate"))
    if opts["keep"] and n <= opts["drop"] + opts["keep"]:
        raise UserError(f"the rotation is learned on {n} images, too few to whiten "
                        f"{opts['drop'] + opts['keep']} components; fit on a bigger store with "
                        f"{{from}}, or lower {{dims}}, or {{no_rotate}}",
                        mentions=("from", "dims", "no_rotate"))


def _fit_arrays(x: np.ndarray, opts: dict, name: str, device) -> dict[str, np.ndarray]:
    """Local PCA (optional) and the method's own fit, on prepared training features."""
    arrays: dict[str, np.ndarray] = {}
    m = method(opts["method"])
    if m.l2_input:
        x = l2_normalize(x)
    if opts["pca_d"]:
        if opts["pca_d"] > x.shape[1]:
            raise UserError(f"{opts['pca_d']} exceeds the {x.shape[1]} channels of {name}",
                            "pca_d")
        lpca = LocalPCA(opts["pca_d"]).fit(x)
        arrays["pca_mean"], arrays["pca_components"] = lpca.mean, lpca.components
        x = lpca.transform(x)
    if len(x) < opts["k"]:
        raise UserError(f"cannot fit {opts['k']} words on {len(x)} local features; use a "
                        f"smaller {{k}} or more images", mentions=("k",))
    arrays.update(m.fit(x, opts["k"], opts["seed"], device))
    return arrays


def _fit_rotations(view: StoreView, info: LocalInfo, arrays: dict, attrs: dict, opts: dict,
                   device, log) -> None:
    """Hoang sec.4.4: a rotation per aggregation, learned on aggregated training vectors."""
    rows = view.local_usable_rows(info)
    if len(rows) > ROTATION_MAX_IMAGES:  # bounded memory: a seeded sample of images
        rng = np.random.default_rng(opts["seed"])
        rows = np.sort(rng.choice(rows, ROTATION_MAX_IMAGES, replace=False))
    for aggregate in AGGREGATES:
        encoder = Encoder(arrays, {**attrs, "rotate": 0, "drop": 0}, aggregate, power=None,
                          device=device)
        agg = np.concatenate([encoder.aggregate_sets(sets)
                              for _, sets in local_batches(view, info, rows)])
        dims = opts["drop"] + opts["keep"] if opts["keep"] else None
        if dims and dims > agg.shape[1]:
            raise UserError(f"{opts['keep']} (+ {{drop}} {opts['drop']}) exceeds the "
                            f"{agg.shape[1]} dimensions of the aggregated vectors", "dims",
                            mentions=("drop",))
        if log and aggregate == AGGREGATES[0] and len(rows) < (dims or agg.shape[1]):
            log(f"note: the rotation whitens {dims or agg.shape[1]} dimensions learned on "
                f"{len(rows)} images; the directions the images do not span get the "
                f"smallest eigenvalue (as the authors' code); Hoang learns it on "
                f"thousands of held-out images (--from)")
        rot = fit_rotation(agg, whiten=True, power=opts["power"], dims=dims,
                           rel_floor=ROTATION_FLOOR)
        for key in ("mean", "projection", "eigenvalues"):
            arrays[f"rotation_{aggregate}_{key}"] = rot[key]


def fit_codebook(db: Path, local: str, options: CodebookOptions, source: Path | None = None,
                 log=None) -> ModelInfo:
    """Fit a codebook on this store's (or `source`'s) local features; save it as a new version."""
    import sklearn
    import torch

    from .. import __version__
    from ..features.extract import resolve_device

    started = time.perf_counter()
    opts = resolve_options(options)
    device = resolve_device(options.device)
    db = Path(db)
    src = Path(source) if source else db
    with open_read(db) as view:
        name = view.local(local).name
    with open_read(src) as view:
        try:
            info = view.local(name)
        except UserError:
            raise UserError(f"{src} has no local features {name}; ingest it with the same "
                            f"settings and {{keep_local}} {name.split('/', 1)[1]}",
                            mentions=("keep_local",)) from None
        if opts["rotate"]:  # before the costly fit: can these images support the rotation?
            _check_rotation_images(len(view.local_usable_rows(info)), opts)
        x, n_images, available = sample_features(view, info, opts["max_features"], opts["seed"])
        src_hash = view.content_hash(info.extractor)
        if log:
            log(f"fitting {opts['method']} on {len(x)} of {available} local features "
                f"({n_images} images of {src})")
        arrays = _fit_arrays(x, opts, name, device)
        attrs = {**opts, "power": float(opts["power"] or 0.0), "rotate": int(opts["rotate"]),
                 "local": name, "channels": info.channels, "fitted_on": str(src.resolve()),
                 "fitted_on_hash": src_hash, "held_out": int(src.resolve() != db.resolve()),
                 "image_count": n_images, "feature_count": int(len(x)),
                 "features_available": available, "imgdb": __version__,
                 "sklearn": sklearn.__version__, "torch": str(torch.__version__)}
        if opts["rotate"]:
            _fit_rotations(view, info, arrays, attrs, opts, device, log)
    attrs["dims"] = int(Encoder(arrays, attrs, "sum", device="cpu").dim)
    attrs["seconds"] = round(time.perf_counter() - started, 3)
    with StoreWriter(db, create=False) as writer:
        return writer.save_model("codebook", name, arrays, attrs)
