"""Extraction and spectra: a full fine-tune turned into a LoRA adapter, and what is inside one.

:func:`extract` takes ΔW = W₁ − W₀ of every targeted weight (float64), keeps its truncated SVD
U_r·S_r·V_rᵀ and stores it as B = U_r·√S_r, A = √S_r·V_rᵀ at scale 1 (α = r), on the base model,
as a normal adapter. The rank is fixed (``rank=``) or the smallest that keeps a share of the
energy Σ S² (``energy=``). Per module it reports the energy kept, Σ_{i≤r} S_i² / Σ S_i², and the
relative error ‖ΔW − B·A‖_F / ‖ΔW‖_F, which is √(1 − energy) up to rounding the factors to fp32.

:func:`spectra` reads an adapter folder alone (no base model) and gives the singular values of
each module's ΔW = s·B·A; :func:`effective_rank` is the rank that holds a share of the energy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import LoraConfig, LoraError, check_name
from ..files.format import module_path, read_adapter
from ..model import require_unmerged
from ..state import has_adapters, registry_of, saved_modules, unwrap
from ..targets import plan, plan_saved
from .algebra import as_matrix, check_plain, new_adapter

__all__ = ["extract", "ExtractReport", "LayerReport", "effective_rank", "spectra"]


def effective_rank(s: Tensor, energy: float = 0.9) -> int:
    """The smallest k whose top-k singular values ``s`` (descending) hold ``energy`` of Σ s²
    (1 when all are 0)."""
    e = s.to(torch.float64) ** 2
    total = float(e.sum())
    if total == 0:
        return 1
    return int((torch.cumsum(e, 0) / total < energy - 1e-12).sum()) + 1


def energy_at(s: Tensor, r: int) -> float:
    """The share of Σ s² in the top ``r`` singular values (1.0 when all are 0)."""
    e = s.to(torch.float64) ** 2
    total = float(e.sum())
    return float(e[:r].sum()) / total if total > 0 else 1.0


@dataclass(frozen=True)
class LayerReport:
    """One extracted weight: ΔW's shape, the rank kept, the energy kept, the relative Frobenius
    error of the stored factors, and all singular values of ΔW (descending, float64)."""

    shape: tuple[int, ...]
    rank: int
    energy: float
    error: float
    singular_values: Tensor = field(repr=False)


@dataclass(frozen=True)
class ExtractReport:
    """What :func:`extract` made: per module path, a :class:`LayerReport`."""

    adapter: str
    layers: dict[str, LayerReport]

    def __str__(self) -> str:
        rows = [f"{'module':<48} {'shape':>11} {'rank':>5} {'energy kept':>12} {'rel. error':>11}"]
        rows += [f"{p:<48} {'x'.join(map(str, l.shape)):>11} {l.rank:>5} {l.energy:>12.4f} {l.error:>11.3e}"
                 for p, l in self.layers.items()]
        return "\n".join(rows)


def _modules_of(model: nn.Module) -> dict[str, nn.Module]:
    return dict(unwrap(model).named_modules())


def extract(base: nn.Module, tuned: nn.Module, *, rank: int | None = None, energy: float | None = None,
            targets=("all-linear",), modules_to_save=(), adapter: str = "default",
            activate: bool = True) -> ExtractReport:
    """Add adapter ``adapter`` to ``base`` that approximates ``tuned`` on ``targets``: the truncated
    SVD of W_tuned − W_base per targeted weight, at ``rank`` or at the smallest rank keeping
    ``energy`` (in (0, 1]) of ΔW's squared Frobenius norm. ``modules_to_save`` modules (e.g. a new
    classification head) are copied whole from ``tuned``. ``targets`` follow :class:`LoraConfig`'s
    rules. Weights or modules missing in ``tuned``, or shaped differently, raise :class:`LoraError`
    naming the module before ``base`` changes. Save the result with :func:`lorakit.save`.
    """
    check_name(adapter)
    if (rank is None) == (energy is None):
        raise LoraError("give exactly one of rank= (an integer >= 1) or energy= (a share in (0, 1])")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise LoraError(f"rank must be an integer >= 1, got {rank!r}")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not 0 < energy <= 1):
        raise LoraError(f"energy must be a number in (0, 1], got {energy!r}")
    if has_adapters(tuned):
        raise LoraError("the tuned model has lorakit adapters; pass lorakit.merge_and_unload(tuned) instead")
    reg = registry_of(base)
    if reg is not None:
        require_unmerged(reg, "extract an adapter")
        if adapter in reg.configs:
            raise LoraError(f"adapter {adapter!r} already exists; pick another name (existing: {sorted(reg.configs)})")
    probe = LoraConfig(r=1, targets=targets, modules_to_save=modules_to_save)
    sites, saved = plan(unwrap(base), probe), plan_saved(unwrap(base), probe)
    others = _modules_of(tuned)
    pairs = []
    for site in sites:
        w0 = site.weight
        if not w0.is_floating_point():
            raise LoraError(f"{site.path}.{site.param}: the base weight is stored packed ({w0.dtype}, a quantized "
                            "layer); extract from a full-precision base")
        check_plain(site.path, site.kind, site.module, w0, "extraction")
        if site.path not in others or not isinstance(getattr(others[site.path], site.param, None), Tensor):
            raise LoraError(f"{site.path}.{site.param}: the tuned model has no such weight "
                            f"(is it the same architecture as the base?)")
        w1 = getattr(others[site.path], site.param)
        if w1.shape != w0.shape:
            raise LoraError(f"{site.path}.{site.param}: shape {tuple(w1.shape)} in the tuned model, "
                            f"{tuple(w0.shape)} in the base")
        pairs.append((site, w1))
    copies = {}
    for path, module, *_ in saved:
        theirs = others.get(path)
        mine = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in theirs.state_dict().items()} if theirs is not None else None
        if got != mine:
            raise LoraError(f"{path}: modules_to_save needs the same module in the tuned model; "
                            + ("it has none" if got is None else f"its state differs: {got} vs the base's {mine}"))
        copies[path] = theirs.state_dict()
    factors, layers = {}, {}
    for site, w1 in pairs:
        w0 = site.weight
        m = as_matrix(site.kind, w1.detach().to("cpu", torch.float64) - w0.detach().to("cpu", torch.float64))
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        r = rank if rank is not None else effective_rank(s, energy)
        if r > s.numel():
            raise LoraError(f"{site.path}: rank {r} > min(d, k) = {s.numel()} of its {m.shape[0]}x{m.shape[1]} update")
        root = s[:r].sqrt()
        a_shape, b_shape = site.kind.shapes(site.module, w0, r)
        dtype = site.kind.factor_dtype(site.module, w0)
        b = (u[:, :r] * root).reshape(b_shape).to(dtype)
        a = (root[:, None] * vh[:r]).reshape(a_shape).to(dtype)
        approx = b.to(torch.float64).flatten(1) @ a.to(torch.float64).flatten(1)
        norm = float(torch.linalg.norm(m))
        error = float(torch.linalg.norm(m - approx)) / norm if norm > 0 else 0.0
        layers[site.path] = LayerReport(tuple(m.shape), r, energy_at(s, r), error, s)
        factors[site.path] = (a.to(w0.device), b.to(w0.device))
    if not factors:
        raise LoraError(f"targets {targets!r} select no weight to extract")
    new_adapter(base, adapter, factors, saved=tuple(copies), activate=activate)
    with torch.no_grad():
        for path, wrapper in saved_modules(base):
            if path in copies:
                wrapper.modules_to_save[adapter].load_state_dict(copies[path])
    return ExtractReport(adapter, layers)


def spectra(directory: str | os.PathLike) -> dict[str, Tensor]:
    """Singular values (descending, float64) of ΔW = s·B·A for every module of the adapter folder
    ``directory``, read from the file alone. Stacked-expert weights (3-D ``target_parameters``,
    whose A holds E·r rows) are left out: their ΔW is one matrix per expert."""
    file = read_adapter(directory)
    tensors, cfg = file.tensors, file.lora
    out = {}
    for key in sorted(tensors):
        if ".lora_A" not in key and ".lora_embedding_A" not in key:
            continue
        b_key = key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
        path = module_path(key)
        a, b = tensors[key].to(torch.float64), tensors[b_key].to(torch.float64)
        r = cfg.rank_for(path)
        if a.shape[0] != r and a.shape[0] % r == 0 and any(path == p.rsplit(".", 1)[0] or
                                                          path.endswith("." + p.rsplit(".", 1)[0])
                                                          for p in cfg.target_parameters):
            continue  # stacked experts
        r = a.shape[0]
        alpha = cfg.alpha_for(path)
        scale = alpha / r ** 0.5 if cfg.use_rslora else alpha / r
        # singular values of B·A from the r×r core: B = Q_b R_b, Aᵀ = Q_a R_a → B·A = Q_b (R_b R_aᵀ) Q_aᵀ
        _, rb = torch.linalg.qr(b.flatten(1))
        _, ra = torch.linalg.qr(a.flatten(1).t())
        out[path] = torch.linalg.svdvals(rb @ ra.t()) * abs(scale)
    return out


def plot_spectra(spectra: dict[str, Tensor], path: str | os.PathLike, title: str = "") -> Path:
    """Write a log-scale plot of singular values, one line per module, to ``path`` (PNG, matplotlib Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, s in spectra.items():
        s = s[s > 0]
        if s.numel():
            ax.semilogy(range(1, s.numel() + 1), s.numpy(), lw=0.8, alpha=0.7, label=name)
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value σ_i of ΔW")
    ax.set_title(title or f"{len(spectra)} modules")
    if len(spectra) <= 12:
        ax.legend(fontsize=6)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
