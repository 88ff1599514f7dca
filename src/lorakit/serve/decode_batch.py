"""The decode batch of the serving engine: one left-padded KV cache shared by the active rows.

New requests are prefilled together, left-padded (padding positions are zeroed in the cache).
Rows then join the batch by left-padding: with ``L`` the longest cache, a row with ``n`` cached
tokens gets ``L - n`` zero key/value columns on the left, masked out by the attention mask.
Positions are explicit per row (``position_ids = n``), so RoPE sees each row's true position.
A finished row is removed with ``index_select`` and columns that are padding in every remaining
row are trimmed.

Layers: full attention (Llama, Qwen2, ...) and sliding-window attention (e.g. Gemma 3, which
mixes both). Every layer keeps its whole cache (a sliding layer is not truncated to its window),
and transformers builds the sliding-window mask from column indices (key column > query column -
window). That is exact here because each row's real tokens are contiguous and end at the last
column, so a column distance is the row's token distance. Layer types whose mask depends on
absolute positions (chunked attention) or that are not attention at all are refused.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["Batch", "cache_tensors", "full_cache", "check_layers", "sample"]

SUPPORTED_LAYERS = ("full_attention", "sliding_attention")


def check_layers(config) -> None:
    """ValueError unless every layer of a model with this config is causal full or sliding-window
    attention (the layer types this batch handles exactly)."""
    from transformers.cache_utils import get_layer_types_and_kwargs
    text = config.get_text_config(decoder=True)
    types = get_layer_types_and_kwargs(text)[0]  # what transformers' DynamicCache is built from
    unsupported = sorted(set(types) - set(SUPPORTED_LAYERS))
    if unsupported or getattr(text, "use_bidirectional_attention", False) or not getattr(text, "is_causal", True):
        what = unsupported or ["bidirectional attention"]
        raise ValueError(f"lorakit serve supports causal full and sliding-window attention only; this model uses "
                         f"{what}")


def full_cache(kv: Sequence[tuple[Tensor, Tensor]] = ()):
    """A transformers ``DynamicCache`` whose every layer is a full-attention layer holding ``kv``
    (handed over, no copy); without ``kv``, layers are added as the forward fills them."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer
    cache = DynamicCache()
    for k, v in kv:
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache


def cache_tensors(cache) -> list[tuple[Tensor, Tensor]]:
    """Per layer ``(keys, values)`` of a transformers cache, each ``[batch, heads, seq, dim]``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _left_pad(t: Tensor, length: int) -> Tensor:
    """Zeros on the left of the sequence axis (-2 for key/value tensors, -1 for masks)."""
    dim = -1 if t.dim() == 2 else -2
    pad = length - t.shape[dim]
    if pad == 0:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Batch:
    """Rows being decoded together: their padded KV cache, attention mask and next positions."""

    def __init__(self, config) -> None:
        check_layers(config)
        self.config = config
        self.kv: list[tuple[Tensor, Tensor]] = []   # per layer [rows, heads, L, dim]
        self.mask: Tensor | None = None             # [rows, L], 1 = real token
        self.positions: Tensor | None = None        # [rows]: cached real tokens per row = next position

    def __len__(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def add(self, kv: Sequence[tuple[Tensor, Tensor]], mask: Tensor) -> None:
        """Append rows whose left-padded cache is ``kv`` and whose attention mask is ``mask`` [rows, T]."""
        pad = (mask == 0)[:, None, :, None]
        if pad.any():  # padding positions hold garbage (possibly NaN): zeros, so masking them is exact
            kv = [(k.masked_fill(pad, 0), v.masked_fill(pad, 0)) for k, v in kv]
        if self.mask is None:
            self.kv, self.mask, self.positions = list(kv), mask, mask.sum(1)
            return
        length = max(mask.shape[1], self.mask.shape[1])
        self.kv = [(torch.cat([_left_pad(bk, length), _left_pad(k, length)]),
                    torch.cat([_left_pad(bv, length), _left_pad(v, length)]))
                   for (bk, bv), (k, v) in zip(self.kv, kv)]
        self.mask = torch.cat([_left_pad(self.mask, length), _left_pad(mask, length)])
        self.positions = torch.cat([self.positions, mask.sum(1)])

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order); trim columns that are padding in every row left."""
        if not rows:
            self.kv, self.mask, self.positions = [], None, None
            return
        idx = torch.tensor(list(rows), device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        start = int((mask.sum(0) > 0).long().argmax())  # first column some row really uses
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, idx)
        self.kv = [(k.index_select(0, idx)[:, :, start:], v.index_select(0, idx)[:, :, start:]) for k, v in self.kv]

    @torch.no_grad()
    def step(self, model, tokens: Tensor) -> Tensor:
        """One decode step: feed ``tokens`` [rows] (each row's last token); returns logits [rows, vocab]."""
        cache = full_cache(self.kv)
        mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=self.positions[:, None],
                    cache=cache, use_cache=True)
        self.kv = cache_tensors(out.cache)
        self.mask, self.positions = mask, self.positions + 1
        return out.logits[:, -1, :]


def sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Next token of one row: greedy when ``temperature == 0``, else nucleus sampling.

    Computed in float64 with the logits shifted by their maximum, so any positive temperature,
    however small (1e-300 is 0 in float32), gives finite probabilities: the limit is greedy.
    Raises ValueError when the logits hold NaN or +inf (e.g. from an adapter with NaN factors).
    Sampled on the CPU (the row's generator is a CPU one), so a seed draws the same random numbers on any device."""
    logits = logits.detach().to("cpu", torch.float64)
    if bool(torch.isnan(logits).any()) or not bool(torch.isfinite(logits.max())):
        raise ValueError("the model produced non-finite logits (NaN or inf)")
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(0) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))
