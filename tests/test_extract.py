"""lorakit.extract / lorakit.spectra against numpy's SVD (float64) and the tuned model."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import lorakit
from lorakit.ops.extraction import effective_rank, extract, spectra

F64 = torch.float64


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.q = nn.Linear(16, 24)
        self.conv = nn.Conv2d(3, 12, 3)
        self.head = nn.Linear(24, 5)

    def forward(self, ids, img):
        return self.head(self.q(self.emb(ids))).sum(1) + self.conv(img).mean((2, 3)).sum(1, keepdim=True)


def low_rank(shape, r, gen):
    """A random update of exactly rank r in W's layout (Embedding: (num, dim) = (B·A)ᵀ's shape)."""
    rows, cols = shape[0], math.prod(shape[1:])
    return (torch.randn(rows, r, generator=gen, dtype=F64) @ torch.randn(r, cols, generator=gen, dtype=F64)).reshape(shape)


def pair(rank=None, seed=0):
    """(base, tuned): tuned = base + a rank-``rank`` update (full rank if None) on emb, q and conv,
    and a different head."""
    torch.manual_seed(seed)
    base = Tiny().to(F64)
    tuned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("emb", "q", "conv"):
            w = getattr(tuned, name).weight
            w += low_rank(w.shape, rank, gen) if rank else torch.randn(w.shape, generator=gen, dtype=F64)
        tuned.head.weight.mul_(-2)
    return base, tuned


INPUTS = (torch.tensor([[1, 5, 7]]), torch.randn(2, 3, 6, 6, dtype=F64, generator=torch.Generator().manual_seed(1)))


def test_an_update_of_known_rank_is_recovered_exactly(tmp_path):
    base, tuned = pair(rank=3)
    report = extract(base, tuned, rank=3, targets=["emb", "q", "conv"], modules_to_save=["head"])
    for path, layer in report.layers.items():
        assert layer.rank == 3 and layer.error < 1e-7 and layer.energy == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(base(*INPUTS), tuned(*INPUTS), rtol=1e-6, atol=1e-6)  # fp32 factors
    lorakit.save(base, tmp_path / "x", dtype=F64)
    fresh = copy.deepcopy(pair(rank=3)[0])
    lorakit.load(fresh, tmp_path / "x")
    assert torch.equal(fresh(*INPUTS), base(*INPUTS))


def test_error_is_the_discarded_singular_values_share_and_energy_picks_the_rank():
    base, tuned = pair()
    report = extract(copy.deepcopy(base), tuned, rank=4, targets=["emb", "q", "conv"])
    for path, layer in report.layers.items():
        w0, w1 = (getattr(m, path).weight.detach().numpy() for m in (base, tuned))
        d = w1 - w0
        d = d.T if path == "emb" else d.reshape(d.shape[0], -1)
        s = np.linalg.svd(d, compute_uv=False)
        share = (s[4:] ** 2).sum() / (s ** 2).sum()
        assert layer.error == pytest.approx(math.sqrt(share), rel=1e-6)  # measured from the stored fp32 factors
        assert layer.energy == pytest.approx(1 - share, rel=1e-12)
        np.testing.assert_allclose(layer.singular_values.numpy(), s, rtol=1e-10)
    report = extract(copy.deepcopy(base), tuned, energy=0.9, targets=["emb", "q", "conv"])
    for path, layer in report.layers.items():
        s = layer.singular_values.numpy()
        cum = np.cumsum(s ** 2) / (s ** 2).sum()
        assert layer.rank == int(np.argmax(cum >= 0.9)) + 1
        assert layer.energy >= 0.9 > (cum[layer.rank - 2] if layer.rank > 1 else 0)


def test_spectra_read_from_the_file_equal_the_svd_of_s_b_a(tmp_path):
    base, tuned = pair(rank=5)
    extract(base, tuned, rank=2, targets=["q", "conv", "emb"])
    lorakit.save(base, tmp_path / "x", dtype=F64)
    got = spectra(tmp_path / "x")
    assert sorted(got) == ["conv", "emb", "q"]
    for path, layer in lorakit.lora_layers(base):
        a, b = layer.lora_A["default"].detach().to(F64), layer.lora_B["default"].detach().to(F64)
        want = np.linalg.svd((b.flatten(1) @ a.flatten(1)).numpy() * layer.scale["default"], compute_uv=False)[:2]
        np.testing.assert_allclose(got[path].numpy(), want, rtol=1e-9)
    assert effective_rank(torch.tensor([3.0, 1.0, 0.1]), 0.9) == 2  # 9 / 10.01 = 0.8991 < 0.9
    assert effective_rank(torch.tensor([3.0, 0.5]), 0.9) == 1  # 9 / 9.25
    assert effective_rank(torch.zeros(4), 0.9) == 1


class Wider(Tiny):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 32)


class NoConv(Tiny):
    def __init__(self):
        super().__init__()
        del self.conv


@pytest.mark.parametrize("tuned,kwargs,fragment", [
    (Wider, dict(rank=2), r"q.weight: shape \(32, 16\) in the tuned model, \(24, 16\) in the base"),
    (NoConv, dict(rank=2), r"conv.weight: the tuned model has no such weight"),
    (Tiny, dict(rank=17), r"q: rank 17 > min\(d, k\) = 16 of its 24x16 update"),
    (Tiny, dict(rank=2, energy=0.9), r"exactly one of rank="),
    (Tiny, dict(energy=1.5), r"energy must be a number in \(0, 1\]"),
    (Tiny, dict(rank=2, targets=["nope"]), r"target 'nope' matches no module"),
    (Tiny, dict(rank=2, modules_to_save=["head"], targets=["q"]), None),
])
def test_mismatches_are_refused_naming_the_module_and_nothing_changes(tuned, kwargs, fragment):
    base = Tiny().to(F64)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    other = tuned().to(F64)
    if fragment is None:  # the head differs in shape: refused, naming it
        other.head = nn.Linear(24, 7).to(F64)
        fragment = r"head: modules_to_save needs the same module in the tuned model; its state differs"
    kwargs.setdefault("targets", ["q", "conv"])
    with pytest.raises(lorakit.LoraError, match=fragment):
        extract(base, other, **kwargs)
    assert not lorakit.state.has_adapters(base)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())


def test_cli_extract_recovers_a_low_rank_fine_tune_and_refuses_mismatched_models(tmp_path, capsys):
    from test_algebra import save_tiny_llama
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from lorakit.cli import main
    base_dir = save_tiny_llama(tmp_path / "base")
    tuned = AutoModelForCausalLM.from_pretrained(base_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in tuned.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.v_proj):
                lin.weight += 0.1 * low_rank(lin.weight.shape, 2, gen).float()
    tuned.save_pretrained(tmp_path / "tuned")  # the weights alone: no tokenizer needed
    assert main(["extract", "--base", str(base_dir), "--tuned", str(tmp_path / "tuned"), "--rank", "2",
                 "--targets", "q_proj,v_proj", "--out", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in out and "energy kept" in out
    model = lorakit.load(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "x")
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(model(ids).logits, tuned(ids).logits, rtol=1e-4, atol=1e-4)
    LlamaForCausalLM(LlamaConfig(vocab_size=tuned.config.vocab_size, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, intermediate_size=32,
                                 max_position_embeddings=32)).save_pretrained(tmp_path / "other")
    capsys.readouterr()
    assert main(["extract", "--base", str(base_dir), "--tuned", str(tmp_path / "other"), "--energy", "0.9",
                 "--targets", "q_proj,v_proj", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.v_proj.weight: shape (16, 16) in the tuned model, (8, 16) in the base" in err
    assert err.count("\n") == 1 and not (tmp_path / "bad").exists()


def test_a_quantized_base_is_refused():
    pytest.importorskip("bitsandbytes")
    base, tuned = Tiny(), Tiny()
    lorakit.quantize(base, "int8", skip=["head"])
    with pytest.raises(lorakit.LoraError, match=r"q.weight: the base weight is stored packed"):
        extract(base, tuned, rank=2, targets=["q"])
    assert not lorakit.state.has_adapters(base)


def _tiny_bert_pair(tmp_path, rank=2):
    """A tiny BertModel saved as ``base`` and a ``tuned`` copy whose every targeted (all-linear) weight
    moved by an update of exactly rank ``rank`` (float64 checkpoints: the differences are exactly low rank)."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    base = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=16)).to(F64).eval()
    base.save_pretrained(tmp_path / "base")
    tuned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, module in tuned.named_modules():
            if isinstance(module, nn.Linear):
                module.weight += 0.05 * low_rank(module.weight.shape, rank, gen)
    tuned.save_pretrained(tmp_path / "tuned")
    return base, tuned


def test_cli_extract_loads_a_bert_model_as_its_own_architecture(tmp_path, capsys):
    """No --task: the tuned folder's class (BertModel), so the adapter's keys have no ``bert.`` prefix and
    lorakit.load(AutoModel...) takes it. Oracle (float64): the tuned model itself, since base + ΔW with
    ΔW exactly rank 2 is the tuned model; the error left is the adapter's fp32 factors (relative 6e-8)."""
    import json

    from transformers import AutoModel

    from lorakit.cli import main
    _, tuned = _tiny_bert_pair(tmp_path)
    assert main(["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "--rank", "2",
                 "--out", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    assert "encoder.layer.0.attention.self.query" in out and "bert." not in out
    record = json.loads((tmp_path / "x" / "lorakit_task.json").read_text())
    assert record["architecture"] == "BertModel" and "task" not in record
    model = lorakit.load(AutoModel.from_pretrained(tmp_path / "base", dtype=F64), tmp_path / "x").eval()
    assert len(list(lorakit.lora_layers(model))) == 13  # q, k, v, attention output, intermediate, output x 2, pooler
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    with torch.no_grad():
        got, want, before = model(ids).last_hidden_state, tuned(ids).last_hidden_state, \
            AutoModel.from_pretrained(tmp_path / "base", dtype=F64)(ids).last_hidden_state
    assert (want - before).abs().max() > 0.1  # the fine-tune changed the outputs ...
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # ... and the adapter reproduces it


def test_cli_extract_refuses_a_task_that_would_add_an_uninitialised_head(tmp_path, capsys):
    """--task causal-lm on a BertModel folder would load BertLMHeadModel, whose prediction head the
    folder does not hold: refused naming those weights, exit 2, one line, nothing written."""
    from lorakit.cli import main
    _tiny_bert_pair(tmp_path)
    capsys.readouterr()
    assert main(["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "--rank", "2",
                 "--task", "causal-lm", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "does not hold" in err and "BertLMHeadModel" in err and "cls.predictions.transform.dense.weight" in err
    assert "leave --task out" in err and "BertModel" in err
    assert err.count("\n") == 1 and "Traceback" not in err and not (tmp_path / "x").exists()
