"""Non-finite values never reach a weight: merge refuses NaN/inf factors and an overflowing result,
all or nothing (the load side is covered by test_io_errors' nan-factor / inf-factor cases)."""

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig, LoraError


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).to(dtype)
    lorakit.inject(model, LoraConfig(r=2, alpha=4, targets=["0", "2"]))
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B["default"].normal_()
    return model


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_merge_refuses_a_non_finite_factor_and_merges_nothing(value):
    model = _model()
    with torch.no_grad():
        model[2].lora_A["default"][1, 3] = value  # the second layer: the first must not stay merged
    before = _state(model)
    with pytest.raises(LoraError, match=r"2\.lora_A\.default holds NaN or inf"):
        lorakit.merge(model)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) or (before[k].isnan() == after[k].isnan()).all() for k in before)
    assert lorakit.registry(model).merged == () and all(not l.merged for _, l in lorakit.lora_layers(model))


def test_merge_refuses_an_update_that_overflows_fp16_and_merges_nothing():
    model = _model(torch.float16)
    with torch.no_grad():  # finite fp32 factors whose product exceeds fp16's 65504 in the second layer
        model[2].lora_A["default"].fill_(300.0)
        model[2].lora_B["default"].fill_(300.0)
    before = _state(model)
    with pytest.raises(LoraError, match="non-finite"):
        lorakit.merge(model, keep_copy=True)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert lorakit.registry(model).merged == ()


def test_merge_refuses_a_weight_parametrized_after_inject_and_merges_nothing():
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    model = _model()
    parametrize.register_parametrization(model[2].base_layer, "weight", Double())
    before = _state(model)
    with pytest.raises(LoraError, match=r"cannot merge into 2\.weight: a parametrization"):
        lorakit.merge(model)
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())
    assert lorakit.registry(model).merged == ()
