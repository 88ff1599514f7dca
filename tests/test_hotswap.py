"""Hot-swapping adapters under torch.compile (``lorakit.prepare_hotswap`` + ``lorakit.load``).

Oracle: the textbook output in float64, computed here from the file alone (its tensors and
adapter_config.json): W + s·B·A per module (DoRA: m ⊙ (W + ΔW)/‖W + ΔW‖), s = α/r or α/√r with
PEFT's rank_pattern / alpha_pattern lookup, run through a float64 copy of the base model.
Tolerance: a multiple of the fp32 error of the same computation, measured as the error of a fresh,
unprepared, uncompiled lorakit load of the same file against the same oracle (and at least 64 fp32
epsilons of the output's magnitude): ``max(8·e_fresh, 64·eps32·max|y64|)``.

Zero recompiles: ``torch._dynamo.reset()`` first, the compiled model warmed up in every mode the
test then uses, then the swaps run under ``torch._dynamo.config.patch(error_on_recompile=True)``,
with ``fullgraph=True`` (a graph break would hide work from the check) and the number of compiled
graphs compared before and after.
"""

import json
import math
import re
import time
import warnings
from collections import OrderedDict

import pytest
import torch
import torch._dynamo
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit import LoraConfig, LoraError
from lorakit.batching import rowlora
from lorakit.files import reader

EPS32 = torch.finfo(torch.float32).eps
IDS = torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(0))


class Net(nn.Module):
    """Embedding -> Linear -> ReLU -> Linear: three layer kinds' worth of padding (embedding, linear)."""

    def __init__(self):
        super().__init__()
        self.emb, self.up, self.down = nn.Embedding(40, 16), nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, ids):
        return self.down(torch.relu(self.up(self.emb(ids))))


def _net():
    torch.manual_seed(0)
    return Net()


def _lin():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(up=nn.Linear(16, 32), act=nn.ReLU(), down=nn.Linear(32, 8)))


def _write(folder, make, seed, targets=("emb", "up", "down"), **cfg):
    """Save an adapter of ``LoraConfig(**cfg)`` with random non-zero A, B (and DoRA m) to ``folder``."""
    model = lorakit.inject(make(), LoraConfig(targets=list(targets), **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for t in (layer.lora_A["default"], layer.lora_B["default"]):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            for m in layer.lora_magnitude_vector.values():
                m.mul_(1 + 0.2 * torch.rand(m.shape, generator=g))
    return lorakit.save(model, folder)


def _pattern(patterns, path, default):
    for key, value in patterns.items():  # PEFT's rule: the first key matching (.*\.)?key$
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


@torch.no_grad()
def _oracle(make, folder, x):
    """The file's output in float64 by the textbook formula (independent of lorakit's code)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = {k: t.double() for k, t in load_file(folder / "adapter_model.safetensors").items()}
    model = make().double()
    state = model.state_dict()
    for key, a in tensors.items():
        if not re.search(r"\.lora_(embedding_)?A(\.weight)?$", key):
            continue
        path = re.sub(r"\.lora_(embedding_)?A(\.weight)?$", "", key[len("base_model.model."):])
        b = tensors[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
        r, alpha = _pattern(cfg["rank_pattern"], path, cfg["r"]), _pattern(cfg["alpha_pattern"], path, cfg["lora_alpha"])
        assert a.shape[0] == r
        w = state[f"{path}.weight"]
        delta = (alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r) * (b.flatten(1) @ a.flatten(1))
        v = w + (delta.t() if "embedding" in key else delta.reshape(w.shape))
        if cfg["use_dora"]:  # linear: m per output row
            v = v * (tensors[f"base_model.model.{path}.lora_magnitude_vector"] / v.norm(dim=1))[:, None]
        state[f"{path}.weight"] = v
    model.load_state_dict(state)
    return model(x if not x.is_floating_point() else x.double())


def _check(y, make, folder, x):
    """``y`` equals the float64 oracle within a multiple of the fp32 error of a fresh load of the file."""
    y64 = _oracle(make, folder, x)
    with torch.no_grad():
        fresh = lorakit.load(make(), folder)(x)
    tol = max(8 * (fresh.double() - y64).abs().max().item(), 64 * EPS32 * y64.abs().max().item())
    err = (y.detach().double() - y64).abs().max().item()
    assert err <= tol, f"{folder.name}: max |y - oracle| {err:.3g} > {tol:.3g}"


def _graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _files(tmp_path, make=_net, targets=("emb", "up", "down")):
    """Three adapters of ranks 4, 8, 16 with different alphas, rsLoRA, rank_pattern and alpha_pattern."""
    return [_write(tmp_path / "r4", make, 1, targets, r=4, alpha=8),
            _write(tmp_path / "r8", make, 2, targets, r=8, alpha=3, use_rslora=True, alpha_pattern={"up": 11}),
            _write(tmp_path / "r16", make, 3, targets, r=16, alpha=40, rank_pattern={"down": 2})]


def _state(model):
    """Everything a refused swap must leave as it was."""
    reg = lorakit.registry(model)
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {p: ({n: float(s) for n, s in layer.scale.items()}, dict(layer.true_rank), dict(layer.dropout))
             for p, layer in lorakit.lora_layers(model)}, dict(reg.configs), reg.active)


def _same_state(a, b):
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1:] == b[1:]


# -- prepare ------------------------------------------------------------------------------------
def test_prepare_pads_exactly_and_keeps_true_rank(tmp_path):
    files = _files(tmp_path)
    model = lorakit.load(_net(), files[1])
    before = model(IDS)
    lorakit.prepare_hotswap(model, max_rank=16)
    for path, layer in lorakit.lora_layers(model):
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        r = 8
        assert a.shape[0] == b.shape[1] == 16 and layer.rank("default") == r == layer.true_rank["default"]
        assert not a[r:].any() and not b[:, r:].any()  # the padding is zeros
        assert isinstance(layer.scale["default"], torch.Tensor) and layer.scale["default"].dtype == torch.float64
        cfg = lorakit.registry(model).configs["default"]
        assert float(layer.scale["default"]) == cfg.scale_for(path)  # the float, exactly
    _check(model(IDS), _net, files[1], IDS)
    _check(before, _net, files[1], IDS)
    assert {p: r for p, ranks in lorakit.summary(model).modules.items() for r in ranks.values()} == \
        {"emb": 8, "up": 8, "down": 8}
    assert "ranks={'default': 8}, padded to {'default': 16}" in repr(model.up)
    lorakit.prepare_hotswap(model, max_rank=8)  # again, to another padding (here none beyond the rank)
    assert model.up.lora_A["default"].shape == (8, 16) and model.up.rank("default") == 8
    _check(model(IDS), _net, files[1], IDS)


def test_prepare_refusals_change_nothing(tmp_path):
    f = _write(tmp_path / "a", _net, 1, r=8, alpha=8)
    model = lorakit.load(_net(), f)
    state = _state(model)
    with pytest.raises(LoraError, match="rank 8 .* > max_rank=4; pass max_rank >= 8"):
        lorakit.prepare_hotswap(model, max_rank=4)
    with pytest.raises(LoraError, match="max_rank must be an integer >= 1"):
        lorakit.prepare_hotswap(model, max_rank=0)
    with pytest.raises(LoraError, match="before torch.compile"):
        lorakit.prepare_hotswap(torch.compile(model, backend="eager"), max_rank=16)
    with pytest.raises(LoraError, match="unknown adapter"):
        lorakit.prepare_hotswap(model, max_rank=16, adapters=["nope"])
    lorakit.merge(model)
    with pytest.raises(LoraError, match="merged"):
        lorakit.prepare_hotswap(model, max_rank=16)
    lorakit.unmerge(model)
    _same_state(state, _state(model))
    pissa = lorakit.inject(_lin(), LoraConfig(r=2, targets=["up"], init="pissa"))
    with pytest.raises(LoraError, match="init 'pissa'.* cannot be hot-swapped"):
        lorakit.prepare_hotswap(pissa, max_rank=4)

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 8, 4))

        def forward(self, x):
            return torch.einsum("bi,eoi->beo", x, self.w)

    experts = lorakit.inject(nn.Sequential(OrderedDict(moe=Experts())), LoraConfig(r=2, target_parameters=["moe.w"]))
    with pytest.raises(LoraError, match="not as A's rows and B's columns"):
        lorakit.prepare_hotswap(experts, max_rank=4)
    assert [layer.lora_A["default"].shape for _, layer in lorakit.lora_layers(experts)] == [(6, 4)]


# -- swapping under torch.compile ----------------------------------------------------------------
def test_hotswap_eager_backend_zero_recompiles(tmp_path):
    files = _files(tmp_path)
    model = lorakit.prepare_hotswap(lorakit.load(_net(), files[0]), max_rank=16)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        compiled(IDS)  # the two modes used below, compiled once each
    compiled(IDS)
    graphs = _graphs()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for f in [*files[1:], files[0], files[2]]:  # up and down in rank: the old factors' tail must be zeroed
            lorakit.load(compiled, f)
            with torch.no_grad():
                _check(compiled(IDS), _net, f, IDS)
            _check(compiled(IDS), _net, f, IDS)
            for _, layer in lorakit.lora_layers(model):  # zero padding on both sides (so training keeps it zero)
                r = layer.rank("default")
                assert not layer.lora_A["default"][r:].any() and not layer.lora_B["default"][:, r:].any()
            cfg = json.loads((f / "adapter_config.json").read_text())
            assert lorakit.summary(model).modules == {p: {"default": _pattern(cfg["rank_pattern"], p, cfg["r"])}
                                                      for p in ("emb", "up", "down")}
    assert _graphs() == graphs


def test_hotswap_inductor_zero_recompiles(tmp_path):
    files = _files(tmp_path, _lin, ("up", "down"))
    model = lorakit.prepare_hotswap(lorakit.load(_lin(), files[0]), max_rank=16).eval()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    start = time.perf_counter()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    with torch.no_grad():
        compiled(x)
        graphs = _graphs()
        with torch._dynamo.config.patch(error_on_recompile=True):
            for f in [*files[1:], files[0]]:
                lorakit.load(compiled, f)
                _check(compiled(x), _lin, f, x)
    assert _graphs() == graphs
    if time.perf_counter() - start > 60:
        warnings.warn(f"inductor hot-swap test took {time.perf_counter() - start:.0f} s")


def test_swap_then_eval_train_and_dtype(tmp_path):
    files = _files(tmp_path)
    model = lorakit.prepare_hotswap(lorakit.load(_net(), files[0]), max_rank=16)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for mode in (model.eval, model.train):  # each mode compiled once (training is a guarded flag)
        mode()
        compiled(IDS)
    with torch._dynamo.config.patch(error_on_recompile=True):
        lorakit.load(compiled, files[2])
        model.eval()
        _check(compiled(IDS), _net, files[2], IDS)
        model.train()  # dropout 0: the same function
        _check(compiled(IDS), _net, files[2], IDS)
    model.double()  # a dtype change (uncompiled): the scale tensors keep their exact float64 values
    lorakit.load(model, files[1])
    assert model.up.lora_A["default"].dtype == torch.float64
    assert float(model.up.scale["default"]) == lorakit.registry(model).configs["default"].scale_for("up")
    y64 = _oracle(_net, files[1], IDS)
    assert (model(IDS) - y64).abs().max() <= 64 * torch.finfo(torch.float64).eps * y64.abs().max()


def test_dora_hotswap(tmp_path):
    files = [_write(tmp_path / f"d{r}", _lin, r, ("up", "down"), r=r, alpha=a, use_dora=True)
             for r, a in ((4, 8), (8, 5), (16, 16))]
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    model = lorakit.prepare_hotswap(lorakit.load(_lin(), files[0]), max_rank=16)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for f in [*files[1:], files[0]]:
                lorakit.load(compiled, f)
                _check(compiled(x), _lin, f, x)


def test_conv_hotswap(tmp_path):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 8, 3, padding=1), act=nn.ReLU(), proj=nn.Conv2d(8, 4, 1)))

    files = [_write(tmp_path / f"c{r}", make, r, ("conv", "proj"), r=r, alpha=a) for r, a in ((2, 4), (6, 3))]
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    model = lorakit.prepare_hotswap(lorakit.load(make(), files[0]), max_rank=8)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for f in (files[1], files[0]):
                lorakit.load(compiled, f)
                _check(compiled(x), make, f, x)


# -- refusals -----------------------------------------------------------------------------------
def test_refused_swaps_change_nothing(tmp_path):
    ok = _write(tmp_path / "ok", _net, 1, r=4, alpha=8)
    model = lorakit.prepare_hotswap(lorakit.load(_net(), ok), max_rank=8)
    state = _state(model)
    bad = {"above the padding to 8": _write(tmp_path / "big", _net, 2, r=16, alpha=8),
           "adapts other modules": _write(tmp_path / "other", _net, 3, ("up", "down"), r=4, alpha=8),
           "use_dora is True in the file": _write(tmp_path / "dora", _net, 4, ("up", "down", "emb"), r=4, alpha=8,
                                                  use_dora=True),
           "dropout 0.1 in the file": _write(tmp_path / "drop", _net, 5, r=4, alpha=8, dropout=0.1)}
    for why, f in bad.items():
        for call in (lorakit.load, lorakit.verify):
            with pytest.raises(LoraError, match=f"cannot be hot-swapped into adapter 'default': .*{why}"):
                call(model, f)
        _same_state(state, _state(model))
    with pytest.raises(LoraError, match="prepared for hot-swapping"):
        reader.load(model, ok)  # the files layer's own load does not pad: it refuses
    assert lorakit.verify(model, bad["above the padding to 8"], adapter="new").r == 16  # another name: a new adapter
    _check(model(IDS), _net, ok, IDS)


# -- files ----------------------------------------------------------------------------------------
def _same_files(a, b):
    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert json.loads((a / "adapter_config.json").read_text()) == json.loads((b / "adapter_config.json").read_text())


def test_save_writes_the_true_rank(tmp_path):
    files = _files(tmp_path)
    model = lorakit.prepare_hotswap(lorakit.load(_net(), files[1]), max_rank=16)
    _same_files(lorakit.save(model, tmp_path / "after_prepare"), files[1])
    for f in (files[0], files[2]):
        lorakit.load(model, f)
        out = lorakit.save(model, tmp_path / f"saved_{f.name}")
        _same_files(out, f)


def test_peft_hotswap_accepts_lorakit_files(tmp_path):
    peft = pytest.importorskip("peft")
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

    files = [_write(tmp_path / f"l{r}", _lin, r, ("up", "down"), r=r, alpha=a) for r, a in ((4, 8), (8, 3), (16, 40))]
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(_lin(), str(files[0]))
        prepare_model_for_compiled_hotswap(pm, target_rank=16)
        for f in [*files[1:], files[0]]:
            hotswap_adapter(pm, str(f), adapter_name="default", torch_device="cpu")
            with torch.no_grad():
                _check(pm(x), _lin, f, x)


def test_lorakit_hotswaps_peft_files(tmp_path):
    peft = pytest.importorskip("peft")
    files = []
    for r, a in ((4, 8), (8, 3), (16, 40)):
        torch.manual_seed(r)
        pm = peft.get_peft_model(_lin(), peft.LoraConfig(r=r, lora_alpha=a, target_modules=["up", "down"],
                                                         init_lora_weights=False))
        pm.save_pretrained(tmp_path / f"p{r}")
        files.append(tmp_path / f"p{r}")
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    model = lorakit.prepare_hotswap(lorakit.load(_lin(), files[0]), max_rank=16)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for f in [*files[1:], files[0]]:
                lorakit.load(compiled, f)
                y = compiled(x)
                _check(y, _lin, f, x)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _check(peft.PeftModel.from_pretrained(_lin(), str(f))(x), _lin, f, x)  # PEFT's own, same oracle


# -- everything else on a prepared model ------------------------------------------------------------
def test_merge_unmerge_summary_delete_on_prepared(tmp_path):
    files = _files(tmp_path)
    model = lorakit.prepare_hotswap(lorakit.load(_net(), files[0]), max_rank=16)
    lorakit.load(model, files[2])
    weights = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    unmerged = model(IDS)
    plain = lorakit.load(_net(), files[2])
    lorakit.merge(model)
    lorakit.merge(plain)
    _check(model(IDS), _net, files[2], IDS)
    for path in ("emb", "up", "down"):  # W + ΔW rounded once from float64: padding adds exact zeros
        w, w0 = getattr(model, path).weight, getattr(plain, path).weight
        assert (w - w0).abs().max() <= EPS32 * w0.abs().max()
    lorakit.unmerge(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())  # bit-exact
    assert torch.equal(model(IDS), unmerged)
    assert lorakit.summary(model).modules == {"emb": {"default": 16}, "up": {"default": 16}, "down": {"default": 2}}
    lorakit.delete(model, "default")
    assert not list(lorakit.lora_layers(model))
    torch.testing.assert_close(model(IDS), _net()(IDS), rtol=0, atol=0)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "plain"])
def test_mixed_batches_see_the_swap(tmp_path, kernel):
    if kernel and not rowlora.available():
        pytest.skip("the row kernel could not be built here")
    files = _files(tmp_path)
    model = lorakit.load(_net(), files[0], adapter="a")
    lorakit.load(model, files[1], adapter="b")
    lorakit.prepare_hotswap(model, max_rank=16)
    was = rowlora._wanted
    rowlora.use(kernel)
    try:
        rows = ["a", "b", None, "a"]
        base = _net()
        with torch.no_grad():
            for a_file in (files[0], files[2], files[0]):  # swap "a" between forwards: no cache may serve stale factors
                lorakit.load(model, a_file, adapter="a", activate=False)
                with lorakit.mixed(model, rows):
                    y = model(IDS)
                for i, name in enumerate(rows):
                    if name is None:
                        torch.testing.assert_close(y[i], base(IDS)[i], rtol=0, atol=64 * EPS32 * y.abs().max().item())
                    else:
                        _check(y[i:i + 1], _net, a_file if name == "a" else files[1], IDS[i:i + 1])
    finally:
        rowlora.use(was)


def test_training_and_combine_on_prepared(tmp_path):
    f = _write(tmp_path / "a", _net, 1, r=4, alpha=8, rank_pattern={"up": 2})
    plain, prepared = lorakit.load(_net(), f), lorakit.prepare_hotswap(lorakit.load(_net(), f), max_rank=16)
    for model in (plain, prepared):  # one SGD step; the padding gets zero gradients and stays zero
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model(IDS).square().mean().backward()
        opt.step()
    for (path, a), (_, b) in zip(lorakit.lora_layers(plain), lorakit.lora_layers(prepared)):
        r = a.rank("default")
        assert b.rank("default") == r and not b.lora_A["default"][r:].any() and not b.lora_B["default"][:, r:].any()
        for x, y in zip((a.lora_A["default"], a.lora_B["default"]), b.factors("default")):
            assert (x - y).abs().max() <= 64 * EPS32 * x.abs().max(), path  # the same step, up to fp32 rounding
    for model in (plain, prepared):
        lorakit.combine(model, {"default": 0.5}, method="cat", adapter="combo", activate=True)
    assert lorakit.summary(prepared).modules == lorakit.summary(plain).modules
    y, y0 = prepared(IDS), plain(IDS)
    assert (y - y0).abs().max() <= 64 * EPS32 * y0.abs().max()
