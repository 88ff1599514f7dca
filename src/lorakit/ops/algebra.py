"""Adapter algebra: :func:`combine` builds a new named adapter from weighted existing ones.

Methods (PEFT's ``add_weighted_adapter`` definitions, with wᵢ the user's weights, sᵢ the
adapters' scales, ΔWᵢ = sᵢ·Bᵢ·Aᵢ; every new adapter has scale 1, i.e. α = r per module):

``cat``      A = [w₁s₁A₁; w₂s₂A₂; …], B = [B₁ B₂ …]: rank Σrᵢ and ΔW = Σ wᵢΔWᵢ exactly (up to
             rounding wᵢsᵢAᵢ once to the factors' dtype). Refused where Σrᵢ > min(d, k).
``svd``      ΔW = Σ wᵢΔWᵢ (float64), truncated SVD to ``rank`` (default: the largest rᵢ):
             B = U·S, A = Vᵀ; the relative Frobenius error it introduces is reported per module.
``linear``   factors mixed separately: A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ, so ΔW = B·A
             has cross terms (it is *not* Σ wᵢΔWᵢ); all ranks on a module must be equal.
``ties``     the same per-factor weights; each factor pruned to its ``density`` largest |values|,
             a majority sign elected per element (``majority_sign``: "total" = sign of the sum,
             "frequency" = the more frequent sign), and the weighted values agreeing with it averaged.
``dare_linear`` / ``dare_ties``: like ``linear`` / ``ties`` with random pruning instead of by
             magnitude (each value kept with probability ``density``, then divided by ``density``),
             from a generator seeded with ``seed`` (draw order: module, then A before B, then adapter).

A module that only some of the adapters adapt is refused unless ``missing="zero"``: then the
absent adapters count as ΔWᵢ = 0 there (which is what PEFT does, for every method). Everything is
computed and checked before the model changes; a refusal leaves it as it was.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Mapping

import torch
from torch import Tensor, nn

from ..config import LoraConfig, LoraError, check_name
from ..kinds import Kind
from ..layers import LoraLayer
from ..model import apply_plan, check_names, require_unmerged
from ..state import lora_layers, registry, saved_modules, unwrap, walk
from ..targets import parts, plan, plan_saved

__all__ = ["combine", "CombineReport", "METHODS"]

METHODS = ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties")
_SPARSE = ("ties", "dare_linear", "dare_ties")


@dataclass(frozen=True)
class CombineReport:
    """What :func:`combine` made: the new adapter's rank per module and, per module, the relative
    Frobenius error ‖Σ wᵢΔWᵢ − ΔW_new‖ / ‖Σ wᵢΔWᵢ‖ in float64 (0 where Σ wᵢΔWᵢ = 0)."""

    adapter: str
    method: str
    ranks: dict[str, int]
    errors: dict[str, float]

    def __str__(self) -> str:
        rows = [f"{'module':<48} {'rank':>5} {'rel. error':>11}"]
        rows += [f"{p:<48} {self.ranks[p]:>5} {self.errors[p]:>11.3e}" for p in self.ranks]
        return f"adapter {self.adapter!r} ({self.method}):\n" + "\n".join(rows)


# -- shared with lorakit.ops.extraction -------------------------------------------------------------
def as_matrix(layer_kind: Kind, delta: Tensor) -> Tensor:
    """ΔW in W's layout → the (out, rest) matrix M with ΔW = M (transposed if the kind is), i.e.
    the space of B.flatten(1) @ A.flatten(1)."""
    return delta.t() if layer_kind.transposed else delta.reshape(delta.shape[0], -1)


def check_plain(path: str, kind: Kind, base: nn.Module, weight: Tensor, what: str) -> None:
    """Refuse a weight whose ΔW is not one matrix B.flatten(1) @ A.flatten(1) (stacked experts)."""
    a_shape, b_shape = kind.shapes(base, weight, 1)
    left, right = kind.matrices(base, weight, torch.empty(a_shape, device="meta"), torch.empty(b_shape, device="meta"))
    if (left.dim(), right.dim()) != (2, 2):
        raise LoraError(f"{path}: {what} needs ΔW = B·A as one matrix; a {kind.name} weight stacks several "
                        "(per expert), which this does not support")


def new_adapter(model: nn.Module, adapter: str, factors: dict[str, tuple[Tensor, Tensor]],
                saved: tuple[str, ...] = (), activate: bool = False) -> LoraConfig:
    """Add adapter ``adapter`` holding ``factors`` (path → (A, B) in PEFT's shapes) at scale 1
    (α = r per module) and, for ``saved`` paths, a copy of the module; returns its config.
    Plans first (a :class:`LoraError` changes nothing); the caller fills the ``saved`` copies."""
    layers = dict(lora_layers(model))
    modules = {p: m for p, m, *_ in walk(unwrap(model))}
    owned = parts(modules)
    ranks = {p: layers[p].kind.rank(layers[p].weight, a) if p in layers else a.shape[0]
             for p, (a, _) in factors.items()}
    top = max(ranks.values())
    cfg = LoraConfig(r=top, alpha=top, targets=_exact(p for p in factors if p not in owned),
                     rank_pattern={re.escape(p): r for p, r in ranks.items() if r != top},
                     alpha_pattern={re.escape(p): r for p, r in ranks.items() if r != top},
                     modules_to_save=_exact(saved))
    names = {p: layers[p].param_name for p in factors
             if p in layers and layers[p].kind.selected_by == "target_parameters"}
    if names:  # raw parameters are selected by target_parameters: by the parameter's name
        cfg = replace(cfg, targets=_exact(p for p in factors if p not in owned and p not in names),
                      target_parameters=_exact(f"{p}.{n}" for p, n in names.items()))
    sites = plan(unwrap(model), cfg)
    got = {s.path: (s.r, s.scale) for s in sites}
    if got != {p: (r, 1.0) for p, r in ranks.items()}:  # the config selects exactly these, at these ranks
        raise LoraError(f"internal: the new adapter's config plans {sorted(got)} instead of {sorted(ranks)}")
    saved_plan = plan_saved(unwrap(model), cfg)
    apply_plan(model, adapter, cfg, sites, saved_plan, activate)
    with torch.no_grad():
        for path, layer in lora_layers(model):
            if path in factors:
                a, b = factors[path]
                layer.lora_A[adapter].copy_(a)
                layer.lora_B[adapter].copy_(b)
    return cfg


def _exact(paths) -> tuple[str, ...]:
    """One regex (a group, so never read as a plain name or suffix) selecting exactly ``paths``."""
    paths = sorted(set(paths))
    return ("(?:" + "|".join(re.escape(p) for p in paths) + ")",) if paths else ()


# -- combine ------------------------------------------------------------------------------------
def _check_args(weights: Mapping[str, float], method: str, rank: int | None, density: float | None,
                majority_sign: str, missing: str) -> None:
    if method not in METHODS:
        raise LoraError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if not weights:
        raise LoraError("combine needs at least one adapter with a weight, e.g. {'a': 0.7, 'b': 0.3}")
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise LoraError(f"the weight of {name!r} must be a finite number, got {w!r}")
    if rank is not None and method != "svd":
        raise LoraError(f"rank= applies to method 'svd' only (method {method!r} fixes the rank)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise LoraError(f"rank must be an integer >= 1, got {rank!r}")
    if method in _SPARSE:
        if density is None or isinstance(density, bool) or not (0 < density <= 1):
            raise LoraError(f"method {method!r} needs density in (0, 1] (the fraction of values kept), "
                            f"got {density!r}")
    elif density is not None:
        raise LoraError(f"density applies to {', '.join(_SPARSE)}, not to {method!r}")
    if majority_sign not in ("total", "frequency"):
        raise LoraError(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}")
    if missing not in ("error", "zero"):
        raise LoraError(f"missing must be 'error' or 'zero', got {missing!r}")


def _prune(t: Tensor, density: float, method: str, gen: torch.Generator) -> Tensor:
    """PEFT's pruning of one factor: the top ``density`` share by magnitude, or a random share
    (kept with probability ``density``, rescaled by 1/density)."""
    if density >= 1:
        return t
    if method == "ties":
        keep = torch.zeros(t.numel(), dtype=t.dtype)
        keep[torch.topk(t.abs().flatten(), k=int(density * t.numel())).indices] = 1
        return t * keep.view_as(t)
    return t * torch.bernoulli(torch.full_like(t, density), generator=gen) / density


def _mix(tensors: list[Tensor], w: list[float], method: str, density: float | None, majority_sign: str,
         gen: torch.Generator) -> Tensor:
    """One factor of the new adapter from the adapters' factors ``tensors`` (float64) and weights."""
    if method in _SPARSE:
        tensors = [_prune(t, density, method, gen) for t in tensors]
    stack = torch.stack(tensors)
    weighted = stack * torch.tensor(w, dtype=stack.dtype).view(-1, *[1] * (stack.dim() - 1))
    if method in ("linear", "dare_linear"):
        return weighted.sum(0)
    sign = stack.sign()  # ties / dare_ties: elect a sign per element, average the agreeing values
    votes = stack.sum(0) if majority_sign == "total" else sign.sum(0)
    agree = sign == torch.where(votes >= 0, 1.0, -1.0).to(stack.dtype)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def _plan_layer(path: str, layer: LoraLayer, names: list[str], w: list[float], method: str, rank: int | None,
                density: float | None, majority_sign: str, gen: torch.Generator) -> tuple[Tensor, Tensor, float]:
    """New factors (A, B) for one module, and the relative error of their ΔW against Σ wᵢΔWᵢ."""
    f64 = torch.float64
    kind, base, weight = layer.kind, layer.base_layer, layer.weight
    a_s = [layer.factors(n)[0].detach().to("cpu", f64) for n in names]  # (at their own rank if zero-padded)
    b_s = [layer.factors(n)[1].detach().to("cpu", f64) for n in names]
    ws = [wi * float(layer.scale[n]) for wi, n in zip(w, names)]
    if method in ("cat", "svd"):
        check_plain(path, kind, base, weight, f"method {method!r}")
        d, k = b_s[0].flatten(1).shape[0], a_s[0].flatten(1).shape[1]
    if method == "cat":
        r = sum(a.shape[0] for a in a_s)
        if r > min(d, k):
            raise LoraError(f"{path}: method 'cat' gives rank {r} (the sum of the ranks) > min(d, k) = {min(d, k)} "
                            f"of its {d}x{k} update; use method 'svd' with rank <= {min(d, k)}")
        a = torch.cat([wi * ai for wi, ai in zip(ws, a_s)])
        b = torch.cat(b_s, dim=1)
    elif method == "svd":
        r = rank or max(a.shape[0] for a in a_s)
        if r > min(d, k):
            raise LoraError(f"{path}: rank {r} > min(d, k) = {min(d, k)} of its {d}x{k} update")
        target = sum(wi * bi.flatten(1) @ ai.flatten(1) for wi, ai, bi in zip(ws, a_s, b_s))
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        b = (u[:, :r] * s[:r]).reshape(b_s[0].shape[0], r, *b_s[0].shape[2:])
        a = vh[:r].reshape(r, *a_s[0].shape[1:])
    else:
        ranks = {n: layer.rank(n) for n in names}
        if len(set(ranks.values())) > 1:
            raise LoraError(f"{path}: method {method!r} mixes the factors element by element and needs equal "
                            f"ranks, got {ranks}; use 'cat' or 'svd'")
        wa = [math.copysign(math.sqrt(abs(x)), x) for x in ws]
        wb = [math.sqrt(abs(x)) for x in ws]
        a = _mix(a_s, wa, method, density, majority_sign, gen)
        b = _mix(b_s, wb, method, density, majority_sign, gen)
    dtype = layer.lora_A[names[0]].dtype
    a, b = a.to(dtype), b.to(dtype)
    new = torch.matmul(*kind.matrices(base, weight, a.to(f64), b.to(f64)))
    want = sum(wi * torch.matmul(*kind.matrices(base, weight, ai, bi)) for wi, ai, bi in zip(ws, a_s, b_s))
    norm = float(torch.linalg.norm(want))
    err = float(torch.linalg.norm(want - new)) / norm if norm > 0 else float(torch.linalg.norm(new) > 0)
    return a, b, err


def combine(model: nn.Module, weights: Mapping[str, float], method: str = "cat", adapter: str = "combined",
            rank: int | None = None, density: float | None = None, majority_sign: str = "total",
            seed: int = 0, missing: str = "error", activate: bool = False) -> CombineReport:
    """Add adapter ``adapter`` = the weighted combination of existing adapters ``weights``
    (``{"a": 0.7, "b": 0.3}``) by ``method`` (see the module docstring for each definition).

    Args:
        rank: ``svd`` only: the rank to truncate to (default: the largest input rank per module).
        density: ``ties``, ``dare_linear``, ``dare_ties``: the fraction of each factor's values kept.
        majority_sign: ``ties`` / ``dare_ties``: "total" or "frequency".
        seed: the DARE methods' random pruning.
        missing: "error" (default) refuses adapters that adapt different modules; "zero" treats an
            absent adapter as ΔW = 0 on that module (PEFT's behaviour).
        activate: make the new adapter the active one (default: add it inactive, as PEFT does).

    The new adapter is a normal one (scale 1, α = r per module): save it with :func:`lorakit.save`.
    Adapters with modules trained whole (``modules_to_save``) are refused: there is no defined
    combination of two classifier heads. Raises :class:`LoraError` before changing anything.
    """
    check_name(adapter)
    reg = registry(model)
    names = list(weights)
    check_names(reg, names)
    if adapter in reg.configs:
        raise LoraError(f"adapter {adapter!r} already exists; pick another name (existing: {sorted(reg.configs)})")
    require_unmerged(reg, "combine adapters")
    _check_args(weights, method, rank, density, majority_sign, missing)
    biased = sorted(n for n in names if reg.configs[n].lora_bias)
    if biased:
        raise LoraError(f"cannot combine adapters with lora_bias=True ({biased}): their biases have no defined "
                        "combination; combine adapters without lora_bias")
    trained = sorted(n for n in names if reg.configs[n].bias != "none")
    if trained:
        raise LoraError(f"cannot combine adapters that train base-model biases ({trained}, LoraConfig.bias): the "
                        "base holds one value per bias, so they have no defined combination; combine adapters "
                        "with bias='none'")
    whole = sorted({p for p, w in saved_modules(model) if set(names) & set(w.adapters())})
    if whole:
        raise LoraError(f"cannot combine adapters that train modules whole (modules_to_save: {whole}); "
                        "there is no defined combination of such copies")
    layers = [(p, layer, [n for n in names if n in layer.lora_A]) for p, layer in lora_layers(model)]
    layers = [(p, layer, present) for p, layer, present in layers if present]
    partial = {p: sorted(set(names) - set(present)) for p, _, present in layers if len(present) < len(names)}
    if partial and missing == "error":
        shown = "; ".join(f"{p} lacks {m}" for p, m in list(partial.items())[:6])
        raise LoraError(f"the adapters adapt different modules ({len(partial)} not shared: {shown}"
                        f"{' …' if len(partial) > 6 else ''}); pass missing='zero' to count an absent "
                        "adapter as ΔW = 0 there")
    gen = torch.Generator().manual_seed(seed)
    factors, errors = {}, {}
    for path, layer, present in layers:
        a, b, errors[path] = _plan_layer(path, layer, present, [float(weights[n]) for n in present], method,
                                         rank, density, majority_sign, gen)
        factors[path] = (a.to(layer.weight.device), b.to(layer.weight.device))
    new_adapter(model, adapter, factors, activate=activate)
    ranks = {p: layer.rank(adapter) for p, layer in lora_layers(model) if adapter in layer.lora_A}
    return CombineReport(adapter, method, ranks, errors)
