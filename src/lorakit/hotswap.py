"""Hot-swapping adapters in a compiled model without recompiling: :func:`prepare_hotswap` before
``torch.compile``, then :func:`load` (``lorakit.load``) into the prepared adapter's name.

``torch.compile`` specializes its code on the shapes of the tensors a forward reads and on the values
of the Python numbers it reads, and recompiles when one of them changes. Loading another adapter into
a name would change both: the factors' shapes (another rank) and the scale s = α/r, a Python float on
each layer. :func:`prepare_hotswap` takes both away:

* every factor is zero-padded to rank R (``max_rank``): A gets zero rows, B zero columns, so each
  product B·A, and with it ΔW and every output, is unchanged exactly (the added terms are 0·0);
* each scale becomes a 0-dim float64 tensor, which holds the Python float exactly and enters each
  product as the float did (cast to the computation's dtype).

:func:`load` into a prepared adapter then swaps in place: the file's factors are copied into the
first r rows of A and columns of B, the rest is zeroed, the scale tensor is filled, and a DoRA
magnitude or a ``modules_to_save`` copy is copied into its tensors: the compiled code reads the same
tensors, with new values. Padding stays zero while training (its gradients are zero: they are
products with the zero padding of the other factor). The adapter keeps its own rank
(:attr:`lorakit.LoraLayer.true_rank`): :func:`lorakit.summary` shows it and :func:`lorakit.save` writes
the unpadded factors and the adapter's own config, the same file a save without padding writes.

A swap is planned and checked completely first (every check of :func:`lorakit.files.reader.load`,
then what an in-place swap needs) and refused with a :class:`LoraError` before anything changes when
the file has a rank above the padding, targets other modules, or differs in DoRA or dropout (a
dropout probability is a Python number the compiled code depends on). Padding applies to the layer
kinds whose rank is A's dim 0 and B's dim 1 (linear, GPT-2 Conv1D, embedding, convolutions, 2-D raw
parameters, ``nn.MultiheadAttention``); stacked experts (3-D parameters), quantized (bitsandbytes)
layers, PiSSA/OLoRA adapters and FSDP2-sharded models are refused by :func:`prepare_hotswap`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from .config import LoraConfig, LoraError
from .files import format as fmt
from .files import reader
from .layers import LoraLayer
from .model import check_names, require_unmerged, set_active
from .quant import format_of
from .sharding import is_sharded
from .state import lora_layers, registry, registry_of, saved_modules, unwrap
from .variants import rewriting_inits as inits

__all__ = ["prepare_hotswap", "load", "verify", "is_prepared"]


def is_prepared(model: nn.Module, adapter: str) -> bool:
    """Whether adapter ``adapter`` of ``model`` is prepared for hot-swapping (:func:`prepare_hotswap`)."""
    return registry_of(model) is not None and any(adapter in layer.true_rank for _, layer in lora_layers(model))


def _padding_refused(path: str, layer: LoraLayer, name: str) -> str | None:
    """Why adapter ``name`` of ``layer`` cannot be zero-padded, or None: its kind's rank must be A's
    dim 0 and B's dim 1 (so padding appends zero rows / columns), and its base not quantized."""
    if format_of(layer.base_layer):
        return (f"{path} is quantized ({format_of(layer.base_layer)}); hot-swapping is not supported on "
                "bitsandbytes layers")
    if name in layer.true_rank:  # padded before
        return None
    a, b, r = layer.lora_A[name], layer.lora_B[name], layer.rank(name)
    a_shape, b_shape = layer.kind.shapes(layer.base_layer, layer.weight, r + 1)
    if (tuple(a_shape) != (r + 1, *a.shape[1:]) or tuple(b_shape) != (b.shape[0], r + 1, *b.shape[2:])
            or a.shape[0] != r or b.shape[1] != r):
        return (f"{path} ({layer.kind.name}, weight {tuple(layer.weight.shape)}) stores its rank-{r} factors in "
                f"shapes {tuple(a.shape)}, {tuple(b.shape)}, not as A's rows and B's columns; it cannot be padded")
    return None


def prepare_hotswap(model: nn.Module, max_rank: int, adapters: str | Sequence[str] | None = None) -> nn.Module:
    """Prepare ``adapters`` (default: all) of ``model`` for hot-swapping under ``torch.compile``: their
    factors zero-padded to rank ``max_rank`` (outputs unchanged exactly), their scales 0-dim tensors.

    Call it before ``torch.compile`` and before creating an optimizer (the factors become new,
    larger parameters), after moving the model to its device (the scale tensors are made on the
    weights' device). Afterwards :func:`lorakit.load` into a prepared adapter's name replaces its
    factors, scale and DoRA magnitude in place, for any file of rank ≤ ``max_rank`` on the same
    modules, so a compiled model runs the new adapter without recompiling. Calling it again re-pads to
    a new ``max_rank``. Raises :class:`LoraError` before changing anything: a compiled model (prepare
    ``model._orig_mod`` and compile again), merged adapters, a rank above ``max_rank``, PiSSA/OLoRA
    adapters, layer kinds that cannot be padded (see the module docstring), an FSDP2-sharded model.
    Returns ``model``.
    """
    if unwrap(model) is not model:
        raise LoraError("prepare_hotswap must run before torch.compile (padding changes the factors' shapes, "
                        "which compiled code is specialized on): prepare the original model (compiled._orig_mod) "
                        "and compile it again")
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise LoraError(f"max_rank must be an integer >= 1 (the largest rank to be swapped in), got {max_rank!r}")
    reg = registry(model)
    require_unmerged(reg, "prepare adapters for hot-swapping")
    names = list(reg.configs) if adapters is None else [adapters] if isinstance(adapters, str) else list(adapters)
    check_names(reg, names)
    if is_sharded(model):
        raise LoraError("cannot prepare an FSDP2-sharded model for hot-swapping: its factors are DTensor shards; "
                        "prepare the model before lorakit.distributed.fully_shard_model")
    for name in names:
        if reg.configs[name].bias != "none":
            raise LoraError(f"adapter {name!r} trains base-model biases (bias={reg.configs[name].bias!r}), which an "
                            "in-place swap does not replace; it cannot be hot-swapped (use lorakit.delete + "
                            "lorakit.load, or adapters with bias='none')")
        if inits.rewrites(reg.configs[name].init):
            raise LoraError(f"adapter {name!r} has init {reg.configs[name].init!r}, which rewrote the base weights; "
                            "it cannot be hot-swapped (save it with convert_to_lora=True and load that on an "
                            "unmodified model)")
    todo = [(path, layer, n) for path, layer in lora_layers(model) for n in names if n in layer.lora_A]
    for path, layer, name in todo:
        if (why := _padding_refused(path, layer, name)) is not None:
            raise LoraError(f"cannot prepare adapter {name!r} for hot-swapping: {why}")
    too_big = {(path, name): layer.rank(name) for path, layer, name in todo if layer.rank(name) > max_rank}
    if too_big:
        (path, name), r = next(iter(too_big.items()))
        raise LoraError(f"adapter {name!r} has rank {r} at {path} (and {len(too_big) - 1} more above max_rank), "
                        f"> max_rank={max_rank}; pass max_rank >= {max(too_big.values())}")
    with torch.no_grad():
        for _, layer, name in todo:
            _pad(layer, name, max_rank)
    return model


def _pad(layer: LoraLayer, name: str, rank: int) -> None:
    """Give adapter ``name`` of ``layer`` factors of rank ``rank``: its own first, zeros after; a tensor scale."""
    r = layer.rank(name)
    a, b = layer.factors(name)
    new_a = a.new_zeros((rank, *a.shape[1:]))
    new_b = b.new_zeros((b.shape[0], rank, *b.shape[2:]))
    new_a[:r], new_b[:, :r] = a, b
    layer.lora_A[name] = nn.Parameter(new_a, requires_grad=layer.lora_A[name].requires_grad)
    layer.lora_B[name] = nn.Parameter(new_b, requires_grad=layer.lora_B[name].requires_grad)
    layer.true_rank[name] = r
    if not isinstance(layer.scale[name], Tensor):
        device = layer.weight.device
        layer.scale[name] = torch.tensor(layer.scale[name], device=device,
                                         dtype=torch.float32 if device.type == "mps" else torch.float64)
    _changed(layer)


def _changed(layer: LoraLayer) -> None:
    """Make :func:`lorakit.mixed`'s caches of ``layer`` stale: they compare scales by value and factors by
    object and version, and a hot-swap keeps the objects (and fills the scale tensor in place)."""
    layer.generation += 1
    layer.__dict__.pop("_bank", None)
    layer.__dict__.pop("_kernel_table", None)


@dataclass(frozen=True)
class _Swap:
    """A checked hot-swap: the file's config and tensors, and per layer the path, layer, rank and scale."""

    cfg: LoraConfig
    tensors: dict[str, Tensor]
    layers: list[tuple[str, LoraLayer, int, float]]


def _plan(model: nn.Module, directory: str | os.PathLike, adapter: str, allow_precision_change: bool) -> _Swap:
    """Every check of a load, then what an in-place swap into the prepared ``adapter`` needs; pure."""
    file = reader.checked(model, directory, adapter, allow_precision_change, fit_existing=False)
    reg, cfg, source = registry(model), file.cfg, Path(directory)
    old = reg.configs[adapter]
    held = {path: layer for path, layer in lora_layers(model) if adapter in layer.lora_A}
    sites = {s.path: s for s in file.sites}
    whole = {path for path, w in saved_modules(model) if adapter in w.adapters()}
    problems = []
    if set(sites) != set(held):
        problems.append(f"it adapts other modules (only in the file: {sorted(set(sites) - set(held))[:6]}, only in "
                        f"the adapter: {sorted(set(held) - set(sites))[:6]})")
    if {e[0] for e in file.saved} != whole:
        problems.append(f"it trains other modules whole (modules_to_save {sorted(e[0] for e in file.saved)}, "
                        f"the adapter's {sorted(whole)})")
    if cfg.bias != "none":
        problems.append(f"it trains base-model biases (bias={cfg.bias!r}), which an in-place swap does not replace")
    if cfg.use_dora != old.use_dora:
        problems.append(f"use_dora is {cfg.use_dora} in the file and {old.use_dora} in the adapter")
    if not problems:
        for path, layer in held.items():
            padded = layer.lora_A[adapter].shape[0]
            if sites[path].r > padded:
                problems.append(f"{path} has rank {sites[path].r} in the file, above the padding to {padded} "
                                f"(prepare with lorakit.prepare_hotswap(model, max_rank={sites[path].r}) or more)")
            if layer.dropout[adapter] != cfg.dropout:
                problems.append(f"{path}: dropout {cfg.dropout} in the file, {layer.dropout[adapter]} in the adapter "
                                "(compiled code depends on it)")
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise LoraError(f"{source} cannot be hot-swapped into adapter {adapter!r}: " + "; ".join(problems[:4]) + more
                        + f"; delete the adapter and load the file (lorakit.delete(model, {adapter!r})) instead")
    return _Swap(cfg, file.tensors, [(p, layer, sites[p].r, sites[p].scale) for p, layer in held.items()])


@torch.no_grad()
def _apply(model: nn.Module, adapter: str, swap: _Swap) -> None:
    """Copy the checked file into the adapter's tensors, in place (nothing here can fail)."""
    for path, layer, r, scale in swap.layers:
        a_key, b_key = fmt.factor_keys(path, layer.kind)
        a, b = layer.lora_A[adapter], layer.lora_B[adapter]
        a[:r].copy_(swap.tensors[a_key])
        a[r:].zero_()
        b[:, :r].copy_(swap.tensors[b_key])
        b[:, r:].zero_()
        layer.scale[adapter].fill_(scale)
        layer.true_rank[adapter] = r
        if adapter in layer.lora_magnitude_vector:
            layer.lora_magnitude_vector[adapter].copy_(swap.tensors[fmt.magnitude_key(path)])
        _changed(layer)
    for path, wrapper in saved_modules(model):
        if adapter in wrapper.adapters():
            prefix = f"{fmt.PREFIX}{path}."
            wrapper.modules_to_save[adapter].load_state_dict(
                {k[len(prefix):]: t for k, t in swap.tensors.items() if k.startswith(prefix)})
    registry(model).configs[adapter] = swap.cfg


def load(model: nn.Module, directory: str | os.PathLike, adapter: str = "default",
         activate: bool = True, allow_precision_change: bool = False) -> nn.Module:
    """Load a PEFT-format adapter from ``directory`` as adapter ``adapter`` and make it active
    (``activate=False``: keep the active set; the loaded adapter stays inactive and frozen).

    If the model has no adapter of that name, one is injected per the saved config (on exactly the
    modules the file holds). If it has one, its tensors are replaced; an adapter prepared by
    :func:`lorakit.prepare_hotswap` is swapped in place (a file of any rank up to its padding, any
    alpha, on the same modules; a compiled model does not recompile). Any mismatch, and any NaN or
    infinite value, raises :class:`LoraError` and leaves the model as it was, as does a lorakit file
    saved from layers quantized otherwise (nf4 / fp4 / int8 / full precision) than the model's, unless
    ``allow_precision_change`` (see :func:`lorakit.quant.check_trained_precision`). Returns ``model``.
    """
    if not is_prepared(model, adapter):
        return reader.load(model, directory, adapter, activate, allow_precision_change)
    swap = _plan(model, directory, adapter, allow_precision_change)
    _apply(model, adapter, swap)
    set_active(model, adapter if activate else registry(model).active)
    return model


def verify(model: nn.Module, directory: str | os.PathLike, adapter: str = "default",
           allow_precision_change: bool = False) -> LoraConfig:
    """Run every check of :func:`load` (config, keys, shapes, dtypes, finite values, base quantization,
    and for a prepared adapter what a hot-swap needs) without changing ``model``; raise
    :class:`LoraError` on the first problem, else return the config that :func:`load` would use."""
    if not is_prepared(model, adapter):
        return reader.verify(model, directory, adapter, allow_precision_change)
    return _plan(model, directory, adapter, allow_precision_change).cfg
