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


def _close(a, b, tol):
    scale = max(b.abs().max().item(), 1.0)
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol * scale, (err, scale)


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
    # bf16 compute: each layer's input is rounded to bf16, which turns the libraries' 1e-7 differences
    # of summation order into bf16 rounding steps (measured 2-3e-3 of the logits); fp32: 1e-5
    tol = 1e-2 if bits == "nf4" else 1e-5
    with torch.no_grad():
        _close(pm(input_ids=ids).logits, model(input_ids=ids).logits, tol)
        layer = ("bert", "encoder", "layer", 0, "attention", "self", "query")
        lk_q, pm_q = model, pm.base_model.model
        for a in layer:
            lk_q, pm_q = (lk_q[a], pm_q[a]) if isinstance(a, int) else (getattr(lk_q, a), getattr(pm_q, a))
        h = torch.randn(2, 12, 384)
        _close(lk_q(h), pm_q(h), 1e-6)  # one layer, the same input: equal to rounding
    pm.save_pretrained(tmp_path / "peft")
    back = lorakit.load(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        _close(back(input_ids=ids).logits, pm(input_ids=ids).logits, tol)
