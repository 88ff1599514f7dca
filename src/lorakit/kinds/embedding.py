"""``nn.Embedding`` (and scaled embeddings such as Gemma's): A's columns looked up, then B."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LoraError
from .base import Kind, register_kind

__all__ = ["embed_scaled"]


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
    row_gather = "lookup"
    dora = True

    def check_base(self, base, path):
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
        # PEFT's convention for embeddings: A = 0, B random (the lookup of a zero A keeps ΔW = 0);
        # "random" (PEFT's init_lora_weights=False): both N(0, 1), as PEFT creates them.
        if init == "random":
            nn.init.normal_(a)
        else:
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


register_kind(nn.Embedding, _Embedding())
