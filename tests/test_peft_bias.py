"""PEFT's ``bias="lora_only"`` / ``"all"`` (LoraConfig.bias): base-model biases trained with the adapter.

Both ways with real PEFT 0.21: PEFT trains (its random factors and perturbed biases) and saves ->
lorakit loads; lorakit saves -> PEFT loads. Which biases train is PEFT's set (requires_grad after
get_peft_model), the file keys are PEFT's (``.base_layer.bias`` for adapted modules, through an
``nn.MultiheadAttention``'s wrapper for its ``out_proj``), and every output (merged too) is compared
with a float64 oracle built from the file alone: the base model in float64 with the file's biases
and W + s·B·A. Tolerance: 1e-5 x max(|oracle|, 1) for each library against float64 (fp32 forward
through dims <= 16 and a softmax: fp32 error ~1e-6 relative). Then lorakit's own semantics: the
original biases are kept, restored by delete, run by disabled; two adapters may not train one bias;
every refusal leaves the model untouched.
"""

import copy
import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.layers import LoraLayer

peft = pytest.importorskip("peft")

PREFIX = "base_model.model."
RTOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about custom models, disabled biases, ...
        yield


class _Net(nn.Module):
    """Linear layers with and without a bias, a LayerNorm (its bias counts for "all") and an
    ``nn.MultiheadAttention`` (its ``out_proj.bias`` counts, its ``in_proj_bias`` does not, as in PEFT)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.down = nn.Linear(16, 8)
        self.nobias = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.ln(torch.tanh(self.up(x)))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.nobias(self.down(h)))


def _base(seed=0):
    torch.manual_seed(seed)
    return _Net().eval()


def _x(seed=5):
    return torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(seed))


def _close(actual, expected, rtol=RTOL):
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rtol * max(expected.abs().max().item(), 1.0), f"max |diff| {err:.3g}"


def _oracle(base, folder, x):
    """The float64 forward of ``base`` with the file's adapter merged by the textbook formula: each
    LoRA pair adds s·B·A to its weight (``in_proj_weight`` of the attention), each saved base bias
    replaces the model's; s = lora_alpha / r."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    tensors = {k[len(PREFIX):]: t.double() for k, t in load_file(folder / "adapter_model.safetensors").items()}
    model = copy.deepcopy(base).double()
    state = model.state_dict()
    for key, t in tensors.items():
        name = key.replace(".base_layer", "")
        if key.endswith(".lora_A.weight"):
            path = name[: -len(".lora_A.weight")]
            weight = f"{path}.in_proj_weight" if f"{path}.in_proj_weight" in state else f"{path}.weight"
            state[weight] = state[weight] + s * tensors[key.replace("lora_A", "lora_B")] @ t
        elif not key.endswith(".lora_B.weight"):
            assert name in state and name.endswith("bias"), key
            state[name] = t
    model.load_state_dict(state)
    with torch.no_grad():
        return model(x.double())


def _perturb(params, seed=3, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def _zero_out_proj_update(model):
    """PEFT 0.21 applies an attention's out_proj update twice (see tests/test_mha.py); with B = 0 there
    the libraries agree, and the out_proj's base bias (the key this file is about) is still tested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "out_proj.lora_B" in name:
                p.zero_()


def _trainable_biases(model):
    """Original-model names of the trainable base biases (not LoRA factors) of a PEFT or lorakit model."""
    names = set()
    for n, p in model.named_parameters():
        if p.requires_grad and n.endswith("bias") and ".lora_" not in n:
            names.add(n.removeprefix(PREFIX).replace(".base_layer", ""))
    return names


EXPECTED = {"lora_only": {"up.bias", "attn.out_proj.bias"},
            "all": {"up.bias", "ln.bias", "attn.out_proj.bias", "down.bias", "head.bias"}}


@pytest.mark.parametrize("mode", ["lora_only", "all"])
def test_bias_both_ways_with_peft(mode, tmp_path):
    base, x = _base(), _x()
    targets = ["up", "attn"]
    # PEFT trains -> lorakit loads
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                                                  bias=mode, init_lora_weights=False)).eval()
    assert _trainable_biases(pm) == EXPECTED[mode]
    _perturb([p for n, p in pm.named_parameters() if p.requires_grad and n.endswith("bias")])
    _zero_out_proj_update(pm)
    pm.save_pretrained(str(tmp_path / "peft"))
    peft_keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert f"{PREFIX}up.base_layer.bias" in peft_keys and f"{PREFIX}attn.base_layer.out_proj.base_layer.bias" in peft_keys
    oracle = _oracle(base, tmp_path / "peft", x)
    with torch.no_grad():
        _close(pm(x), oracle)
    lk = lorakit.load(copy.deepcopy(base), tmp_path / "peft").eval()
    assert lorakit.verify(copy.deepcopy(base), tmp_path / "peft").bias == mode
    assert _trainable_biases(lk) == EXPECTED[mode]
    with torch.no_grad():
        _close(lk(x), oracle)
    lorakit.save(lk, tmp_path / "resaved")
    peft_tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    resaved = load_file(tmp_path / "resaved" / "adapter_model.safetensors")
    assert set(resaved) == set(peft_tensors) and all(torch.equal(resaved[k], t) for k, t in peft_tensors.items())

    # lorakit trains -> PEFT loads
    lk2 = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=2, alpha=4, targets=targets, bias=mode,
                                                                 init="random")).eval()
    assert _trainable_biases(lk2) == EXPECTED[mode]
    _perturb([p for n, p in lk2.named_parameters() if p.requires_grad and n.endswith("bias")], seed=4)
    _zero_out_proj_update(lk2)
    lorakit.save(lk2, tmp_path / "lk")
    assert json.loads((tmp_path / "lk" / "adapter_config.json").read_text())["bias"] == mode
    assert set(load_file(tmp_path / "lk" / "adapter_model.safetensors")) == peft_keys
    oracle2 = _oracle(base, tmp_path / "lk", x)
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lk")).eval()
    with torch.no_grad():
        _close(lk2(x), oracle2)
        _close(pm2(x), oracle2)
        before = {k: v.clone() for k, v in lk2.state_dict().items()}
        lorakit.merge(lk2)  # the biases are in the base already: nothing of them to merge
        _close(lk2(x), oracle2)
        _close(pm2.merge_and_unload()(x), oracle2)
        lorakit.unmerge(lk2)
        assert all(torch.equal(v, before[k]) for k, v in lk2.state_dict().items())


def test_delete_restores_and_disabled_runs_the_original_biases():
    base, x = _base(), _x()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=2, targets=["up"], bias="all", init="random"))
    with torch.no_grad():
        y_base = base(x)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")}
    assert not torch.equal(model.ln.bias, base.ln.bias) and not torch.equal(model.up.base_layer.bias, base.up.bias)
    params = dict(model.named_parameters())
    loss = model(x).square().mean()  # a graph that saved the trained LayerNorm bias, alive across the block
    with lorakit.disabled(model):
        with torch.no_grad():
            assert torch.equal(model(x), y_base)  # the original model, biases included
    loss.backward()  # still valid: the trained biases were set aside, not overwritten
    assert dict(model.named_parameters()) == params
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters() if n.endswith("bias"))
    assert all(p.requires_grad == (n.endswith(".bias") and ".lora_" not in n)  # (not attn.in_proj_bias, as PEFT)
               for n, p in model.named_parameters() if n.endswith("bias"))
    lorakit.delete(model, "default")
    assert model.state_dict().keys() == original.keys()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_inactive_adapters_freeze_their_biases_and_merge_and_unload_keeps_only_the_merged_ones():
    base, x = _base(), _x()
    model = copy.deepcopy(base)
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["up"], bias="lora_only", init="random"), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["down"], bias="lora_only", init="random"), "b",
                   activate=False)
    _perturb([model.up.base_layer.bias, model.down.base_layer.bias])
    up, down = model.up.base_layer.bias.detach().clone(), model.down.base_layer.bias.detach().clone()
    assert model.up.base_layer.bias.requires_grad and not model.down.base_layer.bias.requires_grad
    lorakit.set_active(model, "b")
    assert not model.up.base_layer.bias.requires_grad and model.down.base_layer.bias.requires_grad
    assert torch.equal(model.up.base_layer.bias, up)  # one value per bias, whatever is active
    b = {k: t.clone() for k, t in (("A", model.down.lora_A["b"]), ("B", model.down.lora_B["b"]))}
    s = model.down.scale["b"]
    lorakit.merge_and_unload(model)  # merges b; a's trained bias goes back to its original value with a
    assert torch.equal(model.down.bias, down) and torch.equal(model.up.bias, base.up.bias)
    oracle = copy.deepcopy(base).double()  # float64: the base with b's update and b's trained bias only
    with torch.no_grad():
        oracle.down.weight += float(s) * b["B"].double() @ b["A"].double()
        oracle.down.bias.copy_(down.double())
        _close(model(x), oracle(x.double()))
    assert all(p.requires_grad for p in model.parameters())  # the flags from before inject


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    return model.state_dict().keys() == state.keys() and all(torch.equal(v, state[k])
                                                                for k, v in model.state_dict().items())


def test_refusals_name_the_problem_and_change_nothing(tmp_path):
    with pytest.raises(lorakit.LoraError, match=r"bias must be one of 'none', 'lora_only', 'all'.*'some'"):
        lorakit.LoraConfig(targets=["up"], bias="some")
    model = lorakit.inject(_base(), lorakit.LoraConfig(r=2, targets=["up"], bias="lora_only", init="random"), "a")
    lorakit.save(model, tmp_path / "a", "a")
    state, configs = _state(model), dict(lorakit.registry(model).configs)
    for cfg in (lorakit.LoraConfig(r=2, targets=["up", "down"], bias="lora_only"),
                lorakit.LoraConfig(r=2, targets=["down"], bias="all")):
        with pytest.raises(lorakit.LoraError, match=r"would train the base bias up\.bias, which adapter 'a' already"):
            lorakit.inject(model, cfg, "b")
        assert _same(model, state) and lorakit.registry(model).configs == configs
    with pytest.raises(lorakit.LoraError, match=r"would train the base bias up\.bias, which adapter 'a' already"):
        lorakit.load(model, tmp_path / "a", "b")
    assert _same(model, state) and lorakit.registry(model).configs == configs
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["down"], init="random"), "plain")
    state = _state(model)
    with pytest.raises(lorakit.LoraError, match=r"train base-model biases \(\['a'\]"):
        lorakit.combine(model, {"a": 1.0, "plain": 1.0})
    with pytest.raises(lorakit.LoraError, match=r"adapters \['a'\] trained base-model biases"):
        with lorakit.mixed(model, ["a", "plain"]):
            pass
    with pytest.raises(lorakit.LoraError, match=r"adapter 'a' trains base-model biases \(bias='lora_only'\)"):
        lorakit.prepare_hotswap(model, max_rank=4)
    assert _same(model, state)
    # a file whose biases do not match its config: missing, or one the config does not select
    folder = tmp_path / "a"
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = folder / "adapter_model.safetensors"
    save_file(load_file(weights), weights)  # without lorakit's copy of the config: the edited JSON counts
    (folder / "adapter_config.json").write_text(json.dumps({**config, "bias": "all"}))
    fresh = _base()
    fresh_state = _state(fresh)
    with pytest.raises(lorakit.LoraError, match=r"missing base_model\.model\.ln\.bias"):
        lorakit.load(fresh, folder)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "bias": "none"}))
    with pytest.raises(lorakit.LoraError, match=r"holds the base-model bias base_model\.model\.up\.base_layer\.bias .* bias='none'"):
        lorakit.load(fresh, folder)
    assert _same(fresh, fresh_state) and not any(isinstance(m, LoraLayer) for m in fresh.modules())


def test_bias_all_with_modules_to_save_both_ways(tmp_path):
    base, x = _base(), _x()
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["up"],
                                                                  modules_to_save=["head"], bias="all",
                                                                  init_lora_weights=False)).eval()
    _perturb([p for n, p in pm.named_parameters() if p.requires_grad and n.endswith("bias")])
    pm.save_pretrained(str(tmp_path / "peft"))
    keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert {f"{PREFIX}head.original_module.bias", f"{PREFIX}head.modules_to_save.bias", f"{PREFIX}head.bias"} <= keys
    lk = lorakit.load(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        expected = pm(x)
        _close(lk(x), expected)
    assert torch.equal(lk.head.base_layer.bias, base.head.bias)  # the base module stays the original
    lorakit.save(lk, tmp_path / "lk")
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lk")).eval()
    with torch.no_grad():
        _close(pm2(x), expected)
    # PEFT would write a changed original_module bias into the base module: refused by name, nothing changed
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    tensors[f"{PREFIX}head.original_module.bias"] = tensors[f"{PREFIX}head.original_module.bias"] + 1
    save_file(tensors, tmp_path / "peft" / "adapter_model.safetensors")
    fresh = _base()
    state = _state(fresh)
    with pytest.raises(lorakit.LoraError, match=re.escape("head.original_module.bias differs from the base model's")):
        lorakit.load(fresh, tmp_path / "peft")
    assert _same(fresh, state)


def test_loading_into_the_same_adapter_again_keeps_the_first_original(tmp_path):
    base, x = _base(), _x()
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=2, targets=["up", "attn"], bias="lora_only",
                                                                   init="random"))
    _zero_out_proj_update(model)
    _perturb([model.up.base_layer.bias], seed=7)
    lorakit.save(model, tmp_path / "one")
    _perturb([model.up.base_layer.bias], seed=8)
    lorakit.load(model, tmp_path / "one")  # into the existing adapter: the file's biases, same originals
    with torch.no_grad():
        _close(model(x), _oracle(base, tmp_path / "one", x))
    lorakit.delete(model, "default")
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())
