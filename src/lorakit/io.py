"""Save and load adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module path>.lora_A.weight`` / ``lora_B.weight`` (embeddings:
``lora_embedding_A`` / ``lora_embedding_B``), and for DoRA (``use_dora: true``) also
``<module path>.lora_magnitude_vector``, tensors in PEFT's shapes, fp32 by default.

Loading is strict and all-or-nothing: the whole file is checked against the model (keys, shapes,
prefix, finite values) and against its own config (the config must select, by PEFT's rules,
exactly the modules the tensors hold) before the model is touched. Nothing is ever unpickled.

Saving is crash-safe: each file is replaced atomically (temp file, fsync, rename), the config
first, the weights last, and the weights carry the text of their config in the safetensors
metadata (``lorakit_config``; adapter_config.json itself holds only PEFT's fields, so PEFT reads
it without warnings). A crash between the two renames leaves a new config next to the previous
weights; :func:`load` sees that the config differs from the one the weights were saved with and
loads the weights' own copy, with a warning, so the previous adapter loads intact. The same
happens, with the same warning, when a lorakit-saved config was edited by hand: the weights'
config wins. (Files without that metadata, e.g. PEFT's, use adapter_config.json as it is.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import nn

from . import distributed as D
from . import dora, inits, quant
from .config import LoraConfig, LoraError
from .layers import LoraLayer
from .model import attach, check_name, lora_layers, registry, saved_modules, set_active, unwrap
from .kinds import Kind
from .targets import Site, parts, plan, plan_saved, walk

__all__ = ["save", "load", "check", "CONFIG_NAME", "WEIGHTS_NAME", "PREFIX"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_META_KEY = "lorakit_config"
_QUANT_KEY = "lorakit_base_quantization"  # {path: "nf4" | "fp4" | "int8"} of the adapted quantized layers
_LEGACY_HASH_KEY = "lorakit_weights_sha256"  # in adapter_config.json of files from earlier lorakit versions
# PEFT options lorakit cannot honour: loading them silently would give different outputs.
_UNSUPPORTED = {"bias": "none", "layers_to_transform": None, "layers_pattern": None,
                "lora_bias": False, "use_qalora": False, "alora_invocation_tokens": None,
                "trainable_token_indices": None}


# -- PEFT's selection rules (tuners_utils.check_target_module_exists, other._set_trainable) ------
def _in_list(names: list[str], path: str) -> bool:
    """PEFT's rule for a list of target_modules / target_parameters: the path or a dotted suffix."""
    return path in names or any(path.endswith(f".{n}") for n in names)


@dataclasses.dataclass(frozen=True)
class _Selection:
    """What a PEFT config selects on a model (module paths; ``params``: "path.name")."""

    modules: set[str]
    params: set[str]
    saved: set[str]  # modules_to_save by path or dotted suffix: these must be in the file
    saved_loose: set[str]  # by PEFT's plain string suffix ("pre_classifier" for "classifier"): these may be


def _keys(path: str, kind: Kind) -> tuple[str, str]:
    """The file keys of the factors A and B at ``path``. A kind's part (``attn.out_proj`` of an
    ``nn.MultiheadAttention``) sits inside its owner's wrapper in PEFT, so PEFT names it through
    the owner's ``base_layer`` (``attn.base_layer.out_proj``)."""
    if kind.selected_by is None:
        path = ".base_layer.".join(path.rsplit(".", 1))
    return f"{PREFIX}{path}.{kind.a_key}", f"{PREFIX}{path}.{kind.b_key}"


def _magnitude_key(path: str) -> str:
    """The file key of a DoRA magnitude at ``path`` (DoRA kinds are never a kind's part)."""
    return f"{PREFIX}{path}.lora_magnitude_vector"


def _module_path(key: str) -> str:
    """The module path (lorakit's, the original model's naming) of a factor's file key."""
    return key[len(PREFIX):].rsplit(".lora_", 1)[0].replace(".base_layer.", ".")


# -- save ---------------------------------------------------------------------------------------
def _target_modules(model: nn.Module, paths: list[str]) -> list[str]:
    """Shortest explicit list: leaf names if they select exactly ``paths`` (PEFT's dotted-suffix rule)."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    selected = {p for p, *_ in walk(model) if _in_list(leaves, p)}
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
        "target_modules": _target_modules(unwrap(model), modules) if modules else None,
        "target_parameters": sorted(params) or None, "exclude_modules": None,
        "rank_pattern": {re.escape(p): r for p, r in ranks.items() if r != cfg.r},
        "alpha_pattern": {re.escape(p): num(a) for p, a in alphas.items() if a != cfg.alpha},
        "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora,
        "fan_in_fan_out": any(layer.kind.fan_in_fan_out for _, layer in layers),
        "init_lora_weights": cfg.init if inits.rewrites(cfg.init) else True, "inference_mode": True, **_UNSUPPORTED,
        "modules_to_save": _target_modules(unwrap(model), saved) if saved else None,
    }


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
    loose = _outermost({p for p, *_ in walk(unwrap(model)) if any(p.endswith(n) for n in names or ())})
    extra = [(p, m) for p, m, *_ in walk(unwrap(model)) if p in loose and not related(p)]
    for p, m in extra:
        if any(isinstance(x, LoraLayer) for x in m.modules()) or p in {q for q, _ in lora_layers(model)}:
            raise LoraError(f"modules_to_save {names} also selects {p!r} in PEFT (which matches by plain string "
                            f"suffix), and {p!r} has LoRA adapters; rename the module or keep it out of the adapter")
    return extra


def _write_atomic(path: Path, data: bytes) -> None:
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


def save(model: nn.Module, directory: str | os.PathLike, adapter: str = "default",
         dtype: torch.dtype = torch.float32, convert_to_lora: bool = False) -> Path:
    """Write adapter ``adapter`` of ``model`` to ``directory`` in PEFT's format; returns the path.

    A PiSSA/OLoRA adapter (:mod:`lorakit.inits`) is saved as it is, with ``init_lora_weights``
    naming its init (loading it rewrites W again, as PEFT does); ``convert_to_lora=True`` saves it
    instead as a plain LoRA adapter of rank 2r for the *unmodified* model (PEFT's
    ``path_initial_model_for_weight_conversion``): factors [A; A₀] and [B, −B₀], ``r`` and
    ``rank_pattern`` doubled, alpha scaled to keep s (×2, or ×√2 with rsLoRA).

    A model sharded with FSDP2 (:func:`lorakit.distributed.fully_shard_model`) is saved by a
    collective: every rank calls ``save``, the adapter's tensors are gathered whole, rank 0 writes."""
    reg = registry(model)
    if adapter not in reg.configs:
        raise LoraError(f"unknown adapter {adapter!r}; the model has: {sorted(reg.configs)}")
    if convert_to_lora and not inits.rewrites(reg.configs[adapter].init):
        raise LoraError(f"adapter {adapter!r} has init {reg.configs[adapter].init!r}, which does not rewrite W: "
                        "its file already applies to the unmodified model; save it without convert_to_lora")
    tensors = {}
    for path, layer in lora_layers(model):
        if adapter in layer.lora_A:
            factors = inits.converted(layer, adapter) if convert_to_lora else (layer.lora_A[adapter],
                                                                              layer.lora_B[adapter])
            for key, t in zip(_keys(path, layer.kind), factors):
                tensors[key] = D.full_tensor(t.detach()).to("cpu", dtype).contiguous()
            if adapter in layer.lora_magnitude_vector:
                m = layer.lora_magnitude_vector[adapter].detach()
                tensors[_magnitude_key(path)] = D.full_tensor(m).to("cpu", dtype).contiguous()
    config = _peft_config(model, adapter)
    if convert_to_lora:
        config = _converted_config(config)
    whole = [(p, w.modules_to_save[adapter]) for p, w in saved_modules(model) if adapter in w.adapters()]
    for path, module in whole + _also_selected(model, adapter, config["modules_to_save"]):
        for key, t in module.state_dict().items():  # saved whole, as PEFT's modules_to_save: <path>.<state key>
            t = D.full_tensor(t.detach()).to("cpu").contiguous()
            tensors[f"{PREFIX}{path}.{key}"] = t.to(dtype) if t.is_floating_point() else t
    config = json.dumps(config, indent=2, sort_keys=True)
    quantized = {p: quant.format_of(layer.base_layer) for p, layer in lora_layers(model) if adapter in layer.lora_A}
    quantized = json.dumps({p: f for p, f in quantized.items() if f}, sort_keys=True)
    directory = Path(directory)
    if not D.is_main() and D.is_sharded(model):
        return directory  # the gathered tensors are written by rank 0
    weights = st_save(tensors, metadata={"format": "pt", _META_KEY: config, _QUANT_KEY: quantized})
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / CONFIG_NAME, config.encode())
    _write_atomic(directory / WEIGHTS_NAME, weights)
    return directory


# -- load ---------------------------------------------------------------------------------------
def _read_config(directory: Path) -> dict:
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


def _open_weights(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
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


def _consistent_config(config: dict, metadata: dict, directory: Path) -> tuple[dict, Path]:
    """The config that belongs to the weights: the JSON file, unless the weights were saved by
    lorakit with another config (a save interrupted between its two renames, or a hand edit):
    then the weights' embedded copy, with a warning."""
    if _META_KEY not in metadata:
        return config, directory / CONFIG_NAME  # PEFT's file, or weights rewritten by another tool
    source = directory / WEIGHTS_NAME
    try:
        embedded = json.loads(metadata[_META_KEY])
    except json.JSONDecodeError:
        embedded = None
    if not isinstance(embedded, dict):
        raise LoraError(f"{source}: its lorakit_config metadata is not a JSON object; save the adapter again")
    config = {k: v for k, v in config.items() if k != _LEGACY_HASH_KEY}
    if config == embedded:
        return config, directory / CONFIG_NAME
    changed = sorted(k for k in config.keys() | embedded.keys() if config.get(k) != embedded.get(k))
    warnings.warn(f"{directory / CONFIG_NAME} differs from the config {source} was saved with (in {changed}): "
                  "a save was interrupted, or the file was edited; loading the weights' own config",
                  stacklevel=4)
    return embedded, source


def _to_lora_config(config: dict, source: Path) -> LoraConfig:
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{source}: peft_type is {config.get('peft_type')!r}; lorakit loads LORA adapters")
    for key, default in _UNSUPPORTED.items():
        value = config.get(key, default)
        if value not in (default, None, [], {}, False) and value != default:
            raise LoraError(f"{source}: {key}={value!r} is not supported by lorakit (expected {default!r})")
    try:
        return LoraConfig(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout") or 0.0,
                          init=_init(config.get("init_lora_weights", True), source),
                          targets=config.get("target_modules") or (),
                          target_parameters=config.get("target_parameters") or (),
                          rank_pattern=config.get("rank_pattern") or {},
                          alpha_pattern=config.get("alpha_pattern") or {},
                          use_rslora=bool(config.get("use_rslora", False)),
                          use_dora=config.get("use_dora") or False,
                          modules_to_save=config.get("modules_to_save") or ())
    except KeyError as e:
        raise LoraError(f"{source}: missing required field {e.args[0]!r}") from None


def _init(value: object, source: Path) -> str:
    """lorakit's init for PEFT's ``init_lora_weights``: ``pissa``/``olora`` rewrite W on load as in PEFT
    (the trained factors then replace the initial ones); inits that only set the factors do not
    matter for a file that holds them; inits whose residual cannot be recomputed here are refused."""
    if value in ("pissa", "olora"):
        return value
    if isinstance(value, str) and (value.startswith("pissa_niter_") or value.lower() in ("corda", "loftq", "lora_ga")):
        why = ("its residual W - s*B0*A0 comes from a randomized SVD, which a load cannot reproduce"
               if value.startswith("pissa_niter_") else "its residual needs data or quantization that lorakit does not have")
        raise LoraError(f"{source}: init_lora_weights={value!r} is not supported: {why}; save the adapter "
                        "converted to plain LoRA (lorakit.save(..., convert_to_lora=True), PEFT's "
                        "path_initial_model_for_weight_conversion)")
    return "kaiming"


def _names(config: dict, key: str, source: Path) -> list[str] | str | None:
    value = config.get(key)
    if value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise LoraError(f"{source}: {key} must be a string or a list of strings, got {value!r}")


def _outermost(paths: set[str]) -> set[str]:
    return {p for p in paths if not any(p.startswith(f"{q}.") for q in paths)}


def _selection(config: dict, model: nn.Module, source: Path) -> _Selection:
    """What the PEFT ``config`` selects on ``model``, by PEFT's rules: target_modules as a list
    (path or dotted suffix), a regex string (full match) or "all-linear"; exclude_modules likewise;
    nothing inside a modules_to_save module; target_parameters by path or dotted suffix;
    modules_to_save (outermost modules) by path or dotted suffix, and, loosely, by PEFT's plain
    string suffix (a module only that rule selects keeps its original weights in PEFT when the file
    has none for it, so it may be absent)."""
    entries = list(walk(model))
    modules = {p: m for p, m, *_ in entries}
    to_save = _names(config, "modules_to_save", source) or []
    to_save = [to_save] if isinstance(to_save, str) else to_save
    saved = _outermost({p for p in modules if _in_list(to_save, p)})
    saved_loose = _outermost({p for p in modules if any(p.endswith(n) for n in to_save)})
    targets, excluded = _names(config, "target_modules", source), _names(config, "exclude_modules", source) or []
    try:
        if targets is None:
            chosen = set()
        elif isinstance(targets, str) and targets.lower() == "all-linear":
            chosen = {s.path for s in plan(model, LoraConfig(targets="all-linear"))}
        elif isinstance(targets, str):
            chosen = {p for p in modules if re.fullmatch(targets, p)}
        else:
            chosen = {p for p in modules if _in_list(targets, p)}
        if isinstance(excluded, str):
            chosen = {p for p in chosen if not re.fullmatch(excluded, p)}
    except re.error as e:
        raise LoraError(f"{source}: target_modules/exclude_modules is not a valid regex: {e}") from None
    chosen = {p for p in chosen if not (isinstance(excluded, list) and _in_list(excluded, p))
              and not any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", p) for m in to_save)}
    chosen |= {part for part, owner in parts(modules).items() if owner in chosen}  # they come with their owner
    wanted = _names(config, "target_parameters", source) or []
    wanted = [wanted] if isinstance(wanted, str) else wanted
    params = {f"{p}.{n}" for p, m in modules.items() for n, _ in m.named_parameters(recurse=False)
              if _in_list(wanted, f"{p}.{n}")}
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
        a_key, b_key = _keys(s.path, s.kind)
        expected[a_key], expected[b_key] = tuple(a_shape), tuple(b_shape)
        if cfg.use_dora:
            expected[_magnitude_key(s.path)] = dora.magnitude_shape(s.kind, s.weight)
    return expected


def _expected_existing(model: nn.Module, adapter: str) -> dict[str, tuple]:
    """Key -> shape of the adapter ``adapter`` the model already has."""
    expected = {f"{PREFIX}{p}.{k}": tuple(v.shape) for p, w in saved_modules(model) if adapter in w.adapters()
                for k, v in w.modules_to_save[adapter].state_dict().items()}
    for p, layer in lora_layers(model):
        if adapter in layer.lora_A:
            a_key, b_key = _keys(p, layer.kind)
            expected[a_key], expected[b_key] = tuple(layer.lora_A[adapter].shape), tuple(layer.lora_B[adapter].shape)
            if adapter in layer.lora_magnitude_vector:
                expected[_magnitude_key(p)] = tuple(layer.lora_magnitude_vector[adapter].shape)
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


def _prepare(model: nn.Module, directory: Path, adapter: str, allow_precision_change: bool = False) -> _Prepared:
    """Read ``directory`` and check it completely against ``model`` (raises :class:`LoraError`); pure."""
    if not directory.is_dir():
        raise LoraError(f"{directory}: not an adapter folder (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    check_name(adapter)
    reg = unwrap(model).__dict__.get("lorakit_registry")
    if reg is not None and reg.merged:
        raise LoraError(f"cannot load {adapter!r} while adapters {list(reg.merged)} are merged; unmerge first")
    config = _read_config(directory)
    tensors, metadata = _open_weights(directory)
    config, config_source = _consistent_config(config, metadata, directory)
    source = directory / WEIGHTS_NAME
    bad = sorted(k for k in tensors if not k.startswith(PREFIX))
    if bad:
        raise LoraError(f"{source}: key {bad[0]!r} (and {len(bad) - 1} more) lacks the prefix {PREFIX!r}; "
                        "expected keys like 'base_model.model.<module path>.lora_A.weight'")
    modules = {p: m for p, m, *_ in walk(unwrap(model))}
    paths = {_module_path(k) for k in tensors if ".lora_" in k}
    saved = {_owner(k[len(PREFIX):], modules) for k in tensors if ".lora_" not in k}
    if unknown := sorted(p for p in paths | saved if p not in modules):
        raise LoraError(f"{source}: the model has no module {unknown[0]!r} ({len(unknown)} unknown paths); "
                        f"is this adapter for another model? Model modules include: {sorted(modules)[:8]}")
    selection = _selection(config, unwrap(model), config_source)
    owned = parts(modules)  # planned with their owners, not targets of their own
    cfg = _exact_targets(_to_lora_config(config, config_source), {p for p in paths if owned.get(p) not in paths},
                         saved, selection.params)
    existing = reg is not None and adapter in reg.configs
    sites, saved_plan = plan(unwrap(model), cfg), plan_saved(unwrap(model), cfg)
    if not existing:
        inits.check(unwrap(model), cfg, adapter, sites)
    elif reg.configs[adapter].init != cfg.init and inits.rewrites(reg.configs[adapter].init) | inits.rewrites(cfg.init):
        raise LoraError(f"{config_source}: init_lora_weights {cfg.init!r} differs from adapter {adapter!r}'s "
                        f"init {reg.configs[adapter].init!r}, and one of them rewrites W; delete the adapter first")
    _check(_expected(cfg, sites, saved_plan), tensors, source)  # the file is complete in itself ...
    _agree(selection, paths, saved, config, config_source, source)  # ... and is what its config says
    if existing:  # ... and fits the adapter's current modules and shapes
        _check(_expected_existing(model, adapter), tensors, source)
    if not allow_precision_change:  # ... and the base is quantized as the one it was trained on
        quant.check_base(metadata.get(_QUANT_KEY), {s.path: quant.format_of(s.module) for s in sites}, str(source))
    return _Prepared(cfg, tensors, sites, saved_plan, existing)


def check(model: nn.Module, directory: str | os.PathLike, adapter: str = "default",
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
    ``allow_precision_change`` (see :func:`lorakit.quant.check_base`). Returns ``model``.
    """
    prepared = _prepare(model, Path(directory), adapter, allow_precision_change)
    cfg, tensors = prepared.cfg, prepared.tensors
    if prepared.existing:
        reg = registry(model)
    elif D.is_sharded(model):
        raise LoraError(f"the model is sharded (FSDP2) and has no adapter {adapter!r}: new adapter weights would "
                        "not be sharded; load the adapter before lorakit.distributed.fully_shard_model, or into "
                        "an existing adapter of that name")
    else:
        attach(model, adapter, cfg, prepared.sites, prepared.saved, activate)
    with torch.no_grad():  # a sharded (FSDP2) parameter takes its shard of the whole tensor (a collective)
        for path, layer in lora_layers(model):
            if adapter in layer.lora_A:
                for factor, key in zip((layer.lora_A[adapter], layer.lora_B[adapter]), _keys(path, layer.kind)):
                    factor.copy_(D.like_param(tensors[key], factor))
                if adapter in layer.lora_magnitude_vector:
                    m = layer.lora_magnitude_vector[adapter]
                    m.copy_(D.like_param(tensors[_magnitude_key(path)], m))
        for path, wrapper in saved_modules(model):
            if adapter in wrapper.adapters():
                prefix, own = f"{PREFIX}{path}.", wrapper.modules_to_save[adapter].state_dict()
                wrapper.modules_to_save[adapter].load_state_dict(
                    {k[len(prefix):]: D.like_param(t, own[k[len(prefix):]]) for k, t in tensors.items()
                     if k.startswith(prefix)})
    if prepared.existing:
        for path, layer in lora_layers(model):
            if adapter in layer.lora_A:
                layer.scale[adapter] = cfg.scale_for(path)
                layer.dropout[adapter] = cfg.dropout
        reg.configs[adapter] = cfg
        set_active(model, adapter if activate else reg.active)
    return model
