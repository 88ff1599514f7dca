"""LoRA layers: one wrapper module, one merge path, a small strategy object per layer kind.

A :class:`LoraLayer` wraps an existing module (``base_layer``) and holds any number of named
adapters for one of its weights W. Every kind stores its factors in PEFT's shapes and defines the
update the same way::

    ΔW = s · (B.flatten(1) @ A.flatten(1))      reshaped (and transposed for Conv1D/Embedding) like W

(for a 3-D raw parameter of stacked experts, one such product per expert: :class:`_Param`), so
merge, unmerge and delta code exist exactly once (:meth:`LoraLayer.delta`). What differs per kind
is only how the *unmerged* forward applies B·A to an input without materialising ΔW.
"""

from __future__ import annotations

import copy
import math
import sys
from contextvars import ContextVar
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .config import LoraError

__all__ = ["LoraLayer", "SavedModule", "Kind", "kind_of", "SUPPORTED"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

#: The mixed-adapter routing of the current thread/task (see :mod:`lorakit.batching`); set only
#: inside a ``lorakit.mixed(...)`` block.
ROUTING: ContextVar = ContextVar("lorakit_routing", default=None)

#: Whether any ``lorakit.mixed`` block is open in this process (any thread). ``torch.compile`` cannot
#: read the ContextVar, but it guards on this global: code compiled while it was False is recompiled
#: when a block opens, and then leaves the graph at each adapted layer (:func:`_routed_eager`).
MIXED_OPEN = False


@torch.compiler.disable
def _routed_eager(module: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    """The module's forward run eagerly from compiled code, where the mixed routing is visible."""
    return module.forward(x, *args, **kwargs)


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (weight stored as (in, out)); no import if unused."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


class Kind:
    """How one kind of layer hosts an adapter.

    ``a_key``/``b_key`` are PEFT's file names for the factors; ``transposed`` says ΔW is stored
    as (B·A)ᵀ in W's layout (Conv1D, Embedding).
    """

    name = "param"
    a_key, b_key = "lora_A.weight", "lora_B.weight"
    transposed = False
    supports_dropout = False

    def __copy__(self):
        return self  # kinds are stateless singletons, compared with `is`

    def __deepcopy__(self, memo):
        return self

    def check(self, base: nn.Module, path: str) -> None:
        """Raise :class:`LoraError` if ``base`` cannot host this kind of adapter."""

    def shapes(self, base: nn.Module, weight: Tensor, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and B for the weight ``weight`` of ``base`` (PEFT's layout)."""
        out, rest = weight.shape[0], math.prod(weight.shape[1:])
        return (r, rest), (out, r)

    def rank(self, weight: Tensor, a: Tensor) -> int:
        """The rank r of an adapter whose factor A is ``a``."""
        return a.shape[0]

    def matrices(self, base: nn.Module, weight: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """``(left, right)`` with ΔW = s·(left @ right), before the kind's transpose and the
        reshape to W's shape (batched matrices for stacked experts)."""
        return b.flatten(1), a.flatten(1)

    def init_a(self, a: Tensor, b: Tensor, init: str, r: int) -> None:
        """Initialise the factors of a rank-``r`` adapter in place so that ΔW = 0."""
        if init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
        else:  # "normal": the seed's plain N(0, 1)
            nn.init.normal_(a)
        nn.init.zeros_(b)

    def forward(self, layer: "LoraLayer", names: Sequence[str], x: Tensor, *args, **kwargs) -> Tensor:
        """Unmerged forward with the updates of ``names``; by default the base module runs with
        W + ΣΔW swapped in."""
        w = layer.weight
        delta = sum(layer.delta(name, w.dtype) for name in names)
        return functional_call(layer.base_layer, {layer.param_name: w + delta}, (x, *args), kwargs)


def owns_output(layer: "LoraLayer") -> bool:
    """Whether the base layer's forward returns a fresh tensor that its own backward does not need
    (nn.Linear, nn.Embedding, transformers' Conv1D), so the LoRA update may be added into it in place."""
    return type(layer.base_layer) in (nn.Linear, nn.Embedding) or layer.kind is CONV1D_HF


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on ``x``'s device (CPU bf16/fp16, CUDA fp16/bf16), or None
    outside autocast and for fp64 ``x`` (which autocast leaves alone)."""
    device = x.device.type
    if x.dtype == torch.float64 or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _skinny(m: Tensor, x2: Tensor) -> Tensor:
    """x2·mᵀ for a thin m (r rows) as (m·x2ᵀ)ᵀ: BLAS runs the product with the thin side as the
    output's rows 1.5-3x faster than x2·mᵀ with r columns (2048x1024, r=8, CPU)."""
    return (m @ x2.t()).t()


class _LoraLinearFn(torch.autograd.Function):
    """y = x·Wt + bias + s·(x·Aᵀ)·Bᵀ with a hand-written backward (training, dropout 0).

    Compared with autograd over the same ops: the input is saved once and shared with the frozen
    base, dx is accumulated in place (dx = g·Wtᵀ, then += (s·g·B)·A) instead of summing two
    temporaries, W gets no gradient unless it requires one, and B's gradient is computed as
    (hᵀ·g)ᵀ, the layout in which BLAS handles the skinny product fast. ``wt`` is W in (in, out) layout:
    ``weight.t()`` for nn.Linear (autograd maps its gradient back through the view), the weight
    itself for transformers' Conv1D.
    """

    @staticmethod
    def forward(ctx, x, wt, bias, a, b, s):
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.addmm(bias, x2, wt) if bias is not None else x2 @ wt
        h = _skinny(a, x2)
        out.addmm_(h, b.t(), alpha=s)
        ctx.save_for_backward(x2, wt, a, b, h)
        ctx.s, ctx.x_shape = s, x.shape
        return out.view(*x.shape[:-1], wt.shape[1])

    @staticmethod
    def backward(ctx, g):
        x2, wt, a, b, h = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gh = _skinny(b.t(), g2).mul_(ctx.s)
        dx = dwt = dbias = da = db = None
        if ctx.needs_input_grad[0]:
            dx = (g2 @ wt.t()).addmm_(gh, a).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dwt = x2.t() @ g2
        if ctx.needs_input_grad[2]:
            dbias = g2.sum(0)
        if ctx.needs_input_grad[3]:
            da = gh.t() @ x2
        if ctx.needs_input_grad[4]:  # as (hᵀ·g)ᵀ: BLAS runs gᵀ·h (transposed, 8 columns) ~10x slower
            db = (h.t() @ g2).mul_(ctx.s).t()
        return dx, dwt, dbias, da, db, None


class _Linear(Kind):
    name = "linear"
    supports_dropout = True

    def forward(self, layer, names, x, *args, **kwargs):
        base = layer.base_layer
        fresh = owns_output(layer)
        if (fresh and len(names) == 1 and torch.is_grad_enabled() and not args and not kwargs
                and not (layer.training and layer.dropout[names[0]] > 0)):
            a, b, bias = layer.lora_A[names[0]], layer.lora_B[names[0]], base.bias
            wt = base.weight.t() if self is LINEAR else base.weight
            cast = autocast_dtype(x)
            if cast is not None:  # what autocast does to F.linear and matmul: every operand in its dtype
                x, wt, a, b = x.to(cast), wt.to(cast), a.to(cast), b.to(cast)
                bias = None if bias is None else bias.to(cast)
            if x.dtype == a.dtype == wt.dtype:
                return _LoraLinearFn.apply(x, wt, bias, a, b, layer.scale[names[0]])
        result = base(x, *args, **kwargs)
        # The base output is a fresh tensor that its backward does not need, so the update can be
        # added in place (one addmm_, no output-sized temporaries) when the dtypes agree.
        for name in names:
            a, b, s = layer.lora_A[name], layer.lora_B[name], layer.scale[name]
            x2 = layer.dropped(x, name).to(a.dtype).reshape(-1, x.shape[-1])
            h = _skinny(a, x2)  # (tokens, r)
            if fresh and h.dtype == b.dtype == result.dtype and result.is_contiguous():
                result.view(-1, result.shape[-1]).addmm_(h, b.t(), alpha=s)
            else:
                result = result + (F.linear(h, b) * s).to(result.dtype).view(result.shape)
        return result


class _Conv1D(_Linear):
    """transformers' ``Conv1D``: y = x @ W + b with W stored (in, out); PEFT's fan_in_fan_out."""

    name = "conv1d_hf"
    transposed = True

    def shapes(self, base, weight, r):
        return (r, weight.shape[0]), (weight.shape[1], r)


class _Embedding(Kind):
    """Lookup of A's columns, then B; A is (r, num_embeddings), B is (dim, r) as in PEFT."""

    name = "embedding"
    a_key, b_key = "lora_embedding_A", "lora_embedding_B"
    transposed = True
    supports_dropout = True  # accepted for PEFT-compatible configs, but integer inputs get no dropout (as in PEFT)

    def check(self, base, path):
        if base.max_norm is not None:
            raise LoraError(f"{path}: nn.Embedding with max_norm rewrites its weight during forward; "
                            "LoRA cannot be merged exactly into it (set max_norm=None)")

    def shapes(self, base, weight, r):
        return (r, weight.shape[0]), (weight.shape[1], r)

    def init_a(self, a, b, init, r):
        # PEFT's convention for embeddings: A = 0, B random (the lookup of a zero A keeps ΔW = 0).
        nn.init.zeros_(a)
        nn.init.normal_(b)

    def forward(self, layer, names, x, *args, **kwargs):
        base = layer.base_layer
        result = base(x, *args, **kwargs)
        for name in names:
            a, b = layer.lora_A[name], layer.lora_B[name]
            h = F.embedding(x, a.t(), base.padding_idx, None, 2.0, base.scale_grad_by_freq, base.sparse)
            result = result + (F.linear(h, b) * layer.scale[name]).to(result.dtype)
        return result


class _Conv(Kind):
    """ConvNd with groups = 1: A is a conv with the base's kernel/stride/padding/dilation, B a 1×1 conv."""

    name = "conv"
    supports_dropout = True

    def shapes(self, base, weight, r):
        return (r, *weight.shape[1:]), (weight.shape[0], r, *([1] * (weight.dim() - 2)))

    def forward(self, layer, names, x, *args, **kwargs):
        base = layer.base_layer
        result = base(x, *args, **kwargs)
        conv = (F.conv1d, F.conv2d, F.conv3d)[layer.weight.dim() - 3]
        for name in names:
            a, b = layer.lora_A[name], layer.lora_B[name]
            h = conv(base._conv_forward(layer.dropped(x, name).to(a.dtype), a, None), b)
            result = result + (h * layer.scale[name]).to(result.dtype)
        return result


class _GroupedConv(Kind):
    """ConvNd with groups > 1: ΔW has the grouped weight's shape, so it is built and convolved.

    The factors are A (r, in/groups·k…) and B (out, r); the update merges exactly. (PEFT instead
    uses a full conv for A, whose ΔW cannot be merged into a grouped conv; its files differ.)
    """

    name = "conv_grouped"
    supports_dropout = True

    def forward(self, layer, names, x, *args, **kwargs):
        base = layer.base_layer
        result = base(x, *args, **kwargs)
        for name in names:
            delta = layer.delta(name, layer.lora_A[name].dtype)
            h = base._conv_forward(layer.dropped(x, name).to(delta.dtype), delta, None)
            result = result + h.to(result.dtype)
        return result


class _Param(Kind):
    """A raw parameter (``target_parameters``); forward runs the base module with W + ΔW.

    2-D W (out, in): A (r, in), B (out, r), ΔW = s·B·A, as for a Linear. 3-D W (stacked experts,
    E × d1 × d2) follows PEFT's ``ParamWrapper``: A (E·r, d_in), B (d_out, E·r), expert e's
    factors are A's rows e·r … e·r+r-1 and B's columns e, E+e, …, (r-1)·E+e, and
    ΔW[e] = s·B_e·A_e. W[e] is (d_out=d1, d_in=d2) unless the module says ``is_transposed = True``
    (then W[e] is (d_in=d1, d_out=d2) and ΔW[e] = s·(B_e·A_e)ᵀ). W with more than 3 dims: A (r, Π rest),
    B (out, r) on W viewed as (out, rest), a lorakit-only layout (PEFT refuses such weights).
    """

    @staticmethod
    def _experts(base: nn.Module, weight: Tensor) -> tuple[int, int, int] | None:
        """(E, d_in, d_out) of a 3-D weight in PEFT's reading, else None."""
        if weight.dim() != 3:
            return None
        e, d1, d2 = weight.shape
        return (e, d1, d2) if getattr(base, "is_transposed", False) else (e, d2, d1)

    def shapes(self, base, weight, r):
        experts = self._experts(base, weight)
        if experts is None:
            return super().shapes(base, weight, r)
        e, d_in, d_out = experts
        return (e * r, d_in), (d_out, e * r)

    def rank(self, weight, a):
        return a.shape[0] // weight.shape[0] if weight.dim() == 3 else a.shape[0]

    def matrices(self, base, weight, a, b):
        if weight.dim() != 3:
            return super().matrices(base, weight, a, b)
        e = weight.shape[0]
        a_e = a.reshape(e, -1, a.shape[-1])  # (E, r, d_in)
        b_e = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)  # (E, d_out, r)
        if getattr(base, "is_transposed", False):
            return a_e.transpose(1, 2), b_e.transpose(1, 2)  # (B_e·A_e)ᵀ = A_eᵀ·B_eᵀ
        return b_e, a_e


LINEAR, CONV1D_HF, EMBEDDING, CONV, GROUPED_CONV, PARAM = (
    _Linear(), _Conv1D(), _Embedding(), _Conv(), _GroupedConv(), _Param())

#: Module types adapted by ``targets`` (anything else: use ``target_parameters``).
SUPPORTED = "nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d/2d/3d"


def kind_of(module: nn.Module) -> Kind | None:
    """The kind of a module targeted by name/type, or None if it is not a supported layer."""
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return CONV if module.groups == 1 else GROUPED_CONV
    if _is_hf_conv1d(module):
        return CONV1D_HF
    return None


class LoraLayer(nn.Module):
    """A module plus named low-rank adapters on one of its weights (``param_name``).

    Attributes:
        base_layer: the wrapped, frozen module (its forward and buffers are untouched).
        lora_A, lora_B: the factors per adapter name, in PEFT's shapes.
        scale: per adapter, s = α/r (or α/√r).
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
        self.scale: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()
        self._original: Tensor | None = None  # exact copy of W while merged (exact mode)
        self.generation = 0  # bumped when an adapter is added or removed (caches of lorakit.mixed)

    @property
    def weight(self) -> Tensor:
        return getattr(self.base_layer, self.param_name)

    # -- adapters -------------------------------------------------------------------------------
    def add(self, name: str, r: int, scale: float, dropout: float, init: str) -> None:
        """Create adapter ``name`` with ΔW = 0. Factors are fp32 on a half-precision base."""
        w = self.weight
        dtype = torch.float32 if w.dtype in _LOW_PRECISION else w.dtype
        a_shape, b_shape = self.kind.shapes(self.base_layer, w, r)
        a = torch.empty(a_shape, dtype=dtype, device=w.device)
        b = torch.empty(b_shape, dtype=dtype, device=w.device)
        self.kind.init_a(a, b, init, r)
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.scale[name] = float(scale)
        self.dropout[name] = float(dropout)
        self.generation += 1

    def remove(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name], self.scale[name], self.dropout[name]
        self.active = tuple(n for n in self.active if n != name)
        self.generation += 1
        self.__dict__.pop("_bank", None)  # free the removed factors' copy now

    def adapters(self) -> list[str]:
        return list(self.lora_A)

    def rank(self, name: str) -> int:
        """The rank r of adapter ``name``."""
        return self.kind.rank(self.weight, self.lora_A[name])

    def set_active(self, names: Sequence[str]) -> None:
        self.active = tuple(n for n in names if n in self.lora_A)
        for n in self.lora_A:
            self.lora_A[n].requires_grad_(n in names)
            self.lora_B[n].requires_grad_(n in names)

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
        d = (d.t() if self.kind.transposed else d).reshape(w.shape)
        return d if dtype is None else d.to(dtype)

    def _shifted(self, names: Sequence[str], sign: int) -> Tensor:
        """W ± Σ ΔW of ``names`` in float64, for one rounding to W's dtype by the caller.

        float64 holds every product of two fp32 (or bf16/fp16) factor elements exactly, so W + s·B·A
        is rounded once, to W's dtype (an fp32 product would round B·A, then the sum, then W's
        dtype). Costs a transient float64 copy of this one weight."""
        total = self.weight.to(torch.float64)
        for n in names:
            total.add_(self.delta(n, compute=torch.float64), alpha=sign)
        return total

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if torch.compiler.is_compiling():
            if MIXED_OPEN:  # a guarded global: compiled code never ignores an open routing
                return _routed_eager(self, x, *args, **kwargs)
        else:
            routing = ROUTING.get()
            if routing is not None and id(self) in routing.layers:
                return routing.forward(self, x, *args, **kwargs)
        if self.merged or not self.active:
            return self.base_layer(x, *args, **kwargs)
        return self.kind.forward(self, self.active, x, *args, **kwargs)

    # -- merge ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: Sequence[str], exact: bool = True) -> None:
        """Add the update of ``names`` into W, rounding once. ``exact`` keeps a copy of W."""
        if self.merged:
            raise LoraError(f"already merged ({', '.join(self.merged)}); unmerge first")
        names = tuple(n for n in names if n in self.lora_A)
        if not names:
            return
        w = self.weight
        total = self._shifted(names, +1).to(w.dtype)
        if not torch.isfinite(total).all():
            raise LoraError(f"merging {', '.join(names)} would put non-finite values into the weight "
                            f"({w.dtype} overflows); keep the adapter unmerged")
        if exact:
            self._original = w.detach().clone()
        w.copy_(total)  # in place: the Parameter (and anything tied to it) stays the same object
        self.merged = names

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged update out of W: bit-exact from the kept copy, else by subtraction
        (W − Σ ΔW, rounded once)."""
        if not self.merged:
            return
        w = self.weight
        w.copy_(self._original if self._original is not None else self._shifted(self.merged, -1))
        self._original = None
        self.merged = ()

    def extra_repr(self) -> str:
        ranks = {n: self.rank(n) for n in self.lora_A}
        return f"kind={self.kind.name}, param={self.param_name}, ranks={ranks}, active={list(self.active)}"


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
            if MIXED_OPEN:  # as in LoraLayer.forward
                return _routed_eager(self, x, *args, **kwargs)
        else:
            routing = ROUTING.get()
            if routing is not None and id(self) in routing.layers:
                return routing.forward_saved(self, x, *args, **kwargs)
        return self.current()(x, *args, **kwargs)
