"""Model-level behaviour: injection, targets and their errors, the registry, merge exactness.

Merge tolerance: merged outputs equal unmerged ones within fp32 1e-5, fp16 4e-3, bf16 3e-2
(relative to the output's magnitude); unmerge restores every weight bit for bit.
"""

import copy
import math

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig, LoraError

TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.conv = nn.Conv1d(d, d, 3, padding=1)

    def forward(self, x):
        h = self.query(x) * torch.sigmoid(self.key(x)) + self.value(x)
        return self.conv(h.transpose(1, 2)).transpose(1, 2)


class Net(nn.Module):
    def __init__(self, d=16, vocab=50):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d), Block(d)])
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = h + layer(h)
        return self.lm_head(self.norm(h))


def _randomise(model, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net()


IDS = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
ALL = ["embed", "query", "key", "value", "conv", "lm_head"]


# -- targets -----------------------------------------------------------------------------------
def test_suffix_regex_type_and_all_linear(net):
    def paths(cfg):
        m = copy.deepcopy(net)
        lorakit.inject(m, cfg)
        return sorted(lorakit.summary(m).modules)

    assert paths(LoraConfig(targets=["query"])) == ["layers.0.query", "layers.1.query"]
    assert paths(LoraConfig(targets=["layers.1.query"])) == ["layers.1.query"]
    assert paths(LoraConfig(targets=[r"layers\.0\.(key|value)"])) == ["layers.0.key", "layers.0.value"]
    assert paths(LoraConfig(targets=[nn.Conv1d])) == ["layers.0.conv", "layers.1.conv"]
    linears = sorted(f"layers.{i}.{n}" for i in range(2) for n in ("query", "key", "value"))
    assert paths(LoraConfig(targets="all-linear")) == linears  # lm_head (the output head) excluded
    assert paths(LoraConfig(targets="all-linear", exclude=["key"])) == sorted(p for p in linears if "key" not in p)


def test_unmatched_target_lists_close_names_and_changes_nothing(net):
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(LoraError, match=r"'querry'.*closest module names: query"):
        lorakit.inject(net, LoraConfig(targets=["value", "querry"]))
    with pytest.raises(LoraError, match="matches no module"):
        lorakit.inject(net, LoraConfig(targets=[nn.GRU]))
    assert not any(isinstance(m, lorakit.LoraLayer) for m in net.modules())
    assert not lorakit.state.has_adapters(net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.requires_grad for p in net.parameters())


def test_unsupported_module_type_is_named(net):
    with pytest.raises(LoraError, match=r"layers.0 of type Block.*target_parameters"):
        lorakit.inject(net, LoraConfig(targets=[r"layers\.\d"]))
    with pytest.raises(LoraError, match=r"norm of type LayerNorm"):
        lorakit.inject(net, LoraConfig(targets=["norm"]))


@pytest.mark.parametrize("kwargs,message", [
    (dict(r=0, targets=["q"]), "r must be an integer >= 1"),
    (dict(r=2.5, targets=["q"]), "r must be an integer >= 1"),
    (dict(alpha=0, targets=["q"]), "alpha must be"),
    (dict(dropout=1.0, targets=["q"]), r"dropout must be in \[0, 1\)"),
    (dict(init="xavier", targets=["q"]), "valid inits are: kaiming, gaussian, normal"),
    (dict(), "needs targets"),
    (dict(targets=["q"], rank_pattern={"q": 0}), "rank_pattern"),
    (dict(targets=["q"], rank_pattern={"(": 2}), "not a valid regex"),
    (dict(targets=[3]), "targets entries must be"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(LoraError, match=message):
        LoraConfig(**kwargs)


def test_config_is_immutable():
    cfg = LoraConfig(targets=["q"], rank_pattern={"q": 4})
    with pytest.raises(Exception):
        cfg.r = 4
    with pytest.raises(TypeError):
        cfg.rank_pattern["k"] = 2


def test_rank_and_alpha_patterns(net):
    cfg = LoraConfig(r=4, alpha=8, targets=["query", "value"], rank_pattern={r"layers\.1\.query": 2},
                     alpha_pattern={"value": 1})
    lorakit.inject(net, cfg)
    layers = dict(lorakit.lora_layers(net))
    assert layers["layers.0.query"].lora_A["default"].shape[0] == 4
    assert layers["layers.1.query"].lora_A["default"].shape[0] == 2
    assert layers["layers.1.query"].scale["default"] == 8 / 2
    assert layers["layers.0.value"].scale["default"] == 1 / 4


# -- registry, freezing, summary ------------------------------------------------------------------
def test_freezing_and_summary_counts(net):
    total = sum(p.numel() for p in net.parameters())
    lorakit.inject(net, LoraConfig(r=3, targets=["query", "embed", "conv"]))
    d, vocab = 16, 50
    expected = 2 * (d + d) * 3 + (vocab + d) * 3 + 2 * (d * 3 + d) * 3  # (in+out)*r per module
    s = lorakit.summary(net)
    assert s.trainable == expected == sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert s.total == total + expected
    assert "trainable params" in str(s) and "layers.0.query: default r=3" in str(s)


def test_second_adapter_active_sets_and_sums(net):
    lorakit.inject(net, LoraConfig(r=2, targets=["query"]), adapter="a")
    lorakit.inject(net, LoraConfig(r=3, targets=["query", "value"]), adapter="b")
    _randomise(net)
    with lorakit.disabled(net):
        base = net(IDS)
    lorakit.set_active(net, "a")
    ya = net(IDS)
    lorakit.set_active(net, "b")
    yb = net(IDS)
    lorakit.set_active(net, ["a", "b"])
    yab = net(IDS)
    assert lorakit.registry(net).active == ("a", "b")
    # the deltas of all active adapters add up (checked at layer level against W + ΔW_a + ΔW_b)
    q = dict(lorakit.lora_layers(net))["layers.0.query"]
    x = torch.randn(3, 16)
    ref = x @ (q.base_layer.weight + q.delta("a") + q.delta("b")).t() + q.base_layer.bias
    torch.testing.assert_close(q(x), ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ya, base) and not torch.allclose(yb, ya) and not torch.allclose(yab, yb)
    # inactive adapters are frozen, active ones train
    lorakit.set_active(net, "a")
    assert q.lora_A["a"].requires_grad and not q.lora_A["b"].requires_grad
    with pytest.raises(LoraError, match=r"unknown adapter\(s\) \['c'\]; the model has: \['a', 'b'\]"):
        lorakit.set_active(net, ["a", "c"])
    with pytest.raises(LoraError, match="already exists"):
        lorakit.inject(net, LoraConfig(targets=["key"]), adapter="a")
    with pytest.raises(LoraError, match="adapter name"):
        lorakit.inject(net, LoraConfig(targets=["key"]), adapter="x.y")


def test_disabled_restores_after_exception(net):
    lorakit.inject(net, LoraConfig(targets=ALL))
    _randomise(net)
    adapted = net(IDS)
    with pytest.raises(RuntimeError):
        with lorakit.disabled(net):
            raise RuntimeError("boom")
    torch.testing.assert_close(net(IDS), adapted, rtol=0, atol=0)
    lorakit.merge(net)
    with lorakit.disabled(net):  # temporarily unmerged, re-merged on exit
        plain = net(IDS)
    lorakit.unmerge(net)
    with lorakit.disabled(net):
        torch.testing.assert_close(net(IDS), plain, rtol=0, atol=0)


def test_delete_restores_original_modules(net):
    original = copy.deepcopy(net)
    lorakit.inject(net, LoraConfig(targets=["query"]), adapter="a")
    lorakit.inject(net, LoraConfig(targets=["query", "value"]), adapter="b")
    lorakit.delete(net, "b")
    assert isinstance(net.layers[0].value, nn.Linear) and isinstance(net.layers[0].query, lorakit.LoraLayer)
    assert lorakit.registry(net).active == ()
    lorakit.delete(net, "a")
    assert not lorakit.state.has_adapters(net)
    assert net.state_dict().keys() == original.state_dict().keys()
    assert all(p.requires_grad for p in net.parameters())
    with pytest.raises(LoraError, match="no lorakit adapters"):
        lorakit.delete(net, "a")


# -- merge ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(TOL))
def test_merge_unmerge_is_bit_exact_over_many_cycles(net, dtype):
    net = net.to(dtype)
    lorakit.inject(net, LoraConfig(r=4, targets=ALL))
    lorakit.inject(net, LoraConfig(r=2, targets=["query"]), adapter="b")
    lorakit.set_active(net, ["default", "b"])
    _randomise(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    unmerged = net(IDS)
    for _ in range(25):
        lorakit.merge(net)
        merged = net(IDS)
        lorakit.unmerge(net)
    after = net.state_dict()
    drift = max((after[k].double() - v.double()).abs().max().item() for k, v in before.items())
    assert drift == 0.0 and all(torch.equal(after[k], v) for k, v in before.items())
    err = (merged.double() - unmerged.double()).abs().max().item()
    assert err <= TOL[dtype] * 10 * max(unmerged.abs().max().item(), 1.0)  # 10: depth of the net
    assert not torch.equal(merged, net.lm_head.base_layer(torch.zeros(1, 16, dtype=dtype)))


LOW = [torch.bfloat16, torch.float16, torch.float32]


def _one_rounding(weight, a, b, scale, transposed, sign=1):
    """The oracle: W ± s·B·A in float64 (textbook), rounded once to W's dtype."""
    d = scale * (b.double().flatten(1) @ a.double().flatten(1))
    d = (d.t() if transposed else d).reshape(weight.shape)
    return (weight.double() + sign * d).to(weight.dtype)


@pytest.mark.parametrize("factor_dtype", LOW)
@pytest.mark.parametrize("weight_dtype", LOW)
def test_merge_and_subtractive_unmerge_round_once(net, weight_dtype, factor_dtype):
    """"inject, then model.to(low precision)": merged W equals one rounding of W + s·B·A, bit for bit,
    for every kind (Embedding, Linear, Conv1d); so does W_merged − s·B·A when unmerging by subtraction."""
    lorakit.inject(net, LoraConfig(r=4, alpha=6.0, targets=ALL))
    _randomise(net)
    net.to(weight_dtype)
    layers = dict(lorakit.lora_layers(net))
    for layer in layers.values():
        for p in (layer.lora_A["default"], layer.lora_B["default"]):
            p.data = p.data.to(factor_dtype)
    before = {k: l.weight.detach().clone() for k, l in layers.items()}
    fac = lambda l: (l.lora_A["default"].detach(), l.lora_B["default"].detach(), 6.0 / 4,  # noqa: E731
                     isinstance(l.base_layer, nn.Embedding))
    lorakit.merge(net, keep_copy=False)
    merged = {k: l.weight.detach().clone() for k, l in layers.items()}
    for k, layer in layers.items():
        expected = _one_rounding(before[k], *fac(layer))
        assert merged[k].dtype == weight_dtype
        assert torch.equal(merged[k], expected), \
            f"{k}: {(merged[k] != expected).float().mean().item():.1%} of elements differ from one rounding"
    lorakit.unmerge(net)
    for k, layer in layers.items():
        assert torch.equal(layer.weight, _one_rounding(merged[k], *fac(layer), sign=-1)), k


def test_inexact_merge_is_an_explicit_option(net):
    net = net.to(torch.bfloat16)
    lorakit.inject(net, LoraConfig(r=4, targets=["query"]))
    _randomise(net, std=1.0)
    w0 = net.layers[0].query.base_layer.weight.clone()
    for _ in range(20):
        lorakit.merge(net, keep_copy=False)
        assert net.layers[0].query._original is None  # no copy kept
        lorakit.unmerge(net)
    drift = (net.layers[0].query.base_layer.weight.double() - w0.double()).abs().max().item()
    assert drift > 0  # documented: subtraction drifts in bf16 (why keep_copy=True is the default)


def test_merge_exact_is_the_deprecated_name_of_keep_copy(net):
    lorakit.inject(net, LoraConfig(r=4, targets=["query"]))
    for exact in (True, False):
        with pytest.warns(DeprecationWarning, match=r"merge\(exact=...\) is deprecated; use keep_copy"):
            lorakit.merge(net, exact=exact)
        assert (net.layers[0].query._original is not None) is exact
        lorakit.unmerge(net)


def test_merge_misuse_is_refused(net):
    lorakit.inject(net, LoraConfig(targets=["query"]))
    lorakit.merge(net)
    with pytest.raises(LoraError, match="already merged"):
        lorakit.merge(net)
    for action in (lambda: lorakit.set_active(net, "default"),
                   lambda: lorakit.inject(net, LoraConfig(targets=["key"]), adapter="k"),
                   lambda: lorakit.delete(net, "default")):
        with pytest.raises(LoraError, match="unmerge"):
            action()
    lorakit.unmerge(net)
    with pytest.raises(LoraError, match="nothing is merged"):
        lorakit.unmerge(net)
    lorakit.set_active(net, [])
    with pytest.raises(LoraError, match="no active adapter"):
        lorakit.merge(net)


def test_merge_into_tied_weight_is_refused(net):
    net.lm_head.weight = net.embed.weight  # tie, as many LMs do
    lorakit.inject(net, LoraConfig(targets=["lm_head"]))
    with pytest.raises(LoraError, match=r"shared by .*embed.weight"):
        lorakit.merge(net)
    assert lorakit.registry(net).merged == ()


def test_merge_and_unload_gives_the_plain_model(net):
    keys = list(net.state_dict())
    lorakit.inject(net, LoraConfig(targets=ALL))
    lorakit.inject(net, LoraConfig(targets=["value"]), adapter="b")
    lorakit.set_active(net, ["default", "b"])
    _randomise(net)
    adapted = net(IDS)
    plain = lorakit.merge_and_unload(net)
    assert plain is net and list(plain.state_dict()) == keys
    assert not any(isinstance(m, lorakit.LoraLayer) for m in plain.modules())
    assert all(p.requires_grad for p in plain.parameters())
    err = (plain(IDS) - adapted).abs().max().item()
    assert err <= TOL[torch.float32] * 10 * adapted.abs().max().item()  # fp32 merge rounding, depth 10


def test_raw_parameter_merge_roundtrip():
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 6, 5))  # 4 experts, each (out 6, in 5)

        def forward(self, x):
            return torch.einsum("bi,eoi->beo", x, self.w)

    torch.manual_seed(0)
    model = nn.Sequential(Experts())
    x = torch.randn(3, 5)
    w0 = model[0].w.detach().double().clone()
    lorakit.inject(model, LoraConfig(r=2, alpha=2, target_parameters=["w"]))
    _randomise(model)
    layer = model[0]
    a, b = layer.lora_A["default"].double(), layer.lora_B["default"].double()
    assert a.shape == (8, 5) and b.shape == (6, 8)  # PEFT's layout: A (E·r, in), B (out, E·r)
    # expert e: A's rows 2e, 2e+1 and B's columns e, 4+e (PEFT's ParamWrapper)
    delta = torch.stack([b[:, [e, 4 + e]] @ a[2 * e:2 * e + 2] for e in range(4)])
    ref = torch.einsum("bi,eoi->beo", x.double(), w0 + delta)
    torch.testing.assert_close(model(x).double(), ref, atol=1e-5, rtol=1e-5)
    lorakit.merge(model)
    torch.testing.assert_close(model(x).double(), ref, atol=1e-5, rtol=1e-5)
    lorakit.unmerge(model)
    assert torch.equal(layer.base_layer.w.double(), w0)
    with pytest.raises(LoraError, match="dropout is not supported on raw parameters"):
        lorakit.inject(nn.Sequential(Experts()), LoraConfig(target_parameters=["w"], dropout=0.1))
    with pytest.raises(LoraError, match=r"'ww' matches no parameter.*closest parameter names: .*w"):
        lorakit.inject(nn.Sequential(Experts()), LoraConfig(target_parameters=["ww"]))


class _Symmetric(nn.Module):
    """A parametrization that is not onto: W + ΔW has no exact preimage in general."""

    def forward(self, w):
        return w.triu() + w.triu(1).t()


@pytest.mark.parametrize("cfg,message", [
    (LoraConfig(targets=["query"]), r"layers.0.query.weight is computed by a parametrization \(_Symmetric\).*"
                                    r"remove_parametrizations\(model.layers.0.query, 'weight'\)"),
    (LoraConfig(target_parameters=["layers.0.query.weight"]), r"layers.0.query.weight is computed by a param"),
    (LoraConfig(target_parameters=["query.parametrizations.weight.original"]),
     r"belongs to the parametrization layers.0.query.parametrizations.weight"),
])
def test_parametrized_weight_is_refused_at_inject(net, cfg, message):
    """A merge into a parametrized weight cannot be exact (only `original` can be written), so both
    routes refuse before changing anything; with the parametrization removed as the error says, the
    merge is exact."""
    from torch.nn.utils import parametrize
    parametrize.register_parametrization(net.layers[0].query, "weight", _Symmetric())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(LoraError, match=message):
        lorakit.inject(net, cfg)
    assert not any(isinstance(m, lorakit.LoraLayer) for m in net.modules())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    w = net.layers[0].query.weight.detach().clone()
    parametrize.remove_parametrizations(net.layers[0].query, "weight")
    lorakit.inject(net, LoraConfig(r=2, alpha=2, targets=["layers.0.query"]))
    _randomise(net)
    layer = net.layers[0].query
    lorakit.merge(net)
    delta = layer.lora_B["default"].double() @ layer.lora_A["default"].double()
    assert torch.equal(layer.weight, (w.double() + delta).float())


def test_embedding_with_max_norm_is_refused():
    with pytest.raises(LoraError, match="max_norm"):
        lorakit.inject(nn.Sequential(nn.Embedding(5, 4, max_norm=1.0)), LoraConfig(targets=["0"]))


def test_works_under_torch_compile_and_deepcopy(net):
    lorakit.inject(net, LoraConfig(targets=ALL))
    _randomise(net)
    ref = net(IDS)
    twin = copy.deepcopy(net)
    torch.testing.assert_close(twin(IDS), ref, rtol=0, atol=0)
    assert twin.layers[0].query.kind is net.layers[0].query.kind  # kinds stay singletons
    compiled = torch.compile(net)
    torch.testing.assert_close(compiled(IDS), ref, atol=1e-5, rtol=1e-5)
    assert math.isclose(lorakit.summary(compiled).trainable, lorakit.summary(net).trainable)


def test_no_graph_breaks_in_lora_layers(net):
    lorakit.inject(net, LoraConfig(targets=ALL, dropout=0.1))
    lorakit.inject(net, LoraConfig(targets=["query"]), adapter="b")
    lorakit.set_active(net, ["default", "b"])
    for grad in (True, False):
        torch._dynamo.reset()
        with torch.set_grad_enabled(grad):
            explanation = torch._dynamo.explain(net)(IDS)
        assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.slow
def test_no_graph_breaks_on_minilm():
    from transformers import AutoModel

    from lorakit.builtin import minilm_path
    model = AutoModel.from_pretrained(minilm_path())
    lorakit.inject(model, LoraConfig(r=8, targets="all-linear"))
    ids = torch.randint(1000, 2000, (2, 16))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=ids)
    lora_breaks = [r for r in explanation.break_reasons if "lorakit" in str(r)]
    assert not lora_breaks, lora_breaks
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state,
                               atol=1e-4, rtol=1e-4)


def test_registry_repr_names_adapters_without_dumping_tensors():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2))
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["0"]), adapter="task")
    text = repr(lorakit.registry(model))
    assert "task" in text and "tensor(" not in text and "Parameter" not in text and len(text) < 1500


def test_one_adapter_name_rule_for_the_library_and_the_server(net):
    """inject and the server's check_name accept exactly the same names (they used to differ: the
    library refused '1st' and accepted 'café' and 200-character names, the server the opposite)."""
    from lorakit.serve.adapters import AdapterError, check_name

    for name in ("a", "1st", "_x-2", "x" * 128, "café", "x" * 129, "a.b", "a b", "", "a/b"):
        try:
            check_name(name)
            served = True
        except AdapterError:
            served = False
        try:
            lorakit.inject(net, LoraConfig(targets=["key"]), adapter=name)
            lorakit.delete(net, name)
            injected = True
        except LoraError as e:
            assert "adapter name" in str(e)
            injected = False
        assert served == injected == (name in ("a", "1st", "_x-2", "x" * 128)), name


@pytest.mark.parametrize("name", ["half", "to", "training", "forward", "parameters"])
def test_adapter_names_that_are_module_attributes_are_refused_by_name(name):
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(LoraError, match=f"{name!r} is the name of a torch module attribute"):
        lorakit.inject(net, LoraConfig(r=2, targets=["0"]), adapter=name)
    assert not lorakit.state.has_adapters(net) and type(net[0]) is nn.Linear
