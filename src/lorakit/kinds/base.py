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

so merge, unmerge and ΔW exist once (:meth:`lorakit.layers.LoraLayer.delta`). A kind reads the
layer that hosts its adapters only through :class:`AdapterHost`; it never imports the layer. The
built-in kinds are one file each beside this one (``linear``, ``embedding``, ``conv``, ``param``,
``mha``, ``bitsandbytes``), each registered the way a user registers their own.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Protocol, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..config import LoraError

__all__ = ["AdapterHost", "Kind", "register_kind", "kind_of", "supported", "autocast_dtype", "skinny"]


class AdapterHost(Protocol):
    """What a :class:`Kind` (and a variant, :mod:`lorakit.variants`) reads of the layer that hosts
    adapters on one weight: :class:`lorakit.layers.LoraLayer` is the implementation."""

    base_layer: nn.Module  #: the wrapped, frozen module
    param_name: str  #: the adapted weight's attribute name on ``base_layer``
    lora_A: Mapping[str, Tensor]  #: factor A per adapter name, in PEFT's shape
    lora_B: Mapping[str, Tensor]  #: factor B per adapter name
    lora_magnitude_vector: Mapping[str, Tensor]  #: DoRA's magnitude per DoRA adapter name
    lora_bias: Mapping[str, Tensor]  #: the bias on B per ``lora_bias`` adapter name
    scale: dict[str, float]  #: s = α/r (or α/√r) per adapter name
    dropout: dict[str, float]  #: dropout probability per adapter name
    training: bool

    @property
    def weight(self) -> Tensor:
        """The adapted weight W."""

    def delta(self, name: str, dtype: torch.dtype | None = None, compute: torch.dtype | None = None) -> Tensor:
        """ΔW of adapter ``name`` in W's layout, scale included."""

    def dropped(self, x: Tensor, name: str) -> Tensor:
        """``x`` after adapter ``name``'s dropout (none in eval mode)."""


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
        row_gather: how :func:`lorakit.mixed` runs rows with different adapters: ``"matmul"`` (gathered
            x·Aᵀ·Bᵀ per row, for layers computing x·Wᵀ), ``"lookup"`` (A's columns looked up by
            integer inputs) or None (the plain forward once per adapter group).
        parts: submodules (attribute name -> kind) whose weights the layer's forward reads without
            calling them; they get the same adapter with it and cannot be targeted alone.
        dora: DoRA adapters (``use_dora``) are defined for this kind: W is a plain tensor whose
            output axis is 0 (1 if ``transposed``), and :meth:`update` is implemented (see
            :mod:`lorakit.variants.dora`).
        lora_bias: ``lora_bias`` adapters (a bias b on B, PEFT's ``lora_B.bias``) are defined: the
            forward adds s·b along the output axis (:meth:`bias_update`) and merging adds it to the base bias.
    """

    name = "kind"
    param = "weight"
    a_key, b_key = "lora_A.weight", "lora_B.weight"
    transposed = False
    supports_dropout = False
    all_linear = False
    fan_in_fan_out = False
    selected_by: str | None = "target_modules"
    row_gather: str | None = None
    parts: dict[str, "Kind"] = {}
    dora = False
    lora_bias = False

    def __copy__(self):
        return self  # kinds are stateless singletons

    def __deepcopy__(self, memo):
        return self

    def __repr__(self) -> str:
        return f"<lorakit kind {self.name!r}>"

    def check_base(self, base: nn.Module, path: str) -> None:
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

    def dequantized(self, base: nn.Module, dtype: torch.dtype | None = None) -> nn.Module | None:
        """For a kind whose weight is stored packed (quantized): a new full-precision module that computes
        what ``base`` computes from its dequantized weight (in ``dtype``); None for a plain weight.
        Used by :func:`lorakit.model.dequantize` (``merge_and_unload(model, dequantize=True)``)."""
        return None

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
        """Initialise the factors of a rank-``r`` adapter in place so that ΔW = 0 (``"random"``: A and B
        both Kaiming-uniform, as an untouched ``nn.Linear``, PEFT's ``init_lora_weights=False``)."""
        if init == "random":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            return
        if init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
        else:  # "normal": the seed's plain N(0, 1)
            nn.init.normal_(a)
        nn.init.zeros_(b)

    def forward(self, layer: "AdapterHost", names: Sequence[str], x: Tensor, *args, **kwargs) -> Tensor:
        """Unmerged forward with the updates of ``names``; by default the base module runs with
        W + ΣΔW swapped in."""
        w = layer.weight
        delta = sum(layer.delta(name, w.dtype) for name in names)
        return functional_call(layer.base_layer, {layer.param_name: w + delta}, (x, *args), kwargs)

    def update(self, layer: "AdapterHost", name: str, x: Tensor) -> Tensor:
        """s·ΔW applied to ``x`` (already dropped out) without the base output, in the factors'
        dtype; needed by kinds with :attr:`dora`."""
        raise NotImplementedError(f"{self.name} layers have no separate update (DoRA is not defined for them)")

    def bias_update(self, layer: "AdapterHost", name: str, result: Tensor) -> Tensor:
        """``result`` plus adapter ``name``'s s·b (its ``lora_bias``) along the output axis (the last one;
        dim 1 for convolutions), or ``result`` unchanged if the adapter has no bias."""
        if name not in layer.lora_bias:
            return result
        b = layer.lora_bias[name] * layer.scale[name]
        return result + b.view(-1, *[1] * (result.dim() - 2)).to(result.dtype) if self.bias_dim == 1 else \
            result + b.to(result.dtype)

    bias_dim = -1  #: the output axis that a ``lora_bias`` bias is added along (-1, or 1 for convolutions)

    def batch_dim(self, base: nn.Module, x: Tensor) -> int | None:
        """The dim of the input ``x`` that holds a batch's rows, for :func:`lorakit.mixed` (None: ``x``
        is unbatched)."""
        return 0 if x.dim() else None

    def forward_groups(self, layer: "AdapterHost", names: Sequence[str | None], x: Tensor, *args, **kwargs):
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



# -- helpers the kinds share -----------------------------------------------------------------------
def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on ``x``'s device (CPU bf16/fp16, CUDA fp16/bf16), or None
    outside autocast and for fp64 ``x`` (which autocast leaves alone)."""
    device = x.device.type
    if x.dtype == torch.float64 or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def skinny(m: Tensor, x2: Tensor) -> Tensor:
    """x2·mᵀ for a thin m (r rows) as (m·x2ᵀ)ᵀ: BLAS runs the product with the thin side as the
    output's rows 1.5-3x faster than x2·mᵀ with r columns (2048x1024, r=8, CPU)."""
    return (m @ x2.t()).t()
