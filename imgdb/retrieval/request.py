"""A query request, typed, and the one parser of its values (the CLI and the HTTP API both use it).

A `QueryRequest` says what to search (descriptor, model, index or exact search), how many results
(`k`), and the chain of stages that re-rank them (`chain`: query expansion, diffusion,
k-reciprocal, ... in order). Its values come from text through the functions below, so `imgdb
query --rerank diffusion:k=5` and `POST /query rerank=diffusion:k=5` accept the same values with
the same ranges and the same messages. Errors are `InvalidRequest` naming the request field
(`rerank`, `k`): cli/ spells it `--rerank`, serve/ as the form field.

Stages are registered once, in `STAGES`: a name, its parameters (each with its parser) and the
function that makes the stage. A chain is written `stage[:key=value,...][,stage...]`
(`verify,diffusion:k=10,alpha=0.9`): a comma-separated item with `=` and no `:` continues the
stage before it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Callable

from ..errors import InvalidRequest, refuse
from .rerank import (ALPHA_QE_M, DIFFUSION_ALPHA, DIFFUSION_ITERATIONS, KRECIPROCAL_K1,
                     KRECIPROCAL_K2, KRECIPROCAL_LAMBDA, Diffusion, KReciprocal, QueryExpansion,
                     Ranker)

Box = tuple[float, float, float, float]


# ---------------------------------------------------------------------------------------------
# values


def integer(low: int, high: int | None = None) -> Callable[[str, str], int]:
    """A parser (key, text) -> an integer in [low, high]."""

    def parse(key: str, text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise InvalidRequest(f"{key}={str(text)[:40]!r} must be an integer") from None
        if value < low or (high is not None and value > high):
            span = f"between {low} and {high}" if high is not None else f">= {low}"
            raise InvalidRequest(f"{key}={value} must be {span}")
        return value
    return parse


def number(low: float, high: float, low_open: bool = False, high_open: bool = False
           ) -> Callable[[str, str], float]:
    """A parser (key, text) -> a finite number in the interval."""

    def parse(key: str, text: str) -> float:
        try:
            value = float(str(text).strip())
        except ValueError:
            raise InvalidRequest(f"{key}={str(text)[:40]!r} must be a number") from None
        bad = (not math.isfinite(value) or value < low or value > high
               or (low_open and value == low) or (high_open and value == high))
        if bad:
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            raise InvalidRequest(f"{key}={str(text).strip()} must be in {lo}{low:g}, {high:g}{hi}")
        return value
    return parse


def parse_k(text, high: int | None = None) -> int:
    """How many results: an integer >= 1 (at most `high`, a server's limit)."""
    span = f"from 1 to {high}" if high is not None else ">= 1"
    try:
        value = int(str(text).strip())
    except ValueError:
        raise InvalidRequest(f"must be an integer {span}, not {str(text)[:40]!r}", "k") from None
    if value < 1 or (high is not None and value > high):
        raise InvalidRequest(f"must be {span}, not {value}", "k")
    return value


def parse_bbox(text) -> Box:
    """A query box `x1,y1,x2,y2` in pixels of the upright image: finite, x1, y1 >= 0, x2 > x1,
    y2 > y1."""
    values = [s.strip() for s in str(text).split(",")]
    try:
        box = tuple(float(v) for v in values)
    except ValueError:
        box = ()
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise InvalidRequest(f"{str(text)[:60]!r} must be x1,y1,x2,y2 (four finite numbers, "
                             f"pixels)", "bbox")
    x1, y1, x2, y2 = box
    if min(box) < 0:
        raise InvalidRequest(f"{str(text)[:60]!r} must not be negative", "bbox")
    if x2 <= x1 or y2 <= y1:
        raise InvalidRequest(f"{str(text)[:60]!r} needs x2 > x1 and y2 > y1", "bbox")
    return box  # type: ignore[return-value]


def parse_row(text) -> int:
    """A stored image id: a whole number >= 0 (digits only)."""
    text = str(text)
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise InvalidRequest(f"an image id is a whole number >= 0, not {text[:40]!r}", "ids")
    return int(text)


# ---------------------------------------------------------------------------------------------
# stages

_SPEC = re.compile(r"^\s*([a-z][a-z0-9-]*)\s*(?::\s*(.*))?$", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class StageType:
    """A re-ranking stage as the request names it: its parameters and how to make it."""

    name: str
    params: dict[str, Callable[[str, str], object]]
    make: Callable[[dict], Ranker]
    usage: str


def _diffusion(p: dict) -> Ranker:
    return Diffusion(p.get("k"), p.get("alpha", DIFFUSION_ALPHA), p.get("gamma"),
                     p.get("iter", DIFFUSION_ITERATIONS), guard=bool(p.get("guard", 1)))


def _kreciprocal(p: dict) -> Ranker:
    return KReciprocal(p.get("k1", KRECIPROCAL_K1), p.get("k2", KRECIPROCAL_K2),
                       p.get("lambda", KRECIPROCAL_LAMBDA), guard=bool(p.get("guard", 1)))


def _verify(p: dict) -> Ranker:
    from .verify import (VERIFY_EXPAND, VERIFY_K, VERIFY_MIN_INLIERS, VERIFY_RATIO,
                         VERIFY_THRESHOLD, Verify)

    return Verify(p.get("k", VERIFY_K), p.get("inliers", VERIFY_MIN_INLIERS),
                  p.get("ratio", VERIFY_RATIO), p.get("px", VERIFY_THRESHOLD),
                  p.get("qe", VERIFY_EXPAND))


#: every stage a chain may name (a new stage: one file with its Ranker, one line here)
STAGES: dict[str, StageType] = {s.name: s for s in (
    StageType("verify", {"k": integer(1, 1000), "inliers": integer(4, 10000),
                         "ratio": number(0, 1, True, True), "px": number(0, 1000, True),
                         "qe": integer(0, 100)},
              _verify, "verify[:k=..,inliers=..,ratio=..,px=..,qe=..]"),
    StageType("diffusion", {"k": integer(1, 1000), "alpha": number(0, 1, True, True),
                            "gamma": number(0, 100, True), "iter": integer(1, 1000),
                            "guard": integer(0, 1)},
              _diffusion, "diffusion[:k=..,alpha=..,gamma=..,iter=..,guard=0|1]"),
    StageType("kreciprocal", {"k1": integer(1, 1000), "k2": integer(1, 1000),
                              "lambda": number(0, 1), "guard": integer(0, 1)},
              _kreciprocal, "kreciprocal[:k1=..,k2=..,lambda=..,guard=0|1]"),
)}


def _usage() -> str:
    return ", ".join(s.usage for s in STAGES.values())


def _params(text: str, stage: StageType) -> dict:
    out: dict = {}
    keys = ", ".join(stage.params)
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq or not value.strip():
            raise InvalidRequest(f"{stage.name}: {item!r} must be KEY=VALUE (keys: {keys})")
        if key not in stage.params:
            raise InvalidRequest(f"{stage.name}: unknown parameter {key!r} (keys: {keys})")
        if key in out:
            raise InvalidRequest(f"{stage.name}: {key} is given twice")
        try:
            out[key] = stage.params[key](key, value.strip())
        except InvalidRequest as exc:
            raise InvalidRequest(f"{stage.name}: {exc}") from None
    return out


def parse_stage(text: str) -> Ranker:
    """One stage: `NAME[:KEY=VALUE,...]`."""
    m = _SPEC.match(str(text))
    stage = STAGES.get(m.group(1).lower()) if m else None
    if stage is None:
        raise InvalidRequest(f"{str(text).strip()[:60]!r} is not a re-ranking; give {_usage()}")
    return stage.make(_params(m.group(2) or "", stage))


def split_chain(text: str) -> list[str]:
    """`a:k=1,x=2,b` -> ['a:k=1,x=2', 'b']: an item with `=` and no `:` belongs to the stage
    before it."""
    pieces: list[str] = []
    for item in str(text).split(","):
        if pieces and "=" in item and ":" not in item:
            pieces[-1] += "," + item
        else:
            pieces.append(item)
    return [p.strip() for p in pieces]


def parse_rerank(text: str) -> tuple[Ranker, ...]:
    """A chain of stages, `stage[:k=v,...][,stage...]` (`field` rerank on errors)."""
    try:
        pieces = split_chain(text)
        if not any(pieces) or not all(pieces):
            raise InvalidRequest(f"{str(text)[:60]!r}: give {_usage()} (a chain: "
                                 f"comma-separated)")
        chain = tuple(parse_stage(p) for p in pieces)
        specs = [r.spec for r in chain]
        for i, spec in enumerate(specs):
            if spec in specs[:i]:
                raise InvalidRequest(f"the stage {spec} is given twice")
        return chain
    except InvalidRequest as exc:
        raise exc.with_field("rerank") from None


def parse_qe(text) -> QueryExpansion | None:
    """`M` (average QE with the top M; 0: none) or `alpha:A[,M]` (alpha-QE), either followed
    by `,guard=0` to expand on every collection (`retrieval.guard`)."""
    raw = str(text).strip()
    guard = re.search(r",\s*guard\s*=\s*(\S*)\s*$", raw, re.IGNORECASE)
    on = True
    if guard:
        try:
            on = bool(integer(0, 1)("guard", guard.group(1)))
        except InvalidRequest as exc:
            raise exc.with_field("qe") from None
        raw = raw[:guard.start()].strip()
    if re.fullmatch(r"\d+", raw):
        m = int(raw)
        if m > 10000:
            raise InvalidRequest(f"{m}: at most 10000 neighbours", "qe")
        return QueryExpansion(m, guard=on) if m > 0 else None
    match = re.fullmatch(r"alpha\s*:\s*([^,]+?)\s*(?:,\s*(\S+))?", raw, re.IGNORECASE)
    if not match:
        raise InvalidRequest(f"{raw[:60]!r}: give M (average QE with the top M) or alpha:A[,M] "
                             f"(alpha-QE)", "qe")
    try:
        alpha = number(0, 100)("alpha", match.group(1))
        m = integer(1, 10000)("M", match.group(2)) if match.group(2) else ALPHA_QE_M
    except InvalidRequest as exc:
        raise exc.with_field("qe") from None
    return QueryExpansion(m, alpha, on)


# ---------------------------------------------------------------------------------------------
# the request


@dataclass(frozen=True)
class QueryRequest:
    """What one query asks of the store (the images or ids come beside it)."""

    descriptor: str | None = None  # a descriptor (or fusion) name; None: the index's
    model: str | None = None  # a PCA model version (vN, 'none'); None: the index's
    index: str | None = None  # a registered index name
    exact: bool = False  # search every stored vector (borrowing an index's descriptor/model)
    k: int = 10
    search_k: int | None = None  # Annoy's search budget
    qe: QueryExpansion | None = None  # expansion, the first stage
    rerank: tuple[Ranker, ...] = ()  # stages after it
    graph: str | None = None  # the graph model version the stages use (default: newest)
    bbox: Box | None = None  # crop of the query image files (pixels of the upright image)
    regions: bool = False  # also search with crops of the query (`retrieval.views`)
    turns: bool = False  # also search with the query turned by 90, 180, 270 degrees
    device: str = "auto"

    @property
    def chain(self) -> tuple[Ranker, ...]:
        """Every stage after the cosine ranking, in order."""
        return ((self.qe,) if self.qe is not None else ()) + tuple(self.rerank)

    @property
    def views(self) -> bool:
        """Whether other views of the query (crops, turns) are searched beside it."""
        return self.regions or self.turns

    @property
    def uses_keypoints(self) -> bool:
        """Whether a stage verifies with keypoints (each query then needs its own)."""
        return any(st.uses_keypoints for st in self.rerank)

    @property
    def graph_stages(self) -> bool:
        """Whether a stage needs every item's similarity (so search is exact)."""
        return any(st.needs_collection for st in self.rerank)

    def with_(self, **changes) -> "QueryRequest":
        return replace(self, **changes)

    def check(self, files: int = 0, ids: int = 0) -> "QueryRequest":
        """Values that contradict each other, or would be ignored, are refused."""
        if not files and not ids:
            raise refuse("give at least one {images} or {ids}", "images", "ids")
        if self.rerank and self.qe is not None:
            raise refuse("{qe} and {rerank} are two re-rankings; give one (imgdb eval compares "
                         "them side by side)", "qe", "rerank")
        if self.graph is not None and not self.rerank:
            raise refuse("{graph} chooses the graph of {rerank}; give {rerank} too",
                         "graph", "rerank")
        if self.rerank and self.search_k is not None:
            raise refuse("{search_k} tunes the Annoy search; {rerank} ranks the whole graph",
                         "search_k", "rerank")
        if self.index and self.descriptor:
            raise refuse("{index} and {descriptor} both choose what to search; give one",
                         "index", "descriptor")
        if self.index and self.model is not None:
            raise refuse("{model} cannot be combined with {index}: the index was built with its "
                         "own model (see imgdb index ls)", "model", "index")
        if self.model is not None and not self.descriptor:
            raise refuse("{model} needs {descriptor} (with {index} the index's model is used)",
                         "model", "descriptor", "index")
        if self.exact and self.search_k is not None:
            raise refuse("{search_k} tunes the Annoy search; {exact} compares every vector",
                         "search_k", "exact")
        if self.bbox is not None and not files:
            raise refuse("{bbox} crops query image files; {ids} queries use their stored "
                         "vectors", "bbox", "ids")
        return self


__all__ = ["QueryRequest", "STAGES", "StageType", "parse_bbox", "parse_k", "parse_qe",
           "parse_rerank", "parse_row", "parse_stage", "split_chain", "integer", "number"]
