"""PEFT's adapter format: file names, tensor keys, and the config read and translated both ways.

An adapter folder holds ``adapter_config.json`` + ``adapter_model.safetensors``. Keys are
``base_model.model.<module path>.lora_A.weight`` / ``lora_B.weight`` (embeddings:
``lora_embedding_A`` / ``lora_embedding_B``), and for DoRA (``use_dora: true``) also
``<module path>.lora_magnitude_vector``, tensors in PEFT's shapes. Nothing is ever unpickled.
:mod:`.writer` saves, :mod:`.reader` checks and loads; both use the names and readers here.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..config import LoraConfig, LoraError
from ..kinds import Kind
from ..state import walk

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "PREFIX", "AdapterFile", "read_adapter", "factor_keys", "magnitude_key",
           "module_path", "in_list", "outermost", "bias_key", "base_bias_key", "peft_selects", "PEFT_FIELDS", "REFUSED",
           "read_config", "open_weights", "consistent_config", "to_lora_config",
           "EMBEDDING_LAYER_NAMES", "embedding_modules", "embedding_base_param", "TOKENS_SUFFIX"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
META_KEY = "lorakit_config"
QUANT_KEY = "lorakit_base_quantization"  # {path: "nf4" | "fp4" | "int8"} of the adapted quantized layers
LEGACY_HASH_KEY = "lorakit_weights_sha256"  # in adapter_config.json of files from earlier lorakit versions
#: Every field of PEFT 0.21's ``LoraConfig``, and what lorakit does with it: ``"supported"`` (read
#: into a :class:`~lorakit.LoraConfig` and written back), ``"refused"`` (a file with any value other
#: than the default is refused by name: loading it would give other outputs, or other training),
#: ``"metadata"`` (does not change what the adapter computes: ignored on read, written as PEFT's
#: default). The manual's table (docs/guide/files.md, "PEFT LoraConfig fields") lists the same.
PEFT_FIELDS = {
    **dict.fromkeys(("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                     "revision", "inference_mode", "megatron_core", "qalora_group_size", "loftq_config",
                     "eva_config", "corda_config", "runtime_config"), "metadata"),
    **dict.fromkeys(("r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
                     "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform",
                     "layers_pattern", "rank_pattern", "alpha_pattern", "use_dora", "lora_bias",
                     "target_parameters", "trainable_token_indices"), "supported"),
    **dict.fromkeys(("megatron_config", "lora_ga_config", "velora_config",
                     "alora_invocation_tokens", "use_qalora", "monteclora_config", "layer_replication",
                     "use_bdlora", "arrow_config", "kasa_config", "ensure_weight_tying"), "refused"),
}
#: The default of each refused field, as lorakit writes them.
REFUSED = {"megatron_config": None, "lora_ga_config": None,
           "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False, "monteclora_config": None,
           "layer_replication": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
           "ensure_weight_tying": False}
_WHY = {"megatron_config": "Megatron tensor-parallel LoRA layers",
        "lora_ga_config": "LoRA-GA", "velora_config": "VeLoRA", "alora_invocation_tokens": "activated LoRA (aLoRA)",
        "use_qalora": "QALoRA", "monteclora_config": "MonteCLoRA", "layer_replication": "layer replication",
        "use_bdlora": "BD-LoRA", "arrow_config": "Arrow routing", "kasa_config": "KaSA",
        "ensure_weight_tying": "adapters tied between tied weights"}
#: init_lora_weights values that only set the initial factors (a file holds the trained ones).
_FACTOR_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


# -- PEFT's selection rules (tuners_utils.check_target_module_exists, other._set_trainable) ------
def in_list(names: list[str], path: str) -> bool:
    """PEFT's rule for a list of target_modules / target_parameters: the path or a dotted suffix."""
    return path in names or any(path.endswith(f".{n}") for n in names)


def outermost(paths: set[str]) -> set[str]:
    return {p for p in paths if not any(p.startswith(f"{q}.") for q in paths)}


def factor_keys(path: str, kind: Kind) -> tuple[str, str]:
    """The file keys of the factors A and B at ``path``. A kind's part (``attn.out_proj`` of an
    ``nn.MultiheadAttention``) sits inside its owner's wrapper in PEFT, so PEFT names it through
    the owner's ``base_layer`` (``attn.base_layer.out_proj``)."""
    if kind.selected_by is None:
        path = ".base_layer.".join(path.rsplit(".", 1))
    return f"{PREFIX}{path}.{kind.a_key}", f"{PREFIX}{path}.{kind.b_key}"


def bias_key(path: str) -> str:
    """The file key of a ``lora_bias`` bias at ``path`` (PEFT's ``lora_B`` is an ``nn.Linear``/conv with a bias)."""
    return f"{PREFIX}{path}.lora_B.bias"


def base_bias_key(path: str, wrapped: set[str] | frozenset[str]) -> str:
    """The file key of the base bias of the module at ``path`` (``LoraConfig.bias``), PEFT's name in the state
    dict of a model holding only this adapter: ``.base_layer`` after every module on the way that the
    adapter wraps (``wrapped``: its LoRA layers' paths), e.g. ``q.base_layer.bias``, ``fc.bias``,
    ``attn.base_layer.out_proj.base_layer.bias``."""
    segments, out = path.split("."), []
    for i, segment in enumerate(segments):
        out.append(segment)
        if ".".join(segments[: i + 1]) in wrapped:
            out.append("base_layer")
    return f"{PREFIX}{'.'.join(out)}.bias"


def peft_selects(names: list[str], path: str, cfg: LoraConfig) -> bool:
    """PEFT's rule for a list of target_modules with ``cfg``'s layers_to_transform / layers_pattern: the
    path itself, or a dotted suffix in one of those layers."""
    return path in names or (in_list(names, path) and cfg.in_layers(path))


def magnitude_key(path: str) -> str:
    """The file key of a DoRA magnitude at ``path`` (DoRA kinds are never a kind's part)."""
    return f"{PREFIX}{path}.lora_magnitude_vector"


def module_path(key: str) -> str:
    """The module path (lorakit's, the original model's naming) of a factor's file key."""
    return key[len(PREFIX):].rsplit(".lora_", 1)[0].replace(".base_layer.", ".")


#: PEFT's key of a layer's trainable tokens: ``<PREFIX><path><TOKENS_SUFFIX>``, shape (len(indices), dim).
TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"


# -- embedding base weights (PEFT's save_embedding_layers) -------------------------------------------
#: PEFT's ``EMBEDDING_LAYER_NAMES``: the leaf names its ``save_embedding_layers="auto"`` looks for in target_modules.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
#: Where PEFT's state dict holds an embedding's own weight inside its wrappers: a LoRA layer's
#: ``base_layer``, a trainable-tokens wrapper's ``token_adapter.base_layer``, or the module itself.
_BASE_INFIXES = (".base_layer.", ".token_adapter.base_layer.", ".")


def embedding_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{path: module}`` of the model's input and output embeddings (``get_input_embeddings()`` /
    ``get_output_embeddings()`` of a transformers model, seen through lorakit's wrappers), the
    layers whose base weights PEFT's ``save_embedding_layers`` writes; empty for other models."""
    found = {}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, getter, None)
        try:
            module = get() if callable(get) else None
        except (AttributeError, NotImplementedError):
            module = None
        if module is None:
            continue
        for path, base, _, _, wrapper in walk(model):
            if module is base or module is wrapper:
                found[path] = base
    return found


def embedding_base_param(key: str, embeddings: dict[str, nn.Module]) -> tuple[str, str] | None:
    """``(module path, parameter name)`` if file key ``key`` is the base weight (or bias) of one of
    ``embeddings`` as PEFT saves it (``<path>.base_layer.weight``, ``<path>.token_adapter.base_layer.weight``
    or ``<path>.weight``), else None."""
    rest = key[len(PREFIX):] if key.startswith(PREFIX) else None
    if rest is None:
        return None
    for infix in _BASE_INFIXES:
        path, sep, name = rest.rpartition(infix)
        if sep and path in embeddings and name in dict(embeddings[path].named_parameters(recurse=False)):
            return path, name
    return None


# -- reading a folder ---------------------------------------------------------------------------------
def read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise LoraError(f"{path}: not found; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise LoraError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def open_weights(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickled = [p.name for p in directory.glob("adapter_model.*")]
        extra = f"; found {pickled}, which lorakit never unpickles (convert to safetensors)" if pickled else ""
        raise LoraError(f"{path}: not found{extra}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoraError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    if not tensors:
        raise LoraError(f"{path}: the file holds no tensors")
    return tensors, metadata


def consistent_config(config: dict, metadata: dict, directory: Path) -> tuple[dict, Path]:
    """The config that belongs to the weights: the JSON file, unless the weights were saved by
    lorakit with another config (a save interrupted between its two renames, or a hand edit):
    then the weights' embedded copy, with a warning."""
    if META_KEY not in metadata:
        return config, directory / CONFIG_NAME  # PEFT's file, or weights rewritten by another tool
    source = directory / WEIGHTS_NAME
    try:
        embedded = json.loads(metadata[META_KEY])
    except json.JSONDecodeError:
        embedded = None
    if not isinstance(embedded, dict):
        raise LoraError(f"{source}: its lorakit_config metadata is not a JSON object; save the adapter again")
    config = {k: v for k, v in config.items() if k != LEGACY_HASH_KEY}
    if config == embedded:
        return config, directory / CONFIG_NAME
    changed = sorted(k for k in config.keys() | embedded.keys() if config.get(k) != embedded.get(k))
    warnings.warn(f"{directory / CONFIG_NAME} differs from the config {source} was saved with (in {changed}): "
                  "a save was interrupted, or the file was edited; loading the weights' own config",
                  stacklevel=4)
    return embedded, source


def to_lora_config(config: dict, source: Path) -> LoraConfig:
    """The :class:`LoraConfig` of a PEFT config dict; a field lorakit does not implement (:data:`PEFT_FIELDS`),
    and an unknown field with a value, is refused by name."""
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{source}: peft_type is {config.get('peft_type')!r}; lorakit loads LORA adapters")
    for key, default in REFUSED.items():
        value = config.get(key, default)
        if value not in (default, None, [], {}, False):
            raise LoraError(f"{source}: {key}={value!r} ({_WHY[key]}) is not supported by lorakit; it loads "
                            f"adapters with {key}={default!r}")
    unknown = sorted(k for k, v in config.items() if k not in PEFT_FIELDS and v not in (None, False, [], {}, ""))
    if unknown:
        raise LoraError(f"{source}: unknown field(s) {unknown} (not in PEFT 0.21's LoraConfig: written by a newer "
                        "PEFT?); lorakit refuses options it does not know rather than ignore them")
    if isinstance(config.get("target_modules"), str) and config.get("layers_to_transform") not in (None, []):
        raise LoraError(f"{source}: layers_to_transform cannot be used with a regex target_modules (PEFT refuses it)")
    try:
        return LoraConfig(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout") or 0.0,
                          init=_init(config.get("init_lora_weights", True), source),
                          targets=config.get("target_modules") or (),
                          target_parameters=config.get("target_parameters") or (),
                          rank_pattern=config.get("rank_pattern") or {},
                          alpha_pattern=config.get("alpha_pattern") or {},
                          use_rslora=bool(config.get("use_rslora", False)),
                          use_dora=config.get("use_dora") or False,
                          modules_to_save=config.get("modules_to_save") or (),
                          layers_to_transform=config.get("layers_to_transform"),
                          layers_pattern=config.get("layers_pattern") or (),
                          lora_bias=config.get("lora_bias") or False,
                          trainable_token_indices=config.get("trainable_token_indices"),
                          bias=config.get("bias") or "none")
    except KeyError as e:
        raise LoraError(f"{source}: missing required field {e.args[0]!r}") from None
    except LoraError as e:
        raise LoraError(f"{source}: {e}") from None


def _init(value: object, source: Path) -> str:
    """lorakit's init for PEFT's ``init_lora_weights``: ``pissa``/``olora`` rewrite W on load as in PEFT
    (the trained factors then replace the initial ones); ``False`` is lorakit's ``random``; inits that
    only set the factors do not matter for a file that holds them; inits whose residual cannot be
    recomputed here, and unknown values, are refused."""
    if value in ("pissa", "olora"):
        return value
    if value is False:
        return "random"
    if any(value is v or (isinstance(v, str) and value == v) for v in _FACTOR_INITS):
        return "kaiming"
    if isinstance(value, str) and (value.startswith("pissa_niter_") or value.lower() in ("corda", "loftq", "lora_ga")):
        why = ("its residual W - s*B0*A0 comes from a randomized SVD, which a load cannot reproduce"
               if value.startswith("pissa_niter_") else "its residual needs data or quantization that lorakit does not have")
        raise LoraError(f"{source}: init_lora_weights={value!r} is not supported: {why}; save the adapter "
                        "converted to plain LoRA (lorakit.save(..., convert_to_lora=True), PEFT's "
                        "path_initial_model_for_weight_conversion)")
    raise LoraError(f"{source}: init_lora_weights={value!r} is unknown to lorakit; known: True, False, "
                    "'gaussian', 'eva', 'orthogonal', 'mica', 'pissa', 'olora'")


@dataclasses.dataclass(frozen=True)
class AdapterFile:
    """An adapter folder as read from disk, checked only in itself (not against a model).

    ``config``: the PEFT config that belongs to the weights (see :func:`consistent_config`), read from
    ``config_source``; ``lora``: it as a :class:`~lorakit.LoraConfig`; ``tensors``: every tensor by key;
    ``metadata``: the safetensors metadata."""

    config: dict
    config_source: Path
    lora: LoraConfig
    tensors: dict[str, torch.Tensor]
    metadata: dict


def read_adapter(directory: str | Path) -> AdapterFile:
    """Read an adapter folder (config and weights, no model needed); raises :class:`LoraError` for a
    missing, malformed or unsupported file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LoraError(f"{directory}: not an adapter folder (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    config = read_config(directory)
    tensors, metadata = open_weights(directory)
    config, source = consistent_config(config, metadata, directory)
    return AdapterFile(config, source, to_lora_config(config, source), tensors, metadata)
