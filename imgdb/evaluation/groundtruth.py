"""Ground-truth readers for the benchmarks' own layouts, and for users' groups.

Images are identified by their *key*: the file name without directories and without its
extension (`/data/oxford/all_souls_000013.jpg` -> `all_souls_000013`). The Oxford/Paris gt files
and the revisitop pickles already name images that way.

Layouts read here (docs/design.md §7):

* the official Oxford5k / Paris6k gt folders (`<q>_query.txt`, `_good`, `_ok`, `_junk`);
* the pickle layout of cnnimageretrieval-pytorch / revisitop (`imlist`, `qimlist`, `gnd`), read
  with a restricted unpickler that only rebuilds plain data and numpy arrays;
* INRIA Holidays and UKBench, whose groups are encoded in the file names;
* a CSV `query,relevant[,junk]`, a folder with one sub-folder per group, and groups from a regex.

Only the standard library (and numpy, through the unpickler) is used here.
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import operator
import pickle
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

__all__ = [
    "PROTOCOLS",
    "Query",
    "GroundTruth",
    "image_key",
    "load_oxford_folder",
    "load_pickle",
    "load_holidays",
    "load_holidays_file",
    "load_ukbench",
    "load_csv",
    "load_groups_folder",
    "groups_from_regex",
    "load_ground_truth",
]

PROTOCOLS = ("auto", "oxford", "roxford", "holidays", "ukbench", "csv", "groups")

# The store only holds files with these extensions (imgdb.images.IMAGE_EXTENSIONS; kept here so
# that this module does not import Pillow). A name read from a ground-truth file loses its
# extension only when it is one of these, so a key such as `img.v2` survives a round trip.
_IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff",
                               ".webp", ".ppm", ".pgm", ".pbm"})


def image_key(path: str) -> str:
    """File name without directories and without the last extension."""
    name = str(path).replace("\\", "/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name


def _name_key(name: str) -> str:
    """Key of an image *named* in a ground-truth file: an image extension is dropped if present."""
    base = str(name).strip().replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, ext = base.rpartition(".")
    if dot and stem and "." + ext.lower() in _IMAGE_EXTENSIONS:
        return stem
    return base


@dataclass(frozen=True)
class Query:
    """One query: its photo, optional box, and labelled image keys."""

    name: str
    image: str
    bbox: tuple[float, float, float, float] | None
    labels: dict[str, frozenset[str]] = field(default_factory=dict, hash=False)


@dataclass
class GroundTruth:
    """Queries with labels, and how the protocol treats them."""

    protocol: str
    queries: list[Query]
    database: list[str] | None = None
    queries_in_database: bool = True
    exclude_query_from_ranking: bool = False
    source: str = ""

    def setups(self) -> dict[str, list[tuple[frozenset[str], frozenset[str]]]]:
        """Setup name -> per query (positives, junk), in query order.

        oxford: {"": (good | ok, junk)} (the old pickle has only ok and junk);
        roxford: easy / medium / hard exactly as revisitop's example_evaluate.py;
        holidays, ukbench, csv, groups: {"": (positive, junk)}.
        """
        def get(q: Query, *names: str) -> frozenset[str]:
            out: frozenset[str] = frozenset()
            for n in names:
                out |= q.labels.get(n, frozenset())
            return out

        if self.protocol == "roxford":
            return {
                "easy": [(get(q, "easy"), get(q, "junk", "hard")) for q in self.queries],
                "medium": [(get(q, "easy", "hard"), get(q, "junk")) for q in self.queries],
                "hard": [(get(q, "hard"), get(q, "junk", "easy")) for q in self.queries],
            }
        return {"": [(get(q, "good", "ok", "positive"), get(q, "junk")) for q in self.queries]}


# ---------------------------------------------------------------------------------------------
# Oxford / Paris folders


def _box(values, where: str, found) -> tuple[float, float, float, float]:
    """A query box x1 y1 x2 y2: four finite numbers with x1 < x2 and y1 < y2."""
    try:
        box = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        box = ()
    if len(box) != 4:
        raise UserError(f"{where} should hold a box [x1, y1, x2, y2], found {found!r}")
    if not all(math.isfinite(v) for v in box) or box[0] >= box[2] or box[1] >= box[3]:
        raise UserError(f"{where}: the query box {found!r} is not a box (four finite numbers, "
                        f"x1 < x2 and y1 < y2)")
    return box  # type: ignore[return-value]


def _read_list(path: Path) -> frozenset[str]:
    if not path.exists():
        raise UserError(f"{path.name} is missing from {path.parent}: an Oxford/Paris gt folder "
                        f"holds <query>_good.txt, _ok.txt and _junk.txt for every "
                        f"<query>_query.txt (an empty file for an empty list)")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    return frozenset(_name_key(line) for line in text.splitlines() if line.strip())


def load_oxford_folder(folder: str | Path) -> GroundTruth:
    """The official Oxford5k / Paris6k gt folder: `<q>_query.txt`, `_good`, `_ok`, `_junk`.

    Queries are sorted by name; every query needs its `_good`, `_ok` and `_junk` lists (the
    official folders have all three, empty files included): a missing one is an error, not an
    empty list that would quietly change the scores."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: expected an Oxford/Paris gt folder")
    files = {f.name[: -len("_query.txt")]: f for f in folder.glob("*_query.txt") if f.is_file()}
    if not files:
        raise UserError(f"{folder} has no *_query.txt files: not an Oxford/Paris gt folder")
    queries = []
    for name in sorted(files):
        f = files[name]
        try:
            parts = f.read_text(encoding="utf-8", errors="replace").split()
        except OSError as exc:
            raise UserError(f"cannot read {f}: {exc.strerror or exc}") from None
        if len(parts) != 5:
            raise UserError(f"{f} should hold 'image x1 y1 x2 y2', found {' '.join(parts)[:80]!r}")
        bbox = _box(parts[1:], str(f), " ".join(parts[1:])[:80])
        image = parts[0][len("oxc1_"):] if parts[0].startswith("oxc1_") else parts[0]
        labels = {lab: _read_list(folder / f"{name}_{lab}.txt") for lab in ("good", "ok", "junk")}
        queries.append(Query(name, _name_key(image), bbox, labels))  # type: ignore[arg-type]
    return GroundTruth("oxford", queries, None, queries_in_database=True,
                       exclude_query_from_ranking=False, source=str(folder))


# ---------------------------------------------------------------------------------------------
# revisitop / cnnimageretrieval pickles


class _Refused(pickle.UnpicklingError):
    """The pickle asked for something other than plain data."""


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode` as numpy's protocol-2 pickles use it (bytes as latin-1 text), only."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "iso-8859-1"):
        raise _Refused("refusing _codecs.encode with anything but latin-1 text")
    return codecs.encode(obj, "latin1", "strict")


class _SafeUnpickler(pickle.Unpickler):
    """Plain data (dict, list, tuple, set, str, numbers) and numpy arrays only.

    Any other global is refused before it is looked up, so unpickling can run no other code."""

    _BUILTINS = frozenset({"set", "frozenset", "list", "dict", "tuple", "bytearray", "complex"})
    _NUMPY = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
    })

    def find_class(self, module: str, name: str):
        mod = {"__builtin__": "builtins"}.get(module, module)  # Python 2 pickles
        if mod == "builtins" and name in self._BUILTINS:
            return super().find_class(module, name)
        if (mod, name) in self._NUMPY:
            return super().find_class(module, name)
        if (mod, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise _Refused(f"refusing to load {module}.{name} from a ground-truth pickle")


def _restricted_load(data: bytes):
    return _SafeUnpickler(io.BytesIO(data), encoding="latin1").load()


def _indices(value, n: int, where: str) -> list[int]:
    if value is None:
        return []
    items = value.tolist() if hasattr(value, "tolist") else value
    if isinstance(items, (int, float, str, bytes)):
        items = [items]
    out = []
    try:
        for v in items:
            j = operator.index(v)
            if not 0 <= j < n:
                raise UserError(f"{where}: index {j} is outside imlist (0..{n - 1})")
            out.append(j)
    except TypeError:
        raise UserError(f"{where}: expected a list of integer indices into imlist") from None
    return out


def load_pickle(path: str | Path) -> GroundTruth:
    """The pickle layout (`imlist`, `qimlist`, `gnd[i]` with `bbx` and `ok`/`junk` or
    `easy`/`hard`/`junk` as indices into `imlist`), read without executing code.

    Old layout (ok/junk): protocol "oxford", the queries are database images. Revisited
    (easy/hard/junk): protocol "roxford", the query photos are not part of `imlist`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read ground-truth pickle {path}: {exc.strerror or exc}") from None
    try:
        data = _restricted_load(raw)
    except _Refused as exc:
        raise UserError(f"cannot read ground-truth pickle {path}: {exc}") from None
    except Exception as exc:  # a damaged file: any error of the (restricted) unpickler
        raise UserError(f"cannot read ground-truth pickle {path}: damaged or not a pickle "
                        f"({type(exc).__name__}: {exc})") from None
    expected = ("expected a dict with imlist, qimlist and gnd (the revisitop / "
                "cnnimageretrieval layout)")
    if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= set(data):
        raise UserError(f"{path} is not a ground-truth pickle: {expected}")
    imlist_raw, qimlist_raw, gnd = data["imlist"], data["qimlist"], data["gnd"]
    for what, value in (("imlist", imlist_raw), ("qimlist", qimlist_raw), ("gnd", gnd)):
        if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
            raise UserError(f"{path}: {what} should be a list, found {type(value).__name__}")
    imlist = [_name_key(x.decode() if isinstance(x, bytes) else str(x)) for x in imlist_raw]
    qimlist = [_name_key(x.decode() if isinstance(x, bytes) else str(x)) for x in qimlist_raw]
    gnd = list(gnd)
    if len(gnd) != len(qimlist):
        raise UserError(f"{path}: gnd has {len(gnd)} entries but qimlist {len(qimlist)}; "
                        f"expected one gnd entry per query")
    if not all(isinstance(g, dict) for g in gnd):
        raise UserError(f"{path}: every gnd entry should be a dict with bbx and ok/junk or "
                        f"easy/hard/junk")
    revisited = any("easy" in g or "hard" in g for g in gnd)
    label_names = ("easy", "hard", "junk") if revisited else ("ok", "junk")
    if not all(any(lab in g for lab in label_names[:-1]) for g in gnd):
        raise UserError(f"{path}: every gnd entry should list "
                        f"{' and '.join(label_names[:-1])} (indices into imlist)")
    queries, seen = [], defaultdict(int)
    for i, (qkey, g) in enumerate(zip(qimlist, gnd)):
        where = f"{path}: gnd[{i}]"
        bbox = None
        bbx = g.get("bbx")
        if bbx is not None:
            values = bbx.tolist() if hasattr(bbx, "tolist") else bbx
            bbox = _box(values if isinstance(values, (list, tuple)) else [values],
                        f"{where}: bbx", bbx)
        labels = {lab: frozenset(imlist[j] for j in _indices(g.get(lab), len(imlist), where))
                  for lab in label_names}
        seen[qkey] += 1
        name = qkey if seen[qkey] == 1 else f"{qkey}#{seen[qkey]}"
        queries.append(Query(name, qkey, bbox, labels))  # type: ignore[arg-type]
    return GroundTruth("roxford" if revisited else "oxford", queries, imlist,
                       queries_in_database=not revisited, exclude_query_from_ranking=False,
                       source=str(path))


# ---------------------------------------------------------------------------------------------
# Holidays, UKBench


def _numbered(images: Sequence[str], pattern: str, what: str) -> list[tuple[int, str]]:
    out = {}
    rx = re.compile(pattern)
    for p in images:
        key = image_key(p)
        m = rx.fullmatch(key)
        if m:
            out[key] = int(m.group(1))
    if not out:
        raise UserError(f"no image of the store is named like {what}")
    return sorted((n, k) for k, n in out.items())


def load_holidays(images: Sequence[str]) -> GroundTruth:
    """INRIA Holidays from the store's file names `NNNNNN.jpg`: group = NNNNNN // 100, the
    smallest number of a group is its query, the rest of the group its positives. Other names
    are distractors."""
    groups: dict[int, list[str]] = defaultdict(list)
    for number, key in _numbered(images, r"(\d{6})", "Holidays' 100000.jpg"):
        groups[number // 100].append(key)
    queries = [Query(keys[0], keys[0], None, {"positive": frozenset(keys[1:])})
               for _, keys in sorted(groups.items())]
    return GroundTruth("holidays", queries, None, queries_in_database=True,
                       exclude_query_from_ranking=True, source="holidays file names")


def load_holidays_file(path: str | Path) -> GroundTruth:
    """Holidays' own result format (`perfect_result.dat`): one line per query,
    `query.jpg rank name rank name ...`; the named images are the positives."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    positives: dict[str, set[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        q = _name_key(words[0])
        names = [_name_key(w) for w in words[1:] if not re.fullmatch(r"-?\d+", w)]
        positives.setdefault(q, set()).update(n for n in names if n != q)
    if not positives:
        raise UserError(f"{path} holds no query lines (expected 'query.jpg 0 positive.jpg 1 ...')")
    queries = [Query(q, q, None, {"positive": frozenset(p)}) for q, p in positives.items()]
    return GroundTruth("holidays", queries, None, queries_in_database=True,
                       exclude_query_from_ranking=True, source=str(path))


def load_ukbench(images: Sequence[str]) -> GroundTruth:
    """UKBench from the store's file names `ukbenchNNNNN`: groups of 4 consecutive numbers;
    every image queries its group, itself included (the N-S score counts it)."""
    groups: dict[int, list[str]] = defaultdict(list)
    numbered = _numbered(images, r"ukbench(\d+)", "UKBench's ukbench00000.jpg")
    for number, key in numbered:
        groups[number // 4].append(key)
    queries = [Query(key, key, None, {"positive": frozenset(groups[number // 4])})
               for number, key in numbered]
    return GroundTruth("ukbench", queries, None, queries_in_database=True,
                       exclude_query_from_ranking=False, source="ukbench file names")


# ---------------------------------------------------------------------------------------------
# users' own layouts

_CSV_HEADERS = frozenset({"query", "queries", "query_image", "image", "name"})


def _names(field_value: str) -> list[str]:
    """The image keys of one CSV field: names separated by ';' only (a name may hold spaces)."""
    return [_name_key(v) for v in field_value.split(";") if v.strip()]


def load_csv(path: str | Path) -> GroundTruth:
    """Rows `query,relevant[,junk]` (RFC 4180: a field holding ',' or '"' is quoted, '""' is a
    quote; header optional); the relevant and junk fields may each list several names separated
    by ';' (names keep their inner spaces); rows of the same query accumulate. The query is
    never its own positive (it is left out of its ranking). Bytes that are not UTF-8 are kept
    as Python keeps them in file names (surrogateescape), so such names match the store's."""
    path = Path(path)
    relevant: dict[str, set[str]] = {}
    junk: dict[str, set[str]] = defaultdict(set)
    first = True
    reader = None
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
            reader = csv.reader(fh, strict=True)
            for row in reader:
                lineno = reader.line_num
                if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                    continue
                if first:
                    first = False
                    if row[0].strip().lower() in _CSV_HEADERS:
                        continue
                if len(row) < 2 or not row[0].strip():
                    raise UserError(f"{path} line {lineno}: expected query,relevant[,junk], "
                                    f"found {','.join(row)[:80]!r}")
                if len(row) > 3 and any(v.strip() for v in row[3:]):
                    raise UserError(f"{path} line {lineno}: {len(row)} fields, expected "
                                    f"query,relevant[,junk] (several names in one field are "
                                    f"separated by ';'; quote a name that holds ',')")
                q = _name_key(row[0])
                relevant.setdefault(q, set()).update(_names(row[1]))
                if len(row) > 2:
                    junk[q].update(_names(row[2]))
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    except csv.Error as exc:
        line = reader.line_num if reader is not None else 0
        raise UserError(f"{path} line {line}: not valid CSV ({exc}); quote a field that "
                        f"holds ',' or '\"' as \"...\" and double its quotes") from None
    if not relevant:
        raise UserError(f"{path} holds no query rows (expected query,relevant[,junk])")
    queries = [Query(q, q, None, {"positive": frozenset(relevant[q] - {q}),
                                  "junk": frozenset(junk[q] - {q})}) for q in relevant]
    return GroundTruth("csv", queries, None, queries_in_database=True,
                       exclude_query_from_ranking=True, source=str(path))


def _groups_to_gt(groups: dict[str, list[str]], source: str) -> GroundTruth:
    queries = []
    for _, keys in sorted(groups.items()):
        for key in sorted(keys):
            positives = frozenset(k for k in keys if k != key)
            queries.append(Query(key, key, None, {"positive": positives}))
    return GroundTruth("groups", queries, None, queries_in_database=True,
                       exclude_query_from_ranking=True, source=source)


def load_groups_folder(folder: str | Path) -> GroundTruth:
    """One sub-folder per group (images anywhere below it); every image queries the other
    images of its group. Image keys (file names without extension) must be unique."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: expected one sub-folder of images per group")
    groups: dict[str, list[str]] = {}
    owner: dict[str, Path] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        keys = []
        for f in sorted(sub.rglob("*")):
            if f.suffix.lower() not in _IMAGE_EXTENSIONS or not f.is_file() \
                    or any(part.startswith(".") for part in f.relative_to(sub).parts):
                continue
            key = image_key(f.name)
            if key in owner:
                raise UserError(f"{f} and {owner[key]} have the same image key {key!r}: images "
                                f"are matched by file name without extension, so names must be "
                                f"unique across groups")
            owner[key] = f
            keys.append(key)
        if keys:
            groups[sub.name] = keys
    if not groups:
        raise UserError(f"{folder} has no sub-folders of images (one folder per group expected)")
    return _groups_to_gt(groups, str(folder))


def groups_from_regex(images: Sequence[str], pattern: str) -> GroundTruth:
    """Group = the regex's first capture group (or the whole match) searched in each image key,
    e.g. `obj(\\d+)__` for COIL-20's `obj3__17`; keys it does not match are distractors."""
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise UserError(f"{pattern!r} is not a valid regular expression: {exc}",
                        "group_regex") from None
    groups: dict[str, set[str]] = defaultdict(set)
    for p in images:
        key = image_key(p)
        m = rx.search(key)
        if m:
            label = m.group(1) if m.re.groups and m.group(1) is not None else m.group(0)
            groups[label].add(key)
    if not groups:
        raise UserError(f"no image name matches {pattern!r}", "group_regex")
    return _groups_to_gt({g: sorted(k) for g, k in groups.items()}, f"regex {pattern}")


# ---------------------------------------------------------------------------------------------
# dispatch


def _not_groups_hint(folder: Path) -> str | None:
    """A folder that holds ground truth one level down is not a folder of groups: say so."""
    pickles = sorted(p.name for p in folder.glob("*.pkl"))
    gt_dirs = sorted(p.name for p in folder.iterdir() if p.is_dir() and any(p.glob("*_query.txt")))
    if pickles or gt_dirs:
        found = ", ".join([*gt_dirs, *pickles][:4])
        return (f"{folder} is not a ground-truth folder itself but holds ground truth ({found}): "
                f"give that path as the ground truth")
    return None


def load_ground_truth(path: str | Path | None, protocol: str = "auto",
                      images: Sequence[str] | None = None, group_regex: str | None = None
                      ) -> GroundTruth:
    """Read ground truth in any supported layout (auto-detected unless `protocol` says).

    auto: a folder with `*_query.txt` -> Oxford/Paris; `.pkl` -> pickle (oxford or roxford);
    `.csv`/`.txt` -> csv; `.dat` -> Holidays result file; a folder of sub-folders -> groups.
    holidays / ukbench without a path use `images` (the store's image paths); `group_regex`
    groups `images` by a regular expression."""
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    images = [str(p) for p in (images if images is not None else [])]
    if group_regex:
        if protocol not in ("auto", "groups"):
            raise UserError(f"{{group_regex}} makes groups ground truth; it cannot be "
                            f"combined with protocol {protocol}", mentions=("group_regex",))
        return groups_from_regex(images, group_regex)
    if protocol == "ukbench" and path is not None:
        raise UserError("the ukbench protocol reads its groups from the store's image names; "
                        "expected no ground-truth path")
    if protocol in ("holidays", "ukbench") and path is None:
        if not images:
            raise UserError(f"the {protocol} protocol reads its groups from the store's image "
                            f"names, but no image names were given")
        return load_holidays(images) if protocol == "holidays" else load_ukbench(images)
    if path is None:
        raise UserError("no ground truth given: expected {gt} PATH (or {group_regex}, or "
                        "{protocol} holidays|ukbench)", mentions=("gt", "group_regex", "protocol"))
    path = Path(path)
    if not path.exists():
        raise UserError(f"ground truth {path} does not exist")
    suffix = path.suffix.lower()
    if path.is_dir():
        has_queries = any(path.glob("*_query.txt"))
        if protocol == "groups" or (protocol == "auto" and not has_queries):
            if protocol == "auto":
                hint = _not_groups_hint(path)
                if hint:
                    raise UserError(hint)
            gt = load_groups_folder(path)
        elif protocol in ("auto", "oxford"):
            gt = load_oxford_folder(path)
        else:
            raise UserError(f"{path} is a folder; the {protocol} protocol expects a file")
    elif protocol == "csv":
        gt = load_csv(path)
    elif protocol == "holidays":
        gt = load_holidays_file(path)
    elif suffix in (".pkl", ".pickle"):
        gt = load_pickle(path)
    elif suffix in (".csv", ".txt"):
        gt = load_csv(path)
    elif suffix == ".dat":
        gt = load_holidays_file(path)
    else:
        raise UserError(f"cannot tell the layout of {path}: expected an Oxford/Paris gt folder, "
                        f"a .pkl, a .csv, or a folder of groups")
    if protocol not in ("auto", gt.protocol):
        raise UserError(f"{path} is {gt.protocol} ground truth, not {protocol}")
    return gt
