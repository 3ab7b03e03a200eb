"""Every ingest setting with its default, in one light module: the library, the Ray executor and
the command line (whose option defaults are these) read them from here."""

from __future__ import annotations

import os
from dataclasses import dataclass

#: decoding threads: the cores, at most 8
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


@dataclass
class IngestOptions:
    """Every ingest setting, as given on the command line."""

    backbone: str = "vgg16"
    weights: str = "imagenet"
    layers: str | None = None
    poolings: str | None = None
    size: str = "max:1024"
    scales: tuple[float, ...] = (1.0,)
    device: str = "auto"
    batch_size: int = 64  # at most this many images per forward
    workers: int = DEFAULT_WORKERS  # decode threads
    precision: str = "fp32"
    max_pixels: int = 120_000_000
    commit_seconds: float = 2.0
    keep_local: tuple[str, ...] = ()
    # local features kept for geometric verification: sift | none; None: sift for a new
    # extractor (none with device decoding), what an existing extractor keeps otherwise
    verify_features: str | None = None
    retry_failed: bool = False
    batch_pixels: int = 0  # pixel budget of a batch; 0: 2^18 on a CPU, 2^24 on CUDA
    buckets: int = 0  # pad images to multiples of N px and batch them (0: equal shapes only)
    decode: str = "cpu"  # cpu | gpu (JPEGs decoded on the CUDA device, others on the CPU)
    forward_threads: int = 0  # batches computed at once; 0: two on a CPU, one on CUDA (_threads)
    torch_threads: int = 0  # intra-op threads per forward; 0: cores / forward_threads
    keep_freed_memory: bool = True  # glibc reuses freed memory (stages.keep_freed_memory)
