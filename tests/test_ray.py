"""imgdb ingest --engine ray on a real local Ray cluster (ray.init(num_cpus=2)): the store equals
a local ingest (same rows in the same order, vectors within 1e-5), reruns and updates behave as
locally, and a kill -9 of the driver or of a worker, then a rerun, gives the same store again."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import run_cli
from imgdb.errors import StoreError, UserError
from imgdb.ingest import IngestOptions, run_ingest
from imgdb.store import STATUS_MISSING, StoreWriter, open_read
from synth import assert_same_store, make_photos, snapshot

ray = pytest.importorskip("ray", reason="Ray is the optional extra imgdb[ray] (in the test extra)")

from imgdb.ingest.ray_executor import RayOptions, run_ray_ingest, shard_dir  # noqa: E402

pytestmark = pytest.mark.slow  # each test drives a real Ray cluster

OPTIONS = dict(backbone="efficientnet_lite0", weights="none", size="original", layers="head",
               poolings="sum,mac,gem-p3", workers=1, keep_local=("block5:max",))
# the SIFT mask's keypoints are found in the decode tasks and travel to the actors
WITH_SIFT = dict(OPTIONS, keep_local=("block5:max", "block5:sift"))
CLI = ["--backbone", "efficientnet_lite0", "--weights", "none", "--size", "original",
       "--layers", "head", "--pooling", "sum,mac,gem-p3", "--keep-local", "block5:max",
       "--workers", "1"]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for this module; yields its address for the CLI."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=300 * 1024 * 1024)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def photos_in(tmp: Path) -> Path:
    root = tmp / "photos"
    make_photos(root / "a", 14, seed=1)
    make_photos(root / "b", 14, seed=2, sizes=((80, 64), (96, 80)))
    (root / "a" / "zz-bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg" * 30)
    return root


def test_ray_ingest_equals_local_ingest_and_reruns(tmp_path: Path, cluster) -> None:
    photos = photos_in(tmp_path)
    local, remote = tmp_path / "local.h5", tmp_path / "ray.h5"
    opts = IngestOptions(**WITH_SIFT, batch_size=4)
    run_ingest([photos], local, opts)
    summary = run_ray_ingest([photos], remote, opts, RayOptions())
    assert (summary.new, summary.ok, summary.failed) == (29, 28, 1)
    assert summary.failures[0][0].endswith("zz-bad.jpg")
    assert summary.engine["actors"] == 1 and summary.engine["decode_processes"] >= 1
    assert summary.engine["separate_processes"]  # decoding ran in tasks, not in the actor
    assert not shard_dir(remote).exists()  # every shard merged, then removed
    ref = snapshot(local)
    assert_same_store(snapshot(remote), ref)
    with open_read(local) as a, open_read(remote) as b:
        ext = a.extractors()[0]
        assert a.settings(ext) == b.settings(ext)

    again = run_ray_ingest([photos], remote, opts, RayOptions())
    assert (again.new, again.ok, again.unchanged) == (0, 0, 29)

    # a changed file, a deleted one and new ones: updated in place, marked, appended (as locally)
    make_photos(tmp_path / "redo", 5, seed=9)
    os.replace(tmp_path / "redo" / "img004.png", photos / "b" / "img001.png")
    os.utime(photos / "b" / "img001.png", (1e9, 1e9))
    (photos / "a" / "img002.png").unlink()
    make_photos(photos / "c", 4, seed=3)
    run_ingest([photos], local, opts)
    update = run_ray_ingest([photos], remote, opts, RayOptions())
    assert (update.new, update.changed, update.missing) == (4, 1, 1)
    got = snapshot(remote)
    assert_same_store(got, snapshot(local))
    assert got["status"][2] == STATUS_MISSING and len(got["paths"]) == 33


def test_ray_driver_killed_then_rerun_equals_local(tmp_path: Path, cluster) -> None:
    photos = tmp_path / "photos"
    make_photos(photos, 64, seed=4)
    reference = tmp_path / "ref.h5"
    run_ingest([photos], reference, IngestOptions(**OPTIONS, batch_size=4))

    db = tmp_path / "killed.h5"
    args = [sys.executable, "-m", "imgdb", "ingest", str(photos), "--db", str(db), *CLI,
            "--engine", "ray", "--address", cluster, "--batch-size", "4", "--commit-seconds", "0",
            "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, rows = time.time() + 300, 0
    while time.time() < deadline and proc.poll() is None:
        try:
            with open_read(db) as view:
                rows = view.rows
        except UserError:
            rows = 0
        if rows >= 8:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"ingest ended before it could be killed: {proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with open_read(db) as view:
        partial = view.rows
    assert 8 <= partial < 64
    assert any(shard_dir(db).glob("shard-*.h5"))  # the worker's shard outlives the driver

    out = json.loads(run_cli("ingest", str(photos), "--db", str(db), *CLI, "--engine", "ray",
                             "--address", cluster, "--batch-size", "4", "--json").stdout)
    assert out["new"] == 64 - partial and out["unchanged"] == partial and out["failed"] == 0
    assert out["engine"]["reused"] >= 0
    assert_same_store(snapshot(db), snapshot(reference))
    assert not shard_dir(db).exists()


def test_ray_worker_killed_then_rerun_equals_local(tmp_path: Path, cluster) -> None:
    photos = tmp_path / "photos"
    make_photos(photos, 48, seed=5)
    opts = IngestOptions(**OPTIONS, batch_size=4, commit_seconds=0)
    reference = tmp_path / "ref.h5"
    run_ingest([photos], reference, opts)

    db = tmp_path / "w.h5"
    killed: list[int] = []

    def kill_worker() -> None:  # kill -9 the network actor once it has written rows
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            for shard in shard_dir(db).glob("shard-*.h5"):
                try:
                    with open_read(shard) as view:
                        written = view.rows
                except UserError:
                    written = 0
                if written >= 8:
                    try:  # the actor holds its shard's writer lock: the refusal names its PID
                        StoreWriter(shard).close()
                    except StoreError as exc:
                        pid = int(re.search(r"locked by PID (\d+)", str(exc)).group(1))
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                    break
            time.sleep(0.05)

    killer = threading.Thread(target=kill_worker)
    killer.start()
    try:
        run_ray_ingest([photos], db, opts, RayOptions())
    except UserError as exc:  # the run may stop on the lost worker: then the rerun finishes
        assert "rerun" in str(exc)
    killer.join()
    assert killed, "the worker was not killed"
    run_ray_ingest([photos], db, opts, RayOptions())
    assert_same_store(snapshot(db), snapshot(reference))


def test_ray_options_are_checked(tmp_path: Path, cluster) -> None:
    photos = tmp_path / "p"
    make_photos(photos, 2)
    proc = run_cli("ingest", str(photos), "--db", str(tmp_path / "x.h5"), *CLI, "--engine",
                   "ray", "--address", cluster, "--gpus-per-worker", "2", check=False)
    assert proc.returncode == 1 and "the cluster has 0 GPU(s)" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 or "Traceback" not in proc.stderr
    proc = run_cli("ingest", str(photos), "--db", str(tmp_path / "x.h5"), "--address", "auto",
                   check=False)
    assert proc.returncode == 2 and "go with --engine ray" in proc.stderr
    proc = run_cli("ingest", str(photos), "--db", str(tmp_path / "x.h5"), "--engine", "spark",
                   check=False)
    assert proc.returncode == 2 and "'spark' is not one of 'local', 'ray'" in proc.stderr
