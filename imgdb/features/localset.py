"""One image's kept local features, as the store holds them: a torch-free record that ingest,
merge and queries pass around (features per point, integer coordinates, the grid they live on)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LocalSet:
    """The kept local features of one image: features (N, C), coords (N, 2) int16 as (x, y)
    on a grid (W, H) = `grid`. Conv cells for codebooks: float16 activations, coords in cells
    of the feature map, several scales concatenated (coords per scale grid). Verification
    keypoints (`features.verifyfeat`): uint8 SIFT descriptors, coords in pixels of the image
    they were detected on, whose size is the grid."""

    features: np.ndarray
    coords: np.ndarray
    grid: tuple[int, int]

    @staticmethod
    def concat(parts: list["LocalSet"]) -> "LocalSet":
        if len(parts) == 1:
            return parts[0]
        return LocalSet(np.concatenate([p.features for p in parts]),
                        np.concatenate([p.coords for p in parts]), parts[0].grid)


__all__ = ["LocalSet"]
