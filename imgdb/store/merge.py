"""Joining stores: `merge_stores(shards, out)` and the row copier under it, `RowCopier`.

Stores of the same extractor settings (several machines ingesting by hand, or the shard
stores of `imgdb ingest --engine ray`) are joined into one: the rows of the shards are
appended to OUT in the order the shards are given, each shard in its row order, with their
image facts, every extractor's state, errors, vectors and local features (each row's segment
re-based into OUT's flat arrays). A row whose path OUT already holds is not added again, so a
merge that is run twice (or rerun after a kill) adds nothing the second time.

Rows are copied in chunks (a few MB of vectors and local features each); each chunk is one
atomic commit of the writer, so a killed merge leaves OUT at a chunk boundary and the rerun
finishes it. Memory is one chunk plus a 64-bit digest per path of OUT (for the "already
there" test; a digest match is confirmed on the path itself).

Models, indexes and codebook encodings are not merged: they were fitted or built on one
store; fit and build them again on OUT.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np

from ..errors import InvalidRequest, UserError
from .reader import StoreView, open_read
from .rows import RowPutter, append_text, bump_revision
from .schema import (IMAGE_COLUMNS, STATE_COMPUTED, STATE_PENDING, STATUS_LOST,
                     aligned_datasets, encode_path, extractor_names, extractor_path)
from .writer import StoreWriter

#: Settings that record provenance (which software wrote the rows), not how vectors are made.
PROVENANCE_KEYS = ("imgdb", "torch")
CHUNK_BYTES = 32 << 20  # vectors + local features read and committed per chunk
MAX_CHUNK_ROWS = 4096


# ---------------------------------------------------------------------------------------------
# what a store's extractors are, and whether two stores agree


@dataclass(frozen=True)
class ExtractorShape:
    """An extractor as merge compares it: its settings (without provenance), its datasets
    ((layer, pooling) -> (dim, dtype)) and its local-feature sets (key -> channels)."""

    name: str
    settings: dict
    datasets: dict
    local: dict

    def comparable(self) -> dict:
        return {k: v for k, v in self.settings.items() if k not in PROVENANCE_KEYS}


def is_encoding(view: StoreView, extractor: str) -> bool:
    """A codebook encoding (`imgdb encode`): bound to a codebook of its own store."""
    return "encoding" in view.settings(extractor)


def extractor_shapes(view: StoreView) -> dict[str, ExtractorShape]:
    """Every extractor of a store that merge copies (encodings are left out)."""
    out = {}
    locals_by_ext: dict[str, dict[str, int]] = {}
    for info in view.local_sets():
        locals_by_ext.setdefault(info.extractor, {})[info.key] = info.channels
    datasets: dict[str, dict] = {}
    for d in view.descriptors():
        datasets.setdefault(d.extractor, {})[(d.layer, d.pooling)] = (int(d.shape[1]), d.dtype)
    for ext in view.extractors():
        if is_encoding(view, ext):
            continue
        out[ext] = ExtractorShape(ext, view.settings(ext), datasets.get(ext, {}),
                                  locals_by_ext.get(ext, {}))
    return out


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "none"
    return "none" if value is None else str(value)


def difference(a: ExtractorShape, b: ExtractorShape, a_name: str, b_name: str) -> str | None:
    """One line naming what differs between two stores' versions of an extractor, or None."""
    sa, sb = a.comparable(), b.comparable()
    for key in sorted(set(sa) | set(sb)):
        if sa.get(key) != sb.get(key):
            return (f"extractor {a.name} differs in {key}: {a_name} has {_show(sa.get(key))}, "
                    f"{b_name} has {_show(sb.get(key))}")
    if a.datasets != b.datasets:
        only_a = sorted(set(a.datasets) - set(b.datasets))
        only_b = sorted(set(b.datasets) - set(a.datasets))
        if only_a or only_b:
            which, who = (only_a, a_name) if only_a else (only_b, b_name)
            return (f"extractor {a.name} differs in its descriptors: only {who} has "
                    + ", ".join(f"{layer}/{p}" for layer, p in which[:4]))
        for key in sorted(a.datasets):
            if a.datasets[key] != b.datasets[key]:
                return (f"extractor {a.name} differs in {key[0]}/{key[1]}: {a_name} has "
                        f"{a.datasets[key][0]} dims ({a.datasets[key][1]}), {b_name} has "
                        f"{b.datasets[key][0]} dims ({b.datasets[key][1]})")
    if a.local != b.local:
        return (f"extractor {a.name} differs in its local features: {a_name} has "
                f"{_show(sorted(a.local))}, {b_name} has {_show(sorted(b.local))}")
    return None


def check_compatible(shapes: Sequence[tuple[str, dict[str, ExtractorShape]]],
                     out: tuple[str, dict[str, ExtractorShape]] | None,
                     out_rows: int = 0) -> dict[str, ExtractorShape]:
    """The extractors the shards share; a UserError naming the first difference otherwise.

    Every shard holding rows must have the same extractors with the same settings; OUT may
    have more extractors (merged rows are pending there), but the ones it shares must agree.
    An OUT that holds rows must already have every extractor of the shards: a shard's row
    whose path OUT holds is skipped, so vectors of an extractor OUT lacks would be dropped.
    """
    first_name, first = None, None
    for name, ext in shapes:
        if first is None:
            first_name, first = name, ext
            continue
        if set(ext) != set(first):
            extra = sorted(set(ext) - set(first))
            lacking = sorted(set(first) - set(ext))
            if extra:
                raise UserError(f"cannot merge: {name} has extractor {extra[0]}, which "
                                f"{first_name} has not (merge stores of the same extractors)")
            raise UserError(f"cannot merge: {name} has no extractor {lacking[0]}, which "
                            f"{first_name} has (merge stores of the same extractors)")
        for key in sorted(ext):
            why = difference(first[key], ext[key], first_name, name)
            if why:
                raise UserError(f"cannot merge: {why}")
    if first is None:
        return {}
    if out is not None:
        out_name, out_ext = out
        missing = sorted(set(first) - set(out_ext))
        if out_rows and missing:
            raise UserError(f"cannot merge into {out_name}: {first_name} has extractor "
                            f"{missing[0]}, which {out_name} ({out_rows} rows) has not; ingest "
                            f"those images with it, or merge into a new store")
        for key in sorted(first):
            if key in out_ext:
                why = difference(out_ext[key], first[key], out_name, first_name)
                if why:
                    raise UserError(f"cannot merge into {out_name}: {why}")
    return first


def ensure_extractors(writer: StoreWriter, extractors: dict[str, ExtractorShape]) -> None:
    """Create in OUT the extractors (and datasets) it lacks."""
    for ext in extractors.values():
        dtypes = {dtype for _, dtype in ext.datasets.values()} or {"float32"}
        if len(dtypes) > 1:
            raise UserError(f"extractor {ext.name} mixes vector dtypes {sorted(dtypes)}")
        writer.ensure_extractor(ext.name, ext.settings,
                                {k: dim for k, (dim, _) in ext.datasets.items()},
                                dtype=dtypes.pop(), local=dict(ext.local))


# ---------------------------------------------------------------------------------------------
# copying rows


def path_key(path: str) -> int:
    """64-bit digest of a stored path (for the "already in OUT" test)."""
    return int.from_bytes(hashlib.blake2b(encode_path(path), digest_size=8).digest(), "little",
                          signed=True)


class PathIndex:
    """Which paths a store holds: sorted 64-bit digests and their rows (16 bytes a row), plus
    the rows added since (kept as a few sorted runs, folded together now and then)."""

    def __init__(self, view: StoreView, chunk: int = 1 << 16) -> None:
        keys, rows = [], []
        for lo in range(0, view.rows, chunk):
            idx = np.arange(lo, min(view.rows, lo + chunk))
            paths = view.paths(idx)
            keep = [i for i, p in enumerate(paths) if p]
            keys.append(np.array([path_key(paths[i]) for i in keep], np.int64))
            rows.append(idx[keep])
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []
        self._add(np.concatenate(keys) if keys else np.zeros(0, np.int64),
                  np.concatenate(rows) if rows else np.zeros(0, np.int64))

    def _add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        order = np.argsort(keys, kind="stable")
        self.runs.append((keys[order], rows[order]))
        if len(self.runs) > 16:  # fold the runs: lookups stay a few binary searches
            keys = np.concatenate([k for k, _ in self.runs])
            rows = np.concatenate([r for _, r in self.runs])
            order = np.argsort(keys, kind="stable")
            self.runs = [(keys[order], rows[order])]

    def add(self, paths: Sequence[str], rows: Sequence[int]) -> None:
        if len(paths):
            self._add(np.array([path_key(p) for p in paths], np.int64),
                      np.asarray(rows, np.int64))

    def find(self, paths: Sequence[str], view: StoreView) -> list[int | None]:
        """The row holding each path (None where none does), a digest match confirmed on the
        stored path."""
        q = np.array([path_key(p) if p else 0 for p in paths], np.int64)
        cands: list[list[int]] = [[] for _ in paths]
        for keys, rows in self.runs:
            lo = np.searchsorted(keys, q, "left")
            hi = np.searchsorted(keys, q, "right")
            for i in np.flatnonzero(hi > lo):
                cands[i].extend(int(r) for r in rows[lo[i]:hi[i]])
        wanted = sorted({r for c in cands for r in c})
        stored = dict(zip(wanted, view.paths(wanted))) if wanted else {}
        return [next((r for r in c if p and stored[r] == p), None)
                for p, c in zip(paths, cands)]


@dataclass
class Pick:
    """Copy row `row` of source store `source` to OUT: appended (`target` None) or over an
    existing row of the same path (`target`)."""

    source: int
    row: int
    target: int | None = None


@dataclass
class _Block:
    """The rows of one chunk read from the sources, in pick order."""

    cols: dict[str, np.ndarray]
    paths: list[str]
    errors: list[bytes]
    states: dict[str, np.ndarray]
    ext_errors: dict[str, list[bytes]]
    vectors: dict[str, dict[tuple[str, str], np.ndarray]]
    local: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray, np.ndarray] | None]]


class RowCopier:
    """Copies picked rows of source stores into OUT (an open StoreWriter), one commit per chunk.

    The sources must hold `extractors` with OUT's settings (see `check_compatible`); OUT's other
    extractors get the copied rows as pending (and a row overwritten with different file facts
    becomes pending for them too: its file changed).
    """

    def __init__(self, writer: StoreWriter, sources: Sequence[Path],
                 extractors: dict[str, ExtractorShape]) -> None:
        self.writer = writer
        self.sources = [Path(s) for s in sources]
        self.extractors = extractors
        row_bytes = 64
        for ext in extractors.values():
            row_bytes += sum(dim * np.dtype(dt).itemsize for dim, dt in ext.datasets.values())
        self.row_bytes = row_bytes
        self.local_keys = [(e, k) for e in sorted(extractors) for k in sorted(extractors[e].local)]

    def chunk_rows(self, local_bytes_per_row: float = 0.0) -> int:
        per = self.row_bytes + local_bytes_per_row
        return int(max(16, min(MAX_CHUNK_ROWS, CHUNK_BYTES // max(1, per))))

    # -- reading -------------------------------------------------------------------------------
    def _read(self, picks: Sequence[Pick]) -> _Block:
        n = len(picks)
        cols = {name: np.zeros(n, dtype) for name, (dtype, _) in IMAGE_COLUMNS.items()}
        paths: list[str] = [""] * n
        errors: list[bytes] = [b""] * n
        states = {e: np.zeros(n, np.int8) for e in self.extractors}
        ext_errors = {e: [b""] * n for e in self.extractors}
        vectors = {e: {k: np.zeros((n, dim), dt) for k, (dim, dt) in s.datasets.items()}
                   for e, s in self.extractors.items()}
        local: dict = {k: [None] * n for k in self.local_keys}
        by_source: dict[int, list[int]] = {}
        for i, p in enumerate(picks):
            by_source.setdefault(p.source, []).append(i)
        for source, where in by_source.items():
            where_arr = np.asarray(where)
            rows = np.asarray([picks[i].row for i in where], np.int64)
            with open_read(self.sources[source]) as view:
                lo, hi = int(rows.min()), int(rows.max()) + 1
                for name in IMAGE_COLUMNS:
                    cols[name][where_arr] = _slice_rows(view, view.fh["images"][name], rows,
                                                        lo, hi)
                for i, p in zip(where, view.paths(rows)):
                    paths[i] = p
                for i, e in zip(where, view.column("error", rows)):
                    errors[i] = e.encode("utf-8", "replace")
                for ext, shape in self.extractors.items():
                    eg = view.fh["descriptors"][ext]
                    states[ext][where_arr] = _slice_rows(view, eg["state"], rows, lo, hi)
                    for i, e in zip(where, view.extractor_errors(ext, rows)):
                        ext_errors[ext][i] = e.encode("utf-8", "replace")
                    by_name = {(d.layer, d.pooling): d for d in view.descriptors()
                               if d.extractor == ext}
                    for key in shape.datasets:
                        vectors[ext][key][where_arr] = _rows_of(view, by_name[key], rows)
                for ext, key in self.local_keys:
                    g = view.fh["local"][ext][key]
                    start = _slice_rows(view, g["start"], rows, lo, hi)
                    count = _slice_rows(view, g["count"], rows, lo, hi)
                    grid = _slice_rows(view, g["grid"], rows, lo, hi)
                    segs = _segments(view, g, start, count)
                    for j, i in enumerate(where):
                        if segs[j] is not None:
                            local[(ext, key)][i] = (*segs[j], grid[j])
        for ext, shape in self.extractors.items():  # a damaged source row is computed again
            broken = np.zeros(n, bool)
            for key in shape.datasets:
                broken |= ~np.isfinite(vectors[ext][key]).all(axis=1)
            states[ext][broken & (states[ext] == STATE_COMPUTED)] = STATE_PENDING
        return _Block(cols, paths, errors, states, ext_errors, vectors, local)

    # -- writing -------------------------------------------------------------------------------
    def copy(self, picks: Sequence[Pick]) -> list[int]:
        """Copy one chunk in one commit; returns OUT's row ids used."""
        if not picks:
            return []
        block = self._read(picks)
        with self.writer.read() as view:
            n_before = view.rows
            existing = [p.target for p in picks if p.target is not None]
            if existing:
                old = {name: view.column(name, existing) for name in ("size", "mtime", "sha")}
        changed: list[int] = []
        if existing:
            at = [i for i, p in enumerate(picks) if p.target is not None]
            for j, i in enumerate(at):
                if any(block.cols[name][i] != old[name][j] for name in ("size", "mtime", "sha")):
                    changed.append(int(picks[i].target))
        with self.writer.transaction() as fh:
            n = int(fh.attrs["rows"])
            if n != n_before:
                raise RuntimeError("the store changed under its writer")
            ids = []
            new_n = n
            for p in picks:
                if p.target is None:
                    ids.append(new_n)
                    new_n += 1
                else:
                    ids.append(int(p.target))
            ids_arr = np.asarray(ids, np.int64)
            for ds in aligned_datasets(fh):
                if ds.shape[0] < new_n:
                    ds.resize(new_n, axis=0)
            put = RowPutter(ids_arr)
            g = fh["images"]
            for name in IMAGE_COLUMNS:
                put(g[name], block.cols[name])
            new = np.asarray([p.target is None for p in picks])
            if new.any():
                sub = RowPutter(ids_arr[new])
                paths = [encode_path(block.paths[i]) for i in np.flatnonzero(new)]
                append_text(fh.__getitem__, g.name, "path", sub, paths)
            append_text(fh.__getitem__, g.name, "error", put, block.errors)
            for ext in self.extractors:
                eg = fh[extractor_path(ext)]
                put(eg["state"], block.states[ext])
                append_text(fh.__getitem__, eg.name, "error", put, block.ext_errors[ext])
                for (layer, pooling), vec in block.vectors[ext].items():
                    put(eg[layer][pooling], vec)
                bump_revision(eg)
            for (ext, key), sets in block.local.items():
                _put_local(fh["local"][ext][key], put, sets)
            if changed:  # a file changed on disk: OUT's other extractors' vectors are outdated
                idx = np.asarray(sorted(set(changed)), np.int64)
                for other in extractor_names(fh):
                    if other in self.extractors:
                        continue
                    og = fh[extractor_path(other)]
                    st = og["state"][idx]
                    if (st != STATE_PENDING).any():
                        og["state"][idx] = np.zeros(len(idx), np.int8)
                        bump_revision(og)
            fh.attrs["rows"] = new_n
        return ids


def _rows_of(view: StoreView, info, rows: np.ndarray) -> np.ndarray:
    """Vectors of increasing rows: one slice read when they are dense, else fancy indexing."""
    if not len(rows):
        return np.zeros((0, info.shape[1]), np.float32)
    lo, hi = int(rows.min()), int(rows.max()) + 1
    if hi - lo <= 2 * len(rows) + 64:
        block = view.vectors(info, np.arange(lo, hi))
        return block[rows - lo]
    return view.vectors(info, rows)


def _slice_rows(view: StoreView, ds: h5py.Dataset, rows: np.ndarray, lo: int, hi: int
                ) -> np.ndarray:
    """A row-aligned dataset at `rows` (all within lo..hi-1): one slice read when they are
    dense, else the rows themselves."""
    if hi - lo <= 4 * len(rows) + 1024:
        return view.read_dataset(ds, slice(lo, hi))[rows - lo]
    uniq, inverse = np.unique(rows, return_inverse=True)
    return view.read_dataset(ds, uniq)[inverse]


def _segments(view: StoreView, g: h5py.Group, start: np.ndarray, count: np.ndarray
              ) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """(features, coords) of each row's local segment (None where nothing is stored), read in
    contiguous slices of at most ~CHUNK_BYTES."""
    out: list = [None] * len(start)
    have = [j for j in range(len(start)) if start[j] >= 0]
    have.sort(key=lambda j: start[j])
    limit = max(1, CHUNK_BYTES // (2 * int(g["features"].shape[1]) + 4))
    i = 0
    while i < len(have):
        j = i
        lo, hi = int(start[have[i]]), int(start[have[i]] + count[have[i]])
        while j + 1 < len(have) and \
                max(hi, int(start[have[j + 1]] + count[have[j + 1]])) - lo <= limit:
            j += 1
            hi = max(hi, int(start[have[j]] + count[have[j]]))
        feats = view.read_dataset(g["features"], slice(lo, hi))
        coords = view.read_dataset(g["coords"], slice(lo, hi))
        for k in have[i:j + 1]:
            a = int(start[k]) - lo
            out[k] = (feats[a:a + int(count[k])], coords[a:a + int(count[k])])
        i = j + 1
    return out


def _put_local(kg: h5py.Group, put: RowPutter, sets: list) -> None:
    """Append each row's local features as a new segment of OUT's flat arrays (re-based)."""
    n = len(sets)
    starts = np.full(n, -1, np.int64)
    counts = np.zeros(n, np.int32)
    grids = np.zeros((n, 2), np.int32)
    end = kg["features"].shape[0]
    feats, coords = [], []
    for i, s in enumerate(sets):
        if s is None:
            continue
        f, c, grid = s
        starts[i], counts[i], grids[i] = end, len(f), grid
        end += len(f)
        feats.append(f)
        coords.append(c)
    if feats:
        for name, parts in (("features", feats), ("coords", coords)):
            ds = kg[name]
            old = ds.shape[0]
            ds.resize(end, axis=0)
            ds[old:end] = np.concatenate(parts).astype(ds.dtype, copy=False)
    put(kg["start"], starts)
    put(kg["count"], counts)
    put(kg["grid"], grids)


# ---------------------------------------------------------------------------------------------
# imgdb merge


@dataclass
class MergeSummary:
    """What a merge did."""

    out: str
    shards: list[str]
    extractors: list[str] = field(default_factory=list)
    rows_seen: int = 0
    added: int = 0
    already: int = 0  # rows whose path OUT (or an earlier shard) already holds: not added
    different: int = 0  # of those, rows whose file facts (size, mtime, digest) differ: OUT kept
    lost: int = 0  # tombstones of a repaired shard (no path): nothing to copy
    ignored: list[str] = field(default_factory=list)  # encodings left out
    seconds: float = 0.0

    def line(self) -> str:
        text = (f"merged {len(self.shards)} store(s) into {self.out}: {self.added} rows added, "
                f"{self.already} already there")
        if self.different:
            text += f" ({self.different} of them with different file contents: {self.out} kept)"
        if self.lost:
            text += f", {self.lost} lost rows skipped"
        return text + f" in {self.seconds:.1f}s [{', '.join(self.extractors) or 'no extractor'}]"

    def as_dict(self) -> dict:
        return {"out": self.out, "shards": self.shards, "extractors": self.extractors,
                "rows_seen": self.rows_seen, "added": self.added, "already": self.already,
                "different": self.different, "lost": self.lost,
                "ignored_encodings": self.ignored, "seconds": round(self.seconds, 3)}


def _local_bytes_per_row(view: StoreView) -> float:
    per = 0.0
    for info in view.local_sets():
        if info.images:
            per += info.features * (info.channels * 2 + 4) / info.images
    return per


def merge_stores(shards: Sequence[str | Path], out: str | Path,
                 progress: Callable[[int, int], None] | None = None) -> MergeSummary:
    """Append the rows of `shards` (in order) to `out`, skipping paths it already holds."""
    started = time.perf_counter()
    out = Path(out)
    shards = [Path(s) for s in shards]
    if not shards:
        raise InvalidRequest("give at least one store to merge")
    for s in shards:
        if s.absolute() == out.absolute() or (s.exists() and out.exists() and s.samefile(out)):
            raise InvalidRequest(f"{s} is the output store itself; give it only as {{db}}",
                                 mentions=("db",))
    shapes, sizes, ignored, local_bytes = [], [], set(), 0.0
    for s in shards:
        with open_read(s) as view:
            sizes.append(view.rows)
            ignored |= {e for e in view.extractors() if is_encoding(view, e)}
            if view.rows or view.extractors():
                shapes.append((str(s), extractor_shapes(view)))
            local_bytes = max(local_bytes, _local_bytes_per_row(view))
    summary = MergeSummary(str(out), [str(s) for s in shards], ignored=sorted(ignored))
    with StoreWriter(out) as writer:
        try:
            with writer.read() as view:
                extractors = check_compatible(shapes, (str(out), extractor_shapes(view)),
                                              view.rows)
                index = PathIndex(view)
            ensure_extractors(writer, extractors)
            summary.extractors = sorted(extractors)
            copier = RowCopier(writer, shards, extractors)
            chunk = copier.chunk_rows(local_bytes)
            total, done = sum(sizes), 0
            if progress:
                progress(0, total)
            for si, (shard, rows) in enumerate(zip(shards, sizes)):
                for lo in range(0, rows, chunk):
                    hi = min(rows, lo + chunk)
                    picks, paths = _picks(si, shard, lo, hi, index, writer, summary)
                    ids = copier.copy(picks)
                    index.add(paths, ids)
                    summary.added += len(ids)
                    done += hi - lo
                    summary.rows_seen = done
                    if progress:
                        progress(done, total)
        except BaseException:
            writer.discard_if_empty()
            raise
    summary.seconds = time.perf_counter() - started
    return summary


def _picks(source: int, shard: Path, lo: int, hi: int, index: PathIndex, writer: StoreWriter,
           summary: MergeSummary) -> tuple[list[Pick], list[str]]:
    """Rows lo..hi-1 of a shard that OUT lacks (by path), and their paths."""
    rows = np.arange(lo, hi)
    with open_read(shard) as view:
        paths = view.paths(rows)
        facts = {name: view.column(name, rows) for name in ("size", "mtime", "sha", "status")}
    with writer.read() as out_view:
        found = index.find(paths, out_view)
        known = [r for r in found if r is not None]
        out_facts = ({name: dict(zip(known, out_view.column(name, known)))
                      for name in ("size", "mtime", "sha")} if known else {})
    picks, picked_paths, seen = [], [], set()
    for i, (path, row) in enumerate(zip(paths, found)):
        if not path or facts["status"][i] == STATUS_LOST:
            summary.lost += 1
            continue
        if row is not None or path in seen:
            summary.already += 1
            if row is not None and any(out_facts[name][row] != facts[name][i]
                                       for name in ("size", "mtime", "sha")):
                summary.different += 1
            continue
        seen.add(path)
        picks.append(Pick(source, int(rows[i])))
        picked_paths.append(path)
    return picks, picked_paths


__all__ = ["merge_stores", "MergeSummary", "RowCopier", "Pick", "PathIndex", "ExtractorShape",
           "extractor_shapes", "check_compatible", "ensure_extractors", "difference",
           "is_encoding"]
