"""imgdb serve: the API on a real store and network (FastAPI's TestClient), a real server process
driven by headless Chromium, the micro-batcher, and a store that changes while it is served.

Rankings are checked against the CLI (`imgdb query`, an independent path through run_queries):
the server must answer a new image, a box and query expansion exactly as the CLI does.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import chromium_or_skip, run_cli

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
skimage_data = pytest.importorskip("skimage.data")

from fastapi.testclient import TestClient  # noqa: E402

from imgdb.serve.app import Limits, create_app  # noqa: E402
from imgdb.serve.batcher import MicroBatcher  # noqa: E402
from imgdb.serve.engine import Engine  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "clock", "moon",
          "brick", "gravel")
DESC = "head/gem-p3"


def _rgb(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage_data, name)()).convert("RGB")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """Ten sample photos and two edited copies, EfficientNet-Lite0 at max:192, PCA + index."""
    root = tmp_path_factory.mktemp("serve")
    photos = root / "photos"
    photos.mkdir()
    for name in PHOTOS:
        _rgb(name).save(photos / f"{name}.png")
    _rgb("chelsea").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photos / "chelsea mirrored.jpg")
    _rgb("coffee").resize((200, 150)).save(photos / "coffee small.jpg")
    db = root / "store" / "s.h5"
    db.parent.mkdir()
    run_cli("ingest", str(photos), "--db", str(db), "--backbone", "efficientnet_lite0",
            "--size", "max:192", "--layers", "head", "--pooling", "gem-p3,sum", "--quiet")
    run_cli("fit", "pca", "--db", str(db), "--descriptor", DESC, "--dims", "8")
    run_cli("index", "build", "--db", str(db), "--descriptor", DESC, "--pca", "v1")
    queries = root / "queries"
    queries.mkdir()
    w, h = _rgb("chelsea").size
    _rgb("chelsea").crop((60, 10, w - 40, h - 30)).save(queries / "cat crop.jpg", quality=80)
    _rgb("astronaut").resize((300, 300)).save(queries / "astronaut small.jpg", quality=75)
    return {"db": db, "photos": photos, "queries": queries}


@pytest.fixture(scope="module")
def engine(store):
    eng = Engine(store["db"], device="cpu")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def client(engine):
    return TestClient(create_app(engine, Limits(max_upload_bytes=2 << 20)))


def cli_query(db: Path, *args: str) -> list[tuple[int, float]]:
    out = json.loads(run_cli("query", *args, "--db", str(db), "--json").stdout)
    return [(r["id"], r["score"]) for r in out["queries"][0]["results"]]


def ranking(response) -> list[tuple[int, float]]:
    assert response.status_code == 200, response.text
    return [(r["id"], r["score"]) for r in response.json()["results"]]


def same_ranking(a, b) -> None:
    assert [i for i, _ in a] == [i for i, _ in b]
    np.testing.assert_allclose([s for _, s in a], [s for _, s in b], atol=2e-5)


def row_of(db: Path, name: str) -> int:
    from imgdb.store import open_read

    with open_read(db) as view:
        return next(i for i, p in enumerate(view.paths()) if Path(p).name == name)


def upload(client, path: Path, **fields):
    return client.post("/query", files={"image": (path.name, path.read_bytes(), "image/jpeg")},
                       data={k: str(v) for k, v in fields.items()})


# ---------------------------------------------------------------------------------------------
# answers


def test_info_and_page(client, store) -> None:
    info = client.get("/info").json()
    assert info["images_ok"] == 12 and info["rows"] == 12
    index = [c for c in info["choices"] if c["index"]]
    assert len(index) == 1 and index[0]["state"] == "current" and index[0]["model"] == "v1"
    assert info["default"] == index[0]["key"]
    assert {c["descriptor"].split("/", 1)[1] for c in info["choices"]} == {"head/gem-p3",
                                                                          "head/sum"}
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text and "http" not in \
        page.text.split("<body>")[1]  # nothing from elsewhere
    js = client.get("/static/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_new_image_box_and_qe_match_the_cli(client, store) -> None:
    db, q = store["db"], store["queries"] / "cat crop.jpg"
    r = upload(client, q, k=5)
    body = r.json()
    assert body["query"]["source"] == "extracted" and body["search"]["index"]
    same_ranking(ranking(r), cli_query(db, str(q), "-k", "5"))
    names = [Path(x["path"]).name for x in body["results"][:2]]
    assert set(names) == {"chelsea.png", "chelsea mirrored.jpg"}
    box = "40,20,300,260"
    same_ranking(ranking(upload(client, q, k=4, bbox=box)),
                 cli_query(db, str(q), "-k", "4", "--bbox", box))
    same_ranking(ranking(upload(client, q, k=6, qe=2)),
                 cli_query(db, str(q), "-k", "6", "--qe", "2"))
    exact = ranking(upload(client, q, k=5, index=f"{body['search']['descriptor']}"))
    same_ranking(exact, cli_query(db, str(q), "-k", "5", "--descriptor", DESC, "--exact"))


def test_stored_ids_and_stored_files(client, store) -> None:
    db = store["db"]
    coffee = row_of(db, "coffee.png")
    r = client.post("/query", data={"id": str(coffee), "k": "3"})
    same_ranking(ranking(r), cli_query(db, "--id", str(coffee), "-k", "3"))
    assert r.json()["results"][0]["id"] == coffee
    assert r.json()["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    # the bytes of a stored file: its stored vector answers (no forward)
    r = upload(client, store["photos"] / "coffee.png", k=2)
    assert r.json()["query"]["source"] == "store" and r.json()["query"]["id"] == coffee
    assert r.json()["results"][0]["id"] == coffee
    # a box on a stored image: the stored file cropped, described anew
    r = client.post("/query", data={"id": str(coffee), "k": "3", "bbox": "0,0,300,300"})
    assert r.status_code == 200 and r.json()["query"]["source"] == "extracted"
    # pictures: JPEGs of stored rows only, thumbnails at most 320 px
    for size, side in (("thumb", 320), ("full", 2048)):
        pic = client.get(f"/images/{coffee}?size={size}")
        assert pic.status_code == 200 and pic.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(pic.content)) as im:
            assert max(im.size) <= side and im.size[0] / im.size[1] == pytest.approx(600 / 400,
                                                                                    abs=0.02)


def test_explain_endpoint(client, store) -> None:
    body = upload(client, store["queries"] / "cat crop.jpg", k=3).json()
    token, top = body["query"]["token"], body["results"][0]["id"]
    base = client.get(f"/queries/{token}/image")
    assert base.status_code == 200
    with Image.open(io.BytesIO(base.content)) as im:
        size = im.size
    for kind, on in (("similarity", "query"), ("crow", "result"), ("similarity", "result")):
        r = client.get(f"/explain?map={kind}&on={on}&query={token}&result={top}")
        assert r.status_code == 200, r.text
        info = json.loads(r.headers["x-imgdb-map"])
        assert info["map"] == kind
        with Image.open(io.BytesIO(r.content)) as im:
            assert im.mode == "RGBA"
            if on == "query":
                assert im.size == size
        if kind == "similarity":
            assert info["cells_sum"] + info["bias"] == pytest.approx(info["similarity"], abs=1e-4)
            if on == "query":
                assert info["similarity"] == pytest.approx(body["results"][0]["score"], abs=1e-4)
    r = client.get(f"/explain?map=occlusion&on=query&query={token}&result={top}&patch=96"
                   f"&stride=96")
    assert r.status_code == 200 and json.loads(r.headers["x-imgdb-map"])["patch"] == 96
    r = client.get(f"/explain?map=similarity&query_id={top}&result={top}&style=overlay")
    assert r.status_code == 200
    for bad, status in ((f"/explain?map=nope&query={token}&result={top}", 400),
                        (f"/explain?map=crow&query=deadbeef&result={top}", 404),
                        (f"/explain?map=crow&query={token}&result=999", 404),
                        (f"/explain?map=crow&result={top}", 400),
                        (f"/explain?map=crow&query={token}", 400)):
        r = client.get(bad)
        assert r.status_code == status and "error" in r.json(), (bad, r.text)


# ---------------------------------------------------------------------------------------------
# bad input


TRAVERSALS = ["/images/../../etc/passwd", "/images/..%2F..%2Fetc%2Fpasswd",
              "/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/images/%252e%252e%252fetc%252fpasswd",
              "/images/....//....//etc/passwd", "/images/..\\..\\etc\\passwd",
              "/images/%2Fetc%2Fpasswd", "/images/0/../../../etc/passwd",
              "/images/1?size=../../etc/passwd", "/static/..%2Fengine.py", "/static/index.html",
              "/static/%2e%2e/app.py", "/queries/..%2F..%2Fetc%2Fpasswd/image"]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_path_traversal_is_refused(client, path) -> None:
    r = client.get(path)
    assert 400 <= r.status_code < 500, (path, r.status_code)
    assert r.headers["content-type"].startswith("application/json")
    assert "error" in r.json() and "root:" not in r.text


@pytest.mark.parametrize("image_id,status", [("-1", 400), ("abc", 400), ("1.5", 400),
                                             ("1e3", 400), ("99999", 404), (" 1", 400),
                                             ("0x1", 400), ("99999999999999999999", 400)])
def test_bad_ids(client, image_id, status) -> None:
    assert client.get(f"/images/{image_id}").status_code == status
    r = client.post("/query", data={"id": image_id})
    assert r.status_code == status and "error" in r.json()


def test_bad_uploads(client, engine, store, tmp_path: Path) -> None:
    files = lambda data, name="x.jpg": {"image": (name, data, "image/jpeg")}  # noqa: E731
    r = client.post("/query", files=files(b"this is not a picture" * 10, "x.txt"))
    assert r.status_code == 415 and "not an image" in r.json()["error"]
    assert client.post("/query", files=files(b"")).status_code == 400
    jpeg = (store["queries"] / "cat crop.jpg").read_bytes()
    r = client.post("/query", files=files(jpeg[: len(jpeg) // 3]))
    assert r.status_code == 400 and "truncated" in r.json()["error"]
    tiny = io.BytesIO()
    Image.new("RGB", (20, 20)).save(tiny, format="PNG")
    r = client.post("/query", files=files(tiny.getvalue()))
    assert r.status_code == 400 and "too small" in r.json()["error"]
    # over the byte limit (2 MiB here): by the declared length, before anything is read
    r = client.post("/query", files=files(os.urandom(3 << 20)))
    assert r.status_code == 413 and "limit" in r.json()["error"]
    # over the pixel limit: a small file of a big flat image
    big = io.BytesIO()
    Image.new("RGB", (3000, 2000), (90, 90, 90)).save(big, format="PNG")
    assert len(big.getvalue()) < 1 << 20
    old = engine.max_pixels
    engine.max_pixels = 5_000_000
    try:
        r = client.post("/query", files=files(big.getvalue()))
    finally:
        engine.max_pixels = old
    assert r.status_code == 413 and "too large" in r.json()["error"]


def test_streamed_body_over_the_limit(engine) -> None:
    small = TestClient(create_app(engine, Limits(max_upload_bytes=64 << 10)))

    def chunks():
        for _ in range(40):
            yield b"x" * 4096
    r = small.post("/query", content=chunks(),
                   headers={"content-type": "multipart/form-data; boundary=zz"})
    assert r.status_code == 413


@pytest.mark.parametrize("fields,needle", [
    ({"k": "0"}, "k: must be"), ({"k": "101"}, "k: must be"), ({"k": "ten"}, "k: must be"),
    ({"k": "-3"}, "k: must be"), ({"qe": "-1"}, "qe: '-1': give M"), ({"qe": "99"}, "qe: must be"),
    ({"rerank": "pagerank"}, "rerank: 'pagerank' is not a re-ranking"),
    ({"rerank": "diffusion:k=0"}, "rerank: diffusion: k=0 must be between 1 and 1000"),
    ({"graph": "v1"}, "graph chooses the graph of rerank; give rerank too"),
    ({"bbox": "1,2,3"}, "bbox"), ({"bbox": "a,b,c,d"}, "bbox"), ({"bbox": "50,50,10,10"}, "bbox"),
    ({"bbox": "-5,0,100,100"}, "bbox"), ({"bbox": "nan,0,100,100"}, "bbox"),
    ({"bbox": "0,0,10,10"}, "crop box"), ({"index": "no-such-index"}, "unknown index"),
    ({"descriptor": "pool5/crow"}, "unknown index or descriptor"),
])
def test_bad_parameters(client, store, fields, needle) -> None:
    coffee = row_of(store["db"], "coffee.png")
    r = client.post("/query", data={"id": str(coffee), **fields})
    assert r.status_code == 400, (fields, r.text)
    assert needle in r.json()["error"]


def test_bad_requests(client, store) -> None:
    q = store["queries"] / "cat crop.jpg"
    r = client.post("/query", data={"k": "3"})
    assert r.status_code == 400 and "image file" in r.json()["error"]
    r = client.post("/query", files={"image": ("q.jpg", q.read_bytes(), "image/jpeg")},
                    data={"id": "1"})
    assert r.status_code == 400
    r = client.post("/query", content=b"{\"id\": 1}", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert client.get("/images/1?size=huge").status_code == 400
    assert client.get("/nope").status_code == 404
    assert client.get("/queries/deadbeef/image").status_code == 404


def test_host_header_must_be_local(engine) -> None:
    local = TestClient(create_app(engine, allowed_hosts=["127.0.0.1", "localhost"]),
                       base_url="http://127.0.0.1:8000")
    assert local.get("/info").status_code == 200
    r = local.get("/info", headers={"host": "evil.example:8000"})
    assert r.status_code == 400 and "not served here" in r.json()["error"]


def test_other_sites_pages_are_refused(engine, store) -> None:
    """A page the user visits elsewhere cannot make this server compute: its browser names it
    (Sec-Fetch-Site on every request, Origin on POSTs); the page itself and tools are served."""
    local = TestClient(create_app(engine), base_url="http://127.0.0.1:8000")
    q = store["queries"] / "astronaut small.jpg"
    files = {"image": (q.name, q.read_bytes(), "image/jpeg")}
    for headers in ({"sec-fetch-site": "cross-site"}, {"sec-fetch-site": "same-site"},
                    {"origin": "http://evil.example"}, {"origin": "http://127.0.0.1:3000"},
                    {"origin": "null"}):
        r = local.post("/query", files=files, data={"k": "3"}, headers=headers)
        assert r.status_code == 403 and "other sites" in r.json()["error"], headers
        r = local.get("/explain?map=occlusion&query_id=0&result=1", headers=headers)
        assert r.status_code == 403, headers
    for headers in ({}, {"sec-fetch-site": "same-origin", "origin": "http://127.0.0.1:8000"},
                    {"sec-fetch-site": "none"}):
        assert local.post("/query", files=files, data={"k": "3"},
                          headers=headers).status_code == 200, headers
    assert local.get("/info", headers={"sec-fetch-site": "same-origin"}).status_code == 200


def test_explanation_work_is_bounded(client, store) -> None:
    """patch=1&stride=1 would be one forward per pixel: refused at once with the stride that
    fits; the limit is in /info."""
    limit = client.get("/info").json()["max_occlusion_positions"]
    started = time.perf_counter()
    r = client.get("/explain?map=occlusion&query_id=0&result=1&patch=1&stride=1")
    assert r.status_code == 400 and f"the limit is {limit}" in r.json()["error"]
    assert time.perf_counter() - started < 5
    fit = int(r.json()["error"].rsplit("a stride of ", 1)[1].split()[0])
    r = client.get(f"/explain?map=occlusion&query_id=0&result=1&patch=1&stride={fit - 1}")
    assert r.status_code == 400
    r = client.get(f"/explain?map=occlusion&query_id=0&result=1&patch=48&stride=48")
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------------------------
# concurrency and a changing store


def test_micro_batcher_groups_waiting_requests() -> None:
    gate, calls = threading.Event(), []

    def run(key, items):
        calls.append((key, list(items)))
        if len(calls) == 1:
            gate.wait(5)
        return [x * 10 for x in items]

    b = MicroBatcher(run, max_batch=8, linger=0.0)
    try:
        first = b.submit("a", 1)
        time.sleep(0.2)  # the worker is inside the first batch now
        waiting = [b.submit("a", i) for i in (2, 3, 4)] + [b.submit("b", 5)]
        gate.set()
        assert [f.result(5) for f in [first, *waiting]] == [10, 20, 30, 40, 50]
        assert calls == [("a", [1]), ("a", [2, 3, 4]), ("b", [5])]
    finally:
        b.close()


def test_concurrent_queries_share_forwards(engine, store) -> None:
    """Four uploads at once: each answered as when alone, in fewer forwards than queries."""
    client = TestClient(create_app(engine))
    paths = [store["queries"] / "cat crop.jpg", store["queries"] / "astronaut small.jpg"] * 2
    alone = [ranking(upload(client, p, k=4)) for p in paths[:2]]
    before = len(engine.batcher.batches)
    out: list = [None] * 4

    def ask(i):
        out[i] = ranking(upload(client, paths[i], k=4))
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        same_ranking(out[i], alone[i % 2])
    sizes = list(engine.batcher.batches)[before:]
    assert sum(sizes) == 4 and len(sizes) < 4, sizes


def test_store_changes_while_serving(store, tmp_path: Path) -> None:
    """Ingest adds a photo: the server sees the new row, does not use the now stale index
    (exact search instead, with the rebuild command), and finds the new photo."""
    folder = tmp_path / "store"
    shutil.copytree(store["db"].parent, folder)
    db = folder / store["db"].name
    eng = Engine(db, device="cpu")
    try:
        client = TestClient(create_app(eng))
        q = store["queries"] / "astronaut small.jpg"
        before = upload(client, q, k=3).json()
        assert before["search"]["index"] and not before["search"]["exact"]
        extra = tmp_path / "more"
        extra.mkdir()
        _rgb("astronaut").crop((0, 0, 400, 400)).save(extra / "astronaut part.png")
        run_cli("ingest", str(extra), "--db", str(db), "--backbone", "efficientnet_lite0",
                "--size", "max:192", "--layers", "head", "--pooling", "gem-p3,sum", "--quiet")
        info = client.get("/info").json()
        assert info["rows"] == 13
        assert next(c for c in info["choices"] if c["index"])["state"].startswith("stale")
        after = upload(client, q, k=3).json()
        assert after["search"]["exact"] and "imgdb index build" in after["search"]["note"]
        assert 12 in [r["id"] for r in after["results"]]
        assert client.post("/query", data={"id": "12", "k": "1"}).json()["results"][0]["id"] == 12
        assert client.get("/images/12?size=thumb").status_code == 200
        run_cli("index", "build", "--db", str(db), "--descriptor", DESC, "--pca", "v1")
        again = upload(client, q, k=3).json()
        assert again["search"]["index"] and not again["search"]["exact"]
        same_ranking(ranking_of(again), ranking_of(after))
        # a file that changed since ingest is not served
        (extra / "astronaut part.png").write_bytes((store["photos"] / "coffee.png").read_bytes())
        r = client.get("/images/12?size=full")
        assert r.status_code == 409 and "changed since it was ingested" in r.json()["error"]
    finally:
        eng.close()


def test_a_store_written_again_under_the_same_name_is_served_afresh(store, tmp_path: Path
                                                                     ) -> None:
    """Another store copied over the served file (its bytes into the same inode, the extractor
    at the same revision): answers come from the new store's vectors, never the old's."""
    other = tmp_path / "other"
    other.mkdir()
    for name in ("coins", "moon", "brick"):
        _rgb(name).save(other / f"{name}.png")
    second = tmp_path / "second.h5"
    run_cli("ingest", str(other), "--db", str(second), "--backbone", "efficientnet_lite0",
            "--size", "max:192", "--layers", "head", "--pooling", "gem-p3,sum", "--quiet")
    db = tmp_path / "served.h5"
    shutil.copyfile(store["db"], db)
    eng = Engine(db, device="cpu")
    try:
        client = TestClient(create_app(eng))
        ask = {"id": "1", "k": "3", "descriptor": DESC}
        first = client.post("/query", data=ask).json()
        assert first["results"][0]["id"] == 1 and first["results"][0]["score"] > 0.999
        inode = db.stat().st_ino
        shutil.copyfile(second, db)
        assert db.stat().st_ino == inode
        again = client.post("/query", data=ask).json()
        want = cli_query(second, "--id", "1", "-k", "3", "--exact", "--descriptor", DESC)
        assert len(want) == 3
        same_ranking(ranking_of(again), want)
        assert again["results"][0]["name"] == "coins.png"  # row 1 of brick, coins, moon
    finally:
        eng.close()


def test_crafted_stores_are_served_safely_or_refused(store, tmp_path: Path) -> None:
    """Every checksum right, the content not what imgdb writes: the server refuses to start in
    one line, or answers in JSON with real, finite results (never a plain-text 500)."""
    import h5py

    from imgdb.errors import UserError

    ext = "efficientnet_lite0-imagenet-max192"
    vec = f"descriptors/{ext}/head/gem-p3"

    def nan_rows(fh):
        v = fh[vec][()]
        v[2], v[3] = np.nan, np.inf
        fh[vec][...] = v

    def index_rows(fh):
        name = next(iter(fh["indexes"]))
        rows = fh[f"indexes/{name}/rows"][()]
        rows[:] = rows[0]
        fh[f"indexes/{name}/rows"][...] = rows

    def one_d(fh):
        d = fh[vec][:, 0].copy()
        del fh[f"descriptors/{ext}/head"]["gem-p3"]
        fh[f"descriptors/{ext}/head"].create_dataset("gem-p3", data=d)

    for edit in (nan_rows, index_rows, one_d):
        db = tmp_path / edit.__name__ / "s.h5"
        shutil.copytree(store["db"].parent, db.parent)
        with h5py.File(db, "r+", locking=False) as fh:
            edit(fh)
        try:
            eng = Engine(db, device="cpu", warm=False)
        except UserError as exc:
            assert "repair" in str(exc) and "\n" not in str(exc)
            continue
        try:
            client = TestClient(create_app(eng), raise_server_exceptions=False)
            for row in range(6):
                r = client.post("/query", data={"id": str(row), "k": "5"})
                body = r.json()  # JSON always
                if r.status_code == 200:
                    ids = [h["id"] for h in body["results"]]
                    assert len(ids) == len(set(ids)) and all(np.isfinite(h["score"])
                                                             for h in body["results"])
                else:
                    assert "error" in body and "repair" in body["error"], body
        finally:
            eng.close()


def ranking_of(body: dict) -> list[tuple[int, float]]:
    return [(r["id"], r["score"]) for r in body["results"]]


# ---------------------------------------------------------------------------------------------
# the page in a real browser, against a real `imgdb serve` process


def _chromium() -> str:
    return chromium_or_skip()


@pytest.fixture(scope="module")
def server(store):
    proc = subprocess.Popen([sys.executable, "-m", "imgdb", "serve", "--db", str(store["db"]),
                             "--port", "0", "--device", "cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise AssertionError(f"imgdb serve did not start: {line!r} {proc.stderr.read()}")
    url = "http://" + line.split("http://", 1)[1].split()[0]
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(server):
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        p = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        p.on("pageerror", lambda exc: errors.append(str(exc)))
        p.goto(server)
        p.errors = errors
        yield p
        browser.close()


def until(page, expression: str, timeout: float = 180.0) -> None:
    """Poll a JavaScript expression from here (Playwright's in-page polling evaluates strings,
    which the page's Content-Security-Policy forbids, as it should)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {expression}")
        time.sleep(0.1)


def _thumbnails_loaded(page) -> bool:
    return page.evaluate("""() => {
        const imgs = [...document.querySelectorAll('#results figure img')];
        return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
    }""")


def test_browser_upload_click_box_and_maps(page, store, tmp_path: Path) -> None:
    db = store["db"]
    until(page, "document.querySelectorAll('#choice option').length >= 2")
    assert page.title() == "imgdb"
    page.fill("#k", "6")
    # upload -> ranked thumbnails that load
    page.set_input_files("#file", str(store["queries"] / "cat crop.jpg"))
    until(page, "document.querySelectorAll('#results figure').length === 6")
    until(page, """() => [...document.querySelectorAll('#results figure img')]
                              .every(i => i.complete && i.naturalWidth > 0)""")
    assert _thumbnails_loaded(page)
    ids = [int(x) for x in page.eval_on_selector_all("#results figure",
                                                      "fs => fs.map(f => f.dataset.id)")]
    assert ids == [i for i, _ in cli_query(db, str(store["queries"] / "cat crop.jpg"), "-k", "6")]
    assert "ms" in page.inner_text("#status")
    # click a result -> it becomes the query: the ranking of that stored image
    second = ids[1]
    page.click(f"#results figure[data-id='{second}'] img")
    until(page, f"document.querySelector('#query-caption').textContent"
                f".includes('stored image {second}')")
    shown = [int(x) for x in page.eval_on_selector_all("#results figure",
                                                        "fs => fs.map(f => f.dataset.id)")]
    assert shown == [i for i, _ in cli_query(db, "--id", str(second), "-k", "6")]
    until(page, """() => [...document.querySelectorAll('#results figure img')]
                          .every(i => i.complete && i.naturalWidth > 0)""")
    # draw a box on the query -> a box query
    page.set_input_files("#file", str(store["queries"] / "cat crop.jpg"))
    until(page, "document.querySelector('#query-caption').textContent"
                           ".includes('uploaded')")
    until(page, "document.getElementById('query-img').naturalWidth > 0")
    box = page.locator("#query-img").bounding_box()
    page.mouse.move(box["x"] + 10, box["y"] + 10)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.7, steps=5)
    page.mouse.up()
    until(page, "document.querySelector('#query-caption').textContent.includes('box')")
    assert page.is_visible("#box") and page.is_visible("#clear-box")
    until(page, "document.querySelectorAll('#results figure').length === 6")
    # the maps of a result, as overlays
    page.click("#results figure:first-child button.maps")
    page.wait_for_selector("#maps", state="visible")
    page.click("#maps button[data-map='similarity'][data-on='query']")
    until(page, """() => { const l = document.getElementById('map-query-layer');
        return l.src.startsWith('blob:') && l.complete && l.naturalWidth > 0; }""")
    assert "share of the similarity" in page.inner_text("#map-query-text")
    page.click("#maps button[data-map='crow'][data-on='result']")
    until(page, """() => { const l = document.getElementById('map-result-layer');
        return l.src.startsWith('blob:') && l.complete && l.naturalWidth > 0; }""")
    assert "CroW" in page.inner_text("#map-result-text")
    layer = page.locator("#map-query-layer").bounding_box()
    base = page.locator("#map-query-img").bounding_box()
    assert abs(layer["width"] - base["width"]) < 2 and abs(layer["height"] - base["height"]) < 2
    page.screenshot(path=str(tmp_path / "maps.png"))
    assert page.errors == []


def test_http_verification_draws_where_the_result_lies(client, store) -> None:
    """The crop of chelsea verifies against chelsea, and the fitted transform puts chelsea's
    corners where the crop was cut: (-60, -10) to (w - 60, h - 10) in the crop's pixels."""
    q = store["queries"] / "cat crop.jpg"
    r = client.post("/query", data={"k": "3", "rerank": "verify"},
                    files={"image": (q.name, q.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    first = r.json()["results"][0]
    assert first["name"] == "chelsea.png"
    v = first["verification"]
    assert v["inliers"] >= 30 and len(v["matches"]) >= v["inliers"]  # (each keypoint counted once)
    w, h = _rgb("chelsea").size
    want = np.array([[-60, -10], [w - 60, -10], [w - 60, h - 10], [-60, h - 10]], float)
    assert np.abs(np.array(v["outline"]) - want).max() < 6, v["outline"]
    qx, qy, rx, ry = np.array(v["matches"]).T  # each match: the same point of the cat twice
    assert np.abs(rx - qx - 60).max() < 6 and np.abs(ry - qy - 10).max() < 6
    plain = client.post("/query", data={"k": "3"},
                        files={"image": (q.name, q.read_bytes(), "image/jpeg")}).json()
    assert all("verification" not in hit for hit in plain["results"])


def test_browser_draws_the_verified_matches(page, store, tmp_path: Path) -> None:
    page.reload()
    page.select_option("#rerank", "verify")
    page.set_input_files("#file", str(store["queries"] / "cat crop.jpg"))
    page.wait_for_selector("#results figure .verified", timeout=180_000)
    assert "inliers" in page.inner_text("#results figure:first-child .verified")
    page.click("#results figure:first-child button.matches")
    page.wait_for_selector("#matches", state="visible")
    until(page, "document.querySelector('#matches-canvas').dataset.lines > 0")
    lines = int(page.get_attribute("#matches-canvas", "data-lines"))
    assert lines >= 30
    # something was drawn: the canvas is not blank
    assert page.evaluate("""() => {
        const c = document.querySelector('#matches-canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let green = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i + 1] > 150 && d[i] < 80) green++;
        return green;
    }""") > 100
    assert "inliers" in page.inner_text("#matches-text")
    page.screenshot(path=str(tmp_path / "matches.png"))
    page.click("#matches-close")
    assert page.errors == []


def test_serve_command_line_errors(store, tmp_path: Path) -> None:
    code = ("import sys\nfrom imgdb.cli import main\nsys.argv = ['imgdb'] + sys.argv[1:]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')")
    for args in (["serve", "--help"], ["explain", "--help"]):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
        assert proc.stdout.strip().endswith("ok"), (args, proc.stdout, proc.stderr)
    missing = run_cli("serve", "--db", str(tmp_path / "none.h5"), check=False)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert "does not exist" in missing.stderr
    with __import__("socket").socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = run_cli("serve", "--db", str(store["db"]), "--port", str(port), check=False)
    assert taken.returncode == 1 and "choose another --port" in taken.stderr
    assert "Traceback" not in taken.stderr
    bad = run_cli("serve", "--db", str(store["db"]), "--port", "70000", check=False)
    assert bad.returncode == 2
