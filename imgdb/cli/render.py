"""One output path for every result: a renderer turns a result into an `Output` (the JSON
object, the text lines, the notes for stderr), and `emit` prints one of its forms.

Text is for people and safe for a terminal: every line is printed through `escape`, so a file
name holding a newline, a carriage return or an escape sequence prints as one line of visible
escapes (`\\n`, `\\x1b`) and never moves the cursor, forges a result line or recolours the
terminal. Bytes of a non-UTF-8 file name (surrogate-escaped by Python) print as `\\xNN`.
JSON is ASCII (`ensure_ascii`), so it is valid and printable for any name: such a byte comes
out as `\\udcNN`, which json.loads turns back into the same str (os.fsencode gives the bytes).
NaN and infinities become null.

To add a result type: write `<thing>_output(result) -> Output` here and call
`emit(<thing>_output(result), as_json)` in the command.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import PurePath
from typing import Any, Iterable, Sequence

import typer

# --------------------------------------------------------------------------------------------
# safe text and JSON

# C0 and C1 controls, DEL, lone surrogates (undecodable bytes), line/paragraph separators and
# the bidirectional overrides that reorder what a terminal shows.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069"
                     "\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match) -> str:
    ch = match.group()
    if ch == "\\":
        return "\\\\"
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape(text: str) -> str:
    """`text` as one printable line: control and invisible-direction characters escaped
    (backslashes doubled then, so the escapes read back unambiguously); clean text unchanged."""
    text = str(text)
    if not _UNSAFE.search(text):
        return text
    return re.sub(r"[\\]|" + _UNSAFE.pattern, _escape_char, text)


def jsonable(value: Any) -> Any:
    """`value` as plain JSON types: numpy scalars and arrays, paths, enums, bytes converted;
    non-finite floats become None (JSON has no NaN)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, Enum):
        return jsonable(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return jsonable(value.tolist())
    return str(value)


def to_json(value: Any) -> str:
    """Indented, ASCII-only JSON of `value` (valid for any file name)."""
    return json.dumps(jsonable(value), indent=2, ensure_ascii=True, allow_nan=False)


def say(message: str) -> None:
    """One line (or several) for a person on stderr, each escaped."""
    for line in str(message).split("\n"):
        typer.echo(escape(line), err=True)


# --------------------------------------------------------------------------------------------
# the output object


@dataclass
class Output:
    """A result in its printable forms: `data` for --json, `lines` for people (one entry per
    line; an entry's own newlines are data and get escaped), `notes` for stderr in text mode,
    `csv` where the command offers --csv."""

    data: Any
    lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    csv: str | None = None


def emit(out: Output, as_json: bool = False, as_csv: bool = False, quiet: bool = False) -> None:
    """Print one form of `out` on stdout: JSON, CSV or the text lines (plus the notes on
    stderr unless quiet)."""
    if as_json:
        typer.echo(to_json(out.data))
        return
    if as_csv and out.csv is not None:
        typer.echo(out.csv, nl=False)
        return
    if not quiet:
        for note in out.notes:
            typer.echo(escape(note), err=True)
    for line in out.lines:
        typer.echo(escape(line))


# --------------------------------------------------------------------------------------------
# renderers, one per result type


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def ingest_output(summary) -> Output:
    """`imgdb ingest`: the run's counts; skipped and failed files as notes."""
    data = {
        "store": summary.store, "extractor": summary.extractor,
        "discovered": summary.discovered, "new": summary.new, "changed": summary.changed,
        "computed": summary.recomputed, "retried": summary.retried,
        "unchanged": summary.unchanged, "ok": summary.ok,
        "keypoints_added": summary.keypoints_added,
        "failed": summary.failed, "missing": summary.missing,
        "seconds": round(summary.seconds, 3),
        "failures": [{"path": p, "error": e} for p, e in summary.failures],
        "problems": [{"path": p, "error": e} for p, e in summary.problems],
        **({"engine": summary.engine} if getattr(summary, "engine", None) else {}),
    }
    notes = ([f"skipped {p}: {r}" for p, r in summary.problems]
             + [f"failed {p}: {r}" for p, r in summary.failures])
    return Output(data, [summary.line()], notes)


def info_lines(report: dict, max_failures: int = 20) -> list[str]:
    """`imgdb info` as plain text (no colours, no box drawing), one entry per line."""
    im = report["images"]
    lines = [
        f"store       {report['store']}  ({_size(report['file_bytes'])})",
        f"images      {im['total']} total: {im['ok']} ok, {im['failed']} failed, "
        f"{im['missing']} missing",
        "", "extractors",
    ]
    if not report["extractors"]:
        lines.append("  (none yet: run imgdb ingest)")
    for e in report["extractors"]:
        s = e["settings"]
        if "encoding" in s:
            c = s["encoding"]
            lines.append(f"  {e['name']}  {c['method']} of {c['local']} with {c['codebook']}, "
                         f"{c['aggregate']} aggregation, power={c['power'] or 'none'} "
                         f"images={e['computed']}")
            continue
        lines.append(f"  {e['name']}  backbone={s['backbone']} weights={s['weights']} "
                     f"size={s['size']} scales={','.join(f'{x:g}' for x in s['scales'])} "
                     f"images={e['computed']}")
    lines += ["", "descriptors"]
    if report["descriptors"]:
        width = max(len(d["name"]) for d in report["descriptors"])
        for d in report["descriptors"]:
            lines.append(f"  {d['name']:<{width}}  {d['rows']} x {d['dim']} {d['dtype']}  "
                         f"{_size(d['bytes'])}")
    else:
        lines.append("  (none)")
    lines += ["", "local features"]
    for li in report["local"]:
        what = ("keypoints x 128 uint8 (SIFT, for --rerank verify)" if li["kind"] == "keypoints"
                else f"cells x {li['channels']} float16")
        lines.append(f"  {li['name']}  {li['images']} images x {li['features_per_image']:g} "
                     f"{what} = {_size(li['bytes'])} ({_size(li['bytes_per_image'])} per image)")
    if not report["local"]:
        lines.append("  (none: ingest --keep-local LAYER[:MASK] for codebook methods)")
    lines += ["", "models"]
    for m in report["models"]:
        lines.append(f"  {m['name']}  " + " ".join(f"{k}={v}" for k, v in m.items()
                                                   if k in ("kind", "method", "k", "dims", "whiten",
                                                            "held_out", "created")))
    if not report["models"]:
        lines.append("  (none)")
    lines += ["", "indexes"]
    for i in report["indexes"]:
        state = "current" if i["current"] else f"STALE: {i['stale_reason']}"
        lines.append(f"  {i['name']}  " + " ".join(f"{k}={v}" for k, v in i.items()
                                                   if k in ("descriptor", "model", "items"))
                     + f"  {state}")
    if not report["indexes"]:
        lines.append("  (none)")
    failed = report["failed"]
    if failed:
        shown = failed if max_failures < 0 else failed[:max_failures]
        lines += ["", f"failed files ({len(failed)})"]
        lines += [f"  {f['path']}: {f['error']}" for f in shown]
        if len(shown) < len(failed):
            lines.append(f"  ... {len(failed) - len(shown)} more (imgdb info --failures -1)")
    return lines


def info_output(report: dict, max_failures: int = 20) -> Output:
    """`imgdb info`: the whole report as JSON, the summary as text."""
    return Output(report, info_lines(report, max_failures))


def check_output(report, db) -> Output:
    """`imgdb check`: ok with what was read, or every problem (and the repair command)."""
    if report.ok:
        lines = [f"{db}: ok ({report.rows} rows, {report.datasets} datasets, "
                 f"{report.bytes_read / 1e6:.1f} MB read, {report.indexes} index files "
                 f"verified, {report.seconds:.1f}s)"]
        notes: list[str] = []
    else:
        lines = [f"{db}: DAMAGED ({len(report.problems)} problems)"]
        lines += [f"  {p.line()}" for p in report.problems]
        notes = [f"repair it with: imgdb repair --db {db} (intact rows are kept; damaged vectors "
                 f"are recomputed by the next ingest)"]
    return Output(report.as_dict(), lines, notes)


def repair_output(report, db) -> Output:
    """`imgdb repair`: what was rebuilt, dropped and left to recompute."""
    pending = sum(report.pending_rows.values())
    lines = [f"{db}: rebuilt {report.rows} rows ({report.lost_rows} lost, {pending} to "
             f"recompute), {report.models} models, {report.indexes} indexes; "
             f"{report.bytes_before / 1e6:.1f} MB -> {report.bytes_after / 1e6:.1f} MB in "
             f"{report.seconds:.1f}s; old file kept as {report.backup}"]
    notes = [f"dropped {what}" for what in report.dropped]
    if pending:
        notes.append("rows to recompute: rerun the ingest command that made this store")
    return Output(report.as_dict(), lines, notes)


def pca_model_output(model) -> Output:
    """`imgdb fit pca`: the new model version and its provenance."""
    a = model.attrs
    line = (f"{model.id}: {a['input_dim']} -> {a['dims']} dims, "
            f"{'whitened' if a['whiten'] else 'no whitening'}"
            f"{', power ' + format(a['power'], 'g') if a['power'] else ''}, fitted on "
            f"{a['image_count']} images of {a['fitted_on']}")
    return Output({"model": model.id, "version": model.version, **a}, [line])


def graph_model_output(model) -> Output:
    """`imgdb fit graph`: the new graph version and its provenance."""
    a = model.attrs
    line = (f"{model.id}: {a['k']}-NN graph of {a['image_count']} images ({a['edges']} mutual "
            f"edges), model {a['pca']}, gamma {a['gamma']:g}, {a['method']}, "
            f"{a['seconds']:.2f}s")
    return Output({"model": model.id, "version": model.version, **a}, [line])


def codebook_model_output(model) -> Output:
    """`imgdb fit codebook`: the new codebook version and its provenance."""
    a = model.attrs
    line = (f"{model.id}: {a['method']} k={a['k']} local-pca={a['pca_d'] or '-'} -> "
            f"{a['dims']} dims, fitted on {a['feature_count']} local features of "
            f"{a['image_count']} images of {a['fitted_on']} in {a['seconds']:.1f}s")
    return Output({"model": model.id, "version": model.version, **a}, [line])


def encode_output(summary) -> Output:
    """`imgdb encode`: the descriptor written and how many images."""
    data = {"descriptor": summary.descriptor, "encoded": summary.encoded,
            "total": summary.total, "dims": summary.dims, "seconds": round(summary.seconds, 3)}
    return Output(data, [summary.line()])


def models_output(models: Sequence, stale: dict | None = None) -> Output:
    """`imgdb models`: every model with its provenance (graphs: current, or stale and why)."""
    stale = stale or {}
    data = [{"id": m.id, "kind": m.kind, "descriptor": m.descriptor, "version": m.version,
             **m.attrs, **({"current": stale[m.id] is None, "stale_reason": stale[m.id]}
                           if m.id in stale else {})} for m in models]
    lines = []
    if not models:
        lines.append("no models (fit one with: imgdb fit pca --db STORE --descriptor DESCRIPTOR)")
    for m in models:
        a = m.attrs
        if m.kind == "graph":
            lines.append(f"{m.id}  k={a.get('k')} gamma={a.get('gamma')} model={a.get('pca')} "
                         f"images={a.get('image_count')} method={a.get('method')} "
                         f"created={a.get('created')}  "
                         f"{'STALE: ' + stale[m.id] if stale.get(m.id) else 'current'}")
        elif m.kind == "codebook":
            lines.append(f"{m.id}  method={a.get('method')} k={a.get('k')} "
                         f"local-pca={a.get('pca_d') or '-'} dims={a.get('dims')} "
                         f"images={a.get('image_count')} from={a.get('fitted_on')} "
                         f"created={a.get('created')}")
        else:
            lines.append(f"{m.id}  dims={a.get('dims')} whiten={bool(a.get('whiten'))} "
                         f"power={a.get('power') or '-'} images={a.get('image_count')} "
                         f"from={a.get('fitted_on')} created={a.get('created')}")
    return Output(data, lines)


def removed_output(what: str, name: str) -> Output:
    """`models --remove`, `index rm`: what was removed."""
    return Output({"removed": name, "kind": what}, [f"removed {what + ' ' if what != 'model' else ''}{name}"])


def index_built_output(status) -> Output:
    """`imgdb index build`: the registered index."""
    a = status.attrs
    shards = int(a.get("shards", 1))
    where = a["file"] if shards == 1 else f"{shards} shards {a['file']} ..."
    line = (f"index {status.name}: {a['items']} items x {a['dims']} dims, {a['trees']} trees, "
            f"model {a['model']}, built in {a['build_seconds']:.2f}s -> {where}")
    return Output({"name": status.name, **a}, [line])


def index_list_output(statuses: Sequence) -> Output:
    """`imgdb index ls`: every index, current, stale or damaged (and why)."""
    data = [{"name": i.name, "current": i.problem is None, "stale_reason": i.stale,
             "damaged": i.damaged, **i.attrs} for i in statuses]
    lines = []
    if not statuses:
        lines.append("no indexes (build one with: imgdb index build --db STORE --descriptor D)")
    for i in statuses:
        a = i.attrs
        state = ("current" if i.problem is None else f"STALE: {i.stale}" if i.stale
                 else f"DAMAGED: {i.damaged}")
        shards = f" shards={a['shards']}" if int(a.get("shards", 1)) > 1 else ""
        lines.append(f"{i.name}  {a['descriptor']} model={a['model']} items={a['items']} "
                     f"dims={a['dims']} trees={a['trees']}{shards}  {state}")
    return Output(data, lines)


def query_output(plan, results: Iterable, html: str | None = None) -> Output:
    """`imgdb query`: per query, the ranking (rank, cosine, image id, path)."""
    results = list(results)
    data = {
        "descriptor": plan.descriptor, "model": plan.model or "none",
        "index": plan.index, "exact": plan.index is None,
        "stages": results[0].stages if results else [],
        "queries": [{"query": r.query, "source": r.source,
                     "results": [{"rank": h.rank, "score": round(h.score, 6), "id": h.id,
                                  "path": h.path} for h in r.hits]} for r in results],
    }
    lines = []
    notes = [f"{st['stage']} {st['reason']}" for st in (results[0].stages if results else [])
             if st["reason"]]
    for r in results:
        lines.append(f"query {r.query}  [{plan.descriptor}, {plan.index or 'exact search'}]")
        lines += [f"{h.rank:>4}  {h.score:8.4f}  {h.id:>7}  {h.path}" for h in r.hits]
    notes += [f"gallery written to {html}"] if html else []
    return Output(data, lines, notes)


# --------------------------------------------------------------------------------------------
# eval

KS = (1, 5, 10)


def _nan_or(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _column(cell) -> str:
    dims = "full" if cell.whitening == "none" else f"{cell.dims}"
    return dims + (f" {cell.setup}" if cell.setup else "")


def eval_rows(result) -> tuple[list[str], list[tuple[str, dict[str, float]]]]:
    """The paper-style table: methods as rows, dims (x setups) as columns; values mAP (or N-S)."""
    columns: list[str] = []
    rows: dict[str, dict[str, float]] = {}
    for c in result.cells:
        col = _column(c)
        if col not in columns:
            columns.append(col)
        method = (f"{c.descriptor} ({c.dims}-D)" if c.whitening == "none"
                  else f"{c.descriptor} [{c.whitening}]")
        ranking = c.ranking
        if ranking != "L2":  # a re-ranking: its own row under the L2 row
            method += f" + {ranking}"
        rows.setdefault(method, {})[col] = c.ns if c.ns is not None else c.summary.mAP
    return columns, list(rows.items())


def eval_lines(result) -> list[str]:
    """`imgdb eval` as the papers print it: one table, then notes on what was left out."""
    columns, rows = eval_rows(result)
    metric = "N-S score (max 4)" if result.protocol == "ukbench" else "mAP"
    width = max([len("method")] + [len(r[0]) for r in rows])
    head = f"{'method':<{width}}  " + "  ".join(f"{c:>12}" for c in columns)
    lines = [f"{result.protocol} ({result.gt_source}): {metric}, {result.n_queries} queries, "
             f"{result.n_database} database images", head, "-" * len(head)]
    for method, values in rows:
        cells = []
        for c in columns:
            v = _nan_or(values.get(c))
            cells.append(f"{'':>12}" if v is None else f"{v:>12.4f}")
        lines.append(f"{method:<{width}}  " + "  ".join(cells))
    if result.protocol == "roxford":
        mp = list(result.cells)
        lines += ["", "mP@1,5,10 per setup: " + "; ".join(
            f"{c.descriptor.split('/', 1)[-1]} {c.dims} {c.setup}: "
            + "/".join(f"{c.summary.mP.get(k, float('nan')):.3f}" for k in KS) for c in mp[:6])
            + (" ..." if len(mp) > 6 else "")]
    notes = []
    if result.skipped_queries:
        notes.append(f"{len(result.skipped_queries)} queries skipped (first: "
                     f"{result.skipped_queries[0][0]}: {result.skipped_queries[0][1]})")
    empty = max((c.summary.n_empty for c in result.cells), default=0)
    if empty:
        notes.append(f"{empty} queries without positives excluded")
    if result.missing_positives:
        notes.append(f"{result.missing_positives} ground-truth positives are not in the store "
                     f"(metrics over what exists)")
    if notes:
        lines += [""] + [f"note: {n}" for n in notes]
    return lines


def eval_data(result) -> dict:
    """`imgdb eval --json`: every cell of the table with its metrics."""
    return {
        "protocol": result.protocol, "ground_truth": result.gt_source,
        "database_images": result.n_database, "queries": result.n_queries,
        "skipped_queries": [{"query": q, "reason": r} for q, r in result.skipped_queries],
        "missing_positives": result.missing_positives,
        "results": [{
            "descriptor": c.descriptor, "whitening": c.whitening, "dims": c.dims, "setup": c.setup,
            "ranking": c.ranking, "mAP": _nan_or(c.summary.mAP),
            "mP": {str(k): _nan_or(v) for k, v in c.summary.mP.items()},
            "ns_score": _nan_or(c.ns),
            "queries_evaluated": c.summary.n_queries - c.summary.n_empty,
            "queries_without_positives": c.summary.n_empty,
        } for c in result.cells],
    }


def eval_csv(result) -> str:
    """`imgdb eval --csv`: one row per cell (RFC 4180 quoting)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["descriptor", "whitening", "dims", "setup", "ranking", "mAP", "mP@1", "mP@5",
                     "mP@10", "ns_score"])
    for c in result.cells:
        mp = [c.summary.mP.get(k, float("nan")) for k in KS]
        writer.writerow([c.descriptor, c.whitening, c.dims, c.setup, c.ranking,
                         f"{c.summary.mAP:.6f}",
                         *(f"{v:.6f}" for v in mp), "" if c.ns is None else f"{c.ns:.6f}"])
    return buf.getvalue()


def eval_output(result) -> Output:
    """`imgdb eval`: the table, its JSON and its CSV from the same result."""
    return Output(eval_data(result), eval_lines(result), csv=eval_csv(result))
