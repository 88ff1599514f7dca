"""Compatibility with real PEFT (``peft==0.21.*``), in both directions, on real models.

For every model/config below:

* PEFT -> lorakit: ``peft.get_peft_model(base, peft.LoraConfig(..., init_lora_weights=False))``
  (random non-zero A *and* B), ``save_pretrained``, ``lorakit.load`` into a fresh copy of the base
  model, compare outputs.
* lorakit -> PEFT: ``lorakit.inject``, set every A and B to random non-zero values, ``lorakit.save``,
  ``peft.PeftModel.from_pretrained`` on a fresh copy of the base model, compare outputs.
* The files: lorakit's keys are set-equal to PEFT's keys for the same config with equal shapes per
  key; re-saving a PEFT adapter through lorakit reproduces PEFT's tensors bit for bit;
  adapter_config.json carries r, lora_alpha, an explicit target_modules list, use_rslora,
  rank_pattern, alpha_pattern and fan_in_fan_out, and PEFT reading it builds LoRA layers on exactly
  the same modules with the same rank and the same scaling as lorakit.

Tolerance: neither library is the other's reference. Both run in fp32 and round in different
orders (lorakit computes the thin products as (A·xᵀ)ᵀ and accumulates bias, base and update in one
addmm chain, PEFT runs separate ops), so each is compared with a float64 oracle: the same model
and adapter run in float64 (PEFT's model converted with ``.double()``). The allowed error is
``OUT_FACTOR`` times the error of a plain fp32 computation of the same function (the adapter merged
into the weights in float64, rounded once to fp32, run in fp32), which is what fp32 rounding alone
costs on that network and those inputs (plus eps_fp32 x the largest output, for a computation that
happens to round exactly). Merged weights are compared with W + s·B·A in float64 within the
textbook bound for evaluating that sum in fp32 (:func:`_merge_bound`). ``lorakit.unmerge`` must
restore the base weights bit for bit.

Trainable parameters (``lorakit.summary(m).trainable`` == PEFT's ``get_nb_trainable_parameters()[0]``):
MiniLM query+value r=8: 73,728; SmolLM2-135M all-linear r=8: 2,442,240.

Models: all-MiniLM-L6-v2 (``AutoModel``), SmolLM2-135M-Instruct (``slow``), a tiny random GPT-2
(transformers ``Conv1D``, no download) and a toy ``nn.Conv2d`` network (stride 2, padding 1).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import lorakit  # noqa: E402
from lorakit import builtin  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
# fp32 outputs may be this many times further from the float64 oracle than a plain fp32 forward of the
# same function (measured over this file's fast cases, lorakit and PEFT alike, 2 threads: at most
# 1.44x; MiniLM patterns+rslora: 1.15e-5 against a plain 1.26e-5). A real difference moves outputs by far
# more: one MiniLM layer's scaling off by 0.1% gives 5e-3, 100x this bound; each test also checks that
# the adapter changes the output by > 1e-3.
OUT_FACTOR = 4
MINILM_QV_R8_TRAINABLE = 73_728  # 6 layers x {query, value} x (8*384 + 384*8)
SMOLLM2_ALL_LINEAR_R8_TRAINABLE = 2_442_240  # 30 layers x (q,k,v,o,gate,up,down) A+B


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about custom models, fan_in_fan_out, ...
        yield


# -- helpers ------------------------------------------------------------------------------------
class Oracle:
    """The float64 reference for what PEFT model ``pm`` computes with ``run``: ``pm`` (base and adapter)
    converted to float64, and ``plain_err``, the error of a plain fp32 computation of the same function
    (the adapter merged into the weights in float64, rounded once to fp32, run in fp32)."""

    def __init__(self, pm, run):
        pm64 = _floating_inputs_as(copy.deepcopy(pm).double(), torch.float64)
        self.layers = {name[len("base_model.model."):]: m for name, m in pm64.named_modules()
                       if isinstance(m, peft.tuners.lora.LoraLayer)}
        with torch.no_grad():
            self.out = run(pm64)
            plain = _floating_inputs_as(copy.deepcopy(pm64).merge_and_unload().float(), torch.float32)
            self.plain_err = (run(plain).double() - self.out).abs().max().item()

    def check(self, actual):
        """fp32 ``actual`` is as close to the float64 output as fp32 rounding allows (OUT_FACTOR, above)."""
        assert actual.dtype == torch.float32 and actual.shape == self.out.shape
        err = (actual.double() - self.out).abs().max().item()
        bound = OUT_FACTOR * self.plain_err + EPS32 * self.out.abs().max().item()
        assert err <= bound, f"max |fp32 - float64 oracle| {err:.3g} > {bound:.3g} (plain fp32: {self.plain_err:.3g})"

    def check_merged(self, path, weight):
        """fp32 merged ``weight`` of layer ``path`` against W + s·B·A in float64 (:func:`_merge_bound`)."""
        layer = self.layers[path]
        with torch.no_grad():
            want = _base_weight(layer) + layer.get_delta_weight("default")  # W + s·B·A, float64, PEFT's layout
        assert weight.dtype == torch.float32 and weight.shape == want.shape
        err = (weight.detach().double() - want).abs().max().item()
        bound = _merge_bound(layer)
        assert err <= bound, f"{path}: max |merged - float64| {err:.3g} > {bound:.3g}"


def _floating_inputs_as(model, dtype):
    """``model``, its floating-point inputs (``run``'s fp32 tensors) converted to ``dtype`` as it is called."""
    cast = lambda v: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
    model.register_forward_pre_hook(
        lambda _, args, kwargs: (tuple(map(cast, args)), {k: cast(v) for k, v in kwargs.items()}), with_kwargs=True)
    return model


def _base_weight(layer) -> torch.Tensor:
    """The weight a PEFT LoRA layer adapts (a raw parameter for ``target_parameters``)."""
    return layer.get_param() if hasattr(layer, "get_param") else layer.get_base_layer().weight


def _merge_bound(layer) -> float:
    """Bound on the error of W + s·B·A evaluated in fp32 (ΔW in fp32, then the sum, as PEFT does; rounded
    once from float64, as lorakit does, is within it): each ΔW entry is a sum of n = A.shape[0] products
    (r, or experts x r for stacked parameters), so |error| <= (n + 2)·eps_fp32·(max|W| + |s|·n·max|B|·max|A|)."""
    if "default" in layer.lora_embedding_A:  # an embedding: its factors are parameters
        a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    else:
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    n = a.shape[0]
    w = _base_weight(layer).abs().max().item()
    return (n + 2) * EPS32 * (w + abs(layer.scaling["default"]) * n * b.abs().max().item() * a.abs().max().item())


def _file_shapes(directory) -> dict[str, tuple[int, ...]]:
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _randomize(model, seed=0, std=0.05):
    """Give every lorakit factor (A *and* B, embeddings included) random non-zero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for name in layer.lora_A:
                for p in (layer.lora_A[name], layer.lora_B[name]):
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def _peft_layers(pm) -> dict[str, tuple[int, float]]:
    """{module path: (rank, scaling)} of PEFT's LoRA layers, paths in the base model's naming."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    prefix = "base_model.model."
    return {name[len(prefix):]: (m.r["default"], m.scaling["default"])
            for name, m in pm.named_modules() if isinstance(m, PeftLoraLayer)}


def _lorakit_layers(model) -> dict[str, tuple[int, float]]:
    return {p: (layer.rank("default"), layer.scale["default"]) for p, layer in lorakit.lora_layers(model)}


def _peft_to_lorakit(base, peft_cfg, run, directory):
    """PEFT with random A, B -> save_pretrained -> lorakit.load; returns (pm, lk, peft_out, lk_out)."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(base), peft_cfg).eval()
    with torch.no_grad():
        expected = run(pm)
    pm.save_pretrained(str(directory))
    lk = lorakit.load(copy.deepcopy(base), directory).eval()
    with torch.no_grad():
        got = run(lk)
    return pm, lk, expected, got


def _lorakit_to_peft(base, lk_cfg, run, directory):
    """lorakit with random A, B -> lorakit.save -> PeftModel.from_pretrained; (lk, pm, lk_out, peft_out)."""
    lk = lorakit.inject(copy.deepcopy(base), lk_cfg).eval()
    _randomize(lk)
    with torch.no_grad():
        expected = run(lk)
    lorakit.save(lk, directory)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()
    with torch.no_grad():
        got = run(pm)
    return lk, pm, expected, got


def _check_both_directions(base, peft_cfg, lk_cfg, run, tmp_path, *, fan_in_fan_out=False):
    """Everything this file checks for one config; returns the two saved adapter_config dicts."""
    with torch.no_grad():
        base_out = run(base)

    # PEFT -> lorakit
    pm, lk, expected, got = _peft_to_lorakit(base, peft_cfg, run, tmp_path / "peft")
    oracle = Oracle(pm, run)
    oracle.check(got)  # lorakit
    oracle.check(expected)  # PEFT
    assert (expected - base_out).abs().max() > 1e-3, "the adapter must change the output (test is vacuous)"
    assert _lorakit_layers(lk) == _peft_layers(pm)  # same modules, ranks and scalings
    peft_trainable, peft_total = pm.get_nb_trainable_parameters()
    # re-saving PEFT's adapter through lorakit reproduces its tensors bit for bit
    lorakit.save(lk, tmp_path / "resaved")
    peft_tensors, resaved = load_file(tmp_path / "peft" / "adapter_model.safetensors"), \
        load_file(tmp_path / "resaved" / "adapter_model.safetensors")
    assert set(resaved) == set(peft_tensors)
    for k, t in peft_tensors.items():
        assert torch.equal(resaved[k], t.float()), k

    # lorakit -> PEFT
    lk2, pm2, expected2, got2 = _lorakit_to_peft(base, lk_cfg, run, tmp_path / "lk")
    oracle = Oracle(pm2, run)  # PEFT's model of lorakit's file, in float64
    oracle.check(expected2)  # lorakit
    oracle.check(got2)  # PEFT
    assert (expected2 - base_out).abs().max() > 1e-3
    assert _peft_layers(pm2) == _lorakit_layers(lk2)  # PEFT reads lorakit's config the same way
    assert _lorakit_layers(lk2) == _lorakit_layers(lk)  # same config -> same sites/ranks/scales
    s = lorakit.summary(lk2)
    assert (s.trainable, s.total) == (peft_trainable, peft_total)

    # the files: same keys, same shapes per key
    peft_shapes, lk_shapes = _file_shapes(tmp_path / "peft"), _file_shapes(tmp_path / "lk")
    assert set(lk_shapes) == set(peft_shapes)
    assert lk_shapes == peft_shapes

    peft_json = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    lk_json = json.loads((tmp_path / "lk" / "adapter_config.json").read_text())
    assert lk_json["peft_type"] == "LORA"
    assert lk_json["r"] == lk_cfg.r and lk_json["lora_alpha"] == lk_cfg.alpha
    assert isinstance(lk_json["target_modules"], list) and lk_json["target_modules"]  # explicit, never "all-linear"
    assert all(isinstance(t, str) and t != "all-linear" for t in lk_json["target_modules"])
    assert lk_json["use_rslora"] is lk_cfg.use_rslora
    assert isinstance(lk_json["rank_pattern"], dict) and isinstance(lk_json["alpha_pattern"], dict)
    assert lk_json["fan_in_fan_out"] is fan_in_fan_out
    assert lk_json["use_dora"] is False and lk_json["bias"] == "none"
    return peft_trainable, peft_json, lk_json


# -- MiniLM -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel, AutoTokenizer

    path = builtin.minilm_path()
    base = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tok(["LoRA adapters are small.", "The quick brown fox jumps over the lazy dog, twice."],
              padding=True, return_tensors="pt")
    return base, dict(enc)


MINILM_CASES = {
    "query-value": (dict(r=8, lora_alpha=16, target_modules=["query", "value"]),
                    dict(r=8, alpha=16, targets=["query", "value"])),
    "all-linear": (dict(r=8, lora_alpha=16, target_modules="all-linear"),
                   dict(r=8, alpha=16, targets="all-linear")),
    "embedding+query": (dict(r=8, lora_alpha=16, target_modules=["word_embeddings", "query"]),
                        dict(r=8, alpha=16, targets=["word_embeddings", "query"])),
    "patterns+rslora": (
        dict(r=8, lora_alpha=16, target_modules=["query", "key", "value"], use_rslora=True,
             rank_pattern={"query": 4, r"layer\.[12]\..*value": 16}, alpha_pattern={"value": 32, "layer.0.attention.self.key": 5}),
        dict(r=8, alpha=16, targets=["query", "key", "value"], use_rslora=True,
             rank_pattern={"query": 4, r"layer\.[12]\..*value": 16}, alpha_pattern={"value": 32, "layer.0.attention.self.key": 5})),
}


@pytest.mark.parametrize("case", list(MINILM_CASES))
def test_minilm_both_directions(minilm, case, tmp_path):
    base, enc = minilm
    peft_kw, lk_kw = MINILM_CASES[case]
    run = lambda m: m(**enc).last_hidden_state  # noqa: E731
    trainable, peft_json, lk_json = _check_both_directions(
        base, peft.LoraConfig(init_lora_weights=False, **peft_kw), lorakit.LoraConfig(**lk_kw), run, tmp_path)
    if case == "query-value":
        assert trainable == MINILM_QV_R8_TRAINABLE
        assert sorted(lk_json["target_modules"]) == ["query", "value"]
    if case == "all-linear":
        assert sorted(lk_json["target_modules"]) == sorted(peft_json["target_modules"]) == ["dense", "key", "query", "value"]
    if case == "embedding+query":
        assert any(k.endswith("word_embeddings.lora_embedding_A") for k in _file_shapes(tmp_path / "lk"))
    if case == "patterns+rslora":
        assert lk_json["use_rslora"] is True and lk_json["rank_pattern"] and lk_json["alpha_pattern"]
        ranks = {r for r, _ in _lorakit_layers(lorakit.load(copy.deepcopy(base), tmp_path / "lk")).values()}
        assert ranks == {4, 8, 16}


def _peft_load_messages(base, directory, caplog) -> set[str]:
    """Every warning and log record PEFT emits while loading the adapter in ``directory``."""
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory))
    return {f"{w.category.__name__}: {w.message}" for w in caught} | {r.getMessage() for r in caplog.records}


def test_peft_loads_lorakit_files_without_warnings(minilm, tmp_path, caplog):
    """PEFT reading a lorakit file says nothing it does not also say for its own file of the same
    adapter (before: "Unexpected keyword arguments ['lorakit_weights_sha256'] ... upgrade PEFT")."""
    base, _ = minilm
    lk = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=4, alpha=8, targets=["query", "value"],
                                                                modules_to_save=["pooler.dense"]))
    lorakit.save(lk, tmp_path / "lk")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                                  modules_to_save=["pooler.dense"]))
    pm.save_pretrained(str(tmp_path / "peft"))
    ours, theirs = _peft_load_messages(base, tmp_path / "lk", caplog), _peft_load_messages(base, tmp_path / "peft", caplog)
    assert ours <= theirs, f"PEFT says about lorakit's file only: {sorted(ours - theirs)}"
    assert not any("lorakit" in m for m in ours)
    assert not any(k.startswith("lorakit") for k in json.loads((tmp_path / "lk" / "adapter_config.json").read_text()))


class Heads(nn.Module):
    """A head whose name is a plain suffix of another's (DistilBERT: pre_classifier, classifier)."""

    def __init__(self):
        super().__init__()
        self.q, self.pre_classifier, self.classifier = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.classifier(torch.tanh(self.pre_classifier(self.q(x))))


def test_modules_to_save_by_plain_suffix_both_directions(tmp_path):
    """PEFT's modules_to_save=["classifier"] also wraps pre_classifier (plain string suffix) and
    requires its state in the file (else KeyError); lorakit trains only classifier and writes
    pre_classifier's unchanged state as well. Both files load in both libraries, same outputs."""
    torch.manual_seed(0)
    base, x = Heads().eval(), torch.randn(4, 6)
    pm, lk, expected, got = _peft_to_lorakit(
        base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q"], modules_to_save=["classifier"],
                              init_lora_weights=False), lambda m: m(x), tmp_path / "peft")
    oracle = Oracle(pm, lambda m: m(x))
    oracle.check(got)
    oracle.check(expected)
    assert {p for p, _ in lorakit.summary(lk).saved.items()} == {"classifier", "pre_classifier"}

    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=2, alpha=4, targets=["q"],
                                                                  modules_to_save=["classifier"]))
    _randomize(model)
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(0.5)
        expected = model(x)
    lorakit.save(model, tmp_path / "lk")
    assert json.loads((tmp_path / "lk" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    tensors = load_file(tmp_path / "lk" / "adapter_model.safetensors")
    assert torch.equal(tensors["base_model.model.pre_classifier.weight"], base.pre_classifier.weight)
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lk")).eval()
    oracle = Oracle(pm2, lambda m: m(x))
    oracle.check(expected)
    with torch.no_grad():
        assert torch.equal(lorakit.load(copy.deepcopy(base), tmp_path / "lk")(x), expected)
        oracle.check(pm2(x))


# -- GPT-2 (transformers Conv1D, fan_in_fan_out) ------------------------------------------------
@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    base = GPT2Model(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)).eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    return base, ids


def test_gpt2_conv1d_both_directions(gpt2, tmp_path):
    from transformers.pytorch_utils import Conv1D

    base, ids = gpt2
    assert isinstance(base.h[0].attn.c_attn, Conv1D)
    run = lambda m: m(input_ids=ids).last_hidden_state  # noqa: E731
    _, _, lk_json = _check_both_directions(
        base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False),
        lorakit.LoraConfig(r=8, alpha=16, targets=["c_attn"]), run, tmp_path, fan_in_fan_out=True)
    assert lk_json["target_modules"] == ["c_attn"]
    shapes = _file_shapes(tmp_path / "lk")
    assert shapes["base_model.model.h.0.attn.c_attn.lora_A.weight"] == (8, 64)
    assert shapes["base_model.model.h.0.attn.c_attn.lora_B.weight"] == (192, 8)


# -- toy Conv2d ---------------------------------------------------------------------------------
class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.act = nn.GELU()
        self.proj = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        return self.proj(self.act(self.conv(x)))


@pytest.fixture(scope="module")
def convnet():
    torch.manual_seed(0)
    return ConvNet().eval(), torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))


def test_conv2d_both_directions(convnet, tmp_path):
    base, x = convnet
    _, _, lk_json = _check_both_directions(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["conv", "proj"], init_lora_weights=False),
        lorakit.LoraConfig(r=4, alpha=8, targets=["conv", "proj"]), lambda m: m(x), tmp_path)
    assert sorted(lk_json["target_modules"]) == ["conv", "proj"]
    shapes = _file_shapes(tmp_path / "lk")
    assert shapes["base_model.model.conv.lora_A.weight"] == (4, 3, 3, 3)
    assert shapes["base_model.model.conv.lora_B.weight"] == (8, 4, 1, 1)


# -- raw parameters (target_parameters): 2-D weights and 3-D stacked experts ---------------------
class Experts(nn.Module):
    """MoE-style stacked expert weights used by einsum. ``is_transposed`` is the attribute PEFT reads
    (transformers' gpt-oss sets it): False -> W[e] is (out, in), True -> W[e] is (in, out)."""

    def __init__(self, shape, is_transposed=False):
        super().__init__()
        self.is_transposed = is_transposed
        self.w = nn.Parameter(torch.randn(*shape) * 0.3)

    def forward(self, x):
        if self.w.dim() == 2:
            return x @ self.w.t()
        return torch.einsum("bei,eio->beo" if self.is_transposed else "bei,eoi->beo", x, self.w)


class MoE(nn.Module):
    def __init__(self, shape, is_transposed=False):
        super().__init__()
        self.experts = Experts(shape, is_transposed)
        self.tail = nn.Linear(shape[-2] if not is_transposed else shape[-1], 3)

    def forward(self, x):
        return self.tail(self.experts(x))


PARAM_CASES = {  # name -> (parameter shape, is_transposed, input shape, expected (A, B) shapes at r=2)
    "2d": ((10, 6), False, (5, 6), ((2, 6), (10, 2))),
    "3d": ((4, 10, 6), False, (5, 4, 6), ((8, 6), (10, 8))),
    "3d-is_transposed": ((4, 6, 10), True, (5, 4, 6), ((8, 6), (10, 8))),
}


@pytest.mark.parametrize("case", list(PARAM_CASES))
def test_target_parameters_both_directions(case, tmp_path):
    """PEFT 0.21's ParamWrapper layout: for W (E, d_out, d_in) A is (E·r, d_in), B (d_out, E·r)."""
    shape, transposed, x_shape, (a_shape, b_shape) = PARAM_CASES[case]
    torch.manual_seed(0)
    base = MoE(shape, transposed).eval()
    x = torch.randn(*x_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_out = base(x)
    key = "base_model.model.experts.lora_{}.weight"

    # PEFT -> lorakit, and the re-saved file is PEFT's bit for bit
    pm, lk, expected, got = _peft_to_lorakit(
        base, peft.LoraConfig(r=2, lora_alpha=3, target_parameters=["experts.w"], init_lora_weights=False),
        lambda m: m(x), tmp_path / "peft")
    assert (expected - base_out).abs().max() > 1e-2
    oracle = Oracle(pm, lambda m: m(x))
    oracle.check(got)
    oracle.check(expected)
    assert _file_shapes(tmp_path / "peft") == {key.format("A"): a_shape, key.format("B"): b_shape}
    assert _lorakit_layers(lk) == {"experts": (2, 1.5)} == _peft_layers(pm)
    lorakit.save(lk, tmp_path / "resaved")
    peft_tensors, resaved = load_file(tmp_path / "peft" / "adapter_model.safetensors"), \
        load_file(tmp_path / "resaved" / "adapter_model.safetensors")
    assert set(resaved) == set(peft_tensors) and all(torch.equal(resaved[k], t) for k, t in peft_tensors.items())
    assert lorakit.summary(lk).trainable == pm.get_nb_trainable_parameters()[0]

    # merge: the weight PEFT's merge makes (both against W + s·B·A in float64), and the merged forward is the
    # unmerged one's function
    w0 = lk.experts.base_layer.w.detach().clone()
    lorakit.merge(lk)
    pm.merge_adapter()
    oracle.check_merged("experts", lk.experts.base_layer.w)
    oracle.check_merged("experts", pm.base_model.model.experts.get_base_layer().w)
    with torch.no_grad():
        oracle.check(lk(x))
    lorakit.unmerge(lk)
    assert torch.equal(lk.experts.base_layer.w, w0)

    # lorakit -> PEFT
    lk2, pm2, expected2, got2 = _lorakit_to_peft(
        base, lorakit.LoraConfig(r=2, alpha=3, target_parameters=["experts.w"]), lambda m: m(x), tmp_path / "lk")
    assert (expected2 - base_out).abs().max() > 1e-3
    oracle = Oracle(pm2, lambda m: m(x))
    oracle.check(expected2)
    oracle.check(got2)
    assert _file_shapes(tmp_path / "lk") == _file_shapes(tmp_path / "peft")
    assert _peft_layers(pm2) == {"experts": (2, 1.5)}
    cfg = json.loads((tmp_path / "lk" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["experts.w"] and cfg["target_modules"] is None


# -- merge / unmerge cross-check ----------------------------------------------------------------
def _merge_cases(minilm, gpt2, convnet):
    (mbase, enc), (gbase, ids), (cbase, x) = minilm, gpt2, convnet
    return {
        "minilm-embedding+query": (mbase, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["word_embeddings", "query"]),
                                   lambda m: m(**enc).last_hidden_state),
        "minilm-patterns+rslora": (mbase, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["value", "dense"], use_rslora=True,
                                                          rank_pattern={"dense": 2}, alpha_pattern={"value": 3}),
                                   lambda m: m(**enc).last_hidden_state),
        "gpt2-c_attn": (gbase, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True),
                        lambda m: m(input_ids=ids).last_hidden_state),
        "conv2d": (cbase, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["conv", "proj"]), lambda m: m(x)),
    }


@pytest.mark.parametrize("case", ["minilm-embedding+query", "minilm-patterns+rslora", "gpt2-c_attn", "conv2d"])
def test_merge_matches_peft(minilm, gpt2, convnet, case, tmp_path):
    base, cfg, run = _merge_cases(minilm, gpt2, convnet)[case]
    cfg.init_lora_weights = False
    pm, lk, _, _ = _peft_to_lorakit(base, cfg, run, tmp_path)
    oracle = Oracle(pm, run)  # W + s·B·A and the model's output, float64
    original = {p: layer.weight.detach().clone() for p, layer in lorakit.lora_layers(lk)}
    peft_modules = {name[len("base_model.model."):]: m for name, m in pm.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(peft_modules) == set(original)

    pm.merge_adapter()
    lorakit.merge(lk)
    delta_max = {}
    for p, layer in lorakit.lora_layers(lk):
        oracle.check_merged(p, layer.weight)  # lorakit rounds W + s·B·A once (from float64)
        oracle.check_merged(p, peft_modules[p].get_base_layer().weight)  # PEFT twice (fp32 ΔW, then the sum)
        assert not torch.equal(layer.weight, original[p])  # the merge did something
        delta_max[p] = (layer.weight - original[p]).abs().max().item()
    with torch.no_grad():
        oracle.check(run(lk))
        oracle.check(run(pm))

    pm.unmerge_adapter()
    lorakit.unmerge(lk)
    for p, layer in lorakit.lora_layers(lk):
        assert torch.equal(layer.weight, original[p]), f"{p}: lorakit.unmerge is not bit-exact"
        # PEFT unmerges by subtraction: exact only up to fp32 rounding of W + ΔW (ΔW is large here)
        torch.testing.assert_close(peft_modules[p].get_base_layer().weight, original[p],
                                   rtol=0, atol=1e-6 * (1 + delta_max[p]))

    # merge_and_unload: both give the plain base class with the same state_dict
    peft_plain = pm.merge_and_unload()
    lk_plain = lorakit.merge_and_unload(lk)
    assert type(lk_plain) is type(peft_plain) is type(base)
    sd_peft, sd_lk = peft_plain.state_dict(), lk_plain.state_dict()
    assert list(sd_lk) == list(sd_peft) == list(base.state_dict())
    merged = {p + ".weight": p for p in original}
    for k in sd_peft:
        if k in merged:  # W + s·B·A, each within fp32 rounding of float64
            oracle.check_merged(merged[k], sd_lk[k])
            oracle.check_merged(merged[k], sd_peft[k])
        else:  # untouched by the adapter
            assert torch.equal(sd_lk[k], sd_peft[k]), k


# -- SmolLM2-135M -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    model, tok = builtin.load_smollm2(dtype=torch.float32)
    ids = tok("The capital of France is Paris. LoRA keeps", return_tensors="pt").input_ids
    return model.eval(), ids


@pytest.mark.slow
def test_smollm2_all_linear_both_directions(smollm2, tmp_path):
    base, ids = smollm2
    run = lambda m: m(input_ids=ids).logits  # noqa: E731
    with torch.no_grad():
        base_out = run(base)

    pm, lk, expected, got = _peft_to_lorakit(
        base, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
        run, tmp_path / "peft")
    oracle = Oracle(pm, run)
    oracle.check(got)
    oracle.check(expected)
    del oracle
    assert (expected - base_out).abs().max() > 1e-2
    assert _lorakit_layers(lk) == _peft_layers(pm)
    assert "lm_head" not in {p.rsplit(".", 1)[-1] for p, _ in lorakit.lora_layers(lk)}
    peft_counts = pm.get_nb_trainable_parameters()
    del pm, lk

    lk, pm, expected, got = _lorakit_to_peft(base, lorakit.LoraConfig(r=8, alpha=16, targets="all-linear"),
                                             run, tmp_path / "lk")
    oracle = Oracle(pm, run)
    oracle.check(expected)
    oracle.check(got)
    del oracle
    assert (expected - base_out).abs().max() > 1e-2
    s = lorakit.summary(lk)
    assert s.trainable == peft_counts[0] == SMOLLM2_ALL_LINEAR_R8_TRAINABLE
    assert s.total == peft_counts[1]
    assert _file_shapes(tmp_path / "lk") == _file_shapes(tmp_path / "peft")
    cfg = json.loads((tmp_path / "lk" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
