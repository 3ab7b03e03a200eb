#!/usr/bin/env python
"""kill -9 at random moments of the commands that write a store, then what a user would do.

For each trial: a fresh copy of a prepared store (COIL-20 photos of tests/data, EfficientNet-
Lite0 at `max:128`, a PCA model, an index, a sharded index), one command started in its own
process and killed with SIGKILL after a random delay within the time that command takes
uninterrupted (measured first; the delay falls in its last three quarters, past the imports),
then:

1. `imgdb check` must say ok (a fresh ingest killed before its first commit may leave no store,
   which is fine; anything else is a damaged store);
2. `imgdb index ls` must list no DAMAGED index, and a query through each current index must
   answer;
3. the same command run again must succeed (or say there is nothing to do), and `check` must
   still say ok.

    python benchmarks/kill_campaign.py                 # 100 trials, ~25 per command
    python benchmarks/kill_campaign.py --trials 20 --out /tmp/kill.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "tests" / "data" / "coil20" / "images"
NET = ["--backbone", "efficientnet_lite0", "--size", "max:128", "--layers", "block6,head",
       "--pooling", "gem-p3,mac", "--keep-local", "block6", "--quiet"]
DESC = "head/gem-p3"


def imgdb(*args: str, check: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "imgdb", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout, check=check)


def copy_store(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.parent.iterdir():
        if f.name.startswith(src.name) and f.is_file():
            shutil.copy2(f, dst / f.name)
    return dst / src.name


def commands(db: Path, work: Path) -> dict[str, list[str]]:
    half = work / "half"
    return {
        "index build (rebuild)": ["index", "build", "--db", db, "--descriptor", DESC, "--pca",
                                  "v1", "--name", "main", "--trees", "200", "--seed", "3"],
        "index build --shards 2": ["index", "build", "--db", db, "--descriptor", DESC,
                                   "--name", "sharded", "--trees", "200", "--shards", "2"],
        "repair": ["repair", "--db", db],
        "merge": ["merge", db, half, "--db", work / "merged.h5"],
        "ingest (fresh)": ["ingest", PHOTOS, "--db", work / "fresh.h5", *NET,
                           "--commit-seconds", "0", "--batch-size", "8"],
    }


def target_of(name: str, db: Path, work: Path) -> Path:
    return {"merge": work / "merged.h5", "ingest (fresh)": work / "fresh.h5"}.get(name, db)


def verdict(store: Path) -> str | None:
    """None when the store is whole and its indexes usable, else what is wrong."""
    if not store.exists():
        return None
    res = imgdb("check", "--db", store)
    if res.returncode != 0:
        return "check: " + (res.stdout + res.stderr).strip().splitlines()[-1][:160]
    ls = imgdb("index", "ls", "--db", store, "--json")
    if ls.returncode != 0:
        return "index ls: " + ls.stderr.strip()[:160]
    for entry in json.loads(ls.stdout or "[]"):
        if entry.get("damaged"):
            return f"index {entry['name']}: DAMAGED: {str(entry['damaged'])[:120]}"
        if entry.get("current"):
            q = imgdb("query", "--db", store, "--id", "0", "--index", entry["name"], "-k", "3")
            if q.returncode != 0:
                return f"query --index {entry['name']}: {q.stderr.strip()[:120]}"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    top = Path(tempfile.mkdtemp(prefix="killcampaign-"))
    base = top / "base" / "s.h5"
    base.parent.mkdir(parents=True)
    os.environ.setdefault("IMGDB_CACHE_DIR", str(top / "cache"))
    imgdb("ingest", PHOTOS, "--db", base, *NET, check=True)
    imgdb("fit", "pca", "--db", base, "--descriptor", DESC, "--dims", "32", check=True)
    imgdb("index", "build", "--db", base, "--descriptor", DESC, "--pca", "v1", "--name", "main",
          "--trees", "30", check=True)
    imgdb("index", "build", "--db", base, "--descriptor", DESC, "--name", "sharded", "--trees",
          "30", "--shards", "2", check=True)
    half_photos = top / "half-photos"
    half_photos.mkdir()
    for p in sorted(PHOTOS.iterdir())[::2]:
        shutil.copy2(p, half_photos / p.name)
    imgdb("ingest", half_photos, "--db", top / "base" / "half", *NET, check=True)
    # how long each command takes when left alone: kills fall anywhere within it
    spans = {}
    for name in commands(base, top):
        work = top / f"time-{len(spans)}"
        db = copy_store(base, work)
        shutil.copy2(top / "base" / "half", work / "half")
        t = time.perf_counter()
        res = imgdb(*commands(db, work)[name])
        spans[name] = time.perf_counter() - t
        assert res.returncode == 0, (name, res.stderr)
    names = list(spans)
    results = {n: {"trials": 0, "damaged": 0, "rerun_failed": 0, "killed_mid": 0} for n in names}
    problems = []
    for trial in range(args.trials):
        name = names[trial % len(names)]
        work = top / f"t{trial}"
        db = copy_store(base, work)
        shutil.copy2(top / "base" / "half", work / "half")
        cmd = commands(db, work)[name]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen([sys.executable, "-m", "imgdb", *map(str, cmd)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        # the first quarter is the interpreter and imports: most kills fall in the work itself
        time.sleep(rng.uniform(0.25, 1.0) * spans[name])
        alive = proc.poll() is None
        if alive:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        r = results[name]
        r["trials"] += 1
        r["killed_mid"] += int(alive)
        store = target_of(name, db, work)
        wrong = verdict(store) or (verdict(db) if store != db else None)
        if wrong:
            r["damaged"] += 1
            problems.append(f"{name}, trial {trial}: after the kill: {wrong}")
        again = imgdb(*cmd)
        if again.returncode not in (0,) and "nothing to" not in again.stderr:
            r["rerun_failed"] += 1
            problems.append(f"{name}, trial {trial}: rerun: {again.stderr.strip()[:160]}")
        wrong = verdict(store)
        if wrong:
            r["damaged"] += 1
            problems.append(f"{name}, trial {trial}: after the rerun: {wrong}")
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"# kill -9 campaign, {time.strftime('%Y-%m-%d %H:%M')} on "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
             f"{platform.python_version()}; {args.trials} trials, seed {args.seed}", "",
             "| command | uninterrupted s | trials | killed mid-run | damaged | rerun failed |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for n in names:
        r = results[n]
        lines.append(f"| `{n}` | {spans[n]:.1f} | {r['trials']} | {r['killed_mid']} | "
                     f"{r['damaged']} | {r['rerun_failed']} |")
    lines += ["", *(f"- {p}" for p in problems)] if problems else ["", "No problem found."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
