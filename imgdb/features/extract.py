"""Batched feature extraction: one forward per batch serves every requested layer and pooling.

Pooling runs on the network's device; only the pooled vectors are copied back to the host.
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import torch
from torch import nn

from . import pooling as pooling_mod
from .backbones import Backbone, WeightsChoice, inference_stages, preprocessing
from ..errors import UserError
from ..numeric import crop_feature_map, merge_scales  # noqa: F401 (crop_feature_map: API)
from .localfeat import LocalSpec, select_batch
from .localset import LocalSet


def resolve_device(spec: str) -> torch.device:
    """`auto` picks CUDA when present; `cuda` without a GPU is a user error."""
    spec = spec.lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("{device} cuda was asked for but no CUDA GPU is visible; use {device} cpu",
                        mentions=("device",))
    try:
        return torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r}; use auto, cpu or cuda[:N]", "device") from None


def _output_side(module: nn.Module, n: int) -> int:
    """Side of a module's output for an input side n, by layer arithmetic (no forward).

    Children run in registration order, which is their execution order in every registered
    backbone; a residual `downsample` branch runs beside the main path, so it is skipped, and
    Inception branches keep the size, so running them one after the other gives their size."""
    from .effnet_lite import FoldedConv

    if isinstance(module, FoldedConv) and module.same:
        return math.ceil(n / module.stride[0])
    if isinstance(module, nn.Conv2d):
        if isinstance(module.padding, str):
            return n if module.padding == "same" else \
                (n - module.dilation[0] * (module.kernel_size[0] - 1) - 1) // module.stride[0] + 1
        k, s, p, d = module.kernel_size[0], module.stride[0], module.padding[0], module.dilation[0]
        return (n + 2 * p - d * (k - 1) - 1) // s + 1
    if isinstance(module, nn.MaxPool2d):
        first = lambda v: v if isinstance(v, int) else v[0]  # noqa: E731
        k, s, p, d = (first(module.kernel_size), first(module.stride), first(module.padding),
                      first(module.dilation))
        span = n + 2 * p - d * (k - 1) - 1
        out = (-(-span // s) if module.ceil_mode else span // s) + 1
        if module.ceil_mode and (out - 1) * s >= n + p:  # PyTorch: last window starts inside
            out -= 1
        return out
    for name, child in module.named_children():
        if name != "downsample":
            n = _output_side(child, n)
    return n


class FeatureExtractor:
    """A network cut after its deepest requested layer, with poolings applied on its device."""

    def __init__(self, backbone: Backbone, weights: WeightsChoice, layers: tuple[str, ...],
                 poolings: tuple[str, ...], device: torch.device, precision: str = "fp32",
                 local: tuple[LocalSpec, ...] = (), bucket: int = 0) -> None:
        self.local = tuple(local)
        self._probed: tuple[dict, dict] | None = None  # see _probe
        self.bucket = int(bucket)  # pad inputs to multiples of this (0: exact shapes; see pad_to)
        layers = tuple(dict.fromkeys([*layers, *(s.layer for s in self.local)]))
        self.layers = layers
        self.poolings = tuple(pooling_mod.canonical_pooling_name(p) for p in poolings)
        for p in self.poolings:
            pooling_mod.get_pooling(p)  # validate early
        self.device = device
        stages = inference_stages(backbone, weights)
        names = [name for name, _ in stages]
        deepest = max(names.index(layer) for layer in layers)
        self.stages = nn.ModuleList([module for _, module in stages[: deepest + 1]]).to(device).eval()
        self.stage_names = names[: deepest + 1]
        for p in self.stages.parameters():
            p.requires_grad_(False)
        mean, std = preprocessing(backbone, weights)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0
        if precision not in ("fp32", "fp16", "bf16"):
            raise UserError(f"unknown precision {precision!r}; use fp32, fp16 or bf16")
        if precision != "fp32" and device.type != "cuda":
            precision = "fp32"  # half precision convolutions are slow or missing on CPU
        self.precision = precision
        if device.type == "cuda":
            self.stages = self.stages.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def valid_cells(self, layer: str, h: int, w: int) -> tuple[int, int]:
        """(rows, cols) of `layer`'s map for an h x w input: the cells an image padded at the
        bottom/right keeps as its own."""
        return _valid_cells(self.stages, self.stage_names.index(layer), h, w)

    def pad_to(self, h: int, w: int) -> tuple[int, int]:
        """The shape an h x w image is padded to (a shape bucket); itself without buckets."""
        q = self.bucket
        return (h, w) if q <= 0 else (-(-h // q) * q, -(-w // q) * q)

    @torch.inference_mode()
    def feature_maps(self, pixels: torch.Tensor, sizes: list[tuple[int, int]] | None = None
                     ) -> dict[str, torch.Tensor]:
        """(B, H, W, 3) uint8 RGB -> {layer: (B, C, h, w) feature map} from one forward.

        `sizes`: each image's own (h, w) when it was padded at the bottom/right to (H, W); the
        padding is zero after normalisation (what the first convolution's own padding adds)."""
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = (x - self.mean) / self.std
        if sizes is not None:
            for i, (h, w) in enumerate(sizes):
                x[i, :, h:, :] = 0
                x[i, :, :h, w:] = 0
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        wanted = set(self.layers)
        out: dict[str, torch.Tensor] = {}
        with self._autocast():
            for name, stage in zip(self.stage_names, self.stages):
                x = stage(x)
                if name in wanted:  # no stage modifies its input in place, so no copy
                    out[name] = x
        return out

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> dict[tuple[str, str], np.ndarray]:
        """(B, H, W, 3) uint8 RGB -> {(layer, pooling): (B, D) float32 array}."""
        return self.extract(pixels)[0]

    @torch.inference_mode()
    def extract(self, pixels: torch.Tensor, keypoints: list[np.ndarray] | None = None
                ) -> tuple[dict[tuple[str, str], np.ndarray], dict[str, list[LocalSet]]]:
        """One forward -> (pooled vectors as in `__call__`, {local key: kept cells per image}).

        `keypoints`: SIFT keypoints per image for the sift mask, when already found."""
        maps = self.feature_maps(pixels)
        return self._pool(maps), self._local_cells(maps, pixels, keypoints)

    @torch.inference_mode()
    def pool_batch(self, pixels: torch.Tensor, sizes: list[tuple[int, int]] | None = None
                   ) -> "PooledBatch":
        """One forward -> every (layer, pooling) of every image, on its way to the host.

        `sizes` (padded batches): each image pools only the cells of its own (h, w). On CUDA the
        copy to the host is asynchronous (pinned buffer, an event); `PooledBatch.result()` waits
        for it: one synchronisation per batch."""
        maps = self.feature_maps(pixels, sizes)
        pooled: dict[tuple[str, str], torch.Tensor] = {}
        for layer, fmap in maps.items():
            if sizes is None or all(tuple(s) == tuple(pixels.shape[1:3]) for s in sizes):
                parts = pooling_mod.pool_all(fmap.float(), self.poolings)
            else:
                parts = self._pool_valid(layer, fmap, sizes)
            for name, vec in parts.items():
                pooled[(layer, name)] = vec
        return PooledBatch.start(pooled, self.device)

    def _pool_valid(self, layer: str, fmap: torch.Tensor, sizes: list[tuple[int, int]]
                    ) -> dict[str, torch.Tensor]:
        """Poolings of each image's own cells of a padded batch (images with equal valid
        cells pooled together)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (h, w) in enumerate(sizes):
            groups.setdefault(self.valid_cells(layer, h, w), []).append(i)
        rows: list[dict[str, torch.Tensor]] = [{} for _ in sizes]
        for (ch, cw), idx in groups.items():
            # slices, not an index list: a host-side index would be copied to the device
            sel = fmap if len(idx) == len(sizes) else torch.cat([fmap[i:i + 1] for i in idx])
            for name, vec in pooling_mod.pool_all(sel[:, :, :ch, :cw].float(),
                                                  self.poolings).items():
                for j, i in enumerate(idx):
                    rows[i][name] = vec[j:j + 1]
        return {name: torch.cat([r[name] for r in rows]) for name in rows[0]}

    def _local_cells(self, maps: dict[str, torch.Tensor], pixels: torch.Tensor,
                     keypoints: list[np.ndarray] | None = None,
                     region: tuple[float, float, float, float] | None = None
                     ) -> dict[str, list[LocalSet]]:
        """{local key: kept cells per image} of a forward's maps (pixels only for the sift mask)."""
        return {spec.key: select_batch(maps[spec.layer], spec.mask,
                                       pixels.numpy() if spec.mask == "sift" else None,
                                       region, keypoints)
                for spec in self.local}

    def _pool(self, maps: dict[str, torch.Tensor]) -> dict[tuple[str, str], np.ndarray]:
        pooled: dict[tuple[str, str], torch.Tensor] = {}
        for layer, fmap in maps.items():
            for name, vec in pooling_mod.pool_all(fmap.float(), self.poolings).items():
                pooled[(layer, name)] = vec
        # one device->host copy for everything
        keys = list(pooled)
        if not keys:
            return {}
        flat = torch.cat([pooled[k] for k in keys], dim=1).cpu().numpy()
        result: dict[tuple[str, str], np.ndarray] = {}
        start = 0
        for k in keys:
            d = pooled[k].shape[1]
            result[k] = flat[:, start:start + d]
            start += d
        return result

    def describe(self, scaled_pixels: list[np.ndarray],
                 region: tuple[float, float, float, float] | None = None
                 ) -> dict[tuple[str, str], np.ndarray]:
        """One image given at each scale -> {(layer, pooling): vector}, exactly as ingest stores it.

        `region` = (x1, y1, x2, y2) as fractions of the image keeps only the feature-map cells
        whose receptive-field centres fall inside it (Babenko sec.4's query-region protocol).
        """
        outs = []
        for px in scaled_pixels:
            pixels = torch.from_numpy(np.ascontiguousarray(px))[None]
            if region is None and self.bucket:  # as ingest computed it: padded to its bucket
                outs.append(self._padded_one(pixels))
            else:
                outs.append(self(pixels) if region is None else self.pool_region(pixels, region))
        return {k: merge_scales([o[k][0] for o in outs]) for k in outs[0]}

    @torch.inference_mode()
    def describe_local(self, scaled_pixels: list[np.ndarray],
                       region: tuple[float, float, float, float] | None = None
                       ) -> dict[str, LocalSet]:
        """One image at each scale -> {local key: kept cells, scales concatenated}, as ingest
        stores them; `region` keeps the cells whose centres fall in it (as `describe`)."""
        parts: dict[str, list[LocalSet]] = {s.key: [] for s in self.local}
        for px in scaled_pixels:
            pixels = torch.from_numpy(np.ascontiguousarray(px))[None]
            for key, sets in self._local_cells(self.feature_maps(pixels), pixels,
                                               region=region).items():
                parts[key].extend(sets)
        return {k: LocalSet.concat(v) for k, v in parts.items()}

    def _padded_one(self, pixels: torch.Tensor) -> dict[tuple[str, str], np.ndarray]:
        h, w = pixels.shape[1:3]
        hb, wb = self.pad_to(h, w)
        padded = torch.zeros((1, hb, wb, 3), dtype=torch.uint8)
        padded[:, :h, :w] = pixels
        return self.pool_batch(padded, [(h, w)]).result()

    @torch.inference_mode()
    def pool_region(self, pixels: torch.Tensor, region: tuple[float, float, float, float]
                    ) -> dict[tuple[str, str], np.ndarray]:
        """(1, H, W, 3) -> every (layer, pooling) of the cells whose centres fall in the
        fractional box `region` (Babenko sec.4's query-region protocol)."""
        out: dict[tuple[str, str], np.ndarray] = {}
        for layer, fmap in self.feature_maps(pixels).items():
            sub = crop_feature_map(fmap, region)
            for name, vec in pooling_mod.pool_all(sub.float(), self.poolings).items():
                out[(layer, name)] = vec.cpu().numpy()
        return out

    @torch.inference_mode()
    def local_channels(self) -> dict[str, int]:
        """Channels of every kept local-feature set (local key -> C), from a tiny forward."""
        return dict(self._probe()[1])

    def output_dims(self) -> dict[tuple[str, str], int]:
        """Descriptor dimension of every (layer, pooling), found with a tiny forward."""
        return dict(self._probe()[0])

    @torch.inference_mode()
    def _probe(self) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
        """(output dims, local channels) from one tiny forward, kept: both are fixed by the
        network, layers and poolings (an ingest asks several times before its first batch)."""
        if self._probed is None:
            maps = self.feature_maps(torch.zeros((1, 64, 64, 3), dtype=torch.uint8))
            self._probed = ({k: int(v.shape[1]) for k, v in self._pool(maps).items()},
                            {spec.key: int(maps[spec.layer].shape[1]) for spec in self.local})
        return self._probed


@functools.lru_cache(maxsize=8192)
def _side_cached(stages: nn.ModuleList, layer_index: int, n: int) -> int:
    for module in list(stages)[: layer_index + 1]:
        n = _output_side(module, n)
    return n


def _valid_cells(stages: nn.ModuleList, layer_index: int, h: int, w: int) -> tuple[int, int]:
    """(rows, cols) of stage `layer_index`'s output for an h x w input (sides are separable)."""
    return _side_cached(stages, layer_index, h), _side_cached(stages, layer_index, w)


class PooledBatch:
    """Pooled vectors of a batch on their way to the host: one flat (B, sum D) copy."""

    def __init__(self, keys, dims, flat, event) -> None:
        self.keys, self.dims, self.flat, self.event = keys, dims, flat, event

    @classmethod
    def start(cls, pooled: dict[tuple[str, str], torch.Tensor], device: torch.device
              ) -> "PooledBatch":
        """Concatenate on the device and start the copy (asynchronous on CUDA)."""
        keys = list(pooled)
        dims = [int(pooled[k].shape[1]) for k in keys]
        if not keys:
            return cls(keys, dims, None, None)
        flat = torch.cat([pooled[k].float() for k in keys], dim=1)
        if device.type != "cuda":
            return cls(keys, dims, flat, None)
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return cls(keys, dims, host, event)

    def result(self) -> dict[tuple[str, str], np.ndarray]:
        """{(layer, pooling): (B, D) float32}; waits for the copy (the batch's one sync)."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        if self.flat is None:
            return {}
        flat = self.flat.numpy()
        out, start = {}, 0
        for k, d in zip(self.keys, self.dims):
            out[k] = flat[:, start:start + d]
            start += d
        return out
