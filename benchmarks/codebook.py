#!/usr/bin/env python
"""Codebook methods: time per image of each method and mask, against a naive baseline.

One ingest keeps the local features of a layer with every mask (none, max, sum, sift). For each
mask and method the script fits a codebook (timed), then encodes every image twice, in the same
process:

naive   one image at a time through imgdb.codebooks.reference's set functions in float64 on the
        CPU (vlad(); LocalPCA + TembModel.transform then democratic() or a sum; fisher_vector()),
        then post_process -- the straightforward reading of the papers' formulas.
imgdb   imgdb.codebooks.encoder: the features of many images in one device pass (float32), sums
        with index_add, the democratic Sinkhorn per image on the device.

The vectors of the two must agree (the worst cosine distance is printed), so a speed-up cannot
hide a wrong answer. Masks cut the number of local features, hence the cost (Hoang sec.5.4,
Fig.6): the table shows features per image beside the time.

Examples:
  python benchmarks/codebook.py --limit 200 --size fixed:512
  python benchmarks/codebook.py --images /path/to/photos --layer block5 --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imgdb.codebooks import reference as ref  # noqa: E402
from imgdb.codebooks.encode import run_encode  # noqa: E402
from imgdb.codebooks.fit import CodebookOptions, fit_codebook  # noqa: E402
from imgdb.codebooks.training import LocalPCA, TembModel, post_process  # noqa: E402
from imgdb.numeric import l2_normalize  # noqa: E402
from imgdb.store import open_read  # noqa: E402

COIL = ROOT / "tests" / "data" / "coil20" / "images"  # the tests' 243-image COIL-20 subset
MASKS = ("", ":max", ":sum", ":sift")
METHODS = {  # name -> (fit options, aggregate)
    "vlad (Ng: k=100, whitened to 128-D)": (dict(method="vlad"), "sum"),
    "temb+democratic (Hoang, d=32 k=20, rotation)": (dict(method="temb", preset="hoang-512"),
                                                     "democratic"),
    "temb+sum (same codebook)": (None, "sum"),
    "fv (improved, d=48, k=44)": (dict(method="fv"), "sum"),
}


def naive_vector(x: np.ndarray, arrays: dict, attrs: dict, aggregate: str) -> np.ndarray:
    """One image, float64, the paper-literal set functions (imgdb.codebooks.reference)."""
    x = x.astype(np.float64)
    method = attrs["method"]
    if method == "vlad":
        x = l2_normalize(x)
    if "pca_components" in arrays:
        x = LocalPCA.from_arrays({"mean": arrays["pca_mean"],
                                  "components": arrays["pca_components"]}).transform(x)
    if method == "vlad":
        agg = ref.vlad(x, arrays["centroids"].astype(np.float64))
    elif method == "temb":
        tm = TembModel.from_arrays({"centroids": arrays["centroids"], "mean": arrays["temb_mean"],
                                    "projection": arrays["temb_projection"],
                                    "eigenvalues": arrays["temb_eigenvalues"]})
        phi = tm.transform(x)
        agg = ref.democratic(phi) if aggregate == "democratic" else ref.sum_aggregate(phi)
    else:
        agg = ref.fisher_vector(x, arrays["gmm_weights"], arrays["gmm_means"],
                                arrays["gmm_variances"])
    rot = ({k: arrays[f"rotation_{aggregate}_{k}"] for k in ("mean", "projection")}
           if int(attrs["rotate"]) else None)
    return post_process(agg, rot, float(attrs["power"]) or None, int(attrs["drop"]))[None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=COIL,
                    help="folder of images (default: the COIL-20 subset in tests/data)")
    ap.add_argument("--limit", type=int, default=200, help="images, spread over the folder")
    ap.add_argument("--size", default="fixed:512")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--layer", default="block5")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--naive-limit", type=int, default=50, help="images for the naive baseline")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="imgdb-cb-"))
    files = sorted(p for p in args.images.iterdir() if p.is_file())
    step = max(1, len(files) // args.limit)
    photos = work / "photos"
    photos.mkdir()
    for p in files[::step][: args.limit]:
        shutil.copy2(p, photos)
    db = work / "b.h5"
    keep = sum((["--keep-local", args.layer + m] for m in MASKS), [])
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "imgdb", "ingest", str(photos), "--db", str(db), "-b",
                    args.backbone, "--size", args.size, "--layers", args.layer, "--pooling", "sum",
                    "--device", args.device, "--quiet", *keep], check=True)
    ingest_s = time.perf_counter() - t
    rows_out = []
    for mask in MASKS:
        key = args.layer + mask
        with open_read(db) as view:
            info = view.local(key)
            start, count = view.local_spans(info)
            ok = view.local_usable_rows(info)
            per_image = float(count[ok].mean())
            sets = {r: f for r, f, _ in view.iter_local(info, ok)}
        version = model = None
        for label, (fit_kw, aggregate) in METHODS.items():
            fit_s = 0.0
            if fit_kw is not None:
                t = time.perf_counter()
                if fit_kw.get("method") == "temb":  # the rotation needs > 2 x drop images
                    fit_kw = {**fit_kw, "drop": min(128, (len(ok) - 1) // 2)}
                if fit_kw.get("method") == "vlad":  # and more images than whitened dims
                    fit_kw = {**fit_kw, "dims": min(128, len(ok) - 1)}
                model = fit_codebook(db, key, CodebookOptions(device=args.device, **fit_kw))
                fit_s = time.perf_counter() - t
                version = model.version
            t = time.perf_counter()
            summary = run_encode(db, version, None, aggregate, "model", args.device)
            enc_s = time.perf_counter() - t
            with open_read(db) as view:
                arrays, attrs = view.model_arrays(model), model.attrs
                stored = view.vectors(view.descriptor(summary.descriptor))
            sample = ok[np.linspace(0, len(ok) - 1, min(args.naive_limit, len(ok))).astype(int)]
            t = time.perf_counter()
            naive = np.concatenate([naive_vector(sets[r], arrays, attrs, aggregate) for r in sample])
            naive_s = (time.perf_counter() - t) / len(sample)
            worst = float(1 - (naive * stored[sample]).sum(1).min())
            ms = 1000 * enc_s / max(summary.encoded, 1)
            rows_out.append({"mask": mask[1:] or "none", "method": label,
                             "features_per_image": round(per_image, 1), "fit_s": round(fit_s, 2),
                             "encode_ms_per_image": round(ms, 3),
                             "naive_ms_per_image": round(1000 * naive_s, 3),
                             "speedup": round(1000 * naive_s / ms, 1) if ms else None,
                             "dims": summary.dims, "worst_cosine_distance": worst})
            print(json.dumps(rows_out[-1]), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "device": args.device,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "images": len(list(photos.iterdir())), "size": args.size, "backbone": args.backbone,
            "layer": args.layer, "ingest_s_all_masks": round(ingest_s, 1)}
    print(json.dumps(meta))
    print("\n| mask | method | features/image | fit s | imgdb ms/image | naive ms/image | speed-up | worst cos dist |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['mask']} | {r['method']} | {r['features_per_image']} | {r['fit_s']} | "
              f"{r['encode_ms_per_image']} | {r['naive_ms_per_image']} | {r['speedup']}x | "
              f"{r['worst_cosine_distance']:.1e} |")
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows_out}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
