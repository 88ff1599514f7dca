"""Load adapters in PEFT's format: check a folder completely against a model, then load it.

Keys are ``base_model.model.<module path>.lora_A.weight`` / ``lora_B.weight`` (embeddings:
``lora_embedding_A`` / ``lora_embedding_B``), and for DoRA (``use_dora: true``) also
``<module path>.lora_magnitude_vector``, tensors in PEFT's shapes, fp32 by default.

Loading is strict and all-or-nothing: the whole file is checked against the model (keys, shapes,
prefix, finite values) and against its own config (the config must select, by PEFT's rules,
exactly the modules the tensors hold) before the model is touched. Nothing is ever unpickled.

A lorakit-saved file whose adapter_config.json differs from the config its weights were saved with
(a save interrupted between its two renames, or a hand edit) loads the weights' own config, with a
warning (:func:`lorakit.files.format.consistent_config`); files without that metadata, e.g. PEFT's,
use adapter_config.json as it is.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..config import LoraConfig, LoraError, check_name
from ..kinds.conv import GROUPED, grouped_layout
from ..model import apply_plan, set_active
from ..quant import check_trained_precision, format_of
from ..sharding import is_sharded, like_param
from ..state import lora_layers, registry, registry_of, saved_modules, token_layers, unwrap, walk
from ..targets import Site, TokenSite, check_rewriting_inits, parts, plan, plan_biases, plan_saved, plan_tokens
from ..variants import dora
from ..variants import rewriting_inits as inits
from .format import (
    CONFIG_NAME,
    PREFIX,
    QUANT_KEY,
    TOKENS_SUFFIX,
    WEIGHTS_NAME,
    base_bias_key,
    bias_key,
    embedding_base_param,
    embedding_modules,
    factor_keys,
    in_list,
    magnitude_key,
    module_path,
    outermost,
    peft_selects,
    read_adapter,
)

__all__ = ["load", "verify", "checked"]


@dataclasses.dataclass(frozen=True)
class _Selection:
    """What a PEFT config selects on a model (module paths; ``params``: "path.name")."""

    modules: set[str]
    params: set[str]
    saved: set[str]  # modules_to_save by path or dotted suffix: these must be in the file
    saved_loose: set[str]  # by PEFT's plain string suffix ("pre_classifier" for "classifier"): these may be


def _names(config: dict, key: str, source: Path) -> list[str] | str | None:
    value = config.get(key)
    if value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise LoraError(f"{source}: {key} must be a string or a list of strings, got {value!r}")


def _selection(config: dict, model: nn.Module, source: Path, cfg: LoraConfig) -> _Selection:
    """What the PEFT ``config`` selects on ``model``, by PEFT's rules: target_modules as a list
    (path or dotted suffix), a regex string (full match) or "all-linear"; exclude_modules likewise;
    nothing inside a modules_to_save module; target_parameters by path or dotted suffix;
    modules_to_save (outermost modules) by path or dotted suffix, and, loosely, by PEFT's plain
    string suffix (a module only that rule selects keeps its original weights in PEFT when the file
    has none for it, so it may be absent). ``cfg`` (the file's config) gives layers_to_transform /
    layers_pattern, which narrow a list of target_modules (and "all-linear") as in PEFT."""
    entries = list(walk(model))
    modules = {p: m for p, m, *_ in entries}
    to_save = _names(config, "modules_to_save", source) or []
    to_save = [to_save] if isinstance(to_save, str) else to_save
    saved = outermost({p for p in modules if in_list(to_save, p)})
    saved_loose = outermost({p for p in modules if any(p.endswith(n) for n in to_save)})
    targets, excluded = _names(config, "target_modules", source), _names(config, "exclude_modules", source) or []
    try:
        if targets is None:
            chosen = set()
        elif isinstance(targets, str) and targets.lower() == "all-linear":
            chosen = {s.path for s in plan(model, LoraConfig(targets="all-linear")) if cfg.in_layers(s.path)}
        elif isinstance(targets, str):
            chosen = {p for p in modules if re.fullmatch(targets, p)}
        else:
            chosen = {p for p in modules if peft_selects(targets, p, cfg)}
        if isinstance(excluded, str):
            chosen = {p for p in chosen if not re.fullmatch(excluded, p)}
    except re.error as e:
        raise LoraError(f"{source}: target_modules/exclude_modules is not a valid regex: {e}") from None
    chosen = {p for p in chosen if not (isinstance(excluded, list) and in_list(excluded, p))
              and not any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", p) for m in to_save)}
    chosen |= {part for part, owner in parts(modules).items() if owner in chosen}  # they come with their owner
    wanted = _names(config, "target_parameters", source) or []
    wanted = [wanted] if isinstance(wanted, str) else wanted
    params = {f"{p}.{n}" for p, m in modules.items() for n, _ in m.named_parameters(recurse=False)
              if in_list(wanted, f"{p}.{n}")}
    return _Selection(chosen, params, saved, saved_loose)


def _agree(selection: _Selection, paths: set[str], saved: set[str], config: dict, config_source: Path,
           source: Path) -> None:
    """The modules the tensors hold are exactly the ones the config selects (both sides named)."""
    lora = selection.modules | {p.rsplit(".", 1)[0] for p in selection.params}
    problems = []
    for what, held, selected, allowed in (("LoRA factors", paths, lora, lora),
                                          ("saved-whole modules", saved, selection.saved, selection.saved_loose)):
        if extra := sorted(held - (selected | allowed)):
            problems.append(f"{source} holds {what} for {extra[:6]}{' …' if len(extra) > 6 else ''}, "
                            "which the config does not select")
        if missing := sorted(selected - held):
            problems.append(f"the config selects {missing[:6]}{' …' if len(missing) > 6 else ''}, "
                            f"for which {source.name} holds no {what}")
    if problems:
        fields = {k: config.get(k) for k in ("target_modules", "target_parameters", "exclude_modules",
                                             "modules_to_save")}
        raise LoraError(f"{config_source} ({', '.join(f'{k}={v!r}' for k, v in fields.items())}) and the "
                        f"tensors disagree: " + "; ".join(problems))


def _exact_targets(cfg: LoraConfig, paths: set[str], saved: set[str], params: set[str]) -> LoraConfig:
    """The file's config, re-targeted at exactly the modules present in the file (``params``: the
    parameters its target_parameters select)."""
    params = {p for p in params if p.rsplit(".", 1)[0] in paths}
    modules = paths - {p.rsplit(".", 1)[0] for p in params}
    exact = lambda names: ("|".join(re.escape(n) for n in sorted(names)),) if names else ()  # noqa: E731
    return dataclasses.replace(cfg, targets=exact(modules), target_parameters=exact(params), exclude=(),
                               modules_to_save=exact(saved))


def _expected(cfg: LoraConfig, sites: list[Site], saved: list[tuple]) -> dict[str, tuple]:
    """Key -> shape that a file of config ``cfg`` must hold for the planned ``sites`` and ``saved`` modules."""
    expected = {f"{PREFIX}{e[0]}.{k}": tuple(v.shape) for e in saved for k, v in e[1].state_dict().items()}
    for s in sites:
        a_shape, b_shape = s.kind.shapes(s.module, s.weight, s.r)
        a_key, b_key = factor_keys(s.path, s.kind)
        expected[a_key], expected[b_key] = tuple(a_shape), tuple(b_shape)
        if cfg.use_dora:
            expected[magnitude_key(s.path)] = dora.magnitude_shape(s.kind, s.weight)
        if cfg.lora_bias:
            expected[bias_key(s.path)] = (b_shape[0],)
    return expected


def _expected_existing(model: nn.Module, adapter: str) -> dict[str, tuple]:
    """Key -> shape of the adapter ``adapter`` the model already has."""
    expected = {f"{PREFIX}{p}.{k}": tuple(v.shape) for p, w in saved_modules(model) if adapter in w.adapters()
                for k, v in w.modules_to_save[adapter].state_dict().items()}
    for p, layer in lora_layers(model):
        if adapter in layer.lora_A:
            a_key, b_key = factor_keys(p, layer.kind)
            expected[a_key], expected[b_key] = tuple(layer.lora_A[adapter].shape), tuple(layer.lora_B[adapter].shape)
            if adapter in layer.lora_magnitude_vector:
                expected[magnitude_key(p)] = tuple(layer.lora_magnitude_vector[adapter].shape)
            if adapter in layer.lora_bias:
                expected[bias_key(p)] = tuple(layer.lora_bias[adapter].shape)
    return expected


def _check(expected: dict[str, tuple], tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Every expected key present with the expected shape, and nothing else."""
    problems = [f"missing {k} (expected shape {v})" for k, v in expected.items() if k not in tensors]
    problems += [f"unexpected key {k}" for k in tensors if k not in expected]
    problems += [f"{k}: expected shape {v}, found {tuple(tensors[k].shape)}"
                 for k, v in expected.items() if k in tensors and tuple(tensors[k].shape) != v]
    problems += [f"{k}: dtype {t.dtype} is not floating point" for k, t in tensors.items()
                 if ".lora_" in k and not t.is_floating_point()]
    problems += [f"{k}: {bad}" for k, t in tensors.items() if t.is_floating_point() and (bad := _nonfinite(t))]
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise LoraError(f"{source} does not fit this model: " + "; ".join(problems[:10]) + more)


def _nonfinite(t: torch.Tensor) -> str:
    """'' if every value is finite, else what is wrong ('3 NaN, 1 inf of 64 values')."""
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    if not nan and not inf:
        return ""
    return ", ".join(f"{n} {w}" for n, w in ((nan, "NaN"), (inf, "inf")) if n) + f" of {t.numel()} values " \
        "(an adapter must hold finite numbers)"


def _owner(key: str, modules: dict[str, nn.Module]) -> str:
    """The module a saved-whole key belongs to: the longest module path whose state has the rest."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        path, rest = ".".join(parts[:i]), ".".join(parts[i:])
        if path in modules and rest in modules[path].state_dict():
            return path
    return key.rsplit(".", 1)[0]


@dataclasses.dataclass
class _Prepared:
    """Everything :func:`load` needs, computed before the model is touched."""

    cfg: LoraConfig
    tensors: dict[str, torch.Tensor]
    sites: list[Site]
    saved: list[tuple]
    existing: bool
    bases: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # file key -> embedding weight to set
    tokens: list[TokenSite] = dataclasses.field(default_factory=list)  # layers that get trainable tokens
    biases: dict[str, tuple[nn.Parameter, torch.Tensor]] = dataclasses.field(default_factory=dict)  # path -> (base
    # bias the adapter trains, its value in the file)


def _prepare(model: nn.Module, directory: Path, adapter: str, allow_precision_change: bool = False,
             fit_existing: bool = True) -> _Prepared:
    """Read ``directory`` and check it completely against ``model`` (raises :class:`LoraError`); pure.
    ``fit_existing=False`` skips the check that an existing adapter ``adapter`` has the file's shapes."""
    if not directory.is_dir():
        raise LoraError(f"{directory}: not an adapter folder (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    check_name(adapter)
    reg = registry_of(model)
    if reg is not None and reg.merged:
        raise LoraError(f"cannot load {adapter!r} while adapters {list(reg.merged)} are merged; unmerge first")
    file = read_adapter(directory)
    config, config_source, tensors, metadata = file.config, file.config_source, file.tensors, file.metadata
    source = directory / WEIGHTS_NAME
    bad = sorted(k for k in tensors if not k.startswith(PREFIX))
    if bad:
        raise LoraError(f"{source}: key {bad[0]!r} (and {len(bad) - 1} more) lacks the prefix {PREFIX!r}; "
                        "expected keys like 'base_model.model.<module path>.lora_A.weight'")
    modules = {p: m for p, m, *_ in walk(unwrap(model))}
    selection = _selection(config, unwrap(model), config_source, file.lora)
    bases = _embedding_bases(unwrap(model), tensors, selection, source)
    token_tensors = {k: t for k, t in tensors.items() if k.endswith(TOKENS_SUFFIX)}
    tensors = {k: t for k, t in tensors.items() if k not in bases and k not in token_tensors}
    bias_tensors, copies = _base_bias_keys(tensors, file.lora, selection, source)
    tensors = {k: t for k, t in tensors.items() if k not in bias_tensors and k not in copies}  # LoRA and saved
    paths = {module_path(k) for k in tensors if ".lora_" in k}
    saved = {_owner(k[len(PREFIX):], modules) for k in tensors if ".lora_" not in k}
    if unknown := sorted(p for p in paths | saved if p not in modules):
        raise LoraError(f"{source}: the model has no module {unknown[0]!r} ({len(unknown)} unknown paths); "
                        f"is this adapter for another model? Model modules include: {sorted(modules)[:8]}")
    owned = parts(modules)  # planned with their owners, not targets of their own
    cfg = _exact_targets(file.lora, {p for p in paths if owned.get(p) not in paths},
                         saved, selection.params)
    existing = reg is not None and adapter in reg.configs
    sites, saved_plan = _layouts(plan(unwrap(model), cfg), tensors, cfg, source), plan_saved(unwrap(model), cfg)
    if not existing:
        check_rewriting_inits(unwrap(model), cfg, adapter, sites)
    elif reg.configs[adapter].init != cfg.init and inits.rewrites(reg.configs[adapter].init) | inits.rewrites(cfg.init):
        raise LoraError(f"{config_source}: init_lora_weights {cfg.init!r} differs from adapter {adapter!r}'s "
                        f"init {reg.configs[adapter].init!r}, and one of them rewrites W; delete the adapter first")
    _check(_expected(cfg, sites, saved_plan), tensors, source)  # the file is complete in itself ...
    _agree(selection, paths, saved, config, config_source, source)  # ... and is what its config says
    if existing and fit_existing:  # ... and fits the adapter's current modules and shapes
        _check(_expected_existing(model, adapter), tensors, source)
    if not allow_precision_change:  # ... and the base is quantized as the one it was trained on
        check_trained_precision(metadata.get(QUANT_KEY), {s.path: format_of(s.module) for s in sites},
                                str(source))
    tokens = _check_tokens(unwrap(model), cfg, adapter, existing, token_tensors, source)
    biases = _check_biases(unwrap(model), cfg, adapter, sites, saved_plan, tokens, bias_tensors, source, config_source)
    _check_copies(modules, copies, {**tensors, **{k: file.tensors[k] for k in copies}}, source)
    return _Prepared(cfg, {**tensors, **token_tensors, **{k: file.tensors[k] for k in bases}}, sites, saved_plan,
                     existing, bases, tokens, biases)


def _base_bias_keys(tensors: dict[str, torch.Tensor], cfg: LoraConfig, selection: _Selection, source: Path,
                    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, str, str]]]:
    """The file's base-bias tensors (``LoraConfig.bias``: every key ending in ``.bias`` that is neither a
    LoRA tensor nor inside a module saved whole), and, with ``bias="all"``, the copies PEFT also writes
    of the biases inside a saved-whole module ``c``: ``c.original_module.<name>`` / ``c.modules_to_save.<name>``
    (key -> (c, "original_module" | "modules_to_save", name)). Empty for ``bias="none"``, where a
    base bias of an adapted module (``<path>.base_layer.bias``) is refused by name."""
    if cfg.bias == "none":
        if held := sorted(k for k in tensors if k.endswith(".base_layer.bias") and ".lora_" not in k):
            raise LoraError(f"{source} holds the base-model bias {held[0]} ({len(held)} in all), but its config has "
                            "bias='none'; a file with trained base biases says bias='lora_only' or 'all'")
        return {}, {}
    roots = sorted(selection.saved | selection.saved_loose)
    biases, copies = {}, {}
    for key, t in tensors.items():
        rest = key[len(PREFIX):]
        if ".lora_" in key or not (rest == "bias" or rest.endswith(".bias")):
            continue
        root = next((q for q in roots if rest.startswith(f"{q}.")), None)
        if root is None:
            biases[key] = t
            continue
        where, _, name = rest[len(root) + 1:].partition(".")
        if cfg.bias == "all" and where in ("original_module", "modules_to_save") and name:
            copies[key] = (root, where, name)
    return biases, copies


def _check_biases(model: nn.Module, cfg: LoraConfig, adapter: str, sites: list[Site], saved: list[tuple],
                  tokens: list[TokenSite], tensors: dict[str, torch.Tensor], source: Path, config_source: Path,
                  ) -> dict[str, tuple[nn.Parameter, torch.Tensor]]:
    """``{path: (base bias, its value in the file)}`` for ``cfg.bias`` (:func:`lorakit.targets.plan_biases`),
    the file holding exactly those biases under PEFT's keys (:func:`lorakit.files.format.base_bias_key`),
    in their shapes, floating point and finite; an existing adapter ``adapter`` must train the same ones."""
    reg = registry_of(model)
    planned = plan_biases(model, cfg, adapter, sites, saved, tokens, reg.biases if reg else None)
    wrapped = {s.path for s in sites}
    keys = {base_bias_key(path, wrapped): path for path in planned}
    try:
        _check({k: tuple(planned[p].shape) for k, p in keys.items()}, tensors, source)
    except LoraError as e:
        raise LoraError(f"{e} (base biases: bias={cfg.bias!r} in {config_source} selects {sorted(planned)[:6]}"
                        f"{' …' if len(planned) > 6 else ''})") from None
    if bad := sorted(k for k, t in tensors.items() if not t.is_floating_point()):
        raise LoraError(f"{source}: base bias {bad[0]} has dtype {tensors[bad[0]].dtype}, not floating point")
    if reg is not None and adapter in reg.configs:
        old = reg.configs[adapter].bias
        if old != cfg.bias or set(planned) != set(reg.biases.get(adapter, {})):
            raise LoraError(f"{config_source}: bias={cfg.bias!r} (base biases of {sorted(planned)[:6]}) differs from adapter "
                            f"{adapter!r}'s bias={old!r}; delete the adapter first, then load the file")
    return {path: (planned[path], tensors[key]) for key, path in keys.items()}


def _check_copies(modules: dict[str, nn.Module], copies: dict[str, tuple[str, str, str]],
                  tensors: dict[str, torch.Tensor], source: Path) -> None:
    """PEFT's ``bias="all"`` also writes, for a module ``c`` saved whole, ``c.original_module.<bias>`` (the
    base module's bias, never trained: PEFT writes it back into the base) and ``c.modules_to_save.<bias>``
    (the copy's bias, again). lorakit keeps the base module as it is, so both must be what they repeat:
    the model's own bias, and the copy's value in the file."""
    for key, (root, where, name) in copies.items():
        t = tensors.get(f"{PREFIX}{root}.{name}") if where == "modules_to_save" else None
        if where == "original_module":
            try:
                t = modules[root].get_parameter(name).detach()
            except AttributeError:
                raise LoraError(f"{source}: unexpected key {key}: module {root} has no parameter {name!r}") from None
        value = tensors[key]
        if t is None or tuple(t.shape) != tuple(value.shape) or not torch.equal(value.to(t.dtype).cpu(), t.cpu()):
            what = "the copy's" if where == "modules_to_save" else "the base model's"
            raise LoraError(f"{source}: {key} differs from {what} {root}.{name}; lorakit does not change the base "
                            f"modules of modules_to_save {root!r} (PEFT would write it into the original module)")


def _check_tokens(model: nn.Module, cfg: LoraConfig, adapter: str, existing: bool, tensors: dict[str, torch.Tensor],
                  source: Path) -> list[TokenSite]:
    """The trainable-token layers of ``cfg`` (:func:`lorakit.targets.plan_tokens`), with the file holding
    exactly their rows' values (``<path>.token_adapter.trainable_tokens_delta``, (len(ids), dim), finite;
    none for a tied head); for an existing adapter, on the layers and rows it has."""
    if existing:
        have = {p: t for p, t in token_layers(model) if adapter in t.token_indices}
        sites = [TokenSite(p, t.base_layer, t, "", t, t.token_indices[adapter], "tied" if t.tied else None)
                 for p, t in have.items()]
        if cfg.trainable_token_indices is not None and not sites or sites and cfg.trainable_token_indices is None:
            raise LoraError(f"{source}: trainable_token_indices={cfg.trainable_token_indices!r} does not match "
                            f"adapter {adapter!r}'s trainable tokens on {sorted(have)}; delete the adapter first")
    else:
        sites = plan_tokens(model, cfg)
    expected = {f"{PREFIX}{s.path}{TOKENS_SUFFIX}": (len(s.indices), s.module.weight.shape[1])
                for s in sites if s.tied is None}
    problems = [f"missing {k} (expected shape {v}, for trainable_token_indices)" for k, v in expected.items()
                if k not in tensors]
    problems += [f"unexpected key {k} (trainable tokens the config's trainable_token_indices does not select)"
                 for k in tensors if k not in expected]
    problems += [f"{k}: expected shape {v} (the rows of trainable_token_indices), found {tuple(tensors[k].shape)}"
                 for k, v in expected.items() if k in tensors and tuple(tensors[k].shape) != v]
    problems += [f"{k}: {bad}" for k, t in tensors.items() if not t.is_floating_point() and (bad := "not floating point")
                 or t.is_floating_point() and (bad := _nonfinite(t))]
    if problems:
        raise LoraError(f"{source} does not fit this model: " + "; ".join(problems))
    return sites


def _layouts(sites: list[Site], tensors: dict[str, torch.Tensor], cfg: LoraConfig, source: Path) -> list[Site]:
    """The sites with the grouped-conv layout the file holds (:func:`lorakit.kinds.conv.grouped_layout`:
    PEFT's if A has the weight's dims, else lorakit's); refused: a layout other than the one of the
    layer's existing adapters, and DoRA on PEFT's layout (PEFT 0.21 accepts it, but its weight norm
    reshapes B·A across mismatched shapes, so it is not ‖W + ΔW‖)."""
    out = []
    for s in sites:
        a = tensors.get(factor_keys(s.path, s.kind)[0])
        kind = grouped_layout(s.weight, a) if s.kind is GROUPED and a is not None else s.kind
        if s.layer is not None and s.layer.adapters() and s.layer.kind is not kind:
            raise LoraError(f"{source}: {s.path} holds its adapter in the {kind.name!r} layout (A of shape "
                            f"{tuple(a.shape)}), but the layer's adapters {s.layer.adapters()} are in the "
                            f"{s.layer.kind.name!r} layout; one layer holds one layout: delete them first")
        if cfg.use_dora and kind is not s.kind:
            raise LoraError(f"{source}: {s.path}: DoRA on PEFT's grouped-conv layout is not supported (PEFT 0.21 accepts "
                            "it but computes the weight norm from B·A reshaped across mismatched shapes, which is "
                            "not the norm of W + ΔW); use lorakit's grouped layout (lorakit.inject) for DoRA")
        if kind is not s.kind:
            kind.check_base(s.module, s.path)
        out.append(s if kind is s.kind else dataclasses.replace(s, kind=kind))
    return out


def _embedding_bases(model: nn.Module, tensors: dict[str, torch.Tensor], selection: _Selection,
                     source: Path) -> dict[str, torch.Tensor]:
    """``{file key: the model's weight it sets}`` for the embeddings' base weights that PEFT's
    ``save_embedding_layers`` put in the file (``<path>.base_layer.weight`` of a LoRA-adapted
    embedding, ``<path>.weight`` of a resized one), checked: shape equal to the model's (a resized
    vocabulary needs ``resize_token_embeddings`` first), floating point, finite, and equal where
    the input and output embeddings share one weight. Modules in modules_to_save are not bases."""
    embeddings = {p: m for p, m in embedding_modules(model).items()
                  if p not in selection.saved_loose and p not in selection.saved}
    bases, problems, resized = {}, [], None
    for key, t in tensors.items():
        hit = None if ".lora_" in key else embedding_base_param(key, embeddings)
        if hit is None:
            continue
        path, name = hit
        param = getattr(embeddings[path], name)
        if tuple(t.shape) != tuple(param.shape):
            problems.append(f"{key} has shape {tuple(t.shape)}, the model's {path}.{name} {tuple(param.shape)}")
            resized = t.shape[0]
        elif not t.is_floating_point():
            problems.append(f"{key}: dtype {t.dtype} is not floating point")
        elif bad := _nonfinite(t):
            problems.append(f"{key}: {bad}")
        elif (other := next((k for k, p in bases.items() if p is param), None)) is not None \
                and not torch.equal(tensors[other], t):
            problems.append(f"{key} and {other} set the same (tied) weight of the model to different values")
        bases[key] = param
    if resized is not None:
        problems.append(f"the adapter was saved from a model with a resized vocabulary of {resized} tokens: resize "
                        f"this model's embeddings first (model.resize_token_embeddings({resized})), then load")
    if problems:
        raise LoraError(f"{source}: the embedding weights it holds do not fit this model: " + "; ".join(problems))
    return bases


def checked(model: nn.Module, directory: str | os.PathLike, adapter: str = "default",
            allow_precision_change: bool = False, fit_existing: bool = True) -> _Prepared:
    """Every check of :func:`load`, without changing ``model``: the file read and checked, with its
    config, tensors and planned sites. ``fit_existing=False``: an existing adapter ``adapter`` need
    not have the file's shapes (the caller checks what it needs, as :mod:`lorakit.hotswap` does)."""
    return _prepare(model, Path(directory), adapter, allow_precision_change, fit_existing)


def verify(model: nn.Module, directory: str | os.PathLike, adapter: str = "default",
          allow_precision_change: bool = False) -> LoraConfig:
    """Run every check of :func:`load` (config, keys, shapes, dtypes, finite values, base
    quantization) without changing ``model``; raise :class:`LoraError` on the first problem, else
    return the config that :func:`load` would use. The tensors are read and dropped."""
    return _prepare(model, Path(directory), adapter, allow_precision_change).cfg


def load(model: nn.Module, directory: str | os.PathLike, adapter: str = "default",
         activate: bool = True, allow_precision_change: bool = False) -> nn.Module:
    """Load a PEFT-format adapter from ``directory`` as adapter ``adapter`` and make it active
    (``activate=False``: keep the active set; the loaded adapter stays inactive and frozen).

    If the model has no adapter of that name, one is injected per the saved config (on exactly
    the modules the file holds). Any mismatch, and any NaN or infinite value, raises
    :class:`LoraError` and leaves the model as it was, as does a lorakit file saved from layers
    quantized otherwise (nf4 / fp4 / int8 / full precision) than the model's, unless
    ``allow_precision_change`` (see :func:`lorakit.quant.check_trained_precision`). Returns ``model``.

    A file that holds the base weights of the model's input/output embeddings (PEFT's
    ``save_embedding_layers``) sets them in the model, as PEFT does (in place: a tied output
    embedding follows; deleting the adapter does not restore them); their shapes must be the model's. A file
    with ``bias="lora_only"`` / ``"all"`` writes the base biases it holds into the model, as PEFT does;
    a copy of their values is kept first, restored by :func:`lorakit.delete`.
    """
    if any(adapter in layer.true_rank for _, layer in lora_layers(model)):
        raise LoraError(f"adapter {adapter!r} is prepared for hot-swapping (its factors are zero-padded); load "
                        "into it with lorakit.load, which swaps in place (this function would not)")
    prepared = _prepare(model, Path(directory), adapter, allow_precision_change)
    cfg, tensors = prepared.cfg, prepared.tensors
    if prepared.existing:
        reg = registry(model)
    elif is_sharded(model):
        raise LoraError(f"the model is sharded (FSDP2) and has no adapter {adapter!r}: new adapter weights would "
                        "not be sharded; load the adapter before lorakit.distributed.fully_shard_model, or into "
                        "an existing adapter of that name")
    else:
        apply_plan(model, adapter, cfg, prepared.sites, prepared.saved, activate, prepared.tokens,
                   {path: b for path, (b, _) in prepared.biases.items()})  # (keeps a copy of their values)
    with torch.no_grad():  # a sharded (FSDP2) parameter takes its shard of the whole tensor (a collective)
        for path, layer in lora_layers(model):
            if adapter in layer.lora_A:
                for factor, key in zip((layer.lora_A[adapter], layer.lora_B[adapter]), factor_keys(path, layer.kind)):
                    factor.copy_(like_param(tensors[key], factor))
                if adapter in layer.lora_magnitude_vector:
                    m = layer.lora_magnitude_vector[adapter]
                    m.copy_(like_param(tensors[magnitude_key(path)], m))
                if adapter in layer.lora_bias:
                    b = layer.lora_bias[adapter]
                    b.copy_(like_param(tensors[bias_key(path)], b))
        for path, layer in token_layers(model):
            if adapter in layer.trainable_tokens_delta:
                t = layer.trainable_tokens_delta[adapter]
                t.copy_(like_param(tensors[f"{PREFIX}{path}{TOKENS_SUFFIX}"], t))
        for b, value in prepared.biases.values():  # the base biases it trains, as PEFT's load_state_dict
            b.copy_(like_param(value, b))
        for key, param in prepared.bases.items():  # the embeddings' base weights, as PEFT's load_state_dict
            param.copy_(like_param(tensors[key], param))  # in place: a tied output embedding follows
        for path, wrapper in saved_modules(model):
            if adapter in wrapper.adapters():
                prefix, own = f"{PREFIX}{path}.", wrapper.modules_to_save[adapter].state_dict()
                wrapper.modules_to_save[adapter].load_state_dict(
                    {k[len(prefix):]: like_param(t, own[k[len(prefix):]]) for k, t in tensors.items()
                     if k.startswith(prefix)})
    if prepared.existing:
        for path, layer in lora_layers(model):
            if adapter in layer.lora_A:
                layer.scale[adapter] = cfg.scale_for(path)
                layer.dropout[adapter] = cfg.dropout
        reg.configs[adapter] = cfg
        set_active(model, adapter if activate else reg.active)
    return model
