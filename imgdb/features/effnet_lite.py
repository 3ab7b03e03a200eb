"""EfficientNet-Lite for inference, built from its weights alone, BatchNorm folded.

timm's `tf_efficientnet_lite0/2` define these networks (and stay the reference the tests compare
with), but importing timm costs seconds (it registers its whole model zoo) and its unfused
BatchNorm layers cost a large share of a CPU forward. The architecture is fully determined by
the weights (channels and kernel sizes by the tensor shapes, stages by the projection widths),
so this module builds the same function from a timm-named state dict directly:

- stem: 3x3 conv, stride 2, TF "SAME" padding, BN, ReLU6;
- block1: depthwise-separable (3x3 depthwise, BN, ReLU6, 1x1 projection, BN);
- block2..block7: inverted residuals (1x1 expansion, BN, ReLU6, kxk depthwise, BN, ReLU6,
  1x1 projection, BN; identity shortcut when stride 1 and widths match); the first block of
  stages 2, 3, 4 and 6 has stride 2 (EfficientNet's strides 1,2,2,2,1,2,1);
- head: 1x1 conv to 1280, BN, ReLU6.

Every BatchNorm (eps 1e-3, TensorFlow's) is folded into the convolution before it:
w' = w * g / sqrt(v + eps), b' = b0 - m * g / sqrt(v + eps). Activations and residual sums
work in place on each convolution's fresh output (never on a block's input, which may be a
tap handed out): the same values, 8% less time per forward on a CPU.

On a CPU each convolution runs as one oneDNN primitive with its ReLU6 or residual sum fused in
(`onednn`), and TF SAME padding as a symmetric pad with the kernel grown by one zero row/column
on each even side (the same sums, no padded copy of the input): 1.05-1.1x per forward.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from . import onednn

BN_EPS = 1e-3  # the TensorFlow-ported EfficientNets' BatchNorm epsilon
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
LAYERS = ("stem", "block1", "block2", "block3", "block4", "block5", "block6", "block7", "head")


class FoldedConv(nn.Conv2d):
    """A convolution with its BatchNorm folded in; stride-2 layers pad like TensorFlow's SAME
    (asymmetric, computed from the input size), others pad k // 2 on every side."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, stride: int, groups: int) -> None:
        out_c, in_per_group, k, _ = weight.shape
        super().__init__(in_per_group * groups, out_c, k, stride=stride,
                         padding=0 if stride > 1 else k // 2, groups=groups, bias=True,
                         device="meta")
        # channels-last: the layout oneDNN takes (one in NCHW would be copied every call)
        self.weight = nn.Parameter(weight.contiguous(memory_format=torch.channels_last),
                                   requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.same = stride > 1
        self.grown: dict[tuple[int, int], torch.Tensor] = {}  # run(): SAME kernels by parity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            if torch.jit.is_tracing() and self.stride[0] == 2 and self.kernel_size[0] % 2:
                return super().forward(_traced_same_pad(x, self.kernel_size[0]))
            x = F.pad(x, _same_padding(x.shape[-2:], self.kernel_size[0], self.stride[0]))
        return super().forward(x)

    def run(self, x: torch.Tensor, relu6: bool = False,
            residual: torch.Tensor | None = None) -> torch.Tensor:
        """This convolution, plus `residual` if given, then ReLU6 if asked: one fused oneDNN
        primitive on a CPU (`onednn`), the module and in-place ops elsewhere. `residual` is
        read, never written."""
        activation = "relu6" if relu6 else "none"
        if not onednn.fusable(x, self.weight):
            y = self(x)
            if residual is not None:
                y.add_(residual)
            return onednn.activate(y, activation)
        k, s = self.kernel_size[0], self.stride[0]
        weight, pad = self.weight, list(self.padding)
        if self.same:
            if s == 2 and k % 2:  # SAME: k-2 (even side: one more after) -> a zero first row
                parity = ((x.shape[-2] + 1) % 2, (x.shape[-1] + 1) % 2)
                weight = self.grown.get(parity)
                if weight is None:
                    weight = F.pad(self.weight, (parity[1], 0, parity[0], 0)).contiguous(
                        memory_format=torch.channels_last)
                    self.grown[parity] = weight
                pad = [(k - 1) // 2] * 2
            else:
                x, pad = F.pad(x, _same_padding(x.shape[-2:], k, s)), [0, 0]
        return onednn.conv(x, weight, self.bias, pad, [s, s], [1, 1], self.groups, activation,
                           residual)


def _traced_same_pad(x: torch.Tensor, k: int) -> torch.Tensor:
    """TF SAME padding for stride 2 and an odd kernel, in a form an ONNX export keeps dynamic:
    the total is k - 2 + (side % 2), split as (k - 1) // 2 after and the rest before, i.e.
    pad (k - 1) // 2 on both sides and drop the first row/column when the side is even."""
    h, w = x.shape[-2], x.shape[-1]
    p = (k - 1) // 2
    return F.pad(x, (p, p, p, p))[:, :, (h + 1) % 2:, (w + 1) % 2:]


def _same_padding(size, k: int, s: int) -> tuple[int, int, int, int]:
    """TF SAME padding (left, right, top, bottom) for a k x k kernel at stride s."""
    pads = []
    for i in (size[1], size[0]):  # width first: F.pad's order
        total = max((math.ceil(i / s) - 1) * s + k - i, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


def fold(state: dict[str, torch.Tensor], conv: str, bn: str, stride: int = 1) -> FoldedConv:
    """The convolution `conv.weight` with BatchNorm `bn.*` folded in."""
    w = state[f"{conv}.weight"].float()
    scale = state[f"{bn}.weight"].float() / torch.sqrt(state[f"{bn}.running_var"].float() + BN_EPS)
    bias = state[f"{bn}.bias"].float() - state[f"{bn}.running_mean"].float() * scale
    groups = w.shape[0] if w.shape[1] == 1 and w.shape[2] > 1 else 1
    return FoldedConv(w * scale[:, None, None, None], bias, stride, groups)


class SeparableBlock(nn.Module):
    def __init__(self, state: dict, prefix: str, stride: int) -> None:
        super().__init__()
        self.dw = fold(state, f"{prefix}.conv_dw", f"{prefix}.bn1", stride)
        self.pw = fold(state, f"{prefix}.conv_pw", f"{prefix}.bn2")
        self.skip = stride == 1 and self.dw.in_channels == self.pw.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw.run(self.dw.run(x, relu6=True), residual=x if self.skip else None)


class InvertedResidual(nn.Module):
    def __init__(self, state: dict, prefix: str, stride: int) -> None:
        super().__init__()
        self.pw = fold(state, f"{prefix}.conv_pw", f"{prefix}.bn1")
        self.dw = fold(state, f"{prefix}.conv_dw", f"{prefix}.bn2", stride)
        self.pwl = fold(state, f"{prefix}.conv_pwl", f"{prefix}.bn3")
        self.skip = stride == 1 and self.pw.in_channels == self.pwl.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw.run(self.pw.run(x, relu6=True), relu6=True)
        return self.pwl.run(y, residual=x if self.skip else None)


class ConvReLU6(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[0].run(x, relu6=True)


def stage_depths(state: dict[str, torch.Tensor]) -> list[int]:
    """Blocks per stage of timm-named weights (`blocks.S.J.*`)."""
    depth: dict[int, int] = {}
    for key in state:
        m = re.match(r"blocks\.(\d+)\.(\d+)\.", key)
        if m:
            s, j = int(m.group(1)), int(m.group(2))
            depth[s] = max(depth.get(s, 0), j + 1)
    return [depth[s] for s in sorted(depth)]


def build(state: dict[str, torch.Tensor]) -> list[tuple[str, nn.Module]]:
    """The network's stages `(tap name, module)` from timm-named weights, BatchNorm folded."""
    stages: list[tuple[str, nn.Module]] = [
        ("stem", ConvReLU6(fold(state, "conv_stem", "bn1", stride=2)))]
    for s, depth in enumerate(stage_depths(state)):
        blocks = []
        for j in range(depth):
            stride = STAGE_STRIDES[s] if j == 0 else 1
            kind = SeparableBlock if f"blocks.{s}.{j}.conv_pwl.weight" not in state else InvertedResidual
            blocks.append(kind(state, f"blocks.{s}.{j}", stride))
        stages.append((f"block{s + 1}", nn.Sequential(*blocks)))
    stages.append(("head", ConvReLU6(fold(state, "conv_head", "bn2"))))
    return stages


def efficientnet_pytorch_stage_depths(state: dict[str, torch.Tensor]) -> list[int]:
    """Stage depths of `efficientnet_pytorch`-named weights (`_blocks.N.*`): a stage is a run
    of blocks with the same output width (every stage changes it)."""
    widths: dict[int, int] = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\._project_conv\.weight$", key)
        if m:
            widths[int(m.group(1))] = int(value.shape[0])
    depths: list[int] = []
    previous = None
    for n in sorted(widths):
        if widths[n] != previous:
            depths.append(0)
            previous = widths[n]
        depths[-1] += 1
    return depths
