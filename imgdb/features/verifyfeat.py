"""Local features kept for geometric verification: RootSIFT keypoints (OpenCV), computed from the
image ingest decoded for the network, bounded per image, without torch.

A store keeps them per extractor as the local set `verify.<kind>` (docs/design.md §5): uint8
SIFT descriptors (N, 128) and integer keypoint positions (N, 2) in pixels of the image they were
detected on, whose size is the row's grid. The extractor's settings record how they were made
(`verify`: kind, features, side), so a query image is described the same way. RootSIFT
(Arandjelovic & Zisserman 2012: L1-normalise, square root) is applied when matching, so the
stored bytes are OpenCV's own descriptor values.

Bytes per image: 132 per keypoint (128 + 2 x int16), at most 480 keypoints by default: 61.9 KiB.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import InvalidRequest, UserError
from .localset import LocalSet

#: what `--verify-features` may name ("none": keep nothing)
VERIFY_KINDS = ("sift", "none")
DEFAULT_KIND = "sift"
DEFAULT_FEATURES = 480  # 480 x 132 B = 61.9 KiB per image (<= 64 KiB)
DEFAULT_SIDE = 640  # keypoints are detected on the network's image scaled to this long side
# a query photo's keypoints are not stored: more of them, at a higher resolution, find a small
# object in a cluttered frame (synthetic phone photos: the right cover first for 87% of the
# photos against 66% at the stored 480 / 640 px, benchmarks/RESULTS-verify.md)
QUERY_FEATURES = 500
QUERY_SIDE = 1024


@dataclass(frozen=True)
class VerifySettings:
    """How an extractor's verification features are made (recorded in its settings)."""

    kind: str = DEFAULT_KIND
    features: int = DEFAULT_FEATURES
    side: int = DEFAULT_SIDE

    @property
    def channels(self) -> int:
        return 128

    def as_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_settings(settings: dict) -> "VerifySettings | None":
        """An extractor's recorded verification settings (None: it keeps none)."""
        v = settings.get("verify")
        if not v:
            return None
        return VerifySettings(str(v["kind"]), int(v["features"]), int(v["side"]))

    def for_query(self) -> "VerifySettings":
        """How a query image's keypoints are found for matching against these."""
        return VerifySettings(self.kind, max(self.features, QUERY_FEATURES),
                              max(self.side, QUERY_SIDE))

    def bytes_per_image(self) -> int:
        """The most bytes one image's features take (descriptors + int16 positions)."""
        return self.features * (self.channels + 4)


def parse_verify_kind(text: str | None) -> str | None:
    """`sift` or `none` (case-insensitive); None stays None (the extractor's own choice)."""
    if text is None:
        return None
    kind = str(text).strip().lower()
    if kind not in VERIFY_KINDS:
        raise InvalidRequest(f"{str(text)[:40]!r} is not a kind of verification feature; use "
                        + " or ".join(VERIFY_KINDS), "verify_features")
    return kind


def _cv2():
    try:
        import cv2
    except ImportError:  # pragma: no cover - a dependency; only a broken install lacks it
        raise UserError("verification features need OpenCV: pip install "
                        "opencv-python-headless") from None
    return cv2


def gray_at_side(pixels: np.ndarray, side: int) -> np.ndarray:
    """An RGB uint8 image as grey, scaled down (area filter) so that its long side <= side."""
    cv2 = _cv2()
    img = np.ascontiguousarray(pixels)
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if img.ndim == 3 else img
    h, w = gray.shape
    scale = side / max(h, w)
    if scale < 1:
        gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))),
                          interpolation=cv2.INTER_AREA)
    return gray


def sift_features(pixels: np.ndarray, settings: VerifySettings = VerifySettings()) -> LocalSet:
    """The strongest `settings.features` SIFT keypoints of an RGB uint8 image (detected on it
    scaled to `settings.side`): descriptors uint8 (N, 128), positions int16 (N, 2) as (x, y)
    pixels of the scaled image, grid = its (width, height)."""
    cv2 = _cv2()
    gray = gray_at_side(pixels, settings.side)
    h, w = gray.shape
    kps, desc = cv2.SIFT_create(nfeatures=settings.features).detectAndCompute(gray, None)
    if desc is None or not kps:
        return LocalSet(np.zeros((0, 128), np.uint8), np.zeros((0, 2), np.int16), (w, h))
    response = np.array([k.response for k in kps], np.float32)
    keep = np.argsort(-response, kind="stable")[:max(1, settings.features)]
    xy = np.array([kps[i].pt for i in keep], np.float32)
    coords = np.clip(np.rint(xy), 0, [w - 1, h - 1]).astype(np.int16)
    return LocalSet(np.clip(np.rint(desc[keep]), 0, 255).astype(np.uint8), coords, (w, h))


def rootsift(desc: np.ndarray) -> np.ndarray:
    """uint8 SIFT descriptors -> RootSIFT float32 unit rows (L1, then the square root)."""
    d = np.asarray(desc, np.float32)
    total = d.sum(axis=1, keepdims=True)
    return np.sqrt(d / np.maximum(total, 1e-12))


__all__ = ["VerifySettings", "VERIFY_KINDS", "parse_verify_kind",
           "sift_features", "rootsift", "gray_at_side", "DEFAULT_FEATURES", "DEFAULT_SIDE",
           "QUERY_FEATURES", "QUERY_SIDE"]
