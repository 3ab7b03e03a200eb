"""The `imgdb` command line: parses options, calls the library, prints results. No computation.

Heavy imports (torch, the network code) happen inside the commands that need them, so
`imgdb --help`, `imgdb info` and friends start fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UsageError, UserError

app = typer.Typer(
    name="imgdb",
    help="Image retrieval with pooled CNN descriptors: ingest photos into an HDF5 store, "
         "fit PCA-whitening, build indexes, query, evaluate.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich" if sys.stdout.isatty() else None,  # plain help when piped
)

_STATE = {"debug": False}

DbOption = typer.Option(..., "--db", envvar="IMGDB_DB", help="The store (an HDF5 file). Env: IMGDB_DB.")
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")
QuietOption = typer.Option(False, "--quiet", "-q", help="No progress bar or log lines on stderr.")


def _err(message: str) -> None:
    typer.echo(message, err=True)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    _STATE["debug"] = debug


# --------------------------------------------------------------------------------------------
# ingest


@app.command()
def ingest(
    paths: List[Path] = typer.Argument(..., metavar="PATH...", help="Image files and/or folders (searched recursively)."),
    db: Path = DbOption,
    backbone: str = typer.Option("vgg16", "--backbone", "-b",
                                 help="vgg16, vgg19, resnet50, resnet101, googlenet, "
                                      "efficientnet_lite0, efficientnet_lite2."),
    weights: str = typer.Option("imagenet", "--weights", "-w",
                                help="imagenet, none (random, for shape tests) or a state_dict FILE."),
    layers: Optional[str] = typer.Option(None, "--layers", "-l",
                                         help="Comma-separated taps by the papers' names, e.g. "
                                              "pool5,conv5_3 (default: the backbone's usual ones)."),
    pooling: Optional[str] = typer.Option(None, "--pooling", "-p",
                                          help="Comma-separated poolings (default: all training-free "
                                               "ones: sum,spoc,mac,mac2x2,crow,crow-sw,crow-ssw,"
                                               "gem-p3,rmac-l3)."),
    size: str = typer.Option("max:1024", "--size",
                             help="Input size policy: original | max:N | min:N | fixed:N | fixed:WxH."),
    scales: str = typer.Option("1", "--scales",
                               help="Comma-separated input scales, e.g. 2 (Ng's scale 2) or 1,0.707 "
                                    "(mean of L2-normalised per-scale vectors)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per forward pass."),
    workers: int = typer.Option(min(8, os.cpu_count() or 1), "--workers", min=0,
                                help="Decoding threads (0: decode in the main thread)."),
    precision: str = typer.Option("fp32", "--precision",
                                  help="fp32, or fp16/bf16 autocast on CUDA (pooling stays fp32)."),
    max_pixels: int = typer.Option(120_000_000, "--max-pixels",
                                   help="Refuse images with more pixels (decompression bombs)."),
    commit_seconds: float = typer.Option(2.0, "--commit-seconds", min=0.0,
                                         help="How often finished rows are committed to the store."),
    keep_local: List[str] = typer.Option([], "--keep-local", metavar="LAYER[:MASK]",
                                         help="Also keep the local conv features of LAYER (float16) "
                                              "for codebook methods, all cells or those of a mask: "
                                              "max, sum or sift (Hoang sec.3.2). Repeatable."),
    retry_failed: bool = typer.Option(False, "--retry-failed",
                                      help="Retry every failed file (transient failures such as "
                                           "permissions or memory are retried anyway)."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 if any image failed."),
    quiet: bool = QuietOption,
    as_json: bool = JsonOption,
    engine: str = typer.Option("local", "--engine",
                               help="local (this process) or ray (Ray Data: decoding in CPU "
                                    "tasks, the network in one actor per GPU or CPU slot; "
                                    "pip install 'imgdb[ray]')."),
    address: Optional[str] = typer.Option(None, "--address",
                                          help="With --engine ray: the cluster (auto, "
                                               "ray://HOST:10001); default RAY_ADDRESS or a new "
                                               "local cluster."),
    gpus_per_worker: Optional[float] = typer.Option(None, "--gpus-per-worker", min=0,
                                                    help="With --engine ray: GPUs per network "
                                                         "actor (default 1 when the cluster has "
                                                         "GPUs, else 0)."),
    cpus_per_worker: float = typer.Option(1.0, "--cpus-per-worker", min=0.01,
                                          help="With --engine ray: CPUs per network actor "
                                               "(its torch threads)."),
) -> None:
    """Decode images, run the network once per batch, store every pooled descriptor.

    Example: imgdb ingest ~/photos --db photos.h5 --backbone efficientnet_lite0
    """
    from ..ingest import IngestOptions, run_ingest
    from .progress import ProgressReporter

    try:
        scale_values = tuple(float(s) for s in scales.split(",") if s.strip())
    except ValueError:
        raise typer.BadParameter(f"--scales {scales!r} must be comma-separated numbers") from None
    if not scale_values or any(s <= 0 for s in scale_values):
        raise typer.BadParameter("--scales must be positive numbers")
    options = IngestOptions(backbone=backbone, weights=weights, layers=layers, poolings=pooling,
                            size=size, scales=scale_values, device=device, batch_size=batch_size,
                            workers=workers, precision=precision, max_pixels=max_pixels,
                            commit_seconds=commit_seconds,
                            keep_local=tuple(k for spec in keep_local for k in spec.split(",") if k),
                            retry_failed=retry_failed)
    if engine not in ("local", "ray"):
        raise typer.BadParameter("--engine must be local or ray")
    if engine == "local" and (address or gpus_per_worker is not None or cpus_per_worker != 1.0):
        raise typer.BadParameter("--address, --gpus-per-worker and --cpus-per-worker go with "
                                 "--engine ray")
    reporter = ProgressReporter(enabled=not quiet and not as_json, description="ingest")
    with reporter:
        if engine == "ray":
            from ..ingest.ray_executor import RayOptions, run_ray_ingest

            summary = run_ray_ingest(paths, db, options,
                                     RayOptions(address=address, gpus_per_worker=gpus_per_worker,
                                                cpus_per_worker=cpus_per_worker),
                                     progress=reporter.update, on_start=reporter.start)
        else:
            summary = run_ingest(paths, db, options, progress=reporter.update,
                                 on_start=reporter.start)
    if as_json:
        typer.echo(json.dumps({
            "store": summary.store, "extractor": summary.extractor,
            "discovered": summary.discovered, "new": summary.new, "changed": summary.changed,
            "computed": summary.recomputed, "retried": summary.retried,
            "unchanged": summary.unchanged, "ok": summary.ok,
            "failed": summary.failed, "missing": summary.missing,
            "seconds": round(summary.seconds, 3),
            "failures": [{"path": p, "error": e} for p, e in summary.failures],
            "problems": [{"path": p, "error": e} for p, e in summary.problems],
            **({"engine": summary.engine} if summary.engine else {}),
        }, indent=2))
    else:
        if not quiet:
            for path, reason in summary.problems:
                _err(f"skipped {path}: {reason}")
            for path, reason in summary.failures:
                _err(f"failed {path}: {reason}")
        typer.echo(summary.line())
    if strict and summary.failed:
        raise typer.Exit(1)


# --------------------------------------------------------------------------------------------
# info


@app.command()
def info(
    db: Path = DbOption,
    as_json: bool = JsonOption,
    failures: int = typer.Option(20, "--failures", help="How many failed files to list (-1: all)."),
) -> None:
    """Show what a store holds: images, extractors, descriptors, models, indexes, failures.

    Example: imgdb info --db photos.h5
    """
    from ..inventory import store_report
    from .render import render_report

    report = store_report(db)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(render_report(report, failures))


@app.command()
def check(
    db: Path = DbOption,
    indexes: bool = typer.Option(True, "--indexes/--no-indexes",
                                 help="Also re-digest every registered index file."),
    as_json: bool = JsonOption,
) -> None:
    """Verify a store: every checksum, the structure, the registries, the index files.

    Exit 1 when something is damaged (and say what); `imgdb repair` mends it.

    Example: imgdb check --db photos.h5
    """
    from ..store.check import check_store

    report = check_store(db, verify_indexes=indexes)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    elif report.ok:
        typer.echo(f"{db}: ok ({report.rows} rows, {report.datasets} datasets, "
                   f"{report.bytes_read / 1e6:.1f} MB read, {report.indexes} index files "
                   f"verified, {report.seconds:.1f}s)")
    else:
        typer.echo(f"{db}: DAMAGED ({len(report.problems)} problems)")
        for p in report.problems:
            typer.echo(f"  {p.line()}")
        _err(f"repair it with: imgdb repair --db {db} (intact rows are kept; damaged vectors "
             f"are recomputed by the next ingest)")
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def repair(db: Path = DbOption, as_json: bool = JsonOption) -> None:
    """Rebuild a store from every intact row, model and index; keep the old file as a backup.

    Also reclaims dead space, finishes an interrupted commit, and upgrades stores written by
    imgdb 0.1. Rows whose vectors were damaged become pending: rerun ingest to recompute them.

    Example: imgdb repair --db photos.h5
    """
    from ..store.check import repair_store

    report = repair_store(db)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    pending = sum(report.pending_rows.values())
    typer.echo(f"{db}: rebuilt {report.rows} rows ({report.lost_rows} lost, {pending} to "
               f"recompute), {report.models} models, {report.indexes} indexes; "
               f"{report.bytes_before / 1e6:.1f} MB -> {report.bytes_after / 1e6:.1f} MB in "
               f"{report.seconds:.1f}s; old file kept as {report.backup}")
    for what in report.dropped:
        _err(f"dropped {what}")
    if pending:
        _err("rows to recompute: rerun the ingest command that made this store")


# --------------------------------------------------------------------------------------------
# fit / models

fit_app = typer.Typer(help="Fit post-processing models (kept, versioned, inside the store).",
                      no_args_is_help=True)
app.add_typer(fit_app, name="fit")

DescriptorOption = typer.Option(..., "--descriptor", "-d",
                                help="EXTRACTOR/LAYER/POOLING as printed by imgdb info "
                                     "(a unique suffix such as pool5/crow is enough).")


@fit_app.command("pca")
def fit_pca(
    db: Path = DbOption,
    descriptor: str = DescriptorOption,
    dims: Optional[int] = typer.Option(None, "--dims", min=1,
                                       help="Output dimensions (default: all the data allows)."),
    no_whiten: bool = typer.Option(False, "--no-whiten",
                                   help="PCA rotation only (better for max pooling: Babenko sec.4)."),
    power: Optional[float] = typer.Option(None, "--power", help="Power-normalise first: sign(x)|x|^a."),
    source: Optional[Path] = typer.Option(None, "--from",
                                          help="Fit on another store (held-out protocol, e.g. Paris "
                                               "for Oxford); it needs the same descriptor."),
    as_json: bool = JsonOption,
) -> None:
    """L2 -> PCA (+whitening) -> L2, fitted on this store or another; saved as a new version.

    Example: imgdb fit pca --db photos.h5 --descriptor pool5/crow --dims 256
    """
    from ..retrieval.pca import fit_pca_model

    model = fit_pca_model(db, descriptor, dims, not no_whiten, power, source)
    if as_json:
        typer.echo(json.dumps({"model": model.id, "version": model.version, **model.attrs}, indent=2))
    else:
        a = model.attrs
        typer.echo(f"{model.id}: {a['input_dim']} -> {a['dims']} dims, "
                   f"{'whitened' if a['whiten'] else 'no whitening'}"
                   f"{', power ' + format(a['power'], 'g') if a['power'] else ''}, fitted on "
                   f"{a['image_count']} images of {a['fitted_on']}")


@fit_app.command("codebook")
def fit_codebook_cmd(
    db: Path = DbOption,
    local: str = typer.Option(..., "--local", metavar="EXTRACTOR/LAYER[:MASK]",
                              help="Local features kept by ingest --keep-local (a unique suffix "
                                   "such as block6:max is enough)."),
    method: str = typer.Option("temb", "--method", "-m",
                               help="vlad (Ng sec.3.3), temb (triangulation embedding, Hoang "
                                    "sec.4) or fv (Fisher vector, diagonal GMM)."),
    preset: Optional[str] = typer.Option(None, "--preset",
                                         help="Paper settings by name: ng (vlad k=100), "
                                              "hoang-512/1024/2048/4096/8064 (temb, Hoang Table 4: "
                                              "d, |C| per final dims), hoang-vlad, hoang-fv (Table 2). "
                                              "Default: ng, hoang-1024, hoang-fv."),
    k: Optional[int] = typer.Option(None, "--k", min=1, help="Codebook size (overrides the preset)."),
    pca_d: Optional[int] = typer.Option(None, "--pca-d", min=0,
                                        help="Local PCA dims before the codebook (0: none; "
                                             "overrides the preset)."),
    power: Optional[float] = typer.Option(None, "--power",
                                          help="Power-law alpha after aggregation (default 0.5 "
                                               "for temb/fv, none for vlad)."),
    rotate: Optional[bool] = typer.Option(None, "--rotate/--no-rotate",
                                          help="Learn the rotation (PCA-whitening) on aggregated "
                                               "training vectors (default: on, as the papers)."),
    drop: Optional[int] = typer.Option(None, "--drop", min=0,
                                       help="Rotated components dropped (default 128 for temb)."),
    dims: Optional[int] = typer.Option(None, "--dims", min=1,
                                       help="Rotated components kept after the drop (default: "
                                            "128 for ng, Ng's PCA-whitening; all for Hoang's)."),
    max_features: int = typer.Option(100_000, "--max-features", min=1,
                                     help="Local features sampled (uniformly, seeded) for the fit."),
    seed: int = typer.Option(0, "--seed", help="Seed for sampling and k-means."),
    source: Optional[Path] = typer.Option(None, "--from",
                                          help="Fit on another store's local features (held-out "
                                               "protocol); it needs the same extractor and key."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    quiet: bool = QuietOption,
    as_json: bool = JsonOption,
) -> None:
    """Fit a codebook (local PCA, k-means or GMM, T-emb whitening, rotation); a new version.

    Example: imgdb fit codebook --db photos.h5 --local block6:max --method temb --preset hoang-1024
    """
    from ..codebooks.fit import CodebookOptions, fit_codebook

    opts = CodebookOptions(method=method, preset=preset, k=k, pca_d=pca_d,
                           max_features=max_features, power=power, rotate=rotate, drop=drop,
                           dims=dims,
                           seed=seed, device=device)
    model = fit_codebook(db, local, opts, source, log=None if quiet or as_json else _err)
    a = model.attrs
    if as_json:
        typer.echo(json.dumps({"model": model.id, "version": model.version, **a}, indent=2))
    else:
        typer.echo(f"{model.id}: {a['method']} k={a['k']} local-pca={a['pca_d'] or '-'} -> "
                   f"{a['dims']} dims, fitted on {a['feature_count']} local features of "
                   f"{a['image_count']} images of {a['fitted_on']} in {a['seconds']:.1f}s")


@app.command()
def encode(
    db: Path = DbOption,
    codebook: str = typer.Option("latest", "--codebook", "-c",
                                 help="Codebook version (vN, latest) or full id "
                                      "codebook/EXTRACTOR/KEY/vN (see imgdb models)."),
    local: Optional[str] = typer.Option(None, "--local",
                                        help="Which local features, when vN is ambiguous."),
    aggregate: str = typer.Option("sum", "--aggregate", "-a",
                                  help="sum, or democratic (Jegou & Zisserman 2014; Hoang sec.4.3)."),
    power: Optional[str] = typer.Option(None, "--power",
                                        help="Power-law alpha, or none (default: the codebook's)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    quiet: bool = QuietOption,
    as_json: bool = JsonOption,
) -> None:
    """Encode every image's local features with a codebook into a new descriptor.

    The result is a descriptor like any pooling (fit pca, index build, query, eval use it).
    Images ingested later are encoded by running the same command again.

    Example: imgdb encode --db photos.h5 --codebook v2 --aggregate democratic
    """
    from ..codebooks.encode import run_encode
    from .progress import ProgressReporter

    if power is None:
        power_value: object = "model"
    elif power.lower() == "none":
        power_value = None
    else:
        try:
            power_value = float(power)
        except ValueError:
            raise typer.BadParameter(f"--power {power!r} must be a number or none") from None
    reporter = ProgressReporter(enabled=not quiet and not as_json, description="encode")
    with reporter:
        summary = run_encode(db, codebook, local, aggregate, power_value, device,
                             progress=lambda done, total: (reporter.start(total) if done == 0
                                                           else reporter.update(done, total)))
    if as_json:
        typer.echo(json.dumps({"descriptor": summary.descriptor, "encoded": summary.encoded,
                               "total": summary.total, "dims": summary.dims,
                               "seconds": round(summary.seconds, 3)}, indent=2))
    else:
        typer.echo(summary.line())


@app.command()
def models(
    db: Path = DbOption,
    remove: Optional[str] = typer.Option(None, "--remove",
                                         help="Delete one model by id (KIND/DESCRIPTOR/vN, as listed)."),
    as_json: bool = JsonOption,
) -> None:
    """List the fitted models with their provenance, or remove one explicitly.

    Example: imgdb models --db photos.h5
    """
    from ..store import StoreWriter, open_read

    if remove:
        with StoreWriter(db, create=False) as writer:
            with writer.read() as view:
                model = view.model_by_id(remove)
                if model is None:
                    known = ", ".join(m.id for m in view.models()) or "none"
                    raise UserError(f"the store has no model {remove!r}; models: {known}")
            writer.remove_model(model)
        typer.echo(f"removed {remove}")
        return
    with open_read(db) as view:
        found = view.models()
    if as_json:
        typer.echo(json.dumps([{"id": m.id, "kind": m.kind, "descriptor": m.descriptor,
                                "version": m.version, **m.attrs} for m in found], indent=2))
        return
    if not found:
        typer.echo("no models (fit one with: imgdb fit pca --db STORE --descriptor DESCRIPTOR)")
    for m in found:
        a = m.attrs
        if m.kind == "codebook":
            typer.echo(f"{m.id}  method={a.get('method')} k={a.get('k')} "
                       f"local-pca={a.get('pca_d') or '-'} dims={a.get('dims')} "
                       f"images={a.get('image_count')} from={a.get('fitted_on')} "
                       f"created={a.get('created')}")
            continue
        typer.echo(f"{m.id}  dims={a.get('dims')} whiten={bool(a.get('whiten'))} "
                   f"power={a.get('power') or '-'} images={a.get('image_count')} "
                   f"from={a.get('fitted_on')} created={a.get('created')}")


# --------------------------------------------------------------------------------------------
# index

index_app = typer.Typer(help="Annoy indexes registered in the store.", no_args_is_help=True)
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(
    db: Path = DbOption,
    descriptor: str = DescriptorOption,
    pca: str = typer.Option("none", "--pca", help="Model version (v1, v2, latest) or none."),
    name: Optional[str] = typer.Option(None, "--name", help="Index name (default from descriptor "
                                                              "and model)."),
    trees: int = typer.Option(50, "--trees", min=1, help="Annoy trees (more: better recall)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (builds are reproducible)."),
    as_json: bool = JsonOption,
    shards: int = typer.Option(1, "--shards", min=1,
                               help="Split the rows into N Annoy files built in parallel "
                                    "processes (one logical index; queries search every shard)."),
) -> None:
    """Build an Annoy index of a descriptor under a model; written atomically and registered.

    Example: imgdb index build --db photos.h5 --descriptor pool5/crow --pca v1
    """
    from ..retrieval.index import build_index

    info = build_index(db, descriptor, pca, name, trees, seed, shards=shards)
    if as_json:
        typer.echo(json.dumps({"name": info.name, **info.attrs}, indent=2))
    else:
        a = info.attrs
        where = a["file"] if shards == 1 else f"{shards} shards {a['file']} ..."
        typer.echo(f"index {info.name}: {a['items']} items x {a['dims']} dims, {a['trees']} trees, "
                   f"model {a['model']}, built in {a['build_seconds']:.2f}s -> {where}")


@index_app.command("ls")
def index_ls(db: Path = DbOption, as_json: bool = JsonOption) -> None:
    """List indexes and whether each is current or stale (and why).

    Example: imgdb index ls --db photos.h5
    """
    from ..retrieval.index import list_indexes
    from ..store import open_read

    with open_read(db) as view:
        found = list_indexes(view, db, verify=True)
    if as_json:
        typer.echo(json.dumps([{"name": i.name, "current": i.problem is None,
                                "stale_reason": i.stale, "damaged": i.damaged,
                                **i.attrs} for i in found], indent=2))
        return
    if not found:
        typer.echo("no indexes (build one with: imgdb index build --db STORE --descriptor D)")
    for i in found:
        a = i.attrs
        state = ("current" if i.problem is None else f"STALE: {i.stale}" if i.stale
                 else f"DAMAGED: {i.damaged}")
        shards = f" shards={a['shards']}" if int(a.get("shards", 1)) > 1 else ""
        typer.echo(f"{i.name}  {a['descriptor']} model={a['model']} items={a['items']} "
                   f"dims={a['dims']} trees={a['trees']}{shards}  {state}")


@index_app.command("rm")
def index_rm(name: str = typer.Argument(..., help="Index name as listed by index ls."),
             db: Path = DbOption) -> None:
    """Remove an index (registry entry and file).

    Example: imgdb index rm NAME --db photos.h5
    """
    from ..retrieval.index import remove_index

    remove_index(db, name)
    typer.echo(f"removed index {name}")


# --------------------------------------------------------------------------------------------
# query


def _parse_bbox(text: Optional[str]) -> Optional[tuple[float, float, float, float]]:
    if not text:
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter("--bbox takes x1,y1,x2,y2 in pixels") from None
    if x2 <= x1 or y2 <= y1:
        raise typer.BadParameter("--bbox needs x2 > x1 and y2 > y1")
    return x1, y1, x2, y2


@app.command()
def query(
    images: Optional[List[Path]] = typer.Argument(None, metavar="IMAGE...",
                                                  help="Query image files."),
    db: Path = DbOption,
    index: Optional[str] = typer.Option(None, "--index", help="Index name (see imgdb index ls)."),
    descriptor: Optional[str] = typer.Option(None, "--descriptor", "-d",
                                             help="Descriptor to search (uses its index, or "
                                                  "brute force with --exact)."),
    pca: Optional[str] = typer.Option(None, "--pca", help="Model version for --exact (default none)."),
    k: int = typer.Option(10, "-k", "--top", min=1, help="Results per query."),
    exact: bool = typer.Option(False, "--exact", help="Brute-force search over stored vectors."),
    ids: Optional[List[int]] = typer.Option(None, "--id", help="Query by stored image id (repeatable)."),
    bbox: Optional[str] = typer.Option(None, "--bbox", help="Crop the query: x1,y1,x2,y2 pixels."),
    qe: int = typer.Option(0, "--qe", min=0, help="Average query expansion with the top M results."),
    search_k: Optional[int] = typer.Option(None, "--search-k", min=1,
                                           help="Annoy candidates to inspect (default max(10000, "
                                                "k x trees)); more: better recall, slower."),
    device: str = typer.Option("auto", "--device", help="For extracting query descriptors."),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Write a gallery page here."),
    as_json: bool = JsonOption,
) -> None:
    """Find the images most similar to each query image.

    Example: imgdb query ~/Desktop/that.jpg --db photos.h5 -k 20
    """
    from ..retrieval.search import plan_query, run_queries
    from ..store import open_read

    if not images and not ids:
        raise typer.BadParameter("give at least one IMAGE or --id")
    with open_read(db) as view:
        plan = plan_query(view, db, index, descriptor, pca, exact)
    results = run_queries(db, images or [], ids or [], plan, k, _parse_bbox(bbox), qe, device,
                          search_k)
    if html_out:
        from ..retrieval.gallery import write_gallery

        write_gallery(results, html_out, f"imgdb query: {plan.descriptor} "
                                         f"({plan.index or 'exact'})")
    if as_json:
        typer.echo(json.dumps({
            "descriptor": plan.descriptor, "model": plan.model or "none",
            "index": plan.index, "exact": plan.index is None,
            "queries": [{"query": r.query, "source": r.source,
                         "results": [{"rank": h.rank, "score": round(h.score, 6), "id": h.id,
                                      "path": h.path} for h in r.hits]} for r in results],
        }, indent=2))
        return
    for r in results:
        typer.echo(f"query {r.query}  [{plan.descriptor}, {plan.index or 'exact search'}]")
        for h in r.hits:
            typer.echo(f"{h.rank:>4}  {h.score:8.4f}  {h.id:>7}  {h.path}")
    if html_out and not as_json:
        _err(f"gallery written to {html_out}")


# --------------------------------------------------------------------------------------------
# eval


def _int_list(text: Optional[str]) -> list[int]:
    if not text:
        return []
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r} must be comma-separated integers") from None


@app.command("eval")
def eval_(
    db: Path = DbOption,
    gt: Optional[Path] = typer.Option(None, "--gt", help="Ground truth: Oxford/Paris gt folder, "
                                                          "revisitop .pkl, .csv, or a folder of groups."),
    protocol: str = typer.Option("auto", "--protocol",
                                 help="auto, oxford, roxford, holidays, ukbench, csv, groups."),
    descriptor: List[str] = typer.Option(["all"], "--descriptor", "-d",
                                         help="Descriptor(s) to evaluate, or all (repeatable)."),
    dims: Optional[str] = typer.Option(None, "--dims", help="PCA dimensions, e.g. 512,256,128."),
    pca_from: Optional[List[Path]] = typer.Option(None, "--pca-from",
                                                  help="Learn PCA-whitening on another store "
                                                       "(held-out protocol; repeatable)."),
    pca_on_test: bool = typer.Option(False, "--pca-on-test",
                                     help="Learn PCA-whitening on this store (Babenko's 'PCA on test')."),
    no_whiten: bool = typer.Option(False, "--no-whiten", help="PCA rotation without whitening."),
    power: Optional[float] = typer.Option(None, "--power", help="Power-normalise first."),
    query_mode: str = typer.Option("full", "--query",
                                   help="full, crop-image or crop-features (query bounding boxes)."),
    qe: int = typer.Option(0, "--qe", min=0, help="Average query expansion with the top M."),
    queries: Optional[Path] = typer.Option(None, "--queries",
                                           help="Folder of query images (never added to the store)."),
    queries_db: Optional[Path] = typer.Option(None, "--queries-db",
                                              help="A second store holding the query images."),
    group_regex: Optional[str] = typer.Option(None, "--group-regex",
                                              help="Groups from file names, e.g. 'obj(\\d+)__' "
                                                   "(every image queries its group)."),
    device: str = typer.Option("auto", "--device", help="For extracting query images."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write per-query AP, PR plots, "
                                                                  "worst queries here."),
    as_json: bool = JsonOption,
    as_csv: bool = typer.Option(False, "--csv", help="Print CSV on stdout."),
) -> None:
    """Evaluate descriptors on a benchmark's ground truth and print the papers' table.

    Example: imgdb eval --db oxford5k.h5 --gt gt_files_170407/ --pca-from paris6k.h5 --dims 512,256
    """
    from ..evaluation.evaluate import EvalOptions, render_table, result_csv, result_json, run_eval

    if query_mode not in ("full", "crop-image", "crop-features"):
        raise typer.BadParameter("--query must be full, crop-image or crop-features")
    if gt is None and not group_regex and protocol not in ("holidays", "ukbench"):
        raise typer.BadParameter("give --gt PATH (or --group-regex, or --protocol holidays|ukbench)")
    opts = EvalOptions(descriptors=descriptor, dims=_int_list(dims), pca_on_test=pca_on_test,
                       pca_from=pca_from or [], whiten=not no_whiten, power=power,
                       query_mode=query_mode, qe=qe, queries_dir=queries, queries_db=queries_db,
                       protocol=protocol, group_regex=group_regex, device=device)
    result = run_eval(db, gt, opts)
    if report:
        from ..evaluation.report import write_report

        write_report(result, report, db)
        _err(f"report written to {report}")
    if as_json:
        typer.echo(json.dumps(result_json(result), indent=2))
    elif as_csv:
        typer.echo(result_csv(result), nl=False)
    else:
        typer.echo(render_table(result, f"{result.protocol} ({result.gt_source})"))


# --------------------------------------------------------------------------------------------
# merge


@app.command()
def merge(
    shards: List[Path] = typer.Argument(..., metavar="STORE...",
                                        help="Stores to join (appended in this order)."),
    db: Path = DbOption,
    quiet: bool = QuietOption,
    as_json: bool = JsonOption,
) -> None:
    """Join stores of the same extractor settings into --db (created if absent).

    Rows are appended in the order the stores are given; a path --db already holds is not
    added again (merging twice adds nothing). Models and indexes are not merged.

    Example: imgdb merge part1.h5 part2.h5 --db photos.h5
    """
    from ..store.merge import merge_stores
    from .progress import ProgressReporter

    reporter = ProgressReporter(enabled=not quiet and not as_json, description="merge")
    with reporter:
        summary = merge_stores(shards, db, progress=lambda done, total: (
            reporter.start(total), reporter.update(done, total)))
    if as_json:
        typer.echo(json.dumps(summary.as_dict(), indent=2))
        return
    if summary.ignored and not quiet:
        _err("not merged (codebook encodings belong to one store's codebook; run imgdb encode "
             "on the merged store): " + ", ".join(summary.ignored))
    typer.echo(summary.line())


# --------------------------------------------------------------------------------------------


def main() -> None:
    """Entry point: run the app; user errors become one line on stderr and exit 1."""
    try:
        result = app(prog_name="imgdb", standalone_mode=False)
        if isinstance(result, int) and result:
            if result == 130:  # typer turns Ctrl-C into Exit(130); click returns that code
                _err("interrupted; what was committed is kept, rerun the command to finish")
            sys.exit(result)
    except UserError as exc:
        if _STATE["debug"]:
            raise
        _err(f"error: {exc}")
        sys.exit(2 if isinstance(exc, UsageError) else 1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        _err("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        _err("interrupted; what was committed is kept, rerun the command to finish")
        sys.exit(130)
    except Exception as exc:  # usage errors (typer's click) and anything unexpected
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # a click usage error: exit 2
            exc.show()
            sys.exit(exc.exit_code)
        if type(exc).__name__ == "Exit" and hasattr(exc, "exit_code"):
            sys.exit(exc.exit_code)
        if _STATE["debug"]:
            raise
        _err(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for details)")
        sys.exit(1)
