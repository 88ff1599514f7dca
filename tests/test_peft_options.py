"""Training mode of new lorakit modules, and PEFT 0.21's LoraConfig options both ways with real PEFT.

Part 1: every path that creates modules (inject, load, combine, extract, quantize, dequantize) gives
them the training mode of the module they wrap: in eval mode an adapter with dropout > 0 is
deterministic and equals the float64 formula without dropout; in training mode its dropout drops
(compared with an explicit dropout mask drawn from the same seed).

Part 2: PEFT's options (``layers_to_transform`` / ``layers_pattern``, ``lora_bias``,
``init_lora_weights=False``) in both directions against real PEFT (its file loaded by lorakit and
lorakit's file loaded by PEFT, same outputs, merged included), every factor random so B != 0; the
options lorakit does not implement are refused by name before anything changes; and the manual's
table lists exactly the fields of ``peft.LoraConfig``.

Tolerances: outputs are compared with a float64 oracle at 1e-5 x max(|oracle|, 1) (fp32 throughout,
two chained products of dims <= 64: the fp32 error is ~1e-6 relative), and PEFT's output against
lorakit's at the same 1e-5 scale-relative bound as tests/test_peft_compat.py.
"""

import copy
import dataclasses
import json
import re
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.layers import LoraLayer, SavedModule
from lorakit.model import dequantize

peft = pytest.importorskip("peft")

RTOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about custom models, missing biases, ...
        yield


def _close(actual, expected, rtol=RTOL):
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rtol * max(expected.abs().max().item(), 1.0), f"max |diff| {err:.3g}"


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(up=nn.Linear(16, 32), act=nn.Tanh(), down=nn.Linear(32, 16),
                                     head=nn.Linear(16, 4)))


def _randomize(model, adapter="default", seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            if adapter in layer.lora_A:
                for p in (layer.lora_A[adapter], layer.lora_B[adapter], *layer_bias(layer, adapter)):
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def layer_bias(layer, adapter):
    return [layer.lora_bias[adapter]] if adapter in getattr(layer, "lora_bias", {}) else []


def _oracle(model, x, adapter="default", masks=None):
    """The float64 forward of ``_net`` with the adapter's s·B·A (+ s·b) added, no dropout (or the given
    dropped inputs per layer)."""
    h = x.double()
    for name in ("up", "act", "down", "head"):
        module = getattr(model, name)
        layer = module if isinstance(module, LoraLayer) else None
        base = layer.base_layer if layer is not None else module
        base = base.current() if isinstance(base, SavedModule) else base
        if isinstance(base, nn.Tanh):
            h = torch.tanh(h)
            continue
        out = h @ base.weight.double().t() + base.bias.double()
        if layer is not None and adapter in layer.lora_A:
            a, b, s = layer.lora_A[adapter].double(), layer.lora_B[adapter].double(), layer.scale[adapter]
            inp = masks[name].double() if masks and name in masks else h
            out = out + s * (inp @ a.t() @ b.t())
            out = out + sum(s * t.double() for t in layer_bias(layer, adapter))
        h = out
    return h


# -- part 1: the training mode of new modules --------------------------------------------------------
def _modes(model):
    return {m.training for m in model.modules()}


def _check_eval_deterministic(model, x, adapter="default"):
    assert _modes(model) == {False}, "a module created in an eval-mode model must be in eval mode"
    with torch.no_grad():
        y1, y2 = model(x), model(x)
    assert torch.equal(y1, y2)
    _close(y1, _oracle(model, x, adapter))


def _check_train_drops(model, x, adapter="default", p=0.5):
    """In training mode the first adapted layer ('up') drops its input: the output equals the float64
    formula with the dropout mask that the same seed draws."""
    model.train()
    assert _modes(model) == {True}
    torch.manual_seed(123)
    dropped = F.dropout(x, p, True)
    torch.manual_seed(123)
    with torch.no_grad():
        y = model(x)
        y_other = model(x)
    assert not torch.equal(y, y_other)
    _close(y, _oracle(model, x, adapter, masks={"up": dropped}))
    model.eval()


def test_inject_into_an_eval_model_creates_eval_modules():
    model = _net().eval()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, dropout=0.5, targets=["up"], modules_to_save=["head"]))
    _randomize(model)
    x = torch.randn(6, 16)
    _check_eval_deterministic(model, x)
    assert not model.head.modules_to_save["default"].training
    _check_train_drops(model, x)
    # a second adapter added while the model trains is created in training mode
    model.train()
    lorakit.inject(model, lorakit.LoraConfig(r=2, dropout=0.5, targets=["down"]), adapter="second")
    assert _modes(model) == {True}


def test_load_into_an_eval_model_creates_eval_modules(tmp_path):
    src = lorakit.inject(_net(), lorakit.LoraConfig(r=4, alpha=8, dropout=0.5, targets=["up"]))
    _randomize(src)
    lorakit.save(src, tmp_path / "a")
    model = lorakit.load(_net().eval(), tmp_path / "a")
    x = torch.randn(6, 16)
    _check_eval_deterministic(model, x)
    _check_train_drops(model, x)
    # PEFT's file with lora_dropout > 0 likewise
    pm = peft.get_peft_model(_net(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["up"],
                                                     init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "p"))
    _check_eval_deterministic(lorakit.load(_net().eval(), tmp_path / "p"), x)


def test_combine_in_an_eval_model_creates_eval_modules():
    model = _net().eval()
    for i, name in enumerate(("a", "b")):
        lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, dropout=0.5, targets=["up"]), adapter=name)
        _randomize(model, name, seed=i + 1)
    lorakit.combine(model, {"a": 0.5, "b": 0.5}, method="cat", adapter="ab", activate=True)
    x = torch.randn(6, 16)
    _check_eval_deterministic(model, x, "ab")
    model.train()
    lorakit.combine(model, {"a": 1.0, "b": -1.0}, method="cat", adapter="diff")
    assert _modes(model) == {True}


def test_extract_into_an_eval_model_creates_eval_modules():
    base, tuned = _net(0).eval(), _net(0)
    with torch.no_grad():
        tuned.up.weight.add_(torch.randn(32, 1) @ torch.randn(1, 16))
    lorakit.extract(base, tuned, rank=1, targets=["up"], modules_to_save=["head"])
    assert _modes(base) == {False}
    x = torch.randn(6, 16)
    with torch.no_grad():
        _close(base(x), tuned(x).double())


def test_quantize_and_dequantize_keep_the_training_mode():
    pytest.importorskip("bitsandbytes")
    for mode in (False, True):
        model = lorakit.quantize(_net().train(mode), "nf4", skip=["head"])
        assert _modes(model) == {mode}
        lorakit.inject(model, lorakit.LoraConfig(r=2, dropout=0.5, targets=["up", "down"]))
        assert _modes(model) == {mode}
        if not mode:
            x = torch.randn(6, 16)
            with torch.no_grad():
                assert torch.equal(model(x), model(x))
        replaced = dequantize(model)
        assert replaced and _modes(model) == {mode}
        lorakit.merge_and_unload(model)
        assert _modes(model) == {mode}


# -- part 2: PEFT's LoraConfig options, both ways ---------------------------------------------------
def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def _peft_paths(pm):
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    return {n[len("base_model.model."):] for n, m in pm.named_modules() if isinstance(m, PeftLoraLayer)}


def _both_ways(base, peft_kwargs, lk_cfg, x, tmp_path, run=lambda m, x: m(x)):
    """PEFT (random A, B, biases) saves -> lorakit loads; lorakit (random) saves -> PEFT loads: same adapted
    modules, outputs equal within 1e-5 x scale, and merged outputs too (PEFT's merge_and_unload vs
    lorakit.merge; lorakit.unmerge restores every weight and bias bit for bit). Returns (PEFT's config
    json, lorakit's config json, lorakit model loaded from PEFT's file)."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **peft_kwargs)).eval()
    with torch.no_grad():
        expected = run(pm, x)
        assert (expected - run(base, x)).abs().max() > 1e-3  # the adapter changes the output
    pm.save_pretrained(str(tmp_path / "peft"))
    lk = lorakit.load(copy.deepcopy(base), tmp_path / "peft").eval()
    assert {p for p, _ in lorakit.lora_layers(lk)} == _peft_paths(pm)
    with torch.no_grad():
        _close(run(lk, x), expected)
    lorakit.save(lk, tmp_path / "resaved")
    peft_tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    resaved = load_file(tmp_path / "resaved" / "adapter_model.safetensors")
    assert set(resaved) == set(peft_tensors) and all(torch.equal(resaved[k], t) for k, t in peft_tensors.items())

    lk2 = lorakit.inject(copy.deepcopy(base), lk_cfg).eval()
    _randomize(lk2)
    with torch.no_grad():
        mine = run(lk2, x)
    lorakit.save(lk2, tmp_path / "lk")
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lk")).eval()
    assert _peft_paths(pm2) == {p for p, _ in lorakit.lora_layers(lk2)}
    with torch.no_grad():
        _close(run(pm2, x), mine)
        before = {k: v.clone() for k, v in lk2.state_dict().items()}
        lorakit.merge(lk2)
        merged = run(lk2, x)
        _close(merged, mine)
        _close(merged, run(pm2.merge_and_unload(), x))
        lorakit.unmerge(lk2)
        assert all(torch.equal(v, before[k]) for k, v in lk2.state_dict().items())
    peft_json = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    lk_json = json.loads((tmp_path / "lk" / "adapter_config.json").read_text())
    return peft_json, lk_json, lk


LAYER_CASES = {
    "int, no pattern": (dict(layers_to_transform=1), dict(layers_to_transform=1)),
    "list + pattern": (dict(layers_to_transform=[0, 2], layers_pattern="layers"),
                       dict(layers_to_transform=[0, 2], layers_pattern="layers")),
    "list + pattern list": (dict(layers_to_transform=[2], layers_pattern=["h", "layers"]),
                            dict(layers_to_transform=[2], layers_pattern=["h", "layers"])),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layers_to_transform_both_ways(case, tmp_path):
    peft_kw, lk_kw = LAYER_CASES[case]
    base, x = _llama(), torch.randint(0, 64, (2, 7))
    run = lambda m, x: m(input_ids=x).logits  # noqa: E731
    peft_json, lk_json, lk = _both_ways(base, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                   **peft_kw), lorakit.LoraConfig(r=4, alpha=8, targets=[
                                                       "q_proj", "v_proj", "down_proj"], **lk_kw), x, tmp_path, run)
    layers = {lk_kw["layers_to_transform"]} if isinstance(lk_kw["layers_to_transform"], int) else \
        set(lk_kw["layers_to_transform"])
    assert {int(p.split(".")[2]) for p, _ in lorakit.lora_layers(lk)} == layers
    assert lk_json["target_modules"] == ["down_proj", "q_proj", "v_proj"]  # leaf names + the layers, as PEFT's
    want = [lk_kw["layers_to_transform"]] if isinstance(lk_kw["layers_to_transform"], int) else lk_kw["layers_to_transform"]
    assert lk_json["layers_to_transform"] == want
    pattern = lk_kw.get("layers_pattern")
    assert lk_json["layers_pattern"] == ([pattern] if isinstance(pattern, str) else pattern)
    resaved = json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())
    assert resaved["layers_to_transform"] == want


def test_layers_to_transform_refusals():
    base = _llama()
    with pytest.raises(lorakit.LoraError, match="layers_to_transform"):
        lorakit.inject(base, lorakit.LoraConfig(targets=["q_proj"], layers_to_transform=[7]))
    with pytest.raises(lorakit.LoraError, match="layers_pattern needs layers_to_transform"):
        lorakit.LoraConfig(targets=["q_proj"], layers_pattern="layers")
    with pytest.raises(lorakit.LoraError, match="layers_to_transform must be"):
        lorakit.LoraConfig(targets=["q_proj"], layers_to_transform=["1"])
    assert not any("lora" in k for k in base.state_dict())


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)
        self.nobias = nn.Linear(5, 4, bias=False)

    def forward(self, x):
        return self.nobias(self.fc(self.conv(x).mean((2, 3))))


def test_lora_bias_both_ways_with_merge(tmp_path):
    torch.manual_seed(0)
    base, x = _ConvNet().eval(), torch.randn(2, 3, 6, 6)
    peft_json, lk_json, lk = _both_ways(base, dict(r=3, lora_alpha=6, target_modules=["conv", "fc"], lora_bias=True),
                                        lorakit.LoraConfig(r=3, alpha=6, targets=["conv", "fc"], lora_bias=True),
                                        x, tmp_path)
    assert lk_json["lora_bias"] is True and peft_json["lora_bias"] is True
    keys = set(load_file(tmp_path / "lk" / "adapter_model.safetensors"))
    assert keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert {"base_model.model.conv.lora_B.bias", "base_model.model.fc.lora_B.bias"} <= keys
    # the float64 formula: conv(x) + s·(B ⋆ (A ⋆ x) + b), fc(h) + s·(B·A·h + b)
    conv, fc = lk.conv, lk.fc
    s = conv.scale["default"]
    d = lambda t: t.detach().double()  # noqa: E731
    xd = x.double()
    h = F.conv2d(xd, d(conv.base_layer.weight), d(conv.base_layer.bias), padding=1)
    h = h + s * (F.conv2d(F.conv2d(xd, d(conv.lora_A["default"]), padding=1), d(conv.lora_B["default"]))
                 + d(conv.lora_bias["default"]).view(1, -1, 1, 1))
    h = h.mean((2, 3))
    h = h @ d(fc.base_layer.weight).t() + d(fc.base_layer.bias) + s * (
        h @ d(fc.lora_A["default"]).t() @ d(fc.lora_B["default"]).t() + d(fc.lora_bias["default"]))
    with torch.no_grad():
        _close(lk(x), h @ d(lk.nobias.weight).t())


def test_lora_bias_refusals_change_nothing(tmp_path):
    torch.manual_seed(0)
    net = _ConvNet()
    with pytest.raises(lorakit.LoraError, match="lora_bias=True is not supported with use_dora"):
        lorakit.LoraConfig(targets=["fc"], lora_bias=True, use_dora=True)
    emb = nn.Sequential(OrderedDict(emb=nn.Embedding(10, 4), fc=nn.Linear(4, 4)))
    with pytest.raises(lorakit.LoraError, match=r"emb\.weight: lora_bias=True is not supported on embedding"):
        lorakit.inject(emb, lorakit.LoraConfig(targets=["emb", "fc"], lora_bias=True))
    assert not any("lora" in k for k in emb.state_dict())
    # a layer without a bias: forward works (as in PEFT), merge is refused by name before anything changes
    lorakit.inject(net, lorakit.LoraConfig(r=2, targets=["fc", "nobias"], lora_bias=True, init="random"))
    x = torch.randn(2, 3, 6, 6)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(lorakit.LoraError, match=r"into nobias: they have a lora_bias and the base layer has no bias"):
        lorakit.merge(net)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    lorakit.inject(net, lorakit.LoraConfig(r=2, targets=["fc", "nobias"], init="random"), adapter="plain")
    with torch.no_grad():
        lorakit.set_active(net, "default")
        y_bias = net(x)
        lorakit.set_active(net, "plain")
        y_plain = net(x)
        with lorakit.mixed(net, ["default", "plain"]):
            y_mixed = net(x)
    _close(y_mixed[:1], y_bias[:1])
    _close(y_mixed[1:], y_plain[1:])
    with pytest.raises(lorakit.LoraError, match=r"cannot combine adapters with lora_bias=True \(\['default'\]\)"):
        lorakit.combine(net, {"default": 1.0, "plain": 1.0})


def test_init_random_is_init_lora_weights_false_both_ways(tmp_path):
    torch.manual_seed(0)
    net = lorakit.inject(_net(), lorakit.LoraConfig(r=4, targets=["up", "down"], init="random"))
    assert all(layer.lora_B["default"].abs().min() > 0 for _, layer in lorakit.lora_layers(net))
    lorakit.save(net, tmp_path / "lk")
    assert json.loads((tmp_path / "lk" / "adapter_config.json").read_text())["init_lora_weights"] is False
    pm = peft.PeftModel.from_pretrained(_net(), str(tmp_path / "lk"))
    assert pm.peft_config["default"].init_lora_weights is False
    pm.save_pretrained(str(tmp_path / "peft"))
    assert lorakit.verify(_net(), tmp_path / "peft").init == "random"
    lorakit.save(lorakit.load(_net(), tmp_path / "peft"), tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())["init_lora_weights"] is False


# -- refused by name ---------------------------------------------------------------------------------
REFUSED_VALUES = {
    "layer_replication": [[0, 1]], "use_qalora": True, "alora_invocation_tokens": [5, 6],
    "arrow_config": {"top_k": 2}, "use_bdlora": {"nblocks": 2}, "kasa_config": {"x": 1}, "velora_config": {"x": 1},
    "monteclora_config": {"x": 1}, "megatron_config": {"x": 1}, "lora_ga_config": {"x": 1},
    "ensure_weight_tying": True,
    "init_lora_weights": "loftq", "unheard_of_option": 3,
}


@pytest.fixture(scope="module")
def peft_file(tmp_path_factory):
    directory = tmp_path_factory.mktemp("peft")
    pm = peft.get_peft_model(_net(), peft.LoraConfig(r=2, target_modules=["up"], init_lora_weights=False))
    pm.save_pretrained(str(directory))
    return directory


@pytest.mark.parametrize("field", list(REFUSED_VALUES))
def test_unsupported_options_are_refused_by_name(field, peft_file, tmp_path):
    import shutil

    folder = tmp_path / "f"
    shutil.copytree(peft_file, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config[field] = REFUSED_VALUES[field]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorakit.LoraError, match=re.escape(field)):
        lorakit.load(model, folder)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _table_fields():
    text = (Path(__file__).parent.parent / "docs" / "guide" / "files.md").read_text()
    section = text.split("## PEFT LoraConfig fields", 1)[1].split("\n## ", 1)[0]
    return {m[1]: m[2] for m in re.finditer(r"^\| `(\w+)` \| (supported|refused|metadata)", section, re.M)}


def test_the_manual_lists_exactly_the_fields_of_peft_lora_config():
    from lorakit.files.format import PEFT_FIELDS

    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    table = _table_fields()
    assert set(table) == fields, f"missing: {fields - set(table)}, extra: {set(table) - fields}"
    assert set(PEFT_FIELDS) == fields
    assert table == PEFT_FIELDS
