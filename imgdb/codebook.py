"""Codebook models on stored local features: fit (local PCA, k-means/GMM, T-emb whitening,
rotation) and encode (embed -> sum/democratic aggregation -> post-processing), batched on the
device. The maths lives in :mod:`imgdb.encoding`; this module moves data between it and the store.

An encoding is stored as an extractor of its own, `/descriptors/<extractor>+cb<N>-<aggregate>`,
with one dataset `<layer[:mask]>/<method>` and its own `computed` column, so `fit pca`,
`index build`, `query` and `eval` treat it like any pooling, and images ingested later are
simply not encoded yet (rerun `imgdb encode`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np
import torch

from . import encoding as enc
from .errors import UserError
from .models import ModelInfo, list_models, load_arrays, resolve_model, save_model
from .store import (STATUS_OK, LocalInfo, StoreError, StoreWriter, content_hash, image_count,
                    iter_local, local_spans, open_read, resolve_local, valid_mask)

METHODS = ("vlad", "temb", "fv")
AGGREGATES = ("sum", "democratic")

#: Named settings from the papers: method, codebook size k, local PCA d (None: no local PCA).
PRESETS: dict[str, tuple[str, int, int | None]] = {
    "ng": ("vlad", enc.NG_VLAD["k"], None),  # Ng et al. sec. 3.3: k=100, then PCA-whiten to 128
    **{f"hoang-{dim}": ("temb", k, d) for dim, (d, k) in enc.HOANG_TABLE4.items()},
    "hoang-vlad": ("vlad", enc.HOANG_TABLE2["vlad"][1], enc.HOANG_TABLE2["vlad"][0]),
    "hoang-fv": ("fv", enc.HOANG_TABLE2["fv"][1], enc.HOANG_TABLE2["fv"][0]),
    # Perronnin et al. 2010's improved FV (power + L2, no rotation) at Hoang Table 2's size
    "improved-fv": ("fv", enc.HOANG_TABLE2["fv"][1], enc.HOANG_TABLE2["fv"][0]),
}
DEFAULT_PRESET = {"vlad": "ng", "temb": "hoang-1024", "fv": "improved-fv"}
#: Post-processing per preset: (power, rotation learned on the training aggregates, components
#: dropped first, components kept after that (None: all)). Ng sec.3.3: VLAD -> PCA-whitening to
#: 128-D; Hoang sec.4.4: power 0.5 -> whitening rotation -> drop 128 (T-emb) -> L2.
POST: dict[str, tuple[float | None, bool, int, int | None]] = {
    "ng": (None, True, 0, enc.NG_VLAD["pca_dims"]),
    **{f"hoang-{dim}": (0.5, True, enc.HOANG_TEMB_DROP, None) for dim in enc.HOANG_TABLE4},
    "hoang-vlad": (0.5, True, 0, None),
    "hoang-fv": (0.5, True, 0, None),
    "improved-fv": (0.5, False, 0, None),
}


#: Whitening of the rotation never amplifies a direction more than 100x the first one
#: (eigenvalues floored at 1e-4 of the largest; see encoding.fit_rotation).
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
    if o.method not in METHODS:
        raise UserError(f"unknown method {o.method!r}; use {', '.join(METHODS)}")
    preset = o.preset or DEFAULT_PRESET[o.method]
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; use {', '.join(PRESETS)}")
    p_method, p_k, p_d = PRESETS[preset]
    if p_method != o.method:
        raise UserError(f"preset {preset} is a {p_method} setting, not {o.method}")
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
        raise UserError("--drop and --dims apply to the rotation; they need --rotate")
    if out["k"] < 1:
        raise UserError("--k must be at least 1")
    return out


# --------------------------------------------------------------------------------------------
# reading training features


def _usable_rows(fh: h5py.File, info: LocalInfo) -> np.ndarray:
    start, _ = local_spans(fh, info)
    return np.flatnonzero(valid_mask(fh, info.extractor) & (start >= 0))


def sample_features(fh: h5py.File, info: LocalInfo, max_features: int, seed: int
                    ) -> tuple[np.ndarray, int, int]:
    """Up to ~`max_features` local features drawn uniformly (seeded) from every usable image,
    streamed. Returns (features float32 (N, C), images used, features available)."""
    rows = _usable_rows(fh, info)
    _, count = local_spans(fh, info)
    total = int(count[rows].sum())
    if total == 0:
        raise UserError(f"{info.name} holds no local features to fit on")
    p = min(1.0, max_features / total)
    rng = np.random.default_rng(seed)
    parts = []
    for _, feats, _ in iter_local(fh, info, rows):
        parts.append(feats if p >= 1 else feats[rng.random(len(feats)) < p])
    return np.concatenate(parts).astype(np.float32), len(rows), total


# --------------------------------------------------------------------------------------------
# the encoder: local features of a batch of images -> aggregated vectors


class Encoder:
    """A fitted codebook ready to encode sets of local features on a device."""

    def __init__(self, arrays: dict[str, np.ndarray], attrs: dict, aggregate: str = "sum",
                 power: float | None | str = "model", device: str | torch.device = "cpu") -> None:
        if aggregate not in AGGREGATES:
            raise UserError(f"unknown aggregation {aggregate!r}; use {', '.join(AGGREGATES)}")
        self.attrs, self.aggregate = attrs, aggregate
        self.method = str(attrs["method"])
        self.device = torch.device(device)
        fit_power = float(attrs["power"]) or None
        self.power = fit_power if power == "model" else power
        self.rotation = None
        if int(attrs["rotate"]):
            if self.power != fit_power:
                raise UserError(f"the codebook's rotation was learned with power "
                                f"{fit_power or 'none'}; encode with that power or refit the "
                                f"codebook with --power")
            self.rotation = {n: arrays[f"rotation_{aggregate}_{n}"] for n in ("mean", "projection")}
        self.drop = int(attrs["drop"])

        def t(name: str) -> torch.Tensor:
            return torch.from_numpy(np.asarray(arrays[name], np.float32)).to(self.device)

        self.pca = (t("pca_mean"), t("pca_components")) if "pca_components" in arrays else None
        if self.method == "vlad":
            self.centroids = t("centroids")
        elif self.method == "temb":
            self.centroids, self.t_mean, self.t_proj = t("centroids"), t("temb_mean"), t("temb_projection")
        else:
            self.gmm = (t("gmm_weights"), t("gmm_means"), t("gmm_variances"))

    @property
    def raw_dim(self) -> int:
        """Dimension of an aggregate before post-processing."""
        if self.method == "vlad":
            return int(self.centroids.numel())
        if self.method == "temb":
            return int(self.t_proj.shape[0])
        return 2 * int(self.gmm[1].numel())

    @property
    def dim(self) -> int:
        """Dimension of a final vector: rotated components kept after the drop."""
        rows = self.rotation["projection"].shape[0] if self.rotation is not None else self.raw_dim
        return rows - self.drop

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Local features -> what the codebook was fitted on (Ng: L2; Hoang sec.4.1: PCA + L2)."""
        if self.method == "vlad":
            x = enc._l2_rows(x)
        if self.pca is not None:
            mean, comps = self.pca
            x = enc._l2_rows((x - mean) @ comps.T)
        return x

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "temb":
            return enc._l2_rows((enc.temb(x, self.centroids) - self.t_mean) @ self.t_proj.T)
        return enc.fv_embed(x, *self.gmm)

    def _vlad(self, x: torch.Tensor, seg: torch.Tensor, n_sets: int) -> torch.Tensor:
        """Sum (or democratic) of residuals per set and centroid, intra-normalised, L2."""
        k, d = self.centroids.shape
        assign = torch.cat([enc._nearest(x[i:i + 4096], self.centroids)
                            for i in range(0, len(x), 4096)]) if len(x) else \
            torch.zeros(0, dtype=torch.long, device=x.device)
        res = x - self.centroids[assign]
        if self.aggregate == "democratic":
            res = res * self._democratic_vlad(res, assign, seg, n_sets)[:, None]
        v = torch.zeros(n_sets * k, d, dtype=x.dtype, device=x.device)
        v.index_add_(0, seg * k + assign, res)
        v = enc._l2_rows(v.reshape(n_sets, k, d))
        return enc._l2_rows(v.reshape(n_sets, k * d))

    def _fv_sum(self, x: torch.Tensor, seg: torch.Tensor, n_sets: int) -> torch.Tensor:
        """Fisher vectors from the posteriors' zeroth, first and second moments per set: the
        same sums as averaging fv_embed, without the (N, 2kd) per-feature embeddings."""
        w, mu, var = self.gmm
        var = var.clamp_min(enc._EPS)
        inv = 1.0 / var
        quad = (x * x) @ inv.T - 2 * x @ (mu * inv).T + (mu * mu * inv).sum(1)  # (N, k)
        logp = torch.log(w.clamp_min(enc._EPS)) - 0.5 * (torch.log(2 * torch.pi * var).sum(1) + quad)
        gamma = torch.softmax(logp, dim=-1)
        k, d = mu.shape
        out = torch.zeros(n_sets, 2 * k * d, dtype=x.dtype, device=x.device)
        for s, idx in _segments(seg, n_sets):
            if not len(idx):
                continue
            g, xs = gamma[idx], x[idx]
            s0, s1, s2 = g.sum(0)[:, None], g.T @ xs, g.T @ (xs * xs)
            u = (s1 - s0 * mu) / var.sqrt() / w.sqrt()[:, None]
            v = ((s2 - 2 * mu * s1 + s0 * mu * mu) / var - s0) / (2 * w).sqrt()[:, None]
            out[s] = torch.cat([u.reshape(-1), v.reshape(-1)]) / len(idx)
        return out

    def _democratic_vlad(self, res, assign, seg, n_sets) -> torch.Tensor:
        # VLAD embeddings of two features are orthogonal unless they share a centroid, where
        # their product is that of the residuals: the Gram matrix without the (N, k*d) embedding
        lam = torch.ones(len(res), dtype=res.dtype, device=res.device)
        for s, idx in _segments(seg, n_sets):
            r, a = res[idx], assign[idx]
            g = ((r @ r.T) * (a[:, None] == a[None, :])).clamp_min(0)
            lam[idx] = enc.sinkhorn_weights(g)
        return lam

    def aggregate_sets(self, sets: Sequence[np.ndarray]) -> np.ndarray:
        """(N_i, C) local features per image -> (B, raw_dim) aggregates, one device pass."""
        n_sets = len(sets)
        x = torch.from_numpy(np.concatenate([np.asarray(s, np.float32) for s in sets])
                             if n_sets else np.zeros((0, 1), np.float32)).to(self.device)
        seg = torch.repeat_interleave(torch.arange(n_sets, device=self.device),
                                      torch.tensor([len(s) for s in sets], device=self.device))
        x = self._prepare(x)
        if self.method == "vlad":
            return self._vlad(x, seg, n_sets).cpu().numpy()
        if self.method == "fv" and self.aggregate == "sum":
            return self._fv_sum(x, seg, n_sets).cpu().numpy()
        out = torch.zeros(n_sets, self.raw_dim, dtype=x.dtype, device=self.device)
        for s, idx in _segments(seg, n_sets, chunked=self.aggregate == "sum"):
            phi = self._embed(x[idx])
            if self.aggregate == "democratic":
                phi = phi * enc.sinkhorn_weights((phi @ phi.T).clamp_min(0))[:, None]
            if s is None:  # a chunk of several sets: sum per set
                out.index_add_(0, seg[idx], phi)
            else:
                out[s] = phi.sum(dim=0)
        if self.method == "fv":  # Fisher vector = mean over the set (Sanchez et al.)
            counts = torch.bincount(seg, minlength=n_sets).clamp_min(1).to(out.dtype)
            out = out / counts[:, None]
        return out.cpu().numpy()

    def finish(self, agg: np.ndarray) -> np.ndarray:
        """Post-processing (Hoang sec.4.4): power-law, L2, rotation, drop the first, L2."""
        return enc.post_process(agg, self.rotation, power=self.power, drop_first=self.drop)

    def encode(self, sets: Sequence[np.ndarray]) -> np.ndarray:
        """Final vectors (B, dim) float32 of sets of local features."""
        return self.finish(self.aggregate_sets(sets))


def _segments(seg: torch.Tensor, n_sets: int, chunked: bool = False, chunk: int = 8192
              ) -> Iterator[tuple[int | None, torch.Tensor]]:
    """Index ranges of each set (set, idx); `chunked`: ranges of ~chunk rows, set None."""
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


# --------------------------------------------------------------------------------------------
# fitting


def fit_codebook(db: Path, local: str, options: CodebookOptions, source: Path | None = None,
                 log=None) -> ModelInfo:
    """Fit a codebook on this store's (or `source`'s) local features; save it as a new version."""
    import sklearn

    from . import __version__
    from .extract import resolve_device

    started = time.perf_counter()
    opts = resolve_options(options)
    device = resolve_device(options.device)
    src = Path(source) if source else Path(db)
    with open_read(db) as fh:
        name = resolve_local(fh, local).name
    with open_read(src) as fh:
        try:
            info = resolve_local(fh, name)
        except UserError:
            raise StoreError(f"{src} has no local features {name}; ingest it with the same "
                             f"settings and --keep-local {name.split('/', 1)[1]}") from None
        if opts["rotate"]:  # before the costly fit: can these images support the rotation?
            _check_rotation_images(len(_usable_rows(fh, info)), opts)
        x, n_images, available = sample_features(fh, info, opts["max_features"], opts["seed"])
        src_hash = content_hash(fh, info.extractor)
        if log:
            log(f"fitting {opts['method']} on {len(x)} of {available} local features "
                f"({n_images} images of {src})")
        arrays: dict[str, np.ndarray] = {}
        if opts["method"] == "vlad":
            x = enc._l2_np(x)
        if opts["pca_d"]:
            if opts["pca_d"] > x.shape[1]:
                raise UserError(f"--pca-d {opts['pca_d']} exceeds the {x.shape[1]} channels of {name}")
            lpca = enc.LocalPCA(opts["pca_d"]).fit(x)
            arrays["pca_mean"], arrays["pca_components"] = lpca.mean, lpca.components
            x = lpca.transform(x)
        if len(x) < opts["k"]:
            raise UserError(f"cannot fit {opts['k']} words on {len(x)} local features; use a "
                            f"smaller --k or more images")
        if opts["method"] == "vlad":
            arrays["centroids"] = enc.fit_kmeans(x, opts["k"], opts["seed"])
        elif opts["method"] == "temb":
            tm = enc.TembModel().fit(x, opts["k"], opts["seed"], device=device)
            arrays.update(centroids=tm.centroids, temb_mean=tm.mean, temb_projection=tm.projection,
                          temb_eigenvalues=tm.eigenvalues)
        else:
            w, m, v = enc.fit_gmm(x, opts["k"], opts["seed"])
            arrays.update(gmm_weights=w, gmm_means=m, gmm_variances=v)
        attrs = {**opts, "power": float(opts["power"] or 0.0), "rotate": int(opts["rotate"]),
                 "local": name, "channels": info.channels, "fitted_on": str(src.resolve()),
                 "fitted_on_hash": src_hash, "held_out": int(src.resolve() != Path(db).resolve()),
                 "image_count": n_images, "feature_count": int(len(x)),
                 "features_available": available, "imgdb": __version__,
                 "sklearn": sklearn.__version__, "torch": str(torch.__version__)}
        if opts["rotate"]:  # Hoang sec.4.4: learned on aggregated training vectors
            rows = _usable_rows(fh, info)
            if len(rows) > ROTATION_MAX_IMAGES:  # bounded memory: a seeded sample of images
                rng = np.random.default_rng(opts["seed"])
                rows = np.sort(rng.choice(rows, ROTATION_MAX_IMAGES, replace=False))
            for aggregate in AGGREGATES:
                encoder = Encoder(arrays, {**attrs, "rotate": 0, "drop": 0}, aggregate,
                                  power=None, device=device)
                agg = np.concatenate([encoder.aggregate_sets(sets)
                                      for _, sets in _batches(fh, info, rows)])
                dims = opts["drop"] + opts["keep"] if opts["keep"] else None
                if dims and dims > agg.shape[1]:
                    raise UserError(f"--dims {opts['keep']} (+ --drop {opts['drop']}) exceeds the "
                                    f"{agg.shape[1]} dimensions of the aggregated vectors")
                if log and aggregate == AGGREGATES[0] and len(rows) < (dims or agg.shape[1]):
                    log(f"note: the rotation whitens {dims or agg.shape[1]} dimensions learned on "
                        f"{len(rows)} images; the directions the images do not span get the "
                        f"smallest eigenvalue (as the authors' code); Hoang learns it on "
                        f"thousands of held-out images (--from)")
                rot = enc.fit_rotation(agg, whiten=True, power=opts["power"], dims=dims,
                                       rel_floor=ROTATION_FLOOR)
                for key in ("mean", "projection", "eigenvalues"):
                    arrays[f"rotation_{aggregate}_{key}"] = rot[key]
    attrs["dims"] = int(Encoder(arrays, attrs, "sum", device="cpu").dim)
    attrs["seconds"] = round(time.perf_counter() - started, 3)
    with StoreWriter(db, create=False) as writer:
        version = save_model(writer, "codebook", name, arrays, attrs)
        with writer.file() as fh:
            return resolve_model(fh, "codebook", name, version)


def _check_rotation_images(n: int, opts: dict) -> None:
    """The rotation is learned on the training images' aggregates: refuse too few of them."""
    if n <= 2 * opts["drop"]:
        raise UserError(f"the rotation is learned on {n} images, too few to drop "
                        f"{opts['drop']} components (their vectors would be all noise); "
                        f"fit on a bigger store with --from, or lower --drop (need "
                        f"images > 2 x drop), or --no-rotate")
    if opts["keep"] and n <= opts["drop"] + opts["keep"]:
        raise UserError(f"the rotation is learned on {n} images, too few to whiten "
                        f"{opts['drop'] + opts['keep']} components; fit on a bigger store with "
                        f"--from, or lower --dims, or --no-rotate")


def _batches(fh: h5py.File, info: LocalInfo, rows: Sequence[int]
             ) -> Iterator[tuple[list[int], list[np.ndarray]]]:
    """(rows, local feature sets) of an open store, in batches (see _plan_batches)."""
    for batch in _plan_batches(local_spans(fh, info), rows):
        got = [(r, feats) for r, feats, _ in iter_local(fh, info, batch)]
        yield [r for r, _ in got], [f for _, f in got]


def _plan_batches(spans: tuple[np.ndarray, np.ndarray], rows: Sequence[int],
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


# --------------------------------------------------------------------------------------------
# encoding a store


def find_codebook(fh: h5py.File, ref: str, local: str | None = None) -> ModelInfo:
    """`vN`, `latest`, or a full id `codebook/EXTRACTOR/KEY/vN`; `local` narrows `vN`."""
    if ref.startswith("codebook/"):
        desc, _, version = ref[len("codebook/"):].rpartition("/")
        return resolve_model(fh, "codebook", desc, version)
    models = list_models(fh, "codebook")
    if local:
        name = resolve_local(fh, local).name
        models = [m for m in models if m.descriptor == name]
    if not models:
        raise UserError("the store has no codebook; fit one with: imgdb fit codebook --db STORE "
                        "--local EXTRACTOR/LAYER[:MASK] --method vlad|temb|fv")
    if ref in ("latest", ""):
        return models[-1]
    version = ref if ref.startswith("v") else f"v{ref}"
    found = [m for m in models if m.version == version]
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError(f"no codebook {version}; stored: " + ", ".join(m.id for m in models))
    raise UserError(f"codebook {version} exists for several local features; pass --local or the "
                    f"full id: " + ", ".join(m.id for m in found))


def encoding_name(model: ModelInfo, aggregate: str, power: float | None) -> tuple[str, str, str]:
    """(extractor group, layer group, dataset) where an encoding is stored."""
    extractor, key = model.descriptor.split("/", 1)
    group = f"{extractor}+cb{model.version[1:]}-{aggregate}"
    default = float(model.attrs["power"]) or None
    if power != default:
        group += f"-p{power:g}" if power else "-pnone"
    return group, key, str(model.attrs["method"])


@dataclass
class EncodeSummary:
    descriptor: str
    encoded: int
    total: int
    dims: int
    seconds: float

    def line(self) -> str:
        rate = self.encoded / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.descriptor}: {self.encoded} images encoded ({self.total} in all), "
                f"{self.dims} dims, {self.seconds:.1f}s ({rate:.0f} images/s)")


def run_encode(db: Path, codebook: str, local: str | None = None, aggregate: str = "sum",
               power: float | None | str = "model", device: str = "auto",
               progress=None) -> EncodeSummary:
    """Encode every image with local features not yet encoded; store as a descriptor."""
    from .extract import resolve_device

    started = time.perf_counter()
    dev = resolve_device(device)
    with StoreWriter(db, create=False) as writer:
        with writer.file() as fh:
            model = find_codebook(fh, codebook, local)
            info = resolve_local(fh, model.descriptor)
            encoder = Encoder(load_arrays(fh, model), model.attrs, aggregate, power, dev)
            group, key, method = encoding_name(model, aggregate, encoder.power)
            settings = {"encoding": {"codebook": model.id, "local": model.descriptor,
                                     "extractor": info.extractor, "key": key, "method": method,
                                     "aggregate": aggregate, "power": encoder.power,
                                     "dims": encoder.dim}}
            _ensure_encoding(fh, group, settings, key, method, encoder.dim)
            n = image_count(fh)
            done = fh["descriptors"][group]["computed"][:n].astype(bool)
            rows = np.flatnonzero(np.isin(np.arange(n), _usable_rows(fh, info)) & ~done)
            spans = local_spans(fh, info)
        total = len(rows)
        if progress:
            progress(0, total)
        encoded = 0
        pending_rows: list[int] = []
        pending_vecs: list[np.ndarray] = []
        for batch in _plan_batches(spans, rows):
            # read, then close before writing: HDF5 refuses a second handle on an open file
            with open_read(db) as rfh:
                got = [(r, feats) for r, feats, _ in iter_local(rfh, info, batch)]
            pending_rows.extend(r for r, _ in got)
            pending_vecs.append(encoder.encode([f for _, f in got]))
            if len(pending_rows) >= 1024:
                encoded += _write(writer, group, key, method, pending_rows, pending_vecs)
                if progress:
                    progress(encoded, total)
        encoded += _write(writer, group, key, method, pending_rows, pending_vecs)
        if progress:
            progress(encoded, total)
        with writer.file() as fh:
            count = int(fh["descriptors"][group]["computed"][:image_count(fh)].sum())
    return EncodeSummary(f"{group}/{key}/{method}", encoded, count, encoder.dim,
                         time.perf_counter() - started)


def _ensure_encoding(fh: h5py.File, group: str, settings: dict, key: str, method: str,
                     dim: int) -> None:
    n = image_count(fh)
    g = fh["descriptors"].get(group)
    if g is None:
        g = fh["descriptors"].create_group(group)
        g.attrs["settings"] = json.dumps(settings, sort_keys=True)
        g.create_dataset("computed", shape=(n,), maxshape=(None,), dtype=np.uint8,
                         chunks=(4096,), fillvalue=0)
    lg = g.require_group(key)
    if method not in lg:
        rows = max(1, min(1024, (1 << 16) // (4 * dim)))
        lg.create_dataset(method, shape=(n, dim), maxshape=(None, dim), dtype=np.float32,
                          chunks=(rows, dim), fillvalue=np.nan)


def _write(writer: StoreWriter, group: str, key: str, method: str, rows: list[int],
           vecs: list[np.ndarray]) -> int:
    """Write encoded rows (vectors, then `computed`), bump the revision; clears the buffers."""
    if not rows:
        return 0
    order = np.argsort(rows)
    idx = np.asarray(rows)[order]
    data = np.concatenate(vecs)[order]
    with writer.file() as fh:
        g = fh["descriptors"][group]
        g[key][method][idx] = data
        g["computed"][idx] = 1
        g.attrs["revision"] = int(g.attrs.get("revision", 0)) + 1
    count = len(rows)
    rows.clear()
    vecs.clear()
    return count


# --------------------------------------------------------------------------------------------
# query images


def encoding_settings(settings: dict) -> dict | None:
    """The `encoding` part of an extractor's settings, or None for a network extractor."""
    return settings.get("encoding")


class EncodedDescriber:
    """Describes a new image for an encoded descriptor: extract its local features exactly as
    ingest kept them, then encode them with the same codebook and options."""

    def __init__(self, fh: h5py.File, encoding: dict, device: str = "auto") -> None:
        from .extract import resolve_device
        from .localfeat import parse_local_spec
        from .store import extractor_attrs

        self.base = extractor_attrs(fh, encoding["extractor"])
        desc, _, version = encoding["codebook"][len("codebook/"):].rpartition("/")
        model = resolve_model(fh, "codebook", desc, version)
        power = encoding["power"]
        self.device = resolve_device(device)
        self.encoder = Encoder(load_arrays(fh, model), model.attrs, encoding["aggregate"],
                               power, self.device)
        self.spec = parse_local_spec(encoding["key"])
        self._ext = None

    def load(self, path: Path, crop=None):
        """Decode a query image with the base extractor's size policy and scales."""
        from .images import load_query_image

        return load_query_image(path, self.base, crop)

    def describe(self, scaled_pixels: list[np.ndarray], region=None) -> np.ndarray:
        """Vector of one decoded image (`region`: fractional box of feature cells to keep)."""
        from .backbones import get_backbone, stored_weights
        from .extract import FeatureExtractor

        if self._ext is None:
            self._ext = FeatureExtractor(get_backbone(self.base["backbone"]),
                                         stored_weights(self.base), (), (), self.device,
                                         local=(self.spec,))
        local = self._ext.describe_local(scaled_pixels, region)[self.spec.key]
        return self.encoder.encode([local.features])[0]


__all__ = ["METHODS", "AGGREGATES", "PRESETS", "CodebookOptions", "Encoder", "fit_codebook",
           "run_encode", "find_codebook", "encoding_settings", "EncodedDescriber", "STATUS_OK"]
