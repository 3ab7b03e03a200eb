"""`imgdb query`: the images most similar to each query image (or stored id)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from .options import (Bbox, Db, Device, GraphVersion, Json, OptDescriptor, OptModelVersion,
                      QueryExpansion, Regions, Rerank, SearchK, TopK, Turns, integer,
                      output_file)
from .render import emit, query_output


def query_image(text: str) -> Path:
    """A query image argument: a file (a folder is a usage error; a missing file is the
    command's error, exit 1)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise typer.BadParameter(f"{text} is a directory; give image files (or --id N)")
    return path


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
    regions: Regions = False,
    turns: Turns = False,
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

    A phone photo of an object: imgdb query photo.jpg --db covers.h5 --regions --rerank verify
    """
    from ..retrieval.request import QueryRequest, parse_qe, parse_rerank
    from ..retrieval.service import QueryService

    request = QueryRequest(descriptor=descriptor, model=pca, index=index, exact=exact, k=k,
                           search_k=search_k, qe=parse_qe(qe),
                           rerank=parse_rerank(rerank) if rerank is not None else (),
                           graph=graph, bbox=tuple(bbox) if bbox else None, regions=regions,
                           turns=turns,
                           device=device)
    plan, results = QueryService(db, device).answer(request, list(images or []),
                                                    list(ids or []))
    if html_out is not None:
        from ..retrieval.gallery import write_gallery

        write_gallery(results, html_out, f"imgdb query: {plan.descriptor} "
                                         f"({plan.index or 'exact'})")
    emit(query_output(plan, results, str(html_out) if html_out else None), as_json)


def register(app: typer.Typer) -> None:
    """Add `imgdb query`."""
    app.command()(query)
