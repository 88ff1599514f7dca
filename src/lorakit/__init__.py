"""lorakit: exact, fast, small LoRA adapters for any PyTorch model.

>>> import lorakit
>>> cfg = lorakit.LoraConfig(r=8, alpha=16, targets=["query", "value"])
>>> lorakit.inject(model, cfg)                       # doctest: +SKIP
"""

from .algebra import CombineReport, combine
from .batching import mixed
from .config import INITS, LoraConfig, LoraError
from .extraction import ExtractReport, extract, spectra
from .hf import save_pretrained
from .io import load, save
from .kinds import Kind, LinearKind, kind_of, register_kind
from . import mha  # noqa: F401  (registers nn.MultiheadAttention's kind)
from .layers import LoraLayer
from .model import (Summary, delete, disabled, inject, lora_layers, merge, merge_and_unload, registry,
                    set_active, summary, unmerge)
from .quant import quantize

__version__ = "0.1.0"

__all__ = ["LoraConfig", "LoraError", "INITS", "LoraLayer", "Summary", "inject", "set_active", "disabled",
           "delete", "merge", "unmerge", "merge_and_unload", "summary", "save", "load", "save_pretrained", "registry",
           "lora_layers", "mixed", "Kind", "LinearKind", "register_kind", "kind_of", "quantize", "combine", "CombineReport",
           "extract", "ExtractReport", "spectra", "__version__"]
