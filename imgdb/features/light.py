"""Describe a query image without torch: the exported network on ONNX Runtime, numpy poolings.

A cold `imgdb query NEW.jpg` spends more time importing torch than computing anything; when the
store's network was exported (`features.runtime`, done by the first ingest or query on this
machine) and every pooling asked for has a numpy form (`features.pooling_np`), this path gives
the vectors `FeatureExtractor.describe` gives (within float rounding, tests/test_light.py)
without importing torch. Anything else (codebook encodings, shape buckets, a GPU, a user's own
pooling, no exported network yet) returns None from `light_extractor` and runs on torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..numeric import crop_feature_map, merge_scales
from .pooling_np import numpy_pooling, pool_all_np
from .runtime import (CachedNetwork, OnnxStages, idle_cpu_threads, network_key, normalise,
                      onnxruntime_installed, weights_identity)

Region = tuple[float, float, float, float]


class LightExtractor:
    """The (layer, pooling) vectors of one image from a cached ONNX network."""

    def __init__(self, network: CachedNetwork, layers: Sequence[str], poolings: Sequence[str],
                 threads: int) -> None:
        self.network = network
        self.layers = tuple(layers)
        self.poolings = tuple(poolings)
        self.threads = threads
        self.stages = OnnxStages(network.model, network.taps)

    def feature_maps(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """(B, H, W, 3) uint8 RGB -> {layer: (B, C, h, w) float32}."""
        x = normalise(pixels, self.network.mean, self.network.std)
        taps = [t for t in self.network.taps if t in self.layers]
        return dict(zip(taps, self.stages.run(x, taps, self.threads)))

    def describe(self, scaled_pixels: Sequence[np.ndarray], region: Region | None = None
                 ) -> dict[tuple[str, str], np.ndarray]:
        """One image at each scale -> {(layer, pooling): vector}, as ingest stores it; `region`
        keeps the cells whose centres fall in the fractional box (`numeric.crop_feature_map`)."""
        outs = []
        for px in scaled_pixels:
            out = {}
            for layer, fmap in self.feature_maps(np.ascontiguousarray(px)[None]).items():
                if region is not None:
                    fmap = crop_feature_map(fmap, region)
                for name, vec in pool_all_np(fmap, self.poolings).items():
                    out[(layer, name)] = vec[0]
            outs.append(out)
        return {k: merge_scales([o[k] for o in outs]) for k in outs[0]}


def light_extractor(settings: dict, wanted: Sequence[tuple[str, str]] | None, device: str
                    ) -> LightExtractor | None:
    """A torch-free extractor for an extractor's stored settings, or None when this query must
    run on torch (see the module docstring)."""
    if device.lower() not in ("auto", "cpu") or settings.get("encoding") is not None:
        return None
    if int(settings.get("buckets", 0) or 0) or not onnxruntime_installed():
        return None
    layers = tuple(dict.fromkeys(l for l, _ in wanted)) if wanted else tuple(settings["layers"])
    poolings = tuple(dict.fromkeys(p for _, p in wanted)) if wanted \
        else tuple(settings["poolings"])
    if any(numpy_pooling(p) is None for p in poolings) or not _weights_unchanged(settings):
        return None
    for deepest in dict.fromkeys((*layers, *settings.get("layers", ()))):
        network = CachedNetwork.find(network_key(settings["backbone"], weights_identity(settings),
                                                 deepest))
        if network is not None and all(layer in network.taps for layer in layers):
            light = LightExtractor(network, layers, poolings, idle_cpu_threads())
            try:
                light.stages.session(light.threads)  # a damaged file fails here, not mid-query
            except Exception:  # noqa: BLE001 - onnxruntime's own error types: torch runs instead
                return None
            return light
    return None


def _weights_unchanged(settings: dict) -> bool:
    """A weights file must still hold what was ingested (else torch's path says so)."""
    spec = str(settings["weights"])
    if spec.lower() in ("imagenet", "none"):
        return True
    from ..digest import file_digest

    path = Path(spec)
    try:
        return path.is_file() and file_digest(path) == settings.get("weights_sha")
    except OSError:
        return False
