"""Ingest: files -> decoded images -> batched forward -> pooled vectors -> store commits.

The work list is planned against the store (new, changed, not yet computed for this extractor,
or failed transiently). The local executor drives the stages (`stages.py`): decode workers
(threads; Pillow releases the GIL), a pixel-budget batcher, the forward (one per batch for every
layer and pooling; on this thread, or on `forward_threads` worker threads), a reorder buffer,
and a writer thread that commits rows in discovery order while the next batches compute, so an
interrupted run followed by a rerun leaves exactly the rows an uninterrupted run would have
written. Every queue is bounded.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import InvalidRequest, UserError, refuse
from ..features.images import (DEFAULT_MIN_SIDE, DecodedImage, ImageError, SizePolicy,
                               iter_decoded)
from ..store import (FAILURE_PERMANENT, FAILURE_TRANSIENT, STATE_COMPUTED, STATE_FAILED,
                     STATE_FAILED_TRANSIENT, STATE_PENDING, STATUS_FAILED, STATUS_OK, ImageRow,
                     RowUpdate, StoreWriter, verify_key)
from .backfill import backfill_verify, keypoints_or_none, verify_channels
from .plan import IngestOptions, IngestSummary, WorkItem, plan
from .setup import (ExtractorSetup, extractor_settings, find_files, grow, resolve_setup,
                    start_run)
from .stages import (Batch, CommitThread, PixelBatcher, default_batch_pixels, keep_freed_memory,
                     torch_threads)


def failure_update(item: WorkItem, error: ImageError, known: ImageRow | None) -> RowUpdate:
    """The row to record for a file that failed.

    A failure that depends on this extractor's settings, or any failure of a file that is
    unchanged and fine for other extractors, is recorded against this extractor only; other
    failures mark the file itself (permanent: not retried until it changes; transient: retried).
    """
    state = STATE_FAILED_TRANSIENT if error.transient else STATE_FAILED
    if known is not None and known.status == STATUS_OK and item.reason in ("compute", "retry"):
        return RowUpdate(item.row, known, state, str(error))
    size, mtime = error.file_size, error.mtime
    if size is None:
        try:
            st = item.path.stat()
            size, mtime = st.st_size, st.st_mtime
        except OSError:
            size, mtime = 0, 0.0
    if error.scope == "extractor":
        return RowUpdate(item.row, ImageRow(str(item.path), size, mtime, error.sha or "", 0, 0,
                                            STATUS_OK), state, str(error))
    failure = FAILURE_TRANSIENT if error.transient else FAILURE_PERMANENT
    return RowUpdate(item.row, ImageRow(str(item.path), size, mtime, error.sha or "", 0, 0,
                                        STATUS_FAILED, str(error), failure), STATE_PENDING)


def run_ingest(paths: Sequence[str | Path], db: str | Path, options: IngestOptions,
               progress: Callable[[int, int], None] | None = None,
               on_start: Callable[[int], None] | None = None) -> IngestSummary:
    """Ingest image files/folders into the store; returns the run's summary.

    `progress(done, total)` is called as images are committed; `on_start(total)` once planned.
    """
    from ..features.extract import resolve_device

    started = time.perf_counter()
    db = Path(db)
    setup = resolve_setup(options)
    _check_options(options, setup.local_specs)
    device = resolve_device(options.device)
    if options.decode == "gpu":
        from ..features.gpu_decode import check_gpu_decode

        check_gpu_decode(device)
    roots, files, problems = find_files(paths)

    extractor = None
    if not db.exists() and files:  # a network that cannot load leaves no empty store behind
        extractor = _build_extractor(setup, setup.layers, setup.poolings, setup.local_specs,
                                     device, options)
    writer = StoreWriter(db)
    try:
        with writer:
            existing = writer.settings(setup.name)
            outputs = grow(setup, existing)
            layers, requested = outputs.layers, outputs.poolings
            start = start_run(writer, setup, files, roots, problems, options, on_start)
            table, work, summary = start.table, start.work, start.summary
            if not work and not outputs.adds:
                summary.seconds = time.perf_counter() - started
                return summary
            if extractor is None or extractor.layers != layers or extractor.poolings != requested:
                extractor = _build_extractor(setup, layers, requested, outputs.local_specs,
                                             device, options)
            settings = extractor_settings(setup, outputs, extractor.poolings, options)
            if writer.ensure_extractor(setup.name, settings, extractor.output_dims(),
                                       local={**extractor.local_channels(),
                                              **verify_channels(outputs.verify)}) and existing:
                # new datasets reset every row of this extractor to pending: plan again
                work, _, summary.unchanged = plan(writer.images(), writer.state(setup.name),
                                                  files, roots, options.retry_failed)
                summary.count(work)
                if on_start:
                    on_start(len(work))
            forward_threads, intra = _threads(options, device)
            if options.keep_freed_memory and device.type == "cpu":
                keep_freed_memory()
            with torch_threads(intra):
                _pipeline(work, table, writer, extractor, setup.name, setup.policy, setup.scales,
                          options, summary, progress, forward_threads, outputs.verify)
            if outputs.verify is not None:  # rows computed before the extractor kept them
                summary.keypoints_added = backfill_verify(writer, setup.name, outputs.verify,
                                                          setup.policy, setup.scales, options)
    except BaseException:
        writer.discard_if_empty()
        raise
    summary.seconds = time.perf_counter() - started
    if not options.buckets:  # once per machine and network: later queries run without torch
        from ..features.onnx_export import ensure_exported

        ensure_exported(setup.backbone, setup.weights, layers, extractor)
    return summary


def _build_extractor(setup: ExtractorSetup, layers, poolings, local_specs, device,
                     options: IngestOptions):
    from ..features.extract import FeatureExtractor

    return FeatureExtractor(setup.backbone, setup.weights, layers, poolings, device,
                            options.precision, local=local_specs, bucket=options.buckets)


def _check_options(options: IngestOptions, local_specs) -> None:
    """One-line errors for settings that cannot work (before anything is built)."""
    if options.decode not in ("cpu", "gpu"):
        raise UserError(f"unknown decoder {options.decode!r}; use cpu or gpu")
    if options.buckets < 0 or options.batch_pixels < 0 or options.batch_size < 1:
        raise UserError("buckets and batch pixels must be >= 0 and the batch size >= 1")
    if options.forward_threads < 0 or options.torch_threads < 0:
        raise UserError("forward threads and torch threads must be >= 0 (0: automatic)")
    if options.buckets and local_specs:
        raise refuse("{buckets} cannot be combined with {keep_local} (kept cells must be each "
                     "image's own grid)", "buckets", "keep_local")


def _threads(options: IngestOptions, device) -> tuple[int, int]:
    """(forward threads, torch intra-op threads per forward) for this run.

    Default on a CPU with 2 or more cores: two forwards at once, each on half the cores; one
    512-px forward at a time on two OpenMP threads spends much of its time at the barriers of
    small deep-layer operators, two single-threaded forwards do not (Oxford crops at max:512:
    2.33-2.63 s against 2.95-4.12 s, benchmarks/RESULTS-ingest.md). Vectors depend on how a run
    cut its batches at ~1e-5 either way (oneDNN rounds differently with the batch size on some
    CPUs), so a resumed run equals an uninterrupted one to that precision, not bit for bit.
    On CUDA (or one core): one forward at a time."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = max(1, cores or 1)
    forward = options.forward_threads or (2 if device.type == "cpu" and cores >= 2 else 1)
    intra = options.torch_threads or (0 if device.type == "cuda" else max(1, cores // forward))
    return forward, intra


def _known_row(table, row: int | None) -> ImageRow | None:
    if row is None:
        return None
    return ImageRow(table.path[row], int(table.size[row]), float(table.mtime[row]),
                    table.sha[row].decode(), int(table.width[row]), int(table.height[row]),
                    int(table.status[row]), table.error[row], int(table.failure[row]))


@dataclass
class _Item:
    """One image at one scale on its way to a forward: pixels, or a JPEG for the device."""

    seq: int
    scale: int
    height: int
    width: int
    pixels: np.ndarray | None = None
    job: dict | None = None  # gpu_decode's DEVICE_JPEG entry
    keypoints: np.ndarray | None = None  # for the sift mask


@dataclass
class _Done:
    """A forward's outcome: pooled vectors (on their way to the host), kept cells, and the
    images the device decoder refused that failed on the CPU too."""

    batch: Batch
    pooled: object  # features.extract.PooledBatch
    local: dict | None
    failed: dict[int, ImageError]


class _Forward:
    """The forward stage: a batch of items -> one input tensor (pinned on CUDA, padded to its
    bucket) -> one forward and every pooling on the device -> an asynchronous copy back."""

    def __init__(self, extractor, policy: SizePolicy, scales: tuple[float, ...],
                 options: IngestOptions) -> None:
        self.extractor = extractor
        self.cuda = extractor.device.type == "cuda"
        self.policy, self.scales, self.options = policy, scales, options

    def __call__(self, batch: Batch) -> _Done:
        import torch

        items: list[_Item] = batch.items
        hb, wb = batch.key
        sizes = [(it.height, it.width) for it in items]
        padded = any(s != (hb, wb) for s in sizes)
        failed: dict[int, ImageError] = {}
        host = [it for it in items if it.pixels is not None]
        if not padded and len(host) == len(items):
            if self.cuda:  # stacked straight into page-locked memory: one copy, then async
                x = torch.empty((len(items), hb, wb, 3), dtype=torch.uint8, pin_memory=True)
                np.stack([it.pixels for it in items], out=x.numpy())
            else:
                x = torch.from_numpy(np.stack([it.pixels for it in items]))
        else:
            x = torch.zeros((len(items), hb, wb, 3), dtype=torch.uint8, pin_memory=self.cuda)
            view = x.numpy()
            for i, it in enumerate(items):
                if it.pixels is not None:
                    view[i, :it.height, :it.width] = it.pixels
        if len(host) < len(items):  # JPEGs decoded on the device
            x = x.to(self.extractor.device, non_blocking=True)
            self._device_decode(items, x, failed)
        if self.extractor.local:
            keypoints = ([it.keypoints for it in items]
                         if any(s.mask == "sift" for s in self.extractor.local) else None)
            out, local = self.extractor.extract(x, keypoints)
            return _Done(batch, _Ready(out), local, failed)
        return _Done(batch, self.extractor.pool_batch(x, sizes if padded else None), None, failed)

    def _device_decode(self, items: list[_Item], x, failed: dict[int, ImageError]) -> None:
        import torch

        from ..features.gpu_decode import decode_on_device, decode_on_host

        idx = [i for i, it in enumerate(items) if it.pixels is None]
        try:
            decoded = decode_on_device([items[i].job for i in idx], [items[i].scale for i in idx],
                                       self.extractor.device)
        except RuntimeError:  # one bad file fails the whole call: decode these on the CPU
            decoded = []
            for i in idx:
                it = items[i]
                image = decode_on_host(it.job["path"], self.policy, self.scales,
                                       self.options.max_pixels, DEFAULT_MIN_SIDE)
                if isinstance(image, ImageError):
                    failed[it.seq] = image
                    decoded.append(None)
                else:
                    decoded.append(torch.from_numpy(image.pixels[it.scale]).to(x.device))
        for i, px in zip(idx, decoded):
            if px is not None:
                it = items[i]
                x[i, :it.height, :it.width] = px


class _Ready:
    """Vectors already on the host (the keep-local path), with PooledBatch's interface."""

    def __init__(self, out: dict) -> None:
        self.out = out

    def result(self) -> dict:
        return self.out


class _Forwards:
    """Forwards in flight, in submission order: one at a time on this thread (the finished one
    is applied after the next is launched, so on CUDA its copy back overlaps it), or up to
    `threads` on a pool whose threads keep this thread's torch thread count."""

    def __init__(self, forward: _Forward, threads: int, apply: Callable[[_Done], None]) -> None:
        import torch

        self.forward, self.threads, self.apply = forward, threads, apply
        self.inflight: deque[Future] = deque()
        # OpenMP keeps the thread count per thread, and a new thread's default (all cores)
        # would give every GEMM a team of its own (oversubscribed)
        self.pool = (ThreadPoolExecutor(max_workers=threads, thread_name_prefix="imgdb-forward",
                                        initializer=torch.set_num_threads,
                                        initargs=(torch.get_num_threads(),))
                     if threads > 1 else None)

    def submit(self, batch: Batch) -> None:
        if self.pool is None:
            done: Future = Future()
            done.set_result(self.forward(batch))
            self.inflight.append(done)
            while len(self.inflight) > 1:
                self.apply(self.inflight.popleft().result())
            return
        self.inflight.append(self.pool.submit(self.forward, batch))
        while self.inflight and (len(self.inflight) > self.threads or self.inflight[0].done()):
            self.apply(self.inflight.popleft().result())

    def drain(self) -> None:
        """Apply every forward still in flight."""
        while self.inflight:
            self.apply(self.inflight.popleft().result())

    def salvage(self) -> None:
        """After an interruption: stop the pool, apply the forwards that finished."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        while self.inflight:
            fut = self.inflight.popleft()
            if not fut.cancelled() and fut.exception() is None:
                self.apply(fut.result())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


class _Reorder:
    """Each image's outcome, gathered over its scales from forwards that finish in any order,
    released in discovery order (so an interrupted run keeps a prefix of the work list)."""

    def __init__(self, work: list[WorkItem], table, extractor, n_scales: int,
                 vkey: str | None) -> None:
        self.work, self.table, self.n_scales, self.vkey = work, table, n_scales, vkey
        self.keys = list(extractor.output_dims())
        self.local_keys = [spec.key for spec in extractor.local]
        # seq -> (update, vectors per scale, scales done)
        self.results: dict[int, tuple[RowUpdate, dict | None, int]] = {}
        self.local_parts: dict[int, dict[str, list]] = {}
        self.keypoints: dict[int, object] = {}  # seq -> verification LocalSet
        self.next = 0

    def decoded(self, seq: int, path: Path, item: DecodedImage | ImageError) -> bool:
        """Record a decode; True when the image goes on to the forward."""
        w = self.work[seq]
        if isinstance(item, ImageError):
            self.results[seq] = (failure_update(w, item, _known_row(self.table, w.row)), None, 0)
            return False
        self.results[seq] = (RowUpdate(w.row, ImageRow(str(path), item.file_size, item.mtime,
                                                       item.sha, item.width, item.height,
                                                       STATUS_OK)), None, 0)
        if self.vkey is not None:
            self.keypoints[seq] = item.extras.get("verify")
        return True

    def apply(self, done: _Done) -> None:
        """Take a finished forward's vectors (and kept cells) for each of its images."""
        out = done.pooled.result()  # CUDA: the batch's one synchronisation
        for i, it in enumerate(done.batch.items):
            seq = it.seq
            if seq not in self.results:
                continue  # already released as failed (another scale failed to decode)
            update, acc, count = self.results[seq]
            if seq in done.failed:
                w = self.work[seq]
                self.results[seq] = (failure_update(w, done.failed[seq],
                                                    _known_row(self.table, w.row)), None, 0)
                continue
            if update.state != STATE_COMPUTED:
                continue  # another scale of this image failed
            if self.local_keys:
                parts = self.local_parts.setdefault(
                    seq, {k: [None] * self.n_scales for k in self.local_keys})
                for k in self.local_keys:
                    parts[k][it.scale] = done.local[k][i]
            if acc is None:
                acc = {k: [None] * self.n_scales for k in self.keys}
            for k in self.keys:
                acc[k][it.scale] = out[k][i]
            self.results[seq] = (update, acc, count + 1)

    def release(self) -> list[tuple[int, RowUpdate, dict | None, dict | None]]:
        """The complete outcomes next in discovery order: (seq, update, vectors, local sets)."""
        from ..features.localset import LocalSet
        from ..numeric import merge_scales

        out = []
        while self.next in self.results:
            seq = self.next
            update, acc, count = self.results[seq]
            if update.state == STATE_COMPUTED and count < self.n_scales:
                break
            del self.results[seq]
            if acc is not None:
                acc = {k: merge_scales(v) for k, v in acc.items()}
            parts = self.local_parts.pop(seq, None)
            sets = {k: LocalSet.concat(v) for k, v in parts.items()} if parts else {}
            if self.vkey is not None:
                sets[self.vkey] = self.keypoints.pop(seq, None)
            out.append((seq, update, acc, sets or None))
            self.next += 1
        return out


class _Commits:
    """Released outcomes buffered into one commit every `commit_seconds` (or when forced), on
    a writer thread while the next batches compute; counts them into the summary."""

    def __init__(self, writer: StoreWriter, extractor, extractor_name: str,
                 work: list[WorkItem], vkey: str | None, options: IngestOptions,
                 summary: IngestSummary, progress: Callable[[int, int], None] | None) -> None:
        self.work, self.options, self.summary, self.progress = work, options, summary, progress
        self.dims = extractor.output_dims()
        self.local_keys = [spec.key for spec in extractor.local] + ([vkey] if vkey else [])
        self.buffer: list[tuple[int, RowUpdate, dict | None, dict | None]] = []
        self.last = time.monotonic()
        self.committed = 0  # rows the writer thread has committed
        self.reported = -1

        def commit(updates, vectors, changed, local, n) -> None:  # on the writer thread
            writer.commit(extractor_name, updates, vectors, file_changed=changed, local=local)
            self.committed += n

        self.thread = CommitThread(commit, depth=2)

    def add(self, released: list, force: bool) -> None:
        for entry in released:
            update = entry[1]
            if update.state == STATE_COMPUTED:
                self.summary.ok += 1
            else:
                self.summary.failed += 1
                self.summary.failures.append((update.image.path,
                                              update.error or update.image.error))
        self.buffer.extend(released)
        buffer = self.buffer
        if buffer and (force or time.monotonic() - self.last >= self.options.commit_seconds):
            vectors = {k: np.stack([acc[k] if acc is not None else np.full(d, np.nan, np.float32)
                                    for _, _, acc, _ in buffer]) for k, d in self.dims.items()}
            changed = [self.work[seq].row for seq, _, _, _ in buffer
                       if self.work[seq].reason == "changed"]
            local = {k: [p.get(k) if p is not None else None for _, _, _, p in buffer]
                     for k in self.local_keys}
            self.thread.put([u for _, u, _, _ in buffer], vectors, changed, local, len(buffer))
            self.buffer = []
            self.last = time.monotonic()
        self.report()

    def report(self) -> None:
        if self.progress and self.committed != self.reported:
            self.reported = self.committed
            self.progress(self.reported, len(self.work))

    def close(self) -> None:
        self.thread.close()


def _pipeline(work: list[WorkItem], table, writer: StoreWriter, extractor, extractor_name: str,
              policy: SizePolicy, scales: tuple[float, ...], options: IngestOptions,
              summary: IngestSummary, progress: Callable[[int, int], None] | None,
              forward_threads: int = 1, verify=None) -> None:
    """The local executor: decode -> batch -> forward + pool -> reorder -> commit (a thread).
    `verify` (VerifySettings): keypoints for verification found in the decode threads."""
    n_scales = len(scales)
    budget = options.batch_pixels or default_batch_pixels(extractor.device.type)
    batcher = PixelBatcher(budget, options.batch_size, window=max(2 * options.batch_size, 64),
                           window_pixels=4 * budget)
    sift = any(spec.mask == "sift" for spec in extractor.local)
    vkey = verify_key(verify.kind) if verify is not None else None
    reorder = _Reorder(work, table, extractor, n_scales, vkey)
    # One forward at a time (CUDA, one core, or asked for) runs on this thread: torch's OpenMP
    # team of the main thread is 1.3-1.6x faster than a second thread's; on a CPU two forwards
    # of one thread each run on a pool by default (see _threads). Decoding and commits run
    # beside them.
    forwards = _Forwards(_Forward(extractor, policy, scales, options), forward_threads,
                         reorder.apply)
    commits = _Commits(writer, extractor, extractor_name, work, vkey, options, summary, progress)
    load = None
    if options.decode == "gpu" and not sift:
        from ..features.gpu_decode import load_deferred

        load = load_deferred
    decoded = iter_decoded([w.path for w in work], policy, scales, workers=options.workers,
                           max_pixels=options.max_pixels, prefetch=max(32, 4 * options.workers),
                           after=_after_decode(sift, verify), load=load)
    finished = False
    try:
        for seq, path, item in decoded:
            if reorder.decoded(seq, path, item):
                for batch in _items(batcher, extractor, seq, path, item, n_scales):
                    forwards.submit(batch)
            commits.add(reorder.release(), force=False)
        for batch in batcher.drain():
            forwards.submit(batch)
        forwards.drain()
        commits.add(reorder.release(), force=True)
        commits.close()
        finished = True
        if progress:
            progress(commits.committed, len(work))
    finally:
        decoded.close()
        if not finished:
            # interrupted or failed: commit what is complete (nothing finished is lost), then
            # let the original exception go on
            with contextlib.suppress(BaseException):
                forwards.salvage()
                commits.add(reorder.release(), force=True)
            with contextlib.suppress(BaseException):
                commits.close()
        forwards.close()


def _items(batcher: PixelBatcher, extractor, seq: int, path: Path, image: DecodedImage,
           n_scales: int) -> list[Batch]:
    """Queue every scale of a decoded image; return the batches that became ready."""
    from ..features.gpu_decode import DEVICE_JPEG

    ready: list[Batch] = []
    job = image.extras.get(DEVICE_JPEG)
    for s in range(n_scales):
        if job is not None:
            job["path"] = path
            tw, th = job["targets"][s]
            it = _Item(seq, s, th, tw, job=job)
        else:
            px = image.pixels[s]
            kp = image.extras["sift"][s] if "sift" in image.extras else None
            it = _Item(seq, s, px.shape[0], px.shape[1], pixels=px, keypoints=kp)
        key = extractor.pad_to(it.height, it.width)
        ready.extend(batcher.add(it, key, key[0] * key[1]))
    return ready


def _after_decode(sift: bool, verify) -> Callable[[DecodedImage], dict] | None:
    """What the decode threads compute beside decoding: SIFT positions of every scale for the
    sift mask, verification keypoints of the first scale."""
    if not sift and verify is None:
        return None

    def after(image: DecodedImage) -> dict:
        out = {}
        if sift:
            from ..features.localfeat import sift_keypoints

            out["sift"] = [sift_keypoints(px) for px in image.pixels]
        if verify is not None:
            out["verify"] = keypoints_or_none(image.pixels[0], verify)
        return out

    return after


__all__ = ["run_ingest", "IngestOptions", "IngestSummary", "failure_update", "STATUS_FAILED"]
