"""The causal-LM training loss without the whole (tokens × vocabulary) logits in memory.

``model(**batch).loss`` computes fp32 logits for every position (SmolLM2: 4×256 positions × 49k
words = 201 MB), and cross-entropy keeps their log-probabilities for the backward pass (as much
again), plus the gradient of each in the backward pass. :func:`causal_lm_loss` gives the same value
and gradients from the decoder's hidden states: only the positions that have a label are sent
through the head, in chunks of 16 MiB of fp32 logits, each under (non-reentrant) activation
checkpointing, so at most one chunk's logits exist at a time and the backward pass recomputes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..state import unwrap

__all__ = ["causal_lm_loss", "head_is_plain"]

IGNORE = -100


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder, head) of a transformers causal LM."""
    root = unwrap(model)
    return root.get_decoder(), root.get_output_embeddings()


def _chunk_sum(head: nn.Module, hidden: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")  # fp32 as transformers' loss


CHUNK_LOGITS = 2 ** 22  # logits per chunk: 16 MiB in fp32 (85 positions of a 49k vocabulary)


def causal_lm_loss(model: nn.Module, batch: dict, chunk: int | None = None) -> Tensor:
    """Mean next-token cross-entropy over the labelled positions (``labels`` != -100, shifted by one),
    equal to transformers' ``model(**batch).loss``; the head runs on ``chunk`` positions at a time
    (default: as many as make :data:`CHUNK_LOGITS` logits).

    Only for models whose logits are ``head(decoder(...).last_hidden_state)`` (check once with
    :func:`head_is_plain`)."""
    decoder, head = _parts(model)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "use_cache")}
    hidden = decoder(**inputs, use_cache=False).last_hidden_state
    labels = batch["labels"][:, 1:].to(hidden.device)
    keep = labels != IGNORE
    hidden, labels = hidden[:, :-1][keep], labels[keep]  # (labelled positions, d)
    if chunk is None:
        vocab = getattr(getattr(unwrap(model), "config", None), "vocab_size", None)
        chunk = max(1, CHUNK_LOGITS // vocab) if vocab else 256
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, labels.shape[0], chunk):
        part = (head, hidden[i:i + chunk], labels[i:i + chunk])
        total = total + (checkpoint(_chunk_sum, *part, use_reentrant=False) if torch.is_grad_enabled()
                         else _chunk_sum(*part))
    return total / labels.shape[0]  # 0/0 = nan without labels, as transformers' mean


@torch.no_grad()
def head_is_plain(model: nn.Module, batch: dict, tol: float = 1e-4) -> bool:
    """Whether ``model``'s logits on the first row of ``batch`` (up to 16 tokens) are
    ``head(decoder(...).last_hidden_state)`` (False for models that scale or cap their logits,
    and for models without ``get_decoder`` / ``get_output_embeddings``)."""
    try:
        decoder, head = _parts(model)
    except (AttributeError, ValueError):
        return False
    if decoder is None or head is None:
        return False
    inputs = {k: v[:1, :16] for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    # in the model's own mode (an eval forward would let bitsandbytes repack a transformers-loaded
    # 4-bit weight), with the same dropout masks in both forwards
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        full = model(**inputs, use_cache=False).logits.float()
        torch.manual_seed(0)
        ours = head(decoder(**inputs, use_cache=False).last_hidden_state).float()
    return full.shape == ours.shape and bool(torch.allclose(full, ours, rtol=tol, atol=tol * full.abs().max()))
