"""Fault injection through the command line, as a user meets it (issue 9's reproductions and
deliverable 7): odd file names, two writers under two names, reads during an ingest, a
file-size limit, a full file system, bytes flipped in the store and in index files, kill -9 of
every writing command, failures that heal, failed weights and copied stores.

Photos are generated here (PIL/numpy); the network is EfficientNet-Lite0 with random weights
at the photos' own small size: these tests check the store, not retrieval quality. Every
failure must be one line on stderr with exit 1 (2 for usage), never a traceback, never
'unexpected', never a signal (exit 139).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from imgdb.store import journal, lock, open_read
from imgdb.store.check import check_store

ROOT = Path(__file__).resolve().parents[1]
NET = ["--backbone", "efficientnet_lite0", "--weights", "none", "--size", "original",
       "--pooling", "sum,mac", "--workers", "1", "--quiet"]
HEAD_SUM = "efficientnet_lite0-none-orig/head/sum"


# ---------------------------------------------------------------------------------------------
# helpers


def make_photos(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (64, 48),
                prefix: str = "g", group: int = 4) -> list[Path]:
    """`n` small photos: smooth colour fields with a few shapes (group k = index // group)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    out = []
    for i in range(n):
        c = rng.random((3, 3))
        img = np.stack([c[k, 0] + c[k, 1] * xx + c[k, 2] * yy for k in range(3)], -1)
        for _ in range(3):
            x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
            img[y0:y0 + rng.integers(4, 16), x0:x0 + rng.integers(4, 16)] = rng.random(3)
        img = np.clip(img / max(1e-6, img.max()), 0, 1)
        path = folder / f"{prefix}{(seed * 1000 + i) // group}_{seed}_{i:03d}.png"
        Image.fromarray((img * 255).astype(np.uint8)).save(path)
        out.append(path)
    return out


@dataclass
class Result:
    code: int
    out: str
    err: str

    def one_line_error(self, code: int = 1) -> str:
        """Assert a clean failure: the exit code, one line on stderr, no traceback."""
        text = self.err.strip()
        assert self.code == code, (self.code, self.out, self.err)
        assert text.count("\n") == 0 and text.startswith("error: "), self.err
        assert "Traceback" not in text and "unexpected" not in text, self.err
        return text


def imgdb(*args: str, env: dict | None = None) -> Result:
    """Run the command line in this process (the network is imported once per test run)."""
    import importlib

    cli = importlib.import_module("imgdb.cli.app")

    out, err = io.StringIO(), io.StringIO()
    old_argv, old_env = sys.argv, dict(os.environ)
    sys.argv = ["imgdb", *map(str, args)]
    os.environ.update(env or {})
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old_argv
        os.environ.clear()
        os.environ.update(old_env)
        cli._STATE["debug"] = False
    return Result(code, out.getvalue(), err.getvalue())


def imgdb_proc(*args: str, env: dict | None = None, preexec=None, timeout: float = 900,
               wrap: tuple[str, ...] = ()) -> Result:
    """Run the command line in a fresh process, as a user would (stdout strict UTF-8)."""
    full = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONIOENCODING="utf-8:strict",
                **(env or {}))
    proc = subprocess.run([*wrap, sys.executable, "-m", "imgdb", *map(str, args)],
                          capture_output=True,
                          text=True, errors="surrogateescape", env=full, preexec_fn=preexec,
                          timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def ok(res: Result) -> Result:
    assert res.code == 0, (res.code, res.out, res.err)
    assert "Traceback" not in res.err
    return res


def ingest(photos: Path, db: Path, *extra: str, proc: bool = False, **kw) -> Result:
    run = imgdb_proc if proc else imgdb
    return run("ingest", photos, "--db", db, *NET, *extra, **kw)


def table(db: Path) -> dict:
    """Rows a reader sees: paths, status, the head/sum vectors."""
    with open_read(db) as view:
        t = view.images()
        info = view.descriptor(HEAD_SUM)
        return {"paths": t.path, "status": t.status.tolist(),
                "state": view.state(info.extractor).tolist(),
                "sum": view.vectors(info).astype(float).tolist()}


def assert_same(got, want, where: object = "", scale: float | None = None) -> None:
    """`got == want`, exactly for everything but floats, which may differ in their last bits:
    oneDNN's kernels on some CPUs round an image's vectors differently with the batch size, and
    a rerun after a stop cuts its batches elsewhere (rows, order, state and text stay exact).
    A vector's components are compared within 1e-4 of its largest one (a component near zero
    carries the same absolute rounding as the others)."""
    if isinstance(want, float) or isinstance(got, float):
        assert isinstance(got, (int, float)) and isinstance(want, (int, float)), (where, got, want)
        tol = 1e-4 * (abs(want) if scale is None else scale) + 1e-6
        assert (math.isnan(got) and math.isnan(want)) or abs(got - want) <= tol, \
            (where, got, want)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (where, got, want)
        for k in want:
            assert_same(got[k], want[k], (where, k))
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), (where, got, want)
        floats = [w for w in want if isinstance(w, float) and not math.isnan(w)]
        vector_scale = max(map(abs, floats)) if floats and len(floats) == len(want) else None
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, (where, i), vector_scale)
    else:
        assert got == want, (where, got, want)


def flip(path: Path, offset: int, nbytes: int = 1) -> None:
    with open(path, "r+b") as f:
        for k in range(nbytes):
            f.seek(offset + k)
            b = f.read(1)
            f.seek(offset + k)
            f.write(bytes([b[0] ^ 0x5A]))


def chunk_span(db: Path, dataset: str, row: int = 0) -> tuple[int, int]:
    """(file offset, bytes) of the stored chunk holding `row` of a dataset."""
    import h5py

    fd = os.open(db, os.O_RDONLY)
    try:
        with h5py.File(lock.fd_path(fd, db), "r", locking=False) as fh:
            ds = fh[dataset]
            info = ds.id.get_chunk_info_by_coord((row // ds.chunks[0] * ds.chunks[0],)
                                                 + (0,) * (ds.ndim - 1))
            return info.byte_offset, info.size
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# reproduction 1: file names that are not UTF-8, or hold newlines and control characters


ODD_NAMES = [b"bad\xff.png", b"new\nline.png", b"tab\tand\x01ctl.png", b"caf\xc3\xa9.png",
             b" lead space.png"]


def test_odd_file_names_round_trip_with_no_fake_rows(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    made = make_photos(photos, 3)
    for k, name in enumerate(ODD_NAMES):
        shutil.copy(made[k % 3], os.path.join(os.fsencode(photos), name))
    db = tmp_path / "names.h5"
    first = json.loads(ok(ingest(photos, db, "--json", proc=True)).out)
    assert (first["new"], first["ok"], first["failed"]) == (8, 8, 0)
    for _ in range(2):  # repeated runs: stable, nothing new, nothing doubled
        again = json.loads(ok(ingest(photos, db, "--json", proc=True)).out)
        assert (again["new"], again["unchanged"], again["ok"]) == (0, 8, 0)
    info = json.loads(ok(imgdb_proc("info", "--db", db, "--json")).out)
    assert info["images"]["total"] == 8 and info["images"]["ok"] == 8
    with open_read(db) as view:
        stored = sorted(os.fsencode(p) for p in view.paths())
    on_disk = sorted(os.path.join(os.fsencode(photos), n) for n in os.listdir(os.fsencode(photos)))
    assert stored == on_disk  # byte for byte, every name
    res = ok(imgdb_proc("query", "--db", db, "--id", "0", "--exact", "-d", HEAD_SUM, "-k", "8",
                        "--json"))
    hits = json.loads(res.out)["queries"][0]["results"]
    assert len(hits) == 8 and all(h["path"] for h in hits)
    assert sorted(os.fsencode(h["path"]) for h in hits) == on_disk
    ok(imgdb_proc("query", "--db", db, "--id", "1", "--exact", "-d", HEAD_SUM))  # text output
    ok(imgdb_proc("info", "--db", db))
    assert check_store(db).ok


# ---------------------------------------------------------------------------------------------
# reproduction 8: failed weights leave no store; a copied store and its index files


def test_failed_weights_leave_no_store(tmp_path: Path) -> None:
    photos = tmp_path / "p"
    make_photos(photos, 2)
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"not a state dict")
    for weights, code in ((str(bad), 1), (str(tmp_path / "missing.pt"), 2)):  # 2: refused at parse
        db = tmp_path / "w.h5"
        args = [a if a != "none" else weights for a in NET]
        imgdb("ingest", photos, "--db", db, *args).one_line_error(code)
        assert not db.exists() and not list(tmp_path.glob(".w.h5*"))


@pytest.mark.slow
def test_copied_store_with_missing_or_other_index_files(tmp_path: Path) -> None:
    photos = tmp_path / "p"
    make_photos(photos, 8)
    db = tmp_path / "orig.h5"
    ok(ingest(photos, db))
    ok(imgdb("index", "build", "--db", db, "--descriptor", HEAD_SUM, "--trees", "3"))
    name = "efficientnet_lite0-none-orig.head.sum.raw"
    want = ok(imgdb("query", "--db", db, "--id", "2", "--index", name, "--json")).out
    # a copy elsewhere without the index file: stale, with the rebuild command
    other = tmp_path / "elsewhere"
    other.mkdir()
    copy = other / "copy.h5"
    shutil.copy(db, copy)
    ls = ok(imgdb("index", "ls", "--db", copy)).out
    assert "STALE: index file orig.h5." in ls and "is missing" in ls
    err = imgdb("query", "--db", copy, "--id", "2", "--index", name).one_line_error()
    assert "is stale" in err and "imgdb index build --db" in err
    # a copy beside the original: the registered file is verified by digest, then used
    near = tmp_path / "near.h5"
    shutil.copy(db, near)
    assert ok(imgdb("query", "--db", near, "--id", "2", "--index", name, "--json")).out == \
        want.replace(str(db), str(near))
    # another file under the registered name: refused as damaged, never loaded
    ann = registered_ann(db, name)
    assert ann.name.startswith(f"orig.h5.{name}.")
    data = ann.read_bytes()
    ann.write_bytes(data[::-1])
    assert "DAMAGED" in ok(imgdb("index", "ls", "--db", near)).out
    err = imgdb("query", "--db", near, "--id", "2", "--index", name).one_line_error()
    assert "is damaged" in err and "rebuild it with: imgdb index build" in err
    assert check_store(copy).ok  # a missing index file is stale, not damage
    assert not check_store(near).ok


# ---------------------------------------------------------------------------------------------
# reproduction 7: failures that heal are retried; one extractor's failure never blocks another


def test_a_failure_under_one_size_does_not_block_another(tmp_path: Path) -> None:
    photos = tmp_path / "p"
    make_photos(photos, 2)
    tall = np.full((1000, 40, 3), 120, np.uint8)
    tall[::7] = 30
    Image.fromarray(tall).save(photos / "tall.png")  # 40 px wide: 10 px at max:256
    db = tmp_path / "t.h5"
    small = [a if a != "original" else "max:256" for a in NET]
    first = json.loads(ok(imgdb("ingest", photos, "--db", db, *small, "--json")).out)
    assert (first["ok"], first["failed"]) == (2, 1)
    assert "tall.png" in first["failures"][0]["path"]
    again = json.loads(ok(imgdb("ingest", photos, "--db", db, *small, "--json")).out)
    assert (again["unchanged"], again["ok"], again["failed"]) == (3, 0, 0)  # permanent: kept
    other = json.loads(ok(ingest(photos, db, "--json")).out)  # --size original: computes it
    assert (other["computed"], other["ok"], other["failed"]) == (3, 3, 0)
    with open_read(db) as view:
        t = view.images()
        row = [i for i, p in enumerate(t.path) if p.endswith("tall.png")][0]
        assert t.status[row] == 0  # the file itself is fine
        assert view.state("efficientnet_lite0-none-max256")[row] == 2  # failed there, only
        assert view.state("efficientnet_lite0-none-orig")[row] == 1
    retried = json.loads(ok(imgdb("ingest", photos, "--db", db, *small, "--json",
                                  "--retry-failed")).out)
    assert (retried["retried"], retried["failed"]) == (1, 1)


def test_corrupt_file_is_retried_on_request_or_when_it_changes(tmp_path: Path) -> None:
    photos = tmp_path / "p"
    make_photos(photos, 2)
    broken = photos / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    db = tmp_path / "c.h5"
    assert json.loads(ok(ingest(photos, db, "--json")).out)["failed"] == 1
    again = json.loads(ok(ingest(photos, db, "--json")).out)
    assert (again["unchanged"], again["retried"]) == (3, 0)  # permanent: not retried
    forced = json.loads(ok(ingest(photos, db, "--json", "--retry-failed")).out)
    assert (forced["retried"], forced["failed"]) == (1, 1)
    make_photos(tmp_path / "fix", 1, seed=5)[0].replace(broken)
    os.utime(broken, (time.time() + 10, time.time() + 10))
    healed = json.loads(ok(ingest(photos, db, "--json")).out)
    assert (healed["changed"], healed["ok"], healed["failed"]) == (1, 1, 0)
    with open_read(db) as view:
        assert len(view.paths()) == 3 and (view.images().status == 0).all()


@pytest.mark.slow
def test_unreadable_file_made_readable_later_is_retried(tmp_path: Path) -> None:
    photos = tmp_path / "p"
    made = make_photos(photos, 3)
    secret = made[1]
    secret.chmod(0)
    db = tmp_path / "u.h5"
    wrap: tuple[str, ...] = ()
    if os.geteuid() == 0:  # root reads anything: drop the capabilities that let it
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: a mode-000 file stays readable")
        wrap = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")
    first = json.loads(ok(ingest(photos, db, "--json", proc=True, wrap=wrap)).out)
    assert (first["ok"], first["failed"]) == (2, 1)
    assert "permission" in first["failures"][0]["error"].lower()
    secret.chmod(0o644)
    second = json.loads(ok(ingest(photos, db, "--json", proc=True, wrap=wrap)).out)
    assert (second["retried"], second["ok"], second["failed"]) == (1, 1, 0)  # transient: retried
    with open_read(db) as view:
        assert (view.images().status == 0).all() and view.rows == 3


# ---------------------------------------------------------------------------------------------
# a store with everything in it (rows, local features, a PCA model, a codebook, an encoding,
# an index), built once; each test works on a copy


INDEX = "efficientnet_lite0-none-orig.head.sum.v1"
PCA_ID = "pca/efficientnet_lite0-none-orig/head/sum/v1"


@pytest.fixture(scope="module")
def full_store(tmp_path_factory) -> Path:
    top = tmp_path_factory.mktemp("full")
    photos = top / "photos"
    make_photos(photos, 12)
    db = top / "full.h5"
    ok(ingest(photos, db, "--keep-local", "block5"))
    ok(imgdb("fit", "pca", "--db", db, "--descriptor", HEAD_SUM, "--dims", "4"))
    ok(imgdb("fit", "codebook", "--db", db, "--local", "block5", "--method", "vlad", "--k", "4",
             "--no-rotate", "--quiet"))
    ok(imgdb("encode", "--db", db, "--codebook", "v1"))
    ok(imgdb("index", "build", "--db", db, "--descriptor", HEAD_SUM, "--pca", "v1", "--trees",
             "3"))
    assert check_store(db).ok
    return db


def registered_ann(db: Path, name: str) -> Path:
    """The file the registry of `db` names for index `name`."""
    with open_read(db) as view:
        return db.with_name(str(view.index(name).attrs["file"]))


def copy_store(src: Path, dst_dir: Path, name: str = "s.h5") -> Path:
    """The store and its index files, under a new name (registered names follow the store's)."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    db = dst_dir / name
    shutil.copy(src, db)
    for ann in src.parent.glob(f"{src.name}.*.ann"):
        shutil.copy(ann, dst_dir / ann.name)
    if name != src.name:  # the registry names the original file: rebuild under the new name
        ok(imgdb("index", "build", "--db", db, "--descriptor", HEAD_SUM, "--pca", "v1",
                 "--trees", "3"))
    return db


READS = [("info", "--json"),
         ("query", "--id", "0", "--exact", "-d", HEAD_SUM, "-k", "12", "--json"),
         ("query", "--id", "5", "--exact", "-d", HEAD_SUM, "--pca", "v1", "-k", "12", "--json"),
         ("eval", "--group-regex", r"g(\d+)_", "-d", HEAD_SUM, "--json"),
         ("eval", "--group-regex", r"g(\d+)_", "-d",
          "efficientnet_lite0-none-orig+cb1-sum/block5/vlad", "--json")]


def answers(db: Path) -> list[Result]:
    return [imgdb(*args[:1], "--db", db, *args[1:]) for args in READS]


def same_answer(a: Result, b: Result, db_a: Path, db_b: Path) -> bool:
    keep = ("file_bytes", "modified", "seconds", "build_seconds")

    def norm(text: str, db: Path) -> object:
        data = json.loads(text.replace(str(db), "DB"))
        if isinstance(data, dict):
            for k in keep:
                data.pop(k, None)
        return data

    return a.code == b.code == 0 and norm(a.out, db_a) == norm(b.out, db_b)


# ---------------------------------------------------------------------------------------------
# reproduction 5: damage inside the store is detected and named; never a silent wrong answer


TARGETS = {  # dataset -> the command outputs it feeds (indexes into READS)
    "descriptors/efficientnet_lite0-none-orig/head/sum": {1, 2, 3},
    "images/size": {0},
    "images/path_data": {0, 1, 2, 3, 4},
    "local/efficientnet_lite0-none-orig/block5/features": set(),
    f"models/{PCA_ID}/components": {2},
    "models/codebook/efficientnet_lite0-none-orig/block5/v1/centroids": set(),
}


@pytest.mark.parametrize("dataset", sorted(TARGETS))
def test_flipped_bytes_in_a_dataset_are_named_and_repaired(tmp_path: Path, full_store: Path,
                                                          dataset: str) -> None:
    db = copy_store(full_store, tmp_path)
    intact = answers(db)
    assert all(r.code == 0 for r in intact), [r.err for r in intact]
    reference = table(db)
    start, size = chunk_span(db, dataset, 0)
    flip(db, start + size // 2, 2)
    res = imgdb("check", "--db", db)
    assert res.code == 1 and f"/{dataset}: fails its checksum" in res.out, res.out
    assert "imgdb repair --db" in res.err
    for i, (args, before, after) in enumerate(zip(READS, intact, answers(db))):
        if i in TARGETS[dataset]:
            text = after.one_line_error()
            assert "is damaged" in text and "imgdb check --db" in text, text
        else:  # what does not read the damaged chunk answers as before
            assert same_answer(before, after, db, db), (args, after.err)
    rep = ok(imgdb("repair", "--db", db, "--json"))
    report = json.loads(rep.out)
    assert Path(report["backup"]).exists() and check_store(db).ok
    after = table(db)
    assert after["paths"] == reference["paths"] or report["lost_rows"] > 0
    rerun = json.loads(ok(ingest(full_store.parent / "photos", db, "--keep-local", "block5",
                                 "--json")).out)
    assert rerun["failed"] == 0
    final = table(db)
    live = [i for i, s in enumerate(final["status"]) if s == 0]
    by_path = {p: i for i, p in enumerate(reference["paths"])}
    for i in live:  # every row back, with the vectors an uninterrupted run computed
        j = by_path[final["paths"][i]]
        assert_same(final["sum"][i], reference["sum"][j], final["paths"][i])
        assert final["state"][i] == 1
    assert sorted(final["paths"][i] for i in live) == sorted(reference["paths"])
    assert check_store(db).ok


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(12))
def test_random_flips_anywhere_give_the_same_answer_or_one_line(tmp_path: Path,
                                                               full_store: Path,
                                                               seed: int) -> None:
    db = copy_store(full_store, tmp_path)
    intact = answers(db)
    rng = random.Random(seed)
    size = db.stat().st_size
    for _ in range(rng.choice([1, 3, 10])):
        flip(db, rng.randrange(journal.HEADER_SIZE, size), 1)
    damaged = not check_store(db).ok
    changed = False
    for args, before, after in zip(READS, intact, answers(db)):
        if after.code == 0:
            assert same_answer(before, after, db, db), (seed, args)  # never silently different
        else:
            after.one_line_error()
            changed = True
    assert damaged or not changed  # a command that fails always has damage check can name


# ---------------------------------------------------------------------------------------------
# reproduction 4: damaged index files are refused before Annoy maps them


def test_a_copy_never_removes_or_replaces_the_originals_index_files(tmp_path: Path,
                                                                    full_store: Path) -> None:
    db = copy_store(full_store, tmp_path / "a", "full.h5")  # the original, with its own files
    ann = registered_ann(db, INDEX)
    data = ann.read_bytes()
    want = ok(imgdb("query", "--db", db, "--id", "3", "--index", INDEX, "--json")).out
    copy = db.with_name("copy.h5")
    shutil.copy(db, copy)  # its registry names full.h5's file
    ok(imgdb("index", "rm", INDEX, "--db", copy))
    assert ann.read_bytes() == data
    shutil.copy(db, copy)
    ok(imgdb("index", "build", "--db", copy, "--descriptor", HEAD_SUM, "--pca", "v1",
             "--trees", "3"))  # a rebuild on the copy: files of its own
    assert ann.read_bytes() == data and registered_ann(copy, INDEX).name.startswith("copy.h5.")
    backup = db.with_name("full.h5.bak-20261207T000000")  # as repair leaves one
    shutil.copy(db, backup)
    ok(imgdb("index", "rm", INDEX, "--db", backup))
    assert ann.read_bytes() == data
    assert ok(imgdb("query", "--db", db, "--id", "3", "--index", INDEX, "--json")).out == want
    assert "current" in ok(imgdb("index", "ls", "--db", db)).out


def test_a_first_build_that_fails_at_registration_leaves_no_file(tmp_path: Path,
                                                                full_store: Path,
                                                                monkeypatch) -> None:
    from imgdb.store.writer import StoreWriter

    db = copy_store(full_store, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())

    def refuse(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StoreWriter, "register_index", refuse)
    res = imgdb("index", "build", "--db", db, "--descriptor", HEAD_SUM, "--name", "first",
                "--trees", "3")
    assert res.code != 0 and "Traceback" not in res.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no unregistered .ann left


def test_index_files_of_a_private_store_are_private(tmp_path: Path, full_store: Path) -> None:
    db = copy_store(full_store, tmp_path)
    db.chmod(0o600)
    old = os.umask(0o022)  # the usual umask would leave new files readable by all
    try:
        ok(imgdb("index", "build", "--db", db, "--descriptor", HEAD_SUM, "--pca", "v1",
                 "--name", "sharded", "--trees", "3", "--shards", "2"))
        ok(imgdb(*_rebuild(db)))
        ok(imgdb("repair", "--db", db))
    finally:
        os.umask(old)
    made = [p for p in tmp_path.iterdir() if p.name.startswith("s.h5")]
    assert len([p for p in made if p.name.endswith(".ann")]) == 3, made
    for path in made:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, (path.name, oct(path.stat().st_mode))
    assert not list(tmp_path.glob(".s.h5.*"))  # no build room or repair file left behind


def test_repair_under_a_file_size_limit_refuses_before_writing(tmp_path: Path,
                                                              full_store: Path) -> None:
    db = copy_store(full_store, tmp_path)
    before = db.read_bytes()
    res = imgdb_proc("repair", "--db", db, preexec=_limit(len(before) // 2))
    text = res.one_line_error()  # never exit 139 after a page of HDF5 tracebacks
    assert "file-size limit" in text and "nothing was changed" in text
    assert db.read_bytes() == before and not list(tmp_path.glob(".s.h5.repair-*"))
    assert not list(tmp_path.glob("s.h5.bak-*"))
    ok(imgdb_proc("repair", "--db", db, preexec=_limit(4 * len(before))))
    assert check_store(db).ok


@pytest.mark.parametrize("keep", [-1, 0.5])
def test_a_store_cut_short_is_repaired_and_the_next_ingest_restores_it(
        tmp_path: Path, keep: float) -> None:
    photos = tmp_path / "p"
    make_photos(photos, 6)
    db = tmp_path / "cut.h5"
    ok(ingest(photos, db))
    size = db.stat().st_size
    with open(db, "r+b") as f:  # a copy that stopped early, a disk that filled up
        f.truncate(size - 1 if keep == -1 else int(size * keep))
    assert not check_store(db).ok
    res = ok(imgdb("repair", "--db", db))
    assert "rebuilt 6 rows" in res.out and check_store(db).ok
    again = json.loads(ok(ingest(photos, db, "--json")).out)
    assert again["failed"] == 0
    with open_read(db) as view:  # every photo is an ingested image again
        names = {Path(p).name for p, s in zip(view.paths(), view.column("status")) if s == 0
                 and p}
        assert names == {p.name for p in photos.iterdir()}
    assert check_store(db).ok


# ---------------------------------------------------------------------------------------------
# crafted stores: every checksum right, the content not what imgdb writes

_VEC = "descriptors/efficientnet_lite0-none-orig/head/sum"


def _replace(fh, path: str, data) -> None:
    parent, _, name = path.rpartition("/")
    del fh[parent][name]
    fh[parent].create_dataset(name, data=data)


def _set_rows(fh, path: str, fn) -> None:
    v = fh[path][()]
    fn(v)
    fh[path][...] = v


CRAFTED = {  # name -> (edit of the HDF5 file, what check says)
    "1-D vectors": (lambda fh: _replace(fh, _VEC, fh[_VEC][:, 0].copy()),
                    "holds an array of shape"),
    "int8 vectors": (lambda fh: _replace(fh, _VEC, fh[_VEC][()].astype(np.int8)),
                     "holds int8 values"),
    "NaN and inf vectors": (lambda fh: _set_rows(fh, _VEC, lambda v: (
        v.__setitem__(2, np.nan), v.__setitem__(3, np.inf))), "not finite (NaN or infinite) "
                                                              "(rows 2-3)"),
    "unknown status": (lambda fh: _set_rows(fh, "images/status",
                                            lambda v: v.__setitem__(1, 7)),
                       "/images/status: holds unknown values (rows 1)"),
    "rows 10^9": (lambda fh: fh.attrs.__setitem__("rows", 10**9), "its attribute rows says"),
    "rows -5": (lambda fh: fh.attrs.__setitem__("rows", -5), "its attribute rows says -5"),
    "index file /etc/passwd": (lambda fh: fh[f"indexes/{INDEX}"].attrs.__setitem__(
        "file", np.bytes_(b"/etc/passwd")), "names '/etc/passwd', not a file beside the store"),
    "index rows repeated": (lambda fh: _set_rows(fh, f"indexes/{INDEX}/rows",
                                                 lambda v: v.__setitem__(slice(None), v[0])),
                            "its rows name an image more than once"),
    "index rows out of range": (lambda fh: _set_rows(fh, f"indexes/{INDEX}/rows",
                                                     lambda v: v.__setitem__(1, 99)),
                                "its rows name image ids outside"),
    "PCA of the wrong shape": (lambda fh: _replace(
        fh, f"models/{PCA_ID}/components", fh[f"models/{PCA_ID}/components"][:, :-1].copy()),
        "do not fit each other"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_stores_are_named_by_check_refused_by_readers_and_repaired(
        tmp_path: Path, full_store: Path, case: str) -> None:
    db = copy_store(full_store, tmp_path)
    edit, said = CRAFTED[case]
    with h5py.File(db, "r+", locking=False) as fh:  # behind imgdb's back: checksums stay right
        edit(fh)
    res = imgdb("check", "--db", db)
    assert res.code == 1 and said in res.out, res.out
    for args in (("info",), ("index", "ls"), ("models",),
                 ("query", "--id", "1", "--exact", "-d", HEAD_SUM, "-k", "12", "--json"),
                 ("query", "--id", "1", "--index", INDEX, "-k", "12", "--json"),
                 ("query", "--id", "1", "--exact", "-d", HEAD_SUM, "--pca", "v1", "--json")):
        got = imgdb(*args, "--db", db)
        assert "Traceback" not in got.err and "unexpected" not in got.err, (args, got.err)
        if got.code:
            got.one_line_error(got.code)
        elif args[0] == "query":  # an answer: real images, each once, finite scores
            hits = json.loads(got.out)["queries"][0]["results"]
            ids = [h["id"] for h in hits]
            assert len(ids) == len(set(ids)) and all(0 <= i < 12 for i in ids), (args, ids)
            assert all(math.isfinite(h["score"]) for h in hits), (args, hits)
    rep = ok(imgdb("repair", "--db", db))
    assert check_store(db).ok, rep.out
    ok(ingest(full_store.parent / "photos", db, "--keep-local", "block5"))  # back to whole
    assert check_store(db).ok
    ok(imgdb("query", "--id", "1", "--exact", "-d", HEAD_SUM, "-k", "3", "--db", db))


def test_merging_a_crafted_store_never_copies_its_damage(tmp_path: Path) -> None:
    photos, more = tmp_path / "p", tmp_path / "q"
    make_photos(photos, 6)
    make_photos(more, 6, seed=5)
    good, bad = tmp_path / "good.h5", tmp_path / "bad.h5"
    ok(ingest(photos, good))
    ok(ingest(more, bad))
    with h5py.File(bad, "r+", locking=False) as fh:  # checksums right, two rows not finite
        CRAFTED["NaN and inf vectors"][0](fh)
    out = tmp_path / "out.h5"
    ok(imgdb("merge", good, bad, "--db", out))
    assert check_store(out).ok  # the damaged rows came in as to be computed, not as vectors
    with open_read(out) as view:
        assert int(view.valid("efficientnet_lite0-none-orig").sum()) == 10
    again = json.loads(ok(ingest(more, out, "--json")).out)
    assert again["computed"] == 2 and check_store(out).ok
    for edit in ("1-D vectors", "rows 10^9"):  # refused in one line, nothing made
        crafted = tmp_path / f"{edit}.h5"
        shutil.copy(bad, crafted)
        with h5py.File(crafted, "r+", locking=False) as fh:
            CRAFTED[edit][0](fh)
        target = tmp_path / f"out {edit}.h5"
        assert "repair" in imgdb("merge", good, crafted, "--db", target).one_line_error()


def test_an_hdf5_file_that_is_not_a_store_is_called_so(tmp_path: Path) -> None:
    plain = tmp_path / "data.h5"
    with h5py.File(plain, "w") as fh:
        fh["x"] = np.arange(3)
    for args in (("info",), ("check",), ("repair",), ("query", "--id", "0")):
        text = imgdb(*args, "--db", plain).one_line_error()
        assert "an HDF5 file but not an imgdb store" in text and "format 1" not in text, text


def _rebuild(db: Path) -> tuple[str, ...]:
    return ("index", "build", "--db", str(db), "--descriptor", HEAD_SUM, "--pca", "v1",
            "--name", INDEX, "--trees", "4", "--seed", "7")


_DIE_AT_REGISTRATION = """
import os, sys
from imgdb.store.writer import StoreWriter
def die(self, *args, **kwargs):
    os._exit(137)  # as a kill -9 just after the new file was written, before its commit
StoreWriter.register_index = die
from imgdb.cli import run
sys.exit(run(sys.argv[1:]))
"""


def test_a_rebuild_keeps_the_old_index_until_the_commit_that_registers_the_new(
        tmp_path: Path, full_store: Path) -> None:
    db = copy_store(full_store, tmp_path)
    old = registered_ann(db, INDEX)
    want = ok(imgdb("query", "--db", db, "--id", "3", "--index", INDEX, "--json")).out
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    killed = subprocess.run([sys.executable, "-c", _DIE_AT_REGISTRATION, *_rebuild(db)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == 137, killed.stderr
    left = [p for p in tmp_path.glob(f"s.h5.{INDEX}.*.ann") if p != old]
    assert len(left) == 1  # the new file, never registered
    ls = ok(imgdb("index", "ls", "--db", db)).out
    assert "current" in ls and "DAMAGED" not in ls and check_store(db).ok
    assert ok(imgdb("query", "--db", db, "--id", "3", "--index", INDEX, "--json")).out == want
    # a file-size limit during the rebuild: a one-line error, the old index whole and in use
    res = imgdb_proc(*_rebuild(db), preexec=_limit(1000))
    assert "file-size limit" in res.one_line_error() or "cannot write" in res.err
    assert "current" in ok(imgdb("index", "ls", "--db", db)).out and check_store(db).ok
    assert ok(imgdb("query", "--db", db, "--id", "3", "--index", INDEX, "--json")).out == want
    ok(imgdb(*_rebuild(db)))  # the next build sweeps the leftovers and replaces the old file
    files = sorted(tmp_path.glob("s.h5.*.ann"))
    assert files == [registered_ann(db, INDEX)] and old not in files
    assert "current" in ok(imgdb("index", "ls", "--db", db)).out and check_store(db).ok


@pytest.mark.parametrize("seed", range(6))
def test_flipped_bytes_in_an_index_file(tmp_path: Path, full_store: Path, seed: int) -> None:
    db = copy_store(full_store, tmp_path)
    ann = registered_ann(db, INDEX)
    good = ok(imgdb_proc("query", "--db", db, "--id", "3", "--index", INDEX, "--json")).out
    st = ann.stat()
    rng = random.Random(seed)
    for _ in range(10):  # same size, and the modification time put back
        flip(ann, rng.randrange(0, st.st_size), 1)
    os.utime(ann, ns=(st.st_atime_ns, st.st_mtime_ns))
    ls = ok(imgdb("index", "ls", "--db", db)).out
    assert "DAMAGED: index file" in ls and "does not match the digest" in ls
    res = imgdb_proc("query", "--db", db, "--id", "3", "--index", INDEX)
    text = res.one_line_error()  # never exit 139, never a silent answer
    assert "is damaged" in text and f"imgdb index build --db {db}" in text
    check = imgdb("check", "--db", db)
    assert check.code == 1 and f"index {INDEX}: index file" in check.out
    ok(imgdb("index", "build", "--db", db, "--descriptor", HEAD_SUM, "--pca", "v1", "--trees",
             "3"))
    assert ok(imgdb_proc("query", "--db", db, "--id", "3", "--index", INDEX, "--json")).out == good


# ---------------------------------------------------------------------------------------------
# reproduction 2: two writers through two names of one file


def _committed(db: Path) -> int:
    try:
        with open_read(db) as view:
            return view.rows
    except Exception:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["symlink", "hardlink"])
def test_second_ingest_through_another_name_is_refused(tmp_path: Path, alias: str) -> None:
    photos = tmp_path / "p"
    make_photos(photos, 48, size=(160, 120))
    more = tmp_path / "q"
    make_photos(more, 4, seed=3)
    db = tmp_path / "r2.h5"
    other = tmp_path / "al2.h5"
    ok(ingest(more, db))  # the store exists, so that both names can point at it
    other.symlink_to(db) if alias == "symlink" else os.link(db, other)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    first = subprocess.Popen([sys.executable, "-m", "imgdb", "ingest", str(photos), "--db",
                              str(db), *NET, "--batch-size", "4", "--commit-seconds", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while _committed(db) < 8 and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert first.poll() is None, "the first ingest ended before the second could start"
    second = imgdb("ingest", more, "--db", other, *NET)
    text = second.one_line_error()
    assert f"locked by PID {first.pid}" in text
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert check_store(db).ok
    with open_read(other) as view:
        paths = view.paths()
    assert len(paths) == len(set(paths)) == 52


# ---------------------------------------------------------------------------------------------
# reproduction 6: 100 reads during an ingest that commits after every batch


def _reader_check(args: tuple, res: Result, batch: int) -> int:
    """Assert a read succeeded and saw a whole number of commits; returns the rows it saw."""
    assert res.code == 0 and "Traceback" not in res.err, (args, res.code, res.err)
    data = json.loads(res.out)
    if args[0] == "info":
        n = data["images"]["total"]
        assert data["images"]["ok"] == n  # every visible row complete ...
        assert all(d["computed"] == n for d in data["descriptors"]), data["descriptors"]
    elif args[0] == "query":
        n = len(data["queries"][0]["results"])
    else:
        n = data["database_images"]
    assert n % batch == 0, (args, n)  # ... and never a part of one
    return n


@pytest.mark.slow
def test_100_reads_during_an_ingest_see_whole_commits(tmp_path: Path) -> None:
    batch = 4
    db = tmp_path / "busy.h5"
    seed = [0]

    def next_folder() -> Path:
        seed[0] += 1
        folder = tmp_path / f"p{seed[0]}"
        make_photos(folder, 40, seed=seed[0], size=(224, 168))
        return folder

    ok(ingest(next_folder(), db, "--batch-size", str(batch)))  # readers have rows to query
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONIOENCODING="utf-8:strict")

    def start_ingest() -> subprocess.Popen:  # one forward at a time: readers meet more commits
        return subprocess.Popen([sys.executable, "-m", "imgdb", "ingest", str(next_folder()),
                                 "--db", str(db), *NET, "--batch-size", str(batch),
                                 "--commit-seconds", "0", "--forward-threads", "1"],
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env)

    reads = [("info", "--json"),
             ("query", "--id", "0", "--exact", "-d", HEAD_SUM, "-k", "100000", "--json"),
             ("eval", "--group-regex", r"g(\d+)_", "-d", HEAD_SUM, "--json")]
    writer = start_ingest()
    seen, done, ingests, during = set(), 0, 1, 0
    pending: list[tuple[tuple, subprocess.Popen]] = []
    while done < 100:
        while len(pending) < 3 and done + len(pending) < 100:
            args = reads[(done + len(pending)) % 3]
            pending.append((args, subprocess.Popen(
                [sys.executable, "-m", "imgdb", args[0], "--db", str(db), *args[1:]],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)))
        args, proc = pending.pop(0)
        out, err = proc.communicate(timeout=600)
        seen.add(_reader_check(args, Result(proc.returncode, out, err), batch))
        done += 1
        if writer.poll() is None:
            during += 1
        else:  # the ingest finished: another folder, so that reads keep meeting commits
            assert writer.returncode == 0, writer.stderr.read()
            writer = start_ingest()
            ingests += 1
    writer.communicate(timeout=600)
    assert writer.returncode == 0
    assert during >= 80 and len(seen) >= 5, (during, sorted(seen))  # reads met many commits
    assert check_store(db).ok


# ---------------------------------------------------------------------------------------------
# reproduction 3: a file-size limit, and a full file system


def _limit(nbytes: int):
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return set_limit


@pytest.mark.slow
def test_file_size_limit_stops_cleanly_and_the_rerun_finishes(tmp_path: Path) -> None:
    photos = tmp_path / "p"
    make_photos(photos, 40, size=(96, 72))
    first = tmp_path / "first"
    make_photos(first, 8, seed=9, size=(96, 72))
    reference = tmp_path / "ref.h5"  # the same two ingests, with no limit
    for folder in (first, photos):
        ok(ingest(folder, reference, "--keep-local", "block5", "--batch-size", "4"))
    db = tmp_path / "lim.h5"
    ok(ingest(first, db, "--keep-local", "block5", "--batch-size", "4"))
    # one forward at a time, so each commit holds one batch of 4 (with two at once the first
    # commit may hold 8 and need more room than this limit leaves)
    one = ("--forward-threads", "1")
    # about the finished store's size: too small, as each commit needs room for its journal
    # too (here ~0.6 MB: the whole last chunk of every dataset is rewritten, checksummed)
    limit = reference.stat().st_size + 300_000
    res = ingest(photos, db, "--keep-local", "block5", "--batch-size", "4",
                 "--commit-seconds", "0", *one, proc=True, preexec=_limit(limit))
    text = res.one_line_error()
    assert text.startswith("error: file-size limit") and "nothing committed is lost" in text
    partial = _committed(db)
    assert 8 < partial < 48 and partial % 4 == 0
    assert check_store(db).ok and db.stat().st_size <= limit
    again = ingest(photos, db, "--keep-local", "block5", "--batch-size", "4", *one, proc=True,
                   preexec=_limit(limit))  # still too small: the same clean stop
    again.one_line_error()  # (it may get a commit or two further first)
    assert check_store(db).ok
    partial = _committed(db)
    rerun = json.loads(ok(ingest(photos, db, "--keep-local", "block5", "--json")).out)
    assert rerun["failed"] == 0 and rerun["unchanged"] == partial - 8
    assert rerun["ok"] == 48 - partial
    got, want = table(db), table(reference)
    assert_same(got, want)  # no lost row, no duplicate: the rows, order and vectors of no limit
    assert check_store(db).ok


_FULL_DISK = r"""
import json, os, shutil, subprocess, sys
mnt, photos, outside = sys.argv[1], sys.argv[2], sys.argv[3]
net, leave = json.loads(sys.argv[4]), int(sys.argv[5])
db = os.path.join(mnt, "s.h5")
st = os.statvfs(mnt)
with open(os.path.join(mnt, "filler"), "wb") as f:  # the rest of the disk is taken
    f.write(bytes(st.f_bavail * st.f_frsize - leave))
def run(*args):
    p = subprocess.run([sys.executable, "-m", "imgdb", *args], capture_output=True, text=True)
    return {"code": p.returncode, "out": p.stdout, "err": p.stderr}
steps = {}
steps["ingest"] = run("ingest", photos, "--db", db, *net, "--keep-local", "block5",
                      "--batch-size", "4", "--commit-seconds", "0")
steps["info"] = run("info", "--db", db, "--json")
steps["check"] = run("check", "--db", db)
steps["again"] = run("ingest", photos, "--db", db, *net, "--keep-local", "block5",
                     "--batch-size", "4")
steps["check2"] = run("check", "--db", db)
shutil.copy(db, outside)  # a disk with room
steps["moved"] = run("ingest", photos, "--db", outside, *net, "--keep-local", "block5", "--json")
os.unlink(os.path.join(mnt, "filler"))  # or room made on the full disk
steps["freed"] = run("ingest", photos, "--db", db, *net, "--keep-local", "block5", "--json")
shutil.copy(db, outside + ".freed.h5")
print(json.dumps(steps))
"""


@pytest.mark.slow
def test_full_small_file_system(tmp_path: Path) -> None:
    photos = tmp_path / "p"
    make_photos(photos, 48, size=(128, 96))
    reference = tmp_path / "ref.h5"
    ok(ingest(photos, reference, "--keep-local", "block5"))
    leave = int(reference.stat().st_size * 0.6)  # free space left on the 12 MB file system
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    outside = tmp_path / "moved.h5"
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    if not shutil.which("unshare"):
        pytest.skip("no unshare: cannot mount a small file system here")
    probe = subprocess.run([*unshare, "sh", "-c", f"mount -t tmpfs -o size=12m tmpfs {mnt}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"mounting a 12 MB tmpfs is not permitted here: {probe.stderr.strip()}")
    script = (f"mount -t tmpfs -o size=12m tmpfs {mnt} && exec {sys.executable} -c "
              f"'{_FULL_DISK}' {mnt} {photos} {outside} '{json.dumps(NET)}' {leave}")
    proc = subprocess.run([*unshare, "sh", "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT),
                                   PYTHONIOENCODING="utf-8:strict"), timeout=1800)
    assert proc.returncode == 0, proc.stderr
    steps = json.loads(proc.stdout)
    for key in ("ingest", "again"):  # a clean stop, never exit 139 or a traceback
        r = Result(**steps[key])
        text = r.one_line_error()
        assert text.startswith("error: disk full") and "nothing committed is lost" in text, text
    assert steps["info"]["code"] == 0
    rows = json.loads(steps["info"]["out"])["images"]["total"]
    assert 0 < rows < 48 and rows % 4 == 0
    for key in ("check", "check2"):
        assert steps[key]["code"] == 0, steps[key]
    for key, db in (("moved", outside), ("freed", Path(f"{outside}.freed.h5"))):
        done = json.loads(ok(Result(**steps[key])).out)
        assert done["failed"] == 0 and done["unchanged"] >= rows and done["ok"] > 0
        assert_same(table(db), table(reference))  # no lost row, no duplicate, the same vectors
        assert check_store(db).ok


# ---------------------------------------------------------------------------------------------
# kill -9 of every writing command: at each kind of store write, and at random moments


_KILL_DRIVER = r"""
import atexit, os, signal, sys, threading
kill_at, calls, mutex = int(os.environ["IMGDB_TEST_KILL_AT"]), [0], threading.Lock()
def counted(real):
    def call(*args):
        with mutex:
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)
    return call
for name in ("pwrite", "pwritev", "fsync", "ftruncate", "replace", "link"):
    setattr(os, name, counted(getattr(os, name)))
atexit.register(lambda: sys.stderr.write(f"WRITES {calls[0]}\n"))
from imgdb.cli import main
sys.argv = ["imgdb"] + sys.argv[1:]
main()
"""


def _models(db: Path) -> dict:
    with open_read(db) as view:
        return {m.id: {k: v for k, v in m.attrs.items() if k not in ("created", "seconds")}
                for m in view.models()}


def _latest(db: Path, kind: str) -> dict:
    with open_read(db) as view:
        m = [m for m in view.models(kind)][-1]
        arrays = view.model_arrays(m)
        return {"descriptor": m.descriptor, "dims": m.attrs.get("dims"),
                "arrays": {k: v.astype(float).tolist() for k, v in arrays.items()}}


def _encoding(db: Path) -> dict:
    with open_read(db) as view:
        d = view.descriptor("efficientnet_lite0-none-orig+cb1-democratic/block5/vlad")
        return {"state": view.state(d.extractor).tolist(),
                "v": view.vectors(d).astype(float).tolist()}


def _indexes(db: Path) -> dict:
    from imgdb.retrieval.index import list_indexes

    with open_read(db) as view:
        found = {s.name: (s.problem, s.attrs["items"]) for s in list_indexes(view, db, True)}
        registered = {str(f) for e in view.indexes()
                      for f in e.attrs.get("shard_files", [e.attrs["file"]])}
    files = sorted(p.name for p in db.parent.glob(f"{db.name}.*.ann"))
    # each build names its files anew: what must match is which indexes have files, and that
    # no file is left that the registry does not name (a killed build's is swept by the rerun)
    return {"registry": found, "unregistered": sorted(set(files) - registered),
            "files": sorted(re.sub(r"\.[0-9a-f]{8}(?=(\.\d+of\d+)?\.ann$)", "", f) for f in files)}


def _query_raw(db: Path) -> str:
    name = "efficientnet_lite0-none-orig.head.sum.raw"
    return ok(imgdb("query", "--db", db, "--id", "4", "--index", name, "--json")).out \
        .replace(str(db), "DB")


WRITING = {
    "ingest": (lambda db, extra: ["ingest", extra, "--db", db, *NET, "--keep-local", "block5",
                                  "--batch-size", "4", "--commit-seconds", "0"],
               lambda db: table(db)),
    "fit pca": (lambda db, extra: ["fit", "pca", "--db", db, "--descriptor", HEAD_SUM,
                                   "--dims", "3"], lambda db: _latest(db, "pca")),
    "fit graph": (lambda db, extra: ["fit", "graph", "--db", db, "--descriptor", HEAD_SUM,
                                     "--k", "3", "--quiet"], lambda db: _latest(db, "graph")),
    "fit codebook": (lambda db, extra: ["fit", "codebook", "--db", db, "--local", "block5",
                                        "--method", "vlad", "--k", "3", "--no-rotate",
                                        "--quiet"], lambda db: _latest(db, "codebook")),
    "encode": (lambda db, extra: ["encode", "--db", db, "--codebook", "v1", "--aggregate",
                                  "democratic"], _encoding),
    "index build": (lambda db, extra: ["index", "build", "--db", db, "--descriptor", HEAD_SUM,
                                       "--trees", "3"],
                    lambda db: (_indexes(db), _query_raw(db))),
    "models --remove": (lambda db, extra: ["models", "--db", db, "--remove",
                                           "codebook/efficientnet_lite0-none-orig/block5/v1"],
                        _models),
    "index rm": (lambda db, extra: ["index", "rm", INDEX, "--db", db], _indexes),
    "repair": (lambda db, extra: ["repair", "--db", db],
               lambda db: (table(db), _models(db), _indexes(db))),
}
KILLS = {"count": 0}


def _driver(args: list, kill_at: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), IMGDB_TEST_KILL_AT=str(kill_at))
    return subprocess.run([sys.executable, "-c", _KILL_DRIVER, *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(WRITING))
def test_kill_9_of_every_writing_command(tmp_path: Path, full_store: Path, command: str) -> None:
    build, signature = WRITING[command]
    extra = tmp_path / "more"
    make_photos(extra, 12, seed=4)
    # the uninterrupted run: its result, its store writes, its duration
    ref = copy_store(full_store, tmp_path / "ref")
    started = time.monotonic()
    done = _driver(build(ref, extra), 0)
    duration = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    writes = int(done.stderr.split("WRITES ")[-1].split()[0])
    want = signature(ref)
    rng = random.Random(command)
    points = sorted(set(np.linspace(1, writes, num=min(writes, 5)).round().astype(int)))
    plans = [("write", int(p)) for p in points] + \
        [("time", rng.uniform(0.3, 1.0) * duration) for _ in range(2)]
    for i, (how, when) in enumerate(plans):
        db = copy_store(full_store, tmp_path / f"k{i}")
        if how == "write":
            proc = _driver(build(db, extra), when)
            killed = proc.returncode == -signal.SIGKILL
        else:
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            p = subprocess.Popen([sys.executable, "-m", "imgdb", *map(str, build(db, extra))],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
            time.sleep(when)
            killed = p.poll() is None
            p.kill()
            p.wait()
        KILLS["count"] += killed
        with open_read(db) as view:  # opens after the kill
            assert view.rows >= 12
        report = check_store(db)
        assert report.ok, (command, how, when, [q.line() for q in report.problems])
        rerun = imgdb(*build(db, extra))
        if rerun.code != 0:  # the killed run had finished its work: a one-line 'nothing to do'
            text = rerun.one_line_error()
            assert command in ("models --remove", "index rm") and "no " in text, text
        assert_same(signature(db), want, (command, how, when))
        assert check_store(db).ok
