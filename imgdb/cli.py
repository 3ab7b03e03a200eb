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

from .errors import UserError

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
    strict: bool = typer.Option(False, "--strict", help="Exit 1 if any image failed."),
    quiet: bool = QuietOption,
    as_json: bool = JsonOption,
) -> None:
    """Decode images, run the network once per batch, store every pooled descriptor.

    Example: imgdb ingest ~/photos --db photos.h5 --backbone efficientnet_lite0
    """
    from .ingest import IngestOptions, run_ingest
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
                            commit_seconds=commit_seconds)
    reporter = ProgressReporter(enabled=not quiet and not as_json, description="ingest")
    with reporter:
        summary = run_ingest(paths, db, options, progress=reporter.update, on_start=reporter.start)
    if as_json:
        typer.echo(json.dumps({
            "store": summary.store, "extractor": summary.extractor,
            "discovered": summary.discovered, "new": summary.new, "changed": summary.changed,
            "computed": summary.recomputed, "unchanged": summary.unchanged, "ok": summary.ok,
            "failed": summary.failed, "missing": summary.missing,
            "seconds": round(summary.seconds, 3),
            "failures": [{"path": p, "error": e} for p, e in summary.failures],
            "problems": [{"path": p, "error": e} for p, e in summary.problems],
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
    from .report import store_report, render_report

    report = store_report(db)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(render_report(report, failures))


# --------------------------------------------------------------------------------------------


def main() -> None:
    """Entry point: run the app; user errors become one line on stderr and exit 1."""
    try:
        result = app(prog_name="imgdb", standalone_mode=False)
        if isinstance(result, int) and result:
            sys.exit(result)
    except UserError as exc:
        if _STATE["debug"]:
            raise
        _err(f"error: {exc}")
        sys.exit(1)
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
