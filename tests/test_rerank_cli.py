"""Re-ranking from the command line, as a user runs it: `fit graph`, `models`, `query --rerank`
on a new image file, and `eval --rerank`, on real photos (tests/data: COIL-20 objects)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from helpers import COIL
from imgdb.evaluation.evaluate import EvalOptions, run_eval

NET = ["--backbone", "efficientnet_lite0", "--size", "original", "--layers", "head",
       "--pooling", "gem-p3,mac", "--quiet"]
DESC = "head/gem-p3"


@pytest.fixture(scope="module")
def coil(tmp_path_factory, cli) -> tuple[Path, Path, Path]:
    """(store of the COIL-20 test images, a folder with one new query photo, its ground truth)."""
    top = tmp_path_factory.mktemp("rerank_cli")
    db = top / "coil.h5"
    assert cli("ingest", COIL, "--db", db, *NET).code == 0
    queries = top / "queries"
    queries.mkdir()
    # a file the store does not hold: object 3's first view, turned by 4 degrees
    Image.open(COIL / "obj3__0.png").convert("RGB").rotate(4).save(queries / "obj3_turned.png")
    gt = top / "gt.csv"
    with open(gt, "w", newline="") as fh:
        relevant = ";".join(p.stem for p in sorted(COIL.glob("obj3__*.png")))
        csv.writer(fh).writerow(["obj3_turned", relevant])
    return db, queries, gt


def test_fit_graph_models_and_staleness(cli, coil, tmp_path: Path) -> None:
    db, queries, _ = coil
    work = tmp_path / "c.h5"
    work.write_bytes(db.read_bytes())
    made = json.loads(cli("fit", "graph", "--db", work, "-d", DESC, "--k", "8", "--json").stdout)
    assert made["k"] == 8 and made["image_count"] == len(list(COIL.glob("*.png")))
    listed = json.loads(cli("models", "--db", work, "--json").stdout)
    graph = [m for m in listed if m["kind"] == "graph"]
    assert len(graph) == 1 and graph[0]["current"] is True and graph[0]["id"] == made["model"]
    # a new image makes the graph stale: listed as such, refused by a query with the fix
    assert cli("ingest", queries, "--db", work, *NET).code == 0
    listed = json.loads(cli("models", "--db", work, "--json").stdout)
    stale = [m for m in listed if m["kind"] == "graph"][0]
    assert stale["current"] is False and "changed" in stale["stale_reason"]
    res = cli("query", "--db", work, "--id", "0", "-d", DESC, "--rerank", "diffusion")
    assert res.code == 1 and "stale" in res.stderr and "imgdb fit graph" in res.stderr
    assert res.stderr.count("\n") == 1


@pytest.mark.parametrize("spec", ["diffusion", "kreciprocal", "diffusion:k=6,gamma=2"])
def test_query_of_a_new_image_ranks_as_eval_does(cli, coil, spec: str) -> None:
    db, queries, gt = coil
    work = db.with_name(f"q-{spec.replace(':', '_').replace(',', '_')}.h5")
    work.write_bytes(db.read_bytes())
    assert cli("fit", "graph", "--db", work, "-d", DESC, "--k", "20", "--quiet").code == 0
    res = cli("query", queries / "obj3_turned.png", "--db", work, "-d", DESC, "--rerank", spec,
              "-k", "10", "--json")
    assert res.code == 0, res.stderr
    hits = json.loads(res.stdout)["queries"][0]
    assert hits["source"] == "extracted"  # described from the file, not a stored vector
    ids = [h["id"] for h in hits["results"]]
    result = run_eval(work, gt, EvalOptions(descriptors=[DESC], rerank=[spec],
                                            queries_dir=queries, device="cpu"))
    (key,) = [k for k in result.rankings if k[3] != "L2"]
    assert len(ids) == 10 and ids == [int(r) for r in result.rankings[key][0]]


def test_eval_prints_each_ranking_beside_l2(cli, coil) -> None:
    db, queries, gt = coil
    res = cli("eval", "--db", db, "--gt", gt, "--queries", queries, "-d", DESC, "--rerank",
              "kreciprocal", "--qe", "alpha:3", "--qe", "2", "--csv")
    assert res.code == 0, res.stderr
    rows = list(csv.DictReader(res.stdout.splitlines()))
    assert [r["ranking"] for r in rows] == ["L2", "alpha-QE alpha=3 M=10", "QE M=2",
                                            "kreciprocal k1=20 k2=6 lambda=0.3"]
    text = cli("eval", "--db", db, "--gt", gt, "--queries", queries, "-d", DESC, "--rerank",
               "kreciprocal").stdout
    assert "gem-p3 (1280-D) + kreciprocal k1=20 k2=6 lambda=0.3" in text
