"""DoRA (weight-decomposed LoRA, Liu et al. 2024) exactly as PEFT 0.21 computes it, for every layer
kind whose :attr:`~lorakit.kinds.Kind.dora` is set (nn.Linear, transformers' Conv1D, nn.Embedding,
nn.Conv1d/2d/3d).

An adapter with ``use_dora=True`` has, besides A and B, a trainable magnitude m with one entry per
output unit of W, and the adapted weight is

    W' = f ⊙ (W + ΔW),    f = m / ‖W + ΔW‖,    ΔW = s·B·A (:meth:`LoraLayer.delta`),

the norm taken per output unit over all other axes of W and treated as a constant (detached, as the
paper's section 4.3 and PEFT do). The output axis of W is 0 (nn.Linear, ConvNd) or, for a
``transposed`` kind, 1 (Conv1D stores W as (in, out); for nn.Embedding, whose W is (num, dim),
PEFT takes one norm per embedding dimension). m has PEFT's shape: (out,) for a 2-D W,
(1, out, 1, …) for a convolution; it starts at ‖W + ΔW‖, so a new adapter changes nothing.

The unmerged forward is PEFT's, with x̃ = dropout(x) (integer inputs get none):

    y = base(x) + (f − 1) ⊙ W·x̃ + f ⊙ s·B·A·x̃

so without dropout (eval, p = 0) y = f ⊙ (W x + s·B·A·x) + bias, the merged layer's output; that
case is computed as written, from the kind's own LoRA forward (its fast paths included).
A DoRA adapter is applied alone: it cannot be active together with another adapter on a layer
(:meth:`LoraLayer.check_active`), because the combination has no single W' (PEFT chains them in
order of activation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import LoraError
from ..kinds import AdapterHost, Kind

__all__ = ["check_weight", "magnitude_shape", "weight_norm", "factor", "forward", "merged", "unmerged"]


def _axis(kind: Kind) -> int:
    """W's output axis: 1 for a transposed kind (Conv1D, Embedding), else 0."""
    return 1 if kind.transposed else 0


def _norm(kind: Kind, v: Tensor) -> Tensor:
    """‖v‖ per output unit of a tensor in W's layout, as a vector (out,)."""
    return torch.linalg.vector_norm(v, dim=[d for d in range(v.dim()) if d != _axis(kind)])


def check_weight(kind: Kind, weight: Tensor, path: str) -> None:
    """Raise :class:`LoraError` if an output unit of ``weight`` is all zeros: its ‖W + ΔW‖ starts at 0
    and f = m/‖W + ΔW‖ would be 0/0 (PEFT's output is NaN there)."""
    if weight.device.type == "meta":
        return
    with torch.no_grad():
        norm = _norm(kind, weight.float())
    zero = (norm == 0).nonzero().flatten().tolist()
    if zero:
        raise LoraError(f"{path}: output unit(s) {zero[:8]}{' …' if len(zero) > 8 else ''} of this weight are all "
                        "zero, so DoRA's m/‖W + ΔW‖ is 0/0 there (PEFT gives NaN); use plain LoRA (use_dora=False) "
                        "on this module")


def magnitude_shape(kind: Kind, weight: Tensor) -> tuple[int, ...]:
    """m's shape (PEFT's) for ``weight`` of a ``kind`` layer: (out,), or (1, out, 1, …) for a
    convolution's W (dim > 2)."""
    out = weight.shape[_axis(kind)]
    return (1, out, *([1] * (weight.dim() - 2))) if weight.dim() > 2 else (out,)


def weight_norm(layer: AdapterHost, name: str) -> Tensor:
    """‖W + ΔW‖ per output unit (out,), in the factors' dtype, without gradient."""
    with torch.no_grad():
        delta = layer.delta(name)
        return _norm(layer.kind, layer.weight.to(delta.dtype) + delta)


def factor(layer: AdapterHost, name: str) -> Tensor:
    """f = m / ‖W + ΔW‖ (out,), differentiable in m only."""
    return layer.lora_magnitude_vector[name].flatten() / weight_norm(layer, name)


def _on_output(layer: AdapterHost, v: Tensor) -> Tensor:
    """A per-output vector shaped to broadcast over the layer's output: (out,) on the last dim, or
    (out, 1, …) on a convolution's channel dim (batched or not)."""
    return v.view(-1, *([1] * (layer.weight.dim() - 2)))


def forward(layer: AdapterHost, name: str, x: Tensor, *args, **kwargs) -> Tensor:
    """The layer's output with DoRA adapter ``name`` (PEFT's formula, see the module docstring)."""
    base = layer.base_layer
    bias = getattr(base, "bias", None)
    bias = _on_output(layer, bias) if isinstance(bias, Tensor) else 0
    f = _on_output(layer, factor(layer, name))
    if not (x.is_floating_point() and layer.training and layer.dropout[name] > 0):
        # y = f ⊙ (W x + s·B·A·x) + bias from the kind's own (fast) LoRA forward: autograd keeps one
        # output-sized tensor for m's gradient (PEFT's form keeps two)
        out = layer.kind.forward(layer, (name,), x, *args, **kwargs)
        return out + ((f - 1) * (out - bias).to(f.dtype)).to(out.dtype)  # exactly out when f = 1
    result = base(x, *args, **kwargs)
    xd = layer.dropped(x, name)
    wx = base(xd, *args, **kwargs) - bias  # W·x̃
    update = layer.kind.update(layer, name, xd)  # s·B·A·x̃
    return result + ((f - 1) * wx.to(f.dtype) + f * update).to(result.dtype)


def _broadcast_on_weight(layer: AdapterHost, v: Tensor) -> Tensor:
    """A per-output vector shaped to broadcast over W's layout."""
    shape = [1] * layer.weight.dim()
    shape[_axis(layer.kind)] = -1
    return v.view(shape)


def merged(layer: AdapterHost, name: str) -> tuple[Tensor, Tensor]:
    """``(W', ‖W + ΔW‖)`` in float64: W' = m/‖W + ΔW‖ ⊙ (W + ΔW), for one rounding to W's dtype by the
    caller; the norm is what :func:`unmerged` needs to take W' apart again."""
    v = layer._shifted((name,), +1)
    norm = _norm(layer.kind, v)
    m = layer.lora_magnitude_vector[name].detach().flatten().to(torch.float64)
    return v * _broadcast_on_weight(layer, m / norm), norm


def unmerged(layer: AdapterHost, name: str, norm: Tensor) -> Tensor:
    """W = W'·‖W + ΔW‖/m − ΔW in float64 (the merge undone by arithmetic, when no copy was kept)."""
    m = layer.lora_magnitude_vector[name].detach().flatten().to(torch.float64)
    w = layer.weight.to(torch.float64) * _broadcast_on_weight(layer, norm / m)
    return w - layer.delta(name, compute=torch.float64)
