"""Strict, all-or-nothing loading; atomic saving; save -> load round trips of every layer kind.

Every malformed adapter folder below is loaded into a model in three states -- fresh (no adapters),
``existing`` (adapter ``default`` already loaded from a good file) and ``other`` (another adapter
present) -- and each load must raise :class:`lorakit.LoraError` with a message naming the problem,
leaving the model exactly as it was: state_dict bit for bit, module types, requires_grad flags, the
lorakit registry (configs, paths, active, merged) and every LoraLayer's ranks/scales/active set, and
the forward output.

Malformed-file cases tried (a valid lorakit-saved folder, then one change):

 1. missing-key            one tensor (``blocks.1.v.lora_B.weight``) removed from the safetensors file
 2. half-pair              ``out.lora_A.weight`` added without its ``lora_B`` (a module the adapter lacks)
 3. unexpected-key         an extra ``blocks.0.q.lora_magnitude_vector`` (a DoRA tensor)
 4. adapter-name-in-keys   keys still carry the adapter name (``...q.lora_A.default.weight``)
 5. wrong-shape            ``blocks.0.q.lora_A.weight`` of shape (4, 9) instead of (4, 8)
 6. wrong-rank             every tensor at rank 2 while adapter_config.json says r=4
 7. wrong-prefix           keys ``base_model.blocks...`` instead of ``base_model.model.blocks...``
 8. no-prefix              keys ``blocks.0.q.lora_A.weight`` (no ``base_model.model.`` at all)
 9. int-dtype              one factor stored as int32
10. truncated-half         the safetensors file cut to half its size
11. truncated-header       the safetensors file cut to its first 12 bytes
12. empty-weights-file     a 0-byte adapter_model.safetensors
13. random-bytes           4 KiB of random bytes as adapter_model.safetensors
14. torch-pickle-renamed   a ``torch.save`` pickle (whose ``__reduce__`` would create a marker file)
                           renamed to adapter_model.safetensors; the marker must not appear
15. raw-pickle-renamed     the same with a plain ``pickle.dumps`` payload
16. only-bin               adapter_model.safetensors removed, only a (malicious) adapter_model.bin
                           present; the marker must not appear
17. missing-weights        adapter_model.safetensors removed, nothing else
18. missing-config         adapter_config.json removed
19. invalid-json           adapter_config.json is ``{"r": 4,`` (truncated JSON)
20. json-not-object        adapter_config.json is a JSON list
21. config-not-utf8        adapter_config.json holds bytes that are not UTF-8
22. missing-r              adapter_config.json without ``r`` (PEFT-style folder, no lorakit metadata)
23. r-zero                 ``r: 0``
24. use-dora               ``use_dora: true`` but no DoRA magnitudes in the weights
25. bias-all               ``bias: "all"`` but no base biases in the weights
26. saved-module-wrong-shape a modules_to_save tensor ``out.weight`` of shape (4, 9) instead of (4, 8)
27. stray-tensor           an extra non-LoRA tensor ``out.not_a_parameter`` (no such state key)
28. peft-type-ia3          ``peft_type: "IA3"``
29. missing-folder         the adapter folder does not exist
30. folder-is-a-file       the adapter "folder" is a regular file
31. other-model            keys for another model's modules (MiniLM's ``encoder.layer.0...query``)
32. unsupported-module     keys for a container module (``blocks.0``), not a supported layer
33. no-tensors             a valid safetensors file with no tensors
34. metadata-not-json      the weights' embedded ``lorakit_config`` metadata is not JSON
35. metadata-not-object    the embedded ``lorakit_config`` is a JSON list
36. nan-factor             one factor all NaN
37. inf-factor             one row of a factor -inf
plus, for a model that already has the adapter: a file covering fewer modules than the adapter,
and loading while the adapter is merged; and load() with adapter names inject() rejects, and load()
of a new adapter while another one is merged.

The bugs these cases first found (metadata errors escaping as non-LoraError, vague messages for an
existing adapter, unchecked adapter names on load(), load() of a new adapter while another is merged
modifying the model) are fixed; known bugs would be listed in XFAIL as strict xfails.

Atomic save: v1 is saved, then saving a different v2 (other modules, rank and alpha) into the same
folder crashes: st_save raising, fsync of the weights raising, the weights write failing half-way,
os.replace of the weights raising, fsync of the config raising, and a real process kill
(``os._exit``) just before the weights' rename. Each time the folder must still load v1 with v1's
outputs bit for bit (in the first five, no temp file is left behind); where the crash left v2's
config next to v1's weights, load warns that it uses the config embedded in the weights, and
otherwise it warns about nothing. adapter_config.json holds only fields of PEFT's LoraConfig, and
a hand edit of a lorakit-saved config is reported (warning naming the fields), not mixed silently
with weights saved under another config.

Round trips: Linear, Embedding (padding_idx), Conv1d, Conv1d (stride+dilation), Conv2d (stride,
dilation), Conv2d reflect padding, Conv3d (dilation), grouped and depthwise Conv2d, transformers
Conv1D and a raw nn.Parameter via target_parameters, plus rank/alpha patterns with rsLoRA: fp32
save -> load gives bit-identical factors and outputs; ``save(..., dtype=torch.bfloat16)`` stores
bf16 tensors and loads them as exactly the bf16-rounded factors, outputs within bf16 tolerance
(rtol 2e-2, atol 2e-2 x max|output|).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

import lorakit  # noqa: E402
import lorakit.files.writer  # noqa: E402
from lorakit import LoraConfig, LoraError  # noqa: E402

PREFIX = "base_model.model."
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


# -- toy model ----------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.q, self.v = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, h):
        return h + torch.tanh(self.q(h)) * self.v(h)


class Toy(nn.Module):
    def __init__(self, vocab=20, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.out = nn.Linear(d, 4)

    def forward(self, ids):
        h = self.emb(ids)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


CFG_V1 = LoraConfig(r=4, alpha=8, targets=["q", "v", "emb"])
CFG_V2 = LoraConfig(r=2, alpha=3, targets=["q"])  # other modules, rank and alpha than v1
IDS = torch.tensor([[1, 5, 7, 19, 0, 3], [2, 2, 11, 4, 9, 13]])


def _toy() -> Toy:
    torch.manual_seed(0)
    return Toy().eval()


def _randomize(model, seed, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for name in layer.lora_A:
                for p in (layer.lora_A[name], layer.lora_B[name]):
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def _adapted(cfg, seed, adapter="default") -> Toy:
    model = lorakit.inject(_toy(), cfg, adapter=adapter)
    _randomize(model, seed)
    return model


def _out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


# -- snapshots ----------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _freeze(value):
    """A comparable copy of a registry field (tensors by identity, containers copied)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    if isinstance(value, dict):
        return {k: _freeze(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return (type(value).__name__, [_freeze(v) for v in value])
    return value


def _snapshot(model) -> dict:
    reg = lorakit.state.registry_of(model)
    layers = [(p, type(layer.base_layer), layer.kind.name, layer.param_name, layer.active, layer.merged,
               dict(layer.scale), dict(layer.dropout), {n: tuple(a.shape) for n, a in layer.lora_A.items()},
               {n: tuple(b.shape) for n, b in layer.lora_B.items()}, layer._original is not None)
              for p, layer in lorakit.lora_layers(model)] if reg is not None else []
    return {
        "state": {k: (v.dtype, tuple(v.shape), _bits(v).clone()) for k, v in model.state_dict().items()},
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "params": [(n, p.requires_grad, p.dtype) for n, p in model.named_parameters()],
        "registry": None if reg is None else (id(reg), {f.name: _freeze(getattr(reg, f.name)) for f in dataclasses.fields(reg)}),
        "layers": layers,
        "output": _out(model),
    }


def _assert_unchanged(before: dict, after: dict) -> None:
    assert list(after["state"]) == list(before["state"]), "state_dict keys changed"
    for k, (dtype, shape, bits) in before["state"].items():
        dtype2, shape2, bits2 = after["state"][k]
        assert (dtype2, shape2) == (dtype, shape), k
        assert torch.equal(bits2, bits), f"{k} changed"
    assert after["modules"] == before["modules"]
    assert after["params"] == before["params"]
    assert after["registry"] == before["registry"]
    assert after["layers"] == before["layers"]
    assert torch.equal(after["output"], before["output"])


# -- file surgery -------------------------------------------------------------------------------
def _tensors(d: Path) -> tuple[dict, dict]:
    with safe_open(str(d / WEIGHTS), framework="pt") as f:
        meta = f.metadata() or {}
    return load_file(d / WEIGHTS), meta


def _rewrite(d: Path, fn, keep_metadata=True) -> None:
    tensors, meta = _tensors(d)
    save_file(fn(dict(tensors)), d / WEIGHTS, metadata=meta if keep_metadata else {"format": "pt"})


def _rename_keys(fn):
    return lambda t: {fn(k): v for k, v in t.items()}


def _edit_config(d: Path, **changes) -> None:
    """Edit adapter_config.json like a PEFT-written folder (no lorakit copy of the config in the weights)."""
    config = json.loads((d / CONFIG).read_text())
    config.pop("lorakit_weights_sha256", None)  # PEFT writes no hash of the weights
    for k, v in changes.items():
        if v is _DELETE:
            config.pop(k)
        else:
            config[k] = v
    (d / CONFIG).write_text(json.dumps(config))
    _rewrite(d, lambda t: t, keep_metadata=False)


_DELETE = object()


class Evil:
    """Unpickling this creates the marker file: proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _truncate(d: Path, size) -> None:
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[:size(len(data))])


def _replace_folder_with_file(d: Path, marker: Path) -> None:
    shutil.rmtree(d)
    d.write_text("not a folder")


def _set_metadata(d: Path, value: str) -> None:
    tensors, meta = _tensors(d)
    save_file(tensors, d / WEIGHTS, metadata={**meta, "lorakit_config": value})


Q0A = f"{PREFIX}blocks.0.q.lora_A.weight"
V1B = f"{PREFIX}blocks.1.v.lora_B.weight"


# name -> (mutate(folder, marker), fragments the message must contain ("{dir}" = the folder))
CASES = {
    "missing-key": (lambda d, m: _rewrite(d, lambda t: {k: v for k, v in t.items() if k != V1B}),
                    ["missing", V1B, "(8, 4)"]),
    "half-pair": (lambda d, m: _rewrite(d, lambda t: {**t, f"{PREFIX}out.lora_A.weight": torch.zeros(4, 8)}),
                  [f"{PREFIX}out.lora_B.weight"]),
    "unexpected-key": (lambda d, m: _rewrite(d, lambda t: {**t, f"{PREFIX}blocks.0.q.lora_magnitude_vector": torch.ones(8)}),
                       ["unexpected key", f"{PREFIX}blocks.0.q.lora_magnitude_vector"]),
    "adapter-name-in-keys": (lambda d, m: _rewrite(d, _rename_keys(lambda k: k.replace("lora_A.weight", "lora_A.default.weight"))),
                             ["unexpected key", f"{PREFIX}blocks.0.q.lora_A.default.weight", "missing", Q0A]),
    "wrong-shape": (lambda d, m: _rewrite(d, lambda t: {**t, Q0A: torch.zeros(4, 9)}),
                    [Q0A, "expected shape (4, 8)", "found (4, 9)"]),
    "wrong-rank": (lambda d, m: _rewrite(d, lambda t: {k: (v[:2] if ".lora_A" in k or "lora_embedding_A" in k else v[:, :2]).contiguous()
                                                       for k, v in t.items()}),
                   [Q0A, "expected shape (4, 8)", "found (2, 8)"]),
    "wrong-prefix": (lambda d, m: _rewrite(d, _rename_keys(lambda k: k.replace("base_model.model.", "base_model."))),
                     ["base_model.blocks.0.q.lora_A.weight", "prefix", "'base_model.model.'"]),
    "no-prefix": (lambda d, m: _rewrite(d, _rename_keys(lambda k: k[len(PREFIX):])),
                  ["'blocks.0.q.lora_A.weight'", "prefix", "'base_model.model.'"]),
    "int-dtype": (lambda d, m: _rewrite(d, lambda t: {**t, Q0A: t[Q0A].to(torch.int32)}),
                  [Q0A, "not floating point"]),
    "truncated-half": (lambda d, m: _truncate(d, lambda n: n // 2), [WEIGHTS, "not a readable safetensors"]),
    "truncated-header": (lambda d, m: _truncate(d, lambda n: 12), [WEIGHTS, "not a readable safetensors"]),
    "empty-weights-file": (lambda d, m: _truncate(d, lambda n: 0), [WEIGHTS, "not a readable safetensors"]),
    "random-bytes": (lambda d, m: (d / WEIGHTS).write_bytes(random.Random(0).randbytes(4096)),
                     [WEIGHTS, "not a readable safetensors"]),
    "torch-pickle-renamed": (lambda d, m: torch.save({"w": Evil(m)}, d / WEIGHTS), [WEIGHTS, "not a readable safetensors"]),
    "raw-pickle-renamed": (lambda d, m: (d / WEIGHTS).write_bytes(pickle.dumps({"w": Evil(m)})),
                           [WEIGHTS, "not a readable safetensors"]),
    "only-bin": (lambda d, m: ((d / WEIGHTS).unlink(), torch.save({"w": Evil(m)}, d / "adapter_model.bin")),
                 [WEIGHTS, "not found", "adapter_model.bin", "never unpickles"]),
    "missing-weights": (lambda d, m: (d / WEIGHTS).unlink(), [WEIGHTS, "not found"]),
    "missing-config": (lambda d, m: (d / CONFIG).unlink(), [CONFIG, "not found"]),
    "invalid-json": (lambda d, m: (d / CONFIG).write_text('{"r": 4,'), [CONFIG, "not valid JSON"]),
    "json-not-object": (lambda d, m: (d / CONFIG).write_text("[1, 2]"), [CONFIG, "JSON object", "list"]),
    "config-not-utf8": (lambda d, m: (d / CONFIG).write_bytes(b'{"r": "\xff\xfe"}'), [CONFIG, "not valid JSON"]),
    "missing-r": (lambda d, m: _edit_config(d, r=_DELETE), [CONFIG, "missing required field 'r'"]),
    "r-zero": (lambda d, m: _edit_config(d, r=0), ["r must be an integer >= 1", "0"]),
    "use-dora": (lambda d, m: _edit_config(d, use_dora=True), ["missing", ".lora_magnitude_vector (expected shape"]),
    "bias-all": (lambda d, m: _edit_config(d, bias="all"), [CONFIG, "bias='all'", "missing", ".base_layer.bias"]),
    "saved-module-wrong-shape": (lambda d, m: _rewrite(d, lambda t: {**t, f"{PREFIX}out.weight": torch.zeros(4, 9),
                                                                     f"{PREFIX}out.bias": torch.zeros(4)}),
                                 [f"{PREFIX}out.weight", "expected shape (4, 8)", "found (4, 9)"]),
    "stray-tensor": (lambda d, m: _rewrite(d, lambda t: {**t, f"{PREFIX}out.not_a_parameter": torch.zeros(3)}),
                     [f"{PREFIX}out.not_a_parameter"]),
    "peft-type-ia3": (lambda d, m: _edit_config(d, peft_type="IA3"), [CONFIG, "peft_type", "'IA3'"]),
    "missing-folder": (lambda d, m: shutil.rmtree(d), ["{dir}", "not an adapter folder"]),
    "folder-is-a-file": (_replace_folder_with_file, ["{dir}", "not an adapter folder"]),
    "other-model": (lambda d, m: _rewrite(d, _rename_keys(lambda k: k.replace("blocks.0.q", "encoder.layer.0.attention.self.query"))),
                    ["'encoder.layer.0.attention.self.query'", "another model"]),
    "unsupported-module": (lambda d, m: _rewrite(d, lambda t: {**t, f"{PREFIX}blocks.0.lora_A.weight": torch.zeros(4, 8)}),
                           ["blocks.0", "Block", "not a supported layer"]),
    "no-tensors": (lambda d, m: save_file({}, d / WEIGHTS), [WEIGHTS]),
    "metadata-not-json": (lambda d, m: _set_metadata(d, "{not json"), [WEIGHTS, "lorakit_config"]),
    "metadata-not-object": (lambda d, m: _set_metadata(d, "[1, 2]"), [WEIGHTS, "lorakit_config"]),
    "config-selects-other-modules": (lambda d, m: _edit_config(d, target_modules=["out"]),
                                     [CONFIG, "target_modules=['out']", "disagree", "'blocks.0.q'", "'emb'",
                                      "does not select", "selects ['out']", "holds no LoRA factors"]),
    "config-selects-more": (lambda d, m: _edit_config(d, target_modules=["q", "v", "emb", "out"]),
                            [CONFIG, "selects ['out']", "holds no LoRA factors"]),
    "config-selects-fewer": (lambda d, m: _edit_config(d, target_modules=r".*\.q|emb"),
                             [CONFIG, "'blocks.0.v', 'blocks.1.v'", "does not select"]),
    "config-excludes-a-module": (lambda d, m: _edit_config(d, exclude_modules=["blocks.1.v"]),
                                 [CONFIG, "exclude_modules=['blocks.1.v']", "'blocks.1.v'", "does not select"]),
    "unlisted-saved-module": (lambda d, m: _rewrite(d, lambda t: {**t, f"{PREFIX}out.weight": torch.zeros(4, 8),
                                                                  f"{PREFIX}out.bias": torch.zeros(4)}),
                              ["saved-whole modules for ['out']", "does not select", "modules_to_save=None"]),
    "nan-factor": (lambda d, m: _rewrite(d, lambda t: {**t, Q0A: torch.full_like(t[Q0A], float("nan"))}),
                   [Q0A, "32 NaN", "finite"]),
    "inf-factor": (lambda d, m: _rewrite(d, lambda t: {**t, V1B: t[V1B].index_fill(0, torch.tensor([2]), float("-inf"))}),
                   [V1B, "4 inf", "finite"]),
}
XFAIL: dict = {}  # known bugs as strict xfails: none left
STATES = ["fresh", "existing", "other"]


def _case_params():
    for case in CASES:
        for state in STATES:
            reason = XFAIL.get(case) or XFAIL.get((case, state))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(case, state, marks=marks, id=f"{case}-{state}")


@pytest.fixture
def v1(tmp_path):
    """A good adapter folder (v1) and the outputs it gives."""
    model = _adapted(CFG_V1, seed=1)
    lorakit.save(model, tmp_path / "v1")
    return tmp_path / "v1", _out(model)


def _model_in_state(state: str, good: Path) -> nn.Module:
    model = _toy()
    if state == "existing":
        lorakit.load(model, good)
    elif state == "other":
        lorakit.inject(model, LoraConfig(r=3, alpha=5, targets=["v"]), adapter="other")
        _randomize(model, seed=7)
    return model


@pytest.mark.parametrize("case,state", list(_case_params()))
def test_malformed_folder_raises_and_changes_nothing(case, state, v1, tmp_path):
    good, _ = v1
    bad, marker = tmp_path / "bad", tmp_path / "UNPICKLED"
    shutil.copytree(good, bad)
    mutate, fragments = CASES[case]
    mutate(bad, marker)
    model = _model_in_state(state, good)
    before = _snapshot(model)
    with pytest.raises(LoraError) as info:
        lorakit.load(model, bad)
    message = str(info.value)
    for fragment in fragments:
        assert fragment.replace("{dir}", str(bad)) in message, f"{fragment!r} not in: {message}"
    with pytest.raises(LoraError) as info:  # the dry run finds the same problem
        lorakit.verify(model, bad)
    assert str(info.value) == message
    _assert_unchanged(before, _snapshot(model))
    if state == "fresh":
        assert not lorakit.state.has_adapters(model)
    assert not marker.exists(), "lorakit unpickled the file"


@pytest.mark.parametrize("state", STATES)
def test_check_accepts_a_good_folder_and_changes_nothing(state, v1):
    good, expected = v1
    model = _model_in_state(state, good)
    before = _snapshot(model)
    cfg = lorakit.verify(model, good)
    assert (cfg.r, cfg.alpha) == (CFG_V1.r, CFG_V1.alpha)
    _assert_unchanged(before, _snapshot(model))
    lorakit.load(model, good)  # and load agrees
    torch.testing.assert_close(_out(model), expected, rtol=0, atol=0)


def test_the_pickle_payload_is_live(tmp_path):
    """Sanity check for the pickle cases: unpickling Evil really does create the marker."""
    pickle.loads(pickle.dumps(Evil(tmp_path / "m1")))
    torch.load(_dump(tmp_path / "evil.pt", Evil(tmp_path / "m2")), weights_only=False)
    assert (tmp_path / "m1").exists() and (tmp_path / "m2").exists()


def _dump(path, obj):
    torch.save({"w": obj}, path)
    return path


def test_file_with_fewer_modules_than_the_existing_adapter(v1, tmp_path):
    good, _ = v1
    partial = tmp_path / "partial"
    shutil.copytree(good, partial)
    _rewrite(partial, lambda t: {k: v for k, v in t.items() if ".v." not in k}, keep_metadata=False)
    _edit_config(partial, target_modules=["q", "emb"])  # a consistent file, with fewer modules
    model = _model_in_state("existing", good)
    before = _snapshot(model)
    with pytest.raises(LoraError, match=r"missing base_model\.model\.blocks\.\d\.v\.lora_A\.weight"):
        lorakit.load(model, partial)
    _assert_unchanged(before, _snapshot(model))


def test_load_while_merged_raises_and_changes_nothing(v1):
    good, expected = v1
    model = _model_in_state("existing", good)
    lorakit.merge(model)
    before = _snapshot(model)
    with pytest.raises(LoraError, match="merged"):
        lorakit.load(model, good)
    _assert_unchanged(before, _snapshot(model))
    lorakit.unmerge(model)
    torch.testing.assert_close(_out(model), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["a.b", "", "has space", "café", "x" * 129])
def test_invalid_adapter_name_on_load_raises_and_changes_nothing(name, v1):
    good, _ = v1
    with pytest.raises(LoraError):  # inject() rejects these names
        lorakit.inject(_toy(), CFG_V1, adapter=name)
    model = _toy()
    before = _snapshot(model)
    with pytest.raises(LoraError, match="adapter name"):
        lorakit.load(model, good, adapter=name)
    _assert_unchanged(before, _snapshot(model))
    assert not lorakit.state.has_adapters(model)


def test_load_new_adapter_while_other_merged_changes_nothing(v1):
    good, _ = v1
    model = lorakit.inject(_toy(), LoraConfig(r=3, alpha=5, targets=["q"]), adapter="other")
    _randomize(model, seed=7)
    lorakit.merge(model)
    before = _snapshot(model)
    with pytest.raises(LoraError, match="merged"):
        lorakit.load(model, good, adapter="default")
    _assert_unchanged(before, _snapshot(model))


# -- atomic save --------------------------------------------------------------------------------
def _fd_name(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _crash_st_save(monkeypatch):
    def boom(*a, **k):
        raise OSError("simulated crash while serialising the weights")
    monkeypatch.setattr(lorakit.files.writer, "st_save", boom)


def _crash_fsync(name):
    def install(monkeypatch):
        real = os.fsync

        def fsync(fd):
            if Path(_fd_name(fd)).name.startswith(f".{name}."):
                raise OSError(f"simulated crash in fsync of {name}")
            return real(fd)
        monkeypatch.setattr(os, "fsync", fsync)
    return install


def _crash_half_write(monkeypatch):
    real = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
            return False

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(28, "No space left on device (simulated)")

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fdopen(fd, *a, **k):
        f = real(fd, *a, **k)
        return HalfWriter(f) if Path(_fd_name(fd)).name.startswith(f".{WEIGHTS}.") else f
    monkeypatch.setattr(os, "fdopen", fdopen)


def _crash_replace(monkeypatch):
    real = os.replace

    def replace(src, dst, *a, **k):
        if Path(dst).name == WEIGHTS:
            raise OSError("simulated crash before renaming the weights")
        return real(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", replace)


CRASHES = {
    "st_save-raises": (_crash_st_save, "v1"),  # (installer, which config adapter_config.json then holds)
    "fsync-weights": (_crash_fsync(WEIGHTS), "v2"),
    "half-written-weights": (_crash_half_write, "v2"),
    "replace-weights": (_crash_replace, "v2"),
    "fsync-config": (_crash_fsync(CONFIG), "v1"),
}


def _assert_loads_v1(folder: Path, expected: torch.Tensor, v1_model, torn: bool) -> None:
    """The folder loads v1; ``torn``: its config is v2's, and load says it uses the weights' own."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = lorakit.load(_toy(), folder)
    messages = [str(w.message) for w in caught]
    if torn:
        assert len(messages) == 1 and "differs from the config" in messages[0] and "interrupted" in messages[0]
        assert "'r'" in messages[0] and "'target_modules'" in messages[0]
    else:
        assert messages == []
    assert torch.equal(_out(model), expected), "the folder no longer gives v1's outputs"
    want = {p: (layer.lora_A["default"].shape[0], layer.scale["default"]) for p, layer in lorakit.lora_layers(v1_model)}
    got = {p: (layer.lora_A["default"].shape[0], layer.scale["default"]) for p, layer in lorakit.lora_layers(model)}
    assert got == want
    for (p, layer), (_, ref) in zip(lorakit.lora_layers(model), lorakit.lora_layers(v1_model)):
        assert torch.equal(layer.lora_A["default"], ref.lora_A["default"]), p
        assert torch.equal(layer.lora_B["default"], ref.lora_B["default"]), p


@pytest.mark.parametrize("crash", list(CRASHES))
def test_crashed_save_keeps_previous_adapter(crash, tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    v1_model = _adapted(CFG_V1, seed=1)
    lorakit.save(v1_model, folder)
    v1_config, expected = (folder / CONFIG).read_bytes(), _out(v1_model)
    v2_model = _adapted(CFG_V2, seed=2)

    install, config_now = CRASHES[crash]
    with monkeypatch.context() as mp:
        install(mp)
        with pytest.raises(OSError, match="simulated|No space"):
            lorakit.save(v2_model, folder)

    assert sorted(p.name for p in folder.iterdir()) == [CONFIG, WEIGHTS], "a temp file was left behind"
    config = json.loads((folder / CONFIG).read_text())
    assert config["r"] == (CFG_V2.r if config_now == "v2" else CFG_V1.r)
    if config_now == "v1":
        assert (folder / CONFIG).read_bytes() == v1_config
    _assert_loads_v1(folder, expected, v1_model, torn=config_now == "v2")


_KILL_SCRIPT = r"""
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("io_errors_for_crash", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
model = mod._adapted(mod.CFG_V2, seed=2)
real = os.replace
def replace(src, dst, *a, **k):
    if os.path.basename(dst) == mod.WEIGHTS:
        os._exit(17)  # the process dies: no cleanup, the temp file stays
    return real(src, dst, *a, **k)
os.replace = replace
mod.lorakit.save(model, sys.argv[2])
"""


def test_killed_between_config_and_weights_rename_keeps_previous_adapter(tmp_path):
    folder = tmp_path / "adapter"
    v1_model = _adapted(CFG_V1, seed=1)
    lorakit.save(v1_model, folder)
    expected = _out(v1_model)
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, __file__, str(folder)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 3 and names[1:] == [CONFIG, WEIGHTS] and names[0].startswith(f".{WEIGHTS}.")
    assert json.loads((folder / CONFIG).read_text())["r"] == CFG_V2.r  # the new config is already in place
    _assert_loads_v1(folder, expected, v1_model, torn=True)
    # and a later, successful save still works in the same folder
    v2_model = _adapted(CFG_V2, seed=2)
    lorakit.save(v2_model, folder)
    assert torch.equal(_out(lorakit.load(_toy(), folder)), _out(v2_model))


def test_config_files_hold_only_peft_fields_and_hand_edits_are_reported(tmp_path):
    """adapter_config.json holds PEFT's fields only (the weights carry lorakit's copy of it, in their
    metadata); a hand-edited lorakit config is not silently mixed with weights saved under another
    one: load warns, naming the changed fields, and uses the config the weights were saved with."""
    model = _adapted(CFG_V1, seed=1)
    lorakit.save(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / CONFIG).read_text())
    peft_fields = {f.name for f in dataclasses.fields(pytest.importorskip("peft").LoraConfig)}
    assert set(config) <= peft_fields, sorted(set(config) - peft_fields)
    _, meta = _tensors(tmp_path / "a")
    assert json.loads(meta["lorakit_config"]) == config

    config["lora_alpha"] = 99  # a hand edit
    (tmp_path / "a" / CONFIG).write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"differs from the config .* \['lora_alpha'\]"):
        fresh = lorakit.load(_toy(), tmp_path / "a")
    assert torch.equal(_out(fresh), _out(model))  # v1 as saved, not alpha=99 on v1's factors
    # a reformatted but equal config is the same config: no warning
    (tmp_path / "a" / CONFIG).write_text(json.dumps(json.loads(meta["lorakit_config"])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.load(_toy(), tmp_path / "a")


@pytest.mark.parametrize("fields", [
    {"target_modules": ["q", "v", "emb"]},  # leaf names, PEFT's usual form
    {"target_modules": ["blocks.0.q", "blocks.1.q", "v", "emb"]},  # paths and suffixes
    {"target_modules": r".*\.(q|v)|emb"},  # one regex string, full match
    {"target_modules": ["q", "v", "emb", "out"], "exclude_modules": ["out"]},
    {"target_modules": r"(.*\.)?(q|v|emb|out)", "exclude_modules": r"out"},
    {"target_modules": ["q", "v", "emb"], "rank_pattern": {"blocks.0.q": 4}, "alpha_pattern": {"emb": 8}},
], ids=["leaves", "paths", "regex", "exclude-list", "exclude-regex", "patterns"])
def test_peft_style_targets_that_select_the_file_modules_load(fields, v1, tmp_path):
    """Configs written the ways PEFT writes them select exactly the file's modules, so they load."""
    good, expected = v1
    d = tmp_path / "edited"
    shutil.copytree(good, d)
    _edit_config(d, **fields)
    assert torch.equal(_out(lorakit.load(_toy(), d)), expected)


# -- round trips of every layer kind ------------------------------------------------------------
class Wrap(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.tail = nn.Identity()

    def forward(self, x):
        return self.tail(self.layer(x))


class Experts(nn.Module):
    """A raw 3-d weight used by einsum: only target_parameters can adapt it."""

    def __init__(self):
        super().__init__()
        self.experts = nn.Parameter(torch.randn(3, 8, 5) * 0.3)

    def forward(self, x):  # x: (batch, 3, 8)
        return torch.einsum("bei,eio->beo", x, self.experts)


def _hf_conv1d():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    layer = pytorch_utils.Conv1D(6, 8)  # nf=6 outputs, nx=8 inputs; weight (8, 6)
    nn.init.normal_(layer.weight, std=0.3)
    return layer


def _randn(*shape):
    return lambda g: torch.randn(*shape, generator=g)


KINDS = {  # name -> (make layer, make input, config kwargs, expected LoraLayer kind)
    "linear": (lambda: nn.Linear(8, 6), _randn(3, 8), {}, "linear"),
    "embedding": (lambda: nn.Embedding(20, 8, padding_idx=0), lambda g: torch.randint(0, 20, (3, 5), generator=g), {}, "embedding"),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), _randn(2, 4, 10), {}, "conv"),
    "conv1d-stride-dilation": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2), _randn(2, 4, 11), {}, "conv"),
    "conv2d-stride-dilation": (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=2, dilation=2), _randn(2, 3, 9, 9), {}, "conv"),
    "conv2d-reflect": (lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), _randn(2, 3, 7, 7), {}, "conv"),
    "conv3d-dilation": (lambda: nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 2, 1), dilation=(1, 2, 1)), _randn(2, 2, 3, 6, 6), {}, "conv"),
    "conv2d-grouped": (lambda: nn.Conv2d(4, 8, 3, groups=2, padding=1), _randn(2, 4, 6, 6), {}, "conv_grouped"),
    "conv2d-depthwise": (lambda: nn.Conv2d(4, 4, 3, groups=4, padding=1, dilation=1), _randn(2, 4, 6, 6), {}, "conv_grouped"),
    "hf-conv1d": (_hf_conv1d, _randn(2, 3, 8), {}, "conv1d_hf"),
    "raw-parameter": (Experts, _randn(2, 3, 8), {"target_parameters": ["layer.experts"]}, "param"),
}


def _kind_model(kind):
    make, make_input, _, _ = KINDS[kind]
    torch.manual_seed(0)
    return Wrap(make()).eval(), make_input(torch.Generator().manual_seed(1))


def _kind_config(kind):
    kw = KINDS[kind][2]
    return LoraConfig(r=3, alpha=5, **(kw or {"targets": ["layer"]}))


def _factors(model):
    return {(p, n): (layer.lora_A[n].detach().clone(), layer.lora_B[n].detach().clone())
            for p, layer in lorakit.lora_layers(model) for n in layer.lora_A}


@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip_every_layer_kind(kind, tmp_path):
    model, x = _kind_model(kind)
    pristine = copy.deepcopy(model)
    lorakit.inject(model, _kind_config(kind))
    assert [layer.kind.name for _, layer in lorakit.lora_layers(model)] == [KINDS[kind][3]]
    _randomize(model, seed=3)
    with torch.no_grad():
        expected, base_out = model(x), pristine(x)
    assert not torch.allclose(expected, base_out), "the adapter must change the output"
    lorakit.save(model, tmp_path / "a")

    fresh = lorakit.load(copy.deepcopy(pristine), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    factors, ref = _factors(fresh), _factors(model)
    assert factors.keys() == ref.keys()
    for key, (a, b) in factors.items():
        assert torch.equal(a, ref[key][0]) and torch.equal(b, ref[key][1]), key
    assert lorakit.summary(fresh).modules == lorakit.summary(model).modules
    assert [layer.scale for _, layer in lorakit.lora_layers(fresh)] == [layer.scale for _, layer in lorakit.lora_layers(model)]

    # loading again into the model that already has the adapter overwrites the changed factors
    _randomize(fresh, seed=4)
    lorakit.load(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)

    # merge of the loaded adapter agrees with the unmerged forward
    lorakit.merge(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)


def test_round_trip_patterns_and_rslora(tmp_path):
    cfg = LoraConfig(r=4, alpha=8, targets=["q", "v", "emb"], use_rslora=True,
                     rank_pattern={r"blocks\.1\.q": 2, "emb": 6}, alpha_pattern={"v": 3})
    model = _adapted(cfg, seed=5)
    lorakit.save(model, tmp_path / "a")
    fresh = lorakit.load(_toy(), tmp_path / "a")
    assert torch.equal(_out(fresh), _out(model))
    ranks_scales = lambda m: {p: (layer.lora_A["default"].shape[0], layer.scale["default"])  # noqa: E731
                              for p, layer in lorakit.lora_layers(m)}
    assert ranks_scales(fresh) == ranks_scales(model)
    assert ranks_scales(model)["blocks.1.q"] == (2, 8 / 2 ** 0.5)
    assert ranks_scales(model)["blocks.0.v"] == (4, 3 / 2)


@pytest.mark.parametrize("kind", list(KINDS))
def test_bf16_save_round_trip(kind, tmp_path):
    model, x = _kind_model(kind)
    pristine = copy.deepcopy(model)
    lorakit.inject(model, _kind_config(kind))
    _randomize(model, seed=3)
    with torch.no_grad():
        expected = model(x)
    lorakit.save(model, tmp_path / "bf16", dtype=torch.bfloat16)
    tensors, _ = _tensors(tmp_path / "bf16")
    assert tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())

    fresh = lorakit.load(copy.deepcopy(pristine), tmp_path / "bf16")
    ref = _factors(model)
    for key, (a, b) in _factors(fresh).items():
        assert a.dtype == b.dtype == torch.float32  # loaded into the adapter's own dtype
        assert torch.equal(a, ref[key][0].to(torch.bfloat16).float()), key
        assert torch.equal(b, ref[key][1].to(torch.bfloat16).float()), key
    with torch.no_grad():
        got = fresh(x)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
