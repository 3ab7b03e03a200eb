"""Ingest and store behaviour through the real command line, on real photos (COIL-20, Oxford)."""

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

from helpers import COIL, OXFORD_IMAGES, make_bad_files, run_cli
from imgdb.errors import UserError
from imgdb.store import STATUS_FAILED, STATUS_MISSING, STATUS_OK, open_read

# random weights and small inputs: these tests check bookkeeping, not retrieval quality
FAST = ["--backbone", "efficientnet_lite0", "--weights", "none", "--size", "original",
        "--pooling", "sum,mac,crow", "--quiet"]


def coil_subset(tmp: Path, n: int, start: int = 0) -> Path:
    src = sorted(COIL.glob("*.png"))[start:start + n]
    dst = tmp / "photos"
    dst.mkdir(exist_ok=True)
    for f in src:
        shutil.copy2(f, dst / f.name)
    return dst


def ingest_json(*args: str) -> dict:
    return json.loads(run_cli("ingest", *args, "--json").stdout)


def vectors(db: Path) -> dict[str, np.ndarray]:
    with open_read(db) as view:
        return {d.name: view.vectors(d) for d in view.descriptors()}


def committed_rows(db: Path) -> int:
    """Rows a reader sees now (0 while the store does not exist yet)."""
    try:
        with open_read(db) as view:
            return view.rows
    except UserError:
        return 0


def test_incremental_reruns(tmp_path: Path) -> None:
    photos = coil_subset(tmp_path, 6)
    db = tmp_path / "s.h5"
    first = ingest_json(str(photos), "--db", str(db), *FAST)
    assert (first["new"], first["ok"], first["failed"]) == (6, 6, 0)

    again = ingest_json(str(photos), "--db", str(db), *FAST)
    assert (again["new"], again["changed"], again["ok"], again["unchanged"]) == (0, 0, 0, 6)

    # asking for one more pooling on the same folder computes it for every stored image
    more = [a if a != "sum,mac,crow" else "sum,mac,crow,gem-p3" for a in FAST]
    added = ingest_json(str(photos), "--db", str(db), *more)
    assert (added["new"], added["computed"], added["ok"]) == (0, 6, 6)
    gem = vectors(db)["efficientnet_lite0-none-orig/head/gem-p3"]
    assert not np.isnan(gem).any()

    extra = sorted(COIL.glob("*.png"))[10]
    shutil.copy2(extra, photos / extra.name)
    one = ingest_json(str(photos), "--db", str(db), *FAST)
    assert (one["new"], one["ok"], one["unchanged"]) == (1, 1, 6)

    # a changed file is recomputed in place, a deleted one is marked missing
    changed = sorted(photos.glob("*.png"))[0]
    shutil.copy2(sorted(COIL.glob("*.png"))[20], changed)
    os.utime(changed, (time.time() + 5, time.time() + 5))
    gone = sorted(photos.glob("*.png"))[1]
    gone.unlink()
    third = ingest_json(str(photos), "--db", str(db), *FAST)
    assert (third["new"], third["changed"], third["missing"], third["ok"]) == (0, 1, 1, 1)
    with open_read(db) as fh:
        table = fh.images()
    assert len(table) == 7  # rows are never removed: ids stay dense and stable
    assert table.status[table.path.index(str(gone))] == STATUS_MISSING

    # a second extractor: computes every ok image once; a file changed later is redone by each
    other = [a if a != "original" else "min:64" for a in FAST]
    second = ingest_json(str(photos), "--db", str(db), *other)
    assert (second["computed"], second["ok"]) == (6, 6)
    shutil.copy2(sorted(COIL.glob("*.png"))[30], changed)
    os.utime(changed, (time.time() + 9, time.time() + 9))
    assert ingest_json(str(photos), "--db", str(db), *FAST)["changed"] == 1
    redo = ingest_json(str(photos), "--db", str(db), *other)
    assert (redo["computed"], redo["ok"], redo["unchanged"]) == (1, 1, 5)


def test_vgg16_dims_and_info(tmp_path: Path) -> None:
    photos = coil_subset(tmp_path, 2)
    db = tmp_path / "v.h5"
    run_cli("ingest", str(photos), "--db", str(db), "--backbone", "vgg16", "--weights", "none",
            "--layers", "pool5", "--size", "original", "--quiet")
    info = json.loads(run_cli("info", "--db", str(db), "--json").stdout)
    dims = {d["name"].split("/", 1)[1]: d["dim"] for d in info["descriptors"]}
    ext = info["extractors"][0]["name"]
    assert ext == "vgg16-none-orig"
    for p in ("sum", "spoc", "mac", "crow", "crow-sw", "crow-ssw", "gem-p3", "rmac-l3"):
        assert dims[f"pool5/{p}"] == 512
    assert dims["pool5/mac2x2"] == 2048
    assert info["images"] == {"total": 2, "ok": 2, "failed": 0, "missing": 0, "lost": 0}
    text = run_cli("info", "--db", str(db)).stdout
    assert "vgg16-none-orig/pool5/mac2x2" in text and "2 x 2048" in text


def test_bad_inputs_are_recorded_not_fatal(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    expected = make_bad_files(folder, sorted(OXFORD_IMAGES.glob("*.jpg"))[0])
    db = tmp_path / "bad.h5"
    proc = run_cli("ingest", str(folder), "--db", str(db), "--backbone", "efficientnet_lite0",
                   "--weights", "none", "--size", "max:256", "--pooling", "sum")
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    good = sum(expected.values())
    bad = len(expected) - good
    assert f"{good} ingested, {bad} failed" in proc.stdout
    for name, ok in expected.items():
        if not ok:
            assert name in proc.stderr  # each failure is named with its reason
    with open_read(db) as fh:
        table = fh.images()
    by_name = {Path(p).name: i for i, p in enumerate(table.path)}
    for name, ok in expected.items():
        row = by_name[name]
        assert table.status[row] == (STATUS_OK if ok else STATUS_FAILED), (name, table.error[row])
        if not ok:
            assert table.error[row]
    # EXIF orientation honoured: the copy tagged "rotate 90" has its sides swapped
    rot, plain = by_name["rotated.jpg"], by_name["café ü 東京.jpg"]
    assert (table.width[rot], table.height[rot]) == (table.height[plain], table.width[plain])
    assert table.width[rot] != table.height[rot]
    info = run_cli("info", "--db", str(db)).stdout
    assert f"failed files ({bad})" in info and "bomb.png" in info
    strict = run_cli("ingest", str(folder), "--db", str(tmp_path / "strict.h5"), "--weights", "none",
                     "--backbone", "efficientnet_lite0", "--size", "max:128", "--pooling", "sum",
                     "--quiet", "--strict", check=False)
    assert strict.returncode == 1


def test_clear_errors_and_exit_codes(tmp_path: Path) -> None:
    missing = run_cli("info", "--db", str(tmp_path / "nope.h5"), check=False)
    assert missing.returncode == 1
    assert missing.stderr.strip().count("\n") == 0 and "imgdb ingest" in missing.stderr
    bad_backbone = run_cli("ingest", str(tmp_path), "--db", str(tmp_path / "x.h5"),
                           "--backbone", "alexnet", check=False)
    assert bad_backbone.returncode == 1 and "efficientnet_lite0" in bad_backbone.stderr
    assert "Traceback" not in bad_backbone.stderr
    nothing = run_cli("ingest", str(tmp_path / "no such folder"), "--db", str(tmp_path / "n.h5"),
                      "--weights", "none", check=False)
    assert nothing.returncode == 1 and "does not exist" in nothing.stderr
    assert not (tmp_path / "n.h5").exists()  # no empty store left behind
    usage = run_cli("ingest", "--db", str(tmp_path / "x.h5"), check=False)
    assert usage.returncode == 2
    layer = run_cli("ingest", str(tmp_path), "--db", str(tmp_path / "x.h5"), "--weights", "none",
                    "--layers", "conv9_9", check=False)
    assert layer.returncode == 1 and "pool5" in layer.stderr


def test_second_writer_is_refused(tmp_path: Path) -> None:
    from imgdb.store import StoreError, StoreWriter

    db = tmp_path / "l.h5"
    with StoreWriter(db):
        proc = run_cli("ingest", str(coil_subset(tmp_path, 1)), "--db", str(db), *FAST, check=False)
        assert proc.returncode == 1
        assert f"locked by PID {os.getpid()}" in proc.stderr
        with pytest.raises(StoreError, match="locked by PID"):
            StoreWriter(db)
    StoreWriter(db).close()  # released


@pytest.mark.slow
def test_kill_9_then_rerun_equals_uninterrupted(tmp_path: Path) -> None:
    photos = coil_subset(tmp_path, 48)
    args = ["--backbone", "efficientnet_lite0", "--weights", "none", "--size", "min:160",
            "--pooling", "sum,mac,crow,gem-p3", "--batch-size", "4", "--commit-seconds", "0",
            "--quiet", "--workers", "1"]
    reference = tmp_path / "ref.h5"
    run_cli("ingest", str(photos), "--db", str(reference), *args)

    db = tmp_path / "killed.h5"
    cut_short = 0  # kills that landed before the end (a loaded machine can finish in the delay)
    for attempt, delay in enumerate((0.0, 0.37)):
        proc = subprocess.Popen([sys.executable, "-m", "imgdb", "ingest", str(photos), "--db",
                                 str(db), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # wait until some rows are committed, then kill at an arbitrary moment
        deadline = time.time() + 120
        rows = 0
        while time.time() < deadline and proc.poll() is None:
            rows = committed_rows(db)
            if rows >= 8 + 16 * attempt:
                break
            time.sleep(0.05)
        time.sleep(delay)
        assert proc.poll() is None, "ingest finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with open_read(db) as fh:  # opens after the kill
            partial = len(fh.images())
        assert 0 < partial <= 48
        cut_short += partial < 48
    assert cut_short >= 1
    resumed = ingest_json(str(photos), "--db", str(db), *args)
    assert resumed["failed"] == 0 and resumed["ok"] + resumed["unchanged"] == 48

    with open_read(reference) as fh:
        ref_table = fh.images()
    with open_read(db) as fh:
        table = fh.images()
    assert table.path == ref_table.path  # same rows, same order, no duplicate
    assert np.array_equal(table.sha, ref_table.sha)
    ref_vec, vec = vectors(reference), vectors(db)
    assert ref_vec.keys() == vec.keys()
    for key in ref_vec:
        assert not np.isnan(vec[key]).any()
        np.testing.assert_allclose(vec[key], ref_vec[key], rtol=1e-4, atol=1e-5)


def test_ctrl_c_says_so_and_keeps_what_was_committed(tmp_path: Path) -> None:
    photos = coil_subset(tmp_path, 48)
    db = tmp_path / "c.h5"
    args = ["--backbone", "efficientnet_lite0", "--weights", "none", "--size", "min:160",
            "--pooling", "sum", "--batch-size", "4", "--commit-seconds", "0", "--workers", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "imgdb", "ingest", str(photos), "--db",
                             str(db), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # until some rows are committed
        if committed_rows(db) >= 8:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "ingest finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == ("interrupted; what was committed is kept, rerun the "
                                            "command to finish")
    with open_read(db) as fh:
        kept = len(fh.images())
    assert 8 <= kept <= 48
    resumed = ingest_json(str(photos), "--db", str(db), *args)
    assert resumed["unchanged"] == kept and resumed["ok"] == 48 - kept
