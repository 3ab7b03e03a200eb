"""`imgdb serve` and `imgdb explain`: a search page and JSON API over a store, and the
explanation maps of a match as pictures. `register(app)` adds both commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError

DbOption = typer.Option(..., "--db", envvar="IMGDB_DB", help="The store (an HDF5 file). Env: IMGDB_DB.")
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")


def _err(message: str) -> None:
    typer.echo(message, err=True)




def serve(
    db: Path = DbOption,
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Address to listen on (default: this machine only)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port (0: any free one)."),
    descriptor: Optional[str] = typer.Option(None, "--descriptor", "-d",
                                             help="Default descriptor (its index, or exact "
                                                  "search when it has none)."),
    index: Optional[str] = typer.Option(None, "--index", help="Default index (see imgdb index ls)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N] for the network."),
    max_upload_mb: int = typer.Option(32, "--max-upload-mb", min=1,
                                      help="Largest request body accepted, in MiB."),
    max_pixels: int = typer.Option(40_000_000, "--max-pixels", min=1024,
                                   help="Largest image accepted (pixels), uploads and stored."),
) -> None:
    """Serve a store: a search page and a JSON API, with the network and index loaded once.

    Example: imgdb serve --db photos.h5   (then open http://127.0.0.1:8000/)
    """
    try:
        from ..serve.app import serve as run_server
    except ImportError as exc:
        raise UserError(f"imgdb serve needs the serve extra ({exc.name} is missing): "
                        f"pip install 'imgdb[serve]'") from None
    run_server(db, host, port, descriptor, index, device, max_upload_mb, max_pixels)


def explain(
    image: Path = typer.Argument(..., metavar="IMAGE", help="The query image file."),
    db: Path = DbOption,
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the PNG maps and index.html."),
    result: Optional[int] = typer.Option(None, "--result", min=0,
                                         help="Stored image id to explain the match with "
                                              "(default: the best match other than itself)."),
    index: Optional[str] = typer.Option(None, "--index", help="Index whose descriptor and "
                                                              "model to use."),
    descriptor: Optional[str] = typer.Option(None, "--descriptor", "-d",
                                             help="Descriptor (with --pca for its model)."),
    pca: Optional[str] = typer.Option(None, "--pca", help="Model version with --descriptor."),
    patch: Optional[int] = typer.Option(None, "--patch", min=1,
                                        help="Occlusion patch side in pixels of the network "
                                             "input (default: a quarter of the short side)."),
    stride: Optional[int] = typer.Option(None, "--stride", min=1,
                                         help="Occlusion patch step (default: half the patch)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1,
                                   help="Occluded copies per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    as_json: bool = JsonOption,
) -> None:
    """Draw why an image matches a result: CroW weights, similarity and occlusion maps.

    Example: imgdb explain that.jpg --db photos.h5 --out why/   (open why/index.html)
    """
    from ..retrieval.explain import write_explanations

    summary = write_explanations(db, image, out, result, index, descriptor, pca, patch, stride,
                                 batch_size, device)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"{summary['query']} against image {summary['result']} "
               f"({summary['result_path']}): similarity {summary['similarity']:.4f} "
               f"[{summary['descriptor']}, model {summary['model']}]")
    for m in summary["maps"]:
        typer.echo(f"  {m['map']:<10} {m['on']:<6} {m['file']}  {m['text']}")
    for note in summary["notes"]:
        _err(f"note: {note}")
    typer.echo(f"page: {summary['html']}")


def register(app: typer.Typer) -> None:
    """Add `serve` and `explain` to the app."""
    app.command()(serve)
    app.command()(explain)
