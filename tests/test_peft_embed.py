"""PEFT 0.21's embedding-related options, both ways, against real PEFT on the same tiny models:

* embedding base weights in adapter files (PEFT's ``save_embedding_layers``: ``<path>.base_layer.weight``
  of a LoRA-adapted embedding, ``<path>.weight`` of a resized one), tied input/output embeddings;
* ``trainable_token_indices`` (PEFT's TrainableTokens: ``...token_adapter.trainable_tokens_delta``);
* PEFT's grouped-convolution layout (A a full conv, B a 1×1 grouped conv; unmergeable).

Tolerance: the same model, base weights and adapter tensors in both libraries, fp32; outputs agree
within 1e-5 × max(1, |PEFT's output|), about 100× the fp32 rounding of these 2-layer computations
(the libraries round in different orders). Where lorakit computes something PEFT does not (a merge
PEFT cannot do), the oracle is the textbook formula in float64 with a tolerance of a few fp32 ulps of
the result's magnitude.
"""

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import lorakit  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
WEIGHTS = "adapter_model.safetensors"


def llama(tie: bool = False, vocab: int = 64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def close(got: torch.Tensor, ref: torch.Tensor) -> None:
    tol = 1e-5 * max(1.0, ref.abs().max().item())
    assert (got - ref).abs().max().item() <= tol, (got - ref).abs().max().item()


def keys(directory) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(directory, WEIGHTS))


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every trainable parameter of a PEFT model random (so that no factor is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# -- 1. embedding base weights in files ---------------------------------------------------------
@pytest.mark.parametrize("tie", [False, True])
def test_embedding_base_weight_peft_to_lorakit_and_back(tmp_path, tie):
    base = llama(tie)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"],
                                                                  init_lora_weights=False))
    with torch.no_grad():  # a trained (or otherwise changed) base embedding, which the file carries
        pm.base_model.model.model.embed_tokens.base_layer.weight.add_(0.25)
    pm.save_pretrained(tmp_path / "peft")
    x = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = pm(x).logits.detach()
    theirs = keys(tmp_path / "peft")
    assert "base_model.model.model.embed_tokens.base_layer.weight" in theirs

    model = copy.deepcopy(base)
    lorakit.load(model, tmp_path / "peft")
    assert torch.equal(model.model.embed_tokens.base_layer.weight,
                       theirs["base_model.model.model.embed_tokens.base_layer.weight"])
    if tie:  # the output embedding shares the weight, as in PEFT
        assert model.lm_head.weight is model.model.embed_tokens.base_layer.weight
    close(model(x).logits.detach(), ref)

    lorakit.save(model, tmp_path / "lk")  # "auto": embed_tokens is a target, so its base weight is written
    ours = keys(tmp_path / "lk")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lk").eval()
    close(back(x).logits.detach(), ref)


def test_resized_vocabulary_refused_until_resized_then_both_ways(tmp_path):
    base = llama()
    base.save_pretrained(tmp_path / "base")  # a local base: PEFT's and lorakit's "auto" compare vocab sizes with it
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    resized = copy.deepcopy(base)
    resized.resize_token_embeddings(70, mean_resizing=False)
    pm = peft.get_peft_model(resized, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")  # auto: resized, so both embeddings are written whole
    theirs = keys(tmp_path / "peft")
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= theirs.keys()
    x = torch.randint(60, 70, (2, 5), generator=torch.Generator().manual_seed(2))  # new tokens too
    ref = pm(x).logits.detach()

    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorakit.LoraError, match=r"\(70, 16\).*\(64, 16\).*resize_token_embeddings\(70\)"):
        lorakit.load(model, tmp_path / "peft")
    assert not any(isinstance(m, lorakit.LoraLayer) for m in model.modules())  # all or nothing
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    model.resize_token_embeddings(70, mean_resizing=False)
    lorakit.load(model, tmp_path / "peft")
    close(model(x).logits.detach(), ref)
    lorakit.save(model, tmp_path / "lk")  # auto: vocab 70 != the base folder's 64
    ours = keys(tmp_path / "lk")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    other = copy.deepcopy(base)
    other.resize_token_embeddings(70, mean_resizing=False)
    back = peft.PeftModel.from_pretrained(other, tmp_path / "lk").eval()
    close(back(x).logits.detach(), ref)


def test_save_embedding_layers_option_matches_peft(tmp_path):
    base = llama()
    cfg = dict(r=4, target_modules=["q_proj"])
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj"]))
    for which in (True, False, "auto"):
        pm.save_pretrained(tmp_path / f"p{which}", save_embedding_layers=which)
        lorakit.save(model, tmp_path / f"l{which}", save_embedding_layers=which)
        assert keys(tmp_path / f"p{which}").keys() == keys(tmp_path / f"l{which}").keys(), which
    assert "base_model.model.lm_head.weight" in keys(tmp_path / "lTrue")
    with pytest.raises(lorakit.LoraError, match="save_embedding_layers must be"):
        lorakit.save(model, tmp_path / "bad", save_embedding_layers="yes")


def test_embedding_base_weight_with_nonfinite_values_refused(tmp_path):
    base = llama()
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=4, targets=["embed_tokens"]))
    lorakit.save(model, tmp_path / "a")
    t = keys(tmp_path / "a")
    t["base_model.model.model.embed_tokens.base_layer.weight"][3, 1] = float("nan")
    from safetensors.torch import save_file
    save_file(t, str(tmp_path / "a" / WEIGHTS))  # without lorakit's metadata: read as PEFT's file
    fresh = copy.deepcopy(base)
    with pytest.raises(lorakit.LoraError, match="embed_tokens.base_layer.weight: 1 NaN"):
        lorakit.load(fresh, tmp_path / "a")
    assert not any(isinstance(m, lorakit.LoraLayer) for m in fresh.modules())
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"] == ["embed_tokens"]
