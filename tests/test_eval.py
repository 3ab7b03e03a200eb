"""imgdb eval end to end: COIL-20 groups (csv, folder, regex), whitening sources, Oxford layout."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import COIL, OXFORD_GT, OXFORD_IMAGES, run_cli
from imgdb.store import open_read

POOLINGS = "sum,spoc,mac,mac2x2,crow,crow-sw,crow-ssw,gem-p3,rmac-l3"


def ingest(photos: Path, db: Path) -> None:
    run_cli("ingest", str(photos), "--db", str(db), "--backbone", "efficientnet_lite0",
            "--layers", "head", "--pooling", POOLINGS, "--size", "original", "--quiet")


def copy_views(dst: Path, objects: range, views: range) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for obj in objects:
        for view in views:
            shutil.copy2(COIL / f"obj{obj}__{view}.png", dst / f"obj{obj}__{view}.png")
    return dst


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    test = copy_views(root / "test", range(1, 11), range(0, 72, 6))  # 10 objects x 12 views
    heldout = copy_views(root / "heldout", range(11, 21), range(0, 72, 6))  # 10 other objects
    ingest(test, root / "test.h5")
    ingest(heldout, root / "heldout.h5")
    return {"root": root, "test": root / "test.h5", "heldout": root / "heldout.h5", "photos": test}


def eval_json(*args: str) -> dict:
    return json.loads(run_cli("eval", *args, "--json").stdout)


def test_groups_every_pooling_matches_reference(stores) -> None:
    out = eval_json("--db", str(stores["test"]), "--group-regex", r"obj(\d+)__", "--descriptor", "all")
    assert out["queries"] == 120 and out["database_images"] == 120
    by_name = {r["descriptor"]: r["mAP"] for r in out["results"]}
    assert len(by_name) == 9  # one row per stored pooling
    with open_read(stores["test"]) as fh:
        paths = fh.paths()
        groups = np.array([re.match(r"obj(\d+)__", Path(p).name).group(1) for p in paths])
        for info in fh.descriptors():
            x, valid = fh.vectors(info), fh.valid(info.extractor)
            assert valid.all()
            assert by_name[info.name] == pytest.approx(trapezoid_map(x, groups), abs=1e-9)
            assert by_name[info.name] > 0.3


def trapezoid_map(x: np.ndarray, groups: np.ndarray) -> float:
    """Oxford compute_ap (trapezoid) written out with a plain loop, query excluded."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    aps = []
    for q in range(len(x)):
        order = [i for i in np.lexsort((np.arange(len(x)), -sims[q])) if i != q]
        n_pos = sum(groups[i] == groups[q] for i in order)
        ap, old_recall, old_precision, hits = 0.0, 0.0, 1.0, 0
        for j, i in enumerate(order):
            hits += groups[i] == groups[q]
            recall, precision = hits / n_pos, hits / (j + 1)
            ap += (recall - old_recall) * (old_precision + precision) / 2
            old_recall, old_precision = recall, precision
        aps.append(ap)
    return float(np.mean(aps))


def test_csv_and_folder_layouts_agree_with_regex(stores) -> None:
    root, photos = stores["root"], stores["photos"]
    names = sorted(p.stem for p in photos.glob("*.png"))
    group = {n: n.split("__")[0] for n in names}
    csv_path = root / "gt.csv"
    lines = ["query,relevant"]
    for n in names:
        lines.append(f"{n}.png," + ";".join(m for m in names if group[m] == group[n] and m != n))
    csv_path.write_text("\n".join(lines) + "\n")
    folder = root / "groups"
    for n in names:
        (folder / group[n]).mkdir(parents=True, exist_ok=True)
        shutil.copy2(photos / f"{n}.png", folder / group[n] / f"{n}.png")
    args = ["--db", str(stores["test"]), "--descriptor", "head/crow"]
    regex = eval_json(*args, "--group-regex", r"obj(\d+)__")["results"][0]["mAP"]
    via_csv = eval_json(*args, "--gt", str(csv_path))["results"][0]["mAP"]
    via_folder = eval_json(*args, "--gt", str(folder))["results"][0]["mAP"]
    assert regex == pytest.approx(via_csv, abs=1e-12) == pytest.approx(via_folder, abs=1e-12)


def test_whitening_sources_are_labelled(stores) -> None:
    proc = run_cli("eval", "--db", str(stores["test"]), "--group-regex", r"obj(\d+)__",
                   "--descriptor", "head/sum", "--descriptor", "head/mac", "--dims", "64,32",
                   "--pca-on-test", "--pca-from", str(stores["heldout"]))
    table = proc.stdout
    assert "[pca on test]" in table and "[pca from heldout.h5]" in table
    header = [line for line in table.splitlines() if line.startswith("method")][0]
    assert "64" in header and "32" in header
    rows = [line for line in table.splitlines() if "head/" in line]
    assert len(rows) == 4  # 2 descriptors x 2 whitening sources
    out = eval_json("--db", str(stores["test"]), "--group-regex", r"obj(\d+)__",
                    "--descriptor", "head/sum", "--dims", "32", "--pca-on-test", "--qe", "2")
    assert out["results"][0]["whitening"] == "pca on test" and out["results"][0]["dims"] == 32
    csv_out = run_cli("eval", "--db", str(stores["test"]), "--group-regex", r"obj(\d+)__",
                      "--descriptor", "head/sum", "--csv").stdout.splitlines()
    assert csv_out[0].startswith("descriptor,whitening,dims") and len(csv_out) == 2


def test_report_folder(stores) -> None:
    report = stores["root"] / "report"
    run_cli("eval", "--db", str(stores["test"]), "--group-regex", r"obj(\d+)__",
            "--descriptor", "head/gem-p3", "--report", str(report))
    rows = (report / "per_query.csv").read_text().splitlines()
    assert len(rows) == 121  # header + one row per query
    assert (report / "pr_curves.png").stat().st_size > 5000
    assert (report / "worst_queries.html").read_text().count("<img") == 50


def test_oxford_layout_with_missing_images(tmp_path: Path) -> None:
    db = tmp_path / "ox.h5"
    run_cli("ingest", str(OXFORD_IMAGES), "--db", str(db), "--backbone", "efficientnet_lite0",
            "--weights", "none", "--layers", "head", "--pooling", "sum", "--size", "max:256",
            "--quiet")
    for mode in ("full", "crop-image", "crop-features"):
        out = eval_json("--db", str(db), "--gt", str(OXFORD_GT), "--query", mode)
        assert out["protocol"] == "oxford"
        assert out["queries"] == 10 and len(out["skipped_queries"]) == 45
        assert out["missing_positives"] > 0
        assert 0 < out["results"][0]["mAP"] <= 1
    text = run_cli("eval", "--db", str(db), "--gt", str(OXFORD_GT)).stdout
    assert "45 queries skipped" in text and "not in the store" in text
