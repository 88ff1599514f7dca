"""``save_pretrained`` for transformers models with lorakit adapters.

``model.state_dict()`` of an injected model has lorakit's keys (``query.base_layer.weight``,
``query.lora_A.default``), and must keep them: training checkpoints round-trip it. A transformers
checkpoint needs the base model's keys (``query.weight``), or ``from_pretrained`` re-initialises
the adapted weights. So, while a transformers ``PreTrainedModel`` has adapters, its
``save_pretrained`` is :func:`save_pretrained` below: :func:`install_save_pretrained` sets it as an
instance attribute when the model gets its registry, :func:`remove_save_pretrained` removes it when
the last adapter goes (``delete``, ``merge_and_unload``). This module registers both with the core
(:func:`lorakit.state.on_attach` / :func:`~lorakit.state.on_detach`) when it is imported, which
``import lorakit`` does on first use of the API. This attribute is the only one lorakit adds besides
the registry; no forward hooks, and ``state_dict()`` is untouched.

What is written: the base model exactly as before injection (adapters not merged, a merged adapter
taken out, ``modules_to_save`` modules as the original), by transformers' own ``save_pretrained``
(``state_dict=``), and every adapter in PEFT's format in ``<directory>/adapters/<name>/``. Not in
``<directory>`` itself: with an ``adapter_config.json`` next to ``config.json``, transformers'
``from_pretrained`` attaches that adapter through PEFT when PEFT is installed (and not otherwise),
so the same folder would load differently on different machines. ``merged=True`` instead writes
the model with the active adapters merged (what :func:`lorakit.merge_and_unload` would give) and no
adapter folders.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from torch import Tensor, nn

from ..config import LoraError
from ..files import save
from ..layers import LoraLayer, SavedModule
from ..model import merge, unmerge
from ..state import lora_layers, on_attach, on_detach, registry, unwrap
from ..tokens import TokenLayer
from ..variants import rewriting_inits as inits

__all__ = ["save_pretrained", "base_state_dict", "ADAPTERS_DIR"]

#: Sub-folder of a ``save_pretrained`` directory that holds one PEFT-format folder per adapter.
ADAPTERS_DIR = "adapters"


class _SavePretrained:
    """The ``save_pretrained`` attribute of an injected transformers model (see the module doc).

    A callable object rather than a bound method: it pickles and deep-copies with its model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: str | os.PathLike, *args, **kwargs):
        return save_pretrained(self.model, save_directory, *args, **kwargs)

    def __reduce__(self):
        return _SavePretrained, (self.model,)


def install_save_pretrained(root: nn.Module) -> None:
    """Route ``root.save_pretrained`` through lorakit if ``root`` is a transformers model."""
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(root, transformers.PreTrainedModel):
        root.__dict__["save_pretrained"] = _SavePretrained(root)


def remove_save_pretrained(root: nn.Module) -> None:
    """Give ``root`` back its class's ``save_pretrained``."""
    root.__dict__.pop("save_pretrained", None)


def _plain_key(root: nn.Module, key: str, merged: bool) -> str | None:
    """``key`` of ``root.state_dict()`` in the original model's naming, or None for adapter state.

    Each wrapper contributes its base module (``base_layer``); with ``merged``, a SavedModule
    contributes the active adapter's copy instead (what ``merge_and_unload`` leaves)."""
    parts, out, module, i = key.split("."), [], root, 0
    while i < len(parts):
        if isinstance(module, (LoraLayer, SavedModule, TokenLayer)):
            keep = ["base_layer"]
            if merged and isinstance(module, SavedModule) and module.active:
                keep = ["modules_to_save", module.active[0]]
            if parts[i:i + len(keep)] == keep:
                module, i = module.get_submodule(".".join(keep)), i + len(keep)
                continue
            if parts[i] in ("lora_A", "lora_B", "lora_magnitude_vector", "lora_bias", "modules_to_save", "base_layer",
                            "trainable_tokens_delta"):
                return None  # an adapter's factors or copy (or, merged, the unused original)
            raise LoraError(f"state_dict key {key!r} is not a key of this model with adapters "
                            f"(expected '{'.'.join(out)}.base_layer.…' or adapter state)")
        out.append(parts[i])
        module = module._modules.get(parts[i]) if module is not None else None
        i += 1
    return ".".join(out)


def base_state_dict(model: nn.Module, state_dict: dict[str, Tensor] | None = None,
                    merged: bool = False) -> dict[str, Tensor]:
    """The state of the model without adapters, in the original model's keys (no copies made).

    ``state_dict``: the model's own ``state_dict()`` (lorakit keys) by default. A weight into which
    adapters are merged is given as it was before the merge (from ``merge``'s exact copy; after
    ``merge(keep_copy=False)`` there is none, and this raises); a weight a PiSSA/OLoRA init replaced
by its residual is given as the original, W_res + s₀·B₀·A₀
    (:func:`lorakit.variants.rewriting_inits.original`). ``merged=True``: the state that
    :func:`lorakit.merge_and_unload` would leave, for a model whose active adapters are merged."""
    root = unwrap(model)
    state = root.state_dict() if state_dict is None else state_dict
    plain = {k2: v for k, v in state.items() if (k2 := _plain_key(root, k, merged)) is not None}
    if not merged:
        for path, layer in lora_layers(root):
            key = f"{path}.{layer.param_name}"
            if layer.merged:
                if layer._original is None:
                    raise LoraError(f"{path}: adapters {list(layer.merged)} are merged without an exact copy "
                                    "(merge(keep_copy=False)); unmerge first, or save with merged=True")
                plain[key] = layer._original
            if key in plain:  # a PiSSA/OLoRA residual: the weight before injection
                plain[key] = inits.original(layer, plain[key])
    return plain


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *args, merged: bool = False,
                    state_dict: dict[str, Tensor] | None = None, **kwargs) -> None:
    """transformers' ``save_pretrained`` for a model with lorakit adapters.

    Writes the base model (``from_pretrained`` loads it with no missing or unexpected keys) and
    every adapter in PEFT's format in ``<save_directory>/adapters/<name>/``; load one with
    ``lorakit.load(model, save_directory + "/adapters/<name>")`` or PEFT's ``PeftModel.from_pretrained``.
    ``merged=True``: write the model with the active adapters merged into its weights, and no
    adapters. Other arguments go to transformers' ``save_pretrained`` (``push_to_hub`` is refused:
    save, then upload the folder).
    """
    root = unwrap(model)
    reg = registry(root)
    if kwargs.get("push_to_hub"):
        raise LoraError("save_pretrained(push_to_hub=True) is not supported for a model with lorakit adapters "
                        "(the adapters' folders would not be uploaded); save, then upload the folder")
    write = type(root).save_pretrained
    if not merged:
        write(root, save_directory, *args, state_dict=base_state_dict(root, state_dict), **kwargs)
        if kwargs.get("is_main_process", True):
            for name in reg.configs:
                save(root, Path(save_directory) / ADAPTERS_DIR / name, adapter=name)
        return
    if state_dict is not None:
        raise LoraError("save_pretrained(merged=True) computes the merged weights itself; do not pass state_dict")
    if not reg.active:
        raise LoraError(f"save_pretrained(merged=True): no active adapter to merge; adapters: {sorted(reg.configs)}")
    ours = not reg.merged
    if ours:
        merge(root)  # exact: unmerge below restores every weight bit for bit
    try:
        write(root, save_directory, *args, state_dict=base_state_dict(root, merged=True), **kwargs)
    finally:
        if ours:
            unmerge(root)


on_attach(install_save_pretrained)
on_detach(remove_save_pretrained)
