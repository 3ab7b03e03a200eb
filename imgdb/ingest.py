"""Ingest: files -> decoded images -> batched forward -> pooled vectors -> store commits.

The work list is planned against the store (new, changed, or not yet computed for this extractor),
images are decoded in worker threads, grouped into batches of equal size, pushed through one
forward per batch, and committed in discovery order (a reorder buffer), so an interrupted run
followed by a rerun leaves exactly the rows an uninterrupted run would have written.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .errors import UserError
from .images import DecodedImage, ImageError, SizePolicy, discover, iter_decoded
from .store import (STATUS_FAILED, STATUS_MISSING, STATUS_OK, ImageRow, ImageTable, StoreWriter)


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
    batch_size: int = 16
    workers: int = 4
    precision: str = "fp32"
    max_pixels: int = 120_000_000
    commit_seconds: float = 2.0
    keep_local: tuple[str, ...] = ()


@dataclass
class IngestSummary:
    """What a run did; printed as the closing line and available as JSON."""

    store: str
    extractor: str
    discovered: int = 0
    new: int = 0
    changed: int = 0
    recomputed: int = 0
    unchanged: int = 0
    ok: int = 0
    failed: int = 0
    missing: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def processed(self) -> int:
        return self.ok + self.failed

    def line(self) -> str:
        rate = self.processed / self.seconds if self.seconds > 0 else 0.0
        parts = [f"{self.discovered} files found", f"{self.new} new", f"{self.changed} changed"]
        if self.recomputed:
            parts.append(f"{self.recomputed} computed for this extractor")
        parts.append(f"{self.unchanged} unchanged")
        done = f"{self.ok} ingested, {self.failed} failed"
        if self.missing:
            done += f", {self.missing} marked missing"
        return (f"{', '.join(parts)}; {done} in {self.seconds:.1f}s ({rate:.1f} images/s) "
                f"-> {self.store} [{self.extractor}]")


@dataclass(frozen=True)
class WorkItem:
    """One file to (re)process: `row` is its store row, or None for a new image."""

    path: Path
    row: int | None
    reason: str  # new | changed | compute


def plan(table: ImageTable, computed: np.ndarray, files: Sequence[Path],
         roots: Sequence[Path]) -> tuple[list[WorkItem], list[int], int]:
    """Decide what to do: (work in discovery order, rows to mark missing, unchanged count).

    A known file is unchanged when its size and mtime match the store (failed files are not
    retried until they change); an ok image without vectors of this extractor is computed.
    """
    rows = table.row_of()
    work: list[WorkItem] = []
    unchanged = 0
    seen: set[str] = set()
    for path in files:
        key = str(path)
        seen.add(key)
        r = rows.get(key)
        if r is None:
            work.append(WorkItem(path, None, "new"))
            continue
        try:
            st = path.stat()
        except OSError:
            work.append(WorkItem(path, r, "changed"))  # vanished since discovery: record why
            continue
        same = (int(table.size[r]) == st.st_size and float(table.mtime[r]) == st.st_mtime
                and table.status[r] != STATUS_MISSING)
        if not same:
            work.append(WorkItem(path, r, "changed"))
        elif table.status[r] == STATUS_OK and not computed[r]:
            work.append(WorkItem(path, r, "compute"))
        else:
            unchanged += 1
    root_dirs = [str(p) + os.sep for p in roots if p.is_dir()]
    root_files = {str(p) for p in roots}
    missing = [
        r for r, p in enumerate(table.path)
        if p not in seen and table.status[r] != STATUS_MISSING
        and (p in root_files or any(p.startswith(d) for d in root_dirs)) and not os.path.exists(p)
    ]
    return work, missing, unchanged


def _failure_row(path: Path, error: str) -> ImageRow:
    try:
        st = path.stat()
        size, mtime = st.st_size, st.st_mtime
    except OSError:
        size, mtime = 0, 0.0
    return ImageRow(str(path), size, mtime, "", 0, 0, STATUS_FAILED, error)


class _Batcher:
    """Groups decoded images by pixel size, so a batch is one tensor without padding."""

    def __init__(self, batch_size: int, window: int) -> None:
        self.batch_size = batch_size
        self.window = window
        self.buckets: dict[tuple[int, int], list[tuple[int, int, np.ndarray]]] = defaultdict(list)
        self.pending = 0

    def add(self, seq: int, scale_idx: int, pixels: np.ndarray) -> list[list[tuple[int, int, np.ndarray]]]:
        """Queue one image; return the batches that are now ready to run."""
        key = pixels.shape[:2]
        bucket = self.buckets[key]
        bucket.append((seq, scale_idx, pixels))
        self.pending += 1
        ready = []
        if len(bucket) >= self.batch_size:
            ready.append(self.buckets.pop(key))
            self.pending -= len(ready[0])
        if self.pending >= self.window:  # bound memory and the reorder buffer
            ready.extend(self.drain())
        return ready

    def drain(self) -> list[list[tuple[int, int, np.ndarray]]]:
        """Every queued image, as batches (used at the end and when the window is full)."""
        out = [b for b in self.buckets.values() if b]
        self.buckets.clear()
        self.pending = 0
        return out


def run_ingest(paths: Sequence[str | Path], db: str | Path, options: IngestOptions,
               progress: Callable[[int, int], None] | None = None,
               on_start: Callable[[int], None] | None = None) -> IngestSummary:
    """Ingest image files/folders into the store; returns the run's summary.

    `progress(done, total)` is called as images are committed; `on_start(total)` once planned.
    """
    import torch

    from .backbones import get_backbone, parse_layers, parse_weights
    from .extract import FeatureExtractor, resolve_device
    from .pooling import DEFAULT_POOLINGS, canonical_pooling_name, get_pooling

    started = time.perf_counter()
    policy = SizePolicy.parse(options.size)
    backbone = get_backbone(options.backbone)
    weights = parse_weights(options.weights)
    layers = parse_layers(backbone, options.layers)
    requested = (tuple(canonical_pooling_name(p) for p in options.poolings.split(",") if p.strip())
                 if options.poolings else DEFAULT_POOLINGS)
    for p in requested:
        get_pooling(p)
    from .localfeat import parse_local_spec

    local_specs = tuple(dict.fromkeys(parse_local_spec(s) for s in options.keep_local))
    if local_specs:
        extra = ",".join(s.layer for s in local_specs)
        layers = parse_layers(backbone, ",".join(layers) + "," + extra)  # validates the names
    scales = tuple(float(s) for s in options.scales)
    extractor_name = extractor_id(backbone.name, weights.tag, policy.tag, scales)
    device = resolve_device(options.device)

    roots = [Path(p).expanduser().absolute() for p in paths]
    missing_roots = [str(p) for p in roots if not os.path.lexists(p)]
    if len(missing_roots) == len(roots):
        raise UserError(f"nothing to ingest: {missing_roots[0]} does not exist"
                        + (f" (nor {len(missing_roots) - 1} other path(s))" if len(roots) > 1 else ""))
    found = discover(roots)
    files = [Path(os.path.abspath(f)) for f in found.files]

    with StoreWriter(db) as writer:
        # an extractor keeps every layer/pooling it ever had, so all its datasets stay complete
        existing = _existing_settings(writer, extractor_name)
        if existing:
            layers = tuple(dict.fromkeys(list(existing["layers"]) + list(layers)))
            names = backbone.layer_names()
            layers = tuple(sorted(layers, key=names.index))
            requested = tuple(dict.fromkeys(list(existing["poolings"]) + list(requested)))
            old_keys = [parse_local_spec(k) for k in existing.get("keep_local", [])]
            local_specs = tuple(dict.fromkeys([*old_keys, *local_specs]))
            layers = tuple(sorted(set(layers) | {s.layer for s in local_specs},
                                  key=backbone.layer_names().index))
        table = writer.images()
        computed = writer.computed(extractor_name)
        work, missing, unchanged = plan(table, computed, files, roots)
        summary = IngestSummary(str(db), extractor_name, discovered=len(files),
                                unchanged=unchanged, problems=[(str(p), r) for p, r in found.problems])
        summary.new = sum(w.reason == "new" for w in work)
        summary.changed = sum(w.reason == "changed" for w in work)
        summary.recomputed = sum(w.reason == "compute" for w in work)
        if missing:
            writer.set_status(missing, STATUS_MISSING, "file no longer exists")
            summary.missing = len(missing)
        adds_datasets = existing is not None and bool(
            {(layer, p) for layer in layers for p in requested} - _existing_keys(existing)
            or {s.key for s in local_specs} - set(existing.get("keep_local", [])))
        if on_start:
            on_start(len(work))
        if not work and not adds_datasets:
            summary.seconds = time.perf_counter() - started
            return summary

        extractor = FeatureExtractor(backbone, weights, layers, requested, device, options.precision,
                                     local=local_specs)
        settings = {
            "backbone": backbone.name, "weights": weights.spec, "weights_tag": weights.tag,
            "weights_sha": weights.sha, "size": policy.spec, "scales": list(scales),
            "layers": list(layers), "poolings": list(extractor.poolings),
            "keep_local": [s.key for s in local_specs],
            "max_pixels": options.max_pixels, "imgdb": _version(), "torch": torch.__version__,
        }
        dims = extractor.output_dims()
        writer.ensure_extractor(extractor_name, settings, dims, local=extractor.local_channels())
        if adds_datasets:
            # new datasets reset `computed`: every ok row of this extractor needs them
            table = writer.images()
            computed = writer.computed(extractor_name)
            work, _, summary.unchanged = plan(table, computed, files, roots)
            summary.recomputed = sum(w.reason == "compute" for w in work)
            if on_start:
                on_start(len(work))

        _pipeline(work, writer, extractor, extractor_name, policy, scales, options, summary,
                  progress)
    summary.seconds = time.perf_counter() - started
    return summary


def _pipeline(work: list[WorkItem], writer: StoreWriter, extractor, extractor_name: str,
              policy: SizePolicy, scales: tuple[float, ...], options: IngestOptions,
              summary: IngestSummary, progress: Callable[[int, int], None] | None) -> None:
    """Decode -> batch -> forward -> reorder -> commit, with bounded memory."""
    import torch

    from .extract import merge_scales
    from .localfeat import LocalSet

    n_scales = len(scales)
    keys = list(extractor.output_dims())
    batcher = _Batcher(options.batch_size, window=max(4 * options.batch_size, 64))
    # seq -> (row, accumulated vectors, scales done); local cells per seq -> key -> per scale
    results: dict[int, tuple[ImageRow, dict | None, int]] = {}
    local_parts: dict[int, dict[str, list]] = {}
    local_keys = [spec.key for spec in extractor.local]
    # SIFT keypoints for the sift mask are found in the decode threads, off the main thread
    sift = any(spec.mask == "sift" for spec in extractor.local)
    sift_kp: dict[tuple[int, int], np.ndarray] | None = {} if sift else None
    next_commit = 0
    buffer_rows: list[tuple[int | None, ImageRow]] = []
    buffer_vecs: list[dict[tuple[str, str], np.ndarray] | None] = []
    buffer_seqs: list[int] = []  # positions in `work` of the buffered rows
    buffer_local: list[dict | None] = []
    last_commit = time.monotonic()
    done = 0

    def run_batch(batch: list[tuple[int, int, np.ndarray]]) -> None:
        pixels = torch.from_numpy(np.stack([b[2] for b in batch]))
        if extractor.device.type == "cuda":
            pixels = pixels.pin_memory()
        keypoints = [sift_kp.pop((seq, s)) for seq, s, _ in batch] if sift_kp is not None else None
        out, local = extractor.extract(pixels, keypoints)
        for i, (seq, scale_idx, _) in enumerate(batch):
            if local_keys:
                parts = local_parts.setdefault(seq, {k: [None] * n_scales for k in local_keys})
                for k in local_keys:
                    parts[k][scale_idx] = local[k][i]
            row, acc, count = results[seq]
            if acc is None:
                acc = {k: [None] * n_scales for k in keys}
            for k in keys:
                acc[k][scale_idx] = out[k][i]
            results[seq] = (row, acc, count + 1)

    def flush(force: bool) -> None:
        nonlocal next_commit, last_commit, done
        while next_commit in results:
            row, acc, count = results[next_commit]
            if row.status == STATUS_OK and count < n_scales:
                break
            del results[next_commit]
            item = work[next_commit]
            if acc is not None:
                acc = {k: merge_scales(v) for k, v in acc.items()}
            parts = local_parts.pop(next_commit, None)
            buffer_local.append({k: LocalSet.concat(v) for k, v in parts.items()} if parts else None)
            buffer_rows.append((item.row, row))
            buffer_vecs.append(acc)
            buffer_seqs.append(next_commit)
            if row.status == STATUS_OK:
                summary.ok += 1
            else:
                summary.failed += 1
                summary.failures.append((row.path, row.error))
            next_commit += 1
        if buffer_rows and (force or time.monotonic() - last_commit >= options.commit_seconds):
            vectors = {}
            for k in keys:
                dim = extractor_dims[k]
                vectors[k] = np.stack([v[k] if v is not None else np.full(dim, np.nan, np.float32)
                                       for v in buffer_vecs])
            changed = [work[seq].row for seq in buffer_seqs if work[seq].reason == "changed"]
            local = {k: [p[k] if p is not None else None for p in buffer_local] for k in local_keys}
            writer.commit(extractor_name, list(buffer_rows), vectors, file_changed=changed,
                          local=local)
            done += len(buffer_rows)
            buffer_rows.clear()
            buffer_vecs.clear()
            buffer_seqs.clear()
            buffer_local.clear()
            last_commit = time.monotonic()
            if progress:
                progress(done, len(work))

    extractor_dims = extractor.output_dims()
    decoded = iter_decoded([w.path for w in work], policy, scales, workers=options.workers,
                           max_pixels=options.max_pixels, prefetch=max(64, 2 * options.batch_size),
                           after=_sift_keypoints if sift else None)
    try:
        for seq, path, item in decoded:
            if isinstance(item, ImageError):
                results[seq] = (_failure_row(path, str(item)), None, 0)
            else:
                assert isinstance(item, DecodedImage)
                results[seq] = (ImageRow(str(path), item.file_size, item.mtime, item.sha,
                                         item.width, item.height, STATUS_OK), None, 0)
                for s, px in enumerate(item.pixels):
                    if sift_kp is not None:
                        sift_kp[(seq, s)] = item.extras["sift"][s]
                    for batch in batcher.add(seq, s, px):
                        run_batch(batch)
            flush(force=False)
        for batch in batcher.drain():
            run_batch(batch)
        flush(force=True)
    finally:
        decoded.close()
        # commit what is complete even when interrupted (Ctrl-C): nothing finished is lost
        if buffer_rows:
            try:
                flush(force=True)
            except Exception:
                pass


def _sift_keypoints(image: DecodedImage) -> dict:
    """SIFT keypoints of every scale of a decoded image (run in the decode threads)."""
    from .encoding import sift_keypoints

    return {"sift": [sift_keypoints(px) for px in image.pixels]}


def _existing_settings(writer: StoreWriter, extractor: str) -> dict | None:
    import json

    with writer.file() as fh:
        g = fh["descriptors"].get(extractor)
        return json.loads(g.attrs["settings"]) if g is not None else None


def _existing_keys(settings: dict) -> set[tuple[str, str]]:
    return {(layer, p) for layer in settings["layers"] for p in settings["poolings"]}


def extractor_id(backbone: str, weights_tag: str, size_tag: str, scales: Iterable[float]) -> str:
    """`<backbone>-<weights>-<size>[-s<scales>]`, e.g. `vgg16-imagenet-max1024`."""
    scales = list(scales)
    name = f"{backbone}-{weights_tag}-{size_tag}"
    if scales != [1.0]:
        name += "-s" + "+".join(f"{s:g}" for s in scales)
    return name


def _version() -> str:
    from . import __version__

    return __version__
