"""Adapter files in PEFT's format: :func:`save` (:mod:`.writer`), :func:`load` and :func:`verify`
(:mod:`.reader`), the format's names and readers (:mod:`.format`), :func:`export_vllm` (:mod:`.vllm`)."""

from .format import CONFIG_NAME, PREFIX, WEIGHTS_NAME, AdapterFile, read_adapter
from .reader import load, verify
from .vllm import VllmExport, export_vllm
from .writer import save

__all__ = ["save", "load", "verify", "export_vllm", "VllmExport", "read_adapter", "AdapterFile", "CONFIG_NAME", "WEIGHTS_NAME", "PREFIX"]
