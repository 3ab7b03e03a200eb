"""Local-feature verification: keypoints kept at ingest (bounded, checksummed, repaired, merged,
added to an existing store without a forward) and the `verify` stage of the query path.

Expected values come from the construction: a photo warped by a known homography must be found
again with that homography; an unrelated photo must not verify; a phone photo of a cover printed
into clutter (imgdb.evaluation.scenes) must find its cover first where the global descriptor
alone does not.
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

cv2 = pytest.importorskip("cv2")
data = pytest.importorskip("skimage.data")

from imgdb.features.verifyfeat import (DEFAULT_FEATURES, VerifySettings,  # noqa: E402
                                       rootsift, sift_features)
from imgdb.retrieval.rerank import Collection, QueryContext, Ranking  # noqa: E402
from imgdb.retrieval.verify import Keypoints, Verify, verify_shortlist  # noqa: E402
from imgdb.store import open_read  # noqa: E402

NET = ("--backbone", "efficientnet_lite0", "--workers", "0", "--quiet")
E = "efficientnet_lite0-imagenet-max512"


def keypoints(pixels: np.ndarray, settings: VerifySettings = VerifySettings()) -> Keypoints:
    ls = sift_features(pixels, settings)
    return Keypoints.from_stored(ls.features, ls.coords, ls.grid)


def warp(image: np.ndarray, h: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return cv2.warpPerspective(image, h, size, borderValue=(90, 90, 90))


# ---------------------------------------------------------------------------------------------
# features


def test_features_are_bounded_and_positioned_on_their_grid() -> None:
    img = data.astronaut()
    ls = sift_features(img)
    assert ls.features.dtype == np.uint8 and ls.features.shape[1] == 128
    assert 100 < len(ls.features) <= DEFAULT_FEATURES
    assert ls.grid == (512, 512)  # 512 px is under the 640 px side: detected as it is
    assert ls.coords.dtype == np.int16
    assert (ls.coords >= 0).all() and (ls.coords[:, 0] < 512).all() and (ls.coords[:, 1] < 512).all()
    assert VerifySettings().bytes_per_image() <= 64 * 1024
    big = cv2.resize(img, (1600, 1200))
    assert sift_features(big).grid == (640, 480)  # scaled to the 640 px long side
    # RootSIFT: non-negative unit rows (the Hellinger kernel of the L1-normalised descriptor)
    r = rootsift(ls.features)
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), 1.0, atol=1e-5)
    d = ls.features[0].astype(np.float64)
    np.testing.assert_allclose(r[0], np.sqrt(d / d.sum()), atol=1e-6)
    flat = sift_features(np.full((200, 300, 3), 128, np.uint8))
    assert len(flat.features) == 0 and flat.grid == (300, 200)


def test_a_known_homography_is_recovered() -> None:
    img = data.astronaut()
    # rotate 20 degrees, scale 0.7, tilt: the truth the fit must find
    h = np.array([[0.66, -0.24, 150.0], [0.24, 0.66, 60.0], [0.0002, 0.0001, 1.0]])
    seen = warp(img, h, (640, 560))
    g = verify_shortlist(keypoints(img), [keypoints(seen)])[0]
    assert g.inliers >= 40
    corners = np.array([[100, 100], [400, 120], [380, 420], [120, 400]], np.float32)[:, None]
    found = cv2.perspectiveTransform(corners, g.transform)
    truth = cv2.perspectiveTransform(corners, h)
    assert np.abs(found - truth).max() < 3.0  # pixels
    assert len(np.unique(g.matches[:, 0])) == len(g.matches)  # one match per query keypoint


def test_unrelated_photos_do_not_verify_and_nothing_moves() -> None:
    q = keypoints(data.astronaut())
    others = [keypoints(data.coffee()), keypoints(data.rocket()), keypoints(data.chelsea())]
    assert max(g.inliers for g in verify_shortlist(q, others)) < 12
    # a ranking where nothing verifies comes back exactly as it went in
    coll = Collection(np.eye(3, dtype=np.float32))
    prior = Ranking(np.array([2, 0, 1]), np.array([0.9, 0.5, 0.1], np.float32))
    ctx = QueryContext(q, lambda rows: [others[int(r)] for r in rows])
    out = Verify(k=3).rerank(np.zeros(3, np.float32), prior, coll, None, ctx)
    assert out.order.tolist() == [2, 0, 1]
    np.testing.assert_array_equal(out.scores, prior.scores)


def test_the_verified_image_comes_first_with_the_fused_score() -> None:
    img = data.astronaut()
    h = np.array([[0.8, 0.1, 40.0], [-0.1, 0.8, 30.0], [0.0, 0.0, 1.0]])
    db = [keypoints(data.coffee()), keypoints(data.rocket()), keypoints(img)]
    q = keypoints(warp(img, h, (600, 600)))
    prior = Ranking(np.array([0, 1, 2]), np.array([0.8, 0.7, 0.6], np.float32))
    ctx = QueryContext(q, lambda rows: [db[int(r)] for r in rows])
    out = Verify(k=3).rerank(np.zeros(3, np.float32), prior, Collection(np.eye(3, dtype=np.float32)),
                             None, ctx)
    assert out.order.tolist() == [2, 0, 1]
    g = ctx.found[2]
    assert out.scores[0] == pytest.approx(g.inliers + 0.6, abs=1e-4)
    np.testing.assert_allclose(out.scores[1:], [0.8, 0.7], atol=1e-6)
    # only the first k are verified: with k=2 the photo is not reached
    out2 = Verify(k=2).rerank(np.zeros(3, np.float32), prior,
                              Collection(np.eye(3, dtype=np.float32)), None,
                              QueryContext(q, ctx.database))
    assert out2.order.tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# the store


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("verify_photos")
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"):
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.jpg", quality=92)
    for p in sorted(COIL.glob("obj[1-3]__0.png")):
        shutil.copy(p, folder / p.name)
    return folder


def test_ingest_keeps_keypoints_by_default_and_check_covers_them(photos, tmp_path) -> None:
    db = tmp_path / "s.h5"
    run_cli("ingest", str(photos), "--db", str(db), *NET, "--size", "max:512")
    with open_read(db) as view:
        info = view.verify_set(E)
        assert info is not None and info.images == 8 and info.channels == 128
        assert view.settings(E)["verify"] == {"kind": "sift", "features": 480, "side": 640}
        rows = list(range(8))
        stored = {r: (f, c) for r, f, c in view.iter_local(info, rows)}
        grids = view.local_grids(info, rows)
        paths = view.paths(rows)
    # what is stored is what sift_features finds on the image ingest decoded
    from imgdb.features.images import SizePolicy, load_image

    for r in rows:
        image = load_image(paths[r], SizePolicy.parse("max:512"), (1.0,))
        expect = sift_features(image.pixels[0])
        np.testing.assert_array_equal(stored[r][0], expect.features)
        np.testing.assert_array_equal(stored[r][1], expect.coords)
        assert tuple(grids[r]) == expect.grid
    assert "ok" in run_cli("check", "--db", str(db)).stdout
    # a flipped byte in the keypoints is found by check
    import h5py

    with h5py.File(db, "r") as fh:
        ds = fh[f"local/{E}/verify.sift/features"]
        offset = ds.id.get_chunk_info(0).byte_offset
    with open(db, "r+b") as fh:
        fh.seek(offset + 100)
        b = fh.read(1)
        fh.seek(offset + 100)
        fh.write(bytes([b[0] ^ 0xFF]))
    out = run_cli("check", "--db", str(db), check=False)
    assert out.returncode != 0 and "verify.sift" in out.stdout + out.stderr


def test_keypoints_are_added_to_an_existing_store_without_a_forward(photos, tmp_path) -> None:
    plain, fresh = tmp_path / "plain.h5", tmp_path / "fresh.h5"
    run_cli("ingest", str(photos), "--db", str(plain), *NET, "--size", "max:512",
            "--verify-features", "none")
    run_cli("index", "build", "--db", str(plain), "--descriptor", "head/gem-p3", "--name", "g")
    with open_read(plain) as view:
        assert view.verify_set(E) is None
        before = view.vectors(view.descriptor(f"{E}/head/gem-p3"))
        revision = view.revision(E)
    out = json.loads(run_cli("ingest", str(photos), "--db", str(plain), *NET, "--size",
                             "max:512", "--verify-features", "sift", "--json").stdout)
    assert out["keypoints_added"] == 8 and out["ok"] == 0
    run_cli("ingest", str(photos), "--db", str(fresh), *NET, "--size", "max:512")
    with open_read(plain) as a, open_read(fresh) as b:
        np.testing.assert_array_equal(a.vectors(a.descriptor(f"{E}/head/gem-p3")), before)
        assert a.revision(E) == revision  # the index stays current
        ia, ib = a.verify_set(E), b.verify_set(E)
        fa = {r: (f, c) for r, f, c in a.iter_local(ia, range(8))}
        fb = {r: (f, c) for r, f, c in b.iter_local(ib, range(8))}
        for r in range(8):
            np.testing.assert_array_equal(fa[r][0], fb[r][0])
            np.testing.assert_array_equal(fa[r][1], fb[r][1])
    assert "stale" not in run_cli("index", "ls", "--db", str(plain)).stdout
    # nothing more to add: a rerun does nothing
    again = json.loads(run_cli("ingest", str(photos), "--db", str(plain), *NET, "--size",
                               "max:512", "--json").stdout)
    assert again["keypoints_added"] == 0


def test_repair_and_merge_keep_the_keypoints(photos, tmp_path) -> None:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir(), b_dir.mkdir()
    files = sorted(photos.iterdir())
    for f in files[:4]:
        shutil.copy(f, a_dir / f.name)
    for f in files[4:]:
        shutil.copy(f, b_dir / f.name)
    a, b, m = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "m.h5"
    run_cli("ingest", str(a_dir), "--db", str(a), *NET, "--size", "max:512")
    run_cli("ingest", str(b_dir), "--db", str(b), *NET, "--size", "max:512")
    run_cli("merge", str(a), str(b), "--db", str(m))
    with open_read(a) as va, open_read(b) as vb, open_read(m) as vm:
        expect = [f for _, f, _ in va.iter_local(va.verify_set(E), range(4))] + \
                 [f for _, f, _ in vb.iter_local(vb.verify_set(E), range(4))]
        got = [f for _, f, _ in vm.iter_local(vm.verify_set(E), range(8))]
        assert vm.local_sets()[0].key == "verify.sift"
    assert all(np.array_equal(x, y) for x, y in zip(expect, got))
    run_cli("repair", "--db", str(m))
    with open_read(m) as vm:
        again = [f for _, f, _ in vm.iter_local(vm.verify_set(E), range(8))]
        assert vm.local_sets()[0].features == sum(len(f) for f in got)
    assert all(np.array_equal(x, y) for x, y in zip(got, again))


def test_verify_without_keypoints_is_one_line(photos, tmp_path) -> None:
    db = tmp_path / "none.h5"
    run_cli("ingest", str(photos), "--db", str(db), *NET, "--size", "max:512",
            "--verify-features", "none")
    out = run_cli("query", str(photos / "coffee.jpg"), "--db", str(db), "--descriptor",
                  "head/gem-p3", "--exact", "--rerank", "verify", check=False)
    assert out.returncode != 0
    line = out.stderr.strip()
    assert "\n" not in line and "--verify-features sift" in line and "Traceback" not in line
    bad = run_cli("ingest", str(photos), "--db", str(db), *NET, "--verify-features", "orb",
                  check=False)
    assert bad.returncode == 2 and "--verify-features" in bad.stderr
    bad = run_cli("query", str(photos / "coffee.jpg"), "--db", str(db), "--descriptor",
                  "head/gem-p3", "--exact", "--rerank", "verify:k=0", check=False)
    assert bad.returncode == 2 and "k=0" in bad.stderr


# ---------------------------------------------------------------------------------------------
# phone photos of printed covers


@pytest.fixture(scope="module")
def phone(tmp_path_factory) -> dict:
    from imgdb.evaluation.scenes import make_phone_set

    root = tmp_path_factory.mktemp("phone")
    s = make_phone_set(root, objects=8, distractors=8, photos=2, seed=3)
    db = root / "covers.h5"
    run_cli("ingest", str(s.database), "--db", str(db), *NET, "--size", "max:512",
            "--layers", "head", "--pooling", "spoc")
    return {"set": s, "db": db}


def test_phone_photos_find_their_cover_with_verification(phone) -> None:
    s, db = phone["set"], phone["db"]
    out = run_cli("eval", "--db", str(db), "--gt", str(s.gt), "--queries", str(s.queries),
                  "--rerank", "verify", "--json")
    rows = {c["ranking"]: c["mAP"] for c in json.loads(out.stdout)["results"]}
    (l2,) = [v for k, v in rows.items() if "verify" not in k]
    (verified,) = [v for k, v in rows.items() if "verify" in k]
    assert verified >= 0.8 and verified >= l2 + 0.2, rows
    # the same answers from `imgdb query`: the right cover first for most photos
    truth = dict(csv.reader(open(s.gt)))
    right = 0
    for photo in sorted(s.queries.iterdir()):
        res = json.loads(run_cli("query", str(photo), "--db", str(db), "--descriptor",
                                 "head/spoc", "--exact", "--rerank", "verify", "-k", "3",
                                 "--json").stdout)
        right += Path(res["queries"][0]["results"][0]["path"]).stem == truth[photo.stem]
    assert right >= 0.8 * s.photos


def test_explain_draws_the_inlier_matches(phone, tmp_path) -> None:
    s, db = phone["set"], phone["db"]
    truth = dict(csv.reader(open(s.gt)))
    with open_read(db) as view:
        names = [Path(p).stem for p in view.paths()]
        table = view.images()
    for photo in sorted(s.queries.iterdir())[:4]:  # most photos verify (the test above)
        row = names.index(truth[photo.stem])
        out = json.loads(run_cli("explain", str(photo), "--db", str(db), "--descriptor",
                                 "head/spoc", "--result", str(row), "--out",
                                 str(tmp_path / photo.stem), "--patch", "256",
                                 "--json").stdout)
        v = out["verification"]
        assert v is not None and v["verified"] == (v["inliers"] >= 12)
        if v["verified"]:
            break
    assert v["verified"], "none of four photos verified against its cover"
    assert len(v["matches"]) >= v["inliers"]  # each keypoint counted once
    m = np.array(v["matches"])
    w, h = Image.open(photo).size
    assert (m[:, 0] <= w).all() and (m[:, 1] <= h).all()  # query points in its own pixels
    assert (m[:, 2] <= table.width[row]).all() and (m[:, 3] <= table.height[row]).all()
    assert np.asarray(v["transform"]).shape == (3, 3)
    assert Image.open(v["file"]).size[0] > w * 0.5
    assert "matches.png" in (tmp_path / photo.stem / "index.html").read_text()
