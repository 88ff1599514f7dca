"""Save an adapter in PEFT's format, crash-safe.

Each file is replaced atomically (temp file, fsync, rename), the config first, the weights last, and
the weights carry the text of their config in the safetensors metadata (``lorakit_config``;
adapter_config.json itself holds only PEFT's fields, so PEFT reads it without warnings). A crash
between the two renames leaves a new config next to the previous weights; loading sees that the
config differs from the one the weights were saved with and loads the weights' own copy, with a
warning (:func:`lorakit.files.format.consistent_config`), so the previous adapter loads intact.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save as st_save
from torch import nn

from ..config import LoraConfig, LoraError
from ..kinds.bitsandbytes import format_of
from ..layers import LoraLayer
from ..sharding import full_tensor, is_main, is_sharded
from ..state import lora_layers, registry, saved_modules, token_layers, unwrap, walk
from ..variants import rewriting_inits as inits
from .format import (
    CONFIG_NAME,
    EMBEDDING_LAYER_NAMES,
    META_KEY,
    PREFIX,
    QUANT_KEY,
    REFUSED,
    TOKENS_SUFFIX,
    WEIGHTS_NAME,
    base_bias_key,
    bias_key,
    embedding_modules,
    factor_keys,
    in_list,
    magnitude_key,
    outermost,
    peft_selects,
)

__all__ = ["save", "write_atomic"]


def _target_modules(model: nn.Module, paths: list[str], cfg: LoraConfig | None = None) -> list[str]:
    """Shortest explicit list: leaf names if they select exactly ``paths`` (PEFT's dotted-suffix rule,
    narrowed by ``cfg``'s layers_to_transform); else the full paths (which PEFT never narrows)."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    selected = {p for p, *_ in walk(model) if (peft_selects(leaves, p, cfg) if cfg else in_list(leaves, p))}
    return leaves if selected == set(paths) else sorted(paths)


def _peft_config(model: nn.Module, adapter: str) -> dict:
    cfg = registry(model).configs[adapter]
    layers = [(p, layer) for p, layer in lora_layers(model)
              if adapter in layer.lora_A and layer.kind.selected_by is not None]  # parts come with their owner
    modules = [p for p, layer in layers if layer.kind.selected_by == "target_modules"]
    params = [f"{p}.{layer.param_name}" for p, layer in layers if layer.kind.selected_by == "target_parameters"]
    ranks = {p: layer.rank(adapter) for p, layer in layers}
    alphas = {p: cfg.alpha_for(p) for p, _ in layers}
    num = lambda x: int(x) if float(x).is_integer() else x  # noqa: E731
    saved = [p for p, w in saved_modules(model) if adapter in w.adapters()]
    base = getattr(getattr(unwrap(model), "config", None), "_name_or_path", None)
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base or None,
        "r": cfg.r, "lora_alpha": num(cfg.alpha), "lora_dropout": cfg.dropout,
        "target_modules": _target_modules(unwrap(model), modules, cfg) if modules else None,
        "target_parameters": sorted(params) or None, "exclude_modules": None,
        "rank_pattern": {re.escape(p): r for p, r in ranks.items() if r != cfg.r},
        "alpha_pattern": {re.escape(p): num(a) for p, a in alphas.items() if a != cfg.alpha},
        "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora,
        "fan_in_fan_out": any(layer.kind.fan_in_fan_out for _, layer in layers),
        "init_lora_weights": cfg.init if inits.rewrites(cfg.init) else cfg.init != "random", "inference_mode": True,
        **REFUSED, "lora_bias": cfg.lora_bias, "layers_to_transform": list(cfg.layers_to_transform) or None,
        "layers_pattern": list(cfg.layers_pattern) or None,
        "modules_to_save": _target_modules(unwrap(model), saved) if saved else None,
        "trainable_token_indices": _token_indices(model, adapter), "bias": cfg.bias,
    }


def _token_indices(model: nn.Module, adapter: str) -> list[int] | dict[str, list[int]] | None:
    """PEFT's ``trainable_token_indices`` of ``adapter``: a list when only the input embedding has tokens,
    else ``{path: ids}``; tied heads are left out (PEFT ties them to the input embedding again)."""
    owners = {p: list(t.token_indices[adapter]) for p, t in token_layers(model)
              if adapter in t.token_indices and t.tied is None}
    if not owners:
        return None
    get = getattr(unwrap(model), "get_input_embeddings", None)
    emb = get() if callable(get) else None
    only = next(iter(owners)) if len(owners) == 1 else None
    if only is not None and emb is not None and dict(token_layers(model)).get(only) is emb:
        return owners[only]
    return owners


def _converted_config(config: dict) -> dict:
    """The PEFT config of an adapter converted to plain LoRA of twice the rank (same scale s)."""
    k = 2 ** 0.5 if config["use_rslora"] else 2
    num = lambda x: int(x) if float(x).is_integer() else x  # noqa: E731
    return {**config, "r": 2 * config["r"], "lora_alpha": num(config["lora_alpha"] * k), "init_lora_weights": True,
            "rank_pattern": {p: 2 * r for p, r in config["rank_pattern"].items()},
            "alpha_pattern": {p: num(a * k) for p, a in config["alpha_pattern"].items()}}


def _also_selected(model: nn.Module, adapter: str, names: list[str] | None) -> list[tuple[str, nn.Module]]:
    """Modules that PEFT's plain-suffix rule for ``modules_to_save`` also selects (``pre_classifier``
    for ``classifier``): PEFT wraps them and requires their state in the file, so it is written (they
    are unchanged by the adapter, and load as a copy of themselves)."""
    held = [p for p, w in saved_modules(model) if adapter in w.adapters()]
    related = lambda p: any(p == h or p.startswith(f"{h}.") or h.startswith(f"{p}.") for h in held)  # noqa: E731
    loose = outermost({p for p, *_ in walk(unwrap(model)) if any(p.endswith(n) for n in names or ())})
    extra = [(p, m) for p, m, *_ in walk(unwrap(model)) if p in loose and not related(p)]
    for p, m in extra:
        if any(isinstance(x, LoraLayer) for x in m.modules()) or p in {q for q, _ in lora_layers(model)}:
            raise LoraError(f"modules_to_save {names} also selects {p!r} in PEFT (which matches by plain string "
                            f"suffix), and {p!r} has LoRA adapters; rename the module or keep it out of the adapter")
    return extra


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _vocab_resized(model: nn.Module) -> bool:
    """PEFT's test for ``save_embedding_layers="auto"``: the model's ``config.vocab_size`` differs from
    the one in ``config.json`` of its base model's local folder (``_name_or_path``; the Hub is not asked,
    so a base known only by a Hub id counts as not resized, as PEFT offline)."""
    config = getattr(model, "config", None)
    vocab, base = getattr(config, "vocab_size", None), getattr(config, "_name_or_path", None)
    path = Path(base) / "config.json" if base else None
    if not vocab or path is None or not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    base_vocab = saved.get("vocab_size", saved.get("text_config", {}).get("vocab_size"))
    return isinstance(base_vocab, int) and base_vocab != vocab


def _embedding_tensors(model: nn.Module, config: dict, adapter: str, which: bool | str) -> dict[str, torch.Tensor]:
    """The embeddings' base weights as PEFT's ``get_peft_model_state_dict(save_embedding_layers=which)``
    writes them: ``"auto"`` is True when an embedding layer name (``embed_tokens``, ``lm_head``) is in
    target_modules and the adapter has no trainable tokens, or when the vocabulary was resized
    (:func:`_vocab_resized`). A LoRA-adapted embedding writes ``<path>.base_layer.<param>``; an
    unadapted one (resized) ``<path>.<param>`` only when no embedding is targeted, as in PEFT; a
    weight tied to one already written is written once."""
    if which not in (True, False, "auto"):
        raise LoraError(f"save_embedding_layers must be True, False or 'auto', got {which!r}")
    targets = config.get("target_modules") or []
    targeted = isinstance(targets, list) and any(n in targets for n in EMBEDDING_LAYER_NAMES)
    if which == "auto":
        which = (targeted and config.get("trainable_token_indices") is None) or _vocab_resized(unwrap(model))
    if not which:
        return {}
    embeddings = embedding_modules(unwrap(model))
    if not embeddings:
        raise LoraError("save_embedding_layers=True: the model has no get_input_embeddings()/get_output_embeddings() "
                        "(not a transformers model), so its embedding layers are unknown; save without it")
    layers = dict(lora_layers(model))
    tensors, written = {}, set()
    for path, module in embeddings.items():
        layer = layers.get(path)
        if layer is not None and adapter in layer.lora_A:
            prefix = f"{PREFIX}{path}.base_layer."
        elif targeted:
            continue  # PEFT writes only the base layers of targeted embeddings then
        else:
            prefix = f"{PREFIX}{path}.token_adapter.base_layer." if _token_wrapped(model, path) else f"{PREFIX}{path}."
        for name, t in module.named_parameters(recurse=False):
            if id(t) not in written:
                written.add(id(t))
                tensors[prefix + name] = full_tensor(t.detach()).to("cpu").contiguous()
    return tensors


def _token_wrapped(model: nn.Module, path: str) -> bool:
    """Whether the module at ``path`` carries trainable tokens (PEFT names its weight inside ``token_adapter``)."""
    return path in dict(token_layers(model))


def save(model: nn.Module, directory: str | os.PathLike, adapter: str = "default",
         dtype: torch.dtype = torch.float32, convert_to_lora: bool = False,
         save_embedding_layers: bool | str = "auto") -> Path:
    """Write adapter ``adapter`` of ``model`` to ``directory`` in PEFT's format; returns the path.

    A PiSSA/OLoRA adapter (:mod:`lorakit.variants.rewriting_inits`) is saved as it is, with ``init_lora_weights``
    naming its init (loading it rewrites W again, as PEFT does); ``convert_to_lora=True`` saves it
    instead as a plain LoRA adapter of rank 2r for the *unmodified* model (PEFT's
    ``path_initial_model_for_weight_conversion``): factors [A; A₀] and [B, −B₀], ``r`` and
    ``rank_pattern`` doubled, alpha scaled to keep s (×2, or ×√2 with rsLoRA).

    A model sharded with FSDP2 (:func:`lorakit.distributed.fully_shard_model`) is saved by a
    collective: every rank calls ``save``, the adapter's tensors are gathered whole, rank 0 writes.

    ``save_embedding_layers`` (PEFT's option of that name): also write the base weights of the input
    and output embeddings, so that the file restores them on load (as PEFT's ``load_state_dict``
    does): ``True``, ``False``, or ``"auto"`` (PEFT's rule: when ``embed_tokens`` / ``lm_head`` is a
    target, or the vocabulary was resized against the base model's local ``config.json``)."""
    reg = registry(model)
    if adapter not in reg.configs:
        raise LoraError(f"unknown adapter {adapter!r}; the model has: {sorted(reg.configs)}")
    if convert_to_lora and not inits.rewrites(reg.configs[adapter].init):
        raise LoraError(f"adapter {adapter!r} has init {reg.configs[adapter].init!r}, which does not rewrite W: "
                        "its file already applies to the unmodified model; save it without convert_to_lora")
    tensors = {}
    for path, layer in lora_layers(model):
        if adapter in layer.lora_A:
            factors = inits.converted(layer, adapter) if convert_to_lora else layer.factors(adapter)
            for key, t in zip(factor_keys(path, layer.kind), factors):
                tensors[key] = full_tensor(t.detach()).to("cpu", dtype).contiguous()
            if adapter in layer.lora_bias:
                tensors[bias_key(path)] = full_tensor(layer.lora_bias[adapter].detach()).to("cpu", dtype).contiguous()
            if adapter in layer.lora_magnitude_vector:
                m = layer.lora_magnitude_vector[adapter].detach()
                tensors[magnitude_key(path)] = full_tensor(m).to("cpu", dtype).contiguous()
    wrapped = {p for p, layer in lora_layers(model) if adapter in layer.lora_A}
    for path, (b, _) in reg.biases.get(adapter, {}).items():  # the base biases it trains, in their own dtype (PEFT)
        tensors[base_bias_key(path, wrapped)] = full_tensor(b.detach()).to("cpu").contiguous()
    for path, layer in token_layers(model):  # tied heads hold none: their owner's are written
        if adapter in layer.trainable_tokens_delta:
            t = layer.trainable_tokens_delta[adapter].detach()
            tensors[f"{PREFIX}{path}{TOKENS_SUFFIX}"] = full_tensor(t).to("cpu", dtype).contiguous()
    config = _peft_config(model, adapter)
    if convert_to_lora:
        config = _converted_config(config)
    whole = [(p, w.modules_to_save[adapter]) for p, w in saved_modules(model) if adapter in w.adapters()]
    for path, module in whole + _also_selected(model, adapter, config["modules_to_save"]):
        for key, t in module.state_dict().items():  # saved whole, as PEFT's modules_to_save: <path>.<state key>
            t = full_tensor(t.detach()).to("cpu").contiguous()
            tensors[f"{PREFIX}{path}.{key}"] = t.to(dtype) if t.is_floating_point() else t
    embeddings = _embedding_tensors(model, config, adapter, save_embedding_layers)
    tensors.update(embeddings)  # in the model's own dtype, as PEFT writes them
    config = json.dumps(config, indent=2, sort_keys=True)
    quantized = {p: format_of(layer.base_layer) for p, layer in lora_layers(model) if adapter in layer.lora_A}
    quantized = json.dumps({p: f for p, f in quantized.items() if f}, sort_keys=True)
    directory = Path(directory)
    if not is_main() and is_sharded(model):
        return directory  # the gathered tensors are written by rank 0
    weights = st_save(tensors, metadata={"format": "pt", META_KEY: config, QUANT_KEY: quantized})
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / CONFIG_NAME, config.encode())
    write_atomic(directory / WEIGHTS_NAME, weights)
    return directory
