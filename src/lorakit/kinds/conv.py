"""``nn.Conv1d/2d/3d``: groups = 1 (A a conv like the base, B a 1×1 conv) or groups > 1, in lorakit's
mergeable grouped layout (new adapters) or in PEFT's unmergeable one (loaded from PEFT's files).

Which grouped layout a file holds is told by the shape of A alone: a 2-D A (r, in/groups·k…) is
lorakit's, an A with the weight's number of dims (r, in, k…) is PEFT's; no shape is both. One layer
holds adapters of one layout (:func:`grouped_layout` picks the kind for a file's A)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LoraError
from .base import Kind, register_kind

__all__ = ["GROUPED", "PEFT_GROUPED", "grouped_layout"]


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


class _PeftGroupedConv(Kind):
    """ConvNd with groups > 1 in PEFT's layout: A is a full conv (r, in, k…) over all input channels
    with the base's kernel, stride and padding (PEFT passes no dilation: 1, zero padding), B a 1×1 conv
    (out, r/groups, 1…) with the base's groups. B·A is no weight of the grouped base, so it runs only
    unmerged; merging (and anything that needs ΔW) is refused, as PEFT refuses it."""

    name = "conv_grouped_peft"
    supports_dropout = True

    def shapes(self, base, weight, r):
        if r % base.groups:
            raise LoraError(f"PEFT's grouped-conv layout needs a rank divisible by groups={base.groups}, got r={r}")
        ones = [1] * (weight.dim() - 2)
        return (r, base.in_channels, *weight.shape[2:]), (weight.shape[0], r // base.groups, *ones)

    def check_base(self, base, path):
        if any(d != 1 for d in base.dilation):
            raise LoraError(f"{path}: PEFT's grouped-conv layout on a dilated conv (dilation={base.dilation}) is not "
                            "supported: PEFT builds A without the dilation, so its output does not have the base's "
                            "shape (PEFT fails in forward); use lorakit's grouped layout (lorakit.inject)")

    def _refuse(self, path: str) -> LoraError:
        return LoraError(f"{path}: PEFT's grouped-conv layout cannot be merged (its A is a full convolution over all "
                         "input channels, so B·A is not a weight of this grouped convolution; PEFT cannot merge it "
                         "either); keep the adapter unmerged, or train one in lorakit's grouped layout (lorakit.inject), "
                         "which merges exactly")

    def check_merge(self, base, path):
        raise self._refuse(path)

    def matrices(self, base, weight, a, b):
        raise self._refuse(f"{type(base).__name__}(groups={base.groups})")

    def update(self, layer, name, x):
        base, a, b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
        conv = (F.conv1d, F.conv2d, F.conv3d)[layer.weight.dim() - 3]
        h = conv(x.to(a.dtype), a, None, base.stride, base.padding)
        return conv(h, b, None, groups=base.groups) * layer.scale[name]

    def forward(self, layer, names, x, *args, **kwargs):
        result = layer.base_layer(x, *args, **kwargs)
        for name in names:
            result = result + self.update(layer, name, layer.dropped(x, name)).to(result.dtype)
        return result


_CONV, GROUPED, PEFT_GROUPED = _Conv(), _GroupedConv(), _PeftGroupedConv()


def grouped_layout(weight: Tensor, a: Tensor) -> Kind:
    """The grouped-conv kind of a file's factor ``a`` for a grouped conv weight ``weight``: PEFT's
    layout if ``a`` has the weight's number of dims, else lorakit's (its A is 2-D)."""
    return PEFT_GROUPED if a.dim() == weight.dim() else GROUPED


for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_kind(_conv, lambda m: _CONV if m.groups == 1 else GROUPED)
