"""The CLI contract: every user mistake is one line on stderr with exit 2 (bad usage) or 1
(cannot be done), never a traceback or an "unexpected" error; fixed choices are listed by
--help; text output escapes file names and JSON stays valid for any name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import DESCRIPTOR, PHOTOS, STORE_ARGS

# --------------------------------------------------------------------------------------------
# misuse: (id, arguments, exit code, a word the message must hold). Placeholders: {db} the
# session store, {photos} its folder, {image} one photo, {dir} an empty folder, {file} a text
# file, {empty} a store file with only its format attribute, {hdf5} an HDF5 file that is not a
# store, {new} a store path that does not exist yet.

INGEST = ("ingest", "{photos}", "--db", "{new}", "--weights", "none")
FIT_CB = ("fit", "codebook", "--db", "{db}", "--local", "head")
QUERY = ("query", "--db", "{db}", "--id", "0", "--descriptor", DESCRIPTOR, "--exact")
EVAL = ("eval", "--db", "{db}", "--group-regex", r"^([a-z]+)")

MISUSE = [
    # ingest: choices and numbers, refused while parsing
    ("size-word", (*INGEST, "--size", "max:abc"), 2, "size policy"),
    ("size-zero", (*INGEST, "--size", "fixed:0"), 2, "size policy"),
    ("size-max-wxh", (*INGEST, "--size", "max:10x20"), 2, "size policy"),
    ("pooling-unknown", (*INGEST, "--pooling", "foo"), 2, "unknown pooling"),
    ("pooling-negative-p", (*INGEST, "--pooling", "gem-p-1"), 2, "unknown pooling"),
    ("pooling-fractional-l", (*INGEST, "--pooling", "sum,rmac-l2.5"), 2, "rmac-l2.5"),
    ("pooling-empty-item", (*INGEST, "--pooling", "sum,,mac"), 2, "no empty item"),
    ("backbone", (*INGEST, "--backbone", "alexnet"), 2, "efficientnet_lite0"),
    ("precision", (*INGEST, "--precision", "fp8"), 2, "fp16"),
    ("device", (*INGEST, "--device", "tpu"), 2, "cuda[:N]"),
    ("device-index", (*INGEST, "--device", "cuda:x"), 2, "cuda[:N]"),
    ("weights-missing", ("ingest", "{photos}", "--db", "{new}", "--weights", "{dir}/w.pt"), 2,
     "state_dict"),
    ("weights-dir", ("ingest", "{photos}", "--db", "{new}", "--weights", "{dir}"), 2, "directory"),
    ("max-pixels-negative", (*INGEST, "--max-pixels", "-1"), 2, "minimum 1"),
    ("max-pixels-zero", (*INGEST, "--max-pixels", "0"), 2, "minimum 1"),
    ("batch-size", (*INGEST, "--batch-size", "0"), 2, "minimum 1"),
    ("workers", (*INGEST, "--workers", "-1"), 2, "minimum 0"),
    ("batch-pixels", (*INGEST, "--batch-pixels", "-5"), 2, "minimum 0"),
    ("buckets-negative", (*INGEST, "--buckets", "-8"), 2, "minimum 0"),
    ("buckets-keep-local", (*INGEST, "--buckets", "32", "--keep-local", "conv5_3"), 2,
     "--keep-local"),
    ("decode", (*INGEST, "--decode", "nvjpeg"), 2, "'cpu', 'gpu'"),
    ("decode-gpu-no-cuda", (*INGEST, "--decode", "gpu", "--device", "cpu"), 1, "--decode gpu"),
    ("forward-threads", (*INGEST, "--forward-threads", "-1"), 2, "minimum 0"),
    ("torch-threads", (*INGEST, "--torch-threads", "two"), 2, "--torch-threads"),
    ("ray-local-only", (*INGEST, "--engine", "ray", "--buckets", "16"), 2, "--buckets"),
    ("commit-seconds", (*INGEST, "--commit-seconds", "-1"), 2, ">= 0"),
    ("commit-seconds-nan", (*INGEST, "--commit-seconds", "nan"), 2, "finite"),
    ("scales-zero", (*INGEST, "--scales", "0"), 2, "> 0"),
    ("scales-negative", (*INGEST, "--scales", "1,-1"), 2, "> 0"),
    ("scales-inf", (*INGEST, "--scales", "inf"), 2, "finite"),
    ("scales-word", (*INGEST, "--scales", "1,abc"), 2, "not a number"),
    ("keep-local-mask", (*INGEST, "--keep-local", "head:median"), 2, "MASK"),
    ("keep-local-layer", (*INGEST, "--keep-local", ":max"), 2, "LAYER"),
    ("layers-unknown", (*INGEST, "--backbone", "efficientnet_lite0", "--layers", "conv9_9"), 2,
     "conv9_9"),
    ("db-directory", ("ingest", "{photos}", "--db", "{dir}"), 2, "directory"),
    ("db-empty", ("info", "--db", ""), 2, "empty"),
    ("ingest-no-path", ("ingest", "--db", "{new}"), 2, "PATH"),
    ("ingest-no-db", ("ingest", "{photos}"), 2, "--db"),
    ("ingest-missing-path", ("ingest", "{dir}/nothing", "--db", "{new}", "--weights", "none"), 1,
     "does not exist"),
    # the store
    ("db-proc", ("info", "--db", "/proc/x.h5"), 1, "does not exist"),
    ("db-missing", ("index", "ls", "--db", "{dir}/none.h5"), 1, "imgdb ingest"),
    ("db-not-a-store", ("info", "--db", "{image}"), 1, "not an imgdb store"),
    ("db-text-file", ("models", "--db", "{file}"), 1, "not an imgdb store"),
    ("db-only-format-attribute", ("info", "--db", "{empty}"), 1, "{empty}"),
    ("db-foreign-hdf5", ("info", "--db", "{hdf5}"), 1, "{hdf5}"),
    ("info-failures", ("info", "--db", "{db}", "--failures", "-2"), 2, "minimum -1"),
    ("models-remove-unknown", ("models", "--db", "{db}", "--remove", "pca/x/v1"), 1, "no model"),
    # fit pca
    ("pca-power-negative", ("fit", "pca", "--db", "{db}", "-d", DESCRIPTOR, "--power", "-1"), 2,
     "> 0"),
    ("pca-power-nan", ("fit", "pca", "--db", "{db}", "-d", DESCRIPTOR, "--power", "nan"), 2,
     "finite"),
    ("pca-power-inf", ("fit", "pca", "--db", "{db}", "-d", DESCRIPTOR, "--power", "inf"), 2,
     "finite"),
    ("pca-power-zero", ("fit", "pca", "--db", "{db}", "-d", DESCRIPTOR, "--power", "0"), 2, "> 0"),
    ("pca-dims-zero", ("fit", "pca", "--db", "{db}", "-d", DESCRIPTOR, "--dims", "0"), 2,
     "minimum 1"),
    ("pca-dims-too-many", ("fit", "pca", "--db", "{db}", "-d", DESCRIPTOR, "--dims", "5000"), 1,
     "--dims"),
    ("pca-from-directory", ("fit", "pca", "--db", "{db}", "-d", DESCRIPTOR, "--from", "{dir}"), 2,
     "directory"),
    ("pca-unknown-descriptor", ("fit", "pca", "--db", "{db}", "-d", "head/nope"), 1, "head/nope"),
    ("fit-unknown-kind", ("fit", "lda", "--db", "{db}"), 2, "lda"),
    # fit codebook / encode
    ("codebook-method", (*FIT_CB, "--method", "bow"), 2, "vlad"),
    ("codebook-preset", (*FIT_CB, "--preset", "hoang-3"), 2, "hoang-512"),
    ("codebook-preset-method", (*FIT_CB, "--method", "vlad", "--preset", "hoang-512"), 2,
     "temb setting"),
    ("codebook-k", (*FIT_CB, "--k", "0"), 2, "minimum 1"),
    ("codebook-max-features", (*FIT_CB, "--max-features", "0"), 2, "minimum 1"),
    ("codebook-pca-d", (*FIT_CB, "--pca-d", "-1"), 2, "minimum 0"),
    ("codebook-seed", (*FIT_CB, "--seed", "-1"), 2, "minimum 0"),
    ("codebook-drop", (*FIT_CB, "--drop", "-1"), 2, "minimum 0"),
    ("codebook-power", (*FIT_CB, "--power", "-0.5"), 2, "> 0"),
    ("codebook-no-local", ("fit", "codebook", "--db", "{db}", "--local", "block5"), 1, "block5"),
    ("encode-power-negative", ("encode", "--db", "{db}", "--power", "-2"), 2, "> 0"),
    ("encode-power-nan", ("encode", "--db", "{db}", "--power", "nan"), 2, "finite"),
    ("encode-aggregate", ("encode", "--db", "{db}", "--aggregate", "median"), 2, "democratic"),
    ("encode-no-codebook", ("encode", "--db", "{db}"), 1, "codebook"),
    # index
    ("index-name-slash", ("index", "build", "--db", "{db}", "-d", DESCRIPTOR, "--name", "a/b"), 2,
     "not allowed"),
    ("index-name-dot", ("index", "build", "--db", "{db}", "-d", DESCRIPTOR, "--name", ".x"), 2,
     "not allowed"),
    ("index-trees", ("index", "build", "--db", "{db}", "-d", DESCRIPTOR, "--trees", "0"), 2,
     "minimum 1"),
    ("index-pca-version", ("index", "build", "--db", "{db}", "-d", DESCRIPTOR, "--pca", "v-1"), 2,
     "model version"),
    ("index-pca-missing", ("index", "build", "--db", "{db}", "-d", DESCRIPTOR, "--pca", "v9"), 1,
     "pca"),
    ("index-rm-unknown", ("index", "rm", "nope", "--db", "{db}"), 1, "nope"),
    # query
    ("query-nothing", ("query", "--db", "{db}"), 2, "--id"),
    ("query-directory", ("query", "{photos}", "--db", "{db}"), 2, "is a directory"),
    ("query-missing-image", ("query", "{dir}/none.png", "--db", "{db}", "-d", DESCRIPTOR,
                             "--exact"), 1, "does not exist"),
    ("query-k", (*QUERY, "-k", "0"), 2, "minimum 1"),
    ("query-qe", (*QUERY, "--qe", "-1"), 2, "alpha:A[,M]"),
    ("query-search-k", ("query", "--db", "{db}", "--id", "0", "--search-k", "0"), 2, "minimum 1"),
    ("query-id-negative", ("query", "--db", "{db}", "--id", "-1"), 2, "minimum 0"),
    ("query-id-unknown", (*QUERY[:3], "--id", "9999", *QUERY[5:]), 1, "9999"),
    ("query-bbox-three", ("query", "{image}", "--db", "{db}", "--bbox", "1,2,3"), 2, "x1,y1,x2,y2"),
    ("query-bbox-order", ("query", "{image}", "--db", "{db}", "--bbox", "10,10,5,20"), 2,
     "x2 > x1"),
    ("query-bbox-nan", ("query", "{image}", "--db", "{db}", "--bbox", "nan,0,1,1"), 2, "finite"),
    ("query-bbox-with-id", (*QUERY, "--bbox", "0,0,10,10"), 2, "--bbox"),
    ("query-html-directory", (*QUERY, "--html", "{dir}"), 2, "directory"),
    ("query-index-and-descriptor", ("query", "--db", "{db}", "--id", "0", "--index", "x",
                                    "-d", DESCRIPTOR), 2, "give one"),
    ("query-index-and-pca", ("query", "--db", "{db}", "--id", "0", "--index", "x", "--pca", "v1"),
     2, "--pca"),
    ("query-exact-search-k", (*QUERY, "--search-k", "5"), 2, "--search-k"),
    ("query-no-index", ("query", "--db", "{db}", "--id", "0"), 1, "index build"),
    ("query-pca-missing", (*QUERY, "--pca", "v7"), 1, "no pca model"),
    # eval
    ("eval-dims-negative", (*EVAL, "--pca-on-test", "--dims", "-5"), 2, "minimum 1"),
    ("eval-dims-zero", (*EVAL, "--pca-on-test", "--dims", "0"), 2, "minimum 1"),
    ("eval-dims-word", (*EVAL, "--pca-on-test", "--dims", "8,x"), 2, "integer"),
    ("eval-dims-without-pca", (*EVAL, "--dims", "16"), 2, "--pca-on-test"),
    ("eval-no-whiten-without-pca", (*EVAL, "--no-whiten"), 2, "--pca-on-test"),
    ("eval-power", (*EVAL, "--power", "-1"), 2, "> 0"),
    ("eval-protocol", (*EVAL, "--protocol", "paris"), 2, "roxford"),
    ("eval-query-mode", (*EVAL, "--query", "crop"), 2, "crop-image"),
    ("eval-json-csv", (*EVAL, "--json", "--csv"), 2, "--csv"),
    ("eval-gt-and-regex", (*EVAL, "--gt", "{file}"), 2, "--gt"),
    ("eval-regex-invalid", ("eval", "--db", "{db}", "--group-regex", "(a"), 2,
     "regular expression"),
    ("eval-regex-protocol", (*EVAL, "--protocol", "oxford"), 2, "oxford"),
    ("eval-no-ground-truth", ("eval", "--db", "{db}"), 2, "--gt"),
    ("eval-ukbench-gt", ("eval", "--db", "{db}", "--protocol", "ukbench", "--gt", "{file}"), 2,
     "ukbench"),
    ("eval-gt-missing", ("eval", "--db", "{db}", "--gt", "{dir}/gt.csv"), 2, "does not exist"),
    ("eval-queries-missing", (*EVAL, "--queries", "{dir}/q"), 2, "does not exist"),
    ("eval-queries-and-db", (*EVAL, "--queries", "{dir}", "--queries-db", "{db}"), 2,
     "give one"),
    ("eval-report-file", (*EVAL, "--report", "{file}"), 2, "not a folder"),
    ("eval-crop-without-boxes", (*EVAL, "--query", "crop-image"), 2, "boxes"),
    ("eval-qe", (*EVAL, "--qe", "-2"), 2, "alpha:A[,M]"),
    # re-ranking
    ("qe-alpha-word", (*QUERY, "--qe", "alpha:x"), 2, "must be a number"),
    ("qe-alpha-m-zero", (*QUERY, "--qe", "alpha:3,0"), 2, "between 1"),
    ("qe-too-many", (*QUERY, "--qe", "20000"), 2, "at most 10000"),
    ("rerank-unknown", (*QUERY, "--rerank", "pagerank"), 2, "diffusion"),
    ("rerank-k-zero", (*QUERY, "--rerank", "diffusion:k=0"), 2, "k=0"),
    ("rerank-alpha-one", (*QUERY, "--rerank", "diffusion:alpha=1"), 2, "alpha=1"),
    ("rerank-unknown-key", (*QUERY, "--rerank", "diffusion:beta=2"), 2, "unknown parameter"),
    ("rerank-no-value", (*QUERY, "--rerank", "kreciprocal:k1"), 2, "KEY=VALUE"),
    ("rerank-lambda", (*QUERY, "--rerank", "kreciprocal:lambda=2"), 2, "lambda=2"),
    ("rerank-twice-key", (*QUERY, "--rerank", "diffusion:k=5,k=6"), 2, "twice"),
    ("rerank-and-qe", (*QUERY, "--rerank", "diffusion", "--qe", "3"), 2, "give one"),
    ("graph-without-rerank", (*QUERY, "--graph", "v1"), 2, "--rerank"),
    ("graph-none", (*QUERY, "--rerank", "diffusion", "--graph", "none"), 2, "needs a graph"),
    ("rerank-no-graph", (*QUERY, "--rerank", "diffusion"), 1, "fit graph"),
    ("eval-rerank-twice", (*EVAL, "--rerank", "diffusion", "--rerank", "diffusion"), 1,
     "twice"),
    ("fit-graph-k-zero", ("fit", "graph", "--db", "{db}", "-d", DESCRIPTOR, "--k", "0"), 2,
     "minimum 1"),
    ("fit-graph-gamma", ("fit", "graph", "--db", "{db}", "-d", DESCRIPTOR, "--gamma", "0"), 2,
     "> 0"),
    ("fit-graph-method", ("fit", "graph", "--db", "{db}", "-d", DESCRIPTOR, "--method", "lsh"), 2,
     "exact"),
    ("fit-graph-search-k-exact", ("fit", "graph", "--db", "{db}", "-d", DESCRIPTOR, "--method",
                                  "exact", "--search-k", "100"), 2, "--search-k"),
    ("fit-graph-too-few", ("fit", "graph", "--db", "{db}", "-d", DESCRIPTOR, "--k", "500"), 1,
     "needs more than 500"),
    ("eval-unknown-descriptor", (*EVAL, "-d", "head/nope"), 1, "head/nope"),
    # the command line itself
    ("unknown-command", ("frobnicate",), 2, "frobnicate"),
    ("unknown-option", ("info", "--db", "{db}", "--frob"), 2, "--frob"),
    ("option-without-value", ("info", "--db"), 2, "--db"),
]


@pytest.fixture(scope="module")
def places(photo_store, tmp_path_factory) -> dict[str, str]:
    """Values for the placeholders of MISUSE."""
    db, photos, groups = photo_store
    root = tmp_path_factory.mktemp("misuse")
    (root / "dir").mkdir()
    (root / "notes.txt").write_text("not a store\n")
    with h5py.File(root / "empty.h5", "w") as fh:
        fh.attrs["format"] = "imgdb-store"
    h5py.File(root / "other.h5", "w").close()
    return {"db": str(db), "photos": str(photos), "image": str(groups["coffee"][0]),
            "dir": str(root / "dir"), "file": str(root / "notes.txt"),
            "empty": str(root / "empty.h5"), "hdf5": str(root / "other.h5"),
            "new": str(root / "new.h5")}


@pytest.mark.parametrize("args, code, word", [case[1:] for case in MISUSE],
                         ids=[case[0] for case in MISUSE])
def test_misuse_is_one_line_and_the_right_exit_code(cli, places, args, code, word) -> None:
    before = set(os.listdir(places["dir"]))
    result = cli(*(a.format(**places) for a in args))
    lines = result.stderr.splitlines()
    assert result.code == code, (result.code, result.stderr)
    assert len(lines) == 1 and result.stderr.endswith("\n"), result.stderr
    assert lines[0].startswith("error: ") and word.format(**places) in lines[0], lines[0]
    assert "unexpected" not in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert set(os.listdir(places["dir"])) == before  # nothing written where nothing was asked
    assert not os.path.exists(places["new"])  # no store created by a refused ingest


def test_at_least_forty_misuse_cases() -> None:
    assert len(MISUSE) >= 40 and len({case[0] for case in MISUSE}) == len(MISUSE)


# --------------------------------------------------------------------------------------------
# choices


def test_help_lists_the_choices(cli) -> None:
    from imgdb.cli.choices import DEFAULT_POOLINGS, Backbone, Preset, Protocol

    ingest = cli("ingest", "--help")
    assert ingest.code == 0
    text = " ".join(ingest.stdout.split())
    for name in [b.value for b in Backbone] + list(DEFAULT_POOLINGS):
        assert name in text, name
    for form in ("original", "max:N", "min:N", "fixed:N", "fixed:WxH", "gem-p<float>",
                 "rmac-l<int>", "spoc-s<float>", "fp16", "cuda[:N]", "imagenet|none|FILE"):
        assert form in text, form
    codebook = " ".join(cli("fit", "codebook", "--help").stdout.split())
    assert all(p.value in codebook for p in Preset) and "democratic" not in codebook
    assert "democratic" in cli("encode", "--help").stdout
    evaluation = " ".join(cli("eval", "--help").stdout.split())
    assert all(p.value in evaluation for p in Protocol) and "crop-features" in evaluation


def test_choices_equal_their_registries() -> None:
    from imgdb.cli import choices
    from imgdb.codebooks.encoder import AGGREGATES, METHODS
    from imgdb.codebooks.fit import PRESETS
    from imgdb.evaluation.groundtruth import PROTOCOLS
    from imgdb.features import pooling
    from imgdb.features.backbones import BACKBONES
    from imgdb.features.localfeat import MASKS

    assert choices.values(choices.Backbone) == list(BACKBONES)
    assert choices.DEFAULT_POOLINGS == pooling.DEFAULT_POOLINGS
    forms = [f"{p.family}-{p.letter}<{'int' if p.integer else 'float'}>"
             for p in pooling.REGISTRY.values() if p.letter]
    assert sorted(choices.POOLING_FORMS) == sorted(forms)
    # every row of the pooling table has its torch form, and its numpy form (the cold query)
    from imgdb.features import pooling_np, poolings

    assert {s.family for s in poolings.TABLE} <= set(pooling.REGISTRY)
    assert {s.family for s in poolings.TABLE} == set(pooling_np.NUMPY)
    assert choices.MASKS == MASKS
    assert choices.values(choices.Preset) == list(PRESETS)
    assert choices.values(choices.Method) == list(METHODS)
    assert choices.values(choices.Aggregate) == list(AGGREGATES)
    assert choices.values(choices.Protocol) == list(PROTOCOLS)


def test_bash_completion_lists_enum_choices() -> None:
    import subprocess
    import sys

    env = dict(os.environ, _IMGDB_COMPLETE="complete_bash",
               COMP_WORDS="imgdb ingest --backbone eff", COMP_CWORD="3")
    proc = subprocess.run([sys.executable, "-m", "imgdb"], env=env, capture_output=True, text=True)
    assert set(proc.stdout.split()) == {"efficientnet_lite0", "efficientnet_lite2"}
    env.update(COMP_WORDS="imgdb ingest --pooling sum,gem", COMP_CWORD="3")
    proc = subprocess.run([sys.executable, "-m", "imgdb"], env=env, capture_output=True, text=True)
    assert set(proc.stdout.split()) == {"sum,gem-p3", "sum,gem-p"}


def test_parsers_accept_every_documented_form() -> None:
    from imgdb.cli import options

    assert [options.size_policy(s) for s in ("ORIGINAL", "max:1024", "min:800", "fixed:586",
                                             "fixed:640x480")] == [
        "original", "max:1024", "min:800", "fixed:586", "fixed:640x480"]
    assert options.pooling_list("GEM-P3.0,rmac-l2,spoc-s0.5,sum,sum") == (
        "gem-p3", "rmac-l2", "spoc-s0.5", "sum")
    assert [options.device(d) for d in ("auto", "CPU", "cuda", "cuda:1")] == [
        "auto", "cpu", "cuda", "cuda:1"]
    assert options.number_list(0.0)("1,0.707") == (1.0, 0.707)
    assert options.integer_list(1)("512,256,128") == (512, 256, 128)
    assert options.bbox("0,1.5,10,20") == (0.0, 1.5, 10.0, 20.0)
    assert [options.model_version(v) for v in ("v2", "2", "latest", "none", "raw")] == [
        "v2", "v2", "latest", "none", "none"]
    assert options.encode_power("none") == "none" and options.encode_power("0.5") == 0.5
    assert options.local_specs("conv5_3,conv5_3:max") == ("conv5_3", "conv5_3:max")


# --------------------------------------------------------------------------------------------
# output: one object, two forms; names escaped in text, JSON valid for any name


def test_text_and_json_come_from_the_same_result(cli, photo_store) -> None:
    db, _, groups = photo_store
    args = ("query", groups["chelsea"][2], "--db", db, "-d", DESCRIPTOR, "--exact", "-k", "3")
    text = cli(*args)
    data = cli(*args, "--json").json()
    assert text.code == 0 and text.stderr == ""
    hits = data["queries"][0]["results"]
    rows = [line.split(None, 3) for line in text.stdout.splitlines()[1:]]
    assert [(int(r[0]), float(r[1]), int(r[2]), r[3]) for r in rows] == [
        (h["rank"], round(h["score"], 4), h["id"], h["path"]) for h in hits]
    # the stored mirror image is its own nearest neighbour; the original and the crop come next
    assert Path(hits[0]["path"]) == groups["chelsea"][2] and hits[0]["score"] == pytest.approx(1)
    assert {Path(h["path"]) for h in hits[1:]} == set(groups["chelsea"][:2])


NASTY = {
    "forged": "fake\n   2    0.9999       99  FORGED.png",
    "escape": "\x1b[31mred\x1b[0m.png",
    "return": "over\rwrite.png",
    "tab": "a\tb.png",
    "bidi": "gnp\u202e.exe.png",
}


@pytest.fixture(scope="module")
def nasty_store(tmp_path_factory, cli) -> tuple[Path, Path, dict[str, Path], str]:
    """A store of photos with hostile names (and a non-UTF-8 one), plus failed files with
    hostile names: (store, folder, {key: photo}, what ingest said on stderr)."""
    root = tmp_path_factory.mktemp("nasty")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(7)
    files = {}
    for key, name in [*NASTY.items(), ("plain", "plain.png"),
                      ("latin1", os.fsdecode(b"caf\xe9.png"))]:
        files[key] = photos / name
        Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(files[key])
    (photos / "broken\nline.jpg").write_bytes(b"not an image")
    (photos / "bell\x07.png").write_bytes(b"")
    db = root / "nasty.h5"
    result = cli("ingest", photos, "--db", db, "--backbone", "efficientnet_lite0", "--weights",
                 "none", "--size", "max:64", "--layers", "head", "--pooling", "mac",
                 "--workers", "0")
    assert result.code == 0, result.stderr
    return db, photos, files, result.stderr


def _printable(text: str) -> bool:
    return not any(ord(c) < 32 and c != "\n" or 0x7f <= ord(c) <= 0x9f
                   or 0xd800 <= ord(c) <= 0xdfff or c == "\u202e" for c in text)


def test_text_output_escapes_file_names(cli, nasty_store) -> None:
    db, photos, files, ingest_said = nasty_store
    n = len(files)
    result = cli("query", *files.values(), "--db", db, "-d", "head/mac", "--exact", "-k", str(n))
    assert result.code == 0 and _printable(result.stdout)
    lines = result.stdout.splitlines()
    assert len(lines) == n * (n + 1)  # a header and n results per query, no forged line
    assert sum("FORGED.png" in line for line in lines) == n + 1  # n rankings + its own header
    assert all(line.startswith("query ") or line.split()[0].isdigit() for line in lines)
    shown = {line.split(None, 3)[3] for line in lines if not line.startswith("query ")}
    assert {str(photos) + "/" + s for s in (
        "fake\\n   2    0.9999       99  FORGED.png", "\\x1b[31mred\\x1b[0m.png",
        "over\\rwrite.png", "a\\tb.png", "gnp\\u202e.exe.png", "caf\\xe9.png", "plain.png")} == shown
    # ingest's and info's failed-file lists: one line per file
    assert _printable(ingest_said)
    assert sorted(ingest_said.splitlines()) == [
        f"failed {photos}/bell\\x07.png: empty file (0 bytes)",
        f"failed {photos}/broken\\nline.jpg: not an image (cannot identify image file)"]
    info = cli("info", "--db", db)
    failed = info.stdout.split("failed files (2)\n")[1].splitlines()
    assert len(failed) == 2
    assert failed[0].startswith(f"  {photos}/bell\\x07.png: ")
    assert failed[1].startswith(f"  {photos}/broken\\nline.jpg: not an image")
    assert _printable(info.stdout)


def test_json_output_is_valid_for_any_name(cli, nasty_store) -> None:
    db, photos, files, _ = nasty_store
    result = cli("query", "--db", db, "-d", "head/mac", "--exact", "-k", "10", "--id", "0",
                 "--json")
    assert result.code == 0 and result.stdout.isascii()
    paths = {h["path"] for h in json.loads(result.stdout)["queries"][0]["results"]}
    assert paths == {str(p) for p in files.values()}
    latin1 = next(p for p in paths if p.endswith("caf\udce9.png"))
    assert os.fsencode(latin1).endswith(b"caf\xe9.png")  # the bytes come back exactly
    report = cli("info", "--db", db, "--json").json()
    assert sorted(Path(f["path"]).name for f in report["failed"]) == ["bell\x07.png",
                                                                     "broken\nline.jpg"]


def test_error_messages_escape_names(cli, tmp_path: Path, photo_store) -> None:
    result = cli("query", tmp_path / "\x1b[2Jgone\n.png", "--db", photo_store[0], "-d", DESCRIPTOR,
                 "--exact")
    assert result.code == 1 and result.stderr.count("\n") == 1
    assert "\\x1b[2Jgone\\n.png" in result.stderr and "\x1b" not in result.stderr


# --------------------------------------------------------------------------------------------
# files: a failed write leaves nothing behind


def test_query_html_failure_leaves_no_temp_file(cli, photo_store, tmp_path: Path) -> None:
    db = photo_store[0]
    blocker = tmp_path / "a file"
    blocker.write_text("x")
    result = cli("query", "--db", db, "--id", "0", "-d", DESCRIPTOR, "--exact", "--html",
                 blocker / "out.html")
    assert result.code == 1 and result.stderr.count("\n") == 1 and "gallery" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["a file"]
    ok = cli("query", "--db", db, "--id", "0", "-d", DESCRIPTOR, "--exact", "--html",
             tmp_path / "g" / "out.html")
    assert ok.code == 0 and os.listdir(tmp_path / "g") == ["out.html"]
    assert "gallery written to" in ok.stderr


# --------------------------------------------------------------------------------------------
# the CSV ground truth: RFC 4180 quoting, lists split on ';' only


def test_csv_ground_truth_with_spaces_and_quotes(cli, photo_store, tmp_path: Path) -> None:
    db, _, groups = photo_store
    gt = tmp_path / "gt.csv"
    rows = ["query,relevant,junk"]
    for name in PHOTOS:
        rows.append(f"{name},{name} crop;{name} mirrored")
    rows.append('"coffee","coffee crop; ""nothing""",')  # quoted fields, a quote, an empty junk
    gt.write_text("\n".join(rows) + "\n")
    data = cli("eval", "--db", db, "--gt", gt, "-d", DESCRIPTOR, "--json").json()
    assert data["protocol"] == "csv" and data["queries"] == len(PHOTOS)
    # every positive is found in the store except the one named '"nothing"'
    assert data["missing_positives"] == 1
    (cell,) = data["results"]
    assert cell["queries_evaluated"] == len(PHOTOS) and cell["mAP"] > 0.5


def test_load_csv_quoting_and_separators(tmp_path: Path) -> None:
    from imgdb.errors import UserError
    from imgdb.evaluation.groundtruth import load_csv

    path = tmp_path / "gt.csv"
    path.write_text('astronaut,astronaut crop;astronaut mirrored\n'
                    '"a, b.jpg","c ""q"".png; d e",j 1;j2\n')
    gt = load_csv(path)
    assert [(q.name, sorted(q.labels["positive"]), sorted(q.labels["junk"])) for q in gt.queries] \
        == [("astronaut", ["astronaut crop", "astronaut mirrored"], []),
            ("a, b", ['c "q"', "d e"], ["j 1", "j2"])]
    path.write_text('q,"unterminated\n')
    with pytest.raises(UserError, match="line 1: not valid CSV"):
        load_csv(path)
    path.write_bytes(b"caf\xe9,x\n")
    assert load_csv(path).queries[0].name == os.fsdecode(b"caf\xe9")  # matches the store's key


# --------------------------------------------------------------------------------------------
# the options that work


def test_preset_alone_chooses_its_method(cli, cli_json, store_copy: Path) -> None:
    """--preset ng means vlad without --method (it used to be refused as 'not temb'); a power
    that contradicts the learned rotation is a usage error."""
    model = cli_json("fit", "codebook", "--db", store_copy, "--local", "head", "--preset", "ng",
                     "--k", "4", "--dims", "4", "--quiet")
    assert (model["method"], model["preset"], model["k"], model["dims"]) == ("vlad", "ng", 4, 4)
    refused = cli("encode", "--db", store_copy, "--codebook", model["version"], "--power", "0.5")
    assert refused.code == 2 and refused.stderr.count("\n") == 1 and "power" in refused.stderr
    encoded = cli_json("encode", "--db", store_copy, "--codebook", model["version"], "--quiet")
    assert (encoded["encoded"], encoded["dims"]) == (18, 4)


def test_store_fixture_is_what_it_says(photo_store, cli_json) -> None:
    db, _, groups = photo_store
    report = cli_json("info", "--db", db)
    assert report["images"] == {"total": 18, "ok": 18, "failed": 0, "missing": 0, "lost": 0}
    assert {d["name"].split("/", 1)[1] for d in report["descriptors"]} == {"head/gem-p3",
                                                                          "head/mac"}
    assert STORE_ARGS[1] in report["extractors"][0]["name"]
