"""``nn.Linear`` and transformers' ``Conv1D`` (GPT-2): y = x·Wᵀ + b, A (r, in), B (out, r).

The single-adapter training forward runs through a fused autograd Function (:class:`_LoraLinearFn`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Kind, autocast_dtype, register_kind, skinny

__all__ = ["LinearKind"]


class _LoraLinearFn(torch.autograd.Function):
    """y = x·Wt + bias + s·(x·Aᵀ)·Bᵀ with a hand-written backward (training, dropout 0).

    Compared with autograd over the same ops: the input is saved once and shared with the frozen
    base, dx is accumulated in place (dx = g·Wtᵀ, then += (s·g·B)·A) instead of summing two
    temporaries, W gets no gradient unless it requires one, and B's gradient is computed as
    (hᵀ·g)ᵀ, the layout in which BLAS handles the skinny product fast. ``wt`` is W in (in, out) layout:
    ``weight.t()`` for nn.Linear (autograd maps its gradient back through the view), the weight
    itself for transformers' Conv1D.
    """

    @staticmethod
    def forward(ctx, x, wt, bias, a, b, s):
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.addmm(bias, x2, wt) if bias is not None else x2 @ wt
        h = skinny(a, x2)
        out.addmm_(h, b.t(), alpha=s)
        ctx.save_for_backward(x2, wt, a, b, h)
        ctx.s, ctx.x_shape = s, x.shape
        return out.view(*x.shape[:-1], wt.shape[1])

    @staticmethod
    def backward(ctx, g):
        x2, wt, a, b, h = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gh = skinny(b.t(), g2).mul_(ctx.s)
        dx = dwt = dbias = da = db = None
        if ctx.needs_input_grad[0]:
            dx = (g2 @ wt.t()).addmm_(gh, a).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dwt = x2.t() @ g2
        if ctx.needs_input_grad[2]:
            dbias = g2.sum(0)
        if ctx.needs_input_grad[3]:
            da = gh.t() @ x2
        if ctx.needs_input_grad[4]:  # as (hᵀ·g)ᵀ: BLAS runs gᵀ·h (transposed, 8 columns) ~10x slower
            db = (h.t() @ g2).mul_(ctx.s).t()
        return dx, dwt, dbias, da, db, None


class LinearKind(Kind):
    """``nn.Linear``: y = x·Wᵀ + b; A (r, in), B (out, r). Subclass it for a layer that computes
    the same thing from other storage (override :meth:`owns_output` and, if W is not a plain
    tensor, :meth:`forward`)."""

    name = "linear"
    supports_dropout = True
    all_linear = True
    row_gather = "matmul"
    dora = True
    lora_bias = True

    def update(self, layer, name, x):
        a, b = layer.lora_A[name], layer.lora_B[name]
        h = skinny(a, x.to(a.dtype).reshape(-1, x.shape[-1]))
        return (F.linear(h, b) * layer.scale[name]).view(*x.shape[:-1], b.shape[0])

    def owns_output(self, base):
        return type(base) is nn.Linear  # a subclass's output may be needed by its own backward

    def forward(self, layer, names, x, *args, **kwargs):
        base = layer.base_layer
        fresh = self.owns_output(base)
        if (fresh and len(names) == 1 and torch.is_grad_enabled() and not args and not kwargs
                and not (layer.training and layer.dropout[names[0]] > 0) and names[0] not in layer.lora_bias
                and not isinstance(layer.scale[names[0]], torch.Tensor)):  # (a hot-swap scale: the path below)
            a, b, bias = layer.lora_A[names[0]], layer.lora_B[names[0]], base.bias
            wt = base.weight if self.transposed else base.weight.t()
            cast = autocast_dtype(x)
            if cast is not None:  # what autocast does to F.linear and matmul: every operand in its dtype
                x, wt, a, b = x.to(cast), wt.to(cast), a.to(cast), b.to(cast)
                bias = None if bias is None else bias.to(cast)
            if x.dtype == a.dtype == wt.dtype:
                return _LoraLinearFn.apply(x, wt, bias, a, b, layer.scale[names[0]])
        result = base(x, *args, **kwargs)
        # The base output is a fresh tensor that its backward does not need, so the update can be
        # added in place (one addmm_, no output-sized temporaries) when the dtypes agree.
        for name in names:
            a, b, s = layer.lora_A[name], layer.lora_B[name], layer.scale[name]
            x2 = layer.dropped(x, name).to(a.dtype).reshape(-1, x.shape[-1])
            h = skinny(a, x2)  # (tokens, r)
            if fresh and h.dtype == b.dtype == result.dtype and result.is_contiguous():
                if isinstance(s, torch.Tensor):  # a hot-swap scale (lorakit.prepare_hotswap): alpha takes numbers only
                    h, s = h * s, 1
                result.view(-1, result.shape[-1]).addmm_(h, b.t(), alpha=s)
            else:
                result = result + (F.linear(h, b) * s).to(result.dtype).view(result.shape)
            result = self.bias_update(layer, name, result)
        return result


class _Conv1D(LinearKind):
    """transformers' ``Conv1D``: y = x @ W + b with W stored (in, out); PEFT's fan_in_fan_out."""

    name = "conv1d_hf"
    transposed = True
    fan_in_fan_out = True

    def owns_output(self, base):
        return True

    def shapes(self, base, weight, r):
        return (r, weight.shape[0]), (weight.shape[1], r)


register_kind(nn.Linear, LinearKind())
register_kind("transformers.pytorch_utils.Conv1D", _Conv1D())  # GPT-2; transformers is not imported
