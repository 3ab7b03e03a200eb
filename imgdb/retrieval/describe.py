"""The one way to describe a new image for a stored descriptor: exactly as ingest did.

`QueryDescriber` rebuilds an extractor from the settings the store recorded (backbone, weights
digest, size policy, scales) and computes only the (layer, pooling) pairs asked for; for a
codebook encoding it extracts the local features as ingest kept them and encodes them with the
same codebook. `query`, `eval` and `serve` all use it. A single image on a CPU runs without
torch when the network was exported (`features.light`): a cold query then starts in a fraction
of the time `import torch` takes.
"""

from __future__ import annotations

import contextlib
import threading
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
        self._light_lock = threading.Lock()
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

    def light(self):
        """The torch-free extractor for this store's queries, or None (looked for once)."""
        with self._light_lock:
            if self._light is False:
                from ..features.light import light_extractor

                self._light = None if self.encoding is not None else \
                    light_extractor(self.base, self.wanted, self.device)
        return self._light

    def start_light(self) -> None:
        """Look for the torch-free extractor on a thread of its own while the caller decodes
        the query images: its ONNX Runtime session is built with the GIL released (a cold
        query's 0.05-0.1 s, overlapped)."""
        if self._light is False and self.encoding is None:
            threading.Thread(target=self._light_quietly, name="imgdb-onnx-session",
                             daemon=True).start()

    def _light_quietly(self) -> None:
        with contextlib.suppress(Exception):  # light() on the caller's thread tries again
            self.light()

    def prepare(self) -> None:
        """Load what describing needs now (the ONNX session, or the torch network), not in
        the first request."""
        if self.light() is None:
            self._network()

    def describe(self, image, region: Region | None = None) -> dict[tuple[str, str], np.ndarray]:
        """A decoded image -> {(layer, pooling): raw vector} as stored (`region`: fractional box
        of feature-map cells to keep, Babenko sec.4's query-region protocol)."""
        return self.describe_many([image], [region])[0]

    def network(self):
        """The torch feature extractor (built on first use): for explanation maps, which need
        the feature maps themselves."""
        return self._network()

    def describe_many(self, images: Sequence, regions: Sequence[Region | None] | None = None
                      ) -> list[dict[tuple[str, str], np.ndarray]]:
        """Decoded images -> one {(layer, pooling): raw vector} each, exactly as ingest stored
        them. The one way every query image is described: without torch when the network was
        exported (`features.light`); else images of equal (bucket-padded) size share one
        forward per scale, each pooling only its own cells, as ingest batches them."""
        regions = list(regions) if regions is not None else [None] * len(images)
        if not images:
            return []
        if self.encoding is not None:
            net = self._network()
            key = self.encoding["key"]
            locals_ = [net.describe_local(im.pixels, r)[key] for im, r in zip(images, regions)]
            vecs = self._encoder.encode([loc.features for loc in locals_])
            return [{(key, self.encoding["method"]): v} for v in vecs]
        light = self.light()
        if light is not None:
            return [light.describe(im.pixels, r) for im, r in zip(images, regions)]
        return self._describe_torch(images, regions)

    def _describe_torch(self, images: Sequence, regions: list) -> list[dict]:
        import torch

        from ..numeric import merge_scales

        net = self._network()
        per_image: list[list[dict]] = [[] for _ in images]
        for s in range(len(images[0].pixels)):
            groups: dict[tuple[int, int], list[int]] = {}
            for i, image in enumerate(images):
                if regions[i] is not None:  # Babenko's region protocol: its own forward
                    pixels = torch.from_numpy(np.ascontiguousarray(image.pixels[s]))[None]
                    pooled = net.pool_region(pixels, regions[i])
                    per_image[i].append({k: v[0] for k, v in pooled.items()})
                else:
                    h, w = image.pixels[s].shape[:2]
                    groups.setdefault(net.pad_to(h, w), []).append(i)
            for (hb, wb), members in groups.items():
                sizes = [images[i].pixels[s].shape[:2] for i in members]
                batch = np.zeros((len(members), hb, wb, 3), np.uint8)
                for j, i in enumerate(members):
                    h, w = sizes[j]
                    batch[j, :h, :w] = images[i].pixels[s]
                padded = any((h, w) != (hb, wb) for h, w in sizes)
                pooled = net.pool_batch(torch.from_numpy(batch),
                                        [tuple(x) for x in sizes] if padded else None).result()
                for j, i in enumerate(members):
                    per_image[i].append({k: v[j] for k, v in pooled.items()})
        wanted = self.wanted
        out = []
        for outs in per_image:
            keys = [k for k in outs[0] if not wanted or k in wanted]
            out.append({k: merge_scales([o[k] for o in outs]) for k in keys})
        return out

    def vector(self, path: str | Path, layer: str, pooling: str, crop: Region | None = None
               ) -> np.ndarray:
        """One raw vector of one image file."""
        return self.describe(self.load(path, crop))[(layer, pooling)]
