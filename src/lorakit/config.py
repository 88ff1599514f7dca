"""`LoraConfig`: an immutable, validated description of one adapter.

A config says *which* weights get an adapter (``targets``, ``target_parameters``, ``exclude``)
and *how* it is shaped and initialised (``r``, ``alpha``, ``rank_pattern``, ``alpha_pattern``,
``init``, ``use_rslora``, ``use_dora``, ``dropout``). It never changes after construction; use
:func:`dataclasses.replace` to derive a variant.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

from torch import nn

__all__ = ["LoraConfig", "LoraError", "INITS", "BIASES", "Target"]

#: Valid values of ``LoraConfig.init``.
#: ``kaiming``: A ~ Kaiming-uniform(a=√5) (PEFT's default), ``gaussian``: A ~ N(0, 1/r),
#: ``normal``: A ~ N(0, 1) (the plain init of the seed's minimal example); B is zero for these.
#: ``random``: A and B both random (Kaiming-uniform, a=√5, as an untouched ``nn.Linear``), so ΔW ≠ 0 from
#: the start (PEFT's ``init_lora_weights=False``, for tests and debugging).
#: ``pissa`` (SVD) and ``olora`` (QR) take A, B from W and leave W − s·B·A in W (see
#: :mod:`lorakit.variants.rewriting_inits`); ``pissa_niter_<k>`` is PiSSA by a randomized SVD with k subspace iterations.
INITS = ("kaiming", "gaussian", "normal", "random", "pissa", "olora")
_PISSA_NITER = re.compile(r"pissa_niter_[0-9]+")

#: Valid values of ``LoraConfig.bias`` (PEFT's): which base-model biases train with the adapter.
#: ``none``: none; ``lora_only``: the ``bias`` of each module the adapter adapts; ``all``: every
#: parameter of the model named ``bias`` (not ``in_proj_bias`` and the like, as in PEFT).
BIASES = ("none", "lora_only", "all")

#: A target is a module name / dotted suffix, a regex string, a module type, or "all-linear".
Target = Union[str, type]


class LoraError(ValueError):
    """Raised for invalid configurations, unmatched targets, bad adapter files and misuse."""


#: The one rule for adapter names (library, files, server): they are keys of parameter containers,
#: folder names and URL path segments, so ASCII letters, digits, '_' and '-' only, 1-128 of them.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")


_DICTS = (nn.ParameterDict(), nn.ModuleDict())  # their keys become attributes: a name must not be one already


def check_name(adapter: object) -> str:
    """Return ``adapter`` if it is a valid adapter name (:data:`ADAPTER_NAME`), else raise :class:`LoraError`."""
    if not isinstance(adapter, str) or not ADAPTER_NAME.fullmatch(adapter):
        raise LoraError(f"adapter name {adapter!r} is invalid: use 1-128 letters, digits, '_' or '-'")
    if any(hasattr(d, adapter) for d in _DICTS):  # an adapter name is a key of both kinds of dict
        raise LoraError(f"adapter name {adapter!r} is the name of a torch module attribute or method "
                        f"(nn.ParameterDict.{adapter}); pick another name, e.g. {adapter + '_adapter'!r}")
    return adapter


def _as_tuple(value: Any, what: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, type)):
        return (value,)
    if isinstance(value, Sequence) or isinstance(value, (set, frozenset)):
        return tuple(value)
    raise LoraError(f"{what} must be a string, a module type or a list of them, got {type(value).__name__}")


class FrozenDict(dict):
    """A read-only dict (copyable and picklable, unlike ``MappingProxyType``)."""

    def _readonly(self, *args, **kwargs):
        raise TypeError("LoraConfig is immutable; derive a new one with dataclasses.replace")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _readonly

    def __reduce__(self):
        return FrozenDict, (dict(self),)

    def __deepcopy__(self, memo):
        return self


def _frozen_mapping(value: Mapping | None, what: str, cast: type) -> Mapping[str, Any]:
    out = {}
    for key, v in dict(value or {}).items():
        if not isinstance(key, str):
            raise LoraError(f"{what} keys must be strings (regex patterns), got {key!r}")
        try:
            re.compile(key)
        except re.error as e:
            raise LoraError(f"{what} key {key!r} is not a valid regex: {e}") from None
        out[key] = cast(v)
    return FrozenDict(out)


@dataclass(frozen=True)
class LoraConfig:
    r"""Configuration of one LoRA adapter.

    Args:
        r: rank of the update ΔW = B·A (≥ 1).
        alpha: scale numerator; the update is scaled by ``alpha / r`` (``alpha / √r`` with rsLoRA).
        dropout: dropout probability on the adapter's input, in [0, 1).
        targets: which modules to adapt. Each entry is an exact module path or dotted suffix
            (``"query"``, ``"attn.c_attn"``), a module type (``nn.Linear``), ``"all-linear"``
            (every linear layer except the output head), or a regex matched against the full
            module path (any string with characters other than letters, digits, ``_ . -``,
            e.g. ``r".*layer\.[01]\..*query"``). Every entry must match at least one module.
        target_parameters: raw parameters to adapt, by full name or dotted suffix
            (``"experts.weight"``); for weights that are not inside a supported layer.
        exclude: module paths/suffixes (or one regex string) never to adapt.
        rank_pattern: ``{regex: rank}``; the first key matching a module path
            (PEFT semantics: ``(.*\.)?key$``) overrides ``r`` there.
        alpha_pattern: ``{regex: alpha}``, likewise for ``alpha``.
        init: one of :data:`INITS`, or ``"pissa_niter_<k>"``.
        use_rslora: scale by ``alpha / √r`` instead of ``alpha / r``.
        use_dora: DoRA (weight-decomposed LoRA, as PEFT's ``use_dora``): each adapted weight also
            gets a trainable magnitude per output, W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ (see :mod:`lorakit.variants.dora`).
        modules_to_save: modules trained and saved whole with the adapter (e.g. a new
            classification head ``"classifier"``), same pattern rules as ``targets``.
        layers_to_transform: only modules in these layers (one index or several), as PEFT's field of that
            name: the index is the number after the first ``layers_pattern`` in the module path
            (``model.layers.3.mlp`` → 3), or without a pattern the first number two segments in. It
            narrows ``targets`` matched by name or dotted suffix, type or ``"all-linear"``; a module
            named by its full path and a regex entry are not narrowed (PEFT's rule).
        layers_pattern: the name(s) of the layer list (``"layers"``, ``"h"``) for ``layers_to_transform``.
        lora_bias: also train a bias b on B (PEFT's ``lora_bias``): the update is s·(B·A·x + b), and merging
            adds s·b into the base bias. Linear, Conv1D and ``nn.Conv*d`` (groups = 1) layers only; not with DoRA.
        trainable_token_indices: rows of embeddings trained as they are (PEFT's option of that
            name, e.g. new special tokens): a list of token ids for the input embedding, or
            ``{module name: ids}`` (PEFT's plain suffix match); a head tied to the input embedding
            follows it (see :mod:`lorakit.tokens`).
        bias: which of the *base model's* biases train with the adapter (PEFT's ``bias``): ``"none"``;
            ``"lora_only"``, the biases of the adapted modules; ``"all"``, every parameter named ``bias``.
            They are saved in the file and written into the model on load; the model keeps one value
            per bias (shared by all adapters), its original is restored by :func:`lorakit.delete` and
            inside :func:`lorakit.disabled`.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[Target, ...] = ()
    target_parameters: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    init: str = "kaiming"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ()
    layers_to_transform: tuple[int, ...] = ()
    layers_pattern: tuple[str, ...] = ()
    lora_bias: bool = False
    trainable_token_indices: Sequence[int] | Mapping[str, Sequence[int]] | None = None
    bias: str = "none"

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        # A lone regex string stays a string; a list of names becomes a tuple.
        for name in ("targets", "target_parameters", "exclude", "modules_to_save"):
            set_(name, _as_tuple(getattr(self, name), name))
        for t in self.targets:
            if not (isinstance(t, str) or (isinstance(t, type) and issubclass(t, nn.Module))):
                raise LoraError(f"targets entries must be strings or nn.Module subclasses, got {t!r}")
        set_("trainable_token_indices", _token_indices(self.trainable_token_indices))
        if not self.targets and not self.target_parameters and not self.modules_to_save \
                and self.trainable_token_indices is None:
            raise LoraError("LoraConfig needs targets (e.g. ['query', 'value'] or 'all-linear') "
                            "or target_parameters")
        layers = self.layers_to_transform
        layers = () if layers is None else (layers,) if isinstance(layers, int) else layers
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or \
                not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            raise LoraError(f"layers_to_transform must be a layer index >= 0 or a list of them, got {layers!r}")
        set_("layers_to_transform", tuple(layers))
        set_("layers_pattern", _as_tuple(self.layers_pattern, "layers_pattern"))
        if not all(isinstance(p, str) and p for p in self.layers_pattern):
            raise LoraError(f"layers_pattern must be a name or a list of names, got {self.layers_pattern!r}")
        if self.layers_pattern and not self.layers_to_transform:
            raise LoraError("layers_pattern needs layers_to_transform (the layer indices to adapt), as in PEFT")
        set_("rank_pattern", _frozen_mapping(self.rank_pattern, "rank_pattern", int))
        set_("alpha_pattern", _frozen_mapping(self.alpha_pattern, "alpha_pattern", float))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise LoraError(f"r must be an integer >= 1, got {self.r!r}")
        for key, r in self.rank_pattern.items():
            if r < 1:
                raise LoraError(f"rank_pattern[{key!r}] must be >= 1, got {r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise LoraError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        for key, a in self.alpha_pattern.items():
            if not (math.isfinite(a) and a > 0):
                raise LoraError(f"alpha_pattern[{key!r}] must be > 0, got {a}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise LoraError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.use_dora, bool):
            raise LoraError(f"use_dora must be True or False, got {self.use_dora!r}")
        if self.init not in INITS and not (isinstance(self.init, str) and _PISSA_NITER.fullmatch(self.init)):
            raise LoraError(f"unknown init {self.init!r}; valid inits are: {', '.join(INITS)}, pissa_niter_<k>")
        if self.use_dora and self.init not in ("kaiming", "gaussian", "normal", "random"):
            raise LoraError(f"use_dora with init={self.init!r} is not supported (not tested together); use DoRA "
                            "with a plain init (kaiming, gaussian, normal, random)")
        if not isinstance(self.lora_bias, bool):
            raise LoraError(f"lora_bias must be True or False, got {self.lora_bias!r}")
        if self.lora_bias and self.use_dora:
            raise LoraError("lora_bias=True is not supported with use_dora=True (PEFT refuses it too); use one of them")
        if self.bias not in BIASES:
            raise LoraError(f"bias must be one of {', '.join(map(repr, BIASES))} (which base-model biases train "
                            f"with the adapter), got {self.bias!r}")
        if self.lora_bias and (self.init == "olora" or self.init.startswith("pissa")):
            raise LoraError(f"lora_bias=True is not supported with init={self.init!r} (PEFT allows it only with its "
                            "plain inits); use init='kaiming' or 'random'")

    def in_layers(self, path: str) -> bool:
        """Whether ``layers_to_transform`` keeps the module at ``path`` (always, if it is not set)."""
        if not self.layers_to_transform:
            return True
        index = layer_index(path, self.layers_pattern)
        return index is not None and index in self.layers_to_transform

    def rank_for(self, path: str) -> int:
        """The rank used for the module at ``path`` (``rank_pattern`` first, else ``r``)."""
        return _pattern_lookup(self.rank_pattern, path, self.r)

    def alpha_for(self, path: str) -> float:
        """The alpha used for the module at ``path`` (``alpha_pattern`` first, else ``alpha``)."""
        return _pattern_lookup(self.alpha_pattern, path, self.alpha)

    def scale_for(self, path: str) -> float:
        """The factor s in ``W x + s·B A x`` for the module at ``path``."""
        r, alpha = self.rank_for(path), self.alpha_for(path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def layer_index(path: str, patterns: Sequence[str] = ()) -> int | None:
    """The layer index of the module at ``path`` by PEFT's rule (``check_target_module_exists``): the
    number after the first of ``patterns`` followed by ``.<digits>.``, or, without patterns, the first
    number that follows two path segments (``model.layers.3.mlp.up`` → 3); None if there is none."""
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match is not None:
                break
    return int(match["idx"]) if match else None
def _token_indices(value: Any) -> tuple[int, ...] | FrozenDict | None:
    """``trainable_token_indices`` validated: a tuple of distinct token ids >= 0, or a read-only
    ``{module name: tuple}``; None stays None."""
    def ids(v: Any, what: str) -> tuple[int, ...]:
        if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or not v or \
                not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
            raise LoraError(f"{what} must be a non-empty list of token ids (integers >= 0), got {v!r}")
        if len(set(v)) != len(v):
            raise LoraError(f"{what} lists a token id twice: {list(v)}")
        return tuple(v)
    if value is None:
        return None
    if isinstance(value, Mapping):
        if not value or not all(isinstance(k, str) and k for k in value):
            raise LoraError(f"trainable_token_indices as a dict maps module names to token ids, got {dict(value)!r}")
        return FrozenDict({k: ids(v, f"trainable_token_indices[{k!r}]") for k, v in value.items()})
    return ids(value, "trainable_token_indices")


def _pattern_lookup(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    for key, value in patterns.items():  # first match wins, as in PEFT
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default
