"""lorakit's public API in one module: every name of ``lorakit.__all__``.

``import lorakit`` is cheap (no torch): its names resolve through this module on first use, and
importing it also loads the integrations (:mod:`lorakit.integrations`), which register themselves with
the core. Code inside lorakit above the core (train, serve, cli) imports from here too.
"""

from . import integrations  # noqa: F401  (registers transformers' save_pretrained with the core)
from .batching import mixed
from .config import INITS, LoraConfig, LoraError
from .files import VllmExport, export_vllm, save
from .hotswap import load, prepare_hotswap, verify
from .integrations.transformers import save_pretrained
from .kinds import Kind, LinearKind, kind_of, register_kind
from .layers import LoraLayer
from .model import (
                    Summary,
                    delete,
                    disabled,
                    inject,
                    lora_layers,
                    merge,
                    merge_and_unload,
                    registry,
                    set_active,
                    summary,
                    unmerge,
)
from .ops.algebra import CombineReport, combine
from .ops.extraction import ExtractReport, extract, spectra
from .quant import quantize

__all__ = ["LoraConfig", "LoraError", "INITS", "LoraLayer", "Summary", "inject", "set_active", "disabled",
           "delete", "merge", "unmerge", "merge_and_unload", "summary", "save", "load", "verify", "save_pretrained",
           "registry", "lora_layers", "mixed", "Kind", "LinearKind", "register_kind", "kind_of", "quantize", "combine",
           "CombineReport", "extract", "ExtractReport", "spectra", "prepare_hotswap", "export_vllm",
           "VllmExport"]
