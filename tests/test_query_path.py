"""One query path: `imgdb query`, `imgdb eval`, the Python API and `imgdb serve` (HTTP) answer
the same question with the same ids and scores, on stores of every kind.

One store holds every kind the query path serves (real photos: COIL-20 objects from tests/data):
a plain extractor (an Annoy index, a sharded index on a PCA model, a kNN graph, a codebook
encoding, a fusion of two layers with its own index) and a second extractor ingested with shape
buckets. Each question (a new image file, a stored id) is asked through every front end, with
and without each re-ranking stage; every pair of answers must agree to 1e-6.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import COIL, run_cli

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")

from fastapi.testclient import TestClient  # noqa: E402

from imgdb.evaluation.evaluate import EvalOptions, run_eval  # noqa: E402
from imgdb.retrieval.request import QueryRequest, parse_qe, parse_rerank  # noqa: E402
from imgdb.retrieval.service import QueryService  # noqa: E402
from imgdb.serve.app import Limits, create_app  # noqa: E402
from imgdb.serve.engine import Engine  # noqa: E402

NET = ("--backbone", "efficientnet_lite0", "--workers", "0", "--quiet")
E = "efficientnet_lite0-imagenet-orig"
EB = "efficientnet_lite0-imagenet-max112-pad32"
GEM, MAC, BLOCK6 = f"{E}/head/gem-p3", f"{E}/head/mac", f"{E}/block6/mac"
FUSION = f"{BLOCK6}+{GEM}"
CODEBOOK = f"{E}+cb1-sum/block5:max/temb"
BUCKETS = f"{EB}/head/gem-p3"
STORED = 5  # a stored image asked by id
K = 10


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("query_path")
    photos = root / "photos"
    photos.mkdir()
    for p in sorted(COIL.glob("obj[1-8]__*.png")):
        shutil.copy(p, photos / p.name)
    queries = root / "queries"
    queries.mkdir()
    # new files of other sizes (padded to a bucket on the bucket extractor): turned, cropped,
    # rescaled views
    Image.open(COIL / "obj3__0.png").convert("RGB").rotate(4).save(queries / "obj3 turned.png")
    Image.open(COIL / "obj5__0.png").convert("RGB").crop((10, 20, 110, 110)).save(
        queries / "obj5 crop.png")
    Image.open(COIL / "obj7__0.png").convert("RGB").resize((150, 120)).save(
        queries / "obj7 wide.jpg", quality=90)
    db = root / "s.h5"
    run_cli("ingest", str(photos), "--db", str(db), *NET, "--size", "original",
            "--layers", "block6,head", "--pooling", "gem-p3,mac", "--keep-local", "block5:max")
    run_cli("ingest", str(photos), "--db", str(db), *NET, "--size", "max:112", "--buckets", "32",
            "--layers", "head", "--pooling", "gem-p3")
    run_cli("fit", "pca", "--db", str(db), "--descriptor", GEM, "--dims", "16")
    run_cli("fit", "codebook", "--db", str(db), "--local", f"{E}/block5:max", "--method", "temb",
            "--k", "8", "--pca-d", "16", "--no-rotate", "--quiet")
    run_cli("encode", "--db", str(db), "--codebook", "v1", "--quiet")
    run_cli("index", "build", "--db", str(db), "--descriptor", MAC, "--name", "plain")
    run_cli("index", "build", "--db", str(db), "--descriptor", GEM, "--pca", "v1",
            "--shards", "2", "--name", "sharded")
    run_cli("index", "build", "--db", str(db), "--descriptor", FUSION, "--name", "fused")
    run_cli("fit", "graph", "--db", str(db), "--descriptor", GEM, "--k", "20")
    names = sorted(p.name for p in queries.iterdir())
    with open_read_paths(db) as paths:
        stored_name = Path(paths[STORED]).stem
    gt, gt_stored = root / "gt.csv", root / "gt-stored.csv"
    with open(gt, "w", newline="") as fh:  # relevance does not matter here: the rankings do
        csv.writer(fh).writerows([Path(n).stem, stored_name] for n in names)
    with open(gt_stored, "w", newline="") as fh:  # a database image as the query
        csv.writer(fh).writerow([stored_name, stored_name])
    return {"db": db, "queries": queries, "files": [queries / n for n in names], "gt": gt,
            "gt_stored": gt_stored, "stored_name": stored_name}


def open_read_paths(db: Path):
    import contextlib

    from imgdb.store import open_read

    @contextlib.contextmanager
    def paths():
        with open_read(db) as view:
            yield view.paths()
    return paths()


@pytest.fixture(scope="module")
def client(world):
    engine = Engine(world["db"], device="cpu")
    yield TestClient(create_app(engine, Limits()))
    engine.close()


# ---------------------------------------------------------------------------------------------
# the four front ends


def via_cli(world, target: dict, query: Path | int, stages: dict) -> list[tuple[int, float]]:
    args = ["query", "--db", str(world["db"]), "-k", str(K), "--json"]
    args += [str(query)] if isinstance(query, Path) else ["--id", str(query)]
    if "index" in target:
        args += ["--index", target["index"]]
    else:
        args += ["--descriptor", target["descriptor"], "--exact"]
        if target.get("model"):
            args += ["--pca", target["model"]]
    if stages.get("qe"):
        args += ["--qe", stages["qe"]]
    if stages.get("rerank"):
        args += ["--rerank", stages["rerank"]]
    if stages.get("regions"):
        args += ["--regions"]
    if stages.get("turns"):
        args += ["--turns"]
    out = json.loads(run_cli(*args).stdout)
    return [(r["id"], r["score"]) for r in out["queries"][0]["results"]]


def via_api(world, target: dict, query: Path | int, stages: dict) -> list[tuple[int, float]]:
    request = QueryRequest(index=target.get("index"), descriptor=target.get("descriptor"),
                           model=target.get("model"), exact="index" not in target, k=K,
                           qe=parse_qe(stages.get("qe", "0")),
                           rerank=parse_rerank(stages["rerank"]) if stages.get("rerank") else (),
                           regions=bool(stages.get("regions")), turns=bool(stages.get("turns")))
    files, ids = ([query], []) if isinstance(query, Path) else ([], [query])
    _, results = QueryService(world["db"], "cpu").answer(request, files, ids)
    return [(h.id, h.score) for h in results[0].hits]


def via_http(client, target: dict, query: Path | int, stages: dict) -> list[tuple[int, float]]:
    data = {"k": str(K), "index": target.get("index") or target["descriptor"]}
    data.update({k: v for k, v in stages.items() if v})
    if isinstance(query, Path):
        r = client.post("/query", data=data,
                        files={"image": (query.name, query.read_bytes(), "image/png")})
    else:
        r = client.post("/query", data={**data, "id": str(query)})
    assert r.status_code == 200, r.text
    return [(x["id"], x["score"]) for x in r.json()["results"]]


def via_eval(world, target: dict, stages: dict) -> dict[str, list[tuple[int, float]]]:
    """Every question at once: {query name: ranking} (the files from the queries folder, the
    stored image from the store)."""
    out = {}
    for gt, folder in ((world["gt"], world["queries"]), (world["gt_stored"], None)):
        opts = EvalOptions(descriptors=[target["descriptor"]], queries_dir=folder,
                           device="cpu", qe=[stages["qe"]] if stages.get("qe") else [],
                           rerank=[stages["rerank"]] if stages.get("rerank") else [],
                           regions=bool(stages.get("regions")), turns=bool(stages.get("turns")))
        if target.get("model"):  # the stored model was fitted on this store with these dims
            opts.pca_on_test, opts.dims = True, [16]
        result = run_eval(world["db"], gt, opts)
        plain = not (stages.get("qe") or stages.get("rerank"))
        views = "+".join(n for n in ("regions", "turns") if stages.get(n))
        (key,) = [k for k in result.rankings
                  if (k[3].split(" + ")[0] == views if views else
                      not k[3].startswith(("regions", "turns")))
                  and (k[3] in ("L2", views)) == plain]
        names = [s.name for s in result.cells[0].per_query]
        for i, n in enumerate(names):
            out[n] = list(zip(map(int, result.rankings[key][i]),
                              map(float, result.scores[key][i])))
    return out


def same(a: list[tuple[int, float]], b: list[tuple[int, float]], what: str) -> None:
    assert [i for i, _ in a] == [i for i, _ in b], what
    # JSON prints scores to 6 decimals: two scores 1e-7 apart may print 1e-6 apart; a verified
    # score (inliers + cosine, float32) near 30 is one float32 step (1.9e-6) from its neighbour
    np.testing.assert_allclose([s for _, s in a], [s for _, s in b], atol=1.5e-6,
                               rtol=float(np.finfo(np.float32).eps),
                               err_msg=what)


TARGETS = {
    "annoy": {"index": "plain"},
    "sharded+pca": {"index": "sharded"},
    "fusion": {"index": "fused"},
    "exact": {"descriptor": GEM},
    "buckets": {"descriptor": BUCKETS},
    "codebook": {"descriptor": CODEBOOK},
    "exact+pca": {"descriptor": GEM, "model": "v1"},
}
STAGES = {
    "none": {},
    "qe": {"qe": "2"},
    "alpha-qe": {"qe": "alpha:3,3"},
    "diffusion": {"rerank": "diffusion"},
    "kreciprocal": {"rerank": "kreciprocal:k1=8,k2=3"},
    "verify": {"rerank": "verify:k=12,inliers=6"},
    "verify+diffusion": {"rerank": "verify:k=12,inliers=6,diffusion"},
    "regions": {"regions": "1"},
    "regions+verify": {"regions": "1", "rerank": "verify:k=12,inliers=6"},
    "turns": {"turns": "1"},
    "regions+turns+diffusion": {"regions": "1", "turns": "1", "rerank": "diffusion"},
}
GRAPH_TARGETS = ("exact",)  # the stored graph: head/gem-p3 without a model


def cases():
    for t in TARGETS:
        for s in STAGES:
            chain = parse_rerank(STAGES[s]["rerank"]) if STAGES[s].get("rerank") else ()
            if any(st.needs_collection for st in chain) and t not in GRAPH_TARGETS:
                continue  # verification reads a shortlist: every target has one
            yield t, s


@pytest.mark.parametrize("target,stages", list(cases()))
def test_every_front_end_gives_the_same_answer(world, client, target: str, stages: str) -> None:
    t, s = TARGETS[target], STAGES[stages]
    serve_ok = "model" not in t  # the server searches an index or a descriptor with L2
    exact = "index" not in t
    by_eval = via_eval(world, t, s) if exact else None
    questions = [*world["files"], STORED]
    for query in questions:
        what = f"{target}/{stages}/{query if isinstance(query, int) else query.name}"
        cli = via_cli(world, t, query, s)
        assert len(cli) == K
        same(via_api(world, t, query, s), cli, what + " api")
        if serve_ok:
            same(via_http(client, t, query, s), cli, what + " http")
        if by_eval is not None:
            if isinstance(query, Path):
                same(by_eval[query.stem], cli, what + " eval")
            else:  # a CSV protocol leaves the query out of its own ranking
                mine = [(i, s) for i, s in cli if i != query]
                same(by_eval[world["stored_name"]][:len(mine)], mine, what + " eval")


def test_buckets_are_padded_for_new_images_everywhere(world, client) -> None:
    """A new image of a size that is no multiple of the bucket is padded to its bucket, as
    ingest padded the stored images: its vector differs from the unpadded one, and the server
    (once: serve described it unpadded) answers as the CLI."""
    from imgdb.features.images import load_query_image
    from imgdb.store import open_read

    q = world["queries"] / "obj5 crop.png"
    with open_read(world["db"]) as view:
        service = QueryService(world["db"], "cpu")
        d = service.describer(view, EB)
        settings = view.settings(EB)
    image = load_query_image(q, settings)
    h, w = image.pixels[0].shape[:2]
    assert (h % 32, w % 32) != (0, 0)  # a size that needs padding
    padded = d.describe(image)[("head", "gem-p3")]
    net = d.network()
    import torch

    plain = net(torch.from_numpy(image.pixels[0])[None])  # the unpadded map's poolings
    assert not np.allclose(padded, plain[("head", "gem-p3")][0], atol=1e-4)
    same(via_http(client, {"descriptor": BUCKETS}, q, {}),
         via_cli(world, {"descriptor": BUCKETS}, q, {}), "buckets")


def test_serve_reranks_and_says_which_stages_ran(world, client) -> None:
    q = world["files"][0]
    r = client.post("/query", data={"index": GEM, "rerank": "diffusion", "k": "5"},
                    files={"image": (q.name, q.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [s.split(":")[0] for s in body["search"]["stages"]] == ["diffusion"]
    assert body["search"]["exact"] is True
    # a re-ranking without a graph for this descriptor: one line, the fix in it
    r = client.post("/query", data={"index": "plain", "rerank": "diffusion", "id": "1"})
    assert r.status_code == 409 and "imgdb fit graph" in r.json()["error"]
