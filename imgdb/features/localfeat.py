"""Local conv features for codebook methods: which cells of a feature map are kept, and how.

A *local key* names what is kept: `LAYER` (every cell) or `LAYER:MASK` with MASK one of `max`,
`sum`, `sift` (Hoang et al. sec. 3.2). Selection runs on the network's device for a whole
batch; only the kept cells travel to the host, as float16 (docs/design.md §3, §5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from ..numeric import region_cells
from .localset import LocalSet


MASKS = ("max", "sum", "sift")


@dataclass(frozen=True)
class LocalSpec:
    """What `--keep-local LAYER[:MASK]` asks for."""

    layer: str
    mask: str | None = None

    @property
    def key(self) -> str:
        """The store name: `LAYER` or `LAYER:MASK`."""
        return self.layer if self.mask is None else f"{self.layer}:{self.mask}"


def parse_local_spec(spec: str) -> LocalSpec:
    """`conv5_3`, `conv5_3:max`, ... -> LocalSpec; a bad mask is a UserError naming the choices."""
    layer, _, mask = spec.strip().partition(":")
    if not layer:
        raise UserError(f"{spec!r}: give a layer, e.g. conv5_3 or conv5_3:max", "keep_local")
    if mask and mask not in MASKS:
        raise UserError(f"{spec!r}: unknown mask {mask!r}; use {', '.join(MASKS)} or none "
                        f"(LAYER alone keeps every cell)", "keep_local")
    return LocalSpec(layer, mask or None)


def device_masks(fmap: torch.Tensor, mask: str | None, pixels: np.ndarray | None = None,
                 keypoints: list[np.ndarray] | None = None) -> torch.Tensor:
    """(B, C, h, w) feature maps -> (B, h, w) bool masks on the same device.

    `max`: the argmax cell of every non-constant channel (Hoang eq. 2; first maximum in
    row-major order). `sum`: cells whose channel sum >= the median (eq. 3; the median of an
    even count is the mean of the two middle values). `sift`: cells holding an OpenCV SIFT
    keypoint of the input image, eq. 1 rounding; `pixels` (B, H, W, 3) uint8 are needed, and
    the keypoints (K, 2) per image when already found (ingest finds them in its decode threads).
    """
    b, c, h, w = fmap.shape
    if mask is None:
        return torch.ones((b, h, w), dtype=torch.bool, device=fmap.device)
    if mask == "max":
        flat = fmap.reshape(b, c, h * w)
        idx = flat.argmax(dim=-1)  # (B, C), first maximum in row-major order
        keep = flat.amax(dim=-1) > flat.amin(dim=-1)
        out = torch.zeros((b, h * w), dtype=torch.bool, device=fmap.device)
        rows = torch.arange(b, device=fmap.device)[:, None].expand(b, c)
        out[rows[keep], idx[keep]] = True
        return out.reshape(b, h, w)
    if mask == "sum":
        s = fmap.sum(dim=1, dtype=torch.float64).reshape(b, h * w)
        med = torch.quantile(s, 0.5, dim=-1, keepdim=True)  # linear: numpy's median
        return (s >= med).reshape(b, h, w)
    if mask == "sift":
        if pixels is None:
            raise ValueError("the sift mask needs the input pixels")
        if keypoints is None:
            keypoints = [sift_keypoints(px) for px in pixels]
        masks = [sift_mask(kp, (px.shape[1], px.shape[0]), (w, h))
                 for kp, px in zip(keypoints, pixels)]
        return torch.from_numpy(np.stack(masks)).to(fmap.device)
    raise UserError(f"unknown mask {mask!r}; use {', '.join(MASKS)}")


def select_batch(fmap: torch.Tensor, mask: str | None, pixels: np.ndarray | None = None,
                 region: tuple[float, float, float, float] | None = None,
                 keypoints: list[np.ndarray] | None = None) -> list[LocalSet]:
    """Kept cells of every image of a batch, in row-major cell order, copied to the host once.

    With `region`, the mask is computed on the whole map and then restricted to the cells whose
    centres fall in the box (Babenko sec. 4's query-region protocol).
    """
    b, c, h, w = fmap.shape
    keep = device_masks(fmap, mask, pixels, keypoints)  # (B, h, w)
    if region is not None:
        keep = keep & torch.from_numpy(region_cells(h, w, region)).to(keep.device)
    bi, ys, xs = torch.nonzero(keep, as_tuple=True)  # sorted by image, then row-major
    feats = fmap.permute(0, 2, 3, 1)[bi, ys, xs].float().clamp(-65504, 65504)
    feats = feats.to(torch.float16).cpu().numpy()
    coords = torch.stack([xs, ys], dim=1).to(torch.int16).cpu().numpy()
    counts = keep.reshape(b, -1).sum(dim=1).cpu().numpy()
    out, start = [], 0
    for n in counts.tolist():
        out.append(LocalSet(feats[start:start + n], coords[start:start + n], (w, h)))
        start += n
    return out


# ---------------------------------------------------------------------------------------------
# SIFT keypoints and Hoang eq. 1 (the sift mask needs them on the host)


def sift_mask(keypoints_xy, image_size: tuple[int, int], grid: tuple[int, int],
              radius: int = 0) -> np.ndarray:
    """SIFT-mask, Hoang sec. 3.2.1 eq. 1: conv-grid cells that hold a SIFT keypoint.

    ``keypoints_xy``: (K, 2) keypoint positions (x, y) in pixels of the image the feature map
    was computed from, ``image_size`` = (W_I, H_I) of that image, ``grid`` = (W, H) of the
    feature map.  Each keypoint goes to the cell x_grid = round(x W / W_I),
    y_grid = round(y H / H_I) (eq. 1; halves round up, as Matlab's ``round`` on non-negative
    values), clipped to [0, W-1] x [0, H-1].  Eq. 1 is used on 0-based pixel and grid
    coordinates, as written; note that it maps a pixel to the cell whose left/top edge is
    nearest, i.e. half a cell away from the cell that contains it (the paper's own rounding).

    No keypoint (K == 0): every cell is selected (Hoang sec. 5.1 "the SIFT-mask is ignored").

    ``radius`` > 0 also selects the cells within that Chebyshev distance of each keypoint's
    cell; the authors' released code does this with radius 1, the paper (default 0) does not.
    Returns a bool (H, W) mask.
    """
    w_grid, h_grid = int(grid[0]), int(grid[1])
    w_img, h_img = float(image_size[0]), float(image_size[1])
    if w_grid <= 0 or h_grid <= 0 or w_img <= 0 or h_img <= 0:
        raise ValueError(f"bad sizes: image {image_size}, grid {grid}")
    kp = np.asarray(keypoints_xy, dtype=np.float64).reshape(-1, 2)
    if len(kp) == 0:
        return np.ones((h_grid, w_grid), dtype=bool)
    gx = np.floor(kp[:, 0] * w_grid / w_img + 0.5).astype(np.int64)
    gy = np.floor(kp[:, 1] * h_grid / h_img + 0.5).astype(np.int64)
    gx = np.clip(gx, 0, w_grid - 1)
    gy = np.clip(gy, 0, h_grid - 1)
    mask = np.zeros((h_grid, w_grid), dtype=bool)
    mask[gy, gx] = True
    if radius > 0:
        grown = mask.copy()
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                ys, xs = np.clip(gy + dy, 0, h_grid - 1), np.clip(gx + dx, 0, w_grid - 1)
                grown[ys, xs] = True
        mask = grown
    return mask


def sift_keypoints(image, nfeatures: int = 0) -> np.ndarray:
    """SIFT keypoint positions (K, 2) float32 as (x, y) pixels, OpenCV ``cv2.SIFT_create``.

    ``image``: uint8 RGB (H, W, 3) or grayscale (H, W); RGB is converted to grayscale first.
    Positions are OpenCV's (0-based, pixel centres at integers); a keypoint detected with
    several orientations appears several times (harmless for the mask).  Hoang used VLFeat's
    detector (sec. 5.1); OpenCV's is the same Lowe detector with its own defaults.
    """
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UserError("the SIFT mask needs OpenCV: install it with "
                        "`pip install opencv-python-headless`") from exc
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"sift_keypoints expects a uint8 image, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 3:
        gray = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
    elif img.ndim == 2:
        gray = np.ascontiguousarray(img)
    else:
        raise ValueError(f"sift_keypoints expects (H, W, 3) RGB or (H, W) gray, got {img.shape}")
    kps = cv2.SIFT_create(nfeatures=nfeatures).detect(gray, None)
    if not kps:
        return np.zeros((0, 2), dtype=np.float32)
    return np.array([kp.pt for kp in kps], dtype=np.float32)
