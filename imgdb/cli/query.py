"""`imgdb query`: the images most similar to each query image (or stored id)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..errors import UsageError
from .options import (Bbox, Db, Device, GraphVersion, Json, OptDescriptor, OptModelVersion,
                      QueryExpansion, Rerank, SearchK, TopK, integer, output_file)
from .render import emit, query_output


def query_image(text: str) -> Path:
    """A query image argument: a file (a folder is a usage error; a missing file is the
    command's error, exit 1)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise typer.BadParameter(f"{text} is a directory; give image files (or --id N)")
    return path


def _check_combination(images: list, ids: list, index: Optional[str], descriptor: Optional[str],
                       pca: Optional[str], exact: bool, bbox, search_k: Optional[int],
                       qe: str = "0", rerank: Optional[str] = None,
                       graph: Optional[str] = None) -> None:
    """Options that would be ignored in this combination are refused (exit 2)."""
    if not images and not ids:
        raise UsageError("give at least one IMAGE or --id N")
    if rerank is not None and qe != "0":
        raise UsageError("--qe and --rerank are two re-rankings; give one (imgdb eval compares "
                         "them side by side)")
    if graph is not None and rerank is None:
        raise UsageError("--graph chooses the graph of --rerank; give --rerank too")
    if rerank is not None and search_k is not None:
        raise UsageError("--search-k tunes the Annoy search; --rerank ranks the whole graph")
    if index and descriptor:
        raise UsageError("--index and --descriptor both choose what to search; give one")
    if index and pca is not None:
        raise UsageError("--pca cannot be combined with --index: the index was built with its "
                         "own model (see imgdb index ls)")
    if pca is not None and not descriptor:
        raise UsageError("--pca needs --descriptor (with --index the index's model is used)")
    if exact and search_k is not None:
        raise UsageError("--search-k tunes the Annoy search; --exact compares every vector")
    if bbox is not None and not images:
        raise UsageError("--bbox crops query image files; --id queries use their stored vectors")


def query(
    db: Db,
    images: Annotated[Optional[List[Path]], typer.Argument(
        metavar="IMAGE...", parser=query_image, help="Query image files.")] = None,
    index: Annotated[Optional[str], typer.Option(
        "--index", metavar="NAME", help="Index name (see imgdb index ls).")] = None,
    descriptor: OptDescriptor = None,
    pca: OptModelVersion = None,
    k: TopK = 10,
    exact: Annotated[bool, typer.Option(
        "--exact", help="Brute-force search over every stored vector.")] = False,
    ids: Annotated[Optional[List[int]], typer.Option(
        "--id", parser=integer(0), metavar="N",
        help="Query by stored image id, >= 0 (repeatable).")] = None,
    bbox: Bbox = None,
    qe: QueryExpansion = "0",
    rerank: Rerank = None,
    graph: GraphVersion = None,
    search_k: SearchK = None,
    device: Device = "auto",
    html_out: Annotated[Optional[Path], typer.Option(
        "--html", parser=output_file, metavar="OUT.html",
        help="Also write a gallery page (thumbnails embedded) here.")] = None,
    as_json: Json = False,
) -> None:
    """Find the images most similar to each query image.

    Example: imgdb query ~/Desktop/that.jpg --db photos.h5 -k 20 --rerank diffusion
    """
    from ..retrieval.search import plan_query, run_queries
    from ..store import open_read

    images, ids = list(images or []), list(ids or [])
    _check_combination(images, ids, index, descriptor, pca, exact, bbox, search_k, qe, rerank,
                       graph)
    with open_read(db) as view:
        plan = plan_query(view, db, index, descriptor, pca, exact or rerank is not None)
    ranker = None
    if rerank is not None:
        from ..retrieval.rerank import parse_rerank

        ranker = parse_rerank(rerank)
    results = run_queries(db, images, ids, plan, k, tuple(bbox) if bbox else None, qe, device,
                          search_k, rerank=ranker, graph=graph)
    if html_out is not None:
        from ..retrieval.gallery import write_gallery

        write_gallery(results, html_out, f"imgdb query: {plan.descriptor} "
                                         f"({plan.index or 'exact'})")
    emit(query_output(plan, results, str(html_out) if html_out else None), as_json)


def register(app: typer.Typer) -> None:
    """Add `imgdb query`."""
    app.command()(query)
