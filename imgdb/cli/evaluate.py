"""`imgdb eval`: benchmark protocols on a store, as the papers' tables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..errors import InvalidRequest as UsageError
from .choices import Protocol, QueryMode
from .options import (Db, Descriptors, Device, EvalDims, GroupRegex, Json, Power, ProtocolOpt,
                      QueryExpansions, QueryModeOpt, Reranks, existing_dir,
                      existing_path,
                      output_dir, store_file)
from .render import emit, eval_output, say


def _check_combination(gt: Optional[Path], protocol: Protocol, group_regex: Optional[str],
                       dims: tuple, whitening: bool, no_whiten: bool, queries: Optional[Path],
                       queries_db: Optional[Path], query_mode: QueryMode, as_json: bool,
                       as_csv: bool, views: bool = False) -> None:
    """Options that contradict each other, or would be ignored, are refused (exit 2)."""
    if group_regex and gt is not None:
        raise UsageError("--group-regex makes the ground truth from file names; it cannot be "
                         "combined with --gt")
    if group_regex and protocol not in (Protocol.auto, Protocol.groups):
        raise UsageError(f"--group-regex makes groups ground truth; it cannot be combined with "
                         f"--protocol {protocol.value}")
    if protocol is Protocol.ukbench and gt is not None:
        raise UsageError("the ukbench protocol reads its groups from the store's image names; "
                         "give no --gt")
    if gt is None and not group_regex and protocol not in (Protocol.holidays, Protocol.ukbench):
        raise UsageError("give --gt PATH (or --group-regex RE, or --protocol holidays|ukbench)")
    if dims and not whitening:
        raise UsageError("--dims sets the PCA dimensions; give a whitening source: --pca-on-test "
                         "or --pca-from OTHER.h5")
    if no_whiten and not whitening:
        raise UsageError("--no-whiten applies to PCA; give --pca-on-test or --pca-from OTHER.h5")
    if queries is not None and queries_db is not None:
        raise UsageError("--queries and --queries-db both say where the query images are; "
                         "give one")
    if queries_db is not None and query_mode is not QueryMode.full:
        raise UsageError(f"--query {query_mode.value} crops query photos; with --queries-db the "
                         f"query vectors come from that store (use --queries DIR)")
    if as_json and as_csv:
        raise UsageError("--json and --csv are two output formats; give one")
    if views and queries_db is not None:
        raise UsageError("--regions and --turns take views of the query photos; with "
                         "--queries-db the query vectors come from that store (use --queries "
                         "DIR)")


def eval_(
    db: Db,
    gt: Annotated[Optional[Path], typer.Option(
        "--gt", parser=existing_path, metavar="PATH",
        help="Ground truth: Oxford/Paris gt folder, revisitop .pkl, .csv, or a folder of "
             "groups.")] = None,
    protocol: ProtocolOpt = Protocol.auto,
    descriptor: Descriptors = ["all"],  # noqa: B006 (typer reads the default; never mutated)
    dims: EvalDims = None,
    pca_from: Annotated[Optional[List[Path]], typer.Option(
        "--pca-from", parser=store_file, metavar="OTHER.h5",
        help="Learn PCA-whitening on another store (held-out protocol; repeatable).")] = None,
    pca_on_test: Annotated[bool, typer.Option(
        "--pca-on-test", help="Learn PCA-whitening on this store (Babenko's 'PCA on test').")]
    = False,
    no_whiten: Annotated[bool, typer.Option(
        "--no-whiten", help="PCA rotation without whitening.")] = False,
    power: Power = None,
    query_mode: QueryModeOpt = QueryMode.full,
    qe: QueryExpansions = None,
    rerank: Reranks = None,
    regions: Annotated[bool, typer.Option(
        "--regions", help="Every ranking also with crops of each query image (2x2 at 0.6 and "
                          "3x3 at 0.4 of its sides), each its own row.")] = False,
    turns: Annotated[bool, typer.Option(
        "--turns", help="Every ranking also with each query turned by 90, 180 and 270 "
                        "degrees (with --regions too: one row with both).")] = False,
    queries: Annotated[Optional[Path], typer.Option(
        "--queries", parser=existing_dir, metavar="DIR",
        help="Folder of query images (never added to the store).")] = None,
    queries_db: Annotated[Optional[Path], typer.Option(
        "--queries-db", parser=store_file, metavar="STORE.h5",
        help="A second store holding the query images.")] = None,
    group_regex: GroupRegex = None,
    device: Device = "auto",
    report: Annotated[Optional[Path], typer.Option(
        "--report", parser=output_dir, metavar="DIR",
        help="Write per-query AP, PR plots, worst queries into this folder.")] = None,
    as_json: Json = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV on stdout.")] = False,
) -> None:
    """Evaluate descriptors on a benchmark's ground truth and print the papers' table.

    Example: imgdb eval --db oxford5k.h5 --gt gt_files_170407/ --pca-from paris6k.h5 --dims 512,256

    Re-rankings are rows of their own beside L2: --rerank diffusion --rerank kreciprocal --qe 5
    """
    from ..evaluation.evaluate import EvalOptions, run_eval

    _check_combination(gt, protocol, group_regex, tuple(dims or ()),
                       pca_on_test or bool(pca_from), no_whiten, queries, queries_db, query_mode,
                       as_json, as_csv, regions or turns)
    opts = EvalOptions(descriptors=descriptor, dims=list(dims or []), pca_on_test=pca_on_test,
                       pca_from=pca_from or [], whiten=not no_whiten, power=power,
                       query_mode=query_mode.value, qe=list(qe or []),
                       rerank=list(rerank or []), queries_dir=queries,
                       queries_db=queries_db, protocol=protocol.value, group_regex=group_regex,
                       device=device, regions=regions, turns=turns)
    result = run_eval(db, gt, opts)
    if report is not None:
        from ..evaluation.report import write_report

        write_report(result, report, db)
        say(f"report written to {report}")
    emit(eval_output(result), as_json, as_csv)


def register(app: typer.Typer) -> None:
    """Add `imgdb eval`."""
    app.command("eval")(eval_)
