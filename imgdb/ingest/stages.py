"""The units the local executor drives: each has one job and knows nothing of the others.

- `PixelBatcher`: decoded images -> batches of one shape, cut by a pixel budget (many small
  images per forward, few large ones), with bounded waiting (memory stays flat);
- `CommitThread`: store commits on a thread of their own while the next batches compute; a
  failure is raised, as it was, on the caller's next call;
- `keep_freed_memory`, `torch_threads`: process settings a CPU forward needs (see each).

Discovery and decoding live in `features/images.py`, the forward and pooling in
`features/extract.py`, the order of commits in `pipeline.py` (the executor).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator

from ..errors import StoreError

#: Default pixel budget of a batch on the CPU and on CUDA (see `default_batch_pixels`).
CPU_BATCH_PIXELS = 1 << 18
CUDA_BATCH_PIXELS = 1 << 24


def default_batch_pixels(device_type: str) -> int:
    """Pixels per batch when none is given: on a CPU a batch only needs to amortise the
    per-call overhead (larger ones gain nothing and cost memory); a GPU needs many images."""
    return CUDA_BATCH_PIXELS if device_type == "cuda" else CPU_BATCH_PIXELS


@dataclass
class Batch:
    """Items of one shape key, in arrival order, and their pixel count."""

    key: Hashable
    items: list = field(default_factory=list)
    pixels: int = 0


class PixelBatcher:
    """Groups items by shape key; a group goes out when the next item would take it past
    `budget` pixels, when it holds `max_images`, or, oldest group first, when more than
    `window` images or `window_pixels` pixels wait (a rare shape waits a bounded time)."""

    def __init__(self, budget: int, max_images: int = 64, window: int = 256,
                 window_pixels: int | None = None) -> None:
        if budget < 1 or max_images < 1 or window < 1:
            raise ValueError("budget, max_images and window must be >= 1")
        self.budget, self.max_images, self.window = budget, max_images, window
        self.window_pixels = window_pixels if window_pixels is not None else 4 * budget
        self.groups: OrderedDict[Hashable, Batch] = OrderedDict()  # oldest first
        self.waiting = 0
        self.waiting_pixels = 0

    def add(self, item: Any, key: Hashable, pixels: int) -> list[Batch]:
        """Queue one item of `pixels` pixels under `key`; return the batches now complete."""
        ready: list[Batch] = []
        group = self.groups.get(key)
        if group is not None and group.pixels + pixels > self.budget:
            ready.append(self._pop(key))
            group = None
        if group is None:
            group = self.groups[key] = Batch(key)
        group.items.append(item)
        group.pixels += pixels
        self.waiting += 1
        self.waiting_pixels += pixels
        if len(group.items) >= self.max_images or group.pixels >= self.budget:
            ready.append(self._pop(key))
        while self.groups and (self.waiting > self.window
                               or self.waiting_pixels > self.window_pixels):
            ready.append(self._pop(next(iter(self.groups))))
        return ready

    def drain(self) -> list[Batch]:
        """Every waiting group, oldest first (the end of the input)."""
        return [self._pop(k) for k in list(self.groups)]

    def _pop(self, key: Hashable) -> Batch:
        group = self.groups.pop(key)
        self.waiting -= len(group.items)
        self.waiting_pixels -= group.pixels
        return group


class CommitThread:
    """Runs `commit(*args)` jobs in order on one thread, at most `depth` waiting.

    `put` blocks while the queue is full (memory stays bounded) and raises the first failure
    of an earlier job; `close` waits for every queued job and raises that failure too. After a
    failure no later job runs (commits are ordered: a gap is not allowed)."""

    def __init__(self, commit: Callable[..., Any], depth: int = 2) -> None:
        self._commit = commit
        self._jobs: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.error: BaseException | None = None
        self.failed = False
        self.done = 0
        self._thread = threading.Thread(target=self._run, name="imgdb-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self.error is not None or self.failed:
                continue  # drain without running: the store refused an earlier commit
            try:
                self._commit(*job)
                self.done += 1
            except BaseException as exc:  # raised on the caller's thread
                self.error = exc

    def put(self, *args: Any) -> None:
        """Queue one commit (blocks while `depth` are waiting)."""
        self._raise()
        while True:
            try:
                self._jobs.put(args, timeout=0.1)
                return
            except queue.Full:
                self._raise()

    def close(self) -> None:
        """Wait for every queued commit; raise the first failure."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            # Raised once as itself; the thread forgets it, so no reference cycle (exception ->
            # traceback -> caller's frame -> this object -> exception) keeps the failed commit's
            # frames and their HDF5 objects alive until interpreter shutdown.
            error, self.error = self.error, None
            self.failed = True
            raise error
        if self.failed:
            raise StoreError("an earlier commit failed; nothing after it was committed")


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_kept = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (raise its mmap and trim thresholds); True when
    applied. Process-wide and not undone.

    A forward allocates and frees tens of MB per layer; by default glibc serves each such block
    with a fresh mmap and returns it at free, so every layer's output is page-faulted in again
    (measured: about half of a CPU forward of EfficientNet-Lite0, see benchmarks/RESULTS-ingest.md).
    With the thresholds raised, memory is reused; the process keeps its peak (bounded by the
    pixel budget) instead of returning it between batches. No-op without glibc's mallopt."""
    global _kept
    if _kept:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # glibc caps the mmap threshold (32 MiB on 64-bit builds): try 1 GiB, then the cap
    ok = any(mallopt(_M_MMAP_THRESHOLD, v) for v in (1 << 30, 32 << 20))
    ok = ok and bool(mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
    _kept = ok
    return ok


@contextlib.contextmanager
def torch_threads(intra: int) -> Iterator[None]:
    """torch's intra-op thread count set to `intra` (0: unchanged) for the block, then restored."""
    import torch

    old = torch.get_num_threads()
    if intra > 0 and intra != old:
        torch.set_num_threads(intra)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


__all__ = ["Batch", "PixelBatcher", "CommitThread", "keep_freed_memory", "torch_threads",
           "default_batch_pixels", "CPU_BATCH_PIXELS", "CUDA_BATCH_PIXELS"]
