"""Ingest: files -> decoded images -> batched forward -> pooled vectors -> store commits.

The work list is planned against the store (new, changed, not yet computed for this extractor,
or failed transiently), images are decoded in worker threads, grouped into batches of equal
size, pushed through one forward per batch, and committed in discovery order (a reorder
buffer), so an interrupted run followed by a rerun leaves exactly the rows an uninterrupted run
would have written.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import UserError
from ..features.images import DecodedImage, ImageError, SizePolicy, discover, iter_decoded
from ..store import (FAILURE_PERMANENT, FAILURE_TRANSIENT, STATE_COMPUTED, STATE_FAILED,
                     STATE_FAILED_TRANSIENT, STATE_PENDING, STATUS_FAILED, STATUS_MISSING,
                     STATUS_OK, ImageRow, RowUpdate, StoreWriter)
from .plan import IngestOptions, IngestSummary, WorkItem, extractor_id, plan


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
    from ..features.backbones import get_backbone, parse_layers, parse_weights
    from ..features.extract import resolve_device
    from ..features.localfeat import parse_local_spec
    from ..features.pooling import DEFAULT_POOLINGS, canonical_pooling_name, get_pooling

    started = time.perf_counter()
    db = Path(db)
    policy = SizePolicy.parse(options.size)
    backbone = get_backbone(options.backbone)
    weights = parse_weights(options.weights)
    layers = parse_layers(backbone, options.layers)
    requested = (tuple(canonical_pooling_name(p) for p in options.poolings.split(",") if p.strip())
                 if options.poolings else DEFAULT_POOLINGS)
    for p in requested:
        get_pooling(p)
    local_specs = tuple(dict.fromkeys(parse_local_spec(s) for s in options.keep_local))
    if local_specs:
        layers = parse_layers(backbone, ",".join([*layers, *(s.layer for s in local_specs)]))
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

    extractor = None
    if not db.exists() and files:  # a network that cannot load leaves no empty store behind
        extractor = _build_extractor(backbone, weights, layers, requested, device, options,
                                     local_specs)
    writer = StoreWriter(db)
    try:
        with writer:
            existing = writer.settings(extractor_name)
            if existing:  # an extractor keeps every layer/pooling it had: datasets stay complete
                names = backbone.layer_names()
                old_local = [parse_local_spec(k) for k in existing.get("keep_local", [])]
                local_specs = tuple(dict.fromkeys([*old_local, *local_specs]))
                layers = tuple(sorted(set(existing["layers"]) | set(layers)
                                      | {s.layer for s in local_specs}, key=names.index))
                requested = tuple(dict.fromkeys([*existing["poolings"], *requested]))
            table = writer.images()
            work, missing, unchanged = plan(table, writer.state(extractor_name), files, roots,
                                            options.retry_failed)
            summary = IngestSummary(str(db), extractor_name, discovered=len(files),
                                    unchanged=unchanged,
                                    problems=[(str(p), r) for p, r in found.problems])
            summary.count(work)
            if missing:
                writer.set_status(missing, STATUS_MISSING, "file no longer exists")
                summary.missing = len(missing)
            adds = existing is not None and bool(
                {(layer, p) for layer in layers for p in requested}
                - {(layer, p) for layer in existing["layers"] for p in existing["poolings"]}
                or {s.key for s in local_specs} - set(existing.get("keep_local", [])))
            if on_start:
                on_start(len(work))
            if not work and not adds:
                summary.seconds = time.perf_counter() - started
                return summary
            if extractor is None or extractor.layers != layers or extractor.poolings != requested:
                extractor = _build_extractor(backbone, weights, layers, requested, device, options,
                                             local_specs)
            settings = _settings(backbone, weights, policy, scales, layers, extractor,
                                 local_specs, options)
            if writer.ensure_extractor(extractor_name, settings, extractor.output_dims(),
                                       local=extractor.local_channels()) and existing:
                # new datasets reset every row of this extractor to pending: plan again
                work, _, summary.unchanged = plan(writer.images(), writer.state(extractor_name),
                                                  files, roots, options.retry_failed)
                summary.count(work)
                if on_start:
                    on_start(len(work))
            _pipeline(work, table, writer, extractor, extractor_name, policy, scales, options,
                      summary, progress)
    except BaseException:
        writer.discard_if_empty()
        raise
    summary.seconds = time.perf_counter() - started
    return summary


def _build_extractor(backbone, weights, layers, requested, device, options, local_specs):
    from ..features.extract import FeatureExtractor

    return FeatureExtractor(backbone, weights, layers, requested, device, options.precision,
                            local=local_specs)


def _settings(backbone, weights, policy, scales, layers, extractor, local_specs,
              options: IngestOptions) -> dict:
    import torch

    from .. import __version__

    return {
        "backbone": backbone.name, "weights": weights.spec, "weights_tag": weights.tag,
        "weights_sha": weights.sha, "size": policy.spec, "scales": list(scales),
        "layers": list(layers), "poolings": list(extractor.poolings),
        "keep_local": [s.key for s in local_specs],
        "max_pixels": options.max_pixels, "imgdb": __version__, "torch": torch.__version__,
    }


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


def _known_row(table, row: int | None) -> ImageRow | None:
    if row is None:
        return None
    return ImageRow(table.path[row], int(table.size[row]), float(table.mtime[row]),
                    table.sha[row].decode(), int(table.width[row]), int(table.height[row]),
                    int(table.status[row]), table.error[row], int(table.failure[row]))


def _pipeline(work: list[WorkItem], table, writer: StoreWriter, extractor, extractor_name: str,
              policy: SizePolicy, scales: tuple[float, ...], options: IngestOptions,
              summary: IngestSummary, progress: Callable[[int, int], None] | None) -> None:
    """Decode -> batch -> forward -> reorder -> commit, with bounded memory."""
    import torch

    from ..features.extract import merge_scales
    from ..features.localfeat import LocalSet

    n_scales = len(scales)
    dims = extractor.output_dims()
    keys = list(dims)
    batcher = _Batcher(options.batch_size, window=max(4 * options.batch_size, 64))
    # seq -> (update, accumulated vectors per scale, scales done)
    results: dict[int, tuple[RowUpdate, dict | None, int]] = {}
    local_parts: dict[int, dict[str, list]] = {}
    local_keys = [spec.key for spec in extractor.local]
    sift = any(spec.mask == "sift" for spec in extractor.local)
    sift_kp: dict[tuple[int, int], np.ndarray] | None = {} if sift else None
    next_commit = 0
    buffer: list[tuple[int, RowUpdate, dict | None, dict | None]] = []
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
            update, acc, count = results[seq]
            if acc is None:
                acc = {k: [None] * n_scales for k in keys}
            for k in keys:
                acc[k][scale_idx] = out[k][i]
            results[seq] = (update, acc, count + 1)

    def flush(force: bool) -> None:
        nonlocal next_commit, last_commit, done
        while next_commit in results:
            update, acc, count = results[next_commit]
            if update.state == STATE_COMPUTED and count < n_scales:
                break
            del results[next_commit]
            if acc is not None:
                acc = {k: merge_scales(v) for k, v in acc.items()}
            parts = local_parts.pop(next_commit, None)
            buffer.append((next_commit, update, acc,
                           {k: LocalSet.concat(v) for k, v in parts.items()} if parts else None))
            if update.state == STATE_COMPUTED:
                summary.ok += 1
            else:
                summary.failed += 1
                summary.failures.append((update.image.path, update.error or update.image.error))
            next_commit += 1
        if buffer and (force or time.monotonic() - last_commit >= options.commit_seconds):
            vectors = {k: np.stack([acc[k] if acc is not None else np.full(dims[k], np.nan,
                                                                           np.float32)
                                    for _, _, acc, _ in buffer]) for k in keys}
            changed = [work[seq].row for seq, _, _, _ in buffer if work[seq].reason == "changed"]
            local = {k: [p[k] if p is not None else None for _, _, _, p in buffer]
                     for k in local_keys}
            writer.commit(extractor_name, [u for _, u, _, _ in buffer], vectors,
                          file_changed=changed, local=local)
            done += len(buffer)
            buffer.clear()
            last_commit = time.monotonic()
            if progress:
                progress(done, len(work))

    decoded = iter_decoded([w.path for w in work], policy, scales, workers=options.workers,
                           max_pixels=options.max_pixels, prefetch=max(64, 2 * options.batch_size),
                           after=_sift_keypoints if sift else None)
    try:
        for seq, path, item in decoded:
            w = work[seq]
            if isinstance(item, ImageError):
                results[seq] = (failure_update(w, item, _known_row(table, w.row)), None, 0)
            else:
                assert isinstance(item, DecodedImage)
                results[seq] = (RowUpdate(w.row, ImageRow(str(path), item.file_size, item.mtime,
                                                          item.sha, item.width, item.height,
                                                          STATUS_OK)), None, 0)
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
        if buffer:
            try:
                flush(force=True)
            except Exception:
                pass


def _sift_keypoints(image: DecodedImage) -> dict:
    """SIFT keypoints of every scale of a decoded image (run in the decode threads)."""
    from ..features.localfeat import sift_keypoints

    return {"sift": [sift_keypoints(px) for px in image.pixels]}


__all__ = ["run_ingest", "IngestOptions", "IngestSummary", "failure_update", "STATUS_FAILED"]
