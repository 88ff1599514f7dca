"""Mixed-adapter batches: row i of a batch uses adapter ``adapters[i]`` (or none) in one forward.

>>> with lorakit.mixed(model, ["sql", "chat", None, "sql"]):      # doctest: +SKIP
...     logits = model(input_ids).logits                              # or model.generate(...)

The routing is scoped with a :class:`contextvars.ContextVar`: it exists only inside the ``with``
block of the thread or task that opened it (two threads serving different batches never see each
other's routing), and it is removed on exit even when the forward raises. There are no forward
hooks (the one class-level change is :func:`_observe_generate`'s, for Hugging Face ``generate``).
Under ``torch.compile`` (compiled code cannot read the ContextVar) each adapted layer leaves the
graph while any ``mixed`` block is open in the process and runs routed in eager mode: exact, at
eager speed (see :data:`lorakit.routing.MIXED_OPEN`); outside such blocks compiled models have no graph breaks.

Kernel: inside a routing each layer decides once per input shape how to run (a plan, cached for
the routing, so every decode step of ``generate`` reuses it; what a plan needs of a layer's adapters
is cached on the layer across routings, so planning a new one costs a few dict lookups per layer).
Linear / Conv1D / Embedding layers on CPU with gradients off use :mod:`lorakit.batching.rowlora`: one C++ op
reads each row's factors from the adapters' own parameters by a per-row slot index and adds the
update into the base output; nothing the size of the rows' factors is allocated and no second copy
of the factors is kept. Otherwise (the kernel not built, ``rowlora.use(False)``, gradients on,
another device) the plain PyTorch path
runs: a per-layer bank of the adapters' factors (A as [slot, r_max, in] — for embeddings
[slot, num, r_max] — and B·s as [slot, r_max, out], ranks zero-padded, slot 0 all zeros, rebuilt
only when an adapter changes: see Staleness), from which the rows' factors are gathered (two
``index_select``) and applied with two batched matmuls, the first as (A·xᵀ)ᵀ (the layout BLAS runs
fast for thin r), the second added in place to the base output; this path is the kernel's reference
in the tests, and its bank is one extra copy of the factors, made on first use. Batches that use one
adapter take the plain single-adapter path. Layers with a DoRA adapter (per-row magnitudes: each
row is scaled by its own adapter's m/‖W + ΔW‖) or a ``lora_bias`` adapter, other layer kinds (convolutions, raw parameters),
``modules_to_save`` copies, training with dropout, and any forward that needs gradients for the
factors run per adapter group through the plain (differentiable) path; they reassemble rows only
from one output tensor whose dim 0 is the batch (a module returning a tuple, e.g. ``nn.GRU``,
raises :class:`LoraError` when rows of one batch need different copies).

Rows are dim 0 of each routed layer's input. A batch must have exactly n rows for n names, or k·n
for an expansion lorakit knows of: ``expand=k`` given to :func:`mixed`, or the beams /
``num_return_sequences`` that Hugging Face ``generate`` announces (lorakit observes its
``_expand_inputs_for_generation``); row j then uses ``adapters[j // k]`` (``repeat_interleave``
order). Anything else, e.g. a sequence-first [T, B, d] input, raises :class:`LoraError`.

Staleness: a plan is remade when it no longer holds. The kernel reads the adapters' parameters when
it runs, so its plans only check that the layer has the same adapters, parameter objects and scales
(~2 µs per layer for 64 adapters); in-place writes, ``.data =`` and ``.to()`` are read as they are.
The plain path's bank and gathered factors are copies: they are reused only while every factor is the
same parameter object with the same tensor version (in-place writes under ``no_grad``), data pointer
and layout (``.data =``, ``.to()``), the scales are equal and no adapter was added or removed
(``LoraLayer.generation``), checked at every forward. As for autograd, in-place writes through
``param.data`` bypass the version counter and are not seen by the plain path. An adapter deleted, or
merged, inside an open block raises.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .. import routing as _routing
from ..config import LoraError
from ..kinds import embed_scaled
from ..layers import LoraLayer, SavedModule
from ..state import lora_layers, registry, unwrap, wrappers
from ..tokens import TokenLayer
from ..variants import rewriting_inits as inits
from . import rowlora

__all__ = ["mixed", "Routing"]


class Routing:
    """Per-row adapter names for one model, plus the factors gathered for them (a cache)."""

    def __init__(self, layers: dict[int, str], adapters: Sequence[str | None], known: dict, expand: int = 1) -> None:
        self.layers = layers  # id(wrapper) -> its path in the model (for messages)
        self.adapters = tuple(adapters)
        self.known = known  # the registry's live {name: config} ...
        self.registered = set(known)  # ... and its names now: adding or deleting adapters mid-block is refused
        self.expand = expand
        self.expansions = {expand}  # allowed row multiples: expand, and expand·k for generate's k
        self.uniform = len(set(self.adapters)) == 1  # one adapter (or none) for every row
        self._plans: dict[tuple, tuple[str, object, Callable[[LoraLayer], bool]]] = {}  # see _plan
        self._rows: dict[int, tuple[str | None, ...]] = {}  # batch size -> adapter per row (validated)
        self._slots: dict[tuple, tuple[Tensor, tuple[int, ...]]] = {}  # see _kernel_slots

    def expanded(self, k: int) -> None:
        """Hugging Face ``generate`` repeats each input row k times (beams, num_return_sequences)."""
        self.expansions.add(self.expand * int(k))

    def label(self, module: nn.Module) -> str:
        """``'path' (BaseClass)`` of a routed wrapper, for messages."""
        return f"{self.layers.get(id(module), '?')!r} ({type(module.base_layer).__name__})"

    def check_alive(self) -> None:
        """Raise if adapters were added or deleted since the block opened: a deleted one would leave its rows
        on the base, and modules wrapped by a new one are not routed (one set compare, ~0.6 µs for 64 names)."""
        if self.known.keys() != self.registered:
            raise LoraError(f"adapters were added {sorted(self.known.keys() - self.registered)} or deleted "
                            f"{sorted(self.registered - self.known.keys())} inside an open lorakit.mixed block; "
                            "open a new block after changing the model's adapters")

    def rows(self, module: nn.Module, x: Tensor, dim: int | None = 0) -> tuple[str | None, ...]:
        """Adapter per row of ``x`` (its batch dim ``dim``, None if it has none): n rows, or k·n for a
        known expansion k (each name k times)."""
        n, batch = len(self.adapters), x.shape[dim] if dim is not None and x.dim() > dim else 0
        if dim is not None and batch in self._rows:  # every layer of a step has the same batch: checked once
            return self._rows[batch]
        k = batch // n
        if batch % n or k not in self.expansions:
            allowed = " or ".join(str(n * m) for m in sorted(self.expansions))
            if dim is None:
                raise LoraError(f"{self.label(module)}: input of shape {tuple(x.shape)} is unbatched, so its rows "
                                f"cannot use the {n} adapters of this routing; give it a batch dim")
            raise LoraError(f"{self.label(module)}: input of shape {tuple(x.shape)}: dim {dim} must be "
                            f"the batch, {allowed} rows for the {n} adapter names of this routing (for other "
                            "expansions of the rows pass lorakit.mixed(..., expand=k); sequence-first "
                            "inputs are not supported)")
        rows = self._rows[batch] = self.adapters if k == 1 else tuple(a for a in self.adapters for _ in range(k))
        return rows

    def forward(self, layer: LoraLayer, x: Tensor, *args, **kwargs) -> Tensor:
        if layer.merged:
            raise LoraError(f"adapters {list(layer.merged)} were merged inside a lorakit.mixed block; unmerge first")
        self.check_alive()
        key = (id(layer), x.shape, x.device, torch.is_grad_enabled(), layer.training, bool(args or kwargs))
        plan = self._plans.get(key)
        if plan is not None and plan[0] == "rows" and plan[2](layer):  # the kernel's plan, still valid: every
            return _kernel_forward(layer, x, plan[1])  # decode step after the first (DoRA layers have none)
        if layer.lora_magnitude_vector or layer.lora_bias:  # DoRA, lora_bias: each adapter's rows through the
            # layer's own forward (exact; the batched paths know neither magnitudes nor biases)
            rows = self.adapters[:1] if self.uniform else self.rows(layer, x, layer.kind.batch_dim(layer.base_layer, x))
            names = [a if a in layer.lora_A else None for a in rows]
            run = lambda n, rows: layer.run((n,) if n else (), rows, *args, **kwargs)  # noqa: E731
            return run(names[0], x) if len(set(names)) == 1 else _groups(self.label(layer), names, x, run)
        if self.uniform:  # the plain single-adapter path, without per-row bookkeeping
            name = self.adapters[0]
            return layer.kind.forward(layer, (name,) if name in layer.lora_A else (), x, *args, **kwargs)
        if plan is None or not plan[2](layer):
            # decided once per layer and shape (every decode step of generate reuses it), again if it went stale
            plan = self._plans[key] = self._plan(layer, x, bool(args or kwargs))
        how, data, _ = plan
        if how == "rows":
            return _kernel_forward(layer, x, data)
        if how == "plain":
            return layer.kind.forward(layer, data, x, *args, **kwargs)
        if how == "group":
            out = layer.kind.forward_groups(layer, data, x, *args, **kwargs)
            if out is NotImplemented:  # the kind's rows are x's dim 0, its other arguments shared
                out = _groups(self.label(layer), data, x,
                              lambda n, rows: layer.kind.forward(layer, (n,) if n else (), rows, *args, **kwargs))
            return out
        a_rows, b_rows, fresh = data  # "bmm": each row's own factors, gathered from the bank
        result = layer.base_layer(x)
        if layer.kind.row_gather == "lookup":  # a scaled embedding (Gemma's) scales the update as its lookup
            h = embed_scaled(layer.base_layer, _embedding_rows(x, a_rows))
        else:
            # as (A·xᵀ)ᵀ: BLAS is 2.5-3.7x faster with the thin r side as the output's rows
            h = torch.bmm(a_rows, x.reshape(x.shape[0], -1, x.shape[-1]).to(a_rows.dtype).transpose(1, 2))
            h = h.transpose(1, 2)
        if fresh and result.dtype == b_rows.dtype and result.is_contiguous():  # no backward needs it: add into it
            result.view(x.shape[0], -1, result.shape[-1]).baddbmm_(h, b_rows)
            return result
        return result + torch.bmm(h, b_rows).view(result.shape).to(result.dtype)

    def _plan(self, layer: LoraLayer, x: Tensor, extra_args: bool) -> tuple[str, object, Callable[[LoraLayer], bool]]:
        """How this layer runs this batch: ("plain", names) | ("group", names) | ("rows", the kernel's
        slots and factor lists) | ("bmm", gathered factors), then a check of whether the plan still holds
        for the layer (it is remade when not): the same adapters (``generation``); for "rows" also the same
        parameter objects and scales (the kernel reads the parameters' data when it runs, so in-place
        writes, ``.data =`` and ``.to()`` need no new plan); for "bmm", whose factors were copied, the
        same factors and scales (:func:`_unchanged`).

        Measured alternatives that lost everywhere on 2 CPU threads (SmolLM2 decode B=64 with 4 or 64
        adapters, B=16/16; MiniLM prefill 32x128 with 4 or 16): one GEMM per adapter group (0.17-0.82x
        of a merged model vs bmm's 0.87-0.94x) and two GEMMs over the used adapters' concatenated
        factors with a per-row block mask (0.57-0.90x)."""
        rows = self.rows(layer, x, layer.kind.batch_dim(layer.base_layer, x))
        if (layer.kind.row_gather is not None and not extra_args and not torch.is_grad_enabled()
                and x.device.type == "cpu" and rowlora.available()):
            table = _kernel_table(layer)
            if table.fits(x):
                slots, used, uniform = self._kernel_slots(table, rows)
                dropout = layer.training and any(layer.dropout[table.names[i]] > 0 for i in used)
                if not (uniform or dropout):
                    return "rows", (slots, *table.select(used), table.fresh), table.current
        names = [a if a in layer.lora_A else None for a in rows]
        distinct = {n for n in names if n}
        if len(set(names)) == 1:  # the whole batch uses one adapter (or none): the plain path
            return "plain", tuple(distinct), _same_adapters(layer)
        fast = layer.kind.row_gather is not None and not extra_args
        needs_grad = torch.is_grad_enabled() and any(layer.lora_A[n].requires_grad for n in distinct)
        if not fast or needs_grad or (layer.training and any(layer.dropout[n] > 0 for n in distinct)):
            return "group", names, _same_adapters(layer)
        generation, stamp = layer.generation, _stamp(layer, distinct)
        return ("bmm", (*_gather(layer, names), layer.kind.owns_output(layer.base_layer)),
                lambda now: now.generation == generation and _unchanged(now, stamp))

    def _kernel_slots(self, table: _KernelTable, rows: tuple[str | None, ...]) -> tuple[Tensor, tuple[int, ...], bool]:
        """The kernel's slot per row (-1: no adapter in this layer) into the adapters the rows use, their
        indices in ``table``, and whether all rows have the same one (or none); computed once per routing for
        all layers that have the same adapters."""
        key = (table.names, len(rows))
        cached = self._slots.get(key)
        if cached is None:
            where = [table.index.get(a, -1) for a in rows]
            used = tuple(sorted({i for i in where if i >= 0}))
            local = {i: j for j, i in enumerate(used)}
            slots = torch.tensor([local.get(i, -1) for i in where], dtype=torch.long)
            cached = self._slots[key] = slots, used, len(set(where)) == 1
        return cached

    def forward_tokens(self, layer: TokenLayer, x: Tensor, *args, **kwargs) -> Tensor:
        """Trainable tokens (:mod:`lorakit.tokens`): each adapter group's rows with its own rows of W."""
        self.check_alive()
        if layer.merged:
            raise LoraError(f"adapters {list(layer.merged)} were merged inside a lorakit.mixed block; unmerge first")
        run = lambda n, rows: layer.run((n,) if n else (), rows, *args, **kwargs)  # noqa: E731
        if self.uniform:
            return run(self.adapters[0] if self.adapters[0] in layer.token_indices else None, x)
        names = [a if a in layer.token_indices else None for a in self.rows(layer, x)]
        return run(names[0], x) if len(set(names)) == 1 else _groups(self.label(layer), names, x, run)

    def forward_saved(self, wrapper: SavedModule, x: Tensor, *args, **kwargs) -> Tensor:
        """modules_to_save: each row through its adapter's copy (or the original)."""
        self.check_alive()

        def module(name: str | None) -> nn.Module:
            return wrapper.modules_to_save[name] if name in wrapper.modules_to_save else wrapper.base_layer

        if self.uniform:  # one copy for every row, whatever the input's layout (as LoraLayer's plain path)
            return module(self.adapters[0])(x, *args, **kwargs)
        names = [a if a in wrapper.modules_to_save else None for a in self.rows(wrapper, x)]
        if len(set(names)) == 1:
            return module(names[0])(x, *args, **kwargs)
        return _groups(self.label(wrapper), names, x, lambda n, rows: module(n)(rows, *args, **kwargs))


class _KernelTable:
    """A layer's adapters as :mod:`lorakit.batching.rowlora`'s op reads them: names in the order of the layer's
    ParameterDict (``index``), the factor parameters and scales in that order, and whether the op can read
    them (2-D contiguous floating CPU factors whose shapes fit the layer). Cached on the layer
    (:func:`_kernel_table`) while :meth:`current`, so planning a new routing costs a few dict lookups per
    layer instead of reading every adapter's parameters. The op reads the parameters' data when it runs
    (and checks their shapes, layout and device again), so their values need no stamp."""

    __slots__ = ("generation", "names", "index", "a", "b", "scale", "scales", "order_a", "order_b", "readable",
                 "in_features", "fresh", "lookup")

    def __init__(self, layer: LoraLayer) -> None:
        self.generation = layer.generation
        self.order_a = tuple(layer.lora_A._parameters.values())  # ParameterDict keeps its entries there
        self.order_b = tuple(layer.lora_B._parameters.values())
        self.names = tuple(layer.lora_A._parameters)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.a = list(self.order_a)
        self.b = [layer.lora_B[n] for n in self.names]
        self.scales = dict(layer.scale)
        self.scale = [float(layer.scale[n]) for n in self.names]
        self.readable = all(a.dim() == b.dim() == 2 and b.shape[1] == a.shape[0] and a.shape[1] == self.a[0].shape[1]
                            and b.shape[0] == self.b[0].shape[0] and a.is_contiguous() and b.is_contiguous()
                            and a.device.type == b.device.type == "cpu" and a.is_floating_point()
                            and b.is_floating_point() for a, b in zip(self.a, self.b))
        self.in_features = self.a[0].shape[-1] if self.a else -1
        self.fresh = layer.kind.owns_output(layer.base_layer)
        self.lookup = layer.kind.row_gather == "lookup"  # embeddings: x are ids, A is (r, num)

    def current(self, layer: LoraLayer) -> bool:
        """Whether the layer still has these adapters, parameter objects and scales (~2 µs for 64 adapters;
        the ParameterDicts are read from ``_modules``, which spares two ``Module.__getattr__``)."""
        modules = layer._modules
        return (layer.generation == self.generation and layer.scale == self.scales
                and all(map(operator.is_, self.order_a, modules["lora_A"]._parameters.values()))
                and all(map(operator.is_, self.order_b, modules["lora_B"]._parameters.values())))

    def fits(self, x: Tensor) -> bool:
        if self.lookup:
            return self.readable and x.dtype in (torch.long, torch.int)
        return self.readable and x.is_floating_point() and x.shape[-1] == self.in_features

    def select(self, used: tuple[int, ...]) -> tuple[list[Tensor], list[Tensor], list[float]]:
        """The op's factor and scale lists for the adapters at ``used``."""
        if len(used) == len(self.names):
            return self.a, self.b, self.scale
        return [self.a[i] for i in used], [self.b[i] for i in used], [self.scale[i] for i in used]


def _kernel_table(layer: LoraLayer) -> _KernelTable:
    """The layer's :class:`_KernelTable`, rebuilt when it is no longer :meth:`~_KernelTable.current`."""
    table = layer.__dict__.get("_kernel_table")
    if table is None or not table.current(layer):
        table = layer.__dict__["_kernel_table"] = _KernelTable(layer)  # a plain cache, not in state_dict
    return table


def _same_adapters(layer: LoraLayer) -> Callable[[LoraLayer], bool]:
    generation = layer.generation
    return lambda now: now.generation == generation


def _kernel_forward(layer: LoraLayer, x: Tensor, data: tuple) -> Tensor:
    """The base output plus each row's update, added in place by the kernel (into a copy if the base
    output is not the layer's own fresh, contiguous tensor)."""
    slots, a, b, scale, fresh = data
    result = layer._modules["base_layer"](x)  # (not layer.base_layer: Module.__getattr__ costs ~1 µs)
    if not (fresh and result.is_contiguous()):
        result = result.clone(memory_format=torch.contiguous_format)
    rows = x.shape[0]
    y = result if result.dim() == 3 else result.view(rows, -1, result.shape[-1])  # (rows, tokens, features)
    if layer.kind.row_gather == "lookup":  # token ids; a scaled embedding (Gemma's) scales the update as its lookup
        if getattr(layer.base_layer, "embed_scale", None) is not None:
            factor = float(embed_scaled(layer.base_layer, torch.ones((), dtype=torch.float64)))
            scale = [s * factor for s in scale]
        rowlora.add_rows_unchecked_(y, x.reshape(rows, -1), a, b, scale, slots, lookup=True)
        return result
    x3 = x if x.dim() == 3 else x.reshape(rows, -1, x.shape[-1])
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    rowlora.add_rows_unchecked_(y, x3, a, b, scale, slots)
    return result


_VERSION = operator.attrgetter("_version")


def _stamp(layer: LoraLayer, names) -> tuple:
    """What the factors of ``names`` are now, for the copies the plain PyTorch path makes (bank, gathered
    factors): the layer's names (to look its parameters up again), the parameter objects with their
    storage kept alive (so that no other tensor can get the same data pointer while compared), their
    versions, data pointers and layouts (a ``.data =`` view keeps the pointer), and the scales (a copy)."""
    names = sorted(names)
    params = tuple(p for n in names for p in (layer.lora_A[n], layer.lora_B[n]))
    kept = tuple(p.detach() for p in params)
    return (names, params, kept, list(map(_VERSION, params)), list(map(Tensor.data_ptr, params)),
            [(p.shape, p.stride()) for p in params], dict(layer.scale))


def _unchanged(layer: LoraLayer, stamp: tuple) -> bool:
    """Whether the factors are still those of ``stamp``: the same parameter objects in the layer, with the
    same version, data pointer and layout each (~30 µs for 64 adapters' 128 factors), and the same scales."""
    names, params, _, versions, pointers, layouts, scale = stamp
    a, b = layer.lora_A._parameters, layer.lora_B._parameters  # ParameterDict keeps its entries there
    return (all(map(operator.is_, params, [p for n in names for p in (a.get(n), b.get(n))]))
            and list(map(_VERSION, params)) == versions and list(map(Tensor.data_ptr, params)) == pointers
            and [(p.shape, p.stride()) for p in params] == layouts and layer.scale == scale)


def _bank(layer: LoraLayer) -> tuple[dict[str, int], Tensor, Tensor]:
    """The layer's adapters stacked (slot 0: zeros), cached until any factor or scale changes."""
    cached = layer.__dict__.get("_bank")
    if cached is not None and cached[0] == layer.generation and _unchanged(layer, cached[1]):
        return cached[2]
    names = list(layer.lora_A)
    r_max = max(layer.lora_A[n].shape[0] for n in names)
    a0, b0 = layer.lora_A[names[0]], layer.lora_B[names[0]]
    lookup = layer.kind.row_gather == "lookup"  # A is a table looked up per token: [slot, num, r]; else [slot, r, in]
    bank_a = a0.new_zeros((len(names) + 1, a0.shape[1], r_max) if lookup else (len(names) + 1, r_max, a0.shape[1]))
    bank_b = b0.new_zeros(len(names) + 1, r_max, b0.shape[0])
    with torch.no_grad():
        for i, n in enumerate(names, 1):
            r = layer.lora_A[n].shape[0]
            if lookup:
                bank_a[i, :, :r] = layer.lora_A[n].t()
            else:
                bank_a[i, :r] = layer.lora_A[n]
            bank_b[i, :r, :] = layer.lora_B[n].t() * layer.scale[n]
    value = ({n: i for i, n in enumerate(names, 1)}, bank_a, bank_b)
    layer.__dict__["_bank"] = (layer.generation, _stamp(layer, names), value)  # a plain cache, not in state_dict
    return value


def _gather(layer: LoraLayer, names: list[str | None]) -> tuple[Tensor, Tensor]:
    """Per-row A as [rows, r_max, in] and B·s as [rows, r_max, out] (zeros where no adapter).

    For embeddings A stays the bank [slots, num, r_max] (looked up per token) with the row slots."""
    index, bank_a, bank_b = _bank(layer)
    slots = torch.tensor([index[n] if n else 0 for n in names], device=bank_a.device)
    if layer.kind.row_gather == "lookup":
        return (bank_a, slots), bank_b.index_select(0, slots)
    return bank_a.index_select(0, slots), bank_b.index_select(0, slots)


def _embedding_rows(x: Tensor, bank: tuple[Tensor, Tensor]) -> Tensor:
    table, slots = bank  # table: [slots, num, r_max]; row b looks up its own slot's A columns
    return table[slots[:, None], x].reshape(x.shape[0], -1, table.shape[-1])


def _groups(label: str, names: list[str | None], x: Tensor, run) -> Tensor:
    """Run ``run(name, rows_of_x)`` per distinct name and put the outputs back in row order: the exact,
    differentiable fallback for any layer kind and for ``modules_to_save`` copies.

    Only a tensor whose dim 0 are the rows can be reassembled; anything else (a tuple such as
    ``nn.GRU``'s, whose hidden state has the batch on dim 1) raises :class:`LoraError`."""
    result = None
    for name in dict.fromkeys(names):
        idx = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
        out = run(name, x.index_select(0, idx))
        if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != len(idx):
            what = type(out).__name__ if not isinstance(out, Tensor) else f"a tensor of shape {tuple(out.shape)}"
            raise LoraError(f"{label}: its forward on "
                            f"{len(idx)} rows returned {what}; lorakit.mixed reassembles per-adapter rows only "
                            "from one tensor whose dim 0 is the batch. Run batches that use one adapter for "
                            "this module (set_active, or lorakit.mixed with one name)")
        if result is None:
            result = out.new_empty((x.shape[0], *out.shape[1:]))
        result.index_copy_(0, idx, out)  # in place (autograd records it): no copy of the whole output per group
    return result


@contextlib.contextmanager
def mixed(model: nn.Module, adapters: Sequence[str | None], expand: int = 1) -> Iterator[nn.Module]:
    """Within the block, row i of every batch uses adapter ``adapters[i]`` (None: the base model).

    Works for forward and Hugging Face ``generate`` (KV cache, sampling, beam search and
    ``num_return_sequences``, whose repeated rows lorakit observes). ``expand=k``: batches of
    k·len(adapters) rows, each name repeated k times (``repeat_interleave``). Adapters may differ in
    rank and in the modules they target. Raises :class:`LoraError` for unknown names, merged
    adapters, None rows on a model whose weights a PiSSA/OLoRA adapter rewrote (they would not run
    the original model), rows other than those of the one adapter that trains base biases
    (``LoraConfig.bias``: the model holds them once, for every row), or (at forward) a batch whose
    dim 0 does not match.
    """
    reg = registry(model)
    adapters = list(adapters)
    if not adapters:
        raise LoraError("mixed() needs one adapter name (or None) per batch row")
    if isinstance(expand, bool) or not isinstance(expand, int) or expand < 1:
        raise LoraError(f"expand must be a positive int (rows per name), got {expand!r}")
    unknown = sorted({a for a in adapters if a is not None and a not in reg.configs})
    if unknown:
        raise LoraError(f"unknown adapter(s) {unknown}; the model has: {sorted(reg.configs)}")
    if reg.merged:
        raise LoraError(f"adapters {list(reg.merged)} are merged; unmerge before running mixed batches")
    trained = sorted(n for n, held in reg.biases.items() if held)
    if trained and (len(trained) > 1 or set(adapters) != {trained[0]}):
        raise LoraError(f"adapters {trained} trained base-model biases (LoraConfig.bias), which the model holds once "
                        "for every row; rows of other adapters (or None) would run them too. Run those rows "
                        "separately, or delete the adapters that train biases")
    if None in adapters:
        rewriting = sorted({n for _, layer in lora_layers(model) for n in inits.rewritten(layer)}
                           if any(inits.rewrites(c.init) for c in reg.configs.values()) else ())
        if rewriting:
            raise LoraError(f"rows without an adapter (None) would run the residual weights that adapters {rewriting} "
                            "(PiSSA/OLoRA) left in their layers, not the original model; for the original model, "
                            "save those adapters with convert_to_lora=True and load them on an unmodified model")
    _observe_generate(model)
    token = _routing.enter(Routing({id(w): path for path, w in wrappers(model)}, adapters, reg.configs, expand))
    try:
        yield model
    finally:
        _routing.leave(token)


_EXPAND = "_expand_inputs_for_generation"  # transformers' GenerationMixin: repeats rows for beams/samples


def _observe_generate(model: nn.Module) -> None:
    """Make the model class report generate's row expansion to the open routing (once per class).

    Outside a ``mixed`` block the wrapper only calls the original. If transformers renames the method,
    nothing is observed and expanded batches raise :class:`LoraError` (never misrouted)."""
    cls = type(unwrap(model))
    original = inspect.getattr_static(cls, _EXPAND, None)
    static = isinstance(original, staticmethod)
    fn = original.__func__ if static else original
    if not callable(fn) or getattr(fn, "_lorakit_observer", False):
        return

    @functools.wraps(fn)
    def observed(*args, **kwargs):
        routing = _routing.ROUTING.get()
        if routing is not None:
            call = inspect.signature(fn).bind(*args, **kwargs)
            call.apply_defaults()
            routing.expanded(call.arguments.get("expand_size", 1))
        return fn(*args, **kwargs)
    observed._lorakit_observer = True
    setattr(cls, _EXPAND, staticmethod(observed) if static else observed)
