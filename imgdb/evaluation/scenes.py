"""A shippable phone-photo benchmark: printed covers photographed in cluttered scenes.

Covers are made from photos that install with pip (scikit-image's samples, scikit-learn's two
sample photos): a crop of one photo (no two covers share pixels), a coloured band and a title of
random words, like a book, a poster or a product box. The database holds each cover's clean
"scan" among distractor covers that are never photographed. Each query is a synthetic phone
photo of one cover: the cover printed into a scene of clutter (textures, notes, shapes: nothing
a cover is made of), covering 0.2-0.6 of the frame's long side, under random perspective, in-plane rotation, blur, glare, exposure, sensor noise and
JPEG compression. Everything follows from `seed`, so a test or benchmark regenerates the same
set anywhere (`python -m imgdb.evaluation.scenes OUT`), and `gt.csv` (query,relevant) is
`imgdb eval --protocol csv` ground truth for `--queries OUT/queries`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# covers are cut from these (each crop used once: no two covers share pixels)
_COVER_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                 "immunohistochemistry", "retina", "colorwheel", "camera", "moon", "coins",
                 "clock", "cell")
# the clutter of the scenes comes from these alone (nothing in the database shares them)
_CLUTTER_PHOTOS = ("page", "text", "brick", "grass", "gravel")
TILE = 224  # side of the disjoint crops covers are made from
_WORDS = ("river", "stone", "night", "garden", "atlas", "paper", "ocean", "signal", "north",
          "winter", "quiet", "machine", "harbor", "forest", "silver", "orbit", "copper",
          "lantern", "meadow", "canyon", "ember", "violet", "summit", "delta", "echo", "mosaic",
          "prairie", "tundra", "zenith", "cobalt", "saffron", "willow")
_CLUTTER_WORDS = ("bread", "milk", "keys", "notes", "tea", "sale", "memo", "bill", "post",
                  "menu", "open", "list")
COVER = (560, 400)  # (height, width) of a clean scan


@dataclass
class SceneSet:
    """Where a generated set lies: the database folder, the query photos and ground truth."""

    database: Path
    queries: Path
    gt: Path
    objects: int
    photos: int


def as_rgb(im) -> np.ndarray:
    """Any sample image (bool, grey, RGBA) as RGB uint8."""
    im = np.asarray(im)
    if im.dtype == bool:
        im = im.astype(np.uint8) * 255
    if im.ndim == 2:
        im = np.repeat(im[:, :, None], 3, axis=2)
    return np.ascontiguousarray(im[:, :, :3]).astype(np.uint8)


def _tiles(rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint TILE x TILE crops of the cover photos (and scikit-learn's two), shuffled."""
    import skimage.data as data
    from sklearn.datasets import load_sample_images

    photos = [as_rgb(getattr(data, n)()) for n in _COVER_PHOTOS]
    photos += [as_rgb(im) for im in load_sample_images().images]
    out = []
    for im in photos:
        h, w = im.shape[:2]
        ny, nx = max(1, h // TILE), max(1, w // TILE)
        oy, ox = (h - ny * TILE) // 2, (w - nx * TILE) // 2
        for y in range(ny):
            for x in range(nx):
                out.append(im[oy + y * TILE:oy + (y + 1) * TILE,
                              ox + x * TILE:ox + (x + 1) * TILE])
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def _clutter_pieces(rng: np.random.Generator) -> list[np.ndarray]:
    """Textures, notes and cards that share nothing with the covers."""
    import cv2
    import skimage.data as data

    pieces = [as_rgb(getattr(data, n)()) for n in _CLUTTER_PHOTOS]
    for _ in range(12):  # hand-written-looking notes and shapes on coloured paper
        h, w = int(rng.integers(200, 400)), int(rng.integers(200, 400))
        card = np.empty((h, w, 3), np.uint8)
        card[:] = rng.integers(120, 256, 3)
        for _ in range(int(rng.integers(3, 7))):
            colour = tuple(int(c) for c in rng.integers(0, 200, 3))
            if rng.random() < 0.5:
                cv2.putText(card, str(rng.choice(_CLUTTER_WORDS)),
                            (int(rng.integers(0, w // 2)), int(rng.integers(30, h))),
                            cv2.FONT_HERSHEY_SCRIPT_SIMPLEX, float(rng.uniform(0.8, 1.6)),
                            colour, 2, cv2.LINE_AA)
            else:
                centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
                cv2.circle(card, centre, int(rng.integers(10, 60)), colour, -1, cv2.LINE_AA)
        pieces.append(card)
    return pieces


def make_cover(rng: np.random.Generator, tile: np.ndarray) -> np.ndarray:
    """A cover: a band with a title of random words above the tile, enlarged."""
    import cv2

    h, w = COVER
    band = int(h * rng.uniform(0.18, 0.3))
    art = cv2.resize(tile, (w, h - band), interpolation=cv2.INTER_CUBIC)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    cover = np.empty((h, w, 3), np.uint8)
    cover[:band] = colour
    cover[band:] = art
    ink = (255, 255, 255) if sum(colour) < 384 else (20, 20, 20)
    words = rng.choice(_WORDS, size=int(rng.integers(2, 4)), replace=False)
    for i, word in enumerate(words[:2]):
        cv2.putText(cover, str(word).upper(), (int(w * 0.06), int(band * (0.45 + 0.4 * i))),
                    cv2.FONT_HERSHEY_DUPLEX, float(rng.uniform(0.9, 1.4)), ink, 2, cv2.LINE_AA)
    if len(words) > 2:
        cv2.putText(cover, str(words[2]), (int(w * 0.06), h - 14), cv2.FONT_HERSHEY_SIMPLEX,
                    0.7, (255, 255, 255), 2, cv2.LINE_AA)
    return cover


def _clutter(rng: np.random.Generator, size: tuple[int, int], pieces: list[np.ndarray]
             ) -> np.ndarray:
    """A background of overlapping, rotated pieces of clutter."""
    import cv2

    h, w = size
    base = pieces[int(rng.integers(len(pieces)))]
    scene = cv2.resize(base, (w, h), interpolation=cv2.INTER_LINEAR)
    for _ in range(int(rng.integers(4, 8))):
        piece = pieces[int(rng.integers(len(pieces)))]
        s = rng.uniform(0.25, 0.6) * max(h, w) / max(piece.shape[:2])
        m = cv2.getRotationMatrix2D((piece.shape[1] / 2, piece.shape[0] / 2),
                                    float(rng.uniform(-60, 60)), s)
        m[:, 2] += (rng.uniform(-0.2, 0.9) * w - piece.shape[1] / 2,
                    rng.uniform(-0.2, 0.9) * h - piece.shape[0] / 2)
        warped = cv2.warpAffine(piece, m, (w, h))
        mask = cv2.warpAffine(np.full(piece.shape[:2], 255, np.uint8), m, (w, h)) > 0
        scene[mask] = warped[mask]
    return scene


def photograph(rng: np.random.Generator, cover: np.ndarray, pieces: list[np.ndarray]
               ) -> np.ndarray:
    """A phone photo of a printed cover among clutter (module docstring)."""
    import cv2

    h, w = (768, 1024) if rng.random() < 0.5 else (1024, 768)
    scene = _clutter(rng, (h, w), pieces).astype(np.float32)
    ch, cw = cover.shape[:2]
    scale = rng.uniform(0.2, 0.6) * max(h, w) / max(ch, cw)  # the cover's share of the frame
    angle = np.deg2rad(rng.uniform(-30, 30))
    corners = np.array([[0, 0], [cw, 0], [cw, ch], [0, ch]], np.float32) - (cw / 2, ch / 2)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    placed = corners @ rot.T * scale
    # perspective: move each corner by up to 12% of the placed size
    extent = placed.max(axis=0) - placed.min(axis=0)
    placed = placed + rng.uniform(-0.12, 0.12, (4, 2)) * extent
    centre = (rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h)
    placed = placed + centre
    hom = cv2.getPerspectiveTransform((corners + (cw / 2, ch / 2)).astype(np.float32),
                                      placed.astype(np.float32))
    warped = cv2.warpPerspective(cover, hom, (w, h), flags=cv2.INTER_LINEAR)
    mask = cv2.warpPerspective(np.full((ch, cw), 255, np.uint8), hom, (w, h)) > 127
    # print: a little less contrast, a paper-white lift, lighting across the page
    printed = warped.astype(np.float32) * rng.uniform(0.75, 0.95) + rng.uniform(5, 25)
    scene[mask] = printed[mask]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gx, gy = rng.uniform(-0.4, 0.4, 2)
    light = 1.0 + gx * (xx / w - 0.5) + gy * (yy / h - 0.5)
    scene *= light[:, :, None] * rng.uniform(0.7, 1.2)
    if rng.random() < 0.6:  # glare: a bright highlight, often on the cover
        cx, cy = placed.mean(axis=0) + rng.normal(0, 0.15, 2) * (w, h)
        r = rng.uniform(0.03, 0.12) * max(h, w)
        scene += rng.uniform(60, 160) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[
            :, :, None]
    sigma = rng.uniform(0.0, 1.5)
    if sigma > 0.3:
        scene = cv2.GaussianBlur(scene, (0, 0), sigma)
    scene += rng.normal(0, rng.uniform(1, 6), scene.shape)
    out = np.clip(scene, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", out[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY,
                                                      int(rng.integers(45, 90))])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]


def make_phone_set(out: str | Path, objects: int = 40, distractors: int = 40, photos: int = 3,
                   seed: int = 0) -> SceneSet:
    """Write `objects` covers and `distractors` never-photographed covers to OUT/database,
    `photos` phone photos of each cover to OUT/queries, and OUT/gt.csv (query,relevant)."""
    import cv2

    out = Path(out)
    rng = np.random.default_rng(seed)
    tiles = _tiles(rng)
    if objects + distractors > len(tiles):
        raise ValueError(f"at most {len(tiles)} covers can be made (objects + distractors)")
    db, qdir = out / "database", out / "queries"
    db.mkdir(parents=True, exist_ok=True)
    qdir.mkdir(parents=True, exist_ok=True)
    covers = [make_cover(rng, tiles[i]) for i in range(objects + distractors)]
    clutter = _clutter_pieces(rng)
    rows = []
    for i, cover in enumerate(covers):
        name = f"cover{i:03d}" if i < objects else f"other{i - objects:03d}"
        cv2.imwrite(str(db / f"{name}.png"), cover[:, :, ::-1])
        if i < objects:
            for j in range(photos):
                q = f"photo{i:03d}_{j}"
                cv2.imwrite(str(qdir / f"{q}.jpg"), photograph(rng, cover, clutter)[:, :, ::-1],
                            [cv2.IMWRITE_JPEG_QUALITY, 95])
                rows.append((q, name))
    gt = write_gt(out / "gt.csv", rows)
    return SceneSet(db, qdir, gt, objects, len(rows))


def write_gt(path: Path, rows) -> Path:
    """`imgdb eval` CSV ground truth: a header, then one (query, relevant) row per query."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["query", "relevant"])
        writer.writerows(rows)
    return path


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Write the synthetic phone-photo benchmark set.")
    p.add_argument("out")
    p.add_argument("--objects", type=int, default=40)
    p.add_argument("--distractors", type=int, default=40)
    p.add_argument("--photos", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    s = make_phone_set(a.out, a.objects, a.distractors, a.photos, a.seed)
    print(f"{s.objects} covers, {s.photos} photos -> {a.out} (gt: {s.gt})")


if __name__ == "__main__":
    main()


__all__ = ["SceneSet", "make_phone_set", "make_cover", "photograph", "as_rgb", "write_gt"]
