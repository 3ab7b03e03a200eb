"""The offline demo: real sample photos (scikit-image) through the whole pipeline that exists.

Run: python -m imgdb.demo [OUTDIR]   (needs the `demo` and `weights` extras; no network)
It writes the photos plus edited copies (crop, mirror, recompressed thumbnail), ingests them with
the packaged EfficientNet-Lite0 ImageNet weights, shows the store, checks that every edited copy
finds its original as the nearest neighbour, fits PCA-whitening, builds an Annoy index and
queries it with a new photo (table + HTML gallery). Local features kept at ingest then feed two
codebook descriptors (conv-VLAD; MAX-mask + T-emb + democratic aggregation), and `imgdb eval`
scores every descriptor with the edited copies as each photo's group.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "camera", "coins", "moon", "page", "brick", "grass", "gravel", "clock", "cell",
          "horse", "text", "logo", "colorwheel")
EDITED = ("astronaut", "chelsea", "coffee", "rocket", "retina", "clock", "coins", "camera")
DESCRIPTOR = "head/gem-p3"


def write_photos(folder: Path) -> list[tuple[Path, Path]]:
    """Save the sample photos and edited copies; returns (copy, original) pairs."""
    import skimage.data as data
    from PIL import Image, ImageOps

    originals = folder / "photos"
    edits = folder / "photos" / "edited copies"
    originals.mkdir(parents=True, exist_ok=True)
    edits.mkdir(parents=True, exist_ok=True)
    pairs = []
    for name in PHOTOS:
        arr = getattr(data, name)()
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        image = Image.fromarray(arr)
        path = originals / f"{name}.png"
        image.save(path)
        if name in EDITED:
            rgb = image.convert("RGB")
            w, h = rgb.size
            crop = rgb.crop((w // 8, h // 8, w - w // 8, h - h // 8))
            variants = {
                f"{name} crop.jpg": crop,
                f"{name} mirrored.jpg": ImageOps.mirror(rgb),
                f"{name} small.jpg": rgb.resize((max(48, w // 3), max(48, h // 3))),
            }
            for file_name, im in variants.items():
                im.save(edits / file_name, quality=70)
                pairs.append((edits / file_name, path))
    return pairs


def run(*args: str) -> str:
    """Run an imgdb command as a user would, echoing it."""
    print(f"\n$ imgdb {' '.join(shlex.quote(a) for a in args)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "imgdb", *args], capture_output=True, text=True)
    sys.stderr.write(proc.stderr)
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"demo step failed (exit {proc.returncode})")
    return proc.stdout


def nearest_original_check(db: Path, pairs: list[tuple[Path, Path]]) -> int:
    """Each edited copy's nearest neighbour (cosine, excluding itself and other copies)."""
    from .numeric import l2_normalize
    from .store import open_read

    with open_read(db) as view:
        table = view.images()
        info = view.descriptor(DESCRIPTOR)
        x = l2_normalize(view.vectors(info))
        valid = view.valid(info.extractor)
    row = table.row_of()
    originals = np.array([i for i, p in enumerate(table.path) if "edited copies" not in p and valid[i]])
    hits = 0
    print(f"\nnearest original of each edited copy ({info.name}, cosine):")
    for copy, original in pairs:
        sims = x[originals] @ x[row[str(copy)]]
        best = originals[int(np.argmax(sims))]
        ok = table.path[best] == str(original)
        hits += ok
        print(f"  {'ok ' if ok else 'NO '} {copy.name:<28} -> {Path(table.path[best]).name:<26} "
              f"{float(sims.max()):.3f}")
    print(f"{hits}/{len(pairs)} edited copies found their original")
    return hits


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "demo-out").absolute()
    db = out / "demo.h5"
    pairs = write_photos(out)
    print(f"wrote {len(PHOTOS)} sample photos and {len(pairs)} edited copies to {out / 'photos'}")
    ingest = ("ingest", str(out / "photos"), "--db", str(db), "--backbone", "efficientnet_lite0",
              "--size", "max:512", "--keep-local", "block5", "--keep-local", "block5:max", "--quiet")
    run(*ingest)
    run(*ingest)  # the rerun finds nothing to do
    run("info", "--db", str(db))
    hits = nearest_original_check(db, pairs)
    if hits < len(pairs) * 0.8:
        raise SystemExit("demo retrieval check failed: fewer than 80% of copies found their original")
    run("fit", "pca", "--db", str(db), "--descriptor", DESCRIPTOR, "--dims", "16")  # 44 images: keep it small
    run("models", "--db", str(db))
    run("index", "build", "--db", str(db), "--descriptor", DESCRIPTOR, "--pca", "v1")
    run("index", "ls", "--db", str(db))
    # a query photo that is not in the store: extracted exactly as ingest did, then searched
    query = out / "query" / "chelsea close-up.jpg"
    query.parent.mkdir(exist_ok=True)
    from PIL import Image

    with Image.open(out / "photos" / "chelsea.png") as im:
        im.convert("RGB").crop((120, 20, 400, 280)).save(query, quality=80)
    run("query", str(query), "--db", str(db), "-k", "5", "--html", str(out / "gallery.html"))
    print(f"\ngallery page: {out / 'gallery.html'}")
    # codebook descriptors on the local features kept at ingest (44 images: small codebooks;
    # Hoang's rotation + drop 128 needs hundreds of training images, so it is off for T-emb)
    run("fit", "codebook", "--db", str(db), "--local", "block5", "--method", "vlad", "--k", "16",
        "--dims", "16")  # Ng's recipe, PCA-whitened to 16-D instead of 128 (44 images)
    run("encode", "--db", str(db), "--codebook", "v1")
    run("fit", "codebook", "--db", str(db), "--local", "block5:max", "--method", "temb",
        "--k", "8", "--pca-d", "32", "--no-rotate")
    run("encode", "--db", str(db), "--codebook", "v2", "--aggregate", "democratic")
    run("query", str(query), "--db", str(db), "--descriptor", "block5:max/temb", "--exact", "-k", "3")
    # every photo with its edited copies is a group: mAP of each descriptor, the papers' table
    run("eval", "--db", str(db), "--group-regex", r"^([a-z_]+)", "--descriptor", "all")
    print("\nsearch the demo store in a browser: run this, then open http://127.0.0.1:8000/ (drop a "
          "photo, click a result, draw a box, open a result's maps; needs the serve extra)")
    print(f"{shlex.quote(sys.executable)} -m imgdb serve --db {shlex.quote(str(db))}", flush=True)


if __name__ == "__main__":
    main()
