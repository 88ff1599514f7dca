"""nn.MultiheadAttention: LoRA on in_proj_weight and out_proj, in PEFT's file layout.

Oracles: the same attention module run with W + s·B·A written into both weights in float64
(the textbook update), each row of a mixed batch run alone, and real PEFT 0.21 (files both ways;
outputs: PEFT 0.21 applies out_proj's update twice, see ``test_outputs_against_peft``).
"""

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit import LoraConfig, LoraError

peft = pytest.importorskip("peft")
E, H = 8, 2


class Net(nn.Module):
    def __init__(self, batch_first=True):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first)
        self.head = nn.Linear(E, 3)

    def forward(self, x, **kwargs):
        return self.head(self.attn(x, x, x, **kwargs)[0])


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _oracle(net, adapter, out_proj_times=1):
    """A float64 copy of the plain model with s·B·A added to in_proj_weight and out_proj.weight."""
    layers = dict(lorakit.lora_layers(net))
    plain = Net(net.attn.base_layer.batch_first).double()
    state = {k.replace(".base_layer", ""): v for k, v in net.state_dict().items() if "lora_" not in k}
    plain.load_state_dict(state)
    with torch.no_grad():
        for path, weight, times in (("attn", plain.attn.in_proj_weight, 1),
                                    ("attn.out_proj", plain.attn.out_proj.weight, out_proj_times)):
            layer = layers[path]
            weight += times * layer.scale[adapter] * (layer.lora_B[adapter].double() @ layer.lora_A[adapter].double())
    return plain


def _peft_file(tmp_path, seed=0, batch_first=True):
    torch.manual_seed(seed)
    base = Net(batch_first)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=6, target_modules=["attn"],
                                                                    init_lora_weights=False))
    model.save_pretrained(tmp_path / "peft")
    return base, model, tmp_path / "peft"


@pytest.mark.parametrize("batch_first", [True, False])
def test_forward_is_the_formula_and_trains(batch_first):
    torch.manual_seed(0)
    net = Net(batch_first)
    lorakit.inject(net, LoraConfig(r=2, alpha=6, targets=["attn"]))
    assert {p: (layer.kind.name, layer.param_name) for p, layer in lorakit.lora_layers(net)} == {
        "attn": ("multihead_attention", "in_proj_weight"), "attn.out_proj": ("mha_out_proj", "weight")}
    _randomise(net, 1)
    x = torch.randn(3, 5, E)
    out = net(x)
    assert (out.double() - _oracle(net, "default")(x.double())).abs().max() < 1e-5
    out.square().sum().backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    assert sorted(grads) == ["attn.base_layer.out_proj.lora_A.default", "attn.base_layer.out_proj.lora_B.default",
                             "attn.lora_A.default", "attn.lora_B.default"]
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_merge_rounds_once_and_unmerge_is_bit_exact():
    torch.manual_seed(0)
    net = Net()
    lorakit.inject(net, LoraConfig(r=2, alpha=6, targets=["attn"]))
    _randomise(net, 2)
    x = torch.randn(3, 5, E)
    mha = net.attn.base_layer
    w_in, w_out = mha.in_proj_weight.detach().clone(), mha.out_proj.weight.detach().clone()
    oracle = _oracle(net, "default")
    with torch.no_grad():
        unmerged = net(x)
        lorakit.merge(net)
        assert torch.equal(net.attn.base_layer.in_proj_weight, oracle.attn.in_proj_weight.float())
        assert torch.equal(net.attn.base_layer.out_proj.weight, oracle.attn.out_proj.weight.float())
        assert (net(x) - unmerged).abs().max() < 1e-5
        lorakit.unmerge(net)
        assert torch.equal(net.attn.base_layer.in_proj_weight, w_in)
        assert torch.equal(net.attn.base_layer.out_proj.weight, w_out)
        plain = lorakit.merge_and_unload(net)
    assert type(plain.attn) is nn.MultiheadAttention and type(plain.attn.out_proj) is not lorakit.LoraLayer
    assert torch.equal(plain.attn.in_proj_weight, oracle.attn.in_proj_weight.float())


def test_files_both_ways_with_peft(tmp_path):
    base, peft_model, peft_dir = _peft_file(tmp_path)
    net = copy.deepcopy(base)
    lorakit.load(net, peft_dir)
    lorakit.save(net, tmp_path / "ours")
    theirs = load_file(peft_dir / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours/adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs) == [
        "base_model.model.attn.base_layer.out_proj.lora_A.weight",
        "base_model.model.attn.base_layer.out_proj.lora_B.weight",
        "base_model.model.attn.lora_A.weight", "base_model.model.attn.lora_B.weight"]
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # bit-identical round trip
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            assert torch.equal(dict(reloaded.named_parameters())[name], p)


@pytest.mark.parametrize("batch_first", [True, False])
def test_outputs_against_peft(tmp_path, batch_first):
    """in_proj: lorakit's output equals PEFT's. out_proj: PEFT 0.21 adds its update twice
    (MultiheadAttention.merge writes W + ΔW, then out_proj.merge adds ΔW again; huggingface/peft
    PR 3774), so its output is the oracle with 2·ΔW on out_proj, and lorakit's the oracle itself."""
    base, peft_model, peft_dir = _peft_file(tmp_path, batch_first=batch_first)
    net = copy.deepcopy(base)
    lorakit.load(net, peft_dir)
    x = torch.randn(3, 5, E) if batch_first else torch.randn(5, 3, E)
    with torch.no_grad():
        ours, theirs = net(x), peft_model(x)
        assert (ours.double() - _oracle(net, "default")(x.double())).abs().max() < 1e-5
        assert (theirs.double() - _oracle(net, "default", out_proj_times=2)(x.double())).abs().max() < 1e-5
        for model in (net, peft_model):  # without an out_proj update the two libraries agree
            for name, p in model.named_parameters():
                if "out_proj.lora_B" in name:
                    p.zero_()
        assert (net(x) - peft_model(x)).abs().max() < 1e-5 * max(1.0, theirs.abs().max().item())


@pytest.mark.parametrize("batch_first", [True, False])
def test_mixed_batch_rows_equal_each_row_alone(batch_first):
    torch.manual_seed(0)
    net = Net(batch_first)
    lorakit.inject(net, LoraConfig(r=2, alpha=6, targets=["attn"]), adapter="a")
    lorakit.inject(net, LoraConfig(r=3, alpha=3, targets=["attn"]), adapter="b")
    _randomise(net, 3)
    rows, b_dim = ["a", None, "b", "a"], 0 if batch_first else 1
    x = torch.randn(4, 5, E) if batch_first else torch.randn(5, 4, E)
    pad = torch.zeros(4, 5)  # float, like attn_mask (mixing bool and float masks is deprecated in torch)
    pad[1, 3:] = pad[2, 4:] = float("-inf")
    mask = torch.randn(4 * H, 5, 5)  # a per-row (and per-head) float mask
    attn = net.attn
    with torch.no_grad():
        with lorakit.mixed(net, rows):
            out, weights = attn(x, x, x, key_padding_mask=pad, attn_mask=mask, average_attn_weights=False)
        for i, name in enumerate(rows):
            xi = x.narrow(b_dim, i, 1)
            if name is None:
                with lorakit.disabled(net):
                    ref, ref_w = attn(xi, xi, xi, key_padding_mask=pad[i:i + 1], attn_mask=mask[i * H:(i + 1) * H],
                                      average_attn_weights=False)
            else:
                lorakit.set_active(net, name)
                ref, ref_w = attn(xi, xi, xi, key_padding_mask=pad[i:i + 1], attn_mask=mask[i * H:(i + 1) * H],
                                  average_attn_weights=False)
            assert (out.narrow(b_dim, i, 1) - ref).abs().max() < 1e-5
            assert (weights[i:i + 1] - ref_w).abs().max() < 1e-6


def test_mixed_refuses_an_unbatched_query():
    net = Net()
    lorakit.inject(net, LoraConfig(r=2, targets=["attn"]))
    x = torch.randn(4, E)  # (L, E): 4 tokens, not 4 rows
    with lorakit.mixed(net, ["default", None, "default", None]), \
            pytest.raises(LoraError, match=r"shape \(4, 8\) is unbatched"):
        net.attn(x, x, x)


def test_out_proj_cannot_be_adapted_alone():
    """The attention reads out_proj.weight and never calls out_proj: an adapter there alone had no
    effect (it was accepted and silently ignored); now it is refused, and all-linear skips it."""
    net = Net()
    refused = r"attn.out_proj is read directly by attn \(MultiheadAttention\).*target 'attn'"
    for cfg in (LoraConfig(r=2, targets=["attn.out_proj"]), LoraConfig(r=2, target_parameters=["attn.out_proj.weight"])):
        with pytest.raises(LoraError, match=refused):
            lorakit.inject(net, cfg)
    assert not lorakit.state.has_adapters(net)
    net.ff = nn.Linear(E, E)
    lorakit.inject(net, LoraConfig(r=2, targets="all-linear"))
    assert [p for p, _ in lorakit.lora_layers(net)] == ["ff"]


def test_unsupported_attention_and_dropout_are_refused():
    odd = nn.Sequential(nn.MultiheadAttention(E, H, kdim=4, vdim=4))
    with pytest.raises(LoraError, match="kdim/vdim != embed_dim.*no in_proj_weight"):
        lorakit.inject(odd, LoraConfig(r=2, targets=["0"]))
    with pytest.raises(LoraError, match="dropout is not supported on multihead_attention layers"):
        lorakit.inject(Net(), LoraConfig(r=2, dropout=0.1, targets=["attn"]))


def test_delete_gives_back_the_plain_attention():
    net = Net()
    before = copy.deepcopy(net.state_dict())
    lorakit.inject(net, LoraConfig(r=2, targets=["attn"]))
    lorakit.delete(net, "default")
    assert type(net.attn) is nn.MultiheadAttention and type(net.attn.out_proj) is not lorakit.LoraLayer
    assert net.state_dict().keys() == before.keys()
