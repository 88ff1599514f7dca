"""The layer-kind registry: a user's own layer, registered from this file alone, gets inject /
train / merge / save / load / mixed batches without any change to lorakit.

Oracles: the textbook float64 formula gain·x·(W + s·B·A)ᵀ from the factor values, and each row
of a mixed batch run alone with its adapter active.
"""

import math
import subprocess
import sys

import pytest
import torch
from test_layers import _randomise  # every factor non-zero, seeded
from torch import nn

import lorakit
from lorakit import LoraConfig, LoraError


class ScaledLinear(nn.Module):
    """A user's layer lorakit has never heard of: y = gain · x·Wᵀ (no nn.Linear inside)."""

    def __init__(self, inp: int, out: int, gain: float = 2.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out, inp) / math.sqrt(inp))
        self.gain = gain

    def forward(self, x):
        return self.gain * (x @ self.weight.t())


class ScaledKind(lorakit.Kind):
    """Its kind: PEFT-style factors A (r, in), B (out, r); a fast forward that never builds ΔW."""

    name = "scaled_linear"
    supports_dropout = True
    all_linear = True

    def forward(self, layer, names, x, *args, **kwargs):
        base = layer.base_layer
        result = base(x)
        for n in names:
            a, b = layer.lora_A[n], layer.lora_B[n]
            result = result + base.gain * layer.scale[n] * (layer.dropped(x, n) @ a.t() @ b.t())
        return result


lorakit.register_kind(ScaledLinear, ScaledKind())


class Net(nn.Module):
    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.proj = ScaledLinear(d, d)
        self.out = ScaledLinear(d, 3, gain=0.5)

    def forward(self, x):
        return self.out(torch.tanh(self.proj(x)))


def _oracle(net, x, adapters):
    """float64 textbook forward of Net with the updates of ``adapters`` (None: the base)."""
    def layer(path, h):
        w = getattr(net, path).base_layer if hasattr(getattr(net, path), "base_layer") else getattr(net, path)
        w64 = w.weight.detach().double()
        for a in adapters:
            lora = dict(lorakit.lora_layers(net)).get(path)
            if lora is not None and a in lora.lora_A:
                w64 = w64 + lora.scale[a] * lora.lora_B[a].detach().double() @ lora.lora_A[a].detach().double()
        return w.gain * (h @ w64.t())
    return layer("out", torch.tanh(layer("proj", x.double())))


def test_a_users_kind_injects_trains_merges_saves_loads_and_mixes(tmp_path):
    torch.manual_seed(0)
    net, x = Net(), torch.randn(4, 5, 6)
    lorakit.inject(net, LoraConfig(r=2, alpha=4, targets=[ScaledLinear]), adapter="a")
    lorakit.inject(net, LoraConfig(r=3, alpha=3, targets=["proj"]), adapter="b", activate=False)
    assert {p: layer.kind.name for p, layer in lorakit.lora_layers(net)} == {"proj": "scaled_linear",
                                                                          "out": "scaled_linear"}
    _randomise(net, 1)

    # forward = the formula; training gives gradients to A and B of the active adapter only
    out = net(x)
    assert (out.double() - _oracle(net, x, ["a"])).abs().max() < 1e-5
    out.square().sum().backward()
    proj = dict(lorakit.lora_layers(net))["proj"]
    assert proj.lora_A["a"].grad is not None and proj.lora_B["a"].grad.abs().sum() > 0
    assert proj.lora_A["b"].grad is None and proj.base_layer.weight.grad is None

    # merge / unmerge: merged output = the formula, unmerge restores W bit for bit
    w0, expected = proj.base_layer.weight.detach().clone(), _oracle(net, x, ["a"])
    with torch.no_grad():
        lorakit.merge(net)
        assert (net(x).double() - expected).abs().max() < 1e-5
        lorakit.unmerge(net)
    assert torch.equal(proj.base_layer.weight, w0)

    # save / load into a fresh model: PEFT's key names, the same outputs bit for bit
    lorakit.save(net, tmp_path / "a", adapter="a")
    fresh = Net()
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in net.state_dict().items()
                           if "lora_" not in k})
    lorakit.load(fresh, tmp_path / "a", adapter="a")
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))

    # mixed batch: each row as if run alone with its adapter (the kind's forward, per group)
    with torch.no_grad():
        with lorakit.mixed(net, ["a", "b", None, "a"]):
            mixed = net(x)
        for i, name in enumerate(["a", "b", None, "a"]):
            assert (mixed[i].double() - _oracle(net, x[i:i + 1], [name] if name else [])[0]).abs().max() < 1e-5


def test_all_linear_selects_a_kind_that_says_so():
    torch.manual_seed(0)
    net = Net()
    lorakit.inject(net, LoraConfig(r=2, targets="all-linear"))
    assert sorted(p for p, _ in lorakit.lora_layers(net)) == ["out", "proj"]


def test_most_specific_registration_wins_and_a_resolver_may_defer():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Tagged(nn.Linear):
        pass

    doubled = ScaledKind()
    lorakit.register_kind(Doubled, doubled)
    lorakit.register_kind(Tagged, lambda m: None)  # no opinion: nn.Linear's kind applies
    assert lorakit.kind_of(Doubled(2, 2)) is doubled
    assert lorakit.kind_of(Tagged(2, 2)).name == "linear"
    assert lorakit.kind_of(nn.Linear(2, 2)).name == "linear"
    assert lorakit.kind_of(nn.ReLU()) is None


def test_register_kind_refuses_what_is_not_a_module_type_or_a_kind():
    with pytest.raises(LoraError, match="module_type must be an nn.Module subclass"):
        lorakit.register_kind(int, ScaledKind())
    with pytest.raises(LoraError, match="kind must be a lorakit.Kind"):
        lorakit.register_kind(ScaledLinear, "linear")


def test_an_unregistered_module_names_the_registry():
    net = nn.Sequential(nn.ReLU())
    with pytest.raises(LoraError, match=r"not a supported layer \(nn.Linear.*register_kind"):
        lorakit.inject(net, LoraConfig(r=2, targets=["0"]))


def test_transformers_conv1d_is_registered_by_name_without_importing_transformers():
    code = ("import sys, lorakit; assert 'transformers' not in sys.modules; "
            "from transformers.pytorch_utils import Conv1D; assert lorakit.kind_of(Conv1D(4, 3)).name == 'conv1d_hf'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_kind_can_refuse_merge_and_nothing_is_merged():
    class Packed(ScaledLinear):
        pass

    class NoMerge(ScaledKind):
        def check_merge(self, base, path):
            raise LoraError(f"cannot merge into {path}: packed")

    lorakit.register_kind(Packed, NoMerge())
    torch.manual_seed(0)
    net = nn.Sequential(ScaledLinear(4, 4), Packed(4, 4))
    lorakit.inject(net, LoraConfig(r=2, targets=["0", "1"]))
    _randomise(net, 2)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(LoraError, match="cannot merge into 1: packed"):
        lorakit.merge(net)
    assert lorakit.registry(net).merged == () and all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


class _ScaledEmbedding(nn.Embedding):
    """Gemma 3's TextScaledWordEmbedding as transformers writes it: the lookup times a scalar buffer."""

    def __init__(self, num: int, dim: int, scale: float) -> None:
        super().__init__(num, dim)
        self.register_buffer("embed_scale", torch.tensor(scale), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_scaled_embedding_scales_the_update_like_the_merged_weight(dtype):
    # Oracle: the float64 lookup of W + s·(B·A)ᵀ times the scale; merged, unmerged, each mixed row and
    # PEFT (which applies embed_scale to the update too) must all give it.
    torch.manual_seed(0)
    net = nn.Sequential(_ScaledEmbedding(50, 16, scale=4.0)).to(dtype)
    ids = torch.randint(0, 50, (3, 7))
    lorakit.inject(net, LoraConfig(r=4, targets=["0"]))
    lorakit.inject(net, LoraConfig(r=2, targets=["0"]), adapter="b", activate=False)
    _randomise(net, 1)
    layer = net[0]

    def oracle(name):
        w = layer.weight.double() + layer.delta(name, compute=torch.float64)
        return (w[ids] * 4.0).to(dtype)

    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=2e-2)
    with torch.no_grad():
        unmerged = net(ids)
        torch.testing.assert_close(unmerged, oracle("default"), **tol)
        without_scale = (layer.weight.double()[ids] * 4.0 + (layer.delta("default", compute=torch.float64))[ids])
        assert (unmerged.double() - without_scale).abs().max() > 10 * tol["atol"]  # the scale matters here
        with lorakit.mixed(net, ["b", None, "default"]):
            rows = net(ids)
        for i, name in enumerate(["b", None, "default"]):
            expected = (layer.weight.double()[ids[i]] * 4.0).to(dtype) if name is None else oracle(name)[i]
            torch.testing.assert_close(rows[i], expected, **tol)
        lorakit.merge(net)
        torch.testing.assert_close(net(ids), unmerged, **tol)
        lorakit.unmerge(net)


def test_a_scaled_embedding_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = nn.Sequential(_ScaledEmbedding(50, 16, scale=4.0))
    base = {k: v.clone() for k, v in net.state_dict().items()}
    lorakit.inject(net, LoraConfig(r=4, targets=["0"]))
    _randomise(net, 1)
    lorakit.save(net, tmp_path)
    ids = torch.randint(0, 50, (3, 7))
    fresh = nn.Sequential(_ScaledEmbedding(50, 16, scale=4.0))
    fresh.load_state_dict(base)
    theirs = peft.PeftModel.from_pretrained(fresh, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(net(ids), theirs(ids), atol=1e-5, rtol=1e-5)


def test_a_scaled_embedding_with_a_vector_scale_is_refused():
    net = nn.Sequential(_ScaledEmbedding(50, 16, scale=4.0))
    net[0].embed_scale = torch.ones(16)
    with pytest.raises(LoraError, match="embed_scale has shape"):
        lorakit.inject(net, LoraConfig(r=4, targets=["0"]))
    assert not isinstance(net[0], lorakit.LoraLayer)
