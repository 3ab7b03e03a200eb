"""Generated test inputs: photos drawn with numpy/PIL, and synthetic stores written with
StoreWriter (no data outside the repository)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from imgdb.store import ImageRow, RowUpdate, StoreWriter, open_read


def make_photos(folder: Path, n: int, seed: int = 0, sizes=((96, 80), (72, 96))) -> list[Path]:
    """`n` deterministic images (smooth colour fields with blobs and stripes), PNG and JPEG,
    in a few sizes, named img000.png ..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.zeros((h, w, 3), np.float32)
        for c in range(3):
            fx, fy, ph = rng.uniform(0.02, 0.3, 2).tolist() + [rng.uniform(0, 6.3)]
            img[..., c] = 127 + 100 * np.sin(fx * x + fy * y + ph)
        for _ in range(3):  # blobs
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, 20)
            mask = (x - cx) ** 2 + (y - cy) ** 2 < r * r
            img[mask] = rng.uniform(0, 255, 3)
        pixels = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        ext = "png" if i % 3 else "jpg"
        path = folder / f"img{i:03d}.{ext}"
        Image.fromarray(pixels).save(path, **({"quality": 92} if ext == "jpg" else {}))
        out.append(path)
    return out


EXTRACTOR = "syn-none-orig"


def make_store(path: Path, names: list[str], dim: int = 64, seed: int = 0,
               settings: dict | None = None, chunk: int = 5000) -> np.ndarray:
    """A store of `names` (fake paths) with one descriptor of random vectors; returns them."""
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((len(names), dim)).astype(np.float32)
    with StoreWriter(path) as w:
        w.ensure_extractor(EXTRACTOR, settings or {"backbone": "syn", "layers": ["l"],
                                                   "poolings": ["p"]}, {("l", "p"): dim})
        for lo in range(0, len(names), chunk):
            sub = names[lo:lo + chunk]
            ups = [RowUpdate(None, ImageRow(n, 1000 + lo + i, 1.5, f"{lo + i:032x}", 64, 64, 0))
                   for i, n in enumerate(sub)]
            w.commit(EXTRACTOR, ups, {("l", "p"): vecs[lo:lo + len(sub)]})
    return vecs


def snapshot(db: Path) -> dict:
    """Everything row-aligned a store holds, by path (local features per row)."""
    with open_read(db) as view:
        table = view.images()
        out = {"paths": table.path, "sha": table.sha.tolist(), "size": table.size.tolist(),
               "status": table.status.tolist(), "error": table.error,
               "extractors": {e: view.settings(e) for e in view.extractors()},
               "state": {e: view.state(e).tolist() for e in view.extractors()},
               "vectors": {d.name: view.vectors(d) for d in view.descriptors()}, "local": {}}
        for info in view.local_sets():
            rows = range(view.rows)
            got = {r: (f.astype(np.float32), c) for r, f, c in view.iter_local(info, rows)}
            out["local"][info.name] = [got.get(r) for r in rows]
    return out


def assert_same_store(got: dict, ref: dict, rel: float = 1e-5) -> None:
    """Same rows in the same order, same facts and states, every vector within `rel` of the
    reference (max difference over the vector's largest magnitude), same local features."""
    assert got["paths"] == ref["paths"]
    for key in ("sha", "size", "status", "error", "state"):
        assert got[key] == ref[key], key
    assert got["vectors"].keys() == ref["vectors"].keys()
    for name, r in ref["vectors"].items():
        g = got["vectors"][name]
        assert np.array_equal(np.isnan(g), np.isnan(r)), name
        ok = ~np.isnan(r).any(axis=1)
        diff = np.abs(g[ok] - r[ok]).max(axis=1)
        assert (diff <= rel * np.abs(r[ok]).max(axis=1)).all(), (name, diff.max())
    assert got["local"].keys() == ref["local"].keys()
    for name, rows in ref["local"].items():
        assert [x is None for x in rows] == [x is None for x in got["local"][name]], name
        for x, y in zip(rows, got["local"][name]):
            if x is not None:
                np.testing.assert_allclose(y[0], x[0], rtol=2e-3, atol=2e-3)  # float16
                assert np.array_equal(y[1], x[1])
