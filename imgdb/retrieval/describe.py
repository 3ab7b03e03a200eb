"""The one way to describe a new image for a stored descriptor: exactly as ingest did.

`QueryDescriber` rebuilds an extractor from the settings the store recorded (backbone, weights
digest, size policy, scales) and computes only the (layer, pooling) pairs asked for; for a
codebook encoding it extracts the local features as ingest kept them and encodes them with the
same codebook. `query`, `eval` and `serve` all use it. A single image on a CPU runs without
torch when the network was exported (`features.light`): a cold query then starts in a fraction
of the time `import torch` takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..store import StoreView

Region = tuple[float, float, float, float]


class QueryDescriber:
    """Describes images for descriptors of one extractor of a store (built lazily: torch and the
    network load only when an image actually needs a forward pass)."""

    def __init__(self, view: StoreView, extractor: str, wanted: Sequence[tuple[str, str]] | None = None,
                 device: str = "auto") -> None:
        self.extractor = extractor
        self.settings = view.settings(extractor)
        self.encoding = self.settings.get("encoding")
        self.device = device
        self.wanted = tuple(wanted) if wanted else None
        self._net = None
        self._light = False  # not looked for yet (None: torch runs this store's queries)
        self._encoder = None
        if self.encoding is not None:  # the base extractor's settings decide decoding
            from ..codebooks.encode import load_encoder

            self.base = view.settings(self.encoding["extractor"])
            self._encoder = load_encoder(view, self.encoding, device)
        else:
            self.base = self.settings

    def load(self, path: str | Path, crop: Region | None = None):
        """Decode a query image as ingest decoded the store's (size policy, scales, limits)."""
        from ..features.images import load_query_image

        return load_query_image(path, self.base, crop)

    def _network(self):
        if self._net is None:
            from ..features.backbones import get_backbone, stored_weights
            from ..features.extract import FeatureExtractor, resolve_device
            from ..features.runtime import idle_cpu_threads
            from ..features.localfeat import parse_local_spec

            if resolve_device(self.device).type == "cpu":  # a few images: the idle cores only
                import torch

                torch.set_num_threads(idle_cpu_threads())
            s = self.base
            if self.encoding is not None:
                spec = parse_local_spec(self.encoding["key"])
                self._net = FeatureExtractor(get_backbone(s["backbone"]), stored_weights(s), (),
                                             (), resolve_device(self.device), local=(spec,))
            else:
                layers = tuple(dict.fromkeys(l for l, _ in self.wanted)) if self.wanted \
                    else tuple(s["layers"])
                poolings = tuple(dict.fromkeys(p for _, p in self.wanted)) if self.wanted \
                    else tuple(s["poolings"])
                self._net = FeatureExtractor(get_backbone(s["backbone"]), stored_weights(s),
                                             layers, poolings, resolve_device(self.device),
                                             bucket=int(s.get("buckets", 0)))
                if not int(s.get("buckets", 0)):  # the next query on this machine runs without torch
                    from ..features.onnx_export import ensure_exported

                    ensure_exported(get_backbone(s["backbone"]), stored_weights(s), layers,
                                    self._net)
        return self._net

    def describe(self, image, region: Region | None = None) -> dict[tuple[str, str], np.ndarray]:
        """A decoded image -> {(layer, pooling): raw vector} as stored (`region`: fractional box
        of feature-map cells to keep, Babenko sec.4's query-region protocol)."""
        if self._light is False:
            from ..features.light import light_extractor

            self._light = None if self._net is not None else \
                light_extractor(self.base, self.wanted, self.device)
        if self._light is not None and self.encoding is None:
            return self._light.describe(image.pixels, region)
        net = self._network()
        if self.encoding is not None:
            key = self.encoding["key"]
            local = net.describe_local(image.pixels, region)[key]
            return {(key, self.encoding["method"]): self._encoder.encode([local.features])[0]}
        out = net.describe(image.pixels, region)
        if self.wanted:
            out = {k: v for k, v in out.items() if k in self.wanted}
        return out

    def network(self):
        """The feature extractor (built on first use): for explanation maps, which need the
        feature maps themselves."""
        return self._network()

    def describe_many(self, images: Sequence, pairs: Sequence[tuple[str, str]] | None = None
                      ) -> list[dict[tuple[str, str], np.ndarray]]:
        """Several decoded images -> one {(layer, pooling): raw vector} each, as `describe` gives
        it; images of equal size share one forward per scale, as ingest batches them. `pairs`
        (default: all this describer computes) selects the poolings to compute."""
        if self.encoding is not None or not images:
            return [self.describe(image) for image in images]
        import torch

        from ..features import pooling as pooling_mod
        from ..numeric import merge_scales

        net = self._network()
        pairs = tuple(pairs) if pairs else tuple((l, p) for l in net.layers for p in net.poolings)
        by_layer: dict[str, list[str]] = {}
        for layer, pooling in pairs:
            by_layer.setdefault(layer, []).append(pooling)
        per_image: list[list[dict]] = [[] for _ in images]
        for s in range(len(images[0].pixels)):
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, image in enumerate(images):
                groups.setdefault(image.pixels[s].shape, []).append(i)
            for members in groups.values():
                batch = torch.from_numpy(np.stack([images[i].pixels[s] for i in members]))
                maps = net.feature_maps(batch)
                pooled = {(layer, name): vec.cpu().numpy()
                          for layer, names in by_layer.items()
                          for name, vec in pooling_mod.pool_all(maps[layer].float(), names).items()}
                for j, i in enumerate(members):
                    per_image[i].append({k: v[j] for k, v in pooled.items()})
        return [{k: merge_scales([o[k] for o in outs]) for k in pairs} for outs in per_image]

    def vector(self, path: str | Path, layer: str, pooling: str, crop: Region | None = None
               ) -> np.ndarray:
        """One raw vector of one image file."""
        return self.describe(self.load(path, crop))[(layer, pooling)]
