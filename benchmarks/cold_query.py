#!/usr/bin/env python
"""Cold `imgdb query NEW.jpg`: the wall time of a fresh process, and where it goes.

Builds (or reuses) a store of the repository's Oxford photos (tests/data, EfficientNet-Lite0,
`max:512`) with an Annoy index, writes a new query image (an edited crop of one photo, so it is
described by the network, not found by its digest), then times `python -m imgdb query` in fresh
processes, alternating with the parts it cannot avoid measured the same way: the interpreter
alone, `import torch`, `import onnxruntime` and `import imgdb.cli` (the CLI without torch).

Every process may keep bytecode (PYTHONDONTWRITEBYTECODE is dropped for them), as a user's
installed imgdb does. Two query lines: the default (the network exported to ONNX by the ingest, run by ONNX Runtime
with numpy poolings: no torch imported) and the torch path (what a query does where no exported
network can be kept: the cache is made unwritable for that line).

    python benchmarks/cold_query.py                 # 7 rounds
    python benchmarks/cold_query.py --rounds 15 --store /tmp/cq.h5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "tests" / "data" / "oxford5k" / "images"


def timed(args: list[str], env: dict | None = None) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    # as after `pip install`: bytecode compiled once and kept (without it every start compiles
    # imgdb's sources again: 0.11 s here)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    t = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--store", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="coldq-"))
    db = args.store or work / "oxford.h5"
    py = sys.executable
    os.environ["IMGDB_CACHE_DIR"] = str(work / "cache")  # this run's exported networks
    (work / "a file").write_text("")
    no_cache = {"IMGDB_CACHE_DIR": str(work / "a file" / "cache")}  # cannot be created
    if not db.exists():
        subprocess.run([py, "-m", "imgdb", "ingest", str(PHOTOS), "--db", str(db), "--backbone",
                        "efficientnet_lite0", "--size", "max:512", "--layers", "head",
                        "--pooling", "gem-p3", "--quiet"], check=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
        subprocess.run([py, "-m", "imgdb", "index", "build", "--db", str(db), "--descriptor",
                        "head/gem-p3", "--trees", "20"], check=True, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    from PIL import Image, ImageOps

    src = sorted(PHOTOS.glob("*.jpg"))[0]
    with Image.open(src) as im:
        w, h = im.size
        ImageOps.mirror(im.crop((w // 8, h // 8, w - w // 8, h - h // 8))).save(work / "new.jpg")
    query = [py, "-m", "imgdb", "query", str(work / "new.jpg"), "--db", str(db), "-k", "10"]
    runs = {
        "imgdb query NEW.jpg": (query, None),
        "imgdb query NEW.jpg, torch path": (query, no_cache),
        "python -c pass": ([py, "-c", "pass"], None),
        "import torch": ([py, "-c", "import torch"], None),
        "import onnxruntime": ([py, "-c", "import onnxruntime"], None),
        "import imgdb.cli": ([py, "-c", "import imgdb.cli.app"], None),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    load = [os.getloadavg()[0]]
    timed(query)  # exports the network if this cache lacks it; page cache warm
    for _ in range(args.rounds):
        for name, (cmd, env) in runs.items():  # interleaved: the load hits every line alike
            times[name].append(timed(cmd, env))
        load.append(os.getloadavg()[0])
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} on {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}; load average "
          f"{min(load):.2f}-{max(load):.2f}; {args.rounds} rounds, median (min-max) s")
    print("| command | median s | min s | max s |")
    print("| --- | ---: | ---: | ---: |")
    for name, ts in times.items():
        print(f"| `{name}` | {statistics.median(ts):.2f} | {min(ts):.2f} | {max(ts):.2f} |")
    q = statistics.median(times["imgdb query NEW.jpg"])
    slow = statistics.median(times["imgdb query NEW.jpg, torch path"])
    print(f"\ntorch path / default: {slow / q:.2f}x")


if __name__ == "__main__":
    main()
