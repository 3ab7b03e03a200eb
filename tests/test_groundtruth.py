"""Ground-truth readers on the official Oxford/Paris files and on hand-made layouts.

The official files are read here with plain file reading and compared with what the loaders
return; the official files are kept byte for byte in tests/data (see its README.md).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from helpers import DATA
from imgdb.errors import UserError
from imgdb.evaluation.groundtruth import (PROTOCOLS, GroundTruth, Query, groups_from_regex, image_key,
                               load_csv, load_ground_truth, load_groups_folder, load_holidays,
                               load_holidays_file, load_oxford_folder, load_pickle, load_ukbench)

LAYOUTS = {  # dataset -> (gt folder, pickle, number of database images)
    "oxford": ("oxford5k/gt_files_170407", "oxford5k/gnd_oxford5k.pkl", 5063),
    "paris": ("paris6k/gt_files_120310", "paris6k/gnd_paris6k.pkl", 6392),
}


def official(rel: str) -> Path:
    """An official ground-truth file or folder in tests/data (always there, never skipped)."""
    path = DATA / rel
    assert path.exists(), f"test data {path} is missing from the repository"
    return path


def lines(path: Path) -> list[str]:
    """Non-empty lines of a gt list file, as written."""
    if not path.exists():
        return []
    return [l.strip() for l in path.read_text().splitlines() if l.strip()]


def query_line(folder: Path, name: str) -> tuple[str, tuple[float, ...]]:
    words = (folder / f"{name}_query.txt").read_text().split()
    image = words[0][len("oxc1_"):] if words[0].startswith("oxc1_") else words[0]
    return image, tuple(float(w) for w in words[1:])


# ---------------------------------------------------------------------------------------------
# the official Oxford / Paris files


@pytest.mark.parametrize("dataset", sorted(LAYOUTS))
def test_official_folder_matches_the_files(dataset: str) -> None:
    folder = official(LAYOUTS[dataset][0])
    gt = load_oxford_folder(folder)
    names = sorted(f.name[: -len("_query.txt")] for f in folder.glob("*_query.txt"))
    assert len(names) == 55
    assert [q.name for q in gt.queries] == names
    assert (gt.protocol, gt.database, gt.queries_in_database, gt.exclude_query_from_ranking) == \
        ("oxford", None, True, False)
    assert gt.source == str(folder)
    for q in gt.queries:
        assert (q.image, q.bbox) == query_line(folder, q.name)
        assert all(isinstance(v, float) for v in q.bbox)
        for lab in ("good", "ok", "junk"):
            listed = lines(folder / f"{q.name}_{lab}.txt")
            assert len(set(listed)) == len(listed)  # no repeated line in the official lists
            assert q.labels[lab] == frozenset(listed)
    positives, junk = zip(*gt.setups()[""])
    assert list(positives) == [q.labels["good"] | q.labels["ok"] for q in gt.queries]
    assert list(junk) == [q.labels["junk"] for q in gt.queries]
    for lab in ("good", "ok", "junk"):  # totals over all 55 queries
        assert sum(len(q.labels[lab]) for q in gt.queries) == \
            sum(len(lines(f)) for f in folder.glob(f"*_{lab}.txt"))


def test_oxford_known_queries() -> None:
    folder = official(LAYOUTS["oxford"][0])
    gt = load_ground_truth(folder)
    by_name = {q.name: q for q in gt.queries}
    q = by_name["all_souls_1"]
    raw = (folder / "all_souls_1_query.txt").read_text().split()
    assert raw[0] == "oxc1_all_souls_000013" and q.image == "all_souls_000013"
    assert q.bbox == (136.5, 34.1, 648.5, 955.7) == tuple(float(v) for v in raw[1:])
    for name in ("all_souls_1", "radcliffe_camera_3", "pitt_rivers_5", "christ_church_2"):
        for lab in ("good", "ok", "junk"):
            text = (folder / f"{name}_{lab}.txt").read_text()
            assert len(by_name[name].labels[lab]) == len(text.split())
    assert (len(q.labels["good"]), len(q.labels["ok"]), len(q.labels["junk"])) == (24, 54, 33)
    totals = {lab: sum(len(q.labels[lab]) for q in gt.queries) for lab in ("good", "ok", "junk")}
    assert totals == {"good": 1360, "ok": 1480, "junk": 1495}


def test_paris_known_queries() -> None:
    folder = official(LAYOUTS["paris"][0])
    gt = load_ground_truth(folder, protocol="oxford")
    q = {q.name: q for q in gt.queries}["defense_1"]
    assert q.image == "paris_defense_000605" and q.bbox == (130.0, 17.0, 843.0, 732.0)
    totals = {lab: sum(len(q.labels[lab]) for q in gt.queries) for lab in ("good", "ok", "junk")}
    assert totals == {"good": 0, "ok": 8955, "junk": 8245}  # Paris' _good.txt files are empty


@pytest.mark.parametrize("dataset", sorted(LAYOUTS))
def test_official_pickle(dataset: str) -> None:
    path = official(LAYOUTS[dataset][1])
    raw = pickle.loads(path.read_bytes())  # the test's own reference reading (trusted file)
    gt = load_pickle(path)
    assert (gt.protocol, gt.queries_in_database, gt.exclude_query_from_ranking) == \
        ("oxford", True, False)
    assert len(gt.queries) == 55 and gt.database == raw["imlist"]
    assert len(gt.database) == LAYOUTS[dataset][2]
    assert [q.image for q in gt.queries] == [q.name for q in gt.queries] == raw["qimlist"]
    for q, g in zip(gt.queries, raw["gnd"]):
        assert set(q.labels) == {"ok", "junk"}
        assert q.labels["ok"] == {raw["imlist"][i] for i in g["ok"]}
        assert q.labels["junk"] == {raw["imlist"][i] for i in g["junk"]}
        assert q.bbox == pytest.approx(tuple(g["bbx"]))
    assert sum(len(q.labels["ok"]) for q in gt.queries) == sum(len(g["ok"]) for g in raw["gnd"])
    assert gt.setups()[""][0] == (gt.queries[0].labels["ok"], gt.queries[0].labels["junk"])


@pytest.mark.parametrize("dataset", sorted(LAYOUTS))
def test_folder_and_pickle_agree(dataset: str) -> None:
    folder = load_ground_truth(official(LAYOUTS[dataset][0]))
    pick = load_ground_truth(official(LAYOUTS[dataset][1]))
    assert folder.protocol == pick.protocol == "oxford"
    assert len(folder.queries) == len(pick.queries) == 55
    by_image = {q.image: q for q in pick.queries}
    assert len(by_image) == 55 and set(by_image) == {q.image for q in folder.queries}
    for a in folder.queries:
        b = by_image[a.image]
        assert a.labels["good"] | a.labels["ok"] == b.labels["ok"]
        assert a.labels["junk"] == b.labels["junk"]
        assert a.bbox == pytest.approx(b.bbox, abs=1e-3)
    assert folder.setups()[""] == [
        (by_image[q.image].labels["ok"], by_image[q.image].labels["junk"]) for q in folder.queries]
    # every labelled image is in the pickle's database
    db = set(pick.database)
    assert all(q.labels[lab] <= db for q in folder.queries for lab in ("good", "ok", "junk"))
    assert {q.image for q in folder.queries} <= db


# ---------------------------------------------------------------------------------------------
# the restricted unpickler


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("proto", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_restricted_unpickler_refuses_code(tmp_path: Path, proto: int) -> None:
    marker = tmp_path / "ran"
    bad = tmp_path / "evil.pkl"
    evil = {"imlist": ["a"], "qimlist": ["a"], "gnd": [{"ok": [0], "junk": [], "x": _Evil(marker)}]}
    bad.write_bytes(pickle.dumps(evil, protocol=proto))
    with pytest.raises(UserError, match=r"refusing to load (posix|nt|os)\.system"):
        load_pickle(bad)
    with pytest.raises(UserError):
        load_ground_truth(bad)
    assert not marker.exists()
    # the same holds for other globals a pickle could reach for
    for module, name in (("builtins", "eval"), ("builtins", "getattr"), ("subprocess", "Popen"),
                         ("numpy", "load"), ("_codecs", "decode")):
        bad.write_bytes(f"c{module}\n{name}\n(S'1'\ntR.".encode())
        with pytest.raises(UserError, match="refusing"):
            load_pickle(bad)


def test_restricted_unpickler_reads_numpy_and_python2(tmp_path: Path) -> None:
    gnd = {"imlist": np.array(["a", "b", "c", "d"]), "qimlist": ["q"],
           "gnd": [{"bbx": np.array([1.5, 2.0, 3.0, 4.0]), "easy": np.array([0, 1]),
                    "hard": np.array([2], dtype=np.int32), "junk": [np.int64(3)]}]}
    for proto in (2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"np{proto}.pkl"
        path.write_bytes(pickle.dumps(gnd, protocol=proto))
        gt = load_pickle(path)
        assert gt.protocol == "roxford" and gt.database == ["a", "b", "c", "d"]
        q = gt.queries[0]
        assert q.bbox == (1.5, 2.0, 3.0, 4.0)
        assert q.labels == {"easy": {"a", "b"}, "hard": {"c"}, "junk": {"d"}}
    # numpy's protocol-2 bytes come through _codecs.encode: latin-1 only
    path = tmp_path / "codec.pkl"
    path.write_bytes(b"c_codecs\nencode\n(Vx\nVrot13\ntR.")
    with pytest.raises(UserError, match="latin-1"):
        load_pickle(path)
    # a Python 2 pickle (protocol 2, __builtin__ module names, byte strings)
    path = tmp_path / "py2.pkl"
    path.write_bytes(b"\x80\x02}q\x00(U\x06imlistq\x01]q\x02(U\x01aU\x01be"
                     b"U\x07qimlistq\x03]q\x04U\x01aaU\x03gndq\x05]q\x06}q\x07(U\x02ok"
                     b"c__builtin__\nset\n]q\x08K\x01a\x85RU\x04junk]uau.")
    gt = load_pickle(path)
    assert gt.database == ["a", "b"] and gt.queries[0].labels == {"ok": {"b"}, "junk": frozenset()}


def test_bad_pickles_are_user_errors(tmp_path: Path) -> None:
    path = tmp_path / "gnd.pkl"
    cases = {
        b"not a pickle at all": "damaged",
        pickle.dumps([1, 2, 3]): "imlist, qimlist and gnd",
        pickle.dumps({"imlist": ["a"], "qimlist": ["a", "b"], "gnd": [{"ok": []}]}): "one gnd",
        pickle.dumps({"imlist": ["a"], "qimlist": ["a"], "gnd": [{"ok": [5]}]}): "outside imlist",
        pickle.dumps({"imlist": ["a"], "qimlist": ["a"], "gnd": [{"ok": [-1]}]}): "outside imlist",
        pickle.dumps({"imlist": ["a"], "qimlist": ["a"], "gnd": [{"ok": [0.5]}]}): "integer",
        pickle.dumps({"imlist": ["a"], "qimlist": ["a"], "gnd": [{"bbx": [1, 2], "ok": []}]}): "bbx",
        pickle.dumps({"imlist": ["a"], "qimlist": ["a"],
                      "gnd": [{"bbx": [float("nan"), 2, 3, 4], "ok": []}]}): "not a box",
        pickle.dumps({"imlist": ["a"], "qimlist": ["a"], "gnd": [{"bbx": [1, 2, 3, 4]}]}): "ok",
        pickle.dumps({"imlist": ["a"], "qimlist": ["a"], "gnd": ["x"]}): "dict",
        pickle.dumps({"imlist": "abc", "qimlist": ["a"], "gnd": [{}]}): "imlist should be a list",
    }
    for content, message in cases.items():
        path.write_bytes(content)
        with pytest.raises(UserError, match=message):
            load_pickle(path)
    with pytest.raises(UserError, match="cannot read"):
        load_pickle(tmp_path / "absent.pkl")


# ---------------------------------------------------------------------------------------------
# Revisited Oxford / Paris


def test_revisited_setups(tmp_path: Path) -> None:
    gnd = {"imlist": ["a", "b", "c", "d", "e", "f"], "qimlist": ["q1", "q2"],
           "gnd": [{"bbx": [1, 2, 3, 4], "easy": [0, 1], "hard": [2], "junk": [3]},
                   {"bbx": None, "easy": [], "hard": [4, 5], "junk": []}]}
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps(gnd))
    gt = load_ground_truth(path, protocol="roxford")
    assert gt.protocol == "roxford" and not gt.queries_in_database
    assert not gt.exclude_query_from_ranking and gt.database == list("abcdef")
    assert [(q.name, q.image, q.bbox) for q in gt.queries] == [
        ("q1", "q1", (1.0, 2.0, 3.0, 4.0)), ("q2", "q2", None)]
    s = gt.setups()
    assert list(s) == ["easy", "medium", "hard"]
    F = frozenset
    assert s["easy"] == [(F("ab"), F("dc")), (F(), F("ef"))]
    assert s["medium"] == [(F("abc"), F("d")), (F("ef"), F())]
    assert s["hard"] == [(F("c"), F("dab")), (F("ef"), F())]
    with pytest.raises(UserError, match="roxford ground truth, not oxford"):
        load_ground_truth(path, protocol="oxford")


# ---------------------------------------------------------------------------------------------
# Holidays, UKBench


def test_holidays() -> None:
    names = ["/x/100000.jpg", "/x/100001.jpg", "/x/100002.jpg", "/y/100101.JPG", "/y/100100.jpg",
             "/x/100000.jpg", "/x/other.jpg", "/x/1234.jpg"]
    gt = load_holidays(names)
    assert [(q.name, q.image, sorted(q.labels["positive"])) for q in gt.queries] == [
        ("100000", "100000", ["100001", "100002"]), ("100100", "100100", ["100101"])]
    assert (gt.protocol, gt.queries_in_database, gt.exclude_query_from_ranking) == \
        ("holidays", True, True)
    assert gt.setups()[""][1] == (frozenset({"100101"}), frozenset())
    assert load_ground_truth(None, "holidays", images=names).queries == gt.queries
    with pytest.raises(UserError, match="Holidays"):
        load_holidays(["a.jpg", "b.jpg"])


def test_holidays_file(tmp_path: Path) -> None:
    path = tmp_path / "perfect_result.dat"
    path.write_text("100000.jpg 0 100001.jpg 1 100002.jpg\n100100.jpg 0 100101.jpg\n\n")
    gt = load_ground_truth(path)
    assert gt.protocol == "holidays" and gt.exclude_query_from_ranking
    assert [(q.image, sorted(q.labels["positive"])) for q in gt.queries] == [
        ("100000", ["100001", "100002"]), ("100100", ["100101"])]
    assert load_ground_truth(path, protocol="holidays").queries == gt.queries
    assert load_holidays_file(path).queries == gt.queries
    path.write_text("# nothing\n")
    with pytest.raises(UserError, match="no query lines"):
        load_holidays_file(path)


def test_ukbench() -> None:
    names = [f"/u/ukbench{i:05d}.jpg" for i in range(9)] + ["/u/other.jpg"]
    gt = load_ukbench(names)
    assert [q.image for q in gt.queries] == [f"ukbench{i:05d}" for i in range(9)]
    group1 = frozenset(f"ukbench{i:05d}" for i in range(4, 8))
    assert gt.queries[5].labels["positive"] == group1 and gt.queries[5].image in group1
    assert gt.queries[8].labels["positive"] == {"ukbench00008"}
    assert (gt.protocol, gt.queries_in_database, gt.exclude_query_from_ranking) == \
        ("ukbench", True, False)
    assert load_ground_truth(None, "ukbench", images=names).queries == gt.queries
    with pytest.raises(UserError, match="image names"):
        load_ground_truth(None, "ukbench", images=[])


# ---------------------------------------------------------------------------------------------
# CSV, groups, regex


def test_csv(tmp_path: Path) -> None:
    path = tmp_path / "gt.csv"
    path.write_text("\ufeffquery,relevant,junk\n"
                    "imgs/q.jpg,a.jpg;b.png;c,j.jpg\n"
                    "q.jpg,d;q.jpg\n"
                    "\n"
                    "# a comment\n"
                    "r,a\n"
                    "s,\n"
                    "v1.2,x.y.jpg,\n")
    gt = load_ground_truth(path)
    assert gt.protocol == "csv" and gt.exclude_query_from_ranking and gt.queries_in_database
    assert [(q.name, q.image, sorted(q.labels["positive"]), sorted(q.labels["junk"]))
            for q in gt.queries] == [("q", "q", ["a", "b", "c", "d"], ["j"]), ("r", "r", ["a"], []),
                                     ("s", "s", [], []), ("v1.2", "v1.2", ["x.y"], [])]
    assert gt.setups()[""][0] == (frozenset("abcd"), frozenset("j"))
    no_header = tmp_path / "plain.csv"
    no_header.write_text("q,a b;c\n")  # lists split on ';' only: names keep their spaces
    assert load_csv(no_header).queries[0].labels["positive"] == {"a b", "c"}
    bad = tmp_path / "bad.csv"
    bad.write_text("query,relevant\nonlyone\n")
    with pytest.raises(UserError, match="line 2"):
        load_csv(bad)
    bad.write_text("query,relevant\n")
    with pytest.raises(UserError, match="no query rows"):
        load_csv(bad)
    bad.write_text("query,relevant,junk\nq,a,j,extra\n")  # a name with an unquoted ','?
    with pytest.raises(UserError, match="line 2: 4 fields"):
        load_csv(bad)
    bad.write_text("query,relevant,junk\nq,a,j,,\n")  # empty trailing fields are harmless
    assert load_csv(bad).queries[0].labels == {"positive": {"a"}, "junk": {"j"}}


def test_groups_folder(tmp_path: Path) -> None:
    root = tmp_path / "groups"
    for group, names in {"g1": ["x1.jpg", "x2.png"], "g2": ["y1.jpg", "deep/y2.jpg", "y3.JPG"],
                         "empty": [], ".hidden": ["h.jpg"]}.items():
        (root / group).mkdir(parents=True)
        for n in names:
            (root / group / n).parent.mkdir(parents=True, exist_ok=True)
            (root / group / n).write_bytes(b"")
    (root / "g1" / "notes.txt").write_text("not an image")
    (root / "loose.jpg").write_bytes(b"")
    gt = load_ground_truth(root)
    assert gt.protocol == "groups" and gt.exclude_query_from_ranking and gt.queries_in_database
    assert {q.image: sorted(q.labels["positive"]) for q in gt.queries} == {
        "x1": ["x2"], "x2": ["x1"], "y1": ["y2", "y3"], "y2": ["y1", "y3"], "y3": ["y1", "y2"]}
    assert [q.name for q in gt.queries] == ["x1", "x2", "y1", "y2", "y3"]
    (root / "g2" / "x1.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="same image key 'x1'"):
        load_groups_folder(root)
    with pytest.raises(UserError, match="no sub-folders of images"):
        load_groups_folder(root / "empty")


def test_groups_from_regex() -> None:
    names = ["/c/obj1__0.png", "/c/obj1__5.png", "/c/obj2__0.png", "/c/noise.png", "/d/obj1__5.png"]
    gt = load_ground_truth(None, images=names, group_regex=r"obj(\d+)__")
    assert gt.protocol == "groups" and gt.exclude_query_from_ranking
    assert {q.image: sorted(q.labels["positive"]) for q in gt.queries} == {
        "obj1__0": ["obj1__5"], "obj1__5": ["obj1__0"], "obj2__0": []}
    whole = groups_from_regex(["a_1.jpg", "a_2.jpg", "b_1.jpg"], r"^[a-z]+")
    assert {q.image: sorted(q.labels["positive"]) for q in whole.queries} == {
        "a_1": ["a_2"], "a_2": ["a_1"], "b_1": []}
    with pytest.raises(UserError, match="not a valid regular expression"):
        groups_from_regex(names, "obj(")
    with pytest.raises(UserError, match="no image name matches"):
        groups_from_regex(names, "zzz")
    with pytest.raises(UserError, match="cannot be combined"):
        load_ground_truth(None, "oxford", images=names, group_regex="obj")


# ---------------------------------------------------------------------------------------------
# keys, dispatch, errors


def test_image_key() -> None:
    assert image_key("/a/b.c/d.e.jpg") == "d.e"
    assert image_key("all_souls_000013") == "all_souls_000013"
    assert image_key("C:\\photos\\100000.JPG") == "100000"
    assert image_key("ukbench00001.jpg") == "ukbench00001"
    from imgdb.evaluation.groundtruth import _IMAGE_EXTENSIONS
    from imgdb.features.images import IMAGE_EXTENSIONS
    assert _IMAGE_EXTENSIONS == IMAGE_EXTENSIONS  # gt names lose exactly the store's extensions


def test_query_is_hashable_and_frozen() -> None:
    q = Query("n", "img", None, {"positive": frozenset({"a"})})
    assert hash(q) == hash(Query("n", "img", None, {}))
    with pytest.raises(AttributeError):
        q.name = "other"  # type: ignore[misc]
    assert GroundTruth("csv", [q]).setups() == {"": [(frozenset({"a"}), frozenset())]}


def test_dispatch_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown protocol 'trec'"):
        load_ground_truth(tmp_path, protocol="trec")
    with pytest.raises(UserError, match="does not exist"):
        load_ground_truth(tmp_path / "missing")
    with pytest.raises(UserError, match="no ground truth given"):
        load_ground_truth(None)
    (tmp_path / "gt.json").write_text("{}")
    with pytest.raises(UserError, match="cannot tell the layout"):
        load_ground_truth(tmp_path / "gt.json")
    with pytest.raises(UserError, match="no sub-folders of images"):
        load_ground_truth(tmp_path)
    with pytest.raises(UserError, match="expected no ground-truth path"):
        load_ground_truth(tmp_path, protocol="ukbench", images=["ukbench00000.jpg"])
    with pytest.raises(UserError, match="expects a file"):
        load_ground_truth(tmp_path, protocol="roxford")
    # a folder holding ground truth one level down is not mistaken for a folder of groups
    (tmp_path / "gnd_x.pkl").write_bytes(pickle.dumps({}))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="holds ground truth"):
        load_ground_truth(tmp_path)
    assert load_ground_truth(tmp_path, protocol="groups").protocol == "groups"
    # a malformed _query.txt
    gtdir = tmp_path / "gt"
    gtdir.mkdir()
    (gtdir / "a_1_query.txt").write_text("oxc1_a 1 2 3\n")
    with pytest.raises(UserError, match="image x1 y1 x2 y2"):
        load_ground_truth(gtdir)
    (gtdir / "a_1_query.txt").write_text("oxc1_a 1 2 3 4\n")
    (gtdir / "a_1_good.txt").write_text("b\nc\n")
    with pytest.raises(UserError, match="a_1_ok.txt is missing"):  # not quietly empty
        load_ground_truth(gtdir, protocol="oxford")
    (gtdir / "a_1_ok.txt").write_text("")
    (gtdir / "a_1_junk.txt").write_text("")
    for box in ("nan 2 3 4", "1 2 inf 4", "3 2 1 4", "1 4 3 4"):
        (gtdir / "a_1_query.txt").write_text(f"oxc1_a {box}\n")
        with pytest.raises(UserError, match="is not a box"):
            load_ground_truth(gtdir, protocol="oxford")
    (gtdir / "a_1_query.txt").write_text("oxc1_a 1 2 3 4\n")
    gt = load_ground_truth(gtdir, protocol="oxford")
    assert gt.queries == [Query("a_1", "a", (1.0, 2.0, 3.0, 4.0),
                                {"good": frozenset("bc"), "ok": frozenset(), "junk": frozenset()})]
    with pytest.raises(UserError, match="expects a file"):
        load_ground_truth(gtdir, protocol="csv")
    assert set(PROTOCOLS) == {"auto", "oxford", "roxford", "holidays", "ukbench", "csv", "groups"}
