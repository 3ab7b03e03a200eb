"""`imgdb eval --report DIR`: per-query AP (CSV), precision-recall curves (PNG), worst queries (HTML)."""

from __future__ import annotations

import csv
import html
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..store import open_read
from .evaluate import Cell, EvalResult

RECALL_POINTS = np.linspace(0, 1, 11)


def interpolated_pr(positions: np.ndarray, n_positives: int) -> np.ndarray:
    """11-point interpolated precision (max precision at recall >= r) of one query."""
    if n_positives == 0:
        return np.full(len(RECALL_POINTS), np.nan)
    hits = np.arange(1, len(positions) + 1)
    recall = hits / n_positives
    precision = hits / (positions + 1)
    out = np.zeros(len(RECALL_POINTS))
    for i, r in enumerate(RECALL_POINTS):
        reached = precision[recall >= r - 1e-12]
        out[i] = reached.max() if len(reached) else 0.0
    return out


def _label(c: Cell) -> str:
    name = c.descriptor.split("/", 1)[-1]
    extra = "" if c.whitening == "none" else f" [{c.whitening}]"
    ranking = "" if c.ranking == "L2" else f" {c.ranking}"
    return f"{name}{extra} {c.dims}{(' ' + c.setup) if c.setup else ''}{ranking}"


def write_report(result: EvalResult, folder: Path, db: Path) -> None:
    """Write per_query.csv, pr_curves.png and worst_queries.html into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "per_query.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["descriptor", "whitening", "dims", "setup", "query", "ap", "p@1", "p@5",
                    "p@10", "positives", "junk", "missing_positives", "ranking"])
        for c in result.cells:
            for q in c.per_query:
                w.writerow([c.descriptor, c.whitening, c.dims, c.setup, q.name, f"{q.ap:.6f}",
                            *(f"{q.precisions.get(k, float('nan')):.6f}" for k in (1, 5, 10)),
                            q.positives, q.junk, q.missing_positives, c.ranking])
    _plot(result, folder / "pr_curves.png")
    _worst(result, folder / "worst_queries.html", db)


def _plot(result: EvalResult, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("the report draws plots with matplotlib; install it: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(7, 5))
    for c in sorted(result.cells, key=lambda c: -np.nan_to_num(c.summary.mAP))[:12]:
        curves = [interpolated_pr(c.positions.get(q.name, np.zeros(0)), q.positives)
                  for q in c.per_query if q.positives]
        if curves:
            ax.plot(RECALL_POINTS, np.nanmean(curves, axis=0), marker="o", ms=3,
                    label=f"{_label(c)} (mAP {c.summary.mAP:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("interpolated precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(f"{result.protocol}: mean precision-recall ({result.n_queries} queries)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _worst(result: EvalResult, out: Path, db: Path, n: int = 5) -> None:
    from ..retrieval.gallery import thumbnail_data_uri

    best = max(result.cells, key=lambda c: np.nan_to_num(c.summary.mAP))
    with open_read(db) as view:
        paths = view.paths()
    top = result.rankings.get((best.descriptor, best.whitening, best.dims, best.ranking))
    names = [q.name for q in best.per_query]
    scored = [(q.ap, i, q) for i, q in enumerate(best.per_query) if not np.isnan(q.ap)]
    parts = [f"<!doctype html><meta charset='utf-8'><title>worst queries</title>"
             f"<style>body{{font-family:sans-serif}} img{{max-height:120px;margin:2px}}"
             f"figure{{display:inline-block;margin:4px;font-size:11px}}</style>"
             f"<h1>Worst queries of {html.escape(_label(best))} (mAP {best.summary.mAP:.4f})</h1>"]
    for ap, i, q in sorted(scored, key=lambda t: t[0])[:n]:
        parts.append(f"<h2>{html.escape(q.name)}: AP {ap:.4f} ({q.positives} positives)</h2><div>")
        if top is not None:
            for rank, row in enumerate(top[names.index(q.name)], start=1):
                uri = thumbnail_data_uri(paths[row])
                img = f"<img src='{uri}'>" if uri else "(missing)"
                parts.append(f"<figure>{img}<figcaption>#{rank} "
                             f"{html.escape(Path(paths[row]).name)}</figcaption></figure>")
        parts.append("</div>")
    out.write_text("\n".join(parts), encoding="utf-8")
