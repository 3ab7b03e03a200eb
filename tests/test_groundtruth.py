"""Ground-truth readers on the official Oxford/Paris files and hand-made layouts."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from helpers import DATA, need
from imgdb.errors import UserError
from imgdb.groundtruth import (groups_from_regex, image_key, load_csv, load_ground_truth,
                               load_groups_folder, load_holidays, load_oxford_folder, load_pickle,
                               load_ukbench)

LAYOUTS = {"oxford": ("oxford5k/gt_files_170407", "oxford5k/gnd_oxford5k.pkl"),
           "paris": ("paris6k/gt_files_120310", "paris6k/gnd_paris6k.pkl")}


def lines(path: Path) -> set[str]:
    return {l.strip() for l in path.read_text().splitlines() if l.strip()} if path.exists() else set()


@pytest.mark.parametrize("dataset", sorted(LAYOUTS))
def test_official_folder_and_pickle_agree(dataset: str) -> None:
    folder_path, pickle_path = (need(DATA / p) for p in LAYOUTS[dataset])
    folder = load_ground_truth(folder_path)
    pick = load_ground_truth(pickle_path)
    assert folder.protocol == pick.protocol == "oxford"
    assert len(folder.queries) == len(pick.queries) == 55
    # counts straight from the files, per query
    for q in folder.queries:
        for lab in ("good", "ok", "junk"):
            assert q.labels[lab] == lines(folder_path / f"{q.name}_{lab}.txt")
        words = (folder_path / f"{q.name}_query.txt").read_text().split()
        assert q.image == words[0].replace("oxc1_", "")
        assert q.bbox == tuple(float(w) for w in words[1:])
    # the two layouts: same queries in the same order, same positives, junk and boxes
    for a, b in zip(folder.queries, pick.queries):
        assert a.image == b.image
        assert a.labels["good"] | a.labels["ok"] == b.labels["ok"]
        assert a.labels["junk"] == b.labels["junk"]
        assert a.bbox == pytest.approx(b.bbox, abs=1e-3)
    assert len(pick.database) == (5063 if dataset == "oxford" else 6392)


def test_oxford_known_counts() -> None:
    gt = load_oxford_folder(need(DATA / "oxford5k/gt_files_170407"))
    q = gt.queries[0]
    assert (q.name, q.image, q.bbox) == ("all_souls_1", "all_souls_000013", (136.5, 34.1, 648.5, 955.7))
    totals = {lab: sum(len(q.labels[lab]) for q in gt.queries) for lab in ("good", "ok", "junk")}
    root = DATA / "oxford5k/gt_files_170407"
    for lab in totals:
        assert totals[lab] == sum(len(lines(f)) for f in root.glob(f"*_{lab}.txt"))
    positives, junk = gt.setups()[""][0]
    assert positives == q.labels["good"] | q.labels["ok"] and junk == q.labels["junk"]


def test_restricted_unpickler_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [Evil()]}))
    with pytest.raises(UserError, match="refusing"):
        load_pickle(bad)
    assert not marker.exists()


def test_revisited_setups(tmp_path: Path) -> None:
    gnd = {"imlist": ["a", "b", "c", "d", "e"], "qimlist": ["q1"],
           "gnd": [{"bbx": [1, 2, 3, 4], "easy": [0, 1], "hard": [2], "junk": [3]}]}
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps(gnd))
    gt = load_ground_truth(path)
    assert gt.protocol == "roxford" and not gt.queries_in_database
    s = gt.setups()
    assert s["easy"][0] == (frozenset("ab"), frozenset("dc"))
    assert s["medium"][0] == (frozenset("abc"), frozenset("d"))
    assert s["hard"][0] == (frozenset("c"), frozenset("dab"))


def test_holidays_ukbench_csv_groups(tmp_path: Path) -> None:
    hol = load_holidays(["/x/100000.jpg", "/x/100001.jpg", "/x/100002.jpg", "/x/100100.jpg",
                         "/x/100101.jpg", "/x/other.jpg"])
    assert [(q.image, sorted(q.labels["positive"])) for q in hol.queries] == [
        ("100000", ["100001", "100002"]), ("100100", ["100101"])]
    assert hol.exclude_query_from_ranking
    uk = load_ukbench([f"ukbench{i:05d}.jpg" for i in range(8)])
    assert len(uk.queries) == 8 and uk.queries[5].labels["positive"] == frozenset(
        f"ukbench{i:05d}" for i in range(4, 8))
    csv_path = tmp_path / "gt.csv"
    csv_path.write_text("query,relevant,junk\nq.jpg,a.jpg;b.png,j.jpg\nq.jpg,c\nr,a\n")
    gt = load_csv(csv_path)
    assert [(q.image, sorted(q.labels["positive"]), sorted(q.labels["junk"])) for q in gt.queries] \
        == [("q", ["a", "b", "c"], ["j"]), ("r", ["a"], [])]
    for group, names in {"g1": ["x1", "x2"], "g2": ["y1", "y2", "y3"]}.items():
        (tmp_path / "groups" / group).mkdir(parents=True)
        for n in names:
            (tmp_path / "groups" / group / f"{n}.jpg").write_bytes(b"")
    folder = load_groups_folder(tmp_path / "groups")
    assert {q.image: sorted(q.labels["positive"]) for q in folder.queries}["y2"] == ["y1", "y3"]
    rx = groups_from_regex(["obj1__0.png", "obj1__5.png", "obj2__0.png", "noise.png"], r"obj(\d+)__")
    assert {q.image: sorted(q.labels["positive"]) for q in rx.queries} == {
        "obj1__0": ["obj1__5"], "obj1__5": ["obj1__0"], "obj2__0": []}
    assert image_key("/a/b.c/d.e.jpg") == "d.e"
    with pytest.raises(UserError):
        load_ground_truth(tmp_path / "missing")
