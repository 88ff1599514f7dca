"""Base models by name: ``builtin:minilm``, ``builtin:smollm2``, ``builtin:gemma3`` (embedded, offline)
or a local Hugging Face folder, loaded with their tokenizer. Used by training (:mod:`lorakit.train`), serving
(:mod:`lorakit.serve`) and the command line alike.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import builtin
from .config import LoraError
from .targets import matcher

__all__ = ["load_model", "model_path", "load_tuned_pair", "TunedPair"]


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


# -- lorakit extract: the base and the fine-tune, loaded as one class --------------------------------
@dataclass(frozen=True)
class TunedPair:
    """What :func:`load_tuned_pair` loaded: both models, the modules to copy whole, the task record."""

    base: nn.Module
    tuned: nn.Module
    modules_to_save: list[str]
    record: dict  # lorakit_task.json: task (when known), architecture, model, labels


def _architecture(folder: Path) -> type:
    """The transformers class named by ``folder/config.json``'s ``architectures`` (never code from a file)."""
    import transformers
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder}: no config.json; --tuned must be a Hugging Face model folder")
    names = json.loads(config.read_text()).get("architectures") or []
    cls = getattr(transformers, names[0], None) if names and isinstance(names[0], str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise LoraError(f"{config}: architectures {names} names no transformers model class; "
                        "pass --task causal-lm or --task classify")
    return cls


def _task_of(cls: type) -> str | None:
    """``causal-lm`` / ``classify`` for transformers' causal-LM / sequence-classification classes, else None."""
    from transformers.models.auto import modeling_auto as auto
    if cls.__name__ in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return "causal-lm"
    if cls.__name__ in auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values():
        return "classify"
    return None


def _covered(key: str, patterns: Sequence[str]) -> bool:
    """Whether weight ``key`` belongs to a module matched by one of ``patterns`` (modules_to_save)."""
    parts = key.split(".")[:-1]
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(matcher(s)(p) for s in patterns for p in prefixes)


def load_tuned_pair(base: str, tuned: str, task: str | None = None, modules_to_save: Sequence[str] | None = None,
                    log=None) -> TunedPair:
    """The models ``lorakit extract`` compares, both as one class: the tuned folder's own architecture
    (its config.json's ``architectures``), or ``task``'s auto class ("causal-lm", "classify").

    Refused (LoraError, before anything is extracted): a class that would initialise weights the
    tuned folder does not hold (they are named: its fine-tune would be replaced by random weights),
    and base weights the class needs that the base folder lacks, unless ``modules_to_save`` (default
    for a classifier: its ``classifier`` / ``score`` head) copies them whole from the tuned model.
    Weights of the tuned folder the class does not use are reported through ``log``.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    tuned_path = model_path(tuned)
    config = json.loads((tuned_path / "config.json").read_text()) if (tuned_path / "config.json").is_file() else {}
    cls = {"causal-lm": AutoModelForCausalLM, "classify": AutoModelForSequenceClassification}.get(task) \
        or _architecture(tuned_path)
    classify = task == "classify" or (task is None and _task_of(cls) == "classify")
    fields = {}
    if classify:
        n = len(config.get("id2label") or {}) or config.get("num_labels") or 2
        fields["labels"] = [(config.get("id2label") or {}).get(str(i), str(i)) for i in range(n)]
    options = dict(local_files_only=True, dtype="auto", output_loading_info=True,
                   **({"num_labels": len(fields["labels"])} if classify else {}))
    with _quiet_transformers():  # the weights only: neither folder needs a tokenizer
        tuned_model, info = cls.from_pretrained(tuned_path, **options)
        name = type(tuned_model).__name__
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            own = ", ".join(config.get("architectures") or ["(none recorded)"])
            hint = f"leave --task out to load it as its own architecture ({own})" if task else \
                "is the folder complete?"
            raise LoraError(f"--tuned {tuned} does not hold {len(missing)} weight(s) that {name} needs: "
                            f"{', '.join(missing)}; they would be initialised at random, not fine-tuned: {hint}")
        base_model, base_info = type(tuned_model).from_pretrained(model_path(base), **options)
    saved = list(modules_to_save) if modules_to_save is not None else \
        [h for h in ("classifier", "score") if classify and hasattr(base_model, h)]
    lacking = sorted(k for k in base_info["missing_keys"] if not _covered(k, saved))
    if lacking:
        raise LoraError(f"--base {base} does not hold {len(lacking)} weight(s) that {name} needs: "
                        f"{', '.join(lacking)}; they would be initialised at random. Copy them from the tuned "
                        "model with --modules-to-save, or give a base of the same architecture")
    if log and info["unexpected_keys"]:
        log(f"weights of {tuned} that {name} does not use (not extracted): {', '.join(sorted(info['unexpected_keys']))}")
    spec = base if base.startswith("builtin:") else str(Path(base).resolve())
    kind = task or _task_of(type(tuned_model))
    record = {**({"task": kind} if kind else {}), "architecture": name, "model": spec, **fields}
    return TunedPair(base_model, tuned_model, saved, record)
