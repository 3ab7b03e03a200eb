"""Every shared option, declared once as a typer `Annotated` alias, with its parse-time check.

A command takes an option by naming its alias (`db: Db`, `as_json: Json`, `k: TopK = 10`).
Every value is checked while the command line is parsed: a wrong one is a usage error (exit 2,
one line naming the option) before any work starts. To add an option: write (or reuse) a parser
below (it returns the value the library takes, or raises `typer.BadParameter` with a sentence),
then one alias; give it a default where the command uses it.

Parsers are plain functions of one string, so they also check values in tests and in other
front ends (the server) without typer.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Callable, List, Optional

import typer

from .choices import (DEFAULT_POOLINGS, DEVICE_FORMS, MASKS, POOLING_FORMS, SIZE_FORMS,
                      Aggregate, Backbone, Decoder, Method, Precision, Preset, Protocol, QueryMode)

# --------------------------------------------------------------------------------------------
# parsers: str -> value, or typer.BadParameter (exit 2)


class IntList(tuple):
    """A comma-separated list of integers, as parsed."""


class FloatList(tuple):
    """A comma-separated list of numbers, as parsed."""


class NameList(tuple):
    """A comma-separated list of names, as parsed (duplicates dropped, order kept)."""


class Box(tuple):
    """x1, y1, x2, y2 in pixels, as parsed."""


def _bad(message: str) -> typer.BadParameter:
    return typer.BadParameter(message)


def _number(text: str, kind: type) -> int | float:
    text = str(text).strip()
    try:
        value = kind(text)
    except ValueError:
        raise _bad(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise _bad(f"{text!r} is not a finite number")
    return value


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """A parser of one integer in [low, high]."""

    def parse(text: str) -> int:
        value = _number(text, int)
        if low is not None and value < low:
            raise _bad(f"{value} is below the minimum {low}")
        if high is not None and value > high:
            raise _bad(f"{value} is above the maximum {high}")
        return int(value)

    return parse


def number(low: float | None = None, *, above: bool = False) -> Callable[[str], float]:
    """A parser of one finite number >= low (> low when `above`)."""

    def parse(text: str) -> float:
        value = float(_number(text, float))
        if low is not None and (value <= low if above else value < low):
            raise _bad(f"{text.strip()} must be {'>' if above else '>='} {low:g}")
        return value

    return parse


def _items(text: str) -> list[str]:
    items = [s.strip() for s in str(text).split(",")]
    if not any(items) or not all(items):
        raise _bad(f"{text!r} must be a comma-separated list with no empty item")
    return items


def integer_list(low: int = 1) -> Callable[[str], IntList]:
    """A parser of comma-separated integers >= low, e.g. 512,256,128."""
    one = integer(low)
    return lambda text: IntList(one(v) for v in _items(text))


def number_list(low: float = 0.0, *, above: bool = True) -> Callable[[str], FloatList]:
    """A parser of comma-separated finite numbers > low (>= with above=False)."""
    one = number(low, above=above)
    return lambda text: FloatList(one(v) for v in _items(text))


def size_policy(text: str) -> str:
    """`--size`: original | max:N | min:N | fixed:N | fixed:WxH -> its canonical spec."""
    from ..features.images import SizePolicy

    try:
        return SizePolicy.parse(text).spec
    except ValueError:
        raise _bad(f"{text!r} is not a size policy; use {' | '.join(SIZE_FORMS)} "
                   f"(N, W, H positive integers)") from None


def pooling_list(text: str) -> NameList:
    """`--pooling`: comma-separated pooling names of the table, parameters included."""
    from ..features.poolings import canonical_pooling_name  # torch-free

    names = []
    for item in _items(text):
        try:
            names.append(canonical_pooling_name(item))
        except ValueError:
            raise _bad(f"unknown pooling {item!r}; use {', '.join(DEFAULT_POOLINGS)} or "
                       f"{', '.join(POOLING_FORMS)} (e.g. gem-p2.5, rmac-l2)") from None
    return NameList(dict.fromkeys(names))


def name_list(text: str) -> NameList:
    """Comma-separated names (layers): no empty item, duplicates dropped."""
    return NameList(dict.fromkeys(_items(text)))


def local_specs(text: str) -> NameList:
    """`--keep-local LAYER[:MASK][,...]`: each a layer, or a layer and one of the masks."""
    out = []
    for item in _items(text):
        layer, colon, mask = item.partition(":")
        if not layer or (colon and mask not in MASKS):
            raise _bad(f"{item!r} is not LAYER or LAYER:MASK with MASK one of {', '.join(MASKS)}")
        out.append(item)
    return NameList(dict.fromkeys(out))


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def device(text: str) -> str:
    """`--device`: auto | cpu | cuda[:N]."""
    spec = str(text).strip().lower()
    if not _DEVICE.match(spec):
        raise _bad(f"{text!r} is not a device; use auto, cpu or cuda[:N]")
    return spec


def weights(text: str) -> str:
    """`--weights`: imagenet | none | an existing state_dict file."""
    spec = str(text).strip()
    if spec.lower() in ("imagenet", "none"):
        return spec.lower()
    path = Path(spec).expanduser()
    if path.is_dir():
        raise _bad(f"{spec!r} is a directory; give imagenet, none or a state_dict file")
    if not path.is_file():
        raise _bad(f"{spec!r} is neither imagenet, none nor an existing state_dict file")
    return spec


def store_file(text: str) -> Path:
    """A store path (--db, --from, --pca-from, --queries-db): not a directory. Whether it
    exists and is a store is the command's question (exit 1: it cannot be done)."""
    path = Path(str(text)).expanduser()
    if not str(text).strip():
        raise _bad("the store path is empty; give a file such as photos.h5")
    if path.is_dir():
        raise _bad(f"{text} is a directory; give a store file such as photos.h5")
    return path


def existing_path(text: str) -> Path:
    """A file or folder that must exist (--gt)."""
    path = Path(str(text)).expanduser()
    if not path.exists():
        raise _bad(f"{text} does not exist")
    return path


def existing_dir(text: str) -> Path:
    """A folder that must exist (--queries)."""
    path = existing_path(text)
    if not path.is_dir():
        raise _bad(f"{text} is not a folder")
    return path


def output_file(text: str) -> Path:
    """A file to write (--html): not a directory; its folder is created when missing."""
    path = Path(str(text)).expanduser()
    if not str(text).strip() or path.is_dir():
        raise _bad(f"{text!r} is a directory; give a file name such as results.html")
    return path


def output_dir(text: str) -> Path:
    """A folder to write into (--report): not an existing file."""
    path = Path(str(text)).expanduser()
    if path.exists() and not path.is_dir():
        raise _bad(f"{text} exists and is not a folder")
    return path


_MODEL_VERSION = re.compile(r"^(none|raw|latest|v?\d+)$")


def model_version(text: str) -> str:
    """`--pca`: a model version vN (or N), latest, or none."""
    spec = str(text).strip().lower()
    if not _MODEL_VERSION.match(spec):
        raise _bad(f"{text!r} is not a model version; use vN (see imgdb models), latest or none")
    if spec.isdigit():
        spec = f"v{spec}"
    return "none" if spec == "raw" else spec


def index_name(text: str) -> str:
    """`--name` of an index: letters, digits, '.', '_', '+', '-' (it becomes a file name)."""
    from ..errors import UserError
    from ..retrieval.index import check_index_name

    try:
        return check_index_name(str(text))
    except UserError as exc:
        raise _bad(str(exc)) from None


def bbox(text: str) -> Box:
    """`--bbox x1,y1,x2,y2` in pixels: finite, x1, y1 >= 0, x2 > x1, y2 > y1 (the request's
    parser, the API's too)."""
    from ..errors import InvalidRequest
    from ..retrieval.request import parse_bbox

    try:
        return Box(parse_bbox(text))
    except InvalidRequest as exc:
        raise _bad(exc.render(with_field=False)) from None


def encode_power(text: str) -> float | str:
    """`encode --power`: a finite alpha > 0, or none (no power-law)."""
    if str(text).strip().lower() == "none":
        return "none"
    return number(0.0, above=True)(text)


def regex(text: str) -> str:
    """A regular expression that compiles."""
    try:
        re.compile(text)
    except re.error as exc:
        raise _bad(f"{text!r} is not a valid regular expression: {exc}") from None
    return text


# --------------------------------------------------------------------------------------------
# completion of the values that are not Enums


def _complete_list(choices: list[str]) -> Callable[[str], list[str]]:
    def complete(incomplete: str) -> list[str]:
        head, _, last = incomplete.rpartition(",")
        prefix = head + "," if head else ""
        return [prefix + c for c in choices if c.startswith(last)]

    return complete


def _complete(choices: list[str]) -> Callable[[str], list[str]]:
    return lambda incomplete: [c for c in choices if c.startswith(incomplete)]


def _complete_weights(incomplete: str) -> list[str]:
    found = [c for c in ("imagenet", "none") if c.startswith(incomplete)]
    folder = os.path.dirname(incomplete) or "."
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        names = []
    for name in names:
        path = os.path.join(os.path.dirname(incomplete), name)
        if path.startswith(incomplete) and not name.startswith("."):
            found.append(path + ("/" if os.path.isdir(path) else ""))
    return found


def graph_version(text: str) -> str:
    """`--graph`: a graph model version vN (or N), or latest."""
    spec = model_version(text)
    if spec == "none":
        raise _bad("a re-ranking needs a graph: give vN (see imgdb models) or latest")
    return spec


def _request_value(parse: Callable[[str], object]) -> Callable[[str], str]:
    """A parser of one query-request value, checked by the request's own parser (the one the
    HTTP API uses too): its message, without the field name typer already shows."""
    from ..errors import InvalidRequest

    def check(text: str) -> str:
        try:
            parse(text)
        except InvalidRequest as exc:
            raise _bad(exc.render(with_field=False)) from None
        return str(text).strip()
    return check


def qe_spec(text: str) -> str:
    """`--qe`: M (average QE) or alpha:A[,M] (alpha-QE)."""
    from ..retrieval.request import parse_qe

    return _request_value(parse_qe)(text)


def rerank_spec(text: str) -> str:
    """`--rerank`: a chain of stages, stage[:KEY=VALUE,...][,stage...]."""
    from ..retrieval.request import parse_rerank

    return _request_value(parse_rerank)(text)


# --------------------------------------------------------------------------------------------
# the aliases

Db = Annotated[Path, typer.Option(
    "--db", envvar="IMGDB_DB", parser=store_file, metavar="FILE.h5",
    help="The store (an HDF5 file). Env: IMGDB_DB.")]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q",
                                     help="No progress bar or log lines on stderr.")]
Device = Annotated[str, typer.Option(
    "--device", parser=device, metavar="auto|cpu|cuda[:N]", autocompletion=_complete(list(DEVICE_FORMS[:3])),
    help="Where networks and codebooks run: auto (CUDA when present), cpu, cuda[:N].")]
Descriptor = Annotated[str, typer.Option(
    "--descriptor", "-d", metavar="DESCRIPTOR",
    help="EXTRACTOR/LAYER/POOLING as printed by imgdb info (a unique suffix such as "
         "pool5/crow is enough).")]
OptDescriptor = Annotated[Optional[str], typer.Option(
    "--descriptor", "-d", metavar="DESCRIPTOR",
    help="Descriptor to search (its index, or brute force with --exact); a unique suffix "
         "such as pool5/crow is enough.")]
Descriptors = Annotated[List[str], typer.Option(
    "--descriptor", "-d", metavar="DESCRIPTOR",
    help="Descriptor(s) to evaluate, or all (repeatable).")]
Power = Annotated[Optional[float], typer.Option(
    "--power", parser=number(0.0, above=True), metavar="A",
    help="Power-normalise first: sign(x)|x|^A, A a finite number > 0.")]
PcaDims = Annotated[Optional[int], typer.Option(
    "--dims", parser=integer(1), metavar="N",
    help="Output dimensions, >= 1 (default: all the data allows).")]
SourceStore = Annotated[Optional[Path], typer.Option(
    "--from", parser=store_file, metavar="OTHER.h5",
    help="Fit on another store (held-out protocol, e.g. Paris for Oxford); it needs the same "
         "descriptor or local features.")]
Seed = Annotated[int, typer.Option("--seed", parser=integer(0, 2**32 - 1), metavar="N",
                                   help="Random seed, 0 <= N < 2^32 (results are reproducible).")]
ModelVersion = Annotated[str, typer.Option(
    "--pca", parser=model_version, metavar="vN|latest|none",
    help="PCA-whitening model version (see imgdb models), latest, or none.")]
OptModelVersion = Annotated[Optional[str], typer.Option(
    "--pca", parser=model_version, metavar="vN|latest|none",
    help="PCA-whitening model version for --exact or to choose among --descriptor's indexes "
         "(default: none with --exact).")]

# ingest
Paths = Annotated[List[Path], typer.Argument(
    metavar="PATH", help="Image files and/or folders (searched recursively).")]
BackboneOpt = Annotated[Backbone, typer.Option(
    "--backbone", "-b", case_sensitive=False, help="The network (imgdb.features.backbones).")]
Weights = Annotated[str, typer.Option(
    "--weights", "-w", parser=weights, metavar="imagenet|none|FILE", autocompletion=_complete_weights,
    help="imagenet, none (random, seeded: for shape tests) or a state_dict FILE.")]
Layers = Annotated[Optional[NameList], typer.Option(
    "--layers", "-l", parser=name_list, metavar="LAYER,...",
    help="Comma-separated taps by the papers' names, e.g. pool5,conv5_3 (default: the "
         "backbone's usual ones).")]
Poolings = Annotated[Optional[NameList], typer.Option(
    "--pooling", "-p", parser=pooling_list, metavar="POOLING,...",
    autocompletion=_complete_list([*DEFAULT_POOLINGS, "gem-p", "spoc-s", "rmac-l"]),
    help=f"Comma-separated poolings: {', '.join(DEFAULT_POOLINGS)} (all of them by default), "
         f"or parametrised {', '.join(POOLING_FORMS)}, e.g. gem-p2.5, rmac-l2, spoc-s0.5.")]
Size = Annotated[str, typer.Option(
    "--size", parser=size_policy, metavar="|".join(SIZE_FORMS),
    autocompletion=_complete(["original", "max:", "min:", "fixed:"]),
    help="Input size policy: original, max:N (longest side), min:N (shortest side), fixed:N "
         "or fixed:WxH.")]
Scales = Annotated[FloatList, typer.Option(
    "--scales", parser=number_list(0.0), metavar="S,...",
    help="Comma-separated input scales > 0, e.g. 2 (Ng's scale 2) or 1,0.707 (mean of "
         "L2-normalised per-scale vectors).")]
BatchSize = Annotated[int, typer.Option("--batch-size", parser=integer(1), metavar="N",
                                        help="At most N images per forward pass, >= 1.")]
BatchPixels = Annotated[int, typer.Option(
    "--batch-pixels", parser=integer(0), metavar="P",
    help="Pixel budget of one forward (many small images, few large ones); 0: 2^18 on a CPU, "
         "2^24 on CUDA.")]
Buckets = Annotated[int, typer.Option(
    "--buckets", parser=integer(0), metavar="N",
    help="Pad images to multiples of N px so mixed sizes share a forward (each image pools "
         "only its own cells; vectors differ, cosine ~0.95, so N is in the extractor's name); "
         "0: only equal sizes share a forward.")]
DecoderOpt = Annotated[Decoder, typer.Option(
    "--decode", case_sensitive=False,
    help="cpu (Pillow in --workers threads) or gpu (JPEGs decoded on the CUDA device).")]
ForwardThreads = Annotated[int, typer.Option(
    "--forward-threads", parser=integer(0), metavar="N",
    help="Forwards computed at once, 0: automatic (two on a CPU with 2+ cores, each on half "
         "of them; one on CUDA).")]
TorchThreads = Annotated[int, typer.Option(
    "--torch-threads", parser=integer(0), metavar="N",
    help="Intra-op threads per forward, 0: the cores divided by --forward-threads.")]
KeepFreedMemory = Annotated[bool, typer.Option(
    "--keep-freed-memory/--no-keep-freed-memory",
    help="Let the allocator keep freed memory for the next batch (faster on a CPU; "
         "resident memory stays at its peak).")]
Workers = Annotated[int, typer.Option("--workers", parser=integer(0), metavar="N",
                                      help="Decoding threads, >= 0 (0: decode in the main thread).")]
PrecisionOpt = Annotated[Precision, typer.Option(
    "--precision", case_sensitive=False,
    help="fp32, or fp16/bf16 autocast on CUDA (pooling stays fp32).")]
MaxPixels = Annotated[int, typer.Option(
    "--max-pixels", parser=integer(1), metavar="N",
    help="Refuse images with more pixels, >= 1 (decompression bombs).")]
CommitSeconds = Annotated[float, typer.Option(
    "--commit-seconds", parser=number(0.0), metavar="S",
    help="How often finished rows are committed to the store (seconds, >= 0).")]
KeepLocal = Annotated[List[NameList], typer.Option(
    "--keep-local", parser=local_specs, metavar="LAYER[:MASK]",
    help=f"Also keep the local conv features of LAYER (float16) for codebook methods, all "
         f"cells or those of a mask: {', '.join(MASKS)} (Hoang sec.3.2). Repeatable.")]
VerifyFeatures = Annotated[Optional[str], typer.Option(
    "--verify-features", metavar="sift|none",
    help="Local features kept for --rerank verify: sift (RootSIFT keypoints, OpenCV; at most "
         "480 per image, 62 KiB) or none. Default: sift for a new extractor; an existing one "
         "keeps what it has, and gains them (without another forward) when sift is given.")]

# fit codebook / encode
LocalKey = Annotated[str, typer.Option(
    "--local", metavar="EXTRACTOR/LAYER[:MASK]",
    help="Local features kept by ingest --keep-local (a unique suffix such as block6:max is "
         "enough).")]
MethodOpt = Annotated[Optional[Method], typer.Option(
    "--method", "-m", case_sensitive=False,
    help="vlad (Ng sec.3.3), temb (triangulation embedding, Hoang sec.4) or fv (Fisher vector); "
         "default: the preset's, else temb.")]
PresetOpt = Annotated[Optional[Preset], typer.Option(
    "--preset", case_sensitive=False,
    help="Paper settings by name (default: ng for vlad, hoang-1024 for temb, improved-fv "
         "for fv).")]
CodebookK = Annotated[Optional[int], typer.Option(
    "--k", parser=integer(1), metavar="N", help="Codebook size, >= 1 (overrides the preset).")]
PcaD = Annotated[Optional[int], typer.Option(
    "--pca-d", parser=integer(0), metavar="N",
    help="Local PCA dims before the codebook, >= 0 (0: none; overrides the preset).")]
CodebookPower = Annotated[Optional[float], typer.Option(
    "--power", parser=number(0.0, above=True), metavar="A",
    help="Power-law alpha > 0 after aggregation (default 0.5 for temb/fv, none for vlad).")]
Drop = Annotated[Optional[int], typer.Option(
    "--drop", parser=integer(0), metavar="N",
    help="Rotated components dropped, >= 0 (default 128 for temb).")]
CodebookDims = Annotated[Optional[int], typer.Option(
    "--dims", parser=integer(1), metavar="N",
    help="Rotated components kept after the drop, >= 1 (default: 128 for ng, all for Hoang's).")]
MaxFeatures = Annotated[int, typer.Option(
    "--max-features", parser=integer(1), metavar="N",
    help="Local features sampled (uniformly, seeded) for the fit, >= 1.")]
AggregateOpt = Annotated[Aggregate, typer.Option(
    "--aggregate", "-a", case_sensitive=False,
    help="sum, or democratic (Jegou & Zisserman 2014; Hoang sec.4.3).")]
EncodePower = Annotated[Optional[str], typer.Option(
    "--power", parser=encode_power, metavar="A|none",
    help="Power-law alpha > 0, or none (default: the codebook's).")]

# index / query
IndexName = Annotated[Optional[str], typer.Option(
    "--name", parser=index_name, metavar="NAME",
    help="Index name: letters, digits, '.', '_', '+', '-' (default from descriptor and model).")]
Trees = Annotated[int, typer.Option("--trees", parser=integer(1), metavar="N",
                                    help="Annoy trees, >= 1 (more: better recall).")]
TopK = Annotated[int, typer.Option("-k", "--top", parser=integer(1), metavar="K",
                                   help="Results per query, >= 1.")]
QueryExpansion = Annotated[str, typer.Option(
    "--qe", parser=qe_spec, metavar="M|alpha:A[,M]",
    help="Query expansion: M = average QE with the top M results (0: none); alpha:A[,M] = "
         "alpha-QE, neighbours weighted by similarity^A (Radenovic et al.).")]
QueryExpansions = Annotated[Optional[List[str]], typer.Option(
    "--qe", parser=qe_spec, metavar="M|alpha:A[,M]",
    help="Query expansion, each its own row beside L2 (repeatable): M = average QE with the "
         "top M; alpha:A[,M] = alpha-QE.")]
Rerank = Annotated[Optional[str], typer.Option(
    "--rerank", parser=rerank_spec, metavar="STAGE[:k=v,..][,STAGE..]",
    help="Re-rank: verify (the top k checked geometrically with the stored SIFT keypoints; "
         "verified images first), or with the store's kNN graph (imgdb fit graph) diffusion "
         "(Iscen et al.) or kreciprocal (Zhong et al.); options after ':' as KEY=VALUE; stages "
         "in a chain are comma-separated (verify,diffusion). Diffusion and kreciprocal step "
         "aside on collections without neighbourhoods (guard=0 forces them).")]
Reranks = Annotated[Optional[List[str]], typer.Option(
    "--rerank", parser=rerank_spec, metavar="STAGE[:k=v,..][,STAGE..]",
    help="Re-ranking, each its own row beside L2 (repeatable): verify[:k=K,inliers=N,ratio=R,"
         "px=P], diffusion[:k=K,alpha=A,gamma=G,iter=N] or kreciprocal[:k1=K1,k2=K2,lambda=L], "
         "or a comma-separated chain of them.")]
GraphVersion = Annotated[Optional[str], typer.Option(
    "--graph", parser=graph_version, metavar="vN|latest",
    help="Graph model version for --rerank (default: the newest current one; see imgdb "
         "models).")]
SearchK = Annotated[Optional[int], typer.Option(
    "--search-k", parser=integer(1), metavar="N",
    help="Annoy candidates to inspect, >= 1 (default max(10000, k x trees)); more: better "
         "recall, slower.")]
Regions = Annotated[bool, typer.Option(
    "--regions", help="Also search with crops of each query image (2x2 at 0.6 and 3x3 at 0.4 "
                      "of its sides; every result scores its best crop): finds an object that "
                      "fills only part of a photo, at 13 forwards more per query.")]
Turns = Annotated[bool, typer.Option(
    "--turns", help="Also search with each query turned by 90, 180 and 270 degrees (a photo "
                    "held sideways whose orientation was lost): 3 forwards more per query.")]

Bbox = Annotated[Optional[Box], typer.Option(
    "--bbox", parser=bbox, metavar="x1,y1,x2,y2",
    help="Crop the query images: x1,y1,x2,y2 pixels of the upright original.")]

# eval
EvalDims = Annotated[Optional[IntList], typer.Option(
    "--dims", parser=integer_list(1), metavar="N,...",
    help="PCA dimensions to sweep, each >= 1, e.g. 512,256,128 (needs --pca-on-test or "
         "--pca-from).")]
ProtocolOpt = Annotated[Protocol, typer.Option(
    "--protocol", case_sensitive=False, help="Ground-truth protocol (auto: detected).")]
QueryModeOpt = Annotated[QueryMode, typer.Option(
    "--query", case_sensitive=False,
    help="full, crop-image or crop-features (the ground truth's query boxes).")]
GroupRegex = Annotated[Optional[str], typer.Option(
    "--group-regex", parser=regex, metavar="RE",
    help="Groups from file names, e.g. 'obj(\\d+)__' (every image queries its group).")]
