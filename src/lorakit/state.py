"""A model's adapters, read-only: its :class:`Registry` and walks over its lorakit modules.

The registry is the single record of which adapters a model has, their configs, which are active
and whether they are merged; it lives in the model's ``__dict__`` under :data:`REGISTRY_ATTR` and
is reached only through :func:`registry` / :func:`registry_of` (through ``torch.compile``'s wrapper
too: :func:`unwrap`). Mutations are :mod:`lorakit.model`'s; this module only reads, plus the two
calls that create and remove the registry (:func:`attach_registry`, :func:`detach_registry`).

Integrations plug in here: a function added with :func:`on_attach` / :func:`on_detach` runs when a
model gets its first adapter / loses its last (the transformers integration,
:mod:`lorakit.integrations.transformers`, routes ``save_pretrained`` this way). The core knows nothing
of who registered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

from torch import nn

from .config import LoraConfig, LoraError
from .layers import LoraLayer, SavedModule
from .tokens import TokenLayer

__all__ = ["Registry", "REGISTRY_ATTR", "Wrapper", "unwrap", "registry", "registry_of", "has_adapters",
           "attach_registry", "detach_registry", "on_attach", "on_detach", "walk", "wrappers", "lora_layers",
           "saved_modules", "token_layers"]

#: The attribute of a model's ``__dict__`` that holds its :class:`Registry`.
REGISTRY_ATTR = "lorakit_registry"

Wrapper = LoraLayer | SavedModule | TokenLayer

_ON_ATTACH: list[Callable[[nn.Module], None]] = []
_ON_DETACH: list[Callable[[nn.Module], None]] = []


@dataclass
class Registry:
    """What adapters a model has. ``paths[name]`` lists the modules adapter ``name`` is on."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    paths: dict[str, tuple[str, ...]] = field(default_factory=dict)
    active: tuple[str, ...] = ()
    merged: tuple[str, ...] = ()
    frozen: list = field(default_factory=list, repr=False)  # (param, requires_grad before inject), restored on unload
    #: ``biases[name]``: ``{module path: (its base bias, a copy of the original value)}`` of the base-model
    #: biases adapter ``name`` trains (``LoraConfig.bias``); a bias belongs to one adapter at most.
    biases: dict[str, dict[str, tuple]] = field(default_factory=dict, repr=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself, seen through ``torch.compile``'s wrapper (``OptimizedModule._orig_mod``)."""
    return getattr(model, "_orig_mod", model)


def registry_of(model: nn.Module) -> Registry | None:
    """The model's registry, or None if it has no lorakit adapters."""
    return unwrap(model).__dict__.get(REGISTRY_ATTR)


def has_adapters(model: nn.Module) -> bool:
    return registry_of(model) is not None


def registry(model: nn.Module) -> Registry:
    """The model's adapter registry; raises if the model has no lorakit adapters."""
    reg = registry_of(model)
    if reg is None:
        raise LoraError("this model has no lorakit adapters; call lorakit.inject(model, config) first")
    return reg


def on_attach(fn: Callable[[nn.Module], None]) -> None:
    """Call ``fn(model)`` whenever a model gets its registry (its first adapter)."""
    if fn not in _ON_ATTACH:
        _ON_ATTACH.append(fn)


def on_detach(fn: Callable[[nn.Module], None]) -> None:
    """Call ``fn(model)`` whenever a model loses its registry (its last adapter)."""
    if fn not in _ON_DETACH:
        _ON_DETACH.append(fn)


def attach_registry(model: nn.Module) -> Registry:
    """Give ``model`` an empty registry (recording its parameters' ``requires_grad``) and run the
    :func:`on_attach` functions; the caller freezes the base."""
    root = unwrap(model)
    reg = Registry(frozen=[(p, p.requires_grad) for p in root.parameters()])
    root.__dict__[REGISTRY_ATTR] = reg
    for fn in _ON_ATTACH:
        fn(root)
    return reg


def detach_registry(model: nn.Module) -> Registry:
    """Remove ``model``'s registry, run the :func:`on_detach` functions, and return the registry."""
    root = unwrap(model)
    reg = root.__dict__.pop(REGISTRY_ATTR)
    for fn in _ON_DETACH:
        fn(root)
    return reg


def walk(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module, str, Wrapper | None]]:
    """Yield ``(path, module, parent, attr, wrapper)`` for every submodule, in the original
    model's naming: a wrapper (:class:`LoraLayer`, :class:`SavedModule`) at ``path`` is reported
    as its base module, and the adapters' own containers are skipped."""

    def rec(module: nn.Module, prefix: str):
        for attr, child in module.named_children():
            path = f"{prefix}.{attr}" if prefix else attr
            if isinstance(child, (LoraLayer, SavedModule, TokenLayer)):
                yield path, child.base_layer, module, attr, child
                yield from rec(child.base_layer, path)
            else:
                yield path, child, module, attr, None
                yield from rec(child, path)

    yield from rec(model, "")


def wrappers(model: nn.Module) -> Iterator[tuple[str, Wrapper]]:
    """``(path, wrapper)`` for every LoraLayer and SavedModule, in the original model's naming."""
    for path, _, _, _, wrapper in walk(unwrap(model)):
        if wrapper is not None:
            yield path, wrapper


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """``(path, layer)`` for every LoraLayer, with paths in the original model's naming."""
    return ((p, w) for p, w in wrappers(model) if isinstance(w, LoraLayer))


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    """``(path, wrapper)`` for every module saved whole with an adapter (modules_to_save)."""
    return ((p, w) for p, w in wrappers(model) if isinstance(w, SavedModule))


def token_layers(model: nn.Module) -> Iterator[tuple[str, TokenLayer]]:
    """``(path, layer)`` for every layer with trainable tokens (:mod:`lorakit.tokens`)."""
    return ((p, w) for p, w in wrappers(model) if isinstance(w, TokenLayer))
