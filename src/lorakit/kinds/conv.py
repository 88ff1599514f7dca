"""``nn.Conv1d/2d/3d``: groups = 1 (A a conv like the base, B a 1×1 conv) or groups > 1 (lorakit's
mergeable grouped layout)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .base import Kind, register_kind

__all__: list[str] = []


class _Conv(Kind):
    """ConvNd with groups = 1: A is a conv with the base's kernel/stride/padding/dilation, B a 1×1 conv."""

    name = "conv"
    supports_dropout = True
    dora = True
    lora_bias = True
    bias_dim = 1

    def shapes(self, base, weight, r):
        return (r, *weight.shape[1:]), (weight.shape[0], r, *([1] * (weight.dim() - 2)))

    def update(self, layer, name, x):
        a, b = layer.lora_A[name], layer.lora_B[name]
        conv = (F.conv1d, F.conv2d, F.conv3d)[layer.weight.dim() - 3]
        return conv(layer.base_layer._conv_forward(x.to(a.dtype), a, None), b) * layer.scale[name]

    def forward(self, layer, names, x, *args, **kwargs):
        result = layer.base_layer(x, *args, **kwargs)
        for name in names:
            result = result + self.update(layer, name, layer.dropped(x, name)).to(result.dtype)
            result = self.bias_update(layer, name, result)
        return result


class _GroupedConv(Kind):
    """ConvNd with groups > 1: ΔW has the grouped weight's shape, so it is built and convolved.

    The factors are A (r, in/groups·k…) and B (out, r); the update merges exactly. (PEFT instead
    uses a full conv for A, whose ΔW cannot be merged into a grouped conv; its files differ.)
    """

    name = "conv_grouped"
    supports_dropout = True
    dora = True  # lorakit's own layout (PEFT's grouped-conv files differ, see above)

    def update(self, layer, name, x):
        delta = layer.delta(name, layer.lora_A[name].dtype)
        return layer.base_layer._conv_forward(x.to(delta.dtype), delta, None)

    def forward(self, layer, names, x, *args, **kwargs):
        result = layer.base_layer(x, *args, **kwargs)
        for name in names:
            result = result + self.update(layer, name, layer.dropped(x, name)).to(result.dtype)
        return result


_CONV, _GROUPED_CONV = _Conv(), _GroupedConv()
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_kind(_conv, lambda m: _CONV if m.groups == 1 else _GROUPED_CONV)
