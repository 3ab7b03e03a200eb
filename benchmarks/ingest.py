#!/usr/bin/env python
"""Ingest throughput of imgdb against the strongest plain loop and a naive baseline, in one run.

Machines are noisy (shared CPUs, other jobs), so the methods run in one process, alternating
when --repeat > 1, and the ratio is the number to quote, not the absolute images/s. In one
process imgdb's allocator setting (ingest.stages.keep_freed_memory) stays on for the methods
that run after it, so `plain` is the strongest loop (ingest_pair.py's plain-kept);
benchmarks/ingest_pair.py runs each method in a fresh process instead.

naive   one image at a time: PIL open -> convert("RGB") -> resize (same size policy, bicubic)
        -> torchvision ToTensor + Normalize -> for every (layer, pooling) run the network again
        from the input up to that layer and pool -> append to a Python list -> h5py at the end.
plain   the strongest plain loop (the baseline to quote): PIL decode in the driving thread,
        images grouped by shape into batches of up to 64, one forward through imgdb's folded
        stages for all layers, imgdb's torch poolings on the device, h5py at the end, no store.
imgdb   imgdb.ingest.run_ingest into a fresh store: threaded decode, batches of equal-size
        images, one forward for all layers x poolings, pooling on the device, periodic commits.

Both use the same network (imgdb.features.backbones.load_network, seeded for --weights none) so the
vectors must agree; the worst relative difference is printed, with the reason when decoding
differs (EXIF orientation, JPEG draft decoding, reducing_gap), so a speed-up cannot hide a
wrong answer.

On CUDA it also measures the pure GPU forward of VGG16's conv stack at 1024x768 (fp32 as
PyTorch runs it by default, i.e. TF32 convolutions, strict fp32, and fp16 autocast) with a
large batch, against the ~480 GFLOP per image that stack costs at that size.

Examples:
  python benchmarks/ingest.py --limit 20
  python benchmarks/ingest.py --synthetic 64 512x384
  python benchmarks/ingest.py --synthetic 16 512x384 --backbone vgg16 --layers pool5
  python benchmarks/ingest.py --images coil20 --limit 200 --size max:256 --out r.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"  # the test data (see its README.md): subsets, downscaled
IMAGE_SETS = {
    "oxford": DATA / "oxford5k" / "query_crops",
    "oxford-full": DATA / "oxford5k" / "images",
    "coil20": DATA / "coil20" / "images",
}
VGG16_1024x768_GFLOP = 480.0  # brief's bound for VGG16's conv stack; also recomputed exactly below


# ---------------------------------------------------------------------------------------------
# set-up


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Ingest throughput (images/s) of imgdb vs the strongest plain batched loop "
                    "and a naive one-image-at-a-time baseline, in the same run, with checks that "
                    "they give the same vectors.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Image sets by name: " + ", ".join(f"{k} = {v}" for k, v in IMAGE_SETS.items()))
    p.add_argument("--images", default="oxford",
                   help="folder of images, or a name: oxford (55 query crops, 256 px, default), "
                        "oxford-full (10 photos, 1024 px), coil20 (243 images)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images (sorted)")
    p.add_argument("--synthetic", nargs=2, metavar=("N", "WxH"), default=None,
                   help="instead of --images, N random JPEG images all of size WxH "
                        "(made in a temp dir), so equal-size batching is exercised")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default=None,
                   help="imagenet | none | FILE; default imagenet for efficientnet_lite*, "
                        "none for the torchvision nets (no network access here)")
    p.add_argument("--layers", default=None, help="comma list; default: the backbone's own")
    p.add_argument("--poolings", default=None, help="comma list; default: all of imgdb's poolings")
    p.add_argument("--size", default="max:512", help="size policy (default max:512, short on CPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=64, help="imgdb batch size (default 64)")
    p.add_argument("--workers", type=int, default=4, help="imgdb decode threads (default 4)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="imgdb precision (CUDA only; the naive baseline is always fp32)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run each method R times (alternating order), report the best")
    p.add_argument("--naive-limit", type=int, default=None, metavar="M",
                   help="run the (slow) naive baseline on only M of the images, evenly spaced "
                        "over the list, and compare images/s; imgdb still does all of them")
    p.add_argument("--skip-naive", action="store_true",
                   help="time imgdb only (no speed-up, no vector check)")
    p.add_argument("--gpu-forward", choices=["auto", "on", "off"], default="auto",
                   help="VGG16 1024x768 pure forward throughput on CUDA (auto: when CUDA is used)")
    p.add_argument("--gpu-batch", type=int, default=32,
                   help="batch of the GPU forward benchmark (halved on out-of-memory)")
    p.add_argument("--gpu-iters", type=int, default=10, help="timed batches per precision")
    p.add_argument("--tmp", default=None, help="where temp stores/images go (default: system tmp)")
    p.add_argument("--out", default=None, help="also write all results as JSON to this file")
    args = p.parse_args(argv)
    if args.weights is None:
        args.weights = "imagenet" if args.backbone.lower().startswith("efficientnet") else "none"
    if args.synthetic:
        try:
            n = int(args.synthetic[0])
            w, h = (int(v) for v in args.synthetic[1].lower().split("x"))
            assert n > 0 and w > 0 and h > 0
        except (ValueError, AssertionError):
            p.error("--synthetic needs N WxH, e.g. --synthetic 64 512x384")
        args.synthetic = (n, w, h)
    if args.repeat < 1 or args.batch_size < 1 or args.workers < 0:
        p.error("--repeat and --batch-size must be >= 1, --workers >= 0")
    return args


def machine_info(device) -> dict:
    import PIL
    import torch
    import torchvision

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "device": str(device),
        "device_name": cpu,
    }
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        info["device_name"] = torch.cuda.get_device_name(idx)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def make_synthetic(folder: Path, n: int, w: int, h: int) -> list[Path]:
    """N random-but-photo-like JPEGs of one size: smooth random colour field + noise, q=90."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        low = rng.integers(0, 256, size=(max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC), np.int16)
        img = np.clip(img + rng.normal(0, 12, size=img.shape), 0, 255).astype(np.uint8)
        path = folder / f"synthetic_{i:05d}.jpg"
        Image.fromarray(img).save(path, quality=90)
        files.append(path)
    return files


def list_images(args: argparse.Namespace) -> list[Path]:
    from imgdb.features.images import discover

    folder = Path(IMAGE_SETS.get(args.images, args.images)).expanduser()
    if not folder.exists():
        sys.exit(f"image folder {folder} does not exist (names: {', '.join(IMAGE_SETS)})")
    files = [Path(os.path.abspath(f)) for f in discover([folder]).files]
    if args.limit is not None:
        files = files[: args.limit]
    if not files:
        sys.exit(f"no images under {folder}")
    return files


# ---------------------------------------------------------------------------------------------
# the naive baseline


def write_vectors(out_h5: Path, files: list[Path], vectors: dict) -> float:
    """A baseline's vectors to an HDF5 file (paths, then LAYER/POOLING datasets); seconds."""
    import h5py

    t = time.perf_counter()
    with h5py.File(out_h5, "w") as fh:
        fh["paths"] = np.array([str(f) for f in files], dtype=h5py.string_dtype())
        for (layer, pooling), vs in vectors.items():
            fh.create_dataset(f"{layer}/{pooling}", data=np.stack(vs).astype(np.float32))
    return time.perf_counter() - t


def run_naive(files: list[Path], cfg: dict, out_h5: Path, device) -> dict:
    """What a first script written without care does; returns timings."""
    import torch
    from PIL import Image
    from torchvision import transforms

    from imgdb.features.backbones import load_network, preprocessing
    from imgdb.features.pooling import get_pooling

    backbone, weights, policy = cfg["backbone"], cfg["weights"], cfg["policy"]
    t0 = time.perf_counter()
    model = load_network(backbone, weights).to(device).eval()
    stages = backbone.stages(model)
    names = [n for n, _ in stages]
    mean, std = preprocessing(backbone, weights)
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    t_setup = time.perf_counter() - t0

    vectors: dict[tuple[str, str], list[np.ndarray]] = {(l, p): [] for l in cfg["layers"]
                                                         for p in cfg["poolings"]}
    t_decode = t_forward = 0.0
    pixels = 0
    for f in files:
        t = time.perf_counter()
        im = Image.open(f).convert("RGB")
        size = policy.target(*im.size)
        if im.size != size:
            im = im.resize(size, Image.Resampling.BICUBIC)
        x = to_tensor(im).unsqueeze(0).to(device)
        pixels += size[0] * size[1]
        t2 = time.perf_counter()
        t_decode += t2 - t
        with torch.no_grad():
            for layer in cfg["layers"]:
                depth = names.index(layer)
                for pooling in cfg["poolings"]:
                    h = x
                    for _, stage in stages[: depth + 1]:  # the whole net again, every time
                        h = stage(h)
                    vectors[(layer, pooling)].append(get_pooling(pooling)(h).cpu().numpy()[0])
        t_forward += time.perf_counter() - t2
    t_write = write_vectors(out_h5, files, vectors)
    total = time.perf_counter() - t0
    return {"seconds": total, "images": len(files), "ok": len(files),
            "forwards": len(files) * len(cfg["layers"]) * len(cfg["poolings"]),
            "pixels_per_image": pixels / len(files),
            "breakdown": {"setup (build net)": t_setup, "decode+resize+tensor": t_decode,
                          "forward+pool (per pooling)": t_forward, "h5 write": t_write}}


def run_plain(files: list[Path], cfg: dict, out_h5: Path, device) -> dict:
    """The strongest plain loop we could write: PIL decode in this thread, images grouped by
    shape into batches of up to 64, one forward through imgdb's BatchNorm-folded stages on the
    device for every layer, imgdb's torch poolings on the device, vectors kept in memory and
    written at the end (no crash safety, no resumability, no store)."""
    import torch
    from PIL import Image

    from imgdb.features.backbones import inference_stages, preprocessing
    from imgdb.features.pooling import pool_all

    backbone, weights, policy = cfg["backbone"], cfg["weights"], cfg["policy"]
    t0 = time.perf_counter()
    named = inference_stages(backbone, weights)
    names = [n for n, _ in named]
    deepest = max(names.index(layer) for layer in cfg["layers"])
    stages = [m.to(device) for _, m in named[:deepest + 1]]
    m, s = preprocessing(backbone, weights)
    mean = torch.tensor(m, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(s, device=device).view(1, 3, 1, 1) * 255
    t_setup = time.perf_counter() - t0
    vectors: dict[tuple[str, str], list] = {(l, p): [None] * len(files) for l in cfg["layers"]
                                            for p in cfg["poolings"]}
    groups: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
    times = {"decode": 0.0, "forward": 0.0}
    forwards, pixels = [0], 0

    def run(items) -> None:
        t = time.perf_counter()
        x = torch.from_numpy(np.stack([a for _, a in items])).to(device)
        x = (x.permute(0, 3, 1, 2).float() - mean) / std
        with torch.inference_mode():
            for k, stage in enumerate(stages):
                x = stage(x)
                if names[k] in cfg["layers"]:
                    for p, v in pool_all(x.float(), cfg["poolings"]).items():
                        for (i, _), row in zip(items, v.cpu().numpy()):
                            vectors[(names[k], p)][i] = row
        forwards[0] += 1
        times["forward"] += time.perf_counter() - t

    for i, f in enumerate(files):
        t = time.perf_counter()
        with Image.open(f) as im:
            im = im.convert("RGB")
            size = policy.target(*im.size)
            if im.size != size:
                im = im.resize(size, Image.Resampling.BICUBIC)
            a = np.asarray(im, dtype=np.uint8)
        pixels += a.shape[0] * a.shape[1]
        times["decode"] += time.perf_counter() - t
        group = groups.setdefault(a.shape[:2], [])
        group.append((i, a))
        if len(group) == 64:
            run(group)
            group.clear()
    for group in groups.values():
        if group:
            run(group)
    t_write = write_vectors(out_h5, files, vectors)
    return {"seconds": time.perf_counter() - t0, "images": len(files), "ok": len(files),
            "forwards": forwards[0], "pixels_per_image": pixels / len(files),
            "breakdown": {"setup (build net)": t_setup, "decode+resize": times["decode"],
                          "forward+pool (batched)": times["forward"], "h5 write": t_write}}


# ---------------------------------------------------------------------------------------------
# imgdb, instrumented from the outside (nothing in imgdb/ is changed)


@contextlib.contextmanager
def instrument():
    """Time FeatureExtractor set-up/forward and store commits; record every batch size."""
    from imgdb import store
    from imgdb.features import extract

    rec = {"init": 0.0, "probe": 0.0, "forward": 0.0, "commit": 0.0, "commits": 0,
           "batches": Counter(), "shapes": Counter()}
    fe, sw = extract.FeatureExtractor, store.StoreWriter
    orig = (fe.__init__, fe.pool_batch, fe.output_dims, sw.commit)
    state = {"probe": False}

    def init(self, *a, **k):
        t = time.perf_counter()
        orig[0](self, *a, **k)
        rec["init"] += time.perf_counter() - t

    def call(self, pixels, sizes=None):  # the pipeline's forward: on CUDA, its launch only
        t = time.perf_counter()
        out = orig[1](self, pixels, sizes)
        if not state["probe"]:
            rec["forward"] += time.perf_counter() - t
            rec["batches"][int(pixels.shape[0])] += 1
            rec["shapes"][tuple(int(v) for v in pixels.shape[1:3])] += int(pixels.shape[0])
        return out

    def dims(self):
        t = time.perf_counter()
        state["probe"] = True
        try:
            return orig[2](self)
        finally:
            state["probe"] = False
            rec["probe"] += time.perf_counter() - t

    def commit(self, *a, **k):
        t = time.perf_counter()
        try:
            return orig[3](self, *a, **k)
        finally:
            rec["commit"] += time.perf_counter() - t
            rec["commits"] += 1

    fe.__init__, fe.pool_batch, fe.output_dims, sw.commit = init, call, dims, commit
    try:
        yield rec
    finally:
        fe.__init__, fe.pool_batch, fe.output_dims, sw.commit = orig


def run_imgdb(files: list[Path], args: argparse.Namespace, db: Path) -> dict:
    from imgdb.ingest import IngestOptions, run_ingest

    opts = IngestOptions(backbone=args.backbone, weights=args.weights, layers=args.layers,
                         poolings=args.poolings, size=args.size, device=args.device,
                         batch_size=args.batch_size, workers=args.workers,
                         precision=args.precision)
    with instrument() as rec:
        t0 = time.perf_counter()
        summary = run_ingest([str(f) for f in files], db, opts)
        total = time.perf_counter() - t0
    if summary.failed:
        print(f"warning: imgdb failed on {summary.failed} images: {summary.failures[:3]}",
              file=sys.stderr)
    other = total - rec["init"] - rec["probe"] - rec["forward"] - rec["commit"]
    n_batches = sum(rec["batches"].values())
    return {"seconds": total, "images": len(files), "ok": summary.ok,
            "extractor": summary.extractor,
            "batches": n_batches,
            "mean_batch": (sum(k * v for k, v in rec["batches"].items()) / n_batches
                           if n_batches else 0.0),
            "batch_histogram": dict(sorted(rec["batches"].items())),
            "distinct_sizes": len(rec["shapes"]),
            "forwards": n_batches,
            "pixels_per_image": (sum((h * w) * c for (h, w), c in rec["shapes"].items())
                                 / max(1, sum(rec["shapes"].values()))),
            "commits": rec["commits"],
            "breakdown": {"setup (build net + probe + store)": rec["init"] + rec["probe"],
                          "forward+pool (batched)": rec["forward"],
                          "store commits": rec["commit"],
                          "other (waiting for decode, planning, batching)": other}}


# ---------------------------------------------------------------------------------------------
# correctness


def compare(files: list[Path], naive_h5: Path, db: Path, extractor: str, cfg: dict) -> dict:
    """Worst relative difference naive vs imgdb: max|a-b| / max|b| per vector, worst over all."""
    import h5py
    from PIL import Image

    from imgdb.features.images import load_image
    from imgdb.store import open_read

    with open_read(db) as view:
        row = {p: i for i, p in enumerate(view.images().path)}
        idx = np.array([row[str(f)] for f in files])
        store_vecs = {(l, p): view.vectors(view.descriptor(f"{extractor}/{l}/{p}"), idx)
                      for l in cfg["layers"] for p in cfg["poolings"]}
    per: dict[str, float] = {}
    worst = 0.0
    nonfinite = 0
    with h5py.File(naive_h5, "r") as fh:
        for (layer, pooling), b in store_vecs.items():
            a = fh[f"{layer}/{pooling}"][:]
            nonfinite += int((~np.isfinite(a)).sum() + (~np.isfinite(b)).sum())
            scale = np.maximum(np.abs(b).max(axis=1), 1e-30)
            rel = float((np.abs(a - b).max(axis=1) / scale).max())
            per[f"{layer}/{pooling}"] = rel
            worst = max(worst, rel)
    # do the two decoders hand the network the same pixels? (explains a difference if not)
    differ = 0
    for f in files:
        im = Image.open(f).convert("RGB")
        size = cfg["policy"].target(*im.size)
        if im.size != size:
            im = im.resize(size, Image.Resampling.BICUBIC)
        mine = load_image(f, cfg["policy"]).pixels[0]
        theirs = np.asarray(im)
        if mine.shape != theirs.shape or not np.array_equal(mine, theirs):
            differ += 1
    return {"max_rel_diff": worst, "per_descriptor": per, "nonfinite": nonfinite,
            "images_with_different_pixels": differ}


# ---------------------------------------------------------------------------------------------
# GPU forward of VGG16 at 1024x768 (CUDA only)


def conv_gflop(features, h: int, w: int) -> float:
    """Exact multiply-add count x2 of a conv stack (Conv2d + MaxPool2d) at h x w, in GFLOP."""
    from torch import nn

    flop = 0
    for m in features:
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            sh, sw = m.stride
            ph, pw = m.padding
            h = (h + 2 * ph - kh) // sh + 1
            w = (w + 2 * pw - kw) // sw + 1
            flop += 2 * h * w * m.out_channels * (m.in_channels // m.groups) * kh * kw
        elif isinstance(m, nn.MaxPool2d):
            k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
            s = m.stride if isinstance(m.stride, int) else m.stride[0]
            h, w = (h - k) // s + 1, (w - k) // s + 1
    return flop / 1e9


def gpu_forward(device, batch: int, iters: int, width: int = 1024, height: int = 768,
                warmup: int = 3) -> list[dict]:
    """Pure forward images/s of VGG16 `features` (random weights; speed does not depend on them).

    fp32 (PyTorch default: cuDNN may use TF32 tensor cores), fp32 strict (TF32 off), and fp16
    autocast; channels_last, cudnn.benchmark, input already on the device, no pooling/copies.
    Written for CUDA; runs on CPU too (slowly; used only to test this code path).
    """
    import torch
    import torchvision

    cuda = device.type == "cuda"
    features = torchvision.models.vgg16(weights=None).features.to(device).eval()
    features = features.to(memory_format=torch.channels_last)
    gflop = conv_gflop(features, height, width)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.backends.cudnn.benchmark = True
    results = []
    tf32_default = torch.backends.cudnn.allow_tf32
    runs = [("fp32 (default, TF32 allowed)" if tf32_default else "fp32", torch.float32, tf32_default),
            ("fp32 strict (TF32 off)", torch.float32, False),
            ("fp16 autocast", torch.float16, tf32_default)]
    if not cuda or not tf32_default:
        runs = [r for r in runs if not r[0].startswith("fp32 strict")]
    try:
        for label, dtype, tf32 in runs:
            torch.backends.cudnn.allow_tf32 = tf32
            b = batch
            while True:
                try:
                    x = torch.randn(b, 3, height, width, device=device)
                    x = x.contiguous(memory_format=torch.channels_last)
                    ctx = (torch.autocast(device_type=device.type, dtype=dtype)
                           if dtype != torch.float32 else contextlib.nullcontext())
                    with torch.inference_mode(), ctx:
                        for _ in range(warmup):
                            features(x)
                        sync()
                        t = time.perf_counter()
                        for _ in range(iters):
                            y = features(x)
                        sync()
                        secs = time.perf_counter() - t
                    del y
                    break
                except torch.OutOfMemoryError:
                    x = y = None
                    if cuda:
                        torch.cuda.empty_cache()
                    if b == 1:
                        raise
                    b //= 2
            ips = b * iters / secs
            row = {"precision": label, "batch": b, "iters": iters, "seconds": secs,
                   "images_per_s": ips, "gflop_per_image": gflop,
                   "tflop_per_s": ips * gflop / 1e3}
            if cuda:
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                torch.cuda.reset_peak_memory_stats(device)
            results.append(row)
            del x
            if cuda:
                torch.cuda.empty_cache()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32_default
    return results


# ---------------------------------------------------------------------------------------------
# report


def fmt_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    from imgdb.features.backbones import get_backbone, parse_layers, parse_weights
    from imgdb.features.extract import resolve_device
    from imgdb.features.images import SizePolicy
    from imgdb.features.pooling import DEFAULT_POOLINGS, canonical_pooling_name

    device = resolve_device(args.device)
    backbone = get_backbone(args.backbone)
    cfg = {
        "backbone": backbone,
        "weights": parse_weights(args.weights),
        "layers": parse_layers(backbone, args.layers),
        "poolings": (tuple(canonical_pooling_name(p) for p in args.poolings.split(",") if p.strip())
                     if args.poolings else DEFAULT_POOLINGS),
        "policy": SizePolicy.parse(args.size),
    }
    info = machine_info(device)
    tmp = tempfile.TemporaryDirectory(prefix="imgdb-bench-", dir=args.tmp)
    tmpdir = Path(tmp.name)
    try:
        if args.synthetic:
            n, w, h = args.synthetic
            files = make_synthetic(tmpdir / "images", n, w, h)
            source = f"synthetic: {n} random JPEGs of {w}x{h}"
        else:
            files = list_images(args)
            source = str(IMAGE_SETS.get(args.images, args.images))
        for f in files:  # page cache warm for both methods
            f.read_bytes()
        # imports and weight files warm, outside the timings
        from imgdb.features.backbones import load_network
        load_network(cfg["backbone"], cfg["weights"])
        import h5py  # noqa: F401
        import imgdb.ingest  # noqa: F401
        import torchvision.transforms  # noqa: F401

        print(f"imgdb ingest benchmark - {info['date']}")
        print(f"machine: {info['cpu']}, {info['cpu_count']} cores ({info['cpus_usable']} usable, "
              f"torch threads {info['torch_threads']}), load avg {info['loadavg_start'][0]:.2f}; "
              f"torch {info['torch']}; device {info['device']} ({info['device_name']})")
        print(f"images: {source} ({len(files)} files); backbone {backbone.name} "
              f"weights {cfg['weights'].spec}; layers {','.join(cfg['layers'])}; "
              f"{len(cfg['poolings'])} poolings ({','.join(cfg['poolings'])}); size {args.size}; "
              f"imgdb batch {args.batch_size}, workers {args.workers}, precision {args.precision}")
        print(f"naive runs the network {len(cfg['layers']) * len(cfg['poolings'])}x per image; "
              f"imgdb once per batch", flush=True)

        naive_files = files
        if args.naive_limit is not None and 0 < args.naive_limit < len(files):
            pick = np.unique(np.linspace(0, len(files) - 1, args.naive_limit).round().astype(int))
            naive_files = [files[i] for i in pick]
            print(f"naive baseline on {len(naive_files)} of the {len(files)} images "
                  f"(evenly spaced), imgdb on all {len(files)}", flush=True)
        methods = ["plain", "imgdb"] if args.skip_naive else ["naive", "plain", "imgdb"]
        best: dict[str, dict] = {}
        runs: dict[str, list[float]] = {m: [] for m in methods}
        last_paths: dict[str, Path] = {}
        for r in range(args.repeat):
            order = methods if r % 2 == 0 else methods[::-1]
            for m in order:
                out = tmpdir / f"{m}-{r}.h5"
                res = (run_naive(naive_files, cfg, out, device) if m == "naive" else
                       run_plain(files, cfg, out, device) if m == "plain" else
                       run_imgdb(files, args, out))
                runs[m].append(res["seconds"])
                print(f"  run {r + 1}/{args.repeat} {m}: {res['seconds']:.2f} s "
                      f"({res['images'] / res['seconds']:.2f} images/s)", flush=True)
                if m not in best or res["seconds"] < best[m]["seconds"]:
                    best[m] = res
                last_paths[m] = out
        base, plain = best.get("naive"), best["plain"]
        plain_ips = plain["images"] / plain["seconds"]
        rows = []
        for m in methods:
            res = best[m]
            ips = res["images"] / res["seconds"]
            speed = f"{ips / (base['images'] / base['seconds']):.2f}x" if base else "-"
            res["images_per_s"] = ips
            rows.append([m, res["images"], f"{res['seconds']:.2f}", f"{ips:.2f}",
                         f"{ips / plain_ips:.2f}x", speed])
        print()
        print(fmt_table(rows, ["method", "images", "seconds", "images/s", "vs plain", "vs naive"]))
        print()
        for m in methods:
            bd = best[m]["breakdown"]
            res = best[m]
            fwd = [v for k, v in bd.items() if k.startswith("forward")][0]
            print(f"{m} time: " + "; ".join(f"{k} {v:.2f}s" for k, v in bd.items())
                  + f" | {res['forwards']} network passes, {fwd / res['forwards']:.3f} s each, "
                  f"{fwd / res['images']:.3f} s of forward per image; "
                  f"{res['pixels_per_image'] / 1e3:.0f} kpixel per image")
        im = best["imgdb"]
        print(f"imgdb batches: {im['batches']} forwards for {im['ok']} images "
              f"(mean batch {im['mean_batch']:.2f}, histogram {im['batch_histogram']}); "
              f"{im['distinct_sizes']} distinct input sizes; {im['commits']} commits")

        check_plain = compare(files, last_paths["plain"], last_paths["imgdb"], im["extractor"], cfg)
        print(f"vectors: max abs relative difference plain vs imgdb = "
              f"{check_plain['max_rel_diff']:.2e}")
        check = None
        if base:
            check = compare(naive_files, last_paths["naive"], last_paths["imgdb"], im["extractor"], cfg)
            worst_key = max(check["per_descriptor"], key=check["per_descriptor"].get)
            print(f"vectors: max abs relative difference naive vs imgdb = "
                  f"{check['max_rel_diff']:.2e} (worst {worst_key}; max|a-b|/max|b| per vector); "
                  f"non-finite values: {check['nonfinite']}; images whose decoded pixels differ: "
                  f"{check['images_with_different_pixels']}/{len(naive_files)}")

        gpu = None
        want_gpu = args.gpu_forward == "on" or (args.gpu_forward == "auto" and device.type == "cuda")
        if want_gpu:
            if not torch.cuda.is_available():
                print("GPU forward benchmark: skipped, no CUDA device")
            else:
                gdev = device if device.type == "cuda" else torch.device("cuda")
                gpu = gpu_forward(gdev, args.gpu_batch, args.gpu_iters)
                print()
                print(f"GPU pure forward, VGG16 conv stack at 1024x768 "
                      f"({gpu[0]['gflop_per_image']:.0f} GFLOP/image; brief's bound "
                      f"~{VGG16_1024x768_GFLOP:.0f}), {info['device_name']}:")
                print(fmt_table([[g["precision"], g["batch"], f"{g['images_per_s']:.1f}",
                                  f"{g['tflop_per_s']:.1f}", f"{g.get('peak_mem_gib', 0):.1f}"]
                                 for g in gpu],
                                ["precision", "batch", "images/s", "TFLOP/s", "peak GiB"]))
        info["loadavg_end"] = list(os.getloadavg())
        print(f"\nload avg at end {info['loadavg_end'][0]:.2f}")

        if args.out:
            result = {
                "machine": info, "argv": sys.argv, "source": source, "images": len(files),
                "config": {"backbone": backbone.name, "weights": cfg["weights"].spec,
                           "layers": list(cfg["layers"]), "poolings": list(cfg["poolings"]),
                           "size": args.size, "batch_size": args.batch_size,
                           "workers": args.workers, "precision": args.precision,
                           "repeat": args.repeat},
                "runs_seconds": runs, "best": best,
                "naive_images": len(naive_files) if base else 0,
                "speedup": (im["images_per_s"] / (base["images"] / base["seconds"])
                            if base else None),
                "vs_plain": im["images_per_s"] / plain_ips,
                "check": check, "check_plain": check_plain, "gpu_forward": gpu,
            }
            Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
            print(f"wrote {args.out}")
    finally:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
