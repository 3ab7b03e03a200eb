"""`imgdb serve` and `imgdb explain`: a search page and JSON API over a store, and the
explanation maps of a match as pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from .options import Db, Device, Json, MaxPixels, OptDescriptor, OptModelVersion, integer
from .render import Output, emit

Host = Annotated[str, typer.Option(
    "--host", metavar="ADDRESS",
    help="Address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface).")]
Port = Annotated[int, typer.Option("--port", parser=integer(0, 65535), metavar="PORT",
                                   help="Port, 0-65535 (0: any free one, printed at start).")]
MaxUploadMb = Annotated[int, typer.Option("--max-upload-mb", parser=integer(1), metavar="MiB",
                                          help="Largest request body accepted, in MiB, >= 1.")]
DefaultIndex = Annotated[Optional[str], typer.Option(
    "--index", metavar="NAME", help="Index to use (see imgdb index ls).")]


def serve(
    db: Db,
    host: Host = "127.0.0.1",
    port: Port = 8000,
    descriptor: OptDescriptor = None,
    index: DefaultIndex = None,
    device: Device = "auto",
    max_upload_mb: MaxUploadMb = 32,
    max_pixels: MaxPixels = 40_000_000,
) -> None:
    """Serve a store: a search page and a JSON API, with the network and index loaded once.

    Example: imgdb serve --db photos.h5   (then open http://127.0.0.1:8000/)
    """
    from ..store.reader import check_exists

    check_exists(db)  # before the server starts: the same one line as every other command
    try:
        from ..serve.app import serve as run_server
    except ImportError as exc:
        raise UserError(f"imgdb serve needs the serve extra ({exc.name} is missing): "
                        f"pip install 'imgdb[serve]'") from None
    run_server(db, host, port, descriptor, index, device, max_upload_mb, max_pixels)


def explain(
    image: Annotated[Path, typer.Argument(metavar="IMAGE", help="The query image file.")],
    db: Db,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR",
                                      help="Folder for the PNG maps and index.html.")],
    result: Annotated[Optional[int], typer.Option(
        "--result", parser=integer(0), metavar="ID",
        help="Stored image id to explain the match with (default: the best match other than "
             "itself).")] = None,
    index: DefaultIndex = None,
    descriptor: OptDescriptor = None,
    pca: OptModelVersion = None,
    patch: Annotated[Optional[int], typer.Option(
        "--patch", parser=integer(1), metavar="PX",
        help="Occlusion patch side in pixels of the network input (default: a quarter of the "
             "short side).")] = None,
    stride: Annotated[Optional[int], typer.Option(
        "--stride", parser=integer(1), metavar="PX",
        help="Occlusion patch step (default: half the patch).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", parser=integer(1), metavar="N",
                                            help="Occluded copies per forward pass.")] = 16,
    device: Device = "auto",
    as_json: Json = False,
) -> None:
    """Draw why an image matches a result: CroW weights, similarity and occlusion maps.

    Example: imgdb explain that.jpg --db photos.h5 --out why/   (open why/index.html)
    """
    from ..retrieval.explain import write_explanations

    summary = write_explanations(db, image, out, result, index, descriptor, pca, patch, stride,
                                 batch_size, device)
    lines = [f"{summary['query']} against image {summary['result']} "
             f"({summary['result_path']}): similarity {summary['similarity']:.4f} "
             f"[{summary['descriptor']}, model {summary['model']}]"]
    lines += [f"  {m['map']:<10} {m['on']:<6} {m['file']}  {m['text']}" for m in summary["maps"]]
    v = summary["verification"]
    if v is not None:
        state = "verified" if v["verified"] else "not verified"
        lines.append(f"  matches    {v['inliers']} inliers ({state})"
                     f"  {v['file']}")
    lines.append(f"page: {summary['html']}")
    emit(Output(summary, lines, [f"note: {n}" for n in summary["notes"]]), as_json)


def register(app: typer.Typer) -> None:
    """Add `imgdb serve` and `imgdb explain`."""
    app.command()(serve)
    app.command()(explain)
