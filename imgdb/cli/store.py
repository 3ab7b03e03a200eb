"""The store itself: `imgdb info`, `check`, `repair`, `models`, `merge`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..errors import UserError
from .options import Db, Json, Quiet, integer, store_file
from .render import (Output, check_output, emit, info_output, models_output, removed_output,
                     repair_output)


def info(
    db: Db,
    as_json: Json = False,
    failures: Annotated[int, typer.Option(
        "--failures", parser=integer(-1), metavar="N",
        help="How many failed files to list (-1: all).")] = 20,
) -> None:
    """Show what a store holds: images, extractors, descriptors, models, indexes, failures.

    Example: imgdb info --db photos.h5
    """
    from ..inventory import store_report

    emit(info_output(store_report(db), failures), as_json)


def check(
    db: Db,
    indexes: Annotated[bool, typer.Option(
        "--indexes/--no-indexes", help="Also re-digest every registered index file.")] = True,
    as_json: Json = False,
) -> None:
    """Verify a store: every checksum, the structure, the registries, the index files.

    Exit 1 when something is damaged (and say what); `imgdb repair` mends it.

    Example: imgdb check --db photos.h5
    """
    from ..store.check import check_store

    report = check_store(db, verify_indexes=indexes)
    emit(check_output(report, db), as_json)
    if not report.ok:
        raise typer.Exit(1)


def repair(db: Db, as_json: Json = False) -> None:
    """Rebuild a store from every intact row, model and index; keep the old file as a backup.

    Also reclaims dead space, finishes an interrupted commit, and upgrades stores written by
    imgdb 0.1. Rows whose vectors were damaged become pending: rerun ingest to recompute them.

    Example: imgdb repair --db photos.h5
    """
    from ..store.repair import repair_store

    emit(repair_output(repair_store(db), db), as_json)


def models(
    db: Db,
    remove: Annotated[Optional[str], typer.Option(
        "--remove", metavar="ID", help="Delete one model by id (KIND/DESCRIPTOR/vN, as listed).")]
    = None,
    as_json: Json = False,
) -> None:
    """List the fitted models with their provenance, or remove one explicitly.

    Example: imgdb models --db photos.h5
    """
    from ..store import StoreWriter, open_read

    if remove is not None:
        with StoreWriter(db, create=False) as writer:
            with writer.read() as view:
                model = view.model_by_id(remove)
                if model is None:
                    known = ", ".join(m.id for m in view.models()) or "none"
                    raise UserError(f"the store has no model {remove!r}; models: {known}")
            writer.remove_model(model)
        emit(removed_output("model", remove), as_json)
        return
    with open_read(db) as view:
        found = view.models()
        stale = {}
        if any(m.kind == "graph" for m in found):
            from ..retrieval.graph import graph_status

            stale = {m.id: graph_status(view, m) for m in found if m.kind == "graph"}
    emit(models_output(found, stale), as_json)


def merge(
    stores: Annotated[List[Path], typer.Argument(
        metavar="STORE", parser=store_file, help="Stores to join (appended in this order).")],
    db: Db,
    quiet: Quiet = False,
    as_json: Json = False,
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
        summary = merge_stores(stores, db, progress=lambda done, total: (
            reporter.start(total), reporter.update(done, total)))
    notes = ([] if not summary.ignored else
             ["not merged (codebook encodings belong to one store's codebook; run imgdb encode "
              "on the merged store): " + ", ".join(summary.ignored)])
    emit(Output(summary.as_dict(), [summary.line()], notes), as_json, quiet=quiet)


def register(app: typer.Typer) -> None:
    """Add `imgdb info`, `check`, `repair`, `models`, `merge`."""
    for command in (info, check, repair, models, merge):
        app.command()(command)

