"""lorakit.batching.rowlora, the per-row LoRA kernel: the op against the float64 formula, and lorakit.mixed running
it (each row against that row run alone), with no copy of the factors and a fallback when it cannot be built."""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from test_batching import _alone  # the oracle: one row through the plain single-adapter path
from test_layers import _randomise  # every factor non-zero, seeded
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lorakit
from lorakit import LoraConfig, LoraError
from lorakit.batching import rowlora

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
ROUND = {F64: 2.0 ** -52, F32: 2.0 ** -23, BF16: 2.0 ** -8, F16: 2.0 ** -11}  # unit roundoff ·2


def test_the_kernel_builds_here():
    """gcc is on every machine the tests run on: a failure to build is a failure, not a skip."""
    assert rowlora.available()


def _formula(y, x, a, b, scale, slots):
    out = y.double().clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            out[i] += scale[s] * (x[i].double() @ a[s].double().t() @ b[s].double().t())
    return out


@pytest.mark.parametrize("xd,wd,yd", [(F32, F32, F32), (BF16, F32, BF16), (F32, BF16, F32), (F16, F16, F16),
                                      (F64, F64, F64), (F32, F32, BF16), (F64, F32, F32)])
def test_op_equals_the_float64_formula(xd, wd, yd):
    """Strided x and y rows, ranks 2 / 8 / 5 (templated and generic), k not a multiple of 16, rows
    with no adapter (slot -1) left bit for bit as they were; y rounded once from float accumulation."""
    g = torch.Generator().manual_seed(0)
    R, T, k, d = 7, 3, 37, 29
    ranks, scale = (2, 8, 5), [0.5, 2.0, 1.25]
    a = [torch.randn(r, k, generator=g).to(wd) for r in ranks]
    b = [torch.randn(d, r, generator=g).to(wd) for r in ranks]
    slots = torch.tensor([2, -1, 0, 1, 1, -1, 2])
    x = torch.randn(R, T + 2, k, generator=g).to(xd)[:, 1:-1]  # a row stride that is not T·k
    y = torch.randn(R, T, d + 5, generator=g).to(yd)[..., :d]
    y0 = y.clone()
    with torch.no_grad():
        rowlora.add_rows_(y, x, a, b, scale, slots)
    ref = _formula(y0, x, a, b, scale, slots)
    acc = 2.0 ** -52 if F64 in (xd, wd, yd) else 2.0 ** -23
    bound = ROUND[yd] * ref.abs() + 64 * acc * (ref.abs().max() + 1) * k  # one rounding to y + accumulation
    assert ((y.double() - ref).abs() <= bound).all(), (y.double() - ref).abs().max()
    assert torch.equal(y[1], y0[1]) and torch.equal(y[5], y0[5])


@pytest.fixture(params=["binding", "torch.ops"])
def entry(request, monkeypatch):
    """The op through the library's Python binding (what lorakit.mixed calls) or through torch.ops."""
    assert rowlora.available()
    if request.param == "torch.ops":
        monkeypatch.setattr(rowlora, "_direct", None)
    else:
        assert rowlora._direct is not None  # Python's headers are installed where the tests run
    return request.param


@pytest.mark.parametrize("wd", [F32, BF16])
def test_both_entries_equal_the_float64_formula_on_layer_sized_inputs(entry, wd):
    """Ranks with and without a templated loop (1, 3, 8, 12, 16, 32), widths that are not multiples of
    16, several rows per slot and several tokens per row (runs split between threads), rows with no
    adapter left bit for bit as they were."""
    g = torch.Generator().manual_seed(3)
    R, T, k, d = 11, 6, 200, 150
    ranks = (1, 3, 8, 12, 16, 32)
    scale = [0.5, 2.0, 1.25, 0.75, 1.5, 0.25]
    a = [torch.randn(r, k, generator=g).to(wd) for r in ranks]
    b = [torch.randn(d, r, generator=g).to(wd) for r in ranks]
    slots = torch.tensor([5, 0, -1, 3, 3, 1, 2, 4, 5, -1, 2])
    x = torch.randn(R, T, k, generator=g)
    y = torch.randn(R, T, d, generator=g)
    y0 = y.clone()
    with torch.no_grad():
        rowlora.add_rows_(y, x, a, b, scale, slots)
    ref = _formula(y0, x, a, b, scale, slots)
    bound = ROUND[F32] * ref.abs() + 64 * 2.0 ** -23 * (ref.abs().max() + 1) * k
    assert ((y.double() - ref).abs() <= bound).all(), (y.double() - ref).abs().max()
    assert torch.equal(y[2], y0[2]) and torch.equal(y[9], y0[9])


def test_adapters_of_different_dtypes_in_one_call_equal_the_float64_formula(entry):
    """bf16 factors read as stored (converted in registers) next to factors converted into a scratch copy
    (bf16 A with fp32 B, fp16, and fp32 as is), in one call."""
    g = torch.Generator().manual_seed(4)
    R, T, k, d = 8, 3, 40, 35
    dtypes = [(BF16, BF16), (BF16, F32), (F16, F16), (F32, F32)]
    a = [torch.randn(8, k, generator=g).to(da) for da, _ in dtypes]
    b = [torch.randn(d, 8, generator=g).to(db) for _, db in dtypes]
    scale = [0.5, 1.5, 2.0, 1.0]
    slots = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    x, y = torch.randn(R, T, k, generator=g), torch.randn(R, T, d, generator=g)
    y0 = y.clone()
    with torch.no_grad():
        rowlora.add_rows_(y, x, a, b, scale, slots)
    ref = _formula(y0, x, a, b, scale, slots)
    bound = ROUND[F32] * ref.abs() + 64 * 2.0 ** -23 * (ref.abs().max() + 1) * k
    assert ((y.double() - ref).abs() <= bound).all(), (y.double() - ref).abs().max()


def test_the_binding_reports_bad_input_as_the_op_does(entry):
    """A RuntimeError with the op's message and no C++ backtrace, through either entry."""
    a, b = [torch.randn(2, 4)], [torch.randn(3, 2)]
    y = torch.zeros(2, 1, 3)
    with torch.no_grad(), pytest.raises(RuntimeError) as caught:
        rowlora.add_rows_(y, torch.randn(2, 1, 4), a, b, [1.0], torch.tensor([0, 3]))
    assert "slot 3 of row 1 is outside [-1, 1)" in str(caught.value)
    assert "frame #" not in str(caught.value) and "Exception raised from" not in str(caught.value)
    assert not y.any()


def test_a_lazily_negated_input_is_never_read_as_its_data(entry):
    """x._neg_view() holds x's data with a flag: torch.ops resolves it (its fallback), the binding
    refuses it (y untouched); neither computes with +x."""
    a, b = [torch.randn(2, 4)], [torch.randn(3, 2)]
    x, y = torch.randn(2, 1, 4), torch.zeros(2, 1, 3)
    with torch.no_grad():
        if entry == "binding":
            with pytest.raises(RuntimeError, match="lazily negated"):
                rowlora.add_rows_(y, x._neg_view(), a, b, [1.0], torch.tensor([0, 0]))
            assert not y.any()
        else:
            rowlora.add_rows_(y, x._neg_view(), a, b, [1.0], torch.tensor([0, 0]))
            torch.testing.assert_close(y, -(x @ a[0].t() @ b[0].t()), atol=1e-5, rtol=1e-5)


def test_autograd_sees_the_in_place_update(entry):
    """y saved by a backward and then updated by the op (under no_grad): the backward refuses to run
    instead of using the changed y, as after torch's own in-place ops."""
    w = torch.randn(3, 3, requires_grad=True)
    y = torch.randn(2, 1, 3) @ w
    loss = (y * y).sum()  # saves y
    version = y._version
    with torch.no_grad():
        rowlora.add_rows_(y, torch.randn(2, 1, 4), [torch.randn(2, 4)], [torch.randn(3, 2)], [1.0],
                          torch.tensor([0, -1]))
    assert y._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_dispatch_mode_sees_the_op():
    """Under a TorchDispatchMode the op goes through torch.ops (the binding would hide it from the mode)."""
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    a, b = [torch.randn(2, 4)], [torch.randn(3, 2)]
    y, x = torch.zeros(2, 1, 3), torch.randn(2, 1, 4)
    with torch.no_grad(), Record():
        rowlora.add_rows_(y, x, a, b, [1.0], torch.tensor([0, -1]))
    assert "lorakit.rowlora_.default" in seen
    torch.testing.assert_close(y[0, 0], (b[0] @ a[0] @ x[0, 0]), atol=1e-5, rtol=1e-5)
    assert not y[1].any()


@pytest.mark.parametrize("ids_dtype", [torch.long, torch.int])
@pytest.mark.parametrize("wd,yd", [(F32, F32), (BF16, BF16), (F32, BF16), (F64, F64), (F16, F32)])
def test_lookup_op_equals_the_float64_formula(wd, yd, ids_dtype):
    """Embeddings: A[s] (r, num) is looked up by column, y += s·B[s]·A[s][:, id]; a strided ids tensor,
    rows with no adapter untouched."""
    g = torch.Generator().manual_seed(0)
    R, T, num, d = 6, 4, 23, 19
    ranks, scale = (2, 8, 3), [0.5, 2.0, 1.25]
    a = [torch.randn(r, num, generator=g).to(wd) for r in ranks]
    b = [torch.randn(d, r, generator=g).to(wd) for r in ranks]
    slots = torch.tensor([1, -1, 0, 2, 2, 0])
    ids = torch.randint(0, num, (R, 2 * T), generator=g).to(ids_dtype)[:, ::2]  # stride 2
    y = torch.randn(R, T, d, generator=g).to(yd)
    y0 = y.clone()
    with torch.no_grad():
        rowlora.add_rows_(y, ids, a, b, scale, slots, lookup=True)
    ref = y0.double().clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            ref[i] += scale[s] * (a[s].double().t()[ids[i].long()] @ b[s].double().t())
    acc = 2.0 ** -52 if F64 in (wd, yd) else 2.0 ** -23
    bound = ROUND[yd] * ref.abs() + 64 * acc * (ref.abs().max() + 1)
    assert ((y.double() - ref).abs() <= bound).all(), (y.double() - ref).abs().max()
    assert torch.equal(y[1], y0[1])
    with pytest.raises(RuntimeError, match=r"id 23 is outside \[0, 23\)"), torch.no_grad():
        rowlora.add_rows_(y, torch.full((R, T), num), a, b, scale, slots, lookup=True)


class _GemmaLikeEmbedding(nn.Embedding):
    """An embedding that scales its lookup (as Gemma's): embed_scale rounded to the weight's dtype."""

    def __init__(self, num, dim):
        super().__init__(num, dim)
        self.register_buffer("embed_scale", torch.tensor(dim ** 0.5), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


@pytest.mark.parametrize("dtype", [F64, F32, BF16])
@pytest.mark.parametrize("cls", [nn.Embedding, _GemmaLikeEmbedding])
def test_embeddings_run_the_kernel_and_each_row_equals_that_row_alone(monkeypatch, dtype, cls):
    torch.manual_seed(0)
    net = nn.Sequential(cls(30, 12), nn.Linear(12, 6)).to(dtype)
    lorakit.inject(net, LoraConfig(r=2, targets=["0", "1"]), adapter="a")
    lorakit.inject(net, LoraConfig(r=8, targets=["0"]), adapter="b")
    _randomise(net, 0, std=0.3)
    count = _Count(monkeypatch)
    rows = ["a", None, "b", "a"]
    g = torch.Generator().manual_seed(1)
    for ids in (torch.randint(0, 30, (4, 5), generator=g), torch.randint(0, 30, (4,), generator=g)):
        count.calls = 0
        with torch.no_grad():
            with lorakit.mixed(net, rows):
                y = net(ids)
            assert count.calls == 2  # the embedding and the Linear
            tol = {F64: 1e-12, F32: 1e-5, BF16: 3e-2}[dtype]
            for i, name in enumerate(rows):
                ref = _alone(net, ids[i:i + 1], name)[0]
                torch.testing.assert_close(y[i], ref, atol=tol * max(ref.abs().max().item(), 1.0), rtol=0)
    assert not any("_bank" in layer.__dict__ for _, layer in lorakit.lora_layers(net))  # no copy of the factors


def test_op_refuses_bad_slots_shapes_and_gradients():
    a, b = [torch.randn(2, 4)], [torch.randn(3, 2)]
    x, y = torch.randn(2, 1, 4), torch.zeros(2, 1, 3)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=r"slot 1 of row 0 is outside \[-1, 1\)"):
            rowlora.add_rows_(y, x, a, b, [1.0], torch.tensor([1, 0]))
        with pytest.raises(RuntimeError, match="do not fit"):
            rowlora.add_rows_(y, torch.randn(2, 1, 5), a, b, [1.0], torch.tensor([0, 0]))
    with pytest.raises(LoraError, match="no backward"):
        rowlora.add_rows_(y, x.requires_grad_(), a, b, [1.0], torch.tensor([0, 0]))
    assert not y.any()


def _net(dtype, seed=0):
    """Linear and transformers' Conv1D layers, adapters of ranks 2, 8 and 5 on different modules."""
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), Conv1D(12, 20)).to(dtype)
    lorakit.inject(net, LoraConfig(r=2, targets=["0", "2"]), adapter="a")
    lorakit.inject(net, LoraConfig(r=8, targets=["0"]), adapter="b")
    lorakit.inject(net, LoraConfig(r=5, targets=["0", "2"], alpha=3), adapter="c")
    _randomise(net, seed, std=0.3)
    return net.eval()


class _Count:
    def __init__(self, monkeypatch):
        self.calls, op = 0, rowlora.add_rows_unchecked_

        def counted(*args, **kwargs):
            self.calls += 1
            return op(*args, **kwargs)
        monkeypatch.setattr(rowlora, "add_rows_unchecked_", counted)


@pytest.mark.parametrize("dtype", [F64, F32, BF16])
@pytest.mark.parametrize("layout", ["2d", "3d", "3d_strided"])
def test_mixed_runs_the_kernel_and_each_row_equals_that_row_alone(monkeypatch, dtype, layout):
    net = _net(dtype)
    count = _Count(monkeypatch)
    rows = ["a", None, "c", "b", "a"]
    g = torch.Generator().manual_seed(1)
    x = {"2d": torch.randn(5, 12, generator=g), "3d": torch.randn(5, 4, 12, generator=g),
         "3d_strided": torch.randn(5, 12, 4, generator=g).transpose(1, 2)}[layout].to(dtype)
    with torch.no_grad():
        with lorakit.mixed(net, rows):
            y = net(x)
        assert count.calls == 2  # both layers, every row through the kernel
        tol = {F64: 1e-12, F32: 1e-5, BF16: 3e-2}[dtype]
        for i, name in enumerate(rows):
            ref = _alone(net, x[i:i + 1], name)[0]
            torch.testing.assert_close(y[i], ref, atol=tol * max(ref.abs().max().item(), 1.0), rtol=0)
    assert not any("_bank" in layer.__dict__ for _, layer in lorakit.lora_layers(net))  # no copy of the factors


class _Allocations(TorchDispatchMode):
    """Bytes of every fresh storage the ops under it return (outputs that alias an input are views)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append((str(func), t.untyped_storage().nbytes()))
        return out


@pytest.mark.parametrize("n_adapters", [4, 16])
def test_a_mixed_step_allocates_only_the_outputs(n_adapters):
    """No per-row factors and no bank: the first step of a new routing and the next one allocate the
    layers' outputs and nothing the size of the factors (the plain path gathered B·r·(in + out) per layer)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 64))
    for i in range(n_adapters):
        lorakit.inject(net, LoraConfig(r=8, targets=["0", "1"]), adapter=f"a{i}")
    B = 16
    x = torch.randn(B, 1, 64)
    outputs = 4 * B * (96 + 64)
    with torch.inference_mode(), lorakit.mixed(net, [f"a{i % n_adapters}" for i in range(B)]):
        for _ in range(2):  # the first step plans the routing, the second reuses the plan
            with _Allocations() as seen:
                net(x)
            assert sum(n for _, n in seen.sizes) <= outputs + 8 * B * 2, seen.sizes


def test_gradients_take_the_differentiable_path(monkeypatch):
    """With gradients on the kernel is not used (it has no backward): x's gradient is that of each row alone."""
    net = _net(F64)
    count = _Count(monkeypatch)
    rows = ["a", "c", None]
    x = torch.randn(3, 12, dtype=F64, requires_grad=True)
    with lorakit.mixed(net, rows):
        net(x).square().sum().backward()
    assert count.calls == 0
    for i, name in enumerate(rows):
        xi = x.detach()[i:i + 1].clone().requires_grad_()
        _alone(net, xi, name).square().sum().backward()
        torch.testing.assert_close(x.grad[i], xi.grad[0], atol=1e-12, rtol=0)


def test_without_python_headers_the_op_is_built_and_called_through_torch_ops(tmp_path):
    """Where Python.h is missing the library is built without the binding (a fresh process, a fresh
    cache) and lorakit calls the op through torch.ops, with the same result."""
    script = textwrap.dedent("""
        import torch
        from lorakit.batching import rowlora
        rowlora._python_headers = lambda: None
        assert rowlora.available() and rowlora._direct is None
        g = torch.Generator().manual_seed(0)
        a, b = [torch.randn(3, 20, generator=g)], [torch.randn(9, 3, generator=g)]
        x, y = torch.randn(2, 4, 20, generator=g), torch.zeros(2, 4, 9)
        with torch.no_grad():
            rowlora.add_rows_(y, x, a, b, [0.5], torch.tensor([-1, 0]))
        assert not y[0].any()
        torch.testing.assert_close(y[1], 0.5 * x[1] @ a[0].t() @ b[0].t(), atol=1e-5, rtol=1e-5)
        print("ok")
    """)
    env = {**os.environ, "LORAKIT_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    assert len(list(tmp_path.glob("rowlora-*.so"))) == 1


def test_a_build_failure_warns_once_and_the_plain_path_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "false")  # a compiler that always fails
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(rowlora, "_state", None)
    net = _net(F64)
    x = torch.randn(3, 12, dtype=F64)
    rows = ["a", "b", None]
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(2):
            with lorakit.mixed(net, rows):
                y = net(x)
    assert [str(w.message)[:58] for w in caught] == ["lorakit: the per-row LoRA kernel could not be built or loa"]
    assert not rowlora.available() and list(tmp_path.glob("*.so")) == []
    with torch.no_grad():
        for i, name in enumerate(rows):
            torch.testing.assert_close(y[i], _alone(net, x[i:i + 1], name)[0], atol=1e-12, rtol=0)


def test_the_kernel_reads_the_factors_themselves(monkeypatch):
    """A write through ``param.data`` (no version bump) inside an open block is seen by the next step."""
    net = _net(F64)
    count = _Count(monkeypatch)
    x = torch.randn(3, 12, dtype=F64)
    rows = ["a", "c", None]
    with torch.no_grad(), lorakit.mixed(net, rows):
        net(x)
        net[0].lora_B["c"].data.mul_(-3)
        y = net(x)
    assert count.calls == 4
    with torch.no_grad():
        torch.testing.assert_close(y[1], _alone(net, x[1:2], "c")[0], atol=1e-12, rtol=0)
