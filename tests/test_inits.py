"""PiSSA / OLoRA inits that rewrite W (lorakit.variants.rewriting_inits), their conversion to plain LoRA, and the
train flags --init / --rslora / --loraplus-ratio.

Oracles: the un-injected model (output unchanged at init), float64 SVD / QR of W (the textbook
definitions), real PEFT 0.21 (its pissa_init / olora_init factors and residual; PEFT loading
lorakit's files, plain and converted; lorakit loading PEFT's converted file), and the trained model
itself for the conversion (unmodified base + converted file must reproduce it).
"""

import copy
import json
import math
import warnings

import pytest
import torch
from test_cli import tiny_bert  # noqa: F401  (a fixture)
from torch import nn

import lorakit
from lorakit import LoraConfig, LoraError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOL = 1e-5


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(24, 20)
        self.v = nn.Linear(20, 16)
        self.emb = nn.Embedding(30, 24)

    def forward(self, x):
        return self.v(torch.tanh(self.q(x)))


def _net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def _x(seed=1):
    return torch.randn(6, 24, generator=torch.Generator().manual_seed(seed))


def _train_like(model, seed=3, std=0.05):
    """Move every trainable factor away from its init (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def _close(a, b, tol=TOL):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol * max(b.abs().max().item(), 1.0), f"max |diff| {err:.3g}"


def _truncated_svd64(w, r):
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


# -- the init itself ------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_4"])
def test_output_unchanged_at_init(init):
    base = _net()
    model = copy.deepcopy(base)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["q", "v"], init=init))
    _close(model(_x()), base(_x()))
    assert not torch.equal(model.q.base_layer.weight, base.q.weight)  # W really holds a residual


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_factors_are_the_truncated_svd(rslora):
    base = _net()
    model = copy.deepcopy(base)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["q"], init="pissa", use_rslora=rslora))
    layer, s = model.q, (8 / math.sqrt(4) if rslora else 8 / 4)
    top = _truncated_svd64(base.q.weight, 4)
    ba = s * layer.lora_B["default"].double() @ layer.lora_A["default"].double()
    _close(ba, top)
    _close(layer.base_layer.weight, base.q.weight.double() - top)
    # A = √(S/s)·Vᵀ, B = U·√(S/s): both factors carry the same singular values
    _close(layer.lora_A["default"].double().norm(dim=1), layer.lora_B["default"].double().norm(dim=0))


def test_olora_factors_are_the_qr():
    base = _net()
    model = copy.deepcopy(base)
    lorakit.inject(model, LoraConfig(r=3, alpha=6, targets=["q"], init="olora"))
    b, a = model.q.lora_B["default"].double(), model.q.lora_A["default"].double()
    q, r = torch.linalg.qr(base.q.weight.double())
    _close(b.t() @ b, torch.eye(3, dtype=torch.float64))  # orthonormal columns
    _close(b @ a, q[:, :3] @ r[:3])  # B = Q_r, A = R_r (PEFT's olora_init); W keeps W - s·Q_r·R_r
    _close(model.q.base_layer.weight, base.q.weight.double() - 2.0 * q[:, :3] @ r[:3])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_factors_and_residual_match_peft(init):
    base = _net()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                                                  init_lora_weights=init))
    model = copy.deepcopy(base)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["q", "v"], init=init))
    for name in ("q", "v"):
        theirs = getattr(pm.base_model.model, name)
        _close(getattr(model, name).lora_A["default"], theirs.lora_A["default"].weight)
        _close(getattr(model, name).lora_B["default"], theirs.lora_B["default"].weight)
        _close(getattr(model, name).base_layer.weight, theirs.base_layer.weight)


def test_conv1d_pissa_matches_peft():
    from transformers import GPT2Config, GPT2Model
    torch.manual_seed(0)
    base = GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=50, n_positions=16)).eval()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                                      init_lora_weights="pissa", fan_in_fan_out=True))
    model = copy.deepcopy(base)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["c_attn"], init="pissa"))
    _close(model(ids).last_hidden_state, base(ids).last_hidden_state)
    ours, theirs = model.h[0].attn.c_attn, pm.base_model.model.h[0].attn.c_attn
    _close(ours.base_layer.weight, theirs.base_layer.weight)
    _close(ours.lora_B["default"], theirs.lora_B["default"].weight)


# -- W changes: merge / unmerge / disabled / delete -------------------------------------------------
def test_merge_unmerge_delete_disabled():
    base = _net()
    model = copy.deepcopy(base)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["q", "v"], init="pissa"))
    residual = {n: getattr(model, n).base_layer.weight.detach().clone() for n in ("q", "v")}
    _train_like(model)
    trained = model(_x())
    lorakit.merge(model)
    _close(model(_x()), trained)
    lorakit.unmerge(model)
    assert all(torch.equal(getattr(model, n).base_layer.weight, residual[n]) for n in ("q", "v"))
    # disabled: the residual model (PEFT's behaviour), said by a warning
    oracle = copy.deepcopy(base)
    with torch.no_grad():
        for n in ("q", "v"):
            getattr(oracle, n).weight.copy_(base.state_dict()[f"{n}.weight"].double()
                                            - _truncated_svd64(getattr(base, n).weight, 4))
    with pytest.warns(UserWarning, match="residual model"):
        with lorakit.disabled(model):
            _close(model(_x()), oracle(_x()))
    _close(model(_x()), trained)
    # delete: the original weights come back (two roundings of fp32), as plain modules
    lorakit.delete(model, "default")
    assert type(model.q) is nn.Linear and not lorakit.state.has_adapters(model)
    _close(model.q.weight, base.q.weight)
    _close(model(_x()), base(_x()))


def test_merge_and_unload_is_the_trained_model():
    model = _net()
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["q", "v"], init="olora"))
    _train_like(model)
    trained = model(_x())
    lorakit.merge_and_unload(model)
    assert type(model.q) is nn.Linear
    _close(model(_x()), trained)


# -- saving: as it is, and converted to plain LoRA ------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unconverted_file_loads_like_peft(tmp_path, init):
    """The file records init_lora_weights; loading it on the *unmodified* model rewrites W again
    (lorakit and PEFT alike) and reproduces the trained model."""
    base = _net()
    model = copy.deepcopy(base)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["q", "v"], init=init))
    _train_like(model)
    trained = model(_x())
    lorakit.save(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == init
    ours = lorakit.load(copy.deepcopy(base), tmp_path)
    _close(ours(_x()), trained)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    _close(theirs(_x()), trained)


@pytest.mark.parametrize("init,rslora,pattern", [("pissa", False, False), ("olora", True, True),
                                                  ("pissa_niter_2", False, True)])
def test_converted_file_works_on_the_unmodified_model(tmp_path, init, rslora, pattern):
    base = _net()
    model = copy.deepcopy(base)
    cfg = LoraConfig(r=4, alpha=8, targets=["q", "v"], init=init, use_rslora=rslora,
                     rank_pattern={"v": 2} if pattern else {}, alpha_pattern={"v": 3} if pattern else {})
    lorakit.inject(model, cfg)
    _train_like(model)
    trained = model(_x())
    lorakit.save(model, tmp_path, convert_to_lora=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    assert config["lora_alpha"] == pytest.approx(8 * (math.sqrt(2) if rslora else 2))
    if pattern:
        assert config["rank_pattern"] == {"v": 4}
    _close(lorakit.load(copy.deepcopy(base), tmp_path)(_x()), trained)
    _close(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))(_x()), trained)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_unconverted_file_loads_in_lorakit(tmp_path, init):
    """PEFT's own PiSSA/OLoRA file (init_lora_weights recorded, factors relative to the residual):
    lorakit must rewrite W as PEFT does, not add the factors to the unmodified W."""
    base = _net()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                                                  init_lora_weights=init))
    _train_like(pm)
    trained = pm(_x())
    pm.save_pretrained(str(tmp_path))
    _close(lorakit.load(copy.deepcopy(base), tmp_path)(_x()), trained)


def test_peft_converted_file_loads_in_lorakit(tmp_path):
    base = _net()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                                                  init_lora_weights="pissa"))
    pm.save_pretrained(str(tmp_path / "init"))  # PEFT's recipe: the initial adapter first ...
    _train_like(pm)
    trained = pm(_x())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    _close(lorakit.load(copy.deepcopy(base), tmp_path / "out")(_x()), trained)


# -- refusals: a LoraError, nothing changed --------------------------------------------------------
def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("first,second", [("pissa", "pissa"), ("pissa", "kaiming"), ("kaiming", "olora")])
def test_a_rewriting_adapter_is_alone_on_its_layers(first, second):
    model = _net()
    lorakit.inject(model, LoraConfig(r=2, targets=["q"], init=first), adapter="a")
    before = _weights(model)
    with pytest.raises(LoraError, match=r"q:"):
        lorakit.inject(model, LoraConfig(r=2, targets=["q"], init=second), adapter="b")
    _unchanged(model, before)
    lorakit.inject(model, LoraConfig(r=2, targets=["v"], init=second), adapter="b")  # other layers: fine


@pytest.mark.parametrize("cfg,match", [
    (dict(targets=["emb"], init="pissa"), "Linear and Conv1D"),
    (dict(targets=["q"], r=21, init="olora"), r"r <= min\(out, in\) = 20"),
])
def test_refused_inits(cfg, match):
    model = _net()
    before = _weights(model)
    with pytest.raises(LoraError, match=match):
        lorakit.inject(model, LoraConfig(**cfg))
    _unchanged(model, before)
    assert not lorakit.state.has_adapters(model)


def test_refused_on_tied_and_integer_weights():
    tied = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    tied[1].weight = tied[0].weight
    with pytest.raises(LoraError, match="shared by"):
        lorakit.inject(tied, LoraConfig(r=2, targets=["0"], init="pissa"))
    f64 = _net().to(torch.float64)
    with pytest.raises(LoraError, match="float32/float16/bfloat16"):
        lorakit.inject(f64, LoraConfig(r=2, targets=["q"], init="pissa"))


def test_convert_refused_for_plain_adapter(tmp_path):
    model = _net()
    lorakit.inject(model, LoraConfig(r=2, targets=["q"]))
    with pytest.raises(LoraError, match="without convert_to_lora"):
        lorakit.save(model, tmp_path, convert_to_lora=True)
    assert not (tmp_path / "adapter_config.json").exists()


@pytest.mark.parametrize("init", ["pissa_niter_4", "corda", "loftq"])
def test_load_refuses_inits_it_cannot_reproduce(tmp_path, init):
    model = _net()
    lorakit.inject(model, LoraConfig(r=2, targets=["q"]))
    lorakit.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": init}))
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "adapter_model.safetensors")  # drop lorakit's embedded config
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    fresh = _net()
    with pytest.raises(LoraError, match=f"init_lora_weights='{init}' is not supported"):
        lorakit.load(fresh, tmp_path)
    assert not lorakit.state.has_adapters(fresh)


# -- lorakit train flags ---------------------------------------------------------------------------
def test_train_flags_reach_the_config():
    from lorakit.train.tasks import LoraSpec, _prepare
    model = _net()
    _prepare(model, LoraSpec(targets=("q",), r=4, alpha=8, init="olora", rslora=True), [])
    cfg = lorakit.registry(model).configs["default"]
    assert cfg.init == "olora" and cfg.use_rslora and model.q.scale["default"] == pytest.approx(8 / 2)


def test_loraplus_groups_match_peft():
    """lorakit's LoRA+ learning rates per parameter equal those of PEFT's create_loraplus_optimizer
    (run on the same lorakit model: it groups by parameter name and shape)."""
    from peft.optimizers import create_loraplus_optimizer

    from lorakit.train.loop import TrainConfig, _param_groups
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    lorakit.inject(model, LoraConfig(r=2, targets=["0"], modules_to_save=["2"]))
    theirs = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    lr = lambda groups: {id(p): g["lr"] for g in groups for p in g["params"]}  # noqa: E731
    assert lr(_param_groups(model, TrainConfig(lr=1e-3, lora_plus_ratio=16))) == lr(theirs.param_groups)


def test_serve_refuses_an_unconverted_rewriting_adapter(tmp_path):
    """A served base is shared by every adapter and by base-model requests: a PiSSA/OLoRA file
    (which would rewrite it on load) is refused at registration; its conversion is served."""
    from lorakit.serve.adapters import AdapterError, Adapters
    model = _net()
    lorakit.inject(model, LoraConfig(r=2, targets=["q"], init="pissa"))
    lorakit.save(model, tmp_path / "plain")
    lorakit.save(model, tmp_path / "converted", convert_to_lora=True)
    served = _net()
    adapters = Adapters(served, tmp_path)
    with pytest.raises(AdapterError, match="convert_to_lora"):
        adapters.register("plain", tmp_path / "plain")
    adapters.register("converted", tmp_path / "converted")


def test_save_pretrained_writes_the_original_base(tmp_path):
    """save_pretrained writes 'the base model as before injection': the original W, not the
    residual, so from_pretrained + the saved PiSSA adapter is the trained model again."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    base = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=16)).eval()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    model = copy.deepcopy(base)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["query", "value"], init="pissa"))
    _train_like(model)
    trained = model(ids).last_hidden_state
    model.save_pretrained(tmp_path)
    reloaded = BertModel.from_pretrained(tmp_path).eval()
    q = "encoder.layer.0.attention.self.query.weight"
    _close(reloaded.state_dict()[q], base.state_dict()[q])
    _close(lorakit.load(reloaded, tmp_path / "adapters" / "default")(ids).last_hidden_state, trained)


def test_cli_train_flags(tmp_path, tiny_bert):
    from test_cli import FAST, labelled_csv, refused
    from test_cli import lorakit as cli
    data = labelled_csv(tmp_path / "d.csv")
    code, out, err = cli("train", "--model", tiny_bert, "--data", data, *FAST, "--init", "pissa", "--rslora",
                         "--loraplus-ratio", 16, "--out", tmp_path / "run", cwd=tmp_path)
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "pissa" and config["use_rslora"] is True
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train"]["lora_plus_ratio"] == 16 and summary["lora"]["init"] == "pissa"
    code, out, err = cli("predict", "--adapter", tmp_path / "run" / "adapter", "win money now 3", cwd=tmp_path)
    assert code == 0, err
    refused(cli("train", "--model", tiny_bert, "--data", data, *FAST, "--full", "--init", "olora", cwd=tmp_path),
            "--full")


@pytest.mark.slow
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_minilm_files_both_ways(tmp_path, init):
    """MiniLM query+value r=8: unchanged at init; the unconverted file (PEFT loading it) and the
    converted one (lorakit and PEFT, on the unmodified model) reproduce the trained model."""
    from transformers import AutoModel, AutoTokenizer

    from lorakit import builtin
    base = AutoModel.from_pretrained(builtin.minilm_path()).eval()
    tok = AutoTokenizer.from_pretrained(builtin.minilm_path())
    enc = tok(["The central bank raised rates.", "The striker scored twice."], return_tensors="pt", padding=True)
    out = lambda m: m(**enc).last_hidden_state  # noqa: E731
    model = copy.deepcopy(base)
    lorakit.inject(model, LoraConfig(r=8, alpha=16, targets=["query", "value"], init=init))
    _close(out(model), out(base))
    _train_like(model, std=0.02)
    trained = out(model)
    lorakit.save(model, tmp_path / "plain")
    lorakit.save(model, tmp_path / "converted", convert_to_lora=True)
    _close(out(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "plain"))), trained)
    for folder in ("plain", "converted"):
        _close(out(lorakit.load(copy.deepcopy(base), tmp_path / folder)), trained)
    _close(out(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "converted"))), trained)


def test_mixed_refuses_base_rows_on_a_rewritten_model():
    # a None row means "the base model"; after PiSSA the layers hold the residual, so it would not be that
    model = _net()
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["q"], init="pissa"))
    with pytest.raises(LoraError, match="residual weights that adapters \\['default'\\]"):
        with lorakit.mixed(model, ["default", None]):
            pass
    with lorakit.mixed(model, ["default", "default"]):  # rows that all use the adapter run as usual
        _close(model(torch.stack([_x()[0], _x()[1]])), model(_x()[:2]))
