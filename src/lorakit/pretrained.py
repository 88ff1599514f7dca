"""Base models by name: ``builtin:minilm``, ``builtin:smollm2``, ``builtin:gemma3`` (embedded, offline)
or a local Hugging Face folder, loaded with their tokenizer. Used by training (:mod:`lorakit.train`), serving
(:mod:`lorakit.serve`) and the command line alike.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from . import builtin

__all__ = ["load_model", "model_path"]


BUILTIN = {"builtin:minilm": builtin.minilm_path, "builtin:smollm2": builtin.smollm2_path,
           "builtin:gemma3": builtin.gemma3_path}


def model_path(spec: str) -> Path:
    """The folder of a ``BUILTIN`` model (``builtin:minilm``, ``builtin:smollm2``, ``builtin:gemma3``) or
    a local Hugging Face model folder."""
    path = BUILTIN.get(spec)
    path = Path(path() if path else spec)
    if not path.is_dir():
        raise FileNotFoundError(f"model {spec!r}: not a folder; use {', '.join(BUILTIN)} or a "
                                "local Hugging Face model folder")
    return path


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report and progress bars (lorakit says what matters in one line)."""
    from transformers.utils import logging as hf_logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(spec: str, task: str, num_labels: int = 0, dtype: torch.dtype = torch.float32, log=None,
               quantize: str | None = None):
    """``(model, tokenizer)`` from a ``BUILTIN`` model or a local HF folder;
    ``quantize`` ("nf4", "fp4", "int8"): every linear layer but the head quantized (:func:`lorakit.quantize`).

    transformers' load report is replaced by one line to ``log`` (if given) naming the weights the
    checkpoint lacks (a new classification head) and those of the checkpoint the model does not use.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    path = model_path(spec)
    with _quiet_transformers():
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if task == "classify":
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, local_files_only=True, dtype=dtype, output_loading_info=True)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype,
                                                               output_loading_info=True)
    missing, unused = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    if log and missing:
        log(f"new weights (not in {spec}, initialised from the seed, trained with the adapter): {', '.join(missing)}")
    if log and unused:
        log(f"weights of {spec} that this model does not use: {', '.join(unused)}")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if quantize:
        from .quant import quantize as quantize_model
        quantize_model(model, quantize)
    return model, tok
