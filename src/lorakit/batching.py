"""Mixed-adapter batches: row i of a batch uses adapter ``adapters[i]`` (or none) in one forward.

>>> with lorakit.mixed(model, ["sql", "chat", None, "sql"]):      # doctest: +SKIP
...     logits = model(input_ids).logits                              # or model.generate(...)

The routing is scoped with a :class:`contextvars.ContextVar`: it exists only inside the ``with``
block of the thread or task that opened it (two threads serving different batches never see each
other's routing), and it is removed on exit even when the forward raises. There are no hooks.

Kernel: each adapted Linear / Conv1D / Embedding keeps a bank of its adapters' factors (A as
[slot, r_max, in] — for embeddings [slot, num, r_max] — and B·s as [slot, r_max, out], ranks
zero-padded, slot 0 all zeros), rebuilt only when an adapter is added, removed or changed (tracked
by tensor versions). Inside a routing each layer decides once per input shape how to run (a plan,
cached for the routing, so every decode step of ``generate`` reuses it): the rows' factors are
gathered from the bank (two ``index_select``) and applied with two batched matmuls, the first as
(A·xᵀ)ᵀ (the layout BLAS runs fast for thin r), the second added in place to the base output.
Batches that use one adapter take the plain single-adapter path. Other layer kinds
(convolutions, raw parameters), ``modules_to_save`` copies, training with dropout, and any forward
that needs gradients for the factors run per adapter group through the plain (differentiable)
path. The bank costs one extra copy of the adapters' factors per layer, made on first mixed use.
Beam search and ``num_return_sequences`` repeat rows (``repeat_interleave``): a batch of k·n rows
maps row j to ``adapters[j // k]``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from .config import LoraError
from .layers import ROUTING, LoraLayer, SavedModule
from .model import registry, wrappers

__all__ = ["mixed", "Routing"]


class Routing:
    """Per-row adapter names for one model, plus the factors gathered for them (a cache)."""

    def __init__(self, layers: Sequence[nn.Module], adapters: Sequence[str | None]) -> None:
        self.layers = {id(layer) for layer in layers}
        self.adapters = tuple(adapters)
        self.uniform = len(set(self.adapters)) == 1  # one adapter (or none) for every row
        self._plans: dict[tuple, tuple[str, object]] = {}

    def rows(self, batch: int) -> tuple[str | None, ...]:
        """Adapter per row of a batch of ``batch`` rows (k·n rows: each name repeated k times)."""
        n = len(self.adapters)
        if batch % n:
            raise LoraError(f"the batch has {batch} rows but the routing names {n} adapters; the batch size "
                            "must equal the number of names (or a multiple, for beams/samples)")
        k = batch // n
        return self.adapters if k == 1 else tuple(a for a in self.adapters for _ in range(k))

    def forward(self, layer: LoraLayer, x: Tensor, *args, **kwargs) -> Tensor:
        if self.uniform:  # the plain single-adapter path, without per-row bookkeeping
            name = self.adapters[0]
            return layer.kind.forward(layer, (name,) if name in layer.lora_A else (), x, *args, **kwargs)
        key = (id(layer), x.shape, torch.is_grad_enabled(), layer.training, bool(args or kwargs))
        plan = self._plans.get(key)
        if plan is None:  # decided once per layer and shape: every decode step of generate reuses it
            plan = self._plans[key] = self._plan(layer, x, bool(args or kwargs))
        how, data = plan
        if how == "plain":
            return layer.kind.forward(layer, data, x, *args, **kwargs)
        if how == "group":
            return _per_group(layer, data, x, *args, **kwargs)
        a_rows, b_rows, fresh = data  # "bmm": each row's own factors, gathered from the bank
        result = layer.base_layer(x)
        if layer.kind.mixed == "lookup":
            h = _embedding_rows(x, a_rows)
        else:
            # as (A·xᵀ)ᵀ: BLAS is 2.5-3.7x faster with the thin r side as the output's rows
            h = torch.bmm(a_rows, x.reshape(x.shape[0], -1, x.shape[-1]).to(a_rows.dtype).transpose(1, 2))
            h = h.transpose(1, 2)
        if fresh and result.dtype == b_rows.dtype and result.is_contiguous():  # no backward needs it: add into it
            result.view(x.shape[0], -1, result.shape[-1]).baddbmm_(h, b_rows)
            return result
        return result + torch.bmm(h, b_rows).view(result.shape).to(result.dtype)

    def _plan(self, layer: LoraLayer, x: Tensor, extra_args: bool) -> tuple[str, object]:
        """How this layer runs this batch: ("plain", names) | ("group", names) | ("bmm", gathered factors).

        Measured alternatives that lost everywhere on 2 CPU threads (SmolLM2 decode B=64 with 4 or 64
        adapters, B=16/16; MiniLM prefill 32x128 with 4 or 16): one GEMM per adapter group (0.17-0.82x
        of a merged model vs bmm's 0.87-0.94x) and two GEMMs over the used adapters' concatenated
        factors with a per-row block mask (0.57-0.90x)."""
        names = [a if a in layer.lora_A else None for a in self.rows(x.shape[0])]
        distinct = {n for n in names if n}
        if len(set(names)) == 1:  # the whole batch uses one adapter (or none): the plain path
            return "plain", tuple(distinct)
        fast = layer.kind.mixed is not None and not extra_args
        needs_grad = torch.is_grad_enabled() and any(layer.lora_A[n].requires_grad for n in distinct)
        if not fast or needs_grad or (layer.training and any(layer.dropout[n] > 0 for n in distinct)):
            return "group", names
        return "bmm", (*_gather(layer, names), layer.kind.owns_output(layer.base_layer))

    def forward_saved(self, wrapper: SavedModule, x: Tensor, *args, **kwargs) -> Tensor:
        """modules_to_save: each row through its adapter's copy (or the original)."""
        names = [a if a in wrapper.modules_to_save else None for a in self.rows(x.shape[0])]
        module = lambda n: wrapper.modules_to_save[n] if n else wrapper.base_layer  # noqa: E731
        if len(set(names)) == 1:
            return module(names[0])(x, *args, **kwargs)
        return _groups(names, x, lambda n, rows: module(n)(rows, *args, **kwargs))


def _bank(layer: LoraLayer) -> tuple[dict[str, int], Tensor, Tensor]:
    """The layer's adapters stacked (slot 0: zeros), cached until any factor or scale changes."""
    key = tuple((n, id(layer.lora_A[n]), layer.lora_A[n]._version, id(layer.lora_B[n]), layer.lora_B[n]._version,
                 layer.scale[n]) for n in layer.lora_A)
    cached = layer.__dict__.get("_bank")
    if cached is not None and cached[0] == key:
        return cached[1]
    names = list(layer.lora_A)
    r_max = max(layer.lora_A[n].shape[0] for n in names)
    a0, b0 = layer.lora_A[names[0]], layer.lora_B[names[0]]
    lookup = layer.kind.mixed == "lookup"  # A is a table looked up per token: [slot, num, r]; else [slot, r, in]
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
    layer.__dict__["_bank"] = (key, value)  # a plain cache: not a parameter, not in state_dict
    return value


def _gather(layer: LoraLayer, names: list[str | None]) -> tuple[Tensor, Tensor]:
    """Per-row A as [rows, r_max, in] and B·s as [rows, r_max, out] (zeros where no adapter).

    For embeddings A stays the bank [slots, num, r_max] (looked up per token) with the row slots."""
    index, bank_a, bank_b = _bank(layer)
    slots = torch.tensor([index[n] if n else 0 for n in names], device=bank_a.device)
    if layer.kind.mixed == "lookup":
        return (bank_a, slots), bank_b.index_select(0, slots)
    return bank_a.index_select(0, slots), bank_b.index_select(0, slots)


def _embedding_rows(x: Tensor, bank: tuple[Tensor, Tensor]) -> Tensor:
    table, slots = bank  # table: [slots, num, r_max]; row b looks up its own slot's A columns
    return table[slots[:, None], x].reshape(x.shape[0], -1, table.shape[-1])


def _groups(names: list[str | None], x: Tensor, run) -> Tensor:
    """Run ``run(name, rows_of_x)`` per distinct name and put the outputs back in row order."""
    result = None
    for name in dict.fromkeys(names):
        idx = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
        out = run(name, x.index_select(0, idx))
        if result is None:
            result = out.new_empty((x.shape[0], *out.shape[1:]))
        result.index_copy_(0, idx, out)  # in place (autograd records it): no copy of the whole output per group
    return result


def _per_group(layer: LoraLayer, names: list[str | None], x: Tensor, *args, **kwargs) -> Tensor:
    """Exact, differentiable fallback for any layer kind: each adapter group through the plain path."""
    return _groups(names, x, lambda n, rows: layer.kind.forward(layer, (n,) if n else (), rows, *args, **kwargs))


@contextlib.contextmanager
def mixed(model: nn.Module, adapters: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block, row i of every batch uses adapter ``adapters[i]`` (None: the base model).

    Works for forward and Hugging Face ``generate`` (KV cache, sampling, beam search). Adapters may
    differ in rank and in the modules they target. Raises :class:`LoraError` for unknown names,
    or if adapters are merged.
    """
    reg = registry(model)
    adapters = list(adapters)
    if not adapters:
        raise LoraError("mixed() needs one adapter name (or None) per batch row")
    unknown = sorted({a for a in adapters if a is not None and a not in reg.configs})
    if unknown:
        raise LoraError(f"unknown adapter(s) {unknown}; the model has: {sorted(reg.configs)}")
    if reg.merged:
        raise LoraError(f"adapters {list(reg.merged)} are merged; unmerge before running mixed batches")
    token = ROUTING.set(Routing([w for _, w in wrappers(model)], adapters))
    try:
        yield model
    finally:
        ROUTING.reset(token)
