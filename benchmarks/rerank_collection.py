"""Write a near-duplicate collection for the re-ranking measurements: every scikit-image
sample photo plus 11 edited copies of it (crops, mirror, rescales, colour shifts, rotation,
heavy JPEG), one folder per photo so that `imgdb eval --gt OUT` reads the groups.

    python benchmarks/rerank_collection.py OUT_DIR
    imgdb ingest OUT_DIR --db skimage.h5 --backbone efficientnet_lite0 --size original --layers head
    imgdb eval --db skimage.h5 --gt OUT_DIR --descriptor head/mac --rerank diffusion --rerank kreciprocal

(needs scikit-image: `pip install -e '.[demo]'`)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "camera", "coins", "moon", "page", "brick", "grass", "gravel", "clock", "cell",
          "horse", "text", "logo", "colorwheel", "cat")


def edits(image):
    """name -> edited copy (PIL images, RGB)."""
    from PIL import Image, ImageEnhance, ImageOps

    rgb = image.convert("RGB")
    w, h = rgb.size
    arr = np.asarray(rgb).astype(np.float32)

    def crop(x0, y0, x1, y1):
        return rgb.crop((int(x0 * w), int(y0 * h), int(x1 * w), int(y1 * h)))

    def size(f):
        return rgb.resize((max(48, int(w * f)), max(48, int(h * f))), Image.BILINEAR)

    shifted = np.clip(arr * np.array([1.25, 0.95, 0.75]) + np.array([10, 0, -10]), 0, 255)
    return {
        "crop-centre": crop(0.125, 0.125, 0.875, 0.875),
        "crop-topleft": crop(0.0, 0.0, 0.7, 0.7),
        "crop-bottomright": crop(0.3, 0.3, 1.0, 1.0),
        "mirror": ImageOps.mirror(rgb),
        "mirror-crop": ImageOps.mirror(crop(0.1, 0.2, 0.9, 0.95)),
        "half": size(0.5),
        "quarter": size(0.25),
        "warm": Image.fromarray(shifted.astype(np.uint8)),
        "dark-contrast": ImageEnhance.Contrast(ImageEnhance.Brightness(rgb).enhance(0.6)).enhance(1.5),
        "rotate-8": rgb.rotate(8, resample=Image.BILINEAR, expand=False, fillcolor=(255, 255, 255)),
        "grey": ImageOps.grayscale(rgb).convert("RGB"),
    }


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit(__doc__)
    import skimage.data as data
    from PIL import Image

    out = Path(argv[0])
    count = 0
    for name in PHOTOS:
        try:
            arr = getattr(data, name)()
        except Exception as exc:  # a sample that needs a download (pooch) is skipped
            print(f"skipped {name}: {exc}", file=sys.stderr)
            continue
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[..., :3]
        image = Image.fromarray(arr)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        image.convert("RGB").save(folder / f"{name}.png")
        count += 1
        for edit, im in edits(image).items():
            im.save(folder / f"{name} {edit}.jpg", quality=30 if edit == "quarter" else 85)
            count += 1
    print(f"wrote {count} images in {len(list(out.iterdir()))} groups to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
