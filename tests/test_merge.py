"""imgdb merge: two half stores equal the whole, merging twice adds nothing, incompatible stores
are refused in one line, a killed merge finishes on rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import run_cli
from imgdb.errors import UserError
from imgdb.store import STATUS_FAILED, StoreWriter, open_read
from imgdb.store.merge import merge_stores
from synth import EXTRACTOR, assert_same_store, make_photos, make_store, snapshot

FAST = ["--backbone", "efficientnet_lite0", "--weights", "none", "--size", "original",
        "--pooling", "sum,mac,gem-p3", "--layers", "head", "--keep-local", "block5:max",
        "--quiet", "--workers", "1"]


@pytest.mark.slow
def test_merge_of_two_halves_equals_the_whole(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    make_photos(photos / "a", 10, seed=1)
    make_photos(photos / "b", 10, seed=2)
    (photos / "a" / "zz-corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg" * 20)
    whole, a, b, merged = (tmp_path / f"{n}.h5" for n in ("whole", "a", "b", "merged"))
    run_cli("ingest", str(photos), "--db", str(whole), *FAST)
    run_cli("ingest", str(photos / "a"), "--db", str(a), *FAST)
    run_cli("ingest", str(photos / "b"), "--db", str(b), *FAST)

    out = json.loads(run_cli("merge", str(a), str(b), "--db", str(merged), "--json").stdout)
    assert (out["added"], out["already"], out["rows_seen"]) == (21, 0, 21)

    ref, got = snapshot(whole), snapshot(merged)
    assert got["paths"] == ref["paths"]  # same rows, same order
    assert len(got["paths"]) == 21 and got["paths"][10].endswith("zz-corrupt.jpg")
    for key in ("sha", "size", "status", "error", "state"):
        assert got[key] == ref[key], key
    assert got["status"][10] == STATUS_FAILED and "corrupt" in got["error"][10].lower() or \
        "cannot" in got["error"][10]
    for e in ref["extractors"]:
        assert {k: v for k, v in got["extractors"][e].items()} == ref["extractors"][e]
    assert ref["vectors"].keys() == got["vectors"].keys() and len(ref["vectors"]) == 6
    for name in ref["vectors"]:
        np.testing.assert_allclose(got["vectors"][name], ref["vectors"][name], rtol=1e-5,
                                   atol=1e-5)
    assert ref["local"].keys() == got["local"].keys()
    for name, rows in ref["local"].items():
        assert [r is None for r in rows] == [r is None for r in got["local"][name]]
        assert sum(r is not None for r in rows) == 20
        for r, g in zip(rows, got["local"][name]):
            if r is not None:
                np.testing.assert_allclose(g[0], r[0], rtol=2e-3, atol=2e-3)  # float16
                assert np.array_equal(g[1], r[1])

    # merging again adds nothing; the store is unchanged
    again = json.loads(run_cli("merge", str(a), str(b), "--db", str(merged), "--json").stdout)
    assert (again["added"], again["already"]) == (0, 21)
    assert snapshot(merged)["paths"] == ref["paths"]
    # the merged store is a store like any other: a later ingest finds nothing to do
    rerun = json.loads(run_cli("ingest", str(photos), "--db", str(merged), *FAST, "--json").stdout)
    assert (rerun["new"], rerun["ok"], rerun["unchanged"]) == (0, 0, 21)


def test_merge_order_duplicates_and_rerun(tmp_path: Path) -> None:
    a = make_store(tmp_path / "a.h5", [f"/p/a{i:04d}.jpg" for i in range(300)], seed=1)
    b = make_store(tmp_path / "b.h5", [f"/p/b{i:04d}.jpg" for i in range(200)]
                   + ["/p/a0007.jpg"], seed=2)
    out = tmp_path / "out.h5"
    s = merge_stores([tmp_path / "b.h5", tmp_path / "a.h5"], out)  # order given: b first
    assert (s.added, s.already, s.different) == (500, 1, 1)  # a0007 is in b already
    with open_read(out) as view:
        paths = view.paths()
        vecs = view.vectors(view.descriptors()[0])
    assert paths[:201] == [f"/p/b{i:04d}.jpg" for i in range(200)] + ["/p/a0007.jpg"]
    assert paths[201:] == [f"/p/a{i:04d}.jpg" for i in range(300) if i != 7]
    assert np.array_equal(vecs[:201], b)
    assert np.array_equal(vecs[201:], np.delete(a, 7, axis=0))
    again = merge_stores([tmp_path / "a.h5", tmp_path / "b.h5"], out)
    assert (again.added, again.already) == (0, 501)


def test_merge_refuses_incompatible_stores_in_one_line(tmp_path: Path) -> None:
    make_store(tmp_path / "a.h5", ["/p/a.jpg"])
    make_store(tmp_path / "size.h5", ["/p/b.jpg"], settings={"backbone": "syn", "layers": ["l"],
                                                             "poolings": ["p"], "size": "max:512"})
    make_store(tmp_path / "dims.h5", ["/p/c.jpg"], dim=32)
    with StoreWriter(tmp_path / "other.h5") as w:
        w.ensure_extractor("vgg16-none-orig", {"backbone": "vgg16"}, {("pool5", "mac"): 8})
    cases = {"size.h5": "differs in size: ", "dims.h5": "64 dims (float32), ",
             "other.h5": "has extractor vgg16-none-orig, which"}
    for name, words in cases.items():
        proc = run_cli("merge", str(tmp_path / "a.h5"), str(tmp_path / name), "--db",
                       str(tmp_path / "out.h5"), check=False)
        assert proc.returncode == 1, proc.stderr
        assert words in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out.h5").exists()  # a refused merge leaves no empty store
    proc = run_cli("merge", str(tmp_path / "a.h5"), "--db", str(tmp_path / "a.h5"), check=False)
    assert proc.returncode == 2 and "output store itself" in proc.stderr
    proc = run_cli("merge", str(tmp_path / "nope.h5"), "--db", str(tmp_path / "o.h5"), check=False)
    assert proc.returncode == 1 and "does not exist" in proc.stderr
    with pytest.raises(UserError, match="differs in size"):  # into an existing OUT too
        merge_stores([tmp_path / "size.h5"], tmp_path / "a.h5")
    # an OUT with rows lacking a shard's extractor: refused (its vectors of rows OUT already
    # holds would be dropped), and OUT is left as it was
    with StoreWriter(tmp_path / "more.h5") as w:
        w.ensure_extractor("vgg16-none-orig", {"backbone": "vgg16"}, {("pool5", "mac"): 8})
    before = snapshot(tmp_path / "a.h5")
    proc = run_cli("merge", str(tmp_path / "more.h5"), "--db", str(tmp_path / "a.h5"),
                   check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "has extractor vgg16-none-orig, which" in proc.stderr and "(1 rows)" in proc.stderr
    assert_same_store(snapshot(tmp_path / "a.h5"), before, rel=0.0)


@pytest.mark.slow
def test_merge_killed_then_rerun_equals_uninterrupted(tmp_path: Path) -> None:
    n = 60_000
    make_store(tmp_path / "a.h5", [f"/p/a{i:06d}.jpg" for i in range(n)], dim=256, seed=1)
    make_store(tmp_path / "b.h5", [f"/p/b{i:06d}.jpg" for i in range(n)], dim=256, seed=2)
    shards = [str(tmp_path / "a.h5"), str(tmp_path / "b.h5")]
    reference = tmp_path / "ref.h5"
    merge_stores(shards, reference)

    db = tmp_path / "killed.h5"
    proc = subprocess.Popen([sys.executable, "-m", "imgdb", "merge", *shards, "--db", str(db),
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            with open_read(db) as view:
                if view.rows >= 10_000:
                    break
        except UserError:
            pass
        time.sleep(0.02)
    assert proc.poll() is None, "merge finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with open_read(db) as view:
        partial = view.rows
    assert 0 < partial < 2 * n
    s = merge_stores(shards, db)
    assert s.added == 2 * n - partial and s.already == partial
    with open_read(db) as view, open_read(reference) as ref:
        assert view.paths() == ref.paths()
        assert np.array_equal(view.vectors(view.descriptors()[0]),
                              ref.vectors(ref.descriptors()[0]))
        assert (view.state(EXTRACTOR) == 1).all()
