"""Ground-truth readers for the benchmarks' own layouts, and for users' groups.

Images are identified by their *key*: the file name without its extension (the Oxford/Paris gt
files and the revisitop pickles already name images that way).
"""

from __future__ import annotations

import csv
import io
import pickle
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .errors import UserError

PROTOCOLS = ("auto", "oxford", "roxford", "holidays", "ukbench", "csv", "groups")


def image_key(path: str) -> str:
    """File name without directories and without the last extension."""
    name = str(path).replace("\\", "/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name


@dataclass(frozen=True)
class Query:
    """One query: its photo, optional box, and labelled image keys."""

    name: str
    image: str
    bbox: tuple[float, float, float, float] | None
    labels: dict[str, frozenset[str]] = field(default_factory=dict)


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
        """Setup name -> per query (positives, junk), in query order."""
        def get(q: Query, *names: str) -> frozenset[str]:
            out: frozenset[str] = frozenset()
            for n in names:
                out |= q.labels.get(n, frozenset())
            return out

        if self.protocol == "roxford":  # revisitop example_evaluate.py
            return {
                "easy": [(get(q, "easy"), get(q, "junk", "hard")) for q in self.queries],
                "medium": [(get(q, "easy", "hard"), get(q, "junk")) for q in self.queries],
                "hard": [(get(q, "hard"), get(q, "junk", "easy")) for q in self.queries],
            }
        return {"": [(get(q, "good", "ok", "positive"), get(q, "junk")) for q in self.queries]}


# ---------------------------------------------------------------------------------------------
# Oxford / Paris


def _read_list(path: Path) -> frozenset[str]:
    if not path.exists():
        return frozenset()
    return frozenset(line.strip() for line in path.read_text().splitlines() if line.strip())


def load_oxford_folder(folder: str | Path) -> GroundTruth:
    """The official Oxford5k / Paris6k gt folder: `<q>_query.txt`, `_good`, `_ok`, `_junk`."""
    folder = Path(folder)
    files = sorted(folder.glob("*_query.txt"))
    if not files:
        raise UserError(f"{folder} has no *_query.txt files: not an Oxford/Paris gt folder")
    queries = []
    for f in files:
        name = f.name[: -len("_query.txt")]
        parts = f.read_text().split()
        if len(parts) != 5:
            raise UserError(f"{f} should hold 'image x1 y1 x2 y2', found {' '.join(parts)!r}")
        image = parts[0][5:] if parts[0].startswith("oxc1_") else parts[0]
        bbox = tuple(float(v) for v in parts[1:])
        labels = {lab: _read_list(folder / f"{name}_{lab}.txt") for lab in ("good", "ok", "junk")}
        queries.append(Query(name, image, bbox, labels))  # type: ignore[arg-type]
    return GroundTruth("oxford", queries, None, True, False, str(folder))


# ---------------------------------------------------------------------------------------------
# revisitop / cnnimageretrieval pickles


class _SafeUnpickler(pickle.Unpickler):
    """Plain data only (and numpy arrays): any other global is refused, so no code can run."""

    ALLOWED = {
        ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "list"), ("builtins", "dict"),
        ("builtins", "tuple"), ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a ground-truth pickle")


def _indices(value) -> list[int]:
    return [int(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]


def load_pickle(path: str | Path) -> GroundTruth:
    """The pickle layout (`imlist`, `qimlist`, `gnd[i]` with `bbx` and `ok`/`junk` or
    `easy`/`hard`/`junk` as indices into `imlist`), read without executing code."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = _SafeUnpickler(io.BytesIO(fh.read())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise UserError(f"cannot read ground-truth pickle {path}: {exc}") from None
    if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= set(data):
        raise UserError(f"{path} is not a revisitop/cnnimageretrieval ground truth "
                        f"(expected a dict with imlist, qimlist, gnd)")
    imlist = [image_key(str(x)) for x in data["imlist"]]
    qimlist = [image_key(str(x)) for x in data["qimlist"]]
    revisited = any("easy" in g for g in data["gnd"])
    label_names = ("easy", "hard", "junk") if revisited else ("ok", "junk")
    queries, seen = [], defaultdict(int)
    for i, (qkey, g) in enumerate(zip(qimlist, data["gnd"])):
        bbx = g.get("bbx")
        bbox = tuple(float(v) for v in bbx) if bbx is not None and len(bbx) == 4 else None
        labels = {lab: frozenset(imlist[j] for j in _indices(g.get(lab, []))) for lab in label_names}
        seen[qkey] += 1
        name = qkey if seen[qkey] == 1 else f"{qkey}#{seen[qkey]}"
        queries.append(Query(name, qkey, bbox, labels))  # type: ignore[arg-type]
    return GroundTruth("roxford" if revisited else "oxford", queries, imlist,
                       queries_in_database=not revisited, exclude_query_from_ranking=False,
                       source=str(path))


# ---------------------------------------------------------------------------------------------
# Holidays, UKBench


def _numbered(images: Sequence[str], pattern: str, what: str) -> list[tuple[int, str]]:
    out = []
    for p in images:
        key = image_key(p)
        m = re.fullmatch(pattern, key)
        if m:
            out.append((int(m.group(1)), key))
    if not out:
        raise UserError(f"no image of the store is named like {what}")
    return sorted(out)


def load_holidays(images: Sequence[str]) -> GroundTruth:
    """INRIA Holidays: `NNNNNN.jpg`, group = NNNNNN // 100, its first image is the query."""
    groups: dict[int, list[str]] = defaultdict(list)
    for number, key in _numbered(images, r"(\d{6})", "Holidays' 100000.jpg"):
        groups[number // 100].append(key)
    queries = [Query(keys[0], keys[0], None, {"positive": frozenset(keys[1:])})
               for _, keys in sorted(groups.items())]
    return GroundTruth("holidays", queries, None, True, True, "holidays file names")


def load_ukbench(images: Sequence[str]) -> GroundTruth:
    """UKBench: `ukbenchNNNNN`, groups of 4; every image queries its group (itself included)."""
    groups: dict[int, list[str]] = defaultdict(list)
    numbered = _numbered(images, r"ukbench(\d+)", "UKBench's ukbench00000.jpg")
    for number, key in numbered:
        groups[number // 4].append(key)
    queries = [Query(key, key, None, {"positive": frozenset(groups[number // 4])})
               for number, key in numbered]
    return GroundTruth("ukbench", queries, None, True, False, "ukbench file names")


# ---------------------------------------------------------------------------------------------
# users' own layouts


def _names(field_value: str) -> list[str]:
    return [image_key(v) for v in re.split(r"[;\s]+", field_value.strip()) if v]


def load_csv(path: str | Path) -> GroundTruth:
    """Rows `query,relevant[,junk]`; each field may list several names separated by ';'."""
    path = Path(path)
    relevant: dict[str, set[str]] = defaultdict(set)
    junk: dict[str, set[str]] = defaultdict(set)
    order: list[str] = []
    with open(path, newline="", encoding="utf-8") as fh:
        for i, row in enumerate(csv.reader(fh)):
            if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
                continue
            if i == 0 and row[0].strip().lower() == "query":
                continue
            if len(row) < 2:
                raise UserError(f"{path} line {i + 1}: expected query,relevant[,junk]")
            q = image_key(row[0].strip())
            if q not in relevant:
                order.append(q)
            relevant[q].update(_names(row[1]))
            if len(row) > 2:
                junk[q].update(_names(row[2]))
    if not order:
        raise UserError(f"{path} holds no query rows (expected query,relevant[,junk])")
    queries = [Query(q, q, None, {"positive": frozenset(relevant[q]), "junk": frozenset(junk[q])})
               for q in order]
    return GroundTruth("csv", queries, None, True, True, str(path))


def _groups_to_gt(groups: dict[str, list[str]], source: str) -> GroundTruth:
    queries = []
    for _, keys in sorted(groups.items()):
        for key in sorted(keys):
            queries.append(Query(key, key, None, {"positive": frozenset(k for k in keys if k != key)}))
    return GroundTruth("groups", queries, None, True, True, source)


def load_groups_folder(folder: str | Path) -> GroundTruth:
    """One sub-folder per group; every image queries the other images of its group."""
    from .images import IMAGE_EXTENSIONS

    folder = Path(folder)
    groups: dict[str, list[str]] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        keys = [image_key(f.name) for f in sorted(sub.iterdir())
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        if keys:
            groups[sub.name] = keys
    if not groups:
        raise UserError(f"{folder} has no sub-folders of images (one folder per group expected)")
    return _groups_to_gt(groups, str(folder))


def groups_from_regex(images: Sequence[str], pattern: str) -> GroundTruth:
    """Group = the regex's first capture group (or whole match) in each image key."""
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise UserError(f"--group-regex {pattern!r} is not a valid regular expression: {exc}") from None
    groups: dict[str, list[str]] = defaultdict(list)
    for p in images:
        key = image_key(p)
        m = rx.search(key)
        if m:
            groups[m.group(1) if m.groups() else m.group(0)].append(key)
    if not groups:
        raise UserError(f"no image name matches --group-regex {pattern!r}")
    return _groups_to_gt(groups, f"regex {pattern}")


def load_ground_truth(path: str | Path | None, protocol: str = "auto",
                      images: Sequence[str] | None = None, group_regex: str | None = None
                      ) -> GroundTruth:
    """Read ground truth in any supported layout (auto-detected unless `protocol` says)."""
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    images = list(images or [])
    if group_regex:
        return groups_from_regex(images, group_regex)
    if protocol == "holidays":
        return load_holidays(images)
    if protocol == "ukbench":
        return load_ukbench(images)
    if path is None:
        raise UserError("give the ground truth with --gt PATH")
    path = Path(path)
    if not path.exists():
        raise UserError(f"ground truth {path} does not exist")
    if path.is_dir():
        if list(path.glob("*_query.txt")):
            gt = load_oxford_folder(path)
        else:
            gt = load_groups_folder(path)
    elif path.suffix.lower() in (".pkl", ".pickle"):
        gt = load_pickle(path)
    elif path.suffix.lower() in (".csv", ".txt"):
        gt = load_csv(path)
    else:
        raise UserError(f"cannot tell the layout of {path}: expected an Oxford/Paris gt folder, "
                        f"a .pkl, a .csv, or a folder of groups")
    if protocol not in ("auto", gt.protocol):
        raise UserError(f"{path} is {gt.protocol} ground truth, not {protocol}")
    return gt
