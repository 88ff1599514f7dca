"""Model-level API, the mutations: inject adapters in place, activate, merge, delete and unload.

The record of a model's adapters is its :class:`~lorakit.state.Registry` (read-only queries in
:mod:`lorakit.state`); the :class:`~lorakit.layers.LoraLayer` modules hold the weights and a copy of
the active set for their forward. Every function here plans and checks first (:mod:`lorakit.targets`)
and changes the model only when nothing can fail any more. The model's class, forward and
``state_dict`` keys stay the user's; besides the wrappers and the registry the only thing set on a
model is what an integration adds when the registry is created (:func:`lorakit.state.on_attach`: a
transformers model's ``save_pretrained``). No forward hooks. Process-wide state exists only for mixed
batches: :mod:`lorakit.routing`'s flag and context variable, and :func:`lorakit.mixed` wraps a
transformers model class's ``_expand_inputs_for_generation`` once to observe generate's row
expansion (it only calls the original outside a ``mixed`` block).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import LoraConfig, LoraError, check_name
from .kinds import kind_of
from .layers import LoraLayer, SavedModule
from .sharding import is_sharded
from .state import (
    Registry,
    attach_registry,
    detach_registry,
    lora_layers,
    registry,
    registry_of,
    saved_modules,
    token_layers,
    unwrap,
    wrappers,
)
from .targets import Site, TokenSite, check_rewriting_inits, plan, plan_biases, plan_saved, plan_tokens
from .tokens import TokenLayer
from .variants import rewriting_inits as inits

__all__ = ["inject", "set_active", "disabled", "delete", "merge", "unmerge", "merge_and_unload", "summary",
           "Summary", "apply_plan", "require_unmerged", "check_names", "dequantize", "restore_quantized", "Registry",
           "registry", "lora_layers", "saved_modules", "wrappers", "unwrap"]


def require_unmerged(reg: Registry, action: str) -> None:
    if reg.merged:
        raise LoraError(f"cannot {action} while adapters {list(reg.merged)} are merged into the weights; "
                        "call lorakit.unmerge(model) first")


def check_names(reg: Registry, names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in reg.configs]
    if unknown:
        raise LoraError(f"unknown adapter(s) {unknown}; the model has: {sorted(reg.configs)}")


def apply_plan(model: nn.Module, name: str, cfg: LoraConfig, sites: list[Site], saved: list[tuple],
               activate: bool = True, tokens: Sequence[TokenSite] = (),
               biases: Mapping[str, nn.Parameter] | None = None) -> None:
    """Wrap (or reuse) a LoraLayer at every site and a SavedModule at every ``saved`` entry,
    add adapter ``name`` to them, record the base ``biases`` it trains (``{path: bias}``, from
    :func:`lorakit.targets.plan_biases`) with a copy of their values, then make it the active
    adapter (or leave it inactive, frozen).
    The mutating half of :func:`inject`, :func:`lorakit.files.load` and :func:`lorakit.combine`,
    which plan and check first."""
    root = unwrap(model)
    reg = registry_of(root)
    if reg is None:
        reg = attach_registry(root)
        for p in root.parameters():
            p.requires_grad_(False)
    for site in sites:
        layer = site.layer
        if layer is None:
            layer = LoraLayer(site.module, site.kind, site.param)
            setattr(site.parent, site.attr, layer)
        layer.add(name, site.r, site.scale, cfg.dropout, cfg.init, dora=cfg.use_dora, bias=cfg.lora_bias)
    for path, module, parent, attr, wrapper in saved:
        if wrapper is None:
            wrapper = SavedModule(module)
            setattr(parent, attr, wrapper)
        wrapper.add(name)
    made: dict[str, TokenLayer] = {}
    for t in tokens:  # owners before tied heads (plan_tokens' order)
        layer = t.layer
        if layer is None:
            layer = made[t.path] = TokenLayer(t.module, made.get(t.tied) or _token_layer(root, t.tied))
            setattr(t.parent, t.attr, layer)
        layer.add(name, t.indices)
    if biases:
        reg.biases[name] = {path: (b, b.detach().clone()) for path, b in biases.items()}
    reg.configs[name] = cfg
    reg.paths[name] = tuple(s.path for s in sites) + tuple(e[0] for e in saved) + tuple(t.path for t in tokens)
    set_active(root, name if activate else reg.active)


def _token_layer(root: nn.Module, path: str | None) -> TokenLayer | None:
    return None if path is None else dict(token_layers(root)).get(path)


def inject(model: nn.Module, config: LoraConfig, adapter: str = "default", activate: bool = True) -> nn.Module:
    """Add adapter ``adapter`` to ``model`` in place and make it the active one (``activate=False``:
    add it inactive and frozen, keeping the active set).

    The base model is frozen (requires_grad=False); the new adapter's factors are trainable, and
    with ``config.bias`` the base biases it trains (a copy of their values is kept: :func:`delete`
    restores them, :func:`disabled` runs them).
    Calling again with another name adds a second adapter. Returns ``model``.
    All targets are resolved before anything changes, so an error leaves the model untouched.
    """
    check_name(adapter)
    reg = registry_of(model)
    if reg is not None:
        if adapter in reg.configs:
            raise LoraError(f"adapter {adapter!r} already exists; delete it first or pick another name "
                            f"(existing: {sorted(reg.configs)})")
        require_unmerged(reg, "add an adapter")
    sites = plan(unwrap(model), config)
    check_rewriting_inits(unwrap(model), config, adapter, sites)
    tokens, saved = plan_tokens(unwrap(model), config), plan_saved(unwrap(model), config)
    biases = plan_biases(unwrap(model), config, adapter, sites, saved, tokens, reg.biases if reg else None)
    apply_plan(model, adapter, config, sites, saved, activate, tokens, biases)
    return model


def set_active(model: nn.Module, adapters: str | Sequence[str]) -> None:
    """Make ``adapters`` (one name or several) the active set; their updates add up.

    Active adapters are trainable, inactive ones are frozen, as are the base biases they train
    (``LoraConfig.bias``; their values stay in the model either way, one value per bias). A DoRA adapter must be the only active
    one on each of its layers (:class:`LoraError` otherwise, before anything changes).
    """
    names = (adapters,) if isinstance(adapters, str) else tuple(dict.fromkeys(adapters))
    reg = registry(model)
    check_names(reg, names)
    require_unmerged(reg, "change the active adapters")
    for path, layer in lora_layers(model):
        layer.check_active(names, path)
    reg.active = names
    for _, wrapper in wrappers(model):
        wrapper.set_active(names)
    for name, held in reg.biases.items():
        for b, _ in held.values():
            b.requires_grad_(name in names)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the block; adapters (and a merge) are restored on exit, always.

    Where a PiSSA/OLoRA adapter rewrote W (:mod:`lorakit.variants.rewriting_inits`), the base is the residual
    W − s₀·B₀·A₀, as in PEFT, not the original model: a warning says so. Base biases trained by an
    adapter (``LoraConfig.bias``) count as part of it: the original values run inside the block (the
    trained parameters are set aside, untouched), and PEFT's ``disable_adapter`` keeps the trained ones."""
    reg = registry(model)
    rewriting = sorted({n for _, layer in lora_layers(model) for n in inits.rewritten(layer)}
                       if any(inits.rewrites(c.init) for c in reg.configs.values()) else ())  # (only their layers)
    if rewriting:
        warnings.warn(f"lorakit.disabled: adapters {rewriting} replaced their layers' weights by the residual "
                      "W - s*B0*A0 (pissa/olora init), so the disabled model is the residual model, not the "
                      "original one (as in PEFT)", stacklevel=3)
    merged, active = reg.merged, reg.active
    layers = [w for _, w in wrappers(model)]
    keep_copy = all(w._original is not None for w in layers if isinstance(w, LoraLayer) and w.merged)
    if merged:
        unmerge(model)
    saved = [layer.active for layer in layers]
    originals = {id(b): original for held in reg.biases.values() for b, original in held.values()}
    biased = [(m, b) for m in unwrap(model).modules() if id(b := m._parameters.get("bias")) in originals]
    try:
        for layer in layers:
            layer.active = ()
        reg.active = ()
        for m, b in biased:  # swapped, not written in place: autograd graphs that saved b stay valid
            m._parameters["bias"] = nn.Parameter(originals[id(b)], requires_grad=False)
        yield model
    finally:
        for m, b in biased:
            m._parameters["bias"] = b
        for layer, act in zip(layers, saved):
            layer.active = act
        reg.active = active
        if merged:
            merge(model, keep_copy=keep_copy)


def delete(model: nn.Module, adapter: str) -> None:
    """Remove adapter ``adapter``; modules left without adapters get their original module back, and
    the base biases it trained (``LoraConfig.bias``) their original values."""
    reg = registry(model)
    check_names(reg, [adapter])
    require_unmerged(reg, "delete an adapter")
    _restore_biases(reg, adapter)
    for path, wrapper in list(wrappers(model)):
        if adapter in wrapper.adapters():
            wrapper.remove(adapter)
            if not wrapper.adapters():
                _replace(unwrap(model), path, wrapper.base_layer)
    del reg.configs[adapter], reg.paths[adapter]
    reg.active = tuple(n for n in reg.active if n != adapter)
    if not reg.configs:
        _unload(model)


def _restore_biases(reg: Registry, adapter: str) -> None:
    """Write back the original values of the base biases ``adapter`` trained, frozen, and forget them."""
    with torch.no_grad():
        for b, original in reg.biases.pop(adapter, {}).values():
            b.copy_(original)
            b.requires_grad_(False)


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent = root
    for attr in path.split(".")[:-1]:
        parent = getattr(parent, attr)
        parent = parent.base_layer if isinstance(parent, (LoraLayer, SavedModule)) else parent
    setattr(parent, path.rsplit(".", 1)[-1], new)


def _tied(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, p in unwrap(model).named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return owners


def _refuse_sharded(model: nn.Module, what: str) -> None:
    """Raise :class:`LoraError` if ``model`` is sharded by FSDP2: merging would write ΔW into DTensor
    shards behind FSDP's back, and unloading would take its units apart."""
    if is_sharded(model):
        raise LoraError(f"cannot {what} a model sharded with FSDP2 (its weights are DTensor shards); nothing "
                        "was changed. Save the adapter (lorakit.save, called on every rank, gathers it), load it "
                        "into an unsharded copy of the base model and merge there")


def merge(model: nn.Module, keep_copy: bool = True, *, exact: bool | None = None) -> None:
    """Merge the active adapters into the base weights; forward then costs what the base costs.

    Every merged weight is W + ΣΔW rounded once, whatever ``keep_copy`` says. With ``keep_copy=True``
    (default) each weight is copied first, so :func:`unmerge` restores it bit for bit (memory: one
    extra copy of every adapted weight while merged); ``keep_copy=False`` skips the copy and
    unmerges by subtraction, which drifts by rounding errors. ``exact=`` is the deprecated name of
    ``keep_copy`` (it named the copy, not the merge's exactness). Merging twice is an error, as is
    merging a weight tied to another module.
    """
    if exact is not None:
        warnings.warn("lorakit.merge(exact=...) is deprecated; use keep_copy=... (the same meaning: keep a "
                      "copy of each weight for a bit-exact unmerge)", DeprecationWarning, stacklevel=2)
        keep_copy = exact
    _refuse_sharded(model, "merge")
    reg = registry(model)
    if reg.merged:
        raise LoraError(f"adapters {list(reg.merged)} are already merged; unmerge first")
    if not reg.active:
        raise LoraError(f"no active adapter to merge; adapters: {sorted(reg.configs)}")
    owners = _tied(model)
    layers = [(path, layer) for path, layer in lora_layers(model) if layer.active]
    for path, layer in layers:
        layer.kind.check_merge(layer.base_layer, path)
        if parametrize.is_parametrized(layer.base_layer, layer.param_name):
            raise LoraError(f"cannot merge into {path}.{layer.param_name}: a parametrization was registered on "
                            "it after inject; W + ΔW cannot be written back exactly through one (remove it "
                            "with torch.nn.utils.parametrize.remove_parametrizations, or keep the adapter unmerged)")
        biased = [n for n in layer.active if n in layer.lora_bias]
        if biased and getattr(layer.base_layer, "bias", None) is None:
            raise LoraError(f"cannot merge adapter(s) {biased} into {path}: they have a lora_bias and the base layer "
                            "has no bias to add it to (PEFT refuses this merge too); keep the adapter unmerged")
        names = owners[id(layer.weight)]
        if len(names) > 1:
            names = [n.replace(".base_layer", "") for n in names]
            raise LoraError(f"cannot merge into {path}.{layer.param_name}: the weight is shared by {names} "
                            "(merging would change all of them); keep this adapter unmerged")
    for path, layer in layers:
        for name in layer.active:
            factors = (("lora_A", layer.lora_A[name]), ("lora_B", layer.lora_B[name]),
                       ("lora_magnitude_vector", layer.lora_magnitude_vector.get(name)),
                       ("lora_bias", layer.lora_bias.get(name)))
            for key, t in ((k, t) for k, t in factors if t is not None):
                if not torch.isfinite(t).all():
                    raise LoraError(f"cannot merge adapter {name!r}: {path}.{key}.{name} holds NaN or inf "
                                    "values; nothing was merged")
    done = []
    try:
        for _, layer in layers + [(p, t) for p, t in token_layers(model) if t.active]:  # tokens: rows written, kept
            layer.merge(layer.active, keep_copy=keep_copy)
            done.append(layer)
    except LoraError:
        for layer in done:  # all or nothing (bit-exact after an exact merge)
            layer.unmerge()
        raise
    reg.merged = reg.active


def unmerge(model: nn.Module) -> None:
    """Take merged adapters out of the base weights (bit-exact after an exact merge)."""
    reg = registry(model)
    if not reg.merged:
        raise LoraError("nothing is merged")
    for _, layer in lora_layers(model):
        layer.unmerge()
    for _, layer in token_layers(model):
        layer.unmerge()
    reg.merged = ()


def _unload(model: nn.Module) -> None:
    root = unwrap(model)
    for path, wrapper in list(wrappers(root)):
        _replace(root, path, wrapper.current() if isinstance(wrapper, SavedModule) else wrapper.base_layer)
    reg = detach_registry(root)
    for p, flag in reg.frozen:
        p.requires_grad_(flag)


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace every layer whose weight is stored packed (a quantized layer: its kind's
    :meth:`~lorakit.kinds.Kind.dequantized`) by the full-precision module its kind gives, in place, also
    under lorakit adapters (which then become ordinary adapters of that module's kind).

    Returns what was replaced, ``(parent, attr, quantized module)``, for :func:`restore_quantized`.
    Every module is converted before anything is replaced."""
    root = unwrap(model)
    found = [(parent, attr, child) for parent in root.modules() for attr, child in parent.named_children()
             if kind_of(child) is not None and not isinstance(child, (LoraLayer, SavedModule))]
    plain = [kind_of(child).dequantized(child, dtype) for *_, child in found]
    found = [f for f, p in zip(found, plain) if p is not None]
    plain = [p for p in plain if p is not None]
    for (parent, attr, _), module in zip(found, plain):
        setattr(parent, attr, module)
        if isinstance(parent, LoraLayer):
            parent.kind = kind_of(module)
    return found


def restore_quantized(replaced: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Put back the packed layers that :func:`dequantize` replaced."""
    for parent, attr, child in replaced:
        setattr(parent, attr, child)
        if isinstance(parent, LoraLayer):
            parent.kind = kind_of(child)


_dequantize = dequantize  # merge_and_unload's argument has the function's name


def merge_and_unload(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Merge the active adapters (if any, and not yet merged) and remove every lorakit module.

    The result is the user's own model class with the original state_dict keys, the adapters'
    updates in its weights and the parameters' original ``requires_grad`` flags. A quantized
    (bitsandbytes) base cannot take ΔW: ``dequantize=True`` first replaces every quantized layer
    by an ``nn.Linear`` holding its dequantized weight W_deq, so the result is a full-precision
    model with W_deq + ΔW rounded once (see :mod:`lorakit.quant`). Base biases trained by the merged
    adapters (``LoraConfig.bias``) keep their trained values; those of the other adapters get their
    original values back, as :func:`delete` does.
    """
    _refuse_sharded(model, "merge_and_unload")
    reg = registry(model)
    replaced = _dequantize(model) if dequantize else []
    try:
        if reg.active and not reg.merged:
            merge(model, keep_copy=False)
    except LoraError:
        restore_quantized(replaced)  # all or nothing: the quantized layers go back
        raise
    for name in [n for n in reg.biases if n not in reg.merged]:
        _restore_biases(reg, name)
    _unload(model)
    return model


@dataclass(frozen=True)
class Summary:
    """Parameter counts and per-module ranks of a model with adapters."""

    trainable: int
    total: int
    active: tuple[str, ...]
    merged: tuple[str, ...]
    modules: dict[str, dict[str, int]]  # path -> {adapter: rank}
    saved: dict[str, list[str]] = field(default_factory=dict)  # path -> adapters with a full copy

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        lines = [f"trainable params: {self.trainable:,} / {self.total:,} ({pct:.4f}%)",
                 f"active: {list(self.active)}" + (f", merged: {list(self.merged)}" if self.merged else "")]
        lines += [f"  {path}: " + ", ".join(f"{a} r={r}" for a, r in ranks.items())
                  for path, ranks in self.modules.items()]
        lines += [f"  {path}: trained whole with {', '.join(names)}" for path, names in self.saved.items()]
        return "\n".join(lines)


def summary(model: nn.Module) -> Summary:
    """Trainable/total parameters, adapters and per-module ranks (print it for a table)."""
    reg = registry(model)
    params = list(unwrap(model).parameters())
    modules = {path: {n: layer.rank(n) for n in layer.lora_A} for path, layer in lora_layers(model)}
    saved = {path: w.adapters() for path, w in saved_modules(model)}
    return Summary(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params),
                   reg.active, reg.merged, modules, saved)
