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
from lorakit.tokens import TokenLayer  # noqa: E402

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


# -- 3. PEFT's grouped-conv layout ---------------------------------------------------------------
class ConvNet(torch.nn.Module):
    def __init__(self, dim: int = 2, **conv) -> None:
        super().__init__()
        self.conv = (torch.nn.Conv1d, torch.nn.Conv2d)[dim - 1](4, 8, 3, groups=2, **conv)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.conv(x).flatten(2).mean(2))


def peft_grouped(tmp_path, dim=2, seed=0, **conv):
    torch.manual_seed(seed)
    base = ConvNet(dim, **conv).eval()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=6, target_modules=["conv"],
                                                                  init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "peft")
    return base, pm


def grouped_oracle(base: ConvNet, a: torch.Tensor, b: torch.Tensor, s: float, x: torch.Tensor) -> torch.Tensor:
    """PEFT's layout in float64 from the formula: base(x) + s·conv_B(conv_A(x)), A with the base's kernel,
    stride and padding (no dilation), B 1×1 with the base's groups."""
    net = copy.deepcopy(base).double()
    c = net.conv
    conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d)[c.weight.dim() - 3]
    h = conv(conv(x.double(), a.double(), None, c.stride, c.padding), b.double(), None, groups=c.groups)
    return net.head((c(x.double()) + s * h).flatten(2).mean(2))


@pytest.mark.parametrize("dim,conv", [(2, dict(stride=2, padding=1)), (1, dict(padding=1))])
def test_peft_grouped_conv_layout_both_ways(tmp_path, dim, conv):
    base, pm = peft_grouped(tmp_path, dim, **conv)
    x = torch.randn(3, 4, *([9] * dim), generator=torch.Generator().manual_seed(3))
    ref = pm(x).detach()
    theirs = keys(tmp_path / "peft")
    a, b = (theirs[f"base_model.model.conv.lora_{n}.weight"] for n in "AB")
    assert a.shape == (4, 4, *([3] * dim)) and b.shape == (8, 2, *([1] * dim))  # PEFT's layout
    model = copy.deepcopy(base)
    lorakit.load(model, tmp_path / "peft")
    got = model(x).detach()
    close(got, ref)
    oracle = grouped_oracle(base, a, b, 6 / 4, x)
    for out in (got, ref):  # both within fp32 rounding of the float64 formula
        assert (out.double() - oracle).abs().max() <= 1e-5 * max(1.0, oracle.abs().max().item())
    lorakit.save(model, tmp_path / "lk")
    ours = keys(tmp_path / "lk")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lk").eval()
    close(back(x).detach(), ref)


def test_peft_grouped_conv_dilated_refused(tmp_path):
    """PEFT builds A without the base's dilation, so its own forward fails on such a file; lorakit refuses it."""
    base, _ = peft_grouped(tmp_path, 1, padding=2, dilation=2)
    model = copy.deepcopy(base)
    with pytest.raises(lorakit.LoraError, match=r"dilated conv \(dilation=\(2,\)\)"):
        lorakit.load(model, tmp_path / "peft")
    assert not isinstance(model.conv, lorakit.LoraLayer)


def test_peft_grouped_conv_merge_refused_by_name_model_unchanged(tmp_path):
    base, _ = peft_grouped(tmp_path)
    model = copy.deepcopy(base)
    lorakit.load(model, tmp_path / "peft")
    before = model.conv.weight.clone()
    for call in (lorakit.merge, lorakit.merge_and_unload):
        with pytest.raises(lorakit.LoraError, match="PEFT's grouped-conv layout cannot be merged"):
            call(model)
    assert torch.equal(model.conv.weight, before) and not lorakit.summary(model).merged
    assert isinstance(model.conv, lorakit.LoraLayer)


def test_peft_grouped_conv_mixed_batch_matches_rows_alone(tmp_path):
    base, _ = peft_grouped(tmp_path)
    peft_grouped(tmp_path / "two", seed=1)
    model = copy.deepcopy(base)
    lorakit.load(model, tmp_path / "peft", "one")
    lorakit.load(model, tmp_path / "two" / "peft", "two")
    x = torch.randn(3, 4, 9, 9, generator=torch.Generator().manual_seed(4))
    names = ["two", None, "one"]
    with torch.no_grad(), lorakit.mixed(model, names):
        out = model(x)
    for i, name in enumerate(names):
        with torch.no_grad():
            if name is None:
                with lorakit.disabled(model):
                    alone = model(x[i:i + 1])
            else:
                lorakit.set_active(model, name)
                alone = model(x[i:i + 1])
        close(out[i:i + 1], alone)


def test_peft_grouped_conv_dora_and_mixed_layouts_refused(tmp_path):
    torch.manual_seed(0)
    base = ConvNet().eval()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["conv"], use_dora=True,
                                                                  init_lora_weights=False))
    pm.save_pretrained(tmp_path / "dora")
    model = copy.deepcopy(base)
    with pytest.raises(lorakit.LoraError, match="DoRA on PEFT's grouped-conv layout"):
        lorakit.load(model, tmp_path / "dora")
    assert not isinstance(model.conv, lorakit.LoraLayer)
    peft_grouped(tmp_path)
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets=["conv"]), "own")  # lorakit's mergeable layout
    assert model.conv.lora_A["own"].shape == (4, 2 * 9)
    with pytest.raises(lorakit.LoraError, match="'conv_grouped_peft' layout .* 'conv_grouped' layout"):
        lorakit.load(model, tmp_path / "peft", "p")
    assert model.conv.adapters() == ["own"]


# -- 2. trainable tokens -------------------------------------------------------------------------
def peft_tokens(tmp_path, tie, indices, seed=0):
    base = llama(tie, seed=seed)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                  trainable_token_indices=indices,
                                                                  init_lora_weights=False)).eval()
    randomize(pm, seed + 10)  # LoRA factors and the tokens' rows
    pm.save_pretrained(tmp_path / "peft")
    return base, pm


@pytest.mark.parametrize("tie", [False, True])
def test_trainable_tokens_peft_to_lorakit_and_back_merge_included(tmp_path, tie):
    base, pm = peft_tokens(tmp_path, tie, [5, 6, 7])
    x = torch.tensor([[1, 5, 6, 9, 7, 5]])
    ref = pm(x).logits.detach()
    theirs = keys(tmp_path / "peft")
    assert theirs["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"].shape == (3, 16)
    model = copy.deepcopy(base)
    lorakit.load(model, tmp_path / "peft")
    assert isinstance(model.lm_head, TokenLayer) == tie  # a tied head follows the embedding
    close(model(x).logits.detach(), ref)
    lorakit.save(model, tmp_path / "lk")
    ours = keys(tmp_path / "lk")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((tmp_path / "lk" / "adapter_config.json").read_text())["trainable_token_indices"] == [5, 6, 7]
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lk").eval()
    close(back(x).logits.detach(), ref)

    w = model.model.embed_tokens.base_layer.weight.clone()
    lorakit.merge(model)
    pm.merge_adapter()
    merged = model.model.embed_tokens.base_layer.weight
    assert torch.equal(merged[[5, 6, 7]], theirs["base_model.model.model.embed_tokens.token_adapter."
                                                  "trainable_tokens_delta"])  # the rows are the values
    close(model(x).logits.detach(), pm(x).logits.detach())
    lorakit.unmerge(model)
    assert torch.equal(model.model.embed_tokens.base_layer.weight, w)  # bit-exact


def test_trainable_tokens_dict_form_untied_head_both_ways(tmp_path):
    base, pm = peft_tokens(tmp_path, False, {"embed_tokens": [3, 60], "lm_head": [1, 2, 3]}, seed=1)
    x = torch.tensor([[3, 60, 1, 2]])
    ref = pm(x).logits.detach()
    model = copy.deepcopy(base)
    lorakit.load(model, tmp_path / "peft")
    close(model(x).logits.detach(), ref)
    lorakit.save(model, tmp_path / "lk")
    assert keys(tmp_path / "lk").keys() == keys(tmp_path / "peft").keys()
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lk").eval()
    close(back(x).logits.detach(), ref)


def test_trainable_tokens_forward_and_gradients_against_float64_formula():
    base = llama(seed=2)
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(targets=[], trainable_token_indices=[4, 9]))
    layer = model.model.embed_tokens
    with torch.no_grad():
        layer.trainable_tokens_delta["default"].add_(torch.randn(2, 16, generator=torch.Generator().manual_seed(5)))
    x = torch.tensor([[4, 1, 9, 4]])
    w64 = base.model.embed_tokens.weight.double().clone()
    w64[[4, 9]] = layer.trainable_tokens_delta["default"].detach().double()
    out = layer(x)
    oracle = w64[x]
    assert (out.double() - oracle).abs().max() == 0  # a lookup: exact
    out.pow(2).sum().backward()
    grad = layer.trainable_tokens_delta["default"].grad
    expect = torch.stack([2 * oracle[0, [0, 3]].sum(0), 2 * oracle[0, 2]])  # d/dv Σ out² over the rows using v
    assert (grad.double() - expect).abs().max() <= 4 * torch.finfo(torch.float32).eps * expect.abs().max()
    assert base.model.embed_tokens.weight.grad is None and layer.base_layer.weight.grad is None


def test_trainable_tokens_mixed_batch_matches_rows_alone(tmp_path):
    base = llama(seed=3)
    model = copy.deepcopy(base)
    lorakit.inject(model, lorakit.LoraConfig(targets=["q_proj"], trainable_token_indices=[5, 6]), "a")
    lorakit.inject(model, lorakit.LoraConfig(targets=["q_proj"], trainable_token_indices=[6, 8]), "b")
    randomize(model, 7)
    with torch.no_grad():
        for layer in (model.model.embed_tokens,):
            for p in layer.trainable_tokens_delta.values():
                p.normal_()
    x = torch.tensor([[5, 6, 8], [6, 8, 5], [1, 6, 5]])
    names = ["a", "b", None]
    with torch.no_grad(), lorakit.mixed(model, names):
        out = model(x).logits
    for i, name in enumerate(names):
        with torch.no_grad():
            if name is None:
                with lorakit.disabled(model):
                    alone = model(x[i:i + 1]).logits
            else:
                lorakit.set_active(model, name)
                alone = model(x[i:i + 1]).logits
        close(out[i:i + 1], alone)


def test_trainable_tokens_refusals(tmp_path):
    base = llama(tie=True)
    with pytest.raises(lorakit.LoraError, match="token id 64 is out of range, the layer has 64 rows"):
        lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(targets=["q_proj"], trainable_token_indices=[1, 64]))
    with pytest.raises(lorakit.LoraError, match="lists a token id twice"):
        lorakit.LoraConfig(targets=["q_proj"], trainable_token_indices=[1, 1])
    with pytest.raises(lorakit.LoraError, match="tied embeddings.*give tied layers the same ids"):
        lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(
            targets=["q_proj"], trainable_token_indices={"embed_tokens": [1], "lm_head": [2]}))
    with pytest.raises(lorakit.LoraError, match="cannot also have trainable tokens"):
        lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(targets=["embed_tokens"], trainable_token_indices=[1]))
    model = copy.deepcopy(base)
    lorakit.inject(model, lorakit.LoraConfig(targets=["q_proj"], trainable_token_indices=[1, 2]), "a")
    lorakit.inject(model, lorakit.LoraConfig(targets=["q_proj"], trainable_token_indices=[2, 3]), "b")
    with pytest.raises(lorakit.LoraError, match="both train token 2"):
        lorakit.set_active(model, ["a", "b"])
    # a file whose token rows do not match its config is refused, the model unchanged
    peft_tokens(tmp_path, True, [5, 6, 7])
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**cfg, "trainable_token_indices": [5, 6]}))
    fresh = copy.deepcopy(base)
    with pytest.raises(lorakit.LoraError, match=r"expected shape \(2, 16\).*found \(3, 16\)"):
        lorakit.load(fresh, tmp_path / "peft")
    assert not any(isinstance(m, (lorakit.LoraLayer, TokenLayer)) for m in fresh.modules())


def test_cli_trainable_tokens_flag_parsed():
    import argparse

    from lorakit.cli.parser import _train_parser
    parser = argparse.ArgumentParser()
    _train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--task", "causal-lm", "--trainable-tokens", "5,6,7"])
    assert args.trainable_tokens == (5, 6, 7)
    assert parser.parse_args(["train"]).trainable_tokens is None
