"""Sharded Annoy indexes: N files built in parallel processes, each registered with its digest,
one logical index for `index ls`, queries merged from every shard (recall against numpy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from helpers import run_cli
from imgdb.retrieval.index import AnnoySearcher, build_index, index_files
from imgdb.store import open_read
from synth import make_store


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, dim))
    return (centres[rng.integers(0, 40, n)] + 0.5 * rng.normal(size=(n, dim))).astype(np.float32)


def test_sharded_index_build_query_and_registry(tmp_path: Path) -> None:
    db = tmp_path / "s.h5"
    n, dim = 6000, 24
    names = [f"/p/{i:05d}.jpg" for i in range(n)]
    make_store(db, names, dim=dim)
    vecs = clustered(n, dim)
    from imgdb.store import StoreWriter

    with StoreWriter(db) as w:  # clustered vectors instead of the random ones
        w.write_vectors("syn-none-orig", list(range(n)), {("l", "p"): vecs})

    out = json.loads(run_cli("index", "build", "--db", str(db), "--descriptor", "l/p",
                             "--shards", "3", "--trees", "10", "--json").stdout)
    assert out["shards"] == 3 and out["items"] == n and sum(out["shard_items"]) == n
    assert [abs(i - n / 3) <= 1 for i in out["shard_items"]] == [True] * 3
    files = [db.with_name(f) for f in out["shard_files"]]
    assert all(f.exists() and f.stat().st_size == b for f, b in zip(files, out["shard_bytes"]))
    assert len(set(out["shard_hashes"])) == 3

    listing = run_cli("index", "ls", "--db", str(db)).stdout.strip().splitlines()
    assert len(listing) == 1 and "shards=3" in listing[0] and listing[0].endswith("current")

    # recall@10 of the merged shards against exact cosine top-10 computed here
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    queries = clustered(40, dim, seed=7)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = np.argsort(-(queries @ unit.T), axis=1)[:, :10]
    with open_read(db) as view:
        entry = view.index(out["name"])
        assert [f.file for f in index_files(entry.attrs)] == [f.name for f in files]
        rows = view.index_rows(out["name"])
        assert sorted(rows.tolist()) == list(range(n))
        hits = AnnoySearcher(view, db, out["name"])(queries, 10)
    recall = np.mean([len({r for r, _ in h} & set(t.tolist())) / 10 for h, t in zip(hits, truth)])
    assert recall >= 0.99
    for h in hits:  # merged best first
        assert [s for _, s in h] == sorted((s for _, s in h), reverse=True) and len(h) == 10

    q = run_cli("query", "--id", "17", "--db", str(db), "-k", "5", "--json")
    first = json.loads(q.stdout)["queries"][0]["results"][0]
    assert first["id"] == 17 and abs(first["score"] - 1.0) < 1e-5

    # a damaged shard is found by index ls, refused by query (one line), reported by check
    raw = bytearray(files[1].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    files[1].write_bytes(bytes(raw))
    assert "DAMAGED" in run_cli("index", "ls", "--db", str(db)).stdout
    proc = run_cli("query", "--id", "3", "--db", str(db), check=False)
    assert proc.returncode == 1 and "damaged" in proc.stderr and proc.stderr.count("\n") == 1
    assert "--shards 3" in proc.stderr  # the rebuild command keeps the sharding
    proc = run_cli("check", "--db", str(db), check=False)
    assert proc.returncode == 1 and files[1].name in proc.stdout

    # rebuilt unsharded: the shard files go; removed: every file goes
    build_index(db, "l/p", "none", out["name"], trees=5)
    assert not any(f.exists() for f in files)
    run_cli("index", "rm", out["name"], "--db", str(db))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]
