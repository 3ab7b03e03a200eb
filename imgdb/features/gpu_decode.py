"""JPEG decoding on the network's device (`decode="gpu"`): the host reads, hashes and checks
headers; the device decodes a batch at once (torchvision.io.decode_jpeg, nvJPEG on CUDA),
applies the EXIF orientation and resizes (bicubic, antialiased) to the size policy's target.

Other formats, CMYK JPEGs, crops and anything the device decoder refuses fall back to the CPU
path (`images.load_image`), one file at a time, so a corrupt file is still recorded as itself.
Pixels resized on the device differ slightly from Pillow's (another resampler, no DCT-domain
reduction), so the extractor's settings record the decoder. Nothing here needs CUDA to run:
with a CPU device the same code runs on torchvision's CPU decoder (the tests use that).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Sequence

from PIL import Image, JpegImagePlugin

from ..errors import UserError
from .images import (DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, DecodedImage, ImageError, SizePolicy,
                     check_scales, classify_decode_error, load_image, open_formats, plan_decode,
                     read_image_file)

#: `DecodedImage.extras` key of an image whose decoding is left to the device.
DEVICE_JPEG = "device_jpeg"


def check_gpu_decode(device) -> None:
    """A one-line UserError unless JPEGs can be decoded on `device` (a CUDA GPU)."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("{decode} gpu needs a CUDA GPU and none is visible; use {decode} cpu",
                        mentions=("decode",))
    if getattr(device, "type", str(device)) != "cuda":
        raise UserError("{decode} gpu decodes on the network's device; use it with {device} cuda "
                        "(or auto), or use {decode} cpu", mentions=("decode", "device"))


def load_deferred(path: str | Path, policy: SizePolicy, scales: Sequence[float] = (1.0,),
                  max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE
                  ) -> DecodedImage:
    """Like `load_image`, but a plain JPEG (RGB or grey) is only read, hashed and checked: its
    bytes, orientation and targets go to `extras[DEVICE_JPEG]` and `pixels` stays empty."""
    path = Path(path)
    scales = check_scales(scales)
    data, st = read_image_file(path)
    try:
        with Image.open(io.BytesIO(data), formats=open_formats()) as im:
            device_ok = isinstance(im, JpegImagePlugin.JpegImageFile) and im.mode in ("RGB", "L")
            if device_ok:
                plan = plan_decode(im, policy, scales, max_pixels, min_side, None)
    except ImageError as e:
        e.file_size, e.mtime = len(data), st.st_mtime
        e.sha = hashlib.blake2b(data, digest_size=16).hexdigest()
        raise
    except Exception:
        device_ok = False  # let the CPU path name the problem
    if not device_ok:
        return load_image(path, policy, scales, max_pixels=max_pixels, min_side=min_side)
    sha = hashlib.blake2b(data, digest_size=16).hexdigest()
    return DecodedImage(pixels=[], width=plan.width, height=plan.height, file_size=len(data),
                        mtime=st.st_mtime, sha=sha,
                        extras={DEVICE_JPEG: {"data": data, "orientation": plan.orientation,
                                              "targets": plan.targets}})


def _orient(x, orientation: int):
    """EXIF orientation (1..8) of a (3, H, W) tensor, as PIL's transpose for that tag."""
    if orientation == 2:
        return x.flip(-1)
    if orientation == 3:
        return x.flip(-1).flip(-2)
    if orientation == 4:
        return x.flip(-2)
    if orientation == 5:  # transpose
        return x.transpose(-1, -2)
    if orientation == 6:  # rotate 270 (clockwise 90)
        return x.transpose(-1, -2).flip(-1)
    if orientation == 7:  # transverse
        return x.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:  # rotate 90 (counter-clockwise)
        return x.transpose(-1, -2).flip(-2)
    return x


def resize_rgb(x, width: int, height: int):
    """(3, H, W) uint8 -> (height, width, 3) uint8, bicubic with antialiasing (on x's device)."""
    import torch
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) != (height, width):
        y = F.interpolate(x[None].float(), size=(height, width), mode="bicubic",
                          antialias=True, align_corners=False)[0]
        x = y.round_().clamp_(0, 255).to(torch.uint8)
    return x.permute(1, 2, 0)


def decode_on_device(jobs: list[dict], scale_index: list[int], device) -> list:
    """Decode JPEG jobs (`extras[DEVICE_JPEG]`) in one call on `device` -> per job the
    (H, W, 3) uint8 tensor of its scale `scale_index[i]`. Raises RuntimeError when the device
    decoder refuses the batch (the caller then decodes those files on the CPU)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    datas = [torch.frombuffer(bytearray(j["data"]), dtype=torch.uint8) for j in jobs]
    images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    out = []
    for job, img, s in zip(jobs, images, scale_index):
        tw, th = job["targets"][s]
        out.append(resize_rgb(_orient(img, job["orientation"]), tw, th))
    return out


def decode_on_host(path: str | Path, policy: SizePolicy, scales: Sequence[float],
                   max_pixels: int, min_side: int) -> DecodedImage | ImageError:
    """The CPU fallback for one file the device refused: its pixels, or why it failed."""
    try:
        return load_image(path, policy, scales, max_pixels=max_pixels, min_side=min_side)
    except ImageError as e:
        e.__traceback__ = None
        return e
    except Exception as e:  # pragma: no cover - load_image converts everything
        return ImageError(classify_decode_error(e))


__all__ = ["DEVICE_JPEG", "check_gpu_decode", "load_deferred", "decode_on_device",
           "decode_on_host", "resize_rgb"]
