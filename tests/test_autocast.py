"""Autocast (CPU bf16 and fp16; CUDA runs the same code) in every layer path, against float64.

Oracle: PyTorch's own base op (nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv2d) on a float64
copy of the layer with the effective weight W + Σ s·ΔW, ΔW = B·A reshaped (transposed for Conv1D
and Embedding) — computed here from the parameter values, never through lorakit — and float64
autograd through that formula for the gradients of x, A and B.

Tolerance, per element: |got − ref| ≤ 8·u·M. u is the unit roundoff of the autocast dtype (bf16
2⁻⁸, fp16 2⁻¹¹); M is the same oracle evaluated on absolute values (|x|, |W|, |bias|, |A|, |B| and
the upstream |g|), i.e. the sum of the magnitudes of every product that makes up the element. That
is the textbook bound for a sum of products whose operands are rounded to the low-precision dtype:
any path here rounds at most 6 times relative to its terms (the operands x, A, B or x, W, the thin
product h, the output and the update's addition), fp32 accumulation adds ~d·2⁻²⁴ ≪ u, and 8 leaves
margin. Each test also checks that dropping the LoRA update would break that bound (not vacuous).
"""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.train import TrainConfig, fit

U = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
C = 8
ALPHA = 4.0

# name -> (base layer, input maker, config key ("targets" or "target_parameters"), target)
KINDS = {
    "linear": (lambda: nn.Linear(16, 12), lambda g: torch.randn(4, 5, 16, generator=g), "targets", "0"),
    "conv1d_hf": (lambda: Conv1D(12, 16), lambda g: torch.randn(4, 5, 16, generator=g), "targets", "0"),
    "embedding": (lambda: nn.Embedding(20, 12), lambda g: torch.randint(0, 20, (4, 5), generator=g),
                  "targets", "0"),
    "conv": (lambda: nn.Conv2d(4, 6, 3, padding=1), lambda g: torch.randn(4, 4, 6, 6, generator=g),
             "targets", "0"),
    "conv_grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2), lambda g: torch.randn(4, 4, 6, 6, generator=g),
                     "targets", "0"),
    "param": (lambda: nn.Linear(16, 12), lambda g: torch.randn(4, 5, 16, generator=g),
              "target_parameters", "0.weight"),
}


def _model(kind: str, n_adapters: int, seed: int = 0):
    """nn.Sequential(base) with adapters a0, a1, ... (rank 2, 3, ...), all active, random factors."""
    make, make_x, key, target = KINDS[kind]
    torch.manual_seed(seed)
    model = nn.Sequential(make())
    names = [f"a{i}" for i in range(n_adapters)]
    for i, name in enumerate(names):
        lorakit.inject(model, lorakit.LoraConfig(r=2 + i, alpha=ALPHA, **{key: [target]}), adapter=name)
    lorakit.set_active(model, names)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model, make_x(g), names


def _oracle(layer, names, x, g, absolute=False):
    """Float64 output and gradients {x, (name, A), (name, B)} of the base op on W + Σ s·ΔW."""
    f = (lambda t: t.detach().double().abs()) if absolute else (lambda t: t.detach().double())
    base = copy.deepcopy(layer.base_layer).double()
    params = {n: f(p) for n, p in layer.base_layer.named_parameters()}
    wname = layer.param_name
    w = params[wname]
    transposed = isinstance(layer.base_layer, (nn.Embedding, Conv1D))
    factors = {}
    for n in names:
        a, b = f(layer.lora_A[n]).requires_grad_(), f(layer.lora_B[n]).requires_grad_()
        factors[n] = (a, b)
        d = (ALPHA / a.shape[0]) * (b.flatten(1) @ a.flatten(1))
        w = w + (d.t() if transposed else d).reshape(w.shape)
    xd = x.double().abs() if absolute and x.is_floating_point() else x.double() if x.is_floating_point() else x
    if xd.is_floating_point():
        xd.requires_grad_()
    y = functional_call(base, {**params, wname: w}, (xd,))
    if y.requires_grad:
        y.backward(g.abs() if absolute else g)
    grads = {"x": xd.grad} if xd.is_floating_point() else {}
    for n, (a, b) in factors.items():
        grads[n, "A"], grads[n, "B"] = a.grad, b.grad
    return y.detach(), grads


def _check(what, got, ref, bound, u):
    err = (got.detach().double() - ref).abs()
    ratio = (err / (u * bound).clamp_min(1e-300)).max().item()
    assert (err <= C * u * bound).all(), f"{what}: error up to {ratio:.2f}·u·M > {C}·u·M"


def _run(model, x, dtype, grad):
    """Forward (and backward of Σ y·g) under CPU autocast; returns y, x's input copy, g."""
    xin = x.clone().requires_grad_(grad) if x.is_floating_point() else x
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=dtype):
        y = model(xin)
    return y, xin


def _compare(model, x, names_per_row, dtype, grad, y, xin, g):
    """Check y and the gradients against the oracle, grouping rows by adapter."""
    layer = model[0]
    u = U[dtype]
    ref, bound, lora_free = torch.empty_like(y, dtype=torch.float64), torch.empty_like(y, dtype=torch.float64), \
        torch.empty_like(y, dtype=torch.float64)
    grads, bounds = {}, {}
    for names in dict.fromkeys(names_per_row):
        rows = torch.tensor([i for i, n in enumerate(names_per_row) if n == names])
        r_ref, r_grads = _oracle(layer, names, x[rows], g[rows])
        r_bound, r_bounds = _oracle(layer, names, x[rows], g[rows], absolute=True)
        ref[rows], bound[rows] = r_ref, r_bound
        lora_free[rows] = _oracle(layer, (), x[rows], g[rows])[0]
        for k, v in r_grads.items():
            if k == "x":
                grads.setdefault("x", torch.zeros_like(x, dtype=torch.float64))[rows] = v
                bounds.setdefault("x", torch.zeros_like(x, dtype=torch.float64))[rows] = r_bounds[k]
            else:
                grads[k], bounds[k] = v, r_bounds[k]
    _check("output", y, ref, bound, u)
    assert ((y.double() - lora_free).abs() > C * u * bound).any(), "the LoRA update is below the tolerance"
    if not grad:
        return
    if "x" in grads:
        _check("grad x", xin.grad, grads["x"], bounds["x"], u)
    for key, v in grads.items():
        if key == "x":
            continue
        n, which = key
        got = (layer.lora_A if which == "A" else layer.lora_B)[n].grad
        _check(f"grad {which} of {n}", got, v, bounds[n, which], u)


@pytest.mark.parametrize("dtype", list(U), ids=["bf16", "fp16"])
@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
@pytest.mark.parametrize("kind,n_adapters", [(k, 1) for k in KINDS] + [("linear", 2), ("conv1d_hf", 2)])
def test_autocast_matches_float64(kind, n_adapters, grad, dtype):
    """Every kind, fused (1 adapter, grad) and unfused (no grad, or 2 adapters) paths."""
    model, x, names = _model(kind, n_adapters)
    y, xin = _run(model, x, dtype, grad)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):  # the dtype plain PyTorch gives the base op
        assert y.dtype == model[0].base_layer(x).dtype
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    if grad:
        (y.double() * g).sum().backward()
    _compare(model, x, [tuple(names)] * x.shape[0], dtype, grad, y, xin, g)


@pytest.mark.parametrize("dtype", list(U), ids=["bf16", "fp16"])
@pytest.mark.parametrize("grad", [True, False], ids=["per_group", "bmm"])
@pytest.mark.parametrize("kind", ["linear", "conv1d_hf", "embedding", "conv", "param"])
def test_mixed_batch_under_autocast_matches_each_row_alone(kind, grad, dtype):
    """lorakit.mixed: the gathered-bmm plan (no grad; per-group for conv/param) and the per-group plan."""
    model, x, names = _model(kind, 2)
    routing = ["a0", "a1", None, "a0"]
    with lorakit.mixed(model, routing):
        y, xin = _run(model, x, dtype, grad)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        if grad:
            (y.double() * g).sum().backward()
    _compare(model, x, [(n,) if n else () for n in routing], dtype, grad, y, xin, g)


def test_train_loop_bf16_option_trains_a_tiny_model():
    """`lorakit train --bf16` sets TrainConfig(bf16=True): autocast around forward + loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["0", "2"]))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(12, generator=g), i % 3) for i in range(60)]
    collate = lambda items: (torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]))  # noqa: E731
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]).float(), b[1])  # noqa: E731
    base = {n: p.clone() for n, p in model.state_dict().items() if "lora_" not in n}
    before = loss_fn(model, collate(data)).item()
    fit(model, data, collate=collate, loss_fn=loss_fn, cfg=TrainConfig(epochs=10, batch_size=10, lr=3e-2, bf16=True),
        progress=False)
    after = loss_fn(model, collate(data)).item()
    assert after < 0.8 * before, (before, after)
    assert all(torch.equal(base[n], p) for n, p in model.state_dict().items() if n in base)
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in model.parameters())
