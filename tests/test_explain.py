"""Explanation maps on real networks: each map is checked against what is known independently.

- CroW map: an image made of one textured photo patch on a flat grey background; the spatial
  weight S peaks inside the patch (a flat area barely activates the conv features).
- Occlusion map: a copy edited by crop/paste (its left half is the left half of a stored photo,
  its right half another photo) against that stored photo: hiding the shared half costs more
  similarity than hiding the other half.
- Similarity map, exact: with sum pooling and no model, the cells sum to the cosine of the
  query's L2-normalised vector (QueryDescriber, the query path) and the stored vector (ingest)
  with no bias; with PCA-whitening and the other poolings, cells + bias equal the similarity of
  the post-processed vectors computed by the search path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import run_cli

skimage_data = pytest.importorskip("skimage.data")

SIZE = "max:256"
POOLINGS = "sum,crow,gem-p3,mac,spoc,rmac-l3"


def _photo(name: str) -> np.ndarray:
    arr = getattr(skimage_data, name)()
    return np.asarray(Image.fromarray(arr).convert("RGB"))


def textured_on_flat() -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """256x256 flat grey with a 128x128 patch of the cat photo at (x0, y0) = (32, 96): the
    cells of columns 1-4 and rows 3-6 of the head's 8x8 map (stride 32)."""
    canvas = np.full((256, 256, 3), 128, np.uint8)
    cat = np.asarray(Image.fromarray(_photo("chelsea")).resize((128, 128)))
    x0, y0 = 32, 96
    canvas[y0:y0 + 128, x0:x0 + 128] = cat
    return canvas, (x0, y0, x0 + 128, y0 + 128)


def pasted_copy() -> np.ndarray:
    """The left half of the stored 'coffee' photo beside the right half of 'rocket'."""
    coffee = np.asarray(Image.fromarray(_photo("coffee")).resize((256, 192)))
    rocket = np.asarray(Image.fromarray(_photo("rocket")).resize((256, 192)))
    out = rocket.copy()
    out[:, :128] = coffee[:, :128]
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("explain")
    photos = root / "photos"
    photos.mkdir()
    for name in ("coffee", "astronaut", "chelsea", "camera", "clock", "coins", "rocket", "moon",
                 "brick", "grass", "gravel", "hubble_deep_field"):
        Image.fromarray(_photo(name)).save(photos / f"{name}.png")
    db = root / "s.h5"
    run_cli("ingest", str(photos), "--db", str(db), "--backbone", "efficientnet_lite0",
            "--size", SIZE, "--layers", "head", "--pooling", POOLINGS, "--quiet")
    run_cli("fit", "pca", "--db", str(db), "--descriptor", "head/gem-p3", "--dims", "8")
    queries = root / "queries"
    queries.mkdir()
    canvas, _ = textured_on_flat()
    Image.fromarray(canvas).save(queries / "object.png")
    Image.fromarray(pasted_copy()).save(queries / "pasted.png")
    return db, queries


def explainer(db: Path, descriptor: str, model: str | None):
    from imgdb.retrieval.explain import Explainer
    from imgdb.store import open_read

    with open_read(db) as view:
        return Explainer.for_descriptor(view, descriptor, model, "cpu")


def stored(db: Path, descriptor: str, name: str) -> tuple[int, np.ndarray]:
    from imgdb.store import open_read

    with open_read(db) as view:
        row = next(i for i, p in enumerate(view.paths()) if Path(p).name == name)
        return row, view.vectors(view.descriptor(descriptor), [row])[0]


def test_crow_map_peaks_on_the_object(store) -> None:
    db, queries = store
    ex = explainer(db, "head/crow", None)
    image = ex.describer.load(queries / "object.png")
    m = ex.crow_map(image)
    x0, y0, x1, y1 = textured_on_flat()[1]
    assert m.pixels.shape == (256, 256) and m.grid.shape == (8, 8)  # head: stride 32
    inside = np.zeros(m.pixels.shape, bool)
    inside[y0:y1, x0:x1] = True
    peak_y, peak_x = np.unravel_index(np.argmax(m.pixels), m.pixels.shape)
    assert inside[peak_y, peak_x], (peak_x, peak_y)
    cells = np.zeros(m.grid.shape, bool)
    cells[y0 // 32:y1 // 32, x0 // 32:x1 // 32] = True
    assert cells[np.unravel_index(np.argmax(m.grid), m.grid.shape)]
    assert m.grid[cells].mean() > 3 * m.grid[~cells].mean()
    # S is the square root of the L2-normalised channel sum (eq. 3-4, a = b = 2): S^2 has unit
    # L2 norm, so the fourth powers sum to 1
    assert float((m.grid.astype(np.float64) ** 4).sum()) == pytest.approx(1.0, abs=1e-4)


def _pasted_against_coffee(store):
    """(explainer, coffee's stored unit vector, the pasted query image) of head/gem-p3 + v1."""
    db, queries = store
    ex = explainer(db, "head/gem-p3", "v1")
    _, raw = stored(db, "head/gem-p3", "coffee.png")
    return ex, ex.transform.transform(raw[None])[0], ex.describer.load(queries / "pasted.png")


def test_occlusion_map_is_highest_over_the_shared_content(store) -> None:
    ex, target, image = _pasted_against_coffee(store)
    m = ex.occlusion_map(image, target, patch=64, stride=32, batch=8)
    h, w = image.pixels[0].shape[:2]
    assert m.pixels.shape == (h, w) and m.grid.shape == (len(range(0, h - 63, 32)),
                                                         len(range(0, w - 63, 32)))
    assert m.info["similarity"] == pytest.approx(float(ex.vector(image) @ target), abs=1e-5)
    shared, other = m.pixels[:, : w // 2].mean(), m.pixels[:, w // 2:].mean()
    assert shared > other and shared > 0, (shared, other)


def test_occlusion_work_is_bounded_and_stops_when_abandoned(store) -> None:
    from imgdb.errors import UserError
    from imgdb.retrieval.explain import Cancelled

    ex, target, image = _pasted_against_coffee(store)
    h, w = image.pixels[0].shape[:2]
    grid = len(range(0, h - 63, 32)) * len(range(0, w - 63, 32))  # positions, by hand
    with pytest.raises(UserError, match=f"takes {grid} forwards; the limit is {grid - 1}"):
        ex.occlusion_map(image, target, patch=64, stride=32, max_positions=grid - 1)
    forwards = []
    describe_many = ex.describer.describe_many

    def counted(images, *args):
        forwards.append(len(images))
        return describe_many(images, *args)

    ex.describer.describe_many = counted
    asked = []
    with pytest.raises(Cancelled):  # gone after the first batch of 4: no further forward
        ex.occlusion_map(image, target, patch=64, stride=32, batch=4,
                         cancelled=lambda: asked.append(1) or len(asked) > 1)
    assert forwards == [1, 4] and grid > 4  # the unoccluded image, then one batch


def test_similarity_cells_sum_to_the_dot_product(store) -> None:
    """Sum pooling, no model: exact, with the query vector from the query path and the result's
    vector from the store."""
    db, queries = store
    ex = explainer(db, "head/sum", None)
    _, raw = stored(db, "head/sum", "coffee.png")
    image = ex.describer.load(queries / "pasted.png")
    q = ex.describer.describe(image)[("head", "sum")]
    expected = float(q @ raw / (np.linalg.norm(q) * np.linalg.norm(raw)))
    m = ex.similarity_map(image, raw / np.linalg.norm(raw))
    assert m.info["bias"] == 0.0
    assert float(m.grid.sum()) == pytest.approx(expected, abs=1e-4)
    assert float(m.pixels.sum()) == pytest.approx(expected, abs=1e-3)  # spread over pixels
    # the shared half carries more of the match than the pasted-in half
    half = m.grid.shape[1] // 2
    assert m.grid[:, :half].sum() > m.grid[:, half:].sum()


@pytest.mark.parametrize("descriptor,model", [("head/gem-p3", "v1"), ("head/crow", None),
                                              ("head/mac", None), ("head/spoc", None),
                                              ("head/rmac-l3", None)])
def test_similarity_cells_plus_bias_equal_the_similarity(store, descriptor, model) -> None:
    db, queries = store
    ex = explainer(db, descriptor, model)
    _, raw = stored(db, descriptor, "coffee.png")
    target = ex.transform.transform(raw[None])[0]
    image = ex.describer.load(queries / "pasted.png")
    layer, pooling = descriptor.split("/")
    q = ex.transform.transform(ex.describer.describe(image)[(layer, pooling)][None])[0]
    expected = float(q @ target)
    m = ex.similarity_map(image, target)
    assert m.info["similarity"] == pytest.approx(expected, abs=1e-5)
    assert float(m.grid.sum()) + m.info["bias"] == pytest.approx(expected, abs=1e-4)
    if model is None:
        assert m.info["bias"] == 0.0


def test_explain_cli_writes_pictures_arrays_and_a_page(store, tmp_path: Path) -> None:
    db, queries = store
    out = tmp_path / "why"
    summary = json.loads(run_cli("explain", str(queries / "pasted.png"), "--db", str(db),
                                 "--descriptor", "head/gem-p3", "--pca", "v1", "--out", str(out),
                                 "--patch", "96", "--stride", "96", "--json").stdout)
    coffee, _ = stored(db, "head/gem-p3", "coffee.png")
    assert summary["result"] == coffee  # the best match is the photo it shares half with
    names = {Path(m["file"]).name for m in summary["maps"]}
    assert names == {"crow-query.png", "crow-result.png", "similarity-query.png",
                     "similarity-result.png", "occlusion-query.png"}
    for name in names | {"query.png", "result.png"}:
        with Image.open(out / name) as im:
            assert im.size == (256, 192) or name.endswith("result.png")
    arrays = np.load(out / "maps.npz")
    assert arrays["similarity-query"].shape == (192, 256)
    assert "coffee.png" in (out / "index.html").read_text()
    # user errors: one line, exit 1 (2 for usage)
    bad = run_cli("explain", str(queries / "nope.png"), "--db", str(db), "--out", str(out),
                  "--descriptor", "head/sum", check=False)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr
    bad = run_cli("explain", str(queries / "pasted.png"), "--db", str(db), "--out", str(out),
                  "--descriptor", "head/sum", "--result", "999", check=False)
    assert bad.returncode == 1 and "999" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("explain", str(queries / "pasted.png"), "--db", str(db), "--out", str(out),
                  "--patch", "0", check=False)
    assert bad.returncode == 2
