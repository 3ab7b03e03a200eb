#!/usr/bin/env python
"""Local-feature verification: quality beside plain L2, its cost per query, and its ingest cost.

1. Quality, in one `imgdb eval` per set, every row beside its L2 row (the phone photos also
   with `--regions`: crops of each photo searched too):
   - synthetic phone photos of printed covers in clutter (`imgdb.evaluation.scenes`, seed 0:
     40 covers photographed 3 times, 40 distractor covers), EfficientNet-Lite0 `max:1024`;
   - the 55 Oxford landmark crops of tests/data (11 landmarks x 5; every crop queries the
     other four), `max:512`.
2. Cost of the stage on one core (BLAS and OpenCV on one thread): a query's keypoints (a 1024 px
   photo), then matching + geometry for its top-50, medians over the phone photos.
3. Ingest throughput with the default keypoints against `--verify-features none` (same images,
   same settings, alternated; fresh stores).

    python benchmarks/verify.py                  # writes benchmarks/RESULTS-verify.md
    python benchmarks/verify.py --work /tmp/vb   # keep the sets and stores there
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CROPS = ROOT / "tests" / "data" / "oxford5k" / "query_crops"
NET = ["--backbone", "efficientnet_lite0", "--quiet"]


def imgdb(*args: str, env: dict | None = None) -> str:
    out = subprocess.run([sys.executable, "-m", "imgdb", *args], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})), check=False)
    if out.returncode:
        raise SystemExit(f"imgdb {' '.join(args)} failed:\n{out.stderr}")
    return out.stdout


def table(db: Path, extra: list[str], descriptors: list[str], reranks: list[str]) -> list[dict]:
    args = ["eval", "--db", str(db), *extra, "--json"]
    for d in descriptors:
        args += ["-d", d]
    for r in reranks:
        args += ["--rerank", r]
    return json.loads(imgdb(*args))["results"]


def per_query_cost(db: Path, queries: list[Path], k: int = 50) -> dict:
    """Median seconds: a query photo's keypoints; matching + geometry of its top k."""
    import cv2
    import numpy as np
    from PIL import Image

    cv2.setNumThreads(1)
    from imgdb.features.verifyfeat import VerifySettings, sift_features
    from imgdb.retrieval.service import QueryService
    from imgdb.retrieval.verify import Keypoints, verify_shortlist
    from imgdb.store import open_read

    service = QueryService(db, "cpu")
    with open_read(db) as view:
        ext = view.extractors()[0]
        settings = VerifySettings.from_settings(view.settings(ext)).for_query()
        n = view.rows
    shortlist = service.stored_keypoints(ext, range(min(k, n)))
    detect, verify = [], []
    for q in queries:
        px = np.asarray(Image.open(q).convert("RGB"))
        t = time.perf_counter()
        ls = sift_features(px, settings)
        detect.append(time.perf_counter() - t)
        kq = Keypoints.from_stored(ls.features, ls.coords, ls.grid)
        t = time.perf_counter()
        verify_shortlist(kq, shortlist)
        verify.append(time.perf_counter() - t)
    return {"detect": statistics.median(detect), "verify": statistics.median(verify),
            "pairs": len(shortlist), "query_side": settings.side,
            "query_features": settings.features}


def ingest_rate(folder: Path, work: Path, rounds: int) -> dict:
    rates: dict[str, list[float]] = {"sift": [], "none": []}
    for r in range(rounds):
        for kind in ("sift", "none"):
            db = work / f"rate-{kind}-{r}.h5"
            db.unlink(missing_ok=True)
            out = json.loads(imgdb("ingest", str(folder), "--db", str(db), *NET, "--size",
                                   "max:1024", "--verify-features", kind, "--json"))
            rates[kind].append(out["ok"] / out["seconds"])
            db.unlink()
    return {k: statistics.median(v) for k, v in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS-verify.md")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    work = a.work or Path(tempfile.mkdtemp(prefix="imgdb-verify-"))
    work.mkdir(parents=True, exist_ok=True)
    from imgdb.evaluation.scenes import make_phone_set

    phone = work / "phone"
    if not (phone / "gt.csv").exists():
        make_phone_set(phone, objects=40, distractors=40, photos=3, seed=0)
    pdb = work / "phone.h5"
    if not pdb.exists():
        imgdb("ingest", str(phone / "database"), "--db", str(pdb), *NET, "--size", "max:1024")
    ldb = work / "landmarks.h5"
    if not ldb.exists():
        imgdb("ingest", str(CROPS), "--db", str(ldb), *NET, "--size", "max:512")
    descriptors = ["head/spoc", "head/gem-p3", "block6/crow-ssw"]
    reranks = ["verify", "verify:qe=3", "verify:k=20"]
    phone_rows = table(pdb, ["--gt", str(phone / "gt.csv"), "--queries", str(phone / "queries"),
                             "--regions"], descriptors, reranks)
    land_rows = table(ldb, ["--group-regex", r"^([a-z_]+)_\d"], ["head/crow-ssw", "head/gem-p3"],
                      ["verify", "verify:qe=3", "diffusion", "verify:qe=3,diffusion"])
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # one core: BLAS (and OpenCV, set inside)
        cost = per_query_cost(pdb, sorted((phone / "queries").iterdir())[::4])
    rate = ingest_rate(phone / "database", work, a.rounds)

    def rows_md(rows: list[dict]) -> list[str]:
        out = ["| descriptor | ranking | mAP | mP@1 |", "|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r['descriptor'].split('/', 1)[1]} | {r['ranking']} | "
                       f"{r['mAP']:.3f} | {r['mP']['1']:.3f} |")
        return out

    lines = [
        f"## {time.strftime('%Y-%m-%d')}, {platform.node()} ({os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}), `python benchmarks/verify.py`",
        "",
        "Synthetic phone photos (40 covers x 3 photos, 40 distractor covers; seed 0), "
        "EfficientNet-Lite0 `max:1024` (mP@1: the right cover first):", "",
        *rows_md(phone_rows), "",
        "The 55 Oxford landmark crops (tests/data, 256 px; groups of 5), `max:512`:", "",
        *rows_md(land_rows), "",
        f"One core: a {cost['query_side']} px query photo's keypoints "
        f"({cost['query_features']}) {1000 * cost['detect']:.0f} ms; matching + geometry of its "
        f"top-{cost['pairs']} {1000 * cost['verify']:.0f} ms (medians).", "",
        f"Ingest of the 80 covers (`max:1024`, all cores): {rate['sift']:.2f} images/s with "
        f"the default keypoints, {rate['none']:.2f} with `--verify-features none` "
        f"(ratio {rate['sift'] / rate['none']:.2f}; medians of {a.rounds} alternated runs).", "",
    ]
    old = a.out.read_text(encoding="utf-8") if a.out.exists() else (
        "# Local-feature verification\n\nWhat `benchmarks/verify.py` measured, newest first.\n\n")
    head, _, tail = old.partition("\n## ")
    a.out.write_text(head.rstrip() + "\n\n" + "\n".join(lines) + ("\n## " + tail if tail else ""),
                     encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
