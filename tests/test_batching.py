"""Mixed-adapter batches against the oracle "each row run alone with its adapter active".

Tolerance: fp32 2e-5, bf16 3e-2 (relative to the output's magnitude); float64 models are checked
to 1e-10.
"""

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorakit
from lorakit import LoraConfig, LoraError

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}


class Net(nn.Module):
    """Every layer kind: Embedding, Linear, GPT-2 Conv1D, Conv1d, a raw parameter."""

    def __init__(self, d=8, vocab=20):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.emb = nn.Embedding(vocab, d)
        self.q, self.v = nn.Linear(d, d), nn.Linear(d, d)
        self.c_attn = Conv1D(d, d)
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.w = nn.Module()
        self.w.weight = nn.Parameter(torch.randn(d, d) / d)

    def forward(self, ids):
        h = self.emb(ids)
        h = torch.tanh(self.q(h) + self.v(h)) + self.c_attn(h)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return h @ self.w.weight.t()


def _wrap_param(net):
    # the raw parameter lives on a bare module whose forward is the matmul itself
    class W(nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

        def forward(self, h):
            return h @ self.weight.t()
    net.w = W(net.w.weight)
    return net


def _build(dtype, seed):
    torch.manual_seed(seed)
    net = _wrap_param(Net()).to(dtype)
    specs = {"a": LoraConfig(r=2, targets=["emb", "q", "conv"]),
             "b": LoraConfig(r=4, targets=["q", "v", "c_attn"], target_parameters=["w.weight"]),
             "c": LoraConfig(r=3, targets=["emb", "v", "c_attn", "conv"])}
    for name, cfg in specs.items():
        lorakit.inject(net, cfg, adapter=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net.eval()


def _alone(net, row, name):
    if name is None:
        with lorakit.disabled(net):
            return net(row)
    lorakit.set_active(net, name)
    return net(row)


@settings(max_examples=30, deadline=None)
@given(rows=st.lists(st.sampled_from(["a", "b", "c", None]), min_size=1, max_size=7),
       dtype=st.sampled_from(list(TOL)), seed=st.integers(0, 99))
def test_mixed_batch_equals_each_row_alone(rows, dtype, seed):
    net = _build(dtype, seed)
    x = torch.randint(0, 20, (len(rows), 5), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        with lorakit.mixed(net, rows):
            y = net(x)
        for i, name in enumerate(rows):
            ref = _alone(net, x[i:i + 1], name)[0]
            err = (y[i].double() - ref.double()).abs().max().item()
            assert err <= TOL[dtype] * max(ref.abs().max().item(), 1.0), (i, name, err)


def test_routing_is_cleared_on_exception_and_scoped_per_thread():
    net = _build(torch.float64, 0)
    x = torch.randint(0, 20, (2, 5))
    lorakit.set_active(net, "a")
    plain = net(x)
    with pytest.raises(RuntimeError):
        with lorakit.mixed(net, ["b", "c"]):
            raise RuntimeError("forward failed")
    assert torch.equal(net(x), plain)  # no routing left behind

    results, barrier = {}, threading.Barrier(2)

    def serve(names):
        with torch.no_grad(), lorakit.mixed(net, names):
            barrier.wait()  # both routings are open at the same time
            results[tuple(names)] = net(x)
    threads = [threading.Thread(target=serve, args=(n,)) for n in (["b", "b"], ["c", None])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with torch.no_grad():
        torch.testing.assert_close(results[("b", "b")], _alone(net, x, "b"), atol=1e-10, rtol=0)
        torch.testing.assert_close(results[("c", None)][1], _alone(net, x[1:], None)[0], atol=1e-10, rtol=0)


def test_repeated_rows_for_beams_and_errors():
    net = _build(torch.float64, 1)
    x = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        with lorakit.mixed(net, ["a", "c"]):
            y = net(x.repeat_interleave(3, 0))  # 3 beams per request
        for j in range(6):
            torch.testing.assert_close(y[j], _alone(net, x[j // 3:j // 3 + 1], "ac"[j // 3])[0], atol=1e-10, rtol=0)
        with pytest.raises(LoraError, match="batch has 5 rows but the routing names 2"):
            with lorakit.mixed(net, ["a", "c"]):
                net(torch.randint(0, 20, (5, 5)))
    with pytest.raises(LoraError, match=r"unknown adapter\(s\) \['zz'\]"):
        with lorakit.mixed(net, ["a", "zz"]):
            pass
    lorakit.set_active(net, "a")
    lorakit.merge(net)
    with pytest.raises(LoraError, match="merged"):
        with lorakit.mixed(net, ["a"]):
            pass


def test_bank_follows_adapter_changes():
    """Gathered factors are per routing: a reload or an update is seen by the next routing."""
    net = _build(torch.float64, 2)
    x = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        with lorakit.mixed(net, ["a", "b"]):
            before = net(x)
        for p in dict(lorakit.lora_layers(net))["q"].lora_B.values():
            p.mul_(2)
        with lorakit.mixed(net, ["a", "b"]):
            after = net(x)
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after[1], _alone(net, x[1:], "b")[0], atol=1e-10, rtol=0)
        lorakit.delete(net, "c")
        with pytest.raises(LoraError, match="unknown adapter"):
            with lorakit.mixed(net, ["c"]):
                pass


@pytest.mark.slow
def test_generate_with_per_row_adapters_on_smollm2():
    """Greedy and beam-search generation: each row of a mixed batch equals that row alone."""
    from lorakit.builtin import load_smollm2
    model, tok = load_smollm2()
    lorakit.inject(model, LoraConfig(r=8, targets="all-linear"), adapter="x")
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj", "v_proj"]), adapter="y")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.eval()
    tok.padding_side = "left"
    prompts = ["The capital of France is", "Once upon a time", "def add(a, b):"]
    names = ["x", None, "y"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    for kw in (dict(do_sample=False), dict(do_sample=False, num_beams=2)):
        with torch.no_grad(), lorakit.mixed(model, names):
            out = model.generate(**enc, max_new_tokens=8, pad_token_id=tok.pad_token_id, **kw)
        for i, name in enumerate(names):
            one = tok(prompts[i:i + 1], return_tensors="pt", padding=True)
            with torch.no_grad(), lorakit.mixed(model, [name]):
                alone = model.generate(**one, max_new_tokens=8, pad_token_id=tok.pad_token_id, **kw)
            width = enc["input_ids"].shape[1]
            assert tok.decode(out[i, width:], skip_special_tokens=True) == \
                tok.decode(alone[0, one["input_ids"].shape[1]:], skip_special_tokens=True), (kw, name)
    # and the adapters really differ from the base
    with torch.no_grad(), lorakit.mixed(model, ["x", None]):
        logits = model(**tok([prompts[0]] * 2, return_tensors="pt")).logits
    assert (logits[0] - logits[1]).abs().max() > 0.1


def test_modules_to_save_heads_are_routed_per_row():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    for name in ("a", "b"):
        lorakit.inject(net, LoraConfig(r=2, targets=["0"], modules_to_save=["2"]), adapter=name)
        with torch.no_grad():
            net[2].modules_to_save[name].weight.normal_()
            net[0].lora_B[name].normal_()
    x = torch.randn(4, 6)
    rows = ["a", None, "b", "a"]
    with torch.no_grad():
        with lorakit.mixed(net, rows):
            y = net(x)
        for i, name in enumerate(rows):
            torch.testing.assert_close(y[i], _alone(net, x[i:i + 1], name)[0], atol=1e-6, rtol=1e-6)


def test_mixed_batch_trains_each_adapter_on_its_rows():
    """With gradients on, the routed forward is the differentiable per-group path."""
    net = _build(torch.float64, 3).train()
    x = torch.randint(0, 20, (3, 5))
    lorakit.set_active(net, ["a", "b", "c"])  # all trainable
    with lorakit.mixed(net, ["a", "b", "a"]):
        net(x).sum().backward()
    q = dict(lorakit.lora_layers(net))["q"]
    grads = {n: q.lora_A[n].grad.clone() for n in ("a", "b")}
    assert dict(lorakit.lora_layers(net))["v"].lora_A["c"].grad is None  # no row uses c
    net.zero_grad()
    lorakit.set_active(net, "a")
    (net(x[[0, 2]])).sum().backward()
    torch.testing.assert_close(q.lora_A["a"].grad, grads["a"], atol=1e-10, rtol=1e-8)


def test_inject_and_load_inactive(tmp_path):
    net = _build(torch.float32, 4)
    lorakit.set_active(net, "a")
    lorakit.save(net, tmp_path, adapter="b")
    lorakit.inject(net, LoraConfig(r=2, targets=["q"]), adapter="d", activate=False)
    lorakit.load(net, tmp_path, adapter="e", activate=False)
    assert lorakit.registry(net).active == ("a",)
    q = dict(lorakit.lora_layers(net))["q"]
    assert not q.lora_A["d"].requires_grad and not q.lora_A["e"].requires_grad and q.lora_A["a"].requires_grad
    x = torch.randint(0, 20, (1, 5))
    with torch.no_grad(), lorakit.mixed(net, ["e"]):
        y = net(x)
    torch.testing.assert_close(y, _alone(net, x, "b"))
