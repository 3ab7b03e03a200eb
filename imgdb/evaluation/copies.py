"""A shippable copy-detection benchmark: edited copies of photos that install with pip.

The database holds the originals (scikit-image's sample photos and scikit-learn's two) among
unrelated photos (any folder the caller gives: the test suite uses its 55 landmark crops); each
query is one edited copy of one original (crops, a 30% rescale, JPEG quality 10 and 3, a 10 degree
rotation, blur, grey, brightness, occlusion, mirror), and its one relevant image is the original.
This is the collection where re-ranking that spreads scores along a graph hurts (nothing in the
database is like anything else in it), so every stage's defaults are measured here beside the
multi-view sets where they help. Everything follows from `seed`
(`python -m imgdb.evaluation.copies OUT [--distractors DIR]`); `gt.csv` (query,relevant) is
`imgdb eval --gt OUT/gt.csv --queries OUT/queries` ground truth.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .scenes import as_rgb, write_gt

#: scikit-image samples used as originals (with scikit-learn's two: 22 photos; `cat` is left
#: out: it is `chelsea`, pixel for pixel)
ORIGINALS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
             "immunohistochemistry", "retina", "camera", "coins", "moon", "page", "brick",
             "grass", "gravel", "clock", "cell", "horse", "text", "logo", "colorwheel")
#: the ten edits of every original (the query names end with them)
EDITS = ("crop", "scale30", "jpeg10", "jpeg3", "rotate10", "blur", "grey", "bright",
         "occlude", "mirror")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class CopySet:
    """Where a generated set lies: the database folder, the query copies and ground truth."""

    database: Path
    queries: Path
    gt: Path
    originals: int
    copies: int


def originals() -> dict[str, np.ndarray]:
    """name -> RGB uint8 array of every original that this installation has (no two the
    same)."""
    import skimage.data as data
    from sklearn.datasets import load_sample_images

    out = {}
    for name in ORIGINALS:
        try:
            image = as_rgb(getattr(data, name)())
        except Exception:  # a sample that needs a download (pooch) is left out
            continue
        if not any(np.array_equal(image, seen) for seen in out.values()):
            out[name] = image
    samples = load_sample_images()
    for fname, im in zip(samples.filenames, samples.images):
        out[Path(fname).stem] = as_rgb(im)
    return out


def edit(rng: np.random.Generator, image: np.ndarray, kind: str) -> tuple[np.ndarray, int]:
    """One edited copy of `image` (RGB uint8) -> (copy, JPEG quality to save it with)."""
    import cv2

    h, w = image.shape[:2]
    if kind == "crop":  # 55-80% of each side, anywhere
        fy, fx = rng.uniform(0.55, 0.8, 2)
        ch, cw = int(h * fy), int(w * fx)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        return image[y:y + ch, x:x + cw], 90
    if kind == "scale30":
        return cv2.resize(image, (max(16, int(w * 0.3)), max(16, int(h * 0.3))),
                          interpolation=cv2.INTER_AREA), 90
    if kind in ("jpeg10", "jpeg3"):
        return image, int(kind[4:])
    if kind == "rotate10":
        m = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.choice([-10, 10])), 1.0)
        return cv2.warpAffine(image, m, (w, h), borderValue=(255, 255, 255)), 90
    if kind == "blur":
        return cv2.GaussianBlur(image, (0, 0), max(h, w) / 200), 90
    if kind == "grey":
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        return np.repeat(grey[:, :, None], 3, axis=2), 90
    if kind == "bright":
        gain, lift = rng.uniform(1.3, 1.5), rng.uniform(20, 40)
        return np.clip(image.astype(np.float32) * gain + lift, 0, 255).astype(np.uint8), 90
    if kind == "occlude":  # a solid block over 20-30% of the area
        out = image.copy()
        fy, fx = rng.uniform(0.4, 0.55, 2)
        bh, bw = int(h * fy), int(w * fx)
        y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        out[y:y + bh, x:x + bw] = rng.integers(0, 256, 3)
        return out, 90
    if kind == "mirror":
        return np.ascontiguousarray(image[:, ::-1]), 90
    raise ValueError(f"unknown edit {kind!r}")


def make_copy_set(out: str | Path, distractors: str | Path | None = None, seed: int = 0
                  ) -> CopySet:
    """Write the originals (and every image of `distractors`) to OUT/database, ten edited
    copies of each original to OUT/queries, and OUT/gt.csv (query,relevant)."""
    import cv2

    out = Path(out)
    rng = np.random.default_rng(seed)
    db, qdir = out / "database", out / "queries"
    db.mkdir(parents=True, exist_ok=True)
    qdir.mkdir(parents=True, exist_ok=True)
    if distractors is not None:
        for f in sorted(Path(distractors).iterdir()):
            if f.suffix.lower() in _IMAGE_SUFFIXES:
                shutil.copyfile(f, db / f"distractor_{f.name}")
    rows = []
    photos = originals()
    for name, image in photos.items():
        cv2.imwrite(str(db / f"{name}.png"), image[:, :, ::-1])
        for kind in EDITS:
            copy, quality = edit(rng, image, kind)
            q = f"{name}_{kind}"
            cv2.imwrite(str(qdir / f"{q}.jpg"), copy[:, :, ::-1],
                        [cv2.IMWRITE_JPEG_QUALITY, quality])
            rows.append((q, name))
    gt = write_gt(out / "gt.csv", rows)
    return CopySet(db, qdir, gt, len(photos), len(rows))


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Write the copy-detection benchmark set.")
    p.add_argument("out")
    p.add_argument("--distractors", help="a folder of unrelated photos for the database")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    s = make_copy_set(a.out, a.distractors, a.seed)
    print(f"{s.originals} originals, {s.copies} copies -> {a.out} (gt: {s.gt})")


if __name__ == "__main__":
    main()


__all__ = ["CopySet", "make_copy_set", "originals", "edit", "EDITS", "ORIGINALS"]
