"""bitsandbytes' quantized linear layers as a layer kind: NF4/FP4 ``Linear4bit`` and int8 ``Linear8bitLt``.

The kind (:class:`QuantizedLinear`) runs the base layer's own quantized kernel and adds the update of
fp32 factors to its output, as PEFT does; its single-adapter training forward has a hand-written
backward (:class:`_QuantLoraFn`). This file also holds what the rest of lorakit needs of
bitsandbytes: :func:`format_of`, :func:`quantized_layer` (build one from an ``nn.Linear``),
:func:`dequantized_weight` and :meth:`QuantizedLinear.dequantized` (an ``nn.Linear`` holding W_deq).
Registering the kind does not import bitsandbytes (by qualified name).
"""

from __future__ import annotations

import logging
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LoraError
from .base import autocast_dtype, register_kind, skinny
from .linear import LinearKind

__all__ = ["FORMATS", "QuantizedLinear", "format_of", "quantized_layer", "dequantized_weight", "bitsandbytes"]

FORMATS = ("nf4", "fp4", "int8")


def bitsandbytes():
    """bitsandbytes, or a LoraError that says how to get it."""
    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")  # an optional faster CPU kernel it lacks here
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise LoraError("quantized bases need bitsandbytes: pip install 'lorakit[quant]' "
                        f"(bitsandbytes==0.50.2); import failed: {e}") from None
    finally:
        quiet.setLevel(level)
    return bitsandbytes


def format_of(module: nn.Module) -> str | None:
    """"nf4", "fp4" or "int8" for a bitsandbytes quantized linear layer ("4bit" for a Linear4bit
    whose weight was never quantized), else None (no import)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        state = getattr(module.weight, "quant_state", None)
        return state.quant_type if state is not None else getattr(module.weight, "quant_type", "4bit")
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "int8"
    return None


class QuantizedLinear(LinearKind):
    """LoRA on a bitsandbytes linear layer: A (r, in), B (out, r) as for nn.Linear (PEFT's files),
    fp32 factors; ``"all-linear"`` selects it and mixed batches take the batched path.

    The packed weight is never read by lorakit in the forward: the base layer runs its own kernel
    and the update is added to its output; in place only without autograd (bitsandbytes returns a
    view made inside its autograd Function, which autograd forbids modifying in place). Merging
    into the packed weight is refused (see the module docstring)."""

    dora = False  # W is packed: its norm is not a tensor lorakit can read
    lora_bias = False  # not implemented on quantized layers (their own forward path)

    def __init__(self, name: str) -> None:
        self.name = name

    def check_base(self, base: nn.Module, path: str) -> None:
        if self.name == "linear4bit" and getattr(base.weight, "quant_state", None) is None:
            raise LoraError(f"{path}: this Linear4bit holds no quantized weight (bitsandbytes quantizes on "
                            "`.to(device)`; transformers leaves a newly initialised head unquantized: keep it out "
                            "with BitsAndBytesConfig(llm_int8_skip_modules=[...])); it cannot run, so it cannot "
                            "take an adapter")
        if self.name == "linear8bit" and getattr(base.state, "has_fp16_weights", False):
            raise LoraError(f"{path}: Linear8bitLt with has_fp16_weights=True holds a trainable fp16 "
                            "weight, not a frozen int8 one; load it with has_fp16_weights=False")

    def shapes(self, base, weight, r):
        return (r, base.in_features), (base.out_features, r)

    def weight_shape(self, base, weight):
        return (base.out_features, base.in_features)

    def dequantized(self, base, dtype=None):
        return dequantized_linear(base, dtype)

    def check_merge(self, base, path):
        fmt = format_of(base)
        raise LoraError(f"cannot merge into {path}: its weight is quantized ({fmt}) and W + ΔW is not "
                        f"representable in {fmt}; use lorakit.merge_and_unload(model, dequantize=True) for a "
                        "full-precision model, or lorakit.quant.merge_requantized(model) (lossy; reports "
                        "its error), or keep the adapter unmerged")

    def forward(self, layer, names, x, *args, **kwargs):
        base = layer.base_layer
        if (len(names) == 1 and torch.is_grad_enabled() and not args and not kwargs
                and not (layer.training and layer.dropout[names[0]] > 0) and autocast_dtype(x) is None
                and not torch.compiler.is_compiling() and not any(p.requires_grad for p in base.parameters())):
            a, b = layer.lora_A[names[0]], layer.lora_B[names[0]]
            return _QuantLoraFn.apply(x, a, b, layer.scale[names[0]], base)
        result = base(x, *args, **kwargs)
        for name in names:
            a, b, s = layer.lora_A[name], layer.lora_B[name], layer.scale[name]
            h = skinny(a, layer.dropped(x, name).to(a.dtype).reshape(-1, x.shape[-1]))  # (tokens, r)
            if not torch.is_grad_enabled() and h.dtype == b.dtype == result.dtype and result.is_contiguous():
                result.view(-1, result.shape[-1]).addmm_(h, b.t(), alpha=s)
            else:
                result = result + (F.linear(h, b) * s).to(result.dtype).view(result.shape)
        return result


class _QuantLoraFn(torch.autograd.Function):
    """y = base(x) + s·(x·Aᵀ)·Bᵀ on a frozen bitsandbytes layer, with a hand-written backward
    (training with one adapter, dropout 0, no autocast, eager).

    The forward runs the layer's own kernel without autograd and adds the update into its output
    in place; only x, A, B and h = x·Aᵀ are saved (bitsandbytes' Function saves the packed weight,
    and autograd over the update kept the output-sized sum and product). The backward dequantizes W
    once (bitsandbytes' own dequantization) for dx = g·W_deq + (s·g·B)·A, computing g·W_deq in the
    dtype bitsandbytes' backward uses (4-bit: compute dtype; int8: x's); the packed weight gets no
    gradient.
    """

    @staticmethod
    def forward(ctx, x, a, b, s, base):
        with torch.no_grad():
            out = base(x)
        x2 = x.reshape(-1, x.shape[-1])
        h = skinny(a, x2.to(a.dtype))  # (tokens, r)
        out2 = out.view(-1, out.shape[-1])
        if out2.dtype == b.dtype:
            out2.addmm_(h, b.t(), alpha=s)
        else:  # a half-precision output: the update in the factors' dtype, added in the output's
            out2.add_((h @ b.t()).mul_(s).to(out2.dtype))
        ctx.save_for_backward(x, a, b, h)
        ctx.s, ctx.base = s, base
        return out

    @staticmethod
    def backward(ctx, g):
        x, a, b, h = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gb = g2.to(b.dtype)
        gh = skinny(b.t(), gb).mul_(ctx.s)  # (tokens, r)
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            base = ctx.base
            dtype = x.dtype if format_of(base) == "int8" else (getattr(base, "compute_dtype", None) or x.dtype)
            dx = (g2.to(dtype) @ dequantized_weight(base, dtype)).to(x.dtype)
            if dx.dtype == a.dtype:
                dx.addmm_(gh, a)
            else:  # a half-precision x: the update's part in the factors' dtype, as autograd would
                dx.add_((gh @ a).to(dx.dtype))
            dx = dx.view(x.shape)
        if ctx.needs_input_grad[1]:
            da = gh.t() @ x.reshape(-1, x.shape[-1]).to(a.dtype)
        if ctx.needs_input_grad[2]:
            db = (h.t() @ gb).mul_(ctx.s).t()
        return dx, da, db, None, None


LINEAR4BIT, LINEAR8BIT = QuantizedLinear("linear4bit"), QuantizedLinear("linear8bit")
# By qualified name: registering does not import bitsandbytes (LinearNF4/LinearFP4 subclass Linear4bit).
register_kind("bitsandbytes.nn.modules.Linear4bit", LINEAR4BIT)
register_kind("bitsandbytes.nn.modules.Linear8bitLt", LINEAR8BIT)


def quantized_layer(linear: nn.Linear, fmt: str, compute_dtype, double_quant: bool, blocksize: int,
                     device: torch.device) -> nn.Module:
    """A new bitsandbytes layer holding ``linear``'s weight in ``fmt`` (the input is not changed)."""
    bnb = bitsandbytes()
    w, bias = linear.weight.detach(), linear.bias  # bitsandbytes quantizes into new storage; w is not changed
    if fmt == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias is not None,
                                    has_fp16_weights=False, threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False).to(device)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias is not None,
                                  compute_dtype=compute_dtype, quant_type=fmt, device="meta",
                                  compress_statistics=double_quant)
        layer.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type=fmt, blocksize=blocksize,
                                         compress_statistics=double_quant, module=layer).to(device)
        # bitsandbytes repacks the weight on the first inference forward on AVX512-BF16 CPUs: absmax
        # rounded to bf16 (W_deq changes for good, eval and training outputs differ) and a crash
        # unless out % 32 == 0 and in % blocksize == 0. lorakit's layers keep the exact format.
        layer.support_avx512bf16_for_cpu = False
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone().to(device), requires_grad=False)
    layer.train(linear.training)
    return layer


def dequantized_weight(module: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """W as the layer uses it (bitsandbytes' own dequantization), in ``dtype`` (default: the
    original dtype for 4-bit, float32 for int8)."""
    bnb = bitsandbytes()
    w = module.weight
    if format_of(module) == "int8":
        scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB  # a forward moves it to state
        deq = bnb.functional.int8_vectorwise_dequant(w.data, scb).float()
    else:
        if getattr(w.quant_state, "packing_format_for_cpu", False):
            # repacked by an inference forward on AVX512-BF16: back to the canonical layout, in the layer
            # itself, as bitsandbytes' own state_dict() does (the inverse mutates the quant state)
            w.data, w.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
        deq = bnb.functional.dequantize_4bit(w.data, w.quant_state)
    return deq if dtype is None else deq.to(dtype)


def dequantized_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A new ``nn.Linear`` (frozen) holding the layer's dequantized weight W_deq in ``dtype``."""
    w = dequantized_weight(module, dtype)
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                       device=w.device, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
        if module.bias is not None:
            linear.bias.copy_(module.bias.to(w.dtype))
    linear.weight.requires_grad_(False)
    if linear.bias is not None:
        linear.bias.requires_grad_(False)
    linear.train(module.training)
    return linear
