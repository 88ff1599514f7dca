"""``nn.MultiheadAttention`` as a layer kind, in PEFT's layout (one registered kind, nothing else).

Targeting an ``nn.MultiheadAttention`` at ``attn`` adapts two weights, as PEFT does: its
``in_proj_weight`` (3E × E: A (r, E), B (3E, r), keys ``attn.lora_A.weight``) and its
``out_proj.weight`` (E × E: A (r, E), B (E, r), keys ``attn.base_layer.out_proj.lora_A.weight``),
both with the rank and alpha of ``attn``. ``out_proj`` is a part of the attention: the attention's
forward reads its weight and never calls it, so it cannot be targeted alone (an adapter there would
have no effect) and is not selected by ``"all-linear"``. Only ``_qkv_same_embed_dim`` modules (the
default: kdim = vdim = embed_dim) have an ``in_proj_weight``; others are refused, as in PEFT.

The unmerged forward runs the attention with W + ΣΔW swapped in for both weights (PEFT merges and
unmerges around the call; the values are the same, the module is never modified). Merge and unmerge
are the common path of each weight. In a mixed-adapter batch each adapter group runs the attention
on its own rows (query, key, value, key_padding_mask and a per-row attn_mask split along the batch).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..config import LoraError
from .base import Kind, register_kind
from .linear import LinearKind

__all__ = ["MultiheadAttentionKind"]

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


class _OutProj(LinearKind):
    """``out_proj`` of an adapted ``nn.MultiheadAttention``: a Linear's factors, adapted with it."""

    name = "mha_out_proj"
    selected_by = None  # comes with its attention; PEFT: attn.base_layer.out_proj.lora_A.weight
    all_linear = False
    supports_dropout = False
    dora = False  # as its attention (PEFT does not define DoRA for nn.MultiheadAttention)
    lora_bias = False  # as its attention


class MultiheadAttentionKind(Kind):
    """LoRA on ``in_proj_weight`` (this layer) and ``out_proj.weight`` (its part), PEFT's layout."""

    name = "multihead_attention"
    param = "in_proj_weight"
    parts = {"out_proj": _OutProj()}

    def check_base(self, base, path):
        if not base._qkv_same_embed_dim:
            raise LoraError(f"{path}: nn.MultiheadAttention with kdim/vdim != embed_dim has separate q/k/v "
                            "weights and no in_proj_weight; lorakit (like PEFT) adapts only the packed in_proj")
        out_proj = getattr(base.out_proj, "base_layer", base.out_proj)  # adapted already: its wrapper
        if not isinstance(out_proj, nn.Linear):
            raise LoraError(f"{path}: out_proj is a {type(out_proj).__name__}, not an nn.Linear")

    def _weights(self, layer, names) -> dict[str, Tensor]:
        """W + ΣΔW of ``names`` for in_proj_weight and out_proj.weight, keyed for functional_call."""
        out = layer.base_layer.out_proj  # the part's LoraLayer
        w_in, w_out = layer.weight, out.weight
        return {"in_proj_weight": w_in + sum(layer.delta(n, w_in.dtype) for n in names),
                "out_proj.base_layer.weight": w_out + sum(out.delta(n, w_out.dtype) for n in names)}

    def forward(self, layer, names, query, *args, **kwargs):
        return functional_call(layer.base_layer, self._weights(layer, names), (query, *args), kwargs)

    def batch_dim(self, base: nn.Module, x: Tensor) -> int | None:
        if x.dim() != 3:
            return None  # unbatched (L, E): no rows to route
        return 0 if base.batch_first else 1

    def forward_groups(self, layer, names, query, *args, **kwargs):
        """Each adapter group's rows through :meth:`forward`; outputs put back in row order."""
        mha = layer.base_layer
        call = _SIGNATURE.bind(mha, query, *args, **kwargs)
        call.apply_defaults()
        a = dict(call.arguments)
        dim = self.batch_dim(mha, query)
        heads = mha.num_heads
        mask = a["attn_mask"]
        per_row_mask = mask is not None and mask.dim() == 3  # (N·heads, L, S); (L, S) is shared
        out = weights = None
        for name in dict.fromkeys(names):
            idx = torch.tensor([i for i, n in enumerate(names) if n == name], device=query.device)
            rows = dict(a, query=a["query"].index_select(dim, idx), key=a["key"].index_select(dim, idx),
                        value=a["value"].index_select(dim, idx))
            if a["key_padding_mask"] is not None:
                rows["key_padding_mask"] = a["key_padding_mask"].index_select(0, idx)
            if per_row_mask:
                rows["attn_mask"] = mask.view(-1, heads, *mask.shape[1:]).index_select(0, idx).flatten(0, 1)
            del rows["self"]
            o, w = self.forward(layer, (name,) if name else (), **rows)
            if out is None:
                out = o.new_empty(o.shape[:dim] + (len(names),) + o.shape[dim + 1:])
                weights = None if w is None else w.new_empty((len(names), *w.shape[1:]))
            out.index_copy_(dim, idx, o)
            if weights is not None:
                weights.index_copy_(0, idx, w)
        return out, weights


register_kind(nn.MultiheadAttention, MultiheadAttentionKind())
