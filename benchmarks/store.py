"""Commit cost of the store (format 2: journaled, checksummed, locked) against format 1.

Format 1 (imgdb 0.1, up to commit 5943776) committed by opening the file with h5py, appending,
and closing it: libver='earliest', no checksums, variable-length UTF-8 paths, a lock file
beside the store. `Format1Writer` below is a faithful minimal copy of its writer (the same
datasets, chunking, write order and open-append-close per commit); `StoreWriter` is the real
writer of this repository.

Both stores get the same batches, in the same process, commit by commit, the order rotating
between the variants (format 1; format 2 as shipped; format 2 with IMGDB_SYNC=off, i.e. without
the fsync that makes a commit survive a power cut), so machine load hits every variant alike.

    python benchmarks/store.py                    # commit cost table (a few minutes)
    python benchmarks/store.py --quick            # fewer commits
    python benchmarks/store.py --e2e PHOTOS_DIR   # + ingest end to end (commit share)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imgdb.store import ImageRow, RowUpdate, StoreWriter  # noqa: E402

# ---------------------------------------------------------------------------------------------
# format 1 (imgdb 0.1), minimal and faithful

_STR = h5py.string_dtype("utf-8")
F1_COLUMNS = {
    "size": (np.int64, 0), "mtime": (np.float64, 0.0), "sha": ("S32", b""),
    "width": (np.int32, 0), "height": (np.int32, 0), "status": (np.int8, 0),
    "error": (_STR, ""), "path": (_STR, ""),
}


class Format1Writer:
    """imgdb 0.1's StoreWriter: flock'ed FILE.lock, open-append-close per commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(self.lock_fd, 0)
        os.write(self.lock_fd, f"{os.getpid()}\n".encode())
        os.fsync(self.lock_fd)
        if not path.exists():
            tmp = path.with_name(path.name + ".creating")
            with h5py.File(tmp, "w", libver="earliest") as fh:
                fh.attrs["format"] = "imgdb-store"
                fh.attrs["format_version"] = 1
                g = fh.create_group("images")
                for name, (dtype, fill) in F1_COLUMNS.items():
                    g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype,
                                     chunks=(4096,), fillvalue=fill if dtype is not _STR else None)
                for top in ("descriptors", "local", "models", "indexes"):
                    fh.create_group(top)
            os.replace(tmp, path)

    def close(self) -> None:
        os.ftruncate(self.lock_fd, 0)
        fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
        os.close(self.lock_fd)

    def ensure_extractor(self, ext: str, dims: dict, local: dict) -> None:
        with h5py.File(self.path, "a", locking=False) as fh:
            n = fh["images/path"].shape[0]
            g = fh["descriptors"].create_group(ext)
            g.attrs["settings"] = "{}"
            g.create_dataset("computed", shape=(n,), maxshape=(None,), dtype=np.uint8,
                             chunks=(4096,), fillvalue=0)
            for (layer, pooling), dim in dims.items():
                rows = max(1, min(1024, (1 << 16) // (4 * dim)))
                g.require_group(layer).create_dataset(pooling, shape=(n, dim),
                                                      maxshape=(None, dim), dtype="float32",
                                                      chunks=(rows, dim), fillvalue=np.nan)
            for key, channels in local.items():
                kg = fh.require_group("local").require_group(ext).create_group(key)
                rows = max(256, (1 << 17) // (2 * channels))
                kg.create_dataset("features", shape=(0, channels), maxshape=(None, channels),
                                  dtype=np.float16, chunks=(rows, channels))
                kg.create_dataset("coords", shape=(0, 2), maxshape=(None, 2), dtype=np.int16,
                                  chunks=(4096, 2))
                kg.create_dataset("start", shape=(n,), maxshape=(None,), dtype=np.int64,
                                  chunks=(4096,), fillvalue=-1)
                kg.create_dataset("count", shape=(n,), maxshape=(None,), dtype=np.int32,
                                  chunks=(4096,), fillvalue=0)
                kg.create_dataset("grid", shape=(n, 2), maxshape=(None, 2), dtype=np.int32,
                                  chunks=(4096, 2), fillvalue=0)

    def commit(self, ext: str, rows: list[ImageRow], vectors: dict, local: dict) -> None:
        with h5py.File(self.path, "a", locking=False) as fh:
            n = fh["images/path"].shape[0]
            new_n = n + len(rows)
            g = fh["descriptors"][ext]
            aligned = [fh["images"][c] for c in F1_COLUMNS] + [g["computed"]]
            for layer in g.keys():
                if isinstance(g[layer], h5py.Group):
                    aligned += [g[layer][p] for p in g[layer].keys()]
            lgs = [fh["local"][ext][k] for k in local]
            for kg in lgs:
                aligned += [kg["start"], kg["count"], kg["grid"]]
            for ds in aligned:
                if ds.shape[0] < new_n and ds.name.split("/")[-1] != "path":
                    ds.resize(new_n, axis=0)
            for key, sets in local.items():  # local features first, as format 1 did
                kg = fh["local"][ext][key]
                end = kg["features"].shape[0]
                counts = np.array([len(f) for f, _ in sets], np.int32)
                starts = end + np.concatenate([[0], np.cumsum(counts)[:-1]])
                total = int(counts.sum())
                for name, data in (("features", np.concatenate([f for f, _ in sets])),
                                   ("coords", np.concatenate([c for _, c in sets]))):
                    kg[name].resize(end + total, axis=0)
                    kg[name][end:end + total] = data
                kg["start"][n:new_n] = starts
                kg["count"][n:new_n] = counts
                kg["grid"][n:new_n] = np.full((len(rows), 2), 16, np.int32)
            for (layer, pooling), vec in vectors.items():
                g[layer][pooling][n:new_n] = vec
            g["computed"][n:new_n] = np.ones(len(rows), np.uint8)
            g.attrs["revision"] = int(g.attrs.get("revision", 0)) + 1
            cols = {
                "size": np.array([r.size for r in rows], np.int64),
                "mtime": np.array([r.mtime for r in rows], np.float64),
                "sha": np.array([r.sha.encode() for r in rows], "S32"),
                "width": np.array([r.width for r in rows], np.int32),
                "height": np.array([r.height for r in rows], np.int32),
                "status": np.array([r.status for r in rows], np.int8),
                "error": np.array([r.error for r in rows], dtype=object),
                "path": np.array([r.path for r in rows], dtype=object),
            }
            for name in F1_COLUMNS:  # `path` last: its length was format 1's commit mark
                ds = fh["images"][name]
                if ds.shape[0] < new_n:
                    ds.resize(new_n, axis=0)
                ds[n:new_n] = cols[name]
            fh.attrs["modified"] = "2026-01-01T00:00:00+00:00"


# ---------------------------------------------------------------------------------------------
# the workload


POOLINGS = ["sum", "spoc", "mac", "mac2x2", "crow", "crow-sw", "crow-ssw", "gem-p3", "rmac-l3"]


def dims_for(poolings: int, dim: int) -> dict[tuple[str, str], int]:
    """`poolings` datasets of `dim` dims (6, 9 or 18: 1 or 2 layers of the default poolings)."""
    out = {}
    for i in range(poolings):
        layer = "head" if i < len(POOLINGS) else "block6"
        out[(layer, POOLINGS[i % len(POOLINGS)])] = dim
    return out


class Batch:
    def __init__(self, rng, start: int, size: int, dims: dict, local_channels: int) -> None:
        self.rows = [ImageRow(f"/photos/2026/trip/IMG_{start + i:06d}.jpg", 2_000_000 + i,
                              1.7e9 + i, f"{start + i:032x}", 1024, 768, 0)
                     for i in range(size)]
        self.vectors = {k: rng.standard_normal((size, d)).astype(np.float32)
                        for k, d in dims.items()}
        self.local = {}
        if local_channels:
            cells = 256  # a 16 x 16 grid, every cell kept
            sets = [(rng.standard_normal((cells, local_channels)).astype(np.float16),
                     np.stack(np.meshgrid(np.arange(16), np.arange(16)), -1).reshape(-1, 2)
                     .astype(np.int16)) for _ in range(size)]
            self.local = {"block5": sets}


class _LocalSet:  # what StoreWriter.commit expects per row (features, coords, grid)
    def __init__(self, features, coords) -> None:
        self.features, self.coords, self.grid = features, coords, (16, 16)


@contextlib.contextmanager
def sync_mode(value: str):
    old = os.environ.get("IMGDB_SYNC")
    os.environ["IMGDB_SYNC"] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ["IMGDB_SYNC"]
        else:
            os.environ["IMGDB_SYNC"] = old


class NewVariant:
    def __init__(self, path: Path, sync: str, dims: dict, local_channels: int) -> None:
        self.sync = sync
        with sync_mode(sync):
            self.w = StoreWriter(path)
            self.w.ensure_extractor("ext", {"layers": sorted({k[0] for k in dims}),
                                            "poolings": sorted({k[1] for k in dims})}, dims,
                                    local={"block5": local_channels} if local_channels else None)

    def commit(self, batch: Batch) -> None:
        with sync_mode(self.sync):
            local = {k: [_LocalSet(f, c) for f, c in v] for k, v in batch.local.items()}
            self.w.commit("ext", [RowUpdate(None, r) for r in batch.rows], batch.vectors,
                          local=local or None)

    def close(self) -> None:
        with sync_mode(self.sync):
            self.w.close()


class OldVariant:
    def __init__(self, path: Path, dims: dict, local_channels: int) -> None:
        self.w = Format1Writer(path)
        self.w.ensure_extractor("ext", dims, {"block5": local_channels} if local_channels else {})

    def commit(self, batch: Batch) -> None:
        self.w.commit("ext", batch.rows, batch.vectors, batch.local)

    def close(self) -> None:
        self.w.close()


def run_workload(folder: Path, size: int, poolings: int, dim: int, local_channels: int,
                 commits: int, warmup: int, gap_ms: float) -> dict:
    dims = dims_for(poolings, dim)
    rng = np.random.default_rng(0)
    names = ["format 1", "format 2", "format 2, IMGDB_SYNC=off"]
    variants = [OldVariant(folder / "f1.h5", dims, local_channels),
                NewVariant(folder / "f2.h5", "full", dims, local_channels),
                NewVariant(folder / "f2nosync.h5", "off", dims, local_channels)]
    times: list[list[float]] = [[] for _ in variants]
    start = 0
    for i in range(warmup + commits):
        batch = Batch(rng, start, size, dims, local_channels)
        start += size
        order = list(range(len(variants)))
        k = i % len(order)
        order = order[k:] + order[:k]
        for j in order:
            t = time.perf_counter()
            variants[j].commit(batch)
            dt = time.perf_counter() - t
            if i >= warmup:
                times[j].append(dt)
            if gap_ms:
                time.sleep(gap_ms / 1000)  # the caller's own work between two commits
    for v in variants:
        v.close()
    bytes_per_commit = size * (sum(dims.values()) * 4 + (256 * local_channels * 2 + 256 * 4
                                                         if local_channels else 0))
    out = {"rows": size, "datasets": poolings, "dim": dim, "local": bool(local_channels),
           "mb_per_commit": bytes_per_commit / 1e6, "commits": commits, "gap_ms": gap_ms}
    base = np.array(times[0])
    for name, t in zip(names, times):
        arr = np.array(t)
        out[name] = {"median_ms": float(np.median(arr) * 1e3), "mean_ms": float(arr.mean() * 1e3),
                     "ratio_median": float(np.median(arr / base)),
                     "ratio_of_sums": float(arr.sum() / base.sum())}
    sizes = {n: (folder / f).stat().st_size for n, f in
             zip(names, ("f1.h5", "f2.h5", "f2nosync.h5"))}
    out["file_mb"] = {n: s / 1e6 for n, s in sizes.items()}
    return out


# ---------------------------------------------------------------------------------------------
# end to end: an ingest, with the time spent in commits


_E2E_DRIVER = r"""
import sys, time, json, atexit
from imgdb.store import writer as W
spent = [0.0, 0]
orig = W.StoreWriter.commit
def commit(self, *a, **k):
    t = time.perf_counter()
    try:
        return orig(self, *a, **k)
    finally:
        spent[0] += time.perf_counter() - t
        spent[1] += 1
W.StoreWriter.commit = commit
orig_close = W.StoreWriter.close
def close(self):
    t = time.perf_counter()
    try:
        return orig_close(self)
    finally:
        spent[0] += time.perf_counter() - t
W.StoreWriter.close = close
atexit.register(lambda: sys.stderr.write("E2E " + json.dumps({"commit_s": spent[0], "commits": spent[1]}) + "\n"))
from imgdb.cli import main
sys.argv = ["imgdb"] + sys.argv[1:]
main()
"""


def run_e2e(photos: Path, folder: Path, commit_seconds: float, sync: str, extra: list[str]) -> dict:
    db = folder / f"e2e-{commit_seconds}-{sync}.h5"
    if db.exists():
        db.unlink()
    env = dict(os.environ, IMGDB_SYNC=sync, PYTHONPATH=str(ROOT))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _E2E_DRIVER, "ingest", str(photos), "--db",
                           str(db), "--commit-seconds", str(commit_seconds), "--quiet", *extra],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"ingest failed: {proc.stderr[-2000:]}")
    info = json.loads([ln for ln in proc.stderr.splitlines() if ln.startswith("E2E ")][-1][4:])
    return {"commit_seconds": commit_seconds, "sync": sync, "wall_s": wall, **info,
            "share": info["commit_s"] / wall}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    fs = "?"
    try:
        out = subprocess.run(["df", "-T", tempfile.gettempdir()], capture_output=True, text=True)
        fs = out.stdout.splitlines()[1].split()[1]
    except Exception:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"temp dir on {fs}; h5py {h5py.__version__}, HDF5 {h5py.version.hdf5_version}, "
            f"Python {platform.python_version()}; load average at start "
            f"{os.getloadavg()[0]:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer commits per workload")
    ap.add_argument("--commits", type=int, default=60)
    ap.add_argument("--gap-ms", type=float, default=0.0,
                    help="sleep between commits (the ingest's own work)")
    ap.add_argument("--e2e", type=Path, help="a folder of photos: also time real ingests")
    ap.add_argument("--e2e-args", default="--backbone efficientnet_lite0 --weights none "
                                          "--size max:512 --batch-size 16 --workers 2")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    commits = 15 if args.quick else args.commits
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} on {machine()}")
    results = []
    workloads = [(16, 6, 1280, 0), (16, 18, 1280, 0), (64, 6, 1280, 0), (64, 18, 1280, 0),
                 (16, 18, 1280, 112), (64, 18, 1280, 112)]
    print("| rows | datasets x 1280 | local | MB | format 1 ms | format 2 ms (ratio) | "
          "IMGDB_SYNC=off ms (ratio) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size, pool, dim, local in workloads:
        with tempfile.TemporaryDirectory(prefix="imgdb-bench-") as tmp:
            r = run_workload(Path(tmp), size, pool, dim, local, commits, 5, args.gap_ms)
        results.append(r)
        a, b, c = r["format 1"], r["format 2"], r["format 2, IMGDB_SYNC=off"]
        print(f"| {size} | {pool} | {'112 ch x 256 cells' if local else '-'} | "
              f"{r['mb_per_commit']:.1f} | {a['median_ms']:.1f} | {b['median_ms']:.1f} "
              f"({b['ratio_median']:.2f}) | {c['median_ms']:.1f} ({c['ratio_median']:.2f}) |",
              flush=True)
    e2e = []
    if args.e2e:
        print("\n| --commit-seconds | IMGDB_SYNC | ingest s | commits | in commits s | share |")
        print("| --- | --- | --- | --- | --- | --- |")
        for cs in (0.0, 2.0):
            for sync in ("full", "off"):
                with tempfile.TemporaryDirectory(prefix="imgdb-e2e-") as tmp:
                    r = run_e2e(args.e2e, Path(tmp), cs, sync, args.e2e_args.split())
                e2e.append(r)
                print(f"| {cs:g} | {sync} | {r['wall_s']:.1f} | {r['commits']} | "
                      f"{r['commit_s']:.2f} | {100 * r['share']:.1f}% |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "commits": results, "e2e": e2e},
                                        indent=2))


if __name__ == "__main__":
    main()
