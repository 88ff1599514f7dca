"""Layer kinds: what lorakit knows about each kind of adapted layer, in one registered object.

A :class:`Kind` says everything the rest of lorakit needs about one kind of layer: the shapes of
the factors and their names in PEFT's files, how B·A maps to W's layout, the init, the fast
unmerged forward, whether mixed-adapter batches may take the batched path, whether the base
output may be updated in place, whether ``"all-linear"`` selects it and which PEFT config fields
it implies. :func:`register_kind` maps a module type to its kind (or to a function that decides
per instance); :func:`kind_of` looks a module up by its class's MRO, most specific first, so a
registered subclass (a quantized ``nn.Linear``, a user's own layer) wins over its base class.

Every kind defines the update the same way::

    ΔW = s · (left @ right)      (left, right) = kind.matrices(...), default (B.flatten(1), A.flatten(1)),
                                 transposed if kind.transposed, reshaped like W

so merge, unmerge and ΔW exist once (:meth:`lorakit.layers.LoraLayer.delta`). The built-in
kinds are here; :mod:`lorakit.mha` adds ``nn.MultiheadAttention`` the way a user adds their own.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .config import LoraError

if TYPE_CHECKING:
    from .layers import LoraLayer

__all__ = ["Kind", "register_kind", "kind_of", "parameter_kind", "supported", "autocast_dtype"]


class Kind:
    """How one kind of layer hosts an adapter on one of its weights. Subclass it, override what
    differs, and :func:`register_kind` an instance; the defaults are a generic layer whose weight W
    is viewed as (out, rest), updated by running the module with W + ΔW swapped in.

    Attributes:
        name: shown in ``repr`` and messages.
        param: the weight a module of this kind adapts (``"weight"``).
        a_key, b_key: PEFT's file names of the factors (``<path>.<a_key>``).
        transposed: ΔW is stored as (B·A)ᵀ in W's layout (transformers' Conv1D, Embedding).
        supports_dropout: dropout on the adapter's input is possible (else dropout > 0 is refused).
        all_linear: selected by ``targets="all-linear"``.
        fan_in_fan_out: PEFT's config flag this kind implies when saved.
        selected_by: the PEFT config field that lists such weights (``"target_modules"``, or
            ``"target_parameters"`` for raw parameters); None for a kind used only as another
            kind's part (not listed: it comes with its owner, and PEFT names it through the
            owner's ``base_layer``).
        mixed: how :func:`lorakit.mixed` runs rows with different adapters: ``"matmul"`` (gathered
            x·Aᵀ·Bᵀ per row, for layers computing x·Wᵀ), ``"lookup"`` (A's columns looked up by
            integer inputs) or None (the plain forward once per adapter group).
        parts: submodules (attribute name -> kind) whose weights the layer's forward reads without
            calling them; they get the same adapter with it and cannot be targeted alone.
        dora: DoRA adapters (``use_dora``) are defined for this kind: W is a plain tensor whose
            output axis is 0 (1 if ``transposed``), and :meth:`update` is implemented (see
            :mod:`lorakit.dora`).
    """

    name = "kind"
    param = "weight"
    a_key, b_key = "lora_A.weight", "lora_B.weight"
    transposed = False
    supports_dropout = False
    all_linear = False
    fan_in_fan_out = False
    selected_by: str | None = "target_modules"
    mixed: str | None = None
    parts: dict[str, "Kind"] = {}
    dora = False

    def __copy__(self):
        return self  # kinds are stateless singletons

    def __deepcopy__(self, memo):
        return self

    def __repr__(self) -> str:
        return f"<lorakit kind {self.name!r}>"

    def check(self, base: nn.Module, path: str) -> None:
        """Raise :class:`LoraError` if ``base`` cannot host this kind of adapter."""

    def owns_output(self, base: nn.Module) -> bool:
        """Whether ``base``'s forward returns a fresh tensor that its own backward does not need, so
        the LoRA update may be added into it in place."""
        return False

    def shapes(self, base: nn.Module, weight: Tensor, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and B for the weight ``weight`` of ``base`` (PEFT's layout)."""
        out, rest = weight.shape[0], math.prod(weight.shape[1:])
        return (r, rest), (out, r)

    def weight_shape(self, base: nn.Module, weight: Tensor) -> tuple[int, ...]:
        """The shape of ΔW: W's own, unless W is stored packed (a quantized layer: its logical shape)."""
        return tuple(weight.shape)

    def factor_dtype(self, base: nn.Module, weight: Tensor) -> torch.dtype:
        """The dtype of new factors: W's, but fp32 on a half-precision or non-float (quantized) W."""
        return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) or not weight.is_floating_point() \
            else weight.dtype

    def check_merge(self, base: nn.Module, path: str) -> None:
        """Raise :class:`LoraError` if W + ΔW cannot be written into this layer's weight (called by
        :func:`lorakit.merge` for every layer before anything is merged)."""

    def rank(self, weight: Tensor, a: Tensor) -> int:
        """The rank r of an adapter whose factor A is ``a``."""
        return a.shape[0]

    def matrices(self, base: nn.Module, weight: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """``(left, right)`` with ΔW = s·(left @ right), before the kind's transpose and the
        reshape to W's shape (batched matrices for stacked experts)."""
        return b.flatten(1), a.flatten(1)

    def init(self, a: Tensor, b: Tensor, init: str, r: int) -> None:
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

    def update(self, layer: "LoraLayer", name: str, x: Tensor) -> Tensor:
        """s·ΔW applied to ``x`` (already dropped out) without the base output, in the factors'
        dtype; needed by kinds with :attr:`dora`."""
        raise NotImplementedError(f"{self.name} layers have no separate update (DoRA is not defined for them)")

    def batch_dim(self, base: nn.Module, x: Tensor) -> int | None:
        """The dim of the input ``x`` that holds a batch's rows, for :func:`lorakit.mixed` (None: ``x``
        is unbatched)."""
        return 0 if x.dim() else None

    def forward_groups(self, layer: "LoraLayer", names: Sequence[str | None], x: Tensor, *args, **kwargs):
        """Forward where row i (along :meth:`batch_dim`) uses adapter ``names[i]`` (None: the base), for
        mixed batches that do not take the batched path. ``NotImplemented`` (the default):
        :func:`lorakit.mixed` runs :meth:`forward` once per adapter group on those rows of ``x``
        (dim 0), with the other arguments shared, and puts the output's rows back in order."""
        return NotImplemented


# -- the registry ---------------------------------------------------------------------------------
Resolver = Callable[[nn.Module], "Kind | None"]
_REGISTRY: dict[type | str, "Kind | Resolver"] = {}


def register_kind(module_type: type | str, kind: Kind | Resolver) -> None:
    """Adapt modules of ``module_type`` (and its subclasses, unless they are registered themselves)
    as ``kind``.

    ``module_type`` is a class, or its qualified name (``"transformers.pytorch_utils.Conv1D"``) so
    that registering does not import its package. ``kind`` is a :class:`Kind`, or a function of the
    module returning one (to decide per instance, e.g. by ``groups``) or None (then the kind of a
    base class applies). Registering a type again replaces its entry.
    """
    if not (isinstance(module_type, str) or (isinstance(module_type, type) and issubclass(module_type, nn.Module))):
        raise LoraError(f"register_kind: module_type must be an nn.Module subclass or its qualified name, "
                        f"got {module_type!r}")
    if not isinstance(kind, Kind) and not callable(kind):
        raise LoraError(f"register_kind: kind must be a lorakit.Kind or a function of the module, got {kind!r}")
    _REGISTRY[module_type] = kind


def kind_of(module: nn.Module) -> Kind | None:
    """The kind of a module targeted by name or type, or None if no kind is registered for it."""
    for cls in type(module).__mro__:
        entry = _REGISTRY.get(cls)
        if entry is None:
            entry = _REGISTRY.get(f"{cls.__module__}.{cls.__qualname__}")
        if entry is not None:
            kind = entry if isinstance(entry, Kind) else entry(module)
            if kind is not None:
                return kind
    return None


def supported() -> str:
    """The module types with a registered kind, for messages."""
    def label(t):
        if isinstance(t, str):
            return t
        return f"nn.{t.__qualname__}" if t.__module__.startswith("torch.nn.") else f"{t.__module__}.{t.__qualname__}"
    return ", ".join(map(label, _REGISTRY))


# -- built-in kinds --------------------------------------------------------------------------------
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


class LinearKind(Kind):
    """``nn.Linear``: y = x·Wᵀ + b; A (r, in), B (out, r). Subclass it for a layer that computes
    the same thing from other storage (override :meth:`owns_output` and, if W is not a plain
    tensor, :meth:`forward`)."""

    name = "linear"
    supports_dropout = True
    all_linear = True
    mixed = "matmul"
    dora = True

    def update(self, layer, name, x):
        a, b = layer.lora_A[name], layer.lora_B[name]
        h = _skinny(a, x.to(a.dtype).reshape(-1, x.shape[-1]))
        return (F.linear(h, b) * layer.scale[name]).view(*x.shape[:-1], b.shape[0])

    def owns_output(self, base):
        return type(base) is nn.Linear  # a subclass's output may be needed by its own backward

    def forward(self, layer, names, x, *args, **kwargs):
        base = layer.base_layer
        fresh = self.owns_output(base)
        if (fresh and len(names) == 1 and torch.is_grad_enabled() and not args and not kwargs
                and not (layer.training and layer.dropout[names[0]] > 0)):
            a, b, bias = layer.lora_A[names[0]], layer.lora_B[names[0]], base.bias
            wt = base.weight if self.transposed else base.weight.t()
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


class _Conv1D(LinearKind):
    """transformers' ``Conv1D``: y = x @ W + b with W stored (in, out); PEFT's fan_in_fan_out."""

    name = "conv1d_hf"
    transposed = True
    fan_in_fan_out = True

    def owns_output(self, base):
        return True

    def shapes(self, base, weight, r):
        return (r, weight.shape[0]), (weight.shape[1], r)


def embed_scaled(base: nn.Module, out: Tensor) -> Tensor:
    """``out`` times a scaled embedding's ``embed_scale`` (Gemma's embeddings multiply their lookup by it
    in forward, rounded to the weight's dtype), so that the unmerged update equals what merging ΔW
    into W gives, as in PEFT; ``out`` unchanged for a plain ``nn.Embedding``."""
    scale = getattr(base, "embed_scale", None)
    if scale is None:
        return out
    if isinstance(scale, Tensor):
        scale = scale.to(base.weight.dtype).to(out.dtype)
    return out * scale


class _Embedding(Kind):
    """Lookup of A's columns, then B; A is (r, num_embeddings), B is (dim, r) as in PEFT."""

    name = "embedding"
    a_key, b_key = "lora_embedding_A", "lora_embedding_B"
    transposed = True
    supports_dropout = True  # accepted for PEFT-compatible configs, but integer inputs get no dropout (as in PEFT)
    mixed = "lookup"
    dora = True

    def check(self, base, path):
        if base.max_norm is not None:
            raise LoraError(f"{path}: nn.Embedding with max_norm rewrites its weight during forward; "
                            "LoRA cannot be merged exactly into it (set max_norm=None)")
        scale = getattr(base, "embed_scale", None)
        if scale is not None and not (isinstance(scale, (int, float)) or
                                      (isinstance(scale, Tensor) and scale.numel() == 1)):
            raise LoraError(f"{path}: {type(base).__name__}.embed_scale has shape {tuple(scale.shape)}; lorakit "
                            "adapts scaled embeddings only with one scalar scale (as Gemma's)")

    def owns_output(self, base):
        return type(base) is nn.Embedding

    def shapes(self, base, weight, r):
        return (r, weight.shape[0]), (weight.shape[1], r)

    def init(self, a, b, init, r):
        # PEFT's convention for embeddings: A = 0, B random (the lookup of a zero A keeps ΔW = 0).
        nn.init.zeros_(a)
        nn.init.normal_(b)

    def update(self, layer, name, x):
        base, a, b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
        h = F.embedding(x, a.t(), base.padding_idx, None, 2.0, base.scale_grad_by_freq, base.sparse)
        return embed_scaled(base, F.linear(h, b) * layer.scale[name])

    def forward(self, layer, names, x, *args, **kwargs):
        result = layer.base_layer(x, *args, **kwargs)
        for name in names:
            result = result + self.update(layer, name, x).to(result.dtype)
        return result


class _Conv(Kind):
    """ConvNd with groups = 1: A is a conv with the base's kernel/stride/padding/dilation, B a 1×1 conv."""

    name = "conv"
    supports_dropout = True
    dora = True

    def shapes(self, base, weight, r):
        return (r, *weight.shape[1:]), (weight.shape[0], r, *([1] * (weight.dim() - 2)))

    def update(self, layer, name, x):
        a, b = layer.lora_A[name], layer.lora_B[name]
        conv = (F.conv1d, F.conv2d, F.conv3d)[layer.weight.dim() - 3]
        return conv(layer.base_layer._conv_forward(x.to(a.dtype), a, None), b) * layer.scale[name]

    def forward(self, layer, names, x, *args, **kwargs):
        result = layer.base_layer(x, *args, **kwargs)
        for name in names:
            result = result + self.update(layer, name, layer.dropped(x, name)).to(result.dtype)
        return result


class _GroupedConv(Kind):
    """ConvNd with groups > 1: ΔW has the grouped weight's shape, so it is built and convolved.

    The factors are A (r, in/groups·k…) and B (out, r); the update merges exactly. (PEFT instead
    uses a full conv for A, whose ΔW cannot be merged into a grouped conv; its files differ.)
    """

    name = "conv_grouped"
    supports_dropout = True
    dora = True  # lorakit's own layout (PEFT's grouped-conv files differ, see above)

    def update(self, layer, name, x):
        delta = layer.delta(name, layer.lora_A[name].dtype)
        return layer.base_layer._conv_forward(x.to(delta.dtype), delta, None)

    def forward(self, layer, names, x, *args, **kwargs):
        result = layer.base_layer(x, *args, **kwargs)
        for name in names:
            result = result + self.update(layer, name, layer.dropped(x, name)).to(result.dtype)
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

    name = "param"
    selected_by = "target_parameters"

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


_PARAM = _Param()


def parameter_kind(module: nn.Module, name: str) -> Kind:
    """The kind of a raw parameter ``name`` of ``module`` targeted by ``target_parameters``."""
    return _PARAM


_CONV, _GROUPED_CONV = _Conv(), _GroupedConv()
register_kind(nn.Linear, LinearKind())
register_kind("transformers.pytorch_utils.Conv1D", _Conv1D())  # GPT-2; transformers is not imported
register_kind(nn.Embedding, _Embedding())
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_kind(_conv, lambda m: _CONV if m.groups == 1 else _GROUPED_CONV)
