"""``lorakit.export_vllm`` / ``lorakit export --format vllm``: adapter folders vLLM serves as they are.

Oracles:

* vLLM's loader as written in its source, mirrored here independently (:func:`vllm_reads`):
  ``PEFTHelper.from_dict`` / ``_validate_features`` / ``validate_legal`` (vllm/lora/peft_helper.py:
  r, lora_alpha, target_modules required; no modules_to_save, no DoRA, bias "none", r <=
  max_lora_rank; ONE scaling lora_alpha / r, or / sqrt(r) with use_rslora; every other field,
  rank_pattern and alpha_pattern included, dropped), ``parse_fine_tuned_lora_name`` and
  ``is_base_embedding_weights`` (vllm/lora/utils.py), ``check_unexpected_modules`` and
  ``from_lora_tensors`` (vllm/lora/lora_model.py: keys with ``base_layer`` skipped, each module's
  factors as stored).
* The update: the original adapter as real PEFT 0.21 builds it (its per-module ``scaling``, its
  factors) in float64, against what vLLM computes from the export in float64. The only change the
  export makes is B' = fl32(s·B), so each ΔW entry may differ by eps32 · (|s·B|·|A|) (one rounding
  per entry of B', with margin 2).
* Outputs: the export loaded by PEFT and by lorakit into the same tiny Llama, in float64, against
  the original under PEFT in float64. A relative perturbation ≤ eps32 of every ΔW moves the outputs
  by a small multiple of eps32 · |adapter's effect|: allowed 64 · eps32 · max|out_adapted - out_base|
  (a scale off by 1% anywhere moves them by ~1e-2 · that effect, 10^4 times more).
"""

import json
import math
import re
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.cli import main

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
# vLLM's Llama: get_supported_lora_modules (its linear layers' last names, qkv_proj and gate_up_proj
# unpacked by packed_modules_mapping) plus the model's embedding_modules.
LLAMA_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens",
                      "lm_head"}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on custom configs
        yield


def tiny(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


# -- vLLM's loader, mirrored from its source ---------------------------------------------------------
def parse_fine_tuned_lora_name(name):
    """vllm/lora/utils.py parse_fine_tuned_lora_name: (module, is_lora_a), else ValueError."""
    start = 2 if name.startswith("base_model.model.") else 0
    parts = name.split(".")
    if parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return ".".join(parts[start:-2]), parts[-2] == "lora_A"
    if parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return ".".join(parts[start:-1]), parts[-1] == "lora_embedding_A"
    raise ValueError(f"{name} is unsupported LoRA weight")


def vllm_reads(folder, max_lora_rank):
    """``{module: ΔW in float64}`` as vLLM's loader builds it from ``folder`` (embeddings: (dim, vocab)),
    asserting each rule of its source on the way."""
    config = json.loads((folder / "adapter_config.json").read_text())
    assert {"r", "lora_alpha", "target_modules"} <= config.keys()  # PEFTHelper's required fields
    assert not config.get("modules_to_save") and not config.get("use_dora")  # _validate_features
    assert config.get("bias", "none") == "none" and config.get("trainable_token_indices") is None
    r, alpha = config["r"], config["lora_alpha"]
    assert isinstance(r, int) and 0 < r <= max_lora_rank  # __post_init__, validate_legal
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r  # one for every module
    factors = {}
    for name, t in load_file(folder / "adapter_model.safetensors").items():
        if name.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")):
            continue  # is_base_embedding_weights
        assert "base_layer" not in name, name  # check_unexpected_modules would skip it: silently unadapted
        module, is_a = parse_fine_tuned_lora_name(name)
        assert module.rsplit(".", 1)[-1] in LLAMA_LORA_MODULES, module  # check_unexpected_modules
        factors.setdefault(module, {})["A" if is_a else "B"] = t.double()
    out = {}
    for module, f in factors.items():
        a, b = f["A"], f["B"]
        assert a.shape[0] == b.shape[1] <= max_lora_rank  # set_lora copies into max_lora_rank slots
        out[module] = scaling * b @ a
    return out


def peft_updates(pm):
    """``{module: (s·B·A, |s·B|·|A|)}`` in float64 of PEFT model ``pm`` (PEFT's own scaling per module)."""
    out = {}
    for name, m in pm.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer) and "default" in m.scaling:
            if "default" in m.lora_embedding_A:
                a, b = m.lora_embedding_A["default"], m.lora_embedding_B["default"]
            elif "default" in m.lora_A:
                a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            else:
                continue
            s, a, b = m.scaling["default"], a.detach().double(), b.detach().double()
            out[name.removeprefix("base_model.model.")] = (s * b @ a, (s * b).abs() @ a.abs())
    return out


CASES = {
    "patterns_rslora_embedding": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                                      rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                                      alpha_pattern={"q_proj": 3, "down_proj": 5}, use_rslora=True),
    "layers_to_transform": dict(r=3, lora_alpha=7, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                                layers_to_transform=[1], layers_pattern="layers", alpha_pattern={"o_proj": 2}),
}


def peft_adapter(folder, spec, seed=1):
    torch.manual_seed(seed)
    pm = peft.get_peft_model(tiny(), peft.LoraConfig(init_lora_weights=False, **spec))
    pm.save_pretrained(folder)
    return pm


@pytest.mark.parametrize("case", CASES)
def test_export_is_what_vllm_reads_and_the_same_update(tmp_path, case):
    peft_adapter(tmp_path / "in", CASES[case])
    original = peft_updates(peft.PeftModel.from_pretrained(tiny(), tmp_path / "in"))
    report = lorakit.export_vllm(tmp_path / "in", tmp_path / "out", max_lora_rank=8)
    served = vllm_reads(tmp_path / "out", max_lora_rank=8)
    assert served.keys() == original.keys() == report.ranks.keys()
    if case == "layers_to_transform":
        assert all(".layers.1." in m for m in served)
    for module, (dw, bound) in original.items():
        assert (served[module] - dw).abs().le(EPS32 * bound + 64 * EPS64 * dw.abs().max()).all(), module
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == max(report.ranks.values()) and config["use_rslora"] is False
    assert config["target_modules"] == sorted(served)  # explicit paths: layers_to_transform folded in
    assert config["layers_to_transform"] is None and config["layers_pattern"] is None


@pytest.mark.parametrize("case", CASES)
def test_export_loads_in_peft_and_lorakit_with_the_original_outputs(tmp_path, case):
    pm = peft_adapter(tmp_path / "in", CASES[case]).double()
    lorakit.export_vllm(tmp_path / "in", tmp_path / "out", max_lora_rank=8)
    by_peft = peft.PeftModel.from_pretrained(tiny(), tmp_path / "out").double()
    by_lorakit = tiny()
    lorakit.load(by_lorakit, tmp_path / "out")
    by_lorakit.double()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        base = tiny().double()(input_ids=ids).logits
        effect = (want - base).abs().max()
        assert effect > 1e-2  # the adapter really changes the outputs
        for got in (by_peft(input_ids=ids).logits, by_lorakit(input_ids=ids).logits):
            assert (got - want).abs().max() <= 64 * EPS32 * effect + 64 * EPS64 * want.abs().max()


def test_truncate_keeps_the_best_rank_k_update_and_reports_its_error(tmp_path):
    peft_adapter(tmp_path / "in", dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}))
    original = peft_updates(peft.PeftModel.from_pretrained(tiny(), tmp_path / "in"))
    with pytest.raises(lorakit.LoraError, match=r"q_proj has rank 8 > max_lora_rank 4 .*--truncate"):
        lorakit.export_vllm(tmp_path / "in", tmp_path / "out", max_lora_rank=4)
    assert not (tmp_path / "out").exists()
    report = lorakit.export_vllm(tmp_path / "in", tmp_path / "out", max_lora_rank=4, truncate=True)
    served = vllm_reads(tmp_path / "out", max_lora_rank=4)
    assert set(report.truncated) == {m for m in original if m.endswith("q_proj")}
    for module, (dw, bound) in original.items():
        if module in report.truncated:  # Eckart-Young: the tail of ΔW's singular values, computed from ΔW itself
            sv = torch.linalg.svdvals(dw)
            best = float(sv[4:].square().sum().sqrt() / sv.square().sum().sqrt())
            got = float((served[module] - dw).norm() / dw.norm())
            assert report.truncated[module] == pytest.approx(best, rel=1e-9)
            assert got == pytest.approx(best, rel=1e-4) and best > 0.05
        else:
            assert (served[module] - dw).abs().le(EPS32 * bound + 64 * EPS64 * dw.abs().max()).all()


# -- refusals: each by name, nothing written ------------------------------------------------------------
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.experts = nn.Module()
        self.experts.w = nn.Parameter(torch.randn(2, 6, 8))


def lorakit_adapter(folder, model, save=None, **cfg):
    lorakit.inject(model, lorakit.LoraConfig(**cfg))
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B["default"].normal_()
    lorakit.save(model, folder, **(save or {}))


REFUSALS = {  # name -> (build the input folder, what the error must say)
    "dora": (lambda d: lorakit_adapter(d, tiny(), targets=["q_proj"], use_dora=True), r"use_dora=True.*does not yet support DoRA"),
    "modules_to_save": (lambda d: lorakit_adapter(d, tiny(), targets=["q_proj"], modules_to_save=["lm_head"]),
                        r"modules_to_save=\['lm_head'\].*only supports modules_to_save being None"),
    "lora_bias": (lambda d: lorakit_adapter(d, tiny(), targets=["q_proj"], lora_bias=True), r"lora_bias=True"),
    "trainable_tokens": (lambda d: lorakit_adapter(d, tiny(), targets=["q_proj"], trainable_token_indices=[1, 2]),
                         r"trainable_token_indices=\[1, 2\]"),
    "pissa": (lambda d: lorakit_adapter(d, tiny(), targets=["q_proj"], init="pissa"),
              r"init_lora_weights='pissa' saved without conversion.*convert_to_lora=True"),
    "target_parameters": (lambda d: lorakit_adapter(d, Toy(), target_parameters=["experts.w"]),
                          r"target_parameters=\['experts.w'\].*not raw parameters"),
    "conv": (lambda d: lorakit_adapter(d, Toy(), targets=["conv"]), r"conv.lora_A.weight has shape \(\d+, 3, 3, 3\)"),
    "multihead_attention": (lambda d: lorakit_adapter(d, Toy(), targets=["attn"]), r"attn.base_layer.out_proj.*MultiheadAttention"),
    "rank_over_max": (lambda d: lorakit_adapter(d, tiny(), targets=["q_proj"], r=32), r"rank 32 > max_lora_rank 16"),
    "unadapted_base_weight": (lambda d: with_tensor(d, "base_model.model.model.norm.weight", torch.ones(32)),
                              r"model.norm.weight is a base weight"),
    "dora_magnitude_key": (lambda d: with_tensor(d, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
                                                 torch.ones(32)), r"is a DoRA magnitude"),
}


def with_tensor(folder, key, tensor):
    """A good adapter whose file also holds ``tensor`` under ``key`` (its config metadata kept)."""
    lorakit_adapter(folder, tiny(), targets=["q_proj"])
    path = folder / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({**tensors, key: tensor}, str(path), metadata=metadata)


@pytest.mark.parametrize("name", REFUSALS)
def test_refused_with_the_reason_and_nothing_written(tmp_path, name):
    build, message = REFUSALS[name]
    build(tmp_path / "in")
    with pytest.raises(lorakit.LoraError, match=message):
        lorakit.export_vllm(tmp_path / "in", tmp_path / "sub" / "out")
    assert not (tmp_path / "sub").exists()  # not even the parent, no temporary folder


def test_an_output_folder_that_is_taken_is_refused_and_left_alone(tmp_path):
    lorakit_adapter(tmp_path / "in", tiny(), targets=["q_proj"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    for out in (tmp_path / "out", tmp_path / "in"):
        with pytest.raises(lorakit.LoraError, match="not an empty folder|is the input folder"):
            lorakit.export_vllm(tmp_path / "in", out)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
    (tmp_path / "out" / "keep.txt").unlink()  # an empty folder is filled
    lorakit.export_vllm(tmp_path / "in", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_quantized_base_is_exported_with_a_warning(tmp_path):
    lorakit_adapter(tmp_path / "in", tiny(), targets=["q_proj"])
    path = tmp_path / "in" / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    quant = json.dumps({"model.layers.0.self_attn.q_proj": "nf4", "model.layers.1.self_attn.q_proj": "nf4"})
    save_file(tensors, str(path), metadata={**metadata, "lorakit_base_quantization": quant})
    with pytest.warns(UserWarning, match=r"base quantized as \['nf4'\] \(2 layers\); vLLM applies the adapter to "
                                         r"the base at vLLM's own precision"):
        report = lorakit.export_vllm(tmp_path / "in", tmp_path / "out")
    assert len(report.warnings) == 1
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["lorakit_base_quantization"] == quant
    vllm_reads(tmp_path / "out", max_lora_rank=16)


def test_peft_embedding_base_weights_are_left_out_with_a_warning(tmp_path):
    peft_adapter(tmp_path / "in", dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"]))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(tmp_path / "in" / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match=r"holds base weights \['base_model.model.model.embed_tokens.base_layer.weight'\]"):
        lorakit.export_vllm(tmp_path / "in", tmp_path / "out")
    keys = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert not any("base_layer" in k for k in keys)


def test_cli_export(tmp_path, capsys):
    lorakit_adapter(tmp_path / "in", tiny(), targets=["q_proj", "v_proj"], r=4, rank_pattern={r"layers\.0\.self_attn\.v_proj": 2})
    (tmp_path / "in" / "lorakit_task.json").write_text('{"task": "causal-lm"}')
    assert main(["export", "--format", "vllm", str(tmp_path / "in"), str(tmp_path / "out"), "--max-lora-rank", "8"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"exported 4 modules for vLLM \(r=2\.\.4, one scaling: lora_alpha/r = 4/4\) to .*out", out), out
    assert (tmp_path / "out" / "lorakit_task.json").read_text() == '{"task": "causal-lm"}'
    vllm_reads(tmp_path / "out", max_lora_rank=8)
    assert main(["export", "--format", "vllm", str(tmp_path / "in"), str(tmp_path / "o2"), "--max-lora-rank", "2"]) == 2
    err = capsys.readouterr().err
    assert "lorakit export: error:" in err and "rank 4 > max_lora_rank 2" in err and not (tmp_path / "o2").exists()
    assert main(["export", "--format", "vllm", str(tmp_path / "in"), str(tmp_path / "o3"), "--max-lora-rank", "2",
                 "--truncate"]) == 0
    assert "truncated to rank 2, largest relative error" in capsys.readouterr().out
