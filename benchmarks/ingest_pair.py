#!/usr/bin/env python
"""imgdb ingest against plain, well-batched loops, each run in its own process, alternating.

plain       a well-batched loop written apart from imgdb's pipeline: PIL decode in the driving
            thread (same size policy: longest side, bicubic), images grouped by shape and run in
            batches of up to 64 equal-size images, one forward through the same BatchNorm-folded
            stages imgdb runs (so the ratio measures the pipeline, not the network), six poolings
            written here from the papers on one layer, vectors kept in memory (no store: the
            loop does less work than an ingest).
plain-timm  that loop with the network a user would load: timm's EfficientNet-Lite0, the same
            weights, BatchNorm as separate layers.
plain-kept  that loop (folded) after imgdb's allocator setting (ingest.stages.keep_freed_memory):
            the strongest loop we could write.
imgdb       imgdb.ingest.run_ingest into a fresh store with its defaults: decode threads, pixel-
            budget batches, the forward, a writer thread committing every 2 s, crash-safe commits.

Each run is a fresh process (nothing process-wide leaks from one to another); the order
alternates from round to round; each round's ratios are reported (the machines are noisy: quote
the median and the worst). Vectors are compared (cosine per pooling against both plain loops),
so a speed-up cannot hide a different answer.

Examples:
  python benchmarks/ingest_pair.py --images coil20 --size original --pairs 3
  python benchmarks/ingest_pair.py --images oxford --size max:512 --pairs 3 --out r.json
  python benchmarks/ingest_pair.py --images oxford --size max:512 --buckets 32,64 --pairs 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO / "tests" / "data"
IMAGE_SETS = {"coil20": DATA / "coil20" / "images", "oxford": DATA / "oxford5k" / "query_crops"}
POOLINGS = ("sum", "spoc", "mac", "mac2x2", "crow", "gem-p3")


def plain_poolings(x):
    """The six poolings of one (B, C, H, W) post-ReLU map, from the papers' formulas."""
    import torch

    b, c, h, w = x.shape
    out = {"sum": x.sum((2, 3)), "mac": x.amax((2, 3))}
    sigma = min(h, w) / 2.0 / 3.0  # Babenko: 1/3 of the centre-to-boundary distance
    ys = torch.arange(h, dtype=torch.float64) - (h - 1) / 2
    xs = torch.arange(w, dtype=torch.float64) - (w - 1) / 2
    g = torch.exp(-(ys[:, None] ** 2 + xs[None] ** 2) / (2 * sigma ** 2)).float()
    out["spoc"] = (x * g).sum((2, 3))
    hs, ws = math.ceil(h / 2), math.ceil(w / 2)  # 2x2 MAC: quadrants (overlap by one if odd)
    out["mac2x2"] = torch.cat([x[:, :, r0:r0 + hs, c0:c0 + ws].amax((2, 3))
                               for r0 in (0, h - hs) for c0 in (0, w - ws)], 1)
    s = x.sum(1, keepdim=True)  # CroW: S = (S'/||S'||)^(1/2), beta_k = log(sum Q / Q_k)
    s = (s / s.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)).sqrt()
    q = (x > 0).float().mean((2, 3))
    eps = 1e-6
    beta = torch.log((c * eps + q.sum(1, keepdim=True)) / (eps + q))
    out["crow"] = (x * s).sum((2, 3)) * beta
    out["gem-p3"] = x.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)
    return out


def run_plain(files: list[Path], stages, mean, std, longest: int | None, layer_index: int,
              batch: int = 64) -> tuple[float, dict[str, np.ndarray]]:
    """The plain loop; (seconds, vectors in file order)."""
    import torch
    from PIL import Image

    started = time.perf_counter()
    groups: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
    vectors: dict[str, list] = {p: [None] * len(files) for p in POOLINGS}

    def run(items):
        x = torch.from_numpy(np.stack([a for _, a in items])).permute(0, 3, 1, 2).float()
        x = (x - mean) / std
        with torch.inference_mode():
            for k, stage in enumerate(stages[:layer_index + 1]):
                x = stage(x)
            for name, v in plain_poolings(x).items():
                for (i, _), row in zip(items, v.numpy()):
                    vectors[name][i] = row

    for i, f in enumerate(files):
        with Image.open(f) as im:
            im = im.convert("RGB")
            if longest is not None and max(im.size) != longest:
                r = longest / max(im.size)
                im = im.resize((max(1, round(im.width * r)), max(1, round(im.height * r))),
                               Image.Resampling.BICUBIC)
            a = np.asarray(im, dtype=np.uint8)
        group = groups.setdefault(a.shape[:2], [])
        group.append((i, a))
        if len(group) == batch:
            run(group)
            group.clear()
    for group in groups.values():
        if group:
            run(group)
    return time.perf_counter() - started, {k: np.stack(v) for k, v in vectors.items()}


def run_imgdb(files_dir: Path, size: str, workdir: Path) -> tuple[float, dict[str, np.ndarray]]:
    from imgdb.ingest import IngestOptions, run_ingest
    from imgdb.store import open_read

    db = workdir / f"s{time.monotonic_ns()}.h5"
    opts = IngestOptions(backbone="efficientnet_lite0", weights="imagenet", layers="head",
                         poolings=",".join(POOLINGS), size=size)
    started = time.perf_counter()
    summary = run_ingest([files_dir], db, opts)
    seconds = time.perf_counter() - started
    assert summary.failed == 0, summary.failures
    with open_read(db) as view:
        out = {p: view.vectors(view.descriptor(f"{summary.extractor}/head/{p}")) for p in POOLINGS}
    db.unlink()
    return seconds, out


def measure(mode: str, images: str, size: str, out: Path) -> dict:
    """One run in this (fresh) process, `mode` one of plain-timm, plain, plain-kept, imgdb (see
    the module doc); the vectors go to `out`."""
    import torch

    from imgdb.features.backbones import (get_backbone, inference_stages, parse_weights,
                                          preprocessing)
    from imgdb.features.images import discover

    folder = IMAGE_SETS[images]
    if mode == "imgdb":
        with tempfile.TemporaryDirectory() as tmp:
            seconds, vectors = run_imgdb(folder, size, Path(tmp))
    else:
        if mode == "plain-kept":
            from imgdb.ingest.stages import keep_freed_memory

            keep_freed_memory()
        files = [Path(f) for f in discover([folder]).files]
        backbone = get_backbone("efficientnet_lite0")
        weights = parse_weights("imagenet")
        if mode == "plain-timm":  # the reference network a user would load: timm's, unfolded
            from imgdb.features.backbones import load_network

            stages, layer_index = [load_network(backbone, weights).forward_features], 0
        else:
            named = inference_stages(backbone, weights)
            stages = [m.eval() for _, m in named]
            layer_index = [n for n, _ in named].index("head")
        m, s = preprocessing(backbone, weights)
        mean = torch.tensor(m).view(1, 3, 1, 1) * 255
        std = torch.tensor(s).view(1, 3, 1, 1) * 255
        longest = None if size == "original" else int(size.split(":")[1])
        seconds, vectors = run_plain(files, stages, mean, std, longest, layer_index)
    np.savez(out, **vectors)
    return {"mode": mode, "seconds": round(seconds, 3), "n": len(next(iter(vectors.values())))}


def bucket_fidelity(images: str, size: str, buckets: list[int], rounds: int) -> dict:
    """Shape buckets against exact shapes: time of each (alternating, one process) and the
    cosine of every pooling of every image against its exact-shape vector."""
    from imgdb.ingest import IngestOptions, run_ingest
    from imgdb.store import open_read

    folder = IMAGE_SETS[images]
    times: dict[int, list[float]] = {b: [] for b in [0, *buckets]}
    vectors: dict[int, dict[str, np.ndarray]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for b in (times if r % 2 == 0 else list(times)[::-1]):
                db = Path(tmp) / f"b{b}-{r}.h5"
                opts = IngestOptions(backbone="efficientnet_lite0", weights="imagenet",
                                     layers="head", poolings=",".join(POOLINGS), size=size,
                                     buckets=b)
                t = time.perf_counter()
                summary = run_ingest([folder], db, opts)
                times[b].append(time.perf_counter() - t)
                with open_read(db) as view:
                    vectors[b] = {p: view.vectors(view.descriptor(f"{summary.extractor}/head/{p}"))
                                  for p in POOLINGS}
    out = {"images": images, "size": size, "seconds_median":
           {str(b): round(statistics.median(t), 3) for b, t in times.items()}, "cosine": {}}
    for b in buckets:
        cos = {}
        for p in POOLINGS:
            a, e = vectors[b][p], vectors[0][p]
            c = (a * e).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(e, axis=1),
                                            1e-12)
            cos[p] = {"mean": round(float(c.mean()), 4), "min": round(float(c.min()), 4)}
        out["cosine"][str(b)] = cos
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", choices=sorted(IMAGE_SETS), default="coil20")
    ap.add_argument("--size", default="original", help="original or max:N")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--buckets", help="instead: shape buckets N,M,... against exact shapes "
                                      "(time and cosine per pooling)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one run, in a subprocess
    ap.add_argument("--vectors", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.buckets:
        res = bucket_fidelity(args.images, args.size, [int(b) for b in args.buckets.split(",")],
                              args.pairs)
        print(json.dumps(res, indent=1))
        if args.out:
            args.out.write_text(json.dumps(res, indent=1))
        return
    if args.measure:
        print(json.dumps(measure(args.measure, args.images, args.size, args.vectors)))
        return

    import subprocess

    modes = ("plain-timm", "plain", "plain-kept", "imgdb")
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.pairs):
            order = modes if k % 2 == 0 else modes[::-1]
            got = {}
            for mode in order:  # each in a fresh process: nothing process-wide leaks across
                vec = Path(tmp) / f"{mode}.npz"
                proc = subprocess.run([sys.executable, __file__, "--measure", mode, "--images",
                                       args.images, "--size", args.size, "--vectors", str(vec)],
                                      capture_output=True, text=True, check=True)
                got[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
                got[mode + "_vectors"] = dict(np.load(vec))
            cos = {}
            for p in POOLINGS:
                b = got["imgdb_vectors"][p]
                for base in ("plain", "plain-timm"):
                    a = got[base + "_vectors"][p]
                    num = (a * b).sum(1)
                    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
                    cos[f"{base}/{p}"] = round(float(np.min(num / np.maximum(den, 1e-12))), 6)
            row = {"order": list(order), **{m: got[m] for m in modes},
                   "vs_plain_timm": round(got["plain-timm"] / got["imgdb"], 3),
                   "vs_plain": round(got["plain"] / got["imgdb"], 3),
                   "vs_plain_kept": round(got["plain-kept"] / got["imgdb"], 3),
                   "min_cosine": cos}
            rounds.append(row)
            print(json.dumps(row), flush=True)
    import torch

    n = len(discover_files(args.images))
    med = {m: statistics.median(r[m] for r in rounds) for m in modes}
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, load "
                         f"{os.getloadavg()[0]:.1f} after, torch {torch.__version__}",
              "images": args.images, "n": n, "size": args.size,
              "img_per_s": {m: round(n / med[m], 1) for m in modes},
              "vs_plain_timm": {"median": statistics.median(r["vs_plain_timm"] for r in rounds),
                                "worst": min(r["vs_plain_timm"] for r in rounds)},
              "vs_plain": {"median": statistics.median(r["vs_plain"] for r in rounds),
                           "worst": min(r["vs_plain"] for r in rounds)},
              "vs_plain_kept": {"median": statistics.median(r["vs_plain_kept"] for r in rounds),
                                "worst": min(r["vs_plain_kept"] for r in rounds)},
              "rounds": rounds}
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


def discover_files(images: str) -> list[str]:
    from imgdb.features.images import discover

    return discover([IMAGE_SETS[images]]).files


if __name__ == "__main__":
    main()
