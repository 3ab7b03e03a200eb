"""Explanation maps: where in an image a descriptor's weight, or a match, comes from.

Three maps, each a numpy array from `Explainer` (and PNG overlays from `overlay` / `heat_rgba`):

- `crow_map`: the CroW spatial weight S = (S'/||S'||)^1/2 of an image's feature map (Kalantidis
  et al. eq. 3-4, the maps of their Fig. 3), upsampled over the image;
- `occlusion_map`: a grey patch (the network's mean pixel, i.e. zero input) slides over the query;
  each position's drop of the query -> result similarity is spread over the pixels it hid
  (Comor et al.'s visualisation; Zeiler & Fergus' occlusion). The occluded copies are described
  in batches: one forward per batch on the device;
- `similarity_map`: per feature-map cell, its exact share of the query -> result similarity under
  the descriptor's pooling and post-processing (Babenko & Lempitsky Fig. 4 style). A pooled vector
  is a sum over cells of per-cell parts (sum/SPoC: the weighted features; CroW: with its spatial
  and channel weights held fixed; MAC/R-MAC: each channel from its arg-max cell; GeM: the x^p
  shares); each part goes through the same post-processing (power-law shares, L2 scale, PCA
  rotation and whitening, final L2 scale) and is dotted with the result's global descriptor. The
  cells then sum to the similarity exactly, up to the one term that belongs to no cell: minus
  the PCA mean's projection (`bias`; 0 without a model). Computed with one backward pass
  (gradient x input of the linearised pooling, exact by Euler's theorem for these poolings).

The maps are on the image as the network saw it (the decoded query, or a stored image decoded
again as ingest did), at the first scale of the extractor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import numpy as np

from ..errors import UserError

#: relative mismatch above which a pooling is refused for the similarity map (not a sum of cells)
SUM_TOLERANCE = 1e-3


@dataclass
class ExplanationMap:
    """One map: `grid` at its own resolution (feature-map cells, or occlusion patch positions),
    `pixels` (H, W) over the image as the network saw it, and numbers that explain it."""

    kind: str
    grid: np.ndarray
    pixels: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def signed(self) -> bool:
        return self.kind == "similarity"


def upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (h, w) map to (H, W) = `size` (cell centres at pixel centres)."""
    from PIL import Image

    h, w = size
    return np.asarray(Image.fromarray(np.asarray(grid, np.float32), mode="F")
                      .resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


class Explainer:
    """The maps of one descriptor (`EXTRACTOR/LAYER/POOLING`) under one post-processing."""

    def __init__(self, describer, layer: str, pooling: str, transform) -> None:
        self.describer = describer
        self.layer = layer
        self.pooling = pooling
        self.transform = transform

    @classmethod
    def for_descriptor(cls, view, descriptor: str, model: str | None, device: str = "auto",
                       describer=None) -> "Explainer":
        """Read the descriptor's extractor settings and post-processing model from a store."""
        from .describe import QueryDescriber
        from .pca import post_processor

        info = view.descriptor(descriptor)
        transform, _ = post_processor(view, info.name, model)
        describer = describer or QueryDescriber(view, info.extractor, None, device)
        layer = info.layer
        if describer.encoding is not None:  # a codebook encoding: its local layer
            layer = describer.encoding["key"].split(":")[0]
        return cls(describer, layer, info.pooling, transform)

    # -- helpers ---------------------------------------------------------------------------------
    def _maps(self, pixels: np.ndarray):
        import torch

        net = self.describer.network()
        return net.feature_maps(torch.from_numpy(np.ascontiguousarray(pixels))[None])[self.layer]

    def _raw(self, described: dict) -> np.ndarray:
        """This descriptor's raw vector in what the describer gave for an image."""
        if self.describer.encoding is not None:  # an encoding gives its one vector
            return np.asarray(next(iter(described.values())), np.float32)
        return np.asarray(described[(self.layer, self.pooling)], np.float32)

    def vector(self, image) -> np.ndarray:
        """The post-processed (unit) descriptor of a decoded image (the query path's
        describer)."""
        return self.transform.transform(self._raw(self.describer.describe(image))[None])[0]

    # -- CroW ------------------------------------------------------------------------------------
    def crow_map(self, image) -> ExplanationMap:
        """CroW spatial weights (Kalantidis eq. 3-4) of the image's feature map at this layer."""
        from ..features.pooling import crow_spatial_weights

        px = image.pixels[0]
        grid = crow_spatial_weights(self._maps(px).float())[0, 0].cpu().numpy().astype(np.float32)
        return ExplanationMap("crow", grid, upsample(grid, px.shape[:2]),
                              {"layer": self.layer, "cells": list(grid.shape)})

    # -- occlusion -------------------------------------------------------------------------------
    def occlusion_map(self, image, target: np.ndarray, patch: int | None = None,
                      stride: int | None = None, batch: int = 16,
                      max_positions: int | None = None,
                      cancelled: Callable[[], bool] | None = None) -> ExplanationMap:
        """Similarity drop to `target` (a post-processed unit vector) when a grey square of
        `patch` px (default a quarter of the short side) hides each part of the image, moved by
        `stride` px (default patch / 2); averaged over the patches covering each pixel. One
        forward per position: `max_positions` refuses more (before any work), `cancelled` is
        asked between batches (then the map is abandoned: `Cancelled`)."""
        scales = image.pixels
        h, w = scales[0].shape[:2]
        patch = int(patch or max(8, round(min(h, w) / 4)))
        stride = int(stride or max(1, patch // 2))
        if patch < 1 or stride < 1:
            raise UserError("the occlusion patch and stride must be at least 1 pixel")
        patch = min(patch, h, w)
        ys = _positions(h, patch, stride)
        xs = _positions(w, patch, stride)
        if max_positions is not None and len(ys) * len(xs) > max_positions:
            fit = _stride_for(h, w, patch, max_positions)
            raise UserError(f"an occlusion map of patch {patch} and stride {stride} on this "
                            f"{w}x{h} image takes {len(ys) * len(xs)} forwards; the limit is "
                            f"{max_positions} (a stride of {fit} or more fits)")
        fill = self._grey()
        target = np.asarray(target, np.float32)
        base = float(self.vector(image) @ target)
        boxes = [(y, x) for y in ys for x in xs]
        sims = np.zeros(len(boxes), np.float32)
        for start in range(0, len(boxes), max(1, int(batch))):
            if cancelled is not None and cancelled():
                raise Cancelled("the occlusion map was abandoned")
            chunk = boxes[start:start + batch]
            copies = []
            for y, x in chunk:
                occluded = []
                for px in scales:
                    sh, sw = px.shape[:2]
                    fy, fx = sh / h, sw / w
                    y0, y1 = int(round(y * fy)), int(round((y + patch) * fy))
                    x0, x1 = int(round(x * fx)), int(round((x + patch) * fx))
                    copy = px.copy()
                    copy[y0:y1, x0:x1] = fill
                    occluded.append(copy)
                copies.append(SimpleNamespace(pixels=occluded))
            raws = self.describer.describe_many(copies)
            vecs = self.transform.transform(np.stack([self._raw(r) for r in raws]))
            sims[start:start + len(chunk)] = vecs @ target
        drops = base - sims
        total = np.zeros((h, w), np.float64)
        count = np.zeros((h, w), np.float64)
        for (y, x), d in zip(boxes, drops):
            total[y:y + patch, x:x + patch] += d
            count[y:y + patch, x:x + patch] += 1
        pixels = (total / np.maximum(count, 1)).astype(np.float32)
        grid = drops.reshape(len(ys), len(xs))
        return ExplanationMap("occlusion", grid, pixels,
                              {"similarity": base, "patch": patch, "stride": stride,
                               "positions": len(boxes), "max_drop": float(drops.max()),
                               "layer": self.layer, "pooling": self.pooling})

    def _grey(self) -> np.ndarray:
        net = self.describer.network()
        mean = net.mean.reshape(-1).cpu().numpy()  # the preprocessing mean, in 0..255
        return np.clip(np.round(mean), 0, 255).astype(np.uint8)

    # -- similarity ------------------------------------------------------------------------------
    def similarity_map(self, image, target: np.ndarray) -> ExplanationMap:
        """Each feature-map cell's share of the similarity <post(v), target> (module docstring);
        `info` holds the similarity, the bias term and the sum of the cells."""
        import torch

        if self.describer.encoding is not None:
            raise UserError("similarity maps need a pooled descriptor; codebook encodings are "
                            "not a sum over feature-map cells (use the occlusion map)")
        from ..features.pooling import parse_pooling

        family, param = parse_pooling(self.pooling)
        maps = []
        for px in image.pixels:
            maps.append(self._maps(px).float().clone().detach().cpu().double().requires_grad_(True))
        with torch.enable_grad():
            parts = [_linear_pooling(family.family, param, x, family.compute)[0] for x in maps]
        raw = [p.detach().numpy() for p in parts]
        if len(raw) == 1:
            v, factors = raw[0], [1.0]
        else:  # several scales: the mean of the L2-normalised per-scale vectors (norms fixed)
            norms = [max(float(np.linalg.norm(r)), 1e-12) for r in raw]
            v = np.mean([r / n for r, n in zip(raw, norms)], axis=0)
            factors = [1.0 / (len(raw) * n) for n in norms]
        gradient, bias = _post_gradient(self.transform, v, np.asarray(target, np.float64))
        similarity = float(self.transform.transform(v[None].astype(np.float32))[0]
                           @ np.asarray(target, np.float32))
        grids = []
        for x, part, factor in zip(maps, parts, factors):
            scalar = (part * torch.from_numpy(gradient * factor)).sum()
            (grad,) = torch.autograd.grad(scalar, x)
            grids.append((x * grad).sum(dim=1)[0].detach().numpy())
        total = float(sum(g.sum() for g in grids))
        expected = float(gradient @ v)  # the linear part of the similarity
        if abs(total - expected) > SUM_TOLERANCE * max(1.0, abs(expected)):
            raise UserError(f"pooling {self.pooling} is not a sum over feature-map cells, so it "
                            f"has no exact similarity map; use the occlusion map")
        px = image.pixels[0]
        grid = grids[0].astype(np.float32)
        # spread each cell's share over its pixels (a density: upsampled, then rescaled so the
        # pixels sum to what the cells sum to); other scales are added on the same pixels
        pixels = np.zeros(px.shape[:2], np.float32)
        for g in grids:
            up = upsample(g.astype(np.float32), px.shape[:2])
            pixels += up * (float(g.sum()) / float(up.sum())) if abs(up.sum()) > 1e-12 else up
        return ExplanationMap("similarity", grid, pixels,
                              {"similarity": similarity, "bias": bias, "cells_sum": total,
                               "layer": self.layer, "pooling": self.pooling,
                               "cells": list(grid.shape), "scales": len(grids)})


class Cancelled(Exception):
    """A map whose caller stopped waiting for it (a client that went away)."""


def _stride_for(h: int, w: int, patch: int, positions: int) -> int:
    """The smallest stride whose occlusion grid on an h x w image has at most `positions`."""
    stride = 1
    while len(_positions(h, patch, stride)) * len(_positions(w, patch, stride)) > positions:
        stride += 1
    return stride


def _positions(size: int, patch: int, stride: int) -> list[int]:
    out = list(range(0, max(1, size - patch + 1), stride))
    if out[-1] + patch < size:
        out.append(size - patch)
    return out


def _linear_pooling(family: str, param, x, compute):
    """The pooled vector (D,) of a (1, C, h, w) map with its data-dependent weights held fixed
    (CroW's spatial and channel weights, R-MAC's region norms), so that it is positively
    homogeneous of degree 1 in x and gradient x input splits it over the cells."""
    import torch

    from ..features import pooling as P

    if family in ("crow", "crow-sw", "crow-ssw"):
        s = P.crow_spatial_weights(x.detach())
        beta = P.crow_channel_weights(x.detach())
        if family == "crow-ssw":
            return beta * x.sum(dim=(2, 3))
        weighted = (x * s).sum(dim=(2, 3))
        return beta * weighted if family == "crow" else weighted
    if family == "spoc":  # a plain tensor of the shared weights (cached ones are inference tensors)
        weights = torch.tensor(P.spoc_weights(x.shape[2], x.shape[3], float(param)),
                               device=x.device, dtype=x.dtype)
        return (x * weights).sum(dim=(2, 3))
    if family == "rmac":
        def part(region):
            m = region.amax(dim=(2, 3))
            return m / (torch.linalg.vector_norm(m.detach(), dim=1, keepdim=True) + P.RMAC_EPS)
        h, w = x.shape[-2:]
        v = part(x)
        for top, left, side in P.rmac_regions(h, w, int(param)):
            v = v + part(x[:, :, top:top + side, left:left + side])
        return v
    return compute(P.FeatureMap(x), param).to(x.dtype)


def _post_gradient(transform, v: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float]:
    """(h, bias): the similarity <post(v), target> = h . v + bias where the parts of v are
    carried linearly through post-processing (power-law by each component's share, L2 and final
    L2 as fixed scales, PCA rotation/whitening linear, the PCA mean into `bias`)."""
    power = getattr(transform, "power", None)
    alpha = 1.0 if power in (None, 0, 0.0) else float(power)
    v = np.asarray(v, np.float64)
    mag = np.abs(v)
    u = np.sign(v) * mag ** alpha
    n1 = max(float(np.linalg.norm(u)), 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(mag > 0, mag ** (alpha - 1.0), 0.0)  # u_k = v_k |v_k|^(alpha-1)
    components = getattr(transform, "components", None)
    if components is None:  # L2 only
        return target * share / n1, 0.0
    w = np.asarray(components, np.float64)
    if transform.whiten:
        w = w / np.sqrt(np.asarray(transform.eigenvalues, np.float64))[:, None]
    mean = np.asarray(transform.mean, np.float64)
    y = w @ (u / n1 - mean)
    n2 = max(float(np.linalg.norm(y)), 1e-12)
    h = (w.T @ target) * share / (n1 * n2)
    bias = -float((w @ mean) @ target) / n2
    return h, bias


# ---------------------------------------------------------------------------------------------
# pictures

_STOPS = np.array([[0.0, 0, 0, 80], [0.25, 40, 40, 200], [0.5, 200, 40, 160],
                   [0.75, 250, 130, 30], [1.0, 255, 240, 80]], np.float64)


def _colormap(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return np.stack([np.interp(t, _STOPS[:, 0], _STOPS[:, c]) for c in (1, 2, 3)], axis=-1)


def heat_rgba(values: np.ndarray, signed: bool = False) -> np.ndarray:
    """A map as a transparent colour layer (H, W, 4) uint8 to lay over its image: sequential
    maps from dark blue to yellow (min to max), signed maps red (+) and blue (-) with the opacity
    of the magnitude."""
    values = np.nan_to_num(np.asarray(values, np.float64))
    out = np.zeros(values.shape + (4,), np.uint8)
    if signed:
        scale = float(np.abs(values).max()) or 1.0
        t = values / scale
        out[..., 0] = np.where(t > 0, 230, 30)
        out[..., 1] = 40
        out[..., 2] = np.where(t > 0, 30, 230)
        out[..., 3] = np.round(np.abs(t) * 230).astype(np.uint8)
        return out
    lo, hi = float(values.min()), float(values.max())
    t = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    out[..., :3] = np.round(_colormap(t)).astype(np.uint8)
    out[..., 3] = np.round(90 + 130 * t).astype(np.uint8)
    return out


def overlay(image: np.ndarray, values: np.ndarray, signed: bool = False) -> np.ndarray:
    """The image (H, W, 3) uint8 with the map's colour layer composited over it."""
    heat = heat_rgba(values, signed).astype(np.float32)
    a = heat[..., 3:] / 255.0
    return np.round(image.astype(np.float32) * (1 - a) + heat[..., :3] * a).astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def describe_map(m: ExplanationMap) -> str:
    """One line saying what a map shows and its key numbers."""
    i = m.info
    if m.kind == "crow":
        return (f"CroW spatial weights of {i['layer']} ({i['cells'][0]}x{i['cells'][1]} cells), "
                f"max {float(m.grid.max()):.3f}")
    if m.kind == "occlusion":
        return (f"similarity drop when a {i['patch']} px grey patch hides each part (stride "
                f"{i['stride']}, {i['positions']} positions); similarity {i['similarity']:.4f}, "
                f"largest drop {i['max_drop']:.4f}")
    return (f"each {i['layer']} cell's share of the similarity under {i['pooling']}: cells sum "
            f"{i['cells_sum']:.4f} + bias {i['bias']:.4f} = similarity {i['similarity']:.4f}")




# ---------------------------------------------------------------------------------------------
# `imgdb explain`: the maps of a query image against a result, as PNG overlays and a page

_MAP_TITLES = {
    ("crow", "query"): "CroW spatial weights of the query",
    ("crow", "result"): "CroW spatial weights of the result",
    ("similarity", "query"): "similarity map: query cells against the result's descriptor",
    ("similarity", "result"): "similarity map: result cells against the query's descriptor",
    ("occlusion", "query"): "occlusion map: similarity drop when a grey patch hides the query",
}


def matches_picture(query: np.ndarray, result: np.ndarray, verification: dict) -> np.ndarray:
    """The query and the result side by side (each at the size its keypoints were found at),
    a line between the two ends of every inlier match, and the result's outline where the
    fitted transform puts it in the query."""
    import cv2

    qh, qw = verification["query_size"][1], verification["query_size"][0]
    rh, rw = verification["result_size"][1], verification["result_size"][0]
    a = cv2.resize(np.ascontiguousarray(query), (qw, qh), interpolation=cv2.INTER_AREA)
    b = cv2.resize(np.ascontiguousarray(result), (rw, rh), interpolation=cv2.INTER_AREA)
    canvas = np.full((max(qh, rh), qw + rw, 3), 255, np.uint8)
    canvas[:qh, :qw], canvas[:rh, qw:] = a, b
    for xq, yq, xr, yr in verification["matches_detected"]:
        cv2.line(canvas, (int(xq), int(yq)), (int(xr) + qw, int(yr)), (0, 200, 0), 1,
                 cv2.LINE_AA)
        cv2.circle(canvas, (int(xq), int(yq)), 2, (255, 0, 0), -1)
        cv2.circle(canvas, (int(xr) + qw, int(yr)), 2, (255, 0, 0), -1)
    if verification["transform"] is not None:  # where the result lies in the query photo
        corners = np.array([[0, 0], [rw, 0], [rw, rh], [0, rh]], np.float32)[:, None]
        back = np.linalg.inv(np.asarray(verification["transform"], np.float64))
        outline = np.round(cv2.perspectiveTransform(corners, back)[:, 0]).astype(np.int32)
        cv2.polylines(canvas[:, :qw], [outline], True, (255, 160, 0), 2, cv2.LINE_AA)
    return canvas


def verify_pair(service, plan, image, result: int, width: int, height: int) -> dict | None:
    """The geometric verification of a query file against a stored result, in the words of
    `--rerank verify` (None where the store keeps no keypoints): inlier count, the fitted
    transform (query detection pixels -> result detection pixels), and the inlier matches in
    the original pixels of both images (x, y of the query, x, y of the result)."""
    from ..store import open_read
    from .service import QueryInput
    from .verify import verify_shortlist

    with open_read(service.db) as view:
        try:
            service.keypoint_extractor(view, plan)
        except UserError:
            return None
    (ctx,) = service.contexts(plan, [QueryInput(str(image), path=image)])
    (other,) = ctx.database([result])
    if ctx.keypoints is None or other is None:
        return None
    (g,) = verify_shortlist(ctx.keypoints, [other])
    from PIL import Image

    with Image.open(image) as im:  # the query's upright size (its keypoints' frame)
        from PIL import ImageOps

        qw, qh = ImageOps.exif_transpose(im).size
    return geometry_json(ctx.keypoints, other, g, (0, 0, qw, qh), (width, height))


def geometry_json(query, other, g, query_frame: tuple, result_size: tuple) -> dict:
    """One verified pair for people and pages: inliers, the fitted transform (query detection
    pixels -> result detection pixels), the inlier matches in original pixels (x, y of the
    query, x, y of the result), and `outline`: the result's corners where the transform puts
    them in the query (original pixels; None without a transform). `query_frame`: where the
    query's keypoints were found, (x, y, width, height) in the query's original pixels (a box
    of it, or all of it)."""
    import cv2

    x0, y0, fw, fh = query_frame
    q_scale = np.array([fw / query.size[0], fh / query.size[1]])
    r_scale = np.array([result_size[0] / other.size[0], result_size[1] / other.size[1]])
    q_xy = query.xy[g.matches[:, 0]] if len(g.matches) else np.zeros((0, 2))
    r_xy = other.xy[g.matches[:, 1]] if len(g.matches) else np.zeros((0, 2))
    outline = None
    if g.transform is not None:
        rw, rh = other.size
        corners = np.array([[0, 0], [rw, 0], [rw, rh], [0, rh]], np.float32)[:, None]
        back = cv2.perspectiveTransform(corners, np.linalg.inv(np.asarray(g.transform,
                                                                          np.float64)))[:, 0]
        outline = np.round(back * q_scale + (x0, y0), 1).tolist()
    return {
        "inliers": int(g.inliers), "verified": None,
        "transform": None if g.transform is None else np.round(g.transform, 6).tolist(),
        "query_size": list(query.size), "result_size": list(other.size),
        "matches": np.round(np.hstack([q_xy * q_scale + (x0, y0), r_xy * r_scale]),
                            1).tolist(),
        "matches_detected": np.hstack([q_xy, r_xy]).tolist(),
        "outline": outline,
    }


def write_explanations(db, image, out, result: int | None = None, index: str | None = None,
                       descriptor: str | None = None, pca: str | None = None,
                       patch: int | None = None, stride: int | None = None, batch: int = 16,
                       device: str = "auto") -> dict:
    """Compute the maps of `image` against a stored `result` (default: its best match other
    than itself), write PNG overlays, `maps.npz` (the arrays) and `index.html` into `out`."""
    import html
    import os
    from pathlib import Path

    from ..digest import file_digest
    from ..features.images import load_query_image
    from ..store import open_read
    from .request import QueryRequest
    from .service import QueryInput, QueryService
    from .verify import VERIFY_MIN_INLIERS

    db, image, out = Path(db), Path(os.path.abspath(image)), Path(out)
    if not image.is_file():
        raise UserError(f"query image {image} does not exist")
    service = QueryService(db, device)
    request = QueryRequest(index=index, descriptor=descriptor, model=pca, exact=True, k=2)
    plan = service.plan(request)
    with open_read(db) as view:
        info = view.descriptor(plan.descriptor)
        ex = Explainer.for_descriptor(view, plan.descriptor, plan.model, device,
                                      service.describer(view, info.extractor))
        valid = view.valid(info.extractor)
        shas = view.column("sha")
        paths = view.paths()
        table = view.images()
        sizes = np.stack([table.width, table.height], axis=1)
        settings = ex.describer.base
    if not valid.any():
        raise UserError(f"descriptor {info.name} has no stored vectors; run imgdb ingest")
    query_image = ex.describer.load(image)
    q = ex.vector(query_image)
    if result is None:  # the best match other than the image itself (or a copy of it)
        own = file_digest(image).encode()
        copies = int(((shas == own) & valid).sum())
        hits = service.rank(plan, request.with_(k=min(int(valid.sum()), copies + 1)), q[None])[0]
        others = [r for r, _ in hits if shas[r] != own]
        if not others:
            raise UserError("the store holds no other image to explain a match with; give "
                            "{result}", mentions=("result",))
        result = others[0]
    elif not 0 <= int(result) < len(valid) or not valid[int(result)]:
        raise UserError(f"image id {result} is not an ingested image of this store with "
                        f"{info.name} (ids 0..{len(paths) - 1}; see imgdb info)")
    result = int(result)
    r = service.post_process(plan, request, service.raw_vectors(
        plan, [QueryInput(str(result), row=result)])[0])[0]
    result_image = load_query_image(paths[result], settings)
    maps: list[tuple[str, ExplanationMap, np.ndarray]] = [
        ("query", ex.crow_map(query_image), query_image.pixels[0]),
        ("result", ex.crow_map(result_image), result_image.pixels[0])]
    notes = []
    try:
        maps.append(("query", ex.similarity_map(query_image, r), query_image.pixels[0]))
        maps.append(("result", ex.similarity_map(result_image, q), result_image.pixels[0]))
    except UserError as exc:
        notes.append(str(exc))
    maps.append(("query", ex.occlusion_map(query_image, r, patch, stride, batch),
                 query_image.pixels[0]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "query.png").write_bytes(png_bytes(query_image.pixels[0]))
    (out / "result.png").write_bytes(png_bytes(result_image.pixels[0]))
    written, arrays = [], {}
    for on, m, base in maps:
        name = f"{m.kind}-{on}"
        (out / f"{name}.png").write_bytes(png_bytes(overlay(base, m.pixels, m.signed)))
        arrays[name] = m.pixels
        arrays[f"{name}-grid"] = m.grid
        written.append({"map": m.kind, "on": on, "file": str(out / f"{name}.png"),
                        "text": describe_map(m),
                        **{k: v for k, v in m.info.items() if isinstance(v, (int, float, str))}})
    verification = verify_pair(service, plan, image, result, *(int(v) for v in sizes[result]))
    if verification is not None:
        verification["verified"] = verification["inliers"] >= VERIFY_MIN_INLIERS
        (out / "matches.png").write_bytes(png_bytes(matches_picture(
            query_image.pixels[0], result_image.pixels[0], verification)))
        verification["file"] = str(out / "matches.png")
    np.savez_compressed(out / "maps.npz", **arrays)
    similarity = float(q @ r)
    figures = "".join(
        f"<figure><img src='{Path(w['file']).name}' alt='{html.escape(w['map'])}'>"
        f"<figcaption><b>{html.escape(_MAP_TITLES[(w['map'], w['on'])])}</b><br>"
        f"{html.escape(w['text'])}</figcaption></figure>" for w in written)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>imgdb explain</title>"
            f"<style>body{{font-family:system-ui,sans-serif;margin:24px}}figure{{display:inline-"
            f"block;margin:8px;vertical-align:top;max-width:420px}}img{{max-width:400px}}"
            f"figcaption{{font-size:13px}}</style></head><body><h1>Why {html.escape(paths[result])}"
            f" matches {html.escape(str(image))}</h1><p>{html.escape(info.name)}, model "
            f"{html.escape(plan.model or 'none')}: similarity {similarity:.4f}</p>"
            f"<figure><img src='query.png' alt='query'><figcaption>query (as the network saw "
            f"it)</figcaption></figure><figure><img src='result.png' alt='result'><figcaption>"
            f"result: image {result}</figcaption></figure><br>{figures}"
            + (f"<h2>Verification</h2><figure><img src='matches.png' alt='matches' "
               f"style='max-width:820px'><figcaption>{verification['inliers']} inlier matches "
               f"({'verified' if verification['verified'] else 'not verified'}: "
               f"--rerank verify needs {VERIFY_MIN_INLIERS}); the result's outline where the "
               f"fitted transform places it in the query</figcaption></figure>"
               if verification is not None else "")
            + "".join(f"<p>{html.escape(n)}</p>" for n in notes) + "</body></html>")
    (out / "index.html").write_text(page, encoding="utf-8")
    return {"query": str(image), "result": result, "result_path": paths[result],
            "descriptor": info.name, "model": plan.model or "none", "similarity": similarity,
            "maps": written, "arrays": str(out / "maps.npz"), "html": str(out / "index.html"),
            "verification": None if verification is None else
            {k: v for k, v in verification.items() if k != "matches_detected"},
            "notes": notes}


__all__ = ["Explainer", "ExplanationMap", "Cancelled", "upsample", "heat_rgba", "overlay", "png_bytes", "geometry_json",
           "describe_map", "write_explanations", "verify_pair", "matches_picture"]
