"""`imgdb ingest`: images -> network -> every pooled descriptor, into the store."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from ..errors import InvalidRequest as UsageError, UserError
from ..ingest.options import IngestOptions as D
from .choices import Backbone, Decoder, Engine, Precision
from .options import (BackboneOpt, BatchPixels, BatchSize, Buckets, CommitSeconds, Db,
                      DecoderOpt, Device, ForwardThreads, Json, KeepFreedMemory, KeepLocal,
                      VerifyFeatures,
                      Layers, MaxPixels, NameList, Paths, Poolings, PrecisionOpt, Quiet, Scales,
                      Size, TorchThreads, Weights, Workers, number)
from .render import emit, ingest_output


def _check_layers(backbone: str, layers: Optional[NameList], keep_local: List[str]) -> None:
    """Layers and --keep-local layers must be taps of the backbone (exit 2 naming them)."""
    from ..features.backbones import get_backbone, parse_layers

    net = get_backbone(backbone)
    wanted = [*(layers or ()), *(spec.partition(":")[0] for spec in keep_local)]
    if wanted:
        try:
            parse_layers(net, ",".join(wanted))
        except UserError as exc:
            raise UsageError(str(exc)) from None


def ingest(
    paths: Paths,
    db: Db,
    backbone: BackboneOpt = Backbone.vgg16,
    weights: Weights = D.weights,
    layers: Layers = None,
    pooling: Poolings = None,
    size: Size = D.size,
    scales: Scales = "1",
    device: Device = D.device,
    batch_size: BatchSize = D.batch_size,
    batch_pixels: BatchPixels = D.batch_pixels,
    buckets: Buckets = D.buckets,
    workers: Workers = D.workers,
    decode: DecoderOpt = Decoder.cpu,
    forward_threads: ForwardThreads = D.forward_threads,
    torch_threads: TorchThreads = D.torch_threads,
    keep_freed_memory: KeepFreedMemory = D.keep_freed_memory,
    precision: PrecisionOpt = Precision.fp32,
    max_pixels: MaxPixels = D.max_pixels,
    commit_seconds: CommitSeconds = D.commit_seconds,
    keep_local: KeepLocal = [],  # noqa: B006 (typer reads the default; never mutated)
    verify_features: VerifyFeatures = None,
    retry_failed: Annotated[bool, typer.Option(
        "--retry-failed", help="Retry every failed file (transient failures such as permissions "
                               "or memory are retried anyway).")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 if any image failed.")] = False,
    quiet: Quiet = False,
    as_json: Json = False,
    engine: Annotated[Engine, typer.Option(
        "--engine", case_sensitive=False,
        help="local (this machine) or ray (Ray Data: decoding in CPU tasks, the network in one "
             "actor per GPU or CPU slot; pip install 'imgdb[ray]').")] = Engine.local,
    address: Annotated[Optional[str], typer.Option(
        "--address", metavar="auto|ray://HOST:PORT",
        help="With --engine ray: the cluster (default RAY_ADDRESS, else a new local "
             "cluster).")] = None,
    gpus_per_worker: Annotated[Optional[float], typer.Option(
        "--gpus-per-worker", parser=number(0.0), metavar="G",
        help="With --engine ray: GPUs per network actor (default 1 when the cluster has GPUs, "
             "else 0).")] = None,
    cpus_per_worker: Annotated[Optional[float], typer.Option(
        "--cpus-per-worker", parser=number(0.0, above=True), metavar="C",
        help="With --engine ray: CPUs per network actor (its torch threads; default 1).")] = None,
) -> None:
    """Decode images, run the network once per batch, store every pooled descriptor.

    Example: imgdb ingest ~/photos --db photos.h5 --backbone efficientnet_lite0
    """
    from ..ingest import IngestOptions, run_ingest
    from .progress import ProgressReporter

    if engine is Engine.local and (address is not None or gpus_per_worker is not None
                                   or cpus_per_worker is not None):
        raise UsageError("--address, --gpus-per-worker and --cpus-per-worker go with "
                         "--engine ray")
    local = [spec for specs in keep_local for spec in specs]
    _check_layers(backbone.value, layers, local)
    options = IngestOptions(backbone=backbone.value, weights=weights,
                            layers=",".join(layers) if layers else None,
                            poolings=",".join(pooling) if pooling else None,
                            size=size, scales=tuple(scales), device=device, batch_size=batch_size,
                            workers=workers, precision=precision.value, max_pixels=max_pixels,
                            commit_seconds=commit_seconds,
                            keep_local=tuple(dict.fromkeys(local)), retry_failed=retry_failed,
                            batch_pixels=batch_pixels, buckets=buckets, decode=decode.value,
                            forward_threads=forward_threads, torch_threads=torch_threads,
                            keep_freed_memory=keep_freed_memory,
                            verify_features=verify_features)
    reporter = ProgressReporter(enabled=not quiet and not as_json, description="ingest")
    with reporter:
        if engine is Engine.ray:
            from ..ingest.ray_executor import RayOptions, run_ray_ingest

            ray_options = RayOptions(address=address, gpus_per_worker=gpus_per_worker,
                                     cpus_per_worker=cpus_per_worker or 1.0)
            summary = run_ray_ingest(paths, db, options, ray_options, progress=reporter.update,
                                     on_start=reporter.start)
        else:
            summary = run_ingest(paths, db, options, progress=reporter.update,
                                 on_start=reporter.start)
    emit(ingest_output(summary), as_json, quiet=quiet)
    if strict and summary.failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add `imgdb ingest`."""
    app.command()(ingest)
