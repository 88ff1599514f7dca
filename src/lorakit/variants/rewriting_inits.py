"""Inits that rewrite the base weight: PiSSA (SVD) and OLoRA (QR), as PEFT does them.

For ``init="pissa"`` the top-r singular triplets of W (as the (out, in) matrix M in which
ΔW = s·B·A lives) move into the factors, A = √(S_r/s)·V_rᵀ and B = U_r·√(S_r/s); for ``"olora"``
M = QR gives B = Q[:, :r], A = R[:r]; ``"pissa_niter_<k>"`` takes U_r, S_r, V_r from a randomized
SVD (:func:`torch.svd_lowrank`, k subspace iterations). W is then replaced by the residual
W − s·B₀·A₀ (computed in float64, rounded once to W's dtype), so the model's output is unchanged
at init, up to that rounding.

The layer keeps the initial factors (A₀, B₀ as non-persistent buffers, and their scale s₀) for
three things: :func:`restore` adds s₀·B₀·A₀ back into W when the adapter is deleted,
:func:`original` gives the original W for ``save_pretrained``, and :func:`converted` turns the trained
adapter into a plain rank-2r LoRA adapter against the
original W (PEFT's ``path_initial_model_for_weight_conversion``): ΔW = s·B·A − s₀·B₀·A₀ =
s·[B | −(s₀/s)·B₀]·[A ; A₀].

Since W itself changes, a rewriting adapter must be the only adapter on its layers
(:func:`lorakit.targets.check_rewriting_inits` refuses either order), and with every adapter off (:func:`lorakit.disabled`)
the model runs the residual weights, as in PEFT: that is not the original model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import LoraError
from ..kinds import AdapterHost

__all__ = ["rewrites", "rewrite", "restore", "rewritten", "original", "converted", "FLOATS"]

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def rewrites(init: str) -> bool:
    """Whether ``init`` takes the factors from W and leaves the residual in W."""
    return init in ("pissa", "olora") or init.startswith("pissa_niter_")


def rewritten(layer: AdapterHost) -> list[str]:
    """The adapters of ``layer`` whose init rewrote its weight."""
    return [n for n in layer.lora_A if f"_init_A_{n}" in layer._buffers]  # (hasattr: an exception per miss)


def _matrix(layer: AdapterHost) -> Tensor:
    """W as the (out, in) matrix M with M + s·B·A the adapted weight (fp32, a new tensor)."""
    w = layer.weight.detach().to(torch.float32)
    return w.t() if layer.kind.transposed else w.clone()


def _initial_delta(layer: AdapterHost, name: str) -> Tensor:
    """s₀·B₀·A₀ in W's layout, float64."""
    a0, b0 = getattr(layer, f"_init_A_{name}"), getattr(layer, f"_init_B_{name}")
    d = (b0.double() @ a0.double()) * layer._init_scale[name]
    return d.t() if layer.kind.transposed else d


@torch.no_grad()
def rewrite(layer: AdapterHost, name: str, init: str) -> None:
    """Set the factors of the just-added adapter ``name`` from W by ``init``, keep a copy of them
    and write the residual W − s·B·A into W (in place, rounded once)."""
    a, b, s, r = layer.lora_A[name], layer.lora_B[name], layer.scale[name], layer.lora_A[name].shape[0]
    m = _matrix(layer)
    if init == "olora":
        q, rr = torch.linalg.qr(m)
        a_new, b_new = rr[:r], q[:, :r]
    else:
        if init == "pissa":
            u, sv, vh = torch.linalg.svd(m, full_matrices=False)
            u, sv, vh = u[:, :r], sv[:r], vh[:r]
        else:
            u, sv, v = torch.svd_lowrank(m, q=r, niter=int(init.rsplit("_", 1)[1]))
            vh = v.t()
        root = (sv / s).sqrt()
        a_new, b_new = root[:, None] * vh, u * root[None, :]
    a.copy_(a_new)
    b.copy_(b_new)
    layer.register_buffer(f"_init_A_{name}", a.detach().clone(), persistent=False)
    layer.register_buffer(f"_init_B_{name}", b.detach().clone(), persistent=False)
    layer.__dict__.setdefault("_init_scale", {})[name] = s
    layer.__dict__.setdefault("_init_kind", {})[name] = init
    w = layer.weight
    w.copy_((w.double() - _initial_delta(layer, name)).to(w.dtype))


@torch.no_grad()
def restore(layer: AdapterHost, name: str) -> None:
    """Undo :func:`rewrite` for adapter ``name`` (being deleted): W ← W + s₀·B₀·A₀, rounded once
    (the original W up to two roundings to W's dtype); no-op for other adapters."""
    if not hasattr(layer, f"_init_A_{name}"):
        return
    w = layer.weight
    w.copy_((w.double() + _initial_delta(layer, name)).to(w.dtype))
    delattr(layer, f"_init_A_{name}")
    delattr(layer, f"_init_B_{name}")
    del layer._init_scale[name], layer._init_kind[name]


@torch.no_grad()
def original(layer: AdapterHost, weight: Tensor) -> Tensor:
    """``weight`` (the layer's residual W, or a copy of it) with the initial parts of its rewriting
    adapters added back: the original W within two roundings (a new tensor; ``weight`` if none)."""
    names = rewritten(layer)
    if not names:
        return weight
    total = weight.double()
    for n in names:
        total += _initial_delta(layer, n)
    return total.to(weight.dtype)


def converted(layer: AdapterHost, name: str) -> tuple[Tensor, Tensor]:
    """``(A', B')`` of rank 2r with s·B'·A' = s·B·A − s₀·B₀·A₀: the trained adapter as a plain
    LoRA update of the original W (the scale s stays the adapter's own)."""
    if not hasattr(layer, f"_init_A_{name}"):
        raise LoraError(f"adapter {name!r} did not rewrite W (its init is not pissa/olora): it already "
                        "applies to the unmodified model; save it without convert_to_lora")
    a, b = layer.lora_A[name].detach(), layer.lora_B[name].detach()
    a0, b0 = getattr(layer, f"_init_A_{name}"), getattr(layer, f"_init_B_{name}")
    ratio = layer._init_scale[name] / layer.scale[name]
    return torch.cat([a, a0.to(a.dtype)], 0), torch.cat([b, (-ratio * b0).to(b.dtype)], 1)
