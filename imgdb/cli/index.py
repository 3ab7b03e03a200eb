"""Annoy indexes registered in the store: `imgdb index build|ls|rm`."""

from __future__ import annotations

from typing import Annotated

import typer

from .options import Db, Descriptor, IndexName, Json, ModelVersion, Seed, Trees, integer
from .render import emit, index_built_output, index_list_output, removed_output

index_app = typer.Typer(help="Annoy indexes registered in the store.", no_args_is_help=True)


@index_app.command("build")
def build(
    db: Db,
    descriptor: Descriptor,
    pca: ModelVersion = "none",
    name: IndexName = None,
    trees: Trees = 50,
    seed: Seed = 0,
    shards: Annotated[int, typer.Option(
        "--shards", parser=integer(1, 4096), metavar="N",
        help="Split the rows into N Annoy files built in parallel processes (one logical "
             "index; queries search every shard and merge the top-k).")] = 1,
    as_json: Json = False,
) -> None:
    """Build an Annoy index of a descriptor under a model; written atomically and registered.

    Example: imgdb index build --db photos.h5 --descriptor pool5/crow --pca v1
    """
    from ..retrieval.index import build_index

    emit(index_built_output(build_index(db, descriptor, pca, name, trees, seed, shards=shards)), as_json)


@index_app.command("ls")
def ls(db: Db, as_json: Json = False) -> None:
    """List indexes and whether each is current or stale (and why).

    Example: imgdb index ls --db photos.h5
    """
    from ..retrieval.index import list_indexes
    from ..store import open_read

    with open_read(db) as view:
        found = list_indexes(view, db, verify=True)
    emit(index_list_output(found), as_json)


@index_app.command("rm")
def rm(name: Annotated[str, typer.Argument(help="Index name as listed by index ls.")],
       db: Db, as_json: Json = False) -> None:
    """Remove an index (registry entry and file).

    Example: imgdb index rm NAME --db photos.h5
    """
    from ..retrieval.index import remove_index

    remove_index(db, name)
    emit(removed_output("index", name), as_json)


def register(app: typer.Typer) -> None:
    """Add `imgdb index build|ls|rm`."""
    app.add_typer(index_app, name="index")
