"""lorakit: exact, fast, small LoRA adapters for any PyTorch model.

>>> import lorakit
>>> cfg = lorakit.LoraConfig(r=8, alpha=16, targets=["query", "value"])
>>> lorakit.inject(model, cfg)                       # doctest: +SKIP

Importing the package is cheap (it does not import torch, so ``lorakit --help`` answers at once): the
names below are loaded from :mod:`lorakit.api` on first use (PEP 562). ``lorakit.<submodule>``
(``lorakit.quant``, ``lorakit.distributed``, ...) are ordinary submodules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("lorakit")  # pyproject.toml's, the one source of the version
except PackageNotFoundError:  # a source tree on sys.path that is not installed
    __version__ = "0+unknown"

__all__ = ["LoraConfig", "LoraError", "INITS", "LoraLayer", "Summary", "inject", "set_active", "disabled",
           "delete", "merge", "unmerge", "merge_and_unload", "summary", "save", "load", "verify", "save_pretrained",
           "registry", "lora_layers", "mixed", "Kind", "LinearKind", "register_kind", "kind_of", "quantize", "combine",
           "CombineReport", "extract", "ExtractReport", "spectra", "prepare_hotswap", "export_vllm", "VllmExport",
           "__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs: the names as lorakit.api defines them
    from .api import *  # noqa: F403


#: Submodules reachable as ``lorakit.<name>`` without importing them first (as an eager package would allow).
_SUBMODULES = ("api", "batching", "builtin", "config", "distributed", "files", "hotswap", "integrations", "kinds",
               "layers", "model", "ops", "pretrained", "quant", "routing", "serve", "sharding", "state", "targets", "tokens",
               "train", "variants")


def __getattr__(name: str) -> Any:
    if name in __all__:
        value = getattr(importlib.import_module(".api", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # the import sets the attribute
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
