"""Training: a small deterministic loop (:mod:`.loop`), strict data reading (:mod:`.data`) and the
ready-made tasks behind ``lorakit train`` (:mod:`.tasks`)."""

from .loop import TrainConfig, fit

__all__ = ["TrainConfig", "fit"]
