"""Adapter files in PEFT's format: :func:`save` (:mod:`.writer`), :func:`load` and :func:`verify`
(:mod:`.reader`), the format's names and readers (:mod:`.format`)."""

from .format import CONFIG_NAME, PREFIX, WEIGHTS_NAME, AdapterFile, read_adapter
from .reader import load, verify
from .writer import save

__all__ = ["save", "load", "verify", "read_adapter", "AdapterFile", "CONFIG_NAME", "WEIGHTS_NAME", "PREFIX"]
