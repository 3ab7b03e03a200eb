#!/usr/bin/env python
"""Re-ranking that never hurts: every stage at its defaults (guarded) and with `guard=0` (the
published method exactly), beside plain L2, on five kinds of collection, one `imgdb eval` each.

- copy detection (`imgdb.evaluation.copies`: 22 originals among the 55 landmark crops, ten edited
  copies of each as queries, one relevant image per query);
- the 55 Oxford landmark crops of tests/data (11 landmarks x 5, every crop queries the others);
- synthetic phone photos of printed covers (`imgdb.evaluation.scenes`, seed 0);
- the 243 COIL-20 views of tests/data (20 objects x 12 views, 30 degrees apart);
- full COIL-20 (1,440 views, 72 per object) when a folder of it is given (`--coil DIR`).

EfficientNet-Lite0 `max:512`, `head/gem-p3` and `block6/mac2x2`, no PCA.

    python benchmarks/rerank_guard.py [--coil COIL20/images]   # appends to RESULTS-rerank.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
NET = ["--backbone", "efficientnet_lite0", "--size", "max:512", "--layers", "head,block6",
       "--pooling", "gem-p3,mac2x2", "--quiet"]  # keypoints kept: the verify row
DESCRIPTORS = ["head/gem-p3", "block6/mac2x2"]
STAGES = [("diffusion", ["--rerank", "diffusion"], ["--rerank", "diffusion:guard=0"]),
          ("k-reciprocal", ["--rerank", "kreciprocal"], ["--rerank", "kreciprocal:guard=0"]),
          ("alpha-QE", ["--qe", "alpha:3"], ["--qe", "alpha:3,10,guard=0"]),
          ("verify", ["--rerank", "verify"], [])]


def imgdb(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "imgdb", *args], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)
    if out.returncode:
        raise SystemExit(f"imgdb {' '.join(args)} failed:\n{out.stderr}")
    return out.stdout


def measure(db: Path, gt: list[str]) -> dict:
    """(descriptor, stage) -> (L2, guarded, unguarded) mAP, and what the guard reported."""
    out = {}
    for name, on, off in STAGES:
        args = ["eval", "--db", str(db), *gt, "--json", *on, *off]
        for d in DESCRIPTORS:
            args += ["-d", d]
        rows = json.loads(imgdb(*args))["results"]
        for d in DESCRIPTORS:
            mine = [r for r in rows if r["descriptor"].endswith("/" + d)]
            l2 = next(r["mAP"] for r in mine if r["ranking"] == "L2")
            guarded = next(r for r in mine if r["ranking"] != "L2" and "guard=0" not in
                           r["ranking"])
            plain = next((r["mAP"] for r in mine if "guard=0" in r["ranking"]), None)
            out[(d, name)] = (l2, guarded["mAP"], plain, "steps aside" in
                              guarded["ranking"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--coil", type=Path, help="a folder of all 1,440 COIL-20 views")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS-rerank.md")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from imgdb.evaluation.copies import make_copy_set
    from imgdb.evaluation.scenes import make_phone_set

    work = a.work or Path(tempfile.mkdtemp(prefix="imgdb-guard-"))
    work.mkdir(parents=True, exist_ok=True)
    sets = []
    copies = make_copy_set(work / "copies", DATA / "oxford5k" / "query_crops")
    sets.append((f"copy detection ({copies.originals} originals + 55 photos; "
                 f"{copies.copies} copies)", copies.database,
                 ["--gt", str(copies.gt), "--queries", str(copies.queries)]))
    sets.append(("landmark crops (11 x 5)", DATA / "oxford5k" / "query_crops",
                 ["--group-regex", r"(.*)_\d+_query"]))
    phone = make_phone_set(work / "phone")
    sets.append(("phone photos (40 covers x 3 + 40 distractors)", phone.database,
                 ["--gt", str(phone.gt), "--queries", str(phone.queries)]))
    sets.append(("COIL-20, 12 views per object (tests/data)", DATA / "coil20" / "images",
                 ["--group-regex", r"(obj\d+)__"]))
    if a.coil:
        sets.append(("COIL-20, 72 views per object", a.coil, ["--group-regex", r"(obj\d+)__"]))
    results = []
    t0 = time.time()
    for i, (title, folder, gt) in enumerate(sets):
        db = work / f"set{i}.h5"
        if not db.exists():
            imgdb("ingest", str(folder), "--db", str(db), *NET)
        results.append((title, measure(db, gt)))
        print(f"{title}: done ({time.time() - t0:.0f} s)", file=sys.stderr)
    lines = ["", f"## {time.strftime('%Y-%m-%d')}, {platform.node()} ({os.cpu_count()} cores, "
             f"{platform.machine()}), `python benchmarks/rerank_guard.py`", "",
             "Each stage at its defaults (guarded: `retrieval/guard.py`) and with `guard=0` "
             "(the published method), beside L2; EfficientNet-Lite0 `max:512`, no PCA. "
             "*aside*: the guard found no neighbourhoods and the stage stepped aside; verify "
             "has no guard (nothing verified: the ranking unchanged).", "",
             "| collection | descriptor | stage | L2 | guarded | guard=0 |",
             "|---|---|---|---:|---:|---:|"]
    for title, res in results:
        for (d, stage), (l2, on, off, aside) in res.items():
            lines.append(f"| {title} | {d} | {stage} | {l2:.3f} | {on:.3f}"
                         f"{' (aside)' if aside else ''} | "
                         f"{'-' if off is None else f'{off:.3f}'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(a.out, "a") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
