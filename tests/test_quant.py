"""LoRA on quantized frozen bases (bitsandbytes NF4/FP4 Linear4bit, int8 Linear8bitLt), on CPU.

Oracles: the float64 formula base(x) + s·(x·Aᵀ)·Bᵀ and W_deq + s·B·A on bitsandbytes' own
dequantized weight; the row run alone for mixed batches; real PEFT 0.21 on the same quantized base.
"""

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit import quant

bnb = pytest.importorskip("bitsandbytes")

FORMATS = ["nf4", "fp4", "int8"]


class Tiny(nn.Module):
    """Three linear layers (dims bitsandbytes accepts) and a head, which quantize skips."""

    def __init__(self, d=64, h=96):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.gate = nn.Linear(d, h, bias=False)
        self.down = nn.Linear(h, d)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x)) * self.gate(x)))


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return Tiny(**kw)


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _, layer in lorakit.lora_layers(model):
        for name in layer.lora_A:
            with torch.no_grad():
                layer.lora_A[name].copy_(torch.randn(layer.lora_A[name].shape, generator=g) * 0.1)
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=g) * 0.1)


def _w64(module):
    """The dequantized weight in float64 (bitsandbytes' dequantization), or a plain weight."""
    return quant.dequantized_weight(module, torch.float64) if quant.format_of(module) else module.weight.double()


def _oracle(model, x, names=None):
    """Float64 forward of Tiny through W_deq + Σ s·B·A (the textbook formula, no lorakit code)."""
    def lin(path, h):
        module = dict(model.named_modules())[path]
        base = module.base_layer if isinstance(module, lorakit.LoraLayer) else module
        w = _w64(base)
        if isinstance(module, lorakit.LoraLayer):
            for n in (module.active if names is None else names):
                w = w + module.scale[n] * module.lora_B[n].double() @ module.lora_A[n].double()
        return nn.functional.linear(h, w, None if base.bias is None else base.bias.double())
    x = x.double()
    return lin("head", lin("down", torch.relu(lin("up", x)) * lin("gate", x)))


def _close(a, b, tol=2e-5):
    scale = max(b.abs().max().item(), 1.0)
    assert (a.double() - b.double()).abs().max().item() <= tol * scale


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_replaces_linears_not_the_head(fmt):
    model = _tiny()
    x = torch.randn(7, 64)
    assert lorakit.quantize(model, fmt) is model
    assert quant.quantized_paths(model) == {"up": fmt, "gate": fmt, "down": fmt}
    assert type(model.head) is nn.Linear  # kept in full precision, as transformers does
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("head"))
    # the quantized layers compute x·W_deqᵀ + b (bitsandbytes' own kernel vs the float64 formula)
    with torch.no_grad():
        _close(model.up(x), nn.functional.linear(x.double(), _w64(model.up), model.up.bias.double()))


@pytest.mark.parametrize("fmt", FORMATS)
def test_lora_on_quantized_base_forward_and_gradients_match_float64(fmt):
    model = lorakit.quantize(_tiny(), fmt)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"))
    assert {p: type(layer.base_layer).__name__ for p, layer in lorakit.lora_layers(model)} == \
        {"up": type(model.up.base_layer).__name__, "gate": type(model.gate.base_layer).__name__,
         "down": type(model.down.base_layer).__name__}
    assert {p for p, _ in lorakit.lora_layers(model)} == {"up", "gate", "down"}
    _randomize(model)
    for layer in (model.up, model.down):
        assert layer.lora_A["default"].dtype == torch.float32 and layer.lora_A["default"].shape[1] == layer.base_layer.in_features
    x = torch.randn(2, 3, 64, requires_grad=True)
    y = model(x)
    x64 = x.detach().double().requires_grad_()
    factors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ref = _oracle(model, x64)
    _close(y, ref)
    g = torch.randn_like(y)
    y.backward(g)
    ref_grads = torch.autograd.grad(ref, [x64, *factors.values()], g.double())
    _close(x.grad, ref_grads[0])
    for (name, p), r in zip(factors.items(), ref_grads[1:]):
        _close(p.grad, r)
    assert all(p.grad is None for n, p in model.named_parameters() if "base_layer" in n)  # frozen base


def test_compute_dtype_bf16_update_added_in_output_dtype():
    model = lorakit.quantize(_tiny(), "nf4", compute_dtype=torch.bfloat16)
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets=["up"]))
    _randomize(model)
    x = torch.randn(5, 64)
    with torch.no_grad():
        base = model.up.base_layer(x)
        a, b, s = model.up.lora_A["default"], model.up.lora_B["default"], model.up.scale["default"]
        expected = base.double() + s * x.double() @ a.double().t() @ b.double().t()
        _close(model.up(x), expected, 1e-5)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_named_adapters_disabled_and_mixed_batches(fmt):
    model = lorakit.quantize(_tiny(), fmt).eval()
    x = torch.randn(4, 6, 64)
    with torch.no_grad():
        plain = model(x)
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets="all-linear"), adapter="a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["up", "down"]), adapter="b")
    _randomize(model)
    with torch.no_grad():
        with lorakit.disabled(model):
            assert torch.equal(model(x), plain)
        alone = {}
        for name in ("a", "b"):
            lorakit.set_active(model, name)
            alone[name] = model(x)
        with lorakit.mixed(model, ["a", "b", None, "a"]):
            mixed = model(x)
    for i, name in enumerate(["a", "b", None, "a"]):
        _close(mixed[i], (alone[name] if name else plain)[i], 1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_in_place_is_refused_and_changes_nothing(fmt):
    model = lorakit.quantize(_tiny(), fmt)
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets="all-linear"))
    _randomize(model)
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(lorakit.LoraError, match=f"quantized \\({fmt}\\).*dequantize=True"):
        lorakit.merge(model)
    assert lorakit.registry(model).merged == ()
    with torch.no_grad():
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_and_unload_dequantize_is_one_rounding_of_w_deq_plus_delta(fmt):
    model = lorakit.quantize(_tiny(), fmt)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets=["up", "down"]))
    _randomize(model)
    expected = {}
    for path, layer in lorakit.lora_layers(model):
        w = _w64(layer.base_layer)
        d = layer.scale["default"] * layer.lora_B["default"].double() @ layer.lora_A["default"].double()
        expected[path] = (w + d).to(torch.float32)
    gate = _w64(model.gate).float()  # quantized, no adapter: dequantized unchanged
    with pytest.raises(lorakit.LoraError, match="quantized"):
        lorakit.merge_and_unload(model)  # without dequantize=True: refused, nothing changed
    assert quant.quantized_paths(model) == {"up": fmt, "gate": fmt, "down": fmt}
    plain = lorakit.merge_and_unload(model, dequantize=True)
    assert type(plain.up) is type(plain.gate) is type(plain.down) is nn.Linear
    assert quant.quantized_paths(plain) == {}
    for path, w in expected.items():
        assert torch.equal(getattr(plain, path).weight, w), path
    assert torch.equal(plain.gate.weight, gate)
    assert set(plain.state_dict()) == set(_tiny().state_dict())


def test_merge_and_unload_dequantize_refused_merge_restores_quantized_layers():
    model = lorakit.quantize(_tiny(), "nf4")
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets=["up"]))
    with torch.no_grad():
        model.up.lora_A["default"][0, 0] = float("nan")
    with pytest.raises(lorakit.LoraError, match="NaN"):
        lorakit.merge_and_unload(model, dequantize=True)
    assert quant.quantized_paths(model) == {"up": "nf4", "gate": "nf4", "down": "nf4"}
    assert model.up.kind is lorakit.kinds.bitsandbytes.LINEAR4BIT


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_merge_requantized_reports_the_error_it_introduced(fmt):
    model = lorakit.quantize(_tiny(), fmt)
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets=["up"]))
    _randomize(model)
    merged = (_w64(model.up.base_layer) + model.up.scale["default"] * model.up.lora_B["default"].double()
              @ model.up.lora_A["default"].double()).float()
    report = lorakit.quant.merge_requantized(model)
    assert quant.format_of(model.up) == fmt and not lorakit.state.has_adapters(model)
    # independent: quantize the float32 merged weight alone and measure
    lin = nn.Linear(64, 96)
    with torch.no_grad():
        lin.weight.copy_(merged)
    requant = lorakit.quantize(nn.Sequential(lin), fmt, skip=[])[0]
    err = (quant.dequantized_weight(requant, torch.float64) - merged.double()).abs().max().item()
    assert report.error["up"] == pytest.approx(err, rel=1e-6) and report.error["up"] > 0
    assert "re-quantized 1 merged layers" in str(report)


def test_quantize_refusals_change_nothing():
    model = _tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def unchanged():
        assert quant.quantized_paths(model) == {} and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    with pytest.raises(lorakit.LoraError, match="unknown quantization 'int4'"):
        lorakit.quantize(model, "int4")
    with pytest.raises(lorakit.LoraError, match="skip entry 'nope'"):
        lorakit.quantize(model, "nf4", skip=["nope"])
    with pytest.raises(lorakit.LoraError, match="blocksize 50"):
        lorakit.quantize(model, "nf4", blocksize=50)
    with pytest.raises(lorakit.LoraError, match="compute_dtype"):
        lorakit.quantize(model, "nf4", compute_dtype=torch.int8)
    model.down.double()  # a float64 weight: bitsandbytes cannot quantize it (checked before anything changes)
    with pytest.raises(lorakit.LoraError, match="down: weight .* torch.float64 cannot be quantized"):
        lorakit.quantize(model, "nf4")
    model.down.float()
    unchanged()
    tied = _tiny()
    tied.gate.weight = tied.up.weight
    with pytest.raises(lorakit.LoraError, match="shared with .*tied"):
        lorakit.quantize(tied, "nf4")
    assert quant.quantized_paths(tied) == {}
    lorakit.quantize(model, "nf4")
    with pytest.raises(lorakit.LoraError, match="already quantized \\(nf4 at up"):
        lorakit.quantize(model, "int8")
    other = _tiny()
    lorakit.inject(other, lorakit.LoraConfig(r=2, targets=["up"]))
    with pytest.raises(lorakit.LoraError, match="before lorakit.inject"):
        lorakit.quantize(other, "nf4")


def test_any_module_and_skip_patterns():
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Sequential(nn.Linear(48, 48), nn.Linear(48, 16)))
    lorakit.quantize(model, "fp4", skip=["2.1"])
    assert quant.quantized_paths(model) == {"0": "fp4", "2.0": "fp4"}
    assert type(model[2][1]) is nn.Linear


# -- PEFT on the same quantized base, both ways ----------------------------------------------------
peft = pytest.importorskip("peft")


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_peft_files_both_ways_on_the_same_quantized_base(fmt, tmp_path):
    base = lorakit.quantize(_tiny(), fmt).eval()
    setattr(base, "is_loaded_in_8bit" if fmt == "int8" else "is_loaded_in_4bit", True)  # what PEFT reads (set by transformers)
    x = torch.randn(3, 4, 64)
    targets = ["up", "gate", "down"]
    # PEFT -> lorakit
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                  init_lora_weights=False)).eval()
    assert type(pm.base_model.model.up).__module__.startswith("peft.tuners.lora.bnb")
    pm.save_pretrained(tmp_path / "peft")
    lk = lorakit.load(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        _close(lk(x), pm(x), 1e-5)
        if fmt != "int8":  # bitsandbytes' int8 inference kernel also quantizes x (rel. error ~1e-2)
            _close(lk(x), _oracle(lk, x))
    # lorakit -> PEFT
    lk2 = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=4, alpha=8, targets=targets))
    _randomize(lk2)
    lorakit.save(lk2, tmp_path / "lk")
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lk")).eval()
    with torch.no_grad():
        _close(pm2(x), lk2(x), 1e-5)


# -- the base precision an adapter was trained on --------------------------------------------------
def test_adapter_refuses_a_base_quantized_otherwise(tmp_path):
    nf4 = lorakit.quantize(_tiny(), "nf4")
    lorakit.inject(nf4, lorakit.LoraConfig(r=4, targets=["up", "down"]))
    _randomize(nf4)
    lorakit.save(nf4, tmp_path / "nf4")
    fp32 = lorakit.inject(_tiny(), lorakit.LoraConfig(r=4, targets=["up", "down"]))
    lorakit.save(fp32, tmp_path / "fp32")
    x = torch.randn(3, 64)
    for other, directory, was, now in ((lorakit.quantize(_tiny(), "fp4"), "nf4", "nf4", "fp4"),
                                       (lorakit.quantize(_tiny(), "int8"), "nf4", "nf4", "int8"),
                                       (_tiny(), "nf4", "nf4", "full precision"),
                                       (lorakit.quantize(_tiny(), "nf4"), "fp32", "full precision", "nf4")):
        with torch.no_grad():
            before = other(x)
        with pytest.raises(lorakit.LoraError, match=f"trained on a base with down in {was}, but this model "
                                                    f"holds it in {now} \\(2 layer"):
            lorakit.load(other, tmp_path / directory)
        assert not lorakit.state.has_adapters(other)
        with torch.no_grad():
            assert torch.equal(other(x), before)
        lorakit.load(other, tmp_path / directory, allow_precision_change=True)  # explicit: applied anyway
    same = lorakit.load(lorakit.quantize(_tiny(), "nf4"), tmp_path / "nf4")
    with torch.no_grad():
        assert torch.equal(same(x), nf4(x))


def test_cli_refuses_full_fine_tuning_of_a_quantized_base(capsys):
    from lorakit.cli import main
    assert main(["train", "--quantize", "nf4", "--full"]) == 2
    err = capsys.readouterr().err
    assert "--full" in err and "quantized" in err and "Traceback" not in err


def test_dequantize_reads_a_layer_that_bitsandbytes_repacked_for_inference():
    """A Linear4bit as transformers builds it repacks its weight on the first inference forward on
    AVX512-BF16 CPUs (absmax in bf16); dequantized_weight must read the repacked layout."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 96, bias=False, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(96, 64) * 0.1, requires_grad=False, quant_type="nf4").to("cpu")
    layer.eval()
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = layer(x)  # may repack (depends on the CPU)
    w = quant.dequantized_weight(layer, torch.float64)
    assert w.shape == (96, 64)
    _close(y, x.double() @ w.t(), 1e-2)  # the repacked kernel computes in bf16
    lorakit.inject(layer_model := nn.Sequential(layer), lorakit.LoraConfig(r=2, targets=["0"]))
    plain = lorakit.merge_and_unload(layer_model, dequantize=True)
    assert torch.equal(plain[0].weight, w.float())  # ΔW = 0 at init: W_deq itself
