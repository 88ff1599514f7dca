"""Training mode of new lorakit modules, and PEFT 0.21's LoraConfig options both ways with real PEFT.

Part 1: every path that creates modules (inject, load, combine, extract, quantize, dequantize) gives
them the training mode of the module they wrap: in eval mode an adapter with dropout > 0 is
deterministic and equals the float64 formula without dropout; in training mode its dropout drops
(compared with an explicit dropout mask drawn from the same seed).

Part 2: PEFT's options (``layers_to_transform`` / ``layers_pattern``, ``lora_bias``,
``init_lora_weights=False``) in both directions against real PEFT (its file loaded by lorakit and
lorakit's file loaded by PEFT, same outputs, merged included), every factor random so B != 0; the
options lorakit does not implement are refused by name before anything changes; and the manual's
table lists exactly the fields of ``peft.LoraConfig``.

Tolerances: outputs are compared with a float64 oracle at 1e-5 x max(|oracle|, 1) (fp32 throughout,
two chained products of dims <= 64: the fp32 error is ~1e-6 relative), and PEFT's output against
lorakit's at the same 1e-5 scale-relative bound as tests/test_peft_compat.py.
"""

import copy
import dataclasses
import json
import re
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.layers import LoraLayer, SavedModule
from lorakit.model import dequantize

peft = pytest.importorskip("peft")

RTOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about custom models, missing biases, ...
        yield


def _close(actual, expected, rtol=RTOL):
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rtol * max(expected.abs().max().item(), 1.0), f"max |diff| {err:.3g}"


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(up=nn.Linear(16, 32), act=nn.Tanh(), down=nn.Linear(32, 16),
                                     head=nn.Linear(16, 4)))


def _randomize(model, adapter="default", seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            if adapter in layer.lora_A:
                for p in (layer.lora_A[adapter], layer.lora_B[adapter], *layer_bias(layer, adapter)):
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def layer_bias(layer, adapter):
    return [layer.lora_bias[adapter]] if adapter in getattr(layer, "lora_bias", {}) else []


def _oracle(model, x, adapter="default", masks=None):
    """The float64 forward of ``_net`` with the adapter's s·B·A (+ s·b) added, no dropout (or the given
    dropped inputs per layer)."""
    h = x.double()
    for name in ("up", "act", "down", "head"):
        module = getattr(model, name)
        layer = module if isinstance(module, LoraLayer) else None
        base = layer.base_layer if layer is not None else module
        base = base.current() if isinstance(base, SavedModule) else base
        if isinstance(base, nn.Tanh):
            h = torch.tanh(h)
            continue
        out = h @ base.weight.double().t() + base.bias.double()
        if layer is not None and adapter in layer.lora_A:
            a, b, s = layer.lora_A[adapter].double(), layer.lora_B[adapter].double(), layer.scale[adapter]
            inp = masks[name].double() if masks and name in masks else h
            out = out + s * (inp @ a.t() @ b.t())
            out = out + sum(s * t.double() for t in layer_bias(layer, adapter))
        h = out
    return h


# -- part 1: the training mode of new modules --------------------------------------------------------
def _modes(model):
    return {m.training for m in model.modules()}


def _check_eval_deterministic(model, x, adapter="default"):
    assert _modes(model) == {False}, "a module created in an eval-mode model must be in eval mode"
    with torch.no_grad():
        y1, y2 = model(x), model(x)
    assert torch.equal(y1, y2)
    _close(y1, _oracle(model, x, adapter))


def _check_train_drops(model, x, adapter="default", p=0.5):
    """In training mode the first adapted layer ('up') drops its input: the output equals the float64
    formula with the dropout mask that the same seed draws."""
    model.train()
    assert _modes(model) == {True}
    torch.manual_seed(123)
    dropped = F.dropout(x, p, True)
    torch.manual_seed(123)
    with torch.no_grad():
        y = model(x)
        y_other = model(x)
    assert not torch.equal(y, y_other)
    _close(y, _oracle(model, x, adapter, masks={"up": dropped}))
    model.eval()


def test_inject_into_an_eval_model_creates_eval_modules():
    model = _net().eval()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, dropout=0.5, targets=["up"], modules_to_save=["head"]))
    _randomize(model)
    x = torch.randn(6, 16)
    _check_eval_deterministic(model, x)
    assert not model.head.modules_to_save["default"].training
    _check_train_drops(model, x)
    # a second adapter added while the model trains is created in training mode
    model.train()
    lorakit.inject(model, lorakit.LoraConfig(r=2, dropout=0.5, targets=["down"]), adapter="second")
    assert _modes(model) == {True}


def test_load_into_an_eval_model_creates_eval_modules(tmp_path):
    src = lorakit.inject(_net(), lorakit.LoraConfig(r=4, alpha=8, dropout=0.5, targets=["up"]))
    _randomize(src)
    lorakit.save(src, tmp_path / "a")
    model = lorakit.load(_net().eval(), tmp_path / "a")
    x = torch.randn(6, 16)
    _check_eval_deterministic(model, x)
    _check_train_drops(model, x)
    # PEFT's file with lora_dropout > 0 likewise
    pm = peft.get_peft_model(_net(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["up"],
                                                     init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "p"))
    _check_eval_deterministic(lorakit.load(_net().eval(), tmp_path / "p"), x)


def test_combine_in_an_eval_model_creates_eval_modules():
    model = _net().eval()
    for i, name in enumerate(("a", "b")):
        lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, dropout=0.5, targets=["up"]), adapter=name)
        _randomize(model, name, seed=i + 1)
    lorakit.combine(model, {"a": 0.5, "b": 0.5}, method="cat", adapter="ab", activate=True)
    x = torch.randn(6, 16)
    _check_eval_deterministic(model, x, "ab")
    model.train()
    lorakit.combine(model, {"a": 1.0, "b": -1.0}, method="cat", adapter="diff")
    assert _modes(model) == {True}


def test_extract_into_an_eval_model_creates_eval_modules():
    base, tuned = _net(0).eval(), _net(0)
    with torch.no_grad():
        tuned.up.weight.add_(torch.randn(32, 1) @ torch.randn(1, 16))
    lorakit.extract(base, tuned, rank=1, targets=["up"], modules_to_save=["head"])
    assert _modes(base) == {False}
    x = torch.randn(6, 16)
    with torch.no_grad():
        _close(base(x), tuned(x).double())


def test_quantize_and_dequantize_keep_the_training_mode():
    pytest.importorskip("bitsandbytes")
    for mode in (False, True):
        model = lorakit.quantize(_net().train(mode), "nf4", skip=["head"])
        assert _modes(model) == {mode}
        lorakit.inject(model, lorakit.LoraConfig(r=2, dropout=0.5, targets=["up", "down"]))
        assert _modes(model) == {mode}
        if not mode:
            x = torch.randn(6, 16)
            with torch.no_grad():
                assert torch.equal(model(x), model(x))
        replaced = dequantize(model)
        assert replaced and _modes(model) == {mode}
        lorakit.merge_and_unload(model)
        assert _modes(model) == {mode}
