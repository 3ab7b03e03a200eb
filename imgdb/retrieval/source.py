"""Vector sources: a descriptor name -> the raw vectors that fit pca, index build, fit graph,
query and eval consume.

A name is either one stored descriptor (`head/gem-p3`, any unique suffix the store accepts) or a
*fusion* of several: `block6/mac+head/gem-p3`, optionally weighted (`0.5*block6/mac+head/gem-p3`).
A fused vector is each part L2-normalised, multiplied by its weight and concatenated; the
post-processing that follows (L2, or a PCA model fitted on the fused vectors) treats it as any
raw descriptor. The store knows nothing of fusions: a fusion is read part by part and joined
here, and its models, graphs and indexes are registered under its canonical name (every part's
full name, weights written as `W*` when not 1).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from itertools import combinations
from typing import Iterator, Sequence

import numpy as np

from ..errors import StoreError, InvalidRequest, UserError
from ..numeric import l2_normalize
from ..store import DescriptorInfo, StoreView

_WEIGHT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*(\S.*)$")
MAX_PARTS = 8


@dataclass(frozen=True)
class Part:
    """One stored descriptor of a source, with its weight in a fusion."""

    info: DescriptorInfo
    weight: float = 1.0

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.info.extractor, self.info.layer, self.info.pooling)

    @property
    def label(self) -> str:
        return self.info.name if self.weight == 1.0 else f"{self.weight:g}*{self.info.name}"


@dataclass(frozen=True)
class VectorSource:
    """Where the raw vectors of a descriptor name come from (one stored descriptor, or several
    fused)."""

    parts: tuple[Part, ...]

    # -- naming ------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The canonical name (what models, graphs and indexes record)."""
        return "+".join(p.label for p in self.parts)

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1

    @property
    def extractors(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.info.extractor for p in self.parts))

    @property
    def dim(self) -> int:
        return sum(int(p.info.shape[1]) for p in self.parts)

    # -- what depends on the store's state ---------------------------------------------------------
    def valid(self, view: StoreView) -> np.ndarray:
        """Rows whose vectors exist for every part."""
        mask = None
        for ext in self.extractors:
            v = view.valid(ext)
            mask = v if mask is None else mask & v
        return mask

    def revision(self, view: StoreView) -> int | str:
        """The extractors' revision counters (an int for one extractor, as indexes always
        recorded; `ext:N,ext:M` for a fusion of several)."""
        if len(self.extractors) == 1:
            return view.revision(self.extractors[0])
        return ",".join(f"{e}:{view.revision(e)}" for e in self.extractors)

    def content_hash(self, view: StoreView) -> str:
        if len(self.extractors) == 1:
            return view.content_hash(self.extractors[0])
        return "+".join(view.content_hash(e) for e in self.extractors)

    # -- vectors -------------------------------------------------------------------------------------
    def fuse(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """Raw vectors of each part (same rows) -> the source's raw vectors (float32)."""
        if not self.fused:
            return np.asarray(parts[0], dtype=np.float32)
        return np.concatenate([p.weight * l2_normalize(np.asarray(x, dtype=np.float32))
                               for p, x in zip(self.parts, parts)], axis=1).astype(np.float32)

    def vectors(self, view: StoreView, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Raw vectors of some rows, in the order given."""
        return self.fuse([view.vectors(p.info, rows) for p in self.parts])

    def iter_valid(self, view: StoreView, chunk: int = 65536
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row ids, raw vectors) of the valid rows, in chunks (flat memory)."""
        if not self.fused:
            yield from view.iter_valid(self.parts[0].info, chunk)
            return
        valid = self.valid(view)
        streams = [_by_chunk(view.iter_valid(p.info, chunk), chunk) for p in self.parts]
        for start in range(0, view.rows, chunk):
            want = np.flatnonzero(valid[start:start + chunk]) + start
            blocks = [next(s)[1] for s in streams]  # every stream yields once per chunk
            if not len(want):
                continue
            picked = []
            for rows, block in blocks:
                picked.append(block[np.searchsorted(rows, want)])
            yield want, self.fuse(picked)

    def valid_vectors(self, view: StoreView) -> tuple[np.ndarray, np.ndarray]:
        """(valid row ids, their raw vectors)."""
        parts = list(self.iter_valid(view))
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    # -- query images --------------------------------------------------------------------------
    def wanted(self, extractor: str) -> list[tuple[str, str]]:
        """The (layer, pooling) pairs a query image needs from one extractor."""
        return [(p.info.layer, p.info.pooling) for p in self.parts if p.info.extractor == extractor]

    def from_described(self, described: dict[str, dict[tuple[str, str], np.ndarray]]
                       ) -> np.ndarray:
        """One query image described by each extractor ({extractor: {(layer, pooling): raw}})
        -> the source's raw vector."""
        vecs = [np.asarray(described[p.info.extractor][(p.info.layer, p.info.pooling)],
                           np.float32)[None] for p in self.parts]
        return self.fuse(vecs)[0]


def _by_chunk(stream: Iterator[tuple[np.ndarray, np.ndarray]], chunk: int):
    """Re-emit `iter_valid` output once per chunk of rows (empty chunks included)."""
    index = 0
    for rows, block in stream:
        at = int(rows[0]) // chunk
        while index < at:
            yield index, (np.zeros(0, np.int64), block[:0])
            index += 1
        yield index, (rows, block)
        index += 1
    while True:
        yield index, (np.zeros(0, np.int64), np.zeros((0, 0), np.float32))
        index += 1


def single(info: DescriptorInfo) -> VectorSource:
    return VectorSource((Part(info),))


def _parse_part(view: StoreView, text: str) -> Part:
    weight = 1.0
    m = _WEIGHT.match(text)
    if m:
        weight = float(m.group(1))
        text = m.group(2)
        if not math.isfinite(weight) or weight <= 0:
            raise InvalidRequest(f"the weight of {text!r} in a fusion must be a positive number")
    return Part(view.descriptor(text.strip()), weight)


def resolve(view: StoreView, name: str) -> VectorSource:
    """A descriptor name (stored, by full name or unique suffix, or a fusion `A+B`, `0.5*A+B`)
    -> its source. Unknown or ambiguous names are one-line errors."""
    name = str(name).strip()
    if not name:
        raise InvalidRequest("the descriptor name is empty")
    try:
        if not _WEIGHT.match(name):
            return single(view.descriptor(name))
    except StoreError as exc:
        if "+" not in name:
            raise
        first_error: UserError = exc
    else:
        first_error = StoreError(f"the store has no descriptor {name!r}")
    tokens = name.split("+")
    if len(tokens) > 3 * MAX_PARTS:
        raise InvalidRequest(f"a fusion takes at most {MAX_PARTS} descriptors")
    found: list[tuple[Part, ...]] = []
    errors: list[str] = []
    # every way of joining the '+'-separated tokens back into pieces (encoding names hold '+')
    for cuts in _partitions(len(tokens)):
        pieces = ["+".join(tokens[a:b]) for a, b in cuts]
        try:
            parts = tuple(_parse_part(view, p) for p in pieces)
        except InvalidRequest:
            raise
        except UserError as exc:
            errors.append(str(exc))
            continue
        found.append(parts)
    distinct = {tuple((p.info.name, p.weight) for p in parts): parts for parts in found}
    if not distinct:
        if len(tokens) == 1:
            raise first_error
        detail = min(errors, key=len) if errors else str(first_error)
        raise StoreError(f"{name!r} is neither a stored descriptor nor a fusion of stored ones "
                         f"({detail})")
    if len(distinct) > 1:
        raise InvalidRequest(f"fusion {name!r} can be read in several ways: "
                         + "; ".join(" + ".join(p.label for p in parts)
                                     for parts in distinct.values()) + "; use full names")
    parts = next(iter(distinct.values()))
    if len(parts) > MAX_PARTS:
        raise InvalidRequest(f"a fusion takes at most {MAX_PARTS} descriptors")
    names = [p.info.name for p in parts]
    for a, b in combinations(names, 2):
        if a == b:
            raise InvalidRequest(f"descriptor {a} appears twice in fusion {name!r}")
    if len(parts) == 1 and parts[0].weight != 1.0:
        raise InvalidRequest(f"a weight applies to a part of a fusion; {name!r} has one part")
    return VectorSource(parts)


def _partitions(n: int) -> Iterator[list[tuple[int, int]]]:
    """Every split of tokens 0..n-1 into consecutive runs, as (start, stop) pairs."""
    for mask in range(1 << (n - 1)):
        cuts, start = [], 0
        for i in range(1, n):
            if mask >> (i - 1) & 1:
                cuts.append((start, i))
                start = i
        cuts.append((start, n))
        yield cuts


def resolve_all(view: StoreView, names: Sequence[str]) -> list[VectorSource]:
    """`all` (or nothing): every stored descriptor; else each name resolved."""
    if list(names) in (["all"], []):
        return [single(info) for info in view.descriptors()]
    return [resolve(view, n) for n in names]


__all__ = ["Part", "VectorSource", "resolve", "resolve_all", "single"]
