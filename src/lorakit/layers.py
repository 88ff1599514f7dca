"""LoRA layers: one wrapper module with one merge path; what differs per layer kind is a
:class:`~lorakit.kinds.Kind`, and what differs per variant is a function in :mod:`lorakit.variants`.

A :class:`LoraLayer` wraps an existing module (``base_layer``) and holds any number of named
adapters for one of its weights W, in the shapes its kind gives. ΔW (from the kind's
``matrices``), merge and unmerge exist exactly once, here (:meth:`LoraLayer.delta`); the kind
decides how the *unmerged* forward applies B·A to an input without materialising ΔW.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import routing  # the mixed-batch routing: ROUTING, MIXED_OPEN (read as module attributes)
from .config import LoraError
from .kinds import Kind
from .variants import dora as _dora
from .variants import rewriting_inits as inits

__all__ = ["LoraLayer", "SavedModule"]

@torch.compiler.disable
def _routed_eager(module: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    """The module's forward run eagerly from compiled code, where the mixed routing is visible
    (see :data:`lorakit.routing.MIXED_OPEN`)."""
    return module.forward(x, *args, **kwargs)


def inherit_mode(wrapper: nn.Module, base: nn.Module) -> None:
    """Give a new ``wrapper`` of ``base`` (and its own submodules, not ``base``'s) the training mode of
    ``base``: a wrapper created inside a model in eval mode must not run its dropout."""
    wrapper.training = base.training
    for child in wrapper.children():
        if child is not base:
            child.train(base.training)


class LoraLayer(nn.Module):
    """A module plus named low-rank adapters on one of its weights (``param_name``).

    Attributes:
        base_layer: the wrapped, frozen module (its forward and buffers are untouched).
        lora_A, lora_B: the factors per adapter name, in PEFT's shapes.
        lora_magnitude_vector: DoRA's magnitude m per DoRA adapter name (:mod:`lorakit.variants.dora`).
        lora_bias: the bias b on B per ``lora_bias`` adapter name (PEFT's ``lora_B.bias``): the update
            is s·(B·A·x + b), merged as W + s·B·A and base bias + s·b.
        scale: per adapter, s = α/r (or α/√r): a float, or a 0-dim float64 tensor for an adapter prepared
            by :func:`lorakit.prepare_hotswap` (filled in place by a hot-swap, so compiled code is not
            specialized on its value).
        true_rank: the rank of each adapter whose factors are zero-padded past it (:func:`lorakit.prepare_hotswap`).
        active: names whose updates are applied in forward (set by :func:`lorakit.set_active`).
        merged: names currently merged into W (then forward is the base forward alone).
    """

    def __init__(self, base_layer: nn.Module, kind: Kind, param_name: str = "weight") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind
        self.param_name = param_name
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.lora_bias = nn.ParameterDict()
        self.scale: dict[str, float | Tensor] = {}
        self.true_rank: dict[str, int] = {}
        self.dropout: dict[str, float] = {}
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()
        self._original: Tensor | None = None  # copy of W while merged (merge's keep_copy)
        self._original_bias: Tensor | None = None  # copy of the base bias while a lora_bias adapter is merged
        self._norm: Tensor | None = None  # a merged DoRA adapter's ‖W + ΔW‖ when no copy was kept
        self.generation = 0  # bumped when an adapter is added or removed (caches of lorakit.mixed)
        inherit_mode(self, base_layer)

    @property
    def weight(self) -> Tensor:
        return getattr(self.base_layer, self.param_name)

    @property
    def bias(self) -> Tensor | None:
        """The base layer's ``bias``, for code that reads it through the wrapper
        (``nn.MultiheadAttention`` reads ``out_proj.weight`` and ``out_proj.bias``)."""
        return self.base_layer.bias

    # -- adapters -------------------------------------------------------------------------------
    def add(self, name: str, r: int, scale: float, dropout: float, init: str, dora: bool = False,
            bias: bool = False) -> None:
        """Create adapter ``name`` with ΔW = 0 (a rewriting init, :mod:`lorakit.variants.rewriting_inits`: W − s·B·A + s·B·A = W;
        ``init="random"``: ΔW random). Factors in the kind's factor_dtype (fp32 on a half-precision base).
        ``dora``: also a DoRA magnitude, m = ‖W + ΔW‖ (so the layer's output is unchanged). ``bias``: also
        a bias b on B (``lora_bias``), zero (``init="random"``: uniform ±1/√r, as ``nn.Linear``'s bias)."""
        w = self.weight
        dtype = self.kind.factor_dtype(self.base_layer, w)
        a_shape, b_shape = self.kind.shapes(self.base_layer, w, r)
        a = torch.empty(a_shape, dtype=dtype, device=w.device)
        b = torch.empty(b_shape, dtype=dtype, device=w.device)
        if not inits.rewrites(init):
            self.kind.init(a, b, init, r)
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.scale[name] = float(scale)
        self.dropout[name] = float(dropout)
        if inits.rewrites(init):  # PiSSA / OLoRA: the factors come from W, which keeps the residual
            inits.rewrite(self, name, init)
        if bias:
            b = torch.zeros(b_shape[0], dtype=dtype, device=w.device)
            if init == "random":
                nn.init.uniform_(b, -1 / math.sqrt(r), 1 / math.sqrt(r))
            self.lora_bias[name] = nn.Parameter(b)
        if dora:
            m = _dora.weight_norm(self, name).reshape(_dora.magnitude_shape(self.kind, w))
            self.lora_magnitude_vector[name] = nn.Parameter(m)
        self.generation += 1

    def remove(self, name: str) -> None:
        inits.restore(self, name)  # an adapter that rewrote W puts its initial part back
        del self.lora_A[name], self.lora_B[name], self.scale[name], self.dropout[name]
        self.true_rank.pop(name, None)
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        if name in self.lora_bias:
            del self.lora_bias[name]
        self.active = tuple(n for n in self.active if n != name)
        self.generation += 1
        self.__dict__.pop("_bank", None)  # free the removed factors' copy now
        self.__dict__.pop("_kernel_table", None)  # and lorakit.mixed's references to them

    def adapters(self) -> list[str]:
        return list(self.lora_A)

    def rank(self, name: str) -> int:
        """The rank r of adapter ``name`` (its own rank, also when its factors are zero-padded)."""
        return self.true_rank.get(name) or self.kind.rank(self.weight, self.lora_A[name])

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """``(A, B)`` of adapter ``name`` at its own rank: the parameters, or for a zero-padded adapter
        (:func:`lorakit.prepare_hotswap`) views of their first r rows of A and columns of B."""
        a, b = self.lora_A[name], self.lora_B[name]
        r = self.true_rank.get(name)
        return (a, b) if r is None else (a[:r], b[:, :r])

    def set_active(self, names: Sequence[str]) -> None:
        self.active = tuple(n for n in names if n in self.lora_A)
        for n in self.lora_A:
            self.lora_A[n].requires_grad_(n in names)
            self.lora_B[n].requires_grad_(n in names)
        for n, m in (*self.lora_magnitude_vector.items(), *self.lora_bias.items()):
            m.requires_grad_(n in names)

    def check_active(self, names: Sequence[str], path: str) -> None:
        """Raise :class:`LoraError` if ``names`` would make a DoRA adapter active here together with
        another adapter (their combination has no single W'; see :mod:`lorakit.variants.dora`)."""
        here = [n for n in names if n in self.lora_A]
        if len(here) > 1 and any(n in self.lora_magnitude_vector for n in here):
            dora = [n for n in here if n in self.lora_magnitude_vector]
            raise LoraError(f"{path}: DoRA adapter(s) {dora} cannot be active together with another adapter "
                            f"on the same layer (asked for {here}); activate a DoRA adapter alone")

    def dropped(self, x: Tensor, name: str) -> Tensor:
        p = self.dropout[name]
        return F.dropout(x, p, self.training) if p > 0 else x

    def delta(self, name: str, dtype: torch.dtype | None = None, compute: torch.dtype | None = None) -> Tensor:
        """ΔW of adapter ``name`` in W's layout, scale included (the single definition of ΔW).

        The product is computed in ``compute`` (default: the factors' dtype, differentiable, as
        the unmerged forward uses it) and the result cast to ``dtype``."""
        a, b = self.lora_A[name], self.lora_B[name]
        if compute is not None:
            a, b = a.to(compute), b.to(compute)
        w = self.weight
        left, right = self.kind.matrices(self.base_layer, w, a, b)
        d = (left @ right) * self.scale[name]
        d = (d.t() if self.kind.transposed else d).reshape(self.kind.weight_shape(self.base_layer, w))
        return d if dtype is None else d.to(dtype)

    def _shifted(self, names: Sequence[str], sign: int) -> Tensor:
        """W ± Σ ΔW of ``names`` in float64, for one rounding to W's dtype by the caller.

        float64 holds every product of two fp32 (or bf16/fp16) factor elements exactly, so W + s·B·A
        is rounded once, to W's dtype (an fp32 product would round B·A, then the sum, then W's
        dtype). Costs a transient float64 copy of this one weight (a copy also when W is float64:
        it is added to in place)."""
        total = self.weight.to(torch.float64, copy=True)
        for n in names:
            total.add_(self.delta(n, compute=torch.float64), alpha=sign)
        return total

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if torch.compiler.is_compiling():
            if routing.MIXED_OPEN:  # a guarded global: compiled code never ignores an open routing
                return _routed_eager(self, x, *args, **kwargs)
        else:
            current = routing.ROUTING.get()
            if current is not None and id(self) in current.layers:
                return current.forward(self, x, *args, **kwargs)
        if self.merged or not self.active:
            return self.base_layer(x, *args, **kwargs)
        return self.run(self.active, x, *args, **kwargs)

    def run(self, names: Sequence[str], x: Tensor, *args, **kwargs) -> Tensor:
        """The unmerged forward with the updates of ``names`` (the base alone if there are none): a DoRA
        adapter through :func:`lorakit.variants.dora.forward`, plain ones through the kind's forward."""
        if self.lora_magnitude_vector:
            if len(names) == 1 and names[0] in self.lora_magnitude_vector:
                return _dora.forward(self, names[0], x, *args, **kwargs)
            self.check_active(names, "this layer")
        return self.kind.forward(self, names, x, *args, **kwargs)

    # -- merge ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: Sequence[str], keep_copy: bool = True) -> None:
        """Add the update of ``names`` into W, rounding once; ``keep_copy``: keep a copy of W for a
        bit-exact unmerge."""
        if self.merged:
            raise LoraError(f"already merged ({', '.join(self.merged)}); unmerge first")
        names = tuple(n for n in names if n in self.lora_A)
        if not names:
            return
        self.check_active(names, "this layer")
        w = self.weight
        dora = names[0] in self.lora_magnitude_vector
        total, norm = _dora.merged(self, names[0]) if dora else (self._shifted(names, +1), None)
        total = total.to(w.dtype)
        if not torch.isfinite(total).all():
            raise LoraError(f"merging {', '.join(names)} would put non-finite values into the weight "
                            f"({w.dtype} overflows); keep the adapter unmerged")
        biased = [n for n in names if n in self.lora_bias]
        if biased:  # base bias + Σ s·b, rounded once
            bias = self.base_layer.bias
            new_bias = bias.to(torch.float64, copy=True)
            for n in biased:
                new_bias.add_(self.lora_bias[n].to(torch.float64), alpha=self.scale[n])
            new_bias = new_bias.to(bias.dtype)
            if not torch.isfinite(new_bias).all():
                raise LoraError(f"merging {', '.join(biased)} would put non-finite values into the bias; keep the "
                                "adapter unmerged")
            self._original_bias = bias.detach().clone()  # small: always kept, so unmerge restores it exactly
            bias.detach().copy_(new_bias)
        if keep_copy:
            self._original = w.detach().clone()
        else:
            self._norm = norm
        w.copy_(total)  # in place: the Parameter (and anything tied to it) stays the same object
        self.merged = names

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged update out of W: bit-exact from the kept copy, else by arithmetic
        (W − Σ ΔW; DoRA: W'·‖W + ΔW‖/m − ΔW; rounded once)."""
        if not self.merged:
            return
        w = self.weight
        if self._original is not None:
            w.copy_(self._original)
        elif self._norm is not None:
            w.copy_(_dora.unmerged(self, self.merged[0], self._norm))
        else:
            w.copy_(self._shifted(self.merged, -1))
        if self._original_bias is not None:
            self.base_layer.bias.detach().copy_(self._original_bias)
        self._original = self._norm = self._original_bias = None
        self.merged = ()

    def extra_repr(self) -> str:
        ranks = {n: self.rank(n) for n in self.lora_A}
        dora = f", dora={list(self.lora_magnitude_vector)}" if self.lora_magnitude_vector else ""
        padded = {n: self.kind.rank(self.weight, self.lora_A[n]) for n in self.true_rank}
        padded = f", padded to {padded}" if padded else ""
        return (f"kind={self.kind.name}, param={self.param_name}, ranks={ranks}{padded}{dora}, "
                f"active={list(self.active)}")


class SavedModule(nn.Module):
    """A module trained and saved whole with an adapter (PEFT's ``modules_to_save``), e.g. a
    classification head. Each adapter gets its own copy; forward uses the first active adapter's
    copy, else the original (``base_layer``), which is never modified."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.modules_to_save = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()  # nothing to merge: a copy is already a plain module
        inherit_mode(self, base_layer)

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.base_layer)

    def remove(self, name: str) -> None:
        del self.modules_to_save[name]
        self.active = tuple(n for n in self.active if n != name)

    def adapters(self) -> list[str]:
        return list(self.modules_to_save)

    def set_active(self, names: Sequence[str]) -> None:
        self.active = tuple(n for n in names if n in self.modules_to_save)
        for n, module in self.modules_to_save.items():
            module.requires_grad_(n in names)

    def current(self) -> nn.Module:
        return self.modules_to_save[self.active[0]] if self.active else self.base_layer

    def forward(self, x, *args, **kwargs):
        if torch.compiler.is_compiling():
            if routing.MIXED_OPEN:  # as in LoraLayer.forward
                return _routed_eager(self, x, *args, **kwargs)
        else:
            current = routing.ROUTING.get()
            if current is not None and id(self) in current.layers:
                return current.forward_saved(self, x, *args, **kwargs)
        return self.current()(x, *args, **kwargs)
