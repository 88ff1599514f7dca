"""Target selection: which weights of a model an adapter goes on (pure; never mutates the model).

:func:`plan` walks the model, resolves every pattern of a :class:`LoraConfig` and returns one
:class:`Site` per weight to adapt, or raises a :class:`LoraError` that names what was wrong and
what would be valid. Injection (:mod:`lorakit.model`) and loading (:mod:`lorakit.files`) both build on
it, so a load can be checked completely before anything is changed. :func:`check_rewriting_inits`
is the planning-time check of the inits that rewrite W (:mod:`lorakit.variants.rewriting_inits`).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from torch import nn
from torch.nn.utils import parametrize

from .config import LoraConfig, LoraError, Target
from .kinds import Kind, LinearKind, kind_of, parameter_kind, supported
from .layers import LoraLayer, SavedModule
from .state import walk
from .tokens import TokenLayer
from .variants import dora
from .variants.rewriting_inits import FLOATS, rewrites, rewritten

__all__ = ["Site", "TokenSite", "plan", "plan_saved", "plan_tokens", "plan_biases", "parts", "matcher", "output_heads",
           "check_rewriting_inits"]

_PLAIN = re.compile(r"[\w.\-]+")
#: Names treated as the output head by "all-linear" (besides HF's get_output_embeddings()).
HEAD_NAMES = ("lm_head", "classifier", "score", "head")


@dataclass(frozen=True)
class Site:
    """One weight to adapt: the module at ``path`` (seen through any existing LoraLayer)."""

    path: str
    module: nn.Module
    kind: Kind
    param: str
    r: int
    scale: float
    parent: nn.Module
    attr: str
    layer: LoraLayer | None  # the existing wrapper, if the module already has adapters

    @property
    def weight(self):
        return getattr(self.module, self.param)


def matcher(pattern: str):
    if _PLAIN.fullmatch(pattern):
        return lambda path: path == pattern or path.endswith("." + pattern)
    rx = re.compile(pattern)
    return lambda path: rx.fullmatch(path) is not None


def output_heads(model: nn.Module, modules: dict[str, nn.Module]) -> set[str]:
    heads = {p for p in modules if p.rsplit(".", 1)[-1] in HEAD_NAMES}
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    heads |= {p for p, m in modules.items() if out is not None and m is out}
    return heads


def _unmatched(pattern: Target, names: list, what: str) -> LoraError:
    """The error for a pattern that matches nothing; ``names`` are paths (modules for a type)."""
    if isinstance(pattern, type):
        types = sorted({type(m).__name__ for m in names})
        return LoraError(f"target type {pattern.__name__} matches no module; the model has: "
                         f"{', '.join(types)}")
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    close = difflib.get_close_matches(str(pattern), leaves + names, n=6, cutoff=0.5)
    hint = f"closest {what} names: {', '.join(close)}" if close else \
        f"{what} names in the model include: {', '.join(leaves[:20])}"
    return LoraError(f"target {pattern!r} matches no {what}; {hint}")


def plan(model: nn.Module, cfg: LoraConfig) -> list[Site]:
    """Resolve ``cfg``'s targets on ``model``; raise if any pattern matches nothing."""
    entries = list(walk(model))
    modules = {path: m for path, m, *_ in entries}
    excluded = [matcher(e) for e in cfg.exclude]
    is_excluded = lambda p: any(m(p) for m in excluded)  # noqa: E731
    chosen: dict[str, tuple[Kind, str]] = {}
    owners = parts(modules)

    for target in cfg.targets:
        if target == "all-linear":
            heads = output_heads(model, modules)
            hits = [p for p, m in modules.items()
                    if getattr(kind_of(m), "all_linear", False) and p not in heads and p not in owners]
        elif isinstance(target, type):
            hits = [p for p, m in modules.items() if isinstance(m, target)]
        else:
            match = matcher(target)
            hits = [p for p in modules if match(p)]
        if not hits:
            raise _unmatched(target, list(modules.values() if isinstance(target, type) else modules), "module")
        if cfg.layers_to_transform and not (isinstance(target, str) and target != "all-linear"
                                            and not _PLAIN.fullmatch(target)):  # PEFT's rule: not a regex, nor a full path
            hits = [p for p in hits if p == target or cfg.in_layers(p)]
            if not hits:
                raise LoraError(f"target {target!r} matches no module in layers_to_transform="
                                f"{list(cfg.layers_to_transform)} (layers_pattern={list(cfg.layers_pattern) or None}); "
                                "a module's layer is the number after the pattern in its path (model.layers.3.mlp → 3)")
        for p in hits:
            kind = kind_of(modules[p])
            if kind is None:
                raise LoraError(
                    f"target {target!r} matches {p} of type {type(modules[p]).__name__}, which is not a "
                    f"supported layer ({supported()}; others: lorakit.register_kind); narrow the pattern, "
                    f"or adapt a raw weight with target_parameters=['{p}.weight']")
            _check_not_part(owners, modules, p)
            if not is_excluded(p):
                chosen[p] = (kind, kind.param)

    params = {f"{p}.{n}": (p, n) for p, m, *_ in entries for n, _ in m.named_parameters(recurse=False)}
    params.update({f"{p}.{n}": (p, n) for p, m, *_ in entries if parametrize.is_parametrized(m)
                   for n in m.parametrizations})  # by their effective names, to be refused below
    params.update({n: ("", n) for n, _ in model.named_parameters(recurse=False)})
    for target in cfg.target_parameters:
        match = matcher(target)
        hits = [full for full in params if match(full)]
        if not hits:
            raise _unmatched(target, list(params), "parameter")
        for full in hits:
            path, name = params[full]
            if not path:
                raise LoraError(f"target_parameters {target!r} matches {full}, a parameter of the root "
                                "module itself; only parameters of submodules can be adapted")
            if getattr(modules[path], name).dim() < 2:
                raise LoraError(f"target_parameters {target!r} matches {full} of shape "
                                f"{tuple(getattr(modules[path], name).shape)}; only weights with >= 2 dims "
                                "can take a low-rank update")
            _check_not_part(owners, modules, path)
            if path in chosen and chosen[path][1] != name:
                raise LoraError(f"{path}: an adapter can adapt one weight per module, but both "
                                f"{path}.{chosen[path][1]} and {full} are targeted")
            if not is_excluded(path):
                chosen[path] = (parameter_kind(modules[path], name), name)

    for path, (kind, _) in list(chosen.items()):  # a kind's parts come with it (same rank and alpha)
        chosen.update({f"{path}.{attr}": (part, part.param) for attr, part in kind.parts.items()})

    sites = []
    saved = {p for p, *_ in plan_saved(model, cfg, entries)}
    saved |= {p for p, _, _, _, w in entries if isinstance(w, SavedModule)}  # from other adapters
    for path, module, parent, attr, layer in entries:
        if path not in chosen:
            continue
        kind, param = chosen[path]
        if any(path == s or path.startswith(s + ".") for s in saved):
            raise LoraError(f"{path} is (inside) a module in modules_to_save; it cannot also get a LoRA "
                            "update: exclude it from targets")
        if layer is not None and layer.param_name != param:
            raise LoraError(f"{path}: already has adapters on {layer.param_name!r}; cannot add one on {param!r}")
        _check_not_parametrized(entries, path, module, param)
        kind.check_base(module, path)
        if cfg.dropout > 0 and not kind.supports_dropout:
            what = "raw parameters" if kind.selected_by == "target_parameters" else f"{kind.name} layers"
            raise LoraError(f"{path}.{param}: dropout is not supported on {what} (the adapter sees no input "
                            "of its own); use dropout=0")
        if cfg.use_dora and not kind.dora:
            what = "raw parameters" if kind.selected_by == "target_parameters" else \
                f"{kind.name} layers ({type(module).__name__})"
            raise LoraError(f"{path}.{param}: DoRA (use_dora=True) is not defined for {what}; it works on "
                            "nn.Linear, transformers' Conv1D, nn.Embedding and nn.Conv1d/2d/3d: keep this "
                            "module out of the targets")
        if cfg.use_dora:
            dora.check_weight(kind, getattr(module, param), f"{path}.{param}")
        if cfg.lora_bias and not kind.lora_bias:
            what = "raw parameters" if kind.selected_by == "target_parameters" else \
                f"{kind.name} layers ({type(module).__name__})"
            raise LoraError(f"{path}.{param}: lora_bias=True is not supported on {what}; it works on nn.Linear, "
                            "transformers' Conv1D and nn.Conv1d/2d/3d with groups=1: keep this module out of the targets")
        owner = owners.get(path, path)
        sites.append(Site(path, module, kind, param, cfg.rank_for(owner), cfg.scale_for(owner),
                          parent, attr, layer))
    if not sites and not saved and cfg.trainable_token_indices is None:
        raise LoraError(f"every module matched by {list(cfg.targets) + list(cfg.target_parameters)} "
                        f"is excluded by {list(cfg.exclude)}")
    return sites


def parts(modules: dict[str, nn.Module]) -> dict[str, str]:
    """``{part path: owner path}`` for every submodule that its owner's kind lists in ``parts``
    (e.g. ``attn.out_proj`` of an ``nn.MultiheadAttention`` at ``attn``)."""
    return {f"{p}.{attr}": p for p, m in modules.items() if (kind := kind_of(m)) is not None
            for attr in kind.parts if f"{p}.{attr}" in modules}


def _check_not_part(owners: dict[str, str], modules: dict[str, nn.Module], path: str) -> None:
    if path in owners:
        owner = owners[path]
        raise LoraError(f"{path} is read directly by {owner} ({type(modules[owner]).__name__}), whose forward "
                        f"does not call it, so an adapter on it alone would have no effect; target {owner!r} "
                        f"instead (it adapts {path} too)")


def _check_not_parametrized(entries: list, path: str, module: nn.Module, param: str) -> None:
    """Refuse a weight computed by ``torch.nn.utils.parametrize`` (or a tensor of its machinery).

    W + ΔW cannot be written back exactly through a parametrization: only ``original`` can be set,
    and f(original') = W + ΔW has an exact solution only for some f (not for weight norm, orthogonal,
    symmetric...). So such weights are refused when planned, before anything changes."""
    owner = next((p for p, m, *_ in entries if isinstance(m, parametrize.ParametrizationList)
                  and (path == p or path.startswith(p + "."))), None)
    if owner is not None:
        raise LoraError(f"{path}.{param} belongs to the parametrization {owner} "
                        "(torch.nn.utils.parametrize), not to a layer; it cannot be adapted. Remove the "
                        "parametrization first (torch.nn.utils.parametrize.remove_parametrizations) and "
                        "adapt the weight itself")
    if parametrize.is_parametrized(module, param):
        kinds = ", ".join(type(f).__name__ for f in module.parametrizations[param])
        raise LoraError(
            f"{path}.{param} is computed by a parametrization ({kinds}); a LoRA update cannot be merged "
            f"exactly into it. Remove it first, keeping the current values: torch.nn.utils.parametrize."
            f"remove_parametrizations(model.{path}, {param!r}), or adapt another weight")


def _inside_saved(entries: list, path: str) -> bool:
    return any(path.startswith(p + ".") for p, _, _, _, w in entries if isinstance(w, SavedModule))


def plan_saved(model: nn.Module, cfg: LoraConfig, entries: list | None = None) -> list[tuple]:
    """``(path, module, parent, attr, wrapper)`` of every module in ``cfg.modules_to_save``."""
    entries = list(walk(model)) if entries is None else entries
    chosen = []
    for pattern in cfg.modules_to_save:
        match = matcher(pattern)
        hits = [e for e in entries if match(e[0]) and not _inside_saved(entries, e[0])]
        if not hits:
            raise _unmatched(pattern, [e[0] for e in entries], "module")
        for e in hits:
            if isinstance(e[4], LoraLayer):
                raise LoraError(f"{e[0]} has LoRA adapters; it cannot also be in modules_to_save")
        chosen += [e for e in hits if e not in chosen]
    return chosen


def check_rewriting_inits(model: nn.Module, cfg: LoraConfig, adapter: str, sites: list[Site]) -> None:
    """Raise :class:`LoraError` (before anything changes) if adapter ``adapter`` with ``cfg`` cannot
    go on ``sites``: a rewriting init needs a float (fp32/fp16/bf16) Linear or Conv1D weight, not
    shared with another module, with r <= min(out, in) and no other adapter on the layer; and no
    adapter joins a layer whose weight a rewriting adapter has replaced by its residual."""
    shared = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    for s in sites:
        others = rewritten(s.layer) if s.layer is not None else []
        if others:
            raise LoraError(f"{s.path}: adapter {others[0]!r} initialised W by {s.layer._init_kind[others[0]]} and "
                            f"left the residual in W, so adapter {adapter!r} would be trained on, and run with, "
                            "the residual instead of the original weight; save that adapter with "
                            "convert_to_lora=True and load the conversion on the unmodified model instead")
        if not rewrites(cfg.init):
            continue
        w = s.weight
        if not isinstance(s.kind, LinearKind) or s.kind.selected_by != "target_modules" or w.dim() != 2:
            raise LoraError(f"{s.path}: init={cfg.init!r} is defined for Linear and Conv1D layers (as in PEFT), "
                            f"not for a {s.kind.name!r} weight; target only linear layers or use init='kaiming'")
        if w.dtype not in FLOATS:
            raise LoraError(f"{s.path}: init={cfg.init!r} needs a float32/float16/bfloat16 weight, found {w.dtype} "
                            "(initialise on the full-precision model, then quantize the residual)")
        if s.r > min(w.shape):
            raise LoraError(f"{s.path}: init={cfg.init!r} with r={s.r} needs r <= min(out, in) = {min(w.shape)}")
        if s.layer is not None and s.layer.adapters():
            raise LoraError(f"{s.path}: init={cfg.init!r} rewrites W, which adapters {s.layer.adapters()} were "
                            f"trained against; a {cfg.init} adapter must be the only adapter on its layers")
        if len(shared.get(id(w), ())) > 1:
            names = [n.replace(".base_layer", "") for n in shared[id(w)]]
            raise LoraError(f"{s.path}: init={cfg.init!r} would rewrite a weight shared by {names}")


@dataclass(frozen=True)
class TokenSite:
    """One layer that gets trainable tokens: the module at ``path`` (seen through an existing
    TokenLayer, ``layer``), rows ``indices``; ``tied``: the path of the input embedding whose
    TokenLayer this head reads (its weight is the embedding's), else None."""

    path: str
    module: nn.Module
    parent: nn.Module
    attr: str
    layer: TokenLayer | None
    indices: tuple[int, ...]
    tied: str | None = None


def plan_tokens(model: nn.Module, cfg: LoraConfig) -> list[TokenSite]:
    """Resolve ``cfg.trainable_token_indices`` as PEFT does: a list goes to the input embedding
    (``get_input_embeddings()``, else the module named ``embed_tokens``), a dict's keys select modules
    by plain string suffix (each must match); a head whose weight is the input embedding's (tied) gets
    the same rows, read from the embedding's layer (it may be listed, with the same ids). Raises
    :class:`LoraError` for a module that is not an ``nn.Embedding`` / ``nn.Linear``, ids out of range,
    a module that also has LoRA or is in modules_to_save, and tied layers listed with different ids."""
    wanted = cfg.trainable_token_indices
    if wanted is None:
        return []
    entries = {e[0]: e for e in walk(model)}
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    emb_path = next((p for p, e in entries.items() if emb is not None and (e[1] is emb or e[4] is emb)), None)
    if not isinstance(wanted, dict):
        path = emb_path or next((p for p in entries if p.rsplit(".", 1)[-1] == "embed_tokens"), None)
        if path is None:
            raise LoraError("trainable_token_indices as a list needs the model's input embedding "
                            "(get_input_embeddings() or a module named embed_tokens); name the module: "
                            "trainable_token_indices={'<module name>': [...]}")
        wanted = {path: wanted}
    chosen: dict[str, tuple[int, ...]] = {}
    for key, ids in wanted.items():
        hits = [p for p in entries if p.endswith(key)]
        if not hits:
            raise _unmatched(key, list(entries), "module")
        for p in hits:
            if chosen.get(p, ids) != ids:
                raise LoraError(f"trainable_token_indices selects {p} twice with different ids")
            chosen[p] = ids
    heads = {}  # tied heads: same Parameter as the input embedding's weight
    if emb_path in chosen:
        w = entries[emb_path][1].weight
        heads = {p: emb_path for p, e in entries.items() if p != emb_path and getattr(e[1], "weight", None) is w}
    for head in heads:
        if head in chosen and chosen[head] != chosen[emb_path]:
            raise LoraError(f"{head} shares its weight with {emb_path} (tied embeddings), but trainable_token_indices "
                            f"gives them different ids ({list(chosen[head])} and {list(chosen[emb_path])}); give "
                            "tied layers the same ids")
        chosen[head] = chosen[emb_path]
    saved = {p for p, *_ in plan_saved(model, cfg)} if cfg.modules_to_save else set()
    saved |= {s.path for s in plan(model, cfg)} if cfg.targets or cfg.target_parameters else set()
    sites = []
    for p, ids in chosen.items():
        _, module, parent, attr, wrapper = entries[p]
        if not isinstance(module, (nn.Embedding, nn.Linear)):
            raise LoraError(f"trainable_token_indices selects {p} of type {type(module).__name__}; trainable tokens "
                            "are rows of an nn.Embedding or nn.Linear (an output head)")
        if wrapper is not None and not isinstance(wrapper, TokenLayer) or p in saved:
            raise LoraError(f"{p} has LoRA adapters or is in modules_to_save; it cannot also have trainable tokens "
                            "(train it whole with modules_to_save, or its rows with trainable_token_indices)")
        rows = module.weight.shape[0]
        if max(ids) >= rows:
            raise LoraError(f"trainable_token_indices for {p}: token id {max(ids)} is out of range, the layer has "
                            f"{rows} rows (resize the embeddings first for new tokens)")
        sites.append(TokenSite(p, module, parent, attr, wrapper, ids, heads.get(p)))
    return sorted(sites, key=lambda s: s.tied is not None)  # owners first: tied heads read their layer


def _under(path: str, roots: Sequence[str]) -> str | None:
    """The first of ``roots`` that is ``path`` or one of its ancestors, else None."""
    return next((q for q in roots if path == q or path.startswith(f"{q}.")), None)


def plan_biases(model: nn.Module, cfg: LoraConfig, adapter: str, sites: Sequence[Site], saved: Sequence[tuple],
                tokens: Sequence[TokenSite] = (), taken: Mapping[str, Mapping[str, tuple]] | None = None,
                ) -> dict[str, nn.Parameter]:
    """``{module path: its bias parameter}``: the base-model biases adapter ``adapter`` trains by
    ``cfg.bias`` (PEFT's rule): ``"lora_only"``, the ``bias`` of each module in ``sites``; ``"all"``,
    every parameter named ``bias`` except inside modules trained whole (``saved`` and existing
    ``modules_to_save`` copies hold their own). A bias shared by several modules counts once. Raises
    :class:`LoraError`, before anything changes, for a bias another adapter already trains (``taken``:
    the registry's ``biases``; the model holds one value per bias) and for a bias inside a module
    adapted through ``target_parameters`` or given trainable tokens (PEFT names it by its wrappers)."""
    if cfg.bias == "none":
        return {}
    entries = list(walk(model))
    if cfg.bias == "lora_only":
        found = [(s.path, s.module._parameters.get("bias")) for s in sites]
    else:
        whole = [e[0] for e in saved] + [e[0] for e in entries if isinstance(e[4], SavedModule)]
        found = [(p, m._parameters.get("bias")) for p, m, *_ in entries if _under(p, whole) is None]
    biases: dict[str, nn.Parameter] = {}
    for path, b in found:
        if b is not None and all(b is not other for other in biases.values()):
            biases[path] = b
    wrapped = [s.path for s in sites if s.kind.selected_by == "target_parameters"]
    wrapped += [t.path for t in tokens] + [p for p, *_, w in entries if isinstance(w, TokenLayer)]
    for path in biases:
        if (owner := _under(path, wrapped)) is not None:
            raise LoraError(f"bias={cfg.bias!r}: {path}.bias is inside {owner}, which the adapter adapts through "
                            "target_parameters or trainable tokens; training that base bias is not supported there "
                            "(use bias='none', or bias='lora_only' with target_modules)")
    owners = {id(b): (name, path) for name, held in (taken or {}).items() if name != adapter
              for path, (b, _) in held.items()}
    for path, b in biases.items():
        if id(b) in owners:
            other, where = owners[id(b)]
            raise LoraError(f"adapter {adapter!r} (bias={cfg.bias!r}) would train the base bias {path}.bias, which "
                            f"adapter {other!r} already trains (as {where}.bias); the model holds one value per bias, "
                            f"so two adapters cannot both train it: delete {other!r} first, or use bias='none'")
    return biases
