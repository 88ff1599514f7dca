"""The fused training path of a LoRA layer on a bitsandbytes base (``lorakit.kinds.bitsandbytes._QuantLoraFn``).

Oracles: the float64 formula y = x·W_degᵀ + b + s·(x·Aᵀ)·Bᵀ and its gradients on bitsandbytes' own
dequantized weight; the bytes a forward + backward may allocate, counted from the shapes."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import lorakit
from lorakit import quant

bnb = pytest.importorskip("bitsandbytes")

CASES = [("nf4", None), ("fp4", None), ("int8", None), ("nf4", torch.bfloat16), ("fp4", torch.bfloat16)]


def _layer(fmt, compute_dtype=None, bias=True, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(128, 192, bias=bias), nn.Linear(192, 4))
    lorakit.quantize(model, fmt, compute_dtype=compute_dtype)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets=["0"]))
    layer = model[0]
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        layer.lora_A["default"].copy_(torch.randn(layer.lora_A["default"].shape, generator=g) * 0.1)
        layer.lora_B["default"].copy_(torch.randn(layer.lora_B["default"].shape, generator=g) * 0.1)
    return layer


def _oracle(layer, x64, round_to=None):
    """Float64 y of the layer; ``round_to``: the base product's operands rounded to that dtype first
    (bitsandbytes' compute dtype)."""
    base = layer.base_layer
    w = quant.dequantized_weight(base, torch.float64)
    xb = x64
    if round_to is not None:
        w, xb = w.to(round_to).double(), x64.to(round_to).double()
    a, b = layer.lora_A["default"].double(), layer.lora_B["default"].double()
    y = xb @ w.t() + (0 if base.bias is None else base.bias.double())
    return y + layer.scale["default"] * (x64 @ a.t()) @ b.t()


def _close(a, b, tol):
    assert (a.double() - b.double()).abs().max().item() <= tol * max(b.abs().max().item(), 1.0)


@pytest.mark.parametrize("fmt,compute", CASES)
def test_fused_forward_and_gradients_match_float64(fmt, compute):
    layer = _layer(fmt, compute).train()
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = layer(x)
    assert y.grad_fn.name() == "_QuantLoraFnBackward"  # the fused path is taken
    x64 = x.detach().double().requires_grad_()
    factors = [layer.lora_A["default"], layer.lora_B["default"]]
    ref = _oracle(layer, x64, compute)
    tol = 2e-5 if compute is None else 1e-2  # bf16 compute: the base product rounds to bf16
    _close(y, ref, tol)
    g = torch.randn_like(y)
    y.backward(g)
    rx, ra, rb = torch.autograd.grad(ref, [x64, *factors], g.double())
    _close(x.grad, rx, tol)
    _close(factors[0].grad, ra, 2e-5)  # the update is computed in fp32 whatever the base's compute dtype
    _close(factors[1].grad, rb, 2e-5)
    assert all(p.grad is None for p in layer.base_layer.parameters())  # the packed weight gets nothing


class _NewBytes(TorchDispatchMode):
    """Counts the bytes of every storage an op allocates: outputs that share no storage with the
    op's inputs (views and in-place results are not new)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        new = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tree_flatten(out)[0]
               if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs}
        self.total += sum(new.values())
        return out


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_fused_step_allocates_only_output_update_and_gradients(fmt):
    """Forward + backward of one adapted quantized layer allocate y, h = x·Aᵀ (forward), and s·g·B,
    W_deq, dx, dA, dB (backward) — nothing output-sized more (autograd over the update added three
    output-sized temporaries and a second dx)."""
    layer = _layer(fmt, bias=False).train()
    tokens, d_in, d_out, r = 512, 128, 192, 4
    x = torch.randn(tokens, d_in, requires_grad=True)
    g = torch.randn(tokens, d_out)
    layer(x).backward(g)  # warm up (bitsandbytes sets up its state on the first call)
    with _NewBytes() as counted:
        layer(x).backward(g)
    # fp32 everywhere: y, h | s·g·B, W_deq, dx, dA, dB (+ int8: bitsandbytes' forward kernel
    # dequantizes W too, with its row scales)
    budget = 4 * (tokens * d_out + tokens * r + tokens * r + d_out * d_in + tokens * d_in + r * d_in + d_out * r)
    if fmt == "int8":
        budget += 4 * (d_out * d_in + d_out)
    assert counted.total <= budget * 1.02 + 4096, (counted.total, budget)


def test_autocast_and_compile_take_the_autograd_path_and_stay_correct():
    layer = _layer("nf4").train()
    x = torch.randn(2, 6, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.grad_fn.name() != "_QuantLoraFnBackward"
    x64 = x.detach().double().requires_grad_()
    _close(y, _oracle(layer, x64, torch.bfloat16), 2e-2)
    y.float().sum().backward()
    ref = torch.autograd.grad(_oracle(layer, x64).sum(), x64)[0]
    _close(x.grad, ref, 2e-2)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager")
    x.grad = None
    yc = compiled(x)
    _close(yc, _oracle(layer, x64), 2e-5)
    yc.sum().backward()
    _close(x.grad, ref, 2e-5)


def test_fused_half_precision_input():
    """bf16 activations (a bf16 model on an NF4 base): the update in the fp32 factors, added in bf16."""
    layer = _layer("nf4", torch.bfloat16).train()
    x = torch.randn(4, 128).bfloat16().requires_grad_()
    y = layer(x)
    assert y.grad_fn.name() == "_QuantLoraFnBackward" and y.dtype == torch.bfloat16
    x64 = x.detach().double().requires_grad_()
    ref = _oracle(layer, x64, torch.bfloat16)
    _close(y, ref, 2e-2)
    g = torch.randn(y.shape).bfloat16()
    y.backward(g)
    rx, ra = torch.autograd.grad(ref, [x64, layer.lora_A["default"]], g.double())
    _close(x.grad, rx, 2e-2)
    _close(layer.lora_A["default"].grad, ra, 1e-2)  # from the bf16 gradient g
