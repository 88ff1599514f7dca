"""DoRA (``LoraConfig(use_dora=True)``) against independent oracles.

* The textbook formula in float64: W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖, the norm per output unit
  (rows of an nn.Linear / ConvNd weight, columns of a transformers Conv1D weight, PEFT's per-dim norm
  of an nn.Embedding weight), written out here per layer kind and run through a float64 copy of the
  base model with W' swapped in. Gradients: the same formula with the norm detached, under autograd.
* Real PEFT 0.21 (its files, outputs, dropout and merge), in both directions, with random non-zero
  A, B and magnitudes.
* Mixed batches: each row equals that row run alone with its adapter active.

Tolerances: float64 models 1e-10; fp32 against PEFT max |diff| <= 1e-5 x the largest magnitude of
PEFT's output (at least 1), as in test_peft_compat.
"""

import copy
import json
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import lorakit
from lorakit import LoraConfig, LoraError

peft = pytest.importorskip("peft")
from transformers.pytorch_utils import Conv1D  # noqa: E402

RTOL = 1e-5
PATHS = ("emb", "lin", "c1d", "conv1", "conv2", "gconv")
PEFT_PATHS = PATHS[:-1]  # PEFT's grouped-conv factors have another layout (see lorakit.kinds.conv._GroupedConv)


class Toy(nn.Module):
    """Every kind DoRA is defined for: Embedding, Linear, GPT-2 Conv1D, Conv1d, Conv2d, grouped Conv2d."""

    def __init__(self, gconv=True):
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.lin = nn.Linear(8, 6)
        self.c1d = Conv1D(7, 6)  # W (6, 7): in 6, out 7
        self.conv1 = nn.Conv1d(7, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, (3, 1), padding=(1, 0))
        self.gconv = nn.Conv2d(6, 6, (3, 1), padding=(1, 0), groups=2) if gconv else nn.Identity()

    def forward(self, ids, x=None):
        h = self.emb(ids) if x is None else self.emb(ids) + x
        h = self.c1d(torch.tanh(self.lin(h)))  # (B, T, 7)
        h = self.conv2(self.conv1(h.transpose(1, 2)).unsqueeze(-1))  # (B, 6, T, 1)
        return self.gconv(h).flatten(1)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about custom models, fan_in_fan_out, grouped convs
        yield


def _toy(dtype=torch.float64, seed=0, gconv=True):
    torch.manual_seed(seed)
    return Toy(gconv).to(dtype).eval(), torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(seed))


def _randomise(model, adapter="default", seed=1):
    """Random non-zero A and B, and magnitudes m = ‖W + ΔW‖·(1 + noise) (positive, not 1 after division)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for p in (layer.lora_A[adapter], layer.lora_B[adapter]):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
            m = layer.lora_magnitude_vector[adapter]
            m.copy_(m * (1 + 0.5 * torch.rand(m.shape, generator=g, dtype=torch.float64)))


def _adapted(module, a, b, m, s, detach_norm=False):
    """The textbook W' = m ⊙ (W + s·ΔW) / ‖W + s·ΔW‖ of one module, float64, per layer kind."""
    w = module.weight.double()
    if isinstance(module, nn.Linear):  # W (out, in): rows
        v, axis = w + s * b @ a, 0
    elif isinstance(module, Conv1D):  # W (in, out): columns
        v, axis = w + s * (b @ a).t(), 1
    elif isinstance(module, nn.Embedding):  # W (num, dim): one norm per embedding dim (PEFT)
        v, axis = w + s * (b @ a).t(), 1
    else:  # ConvNd (out, in/groups, k...): per output channel
        v, axis = w + s * (b.flatten(1) @ a.flatten(1)).reshape(w.shape), 0
    dims = [d for d in range(w.dim()) if d != axis]
    norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
    shape = [1] * w.dim()
    shape[axis] = -1
    return m.reshape(shape) * v / (norm.detach() if detach_norm else norm)


def _oracle_weights(model, base, adapter="default", detach_norm=False, leaves=None):
    """{path.weight: W'} for every adapted module of ``model`` (leaves: float64 copies of m, A, B to use)."""
    out = {}
    for path, layer in lorakit.lora_layers(model):
        a, b, m = leaves[path] if leaves else (t.detach().double() for t in (
            layer.lora_A[adapter], layer.lora_B[adapter], layer.lora_magnitude_vector[adapter]))
        out[f"{path}.weight"] = _adapted(base.get_submodule(path), a, b, m, layer.scale[adapter], detach_norm)
    return out


# -- the formula ----------------------------------------------------------------------------------
def test_new_adapter_changes_nothing_and_m_is_the_norm_of_w():
    base, ids = _toy()
    model = lorakit.inject(copy.deepcopy(base), LoraConfig(r=3, targets=list(PATHS), use_dora=True))
    assert torch.equal(model(ids), base(ids))
    w = {p: base.get_submodule(p).weight for p in PATHS}
    norms = {"lin": w["lin"].norm(dim=1), "c1d": w["c1d"].norm(dim=0), "emb": w["emb"].norm(dim=0),
             "conv1": w["conv1"].flatten(1).norm(dim=1).view(1, -1, 1),
             "conv2": w["conv2"].flatten(1).norm(dim=1).view(1, -1, 1, 1),
             "gconv": w["gconv"].flatten(1).norm(dim=1).view(1, -1, 1, 1)}
    for path, layer in lorakit.lora_layers(model):
        m = layer.lora_magnitude_vector["default"]
        assert m.shape == norms[path].shape and m.requires_grad
        torch.testing.assert_close(m, norms[path], rtol=1e-12, atol=0)


def test_forward_and_merge_match_the_textbook_formula():
    base, ids = _toy()
    model = lorakit.inject(copy.deepcopy(base), LoraConfig(r=3, alpha=5, targets=list(PATHS), use_dora=True))
    _randomise(model)
    expected = functional_call(base, _oracle_weights(model, base), (ids,))
    assert (expected - base(ids)).abs().max() > 0.1  # the adapters do change the output
    torch.testing.assert_close(model(ids), expected, rtol=1e-10, atol=1e-10)
    weights = {p: layer.weight.detach().clone() for p, layer in lorakit.lora_layers(model)}
    lorakit.merge(model)
    for path, w in _oracle_weights(model, base).items():
        torch.testing.assert_close(model.get_submodule(path.replace(".weight", "")).weight, w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(ids), expected, rtol=1e-10, atol=1e-10)
    lorakit.unmerge(model)
    for path, layer in lorakit.lora_layers(model):
        assert torch.equal(layer.weight, weights[path])  # bit-exact: the kept copy
    lorakit.merge(model, keep_copy=False)
    lorakit.unmerge(model)  # by arithmetic: W'·‖W + ΔW‖/m − ΔW
    for path, layer in lorakit.lora_layers(model):
        torch.testing.assert_close(layer.weight, weights[path], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_rounds_once_and_unmerge_is_bit_exact(dtype):
    base, ids = _toy(dtype)
    model = lorakit.inject(copy.deepcopy(base), LoraConfig(r=3, targets=list(PATHS), use_dora=True))
    _randomise(model)
    before = {p: layer.weight.detach().clone() for p, layer in lorakit.lora_layers(model)}
    unmerged = model(ids)
    lorakit.merge(model)
    for path, w in _oracle_weights(model, base.double()).items():
        assert torch.equal(model.get_submodule(path.replace(".weight", "")).weight, w.to(dtype))  # rounded once
    tol = 1e-5 if dtype == torch.float32 else 5e-2  # the unmerged forward rounds the base output to bf16 too
    torch.testing.assert_close(model(ids), unmerged, rtol=tol, atol=tol)
    lorakit.unmerge(model)
    assert all(torch.equal(layer.weight, before[p]) for p, layer in lorakit.lora_layers(model))


def test_float64_merge_leaves_the_kept_copy_intact_for_lora_too():
    """Regression: merging a float64 weight added ΔW into W itself before the copy was taken (``.to``
    returned W, not a copy), so unmerge "restored" the merged weight."""
    for use_dora in (False, True):
        base, ids = _toy()
        dora = {"use_dora": True} if use_dora else {}  # plain LoRA: a config as before DoRA existed
        model = lorakit.inject(copy.deepcopy(base), LoraConfig(r=2, targets=["lin", "conv2"], **dora))
        with torch.no_grad():
            for _, layer in lorakit.lora_layers(model):
                layer.lora_B["default"].normal_()
        lorakit.merge(model)
        lorakit.unmerge(model)
        assert torch.equal(model.lin.weight, base.lin.weight) and torch.equal(model.conv2.weight, base.conv2.weight)


def test_gradients_for_m_a_b_and_x_none_for_w():
    base, ids = _toy()
    model = lorakit.inject(copy.deepcopy(base), LoraConfig(r=3, alpha=5, targets=list(PATHS), use_dora=True))
    _randomise(model)
    model.train()  # dropout 0: the training forward is the formula
    # no padding token: F.embedding gives W'[padding_idx] no gradient, while the adapter's lookup (PEFT's too)
    # only stops A's; B and m still learn from those rows
    ids = ids.clamp(min=1)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 30, dtype=torch.float64)
    (model(ids, x) * g).sum().backward()

    leaves = {p: tuple(t.detach().double().clone().requires_grad_() for t in (
        layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude_vector["default"]))
        for p, layer in lorakit.lora_layers(model)}
    x_ref = x.detach().clone().requires_grad_()
    weights = _oracle_weights(model, base, detach_norm=True, leaves=leaves)
    (functional_call(base, weights, (ids, x_ref)) * g).sum().backward()

    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    for path, layer in lorakit.lora_layers(model):
        assert layer.weight.grad is None and not layer.weight.requires_grad
        for got, ref in zip((layer.lora_A["default"], layer.lora_B["default"],
                             layer.lora_magnitude_vector["default"]), leaves[path]):
            assert got.grad.abs().max() > 0
            torch.testing.assert_close(got.grad, ref.grad, rtol=1e-10, atol=1e-10)


# -- PEFT -------------------------------------------------------------------------------------------
def _close(actual, expected):
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= RTOL * max(expected.abs().max().item(), 1.0), f"max |diff| {err:.3g}"


def _peft_randomise(pm, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=g))


def test_peft_dora_file_loads_with_matching_outputs_and_merge(tmp_path):
    base, ids = _toy(torch.float32, gconv=False)
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=list(PEFT_PATHS), use_dora=True,
                          init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    _peft_randomise(pm)
    with torch.no_grad():
        expected = pm(ids)
    assert (expected - base(ids)).abs().max() > 0.1
    pm.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True

    lk = lorakit.load(copy.deepcopy(base), tmp_path).eval()
    assert lorakit.registry(lk).configs["default"].use_dora
    with torch.no_grad():
        _close(lk(ids), expected)
        pm.merge_adapter()
        lorakit.merge(lk)
        for path, layer in lorakit.lora_layers(lk):
            _close(layer.weight, pm.base_model.model.get_submodule(path).base_layer.weight)
        _close(lk(ids), pm(ids))

    # re-saved through lorakit: PEFT's own tensors, bit for bit, under PEFT's keys
    lorakit.unmerge(lk)
    lorakit.save(lk, tmp_path / "again")
    from safetensors.torch import load_file
    theirs, ours = load_file(tmp_path / "adapter_model.safetensors"), load_file(tmp_path / "again/adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert "base_model.model.conv2.lora_magnitude_vector" in ours and "base_model.model.lin.lora_magnitude_vector" in ours


def test_lorakit_dora_file_loads_in_peft_with_matching_outputs(tmp_path):
    base, ids = _toy(torch.float32, gconv=False)
    lk = lorakit.inject(copy.deepcopy(base), LoraConfig(r=3, alpha=6, targets=list(PEFT_PATHS), use_dora=True,
                                                         use_rslora=True)).eval()
    _randomise(lk)
    with torch.no_grad():
        expected = lk(ids)
    lorakit.save(lk, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert set(pm.peft_config["default"].target_modules) == set(PEFT_PATHS) and pm.peft_config["default"].use_dora
    with torch.no_grad():
        _close(pm(ids), expected)


def test_training_with_dropout_matches_peft_outputs_and_gradients():
    """PEFT's dropout handling: y = base(x) + (f − 1)·W·x̃ + f·s·B·A·x̃, x̃ = dropout(x) (none on token ids)."""
    base, ids = _toy(torch.float32, gconv=False)
    x = torch.randn(3, 5, 8)
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=3, lora_alpha=6, lora_dropout=0.5, target_modules=list(PEFT_PATHS), use_dora=True, init_lora_weights=False))
    _peft_randomise(pm)
    lk = lorakit.inject(copy.deepcopy(base), LoraConfig(r=3, alpha=6, dropout=0.5, targets=list(PEFT_PATHS),
                                                         use_dora=True))
    with torch.no_grad():  # the same factors and magnitudes in lorakit
        for path, layer in lorakit.lora_layers(lk):
            theirs = pm.base_model.model.get_submodule(path)
            if path == "emb":
                layer.lora_A["default"].copy_(theirs.lora_embedding_A["default"])
                layer.lora_B["default"].copy_(theirs.lora_embedding_B["default"])
            else:
                layer.lora_A["default"].copy_(theirs.lora_A["default"].weight)
                layer.lora_B["default"].copy_(theirs.lora_B["default"].weight)
            layer.lora_magnitude_vector["default"].copy_(theirs.lora_magnitude_vector["default"].weight)
    pm.train(), lk.train()
    torch.manual_seed(7)
    expected = pm(ids, x)
    torch.manual_seed(7)
    got = lk(ids, x)
    _close(got, expected)
    g = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2))
    (expected * g).sum().backward()
    (got * g).sum().backward()
    for path, layer in lorakit.lora_layers(lk):  # the same gradients for A, B and m
        theirs = pm.base_model.model.get_submodule(path)
        a, b = ((theirs.lora_embedding_A["default"], theirs.lora_embedding_B["default"]) if path == "emb" else
                (theirs.lora_A["default"].weight, theirs.lora_B["default"].weight))
        for mine, ref in ((layer.lora_A["default"], a), (layer.lora_B["default"], b),
                          (layer.lora_magnitude_vector["default"], theirs.lora_magnitude_vector["default"].weight)):
            assert mine.grad.abs().max() > 0
            _close(mine.grad, ref.grad)
    with torch.no_grad():
        assert (got - lk.eval()(ids, x)).abs().max() > 1e-3  # dropout did act


# -- mixed batches, several adapters, files ---------------------------------------------------------
def _two_dora_and_lora(dtype=torch.float64):
    base, ids = _toy(dtype)
    model = copy.deepcopy(base)
    lorakit.inject(model, LoraConfig(r=3, targets=list(PATHS), use_dora=True), "d1")
    lorakit.inject(model, LoraConfig(r=2, targets=["lin", "conv2", "emb"], use_dora=True), "d2")
    lorakit.inject(model, LoraConfig(r=2, targets=["lin", "c1d", "conv1"]), "plain")
    for i, name in enumerate(("d1", "d2", "plain")):
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for _, layer in lorakit.lora_layers(model):
                if name in layer.lora_A:
                    for p in (layer.lora_A[name], layer.lora_B[name]):
                        p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.3)
                    if name in layer.lora_magnitude_vector:
                        m = layer.lora_magnitude_vector[name]
                        m.mul_(1 + 0.5 * torch.rand(m.shape, generator=g, dtype=dtype))
    return model.eval(), ids


@pytest.mark.parametrize("grad", [False, True])
def test_mixed_batch_rows_equal_each_row_alone(grad):
    model, ids = _two_dora_and_lora()
    rows = ["d1", "d2", None, "plain", "d1"]
    ids = torch.randint(0, 20, (len(rows), 5), generator=torch.Generator().manual_seed(4))
    alone = []
    for i, name in enumerate(rows):
        with torch.no_grad():
            if name is None:
                with lorakit.disabled(model):
                    alone.append(model(ids[i:i + 1]))
            else:
                lorakit.set_active(model, name)
                alone.append(model(ids[i:i + 1]))
    with torch.set_grad_enabled(grad), lorakit.mixed(model, rows):
        out = model(ids)
    torch.testing.assert_close(out, torch.cat(alone), rtol=1e-10, atol=1e-10)
    if grad:
        out.sum().backward()
        layer = dict(lorakit.lora_layers(model))["lin"]
        assert layer.lora_magnitude_vector["d1"].grad.abs().max() > 0  # d1 is the active (trainable) one


def test_dora_adapter_cannot_be_active_with_another_on_a_layer():
    model, ids = _two_dora_and_lora()
    lorakit.set_active(model, "d1")
    with pytest.raises(LoraError, match=r"emb: DoRA adapter\(s\) \['d1', 'd2'\] cannot be active together"):
        lorakit.set_active(model, ["d1", "d2"])
    with pytest.raises(LoraError, match="cannot be active together"):
        lorakit.set_active(model, ["plain", "d2"])
    assert lorakit.registry(model).active == ("d1",)
    assert all(layer.active == (("d1",) if "d1" in layer.lora_A else ()) for _, layer in lorakit.lora_layers(model))


def test_named_adapters_disabled_delete_and_save_load(tmp_path):
    model, ids = _two_dora_and_lora()
    base, _ = _toy()
    with torch.no_grad(), lorakit.disabled(model):
        assert torch.equal(model(ids), base(ids))
    outs = {}
    for name in ("d1", "d2", "plain"):
        lorakit.set_active(model, name)
        with torch.no_grad():
            outs[name] = model(ids)
        lorakit.save(model, tmp_path / name, adapter=name, dtype=torch.float64)
    assert (outs["d1"] - outs["d2"]).abs().max() > 0.1
    fresh = copy.deepcopy(base)
    for name in ("d1", "d2", "plain"):
        lorakit.load(fresh, tmp_path / name, adapter=name)
    for name in ("d1", "d2", "plain"):
        lorakit.set_active(fresh, name)
        with torch.no_grad():
            torch.testing.assert_close(fresh(ids), outs[name], rtol=0, atol=0)
    lorakit.delete(model, "d1")
    lorakit.set_active(model, "d2")
    assert set(dict(lorakit.lora_layers(model))["lin"].lora_magnitude_vector) == {"d2"}
    with torch.no_grad():
        assert torch.equal(model(ids), outs["d2"])


def test_bad_input_is_refused_naming_the_module(tmp_path):
    mha = nn.Sequential()
    mha.attn = nn.MultiheadAttention(8, 2)
    message = r"attn.in_proj_weight: DoRA \(use_dora=True\) is not defined for multihead_attention layers \(MultiheadAttention\)"
    with pytest.raises(LoraError, match=message):
        lorakit.inject(mha, LoraConfig(targets=["attn"], use_dora=True))
    assert not any(isinstance(m, lorakit.LoraLayer) for m in mha.modules())
    raw = nn.Sequential()
    raw.experts = nn.Module()
    raw.experts.weight = nn.Parameter(torch.randn(2, 4, 4))
    with pytest.raises(LoraError, match=r"experts.weight: DoRA \(use_dora=True\) is not defined for raw parameters"):
        lorakit.inject(raw, LoraConfig(target_parameters=["experts.weight"], use_dora=True))
    assert not lorakit.state.has_adapters(raw)
    with pytest.raises(LoraError, match="use_dora must be True or False"):
        LoraConfig(targets=["lin"], use_dora="yes")
    zero_row = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        zero_row[0].weight[1] = 0
    with pytest.raises(LoraError, match=r"0.weight: output unit\(s\) \[1\] of this weight are all zero"):
        lorakit.inject(zero_row, LoraConfig(targets=["0"], use_dora=True))
    assert not lorakit.state.has_adapters(zero_row)
    lorakit.inject(zero_row, LoraConfig(targets=["0"]))  # plain LoRA is fine there
    nan_m = lorakit.inject(nn.Sequential(nn.Linear(4, 3)), LoraConfig(targets=["0"], use_dora=True))
    with torch.no_grad():
        dict(lorakit.lora_layers(nan_m))["0"].lora_magnitude_vector["default"][0] = float("nan")
    weight = nan_m[0].weight.detach().clone()
    with pytest.raises(LoraError, match=r"0.lora_magnitude_vector.default holds NaN"):
        lorakit.merge(nan_m)
    assert torch.equal(nan_m[0].weight, weight) and not lorakit.registry(nan_m).merged

    # a DoRA file without its magnitudes, and a plain file with them, are refused before any change
    base, ids = _toy(torch.float32, gconv=False)
    model = lorakit.inject(copy.deepcopy(base), LoraConfig(r=2, targets=["lin"], use_dora=True))
    lorakit.save(model, tmp_path / "d")
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "d/adapter_model.safetensors")
    del tensors["base_model.model.lin.lora_magnitude_vector"]
    save_file(tensors, tmp_path / "d/adapter_model.safetensors")
    target = copy.deepcopy(base)
    with pytest.raises(LoraError, match=r"missing base_model.model.lin.lora_magnitude_vector \(expected shape \(6,\)\)"):
        lorakit.load(target, tmp_path / "d")
    config = json.loads((tmp_path / "d/adapter_config.json").read_text())
    config["use_dora"] = False
    (tmp_path / "d/adapter_config.json").write_text(json.dumps(config))
    tensors["base_model.model.lin.lora_magnitude_vector"] = torch.ones(6)
    save_file(tensors, tmp_path / "d/adapter_model.safetensors")
    with pytest.raises(LoraError, match="unexpected key base_model.model.lin.lora_magnitude_vector"):
        lorakit.load(target, tmp_path / "d")
    assert not lorakit.state.has_adapters(target)


# -- a real model ---------------------------------------------------------------------------------
def test_minilm_dora_both_directions(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from lorakit import builtin

    path = builtin.minilm_path()
    base = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    enc = dict(AutoTokenizer.from_pretrained(path, local_files_only=True)(
        ["DoRA rescales each output.", "The quick brown fox jumps over the lazy dog."], padding=True, return_tensors="pt"))
    run = lambda m: m(**enc).last_hidden_state  # noqa: E731
    targets = ["query", "value", "word_embeddings"]

    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=targets, use_dora=True, init_lora_weights=False)).eval()
    _peft_randomise(pm)
    with torch.no_grad():
        expected = run(pm)
        assert (expected - run(base)).abs().max() > 0.1
    pm.save_pretrained(str(tmp_path / "peft"))
    lk = lorakit.load(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        _close(run(lk), expected)
    assert lorakit.summary(lk).trainable == pm.get_nb_trainable_parameters()[0]

    lk = lorakit.inject(copy.deepcopy(base), LoraConfig(r=8, alpha=16, targets=targets, use_dora=True)).eval()
    _randomise(lk)
    with torch.no_grad():
        expected = run(lk)
    lorakit.save(lk, tmp_path / "lk")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lk")).eval()
    with torch.no_grad():
        _close(run(pm), expected)


# -- the command line -----------------------------------------------------------------------------
def test_cli_train_dora(tmp_path):
    from safetensors import safe_open
    from test_cli import FAST, labelled_csv, refused, save_tiny_bert
    from test_cli import lorakit as cli

    bert, data = save_tiny_bert(tmp_path / "bert"), labelled_csv(tmp_path / "d.csv")
    code, out, err = cli("train", "--model", bert, "--data", data, *FAST, "--dora", "--out", tmp_path / "run")
    assert code == 0, err
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["lora"]["dora"] is True
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        m = f.get_tensor("base_model.model.bert.encoder.layer.0.attention.self.query.lora_magnitude_vector")
    assert m.shape == (16,)
    code, out, err = cli("predict", "--adapter", adapter, "win money now 3")
    assert code == 0 and out.split("\t")[0] in {"eggs", "ham", "spam"}, err
    refused(cli("train", "--model", bert, "--data", data, *FAST, "--dora", "--full", "--out", tmp_path / "r2"),
            "--dora is a LoRA variant")


def test_save_pretrained_writes_the_base_and_the_dora_adapter(tmp_path):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    base = GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)).eval()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = lorakit.inject(base, LoraConfig(r=2, targets=["c_attn"], use_dora=True))
    _randomise(model)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids).last_hidden_state
    model.save_pretrained(tmp_path)
    again = GPT2Model.from_pretrained(tmp_path).eval()
    assert again.state_dict().keys() == original.keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in original.items())
    lorakit.load(again, tmp_path / "adapters" / "default")
    with torch.no_grad():
        assert torch.equal(again(ids).last_hidden_state, out)


def test_fsdp2_refuses_dora_adapters():
    # not tested on sharded weights (DoRA's norm reads the whole W), so refused before anything is sharded
    from lorakit import distributed as D
    net = nn.Sequential(nn.Linear(8, 8))
    lorakit.inject(net, LoraConfig(r=2, targets=["0"], use_dora=True))
    with pytest.raises(LoraError, match="not supported under FSDP2"):
        D.fully_shard_model(net)


def test_dora_with_an_init_that_rewrites_w_is_refused():
    for init in ("pissa", "olora", "pissa_niter_4"):
        with pytest.raises(LoraError, match="use_dora with init"):
            LoraConfig(r=2, targets=["0"], use_dora=True, init=init)
