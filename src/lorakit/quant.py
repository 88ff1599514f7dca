"""Quantized frozen bases (QLoRA): bitsandbytes NF4/FP4 ``Linear4bit`` and int8 ``Linear8bitLt``.

>>> lorakit.quantize(model, "nf4", compute_dtype=torch.bfloat16)     # doctest: +SKIP
>>> lorakit.inject(model, lorakit.LoraConfig(r=8, targets="all-linear"))  # adapters stay fp32
>>> plain = lorakit.merge_and_unload(model, dequantize=True)          # a full-precision model

The base weights are held by bitsandbytes' layers (so a model loaded by transformers with
``BitsAndBytesConfig(load_in_4bit=True, ...)`` or ``load_in_8bit=True`` is the same thing); the
adapters are ordinary fp32 factors on top. A LoRA forward is ``base(x) + s·(x·Aᵀ)·Bᵀ``: the base
layer runs its own quantized kernel and the update is computed in the factors' dtype and added in
the base output's dtype, as PEFT does. The quantized weight gets no gradient.

Merging into a packed weight is refused: W_q + ΔW is not representable in 4 or 8 bits, and
re-quantizing changes the base by a quantization error as large as the one LoRA compensates.
:func:`dequantize` (or ``merge_and_unload(model, dequantize=True)``) gives a full-precision model
with ΔW added, rounded once; :func:`merge_requantized` writes the merged weight back into the
base's format and returns the error that introduced.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LoraError
from .kinds import LinearKind, _skinny, autocast_dtype, kind_of, register_kind
from .layers import LoraLayer
from .targets import _matcher, _output_heads, walk

__all__ = ["FORMATS", "quantize", "dequantize", "format_of", "merge_requantized", "QuantizedLinear"]

FORMATS = ("nf4", "fp4", "int8")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _bnb():
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

    def __init__(self, name: str) -> None:
        self.name = name

    def check(self, base: nn.Module, path: str) -> None:
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
            h = _skinny(a, layer.dropped(x, name).to(a.dtype).reshape(-1, x.shape[-1]))  # (tokens, r)
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
        h = _skinny(a, x2.to(a.dtype))  # (tokens, r)
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
        gh = _skinny(b.t(), gb).mul_(ctx.s)  # (tokens, r)
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


# -- quantize -------------------------------------------------------------------------------------
def _plan(model: nn.Module, fmt: str, skip: Sequence[str] | None, compute_dtype, device) -> list[tuple]:
    """``(path, parent, attr, linear)`` of every nn.Linear to quantize; raises before any change."""
    if fmt not in FORMATS:
        raise LoraError(f"unknown quantization {fmt!r}; use one of {', '.join(FORMATS)}")
    if "lorakit_registry" in getattr(model, "_orig_mod", model).__dict__:
        raise LoraError("this model already has lorakit adapters; quantize the base before lorakit.inject")
    if compute_dtype is not None and compute_dtype not in _FLOATS:
        raise LoraError(f"compute_dtype {compute_dtype} is not supported; use torch.float32, bfloat16 or float16")
    if fmt == "int8" and compute_dtype is not None:
        raise LoraError("compute_dtype applies to nf4/fp4; int8 layers compute in the input's dtype")
    modules = dict(model.named_modules())
    already = [p for p, m in modules.items() if format_of(m) is not None]
    if already:
        raise LoraError(f"the model is already quantized ({format_of(modules[already[0]])} at {already[0]}"
                        f"{f' and {len(already) - 1} more' if len(already) > 1 else ''}); "
                        "quantizing twice would quantize the quantization error")
    if skip is None:  # the output head, as "all-linear" leaves it out
        skip = sorted(_output_heads(model, modules))
    for pattern in skip:
        if not any(_matcher(pattern)(p) for p in modules if p):
            raise LoraError(f"skip entry {pattern!r} matches no module of the model")
    skipped = lambda p: any(_matcher(s)(p) for s in skip)  # noqa: E731
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    chosen = []
    for path, module in modules.items():
        if type(module) is not nn.Linear or skipped(path):
            continue
        w = module.weight
        if w.dim() != 2 or w.dtype not in _FLOATS:
            raise LoraError(f"{path}: weight {tuple(w.shape)} {w.dtype} cannot be quantized by bitsandbytes "
                            "(2-D float32/bfloat16/float16 only); add it to skip=[...] or convert it")
        if w.device.type == "meta" or w.device.type != device.type:
            raise LoraError(f"{path}: weight is on {w.device}, quantization runs on {device}; move the model first")
        if len(owners[id(w)]) > 1:
            raise LoraError(f"{path}.weight is shared with {owners[id(w)][1:]} (tied); quantizing it would untie "
                            "them; add it to skip=[...]")
        parent_path, _, attr = path.rpartition(".")
        chosen.append((path, modules[parent_path], attr, module))
    if not chosen:
        raise LoraError("no nn.Linear layer left to quantize (all skipped or none in the model)")
    return chosen


def _quantized_layer(linear: nn.Linear, fmt: str, compute_dtype, double_quant: bool, blocksize: int,
                     device: torch.device) -> nn.Module:
    """A new bitsandbytes layer holding ``linear``'s weight in ``fmt`` (the input is not changed)."""
    bnb = _bnb()
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


def quantize(model: nn.Module, fmt: str = "nf4", skip: Sequence[str] | None = None,
             compute_dtype: torch.dtype | None = None, double_quant: bool = False, blocksize: int = 64) -> nn.Module:
    """Replace the ``nn.Linear`` layers of ``model`` (any module) by bitsandbytes quantized ones, in place.

    ``fmt``: "nf4" / "fp4" (``Linear4bit``, blocks of ``blocksize`` weights with one absmax each;
    ``double_quant`` also quantizes those) or "int8" (``Linear8bitLt``, per-row absmax, no outlier
    threshold). ``skip``: module paths / dotted suffixes / regexes kept in full precision (default:
    the output head, as transformers does). ``compute_dtype``: the 4-bit layers' matmul dtype
    (default: the input's). Everything is planned and quantized first; on any error (an already
    quantized model, a model with adapters, a weight bitsandbytes cannot hold, a tied weight, an
    unknown option) nothing changes.
    The quantized weights are frozen. Returns ``model``.
    """
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    if blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
        raise LoraError(f"blocksize {blocksize} is not supported by bitsandbytes; use a power of two in 64..4096")
    chosen = _plan(model, fmt, skip, compute_dtype, device)
    try:
        new = [_quantized_layer(lin, fmt, compute_dtype, double_quant, blocksize, device) for *_, lin in chosen]
    except (RuntimeError, ValueError, NotImplementedError) as e:
        raise LoraError(f"bitsandbytes could not quantize to {fmt} on {device}: {e}; nothing was changed") from None
    for (_, parent, attr, _), layer in zip(chosen, new):
        setattr(parent, attr, layer)
    return model


# -- back to full precision -------------------------------------------------------------------------
def dequantized_weight(module: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """W as the layer uses it (bitsandbytes' own dequantization), in ``dtype`` (default: the
    original dtype for 4-bit, float32 for int8)."""
    bnb = _bnb()
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


def _plain(module: nn.Module, dtype: torch.dtype | None) -> nn.Linear:
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


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace every bitsandbytes layer of ``model`` (also under lorakit adapters) by an ``nn.Linear``
    holding its dequantized weight, in place; adapters on them become ordinary Linear adapters.

    Returns the undo list ``(parent, attr, quantized module)`` (see :func:`requantize_undo`). Everything is
    dequantized before anything is replaced."""
    root = getattr(model, "_orig_mod", model)
    found = [(parent, attr, child) for parent in root.modules() for attr, child in parent.named_children()
             if format_of(child) is not None]
    plain = [_plain(child, dtype) for *_, child in found]
    for (parent, attr, _), linear in zip(found, plain):
        setattr(parent, attr, linear)
        if isinstance(parent, LoraLayer):
            parent.kind = kind_of(linear)
    return found


def requantize_undo(found: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Put the quantized layers of :func:`dequantize` back."""
    for parent, attr, child in found:
        setattr(parent, attr, child)
        if isinstance(parent, LoraLayer):
            parent.kind = kind_of(child)


@dataclass(frozen=True)
class RequantError:
    """What writing W_deq + ΔW back into the base's format changed, per layer (max |·|)."""

    error: dict[str, float]  # |deq(Q(W_deq + ΔW)) − (W_deq + ΔW)|
    delta: dict[str, float]  # |ΔW|, for scale

    @property
    def worst(self) -> float:
        return max(self.error.values(), default=0.0)

    def __str__(self) -> str:
        ratio = max((self.error[p] / self.delta[p] for p in self.error if self.delta[p] > 0), default=0.0)
        return (f"re-quantized {len(self.error)} merged layers: max |error| {self.worst:.3g} "
                f"(up to {ratio:.3g}x the largest |ΔW| of its layer)")


def merge_requantized(model: nn.Module) -> RequantError:
    """Merge the active adapters into a quantized base and quantize the merged weights back into
    each layer's own format (lossy: the returned report says by how much), then unload lorakit.

    The alternative that adds no error is ``lorakit.merge_and_unload(model, dequantize=True)``."""
    from .model import lora_layers, merge_and_unload, registry
    reg = registry(model)
    if not reg.active:
        raise LoraError(f"no active adapter to merge; adapters: {sorted(reg.configs)}")
    targets = {}
    for path, layer in lora_layers(model):
        fmt = format_of(layer.base_layer)
        if fmt is not None and layer.active:
            w = layer.base_layer.weight
            opts = dict(fmt=fmt, compute_dtype=getattr(layer.base_layer, "compute_dtype", None),
                        double_quant=bool(getattr(w, "compress_statistics", False)),
                        blocksize=getattr(w, "blocksize", 64))
            with torch.no_grad():
                delta = sum(layer.delta(n, compute=torch.float64) for n in layer.active)
            targets[path] = (opts, float(delta.abs().max()))
    if not targets:
        raise LoraError("no active adapter sits on a quantized layer; use lorakit.merge_and_unload(model)")
    merge_and_unload(model, dequantize=True)
    error = {}
    modules = dict(model.named_modules())
    for path, (opts, _) in targets.items():
        linear = modules[path]
        merged = linear.weight.detach().to(torch.float64)
        fmt = opts.pop("fmt")
        layer = _quantized_layer(linear, fmt, device=linear.weight.device, **opts)
        error[path] = float((dequantized_weight(layer, torch.float64) - merged).abs().max())
        parent_path, _, attr = path.rpartition(".")
        setattr(modules[parent_path], attr, layer)
    return RequantError(error, {p: d for p, (_, d) in targets.items()})


# -- the base precision an adapter was trained on -------------------------------------------------
def check_base(recorded: str | None, sites: dict[str, str | None], source: str) -> None:
    """Refuse loading an adapter on layers quantized otherwise than those it was saved from.

    ``recorded``: the JSON ``{path: format}`` a lorakit save writes for its quantized layers (None
    for files without it, e.g. PEFT's: nothing to compare). ``sites``: ``{path: format or None}``
    of the model's layers the file adapts. A different base format changes every output by the
    difference of two quantization errors, of the order of the update itself, so it is an error
    unless the caller allows it (``lorakit.load(..., allow_precision_change=True)``)."""
    if recorded is None:
        return
    try:
        saved = json.loads(recorded)
    except json.JSONDecodeError:
        raise LoraError(f"{source}: its lorakit_base_quantization metadata is not JSON; save the adapter again") from None
    differ = {p: (saved.get(p), fmt) for p, fmt in sites.items() if saved.get(p) != fmt}
    if differ:
        p, (was, now) = next(iter(sorted(differ.items())))
        name = lambda f: f or "full precision"  # noqa: E731
        raise LoraError(f"{source} was trained on a base with {p} in {name(was)}, but this model holds it in "
                        f"{name(now)} ({len(differ)} layer(s) differ): the outputs would not be the ones it was "
                        f"trained for. Load the base {'quantized to ' + was if was else 'in full precision'}, or pass "
                        "allow_precision_change=True to apply it anyway")


def quantized_paths(model: nn.Module) -> dict[str, str]:
    """``{path: format}`` of every bitsandbytes layer (through lorakit wrappers, original naming)."""
    return {p: format_of(m) for p, m, *_ in walk(getattr(model, "_orig_mod", model)) if format_of(m) is not None}

