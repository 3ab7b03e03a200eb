"""fit pca / models / index / query through the CLI on a real COIL-20 store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import COIL, chromium_or_skip, run_cli
from imgdb.store import open_read

DESC = "head/gem-p3"


@pytest.fixture(scope="module")
def coil_store(tmp_path_factory) -> tuple[Path, Path]:
    """10 objects x 12 views (every 30 degrees) of COIL-20, with the packaged ImageNet weights."""
    root = tmp_path_factory.mktemp("coil")
    photos = root / "photos"
    photos.mkdir()
    for obj in range(1, 11):
        for view in range(0, 72, 6):
            shutil.copy2(COIL / f"obj{obj}__{view}.png", photos / f"obj{obj}__{view}.png")
    db = root / "coil.h5"
    run_cli("ingest", str(photos), "--db", str(db), "--backbone", "efficientnet_lite0",
            "--layers", "head", "--pooling", "gem-p3,sum", "--size", "original", "--quiet")
    return db, photos


def query_json(*args: str) -> dict:
    return json.loads(run_cli("query", *args, "--json").stdout)


def test_versions_indexes_and_queries(coil_store, tmp_path: Path) -> None:
    src_db, photos = coil_store
    db = tmp_path / "s.h5"
    shutil.copy2(src_db, db)

    v1 = json.loads(run_cli("fit", "pca", "--db", str(db), "--descriptor", DESC, "--dims", "64",
                            "--json").stdout)
    v2 = json.loads(run_cli("fit", "pca", "--db", str(db), "--descriptor", DESC, "--dims", "32",
                            "--no-whiten", "--json").stdout)
    assert (v1["version"], v2["version"]) == ("v1", "v2")
    assert v1["image_count"] == 120 and v1["dims"] == 64 and v2["whiten"] == 0
    listed = json.loads(run_cli("models", "--db", str(db), "--json").stdout)
    assert [m["version"] for m in listed] == ["v1", "v2"]

    run_cli("index", "build", "--db", str(db), "--descriptor", DESC, "--pca", "v1")
    # every ingested photo finds itself first, with exact search and with the index
    all_ids = list(range(120))
    exact = query_json("--db", str(db), "--descriptor", DESC, "--pca", "v1", "--exact",
                       *sum((["--id", str(i)] for i in all_ids), []), "-k", "10")
    annoy = query_json("--db", str(db), *sum((["--id", str(i)] for i in all_ids), []), "-k", "10")
    recall = []
    for i, (e, a) in enumerate(zip(exact["queries"], annoy["queries"])):
        assert e["results"][0]["id"] == i
        assert e["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
        recall.append(len({r["id"] for r in e["results"]} & {r["id"] for r in a["results"]}) / 10)
    assert np.mean(recall) >= 0.95

    # view 0 of an object, as a new file: mostly views of the same object
    same = []
    for obj in range(1, 11):
        out = query_json(str(photos / f"obj{obj}__0.png"), "--db", str(db), "-k", "6")
        names = [Path(r["path"]).name for r in out["queries"][0]["results"][1:]]
        same.append(sum(n.startswith(f"obj{obj}__") for n in names) / len(names))
    assert np.mean(same) >= 0.6

    # v2 appears; the v1 index keeps working
    run_cli("fit", "pca", "--db", str(db), "--descriptor", DESC, "--dims", "16")
    assert query_json("--id", "3", "--db", str(db), "-k", "1")["queries"][0]["results"][0]["id"] == 3
    ls = json.loads(run_cli("index", "ls", "--db", str(db), "--json").stdout)
    assert [i["current"] for i in ls] == [True] and ls[0]["model"].endswith("/v1")

    # removing the model makes the index stale
    model_id = ls[0]["model"]
    run_cli("models", "--db", str(db), "--remove", model_id)
    ls = json.loads(run_cli("index", "ls", "--db", str(db), "--json").stdout)
    assert ls[0]["current"] is False and "removed" in ls[0]["stale_reason"]
    # and the version number is not reused
    again = json.loads(run_cli("fit", "pca", "--db", str(db), "--descriptor", DESC, "--dims", "8",
                               "--json").stdout)
    assert again["version"] == "v4"


def test_stale_after_new_images(coil_store, tmp_path: Path) -> None:
    src_db, photos = coil_store
    db = tmp_path / "s.h5"
    shutil.copy2(src_db, db)
    run_cli("index", "build", "--db", str(db), "--descriptor", DESC, "--pca", "none")
    assert "current" in run_cli("index", "ls", "--db", str(db)).stdout
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy2(COIL / "obj11__0.png", extra / "obj11__0.png")
    run_cli("ingest", str(extra), "--db", str(db), "--backbone", "efficientnet_lite0",
            "--layers", "head", "--pooling", "gem-p3,sum", "--size", "original", "--quiet")
    ls = run_cli("index", "ls", "--db", str(db)).stdout
    assert "STALE" in ls and "store changed" in ls
    refused = run_cli("query", "--id", "0", "--db", str(db), check=False)
    assert refused.returncode == 1
    assert "imgdb index build --db" in refused.stderr and refused.stderr.count("\n") == 1
    # the message's command fixes it
    command = refused.stderr.split("rebuild it with: ")[1].strip().split()
    run_cli(*command[1:])
    assert query_json("--id", "120", "--db", str(db), "-k", "1")["queries"][0]["results"][0]["id"] == 120


def test_bbox_qe_html(coil_store, tmp_path: Path) -> None:
    src_db, photos = coil_store
    db = tmp_path / "s.h5"
    shutil.copy2(src_db, db)
    run_cli("fit", "pca", "--db", str(db), "--descriptor", DESC, "--dims", "48")
    run_cli("index", "build", "--db", str(db), "--descriptor", DESC, "--pca", "v1")
    query_image = photos / "obj4__12.png"
    plain = query_json(str(query_image), "--db", str(db), "-k", "5")
    assert plain["queries"][0]["source"] == "store"
    crop = query_json(str(query_image), "--db", str(db), "-k", "5", "--bbox", "16,16,112,112")
    assert crop["queries"][0]["source"] == "extracted"
    assert crop["queries"][0]["results"][0]["score"] < 0.9999  # a crop is not the stored image
    assert Path(crop["queries"][0]["results"][0]["path"]).name.startswith("obj4__")
    qe = query_json(str(query_image), "--db", str(db), "-k", "5", "--qe", "2")
    assert len(qe["queries"][0]["results"]) == 5
    page = tmp_path / "gallery.html"
    run_cli("query", str(query_image), "--db", str(db), "-k", "4", "--html", str(page))
    text = page.read_text()
    assert text.count("<img") == 5 and "data:image/jpeg;base64," in text
    chromium = chromium_or_skip()
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", """<script>
      window.addEventListener('load', () => {
        const imgs = [...document.images];
        const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
        document.title = 'LOADED ' + ok + ' OF ' + imgs.length;
      });</script></body>"""))
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'chrome'}", "--virtual-time-budget=5000",
                           "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert "<title>LOADED 5 OF 5</title>" in proc.stdout, proc.stderr[-2000:]


def test_killed_index_build_leaves_nothing_registered(tmp_path: Path) -> None:
    """A real kill -9 during a long build: no registry entry, no file in use; a rebuild works."""
    from imgdb.store import STATUS_OK, ImageRow, RowUpdate, StoreWriter

    db = tmp_path / "big.h5"
    rng = np.random.default_rng(0)
    n, d = 100000, 64
    with StoreWriter(db) as writer:
        writer.ensure_extractor("synthetic-none-orig", {"backbone": "synthetic", "layers": ["l"],
                                                        "poolings": ["p"]}, {("l", "p"): d})
        for start in range(0, n, 20000):
            rows = [RowUpdate(None, ImageRow(f"/nowhere/{i}.jpg", 1, 0.0, "0" * 32, 64, 64,
                                             STATUS_OK)) for i in range(start, start + 20000)]
            writer.commit("synthetic-none-orig", rows,
                          {("l", "p"): rng.normal(size=(20000, d)).astype(np.float32)})
    args = [sys.executable, "-m", "imgdb", "index", "build", "--db", str(db), "--descriptor",
            "l/p", "--trees", "300"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(4.0)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with open_read(db) as view:
        assert view.indexes() == []
    assert "no indexes" in run_cli("index", "ls", "--db", str(db)).stdout
    run_cli("index", "build", "--db", str(db), "--descriptor", "l/p", "--trees", "2")
    with open_read(db) as view:  # the rebuild swept what the killed build may have left
        registered = [str(e.attrs["file"]) for e in view.indexes()]
    assert sorted(p.name for p in tmp_path.glob("big.h5.*.ann")) == registered
    assert "current" in run_cli("index", "ls", "--db", str(db)).stdout


def test_store_commands_do_not_import_torch(coil_store, tmp_path: Path) -> None:
    src_db, _ = coil_store
    db = tmp_path / "s.h5"
    shutil.copy2(src_db, db)
    run_cli("index", "build", "--db", str(db), "--descriptor", DESC)
    code = ("import sys\nfrom imgdb.cli import main\nsys.argv = ['imgdb'] + sys.argv[1:]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('TORCHFREE')")
    for args in (["index", "ls"], ["models"], ["info"], ["query", "--id", "7", "-k", "3"]):
        proc = subprocess.run([sys.executable, "-c", code, *args, "--db", str(db)],
                              capture_output=True, text=True)
        assert proc.stdout.strip().endswith("TORCHFREE"), (args, proc.stdout, proc.stderr)
