"""Models kept in the store: `imgdb fit pca`, `fit codebook`, `fit graph`, and `encode` (apply
a codebook)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..errors import InvalidRequest as UsageError
from .choices import Aggregate, GraphMethod
from .options import (AggregateOpt, CodebookDims, CodebookK, CodebookPower, Db, Descriptor,
                      Device, Drop, EncodePower, Json, LocalKey, MaxFeatures, MethodOpt,
                      ModelVersion, PcaD, PcaDims, Power, PresetOpt, Quiet, Seed, SourceStore,
                      integer, number)
from .render import (codebook_model_output, emit, encode_output, graph_model_output,
                     pca_model_output, say)

fit_app = typer.Typer(help="Fit post-processing models (kept, versioned, inside the store).",
                      no_args_is_help=True)


@fit_app.command("pca")
def fit_pca(
    db: Db,
    descriptor: Descriptor,
    dims: PcaDims = None,
    no_whiten: Annotated[bool, typer.Option(
        "--no-whiten", help="PCA rotation only (better for max pooling: Babenko sec.4).")] = False,
    power: Power = None,
    source: SourceStore = None,
    as_json: Json = False,
) -> None:
    """L2 -> PCA (+whitening) -> L2, fitted on this store or another; saved as a new version.

    Example: imgdb fit pca --db photos.h5 --descriptor pool5/crow --dims 256
    """
    from ..retrieval.pca import fit_pca_model

    emit(pca_model_output(fit_pca_model(db, descriptor, dims, not no_whiten, power, source)),
         as_json)


@fit_app.command("codebook")
def fit_codebook(
    db: Db,
    local: LocalKey,
    method: MethodOpt = None,
    preset: PresetOpt = None,
    k: CodebookK = None,
    pca_d: PcaD = None,
    power: CodebookPower = None,
    rotate: Annotated[Optional[bool], typer.Option(
        "--rotate/--no-rotate", help="Learn the rotation (PCA-whitening) on aggregated training "
                                     "vectors (default: on, as the papers).")] = None,
    drop: Drop = None,
    dims: CodebookDims = None,
    max_features: MaxFeatures = 100_000,
    seed: Seed = 0,
    source: SourceStore = None,
    device: Device = "auto",
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Fit a codebook (local PCA, k-means or GMM, T-emb whitening, rotation); a new version.

    Example: imgdb fit codebook --db photos.h5 --local block6:max --method temb --preset hoang-1024
    """
    from ..codebooks.fit import PRESETS, CodebookOptions, fit_codebook as fit

    preset_method = PRESETS[preset.value][0] if preset else None
    if method is not None and preset_method is not None and method.value != preset_method:
        raise UsageError(f"--preset {preset.value} is a {preset_method} setting, not "
                         f"--method {method.value}")
    chosen = method.value if method is not None else preset_method or "temb"
    opts = CodebookOptions(method=chosen, preset=preset.value if preset else None, k=k,
                           pca_d=pca_d, max_features=max_features, power=power, rotate=rotate,
                           drop=drop, dims=dims, seed=seed, device=device)
    model = fit(db, local, opts, source, log=None if quiet or as_json else say)
    emit(codebook_model_output(model), as_json)


@fit_app.command("graph")
def fit_graph(
    db: Db,
    descriptor: Descriptor,
    pca: ModelVersion = "none",
    k: Annotated[int, typer.Option(
        "--k", parser=integer(1, 1000), metavar="K",
        help="Neighbours kept per image, 1-1000 (re-rankings use at most this many).")] = 10,
    gamma: Annotated[float, typer.Option(
        "--gamma", parser=number(0.0, above=True), metavar="G",
        help="Affinity exponent: edge weight = similarity^G (Iscen et al.), > 0.")] = 3.0,
    method: Annotated[GraphMethod, typer.Option(
        "--method", case_sensitive=False,
        help="exact (every pair, in blocks), annoy (the descriptor's current Annoy index), or "
             "auto (annoy when there is one).")] = GraphMethod.auto,
    search_k: Annotated[Optional[int], typer.Option(
        "--search-k", parser=integer(1), metavar="N",
        help="Annoy candidates per image with --method annoy (default: (K+1) x trees).")] = None,
    threads: Annotated[int, typer.Option(
        "--threads", parser=integer(1, 256), metavar="N",
        help="Annoy search threads, 1-256.")] = 1,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """The kNN graph of every stored image (for --rerank diffusion|kreciprocal); a new version.

    Example: imgdb fit graph --db photos.h5 --descriptor head/gem-p3 --k 10
    """
    from ..retrieval.graph import fit_graph as fit
    from .progress import ProgressReporter

    if search_k is not None and method is GraphMethod.exact:
        raise UsageError("--search-k tunes the Annoy search; --method exact compares every pair")
    reporter = ProgressReporter(enabled=not quiet and not as_json, description="graph")
    with reporter:
        model = fit(db, descriptor, pca, k, gamma, method.value, search_k, threads,
                    log=None if quiet or as_json else say,
                    progress=lambda done, total: (reporter.start(total),
                                                  reporter.update(done, total)))
    emit(graph_model_output(model), as_json)


def encode(
    db: Db,
    codebook: Annotated[str, typer.Option(
        "--codebook", "-c", metavar="vN|latest|ID",
        help="Codebook version (vN, latest) or full id codebook/EXTRACTOR/KEY/vN (see imgdb "
             "models).")] = "latest",
    local: Annotated[Optional[str], typer.Option(
        "--local", metavar="EXTRACTOR/LAYER[:MASK]",
        help="Which local features, when vN is ambiguous.")] = None,
    aggregate: AggregateOpt = Aggregate.sum,
    power: EncodePower = None,
    device: Device = "auto",
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Encode every image's local features with a codebook into a new descriptor.

    The result is a descriptor like any pooling (fit pca, index build, query, eval use it).
    Images ingested later are encoded by running the same command again.

    Example: imgdb encode --db photos.h5 --codebook v2 --aggregate democratic
    """
    from ..codebooks.encode import run_encode
    from .progress import ProgressReporter

    power_value: object = "model" if power is None else None if power == "none" else power
    reporter = ProgressReporter(enabled=not quiet and not as_json, description="encode")
    with reporter:
        summary = run_encode(db, codebook, local, aggregate.value, power_value, device,
                             progress=lambda done, total: (reporter.start(total) if done == 0
                                                           else reporter.update(done, total)))
    emit(encode_output(summary), as_json)


def register(app: typer.Typer) -> None:
    """Add `imgdb fit pca|codebook|graph` and `imgdb encode`."""
    app.add_typer(fit_app, name="fit")
    app.command()(encode)
