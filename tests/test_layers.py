"""Every layer kind against an independent float64 oracle, across shapes, ranks and dtypes.

The oracle never calls lorakit: it is the textbook ``W x + s·B A x`` (Linear, Conv1D, Embedding) or
the base op applied to ``W + s·reshape(B A)`` (convolutions, raw parameters), computed in float64
from the same factor values.

Tolerances (relative to the output's max magnitude): fp32 1e-5, fp16 4e-3, bf16 3e-2.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorakit

TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
dtypes = st.sampled_from(list(TOL))
SETTINGS = settings(max_examples=25, deadline=None)


class Custom(nn.Module):
    """A module with a raw weight of its own (the 'any parameter' kind)."""

    def __init__(self, out, inp):
        super().__init__()
        self.w = nn.Parameter(torch.randn(out, inp) / math.sqrt(inp))

    def forward(self, x):
        return x @ self.w.t()


def _randomise(model, seed, std=0.5):
    """Give every factor non-zero values (N(0, std²), seeded), so the update is not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _factors(model, adapter, path):
    layer = dict(lorakit.lora_layers(model))[path]
    return (layer.lora_A[adapter].detach().double(), layer.lora_B[adapter].detach().double(),
            layer.scale[adapter])


def _close(out, ref, dtype):
    err = (out.double() - ref).abs().max().item()
    bound = TOL[dtype] * max(ref.abs().max().item(), 1.0)
    assert err <= bound, f"max error {err:.3g} > {bound:.3g} ({dtype})"


def _make(base, dtype, cfg_kw, n_adapters, seed):
    torch.manual_seed(seed)
    base = base.to(dtype)
    original = {k: v.clone().double() for k, v in base.state_dict().items()}
    names = [f"a{i}" for i in range(n_adapters)]
    for i, name in enumerate(names):
        lorakit.inject(base, lorakit.LoraConfig(**{**cfg_kw, "r": cfg_kw.get("r", 2) + i}), adapter=name)
    lorakit.set_active(base, names)
    _randomise(base, seed)
    return base, original, names


@SETTINGS
@given(d_in=st.integers(1, 24), d_out=st.integers(1, 24), r=st.integers(1, 6), bias=st.booleans(),
       dtype=dtypes, n_adapters=st.integers(1, 2), rslora=st.booleans(), seed=st.integers(0, 999))
def test_linear_matches_textbook(d_in, d_out, r, bias, dtype, n_adapters, rslora, seed):
    model, w, names = _make(nn.Sequential(nn.Linear(d_in, d_out, bias=bias)), dtype,
                            dict(r=r, alpha=3.0, targets=["0"], use_rslora=rslora), n_adapters, seed)
    x = torch.randn(3, 5, d_in, dtype=dtype)
    ref = x.double() @ w["0.weight"].t() + (w["0.bias"] if bias else 0)
    for i, n in enumerate(names):
        a, b, s = _factors(model, n, "0")
        assert s == pytest.approx(3.0 / (math.sqrt(r + i) if rslora else r + i))
        ref = ref + s * (x.double() @ a.t()) @ b.t()
    _close(model(x), ref, dtype)


@SETTINGS
@given(d_in=st.integers(1, 16), d_out=st.integers(1, 16), r=st.integers(1, 4), dtype=dtypes,
       seed=st.integers(0, 999))
def test_hf_conv1d_matches_textbook(d_in, d_out, r, dtype, seed):
    from transformers.pytorch_utils import Conv1D
    model, w, names = _make(nn.Sequential(Conv1D(d_out, d_in)), dtype, dict(r=r, targets=["0"]), 1, seed)
    x = torch.randn(2, 3, d_in, dtype=dtype)
    a, b, s = _factors(model, "a0", "0")
    assert a.shape == (r, d_in) and b.shape == (d_out, r)  # PEFT's layout (fan_in_fan_out)
    ref = x.double() @ w["0.weight"] + w["0.bias"] + s * (x.double() @ a.t()) @ b.t()
    _close(model(x), ref, dtype)


@SETTINGS
@given(num=st.integers(2, 30), dim=st.integers(1, 16), r=st.integers(1, 4), dtype=dtypes,
       padding_idx=st.one_of(st.none(), st.just(0)), n_adapters=st.integers(1, 2), seed=st.integers(0, 999))
def test_embedding_matches_textbook(num, dim, r, dtype, padding_idx, n_adapters, seed):
    model, w, names = _make(nn.Sequential(nn.Embedding(num, dim, padding_idx=padding_idx)), dtype,
                            dict(r=r, targets=["0"]), n_adapters, seed)
    idx = torch.randint(0, num, (3, 7))
    ref = w["0.weight"][idx]
    for n in names:
        a, b, s = _factors(model, n, "0")
        assert a.shape[1] == num and b.shape[0] == dim  # PEFT: A (r, num), B (dim, r)
        ref = ref + s * a.t()[idx] @ b.t()
    _close(model(idx), ref, dtype)


CONV = {1: (nn.Conv1d, F.conv1d), 2: (nn.Conv2d, F.conv2d), 3: (nn.Conv3d, F.conv3d)}


@SETTINGS
@given(nd=st.integers(1, 3), groups=st.sampled_from([1, 1, 2, 3]), c_mult=st.integers(1, 3),
       k=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2),
       r=st.integers(1, 4), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       padding_mode=st.sampled_from(["zeros", "zeros", "circular"]), seed=st.integers(0, 999))
def test_conv_matches_merged_oracle(nd, groups, c_mult, k, stride, padding, dilation, r, dtype,
                                    padding_mode, seed):
    cls, conv = CONV[nd]
    c_in, c_out = groups * c_mult, groups * 2
    base = cls(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
               padding_mode=padding_mode)
    model, w, names = _make(nn.Sequential(base), dtype, dict(r=r, targets=["0"]), 1, seed)
    size = (dilation * (k - 1) + 1) + 2 + (nd < 3) * 3
    x = torch.randn(2, c_in, *([size] * nd), dtype=dtype)
    a, b, s = _factors(model, "a0", "0")
    weight = w["0.weight"] + s * (b.flatten(1) @ a.flatten(1)).reshape(w["0.weight"].shape)
    xd = x.double()
    if padding_mode == "circular":
        xd, pad = F.pad(xd, [padding] * (2 * nd), mode="circular"), 0
    else:
        pad = padding
    ref = conv(xd, weight, w["0.bias"], stride, pad, dilation, groups)
    _close(model(x), ref, dtype)


@SETTINGS
@given(out=st.integers(1, 12), inp=st.integers(1, 12), r=st.integers(1, 4), dtype=dtypes,
       seed=st.integers(0, 999))
def test_raw_parameter_matches_oracle(out, inp, r, dtype, seed):
    model, w, names = _make(nn.Sequential(Custom(out, inp)), dtype, dict(r=r, target_parameters=["0.w"]), 1, seed)
    x = torch.randn(4, inp, dtype=dtype)
    a, b, s = _factors(model, "a0", "0")
    ref = x.double() @ (w["0.w"] + s * b @ a).t()
    _close(model(x), ref, dtype)


def test_default_init_is_identity_and_kaiming():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Embedding(10, 8))
    x = torch.randn(5, 64)
    ref = model[0](x)
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets=[nn.Linear, nn.Embedding]))
    assert torch.equal(model[0](x), ref)  # B = 0 (Linear) / A = 0 (Embedding, PEFT's convention)
    layer = model[0]
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=√5) on fan_in 64
    assert layer.lora_A["default"].abs().max() <= bound and layer.lora_A["default"].std() > bound / 3
    assert torch.count_nonzero(layer.lora_B["default"]) == 0


@pytest.mark.parametrize("init,std", [("gaussian", 1 / 8), ("normal", 1.0)])
def test_other_inits(init, std):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 300))
    lorakit.inject(model, lorakit.LoraConfig(r=8, targets=["0"], init=init))
    a = model[0].lora_A["default"]
    assert a.std().item() == pytest.approx(std, rel=0.05)


def test_dropout_is_applied_to_adapter_input_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets=["0"], dropout=0.5))
    _randomise(model, 0)
    x = torch.randn(1000, 16)
    model.eval()
    a, b, s = _factors(model, "default", "0")
    w = model[0].base_layer.weight.double()
    full = x.double() @ w.t() + model[0].base_layer.bias.double() + s * (x.double() @ a.t()) @ b.t()
    _close(model(x), full, torch.float32)  # eval: no dropout
    model.train()
    y = model(x)
    assert not torch.allclose(y.double(), full, atol=1e-3)
    # E[dropout(x)] = x, so the mean over many draws approaches the eval output
    mean = torch.stack([model(x[:10]) for _ in range(2000)]).mean(0)
    assert (mean.double() - full[:10]).abs().max() < 0.15 * full[:10].abs().max()


def test_gradients_flow_to_factors_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Conv1d(8, 8, 3), nn.Embedding(5, 8))
    cfg = lorakit.LoraConfig(r=2, targets=["0", "1", "2"])
    lorakit.inject(model, cfg)
    _randomise(model, 1)
    y = model[1](model[0](torch.randn(2, 5, 8)).transpose(1, 2)).sum() + model[2](torch.tensor([1, 2])).sum()
    y.backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


@SETTINGS
@given(d_in=st.integers(1, 24), d_out=st.integers(1, 24), r=st.integers(1, 6), hf=st.booleans(),
       dropout=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 999))
def test_linear_gradients_match_float64_autograd(d_in, d_out, r, hf, dropout, seed):
    """The in-place (addmm_) training path gives the textbook gradients for x, A and B."""
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(seed)
    model = nn.Sequential(Conv1D(d_out, d_in) if hf else nn.Linear(d_in, d_out))
    w0, b0 = (p.detach().double().clone() for p in (model[0].weight, model[0].bias))
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=2.0, targets=["0"], dropout=dropout))
    _randomise(model, seed)
    layer = model[0]
    a, b, s = layer.lora_A["default"], layer.lora_B["default"], layer.scale["default"]
    x = torch.randn(3, 4, d_in, requires_grad=True)
    g = torch.randn(3, 4, d_out)
    state = torch.get_rng_state()
    (model(x) * g).sum().backward()
    # oracle in float64, with the same dropout mask (same RNG state, same draw)
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    torch.set_rng_state(state)
    xd = torch.nn.functional.dropout(x.detach(), dropout, True).double() / x.detach().double() \
        if dropout else torch.ones_like(x64)
    xd = torch.nan_to_num(xd, nan=1.0 / (1 - dropout) if dropout else 1.0) * x64
    base = x64 @ (w0 if hf else w0.t()) + b0
    ((base + s * (xd @ a64.t()) @ b64.t()) * g.double()).sum().backward()
    for got, want in ((x.grad, x64.grad), (a.grad, a64.grad), (b.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    assert model[0].base_layer.weight.grad is None
