#!/usr/bin/env python
"""torch against ONNX Runtime on the same exported stages, on this machine's CPU.

The question: should ingest run its CPU forward on ONNX Runtime (the runtime the cold query path
uses, features.runtime) instead of torch? Both run the identical BatchNorm-folded stages (ONNX
Runtime's copy is the export that passed the equality check), on the same inputs, alternating
within one process, torch with imgdb's allocator setting (ingest.stages.keep_freed_memory) and
its input laid out as ingest lays it out (channels-last, from the HWC pixels), ONNX Runtime with
contiguous NCHW input. Reported: median ms per image of each, and their ratio.

    python benchmarks/runtimes.py                       # Lite0, ResNet-50, GoogLeNet, VGG16
    python benchmarks/runtimes.py --backbones efficientnet_lite0 --rounds 7
"""

from __future__ import annotations

import argparse
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

#: (backbone, deepest tap, weights): ImageNet weights where they install with pip, else random
#: (speed does not depend on the values).
NETWORKS = {"efficientnet_lite0": ("head", "imagenet"), "resnet50": ("layer4", "none"),
            "googlenet": ("inception5b", "none"), "vgg16": ("conv5_3", "none")}
#: (batch, height, width): COIL-sized batches, and single photos at max:512 (mixed shapes run
#: one at a time).
SHAPES = ((16, 128, 128), (1, 384, 512), (4, 384, 512))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default=",".join(NETWORKS))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("IMGDB_CACHE_DIR", tempfile.mkdtemp(prefix="imgdb-runtimes-"))
    from imgdb.ingest.stages import keep_freed_memory

    keep_freed_memory()
    import torch

    from imgdb.features.backbones import get_backbone, inference_stages, parse_weights
    from imgdb.features.onnx_export import ensure_exported
    from imgdb.features.runtime import OnnxStages

    threads = torch.get_num_threads()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} cores, "
          f"{threads} threads each, load {os.getloadavg()[0]:.2f}; median of {args.rounds} "
          f"alternating rounds, ms per image")
    print("| backbone | batch x H x W | torch | ONNX Runtime | torch / ORT |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name in args.backbones.split(","):
        tap, w = NETWORKS[name]
        backbone, weights = get_backbone(name), parse_weights(w)
        named = inference_stages(backbone, weights)
        deepest = [n for n, _ in named].index(tap)
        stages = torch.nn.Sequential(*[m for _, m in named[:deepest + 1]]).eval()
        cached = ensure_exported(backbone, weights, (tap,))
        if cached is None:
            print(f"| {name} | (not exportable) | | | |")
            continue
        ort = OnnxStages(cached.model, cached.taps)
        for b, h, wd in SHAPES:
            x = np.random.default_rng(0).standard_normal((b, 3, h, wd)).astype(np.float32)
            # ingest's input: uint8 HWC permuted to NCHW, i.e. laid out channels-last
            xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)

            def run_torch() -> None:
                with torch.inference_mode():
                    stages(xt)

            def run_ort() -> None:
                ort.run(x, [tap], threads)

            times: dict[str, list[float]] = {"torch": [], "ort": []}
            run_torch(), run_ort()  # warm
            for _ in range(args.rounds):
                for key, fn in (("torch", run_torch), ("ort", run_ort)):
                    t = time.perf_counter()
                    fn()
                    times[key].append((time.perf_counter() - t) * 1000 / b)
            tt, to = statistics.median(times["torch"]), statistics.median(times["ort"])
            print(f"| {name} | {b} x {h} x {wd} | {tt:.1f} | {to:.1f} | {tt / to:.2f} |")


if __name__ == "__main__":
    main()
