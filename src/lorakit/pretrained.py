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
from .files.format import QUANT_KEY, WEIGHTS_NAME, module_path
from .quant import FORMATS
from .quant import quantize as quantize_model
from .targets import matcher, output_heads

__all__ = ["load_model", "model_path", "load_tuned_pair", "TunedPair", "QUANTIZE_CHOICES", "Precision",
           "adapter_precision", "BasePlan", "plan_base_precision", "apply_base_precision"]


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


# -- the base precision adapters were trained on ----------------------------------------------------
QUANTIZE_CHOICES = ("none", *FORMATS)  # --quantize of generate, predict and serve ("none": full precision)


def _precision_name(fmt: str | None) -> str:
    return fmt or "full precision"


@dataclass(frozen=True)
class Precision:
    """The base an adapter file was saved from, as lorakit's record in it says (``lorakit.save``
    records the format of every adapted layer that was quantized)."""

    fmt: str | None             # the quantized layers' format ("nf4", "fp4", "int8"); None: full precision
    quantized: frozenset[str]   # adapted layers recorded in ``fmt``
    full: frozenset[str]        # adapted layers recorded in full precision


def adapter_precision(folder: str | Path) -> Precision | None:
    """The base precision recorded in ``folder``'s ``adapter_model.safetensors`` (the
    ``lorakit_base_quantization`` metadata), or None where there is no record (PEFT's files; a
    missing or unreadable file, which :func:`lorakit.load` refuses with its reason): such a file
    fits any base. Raises LoraError for a record that is not ``{path: format}`` JSON, or that mixes
    formats (one :func:`lorakit.quantize` call holds every layer in one format)."""
    from safetensors import safe_open
    file = Path(folder) / WEIGHTS_NAME
    try:
        with safe_open(str(file), "pt") as f:
            recorded, keys = (f.metadata() or {}).get(QUANT_KEY), list(f.keys())
    except Exception:  # noqa: BLE001 - no file, or not safetensors: load/verify name the problem
        return None
    if recorded is None:
        return None
    try:
        saved = json.loads(recorded)
    except json.JSONDecodeError:
        saved = None
    if not isinstance(saved, dict) or any(f not in FORMATS for f in saved.values()):
        raise LoraError(f"{file.name}: its {QUANT_KEY} metadata is not JSON {{path: {' | '.join(FORMATS)}}}; "
                        "save the adapter again")
    formats = sorted(set(saved.values()))
    if len(formats) > 1:
        raise LoraError(f"{file.name} was saved from a base with layers in {' and '.join(formats)}; lorakit "
                        "holds a base in one format, so it cannot reproduce that one: quantize the base yourself "
                        "and lorakit.load the adapter on it")
    adapted = {module_path(k) for k in keys if ".lora_" in k}
    return Precision(formats[0] if formats else None, frozenset(saved), frozenset(adapted - set(saved)))


@dataclass(frozen=True)
class BasePlan:
    """How to hold a base for some adapters: ``lorakit.quantize(model, fmt, skip=list(skip))``
    (nothing when ``fmt`` is None), and the adapters that cannot be served on it, with the reason."""

    fmt: str | None
    skip: tuple[str, ...]
    refused: dict[str, str]


def plan_base_precision(model: nn.Module, folders: dict[str, Path], quantize: str | None = None,
                        allow_precision_change: bool = False) -> BasePlan:
    """The base precision for the adapters ``{name: folder}`` on ``model`` (full precision, as loaded).

    ``quantize`` None: the precision the adapters' files record (:func:`adapter_precision`; files
    without a record fit any), the same format for the same layers: every ``nn.Linear`` but the
    output head quantized, as ``lorakit train --quantize`` does, except adapted layers the files
    record in full precision, and including recorded ones that would otherwise be skipped.
    Adapters recording different precisions are refused (LoraError naming them: one base per
    server), as is a layer that one adapter records quantized and another in full precision.
    ``quantize`` "none" / "nf4" / "fp4" / "int8": that base; an adapter trained on another is
    ``refused`` (with the reason) unless ``allow_precision_change``. Changes nothing."""
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise LoraError(f"unknown base precision {quantize!r}; use one of {', '.join(QUANTIZE_CHOICES)}")
    refused, known = {}, {}
    for name, folder in folders.items():
        try:
            precision = adapter_precision(folder)
        except LoraError as e:
            refused[name] = str(e)
            continue
        if precision is not None:
            known[name] = precision
    if quantize is None:
        needs: dict[str | None, list[str]] = {}
        for name, p in known.items():
            needs.setdefault(p.fmt, []).append(name)
        if len(needs) > 1:
            listing = "; ".join(f"{', '.join(names)}: {_precision_name(f)}"
                                for f, names in sorted(needs.items(), key=lambda kv: _precision_name(kv[0])))
            raise LoraError(f"the adapters were trained on bases held in different precisions ({listing}); one "
                            "server holds one base: serve them from separate folders, or choose the base with "
                            f"--quantize {'|'.join(QUANTIZE_CHOICES)} (with --skip-bad-adapters the others are "
                            "listed, not served)")
        fmt = next(iter(needs), None)
    else:
        fmt = None if quantize == "none" else quantize
    fitting = {}
    for name, p in known.items():
        if p.fmt == fmt:
            fitting[name] = p
        elif not allow_precision_change:
            refused[name] = (f"trained on a base with {min(p.quantized or p.full)} (and {len(p.quantized | p.full)} "
                             f"adapted layers in all) in {_precision_name(p.fmt)}, but the base is held in "
                             f"{_precision_name(fmt)} (--quantize {quantize}): its outputs would not be the ones it "
                             f"was trained for; pass --quantize {p.fmt or 'none'}, or --allow-precision-change to "
                             "apply it anyway")
    if fmt is None:
        return BasePlan(None, (), refused)
    modules = dict(model.named_modules())
    linear = {path for path, m in modules.items() if type(m) is nn.Linear}
    quantized: dict[str, list[str]] = {}
    full: dict[str, list[str]] = {}
    for name, p in fitting.items():
        if lacking := sorted(p.quantized - linear):
            refused[name] = (f"records {lacking[0]} in {fmt}, but the model has no nn.Linear of that name: is it "
                             "an adapter for another model?")
            continue
        for path in p.quantized:
            quantized.setdefault(path, []).append(name)
        for path in p.full & linear:
            full.setdefault(path, []).append(name)
    if clash := sorted(set(quantized) & set(full)):
        raise LoraError(f"{clash[0]} is held in {fmt} by adapter(s) {', '.join(quantized[clash[0]])} and in full "
                        f"precision by {', '.join(full[clash[0]])} ({len(clash)} layer(s) differ): one base cannot "
                        "serve both; serve them from separate folders")
    skip = (output_heads(model, modules) | set(full)) - set(quantized)
    return BasePlan(fmt, tuple(sorted(skip)), refused)


def apply_base_precision(model: nn.Module, plan: BasePlan) -> nn.Module:
    """Quantize ``model`` as ``plan`` says (:func:`lorakit.quantize` with its format and skip list)."""
    if plan.fmt is not None:
        quantize_model(model, plan.fmt, skip=list(plan.skip))
    return model
