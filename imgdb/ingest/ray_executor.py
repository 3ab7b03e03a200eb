"""`imgdb ingest --engine ray`: the same ingest, run by Ray Data on a cluster.

The driver (this process) discovers the files and plans the work against the store exactly as
a local ingest does, and holds the store's writer lock for the whole run. Ray Data then runs

    work items -> map_batches(decode)  CPU tasks: read, hash and decode files (+ SIFT keypoints)
               -> map_batches(_Embedder) an actor pool, one actor per GPU (or per CPU slot):
                  forward + pooling, rows committed to the actor's own shard store
               -> (seq, shard, row) records streamed back to the driver

and the driver copies finished rows from the shard stores into the store in discovery order
(`store.merge.RowCopier`, one atomic commit per chunk) as soon as a prefix of the work list is
complete. The store ends with the same rows in the same order as a local ingest.

Resuming: shard stores live beside the store (`STORE.ray/`) until a run has merged everything.
A rerun (after the driver or a worker was killed) plans again against the store, so rows that
were merged are not planned; rows that a shard holds for a planned file with the file's current
size and mtime and a final outcome are reused instead of recomputed; the rest is computed. So
nothing is lost and nothing is merged twice.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import InvalidRequest, UserError, refuse
from ..store import (FAILURE_PERMANENT, STATE_COMPUTED, STATE_FAILED, STATUS_FAILED,
                     STATUS_OK, ImageRow, RowUpdate, StoreWriter, open_read, verify_key)
from ..store.merge import (ExtractorShape, Pick, RowCopier, difference, extractor_shapes)
from .backfill import backfill_verify, verify_channels
from .plan import IngestOptions, IngestSummary, WorkItem, plan
from .setup import extractor_settings, find_files, grow, resolve_setup, start_run

SHARD_SUFFIX = ".ray"


@dataclass
class RayOptions:
    """How to reach the cluster and size the workers."""

    address: str | None = None  # None: RAY_ADDRESS or a new local cluster; "auto"; "ray://h:p"
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_worker: float = 1.0
    num_cpus: int | None = None  # CPUs of a local cluster started here (None: all)
    batch_size: int | None = None  # files per decode task / actor call (None: --batch-size)


def shard_dir(db: Path) -> Path:
    return db.with_name(db.name + SHARD_SUFFIX)


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError("ray needs Ray (Ray Data): pip install 'imgdb[ray]'", "engine") from None
    return ray


# ---------------------------------------------------------------------------------------------
# the driver's side


def _known(table, row: int | None) -> str:
    """OUT's facts of a row as JSON (failure_update needs them for rows already stored)."""
    if row is None:
        return ""
    return json.dumps([table.path[row], int(table.size[row]), float(table.mtime[row]),
                       table.sha[row].decode(), int(table.width[row]), int(table.height[row]),
                       int(table.status[row]), table.error[row], int(table.failure[row])])


# ---------------------------------------------------------------------------------------------
# Ray Data stages (run in Ray's worker processes)


def decode_batch(batch: dict, size: str, scales: list, max_pixels: int, sift: bool,
                 verify: dict | None = None) -> dict:
    """Decode the files of a batch of work items (a CPU task). Pixels travel as bytes with
    their shapes; failures travel as their reason and file facts; `verify` (the extractor's
    settings of them): verification keypoints found here, as bytes with their count and grid."""
    from ..features.images import ImageError, SizePolicy, load_image

    policy = SizePolicy.parse(size)
    n, ns = len(batch["seq"]), len(scales)
    out = {k: batch[k] for k in ("seq", "path", "row", "reason", "known")}
    ok = np.zeros(n, bool)
    err = np.array([""] * n, dtype=object)
    transient = np.zeros(n, bool)
    scope = np.array(["file"] * n, dtype=object)
    fsize = np.full(n, -1, np.int64)
    mtime = np.zeros(n, np.float64)
    sha = np.array([""] * n, dtype=object)
    width = np.zeros(n, np.int32)
    height = np.zeros(n, np.int32)
    shapes = np.zeros((n, ns, 2), np.int32)
    pixels = np.array([b""] * n, dtype=object)
    keypoints = np.array([b""] * n, dtype=object)
    kp_counts = np.zeros((n, ns), np.int32)
    vfeat = np.array([b""] * n, dtype=object)
    vxy = np.array([b""] * n, dtype=object)
    vgrid = np.zeros((n, 2), np.int32)
    vsettings = None
    if verify:
        from ..features.verifyfeat import VerifySettings
        from .backfill import keypoints_or_none

        vsettings = VerifySettings(**verify)
    for i, path in enumerate(batch["path"]):
        try:
            image = load_image(str(path), policy, scales, max_pixels=max_pixels)
            if sift:
                from ..features.localfeat import sift_keypoints

                try:
                    kps = [np.asarray(sift_keypoints(px), np.float32).reshape(-1, 2)
                           for px in image.pixels]
                except Exception as exc:  # e.g. OpenCV refusing an image: this file only
                    raise ImageError(f"{type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else ''}",
                                     scope="extractor") from None
                kp_counts[i] = [len(k) for k in kps]
                keypoints[i] = b"".join(k.tobytes() for k in kps)
        except ImageError as e:
            err[i], transient[i], scope[i] = str(e), e.transient, e.scope
            if e.file_size is not None:
                fsize[i], mtime[i], sha[i] = e.file_size, e.mtime, e.sha or ""
            continue
        ok[i] = True
        fsize[i], mtime[i], sha[i] = image.file_size, image.mtime, image.sha
        width[i], height[i] = image.width, image.height
        if vsettings is not None:
            found = keypoints_or_none(image.pixels[0], vsettings)
            vfeat[i], vxy[i] = found.features.tobytes(), found.coords.tobytes()
            vgrid[i] = found.grid
        shapes[i] = [px.shape[:2] for px in image.pixels]
        pixels[i] = b"".join(np.ascontiguousarray(px).tobytes() for px in image.pixels)
    out.update(ok=ok, error=err, transient=transient, scope=scope, file_size=fsize, mtime=mtime,
               sha=sha, width=width, height=height, shapes=shapes, pixels=pixels,
               keypoints=keypoints, kp_counts=kp_counts, vfeat=vfeat, vxy=vxy, vgrid=vgrid,
               decode_pid=np.full(n, os.getpid()))
    return out


class Embedder:
    """A Ray Data actor: forward + pooling of decoded batches, rows committed to its own shard
    store (same layout and extractor as the store); returns where each row went."""

    def __init__(self, spec: dict) -> None:
        import torch

        from ..features.backbones import get_backbone, parse_weights
        from ..features.extract import FeatureExtractor, resolve_device
        from ..features.localfeat import parse_local_spec

        threads = max(1, int(spec["cpus"]))
        torch.set_num_threads(threads)
        self.spec = spec
        local = tuple(parse_local_spec(k) for k in spec["keep_local"])
        device = resolve_device("cuda" if spec["gpus"] > 0 else "cpu")
        self.extractor = FeatureExtractor(get_backbone(spec["backbone"]),
                                          parse_weights(spec["weights"]), tuple(spec["layers"]),
                                          tuple(spec["poolings"]), device, spec["precision"],
                                          local=local)
        self.name = spec["extractor"]
        self.scales = len(spec["scales"])
        self.keys = [tuple(k) for k, _ in spec["dims"]]
        self.dims = {tuple(k): d for k, d in spec["dims"]}
        self.local_keys = [s.key for s in local]
        self.sift = any(s.mask == "sift" for s in local)
        self.verify_key = spec.get("verify_key")
        self.shard = Path(spec["shard_dir"]) / f"shard-{spec['run']}-{uuid.uuid4().hex[:12]}.h5"
        self.writer = StoreWriter(self.shard)
        self.writer.ensure_extractor(self.name, spec["settings"], self.dims,
                                     local=dict(spec["local_channels"]))

    def _update(self, batch: dict, i: int) -> RowUpdate:
        from ..features.images import ImageError
        from .pipeline import failure_update

        path = Path(str(batch["path"][i]))
        row = int(batch["row"][i])
        item = WorkItem(path, None if row < 0 else row, str(batch["reason"][i]))
        if batch["ok"][i]:
            return RowUpdate(None, ImageRow(str(path), int(batch["file_size"][i]),
                                            float(batch["mtime"][i]), str(batch["sha"][i]),
                                            int(batch["width"][i]), int(batch["height"][i]),
                                            STATUS_OK))
        error = ImageError(str(batch["error"][i]), bool(batch["transient"][i]),
                           str(batch["scope"][i]))
        if int(batch["file_size"][i]) >= 0:
            error.file_size, error.mtime = int(batch["file_size"][i]), float(batch["mtime"][i])
            error.sha = str(batch["sha"][i])
        known = str(batch["known"][i])
        update = failure_update(item, error, ImageRow(*json.loads(known)) if known else None)
        update.row = None  # a new row of the shard
        return update

    def __call__(self, batch: dict) -> dict:
        import torch

        from ..numeric import merge_scales
        from ..features.localset import LocalSet

        n = len(batch["seq"])
        updates = [self._update(batch, i) for i in range(n)]
        per_scale: dict[tuple[int, int], tuple] = {}  # (image, scale) -> (pooled, local)
        groups: dict[tuple, list[tuple[int, int, np.ndarray, np.ndarray | None]]] = {}
        for i in range(n):
            if not batch["ok"][i]:
                continue
            raw = batch["pixels"][i]
            offset, kp_off = 0, 0
            for s in range(self.scales):
                h, w = (int(v) for v in batch["shapes"][i][s])
                px = np.frombuffer(raw, np.uint8, h * w * 3, offset).reshape(h, w, 3)
                offset += h * w * 3
                kp = None
                if self.sift:
                    k = int(batch["kp_counts"][i][s])
                    kp = np.frombuffer(batch["keypoints"][i], np.float32, 2 * k,
                                       kp_off).reshape(k, 2)
                    kp_off += 8 * k
                groups.setdefault((h, w), []).append((i, s, px, kp))
        limit = max(1, int(self.spec["forward_batch"]))
        for members in groups.values():
            for lo in range(0, len(members), limit):
                part = members[lo:lo + limit]
                pixels = torch.from_numpy(np.stack([m[2] for m in part]))
                if self.extractor.device.type == "cuda":
                    pixels = pixels.pin_memory()
                out, local = self.extractor.extract(
                    pixels, [m[3] for m in part] if self.sift else None)
                for j, (i, s, _, _) in enumerate(part):
                    per_scale[(i, s)] = ({k: out[k][j] for k in self.keys},
                                         {k: local[k][j] for k in self.local_keys})
        vectors = {k: np.full((n, self.dims[k]), np.nan, np.float32) for k in self.keys}
        local_sets = {k: [None] * n for k in self.local_keys}
        for i in range(n):
            if updates[i].state != STATE_COMPUTED or not batch["ok"][i]:
                continue
            parts = [per_scale[(i, s)] for s in range(self.scales)]
            for k in self.keys:
                vectors[k][i] = merge_scales([p[0][k] for p in parts])
            for k in self.local_keys:
                local_sets[k][i] = LocalSet.concat([p[1][k] for p in parts])
        if self.verify_key:
            local_sets[self.verify_key] = [
                LocalSet(np.frombuffer(batch["vfeat"][i], np.uint8).reshape(-1, 128),
                         np.frombuffer(batch["vxy"][i], np.int16).reshape(-1, 2),
                         tuple(int(v) for v in batch["vgrid"][i])) if batch["ok"][i] else None
                for i in range(n)]
        ids = self.writer.commit(self.name, updates, vectors, local=local_sets or None)
        return {
            "seq": np.asarray(batch["seq"], np.int64),
            "shard": np.array([self.shard.name] * n, dtype=object),
            "row": np.asarray(ids, np.int64),
            "ok": np.array([u.state == STATE_COMPUTED and u.image.status == STATUS_OK
                            for u in updates]),
            "error": np.array([u.error or u.image.error for u in updates], dtype=object),
            "decode_pid": np.asarray(batch["decode_pid"], np.int64),
            "actor_pid": np.full(n, os.getpid(), np.int64),
        }


# ---------------------------------------------------------------------------------------------
# shards of earlier runs


def _final(status: int, failure: int, state: int) -> bool:
    """A shard row whose outcome a rerun keeps: computed, or failed for good."""
    if status == STATUS_FAILED:
        return failure == FAILURE_PERMANENT
    return status == STATUS_OK and state in (STATE_COMPUTED, STATE_FAILED)


def _reusable(folder: Path, shape: ExtractorShape, wanted: dict[str, WorkItem]
              ) -> dict[str, tuple[str, int, bool, str]]:
    """path -> (shard file name, row, ok, error) of rows that earlier runs' shards hold for
    planned files, unchanged on disk since, with a final outcome."""
    found: dict[str, tuple[str, int, bool, str]] = {}
    if not folder.is_dir():
        return found
    for shard in sorted(folder.glob("shard-*.h5")):
        try:
            with open_read(shard) as view:
                shapes = extractor_shapes(view)
                if set(shapes) != {shape.name} or difference(shape, shapes[shape.name],
                                                              "store", "shard"):
                    continue
                table = view.images()
                state = view.state(shape.name)
                ext_errors = None
                for r, p in enumerate(table.path):
                    if p not in wanted or p in found:
                        continue
                    if not _final(int(table.status[r]), int(table.failure[r]), int(state[r])):
                        continue
                    try:
                        st = os.stat(p)
                    except OSError:
                        continue
                    if st.st_size != int(table.size[r]) or st.st_mtime != float(table.mtime[r]):
                        continue
                    ok = table.status[r] == STATUS_OK and state[r] == STATE_COMPUTED
                    error = ""
                    if not ok:
                        if ext_errors is None:
                            ext_errors = view.extractor_errors(shape.name,
                                                               np.arange(view.rows))
                        error = ext_errors[r] or table.error[r]
                    found[p] = (shard.name, r, bool(ok), error)
        except UserError:
            continue  # a shard that cannot be read (killed while it was being created)
    return found


# ---------------------------------------------------------------------------------------------
# the driver


def _quiet_ray() -> None:
    """Ray's own log lines stay in its log files (/tmp/ray/session_latest/logs); imgdb reports
    progress and errors itself."""
    import logging

    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _cluster(ray, ropts: RayOptions) -> bool:
    """Connect to (or start) the cluster; True when it was started here, for this run."""
    _quiet_ray()
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                  configure_logging=True)
    address = ropts.address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs["address"] = address
    else:  # a cluster of this machine, started here and ended with this process
        kwargs["address"] = "local"
        if ropts.num_cpus:
            kwargs["num_cpus"] = ropts.num_cpus
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise UserError(f"cannot reach the Ray cluster at {ropts.address}: "
                        f"{str(exc).splitlines()[0]}") from None
    return kwargs["address"] == "local"


def _pool(ray, ropts: RayOptions) -> tuple[int, float, float]:
    """(actors, GPUs per actor, CPUs per actor) from the cluster's resources: one actor per
    GPU, or per CPU slot (a quarter of the CPUs, at least one, stays for decoding)."""
    res = ray.cluster_resources()
    gpus_total, cpus_total = float(res.get("GPU", 0)), float(res.get("CPU", 1))
    gpus = ropts.gpus_per_worker if ropts.gpus_per_worker is not None else \
        (1.0 if gpus_total >= 1 else 0.0)
    cpus = float(ropts.cpus_per_worker)
    if gpus > 0:
        if gpus > gpus_total:
            raise UserError(f"{gpus:g} but the cluster has {gpus_total:g} GPU(s)",
                            "gpus_per_worker")
        actors = int(gpus_total // gpus)
    else:
        reserve = max(1.0, cpus_total // 4)
        actors = max(1, int((cpus_total - reserve) // cpus))
    if cpus > cpus_total:
        raise UserError(f"{cpus:g} but the cluster has {cpus_total:g} CPU(s)", "cpus_per_worker")
    return actors, gpus, cpus


def run_ray_ingest(paths: Sequence[str | Path], db: str | Path, options: IngestOptions,
                   ropts: RayOptions | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   on_start: Callable[[int], None] | None = None) -> IngestSummary:
    """Ingest with Ray Data (see the module docstring); returns the same summary as a local run.
    `summary.engine` holds what the cluster did (actors, processes, shards reused)."""
    from ..features.extract import FeatureExtractor

    ropts = ropts or RayOptions()
    local_only = [flag for flag, used in (
        ("buckets", options.buckets), ("decode", options.decode != "cpu"),
        ("batch_pixels", options.batch_pixels), ("forward_threads", options.forward_threads),
        ("torch_threads", options.torch_threads)) if used]
    if local_only:
        raise InvalidRequest(f"ray does not take {', '.join('{' + f + '}' for f in local_only)}: "
                             f"they tune the local executor (Ray actors batch equal shapes, with "
                             f"{{cpus_per_worker}} torch threads)", "engine",
                             mentions=(*local_only, "cpus_per_worker"))
    if ropts.cpus_per_worker <= 0 or (ropts.gpus_per_worker or 0) < 0:
        raise refuse("{cpus_per_worker} must be > 0 and {gpus_per_worker} >= 0",
                     "cpus_per_worker", "gpus_per_worker")
    ray = _import_ray()
    started = time.perf_counter()
    db = Path(db)
    setup = resolve_setup(options)
    roots, files, problems = find_files(paths)

    def build(layers, poolings, specs):
        from ..features.extract import resolve_device

        return FeatureExtractor(setup.backbone, setup.weights, layers, poolings,
                                resolve_device("cpu"), "fp32", local=specs)

    extractor = None
    if not db.exists() and files:  # a network that cannot load leaves no empty store behind
        extractor = build(setup.layers, setup.poolings, setup.local_specs)
    writer = StoreWriter(db)
    try:
        with writer:
            existing = writer.settings(setup.name)
            outputs = grow(setup, existing)
            layers, requested, local_specs = outputs.layers, outputs.poolings, outputs.local_specs
            start = start_run(writer, setup, files, roots, problems, options, on_start)
            table, work, summary = start.table, start.work, start.summary
            summary.engine["engine"] = "ray"
            if not work and not outputs.adds:
                summary.seconds = time.perf_counter() - started
                return summary
            if extractor is None or extractor.layers != layers or \
                    extractor.poolings != requested:
                extractor = build(layers, requested, local_specs)
            settings = extractor_settings(setup, outputs, extractor.poolings, options)
            dims = extractor.output_dims()
            local_channels = {**extractor.local_channels(), **verify_channels(outputs.verify)}
            if writer.ensure_extractor(setup.name, settings, dims, local=local_channels) \
                    and existing:
                table = writer.images()
                work, _, summary.unchanged = plan(table, writer.state(setup.name), files, roots,
                                                  options.retry_failed)
                summary.count(work)
                if on_start:
                    on_start(len(work))
            with writer.read() as view:
                shape = extractor_shapes(view)[setup.name]
                settings = view.settings(setup.name)
            merge = _ShardMerge(writer, shape, work, local_channels, options.commit_seconds,
                                progress)
            todo = merge.reuse(summary)
            if todo:
                spec = _worker_spec(setup, layers, extractor, local_channels, settings, options,
                                    merge.folder)
                _compute(ray, ropts, merge, todo, table, spec,
                         any(s.mask == "sift" for s in local_specs), options, summary)
            merge.finish()
            if outputs.verify is not None:  # rows computed before the extractor kept them
                summary.keypoints_added = backfill_verify(writer, setup.name, outputs.verify,
                                                          setup.policy, setup.scales, options)
    except BaseException:
        writer.discard_if_empty()
        raise
    summary.seconds = time.perf_counter() - started
    from ..features.onnx_export import ensure_exported

    ensure_exported(setup.backbone, setup.weights, layers, extractor)  # for torch-free queries
    return summary


class _ShardMerge:
    """Rows the workers left in shard files, copied into the store in work-list order, a chunk
    per commit, as soon as a prefix of the work list is ready (so a kill keeps a prefix)."""

    def __init__(self, writer, shape, work: list[WorkItem], local_channels: dict,
                 commit_seconds: float, progress: Callable[[int, int], None] | None) -> None:
        self.work, self.commit_seconds, self.progress = work, commit_seconds, progress
        self.folder = shard_dir(writer.path)
        self.folder.mkdir(exist_ok=True)
        self.shape = shape
        self.copier = RowCopier(writer, [], {shape.name: shape})
        self.chunk = self.copier.chunk_rows(_local_bytes(local_channels))
        self.source_of: dict[str, int] = {}
        self.done: dict[int, tuple[int, int]] = {}  # seq -> (source, shard row)
        self.next = self.merged = 0
        self.last = time.monotonic()

    def add(self, seq: int, shard: str, row: int) -> None:
        """Work item `seq` is row `row` of shard file `shard`."""
        if shard not in self.source_of:
            self.source_of[shard] = len(self.copier.sources)
            self.copier.sources.append(self.folder / shard)
        self.done[seq] = (self.source_of[shard], row)

    def reuse(self, summary: IngestSummary) -> list[int]:
        """Take the rows earlier runs' shards hold; returns the work items still to compute."""
        by_path = {str(w.path): w for w in self.work}
        reuse = _reusable(self.folder, self.shape, by_path)
        summary.engine["reused"] = len(reuse)
        for seq, w in enumerate(self.work):
            hit = reuse.get(str(w.path))
            if hit is not None:
                self.add(seq, hit[0], hit[1])
                _count(summary, str(w.path), hit[2], hit[3])
        self.merge_ready(force=False)
        return [seq for seq in range(len(self.work)) if seq not in self.done]

    def merge_ready(self, force: bool) -> None:
        """Copy the ready prefix: whole chunks, or everything ready when forced or when
        `commit_seconds` passed since the last copy."""
        n = len(self.work)
        while True:
            stop = self.next
            while stop < n and stop in self.done and stop - self.next < self.chunk:
                stop += 1
            size = stop - self.next
            if not size or (size < self.chunk and not force and stop < n
                            and time.monotonic() - self.last < self.commit_seconds):
                return
            self.copier.copy([Pick(self.done[s][0], self.done[s][1], self.work[s].row)
                              for s in range(self.next, stop)])
            for s in range(self.next, stop):
                del self.done[s]
            self.next = stop
            self.merged += size
            self.last = time.monotonic()
            if self.progress:
                self.progress(self.merged, n)

    def finish(self) -> None:
        """Copy the rest; every planned image must have come back. The shards go."""
        self.merge_ready(force=True)
        if self.next != len(self.work):
            raise UserError(f"{len(self.work) - self.next} planned images came back from no "
                            f"Ray worker; rerun the command to finish")
        shutil.rmtree(self.folder, ignore_errors=True)  # everything is in the store now


def _worker_spec(setup, layers: Sequence[str], extractor, local_channels: dict, settings: dict,
                 options: IngestOptions, folder: Path) -> dict:
    """What each network actor rebuilds its extractor and shard writer from (plain data)."""
    return {
        "backbone": setup.backbone.name, "weights": setup.weights.spec,
        "layers": list(layers), "poolings": list(extractor.poolings),
        "keep_local": [s.key for s in extractor.local], "precision": options.precision,
        "extractor": setup.name, "scales": list(setup.scales),
        "dims": [[list(k), int(d)] for k, d in extractor.output_dims().items()],
        "local_channels": sorted(local_channels.items()), "settings": settings,
        "verify_key": verify_key(settings["verify"]["kind"]) if settings.get("verify")
        else None,
        "shard_dir": str(folder), "run": time.strftime("%Y%m%d-%H%M%S"),
        "forward_batch": options.batch_size,
    }


def _compute(ray, ropts: RayOptions, merge: _ShardMerge, todo: list[int], table, spec: dict,
             sift: bool, options: IngestOptions, summary: IngestSummary) -> None:
    """Run the work items `todo` on the cluster, handing each finished row to `merge`."""
    started_here = _cluster(ray, ropts)
    actors, gpus, cpus = _pool(ray, ropts)
    summary.engine.update(actors=actors, gpus_per_worker=gpus, cpus_per_worker=cpus)
    spec = {**spec, "gpus": gpus, "cpus": cpus}
    batch = ropts.batch_size or options.batch_size
    ds = _dataset(ray, merge.work, todo, table, spec, sift, batch, actors,
                  restarts=not started_here)
    decode_pids, actor_pids = set(), set()
    try:
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for seq, shard, row, ok, error in zip(out["seq"], out["shard"], out["row"],
                                                  out["ok"], out["error"]):
                merge.add(int(seq), str(shard), int(row))
                _count(summary, str(merge.work[int(seq)].path), bool(ok), str(error))
            decode_pids.update(int(p) for p in out["decode_pid"])
            actor_pids.update(int(p) for p in out["actor_pid"])
            merge.merge_ready(force=False)
    except Exception as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(f"a Ray worker failed ({_root_cause(exc)}); what was merged is kept "
                        f"and finished shards are reused: rerun the command to finish") from None
    summary.engine.update(decode_processes=len(decode_pids), actor_processes=len(actor_pids),
                          separate_processes=not (decode_pids & actor_pids))


def _root_cause(exc: BaseException) -> str:
    """`Type: message` of the exception at the bottom of Ray's wrappers, on one line."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(nxt, BaseException):
            break
        exc = nxt
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    return f"{type(exc).__name__}: {text}"[:300]


def _count(summary: IngestSummary, path: str, ok: bool, error: str) -> None:
    if ok:
        summary.ok += 1
    else:
        summary.failed += 1
        summary.failures.append((path, error))


def _local_bytes(local_channels: dict) -> float:
    # a generous guess per image (a 32x32 map of every kept set), to size merge chunks
    return float(sum(1024 * (2 * c + 4) for c in local_channels.values()))


def _decode_memory(settings: dict, batch: int) -> int:
    """Bytes a decode task holds: its images' pixels at every scale (8 MP where the size
    policy does not bound them), between 64 MB and 2 GB."""
    kind, _, value = str(settings["size"]).partition(":")
    if kind == "max":
        area = int(value) ** 2
    elif kind == "fixed":
        w, _, h = value.partition("x")
        area = int(w) * int(h or w)
    else:
        area = 8_000_000
    per_image = 3 * area * sum(max(1.0, float(s)) ** 2 for s in settings["scales"])
    return int(min(2 << 30, max(64 << 20, 2 * batch * per_image)))


def _dataset(ray, work: list[WorkItem], todo: list[int], table, spec: dict, sift: bool,
             batch: int, actors: int, restarts: bool = True):
    """The Ray Data pipeline: work items -> decode tasks -> the network actors' shard writes.

    `restarts`: Ray Data's default of restarting a lost actor. Ray 2.60 then logs an error line
    to the driver's terminal for every actor (its own constructor arguments live in the object
    store, ray-project/ray#53727); on a cluster started for this run, on this machine, a lost
    actor instead stops the run with a one-line error, and a rerun resumes from the shards."""
    import pyarrow as pa

    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True  # rows come back in discovery order
    # blocks of a few hundred work items: many decode tasks in flight, none of them long
    per_block = max(batch, min(1024, -(-len(todo) // (4 * max(1, actors) + 8))))
    blocks = []
    for lo in range(0, len(todo), per_block):
        part = todo[lo:lo + per_block]
        blocks.append(pa.table({
            "seq": pa.array(part, pa.int64()),
            "path": pa.array([str(work[s].path) for s in part], pa.string()),
            "row": pa.array([-1 if work[s].row is None else work[s].row for s in part],
                            pa.int64()),
            "reason": pa.array([work[s].reason for s in part], pa.string()),
            "known": pa.array([_known(table, work[s].row) for s in part], pa.string()),
        }))
    ds = ray.data.from_arrow(blocks)
    settings = spec["settings"]
    # Decoding tasks reserve the memory their decoded pixels take. That is also what keeps
    # Ray Data from fusing them into the actors (their resources differ): decoding stays in
    # CPU tasks of its own, beside the actors.
    ds = ds.map_batches(decode_batch, batch_size=batch, batch_format="numpy", num_cpus=1,
                        memory=_decode_memory(settings, batch),
                        fn_kwargs={"size": settings["size"], "scales": list(settings["scales"]),
                                   "max_pixels": int(settings["max_pixels"]), "sift": sift,
                                   "verify": settings.get("verify")})
    embed = dict(batch_size=batch, batch_format="numpy", compute=ActorPoolStrategy(size=actors),
                 num_gpus=spec["gpus"], num_cpus=spec["cpus"])
    if not restarts:
        # max_restarts has no named parameter yet; the **ray_remote_args that carry it warn of
        # their removal in Ray 2.64, after which the default (restarts) applies
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            try:
                return ds.map_batches(_bound(spec), **embed, max_restarts=0)
            except TypeError:
                pass
    return ds.map_batches(_bound(spec), **embed)


def _bound(spec: dict) -> type:
    """An Embedder class with its spec built in (pickled with the class: a restarted actor
    needs no constructor arguments kept in the object store)."""

    class BoundEmbedder(Embedder):
        def __init__(self) -> None:
            super().__init__(spec)

    return BoundEmbedder


__all__ = ["RayOptions", "run_ray_ingest", "shard_dir", "decode_batch", "Embedder"]
