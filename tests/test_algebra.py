"""lorakit.combine: each method against PEFT 0.21's add_weighted_adapter (the definition) and
against the float64 textbook formulas; refusals change nothing; the result saves and loads."""

import contextlib
import copy
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import lorakit
from lorakit.ops.algebra import combine

F64 = torch.float64


class Tiny(nn.Module):
    """A Linear, an Embedding and a Conv2d (ΔW as B·A, (B·A)ᵀ and reshaped B·A)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.q = nn.Linear(8, 12)
        self.v = nn.Linear(12, 6)
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, ids, img):
        return self.v(self.q(self.emb(ids))).sum() + self.conv(img).sum()


TARGETS = ["emb", "q", "v", "conv"]


def two_adapters(ra=2, rb=3, targets_b=TARGETS, seed=0):
    """A float64 Tiny model with adapters a (r=ra, α=4) and b (r=rb, α=5, rsLoRA), random factors."""
    torch.manual_seed(seed)
    model = Tiny().to(F64)
    lorakit.inject(model, lorakit.LoraConfig(r=ra, alpha=4, targets=TARGETS), adapter="a")
    lorakit.inject(model, lorakit.LoraConfig(r=rb, alpha=5, use_rslora=True, targets=targets_b), adapter="b")
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for n in layer.lora_A:
                layer.lora_A[n].normal_()
                layer.lora_B[n].normal_()
    return model


def textbook(module: nn.Module, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """ΔW = s·B·A in W's layout, written out per layer type (float64)."""
    a, b = a.to(F64), b.to(F64)
    if isinstance(module, nn.Embedding):
        return s * (b @ a).t()
    if isinstance(module, nn.Conv2d):
        return s * (b.flatten(1) @ a.flatten(1)).reshape(module.weight.shape)
    return s * b @ a


def deltas(model, adapter):
    """{path: ΔW} of ``adapter`` by the textbook formula from its factors and scale."""
    out = {}
    for path, layer in lorakit.lora_layers(model):
        if adapter in layer.lora_A:
            out[path] = textbook(layer.base_layer, layer.lora_A[adapter].detach(), layer.lora_B[adapter].detach(),
                                 layer.scale[adapter])
    return out


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(lorakit.registry(model).configs)


def assert_unchanged(model, before):
    tensors, configs = before
    after = model.state_dict()
    assert after.keys() == tensors.keys()
    assert all(torch.equal(after[k], v) for k, v in tensors.items())
    assert lorakit.registry(model).configs == configs


def test_cat_is_the_exact_weighted_sum_with_different_ranks_and_scales():
    model = two_adapters(ra=2, rb=3)
    da, db = deltas(model, "a"), deltas(model, "b")
    report = combine(model, {"a": 0.7, "b": -0.3}, method="cat", adapter="ab")
    new = deltas(model, "ab")
    for path in da:
        want = 0.7 * da[path] - 0.3 * db[path]
        torch.testing.assert_close(new[path], want, rtol=1e-13, atol=1e-13)
        assert report.ranks[path] == 5 and report.errors[path] < 1e-14
    layer = dict(lorakit.lora_layers(model))["q"]
    assert layer.scale["ab"] == 1.0 and layer.rank("ab") == 5
    assert lorakit.registry(model).active == ("b",)  # added inactive, like PEFT


def test_svd_is_the_best_rank_r_approximation_and_reports_its_error():
    model = two_adapters(ra=2, rb=3)
    da, db = deltas(model, "a"), deltas(model, "b")
    report = combine(model, {"a": 1.0, "b": 0.5}, method="svd", adapter="s", rank=2)
    new = deltas(model, "s")
    for path, layer in lorakit.lora_layers(model):
        target = da[path] + 0.5 * db[path]
        m = target.t() if isinstance(layer.base_layer, nn.Embedding) else target.reshape(target.shape[0], -1)
        sv = torch.linalg.svdvals(m)
        expected = math.sqrt(float((sv[2:] ** 2).sum() / (sv ** 2).sum()))  # Eckart-Young
        got = float(torch.linalg.norm(new[path] - target) / torch.linalg.norm(target))
        assert got == pytest.approx(expected, rel=1e-9)
        assert report.errors[path] == pytest.approx(expected, rel=1e-9)
        assert report.ranks[path] == 2


def peft_model(model, tmp_path, adapters):
    """The same adapters loaded into PEFT on a copy of the base model (float64 files)."""
    from peft import PeftModel
    for name in adapters:
        lorakit.save(model, tmp_path / name, adapter=name, dtype=F64)
    torch.manual_seed(123)
    base = Tiny().to(F64)
    base.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
                          if ".lora_" not in k})
    peft = PeftModel.from_pretrained(base, tmp_path / adapters[0], adapter_name=adapters[0])
    for name in adapters[1:]:
        peft.load_adapter(tmp_path / name, adapter_name=name)
    return peft


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def peft_delta(peft, path, adapter):
    layer = peft.base_model.model.get_submodule(path)
    return layer.get_delta_weight(adapter).to(F64)


@pytest.mark.parametrize("method,kw", [("cat", {}), ("svd", {"rank": 3}), ("linear", {}),
                                       ("ties", {"density": 0.5}), ("ties", {"density": 0.3, "majority_sign": "frequency"}),
                                       ("dare_linear", {"density": 0.6}), ("dare_ties", {"density": 0.6})])
def test_each_method_equals_peft_add_weighted_adapter(tmp_path, monkeypatch, method, kw):
    same_rank = method not in ("cat", "svd")
    model = two_adapters(ra=3, rb=3 if same_rank else 2)
    peft = peft_model(model, tmp_path, ["a", "b"])
    weights = {"a": 0.8, "b": -0.45}
    from peft.utils import merge_utils
    original, calls = merge_utils.random_pruning, []

    def seeded(*args, **kwargs):  # PEFT's DARE masks come from the global generator, after its adapter's
        if not calls:             # init has drawn from it: seed it at the first mask, as lorakit's seed=7
            torch.manual_seed(7)
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(merge_utils, "random_pruning", seeded)
    with default_dtype(F64):  # PEFT holds the weights in torch.tensor(weights): float32 would round them
        peft.add_weighted_adapter(list(weights), list(weights.values()), "new", combination_type=method,
                                  svd_rank=kw.get("rank"), density=kw.get("density"),
                                  majority_sign_method=kw.get("majority_sign", "total"))
    combine(model, weights, method=method, adapter="new", seed=7, **kw)
    ours = deltas(model, "new")
    assert len(calls) == (2 * 2 * len(TARGETS) if method.startswith("dare") else 0)  # A and B of a and b per module
    for path in TARGETS:
        torch.testing.assert_close(ours[path], peft_delta(peft, path, "new"), rtol=1e-10, atol=1e-10)


def test_linear_has_cross_terms_by_definition():
    """PEFT's 'linear' mixes A and B separately: B·A = (Σ√|wᵢsᵢ|Bᵢ)(Σ±√|wᵢsᵢ|Aᵢ), not Σ wᵢΔWᵢ."""
    model = two_adapters(ra=2, rb=2)
    layer = dict(lorakit.lora_layers(model))["q"]
    a, b = {n: layer.lora_A[n].detach() for n in "ab"}, {n: layer.lora_B[n].detach() for n in "ab"}
    w = {"a": 0.5 * layer.scale["a"], "b": -2.0 * layer.scale["b"]}
    want = (sum(math.sqrt(abs(w[n])) * b[n] for n in "ab")
            @ sum(math.copysign(math.sqrt(abs(w[n])), w[n]) * a[n] for n in "ab"))
    report = combine(model, {"a": 0.5, "b": -2.0}, method="linear", adapter="lin")
    torch.testing.assert_close(deltas(model, "lin")["q"], want, rtol=1e-12, atol=1e-12)
    assert report.errors["q"] > 0.1  # far from 0.5·ΔW_a − 2·ΔW_b, and reported so


def test_different_targets_are_refused_or_count_as_zero_like_peft(tmp_path):
    model = two_adapters(ra=2, rb=3, targets_b=["q", "conv"])
    before = state(model)
    with pytest.raises(lorakit.LoraError, match=r"different modules.*emb lacks \['b'\].*v lacks \['b'\]"):
        combine(model, {"a": 1.0, "b": 1.0}, method="cat", adapter="ab")
    assert_unchanged(model, before)
    peft = peft_model(model, tmp_path, ["a", "b"])
    peft.add_weighted_adapter(["a", "b"], [1.0, 0.5], "ab", combination_type="cat")
    combine(model, {"a": 1.0, "b": 0.5}, method="cat", adapter="ab", missing="zero")
    ours = deltas(model, "ab")
    for path in TARGETS:
        torch.testing.assert_close(ours[path], peft_delta(peft, path, "ab"), rtol=1e-12, atol=1e-12)
    assert dict(lorakit.lora_layers(model))["emb"].rank("ab") == 2 and dict(lorakit.lora_layers(model))["q"].rank("ab") == 5


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(method="cat"), r"emb: method 'cat' gives rank 10 .* > min\(d, k\) = 8 of its 8x10 update; use method 'svd'"),
    (dict(method="svd", rank=9), r"emb: rank 9 > min\(d, k\) = 8"),
    (dict(method="linear"), r"needs equal ranks, got \{'a': 5, 'b': 5\}|needs equal ranks"),
    (dict(method="ties"), r"needs density in \(0, 1\]"),
    (dict(method="ties", density=1.5), r"needs density in \(0, 1\]"),
    (dict(method="cat", density=0.5), r"density applies to"),
    (dict(method="cat", rank=2), r"rank= applies to method 'svd' only"),
    (dict(method="mean"), r"unknown method 'mean'; valid: cat, svd"),
    (dict(method="cat", adapter="a"), r"adapter 'a' already exists"),
    (dict(method="cat", adapter="a b"), r"adapter name 'a b' is invalid"),
])
def test_bad_input_is_refused_and_changes_nothing(kwargs, fragment):
    model = two_adapters(ra=5, rb=5)
    if kwargs.get("method") == "linear":  # equal ranks are fine for linear: make them differ on one module
        model = two_adapters(ra=2, rb=3)
        fragment = r"emb: method 'linear' mixes the factors element by element and needs equal ranks, got \{'a': 2, 'b': 3\}"
    before = state(model)
    with pytest.raises(lorakit.LoraError, match=fragment):
        combine(model, {"a": 1.0, "b": 1.0}, **kwargs)
    assert_unchanged(model, before)


def test_unknown_adapters_weights_and_saved_modules_are_refused():
    model = two_adapters()
    before = state(model)
    for weights, fragment in (({"a": 1.0, "zz": 1.0}, r"unknown adapter\(s\) \['zz'\]"),
                              ({}, "at least one adapter"), ({"a": float("nan")}, "finite number")):
        with pytest.raises(lorakit.LoraError, match=fragment):
            combine(model, weights)
    assert_unchanged(model, before)
    head = Tiny().to(F64)
    lorakit.inject(head, lorakit.LoraConfig(r=2, targets=["q"], modules_to_save=["v"]), adapter="a")
    lorakit.inject(head, lorakit.LoraConfig(r=2, targets=["q"]), adapter="b")
    with pytest.raises(lorakit.LoraError, match=r"modules_to_save: \['v'\]"):
        combine(head, {"a": 1.0, "b": 1.0})


def test_combined_adapter_saves_and_loads_as_a_normal_peft_file(tmp_path):
    model = two_adapters(ra=2, rb=3)
    combine(model, {"a": 0.7, "b": 0.3}, method="svd", adapter="ab", rank=4)
    lorakit.save(model, tmp_path / "ab", adapter="ab", dtype=F64)
    fresh = Tiny().to(F64)
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k})
    lorakit.load(fresh, tmp_path / "ab")
    lorakit.set_active(model, "ab")
    ids, img = torch.tensor([[1, 2, 3]]), torch.randn(1, 3, 5, 5, dtype=F64)
    assert torch.equal(model(ids, img), fresh(ids, img))
    peft = peft_model(model, tmp_path, ["ab"])  # PEFT reads it too: the same ΔW
    for path in TARGETS:
        torch.testing.assert_close(deltas(model, "ab")[path], peft_delta(peft, path, "ab"), rtol=1e-12, atol=1e-12)


# -- command line -------------------------------------------------------------------------------
def lorakit_cli(*args):
    return subprocess.run([sys.executable, "-m", "lorakit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def save_tiny_llama(folder):
    """A 1-layer Llama with SmolLM2's tokenizer (the command line loads both)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lorakit import builtin
    tok = AutoTokenizer.from_pretrained(builtin.smollm2_path())
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=32, max_position_embeddings=32)
                     ).save_pretrained(folder)
    return folder


def random_adapter(base_dir, out, r, targets, seed):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=2 * r, targets=targets))
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B["default"].normal_()
    lorakit.save(model, out)
    return model


def test_cli_combine_writes_the_exact_sum_and_refuses_bad_input_with_one_line(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lorakit.cli import COMBINE_METHODS, CONFIG_NAME, main
    from lorakit.ops.extraction import spectra
    assert COMBINE_METHODS == lorakit.ops.algebra.METHODS and CONFIG_NAME == lorakit.files.format.CONFIG_NAME
    base = save_tiny_llama(tmp_path / "base")
    ma = random_adapter(base, tmp_path / "a", 2, ["q_proj", "v_proj"], 1)
    mb = random_adapter(base, tmp_path / "b", 3, ["q_proj", "v_proj"], 2)
    assert main(["combine", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "0.7", "-0.3",
                 "--method", "cat", "--out", str(tmp_path / "ab"), "--table"]) == 0
    assert "model.layers.0.self_attn.q_proj" in capsys.readouterr().out  # --table: the per-module table
    fresh = lorakit.load(AutoModelForCausalLM.from_pretrained(base), tmp_path / "ab")
    for (path, la), (_, lb), (_, lc) in zip(lorakit.lora_layers(ma), lorakit.lora_layers(mb), lorakit.lora_layers(fresh)):
        want = 0.7 * textbook(la.base_layer, la.lora_A["default"].detach(), la.lora_B["default"].detach(), 1.0 * 2) \
            - 0.3 * textbook(lb.base_layer, lb.lora_A["default"].detach(), lb.lora_B["default"].detach(), 2.0)
        got = textbook(lc.base_layer, lc.lora_A["default"].detach(), lc.lora_B["default"].detach(), lc.scale["default"])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert lc.rank("default") == 5
    assert main(["inspect", str(tmp_path / "ab"), "--spectrum", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    assert "rank@0.9" in out and (tmp_path / "s.png").stat().st_size > 1000
    assert len(spectra(tmp_path / "ab")) == 2
    random_adapter(base, tmp_path / "c", 2, ["q_proj"], 3)
    for argv, fragment in (
            (["a", "b", "--weights", "1"], "--weights needs one weight per adapter: 2 adapters, 1 weights"),
            (["a", "c", "--weights", "1", "1"], "the adapters adapt different modules (1 not shared: "
                                                 "model.layers.0.self_attn.v_proj lacks ['a1']"),
            (["a", "b", "--weights", "1", "1", "--method", "ties"], "needs density in (0, 1]"),
            (["a", "nowhere", "--weights", "1", "1"], "not an adapter folder")):
        folders = [str(tmp_path / x) if x in ("a", "b", "c", "nowhere") else x for x in argv]
        capsys.readouterr()
        assert main(["combine", *folders, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1, err
        assert not (tmp_path / "bad").exists()


def test_peft_scales_the_result_by_sqrt_r_when_the_first_adapter_uses_rslora(tmp_path):
    """Documents the difference stated in README: PEFT copies the first adapter's use_rslora into the new
    adapter's config, so its ΔW is √r times Σ wᵢΔWᵢ; lorakit's new adapter has scale 1."""
    torch.manual_seed(0)
    model = Tiny().to(F64)
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, use_rslora=True, targets=TARGETS), adapter="a")
    lorakit.inject(model, lorakit.LoraConfig(r=3, alpha=5, targets=TARGETS), adapter="b")
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for n in layer.lora_A:
                layer.lora_A[n].normal_()
                layer.lora_B[n].normal_()
    peft = peft_model(model, tmp_path, ["a", "b"])
    with default_dtype(F64):
        peft.add_weighted_adapter(["a", "b"], [1.0, 1.0], "c", combination_type="cat")
    want = {p: deltas(model, "a")[p] + deltas(model, "b")[p] for p in TARGETS}
    combine(model, {"a": 1.0, "b": 1.0}, method="cat", adapter="c")
    for path in TARGETS:
        torch.testing.assert_close(deltas(model, "c")[path], want[path], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(peft_delta(peft, path, "c"), math.sqrt(5) * want[path], rtol=1e-12, atol=1e-12)


def test_new_adapter_selects_exactly_its_modules_when_a_path_is_also_a_suffix():
    """An adapter on 'q' alone (not on 'sub.q'): the combination's config must not select 'sub.q' too."""
    model = nn.Module()
    model.q, model.sub = nn.Linear(4, 4), nn.Module()
    model.sub.q = nn.Linear(4, 4)
    for name in ("a", "b"):
        lorakit.inject(model, lorakit.LoraConfig(r=1, targets=["(q)"]), adapter=name)
    report = combine(model, {"a": 1.0, "b": 1.0}, method="cat", adapter="ab")
    assert report.ranks == {"q": 2}
    assert [p for p, layer in lorakit.lora_layers(model)] == ["q"]


@pytest.mark.parametrize("command", ["combine", "extract", "inspect"])
def test_help_of_the_new_commands_states_each_default_once(command, capsys):
    from lorakit.cli import main
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    for chunk in text.split("--")[1:]:
        assert chunk.count("default") <= 1, chunk


def test_cat_and_svd_refuse_stacked_expert_weights_linear_combines_them():
    experts = nn.Module()
    experts.w = nn.Parameter(torch.randn(3, 6, 8, dtype=F64))
    model = nn.Module()
    model.experts = experts
    for name in ("a", "b"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_parameters=["experts.w"]), adapter=name)
    before = state(model)
    for method in ("cat", "svd"):
        with pytest.raises(lorakit.LoraError, match=f"experts: method '{method}' needs ΔW = B·A as one matrix"):
            combine(model, {"a": 1.0, "b": 1.0}, method=method)
    assert_unchanged(model, before)
    assert combine(model, {"a": 1.0, "b": 1.0}, method="linear", adapter="lin").ranks == {"experts": 2}
