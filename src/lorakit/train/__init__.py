"""Training: a small deterministic loop (:mod:`.loop`), strict data reading (:mod:`.data`) and the
ready-made tasks behind ``lorakit train`` (:mod:`.tasks`).

``TrainConfig`` and ``fit`` are loaded from :mod:`.loop` on first use (PEP 562), so reading data with
:mod:`lorakit.train.data` does not import torch (``lorakit train`` checks its data files at once)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["TrainConfig", "fit"]

if TYPE_CHECKING:
    from .loop import TrainConfig, fit


def __getattr__(name: str) -> Any:
    if name in __all__:
        value = getattr(importlib.import_module(".loop", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
