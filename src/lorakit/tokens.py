"""Trainable tokens (PEFT's ``trainable_token_indices``): new values for a few rows of an embedding.

A :class:`TokenLayer` wraps an ``nn.Embedding`` (or an output head ``nn.Linear``, whose rows are the
tokens' output vectors) and holds, per adapter, the values of the listed rows (``trainable_tokens_delta``,
PEFT's name, shape ``(len(indices), dim)``, initialised to the rows' current values). Forward uses W
with those rows replaced (W.index_copy), so only they train; merging writes them into W, unmerging
puts the original rows back bit for bit. A head whose weight is tied to the input embedding gets a
*tied* TokenLayer that reads the embedding's layer's values, so both stay one weight (as PEFT does).
Adapters active together on one layer must list disjoint rows (PEFT's rule).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import routing
from .config import LoraError
from .kinds import embed_scaled

__all__ = ["TokenLayer"]


class TokenLayer(nn.Module):
    """An embedding (or output head) with trainable rows per adapter (PEFT's TrainableTokens).

    Attributes:
        base_layer: the wrapped ``nn.Embedding`` / ``nn.Linear``.
        trainable_tokens_delta: the rows' values per adapter name (empty on a tied layer).
        token_indices: the rows per adapter name.
        tied: the layer whose values a tied head reads (None for a layer with its own values).
        active, merged: as :class:`lorakit.layers.LoraLayer`.
    """

    def __init__(self, base_layer: nn.Module, tied: "TokenLayer | None" = None) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise LoraError(f"trainable tokens need an nn.Embedding or nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.trainable_tokens_delta = nn.ParameterDict()
        self._token_indices: dict[str, tuple[int, ...]] = {}
        self._tied = [tied] if tied is not None else []  # a list: not registered as a submodule
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()
        self._original: dict[str, Tensor] = {}  # the rows before a merge, per merged adapter

    @property
    def tied(self) -> "TokenLayer | None":
        return self._tied[0] if self._tied else None

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def token_indices(self) -> dict[str, tuple[int, ...]]:
        """The rows per adapter name (a tied head records its owner's)."""
        return self._token_indices

    def values(self, name: str) -> Tensor:
        """The rows' values of adapter ``name`` (the tied layer's for a tied head)."""
        return (self.tied if self.tied is not None else self).trainable_tokens_delta[name]

    # -- adapters -------------------------------------------------------------------------------
    def add(self, name: str, indices: Sequence[int]) -> None:
        """Add adapter ``name`` for rows ``indices``, initialised to their current values (no change)."""
        if self.tied is None:
            idx = torch.tensor(list(indices), dtype=torch.long, device=self.weight.device)
            self.trainable_tokens_delta[name] = nn.Parameter(self.weight.detach()[idx].clone())
        self._token_indices[name] = tuple(int(i) for i in indices)

    def remove(self, name: str) -> None:
        if self.tied is None:
            del self.trainable_tokens_delta[name]
        del self._token_indices[name]
        self.active = tuple(n for n in self.active if n != name)

    def adapters(self) -> list[str]:
        return list(self.token_indices)

    def set_active(self, names: Sequence[str]) -> None:
        self.check_active(names, "this layer")
        self.active = tuple(n for n in names if n in self.token_indices)
        for n, p in self.trainable_tokens_delta.items():
            p.requires_grad_(n in names)

    def check_active(self, names: Sequence[str], path: str) -> None:
        """Raise :class:`LoraError` if adapters ``names`` list overlapping rows here (PEFT refuses it too)."""
        seen: dict[int, str] = {}
        for n in (n for n in names if n in self.token_indices):
            for i in self.token_indices[n]:
                if i in seen:
                    raise LoraError(f"{path}: adapters {seen[i]!r} and {n!r} both train token {i}; adapters with "
                                    "trainable tokens can be active together only on disjoint token indices")
                seen[i] = n

    # -- forward --------------------------------------------------------------------------------
    def replaced(self, names: Sequence[str]) -> Tensor:
        """W with the rows of ``names`` replaced by their values (differentiable in the values)."""
        w = self.weight
        for n in names:
            idx = torch.tensor(self.token_indices[n], dtype=torch.long, device=w.device)
            w = w.index_copy(0, idx, self.values(n).to(w.dtype))
        return w

    def run(self, names: Sequence[str], x: Tensor, *args, **kwargs) -> Tensor:
        """The forward with the rows of ``names`` replaced (the base alone if there are none)."""
        if not names:
            return self.base_layer(x, *args, **kwargs)
        base, w = self.base_layer, self.replaced(names)
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, w, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
            return embed_scaled(base, out)
        return F.linear(x, w, base.bias)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if not torch.compiler.is_compiling():
            current = routing.ROUTING.get()
            if current is not None and id(self) in current.layers:
                return current.forward_tokens(self, x, *args, **kwargs)
        elif routing.MIXED_OPEN:
            raise LoraError("trainable tokens under torch.compile inside an open lorakit.mixed block are not supported")
        if self.merged or not self.active:
            return self.base_layer(x, *args, **kwargs)
        return self.run(self.active, x, *args, **kwargs)

    # -- merge ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: Sequence[str], keep_copy: bool = True) -> None:
        """Write the rows of ``names`` into W (a tied head: only recorded, its owner writes the shared W);
        the original rows are kept, so :meth:`unmerge` is bit-exact (they are small)."""
        names = tuple(n for n in names if n in self.token_indices)
        if self.merged:
            raise LoraError(f"already merged ({', '.join(self.merged)}); unmerge first")
        if self.tied is None:
            w = self.weight
            for n in names:
                idx = torch.tensor(self.token_indices[n], dtype=torch.long, device=w.device)
                self._original[n] = w[idx].clone()
                w.index_copy_(0, idx, self.values(n).to(w.dtype))
        self.merged = names

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.tied is None:
            w = self.weight
            for n in reversed(self.merged):
                idx = torch.tensor(self.token_indices[n], dtype=torch.long, device=w.device)
                w.index_copy_(0, idx, self._original.pop(n))
        self.merged = ()

    def extra_repr(self) -> str:
        tied = ", tied" if self.tied is not None else ""
        return f"tokens={ {n: len(i) for n, i in self.token_indices.items()} }{tied}, active={list(self.active)}"
