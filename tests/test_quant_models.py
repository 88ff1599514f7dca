"""QLoRA on real models (slow): SmolLM2 trained on an NF4 base, its adapter in PEFT on the same
base, merged to full precision; MiniLM loaded by transformers with BitsAndBytesConfig (4 and 8 bits)."""

import copy

import pytest
import torch

import lorakit
from lorakit import quant
from lorakit.train.loop import TrainConfig

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.slow


EPS32 = torch.finfo(torch.float32).eps


def _close(a, b, tol):
    scale = max(b.abs().max().item(), 1.0)
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol * scale, (err, scale)


def _layer_inputs(model, ids) -> dict[str, torch.Tensor]:
    """The input of each of ``model``'s LoRA layers and its ``classifier`` in a forward on ``ids``."""
    seen, hooks = {}, []
    for path, module in [*lorakit.lora_layers(model), ("classifier", model.classifier)]:
        hooks.append(module.register_forward_pre_hook(
            lambda _, args, path=path: seen.__setitem__(path, args[0].detach().clone())))
    with torch.no_grad():
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return seen


def _check_quantized_layer(path, x, lk_layer, peft_layer):
    """lorakit's and PEFT's outputs of one quantized LoRA layer on the same input ``x`` against the float64
    oracle base(x) + s·(x·Aᵀ)·Bᵀ: base(x) is the layer's own bitsandbytes kernel (the same call in both
    libraries, so the same values), the update is computed in float64 from the factors. Allowed: 4x the error
    of a plain fp32 computation of the same sum (ΔW = s·B·A in fp32, base(x) + x·ΔWᵀ), which is what fp32
    rounding costs here, plus eps_fp32 x the largest output (one rounding of the sum). Measured over seeds
    0-5, int8 and nf4: both libraries at most 1.53x the plain error, 0.33 of the bound; a scaling off by 1%
    would exceed it at least 170x on every layer."""
    a, b, s = lk_layer.lora_A["default"], lk_layer.lora_B["default"], lk_layer.scale["default"]
    assert torch.equal(peft_layer.lora_A["default"].weight, a) and torch.equal(peft_layer.lora_B["default"].weight, b)
    assert peft_layer.scaling["default"] == s, path
    with torch.no_grad():
        base = lk_layer.base_layer(x)
        want = base.double() + s * (x.double() @ a.double().t()) @ b.double().t()
        plain = base + x @ (s * (b @ a)).t()
        bound = 4 * (plain.double() - want).abs().max().item() + EPS32 * want.abs().max().item()
        for who, y in (("lorakit", lk_layer(x)), ("PEFT", peft_layer(x))):
            err = (y.double() - want).abs().max().item()
            assert err <= bound, f"{path}: {who} {err:.3g} from float64 > {bound:.3g}"


def test_smollm2_trains_on_nf4_peft_loads_the_adapter_and_it_merges_to_full_precision(tmp_path):
    from lorakit.train.tasks import LoraSpec, causal_lm, load_model
    result = causal_lm(tmp_path, lora=LoraSpec(("all-linear",), r=8), quantize="nf4",
                       train=TrainConfig(epochs=1, batch_size=4, lr=1e-3, max_steps=4), train_limit=16,
                       eval_limit=4, progress=False, log=lambda *_: None)
    assert result["trainable_params"] == 4_884_480 // 2  # r=8 on the 30 layers' 7 linears, as in fp32
    ids = torch.tensor([[1, 504, 3458, 314, 260, 3284, 30, 2]])
    base, _ = load_model("builtin:smollm2", "causal-lm", quantize="nf4")  # the same quantized base again
    base.eval()
    assert len(quant.quantized_paths(base)) == 30 * 7 and type(base.lm_head) is torch.nn.Linear
    lk = lorakit.load(copy.deepcopy(base), tmp_path / "adapter")
    base.is_loaded_in_4bit = True  # as transformers marks it: PEFT then uses its bitsandbytes LoRA layers
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    assert "bnb" in type(pm.base_model.model.model.layers[0].self_attn.q_proj).__module__
    with torch.no_grad():
        got, expected = lk(ids).logits, pm(ids).logits
        _close(got, expected, 1e-5)
        plain = lorakit.merge_and_unload(lk, dequantize=True)
        assert quant.quantized_paths(plain) == {} and plain.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
        _close(plain(ids).logits, got, 1e-4)  # W_deq + ΔW rounded once vs quantized base + unmerged update


@pytest.mark.parametrize("bits", ["nf4", "int8"])
def test_minilm_loaded_with_bitsandbytes_config_takes_inject_and_peft_files(bits, tmp_path):
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    from lorakit.builtin import minilm_path
    qc = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                             bnb_4bit_use_double_quant=True, llm_int8_skip_modules=["classifier"])
          if bits == "nf4" else BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["classifier"]))
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=5, quantization_config=qc,
                                                              device_map="cpu").eval()
    assert set(quant.quantized_paths(base).values()) == {bits}
    ids = torch.randint(1000, 2000, (2, 12))
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=8, targets="all-linear",
                                                                     modules_to_save=["classifier"]))
    assert {layer.kind.name for _, layer in lorakit.lora_layers(model)} == {"linear8bit" if bits == "int8" else "linear4bit"}
    model.train()
    model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)
    assert all(p.grad is None for n, p in model.named_parameters() if "base_layer" in n)
    with torch.no_grad():
        for p in trained:
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    lorakit.save(model, tmp_path / "lk")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lk")).eval()
    # PEFT computes what lorakit computes, layer by layer, each on the input it has in lorakit's forward. Not the
    # two models' logits: a quantized layer rounds its input (nf4: to bf16; int8: to fp16, then each row to int8
    # steps of its absmax/127, columns over a threshold kept apart), so the libraries' 1e-7 differences in the
    # order of fp32 sums become whole rounding steps in the next layer, and the logits differ by up to 1e-2
    # (int8, measured over seeds 0-7: 6 of 8 above 4e-3; seed 0 gave 7e-8) with every layer agreeing.
    peft_layers = {name[len("base_model.model."):]: m for name, m in pm.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    inputs = _layer_inputs(model, ids)
    assert set(peft_layers) == {p for p, _ in lorakit.lora_layers(model)} and len(peft_layers) == 37
    for path, layer in lorakit.lora_layers(model):
        _check_quantized_layer(path, inputs[path], layer, peft_layers[path])
    with torch.no_grad():  # the classifier (modules_to_save): the same trained copy in both
        x = inputs["classifier"]
        assert torch.equal(pm.base_model.model.classifier(x), model.classifier(x))
    pm.save_pretrained(tmp_path / "peft")
    back = lorakit.load(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():  # PEFT's file of the adapter gives lorakit's model back: the same factors, the same logits
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)
