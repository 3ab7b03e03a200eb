"""CPU convolutions without eager torch's extra passes and copies.

Eager torch runs a CPU convolution, then its ReLU as a second pass over the map; for 1x1
convolutions in batches under 16 on one thread (ingest's default of two single-threaded
forwards) it picks an im2col path that copies channels-last maps to NCHW and back. Here a
convolution runs as the fused oneDNN op torch.compile's CPU backend emits
(`torch.ops.mkldnn._convolution_pointwise`: convolution, bias, ReLU/ReLU6 and residual sum in
one primitive on the channels-last layout), and a 1x1 convolution of a channels-last map as one
GEMM (oneDNN builds a primitive for every new map shape, the GEMM needs none; images of many
sizes each bring a new shape). Maps equal the eager modules' within float rounding; on other
devices, dtypes, under autocast, while traced (the ONNX export) or differentiated, the eager
modules run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"none": ("none", []), "relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0])}


def _fused_op():
    """torch's fused oneDNN convolution op, or None where this build has none or its signature
    differs from the one used here (tried once on a tiny input, with every form `conv` uses)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        op = torch.ops.mkldnn._convolution_pointwise
        x, w, b = torch.ones(1, 2, 3, 3), torch.ones(2, 2, 1, 1), torch.zeros(2)
        y = op(x, w, b, [0, 0], [1, 1], [1, 1], 1, "hardtanh", [0.0, 6.0], "")
        z = op.binary(x, x, w, b, [0, 0], [1, 1], [1, 1], 1, "add", 1.0, None, [], None)
        if float(y.sum()) != 36.0 or float(z.sum()) != 54.0:
            return None
        return op
    except Exception:  # noqa: BLE001 - any failure: the eager modules run instead
        return None


def _autocast_check():
    """A no-argument test for CPU autocast on this torch (the API changed in torch 2.4)."""
    try:
        torch.is_autocast_enabled("cpu")
        return lambda: torch.is_autocast_enabled("cpu")
    except TypeError:
        return torch.is_autocast_cpu_enabled


FUSED_CONV = _fused_op()
GEMM_1X1 = True  # 1x1 convolutions of channels-last maps as GEMMs (off: oneDNN, for comparison)
_cpu_autocast = _autocast_check()


def fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this convolution can take the fused path: float32 on a CPU, outside autocast
    (which would not cast for the op), not traced, nothing to differentiate (it has no
    backward)."""
    return (FUSED_CONV is not None and x.device.type == "cpu" and weight.device.type == "cpu"
            and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not _cpu_autocast()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.jit.is_tracing() and not torch.jit.is_scripting())


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: list[int],
         stride: list[int], dilation: list[int], groups: int, activation: str = "none",
         residual: torch.Tensor | None = None) -> torch.Tensor:
    """activation(conv(x) + bias [+ residual]) as one oneDNN primitive, or a 1x1 convolution of
    a channels-last map as one GEMM (see `fusable`); `residual` is read, never written."""
    out_c, in_c, kh, kw = weight.shape
    if GEMM_1X1 and kh == kw == 1 and groups == 1 and stride == [1, 1] and padding == [0, 0] \
            and x.is_contiguous(memory_format=torch.channels_last):
        # (N*H*W, C) @ (C, O): a oneDNN primitive is built for every new map shape (~8% of a
        # forward when every image has its own size); the GEMM needs none
        n, _, h, w = x.shape
        rows, wt = x.permute(0, 2, 3, 1).reshape(-1, in_c), weight.view(out_c, in_c).t()
        if residual is not None:
            y = torch.addmm(residual.permute(0, 2, 3, 1).reshape(-1, out_c), rows, wt)
            if bias is not None:
                y.add_(bias)
        else:
            y = torch.addmm(bias, rows, wt) if bias is not None else rows @ wt
        return activate(y.view(n, h, w, out_c).permute(0, 3, 1, 2), activation)
    if residual is None:
        attr, scalars = ACTIVATIONS[activation]
        return FUSED_CONV(x, weight, bias, padding, stride, dilation, groups, attr, scalars, "")
    y = FUSED_CONV.binary(x, residual, weight, bias, padding, stride, dilation, groups, "add",
                          1.0, None, [], None)
    if activation == "relu6":
        return y.clamp_(0.0, 6.0)
    return y.relu_() if activation == "relu" else y


def activate(y: torch.Tensor, activation: str) -> torch.Tensor:
    """The eager path's activation, in place on a fresh convolution output."""
    if activation == "relu6":
        return F.relu6(y, inplace=True)
    return y.relu_() if activation == "relu" else y


class CpuConv2d(nn.Conv2d):
    """An nn.Conv2d (weights channels-last) that runs as one fused oneDNN primitive on a CPU,
    with the ReLU that followed it in a Sequential folded in (`activation`)."""

    activation: str = "none"

    @classmethod
    def adopt(cls, src: nn.Conv2d, activation: str = "none") -> "CpuConv2d":
        """The same convolution (its parameters shared, not copied) as a CpuConv2d."""
        new = cls(src.in_channels, src.out_channels, src.kernel_size, stride=src.stride,
                  padding=src.padding, dilation=src.dilation, groups=src.groups,
                  bias=src.bias is not None, device="meta")
        new.weight = nn.Parameter(src.weight.detach().contiguous(memory_format=torch.channels_last),
                                  requires_grad=False)
        if src.bias is not None:
            new.bias = nn.Parameter(src.bias.detach(), requires_grad=False)
        new.activation = activation
        return new.train(src.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.padding, str) or not fusable(x, self.weight):
            return activate(super().forward(x), self.activation)
        return conv(x, self.weight, self.bias, list(self.padding), list(self.stride),
                    list(self.dilation), self.groups, self.activation)


def adopt_convolutions(module: nn.Module) -> int:
    """Turn every plain nn.Conv2d under `module` into a CpuConv2d in place; a ReLU right after
    one in a Sequential is folded into it (and becomes an Identity: the Sequential's output is
    unchanged). Returns how many convolutions were adopted."""
    count = 0
    children = list(module.named_children())
    for i, (name, child) in enumerate(children):
        if type(child) is nn.Conv2d and child.padding_mode == "zeros":
            activation = "none"
            after = [(n, c) for n, c in children[i + 1:] if type(c) is not nn.Identity][:1]
            if isinstance(module, nn.Sequential) and after and type(after[0][1]) is nn.ReLU:
                activation = "relu"  # (Identity: a BatchNorm folded into this convolution)
                setattr(module, after[0][0], nn.Identity())
            setattr(module, name, CpuConv2d.adopt(child, activation))
            count += 1
        else:
            count += adopt_convolutions(child)
    return count
