"""Re-ranking that never hurts (retrieval/guard.py): the reciprocity of a graph and the
near-duplicate prefix by hand, and on real collections as a user runs `imgdb eval`: on a
copy-detection set every stage keeps L2's mAP (the published methods lose a lot there), on
views of objects diffusion keeps its gain."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import COIL, OXFORD_CROPS
from imgdb.evaluation.copies import make_copy_set
from imgdb.retrieval import guard
from imgdb.retrieval.rerank import Collection, Diffusion, KReciprocal, QueryExpansion

NET = ["--backbone", "efficientnet_lite0", "--size", "max:256", "--layers", "head",
       "--pooling", "gem-p3", "--verify-features", "none", "--quiet"]


def test_reciprocity_by_hand() -> None:
    # 0 <-> 1 mutual; 2 -> 0 but 0 -> 1; 3 -> 2 and 2 -> 3 (k=2 lists below)
    nbr = np.array([[1, 2], [0, 3], [0, 3], [2, 1]])
    # links: 0->1 (1->0 yes), 0->2 (2->0 yes), 1->0 yes, 1->3 (3->1 yes), 2->0 yes,
    # 2->3 (3->2 yes), 3->2 yes, 3->1 yes: all 8 mutual
    assert guard.graph_reciprocity(nbr, 2) == 1.0
    # k=1: 0->1 (1->0 yes), 1->0 yes, 2->0 (0->2? no), 3->2 (2->3? no): 2 of 4
    assert guard.graph_reciprocity(nbr, 1) == 0.5


def test_sampled_reciprocity_equals_the_graph_on_small_collections() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    coll = Collection(x / np.linalg.norm(x, axis=1, keepdims=True))
    assert guard.sampled_reciprocity(coll, 5, sample=50) == pytest.approx(
        guard.graph_reciprocity(coll.knn(5).neighbours, 5))


def test_near_duplicate_prefix_and_pinning_by_hand() -> None:
    # the first two results are closer to the query than to anything else; the third is not
    assert guard.near_duplicates(np.array([0.9, 0.8, 0.5, 0.9]),
                                 np.array([0.6, 0.8, 0.7, 0.1])) == 2
    assert guard.near_duplicates(np.array([0.5]), np.array([0.6])) == 0
    order, scores = guard.pin_first(np.array([4, 2]), np.array([1, 2, 3, 4]),
                                    np.array([0.9, 0.5, 0.4, 0.1]), top=3)
    assert order.tolist() == [4, 2, 1]
    assert scores.tolist() == pytest.approx([0.9, 0.9, 0.9])  # never rising down the list


def test_a_stage_steps_aside_on_unrelated_images_and_runs_on_a_chain() -> None:
    rng = np.random.default_rng(1)
    # unrelated images as CNN vectors of them are: a common component of varying strength,
    # so that a few "hub" images are in everyone's neighbour list (measured: 61% mutual)
    x = rng.normal(size=(60, 256))
    x[:, :4] += 3 * np.random.default_rng(2).normal(size=(60, 1))
    unrelated = Collection((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    t = np.linspace(0, 1, 60)[:, None]  # one smooth curve: every neighbour list is mutual
    curve = np.hstack([np.cos(3 * t), np.sin(3 * t), np.cos(5 * t), np.sin(5 * t)])
    chain = Collection(curve / np.linalg.norm(curve, axis=1, keepdims=True))
    for stage in (Diffusion(), KReciprocal(), QueryExpansion(10, 3.0)):
        aside = stage.bind(unrelated)
        assert aside.aside and "steps aside" in aside.label, stage.spec
        q = unrelated.vectors[7] + 0.01
        assert aside.rank(q[None], unrelated, 20)[0].order.tolist() == \
            unrelated.search(q, 20).order.tolist()
        assert stage.bind(chain).aside is None, stage.spec
        assert type(stage)(*(() if isinstance(stage, (Diffusion, KReciprocal)) else (10, 3.0)),
                           guard=False).bind(unrelated).aside is None


@pytest.fixture(scope="module")
def copy_set(tmp_path_factory, cli):
    top = tmp_path_factory.mktemp("copies")
    s = make_copy_set(top / "set", OXFORD_CROPS)
    db = top / "copies.h5"
    assert cli("ingest", s.database, "--db", db, *NET).code == 0
    return db, s


@pytest.mark.slow
def test_copy_detection_keeps_l2_under_every_stage(cli_json, copy_set) -> None:
    db, s = copy_set
    out = cli_json("eval", "--db", db, "--gt", s.gt, "--queries", s.queries, "--json",
                   "--rerank", "diffusion", "--rerank", "diffusion:guard=0",
                   "--rerank", "kreciprocal", "--rerank", "kreciprocal:guard=0")
    rows = {r["ranking"]: r["mAP"] for r in out["results"]}
    l2 = rows.pop("L2")
    assert l2 > 0.85
    guarded = {k: v for k, v in rows.items() if "guard=0" not in k}
    assert len(guarded) == 2 and all("steps aside" in k for k in guarded)
    assert all(v >= l2 - 0.01 for v in guarded.values()), rows
    plain = [v for k, v in rows.items() if "guard=0" in k]
    assert min(plain) < l2 - 0.05, rows  # what the guard is there for
    qe = cli_json("eval", "--db", db, "--gt", s.gt, "--queries", s.queries, "--json",
                  "--qe", "alpha:3")
    assert [r["mAP"] for r in qe["results"] if r["ranking"] != "L2"][0] >= l2 - 0.01


@pytest.mark.slow
def test_views_of_objects_keep_the_gain_of_diffusion(cli, cli_json, tmp_path) -> None:
    db = tmp_path / "coil.h5"
    assert cli("ingest", COIL, "--db", db, *NET[:4], "original", *NET[6:]).code == 0
    out = cli_json("eval", "--db", db, "--group-regex", r"(obj\d+)__", "--json",
                   "--rerank", "diffusion:k=5", "--rerank", "diffusion:k=5,guard=0")
    rows = {r["ranking"]: r["mAP"] for r in out["results"]}
    on = next(v for k, v in rows.items() if k.startswith("diffusion") and "guard" not in k)
    off = next(v for k, v in rows.items() if "guard=0" in k)
    assert on > rows["L2"] + 0.02 and on == pytest.approx(off, abs=0.005), rows


def test_query_json_reports_what_each_stage_did(cli, cli_json, copy_set) -> None:
    db, s = copy_set
    first = sorted(s.queries.iterdir())[0]
    cli_json("fit", "graph", "--db", db, "--descriptor", "head/gem-p3", "--json")
    cli_json("index", "build", "--db", db, "--descriptor", "head/gem-p3", "--json")
    original = first.stem.rsplit("_", 1)[0] + ".png"
    for how in (("--rerank", "diffusion"), ("--rerank", "diffusion", "--exact"),
                ("--qe", "alpha:3"), ("--qe", "alpha:3", "--exact")):
        out = cli_json("query", first, "--db", db, *how, "--json")
        stage = out["stages"][0]
        assert stage["applied"] is False and "mutual" in stage["reason"], how
        assert out["queries"][0]["results"][0]["path"].endswith(original), how
        forced = cli_json("query", first, "--db", db, how[0], how[1] + (
            ":guard=0" if how[0] == "--rerank" else ",10,guard=0"), *how[2:], "--json")
        assert forced["stages"][0]["applied"] is True, how
    text = cli("query", first, "--db", db, "--rerank", "diffusion")
    assert text.code == 0 and "steps aside" in text.stderr + text.stdout
