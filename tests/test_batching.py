"""Mixed-adapter batches against the oracle "each row run alone with its adapter active".

Tolerance: fp32 2e-5, bf16 3e-2 (relative to the output's magnitude); float64 models are checked
to 1e-10.
"""

import contextlib
import copy
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_layers import _randomise  # every factor non-zero, seeded
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
    _randomise(net, seed, std=0.3)
    return net.eval()


@contextlib.contextmanager
def _path(kernel):
    """Mixed batches through lorakit.batching.rowlora's kernel (the default on CPU) or the plain PyTorch path."""
    from lorakit.batching import rowlora
    was = rowlora._wanted
    rowlora.use(kernel)
    try:
        yield
    finally:
        rowlora.use(was)


def _alone(net, row, name):
    if name is None:
        with lorakit.disabled(net):
            return net(row)
    lorakit.set_active(net, name)
    return net(row)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
@settings(max_examples=30, deadline=None)
@given(rows=st.lists(st.sampled_from(["a", "b", "c", None]), min_size=1, max_size=7),
       dtype=st.sampled_from(list(TOL)), seed=st.integers(0, 99))
def test_mixed_batch_equals_each_row_alone(kernel, rows, dtype, seed):
    """Each row equals that row run alone, to TOL. In bf16 the kernel rounds once where the layers alone
    round after each product, so through several layers the two may drift apart by more: there a row may
    also pass by being at least as close (within 2x) as the row alone to the same net run in float64."""
    net = _build(dtype, seed)
    x = torch.randint(0, 20, (len(rows), 5), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        with _path(kernel), lorakit.mixed(net, rows):
            y = net(x)
        wide = copy.deepcopy(net).to(torch.float64) if dtype == torch.bfloat16 else None
        for i, name in enumerate(rows):
            ref = _alone(net, x[i:i + 1], name)[0]
            err = (y[i].double() - ref.double()).abs().max().item()
            bound = TOL[dtype] * max(ref.abs().max().item(), 1.0)
            if err > bound and wide is not None:
                exact = _alone(wide, x[i:i + 1], name)[0]
                err, bound = (y[i].double() - exact).abs().max().item(), 2 * (ref.double() - exact).abs().max().item()
            assert err <= bound, (i, name, err)


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
        with lorakit.mixed(net, ["a", "c"], expand=3):
            y = net(x.repeat_interleave(3, 0))  # 3 beams per request
        for j in range(6):
            torch.testing.assert_close(y[j], _alone(net, x[j // 3:j // 3 + 1], "ac"[j // 3])[0], atol=1e-10, rtol=0)
        with pytest.raises(LoraError, match=r"shape \(5, 5\): dim 0 must be the batch, 2 rows"):
            with lorakit.mixed(net, ["a", "c"]):
                net(torch.randint(0, 20, (5, 5)))
    with pytest.raises(LoraError, match="expand must be a positive int"):
        with lorakit.mixed(net, ["a", "c"], expand=0):
            pass
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


# -- issue 10: structured outputs, torch.compile, stale factors, rows from dim 0 ------------------------

def _saved_gru(batch_first):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.GRU(4, 3, batch_first=batch_first))
    for name in ("a", "b"):
        lorakit.inject(net, LoraConfig(r=2, targets=["0"], modules_to_save=["1"]), adapter=name)
        with torch.no_grad():
            for p in net[1].modules_to_save[name].parameters():
                p.normal_()
    return net.eval()


@pytest.mark.parametrize("batch_first", [True, False])
def test_modules_to_save_with_tuple_output_is_refused_not_misassembled(batch_first):
    """nn.GRU returns (output, h_n) with the batch on dim 1 of h_n: mixed rows are refused, naming it."""
    net = _saved_gru(batch_first)
    x = torch.randn(3, 3, 4)  # [B, T, d] or [T, B, d]: 3 rows either way
    with torch.no_grad(), pytest.raises(LoraError, match="GRU.*returned tuple"):
        with lorakit.mixed(net, ["a", "b", None]):
            net(x)
    with torch.no_grad():  # one adapter for every row: the module's own output, as alone
        with lorakit.mixed(net, ["b", "b", "b"]):
            out, h = net(x)
        ref_out, ref_h = _alone(net, x, "b")
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    torch.testing.assert_close(h, ref_h, atol=0, rtol=0)


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).double().eval()
    lorakit.inject(model, LoraConfig(r=4, targets="all-linear"), adapter="x")
    lorakit.inject(model, LoraConfig(r=2, targets=["q_proj", "v_proj"]), adapter="y")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def _llama_rows_alone(model, ids, names):
    rows = []
    for i, name in enumerate(names):
        with lorakit.disabled(model) if name is None else contextlib.nullcontext():
            if name is not None:
                lorakit.set_active(model, name)
            rows.append(model(ids[i:i + 1]).logits[0])
    return torch.stack(rows)


@pytest.mark.parametrize("backend", ["eager", pytest.param("aot_eager", marks=pytest.mark.slow)])
def test_torch_compile_never_ignores_the_routing(backend):
    """Compiled inside the block, compiled outside and called inside, compiled inside and called outside:
    every row equals that row alone (eager, set_active)."""
    model = _tiny_llama()
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(1))
    names = ["x", None, "y"]
    with torch.no_grad():
        ref = _llama_rows_alone(model, ids, names)
        lorakit.set_active(model, "x")
        active_ref = model(ids).logits
        torch._dynamo.reset()
        outside = torch.compile(model, backend=backend)
        torch.testing.assert_close(outside(ids).logits, active_ref, atol=1e-10, rtol=0)  # compiled, no routing
        with lorakit.mixed(model, names):
            torch.testing.assert_close(outside(ids).logits, ref, atol=1e-10, rtol=0)  # compiled outside, called inside
            torch._dynamo.reset()
            inside = torch.compile(model, backend=backend)
            torch.testing.assert_close(inside(ids).logits, ref, atol=1e-10, rtol=0)  # compiled inside
        torch.testing.assert_close(inside(ids).logits, active_ref, atol=1e-10, rtol=0)  # called outside afterwards
    torch._dynamo.reset()


def _check_rows(net, x, rows, tol=1e-10):
    with torch.no_grad():
        with lorakit.mixed(net, rows):
            y = net(x)
        for i, name in enumerate(rows):
            ref = _alone(net, x[i:i + 1], name)[0]
            assert y.dtype == ref.dtype
            torch.testing.assert_close(y[i], ref, atol=tol * max(ref.abs().max().item(), 1.0), rtol=0)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
def test_bank_follows_dtype_data_replacement_inplace_load_and_reinject(tmp_path, kernel):
    """Every change of a factor is seen by the next mixed forward (the oracle: each row alone)."""
    with _path(kernel):
        _follows_changes(tmp_path)


def _follows_changes(tmp_path):
    rows = ["a", "b", "c", None]
    x = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(0))
    net = _build(torch.float32, 5)
    _check_rows(net, x, rows, tol=TOL[torch.float32])  # builds the banks in float32
    net.to(torch.float64)
    _check_rows(net, x, rows)
    q = dict(lorakit.lora_layers(net))["q"]
    q.lora_B["a"].data = torch.randn_like(q.lora_B["a"])  # a new tensor behind the same Parameter
    _check_rows(net, x, rows)
    with torch.no_grad():
        q.lora_A["b"].copy_(torch.randn_like(q.lora_A["b"]))
    _check_rows(net, x, rows)
    other = _build(torch.float64, 6)
    lorakit.save(other, tmp_path / "c", adapter="c")
    lorakit.load(net, tmp_path / "c", adapter="c", activate=False)  # new weights into the existing adapter
    _check_rows(net, x, rows)
    lorakit.delete(net, "b")
    lorakit.inject(net, LoraConfig(r=4, targets=["q", "v", "c_attn"], target_parameters=["w.weight"]), adapter="b")
    with torch.no_grad():
        for layer in (q, dict(lorakit.lora_layers(net))["v"]):
            layer.lora_B["b"].normal_()
    _check_rows(net, x, rows)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
def test_a_routing_kept_across_changes_sees_each_one(kernel):
    """One routing (its plans) reused, as a server keeps it across decode steps, after each change of
    the adapters of a kernel-routed Linear: a scale, a new Parameter object, an in-place write, a dtype."""
    from lorakit import routing as routing_state
    net = _build(torch.float64, 8)
    x = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(0))
    rows = ["a", "b", None]
    q = dict(lorakit.lora_layers(net))["q"]
    with torch.no_grad(), _path(kernel):
        with lorakit.mixed(net, rows):
            net(x)
            routing = routing_state.ROUTING.get()
        changes = [lambda: q.scale.__setitem__("a", q.scale["a"] * 3),
                   lambda: q.lora_A.__setitem__("b", nn.Parameter(q.lora_A["b"].detach() * -2)),
                   lambda: q.lora_B["a"].mul_(5),
                   lambda: net.to(torch.float32)]
        for change in changes:
            change()
            token = routing_state.ROUTING.set(routing)
            try:
                y = net(x.clone())
            finally:
                routing_state.ROUTING.reset(token)
            tol = TOL[y.dtype]
            for i, name in enumerate(rows):
                ref = _alone(net, x[i:i + 1], name)[0]
                torch.testing.assert_close(y[i], ref, atol=tol * max(ref.abs().max().item(), 1.0), rtol=0)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
def test_factors_changed_inside_one_block_are_seen(kernel):
    """The factors a routing gathered are not reused after a change between two forwards of one block."""
    net = _build(torch.float64, 7)
    x = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(0))
    rows = ["a", "b", "c"]
    layers = dict(lorakit.lora_layers(net))
    with torch.no_grad(), _path(kernel), lorakit.mixed(net, rows):
        net(x)
        with torch.no_grad():
            layers["q"].lora_B["a"].mul_(3)  # in place
        layers["v"].lora_A["c"].data = layers["v"].lora_A["c"].data * -2  # replaced
        layers["emb"].scale["a"] *= 2  # a scale (as load() sets it)
        y = net(x)
    with torch.no_grad():
        for i, name in enumerate(rows):
            torch.testing.assert_close(y[i], _alone(net, x[i:i + 1], name)[0], atol=1e-10, rtol=0)
    with pytest.raises(LoraError, match="merged inside"):
        with torch.no_grad(), lorakit.mixed(net, rows):
            net(x)
            lorakit.set_active(net, "a")
            lorakit.merge(net)
            net(x)
    lorakit.unmerge(net)
    with pytest.raises(LoraError, match=r"deleted \['b'\] inside an open"):
        with torch.no_grad(), lorakit.mixed(net, rows):
            net(x)
            lorakit.delete(net, "b")
            net(x)
    with pytest.raises(LoraError, match=r"added \['d'\] or deleted \[\] inside an open"):  # d's modules aren't routed
        with torch.no_grad(), lorakit.mixed(net, ["a", "c", None]):
            net(x)
            lorakit.inject(net, LoraConfig(r=2, targets=["q"], target_parameters=["w.weight"]), adapter="d")
            net(x)


def test_rows_come_from_dim_0_exactly():
    """A sequence-first [T, B, d] input whose T is a multiple of the names is refused, naming the shape,
    on the bmm path, the per-group path and a modules_to_save head alike."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    for name in ("a", "b"):
        lorakit.inject(net, LoraConfig(r=2, targets=["0"], modules_to_save=["2"]), adapter=name)
    x = torch.randn(4, 2, 6)  # [T=4, B=2, d]
    for grad in (False, True):  # bmm / per-group
        with torch.set_grad_enabled(grad), pytest.raises(LoraError, match=r"'0' \(Linear\): input of shape \(4, 2"):
            with lorakit.mixed(net, ["a", "b"]):
                net(x)
    with pytest.raises(LoraError, match=r"'2' \(Linear\): input of shape \(4, 2, 6\)"):  # the head's own check
        with lorakit.mixed(net, ["a", "b"]):
            net[2](x)
    lorakit.delete(net, "b")
    with torch.no_grad(), lorakit.mixed(net, ["a", None], expand=2):  # an announced expansion is fine
        y = net(x)
    with torch.no_grad():
        for i, name in enumerate(["a", "a", None, None]):
            torch.testing.assert_close(y[i], _alone(net, x[i:i + 1], name)[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kw", [dict(num_beams=2), dict(do_sample=True, num_return_sequences=3)])
def test_generate_expansions_are_known(kw):
    """Beams and num_return_sequences expand rows inside generate: lorakit accepts exactly that expansion,
    and each request's outputs equal that request generated alone."""
    model = _tiny_llama(2)
    ids = torch.randint(1, 64, (3, 5), generator=torch.Generator().manual_seed(3))
    names = ["x", None, "y"]
    gen = dict(max_new_tokens=4, pad_token_id=0, **kw)
    with torch.no_grad():
        torch.manual_seed(0)
        with lorakit.mixed(model, names):
            out = model.generate(ids, **gen)
        k = gen.get("num_return_sequences", 1)
        for i, name in enumerate(names):
            torch.manual_seed(0)
            with lorakit.mixed(model, [name] * 3):  # the same batch, every row with this name
                alone = model.generate(ids, **gen)
            assert torch.equal(out[i * k:(i + 1) * k], alone[i * k:(i + 1) * k]), (kw, name)
        with pytest.raises(LoraError, match="dim 0 must be the batch"):  # expansions do not outlive generate's k
            with lorakit.mixed(model, names):
                model(ids.repeat_interleave(4, 0))
