"""Export a network's inference stages to ONNX, checked equal to torch, into the cache.

torch's TorchScript-based exporter (it needs the `onnx` package) writes the graph. Every tap up
to the deepest is an output; height and width stay dynamic (EfficientNet's TF "SAME" padding is traced as a fixed pad
and a size-dependent slice, `effnet_lite.FoldedConv`). Before the model is kept, ONNX Runtime
runs it on inputs of odd and even sizes and every tap must equal torch's within `TOLERANCE`
(relative to the map's largest value); a network that fails is recorded as refused and runs
on torch.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .runtime import CachedNetwork, OnnxStages, cache_dir, onnxruntime_installed

#: Largest relative difference allowed between ONNX Runtime's and torch's feature maps.
TOLERANCE = 1e-4
#: Probe shapes (H, W) of the check: odd and even sides, as stride-2 padding depends on parity.
PROBES = ((67, 90), (96, 73))


class _Taps(nn.Module):
    """The stages in order, returning every tap's output (the exported graph)."""

    def __init__(self, stages: Sequence[nn.Module]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return tuple(out)


def _probe(stages: nn.Module, taps: Sequence[str], runtime: OnnxStages) -> float:
    """The largest relative difference between torch and ONNX Runtime over the probes."""
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for h, w in PROBES:
        x = torch.randn((2, 3, h, w), generator=gen)
        with torch.inference_mode():
            want = stages(x)
        got = runtime.run(x.numpy(), taps, threads=1)
        for a, b in zip(want, got):
            a = a.numpy()
            if a.shape != b.shape:
                return float("inf")
            scale = max(float(np.abs(a).max()), 1e-12)
            worst = max(worst, float(np.abs(a - b).max()) / scale)
    return worst


def export_network(key: str, stages: Sequence[nn.Module], taps: Sequence[str],
                   mean: Sequence[float], std: Sequence[float]) -> CachedNetwork | None:
    """Export `stages` (CPU, eval) under `key` and check them; the cached network, or None when
    ONNX Runtime is missing, the cache cannot be written, or the check failed (recorded)."""
    from importlib.util import find_spec

    if not onnxruntime_installed() or find_spec("onnx") is None:  # the exporter needs onnx
        return None
    folder = cache_dir() / "networks"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=folder)
        os.close(fd)
    except OSError:
        return None
    tmp_path = Path(tmp)
    module = _Taps(stages).eval()
    taps = tuple(taps)
    meta: dict = {"taps": list(taps), "mean": list(mean), "std": list(std)}
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (torch.zeros((1, 3, 64, 64)),), str(tmp_path), dynamo=False,
                              input_names=["x"], output_names=list(taps), opset_version=17,
                              dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}})
        worst = _probe(module, taps, OnnxStages(tmp_path, taps, keep_optimised=False))
        if worst <= TOLERANCE:
            meta.update(verified=True, max_relative_difference=worst)
        else:
            meta.update(verified=False, refused=f"ONNX Runtime differs from torch by {worst:.2g}")
    except Exception as exc:  # an operator the exporter or the runtime lacks: torch runs it
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        meta.update(verified=False, refused=f"export failed: {type(exc).__name__}: {first[:200]}")
    try:
        base = folder / key
        if meta["verified"]:
            tmp_path.chmod(0o644)
            os.replace(tmp_path, base.with_suffix(".onnx"))
        _write_json(base.with_suffix(".json"), meta)
    except OSError:
        return None
    finally:
        tmp_path.unlink(missing_ok=True)
    return CachedNetwork.find(key)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def ensure_exported(backbone, weights, layers: Sequence[str], extractor=None
                    ) -> CachedNetwork | None:
    """The cached export of `backbone` (with `weights`) cut after the deepest of `layers`,
    exported now when it is neither cached nor refused; None when it cannot be (never raises:
    the export only speeds later queries up). `extractor`: a FeatureExtractor whose CPU stages
    can be exported as they are (others are rebuilt on the CPU)."""
    from .backbones import inference_stages, preprocessing
    from .runtime import network_key

    from importlib.util import find_spec

    try:
        order = backbone.layer_names()
        deepest = max(layers, key=order.index)
        identity = f"file:{weights.sha}" if weights.kind == "file" else weights.kind
        key = network_key(backbone.name, identity, deepest)
        cached = CachedNetwork.find(key)
        if cached is not None or CachedNetwork.refused(key) is not None:
            return cached
        if not onnxruntime_installed() or find_spec("onnx") is None:
            return None  # before building anything
        if extractor is not None and extractor.device.type == "cpu" \
                and extractor.stage_names[-1] == deepest:
            names, stages = list(extractor.stage_names), list(extractor.stages)
        else:
            named = inference_stages(backbone, weights)[:order.index(deepest) + 1]
            names, stages = [n for n, _ in named], [m for _, m in named]
        mean, std = preprocessing(backbone, weights)
        return export_network(key, stages, names, mean, std)
    except Exception:  # noqa: BLE001 - an optional speed-up must never fail the command
        return None
