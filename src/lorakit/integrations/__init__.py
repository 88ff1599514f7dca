"""Integrations with other libraries, each registering itself with the core when imported:
:mod:`.transformers` (``save_pretrained`` of a model with adapters)."""

from . import transformers  # noqa: F401  (registers its hooks in lorakit.state)
