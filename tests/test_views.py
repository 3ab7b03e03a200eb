"""Other views of the query (retrieval/views.py): the grid by hand, the merged ranking by hand,
and from the command line: a regional query's scores are the best of the same queries asked
one crop at a time with --bbox (a second way to the same numbers); a photo turned sideways finds
its original with --turns."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import OXFORD_CROPS
from imgdb.retrieval.views import merged_search, query_boxes
from imgdb.retrieval.rerank import Collection

NET = ["--backbone", "efficientnet_lite0", "--size", "max:128", "--layers", "head",
       "--pooling", "gem-p3", "--verify-features", "none", "--quiet"]


def test_grid_by_hand() -> None:
    boxes = query_boxes(640, 480)
    assert len(boxes) == 4 + 9
    # 2 x 2 at 0.6: 384 x 288, at the corners
    assert boxes[:4] == [(0, 0, 384, 288), (256, 0, 640, 288), (0, 192, 384, 480),
                         (256, 192, 640, 480)]
    # 3 x 3 at 0.4: 256 x 192, steps of (640 - 256) / 2 and (480 - 192) / 2
    assert boxes[4] == (0, 0, 256, 192) and boxes[5] == (192, 0, 448, 192)
    assert boxes[8] == (192, 144, 448, 336) and boxes[12] == (384, 288, 640, 480)
    # inside a box of the image: the same grid, shifted and scaled
    inner = query_boxes(640, 480, (100, 50, 300, 250))
    assert inner[0] == (100, 50, 220, 170) and inner[-1] == (220, 170, 300, 250)


def test_merged_ranking_by_hand() -> None:
    x = np.eye(4, dtype=np.float32)  # item i is the unit vector e_i
    coll = Collection(x)
    queries = np.array([[0.9, 0.1, 0.0, 0.0], [0.0, 0.0, 0.3, 0.95]], np.float32)
    got = merged_search(coll, queries, None)
    # best of the two per item: e0 0.9, e1 0.1, e2 0.3, e3 0.95
    assert got.order.tolist() == [3, 0, 2, 1]
    assert got.scores.tolist() == pytest.approx([0.95, 0.9, 0.3, 0.1])
    assert merged_search(coll, queries, 2).order.tolist() == [3, 0]


@pytest.mark.slow
def test_a_regional_query_scores_the_best_of_its_crops(cli, cli_json, tmp_path) -> None:
    db = tmp_path / "r.h5"
    assert cli("ingest", OXFORD_CROPS, "--db", db, *NET).code == 0
    query = sorted(OXFORD_CROPS.iterdir())[3]
    from PIL import Image

    width, height = Image.open(query).size
    base = ("query", query, "--db", db, "-d", "head/gem-p3", "--exact", "-k", "55", "--json")
    regional = cli_json(*base, "--regions")["queries"][0]["results"]
    best: dict[int, float] = {}
    for box in [None, *query_boxes(width, height)]:
        extra = () if box is None else ("--bbox", ",".join(f"{v:g}" for v in box))
        for r in cli_json(*base, *extra)["queries"][0]["results"]:
            best[r["id"]] = max(best.get(r["id"], -1.0), r["score"])
    assert [r["id"] for r in regional] == sorted(best, key=lambda i: (-best[i], i))
    assert [r["score"] for r in regional] == pytest.approx([best[r["id"]] for r in regional],
                                                           abs=1e-5)
    # a stored image queried by id is cropped from its file
    by_id = cli_json("query", "--id", "3", "--db", db, "-d", "head/gem-p3", "--exact", "-k",
                     "55", "--regions", "--json")["queries"][0]["results"]
    assert [r["id"] for r in by_id] == [r["id"] for r in regional]


@pytest.mark.slow
def test_a_sideways_photo_finds_its_original_with_turns(cli, cli_json, tmp_path) -> None:
    from PIL import Image

    db = tmp_path / "t.h5"
    assert cli("ingest", OXFORD_CROPS, "--db", db, *NET).code == 0
    original = sorted(OXFORD_CROPS.iterdir())[7]
    sideways = tmp_path / "sideways.png"  # lossless: the turn back gives the original's pixels
    Image.open(original).convert("RGB").transpose(Image.Transpose.ROTATE_90).save(sideways)
    base = ("query", sideways, "--db", db, "-d", "head/gem-p3", "--exact", "-k", "3", "--json")
    plain = cli_json(*base)["queries"][0]["results"]
    turned = cli_json(*base, "--turns")["queries"][0]["results"]
    assert turned[0]["id"] == 7 and turned[0]["score"] > 0.99
    assert plain[0]["score"] < turned[0]["score"] - 0.05  # sideways, the vector is another
    # the same through eval: one more row, labelled with the views it searched
    gt = tmp_path / "gt.csv"
    gt.write_text(f"query,relevant\nsideways,{original.stem}\n")
    out = cli_json("eval", "--db", db, "--gt", gt, "--queries", tmp_path, "-d", "head/gem-p3",
                   "--turns", "--json")
    rows = {r["ranking"]: r["mAP"] for r in out["results"]}
    assert rows["turns"] == 1.0 and set(rows) == {"L2", "turns"}
