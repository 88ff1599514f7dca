"""Quantized frozen bases (QLoRA), model-level: quantize a model's linear layers, merge into them.

>>> lorakit.quantize(model, "nf4", compute_dtype=torch.bfloat16)     # doctest: +SKIP
>>> lorakit.inject(model, lorakit.LoraConfig(r=8, targets="all-linear"))  # adapters stay fp32
>>> plain = lorakit.merge_and_unload(model, dequantize=True)          # a full-precision model

The base weights are held by bitsandbytes' layers (so a model loaded by transformers with
``BitsAndBytesConfig(load_in_4bit=True, ...)`` or ``load_in_8bit=True`` is the same thing); the
adapters are ordinary fp32 factors on top, through the layer kind in :mod:`lorakit.kinds.bitsandbytes`
(the base layer runs its own quantized kernel, the update is added to its output, as PEFT does).

Merging into a packed weight is refused: W_q + ΔW is not representable in 4 or 8 bits, and
re-quantizing changes the base by a quantization error as large as the one LoRA compensates.
:func:`dequantize` (or ``merge_and_unload(model, dequantize=True)``) gives a full-precision model
with ΔW added, rounded once; :func:`merge_requantized` writes the merged weight back into the
base's format and returns the error that introduced. :func:`check_trained_precision` refuses an
adapter file saved from a base quantized otherwise than the model it is loaded into.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .config import LoraError
from .kinds.bitsandbytes import FORMATS, dequantized_weight, format_of, quantized_layer
from .model import dequantize, lora_layers, merge_and_unload, registry
from .state import has_adapters, unwrap, walk
from .targets import matcher, output_heads

__all__ = ["FORMATS", "quantize", "dequantize", "format_of", "dequantized_weight", "merge_requantized", "RequantError",
           "check_trained_precision", "quantized_paths"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


# -- quantize -------------------------------------------------------------------------------------
def _plan(model: nn.Module, fmt: str, skip: Sequence[str] | None, compute_dtype, device) -> list[tuple]:
    """``(path, parent, attr, linear)`` of every nn.Linear to quantize; raises before any change."""
    if fmt not in FORMATS:
        raise LoraError(f"unknown quantization {fmt!r}; use one of {', '.join(FORMATS)}")
    if has_adapters(model):
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
        skip = sorted(output_heads(model, modules))
    for pattern in skip:
        if not any(matcher(pattern)(p) for p in modules if p):
            raise LoraError(f"skip entry {pattern!r} matches no module of the model")
    skipped = lambda p: any(matcher(s)(p) for s in skip)  # noqa: E731
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
        new = [quantized_layer(lin, fmt, compute_dtype, double_quant, blocksize, device) for *_, lin in chosen]
    except (RuntimeError, ValueError, NotImplementedError) as e:
        raise LoraError(f"bitsandbytes could not quantize to {fmt} on {device}: {e}; nothing was changed") from None
    for (_, parent, attr, _), layer in zip(chosen, new):
        setattr(parent, attr, layer)
    return model


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
        layer = quantized_layer(linear, fmt, device=linear.weight.device, **opts)
        error[path] = float((dequantized_weight(layer, torch.float64) - merged).abs().max())
        parent_path, _, attr = path.rpartition(".")
        setattr(modules[parent_path], attr, layer)
    return RequantError(error, {p: d for p, (_, d) in targets.items()})


# -- the base precision an adapter was trained on -------------------------------------------------
def check_trained_precision(recorded: str | None, sites: dict[str, str | None], source: str) -> None:
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
    return {p: format_of(m) for p, m, *_ in walk(unwrap(model)) if format_of(m) is not None}
