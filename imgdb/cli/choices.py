"""The command line's fixed choices, as Enums (so `--help` and shell completion list them).

The names are written here, not imported from their registries, because those registries
import torch and `imgdb --help` must start without it (the poolings come from their torch-free
table). tests/test_cli_contract.py checks that every list here equals its registry
(backbones.BACKBONES, localfeat.MASKS, codebooks PRESETS / METHODS / AGGREGATES,
groundtruth.PROTOCOLS): adding a backbone, preset... there makes that test name the line to add
here.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A fixed choice; its value is what the library takes."""

    def __str__(self) -> str:
        return self.value


class Backbone(Choice):
    """Networks of imgdb.features.backbones.BACKBONES."""

    vgg16 = "vgg16"
    vgg19 = "vgg19"
    resnet50 = "resnet50"
    resnet101 = "resnet101"
    googlenet = "googlenet"
    efficientnet_lite0 = "efficientnet_lite0"
    efficientnet_lite2 = "efficientnet_lite2"


class GraphMethod(Choice):
    """How `fit graph` finds each image's neighbours."""

    auto = "auto"
    exact = "exact"
    annoy = "annoy"


class Engine(Choice):
    """Who runs an ingest: this machine, or a Ray cluster (Ray Data)."""

    local = "local"
    ray = "ray"


class Decoder(Choice):
    """Where ingest decodes JPEGs: Pillow in CPU threads, or nvJPEG on the CUDA device."""

    cpu = "cpu"
    gpu = "gpu"


class Precision(Choice):
    """Forward-pass precision (fp16/bf16: autocast on CUDA; pooling stays fp32)."""

    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class Protocol(Choice):
    """Evaluation protocols of imgdb.evaluation.groundtruth.PROTOCOLS."""

    auto = "auto"
    oxford = "oxford"
    roxford = "roxford"
    holidays = "holidays"
    ukbench = "ukbench"
    csv = "csv"
    groups = "groups"


class QueryMode(Choice):
    """How eval uses a query's bounding box (Babenko sec.4)."""

    full = "full"
    crop_image = "crop-image"
    crop_features = "crop-features"


class Method(Choice):
    """Codebook methods of imgdb.codebooks.encoder.METHODS."""

    vlad = "vlad"
    temb = "temb"
    fv = "fv"


class Preset(Choice):
    """The papers' codebook settings of imgdb.codebooks.fit.PRESETS."""

    ng = "ng"
    hoang_512 = "hoang-512"
    hoang_1024 = "hoang-1024"
    hoang_2048 = "hoang-2048"
    hoang_4096 = "hoang-4096"
    hoang_8064 = "hoang-8064"
    hoang_vlad = "hoang-vlad"
    hoang_fv = "hoang-fv"
    improved_fv = "improved-fv"


class Aggregate(Choice):
    """Aggregations of imgdb.codebooks.encoder.AGGREGATES."""

    sum = "sum"
    democratic = "democratic"


#: What ingest stores when --pooling is not given, and the parametrised forms
#: (family-letter<value>): the pooling table itself, which is torch-free.
from ..features.poolings import DEFAULT_POOLINGS, POOLING_FORMS  # noqa: E402
#: Local-feature masks of imgdb.features.localfeat.MASKS (--keep-local LAYER:MASK).
MASKS: tuple[str, ...] = ("max", "sum", "sift")
#: --size forms (imgdb.features.images.SizePolicy).
SIZE_FORMS: tuple[str, ...] = ("original", "max:N", "min:N", "fixed:N", "fixed:WxH")
#: --device forms.
DEVICE_FORMS: tuple[str, ...] = ("auto", "cpu", "cuda", "cuda:N")


def values(choice: type[Choice]) -> list[str]:
    """The values of a choice Enum, in order."""
    return [c.value for c in choice]
