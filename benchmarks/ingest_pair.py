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
  python benchmarks/ingest_pair.py --images coil20 --size original --pairs 3 --copies 6
  python benchmarks/ingest_pair.py --images oxford --size max:512 --pairs 3 --out r.json
  python benchmarks/ingest_pair.py --images oxford --size max:512 --buckets 32,64 --pairs 2
  python benchmarks/ingest_pair.py --ceiling 60 --size max:1024     # 4032 px JPEGs, null network
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


def measure(mode: str, folder: Path, size: str, out: Path) -> dict:
    """One run in this (fresh) process, `mode` one of plain-timm, plain, plain-kept, imgdb (see
    the module doc); the vectors go to `out`."""
    import torch

    from imgdb.features.backbones import (get_backbone, inference_stages, parse_weights,
                                          preprocessing)
    from imgdb.features.images import discover

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


class NullPooled:
    """A pooled batch of zeros, already on the host."""

    def __init__(self, out: dict) -> None:
        self.out = out

    def result(self) -> dict:
        return self.out


class NullNetwork:
    """The real extractor's interface and output shapes, with no network: what is left of an
    ingest is the host's work (read, hash, decode, resize, batch, commit)."""

    def __init__(self, real) -> None:
        self.real = real
        self.device, self.local = real.device, real.local
        self.layers, self.poolings = real.layers, real.poolings
        self.dims = real.output_dims()  # (computed by a small forward: once)

    def output_dims(self) -> dict:
        return self.dims

    def local_channels(self) -> dict:
        return self.real.local_channels()

    def pad_to(self, h: int, w: int) -> tuple[int, int]:
        return self.real.pad_to(h, w)

    def pool_batch(self, x, sizes=None) -> NullPooled:
        n = x.shape[0]
        return NullPooled({k: np.zeros((n, d), np.float32) for k, d in self.output_dims().items()})


def host_ceiling(n: int, side: int, size: str) -> dict:
    """Images/s of an ingest whose network does nothing, from `n` JPEGs `side` px wide (made
    from the repository's photos, upscaled), at the size policy `size`; and of decoding alone."""
    from PIL import Image

    import imgdb.ingest.pipeline as pipeline
    from imgdb.features.images import SizePolicy, iter_decoded
    from imgdb.ingest import IngestOptions, run_ingest

    photos = sorted((DATA / "oxford5k" / "images").glob("*.jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "big"
        folder.mkdir()
        for i in range(n):
            with Image.open(photos[i % len(photos)]) as im:
                im = im.convert("RGB")
                h = round(side * im.height / im.width)
                im.resize((side, h), Image.Resampling.BILINEAR).save(folder / f"{i:05d}.jpg",
                                                                     quality=90)
        files = sorted(folder.iterdir())
        megapixels = sum(Image.open(f).width * Image.open(f).height for f in files) / len(files) / 1e6
        real_build = pipeline._build_extractor
        pipeline._build_extractor = lambda *a, **k: NullNetwork(real_build(*a, **k))
        try:
            opts = IngestOptions(backbone="efficientnet_lite0", weights="imagenet",
                                 layers="head", poolings=",".join(POOLINGS), size=size)
            t = time.perf_counter()
            summary = run_ingest([folder], Path(tmp) / "null.h5", opts)
            ingest_s = time.perf_counter() - t
        finally:
            pipeline._build_extractor = real_build
        assert summary.failed == 0, summary.failures
        t = time.perf_counter()
        for _ in iter_decoded(files, SizePolicy.parse(size), workers=0):
            pass
        decode_s = time.perf_counter() - t
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"images": n, "megapixels_each": round(megapixels, 1), "size": size, "cores": cores,
            "null_ingest_img_s": round(n / ingest_s, 1),
            "null_ingest_img_s_per_core": round(n / ingest_s / cores, 1),
            "decode_one_thread_img_s": round(n / decode_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", choices=sorted(IMAGE_SETS), default="coil20")
    ap.add_argument("--size", default="original", help="original or max:N")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--buckets", help="instead: shape buckets N,M,... against exact shapes "
                                      "(time and cosine per pooling)")
    ap.add_argument("--ceiling", type=int, metavar="N",
                    help="instead: the host-side ceiling, an ingest of N multi-megapixel JPEGs "
                         "with a null network (images/s per core)")
    ap.add_argument("--side", type=int, default=4032, help="with --ceiling: the JPEGs' width")
    ap.add_argument("--copies", type=int, default=1, metavar="K",
                    help="ingest K copies of each image (distinct files), so fixed costs "
                         "(network build, last commit) weigh as in a larger collection")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one run, in a subprocess
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--vectors", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ceiling:
        res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "machine": f"{platform.machine()}, load {os.getloadavg()[0]:.1f}",
               **host_ceiling(args.ceiling, args.side, args.size)}
        print(json.dumps(res))
        if args.out:
            args.out.write_text(json.dumps(res, indent=1))
        return
    if args.buckets:
        res = bucket_fidelity(args.images, args.size, [int(b) for b in args.buckets.split(",")],
                              args.pairs)
        print(json.dumps(res, indent=1))
        if args.out:
            args.out.write_text(json.dumps(res, indent=1))
        return
    if args.measure:
        print(json.dumps(measure(args.measure, args.folder or IMAGE_SETS[args.images], args.size,
                                 args.vectors)))
        return

    import shutil
    import subprocess

    modes = ("plain-timm", "plain", "plain-kept", "imgdb")
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for f in discover_files(args.images):
            for c in range(args.copies):
                shutil.copyfile(f, folder / f"c{c}_{Path(f).name}")
        n = len(discover_files(args.images)) * args.copies
        for k in range(args.pairs):
            order = modes if k % 2 == 0 else modes[::-1]
            got = {}
            for mode in order:  # each in a fresh process: nothing process-wide leaks across
                vec = Path(tmp) / f"{mode}.npz"
                proc = subprocess.run([sys.executable, __file__, "--measure", mode, "--folder",
                                       str(folder), "--size", args.size, "--vectors", str(vec)],
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

    med = {m: statistics.median(r[m] for r in rounds) for m in modes}
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, load "
                         f"{os.getloadavg()[0]:.1f} after, torch {torch.__version__}",
              "images": args.images, "copies": args.copies, "n": n, "size": args.size,
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
