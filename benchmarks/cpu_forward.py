#!/usr/bin/env python
"""The CPU forward alone, three ways, on real inputs: eager modules, every convolution as a fused
oneDNN primitive, and that with 1x1 convolutions as GEMMs (imgdb's path, features/onednn.py).

The inputs are the 55 Oxford query crops decoded as ingest decodes them (`max:512`, 52 distinct
shapes), run as ingest runs them on a CPU: two threads, one forward each at a time, one torch
thread each, channels-last. The variants alternate within one process, round after round; the
maps of each variant are compared with the eager ones first.

  python benchmarks/cpu_forward.py --rounds 8 [--backbone efficientnet_lite0] [--out r.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from imgdb.features import onednn  # noqa: E402
from imgdb.features.backbones import get_backbone, inference_stages, parse_weights  # noqa: E402
from imgdb.features.images import SizePolicy, discover, iter_decoded  # noqa: E402

CROPS = REPO / "tests" / "data" / "oxford5k" / "query_crops"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if onednn.FUSED_CONV is None:
        sys.exit("this torch build has no fused oneDNN convolution")
    torch.set_num_threads(1)
    files = [Path(f) for f in discover([CROPS]).files]
    inputs = [torch.from_numpy(np.ascontiguousarray(d.pixels[0]))[None]
              for _, _, d in iter_decoded(files, SizePolicy.parse("max:512"), workers=0)]
    weights = parse_weights("imagenet" if "efficientnet" in args.backbone else "none")
    stages = [m for _, m in inference_stages(get_backbone(args.backbone), weights)]
    fused = onednn.FUSED_CONV
    variants = {"eager": (None, True), "onednn": (fused, False), "onednn+gemm": (fused, True)}

    def use(name: str) -> None:
        onednn.FUSED_CONV, onednn.GEMM_1X1 = variants[name]

    def forward(px: torch.Tensor) -> torch.Tensor:
        x = px.permute(0, 3, 1, 2).float()
        with torch.inference_mode():
            for stage in stages:
                x = stage(x)
        return x

    def two_threads() -> float:
        def work(part):
            torch.set_num_threads(1)
            for px in part:
                forward(px)
        threads = [threading.Thread(target=work, args=(inputs[i::2],)) for i in range(2)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - started

    gaps = {}
    use("eager")
    reference = [forward(px) for px in inputs[:4]]
    for name in variants:
        use(name)
        gaps[name] = max(float((forward(px) - r).abs().max() / r.abs().max())
                         for px, r in zip(inputs, reference))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name in (list(variants) if r % 2 else list(variants)[::-1]):
            use(name)
            times[name].append(two_threads())
    use("onednn+gemm")
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, load "
                         f"{os.getloadavg()[0]:.1f}, torch {torch.__version__}",
              "backbone": args.backbone, "images": len(inputs),
              "seconds_median": {k: round(statistics.median(v), 3) for k, v in times.items()},
              "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
              "max_relative_gap_to_eager": gaps}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
